//! The launchers in deploy/ over the real binaries: `deploy/dapt-node.sh` (one worker per
//! device of a node; the node is the unit of failure), the Slurm batch script, and the
//! Kubernetes manifests against the Kubernetes API schemas.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dapt_tests::{
    alive, binary, check_ledger, coordinator, events, free_port, free_port_run, repo_root, serial,
    write_job, Cluster, Job, Proc, BATCH, LONG,
};

const TWO: &str = "cluster:\n  min_workers: 2\n  max_workers: 2\n  session_timeout_ms: 2000\n";

/// `deploy/dapt-node.sh` for `c`'s job as node `name`: `workers` CPU workers on this machine.
fn node(c: &Cluster, name: &str, workers: u32) -> Proc {
    let mut cmd = Command::new(repo_root().join("deploy/dapt-node.sh"));
    cmd.env("DAPT_COORDINATOR", &c.url)
        .env("DAPT_JOB", c.job_name())
        .env("DAPT_TOKEN", &c.token)
        .env("DAPT_DEVICE", "cpu")
        .env("DAPT_NODE_WORKERS", workers.to_string())
        .env("DAPT_HOST", "127.0.0.1")
        .env(
            "DAPT_PORT",
            free_port_run(u16::try_from(workers).expect("workers")).to_string(),
        )
        .env("DAPT_NODE_NAME", name)
        .env("DAPT_WORKER_BIN", binary("dapt-worker"))
        .env("DAPT_LOG_FORMAT", "json")
        .env("RAYON_NUM_THREADS", "1");
    Proc::spawn(cmd)
}

/// The worker pids `dapt-node.sh` said it started.
fn started(node: &Proc) -> Vec<u32> {
    node.stderr()
        .lines()
        .filter_map(|l| l.strip_prefix("dapt-node: started "))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect()
}

fn joined(lines: &[serde_json::Value]) -> Vec<String> {
    events(lines, "worker joined")
        .iter()
        .map(|f| f["worker"].as_str().expect("worker").to_string())
        .collect()
}

#[test]
fn one_node_script_runs_a_worker_per_device_and_the_job_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut c = coordinator(dir.path(), "node", 12, TWO);
    let mut n = node(&c, "n0", 2);
    let (status, _) = n.finish(LONG);
    assert!(status.success(), "{status}\n{}", n.stderr());
    assert_eq!(started(&n).len(), 2, "{}", n.stderr());
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{status}");
    let lines = c.coordinator.lines();
    let mut ids = joined(&lines);
    ids.sort();
    assert_eq!(ids, ["n0-w0", "n0-w1"]);
    let formed = events(&lines, "generation formed");
    assert_eq!(formed.len(), 1);
    assert_eq!(formed[0]["world"], 2);
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), 12 * BATCH).expect("ledger");
}

#[test]
fn a_failed_worker_takes_its_node_down_and_the_restarted_node_rejoins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let steps = 40;
    let cluster = "cluster:\n  min_workers: 1\n  max_workers: 3\n  session_timeout_ms: 2000\n  formation_grace_ms: 3000\n";
    let mut c = coordinator(dir.path(), "fail", steps, cluster);
    let mut a = node(&c, "a", 1);
    let mut b = node(&c, "b", 2);
    c.coordinator.wait_for("a 3-rank generation", LONG, |l| {
        events(l, "generation formed")
            .iter()
            .any(|f| f["world"] == 3)
    });
    c.coordinator.wait_for("step 3", LONG, |l| {
        events(l, "step")
            .iter()
            .any(|f| f["step"].as_u64() >= Some(3))
    });
    let pids = started(&b);
    assert_eq!(pids.len(), 2, "{}", b.stderr());
    // One of b's workers dies: b stops the other and exits with the failure.
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
    let (status, _) = b.finish(LONG);
    assert!(!status.success(), "the node script reports the failure");
    assert!(b.stderr().contains("stopping the others"), "{}", b.stderr());
    assert!(!alive(pids[0]), "the node's other worker was stopped");
    // Restarted (as a scheduler would), the node's workers join again.
    let mut b = node(&c, "b", 2);
    let (status, _) = b.finish(LONG);
    assert!(status.success(), "{status}\n{}", b.stderr());
    let (status, _) = a.finish(LONG);
    assert!(status.success(), "{status}\n{}", a.stderr());
    let (status, _) = c.coordinator.finish(LONG);
    assert!(status.success(), "{status}");
    let lines = c.coordinator.lines();
    let worlds: Vec<u64> = events(&lines, "generation formed")
        .iter()
        .map(|f| f["world"].as_u64().expect("world"))
        .collect();
    println!("generations: {worlds:?}");
    assert_eq!(worlds.first(), Some(&3));
    // Re-formed after the kill (with node a alone, or with the restarted node b already back:
    // which one depends on how fast b comes back), and b's workers trained again.
    assert!(worlds.len() >= 2, "no re-formation: {worlds:?}");
    let b_joins = joined(&lines)
        .iter()
        .filter(|w| w.starts_with("b-"))
        .count();
    assert_eq!(b_joins, 4, "b's two workers joined twice each");
    check_ledger(&c.job.checkpoints.join("ledger.jsonl"), steps * BATCH).expect("ledger");
}

#[test]
fn sigterm_stops_the_node_and_its_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _serial = serial();
    let mut c = coordinator(dir.path(), "term", 400, TWO);
    let mut n = node(&c, "n0", 2);
    c.coordinator.wait_for("step 2", LONG, |l| {
        events(l, "step")
            .iter()
            .any(|f| f["step"].as_u64() >= Some(2))
    });
    let pids = started(&n);
    n.signal(libc::SIGTERM);
    let (status, _) = n.finish(Duration::from_secs(60));
    println!(
        "node exited with {status}:\n{}",
        n.stderr()
            .lines()
            .filter(|l| l.starts_with("dapt-node"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        n.stderr().contains("stopping the workers"),
        "{}",
        n.stderr()
    );
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived its node script");
    }
    c.coordinator.signal(libc::SIGTERM);
    c.coordinator.finish(LONG);
}

/// Stands in for Slurm's `srun` on one machine: runs the task once per simulated node
/// (`SHIM_NODES`), with the variables Slurm sets and a port range of its own per node (on a
/// real cluster each node has its own addresses), and passes SIGTERM on.
const SRUN: &str = r#"#!/usr/bin/env bash
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((i = 0; i < SHIM_NODES; i++)); do
  SLURMD_NODENAME=node$i SLURM_NODEID=$i SLURM_PROCID=$i DAPT_PORT=$((SHIM_PORT + 10 * i)) "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for p in "${pids[@]}"; do
  while :; do wait "$p"; rc=$?; kill -0 "$p" 2>/dev/null || break; done
  [ "$rc" -eq 0 ] || status=$rc
done
exit $status
"#;

/// `deploy/slurm/dapt.sbatch` of job `name` (`steps` steps) as the batch step of a two-node
/// allocation, run from a submit folder (`dir/submit`), with `srun` the shim above.
fn slurm_batch(dir: &Path, name: &str, steps: u64) -> (Command, Job) {
    use std::os::unix::fs::PermissionsExt;
    let shim = dir.join("bin");
    std::fs::create_dir_all(&shim).expect("shim dir");
    std::fs::write(shim.join("srun"), SRUN).expect("srun");
    std::fs::set_permissions(shim.join("srun"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let job = write_job(dir, name, steps, TWO);
    // checkpoint.dir relative to the job file, with a comment, submitted from another folder:
    // the script put the logs in `<submit dir>/ck-slurm   # beside the job/logs` (an audit).
    let yaml = std::fs::read_to_string(&job.path).expect("job");
    let absolute = format!("dir: {}\n", job.checkpoints.display());
    assert!(yaml.contains(&absolute), "{yaml}");
    let yaml = yaml.replace(
        &absolute,
        &format!("dir: \"ck-{name}\"   # beside the job\n"),
    );
    std::fs::write(&job.path, yaml).expect("job");
    let submit = dir.join("submit");
    std::fs::create_dir_all(&submit).expect("submit dir");
    let bin_dir = binary("dapt").parent().expect("bin dir").to_path_buf();
    let path = format!(
        "{}:{}",
        shim.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(repo_root().join("deploy/slurm/dapt.sbatch"));
    cmd.arg(&job.path)
        .current_dir(&submit)
        .env("PATH", path)
        .env("SHIM_NODES", "2")
        // Node i's workers listen from SHIM_PORT + 10 i.
        .env("SHIM_PORT", free_port_run(20).to_string())
        .env("SLURM_SUBMIT_DIR", repo_root())
        .env("SLURM_JOB_NUM_NODES", "2")
        .env("DAPT_BIN_DIR", bin_dir)
        .env("DAPT_COORDINATOR_HOST", "127.0.0.1")
        .env("DAPT_COORDINATOR_PORT", free_port().to_string())
        .env("DAPT_DEVICE", "cpu")
        .env("DAPT_HOST", "127.0.0.1")
        .env("DAPT_LOG_FORMAT", "json")
        .env("RAYON_NUM_THREADS", "1");
    (cmd, job)
}

/// `deploy/slurm/dapt.sbatch` as the batch step of a two-node allocation: it prepares the
/// corpus, runs the coordinator, and `srun` (the shim above: there is no Slurm here) runs
/// `dapt-node.sh` on each node.
#[test]
fn the_slurm_batch_script_runs_the_job_over_its_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cmd, job) = slurm_batch(dir.path(), "slurm", 12);
    let submit = dir.path().join("submit");
    let _serial = serial();
    let mut batch = Proc::spawn(cmd);
    let (status, _) = batch.finish(LONG);
    assert!(status.success(), "{status}\n{}", batch.stderr());
    let lines = batch.lines();
    let mut ids = joined(&lines);
    ids.sort();
    assert_eq!(ids, ["node0-w0", "node1-w0"]);
    assert_eq!(events(&lines, "job completed").len(), 1);
    let formed = events(&lines, "generation formed");
    assert_eq!(formed.len(), 1);
    assert_eq!(formed[0]["world"], 2);
    check_ledger(&job.checkpoints.join("ledger.jsonl"), 12 * BATCH).expect("ledger");
    for id in ["node0-w0", "node1-w0"] {
        let log = job.checkpoints.join(format!("logs/{id}.log"));
        assert!(log.is_file(), "{} is missing", log.display());
    }
    let strays: Vec<_> = std::fs::read_dir(&submit).expect("ls").collect();
    assert!(
        strays.is_empty(),
        "written in the submit folder: {strays:?}"
    );
}

/// SIGTERM to the batch script alone (`scancel --batch`, or the header's `--signal=B:TERM@300`
/// before the time limit): the coordinator checkpoints the step in progress, commits it and
/// stops, then the nodes are stopped; every step trained is committed. Before, the script
/// signalled the coordinator and the nodes together and the job stopped at its last commit.
#[test]
fn sigterm_to_the_slurm_batch_script_commits_the_step_in_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cmd, job) = slurm_batch(dir.path(), "slurmstop", 400);
    let _serial = serial();
    let mut batch = Proc::spawn(cmd);
    batch.wait_for("a step past the first commit", LONG, |l| {
        let commit = events(l, "checkpoint committed")
            .first()
            .and_then(|c| c["step"].as_u64());
        commit.is_some_and(|c| {
            events(l, "step")
                .iter()
                .any(|f| f["step"].as_u64().is_some_and(|s| s >= c))
        })
    });
    let started = std::time::Instant::now();
    batch.signal(libc::SIGTERM);
    let (status, _) = batch.finish(LONG);
    println!("stopped in {:?}", started.elapsed());
    assert_eq!(status.code(), Some(130), "{}", batch.stderr());
    let lines = batch.lines();
    let trained = events(&lines, "step")
        .iter()
        .filter_map(|f| f["step"].as_u64())
        .max()
        .expect("steps")
        + 1;
    let committed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(job.checkpoints.join("committed.json")).expect("committed.json"),
    )
    .expect("json");
    assert_eq!(
        committed["step"].as_u64(),
        Some(trained),
        "{}",
        batch.stderr()
    );
    assert!(trained < 400);
    check_ledger(&job.checkpoints.join("ledger.jsonl"), trained * BATCH).expect("ledger");
    assert!(
        batch
            .stderr()
            .contains("dapt.sbatch: coordinator exited with status 130"),
        "{}",
        batch.stderr()
    );
}

/// `dapt-node.sh` appended a worker's output through a log that was a symlink (to a user's
/// `~/.bashrc`; an audit): it refuses before starting any worker, and the file is untouched.
#[test]
fn the_node_script_never_writes_a_log_through_a_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    let users = dir.path().join("bashrc");
    std::fs::write(&users, "export PATH=~/bin:$PATH\n").expect("write");
    std::os::unix::fs::symlink(&users, logs.join("n1-w0.log")).expect("symlink");
    let out = Command::new(repo_root().join("deploy/dapt-node.sh"))
        .env("DAPT_COORDINATOR", "http://127.0.0.1:9")
        .env("DAPT_JOB", "j")
        .env("DAPT_TOKEN", "t")
        .env("DAPT_DEVICE", "cpu")
        .env("DAPT_HOST", "127.0.0.1")
        .env("DAPT_NODE_NAME", "n1")
        .env("DAPT_WORKER_BIN", binary("dapt-worker"))
        .env("DAPT_LOG_DIR", &logs)
        // (A worker started by mistake gives up on the absent coordinator at once.)
        .env("DAPT_CONNECT_TIMEOUT_S", "1")
        .output()
        .expect("dapt-node.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("n1-w0.log is a symlink"), "{stderr}");
    assert!(!stderr.contains("started"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&users).expect("read"),
        "export PATH=~/bin:$PATH\n"
    );
}

/// Runs the Kubernetes manifests through `kubernetes-validate` (the API's OpenAPI schemas,
/// offline; `.ci/run` installs it), strictly: an unknown field is an error.
#[test]
fn the_kubernetes_manifests_match_the_api_schemas() {
    let dir = repo_root().join("deploy/k8s");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("deploy/k8s")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(!files.is_empty());
    let installed = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        if std::env::var_os("CI").is_some() {
            panic!("kubernetes-validate is not installed (.ci/run installs it)");
        }
        println!("skipped: kubernetes-validate is not installed (pip install kubernetes-validate)");
        return;
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            "1.31.0",
        ])
        .args(&files)
        .output()
        .expect("python3 -m kubernetes_validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
}

/// The job file in the Kubernetes ConfigMap is one `dapt` accepts (every field checked, the
/// etcd section included), and the workers join it under its name.
#[test]
fn the_kubernetes_job_file_is_a_valid_job_and_the_workers_name_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let read = |name: &str| -> Vec<serde_yaml::Value> {
        let text = std::fs::read_to_string(repo_root().join("deploy/k8s").join(name)).expect(name);
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .collect()
    };
    let config = read("job.yaml");
    let job = config[0]["data"]["job.yaml"]
        .as_str()
        .expect("data.job.yaml");
    // The model directory is the user's own: plan the same shape from the preset.
    let hf = "hf: /data/models/Llama-2-7b-hf";
    assert!(job.contains(hf), "{job}");
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, job.replace(hf, "preset: llama-2-7b")).expect("write");
    let out = Command::new(binary("dapt"))
        .args(["plan", "--gpu", "h200"])
        .arg(&path)
        .output()
        .expect("dapt plan");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(text.contains("6.738 B parameters"), "{text}");

    let name = job
        .lines()
        .find_map(|l| l.strip_prefix("job: "))
        .expect("job: line");
    let workers = read("workers.yaml");
    let job_env = workers
        .iter()
        .filter(|d| d["kind"] == "Job")
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .find(|e| e["name"] == "DAPT_JOB")
        .expect("DAPT_JOB in workers.yaml");
    assert_eq!(job_env["value"].as_str(), Some(name));
}

/// The manifests ship no secret (deploy/k8s/make-secrets.sh makes them per deployment) and
/// turn security on: etcd over TLS with client certificates required, the job's etcd client
/// and the coordinator's mutual TLS, workers that pin the CA and read the token from a file.
#[test]
fn the_kubernetes_manifests_ship_no_secret_and_require_tls() {
    let docs: Vec<serde_yaml::Value> = std::fs::read_dir(repo_root().join("deploy/k8s"))
        .expect("deploy/k8s")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .flat_map(|p| {
            let text = std::fs::read_to_string(&p).expect("manifest");
            serde_yaml::Deserializer::from_str(&text)
                .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
                .collect::<Vec<serde_yaml::Value>>()
        })
        .collect();
    assert!(
        docs.iter().all(|d| d["kind"] != "Secret"),
        "a Secret in the manifests: make-secrets.sh makes them"
    );
    let container = |name: &str| -> serde_yaml::Value {
        docs.iter()
            .filter(|d| d["metadata"]["name"] == name && d["kind"] != "Service")
            .map(|d| d["spec"]["template"]["spec"]["containers"][0].clone())
            .next()
            .unwrap_or_else(|| panic!("no workload {name}"))
    };
    let etcd_args = format!("{:?}", container("dapt-etcd")["args"]);
    for flag in [
        "--client-cert-auth",
        "--peer-client-cert-auth",
        "https://0.0.0.0:2379",
    ] {
        assert!(etcd_args.contains(flag), "etcd without {flag}: {etcd_args}");
    }
    let env = |name: &str, var: &str| -> Option<String> {
        container(name)["env"]
            .as_sequence()?
            .iter()
            .find(|e| e["name"] == var)
            .map(|e| format!("{:?}", e))
    };
    for var in ["DAPT_COORDINATOR_CA", "DAPT_CLIENT_CERT", "DAPT_TOKEN_FILE"] {
        assert!(env("dapt-workers", var).is_some(), "workers without {var}");
    }
    assert!(env("dapt-workers", "DAPT_COORDINATOR").is_some_and(|v| v.contains("https://")));
    assert!(env("dapt-workers", "DAPT_TOKEN").is_none());
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "dapt-job")
        .expect("the job ConfigMap");
    let job = dapt_proto::job::JobSpec::parse(config["data"]["job.yaml"].as_str().expect("job"))
        .expect("job file");
    let etcd = job.cluster.etcd.expect("cluster.etcd");
    assert!(etcd.endpoints.iter().all(|e| e.starts_with("https://")));
    assert!(etcd.tls.is_some_and(|t| t.cert.is_some()));
    assert!(job.cluster.tls.is_some_and(|t| t.client_ca.is_some()));
    // etcd's RBAC: the job logs in as `dapt`, with the password of the dapt-etcd-user Secret in
    // the coordinator and in every worker; the auth Job grants exactly the job's keys.
    assert_eq!(etcd.user.as_deref(), Some("dapt"));
    let var = etcd.password_env.expect("cluster.etcd.password_env");
    for workload in ["dapt-coordinator", "dapt-workers"] {
        let from =
            env(workload, var.as_str()).unwrap_or_else(|| panic!("{workload} without ${var}"));
        assert!(from.contains("dapt-etcd-user"), "{workload}: {from}");
    }
    let auth = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "dapt-etcd-auth")
        .expect("the etcd-auth ConfigMap");
    assert_eq!(
        auth["data"]["DAPT_ETCD_PREFIX"].as_str(),
        Some(dapt_proto::job::keys::job(&etcd.prefix, &job.job).as_str()),
        "the role must cover the job's keys, no more"
    );
}

/// The etcd-auth Job's script (deploy/k8s/etcd-auth.yaml), run twice against a real etcd:
/// afterwards authentication is on, a client without a user is refused, the `dapt` user may
/// write under the job's prefix and nowhere else, and a dapt job logging in as `dapt` runs to
/// completion. Needs etcdctl (Debian's etcd-client; `.ci/run` installs it).
#[test]
fn the_shipped_etcd_auth_script_limits_dapt_to_its_job_keys() {
    if Command::new("etcdctl").arg("version").output().is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("etcdctl is not installed (.ci/run installs etcd-client)");
        }
        println!("skipped: etcdctl is not installed (apt-get install etcd-client)");
        return;
    }
    let text = std::fs::read_to_string(repo_root().join("deploy/k8s/etcd-auth.yaml"))
        .expect("etcd-auth.yaml");
    let config: serde_yaml::Value = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .find(|d: &serde_yaml::Value| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let script = config["data"]["etcd-auth.sh"]
        .as_str()
        .expect("etcd-auth.sh");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("etcd-auth.sh"), script).expect("script");
    std::fs::write(dir.path().join("root"), "root-0123456789").expect("root password");
    std::fs::write(dir.path().join("dapt"), "dapt-0123456789").expect("dapt password");
    let _serial = serial();
    let etcd = dapt_tests::Etcd::start();
    let name = "authjob";
    let prefix = dapt_proto::job::keys::job("/dapt", name);
    let etcdctl = |user: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &etcd.url)
            .args(args);
        if let Some(user) = user {
            cmd.env("ETCDCTL_USER", user);
        }
        cmd.output().expect("etcdctl")
    };
    for run in 1..=2 {
        let out = Command::new("sh")
            .arg(dir.path().join("etcd-auth.sh"))
            .env("ETCDCTL_ENDPOINTS", &etcd.url)
            .env("DAPT_ETCD_PREFIX", &prefix)
            .env("ROOT_PASSWORD_FILE", dir.path().join("root"))
            .env("DAPT_PASSWORD_FILE", dir.path().join("dapt"))
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "run {run}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let key = format!("{prefix}probe");
    assert!(!etcdctl(None, &["put", &key, "x"]).status.success());
    let dapt = Some("dapt:dapt-0123456789");
    assert!(etcdctl(dapt, &["put", &key, "x"]).status.success());
    for outside in ["/dapt/another-job/x", "/elsewhere"] {
        assert!(
            !etcdctl(dapt, &["put", outside, "x"]).status.success(),
            "dapt wrote {outside}"
        );
    }
    assert!(
        etcdctl(Some("root:root-0123456789"), &["put", "/elsewhere", "x"])
            .status
            .success()
    );

    // A job on it, as the manifests run one: user dapt, password from the environment.
    let cluster = format!(
        "cluster:\n  min_workers: 1\n  max_workers: 1\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl_s: 2\n    user: dapt\n    password_env: DAPT_ETCD_PASSWORD\n",
        etcd.url
    );
    let mut c = dapt_tests::coordinator_with(
        dir.path(),
        name,
        6,
        &cluster,
        "127.0.0.1",
        &[("DAPT_ETCD_PASSWORD", "dapt-0123456789")],
    );
    let mut w = c.member("w0");
    c.complete();
    let (status, _) = w.finish(LONG);
    assert!(status.success(), "{}", w.stderr());
}
