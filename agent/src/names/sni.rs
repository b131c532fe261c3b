//! A userspace reader of TLS ClientHellos that follows the rules of the
//! kernel's (`names_sni_egress`, ebpf/src/sni.rs) step for step, so that
//! both can be run over the same inputs: by the fuzz target `client_hello`
//! (fuzz/) and by the unit tests below. The verdicts are the kernel's; the
//! agent itself does not call this on traffic.
//!
//! The input is a TCP connection's first payload. Only its first
//! `SNI_BUF` bytes are read (the kernel's copy). The rules:
//!
//! 1. A TLS record header (type 22, major version 3) and handshake type 1,
//!    else [`Hello::NotTls`].
//! 2. Version, random, session id, cipher suites and compression methods
//!    are skipped; bytes that end before them: [`Hello::Split`]. No room
//!    for an extension list inside the handshake's length:
//!    [`Hello::NoSni`]; a list longer than the handshake:
//!    [`Hello::Malformed`].
//! 3. At most `SNI_MAX_EXTENSIONS` extensions are walked: an extension
//!    past the list's end is malformed; one whose header is past the bytes
//!    read is a split; the first `server_name` is kept; any
//!    `encrypted_client_hello` gives [`Hello::Ech`] (before any other
//!    outcome). Without a server name: malformed (a bad extension, or more
//!    extensions than are walked), split, or no SNI.
//! 4. The server_name data: list length (2), type 0 (host_name), name
//!    length (2), name of 1 to 253 bytes inside the extension (else
//!    malformed) and inside the bytes read (else split). Its labels: no
//!    empty label except after one trailing dot, at most
//!    `DNS_MAX_LABELS` (else malformed).
//!
//! Pure: no I/O, never panics, never reads past the input. Bytes past the
//! input read as 0 here, where the kernel reads whatever its scratch held:
//! a ClientHello cut inside the server_name header may be a split here
//! and malformed there (both keep the address verdict).

use llm_egress_common::{DNS_MAX_LABELS, SNI_BUF, SNI_MAX_EXTENSIONS};

const TLS_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ECH: u16 = 0xfe0d;
/// Longest DNS name in text form.
const MAX_NAME: usize = 253;

/// What a first payload is, by the kernel's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming a server: the name as sent, and its labels in
    /// lower case (for `dns::match_name`).
    Name { name: Vec<u8>, labels: Vec<Vec<u8>> },
    /// Not a TLS ClientHello (`SNI_NOT_TLS` on provider connections).
    NotTls,
    /// A ClientHello without a server name (`SNI_NO_SNI`).
    NoSni,
    /// Encrypted ClientHello (`SNI_ECH`).
    Ech,
    /// The bytes end before the server name (`SNI_SPLIT`).
    Split,
    /// Bad lengths, too many extensions or labels, a bad name
    /// (`SNI_MALFORMED`).
    Malformed,
}

/// Reads a first payload; see the module comment.
pub fn parse(payload: &[u8]) -> Hello {
    let b = &payload[..payload.len().min(SNI_BUF)];
    let avail = b.len();
    let byte = |i: usize| b.get(i).copied().unwrap_or(0);
    let u16_at = |i: usize| u16::from(byte(i)) << 8 | u16::from(byte(i + 1));
    if avail < 6 || byte(0) != TLS_HANDSHAKE || byte(1) != 3 || byte(5) != CLIENT_HELLO {
        return Hello::NotTls;
    }
    let hello_end = 9 + ((byte(6) as usize) << 16 | u16_at(7) as usize);
    let mut pos = 43;
    if pos + 1 > avail {
        return Hello::Split;
    }
    pos += 1 + byte(pos) as usize;
    if pos + 2 > avail {
        return Hello::Split;
    }
    pos += 2 + u16_at(pos) as usize;
    if pos + 1 > avail {
        return Hello::Split;
    }
    pos += 1 + byte(pos) as usize;
    if pos + 2 > hello_end {
        return Hello::NoSni;
    }
    if pos + 2 > avail {
        return Hello::Split;
    }
    let end = pos + 2 + u16_at(pos) as usize;
    if end > hello_end {
        return Hello::Malformed;
    }
    pos += 2;

    // Extensions.
    let (mut sni, mut sni_len, mut ech, mut split, mut err) = (0usize, 0usize, false, false, false);
    for _ in 0..SNI_MAX_EXTENSIONS {
        if pos >= end {
            break;
        }
        if pos + 4 > avail {
            split = true;
            break;
        }
        let t = u16_at(pos);
        let len = u16_at(pos + 2) as usize;
        let next = pos + 4 + len;
        if next > end {
            err = true;
            break;
        }
        if t == EXT_SERVER_NAME && sni == 0 {
            sni = pos + 4;
            sni_len = len;
        } else if t == EXT_ECH {
            ech = true;
        }
        pos = next;
    }
    if ech {
        return Hello::Ech;
    }
    if sni == 0 {
        return if err || pos < end && !split {
            Hello::Malformed
        } else if split {
            Hello::Split
        } else {
            Hello::NoSni
        };
    }

    // server_name.
    if sni_len < 5 || byte(sni + 2) != 0 {
        return Hello::Malformed;
    }
    let name_len = u16_at(sni + 3) as usize;
    let at = sni + 5;
    if name_len == 0 || name_len > MAX_NAME || at + name_len > sni + sni_len {
        return Hello::Malformed;
    }
    if at + name_len > avail {
        return Hello::Split;
    }
    let name = &b[at..at + name_len];
    match labels(name) {
        Some(labels) => Hello::Name {
            name: name.to_vec(),
            labels,
        },
        None => Hello::Malformed,
    }
}

/// Lower-case labels of a server name, as the kernel's `name_step` cuts
/// them: one trailing dot allowed, no other empty label, at most
/// `DNS_MAX_LABELS`.
fn labels(name: &[u8]) -> Option<Vec<Vec<u8>>> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let mut out = Vec::new();
    for l in name.split(|&c| c == b'.') {
        if l.is_empty() || out.len() >= DNS_MAX_LABELS {
            return None;
        }
        out.push(l.to_ascii_lowercase());
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod wire {
    //! ClientHellos written by hand, for tests.

    /// A ClientHello record with `exts` (type, data) as extensions.
    pub fn client_hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&(d.len() as u16).to_be_bytes());
            e.extend_from_slice(d);
        }
        body.extend_from_slice(&(e.len() as u16).to_be_bytes());
        body.extend_from_slice(&e);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    /// Truncated, oversized, zero-length and lying ClientHellos, and the
    /// good ones they come from: (what, first payload).
    pub fn corpus() -> Vec<(String, Vec<u8>)> {
        let good = client_hello(&[(10, vec![0, 2, 0, 29]), (0, server_name(b"api.prov.test"))]);
        let mut corpus: Vec<(String, Vec<u8>)> = vec![
            ("provider name".into(), good.clone()),
            (
                "provider name, other case, trailing dot".into(),
                client_hello(&[(0, server_name(b"API.Prov.Test."))]),
            ),
            (
                "wildcard".into(),
                client_hello(&[(0, server_name(b"x.y.wild.test"))]),
            ),
            (
                "other name".into(),
                client_hello(&[(0, server_name(b"other.test"))]),
            ),
            (
                "no server name".into(),
                client_hello(&[(10, vec![0, 2, 0, 29])]),
            ),
            (
                "ECH".into(),
                client_hello(&[(0, server_name(b"api.prov.test")), (0xfe0d, vec![1, 2, 3])]),
            ),
            (
                "HTTP".into(),
                b"GET / HTTP/1.1\r\nHost: api.prov.test\r\n\r\n".to_vec(),
            ),
            ("one byte".into(), vec![22]),
            ("record header only".into(), vec![22, 3, 1, 0, 0]),
            ("100 KiB of 0xff".into(), vec![0xff; 100 * 1024]),
            (
                "100 KiB of zeros after a header".into(),
                [
                    vec![22, 3, 1, 0xff, 0xff, 1, 0xff, 0xff, 0xff],
                    vec![0; 100 * 1024],
                ]
                .concat(),
            ),
        ];
        for n in 0..good.len() {
            corpus.push((format!("truncated to {n}"), good[..n].to_vec()));
        }
        for i in 5..good.len() {
            for v in [0x00, 0xff] {
                let mut m = good.clone();
                m[i] = v;
                corpus.push((format!("byte {i} = {v:#x}"), m));
            }
        }
        corpus
    }

    /// The data of a server_name extension for `name`.
    pub fn server_name(name: &[u8]) -> Vec<u8> {
        let mut d = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        d.push(0);
        d.extend_from_slice(&(name.len() as u16).to_be_bytes());
        d.extend_from_slice(name);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::{wire::*, *};

    fn name_of(h: &Hello) -> Option<&[u8]> {
        match h {
            Hello::Name { name, .. } => Some(name),
            _ => None,
        }
    }

    #[test]
    fn reads_the_server_name_after_other_extensions() {
        let h = client_hello(&[
            (10, vec![0, 2, 0, 29]),
            (0, server_name(b"API.OpenAI.com.")),
        ]);
        let got = parse(&h);
        assert_eq!(name_of(&got), Some(&b"API.OpenAI.com."[..]));
        let Hello::Name { labels, .. } = got else {
            unreachable!()
        };
        assert_eq!(
            labels,
            vec![b"api".to_vec(), b"openai".to_vec(), b"com".to_vec()]
        );
    }

    #[test]
    fn ech_no_sni_not_tls_and_split() {
        assert_eq!(
            parse(&client_hello(&[
                (0, server_name(b"a.test")),
                (0xfe0d, vec![1, 2])
            ])),
            Hello::Ech
        );
        assert_eq!(
            parse(&client_hello(&[(10, vec![0, 2, 0, 29])])),
            Hello::NoSni
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b""), Hello::NotTls);
        let h = client_hello(&[(10, vec![0; 64]), (0, server_name(b"api.example.test"))]);
        // Cut inside the name, inside an extension header, in the fixed part.
        assert_eq!(parse(&h[..h.len() - 3]), Hello::Split);
        assert_eq!(parse(&h[..h.len() - 22]), Hello::Split);
        assert_eq!(parse(&h[..30]), Hello::Split);
    }

    #[test]
    fn bad_names_and_lengths_are_malformed() {
        for bad in [&b"a..b"[..], b".a", b".", b"a.b..", &[b'a'; 254]] {
            assert_eq!(
                parse(&client_hello(&[(0, server_name(bad))])),
                Hello::Malformed,
                "{bad:?}"
            );
        }
        let many = vec!["a"; 17].join(".").into_bytes();
        assert_eq!(
            parse(&client_hello(&[(0, server_name(&many))])),
            Hello::Malformed
        );
        let sixteen = vec!["a"; 16].join(".").into_bytes();
        assert!(name_of(&parse(&client_hello(&[(0, server_name(&sixteen))]))).is_some());
        // host_name type other than 0.
        let mut d = server_name(b"a.test");
        d[2] = 1;
        assert_eq!(parse(&client_hello(&[(0, d)])), Hello::Malformed);
        // An extension longer than the list.
        let mut h = client_hello(&[(0, server_name(b"a.test"))]);
        let n = h.len();
        h[n - 13] = 0xff; // the extension's length, high byte
        assert_eq!(parse(&h), Hello::Malformed);
        // More extensions than the walk reads before the server name.
        let mut exts: Vec<(u16, Vec<u8>)> = (0..SNI_MAX_EXTENSIONS as u16)
            .map(|i| (100 + i, vec![]))
            .collect();
        exts.push((0, server_name(b"a.test")));
        assert_eq!(parse(&client_hello(&exts)), Hello::Malformed);
    }

    /// Truncated, oversized, zero-length and lying ClientHellos: never a
    /// panic; a name only when the bytes carry it whole.
    #[test]
    fn malformed_corpus_never_panics() {
        let corpus = corpus();
        assert!(
            corpus
                .iter()
                .any(|(w, m)| w == "truncated to 0" && m.is_empty())
        );
        for (what, m) in &corpus {
            let got = std::panic::catch_unwind(|| parse(m))
                .unwrap_or_else(|_| panic!("{what}: the parser panicked"));
            if let Hello::Name { name, labels } = &got {
                assert!(
                    !labels.is_empty() && labels.len() <= DNS_MAX_LABELS && name.len() <= MAX_NAME,
                    "{what}: {got:?}"
                );
            }
            if what.starts_with("truncated") {
                assert!(
                    !matches!(got, Hello::Name { .. }),
                    "{what}: a name from a truncated hello: {got:?}"
                );
            }
        }
    }

    #[test]
    fn only_the_first_sni_buf_bytes_are_read() {
        let h = client_hello(&[(21, vec![0; SNI_BUF]), (0, server_name(b"late.test"))]);
        assert_eq!(parse(&h), Hello::Split);
        let h = client_hello(&[(0, server_name(b"early.test")), (21, vec![0; SNI_BUF])]);
        assert_eq!(name_of(&parse(&h)), Some(&b"early.test"[..]));
    }
}
