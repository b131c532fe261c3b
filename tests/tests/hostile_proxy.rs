//! Forward proxies: a workload that reaches providers through an HTTP
//! CONNECT proxy (`HTTPS_PROXY`, `curl --proxy`), and what a client can do
//! to the request line (docs/names.md, "Proxies").
//!
//! Inside the test namespace: the fake OpenAI (10.78.0.1:443) and Anthropic
//! (10.78.0.2:443) providers, the named proxy `corp` (a CONNECT proxy,
//! 10.78.0.9:3128, and on IPv6 fd00:78::9 in one test), a CONNECT proxy the policy does not name (10.78.0.11:
//! 3128, reached by a CIDR allow), a SOCKS5 proxy it does not name
//! (10.78.0.12:1080) and one it names (`socks`, 10.78.0.13:1080). The
//! proxies are in no test cgroup: only the workload's connection to the
//! proxy is judged, and what the proxy tunnels is judged by the CONNECT
//! request the workload sends it. Workload `w` allows `anthropic`, denies
//! `openai`, may use both named proxies and nothing else (`other =
//! "deny"`); workload `n` names no proxy.
//!
//! Locals are declared cgroup, netns, servers, agent, so they drop in the
//! reverse order.

use std::{
    io::Write,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, Probe,
    fake_provider::{self, FakeProvider, Flavor},
    probe::{confine, describe},
    proxy::Proxy,
    require_root, toml_str,
};
use serde_json::Value;

const OPENAI: &str = "10.78.0.1";
const ANTHROPIC: &str = "10.78.0.2";
const CORP: &str = "10.78.0.9:3128";
const CORP6: &str = "[fd00:78::9]:3128";
const UNNAMED: &str = "10.78.0.11:3128";
const SOCKS_UNNAMED: &str = "10.78.0.12:1080";
const SOCKS_NAMED: &str = "10.78.0.13:1080";
/// ETIMEDOUT: what a client of a denied (aborted) connection reads.
const ETIMEDOUT: i64 = 110;

fn policy(cg: &CgroupGuard, mode: &str) -> String {
    format!(
        r#"cgroup = {}
mode = "{mode}"

[resolver]
servers = ["127.0.0.1:9"]

[[proxies]]
name = "corp"
cidrs = ["10.78.0.9/32", "fd00:78::9/128"]
ports = [3128]

[[proxies]]
name = "socks"
cidrs = ["10.78.0.13/32"]
ports = [1080]

[[workloads]]
name = "w"
cgroup = "w"
allow = ["anthropic", "10.78.0.11/32", "10.78.0.12/32"]
deny = ["openai"]
proxies = ["corp", "socks"]
other = "deny"

[[workloads]]
name = "n"
cgroup = "n"
allow = ["anthropic"]
other = "allow"
"#,
        toml_str(&cg.path().display().to_string())
    )
}

/// The namespace with every address of the module comment on `lo`.
fn world() -> NetnsGuard {
    let ns = NetnsGuard::new();
    for a in [
        OPENAI,
        ANTHROPIC,
        "10.78.0.9",
        "10.78.0.11",
        "10.78.0.12",
        "10.78.0.13",
    ] {
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    ns.ip(&["-6", "addr", "add", "fd00:78::9/128", "dev", "lo", "nodad"]);
    ns
}

/// The proxies' host table: the fake providers' names.
const HOSTS: &[(&str, &str)] = &[("api.openai.com", OPENAI), ("api.anthropic.com", ANTHROPIC)];

struct Providers {
    openai: FakeProvider,
    anthropic: FakeProvider,
}

fn providers(ns: &NetnsGuard) -> Providers {
    Providers {
        openai: fake_provider::start(ns, &format!("{OPENAI}:443"), Flavor::OpenAi),
        anthropic: fake_provider::start(ns, &format!("{ANTHROPIC}:443"), Flavor::Anthropic),
    }
}

/// How a curl reaches the provider.
enum Via<'a> {
    /// `--proxy URL`
    Flag(&'a str),
    /// `HTTPS_PROXY=URL` in its environment.
    Env(&'a str),
    /// `--socks5-hostname ADDR`
    Socks(&'a str),
}

struct Curl {
    code: i32,
    http: String,
    stderr: String,
    took: Duration,
}

/// One small API call to `server` from `cgroup`, through `via`.
fn call(server: &FakeProvider, cgroup: &Path, ns: &NetnsGuard, via: Via) -> Curl {
    let (path, body) = match server.flavor() {
        Flavor::OpenAi => (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        Flavor::Anthropic => (
            "/v1/messages",
            r#"{"model":"claude-3-5-haiku-latest","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        Flavor::Gemini => (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            r#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"maxOutputTokens":3}}"#,
        ),
    };
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg("--cacert")
    .arg(server.ca_file())
    .args([
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
    ]);
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    match via {
        Via::Flag(url) => {
            // (--proxy-insecure: an https:// proxy's certificate.)
            cmd.args(["--proxy", url, "--proxy-insecure"]);
        }
        Via::Env(url) => {
            cmd.env("HTTPS_PROXY", url);
        }
        Via::Socks(addr) => {
            cmd.args(["--socks5-hostname", addr]);
        }
    }
    cmd.arg(server.url(path));
    confine(&mut cmd, cgroup, ns);
    let started = Instant::now();
    let out = cmd.output().expect("cannot run curl");
    Curl {
        code: out.status.code().unwrap_or(-1),
        http: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// A raw client (python3) in `cgroup`: connects to `addr`, sends `first`
/// (both parts come on its stdin: a 64 KiB argument is too long),
/// then (after 200 ms, as a segment of its own: TCP_NODELAY) `second`, and
/// reads. Gives {"reply": text} or {"errno": n, "at": "connect"|"read"}.
const RAW: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
host = host.strip("[]")
data = sys.stdin.buffer.read()
first, second = data[:int(sys.argv[2])], data[int(sys.argv[2]):]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
try:
    s.connect((host, int(port)))
except OSError as e:
    print(json.dumps({"errno": e.errno, "at": "connect"})); sys.exit(0)
t = time.monotonic()
try:
    s.sendall(first)
    if second:
        time.sleep(0.2)
        s.sendall(second)
    s.settimeout(5)
    data = s.recv(200)
    print(json.dumps({"reply": data.decode("latin-1"), "ms": int((time.monotonic() - t) * 1000)}))
except OSError as e:
    # TimeoutError is both socket.timeout (errno None) and ETIMEDOUT.
    print(json.dumps({"errno": e.errno or "timeout", "at": "read", "ms": int((time.monotonic() - t) * 1000)}))
"#;

fn raw(cgroup: &Path, ns: &NetnsGuard, addr: &str, first: &[u8], second: &[u8]) -> Value {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", RAW, addr, &first.len().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    confine(&mut cmd, cgroup, ns);
    let mut child = cmd.spawn().expect("cannot run python3");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(first)
        .and_then(|()| input.write_all(second))
        .expect("write to python3");
    drop(input);
    let out = child.wait_with_output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "raw client: {e}: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn counter(agent: &Agent, result: &str, at_least: f64) -> f64 {
    agent
        .wait_for_metric(
            "llm_egress_proxy_connect_total",
            &[("result", result)],
            at_least,
            Duration::from_secs(5),
        )
        .unwrap_or(0.0)
}

fn audit(agent: &Agent, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_for_audit(f, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no audit record: {what}\n{}", agent.context()))
}

#[test]
fn a_connect_to_a_denied_provider_fails_fast_and_an_allowed_one_works_end_to_end() {
    require_root();
    let cg = CgroupGuard::new("hproxy");
    let w = cg.child("w");
    let ns = world();
    let p = providers(&ns);
    let corp = Proxy::connect(&ns, CORP, HOSTS);
    let agent = Agent::start(&policy(&cg, "enforce"));

    // Allowed: through the named proxy, with HTTPS_PROXY as SDKs read it.
    let ok = call(&p.anthropic, &w, &ns, Via::Env(&corp.url()));
    assert!(
        ok.code == 0 && ok.http == "200",
        "anthropic through the proxy (HTTPS_PROXY): curl exit {} http {:?}: {}\n{}",
        ok.code,
        ok.http,
        ok.stderr,
        agent.context()
    );
    assert_eq!(corp.tunnels(), ["api.anthropic.com:443"]);

    // Denied: the CONNECT request never reaches the proxy.
    let bad = call(&p.openai, &w, &ns, Via::Flag(&corp.url()));
    eprintln!(
        "denied CONNECT: curl exit {} after {:?}: {}",
        bad.code,
        bad.took,
        bad.stderr.trim()
    );
    assert!(
        bad.code != 0,
        "openai through the proxy must fail, it gave http {:?}\n{}",
        bad.http,
        agent.context()
    );
    assert!(
        bad.took < Duration::from_secs(1),
        "the denied CONNECT must fail within a second, it took {:?} (curl exit {}: {})",
        bad.took,
        bad.code,
        bad.stderr
    );
    assert_eq!(
        corp.tunnels(),
        ["api.anthropic.com:443"],
        "the proxy must never have seen the denied CONNECT"
    );

    let deny = audit(&agent, "http_connect deny", |e| {
        e["hook"] == "http_connect" && e["verdict"] == "deny"
    });
    assert_eq!(deny["server_name"], "api.openai.com");
    assert_eq!(deny["target_port"], 443);
    assert_eq!(deny["provider"], "openai");
    assert_eq!(deny["workload"], "w");
    assert_eq!(deny["dst_addr"], "10.78.0.9");
    assert_eq!(deny["dst_port"], 3128);
    let allow = audit(&agent, "http_connect allow", |e| {
        e["hook"] == "http_connect" && e["verdict"] == "allow"
    });
    assert_eq!(allow["server_name"], "api.anthropic.com");
    // The ClientHello sent through the tunnel is judged too, on the
    // CONNECT's port (443), not the proxy's.
    let inner = audit(&agent, "sni_tunnel allow", |e| e["hook"] == "sni_tunnel");
    assert_eq!(inner["server_name"], "api.anthropic.com");
    assert_eq!(inner["verdict"], "allow");
    assert_eq!(inner["target_port"], 443);
    assert!(counter(&agent, "deny", 1.0) >= 1.0);
    assert!(counter(&agent, "allow", 1.0) >= 1.0);
}

#[test]
fn a_workload_not_allowed_to_use_the_proxy_gets_eperm_at_connect() {
    require_root();
    let cg = CgroupGuard::new("hproxy-n");
    let n = cg.child("n");
    let ns = world();
    let p = providers(&ns);
    let corp = Proxy::connect(&ns, CORP, HOSTS);
    let agent = Agent::start(&policy(&cg, "enforce"));

    let probe = Probe::new(env!("CARGO_BIN_EXE_egress-probe"));
    let r = probe.connect(&n, &ns, CORP);
    assert_eq!(
        r,
        Err(libc::EPERM),
        "connect to a proxy the workload may not use: {}\n{}",
        describe(&r),
        agent.context()
    );
    let c = call(&p.anthropic, &n, &ns, Via::Flag(&corp.url()));
    assert_eq!(
        c.code, 7,
        "curl must fail to connect to the proxy: {}",
        c.stderr
    );
    assert!(corp.tunnels().is_empty());
    let deny = audit(&agent, "connect deny to the proxy", |e| {
        e["hook"] == "connect4" && e["verdict"] == "deny" && e["dst_port"] == 3128
    });
    assert_eq!(deny["workload"], "n");
    assert_eq!(deny["reason"], "workload_cidr");
}

#[test]
fn a_connect_through_a_proxy_the_policy_does_not_name_is_still_judged() {
    require_root();
    let cg = CgroupGuard::new("hproxy-u");
    let w = cg.child("w");
    let ns = world();
    let p = providers(&ns);
    let own = Proxy::connect(&ns, UNNAMED, HOSTS);
    let agent = Agent::start(&policy(&cg, "enforce"));

    let ok = call(&p.anthropic, &w, &ns, Via::Flag(&own.url()));
    assert!(
        ok.code == 0 && ok.http == "200",
        "anthropic through an unnamed proxy: curl exit {}: {}",
        ok.code,
        ok.stderr
    );
    let bad = call(&p.openai, &w, &ns, Via::Flag(&own.url()));
    assert!(
        bad.code != 0 && bad.took < Duration::from_secs(1),
        "openai through an unnamed proxy must fail fast: exit {} after {:?}: {}",
        bad.code,
        bad.took,
        bad.stderr
    );
    assert_eq!(own.tunnels(), ["api.anthropic.com:443"]);
    let deny = audit(&agent, "http_connect deny", |e| {
        e["hook"] == "http_connect" && e["verdict"] == "deny"
    });
    assert_eq!(deny["dst_addr"], "10.78.0.11");
    assert_eq!(deny["server_name"], "api.openai.com");
}

#[test]
fn hostile_request_lines_get_a_verdict_and_a_counter_each() {
    require_root();
    let cg = CgroupGuard::new("hproxy-bad");
    let w = cg.child("w");
    let ns = world();
    let _p = providers(&ns);
    let corp = Proxy::connect(&ns, CORP, HOSTS);
    let own = Proxy::connect(&ns, UNNAMED, HOSTS);
    let agent = Agent::start(&policy(&cg, "enforce"));
    let aborted = |v: &Value, what: &str| {
        assert!(
            v["errno"] == ETIMEDOUT && v["ms"].as_u64().is_some_and(|ms| ms < 1000),
            "{what}: the connection must be stopped (ETIMEDOUT) within a second, got {v}\n{}",
            agent.context()
        );
    };
    let answered = |v: &Value, status: &str, what: &str| {
        let reply = v["reply"].as_str().unwrap_or_default();
        assert!(
            reply.starts_with(status),
            "{what}: expected the proxy's {status:?}, got {v}\n{}",
            agent.context()
        );
    };

    // A 64 KiB host: no name the kernel reads; to a named proxy, judged by
    // failure_mode ("closed": stopped).
    let long = format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", "a".repeat(64 * 1024));
    aborted(
        &raw(&w, &ns, CORP, long.as_bytes(), b""),
        "64 KiB CONNECT line",
    );
    assert!(counter(&agent, "malformed", 1.0) >= 1.0);
    let r = audit(&agent, "proxy_unreadable deny", |e| {
        e["hook"] == "proxy_unreadable"
            && e["payload_start"]
                .as_str()
                .is_some_and(|s| s.starts_with("CONNECT aaaa"))
    });
    assert_eq!(r["verdict"], "deny");
    assert_eq!(r["reason"], "proxy_unreadable");

    // The request line cut in two segments: the first has no host.
    let split = raw(
        &w,
        &ns,
        CORP,
        b"CONN",
        b"ECT api.anthropic.com:443 HTTP/1.1\r\n\r\n",
    );
    aborted(&split, "CONNECT split across segments (named proxy)");
    assert!(counter(&agent, "split", 1.0) >= 1.0);
    // The same to a proxy the policy does not name: counted, and the
    // address verdict stands (the documented limit).
    let split = raw(
        &w,
        &ns,
        UNNAMED,
        b"CONN",
        b"ECT api.openai.com:443 HTTP/1.1\r\n\r\n",
    );
    answered(&split, "HTTP/1.1 200", "CONNECT split (unnamed proxy)");
    assert!(counter(&agent, "split", 2.0) >= 2.0);
    assert_eq!(own.tunnels(), ["api.openai.com:443"]);

    // Lower-case method: read like CONNECT (a proxy may accept it).
    aborted(
        &raw(
            &w,
            &ns,
            CORP,
            b"connect API.OpenAI.com:443 HTTP/1.1\r\n\r\n",
            b"",
        ),
        "lower-case connect to a denied provider",
    );
    audit(&agent, "lower-case connect deny", |e| {
        e["hook"] == "http_connect" && e["server_name"] == "API.OpenAI.com"
    });
    answered(
        &raw(
            &w,
            &ns,
            CORP,
            b"connect api.anthropic.com:443 HTTP/1.1\r\n\r\n",
            b"",
        ),
        "HTTP/1.1 200",
        "lower-case connect to an allowed provider",
    );

    // Absolute-form and odd bytes: malformed, stopped at a named proxy.
    aborted(
        &raw(
            &w,
            &ns,
            CORP,
            b"CONNECT http://api.anthropic.com:443 HTTP/1.1\r\n\r\n",
            b"",
        ),
        "absolute-form CONNECT",
    );
    aborted(
        &raw(
            &w,
            &ns,
            CORP,
            b"CONNECT api.anth\xffropic.com:443 HTTP/1.1\r\n\r\n",
            b"",
        ),
        "a host with a 0xff byte",
    );
    assert!(counter(&agent, "malformed", 3.0) >= 3.0);

    // An IPv6 literal: no name to judge; the tunnel goes on (the proxy
    // finds nothing listening there: 502).
    answered(
        &raw(
            &w,
            &ns,
            CORP,
            b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
            b"",
        ),
        "HTTP/1.1 502",
        "IPv6 literal",
    );
    assert!(counter(&agent, "ip_literal", 1.0) >= 1.0);

    // A plain http:// request to the proxy: not a tunnel, passed.
    answered(
        &raw(
            &w,
            &ns,
            CORP,
            b"GET http://example.test/ HTTP/1.1\r\n\r\n",
            b"",
        ),
        "HTTP/1.1 400",
        "plain http request",
    );
    assert!(counter(&agent, "plain_http", 1.0) >= 1.0);
    assert!(counter(&agent, "unreadable", 4.0) >= 4.0);
    // Nothing the kernel could not read reached the named proxy as a
    // tunnel; the lower-case allowed one did.
    assert_eq!(corp.tunnels(), ["api.anthropic.com:443"]);
}

#[test]
fn audit_mode_records_a_denied_connect_and_does_not_stop_it() {
    require_root();
    let cg = CgroupGuard::new("hproxy-audit");
    let w = cg.child("w");
    let ns = world();
    let p = providers(&ns);
    let corp = Proxy::connect(&ns, CORP, HOSTS);
    let agent = Agent::start(&policy(&cg, "audit"));

    let r = call(&p.openai, &w, &ns, Via::Flag(&corp.url()));
    assert!(
        r.code == 0 && r.http == "200",
        "audit mode must not stop the CONNECT: curl exit {}: {}\n{}",
        r.code,
        r.stderr,
        agent.context()
    );
    assert_eq!(corp.tunnels(), ["api.openai.com:443"]);
    let a = audit(&agent, "http_connect audit", |e| {
        e["hook"] == "http_connect" && e["server_name"] == "api.openai.com"
    });
    assert_eq!(a["verdict"], "audit");
    assert_eq!(a["provider"], "openai");
    assert!(counter(&agent, "audit", 1.0) >= 1.0);
}

/// The documented limit: a proxy that does not speak HTTP CONNECT in
/// plaintext (here SOCKS5, and TLS to the proxy) tunnels unseen when the
/// policy does not name it; naming it makes its first payload unreadable,
/// which `failure_mode = "closed"` stops.
#[test]
fn socks_through_an_unnamed_proxy_is_not_seen_and_through_a_named_one_is_stopped() {
    require_root();
    let cg = CgroupGuard::new("hproxy-socks");
    let w = cg.child("w");
    let ns = world();
    let p = providers(&ns);
    let unnamed = Proxy::socks5(&ns, SOCKS_UNNAMED, HOSTS);
    let named = Proxy::socks5(&ns, SOCKS_NAMED, HOSTS);
    let corp = Proxy::connect(&ns, CORP, HOSTS);
    let agent = Agent::start(&policy(&cg, "enforce"));

    let through = call(&p.openai, &w, &ns, Via::Socks(SOCKS_UNNAMED));
    assert!(
        through.code == 0 && through.http == "200",
        "the limit: a denied provider through an unnamed SOCKS proxy is not seen: \
         curl exit {}: {}",
        through.code,
        through.stderr
    );
    assert_eq!(unnamed.tunnels(), ["api.openai.com:443"]);

    let stopped = call(&p.anthropic, &w, &ns, Via::Socks(SOCKS_NAMED));
    assert!(
        stopped.code != 0 && stopped.took < Duration::from_secs(1),
        "SOCKS to a named proxy must be stopped fast: exit {} after {:?}: {}",
        stopped.code,
        stopped.took,
        stopped.stderr
    );
    assert!(named.tunnels().is_empty());
    let r = audit(&agent, "proxy_unreadable deny (SOCKS)", |e| {
        e["hook"] == "proxy_unreadable" && e["dst_port"] == 1080
    });
    assert_eq!(r["verdict"], "deny");
    assert!(
        r["payload_start"]
            .as_str()
            .is_some_and(|s| s.starts_with("\\x05")),
        "the SOCKS greeting: {r}"
    );

    // TLS to the named proxy itself (HTTPS_PROXY=https://…): the first
    // payload is a ClientHello for the proxy, not a CONNECT request.
    let tls = call(&p.anthropic, &w, &ns, Via::Flag(&format!("https://{CORP}")));
    assert!(
        tls.code != 0 && tls.took < Duration::from_secs(1),
        "TLS to a named proxy must be stopped fast: exit {} after {:?}: {}",
        tls.code,
        tls.took,
        tls.stderr
    );
    assert!(corp.tunnels().is_empty());
    let r = audit(&agent, "proxy_unreadable deny (TLS)", |e| {
        e["hook"] == "proxy_unreadable" && e["dst_port"] == 3128
    });
    assert_eq!(r["verdict"], "deny");
    assert!(
        r["payload_start"]
            .as_str()
            .is_some_and(|s| s.starts_with("\\x16\\x03")),
        "a TLS record: {r}"
    );
}

/// The named proxy on IPv6: sock_ops marks the socket from its IPv6 address
/// (an unreadable first payload is stopped fast), and a CONNECT to a denied
/// provider is stopped as on IPv4.
#[test]
fn a_named_proxy_on_ipv6_is_judged_like_on_ipv4() {
    require_root();
    let cg = CgroupGuard::new("hproxy-v6");
    let w = cg.child("w");
    let ns = world();
    let p = providers(&ns);
    let corp = Proxy::connect(&ns, CORP6, HOSTS);
    let agent = Agent::start(&policy(&cg, "enforce"));

    let ok = call(&p.anthropic, &w, &ns, Via::Flag(&corp.url()));
    assert!(
        ok.code == 0 && ok.http == "200",
        "anthropic through the IPv6 proxy: curl exit {}: {}\n{}",
        ok.code,
        ok.stderr,
        agent.context()
    );
    let bad = call(&p.openai, &w, &ns, Via::Flag(&corp.url()));
    assert!(
        bad.code != 0 && bad.took < Duration::from_secs(1),
        "openai through the IPv6 proxy must fail fast: exit {} after {:?}: {}",
        bad.code,
        bad.took,
        bad.stderr
    );
    let v = raw(&w, &ns, CORP6, &[5, 1, 0], b"");
    assert!(
        v["errno"] == ETIMEDOUT && v["ms"].as_u64().is_some_and(|ms| ms < 1000),
        "a SOCKS greeting to the IPv6 named proxy must be stopped fast: {v}\n{}",
        agent.context()
    );
    assert_eq!(corp.tunnels(), ["api.anthropic.com:443"]);
    let deny = audit(&agent, "http_connect deny (IPv6)", |e| {
        e["hook"] == "http_connect" && e["verdict"] == "deny"
    });
    assert_eq!(deny["dst_addr"], "fd00:78::9");
    audit(&agent, "proxy_unreadable (IPv6)", |e| {
        e["hook"] == "proxy_unreadable" && e["dst_addr"] == "fd00:78::9"
    });
}
