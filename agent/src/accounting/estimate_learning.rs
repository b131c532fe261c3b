//! The token estimator's constants, learned from this host's exact counts
//! (docs/exact-tokens.md, "Learning from exact counts").
//!
//! Where a connection was counted exactly, its estimate's unclamped figure
//! `z` (tokens by the calibrated lines of [`crate::accounting::tokens`],
//! below 0 when the bytes are under the line's fixed part) and the exact
//! count `y` of the same kind, both per request, are one sample of a line
//! `y = a + b·z`, kept per provider × kind × response shape × client kind as
//! weighted sums that forget old samples ([`FORGET`]). Connections nobody
//! reads (workloads without `exact_tokens`, clients whose TLS is not
//! visible) are then estimated as `a + b·z` per request, never below 0.
//!
//! The slope is pulled toward 1 (the calibration's own) by a prior worth a
//! spread of [`PRIOR_SPREAD`] tokens per sample: samples of one size learn
//! an offset only, samples of many sizes their own slope, within
//! [`SLOPE_RANGE`]. A key with less than [`MIN_WEIGHT`] of samples keeps the
//! calibration.
//!
//! Who can move it: the traffic and exact counts of `exact_tokens`
//! workloads, i.e. processes in those workloads' cgroups. What they teach
//! applies to every workload's estimates of the same provider, shape and
//! client kind on this host (a workload that pads its requests can make
//! another's estimates larger or smaller, within the slope range; its own
//! connections stay counted exactly). `[telemetry] learn_estimates = false`
//! turns it off.
//!
//! The sums are saved in `state_dir/estimates.json` ([`STATE_FILE`]) and
//! restored at start, so a restarted agent estimates as well as the one
//! before it. The file names the calibration it was learned against
//! ([`crate::accounting::tokens::calibration_id`]): lines learned against
//! other constants are dropped whole. Whoever can write `state_dir` (root,
//! checked at start like the policy file) can set any line.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::accounting::tokens::{self, Client, Estimate, Shape};

/// Weight of the samples so far when one more is added: a half-life of
/// ~23 connections.
pub const FORGET: f64 = 0.97;

/// Samples (forgotten weight included) before a key's line is used: four
/// connections.
pub const MIN_WEIGHT: f64 = 3.5;

/// The prior's spread, in tokens per request: samples that spread less
/// than this (requests of one size, give or take rounding) keep a slope
/// near 1.
pub const PRIOR_SPREAD: f64 = 3.0;

/// The learned slope stays within this range: wide, since a response
/// shape the calibration mistook (a stream of coalesced events taken for a
/// buffered body) is off by a factor of hundreds.
pub const SLOPE_RANGE: (f64, f64) = (0.001, 1000.0);

/// Keys kept at most (providers come from the policy: a bound, not a
/// limit anyone reaches).
pub const MAX_KEYS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Prompt,
    Completion,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Prompt => "prompt",
            Kind::Completion => "completion",
        }
    }

    fn of_name(name: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == name)
    }
}

/// Name of the learned lines' file under `state_dir`.
pub const STATE_FILE: &str = "estimates.json";

/// Weighted sums of one key's samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Fit {
    w: f64,
    z: f64,
    y: f64,
    zz: f64,
    zy: f64,
}

impl Fit {
    fn add(&mut self, z: f64, y: f64) {
        *self = Fit {
            w: self.w * FORGET + 1.0,
            z: self.z * FORGET + z,
            y: self.y * FORGET + y,
            zz: self.zz * FORGET + z * z,
            zy: self.zy * FORGET + z * y,
        };
    }

    /// `(a, b)` of `y = a + b·z`, once there are enough samples.
    fn line(&self) -> Option<(f64, f64)> {
        if self.w < MIN_WEIGHT {
            return None;
        }
        let (mz, my) = (self.z / self.w, self.y / self.w);
        let szz = (self.zz - self.w * mz * mz).max(0.0);
        let szy = self.zy - self.w * mz * my;
        let prior = PRIOR_SPREAD * PRIOR_SPREAD * self.w;
        let b = ((szy + prior) / (szz + prior)).clamp(SLOPE_RANGE.0, SLOPE_RANGE.1);
        Some((my - b * mz, b))
    }
}

/// (scope, provider, kind, shape, client): the scope is the workload
/// whose connections a line serves, or [`HOST`] for every workload's.
type Key = (String, String, Kind, Shape, Client);

/// The scope of a line learned for the whole host.
pub const HOST: &str = "";

/// What a learned key looks like (for the metrics).
#[derive(Clone, Debug, PartialEq)]
pub struct Learned {
    /// [`HOST`] or a workload.
    pub scope: String,
    pub provider: String,
    pub kind: Kind,
    pub shape: Shape,
    pub client: Client,
    pub offset: f64,
    pub slope: f64,
    pub samples: f64,
}

#[derive(Clone, Debug, Default)]
pub struct EstimateLearning {
    fits: HashMap<Key, Fit>,
    /// Learned something since the last [`EstimateLearning::take_changed`].
    changed: bool,
}

/// What `estimates.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct SavedLines {
    /// [`crate::accounting::tokens::calibration_id`] of the agent that learned them.
    calibration: String,
    lines: Vec<SavedLine>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedLine {
    scope: String,
    provider: String,
    kind: String,
    shape: String,
    client: String,
    #[serde(flatten)]
    fit: Fit,
}

const KINDS: [Kind; 2] = [Kind::Prompt, Kind::Completion];

fn z_of(e: &Estimate, kind: Kind) -> f64 {
    match kind {
        Kind::Prompt => e.prompt_z as f64,
        Kind::Completion => e.completion_z as f64,
    }
}

impl EstimateLearning {
    /// One connection counted exactly: its estimate `e` and the exact
    /// (prompt, completion) of all its requests.
    pub fn learn(
        &mut self,
        (scope, provider): (&str, &str),
        client: Client,
        e: &Estimate,
        exact: (u64, u64),
    ) {
        let n = f64::from(e.requests.max(1));
        for kind in KINDS {
            let key = (
                scope.to_string(),
                provider.to_string(),
                kind,
                e.shape,
                client,
            );
            if !self.fits.contains_key(&key) && self.fits.len() >= MAX_KEYS {
                continue;
            }
            let y = match kind {
                Kind::Prompt => exact.0,
                Kind::Completion => exact.1,
            };
            self.fits
                .entry(key)
                .or_default()
                .add(z_of(e, kind) / n, y as f64 / n);
            self.changed = true;
        }
    }

    /// Whether anything was learned since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The file of [`STATE_FILE`]: every key's sums, and the calibration
    /// they were learned against.
    pub fn to_file(&self) -> Vec<u8> {
        let mut lines: Vec<SavedLine> = (self.fits.iter())
            .map(|((scope, provider, kind, shape, client), fit)| SavedLine {
                scope: scope.clone(),
                provider: provider.clone(),
                kind: kind.name().into(),
                shape: shape.name().into(),
                client: client.name().into(),
                fit: *fit,
            })
            .collect();
        lines.sort_by(|a, b| {
            (&a.scope, &a.provider, &a.kind, &a.shape, &a.client).cmp(&(
                &b.scope,
                &b.provider,
                &b.kind,
                &b.shape,
                &b.client,
            ))
        });
        let saved = SavedLines {
            calibration: tokens::calibration_id(),
            lines,
        };
        serde_json::to_vec_pretty(&saved).unwrap_or_default()
    }

    /// The lines of a file [`EstimateLearning::to_file`] wrote, with the
    /// number of lines skipped: lines learned against another calibration
    /// (all of them), of names this agent does not know, with sums that
    /// are not finite or no weight, or beyond [`MAX_KEYS`]. An unreadable
    /// file is an error (the caller starts with nothing learned).
    pub fn from_file(bytes: &[u8]) -> Result<(Self, usize), String> {
        let saved: SavedLines = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if saved.calibration != tokens::calibration_id() {
            return Ok((Self::default(), saved.lines.len()));
        }
        let mut out = Self::default();
        let mut skipped = 0;
        for l in saved.lines {
            let f = l.fit;
            let key = (|| {
                Some((
                    l.scope,
                    l.provider,
                    Kind::of_name(&l.kind)?,
                    Shape::of_name(&l.shape)?,
                    Client::of_name(&l.client)?,
                ))
            })();
            let sane = [f.w, f.z, f.y, f.zz, f.zy].iter().all(|v| v.is_finite()) && f.w > 0.0;
            match key {
                Some(key) if sane && out.fits.len() < MAX_KEYS => {
                    out.fits.insert(key, f);
                }
                _ => skipped += 1,
            }
        }
        Ok((out, skipped))
    }

    /// The (prompt, completion) of `e` by the learned lines; a kind without
    /// one keeps the calibration's figure.
    pub fn correct(
        &self,
        (scope, provider): (&str, &str),
        client: Client,
        e: &Estimate,
    ) -> (u64, u64) {
        let n = f64::from(e.requests.max(1));
        let one = |kind: Kind, raw: u64| {
            let key = (
                scope.to_string(),
                provider.to_string(),
                kind,
                e.shape,
                client,
            );
            match self.fits.get(&key).and_then(Fit::line) {
                Some((a, b)) => (n * (a + b * z_of(e, kind) / n)).max(0.0).round() as u64,
                _ => raw,
            }
        };
        (
            one(Kind::Prompt, e.prompt),
            one(Kind::Completion, e.completion),
        )
    }

    /// Whether `e` would be corrected at all.
    pub fn knows(&self, (scope, provider): (&str, &str), client: Client, e: &Estimate) -> bool {
        KINDS.iter().any(|&kind| {
            self.fits
                .get(&(
                    scope.to_string(),
                    provider.to_string(),
                    kind,
                    e.shape,
                    client,
                ))
                .and_then(Fit::line)
                .is_some()
        })
    }

    /// Every key with a line in use.
    pub fn learned(&self) -> Vec<Learned> {
        let mut out: Vec<Learned> = self
            .fits
            .iter()
            .filter_map(|((scope, provider, kind, shape, client), fit)| {
                let (offset, slope) = fit.line()?;
                Some(Learned {
                    scope: scope.clone(),
                    provider: provider.clone(),
                    kind: *kind,
                    shape: *shape,
                    client: *client,
                    offset,
                    slope,
                    samples: fit.w,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (
                &a.scope,
                &a.provider,
                a.kind.name(),
                a.shape.name(),
                a.client.name(),
            )
                .cmp(&(
                    &b.scope,
                    &b.provider,
                    b.kind.name(),
                    b.shape.name(),
                    b.client.name(),
                ))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(shape: Shape, requests: u32, prompt_z: i64, completion_z: i64) -> Estimate {
        Estimate {
            prompt: prompt_z.max(0) as u64,
            completion: completion_z.max(0) as u64,
            shape,
            requests,
            prompt_z,
            completion_z,
        }
    }

    #[test]
    fn nothing_is_corrected_before_enough_samples() {
        let mut l = EstimateLearning::default();
        let e = est(Shape::Streamed, 1, 40, 300);
        for _ in 0..3 {
            l.learn((HOST, "openai"), Client::Plain, &e, (40, 60));
        }
        assert_eq!(l.correct((HOST, "openai"), Client::Plain, &e), (40, 300));
        assert!(!l.knows((HOST, "openai"), Client::Plain, &e));
        l.learn((HOST, "openai"), Client::Plain, &e, (40, 60));
        assert!(l.knows((HOST, "openai"), Client::Plain, &e));
        assert_eq!(l.correct((HOST, "openai"), Client::Plain, &e), (40, 60));
    }

    #[test]
    fn samples_of_one_size_learn_an_offset_even_below_zero() {
        // A coalesced stream the calibration puts under its fixed part.
        let mut l = EstimateLearning::default();
        for _ in 0..10 {
            l.learn(
                (HOST, "anthropic"),
                Client::Plain,
                &est(Shape::Buffered, 1, -5, -120),
                (12, 50),
            );
        }
        assert_eq!(
            l.correct(
                (HOST, "anthropic"),
                Client::Plain,
                &est(Shape::Buffered, 1, -5, -120)
            ),
            (12, 50)
        );
        // Per request: two requests of the same kind, twice the tokens.
        assert_eq!(
            l.correct(
                (HOST, "anthropic"),
                Client::Plain,
                &est(Shape::Buffered, 2, -10, -240)
            ),
            (24, 100)
        );
    }

    #[test]
    fn samples_of_many_sizes_learn_their_slope() {
        // Compressed bodies: a third of the calibration's bytes per token.
        let mut l = EstimateLearning::default();
        for i in 0..40u64 {
            let y = 50 + 20 * (i % 10);
            let z = (y / 3) as i64 - 100;
            l.learn(
                (HOST, "openai"),
                Client::Sdk,
                &est(Shape::Buffered, 1, 0, z),
                (10, y),
            );
        }
        let (_, c) = l.correct(
            (HOST, "openai"),
            Client::Sdk,
            &est(Shape::Buffered, 1, 0, 300 / 3 - 100),
        );
        assert!((290..=310).contains(&c), "{c}");
        let learned = l.learned();
        let slope = learned
            .iter()
            .find(|x| x.kind == Kind::Completion)
            .unwrap()
            .slope;
        assert!((2.8..=3.2).contains(&slope), "{slope}");
    }

    #[test]
    fn keys_do_not_mix_and_old_samples_are_forgotten() {
        let mut l = EstimateLearning::default();
        let e = est(Shape::Streamed, 1, 30, 200);
        for _ in 0..20 {
            l.learn((HOST, "openai"), Client::Plain, &e, (30, 100));
        }
        // Another client kind, provider or shape: untouched.
        assert_eq!(l.correct((HOST, "openai"), Client::Sdk, &e), (30, 200));
        assert_eq!(l.correct((HOST, "mistral"), Client::Plain, &e), (30, 200));
        assert_eq!(
            l.correct(
                (HOST, "openai"),
                Client::Plain,
                &est(Shape::Buffered, 1, 30, 200)
            ),
            (30, 200)
        );
        // The traffic changes: 100 samples later the new offset holds.
        for _ in 0..100 {
            l.learn((HOST, "openai"), Client::Plain, &e, (30, 150));
        }
        let (_, c) = l.correct((HOST, "openai"), Client::Plain, &e);
        assert!((148..=151).contains(&c), "{c}");
    }

    #[test]
    fn a_body_taken_as_not_generated_learns_its_completion_and_slopes_stay_in_range() {
        // An embedding (no completion) and a mistaken stream of the same
        // shape under other keys: each learns its own.
        let mut l = EstimateLearning::default();
        let e = |z: i64| Estimate {
            completion: 0,
            ..est(Shape::NotGenerated, 1, z / 10, z)
        };
        for i in 1..=20i64 {
            l.learn(
                (HOST, "openai"),
                Client::Plain,
                &e(3000 * i),
                (10_000 * i as u64, 0),
            );
            l.learn(
                (HOST, "anthropic"),
                Client::Plain,
                &e(3000 * i),
                (10, 10 * i as u64),
            );
        }
        assert_eq!(l.correct((HOST, "openai"), Client::Plain, &e(30_000)).1, 0);
        assert_eq!(
            l.correct((HOST, "anthropic"), Client::Plain, &e(30_000)).1,
            100
        );
        let openai_prompt = l
            .learned()
            .into_iter()
            .find(|x| x.provider == "openai" && x.kind == Kind::Prompt)
            .unwrap();
        assert!(
            (33.0..=33.7).contains(&openai_prompt.slope),
            "{openai_prompt:?}"
        );
        // A slope past the range is cut to it.
        for _ in 0..20 {
            l.learn((HOST, "mistral"), Client::Plain, &e(10), (10, 0));
            l.learn((HOST, "mistral"), Client::Plain, &e(20), (1_000_000, 0));
        }
        let mistral = l
            .learned()
            .into_iter()
            .find(|x| x.provider == "mistral" && x.kind == Kind::Prompt)
            .unwrap();
        assert_eq!(mistral.slope, SLOPE_RANGE.1);
    }

    #[test]
    fn learned_lines_are_saved_and_restored_for_the_same_calibration_only() {
        let mut l = EstimateLearning::default();
        assert!(!l.take_changed());
        for i in 0..6 {
            l.learn(
                ("bot", "openai"),
                Client::Sdk,
                &est(Shape::Streamed, 1, 40 + i, 300 + 10 * i),
                (20 + i as u64, 60 + 2 * i as u64),
            );
        }
        assert!(l.take_changed() && !l.take_changed());
        let probe = est(Shape::Streamed, 2, 90, 700);
        let want = l.correct(("bot", "openai"), Client::Sdk, &probe);
        assert_ne!(want, (90, 700));

        let (back, skipped) = EstimateLearning::from_file(&l.to_file()).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(back.correct(("bot", "openai"), Client::Sdk, &probe), want);
        assert_eq!(back.learned(), l.learned());

        // Another calibration: every line dropped.
        let mut saved: serde_json::Value = serde_json::from_slice(&l.to_file()).unwrap();
        saved["calibration"] = "0000000000000000".into();
        let (other, skipped) =
            EstimateLearning::from_file(&serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!((other.learned().len(), skipped), (0, 2));

        // Unknown names and sums that are no numbers are skipped, the rest kept.
        let mut saved: serde_json::Value = serde_json::from_slice(&l.to_file()).unwrap();
        saved["lines"][0]["shape"] = "telepathic".into();
        saved["lines"][1]["w"] = (-1.0).into();
        let (none, skipped) =
            EstimateLearning::from_file(&serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!((none.learned().len(), skipped), (0, 2));
        assert!(EstimateLearning::from_file(b"{not json").is_err());
    }
}
