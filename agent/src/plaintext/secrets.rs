//! Secrets in request bodies: which credentials are looked for, and a
//! scanner that finds them in a body that arrives in pieces, with bounded
//! memory (docs/exact-tokens.md, "Secrets").
//!
//! A finding carries the kind (`openai_key`, `aws_access_key`, a policy
//! pattern's name…), where in the body it starts and a fingerprint (the
//! first 16 hex digits of the SHA-256 of the matched text); never the text.
//! Only bodies are scanned: the request's own credential travels in a header
//! (`Authorization`, `x-api-key`, Gemini's `?key=`) and is not a leak. What
//! happens on a finding (audit record, metric, stopping the connection) is
//! the caller's decision; this module only finds.

use std::collections::HashSet;

use regex::bytes::Regex;

/// Bytes scanned at once.
const WINDOW: usize = 16 * 1024;
/// Bytes kept from one window to the next, so a secret cut between two
/// pieces is still found whole: the longest built-in match is shorter.
pub const OVERLAP: usize = 1024;
/// Findings kept per body (more are counted, not reported: one secret
/// repeated a thousand times is one leak).
const MAX_FINDINGS: usize = 32;

/// The built-in kinds, their patterns (the capture group, if any, is what
/// is fingerprinted) and what they find.
pub const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "anthropic_key",
        r"\bsk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{32,}",
        "Anthropic API and admin keys",
    ),
    (
        "openai_key",
        r"\bsk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}|\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}",
        "OpenAI keys (legacy sk-…T3BlbkFJ…, sk-proj-, sk-svcacct-, sk-admin-)",
    ),
    (
        "google_api_key",
        r"\bAIza[0-9A-Za-z_-]{35}",
        "Google API keys (Gemini, Maps…)",
    ),
    (
        "aws_access_key",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        "AWS access key ids",
    ),
    (
        "github_token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
        "GitHub tokens (classic, OAuth, app, fine-grained)",
    ),
    (
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:\\[rn]|\s)+([A-Za-z0-9+/]{32})",
        "PEM private keys (RSA, EC, OPENSSH, PKCS#8…), raw or JSON-escaped",
    ),
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}",
        "JSON Web Tokens (signed)",
    ),
];

/// Longest source of a policy pattern, and the compiled size allowed.
pub const MAX_PATTERN_LEN: usize = 512;
const MAX_COMPILED: usize = 1 << 20;

/// A compiled rule.
#[derive(Clone, Debug)]
struct Rule {
    kind: String,
    regex: Regex,
}

/// The rules of a policy: the built-in ones and the policy's patterns.
#[derive(Clone, Debug)]
pub struct SecretRules {
    rules: Vec<Rule>,
}

/// Why a policy pattern is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("longer than {MAX_PATTERN_LEN} characters")]
    TooLong,
    #[error("matches the empty string: every body would be a finding")]
    MatchesEmpty,
    #[error("not a regular expression the agent accepts: {0}")]
    Invalid(String),
}

/// Compiles a policy pattern (the `regex` crate's syntax; at most
/// `MAX_PATTERN_LEN` characters and 1 MiB compiled; never empty matches).
pub fn compile(pattern: &str) -> Result<Regex, PatternError> {
    if pattern.chars().count() > MAX_PATTERN_LEN {
        return Err(PatternError::TooLong);
    }
    let regex = regex::bytes::RegexBuilder::new(pattern)
        .size_limit(MAX_COMPILED)
        .build()
        .map_err(|e| {
            PatternError::Invalid(e.to_string().lines().last().unwrap_or("").trim().to_owned())
        })?;
    if regex.is_match(b"") {
        return Err(PatternError::MatchesEmpty);
    }
    Ok(regex)
}

impl SecretRules {
    /// The built-in rules and `custom` (kind, compiled pattern), in that order.
    pub fn new(custom: &[(String, Regex)]) -> Self {
        let mut rules: Vec<Rule> = BUILTIN
            .iter()
            .filter_map(|(kind, pattern, _)| {
                // The built-in patterns compile (tested below).
                Some(Rule {
                    kind: (*kind).to_owned(),
                    regex: compile(pattern).ok()?,
                })
            })
            .collect();
        rules.extend(custom.iter().map(|(kind, regex)| Rule {
            kind: kind.clone(),
            regex: regex.clone(),
        }));
        Self { rules }
    }
}

/// One secret found: never the secret itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: String,
    /// First 16 hex digits of the SHA-256 of the matched text (the capture
    /// group of patterns that have one).
    pub fingerprint: String,
    /// Offset of the match in the (decoded) body.
    pub offset: u64,
}

/// The scanner of one body.
///
/// Each `feed` scans what it brought (with the `OVERLAP` bytes before it,
/// for secrets cut between two pieces) and reports the matches that end
/// before the last byte seen (one that touches it may still grow), so a
/// secret is reported as soon as the piece after it arrives, well before
/// the body's end. The window is scanned whole once more when it is full,
/// and the end of the body settles what touched the last byte.
#[derive(Debug)]
pub struct SecretScan {
    window: Vec<u8>,
    /// Body offset of `window[0]`.
    base: u64,
    /// Matches starting before this body offset are settled.
    handled: u64,
    /// Where the next eager scan starts (body offset).
    eager_from: u64,
    /// Starts of matches already reported or suppressed, at or after `base`.
    recent: Vec<u64>,
    seen: HashSet<(String, String)>,
    /// Findings not yet taken by the caller.
    pub found: Vec<Finding>,
    /// Findings beyond `MAX_FINDINGS` or repeated, not reported.
    pub suppressed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// After each piece: the new bytes (and OVERLAP before them); matches
    /// touching the last byte wait.
    Eager,
    /// The window is full: all of it but its last OVERLAP bytes is settled.
    Full,
    /// The body ended: everything is settled.
    Last,
}

impl Default for SecretScan {
    fn default() -> Self {
        Self::new()
    }
}

impl SecretScan {
    pub fn new() -> Self {
        Self {
            window: Vec::new(),
            base: 0,
            handled: 0,
            eager_from: 0,
            recent: Vec::new(),
            seen: HashSet::new(),
            found: Vec::new(),
            suppressed: 0,
        }
    }

    /// Scans the next bytes of the body.
    pub fn feed(&mut self, rules: &SecretRules, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (WINDOW - self.window.len()).min(data.len());
            self.window.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.window.len() == WINDOW {
                self.scan(rules, Mode::Full);
                let keep_from = WINDOW - OVERLAP;
                self.window.drain(..keep_from);
                self.base += keep_from as u64;
                let base = self.base;
                self.recent.retain(|&s| s >= base);
            }
        }
        self.scan(rules, Mode::Eager);
    }

    /// The body ended: scans what is left.
    pub fn finish(&mut self, rules: &SecretRules) {
        self.scan(rules, Mode::Last);
        self.window = Vec::new();
        self.recent = Vec::new();
    }

    fn scan(&mut self, rules: &SecretRules, mode: Mode) {
        let len = self.window.len();
        let from_abs = match mode {
            Mode::Eager => self.eager_from.max(self.handled),
            Mode::Full | Mode::Last => self.handled,
        };
        let from = from_abs.saturating_sub(self.base) as usize;
        // Full: matches starting in the last OVERLAP bytes wait for the
        // next window, which starts with those bytes.
        let limit = if mode == Mode::Full {
            len - OVERLAP
        } else {
            len
        };
        for rule in &rules.rules {
            let mut pos = from;
            while pos < limit {
                let Some(caps) = rule.regex.captures_at(&self.window, pos) else {
                    break;
                };
                let Some(whole) = caps.get(0) else { break };
                pos = whole.end().max(whole.start() + 1);
                if whole.start() >= limit {
                    break;
                }
                if mode == Mode::Eager && whole.end() == len {
                    continue;
                }
                let start = self.base + whole.start() as u64;
                if self.recent.contains(&start) {
                    continue;
                }
                self.recent.push(start);
                let text = caps.get(1).unwrap_or(whole).as_bytes();
                let fingerprint = fingerprint(text);
                if self.seen.len() >= MAX_FINDINGS
                    || !self.seen.insert((rule.kind.clone(), fingerprint.clone()))
                {
                    self.suppressed += 1;
                    continue;
                }
                self.found.push(Finding {
                    kind: rule.kind.clone(),
                    fingerprint,
                    offset: start,
                });
            }
        }
        match mode {
            Mode::Eager => self.eager_from = self.base + len.saturating_sub(OVERLAP) as u64,
            Mode::Full => self.handled = self.base + limit as u64,
            Mode::Last => self.handled = self.base + len as u64,
        }
    }
}

/// First 16 hex digits of the SHA-256 of `text`.
pub fn fingerprint(text: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test secrets: made-up values of each kind's shape.
    pub fn samples() -> Vec<(&'static str, String)> {
        vec![
            ("anthropic_key", format!("sk-ant-api03-{}", "a1B2c3D4e5".repeat(9))),
            ("openai_key", format!("sk-proj-{}", "Zx9_Yw8-Vu7".repeat(8))),
            ("openai_key", format!("sk-{}T3BlbkFJ{}", "A".repeat(20), "b".repeat(20))),
            ("google_api_key", format!("AIza{}", "SyD-4bC9xYz_0123456789abcdefghijklm")),
            ("aws_access_key", "AKIAIOSFODNN7EXAMPLE".to_owned()),
            ("github_token", format!("ghp_{}", "a".repeat(36))),
            (
                "private_key",
                format!(
                    "-----BEGIN RSA PRIVATE KEY-----\\nMIIEpAIBAAKCAQEA{}\\n",
                    "x1".repeat(40)
                ),
            ),
            (
                "jwt",
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
                    .to_owned(),
            ),
        ]
    }

    fn scan(rules: &SecretRules, body: &[u8], piece: usize) -> (Vec<Finding>, u64) {
        let mut s = SecretScan::new();
        for p in body.chunks(piece.max(1)) {
            s.feed(rules, p);
        }
        s.finish(rules);
        (s.found, s.suppressed)
    }

    #[test]
    fn builtin_patterns_compile() {
        for (kind, pattern, _) in BUILTIN {
            assert!(compile(pattern).is_ok(), "{kind}");
        }
        assert_eq!(SecretRules::new(&[]).rules.len(), BUILTIN.len());
    }

    #[test]
    fn every_kind_is_found_and_never_kept() {
        let rules = SecretRules::new(&[]);
        for (kind, secret) in samples() {
            let body = format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"here: {secret} ok"}}]}}"#
            );
            let (found, _) = scan(&rules, body.as_bytes(), 4096);
            assert_eq!(found.len(), 1, "{kind}: {found:?}");
            assert_eq!(found[0].kind, kind);
            assert_eq!(
                found[0].offset as usize,
                body.find(&secret[..10]).unwrap_or(0)
            );
            assert_eq!(found[0].fingerprint.len(), 16);
            assert!(!secret.contains(&found[0].fingerprint));
            assert!(!format!("{found:?}").contains(&secret[4..20]));
        }
    }

    #[test]
    fn no_false_positives_on_ordinary_text() {
        let rules = SecretRules::new(&[]);
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"ask about sk-learn, AIza, AKIA, ghp_ and eyJ tokens; -----BEGIN PUBLIC KEY-----\nMIIB"}]}"#;
        assert_eq!(scan(&rules, body, 7).0, vec![]);
    }

    #[test]
    fn found_across_pieces_and_windows_once() {
        let rules =
            SecretRules::new(&[("internal".to_owned(), compile(r"\bINT-[0-9]{8}\b").unwrap())]);
        let key = "AKIAIOSFODNN7EXAMPLE";
        // One secret on each side of every window boundary region, and one
        // straddling the first boundary.
        let mut body = "x".repeat(WINDOW - 11);
        body.push(' ');
        body.push_str(key);
        body.push(' ');
        body.push_str(&"y".repeat(WINDOW));
        body.push_str(" INT-12345678 ");
        body.push_str(key); // the same key again: suppressed
        for piece in [1, 3, 1000, WINDOW, 100_000] {
            let (found, suppressed) = scan(&rules, body.as_bytes(), piece);
            let kinds: Vec<(&str, u64)> =
                found.iter().map(|f| (f.kind.as_str(), f.offset)).collect();
            assert_eq!(
                kinds,
                vec![
                    ("aws_access_key", (WINDOW - 10) as u64),
                    ("internal", (2 * WINDOW + 12) as u64)
                ],
                "pieces of {piece}"
            );
            assert_eq!(suppressed, 1);
        }
    }

    #[test]
    fn policy_patterns_are_checked() {
        assert_eq!(compile("").err(), Some(PatternError::MatchesEmpty));
        assert_eq!(compile("a*").err(), Some(PatternError::MatchesEmpty));
        assert!(matches!(
            compile("(unclosed"),
            Err(PatternError::Invalid(_))
        ));
        assert_eq!(compile(&"a".repeat(600)).err(), Some(PatternError::TooLong));
        assert!(matches!(
            compile("a{1000}{1000}"),
            Err(PatternError::Invalid(_))
        ));
    }

    #[test]
    fn findings_are_bounded() {
        let rules = SecretRules::new(&[]);
        let body: String = (0..100)
            .map(|i| format!(" AKIAIOSFODNN7EXA{i:04} "))
            .collect::<Vec<_>>()
            .join("");
        let (found, suppressed) = scan(&rules, body.as_bytes(), 50);
        assert_eq!(
            (found.len(), suppressed),
            (MAX_FINDINGS, 100 - MAX_FINDINGS as u64)
        );
    }
}
