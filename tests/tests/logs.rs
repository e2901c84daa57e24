//! The coordinator's log as people and machines read it, over the real binaries: a `dapt
//! launch` into files has no terminal escape codes (nor have the workers' log files), its text
//! step lines parse with the regular expression docs/control-plane.md documents and carry the
//! JSON lines' values rounded, the banner and the end summary say what the job is and did, and
//! colour follows `--color` and `NO_COLOR` on a real terminal (a pseudo-terminal).

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dapt_tests::{binary, events, repo_root, serial, write_job, Job, LONG};

const ESC: u8 = 0x1b;

/// The step line's regular expression, read from docs/control-plane.md (the one place it is
/// written down).
fn documented_regex() -> regex::Regex {
    let doc = repo_root().join("docs/control-plane.md");
    let text = std::fs::read_to_string(&doc).expect("docs/control-plane.md");
    let start = text
        .find("```regex\n")
        .expect("a ```regex block in docs/control-plane.md")
        + 9;
    let len = text[start..].find("\n```").expect("the regex block ends");
    regex::Regex::new(text[start..start + len].trim()).expect("the documented regex compiles")
}

/// A 10-step job that evaluates and checkpoints every 5 steps.
fn job(dir: &Path) -> Job {
    let job = write_job(dir, "logs", 10, "");
    let text = std::fs::read_to_string(&job.path).expect("job file");
    let text = text.replace("  optimizer:\n", "  eval_every: 5\n  optimizer:\n");
    std::fs::write(&job.path, text).expect("job file");
    job
}

/// Runs `dapt ARGS launch JOB --workers N` with stdout and stderr in files, without any colour
/// setting from the environment; returns (stdout, stderr) as bytes.
fn launch_to_files(job: &Job, workers: u32, args: &[&str], dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let out = dir.join("stdout.txt");
    let err = dir.join("stderr.txt");
    let mut child = Command::new(binary("dapt"))
        .args(args)
        .arg("launch")
        .arg(&job.path)
        .args(["--workers", &workers.to_string()])
        .env_remove("NO_COLOR")
        .env_remove("DAPT_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("dapt launch");
    let deadline = Instant::now() + LONG;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dapt launch did not finish within {LONG:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (
        std::fs::read(&out).expect("stdout"),
        std::fs::read(&err).expect("stderr"),
    );
    assert!(
        status.success(),
        "{status}\n{}\n{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (stdout, stderr)
}

fn worker_logs(job: &Job) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(job.checkpoints.join("logs"))
        .expect("worker logs")
        .map(|e| e.expect("entry").path())
        .collect();
    logs.sort();
    logs
}

/// `text` is `json` rounded to `digits` significant digits (the text format's rounding).
fn rounded_from(text: &str, json: f64, digits: i32) -> bool {
    let t: f64 = text.parse().expect("a number");
    (t - json).abs() <= 0.5 * 10f64.powi(1 - digits) * json.abs() * 1.0001
}

#[test]
fn a_launch_into_files_reads_plainly_and_its_step_lines_match_the_json_ones() {
    let re = documented_regex();
    let text_dir = tempfile::tempdir().expect("tempdir");
    let json_dir = tempfile::tempdir().expect("tempdir");
    let (text_job, json_job) = (job(text_dir.path()), job(json_dir.path()));
    let _serial = serial();
    let (stdout, stderr) = launch_to_files(&text_job, 2, &[], text_dir.path());
    let (_, json_stderr) =
        launch_to_files(&json_job, 2, &["--log-format", "json"], json_dir.path());

    // No escape byte anywhere: the coordinator's log, its summary, the workers' log files.
    assert!(
        !stderr.contains(&ESC),
        "{}",
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        !stdout.contains(&ESC),
        "{}",
        String::from_utf8_lossy(&stdout)
    );
    let logs = worker_logs(&text_job);
    assert_eq!(logs.len(), 2, "{logs:?}");
    for log in &logs {
        let bytes = std::fs::read(log).expect("worker log");
        assert!(
            !bytes.is_empty() && !bytes.contains(&ESC),
            "{}",
            log.display()
        );
    }

    // Every text step line parses, and says what the JSON line says.
    let stderr = String::from_utf8(stderr).expect("utf-8");
    let text_steps: Vec<regex::Captures> = stderr
        .lines()
        .filter(|l| l.contains(" INFO step="))
        .map(|l| {
            re.captures(l)
                .unwrap_or_else(|| panic!("unparsed step line: {l}"))
        })
        .collect();
    let json_lines: Vec<serde_json::Value> = String::from_utf8_lossy(&json_stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let json_steps = events(&json_lines, "step");
    assert_eq!(text_steps.len(), 10, "{stderr}");
    assert_eq!(json_steps.len(), 10);
    for (t, j) in text_steps.iter().zip(&json_steps) {
        let step = j["step"].as_u64().expect("step");
        assert_eq!(t["done"].parse::<u64>().expect("done"), step + 1);
        assert_eq!(t["total"].parse::<u64>().expect("total"), 10);
        // Loss and gradient norm with 4 significant digits, the LR with 3.
        for (name, digits) in [("loss", 4), ("grad_norm", 4), ("lr", 3)] {
            let value = j[name].as_f64().expect("a float");
            assert!(
                rounded_from(&t[name], value, digits),
                "step {step} {name}: text {} json {value}",
                &t[name]
            );
        }
        assert_eq!(t["world"], j["world"].to_string());
        assert_eq!(t["gen"], j["generation"].to_string());
        // Throughput and times differ between the two runs; the JSON keeps them unrounded.
        assert!(j["tokens_per_s"].as_f64().expect("tokens_per_s").fract() != 0.0);
        // Steps 5 and 10 evaluated and checkpointed, and say so, with their time split.
        let split = (step + 1) % 5 == 0;
        assert_eq!(t.name("also").is_some(), split, "step {step}");
        assert_eq!(
            j["checkpoint_s"].as_f64().expect("checkpoint_s") > 0.0,
            split
        );
        assert_eq!(j["eval_s"].as_f64().expect("eval_s") > 0.0, split);
        if split {
            assert_eq!(&t["also"], "evaluated and checkpointed");
            assert!(t.name("eval").is_some() && t.name("checkpoint").is_some());
        }
    }
    // The JSON step line keeps its full-precision fields for machines.
    let loss = json_steps[0]["loss"].as_f64().expect("loss");
    assert!(format!("{loss}").len() > 8, "{loss}");

    // The banner and the end summary.
    for what in [
        "job logs",
        "parameters",
        "10 steps of 7 samples x 32 tokens",
        "2 workers on cpu",
    ] {
        assert!(stderr.contains(what), "banner lacks {what:?}:\n{stderr}");
    }
    let stdout = String::from_utf8(stdout).expect("utf-8");
    for what in [
        "job completed at step 10",
        "tokens trained     2,240 (steps 0 to 10)",
        "held-out perplexity",
        "postgres",
        "sotu",
        "recoveries         0",
        "final checkpoint",
        "Hugging Face export",
    ] {
        assert!(stdout.contains(what), "summary lacks {what:?}:\n{stdout}");
    }
    assert!(
        events(&json_lines, "job summary")[0]["tokens_trained"] == 2240,
        "{json_lines:?}"
    );
}

#[test]
fn always_colours_even_files_including_the_workers_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "always", 2, "");
    let _serial = serial();
    let (_, stderr) = launch_to_files(&job, 1, &["--color", "always"], dir.path());
    assert!(stderr.contains(&ESC));
    for log in worker_logs(&job) {
        assert!(
            std::fs::read(&log).expect("log").contains(&ESC),
            "{}",
            log.display()
        );
    }
}

/// What `dapt coordinator` writes to a terminal (a pseudo-terminal) until it listens, with
/// `env` set and `args` before the subcommand.
fn on_a_terminal(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "tty", 2, "");
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the locals; the name, termios and size are optional.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both fds were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(args)
        .arg("coordinator")
        .arg(&job.path)
        .args(["--listen", "127.0.0.1:0"])
        .env("DAPT_TOKEN", "0123456789abcdef0123456789abcdef")
        .env_remove("NO_COLOR")
        .env_remove("DAPT_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(slave);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("dapt coordinator");
    drop(cmd);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.extend(chunk);
        }
        if String::from_utf8_lossy(&seen).contains("coordinator listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.contains("coordinator listening"), "{text}");
    text
}

#[test]
fn a_terminal_gets_colour_unless_no_color_or_never_says_otherwise() {
    let esc = char::from(ESC);
    assert!(on_a_terminal(&[], &[]).contains(esc));
    assert!(!on_a_terminal(&[], &[("NO_COLOR", "1")]).contains(esc));
    // An empty NO_COLOR is no request (no-color.org).
    assert!(on_a_terminal(&[], &[("NO_COLOR", "")]).contains(esc));
    assert!(!on_a_terminal(&["--color", "never"], &[]).contains(esc));
    assert!(!on_a_terminal(&[], &[("DAPT_COLOR", "never")]).contains(esc));
    // An explicit `always` wins over NO_COLOR.
    assert!(on_a_terminal(&["--color", "always"], &[("NO_COLOR", "1")]).contains(esc));
}
