//! TLS plaintext from OpenSSL uprobes (docs/plaintext.md), end to end:
//! real clients that link Debian's libssl.so.3 (curl, Python's `ssl`
//! module, the official openai and anthropic SDKs) in a workload with
//! `exact_tokens = true` talk to the fake providers over real TLS; the
//! agent's plaintext consumer (the test dump of debug builds,
//! `LLM_EGRESS_TEST_PLAINTEXT_DUMP`) must hold exactly the bytes each
//! client wrote and read, on the client's socket cookie and workload.
//! Processes outside such workloads get no uprobe; a TLS client without a
//! shared libssl (rustls, in this test binary) is counted as not visible.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TempDir,
    bench::{median, median_ci95, pin_to},
    bpf,
    fake_provider::{self, Flavor},
    probe::confine,
    require_root,
    scenario::exact_tokens_policy,
    wait_until,
};
use serde_json::Value;

const DUMP_ENV: &str = "LLM_EGRESS_TEST_PLAINTEXT_DUMP";

/// An agent with the plaintext dump in `dir`.
fn start_agent(cg: &CgroupGuard, dir: &Path) -> (Agent, PathBuf) {
    let dump = dir.join("plaintext.jsonl");
    let mut agent = Agent::launch_with_env(
        &exact_tokens_policy(cg, ""),
        &[(DUMP_ENV, dump.to_str().unwrap())],
    );
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
    (agent, dump)
}

/// One chunk of the dump.
#[derive(Clone, Debug)]
struct Chunk {
    cookie: u64,
    pid: u32,
    workload: Option<String>,
    sent: bool,
    data: Vec<u8>,
    complete: bool,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn read_dump(path: &Path) -> Vec<Chunk> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Chunk {
            cookie: v["cookie"].as_u64().unwrap(),
            pid: v["pid"].as_u64().unwrap() as u32,
            workload: v["workload"].as_str().map(str::to_string),
            sent: v["direction"] == "sent",
            data: unhex(v["hex"].as_str().unwrap()),
            complete: v["complete"].as_bool().unwrap(),
        })
        .collect()
}

/// The chunks of `pid`, waiting up to 5 s until `done` holds for them.
fn chunks_of(dump: &Path, pid: u32, done: impl Fn(&[Chunk]) -> bool) -> Vec<Chunk> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c: Vec<Chunk> = read_dump(dump)
            .into_iter()
            .filter(|c| c.pid == pid)
            .collect();
        if done(&c) || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each direction's bytes in call order, per cookie.
fn streams(chunks: &[Chunk]) -> BTreeMap<(u64, bool), Vec<u8>> {
    let mut out: BTreeMap<(u64, bool), Vec<u8>> = BTreeMap::new();
    for c in chunks {
        out.entry((c.cookie, c.sent)).or_default().extend(&c.data);
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A request over Python's `ssl` (libssl.so.3) that prints its socket's
/// cookie (SO_COOKIE, the key the connect hook and accounting use) and the
/// exact bytes it wrote and read, hex.
const SSL_CLIENT: &str = r#"
import json, socket, ssl, sys
ip, host, ca, body = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((ip, 443))
cookie = int.from_bytes(raw.getsockopt(socket.SOL_SOCKET, 57, 8), "little")
s = ctx.wrap_socket(raw, server_hostname=host)
req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
       f"Authorization: Bearer sk-test\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
s.sendall(req)
resp = b""
while b"\r\n\r\n" not in resp:
    resp += s.recv(65536)
head, _, rest = resp.partition(b"\r\n\r\n")
length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
while len(rest) < length:
    d = s.recv(65536)
    if not d:
        break
    rest += d
    resp += d
print(json.dumps({"cookie": cookie, "sent": req.hex(), "received": resp.hex()}))
s.close()
"#;

/// A client of the official SDK (argv: flavor, ip, host, ca, model): one
/// buffered request with `max_tokens` 7.
const SDK_CLIENT: &str = r#"
import ssl, sys
try:
    import httpx
except ImportError:
    import httpx2 as httpx
flavor, ip, host, ca, model = sys.argv[1:6]

class Transport(httpx.HTTPTransport):
    def handle_request(self, request):
        request.extensions["sni_hostname"] = host
        request.headers["Host"] = host
        return super().handle_request(request)

http = httpx.Client(transport=Transport(verify=ssl.create_default_context(cafile=ca)))
msgs = [{"role": "user", "content": "What is the plaintext of this call?"}]
if flavor == "openai":
    import openai
    c = openai.OpenAI(api_key="sk-proj-" + "x" * 156, base_url=f"https://{ip}/v1", http_client=http, max_retries=0)
    c.chat.completions.create(model=model, messages=msgs, max_tokens=7)
else:
    import anthropic
    c = anthropic.Anthropic(api_key="sk-ant-api03-" + "x" * 95 + "AA", base_url=f"https://{ip}", http_client=http, max_retries=0)
    c.messages.create(model=model, messages=msgs, max_tokens=7)
c.close()
"#;

fn run_python(
    py: &str,
    script: &Path,
    args: &[&str],
    cgroup: &Path,
    netns: &NetnsGuard,
) -> (u32, String) {
    run_python_on(py, script, args, cgroup, netns, None)
}

/// `run_python`, the process pinned to `cpu` when given.
fn run_python_on(
    py: &str,
    script: &Path,
    args: &[&str],
    cgroup: &Path,
    netns: &NetnsGuard,
    cpu: Option<usize>,
) -> (u32, String) {
    let mut cmd = Command::new(py);
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: sched_setaffinity on the forked child itself, with a set
        // built on its stack; async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    confine(&mut cmd, cgroup, netns);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{py} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric_value(name, labels).unwrap_or(0.0)
}

/// Python's `ssl` module: the agent gets exactly the bytes the client
/// wrote and read, under the client's own socket cookie and workload.
#[test]
fn python_ssl_plaintext_is_exactly_what_the_client_wrote_and_read_on_its_cookie() {
    require_root();
    let cg = CgroupGuard::new("pt-ssl");
    let bot = cg.child("bot");
    let netns = NetnsGuard::new();
    let server = fake_provider::start(&netns, "192.0.2.1:443", Flavor::OpenAi);
    let dir = TempDir::new("pt");
    let (agent, dump) = start_agent(&cg, dir.path());
    let script = dir.path().join("ssl_client.py");
    std::fs::write(&script, SSL_CLIENT).unwrap();
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"exact bytes"}]}"#;
    let (pid, out) = run_python(
        "/usr/bin/python3",
        &script,
        &[
            "192.0.2.1",
            server.host(),
            server.ca_file().to_str().unwrap(),
            body,
        ],
        &bot,
        &netns,
    );
    let truth: Value = serde_json::from_str(out.trim()).unwrap();
    let cookie = truth["cookie"].as_u64().unwrap();
    let (sent, received) = (
        unhex(truth["sent"].as_str().unwrap()),
        unhex(truth["received"].as_str().unwrap()),
    );
    let chunks = chunks_of(&dump, pid, |c| {
        let s = streams(c);
        s.get(&(cookie, false))
            .is_some_and(|r| r.len() >= received.len())
    });
    let s = streams(&chunks);
    assert!(cookie != 0);
    assert_eq!(
        s.keys().copied().collect::<Vec<_>>(),
        [(cookie, false), (cookie, true)],
        "every chunk on the client's socket cookie {cookie}: {chunks:?}\n{}",
        agent.context()
    );
    assert_eq!(
        s[&(cookie, true)],
        sent,
        "sent plaintext = what the client wrote"
    );
    assert_eq!(
        s[&(cookie, false)],
        received,
        "received plaintext = what the client read"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.complete && c.workload.as_deref() == Some("bot"))
    );
    assert!(contains(&sent, b"POST /v1/chat/completions HTTP/1.1\r\n"));
    assert!(
        contains(&received, b"\"usage\""),
        "the fake's usage is in what was read"
    );
    let paused = metric(
        &agent,
        "llm_egress_plaintext_execs_total",
        &[("result", "paused")],
    );
    assert_eq!(paused, 1.0, "one exec, one pause: {}", agent.metrics());
}

/// curl (libssl.so.3): the request line, headers and body it sent and the
/// response the fake served arrive on one connection of workload `bot`;
/// the same curl in workload `plain` gets no uprobe and sends nothing.
#[test]
fn curl_plaintext_reaches_the_agent_and_a_process_outside_gets_no_uprobe() {
    require_root();
    let cg = CgroupGuard::new("pt-curl");
    let bot = cg.child("bot");
    let plain = cg.child("plain");
    let netns = NetnsGuard::new();
    let server = fake_provider::start(&netns, "192.0.2.1:443", Flavor::OpenAi);
    let dir = TempDir::new("pt");
    let (agent, dump) = start_agent(&cg, dir.path());
    let body = r#"{"model":"gpt-4o-mini","max_tokens":9,"messages":[{"role":"user","content":"hello from curl"}]}"#;
    let curl = |cgroup: &Path| {
        let mut cmd =
            llm_egress_tests::curl::post(&server, "/v1/chat/completions", body, cgroup, &netns);
        cmd.args(["--http1.1", "--max-time", "20"]);
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (pid, out.stdout)
    };
    let (pid, response_body) = curl(&bot);
    let chunks = chunks_of(&dump, pid, |c| {
        streams(c)
            .iter()
            .any(|((_, sent), d)| !sent && contains(d, &response_body))
    });
    let s = streams(&chunks);
    let cookies: std::collections::BTreeSet<u64> = s.keys().map(|k| k.0).collect();
    assert_eq!(
        cookies.len(),
        1,
        "one connection: {:?}\n{}",
        s.keys(),
        agent.context()
    );
    let cookie = *cookies.iter().next().unwrap();
    assert!(cookie != 0, "a socket cookie");
    let sent = &s[&(cookie, true)];
    let received = &s[&(cookie, false)];
    assert!(
        sent.starts_with(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"),
        "{}",
        String::from_utf8_lossy(sent)
    );
    assert!(
        sent.ends_with(body.as_bytes()),
        "the body as sent: {}",
        String::from_utf8_lossy(sent)
    );
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(received)
    );
    assert!(
        received.ends_with(&response_body),
        "the response body curl printed is the end of what it read"
    );
    assert!(chunks.iter().all(|c| c.workload.as_deref() == Some("bot")));
    let served = server.wait_served(1);
    assert_eq!(served.len(), 1);
    let usage = served[0].usage;
    assert!(
        contains(
            received,
            format!("\"completion_tokens\": {}", usage.completion).as_bytes()
        ),
        "the fake's usage"
    );

    let attached = metric(
        &agent,
        "llm_egress_plaintext_attach_total",
        &[("result", "attached")],
    );
    let (other_pid, _) = curl(&plain);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        read_dump(&dump).iter().all(|c| c.pid != other_pid),
        "no plaintext from outside the workload"
    );
    assert_eq!(
        metric(
            &agent,
            "llm_egress_plaintext_attach_total",
            &[("result", "attached")]
        ),
        attached,
        "no uprobe for workload `plain`"
    );
    let log = agent.all_stderr();
    assert!(
        log.contains(&format!("pid={pid}")) && !log.contains(&format!("pid={other_pid} ")),
        "attach log names only the traced curl"
    );
}

/// The official SDKs (Python, httpx over `ssl`): the request they build and
/// the response they parse arrive in plaintext on one cookie.
#[test]
fn official_sdk_requests_and_responses_arrive_in_plaintext() {
    require_root();
    let Some(py) = llm_egress_tests::sdk_python() else {
        eprintln!("SKIPPED: needs target/pyenv (cargo xtask setup) or LLM_EGRESS_TOKENS_PYTHON");
        return;
    };
    let cg = CgroupGuard::new("pt-sdk");
    let bot = cg.child("bot");
    let netns = NetnsGuard::new();
    let openai = fake_provider::start(&netns, "192.0.2.1:443", Flavor::OpenAi);
    let anthropic = fake_provider::start(&netns, "198.51.100.1:443", Flavor::Anthropic);
    let dir = TempDir::new("pt");
    let (agent, dump) = start_agent(&cg, dir.path());
    let script = dir.path().join("sdk_client.py");
    std::fs::write(&script, SDK_CLIENT).unwrap();
    for (server, flavor, model, path, usage_key) in [
        (
            &openai,
            "openai",
            "gpt-4o-mini",
            "/v1/chat/completions",
            "completion_tokens",
        ),
        (
            &anthropic,
            "anthropic",
            "claude-3-5-haiku-latest",
            "/v1/messages",
            "output_tokens",
        ),
    ] {
        let ip = server.addr().ip().to_string();
        let (pid, _) = run_python(
            &py,
            &script,
            &[
                flavor,
                &ip,
                server.host(),
                server.ca_file().to_str().unwrap(),
                model,
            ],
            &bot,
            &netns,
        );
        let served = server.wait_served(1);
        let usage = served.last().unwrap().usage;
        // Pretty-printed (OpenAI's fake) or compact (Anthropic's).
        let needles = [
            format!("\"{usage_key}\": {}", usage.completion),
            format!("\"{usage_key}\":{}", usage.completion),
        ];
        let has_usage = |d: &[u8]| needles.iter().any(|n| contains(d, n.as_bytes()));
        let chunks = chunks_of(&dump, pid, |c| {
            streams(c)
                .iter()
                .any(|((_, sent), d)| !sent && has_usage(d))
        });
        let s = streams(&chunks);
        let cookies: std::collections::BTreeSet<u64> = s.keys().map(|k| k.0).collect();
        assert_eq!(
            cookies.len(),
            1,
            "{flavor}: one connection: {:?}\n{}",
            s.keys(),
            agent.context()
        );
        let cookie = *cookies.iter().next().unwrap();
        let (Some(sent), Some(received)) = (s.get(&(cookie, true)), s.get(&(cookie, false))) else {
            panic!(
                "{flavor}: both directions: {:?}\n{}",
                s.keys(),
                agent.context()
            );
        };
        assert!(cookie != 0);
        assert!(
            sent.starts_with(format!("POST {path} HTTP/1.1\r\n").as_bytes()),
            "{flavor}: {}",
            String::from_utf8_lossy(sent)
        );
        assert!(
            contains(sent, format!("\"model\":\"{model}\"").as_bytes()),
            "{flavor}: the model in the body: {}",
            String::from_utf8_lossy(sent)
        );
        assert!(
            has_usage(received),
            "{flavor}: the served usage {needles:?} in {}",
            String::from_utf8_lossy(received)
        );
        assert!(chunks.iter().all(|c| c.workload.as_deref() == Some("bot")));
    }
}

/// Env of the rustls client run by `rustls_client_child`.
const RUSTLS_ENV: &str = "LLM_EGRESS_TEST_RUSTLS_CLIENT";

/// The child side: a TLS request with rustls (no libssl) when started by
/// the test below; nothing otherwise.
#[test]
fn rustls_client_child() {
    let Ok(spec) = std::env::var(RUSTLS_ENV) else {
        return;
    };
    let mut parts = spec.split('\n');
    let (addr, host, ca) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":3,"messages":[{"role":"user","content":"rustls"}]}"#;
    write!(tls, "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 4096];
    let n = tls.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect()
}

/// A TLS client without a shared libssl (rustls) in a traced workload is
/// traced, sends no plaintext, and is counted as not visible when it ends.
#[test]
fn a_tls_client_without_libssl_is_counted_as_not_visible() {
    require_root();
    let cg = CgroupGuard::new("pt-rustls");
    let bot = cg.child("bot");
    let netns = NetnsGuard::new();
    let server = fake_provider::start(&netns, "192.0.2.1:443", Flavor::OpenAi);
    let dir = TempDir::new("pt");
    let (agent, dump) = start_agent(&cg, dir.path());
    let exe = std::env::current_exe().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.contains("/libssl.so"),
        "this test binary must not link libssl"
    );
    let mut cmd = Command::new(exe);
    cmd.args([
        "rustls_client_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env(
        RUSTLS_ENV,
        format!(
            "{}\n{}\n{}",
            server.addr(),
            server.host(),
            server.ca_file().display()
        ),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    confine(&mut cmd, &bot, &netns);
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rustls client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let invisible = agent.wait_for_metric(
        "llm_egress_plaintext_invisible_total",
        &[("workload", "bot")],
        1.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        invisible,
        Some(1.0),
        "{}\n{}",
        agent.metrics(),
        agent.context()
    );
    assert!(
        read_dump(&dump).iter().all(|c| c.pid != pid),
        "no plaintext from rustls"
    );
    assert!(agent.all_stderr().contains("without a shared libssl"));
}

/// An echo loop over Python's `ssl` (argv: ip, host, ca, n, size): n
/// times one write of `size` bytes and reads until they are back; prints
/// the loop's ns.
const ECHO_CLIENT: &str = r#"
import socket, ssl, sys, time
ip, host, ca, n, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
fds = []
if len(sys.argv) > 6 and sys.argv[6] == "probe":
    # perf uprobes and uretprobes on this process's SSL_write_ex and
    # SSL_read_ex, with no BPF program: the trap machinery alone.
    import ctypes, struct
    lib = ctypes.CDLL("libssl.so.3")
    libc = ctypes.CDLL(None, use_errno=True)
    typ = int(open("/sys/bus/event_source/devices/uprobe/type").read())
    for line in open("/proc/self/maps"):
        f = line.split()
        if len(f) > 5 and f[5].endswith("/libssl.so.3") and "x" in f[1]:
            start, off, path = int(f[0].split("-")[0], 16), int(f[2], 16), f[5]
    cpath = ctypes.create_string_buffer(path.encode())
    for sym in ("SSL_write_ex", "SSL_read_ex"):
        addr = ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value
        for ret in (0, 1):
            attr = (ctypes.c_ubyte * 128)()
            struct.pack_into("IIQ", attr, 0, typ, 128, ret)
            struct.pack_into("QQ", attr, 56, ctypes.addressof(cpath), addr - start + off)
            fd = libc.syscall(298, attr, 0, -1, -1, 8)
            if fd < 0:
                raise SystemExit(f"perf_event_open {sym}: errno {ctypes.get_errno()}")
            fds.append(fd)
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((ip, 443)), server_hostname=host)
msg = b"x" * size
s.sendall(msg); got = 0
while got < size: got += len(s.recv(size))
t = time.perf_counter_ns()
for _ in range(n):
    s.sendall(msg)
    got = 0
    while got < size:
        got += len(s.recv(size))
print(time.perf_counter_ns() - t)
s.close()
"#;

/// A streamed chat completion read with Python's `ssl` (argv: ip, host,
/// ca, max_tokens): prints ns from the request to the end of the stream
/// and the bytes read.
const STREAM_CLIENT: &str = r#"
import socket, ssl, sys, time, json
ip, host, ca, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((ip, 443)), server_hostname=host)
body = json.dumps({"model": "gpt-4o-mini", "max_tokens": tokens, "stream": True,
                   "messages": [{"role": "user", "content": "stream"}]})
req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
       f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
t = time.perf_counter_ns()
s.sendall(req)
total = 0; tail = b""
while True:
    d = s.recv(65536)
    if not d: break
    total += len(d); tail = (tail + d)[-64:]
    if b"data: [DONE]" in tail and tail.endswith(b"0\r\n\r\n"): break
print(time.perf_counter_ns() - t, total)
"#;

/// A TLS echo server (rustls) on `addr` in `netns`.
fn start_echo(netns: &NetnsGuard, addr: &str, host: &str) -> String {
    let (config, ca_pem) = fake_provider::tls_config(host);
    let listener = netns
        .in_netns(|| std::net::TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = tcp.set_nodelay(true);
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 16384];
                while let Ok(n) = tls.read(&mut buf) {
                    if n == 0 || tls.write_all(&buf[..n]).is_err() || tls.flush().is_err() {
                        break;
                    }
                }
            });
        }
    });
    ca_pem
}

/// The cost of the uprobes (docs/benchmarks.md, "Plaintext uprobes"): an
/// echo loop of small SSL calls and a long SSE stream, each from workload
/// `bot` (traced) and `plain` (no uprobes) in alternating rounds of one
/// run. Not a timed test: it prints ratios and µs per call.
/// `cargo test -p llm-egress-tests --test plaintext -- --ignored --nocapture bench`
#[test]
#[ignore = "benchmark"]
fn bench_plaintext_cost() {
    require_root();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(11);
    let n: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let cg = CgroupGuard::new("pt-bench");
    let bot = cg.child("bot");
    let plain = cg.child("plain");
    let netns = NetnsGuard::new();
    let host = "api.openai.com";
    let ca_pem = start_echo(&netns, "192.0.2.1:443", host);
    let stream_server = fake_provider::start_with(
        &netns,
        "198.51.100.1:443",
        Flavor::OpenAi,
        fake_provider::Options {
            // BENCH_TOKEN_INTERVAL_US: a paced stream (a provider's pace,
            // ~5–20 ms a token) instead of as fast as the client reads.
            token_interval: Duration::from_micros(
                std::env::var("BENCH_TOKEN_INTERVAL_US")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
        },
    );
    let dir = TempDir::new("pt-bench");
    let ca = dir.path().join("echo-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let (echo, stream) = (dir.path().join("echo.py"), dir.path().join("stream.py"));
    std::fs::write(&echo, ECHO_CLIENT).unwrap();
    std::fs::write(&stream, STREAM_CLIENT).unwrap();
    // BENCH_DUMP=1: with the test dump (diagnosis; it costs the agent more).
    let dump = dir.path().join("plaintext.jsonl");
    let env: Vec<(&str, &str)> = if std::env::var_os("BENCH_DUMP").is_some() {
        vec![(DUMP_ENV, dump.to_str().unwrap())]
    } else {
        vec![]
    };
    let mut agent = Agent::launch_with_env(&exact_tokens_policy(&cg, ""), &env);
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
    // On 2+ CPUs: the agent on CPU 0, the clients on CPU 1 (as
    // bench-connect does), so the agent's reader does not share the
    // client's CPU. BENCH_AA=1: both sides untraced (the bench's noise).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let client_cpu = (cpus >= 2).then_some(1);
    if cpus >= 2 {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &agent.pid().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let aa = std::env::var_os("BENCH_AA").is_some();
    let traced_cg = if aa { &plain } else { &bot };
    let calls_before = metric(&agent, "llm_egress_plaintext_calls_total", &[]);
    let (mut traced, mut base, mut trapped) = (Vec::new(), Vec::new(), Vec::new());
    // BENCH_SIZE: bytes per echo (256; a large one shows the cost of
    // copying a long call, 16 KiB per piece).
    let size = std::env::var("BENCH_SIZE").unwrap_or_else(|_| "256".into());
    let ns = n.to_string();
    // Untraced with perf uprobes of its own and no BPF program: the cost
    // of the traps alone.
    for _ in 0..rounds {
        let (_, out) = run_python_on(
            "/usr/bin/python3",
            &echo,
            &["192.0.2.1", host, ca.to_str().unwrap(), &ns, &size, "probe"],
            &plain,
            &netns,
            client_cpu,
        );
        trapped.push(out.trim().parse::<f64>().unwrap());
    }
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_traced in order {
            let cgroup: &Path = if is_traced { traced_cg } else { &plain };
            let (_, out) = run_python_on(
                "/usr/bin/python3",
                &echo,
                &["192.0.2.1", host, ca.to_str().unwrap(), &ns, &size],
                cgroup,
                &netns,
                client_cpu,
            );
            let ns: f64 = out.trim().parse().unwrap();
            if is_traced {
                traced.push(ns)
            } else {
                base.push(ns)
            }
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    if std::env::var_os("BENCH_DUMP").is_some() {
        let d = read_dump(&dump);
        let sent = d.iter().filter(|c| c.sent).count();
        println!(
            "dump: {} chunks, {sent} sent, {} received",
            d.len(),
            d.len() - sent
        );
    }
    if let Ok(script) = std::env::var("BENCH_STATS_CMD") {
        let out = Command::new(script).output().unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let calls = metric(&agent, "llm_egress_plaintext_calls_total", &[]) - calls_before;
    let ratios: Vec<f64> = traced.iter().zip(&base).map(|(t, b)| t / b).collect();
    let (mt, mb) = (median(&traced), median(&base));
    // Each iteration: one SSL_write_ex and one SSL_read_ex (the dump shows
    // 2 x (n + 1) calls a round: BENCH_DUMP=1).
    let per_call_us = (mt - mb) / 1e3 / (2 * n) as f64;
    println!(
        "echo: {rounds} rounds of {n} x {size} B: traced median {:.1} µs/iter, untraced {:.1} µs/iter, median ratio {:.3}, overhead {per_call_us:.2} µs per SSL call (at 256 B: one write, one read an iteration); calls counted by the agent so far {calls:.0} (expected {} at 256 B)",
        mt / 1e3 / n as f64,
        mb / 1e3 / n as f64,
        median(&ratios),
        rounds * 2 * (n + 1)
    );
    let mp = median(&trapped);
    println!(
        "echo with perf uprobes and no BPF (same workload as untraced, {rounds} rounds before the others): {:.1} µs/iter, {:.2} µs per SSL call over untraced",
        mp / 1e3 / n as f64,
        (mp - mb) / 1e3 / (2 * n) as f64
    );
    let tokens = std::env::var("BENCH_TOKENS")
        .ok()
        .unwrap_or_else(|| "20000".into());
    let (mut t_tp, mut b_tp) = (Vec::new(), Vec::new());
    for r in 0..rounds.min(7) {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_traced in order {
            let cgroup: &Path = if is_traced { traced_cg } else { &plain };
            let (_, out) = run_python_on(
                "/usr/bin/python3",
                &stream,
                &[
                    "198.51.100.1",
                    stream_server.host(),
                    stream_server.ca_file().to_str().unwrap(),
                    &tokens,
                ],
                cgroup,
                &netns,
                client_cpu,
            );
            let mut it = out.split_whitespace().map(|v| v.parse::<f64>().unwrap());
            let (ns, bytes) = (it.next().unwrap(), it.next().unwrap());
            let mbps = bytes / (ns / 1e9) / 1e6;
            if is_traced {
                t_tp.push(mbps)
            } else {
                b_tp.push(mbps)
            }
        }
    }
    let tr: Vec<f64> = t_tp.iter().zip(&b_tp).map(|(t, b)| t / b).collect();
    println!(
        "stream: {} rounds of {tokens} SSE events: traced median {:.2} MB/s, untraced {:.2} MB/s, median ratio {:.3}",
        t_tp.len(),
        median(&t_tp),
        median(&b_tp),
        median(&tr)
    );
    println!(
        "{}",
        agent
            .metrics()
            .lines()
            .filter(|l| l.starts_with("llm_egress_plaintext"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Closing a process's eight uprobes takes most of a second on 6.18
/// (docs/plaintext.md, "Cost"). On the agent's loop, sixteen processes that
/// ended together held it for ~13 s: a process that exec'd next stayed
/// paused that long, and SIGTERM went unanswered. They are closed on a
/// thread of their own (`llm_egress_plaintext_processes{state="detaching"}`
/// shows the backlog): the next process runs at once, and the backlog
/// drains to zero.
/// `n` round trips of a 64-byte datagram over a UNIX socket pair, on this
/// thread: ns per round trip (one send and one receive, each a run of the
/// socket hooks while they are attached).
fn socketpair_round_trips(pair: &(UnixDatagram, UnixDatagram), n: usize) -> f64 {
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(pair.0.send(&msg).unwrap(), 64);
        assert_eq!(pair.1.recv(&mut buf).unwrap(), 64);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// What `exact_tokens` costs every other process on the host
/// (docs/benchmarks.md, "Plaintext uprobes"): the socket hooks
/// (`plaintext_sock_msg`) run for every socket send and receive on the
/// host while an `exact_tokens` workload exists. A process outside every
/// workload does round trips on a UNIX socket pair, in rounds that
/// alternate between a policy with an `exact_tokens` workload (hooks on)
/// and the same policy without (hooks off: the agent detaches them at the
/// reload); each round's state is checked by counting the hooks' links.
/// Prints the median of the per-round ratios on/off and its interval.
/// `cargo test -p llm-egress-tests --test plaintext -- --ignored --nocapture bench_bystander`
#[test]
#[ignore = "benchmark"]
fn bench_bystander_socket_calls() {
    require_root();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, n) = (env("BENCH_ROUNDS", 41), env("BENCH_CALLS", 20_000));
    let cg = CgroupGuard::new("pt-bystander");
    // The workload's cgroup exists (empty): the hooks attach for it.
    let _bot = cg.child("bot");
    let on = exact_tokens_policy(&cg, "");
    let off = on.replace("exact_tokens = true", "exact_tokens = false");
    assert_ne!(
        on, off,
        "the policy has an exact_tokens workload to turn off"
    );
    let agent = Agent::start(&on);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &agent.pid().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    // The kernel names of the socket hooks' programs (tracepoint or
    // kprobe fallback): 15 characters of "plaintext_sock_msg" and
    // "plaintext_tcp_send"/"plaintext_tcp_msg".
    let hooks = || {
        bpf::links_of_programs("plaintext_sock").unwrap()
            + bpf::links_of_programs("plaintext_tcp").unwrap()
    };
    let pair = UnixDatagram::pair().expect("a UNIX socket pair");
    let (loop_tx, loop_rx) = std::sync::mpsc::channel::<usize>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<f64>();
    // The loop's own thread, alone on CPU 1 on 2+ CPUs.
    std::thread::spawn(move || {
        pin_to(1);
        for n in loop_rx {
            done_tx.send(socketpair_round_trips(&pair, n)).unwrap();
        }
    });
    let measure = |n| {
        loop_tx.send(n).unwrap();
        done_rx.recv().unwrap()
    };
    measure(n);
    let mut state = true;
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // on, off | off, on | …: one reload a round, and each state goes
        // first in half of the rounds.
        let order = [state, !state];
        let mut pair = [0.0; 2];
        for hooks_on in order {
            if hooks_on != state {
                let g = agent.generation();
                agent.rewrite_policy(if hooks_on { &on } else { &off });
                agent.sighup();
                agent.wait_for_generation_after(g);
                state = hooks_on;
            }
            let attached = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
                let h = hooks();
                ((h > 0) == hooks_on).then_some(h)
            });
            assert!(
                attached.is_some(),
                "the socket hooks are {} after the reload\n{}",
                if hooks_on { "still off" } else { "still on" },
                agent.context()
            );
            pair[usize::from(!hooks_on)] = measure(n);
        }
        with.push(pair[0]);
        without.push(pair[1]);
        ratios.push(pair[0] / pair[1]);
    }
    drop(loop_tx);
    let (lo, hi) = median_ci95(&ratios);
    println!(
        "bystander: {rounds} rounds of {n} round trips (64-byte datagrams, UNIX socket pair, outside every workload): hooks on {:.0} ns, off {:.0} ns per round trip (medians); ratio on/off {:.3} (median of per-round ratios, 95 % CI {lo:.3}-{hi:.3}); {:.0} ns more per socket call",
        median(&with),
        median(&without),
        median(&ratios),
        (median(&with) - median(&without)) / 2.0
    );
}

#[test]
fn uprobes_of_ended_processes_are_closed_off_the_agents_loop() {
    require_root();
    let cg = CgroupGuard::new("pt-detach");
    let bot = cg.child("bot");
    let netns = NetnsGuard::new();
    let dir = TempDir::new("pt");
    let (mut agent, _dump) = start_agent(&cg, dir.path());
    let in_bot = |script: &str| {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]).stdin(Stdio::null());
        confine(&mut cmd, &bot, &netns);
        cmd
    };
    let status = in_bot("for i in $(seq 16); do sleep 1 & done; wait")
        .status()
        .unwrap();
    assert!(status.success());
    // The tick forgets the ended processes: a backlog forms.
    let detaching = agent.wait_for_metric(
        "llm_egress_plaintext_processes",
        &[("state", "detaching")],
        4.0,
        Duration::from_secs(5),
    );
    assert!(
        detaching.is_some_and(|n| n >= 4.0),
        "no detach backlog after 17 processes ended: {detaching:?}\n{}",
        agent.context()
    );
    // The next exec is paused, attached and resumed while the backlog drains.
    let started = Instant::now();
    let status = in_bot("exit 0").status().unwrap();
    let took = started.elapsed();
    assert!(status.success());
    assert!(
        took < Duration::from_secs(3),
        "a process exec'd during the detach backlog took {took:?} to run\n{}",
        agent.context()
    );
    let drained = Instant::now() + Duration::from_secs(60);
    while agent
        .metric_value("llm_egress_plaintext_processes", &[("state", "detaching")])
        .is_none_or(|n| n > 0.0)
    {
        assert!(
            Instant::now() < drained,
            "the detach backlog did not drain\n{}",
            agent.context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop();
}

/// The exec program stops each process of the workload at exec until its
/// uprobes are in (docs/plaintext.md, "Which processes get uprobes"). An
/// agent that stops while a workload execs without pause must leave none
/// of them stopped: it detaches the exec program, reads the reports still
/// in the ring and resumes each.
#[test]
fn an_agent_that_stops_leaves_no_process_paused_at_exec() {
    require_root();
    let cg = CgroupGuard::new("pt-stop");
    let bot = cg.child("bot");
    let netns = NetnsGuard::new();
    let dir = TempDir::new("pt");
    let (mut agent, _dump) = start_agent(&cg, dir.path());
    // Each exec is paused; the loop's processes see no libssl (an empty
    // file mounted over it in their own mount namespace), so none gets
    // uprobes: closing them would take ~0.1 s per probe at exit.
    let libssl = "/usr/lib/x86_64-linux-gnu/libssl.so.3";
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!("mount --bind /dev/null {libssl} && while :; do /bin/true; done"),
    ])
    .stdin(Stdio::null());
    confine(&mut cmd, &bot, &netns);
    let mut looping = cmd.spawn().unwrap();
    agent.wait_for_metric(
        "llm_egress_plaintext_execs_total",
        &[("result", "paused")],
        20.0,
        Duration::from_secs(20),
    );
    agent.stop();
    // A process left stopped stays in state T; one resumed ends at once.
    std::thread::sleep(Duration::from_millis(500));
    let stopped: Vec<(String, String)> = std::fs::read_to_string(bot.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.split(' ').next()?.to_string();
            (state == "T").then(|| (pid.to_string(), stat))
        })
        .collect();
    let _ = looping.kill();
    let _ = looping.wait();
    assert!(
        stopped.is_empty(),
        "processes left stopped at exec after the agent stopped: {stopped:?}\n{}",
        agent.context()
    );
}
