//! The ring-buffer reader: decodes kernel events, attributes them, names
//! their workload and provider, and hands them to metrics and the audit log.
//!
//! Records are copied out of the ring buffer and checked for size and kind;
//! a record that does not decode is counted, never guessed at. Events carry
//! the policy generation that decided them, and names are looked up in that
//! generation's table (the last few are kept), so a reload never relabels
//! decisions taken under the previous policy.

use std::{
    collections::VecDeque,
    sync::{Arc, RwLock},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use llm_egress_common::{
    ConnEvent, ConnectEvent, EVENTS_WAKE_NS, EventHeader, ExecInfo, NO_PROVIDER, NO_WORKLOAD,
    family, hook, kind, payload, proto, reason, sock, verdict,
};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::{
    accounting::connections::Accounting,
    attribution::process::{CgroupPaths, ExeCache, comm_str},
    policy::{NO_WORKLOAD_NAME, Policy},
    telemetry::audit::{Attribution, AuditSink, DecisionRecord},
    telemetry::audit::{rfc3339, wall_time},
    telemetry::metrics::Metrics,
};

/// Names of one policy generation, indexed by id - 1.
#[derive(Debug, Default)]
pub struct NameTable {
    pub generation: u64,
    pub workloads: Vec<String>,
    pub providers: Vec<String>,
}

impl NameTable {
    pub fn of(policy: &Policy, generation: u64) -> Self {
        Self {
            generation,
            workloads: policy.workloads.iter().map(|w| w.name.clone()).collect(),
            providers: policy.providers.iter().map(|p| p.name.clone()).collect(),
        }
    }
}

/// The name tables of recent generations.
#[derive(Clone, Default)]
pub struct Names(Arc<RwLock<VecDeque<Arc<NameTable>>>>);

const KEPT_GENERATIONS: usize = 8;

impl Names {
    pub fn push(&self, table: NameTable) {
        if let Ok(mut g) = self.0.write() {
            g.push_front(Arc::new(table));
            g.truncate(KEPT_GENERATIONS);
        }
    }

    /// The table of `generation`; an unknown one (decided before this agent
    /// started) uses the newest table: ids follow policy order, so they
    /// agree whenever the policy file did not change.
    fn table(&self, generation: u64) -> Option<Arc<NameTable>> {
        let g = self.0.read().ok()?;
        g.iter()
            .find(|t| t.generation == generation)
            .or_else(|| g.front())
            .cloned()
    }
}

/// A DNS answer the kernel could not parse, for the agent's parser.
#[derive(Debug, PartialEq)]
pub struct DnsAnswer {
    /// Whose the addresses it teaches are (`LearnedKeyV4::scope`: the
    /// receiving socket's workload, as the kernel found it).
    pub scope: u64,
    pub msg: Vec<u8>,
}

/// A decoded ring-buffer record.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Decision(ConnectEvent),
    Conn(ConnEvent),
    /// A `DNS_UNPARSED` event: the message (what the kernel copied) and
    /// the learning scope of the socket that received it.
    Dns(DnsAnswer),
    /// A ClientHello judged by its server name.
    Sni(Box<llm_egress_common::SniEvent>),
}

/// Reads a `T` from the start of `bytes`, if long enough.
fn read_as<T: Copy>(bytes: &[u8]) -> Option<T> {
    // SAFETY: length checked; T is a repr(C) plain-integer event type.
    (bytes.len() >= size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// Decodes one ring-buffer record. None: too short or an unknown kind.
pub fn decode(bytes: &[u8]) -> Option<Decoded> {
    let header: EventHeader = read_as(bytes)?;
    match header.kind {
        kind::CONNECT_DECISION => read_as(bytes).map(Decoded::Decision),
        kind::CONN_SUMMARY | kind::CONN_UPDATE => read_as(bytes).map(Decoded::Conn),
        kind::SNI_DECISION => read_as(bytes).map(|e| Decoded::Sni(Box::new(e))),
        kind::DNS_UNPARSED => {
            let ev: llm_egress_common::DnsEvent = read_as(bytes)?;
            let len = (ev.data.len as usize).min(ev.data.data.len());
            Some(Decoded::Dns(DnsAnswer {
                scope: ev.data.scope,
                msg: ev.data.data[..len].to_vec(),
            }))
        }
        _ => None,
    }
}

/// `EXECS`: tgid → what it last executed (filled by the exec tracepoint).
pub type Execs = Arc<BpfHashMap<MapData, u32, ExecInfo>>;

/// The executable of the process that made `ev`: /proc while it lives, else
/// the path its last exec gave (if that exec came before the event, so a
/// reused pid is never credited with its predecessor's connections).
fn exe_for(h: &EventHeader, ctx: &Context) -> Option<String> {
    let live = ctx.exe_cache.lock().ok().and_then(|mut c| c.get(h.tgid));
    if live.is_some() {
        return live;
    }
    let info = ctx.execs.as_ref()?.get(&h.tgid, 0).ok()?;
    if info.exec_time_ns > h.time_ns {
        return None;
    }
    let len = (info.len as usize).min(info.path.len());
    let path = &info.path[..len];
    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
    Some(String::from_utf8_lossy(&path[..end]).into_owned())
}

/// Everything an event needs to become a record.
#[derive(Clone)]
pub struct Context {
    pub execs: Option<Execs>,
    pub exe_cache: Arc<std::sync::Mutex<ExeCache>>,
    pub names: Names,
    pub cgroups: CgroupPaths,
    pub metrics: Metrics,
    pub audit: AuditSink,
    /// To the agent loop, which parses DNS answers the kernel could not
    /// (crate::names::dns) and writes what they teach (it owns the maps).
    pub dns_fallback: Option<tokio::sync::mpsc::Sender<DnsAnswer>>,
    /// The node's pods, for `pod_name` and `pod_namespace`.
    pub pods: crate::attribution::kube::Pods,
}

/// Process and cgroup of the task an event header describes.
fn attribute(h: &EventHeader, ctx: &Context) -> Attribution {
    let exe = exe_for(h, ctx);
    if exe.is_none() {
        ctx.metrics.attribution_misses.inc();
    }
    let cgroup = ctx.cgroups.path_of(h.cgroup_id, h.tgid).unwrap_or_default();
    let cgroup_info = crate::attribution::cgroup_info::describe(&cgroup);
    let pod = cgroup_info
        .pod_uid
        .as_deref()
        .and_then(|uid| ctx.pods.get(uid));
    Attribution {
        pid: h.pid,
        tgid: h.tgid,
        comm: comm_str(&h.comm),
        exe: exe.unwrap_or_default(),
        uid: h.uid,
        gid: h.gid,
        cgroup_info,
        cgroup,
        pod_name: pod.as_ref().map(|p| p.name.clone()),
        pod_namespace: pod.map(|p| p.namespace.clone()),
    }
}

/// Workload and provider names of ids decided under `generation`.
pub fn names_of(
    names: &Names,
    generation: u64,
    workload_id: u32,
    provider_id: u32,
) -> (String, Option<String>) {
    let table = names.table(generation);
    let name = |list: fn(&NameTable) -> &Vec<String>, id: u32| {
        table
            .as_ref()
            .and_then(|t| list(t).get(id as usize - 1).cloned())
            .unwrap_or_else(|| format!("#{id}"))
    };
    let workload = if workload_id == NO_WORKLOAD {
        NO_WORKLOAD_NAME.to_string()
    } else {
        name(|t| &t.workloads, workload_id)
    };
    let provider = (provider_id != NO_PROVIDER).then(|| name(|t| &t.providers, provider_id));
    (workload, provider)
}

pub fn to_record(ev: &ConnectEvent, ctx: &Context) -> DecisionRecord {
    let (h, d) = (&ev.header, &ev.data);
    let (workload, provider) = names_of(&ctx.names, d.generation, d.workload_id, d.provider_id);
    let mut record = DecisionRecord {
        event: "decision",
        time: rfc3339(wall_time(h.time_ns)),
        verdict: verdict::name(d.verdict),
        reason: reason::name(d.reason),
        workload,
        who: attribute(h, ctx),
        protocol: if d.proto == proto::UDP { "udp" } else { "tcp" },
        dst_addr: family::ip(d.family, &d.addr).to_string(),
        dst_port: d.port,
        dst_addr_form: d.addr_form(),
        dst_addr_given: d.given_addr().map(|a| a.to_string()),
        provider,
        generation: d.generation,
        hook: hook::name(d.hook),
        server_name: None,
        target_port: None,
        payload_start: None,
        socket_type: None,
        ip_protocol: None,
    };
    // A raw or ping socket refused (or audited) at socket(): no destination.
    if d.hook == hook::SOCK_CREATE {
        record.protocol = sock::protocol_name(u32::from(d.port), u32::from(d.proto));
        record.dst_addr = String::new();
        record.dst_port = 0;
        record.socket_type = Some(sock::type_name(u32::from(d.port)));
        record.ip_protocol = Some(d.proto);
    }
    record
}

/// Bytes as text: printable ASCII as is, the rest as `\xNN`.
fn escaped(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b' '..=b'~' if b != b'\\' => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect()
}

/// An SNI verdict as a decision record: `hook` says what was judged (a
/// ClientHello, a CONNECT request, the ClientHello in its tunnel, an
/// unreadable first payload to a named proxy), `server_name` the name.
pub fn sni_record(ev: &llm_egress_common::SniEvent, ctx: &Context) -> DecisionRecord {
    let (h, d) = (&ev.header, &ev.data);
    let (workload, provider) = names_of(&ctx.names, d.generation, d.workload_id, d.provider_id);
    let len = usize::from(d.name_len).min(d.name.len());
    let unreadable = d.payload == payload::UNREADABLE;
    DecisionRecord {
        event: "decision",
        time: rfc3339(wall_time(h.time_ns)),
        verdict: verdict::name(d.verdict),
        reason: reason::name(d.reason),
        workload,
        who: attribute(h, ctx),
        protocol: "tcp",
        dst_addr: family::ip(d.family, &d.addr).to_string(),
        dst_port: d.port,
        provider,
        generation: d.generation,
        hook: payload::hook_name(d.payload),
        server_name: (!unreadable).then(|| String::from_utf8_lossy(&d.name[..len]).into_owned()),
        target_port: (d.target_port != 0).then_some(d.target_port),
        payload_start: unreadable.then(|| escaped(&d.name[..len])),
        dst_addr_form: None,
        dst_addr_given: None,
        socket_type: None,
        ip_protocol: None,
    }
}

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

/// After each wakeup the reader drains the ring again every `TAIL_POLL`
/// until `TAIL` has passed: the kernel wakes it at most once per
/// `EVENTS_WAKE_NS` and leaves the records of a burst in between waiting
/// (common's `EVENTS_WAKE_NS` has the contract). Every record submitted
/// without a wakeup was submitted within `EVENTS_WAKE_NS` after one, so
/// before the last drain of that wakeup's tail.
const TAIL_POLL: Duration = Duration::from_nanos(EVENTS_WAKE_NS);
const TAIL: Duration = Duration::from_nanos(2 * EVENTS_WAKE_NS);
/// A drain now and then whatever happens: a program preempted for longer
/// than the tail between its wakeup decision and its submit would leave a
/// record waiting until the next wakeup; this bounds that wait.
const SAFETY_DRAIN: Duration = Duration::from_secs(1);

/// Handles every record the ring holds.
fn drain(ring: &mut RingBuf<MapData>, ctx: &Context, accounting: &mut Accounting) {
    while let Some(item) = ring.next() {
        handle(&item, ctx, accounting);
    }
}

/// Reads the ring buffer until the task is dropped.
/// `conns` is the kernel's `CONNS` map, read to find connections whose
/// summary was lost; `telemetry` receives new telemetry settings on reload.
pub async fn read(
    ring: RingBuf<MapData>,
    ctx: Context,
    mut accounting: Accounting,
    conns: Option<BpfHashMap<MapData, u64, ConnEvent>>,
    mut telemetry: tokio::sync::watch::Receiver<crate::policy::TelemetryConfig>,
    alive: Arc<std::sync::atomic::AtomicBool>,
) {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns
    // the ring buffer; the fd is not closed or replaced while registered.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the event ring buffer; no events will be reported");
            alive.store(false, std::sync::atomic::Ordering::SeqCst);
            return;
        }
    };
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    let mut safety_drain = tokio::time::interval(SAFETY_DRAIN);
    safety_drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Some(end): draining on a timer until `end` (the tail of a wakeup).
    let mut tail_until: Option<tokio::time::Instant> = None;
    loop {
        let tailing = tail_until.is_some();
        let tail = async move {
            if tailing {
                tokio::time::sleep(TAIL_POLL).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let ready = tokio::select! {
            r = fd.readable_mut() => r,
            () = tail => {
                drain(fd.get_mut(), &ctx, &mut accounting);
                if tail_until.is_some_and(|end| tokio::time::Instant::now() >= end) {
                    tail_until = None;
                }
                continue;
            }
            _ = safety_drain.tick() => {
                drain(fd.get_mut(), &ctx, &mut accounting);
                continue;
            }
            _ = housekeeping.tick() => {
                accounting.expire();
                if let Some(conns) = &conns {
                    let live: std::collections::HashSet<u64> = conns.keys().filter_map(Result::ok).collect();
                    let missing = accounting.reconcile(&live);
                    ctx.metrics.summaries_missing.inc_by(missing as u64);
                }
                continue;
            }
            Ok(()) = telemetry.changed() => {
                accounting.set_config(telemetry.borrow_and_update().clone());
                continue;
            }
        };
        let mut guard = match ready {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "event ring buffer poll failed");
                alive.store(false, std::sync::atomic::Ordering::SeqCst);
                return;
            }
        };
        drain(guard.get_inner_mut(), &ctx, &mut accounting);
        guard.clear_ready();
        tail_until = Some(tokio::time::Instant::now() + TAIL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_egress_common::ConnectDecision;

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
