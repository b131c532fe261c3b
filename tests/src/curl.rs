//! curl as a client of the fake providers (`fake_provider`), run inside a
//! workload cgroup and the test's network namespace.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use crate::{NetnsGuard, fake_provider::FakeProvider, probe::confine};

/// curl posting `body` (JSON) to `path` of the fake provider `server`,
/// trusting its CA and resolving its host to it, confined to `cgroup` and
/// `netns`, stdout and stderr piped; the caller adds its own options (curl
/// takes them after the URL too) and runs it. Anthropic's fakes get the
/// `anthropic-version` header their SDK sends.
pub fn post(
    server: &FakeProvider,
    path: &str,
    body: &str,
    cgroup: &Path,
    netns: &NetnsGuard,
) -> Command {
    let mut cmd = Command::new("curl");
    cmd.arg("-sS")
        .arg("--cacert")
        .arg(server.ca_file())
        .arg("--resolve")
        .arg(server.resolve_arg())
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .arg(server.url(path))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if server.flavor() == crate::fake_provider::Flavor::Anthropic {
        cmd.args(["-H", "anthropic-version: 2023-06-01"]);
    }
    confine(&mut cmd, cgroup, netns);
    cmd
}

/// curl posting a streamed chat completion of `tokens` tokens to the fake
/// OpenAI `server` from `cgroup`, spawned; [`expect_200`] waits for it.
pub fn stream_chat(
    server: &FakeProvider,
    cgroup: &Path,
    netns: &NetnsGuard,
    tokens: usize,
) -> Child {
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "max_tokens": tokens, "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story."}]
    });
    let mut cmd = post(
        server,
        "/v1/chat/completions",
        &body.to_string(),
        cgroup,
        netns,
    );
    cmd.args(["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "60"]);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"))
}

/// Waits for a curl of [`stream_chat`]; panics unless it got a 200.
pub fn expect_200(child: Child) {
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("curl: {e}"));
    assert!(
        out.status.success() && out.stdout == b"200",
        "curl failed ({}): {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
