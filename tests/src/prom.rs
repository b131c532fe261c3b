//! Reading what /metrics serves, with the agent's own parser
//! (`llm_egress::telemetry::prom_text`, also the parser of `llm-egress
//! status`): a line that does not parse fails the test that reads it.

pub use llm_egress::telemetry::prom_text::{Sample, sum};

/// Every sample of `text`; panics, naming the line, when one is not a
/// sample.
pub fn parse(text: &str) -> Vec<Sample> {
    llm_egress::telemetry::prom_text::parse(text)
        .unwrap_or_else(|e| panic!("the metrics text does not parse: {e}\n{text}"))
}

/// The sum of the samples named `name` whose labels include every pair of
/// `labels` (see [`sum`]); `None` when no sample matches.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sum(&parse(text), name, labels)
}
