//! dapt deletes and replaces only what it wrote, checks what it reads, and refuses inputs that
//! would explode (issue 14, items 6-8), over the real binaries. The reproductions of
//! `cases/security/06_corpus_output_deletes_user_dir.sh` and `07_prune_deletes_non_dapt_step_dirs.sh`
//! and other members of their kinds.

use std::path::{Path, PathBuf};
use std::process::Command;

use dapt_tests::{
    binary, check_ledger, dapt, events, repo_root, serial, text, write_job, Job, Proc, BATCH, LONG,
};

/// A quickstart corpus job in `dir/job.yaml` whose `corpus:` output is `output` (as written in
/// the file) and whose domain source reads `domain` (default: the quickstart's PostgreSQL pages).
fn corpus_job(dir: &Path, output: &str, domain: Option<&str>, extra: &str) -> PathBuf {
    let corpus = repo_root().join("examples/quickstart/corpus");
    let domain = domain
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}/postgres/*.html", corpus.display()));
    let job = format!(
        "job: safety\nseed: 1\ncorpus:\n  output: {output}\n  vocab_size: 512\n{extra}  sources:\n    - name: domain\n      role: domain\n      paths: [\"{domain}\"]\n      weight: 1\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\ntraining:\n  seq_len: 32\n  global_batch: 4\n  tokens: 4096\ncheckpoint:\n  dir: ckpt\n",
        c = corpus.display(),
    );
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join("job.yaml");
    std::fs::write(&path, job).expect("write job");
    path
}

fn prepare(job: &Path, more: &[&str]) -> (bool, String) {
    let mut args = vec!["prepare", "--quiet"];
    args.extend_from_slice(more);
    let job = job.to_str().expect("utf-8 path");
    args.push(job);
    let out = dapt(&args);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).expect("under").display().to_string())
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn prepare_refuses_an_output_that_is_not_a_dapt_corpus_and_deletes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 06: `output: .` in a project folder that holds the job file itself.
    let project = tmp.path().join("project");
    let job = corpus_job(&project, ".", None, "");
    std::fs::write(project.join("thesis.txt"), "my thesis, not backed up").expect("write");
    std::fs::create_dir_all(project.join(".git")).expect("mkdir");
    std::fs::write(project.join(".git/HEAD"), "ref: refs/heads/main").expect("write");
    let before = files(&project);
    let (ok, out) = prepare(&job, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("corpus.output") && out.contains("not a dapt corpus"),
        "{out}"
    );
    assert_eq!(files(&project), before, "nothing deleted or added");
    assert!(
        std::fs::read_dir(tmp.path())
            .expect("ls")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".dapt-prepare")),
        "no staging directory left behind"
    );

    // 06 variant: an unrelated existing directory.
    let photos = tmp.path().join("home/photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    std::fs::write(photos.join("cat.jpg"), "jpeg").expect("write");
    let job = corpus_job(
        &tmp.path().join("q2"),
        &photos.display().to_string(),
        None,
        "",
    );
    let (ok, out) = prepare(&job, &[]);
    assert!(!ok, "{out}");
    assert_eq!(files(&photos), vec!["cat.jpg"]);

    // A file where the directory should be.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "data").expect("write");
    let job = corpus_job(
        &tmp.path().join("q3"),
        &file.display().to_string(),
        None,
        "",
    );
    let (ok, out) = prepare(&job, &[]);
    assert!(!ok && out.contains("not a directory"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "data");

    // An empty directory is taken; a dapt corpus is replaced whole (--force), leaving no old
    // copy behind; a dapt corpus holding a user's file is refused, naming the file.
    let q4 = tmp.path().join("q4");
    std::fs::create_dir_all(q4.join("corpus")).expect("mkdir");
    let job = corpus_job(&q4, "corpus", None, "");
    let (ok, out) = prepare(&job, &[]);
    assert!(ok, "{out}");
    let (ok, out) = prepare(&job, &["--force"]);
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read_dir(&q4)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "job.yaml")
            .collect::<Vec<_>>(),
        vec!["corpus"],
        "the replaced corpus is gone"
    );
    std::fs::write(q4.join("corpus/domain/notes.txt"), "mine").expect("write");
    let (ok, out) = prepare(&job, &["--force"]);
    assert!(!ok && out.contains("domain/notes.txt"), "{out}");
    assert!(q4.join("corpus/domain/notes.txt").is_file());
    assert!(
        q4.join("corpus/manifest.json").is_file(),
        "the corpus stays"
    );
}

#[test]
fn a_shard_changed_with_its_mtime_kept_is_caught_by_a_full_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = corpus_job(tmp.path(), "corpus", None, "");
    let (ok, out) = prepare(&job, &[]);
    assert!(ok, "{out}");
    // A re-open checks every byte and records what it checked for `--verify cached`.
    let (ok, out) = prepare(&job, &[]);
    assert!(ok && out.contains("up to date"), "{out}");
    // Bit rot, or a `cp -a` of a damaged copy: the content changes, size and mtime do not.
    let shard = tmp.path().join("corpus/domain/train-00000.tok");
    let mtime = std::fs::metadata(&shard)
        .expect("meta")
        .modified()
        .expect("mtime");
    let mut bytes = std::fs::read(&shard).expect("read");
    bytes[10] ^= 0x01;
    std::fs::write(&shard, &bytes).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .expect("open")
        .set_modified(mtime)
        .expect("keep mtime");
    // The cache alone cannot see it...
    let (ok, out) = prepare(&job, &["--verify", "cached"]);
    assert!(ok && out.contains("up to date"), "{out}");
    // ...the default full check does, and rebuilds.
    let (ok, out) = prepare(&job, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("failed verification") && out.contains("train-00000.tok"),
        "{out}"
    );
    assert!(out.contains("prepared"), "{out}");
    let (ok, out) = prepare(&job, &[]);
    assert!(ok && out.contains("up to date"), "{out}");
}

#[test]
fn inputs_that_would_explode_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A gzip bomb: 64 MiB of one byte in about 64 KiB, past a 1 MiB bound.
    let bombs = tmp.path().join("bombs");
    std::fs::create_dir_all(&bombs).expect("mkdir");
    std::fs::copy(
        repo_root().join("examples/quickstart/corpus/sotu/2020.txt"),
        bombs.join("real.txt"),
    )
    .ok();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![b'a'; 1 << 20];
    for _ in 0..64 {
        std::io::Write::write_all(&mut gz, &block).expect("gz");
    }
    std::fs::write(bombs.join("bomb.txt.gz"), gz.finish().expect("gz")).expect("write");
    let job = corpus_job(
        &tmp.path().join("gz"),
        "corpus",
        Some(&bombs.display().to_string()),
        "  max_file_bytes: 1048576\n",
    );
    let (ok, out) = prepare(&job, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("bomb.txt.gz") && out.contains("max_file_bytes"),
        "{out}"
    );

    // A link out of the corpus tree (a secret beside it) is refused, naming the link.
    let tree = tmp.path().join("docs");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("page.txt"), "a page about databases").expect("write");
    std::fs::write(tmp.path().join("id_rsa.txt"), "-----BEGIN KEY-----").expect("write");
    std::os::unix::fs::symlink(tmp.path().join("id_rsa.txt"), tree.join("notes.txt")).expect("ln");
    let job = corpus_job(
        &tmp.path().join("ln"),
        "corpus",
        Some(&tree.display().to_string()),
        "",
    );
    let (ok, out) = prepare(&job, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("notes.txt") && out.contains("id_rsa.txt") && out.contains("outside"),
        "{out}"
    );
    assert!(!tmp.path().join("ln/corpus").exists());

    // Sizes whose product wraps or whose buffers no machine holds: an error naming the field,
    // never "0 tokens per step" or an allocation abort.
    for (from, to, field) in [
        ("seq_len: 32", "seq_len: 4294967295", "training.seq_len"),
        (
            "global_batch: 4",
            "global_batch: 18446744073709551615",
            "training.global_batch",
        ),
        (
            "global_batch: 4",
            "global_batch: 4000000\n  micro_batch: 4000000",
            "training.micro_batch",
        ),
        (
            "tokens: 4096",
            "tokens: 18446744073709551615",
            "training.tokens",
        ),
        (
            "dir: ckpt",
            "dir: ckpt\ncluster:\n  session_timeout_ms: 18446744073709551615",
            "cluster.session_timeout_ms",
        ),
    ] {
        let dir = tmp.path().join("sizes");
        let job = corpus_job(&dir, "corpus", None, "");
        let spec = std::fs::read_to_string(&job).expect("read");
        std::fs::write(&job, spec.replace(from, to)).expect("write");
        let out = Command::new(binary("dapt"))
            .arg("launch")
            .arg(&job)
            .output()
            .expect("dapt launch");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{to}: {err}");
        assert!(err.contains(field), "{to}: {err}");
    }
}

fn launch(job: &Job, workers: u32) -> Proc {
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "launch", "--no-export"])
        .arg(&job.path)
        .args(["--workers", &workers.to_string()]);
    Proc::spawn(cmd)
}

/// Rewrites the token budget of `job` to `steps` steps.
fn set_steps(job: &mut Job, steps: u64) {
    let spec = std::fs::read_to_string(&job.path).expect("read");
    let from = format!("tokens: {}", job.steps * BATCH * 32);
    let to = format!("tokens: {}", steps * BATCH * 32);
    assert!(spec.contains(&from));
    std::fs::write(&job.path, spec.replace(&from, &to)).expect("write");
    job.steps = steps;
}

/// `dapt launch` writes worker logs into `checkpoint.dir/logs/` and the export into `export/`:
/// a `logs` or `export` it did not write (a user's files there, a symlink to elsewhere) is
/// refused before anything runs, and its own logs are appended to, never truncated or written
/// through a symlink (it truncated `logs/worker-N.log` and followed a symlinked `logs`).
#[test]
fn launch_leaves_logs_and_exports_it_did_not_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let refused = |job: &Job, what: &str| {
        let mut proc = launch(job, 1);
        let (status, _) = proc.finish(LONG);
        let err = proc.stderr();
        assert!(!status.success(), "{what}: launched\n{err}");
        assert!(err.contains(what), "{what}: {err}");
    };
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    std::fs::write(elsewhere.join("worker-0.log"), "precious").expect("write");

    let job = write_job(tmp.path(), "logs", 2, "");
    let logs = job.checkpoints.join("logs");
    // A user's file among the logs, then an export folder with a user's model, then a
    // symlinked logs folder: each refused, each left as it was.
    std::fs::create_dir_all(&logs).expect("mkdir");
    std::fs::write(logs.join("notes.txt"), "mine").expect("write");
    refused(&job, "`logs`");
    std::fs::remove_file(logs.join("notes.txt")).expect("rm");
    std::fs::create_dir_all(job.checkpoints.join("export")).expect("mkdir");
    std::fs::write(job.checkpoints.join("export/model.safetensors"), "mine").expect("write");
    refused(&job, "`export`");
    assert_eq!(
        std::fs::read_to_string(job.checkpoints.join("export/model.safetensors")).expect("read"),
        "mine"
    );
    std::fs::remove_dir_all(job.checkpoints.join("export")).expect("rm");
    std::fs::remove_dir(&logs).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, &logs).expect("symlink");
    refused(&job, "`logs`");
    std::fs::remove_file(&logs).expect("rm symlink");

    // An earlier log of the same name: the run appends to it.
    std::fs::create_dir_all(&logs).expect("mkdir");
    std::fs::write(logs.join("worker-0.log"), "the earlier run's log\n").expect("write");
    let mut proc = launch(&job, 1);
    let (status, out) = proc.finish(LONG);
    assert!(status.success(), "{status}\n{out}\n{}", proc.stderr());
    let log = std::fs::read_to_string(logs.join("worker-0.log")).expect("read");
    assert!(
        log.starts_with("the earlier run's log\n") && log.len() > 100,
        "{log}"
    );

    // The job committed: a `logs` turned into a symlink since is refused all the same.
    std::fs::remove_dir_all(&logs).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, &logs).expect("symlink");
    refused(&job, "symlink");
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("worker-0.log")).expect("read"),
        "precious"
    );
}

#[test]
fn pruning_and_checkpoint_dir_leave_what_dapt_did_not_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    // 07: checkpoint.dir pointed at a folder with the user's `step-1/`: refused, untouched.
    let mut job = write_job(tmp.path(), "prune", 6, "");
    std::fs::create_dir_all(job.checkpoints.join("step-1")).expect("mkdir");
    std::fs::write(job.checkpoints.join("step-1/results.csv"), "experiment 1").expect("write");
    let mut proc = launch(&job, 1);
    let (status, _) = proc.finish(LONG);
    assert!(!status.success());
    let err = proc.stderr();
    assert!(
        err.contains("checkpoint.dir") && err.contains("step-1"),
        "{err}"
    );
    assert!(job.checkpoints.join("step-1/results.csv").is_file());
    std::fs::remove_dir_all(job.checkpoints.join("step-1")).expect("rm");

    // The job's own directory: commits at 5 and 6 (keep 2).
    let mut proc = launch(&job, 1);
    let (status, out) = proc.finish(LONG);
    assert!(status.success(), "{status}\n{out}\n{}", proc.stderr());
    // The user then puts folders named like checkpoints in it; the next run's pruning (commits
    // at 10 and 12, keeping 2) deletes dapt's old checkpoints and none of them.
    for name in ["step-1", "step-00000002", "step-3-notes"] {
        std::fs::create_dir_all(job.checkpoints.join(name)).expect("mkdir");
        std::fs::write(job.checkpoints.join(name).join("results.csv"), "mine").expect("write");
    }
    set_steps(&mut job, 12);
    let mut proc = launch(&job, 1);
    let (status, out) = proc.finish(LONG);
    assert!(status.success(), "{status}\n{out}\n{}", proc.stderr());
    let mut left: Vec<String> = std::fs::read_dir(&job.checkpoints)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            "step-00000002",
            "step-00000010",
            "step-00000012",
            "step-1",
            "step-3-notes"
        ]
    );
}

#[test]
fn a_corrupt_committed_checkpoint_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut job = write_job(tmp.path(), "fallback", 10, "");
    let mut proc = launch(&job, 1);
    let (status, out) = proc.finish(LONG);
    assert!(status.success(), "{status}\n{out}\n{}", proc.stderr());
    // The last committed checkpoint rots; the one before it is still kept (keep: 2).
    let weights = job.checkpoints.join("step-00000010/model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&weights, bytes).expect("write");

    set_steps(&mut job, 12);
    let mut proc = launch(&job, 1);
    let (status, out) = proc.finish(LONG);
    let lines = proc.lines();
    assert!(status.success(), "{status}\n{out}\n{}", proc.stderr());
    let failed = events(&lines, "the committed checkpoint failed verification");
    assert_eq!(failed.len(), 1, "{}", proc.stderr());
    assert!(
        failed[0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("model.safetensors")),
        "{failed:?}"
    );
    let fallback = events(
        &lines,
        "falling back to the previous kept checkpoint; the steps after it are trained again",
    );
    assert_eq!(fallback.len(), 1, "{}", proc.stderr());
    assert_eq!(fallback[0]["step"], 5);
    let formed = events(&lines, "generation formed");
    assert_eq!(formed[0]["resume_step"], 5);
    // Steps 5..10 trained again and entered the ledger once.
    check_ledger(&job.checkpoints.join("ledger.jsonl"), job.steps * BATCH).expect("ledger");
}

/// A later stage trains from an earlier stage's export (`model.hf`); exporting its checkpoint
/// back over that folder, by its path or through a symlink to it, is refused naming both, and
/// the base model is left as it was (`dapt export` replaced it and exited 0). Any other
/// output still takes the export.
#[test]
fn export_refuses_to_write_over_the_model_its_job_started_from() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ok = |args: &[&str]| {
        let out = dapt(args);
        assert!(out.status.success(), "dapt {args:?}: {}", text(&out.stderr));
    };
    let stage1 = write_job(tmp.path(), "stage1", 5, "");
    let stage1_path = stage1.path.to_string_lossy();
    ok(&["prepare", "--quiet", &stage1_path]);
    ok(&["train", &stage1_path]);
    let base = tmp.path().join("base-model");
    let from = stage1.checkpoints.join("step-00000005");
    ok(&[
        "export",
        &from.to_string_lossy(),
        "--hf",
        &base.to_string_lossy(),
    ]);
    let weights = std::fs::read(base.join("model.safetensors")).expect("base weights");

    let stage2 = write_job(tmp.path(), "stage2", 5, "");
    let spec = std::fs::read_to_string(&stage2.path).expect("read");
    let spec = spec.replace("  preset: tiny", &format!("  hf: \"{}\"", base.display()));
    std::fs::write(&stage2.path, spec).expect("write");
    ok(&["train", &stage2.path.to_string_lossy()]);
    let checkpoint = stage2.checkpoints.join("step-00000005");
    let link = tmp.path().join("link-to-base");
    std::os::unix::fs::symlink(&base, &link).expect("symlink");
    for out in [base.clone(), link, stage2.checkpoints.join("../base-model")] {
        let args = [
            "export",
            &checkpoint.to_string_lossy(),
            "--hf",
            &out.to_string_lossy(),
        ];
        let done = dapt(&args);
        let err = text(&done.stderr);
        assert!(!done.status.success(), "{}: {err}", out.display());
        assert!(
            err.contains("model.hf")
                && err.contains(&*base.canonicalize().expect("base").to_string_lossy())
                && err.contains(&*checkpoint.to_string_lossy()),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).expect("base weights"),
        weights,
        "the base model was replaced"
    );
    let other = tmp.path().join("stage2-export");
    ok(&[
        "export",
        &checkpoint.to_string_lossy(),
        "--hf",
        &other.to_string_lossy(),
    ]);
    assert!(other.join("model.safetensors").is_file());
}

/// `dapt export --hf LINK` where LINK is a symlink to a directory (a models folder on another
/// volume) exports into that directory; a link to a file or to nothing is refused naming its
/// target, and the file stays. Before, every symlink was refused as "not a directory".
#[test]
fn export_writes_through_a_symlink_to_a_directory_and_refuses_other_links() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), "linked", 3, "");
    let job_path = job.path.to_string_lossy();
    for args in [
        &["prepare", "--quiet", &job_path][..],
        &["train", &job_path],
    ] {
        let out = dapt(args);
        assert!(out.status.success(), "dapt {args:?}: {}", text(&out.stderr));
    }
    let checkpoint = job.checkpoints.join("step-00000003");
    let export = |out: &std::path::Path| {
        dapt(&[
            "export",
            &checkpoint.to_string_lossy(),
            "--hf",
            &out.to_string_lossy(),
        ])
    };

    let volume = tmp.path().join("volume/model");
    std::fs::create_dir_all(&volume).expect("mkdir");
    let link = tmp.path().join("model-link");
    std::os::unix::fs::symlink(&volume, &link).expect("symlink");
    let out = export(&link);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(volume.join("model.safetensors").is_file());
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
    // Again over its own earlier export, through the link.
    let out = export(&link);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "mine").expect("write");
    let to_file = tmp.path().join("file-link");
    std::os::unix::fs::symlink(&file, &to_file).expect("symlink");
    let dangling = tmp.path().join("dangling-link");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).expect("symlink");
    for (out, target) in [(&to_file, &file), (&dangling, &tmp.path().join("nowhere"))] {
        let done = export(out);
        let err = text(&done.stderr);
        assert!(!done.status.success(), "{}: {err}", out.display());
        assert!(
            err.contains("is a symlink to") && err.contains(&*target.to_string_lossy()),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).expect("file"), "mine");
    assert!(!tmp.path().join("nowhere").exists());
}

/// A continued model keeps what its base model's folder says about its use: the base's
/// `generation_config.json` (stop tokens), and, with the base's own tokenizer, its
/// `tokenizer_config.json` (chat template) and `special_tokens_map.json` go into every
/// checkpoint (in its manifest) and into the export, byte for byte. A file that is not JSON is
/// left out with a warning naming it. Before, an export held only config.json, the weights and
/// tokenizer.json (an audit: a continued Llama-3.x-Instruct lost its chat template and stop
/// tokens).
#[test]
fn the_base_models_generation_and_tokenizer_settings_reach_the_export() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ok = |args: &[&str]| {
        let out = dapt(args);
        assert!(out.status.success(), "dapt {args:?}: {}", text(&out.stderr));
        out
    };
    let stage1 = write_job(tmp.path(), "stage1", 3, "");
    let stage1_path = stage1.path.to_string_lossy();
    ok(&["prepare", "--quiet", &stage1_path]);
    ok(&["train", &stage1_path]);
    let base = tmp.path().join("base-model");
    let from = stage1.checkpoints.join("step-00000003");
    ok(&[
        "export",
        &from.to_string_lossy(),
        "--hf",
        &base.to_string_lossy(),
    ]);
    let carried = [
        (
            "generation_config.json",
            r#"{"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.6}"#,
        ),
        (
            "tokenizer_config.json",
            r#"{"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}"#,
        ),
    ];
    for (name, content) in carried {
        std::fs::write(base.join(name), content).expect("write");
    }
    std::fs::write(base.join("special_tokens_map.json"), "{not json").expect("write");

    let stage2 = write_job(tmp.path(), "stage2", 3, "");
    let spec = std::fs::read_to_string(&stage2.path).expect("read");
    let spec = spec.replace("  preset: tiny", &format!("  hf: \"{}\"", base.display()));
    std::fs::write(&stage2.path, spec).expect("write");
    let trained = ok(&["train", &stage2.path.to_string_lossy()]);
    let log = text(&trained.stderr);
    assert!(
        log.contains("special_tokens_map.json") && log.contains("not JSON"),
        "{log}"
    );
    let checkpoint = stage2.checkpoints.join("step-00000003");
    let manifest = std::fs::read_to_string(checkpoint.join("manifest.json")).expect("manifest");
    let out = tmp.path().join("stage2-export");
    ok(&[
        "export",
        &checkpoint.to_string_lossy(),
        "--hf",
        &out.to_string_lossy(),
    ]);
    for (name, content) in carried {
        assert!(manifest.contains(name), "{name} not in {manifest}");
        assert_eq!(
            std::fs::read_to_string(out.join(name)).expect(name),
            content
        );
    }
    assert!(!checkpoint.join("special_tokens_map.json").exists());
    assert!(!out.join("special_tokens_map.json").exists());

    // Exported again over that export from a checkpoint without them (stage 1's): they go.
    ok(&[
        "export",
        &from.to_string_lossy(),
        "--hf",
        &out.to_string_lossy(),
    ]);
    assert!(!out.join("generation_config.json").exists());
    assert!(!out.join("tokenizer_config.json").exists());
    // A user's own copy in an export (the chat template an earlier dapt did not carry) is not
    // dapt's to replace or remove: the export refuses the directory and the file stays.
    std::fs::write(out.join("tokenizer_config.json"), "{\"mine\": true}").expect("write");
    let refused = dapt(&[
        "export",
        &from.to_string_lossy(),
        "--hf",
        &out.to_string_lossy(),
    ]);
    let err = text(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("tokenizer_config.json"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer_config.json")).expect("the user's file"),
        "{\"mine\": true}"
    );

    // A resumed run carries what the run started with (from its checkpoint), not the base
    // folder's files as they are now.
    let spec = std::fs::read_to_string(&stage2.path).expect("read");
    let from_tokens = format!("tokens: {}", 3 * BATCH * 32);
    assert!(spec.contains(&from_tokens));
    let spec = spec.replace(&from_tokens, &format!("tokens: {}", 6 * BATCH * 32));
    std::fs::write(&stage2.path, spec).expect("write");
    std::fs::write(base.join("generation_config.json"), r#"{"edited": true}"#).expect("write");
    ok(&["train", &stage2.path.to_string_lossy()]);
    assert_eq!(
        std::fs::read_to_string(
            stage2
                .checkpoints
                .join("step-00000006/generation_config.json")
        )
        .expect("carried on resume"),
        carried[0].1
    );
}

/// A `checkpoint.dir` holding a user's own files under the names of dapt's state files
/// (`ledger.jsonl`, `job.json`, `generation.json`) is a user's folder: `dapt launch` refuses it
/// naming the file, before writing anything there, and the file stays as it was. Before, a
/// `ledger.jsonl` of one line without a newline was cut to nothing and replaced by dapt's
/// entries, and a `job.json` whose `job` named the job was rewritten without its other fields.
#[test]
fn state_file_names_in_a_users_folder_are_not_taken_for_dapts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), "names", 3, "");
    let users = [
        (
            "ledger.jsonl",
            r#"{"run": "baseline", "notes": "three weeks of results"}"#,
        ),
        (
            "job.json",
            r#"{"job": "names", "owner": "alice", "results": "s3://bucket/run7"}"#,
        ),
        ("generation.json", r#"{"generation": 3, "by": "alice"}"#),
    ];
    let _serial = serial();
    for (name, content) in users {
        std::fs::create_dir_all(&job.checkpoints).expect("mkdir");
        std::fs::write(job.checkpoints.join(name), content).expect("write");
        let out = Command::new(binary("dapt"))
            .args(["launch", "--no-export", "--workers", "1"])
            .arg(&job.path)
            .output()
            .expect("dapt launch");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(name) && err.contains("dapt did not write"),
            "{name}: {err}"
        );
        assert_eq!(
            files(&job.checkpoints),
            vec![name.to_string()],
            "{name}: something was written beside it"
        );
        assert_eq!(
            std::fs::read_to_string(job.checkpoints.join(name)).expect("read"),
            content
        );
        std::fs::remove_dir_all(&job.checkpoints).expect("clean");
    }
}
