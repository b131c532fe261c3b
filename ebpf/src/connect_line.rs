//! HTTP `CONNECT host:port` requests: the first payload a client sends to
//! a forward proxy (`HTTPS_PROXY=http://proxy:3128`) before the TLS
//! session it tunnels. Called by the SNI program (sni.rs) on a first
//! payload that is not a ClientHello, on the bytes it already copied into
//! its per-socket scratch; this module only reads the request line and
//! says where the host is, sni.rs hashes and judges it like a server name.
//!
//! The request line, as read here (RFC 9110 §9.3.6, authority-form):
//! `CONNECT` (any case: a proxy that matches methods without case would
//! tunnel `connect` too), one space, a host of 1 to 253 bytes of letters,
//! digits, `-`, `.` and `_`, `:`, a port of 1 to 5 digits (1 to 65535),
//! one space. Nothing after the space is read (version, headers).
//! Outcomes:
//! - a host name: `Line::Host`; a host of digits and dots only (an IPv4
//!   literal) or starting with `[` (an IPv6 literal): `Line::IpLiteral`
//!   (no name to judge);
//! - the first segment ends inside the line: `Line::Split`;
//! - anything else (a host over 253 bytes, absolute-form
//!   `CONNECT http://…`, other bytes, no or a bad port): `Line::Malformed`;
//! - not `CONNECT ` at all: `Line::Plain` for an absolute-form plain HTTP
//!   request to a proxy (`GET http://…`), else `Line::Other`.
//!
//! The host is walked one byte per `bpf_loop` step, its state in the
//! caller's map-value scratch (the reasons are in dns.rs and names.rs).
//! Named proxies (`[[proxies]]`) are in `DESTS_V4`/`DESTS_V6` under
//! `PROXY_SCOPE`: [`named_proxy`] says whether a destination is one.

use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, maps::lpm_trie::Key};
use llm_egress_common::{
    MAX_PORTS, PREFIX_KEY_HEADER_BITS, PROXY_SCOPE, PrefixKeyV4, PrefixKeyV6, SNI_BUF, family,
};

use crate::maps::{DESTS_V4, DESTS_V6};

const MASK: usize = SNI_BUF - 1;
/// `CONNECT ` is 8 bytes.
const HOST_AT: usize = 8;
/// Longest host (a DNS name in text form).
pub const MAX_HOST: usize = 253;
/// Steps of the walk: the host, `:`, five digits and the space (an IPv6
/// literal is shorter).
const STEPS: u32 = (MAX_HOST + 8) as u32;

/// What a first payload's request line is.
pub enum Line {
    /// Not a CONNECT request, nor a plain proxy request.
    Other,
    /// An absolute-form plain HTTP request (`GET http://…`): a proxy
    /// request that tunnels nothing.
    Plain,
    /// A CONNECT request naming a host: (offset in the payload, length,
    /// port).
    Host(usize, usize, u16),
    /// A CONNECT request naming an IP address (`1.2.3.4`, `[2001:db8::1]`),
    /// and its port.
    IpLiteral(u16),
    /// The payload ends inside the request line.
    Split,
    /// Not a CONNECT request line this module reads.
    Malformed,
}

/// The walk's state, in the caller's scratch.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LineCtx {
    pos: u64,
    /// Bytes of the payload in the buffer.
    avail: u64,
    /// 0: in the host; 1: in the port; 2: in an IPv6 literal; 3: after
    /// its `]`.
    phase: u64,
    host_len: u64,
    /// 1: the host has a byte that is not a digit or a dot.
    named: u64,
    port: u64,
    digits: u64,
    /// 0: going on; 1: read to the space after the port; 2: split; 3:
    /// malformed.
    end: u64,
}

const GOING: u64 = 0;
const DONE: u64 = 1;
const SPLIT: u64 = 2;
const BAD: u64 = 3;

/// On the stack: the buffer and the state the callback works on.
#[repr(C)]
struct LoopCtx {
    buf: *const [u8; SNI_BUF],
    line: *mut LineCtx,
}

/// Reads the request line at the start of `buf` (`avail` bytes of the
/// payload, at most `SNI_BUF`). `buf` and `line` are the caller's
/// per-socket scratch, which only this run uses.
#[inline(always)]
pub fn read(buf: &[u8; SNI_BUF], line: &mut LineCtx, avail: usize) -> Line {
    // Branch-free compares: a branch per byte would give the verifier a
    // path per combination of outcomes.
    let mut diff = 0u8;
    let mut i = 0;
    while i < HOST_AT - 1 {
        let c = buf[i & MASK] | 0x20;
        // Bytes past a short payload do not count (a cut `CONNECT`).
        let past = (i >= avail) as u8;
        diff |= (c ^ b"connect"[i]) * (1 - past);
        i += 1;
    }
    if avail < HOST_AT {
        return if diff == 0 && avail > 0 {
            Line::Split
        } else {
            Line::Other
        };
    }
    if diff != 0 || buf[(HOST_AT - 1) & MASK] != b' ' {
        return if plain_request(buf, avail) {
            Line::Plain
        } else {
            Line::Other
        };
    }
    // Volatile: the bpf_loop callback changes the state behind this
    // reference (see read_name in dns.rs).
    // SAFETY: valid, aligned fields of the caller's scratch.
    unsafe {
        core::ptr::write_volatile(
            line,
            LineCtx {
                pos: HOST_AT as u64,
                avail: avail as u64,
                phase: 0,
                host_len: 0,
                named: 0,
                port: 0,
                digits: 0,
                end: GOING,
            },
        );
    }
    let mut lc = LoopCtx { buf, line };
    // SAFETY: `step` is a bpf_loop callback; it finds buffer and state
    // through `lc`, which lives on this stack for the call.
    unsafe {
        bpf_loop(
            STEPS,
            step as *mut c_void,
            (&mut lc as *mut LoopCtx).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let (end, host_len, named, port) = unsafe {
        (
            core::ptr::read_volatile(&line.end),
            core::ptr::read_volatile(&line.host_len) as usize,
            core::ptr::read_volatile(&line.named),
            core::ptr::read_volatile(&line.port) as u16,
        )
    };
    match end {
        DONE if named == 0 => Line::IpLiteral(port),
        DONE => Line::Host(HOST_AT, host_len, port),
        SPLIT => Line::Split,
        _ => Line::Malformed,
    }
}

/// Whether the payload starts with `METHOD http://`: 3 to 7 upper-case
/// letters, a space, `http://` (an absolute-form request to a proxy).
#[inline(always)]
fn plain_request(buf: &[u8; SNI_BUF], avail: usize) -> bool {
    let b = |i: usize| buf[i & MASK];
    let mut space = 0;
    let mut i = 0;
    while i < 8 {
        let c = b(i);
        if space == 0 && c == b' ' && i >= 3 {
            space = i;
        } else if space == 0 && !c.is_ascii_uppercase() {
            return false;
        }
        i += 1;
    }
    if space == 0 || space + 8 > avail {
        return false;
    }
    let mut j = 0;
    while j < 7 {
        if b(space + 1 + j) != b"http://"[j] {
            return false;
        }
        j += 1;
    }
    true
}

/// bpf_loop callback: one byte of the request line. Returns 1 to stop.
#[inline(never)]
extern "C" fn step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `LoopCtx`, on its stack for the call.
    let (buf, line) = unsafe {
        let lc = &*(ctx as *const LoopCtx);
        if lc.buf.is_null() || lc.line.is_null() {
            return 1;
        }
        // SAFETY: the caller's scratch, which only this run uses; the
        // caller reads the state with volatile loads after the loop.
        (&*lc.buf, &mut *lc.line)
    };
    if line.end != GOING {
        return 1;
    }
    let pos = line.pos as usize;
    if pos >= line.avail as usize {
        line.end = SPLIT;
        return 1;
    }
    let c = buf[pos & MASK];
    line.pos = (pos + 1) as u64;
    if line.phase == 0 {
        if c == b':' {
            line.end = if line.host_len == 0 { BAD } else { GOING };
            line.phase = 1;
        } else if c == b'[' && line.host_len == 0 {
            line.phase = 2;
        } else if c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_' {
            if !(c.is_ascii_digit() || c == b'.') {
                line.named = 1;
            }
            line.host_len += 1;
            if line.host_len > MAX_HOST as u64 {
                line.end = BAD;
            }
        } else {
            line.end = BAD;
        }
    } else if line.phase == 2 {
        // An IPv6 literal: hex digits, `:` and `.` (a v4 tail) up to `]`,
        // then `:` and the port.
        if c == b']' && line.host_len > 0 {
            line.phase = 3;
        } else if c.is_ascii_hexdigit() || c == b':' || c == b'.' {
            line.host_len += 1;
            if line.host_len > 45 {
                line.end = BAD;
            }
        } else {
            line.end = BAD;
        }
    } else if line.phase == 3 {
        line.phase = 1;
        if c != b':' {
            line.end = BAD;
        }
    } else if c.is_ascii_digit() {
        line.port = line.port * 10 + (c - b'0') as u64;
        line.digits += 1;
        if line.digits > 5 {
            line.end = BAD;
        }
    } else if c == b' ' && line.digits > 0 && line.port > 0 && line.port <= 65_535 {
        line.end = DONE;
    } else {
        line.end = BAD;
    }
    (line.end != GOING) as i64
}

/// Whether `addr` (`family::*`, IPv4 in the first four bytes) on `port` is
/// a named proxy of `slot` (`DESTS_*` under `PROXY_SCOPE`, on one of its
/// ports).
#[inline(always)]
pub fn named_proxy(slot: u32, fam: u8, addr: &[u8; 16], port: u16) -> bool {
    let found = if fam == family::INET {
        let data = PrefixKeyV4 {
            slot,
            scope: PROXY_SCOPE,
            addr: [addr[0], addr[1], addr[2], addr[3]],
        };
        DESTS_V4.get(Key::new(PREFIX_KEY_HEADER_BITS + 32, data))
    } else {
        let data = PrefixKeyV6 {
            slot,
            scope: PROXY_SCOPE,
            addr: *addr,
        };
        DESTS_V6.get(Key::new(PREFIX_KEY_HEADER_BITS + 128, data))
    };
    let Some(d) = found else {
        return false;
    };
    // Early returns: a flag set in the loop would give the verifier a path
    // per combination of matches.
    if d.nports == 0 {
        return true;
    }
    let mut i = 0;
    while i < MAX_PORTS {
        if i as u16 >= d.nports {
            return false;
        }
        if d.ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}
