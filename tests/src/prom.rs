//! Reading the Prometheus text exposition format (what /metrics serves).

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

/// Every sample of `text`; comments, blank lines and lines that do not
/// parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The sum of the samples named `name` whose labels include every pair of
/// `labels` (other labels may differ: `[("verdict","deny")]` adds up all
/// workloads and providers); `None` when no sample matches.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = parse(text)
        .into_iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
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
        let s = parse(TEXT);
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
    fn value_sums_matching_samples() {
        let name = "llm_egress_connections_total";
        assert_eq!(value(TEXT, name, &[("verdict", "deny")]), Some(5.0));
        assert_eq!(
            value(TEXT, name, &[("workload", "a"), ("verdict", "deny")]),
            Some(3.0)
        );
        assert_eq!(value(TEXT, name, &[("workload", "a")]), Some(10.0));
        assert_eq!(value(TEXT, name, &[("workload", "zzz")]), None);
        assert_eq!(value(TEXT, "llm_egress_policy_generation", &[]), Some(4.0));
        assert_eq!(value(TEXT, "missing", &[]), None);
    }
}
