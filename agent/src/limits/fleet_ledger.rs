//! The fleet ledger on Redis (docs/fleet.md): the connection (AUTH, TLS)
//! and the one atomic Lua script every lease operation runs, on a task of
//! its own. The budget keeper (`crate::limits::fleet`) sends it [`Op`]s and reads
//! [`Reply`]s from channels; it never waits for Redis, so nothing on the
//! connect path (or the agent's main loop) waits on the network.
//!
//! The ledger of one workload × provider pair is one Redis hash (and so is
//! the dollar budget of one workload, in micro-dollars, whose two windows
//! are a day and 30 days: `Op::windows_ms`):
//!
//! - `m`, `d`: tokens left in the minute and day windows (rolling windows
//!   like the host budgets: refilled at `limit` per window length, up to
//!   `limit`, by the server's own clock, `TIME`), `ts`: when last refilled;
//! - per agent `u:ID` (its cumulative tokens spent, as it last reported
//!   them) and `g:ID` (cumulative tokens granted to it).
//!
//! An op says "I have spent `used` in total; I want to hold `target`
//! unspent". The script charges the windows for what the agent spent
//! beyond what it was granted (reconcile), then grants up to the
//! difference from what the windows hold (reserve), or takes back what it
//! holds beyond `target` (return). Everything is a function of the last
//! `used` and `target`, so a repeated op (a retry after a timeout) changes
//! nothing the first did not, and `used` only grows in the ledger (a
//! restarted agent that saved less adopts the ledger's figure): usage
//! records are idempotent. The first op of a restarted agent also counts
//! what it was granted before as used (`forfeit`): a crash may have come
//! after spending that was never reported.
//!
//! The first op of an agent on a hash (a new pair, or one the server lost)
//! charges what the agent spent in each of its windows (`recent_*`):
//! after a Redis restart that lost the data the windows are seeded with the
//! fleet's recent spending, one agent at a time, instead of starting full.
//! `{prefix}:epoch` (a random word set once) tells the agents that the
//! server lost its data; `{prefix}:agents` (agents by last op time) gives
//! the number of live agents.

use std::{path::Path, sync::Arc, time::Duration};

use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, Script, aio::MultiplexedConnection,
};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::policy::fleet::{FleetConfig, Password, Server};

/// The windows of a token budget (a minute, a day) and of a dollar budget
/// (a day, 30 days), in ms.
pub const TOKEN_WINDOWS_MS: [u64; 2] = [60_000, 86_400_000];
pub const USD_WINDOWS_MS: [u64; 2] = [86_400_000, 30 * 86_400_000];

/// An agent that did not run an op for this long is no longer counted live.
const AGENT_LIVE_MS: u64 = 120_000;

/// The lease script. KEYS: the pair's hash, the agents' sorted set, the
/// epoch key. ARGV: agent id, used, target, minute limit, day limit (0:
/// none), recent minute, recent day, key TTL (ms), a new epoch word, the
/// agents' live window (ms), "1" when what the agent was granted before
/// counts as used (its first op after a restart), the short and the long
/// window's length (ms). Returns granted, used, minute left, day left
/// (floored), 1 if the hash was new, live agents, epoch.
const LEASE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local used = tonumber(ARGV[2])
local target = tonumber(ARGV[3])
local lm = tonumber(ARGV[4])
local ld = tonumber(ARGV[5])
local v = redis.call('HMGET', KEYS[1], 'm', 'd', 'ts', 'u:' .. id, 'g:' .. id)
local fresh = 0
local m = tonumber(v[1]) or lm
local d = tonumber(v[2]) or ld
local ts = tonumber(v[3])
if ts == nil then
  fresh = 1
  ts = now
end
local el = math.max(0, now - ts)
m = math.min(lm, m + lm * el / tonumber(ARGV[12]))
d = math.min(ld, d + ld * el / tonumber(ARGV[13]))
local u = tonumber(v[4])
local g = tonumber(v[5])
if u == nil then
  m = m - tonumber(ARGV[6])
  d = d - tonumber(ARGV[7])
  u = used
  g = used
end
if used > u then u = used end
if ARGV[11] == '1' and g > u then u = g end
if u > g then
  m = m - (u - g)
  d = d - (u - g)
  g = u
end
local want = target - (g - u)
if want > 0 then
  local avail = want
  if lm > 0 then avail = math.min(avail, m) end
  if ld > 0 then avail = math.min(avail, d) end
  local k = math.floor(math.max(0, avail))
  g = g + k
  m = m - k
  d = d - k
elseif want < 0 then
  g = g + want
  m = math.min(lm, m - want)
  d = math.min(ld, d - want)
end
redis.call('HSET', KEYS[1], 'm', tostring(m), 'd', tostring(d), 'ts', now, 'u:' .. id, u, 'g:' .. id, g)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[10]))
local agents = redis.call('ZCARD', KEYS[2])
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[9]
  redis.call('SET', KEYS[3], epoch)
end
return {g, u, math.floor(m), math.floor(d), fresh, agents, epoch}
"#;

/// One lease operation of one pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub bucket: u64,
    /// The pair's hash key (`Ledger::pair_key`).
    pub key: String,
    pub used: u64,
    pub target: u64,
    /// Limits of the short and the long window (0: none): tokens of the
    /// minute and the day, or micro-dollars of the day and 30 days.
    pub limit_minute: u64,
    pub limit_day: u64,
    /// The windows' lengths in ms ([`TOKEN_WINDOWS_MS`], [`USD_WINDOWS_MS`]).
    pub windows_ms: [u64; 2],
    pub recent_minute: u64,
    pub recent_day: u64,
    /// Everything granted to this agent before counts as used: its first
    /// op after a restart (it may have spent its lease unreported before
    /// a crash).
    pub forfeit: bool,
}

/// What the ledger answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub granted: u64,
    pub used: u64,
    pub left_minute: i64,
    pub left_day: i64,
    /// The hash did not exist: a new pair, one idle past its TTL, or data
    /// the server lost.
    pub fresh: bool,
    pub agents: u64,
    pub epoch: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Done {
        bucket: u64,
        answer: Answer,
    },
    /// Unreachable, refused, or slower than the timeout.
    Failed {
        bucket: u64,
        error: String,
    },
    /// Whether the server answers (sent when that changes).
    Health {
        ok: bool,
    },
}

/// The connection settings and the script.
#[derive(Clone)]
pub struct Ledger {
    config: FleetConfig,
    agent: String,
    script: Script,
}

impl Ledger {
    pub fn new(config: FleetConfig, agent: String) -> Self {
        Self {
            config,
            agent,
            script: Script::new(LEASE_LUA),
        }
    }

    /// The longest wait for one operation (`[fleet] timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// The hash of a pair: `{prefix}:tokens:{identity}:{provider}`.
    pub fn pair_key(prefix: &str, identity: &str, provider: &str) -> String {
        format!("{prefix}:tokens:{identity}:{provider}")
    }

    /// The hash of a workload's dollar budget: `{prefix}:usd:{identity}`.
    pub fn usd_key(prefix: &str, identity: &str) -> String {
        format!("{prefix}:usd:{identity}")
    }

    /// Connects to the first server that answers (with AUTH and TLS as
    /// configured), within the timeout each.
    pub async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let password = match &self.config.password {
            None => None,
            Some(Password::Inline(p)) => Some(p.clone()),
            Some(Password::File(path)) => Some(read_secret(path)?),
        };
        let ca = match &self.config.tls_ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        let mut last = String::from("no server");
        for server in &self.config.servers {
            match self
                .connect_one(server, password.as_deref(), ca.as_deref())
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => last = format!("{}:{}: {e}", server.host, server.port),
            }
        }
        Err(last)
    }

    async fn connect_one(
        &self,
        s: &Server,
        password: Option<&str>,
        ca: Option<&[u8]>,
    ) -> Result<MultiplexedConnection, String> {
        let scheme = if s.tls { "rediss" } else { "redis" };
        let host = if s.host.contains(':') {
            format!("[{}]", s.host)
        } else {
            s.host.clone()
        };
        let info = format!("{scheme}://{host}:{}/{}", s.port, s.db)
            .into_connection_info()
            .map_err(|e| e.to_string())?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &self.config.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = password {
            settings = settings.set_password(p);
        }
        let info = info.set_redis_settings(settings);
        let client = if s.tls {
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: ca.map(<[u8]>::to_vec),
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(|e| e.to_string())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs one op (the script, loaded on first use).
    pub async fn run(&self, conn: &mut MultiplexedConnection, op: &Op) -> Result<Answer, String> {
        let ttl_ms = if op.limit_day > 0 {
            2 * op.windows_ms[1]
        } else {
            2 * op.windows_ms[0]
        };
        let prefix = &self.config.key_prefix;
        let mut invocation = self.script.key(&op.key);
        invocation
            .key(format!("{prefix}:agents"))
            .key(format!("{prefix}:epoch"))
            .arg(&self.agent)
            .arg(op.used)
            .arg(op.target)
            .arg(op.limit_minute)
            .arg(op.limit_day)
            .arg(op.recent_minute)
            .arg(op.recent_day)
            .arg(ttl_ms)
            // A word of its own for each op: whoever creates the epoch after
            // a loss, it differs from the one before.
            .arg(format!("{:016x}", random_u64()))
            .arg(AGENT_LIVE_MS)
            .arg(if op.forfeit { "1" } else { "0" })
            .arg(op.windows_ms[0].max(1))
            .arg(op.windows_ms[1].max(1));
        let fut = invocation.invoke_async::<(i64, i64, i64, i64, i64, i64, String)>(conn);
        let (g, u, m, d, fresh, agents, epoch) =
            match tokio::time::timeout(self.config.timeout, fut).await {
                Ok(r) => r.map_err(|e| e.to_string())?,
                Err(_) => return Err(format!("no answer within {:?}", self.config.timeout)),
            };
        Ok(Answer {
            granted: g.max(0) as u64,
            used: u.max(0) as u64,
            left_minute: m,
            left_day: d,
            fresh: fresh == 1,
            agents: agents.max(0) as u64,
            epoch,
        })
    }
}

/// How often an idle ledger task checks the server (PING), so that
/// `llm_egress_fleet_degraded` and /readyz follow the server even when no
/// lease is due.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The ledger task: runs the ops it receives (all those waiting, at once
/// on the multiplexed connection), answers each, PINGs the server when
/// idle, and reconnects after a failure at most once a second. `answered`
/// is notified after each batch of replies (the agent reads them at once,
/// not at its next tick). Ends when `ops` closes.
pub async fn serve(
    ledger: Ledger,
    mut ops: mpsc::Receiver<Op>,
    replies: mpsc::Sender<Reply>,
    answered: Arc<Notify>,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut next_try = tokio::time::Instant::now();
    // What the agent was last told of the server: None before anything.
    let mut told: Option<bool> = None;
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let batch = tokio::select! {
            op = ops.recv() => match op {
                None => return,
                Some(first) => {
                    let mut batch = vec![first];
                    while let Ok(op) = ops.try_recv() {
                        batch.push(op);
                    }
                    batch
                }
            },
            _ = probe.tick() => Vec::new(),
        };
        let mut error = None;
        if conn.is_none() && tokio::time::Instant::now() >= next_try {
            // The handshake (HELLO, AUTH) too is bounded.
            let limit = ledger.config.timeout * 2;
            match tokio::time::timeout(limit, ledger.connect()).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => error = Some(e),
                Err(_) => error = Some(format!("no connection within {limit:?}")),
            }
            if conn.is_none() {
                next_try = tokio::time::Instant::now() + Duration::from_secs(1);
            }
        }
        let mut ok = conn.is_some();
        if batch.is_empty() {
            if let Some(c) = &mut conn {
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(c);
                match tokio::time::timeout(ledger.config.timeout, ping).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => (ok, error) = (false, Some(e.to_string())),
                    Err(_) => (ok, error) = (false, Some("PING unanswered".into())),
                }
            }
        } else if let Some(c) = conn.clone() {
            let mut set = tokio::task::JoinSet::new();
            for op in batch {
                let (ledger, mut c) = (ledger.clone(), c.clone());
                set.spawn(async move {
                    let r = ledger.run(&mut c, &op).await;
                    (op.bucket, r)
                });
            }
            while let Some(done) = set.join_next().await {
                let Ok((bucket, r)) = done else { continue };
                let reply = match r {
                    Ok(answer) => Reply::Done { bucket, answer },
                    Err(e) => {
                        (ok, error) = (false, Some(e.clone()));
                        Reply::Failed { bucket, error: e }
                    }
                };
                let _ = replies.send(reply).await;
            }
        } else {
            let e = error.clone().unwrap_or_else(|| "not connected".into());
            for op in batch {
                let reply = Reply::Failed {
                    bucket: op.bucket,
                    error: e.clone(),
                };
                let _ = replies.send(reply).await;
            }
        }
        if !ok && conn.take().is_some() {
            next_try = tokio::time::Instant::now() + Duration::from_secs(1);
        }
        if told != Some(ok) {
            match (&error, ok) {
                (Some(e), false) => warn!(error = %e, "fleet ledger unreachable"),
                (None, false) => warn!("fleet ledger unreachable"),
                (_, true) => info!("fleet ledger reachable"),
            }
            told = Some(ok);
            let _ = replies.send(Reply::Health { ok }).await;
        }
        answered.notify_one();
    }
}

/// A secret file: its first line, trimmed.
fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(line)
}

/// 64 random bits from the kernel.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Unreachable on Linux ≥ 3.17; the time is unique enough for an id.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_ne_bytes(b)
}
