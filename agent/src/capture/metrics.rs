//! The plaintext metrics (docs/metrics.md, docs/plaintext.md): registered
//! on the agent's registry by the attacher, which updates them.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};

/// The metrics of this module and of the plaintext reader.
#[derive(Clone)]
pub struct Metrics {
    pub attach: IntCounterVec,
    pub processes: IntGaugeVec,
    pub invisible: IntCounterVec,
    pub linked: IntCounterVec,
    pub execs: IntCounterVec,
    pub calls: IntCounter,
    pub bytes: IntCounter,
    pub lost: IntCounterVec,
    pub no_cookie: IntCounter,
    pub links: IntCounter,
    pub chunks: IntCounter,
}

impl Metrics {
    pub fn new(r: &prometheus::Registry) -> prometheus::Result<Self> {
        let attach = IntCounterVec::new(
            Opts::new(
                "llm_egress_plaintext_attach_total",
                "Processes of exact_tokens workloads given the OpenSSL uprobes (attached), left untraced because max processes are traced (overflow), or whose attachment failed (error)",
            ),
            &["result"],
        )?;
        let processes = IntGaugeVec::new(
            Opts::new(
                "llm_egress_plaintext_processes",
                "Traced processes that map a shared libssl (libssl), a shared libgnutls and no libssl (libgnutls), neither but an executable file with OpenSSL linked in, found by symbol (linked), none of these (no_libssl: their TLS plaintext is not visible unless they load a TLS library later), and processes that ended whose uprobes are still being closed (detaching; they count against max processes)",
            ),
            &["state"],
        )?;
        let invisible = IntCounterVec::new(
            Opts::new(
                "llm_egress_plaintext_invisible_total",
                "Traced processes that ended without mapping a shared libssl or libgnutls, a linked-in OpenSSL or Go crypto/tls found by symbol, and without sending plaintext: other TLS (rustls, BoringSSL, NSS), a stripped static OpenSSL or Go binary, or no TLS at all",
            ),
            &["workload"],
        )?;
        let linked = IntCounterVec::new(
            Opts::new(
                "llm_egress_plaintext_elf_files_total",
                "Executable files (other than the shared TLS libraries) of traced processes searched for a linked-in OpenSSL or Go crypto/tls, once per file version: all four SSL_write/SSL_read(_ex) found and attached (all), some only, not attached (some), Go crypto/tls Write and Read found and attached (go), none (none), unreadable or malformed ELF, or a Go function that cannot be probed (error)",
            ),
            &["result"],
        )?;
        let execs = IntCounterVec::new(
            Opts::new(
                "llm_egress_plaintext_execs_total",
                "Execs in exact_tokens workloads: reported and paused until attached (paused), or not reported because the plaintext ring was full (lost; attached later by the scan)",
            ),
            &["result"],
        )?;
        let calls = IntCounter::new(
            "llm_egress_plaintext_calls_total",
            "OpenSSL read/write calls whose plaintext the kernel copied",
        )?;
        let bytes = IntCounter::new(
            "llm_egress_plaintext_bytes_total",
            "Plaintext bytes the kernel copied",
        )?;
        let lost = IntCounterVec::new(
            Opts::new(
                "llm_egress_plaintext_lost_total",
                "Plaintext not delivered: ring_full (records), unreadable (pieces), no_entry (returns without an entry), incomplete (calls delivered with pieces missing), consumer (chunks the consumer did not take), malformed (records)",
            ),
            &["why"],
        )?;
        let no_cookie = IntCounter::new(
            "llm_egress_plaintext_calls_without_cookie_total",
            "Calls delivered with socket cookie 0 (no TCP call seen under their SSL*)",
        )?;
        let links = IntCounter::new(
            "llm_egress_plaintext_links_total",
            "SSL*s joined to their socket by the thread's next send after a write that touched none (OpenSSL over memory BIOs: Node.js)",
        )?;
        let chunks = IntCounter::new(
            "llm_egress_plaintext_chunks_total",
            "TLS calls delivered to the plaintext consumer",
        )?;
        r.register(Box::new(attach.clone()))?;
        r.register(Box::new(processes.clone()))?;
        r.register(Box::new(invisible.clone()))?;
        r.register(Box::new(linked.clone()))?;
        r.register(Box::new(execs.clone()))?;
        r.register(Box::new(calls.clone()))?;
        r.register(Box::new(bytes.clone()))?;
        r.register(Box::new(lost.clone()))?;
        r.register(Box::new(no_cookie.clone()))?;
        r.register(Box::new(links.clone()))?;
        r.register(Box::new(chunks.clone()))?;
        Ok(Self {
            attach,
            processes,
            invisible,
            linked,
            execs,
            calls,
            bytes,
            lost,
            no_cookie,
            links,
            chunks,
        })
    }
}
