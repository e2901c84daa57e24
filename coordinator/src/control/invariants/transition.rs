//! The checks of one decision: the state before, the event, the state after and the actions.

use dapt_corpus::rank_slice;

use super::super::{Action, Event, JobState, Phase};
use super::{check_ledger_range, describe, ensure, Invariant, Violation};

/// Whether `event` is a report that names a generation other than `state`'s, or comes from a
/// session that is not the member's: one that must change nothing.
fn is_stale(state: &JobState, event: &Event) -> bool {
    let (conn, worker, generation) = match event {
        Event::Step {
            conn,
            worker,
            generation,
            ..
        }
        | Event::Checkpoint {
            conn,
            worker,
            generation,
            ..
        }
        | Event::Eval {
            conn,
            worker,
            generation,
            ..
        }
        | Event::Failed {
            conn,
            worker,
            generation,
            ..
        } => (*conn, worker, *generation),
        _ => return false,
    };
    generation != state.generation || !state.is_member(worker, conn)
}

/// Checks one decision: `next` and `actions` are what `decide(prev, event, _)` returned.
pub fn check_transition(
    prev: &JobState,
    event: &Event,
    next: &JobState,
    actions: &[Action],
) -> Result<(), Violation> {
    next.check_invariants()?;
    let c = &next.config;
    let over = prev.phase.is_over();
    if over {
        let acts = actions.iter().find(|a| {
            matches!(
                a,
                Action::Assign { .. }
                    | Action::Commit { .. }
                    | Action::Abort { .. }
                    | Action::Finish { .. }
                    | Action::RecordGeneration(_)
            )
        });
        ensure(
            next.phase == prev.phase && acts.is_none(),
            Invariant::OverIsFinal,
            || {
                format!(
                    "{} job went {} with {acts:?}",
                    prev.phase.name(),
                    next.phase.name()
                )
            },
        )?;
    }
    ensure(
        next.phase != Phase::Reattaching || prev.phase == Phase::Reattaching,
        Invariant::ReattachingOnlyAfterTakeOver,
        || format!("{} -> re-attaching", prev.phase.name()),
    )?;

    // Generations.
    let records: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::RecordGeneration(r) => Some(r),
            _ => None,
        })
        .collect();
    let grew = next.generation.0 - prev.generation.0.min(next.generation.0);
    ensure(
        next.generation >= prev.generation
            && grew <= 1
            && records.len() as u64 == grew
            && records.iter().all(|r| {
                r.generation == next.generation.0
                    && r.ranks.iter().eq(next.ranks.iter().map(|w| &w.0))
                    && r.peers.len() == next.ranks.len()
                    && r.resume_step == next.committed_step()
            }),
        Invariant::GenerationGrows,
        || {
            format!(
                "generation {} -> {} recording {records:?}",
                prev.generation, next.generation
            )
        },
    )?;
    // A coordinator that loses its leadership while carrying out the actions must not have told
    // workers of a generation etcd does not know: the next leader would form it again.
    let recorded_at = actions
        .iter()
        .position(|a| matches!(a, Action::RecordGeneration(_)));
    let first_assign = actions
        .iter()
        .position(|a| matches!(a, Action::Assign { .. }));
    ensure(
        first_assign.is_none_or(|assign| recorded_at.is_some_and(|record| record < assign)),
        Invariant::GenerationRecordedBeforeAssigned,
        || format!("record at action {recorded_at:?}, first assignment at {first_assign:?}"),
    )?;

    // Commits.
    let commits: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Commit { committed, ledger } => Some((committed, ledger)),
            _ => None,
        })
        .collect();
    let (from, to) = (prev.committed_step(), next.committed_step());
    let changed = prev.committed != next.committed;
    let fallbacks: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::FallBack { committed } => Some(committed),
            _ => None,
        })
        .collect();
    // The one way back: a fallback from a corrupt checkpoint to an earlier one, recorded.
    let fell_back = matches!(event, Event::FellBack { .. })
        && to < from
        && commits.is_empty()
        && fallbacks.len() == 1
        && Some(fallbacks[0]) == next.committed.as_ref();
    ensure(
        fallbacks.is_empty() || fell_back,
        Invariant::CommittedStepGrows,
        || format!("{fallbacks:?} on {}", describe(event)),
    )?;
    ensure(
        fell_back
            || to >= from
                && commits.len() == usize::from(changed)
                && commits
                    .iter()
                    .all(|(cm, _)| Some(*cm) == next.committed.as_ref() && cm.step > from),
        Invariant::CommittedStepGrows,
        || {
            format!(
                "committed {:?} -> {:?} with {} commits",
                prev.committed,
                next.committed,
                commits.len()
            )
        },
    )?;
    if let Some((committed, ledger)) = commits.first() {
        let vouched = match event {
            Event::Checkpoint {
                conn,
                worker,
                generation,
                step,
                digest,
                ..
            } if *step == committed.step
                && *generation == prev.generation
                && prev.is_member(worker, *conn)
                && committed.generation == prev.generation.0 =>
            {
                let rank = prev.members.get(worker).and_then(|m| m.rank);
                let mut digests = prev
                    .checkpoints
                    .get(step)
                    .map(|v| v.digests.clone())
                    .unwrap_or_default();
                if let Some(rank) = rank {
                    digests.insert(rank, digest.clone());
                }
                digests.keys().copied().eq(0..prev.ranks.len() as u32)
                    && digests.values().all(|d| d == digest)
            }
            _ => false,
        };
        ensure(vouched, Invariant::CommitHasEveryDigest, || {
            format!("committed {committed:?} on {}", describe(event))
        })?;
        check_ledger_range(
            ledger,
            from,
            committed.step,
            c.global_batch,
            prev.ranks.len(),
        )?;
        ensure(
            ledger.iter().all(|e| e.generation == committed.generation),
            Invariant::LedgerExactlyOnce,
            || {
                format!(
                    "entries of another generation than {}",
                    committed.generation
                )
            },
        )?;
    }

    // Assignments.
    let assigned: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Assign {
                worker,
                conn,
                assignment,
            } => Some((worker, *conn, assignment)),
            _ => None,
        })
        .collect();
    if !assigned.is_empty() {
        let world = next.ranks.len();
        let limit = c
            .max_workers
            .unwrap_or(usize::MAX)
            .min(c.global_batch as usize)
            .min(c.min_workers);
        let mut covered = 0;
        let one_generation = grew == 1
            && !next.phase.is_over()
            && assigned.len() == world
            && world >= limit.max(1)
            && assigned.iter().enumerate().all(|(i, (worker, conn, a))| {
                let share = rank_slice(0, c.global_batch, a.rank, a.world);
                let share = share.end - share.start;
                covered += share;
                let passes = u64::from(a.micro_batch) * u64::from(a.accumulation);
                a.rank == i as u32
                    && a.world == world as u32
                    && a.generation == next.generation
                    && next.ranks.get(i) == Some(*worker)
                    && next.is_member(worker, *conn)
                    && a.peers.len() == world
                    && a.total_steps == c.total_steps
                    && passes >= share
                    && passes < share + u64::from(a.micro_batch)
            })
            && covered == c.global_batch;
        ensure(
            one_generation,
            Invariant::AssignmentsFormOneGeneration,
            || format!("{assigned:?} for ranks {:?}", next.ranks),
        )?;
        let dir = next.committed.as_ref().map(|cm| cm.dir.clone());
        ensure(
            assigned
                .iter()
                .all(|(_, _, a)| a.resume_step == next.committed_step() && a.checkpoint == dir),
            Invariant::AssignedCheckpointCommitted,
            || format!("{assigned:?}, committed {:?}", next.committed),
        )?;
    }

    // Stale reports.
    if is_stale(prev, event) {
        ensure(
            next.steps == prev.steps
                && next.checkpoints == prev.checkpoints
                && next.committed == prev.committed
                && next.phase == prev.phase
                && next.generation == prev.generation,
            Invariant::StaleReportsChangeNothing,
            || {
                format!(
                    "{} moved the job to {} in generation {}",
                    describe(event),
                    next.phase.name(),
                    next.generation
                )
            },
        )?;
    }

    // Orders and their sessions.
    for action in actions {
        let ok = match action {
            Action::Abort {
                worker,
                conn,
                generation,
                ..
            } => {
                *generation == prev.generation
                    && (prev.is_member(worker, *conn) || next.is_member(worker, *conn))
            }
            Action::Drop { worker, conn } => {
                prev.is_member(worker, *conn) && !next.members.contains_key(worker)
            }
            Action::Finish {
                worker,
                conn,
                step,
                dir,
            } => {
                let finished = next.phase == Phase::Completed
                    && next
                        .committed
                        .as_ref()
                        .is_some_and(|cm| cm.step == *step && cm.dir == *dir);
                ensure(finished, Invariant::FinishOnlyWhenCompleted, || {
                    format!("{action:?} in phase {}", next.phase.name())
                })?;
                next.is_member(worker, *conn)
            }
            Action::Refuse { worker, conn, .. } => prev.is_member(worker, *conn),
            _ => true,
        };
        ensure(ok, Invariant::OrdersReachTheirSession, || {
            format!("{action:?}")
        })?;
    }
    Ok(())
}
