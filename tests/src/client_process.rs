//! A test binary run again as a client process inside a workload cgroup and
//! a test network namespace, driven one line at a time: the parent's
//! [`ClientProcess::start`] and [`ClientProcess::cmd`], the child's
//! [`serve`] (called from a `#[test]` that does nothing unless the parent
//! started it). Keeping one process lets a test hold sockets between steps
//! (a UDP socket that sent a query, a connection opened before a reload).

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::{NetnsGuard, netns::enter_netns};

/// The parent's handle; the process is killed when it is dropped.
pub struct ClientProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ClientProcess {
    /// Runs this test binary's test `test` (exactly) with `env` naming the
    /// cgroup to join and the namespace to enter.
    pub fn start(test: &str, env: &str, cgroup: &Path, ns: &NetnsGuard) -> ClientProcess {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
            .env(
                env,
                format!("{}\n{}", cgroup.display(), ns.path().display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the client process");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        ClientProcess {
            child,
            stdin,
            stdout,
        }
    }

    /// One command, one answer line (lines not starting with `R ` are the
    /// test harness's own output and are skipped).
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut l = String::new();
        loop {
            l.clear();
            let n = self.stdout.read_line(&mut l).unwrap();
            assert!(n > 0, "the client process ended before answering {line:?}");
            if let Some(r) = l.trim_end().strip_prefix("R ") {
                return r.to_string();
            }
        }
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In the child: when `env` is set (by [`ClientProcess::start`]), joins the
/// cgroup and enters the namespace it names, then answers each line of
/// stdin with `handler(line)`. Without `env` (the test run as itself) it
/// does nothing.
pub fn serve(env: &str, mut handler: impl FnMut(&str) -> String) {
    let Ok(spec) = std::env::var(env) else {
        return;
    };
    let mut lines = spec.lines();
    let cgroup = lines.next().expect("the cgroup line");
    let ns = lines.next().expect("the namespace line");
    std::fs::write(
        Path::new(cgroup).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| panic!("cannot join {cgroup}: {e}"));
    enter_netns(Path::new(ns)).unwrap_or_else(|e| panic!("cannot enter {ns}: {e}"));
    let mut out = std::io::stdout();
    for line in std::io::stdin().lines().map_while(Result::ok) {
        let reply = handler(&line);
        writeln!(out, "R {reply}").unwrap();
        out.flush().unwrap();
    }
}
