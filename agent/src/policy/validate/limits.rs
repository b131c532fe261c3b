//! `[workloads.limits]`: a workload's rate-limit and token-budget keys and
//! their per-provider overrides, checked into [`Limits`] (docs/policy.md,
//! "Limits"; how they are enforced: docs/limits.md). Part of the checker of
//! `validate`: errors name the key path, line and column like every other.

use super::*;

/// The smallest `connections_per_second`: the kernel counts rates in
/// thousandths of a connection per second (llm_egress_common::limits), so a
/// smaller rate would be zero, which is no limit at all.
const MIN_CONNECTIONS_PER_SECOND: f64 = 0.001;
const MAX_TOKENS_PER_MINUTE: i64 = 1_000_000_000_000;
const MAX_TOKENS_PER_DAY: i64 = 1_000_000_000_000_000;

impl Checker<'_> {
    /// A workload's `[workloads.limits]` (`key`) and its per-provider
    /// overrides, by provider index. An override is merged with the
    /// workload-wide keys key by key: a key it sets replaces the workload's,
    /// a key it leaves out is the workload's; the defaults of `burst` and
    /// `bytes_burst` then follow the merged rates. `fallback`: where to
    /// report a provider name when no value is near (the workload's table).
    pub(super) fn limits(
        &mut self,
        f: &LimitsFile,
        key: &str,
        fallback: Range<usize>,
        merged: &Merged,
    ) -> (Limits, BTreeMap<usize, Limits>) {
        let wide = f.keys();
        let w = self.limit_values(wide, key);
        self.bursts_need_rates(wide, None, key);
        self.tokens_in_order(wide, &w, key, None);
        let limits = w.limits(wide);
        let mut overrides = BTreeMap::new();
        for (name, over) in &f.providers {
            let okey = format!("{key}.providers.{}", key_segment(name));
            let keys = over.keys();
            let index = match provider_index(name, merged) {
                Ok(index) => index,
                Err(message) => {
                    self.error_at(keys.span(wide.span(fallback.clone())), &okey, message);
                    None
                }
            };
            let o = self.limit_values(keys, &okey);
            self.bursts_need_rates(keys, Some(wide), &okey);
            let m = LimitValues {
                per_second: o.per_second.or(w.per_second),
                burst: o.burst.or(w.burst),
                bytes_per_second: o.bytes_per_second.or(w.bytes_per_second),
                bytes_burst: o.bytes_burst.or(w.bytes_burst),
                tokens_per_minute: o.tokens_per_minute.or(w.tokens_per_minute),
                tokens_per_day: o.tokens_per_day.or(w.tokens_per_day),
            };
            self.tokens_in_order(keys, &m, &okey, Some(key));
            let over = m.limits(keys);
            if let Some(index) = index
                && !over.is_empty()
            {
                overrides.insert(index, over);
            }
        }
        (limits, overrides)
    }

    /// The values of one level's keys, each checked on its own (None: not
    /// set, or invalid and reported).
    fn limit_values(&mut self, k: LimitKeysRef<'_>, key: &str) -> LimitValues {
        let per_second = k.connections_per_second.and_then(|v| {
            self.check(v, &format!("{key}.connections_per_second"), |&n| {
                connections_per_second(n)
            })
        });
        let ints = [
            (k.burst, "burst", 1, MAX_CONNECTION_BURST, "connections", ""),
            (
                k.bytes_per_second,
                "bytes_per_second",
                1,
                MAX_BYTES_PER_SECOND,
                "bytes per second",
                "",
            ),
            (
                k.bytes_burst,
                "bytes_burst",
                MIN_BYTES_BURST,
                MAX_BYTES_BURST,
                "bytes",
                ": a smaller bucket could never pass one large (64 KiB) packet",
            ),
            (
                k.tokens_per_minute,
                "tokens_per_minute",
                1,
                MAX_TOKENS_PER_MINUTE.unsigned_abs(),
                "tokens",
                "",
            ),
            (
                k.tokens_per_day,
                "tokens_per_day",
                1,
                MAX_TOKENS_PER_DAY.unsigned_abs(),
                "tokens",
                "",
            ),
        ];
        if self.programs == Programs::Connect {
            // Bandwidth is policed by the cgroup_skb programs, token counts
            // come from the sock_ops and cgroup_skb accounting.
            for (v, name, ..) in &ints[1..] {
                if let Some(v) = v {
                    self.error(
                        v,
                        &format!("{key}.{name}"),
                        "needs programs = \"all\" (with programs = \"connect\" nothing measures bytes or tokens)",
                    );
                }
            }
        }
        let [
            burst,
            bytes_per_second,
            bytes_burst,
            tokens_per_minute,
            tokens_per_day,
        ] = ints.map(|(v, name, min, max, unit, why)| {
            v.and_then(|v| {
                self.check(v, &format!("{key}.{name}"), |&n| {
                    limit_integer(n, min, max, unit, why)
                })
            })
        });
        LimitValues {
            per_second,
            burst,
            bytes_per_second,
            bytes_burst,
            tokens_per_minute,
            tokens_per_day,
        }
    }

    /// `burst` needs `connections_per_second` and `bytes_burst` needs
    /// `bytes_per_second`, at the same level or, for an override, at the
    /// workload-wide level (`wide`).
    fn bursts_need_rates(
        &mut self,
        level: LimitKeysRef<'_>,
        wide: Option<LimitKeysRef<'_>>,
        key: &str,
    ) {
        let pairs = [
            (
                level.burst,
                "burst",
                level.connections_per_second.is_some()
                    || wide.is_some_and(|w| w.connections_per_second.is_some()),
                "connections_per_second",
            ),
            (
                level.bytes_burst,
                "bytes_burst",
                level.bytes_per_second.is_some()
                    || wide.is_some_and(|w| w.bytes_per_second.is_some()),
                "bytes_per_second",
            ),
        ];
        for (burst, name, has_rate, rate) in pairs {
            let Some(burst) = burst else { continue };
            if has_rate {
                continue;
            }
            let message = match wide {
                None => format!("`{name}` without `{rate}`: a burst is the room of a rate"),
                Some(_) => format!(
                    "`{name}` without `{rate}`, here or in the workload's [workloads.limits]: \
                     a burst is the room of a rate"
                ),
            };
            self.error(burst, &format!("{key}.{name}"), message);
        }
    }

    /// `tokens_per_day` must not be below `tokens_per_minute`. `m`: the
    /// level's values merged with the workload-wide ones (`wide_key`) for an
    /// override, which is checked only when it sets one of the two (the
    /// workload-wide check covers the rest).
    fn tokens_in_order(
        &mut self,
        level: LimitKeysRef<'_>,
        m: &LimitValues,
        key: &str,
        wide_key: Option<&str>,
    ) {
        let (Some(per_minute), Some(per_day)) = (m.tokens_per_minute, m.tokens_per_day) else {
            return;
        };
        if per_day >= per_minute {
            return;
        }
        let from = |set: bool| match wide_key {
            Some(wide) if !set => format!(", from {wide}"),
            _ => String::new(),
        };
        if let Some(v) = level.tokens_per_day {
            let from = from(level.tokens_per_minute.is_some());
            let message = format!("must not be below tokens_per_minute ({per_minute}{from})");
            self.error(v, &format!("{key}.tokens_per_day"), message);
        } else if let Some(v) = level.tokens_per_minute {
            let message = format!(
                "must not be above tokens_per_day ({per_day}{})",
                from(false)
            );
            self.error(v, &format!("{key}.tokens_per_minute"), message);
        }
    }
}

/// The checked values of one level of limit keys (or of an override
/// merged with the workload-wide level).
#[derive(Clone, Copy, Debug, Default)]
struct LimitValues {
    per_second: Option<f64>,
    burst: Option<u64>,
    bytes_per_second: Option<u64>,
    bytes_burst: Option<u64>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
}

impl LimitValues {
    /// The limits these values make, with only the limits whose keys
    /// `level` sets (an override leaves the others to the workload-wide
    /// level); missing bursts get their defaults.
    fn limits(&self, level: LimitKeysRef<'_>) -> Limits {
        let connections = level.connections_per_second.is_some() || level.burst.is_some();
        let bandwidth = level.bytes_per_second.is_some() || level.bytes_burst.is_some();
        Limits {
            connections: self
                .per_second
                .filter(|_| connections)
                .map(|per_second| ConnectionRate {
                    per_second,
                    burst: self.burst.unwrap_or_else(|| default_burst(per_second)),
                }),
            bandwidth: self
                .bytes_per_second
                .filter(|_| bandwidth)
                .map(|bytes_per_second| Bandwidth {
                    bytes_per_second,
                    burst_bytes: self
                        .bytes_burst
                        .unwrap_or_else(|| default_bytes_burst(bytes_per_second)),
                }),
            tokens_per_minute: self
                .tokens_per_minute
                .filter(|_| level.tokens_per_minute.is_some()),
            tokens_per_day: self
                .tokens_per_day
                .filter(|_| level.tokens_per_day.is_some()),
        }
    }
}

/// `burst` when left out: one second's worth, at least one connection.
fn default_burst(per_second: f64) -> u64 {
    // per_second is at most MAX_CONNECTIONS_PER_SECOND: the cast is exact.
    (per_second.ceil() as u64).clamp(1, MAX_CONNECTION_BURST)
}

/// `bytes_burst` when left out: half a second's worth, within the bounds
/// of `bytes_burst`. A download is held only by dropping what the sender
/// sends, which then waits for its retransmission timer (at least 200 ms):
/// a bucket smaller than that much traffic overflows while the sender
/// waits, and downloads run well below the rate (docs/limits.md).
fn default_bytes_burst(bytes_per_second: u64) -> u64 {
    (bytes_per_second / 2).clamp(MIN_BYTES_BURST, MAX_BYTES_BURST)
}

fn connections_per_second(n: f64) -> Result<f64, String> {
    let bounds = format!(
        "must be {MIN_CONNECTIONS_PER_SECOND} to {MAX_CONNECTIONS_PER_SECOND} (connections per second)"
    );
    if !n.is_finite() {
        Err(format!("not a finite number; {bounds}"))
    } else if n <= 0.0 {
        Err(format!("{bounds}; leave the key out for no limit"))
    } else if n < MIN_CONNECTIONS_PER_SECOND {
        Err(format!(
            "{bounds}: rates are counted in thousandths of a connection per second"
        ))
    } else if n > MAX_CONNECTIONS_PER_SECOND {
        Err(bounds)
    } else {
        Ok(n)
    }
}

/// An integer limit key in `min..=max` (`min` >= 1). The range is checked on
/// the i64 TOML gives, before any conversion.
fn limit_integer(n: i64, min: u64, max: u64, unit: &str, why_min: &str) -> Result<u64, String> {
    let bounds = format!("must be {min} to {max} ({unit})");
    match u64::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(n) if n >= min => Err(bounds),
        _ if n <= 0 && min == 1 => Err(format!("{bounds}; leave the key out for no limit")),
        _ => Err(format!("{bounds}{why_min}")),
    }
}

/// A provider name as a segment of a dotted key: bare when TOML would take
/// it bare, else quoted.
fn key_segment(name: &str) -> String {
    let bare = !name.is_empty()
        && (name.chars()).all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// The index of provider `name` for `[workloads.limits.providers.NAME]`:
/// a provider of the merged list. `Ok(None)`: a provider whose own errors
/// are already reported.
fn provider_index(name: &str, merged: &Merged) -> Result<Option<usize>, String> {
    if let Some(index) = merged.providers.iter().position(|p| p.name == name) {
        return Ok(Some(index));
    }
    match merged.unusable.get(name) {
        Some(Unusable::Disabled) => Err(format!("provider `{name}` is disabled")),
        Some(Unusable::Invalid) => Ok(None),
        None => {
            let mut message = format!("{name:?} is not a provider (built-in or in this policy)");
            if let Some(near) = nearest_name(name, &merged.providers) {
                message.push_str(&format!("; did you mean \"{near}\"?"));
            }
            Err(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    /// A workload whose `[workloads.limits]` holds `keys`: its first key is
    /// on line 7.
    fn with_limits(keys: &str) -> String {
        workload(&format!(
            "name = \"w\"\n{UNIT}allow = [\"openai\"]\n\n[workloads.limits]\n{keys}"
        ))
    }

    #[test]
    fn limits_parse_into_the_expected_values() {
        let p = ok(r#"
state_dir = "/srv/llm-egress/state"

[[workloads]]
name = "support-bot"
cgroup = "support-bot"
allow = ["openai", "anthropic"]
[workloads.limits]
connections_per_second = 20
burst = 40
bytes_per_second = 1_000_000
bytes_burst = 2_000_000
tokens_per_minute = 200_000
tokens_per_day = 5_000_000
[workloads.limits.providers.openai]
connections_per_second = 5
tokens_per_day = 1_000_000
[workloads.limits.providers.mistral]   # denied (not allowed): accepted
bytes_per_second = 500_000

[[workloads]]
name = "batch"
cgroup = "batch"
limits = { connections_per_second = 0.5 }
"#);
        assert_eq!(p.state_dir, PathBuf::from("/srv/llm-egress/state"));
        let w = &p.workloads[0];
        let wide = Limits {
            connections: rate(20.0, 40),
            bandwidth: bandwidth(1_000_000, 2_000_000),
            tokens_per_minute: Some(200_000),
            tokens_per_day: Some(5_000_000),
        };
        assert_eq!(w.limits, wide);
        let (openai, mistral) = (builtin_index("openai"), builtin_index("mistral"));
        let expected = BTreeMap::from([
            (
                openai,
                Limits {
                    // Key by key: the workload's explicit burst stays.
                    connections: rate(5.0, 40),
                    bandwidth: None,
                    tokens_per_minute: None,
                    tokens_per_day: Some(1_000_000),
                },
            ),
            (
                mistral,
                Limits {
                    // The default burst of the merged rate, not the workload's.
                    bandwidth: bandwidth(500_000, 2_000_000),
                    ..Limits::default()
                },
            ),
        ]);
        assert_eq!(w.provider_limits, expected);
        assert_eq!(
            w.limits_for(openai),
            Limits {
                connections: rate(5.0, 40),
                tokens_per_day: Some(1_000_000),
                ..wide
            }
        );
        assert_eq!(
            w.limits_for(mistral).bandwidth,
            bandwidth(500_000, 2_000_000)
        );
        assert_eq!(w.limits_for(builtin_index("anthropic")), wide);
        let batch = &p.workloads[1];
        assert_eq!(
            batch.limits,
            Limits {
                connections: rate(0.5, 1),
                ..Limits::default()
            }
        );
        assert!(batch.provider_limits.is_empty());
        assert_eq!(ok("").state_dir, PathBuf::from("/var/lib/llm-egress"));
        assert!(
            ok(&workload(&format!("name = \"w\"\n{UNIT}"))).workloads[0]
                .limits
                .is_empty()
        );
    }

    #[test]
    fn limit_bursts_have_defaults() {
        let limits = |keys: &str| ok(&with_limits(keys)).workloads[0].limits;
        let cases = [(0.5, 1), (1.0, 1), (2.5, 3), (20.0, 20), (1e6, 1_000_000)];
        for (per_second, burst) in cases {
            let l = limits(&format!("connections_per_second = {per_second:?}\n"));
            assert_eq!(l.connections, rate(per_second, burst), "{per_second}");
        }
        assert_eq!(
            limits("connections_per_second = 7\n").connections,
            rate(7.0, 7)
        );
        let cases = [
            (1, MIN_BYTES_BURST),
            (200_000, MIN_BYTES_BURST),
            (10_000_000, 5_000_000),
            (100_000_000_000, MAX_BYTES_BURST),
        ];
        for (per_second, burst) in cases {
            let l = limits(&format!("bytes_per_second = {per_second}\n"));
            assert_eq!(l.bandwidth, bandwidth(per_second, burst), "{per_second}");
        }
        // An override that sets only the rate gets the default burst of its
        // rate when the workload has no explicit burst.
        let p = ok(&with_limits(
            "bytes_per_second = 1_000_000\n\n[workloads.limits.providers.openai]\nbytes_per_second = 20_000_000\n",
        ));
        let openai = builtin_index("openai");
        assert_eq!(
            p.workloads[0].limits_for(openai).bandwidth,
            bandwidth(20_000_000, 10_000_000)
        );
        // An override that sets only a burst inherits the workload's rate.
        let p = ok(&with_limits(
            "connections_per_second = 3\nbytes_per_second = 1_000_000\n\n\
             [workloads.limits.providers.openai]\nburst = 9\nbytes_burst = 262144\n",
        ));
        assert_eq!(
            p.workloads[0].provider_limits.get(&openai),
            Some(&Limits {
                connections: rate(3.0, 9),
                bandwidth: bandwidth(1_000_000, 262_144),
                ..Limits::default()
            })
        );
        // The largest values are accepted.
        ok(&with_limits(
            "connections_per_second = 1_000_000\nburst = 1_000_000\n\
             bytes_per_second = 100_000_000_000\nbytes_burst = 1_000_000_000\n\
             tokens_per_minute = 1_000_000_000_000\ntokens_per_day = 1_000_000_000_000_000\n",
        ));
    }

    #[test]
    fn invalid_limit_values_are_rejected() {
        // (key = value, message); a burst's rate comes after it, on line 8.
        let cases = [
            (
                "connections_per_second = 0",
                "leave the key out for no limit",
            ),
            ("connections_per_second = -1", "must be 0.001 to 1000000"),
            ("connections_per_second = -0.5", "must be 0.001 to 1000000"),
            ("connections_per_second = 0.0001", "thousandths"),
            (
                "connections_per_second = 1_000_001",
                "must be 0.001 to 1000000",
            ),
            ("connections_per_second = 1e300", "must be 0.001 to 1000000"),
            ("connections_per_second = nan", "not a finite number"),
            ("connections_per_second = inf", "not a finite number"),
            ("connections_per_second = -inf", "not a finite number"),
            ("burst = 0", "must be 1 to 1000000 (connections)"),
            ("burst = -3", "must be 1 to 1000000"),
            ("burst = 1_000_001", "must be 1 to 1000000"),
            ("bytes_per_second = 0", "leave the key out"),
            ("bytes_per_second = -1", "must be 1 to 100000000000"),
            (
                "bytes_per_second = 100_000_000_001",
                "must be 1 to 100000000000",
            ),
            (
                "bytes_burst = 131071",
                "could never pass one large (64 KiB) packet",
            ),
            ("bytes_burst = 0", "must be 131072 to 1000000000 (bytes)"),
            ("bytes_burst = -131072", "must be 131072 to"),
            (
                "bytes_burst = 1_000_000_001",
                "must be 131072 to 1000000000",
            ),
            (
                "tokens_per_minute = 0",
                "must be 1 to 1000000000000 (tokens)",
            ),
            (
                "tokens_per_minute = 1_000_000_000_001",
                "must be 1 to 1000000000000",
            ),
            ("tokens_per_day = -5", "must be 1 to 1000000000000000"),
            (
                "tokens_per_day = 1_000_000_000_000_000_000",
                "must be 1 to 1000000000000000",
            ),
            ("tokens_per_day = 9223372036854775807", "must be 1 to"),
        ];
        for (line, message) in cases {
            let (name, value) = line.split_once(" = ").unwrap_or_default();
            let rate = match name {
                "burst" => "connections_per_second = 1\n",
                "bytes_burst" => "bytes_per_second = 1\n",
                _ => "",
            };
            let text = with_limits(&format!("{line}\n{rate}"));
            let e = one_error(
                &text,
                &format!("workloads[0].limits.{name}"),
                7,
                name.len() + 4,
                message,
            );
            assert_eq!(e.value.as_deref(), Some(value));
        }
        // The same checks in an override, with its key path.
        let text = with_limits(
            "[workloads.limits.providers.openai]\nburst = 0\nconnections_per_second = 1\n",
        );
        let e = one_error(
            &text,
            "workloads[0].limits.providers.openai.burst",
            8,
            9,
            "must be 1 to",
        );
        assert_eq!(
            e.to_string(),
            "test.toml:8:9: workloads[0].limits.providers.openai.burst = 0: \
             must be 1 to 1000000 (connections); leave the key out for no limit"
        );
    }

    #[test]
    fn limit_integers_beyond_i64_are_toml_errors() {
        let text = with_limits("tokens_per_day = 9223372036854775808\n");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{}", PolicyErrors(errors.clone()));
        assert_eq!(errors[0].line, 7);
        assert_eq!(errors[0].key, "workloads[0].limits.tokens_per_day");
        let text = with_limits("bytes_per_second = 2.5\n");
        let e = one_error(
            &text,
            "workloads[0].limits.bytes_per_second",
            7,
            20,
            "invalid type",
        );
        assert_eq!(e.value, None);
        one_error(
            &with_limits("connections_per_second = \"20\"\n"),
            "workloads[0].limits.connections_per_second",
            7,
            26,
            "invalid type",
        );
    }

    #[test]
    fn burst_needs_a_rate() {
        let e = one_error(
            &with_limits("burst = 40\n"),
            "workloads[0].limits.burst",
            7,
            9,
            "`burst` without `connections_per_second`",
        );
        assert_eq!(e.value.as_deref(), Some("40"));
        one_error(
            &with_limits("tokens_per_minute = 5\nbytes_burst = 262144\n"),
            "workloads[0].limits.bytes_burst",
            8,
            15,
            "`bytes_burst` without `bytes_per_second`",
        );
        // In an override: the rate may come from the workload-wide level, or
        // from the override itself.
        let text = with_limits(
            "bytes_per_second = 1_000_000\n\n[workloads.limits.providers.openai]\nburst = 2\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.burst",
            10,
            9,
            "here or in the workload's [workloads.limits]",
        );
        ok(&with_limits(
            "[workloads.limits.providers.openai]\nburst = 2\nconnections_per_second = 1\n",
        ));
        ok(&with_limits(
            "connections_per_second = 1\n[workloads.limits.providers.openai]\nburst = 2\n",
        ));
        // A workload-wide burst with the rate only in an override is not.
        let text = with_limits(
            "burst = 2\n[workloads.limits.providers.openai]\nconnections_per_second = 1\n",
        );
        one_error(&text, "workloads[0].limits.burst", 7, 9, "`burst` without");
    }

    #[test]
    fn tokens_per_day_below_tokens_per_minute() {
        let text = with_limits("tokens_per_minute = 1000\ntokens_per_day = 999\n");
        one_error(
            &text,
            "workloads[0].limits.tokens_per_day",
            8,
            18,
            "must not be below tokens_per_minute (1000)",
        );
        ok(&with_limits(
            "tokens_per_minute = 1000\ntokens_per_day = 1000\n",
        ));
        // Merged with the workload-wide level, reported in the override.
        let text = with_limits(
            "tokens_per_minute = 1000\n\n[workloads.limits.providers.openai]\ntokens_per_day = 500\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.tokens_per_day",
            10,
            18,
            "must not be below tokens_per_minute (1000, from workloads[0].limits)",
        );
        let text = with_limits(
            "tokens_per_day = 500\n\n[workloads.limits.providers.openai]\ntokens_per_minute = 1000\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.tokens_per_minute",
            10,
            21,
            "must not be above tokens_per_day (500, from workloads[0].limits)",
        );
    }

    #[test]
    fn unknown_provider_in_limits() {
        let text = with_limits(
            "connections_per_second = 5\n\n[workloads.limits.providers.opneai]\nburst = 5\n",
        );
        let e = one_error(
            &text,
            "workloads[0].limits.providers.opneai",
            10,
            9,
            "\"opneai\" is not a provider (built-in or in this policy); did you mean \"openai\"?",
        );
        assert_eq!(e.value, None);
        // An empty override is reported at the workload-wide keys.
        let text = with_limits("tokens_per_day = 9\n[workloads.limits.providers.\"Open AI\"]\n");
        one_error(
            &text,
            "workloads[0].limits.providers.\"Open AI\"",
            7,
            18,
            "not a provider",
        );
        // … and with none, at the workload.
        let text = format!(
            "mode = \"audit\"\n{}",
            workload(&format!(
                "name = \"w\"\n{UNIT}[workloads.limits.providers.nope]\n"
            ))
        );
        let e = one_error(&text, "workloads[0].limits.providers.nope", 2, 1, "");
        assert!(!e.message.contains("did you mean"), "{e}");
        let text = format!(
            "{}\n{}",
            provider("name = \"openai\"\ndisabled = true\n"),
            workload(&format!(
                "name = \"w\"\n{UNIT}[workloads.limits.providers.openai]\ntokens_per_day = 1\n"
            ))
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai",
            9,
            18,
            "provider `openai` is disabled",
        );
        // A provider of this policy; one the workload denies.
        let p = ok(&format!(
            "{}\n{}deny = [\"anthropic\"]\n[workloads.limits.providers.mine]\ntokens_per_day = 1\n\
             [workloads.limits.providers.anthropic]\ntokens_per_day = 2\n",
            provider("name = \"mine\"\nhosts = [\"llm.example\"]\n"),
            workload(&format!("name = \"w\"\n{UNIT}"))
        ));
        let mine = p.providers.len() - 1;
        let days: Vec<(usize, Option<u64>)> = (p.workloads[0].provider_limits.iter())
            .map(|(i, l)| (*i, l.tokens_per_day))
            .collect();
        let mut expected = vec![(mine, Some(1)), (builtin_index("anthropic"), Some(2))];
        expected.sort();
        assert_eq!(days, expected);
    }

    #[test]
    fn unknown_key_in_limits() {
        one_error(
            &with_limits("connections_per_minute = 5\n"),
            "workloads[0].limits.connections_per_minute",
            7,
            1,
            "unknown field `connections_per_minute`",
        );
        // An override has no `providers` of its own.
        let text = with_limits(
            "[workloads.limits.providers.openai]\nproviders = { anthropic = { burst = 1 } }\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.providers",
            8,
            1,
            "unknown field `providers`",
        );
        one_error(
            &workload(&format!("name = \"w\"\n{UNIT}limits = {{ rate = 1 }}\n")),
            "workloads[0].limits.rate",
            4,
            12,
            "unknown field `rate`",
        );
    }

    #[test]
    fn relative_state_dir() {
        let e = one_error(
            "mode = \"audit\"\nstate_dir = \"var/lib/llm-egress\"\n",
            "state_dir",
            2,
            13,
            "must be an absolute path",
        );
        assert_eq!(e.value.as_deref(), Some("\"var/lib/llm-egress\""));
    }

    #[test]
    fn docs_limits_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md");
        let doc =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let section = doc
            .find("\n## Limits\n")
            .unwrap_or_else(|| panic!("no Limits section"));
        let start = doc[section..]
            .find("```toml\n")
            .map(|i| section + i + "```toml\n".len());
        let end = start.and_then(|s| doc[s..].find("\n```").map(|end| s + end + 1));
        let (Some(start), Some(end)) = (start, end) else {
            panic!("{path}: no ```toml block under ## Limits");
        };
        let text = format!(
            "{}{}",
            "\n".repeat(doc[..start].lines().count()),
            &doc[start..end]
        );
        let p = Policy::parse(&text, "docs/policy.md").unwrap_or_else(|e| panic!("{e}"));
        let w = &p.workloads[0];
        assert_eq!(w.limits.connections, rate(20.0, 40));
        assert_eq!(
            w.limits_for(builtin_index("openai")).connections,
            rate(5.0, 40),
            "the doc says so"
        );
        // The example in the top of the page sets limits too.
        let start = doc.find("```toml\n").unwrap_or(0);
        assert!(doc[start..section].contains("[workloads.limits]"));
    }

    #[test]
    fn programs_connect_refuses_the_limits_that_need_the_other_programs() {
        let text = format!(
            "programs = \"connect\"\n{}",
            with_limits(
                "connections_per_second = 5\nbytes_per_second = 1_000_000\nbytes_burst = 2_000_000\n\
                 tokens_per_minute = 100\ntokens_per_day = 1000\n\
                 [workloads.limits.providers.openai]\ntokens_per_day = 500\n"
            )
        );
        let found: Vec<(String, usize)> = errors(&text)
            .iter()
            .map(|e| {
                assert!(e.message.contains("needs programs = \"all\""), "{e}");
                (e.key.clone(), e.line)
            })
            .collect();
        let limits = "workloads[0].limits";
        assert_eq!(
            found,
            [
                (format!("{limits}.bytes_per_second"), 9),
                (format!("{limits}.bytes_burst"), 10),
                (format!("{limits}.tokens_per_minute"), 11),
                (format!("{limits}.tokens_per_day"), 12),
                (format!("{limits}.providers.openai.tokens_per_day"), 14),
            ]
        );
        // The connection rate is the connect hook's own: accepted.
        let p = ok(&format!(
            "programs = \"connect\"\n{}",
            with_limits("connections_per_second = 5\nburst = 9\n")
        ));
        assert_eq!(p.programs, Programs::Connect);
        assert_eq!(p.workloads[0].limits.connections, rate(5.0, 9));
        // The same limits are fine with every program attached.
        assert_eq!(
            ok(&with_limits("tokens_per_minute = 100\n")).programs,
            Programs::All
        );
    }
}
