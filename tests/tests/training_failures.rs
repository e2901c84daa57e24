//! A training thread that fails, by an error or a panic, is reported and ends in a recovery or
//! a failed job with the reason, within seconds (issue 14, item 9; the reproduction of
//! `cases/security/09b_panic_in_training_thread_hangs_job.sh`), over the real binaries.

use std::time::{Duration, Instant};

use dapt_tests::{coordinator, events, serial, LONG};

/// Token ids past the vocabulary in every training shard, written with the shards' mtimes kept
/// so that the verification cache lets them through: the worker must fail naming the shard
/// (not panic on an index), and the coordinator must fail the job with that reason.
#[test]
fn out_of_range_token_ids_fail_the_job_naming_the_shard() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let cluster_yaml = "cluster:\n  collective_timeout_s: 10\n";
    let mut cluster = coordinator(tmp.path(), "badids", 20, cluster_yaml);
    let corpus = tmp.path().join("corpus");
    // A re-open checks the corpus in full and records each shard's size and mtime in the
    // verification cache, which then trusts them: now damage the shards, mtimes kept.
    let out = dapt_tests::dapt(&[
        "prepare",
        "--quiet",
        cluster.job.path.to_str().expect("utf-8"),
    ]);
    assert!(dapt_tests::text(&out.stdout).contains("up to date"));
    for source in ["postgres", "sotu"] {
        for e in std::fs::read_dir(corpus.join(source))
            .expect("ls")
            .flatten()
        {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("train-") && name.ends_with(".tok")) {
                continue;
            }
            let mtime = std::fs::metadata(&path)
                .expect("meta")
                .modified()
                .expect("mtime");
            let mut bytes = std::fs::read(&path).expect("read");
            for b in bytes.iter_mut().skip(1).step_by(2) {
                *b = 0xF0; // every u16 id >= 61440, past the vocabulary of 512
            }
            std::fs::write(&path, bytes).expect("write");
            std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open")
                .set_modified(mtime)
                .expect("keep mtime");
        }
    }
    let started = Instant::now();
    let _w0 = cluster.member("w0");
    let _w1 = cluster.member("w1");
    cluster.coordinator.wait_for("the job to fail", LONG, |l| {
        !events(l, "job failed").is_empty()
    });
    let took = started.elapsed();
    let failed = cluster.coordinator.events("job failed");
    let reason = failed[0]["reason"].as_str().expect("reason").to_string();
    assert!(
        reason.contains("train-00000.tok") && reason.contains("vocabulary"),
        "{reason}"
    );
    let (status, _) = cluster.coordinator.finish(LONG);
    assert!(!status.success());
    println!("the job failed {took:?} after the workers started: {reason}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

/// A panic on one worker's training thread (the test hook `DAPT_FAULT_PANIC_AT_STEP`) is
/// reported as that rank's failure with the panic's message: the coordinator starts a recovery
/// at once, and fails the job when every new generation panics again.
#[test]
fn a_panic_on_the_training_thread_is_reported_and_recovered_from() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut cluster = coordinator(tmp.path(), "panics", 20, "");
    let _w0 = cluster.member("w0");
    let mut cmd = std::process::Command::new(dapt_tests::binary("dapt-worker"));
    cmd.args([
        "--log-format",
        "json",
        "--coordinator",
        &cluster.url,
        "--id",
        "w1",
    ])
    .env("DAPT_JOB", cluster.job_name())
    .env("DAPT_TOKEN", &cluster.token)
    .env("RAYON_NUM_THREADS", "1")
    .env("DAPT_FAULT_PANIC_AT_STEP", "2");
    let _w1 = dapt_tests::Proc::spawn(cmd);
    cluster.wait_step(1);
    let at = Instant::now();
    // w1's report, or w0's that its ring closed (then w1's follows as the recovery's cause).
    let panicked = |r: &serde_json::Value| {
        r["reason"].as_str().is_some_and(|r| {
            r.contains("w1 failed: the training thread panicked")
                && r.contains("DAPT_FAULT_PANIC_AT_STEP")
        })
    };
    cluster
        .coordinator
        .wait_for("a recovery for the panic", LONG, |l| {
            events(l, "recovery")
                .iter()
                .chain(&events(l, "recovery cause"))
                .any(panicked)
        });
    let detected = at.elapsed();
    println!("the panic was reported {detected:?} after step 1");
    assert!(detected < Duration::from_secs(10), "{detected:?}");
    // Every generation with w1 panics at step 2 again: the job fails, saying why.
    cluster.coordinator.wait_for("the job to fail", LONG, |l| {
        !events(l, "job failed").is_empty()
    });
    let failed = cluster.coordinator.events("job failed");
    assert!(
        failed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicked")),
        "{failed:?}"
    );
    let (status, _) = cluster.coordinator.finish(LONG);
    assert!(!status.success());
}
