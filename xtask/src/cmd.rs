//! Running child processes: every command is announced in one `xtask:` line
//! before it runs, its output is streamed through, and a failure becomes an
//! error that names the command (and, where asked, the tail of its stderr).
//!
//! This module only runs things; deciding what to run lives in the tasks.

use std::{
    collections::VecDeque,
    ffi::OsStr,
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::testing::TestCounts;

/// How many stderr lines a failed install keeps for its error message.
const TAIL_LINES: usize = 25;

/// Prints one progress line. All of xtask's own output goes through here, to
/// stderr like cargo's status lines, so it interleaves with the children's.
pub fn say(msg: impl std::fmt::Display) {
    eprintln!("xtask: {msg}");
}

/// `12.3 s`
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<Duration> {
    let shown = show(cmd);
    say(format_args!("running {shown}"));
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(start.elapsed())
}

/// Runs `cmd` with stdout inherited and stderr both echoed and kept: on
/// failure the error carries the last lines of stderr, prefixed by `what`
/// (which step failed, in words).
pub fn run_keep_stderr(cmd: &mut Command, what: &str) -> Result<Duration> {
    let shown = show(cmd);
    say(format_args!("running {shown}"));
    let start = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: could not start `{shown}`"))?;
    let stderr = child.stderr.take().context("child stderr")?;
    let reader = thread::spawn(move || {
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail
    });
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let tail = reader.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<String> = tail.into_iter().collect();
        bail!(
            "{what}: `{shown}` failed ({status}); last lines of its stderr:\n{}",
            tail.join("\n")
        );
    }
    Ok(start.elapsed())
}

/// Runs a `cargo test` command, streaming its stdout through while adding up
/// libtest's `test result:` lines. A non-zero exit is reported in the
/// returned counts, not as an error, so that the caller can summarise.
pub fn run_tests(cmd: &mut Command) -> Result<(bool, TestCounts, Duration)> {
    let shown = show(cmd);
    say(format_args!("running {shown}"));
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut counts = TestCounts::default();
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        // A closed stdout (`| head`) must not hide the test outcome.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        counts.add_line(&line);
    }
    drop(out);
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    Ok((status.success(), counts, start.elapsed()))
}

/// Runs a query and returns its stdout. The exit status is returned too:
/// `dpkg-query` exits 1 when some of the packages are unknown, which is an
/// answer, not a failure.
pub fn query(cmd: &mut Command) -> Result<(bool, String)> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{}`", show(cmd)))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The command as a shell-like line: the environment it sets (not PATH,
/// which is long and said separately), then program and arguments.
pub fn show(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            words.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Quotes a word for display when it holds anything a shell would split or
/// interpret; control characters (the 0x1f of CARGO_ENCODED_RUSTFLAGS) are
/// written as `\x1f`.
pub fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        return word.into_owned();
    }
    let mut quoted = String::from("'");
    for c in word.chars() {
        match c {
            '\'' => quoted.push_str("'\\''"),
            c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_are_not_quoted() {
        assert_eq!(quote(OsStr::new("--release")), "--release");
        assert_eq!(quote(OsStr::new("/usr/bin/cargo")), "/usr/bin/cargo");
    }

    #[test]
    fn awkward_words_are_quoted_and_control_characters_escaped() {
        assert_eq!(quote(OsStr::new("")), "''");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), "'it'\\''s'");
        assert_eq!(
            quote(OsStr::new("--cfg=x=\"1\"\u{1f}-Cy")),
            "'--cfg=x=\"1\"\\x1f-Cy'"
        );
    }

    #[test]
    fn show_puts_environment_first_and_leaves_out_path() {
        let mut cmd = Command::new("cargo");
        cmd.args(["build", "--release"])
            .env("PATH", "/x")
            .env("A", "1")
            .env_remove("B");
        assert_eq!(show(&cmd), "A=1 cargo build --release");
    }
}
