//! The corpus's readers' lock: every process that reads a corpus (a training rank, `dapt
//! train`, `dapt eval`) holds a shared advisory `flock` on `OUT/.dapt-readers` for as long as it
//! reads, and `dapt prepare` refuses to build a new corpus into `OUT` while any does, and holds
//! the lock exclusively while it publishes.
//!
//! Without it (found by an audit), preparing the corpus again under a running job left the ranks
//! training on the old shards they had mapped while every later checkpoint took the new
//! corpus's `tokenizer.json`: the job's export then held a tokenizer of other ids than the model
//! was trained with, and exited 0.
//!
//! The file stays in the output directory (it is empty; removing it under a holder would split
//! the lock between two files). It is best effort where the corpus is read-only to the reader
//! and the file does not exist yet: nothing can be prepared there by this user either.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{CorpusError, Result};

/// The readers' lock file inside a corpus directory.
pub const READERS_FILE: &str = ".dapt-readers";

/// How long a reader waits for a publication in progress (the exclusive lock is held only
/// while the new corpus's directories are moved in).
const PUBLISH_WAIT: Duration = Duration::from_secs(120);

/// A shared lock on a corpus, held by its reader while this value lives.
#[derive(Debug)]
pub struct ReadLock {
    _file: File,
}

/// An exclusive lock on a corpus's readers' file: no reader holds it, and none can take it,
/// while this value lives.
#[derive(Debug)]
pub(crate) struct NoReaders {
    _file: File,
}

/// Opens the lock file `path` for locking (creating it when `create` and its directory is
/// writable), never through a link: read and write whenever it can be (an exclusive lock on NFS,
/// where flock is a whole-file POSIX lock, needs a descriptor open for writing), read-only when
/// it exists but is not writable to this process (flock needs no write access). `None` when it
/// does not exist and is not made. Shared by this lock and the output's (`prepare::output`).
///
/// The file is made 0640 (less the umask), and one of this user's that others may open is made
/// so: flock needs no write access, so any user who could open it could hold it and keep jobs
/// from reading the corpus (two minutes, then failing) or `dapt prepare` from building it (an
/// audit). The corpus's group (a team sharing it) keeps its place in the lock; other users
/// read without one, as where the file cannot be made.
pub(crate) fn open_lock_file(path: &Path, create: bool) -> Result<Option<File>> {
    let options = |write: bool| {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(write)
            .create(write && create)
            .truncate(false)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW);
        options
    };
    let denied = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EACCES | libc::EPERM | libc::EROFS)
        )
    };
    let file = match options(true).open(path) {
        Ok(file) => file,
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if denied(&e) => match options(false).open(path) {
            Ok(file) => file,
            Err(e) if denied(&e) || e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CorpusError::io(path)(e)),
        },
        Err(e) => return Err(CorpusError::io(path)(e)),
    };
    close_to_others(&file);
    Ok(Some(file))
}

/// Takes the permissions of others from `file` when it is this user's (an older dapt made it
/// 0644); best effort.
fn close_to_others(file: &File) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if let Ok(meta) = file.metadata() {
        if meta.uid() == euid && meta.mode() & 0o007 != 0 {
            let _ = file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o770));
        }
    }
}

/// What a lock attempt found.
pub(crate) enum Locked {
    Yes,
    /// Another open file holds a conflicting lock.
    Held,
    /// The file system cannot lock this file (an NFS without its lock service: `ENOLCK`; a
    /// descriptor it will not lock: `EBADF`, `EINVAL`, `EOPNOTSUPP`): the readers' lock is best
    /// effort, so this is a warning, never a reader or a run refused.
    Unsupported(std::io::Error),
}

/// Tries `operation` without waiting (through `rustix`, as the coordinator's lock on
/// `checkpoint.dir`).
pub(crate) fn try_lock(
    file: &File,
    operation: rustix::fs::FlockOperation,
) -> std::io::Result<Locked> {
    use rustix::io::Errno;
    loop {
        match rustix::fs::flock(file, operation) {
            Ok(()) => return Ok(Locked::Yes),
            Err(Errno::WOULDBLOCK) => return Ok(Locked::Held),
            Err(Errno::INTR) => continue,
            Err(e @ (Errno::NOLCK | Errno::BADF | Errno::INVAL | Errno::OPNOTSUPP)) => {
                return Ok(Locked::Unsupported(e.into()))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn unsupported(path: &Path, error: &std::io::Error) {
    tracing::warn!(
        path = %path.display(),
        %error,
        "the corpus's readers' lock is not supported here: dapt prepare cannot tell whether a job reads this corpus"
    );
}

/// Takes a shared lock on the corpus in `dir` for a reader, waiting up to two minutes for a
/// publication in progress. `Ok(None)` where no lock file can be made (read-only corpus).
pub fn read_lock(dir: &Path) -> Result<Option<ReadLock>> {
    // Only beside a corpus's manifest: `dapt eval` given a wrong folder must not leave a file
    // there (the manifest's absence is then the error the reader reports).
    if !dir.join(crate::manifest::MANIFEST_FILE).is_file() {
        return Ok(None);
    }
    let path = dir.join(READERS_FILE);
    let Some(file) = open_lock_file(&path, true)? else {
        return Ok(None);
    };
    let started = Instant::now();
    loop {
        match try_lock(&file, rustix::fs::FlockOperation::NonBlockingLockShared)
            .map_err(CorpusError::io(&path))?
        {
            Locked::Yes => break,
            Locked::Unsupported(e) => {
                unsupported(&path, &e);
                return Ok(None);
            }
            Locked::Held => {}
        }
        if started.elapsed() > PUBLISH_WAIT {
            return Err(CorpusError::Io {
                path,
                error: std::io::Error::other(format!(
                    "held exclusively by a dapt prepare publishing a new corpus for over {}s",
                    PUBLISH_WAIT.as_secs()
                )),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Some(ReadLock { _file: file }))
}

/// Takes the exclusive lock on the corpus in `out` for `dapt prepare`, or refuses at once with
/// [`CorpusError::OutputInUse`] when a reader holds it. `create`: make the file if it is not
/// there (when publishing, so that a reader that starts meanwhile waits); without, a missing
/// file means no reader has ever opened the corpus, and `Ok(None)`, as where it cannot be made.
pub(crate) fn no_readers(out: &Path, create: bool) -> Result<Option<NoReaders>> {
    let path = out.join(READERS_FILE);
    let Some(file) = open_lock_file(&path, create)? else {
        return Ok(None);
    };
    match try_lock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(CorpusError::io(&path))?
    {
        Locked::Yes => Ok(Some(NoReaders { _file: file })),
        Locked::Held => Err(CorpusError::OutputInUse {
            output: out.to_path_buf(),
            lock: path,
        }),
        Locked::Unsupported(e) => {
            unsupported(&path, &e);
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock file is closed to users outside the corpus's owner and group: flock needs no
    /// write access, so any user who could open it held it and kept jobs from reading the
    /// corpus (two minutes, then failing) or prepare from building it (an audit). An older
    /// 0644 one of this user's is closed too.
    #[test]
    fn other_users_cannot_open_the_lock_file() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(crate::manifest::MANIFEST_FILE), "{}").expect("write");
        let lock = dir.path().join(READERS_FILE);
        drop(read_lock(dir.path()).expect("lock").expect("made"));
        assert_eq!(mode(&lock) & 0o007, 0, "{:o}", mode(&lock));
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        drop(read_lock(dir.path()).expect("lock").expect("made"));
        assert_eq!(mode(&lock), 0o640);
    }

    #[test]
    fn prepare_is_refused_while_a_reader_holds_the_corpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = dir.path().join(crate::manifest::MANIFEST_FILE);
        // Not a corpus: no lock file is made there.
        assert!(read_lock(dir.path()).expect("lock").is_none());
        assert!(!dir.path().join(READERS_FILE).exists());
        std::fs::write(&manifest, "{}").expect("write");
        let reader = read_lock(dir.path()).expect("lock").expect("made");
        let second = read_lock(dir.path()).expect("lock").expect("made");
        let err = no_readers(dir.path(), true)
            .expect_err("in use")
            .to_string();
        assert!(
            err.contains("in use") && err.contains(READERS_FILE),
            "{err}"
        );
        drop(reader);
        assert!(no_readers(dir.path(), false).is_err(), "one reader is left");
        drop(second);
        let held = no_readers(dir.path(), true).expect("free").expect("made");
        // A reader waits for the publication, then reads.
        let waiter = std::thread::spawn({
            let dir = dir.path().to_path_buf();
            move || read_lock(&dir).map(|l| l.is_some())
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "a reader read during a publication");
        drop(held);
        assert!(waiter.join().expect("join").expect("lock"));
    }
}
