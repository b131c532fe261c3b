//! Resolves the exact hostnames of catalog and policy providers, so that
//! their addresses can be judged as provider destinations.
//!
//! This is the agent asking DNS itself, on a period (`resolver.refresh`). It
//! is not race-free: a workload that resolves a name to an address the agent
//! has not seen yet connects as "other" traffic until the next refresh (the
//! README's limits say so). Wildcard hosts (`*.x`) cannot be resolved and are
//! skipped. A failed lookup keeps the addresses last seen for that host.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig as HickoryConfig},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
};
use tokio::task::JoinSet;
use tracing::debug;

use crate::policy::{Policy, ResolverConfig};

/// host → addresses.
pub type HostAddrs = BTreeMap<String, BTreeSet<IpAddr>>;

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    pub fn new(config: &ResolverConfig) -> Result<Self, hickory_resolver::ResolveError> {
        let builder = if config.servers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let servers: Vec<NameServerConfig> = config
                .servers
                .iter()
                .flat_map(|s| {
                    [
                        NameServerConfig::new(*s, Protocol::Udp),
                        NameServerConfig::new(*s, Protocol::Tcp),
                    ]
                })
                .collect();
            TokioResolver::builder_with_config(
                HickoryConfig::from_parts(None, vec![], servers),
                TokioConnectionProvider::default(),
            )
        };
        Ok(Self {
            inner: builder.build(),
        })
    }

    /// Resolves `hosts` concurrently. Hosts whose lookup fails keep their
    /// entry from `previous`; the second value counts the failures.
    pub async fn resolve(&self, hosts: BTreeSet<String>, previous: &HostAddrs) -> (HostAddrs, u64) {
        let mut set = JoinSet::new();
        for host in hosts {
            let r = self.inner.clone();
            set.spawn(async move {
                let result = r.lookup_ip(format!("{host}.")).await;
                (host, result)
            });
        }
        let mut out = HostAddrs::new();
        let mut failures = 0;
        while let Some(joined) = set.join_next().await {
            let Ok((host, result)) = joined else {
                failures += 1;
                continue;
            };
            match result {
                Ok(lookup) => {
                    out.insert(host, lookup.iter().collect());
                }
                Err(e) => {
                    failures += 1;
                    debug!(host = %host, error = %e, "lookup failed");
                    if let Some(old) = previous.get(&host) {
                        out.insert(host, old.clone());
                    }
                }
            }
        }
        (out, failures)
    }
}

/// The exact (non-wildcard) hosts of a policy's providers.
pub fn hosts_of(policy: &Policy) -> BTreeSet<String> {
    policy
        .providers
        .iter()
        .flat_map(|p| p.hosts.iter())
        .filter(|h| !h.starts_with("*."))
        .cloned()
        .collect()
}

/// Addresses per provider index, from the host table.
pub fn by_provider(policy: &Policy, hosts: &HostAddrs) -> BTreeMap<usize, BTreeSet<IpAddr>> {
    let mut out: BTreeMap<usize, BTreeSet<IpAddr>> = BTreeMap::new();
    for (index, provider) in policy.providers.iter().enumerate() {
        for host in &provider.hosts {
            if let Some(addrs) = hosts.get(host) {
                out.entry(index).or_default().extend(addrs.iter().copied());
            }
        }
    }
    out
}
