//! `llm-egress check FILE`: a valid policy passes, a bad one fails with the
//! line, column, key and value of the error. Needs the built agent binary
//! (see `llm_egress_tests::agent_bin`) and root (for the test cgroup the
//! policy names).

use std::process::{Command, Output};

use llm_egress_tests::{CgroupGuard, TempDir, agent_bin, require_root, toml_str};

fn check(policy: &str) -> (Output, String) {
    let bin = agent_bin();
    assert!(
        bin.is_file(),
        "agent binary {} not found: `cargo build -p llm-egress` or set LLM_EGRESS_BIN",
        bin.display()
    );
    let dir = TempDir::new("llm-egress-test-cli");
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, policy).expect("write the policy file");
    let out = Command::new(&bin)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} check: {e}", bin.display()));
    let text = format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Whether `s` contains `:LINE:COL` with COL a number.
fn has_line_col(s: &str, line: u32) -> bool {
    let needle = format!(":{line}:");
    s.match_indices(&needle).any(|(i, m)| {
        s[i + m.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

#[test]
fn check_accepts_a_valid_policy() {
    require_root();
    let cg = CgroupGuard::new("cli-valid");
    let policy = format!(
        r#"mode = "enforce"
cgroup = {}
failure_mode = "closed"

[defaults]
llm = "deny"
other = "allow"

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "test-llm"
hosts = ["llm.internal.example", "*.inference.internal.example"]
cidrs = ["10.20.0.0/16", "2001:db8::/64"]
ports = [443, 8443]

[[workloads]]
name = "bot"
cgroup = "pods/*"
allow = ["test-llm", "192.0.2.0/24"]
deny = ["198.51.100.0/24"]
llm = "audit"
other = "deny"

[[workloads]]
name = "svc"
systemd_unit = "x.service"
"#,
        toml_str(&cg.path().display().to_string())
    );
    let (out, text) = check(&policy);
    assert!(
        out.status.success(),
        "`llm-egress check` should accept this policy:\n{policy}\n{text}"
    );
}

#[test]
fn check_rejects_a_bad_value_naming_line_column_key_and_value() {
    // Line 5, column 9 is the value.
    let policy = "mode = \"enforce\"\n\n[defaults]\nllm = \"deny\"\nother = \"sometimes\"\n";
    let (out, text) = check(policy);
    assert!(
        !out.status.success(),
        "`llm-egress check` must fail on other = \"sometimes\":\n{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        has_line_col(&stderr, 5),
        "stderr should give the position as line:col (5:…):\n{text}"
    );
    assert!(
        stderr.contains("other"),
        "stderr should name the key `other` (defaults.other):\n{text}"
    );
    assert!(
        stderr.contains("sometimes"),
        "stderr should quote the bad value \"sometimes\":\n{text}"
    );
}

#[test]
fn check_rejects_an_unknown_key_naming_line_and_key() {
    let policy = "mode = \"enforce\"\ncolour = \"blue\"\n";
    let (out, text) = check(policy);
    assert!(
        !out.status.success(),
        "`llm-egress check` must fail on the unknown key `colour`:\n{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        has_line_col(&stderr, 2),
        "stderr should give the position as line:col (2:…):\n{text}"
    );
    assert!(
        stderr.contains("colour"),
        "stderr should name the unknown key `colour`:\n{text}"
    );
}

#[test]
fn check_rejects_an_unknown_key_in_a_workload() {
    // A misspelt key in a table must not be ignored: `alow` would silently
    // allow nothing.
    let policy = "[[workloads]]\nname = \"w\"\ncgroup = \"w\"\nalow = [\"openai\"]\n";
    let (out, text) = check(policy);
    assert!(
        !out.status.success(),
        "`llm-egress check` must fail on the unknown key `alow` of a workload:\n{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        has_line_col(&stderr, 4) && stderr.contains("alow"),
        "stderr should name the unknown key `alow` at line 4 (4:…):\n{text}"
    );
}

/// The first ```toml block of `markdown`.
fn first_toml_block(markdown: &str) -> Option<String> {
    let start = markdown.find("```toml\n")? + "```toml\n".len();
    let len = markdown[start..].find("\n```")?;
    Some(markdown[start..start + len + 1].to_string())
}

#[test]
fn check_rejects_bad_limits_naming_each_key() {
    // Zero, negative, too small, overflowing and misspelt: every one is
    // reported, each with its line and full key path (docs/limits.md).
    let policy = "[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\nallow = [\"openai\"]\n\
[workloads.limits]\nconnections_per_second = 0\nbytes_per_second = 1000\nbytes_burst = 10\n\
tokens_per_minute = -5\n";
    let (out, text) = check(policy);
    assert!(
        !out.status.success(),
        "bad limits must fail `check`:\n{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (line, key) in [
        (6, "workloads[0].limits.connections_per_second = 0"),
        (8, "workloads[0].limits.bytes_burst = 10"),
        (9, "workloads[0].limits.tokens_per_minute = -5"),
    ] {
        assert!(
            has_line_col(&stderr, line) && stderr.contains(key),
            "stderr should report `{key}` at line {line}:\n{text}"
        );
    }
    // A number past i64 cannot even be read: a TOML error at its line.
    let (out, text) = check(
        "[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\n[workloads.limits]\ntokens_per_day = 99999999999999999999\n",
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        has_line_col(&String::from_utf8_lossy(&out.stderr), 5),
        "{text}"
    );
    let (out, text) = check(
        "[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\n[workloads.limits.providers.opnai]\nburst = 3\n",
    );
    assert!(!out.status.success(), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("workloads[0].limits.providers.opnai") && stderr.contains("\"openai\""),
        "an unknown provider is named, with the nearest one:\n{text}"
    );
}

#[test]
fn check_accepts_the_readme_example_policy() {
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let text =
        std::fs::read_to_string(readme).unwrap_or_else(|e| panic!("cannot read {readme}: {e}"));
    let policy = first_toml_block(&text)
        .unwrap_or_else(|| panic!("{readme} has no ```toml block (the example policy)"));
    let (out, report) = check(&policy);
    assert!(
        out.status.success(),
        "the README's example policy must pass `llm-egress check`:\n{policy}\n{report}"
    );
}

#[test]
fn toml_block_extraction() {
    let md = "intro\n```sh\nls\n```\n```toml\na = 1\nb = 2\n```\n```toml\nc = 3\n```\n";
    assert_eq!(first_toml_block(md).as_deref(), Some("a = 1\nb = 2\n"));
    assert_eq!(first_toml_block("no code"), None);
}

#[test]
fn line_col_matcher() {
    assert!(has_line_col("policy.toml:5:9: defaults.other", 5));
    assert!(!has_line_col("policy.toml:5: defaults.other", 5));
    assert!(!has_line_col("policy.toml:15:9", 5));
}
