//! One direction of the ring: a blocking socket whose every read and write wakes each `POLL`
//! to check the abort flag and how long it has gone without progress.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{AbortHandle, CollectiveError};
use crate::progress::Progress;

// The data goes on the wire as the buffer's own bytes (no per-element copy); that is the
// little-endian wire format only on little-endian targets, which are all the targets dapt runs
// on. A big-endian port would byte-swap pieces before sending and after receiving.
#[cfg(not(target_endian = "little"))]
compile_error!(
    "the TCP ring sends f32 in native byte order and supports little-endian targets only"
);

/// Socket timeout: how often a blocked read or write wakes to check the abort flag and deadline.
pub(super) const POLL: Duration = Duration::from_millis(50);
/// Starts every handshake and call header, so a stray or out-of-step stream is caught.
pub(super) const MAGIC: u64 = u64::from_le_bytes(*b"dapt-rng");

/// The cooperative stop conditions every blocking wait checks each `POLL`.
#[derive(Clone, Copy)]
pub(super) struct Watch<'a> {
    pub(super) abort: &'a AbortHandle,
    /// Set when the other thread of the same call failed.
    pub(super) stop: &'a AtomicBool,
    /// How long a transfer may go without progress.
    pub(super) patience: Duration,
    /// When the whole exchange must be done, however much progress it makes (a handshake with a
    /// connection that trickles bytes).
    pub(super) deadline: Option<Instant>,
}

impl Watch<'_> {
    pub(super) fn check(&self) -> Result<(), CollectiveError> {
        if self.abort.is_aborted() || self.stop.load(Ordering::Acquire) {
            return Err(CollectiveError::Aborted);
        }
        Ok(())
    }
}

/// One direction of the ring: a connected socket with 50 ms timeouts and the rank at its far end.
#[derive(Debug)]
pub(super) struct Link {
    stream: TcpStream,
    pub(super) peer: usize,
    /// Where the bytes moved and the waits are counted, for the heartbeats (a ring's links
    /// after `TcpRing::set_progress`).
    pub(super) progress: Option<Arc<Progress>>,
}

impl Link {
    pub(super) fn new(stream: TcpStream, peer: usize) -> Result<Self, CollectiveError> {
        let setup = |s: &TcpStream| {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(POLL))?;
            s.set_write_timeout(Some(POLL))
        };
        setup(&stream).map_err(|e| CollectiveError::io(peer, e))?;
        Ok(Self {
            stream,
            peer,
            progress: None,
        })
    }

    pub(super) fn read_exact(
        &mut self,
        buf: &mut [u8],
        watch: &Watch,
    ) -> Result<(), CollectiveError> {
        if let Some(p) = &self.progress {
            p.waiting(self.peer);
        }
        let result = self.read_all(buf, watch);
        if let Some(p) = &self.progress {
            p.not_waiting();
        }
        result
    }

    fn read_all(&mut self, buf: &mut [u8], watch: &Watch) -> Result<(), CollectiveError> {
        let mut done = 0;
        let mut progress = Instant::now();
        while done < buf.len() {
            watch.check()?;
            self.before_deadline(progress, watch)?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(CollectiveError::PeerClosed { peer: self.peer }),
                Ok(n) => {
                    done += n;
                    progress = Instant::now();
                    if let Some(p) = &self.progress {
                        p.received(n);
                    }
                }
                Err(e) => self.idle(e, progress, watch)?,
            }
        }
        Ok(())
    }

    pub(super) fn write_all(&mut self, buf: &[u8], watch: &Watch) -> Result<(), CollectiveError> {
        let mut done = 0;
        let mut progress = Instant::now();
        while done < buf.len() {
            watch.check()?;
            self.before_deadline(progress, watch)?;
            match self.stream.write(&buf[done..]) {
                Ok(0) => return Err(CollectiveError::PeerClosed { peer: self.peer }),
                Ok(n) => {
                    done += n;
                    progress = Instant::now();
                    if let Some(p) = &self.progress {
                        p.sent(n);
                    }
                }
                Err(e) => self.idle(e, progress, watch)?,
            }
        }
        Ok(())
    }

    fn before_deadline(&self, progress: Instant, watch: &Watch) -> Result<(), CollectiveError> {
        match watch.deadline {
            Some(deadline) if Instant::now() >= deadline => Err(CollectiveError::Timeout {
                peer: self.peer,
                waited: progress.elapsed(),
            }),
            _ => Ok(()),
        }
    }

    /// A read or write that returned an error: a socket timeout within patience is fine.
    fn idle(&self, e: io::Error, progress: Instant, watch: &Watch) -> Result<(), CollectiveError> {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let waited = progress.elapsed();
                if waited >= watch.patience {
                    return Err(CollectiveError::Timeout {
                        peer: self.peer,
                        waited,
                    });
                }
                Ok(())
            }
            io::ErrorKind::Interrupted => Ok(()),
            _ => Err(CollectiveError::io(self.peer, e)),
        }
    }
}

/// Sleeps for `pause`, waking each `POLL` to check for abort.
pub(super) fn nap(pause: Duration, watch: Watch) -> Result<(), CollectiveError> {
    let until = Instant::now() + pause;
    loop {
        watch.check()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(POLL));
    }
}

pub(super) fn encode_words<const W: usize, const B: usize>(words: [u64; W]) -> [u8; B] {
    debug_assert_eq!(W * 8, B);
    let mut out = [0u8; B];
    for (slot, word) in out.chunks_exact_mut(8).zip(words) {
        slot.copy_from_slice(&word.to_le_bytes());
    }
    out
}

pub(super) fn decode_words<const W: usize, const B: usize>(bytes: &[u8; B]) -> [u64; W] {
    debug_assert_eq!(W * 8, B);
    let mut out = [0u64; W];
    for (word, slot) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_le_bytes([
            slot[0], slot[1], slot[2], slot[3], slot[4], slot[5], slot[6], slot[7],
        ]);
    }
    out
}

pub(super) fn as_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: an f32 is 4 initialised bytes with no padding, u8 has alignment 1, and the byte
    // slice covers exactly the memory of `x` for the same lifetime.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

pub(super) fn as_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`, and every bit pattern is a valid f32, so any bytes written
    // through the view leave `x` valid; the view borrows `x` mutably, so nothing aliases it.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}
