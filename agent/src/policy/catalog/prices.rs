//! Prices per model and the cost of an exchange (docs/exact-tokens.md,
//! "Prices").
//!
//! The built-in table is `catalog/prices.toml` (list prices in USD per
//! million tokens, dated by its `as_of`), embedded and parsed on first use;
//! a policy adds or replaces models with `[prices."MODEL"]` (validated in
//! policy/validate/exact.rs with [`check_model`] and [`check_amount`]). A
//! model is priced by the longest entry that is the model's name or its
//! start followed by `-` or `@` (`claude-sonnet-4` prices
//! `claude-sonnet-4-20250514`). Nothing here counts or records.

use std::sync::OnceLock;

use serde::Deserialize;

use crate::plaintext::usage::Usage;

const PRICES_TOML: &str = include_str!("prices.toml");

/// Longest model name of a price entry.
pub const MAX_MODEL_NAME: usize = 128;
/// Highest price accepted, USD per million tokens.
pub const MAX_PRICE: f64 = 10_000.0;

/// USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Prompt tokens read from a cache.
    pub cached: f64,
    /// Prompt tokens written to a cache.
    pub cache_write: f64,
}

impl Price {
    /// The cost of `usage` in USD.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached.min(usage.input);
        let write = usage.cache_write.min(usage.input - cached);
        let plain = usage.input - cached - write;
        (plain as f64 * self.input
            + cached as f64 * self.cached
            + write as f64 * self.cache_write
            + usage.output as f64 * self.output)
            / 1_000_000.0
    }
}

/// Where an entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Catalog,
    Policy,
}

/// The prices in force: the catalog's, with the policy's on top.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceTable {
    /// The catalog's `as_of`.
    pub as_of: String,
    entries: Vec<(String, Price, Origin)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    as_of: String,
    price: Vec<CatalogEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogEntry {
    model: String,
    input: f64,
    output: f64,
    cached: Option<f64>,
    cache_write: Option<f64>,
}

/// A model name of a price entry: 1 to `MAX_MODEL_NAME` printable ASCII
/// characters, no spaces (it becomes a metric label).
pub fn check_model(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_MODEL_NAME {
        return Err(format!("a model name has 1 to {MAX_MODEL_NAME} characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a model name has printable ASCII characters only, no spaces".to_owned());
    }
    Ok(())
}

/// A price: a finite number from 0 to `MAX_PRICE` (USD per million tokens).
pub fn check_amount(v: f64) -> Result<f64, String> {
    if v.is_finite() && (0.0..=MAX_PRICE).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "a price is 0 to {MAX_PRICE} US dollars per million tokens"
        ))
    }
}

/// The catalog table, parsed on first use; an error is impossible in a
/// build whose unit tests pass (`catalog_is_valid`), but is returned.
pub fn catalog() -> Result<&'static PriceTable, &'static str> {
    static TABLE: OnceLock<Result<PriceTable, String>> = OnceLock::new();
    TABLE
        .get_or_init(|| parse_catalog(PRICES_TOML))
        .as_ref()
        .map_err(String::as_str)
}

fn parse_catalog(text: &str) -> Result<PriceTable, String> {
    let file: CatalogFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut entries: Vec<(String, Price, Origin)> = Vec::new();
    for e in file.price {
        let bad = |m: String| format!("catalog/prices.toml: {}: {m}", e.model);
        check_model(&e.model).map_err(bad)?;
        let input = check_amount(e.input).map_err(bad)?;
        let price = Price {
            input,
            output: check_amount(e.output).map_err(bad)?,
            cached: check_amount(e.cached.unwrap_or(input)).map_err(bad)?,
            cache_write: check_amount(e.cache_write.unwrap_or(input)).map_err(bad)?,
        };
        if entries.iter().any(|(m, ..)| *m == e.model) {
            return Err(bad("listed twice".to_owned()));
        }
        entries.push((e.model, price, Origin::Catalog));
    }
    Ok(PriceTable {
        as_of: file.as_of,
        entries,
    })
}

impl PriceTable {
    /// The catalog's prices with `overrides` (validated policy entries)
    /// added or replacing the catalog's entry of the same model.
    pub fn with_overrides(catalog: &PriceTable, overrides: &[(String, Price)]) -> PriceTable {
        let mut t = catalog.clone();
        for (model, price) in overrides {
            t.entries.retain(|(m, ..)| m != model);
            t.entries.push((model.clone(), *price, Origin::Policy));
        }
        t
    }

    /// The entry that prices `model`: its name, price and origin.
    pub fn lookup(&self, model: &str) -> Option<(&str, Price, Origin)> {
        // Gemini answers name `models/gemini-…` in some APIs.
        let model = model.strip_prefix("models/").unwrap_or(model);
        self.entries
            .iter()
            .filter(|(m, ..)| {
                model == m
                    || model
                        .strip_prefix(m.as_str())
                        .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('@'))
            })
            .max_by_key(|(m, ..)| m.len())
            .map(|(m, p, o)| (m.as_str(), *p, *o))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> &'static PriceTable {
        match catalog() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn catalog_is_valid() {
        let t = table();
        assert!(t.len() >= 20);
        assert!(
            t.as_of.len() == 10 && t.as_of.starts_with("20"),
            "as_of is a date: {}",
            t.as_of
        );
    }

    #[test]
    fn longest_prefix_at_a_boundary() {
        let t = table();
        let key = |m: &str| t.lookup(m).map(|(k, ..)| k.to_owned());
        assert_eq!(key("gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(key("gpt-4o-2024-08-06").as_deref(), Some("gpt-4o"));
        assert_eq!(
            key("gpt-4o-mini-2024-07-18").as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(
            key("claude-sonnet-4-20250514").as_deref(),
            Some("claude-sonnet-4")
        );
        assert_eq!(
            key("claude-opus-4-1-20250805").as_deref(),
            Some("claude-opus-4-1")
        );
        assert_eq!(
            key("claude-3-5-haiku@20241022").as_deref(),
            Some("claude-3-5-haiku")
        );
        assert_eq!(
            key("models/gemini-2.0-flash-001").as_deref(),
            Some("gemini-2.0-flash")
        );
        assert_eq!(
            key("gemini-2.0-flash-lite").as_deref(),
            Some("gemini-2.0-flash-lite")
        );
        // No boundary, or unknown: no price.
        assert_eq!(key("gpt-4omni"), None);
        assert_eq!(key("my-azure-deployment"), None);
    }

    #[test]
    fn cost_of_usage() {
        let t = table();
        let (_, p, _) = t.lookup("gpt-4o").expect("gpt-4o");
        let u = Usage {
            input: 1_000_000,
            output: 1_000_000,
            cached: 500_000,
            cache_write: 0,
        };
        assert!((p.cost(&u) - (0.5 * 2.5 + 0.5 * 1.25 + 10.0)).abs() < 1e-9);
        let (_, a, _) = t.lookup("claude-sonnet-4-20250514").expect("claude");
        let u = Usage {
            input: 1000,
            output: 100,
            cached: 200,
            cache_write: 300,
        };
        let want = (500.0 * 3.0 + 200.0 * 0.3 + 300.0 * 3.75 + 100.0 * 15.0) / 1e6;
        assert!((a.cost(&u) - want).abs() < 1e-12);
        // Inconsistent counts (cached > input) are clamped, never negative.
        let odd = Usage {
            input: 10,
            output: 0,
            cached: 50,
            cache_write: 50,
        };
        assert!(a.cost(&odd) >= 0.0);
    }

    #[test]
    fn overrides_replace_and_add() {
        let cheap = Price {
            input: 1.0,
            output: 2.0,
            cached: 0.5,
            cache_write: 1.0,
        };
        let t = PriceTable::with_overrides(
            table(),
            &[
                ("gpt-4o".into(), cheap),
                ("my-azure-deployment".into(), cheap),
            ],
        );
        assert_eq!(
            t.lookup("gpt-4o-2024-08-06"),
            Some(("gpt-4o", cheap, Origin::Policy))
        );
        assert_eq!(
            t.lookup("my-azure-deployment").map(|x| x.2),
            Some(Origin::Policy)
        );
        assert_eq!(t.len(), table().len() + 1);
    }

    #[test]
    fn checks() {
        assert!(check_model("gpt-4o").is_ok());
        assert!(check_model("").is_err() && check_model("a b").is_err());
        assert!(check_model(&"m".repeat(200)).is_err());
        assert!(check_amount(-1.0).is_err() && check_amount(f64::NAN).is_err());
        assert!(check_amount(1e9).is_err() && check_amount(0.0).is_ok());
        assert!(
            parse_catalog("as_of = \"x\"\n[[price]]\nmodel = \"a\"\ninput = -1.0\noutput = 1.0\n")
                .is_err()
        );
        assert!(parse_catalog("as_of = \"x\"\n[[price]]\nmodel = \"a\"\ninput = 1.0\noutput = 1.0\n[[price]]\nmodel = \"a\"\ninput = 1.0\noutput = 1.0\n").is_err());
    }
}
