//! `decide` driven through joins, losses, late joiners, stale messages and timeouts.

use super::*;

const STEPS: u64 = 8;
const BATCH: u64 = 5;

fn config() -> ControlConfig {
    ControlConfig {
        job: "job".into(),
        version: "0.1.0".into(),
        min_workers: 1,
        max_workers: Some(2),
        session_timeout: Duration::from_secs(5),
        formation_grace: Duration::from_secs(2),
        abort_timeout: Duration::from_secs(10),
        total_steps: STEPS,
        global_batch: BATCH,
        micro_batch: 2,
        max_failed_generations: 3,
        stall: StallConfig::default(),
        eval_every: 0,
        checkpoint_every: 5,
        sources: ["held-out".to_string(), "legal".to_string()].into(),
    }
}

fn id(s: &str) -> WorkerId {
    WorkerId(s.into())
}

fn request(worker: &str) -> JoinRequest {
    JoinRequest {
        job: "job".into(),
        worker: id(worker),
        devices: vec!["cpu".into()],
        version: "0.1.3".into(),
        endpoint: format!("127.0.0.1:{}", 4000 + worker.len()),
        attach: None,
    }
}

/// Drives events through `decide`, keeping the clock and every action.
struct Sim {
    state: Option<JobState>,
    t0: Instant,
    now: Instant,
}

impl Sim {
    fn new(config: ControlConfig) -> Self {
        let now = Instant::now();
        Sim {
            state: Some(JobState::new(config, None)),
            t0: now,
            now,
        }
    }

    fn state(&self) -> &JobState {
        self.state.as_ref().expect("state")
    }

    fn at(&mut self, secs: f64) -> &mut Self {
        self.now = self.t0 + Duration::from_secs_f64(secs);
        self
    }

    fn send(&mut self, event: Event) -> Vec<Action> {
        let (state, actions) = decide_checked(self.state.take().expect("state"), event, self.now);
        self.state = Some(state);
        actions
    }

    fn join(&mut self, conn: ConnId, worker: &str) -> Vec<Action> {
        self.send(Event::Join {
            conn,
            request: request(worker),
        })
    }

    fn conn(&self, worker: &str) -> ConnId {
        self.state().members[&id(worker)].conn
    }

    fn step(&mut self, worker: &str, step: u64) -> Vec<Action> {
        let times = StepTimes::default();
        self.step_timed(worker, step, Duration::from_millis(100), times, None)
    }

    fn step_timed(
        &mut self,
        worker: &str,
        step: u64,
        elapsed: Duration,
        times: StepTimes,
        peak_flops: Option<f64>,
    ) -> Vec<Action> {
        let s = self.state();
        let rank = s.members[&id(worker)].rank.expect("ranked");
        let slice = rank_slice(step, BATCH, rank, s.ranks.len() as u32);
        let generation = s.generation;
        let conn = self.conn(worker);
        self.send(Event::Step {
            conn,
            worker: id(worker),
            generation,
            info: StepInfo {
                step,
                rank,
                samples: (slice.start, slice.end),
                loss: 5.0 - step as f64 * 0.1,
                grad_norm: 1.0,
                lr: 1e-3,
                tokens: BATCH * 16,
                elapsed,
                times,
                peak_flops,
            },
        })
    }

    fn checkpoint(&mut self, worker: &str, step: u64, digest: &str) -> Vec<Action> {
        self.vote(worker, step, digest, false)
    }

    /// A checkpoint report, `stop` as the ranks agreed after an operator's stop.
    fn vote(&mut self, worker: &str, step: u64, digest: &str, stop: bool) -> Vec<Action> {
        let s = self.state();
        let rank = s.members[&id(worker)].rank.expect("ranked");
        let generation = s.generation;
        let conn = self.conn(worker);
        self.send(Event::Checkpoint {
            conn,
            worker: id(worker),
            generation,
            step,
            rank,
            dir: if rank == 0 {
                format!("/ckpt/step-{step:08}")
            } else {
                String::new()
            },
            digest: digest.into(),
            stop,
        })
    }

    /// Every member says it is alive.
    fn heartbeats(&mut self) {
        let members: Vec<(WorkerId, ConnId)> = self
            .state()
            .members
            .iter()
            .map(|(w, m)| (w.clone(), m.conn))
            .collect();
        for (worker, conn) in members {
            self.send(Event::Heartbeat { conn, worker });
        }
    }

    /// Every rank reports steps `from..to`, then the checkpoint at `to`.
    fn train(&mut self, from: u64, to: u64) -> Vec<Action> {
        let ranks = self.state().ranks.clone();
        let mut all = Vec::new();
        for s in from..to {
            for w in &ranks {
                all.extend(self.step(&w.0, s));
            }
        }
        for w in &ranks {
            all.extend(self.checkpoint(&w.0, to, "abc"));
        }
        all
    }
}

fn assignments(actions: &[Action]) -> Vec<(WorkerId, Assignment)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Assign {
                worker, assignment, ..
            } => Some((worker.clone(), assignment.clone())),
            _ => None,
        })
        .collect()
}

fn refusal(actions: &[Action]) -> Option<ErrorCode> {
    actions.iter().find_map(|a| match a {
        Action::RefuseJoin { refusal, .. } | Action::Refuse { refusal, .. } => Some(refusal.code),
        _ => None,
    })
}

fn recovery_phases(actions: &[Action]) -> Vec<RecoveryPhase> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(Log::Recovery { phase, .. }) => Some(*phase),
            _ => None,
        })
        .collect()
}

fn aborts(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Abort { worker, .. } => Some(worker.clone()),
            _ => None,
        })
        .collect()
}

/// Two workers, formed into generation 1.
fn formed() -> Sim {
    let mut sim = Sim::new(config());
    sim.join(1, "a");
    let actions = sim.join(2, "b");
    assert_eq!(assignments(&actions).len(), 2, "{actions:?}");
    sim
}

#[test]
fn forms_when_full_with_ranks_in_id_order_and_the_global_batch_split() {
    let mut sim = Sim::new(config());
    let actions = sim.join(1, "b");
    assert!(matches!(actions[0], Action::Accept { conn: 1, .. }));
    assert!(assignments(&actions).is_empty(), "one of two: waits");
    let actions = sim.join(2, "a");
    let assigned = assignments(&actions);
    assert_eq!(sim.state().phase, Phase::Running);
    assert_eq!(sim.state().generation, Generation(1));
    assert_eq!(assigned[0].0, id("a"));
    let (a, b) = (&assigned[0].1, &assigned[1].1);
    assert_eq!((a.rank, b.rank, a.world), (0, 1, 2));
    // 5 samples: rank 0 takes 3 (micro 2 x 2 passes), rank 1 takes 2 (one pass).
    assert_eq!((a.micro_batch, a.accumulation), (2, 2));
    assert_eq!((b.micro_batch, b.accumulation), (2, 1));
    assert_eq!(a.peers, vec![request("a").endpoint, request("b").endpoint]);
    assert_eq!((a.resume_step, a.checkpoint.clone()), (0, None));
}

#[test]
fn forms_below_max_after_the_grace_period() {
    let mut sim = Sim::new(config());
    sim.at(0.0).join(1, "a");
    assert!(assignments(&sim.at(1.9).send(Event::Tick)).is_empty());
    let assigned = assignments(&sim.at(2.1).send(Event::Tick));
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].1.world, 1);
    assert_eq!(assigned[0].1.accumulation, 3, "5 samples in passes of 2");
}

#[test]
fn refuses_other_job_old_version_and_duplicate_ids() {
    // A wrong token never reaches `decide`: the session refuses it (server::authenticate).
    let mut sim = formed();
    let cases = [
        (
            JoinRequest {
                job: "other".into(),
                ..request("c")
            },
            ErrorCode::OtherJob,
        ),
        (
            JoinRequest {
                version: "0.2.0".into(),
                ..request("c")
            },
            ErrorCode::IncompatibleVersion,
        ),
        (request("a"), ErrorCode::DuplicateWorker),
    ];
    for (i, (req, code)) in cases.into_iter().enumerate() {
        let actions = sim.send(Event::Join {
            conn: 10 + i as u64,
            request: req,
        });
        assert_eq!(refusal(&actions), Some(code));
        assert!(assignments(&actions).is_empty());
    }
    // The job goes on: same generation, same members, and the impostor's session cannot act
    // for the member whose id it tried to take.
    assert_eq!(sim.state().generation, Generation(1));
    assert_eq!(sim.state().members.len(), 2);
    let actions = sim.send(Event::Disconnected {
        conn: 13,
        worker: id("a"),
    });
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(sim.state().phase, Phase::Running);
}

#[test]
fn logs_a_step_once_every_rank_reported_it() {
    let mut sim = formed();
    assert!(sim.step("a", 0).is_empty());
    let actions = sim.step("b", 0);
    let Some(Action::Log(Log::Step {
        step,
        world,
        tokens_per_s,
        eta,
        ..
    })) = actions.first()
    else {
        panic!("{actions:?}")
    };
    assert_eq!((*step, *world), (0, 2));
    assert!((tokens_per_s - 800.0).abs() < 1e-6);
    assert_eq!(*eta, Duration::from_millis(700));
}

/// The ETA rose by a tenth of an evaluation at each one and sank back over the steps after
/// (an average of step times that each evaluation spiked): a sawtooth. Now the steps left are
/// counted at their training time and the evaluations and checkpoints left at their mean, so
/// steady steps give an ETA that only falls, by a step's time a step, across evaluations.
#[test]
fn the_eta_counts_the_evaluations_and_checkpoints_left_and_has_no_sawtooth() {
    let mut sim = Sim::new(ControlConfig {
        max_workers: Some(1),
        total_steps: 40,
        eval_every: 10,
        checkpoint_every: 20,
        ..config()
    });
    sim.join(1, "a");
    let ms = Duration::from_millis;
    let mut etas = Vec::new();
    for step in 0..39 {
        let done = step + 1;
        let eval = if done % 10 == 0 { ms(1000) } else { ms(0) };
        let checkpoint = if done % 20 == 0 { ms(500) } else { ms(0) };
        let times = StepTimes {
            train: ms(100),
            eval,
            checkpoint,
        };
        let actions = sim.step_timed("a", step, ms(100) + eval + checkpoint, times, None);
        let Some(Action::Log(Log::Step { eta, .. })) = actions
            .iter()
            .find(|a| matches!(a, Action::Log(Log::Step { .. })))
        else {
            panic!("{actions:?}")
        };
        etas.push(eta.as_secs_f64());
    }
    // After the first evaluation and checkpoint, the ETA is exactly the steps, evaluations and
    // checkpoints left, and falls at every step.
    for (step, eta) in etas.iter().enumerate().skip(19) {
        let done = step as u64 + 1;
        let left = 40 - done;
        let evals = 4 - done / 10;
        let checkpoints = 2 - done / 20;
        let want = 0.1 * left as f64 + 1.0 * evals as f64 + 0.5 * checkpoints as f64;
        assert!(
            (eta - want).abs() < 1e-6,
            "step {done}: eta {eta}, want {want}"
        );
    }
    assert!(etas[19..].windows(2).all(|w| w[1] < w[0]), "{etas:?}");
    assert_eq!(super::events_left(10, 39, 40), 1);
    assert_eq!(super::events_left(10, 40, 40), 0);
    assert_eq!(super::events_left(15, 0, 40), 3, "15, 30 and the last");
    assert_eq!(super::events_left(0, 0, 40), 0);
}

#[test]
fn a_step_that_checkpointed_keeps_its_training_throughput_and_says_where_the_time_went() {
    let mut sim = formed();
    let ms = Duration::from_millis;
    // Rank 0 wrote the checkpoint; rank 1 hashed its weights and waited for rank 0.
    let rank0 = StepTimes {
        train: ms(80),
        eval: ms(0),
        checkpoint: ms(500),
    };
    let rank1 = StepTimes {
        train: ms(100),
        eval: ms(0),
        checkpoint: ms(10),
    };
    assert!(sim
        .step_timed("a", 0, ms(580), rank0, Some(1e12))
        .is_empty());
    let actions = sim.step_timed("b", 0, ms(600), rank1, None);
    let Some(Action::Log(Log::Step {
        tokens_per_s,
        elapsed,
        times,
        peak_flops,
        ..
    })) = actions.first()
    else {
        panic!("{actions:?}")
    };
    // The slowest rank's training time, not the whole step: 112 tokens in 0.1 s.
    assert!((tokens_per_s - (BATCH * 16) as f64 / 0.1).abs() < 1e-6);
    assert_eq!(*elapsed, ms(600));
    assert_eq!(
        *times,
        StepTimes {
            train: ms(100),
            eval: ms(0),
            checkpoint: ms(500)
        }
    );
    // One rank's device peak is unknown: no MFU.
    assert_eq!(*peak_flops, None);

    // A worker without the split (train 0): its whole step counts as training.
    let none = StepTimes::default();
    sim.step_timed("a", 1, ms(200), none, Some(1e12));
    let actions = sim.step_timed("b", 1, ms(250), none, Some(1e12));
    let Some(Action::Log(Log::Step {
        tokens_per_s,
        peak_flops,
        ..
    })) = actions.first()
    else {
        panic!("{actions:?}")
    };
    assert!((tokens_per_s - (BATCH * 16) as f64 / 0.25).abs() < 1e-6);
    assert_eq!(*peak_flops, Some(2e12));
}

#[test]
fn refuses_stale_generations_and_wrong_samples() {
    let mut sim = formed();
    let conn = sim.conn("a");
    let actions = sim.send(Event::Step {
        conn,
        worker: id("a"),
        generation: Generation(0),
        info: StepInfo {
            step: 0,
            rank: 0,
            samples: (0, 3),
            loss: 1.0,
            grad_norm: 1.0,
            lr: 1.0,
            tokens: 1,
            elapsed: Duration::ZERO,
            times: StepTimes::default(),
            peak_flops: None,
        },
    });
    assert_eq!(refusal(&actions), Some(ErrorCode::StaleGeneration));
    let actions = sim.send(Event::Step {
        conn,
        worker: id("a"),
        generation: Generation(1),
        info: StepInfo {
            step: 0,
            rank: 0,
            samples: (0, 5),
            loss: 1.0,
            grad_norm: 1.0,
            lr: 1.0,
            tokens: 1,
            elapsed: Duration::ZERO,
            times: StepTimes::default(),
            peak_flops: None,
        },
    });
    assert_eq!(refusal(&actions), Some(ErrorCode::Invalid));
    assert!(sim.state().steps.is_empty());
}

#[test]
fn commits_only_when_every_rank_reported_and_writes_the_ledger() {
    let mut sim = formed();
    for s in 0..4 {
        sim.step("a", s);
        sim.step("b", s);
    }
    assert!(sim
        .checkpoint("a", 4, "abc")
        .iter()
        .all(|a| !matches!(a, Action::Commit { .. })));
    let actions = sim.checkpoint("b", 4, "abc");
    let Some(Action::Commit { committed, ledger }) = actions.first() else {
        panic!("{actions:?}")
    };
    assert_eq!(committed.step, 4);
    assert_eq!(committed.dir, "/ckpt/step-00000004");
    let mut covered: Vec<(u64, u64)> = ledger.iter().map(|e| (e.start, e.end)).collect();
    covered.sort();
    assert_eq!(covered.len(), 8);
    assert_eq!(covered.first().map(|c| c.0), Some(0));
    assert!(covered.windows(2).all(|w| w[0].1 == w[1].0));
    assert_eq!(covered.last().map(|c| c.1), Some(4 * BATCH));
    assert!(sim.state().steps.is_empty());
}

#[test]
fn differing_weights_are_not_committed() {
    let mut sim = formed();
    for s in 0..4 {
        sim.step("a", s);
        sim.step("b", s);
    }
    sim.checkpoint("a", 4, "abc");
    let actions = sim.checkpoint("b", 4, "abd");
    assert!(actions.iter().all(|a| !matches!(a, Action::Commit { .. })));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Log(Log::Diverged { .. }))));
    assert_eq!(sim.state().phase, Phase::Recovering);
    assert_eq!(sim.state().committed, None);
}

#[test]
fn the_last_commit_completes_the_job() {
    let mut sim = formed();
    sim.train(0, 4);
    let actions = sim.train(4, STEPS);
    assert_eq!(sim.state().phase, Phase::Completed);
    let finished = actions
        .iter()
        .filter(|a| matches!(a, Action::Finish { step: STEPS, .. }))
        .count();
    assert_eq!(finished, 2);
}

#[test]
fn a_lost_rank_aborts_the_generation_and_survivors_resume_from_the_commit() {
    let mut sim = formed();
    sim.at(1.0).train(0, 4);
    sim.step("a", 4);
    sim.step("b", 4);
    let conn = sim.conn("b");
    let actions = sim.at(2.0).send(Event::Disconnected {
        conn,
        worker: id("b"),
    });
    assert_eq!(aborts(&actions), vec![id("a")]);
    assert_eq!(recovery_phases(&actions), vec![RecoveryPhase::Detected]);
    assert_eq!(sim.state().phase, Phase::Recovering);
    // A report of the aborted generation that was already on the wire: refused.
    assert_eq!(
        refusal(&sim.step_stale("a", 5)),
        Some(ErrorCode::StaleGeneration)
    );
    let conn = sim.conn("a");
    let actions = sim.at(2.5).send(Event::Aborted {
        conn,
        worker: id("a"),
        generation: Generation(1),
    });
    assert_eq!(
        recovery_phases(&actions),
        vec![RecoveryPhase::Aborted, RecoveryPhase::Reformed]
    );
    let assigned = assignments(&actions);
    assert_eq!(assigned.len(), 1);
    let a = &assigned[0].1;
    assert_eq!((a.generation, a.world, a.rank), (Generation(2), 1, 0));
    assert_eq!(a.resume_step, 4, "step 4's uncommitted work is redone");
    assert_eq!(a.checkpoint.as_deref(), Some("/ckpt/step-00000004"));
    assert_eq!(a.accumulation, 3, "one rank carries the whole batch");
    let actions = sim.at(3.0).step("a", 4);
    assert_eq!(recovery_phases(&actions), vec![RecoveryPhase::Resumed]);
    let Some(Action::Log(Log::Recovery { since_detected, .. })) = actions.last() else {
        panic!("{actions:?}")
    };
    assert_eq!(*since_detected, Duration::from_secs(1));
    // The ledger after the next commit: step 4 counted once, by generation 2.
    let actions = sim.train(5, 8);
    let ledger: Vec<LedgerEntry> = actions
        .iter()
        .find_map(|a| match a {
            Action::Commit { ledger, .. } => Some(ledger.clone()),
            _ => None,
        })
        .expect("commit");
    assert_eq!(ledger.first().map(|e| (e.step, e.generation)), Some((4, 2)));
    assert_eq!(ledger.len(), 4);
}

impl Sim {
    fn step_stale(&mut self, worker: &str, step: u64) -> Vec<Action> {
        let conn = self.conn(worker);
        self.send(Event::Step {
            conn,
            worker: id(worker),
            generation: Generation(1),
            info: StepInfo {
                step,
                rank: 0,
                samples: (0, 0),
                loss: 0.0,
                grad_norm: 0.0,
                lr: 0.0,
                tokens: 0,
                elapsed: Duration::ZERO,
                times: StepTimes::default(),
                peak_flops: None,
            },
        })
    }
}

#[test]
fn a_silent_worker_is_dropped_after_the_session_timeout() {
    let mut sim = formed();
    let conn = sim.conn("a");
    sim.at(4.0).send(Event::Heartbeat {
        conn,
        worker: id("a"),
    });
    let actions = sim.at(5.5).send(Event::Tick);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Drop { worker, .. } if *worker == id("b"))));
    assert_eq!(aborts(&actions), vec![id("a")]);
    assert_eq!(sim.state().phase, Phase::Recovering);
}

#[test]
fn a_survivor_that_does_not_confirm_the_abort_is_dropped_at_the_deadline() {
    let mut cfg = config();
    cfg.max_workers = Some(3);
    cfg.min_workers = 1;
    let mut sim = Sim::new(cfg);
    sim.join(1, "a");
    sim.join(2, "b");
    sim.join(3, "c");
    let conn = sim.conn("c");
    sim.at(1.0).send(Event::Disconnected {
        conn,
        worker: id("c"),
    });
    let conn = sim.conn("a");
    sim.send(Event::Aborted {
        conn,
        worker: id("a"),
        generation: Generation(1),
    });
    assert_eq!(sim.state().phase, Phase::Recovering, "b has not confirmed");
    // Heartbeats keep b's session alive, but it never confirms.
    for t in [3.0, 6.0, 9.0] {
        let conn = sim.conn("b");
        sim.at(t).send(Event::Heartbeat {
            conn,
            worker: id("b"),
        });
        let conn = sim.conn("a");
        sim.send(Event::Heartbeat {
            conn,
            worker: id("a"),
        });
    }
    let actions = sim.at(11.5).send(Event::Tick);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Drop { worker, .. } if *worker == id("b"))));
    let assigned = assignments(&actions);
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].0, id("a"));
}

#[test]
fn below_min_workers_it_waits_then_forms_when_one_joins() {
    let mut cfg = config();
    cfg.min_workers = 2;
    let mut sim = Sim::new(cfg);
    sim.join(1, "a");
    sim.join(2, "b");
    let conn = sim.conn("b");
    sim.send(Event::Disconnected {
        conn,
        worker: id("b"),
    });
    let conn = sim.conn("a");
    let actions = sim.send(Event::Aborted {
        conn,
        worker: id("a"),
        generation: Generation(1),
    });
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Log(Log::Waiting {
            members: 1,
            min_workers: 2
        })
    )));
    assert_eq!(sim.state().phase, Phase::Forming);
    let actions = sim.join(3, "b");
    let assigned = assignments(&actions);
    assert_eq!(assigned.len(), 2);
    assert_eq!(assigned[0].1.generation, Generation(2));
}

#[test]
fn a_late_joiner_waits_and_joins_at_the_next_commit() {
    let mut cfg = config();
    cfg.max_workers = None;
    let mut sim = Sim::new(cfg);
    sim.at(0.0).join(1, "a");
    sim.at(3.0).send(Event::Tick);
    assert_eq!(sim.state().ranks.len(), 1);
    let actions = sim.join(2, "b");
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Log(Log::Joined { standby: true, .. }))));
    assert!(assignments(&actions).is_empty());
    let actions = sim.train(0, 4);
    assert!(actions.iter().any(|a| matches!(a, Action::Commit { .. })));
    assert_eq!(aborts(&actions), vec![id("a")], "re-form to take b in");
    let conn = sim.conn("a");
    let actions = sim.send(Event::Aborted {
        conn,
        worker: id("a"),
        generation: Generation(1),
    });
    let assigned = assignments(&actions);
    assert_eq!(assigned.len(), 2);
    assert_eq!(assigned[1].1.resume_step, 4);
    assert_eq!(sim.state().failed_generations, 0);
}

#[test]
fn a_rank_that_fails_is_not_aborted_and_repeated_failures_fail_the_job() {
    let mut sim = formed();
    for round in 1..=4u64 {
        let generation = sim.state().generation;
        assert_eq!(generation, Generation(round));
        let conn = sim.conn("a");
        let actions = sim.send(Event::Failed {
            conn,
            worker: id("a"),
            generation,
            reason: "corrupt shard".into(),
            fatal: false,
            peer_fault: false,
        });
        assert_eq!(aborts(&actions), vec![id("b")]);
        let conn = sim.conn("b");
        sim.send(Event::Aborted {
            conn,
            worker: id("b"),
            generation,
        });
    }
    assert!(
        matches!(sim.state().phase, Phase::Failed(_)),
        "{:?}",
        sim.state().phase
    );
}

/// A failure that a retry would meet again (a non-finite step) fails the job at once, with the
/// worker's reason, instead of re-forming from the same commit into the same failure.
#[test]
fn a_fatal_failure_fails_the_job_without_reforming() {
    let mut sim = formed();
    let generation = sim.state().generation;
    let conn = sim.conn("a");
    let actions = sim.send(Event::Failed {
        conn,
        worker: id("a"),
        generation,
        reason: "step 5: the loss is NaN".into(),
        fatal: true,
        peer_fault: false,
    });
    assert_eq!(aborts(&actions), vec![id("b")]);
    match &sim.state().phase {
        Phase::Failed(reason) => assert!(
            reason.contains("a failed: step 5: the loss is NaN"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.state().generation, generation, "no new generation");
}

#[test]
fn a_peers_own_failure_replaces_the_report_that_blamed_it() {
    let mut sim = formed();
    let generation = sim.state().generation;
    let conn = sim.conn("a");
    sim.send(Event::Failed {
        conn,
        worker: id("a"),
        generation,
        reason: "collective: rank 1 closed the connection".into(),
        fatal: false,
        peer_fault: true,
    });
    let conn = sim.conn("b");
    let actions = sim.send(Event::Failed {
        conn,
        worker: id("b"),
        generation,
        reason: "the training thread panicked: boom".into(),
        fatal: false,
        peer_fault: false,
    });
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Log(Log::Cause { worker, .. }) if *worker == id("b")
        )),
        "{actions:?}"
    );
    let reason = &sim.state().recovery.as_ref().expect("recovering").reason;
    assert_eq!(reason, "b failed: the training thread panicked: boom");
    // A second peer-blaming report, or one of another generation, changes nothing.
    let conn = sim.conn("a");
    sim.send(Event::Failed {
        conn,
        worker: id("a"),
        generation,
        reason: "collective: timed out".into(),
        fatal: false,
        peer_fault: false,
    });
    let reason = &sim.state().recovery.as_ref().expect("recovering").reason;
    assert_eq!(reason, "b failed: the training thread panicked: boom");
}

#[test]
fn shutdown_aborts_every_rank_and_stops() {
    let mut sim = formed();
    let actions = sim.send(Event::Shutdown {
        reason: "interrupted".into(),
    });
    assert_eq!(aborts(&actions), vec![id("a"), id("b")]);
    assert_eq!(sim.state().phase, Phase::Stopped("interrupted".into()));
    assert_eq!(refusal(&sim.join(9, "c")), Some(ErrorCode::JobOver));
}

fn stops(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { worker, .. } => Some(worker.clone()),
            _ => None,
        })
        .collect()
}

fn stop(sim: &mut Sim) -> Vec<Action> {
    sim.send(Event::Stop {
        reason: "interrupted (Ctrl-C)".into(),
    })
}

/// Ctrl-C on `dapt launch`: the ranks checkpoint the step in progress (they agree on it through
/// its loss all-reduce) and the job stops once that checkpoint is committed, with the ledger of
/// every step up to it; before, it stopped at the last commit and lost the steps since.
#[test]
fn a_stop_commits_the_step_in_progress_then_stops_the_job() {
    let mut sim = formed();
    sim.train(0, 4);
    for s in 4..6 {
        sim.step("a", s);
        sim.step("b", s);
    }
    let actions = stop(&mut sim);
    assert_eq!(stops(&actions), vec![id("a"), id("b")]);
    assert!(aborts(&actions).is_empty(), "{actions:?}");
    assert_eq!(sim.state().phase, Phase::Running);
    assert_eq!(sim.state().phase_name(), "stopping");
    for w in ["a", "b"] {
        sim.step(w, 6);
    }
    let first = sim.vote("a", 7, "abc", true);
    assert!(first.iter().all(|a| !matches!(a, Action::Commit { .. })));
    assert_eq!(sim.state().phase, Phase::Running);
    let actions = sim.vote("b", 7, "abc", true);
    let Some(Action::Commit { committed, ledger }) = actions.first() else {
        panic!("{actions:?}")
    };
    assert_eq!(committed.step, 7);
    assert_eq!(ledger.iter().map(|e| e.step).min(), Some(4));
    assert_eq!(ledger.len(), 6, "steps 4, 5 and 6 of both ranks");
    assert_eq!(
        sim.state().phase,
        Phase::Stopped("interrupted (Ctrl-C)".into())
    );
    assert!(sim.state().stopping.is_none());
    assert!(assignments(&actions).is_empty(), "{actions:?}");
    assert_eq!(refusal(&sim.join(9, "c")), Some(ErrorCode::JobOver));
}

#[test]
fn a_second_stop_or_one_while_no_generation_trains_stops_at_once() {
    let mut sim = formed();
    sim.train(0, 4);
    stop(&mut sim);
    let actions = stop(&mut sim);
    assert_eq!(aborts(&actions), vec![id("a"), id("b")]);
    assert!(matches!(sim.state().phase, Phase::Stopped(_)));
    assert_eq!(sim.state().committed_step(), 4);

    // Forming (one worker of min 1 joined, inside the formation grace): nothing to checkpoint.
    let mut sim = Sim::new(config());
    sim.join(1, "a");
    assert_eq!(sim.state().phase, Phase::Forming);
    let actions = stop(&mut sim);
    assert!(stops(&actions).is_empty(), "{actions:?}");
    assert!(matches!(sim.state().phase, Phase::Stopped(_)));
}

#[test]
fn a_stop_whose_checkpoint_does_not_come_stops_at_the_last_commit_after_its_grace() {
    let mut sim = formed();
    sim.train(0, 4);
    sim.at(1.0);
    stop(&mut sim);
    let grace = sim.state().stopping.as_ref().expect("stopping").grace;
    assert_eq!(grace, stop_grace(sim.state()));
    assert!(grace >= Duration::from_secs(30), "{grace:?}");
    // The ranks heartbeat (alive) but never report the checkpoint (a hung peer).
    let mut t = 1.0;
    while t < 1.0 + grace.as_secs_f64() - 1.0 {
        t += 1.0;
        sim.at(t).heartbeats();
        sim.send(Event::Tick);
    }
    assert_eq!(sim.state().phase, Phase::Running);
    sim.at(t + 2.0).heartbeats();
    let actions = sim.send(Event::Tick);
    assert_eq!(aborts(&actions), vec![id("a"), id("b")]);
    let Phase::Stopped(reason) = &sim.state().phase else {
        panic!("{:?}", sim.state().phase)
    };
    assert!(
        reason
            .starts_with("interrupted (Ctrl-C); the step in progress was not checkpointed within"),
        "{reason}"
    );
    assert_eq!(sim.state().committed_step(), 4);
}

#[test]
fn a_rank_lost_while_stopping_stops_the_job_at_the_last_commit_without_re_forming() {
    let mut sim = formed();
    sim.train(0, 4);
    stop(&mut sim);
    let conn = sim.conn("b");
    let actions = sim.send(Event::Disconnected {
        conn,
        worker: id("b"),
    });
    assert!(assignments(&actions).is_empty(), "{actions:?}");
    let Phase::Stopped(reason) = &sim.state().phase else {
        panic!("{:?}", sim.state().phase)
    };
    assert!(reason.contains("b lost"), "{reason}");
    assert_eq!(sim.state().committed_step(), 4);
}

/// A member's evaluation of a source the job does not have is refused: its name went into a
/// `/metrics` label as it came (a quote and a newline forged a metric), and each new name grew
/// the registry.
#[test]
fn an_evaluation_of_a_source_that_is_not_the_jobs_is_refused() {
    let mut sim = formed();
    let conn = sim.conn("a");
    let eval = |sim: &mut Sim, source: &str| {
        sim.send(Event::Eval {
            conn,
            worker: id("a"),
            generation: Generation(1),
            step: 0,
            source: source.into(),
            perplexity: 12.0,
            tokens: 100,
        })
    };
    let logged = |actions: &[Action]| {
        actions
            .iter()
            .any(|a| matches!(a, Action::Log(Log::Eval { .. })))
    };
    let actions = eval(&mut sim, "legal");
    assert!(logged(&actions), "{actions:?}");
    let actions = eval(&mut sim, "x\"} 1\ndapt_forged 9\n#");
    assert!(!logged(&actions), "{actions:?}");
    assert_eq!(refusal(&actions), Some(ErrorCode::Invalid));
    assert!(!sim.state().base_evals.keys().any(|k| k.starts_with('x')));
}

#[test]
fn a_relaunch_of_a_completed_job_finishes_at_once() {
    let committed = Committed {
        step: STEPS,
        dir: "/ckpt/step-00000008".into(),
        generation: 3,
        ..Default::default()
    };
    let mut state = Some(JobState::new(config(), Some(committed)));
    let now = Instant::now();
    let mut actions = Vec::new();
    for (conn, w) in [(1, "a"), (2, "b")] {
        let (s, a) = decide_checked(
            state.take().expect("state"),
            Event::Join {
                conn,
                request: request(w),
            },
            now,
        );
        state = Some(s);
        actions = a;
    }
    assert_eq!(state.expect("state").phase, Phase::Completed);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Finish { .. }))
            .count(),
        2
    );
}

fn attach(worker: &str, generation: u64, rank: u32) -> JoinRequest {
    JoinRequest {
        attach: Some((Generation(generation), rank)),
        ..request(worker)
    }
}

fn taken_over(committed_step: u64) -> Sim {
    let mut sim = Sim::new(config());
    let now = sim.now;
    let committed = Committed {
        step: committed_step,
        dir: format!("/ckpt/step-{committed_step:08}"),
        generation: 4,
        ..Default::default()
    };
    let record = GenerationRecord {
        generation: 4,
        ranks: vec!["a".into(), "b".into()],
        peers: vec![request("a").endpoint, request("b").endpoint],
        resume_step: committed_step,
    };
    sim.state = Some(JobState::take_over(
        config(),
        Some(committed),
        record,
        now,
        now + Duration::from_secs(3),
    ));
    sim
}

#[test]
fn a_new_coordinator_takes_the_running_generation_back_without_re_forming() {
    let mut sim = taken_over(4);
    let actions = sim.at(0.5).send(Event::Join {
        conn: 1,
        request: attach("a", 4, 0),
    });
    assert!(assignments(&actions).is_empty());
    assert_eq!(sim.state().phase, Phase::Reattaching);
    // Its replayed reports: the committed step is ignored, the rest counts.
    assert!(sim.step("a", 3).is_empty());
    assert!(sim.step("a", 4).is_empty());
    let actions = sim.at(1.0).send(Event::Join {
        conn: 2,
        request: attach("b", 4, 1),
    });
    assert!(assignments(&actions).is_empty(), "no re-formation");
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Log(Log::Reattached {
            generation: Generation(4),
            world: 2,
            ..
        })
    )));
    assert_eq!(sim.state().phase, Phase::Running);
    let actions = sim.step("b", 4);
    assert!(matches!(
        actions.first(),
        Some(Action::Log(Log::Step { step: 4, .. }))
    ));
    let actions = sim.train(5, STEPS);
    let ledger = actions
        .iter()
        .find_map(|a| match a {
            Action::Commit { ledger, .. } => Some(ledger.clone()),
            _ => None,
        })
        .expect("commit");
    assert_eq!(ledger.len(), 8, "steps 4..8, two ranks, once each");
    assert_eq!(sim.state().phase, Phase::Completed);
}

#[test]
fn ranks_that_do_not_re_attach_in_time_are_given_up_and_the_rest_re_form() {
    let mut sim = taken_over(4);
    sim.at(0.5).send(Event::Join {
        conn: 1,
        request: attach("a", 4, 0),
    });
    let actions = sim.at(3.1).send(Event::Tick);
    assert_eq!(aborts(&actions), vec![id("a")]);
    let conn = sim.conn("a");
    let actions = sim.send(Event::Aborted {
        conn,
        worker: id("a"),
        generation: Generation(4),
    });
    let assigned = assignments(&actions);
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].1.generation, Generation(5));
    assert_eq!(assigned[0].1.resume_step, 4);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::RecordGeneration(r) if r.generation == 5)));
}

#[test]
fn an_expired_lease_loses_the_worker() {
    let mut sim = formed();
    let actions = sim.send(Event::Expired { worker: id("b") });
    assert_eq!(aborts(&actions), vec![id("a")]);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Log(Log::Lost { reason, .. }) if reason.contains("lease")
    )));
}

// Regressions found by the property test (`control/proptests.rs`): each is the shrunk
// sequence it reported, replayed through the same simulated workers, plus the decision that
// was wrong.

use super::proptests::{run, Membership, Op, Setup};

fn setup(membership: Membership, workers: usize, global_batch: u64, total_steps: u64) -> Setup {
    Setup {
        membership,
        workers,
        min_workers: workers,
        max_workers: Some(workers),
        global_batch,
        total_steps,
        every: 1,
        max_failed_generations: 2,
        resumed: None,
    }
}

fn replay(setup: Setup, ops: &[Op]) {
    if let Err(e) = run(&setup, ops) {
        panic!("{e}");
    }
}

#[test]
fn a_generation_is_recorded_before_any_rank_hears_of_it() {
    // A leader that loses etcd while telling the ranks must not have told them of a generation
    // the next leader would hand out again.
    let mut sim = Sim::new(config());
    sim.join(1, "a");
    let actions = sim.join(2, "b");
    let record = actions
        .iter()
        .position(|a| matches!(a, Action::RecordGeneration(_)));
    let assign = actions
        .iter()
        .position(|a| matches!(a, Action::Assign { .. }));
    assert!(record.is_some() && record < assign, "{actions:?}");
}

#[test]
fn a_restarted_coordinator_never_hands_out_a_generation_twice() {
    // Embedded: the worker keeps training generation 1 while the coordinator restarts; the new
    // one formed generation 1 again, so the old training's reports would count as current.
    replay(
        setup(Membership::Embedded, 1, 1, 1),
        &[Op::Deliver(0), Op::Deliver(0), Op::Tick(2000), Op::TakeOver],
    );
    let state = JobState::new(config(), None).after_generation(Some(Generation(6)));
    assert_eq!(state.generation, Generation(6));
}

#[test]
fn an_expired_lease_ends_the_session_so_the_worker_joins_again() {
    // etcd: the lease of the only worker lapsed while its session was fine. It was dropped from
    // the members but never told: it trained on, ignored, and the job never completed.
    replay(
        setup(Membership::Etcd, 1, 1, 1),
        &[Op::Deliver(0), Op::Expire(0)],
    );
    let mut sim = formed();
    let conn = sim.conn("b");
    let actions = sim.send(Event::Expired { worker: id("b") });
    assert!(
        actions.contains(&Action::Drop {
            conn,
            worker: id("b")
        }),
        "{actions:?}"
    );
}

#[test]
fn a_checkpoint_report_past_the_last_step_is_refused() {
    // A malformed checkpoint report for step 3 of 2 was counted as a vote and stayed in the
    // state for the job's life.
    let mut s = setup(Membership::Embedded, 2, 2, 2);
    s.resumed = Some(1);
    replay(
        s,
        &[
            Op::Deliver(0),
            Op::Deliver(1),
            Op::Train(1),
            Op::Resend(1, true),
            Op::Deliver(1),
            Op::Deliver(1),
            Op::Deliver(1),
        ],
    );
    let mut sim = formed();
    let actions = sim.checkpoint("a", STEPS + 1, "abc");
    assert_eq!(refusal(&actions), Some(ErrorCode::Invalid));
    assert!(sim.state().checkpoints.is_empty());
}

#[test]
fn a_generation_that_resumed_from_an_unrecorded_commit_is_formed_again() {
    // etcd: generation 2 resumed from step 1, committed by a leader that lost etcd before it
    // recorded it. The next leader (nothing durable) waited for the ranks to re-attach, but
    // their reports start at step 1 and step 0 is never reported again: no commit, ever.
    let mut s = setup(Membership::Etcd, 1, 1, 5);
    s.max_failed_generations = 2;
    replay(
        s,
        &[
            Op::Deliver(0),
            Op::Train(0),
            Op::Kill(0),
            Op::Deliver(0),
            Op::Restart(0),
            Op::Deliver(0),
            Op::Deliver(0),
            Op::Deliver(0),
            Op::TakeOver,
        ],
    );
    let now = Instant::now();
    let record = GenerationRecord {
        generation: 2,
        ranks: vec!["a".into()],
        peers: vec![request("a").endpoint],
        resume_step: 1,
    };
    let state = JobState::take_over(config(), None, record, now, now);
    assert_eq!(
        (state.phase, state.generation),
        (Phase::Forming, Generation(2))
    );
}

/// Issue 16: a stalled ring is named once, aborted after the stall timeout, and re-formed
/// without the culprit link's sending end, which no later commit takes back.
#[test]
fn a_stalled_link_is_named_then_aborted_and_its_sender_benched() {
    use super::stall::{CollectiveReport, Culprit, RankPhase, StallAction};
    let mut sim = Sim::new(ControlConfig {
        max_workers: Some(3),
        total_steps: 20,
        stall: StallConfig {
            factor: 3.0,
            floor: Duration::from_millis(500),
            timeout: Some(Duration::from_secs(2)),
        },
        ..config()
    });
    for (conn, w) in [(1, "a"), (2, "b"), (3, "c")] {
        sim.join(conn, w);
    }
    assert_eq!(sim.state().ranks.len(), 3);
    sim.train(0, 5);
    sim.step("a", 5);
    sim.step("b", 5);
    sim.step("c", 5);
    let generation = sim.state().generation;
    // The ring a -> b -> c -> a with the link b -> c cut: each waits on its left; c got nothing.
    for (w, on, received) in [("a", 2, 24), ("b", 0, 5000), ("c", 1, 0)] {
        let conn = sim.conn(w);
        sim.send(Event::Progress {
            conn,
            worker: id(w),
            report: RankReport {
                generation,
                step: 6,
                phase: RankPhase::Collective,
                collective: Some(CollectiveReport {
                    calls: 13,
                    received,
                    sent: 24,
                    waiting_for: Some(on),
                    waited: Duration::from_millis(300),
                }),
            },
        });
    }
    let stalls = |actions: &[Action]| -> Vec<super::Stall> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(Log::Stall(s)) => Some(s.clone()),
                _ => None,
            })
            .collect()
    };
    assert!(stalls(&sim.at(0.4).send(Event::Tick)).is_empty());
    let named = stalls(&sim.at(0.6).send(Event::Tick));
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(named[0].action, StallAction::Named);
    assert_eq!(
        named[0].culprit.to_string(),
        "link rank 1 (b) -> rank 2 (c) in the collective"
    );
    assert!(matches!(
        named[0].culprit,
        Culprit::Link { from: 1, to: 2, .. }
    ));
    // Named once; nothing aborted before the timeout.
    let quiet = sim.at(2.5).send(Event::Tick);
    assert!(stalls(&quiet).is_empty() && aborts(&quiet).is_empty());
    let actions = sim.at(2.7).send(Event::Tick);
    assert_eq!(stalls(&actions)[0].action, StallAction::Aborted);
    assert_eq!(recovery_phases(&actions), vec![RecoveryPhase::Detected]);
    assert_eq!(aborts(&actions).len(), 3);
    assert!(sim.state().benched.contains(&id("b")));
    let mut formed = Vec::new();
    for w in ["a", "b", "c"] {
        let conn = sim.conn(w);
        formed.extend(sim.at(2.8).send(Event::Aborted {
            conn,
            worker: id(w),
            generation,
        }));
    }
    let ranks: Vec<WorkerId> = assignments(&formed).into_iter().map(|(w, _)| w).collect();
    assert_eq!(ranks, vec![id("a"), id("c")]);
    // The next commit does not take the benched worker back as a standby.
    let actions = sim.train(5, 10);
    assert!(aborts(&actions).is_empty(), "{actions:?}");
    assert_eq!(sim.state().ranks, vec![id("a"), id("c")]);
    assert_eq!(sim.state().stall.history.len(), 1);
}

/// Issue 14: the committed checkpoint rots after its commit; a rank of the next generation
/// fails loading it. The executor finds the earlier kept checkpoint and sends `FellBack` before
/// the failure: the job records the fallback, and the generation re-formed after the failure
/// resumes from the earlier checkpoint (the invariant checker allows the committed step this
/// one way back, and only with its `FallBack` action).
#[test]
fn a_corrupt_committed_checkpoint_falls_back_and_the_next_generation_resumes_before_it() {
    let mut sim = formed();
    sim.train(0, 2);
    sim.train(2, 4);
    assert_eq!(sim.state().committed_step(), 4);
    let earlier = Committed {
        step: 2,
        dir: "/ckpt/step-00000002".into(),
        generation: 1,
        ..Committed::default()
    };
    let actions = sim.send(Event::FellBack {
        earlier: earlier.clone(),
    });
    assert_eq!(
        actions,
        vec![Action::FallBack {
            committed: earlier.clone()
        }]
    );
    assert_eq!(sim.state().committed.as_ref(), Some(&earlier));
    // A stale fallback (to a step not before the committed one) changes nothing.
    assert!(sim
        .send(Event::FellBack {
            earlier: Committed {
                step: 3,
                ..earlier.clone()
            }
        })
        .is_empty());
    let generation = sim.state().generation;
    let conn = sim.conn("a");
    sim.send(Event::Failed {
        conn,
        worker: id("a"),
        generation,
        reason: "checkpoint /ckpt/step-00000004: model.safetensors has SHA-256 0, the manifest says 1: the file is corrupt".into(),
        fatal: false,
        peer_fault: false,
    });
    let conn = sim.conn("b");
    let actions = sim.send(Event::Aborted {
        conn,
        worker: id("b"),
        generation,
    });
    let assigned = assignments(&actions);
    assert_eq!(assigned.len(), 2, "{actions:?}");
    for (_, a) in assigned {
        assert_eq!(a.resume_step, 2);
        assert_eq!(a.checkpoint.as_deref(), Some("/ckpt/step-00000002"));
    }
}
