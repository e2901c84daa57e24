//! etcd membership over the real binaries and a real etcd (Debian's `etcd-server`, started per
//! test on free ports): a hung worker is dropped when its lease expires, a worker stopped with
//! SIGTERM leaves at once (also while it joins a lost coordinator again), a standby coordinator takes over from a killed leader while the
//! workers keep training, an etcd outage longer than the lease is ridden out without a
//! re-formation or a second leader, and two jobs share one etcd without seeing each other.

use std::process::Command;
use std::time::{Duration, Instant};

use dapt_coordinator::control::{Committed, LedgerEntry};
use dapt_coordinator::etcd::EtcdStore;
use dapt_proto::identity::JobIdentity;
use dapt_proto::job::{keys, EtcdSpec, JobSpec};
use dapt_tests::{
    binary, check_entries, coordinator, events, free_port, random_step, serial, standby, text,
    write_job, Cluster, Etcd, Proc, BATCH, LONG,
};

const TTL_S: u64 = 2;

fn cluster_yaml(etcd: &Etcd, session_timeout_ms: u64) -> String {
    format!(
        "cluster:\n  min_workers: 1\n  max_workers: 2\n  session_timeout_ms: {session_timeout_ms}\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: /dapt-test\n    lease_ttl_s: {TTL_S}\n",
        etcd.url
    )
}

fn spec(etcd: &Etcd) -> EtcdSpec {
    EtcdSpec {
        endpoints: vec![etcd.url.clone()],
        prefix: "/dapt-test".into(),
        lease_ttl_s: TTL_S,
        user: None,
        password_env: None,
        tls: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The job's ledger in etcd covers every sample of `steps` steps exactly once.
fn check_etcd_ledger(etcd: &Etcd, job: &str, steps: u64) {
    let entries = runtime()
        .block_on(dapt_coordinator::etcd::ledger(&spec(etcd), job))
        .expect("ledger");
    let entries = entries.iter().map(|e| (e.step, e.start, e.end)).collect();
    check_entries(entries, steps * BATCH).expect("ledger covers every sample once");
}

/// Whether worker `id`'s membership key exists.
fn registered(etcd: &Etcd, job: &str, id: &str) -> bool {
    runtime().block_on(async {
        let mut client = dapt_proto::etcd::connect(&spec(etcd), Duration::from_secs(5))
            .await
            .expect("etcd");
        let key = dapt_proto::job::keys::member("/dapt-test", job, id);
        !client.get(key, None).await.expect("get").kvs().is_empty()
    })
}

fn detected(lines: &[serde_json::Value]) -> Vec<serde_json::Value> {
    events(lines, "recovery")
        .into_iter()
        .filter(|f| f["phase"] == "detected")
        .collect()
}

#[test]
fn a_hung_worker_loses_its_lease_and_the_job_re_forms_within_the_ttl() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    // A session timeout far beyond the lease: only the lease can notice a hung worker.
    let mut c = coordinator(dir.path(), "hung", 40, &cluster_yaml(&etcd, 120_000));
    let _w0 = c.member("w0");
    let w1 = c.member("w1");
    c.wait_step(random_step(3, 15));
    assert!(registered(&etcd, "hung", "w1"));
    w1.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    c.coordinator
        .wait_for("the loss to be detected", LONG, |l| !detected(l).is_empty());
    let detection = stopped.elapsed();
    println!("hung worker detected after {detection:?} (lease TTL {TTL_S} s)");
    assert!(
        detection < Duration::from_millis(TTL_S * 1000 + 1500),
        "{detection:?}"
    );
    let lines = c.coordinator.lines();
    let reason = detected(&lines)[0]["reason"].to_string();
    assert!(reason.contains("lease"), "{reason}");
    w1.signal(libc::SIGKILL);
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    let worlds: Vec<u64> = events(&c.coordinator.lines(), "generation formed")
        .iter()
        .map(|f| f["world"].as_u64().expect("world"))
        .collect();
    assert_eq!(worlds, vec![2, 1]);
    check_etcd_ledger(&etcd, "hung", 40);
}

#[test]
fn a_worker_stopped_with_sigterm_revokes_its_lease_at_once() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut c = coordinator(dir.path(), "term", 40, &cluster_yaml(&etcd, 120_000));
    let _w0 = c.member("w0");
    let mut w1 = c.member("w1");
    c.wait_step(3);
    let sent = Instant::now();
    w1.signal(libc::SIGTERM);
    let (status, _) = w1.finish(LONG);
    assert_eq!(status.code(), Some(130), "{}", w1.stderr());
    assert!(!registered(&etcd, "term", "w1"), "lease not revoked");
    c.coordinator
        .wait_for("the loss to be detected", LONG, |l| !detected(l).is_empty());
    let took = sent.elapsed();
    println!("SIGTERM to detected: {took:?}");
    assert!(took < Duration::from_secs(TTL_S), "{took:?}");
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success());
    check_etcd_ledger(&etcd, "term", 40);
}

#[test]
fn a_standby_takes_over_from_a_killed_leader_and_training_goes_on() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    // Steps take ~55 ms here; the kill comes late enough that a replay of every report since the
    // generation began would be longer than the kill step.
    let steps = 300;
    let mut leader = coordinator(dir.path(), "failover", steps, &cluster_yaml(&etcd, 5_000));
    leader.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let port = free_port();
    let mut standby = {
        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["--log-format", "json", "coordinator"])
            .arg(&leader.job.path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("DAPT_TOKEN", &leader.token);
        Proc::spawn(cmd)
    };
    standby.wait_for("the standby to wait", LONG, |l| {
        !events(l, "standby: another coordinator leads").is_empty()
    });
    // A standby does not answer `dapt status` (Kubernetes' readiness probe relies on it), and
    // the command says so instead of hanging.
    let asked = Instant::now();
    let out = Command::new(binary("dapt"))
        .args(["status", &format!("http://127.0.0.1:{port}")])
        .env("DAPT_TOKEN", &leader.token)
        .output()
        .expect("dapt status");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("answers only once it leads"),
        "{}",
        text(&out.stderr)
    );
    assert!(asked.elapsed() < Duration::from_secs(20));
    let mut w0 = leader.member("w0");
    let mut w1 = leader.member("w1");
    let kill_at = random_step(100, 160);
    leader.wait_step(kill_at);
    leader.coordinator.signal(libc::SIGKILL);
    let killed = Instant::now();
    standby.wait_for("the standby to lead", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let leads = killed.elapsed();
    standby.wait_for("the ranks to re-attach", LONG, |l| {
        !events(l, "ranks re-attached").is_empty()
    });
    let reattached = killed.elapsed();
    // What the workers replayed is what the last durable commit did not cover, not the whole
    // generation.
    for w in [&mut w0, &mut w1] {
        // The worker logs it once its replay went out: possibly after the coordinator's line.
        w.wait_for("the worker's re-attached line", LONG, |l| {
            !events(l, "re-attached").is_empty()
        });
        let replayed: Vec<u64> = w
            .events("re-attached")
            .iter()
            .filter_map(|f| f["replayed"].as_u64())
            .collect();
        assert_eq!(replayed.len(), 1, "{}", w.stderr());
        assert!(replayed[0] < kill_at, "replayed {} reports", replayed[0]);
        println!(
            "replayed {} reports (killed at step {kill_at})",
            replayed[0]
        );
    }
    println!("leader killed at step {kill_at}: standby leads after {leads:?}, ranks re-attached after {reattached:?}");
    assert!(
        leads < Duration::from_millis(TTL_S * 1000 + 1500),
        "{leads:?}"
    );
    let (status, _) = standby.finish(LONG);
    assert!(status.success(), "{}", standby.stderr());
    let lines = standby.lines();
    assert!(
        events(&lines, "generation formed").is_empty(),
        "the standby re-formed the job instead of taking it over"
    );
    assert!(events(&lines, "recovery").is_empty());
    let steps_seen: Vec<u64> = events(&lines, "step")
        .iter()
        .map(|f| f["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps_seen.last(), Some(&(steps - 1)));
    check_etcd_ledger(&etcd, "failover", steps);
}

fn last_step(c: &Cluster) -> Option<u64> {
    events(&c.coordinator.lines(), "step")
        .iter()
        .filter_map(|f| f["step"].as_u64())
        .max()
}

#[test]
fn an_etcd_outage_longer_than_the_lease_is_ridden_out() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    // Steps take ~55 ms here: enough of them to outlast the outage and the wait after it.
    let steps = 400;
    let mut c = coordinator(dir.path(), "outage", steps, &cluster_yaml(&etcd, 5_000));
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let (standby, _) = standby(&c);
    let _w0 = c.member("w0");
    let _w1 = c.member("w1");
    c.wait_step(random_step(3, 15));
    etcd.stop();
    let before = last_step(&c).expect("steps");
    // More than twice the lease TTL, and many steps.
    let outage = Duration::from_secs(2 * TTL_S + 1);
    std::thread::sleep(outage);
    let during = last_step(&c).expect("steps");
    etcd.restart();
    println!("etcd down for {outage:?}: steps {before} -> {during} meanwhile");
    assert!(during > before, "training stalled while etcd was down");
    // Past the leases' TTL after the restart: nobody lost a lease, the standby still waits.
    std::thread::sleep(Duration::from_secs(2 * TTL_S));
    let leader_running = last_step(&c) < Some(steps - 1);
    if leader_running {
        assert!(
            standby.events("leading the job").is_empty(),
            "a second coordinator leads while the first still does"
        );
    }
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    let lines = c.coordinator.lines();
    assert_eq!(
        events(&lines, "generation formed").len(),
        1,
        "the outage re-formed the job"
    );
    assert!(events(&lines, "recovery").is_empty());
    assert!(events(&lines, "lost the etcd leadership: stepping down").is_empty());
    // Commits made during the outage were queued and recorded once etcd was back.
    assert!(!events(
        &lines,
        "etcd answers again: the queued commits are recorded"
    )
    .is_empty());
    check_etcd_ledger(&etcd, "outage", steps);
}

/// One rank's samples of `step` in a two-rank job ([`BATCH`] samples a step, ranks' halves).
fn entry(step: u64, rank: u32) -> LedgerEntry {
    let half = BATCH / 2;
    let start = step * BATCH + u64::from(rank) * half;
    LedgerEntry {
        step,
        generation: 1,
        rank,
        start,
        end: if rank == 0 {
            start + half
        } else {
            (step + 1) * BATCH
        },
    }
}

fn entries(steps: std::ops::Range<u64>) -> Vec<LedgerEntry> {
    steps.flat_map(|s| [entry(s, 0), entry(s, 1)]).collect()
}

fn committed(step: u64) -> Committed {
    Committed {
        step,
        dir: format!("step-{step:08}"),
        generation: 1,
        ..Committed::default()
    }
}

/// A commit etcd applied but whose answer was lost (etcd restarting under it) is sent again
/// merged with the next one, as the committer does: each step stays in the ledger once. The
/// ledger kept each commit's entries under the commit's step, so the resent steps were recorded
/// under two keys ("samples 0 covered twice": a flake of the outage test above). A fallback then
/// drops exactly the steps after the checkpoint it falls back to.
#[test]
fn a_commit_sent_again_after_a_lost_answer_records_each_step_once() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec(&etcd);
    // Leads job `name` (a fresh runtime each time: the leadership's keep-alive ends with it).
    let lead = |name: &str| {
        let job = write_job(dir.path(), name, 20, &cluster_yaml(&etcd, 5_000));
        let job = JobSpec::load(&job.path).expect("job");
        let identity = JobIdentity::new(&job, None);
        let rt = runtime();
        let (store, _lost) = rt
            .block_on(EtcdStore::lead(
                &spec,
                &job,
                "http://127.0.0.1:9",
                &identity,
            ))
            .expect("lead");
        (rt, store)
    };
    let ledger = |job: &str| {
        let entries = runtime()
            .block_on(dapt_coordinator::etcd::ledger(&spec, job))
            .expect("ledger");
        entries.iter().map(|e| (e.step, e.start, e.end)).collect()
    };
    let (rt, mut store) = lead("resent");
    rt.block_on(store.commit(&committed(5), &entries(0..5)))
        .expect("commit 5");
    // Its answer lost: sent again with the commit of step 10.
    rt.block_on(store.commit(&committed(10), &entries(0..10)))
        .expect("commit 10 with 5's again");
    check_entries(ledger("resent"), 10 * BATCH).expect("each step once after a resent commit");
    // The checkpoint of step 10 does not verify: back to step 5.
    rt.block_on(store.fall_back(&committed(5), &[]))
        .expect("fall back");
    check_entries(ledger("resent"), 5 * BATCH).expect("the steps after the fallback dropped");

    // A job whose first commit an earlier version recorded (one key per commit, under the
    // commit's step), resumed, committed and fallen back by this one.
    let (rt, mut store) = lead("upgraded");
    rt.block_on(async {
        let mut client = dapt_proto::etcd::connect(&spec, Duration::from_secs(5))
            .await
            .expect("etcd");
        let old = format!("{}{:012}", keys::ledger("/dapt-test", "upgraded"), 5);
        let value = serde_json::to_vec(&entries(0..5)).expect("json");
        client.put(old, value, None).await.expect("put");
    });
    rt.block_on(store.commit(&committed(10), &entries(5..10)))
        .expect("commit 10");
    rt.block_on(store.commit(&committed(15), &entries(10..15)))
        .expect("commit 15");
    rt.block_on(store.fall_back(&committed(10), &[]))
        .expect("fall back");
    check_entries(ledger("upgraded"), 10 * BATCH).expect("an earlier version's key kept");
}

/// A worker that joins while etcd is briefly away (a restart) waits for it to register its
/// membership, as the coordinator rides out the outage: before, it exited at once ("granting the
/// membership lease: ... Connection refused"), which under `dapt-node.sh` stopped its node.
#[test]
fn a_worker_joining_during_a_short_etcd_outage_waits_for_etcd() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 20;
    let mut c = coordinator(dir.path(), "late", steps, &cluster_yaml(&etcd, 5_000));
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    etcd.stop();
    let mut w0 = c.member("w0");
    std::thread::sleep(Duration::from_secs(3));
    etcd.restart();
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    let (status, _) = w0.finish(LONG);
    assert!(status.success(), "{}", w0.stderr());
    assert!(
        w0.stderr().contains("etcd is not reachable yet"),
        "the worker waited for etcd: {}",
        w0.stderr()
    );
    check_etcd_ledger(&etcd, "late", steps);
}

/// A coordinator started while etcd is briefly away waits for it, as workers do: it exited 1
/// at once, so no leader could start until etcd was back (an audit).
#[test]
fn a_coordinator_starting_during_a_short_etcd_outage_waits_for_etcd() {
    let mut etcd = Etcd::start();
    etcd.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 12;
    let yaml = cluster_yaml(&etcd, 5_000);
    // etcd comes back 2 s after the coordinator starts (which returns once it listens, after
    // reaching etcd).
    let mut c = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            etcd.restart();
        });
        coordinator(dir.path(), "early", steps, &yaml)
    });
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let _w0 = c.member("w0");
    c.complete();
    assert!(
        c.coordinator.stderr().contains("etcd is not reachable yet"),
        "{}",
        c.coordinator.stderr()
    );
    check_etcd_ledger(&etcd, "early", steps);
}

#[test]
fn two_jobs_on_one_etcd_never_see_each_other() {
    let etcd = Etcd::start();
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 20;
    // The same prefix and worker ids: only the job name keeps them apart.
    let mut a = coordinator(dir_a.path(), "alpha", steps, &cluster_yaml(&etcd, 5_000));
    let mut b = coordinator(dir_b.path(), "beta", steps, &cluster_yaml(&etcd, 5_000));
    for c in [&mut a, &mut b] {
        c.coordinator.wait_for("leadership", LONG, |l| {
            !events(l, "leading the job").is_empty()
        });
    }
    let _a0 = a.member("w0");
    let _b0 = b.member("w0");
    // A worker of job beta pointed at alpha's coordinator is refused.
    let mut stray = a.worker("w9", "beta", &a.token.clone());
    let (status, _) = stray.finish(LONG);
    assert!(!status.success());
    assert!(
        stray.stderr().contains("beta") || stray.stderr().contains("job"),
        "{}",
        stray.stderr()
    );
    for c in [&mut a, &mut b] {
        let (status, _) = c.coordinator.finish(LONG);
        assert!(status.success(), "{}", c.coordinator.stderr());
        let lines = c.coordinator.lines();
        assert!(events(&lines, "recovery").is_empty(), "{lines:?}");
    }
    check_etcd_ledger(&etcd, "alpha", steps);
    check_etcd_ledger(&etcd, "beta", steps);
    assert!(!registered(&etcd, "alpha", "w0"));
    assert!(!registered(&etcd, "beta", "w0"));
}

#[test]
fn a_generation_written_behind_the_leaders_back_makes_it_step_down() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut c = coordinator(dir.path(), "cas", 400, &cluster_yaml(&etcd, 5_000));
    let _w0 = c.member("w0");
    let w1 = c.member("w1");
    c.wait_step(3);
    // Another writer bumps the generation: the leader's view of it is stale from now on.
    let key = dapt_proto::job::keys::generation("/dapt-test", "cas");
    let forged = r#"{"generation":99,"ranks":["x"],"peers":["127.0.0.1:1"],"resume_step":0}"#;
    runtime().block_on(async {
        let mut client = dapt_proto::etcd::connect(&spec(&etcd), Duration::from_secs(5))
            .await
            .expect("etcd");
        client.put(key.clone(), forged, None).await.expect("put");
    });
    // The next re-formation must not overwrite it: the leader steps down instead.
    w1.signal(libc::SIGKILL);
    let (status, _) = c.coordinator.finish(LONG);
    assert!(!status.success());
    let stderr = c.coordinator.stderr();
    assert!(stderr.contains("no longer leads"), "{stderr}");
    // Said as this coordinator's end, not the job's failure.
    assert!(
        stderr.contains("this coordinator stepped down") && !stderr.contains("the job failed"),
        "{stderr}"
    );
    let value = runtime().block_on(async {
        let mut client = dapt_proto::etcd::connect(&spec(&etcd), Duration::from_secs(5))
            .await
            .expect("etcd");
        let response = client.get(key, None).await.expect("get");
        response.kvs()[0].value_str().expect("utf-8").to_string()
    });
    assert_eq!(value, forged);
}

/// A `leader` key without a lease (an `etcdctl put` by hand, or any writer other than a
/// coordinator, which binds it to its lease) kept every coordinator of the job a standby forever,
/// logging that "another coordinator leads". It is refused by key, and left where it is.
#[test]
fn a_leader_key_without_a_lease_is_named_not_waited_on() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dapt_tests::write_job(dir.path(), "stale", 10, &cluster_yaml(&etcd, 5_000));
    let out = Command::new(binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job.path)
        .output()
        .expect("prepare");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = dapt_proto::job::keys::leader("/dapt-test", "stale");
    let client = || async {
        dapt_proto::etcd::connect(&spec(&etcd), Duration::from_secs(5))
            .await
            .expect("etcd")
    };
    runtime().block_on(async {
        let mut client = client().await;
        client
            .put(key.clone(), "http://10.0.0.9:7070", None)
            .await
            .expect("put");
    });
    let mut cmd = Command::new(binary("dapt"));
    cmd.arg("coordinator")
        .arg(&job.path)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env("DAPT_TOKEN", "dapt-test-token-0123456789abcdef");
    let mut coordinator = Proc::spawn(cmd);
    // It used to stand by for good: a deadline, not a hang.
    let (status, _) = coordinator.finish(Duration::from_secs(30));
    let stderr = coordinator.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&key)
            && stderr.contains("without a lease")
            && stderr.contains("etcdctl del"),
        "{stderr}"
    );
    let value = runtime().block_on(async {
        let response = client().await.get(key.clone(), None).await.expect("get");
        response.kvs()[0].value_str().expect("utf-8").to_string()
    });
    assert_eq!(
        value, "http://10.0.0.9:7070",
        "dapt removed a key it did not write"
    );
}

/// The job completes while etcd is down: its workers are told to finish only once etcd holds
/// the last commit. Before, they exited 0 at once, and a leader lost before etcd came back left
/// a job whose next leader waited for workers that would never come (an audit).
#[test]
fn the_workers_finish_only_once_etcd_holds_the_last_commit() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 60;
    let mut c = coordinator(dir.path(), "durable", steps, &cluster_yaml(&etcd, 5_000));
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let mut w0 = c.member("w0");
    c.wait_step(steps - 25);
    etcd.stop();
    c.coordinator.wait_for("the job to complete", LONG, |l| {
        !events(l, "job completed").is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        w0.child.try_wait().expect("try_wait").is_none(),
        "the worker left before etcd held the last commit"
    );
    etcd.restart();
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    let (status, _) = w0.finish(LONG);
    assert!(status.success(), "{status}");
    check_etcd_ledger(&etcd, "durable", steps);
}

/// A worker whose coordinator is gone (SIGKILLed, and nobody else leads) keeps trying to join
/// again for `--connect-timeout-s`; SIGTERM then ends it at once with status 130, under embedded
/// membership (joining the same coordinator again) and etcd membership (re-attaching to the
/// next leader) alike. It used to ignore the signal until the timeout ran out: a stopped Slurm
/// job's batch script waited ten minutes on its nodes.
#[test]
fn a_worker_joining_a_lost_coordinator_again_stops_at_once_on_sigterm() {
    let etcd = Etcd::start();
    for membership in ["embedded", "etcd"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let _serial = serial();
        let cluster = match membership {
            "etcd" => cluster_yaml(&etcd, 120_000),
            _ => "cluster:\n  min_workers: 1\n".to_string(),
        };
        let mut c = coordinator(dir.path(), &format!("rejoin-{membership}"), 400, &cluster);
        let mut worker = Command::new(binary("dapt-worker"));
        worker.args(["--connect-timeout-s", "600"]);
        let mut w = c.member_from(worker, "w0");
        c.wait_step(2);
        c.coordinator.signal(libc::SIGKILL);
        w.wait_for("the worker to lose its coordinator", LONG, |l| {
            !events(l, "lost the session with the coordinator; joining it again").is_empty()
                || !events(l, "lost the coordinator; re-attaching to the next leader").is_empty()
        });
        // Well into its retries.
        std::thread::sleep(Duration::from_secs(1));
        let sent = Instant::now();
        w.signal(libc::SIGTERM);
        let (status, _) = w.finish(Duration::from_secs(30));
        let took = sent.elapsed();
        println!("{membership}: SIGTERM to exit while joining again: {took:?}");
        assert_eq!(status.code(), Some(130), "{membership}: {}", w.stderr());
        assert!(took < Duration::from_secs(10), "{membership}: {took:?}");
    }
}
