//! The dashboard of a running `dapt launch` job in a real browser: headless Chromium loads the
//! page the launcher prints, runs its script, and the test reads what it rendered (the charts'
//! points, the generation timeline after a killed worker) and saves a screenshot under
//! `target/tmp/dashboard/`. Without Chromium it is skipped, except in CI (`.ci/run` installs
//! Debian's `chromium`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dapt_tests::{binary, events, http_get, repo_root, serial, Proc, LONG};

/// Chromium on this machine, if any.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            let path = String::from_utf8(out.stdout).ok()?;
            let path = path.trim();
            (!path.is_empty()).then(|| PathBuf::from(path))
        })
}

/// Runs headless Chromium on `url` with `args` (bounded: killed after a minute); its stdout.
fn browse(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            // Root in a container has no user namespace for the sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("reader")
}

/// The value of `attr` on the first element of the DOM that has `marker` in its tag.
fn attribute<'a>(dom: &'a str, marker: &str, attr: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let value = tag.split(&format!(" {attr}=\"")).nth(1)?;
    value.split('"').next()
}

/// A tiny-model job like the tests' `write_job`, evaluated every 4 steps (so there is a base
/// perplexity at step 0 and a line to draw), long enough to be running while the browser looks.
fn write_job(dir: &Path, steps: u64) -> PathBuf {
    let corpus = repo_root().join("examples/quickstart/corpus");
    let job = format!(
        "job: dashboard\nseed: 5\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: 3\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\n      held_out: 0.2\ntraining:\n  seq_len: 32\n  global_batch: 7\n  micro_batch: 2\n  tokens: {tokens}\n  eval_every: 4\n  eval_tokens: 512\n  optimizer:\n    lr: 0.003\ncheckpoint:\n  dir: {ck}\n  every: 5\n  keep: 2\ncluster:\n  session_timeout_ms: 2000\n",
        out = dir.join("corpus").display(),
        c = corpus.display(),
        ck = dir.join("ck").display(),
        tokens = steps * 7 * 32,
    );
    let path = dir.join("dashboard.yaml");
    std::fs::write(&path, job).expect("write job");
    path
}

#[test]
fn the_dashboard_of_a_launched_job_renders_its_charts_and_the_recovery_in_chromium() {
    let Some(chromium) = chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not installed (.ci/run installs it)");
        }
        println!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out).expect("output dir");
    let job = write_job(dir.path(), 2000);
    let _serial = serial();
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "launch"])
        .arg(&job)
        .args(["--workers", "2"]);
    let mut launch = Proc::spawn(cmd);
    launch.wait_for("the banner", LONG, |l| {
        !events(l, "job starting").is_empty()
    });
    let banner = launch.events("job starting");
    let url = banner[0]["dashboard"]
        .as_str()
        .expect("the banner names the dashboard")
        .to_string();
    println!("dashboard at {url}");
    let addr = url
        .strip_prefix("http://")
        .and_then(|a| a.strip_suffix('/'))
        .expect("http://ADDR/")
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );

    // Two ranks train; then worker-1 is killed and the job re-forms with worker-0 alone.
    launch.wait_for("step 6", LONG, |l| {
        events(l, "step")
            .iter()
            .any(|f| f["step"].as_u64() >= Some(6))
    });
    let victim = launch
        .events("worker started")
        .iter()
        .find(|f| f["worker"] == "worker-1")
        .and_then(|f| f["pid"].as_u64())
        .expect("worker-1's pid");
    // SAFETY: kill(2) on a worker this test's launcher started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    launch.wait_for("a step of generation 2", LONG, |l| {
        events(l, "step")
            .iter()
            .any(|f| f["generation"].as_u64() >= Some(2))
    });

    let (head, json) = http_get(&addr, "/api/dashboard");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let api: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(api["job"], "dashboard");
    let api_points = api["series"]["loss"].as_array().expect("loss").len();
    // Steps after the committed one (step 5) were trained again in generation 2 and replaced
    // their first points: one point per step done.
    assert!(api_points >= 6, "{api_points}");
    assert_eq!(
        Some(api_points as u64),
        api["latest"]["step"].as_u64(),
        "{json}"
    );
    // The job's token (in the workers' environment) is on neither the JSON nor the page.
    let survivor = launch
        .events("worker started")
        .iter()
        .find(|f| f["worker"] == "worker-0")
        .and_then(|f| f["pid"].as_u64())
        .expect("worker-0's pid");
    let environ = std::fs::read(format!("/proc/{survivor}/environ")).expect("environ");
    let token = environ
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"DAPT_TOKEN="))
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .expect("the workers' token");
    assert!(token.len() >= 32 && !json.contains(&token));

    // The page, after its script polled at least once (virtual time runs the timers).
    let profile = dir.path().join("chromium");
    let dom = browse(
        &chromium,
        &profile,
        &["--virtual-time-budget=5000", "--dump-dom"],
        &url,
    );
    std::fs::write(out.join("dashboard.html"), &dom).expect("save the DOM");
    let polls: u32 = attribute(&dom, "<body", "data-polls")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(polls >= 1, "the script did not refresh the panels:\n{dom}");
    // The charts' points: as many as the JSON had a moment before, or more (it is live).
    let points: usize = attribute(&dom, "data-series=\"loss\"", "data-points")
        .and_then(|p| p.parse().ok())
        .expect("a loss line");
    assert!(points >= api_points, "{points} < {api_points}");
    let drawn = attribute(&dom, "data-series=\"loss\"", "points").expect("the line's points");
    assert_eq!(drawn.split(' ').count(), points);
    for series in [
        "learning_rate",
        "tokens_per_s",
        "grad_norm",
        "postgres",
        "sotu",
    ] {
        let n: usize = attribute(&dom, &format!("data-series=\"{series}\""), "data-points")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no {series} line"));
        assert!(n >= 2, "{series}: {n} points");
    }
    // The step-0 perplexity as the reference line of each source.
    for source in ["postgres", "sotu"] {
        assert!(
            dom.contains(&format!("data-ref=\"{source} step 0\"")),
            "{source}"
        );
    }
    // The timeline: generation 1 with two ranks, generation 2 with the survivor, the recovery
    // phase by phase and the lost worker.
    assert!(dom.contains("data-generation=\"1\" data-world=\"2\""));
    assert!(dom.contains("data-generation=\"2\" data-world=\"1\""));
    for phase in ["detected", "aborted", "re-formed", "resumed"] {
        assert!(
            dom.contains(&format!("class=\"phase\" data-phase=\"{phase}\"")),
            "{phase}"
        );
    }
    assert!(dom.contains("class=\"lost\" data-worker=\"worker-1\""));
    assert!(dom.contains("<section id=\"checkpoints\"><h2>committed checkpoints"));
    // Nothing from elsewhere, nothing for later features that are not there.
    assert!(!dom.contains("https://") && !dom.contains("id=\"guard\""));
    assert!(!dom.contains(&token));

    let shot = out.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &chromium,
        &profile,
        &[
            "--virtual-time-budget=3000",
            "--window-size=1280,1500",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        png.len()
    );
    println!("screenshot: {}", shot.display());

    // Ctrl-C: the job stops, and the dashboard with it.
    launch.signal(libc::SIGTERM);
    let (status, _) = launch.finish(LONG);
    assert_eq!(status.code(), Some(130), "{}", launch.stderr());
    assert!(std::net::TcpStream::connect(&addr).is_err());
}
