//! A job's durable state belongs to that job alone, over the real binaries (and a real etcd):
//! another job with the same name on one etcd neither stands by nor leads; a committed
//! checkpoint outside the job's checkpoint.dir or past its total steps is refused, not
//! "completed"; two coordinators of one checkpoint.dir at once are refused by its lock and its
//! `job.json`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dapt_tests::{binary, coordinator, events, serial, write_job, Etcd, Proc, LONG};

const PREFIX: &str = "/dapt-ident";

fn etcd_yaml(etcd: &Etcd) -> String {
    format!(
        "cluster:\n  min_workers: 1\n  max_workers: 1\n  session_timeout_ms: 2000\n  etcd:\n    endpoints: [\"{}\"]\n    prefix: {PREFIX}\n    lease_ttl_s: 2\n",
        etcd.url
    )
}

fn prepare(job: &Path) {
    let out = dapt_tests::dapt(&["prepare", "--quiet", &job.to_string_lossy()]);
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
}

/// `dapt coordinator job` with `token`, on a free port.
fn start(job: &Path, token: &str) -> Proc {
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "coordinator"])
        .arg(job)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", dapt_tests::free_port()),
        ])
        .env("DAPT_TOKEN", token);
    Proc::spawn(cmd)
}

/// Runs `dapt coordinator job` with `token` and expects it to exit non-zero within 30 s
/// (before the fix these stood by, led or resumed); returns its stderr.
fn refused(job: &Path, token: &str) -> String {
    let mut p = start(job, token);
    let (status, _) = p.finish(Duration::from_secs(30));
    let err = p.stderr();
    assert!(!status.success(), "not refused: {err}");
    assert!(events(&p.lines(), "job completed").is_empty(), "{err}");
    err
}

/// [`refused`], before leading or standing by.
fn refused_at_once(job: &Path, token: &str) -> String {
    let err = refused(job, token);
    assert!(!err.contains("leading the job"), "{err}");
    assert!(!err.contains("standby"), "{err}");
    err
}

fn put(etcd: &Etcd, key: &str, value: &str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let spec = dapt_proto::job::EtcdSpec {
                endpoints: vec![etcd.url.clone()],
                prefix: PREFIX.into(),
                lease_ttl_s: 2,
                user: None,
                password_env: None,
                tls: None,
            };
            let mut client = dapt_proto::etcd::connect(&spec, Duration::from_secs(5))
                .await
                .expect("etcd");
            client.put(key, value, None).await.expect("put");
        });
}

#[test]
fn another_job_with_the_same_name_on_one_etcd_neither_stands_by_nor_leads() {
    let etcd = Etcd::start();
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    // Job A trains to a commit, then its coordinator dies.
    let mut a = coordinator(dir_a.path(), "shared", 400, &etcd_yaml(&etcd));
    let mut w0 = a.member("w0");
    a.coordinator.wait_for("a commit", LONG, |l| {
        !events(l, "checkpoint committed").is_empty()
    });
    // Job B: the same name and prefix, its own token and checkpoint.dir.
    let b = write_job(dir_b.path(), "shared", 80, &etcd_yaml(&etcd));
    prepare(&b.path);
    let token_b = "token-of-job-B-0123456789abcdefABCDEF";
    // While A leads, B does not stand by.
    let err = refused_at_once(&b.path, token_b);
    assert!(err.contains(PREFIX), "{err}");
    assert!(err.contains("cluster.etcd.prefix"), "{err}");
    assert!(err.contains("rename the job"), "{err}");
    a.coordinator.signal(libc::SIGKILL);
    w0.signal(libc::SIGKILL);
    let _ = w0.finish(LONG);
    // Nor does it lead once A's leadership is gone.
    std::thread::sleep(Duration::from_secs(3));
    let err = refused_at_once(&b.path, token_b);
    assert!(err.contains("another token"), "{err}");
    // A's own token with B's checkpoint.dir: refused by the directory.
    let err = refused_at_once(&b.path, &a.token);
    assert!(err.contains("checkpoint.dir"), "{err}");
    assert!(
        std::fs::read_dir(&b.checkpoints).map_or(true, |mut d| d.next().is_none()),
        "B wrote into its checkpoint.dir"
    );

    // A's state, forged: a committed step past the job's total, then a checkpoint outside
    // its checkpoint.dir. Each is refused at load, naming the key, not taken as "completed".
    let key = dapt_proto::job::keys::committed(PREFIX, "shared");
    let ck = a.job.checkpoints.display().to_string();
    let forged = |step: u64, dir: &str| {
        format!(
            r#"{{"job":"shared","seed":5,"seq_len":32,"global_batch":7,"step":{step},"dir":"{dir}","generation":1}}"#
        )
    };
    put(
        &etcd,
        &key,
        &forged(999_999, &format!("{ck}/step-00999999")),
    );
    let err = refused(&a.job.path, &a.token);
    assert!(
        err.contains(&key) && err.contains("past the job's"),
        "{err}"
    );
    put(&etcd, &key, &forged(5, "/elsewhere/b/step-00000005"));
    let err = refused(&a.job.path, &a.token);
    assert!(err.contains(&key) && err.contains("not under"), "{err}");
    // A generation no leader writes (the next would overflow): refused by key at load, where
    // a worker of it used to wait forever while the leader logged an error every 100 ms.
    let key = dapt_proto::job::keys::generation(PREFIX, "shared");
    let forged = format!(
        r#"{{"generation":{},"ranks":["w0"],"peers":["127.0.0.1:1"],"resume_step":0}}"#,
        u64::MAX
    );
    put(&etcd, &key, &forged);
    let err = refused(&a.job.path, &a.token);
    assert!(
        err.contains(&key) && err.contains("not one a leader writes"),
        "{err}"
    );
}

#[test]
fn two_coordinators_of_one_checkpoint_dir_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let shared = dir.path().join("checkpoints");
    let with_dir = |name: &str, seed: u64| {
        let job = write_job(dir.path(), name, 40, "");
        let yaml = std::fs::read_to_string(&job.path).expect("read");
        let yaml = yaml
            .replace(
                &format!("dir: {}", job.checkpoints.display()),
                &format!("dir: {}", shared.display()),
            )
            .replace("seed: 5", &format!("seed: {seed}"));
        std::fs::write(&job.path, yaml).expect("write");
        job.path
    };
    let x = with_dir("jobx", 5);
    let y = with_dir("joby", 9);
    prepare(&x);
    let token = "token-of-job-X-0123456789abcdefABCDEF";
    let mut first = start(&x, token);
    first.wait_for("jobx to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    assert!(shared.join("job.json").is_file());
    // Another job on the same directory: refused by name, whether or not the first runs.
    let err = refused(&y, "token-of-job-Y-0123456789abcdefABCDEF");
    assert!(err.contains("in use"), "{err}");
    // The same job twice at once: refused by the lock.
    let err = refused(&x, token);
    assert!(err.contains("in use") && err.contains("job.lock"), "{err}");
    first.signal(libc::SIGKILL);
    let _ = first.finish(LONG);
    let err = refused(&y, "token-of-job-Y-0123456789abcdefABCDEF");
    assert!(err.contains("job `jobx`, not `joby`"), "{err}");
    // The job itself starts again once the first is gone.
    let mut again = start(&x, token);
    again.wait_for("jobx to listen again", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    again.signal(libc::SIGKILL);
    let _ = again.finish(LONG);
}

/// `dapt train` (one rank, no coordinator) took neither the lock nor `job.json`: beside a
/// running coordinator of the directory both wrote `step-*` (the committed step ended up with the
/// single rank's weights), and another job's `dapt train` on the directory resumed the first
/// job's checkpoint and pruned its committed one (an audit). Now it claims the directory as a
/// coordinator does.
#[test]
fn dapt_train_claims_the_checkpoint_dir_as_a_coordinator_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let shared = dir.path().join("checkpoints");
    let with_dir = |name: &str| {
        let job = write_job(dir.path(), name, 6, "");
        let yaml = std::fs::read_to_string(&job.path).expect("read");
        let yaml = yaml.replace(
            &format!("dir: {}", job.checkpoints.display()),
            &format!("dir: {}", shared.display()),
        );
        std::fs::write(&job.path, yaml).expect("write");
        job.path
    };
    let x = with_dir("jobx");
    let y = with_dir("joby");
    prepare(&x);
    let train = |job: &Path| dapt_tests::dapt(&["train", &job.to_string_lossy()]);
    let token = "token-of-job-X-0123456789abcdefABCDEF";
    let mut coordinator = start(&x, token);
    coordinator.wait_for("jobx to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    let out = train(&x);
    let err = dapt_tests::text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("in use") && err.contains("job.lock"), "{err}");
    coordinator.signal(libc::SIGKILL);
    let _ = coordinator.finish(LONG);
    // The job trains alone; then another job's `dapt train` is refused by name.
    let out = train(&x);
    assert!(out.status.success(), "{}", dapt_tests::text(&out.stderr));
    let steps = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&shared)
            .expect("read")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        names
    };
    let before = steps();
    assert!(!before.is_empty());
    let out = train(&y);
    let err = dapt_tests::text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("job `jobx`, not `joby`"), "{err}");
    assert_eq!(steps(), before, "another job's checkpoints were touched");
}
