//! `dapt plan` over the real binary: the figures a user checks against a budget.

use dapt_tests::{dapt, repo_root, text};

#[test]
fn plans_a_seven_billion_parameter_job_and_names_bad_flags() {
    let job = repo_root().join("examples/llama2-7b/job.yaml");
    let job = job.to_str().expect("utf-8");
    let out = dapt(&[
        "plan",
        job,
        "--gpu",
        "h100",
        "--gpus",
        "8",
        "--price-per-gpu-hour",
        "2",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("6.738 B parameters"), "{stdout}");
    assert!(
        stdout.contains("954 steps x 1048576 tokens per step"),
        "{stdout}"
    );
    assert!(stdout.contains("32.9 GPU-hours on H100"), "{stdout}");
    assert!(
        stdout.contains("cost: $66 at $2.00 per GPU-hour"),
        "{stdout}"
    );
    assert!(
        stdout.contains("does not fit") && stdout.contains("H200"),
        "{stdout}"
    );

    let out = dapt(&["plan", job, "--gpu", "h200"]);
    assert!(out.status.success());
    assert!(
        !text(&out.stdout).contains("does not fit"),
        "{}",
        text(&out.stdout)
    );

    let out = dapt(&["plan", job, "--gpu", "v100"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("v100") && stderr.contains("h100, h200, a100"),
        "{stderr}"
    );
}
