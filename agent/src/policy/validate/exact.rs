//! `[prices."MODEL"]`, `[secrets]` and a workload's `secrets`: the policy
//! keys of exact tokens (docs/exact-tokens.md, docs/policy.md). Part of the
//! checker of `validate`: errors name the key path, line and column like
//! every other.

use super::super::{
    SecretAction, SecretPattern, SecretsConfig, UsdBudget, file::SecretPatternFile,
};
use super::*;
use crate::{
    plaintext::secrets::{BUILTIN, compile},
    policy::catalog::prices::{Price, check_amount, check_model},
};

const SECRET_ACTIONS: &[(&str, SecretAction)] = &[
    ("off", SecretAction::Off),
    ("audit", SecretAction::Audit),
    ("block", SecretAction::Block),
];
/// Patterns a policy may add.
pub(crate) const MAX_SECRET_PATTERNS: usize = 64;
/// The largest USD budget accepted.
const MAX_USD: f64 = 1e9;

impl Checker<'_> {
    /// The `[prices."MODEL"]` entries; an entry with an error is left out.
    pub(super) fn prices(&mut self, f: &PolicyFile) -> Vec<(String, Price)> {
        let mut out = Vec::new();
        for (model, p) in &f.prices {
            let key = format!("prices.\"{model}\"");
            if let Err(message) = check_model(model) {
                self.error_at(p.input.span(), &key, message);
                continue;
            }
            let errors = self.errors.len();
            let amount = |c: &mut Self, v: &Spanned<f64>, name: &str| {
                c.check(v, &format!("{key}.{name}"), |&x| check_amount(x))
                    .unwrap_or(0.0)
            };
            let input = amount(self, &p.input, "input");
            let output = amount(self, &p.output, "output");
            let cached = p
                .cached
                .as_ref()
                .map_or(input, |v| amount(self, v, "cached"));
            let cache_write = p
                .cache_write
                .as_ref()
                .map_or(input, |v| amount(self, v, "cache_write"));
            if self.errors.len() == errors {
                out.push((
                    model.clone(),
                    Price {
                        input,
                        output,
                        cached,
                        cache_write,
                    },
                ));
            }
        }
        out
    }

    /// `[secrets]` and the workloads' `secrets`.
    pub(super) fn secrets(&mut self, f: &PolicyFile) -> SecretsConfig {
        let s = &f.secrets;
        let action = self.choice(
            s.action.as_ref(),
            "secrets.action",
            SECRET_ACTIONS,
            SecretAction::Audit,
        );
        let mut patterns = Vec::new();
        let mut names = HashMap::new();
        if s.patterns.len() > MAX_SECRET_PATTERNS {
            let message = format!("at most {MAX_SECRET_PATTERNS} patterns");
            self.error_at(
                s.patterns[MAX_SECRET_PATTERNS].span(),
                "secrets.patterns",
                message,
            );
        }
        for (i, entry) in s.patterns.iter().enumerate().take(MAX_SECRET_PATTERNS) {
            let key = format!("secrets.patterns[{i}]");
            let SecretPatternFile { name, regex } = entry.get_ref();
            let errors = self.errors.len();
            self.check(name, &format!("{key}.name"), |n| provider_name(n));
            if BUILTIN.iter().any(|(kind, ..)| kind == name.get_ref()) {
                let message = "the name of a built-in kind: choose another";
                self.error(name, &format!("{key}.name"), message);
            }
            self.unique(&mut names, name, &format!("{key}.name"), "pattern");
            self.check(regex, &format!("{key}.regex"), |r| {
                compile(r).map_err(|e| e.to_string())
            });
            if self.errors.len() == errors {
                patterns.push(SecretPattern {
                    name: name.get_ref().clone(),
                    regex: regex.get_ref().clone(),
                });
            }
        }
        let mut workloads = BTreeMap::new();
        for (i, w) in f.workloads.iter().enumerate() {
            let w = w.get_ref();
            let key = format!("workloads[{i}].secrets");
            let a = self.choice(w.secrets.as_ref(), &key, SECRET_ACTIONS, action);
            let exact = w.exact_tokens.as_ref().is_some_and(|e| *e.get_ref());
            self.block_needs_exact(w.secrets.as_ref(), a, exact, &key);
            if a != action {
                workloads.insert(w.name.get_ref().clone(), a);
            }
        }
        SecretsConfig {
            action,
            patterns,
            workloads,
        }
    }

    /// A workload's own `secrets = "block"` needs `exact_tokens = true`:
    /// only those workloads' requests are read, so block elsewhere would
    /// promise what the agent does not do. `[secrets].action = "block"`
    /// applies to the `exact_tokens` workloads (docs/policy.md).
    fn block_needs_exact(
        &mut self,
        value: Option<&Spanned<String>>,
        action: SecretAction,
        exact: bool,
        key: &str,
    ) {
        if let (Some(v), SecretAction::Block, false) = (value, action, exact) {
            let message = "\"block\" needs exact_tokens = true on this workload (only those workloads' requests are read for secrets)";
            self.error(v, key, message);
        }
    }

    /// `usd_per_day` and `usd_per_month` of each workload's `[workloads.limits]`.
    pub(super) fn usd_budgets(&mut self, f: &PolicyFile) -> BTreeMap<String, UsdBudget> {
        let mut out = BTreeMap::new();
        for (i, w) in f.workloads.iter().enumerate() {
            let w = w.get_ref();
            let key = format!("workloads[{i}].limits");
            let amount = |c: &mut Self, v: &Option<Spanned<f64>>, name: &str| {
                v.as_ref().and_then(|v| {
                    c.check(v, &format!("{key}.{name}"), |&x| {
                        if x.is_finite() && x > 0.0 && x <= MAX_USD {
                            Ok(x)
                        } else {
                            Err(format!("US dollars above 0, at most {MAX_USD}"))
                        }
                    })
                })
            };
            let per_day = amount(self, &w.limits.usd_per_day, "usd_per_day");
            let per_month = amount(self, &w.limits.usd_per_month, "usd_per_month");
            if let (Some(d), Some(m), Some(v)) = (per_day, per_month, &w.limits.usd_per_month)
                && m < d
            {
                self.error(v, &format!("{key}.usd_per_month"), "less than usd_per_day");
            }
            // Only exact counts have a model, hence a price: on estimated
            // tokens a dollar budget would never be charged, a budget the
            // agent accepts and does not keep (docs/limits.md).
            let first = w.limits.usd_per_day.as_ref().map(|v| (v, "usd_per_day"));
            let first = first.or(w
                .limits
                .usd_per_month
                .as_ref()
                .map(|v| (v, "usd_per_month")));
            let exact = w.exact_tokens.as_ref().is_some_and(|e| *e.get_ref());
            if let Some((v, name)) = first
                && !exact
            {
                self.error(
                    v,
                    &format!("{key}.{name}"),
                    "dollar budgets are charged with exact costs only: set exact_tokens = true on this workload (estimated tokens have no model, hence no price)",
                );
            }
            // Exact counts are read on tracked connections (sock_ops).
            if let Some((v, name)) = first
                && self.programs == Programs::Connect
            {
                self.error(
                    v,
                    &format!("{key}.{name}"),
                    "needs programs = \"all\" (with programs = \"connect\" no connection is tracked, so nothing is counted exactly)",
                );
            }
            // A fleet dollar budget marks the workload's pairs spent through
            // the host keeper; fleet token budgets keep their pairs in the
            // fleet keeper: not both on one workload (docs/fleet.md).
            let tokens =
                |k: LimitKeysRef| k.tokens_per_minute.is_some() || k.tokens_per_day.is_some();
            if let (Some((v, name)), Some(scope)) = (first, &w.limits.scope)
                && scope.get_ref() == "fleet"
                && (tokens(w.limits.keys())
                    || w.limits.providers.values().any(|p| tokens(p.keys())))
            {
                self.error(
                    v,
                    &format!("{key}.{name}"),
                    "with scope = \"fleet\", a dollar budget cannot be combined with token budgets on one workload yet (docs/fleet.md)",
                );
            }
            if per_day.is_some() || per_month.is_some() {
                out.insert(w.name.get_ref().clone(), UsdBudget { per_day, per_month });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, ok};
    use super::*;

    #[test]
    fn prices_are_read_and_checked() {
        let p = ok(
            "[prices.\"gpt-4o\"]\ninput = 2\noutput = 8.5\ncached = 0.5\n\n[prices.\"my-deployment\"]\ninput = 1.0\noutput = 2.0\n",
        );
        assert_eq!(
            p.prices,
            vec![
                (
                    "gpt-4o".into(),
                    Price {
                        input: 2.0,
                        output: 8.5,
                        cached: 0.5,
                        cache_write: 2.0
                    }
                ),
                (
                    "my-deployment".into(),
                    Price {
                        input: 1.0,
                        output: 2.0,
                        cached: 1.0,
                        cache_write: 1.0
                    }
                ),
            ]
        );
        let e = errors("[prices.\"gpt-4o\"]\ninput = -2\noutput = 1\n");
        assert_eq!(
            (e[0].key.as_str(), e[0].line),
            ("prices.\"gpt-4o\".input", 2)
        );
        assert!(e[0].message.contains("0 to 10000"), "{}", e[0].message);
        let e = errors("[prices.\"a b\"]\ninput = 1\noutput = 1\n");
        assert_eq!(e[0].key, "prices.\"a b\"");
        assert!(e[0].message.contains("no spaces"));
        // A missing key and an unknown key are shape errors.
        assert!(!errors("[prices.\"x\"]\ninput = 1\n").is_empty());
        assert!(!errors("[prices.\"x\"]\ninput = 1\noutput = 1\ncheap = true\n").is_empty());
    }

    #[test]
    fn secrets_are_read_and_checked() {
        let p = ok("");
        assert_eq!(p.secrets, SecretsConfig::default());
        let p = ok(r#"
[secrets]
action = "audit"
patterns = [{ name = "internal-token", regex = "\\bINT-[0-9]{8}\\b" }]

[[workloads]]
name = "bot"
cgroup = "bot.slice"
secrets = "off"

[[workloads]]
name = "batch"
cgroup = "batch.slice"
"#);
        assert_eq!(p.secrets.action, SecretAction::Audit);
        assert_eq!(p.secrets.patterns[0].name, "internal-token");
        assert_eq!(p.secrets.action_for("bot"), SecretAction::Off);
        assert_eq!(p.secrets.action_for("batch"), SecretAction::Audit);
        // `block` is accepted: globally (it applies to the `exact_tokens`
        // workloads), and on a workload with `exact_tokens = true`.
        let p = ok(
            "[secrets]\naction = \"block\"\n\n[[workloads]]\nname = \"w\"\ncgroup = \"w.slice\"\n",
        );
        assert_eq!(p.secrets.action_for("w"), SecretAction::Block);
        let p = ok(
            "[[workloads]]\nname = \"w\"\ncgroup = \"w.slice\"\nexact_tokens = true\nsecrets = \"block\"\n",
        );
        assert_eq!(p.secrets.action_for("w"), SecretAction::Block);
        // A workload's own block without exact_tokens is refused: nothing
        // reads its requests.
        let e = errors("[[workloads]]\nname = \"w\"\ncgroup = \"w.slice\"\nsecrets = \"block\"\n");
        assert_eq!(e[0].key, "workloads[0].secrets");
        assert!(e[0].message.contains("needs exact_tokens = true"));
        let e = errors("[secrets]\naction = \"drop\"\n");
        assert_eq!(e[0].key, "secrets.action");
        assert!(e[0].message.contains("\"off\", \"audit\", \"block\""));
        let e = errors(
            "[[secrets.patterns]]\nname = \"x\"\nregex = \"(open\"\n[[secrets.patterns]]\nname = \"jwt\"\nregex = \"a*\"\n",
        );
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "secrets.patterns[0].regex",
                "secrets.patterns[1].name",
                "secrets.patterns[1].regex"
            ]
        );
        assert!(e[2].message.contains("empty string"));
        let e = errors("[[workloads]]\nname = \"w\"\ncgroup = \"w.slice\"\nsecrets = \"yes\"\n");
        assert_eq!(e[0].key, "workloads[0].secrets");
    }

    #[test]
    fn usd_budgets_are_read_and_checked() {
        let w = "[[workloads]]\nname = \"w\"\ncgroup = \"w.slice\"\n[workloads.limits]\n";
        // Only on exact_tokens workloads.
        let e = errors(&format!("{w}usd_per_day = 5\nusd_per_month = 100.5\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "workloads[0].limits.usd_per_day");
        assert!(e[0].message.contains("exact_tokens = true"));
        assert!(ok(w).usd_budgets.is_empty());
        let x = "[[workloads]]\nname = \"w\"\ncgroup = \"w.slice\"\nexact_tokens = true\n[workloads.limits]\n";
        let p = ok(&format!("{x}usd_per_day = 5\nusd_per_month = 100.5\n"));
        assert_eq!(
            p.usd_budgets["w"],
            UsdBudget {
                per_day: Some(5.0),
                per_month: Some(100.5)
            }
        );
        let p = ok(&format!("{x}usd_per_month = 7\n"));
        assert_eq!(p.usd_budgets["w"].per_day, None);
        let e = errors(&format!("programs = \"connect\"\n{x}usd_per_month = 7\n"));
        assert!(
            e.iter()
                .any(|e| e.key == "workloads[0].limits.usd_per_month"
                    && e.message.contains("programs = \"all\"")),
            "{e:?}"
        );
        // Fleet-wide, but not with fleet token budgets on the same workload.
        let fleet = "[fleet]\nservers = [\"redis://127.0.0.1\"]\n";
        let p = ok(&format!("{fleet}{x}usd_per_day = 5\nscope = \"fleet\"\n"));
        assert_eq!(p.fleet_workloads["w"].identity, "w");
        let e = errors(&format!(
            "{fleet}{x}usd_per_day = 5\ntokens_per_day = 10\nscope = \"fleet\"\n"
        ));
        assert!(
            e.iter().any(|e| e.key == "workloads[0].limits.usd_per_day"
                && e.message.contains("cannot be combined")),
            "{e:?}"
        );
        let e = errors(&format!("{w}usd_per_day = 0\n"));
        assert!(
            e.iter().any(
                |e| e.key == "workloads[0].limits.usd_per_day" && e.message.contains("above 0")
            )
        );
        let e = errors(&format!("{w}usd_per_day = 10\nusd_per_month = 5\n"));
        assert!(
            e.iter()
                .any(|e| e.key == "workloads[0].limits.usd_per_month"
                    && e.message.contains("less than usd_per_day"))
        );
        // Workload-wide only: not in a provider override.
        let e = errors(&format!(
            "{w}[workloads.limits.providers.openai]\nusd_per_day = 1\n"
        ));
        assert!(!e.is_empty());
    }
}
