//! `dapt launch`: one machine, the whole job. Prepares the corpus if needed, starts the
//! coordinator in this process (embedded membership) and N `dapt-worker` processes (on the CPU,
//! or one per GPU with `--device cuda`), trains to the end and exports the final checkpoint. The
//! dashboard and `/metrics` are served on a loopback port (`--metrics-listen`), whose URL the
//! banner prints. Ctrl-C (or SIGTERM) stops everything: the workers abort
//! the step in flight, the last committed checkpoint stays, and the same command resumes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use dapt_proto::job::JobSpec;
use dapt_proto::logging::LogArgs;
use tokio::process::{Child, Command};

use crate::server::{self, Outcome};

pub struct LaunchOptions {
    pub workers: u32,
    /// This process's log flags; the workers get the same format, and colour in their log
    /// files only with `--color always`.
    pub log: LogArgs,
    /// Where the coordinator listens (port 0 picks one).
    pub listen: SocketAddr,
    /// Skip the export of the final checkpoint.
    pub no_export: bool,
    pub device: LaunchDevice,
    /// Compute dtype on GPUs (`dapt-worker --precision`).
    pub precision: dapt_proto::device::Precision,
    /// Where the dashboard and `/metrics` are served (port 0 picks one).
    pub metrics_listen: SocketAddr,
}

/// Where `dapt launch`'s workers train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchDevice {
    Cpu,
    /// Worker i on GPU i.
    Cuda,
}

impl std::str::FromStr for LaunchDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(LaunchDevice::Cpu),
            "cuda" | "gpu" => Ok(LaunchDevice::Cuda),
            _ => Err(format!("unknown device `{s}`: use cpu or cuda")),
        }
    }
}

impl LaunchDevice {
    /// Worker `i`'s `--device`.
    fn for_worker(self, i: u32) -> String {
        match self {
            LaunchDevice::Cpu => "cpu".into(),
            LaunchDevice::Cuda => format!("cuda:{i}"),
        }
    }
}

/// What the user is told at the end, and the exit status.
pub struct Launched {
    pub outcome: Outcome,
    pub export: Option<PathBuf>,
    /// Why the export of the final checkpoint failed, when it did: the job itself completed.
    pub export_failed: Option<String>,
    pub logs: PathBuf,
    /// What the job did, for the end summary.
    pub summary: crate::progress::Summary,
}

pub async fn launch(mut job: JobSpec, options: LaunchOptions) -> anyhow::Result<Launched> {
    anyhow::ensure!(options.workers > 0, "--workers must be at least 1");
    let worker_exe = sibling("dapt-worker")?;
    // Without a limit in the job, this launch's workers are all the ranks there will be: form as
    // soon as they are all in.
    if job.cluster.max_workers.is_none() {
        job.cluster.max_workers = Some(options.workers);
    }
    if job.cluster.min_workers > options.workers {
        anyhow::bail!(
            "cluster.min_workers is {} but --workers is {}",
            job.cluster.min_workers,
            options.workers
        );
    }
    // The workers are this machine's own processes, on loopback by default: no TLS between
    // them and the coordinator (it would need a CA the workers trust; nothing crosses a
    // network). A non-loopback --listen gets the coordinator's clear-text warning.
    if job.cluster.tls.take().is_some() {
        tracing::info!(
            "cluster.tls is for `dapt coordinator`: dapt launch serves its local workers without TLS"
        );
    }
    let token = random_token()?;
    let coordinator = server::start(
        job.clone(),
        server::Token::PerRun(token.clone()),
        options.listen,
        None,
        Some(options.metrics_listen),
    )
    .await?;
    let url = format!("http://{}", coordinator.addr);
    // The run's token in a file only this user reads, so that `dapt status` can watch the job
    // (it could not: the token was made here and never shown; a new user's walk-through).
    let token_file = job.checkpoint.dir.join(LAUNCH_TOKEN_FILE);
    write_token_file(&token_file, &token)?;
    // No more ranks than samples in a step: the others wait as standbys (it said 10 workers and
    // trained 8 without a word; a new user's walk-through).
    let ranks = job.training.map_or(u64::from(options.workers), |t| {
        t.global_batch.min(u64::from(options.workers))
    });
    let world = if ranks < u64::from(options.workers) {
        tracing::warn!(
            workers = options.workers,
            ranks,
            "training.global_batch {ranks} caps the world at {ranks} ranks: {} workers wait as standbys",
            u64::from(options.workers) - ranks
        );
        format!(
            "{} workers ({ranks} train: training.global_batch {ranks} caps the ranks; {} wait as \
             standbys)",
            options.workers,
            u64::from(options.workers) - ranks
        )
    } else {
        format!(
            "{} worker{}",
            options.workers,
            if options.workers == 1 { "" } else { "s" }
        )
    };
    let mut banner = crate::progress::Banner::new(&job, world, url.clone());
    banner.device = Some(match options.device {
        LaunchDevice::Cpu => "cpu".to_string(),
        LaunchDevice::Cuda => format!("cuda (worker i on GPU i), {}", options.precision),
    });
    if let Some(addr) = coordinator.metrics_addr {
        banner.dashboard = Some(format!("http://{addr}/"));
        banner.metrics = Some(format!("http://{addr}/metrics"));
    }
    let token_path = token_file.to_string_lossy();
    banner.status = Some(format!(
        "dapt status {url} --token-file {}",
        shlex::try_quote(&token_path).unwrap_or(token_path.clone())
    ));
    banner.announce();
    let progress = coordinator.progress();
    let logs = job.checkpoint.dir.join("logs");
    if std::fs::symlink_metadata(&logs).is_ok_and(|m| m.file_type().is_symlink()) {
        anyhow::bail!(
            "{} is a symlink: dapt writes its worker logs only into a directory of its own",
            logs.display()
        );
    }
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    // Each worker gets its share of the cores: several rayon pools on the same cores fight.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / options.workers as usize).max(1);
    let mut children = Vec::new();
    // The write ends of the workers' stdin, held until the workers have exited (tokio's
    // `Child::wait` would close them first, and a worker ends at their end-of-file).
    let mut launcher_pipes = Vec::new();
    for i in 0..options.workers {
        let id = format!("worker-{i}");
        let log_path = logs.join(format!("{id}.log"));
        let log = open_log(&log_path)?;
        let mut child = Command::new(&worker_exe)
            .arg("--log-format")
            .arg(options.log.log_format.to_string())
            .arg("--color")
            .arg(options.log.color.for_file().to_string())
            .args([
                "--coordinator",
                &url,
                "--id",
                &id,
                "--listen",
                "127.0.0.1:0",
                "--device",
                &options.device.for_worker(i),
                "--precision",
                &options.precision.to_string(),
            ])
            .env("DAPT_JOB", &job.job)
            .env("DAPT_TOKEN", &token)
            .env("RAYON_NUM_THREADS", threads.to_string())
            // Its stdin a pipe whose write end only this process holds: a worker ends when it
            // reads end-of-file, however this process ended (SIGKILL included), instead of
            // training on, orphaned, for a minute (dapt-worker's `exit_with_launcher`).
            .env("DAPT_LAUNCHER_PIPE", "stdin")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C at the terminal reaches the launcher only, which
            // then stops the workers in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", worker_exe.display()))?;
        launcher_pipes.push(child.stdin.take());
        tracing::info!(worker = %id, pid = child.id().unwrap_or(0), log = %log_path.display(), "worker started");
        children.push((id, log_path, child));
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Ctrl-Z stopped this process (and the coordinator in it) but not the workers, in their own
    // process group: they gave up on it, and `fg` found the job failed. A job is not paused:
    // Ctrl-C stops it after the step in progress, with its checkpoint, and the same command
    // resumes there.
    let mut sigtstp =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGTSTP))?;
    // The first Ctrl-C (or SIGTERM) asks the ranks to checkpoint the step in progress and stop
    // (the coordinator's `Stop`); a second one stops them at once, at the last commit.
    let mut asked = false;
    let mut interrupted = false;
    let mut all_gone = false;
    let mut exited = vec![false; children.len()];
    let events = coordinator.events();
    let mut status = coordinator.status();
    let wait = coordinator.wait();
    tokio::pin!(wait);
    let outcome = loop {
        tokio::select! {
            outcome = &mut wait => break outcome,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                stop_on_signal(&events, &children, "interrupted (Ctrl-C)", &mut asked, &mut interrupted);
            }
            _ = sigterm.recv(), if !interrupted => {
                stop_on_signal(&events, &children, "terminated (SIGTERM)", &mut asked, &mut interrupted);
            }
            // Stopped after the checkpoint of the step in progress (or given up on it): the
            // workers' training has ended, and they leave now, as at a second Ctrl-C, rather
            // than after the coordinator's wait for their sessions to end.
            _ = status.wait_for(|s| s.phase == "stopped" || s.phase == "failed"), if asked && !interrupted => {
                interrupted = true;
                signal_all(&children, libc::SIGTERM);
            }
            _ = sigtstp.recv() => {
                tracing::warn!(
                    "Ctrl-Z does not pause a dapt launch job (its workers would lose the \
                     coordinator): it goes on; Ctrl-C stops it after the step in progress, with \
                     its checkpoint, and the same command resumes there"
                );
            }
            (i, status) = any_exit(&mut children, &exited), if !exited.iter().all(|&e| e) => {
                exited[i] = true;
                let (id, log, _) = &children[i];
                // 130: it stopped on the SIGTERM sent here (a stop), as it should.
                let stopped_as_asked = interrupted && status.code() == Some(130);
                if !(status.success() || stopped_as_asked) {
                    tracing::warn!(worker = %id, %status, log = %log.display(), "worker exited");
                    print_tail(log);
                }
                if exited.iter().all(|&e| e) && !interrupted {
                    // Nobody left to train: stop rather than wait for joiners that won't come.
                    interrupted = true;
                    all_gone = true;
                    events.shutdown("every worker exited");
                }
            }
        }
    };
    // A job that ended otherwise than completed and whose workers were not signalled yet
    // (failed; every worker exited; stopped after a checkpoint of the step in progress): the
    // workers still running are told to stop now rather than waiting to be killed (they waited
    // 10 s for a coordinator that had ended; an audit).
    if !interrupted && !matches!(outcome, Outcome::Completed { .. }) {
        signal_all(&children, libc::SIGTERM);
    }
    // The workers leave on the coordinator's finish or abort; give them a moment (10 s for all of
    // them, not each), then insist.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (id, _, child) in &mut children {
        match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(worker = %id, "did not exit; killing it");
                let _ = child.kill().await;
            }
        }
    }
    drop(launcher_pipes);
    if all_gone && !matches!(outcome, Outcome::Completed { .. }) {
        anyhow::bail!(
            "every worker exited before the job completed; their logs are in {}",
            logs.display()
        );
    }
    let mut export = None;
    let mut export_failed = None;
    if let Outcome::Completed { checkpoint, .. } = &outcome {
        if !options.no_export && !checkpoint.as_os_str().is_empty() {
            let out = job.checkpoint.dir.join("export");
            // Its log goes to this process's stderr: the same colour choice.
            let status = Command::new(&worker_exe)
                .arg("--log-format")
                .arg(options.log.log_format.to_string())
                .arg("--color")
                .arg(options.log.color.to_string())
                .arg("export")
                .arg(checkpoint)
                .arg("--hf")
                .arg(&out)
                .stdout(Stdio::null())
                .status()
                .await;
            // A failed export does not hide that the job completed: the caller says both.
            match status {
                Ok(status) if status.success() => export = Some(out),
                Ok(status) => {
                    export_failed = Some(format!(
                        "exporting {} to {} failed ({status}; its error is above)",
                        checkpoint.display(),
                        out.display()
                    ))
                }
                Err(e) => {
                    export_failed = Some(format!(
                        "exporting {}: starting {}: {e}",
                        checkpoint.display(),
                        worker_exe.display()
                    ))
                }
            }
        }
    }
    let summary = progress
        .lock()
        .expect("progress")
        .summary(std::time::Instant::now());
    Ok(Launched {
        outcome,
        export,
        export_failed,
        logs,
        summary,
    })
}

/// Waits for the first child not yet seen to exit.
async fn any_exit(
    children: &mut [(String, PathBuf, Child)],
    exited: &[bool],
) -> (usize, std::process::ExitStatus) {
    loop {
        for (i, (_, _, child)) in children.iter_mut().enumerate() {
            if exited[i] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return (i, status);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker's log file, opened for appending (a resumed launch adds to the earlier run's log;
/// nothing in it is overwritten) and never through a symlink (`O_NOFOLLOW`): a `worker-N.log`
/// that is a symlink is refused, so no file outside the checkpoint directory is written.
fn open_log(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| {
            format!(
                "opening {} (dapt appends its worker logs there; it does not write through a symlink)",
                path.display()
            )
        })
}

/// The operator's signal: the first asks the job to stop after the step in progress, with its
/// checkpoint (the workers go on until the coordinator has committed it); the second stops the
/// job at once, at its last commit, and passes SIGTERM on to the workers.
fn stop_on_signal(
    events: &server::Stopper,
    children: &[(String, PathBuf, Child)],
    reason: &str,
    asked: &mut bool,
    interrupted: &mut bool,
) {
    if *asked {
        *interrupted = true;
        events.shutdown(&format!("{reason}, a second time"));
        signal_all(children, libc::SIGTERM);
    } else {
        *asked = true;
        events.stop(reason);
    }
}

/// SIGTERM to every worker still running.
fn signal_all(children: &[(String, PathBuf, Child)], signal: i32) {
    for (_, _, child) in children {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on a child's pid; no memory is touched.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }
}

fn print_tail(log: &Path) {
    use std::io::Write;
    if let Ok(text) = std::fs::read_to_string(log) {
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(10)..] {
            // Never a panic on a closed stderr: the launcher is stopping its workers.
            let _ = writeln!(std::io::stderr(), "    {line}");
        }
    }
}

/// An executable next to this one.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .with_context(|| {
            format!(
                "`{name}` is not next to this `dapt`: build both (cargo build --workspace --bins)"
            )
        })
}

/// 128 random bits as hex, from the kernel.
/// Where `dapt launch` keeps its run's token, in `checkpoint.dir`, for `dapt status`.
pub const LAUNCH_TOKEN_FILE: &str = "launch.token";

/// Writes `token` to `path`, readable by this user only (0600), as a new file renamed into
/// place: a `dapt launch` run's token, for `dapt status --token-file`. An existing file was
/// opened and rewritten before, so a token file another user had planted (a `checkpoint.dir`
/// under /tmp) kept its owner, who read the token (an audit): only an earlier run's token file
/// of this user is replaced.
fn write_token_file(path: &Path, token: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !is_launch_token_file(path) {
            anyhow::bail!(
                "{} exists and is not a token an earlier `dapt launch` wrote: not replacing it (move it away)",
                path.display()
            );
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            anyhow::bail!(
                "{} belongs to another user (uid {}), not to this one: not replacing it (another \
                 user may write in checkpoint.dir; choose a directory of your own)",
                path.display(),
                meta.uid()
            );
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    // A temporary's name of dapt's form, so one left by a kill is known as dapt's.
    let temp = dir.join(format!(
        "{}{}",
        dapt_corpus::manifest::ATOMIC_TEMP_PREFIX,
        &random_token()?[..dapt_corpus::manifest::ATOMIC_TEMP_RANDOM]
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .and_then(|mut file| {
            writeln!(file, "{token}")?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("writing the run's token to {}", path.display()));
    }
    Ok(())
}

/// Whether `path` is a token file `dapt launch` wrote: a regular file holding one token of
/// [`random_token`]'s form.
pub fn is_launch_token_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
        && std::fs::read_to_string(path).is_ok_and(|text| {
            let token = text.trim_end_matches('\n');
            token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

pub fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the job token")?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// The run's token goes into a new file of this user's, 0600, renamed into place: a token
    /// file another user planted was rewritten in place and kept its owner, who read the token
    /// (an audit); another user's is refused and left as it is.
    #[test]
    fn the_token_file_is_a_new_private_file_and_another_users_is_left_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LAUNCH_TOKEN_FILE);
        let old = "0123456789abcdef0123456789abcdef\n";
        fs::write(&path, old).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");
        let inode = fs::metadata(&path).expect("meta").ino();
        let token = random_token().expect("token");
        write_token_file(&path, &token).expect("write");
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_ne!(meta.ino(), inode, "a new file, not the old one rewritten");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            format!("{token}\n")
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [LAUNCH_TOKEN_FILE], "no temporary left");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            fs::write(&path, old).expect("write");
            std::os::unix::fs::chown(&path, Some(4242), Some(4242)).expect("chown");
            let err = write_token_file(&path, &token).expect_err("another user's");
            assert!(err.to_string().contains("uid 4242"), "{err}");
            assert_eq!(fs::read_to_string(&path).expect("read"), old);
            assert_eq!(fs::metadata(&path).expect("meta").uid(), 4242);
        }
    }
}
