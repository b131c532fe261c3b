//! Kernel events as audit records: who made the connection (process,
//! cgroup, pod), which workload and provider, what was decided.

use std::sync::Arc;

use aya::maps::{HashMap as BpfHashMap, MapData};
use llm_egress_common::{
    ConnectEvent, EventHeader, ExecInfo, family, hook, payload, proto, reason, sock, verdict,
};

use super::{
    decode::DnsAnswer,
    names::{Names, names_of},
};
use crate::{
    attribution::process::{CgroupPaths, ExeCache, comm_str},
    telemetry::audit::{Attribution, AuditSink, DecisionRecord},
    telemetry::audit::{rfc3339, wall_time},
    telemetry::metrics::Metrics,
};

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
pub(super) fn attribute(h: &EventHeader, ctx: &Context) -> Attribution {
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
