/* The kernel matrix's memory-BIO client (xtask/guest/init.sh,
 * check_plaintext): OpenSSL over memory BIOs, the caller moving the
 * records between the BIOs and the socket itself, as Node.js and
 * Python's asyncio clients do. Its SSL_write touches no socket; the
 * agent joins its SSL* to the socket by the thread's next send
 * (docs/plaintext.md, "Memory BIOs"). argv: ip port line. Sends the line,
 * prints the answer line (`openssl s_server -rev` echoes it reversed). */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fd;
static BIO *rbio, *wbio;

/* The records OpenSSL wrote into its memory BIO, sent on the socket. */
static int flush(void) {
    char buf[16384];
    int n;
    while ((n = BIO_read(wbio, buf, sizeof buf)) > 0) {
        for (int off = 0; off < n;) {
            ssize_t w = send(fd, buf + off, n - off, 0);
            if (w <= 0) return -1;
            off += w;
        }
    }
    return 0;
}

/* Bytes from the socket, into OpenSSL's memory BIO. */
static int fill(void) {
    char buf[16384];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return -1;
    return BIO_write(rbio, buf, (int)n) == n ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: ip port line\n");
        return 2;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) return 2;
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        perror("connect");
        return 1;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = SSL_new(ctx);
    rbio = BIO_new(BIO_s_mem());
    wbio = BIO_new(BIO_s_mem());
    SSL_set_bio(ssl, rbio, wbio);
    SSL_set_connect_state(ssl);
    for (;;) {
        int r = SSL_do_handshake(ssl);
        if (flush()) return 1;
        if (r == 1) break;
        if (SSL_get_error(ssl, r) != SSL_ERROR_WANT_READ || fill()) {
            ERR_print_errors_fp(stderr);
            return 1;
        }
    }
    char line[512];
    snprintf(line, sizeof line, "%s\n", argv[3]);
    if (SSL_write(ssl, line, (int)strlen(line)) <= 0 || flush()) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    char got[512];
    size_t have = 0;
    while (have == 0 || got[have - 1] != '\n') {
        int n = SSL_read(ssl, got + have, (int)(sizeof got - 1 - have));
        if (n > 0) {
            have += (size_t)n;
            continue;
        }
        if (SSL_get_error(ssl, n) != SSL_ERROR_WANT_READ || flush() || fill()) {
            ERR_print_errors_fp(stderr);
            return 1;
        }
    }
    fwrite(got, 1, have, stdout);
    return 0;
}
