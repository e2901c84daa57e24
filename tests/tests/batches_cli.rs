//! The GPU run's helper subcommands over the real binaries: `dapt-worker batches` (the token
//! windows a single rank trains on, the file scripts/gpu-check.sh gives PyTorch for the loss
//! parity) and `dapt-worker tune` (where no GPU is, a clear error and nothing written).

use std::process::Command;

use dapt_tests::{binary, dapt, repo_root, text};

const SEQ: usize = 32;
const BATCH: usize = 8;

#[test]
fn batches_writes_each_steps_windows_once_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = repo_root().join("examples/quickstart/corpus");
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "job: batches\nseed: 3\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: 3\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\n      held_out: 0.2\ntraining:\n  seq_len: {SEQ}\n  global_batch: {BATCH}\n  micro_batch: 4\n  tokens: 4096\ncheckpoint:\n  dir: {ck}\n  every: 2\n",
            out = dir.path().join("corpus").display(),
            c = corpus.display(),
            ck = dir.path().join("ck").display(),
        ),
    )
    .expect("write job");
    let prepared = dapt(&["prepare", &job.to_string_lossy(), "--quiet"]);
    assert!(prepared.status.success(), "{}", text(&prepared.stderr));

    let batches = |out: &std::path::Path, steps: &str| {
        Command::new(binary("dapt-worker"))
            .args(["batches", &job.to_string_lossy(), "--steps", steps, "--out"])
            .arg(out)
            .output()
            .expect("run dapt-worker")
    };
    let read = |path: &std::path::Path| -> Vec<u32> {
        std::fs::read(path)
            .expect("read")
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };

    let a = dir.path().join("a.u32");
    let out = batches(&a, "3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ids = read(&a);
    let width = SEQ + 1;
    assert_eq!(
        ids.len(),
        3 * BATCH * width,
        "[steps, global_batch, seq_len + 1]"
    );
    assert!(
        ids.iter().all(|&id| id < 512),
        "an id outside the vocabulary"
    );
    let steps: Vec<&[u32]> = ids.chunks_exact(BATCH * width).collect();
    assert_ne!(steps[0], steps[1], "step 1 repeats step 0's windows");
    let windows: Vec<&[u32]> = ids.chunks_exact(width).collect();
    assert!(windows.windows(2).any(|w| w[0] != w[1]));

    // The same job gives the same windows, and a longer run starts with the shorter one's.
    let b = dir.path().join("b.u32");
    assert!(batches(&b, "4").status.success());
    let longer = read(&b);
    assert_eq!(&longer[..ids.len()], &ids[..]);
    assert_eq!(longer.len(), 4 * BATCH * width);

    // An existing file is left as it was, with an error that names it.
    std::fs::write(&a, b"mine").expect("write");
    let out = batches(&a, "3");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&*a.to_string_lossy()),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&a).expect("read"), b"mine");
}

#[test]
fn tune_needs_a_gpu_device_and_a_cuda_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "job: tune\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"unused\"]\n      weight: 1\ntraining:\n  seq_len: {SEQ}\n  global_batch: {BATCH}\n  tokens: 4096\ncheckpoint:\n  dir: {ck}\n",
            out = dir.path().join("corpus").display(),
            ck = dir.path().join("ck").display(),
        ),
    )
    .expect("write job");
    let tune = |device: &[&str]| {
        Command::new(binary("dapt-worker"))
            .arg("tune")
            .arg(&job)
            .args(device)
            .output()
            .expect("run dapt-worker")
    };
    let out = tune(&[]);
    assert!(!out.status.success());
    // `dapt tune` is the same command.
    let via_dapt = dapt(&["tune", &job.to_string_lossy()]);
    assert!(!via_dapt.status.success());
    assert!(
        text(&via_dapt.stderr).contains("give --device cuda"),
        "{}",
        text(&via_dapt.stderr)
    );
    assert!(
        text(&out.stderr).contains("give --device cuda"),
        "{}",
        text(&out.stderr)
    );
    // The tests' build has no `cuda` feature: the same sentence as `train --device cuda`.
    let out = tune(&["--device", "cuda"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("without the `cuda` feature") || err.contains("no CUDA driver"),
        "{err}"
    );
    assert!(
        !dir.path().join("ck").exists(),
        "tune wrote a checkpoint folder"
    );
}
