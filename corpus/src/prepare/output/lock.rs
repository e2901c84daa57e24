//! The lock that gives one `dapt prepare` at a time an output directory: an advisory `flock` on
//! `OUT/.dapt-lock`, taken without waiting and held until the run ends.
//!
//! `flock` is released by the kernel when its holder exits, however it exits (SIGKILL, a crashed
//! node's NFS lease), so a lock is never stale; a lock file left by a killed run is taken over.
//! The holder removes the file when it is done, so that no `.dapt-lock` outlives a run. That
//! opens one race, closed in [`OutputLock::acquire`]: a second run may have opened the file
//! before it was removed and lock the removed file; it checks that the path still names the
//! file it locked, and starts again if not.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{CorpusError, Result};

/// The lock file inside the output directory.
pub(crate) const LOCK_FILE: &str = ".dapt-lock";

/// How often the lock file may be removed under a run that just locked it before it gives up
/// (each time, another run took the lock and finished in between).
const ATTEMPTS: usize = 64;

/// The held lock of an output directory; dropping it removes the lock file and releases it.
#[derive(Debug)]
pub(crate) struct OutputLock {
    /// Closed after the file is removed (fields drop after `drop`), releasing the lock.
    #[expect(dead_code, reason = "held open for its lock, never read")]
    file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Locks the output directory `out` (which exists), or refuses at once, naming the holder,
    /// when another run holds it. `Ok(None)` when `out` is read-only to this process (a read-only
    /// mount, another user's directory): nothing can be written there, so there is nothing to
    /// guard; an up to date corpus is still checked, and a rebuild fails where it first writes.
    pub(crate) fn acquire(out: &Path) -> Result<Option<Self>> {
        let path = out.join(LOCK_FILE);
        for _ in 0..ATTEMPTS {
            let Some(mut file) = open(&path)? else {
                tracing::debug!(output = %out.display(), "output not writable: not locked");
                return Ok(None);
            };
            if !try_flock(&file).map_err(CorpusError::io(&path))? {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(CorpusError::OutputLocked {
                    output: out.to_path_buf(),
                    lock: path,
                    holder: if holder.is_empty() {
                        "unknown pid".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            let locked = file.metadata().map_err(CorpusError::io(&path))?;
            let named = std::fs::symlink_metadata(&path).ok();
            if named.is_some_and(|m| m.dev() == locked.dev() && m.ino() == locked.ino()) {
                // Who holds it, for the message of a run that is refused; best effort.
                let _ = file
                    .set_len(0)
                    .and_then(|()| write!(file, "pid {}", std::process::id()));
                return Ok(Some(OutputLock { file, path }));
            }
            // The previous holder removed the file after we opened it: we hold a lock on a file
            // no one else will open. Open the path again.
        }
        Err(CorpusError::Io {
            path,
            error: std::io::Error::other(format!(
                "could not be locked: removed under this run {ATTEMPTS} times"
            )),
        })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held: a run that opened it meanwhile finds the path gone once it
        // gets the lock, and opens a new file.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens (creating) the lock file for locking, never through a link: the lock is the output's
/// own file ([`crate::readers::open_lock_file`]). `None` when the directory is not writable.
fn open(path: &Path) -> Result<Option<File>> {
    crate::readers::open_lock_file(path, true)
}

/// An exclusive `flock` without waiting: `Ok(false)` when another open file holds it. A file
/// system that cannot lock is an error here: two runs publishing at once is what this prevents.
fn try_flock(file: &File) -> std::io::Result<bool> {
    use crate::readers::{try_lock, Locked};
    match try_lock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive)? {
        Locked::Yes => Ok(true),
        Locked::Held => Ok(false),
        Locked::Unsupported(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_the_file_goes_with_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = OutputLock::acquire(dir.path())
            .expect("lock")
            .expect("writable");
        let err = OutputLock::acquire(dir.path()).expect_err("held");
        let msg = err.to_string();
        assert!(
            matches!(err, CorpusError::OutputLocked { .. })
                && msg.contains(&format!("pid {}", std::process::id()))
                && msg.contains(".dapt-lock"),
            "{msg}"
        );
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists(), "lock file removed");
        let again = OutputLock::acquire(dir.path()).expect("free again");
        assert!(again.is_some());
    }

    #[test]
    fn a_lock_file_left_by_a_killed_run_is_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCK_FILE), "pid 1").expect("write");
        let lock = OutputLock::acquire(dir.path())
            .expect("lock")
            .expect("writable");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("read"),
            format!("pid {}", std::process::id())
        );
        drop(lock);
    }

    /// The race the inode check closes: a run that opened the file before its holder removed it
    /// gets a lock on a file that no longer has the name, while a third run locks the new file.
    #[test]
    fn a_lock_on_a_removed_file_is_not_taken_for_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = OutputLock::acquire(dir.path())
            .expect("lock")
            .expect("writable");
        let early = File::open(dir.path().join(LOCK_FILE)).expect("open before removal");
        drop(first);
        let third = OutputLock::acquire(dir.path())
            .expect("lock")
            .expect("writable");
        // `early` can flock its removed file: only the name check tells it that is no lock.
        assert!(try_flock(&early).expect("flock"));
        let early_ino = early.metadata().expect("meta").ino();
        let named = std::fs::metadata(dir.path().join(LOCK_FILE)).expect("meta");
        assert_ne!(early_ino, named.ino());
        assert!(OutputLock::acquire(dir.path()).is_err(), "still held");
        drop(third);
    }
}
