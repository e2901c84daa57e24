//! The GPU check's scripts on this machine (no GPU): `scripts/gpu-check.sh` parses, and
//! `scripts/gpu_results.py` reads logs as the GPU run writes them: which `DAPT_MATMUL`
//! strategy it picks (the fastest against Burn's matmul in its own process, with no wrong
//! result and no failed check), and the allocator's figures of a training log. A device run is
//! one try in a scarce budget; what it hands back must be read right the first time.

use std::fs;
use std::path::Path;
use std::process::Command;

use dapt_tests::repo_root;

/// One strategy's timing log as `gpu_speed_of_matmul_strategies` prints it under
/// `--nocapture` (the first line follows libtest's `test NAME ... `), and its rc.
fn timing(logs: &Path, strategy: &str, burn_s: f64, s: Option<f64>, wrong: bool, rc: i32) {
    let status = if wrong { "wrong" } else { "ok" };
    let mut text = format!(
        "test matmul::gpu_speed_of_matmul_strategies ... matmul_timing strategy={strategy} \
         shape=\"q,o fwd\" batch=1 m=4096 n=2048 k=2048 layout=nt per_step=128 burn_ms=1.0 \
         ms=0.5 burn_tflops=34.4 tflops=68.7 rel_err=1.0e-3 status=ok\n\
         matmul_timing strategy={strategy} shape=\"attn P V, dS K\" batch=32 m=1024 n=64 \
         k=640 layout=nn per_step=512 burn_ms=0.1 ms=0.1 burn_tflops=1 tflops=1 rel_err=1e-1 \
         status={status}\n\
         matmul_timing strategy={strategy} shape=\"head dW\" batch=1 m=8192 n=2048 k=4096 \
         layout=tn per_step=64 burn_ms=2.0 status=unsupported error=\"Cublas(\\\"a layout\\\")\"\n"
    );
    if let Some(s) = s {
        text += &format!("matmul_step strategy={strategy} burn_s={burn_s} s={s}\nok\n");
    }
    fs::write(logs.join(format!("mmbench-{strategy}.log")), text).expect("write");
    fs::write(
        logs.join(format!("mmbench-{strategy}.rc")),
        format!("{rc}\n"),
    )
    .expect("write");
}

/// One strategy's check log (libtest under `--nocapture`), failing `failed` if given.
fn checks(logs: &Path, strategy: &str, failed: Option<&str>) {
    let mut text = String::from(
        "running 2 tests\ntest matmul::linear_on_the_gpu_matches_burns_node_on_the_cpu ... ok\n\
         test matmul::strategies_match_the_cpu_in_every_layout ... ",
    );
    let rc = match failed {
        Some(test) => {
            text += &format!(
                "\nthread 'matmul::{test}' panicked at x.rs:1:1:\nwrong\nFAILED\n\nfailures:\n\n\
                 failures:\n    matmul::{test}\n\ntest result: FAILED. 1 passed; 1 failed\n"
            );
            101
        }
        None => {
            text += "ok\n\ntest result: ok. 2 passed; 0 failed\n";
            0
        }
    };
    fs::write(logs.join(format!("mmcheck-{strategy}.log")), text).expect("write");
    fs::write(
        logs.join(format!("mmcheck-{strategy}.rc")),
        format!("{rc}\n"),
    )
    .expect("write");
}

fn results(logs: &Path, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo_root().join("scripts/gpu_results.py"))
        .arg("--logs")
        .arg(logs)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The whole report of `logs` (`results.json`).
fn report(logs: &Path) -> serde_json::Value {
    let out = logs.join("out");
    fs::create_dir_all(&out).expect("mkdir");
    let anchor = repo_root().join("scripts/gpu_anchor.py");
    let (out_arg, anchor_arg) = (
        out.to_str().expect("utf-8"),
        anchor.to_str().expect("utf-8"),
    );
    results(logs, &["--out", out_arg, "--anchor", anchor_arg]);
    let text = fs::read_to_string(out.join("results.json")).expect("results.json");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn gpu_check_parses() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(repo_root().join("scripts/gpu-check.sh"))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_fastest_right_matmul_strategy_is_picked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path();
    // 2x Burn's, checked: the pick unless a faster right one exists.
    timing(logs, "double-tma-mma", 2.0, Some(1.0), false, 0);
    checks(logs, "double-tma-mma", None);
    // 4x but one wrong problem; 5x but a failed check; 6x but the timing never finished.
    timing(logs, "double-unit", 2.0, Some(0.5), true, 0);
    checks(logs, "double-unit", None);
    timing(logs, "cublas", 2.0, Some(0.4), false, 0);
    checks(
        logs,
        "cublas",
        Some("strategies_match_the_cpu_in_every_layout"),
    );
    timing(logs, "simple-tma-mma", 2.0, None, false, 124);
    // 1.02x: under the 3% margin.
    timing(logs, "simple-cyclic-mma", 2.0, Some(1.96), false, 0);
    assert_eq!(results(logs, &["--best-matmul"]), "double-tma-mma");
    // Its check timed out (rc 124, no failure listed): ruled out too; then nothing is picked.
    fs::write(logs.join("mmcheck-double-tma-mma.rc"), "124\n").expect("write");
    assert_eq!(results(logs, &["--best-matmul"]), "burn");

    // The whole report: the failed check named, the refusal and the wrong problem listed.
    checks(logs, "double-tma-mma", None);
    let json = report(logs);
    assert_eq!(json["best_matmul"], "double-tma-mma");
    let cublas = &json["matmul_strategies"]["cublas"];
    assert_eq!(
        cublas["checks"]["matmul::strategies_match_the_cpu_in_every_layout"],
        "FAILED"
    );
    assert_eq!(
        cublas["checks"]["matmul::linear_on_the_gpu_matches_burns_node_on_the_cpu"],
        "ok"
    );
    assert_eq!(cublas["unsupported"][0], "head dW");
    assert_eq!(
        json["matmul_strategies"]["double-unit"]["wrong"][0],
        "attn P V, dS K"
    );
    assert_eq!(
        json["matmul_strategies"]["simple-tma-mma"]["step_s"],
        serde_json::Value::Null
    );
}

#[test]
fn a_training_log_gives_the_allocators_figures_and_the_matmul() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path();
    let mut log = String::from(
        "{\"fields\":{\"message\":\"matmul on the GPU (DAPT_MATMUL)\",\"matmul\":\"cublas\"}}\n",
    );
    for (step, reserved) in [(1, "48000"), (2, "49000"), (3, "47000")] {
        log += &format!(
            "{{\"fields\":{{\"message\":\"step\",\"step\":{step},\"loss\":\"10.0\",\
             \"tokens_per_s\":\"6000\"}}}}\n\
             {{\"fields\":{{\"message\":\"step phases\",\"forward_backward_s\":\"2.0\",\
             \"all_reduce_s\":\"0.0\",\"clip_adamw_s\":\"0.1\",\"device_in_use_mib\":\"3000{step}\",\
             \"device_reserved_mib\":\"{reserved}\"}}}}\n"
        );
    }
    fs::write(logs.join("matmul-1b-bf16.log"), log).expect("write");
    fs::write(logs.join("matmul-1b-bf16.rc"), "0\n").expect("write");
    let json = report(logs);
    let run = &json["runs"][0];
    assert_eq!(run["name"], "matmul-1b-bf16");
    assert_eq!(run["matmul"], "cublas");
    assert_eq!(run["allocator_mib"]["last_in_use"], 30003.0);
    assert_eq!(run["allocator_mib"]["max_reserved"], 49000.0);
}
