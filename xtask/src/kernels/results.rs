//! What a guest reported: parsing its console (the `@@LLME ` marker lines
//! that xtask/guest/init.sh prints) and the JSON of `llm-egress verify
//! --json`, and turning both into checks and tables for the host's report.
//!
//! Pure functions of text: no I/O here, so all of it is unit-tested.

use std::fmt::Write as _;

use serde_json::Value;

/// The tag every guest result line carries; kernel messages may precede it
/// on the same console line, so it is searched anywhere in the line.
pub const MARKER: &str = "@@LLME ";

/// The program sets the guest runs the agent with (policy key `programs`).
pub const SETS: &[&str] = &["all", "connect"];

/// The checks the guest reports for each program set, in order; all but
/// `start` need a running agent.
pub const SET_CHECKS: &[&str] = &[
    "start",
    "allow",
    "deny-cidr",
    "deny-other",
    "deny-nat64",
    "deny-ping",
    "allow-ping",
    "stop",
    "after-stop",
];

/// The checks the guest reports for set `all` only: the OpenSSL uprobes
/// attached to a client in an `exact_tokens` workload, its plaintext seen,
/// a memory-BIO client's `SSL*` joined to its socket, and a Go client's
/// `crypto/tls` calls seen.
pub const ALL_ONLY_CHECKS: &[&str] = &[
    "uprobe-attach",
    "plaintext",
    "plaintext-join",
    "plaintext-go",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Not run because an earlier step failed (that one is the failure).
    Skip,
    /// Not available in this agent (`verify` before it lands); not a failure.
    Missing,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
            Status::Missing => "MISSING",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// `none` (before any agent), `verify`, or a program set.
    pub set: String,
    pub name: String,
    pub status: Status,
    pub detail: String,
}

/// One row of `llm-egress verify --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyRow {
    pub program: String,
    pub loaded: bool,
    pub insns_processed: Option<u64>,
    pub insns_limit: Option<u64>,
    pub peak_states: Option<u64>,
    pub total_states: Option<u64>,
    pub max_states_per_insn: Option<u64>,
    pub verification_us: Option<u64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyTable {
    Rows(Vec<VerifyRow>),
    /// The agent has no `verify` subcommand (yet).
    Missing(String),
    /// The guest never got to run it, or its output is not the contract's.
    Broken(String),
}

/// Everything one guest printed.
#[derive(Clone, Debug, Default)]
pub struct GuestReport {
    pub begun: bool,
    pub ended: bool,
    pub kernel: Option<String>,
    /// Seconds since the kernel started, when /init began (guest clock).
    pub init_uptime: Option<f64>,
    checks: Vec<Check>,
    /// `(set, line)`: the tail of the agent's log, when something failed.
    pub logs: Vec<(String, String)>,
    verify_out: Vec<String>,
    verify_err: Vec<String>,
    verify_rc: Option<i32>,
    /// How long `verify` ran (guest clock), seconds.
    pub verify_secs: Option<f64>,
    /// `(set, seconds)` from `llm-egress run` to ready (or giving up).
    pub start_secs: Vec<(String, f64)>,
}

/// The first word and the rest.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(' ') {
        Some((w, rest)) => (w, rest),
        None => (s, ""),
    }
}

fn float(s: Option<&str>) -> Option<f64> {
    s?.parse().ok()
}

/// `start=1.5` style fields → the value of `key`.
fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl GuestReport {
    /// Parses a whole console log; lines without the marker are ignored.
    pub fn parse(console: &str) -> GuestReport {
        let mut r = GuestReport::default();
        for line in console.lines() {
            r.add_line(line);
        }
        r
    }

    /// Takes one console line (with or without `\r`).
    pub fn add_line(&mut self, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(at) = line.find(MARKER) else {
            return;
        };
        let (tag, rest) = split_word(&line[at + MARKER.len()..]);
        match tag {
            "begin" => self.begun = true,
            "end" => self.ended = true,
            "kernel" => self.kernel = Some(rest.trim().to_owned()),
            "uptime" => self.init_uptime = float(Some(rest.trim())),
            "check" => {
                let (set, rest) = split_word(rest);
                let (name, rest) = split_word(rest);
                let (status, detail) = split_word(rest);
                let status = match status {
                    "pass" => Status::Pass,
                    "skip" => Status::Skip,
                    _ => Status::Fail,
                };
                self.checks.push(Check {
                    set: set.to_owned(),
                    name: name.to_owned(),
                    status,
                    detail: detail.to_owned(),
                });
            }
            "log" => {
                let (set, text) = split_word(rest);
                self.logs.push((set.to_owned(), text.to_owned()));
            }
            "verify-out" => self.verify_out.push(rest.to_owned()),
            "verify-err" => self.verify_err.push(rest.to_owned()),
            "verify-end" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                self.verify_rc = field(&words, "rc").and_then(|v| v.parse().ok());
                if let (Some(a), Some(b)) =
                    (float(field(&words, "start")), float(field(&words, "end")))
                {
                    self.verify_secs = Some(b - a);
                }
            }
            "timing" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let [set, "start", a, b] = words[..]
                    && let (Ok(a), Ok(b)) = (a.parse::<f64>(), b.parse::<f64>())
                {
                    self.start_secs.push((set.to_owned(), b - a));
                }
            }
            _ => {}
        }
    }

    /// The verifier table, or why there is none.
    pub fn verify_table(&self) -> VerifyTable {
        let err = self.verify_err.join("\n");
        if err.contains("unrecognized subcommand") {
            return VerifyTable::Missing(
                "this llm-egress has no `verify` subcommand (unrecognized subcommand)".into(),
            );
        }
        let Some(rc) = self.verify_rc else {
            return VerifyTable::Broken("the guest did not finish `llm-egress verify`".into());
        };
        if rc == 124 || rc == 143 {
            return VerifyTable::Broken(format!(
                "`llm-egress verify --json` timed out in the guest (status {rc})"
            ));
        }
        match parse_verify_json(&self.verify_out.join("\n")) {
            Ok(rows) => VerifyTable::Rows(rows),
            Err(e) => VerifyTable::Broken(format!(
                "`llm-egress verify --json` exited {rc} without the expected JSON ({e}); stderr: {}",
                last_lines(&self.verify_err, 5).join(" | ")
            )),
        }
    }

    /// The status `verify` exited with, if it ran.
    pub fn verify_rc(&self) -> Option<i32> {
        self.verify_rc
    }

    /// Every check, with the ones the guest should have reported but did
    /// not added: `skip` after a failed start, `FAIL` when the guest never
    /// got there (timeout, panic). Plus one `verify` check from the table:
    /// every program loads within its instruction budget and, unless
    /// `emulated` (TCG, where verification runs many times slower than on
    /// hardware), within its time budget.
    pub fn checks(&self, emulated: bool) -> Vec<Check> {
        let mut out = Vec::new();
        if !self.begun {
            // Nothing ran: one failure, not one per check.
            out.push(Check {
                set: "guest".into(),
                name: "completed".into(),
                status: Status::Fail,
                detail: "the guest's /init never reported (no `@@LLME begin`)".into(),
            });
            return out;
        }
        let unfinished = if !self.ended {
            Some("the guest stopped before `@@LLME end` (timeout or crash)")
        } else {
            None
        };
        let verify = match self.verify_table() {
            VerifyTable::Rows(rows) => {
                let not_loaded: Vec<&str> = rows
                    .iter()
                    .filter(|r| !r.loaded || r.error.is_some())
                    .map(|r| r.program.as_str())
                    .collect();
                let over: Vec<&str> = rows
                    .iter()
                    .filter(|r| r.loaded && over_budget(r, emulated))
                    .map(|r| r.program.as_str())
                    .collect();
                if !not_loaded.is_empty() {
                    (
                        Status::Fail,
                        format!("not loaded: {}", not_loaded.join(", ")),
                    )
                } else if !over.is_empty() {
                    (Status::Fail, format!("over budget: {}", over.join(", ")))
                } else if rows.is_empty() {
                    (Status::Fail, "verify measured no program".to_owned())
                } else if emulated {
                    (
                        Status::Pass,
                        format!(
                            "{} programs load within the instruction budget (times under TCG not judged)",
                            rows.len()
                        ),
                    )
                } else {
                    (
                        Status::Pass,
                        format!("{} programs load within budget", rows.len()),
                    )
                }
            }
            VerifyTable::Missing(why) => (Status::Missing, why),
            VerifyTable::Broken(why) => (Status::Fail, why),
        };
        out.push(Check {
            set: "verify".into(),
            name: "verify".into(),
            status: verify.0,
            detail: verify.1,
        });
        for c in self.checks.iter().filter(|c| c.set == "none") {
            out.push(c.clone());
        }
        for set in SETS {
            let started = self
                .checks
                .iter()
                .any(|c| c.set == *set && c.name == "start" && c.status == Status::Pass);
            let only: &[&str] = if *set == "all" { ALL_ONLY_CHECKS } else { &[] };
            for name in SET_CHECKS.iter().chain(only) {
                if let Some(c) = self
                    .checks
                    .iter()
                    .find(|c| c.set == *set && c.name == *name)
                {
                    out.push(c.clone());
                    continue;
                }
                let (status, detail) = match unfinished {
                    Some(why) => (Status::Fail, why.to_owned()),
                    None if *name != "start" && !started => {
                        (Status::Skip, "the agent did not start".to_owned())
                    }
                    None => (Status::Fail, "not reported by the guest".to_owned()),
                };
                out.push(Check {
                    set: (*set).to_owned(),
                    name: (*name).to_owned(),
                    status,
                    detail,
                });
            }
        }
        if let Some(why) = unfinished {
            out.push(Check {
                set: "guest".into(),
                name: "completed".into(),
                status: Status::Fail,
                detail: why.into(),
            });
        }
        out
    }

    /// The agent log lines the guest sent for `set`.
    pub fn log_of(&self, set: &str) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|(s, _)| s == set)
            .map(|(_, l)| l.as_str())
            .collect()
    }
}

/// A fifth of the kernel's complexity limit, the budget of every program
/// (agent/src/kernel/verifier.rs, `INSNS_BUDGET`).
pub const INSNS_BUDGET_FRACTION: u64 = 5;
/// Verification time budget per program on hardware (`TIME_BUDGET_US`).
pub const TIME_BUDGET_US: u64 = 1_000_000;

/// Over the instruction budget, or (on hardware) the time budget; a row
/// without its numbers is over.
fn over_budget(r: &VerifyRow, emulated: bool) -> bool {
    let insns = match (r.insns_processed, r.insns_limit) {
        (Some(p), Some(l)) => p > l / INSNS_BUDGET_FRACTION,
        _ => true,
    };
    let time = !emulated && r.verification_us.is_none_or(|t| t >= TIME_BUDGET_US);
    insns || time
}

fn last_lines(lines: &[String], n: usize) -> Vec<&str> {
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(String::as_str).collect()
}

/// The programs named in agent error lines (`program NAME: ...`, the
/// loader's error for a program that did not load).
pub fn failed_programs<'a>(log: &[&'a str]) -> Vec<&'a str> {
    let mut names = Vec::new();
    for line in log {
        let mut rest = *line;
        while let Some(at) = rest.find("program ") {
            rest = &rest[at + "program ".len()..];
            let name: &str = rest
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            if !name.is_empty() && rest[name.len()..].starts_with(':') && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// Parses the JSON array `llm-egress verify --json` prints.
pub fn parse_verify_json(text: &str) -> Result<Vec<VerifyRow>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("no output".into());
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let rows = v.as_array().ok_or("not a JSON array")?;
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let program = row["program"]
                .as_str()
                .ok_or_else(|| format!("row {i}: no \"program\" string"))?
                .to_owned();
            let loaded = row["loaded"]
                .as_bool()
                .ok_or_else(|| format!("row {i} ({program}): no \"loaded\" boolean"))?;
            let n = |k: &str| row[k].as_u64();
            Ok(VerifyRow {
                insns_processed: n("insns_processed"),
                insns_limit: n("insns_limit"),
                peak_states: n("peak_states"),
                total_states: n("total_states"),
                max_states_per_insn: n("max_states_per_insn"),
                verification_us: n("verification_us"),
                error: row["error"].as_str().map(str::to_owned),
                program,
                loaded,
            })
        })
        .collect()
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The verifier table as aligned text, one program a line.
pub fn render_verify(rows: &[VerifyRow]) -> String {
    let header = [
        "program", "loaded", "insns", "limit", "%limit", "peak st", "total st", "st/insn", "ms",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let pct = match (r.insns_processed, r.insns_limit) {
            (Some(p), Some(l)) if l > 0 => format!("{:.1}", p as f64 * 100.0 / l as f64),
            _ => "-".into(),
        };
        table.push(vec![
            r.program.clone(),
            if r.loaded { "yes" } else { "NO" }.into(),
            opt(r.insns_processed),
            opt(r.insns_limit),
            pct,
            opt(r.peak_states),
            opt(r.total_states),
            opt(r.max_states_per_insn),
            r.verification_us
                .map_or_else(|| "-".into(), |us| format!("{:.1}", us as f64 / 1000.0)),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for r in rows.iter().filter(|r| r.error.is_some()) {
        let _ = writeln!(
            out,
            "{}: {}",
            r.program,
            r.error.as_deref().unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_JSON: &str = r#"[{"program":"names_dns_ingress","loaded":false,"insns_processed":1000001,"insns_limit":1000000,"peak_states":5120,"total_states":40000,"max_states_per_insn":8,"verification_us":9876543,"error":"BPF program is too large. Processed 1000001 insn"},
{"program":"verdict_connect4","loaded":true,"insns_processed":123456,"insns_limit":1000000,"peak_states":1234,"total_states":2345,"max_states_per_insn":4,"verification_us":56789,"error":null}]"#;

    fn console(verify: &str) -> String {
        format!(
            "[    0.000000] Linux version 6.1.0-57-amd64\r\n\
             @@LLME begin\r\n\
             @@LLME kernel 6.1.0-57-amd64\r\n\
             @@LLME uptime 1.25\r\n\
             @@LLME step 120\r\n\
             @@LLME verify-begin\r\n\
             {verify}\
             @@LLME check none baseline-open pass ok\r\n\
             @@LLME check none baseline-closed pass ok\r\n\
             @@LLME set-begin all\r\n\
             @@LLME timing all start 3.5 13.75\r\n\
             @@LLME check all start fail exited with status 1\r\n\
             @@LLME log all Error: program names_dns_ingress: the BPF_PROG_LOAD syscall failed\r\n\
             @@LLME log all processed 1000001 insns (limit 1000000)\r\n\
             @@LLME set-end all\r\n\
             @@LLME set-begin connect\r\n\
             @@LLME timing connect start 14 15.5\r\n\
             @@LLME check connect start pass ready\r\n\
             @@LLME check connect allow pass ok\r\n\
             [   16.1] random: crng init done\r\n\
             @@LLME check connect deny-cidr pass EPERM\r\n\
             @@LLME check connect deny-other fail want EPERM, got ok\r\n\
             @@LLME check connect deny-nat64 pass EPERM\r\n\
             @@LLME check connect deny-ping pass EPERM\r\n\
             @@LLME check connect allow-ping pass ok\r\n\
             @@LLME check connect stop pass exit 0 on SIGTERM\r\n\
             @@LLME check connect after-stop pass ok\r\n\
             @@LLME set-end connect\r\n\
             @@LLME end\r\n"
        )
    }

    fn status_of(checks: &[Check], set: &str, name: &str) -> Status {
        checks
            .iter()
            .find(|c| c.set == set && c.name == name)
            .map(|c| c.status)
            .unwrap_or_else(|| panic!("no check {set}/{name}"))
    }

    #[test]
    fn verify_json_parses_into_rows() {
        let rows = parse_verify_json(SAMPLE_JSON).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].program, "names_dns_ingress");
        assert!(!rows[0].loaded);
        assert_eq!(rows[0].insns_processed, Some(1_000_001));
        assert!(rows[0].error.as_deref().unwrap().contains("too large"));
        assert_eq!(
            rows[1],
            VerifyRow {
                program: "verdict_connect4".into(),
                loaded: true,
                insns_processed: Some(123456),
                insns_limit: Some(1_000_000),
                peak_states: Some(1234),
                total_states: Some(2345),
                max_states_per_insn: Some(4),
                verification_us: Some(56789),
                error: None,
            }
        );
        let text = render_verify(&rows);
        assert!(text.starts_with("program "), "{text}");
        assert!(text.contains("verdict_connect4"), "{text}");
        assert!(text.contains("12.3"), "percent of the limit: {text}");
        assert!(text.contains("names_dns_ingress: BPF program is too large"));
    }

    #[test]
    fn bad_verify_json_is_an_error() {
        assert!(parse_verify_json("").is_err());
        assert!(parse_verify_json("{}").is_err());
        assert!(parse_verify_json("[{\"loaded\":true}]").is_err());
        assert!(parse_verify_json("[{\"program\":\"x\"}]").is_err());
        assert_eq!(parse_verify_json("[]").unwrap(), vec![]);
    }

    #[test]
    fn a_full_console_parses_into_checks() {
        let verify = SAMPLE_JSON
            .lines()
            .map(|l| format!("@@LLME verify-out {l}\r\n"))
            .collect::<String>()
            + "@@LLME verify-end rc=1 start=2.0 end=12.5\r\n";
        let r = GuestReport::parse(&console(&verify));
        assert!(r.begun && r.ended);
        assert_eq!(r.kernel.as_deref(), Some("6.1.0-57-amd64"));
        assert_eq!(r.init_uptime, Some(1.25));
        assert_eq!(r.verify_rc(), Some(1));
        assert_eq!(r.verify_secs, Some(10.5));
        assert_eq!(
            r.start_secs,
            vec![("all".to_owned(), 10.25), ("connect".to_owned(), 1.5)]
        );
        let VerifyTable::Rows(rows) = r.verify_table() else {
            panic!("expected rows");
        };
        assert_eq!(rows.len(), 2);
        let checks = r.checks(false);
        assert_eq!(status_of(&checks, "verify", "verify"), Status::Fail);
        assert_eq!(status_of(&checks, "none", "baseline-open"), Status::Pass);
        assert_eq!(status_of(&checks, "all", "start"), Status::Fail);
        assert_eq!(status_of(&checks, "all", "allow"), Status::Skip);
        assert_eq!(status_of(&checks, "all", "stop"), Status::Skip);
        assert_eq!(status_of(&checks, "all", "plaintext"), Status::Skip);
        assert_eq!(status_of(&checks, "all", "plaintext-join"), Status::Skip);
        assert_eq!(status_of(&checks, "all", "plaintext-go"), Status::Skip);
        assert!(
            !checks
                .iter()
                .any(|c| c.set == "connect" && c.name == "plaintext"),
            "the uprobe checks belong to set all only"
        );
        assert_eq!(status_of(&checks, "connect", "start"), Status::Pass);
        assert_eq!(status_of(&checks, "connect", "deny-other"), Status::Fail);
        let c = checks
            .iter()
            .find(|c| c.name == "deny-other" && c.set == "connect")
            .unwrap();
        assert_eq!(c.detail, "want EPERM, got ok");
        assert!(!checks.iter().any(|c| c.set == "guest"));
        let log = r.log_of("all");
        assert_eq!(log.len(), 2);
        assert_eq!(failed_programs(&log), vec!["names_dns_ingress"]);
    }

    #[test]
    fn verify_judges_the_instruction_budget_always_and_time_on_hardware_only() {
        let row = |insns: u64, us: u64| {
            format!(
                "@@LLME verify-out [{{\"program\":\"p\",\"loaded\":true,\"insns_processed\":{insns},\"insns_limit\":1000000,\"verification_us\":{us},\"error\":null}}]\r\n@@LLME verify-end rc=0 start=1.0 end=2.0\r\n"
            )
        };
        let judge = |insns, us, emulated| {
            let r = GuestReport::parse(&console(&row(insns, us)));
            status_of(&r.checks(emulated), "verify", "verify")
        };
        assert_eq!(judge(200_000, 900_000, false), Status::Pass);
        assert_eq!(judge(200_001, 900_000, false), Status::Fail);
        assert_eq!(judge(200_001, 900_000, true), Status::Fail);
        assert_eq!(judge(100_000, 1_500_000, false), Status::Fail);
        assert_eq!(judge(100_000, 1_500_000, true), Status::Pass);
    }

    #[test]
    fn a_missing_verify_subcommand_is_missing_not_a_pass() {
        let verify = "@@LLME verify-err error: unrecognized subcommand 'verify'\r\n\
                      @@LLME verify-end rc=2 start=2.0 end=2.1\r\n";
        let r = GuestReport::parse(&console(verify));
        assert!(matches!(r.verify_table(), VerifyTable::Missing(_)));
        assert_eq!(
            status_of(&r.checks(false), "verify", "verify"),
            Status::Missing
        );
    }

    #[test]
    fn a_guest_that_stops_early_fails_what_it_did_not_report() {
        let r = GuestReport::parse(
            "@@LLME begin\n@@LLME kernel 6.12.118+deb12-amd64\n@@LLME verify-begin\nKernel panic - not syncing\n",
        );
        assert!(r.begun && !r.ended);
        let checks = r.checks(false);
        assert_eq!(status_of(&checks, "verify", "verify"), Status::Fail);
        assert_eq!(status_of(&checks, "all", "start"), Status::Fail);
        assert_eq!(status_of(&checks, "connect", "stop"), Status::Fail);
        assert_eq!(status_of(&checks, "guest", "completed"), Status::Fail);
        let nothing = GuestReport::parse("");
        assert!(!nothing.begun);
        let checks = nothing.checks(false);
        assert_eq!(checks.len(), 1, "one failure when nothing ran");
        assert_eq!(status_of(&checks, "guest", "completed"), Status::Fail);
    }

    #[test]
    fn markers_are_found_after_kernel_text_on_the_same_line() {
        let mut r = GuestReport::default();
        r.add_line("[    2.0] audit: something@@LLME check none baseline-open pass ok\r");
        r.add_line("no marker here");
        assert_eq!(r.checks.len(), 1);
        assert_eq!(r.checks[0].detail, "ok");
    }

    #[test]
    fn failed_programs_come_from_loader_errors_only() {
        let log = [
            "Error: program names_dns_ingress: the BPF_PROG_LOAD syscall failed",
            "loading program foo without colon",
            "program sni_egress: verifier said no; program names_dns_ingress: again",
        ];
        assert_eq!(
            failed_programs(&log),
            vec!["names_dns_ingress", "sni_egress"]
        );
    }
}
