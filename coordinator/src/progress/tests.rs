use std::time::{Duration, Instant};

use dapt_proto::rpc::{Generation, WorkerId};

use super::*;
use crate::control::StepTimes;

fn step(step: u64, tokens_per_s: f64, times: StepTimes) -> Log {
    Log::Step {
        step,
        total_steps: 123,
        loss: 5.9398393630981445,
        tokens_per_s,
        lr: 0.00030438887424672536,
        grad_norm: 0.3555587054101867,
        world: 2,
        generation: Generation(1),
        eta: Duration::from_secs(199),
        tokens: 4096,
        elapsed: times.train + times.eval + times.checkpoint,
        times,
        peak_flops: None,
    }
}

fn formed() -> Log {
    Log::Formed {
        generation: Generation(1),
        world: 2,
        resume_step: 0,
        ranks: vec![WorkerId("worker-0".into()), WorkerId("worker-1".into())],
    }
}

#[test]
fn the_step_line_rounds_and_says_what_else_the_step_did() {
    let t0 = Instant::now();
    let mut p = Progress::default();
    p.observe(&formed(), t0);
    let train = StepTimes {
        train: Duration::from_millis(840),
        ..StepTimes::default()
    };
    let first = step(38, 5000.0, train);
    p.observe(&first, t0 + Duration::from_secs(61));
    let second = step(
        39,
        4000.0,
        StepTimes {
            eval: Duration::from_millis(1200),
            checkpoint: Duration::from_millis(310),
            ..train
        },
    );
    let now = t0 + Duration::from_secs(62);
    p.observe(&second, now);
    assert_eq!(
        step_line(&second, &p, now).expect("a step line"),
        "step=40/123 loss=5.940 grad_norm=0.3556 lr=3.04e-4 tokens/s=4000 (ema 4900) world=2 \
         gen=1 elapsed=1m02s eta=3m19s; evaluated and checkpointed: train 0.84s, eval 1.20s, \
         checkpoint 0.31s"
    );
    assert!(step_line(&formed(), &p, now).is_none());
}

#[test]
fn mfu_only_when_the_peak_and_the_model_are_known() {
    let p = Progress {
        flops_per_token: Some(1e9),
        ..Progress::default()
    };
    assert_eq!(p.mfu(1000.0, Some(1e13)), Some(0.1));
    assert_eq!(p.mfu(1000.0, None), None);
    assert_eq!(Progress::default().mfu(1000.0, Some(1e13)), None);
}

#[test]
fn the_summary_counts_tokens_once_and_perplexity_from_the_first_evaluation() {
    let t0 = Instant::now();
    let mut p = Progress {
        tokens_per_step: 4096,
        ..Progress::default()
    };
    p.observe(&formed(), t0);
    let eval = |step, source: &str, perplexity| Log::Eval {
        step,
        source: source.into(),
        perplexity,
        tokens: 100,
    };
    p.observe(&eval(0, "postgres", 2000.0), t0);
    for s in 0..4 {
        p.observe(&step(s, 4096.0, StepTimes::default()), t0);
    }
    // A recovery: steps 2 and 3 are trained again.
    p.observe(
        &Log::Recovery {
            phase: RecoveryPhase::Detected,
            generation: Generation(1),
            took: Duration::ZERO,
            since_detected: Duration::ZERO,
            reason: "worker-1 lost".into(),
            planned: false,
        },
        t0,
    );
    // A re-formation the job chose (standbys joining, a guard's mixture change) is no
    // recovery: three guard rebalances read "recoveries 3" (a new user's walk-through).
    p.observe(
        &Log::Recovery {
            phase: RecoveryPhase::Detected,
            generation: Generation(2),
            took: Duration::ZERO,
            since_detected: Duration::ZERO,
            reason: "the forgetting guard changed the mixture".into(),
            planned: true,
        },
        t0,
    );
    for s in 2..4 {
        p.observe(&step(s, 4096.0, StepTimes::default()), t0);
    }
    p.observe(&eval(4, "postgres", 1500.0), t0);
    p.observe(
        &Log::Completed {
            step: 4,
            dir: "ckpt/step-00000004".into(),
        },
        t0 + Duration::from_secs(6),
    );
    let s = p.summary(t0 + Duration::from_secs(6));
    assert_eq!((s.resumed_at, s.steps_done), (0, 4));
    assert_eq!(s.tokens_trained, 4 * 4096);
    assert_eq!(s.tokens_computed, 6 * 4096);
    assert_eq!(s.wall, Duration::from_secs(6));
    assert_eq!(s.recoveries, 1);
    assert_eq!(s.perplexity[0].percent(), -25.0);
    let text = s.render(None, None);
    assert!(
        text.contains("postgres  2000 -> 1500  (-25.0%, step 0 -> 4)"),
        "{text}"
    );
    assert!(
        text.contains("16,384 (steps 0 to 4); 8,192 more trained again"),
        "{text}"
    );
    assert!(
        text.contains("final checkpoint   ckpt/step-00000004"),
        "{text}"
    );
}

#[test]
fn counts_read_with_separators() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(503_808), "503,808");
    assert_eq!(thousands(1_234_567), "1,234,567");
    assert_eq!(count(1_234_567), "1.235 M");
}
