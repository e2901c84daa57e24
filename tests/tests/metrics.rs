//! `dapt coordinator --metrics-listen` (here through `DAPT_METRICS_LISTEN`): its Prometheus
//! metrics scraped over HTTP while real workers train, and again after one is killed.

use dapt_tests::{coordinator_with, events, free_port, http_get, metric as value, serial, LONG};

/// `GET /metrics` from 127.0.0.1:`port`: the status line and the body.
fn scrape(port: u16) -> (String, String) {
    let (head, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    (head.lines().next().unwrap_or("").to_string(), body)
}

#[test]
fn the_coordinator_serves_progress_members_and_recoveries_as_prometheus_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = coordinator_with(
        dir.path(),
        "metrics",
        60,
        "cluster:\n  min_workers: 1\n  max_workers: 2\n  session_timeout_ms: 2000\n  formation_grace_ms: 10000\n",
        "127.0.0.1",
        &[("DAPT_METRICS_LISTEN", &listen)],
    );
    let _w0 = c.member("w0");
    let w1 = c.member("w1");
    c.coordinator.wait_for("a commit", LONG, |l| {
        !events(l, "checkpoint committed").is_empty()
    });
    let (status, text) = scrape(port);
    println!("{text}");
    assert!(status.contains("200"), "{status}");
    assert_eq!(value(&text, r#"dapt_job{name="metrics"}"#), 1.0);
    assert_eq!(value(&text, r#"dapt_phase{phase="running"}"#), 1.0);
    assert_eq!(value(&text, r#"dapt_phase{phase="recovering"}"#), 0.0);
    assert_eq!(value(&text, "dapt_members"), 2.0);
    assert_eq!(value(&text, "dapt_ranks"), 2.0);
    assert_eq!(value(&text, "dapt_world_size"), 2.0);
    assert_eq!(value(&text, "dapt_total_steps"), 60.0);
    assert!(value(&text, "dapt_step") >= 5.0);
    assert!(value(&text, "dapt_committed_step") >= 5.0);
    assert!(value(&text, "dapt_checkpoints_committed_total") >= 1.0);
    let loss = value(&text, "dapt_loss");
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    assert!(value(&text, "dapt_tokens_per_second") > 0.0);
    assert!(value(&text, "dapt_learning_rate") > 0.0);
    assert_eq!(value(&text, "dapt_recoveries_total"), 0.0);
    // Bound to loopback, the port answers only requests addressed to loopback: a web page's own
    // name pointed at 127.0.0.1 (DNS rebinding) read the dashboard (an audit).
    for (host, answered) in [
        ("attacker.example:80", false),
        (listen.as_str(), true),
        ("localhost", true),
    ] {
        for path in ["/api/dashboard", "/metrics", "/"] {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&listen).expect("connect");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .expect("write");
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            let status = reply.lines().next().unwrap_or("");
            assert_eq!(
                status.contains(" 200 "),
                answered,
                "{host} {path}: {status}"
            );
            if !answered {
                assert!(status.contains(" 421 "), "{status}");
                assert!(!reply.contains("metrics"), "{reply}");
            }
        }
    }

    let _w1_again = c.kill_and_restart(w1, "w1", 15);
    let (_, text) = scrape(port);
    println!("{text}");
    assert_eq!(value(&text, "dapt_recoveries_total"), 1.0);
    assert_eq!(value(&text, "dapt_workers_lost_total"), 1.0);
    assert!(value(&text, "dapt_generation") >= 2.0);
    let resumed = value(&text, r#"dapt_recovery_seconds{phase="resumed"}"#);
    assert!(resumed > 0.0 && resumed < 30.0, "{resumed}");
    c.complete();
    // The server goes with the coordinator.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
