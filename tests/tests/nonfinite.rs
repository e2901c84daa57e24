//! Non-finite numbers over the real binaries: a job file's `.nan` refused by field, a step whose
//! loss or gradient norm is not finite stopping `dapt train` and `dapt launch` (or skipped, a
//! bounded number of times, when the job says so) with every committed checkpoint finite, and
//! `dapt export` / `dapt eval` refusing a checkpoint that holds a NaN weight (the kind of
//! `shared/cases/nan-training-continues`).

use std::path::{Path, PathBuf};
use std::process::Command;

use dapt_tests::{
    binary, dapt, events, f32_tensors_shaped, finite_weights, serial, text, write_f32_tensors,
    write_job, Job, Proc, LONG,
};

/// A tiny-model job of `steps` steps with `lr: 3.0e4` (the case's typo for 3.0e-4; without
/// weight decay, since lr * weight_decay of 1 or more is refused by field), a checkpoint every
/// `every` steps (two kept), plus `extra` in its training section.
fn diverging_job(dir: &Path, name: &str, steps: u64, every: u64, extra: &str) -> Job {
    let job = write_job(dir, name, steps, "");
    let yaml = std::fs::read_to_string(&job.path).expect("job");
    let yaml = yaml
        .replace(
            "    lr: 0.003\n",
            &format!("    lr: 3.0e4\n    weight_decay: 0\n{extra}"),
        )
        .replace("  every: 5\n", &format!("  every: {every}\n"));
    std::fs::write(&job.path, yaml).expect("job");
    job
}

/// A job of 20 steps training from [`overflowing_model`] (its loss NaN at every step, which
/// never changes it) without evaluations, plus `extra` in its training section.
fn nan_job(dir: &Path, name: &str, extra: &str) -> Job {
    let (_, path) = overflowing_model(dir, name);
    let yaml = std::fs::read_to_string(&path).expect("job");
    let tokens = |steps: u64| format!("tokens: {}\n", steps * dapt_tests::BATCH * 32);
    let yaml = yaml
        .replace("  eval_every: 1\n", &format!("  eval_every: 0\n{extra}"))
        .replace(&tokens(1), &tokens(20));
    std::fs::write(&path, yaml).expect("job");
    Job {
        path,
        checkpoints: dir.join(format!("ck-{name}")),
        steps: 20,
    }
}

fn prepare(job: &Job) {
    let out = dapt(&["prepare", &job.path.to_string_lossy(), "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The committed checkpoints under `root`: (step, directory), oldest first; each must hold
/// finite weights.
fn finite_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    found.sort();
    for (_, dir) in &found {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            finite_weights(&dir.join(file)).unwrap_or_else(|e| {
                panic!("{} holds a non-finite value: {e}", dir.join(file).display())
            });
        }
    }
    found
}

/// The `step N:` the error names.
fn failed_step(stderr: &str) -> u64 {
    let at = stderr.find("step ").expect("the error names the step");
    stderr[at + 5..]
        .split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step number in {stderr}"))
}

/// A step whose loss is NaN stops `dapt train`, unapplied, naming the step.
#[test]
fn a_non_finite_step_stops_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = nan_job(dir.path(), "nanstep", "");
    let out = dapt(&["train", &job.path.to_string_lossy()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a diverged run exited 0:\n{stderr}");
    assert!(!stderr.contains("training finished"), "{stderr}");
    assert!(
        stderr.contains("step 0: the loss is NaN") && stderr.contains("the step was not applied"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(finite_checkpoints(&job.checkpoints).is_empty());
}

/// The case's lr typo (without weight decay, which would refuse it by field) blows the model
/// up at once: a step whose gradient is exactly zero at a positive loss (saturated outputs, the
/// uniform loss ln V) stops the job, where it trained on to a NaN, or to the end at ln V with
/// exit 0 under a weight_decay typo (an audit).
#[test]
fn a_model_that_no_longer_learns_stops_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = diverging_job(dir.path(), "biglr", 20, 100, "");
    prepare(&job);
    let out = dapt(&["train", &job.path.to_string_lossy()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the gradient is exactly zero") && !stderr.contains("training finished"),
        "{stderr}"
    );
    assert!(finite_checkpoints(&job.checkpoints).is_empty());
}

/// Resumed with the case's lr typo after good steps, with `keep: 1`: the diverged model (finite
/// weights around 1e14, every loss after it NaN) is refused before its checkpoint is written,
/// by `dapt train` and `dapt launch`, and the last good checkpoint is kept and still evaluates.
/// Before, it was committed, the good one pruned, and `dapt export` wrote it (an audit).
#[test]
fn a_diverged_model_is_never_committed_and_the_last_good_checkpoint_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus").to_string_lossy().into_owned();
    let tokens = |steps: u64| format!("tokens: {}", steps * dapt_tests::BATCH * 32);
    for command in ["train", "launch"] {
        let job = write_job(dir.path(), command, 10, "");
        let good = std::fs::read_to_string(&job.path)
            .expect("job")
            .replace("  every: 5\n", "  every: 1\n")
            .replace("  keep: 2\n", "  keep: 1\n")
            .replace(&tokens(10), &tokens(5));
        std::fs::write(&job.path, &good).expect("job");
        prepare(&job);
        let path = job.path.to_string_lossy().into_owned();
        let run = || match command {
            "train" => dapt(&["train", &path]),
            _ => dapt(&["launch", &path, "--workers", "2", "--no-export"]),
        };
        let _serial = serial();
        let out = run();
        assert!(out.status.success(), "{}", text(&out.stderr));
        // Resumed for five more steps with a typo'd learning rate. The raised rate re-warms:
        // step 6 still trains at the rate the checkpoint's settings gave (a good step,
        // committed), step 7 at the typo.
        let typo = good
            .replace(&tokens(5), &tokens(10))
            .replace("    lr: 0.003\n", "    lr: 3.0e15\n    weight_decay: 0\n");
        std::fs::write(&job.path, &typo).expect("job");
        let out = run();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("the model after step 7") && stderr.contains("training diverged"),
            "{command}: {stderr}"
        );
        let kept = finite_checkpoints(&job.checkpoints);
        let steps: Vec<u64> = kept.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [6], "{command}: {stderr}");
        let checkpoint = kept[0].1.to_string_lossy().into_owned();
        let eval = dapt(&["eval", &checkpoint, &corpus, "--max-tokens", "64"]);
        assert!(eval.status.success(), "{}", text(&eval.stderr));
    }
}

#[test]
fn skipped_non_finite_steps_are_bounded_and_never_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = nan_job(
        dir.path(),
        "skip",
        "  nonfinite: skip\n  max_skipped_steps: 2\n",
    );
    let out = dapt(&["--log-format", "json", "train", &job.path.to_string_lossy()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skipped = events(&lines, "non-finite step skipped");
    assert_eq!(skipped.len(), 2, "{stderr}");
    assert!(
        stderr.contains("2 steps were skipped already, training.max_skipped_steps is 2"),
        "{stderr}"
    );
    // (A skipped step leaves the weights as they were: `admit` and the step's unit tests; a
    // checkpoint on the way would hold this model, whose loss is NaN, and is refused before
    // it is written.)
    assert!(finite_checkpoints(&job.checkpoints).is_empty());
}

#[test]
fn launch_fails_the_job_at_a_non_finite_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = nan_job(dir.path(), "launched", "");
    let _serial = serial();
    let (proc, stderr) = failed_launch(&job.path);
    assert!(
        stderr.contains("the job failed") && stderr.contains("the step was not applied"),
        "{stderr}"
    );
    let reason = &stderr[stderr.find("the job failed").unwrap_or(0)..];
    let step = failed_step(reason);
    // Failed at once: no re-formation to replay the same steps into the same failure.
    let lines = proc.lines();
    assert_eq!(events(&lines, "generation formed").len(), 1, "{stderr}");
    assert!(!job.checkpoints.join("export").exists());
    let kept = finite_checkpoints(&job.checkpoints);
    assert!(kept.iter().all(|(s, _)| *s <= step), "{kept:?}");
}

#[test]
fn non_finite_numbers_in_the_job_file_are_refused_by_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "nanjob", 4, "");
    let yaml = std::fs::read_to_string(&job.path).expect("job");
    for (setting, field) in [
        ("weight_decay: .nan", "training.optimizer.weight_decay"),
        ("grad_clip: .inf", "training.optimizer.grad_clip"),
        ("eps: .NaN", "training.optimizer.eps"),
        ("lr: -.inf", "training.optimizer.lr"),
        ("betas: [0.9, .nan]", "training.optimizer.betas"),
    ] {
        let bad = yaml.replace(
            "    lr: 0.003\n",
            &format!("    lr: 0.003\n    {setting}\n"),
        );
        let bad = if setting.starts_with("lr") {
            yaml.replace("lr: 0.003", setting)
        } else {
            bad
        };
        std::fs::write(&job.path, bad).expect("job");
        let out = dapt(&["train", &job.path.to_string_lossy()]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{setting} accepted");
        assert!(
            stderr.contains(field) && stderr.contains("finite") && stderr.contains("line"),
            "{setting}: {stderr}"
        );
    }
}

#[test]
fn export_and_eval_refuse_a_checkpoint_with_a_nan_weight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "nanck", 2, "");
    prepare(&job);
    let out = dapt(&["train", &job.path.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ck = job.checkpoints.join("step-00000002");
    // A NaN written into the weights (as a checkpoint of an earlier dapt could hold), with the
    // manifest updated so that the checksums pass and only the values are wrong.
    let weights = ck.join("model.safetensors");
    let mut tensors = f32_tensors_shaped(&weights).expect("tensors");
    let name = "model.layers.1.mlp.up_proj.weight";
    tensors.get_mut(name).expect("tensor").1[17] = f32::NAN;
    write_f32_tensors(&weights, &tensors).expect("write");
    let manifest_path = ck.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("json");
    let bytes = std::fs::read(&weights).expect("weights");
    for f in manifest["files"].as_array_mut().expect("files") {
        if f["path"] == "model.safetensors" {
            f["bytes"] = bytes.len().into();
            f["sha256"] = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)).into();
        }
    }
    std::fs::write(&manifest_path, manifest.to_string()).expect("manifest");

    let export = dir.path().join("export");
    let out = dapt(&[
        "export",
        &ck.to_string_lossy(),
        "--hf",
        &export.to_string_lossy(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "exported a NaN checkpoint");
    assert!(
        stderr.contains(&format!("tensor `{name}`: 1 of")) && stderr.contains("not finite"),
        "{stderr}"
    );
    assert!(!export.exists(), "something was written");
    let out = dapt(&[
        "eval",
        &ck.to_string_lossy(),
        &dir.path().join("corpus").to_string_lossy(),
        "--seq-len",
        "32",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(name), "{}", text(&out.stderr));
}

/// A corpus, and a model directory whose held-out loss is not finite though its weights are:
/// the tiny model trained one step, with the final norm's gain at f32::MAX (its activations
/// overflow); and a job `name` that trains from it with an evaluation before the first step.
fn overflowing_model(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let job = write_job(dir, "naneval", 1, "");
    prepare(&job);
    let out = dapt(&["train", &job.path.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ck = job.checkpoints.join("step-00000001");
    let model = dir.join("overflowing");
    std::fs::create_dir_all(&model).expect("dir");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(ck.join(f), model.join(f)).expect("copy");
    }
    let mut tensors = f32_tensors_shaped(&ck.join("model.safetensors")).expect("tensors");
    let gain = &mut tensors.get_mut("model.norm.weight").expect("norm").1;
    gain.iter_mut().for_each(|g| *g = f32::MAX);
    write_f32_tensors(&model.join("model.safetensors"), &tensors).expect("write");
    let yaml = std::fs::read_to_string(&job.path).expect("job");
    let from_model = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &from_model,
        yaml.replace("preset: tiny", &format!("hf: {}", model.display()))
            .replace("  seq_len: 32\n", "  seq_len: 32\n  eval_every: 1\n")
            .replace("job: naneval", &format!("job: {name}"))
            .replace("ck-naneval", &format!("ck-{name}")),
    )
    .expect("job");
    (model, from_model)
}

/// `dapt eval` refuses a model whose held-out loss is not finite, naming the source, instead
/// of printing a perplexity of null with exit 0; and a training job's evaluation of it (the
/// base model's, before the first step) stops the job with that error.
#[test]
fn a_non_finite_held_out_loss_is_refused_naming_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, from_model) = overflowing_model(dir.path(), "from-model");
    let out = dapt(&[
        "eval",
        &model.to_string_lossy(),
        &dir.path().join("corpus").to_string_lossy(),
        "--seq-len",
        "32",
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "evaluated to {}", text(&out.stdout));
    assert!(
        stderr.contains("source `postgres`") && stderr.contains("not finite"),
        "{stderr}"
    );

    let out = dapt(&["train", &from_model.to_string_lossy()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "trained on: {stderr}");
    assert!(
        stderr.contains("source `postgres`")
            && stderr.contains("step 0")
            && stderr.contains("not finite"),
        "{stderr}"
    );
}

/// Under `dapt launch`, rank 0's evaluation of such a model fails the job at once (a retry
/// would evaluate the same model again), naming the source, rather than reporting null.
#[test]
fn launch_fails_the_job_at_a_non_finite_evaluation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, from_model) = overflowing_model(dir.path(), "launched-eval");
    let _serial = serial();
    let (proc, stderr) = failed_launch(&from_model);
    assert!(
        stderr.contains("the job failed")
            && stderr.contains("held-out evaluation of source `postgres` at step 0"),
        "{stderr}"
    );
    let lines = proc.lines();
    assert_eq!(events(&lines, "generation formed").len(), 1, "{stderr}");
}

/// `dapt launch JOB --workers 2`, which must fail without completing: the finished process
/// (for its log lines) and its stderr.
fn failed_launch(job: &std::path::Path) -> (Proc, String) {
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "launch"])
        .arg(job)
        .args(["--workers", "2"]);
    let mut proc = Proc::spawn(cmd);
    let (status, stdout) = proc.finish(LONG);
    let stderr = proc.stderr();
    assert!(!status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("job completed"), "{stdout}");
    (proc, stderr)
}

/// A worker whose standard error is a pipe nobody reads (a log collector gone, `2>&1 | head`)
/// hung the job: tracing-subscriber reported the failed log write with `eprintln!`, which
/// panicked on the training thread before its failure was sent, and the coordinator waited on a
/// rank that heartbeat and never trained (an audit). The failure reaches the coordinator, which
/// fails the job with it, within a bounded time.
#[test]
fn a_worker_that_cannot_write_its_log_still_reports_its_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = dapt_tests::serial();
    let mut cluster = dapt_tests::coordinator_edited(
        dir.path(),
        "mute",
        20,
        "cluster:\n  min_workers: 1\n  max_workers: 1\n",
        "127.0.0.1",
        &[],
        &|yaml| yaml.replace("    lr: 0.003\n", "    lr: 3.0e4\n    weight_decay: 0\n"),
    );
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut worker = Command::new(dapt_tests::binary("dapt-worker"))
        .args(["--log-format", "json", "--coordinator", &cluster.url])
        .args(["--id", "w0"])
        .env("DAPT_JOB", "mute")
        .env("DAPT_TOKEN", &cluster.token)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .spawn()
        .expect("dapt-worker");
    let (status, _) = cluster
        .coordinator
        .finish(std::time::Duration::from_secs(120));
    let _ = worker.kill();
    let _ = worker.wait();
    let stderr = cluster.coordinator.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("the job failed") && stderr.contains("the step was not applied"),
        "{stderr}"
    );
}
