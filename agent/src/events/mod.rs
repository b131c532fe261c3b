//! Events: the ring-buffer reader (this file) decodes kernel records
//! (`decode`), makes them audit records attributed and named (`records`,
//! `names`) and hands them to metrics, the audit log and accounting.
//! The plaintext chunks of `exact_tokens` workloads come here too, to the
//! connection accounting that owns their connections: the ring is drained
//! before each chunk, so the connect that opened its connection is seen
//! first.

pub mod decode;
pub mod names;
pub mod records;

use std::{sync::Arc, time::Duration};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use llm_egress_common::{ConnEvent, EVENTS_WAKE_NS};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::{
    accounting::connections::Accounting,
    capture::reader::PlaintextChunk,
    kernel::ring::RingReader,
    policy::Policy,
    telemetry::audit::{rfc3339, wall_time},
};
use decode::{Decoded, decode};
use names::names_of;
use records::{Context, attribute, sni_record, to_record};

fn handle(bytes: &[u8], ctx: &Context, accounting: &mut Accounting) {
    match decode(bytes) {
        None => ctx.metrics.event_errors.inc(),
        Some(Decoded::Decision(ev)) => {
            let record = to_record(&ev, ctx);
            let provider = record.provider.as_deref().unwrap_or("none");
            // Only what the kernel tracks gets a summary that closes it
            // again (with `programs = "connect"` nothing is tracked).
            if ev.data.tracked != 0 {
                accounting.opened(ev.data.cookie, &record.workload, provider, &record.who);
            }
            ctx.audit.record(&record, &ctx.metrics);
        }
        Some(Decoded::Sni(ev)) => {
            let record = sni_record(&ev, ctx);
            ctx.audit.record(&record, &ctx.metrics);
        }
        Some(Decoded::Dns(msg)) => {
            let sent = ctx
                .dns_fallback
                .as_ref()
                .is_some_and(|tx| tx.try_send(msg).is_ok());
            if !sent {
                ctx.metrics
                    .dns_fallback
                    .with_label_values(&["dropped"])
                    .inc();
            }
        }
        Some(Decoded::Conn(ev)) => {
            let d = &ev.data;
            let (workload, provider) =
                names_of(&ctx.names, d.generation, d.workload_id, d.provider_id);
            let time = rfc3339(wall_time(if d.closed_ns != 0 {
                d.closed_ns
            } else {
                d.reported_ns
            }));
            let names = (workload, provider.unwrap_or_else(|| "none".into()));
            if let Some(record) = accounting.stats(&ev, names, attribute(&ev.header, ctx), time) {
                ctx.audit.record(&record, &ctx.metrics);
            }
        }
    }
}

/// How often process series expire and lost summaries are reconciled.
const HOUSEKEEPING: Duration = Duration::from_secs(10);

/// Handles every record the ring holds.
fn drain(ring: &mut RingBuf<MapData>, ctx: &Context, accounting: &mut Accounting) {
    while let Some(item) = ring.next() {
        handle(&item, ctx, accounting);
    }
}

/// Writes the summaries whose grace for late plaintext has passed.
fn flush(ctx: &Context, accounting: &mut Accounting) {
    for record in accounting.flush(std::time::Instant::now()) {
        ctx.audit.record(&record, &ctx.metrics);
    }
}

/// The next plaintext chunk; never, without a channel (or once it closed).
async fn next_chunk(chunks: &mut Option<mpsc::Receiver<PlaintextChunk>>) -> PlaintextChunk {
    if let Some(rx) = chunks {
        if let Some(c) = rx.recv().await {
            return c;
        }
        *chunks = None;
    }
    std::future::pending().await
}

/// A new policy and its generation, for the reader (telemetry settings,
/// exact-token prices and secret patterns).
pub type PolicyUpdate = (Arc<Policy>, u64);

/// Reads the ring buffer until the task is dropped.
/// `conns` is the kernel's `CONNS` map, read to find connections whose
/// summary was lost; `policy` receives each new policy and its generation
/// on reload (telemetry settings, exact-token prices and secret patterns);
/// `chunks` carries the plaintext of `exact_tokens` workloads.
pub async fn read(
    ring: RingBuf<MapData>,
    ctx: Context,
    mut accounting: Accounting,
    conns: Option<BpfHashMap<MapData, u64, ConnEvent>>,
    mut policy: watch::Receiver<PolicyUpdate>,
    mut chunks: Option<mpsc::Receiver<PlaintextChunk>>,
    alive: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut reader = match RingReader::new(ring, Duration::from_nanos(EVENTS_WAKE_NS)) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot poll the event ring buffer; no events will be reported");
            alive.store(false, std::sync::atomic::Ordering::SeqCst);
            return;
        }
    };
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    // Summaries held for late plaintext are written once their grace passed.
    let mut grace = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ready = reader.wait() => {
                if let Err(e) = ready {
                    warn!(error = %e, "event ring buffer poll failed");
                    alive.store(false, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                drain(reader.ring(), &ctx, &mut accounting);
            }
            _ = grace.tick() => flush(&ctx, &mut accounting),
            chunk = next_chunk(&mut chunks) => {
                drain(reader.ring(), &ctx, &mut accounting);
                accounting.plaintext(&chunk);
            }
            _ = housekeeping.tick() => {
                accounting.expire();
                accounting.save_learning();
                if let Some(conns) = &conns {
                    // The kernel's list first, then the summaries already
                    // submitted: a connection that closed before the list
                    // was read is closed by its summary, not reconciled.
                    let live: std::collections::HashSet<u64> = conns.keys().filter_map(Result::ok).collect();
                    drain(reader.ring(), &ctx, &mut accounting);
                    let missing = accounting.reconcile(&live, std::time::Instant::now());
                    ctx.metrics.summaries_missing.inc_by(missing as u64);
                }
            }
            Ok(()) = policy.changed() => {
                let (p, generation) = policy.borrow_and_update().clone();
                accounting.set_config(p.telemetry.clone());
                accounting.set_policy(&p, generation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decode::*, names::*, *};
    use llm_egress_common::ConnectDecision;
    use llm_egress_common::{ConnectEvent, EventHeader, family, kind, verdict};

    fn bytes_of(ev: &ConnectEvent) -> Vec<u8> {
        // SAFETY: repr(C) plain-integer struct without implicit padding.
        unsafe {
            std::slice::from_raw_parts(
                (ev as *const ConnectEvent).cast::<u8>(),
                size_of::<ConnectEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decode_round_trips_and_rejects_short_or_unknown_records() {
        let mut ev = ConnectEvent::default();
        ev.header.kind = kind::CONNECT_DECISION;
        ev.data = ConnectDecision {
            port: 443,
            verdict: verdict::DENY,
            family: family::INET,
            addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        let b = bytes_of(&ev);
        assert_eq!(decode(&b), Some(Decoded::Decision(ev)));
        assert_eq!(
            family::ip(ev.data.family, &ev.data.addr).to_string(),
            "192.0.2.1"
        );
        assert_eq!(decode(&b[..50]), None);
        let mut conn = ConnEvent::default();
        conn.header.kind = kind::CONN_SUMMARY;
        conn.data.bytes_sent = 5;
        // SAFETY: as above.
        let cb = unsafe {
            std::slice::from_raw_parts(
                (&conn as *const ConnEvent).cast::<u8>(),
                size_of::<ConnEvent>(),
            )
        };
        assert_eq!(decode(cb), Some(Decoded::Conn(conn)));
        assert_eq!(decode(&cb[..100]), None, "a short summary is not decoded");
        let mut other = ev;
        other.header.kind = 99;
        assert_eq!(decode(&bytes_of(&other)), None);
    }

    #[test]
    fn an_unparsed_dns_event_carries_its_message() {
        let mut ev = llm_egress_common::DnsEvent {
            header: EventHeader {
                kind: kind::DNS_UNPARSED,
                ..EventHeader::default()
            },
            data: llm_egress_common::DnsPacket {
                len: 3,
                msg_len: 3,
                why: 1,
                _pad: 0,
                scope: 77,
                data: [0; llm_egress_common::DNS_EVENT_BYTES],
            },
        };
        ev.data.data[..3].copy_from_slice(&[1, 2, 3]);
        // SAFETY: repr(C) plain-integer struct without implicit padding.
        let b = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const llm_egress_common::DnsEvent).cast::<u8>(),
                size_of::<llm_egress_common::DnsEvent>(),
            )
        };
        assert_eq!(
            decode(b),
            Some(Decoded::Dns(DnsAnswer {
                scope: 77,
                msg: vec![1, 2, 3]
            }))
        );
        assert_eq!(decode(&b[..200]), None, "a short DNS event is not decoded");
    }

    #[test]
    fn names_follow_the_generation_of_the_event() {
        let names = Names::default();
        names.push(NameTable {
            generation: 1,
            workloads: vec!["old".into()],
            providers: vec![],
        });
        names.push(NameTable {
            generation: 2,
            workloads: vec!["new".into()],
            providers: vec![],
        });
        assert_eq!(names.table(1).unwrap().workloads[0], "old");
        assert_eq!(names.table(2).unwrap().workloads[0], "new");
        assert_eq!(names.table(9).unwrap().workloads[0], "new");
    }
}
