//! The built-in provider catalog: the model providers a policy can name
//! without defining them.
//!
//! The data is `providers.toml` (one `[[provider]]` per provider: name,
//! display name, hosts, optional CIDRs, ports), embedded in the binary and
//! parsed once, on first use, with the checks of a policy's `[[providers]]`
//! entries (`Provider::parse_catalog` in `policy::validate`). The policy
//! merges its own providers into this list; this module does not resolve
//! names or write kernel maps. `docs/providers.md` repeats the list, and a
//! test below fails when the page and the file differ.

pub mod prices;

use std::sync::OnceLock;

use crate::policy::{PolicyErrors, Provider};

/// `origin` of errors in the embedded catalog.
pub const ORIGIN: &str = "<builtin>";

const PROVIDERS_TOML: &str = include_str!("providers.toml");

struct Catalog {
    providers: Vec<Provider>,
    /// Display names, by index of `providers`.
    display: Vec<String>,
}

/// The catalog, parsed on first use. An error is impossible in a build
/// whose unit tests pass (`embedded_catalog_is_valid`), but is returned,
/// not panicked on.
fn catalog() -> Result<&'static Catalog, &'static PolicyErrors> {
    static CATALOG: OnceLock<Result<Catalog, PolicyErrors>> = OnceLock::new();
    CATALOG
        .get_or_init(|| {
            let entries = Provider::parse_catalog(PROVIDERS_TOML, ORIGIN)?;
            let (providers, display) = entries.into_iter().unzip();
            Ok(Catalog { providers, display })
        })
        .as_ref()
}

/// The built-in providers, in file order.
pub fn builtin() -> Result<&'static [Provider], &'static PolicyErrors> {
    catalog().map(|c| c.providers.as_slice())
}

/// The display name of built-in provider `name` ("OpenAI" for `openai`).
#[allow(
    dead_code,
    reason = "for listings (`llm-egress providers`); tested here"
)]
pub fn display_name(name: &str) -> Option<&'static str> {
    let c = catalog().ok()?;
    let index = c.providers.iter().position(|p| p.name == name)?;
    c.display.get(index).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDERS_MD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/providers.md");

    fn parsed() -> Vec<(Provider, String)> {
        match Provider::parse_catalog(PROVIDERS_TOML, ORIGIN) {
            Ok(entries) => entries,
            Err(errors) => panic!("catalog/providers.toml is invalid:\n{errors}"),
        }
    }

    /// The markdown table of docs/providers.md, from providers.toml.
    fn table(entries: &[(Provider, String)]) -> String {
        let mut out = String::from("| Name | Provider | Hosts and CIDRs | Ports |\n");
        out.push_str("|---|---|---|---|\n");
        for (p, display) in entries {
            let destinations: Vec<String> = (p.hosts.iter().cloned())
                .chain(p.cidrs.iter().map(ToString::to_string))
                .map(|d| format!("`{d}`"))
                .collect();
            let ports = if p.ports.is_empty() {
                "any".to_owned()
            } else {
                p.ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push_str(&format!(
                "| `{}` | {display} | {} | {ports} |\n",
                p.name,
                destinations.join(", ")
            ));
        }
        out
    }

    #[test]
    fn embedded_catalog_is_valid() {
        let entries = parsed();
        assert!(entries.len() >= 26, "{} providers", entries.len());
        let providers = builtin().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(providers.len(), entries.len());
        assert!(
            providers.iter().all(|p| p.ports == [443]),
            "every catalog entry is HTTPS"
        );
    }

    #[test]
    fn catalog_has_the_required_providers() {
        let required = [
            ("openai", "api.openai.com"),
            ("azure-openai", "*.openai.azure.com"),
            ("azure-openai", "*.cognitiveservices.azure.com"),
            ("azure-openai", "*.services.ai.azure.com"),
            ("anthropic", "api.anthropic.com"),
            ("gemini", "generativelanguage.googleapis.com"),
            ("vertex-ai", "aiplatform.googleapis.com"),
            ("vertex-ai", "us-central1-aiplatform.googleapis.com"),
            ("bedrock", "bedrock-runtime.us-east-1.amazonaws.com"),
            ("mistral", "api.mistral.ai"),
            ("cohere", "api.cohere.com"),
            ("cohere", "api.cohere.ai"),
            ("groq", "api.groq.com"),
            ("together", "api.together.xyz"),
            ("together", "api.together.ai"),
            ("fireworks", "api.fireworks.ai"),
            ("deepseek", "api.deepseek.com"),
            ("perplexity", "api.perplexity.ai"),
            ("xai", "api.x.ai"),
            ("openrouter", "openrouter.ai"),
            ("huggingface", "api-inference.huggingface.co"),
            ("huggingface", "router.huggingface.co"),
            ("huggingface", "*.endpoints.huggingface.cloud"),
            ("replicate", "api.replicate.com"),
            ("ai21", "api.ai21.com"),
            ("cerebras", "api.cerebras.ai"),
            ("nvidia-nim", "integrate.api.nvidia.com"),
            ("dashscope", "dashscope.aliyuncs.com"),
            ("dashscope", "dashscope-intl.aliyuncs.com"),
            ("moonshot", "api.moonshot.cn"),
            ("moonshot", "api.moonshot.ai"),
            ("zhipu", "open.bigmodel.cn"),
            ("zhipu", "api.z.ai"),
            ("sambanova", "api.sambanova.ai"),
            ("voyage", "api.voyageai.com"),
        ];
        let providers = builtin().unwrap_or_else(|e| panic!("{e}"));
        for (name, host) in required {
            let p = providers.iter().find(|p| p.name == name);
            let p = p.unwrap_or_else(|| panic!("catalog has no provider {name:?}"));
            assert!(
                p.hosts.iter().any(|h| h == host),
                "{name} lacks host {host}"
            );
        }
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name("openai"), Some("OpenAI"));
        assert_eq!(display_name("bedrock"), Some("Amazon Bedrock"));
        assert_eq!(display_name("no-such-provider"), None);
    }

    #[test]
    fn catalog_errors_name_the_entry() {
        let text = "[[provider]]\nname = \"a\"\ndisplay = \"A\"\nhosts = [\"x.example\"]\nports = [443]\n\n\
                    [[provider]]\nname = \"b\"\ndisplay = \"\"\nhosts = [\"X.example.\"]\nports = [443]\n";
        let errors = match Provider::parse_catalog(text, ORIGIN) {
            Ok(_) => panic!("an empty display name and a shared host must be errors"),
            Err(errors) => errors.0,
        };
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["provider[1].display", "provider[1].hosts[0]"]);
        assert_eq!((errors[1].origin.as_str(), errors[1].line), (ORIGIN, 10));
        assert!(
            errors[1].message.contains("already a host of provider `a`"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn docs_providers_md_matches_the_catalog() {
        let expected = table(&parsed());
        let doc = std::fs::read_to_string(PROVIDERS_MD)
            .unwrap_or_else(|e| panic!("cannot read {PROVIDERS_MD}: {e}"));
        assert!(
            doc.contains(&expected),
            "docs/providers.md is out of date with agent/src/policy/catalog/providers.toml; \
             replace its table with:\n\n{expected}"
        );
    }
}
