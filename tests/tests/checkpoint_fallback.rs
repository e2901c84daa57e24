//! Issue 14, item 7: a committed checkpoint that rots is fallen back from, under either
//! membership, whenever it is found out: mid-run (a rank of a re-formed generation fails
//! loading it) and under etcd when a coordinator takes over. The job goes on from the previous
//! kept checkpoint that verifies, says so in the log, trains the steps after it again, and
//! every sample is still committed exactly once. (At a coordinator's start with embedded
//! membership, `files_safety.rs` tests it.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dapt_proto::job::EtcdSpec;
use dapt_tests::{check_entries, coordinator, events, serial, Cluster, Etcd, Proc, BATCH, LONG};

const STEPS: u64 = 30;

fn cluster(etcd: Option<&Etcd>) -> String {
    let mut c = "cluster:\n  min_workers: 1\n  max_workers: 1\n  session_timeout_ms: 2000\n  formation_grace_ms: 300\n".to_string();
    if let Some(etcd) = etcd {
        c.push_str(&format!(
            "  etcd:\n    endpoints: [\"{}\"]\n    prefix: /rot\n    lease_ttl_s: 2\n",
            etcd.url
        ));
    }
    c
}

/// Waits until some coordinator line says a commit at `step` or later; returns its directory.
fn committed(c: &mut Proc, step: u64) -> PathBuf {
    c.wait_for(&format!("a commit at step {step}"), LONG, |l| {
        events(l, "checkpoint committed")
            .iter()
            .any(|f| f["step"].as_u64() >= Some(step))
    });
    let last = events(&c.lines(), "checkpoint committed")
        .last()
        .cloned()
        .expect("a commit");
    PathBuf::from(last["checkpoint"].as_str().expect("checkpoint"))
}

/// Flips one byte in the middle of the checkpoint's weights (size and mtime kept: rot).
fn rot(dir: &Path) {
    rot_file(&dir.join("model.safetensors"));
}

/// Flips one byte in the middle of `path`.
fn rot_file(path: &Path) {
    let mut bytes = std::fs::read(path).expect("weights");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(path, bytes).expect("rewrite");
    println!("rotted {}", path.display());
}

/// The ledger, from etcd or from the checkpoint directory, checked to be exact.
fn exact_ledger(c: &Cluster, etcd: Option<&Etcd>) {
    let entries: Vec<(u64, u64, u64)> = match etcd {
        Some(etcd) => {
            let spec = EtcdSpec {
                endpoints: vec![etcd.url.clone()],
                prefix: "/rot".into(),
                lease_ttl_s: 2,
                user: None,
                password_env: None,
                tls: None,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(dapt_coordinator::etcd::ledger(&spec, &c.job_name()))
                .expect("ledger")
                .iter()
                .map(|e| (e.step, e.start, e.end))
                .collect()
        }
        None => {
            dapt_tests::check_ledger(&c.job.checkpoints.join("ledger.jsonl"), STEPS * BATCH)
                .expect("ledger");
            return;
        }
    };
    check_entries(entries, STEPS * BATCH).expect("every sample once");
}

fn said_fallback(lines: &[serde_json::Value], corrupt: &Path) {
    let fell = events(
        lines,
        "falling back to the previous kept checkpoint; the steps after it are trained again",
    );
    assert!(
        fell.iter().any(|f| f["corrupt_step"].as_u64().is_some()),
        "no fallback from {} in the log",
        corrupt.display()
    );
}

/// Mid-run: the only worker dies after a commit, the committed checkpoint rots, and the next
/// worker's generation fails loading it. Before the fallback the job failed after four
/// generations in a row failed on the same file.
fn rot_mid_run(etcd: Option<&Etcd>, name: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = coordinator(dir.path(), name, STEPS, &cluster(etcd));
    let w0 = c.member("w0");
    let corrupt = committed(&mut c.coordinator, 10);
    w0.signal(libc::SIGKILL);
    drop(w0);
    // Give the coordinator the loss first (steps stop; the commit stays the newest).
    std::thread::sleep(Duration::from_millis(500));
    rot(&corrupt);
    let mut w1 = c.member("w1");
    let lines = c.complete();
    said_fallback(&lines, &corrupt);
    let (status, _) = w1.finish(LONG);
    assert!(status.success(), "{}", w1.stderr());
    exact_ledger(&c, etcd);
}

#[test]
fn a_checkpoint_that_rots_mid_run_is_fallen_back_from() {
    let _serial = serial();
    rot_mid_run(None, "rot-files");
}

#[test]
fn a_checkpoint_that_rots_mid_run_under_etcd_is_fallen_back_from() {
    let _serial = serial();
    let etcd = Etcd::start();
    rot_mid_run(Some(&etcd), "rot-etcd");
}

/// Every kept checkpoint rots: nothing to fall back to. The job fails at once, naming the
/// corrupt checkpoint, on the first generation that meets it; before, four generations in a
/// row failed on the same verified-corrupt files before the job did.
#[test]
fn a_rotten_checkpoint_with_nothing_to_fall_back_to_fails_the_job_at_once() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = coordinator(dir.path(), "rot-all", STEPS, &cluster(None));
    let w0 = c.member("w0");
    let corrupt = committed(&mut c.coordinator, 10);
    w0.signal(libc::SIGKILL);
    drop(w0);
    std::thread::sleep(Duration::from_millis(500));
    let kept: Vec<PathBuf> = std::fs::read_dir(&c.job.checkpoints)
        .expect("checkpoints")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    assert!(kept.contains(&corrupt), "{kept:?}");
    for dir in &kept {
        rot(dir);
    }
    let _w1 = c.member("w1");
    c.coordinator.wait_for("the job to fail", LONG, |l| {
        !events(l, "job failed").is_empty()
    });
    let lines = c.coordinator.lines();
    let failed = &events(&lines, "job failed")[0];
    let reason = failed["reason"].as_str().expect("reason");
    assert!(
        reason.contains("no earlier kept checkpoint verifies")
            && reason.contains(&corrupt.display().to_string()),
        "{reason}"
    );
    let resumed = events(&lines, "generation formed")
        .iter()
        .filter(|f| f["resume_step"].as_u64() >= Some(10))
        .count();
    assert_eq!(resumed, 1, "generations formed on the corrupt checkpoint");
}

/// A ZeRO job's optimizer shard rots: the ranks of the next generation fail loading it, and the
/// job falls back to the previous kept checkpoint as for the weights.
#[test]
fn a_zero_shard_that_rots_mid_run_is_fallen_back_from() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let two = cluster(None)
        .replace("max_workers: 1", "max_workers: 2")
        .replace("min_workers: 1", "min_workers: 2");
    let mut c = dapt_tests::coordinator_edited(
        dir.path(),
        "rot-zero",
        STEPS,
        &two,
        "127.0.0.1",
        &[],
        &|y| y.replacen("training:\n", "training:\n  zero_stage: 1\n", 1),
    );
    let w0 = c.member("w0");
    let w1 = c.member("w1");
    let corrupt = committed(&mut c.coordinator, 10);
    w0.signal(libc::SIGKILL);
    w1.signal(libc::SIGKILL);
    drop((w0, w1));
    std::thread::sleep(Duration::from_millis(500));
    rot_file(&corrupt.join("optimizer-00001-of-00002.safetensors"));
    let mut w2 = c.member("w2");
    let mut w3 = c.member("w3");
    let lines = c.complete();
    said_fallback(&lines, &corrupt);
    for w in [&mut w2, &mut w3] {
        let (status, _) = w.finish(LONG);
        assert!(status.success(), "{}", w.stderr());
    }
    exact_ledger(&c, None);
}

/// Under etcd the committed step lives in etcd: a coordinator that takes over (here, the next
/// one after both coordinator and worker died) verifies the committed checkpoint and falls
/// back, recording the fallback in etcd with the ledger cut back, before any generation.
#[test]
fn a_corrupt_checkpoint_under_etcd_is_fallen_back_from_when_a_coordinator_takes_over() {
    let _serial = serial();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = coordinator(dir.path(), "rot-start", STEPS, &cluster(Some(&etcd)));
    let w0 = c.member("w0");
    committed(&mut c.coordinator, 10);
    // The log says a commit before the committer task has recorded it in etcd: wait until etcd
    // holds one past the first kept checkpoint, or the one to rot would have no earlier one to
    // fall back to (it failed so on a loaded machine: etcd still held step 5).
    let deadline = Instant::now() + LONG;
    while newest_recorded(&etcd, "rot-start").is_none_or(|d| d.ends_with("step-00000005")) {
        assert!(
            Instant::now() < deadline,
            "etcd never recorded a commit past step 5"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.coordinator.signal(libc::SIGKILL);
    w0.signal(libc::SIGKILL);
    drop(w0);
    let _ = c.coordinator.finish(LONG);
    // What the next coordinator resumes from: the newest commit etcd recorded (the one logged
    // last may still have been on its way to etcd when the coordinator was killed).
    let recorded = newest_recorded(&etcd, "rot-start").expect("a commit recorded in etcd");
    rot(&recorded);
    let (proc, url) = dapt_tests::standby(&c);
    c.coordinator = proc;
    c.url = url;
    let mut w1 = c.member("w1");
    let lines = c.complete();
    said_fallback(&lines, &recorded);
    let (status, _) = w1.finish(LONG);
    assert!(status.success(), "{}", w1.stderr());
    exact_ledger(&c, Some(&etcd));
}

/// The checkpoint directory of the commit etcd holds for `job`.
fn newest_recorded(etcd: &Etcd, job: &str) -> Option<PathBuf> {
    let key = dapt_proto::job::keys::committed("/rot", job);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([etcd.url.as_str()], None)
            .await
            .ok()?;
        let response = client.get(key, None).await.ok()?;
        let value: serde_json::Value =
            serde_json::from_slice(response.kvs().first()?.value()).ok()?;
        Some(PathBuf::from(value["dir"].as_str()?))
    })
}
