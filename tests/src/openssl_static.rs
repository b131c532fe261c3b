//! A TLS client with OpenSSL linked into its executable (Debian's
//! libssl.a and libcrypto.a from libssl-dev, `cargo xtask setup`), built
//! by the tests with `cc` into a temporary directory, and a stripped copy
//! of it: the clients of docs/plaintext.md's "OpenSSL linked in, found by
//! symbol" row (tests/tests/linked_openssl.rs).
//!
//! The client (argv: ip, port, host, ca file, path, body) sends one HTTP/1.1
//! POST with `Connection: close` over TLS (SNI and verification against
//! `host`) with `SSL_write`, reads the response with `SSL_read` until it is
//! complete (Content-Length or the last chunk; the fakes keep the
//! connection open) or 30 s pass, and prints it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const CLIENT_C: &str = r#"
#define _GNU_SOURCE
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 7) { fprintf(stderr, "usage: ip port host ca path body\n"); return 2; }
    const char *ip = argv[1], *host = argv[3], *ca = argv[4], *path = argv[5], *body = argv[6];
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) { perror("connect"); return 1; }
    struct timeval tv = { .tv_sec = 30 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx || SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) { ERR_print_errors_fp(stderr); return 1; }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, host);
    SSL_set1_host(ssl, host);
    if (SSL_connect(ssl) != 1) { ERR_print_errors_fp(stderr); return 1; }
    char req[65536];
    int n = snprintf(req, sizeof req,
        "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        "anthropic-version: 2023-06-01\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
        path, host, strlen(body), body);
    if (n <= 0 || n >= (int)sizeof req) { fprintf(stderr, "request too long\n"); return 2; }
    if (SSL_write(ssl, req, n) != n) { ERR_print_errors_fp(stderr); return 1; }
    /* Until the response is complete (Content-Length, or the last chunk),
       or the server closes: the fake keeps the connection open. */
    static char resp[1 << 20];
    size_t len = 0;
    int r;
    while (len < sizeof resp - 1 && (r = SSL_read(ssl, resp + len, sizeof resp - 1 - len)) > 0) {
        len += r;
        resp[len] = 0;
        char *end = strstr(resp, "\r\n\r\n");
        if (!end) continue;
        size_t head = end + 4 - resp;
        char *cl = strcasestr(resp, "\r\ncontent-length:");
        if (cl && cl < end) {
            if (len >= head + strtoul(cl + 17, NULL, 10)) break;
        } else if (len >= 5 && memcmp(resp + len - 5, "0\r\n\r\n", 5) == 0) {
            break;
        }
    }
    fwrite(resp, 1, len, stdout);
    SSL_shutdown(ssl);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return 0;
}
"#;

/// The client and its stripped copy, built in `dir`: (linked, stripped).
/// Panics with the compiler's output when it cannot be built (libssl-dev
/// missing: `cargo xtask setup`), and when the result needs a shared
/// libssl or libcrypto.
pub fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("static_client.c");
    std::fs::write(&src, CLIENT_C).unwrap();
    let exe = dir.join("static_client");
    let out = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(["-l:libssl.a", "-l:libcrypto.a", "-lpthread", "-ldl"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc: {e}"));
    assert!(
        out.status.success(),
        "cc with libssl.a (needs libssl-dev: cargo xtask setup): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let needed = Command::new("readelf")
        .args(["-dW"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run readelf: {e}"));
    let needed = String::from_utf8_lossy(&needed.stdout);
    assert!(
        !needed.contains("libssl.so") && !needed.contains("libcrypto.so"),
        "the client must not need the shared libssl:\n{needed}"
    );
    let stripped = dir.join("static_client_stripped");
    let out = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run strip: {e}"));
    assert!(
        out.status.success(),
        "strip: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (exe, stripped)
}
