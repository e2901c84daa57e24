//! Collectives between the ranks of one job generation: the seam between the gradient
//! computation and the optimizer step.
//!
//! * [`Collective`] — what every backend offers.
//! * [`ring`] — a Gloo-style ring all-reduce over TCP between worker processes, for CPU ranks.
//! * `nccl` (feature `cuda`) — NCCL communicators between GPU ranks, one per device thread and
//!   generation, reducing gradients in place on the device.
//!
//! Every blocking wait is bounded twice: by the config's `timeout` (no progress for that long is
//! an error) and by an [`AbortHandle`] that the node agent fires when the coordinator tears the
//! generation down. Either way the call returns `Err` within ~50 ms instead of hanging, and the
//! ring refuses further use: a stream that stopped mid-message cannot be resynchronised, so the
//! next generation builds a new one.

mod handshake;
mod link;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use ring::{RingConfig, RingListener, TcpRing};

/// What every collective backend offers.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In-place mean of `buf` across ranks (every rank passes the same length). On return every
    /// rank holds bitwise the same values.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// The first half of [`Collective::all_reduce_mean`] (ZeRO stage 2): on return
    /// `buf[shard_range(buf.len(), world, rank)]` holds the mean across ranks of that slice,
    /// bitwise what the all-reduce leaves there; the rest of `buf` is scratch. The default
    /// all-reduces the whole buffer, which leaves the same slice.
    fn reduce_scatter_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_mean(buf)
    }
    /// The second half: every rank passes `buf` with its own slice
    /// (`shard_range(buf.len(), world, rank)`) filled; on return every rank holds every rank's
    /// slice, bitwise. A backend without it says so ([`CollectiveError::Config`]), and ZeRO
    /// stages above 0 are refused on it.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world() == 1 {
            return Ok(());
        }
        let _ = buf;
        Err(CollectiveError::Config(
            "this collective has no all-gather (ZeRO needs the TCP ring)".into(),
        ))
    }
}

/// The slice of a flat buffer of `len` elements that `rank` of `world` owns: contiguous, in rank
/// order, the first `len % world` ranks one element more. The ring's chunks, ZeRO's optimizer
/// shards and the checkpoint's shard files all use this one split.
///
/// # Panics
/// When `rank >= world` (a caller's bug, never input).
pub fn shard_range(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    assert!(rank < world, "rank {rank} of world {world}");
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// One collective shared by several users on one thread: the rank's ring carries both the loss
/// and, for a resident engine on the CPU, the gradients (never at the same time).
impl<C: Collective> Collective for std::rc::Rc<std::cell::RefCell<C>> {
    fn rank(&self) -> usize {
        self.borrow().rank()
    }

    fn world(&self) -> usize {
        self.borrow().world()
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.borrow_mut().all_reduce_mean(buf)
    }

    fn reduce_scatter_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.borrow_mut().reduce_scatter_mean(buf)
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.borrow_mut().all_gather(buf)
    }
}

/// A cooperative stop flag shared between the node agent and the collective: `abort()` makes
/// every wait in progress (and every later call) return [`CollectiveError::Aborted`].
#[derive(Clone, Debug, Default)]
pub struct AbortHandle(Arc<AtomicBool>);

impl AbortHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn abort(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_aborted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Why a collective failed. `peer` is the rank on the other end of the connection at fault.
/// Every variant means the same thing to the caller: this ring is finished, and training goes
/// on only in a new generation (new ring); [`CollectiveError::is_peer_fault`] says whether the
/// coordinator should suspect a peer rather than this rank.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {peer}: no progress for {waited:?}")]
    Timeout { peer: usize, waited: Duration },
    #[error("aborted")]
    Aborted,
    #[error("rank {peer} closed the connection")]
    PeerClosed { peer: usize },
    // The OS error is a plain field, not the `source()`: anyhow's `{:#}` printed it twice.
    #[error("rank {peer}: {error}")]
    Io { peer: usize, error: io::Error },
    #[error("handshake with rank {peer}: {message}")]
    Handshake { peer: usize, message: String },
    #[error("ring config: {0}")]
    Config(String),
    #[error("an earlier collective on this ring failed mid-transfer; build a new ring")]
    Poisoned,
    /// An NCCL call or the CUDA work around it failed.
    #[error("nccl: {0}")]
    Nccl(String),
    /// A collective that cannot say which peer it waits for (NCCL) made no progress.
    #[error("no progress for {waited:?}")]
    Stalled { waited: Duration },
}

impl CollectiveError {
    /// Whether the failure points at another rank (dead, silent, or from another generation).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::Stalled { .. }
                | Self::PeerClosed { .. }
                | Self::Io { .. }
                | Self::Handshake { .. }
        )
    }

    /// Maps an I/O error on the connection to `peer`: the peer going away is `PeerClosed`.
    pub(crate) fn io(peer: usize, source: io::Error) -> Self {
        use io::ErrorKind::*;
        match source.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                Self::PeerClosed { peer }
            }
            _ => Self::Io {
                peer,
                error: source,
            },
        }
    }
}
