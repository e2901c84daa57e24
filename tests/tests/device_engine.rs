//! The GPU's engine through the worker agent, without a GPU: `DAPT_ENGINE=resident` runs the
//! device-resident engine that a `--device cuda` rank runs (master weights and AdamW state as
//! backend tensors, gradients through a reducer between the halves of the step, checkpoints and
//! weight digests from one host copy) on the CPU backend, with the TCP ring as its reducer where
//! a GPU rank has NCCL. What these tests cannot reach is CUDA and NCCL themselves (docs/gpu.md).

use std::process::Command;

use dapt_tests::{
    check_ledger, coordinator_with, events, f32_tensors, finite_weights, losses, random_step,
    serial, write_job, Job, Proc, BATCH, LONG,
};

const ON_CPU: &str = "the resident (GPU) engine on the cpu";

fn launch(job: &Job, workers: u32, engine: &str) -> Proc {
    let mut cmd = Command::new(dapt_tests::binary("dapt"));
    cmd.args(["--log-format", "json", "launch"])
        .arg(&job.path)
        .args(["--workers", &workers.to_string()])
        .env("DAPT_ENGINE", engine);
    Proc::spawn(cmd)
}

/// How many of `dapt launch`'s workers (their logs) said they run the resident engine.
fn on_cpu(job: &Job) -> usize {
    std::fs::read_dir(job.checkpoints.join("logs"))
        .expect("worker logs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|log| log.contains(ON_CPU))
        .count()
}

#[test]
fn the_resident_engine_trains_through_the_agent_like_the_host_trainer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = write_job(dir.path(), "host", 12, "");
    let resident = write_job(dir.path(), "resident", 12, "");
    let _serial = serial();
    let run = |job: &Job, engine: &str| {
        let mut proc = launch(job, 2, engine);
        let (status, stdout) = proc.finish(LONG);
        assert!(status.success(), "{status}\n{stdout}\n{}", proc.stderr());
        proc.lines()
    };
    let a = run(&host, "host");
    let b = run(&resident, "resident");
    assert_eq!(on_cpu(&host), 0);
    assert_eq!(on_cpu(&resident), 2, "both workers run the resident engine");

    let formed = events(&b, "generation formed");
    assert_eq!(formed.len(), 1);
    assert_eq!(formed[0]["world"], 2);
    // A commit needs both ranks' weight digests to agree: the ring reduced the same mean into
    // both resident engines, step after step.
    let commits: Vec<u64> = events(&b, "checkpoint committed")
        .iter()
        .map(|c| c["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(commits, vec![5, 10, 12]);
    assert!(events(&b, "ranks' weights differ: the checkpoint is not committed").is_empty());
    let ledger =
        check_ledger(&resident.checkpoints.join("ledger.jsonl"), 12 * BATCH).expect("ledger");
    assert_eq!(ledger.len(), 24, "two ranks per step");

    // The same numbers as the host trainer's, up to f32 summation order.
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 12);
    assert_eq!(lb.len(), 12);
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        println!("step {s}: host {x:.6}, resident {y:.6}");
        assert!((x - y).abs() < 1e-4 * x.abs(), "step {s}: {x} vs {y}");
    }
    assert!(lb[11].1 < lb[0].1 - 0.3, "loss did not fall: {lb:?}");
    let wa = f32_tensors(&host.checkpoints.join("export/model.safetensors")).expect("host");
    let wb = f32_tensors(&resident.checkpoints.join("export/model.safetensors")).expect("res");
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    let (mut worst, mut scale) = (0f32, 0f32);
    for (name, x) in &wa {
        let y = &wb[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
            scale = scale.max(p.abs());
        }
    }
    println!("final weights: max |host - resident| {worst:e}, max |w| {scale}");
    assert!(
        worst < 1e-5 * scale,
        "weights differ by {worst} (scale {scale})"
    );
}

#[test]
fn a_killed_resident_rank_is_recovered_from_and_the_job_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 40;
    let mut c = coordinator_with(
        dir.path(),
        "kill",
        steps,
        "cluster:\n  min_workers: 1\n  max_workers: 2\n  session_timeout_ms: 2000\n  formation_grace_ms: 10000\n",
        "127.0.0.1",
        &[("DAPT_ENGINE", "resident")],
    );
    let mut w0 = c.member("w0");
    let w1 = c.member("w1");
    w0.wait_for("the resident engine", LONG, |l| {
        !events(l, ON_CPU).is_empty()
    });
    let kill_at = random_step(3, 20);
    let _w1_again = c.kill_and_restart(w1, "w1", kill_at);
    let lines = c.complete();

    let worlds: Vec<u64> = events(&lines, "generation formed")
        .iter()
        .map(|f| f["world"].as_u64().expect("world"))
        .collect();
    println!("generations: {worlds:?}");
    assert_eq!(worlds[0], 2);
    assert!(
        worlds.contains(&1),
        "re-formed with the survivor: {worlds:?}"
    );
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
    // Steps trained again after the rollback repeat their loss: the resident engine restored
    // from the committed checkpoint is the state it had.
    let mut seen = std::collections::BTreeMap::<u64, Vec<f64>>::new();
    for (s, l) in losses(&lines) {
        seen.entry(s).or_default().push(l);
    }
    let retrained = seen.values().filter(|v| v.len() > 1).count();
    println!("killed after step {kill_at}; {retrained} steps trained twice");
    for (s, v) in &seen {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        assert!(hi - lo <= 1e-3 * hi.abs().max(1.0), "step {s}: {v:?}");
    }
    let last = c
        .job
        .checkpoints
        .join(format!("step-{steps:08}/model.safetensors"));
    finite_weights(&last).expect("finite");
}
