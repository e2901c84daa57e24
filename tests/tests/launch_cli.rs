//! The control plane end to end over the real binaries: `dapt launch` with local workers, a
//! `dapt coordinator` with `dapt-worker` processes killed with SIGKILL, refusals, Ctrl-C and
//! resume. Every wait is bounded.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dapt_tests::{
    alive, binary, check_ledger, coordinator, events, losses, random_step, serial, write_job, Job,
    Proc, BATCH, LONG,
};

fn launch(job: &Job, workers: u32) -> Proc {
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "launch"])
        .arg(&job.path)
        .args(["--workers", &workers.to_string()]);
    Proc::spawn(cmd)
}

/// `dapt launch` of `job` with 2 workers, once its first checkpoint is committed, with the
/// workers' pids.
fn launch_to_first_commit(job: &Job) -> (Proc, Vec<u32>) {
    let mut proc = launch(job, 2);
    proc.wait_for("a first commit", LONG, |l| {
        !events(l, "checkpoint committed").is_empty()
    });
    let pids: Vec<u32> = events(&proc.lines(), "worker started")
        .iter()
        .map(|f| f["pid"].as_u64().expect("pid") as u32)
        .collect();
    assert_eq!(pids.len(), 2);
    (proc, pids)
}

#[test]
fn two_workers_train_and_commit_every_sample_once_with_equal_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "two", 12, "");
    let _serial = serial();
    let mut proc = launch(&job, 2);
    let (status, stdout) = proc.finish(LONG);
    let lines = proc.lines();
    assert!(status.success(), "{status}\n{stdout}");
    assert!(stdout.contains("Hugging Face export"), "{stdout}");
    assert!(job.checkpoints.join("export/model.safetensors").is_file());

    let formed = events(&lines, "generation formed");
    assert_eq!(formed.len(), 1);
    assert_eq!(formed[0]["world"], 2);
    let losses = losses(&lines);
    assert_eq!(losses.len() as u64, job.steps, "one line per step");
    let first = losses[0].1;
    let last: f64 = losses[losses.len() - 3..].iter().map(|l| l.1).sum::<f64>() / 3.0;
    assert!(last < first - 0.3, "loss did not fall: {losses:?}");
    // A commit happens only when both ranks reported the same weights digest: three commits
    // (steps 5, 10, 12) and no divergence.
    let commits = events(&lines, "checkpoint committed");
    assert_eq!(
        commits
            .iter()
            .map(|c| c["step"].as_u64().expect("step"))
            .collect::<Vec<_>>(),
        vec![5, 10, 12]
    );
    assert!(events(
        &lines,
        "ranks' weights differ: the checkpoint is not committed"
    )
    .is_empty());
    let ledger =
        check_ledger(&job.checkpoints.join("ledger.jsonl"), job.steps * BATCH).expect("ledger");
    assert_eq!(ledger.len() as u64, job.steps * 2, "two ranks per step");
}

#[test]
fn one_and_two_workers_see_the_same_loss_at_every_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = write_job(dir.path(), "one", 8, "");
    let two = write_job(dir.path(), "two", 8, "");
    let _serial = serial();
    let run = |job: &Job, workers| {
        let mut proc = launch(job, workers);
        let (status, stdout) = proc.finish(LONG);
        assert!(status.success(), "{status}\n{stdout}\n{}", proc.stderr());
        losses(&proc.lines())
    };
    let a = run(&one, 1);
    let b = run(&two, 2);
    assert_eq!(a.len(), 8);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        println!("step {s}: 1 worker {x:.6}, 2 workers {y:.6}");
        assert!((x - y).abs() < 1e-4 * x.abs(), "step {s}: {x} vs {y}");
    }
}

#[test]
fn a_killed_worker_is_recovered_from_and_a_restarted_one_rejoins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 60;
    let mut c = coordinator(
        dir.path(),
        "kill",
        steps,
        "cluster:\n  min_workers: 1\n  max_workers: 2\n  session_timeout_ms: 2000\n  formation_grace_ms: 10000\n",
    );
    let _w0 = c.member("w0");
    let w1 = c.member("w1");
    let kill_at = random_step(3, 25);
    let _w1_again = c.kill_and_restart(w1, "w1", kill_at);
    let lines = c.complete();

    let recovery = events(&lines, "recovery");
    let phases: Vec<&str> = recovery
        .iter()
        .map(|f| f["phase"].as_str().expect("phase"))
        .collect();
    println!("recovery lines: {recovery:#?}");
    for phase in ["detected", "aborted", "re-formed", "resumed"] {
        let line = recovery
            .iter()
            .find(|f| f["phase"] == phase)
            .unwrap_or_else(|| panic!("no `{phase}` recovery line in {phases:?}"));
        assert!(line["took_ms"].is_u64() && line["since_detected_ms"].is_u64());
    }
    let formed = events(&lines, "generation formed");
    let worlds: Vec<u64> = formed
        .iter()
        .map(|f| f["world"].as_u64().expect("world"))
        .collect();
    assert_eq!(worlds[0], 2);
    assert!(
        worlds.contains(&1),
        "re-formed with the survivor: {worlds:?}"
    );
    assert_eq!(
        worlds.last(),
        Some(&2),
        "the restarted worker joined a later generation: {worlds:?}"
    );
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
}

#[test]
fn wrong_token_other_job_and_duplicate_id_are_refused_and_the_job_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut c = coordinator(
        dir.path(),
        "refuse",
        40,
        "cluster:\n  min_workers: 2\n  max_workers: 2\n",
    );
    let _w0 = c.member("w0");
    let _w1 = c.member("w1");
    c.coordinator
        .wait_for("a first step", LONG, |l| !events(l, "step").is_empty());
    let name = c.job_name();
    // A wrong token or another job's name: the worker does not follow this coordinator (its
    // proof is not for that token and job) and sends nothing about itself.
    for (id, job, token) in [
        ("w2", name.as_str(), "guess"),
        ("w2", "other-job", c.token.as_str()),
    ] {
        let mut worker = c.worker(id, job, token);
        let (status, _) = worker.finish(Duration::from_secs(60));
        assert!(!status.success());
        let said = worker.stderr();
        assert!(
            said.contains(&format!("did not prove that it runs job `{job}`")),
            "{said}"
        );
    }
    // A second worker with a member's id is refused by the control loop.
    let (status, _) = c
        .worker("w0", name.as_str(), c.token.as_str())
        .finish(Duration::from_secs(60));
    // The coordinator logs the refusal as it sends it; the worker may read it first.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!status.success());
    let refused = c.coordinator.events("refused");
    assert!(
        refused
            .iter()
            .any(|f| f["code"] == "ERROR_CODE_DUPLICATE_WORKER"),
        "{refused:?}"
    );
    // A message from a generation that is not current is refused; the session stays open.
    let code = stale_report(&c.url, &name, &c.token);
    assert_eq!(code, "ERROR_CODE_STALE_GENERATION");

    c.coordinator.wait_for("the job to complete", LONG, |l| {
        !events(l, "job completed").is_empty()
    });
    let (status, _) = c.coordinator.finish(LONG);
    let lines = c.coordinator.lines();
    assert!(status.success());
    let formed = events(&lines, "generation formed");
    assert_eq!(formed.len(), 1, "no re-formation: {formed:?}");
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), 40 * BATCH).expect("ledger");
}

/// Joins as a standby and sends a step report of generation 0; returns the refusal's code.
fn stale_report(url: &str, job: &str, token: &str) -> String {
    use dapt_proto::rpc::{self, coordinator_message, worker_message::Kind, WorkerMessage};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = rpc::CoordinatorClient::connect(url.to_string())
            .await
            .expect("connect");
        let join = rpc::Join {
            job: job.into(),
            worker_id: "intruder".into(),
            devices: vec!["cpu".into()],
            version: rpc::VERSION.into(),
            collective_endpoint: "127.0.0.1:1".into(),
            attach_generation: 0,
            attach_rank: 0,
            proof: Vec::new(),
        };
        let key = dapt_proto::auth::Key::control(token);
        let mut session = dapt_proto::join::open(&mut client, &key, join)
            .await
            .expect("joined");
        session
            .outbound
            .send(WorkerMessage {
                kind: Some(Kind::Step(rpc::StepReport {
                    generation: 0,
                    step: 0,
                    rank: 0,
                    samples_start: 0,
                    samples_end: 4,
                    loss: 1.0,
                    grad_norm: 1.0,
                    lr: 1.0,
                    tokens: 1,
                    elapsed_ms: 1.0,
                    ..Default::default()
                })),
            })
            .expect("send");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), session.inbound.message())
                .await
                .expect("an answer in time")
                .expect("the session stays open")
                .expect("a message");
            if let Some(coordinator_message::Kind::Refused(r)) = m.kind {
                return r.code().as_str_name().to_string();
            }
        }
    })
}

#[test]
fn ctrl_c_stops_the_workers_and_the_same_command_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "ctrlc", 40, "");
    // Evaluated at step 0 (the base model) and every 5 steps.
    let spec = std::fs::read_to_string(&job.path).expect("read");
    let spec = spec.replace(
        "  micro_batch: 2\n",
        "  micro_batch: 2\n  eval_every: 5\n  eval_tokens: 256\n",
    );
    std::fs::write(&job.path, spec).expect("write");
    let _serial = serial();
    let (mut proc, pids) = launch_to_first_commit(&job);
    // A step trained past the commit: the stop checkpoints it (before, Ctrl-C stopped at the
    // last commit and the steps since were trained again).
    proc.wait_for("a step past the first commit", LONG, |l| {
        let commit = events(l, "checkpoint committed")[0]["step"].as_u64();
        commit.is_some_and(|c| losses(l).iter().any(|&(s, _)| s >= c))
    });
    proc.signal(libc::SIGINT);
    let (status, stdout) = proc.finish(LONG);
    assert_eq!(status.code(), Some(130), "{stdout}");
    assert!(stdout.contains("last committed checkpoint"), "{stdout}");
    let lines = proc.lines();
    assert_eq!(
        events(
            &lines,
            "stopping the job after the step in progress, with its checkpoint (a second Ctrl-C \
             or SIGTERM stops it at once, at the last committed checkpoint)"
        )
        .len(),
        1,
        "{}",
        proc.stderr()
    );
    // Every step trained is committed: the one in progress at the Ctrl-C included.
    let trained = losses(&lines).iter().map(|&(s, _)| s + 1).max();
    assert!(!stdout.contains("were not committed"), "{stdout}");
    // "The same command" is this one, with its flags (it said `dapt launch JOB`, without them).
    let same = stdout
        .lines()
        .find_map(|l| l.strip_prefix("the same command resumes from it: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        same.ends_with(&format!("launch {} --workers 2", job.path.display())),
        "{same}"
    );
    assert!(
        pids.iter().all(|&p| !alive(p)),
        "workers still running after Ctrl-C"
    );
    // Each worker says the job stopped with its checkpoint, not that a step was aborted (a new
    // user's walk-through: every clean stop ended the workers' logs with that warning).
    for id in ["worker-0", "worker-1"] {
        let path = job.checkpoints.join(format!("logs/{id}.log"));
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            log.contains("the job stopped at the coordinator's request")
                && !log.contains("a step in flight was aborted"),
            "{id}:\n{log}"
        );
    }
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(job.checkpoints.join("committed.json")).expect("committed.json"),
    )
    .expect("json");
    let at = committed["step"].as_u64().expect("step");
    assert!((6..40).contains(&at), "committed step {at}");
    assert_eq!(Some(at), trained, "{stdout}");
    // The base model's perplexities are committed with the step.
    let base = committed["base_perplexity"]
        .as_object()
        .expect("base_perplexity");
    assert_eq!(base.len(), 2, "{committed}");

    // The job file is edited before the resume (a lower peak LR): `dapt launch` itself says so,
    // not only the workers' logs.
    let spec = std::fs::read_to_string(&job.path).expect("read");
    std::fs::write(&job.path, spec.replace("lr: 0.003", "lr: 0.002")).expect("write");
    let mut again = launch(&job, 2);
    again.wait_for("the job to complete", LONG, |l| {
        !events(l, "job completed").is_empty()
    });
    let (status, stdout) = again.finish(LONG);
    let lines = again.lines();
    assert!(status.success());
    // The resumed run's summary compares with the base model (step 0), not with its own first
    // evaluation ("step 10 -> 40" before).
    for source in ["postgres", "sotu"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(source))
            .unwrap_or_else(|| panic!("no {source} line in {stdout}"));
        assert!(line.contains("step 0 -> 40"), "{stdout}");
    }
    let resumed = events(&lines, "resuming from the committed checkpoint");
    assert_eq!(resumed[0]["step"].as_u64(), Some(at));
    let edited = events(
        &lines,
        "resuming with other training settings than the checkpoint was trained under (the job file was edited)",
    );
    assert_eq!(edited.len(), 1, "{}", again.stderr());
    assert_eq!(edited[0]["changed"], "optimizer.lr 0.003 -> 0.002");
    let first_step = losses(&lines)[0].0;
    assert_eq!(first_step, at, "training resumed at the committed step");
    check_ledger(&job.checkpoints.join("ledger.jsonl"), 40 * BATCH).expect("ledger");
}

/// A `dapt launch` killed outright (SIGKILL: no handler runs) takes its workers with it: they
/// read the end of the stdin pipe it held. They trained on, orphaned, for about a minute before
/// (an audit), holding the cores and the checkpoint directory's lock.
#[test]
fn a_killed_launcher_takes_its_workers_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "sigkill", 400, "");
    let _serial = serial();
    let (mut proc, pids) = launch_to_first_commit(&job);
    proc.signal(libc::SIGKILL);
    let (status, _) = proc.finish(LONG);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&p| alive(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
    for &&p in &left {
        // SAFETY: kill(2) on a worker this test started; the test fails below anyway.
        unsafe {
            libc::kill(p as i32, libc::SIGKILL);
        }
    }
    assert!(left.is_empty(), "workers {left:?} outlived their launcher");
    let log = std::fs::read_to_string(job.checkpoints.join("logs/worker-0.log")).expect("log");
    assert!(
        log.contains("the dapt launch that started this worker is gone"),
        "{log}"
    );
}

/// Ctrl-Z (SIGTSTP) stopped the launcher and the coordinator in it, not the workers: they gave
/// up on it and `fg` found the job failed. It is said not to pause the job, which goes on.
#[test]
fn ctrl_z_does_not_stop_the_launcher_and_the_job_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "ctrlz", 12, "");
    let _serial = serial();
    let mut proc = launch(&job, 2);
    proc.wait_for("a first commit", LONG, |l| {
        !events(l, "checkpoint committed").is_empty()
    });
    proc.signal(libc::SIGTSTP);
    proc.wait_for("the job to complete", LONG, |l| {
        !events(l, "job completed").is_empty()
    });
    let (status, stdout) = proc.finish(LONG);
    assert!(status.success(), "{stdout}\n{}", proc.stderr());
    assert!(
        proc.stderr()
            .contains("Ctrl-Z does not pause a dapt launch job"),
        "{}",
        proc.stderr()
    );
    check_ledger(&job.checkpoints.join("ledger.jsonl"), 12 * BATCH).expect("ledger");
}

/// The project folder moved between a Ctrl-C and the resume (or a shared disk mounted at
/// another path), with `checkpoint.keep: 1`: the same job in its new place resumes from the
/// committed checkpoint. `committed.json` held the checkpoint's absolute path: its intact
/// checkpoint "failed verification" there and the job refused to start (with `keep: 2` it fell
/// back a checkpoint and trained its steps again).
#[test]
fn a_moved_project_folder_resumes_from_its_committed_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (before, after) = (tmp.path().join("before"), tmp.path().join("after"));
    std::fs::create_dir(&before).expect("mkdir");
    let job = write_job(&before, "moved", 20, "");
    let spec = std::fs::read_to_string(&job.path).expect("read");
    std::fs::write(&job.path, spec.replace("keep: 2", "keep: 1")).expect("write");
    let _serial = serial();
    let mut proc = launch(&job, 1);
    proc.wait_for("a first commit", LONG, |l| {
        !events(l, "checkpoint committed").is_empty()
    });
    proc.signal(libc::SIGINT);
    let (status, stdout) = proc.finish(LONG);
    assert_eq!(status.code(), Some(130), "{stdout}");
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(job.checkpoints.join("committed.json")).expect("committed.json"),
    )
    .expect("json");
    let at = committed["step"].as_u64().expect("step");

    // The folder moves; its job file names the new place (written with absolute paths).
    std::fs::rename(&before, &after).expect("move");
    let moved = Job {
        path: after.join("moved.yaml"),
        checkpoints: after.join("ck-moved"),
        steps: job.steps,
    };
    let spec = std::fs::read_to_string(&moved.path).expect("read");
    let (from, to) = (before.display().to_string(), after.display().to_string());
    std::fs::write(&moved.path, spec.replace(&from, &to)).expect("write");
    let mut again = launch(&moved, 1);
    again.wait_for("the job to end", LONG, |l| {
        !events(l, "job completed").is_empty()
    });
    let (status, _) = again.finish(LONG);
    let lines = again.lines();
    assert!(status.success(), "{}", again.stderr());
    assert!(
        events(&lines, "the committed checkpoint failed verification").is_empty(),
        "{}",
        again.stderr()
    );
    let resumed = events(&lines, "resuming from the committed checkpoint");
    assert_eq!(resumed[0]["step"].as_u64(), Some(at), "{resumed:?}");
    check_ledger(&moved.checkpoints.join("ledger.jsonl"), 20 * BATCH).expect("ledger");
}

#[test]
fn launch_on_cuda_without_a_usable_gpu_fails_clearly_and_trains_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "nogpu", 10, "");
    let _serial = serial();
    let started = std::time::Instant::now();
    let mut p = {
        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["launch"]).arg(&job.path).args([
            "--workers",
            "1",
            "--device",
            "cuda",
            "--precision",
            "bf16",
        ]);
        Proc::spawn(cmd)
    };
    let (status, stdout) = p.finish(LONG);
    let all = format!("{stdout}{}", p.stderr());
    assert!(!status.success(), "{all}");
    // The worker says why (a build without the `cuda` feature, or no driver), and the launcher
    // says that the workers are gone.
    assert!(
        all.contains("cuda") && all.contains("every worker exited"),
        "{all}"
    );
    assert!(!job.checkpoints.join("committed.json").exists());
    println!("failed after {:?}", started.elapsed());
    // A bad precision is refused before anything starts.
    let out = Command::new(binary("dapt"))
        .args(["launch"])
        .arg(&job.path)
        .args(["--precision", "fp8"])
        .output()
        .expect("launch");
    assert!(!out.status.success());
    // Named with its flag and value (clap's words, from the shared `Precision` parser).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'fp8' for '--precision"), "{err}");
}

/// `dapt launch` of a job whose corpus inputs changed since its checkpoints were trained
/// prepared the corpus again first (the old one gone), then failed: "trained on another
/// corpus" (an audit). A corpus of other content is now discarded instead of published,
/// naming the checkpoint, and the corpus the checkpoints need stays; with the inputs restored
/// (new mtimes, same content) it resumes.
#[test]
fn a_launch_does_not_replace_the_corpus_its_checkpoints_were_trained_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let job = write_job(dir.path(), "keep", 6, "");
    // Its own copy of one source, to edit.
    let sotu = dir.path().join("sotu");
    std::fs::create_dir_all(&sotu).expect("mkdir");
    let examples = dapt_tests::repo_root().join("examples/quickstart/corpus/sotu");
    for entry in std::fs::read_dir(&examples).expect("ls") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), sotu.join(entry.file_name())).expect("copy");
    }
    let yaml = std::fs::read_to_string(&job.path).expect("read");
    let yaml = yaml.replace(
        &format!("{}/*.txt", examples.display()),
        &format!("{}/*.txt", sotu.display()),
    );
    assert!(yaml.contains(&sotu.display().to_string()), "{yaml}");
    std::fs::write(&job.path, &yaml).expect("write");
    let mut first = launch(&job, 1);
    let (status, stdout) = first.finish(LONG);
    assert!(status.success(), "{stdout}\n{}", first.stderr());
    let manifest_path = dir.path().join("corpus/manifest.json");
    let manifest = std::fs::read(&manifest_path).expect("manifest");
    let edited = std::fs::read_dir(&sotu)
        .expect("ls")
        .next()
        .expect("a file")
        .expect("entry")
        .path();
    let original = std::fs::read(&edited).expect("read");
    std::fs::write(
        &edited,
        [original.as_slice(), b"\nA new paragraph.\n"].concat(),
    )
    .expect("append");
    // A newer checkpoint that was never committed (a crash between its write and the commit),
    // recording another corpus: the corpus to keep is the committed checkpoint's, not the
    // newest's (it was the newest's: the corpus was replaced).
    let uncommitted = job.checkpoints.join("step-00000007");
    copy_dir(&job.checkpoints.join("step-00000006"), &uncommitted);
    let trainer = uncommitted.join("trainer.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trainer).expect("trainer.json")).expect("json");
    state["corpus"] = serde_json::json!("0".repeat(64));
    state["step"] = serde_json::json!(7);
    std::fs::write(&trainer, state.to_string()).expect("write");
    let manifest_of_7 = uncommitted.join("manifest.json");
    let mut listing: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_of_7).expect("manifest")).expect("json");
    listing["step"] = serde_json::json!(7);
    std::fs::write(&manifest_of_7, listing.to_string()).expect("write");
    let mut second = launch(&job, 1);
    let (status, _) = second.finish(LONG);
    let stderr = second.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000006")
            && stderr.contains("it would replace the corpus the resume needs"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&manifest_path).expect("manifest"),
        manifest,
        "the corpus was replaced"
    );
    std::fs::remove_dir_all(&uncommitted).expect("rm");
    std::fs::write(&edited, &original).expect("restore");
    let mut third = launch(&job, 1);
    let (status, stdout) = third.finish(LONG);
    assert!(status.success(), "{stdout}\n{}", third.stderr());
}

/// `dapt launch` after `dapt train` of the same job started at step 0 and its pruning deleted
/// train's checkpoints, without a word (an audit). A coordinator now refuses to start over
/// checkpoints past its last commit that no coordinator wrote, naming them; `dapt train` goes on.
#[test]
fn a_launch_over_dapt_trains_checkpoints_names_them_and_deletes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let job = write_job(dir.path(), "single", 12, "");
    let path = job.path.to_string_lossy().into_owned();
    let out = dapt_tests::dapt(&["prepare", "--quiet", &path]);
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
    let out = dapt_tests::dapt(&["train", &path, "--stop-after", "5"]);
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
    let step5 = job.checkpoints.join("step-00000005");
    assert!(step5.is_dir());
    let mut launched = launch(&job, 1);
    let (status, _) = launched.finish(LONG);
    let stderr = launched.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000005") && stderr.contains("written without a coordinator"),
        "{stderr}"
    );
    assert!(
        step5.join("model.safetensors").is_file(),
        "train's checkpoint was touched"
    );
    let out = dapt_tests::dapt(&["train", &path]);
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
    assert!(job.checkpoints.join("step-00000012").is_dir());
}

/// A completed job whose final export fails (here: `export/` holds a file of the user's, which
/// the export never writes over) is still said to have completed, with the export's failure
/// after it and exit status 1; the same command, once the way is clear, exports the committed
/// checkpoint without training again, and says the job had completed before it. Before, the
/// launch ended with only "exporting ... failed".
#[test]
fn a_failed_final_export_still_says_the_job_completed_and_the_same_command_exports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "export-fails", 6, "");
    let _serial = serial();
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "launch", "--no-export"])
        .arg(&job.path)
        .args(["--workers", "1"]);
    let mut first = Proc::spawn(cmd);
    let (status, stdout) = first.finish(LONG);
    assert!(status.success(), "{status}\n{stdout}\n{}", first.stderr());
    assert!(!stdout.contains("before this run"), "{stdout}");

    let export = job.checkpoints.join("export");
    std::fs::create_dir(&export).expect("mkdir");
    std::fs::write(export.join("notes.txt"), "mine").expect("write");
    let mut blocked = launch(&job, 1);
    let (status, stdout) = blocked.finish(LONG);
    let stderr = blocked.stderr();
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("job completed at step 6"), "{stdout}");
    assert!(stderr.contains("error: exporting"), "{stderr}");
    assert!(
        stderr.contains("the same command exports it again"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(export.join("notes.txt")).expect("the user's file"),
        "mine"
    );

    std::fs::remove_file(export.join("notes.txt")).expect("remove");
    let mut again = launch(&job, 1);
    let (status, stdout) = again.finish(LONG);
    assert!(status.success(), "{status}\n{stdout}\n{}", again.stderr());
    assert!(stdout.contains("job completed at step 6"), "{stdout}");
    // Said to have completed before this run, not "tokens trained 0" as if this run's.
    assert!(
        stdout.contains("before this run: nothing was trained"),
        "{stdout}"
    );
    assert!(export.join("model.safetensors").is_file());
    assert!(
        losses(&again.lines()).is_empty(),
        "a completed job trains no step again"
    );
}

/// Copies the files of directory `from` into a new directory `to` (one level: a checkpoint).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("ls") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// `dapt status` could not watch a `dapt launch` job: the run's token was made by the launch
/// and never shown (a new user's walk-through). The banner now names the command, with the
/// token in a file of checkpoint.dir that only this user reads; it works while the job runs.
#[test]
fn dapt_status_watches_a_launched_job_with_the_command_its_banner_gives() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "watched", 60, "");
    let _serial = serial();
    let mut proc = launch(&job, 1);
    proc.wait_for("a step", LONG, |lines| !losses(lines).is_empty());
    let starting = proc.events("job starting");
    let command = starting[0]["status"].as_str().expect("the status command");
    let args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&args[..2], ["dapt", "status"], "{command}");
    let token_file = std::path::PathBuf::from(args[args.len() - 1]);
    assert_eq!(token_file, job.checkpoints.join("launch.token"));
    let mode = std::fs::metadata(&token_file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    // (A DAPT_TOKEN exported for another job does not stand in the way of the file given.)
    let out = Command::new(binary("dapt"))
        .args(&args[1..])
        .env("DAPT_TOKEN", "another-jobs-token-".repeat(3))
        .output()
        .expect("dapt status");
    let stdout = dapt_tests::text(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        dapt_tests::text(&out.stderr)
    );
    assert!(
        stdout.starts_with("job watched: ") && stdout.contains("members (1)"),
        "{stdout}"
    );
    let (status, stdout) = proc.finish(LONG);
    assert!(status.success(), "{stdout}\n{}", proc.stderr());
    // The same command once the job has ended says where the job stands, not only that the
    // connection was refused.
    let out = Command::new(binary("dapt"))
        .args(&args[1..])
        .output()
        .expect("dapt status");
    let stderr = dapt_tests::text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("its last committed checkpoint is step 60"),
        "{stderr}"
    );
    // A file of that name that is not a run's token is a user's: never replaced.
    std::fs::write(&token_file, "my notes\n").expect("write");
    let mut again = launch(&job, 1);
    let (status, _) = again.finish(LONG);
    let stderr = again.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("launch.token exists and is not a token"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&token_file).expect("read"),
        "my notes\n"
    );
}
