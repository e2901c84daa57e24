//! The whole GPU step through the real worker binary, on Vulkan: `dapt-worker train --device
//! vulkan` (the resident engine with every fused kernel, the gradient accumulation, the norm's
//! and AdamW's kernels, as a `--device cuda` rank runs them) against `--device cpu` (the host
//! trainer) on the same job: the same losses and gradient norms, step by step, to 1e-5 (seen: 3e-7).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's `dapt` binary, beside this package's worker (the README's test command
/// builds every binary first).
fn dapt() -> PathBuf {
    let worker = Path::new(env!("CARGO_BIN_EXE_dapt-worker"));
    let dapt = worker.with_file_name("dapt");
    assert!(
        dapt.is_file(),
        "{} is missing: `cargo build --workspace --bins` first",
        dapt.display()
    );
    dapt
}

/// (loss, grad norm) of each `step` line of a `--log-format json` run.
fn steps(stderr: &str) -> Vec<(f64, f64)> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "step")
        .map(|v| {
            let f = |k: &str| {
                v["fields"][k]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{k} in {v}"))
            };
            (f("loss"), f("grad_norm"))
        })
        .collect()
}

#[test]
fn the_gpu_step_on_vulkan_trains_like_the_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/corpus");
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "job: vulkan\nseed: 5\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: 3\n      held_out: 0.2\ntraining:\n  seq_len: 32\n  global_batch: 8\n  micro_batch: 2\n  tokens: 1024\n  eval_tokens: 1024\n  optimizer:\n    lr: 0.003\ncheckpoint:\n  dir: {ck}\n  every: 100\n",
            out = dir.path().join("corpus").display(),
            c = corpus.display(),
            ck = dir.path().join("ck").display(),
        ),
    )
    .expect("job");
    let prepared = Command::new(dapt())
        .arg("prepare")
        .arg(&job)
        .output()
        .expect("dapt prepare");
    assert!(
        prepared.status.success(),
        "{}",
        String::from_utf8_lossy(&prepared.stderr)
    );
    let train = |device: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_dapt-worker"))
            .args(["--log-format", "json", "train"])
            .arg(&job)
            .args(["--device", device, "--no-checkpoints"])
            .output()
            .expect("dapt-worker train");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "--device {device}: {stderr}");
        steps(&stderr)
    };
    let cpu = train("cpu");
    let vulkan = train("vulkan");
    assert_eq!(cpu.len(), 4, "four steps: {cpu:?}");
    assert_eq!(vulkan.len(), cpu.len(), "{vulkan:?}");
    // The two differ by f32 summation order only (the JSON log keeps every digit).
    for (step, ((l0, n0), (l1, n1))) in cpu.iter().zip(&vulkan).enumerate() {
        println!("step {step}: cpu {l0} / {n0}, vulkan {l1} / {n1}");
        assert!(
            (l0 - l1).abs() <= 1e-5 * l0,
            "step {step}: loss {l1} against {l0}"
        );
        assert!(
            (n0 - n1).abs() <= 1e-5 * n0,
            "step {step}: grad norm {n1} against {n0}"
        );
    }
    assert!(cpu[3].0 < cpu[0].0, "the loss falls: {cpu:?}");
}
