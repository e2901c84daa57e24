//! `decide` under random orders of events, with the invariants checked after every decision.
//!
//! A small world of simulated workers that behave like `dapt-worker`'s agent: they join, train
//! the steps of their assignment (a report per step, a checkpoint report with the weights'
//! digest every `every` steps), confirm aborts, rejoin (embedded membership) or re-attach and
//! replay their reports (etcd) when their session ends. Their messages travel in one queue per
//! worker (a session keeps its order; sessions interleave freely). A random sequence of
//! [`Op`]s interleaves their work with faults: kills, restarts, hangs (SIGSTOP) and resumes,
//! broken sessions, failures, diverging weights, stale and malformed reports, expired leases,
//! lost commits, a coordinator that loses its leadership (or restarts; or is deposed while it
//! records a new generation), shutdowns, and ticks at random times. After the faults, every
//! worker is brought back and behaves: the job must then complete (liveness), unless it was
//! shut down or failed too often. The simulation is in [`world`].
//!
//! Each run prints its seed; `DAPT_PROPTEST_SEED=<seed>` replays it, and
//! `DAPT_PROPTEST_CASES=<n>` runs more cases than CI's default. Failing cases are also kept in
//! `coordinator/proptest-regressions/` and replayed first.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};

use super::*;

mod world;
use world::World;

/// Cases per property in CI: a few seconds on two slow cores.
const CI_CASES: u32 = 2_000;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const SESSION_TIMEOUT_MS: u64 = 5_000;
const LEASE_TTL_MS: u64 = 3_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    Embedded,
    Etcd,
}

/// The job and the cluster a sequence runs against.
#[derive(Debug, Clone)]
pub(super) struct Setup {
    pub membership: Membership,
    /// Worker processes: `a`, `b`, ... in that order.
    pub workers: usize,
    pub min_workers: usize,
    pub max_workers: Option<usize>,
    pub global_batch: u64,
    pub total_steps: u64,
    /// Checkpoint every this many steps (and at the last).
    pub every: u64,
    pub max_failed_generations: u32,
    /// A step committed by an earlier run of the job (a relaunch).
    pub resumed: Option<u64>,
}

/// One thing that happens. Worker indices wrap around the setup's worker count.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// The oldest message in flight from the worker reaches the coordinator.
    Deliver(usize),
    /// The worker trains its next step (and reports it, and its checkpoint when due).
    Train(usize),
    Heartbeat(usize),
    /// Time passes (milliseconds), then the coordinator's timer ticks.
    Tick(u64),
    /// etcd: the committer records the commits queued so far; workers hear of them.
    Durable,
    /// The worker's process dies (SIGKILL).
    Kill(usize),
    /// A dead worker's process starts again.
    Restart(usize),
    /// The worker stops (SIGSTOP): it sends nothing and reads nothing until resumed.
    Hang(usize),
    Resume(usize),
    /// The worker's session breaks (network); the worker joins again at once.
    Blip(usize),
    /// The worker's training fails.
    Fail(usize),
    /// The worker's next checkpoint has other weights.
    Diverge(usize),
    /// The worker sends its last report again (now stale, or a duplicate), or a malformed one.
    Resend(usize, bool),
    /// etcd: the worker's membership lease expires (its session may well be fine).
    Expire(usize),
    /// etcd: the coordinator loses its leadership and another takes over; embedded: the
    /// coordinator restarts. Commits not yet durable are lost.
    TakeOver,
    /// etcd: the coordinator loses its leadership when it next records a generation, between
    /// the decision and its last action.
    Depose,
    Shutdown,
    /// The operator's stop after the step in progress (Ctrl-C on `dapt launch`).
    Stop,
}

fn worker_op(max: usize) -> impl Strategy<Value = usize> {
    0..max
}

fn op() -> impl Strategy<Value = Op> {
    let w = || worker_op(NAMES.len());
    prop_oneof![
        30 => w().prop_map(Op::Deliver),
        20 => w().prop_map(Op::Train),
        8 => w().prop_map(Op::Heartbeat),
        8 => (0u64..12_000).prop_map(Op::Tick),
        4 => Just(Op::Durable),
        2 => w().prop_map(Op::Kill),
        2 => w().prop_map(Op::Restart),
        1 => w().prop_map(Op::Hang),
        1 => w().prop_map(Op::Resume),
        2 => w().prop_map(Op::Blip),
        1 => w().prop_map(Op::Fail),
        1 => w().prop_map(Op::Diverge),
        2 => (w(), any::<bool>()).prop_map(|(w, bad)| Op::Resend(w, bad)),
        1 => w().prop_map(Op::Expire),
        1 => Just(Op::TakeOver),
        1 => Just(Op::Depose),
        // Rarer than the rest: a shut-down job has no liveness left to check.
        1 => (0usize..8).prop_map(|r| if r == 0 { Op::Shutdown } else { Op::Heartbeat(r) }),
        1 => (0usize..8).prop_map(|r| if r == 0 { Op::Stop } else { Op::Heartbeat(r) }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(Membership::Embedded), Just(Membership::Etcd)],
        1usize..=4,
        1usize..=3,
        prop::option::of(0usize..=2),
        1u64..=5,
        1u64..=7,
        1u64..=3,
        prop_oneof![Just(0u32), Just(2), Just(50), Just(50)],
        prop::option::of(0u64..=7),
    )
        .prop_map(
            |(
                membership,
                workers,
                min,
                extra,
                global_batch,
                total_steps,
                every,
                max_failed,
                resumed,
            )| {
                let min_workers = min.min(workers);
                Setup {
                    membership,
                    workers,
                    min_workers,
                    max_workers: extra.map(|e| min_workers + e),
                    global_batch,
                    total_steps,
                    every,
                    max_failed_generations: max_failed,
                    resumed: resumed.map(|s| s.min(total_steps)),
                }
            },
        )
}

/// The seed of this run: `DAPT_PROPTEST_SEED`, or a fresh one, printed for a replay. Runs
/// `DAPT_PROPTEST_CASES` (or CI's number of) cases, divided by `share`.
fn runner(test: &str, share: u32) -> TestRunner {
    let seed = std::env::var("DAPT_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let cases = std::env::var("DAPT_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(CI_CASES)
        .div_ceil(share);
    eprintln!("{test}: {cases} cases, seed {seed} (replay: DAPT_PROPTEST_SEED={seed})");
    TestRunner::new(ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::SourceParallel("proptest-regressions"),
        )),
        source_file: Some(file!()),
        ..ProptestConfig::default()
    })
}

/// Runs `ops` against `setup`, then lets the world settle: the invariants after every
/// decision, and the job's end.
pub(super) fn run(setup: &Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let ended = match run_in(World::new(setup.clone()), ops)? {
        Phase::Completed => &ENDS[0],
        Phase::Failed(_) => &ENDS[1],
        _ => &ENDS[2],
    };
    ended.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Runs `ops` in `world`, then lets it settle; the phase the job ended in.
fn run_in(mut world: World, ops: &[Op]) -> Result<Phase, TestCaseError> {
    for op in ops {
        world.apply(op)?;
    }
    world.settle()?;
    world.check_files()?;
    Ok(world.state().phase.clone())
}

/// How the cases ended: completed, failed (too many failed generations), stopped.
static ENDS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

#[test]
fn invariants_hold_and_the_job_completes_under_random_events() {
    let mut runner = runner(
        "invariants_hold_and_the_job_completes_under_random_events",
        1,
    );
    let strategy = (setup(), prop::collection::vec(op(), 0..80));
    let result = runner.run(&strategy, |(setup, ops)| run(&setup, &ops));
    if let Err(e) = result {
        panic!("{e}");
    }
    let [completed, failed, stopped] = ENDS.each_ref().map(|n| n.load(Ordering::Relaxed));
    eprintln!("cases that ended completed: {completed}, failed: {failed}, stopped: {stopped}");
}

#[test]
fn embedded_runs_keep_an_exact_ledger_on_disk() {
    // The same sequences with embedded membership, through `ledger.rs` in a temporary directory
    // (a tenth of the cases: every commit is written and synced).
    let mut runner = runner("embedded_runs_keep_an_exact_ledger_on_disk", 10);
    let embedded = setup().prop_map(|s| Setup {
        membership: Membership::Embedded,
        ..s
    });
    let strategy = (embedded, prop::collection::vec(op(), 0..80));
    let result = runner.run(&strategy, |(setup, ops)| {
        run_in(World::new(setup).with_files()?, &ops).map(|_| ())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
