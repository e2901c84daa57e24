//! Where a rank is, shared between its training thread (and the collective inside it) and the
//! agent's heartbeat task: a handful of atomics, written where the work happens and read at
//! every heartbeat, so a rank stuck anywhere (a dead link, a hung forward pass) still says where.
//!
//! The coordinator names the rank or link that holds a stalled step from these
//! (docs/control-plane.md#stall-detection): the phase, and in the collective how many calls the
//! rank began, the bytes it moved in the current one, the peer it waits for and for how long.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use dapt_proto::rpc::{CollectiveProgress, RankPhase};

/// One rank's progress cell (one per worker, reset at each assignment).
#[derive(Debug)]
pub struct Progress {
    /// The generation being trained (0 before the first assignment).
    pub generation: AtomicU64,
    /// Steps completed in that generation's run.
    pub step: AtomicU64,
    phase: AtomicI32,
    calls: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    /// The peer waited for, plus one (0: none).
    waiting_for: AtomicU32,
    /// When the rank last moved a byte in its collective, in milliseconds since `epoch`.
    moved_ms: AtomicU64,
    epoch: Instant,
    /// The step the last generation stopped at with its checkpoint, on the coordinator's
    /// `Stop`, plus one (0: it did not, or an assignment came since).
    stopped_at: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            generation: AtomicU64::new(0),
            step: AtomicU64::new(0),
            phase: AtomicI32::new(RankPhase::Unspecified as i32),
            calls: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            waiting_for: AtomicU32::new(0),
            moved_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            stopped_at: AtomicU64::new(0),
        }
    }
}

impl Progress {
    /// A new generation's training begins: no collective calls yet, loading and connecting.
    pub fn begin_generation(&self, generation: u64, step: u64) {
        self.generation.store(generation, Ordering::Relaxed);
        self.step.store(step, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
        self.received.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        self.waiting_for.store(0, Ordering::Relaxed);
        self.set_phase(RankPhase::Setup);
    }

    /// The generation's ranks stopped at `step` (steps completed), with its checkpoint, as the
    /// coordinator asked.
    pub fn stopped(&self, step: u64) {
        self.stopped_at
            .store(step.saturating_add(1), Ordering::Relaxed);
    }

    /// A new assignment: the last stop no longer says where this worker is.
    pub fn forget_stop(&self) {
        self.stopped_at.store(0, Ordering::Relaxed);
    }

    /// The step of [`Progress::stopped`], unless an assignment came since.
    pub fn stopped_at(&self) -> Option<u64> {
        self.stopped_at.load(Ordering::Relaxed).checked_sub(1)
    }

    pub fn set_phase(&self, phase: RankPhase) {
        self.phase.store(phase as i32, Ordering::Relaxed);
    }

    pub fn phase(&self) -> RankPhase {
        RankPhase::try_from(self.phase.load(Ordering::Relaxed)).unwrap_or(RankPhase::Unspecified)
    }

    /// A collective call begins: returns the phase to hand to [`Progress::end_call`].
    pub fn begin_call(&self) -> RankPhase {
        let before = self.phase();
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.received.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        self.moved();
        self.set_phase(RankPhase::Collective);
        before
    }

    /// The call that began in phase `before` ended. The gradients' all-reduce ends the forward
    /// and backward passes and is followed by the optimizer step; any other call (the loss, a
    /// barrier) returns to the phase it interrupted.
    pub fn end_call(&self, before: RankPhase) {
        self.waiting_for.store(0, Ordering::Relaxed);
        self.set_phase(match before {
            RankPhase::Forward | RankPhase::Backward => RankPhase::Optimizer,
            other => other,
        });
    }

    /// The rank blocks on `peer` (a read from it, or a write to it that cannot go out).
    pub fn waiting(&self, peer: usize) {
        self.waiting_for.store(peer as u32 + 1, Ordering::Relaxed);
    }

    /// The rank no longer blocks on a peer.
    pub fn not_waiting(&self) {
        self.waiting_for.store(0, Ordering::Relaxed);
    }

    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
        self.moved();
    }

    pub fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.moved();
    }

    fn moved(&self) {
        self.moved_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The rank's collective as a heartbeat carries it; `None` before its first call.
    pub fn collective(&self) -> Option<CollectiveProgress> {
        let calls = self.calls.load(Ordering::Relaxed);
        if calls == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Some(CollectiveProgress {
            calls,
            bytes_received: self.received.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            waiting_for: self.waiting_for.load(Ordering::Relaxed),
            waited_ms: now.saturating_sub(self.moved_ms.load(Ordering::Relaxed)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_after_the_backward_pass_hands_over_to_the_optimizer() {
        let p = Progress::default();
        assert!(p.collective().is_none());
        p.begin_generation(3, 10);
        p.set_phase(RankPhase::Forward);
        let before = p.begin_call();
        assert_eq!(p.phase(), RankPhase::Collective);
        p.waiting(2);
        p.received(100);
        p.sent(40);
        let c = p.collective().expect("a call began");
        assert_eq!(
            (c.calls, c.bytes_received, c.bytes_sent, c.waiting_for),
            (1, 100, 40, 3)
        );
        p.end_call(before);
        assert_eq!(p.phase(), RankPhase::Optimizer);
        // A barrier during a checkpoint returns to it.
        p.set_phase(RankPhase::Checkpoint);
        let before = p.begin_call();
        p.end_call(before);
        assert_eq!(p.phase(), RankPhase::Checkpoint);
        assert_eq!(p.collective().expect("calls").waiting_for, 0);
    }
}
