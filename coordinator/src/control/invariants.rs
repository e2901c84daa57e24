//! What must hold of the job's state after every [`decide`], whatever the order of events:
//! [`JobState::check_invariants`] looks at one state, [`check_transition`] at one decision (the
//! state before, the event, the state after and the actions), and [`check_ledger`] at the
//! ledger as a whole. Each [`Violation`] names the [`Invariant`] it breaks.
//!
//! The unit and property tests call them after every decision and panic on a violation. The
//! coordinator calls them through [`decide_checked`] in debug builds and logs a violation as an
//! error instead of panicking: a running job whose bookkeeping looks wrong is still better
//! served by going on (its workers keep training, the operator sees the error) than by a
//! coordinator that dies and leaves every worker waiting for the next one. Release builds skip
//! the checks (they clone the state on every event).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Instant;

use dapt_corpus::rank_slice;

use super::{decide, Action, Event, JobState, LedgerEntry, Phase};

mod transition;
pub use transition::check_transition;

/// One rule of the control loop. [`Invariant::statement`] says what must always hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    RankedMembersMatch,
    RanksDistinct,
    RunningRanksAreMembers,
    WorldWithinLimits,
    FormingHasNoRanks,
    RecoveringAwaitsSurvivors,
    ReattachingHasDeadline,
    CommittedWithinTotal,
    CompletedAtTotal,
    FailedOnlyAfterRepeatedFailures,
    PendingReportsPastCommit,
    GenerationGrows,
    GenerationRecordedBeforeAssigned,
    CommittedStepGrows,
    CommitHasEveryDigest,
    LedgerExactlyOnce,
    AssignmentsFormOneGeneration,
    AssignedCheckpointCommitted,
    OverIsFinal,
    StaleReportsChangeNothing,
    OrdersReachTheirSession,
    FinishOnlyWhenCompleted,
    ReattachingOnlyAfterTakeOver,
}

impl Invariant {
    pub fn name(self) -> &'static str {
        match self {
            Invariant::RankedMembersMatch => "ranked-members-match",
            Invariant::RanksDistinct => "ranks-distinct",
            Invariant::RunningRanksAreMembers => "running-ranks-are-members",
            Invariant::WorldWithinLimits => "world-within-limits",
            Invariant::FormingHasNoRanks => "forming-has-no-ranks",
            Invariant::RecoveringAwaitsSurvivors => "recovering-awaits-survivors",
            Invariant::ReattachingHasDeadline => "reattaching-has-deadline",
            Invariant::CommittedWithinTotal => "committed-within-total",
            Invariant::CompletedAtTotal => "completed-at-total",
            Invariant::FailedOnlyAfterRepeatedFailures => "failed-only-after-repeated-failures",
            Invariant::PendingReportsPastCommit => "pending-reports-past-commit",
            Invariant::GenerationGrows => "generation-grows",
            Invariant::GenerationRecordedBeforeAssigned => "generation-recorded-before-assigned",
            Invariant::CommittedStepGrows => "committed-step-grows",
            Invariant::CommitHasEveryDigest => "commit-has-every-digest",
            Invariant::LedgerExactlyOnce => "ledger-exactly-once",
            Invariant::AssignmentsFormOneGeneration => "assignments-form-one-generation",
            Invariant::AssignedCheckpointCommitted => "assigned-checkpoint-committed",
            Invariant::OverIsFinal => "over-is-final",
            Invariant::StaleReportsChangeNothing => "stale-reports-change-nothing",
            Invariant::OrdersReachTheirSession => "orders-reach-their-session",
            Invariant::FinishOnlyWhenCompleted => "finish-only-when-completed",
            Invariant::ReattachingOnlyAfterTakeOver => "reattaching-only-after-take-over",
        }
    }

    /// What must always hold.
    pub fn statement(self) -> &'static str {
        match self {
            Invariant::RankedMembersMatch => {
                "a member holding rank r is the worker the current generation lists at r"
            }
            Invariant::RanksDistinct => "no worker holds two ranks of one generation",
            Invariant::RunningRanksAreMembers => {
                "while running, every rank 0..world of the current generation is a member holding that rank"
            }
            Invariant::WorldWithinLimits => {
                "a generation has at most max_workers ranks and no more ranks than samples in a step"
            }
            Invariant::FormingHasNoRanks => "while forming, no generation runs and no member holds a rank",
            Invariant::RecoveringAwaitsSurvivors => {
                "while recovering, the current generation is being aborted and its surviving ranks are awaited"
            }
            Invariant::ReattachingHasDeadline => "ranks re-attaching to a new coordinator have a deadline",
            Invariant::CommittedWithinTotal => {
                "the committed step never passes the total, nor its generation the current one"
            }
            Invariant::CompletedAtTotal => "a completed job committed its last step",
            Invariant::FailedOnlyAfterRepeatedFailures => {
                "the job fails only after more than max_failed_generations generations failed in a row, or at once on a failure a retry would meet again (fatal)"
            }
            Invariant::PendingReportsPastCommit => {
                "uncommitted reports are of steps after the commit and within the total, from ranks of the generation, with their rank's samples"
            }
            Invariant::GenerationGrows => {
                "the generation only grows, by one per formation, and every formation is recorded"
            }
            Invariant::GenerationRecordedBeforeAssigned => {
                "a generation is recorded in the durable store before any rank is assigned to it"
            }
            Invariant::CommittedStepGrows => {
                "the committed step only grows, once per Commit, and every step is committed at most once"
            }
            Invariant::CommitHasEveryDigest => {
                "a step is committed only on a checkpoint of the current generation vouched for by every rank with one digest"
            }
            Invariant::LedgerExactlyOnce => {
                "the ledger covers [0, committed_step * global_batch) with every sample exactly once"
            }
            Invariant::AssignmentsFormOneGeneration => {
                "a formation assigns ranks 0..world without gaps, one per worker of the new generation, with the whole global batch"
            }
            Invariant::AssignedCheckpointCommitted => {
                "an assignment resumes from the committed step and names only the committed checkpoint"
            }
            Invariant::OverIsFinal => {
                "a finished job stays finished and emits no further assignment, commit or abort"
            }
            Invariant::StaleReportsChangeNothing => {
                "a report of another generation or from an old session changes nothing"
            }
            Invariant::OrdersReachTheirSession => {
                "orders go to the session the worker joined on, aborts for the generation being torn down"
            }
            Invariant::FinishOnlyWhenCompleted => "workers are told to finish only with the final commit",
            Invariant::ReattachingOnlyAfterTakeOver => "only a coordinator that took over re-attaches ranks",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A broken [`Invariant`], with the figures that break it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant {invariant} violated: {detail} (must hold: {})", invariant.statement())]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

fn ensure(
    holds: bool,
    invariant: Invariant,
    detail: impl FnOnce() -> String,
) -> Result<(), Violation> {
    if holds {
        Ok(())
    } else {
        Err(Violation {
            invariant,
            detail: detail(),
        })
    }
}

impl JobState {
    /// Checks what must hold of any state `decide` returns; the first violation found.
    pub fn check_invariants(&self) -> Result<(), Violation> {
        let c = &self.config;
        let world = self.ranks.len();
        for (worker, member) in &self.members {
            if let Some(rank) = member.rank {
                ensure(
                    self.ranks.get(rank as usize) == Some(worker),
                    Invariant::RankedMembersMatch,
                    || {
                        format!(
                            "{worker} holds rank {rank}, the generation lists {:?}",
                            self.ranks
                        )
                    },
                )?;
            }
        }
        let distinct: BTreeSet<_> = self.ranks.iter().collect();
        ensure(distinct.len() == world, Invariant::RanksDistinct, || {
            format!("ranks {:?}", self.ranks)
        })?;
        ensure(
            c.max_workers.is_none_or(|m| world <= m) && world as u64 <= c.global_batch,
            Invariant::WorldWithinLimits,
            || {
                format!(
                    "{world} ranks, max_workers {:?}, global batch {}",
                    c.max_workers, c.global_batch
                )
            },
        )?;
        match &self.phase {
            Phase::Running => {
                ensure(world > 0, Invariant::RunningRanksAreMembers, || {
                    "no ranks".into()
                })?;
                for (rank, worker) in self.ranks.iter().enumerate() {
                    let held = self.members.get(worker).and_then(|m| m.rank);
                    ensure(
                        held == Some(rank as u32),
                        Invariant::RunningRanksAreMembers,
                        || format!("rank {rank} is {worker}, who holds {held:?}"),
                    )?;
                }
            }
            Phase::Forming => {
                ensure(
                    self.ranks.is_empty() && self.members.values().all(|m| m.rank.is_none()),
                    Invariant::FormingHasNoRanks,
                    || format!("ranks {:?}", self.ranks),
                )?;
            }
            Phase::Recovering => {
                let r = self.recovery.as_ref();
                ensure(
                    r.is_some_and(|r| {
                        r.generation == self.generation
                            && r.aborted.is_none()
                            && !r.awaiting.is_empty()
                            && r.awaiting
                                .iter()
                                .all(|w| self.ranks.contains(w) && self.members.contains_key(w))
                    }),
                    Invariant::RecoveringAwaitsSurvivors,
                    || format!("recovery {r:?} in generation {}", self.generation),
                )?;
            }
            Phase::Reattaching => {
                ensure(
                    self.reattach_deadline.is_some(),
                    Invariant::ReattachingHasDeadline,
                    || "no deadline".into(),
                )?;
            }
            Phase::Completed | Phase::Stopped(_) => {}
            Phase::Failed(reason) => {
                ensure(
                    self.failed_generations > c.max_failed_generations || self.failed_fatally,
                    Invariant::FailedOnlyAfterRepeatedFailures,
                    || {
                        format!(
                            "failed after {} failed generations: {reason}",
                            self.failed_generations
                        )
                    },
                )?;
            }
        }
        if !self.phase.is_over() {
            ensure(
                self.failed_generations <= c.max_failed_generations + 1,
                Invariant::FailedOnlyAfterRepeatedFailures,
                || {
                    format!(
                        "{} failed generations and still {}",
                        self.failed_generations,
                        self.phase.name()
                    )
                },
            )?;
        }
        let committed = self.committed_step();
        if let Some(cm) = &self.committed {
            ensure(
                cm.step <= c.total_steps && cm.generation <= self.generation.0,
                Invariant::CommittedWithinTotal,
                || {
                    format!(
                        "committed {cm:?}, total {}, generation {}",
                        c.total_steps, self.generation
                    )
                },
            )?;
        }
        // The forgetting guard's `stop` completes the job early, at its committed step.
        let guard_stopped = self.guard.as_ref().is_some_and(|g| g.stopped_at.is_some());
        if self.phase == Phase::Completed {
            ensure(
                committed >= c.total_steps || guard_stopped,
                Invariant::CompletedAtTotal,
                || {
                    format!(
                        "completed at committed step {committed} of {}",
                        c.total_steps
                    )
                },
            )?;
        }
        for (step, reports) in &self.steps {
            ensure(
                (committed..c.total_steps).contains(step),
                Invariant::PendingReportsPastCommit,
                || {
                    format!(
                        "step {step} pending, committed {committed}, total {}",
                        c.total_steps
                    )
                },
            )?;
            for (rank, info) in reports {
                let expected = (*rank < world as u32)
                    .then(|| rank_slice(*step, c.global_batch, *rank, world as u32));
                ensure(
                    info.step == *step
                        && info.rank == *rank
                        && expected.is_some_and(|e| (e.start, e.end) == info.samples),
                    Invariant::PendingReportsPastCommit,
                    || format!("step {step} rank {rank} of world {world}: {info:?}"),
                )?;
            }
        }
        for (step, votes) in &self.checkpoints {
            ensure(
                *step > committed
                    && *step <= c.total_steps
                    && votes.ranks.iter().all(|r| (*r as usize) < world)
                    && votes.digests.keys().eq(votes.ranks.iter()),
                Invariant::PendingReportsPastCommit,
                || {
                    format!("checkpoint {step} votes {votes:?}, committed {committed}, total {}, world {world}", c.total_steps)
                },
            )?;
        }
        Ok(())
    }
}

/// Checks that `entries` hold the samples of steps `from..to` exactly once, from ranks of a
/// world of `world`.
fn check_ledger_range(
    entries: &[LedgerEntry],
    from: u64,
    to: u64,
    global_batch: u64,
    world: usize,
) -> Result<(), Violation> {
    let mut spans: Vec<(u64, u64)> = entries.iter().map(|e| (e.start, e.end)).collect();
    spans.sort_unstable();
    let mut at = from * global_batch;
    for &(start, end) in &spans {
        ensure(
            start == at && end > start,
            Invariant::LedgerExactlyOnce,
            || format!("samples [{start}, {end}) where [{at}, ..) was expected"),
        )?;
        at = end;
    }
    ensure(
        at == to * global_batch,
        Invariant::LedgerExactlyOnce,
        || {
            format!(
                "steps {from}..{to} cover samples up to {at}, not {}",
                to * global_batch
            )
        },
    )?;
    let misplaced = entries.iter().find(|e| {
        !(from..to).contains(&e.step)
            || e.start < e.step * global_batch
            || e.end > (e.step + 1) * global_batch
            || e.rank as usize >= world.max(1)
    });
    ensure(misplaced.is_none(), Invariant::LedgerExactlyOnce, || {
        format!("{misplaced:?} for steps {from}..{to} of world {world}")
    })
}

/// Checks a whole ledger: it covers `[0, committed_step * global_batch)` exactly once, and each
/// entry lies within its step.
pub fn check_ledger(
    entries: &[LedgerEntry],
    committed_step: u64,
    global_batch: u64,
) -> Result<(), Violation> {
    check_ledger_range(entries, 0, committed_step, global_batch, usize::MAX)
}

/// The event in a few words for a violation's message: who sent what, for which generation,
/// without the join's token.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Join { conn, request } => format!(
            "join of {} on session {conn}{}",
            request.worker,
            request
                .attach
                .map(|(g, r)| format!(" re-attaching as rank {r} of generation {g}"))
                .unwrap_or_default()
        ),
        Event::Expired { worker } => format!("lease of {worker} expired"),
        Event::Disconnected { conn, worker } => format!("session {conn} of {worker} ended"),
        Event::Heartbeat { conn, worker } => format!("heartbeat of {worker} on session {conn}"),
        Event::Progress {
            conn,
            worker,
            report,
        } => format!(
            "progress of {worker} on session {conn}: generation {}, step {}, {}",
            report.generation,
            report.step,
            report.phase.name()
        ),
        Event::Step {
            conn,
            worker,
            generation,
            info,
        } => format!(
            "step {} report of {worker} (rank {}, samples {:?}) for generation {generation} on session {conn}",
            info.step, info.rank, info.samples
        ),
        Event::Checkpoint {
            conn,
            worker,
            generation,
            step,
            rank,
            digest,
            ..
        } => format!(
            "checkpoint {step} report of {worker} (rank {rank}, digest {digest}) for generation {generation} on session {conn}"
        ),
        Event::Aborted {
            conn,
            worker,
            generation,
        } => format!("abort of generation {generation} confirmed by {worker} on session {conn}"),
        Event::Failed {
            conn,
            worker,
            generation,
            ..
        } => format!("failure of {worker} in generation {generation} on session {conn}"),
        Event::Eval {
            conn,
            worker,
            generation,
            step,
            ..
        } => format!("eval at step {step} of {worker} for generation {generation} on session {conn}"),
        Event::Tick => "tick".into(),
        Event::Shutdown { reason } => format!("shutdown ({reason})"),
        Event::Stop { reason } => format!("stop after the step in progress ({reason})"),
        Event::FellBack { earlier } => format!(
            "fallback to the checkpoint of step {} ({})",
            earlier.step, earlier.dir
        ),
    }
}

/// [`decide`], with [`check_transition`] after it in debug builds: a violation is logged as an
/// error naming the invariant and the event (and panics under `cfg(test)`). Release builds
/// call `decide` alone.
pub fn decide_checked(state: JobState, event: Event, now: Instant) -> (JobState, Vec<Action>) {
    if !cfg!(debug_assertions) {
        return decide(state, event, now);
    }
    let prev = state.clone();
    let what = describe(&event);
    let before = event.clone();
    let (next, actions) = decide(state, event, now);
    if let Err(v) = check_transition(&prev, &before, &next, &actions) {
        if cfg!(test) {
            panic!("{v} after {what}");
        }
        tracing::error!(invariant = v.invariant.name(), event = %what, detail = %v.detail, "control invariant violated");
    }
    (next, actions)
}
