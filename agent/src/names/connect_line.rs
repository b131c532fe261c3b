//! A userspace reader of HTTP `CONNECT` request lines that follows the
//! rules of the kernel's (ebpf/src/connect_line.rs, called by
//! `names_sni_egress`) step for step, so that both can be run over the same
//! inputs: by the unit tests below and by `kernel_agrees`, which runs the
//! kernel program on the same payloads. The agent does not call this on
//! traffic.
//!
//! The input is a TCP connection's first payload; only its first `SNI_BUF`
//! bytes are read (the kernel's copy), and bytes past the payload read as
//! 0 (the kernel's scratch is created zeroed). The rules (docs/names.md,
//! "Proxies"):
//!
//! 1. `CONNECT` in any case and a space, else [`Line::Plain`] for 3 to 7
//!    capital letters, a space and `http://`, else [`Line::Other`]; a
//!    payload shorter than 8 bytes that is a prefix of `connect ` (any
//!    case) is [`Line::Split`].
//! 2. The host: letters, digits, `-`, `.`, `_`, 1 to 253 of them, then
//!    `:`; or `[`, 1 to 45 hex digits, `:` or `.`, `]`, `:`. Then 1 to 5
//!    digits (1 to 65535) and a space. The payload ending first:
//!    [`Line::Split`]; any other byte, or a bound passed:
//!    [`Line::Malformed`].
//! 3. A host of digits and dots only, or in brackets: [`Line::IpLiteral`].
//!    Otherwise its labels as the kernel hashes them: no empty label but
//!    after one trailing dot, at most `DNS_MAX_LABELS`, else malformed.
//!
//! Pure: no I/O, never panics, never reads past the input.

use llm_egress_common::{DNS_MAX_LABELS, SNI_BUF};

/// `CONNECT ` is 8 bytes.
const HOST_AT: usize = 8;
const MAX_HOST: usize = 253;
const MAX_V6_LITERAL: usize = 45;

/// What a first payload is, by the kernel's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// Not a CONNECT request, nor a plain proxy request.
    Other,
    /// `GET http://…`: a proxy request that tunnels nothing
    /// (`PROXY_PLAIN_HTTP`).
    Plain,
    /// A CONNECT request naming a host: the host as sent, its labels in
    /// lower case (for `dns::match_name`), the port.
    Host {
        host: Vec<u8>,
        labels: Vec<Vec<u8>>,
        port: u16,
    },
    /// An IP address (`CONNECT_IP_LITERAL`).
    IpLiteral(u16),
    /// The payload ends inside the request line (`CONNECT_SPLIT`).
    Split,
    /// Not a request line the kernel reads (`CONNECT_MALFORMED`).
    Malformed,
}

/// Reads a first payload; see the module comment.
pub fn parse(payload: &[u8]) -> Line {
    let b = &payload[..payload.len().min(SNI_BUF)];
    let avail = b.len();
    let byte = |i: usize| b.get(i).copied().unwrap_or(0);
    let prefix = (0..HOST_AT - 1)
        .filter(|&i| i < avail)
        .all(|i| byte(i) | 0x20 == b"connect"[i]);
    if avail < HOST_AT {
        return if prefix && avail > 0 {
            Line::Split
        } else {
            Line::Other
        };
    }
    if !prefix || byte(HOST_AT - 1) != b' ' {
        return if plain_request(&byte, avail) {
            Line::Plain
        } else {
            Line::Other
        };
    }
    // The walk of the host and port (the kernel's `step`).
    let (mut phase, mut host_len, mut named, mut port, mut digits) = (0, 0usize, false, 0u64, 0);
    let mut pos = HOST_AT;
    loop {
        if pos >= avail {
            return Line::Split;
        }
        let c = byte(pos);
        pos += 1;
        match phase {
            0 => {
                if c == b':' {
                    if host_len == 0 {
                        return Line::Malformed;
                    }
                    phase = 1;
                } else if c == b'[' && host_len == 0 {
                    phase = 2;
                } else if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_') {
                    named |= !(c.is_ascii_digit() || c == b'.');
                    host_len += 1;
                    if host_len > MAX_HOST {
                        return Line::Malformed;
                    }
                } else {
                    return Line::Malformed;
                }
            }
            2 => {
                if c == b']' && host_len > 0 {
                    phase = 3;
                } else if c.is_ascii_hexdigit() || c == b':' || c == b'.' {
                    host_len += 1;
                    if host_len > MAX_V6_LITERAL {
                        return Line::Malformed;
                    }
                } else {
                    return Line::Malformed;
                }
            }
            3 => {
                if c != b':' {
                    return Line::Malformed;
                }
                phase = 1;
            }
            _ => {
                if c.is_ascii_digit() {
                    port = port * 10 + u64::from(c - b'0');
                    digits += 1;
                    if digits > 5 {
                        return Line::Malformed;
                    }
                } else if c == b' ' && digits > 0 && (1..=65_535).contains(&port) {
                    break;
                } else {
                    return Line::Malformed;
                }
            }
        }
    }
    let port = port as u16;
    if !named {
        return Line::IpLiteral(port);
    }
    let host = b[HOST_AT..HOST_AT + host_len].to_vec();
    match labels(&host) {
        Some(labels) => Line::Host { host, labels, port },
        None => Line::Malformed,
    }
}

/// `METHOD http://`: 3 to 7 capital letters, a space, `http://`.
fn plain_request(byte: &impl Fn(usize) -> u8, avail: usize) -> bool {
    let mut space = 0;
    for i in 0..8 {
        let c = byte(i);
        if space == 0 && c == b' ' && i >= 3 {
            space = i;
        } else if space == 0 && !c.is_ascii_uppercase() {
            return false;
        }
    }
    space != 0 && space + 8 <= avail && (0..7).all(|j| byte(space + 1 + j) == b"http://"[j])
}

/// The lower-case labels of a host as the kernel's `name_step` splits it:
/// None for an empty label (but after one trailing dot) or more than
/// `DNS_MAX_LABELS`.
fn labels(host: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &c in host {
        if c == b'.' {
            if cur.is_empty() || out.len() >= DNS_MAX_LABELS {
                return None;
            }
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c.to_ascii_lowercase());
        }
    }
    if !cur.is_empty() {
        if out.len() >= DNS_MAX_LABELS {
            return None;
        }
        out.push(cur);
    }
    (!out.is_empty()).then_some(out)
}

/// Request lines for the tests and the kernel comparison.
pub mod wire {
    /// Good, hostile and cut request lines: (what, first payload).
    pub fn corpus() -> Vec<(String, Vec<u8>)> {
        let good =
            b"CONNECT api.prov.test:443 HTTP/1.1\r\nHost: api.prov.test:443\r\n\r\n".to_vec();
        let line = |s: &str| format!("{s}\r\nHost: x\r\n\r\n").into_bytes();
        let mut corpus: Vec<(String, Vec<u8>)> = vec![
            ("provider host".into(), good.clone()),
            (
                "lower-case method, other case host".into(),
                line("connect API.Prov.Test:443 HTTP/1.1"),
            ),
            (
                "trailing dot".into(),
                line("CONNECT api.prov.test.:443 HTTP/1.1"),
            ),
            (
                "wildcard".into(),
                line("CONNECT x.y.wild.test:443 HTTP/1.1"),
            ),
            (
                "provider host on another port".into(),
                line("CONNECT api.prov.test:8443 HTTP/1.1"),
            ),
            ("other host".into(), line("CONNECT other.test:443 HTTP/1.1")),
            (
                "IPv4 literal".into(),
                line("CONNECT 192.0.2.9:443 HTTP/1.1"),
            ),
            (
                "IPv6 literal".into(),
                line("CONNECT [2001:db8::1]:443 HTTP/1.1"),
            ),
            (
                "IPv6 literal, v4 tail".into(),
                line("CONNECT [::ffff:192.0.2.1]:443 HTTP/1.1"),
            ),
            (
                "IPv6 literal without port".into(),
                line("CONNECT [2001:db8::1] HTTP/1.1"),
            ),
            (
                "IPv6 literal, 46 bytes".into(),
                line(&format!("CONNECT [{}]:443 HTTP/1.1", "1".repeat(46))),
            ),
            (
                "absolute-form".into(),
                line("CONNECT http://api.prov.test:443 HTTP/1.1"),
            ),
            ("no port".into(), line("CONNECT api.prov.test HTTP/1.1")),
            ("empty port".into(), line("CONNECT api.prov.test: HTTP/1.1")),
            ("port 0".into(), line("CONNECT api.prov.test:0 HTTP/1.1")),
            (
                "port 65536".into(),
                line("CONNECT api.prov.test:65536 HTTP/1.1"),
            ),
            (
                "port 000443".into(),
                line("CONNECT api.prov.test:000443 HTTP/1.1"),
            ),
            (
                "port then CRLF".into(),
                b"CONNECT api.prov.test:443\r\n\r\n".to_vec(),
            ),
            ("empty host".into(), line("CONNECT :443 HTTP/1.1")),
            (
                "two spaces".into(),
                line("CONNECT  api.prov.test:443 HTTP/1.1"),
            ),
            ("tab".into(), line("CONNECT\tapi.prov.test:443 HTTP/1.1")),
            (
                "empty label".into(),
                line("CONNECT api..prov.test:443 HTTP/1.1"),
            ),
            (
                "leading dot".into(),
                line("CONNECT .api.prov.test:443 HTTP/1.1"),
            ),
            ("dots only".into(), line("CONNECT ...:443 HTTP/1.1")),
            (
                "17 labels".into(),
                line(&format!("CONNECT {}test:443 HTTP/1.1", "a.".repeat(16))),
            ),
            (
                "253-byte host".into(),
                line(&format!("CONNECT {}:443 HTTP/1.1", "a".repeat(253))),
            ),
            (
                "254-byte host".into(),
                line(&format!("CONNECT {}:443 HTTP/1.1", "a".repeat(254))),
            ),
            (
                "64 KiB host".into(),
                line(&format!("CONNECT {}:443 HTTP/1.1", "a".repeat(64 * 1024))),
            ),
            (
                "percent".into(),
                line("CONNECT api%2eprov.test:443 HTTP/1.1"),
            ),
            (
                "0xff in host".into(),
                b"CONNECT api.pr\xffov.test:443 HTTP/1.1\r\n\r\n".to_vec(),
            ),
            (
                "NUL in host".into(),
                b"CONNECT api.pr\0ov.test:443 HTTP/1.1\r\n\r\n".to_vec(),
            ),
            (
                "userinfo".into(),
                line("CONNECT user@api.prov.test:443 HTTP/1.1"),
            ),
            (
                "CONNECTX".into(),
                line("CONNECTX api.prov.test:443 HTTP/1.1"),
            ),
            ("C0NNECT".into(), line("C0NNECT api.prov.test:443 HTTP/1.1")),
            (
                "plain GET".into(),
                line("GET http://api.prov.test/ HTTP/1.1"),
            ),
            (
                "plain OPTIONS".into(),
                line("OPTIONS http://api.prov.test/ HTTP/1.1"),
            ),
            (
                "plain, https scheme".into(),
                line("GET https://api.prov.test/ HTTP/1.1"),
            ),
            ("origin-form GET".into(), line("GET / HTTP/1.1")),
            (
                "lower-case get".into(),
                line("get http://api.prov.test/ HTTP/1.1"),
            ),
            (
                "HTTP/2 preface".into(),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            ),
            ("SOCKS5 greeting".into(), vec![5, 1, 0]),
            ("CONNECT alone".into(), b"CONNECT".to_vec()),
            ("one byte c".into(), b"c".to_vec()),
            ("4 KiB of C".into(), vec![b'C'; 4096]),
        ];
        for n in 1..good.len() {
            corpus.push((format!("first {n} bytes"), good[..n].to_vec()));
        }
        let provider = b"CONNECT api.prov.test:443 ".len();
        for i in 0..provider {
            for v in [0u8, 0xff, b' ', b':', b'.', b'[', b'9'] {
                let mut p = good.clone();
                p[i] = v;
                corpus.push((format!("byte {i} = {v:#04x}"), p));
            }
        }
        corpus
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(line: &str) -> Line {
        parse(line.as_bytes())
    }

    #[test]
    fn request_lines_are_read_like_the_kernel_reads_them() {
        let named = |h: &str, port| match host(&format!("CONNECT {h}:{port} HTTP/1.1\r\n\r\n")) {
            Line::Host { host, port: p, .. } => host == h.as_bytes() && p == port,
            _ => false,
        };
        assert!(named("api.openai.com", 443));
        assert!(named("API.OpenAI.com.", 8443));
        assert!(matches!(
            host("connect api.openai.com:443 HTTP/1.1\r\n"),
            Line::Host { .. }
        ));
        assert_eq!(host("CONNECT 10.0.0.1:443 HTTP/1.1"), Line::IpLiteral(443));
        assert_eq!(
            host("CONNECT [2001:db8::1]:443 HTTP/1.1"),
            Line::IpLiteral(443)
        );
        assert_eq!(host("CONNECT api.openai.com:4"), Line::Split);
        assert_eq!(host("CONN"), Line::Split);
        assert_eq!(host("CONNECT http://x:443 HTTP/1.1"), Line::Malformed);
        assert_eq!(host("CONNECT a..b:443 HTTP/1.1"), Line::Malformed);
        assert_eq!(host("CONNECT x:65536 HTTP/1.1"), Line::Malformed);
        assert_eq!(host("GET http://x/ HTTP/1.1"), Line::Plain);
        assert_eq!(host("GET / HTTP/1.1"), Line::Other);
        let long = format!("CONNECT {}:443 HTTP/1.1", "a".repeat(64 * 1024));
        assert_eq!(host(&long), Line::Malformed);
    }

    #[test]
    fn the_corpus_never_panics_and_names_are_bytes_of_the_input() {
        for (what, payload) in wire::corpus() {
            if let Line::Host { host, labels, port } = parse(&payload) {
                assert!((1..=253).contains(&host.len()), "{what}");
                assert!(payload.windows(host.len()).any(|w| w == host), "{what}");
                assert!((1..=DNS_MAX_LABELS).contains(&labels.len()), "{what}");
                assert!(port > 0, "{what}");
            }
        }
    }
}
