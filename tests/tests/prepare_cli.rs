//! `dapt prepare` over the real binary, on the quickstart's real text.

use dapt_tests::{dapt, repo_root, text};

fn quickstart_job(dir: &std::path::Path, weight: &str) -> std::path::PathBuf {
    let corpus = repo_root().join("examples/quickstart/corpus");
    let job = format!(
        "job: e2e\nseed: 1\ncorpus:\n  output: {out}\n  vocab_size: 2048\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: {weight}\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\n      held_out: 0.2\ntraining:\n  seq_len: 128\n  global_batch: 8\n  tokens: 200000\n",
        out = dir.join("corpus").display(),
        c = corpus.display(),
    );
    let path = dir.join("job.yaml");
    std::fs::write(&path, job).expect("write job");
    path
}

#[test]
fn prepare_writes_a_report_then_does_nothing_then_rebuilds_a_damaged_corpus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = quickstart_job(dir.path(), "3");
    let job = job.to_str().expect("utf-8 path");

    let out = dapt(&["prepare", job]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, text(&out.stderr));
    assert!(
        stdout.contains("postgres") && stdout.contains("sotu"),
        "{stdout}"
    );
    assert!(stdout.contains("split worst"), "{stdout}");
    assert!(
        stdout.contains("prepared") && stdout.contains("tokens/s"),
        "{stdout}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("corpus/manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["token_dtype"], "u16");
    assert_eq!(manifest["sources"][0]["name"], "postgres");
    assert!(dir.path().join("corpus/report.json").is_file());

    let again = dapt(&["prepare", job]);
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("up to date"),
        "{}",
        text(&again.stdout)
    );

    let shard = dir.path().join("corpus/postgres/train-00000.tok");
    let mut bytes = std::fs::read(&shard).expect("shard");
    bytes[100] ^= 0xff;
    std::fs::write(&shard, bytes).expect("write");
    let rebuilt = dapt(&["prepare", job]);
    assert!(rebuilt.status.success());
    assert!(
        text(&rebuilt.stdout).contains("prepared"),
        "{}",
        text(&rebuilt.stdout)
    );
    let stderr = text(&rebuilt.stderr);
    assert!(
        stderr.contains("failed verification") && stderr.contains("train-00000.tok"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_job_file_names_the_field_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = quickstart_job(dir.path(), "-1");
    let out = dapt(&["prepare", job.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("corpus.sources[0].weight"), "{stderr}");
    assert!(stderr.contains("line 10"), "{stderr}");
    assert!(stderr.contains(">= 0"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("corpus").exists());
}
