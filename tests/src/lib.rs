//! Helpers for the end-to-end tests in `tests/tests/`, which run the real `dapt` binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    Command::new(binary("dapt"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("dapt runs")
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

    /// Waits until some log line satisfies `pred`; panics with the log after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if pred(&self.lines()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                if pred(&self.lines()) {
                    return;
                }
                panic!("exited ({status}) before {what}:\n{}", self.stderr());
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
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The ledger's entries as (step, start, end), and a check that they cover `[0, end)` exactly
/// once: returns an error naming the first gap or overlap.
pub fn check_ledger(path: &Path, end: u64) -> Result<Vec<(u64, u64, u64)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut entries: Vec<(u64, u64, u64)> = text
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
