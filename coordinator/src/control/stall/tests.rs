use super::*;

fn ranks(n: usize) -> Vec<WorkerId> {
    (0..n).map(|i| WorkerId(format!("w{i}"))).collect()
}

fn computing(step: u64, phase: RankPhase, calls: u64) -> RankReport {
    RankReport {
        generation: Generation(1),
        step,
        phase,
        collective: (calls > 0).then_some(CollectiveReport {
            calls,
            received: 4096,
            sent: 4096,
            waiting_for: None,
            waited: Duration::ZERO,
        }),
    }
}

fn waiting(step: u64, calls: u64, on: u32, received: u64, waited_ms: u64) -> RankReport {
    RankReport {
        generation: Generation(1),
        step,
        phase: RankPhase::Collective,
        collective: Some(CollectiveReport {
            calls,
            received,
            sent: 1000,
            waiting_for: Some(on),
            waited: Duration::from_millis(waited_ms),
        }),
    }
}

#[test]
fn a_rank_that_never_reached_the_collective_holds_the_others() {
    // Ranks 0 and 2 wait in call 8 for their left neighbours; rank 1 is still in its backward
    // pass after call 7.
    let reports = BTreeMap::from([
        (0, waiting(3, 8, 2, 512, 900)),
        (1, computing(3, RankPhase::Forward, 7)),
        (2, waiting(3, 8, 1, 0, 1000)),
    ]);
    assert_eq!(
        name_culprit(&ranks(3), &reports),
        Culprit::Rank {
            rank: 1,
            worker: WorkerId("w1".into()),
            phase: RankPhase::Forward
        }
    );
}

#[test]
fn when_every_rank_waits_the_starved_rank_names_the_link_into_it() {
    // The ring 0 -> 1 -> 2 -> 0 with the link 1 -> 2 cut: every rank waits on its left, in a
    // cycle; rank 2 got nothing of the call, the others got what was sent before the wait
    // reached them.
    let reports = BTreeMap::from([
        (0, waiting(41, 90, 2, 24_000, 400)),
        (1, waiting(41, 90, 0, 48_000, 380)),
        (2, waiting(41, 90, 1, 24, 420)),
    ]);
    let culprit = name_culprit(&ranks(3), &reports);
    assert_eq!(
        culprit,
        Culprit::Link {
            from: 1,
            from_worker: WorkerId("w1".into()),
            to: 2,
            to_worker: WorkerId("w2".into()),
        }
    );
    assert_eq!(
        culprit.to_string(),
        "link rank 1 (w1) -> rank 2 (w2) in the collective"
    );
    // A re-formation leaves out the sending end.
    assert_eq!(culprit.benched(), Some(&WorkerId("w1".into())));
}

#[test]
fn a_tie_on_bytes_goes_to_the_longest_wait() {
    let reports = BTreeMap::from([
        (0, waiting(5, 12, 1, 0, 300)),
        (1, waiting(5, 12, 0, 0, 700)),
    ]);
    assert!(matches!(
        name_culprit(&ranks(2), &reports),
        Culprit::Link { from: 0, to: 1, .. }
    ));
}

#[test]
fn a_receive_waiting_on_a_rank_outside_the_collective_names_that_rank() {
    // The same calls begun (heartbeats are not simultaneous), and rank 1's receive waits on
    // rank 0, which is writing a checkpoint: rank 0 holds it, not the link.
    let reports = BTreeMap::from([
        (0, computing(9, RankPhase::Checkpoint, 20)),
        (1, waiting(9, 20, 0, 0, 5000)),
    ]);
    assert_eq!(
        name_culprit(&ranks(2), &reports),
        Culprit::Rank {
            rank: 0,
            worker: WorkerId("w0".into()),
            phase: RankPhase::Checkpoint
        }
    );
}

#[test]
fn without_every_rank_s_report_nobody_is_named() {
    let reports = BTreeMap::from([(0, waiting(5, 12, 1, 0, 300))]);
    assert_eq!(name_culprit(&ranks(2), &reports), Culprit::Unknown);
    assert_eq!(Culprit::Unknown.benched(), None);
}

fn config() -> StallConfig {
    StallConfig {
        factor: 3.0,
        floor: Duration::from_millis(500),
        timeout: Some(Duration::from_secs(2)),
    }
}

#[test]
fn a_stall_is_named_once_past_the_bound_and_aborted_after_the_timeout() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let ranks = ranks(3);
    let mut w = StallWatch::default();
    w.formed();
    // No step yet in this generation: no bound.
    assert_eq!(w.check(&config(), Generation(1), &ranks, at(60_000)), None);
    for (i, ms) in [200u64, 250, 300].into_iter().enumerate() {
        let cleared = w.step_done(
            Duration::from_millis(ms),
            Duration::ZERO,
            Duration::ZERO,
            at(300 * (i as u64 + 1)),
        );
        assert_eq!(cleared, None);
    }
    // Median 250 ms x 3 = 750 ms (above the 500 ms floor), from the last step at 900 ms.
    assert_eq!(w.bound(&config()), Some(Duration::from_millis(750)));
    for (rank, report) in [
        (0, waiting(3, 9, 2, 100, 0)),
        (1, waiting(3, 9, 0, 200, 0)),
        (2, waiting(3, 9, 1, 0, 0)),
    ] {
        w.report(rank, report);
    }
    assert_eq!(w.check(&config(), Generation(1), &ranks, at(1600)), None);
    let Some(Verdict::Named(stall)) = w.check(&config(), Generation(1), &ranks, at(1700)) else {
        panic!("not named past the bound");
    };
    assert_eq!(stall.step, 3);
    assert!(matches!(
        stall.culprit,
        Culprit::Link { from: 1, to: 2, .. }
    ));
    // Named once.
    assert_eq!(w.check(&config(), Generation(1), &ranks, at(2000)), None);
    let Some(Verdict::Abort(stall)) = w.check(&config(), Generation(1), &ranks, at(3700)) else {
        panic!("not aborted after the timeout");
    };
    assert_eq!(stall.action, StallAction::Aborted);
    assert_eq!(w.history.len(), 1);
    assert_eq!(w.history[0].action, StallAction::Aborted);
}

#[test]
fn a_step_that_completes_after_all_clears_the_stall() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let ranks = ranks(2);
    let mut w = StallWatch::default();
    w.step_done(
        Duration::from_millis(100),
        Duration::ZERO,
        Duration::ZERO,
        at(100),
    );
    w.report(0, computing(1, RankPhase::Forward, 2));
    w.report(1, waiting(1, 3, 0, 0, 0));
    let Some(Verdict::Named(_)) = w.check(&config(), Generation(1), &ranks, at(700)) else {
        panic!("not named");
    };
    let cleared = w
        .step_done(
            Duration::from_millis(100),
            Duration::ZERO,
            Duration::ZERO,
            at(800),
        )
        .expect("the stall cleared");
    assert_eq!(cleared.action, StallAction::Cleared);
    // No abort after a cleared stall.
    assert_eq!(w.check(&config(), Generation(1), &ranks, at(900)), None);
}

#[test]
fn an_evaluation_gets_its_own_allowance_and_none_before_the_first_is_timed() {
    let t0 = Instant::now();
    let ranks = ranks(2);
    let mut w = StallWatch::default();
    w.step_done(
        Duration::from_millis(100),
        Duration::ZERO,
        Duration::ZERO,
        t0,
    );
    w.report(0, computing(1, RankPhase::Evaluate, 2));
    w.report(1, waiting(1, 3, 0, 0, 0));
    // No evaluation timed yet: no bound, however long it takes.
    assert_eq!(w.bound(&config()), None);
    assert_eq!(
        w.check(
            &config(),
            Generation(1),
            &ranks,
            t0 + Duration::from_secs(3600)
        ),
        None
    );
    w.step_done(
        Duration::from_millis(100),
        Duration::from_secs(2),
        Duration::ZERO,
        t0,
    );
    // 500 ms floor + 3 x the 2 s evaluation.
    assert_eq!(w.bound(&config()), Some(Duration::from_millis(6500)));
}
