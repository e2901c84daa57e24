use std::time::{Duration, Instant};

use dapt_proto::rpc::{ErrorCode, Generation, Member, Refusal, StatusReply, WorkerId};

use super::render::{short, ticks};
use super::*;
use crate::control::StepTimes;

const TOKENS: u64 = 4096;

fn step(step: u64, loss: f64, generation: u64, world: u32) -> Log {
    Log::Step {
        step,
        total_steps: 100,
        loss,
        tokens_per_s: 5000.0,
        lr: 3e-4,
        grad_norm: 0.5,
        world,
        generation: Generation(generation),
        eta: Duration::from_secs(60),
        tokens: TOKENS,
        elapsed: Duration::from_millis(800),
        times: StepTimes::default(),
        peak_flops: None,
    }
}

fn formed(generation: u64, ranks: &[&str], resume_step: u64) -> Log {
    Log::Formed {
        generation: Generation(generation),
        world: ranks.len() as u32,
        resume_step,
        ranks: ranks.iter().map(|r| WorkerId(r.to_string())).collect(),
    }
}

fn recovery(phase: RecoveryPhase, since_ms: u64) -> Log {
    Log::Recovery {
        phase,
        generation: Generation(1),
        took: Duration::from_millis(100),
        since_detected: Duration::from_millis(since_ms),
        reason: "worker-1 lost: session timed out".into(),
        planned: false,
    }
}

fn status(phase: &str) -> StatusReply {
    StatusReply {
        job: "quickstart".into(),
        phase: phase.into(),
        generation: 2,
        members: vec![Member {
            worker_id: "worker-0".into(),
            rank: 0,
            collective_endpoint: "127.0.0.1:4000".into(),
            devices: vec!["cpu".into()],
        }],
        step: 12,
        total_steps: 100,
        committed_step: 10,
        ..StatusReply::default()
    }
}

/// A job that formed with two ranks, evaluated at step 0 and 10, committed step 10, lost a
/// worker at step 12 and went on with one from step 10.
fn a_run() -> (Dashboard, Instant) {
    let t0 = Instant::now();
    let mut d = Dashboard::new(TOKENS, 100, t0);
    let p = Progress::default();
    let at = |s: u64| t0 + Duration::from_secs(s);
    d.observe(&formed(1, &["worker-0", "worker-1"], 0), &p, at(1));
    for (source, ppl) in [("postgres", 4000.0), ("sotu", 4200.0)] {
        let eval = Log::Eval {
            step: 0,
            source: source.into(),
            perplexity: ppl,
            tokens: 1000,
        };
        d.observe(&eval, &p, at(2));
    }
    for s in 0..12 {
        d.observe(&step(s, 8.0 - s as f64 * 0.1, 1, 2), &p, at(3 + s));
    }
    for (source, ppl) in [("postgres", 3000.0), ("sotu", 4410.0)] {
        let eval = Log::Eval {
            step: 10,
            source: source.into(),
            perplexity: ppl,
            tokens: 1000,
        };
        d.observe(&eval, &p, at(13));
    }
    d.observe(
        &Log::Committed {
            step: 10,
            dir: "ck/step-00000010".into(),
            digest: "abc".into(),
        },
        &p,
        at(13),
    );
    d.observe(
        &Log::Lost {
            worker: WorkerId("worker-1".into()),
            reason: "session timed out".into(),
        },
        &p,
        at(16),
    );
    d.observe(&recovery(RecoveryPhase::Detected, 0), &p, at(16));
    d.observe(&recovery(RecoveryPhase::Aborted, 300), &p, at(16));
    d.observe(&formed(2, &["worker-0"], 10), &p, at(17));
    d.observe(&recovery(RecoveryPhase::Reformed, 1000), &p, at(17));
    d.observe(&recovery(RecoveryPhase::Resumed, 1500), &p, at(17));
    d.observe(
        &Log::Refused {
            worker: WorkerId("worker-1".into()),
            refusal: Refusal::new(ErrorCode::StaleGeneration, "generation 1 is over"),
        },
        &p,
        at(18),
    );
    // Steps 10 and 11 are trained again, by one rank.
    d.observe(&step(10, 7.5, 2, 1), &p, at(19));
    d.observe(&step(11, 7.4, 2, 1), &p, at(20));
    (d, at(21))
}

#[test]
fn the_view_has_the_series_the_generations_and_the_recovery_phase_by_phase() {
    let (d, now) = a_run();
    let v = d.view(&status("running"), now);
    assert_eq!(v.step, 12);
    assert_eq!(v.tokens_trained, 12 * TOKENS);
    assert_eq!(v.total_tokens, 100 * TOKENS);
    // Steps 10 and 11 trained again replace the first ones: one point per step.
    assert_eq!(v.series.loss.len(), 12);
    assert_eq!(v.series.loss[11].x, (12 * TOKENS) as f64);
    assert_eq!(v.series.loss[11].y, 7.4);
    assert!(v.series.mfu.is_empty(), "no device peak, no MFU");
    assert_eq!(v.latest.map(|l| l.world), Some(1));

    let postgres = &v.perplexity[0];
    assert_eq!(postgres.source, "postgres");
    assert_eq!(postgres.base.step, 0);
    assert_eq!(postgres.latest.tokens, 10 * TOKENS);
    assert!((postgres.change_pct - -25.0).abs() < 1e-9);
    assert!((v.perplexity[1].change_pct - 5.0).abs() < 1e-9);

    let g = &v.generations.items;
    assert_eq!(g.len(), 2);
    assert_eq!((g[0].generation, g[0].world), (1, 2));
    assert_eq!(g[0].until_s, Some(17.0), "ends when the next forms");
    assert_eq!((g[1].generation, g[1].world, g[1].resume_step), (2, 1, 10));
    assert_eq!(g[1].until_s, None);

    assert_eq!(v.recoveries.total, 1);
    let r = &v.recoveries.items[0];
    let phases: Vec<&str> = r.phases.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(phases, ["detected", "aborted", "re-formed", "resumed"]);
    assert_eq!(r.phases[3].since_detected_ms, 1500);
    assert_eq!(v.lost.items[0].worker, "worker-1");
    assert_eq!(v.refusals.items[0].code, "ERROR_CODE_STALE_GENERATION");
    assert_eq!(v.checkpoints.items[0].tokens, 10 * TOKENS);
}

#[test]
fn the_json_leaves_out_the_guard_and_the_stalls_until_there_are_some() {
    let (mut d, now) = a_run();
    let json = serde_json::to_value(d.view(&status("running"), now)).expect("json");
    assert!(json.get("guard").is_none() && json.get("stalls").is_none());
    let page = render_page(&d.view(&status("running"), now));
    assert!(!page.contains("id=\"guard\"") && !page.contains("id=\"stalls\""));

    d.set_guard(serde_json::json!({"action": "warn", "sources": [{"source": "sotu", "limit_pct": 5.0, "change_pct": 5.2}]}));
    d.push_stall(serde_json::json!({"step": 12, "rank": 1, "phase": "collective"}));
    let view = d.view(&status("running"), now);
    let json = serde_json::to_value(&view).expect("json");
    assert_eq!(json["guard"]["action"], "warn");
    assert_eq!(json["stalls"]["items"][0]["phase"], "collective");
    let page = render_page(&view);
    assert!(page.contains("<section id=\"guard\">"), "{page}");
    assert!(page.contains("<th>limit_pct</th>") && page.contains("<td>5.200</td>"));
    assert!(page.contains("<section id=\"stalls\">") && page.contains("<td>collective</td>"));
}

#[test]
fn the_page_draws_every_point_and_the_timeline() {
    let (d, now) = a_run();
    let page = render_page(&d.view(&status("running"), now));
    assert!(
        page.contains("data-series=\"loss\" data-points=\"12\""),
        "{page}"
    );
    let loss = page
        .split("data-series=\"loss\"")
        .nth(1)
        .and_then(|s| s.split("points=\"").nth(2))
        .and_then(|s| s.split('"').next())
        .expect("the loss line's points");
    assert_eq!(loss.split(' ').count(), 12);
    for source in ["postgres", "sotu"] {
        assert!(page.contains(&format!("data-series=\"{source}\" data-points=\"2\"")));
        assert!(page.contains(&format!("data-ref=\"{source} step 0\"")));
    }
    assert!(page.contains("<td class=\"down\">-25.0%</td>"));
    assert!(page.contains("<td class=\"up\">+5.0%</td>"));
    assert!(page.contains("data-generation=\"1\" data-world=\"2\""));
    assert!(page.contains("data-generation=\"2\" data-world=\"1\""));
    for phase in ["detected", "aborted", "re-formed", "resumed"] {
        assert!(page.contains(&format!("<line class=\"phase\" data-phase=\"{phase}\"")));
    }
    assert!(page.contains("class=\"lost\" data-worker=\"worker-1\""));
    assert!(page.contains("class=\"refusal\" data-code=\"ERROR_CODE_STALE_GENERATION\""));
    assert!(page.contains("ck/step-00000010"));
    // Nothing from elsewhere.
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
}

#[test]
fn text_from_workers_is_escaped() {
    let t0 = Instant::now();
    let mut d = Dashboard::new(TOKENS, 10, t0);
    let p = Progress::default();
    let evil = "<script>alert('x')</script>\"&";
    d.observe(
        &Log::Refused {
            worker: WorkerId(evil.into()),
            refusal: Refusal::new(ErrorCode::WrongToken, evil),
        },
        &p,
        t0,
    );
    d.observe(&formed(1, &[evil], 0), &p, t0);
    let mut s = status("forming");
    s.members[0].worker_id = evil.into();
    s.reason = evil.into();
    let page = render_page(&d.view(&s, t0));
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"));
    assert_eq!(escape("a<b"), "a&lt;b");
}

#[test]
fn memory_stays_bounded_over_a_long_chaotic_run() {
    let t0 = Instant::now();
    let mut d = Dashboard::new(TOKENS, 1_000_000, t0);
    let p = Progress::default();
    for s in 0..200_000u64 {
        d.observe(&step(s, 3.0, 1, 2), &p, t0);
        if s % 1000 == 0 {
            d.observe(&formed(s / 1000 + 1, &["a", "b"], s), &p, t0);
            d.observe(&recovery(RecoveryPhase::Detected, 0), &p, t0);
            let eval = Log::Eval {
                step: s,
                source: "postgres".into(),
                perplexity: 10.0,
                tokens: 1,
            };
            d.observe(&eval, &p, t0);
        }
    }
    let v = d.view(&status("running"), t0);
    assert!(v.series.loss.len() <= POINTS && v.series.loss.len() >= POINTS / 2);
    assert!(v.perplexity[0].points.len() <= EVAL_POINTS);
    assert_eq!(v.generations.items.len(), KEEP);
    assert_eq!(v.generations.total, 200);
    assert_eq!(v.recoveries.items.len(), KEEP);
    let json = serde_json::to_string(&v).expect("json");
    assert!(json.len() < 400_000, "{} bytes", json.len());
}

#[test]
fn ticks_are_round_and_labels_short() {
    assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    assert_eq!(ticks(0.13, 0.61, 5), vec![0.2, 0.3, 0.4, 0.5, 0.6]);
    assert!(ticks(1.0, 1.0, 5).is_empty());
    assert_eq!(short(503_808.0), "503.8k");
    assert_eq!(short(2_500_000.0), "2.5M");
    assert_eq!(short(0.25), "0.25");
    assert_eq!(short(3e-4), "3.0e-4");
    assert_eq!(short(4214.0), "4214");
}
