//! `[[proxies]]` and a workload's `proxies`: the forward proxies of a
//! policy, by address and ports, and which workloads may use them
//! (docs/policy.md, "Proxies"; how CONNECT requests through them are
//! judged: docs/names.md, "Proxies"). Part of the checker of `validate`:
//! errors name the key path, line and column like every other.

use super::*;

impl Checker<'_> {
    /// The `[[proxies]]` entries, in file order; an entry with an error is
    /// left out (the error is reported).
    pub(super) fn proxies(
        &mut self,
        entries: &[Spanned<ProxyFile>],
        merged: &Merged,
    ) -> Vec<Proxy> {
        let mut out = Vec::new();
        let mut names = HashMap::new();
        // CIDR → the proxy that has it.
        let mut owners: HashMap<IpNet, String> = HashMap::new();
        let provider_cidrs: HashMap<IpNet, &str> = (merged.providers.iter())
            .flat_map(|p| p.cidrs.iter().map(move |c| (*c, p.name.as_str())))
            .collect();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("proxies[{i}]");
            let f = entry.get_ref();
            let errors = self.errors.len();
            self.check(&f.name, &format!("{key}.name"), |n| provider_name(n));
            self.unique(&mut names, &f.name, &format!("{key}.name"), "proxy");
            let mut proxy = Proxy {
                name: f.name.get_ref().clone(),
                cidrs: vec![],
                ports: vec![],
            };
            if f.cidrs.is_empty() {
                let message = "a proxy needs `cidrs`: the addresses workloads connect to";
                self.error_at(entry.span(), &key, message);
            }
            for (j, c) in f.cidrs.iter().enumerate() {
                let k = format!("{key}.cidrs[{j}]");
                let Some(net) = self.check(c, &k, |s| cidr(s)) else {
                    continue;
                };
                if let Some(provider) = provider_cidrs.get(&net) {
                    let message = format!(
                        "already a CIDR of provider `{provider}`; an address is a provider's \
                         or a proxy's, not both"
                    );
                    self.error(c, &k, message);
                    continue;
                }
                match owners.get(&net) {
                    Some(other) if other != &proxy.name => {
                        let message = format!("already a CIDR of proxy `{other}`");
                        self.error(c, &k, message);
                    }
                    _ => {
                        owners.insert(net, proxy.name.clone());
                        push_new(&mut proxy.cidrs, net);
                    }
                }
            }
            match &f.ports {
                None => {
                    let message = format!(
                        "a proxy needs `ports`: the 1 to {MAX_PORTS} ports it listens on \
                         (3128 for squid)"
                    );
                    self.error_at(entry.span(), &key, message);
                }
                Some(ports) => {
                    for (j, n) in ports.get_ref().iter().enumerate() {
                        if let Some(n) = self.check(n, &format!("{key}.ports[{j}]"), |&n| port(n)) {
                            push_new(&mut proxy.ports, n);
                        }
                    }
                    if ports.get_ref().is_empty() || proxy.ports.len() > MAX_PORTS {
                        let message = format!(
                            "{} ports; a proxy lists 1 to {MAX_PORTS}",
                            proxy.ports.len()
                        );
                        self.error(ports, &format!("{key}.ports"), message);
                    }
                }
            }
            if self.errors.len() == errors {
                out.push(proxy);
            }
        }
        out
    }

    /// Each workload's `proxies`: names of `[[proxies]]` entries, as
    /// indices into `proxies`. `workloads` are the valid ones, found by
    /// name (unique when the policy has no errors).
    pub(super) fn workload_proxies(
        &mut self,
        entries: &[Spanned<WorkloadFile>],
        workloads: &mut [Workload],
        proxies: &[Proxy],
    ) {
        for (i, entry) in entries.iter().enumerate() {
            let f = entry.get_ref();
            let mut chosen = Vec::new();
            for (j, name) in f.proxies.iter().enumerate() {
                match proxies.iter().position(|p| &p.name == name.get_ref()) {
                    Some(index) => push_new(&mut chosen, index),
                    None => {
                        let known: Vec<String> =
                            proxies.iter().map(|p| format!("`{}`", p.name)).collect();
                        let message = if known.is_empty() {
                            "not a proxy: this policy has no `[[proxies]]`".to_owned()
                        } else {
                            format!(
                                "not a proxy of this policy (`[[proxies]]`: {})",
                                known.join(", ")
                            )
                        };
                        self.error(name, &format!("workloads[{i}].proxies[{j}]"), message);
                    }
                }
            }
            if let Some(w) = workloads.iter_mut().find(|w| &w.name == f.name.get_ref()) {
                w.proxies = chosen;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, ok};

    const PROXY: &str = "[[proxies]]\nname = \"corp\"\ncidrs = [\"10.9.0.5/32\"]\nports = [3128]\n";

    #[test]
    fn proxies_and_workload_proxies_parse() {
        let p = ok(&format!(
            "{PROXY}\n[[proxies]]\nname = \"lab\"\ncidrs = [\"10.8.0.0/24\", \"2001:db8::/64\"]\n\
             ports = [8080, 3128]\n\n[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\n\
             proxies = [\"lab\", \"corp\", \"lab\"]\n"
        ));
        assert_eq!(p.proxies.len(), 2);
        assert_eq!(p.proxies[0].name, "corp");
        assert_eq!(p.proxies[0].ports, [3128]);
        assert_eq!(p.proxies[1].cidrs.len(), 2);
        assert_eq!(p.proxies[1].ports, [8080, 3128]);
        assert_eq!(p.workloads[0].proxies, [1, 0]);
    }

    #[test]
    fn bad_proxies_are_reported_with_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[[proxies]]\nname = \"corp\"\nports = [3128]\n",
                "proxies[0]",
                "a proxy needs `cidrs`",
            ),
            (
                "[[proxies]]\nname = \"corp\"\ncidrs = [\"10.0.0.1\"]\n",
                "proxies[0]",
                "a proxy needs `ports`",
            ),
            (
                "[[proxies]]\nname = \"corp\"\ncidrs = [\"10.0.0.1\"]\nports = []\n",
                "proxies[0].ports",
                "0 ports; a proxy lists 1 to 8",
            ),
            (
                "[[proxies]]\nname = \"corp\"\ncidrs = [\"10.0.0.1\"]\nports = [0]\n",
                "proxies[0].ports[0]",
                "",
            ),
            (
                "[[proxies]]\nname = \"corp\"\ncidrs = [\"10.0.0.1/8\"]\nports = [3128]\n",
                "proxies[0].cidrs[0]",
                "10.0.0.0/8",
            ),
            (
                "[[proxies]]\nname = \"Corp Proxy\"\ncidrs = [\"10.0.0.1\"]\nports = [3128]\n",
                "proxies[0].name",
                "",
            ),
            (
                &format!("{PROXY}{PROXY}"),
                "proxies[1].name",
                "duplicate proxy name",
            ),
            (
                &format!("{PROXY}[[proxies]]\nname = \"b\"\ncidrs = [\"10.9.0.5\"]\nports = [1]\n"),
                "proxies[1].cidrs[0]",
                "already a CIDR of proxy `corp`",
            ),
            (
                "[[providers]]\nname = \"mine\"\ncidrs = [\"10.7.0.0/16\"]\n\
                 [[proxies]]\nname = \"corp\"\ncidrs = [\"10.7.0.0/16\"]\nports = [3128]\n",
                "proxies[0].cidrs[0]",
                "already a CIDR of provider `mine`",
            ),
            (
                "[[proxies]]\nname = \"corp\"\ncidrs = [\"10.0.0.1\"]\nports = [3128]\nurl = \"x\"\n",
                "",
                "unknown field",
            ),
            (
                &format!(
                    "{PROXY}[[workloads]]\nname = \"w\"\ncgroup = \"w\"\nproxies = [\"crop\"]\n"
                ),
                "workloads[0].proxies[0]",
                "not a proxy of this policy (`[[proxies]]`: `corp`)",
            ),
            (
                "[[workloads]]\nname = \"w\"\ncgroup = \"w\"\nproxies = [\"corp\"]\n",
                "workloads[0].proxies[0]",
                "this policy has no `[[proxies]]`",
            ),
        ];
        for (text, key, message) in cases {
            let errs = errors(text);
            assert!(
                errs.iter()
                    .any(|e| e.key.starts_with(key) && e.to_string().contains(message)),
                "{text:?}: expected an error at {key} with {message:?}, got {errs:?}"
            );
        }
    }
}
