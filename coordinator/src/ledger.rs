//! The job's durable state under its checkpoint directory (embedded membership):
//! `committed.json` (the last committed checkpoint and what the job's data order depends on) and
//! `ledger.jsonl` (every committed step's samples, one line per rank and step) and
//! `generation.json` (the last generation formed, so that a restarted coordinator never hands
//! out a generation number twice).
//!
//! `committed.json` names the committed checkpoint by its directory's name under checkpoint.dir
//! (`step-00000010`), not by an absolute path: the project folder may be moved, or a shared file
//! system mounted at another path, between a stop and the resume ([`resolved_dir`] reads the
//! absolute paths written before).
//!
//! Order of writes at a commit: ledger lines first, then `committed.json` by rename. A crash in
//! between leaves ledger lines past the committed step; [`open`] cuts them off, so the ledger
//! never counts a sample that a restart will train again.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use dapt_proto::checkpoint;
use dapt_proto::job::JobSpec;
use serde::{Deserialize, Serialize};

use crate::control::{Committed, GenerationRecord, LedgerEntry};
use dapt_proto::identity::{self, DirLock, JobIdentity};

pub const COMMITTED_FILE: &str = dapt_proto::checkpoint::COMMITTED_FILE;
pub const LEDGER_FILE: &str = "ledger.jsonl";
pub const GENERATION_FILE: &str = "generation.json";

/// `committed.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommittedFile {
    pub job: String,
    pub seed: u64,
    pub seq_len: u32,
    pub global_batch: u64,
    #[serde(flatten)]
    pub committed: Committed,
}

impl CommittedFile {
    /// What `job`'s committed steps depend on, with nothing committed yet; `None` without a
    /// `training:` section.
    pub fn identity(job: &JobSpec) -> Option<Self> {
        let training = job.training?;
        Some(CommittedFile {
            job: job.job.clone(),
            seed: job.seed,
            seq_len: training.seq_len,
            global_batch: training.global_batch,
            committed: Committed::default(),
        })
    }

    /// The first field in which `self` and `other` describe different samples.
    pub fn mismatch(&self, other: &CommittedFile) -> Option<&'static str> {
        [
            ("job", self.job != other.job),
            ("seed", self.seed != other.seed),
            ("training.seq_len", self.seq_len != other.seq_len),
            (
                "training.global_batch",
                self.global_batch != other.global_batch,
            ),
        ]
        .into_iter()
        .find_map(|(field, differs)| differs.then_some(field))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    // The OS error is a plain field, not the `source()`: anyhow's `{:#}` printed it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |error| LedgerError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// `dir` as `committed.json` records it: its name when it is directly under `root` (every
/// checkpoint dapt writes is), else as it is.
fn recorded_dir(root: &Path, dir: &str) -> String {
    match Path::new(dir).strip_prefix(root) {
        Ok(name) if name.components().count() == 1 => name.display().to_string(),
        _ => dir.to_owned(),
    }
}

/// The directory of the committed checkpoint of `step`, recorded as `recorded` in the
/// `committed.json` of `root`, as this machine sees it now: a name (what [`recorded_dir`]
/// writes) is joined to `root`. An absolute path (written before names were) outside `root` but
/// named as dapt names that step's checkpoint (`step-00000010`) is taken as the same name under
/// `root`: the file is `root`'s own, so the directory was moved, copied or mounted at another
/// path since, its checkpoints with it (said in the log). Anything else stays as recorded, for
/// the coordinator to refuse as not this job's (`server::check_committed`).
fn resolved_dir(root: &Path, recorded: &str, step: u64) -> String {
    let path = Path::new(recorded);
    if path.is_relative() {
        return root.join(path).display().to_string();
    }
    let name = checkpoint::step_dir_name(step);
    if path.starts_with(root) || path.file_name() != Some(std::ffi::OsStr::new(&name)) {
        return recorded.to_owned();
    }
    let moved = root.join(&name);
    tracing::info!(
        step,
        recorded,
        checkpoint = %moved.display(),
        "the committed checkpoint was recorded at another path (checkpoint.dir moved since): resuming from its step under checkpoint.dir"
    );
    moved.display().to_string()
}

/// `None` when `committed`'s checkpoint verifies (every file's SHA-256 against its manifest)
/// or this machine cannot see it at all (no checkpoint under `root`: the workers' disks are
/// elsewhere, and they verify what they load). Otherwise the newest earlier checkpoint under
/// `root` that verifies, as the commit to fall back to (said in the log); an error naming the
/// corrupt checkpoint when none does. The caller records the fallback and cuts the ledger:
/// the steps after it are trained again, never lost. Used by both stores (files and etcd).
pub fn fallback(root: &Path, committed: &Committed) -> Result<Option<Committed>, LedgerError> {
    let dir = PathBuf::from(&committed.dir);
    let kept = checkpoint::list(root);
    if !dir.exists() && kept.is_empty() {
        return Ok(None);
    }
    let problem = match checkpoint::CheckpointManifest::read(&dir) {
        Ok(m) if m.step != committed.step => format!(
            "its manifest says step {}, the commit says {}",
            m.step, committed.step
        ),
        Ok(m) => match m.verify(&dir) {
            Ok(()) => return Ok(None),
            Err(e) => e.message,
        },
        Err(e) => e.message,
    };
    tracing::warn!(
        step = committed.step,
        checkpoint = %dir.display(),
        problem = %problem,
        "the committed checkpoint failed verification"
    );
    for (step, path, manifest) in kept.iter().rev() {
        if *step >= committed.step {
            continue;
        }
        if let Err(e) = manifest.verify(path) {
            tracing::warn!(step, checkpoint = %path.display(), problem = %e.message, "an earlier checkpoint failed verification too");
            continue;
        }
        tracing::warn!(
            step,
            checkpoint = %path.display(),
            corrupt_step = committed.step,
            "falling back to the previous kept checkpoint; the steps after it are trained again"
        );
        // The mixture schedule and the guard's bases stay: the order they give is the one the
        // steps after the fallback are trained again in.
        return Ok(Some(Committed {
            step: *step,
            dir: path.display().to_string(),
            ..committed.clone()
        }));
    }
    Err(LedgerError::Invalid {
        path: dir,
        message: format!(
            "the committed checkpoint of step {} is corrupt ({problem}) and no earlier kept checkpoint verifies",
            committed.step
        ),
    })
}

/// The job's durable state in `dir`.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    identity: CommittedFile,
}

impl Ledger {
    /// Opens (or starts) the state of `job`, returning the committed checkpoint to resume from.
    /// Refuses a directory that holds another job, or the same job with another seed, sequence
    /// length or global batch: its committed steps would mean other samples. Refuses a
    /// non-empty directory without a `committed.json` that holds anything dapt does not write
    /// there (see [`foreign_entry`]): checkpoint.dir pointed at a user's folder by mistake.
    ///
    /// The committed checkpoint is verified (every file's SHA-256). When it fails, the newest
    /// earlier checkpoint that verifies takes its place (said in the log): `committed.json` is
    /// rewritten and the ledger cut back to it, so its samples are trained again, not lost.
    pub fn open(job: &JobSpec) -> Result<(Self, Option<Committed>), LedgerError> {
        let identity = CommittedFile::identity(job).ok_or_else(|| LedgerError::Invalid {
            path: job.checkpoint.dir.clone(),
            message: "the job has no `training:` section".into(),
        })?;
        let dir = job.checkpoint.dir.clone();
        let path = dir.join(COMMITTED_FILE);
        check_foreign(&dir)?;
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let committed = match fs::read(&path) {
            Ok(bytes) => {
                let file: CommittedFile =
                    serde_json::from_slice(&bytes).map_err(|e| LedgerError::Invalid {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if let Some(field) = file.mismatch(&identity) {
                    return Err(LedgerError::Invalid {
                        path,
                        message: format!(
                            "the checkpoints here were trained with another `{field}` than the job file says; use another checkpoint.dir or restore the job file"
                        ),
                    });
                }
                let committed = file.committed;
                Some(Committed {
                    dir: resolved_dir(&dir, &committed.dir, committed.step),
                    ..committed
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        let ledger = Ledger { dir, identity };
        let committed = match committed {
            Some(c) => Some(ledger.verified_or_fallback(c)?),
            None => None,
        };
        ledger.truncate(committed.as_ref().map_or(0, |c| c.step))?;
        Ok((ledger, committed))
    }

    /// [`Self::open`] for a coordinator that leads the job: first takes the directory's lock
    /// and checks (or writes) its `job.json` ([`identity::claim`]), so that a second coordinator
    /// of the same directory, or another job's, is refused before it reads or writes anything
    /// of the state. The lock is held while the returned [`DirLock`] lives.
    pub fn claim(
        job: &JobSpec,
        ours: &JobIdentity,
    ) -> Result<(Self, Option<Committed>, DirLock), LedgerError> {
        let dir = &job.checkpoint.dir;
        check_foreign(dir)?;
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock = identity::claim(dir, ours).map_err(|e| match e {
            identity::ClaimError::Io { path, error } => LedgerError::Io { path, error },
            identity::ClaimError::Invalid { path, message } => {
                LedgerError::Invalid { path, message }
            }
            other => LedgerError::Invalid {
                path: dir.clone(),
                message: other.to_string(),
            },
        })?;
        // No generation of this directory runs while its lock is ours: what an interrupted
        // checkpoint left in staging is gone for good.
        checkpoint::remove_stale_staging(dir);
        let (ledger, committed) = Self::open(job)?;
        Ok((ledger, committed, lock))
    }

    /// `committed` when its checkpoint verifies; otherwise the newest earlier checkpoint that
    /// does ([`fallback`]), recorded as the committed one, with the ledger cut back to it.
    fn verified_or_fallback(&self, committed: Committed) -> Result<Committed, LedgerError> {
        match fallback(&self.dir, &committed)? {
            None => Ok(committed),
            Some(earlier) => {
                self.fall_back(&earlier)?;
                Ok(earlier)
            }
        }
    }

    /// Records `earlier` as the committed checkpoint and cuts the ledger back to it (a
    /// fallback from a corrupt checkpoint: the steps after it are trained again).
    pub fn fall_back(&self, earlier: &Committed) -> Result<(), LedgerError> {
        self.truncate(earlier.step)?;
        self.record(earlier)
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// Every entry of the ledger.
    pub fn entries(&self) -> Result<Vec<LedgerEntry>, LedgerError> {
        read_entries(&self.ledger_path())
    }

    /// Drops ledger entries of steps at or after `step`.
    fn truncate(&self, step: u64) -> Result<(), LedgerError> {
        let path = self.ledger_path();
        if !path.exists() {
            return Ok(());
        }
        let entries = read_entries(&path)?;
        // A last line cut short (see `read_entries`) goes too, or the next append would join it.
        let torn = fs::read(&path)
            .map_err(io(&path))?
            .last()
            .is_some_and(|&b| b != b'\n');
        if !torn && entries.iter().all(|e| e.step < step) {
            return Ok(());
        }
        let kept: Vec<&LedgerEntry> = entries.iter().filter(|e| e.step < step).collect();
        let mut text = String::new();
        for e in kept {
            text.push_str(&serde_json::to_string(e).expect("entries serialize"));
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes())
    }

    /// [`Self::commit`] of a commit that carries the entries of earlier ones that failed to be
    /// recorded ([`FileCommits`]): first drops whatever of them a failed attempt left in the
    /// ledger (entries of steps from the first of `entries` on), so none is there twice.
    pub fn commit_again(
        &self,
        committed: &Committed,
        entries: &[LedgerEntry],
    ) -> Result<(), LedgerError> {
        if let Some(first) = entries.iter().map(|e| e.step).min() {
            self.truncate(first)?;
        }
        self.commit(committed, entries)
    }

    /// Appends `entries`, then records `committed`.
    pub fn commit(
        &self,
        committed: &Committed,
        entries: &[LedgerEntry],
    ) -> Result<(), LedgerError> {
        let path = self.ledger_path();
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut text = String::new();
        for e in entries {
            text.push_str(&serde_json::to_string(e).expect("entries serialize"));
            text.push('\n');
        }
        file.write_all(text.as_bytes()).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))?;
        self.record(committed)
    }

    /// Writes `committed.json`, the checkpoint named relative to the directory.
    fn record(&self, committed: &Committed) -> Result<(), LedgerError> {
        let record = CommittedFile {
            committed: Committed {
                dir: recorded_dir(&self.dir, &committed.dir),
                ..committed.clone()
            },
            ..self.identity.clone()
        };
        let json = serde_json::to_vec_pretty(&record).expect("committed serializes");
        write_atomic(&self.dir.join(COMMITTED_FILE), &json)
    }

    /// Records `record` as the last generation formed.
    pub fn record_generation(&self, record: &GenerationRecord) -> Result<(), LedgerError> {
        let json = serde_json::to_vec_pretty(record).expect("a generation record serializes");
        write_atomic(&self.dir.join(GENERATION_FILE), &json)
    }

    /// The number of the last generation formed in this directory, if any: `generation.json`'s,
    /// or the newest generation a checkpoint here records (`trainer.json`'s `generation`, which
    /// its rank 0 wrote) when that is higher. `generation.json` may have failed to be written
    /// (the job goes on without it), and the generation is the fencing token of the checkpoints
    /// (`save_with` refuses to replace a step written by a newer one): a restarted coordinator
    /// must not hand out again a number whose ranks wrote a checkpoint.
    pub fn last_generation(&self) -> Result<Option<u64>, LedgerError> {
        let path = self.dir.join(GENERATION_FILE);
        let recorded = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<GenerationRecord>(&bytes)
                .map(|r| Some(r.generation))
                .map_err(|e| LedgerError::Invalid {
                    path,
                    message: e.to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        let written = checkpoint::list(&self.dir)
            .iter()
            .filter_map(|(_, dir, _)| checkpoint::trainer_state(dir)?.get("generation")?.as_u64())
            // Not a generation any coordinator formed (an edited or corrupt trainer.json):
            // counting from it would wrap the numbering.
            .filter(|&g| g < 1 << 48)
            .max();
        Ok(recorded.max(written))
    }

    /// Deletes checkpoint directories older than the `keep` newest at or before `committed`.
    pub fn prune(&self, committed: u64, keep: usize) -> Result<Vec<PathBuf>, LedgerError> {
        prune_dir(&self.dir, committed, keep)
    }
}

/// The step `dir`'s `committed.json` records, read without taking the directory or touching
/// its ledger; `None` when there is none or it does not parse (the coordinator refuses that
/// one by name when it opens the ledger).
pub fn committed_step(dir: &Path) -> Option<u64> {
    let bytes = fs::read(dir.join(COMMITTED_FILE)).ok()?;
    let file: CommittedFile = serde_json::from_slice(&bytes).ok()?;
    Some(file.committed.step)
}

/// Refuses a directory without a `committed.json` that holds anything dapt does not write
/// ([`foreign_entry`]); `dapt launch` calls it before it writes anything there.
pub fn check_foreign(dir: &Path) -> Result<(), LedgerError> {
    if dir.join(COMMITTED_FILE).exists() {
        return Ok(());
    }
    match foreign_entry(dir)? {
        None => Ok(()),
        Some(name) => Err(LedgerError::Invalid {
            path: dir.to_path_buf(),
            message: format!(
                "checkpoint.dir exists, has no {COMMITTED_FILE} and holds `{name}`, which dapt did not write: choose an empty or new directory for checkpoint.dir"
            ),
        }),
    }
}

/// The first entry of `dir` that dapt does not write in a checkpoint directory, if any:
/// [`checkpoint::foreign_entry`] (checkpoints, their staging, the lock and `job.json`, `logs/`,
/// `export/`) and the coordinator's own files (`committed.json`, the ledger, the generation,
/// `launch.token`), each only when it holds what dapt writes there. A missing directory has
/// none.
pub fn foreign_entry(dir: &Path) -> Result<Option<String>, LedgerError> {
    checkpoint::foreign_entry(dir, |name, path| {
        // A file of dapt's name is dapt's only if it holds what dapt writes there: a user's
        // own `ledger.jsonl` was cut back or rewritten (an audit).
        match name {
            // (The `.tmp` names: temporaries of dapt versions before random names.)
            COMMITTED_FILE | "committed.tmp" | "ledger.tmp" | "generation.tmp" => true,
            LEDGER_FILE => checkpoint::regular_file(path) && is_ledger(path),
            GENERATION_FILE => {
                checkpoint::regular_file(path)
                    && checkpoint::parses_as::<crate::control::GenerationRecord>(path)
            }
            crate::launch::LAUNCH_TOKEN_FILE => crate::launch::is_launch_token_file(path),
            _ => false,
        }
    })
    .map_err(io(dir))
}

/// Whether `path` is a ledger dapt wrote: empty, or complete lines that are all ledger entries,
/// perhaps followed by one append cut short (a crash before the first commit was recorded),
/// which begins as an entry does (`{"step":`).
fn is_ledger(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string(path) else {
        return false;
    };
    // The part after the last newline is an append cut short, if anything: it begins as every
    // entry does.
    let (complete, torn) = match text.rfind('\n') {
        Some(end) => (&text[..end], &text[end + 1..]),
        None => ("", text.as_str()),
    };
    (torn.is_empty() || torn.starts_with(r#"{"step":"#))
        && complete
            .lines()
            .all(|line| serde_json::from_str::<LedgerEntry>(line).is_ok())
}

/// Deletes the dapt checkpoints in `dir` older than the `keep` newest at or before
/// `committed`. Checkpoints past it (written, never committed) are left for the next run to
/// replace. Only directories with a dapt checkpoint manifest of their step count, and only
/// their listed files are deleted ([`dapt_proto::checkpoint::remove`]): a user's `step-1/` is
/// never touched.
pub fn prune_dir(dir: &Path, committed: u64, keep: usize) -> Result<Vec<PathBuf>, LedgerError> {
    let steps: Vec<_> = checkpoint::list(dir)
        .into_iter()
        .filter(|(step, _, _)| *step <= committed)
        .collect();
    let remove = steps.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path, manifest) in steps.into_iter().take(remove) {
        match checkpoint::remove(&path, &manifest) {
            Ok(()) => removed.push(path),
            // Someone put a file of theirs in it: it stays, and so does the checkpoint.
            Err(e) => {
                tracing::warn!(checkpoint = %path.display(), error = %e, "not pruning a checkpoint")
            }
        }
    }
    Ok(removed)
}

pub fn read_entries(path: &Path) -> Result<Vec<LedgerEntry>, LedgerError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    // Every entry is written with its newline; a last line without one is an append cut short
    // (a crash, a full disk) of a commit that was never recorded: not an entry.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    let mut entries = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        entries.push(
            serde_json::from_str(line).map_err(|e| LedgerError::Invalid {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })?,
        );
    }
    Ok(entries)
}

/// `dapt_corpus::manifest::write_atomic`: through a synced temporary file of a name of its own
/// (two writers never share one), renamed; the mode of a new file (not a temporary's 0600).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LedgerError> {
    dapt_corpus::manifest::write_atomic(path, bytes).map_err(|e| match e {
        dapt_corpus::CorpusError::Io { path, error } => LedgerError::Io { path, error },
        other => LedgerError::Invalid {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

/// The file store's commits, kept until recorded: a commit that fails to be written (a full
/// disk, no file descriptor left) stays pending, its ledger entries merged into the next
/// commit's, and is written with it, so the ledger covers every committed step exactly once
/// (as the etcd committer does by retrying). Until then workers are not told the step is
/// durable, and the job does not end as completed while one is pending ([`Self::flush`]).
#[derive(Debug, Default)]
pub struct FileCommits {
    pending: Option<(Committed, Vec<LedgerEntry>)>,
}

impl FileCommits {
    /// Records `committed` with `entries` and those of the commits still pending.
    ///
    /// # Errors
    /// The write's error; the commit is then pending.
    pub fn commit(
        &mut self,
        ledger: &Ledger,
        committed: Committed,
        mut entries: Vec<LedgerEntry>,
    ) -> Result<(), LedgerError> {
        let again = match self.pending.take() {
            Some((_, mut earlier)) => {
                earlier.append(&mut entries);
                entries = earlier;
                true
            }
            None => false,
        };
        let written = if again {
            ledger.commit_again(&committed, &entries)
        } else {
            ledger.commit(&committed, &entries)
        };
        if written.is_err() {
            self.pending = Some((committed, entries));
        }
        written
    }

    /// Records the fallback to `earlier`: the ledger cut back to it, with the pending entries of
    /// steps before it written first.
    ///
    /// # Errors
    /// The write's error; the fallback is then pending as a commit of `earlier`.
    pub fn fall_back(&mut self, ledger: &Ledger, earlier: Committed) -> Result<(), LedgerError> {
        match self.pending.take() {
            None => ledger.fall_back(&earlier),
            Some((_, entries)) => {
                let kept: Vec<LedgerEntry> = entries
                    .into_iter()
                    .filter(|e| e.step < earlier.step)
                    .collect();
                let written = ledger
                    .truncate(earlier.step)
                    .and_then(|()| ledger.commit_again(&earlier, &kept));
                if written.is_err() {
                    self.pending = Some((earlier, kept));
                }
                written
            }
        }
    }

    /// Writes the pending commit, if any (at the job's end).
    ///
    /// # Errors
    /// The write's error: the last commit is not recorded.
    pub fn flush(&mut self, ledger: &Ledger) -> Result<(), LedgerError> {
        match self.pending.take() {
            None => Ok(()),
            // Written as a retry: a failed attempt may have left some of its entries.
            Some((committed, entries)) => {
                let written = ledger.commit_again(&committed, &entries);
                if written.is_err() {
                    self.pending = Some((committed, entries));
                }
                written
            }
        }
    }

    /// The step of the commit waiting to be recorded.
    pub fn pending_step(&self) -> Option<u64> {
        self.pending.as_ref().map(|(c, _)| c.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path, seed: u64) -> JobSpec {
        let mut spec = JobSpec::parse(&format!(
            "job: j\nseed: {seed}\ncorpus:\n  output: {0}/c\n  sources:\n    - name: d\n      role: domain\n      paths: [x]\n      weight: 1\ntraining:\n  seq_len: 8\n  global_batch: 4\n  tokens: 320\ncheckpoint:\n  dir: {0}/ckpt\n",
            dir.display()
        ))
        .expect("job");
        spec.checkpoint.dir = dir.join("ckpt");
        spec
    }

    /// A commit of `step` in generation 1, of directory `d<step>`.
    fn committed_at(step: u64) -> Committed {
        Committed {
            step,
            dir: format!("d{step}"),
            generation: 1,
            ..Default::default()
        }
    }

    /// The steps of the ledger's entries, in order.
    fn steps_of(ledger: &Ledger) -> Vec<u64> {
        ledger
            .entries()
            .expect("entries")
            .iter()
            .map(|e| e.step)
            .collect()
    }

    fn entry(step: u64) -> LedgerEntry {
        LedgerEntry {
            step,
            generation: 1,
            rank: 0,
            start: step * 4,
            end: step * 4 + 4,
        }
    }

    #[test]
    fn remembers_the_last_generation_formed_across_a_restart() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let (ledger, _) = Ledger::open(&spec).expect("open");
        assert_eq!(ledger.last_generation().expect("read"), None);
        record_generation_7(&ledger);
        let (ledger, _) = Ledger::open(&spec).expect("reopen");
        assert_eq!(ledger.last_generation().expect("read"), Some(7));
    }

    fn record_generation_7(ledger: &Ledger) {
        let record = GenerationRecord {
            generation: 7,
            ranks: vec!["a".into()],
            peers: vec!["10.0.0.1:29500".into()],
            resume_step: 0,
        };
        ledger.record_generation(&record).expect("record");
    }

    /// A user's file under the name of dapt's ledger is not dapt's; dapt's own, cut short by a
    /// crash before its first commit was recorded, is.
    #[test]
    fn a_ledger_is_dapts_by_its_content_not_its_name() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ledger = tmp.path().join(LEDGER_FILE);
        for (content, ours) in [
            ("", true),
            ("{\"step\":4,\"gen", true),
            (
                "{\"step\":4,\"generation\":1,\"rank\":0,\"start\":0,\"end\":4}\n{\"step\":8,",
                true,
            ),
            ("{\"run\": \"baseline\", \"notes\": \"three weeks\"}", false),
            ("{\"run\": \"baseline\"}\n", false),
            ("{\"step\": 4, \"notes\": \"mine\"}\n", false),
        ] {
            fs::write(&ledger, content).expect("write");
            assert_eq!(
                foreign_entry(tmp.path()).expect("read").is_none(),
                ours,
                "{content:?}"
            );
        }
    }

    /// `generation.json` could not be written (a full disk) while generation 9's rank 0 wrote a
    /// checkpoint: a restart must not form generation 8 or 9 again (the generation fences the
    /// checkpoints against a stale rank 0).
    #[test]
    fn a_checkpoint_written_by_a_later_generation_than_recorded_counts_as_formed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let (ledger, _) = Ledger::open(&spec).expect("open");
        record_generation_7(&ledger);
        for (step, generation) in [(10, 8), (20, 9)] {
            let dir = checkpoint_dir(&spec.checkpoint.dir, step);
            let trainer = format!(r#"{{"step": {step}, "generation": {generation}}}"#);
            fs::write(dir.join(checkpoint::TRAINER_FILE), &trainer).expect("trainer");
        }
        let (ledger, _) = Ledger::open(&spec).expect("reopen");
        assert_eq!(ledger.last_generation().expect("read"), Some(9));
    }

    #[test]
    fn resumes_the_commit_drops_uncommitted_lines_and_refuses_another_seed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let (ledger, committed) = Ledger::open(&spec).expect("open");
        assert_eq!(committed, None);
        let c = Committed {
            step: 2,
            dir: spec
                .checkpoint
                .dir
                .join("step-00000002")
                .display()
                .to_string(),
            generation: 1,
            ..Default::default()
        };
        ledger.commit(&c, &[entry(0), entry(1)]).expect("commit");
        // A crash after the ledger lines of the next commit, before committed.json moved on.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(ledger.ledger_path())
            .expect("ledger");
        writeln!(f, "{}", serde_json::to_string(&entry(2)).expect("json")).expect("write");
        let (ledger, committed) = Ledger::open(&spec).expect("reopen");
        assert_eq!(committed, Some(c));
        assert_eq!(ledger.entries().expect("entries"), vec![entry(0), entry(1)]);
        let err = Ledger::open(&job(tmp.path(), 2)).expect_err("another seed");
        assert!(err.to_string().contains("`seed`"), "{err}");
    }

    /// A dapt checkpoint of `step` under `root` with one data file.
    fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
        let dir = root.join(format!("step-{step:08}"));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("model.safetensors"), format!("weights {step}")).expect("write");
        let manifest = checkpoint::CheckpointManifest {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            files: vec![checkpoint::CheckpointFile {
                path: "model.safetensors".into(),
                bytes: fs::metadata(dir.join("model.safetensors"))
                    .expect("meta")
                    .len(),
                sha256: dapt_corpus::tokenizer::sha256_file(&dir.join("model.safetensors"))
                    .expect("sha"),
            }],
        };
        fs::write(
            dir.join(checkpoint::MANIFEST_FILE),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
        dir
    }

    /// checkpoint.dir moved (a project folder renamed, a shared disk mounted at another path)
    /// between a stop and the resume: the committed checkpoint is its step there, whether
    /// `committed.json` names it (as now) or holds the absolute path it was written at (as
    /// before, when the job refused to start with `checkpoint.keep: 1`). A path outside with
    /// another name stays as it is, for the coordinator to refuse.
    #[test]
    fn a_moved_checkpoint_dir_resumes_from_its_committed_checkpoint() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (before, after) = (tmp.path().join("before"), tmp.path().join("after"));
        let spec = job(&before, 1);
        let (ledger, _) = Ledger::open(&spec).expect("open");
        let ten = checkpoint_dir(&spec.checkpoint.dir, 10);
        let commit = |dir: &Path| Committed {
            step: 10,
            dir: dir.display().to_string(),
            generation: 1,
            ..Default::default()
        };
        ledger.commit(&commit(&ten), &[entry(0)]).expect("commit");
        let file = |spec: &JobSpec| spec.checkpoint.dir.join(COMMITTED_FILE);
        let recorded: serde_json::Value =
            serde_json::from_slice(&fs::read(file(&spec)).expect("read")).expect("json");
        assert_eq!(recorded["dir"], "step-00000010");
        drop(ledger);

        fs::rename(&before, &after).expect("move");
        let moved = job(&after, 1);
        let here = moved.checkpoint.dir.join("step-00000010");
        let (ledger, committed) = Ledger::open(&moved).expect("resume after the move");
        assert_eq!(committed, Some(commit(&here)));
        assert_eq!(ledger.entries().expect("entries"), vec![entry(0)]);

        // A record written before: the absolute path of the step at its old place.
        let old = serde_json::to_vec(&CommittedFile {
            committed: commit(&ten),
            ..CommittedFile::identity(&moved).expect("identity")
        })
        .expect("json");
        fs::write(file(&moved), old).expect("write");
        let (_, committed) = Ledger::open(&moved).expect("resume from an old record");
        assert_eq!(committed, Some(commit(&here)));

        let elsewhere = Path::new("/elsewhere/b/step-5");
        assert_eq!(
            resolved_dir(&moved.checkpoint.dir, &elsewhere.display().to_string(), 10),
            elsewhere.display().to_string()
        );
    }

    /// A ZeRO checkpoint that failed before the first commit leaves its staging folder: the
    /// next start takes the directory as dapt's (it refused it as a user's before).
    #[test]
    fn a_zero_staging_folder_left_by_a_failed_first_checkpoint_is_dapts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let staging = spec.checkpoint.dir.join(format!(
            "{}g1-step-00000005",
            checkpoint::ZERO_STAGING_PREFIX
        ));
        fs::create_dir_all(&staging).expect("mkdir");
        fs::write(staging.join("optimizer-00000-of-00002.safetensors"), "x").expect("write");
        assert_eq!(foreign_entry(&spec.checkpoint.dir).expect("read"), None);
        Ledger::open(&spec).expect("open");
        assert!(staging.exists(), "dapt must not delete it on open");
    }

    #[test]
    fn a_corrupt_committed_checkpoint_falls_back_and_pruning_spares_the_users_folders() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let root = spec.checkpoint.dir.clone();
        // A user's folder in a fresh checkpoint.dir: refused, untouched.
        fs::create_dir_all(root.join("step-1")).expect("mkdir");
        fs::write(root.join("step-1/results.csv"), "mine").expect("write");
        let err = Ledger::open(&spec).expect_err("foreign").to_string();
        assert!(err.contains("step-1"), "{err}");
        fs::remove_dir_all(root.join("step-1")).expect("rm");

        let (ledger, _) = Ledger::open(&spec).expect("open");
        let five = checkpoint_dir(&root, 5);
        let ten = checkpoint_dir(&root, 10);
        let commit = |step: u64, dir: &Path| Committed {
            step,
            dir: dir.display().to_string(),
            generation: 1,
            ..Default::default()
        };
        ledger
            .commit(&commit(5, &five), &[entry(0), entry(4)])
            .expect("commit");
        ledger
            .commit(&commit(10, &ten), &[entry(5), entry(9)])
            .expect("commit");
        // Now the user's folders sit among ours (the directory is the job's): never pruned.
        fs::create_dir_all(root.join("step-1")).expect("mkdir");
        fs::write(root.join("step-1/results.csv"), "mine").expect("write");
        let removed = prune_dir(&root, 10, 1).expect("prune");
        assert_eq!(removed, vec![five.clone()]);
        assert!(root.join("step-1/results.csv").is_file());
        let five = checkpoint_dir(&root, 5);

        let (_, committed) = Ledger::open(&spec).expect("reopen");
        assert_eq!(committed, Some(commit(10, &ten)));
        fs::write(ten.join("model.safetensors"), "weights 1O").expect("rot");
        let (ledger, committed) = Ledger::open(&spec).expect("falls back");
        assert_eq!(committed, Some(commit(5, &five)));
        assert_eq!(ledger.entries().expect("entries"), vec![entry(0), entry(4)]);
        fs::write(five.join("model.safetensors"), "weights 6").expect("rot");
        let err = Ledger::open(&spec)
            .expect_err("nothing verifies")
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn a_commit_that_fails_to_be_written_is_written_with_the_next_and_no_entry_is_lost() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let (ledger, _) = Ledger::open(&spec).expect("open");
        let commit = committed_at;
        let mut commits = FileCommits::default();
        commits
            .commit(&ledger, commit(2), vec![entry(0), entry(1)])
            .expect("first");
        // The ledger cannot be opened (as at EMFILE or a full disk): the commit stays pending.
        let path = ledger.ledger_path();
        let kept = fs::read(&path).expect("read");
        fs::remove_file(&path).expect("rm");
        fs::create_dir(&path).expect("a directory in its place");
        assert!(commits
            .commit(&ledger, commit(4), vec![entry(2), entry(3)])
            .is_err());
        assert_eq!(commits.pending_step(), Some(4));
        fs::remove_dir(&path).expect("rmdir");
        fs::write(&path, &kept).expect("restore");
        // A failed attempt that got some entries out before failing: not written twice.
        ledger.commit(&commit(3), &[entry(2)]).expect("partial");
        commits
            .commit(&ledger, commit(6), vec![entry(4), entry(5)])
            .expect("written with the next");
        assert_eq!(commits.pending_step(), None);
        assert_eq!(steps_of(&ledger), [0, 1, 2, 3, 4, 5]);
        let (_, committed) = Ledger::open(&spec).expect("reopen");
        assert_eq!(committed.map(|c| c.step), Some(6));

        // Pending at a fallback: the entries before the earlier checkpoint are written with it.
        fs::remove_file(&path).expect("rm");
        fs::create_dir(&path).expect("a directory in its place");
        assert!(commits
            .commit(&ledger, commit(8), vec![entry(6), entry(7)])
            .is_err());
        fs::remove_dir(&path).expect("rmdir");
        let lines: Vec<u64> = (0..6).collect();
        let text: String = lines
            .iter()
            .map(|&s| serde_json::to_string(&entry(s)).expect("json") + "\n")
            .collect();
        fs::write(&path, text).expect("restore");
        commits.fall_back(&ledger, commit(7)).expect("fallback");
        assert_eq!(steps_of(&ledger), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            commits.flush(&ledger).map(|_| commits.pending_step()).ok(),
            Some(None)
        );
    }

    #[test]
    fn a_torn_last_line_is_no_entry_and_a_flush_writes_nothing_twice() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let (ledger, _) = Ledger::open(&spec).expect("open");
        let commit = committed_at;
        ledger
            .commit(&commit(2), &[entry(0), entry(1)])
            .expect("commit");
        // An append cut short by a full disk: a line without its newline.
        let path = ledger.ledger_path();
        let mut text = fs::read_to_string(&path).expect("read");
        text.push_str("{\"step\":2,\"gen");
        fs::write(&path, &text).expect("write");
        assert_eq!(steps_of(&ledger), [0, 1]);
        // The commit it belonged to is pending; the job's end flushes it once, the torn line gone.
        let mut commits = FileCommits {
            pending: Some((commit(4), vec![entry(2), entry(3)])),
        };
        // As if the failed attempt had appended entry 2 whole before failing on committed.json.
        commits.flush(&ledger).expect("flush");
        assert_eq!(steps_of(&ledger), [0, 1, 2, 3]);
        let mut commits = FileCommits {
            pending: Some((commit(4), vec![entry(2), entry(3)])),
        };
        commits.flush(&ledger).expect("again");
        assert_eq!(steps_of(&ledger), [0, 1, 2, 3], "not written twice");
        let (_, committed) = Ledger::open(&spec).expect("reopen");
        assert_eq!(committed.map(|c| c.step), Some(4));
    }
}
