//! Ring-buffer records decoded: checked for size and kind; a record that
//! does not decode is counted by the reader, never guessed at.

use llm_egress_common::{ConnEvent, ConnectEvent, EventHeader, kind};

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
