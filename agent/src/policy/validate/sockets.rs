//! `raw_sockets` (of `[defaults]` and of each workload) and
//! `nat64_prefixes`: the keys of the socket-kind verdict and of NAT64
//! destinations (docs/policy.md, "Raw and ping sockets" and "NAT64
//! prefixes"; the kernel side: ebpf/src/sock_create.rs, ebpf/src/nat64.rs).
//! Part of the checker of `validate`: errors name the key path, line and
//! column like every other.

use ipnet::Ipv6Net;
use llm_egress_common::NAT64_MAX;

use super::*;

/// RFC 6052's well-known prefix: the default of `nat64_prefixes`.
pub(in crate::policy) const WELL_KNOWN_NAT64: &str = "64:ff9b::/96";

impl Checker<'_> {
    /// `raw_sockets`: an action word; absent, the same action as `other`
    /// (a workload whose non-provider traffic is denied gets no raw or
    /// ping sockets either).
    pub(super) fn raw_sockets(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        other: Action,
    ) -> Action {
        self.choice(value, key, ACTIONS, other)
    }

    /// `nat64_prefixes`: IPv6 /96 prefixes, at most `NAT64_MAX`, no
    /// duplicates. Absent: the well-known prefix alone.
    pub(super) fn nat64_prefixes(
        &mut self,
        value: Option<&Spanned<Vec<Spanned<String>>>>,
    ) -> Vec<Ipv6Net> {
        let Some(list) = value else {
            return vec![WELL_KNOWN_NAT64.parse().expect("a valid literal")];
        };
        if list.get_ref().len() > NAT64_MAX as usize {
            let message = format!("at most {NAT64_MAX} prefixes");
            self.error(list, "nat64_prefixes", message);
        }
        let mut out: Vec<Ipv6Net> = Vec::new();
        for (i, entry) in list.get_ref().iter().enumerate() {
            let key = format!("nat64_prefixes[{i}]");
            let Some(net) = self.check(entry, &key, |s| nat64_prefix(s)) else {
                continue;
            };
            if out.contains(&net) {
                self.error(entry, &key, "listed twice");
                continue;
            }
            out.push(net);
        }
        out.truncate(NAT64_MAX as usize);
        out
    }
}

/// One `nat64_prefixes` entry: an IPv6 network of length 96 with no host
/// bits set, outside the address ranges that are never NAT64.
fn nat64_prefix(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| "not an IPv6 prefix such as \"64:ff9b::/96\"".to_string())?;
    if net.prefix_len() != 96 {
        return Err(format!(
            "a /{} prefix; only /96 NAT64 prefixes are supported (RFC 6052's other lengths \
             place the IPv4 address around a reserved octet; docs/names.md)",
            net.prefix_len()
        ));
    }
    if net.network() != net.addr() {
        return Err(format!(
            "has host bits set; the prefix is {}",
            Ipv6Net::new(net.network(), 96).map_or_else(|_| net.to_string(), |n| n.to_string())
        ));
    }
    let first = net.network().segments()[0];
    if net.network().is_unspecified() || first == 0 {
        return Err(
            "under ::/16 (IPv4-mapped, IPv4-compatible and loopback addresses live there)".into(),
        );
    }
    if first & 0xff00 == 0xff00 {
        return Err("a multicast prefix".into());
    }
    if first & 0xffc0 == 0xfe80 {
        return Err("a link-local prefix".into());
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, ok, one_error, workload};
    use super::*;

    #[test]
    fn raw_sockets_defaults_to_other() {
        let p = ok(&format!(
            "[defaults]\nother = \"deny\"\n\n{}{}{}",
            workload("name = \"a\"\ncgroup = \"a\"\n"),
            workload("name = \"b\"\ncgroup = \"b\"\nother = \"allow\"\n"),
            workload("name = \"c\"\ncgroup = \"c\"\nother = \"deny\"\nraw_sockets = \"allow\"\n"),
        ));
        assert_eq!(p.defaults.raw_sockets, Action::Deny);
        let raw: Vec<_> = p.workloads.iter().map(|w| w.raw_sockets).collect();
        assert_eq!(raw, [Action::Deny, Action::Allow, Action::Allow]);
        let p = ok("[defaults]\nraw_sockets = \"audit\"\n");
        assert_eq!(
            (p.defaults.other, p.defaults.raw_sockets),
            (Action::Allow, Action::Audit)
        );
    }

    #[test]
    fn raw_sockets_must_be_an_action() {
        one_error(
            &workload("name = \"w\"\ncgroup = \"w\"\nraw_sockets = \"never\"\n"),
            "workloads[0].raw_sockets",
            4,
            15,
            "\"allow\", \"deny\", \"audit\"",
        );
    }

    #[test]
    fn nat64_prefixes_default_to_the_well_known_one() {
        let p = ok("");
        assert_eq!(
            p.nat64_prefixes,
            [WELL_KNOWN_NAT64.parse::<Ipv6Net>().unwrap()]
        );
        assert!(ok("nat64_prefixes = []\n").nat64_prefixes.is_empty());
        let p = ok("nat64_prefixes = [\"64:ff9b::/96\", \"2001:db8:64::/96\"]\n");
        assert_eq!(p.nat64_prefixes.len(), 2);
    }

    #[test]
    fn bad_nat64_prefixes_are_named() {
        let cases = [
            ("\"64:ff9b::/64\"", "only /96"),
            ("\"64:ff9b:1::/48\"", "only /96"),
            ("\"192.0.2.0/24\"", "not an IPv6 prefix"),
            ("\"nope\"", "not an IPv6 prefix"),
            ("\"64:ff9b::1/96\"", "host bits"),
            ("\"::ffff:0:0/96\"", "under ::/16"),
            ("\"ff02::/96\"", "multicast"),
            ("\"fe80::/96\"", "link-local"),
        ];
        for (value, needle) in cases {
            let text = format!("nat64_prefixes = [{value}]\n");
            one_error(&text, "nat64_prefixes[0]", 1, 19, needle);
        }
        one_error(
            "nat64_prefixes = [\"64:ff9b::/96\", \"64:ff9b::/96\"]\n",
            "nat64_prefixes[1]",
            1,
            35,
            "twice",
        );
        let many: Vec<String> = (0..17)
            .map(|i| format!("\"2001:db8:{i:x}::/96\""))
            .collect();
        let e = errors(&format!("nat64_prefixes = [{}]\n", many.join(", ")));
        assert!(e.iter().any(|e| e.message.contains("at most 16")), "{e:?}");
    }
}
