//! A real Prometheus server (Debian's `prometheus`) for tests: scrapes one
//! target on loopback every second, keeps its data in a temp dir, answers
//! PromQL on a free loopback port, and is killed on drop.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{TempDir, agent::free_loopback_port, http, wait_until};

pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port, path /metrics).
    pub fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("llm-egress-test-prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: llm-egress\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).ok();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log.map(Stdio::from).unwrap_or_else(Stdio::null))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus (Debian package `prometheus`, installed by `cargo xtask setup`): {e}"));
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            http::get(p.addr, "/-/ready", Duration::from_secs(1))
                .ok()
                .filter(|r| r.status == 200)
        });
        assert!(
            ready.is_some(),
            "prometheus did not become ready on {addr}: {}",
            p.log()
        );
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant PromQL query; returns the `result` array, or the
    /// error Prometheus gave.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let r = http::get(self.addr, &path, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))?;
        if v["status"] != "success" {
            return Err(format!("query {promql:?} failed: {v}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a single-series query, polled until `pred` holds.
    pub fn wait_value(
        &self,
        promql: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Option<f64> {
        wait_until(timeout, Duration::from_millis(500), || {
            let r = self.query(promql).ok()?;
            let v: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
            pred(v).then_some(v)
        })
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
