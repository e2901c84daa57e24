//! The worker binary refuses a misspelt kernel choice (`DAPT_MATMUL`, `DAPT_ATTENTION`,
//! `DAPT_ATTENTION_BLOCK`) at its start, naming the variable and the values it takes, instead of
//! silently running the default.

use std::process::Command;

fn worker_with(var: &str, value: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dapt-worker"))
        .env(var, value)
        .args(["batches", "no-such-job.yaml", "--steps", "1", "--out"])
        .arg(std::env::temp_dir().join("dapt-env-choices.u32"))
        .output()
        .expect("run dapt-worker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_misspelt_matmul_choice_is_refused_by_name() {
    let (ok, stderr) = worker_with("DAPT_MATMUL", "fastest");
    assert!(!ok);
    assert!(
        stderr.contains("DAPT_MATMUL=\"fastest\"") && stderr.contains("cublas"),
        "{stderr}"
    );
    // A known name passes the check (the job file is what fails then).
    let (ok, stderr) = worker_with("DAPT_MATMUL", "cublas");
    assert!(!ok);
    assert!(!stderr.contains("DAPT_MATMUL"), "{stderr}");
    assert!(stderr.contains("no-such-job.yaml"), "{stderr}");
}

#[test]
fn a_misspelt_attention_choice_is_refused_by_name() {
    let (ok, stderr) = worker_with("DAPT_ATTENTION", "flash");
    assert!(!ok);
    assert!(
        stderr.contains("DAPT_ATTENTION=\"flash\"") && stderr.contains("blockwise"),
        "{stderr}"
    );
}

#[test]
fn a_bad_attention_block_is_refused_by_name() {
    let (ok, stderr) = worker_with("DAPT_ATTENTION_BLOCK", "0");
    assert!(!ok);
    assert!(stderr.contains("DAPT_ATTENTION_BLOCK=\"0\""), "{stderr}");
    let (ok, stderr) = worker_with("DAPT_ATTENTION_BLOCK", "256");
    assert!(!ok);
    assert!(!stderr.contains("DAPT_ATTENTION_BLOCK"), "{stderr}");
    assert!(stderr.contains("no-such-job.yaml"), "{stderr}");
}
