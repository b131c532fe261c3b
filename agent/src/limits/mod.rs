//! Limits while the agent runs: the token and dollar budgets and the
//! keeper that charges them and tells the kernel which pairs are spent.

pub mod budget;
pub mod fleet;
pub mod fleet_ledger;
pub mod fleet_rate;
pub mod limiter;
pub mod usd_budget;
