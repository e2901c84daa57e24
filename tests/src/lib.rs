//! Helpers for the end-to-end tests in `tests/tests/`, which run the real `dapt` binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod netns;

pub use netns::Net;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository root")
        .to_path_buf()
}

/// A binary of this workspace, built in the same profile as the running test.
///
/// Cargo builds a package's binaries only for that package's own tests, so the README's test
/// command builds them first (`cargo build --workspace --bins && cargo test --workspace`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (same profile as the tests)",
        path.display()
    );
    path
}

/// Runs `dapt` with `args` and returns its output.
pub fn dapt(args: &[&str]) -> Output {
    let out = Command::new(binary("dapt"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("dapt runs");
    assert_no_invariant_violation(&format!("dapt {}", args.join(" ")), &text(&out.stderr));
    out
}

/// What a debug build's control loop logs when a decision breaks one of its invariants
/// (`coordinator/src/control/invariants.rs`); it logs and goes on, so the tests look for it.
pub const INVARIANT_VIOLATED: &str = "control invariant violated";

/// Panics, quoting the lines, when `log` holds [`INVARIANT_VIOLATED`]. [`dapt`] and every
/// [`Proc`] (when it is finished or dropped) call it, so that every end-to-end test fails on a
/// violation, whatever it asserts itself.
pub fn assert_no_invariant_violation(what: &str, log: &str) {
    let violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(INVARIANT_VIOLATED))
        .collect();
    assert!(
        violations.is_empty(),
        "{what} logged {} control invariant violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
}

/// The largest absolute difference between `a` and `b` (same length).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running binary whose stderr log lines (`--log-format json`) are collected as they come.
pub struct Proc {
    pub child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    raw: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Starts `command` with stderr captured (it should log JSON) and stdout inherited.
    pub fn spawn(mut command: Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let raw = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (l, r) = (lines.clone(), raw.clone());
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    l.lock().expect("lines").push(v);
                }
                let mut raw = r.lock().expect("raw");
                raw.push_str(&line);
                raw.push('\n');
            }
        });
        Proc {
            child,
            lines,
            raw,
            reader: Some(reader),
        }
    }

    /// The log lines so far.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.lines.lock().expect("lines").clone()
    }

    /// stderr so far, as text.
    pub fn stderr(&self) -> String {
        self.raw.lock().expect("raw").clone()
    }

    /// Log lines whose message is `message`, as their `fields`.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        events(&self.lines(), message)
    }

    /// Waits until some log line satisfies `pred`; panics with the log after `timeout`, or
    /// when the process exits first.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        if let Some(status) = self.wait_for_or_exit(what, timeout, pred) {
            panic!("exited ({status}) before {what}:\n{}", self.stderr());
        }
    }

    /// [`Proc::wait_for`], returning the exit status when the process exits before a line
    /// satisfies `pred` (`None` once one does).
    pub fn wait_for_or_exit(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if pred(&self.lines()) {
                return None;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reader thread may still be taking in the last lines of a loaded machine.
                let drained = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while std::time::Instant::now() < drained {
                    if pred(&self.lines()) {
                        return None;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}:\n{}", self.stderr());
    }

    /// Waits for the process to exit (kills it and panics after `timeout`); returns its exit
    /// status and stdout. `lines()` then holds every log line.
    pub fn finish(&mut self, timeout: std::time::Duration) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                let mut out = String::new();
                if let Some(mut stdout) = self.child.stdout.take() {
                    let _ = stdout.read_to_string(&mut out);
                }
                assert_no_invariant_violation("a process of the test", &self.stderr());
                return (status, out);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("did not exit within {timeout:?}:\n{}", self.stderr());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        // The reader ends when the pipe closes; a grandchild holding it open must not hang
        // the test, so it gets 2 s.
        if let Some(r) = self.reader.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !r.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        assert_no_invariant_violation("a process of the test", &self.stderr());
    }
}

/// The `fields` of the log lines whose message is `message`.
pub fn events(lines: &[serde_json::Value], message: &str) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == message)
        .map(|l| l["fields"].clone())
        .collect()
}

/// Whether process `pid` still exists.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid as i32, 0) == 0 };
    // An orphan that exited stays a zombie until its new parent reaps it (a container's init
    // may never): it is not running.
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
}

/// `GET path` over plain HTTP/1.1 from `addr` (`host:port`): the reply's head (status line and
/// headers) and its body.
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (head.to_string(), body.to_string())
}

/// The value of the Prometheus sample `series` (name and labels, as exposed) in `text`.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample `{series}` in:\n{text}"))
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A base port `p` such that `p..p + count` are all free on every interface now (for scripts
/// that give worker `i` port `p + i`): a run below Linux's ephemeral range (32768 and up), so
/// that the ports other processes are handed meanwhile do not land in it, each checked by
/// binding it.
pub fn free_port_run(count: u16) -> u16 {
    let mut x = test_seed() | 1;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20_000 + (x % 12_000) as u16;
        let held: Vec<_> = (0..count)
            .map_while(|i| std::net::TcpListener::bind(("0.0.0.0", base + i)).ok())
            .collect();
        if held.len() == usize::from(count) {
            return base;
        }
    }
}

/// The ledger's entries as (step, start, end), and a check that they cover `[0, end)` exactly
/// once: returns an error naming the first gap or overlap.
pub fn check_ledger(path: &Path, end: u64) -> Result<Vec<(u64, u64, u64)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let entries: Vec<(u64, u64, u64)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("ledger line is JSON");
            (
                v["step"].as_u64().expect("step"),
                v["start"].as_u64().expect("start"),
                v["end"].as_u64().expect("end"),
            )
        })
        .collect();
    check_entries(entries, end)
}

/// Checks that ledger entries (step, start, end) cover `[0, end)` exactly once.
pub fn check_entries(
    mut entries: Vec<(u64, u64, u64)>,
    end: u64,
) -> Result<Vec<(u64, u64, u64)>, String> {
    let mut ranges: Vec<(u64, u64)> = entries.iter().map(|e| (e.1, e.2)).collect();
    ranges.sort();
    let mut next = 0;
    for (start, stop) in ranges {
        if start != next {
            return Err(format!(
                "samples {} covered {}",
                next.min(start),
                if start < next { "twice" } else { "never" }
            ));
        }
        next = stop;
    }
    if next != end {
        return Err(format!("ledger ends at sample {next}, expected {end}"));
    }
    entries.sort();
    Ok(entries)
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports in a temporary directory, with
/// fast heartbeat and election settings; stopped (SIGTERM, then SIGKILL) and removed on drop.
/// [`Etcd::stop`] and [`Etcd::restart`] make an outage: the data directory and ports stay.
/// [`Etcd::start_tls`] serves clients over TLS only, with client-certificate authentication.
pub struct Etcd {
    child: Option<std::process::Child>,
    pub url: String,
    peer_url: String,
    /// Plain HTTP, for `/health` (the client URL may be TLS).
    metrics_url: String,
    exe: PathBuf,
    dir: TempDirGuard,
    pub tls: Option<EtcdCerts>,
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with the
/// `openssl` command line (for etcd, and for the coordinator's TLS).
#[derive(Debug, Clone)]
pub struct EtcdCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdCerts {
    /// Makes them in `dir`. Panics with what openssl said if it fails.
    pub fn make(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl is not installed (`apt-get install openssl`; .ci/run does)");
            assert!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=dapt-test-ca",
        ]);
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!(
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
                ),
            )
            .expect("ext file");
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=dapt-{name}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        EtcdCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// Removes a directory on drop.
struct TempDirGuard(PathBuf);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers its health endpoint. Panics with a clear message
    /// when the `etcd` binary is missing (`apt-get install etcd-server`).
    pub fn start() -> Self {
        Self::launch(false, "127.0.0.1")
    }

    /// [`Etcd::start`] with the client URL on `host` (an address of this machine, e.g. the
    /// bridge of a [`Net`], so that its hosts reach etcd too).
    pub fn start_on(host: &str) -> Self {
        Self::launch(false, host)
    }

    /// [`Etcd::start`] with TLS on the client URL (https) and client certificates required.
    pub fn start_tls() -> Self {
        Self::launch(true, "127.0.0.1")
    }

    fn launch(tls: bool, host: &str) -> Self {
        let exe = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("etcd is not installed: `apt-get install -y etcd-server` (.ci/run does)");
        let dir =
            std::env::temp_dir().join(format!("dapt-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let tls = tls.then(|| EtcdCerts::make(&dir));
        let (client, peer, metrics) = (free_port(), free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            child: None,
            url: format!("{scheme}://{host}:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
            metrics_url: format!("http://127.0.0.1:{metrics}"),
            exe,
            dir: TempDirGuard(dir),
            tls,
        };
        etcd.restart();
        etcd
    }

    /// Starts etcd again on the same ports and data, after [`Etcd::stop`]; waits until healthy.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("etcd.log"))
            .expect("etcd log");
        let (url, peer_url) = (&self.url, &self.peer_url);
        let mut cmd = Command::new(&self.exe);
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.dir.0.join("data"))
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", peer_url])
            .args(["--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .args(["--listen-metrics-urls", &self.metrics_url])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        // Generous on a loaded 2-core machine; an etcd that exited (a port taken between
        // `free_port` and its bind) or never answers is reported with its log.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.healthy() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || std::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.0.join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                panic!(
                    "etcd did not become healthy ({exited:?}); the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stops etcd: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills etcd with SIGKILL (a crash: nothing flushed, no goodbye to its clients); the data
    /// directory and ports stay for [`Etcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// GET /health (on the plain metrics URL) answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let addr = self.metrics_url.trim_start_matches("http://");
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Samples per step in the jobs `write_job` writes.
pub const BATCH: u64 = 7;

pub struct Job {
    pub path: PathBuf,
    pub checkpoints: PathBuf,
    pub steps: u64,
}

/// A tiny-model job named `name` (its file is `<name>.yaml`): `steps` steps of 7 windows of 32
/// tokens, a checkpoint every 5 steps, `cluster` appended as YAML.
pub fn write_job(dir: &Path, name: &str, steps: u64, cluster: &str) -> Job {
    let corpus = repo_root().join("examples/quickstart/corpus");
    let checkpoints = dir.join(format!("ck-{name}"));
    let job = format!(
        "job: {name}\nseed: 5\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: 3\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\n      held_out: 0.2\ntraining:\n  seq_len: 32\n  global_batch: {BATCH}\n  micro_batch: 2\n  tokens: {tokens}\n  optimizer:\n    lr: 0.003\ncheckpoint:\n  dir: {ck}\n  every: 5\n  keep: 2\n{cluster}",
        out = dir.join("corpus").display(),
        c = corpus.display(),
        ck = checkpoints.display(),
        tokens = steps * BATCH * 32,
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, job).expect("write job");
    Job {
        path,
        checkpoints,
        steps,
    }
}

/// (step, loss) of the coordinator's step lines.
pub fn losses(lines: &[serde_json::Value]) -> Vec<(u64, f64)> {
    events(lines, "step")
        .iter()
        .map(|f| {
            (
                f["step"].as_u64().expect("step"),
                f["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

/// Tests that start several processes run one at a time, so that a loaded machine does not
/// turn heartbeats late.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `DAPT_TEST_SEED` if set (to replay a failure), else one from the clock.
pub fn test_seed() -> u64 {
    std::env::var("DAPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        })
}

/// A number in `[lo, hi)` from a seed that is printed, so a failing schedule can be replayed
/// with `DAPT_TEST_SEED`.
pub fn random_step(lo: u64, hi: u64) -> u64 {
    let seed = test_seed();
    println!("schedule seed {seed} (replay with DAPT_TEST_SEED={seed})");
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    lo + x % (hi - lo)
}

/// Long enough for any one wait of these tests.
pub const LONG: std::time::Duration = std::time::Duration::from_secs(240);

/// A `dapt coordinator` of a prepared job, listening on a free port.
pub struct Cluster {
    pub coordinator: Proc,
    pub url: String,
    pub token: String,
    pub job: Job,
    /// Set for the coordinator and every worker.
    pub env: Vec<(String, String)>,
}

/// Prepares `write_job(dir, name, steps, cluster)` and starts its coordinator.
pub fn coordinator(dir: &Path, name: &str, steps: u64, cluster: &str) -> Cluster {
    coordinator_on(dir, name, steps, cluster, "127.0.0.1")
}

/// [`coordinator`], listening on `host` (an address of this machine).
pub fn coordinator_on(dir: &Path, name: &str, steps: u64, cluster: &str, host: &str) -> Cluster {
    coordinator_with(dir, name, steps, cluster, host, &[])
}

/// [`coordinator_on`] with `env` set for the coordinator and for every worker of the cluster.
pub fn coordinator_with(
    dir: &Path,
    name: &str,
    steps: u64,
    cluster: &str,
    host: &str,
    env: &[(&str, &str)],
) -> Cluster {
    coordinator_edited(dir, name, steps, cluster, host, env, &|yaml| {
        yaml.to_string()
    })
}

/// [`coordinator_with`] whose job file is first rewritten by `edit` (the whole YAML text in,
/// the new text out): for settings `write_job` does not take, such as `training.zero_stage`.
pub fn coordinator_edited(
    dir: &Path,
    name: &str,
    steps: u64,
    cluster: &str,
    host: &str,
    env: &[(&str, &str)],
    edit: &dyn Fn(&str) -> String,
) -> Cluster {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let job = write_job(dir, name, steps, cluster);
    let yaml = std::fs::read_to_string(&job.path).expect("read job");
    std::fs::write(&job.path, edit(&yaml)).expect("write job");
    let out = Command::new(binary("dapt"))
        .args(["prepare", "--quiet"])
        .arg(&job.path)
        .output()
        .expect("prepare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    // At least 32 characters: `dapt coordinator` refuses shorter tokens.
    let token = "dapt-test-token-0123456789abcdef".to_string();
    let mut cmd = Command::new(binary("dapt"));
    cmd.args(["--log-format", "json", "coordinator"])
        .arg(&job.path)
        .args(["--listen", &format!("{host}:{port}")])
        .env("DAPT_TOKEN", &token)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let mut coordinator = Proc::spawn(cmd);
    coordinator.wait_for("the coordinator to listen", LONG, |l| {
        !events(l, "coordinator listening").is_empty()
    });
    Cluster {
        coordinator,
        url: format!("http://{host}:{port}"),
        token,
        job,
        env,
    }
}

impl Cluster {
    /// A `dapt-worker` joining with the given job name and token.
    pub fn worker(&self, id: &str, job: &str, token: &str) -> Proc {
        self.spawn_worker(Command::new(binary("dapt-worker")), id, job, token)
    }

    /// `worker` (a `dapt-worker` command: e.g. [`Net::worker_command`]'s, in a lab host) joining
    /// as `id` with the right job name and token.
    pub fn member_from(&self, worker: Command, id: &str) -> Proc {
        let name = self.job_name();
        self.spawn_worker(worker, id, &name, &self.token.clone())
    }

    fn spawn_worker(&self, mut cmd: Command, id: &str, job: &str, token: &str) -> Proc {
        cmd.args([
            "--log-format",
            "json",
            "--coordinator",
            &self.url,
            "--id",
            id,
        ])
        .env("DAPT_JOB", job)
        .env("DAPT_TOKEN", token)
        .env("RAYON_NUM_THREADS", "1")
        .envs(self.env.iter().map(|(k, v)| (k, v)));
        Proc::spawn(cmd)
    }

    /// A `dapt-worker` joining with the right job name and token.
    pub fn member(&self, id: &str) -> Proc {
        let name = self.job_name();
        self.worker(id, &name, &self.token.clone())
    }

    /// Waits until the coordinator logged step `step` or a later one.
    pub fn wait_step(&mut self, step: u64) {
        self.coordinator
            .wait_for(&format!("step {step}"), LONG, |l| {
                events(l, "step")
                    .iter()
                    .any(|f| f["step"].as_u64() >= Some(step))
            });
    }

    /// SIGKILLs `victim` once step `at` is logged, waits until the coordinator has re-formed
    /// and resumed without it, and starts a worker with id `id` again (it joins at the next
    /// commit).
    pub fn kill_and_restart(&mut self, victim: Proc, id: &str, at: u64) -> Proc {
        self.wait_step(at);
        victim.signal(libc::SIGKILL);
        drop(victim);
        self.coordinator
            .wait_for("the recovery to resume", LONG, |l| {
                events(l, "recovery")
                    .iter()
                    .any(|f| f["phase"] == "resumed")
            });
        self.member(id)
    }

    /// Waits for the job to complete and the coordinator to exit 0; returns its log lines.
    pub fn complete(&mut self) -> Vec<serde_json::Value> {
        self.coordinator.wait_for("the job to complete", LONG, |l| {
            !events(l, "job completed").is_empty()
        });
        let (status, _) = self.coordinator.finish(LONG);
        assert!(status.success(), "{status}");
        self.coordinator.lines()
    }

    pub fn job_name(&self) -> String {
        self.job
            .path
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned()
    }
}

/// Every tensor of a safetensors file, which must all be f32, by name. Reads the format
/// directly (an 8-byte header length, a JSON header, the data).
pub fn f32_tensors(path: &Path) -> Result<std::collections::BTreeMap<String, Vec<f32>>, String> {
    Ok(f32_tensors_shaped(path)?
        .into_iter()
        .map(|(name, (_, values))| (name, values))
        .collect())
}

/// Tensors by name: shape and f32 values.
pub type ShapedTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// [`f32_tensors`] with each tensor's shape.
pub fn f32_tensors_shaped(path: &Path) -> Result<ShapedTensors, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or("no header length")?;
    let header: serde_json::Map<String, serde_json::Value> = bytes
        .get(8..8 + len)
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or("unreadable header")?;
    let data = &bytes[8 + len..];
    let mut tensors = std::collections::BTreeMap::new();
    for (name, tensor) in header.iter().filter(|(n, _)| *n != "__metadata__") {
        if tensor["dtype"] != "F32" {
            return Err(format!("{name}: dtype {}", tensor["dtype"]));
        }
        let offsets = &tensor["data_offsets"];
        let (start, end) = (
            offsets[0].as_u64().ok_or("offsets")? as usize,
            offsets[1].as_u64().ok_or("offsets")? as usize,
        );
        let raw = data
            .get(start..end)
            .ok_or(format!("{name}: out of bounds"))?;
        let values = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let shape = tensor["shape"]
            .as_array()
            .ok_or(format!("{name}: no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or("shape"))
            .collect::<Result<Vec<_>, _>>()?;
        tensors.insert(name.clone(), (shape, values));
    }
    Ok(tensors)
}

/// Checks that every tensor of a safetensors file is f32 and finite; returns how many values
/// it holds.
pub fn finite_weights(path: &Path) -> Result<usize, String> {
    let mut values = 0;
    for (name, tensor) in f32_tensors(path)? {
        if let Some(x) = tensor.iter().find(|x| !x.is_finite()) {
            return Err(format!("{name}: {x}"));
        }
        values += tensor.len();
    }
    Ok(values)
}

/// Writes `tensors` (name -> shape, f32 values) as a safetensors file: the inverse of
/// [`f32_tensors`], for tests that make or alter model files.
pub fn write_f32_tensors(path: &Path, tensors: &ShapedTensors) -> Result<(), String> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, values)) in tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The format aligns the data to 8 bytes by padding the header with spaces.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    bytes.extend(data);
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A `dapt coordinator` for the same job as `leader`, on a free port, and its URL: under etcd
/// membership it waits as a standby. Returns once it says so (or leads, if nobody else does).
pub fn standby(leader: &Cluster) -> (Proc, String) {
    standby_on(leader, "127.0.0.1")
}

/// [`standby`], listening on `host` (an address of this machine).
pub fn standby_on(leader: &Cluster, host: &str) -> (Proc, String) {
    // The port `free_port` found can be taken by another process before the standby binds it
    // (workers' collective listeners, etcd): then another port, a few times.
    for _ in 0..4 {
        let port = free_port();
        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["--log-format", "json", "coordinator"])
            .arg(&leader.job.path)
            .args(["--listen", &format!("{host}:{port}")])
            .env("DAPT_TOKEN", &leader.token)
            .envs(leader.env.iter().map(|(k, v)| (k, v)));
        let mut standby = Proc::spawn(cmd);
        let exited = standby.wait_for_or_exit("the standby to wait", LONG, |l| {
            !events(l, "standby: another coordinator leads").is_empty()
                || !events(l, "leading the job").is_empty()
        });
        match exited {
            None => return (standby, format!("http://{host}:{port}")),
            Some(_) if standby.stderr().contains("Address already in use") => continue,
            Some(status) => panic!(
                "exited ({status}) before the standby to wait:\n{}",
                standby.stderr()
            ),
        }
    }
    panic!("no free port for a standby coordinator after 4 tries");
}

/// `GET /metrics` over TLS with `openssl s_client`, trusting `ca`, presenting `client` (cert,
/// key) if given; the whole reply (empty when the handshake or the request was refused).
pub fn scrape_tls(
    port: u16,
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> String {
    use std::io::Write;
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("request");
    let out = child.wait_with_output().expect("s_client output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
