//! The coordinator's decisions, as one pure function: [`decide`] takes the job's state, one
//! [`Event`] (a join, a report, a lost session, a timer tick) and the time, and returns the next
//! state and the [`Action`]s to carry out (assign, abort, commit, log...). Nothing here does I/O,
//! so every path through formation, loss, recovery and commit is unit-tested below.
//!
//! Phases: `Forming` (waiting for `min_workers`) -> `Running` -> `Recovering` (a rank was lost or
//! failed: the survivors abort the generation and confirm) -> `Running` in the next generation
//! -> ... -> `Completed`, or `Failed` / `Stopped`. The operator's stop ([`Event::Stop`]) lets
//! a running generation checkpoint the step in progress first: `Stopped` follows its commit.
//!
//! Exactly-once data: every rank reports the sample positions of each step; a checkpoint step
//! is committed when every rank of the generation reported reaching it and every step before it
//! was reported by every rank. Only then do those steps enter the ledger; a re-formation resumes
//! from the committed step, so uncommitted steps are trained again and never counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dapt_corpus::rank_slice;
use dapt_proto::rpc::{compatible, ErrorCode, Generation, Refusal, WorkerId};
use serde::{Deserialize, Serialize};

use crate::guard::{Guard, MixtureChange, Trip, Verdict};

mod invariants;
pub mod stall;
pub use invariants::{check_ledger, check_transition, decide_checked, Invariant, Violation};
pub use stall::{RankReport, Stall, StallConfig, StallWatch};

/// A gRPC session, as the executor numbers them. A member's messages count only from the
/// session it joined on.
pub type ConnId = u64;

/// Fixed for the job's life.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub job: String,
    pub version: String,
    pub min_workers: usize,
    pub max_workers: Option<usize>,
    pub session_timeout: Duration,
    pub formation_grace: Duration,
    pub abort_timeout: Duration,
    pub total_steps: u64,
    /// Samples per step.
    pub global_batch: u64,
    /// Samples per forward pass, at most.
    pub micro_batch: u64,
    /// Consecutive generations that may fail before any progress is committed before the job
    /// fails instead of re-forming again.
    pub max_failed_generations: u32,
    /// When a step counts as stalled and how long a stall may last (`stall`).
    pub stall: StallConfig,
    /// A held-out evaluation every this many steps and at the last (`training.eval_every`; 0:
    /// none), for the ETA.
    pub eval_every: u64,
    /// A checkpoint every this many steps and at the last (`checkpoint.every`), for the ETA.
    pub checkpoint_every: u64,
    /// The job's corpus sources by name: a held-out evaluation of any other is refused (its name
    /// becomes a `/metrics` label, a dashboard series and a guard reading).
    pub sources: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Forming,
    /// A new coordinator took over a running generation (etcd): its ranks re-attach and
    /// keep training; nothing is re-formed unless one fails to come back in time.
    Reattaching,
    Running,
    Recovering,
    Completed,
    Failed(String),
    Stopped(String),
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Forming => "forming",
            Phase::Reattaching => "re-attaching",
            Phase::Running => "running",
            Phase::Recovering => "recovering",
            Phase::Completed => "completed",
            Phase::Failed(_) => "failed",
            Phase::Stopped(_) => "stopped",
        }
    }

    pub fn is_over(&self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::Failed(_) | Phase::Stopped(_)
        )
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub conn: ConnId,
    pub endpoint: String,
    pub devices: Vec<String>,
    pub last_seen: Instant,
    /// Rank in the current generation; `None` while waiting for the next formation.
    pub rank: Option<u32>,
}

/// The last committed checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    pub step: u64,
    pub dir: String,
    pub generation: u64,
    /// The mixture schedule (the forgetting guard's rebalances): part of what the sample order
    /// depends on, so it is committed with the step and assigned with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<MixtureChange>,
    /// The forgetting guard's step-0 (base model) perplexity per watched source: a resumed job
    /// judges against the same base without measuring it again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub guard_base: BTreeMap<String, f64>,
    /// Every source's held-out perplexity at step 0 (the base model's), once measured: a
    /// resumed job's log, summary and dashboard compare with it, not with their first
    /// evaluation after the resume (they said "since step 60").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub base_perplexity: BTreeMap<String, f64>,
}

/// A generation as the durable store keeps it, so that a coordinator taking over knows who
/// should re-attach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRecord {
    pub generation: u64,
    pub ranks: Vec<String>,
    pub peers: Vec<String>,
    pub resume_step: u64,
}

/// One rank's samples of one committed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    pub step: u64,
    pub generation: u64,
    pub rank: u32,
    pub start: u64,
    pub end: u64,
}

/// What a rank said about one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub step: u64,
    pub rank: u32,
    pub samples: (u64, u64),
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: u64,
    /// Wall time of the whole step on this rank (training, then any evaluation and checkpoint).
    pub elapsed: Duration,
    /// The parts of `elapsed`.
    pub times: StepTimes,
    /// Dense bf16 peak of the rank's device, FLOP/s, when known.
    pub peak_flops: Option<f64>,
}

/// Where a step's time went. A zero evaluation or checkpoint time means there was none; a zero
/// training time comes from a worker that does not report the split (its whole `elapsed` is
/// then training).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub train: Duration,
    pub eval: Duration,
    pub checkpoint: Duration,
}

#[derive(Debug, Clone)]
pub struct Recovery {
    pub reason: String,
    pub detected: Instant,
    /// The generation being torn down.
    pub generation: Generation,
    /// Survivors that have not confirmed the abort yet.
    pub awaiting: BTreeSet<WorkerId>,
    pub abort_deadline: Instant,
    /// When every survivor confirmed (or the deadline passed).
    pub aborted: Option<Instant>,
    /// When the next generation was formed.
    pub reformed: Option<Instant>,
    /// The reason is a rank's report that a peer failed it (a closed connection, a timeout):
    /// the peer's own report of what went wrong, if it comes, replaces it.
    pub blames_peer: bool,
    /// A re-formation the job chose ([`Log::Recovery`]'s `planned`).
    pub planned: bool,
}

/// The job as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct JobState {
    pub config: ControlConfig,
    pub phase: Phase,
    /// The current (or last) generation; 0 before the first formation.
    pub generation: Generation,
    pub members: BTreeMap<WorkerId, Member>,
    /// Ranks of the current generation, by rank.
    pub ranks: Vec<WorkerId>,
    pub committed: Option<Committed>,
    /// When the job first had `min_workers` members while forming.
    pub ready_since: Option<Instant>,
    pub recovery: Option<Recovery>,
    /// Step reports of the current generation not yet committed: step -> rank -> report.
    pub steps: BTreeMap<u64, BTreeMap<u32, StepInfo>>,
    /// Checkpoint reports of the current generation: step -> (ranks, rank 0's directory, the
    /// ranks' weight digests).
    pub checkpoints: BTreeMap<u64, CheckpointVotes>,
    /// The newest step every rank completed, and its figures (for logs and status).
    pub last_step: Option<StepInfo>,
    /// Exponential moving average of a step's training time (seconds), for the ETA.
    pub step_time: Option<f64>,
    /// The time (seconds) of the held-out evaluations seen, and how many, for the ETA: the
    /// evaluations left at their mean, rather than in an average of step times that each
    /// evaluation spiked (the ETA rose by a tenth of an evaluation at each, then sank back).
    pub eval_time: (f64, u64),
    /// The same for checkpoints.
    pub checkpoint_time: (f64, u64),
    /// Generations since the last commit that ended in a failure.
    pub failed_generations: u32,
    /// A rank reported a failure that a retry from the last commit would meet again (a
    /// non-finite step): the job failed at once, without re-forming.
    pub failed_fatally: bool,
    /// While re-attaching: when ranks that have not come back are given up.
    pub reattach_deadline: Option<Instant>,
    /// When this coordinator took over (for the re-attach log line).
    pub took_over: Option<Instant>,
    /// The ranks' progress and the stalls seen (`stall`).
    pub stall: StallWatch,
    /// Workers left out of formations because a stall they held was aborted: they stay members
    /// (and leave with the others at the end) but get no rank again, unless without them the job
    /// would lack `min_workers`.
    pub benched: BTreeSet<WorkerId>,
    /// The forgetting guard, when the job has one ([`JobState::with_guard`]).
    pub guard: Option<Guard>,
    /// Held-out perplexities the ranks reported at step 0, for the next commit's
    /// [`Committed::base_perplexity`].
    pub base_evals: BTreeMap<String, f64>,
    /// The operator asked the job to stop ([`Event::Stop`]): the ranks checkpoint the step in
    /// progress, and its commit stops the job.
    pub stopping: Option<Stopping>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointVotes {
    pub ranks: BTreeSet<u32>,
    pub dir: Option<String>,
    pub digests: BTreeMap<u32, String>,
    /// A vote said the ranks stop after this checkpoint ([`Event::Checkpoint`]'s `stop`).
    pub stop: bool,
}

/// A worker's join request.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub job: String,
    pub worker: WorkerId,
    pub devices: Vec<String>,
    pub version: String,
    pub endpoint: String,
    /// A worker re-attaching to a new coordinator: the generation it trains in and its rank.
    pub attach: Option<(Generation, u32)>,
}

#[derive(Debug, Clone)]
pub enum Event {
    Join {
        conn: ConnId,
        request: JoinRequest,
    },
    /// The worker's membership lease expired or was revoked (etcd).
    Expired {
        worker: WorkerId,
    },
    /// The session ended (the worker's process died, or it hung up).
    Disconnected {
        conn: ConnId,
        worker: WorkerId,
    },
    Heartbeat {
        conn: ConnId,
        worker: WorkerId,
    },
    /// A heartbeat that says where the rank is (`stall`).
    Progress {
        conn: ConnId,
        worker: WorkerId,
        report: RankReport,
    },
    Step {
        conn: ConnId,
        worker: WorkerId,
        generation: Generation,
        info: StepInfo,
    },
    Checkpoint {
        conn: ConnId,
        worker: WorkerId,
        generation: Generation,
        step: u64,
        rank: u32,
        dir: String,
        digest: String,
        /// The ranks stop after this checkpoint, as [`Action::Stop`] asked.
        stop: bool,
    },
    Aborted {
        conn: ConnId,
        worker: WorkerId,
        generation: Generation,
    },
    Failed {
        conn: ConnId,
        worker: WorkerId,
        generation: Generation,
        reason: String,
        /// The failure would recur on a retry from the last commit (a step whose loss or
        /// gradient norm is not finite): the job fails instead of re-forming.
        fatal: bool,
        /// The failure was a peer's doing (it closed the ring, or went silent), as far as the
        /// rank can tell.
        peer_fault: bool,
    },
    Eval {
        conn: ConnId,
        worker: WorkerId,
        generation: Generation,
        step: u64,
        source: String,
        perplexity: f64,
        tokens: u64,
    },
    /// The committed checkpoint failed verification after a rank of the current generation
    /// failed naming it (it rotted after its commit): the executor found `earlier`, the newest
    /// earlier kept checkpoint that verifies. The job falls back to it; the steps after it are
    /// trained again.
    FellBack {
        earlier: Committed,
    },
    /// Time passes: session timeouts, the formation grace and abort deadlines.
    Tick,
    /// The operator stops the job now (a second Ctrl-C): every rank aborts the step in flight,
    /// and the job stops at its last commit.
    Shutdown {
        reason: String,
    },
    /// The operator stops the job (Ctrl-C, SIGTERM): a running generation checkpoints the step in
    /// progress and the job stops once that is committed ([`Action::Stop`]); one that is not
    /// committed within [`stop_grace`], a job not running (forming, recovering), or a second
    /// stop, stops at once as [`Event::Shutdown`] does.
    Stop {
        reason: String,
    },
}

/// The operator's stop, waiting for the checkpoint of the step in progress.
#[derive(Debug, Clone)]
pub struct Stopping {
    pub reason: String,
    /// When the job stops at its last commit if that checkpoint is not committed by then.
    pub deadline: Instant,
    /// `deadline` less the request's time.
    pub grace: Duration,
}

/// What one generation's rank is told to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub generation: Generation,
    pub rank: u32,
    pub world: u32,
    pub peers: Vec<String>,
    pub resume_step: u64,
    pub checkpoint: Option<String>,
    pub micro_batch: u32,
    pub accumulation: u32,
    pub total_steps: u64,
    /// The committed mixture schedule.
    pub schedule: Vec<MixtureChange>,
}

/// A recovery's milestones, each with the time since the loss was detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryPhase {
    Detected,
    Aborted,
    Reformed,
    Resumed,
}

impl RecoveryPhase {
    pub fn name(self) -> &'static str {
        match self {
            RecoveryPhase::Detected => "detected",
            RecoveryPhase::Aborted => "aborted",
            RecoveryPhase::Reformed => "re-formed",
            RecoveryPhase::Resumed => "resumed",
        }
    }
}

/// A line for the coordinator's log: what happened, with its figures.
#[derive(Debug, Clone, PartialEq)]
pub enum Log {
    Joined {
        worker: WorkerId,
        members: usize,
        standby: bool,
    },
    /// Every rank of the running generation re-attached to this (new) coordinator.
    Reattached {
        generation: Generation,
        world: u32,
        took: Duration,
    },
    Lost {
        worker: WorkerId,
        reason: String,
    },
    Refused {
        worker: WorkerId,
        refusal: Refusal,
    },
    Formed {
        generation: Generation,
        world: u32,
        resume_step: u64,
        ranks: Vec<WorkerId>,
    },
    Waiting {
        members: usize,
        min_workers: usize,
    },
    Step {
        /// The step that completed, 0-based (`step + 1` steps are done).
        step: u64,
        total_steps: u64,
        loss: f64,
        /// Training throughput of the step: its tokens over the slowest rank's training time
        /// (evaluation and checkpoint excluded).
        tokens_per_s: f64,
        lr: f64,
        grad_norm: f64,
        world: u32,
        generation: Generation,
        eta: Duration,
        /// Tokens in the global batch.
        tokens: u64,
        /// The slowest rank's wall time for the whole step.
        elapsed: Duration,
        /// The slowest rank's time for each part of the step.
        times: StepTimes,
        /// The ranks' dense bf16 peaks summed, FLOP/s, when every rank's is known.
        peak_flops: Option<f64>,
    },
    Eval {
        step: u64,
        source: String,
        perplexity: f64,
        tokens: u64,
    },
    Recovery {
        phase: RecoveryPhase,
        generation: Generation,
        /// Time since the previous milestone.
        took: Duration,
        /// Time since the loss was detected.
        since_detected: Duration,
        reason: String,
        /// A re-formation the job chose (standbys joining, the forgetting guard's mixture
        /// change), not a recovery from a loss: not counted as a recovery.
        planned: bool,
    },
    Committed {
        step: u64,
        dir: String,
        digest: String,
    },
    Diverged {
        step: u64,
        digests: BTreeMap<u32, String>,
    },
    Completed {
        step: u64,
        dir: String,
    },
    Failed {
        reason: String,
    },
    /// A rank of a generation being torn down for a peer's fault reported its own failure:
    /// the root cause, which the recovery (and a failed job) now gives as its reason.
    Cause {
        generation: Generation,
        worker: WorkerId,
        reason: String,
    },
    Stopping {
        reason: String,
    },
    /// The operator asked the job to stop: the ranks checkpoint the step in progress first, for
    /// at most `grace`.
    StopRequested {
        reason: String,
        grace: Duration,
    },
    /// A step passed its bound (named), was aborted, or completed after all (`stall`).
    Stall(Stall),
    /// The forgetting guard tripped: an evaluation rose past its bound.
    GuardTripped(Trip),
    /// A rebalance's new mixture was committed with `step`; the generation re-forms on it.
    MixtureChanged {
        step: u64,
        weights: Vec<f64>,
        replay_share: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Accept the session's join: send the job.
    Accept {
        conn: ConnId,
        worker: WorkerId,
    },
    /// End the session with this refusal.
    RefuseJoin {
        conn: ConnId,
        refusal: Refusal,
    },
    /// Tell a member one of its messages was refused; the session goes on.
    Refuse {
        worker: WorkerId,
        conn: ConnId,
        refusal: Refusal,
    },
    Assign {
        worker: WorkerId,
        conn: ConnId,
        assignment: Assignment,
    },
    Abort {
        worker: WorkerId,
        conn: ConnId,
        generation: Generation,
        reason: String,
    },
    /// End a member's session (it timed out).
    Drop {
        conn: ConnId,
        worker: WorkerId,
    },
    /// Record the generation just formed in the durable store (etcd).
    RecordGeneration(GenerationRecord),
    /// Make `committed` durable: append `ledger`, then record the committed step.
    Commit {
        committed: Committed,
        ledger: Vec<LedgerEntry>,
    },
    /// Record `committed` (an earlier commit than the store's) as the committed one and drop
    /// the ledger of the steps after it ([`Event::FellBack`]).
    FallBack {
        committed: Committed,
    },
    /// Checkpoint the step in progress and end the generation's training (the operator's
    /// [`Event::Stop`]).
    Stop {
        worker: WorkerId,
        conn: ConnId,
        generation: Generation,
        reason: String,
    },
    /// The job completed: tell the worker to leave.
    Finish {
        worker: WorkerId,
        conn: ConnId,
        step: u64,
        dir: String,
    },
    Log(Log),
}

impl JobState {
    pub fn new(config: ControlConfig, committed: Option<Committed>) -> Self {
        JobState {
            config,
            phase: Phase::Forming,
            generation: Generation(committed.as_ref().map_or(0, |c| c.generation)),
            members: BTreeMap::new(),
            ranks: Vec::new(),
            committed,
            ready_since: None,
            recovery: None,
            steps: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            last_step: None,
            step_time: None,
            eval_time: (0.0, 0),
            checkpoint_time: (0.0, 0),
            failed_generations: 0,
            failed_fatally: false,
            reattach_deadline: None,
            took_over: None,
            stall: StallWatch::default(),
            benched: BTreeSet::new(),
            guard: None,
            base_evals: BTreeMap::new(),
            stopping: None,
        }
    }

    /// This state with the forgetting guard `guard`. A generation taken over before its bases
    /// were committed is re-formed from step 0 instead of re-attached: only a generation that
    /// starts at step 0 measures the base model.
    pub fn with_guard(mut self, guard: Option<Guard>) -> Self {
        if self.phase == Phase::Reattaching
            && guard.as_ref().is_some_and(|g| !g.has_bases())
            && self.committed_step() == 0
        {
            self.phase = Phase::Forming;
            self.ranks.clear();
            self.reattach_deadline = None;
            self.took_over = None;
        }
        self.guard = guard;
        self
    }

    /// A coordinator taking over `record`'s generation: its ranks have until `deadline` to
    /// re-attach. A generation that resumed from a step past `committed` cannot be taken
    /// back: the state is then forming the next one.
    pub fn take_over(
        config: ControlConfig,
        committed: Option<Committed>,
        record: GenerationRecord,
        now: Instant,
        deadline: Instant,
    ) -> Self {
        let mut state =
            JobState::new(config, committed).after_generation(Some(Generation(record.generation)));
        let schedule_changed = state
            .committed
            .as_ref()
            .and_then(|c| c.schedule.last())
            .is_some_and(|change| change.step > record.resume_step);
        // A mixture change committed after the generation resumed: its ranks draw the old
        // order, so it cannot go on either.
        if record.resume_step > state.committed_step() || schedule_changed {
            // The generation resumed from a commit the store never recorded (the previous
            // leader lost etcd before it could): its ranks trained on from there, and no report
            // of theirs can fill the steps in between. Form a new one from what is durable.
            return state;
        }
        state.phase = Phase::Reattaching;
        state.generation = Generation(record.generation);
        state.ranks = record.ranks.into_iter().map(WorkerId).collect();
        state.reattach_deadline = Some(deadline);
        state.took_over = Some(now);
        state
    }

    /// A coordinator starting again where generations up to `last` were handed out before: the
    /// next formation takes the one after, so that no generation is handed out twice (workers
    /// of the old one may still be training and reporting under its number).
    pub fn after_generation(mut self, last: Option<Generation>) -> Self {
        if let Some(last) = last.filter(|last| *last > self.generation) {
            self.generation = last;
        }
        self
    }

    pub fn committed_step(&self) -> u64 {
        self.committed.as_ref().map_or(0, |c| c.step)
    }

    /// [`Phase::name`], or `stopping` while a running generation checkpoints the step in
    /// progress for the operator's stop ([`Event::Stop`]): what `dapt status`, the dashboard and
    /// `/metrics` show.
    pub fn phase_name(&self) -> &'static str {
        if self.phase == Phase::Running && self.stopping.is_some() {
            "stopping"
        } else {
            self.phase.name()
        }
    }

    fn world(&self) -> u32 {
        self.ranks.len() as u32
    }

    /// Whether `conn` is the session `worker` joined on.
    fn is_member(&self, worker: &WorkerId, conn: ConnId) -> bool {
        self.members.get(worker).is_some_and(|m| m.conn == conn)
    }
}

/// The coordinator's next state and actions after `event` at `now`.
pub fn decide(mut state: JobState, event: Event, now: Instant) -> (JobState, Vec<Action>) {
    let mut out = Vec::new();
    // Any message from a member proves it alive.
    match &event {
        Event::Heartbeat { conn, worker }
        | Event::Progress { conn, worker, .. }
        | Event::Step { conn, worker, .. }
        | Event::Checkpoint { conn, worker, .. }
        | Event::Aborted { conn, worker, .. }
        | Event::Failed { conn, worker, .. }
        | Event::Eval { conn, worker, .. } => {
            if let Some(m) = state.members.get_mut(worker).filter(|m| m.conn == *conn) {
                m.last_seen = now;
            }
        }
        _ => {}
    }
    match event {
        Event::Join { conn, request } => join(&mut state, conn, request, now, &mut out),
        Event::Expired { worker } => {
            // Its session may be alive (the lease lapsed in an etcd outage): end it, or the
            // worker would go on talking to a coordinator that ignores it, never to be
            // assigned again. It joins again and is taken in at the next formation.
            if let Some(m) = state.members.get(&worker) {
                out.push(Action::Drop {
                    conn: m.conn,
                    worker: worker.clone(),
                });
            }
            let reason = "its etcd lease expired".to_string();
            lose(&mut state, &worker, reason, now, &mut out);
        }
        Event::Disconnected { conn, worker } => {
            if state.is_member(&worker, conn) {
                lose(
                    &mut state,
                    &worker,
                    "its session ended".into(),
                    now,
                    &mut out,
                );
            }
        }
        Event::Heartbeat { .. } => {}
        Event::Progress {
            conn,
            worker,
            report,
        } => {
            let rank = state.members.get(&worker).filter(|m| m.conn == conn);
            if let Some(rank) = rank.and_then(|m| m.rank) {
                if report.generation == state.generation && state.phase == Phase::Running {
                    state.stall.report(rank, report);
                }
            }
        }
        Event::Step {
            conn,
            worker,
            generation,
            info,
        } => {
            if let Some(rank) = current_rank(&state, &worker, conn, generation, &mut out) {
                step_report(&mut state, rank, info, now, &mut out);
            }
        }
        Event::Checkpoint {
            conn,
            worker,
            generation,
            step,
            rank: _,
            dir,
            digest,
            stop,
        } => {
            if let Some(rank) = current_rank(&state, &worker, conn, generation, &mut out) {
                let vote = Vote { dir, digest, stop };
                checkpoint_report(&mut state, rank, step, vote, now, &mut out);
            }
        }
        Event::Aborted {
            conn,
            worker,
            generation,
        } => {
            if state.is_member(&worker, conn) {
                if let Some(r) = state
                    .recovery
                    .as_mut()
                    .filter(|r| r.generation == generation)
                {
                    r.awaiting.remove(&worker);
                }
            }
        }
        Event::Failed {
            conn,
            worker,
            generation,
            reason,
            fatal,
            peer_fault,
        } => {
            let reason = format!("{worker} failed: {reason}");
            let root_cause = state.is_member(&worker, conn)
                && !peer_fault
                && state
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.generation == generation && r.blames_peer);
            if root_cause && fatal {
                // A peer's report began a recovery, but this rank's own failure would recur
                // from the last commit: end the job with it.
                state.failed_fatally = true;
                fail(&mut state, reason, Some(&worker), &mut out);
            } else if root_cause {
                // A peer reported this rank's failure first (its ring saw the connection
                // close); this is what actually went wrong.
                if let Some(r) = state.recovery.as_mut() {
                    r.reason = reason.clone();
                    r.blames_peer = false;
                }
                out.push(Action::Log(Log::Cause {
                    generation,
                    worker,
                    reason,
                }));
            } else if current_rank(&state, &worker, conn, generation, &mut out).is_some() {
                // The failed rank's training has stopped already: it needs no abort order.
                if fatal {
                    // Re-forming would replay the same steps from the same commit into the
                    // same failure: end the job with the worker's reason.
                    state.failed_fatally = true;
                    fail(&mut state, reason, Some(&worker), &mut out);
                } else {
                    if peer_fault {
                        // The rank's own collective timeout fired during a stall that was
                        // named: leave its culprit out, as the stall timeout would have.
                        bench_stalled(&mut state, &mut out);
                    }
                    begin_recovery(&mut state, reason, Some(&worker), now, &mut out);
                    if let Some(r) = state.recovery.as_mut() {
                        r.blames_peer = peer_fault;
                    }
                }
            }
        }
        Event::Eval {
            conn,
            worker,
            generation,
            step,
            source,
            perplexity,
            tokens,
        } => {
            let member = current_rank(&state, &worker, conn, generation, &mut out).is_some();
            if member && !state.config.sources.contains(&source) {
                // A member holds the token, but a name that is not the job's is no evaluation:
                // `/metrics` wrote it into a label as it came (quotes and newlines included, a
                // forged metric), and every new name grew the registry for the job's life.
                let known: Vec<&str> = state.config.sources.iter().map(String::as_str).collect();
                let refusal = Refusal::new(
                    ErrorCode::Invalid,
                    format!(
                        "evaluation of `{source}`, which is not a source of the job ({})",
                        known.join(", ")
                    ),
                );
                refuse(worker, conn, refusal, &mut out);
            } else if member {
                out.push(Action::Log(Log::Eval {
                    step,
                    source: source.clone(),
                    perplexity,
                    tokens,
                }));
                if step == 0 {
                    state.base_evals.entry(source.clone()).or_insert(perplexity);
                }
                guard_reading(&mut state, step, &source, perplexity, &mut out);
            }
        }
        Event::FellBack { earlier } => {
            let later = state
                .committed
                .as_ref()
                .is_some_and(|c| c.step > earlier.step);
            if later && !state.phase.is_over() {
                // What the current generation reported since rests on the corrupt checkpoint;
                // the failure that named it tears that generation down.
                state.steps.clear();
                state.checkpoints.clear();
                state.committed = Some(earlier.clone());
                out.push(Action::FallBack { committed: earlier });
            }
        }
        Event::Tick => tick(&mut state, now, &mut out),
        Event::Shutdown { reason } => stop_now(&mut state, reason, &mut out),
        Event::Stop { reason } => request_stop(&mut state, reason, now, &mut out),
    }
    progress(&mut state, now, &mut out);
    (state, out)
}

/// Stops the job at its last commit: every rank aborts the step in flight.
fn stop_now(state: &mut JobState, reason: String, out: &mut Vec<Action>) {
    if state.phase.is_over() {
        return;
    }
    out.push(Action::Log(Log::Stopping {
        reason: reason.clone(),
    }));
    abort_ranks(state, &reason, None, out);
    state.phase = Phase::Stopped(reason);
    state.stopping = None;
}

/// The operator's stop ([`Event::Stop`]): a running generation is told to checkpoint the step in
/// progress; anything else stops at once.
fn request_stop(state: &mut JobState, reason: String, now: Instant, out: &mut Vec<Action>) {
    if state.phase.is_over() {
        return;
    }
    if state.stopping.is_some() || state.phase != Phase::Running {
        // Asked again (the operator will not wait), or no generation trains: nothing to
        // checkpoint.
        stop_now(state, reason, out);
        return;
    }
    let grace = stop_grace(state);
    out.push(Action::Log(Log::StopRequested {
        reason: reason.clone(),
        grace,
    }));
    for w in &state.ranks {
        if let Some(m) = state.members.get(w) {
            out.push(Action::Stop {
                worker: w.clone(),
                conn: m.conn,
                generation: state.generation,
                reason: reason.clone(),
            });
        }
    }
    state.stopping = Some(Stopping {
        reason,
        deadline: now + grace,
        grace,
    });
}

/// How long the ranks get to checkpoint the step in progress after a stop: 30 s, plus twice a
/// step's training time and a checkpoint's time as seen so far (30 s for a checkpoint while
/// none was seen). A rank that takes longer (a hung peer) stops at the last commit.
pub fn stop_grace(state: &JobState) -> Duration {
    let step = state.step_time.unwrap_or(0.0);
    let (total, n) = state.checkpoint_time;
    let checkpoint = if n > 0 { total / n as f64 } else { 30.0 };
    Duration::from_secs_f64(30.0 + 2.0 * (step + checkpoint))
}

fn join(
    state: &mut JobState,
    conn: ConnId,
    request: JoinRequest,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let c = &state.config;
    // The session proved the token before this (`server::authenticate`); the job's name is
    // still not told to a worker that names another.
    let refusal = if request.job != c.job {
        Some(Refusal::new(
            ErrorCode::OtherJob,
            format!("this coordinator does not run job `{}`", request.job),
        ))
    } else if !compatible(&request.version, &c.version) {
        Some(Refusal::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "worker version {} cannot work with coordinator version {}",
                request.version, c.version
            ),
        ))
    } else if state.phase.is_over() {
        Some(Refusal::new(
            ErrorCode::JobOver,
            format!("the job is {}", state.phase.name()),
        ))
    } else if state.members.contains_key(&request.worker) {
        Some(Refusal::new(
            ErrorCode::DuplicateWorker,
            format!("a worker with id `{}` is already a member", request.worker),
        ))
    } else if request.worker.0.is_empty() || !request.endpoint.contains(':') {
        Some(Refusal::new(
            ErrorCode::Invalid,
            format!(
                "worker id must not be empty and the collective endpoint must be host:port (got `{}`)",
                request.endpoint
            ),
        ))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        out.push(Action::Log(Log::Refused {
            worker: request.worker,
            refusal: refusal.clone(),
        }));
        out.push(Action::RefuseJoin { conn, refusal });
        return;
    }
    // A rank of the generation this coordinator took over, coming back.
    let rank = match (state.phase == Phase::Reattaching, request.attach) {
        (true, Some((generation, rank)))
            if generation == state.generation
                && state.ranks.get(rank as usize) == Some(&request.worker) =>
        {
            Some(rank)
        }
        _ => None,
    };
    state.members.insert(
        request.worker.clone(),
        Member {
            conn,
            endpoint: request.endpoint,
            devices: request.devices,
            last_seen: now,
            rank,
        },
    );
    out.push(Action::Accept {
        conn,
        worker: request.worker.clone(),
    });
    out.push(Action::Log(Log::Joined {
        worker: request.worker,
        members: state.members.len(),
        standby: rank.is_none()
            && matches!(
                state.phase,
                Phase::Running | Phase::Recovering | Phase::Reattaching
            ),
    }));
}

/// The rank of `worker` in the current generation if the message is for it; otherwise refuses
/// the message (stale generation, or not a member) and returns `None`.
fn current_rank(
    state: &JobState,
    worker: &WorkerId,
    conn: ConnId,
    generation: Generation,
    out: &mut Vec<Action>,
) -> Option<u32> {
    let member = state.members.get(worker).filter(|m| m.conn == conn)?;
    let current = matches!(state.phase, Phase::Running | Phase::Reattaching);
    let refusal = if generation != state.generation || !current {
        Refusal::new(
            ErrorCode::StaleGeneration,
            format!(
                "generation {generation} is not current (the job is {} in generation {})",
                state.phase.name(),
                state.generation
            ),
        )
    } else if let Some(rank) = member.rank {
        return Some(rank);
    } else {
        Refusal::new(
            ErrorCode::StaleGeneration,
            format!("`{worker}` has no rank in generation {generation}"),
        )
    };
    refuse(worker.clone(), conn, refusal, out);
    None
}

/// Refuses a worker's message on session `conn`, and logs why.
fn refuse(worker: WorkerId, conn: ConnId, refusal: Refusal, out: &mut Vec<Action>) {
    out.push(Action::Log(Log::Refused {
        worker: worker.clone(),
        refusal: refusal.clone(),
    }));
    out.push(Action::Refuse {
        worker,
        conn,
        refusal,
    });
}

fn lose(
    state: &mut JobState,
    worker: &WorkerId,
    reason: String,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let Some(member) = state.members.remove(worker) else {
        return;
    };
    out.push(Action::Log(Log::Lost {
        worker: worker.clone(),
        reason: reason.clone(),
    }));
    if let Some(r) = &mut state.recovery {
        r.awaiting.remove(worker);
    }
    if member.rank.is_some() && matches!(state.phase, Phase::Running | Phase::Reattaching) {
        begin_recovery(state, format!("{worker} lost: {reason}"), None, now, out);
    }
}

/// Aborts the current generation: every rank but `stopped` (whose training already ended) is
/// told to stop and confirm.
fn begin_recovery(
    state: &mut JobState,
    reason: String,
    stopped: Option<&WorkerId>,
    now: Instant,
    out: &mut Vec<Action>,
) {
    start_reformation(state, reason, stopped, now, out, false);
}

/// Tears the generation down to form the next one from the committed step: after a loss
/// ([`begin_recovery`]), or `planned` by the job (standbys joining, a mixture change), which a
/// summary does not count as a recovery (a new user's walk-through: three guard rebalances read
/// "recoveries 3").
fn start_reformation(
    state: &mut JobState,
    reason: String,
    stopped: Option<&WorkerId>,
    now: Instant,
    out: &mut Vec<Action>,
    planned: bool,
) {
    state.failed_generations += 1;
    let awaiting: BTreeSet<WorkerId> = state
        .ranks
        .iter()
        .filter(|w| Some(*w) != stopped && state.members.contains_key(*w))
        .cloned()
        .collect();
    abort_ranks(state, &reason, stopped, out);
    out.push(Action::Log(Log::Recovery {
        phase: RecoveryPhase::Detected,
        generation: state.generation,
        took: Duration::ZERO,
        since_detected: Duration::ZERO,
        reason: reason.clone(),
        planned,
    }));
    state.recovery = Some(Recovery {
        planned,
        reason,
        detected: now,
        generation: state.generation,
        awaiting,
        abort_deadline: now + state.config.abort_timeout,
        aborted: None,
        reformed: None,
        blames_peer: false,
    });
    state.phase = Phase::Recovering;
    state.steps.clear();
    state.checkpoints.clear();
}

/// Ends the job as failed for `reason`: every member but `stopped` (whose training already
/// ended) is told to stop.
fn fail(state: &mut JobState, reason: String, stopped: Option<&WorkerId>, out: &mut Vec<Action>) {
    out.push(Action::Log(Log::Failed {
        reason: reason.clone(),
    }));
    for (w, m) in &state.members {
        if Some(w) == stopped {
            continue;
        }
        out.push(Action::Abort {
            worker: w.clone(),
            conn: m.conn,
            generation: state.generation,
            reason: reason.clone(),
        });
    }
    state.phase = Phase::Failed(reason);
}

fn abort_ranks(state: &JobState, reason: &str, except: Option<&WorkerId>, out: &mut Vec<Action>) {
    for w in &state.ranks {
        if Some(w) == except {
            continue;
        }
        if let Some(m) = state.members.get(w) {
            out.push(Action::Abort {
                worker: w.clone(),
                conn: m.conn,
                generation: state.generation,
                reason: reason.to_string(),
            });
        }
    }
}

fn tick(state: &mut JobState, now: Instant, out: &mut Vec<Action>) {
    let timeout = state.config.session_timeout;
    let silent: Vec<(WorkerId, ConnId)> = state
        .members
        .iter()
        .filter(|(_, m)| now.saturating_duration_since(m.last_seen) > timeout)
        .map(|(w, m)| (w.clone(), m.conn))
        .collect();
    for (worker, conn) in silent {
        out.push(Action::Drop {
            conn,
            worker: worker.clone(),
        });
        lose(
            state,
            &worker,
            format!("no heartbeat for {}", fmt_duration(timeout)),
            now,
            out,
        );
    }
    if state.phase == Phase::Reattaching && state.reattach_deadline.is_some_and(|d| now >= d) {
        let missing: Vec<String> = state
            .ranks
            .iter()
            .filter(|w| state.members.get(*w).is_none_or(|m| m.rank.is_none()))
            .map(|w| w.0.clone())
            .collect();
        begin_recovery(
            state,
            format!("ranks did not re-attach in time: {}", missing.join(", ")),
            None,
            now,
            out,
        );
    }
    if let Some(s) = state.stopping.as_ref().filter(|s| now >= s.deadline) {
        let reason = format!(
            "{}; the step in progress was not checkpointed within {}",
            s.reason,
            fmt_duration(s.grace)
        );
        stop_now(state, reason, out);
    }
    if state.phase == Phase::Running {
        check_stall(state, now, out);
    }
    if let Some(r) = &mut state.recovery {
        if r.aborted.is_none() && !r.awaiting.is_empty() && now >= r.abort_deadline {
            // Survivors that cannot confirm an abort in time are as good as lost.
            let late: Vec<WorkerId> = r.awaiting.iter().cloned().collect();
            for worker in late {
                if let Some(m) = state.members.get(&worker) {
                    out.push(Action::Drop {
                        conn: m.conn,
                        worker: worker.clone(),
                    });
                }
                lose(
                    state,
                    &worker,
                    "did not confirm the abort in time".into(),
                    now,
                    out,
                );
            }
        }
    }
}

/// Moves the job forward where the state allows: forms a generation, notes an abort complete.
fn progress(state: &mut JobState, now: Instant, out: &mut Vec<Action>) {
    if state.phase == Phase::Reattaching
        && state
            .ranks
            .iter()
            .all(|w| state.members.get(w).is_some_and(|m| m.rank.is_some()))
    {
        state.phase = Phase::Running;
        state.reattach_deadline = None;
        out.push(Action::Log(Log::Reattached {
            generation: state.generation,
            world: state.world(),
            took: now.saturating_duration_since(state.took_over.unwrap_or(now)),
        }));
    }
    if state.phase == Phase::Recovering {
        if let Some(s) = state.stopping.take() {
            // A rank lost or failed while the job was stopping: no new generation to checkpoint
            // the step; the job stops at its last commit (the ranks were told to abort).
            let reason = format!(
                "{}; the step in progress was not checkpointed: {}",
                s.reason,
                state.recovery.as_ref().map_or("", |r| r.reason.as_str())
            );
            stop_now(state, reason, out);
            return;
        }
    }
    let mut just_aborted = false;
    if state.phase == Phase::Recovering {
        let r = state.recovery.as_mut().expect("recovering has a recovery");
        if r.aborted.is_none() && r.awaiting.is_empty() {
            r.aborted = Some(now);
            out.push(Action::Log(Log::Recovery {
                phase: RecoveryPhase::Aborted,
                generation: r.generation,
                took: now - r.detected,
                since_detected: now - r.detected,
                reason: r.reason.clone(),
                planned: r.planned,
            }));
            state.phase = Phase::Forming;
            state.ready_since = None;
            for m in state.members.values_mut() {
                m.rank = None;
            }
            state.ranks.clear();
            just_aborted = true;
        }
    }
    if state.phase != Phase::Forming {
        return;
    }
    let c = &state.config;
    if state.members.len() >= c.min_workers && state.members.len() - benched(state) < c.min_workers
    {
        // Without the benched workers the job cannot train at all: better with them.
        state.benched.clear();
    }
    let members = state.members.len() - benched(state);
    if members < c.min_workers {
        state.ready_since = None;
        if just_aborted {
            out.push(Action::Log(Log::Waiting {
                members,
                min_workers: c.min_workers,
            }));
        }
        return;
    }
    let ready = *state.ready_since.get_or_insert(now);
    let full = c.max_workers.is_some_and(|m| members >= m);
    // After a loss, re-form with the survivors at once.
    let recovering = state.recovery.is_some();
    if full || recovering || now.saturating_duration_since(ready) >= c.formation_grace {
        form(state, now, out);
    }
}

fn form(state: &mut JobState, now: Instant, out: &mut Vec<Action>) {
    if state.failed_generations > state.config.max_failed_generations {
        let reason = format!(
            "{} generations in a row failed without committing progress; last: {}",
            state.failed_generations,
            state.recovery.as_ref().map_or("", |r| r.reason.as_str())
        );
        fail(state, reason, None, out);
        return;
    }
    if let Some(done) = state
        .committed
        .clone()
        .filter(|c| c.step >= state.config.total_steps)
    {
        // A relaunch of a job that already completed: nothing to train.
        complete_at(state, done.step, &done.dir, out);
        return;
    }
    let c = &state.config;
    // Ranks in worker-id order; at most max_workers, and no more than samples in a step.
    let limit = c
        .max_workers
        .unwrap_or(usize::MAX)
        .min(c.global_batch as usize);
    let chosen: Vec<WorkerId> = state
        .members
        .keys()
        .filter(|w| !state.benched.contains(*w))
        .take(limit)
        .cloned()
        .collect();
    state.stall.formed();
    let world = chosen.len() as u32;
    state.generation = Generation(state.generation.0 + 1);
    state.ranks = chosen.clone();
    state.phase = Phase::Running;
    state.ready_since = None;
    state.steps.clear();
    state.checkpoints.clear();
    let resume_step = state.committed_step();
    let checkpoint = state.committed.as_ref().map(|c| c.dir.clone());
    let peers: Vec<String> = chosen
        .iter()
        .map(|w| state.members[w].endpoint.clone())
        .collect();
    // Recorded before anyone is told: a coordinator that cannot record it (it lost the etcd
    // leadership) stops there, and no worker trains in a generation the next leader would
    // hand out again.
    out.push(Action::RecordGeneration(GenerationRecord {
        generation: state.generation.0,
        ranks: chosen.iter().map(|w| w.0.clone()).collect(),
        peers: peers.clone(),
        resume_step,
    }));
    for (rank, worker) in chosen.iter().enumerate() {
        let rank = rank as u32;
        let share = rank_slice(0, c.global_batch, rank, world);
        let share = share.end - share.start;
        let micro = c.micro_batch.min(share).max(1);
        let member = state.members.get_mut(worker).expect("chosen from members");
        member.rank = Some(rank);
        out.push(Action::Assign {
            worker: worker.clone(),
            conn: member.conn,
            assignment: Assignment {
                generation: state.generation,
                rank,
                world,
                peers: peers.clone(),
                resume_step,
                checkpoint: checkpoint.clone(),
                micro_batch: micro as u32,
                accumulation: share.div_ceil(micro) as u32,
                total_steps: c.total_steps,
                schedule: state
                    .committed
                    .as_ref()
                    .map(|c| c.schedule.clone())
                    .unwrap_or_default(),
            },
        });
    }
    out.push(Action::Log(Log::Formed {
        generation: state.generation,
        world,
        resume_step,
        ranks: chosen,
    }));
    if let Some(r) = &mut state.recovery {
        let aborted = r.aborted.unwrap_or(now);
        r.reformed = Some(now);
        out.push(Action::Log(Log::Recovery {
            phase: RecoveryPhase::Reformed,
            generation: state.generation,
            took: now - aborted,
            since_detected: now - r.detected,
            reason: r.reason.clone(),
            planned: r.planned,
        }));
    }
}

/// How many of the steps after `done` up to `total` evaluate or checkpoint on a schedule of
/// every `every` steps and at the last (the ranks' schedule: `worker/src/agent/rank.rs`); 0 for
/// `every` 0 (`eval_every: 0`, no evaluations).
fn events_left(every: u64, done: u64, total: u64) -> u64 {
    if every == 0 || done >= total {
        return 0;
    }
    total / every - done / every + u64::from(!total.is_multiple_of(every))
}

fn step_report(
    state: &mut JobState,
    rank: u32,
    info: StepInfo,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let c = &state.config;
    let world = state.world();
    if info.step < state.committed_step() {
        // A re-attaching rank replays its reports; the committed ones are in the ledger.
        return;
    }
    let expected = rank_slice(info.step, c.global_batch, rank, world);
    if info.rank != rank
        || (info.samples.0, info.samples.1) != (expected.start, expected.end)
        || info.step >= c.total_steps
    {
        let worker = state.ranks[rank as usize].clone();
        let refusal = Refusal::new(
            ErrorCode::Invalid,
            format!(
                "step {} report from rank {} covers samples {:?}, expected rank {rank}'s {:?}",
                info.step, info.rank, info.samples, expected
            ),
        );
        let conn = state.members[&worker].conn;
        refuse(worker, conn, refusal, out);
        return;
    }
    let step = info.step;
    let reports = state.steps.entry(step).or_default();
    reports.insert(rank, info);
    if reports.len() as u32 != world {
        return;
    }
    // Every rank completed the step: its loss is the same on all (it was all-reduced).
    let first = &reports[&0];
    let slowest =
        |part: fn(&StepInfo) -> Duration| reports.values().map(part).max().unwrap_or_default();
    let elapsed = slowest(|r| r.elapsed);
    let times = StepTimes {
        // A worker without the split reports no training time: all of it was training.
        train: slowest(|r| {
            if r.times.train.is_zero() {
                r.elapsed
            } else {
                r.times.train
            }
        }),
        eval: slowest(|r| r.times.eval),
        checkpoint: slowest(|r| r.times.checkpoint),
    };
    let peak_flops = reports.values().map(|r| r.peak_flops).sum::<Option<f64>>();
    // The ETA: the steps left at the recent training time per step, and the evaluations and
    // checkpoints left (the ranks' schedule) at their mean time so far.
    let train_secs = times.train.min(elapsed).as_secs_f64();
    let ema = match state.step_time {
        Some(t) => 0.9 * t + 0.1 * train_secs,
        None => train_secs,
    };
    state.step_time = Some(ema);
    for (spent, seen) in [
        (times.eval, &mut state.eval_time),
        (times.checkpoint, &mut state.checkpoint_time),
    ] {
        if !spent.is_zero() {
            seen.0 += spent.as_secs_f64();
            seen.1 += 1;
        }
    }
    let remaining = c.total_steps.saturating_sub(step + 1);
    let mean = |(secs, n): (f64, u64)| if n == 0 { 0.0 } else { secs / n as f64 };
    let eta = ema * remaining as f64
        + mean(state.eval_time) * events_left(c.eval_every, step + 1, c.total_steps) as f64
        + mean(state.checkpoint_time)
            * events_left(c.checkpoint_every, step + 1, c.total_steps) as f64;
    out.push(Action::Log(Log::Step {
        step,
        total_steps: c.total_steps,
        loss: first.loss,
        tokens_per_s: first.tokens as f64 / times.train.as_secs_f64().max(1e-9),
        lr: first.lr,
        grad_norm: first.grad_norm,
        world,
        generation: state.generation,
        eta: Duration::from_secs_f64(eta),
        tokens: first.tokens,
        elapsed,
        times,
        peak_flops,
    }));
    state.last_step = Some(first.clone());
    if let Some(cleared) = state
        .stall
        .step_done(times.train, times.eval, times.checkpoint, now)
    {
        out.push(Action::Log(Log::Stall(cleared)));
    }
    if let Some(r) = state.recovery.take() {
        out.push(Action::Log(Log::Recovery {
            phase: RecoveryPhase::Resumed,
            generation: state.generation,
            took: now - r.reformed.unwrap_or(now),
            since_detected: now - r.detected,
            reason: r.reason,
            planned: r.planned,
        }));
    }
}

/// One rank's checkpoint report ([`Event::Checkpoint`]).
struct Vote {
    /// Rank 0's checkpoint directory; empty for the others.
    dir: String,
    digest: String,
    stop: bool,
}

fn checkpoint_report(
    state: &mut JobState,
    rank: u32,
    step: u64,
    vote: Vote,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let Vote { dir, digest, stop } = vote;
    let world = state.world();
    if step <= state.committed_step() {
        return;
    }
    if step > state.config.total_steps {
        // Never committable: a vote for it would stay in the state for the job's life.
        let worker = state.ranks[rank as usize].clone();
        let refusal = Refusal::new(
            ErrorCode::Invalid,
            format!(
                "checkpoint report for step {step}, past the job's {} steps",
                state.config.total_steps
            ),
        );
        let conn = state.members[&worker].conn;
        refuse(worker, conn, refusal, out);
        return;
    }
    let (voted, dir, digests, stop) = {
        let votes = state.checkpoints.entry(step).or_default();
        votes.ranks.insert(rank);
        votes.digests.insert(rank, digest);
        votes.stop |= stop;
        if rank == 0 && !dir.is_empty() {
            votes.dir = Some(dir);
        }
        (
            votes.ranks.len(),
            votes.dir.clone(),
            votes.digests.clone(),
            votes.stop,
        )
    };
    if voted as u32 != world {
        return;
    }
    let Some(dir) = dir else {
        return;
    };
    let committed_from = state.committed_step();
    // Every step before the checkpoint, reported by every rank: the ledger is complete.
    let complete = (committed_from..step)
        .all(|s| state.steps.get(&s).is_some_and(|r| r.len() as u32 == world));
    if !complete {
        return;
    }
    let first = digests.values().next().cloned().unwrap_or_default();
    if digests.values().any(|d| *d != first) {
        // Ranks that should hold the same weights do not: committing would lock in garbage.
        out.push(Action::Log(Log::Diverged { step, digests }));
        begin_recovery(
            state,
            format!("ranks' weights differ at step {step}"),
            None,
            now,
            out,
        );
        return;
    }
    let mut ledger = Vec::new();
    for s in committed_from..step {
        for (rank, r) in &state.steps[&s] {
            ledger.push(LedgerEntry {
                step: s,
                generation: state.generation.0,
                rank: *rank,
                start: r.samples.0,
                end: r.samples.1,
            });
        }
    }
    let mut committed = Committed {
        step,
        dir: dir.clone(),
        generation: state.generation.0,
        schedule: state
            .committed
            .as_ref()
            .map(|c| c.schedule.clone())
            .unwrap_or_default(),
        guard_base: state
            .committed
            .as_ref()
            .map(|c| c.guard_base.clone())
            .unwrap_or_default(),
        base_perplexity: state
            .committed
            .as_ref()
            .map(|c| c.base_perplexity.clone())
            .unwrap_or_default(),
    };
    for (source, perplexity) in &state.base_evals {
        committed
            .base_perplexity
            .entry(source.clone())
            .or_insert(*perplexity);
    }
    let change = guard_commit(state, &mut committed);
    state.steps = state.steps.split_off(&step);
    state.checkpoints = state.checkpoints.split_off(&(step + 1));
    state.committed = Some(committed.clone());
    state.failed_generations = 0;
    out.push(Action::Commit { committed, ledger });
    out.push(Action::Log(Log::Committed {
        step,
        dir: dir.clone(),
        digest: first,
    }));
    if step >= state.config.total_steps {
        complete_at(state, step, &dir, out);
        return;
    }
    if stop {
        // The ranks checkpointed the step in progress and ended their training, as the
        // operator's stop asked (a coordinator that took over since did not hear the request:
        // the ranks stopped all the same). A mixture change committed with the step holds from
        // it when the job is resumed.
        let reason = state.stopping.take().map_or_else(
            || format!("the ranks stopped at step {step} as a coordinator asked"),
            |s| s.reason,
        );
        stop_now(state, reason, out);
        return;
    }
    if let Some(change) = change {
        out.push(Action::Log(Log::MixtureChanged {
            step,
            weights: change.weights,
            replay_share: state.guard.as_ref().map_or(0.0, |g| g.replay_share),
        }));
        // Every rank must draw the new order from this step: re-form on the commit (the steps
        // trained past it under the old mixture are not committed, and are trained again).
        start_reformation(
            state,
            format!("the forgetting guard changed the mixture from the committed step {step}"),
            None,
            now,
            out,
            true,
        );
        state.failed_generations = 0;
        return;
    }
    // Standbys waiting and room for them: bring them in now, when no work is lost.
    let standby = state
        .members
        .iter()
        .filter(|(w, m)| m.rank.is_none() && !state.benched.contains(*w))
        .count();
    let room = state
        .config
        .max_workers
        .is_none_or(|m| state.ranks.len() < m)
        && (state.ranks.len() as u64) < state.config.global_batch;
    if standby > 0 && room {
        start_reformation(
            state,
            format!("{standby} standby worker(s) join at the committed step {step}"),
            None,
            now,
            out,
            true,
        );
        // Growing is not a failure.
        state.failed_generations = 0;
    }
}

/// Members on the bench (`JobState::benched`).
fn benched(state: &JobState) -> usize {
    state
        .members
        .keys()
        .filter(|w| state.benched.contains(*w))
        .count()
}

/// Names a stalled step once, and aborts the generation when the stall outlasts its timeout:
/// the re-formation leaves the culprit out (`stall`).
fn check_stall(state: &mut JobState, now: Instant, out: &mut Vec<Action>) {
    let verdict = state
        .stall
        .check(&state.config.stall, state.generation, &state.ranks, now);
    match verdict {
        None => {}
        Some(stall::Verdict::Named(stall)) => out.push(Action::Log(Log::Stall(stall))),
        Some(stall::Verdict::Abort(stall)) => {
            let waited = now.saturating_duration_since(stall.since);
            let reason = format!(
                "step {} stalled for {}: {}",
                stall.step,
                fmt_duration(waited),
                stall.culprit
            );
            if let Some(worker) = stall.culprit.benched() {
                state.benched.insert(worker.clone());
            }
            out.push(Action::Log(Log::Stall(stall)));
            begin_recovery(state, reason, None, now, out);
        }
    }
}

/// A rank's collective failed while a named stall was open: its culprit is benched and the
/// stall recorded as aborted.
fn bench_stalled(state: &mut JobState, out: &mut Vec<Action>) {
    if let Some(stall) = state.stall.abort_open() {
        if let Some(worker) = stall.culprit.benched() {
            state.benched.insert(worker.clone());
        }
        out.push(Action::Log(Log::Stall(stall)));
    }
}

/// The job completes at the committed checkpoint of `step` in `dir`: logged, and every member
/// told to leave.
fn complete_at(state: &mut JobState, step: u64, dir: &str, out: &mut Vec<Action>) {
    state.phase = Phase::Completed;
    out.push(Action::Log(Log::Completed {
        step,
        dir: dir.to_string(),
    }));
    for (w, m) in &state.members {
        out.push(Action::Finish {
            worker: w.clone(),
            conn: m.conn,
            step,
            dir: dir.to_string(),
        });
    }
}

/// Takes rank 0's evaluation to the forgetting guard; a trip is logged, and a `stop` ends the
/// job at the committed checkpoint (every rank aborted, then told to leave).
fn guard_reading(
    state: &mut JobState,
    step: u64,
    source: &str,
    perplexity: f64,
    out: &mut Vec<Action>,
) {
    let committed = state.committed.as_ref().map(|c| c.step);
    let Some(guard) = state.guard.as_mut() else {
        return;
    };
    let (verdict, trip) = guard.observe(step, source, perplexity, committed);
    let Some(trip) = trip else {
        return;
    };
    out.push(Action::Log(Log::GuardTripped(trip.clone())));
    if verdict != Verdict::Stop {
        return;
    }
    let reason = format!(
        "the forgetting guard stopped the job: {} perplexity {:.4} at step {} is {:+.1}% over its base {:.4} (bound {:+.1}%)",
        trip.source,
        trip.perplexity,
        trip.step,
        trip.rise * 100.0,
        trip.base,
        trip.max_rise * 100.0
    );
    out.push(Action::Log(Log::Stopping {
        reason: reason.clone(),
    }));
    match state.committed.clone() {
        Some(done) => {
            abort_ranks(state, &reason, None, out);
            complete_at(state, done.step, &done.dir, out)
        }
        // No checkpoint within bounds to end at: the job failed (it was reported as stopped,
        // exit 130 as for a Ctrl-C, with nothing to resume from but another trip; an audit).
        // A retry cannot help: it trains into the same trip.
        None => {
            state.failed_fatally = true;
            fail(
                state,
                format!("{reason}, before any checkpoint was committed"),
                None,
                out,
            )
        }
    }
}

/// At a commit: the guard's bases and a pending rebalance go into `committed`; returns the
/// mixture change, if one was recorded.
fn guard_commit(state: &mut JobState, committed: &mut Committed) -> Option<MixtureChange> {
    let guard = state.guard.as_mut()?;
    committed.guard_base.extend(guard.bases());
    // A change takes effect at a step that is still to be trained: never at the job's end.
    let change = (committed.step < state.config.total_steps)
        .then(|| guard.take_change(committed.step))
        .flatten();
    if let Some(change) = &change {
        committed.schedule.push(change.clone());
        guard.committed_schedule(&committed.schedule);
    }
    change
}

pub fn fmt_duration(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
