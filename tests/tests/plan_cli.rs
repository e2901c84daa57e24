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
    // dapt's own MFU (none measured on an H100: the H200's 6.8%), said as such.
    assert!(stdout.contains("193.7 GPU-hours on H100"), "{stdout}");
    assert!(
        stdout.contains("6.8% MFU (none measured on H100"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cost: $387 at $2.00 per GPU-hour"),
        "{stdout}"
    );
    // The example asks for ZeRO stage 2 with recompute: it fits 8 x 80 GB.
    assert!(
        stdout
            .contains("at zero_stage 2, activation_checkpointing true, micro_batch 1 over 8 ranks"),
        "{stdout}"
    );
    assert!(!stdout.contains("does not fit"), "{stdout}");

    // A small job on the CPU in the CPU's units and minutes (it said "0.0 GPU-hours on CPU ...
    // 0.0 h wall on 2 GPUs", "$0"; a new user's walk-through).
    let quickstart = repo_root().join("examples/quickstart/job.yaml");
    let out = dapt(&[
        "plan",
        quickstart.to_str().expect("utf-8"),
        "--gpu",
        "cpu",
        "--gpus",
        "2",
    ]);
    let cpu = text(&out.stdout);
    assert!(out.status.success(), "{cpu}");
    // Two ranks on one machine share its cores (the plan said half the time; a new user's
    // walk-through): the machine's whole time is named for them.
    assert!(
        cpu.contains(" CPU-minutes on CPU")
            && cpu.contains(" min wall on 2 machines, a rank each (")
            && cpu.contains(" min when the 2 ranks share one machine's cores"),
        "{cpu}"
    );

    // A given MFU is the user's, and the plan says so.
    let out = dapt(&["plan", job, "--gpu", "h100", "--mfu", "0.4"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("32.9 GPU-hours on H100")
            && stdout.contains("40.0% MFU (given with --mfu, not measured)"),
        "{stdout}"
    );

    // One H100 holds the states only with ZeRO across ranks: the plan says it does not fit
    // and that no stage helps with one rank.
    let out = dapt(&["plan", job, "--gpu", "h100", "--gpus", "1"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("does not fit"), "{stdout}");

    let out = dapt(&["plan", job, "--gpu", "v100"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("v100") && stderr.contains("h100, h200, a100"),
        "{stderr}"
    );
}
