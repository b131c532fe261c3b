//! Token counts of one live connection, from the snapshots of its traffic
//! the kernel sends (`CONN_UPDATE` every ≥ 5 s while the client's data is
//! being acknowledged, `CONN_SUMMARY` at close).
//!
//! At each update the connection's tokens so far are counted, cautiously:
//! the prompt as the smallest of the response shapes' estimates, with one
//! request more than seen, the
//! completion only once the response is recognisably a stream (a buffered
//! body's bytes could still turn out to be an embedding, or a stream's). At
//! close the rest up to the final estimate ([`crate::accounting::tokens`]) is added, so
//! the increments of a connection add up to its final estimate — the one a
//! close-only count would make. Only when an update counted more than the
//! final estimate (the traffic changed shape after it: rare) is the final
//! figure what was counted, since a counter cannot go back.
//!
//! Requests: sock_ops sends an update on an RTT sample, that is when data
//! the client sent is acknowledged, at most every 5 s. On a keep-alive
//! connection the client sends only requests, so an update that shows more
//! sent bytes than the previous snapshot marks the start of a further
//! request (`turns`: the first request, plus one per such update). Requests
//! less than 5 s after the previous update are not seen this way, and a
//! second request the first update took from the segments alone is taken
//! back at close if no response followed it (it was the client's TLS
//! close_notify, acknowledged at close) (the
//! count is low, and the estimate high, as for a connection taken as one
//! request). The count is capped by [`tokens::max_requests`] (each request
//! carries at least most of the fixed bytes of one).

use crate::accounting::tokens::{self, Client, Estimate, Family, Shape, Traffic};

/// More sent bytes than this between two snapshots is a new request (the
/// smallest request of the corpus sends ~0.5 kB of headers and body).
pub const MIN_TURN_BYTES: u64 = 300;

/// A request is answered: at least this many bytes arrive after it (the
/// smallest response of the corpus, headers included, is ~1.5 kB). A first
/// update whose last segment was not answered was acknowledging the
/// client's TLS close_notify (curl sends one before closing), not a
/// request.
pub const MIN_RESPONSE_BYTES: u64 = 500;

/// What one connection has added to `llm_egress_tokens_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub prompt: u64,
    pub completion: u64,
    /// Requests seen starting: the first, and one per update that showed
    /// the client sending again.
    turns: u32,
    last_sent: u64,
    /// Received bytes at the first update, when it counted a second request
    /// from the segments alone, until the close shows it was answered.
    unanswered: Option<u64>,
}

impl Counted {
    /// An update with the traffic so far; returns the (prompt, completion)
    /// increments.
    pub fn update(&mut self, family: Family, client: Client, t: &Traffic) -> (u64, u64) {
        if self.turns == 0 && t.bytes_sent >= tokens::MIN_REQUEST_BYTES {
            // The first request, and this update's own if the client sent
            // the segments of two requests after its handshake (else the
            // update came while the first request was still being sent).
            let two = t.segments_out
                >= tokens::HANDSHAKE_SEGMENTS_SENT + 2 * client.segments_per_request();
            self.turns = if two { 2 } else { 1 };
            self.last_sent = t.bytes_sent;
            self.unanswered = two.then_some(t.bytes_received);
        } else if self.turns > 0 && t.bytes_sent >= self.last_sent + MIN_TURN_BYTES {
            // More than a close_notify: a request (and the client sent
            // again, so the first update's second request was one too).
            self.turns += 1;
            self.last_sent = t.bytes_sent;
            self.unanswered = None;
        }
        let Some(e) = tokens::estimate_requests(family, client, t, self.turns) else {
            return (0, 0);
        };
        // One request more than seen: a request that started less than
        // 5 s after the previous update is in these bytes but not in
        // `turns`, and would lower the final estimate.
        let prompt = [Shape::Buffered, Shape::Streamed, Shape::NotGenerated]
            .into_iter()
            .map(|s| tokens::prompt_as(family, client, t, e.requests + 1, s))
            .min()
            .unwrap_or(0);
        let completion = if e.shape == Shape::Streamed {
            e.completion
        } else {
            0
        };
        self.grow_to(prompt, completion)
    }

    /// The close: the connection's estimate (never below what was counted)
    /// and the last increments; `None` when it carried no request.
    pub fn close(
        &mut self,
        family: Family,
        client: Client,
        t: &Traffic,
    ) -> Option<(Estimate, (u64, u64))> {
        if let Some(received) = self.unanswered.take()
            && t.bytes_received < received + MIN_RESPONSE_BYTES
        {
            self.turns = self.turns.saturating_sub(1).max(1);
        }
        let mut e = tokens::estimate_requests(family, client, t, self.turns)?;
        e.prompt = e.prompt.max(self.prompt);
        e.completion = e.completion.max(self.completion);
        let inc = self.grow_to(e.prompt, e.completion);
        Some((e, inc))
    }

    /// The estimate of `t` with the requests seen so far (what a learned
    /// correction applies to while the connection is open).
    pub fn estimate_now(&self, family: Family, client: Client, t: &Traffic) -> Option<Estimate> {
        tokens::estimate_requests(family, client, t, self.turns)
    }

    fn grow_to(&mut self, prompt: u64, completion: u64) -> (u64, u64) {
        let inc = (
            prompt.saturating_sub(self.prompt),
            completion.saturating_sub(self.completion),
        );
        self.prompt += inc.0;
        self.completion += inc.1;
        inc
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(sent: u64, received: u64, segments_in: u32, segments_out: u32, secs: u64) -> Traffic {
        Traffic {
            bytes_sent: sent,
            bytes_received: received,
            segments_in,
            segments_out,
            duration: Duration::from_secs(secs),
            app_records_in: None,
        }
    }

    /// A long stream: counted while it lasts, and the increments add up to
    /// the close-only estimate.
    #[test]
    fn a_stream_is_counted_while_it_lasts_and_sums_to_the_final_estimate() {
        let (f, c) = (Family::OpenAi, Client::Plain);
        let mut counted = Counted::default();
        let mut total = (0, 0);
        for k in 1..=6u64 {
            // 2 kB request, then ~100 events (330 B each) per 5 s.
            let t = at(3_000, 4_000 + k * 33_000, 10 + 100 * k as u32, 3, 5 * k);
            let inc = counted.update(f, c, &t);
            total = (total.0 + inc.0, total.1 + inc.1);
            assert!(inc.1 > 0, "the completion grows at update {k}");
        }
        assert!(total.0 > 0, "the prompt is counted at the first update");
        let last = at(3_000, 220_000, 660, 3, 33);
        let (e, inc) = counted.close(f, c, &last).unwrap();
        total = (total.0 + inc.0, total.1 + inc.1);
        let close_only = tokens::estimate(f, c, &last).unwrap();
        assert_eq!(
            (e.prompt, e.completion),
            (close_only.prompt, close_only.completion)
        );
        assert_eq!(total, (e.prompt, e.completion));
    }

    /// A buffered body could still be an embedding, or the start of a
    /// stream: not counted before close.
    #[test]
    fn buffered_completions_wait_for_the_close() {
        let (f, c) = (Family::Anthropic, Client::Sdk);
        let mut counted = Counted::default();
        let inc = counted.update(f, c, &at(9_000, 12_000, 6, 3, 6));
        assert_eq!(inc.1, 0);
        let t = at(9_000, 20_000, 9, 4, 9);
        let (e, last) = counted.close(f, c, &t).unwrap();
        assert_eq!(inc.0 + last.0, e.prompt);
        assert_eq!(last.1, e.completion);
        assert_eq!(e, tokens::estimate(f, c, &t).unwrap());
    }

    /// Updates that show the client sending again are requests: the fixed
    /// bytes of each are not taken for tokens.
    #[test]
    fn keep_alive_turns_count_as_requests() {
        let (f, c) = (Family::OpenAi, Client::Plain);
        let mut counted = Counted::default();
        // Three requests, ~1.4 kB sent and ~4 kB received each, 6 s apart:
        // an update as each next request is acknowledged (its answer not
        // in yet), then the close.
        for k in 2..=3u64 {
            let t = at(
                600 + 1_400 * k,
                1_600 + 4_000 * (k - 1),
                4 * k as u32,
                2 + k as u32,
                6 * k,
            );
            counted.update(f, c, &t);
        }
        let t = at(600 + 1_400 * 3, 1_600 + 4_000 * 3, 12, 6, 19);
        let (e, _) = counted.close(f, c, &t).unwrap();
        assert_eq!(e.requests, 3);
        let one = tokens::estimate_requests(f, c, &t, 1).unwrap();
        assert!(
            e.prompt + 200 < one.prompt && e.completion + 500 < one.completion,
            "{e:?} against one request {one:?}"
        );
    }

    /// What was counted is never taken back: if the traffic changes shape
    /// after an update, the final figure is at least the counted one.
    #[test]
    fn the_final_estimate_is_never_below_what_was_counted() {
        let (f, c) = (Family::OpenAi, Client::Plain);
        let mut counted = Counted::default();
        // A stream at the update …
        counted.update(f, c, &at(2_000, 40_000, 120, 2, 5));
        let so_far = counted;
        // … then a burst of full segments: an embedding-like close.
        let t = at(2_000, 2_000_000, 250, 2, 6);
        let (e, inc) = counted.close(f, c, &t).unwrap();
        assert!(e.completion >= so_far.completion && e.prompt >= so_far.prompt);
        assert_eq!(so_far.completion + inc.1, e.completion);
    }

    /// curl's close_notify at the end of a long stream is acknowledged more
    /// than 5 s after the handshake: an update with sent bytes that no
    /// response follows is not a second request.
    #[test]
    fn a_close_notify_is_not_a_request() {
        let (f, c) = (Family::OpenAi, Client::Plain);
        let mut counted = Counted::default();
        let end = at(9_600, 700_000, 2_100, 4, 6);
        counted.update(f, c, &end);
        let (e, _) = counted.close(f, c, &end).unwrap();
        assert_eq!(e.requests, 1);
        assert_eq!((e.prompt, e.completion), {
            let one = tokens::estimate(f, c, &end).unwrap();
            (one.prompt, one.completion)
        });
    }

    /// A request that started unseen, acknowledged with the close_notify
    /// more than 5 s after the previous update, still counts.
    #[test]
    fn a_request_seen_only_at_the_close_notify_counts() {
        let (f, c) = (Family::OpenAi, Client::Plain);
        let mut counted = Counted::default();
        counted.update(f, c, &at(3_400, 5_600, 8, 4, 6));
        let end = at(4_824, 13_600, 12, 6, 12);
        counted.update(f, c, &end);
        let (e, _) = counted.close(f, c, &end).unwrap();
        assert_eq!(e.requests, 3);
    }

    #[test]
    fn no_request_no_count() {
        let mut counted = Counted::default();
        let t = at(600, 2_500, 2, 2, 6);
        assert_eq!(counted.update(Family::OpenAi, Client::Plain, &t), (0, 0));
        assert_eq!(counted.close(Family::OpenAi, Client::Plain, &t), None);
    }
}
