//! Reading the Prometheus text exposition format (what /metrics serves):
//! the one parser of it, used by `llm-egress status` and by the tests.

use std::fmt;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The first line that is neither a comment, blank, nor a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub text: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} is not a sample: {}", self.line, self.text)
    }
}

impl std::error::Error for ParseError {}

/// Every sample of a text exposition.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_sample(line).ok_or_else(|| ParseError {
            line: i + 1,
            text: line.to_string(),
        })?);
    }
    Ok(out)
}

/// The sum of the samples named `name` whose labels include every pair of
/// `labels` (other labels may differ: `[("verdict","deny")]` adds up all
/// workloads and providers); `None` when no sample matches.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let metric_name = |n: &str| {
        n.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        })
    };
    if name.is_empty() || !metric_name(name) {
        return None;
    }
    let mut labels = Vec::new();
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches([' ', ',']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = s.split_once('=')?;
            let after = after.trim_start().strip_prefix('"')?;
            let mut chars = after.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_string(), value));
            s = &after[end + 1..];
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP llm_egress_connections_total Connections by verdict.
# TYPE llm_egress_connections_total counter
llm_egress_connections_total{workload="a",provider="none",verdict="deny"} 3
llm_egress_connections_total{workload="b",provider="test-llm",verdict="deny"} 2
llm_egress_connections_total{workload="a",provider="none",verdict="allow"} 7 1700000000000
llm_egress_policy_generation 4
odd{msg="say \"hi\"\n",x="a,b}c",} +Inf
"#;

    #[test]
    fn parses_samples_and_labels() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "llm_egress_connections_total");
        assert_eq!(s[0].label("verdict"), Some("deny"));
        assert_eq!(
            s[3],
            Sample {
                name: "llm_egress_policy_generation".into(),
                labels: vec![],
                value: 4.0
            }
        );
        assert_eq!(s[4].label("msg"), Some("say \"hi\"\n"));
        assert_eq!(s[4].label("x"), Some("a,b}c"));
        assert_eq!(s[4].value, f64::INFINITY);
    }

    #[test]
    fn sum_adds_the_matching_samples() {
        let s = parse(TEXT).unwrap();
        let name = "llm_egress_connections_total";
        assert_eq!(sum(&s, name, &[("verdict", "deny")]), Some(5.0));
        assert_eq!(
            sum(&s, name, &[("workload", "a"), ("verdict", "deny")]),
            Some(3.0)
        );
        assert_eq!(sum(&s, name, &[("workload", "a")]), Some(10.0));
        assert_eq!(sum(&s, name, &[("workload", "zzz")]), None);
        assert_eq!(sum(&s, "llm_egress_policy_generation", &[]), Some(4.0));
        assert_eq!(sum(&s, "missing", &[]), None);
    }

    #[test]
    fn a_line_that_is_not_a_sample_is_named() {
        assert_eq!(
            parse("ok 1\nbroken{x=\"1\" 2\n"),
            Err(ParseError {
                line: 2,
                text: "broken{x=\"1\" 2".into()
            })
        );
        let s = parse("b 2 123\nd{} NaN\n").unwrap();
        assert_eq!((s[0].name.as_str(), s[0].value), ("b", 2.0));
        assert!(s[1].labels.is_empty() && s[1].value.is_nan());
        for bad in ["name", "name{x=1} 2", "name{x=\"1\"} two", "{x=\"1\"} 2"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
