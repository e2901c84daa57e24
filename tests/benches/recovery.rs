//! Recovery time of the real system: a `dapt coordinator` with etcd membership (lease TTL 2 s,
//! a real etcd) and two `dapt-worker`s training the tiny model; one worker is lost again and
//! again, alternately by SIGKILL (its session drops at once) and by SIGSTOP (a hung machine:
//! only its etcd lease tells), and started again after each recovery. For each loss: detection
//! (the loss to the coordinator's `detected`), abort (survivors confirm), re-formation, resume
//! (checkpoint load and the first step of the new generation), and the total from the loss to
//! that first step.
//!
//! Run: `cargo build --release --bins && cargo bench -p dapt-tests --bench recovery`
//! (DAPT_RECOVERY_ROUNDS, default 8). Needs etcd (`apt-get install etcd-server`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dapt_tests::{coordinator, events, Etcd, LONG};

fn main() {
    let rounds: usize = std::env::var("DAPT_RECOVERY_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = format!(
        "cluster:\n  min_workers: 1\n  max_workers: 2\n  session_timeout_ms: 60000\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl_s: 2\n",
        etcd.url
    );
    let mut c = coordinator(dir.path(), "recovery", 100_000, &cluster);
    let _w0 = c.member("w0");
    let mut w1 = c.member("w1");
    println!(
        "| # | loss | detection (ms) | abort (ms) | re-form (ms) | resume (ms) | total (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut totals = Vec::new();
    for round in 0..rounds {
        // Wait until the 2-rank generation runs, a few steps in.
        let formed = events(&c.coordinator.lines(), "generation formed").len();
        c.coordinator.wait_for("a 2-rank generation", LONG, |l| {
            let f = events(l, "generation formed");
            f.len() >= formed && f.last().is_some_and(|g| g["world"] == 2)
        });
        let steps = events(&c.coordinator.lines(), "step").len();
        c.coordinator
            .wait_for("steps", LONG, |l| events(l, "step").len() >= steps + 8);
        let seen = events(&c.coordinator.lines(), "recovery").len();
        let hang = round % 2 == 1;
        let lost_at = now();
        w1.signal(if hang { libc::SIGSTOP } else { libc::SIGKILL });
        c.coordinator.wait_for("the resume", LONG, |l| {
            events(l, "recovery")[seen..]
                .iter()
                .any(|f| f["phase"] == "resumed")
        });
        let all = c.coordinator.lines();
        let recovery: Vec<&serde_json::Value> = all
            .iter()
            .filter(|l| l["fields"]["message"] == "recovery")
            .skip(seen)
            .collect();
        let at = |phase: &str| {
            recovery
                .iter()
                .find(|l| l["fields"]["phase"] == phase)
                .unwrap_or_else(|| panic!("no {phase} line"))
        };
        let took = |phase: &str| at(phase)["fields"]["took_ms"].as_u64().expect("took_ms");
        let detected = timestamp(at("detected")) - lost_at;
        let total = timestamp(at("resumed")) - lost_at;
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.0} |",
            round + 1,
            if hang {
                "SIGSTOP (lease)"
            } else {
                "SIGKILL (session)"
            },
            detected * 1e3,
            took("aborted"),
            took("re-formed"),
            took("resumed"),
            total * 1e3
        );
        totals.push(total);
        w1.signal(libc::SIGKILL);
        drop(w1);
        w1 = c.member("w1");
    }
    totals.sort_by(f64::total_cmp);
    println!(
        "total from loss to first step: median {:.0} ms, max {:.0} ms over {} losses",
        totals[totals.len() / 2] * 1e3,
        totals.last().copied().unwrap_or(0.0) * 1e3,
        totals.len()
    );
    c.coordinator.signal(libc::SIGKILL);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// A JSON log line's RFC 3339 timestamp (UTC, as tracing writes it) in seconds since the epoch.
fn timestamp(line: &serde_json::Value) -> f64 {
    let t = line["timestamp"].as_str().expect("timestamp");
    // 2026-11-28T17:24:51.392791Z
    let (date, time) = t.trim_end_matches('Z').split_once('T').expect("T");
    let d: Vec<i64> = date.split('-').map(|x| x.parse().expect("date")).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(|x| x.parse().expect("time")).collect();
    let days = days_from_civil(d[0], d[1], d[2]);
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    secs as f64 + format!("0.{frac}").parse::<f64>().unwrap_or(0.0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
