//! The coordinator over TLS (`cluster.tls`, `dapt coordinator --tls-*`), with a throwaway CA
//! made by the `openssl` command: a job runs end to end with workers that pin the CA and present
//! client certificates (mutual TLS); a worker that trusts another CA, or has no client
//! certificate, is refused with an error that says which; `dapt status` and `/metrics` work over
//! https with the CA (and the client certificate). Without TLS on a network address the
//! coordinator warns that its messages cross it in clear text; a short token is refused, and
//! `--token` on the command line warned about.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dapt_tests::{
    binary, check_ledger, coordinator_with, events, free_port, scrape_tls, serial, write_job,
    EtcdCerts, Proc, BATCH, LONG,
};

/// A worker of job `job` at `url` with exactly `env` for its TLS settings; whether it exited
/// 0, and its stderr (within 30 s).
fn lone_worker(url: &str, job: &str, token: &str, env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(binary("dapt-worker"));
    cmd.args([
        "--coordinator",
        url,
        "--id",
        "stranger",
        "--connect-timeout-s",
        "30",
    ])
    .env("DAPT_JOB", job)
    .env("DAPT_TOKEN", token)
    .env("RAYON_NUM_THREADS", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(cmd);
    let (status, _) = p.finish(Duration::from_secs(30));
    (status.success(), p.stderr())
}

#[test]
fn a_job_runs_over_mutual_tls_and_strangers_to_the_ca_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs_dir = dir.path().join("certs");
    let other_dir = dir.path().join("other-ca");
    std::fs::create_dir_all(&certs_dir).expect("certs dir");
    std::fs::create_dir_all(&other_dir).expect("other dir");
    let certs = EtcdCerts::make(&certs_dir);
    let other = EtcdCerts::make(&other_dir);
    let metrics_port = free_port();
    let steps = 30;
    let cluster = format!(
        "cluster:\n  min_workers: 2\n  max_workers: 2\n  tls:\n    cert: {}\n    key: {}\n    client_ca: {}\n",
        certs.server_cert.display(),
        certs.server_key.display(),
        certs.ca.display()
    );
    let (ca, cert, key) = (
        certs.ca.to_string_lossy().into_owned(),
        certs.client_cert.to_string_lossy().into_owned(),
        certs.client_key.to_string_lossy().into_owned(),
    );
    let metrics = format!("127.0.0.1:{metrics_port}");
    let _serial = serial();
    let mut c = coordinator_with(
        dir.path(),
        "tls",
        steps,
        &cluster,
        "127.0.0.1",
        &[
            ("DAPT_METRICS_LISTEN", &metrics),
            ("DAPT_COORDINATOR_CA", &ca),
            ("DAPT_CLIENT_CERT", &cert),
            ("DAPT_CLIENT_KEY", &key),
        ],
    );
    c.url = c.url.replace("http://", "https://");
    let listening = c.coordinator.events("coordinator listening");
    assert!(
        listening[0]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{listening:?}"
    );
    let job = c.job_name();

    // Another CA's worker does not trust the coordinator: it says so and gives up at once.
    let started = std::time::Instant::now();
    let (ok, err) = lone_worker(
        &c.url,
        &job,
        &c.token,
        &[
            ("DAPT_COORDINATOR_CA", &other.ca),
            ("DAPT_CLIENT_CERT", &other.client_cert),
            ("DAPT_CLIENT_KEY", &other.client_key),
        ],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("not signed by the CA in --coordinator-ca"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a refused certificate is not retried"
    );
    // The right CA but no client certificate: the coordinator refuses the worker.
    let (ok, err) = lone_worker(
        &c.url,
        &job,
        &c.token,
        &[("DAPT_COORDINATOR_CA", &certs.ca)],
    );
    assert!(!ok, "{err}");
    assert!(err.contains("--client-cert"), "{err}");
    // A pinned CA never goes to plain http.
    let plain = c.url.replace("https://", "http://");
    let (ok, err) = lone_worker(
        &plain,
        &job,
        &c.token,
        &[("DAPT_COORDINATOR_CA", &certs.ca)],
    );
    assert!(!ok && err.contains("plain http"), "{err}");
    // A client certificate from another CA is refused too.
    let (ok, err) = lone_worker(
        &c.url,
        &job,
        &c.token,
        &[
            ("DAPT_COORDINATOR_CA", &certs.ca),
            ("DAPT_CLIENT_CERT", &other.client_cert),
            ("DAPT_CLIENT_KEY", &other.client_key),
        ],
    );
    assert!(!ok, "{err}");
    // A client key that is not its certificate's: named before any connection.
    let (ok, err) = lone_worker(
        &c.url,
        &job,
        &c.token,
        &[
            ("DAPT_COORDINATOR_CA", &certs.ca),
            ("DAPT_CLIENT_CERT", &certs.client_cert),
            ("DAPT_CLIENT_KEY", &other.client_key),
        ],
    );
    assert!(
        !ok && err.contains("--client-key") && err.contains("does not go with"),
        "{err}"
    );
    // Client certificates with a plain URL would be ignored: refused.
    let (ok, err) = lone_worker(
        &plain,
        &job,
        &c.token,
        &[
            ("DAPT_CLIENT_CERT", &certs.client_cert),
            ("DAPT_CLIENT_KEY", &certs.client_key),
        ],
    );
    assert!(!ok && err.contains("--client-cert/--client-key"), "{err}");
    assert!(
        c.coordinator.events("worker joined").is_empty(),
        "none of them joined"
    );

    let mut workers = [c.member("w0"), c.member("w1")];
    c.wait_step(2);

    // `dapt status` over https: with the CA and the client certificate it answers...
    let out = Command::new(binary("dapt"))
        .args(["status", &c.url, "--json"])
        .args([
            "--coordinator-ca",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ])
        .env("DAPT_TOKEN", &c.token)
        .output()
        .expect("dapt status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(status["job"], "tls");
    // ...without the client certificate it is refused, and without the CA it does not start.
    for args in [vec!["--coordinator-ca", ca.as_str()], vec![]] {
        let out = Command::new(binary("dapt"))
            .args(["status", &c.url])
            .args(&args)
            .env_remove("DAPT_COORDINATOR_CA")
            .env("DAPT_TOKEN", &c.token)
            .output()
            .expect("dapt status");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        println!("dapt status {args:?}: {stderr}");
        assert!(
            stderr.contains("--client-cert") || stderr.contains("--coordinator-ca"),
            "{stderr}"
        );
    }

    // /metrics over https, with the same certificates.
    let reply = scrape_tls(
        metrics_port,
        &certs.ca,
        Some((&certs.client_cert, &certs.client_key)),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("dapt_step"), "{reply}");
    let refused = scrape_tls(metrics_port, &certs.ca, None);
    assert!(!refused.contains("200"), "{refused}");

    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    for w in &mut workers {
        let (status, _) = w.finish(LONG);
        assert!(status.success(), "{}", w.stderr());
    }
    let lines = c.coordinator.lines();
    assert_eq!(events(&lines, "job completed").len(), 1);
    assert!(
        !c.coordinator.stderr().contains("clear text"),
        "TLS on loopback: no clear-text warning"
    );
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
}

#[test]
fn short_tokens_clear_text_and_tokens_on_the_command_line_are_called_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = write_job(dir.path(), "plain", 400, "");
    let out = Command::new(binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job.path)
        .output()
        .expect("prepare");
    assert!(out.status.success());
    let coordinator = |listen: &str, args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["--log-format", "json", "coordinator"])
            .arg(&job.path)
            .args(["--listen", listen])
            .args(args)
            .env_remove("DAPT_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    };
    let long = "0123456789abcdef0123456789abcdef";

    // A short token: refused before anything is served.
    for token in ["t0ken", "replace-me-with-a-random-secret"] {
        let out = coordinator("127.0.0.1:0", &[], &[("DAPT_TOKEN", token)])
            .output()
            .expect("coordinator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("at least 32"), "{stderr}");
    }
    // A token file works like the variable; an empty one is refused.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "\n").expect("token file");
    let out = coordinator("127.0.0.1:0", &["--token-file"], &[])
        .arg(&token_file)
        .output()
        .expect("coordinator");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    // TLS on, but an http:// advertised URL (under etcd, what workers find as the leader's).
    let certs_dir = dir.path().join("certs");
    std::fs::create_dir_all(&certs_dir).expect("certs dir");
    let certs = EtcdCerts::make(&certs_dir);
    let out = coordinator(
        "127.0.0.1:0",
        &["--advertise", "http://10.0.0.1:7070"],
        &[
            ("DAPT_TOKEN", long),
            ("DAPT_TLS_CERT", &certs.server_cert.to_string_lossy()),
            ("DAPT_TLS_KEY", &certs.server_key.to_string_lossy()),
        ],
    )
    .output()
    .expect("coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("https://"), "{stderr}");
    // Files given by flag are named by the flag; a certificate rustls cannot read is blamed,
    // not the key that goes with it.
    let garbled = dir.path().join("garbled.pem");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\nMIIBadDataAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let key = certs.server_key.to_string_lossy().into_owned();
    for (cert, expected) in [
        ("/nonexistent/c.pem", "--tls-cert: /nonexistent/c.pem"),
        (garbled.to_str().expect("utf-8"), "--tls-cert: "),
    ] {
        let out = coordinator(
            "127.0.0.1:0",
            &["--tls-cert", cert, "--tls-key", &key],
            &[("DAPT_TOKEN", long)],
        )
        .output()
        .expect("coordinator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(expected) && !stderr.contains("cluster.tls"),
            "{stderr}"
        );
    }

    // No TLS on every address, the token on the command line: both said at the start.
    let _serial = serial();
    let mut c = Proc::spawn(coordinator(
        &format!("0.0.0.0:{}", free_port()),
        &["--token", long],
        &[],
    ));
    c.wait_for("the coordinator to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    let text = c.stderr();
    assert!(text.contains("shows in `ps`"), "{text}");
    assert!(text.contains("clear text"), "{text}");
    c.signal(libc::SIGTERM);
    c.finish(LONG);
}

/// `deploy/k8s/make-secrets.sh --files-only` makes a token and certificates that dapt accepts:
/// a coordinator serves with them (token from the file), and `dapt status` reaches it as
/// `dapt-coordinator` (the name in its certificate, as the workers in the manifests do) with
/// the client certificate.
#[test]
fn the_kubernetes_secrets_script_makes_a_token_and_certificates_dapt_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let out = Command::new(dapt_tests::repo_root().join("deploy/k8s/make-secrets.sh"))
        .arg("--files-only")
        .arg(&secrets)
        .env("NAMESPACE", "dapt")
        .output()
        .expect("make-secrets.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(secrets.join("token")).expect("token");
    assert!(token.len() >= 32 && !token.ends_with('\n'), "{token:?}");
    // It never overwrites: a second run into the same directory is refused.
    let again = Command::new(dapt_tests::repo_root().join("deploy/k8s/make-secrets.sh"))
        .arg("--files-only")
        .arg(&secrets)
        .output()
        .expect("make-secrets.sh");
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(secrets.join("token")).expect("token"),
        token
    );

    let job = write_job(dir.path(), "k8s", 400, "");
    let out = Command::new(binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job.path)
        .output()
        .expect("prepare");
    assert!(out.status.success());
    let port = free_port();
    let file = |name: &str| secrets.join(name);
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "coordinator"])
        .arg(&job.path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("DAPT_TOKEN")
        .env("DAPT_TOKEN_FILE", file("token"))
        .env("DAPT_TLS_CERT", file("coordinator.crt"))
        .env("DAPT_TLS_KEY", file("coordinator.key"))
        .env("DAPT_TLS_CLIENT_CA", file("ca.crt"));
    let _serial = serial();
    let mut c = Proc::spawn(cmd);
    c.wait_for("the coordinator to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    let status = |domain: &str| {
        Command::new(binary("dapt"))
            .args(["status", &format!("https://127.0.0.1:{port}"), "--json"])
            .arg("--coordinator-ca")
            .arg(file("ca.crt"))
            .arg("--client-cert")
            .arg(file("client.crt"))
            .arg("--client-key")
            .arg(file("client.key"))
            .args(["--coordinator-domain", domain])
            .env_remove("DAPT_TOKEN")
            .env("DAPT_TOKEN_FILE", file("token"))
            .output()
            .expect("dapt status")
    };
    let out = status("dapt-coordinator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"job\":\"k8s\""));
    // A name the certificate does not carry: refused, and said so.
    let out = status("dapt-etcd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--coordinator-domain"), "{stderr}");
    c.signal(libc::SIGTERM);
    c.finish(LONG);
}
