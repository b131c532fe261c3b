//! [`RedisServer`]: Debian's `redis-server` on a free loopback port, for
//! the fleet-budget tests (tests/tests/fleet.rs): no persistence (a kill
//! loses the data, as a restart of a cache-only Redis does), optional
//! AUTH (`requirepass`) and TLS (`tls-port`, a server certificate for
//! 127.0.0.1 signed by a test CA made with rcgen). [`RedisServer::kill`],
//! [`RedisServer::restart`], [`RedisServer::pause`] / [`RedisServer::resume`]
//! (SIGSTOP: a server that accepts and never answers) make the faults.
//! Drop kills the server and removes its directory.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{TempDir, agent::free_loopback_port, wait_until};

#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `requirepass`: AUTH with this password (the default user).
    pub password: Option<String>,
    /// Serve TLS only (`port 0`, `tls-port`).
    pub tls: bool,
}

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    opts: RedisOptions,
    paused: bool,
    dir: TempDir,
}

/// Every test server's arguments besides `--dir` and the port: no
/// configuration file (not Debian's /etc/redis/redis.conf: no pid file, log
/// or /var/lib/redis of its service), loopback only, nothing saved.
pub const SERVER_ARGS: &[&str] = &[
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
    "--protected-mode",
    "no",
];

/// The port of Debian's own `redis-server.service` (started where systemd
/// is PID 1 when setup installs the package): no test uses it.
pub const DEBIAN_REDIS_PORT: u16 = 6379;

/// A free loopback port that is not [`DEBIAN_REDIS_PORT`] (a free port
/// never is one a server listens on; 6379 is skipped even where the
/// ephemeral range would contain it, so no test ever names it).
fn test_port() -> u16 {
    loop {
        let p = free_loopback_port();
        if p != DEBIAN_REDIS_PORT {
            return p;
        }
    }
}

impl RedisServer {
    pub fn start(opts: RedisOptions) -> RedisServer {
        let dir = TempDir::new("redis");
        if opts.tls {
            write_certs(&dir);
        }
        let mut r = RedisServer {
            child: None,
            port: test_port(),
            opts,
            paused: false,
            dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cmd = Command::new("redis-server");
        cmd.args(SERVER_ARGS)
            .arg("--dir")
            .arg(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.opts.tls {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(d.join("server.pem"))
                .arg("--tls-key-file")
                .arg(d.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(d.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        if let Some(p) = &self.opts.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run redis-server (cargo xtask setup installs it): {e}")
        });
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .unwrap_or_else(|| panic!("redis-server did not listen on {addr}"));
        if !self.opts.tls {
            wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                (self.cli(&["PING"]).trim() == "PONG").then_some(())
            })
            .unwrap_or_else(|| panic!("redis-server on {addr} does not answer PING"));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `servers` entry of a `[fleet]` table.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA that signs the TLS server's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `redis-cli` against this server; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.opts.tls {
            cmd.arg("--tls").arg("--cacert").arg(self.ca_file());
        }
        if let Some(p) = &self.opts.password {
            cmd.env("REDISCLI_AUTH", p);
        }
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One field of a hash, as a number.
    pub fn hget_f64(&self, key: &str, field: &str) -> Option<f64> {
        self.cli(&["HGET", key, field]).trim().parse().ok()
    }

    /// SIGKILL: the server and all its data are gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                signal(&c, libc::SIGCONT);
                self.paused = false;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new, empty server on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP: connections are accepted by the kernel, nothing answers.
    pub fn pause(&mut self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGSTOP);
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGCONT);
            self.paused = false;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(c: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, sig) };
}

/// A test CA and a certificate for 127.0.0.1 / localhost signed by it.
fn write_certs(dir: &TempDir) {
    let ca = crate::test_ca::root("llm-egress test Redis CA");
    let (leaf, key) = crate::test_ca::sign(
        crate::test_ca::leaf_params(&["127.0.0.1", "localhost"], "localhost"),
        &ca,
    );
    let d = dir.path();
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("server.pem", leaf.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        std::fs::write(d.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// A TCP relay on a loopback port to a [`RedisServer`]: one agent reaches
/// the ledger through it, and [`Relay::cut`] partitions that agent alone
/// (open connections are shut, new ones closed at once) until
/// [`Relay::heal`].
pub struct Relay {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(to: &RedisServer) -> Relay {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("relay listener: {e}"));
        let port = listener.local_addr().unwrap().port();
        let target = SocketAddr::from(([127, 0, 0, 1], to.port()));
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for s in [&client, &server] {
                    if let Ok(s) = s.try_clone() {
                        c.lock().unwrap().push(s);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, open, conns }
    }

    /// The `servers` entry that goes through the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
