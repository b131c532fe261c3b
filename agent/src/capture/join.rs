//! Plaintext calls that came without a socket cookie, held until the
//! kernel joins their `SSL*` to a socket (a `LINK` record: OpenSSL over
//! memory BIOs, as in Node.js; docs/plaintext.md, "Memory BIOs") or for at
//! most [`HOLD`], after which they go on as they are (cookie 0: read by no
//! connection, `no_connection`). A later call of the same `SSL*` that has
//! a cookie joins the held ones too: one `SSL*` is one connection.
//!
//! Bounded: at most [`HELD_BYTES`] of plaintext held; beyond, a call
//! without a cookie goes on at once.
//!
//! Who can change the inputs: the cookie comes from the kernel's socket,
//! the `SSL*` from the process's own call (a process can only misjoin its
//! own calls, to its own sockets).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::capture::reader::PlaintextChunk;

/// How long a call without a cookie waits for its `SSL*` to be joined.
pub const HOLD: Duration = Duration::from_millis(500);
/// Plaintext bytes held at once.
pub const HELD_BYTES: usize = 8 << 20;

#[derive(Default)]
pub struct Joiner {
    /// (pid, `SSL*`) → when the first call came, the calls in order.
    held: HashMap<(u32, u64), (Instant, Vec<PlaintextChunk>)>,
    bytes: usize,
}

impl Joiner {
    /// A call from the kernel: what goes on now, in order.
    pub fn chunk(&mut self, c: PlaintextChunk, now: Instant) -> Vec<PlaintextChunk> {
        let key = (c.pid, c.ssl);
        if c.cookie != 0 {
            let mut out = self.release(key, c.cookie);
            out.push(c);
            return out;
        }
        if self.bytes + c.data.len() > HELD_BYTES {
            return vec![c];
        }
        self.bytes += c.data.len();
        self.held
            .entry(key)
            .or_insert_with(|| (now, Vec::new()))
            .1
            .push(c);
        Vec::new()
    }

    /// The kernel joined `ssl` of `pid` to the socket with `cookie`.
    pub fn link(&mut self, pid: u32, ssl: u64, cookie: u64) -> Vec<PlaintextChunk> {
        self.release((pid, ssl), cookie)
    }

    /// Calls held longer than [`HOLD`], as they are.
    pub fn expire(&mut self, now: Instant) -> Vec<PlaintextChunk> {
        let old: Vec<(u32, u64)> = self
            .held
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) >= HOLD)
            .map(|(k, _)| *k)
            .collect();
        old.into_iter().flat_map(|k| self.release(k, 0)).collect()
    }

    /// When [`Joiner::expire`] next has something to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held.values().map(|(since, _)| *since + HOLD).min()
    }

    /// Everything held, as it is (the reader ends).
    pub fn release_all(&mut self) -> Vec<PlaintextChunk> {
        let keys: Vec<(u32, u64)> = self.held.keys().copied().collect();
        keys.into_iter().flat_map(|k| self.release(k, 0)).collect()
    }

    fn release(&mut self, key: (u32, u64), cookie: u64) -> Vec<PlaintextChunk> {
        let Some((_, mut chunks)) = self.held.remove(&key) else {
            return Vec::new();
        };
        for c in &mut chunks {
            self.bytes -= c.data.len();
            if cookie != 0 {
                c.cookie = cookie;
            }
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::reader::Direction;

    fn call(pid: u32, ssl: u64, cookie: u64, data: &[u8]) -> PlaintextChunk {
        PlaintextChunk {
            cookie,
            ssl,
            pid,
            tid: pid,
            cgroup_id: 1,
            direction: Direction::Sent,
            time_ns: 0,
            data: data.to_vec(),
            call_len: data.len() as u64,
            truncated: false,
            complete: true,
        }
    }

    #[test]
    fn a_link_releases_the_held_calls_in_order_with_the_cookie() {
        let (mut j, t) = (Joiner::default(), Instant::now());
        assert!(j.chunk(call(7, 0xa, 0, b"POST "), t).is_empty());
        assert!(j.chunk(call(7, 0xa, 0, b"body"), t).is_empty());
        assert!(j.chunk(call(7, 0xb, 0, b"other"), t).is_empty());
        let out = j.link(7, 0xa, 42);
        let got: Vec<(&[u8], u64)> = out.iter().map(|c| (&c.data[..], c.cookie)).collect();
        assert_eq!(got, [(&b"POST "[..], 42), (&b"body"[..], 42)]);
        assert!(j.link(8, 0xb, 43).is_empty(), "another process's SSL*");
        assert_eq!(j.bytes, 5);
    }

    #[test]
    fn a_later_call_with_a_cookie_takes_the_held_ones_along() {
        let (mut j, t) = (Joiner::default(), Instant::now());
        j.chunk(call(7, 0xa, 0, b"one"), t);
        let out = j.chunk(call(7, 0xa, 9, b"two"), t);
        let got: Vec<(&[u8], u64)> = out.iter().map(|c| (&c.data[..], c.cookie)).collect();
        assert_eq!(got, [(&b"one"[..], 9), (&b"two"[..], 9)]);
        assert_eq!(j.bytes, 0);
    }

    #[test]
    fn unjoined_calls_go_on_without_a_cookie_after_the_hold() {
        let (mut j, t) = (Joiner::default(), Instant::now());
        j.chunk(call(7, 0xa, 0, b"one"), t);
        assert!(j.expire(t + HOLD / 2).is_empty());
        assert_eq!(j.next_expiry(), Some(t + HOLD));
        let out = j.expire(t + HOLD);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].cookie, 0);
        assert_eq!(j.next_expiry(), None);
    }

    #[test]
    fn beyond_the_bound_a_call_goes_on_at_once() {
        let (mut j, t) = (Joiner::default(), Instant::now());
        let big = vec![b'x'; HELD_BYTES];
        assert!(j.chunk(call(7, 0xa, 0, &big), t).is_empty());
        assert_eq!(j.chunk(call(7, 0xb, 0, b"y"), t).len(), 1);
        assert_eq!(j.release_all().len(), 1);
        assert_eq!(j.bytes, 0);
    }
}
