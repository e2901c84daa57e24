//! `dapt train`, `dapt export` and `dapt eval` over the real binaries: a training process
//! stopped and started again ends bitwise where an uninterrupted one does.

use std::path::Path;

use dapt_tests::{dapt, repo_root, text};

fn write_job(dir: &Path, name: &str, checkpoints: &str) -> String {
    let corpus = repo_root().join("examples/quickstart/corpus");
    let job = format!(
        "job: {name}\nseed: 11\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: 3\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\n      held_out: 0.2\ntraining:\n  seq_len: 32\n  global_batch: 8\n  micro_batch: 4\n  tokens: 1536\n  optimizer:\n    lr: 0.003\ncheckpoint:\n  dir: {ck}\n  every: 2\n",
        out = dir.join("corpus").display(),
        c = corpus.display(),
        ck = dir.join(checkpoints).display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, job).expect("write job");
    path.to_string_lossy().into_owned()
}

/// A prepared job `name` of 7,812 steps with checkpoints every 1,000 (into `ck`): one that is
/// stopped long before its first checkpoint.
fn long_job(dir: &Path, name: &str) -> String {
    let job = write_job(dir, name, "ck");
    let yaml = std::fs::read_to_string(&job).expect("job");
    std::fs::write(
        &job,
        yaml.replace("tokens: 1536", "tokens: 2000000")
            .replace("every: 2", "every: 1000"),
    )
    .expect("job");
    ok(&["prepare", "--quiet", &job]);
    job
}

fn ok(args: &[&str]) -> String {
    let out = dapt(args);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "dapt {args:?} failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    stdout
}

#[test]
fn stopped_and_restarted_training_matches_an_uninterrupted_run_then_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let straight = write_job(dir.path(), "straight", "ck-straight");
    let split = write_job(dir.path(), "split", "ck-split");
    ok(&["prepare", &straight, "--quiet"]);

    let out = ok(&["train", &straight]);
    assert!(out.contains("training finished"), "{out}");
    let out = ok(&["train", &split, "--stop-after", "3"]);
    assert!(out.contains("run again to resume"), "{out}");
    let out = dapt(&["train", &split]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("resumed from checkpoint"),
        "{}",
        text(&out.stderr)
    );

    let final_a = dir.path().join("ck-straight/step-00000006");
    let final_b = dir.path().join("ck-split/step-00000006");
    let a = std::fs::read(final_a.join("model.safetensors")).expect("a");
    let b = std::fs::read(final_b.join("model.safetensors")).expect("b");
    assert!(a == b, "a restarted run diverged from an uninterrupted one");

    // Export in bf16; the export and the checkpoint evaluate to nearly the same perplexity.
    let export = dir.path().join("export");
    let (from, to) = (final_b.to_string_lossy(), export.to_string_lossy());
    let export_args = ["export", &from, "--hf", &to, "--dtype", "bf16"];
    let out = ok(&export_args);
    assert!(out.contains("exported step 6"), "{out}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(export.join(f).is_file(), "export lacks {f}");
    }
    // The export's tokenizer.json turned into a symlink to a user's file: exporting into it
    // again is refused (the tokenizer was copied through the symlink), the user's file kept.
    let users = dir.path().join("my-tokenizer.json");
    std::fs::write(&users, "mine").expect("write");
    std::fs::remove_file(export.join("tokenizer.json")).expect("rm");
    std::os::unix::fs::symlink(&users, export.join("tokenizer.json")).expect("symlink");
    let out = dapt(&export_args);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tokenizer.json") && err.contains("not a regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&users).expect("read"), "mine");
    std::fs::remove_file(export.join("tokenizer.json")).expect("rm symlink");
    ok(&export_args);
    assert!(export.join("tokenizer.json").is_file());
    let corpus = dir.path().join("corpus").to_string_lossy().into_owned();
    // Without --seq-len, at the length the model was trained at (32 here; it was 256 whatever
    // the model), which the checkpoint and the export both record.
    let eval = |model: &Path| -> Vec<f64> {
        let out = ok(&[
            "eval",
            &model.to_string_lossy(),
            &corpus,
            "--max-tokens",
            "2048",
        ]);
        let rows: serde_json::Value = serde_json::from_str(&out).expect("eval prints JSON");
        rows.as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                assert_eq!(r["seq_len"], 32, "{r}");
                r["perplexity"].as_f64().expect("perplexity")
            })
            .collect()
    };
    let (exported, checkpoint) = (eval(&export), eval(&final_b));
    assert_eq!(exported.len(), 2);
    for (e, c) in exported.iter().zip(&checkpoint) {
        assert!(
            e.is_finite() && (e / c - 1.0).abs() < 0.01,
            "bf16 export {e} vs checkpoint {c}"
        );
    }
    // A window longer than every held-out stream measures nothing: an error naming the
    // corpus, not `[]` and exit 0.
    let out = dapt(&[
        "eval",
        &export.to_string_lossy(),
        &corpus,
        "--seq-len",
        "1000000",
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains("no held-out window of 1000000 tokens") && stderr.contains(&corpus),
        "{stderr}"
    );
    // Past the model's max_position_embeddings: said, as `dapt train` says it (an audit).
    assert!(
        stderr.contains("longer than the model's max_position_embeddings"),
        "{stderr}"
    );
}

#[test]
fn a_damaged_checkpoint_stops_the_resume_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "ck");
    ok(&["prepare", &job, "--quiet"]);
    ok(&["train", &job, "--stop-after", "2"]);
    let optimizer = dir.path().join("ck/step-00000002/optimizer.safetensors");
    let mut bytes = std::fs::read(&optimizer).expect("read");
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    std::fs::write(&optimizer, bytes).expect("write");
    let out = dapt(&["train", &job]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("optimizer.safetensors") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // `dapt eval` of the checkpoint verifies it too, before reading its weights.
    let out = dapt(&[
        "eval",
        dir.path().join("ck/step-00000002").to_str().expect("utf-8"),
        dir.path().join("corpus").to_str().expect("utf-8"),
        "--seq-len",
        "16",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("optimizer.safetensors") && stderr.contains("corrupt"),
        "{stderr}"
    );
}

/// A newer checkpoint whose manifest cannot be read stops the resume with its name, instead of
/// silently training again from an older one or from the start (and failing at the first save);
/// a `trainer.json` that disagrees with its manifest is refused by field, never overflows.
#[test]
fn an_unreadable_newer_checkpoint_stops_the_resume_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "ck");
    ok(&["prepare", &job, "--quiet"]);
    ok(&["train", &job, "--stop-after", "4"]);
    let manifest = dir.path().join("ck/step-00000004/manifest.json");
    let kept = std::fs::read(&manifest).expect("read");
    std::fs::write(&manifest, b"{ not json").expect("write");
    let out = dapt(&["train", &job]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("step-00000004") && stderr.contains("cannot be resumed from"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // trainer.json says another step than the manifest (checksums updated to match).
    std::fs::write(&manifest, &kept).expect("restore");
    let trainer = dir.path().join("ck/step-00000004/trainer.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trainer).expect("read")).expect("json");
    state["tokens"] = serde_json::json!(u64::MAX - 5);
    let bytes = serde_json::to_vec(&state).expect("json");
    std::fs::write(&trainer, &bytes).expect("write");
    let mut m: serde_json::Value = serde_json::from_slice(&kept).expect("json");
    for f in m["files"].as_array_mut().expect("files") {
        if f["path"] == "trainer.json" {
            f["bytes"] = bytes.len().into();
            f["sha256"] = sha256_hex(&bytes).into();
        }
    }
    std::fs::write(&manifest, serde_json::to_vec(&m).expect("json")).expect("write");
    // Refused on load (counting on from it would overflow), and, like a checkpoint that fails
    // its checksums, passed over for the one before it, named.
    let out = dapt(&["train", &job, "--stop-after", "1"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("trainer.json")
            && stderr.contains("tokens")
            && stderr.contains("falling back"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The corpus a checkpoint was trained on is the one it resumes on: a job file whose corpus
/// section was edited after `dapt prepare` is refused until the corpus is prepared again, and a
/// corpus prepared again differently is refused on resume, naming the checkpoint (it would
/// train other samples, or other token ids, under the same steps).
#[test]
fn a_resume_on_a_corpus_prepared_again_differently_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "ck");
    ok(&["prepare", &job, "--quiet"]);
    ok(&["train", &job, "--stop-after", "2"]);
    let yaml = std::fs::read_to_string(&job).expect("read");
    std::fs::write(&job, yaml.replacen("weight: 3", "weight: 2", 1)).expect("write");
    let out = dapt(&["train", &job]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("corpus.sources[0].weight") && stderr.contains("dapt prepare"),
        "{stderr}"
    );
    ok(&["prepare", &job, "--quiet"]);
    let out = dapt(&["train", &job]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("step-00000002") && stderr.contains("another corpus"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A job file whose `model:` was edited after a checkpoint was written does not resume that
/// checkpoint as if nothing changed (the banner named the new model, the old one trained on):
/// refused, naming the checkpoint and the fields that differ.
#[test]
fn a_resume_with_another_model_in_the_job_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "ck");
    ok(&["prepare", &job, "--quiet"]);
    ok(&["train", &job, "--stop-after", "2"]);
    let yaml = std::fs::read_to_string(&job).expect("read");
    std::fs::write(
        &job,
        yaml.replacen("preset: tiny", "preset: smollm2-135m", 1),
    )
    .expect("write");
    let out = dapt(&["train", &job]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("step-00000002")
            && stderr.contains("another model")
            && stderr.contains("num_hidden_layers"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Put back, it resumes; with the learning rate edited it says so (it still resumes: a
    // changed schedule on resume can be meant).
    std::fs::write(&job, yaml.replacen("lr: 0.003", "lr: 0.3", 1)).expect("write");
    let out = dapt(&["train", &job, "--stop-after", "4"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("other training settings") && stderr.contains("optimizer.lr 0.003 -> 0.3"),
        "{stderr}"
    );
    std::fs::write(&job, yaml).expect("write");
    let out = dapt(&["train", &job]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("optimizer.lr 0.3 -> 0.003"));
}

/// The steps `dapt train` logged (JSON log lines), in order: their numbers and learning rates.
fn step_lines(stderr: &str) -> (Vec<u64>, Vec<f64>) {
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    dapt_tests::events(&lines, "step")
        .iter()
        .map(|f| {
            (
                f["step"].as_u64().expect("step"),
                f["lr"].as_f64().expect("lr"),
            )
        })
        .unzip()
}

/// A finished job trained further by raising `training.tokens` (what a relaunch of a completed
/// job says to do) went on at once at the rate the edited cosine gives there: ten times the
/// floor it had decayed to, in one step, with no re-warm. It re-warms from the floor to the
/// edited schedule over `schedule.warmup` of the tokens left, and a restart inside the ramp goes
/// on with it.
#[test]
fn a_finished_job_trained_further_rewarms_its_learning_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "ck");
    let yaml = std::fs::read_to_string(&job)
        .expect("read")
        .replace("tokens: 1536", "tokens: 1536\n  schedule:\n    warmup: 0.2");
    std::fs::write(&job, &yaml).expect("write");
    ok(&["prepare", &job, "--quiet"]);
    ok(&["train", &job]);
    // 6 steps of 256 tokens trained, the rate at its floor (0.1 of 0.003); 60 steps now, the
    // cosine at 0.1 of them gives ~0.0029. The ramp: 0.2 of the 13,824 tokens left, ~11 steps.
    std::fs::write(&job, yaml.replace("tokens: 1536", "tokens: 15360")).expect("write");
    let out = dapt(&["--log-format", "json", "train", &job, "--stop-after", "9"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("re-warming the learning rate"), "{stderr}");
    let (steps, first) = step_lines(&stderr);
    // Numbered by steps completed, as `dapt launch`'s coordinator does (6, 7, 8 before).
    assert_eq!(steps, [7, 8, 9], "{stderr}");
    assert!((first[0] - 3e-4).abs() < 1e-9, "from the floor: {first:?}");
    assert!(
        first.windows(2).all(|w| w[1] > w[0]) && first[2] < 1.5e-3,
        "{first:?}"
    );
    // Restarted inside the ramp: it goes on, not from the floor again, and says nothing new.
    let out = dapt(&["--log-format", "json", "train", &job, "--stop-after", "20"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("re-warming the learning rate"), "{stderr}");
    let (_, second) = step_lines(&stderr);
    assert!(second[0] > first[2], "{first:?} then {second:?}");
    let top = second.iter().copied().fold(0.0, f64::max);
    assert!(
        top > 2.5e-3 && top < 3e-3,
        "the edited cosine reached: {second:?}"
    );
}

/// `dapt train` resumed after an edit of `global_batch` or `seq_len` with a warning only, and
/// then skipped samples (8 -> 16: a quarter of the corpus never trained) or repeated them
/// (8 -> 4), as an audit showed; `dapt launch` refused it already. Refused by field, nothing
/// trained.
#[test]
fn a_resume_with_another_batch_or_window_is_refused_by_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "ck");
    ok(&["prepare", &job, "--quiet"]);
    ok(&["train", &job, "--stop-after", "2"]);
    let yaml = std::fs::read_to_string(&job).expect("read");
    for (edit, field) in [
        (
            "global_batch: 16",
            "training.global_batch 8, the job says 16",
        ),
        ("global_batch: 4", "training.global_batch 8, the job says 4"),
    ] {
        std::fs::write(&job, yaml.replacen("global_batch: 8", edit, 1)).expect("write");
        let out = dapt(&["train", &job]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(field) && stderr.contains("step-00000002"),
            "{stderr}"
        );
    }
    std::fs::write(&job, yaml.replacen("seq_len: 32", "seq_len: 16", 1)).expect("write");
    let out = dapt(&["train", &job]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("training.seq_len 32, the job says 16"),
        "{stderr}"
    );
    let steps: Vec<_> = std::fs::read_dir(dir.path().join("ck"))
        .expect("ck")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(steps, ["step-00000002"], "nothing more was trained");
    std::fs::write(&job, yaml).expect("write");
    ok(&["train", &job, "--stop-after", "4"]);
}

/// `checkpoint.dir` naming a user's folder: `dapt train` refuses it by the entry dapt did not
/// write, before writing its lock or `job.json` there, as `dapt launch` does (it trained into
/// it beside the user's files).
#[test]
fn dapt_train_refuses_a_checkpoint_dir_holding_a_users_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "job", "mine");
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).expect("mkdir");
    std::fs::write(mine.join("notes.txt"), "mine").expect("write");
    ok(&["prepare", &job, "--quiet"]);
    let out = dapt(&["train", &job, "--stop-after", "2"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("holds `notes.txt`, which dapt did not write"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&mine)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        ["notes.txt"],
        "nothing written beside the user's file"
    );
    // dapt's own directory, with its checkpoints, resumes as before.
    std::fs::remove_file(mine.join("notes.txt")).expect("rm");
    ok(&["train", &job, "--stop-after", "2"]);
    ok(&["train", &job, "--stop-after", "4"]);
    // `dapt export` of the checkpoint directory itself names its newest checkpoint (it said
    // only "no readable manifest.json"; a new user's walk-through).
    let out = dapt(&[
        "export",
        &mine.to_string_lossy(),
        "--hf",
        &dir.path().join("exp").to_string_lossy(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is a checkpoint directory: its newest checkpoint is step 4"),
        "{stderr}"
    );
}

/// A job with a forgetting guard: `dapt train` (no coordinator) trained on past a tripped
/// bound of `action: stop` without a word (an audit); it is refused, naming `dapt launch`.
#[test]
fn dapt_train_refuses_a_guard_it_cannot_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "guarded", "ck");
    let yaml = std::fs::read_to_string(&job).expect("read");
    std::fs::write(
        &job,
        yaml.replace("  micro_batch: 4\n", "  micro_batch: 4\n  eval_every: 2\n")
            + "guard:\n  bounds:\n    - source: sotu\n      max_rise: 0.01\n  action: stop\n",
    )
    .expect("write");
    ok(&["prepare", &job, "--quiet"]);
    let out = dapt(&["train", &job, "--stop-after", "2"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("`guard:` is applied by the coordinator") && stderr.contains("--workers 1"),
        "{stderr}"
    );
    assert!(!dir.path().join("ck").exists(), "nothing trained");
}

/// Zero windows, tokens or batch for `dapt eval` are refused by clap, by flag (a zero
/// `--seq-len` divided by zero).
#[test]
fn eval_refuses_zero_sizes_by_flag() {
    for flag in ["--seq-len", "--max-tokens", "--batch"] {
        let out = dapt(&["eval", "model", "corpus", flag, "0"]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(flag) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// A GGUF file that ends early is named in the error.
#[test]
fn import_gguf_names_the_file_it_cannot_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cut.gguf");
    // The magic, version 3, then the tensor count cut short.
    std::fs::write(&file, b"GGUF\x03\x00\x00\x00\x01\x00").expect("write");
    let out = dapt(&[
        "import-gguf",
        file.to_str().expect("utf-8"),
        "--out",
        dir.path().join("out").to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cut.gguf") && stderr.contains("ends early"),
        "{stderr}"
    );
}

/// A word-level tokenizer.json with `<s>` and `</s>` and no template: what adds the BOS is a
/// `tokenizer_config.json` beside it (a Llama class), as in older Llama 2 and Mistral folders.
fn word_tokenizer(path: &Path, words: &[&str]) {
    let mut vocab = serde_json::json!({"<unk>": 0, "<s>": 1, "</s>": 2});
    for (i, w) in words.iter().enumerate() {
        vocab[*w] = (3 + i).into();
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(path, json.to_string()).expect("tokenizer");
}

/// `corpus.tokenizer` a copy of the base model's `tokenizer.json` without the folder's
/// `tokenizer_config.json` (whose Llama class adds `<s>`): the corpus was prepared without the
/// BOS the model's folder asks for, trained without a word, and the export carried that config
/// (an audit). Training now refuses, naming both; with the folder's own file it trains, and
/// says that the base config.json ends sequences with another id than the corpus's EOS.
#[test]
fn a_corpus_tokenized_otherwise_than_the_base_models_folder_says_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let stage1 = write_job(d, "stage1", "ck1");
    ok(&["prepare", "--quiet", &stage1]);
    ok(&["train", &stage1, "--stop-after", "2"]);
    let base = d.join("base");
    ok(&[
        "export",
        &d.join("ck1/step-00000002").to_string_lossy(),
        "--hf",
        &base.to_string_lossy(),
    ]);
    let words = ["alpha", "beta", "gamma", "delta"];
    word_tokenizer(&base.join("tokenizer.json"), &words);
    std::fs::write(
        base.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .expect("config");
    let copy = d.join("tokenizer-copy.json");
    std::fs::copy(base.join("tokenizer.json"), &copy).expect("copy");
    std::fs::create_dir_all(d.join("words")).expect("mkdir");
    let records: String = (0..60)
        .map(|i: usize| {
            let text: Vec<&str> = (0..30)
                .map(|j| words[(i * 7 + j * (i % 5 + 1)) % 4])
                .collect();
            format!("{{\"text\": \"{}\"}}\n", text.join(" "))
        })
        .collect();
    std::fs::write(d.join("words/a.jsonl"), records).expect("corpus");
    let job = |tokenizer: &Path| {
        let path = d.join("stage2.yaml");
        std::fs::write(
            &path,
            format!(
                "job: stage2\nseed: 11\nmodel:\n  hf: {base}\ncorpus:\n  output: {out}\n  \
                 tokenizer: {tokenizer}\n  sources:\n    - name: words\n      role: domain\n      \
                 paths: [\"{words}\"]\n      weight: 1\n      held_out: 0.1\ntraining:\n  \
                 seq_len: 32\n  global_batch: 8\n  micro_batch: 4\n  tokens: 512\ncheckpoint:\n  \
                 dir: {ck}\n  every: 2\n",
                base = base.display(),
                out = d.join("corpus2").display(),
                tokenizer = tokenizer.display(),
                words = d.join("words").display(),
                ck = d.join("ck2").display(),
            ),
        )
        .expect("job");
        path.to_string_lossy().into_owned()
    };
    let stage2 = job(&copy);
    ok(&["prepare", "--quiet", &stage2]);
    let refused = dapt(&["train", &stage2, "--stop-after", "2"]);
    let err = text(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("tokenizer_config.json")
            && err.contains("starts a document with `<s>`")
            && err.contains("prepared with no BOS"),
        "{err}"
    );
    assert!(!d.join("ck2/step-00000002").exists());
    // `dapt eval` of the base folder on that corpus says so too (it measured the base model
    // on documents without the folder's BOS without a word): a warning, as it knows no job.
    let eval = dapt(&[
        "eval",
        &base.to_string_lossy(),
        &d.join("corpus2").to_string_lossy(),
        "--seq-len",
        "8",
    ]);
    let err = text(&eval.stderr);
    assert!(eval.status.success(), "{err}");
    assert!(
        err.contains("starts a document with `<s>`") && err.contains("another form"),
        "{err}"
    );
    // The folder's own file: documents start with `<s>`, and training goes on.
    let stage2 = job(&base.join("tokenizer.json"));
    ok(&["prepare", "--quiet", &stage2]);
    let trained = dapt(&["train", &stage2, "--stop-after", "2"]);
    let log = text(&trained.stderr);
    assert!(trained.status.success(), "{log}");
    assert!(log.contains("ends sequences with other ids"), "{log}");

    // A folder whose tokenizer cannot be read without the job's corpus settings (its only end
    // token ends a chat turn: `corpus.eos_token` names it): `dapt eval`, which has no job file,
    // says the comparison was skipped instead of failing (a review).
    let base2 = d.join("base2");
    std::fs::create_dir_all(&base2).expect("mkdir");
    for entry in std::fs::read_dir(&base).expect("ls") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name != "tokenizer_config.json" {
            std::fs::copy(entry.path(), base2.join(&name)).expect("copy");
        }
    }
    let tok = std::fs::read_to_string(base2.join("tokenizer.json")).expect("read");
    std::fs::write(
        base2.join("tokenizer.json"),
        tok.replace("</s>", "<|im_end|>"),
    )
    .expect("write");
    let stage3 = d.join("stage3.yaml");
    std::fs::write(
        &stage3,
        format!(
            "job: stage3\nseed: 11\ncorpus:\n  output: {out}\n  tokenizer: {tok}\n  \
             eos_token: \"<|im_end|>\"\n  sources:\n    - name: words\n      role: domain\n      \
             paths: [\"{words}\"]\n      weight: 1\n      held_out: 0.1\n",
            out = d.join("corpus3").display(),
            tok = base2.join("tokenizer.json").display(),
            words = d.join("words").display(),
        ),
    )
    .expect("job");
    ok(&["prepare", "--quiet", &stage3.to_string_lossy()]);
    let eval = dapt(&[
        "eval",
        &base2.to_string_lossy(),
        &d.join("corpus3").to_string_lossy(),
        "--seq-len",
        "8",
    ]);
    let err = text(&eval.stderr);
    assert!(eval.status.success(), "{err}");
    assert!(
        err.contains("could not be read without the job's corpus settings"),
        "{err}"
    );
}

/// Ctrl-C on `dapt train` killed it between checkpoints without a word (the steps since the
/// last one lost; a new user's walk-through): the terminal's SIGINT (to the whole process
/// group, `dapt` and its `dapt-worker`) now stops it after the step in progress, with a
/// checkpoint of that step, says so, and exits 130; the same command resumes there.
#[test]
fn ctrl_c_on_dapt_train_checkpoints_the_step_and_says_how_to_resume() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let job = long_job(dir.path(), "interrupted");
    let mut cmd = std::process::Command::new(dapt_tests::binary("dapt"));
    cmd.args(["--log-format", "json", "train", &job])
        .process_group(0);
    let mut train = dapt_tests::Proc::spawn(cmd);
    train.wait_for("a few steps", dapt_tests::LONG, |lines| {
        dapt_tests::events(lines, "step").len() >= 3
    });
    let group = train.child.id() as i32;
    // SAFETY: signalling the process group this test started.
    unsafe {
        libc::kill(-group, libc::SIGINT);
    }
    let (status, _) = train.finish(dapt_tests::LONG);
    let stderr = train.stderr();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let said = stderr
        .lines()
        .find(|l| l.starts_with("stopped at step "))
        .unwrap_or_else(|| panic!("{stderr}"));
    let step: u64 = said["stopped at step ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a step");
    assert!(said.contains("the same command resumes"), "{said}");
    let checkpoint = dir.path().join(format!("ck/step-{step:08}"));
    assert!(checkpoint.join("model.safetensors").is_file(), "{said}");
    // Resumed there.
    let out = dapt(&["train", &job, "--stop-after", &(step + 1).to_string()]);
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("resumed from checkpoint step={step}")),
        "{log}"
    );
}

/// `dapt train` killed alone (SIGKILL to its pid: no handler runs) left its `dapt-worker`
/// training to the end, unsupervised, holding checkpoint.dir's lock (an audit). The worker now
/// sees the end of the pipe the `dapt` held and stops after its step with a checkpoint, as for
/// a Ctrl-C; the same command resumes there.
#[test]
fn a_killed_dapt_train_stops_its_worker_with_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = long_job(dir.path(), "orphan");
    let mut cmd = std::process::Command::new(dapt_tests::binary("dapt"));
    cmd.args(["--log-format", "json", "train", &job]);
    let mut train = dapt_tests::Proc::spawn(cmd);
    train.wait_for("a few steps", dapt_tests::LONG, |lines| {
        dapt_tests::events(lines, "step").len() >= 3
    });
    train.child.kill().expect("SIGKILL dapt");
    let _ = train.child.wait();
    // The worker's checkpoint of the step it was in, long before the job's first (step 1000).
    let deadline = std::time::Instant::now() + dapt_tests::LONG;
    let step = loop {
        let found = std::fs::read_dir(dir.path().join("ck"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("step-")?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        if let Some(step) = found {
            break step;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker trained on without a checkpoint:\n{}",
            train.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(step < 1000, "{step}");
    // Its lock is given back once it exits: the same command resumes there.
    let log = loop {
        let out = dapt(&["train", &job, "--stop-after", &(step + 1).to_string()]);
        let log = text(&out.stderr);
        if out.status.success() {
            break log;
        }
        assert!(
            log.contains("is in use") && std::time::Instant::now() < deadline,
            "{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        log.contains(&format!("resumed from checkpoint step={step}")),
        "{log}"
    );
}
