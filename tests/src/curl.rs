//! curl as a client of the fake providers (`fake_provider`), run inside a
//! workload cgroup and the test's network namespace.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use crate::{NetnsGuard, fake_provider::FakeProvider, probe::confine};

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
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "60",
    ])
    .arg("--cacert")
    .arg(server.ca_file())
    .arg("--resolve")
    .arg(server.resolve_arg())
    .args(["-H", "Content-Type: application/json", "--data-binary"])
    .arg(body.to_string())
    .arg(server.url("/v1/chat/completions"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    confine(&mut cmd, cgroup, netns);
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
