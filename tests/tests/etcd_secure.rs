//! etcd's security settings from the job file, against a real etcd: TLS with client certificates
//! (`cluster.etcd.tls`, with the coordinator itself on mutual TLS: `cluster.tls`), and
//! user/password authentication (`user`, `password_env`) with a role
//! that may touch only the job's prefix. A job runs to completion on each; a wrong password
//! fails the coordinator at the start with an error that says so, and nothing is written.

use std::time::Duration;

use dapt_proto::job::{EtcdSpec, EtcdTls};
use dapt_tests::{check_entries, coordinator_with, events, serial, Etcd, BATCH, LONG};
use etcd_client::{Permission, UserAddOptions};

const TTL_S: u64 = 2;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn ledger(spec: &EtcdSpec, job: &str, steps: u64) {
    let entries = runtime()
        .block_on(dapt_coordinator::etcd::ledger(spec, job))
        .expect("ledger");
    let entries = entries.iter().map(|e| (e.step, e.start, e.end)).collect();
    check_entries(entries, steps * BATCH).expect("ledger covers every sample once");
}

#[test]
fn a_job_runs_on_an_etcd_that_requires_tls_client_certificates() {
    let etcd = Etcd::start_tls();
    let certs = etcd.tls.clone().expect("certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 30;
    // The coordinator serves mutual TLS with the same CA (its server certificate names
    // 127.0.0.1 too), as deploy/k8s does: the leader's URL in etcd is https, and the workers
    // pin the CA and present the client certificate to both.
    let cluster = format!(
        "cluster:\n  min_workers: 2\n  max_workers: 2\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: /secure\n    lease_ttl_s: {TTL_S}\n    tls:\n      ca: {ca}\n      cert: {cert}\n      key: {key}\n  tls:\n    cert: {}\n    key: {}\n    client_ca: {ca}\n",
        etcd.url,
        certs.server_cert.display(),
        certs.server_key.display(),
        ca = certs.ca.display(),
        cert = certs.client_cert.display(),
        key = certs.client_key.display(),
    );
    let (ca, cert, key) = (
        certs.ca.to_string_lossy().into_owned(),
        certs.client_cert.to_string_lossy().into_owned(),
        certs.client_key.to_string_lossy().into_owned(),
    );
    let mut c = coordinator_with(
        dir.path(),
        "tls",
        steps,
        &cluster,
        "127.0.0.1",
        &[
            ("DAPT_COORDINATOR_CA", &ca),
            ("DAPT_CLIENT_CERT", &cert),
            ("DAPT_CLIENT_KEY", &key),
        ],
    );
    c.url = c.url.replace("http://", "https://");
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let leading = c.coordinator.events("leading the job");
    assert!(
        leading[0]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "the leader's URL in etcd: {leading:?}"
    );
    let mut workers = [c.member("w0"), c.member("w1")];
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    for w in &mut workers {
        let (status, _) = w.finish(LONG);
        assert!(status.success(), "{}", w.stderr());
    }
    let spec = EtcdSpec {
        endpoints: vec![etcd.url.clone()],
        prefix: "/secure".into(),
        lease_ttl_s: TTL_S,
        user: None,
        password_env: None,
        tls: Some(EtcdTls {
            ca: certs.ca.clone(),
            cert: Some(certs.client_cert.clone()),
            key: Some(certs.client_key.clone()),
            domain: None,
        }),
    };
    ledger(&spec, "tls", steps);
    // Without a client certificate etcd refuses the connection.
    let anonymous = EtcdSpec {
        tls: Some(EtcdTls {
            cert: None,
            key: None,
            ..spec.tls.clone().expect("tls")
        }),
        ..spec.clone()
    };
    assert!(runtime()
        .block_on(dapt_coordinator::etcd::ledger(&anonymous, "tls"))
        .is_err());
}

#[test]
fn a_job_runs_on_an_etcd_with_authentication_and_a_wrong_password_is_refused() {
    let etcd = Etcd::start();
    let open = EtcdSpec {
        endpoints: vec![etcd.url.clone()],
        prefix: "/authed".into(),
        lease_ttl_s: TTL_S,
        user: None,
        password_env: None,
        tls: None,
    };
    // A root user (etcd needs one to enable auth) and a `dapt` user whose role may read and
    // write under /authed/ only.
    runtime().block_on(async {
        let mut client = dapt_proto::etcd::connect(&open, Duration::from_secs(5))
            .await
            .expect("etcd");
        client
            .user_add("root", "root-secret", None)
            .await
            .expect("root");
        client
            .user_grant_role("root", "root")
            .await
            .expect("root role");
        client
            .user_add("dapt", "s3cret", Some(UserAddOptions::new()))
            .await
            .expect("user");
        client.role_add("dapt-jobs").await.expect("role");
        client
            .role_grant_permission(
                "dapt-jobs",
                Permission::read_write("/authed/").with_prefix(),
            )
            .await
            .expect("permission");
        client
            .user_grant_role("dapt", "dapt-jobs")
            .await
            .expect("grant");
        client.auth_enable().await.expect("auth enable");
    });
    let cluster = format!(
        "cluster:\n  min_workers: 1\n  max_workers: 1\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: /authed\n    lease_ttl_s: {TTL_S}\n    user: dapt\n    password_env: DAPT_ETCD_PASSWORD\n",
        etcd.url
    );
    let _serial = serial();

    // The wrong password: the coordinator stops at the start and says why.
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dapt_tests::write_job(dir.path(), "authed", 10, &cluster);
    let out = std::process::Command::new(dapt_tests::binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job.path)
        .output()
        .expect("prepare");
    assert!(out.status.success());
    let out = std::process::Command::new(dapt_tests::binary("dapt"))
        .arg("coordinator")
        .arg(&job.path)
        .args(["--listen", "127.0.0.1:0"])
        .env("DAPT_TOKEN", "dapt-test-token-0123456789abcdef")
        .env("DAPT_ETCD_PASSWORD", "wrong")
        .output()
        .expect("coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("authentication failed") || stderr.contains("invalid"),
        "{stderr}"
    );

    // The right one: the job runs.
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = 20;
    let mut c = coordinator_with(
        dir.path(),
        "authed",
        steps,
        &cluster,
        "127.0.0.1",
        &[("DAPT_ETCD_PASSWORD", "s3cret")],
    );
    c.coordinator.wait_for("leadership", LONG, |l| {
        !events(l, "leading the job").is_empty()
    });
    let mut w = c.member("w0");
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{}", c.coordinator.stderr());
    let (status, _) = w.finish(LONG);
    assert!(status.success(), "{}", w.stderr());
    // Reading the ledger needs the credentials too.
    let authed = EtcdSpec {
        user: Some("dapt".into()),
        password_env: Some("DAPT_TEST_ETCD_PASSWORD".into()),
        ..open.clone()
    };
    // The spec names a variable, never the password: this test process needs it set too.
    std::env::set_var("DAPT_TEST_ETCD_PASSWORD", "s3cret");
    ledger(&authed, "authed", steps);
    assert!(runtime()
        .block_on(dapt_coordinator::etcd::ledger(&open, "authed"))
        .map(|e| e.is_empty())
        .unwrap_or(true));
}
