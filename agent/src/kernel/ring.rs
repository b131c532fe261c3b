//! When to read a BPF ring buffer whose programs batch their wakeups (the
//! event ring, `EVENTS_WAKE_NS`; the plaintext ring, `PLAINTEXT_WAKE_NS`):
//! a program wakes the reader at most once per `wake` and leaves the records
//! of a burst in between waiting, so after each wakeup the reader drains
//! again every `wake` until `2 × wake` has passed. Every record submitted
//! without a wakeup was submitted within `wake` after one, so before the
//! last drain of that wakeup's tail. A drain every second whatever happens
//! bounds the wait of a record whose program was preempted between its
//! wakeup decision and its submit.

use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    time::{Instant, Interval, MissedTickBehavior},
};

/// A drain now and then whatever happens.
const SAFETY_DRAIN: Duration = Duration::from_secs(1);

pub struct RingReader {
    fd: AsyncFd<RingBuf<MapData>>,
    /// The programs' wakeup period.
    wake: Duration,
    /// Some(end): draining on a timer until `end` (the tail of a wakeup).
    tail_until: Option<Instant>,
    safety: Interval,
}

impl RingReader {
    /// Registers `ring` with the runtime; its programs wake the reader at
    /// most once per `wake`.
    pub fn new(ring: RingBuf<MapData>, wake: Duration) -> io::Result<RingReader> {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd
        // owns the ring buffer; the fd is not closed or replaced while
        // registered.
        let fd = unsafe { AsyncFd::register(ring) }?;
        let mut safety = tokio::time::interval(SAFETY_DRAIN);
        safety.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(RingReader {
            fd,
            wake,
            tail_until: None,
            safety,
        })
    }

    /// Waits until records may be waiting: a wakeup, the next poll of a
    /// wakeup's tail, or the safety drain. Then drain [`RingReader::ring`]
    /// to the end. An error means the ring can no longer be polled.
    pub async fn wait(&mut self) -> io::Result<()> {
        let tail = self.tail_until;
        let wake = self.wake;
        let tail_poll = async move {
            match tail {
                Some(_) => tokio::time::sleep(wake).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            ready = self.fd.readable_mut() => {
                // Cleared before the drain: a wakeup during it marks the
                // fd ready again, so nothing waits for the next one.
                ready?.clear_ready();
                self.tail_until = Some(Instant::now() + 2 * self.wake);
            }
            () = tail_poll => {
                if self.tail_until.is_some_and(|end| Instant::now() >= end) {
                    self.tail_until = None;
                }
            }
            _ = self.safety.tick() => {}
        }
        Ok(())
    }

    /// The ring, to drain after [`RingReader::wait`].
    pub fn ring(&mut self) -> &mut RingBuf<MapData> {
        self.fd.get_mut()
    }
}
