//! `llm-egress fleet-bench`: how many lease operations a second one Redis
//! serves (docs/fleet.md, "Capacity"). Simulated agents, each with its own
//! connection and agent id, run the ledger's lease script
//! (`crate::limits::fleet_ledger`, the very code the agent runs) in a loop against
//! one shared day budget: each op reports what the agent spent and asks
//! for a new lease, as a real agent does when its lease runs low. Prints
//! one JSON object: ops per second, latency percentiles, and whether the
//! tokens the agents were granted stayed within the budget.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::{
    limits::fleet_ledger::{Ledger, Op},
    policy::Policy,
};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A policy file with the `[fleet]` table to use (servers, AUTH, TLS).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Simulated agents (one connection each).
    #[arg(long, default_value_t = 50)]
    pub agents: u32,
    /// Pairs (workload × provider ledgers) the agents share.
    #[arg(long, default_value_t = 10)]
    pub pairs: u32,
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// `tokens_per_day` of each pair.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub budget: u64,
    /// Tokens one lease holds.
    #[arg(long, default_value_t = 1_000)]
    pub lease: u64,
}

pub fn main(args: BenchArgs) -> ExitCode {
    let policy = match Policy::from_path(&args.config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(fleet) = policy.fleet else {
        eprintln!("{}: no [fleet] table", args.config.display());
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = format!("{:08x}", crate::limits::fleet_ledger::random_u64() as u32);
    runtime.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let mut set = tokio::task::JoinSet::new();
        for a in 0..args.agents {
            let ledger = Ledger::new(fleet.clone(), format!("bench-{run}-{a}"));
            let key_prefix = fleet.key_prefix.clone();
            let (pairs, budget, lease, run) = (args.pairs, args.budget, args.lease, run.clone());
            set.spawn(async move {
                let mut conn = ledger.connect().await?;
                let mut used = vec![0u64; pairs as usize];
                let mut granted = vec![0u64; pairs as usize];
                let mut latencies = Vec::new();
                let mut i = a as usize;
                while Instant::now() < deadline {
                    let p = i % pairs as usize;
                    i += 1;
                    // Spend what the last lease gave, then renew.
                    used[p] = used[p].max(granted[p]);
                    let op = Op {
                        bucket: p as u64,
                        key: Ledger::pair_key(&key_prefix, &format!("bench-{run}"), &p.to_string()),
                        used: used[p],
                        target: lease,
                        limit_minute: 0,
                        limit_day: budget,
                        windows_ms: crate::limits::fleet_ledger::TOKEN_WINDOWS_MS,
                        recent_minute: 0,
                        recent_day: 0,
                        forfeit: false,
                    };
                    let t = Instant::now();
                    let answer = ledger.run(&mut conn, &op).await?;
                    latencies.push(t.elapsed());
                    granted[p] = answer.granted;
                }
                Ok::<_, String>((latencies, granted.iter().sum::<u64>()))
            });
        }
        let mut latencies = Vec::new();
        let mut granted = 0u64;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((l, g))) => {
                    latencies.extend(l);
                    granted += g;
                }
                Ok(Err(e)) => {
                    eprintln!("fleet-bench: {e}");
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("fleet-bench: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        latencies.sort();
        let pct = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0)
        };
        // The budgets refill by budget/day over the run.
        let refill = args.budget as f64 * args.seconds as f64 / 86_400.0;
        let allowed = (args.budget as f64 + refill) * args.pairs as f64;
        let out = serde_json::json!({
            "agents": args.agents,
            "pairs": args.pairs,
            "seconds": args.seconds,
            "ops": latencies.len(),
            "ops_per_second": latencies.len() as f64 / args.seconds as f64,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "granted": granted,
            "budget_total": allowed.floor() as u64,
            "within_budget": (granted as f64) <= allowed,
        });
        println!("{out}");
        ExitCode::SUCCESS
    })
}
