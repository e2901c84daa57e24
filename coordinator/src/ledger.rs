//! The job's durable state under its checkpoint directory (embedded membership):
//! `committed.json` (the last committed checkpoint and what the job's data order depends on) and
//! `ledger.jsonl` (every committed step's samples, one line per rank and step) and
//! `generation.json` (the last generation formed, so that a restarted coordinator never hands
//! out a generation number twice).
//!
//! Order of writes at a commit: ledger lines first, then `committed.json` by rename. A crash in
//! between leaves ledger lines past the committed step; [`open`] cuts them off, so the ledger
//! never counts a sample that a restart will train again.

use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use dapt_proto::job::JobSpec;
use serde::{Deserialize, Serialize};

use crate::control::{Committed, GenerationRecord, LedgerEntry};

pub const COMMITTED_FILE: &str = "committed.json";
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
            committed: Committed {
                step: 0,
                dir: String::new(),
                generation: 0,
            },
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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
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
    /// length or global batch: its committed steps would mean other samples.
    pub fn open(job: &JobSpec) -> Result<(Self, Option<Committed>), LedgerError> {
        let identity = CommittedFile::identity(job).ok_or_else(|| LedgerError::Invalid {
            path: job.checkpoint.dir.clone(),
            message: "the job has no `training:` section".into(),
        })?;
        let dir = job.checkpoint.dir.clone();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(COMMITTED_FILE);
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
                Some(file.committed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        let ledger = Ledger { dir, identity };
        ledger.truncate(committed.as_ref().map_or(0, |c| c.step))?;
        Ok((ledger, committed))
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
        if entries.iter().all(|e| e.step < step) {
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
        let record = CommittedFile {
            committed: committed.clone(),
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

    /// The number of the last generation formed in this directory, if any.
    pub fn last_generation(&self) -> Result<Option<u64>, LedgerError> {
        let path = self.dir.join(GENERATION_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<GenerationRecord>(&bytes)
                .map(|r| Some(r.generation))
                .map_err(|e| LedgerError::Invalid {
                    path,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Deletes checkpoint directories older than the `keep` newest at or before `committed`.
    pub fn prune(&self, committed: u64, keep: usize) -> Result<Vec<PathBuf>, LedgerError> {
        prune_dir(&self.dir, committed, keep)
    }
}

/// Deletes the `step-*` directories in `dir` older than the `keep` newest at or before
/// `committed`. Directories past it (written, never committed) are left for the next run to
/// replace.
pub fn prune_dir(dir: &Path, committed: u64, keep: usize) -> Result<Vec<PathBuf>, LedgerError> {
    let mut steps: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .filter(|(step, _)| *step <= committed)
        .collect();
    steps.sort();
    let remove = steps.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in steps.into_iter().take(remove) {
        fs::remove_dir_all(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

pub fn read_entries(path: &Path) -> Result<Vec<LedgerEntry>, LedgerError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut entries = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        entries.push(
            serde_json::from_str(&line).map_err(|e| LedgerError::Invalid {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })?,
        );
    }
    Ok(entries)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LedgerError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
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
        let record = GenerationRecord {
            generation: 7,
            ranks: vec!["a".into()],
            peers: vec!["10.0.0.1:29500".into()],
            resume_step: 0,
        };
        ledger.record_generation(&record).expect("record");
        let (ledger, _) = Ledger::open(&spec).expect("reopen");
        assert_eq!(ledger.last_generation().expect("read"), Some(7));
    }

    #[test]
    fn resumes_the_commit_drops_uncommitted_lines_and_refuses_another_seed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spec = job(tmp.path(), 1);
        let (ledger, committed) = Ledger::open(&spec).expect("open");
        assert_eq!(committed, None);
        let c = Committed {
            step: 2,
            dir: "d2".into(),
            generation: 1,
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
}
