//! Which job a durable state belongs to, so that another job never takes it over.
//!
//! * In etcd, the `identity` key beside the job's state holds the job's name, a digest of its
//!   token (never the token) and its `checkpoint.dir`, written at the first lead. A coordinator
//!   whose identity differs (another job that happens to have the same name under the same
//!   prefix) refuses to lead or to stand by.
//! * In `checkpoint.dir`, `job.json` holds the job's name and the same digest, written when the
//!   coordinator first opens the directory, before any step, and checked on every open; and the
//!   leading coordinator holds an exclusive advisory lock (`flock`) on `job.lock` while it leads,
//!   so a second coordinator of the same directory is refused at once.
//!
//! `dapt launch` makes a new token every run, and `dapt train` (one rank, no coordinator) has
//! none: their identity carries no digest, and a recorded digest is compared only with another
//! digest. `dapt train` takes the same lock and checks the same `job.json`, so that it never
//! trains beside a coordinator of the directory, nor resumes (and prunes) another job's
//! checkpoints.

use std::fs;
use std::path::{Path, PathBuf};

use dapt_corpus::manifest::write_atomic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::JobSpec;

/// The job's identity in its checkpoint directory.
pub const JOB_FILE: &str = "job.json";
/// The lock file the leading coordinator (or a `dapt train` run) holds an exclusive `flock` on.
pub const LOCK_FILE: &str = "job.lock";

/// The domain tag of the token digest, so that it is never a digest used for anything else.
const DIGEST_TAG: &str = "dapt job identity v1";

/// Hex SHA-256 over the domain tag, the job name and the token, each length-prefixed.
pub fn digest(job: &str, token: &str) -> String {
    let mut hash = Sha256::new();
    for part in [DIGEST_TAG, job, token] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    hex::encode(hash.finalize())
}

/// A job's identity: in etcd's `identity` key and (without the directory) in `job.json`.
/// Unknown fields are refused: a user's own `job.json` whose `job` happens to name the job is
/// not taken for ours (an audit: a coordinator rewrote one, dropping its other fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobIdentity {
    pub job: String,
    /// [`digest`] of the job's name and token; absent for `dapt launch` (a token per run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_digest: Option<String>,
    /// The job's `checkpoint.dir` (etcd only: a directory does not name itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<String>,
}

impl JobIdentity {
    /// `job`'s identity; `token` is `None` when it changes every run (`dapt launch`).
    pub fn new(job: &JobSpec, token: Option<&str>) -> Self {
        JobIdentity {
            job: job.job.clone(),
            token_digest: token.map(|t| digest(&job.job, t)),
            checkpoint_dir: Some(job.checkpoint.dir.display().to_string()),
        }
    }

    /// How `recorded` (what etcd or `job.json` says) differs from `self`, if it does. A digest
    /// is compared only with a digest; a directory only with a directory.
    pub fn differs(&self, recorded: &JobIdentity) -> Option<String> {
        if recorded.job != self.job {
            return Some(format!(
                "it belongs to job `{}`, not `{}`",
                recorded.job, self.job
            ));
        }
        if let (Some(a), Some(b)) = (&recorded.token_digest, &self.token_digest) {
            if a != b {
                return Some(format!(
                    "it was made by a job named `{}` with another token: the same job with a \
                     new token, or another job of the same name (if this job's token was \
                     changed on purpose, remove job.json from checkpoint.dir and, under etcd, \
                     the `identity` key, while no coordinator of the job runs)",
                    self.job
                ));
            }
        }
        if let (Some(a), Some(b)) = (&recorded.checkpoint_dir, &self.checkpoint_dir) {
            if a != b {
                return Some(format!(
                    "it belongs to job `{}` with checkpoint.dir {a}, not {b}",
                    self.job
                ));
            }
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    // The OS error is a plain field, not the `source()`: anyhow's `{:#}` printed it twice.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("checkpoint.dir {} is in use: another dapt process holds {LOCK_FILE} there (a coordinator or `dapt train`, of another job or of this one running already); give each job a checkpoint.dir of its own, and run a job one way at a time", dir.display())]
    Locked { dir: PathBuf },
    #[error("checkpoint.dir {} is not this job's: {reason}; give each job a checkpoint.dir of its own", dir.display())]
    OtherJob { dir: PathBuf, reason: String },
}

/// The exclusive lock on a checkpoint directory, held while this value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: fs::File,
}

/// Takes the lock on `dir` (which must exist), then checks its `job.json` against `ours`, or
/// writes it when there is none. Refuses at once when another process holds the lock.
pub fn claim(dir: &Path, ours: &JobIdentity) -> Result<DirLock, ClaimError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    // A folder every user can write into (a careless `/tmp/...` path another user made first
    // with mode 0777): any of them could replace the committed checkpoints, manifests and all,
    // or plant the next step's folder (an audit). A group-writable folder is a team's choice.
    let dir_meta = fs::metadata(dir).map_err(io(dir))?;
    if dir_meta.permissions().mode() & 0o002 != 0 {
        return Err(ClaimError::Invalid {
            path: dir.to_path_buf(),
            message: format!(
                "every user of this machine can write into this checkpoint.dir (mode {:o}, owner \
                 uid {}): any of them could replace its checkpoints; use a folder that only you \
                 (or your group) can write",
                dir_meta.permissions().mode() & 0o7777,
                dir_meta.uid()
            ),
        });
    }
    let path = dir.join(LOCK_FILE);
    // Never truncated: only its lock matters, and it may be someone's open file. Never through
    // a symlink (it made a file outside the directory), and readable by this user only: flock
    // needs no write access, so another user who could open it held it and kept the job from
    // starting (an audit).
    // O_NONBLOCK: a FIFO of that name would block the open for ever (refused below).
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ClaimError::Invalid {
                path: path.clone(),
                message: "is a symlink: dapt locks only a file of its own there; remove it".into(),
            },
            // A FIFO without a reader.
            Some(libc::ENXIO) => ClaimError::Invalid {
                path: path.clone(),
                message:
                    "is not a regular file: dapt locks only a file of its own there; remove it"
                        .into(),
            },
            _ => io(&path)(e),
        })?;
    let meta = file.metadata().map_err(io(&path))?;
    if !meta.is_file() {
        return Err(ClaimError::Invalid {
            path,
            message: "is not a regular file: dapt locks only a file of its own there; remove it"
                .into(),
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    // Another user's (planted where others may write): they could hold it and keep the job
    // from starting (a review).
    if meta.uid() != euid {
        return Err(ClaimError::Invalid {
            path,
            message: format!(
                "belongs to another user (uid {}): dapt locks only a file of its own there; \
                 remove it, or choose a checkpoint.dir of your own",
                meta.uid()
            ),
        });
    }
    // A lock file from before (0644 under the usual umask) is closed to other users now.
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
    }
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(ClaimError::Locked {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io(&path)(e.into())),
    }
    let lock = DirLock { _file: file };
    check_or_write(dir, ours)?;
    Ok(lock)
}

/// Checks `dir`'s `job.json` against `ours`, or writes it when there is none.
pub fn check_or_write(dir: &Path, ours: &JobIdentity) -> Result<(), ClaimError> {
    let ours = JobIdentity {
        checkpoint_dir: None,
        ..ours.clone()
    };
    let path = dir.join(JOB_FILE);
    if fs::symlink_metadata(&path).is_ok_and(|m| !m.file_type().is_file()) {
        return Err(ClaimError::Invalid {
            path,
            message: "is not a regular file (a symlink?): not the job identity dapt writes; \
                      move it or choose another checkpoint.dir"
                .into(),
        });
    }
    match fs::read(&path) {
        Ok(bytes) => {
            let recorded: JobIdentity =
                serde_json::from_slice(&bytes).map_err(|e| ClaimError::Invalid {
                    path: path.clone(),
                    message: format!(
                        "not the job identity dapt writes ({e}): dapt did not write it; move it \
                         or choose another checkpoint.dir"
                    ),
                })?;
            if let Some(reason) = ours.differs(&recorded) {
                return Err(ClaimError::OtherJob {
                    dir: dir.to_path_buf(),
                    reason: format!("its {JOB_FILE} says {reason}"),
                });
            }
            // A digest learned later (the directory was `dapt launch`'s first).
            if recorded.token_digest.is_none() && ours.token_digest.is_some() {
                write(&path, &ours)?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write(&path, &ours)?,
        Err(e) => return Err(io(&path)(e)),
    }
    Ok(())
}

fn write(path: &Path, identity: &JobIdentity) -> Result<(), ClaimError> {
    let bytes = serde_json::to_vec_pretty(identity).expect("an identity serializes");
    write_atomic(path, &bytes).map_err(|e| ClaimError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClaimError + '_ {
    move |error| ClaimError::Io {
        path: path.to_path_buf(),
        error,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn atomic_writes_get_the_mode_of_a_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = dir.path().join("fresh");
        fs::write(&fresh, b"x").expect("write");
        let written = dir.path().join("committed.json");
        write_atomic(&written, b"{}").expect("write_atomic");
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&written), mode(&fresh));
    }
    use super::*;

    fn identity(job: &str, token: Option<&str>) -> JobIdentity {
        JobIdentity {
            job: job.into(),
            token_digest: token.map(|t| digest(job, t)),
            checkpoint_dir: None,
        }
    }

    /// The lock file is this user's only (another user who could open it held it and kept the
    /// job from starting), an older 0644 one is closed, and a symlink in its place is refused
    /// without creating its target (it made a file outside the directory).
    #[test]
    fn the_lock_is_a_private_file_never_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = identity("a", None);
        let lock = claim(dir.path(), &ours).expect("claim");
        assert_eq!(mode(&dir.path().join(LOCK_FILE)), 0o600);
        drop(lock);
        fs::set_permissions(
            dir.path().join(LOCK_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        // (Another test's child, forked before it execs, may briefly share the dropped lock's
        // open file: the claim is tried again for a moment.)
        let lock = (0..100)
            .find_map(|_| match claim(dir.path(), &ours) {
                Err(ClaimError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                }
                other => Some(other),
            })
            .expect("the lock comes free")
            .expect("claim");
        assert_eq!(mode(&dir.path().join(LOCK_FILE)), 0o600);
        drop(lock);

        let other = tempfile::tempdir().expect("tempdir");
        let target = other.path().join("elsewhere");
        let linked = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(&target, linked.path().join(LOCK_FILE)).expect("symlink");
        let err = claim(linked.path(), &ours).expect_err("a symlink");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(!target.exists(), "nothing made outside the directory");

        // A FIFO is refused at once (the open waited for a reader for ever), and another
        // user's file is not taken (they could hold it; a review).
        let fifo = tempfile::tempdir().expect("tempdir");
        let name = std::ffi::CString::new(
            fifo.path()
                .join(LOCK_FILE)
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("path");
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let err = claim(fifo.path(), &ours).expect_err("a FIFO");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = tempfile::tempdir().expect("tempdir");
            let file = theirs.path().join(LOCK_FILE);
            fs::write(&file, "").expect("write");
            std::os::unix::fs::chown(&file, Some(4242), Some(4242)).expect("chown");
            let err = claim(theirs.path(), &ours).expect_err("another user's");
            assert!(err.to_string().contains("uid 4242"), "{err}");
        }
    }

    /// A checkpoint.dir every user can write into is refused (another user's 0777 folder was
    /// used as is; an audit); a group-writable one is not.
    #[test]
    fn a_checkpoint_dir_everyone_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = identity("a", None);
        for (mode, refused) in [(0o777, true), (0o1777, true), (0o775, false)] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).expect("chmod");
            let claimed = claim(dir.path(), &ours);
            match claimed {
                Err(ClaimError::Invalid { message, .. }) if refused => {
                    assert!(message.contains("every user"), "{message}")
                }
                Ok(_) if !refused => {}
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_digest_binds_name_and_token_and_shows_neither() {
        let d = digest("shared", "token-of-job-A-0123456789abcdef");
        assert_eq!(d.len(), 64);
        assert!(!d.contains("token"));
        assert_ne!(d, digest("shared", "token-of-job-B-0123456789abcdef"));
        assert_ne!(d, digest("shared2", "token-of-job-A-0123456789abcdef"));
        // Length-prefixed: moving a character from the name to the token changes it.
        assert_ne!(digest("ab", "c"), digest("a", "bc"));
    }

    #[test]
    fn a_second_claim_is_refused_while_the_first_holds_and_another_job_always() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = identity("a", Some("token-a"));
        let held = claim(tmp.path(), &a).expect("claim");
        let err = claim(tmp.path(), &a).expect_err("held").to_string();
        assert!(err.contains("in use"), "{err}");
        drop(held);
        drop(claim(tmp.path(), &a).expect("free again"));
        let err = claim(tmp.path(), &identity("b", Some("token-b")))
            .expect_err("another job")
            .to_string();
        assert!(err.contains("job `a`, not `b`"), "{err}");
        let err = claim(tmp.path(), &identity("a", Some("token-c")))
            .expect_err("another token")
            .to_string();
        assert!(err.contains("another token"), "{err}");
        // `dapt launch` (no digest) resumes the same job.
        drop(claim(tmp.path(), &identity("a", None)).expect("launch"));
        let names: Vec<_> = fs::read_dir(tmp.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        assert!(
            names.iter().all(|n| n == JOB_FILE || n == LOCK_FILE),
            "{names:?}"
        );
    }
}
