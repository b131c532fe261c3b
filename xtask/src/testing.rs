//! `cargo xtask test`: the project's one test command (README, .ci/run).
//!
//! Steps: setup, build-ebpf, build the debug agent with the object embedded,
//! the unprivileged unit tests, then the root integration tests against that
//! agent (LLM_EGRESS_BIN), then the kernel matrix (`cargo xtask kernels`:
//! Debian's 6.1 and 6.12 in QEMU; not with --unit-only or --filter), with the setup venv's Python as
//! LLM_EGRESS_TOKENS_PYTHON so the token calibration's official-SDK run
//! always happens (unless the caller set that variable). Test output streams through; each step ends with
//! a summary line, and any failed step makes the exit status non-zero. A
//! failed build skips the tests; failed unit tests do not stop the
//! integration tests (both results are worth seeing).

use std::{fmt, io::IsTerminal, path::PathBuf, time::Instant};

use anyhow::{Result, bail};

use crate::{
    Workspace,
    agent::{self, Profile},
    cmd::{self, say, secs},
    ebpf, setup,
};

pub const UNIT_PACKAGES: &[&str] = &["llm-egress", "llm-egress-common", "xtask"];
const INTEGRATION_THREADS: &str = "--test-threads=4";
/// The Python with the official SDKs for tests/tests/tokens.rs (setup
/// installs them in its venv).
const TOKENS_PYTHON: &str = "LLM_EGRESS_TOKENS_PYTHON";

/// What libtest's `test result:` lines add up to.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Number of `test result:` lines (one per test binary and doc-test run).
    pub binaries: u64,
}

impl TestCounts {
    /// Adds a line like `test result: ok. 5 passed; 0 failed; 1 ignored;
    /// 0 measured; 0 filtered out; finished in 0.01s`; other lines are ignored.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
        for part in rest.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

impl fmt::Display for TestCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        )
    }
}

enum Outcome {
    Ok(String),
    Failed(String),
    Skipped(String),
}

struct Step {
    name: &'static str,
    outcome: Outcome,
}

pub struct Options {
    pub unit_only: bool,
    pub filter: Option<String>,
}

pub fn test(ws: &Workspace, opts: &Options) -> Result<()> {
    if !opts.unit_only && !cmd::is_root() {
        bail!(
            "test: the integration tests load BPF programs and create cgroups and network namespaces, which needs root: \
             run `sudo cargo xtask test`, or `cargo xtask test --unit-only` for the unprivileged unit tests"
        );
    }
    let mut steps: Vec<Step> = Vec::new();
    let built = build_steps(ws, &mut steps);

    if let Some(bin) = &built {
        let obj = ebpf::object_path(&ws.root);
        let mut c = agent::cargo(ws, &obj);
        // --no-fail-fast: every test binary runs, so one failure does not
        // hide the results of the others.
        c.args(["test", "--no-fail-fast"]);
        for p in UNIT_PACKAGES {
            c.args(["-p", p]);
        }
        if let Some(color) = libtest_color() {
            c.args(["--", color]);
        }
        steps.push(test_step("unit tests", &mut c, None));

        if opts.unit_only {
            steps.push(skipped("integration tests", "--unit-only"));
            steps.push(skipped("kernel matrix", "--unit-only"));
        } else {
            let mut c = agent::cargo(ws, &obj);
            c.args([
                "test",
                "--no-fail-fast",
                "-p",
                agent::TESTS_PACKAGE,
                "--",
                INTEGRATION_THREADS,
            ])
            .env("LLM_EGRESS_BIN", bin);
            if std::env::var_os(TOKENS_PYTHON).is_none() {
                c.env(TOKENS_PYTHON, setup::pyenv_python());
            }
            c.args(libtest_color());
            c.args(opts.filter.as_deref());
            steps.push(test_step(
                "integration tests",
                &mut c,
                opts.filter.as_deref(),
            ));
            if opts.filter.is_some() {
                steps.push(skipped("kernel matrix", "--filter"));
            } else {
                steps.push(kernel_matrix(ws));
            }
        }
    } else {
        steps.push(skipped("unit tests", "an earlier step failed"));
        steps.push(skipped("integration tests", "an earlier step failed"));
        steps.push(skipped("kernel matrix", "an earlier step failed"));
    }

    let mut failed = Vec::new();
    for s in &steps {
        let (word, detail) = match &s.outcome {
            Outcome::Ok(d) => ("ok", d),
            Outcome::Failed(d) => {
                failed.push(s.name);
                ("FAILED", d)
            }
            Outcome::Skipped(d) => ("skipped", d),
        };
        say(format_args!("summary: {:<17} {word} ({detail})", s.name));
    }
    if !failed.is_empty() {
        bail!("test: failed: {}", failed.join(", "));
    }
    Ok(())
}

/// setup, build-ebpf and the debug agent build, each a step; the agent
/// binary when all three worked. Only the agent: the integration test step
/// builds the tests package itself, so that a broken test crate does not
/// keep the unit tests from running.
fn build_steps(ws: &Workspace, steps: &mut Vec<Step>) -> Option<PathBuf> {
    let start = Instant::now();
    if let Err(e) = setup::setup() {
        say(format_args!("error: {e:#}"));
        steps.push(failed("setup", &e, start));
        steps.push(skipped("build-ebpf", "setup failed"));
        steps.push(skipped("build agent", "setup failed"));
        return None;
    }
    steps.push(ok("setup", start));

    let start = Instant::now();
    let obj = match ebpf::build_ebpf(&ws.root) {
        Ok(obj) => obj,
        Err(e) => {
            say(format_args!("error: {e:#}"));
            steps.push(failed("build-ebpf", &e, start));
            steps.push(skipped("build agent", "build-ebpf failed"));
            return None;
        }
    };
    steps.push(ok("build-ebpf", start));

    let start = Instant::now();
    match agent::build_agent(ws, &obj, Profile::Debug, false) {
        Ok(bin) => {
            steps.push(ok("build agent", start));
            Some(bin)
        }
        Err(e) => {
            say(format_args!("error: {e:#}"));
            steps.push(failed("build agent", &e, start));
            None
        }
    }
}

/// Every program of both sets loads within budget, attaches and enforces
/// on the kernels users are likely to run (docs/kernels.md).
fn kernel_matrix(ws: &Workspace) -> Step {
    let start = Instant::now();
    let opts = crate::kernels::Options {
        kernels: Vec::new(),
        tcg: false,
        timeout: None,
        release: false,
    };
    match crate::kernels::kernels(ws, &opts) {
        Ok(()) => ok("kernel matrix", start),
        Err(e) => {
            say(format_args!("error: {e:#}"));
            failed("kernel matrix", &e, start)
        }
    }
}

fn test_step(name: &'static str, c: &mut std::process::Command, filter: Option<&str>) -> Step {
    let outcome = match cmd::run_tests(c) {
        Ok((true, counts, took)) => {
            if let (Some(f), 0) = (filter, counts.passed + counts.failed + counts.ignored) {
                say(format_args!("{name}: no test matched --filter {f}"));
            }
            Outcome::Ok(format!("{counts}; {}", secs(took)))
        }
        Ok((false, counts, took)) if counts.binaries > 0 => {
            Outcome::Failed(format!("{counts}; {}", secs(took)))
        }
        Ok((false, _, took)) => {
            Outcome::Failed(format!("did not build or run, see above; {}", secs(took)))
        }
        Err(e) => Outcome::Failed(format!("{e:#}")),
    };
    Step { name, outcome }
}

/// libtest colours only when its stdout is a terminal; ours is, but the test
/// binaries write into a pipe (to count the results), so ask for it.
fn libtest_color() -> Option<&'static str> {
    std::io::stdout().is_terminal().then_some("--color=always")
}

fn ok(name: &'static str, start: Instant) -> Step {
    Step {
        name,
        outcome: Outcome::Ok(secs(start.elapsed())),
    }
}

fn failed(name: &'static str, e: &anyhow::Error, start: Instant) -> Step {
    let first = format!("{e}");
    Step {
        name,
        outcome: Outcome::Failed(format!("{first}; {}", secs(start.elapsed()))),
    }
}

fn skipped(name: &'static str, why: &str) -> Step {
    Step {
        name,
        outcome: Outcome::Skipped(why.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_lines_add_up() {
        let mut c = TestCounts::default();
        for line in [
            "running 3 tests",
            "test a ... ok",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s",
            "",
            "test result: FAILED. 7 passed; 2 failed; 0 ignored; 0 measured; 4 filtered out; finished in 1.20s",
            "   Doc-tests llm_egress_common",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            c.add_line(line);
        }
        assert_eq!(
            c,
            TestCounts {
                passed: 10,
                failed: 2,
                ignored: 1,
                binaries: 3
            }
        );
        assert_eq!(c.to_string(), "10 passed, 2 failed, 1 ignored");
    }

    #[test]
    fn lines_that_only_mention_test_results_are_not_counted() {
        let mut c = TestCounts::default();
        c.add_line("test tests::test_result_lines_add_up ... ok");
        c.add_line("println: the test result: was 3 passed");
        assert_eq!(c, TestCounts::default());
    }
}
