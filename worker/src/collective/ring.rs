//! Ring all-reduce over TCP (the Gloo algorithm) between CPU ranks.
//!
//! Rank r dials its right neighbour (r+1 mod world) and accepts its left (r-1); each connection
//! carries data one way only. A handshake (`handshake`) lets in only a member of the job: it
//! proves the ring key (derived from the job's token) by challenge-response, and its generation,
//! world and ranks fence out connections from another generation or a misrouted rank.
//!
//! `all_reduce_mean` cuts the buffer into `world` chunks, rank r's being
//! [`shard_range`]`(len, world, r)`, and runs reduce-scatter, then all-gather, `world - 1` steps
//! each. ZeRO uses the two halves alone: [`Collective::reduce_scatter_mean`] leaves rank r
//! holding the mean of its own chunk, [`Collective::all_gather`] hands every rank's chunk to all. Chunks travel in
//! pieces of `chunk_bytes`: a sender thread writes pieces to the right while the calling thread
//! reads from the left, and a piece moves on as soon as it has been reduced, so the two
//! directions overlap within a step and across steps. Pieces change hands by moving their
//! `&mut [f32]` over channels, so no piece is ever read and written at once.
//!
//! Determinism: chunk c is summed in ring order starting at rank c + 1 and finished by rank c,
//! which scales it by 1/world before the all-gather copies those bytes to every rank, so all
//! ranks end bitwise equal, and a reduce-scatter leaves rank c's chunk bitwise what the
//! all-reduce would have (ZeRO stage 2 computes what stage 0 does).
//!
//! Wire: per call a 24-byte header (magic, call number, operation and length) from each rank to
//! its right, then the f32 data, little-endian.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::handshake::{accept_left, dial_right};
use super::link::{as_bytes, as_bytes_mut, decode_words, encode_words, Link, Watch, MAGIC, POLL};
use super::{shard_range, AbortHandle, Collective, CollectiveError};
use crate::progress::Progress;
use dapt_proto::auth::Key;

/// Reduce-scatter reads up to this much into a scratch buffer, then adds it: one L2's worth
/// (1 MiB per core here), so the scratch is still cached for the sum. 256 KiB blocks measured
/// ~7% slower at 2 ranks (more, smaller reads); 4 MiB blocks ~5% slower at 4 ranks.
const REDUCE_BLOCK_BYTES: usize = 1 << 20;

/// Where and how one rank joins the ring.
#[derive(Clone, Debug)]
pub struct RingConfig {
    pub rank: usize,
    pub world: usize,
    /// The listen address of every rank, by rank.
    pub peers: Vec<SocketAddr>,
    /// The job's fencing token: only ranks of the same generation connect.
    pub generation: u64,
    /// How long connecting may take, and how long any transfer may go without progress.
    pub timeout: Duration,
    /// The pipelining unit: each step's transfer moves in pieces of this size.
    pub chunk_bytes: usize,
}

impl RingConfig {
    pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

    pub fn validate(&self) -> Result<(), CollectiveError> {
        let fail = |message: String| Err(CollectiveError::Config(message));
        if self.world == 0 || self.rank >= self.world {
            return fail(format!("rank {} is not in world {}", self.rank, self.world));
        }
        if self.peers.len() != self.world {
            return fail(format!(
                "{} peers for world {}",
                self.peers.len(),
                self.world
            ));
        }
        if self.timeout.is_zero() {
            return fail("timeout must be positive".into());
        }
        if self.chunk_bytes < 4 {
            return fail(format!(
                "chunk_bytes {} is less than one f32",
                self.chunk_bytes
            ));
        }
        Ok(())
    }
}

/// A bound listen socket whose address can be published before the peers are known, and the
/// ring key that every connection through it must prove.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
    key: Key,
}

/// One rank's end of a connected ring.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    generation: u64,
    timeout: Duration,
    piece_elems: usize,
    abort: AbortHandle,
    /// None for a world of one.
    links: Option<Links>,
    scratch: Vec<f32>,
    /// Calls so far; travels in each call's header so ranks out of step are caught.
    calls: u64,
    poisoned: bool,
    /// Where each call's phase, bytes and waits are counted, for the heartbeats.
    progress: Option<Arc<Progress>>,
}

#[derive(Debug)]
struct Links {
    right: Link,
    left: Link,
}

impl TcpRing {
    /// Binds `listen` (port 0 picks a free port; read it back with `local_addr`). Rings
    /// connected through it dial and admit only peers that hold `key` (`Key::ring` of the job's
    /// token and name).
    pub fn bind(listen: SocketAddr, key: Key) -> io::Result<RingListener> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        Ok(RingListener {
            listener,
            addr,
            key,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counts every call's phase, the bytes it moves and the peer it waits for in `progress`
    /// (the rank's heartbeat reads it: docs/control-plane.md#stall-detection).
    pub fn set_progress(&mut self, progress: Arc<Progress>) {
        if let Some(links) = &mut self.links {
            links.left.progress = Some(progress.clone());
            links.right.progress = Some(progress.clone());
        }
        self.progress = Some(progress);
    }

    /// A whole ring of `world` ranks in this process on 127.0.0.1 (generation 1, a key of a
    /// fresh random token), each rank connected from a thread of its own; element `r` is rank
    /// `r`. For tests and benchmarks that run every rank as a thread.
    pub fn loopback(world: usize, timeout: Duration) -> Result<Vec<TcpRing>, CollectiveError> {
        let token =
            dapt_proto::auth::nonce().map_err(|e| CollectiveError::Config(e.to_string()))?;
        let key = Key::ring(&hex::encode(token), "loopback");
        let listeners = (0..world)
            .map(|_| TcpRing::bind(SocketAddr::from(([127, 0, 0, 1], 0)), key.clone()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| CollectiveError::Config(format!("binding on 127.0.0.1: {e}")))?;
        let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
        std::thread::scope(|scope| {
            let joins: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let cfg = RingConfig {
                        rank,
                        world,
                        peers: peers.clone(),
                        generation: 1,
                        timeout,
                        chunk_bytes: RingConfig::DEFAULT_CHUNK_BYTES,
                    };
                    scope.spawn(move || listener.connect(cfg, AbortHandle::new()))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("a ring's connect thread"))
                .collect()
        })
    }
}

impl RingListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Dials the right neighbour and accepts the left one (at once: peers start at slightly
    /// different times), each with a handshake, within `cfg.timeout`.
    /// The listener stays usable: the next generation connects through it again, and the
    /// handshake turns away connections left over from an older one.
    pub fn connect(&self, cfg: RingConfig, abort: AbortHandle) -> Result<TcpRing, CollectiveError> {
        cfg.validate()?;
        let links = if cfg.world == 1 {
            None
        } else {
            let deadline = Instant::now() + cfg.timeout;
            // Nothing stops the dialer early: it fails only at abort, at the deadline, or when
            // refused. The acceptor, once the dialer was refused, still answers the next
            // connection, so a peer of another generation learns why too (see `accept_left`).
            let never = AtomicBool::new(false);
            let dial_failed = AtomicBool::new(false);
            let watch = Watch {
                abort: &abort,
                stop: &never,
                patience: cfg.timeout,
                deadline: None,
            };
            let key = &self.key;
            let (dialed, accepted) = thread::scope(|s| {
                let dialer =
                    s.spawn(|| stop_on_err(&dial_failed, dial_right(&cfg, key, deadline, watch)));
                let accepted =
                    accept_left(&self.listener, &cfg, key, deadline, watch, &dial_failed);
                let dialed = dialer
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (dialed, accepted)
            });
            let (right, left) = first_cause(&abort, dialed, accepted)?;
            tracing::info!(
                rank = cfg.rank,
                world = cfg.world,
                generation = cfg.generation,
                "ring connected"
            );
            Some(Links { right, left })
        };
        Ok(TcpRing {
            rank: cfg.rank,
            world: cfg.world,
            generation: cfg.generation,
            timeout: cfg.timeout,
            piece_elems: cfg.chunk_bytes / 4,
            abort,
            links,
            scratch: vec![0.0; (REDUCE_BLOCK_BYTES / 4).min(cfg.chunk_bytes / 4)],
            calls: 0,
            poisoned: false,
            progress: None,
        })
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.call(buf, Op::AllReduce)
    }

    fn reduce_scatter_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.call(buf, Op::ReduceScatter)
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.call(buf, Op::AllGather)
    }
}

impl TcpRing {
    /// One collective call of `op` over `buf` (see the module's overview).
    fn call(&mut self, buf: &mut [f32], op: Op) -> Result<(), CollectiveError> {
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        if self.abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        if self.poisoned {
            return Err(CollectiveError::Poisoned);
        }
        let call = Call {
            rank: self.rank,
            world: self.world,
            number: self.calls,
            op,
            piece_elems: self.piece_elems,
            patience: self.timeout,
            abort: &self.abort,
        };
        self.calls += 1;
        let before = self.progress.as_ref().map(|p| p.begin_call());
        let result = run(links, &mut self.scratch, buf, &call);
        if let (Some(p), Some(before)) = (&self.progress, before) {
            p.end_call(before);
        }
        if let Err(error) = &result {
            // The streams may have stopped mid-message; they cannot carry another call.
            self.poisoned = true;
            tracing::warn!(rank = self.rank, generation = self.generation, call = call.number, op = ?op, %error, "collective failed");
        }
        result
    }
}

/// The ring's operations: the two halves of an all-reduce, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce = 0,
    ReduceScatter = 1,
    AllGather = 2,
}

impl Op {
    fn reduces(self) -> bool {
        self != Op::AllGather
    }

    fn gathers(self) -> bool {
        self != Op::ReduceScatter
    }
}

/// What one collective call needs besides the sockets and buffers.
struct Call<'a> {
    rank: usize,
    world: usize,
    number: u64,
    op: Op,
    piece_elems: usize,
    patience: Duration,
    abort: &'a AbortHandle,
}

fn run(
    links: &mut Links,
    scratch: &mut [f32],
    buf: &mut [f32],
    call: &Call,
) -> Result<(), CollectiveError> {
    let buf_len = buf.len();
    let (pieces, by_chunk) = split_pieces(buf, call.world, call.piece_elems);
    let stop = AtomicBool::new(false);
    let watch = Watch {
        abort: call.abort,
        stop: &stop,
        patience: call.patience,
        deadline: None,
    };
    let (to_sender, outbox) = mpsc::channel();
    let (to_main, returned) = mpsc::channel();
    let Links { right, left } = links;
    let right_peer = right.peer;
    exchange_headers(right, left, call, buf_len, &watch)?;
    let (received, sent) = thread::scope(|s| {
        let sender = s.spawn(|| stop_on_err(&stop, send_pieces(right, outbox, to_main, watch)));
        let mut pipe = Pipeline {
            slots: pieces.into_iter().map(Some).collect(),
            to_sender,
            returned,
            left,
            right: right_peer,
            scratch,
            watch,
        };
        let received = stop_on_err(&stop, pipe.run(call, &by_chunk));
        drop(pipe); // closes the sender's queue, so it finishes
        let sent = sender
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (received, sent)
    });
    first_cause(call.abort, received, sent).map(|((), ())| ())
}

/// The calling thread's side: receives from the left, reduces, and queues pieces for the right.
struct Pipeline<'b, 'l, 'w> {
    /// Every piece of the buffer, by id; None while the sender holds it.
    slots: Vec<Option<&'b mut [f32]>>,
    to_sender: Sender<(usize, &'b mut [f32])>,
    returned: Receiver<(usize, &'b mut [f32])>,
    left: &'l mut Link,
    /// The right neighbour's rank.
    right: usize,
    scratch: &'l mut [f32],
    watch: Watch<'w>,
}

impl<'b> Pipeline<'b, '_, '_> {
    fn run(&mut self, call: &Call, by_chunk: &[Range<usize>]) -> Result<(), CollectiveError> {
        let (rank, world) = (call.rank, call.world);
        let chunk = |offset: usize| by_chunk[(rank + world - offset % world) % world].clone();
        let inverse = 1.0 / world as f32;
        if call.op.reduces() {
            // Reduce-scatter: step s sends chunk r-s and adds the left's chunk r-s-1 into ours;
            // the last step finishes chunk r+1 (rank r's own shard: see `split_pieces`), which
            // goes on to the right only when an all-gather follows.
            for id in chunk(0) {
                let piece = self.take(id)?;
                self.send(id, piece)?;
            }
            for step in 0..world - 1 {
                let last = step == world - 2;
                let scale = last.then_some(inverse);
                for id in chunk(step + 1) {
                    let piece = self.take(id)?;
                    self.recv_reduce(piece, scale)?;
                    if !last || call.op.gathers() {
                        self.send(id, piece)?;
                    }
                }
            }
        } else {
            // An all-gather alone starts where the reduce-scatter would have ended: sending the
            // chunk this rank owns.
            for id in chunk(world - 1) {
                let piece = self.take(id)?;
                self.send(id, piece)?;
            }
        }
        if !call.op.gathers() {
            return Ok(());
        }
        // All-gather: step s sends chunk r+1-s (first the one this rank finished) and receives
        // chunk r-s, which it forwards unless its right neighbour finished it.
        for step in 0..world - 1 {
            for id in chunk(step) {
                let piece = self.take(id)?;
                self.left.read_exact(as_bytes_mut(piece), &self.watch)?;
                if step < world - 2 {
                    self.send(id, piece)?;
                }
            }
        }
        Ok(())
    }

    /// Waits until the sender has handed piece `id` back.
    fn take(&mut self, id: usize) -> Result<&'b mut [f32], CollectiveError> {
        loop {
            if let Some(piece) = self.slots[id].take() {
                return Ok(piece);
            }
            match self.returned.recv_timeout(POLL) {
                Ok((back, piece)) => self.slots[back] = Some(piece),
                Err(RecvTimeoutError::Timeout) => {
                    self.watch.check()?;
                    // The piece is stuck in a write to the right neighbour.
                    if let Some(p) = &self.left.progress {
                        p.waiting(self.right);
                    }
                }
                // The sender failed; its own error says why.
                Err(RecvTimeoutError::Disconnected) => return Err(CollectiveError::Aborted),
            }
        }
    }

    fn send(&mut self, id: usize, piece: &'b mut [f32]) -> Result<(), CollectiveError> {
        self.to_sender
            .send((id, piece))
            .map_err(|_| CollectiveError::Aborted)
    }

    fn recv_reduce(
        &mut self,
        piece: &mut [f32],
        scale: Option<f32>,
    ) -> Result<(), CollectiveError> {
        for ours in piece.chunks_mut(self.scratch.len()) {
            let theirs = &mut self.scratch[..ours.len()];
            self.left.read_exact(as_bytes_mut(theirs), &self.watch)?;
            match scale {
                None => ours
                    .iter_mut()
                    .zip(theirs.iter())
                    .for_each(|(o, t)| *o += *t),
                Some(k) => ours
                    .iter_mut()
                    .zip(theirs.iter())
                    .for_each(|(o, t)| *o = (*o + *t) * k),
            }
        }
        Ok(())
    }
}

/// Each rank sends its call header to the right and checks the left's against its own. Both
/// sides write before they read (24 bytes fit any socket buffer), so when lengths differ both
/// ranks see the mismatch, not only the first to read.
fn exchange_headers(
    right: &mut Link,
    left: &mut Link,
    call: &Call,
    len: usize,
    watch: &Watch,
) -> Result<(), CollectiveError> {
    let ours = encode_words([MAGIC, call.number, (len as u64) | (call.op as u64) << 56]);
    right.write_all(&ours, watch)?;
    let mut theirs = [0u8; 24];
    left.read_exact(&mut theirs, watch)?;
    if theirs == ours {
        return Ok(());
    }
    let [magic, number, op_len] = decode_words(&theirs);
    let (their_op, their_len) = (op_len >> 56, op_len & ((1 << 56) - 1));
    let message = if magic != MAGIC {
        "stream out of step (bad call header)".to_string()
    } else {
        format!(
            "it runs operation {their_op} over {their_len} elements in call {number}, this rank {:?} over {len} in call {}",
            call.op, call.number
        )
    };
    Err(CollectiveError::Handshake {
        peer: left.peer,
        message,
    })
}

/// The sender thread: writes each queued piece to the right, and hands it back.
fn send_pieces<'b>(
    right: &mut Link,
    outbox: Receiver<(usize, &'b mut [f32])>,
    back: Sender<(usize, &'b mut [f32])>,
    watch: Watch,
) -> Result<(), CollectiveError> {
    // Ends when the calling thread drops its end of the queue.
    for (id, piece) in outbox {
        right.write_all(as_bytes(piece), &watch)?;
        // Fails only once the calling thread has given up, when nothing waits for the piece.
        let _ = back.send((id, piece));
    }
    Ok(())
}

/// Splits `buf` into `world` chunks ([`shard_range`]) and each chunk into pieces of at most
/// `piece_elems`; returns the pieces and, per ring chunk, its range of piece ids. Ring chunk c
/// is shard c - 1 (mod world), so that rank r, which finishes ring chunk r + 1, finishes its
/// own shard.
fn split_pieces(
    buf: &mut [f32],
    world: usize,
    piece_elems: usize,
) -> (Vec<&mut [f32]>, Vec<Range<usize>>) {
    let len = buf.len();
    let mut pieces = Vec::new();
    let mut by_shard = Vec::with_capacity(world);
    let mut rest = buf;
    for s in 0..world {
        let (chunk, tail) =
            std::mem::take(&mut rest).split_at_mut(shard_range(len, world, s).len());
        rest = tail;
        let first = pieces.len();
        pieces.extend(chunk.chunks_mut(piece_elems));
        by_shard.push(first..pieces.len());
    }
    let by_chunk = (0..world)
        .map(|c| by_shard[(c + world - 1) % world].clone())
        .collect();
    (pieces, by_chunk)
}

fn stop_on_err<T>(
    stop: &AtomicBool,
    result: Result<T, CollectiveError>,
) -> Result<T, CollectiveError> {
    if result.is_err() {
        stop.store(true, Ordering::Release);
    }
    result
}

/// Of two threads' results, the error that caused the other: a thread that stopped because its
/// partner failed reports `Aborted`, which only stands if the abort handle really fired.
fn first_cause<A, B>(
    abort: &AbortHandle,
    a: Result<A, CollectiveError>,
    b: Result<B, CollectiveError>,
) -> Result<(A, B), CollectiveError> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        _ if abort.is_aborted() => Err(CollectiveError::Aborted),
        (Err(CollectiveError::Aborted), Err(e)) | (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests;
