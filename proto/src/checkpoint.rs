//! What makes a directory a dapt checkpoint, for the worker that writes and loads checkpoints
//! and the coordinator that prunes them and picks the one to resume from.
//!
//! A checkpoint is a directory `step-<n>` whose `manifest.json` names the step and the size and
//! SHA-256 of every other file in it (plain file names, no sub-directories). Only such a
//! directory is ever deleted or replaced by dapt, and only the files its manifest lists: a
//! `step-1/` of the user's beside the checkpoints is never touched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::job::TrainingSpec;

/// The manifest file of a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// A checkpoint's trainer state (step, tokens, optimizer step count, seed, corpus digest).
pub const TRAINER_FILE: &str = "trainer.json";

/// Checkpoint `dir`'s `trainer.json` as JSON (its schema is the worker's `TrainerState`), for
/// the coordinator, which does not link the worker; `None` when it cannot be read.
pub fn trainer_state(dir: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(dir.join(TRAINER_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The job's `training:` section checkpoint `dir` was trained under, as its `trainer.json`
/// records it; `None` when it records none (written before it was recorded) or cannot be read.
pub fn recorded_training(dir: &Path) -> Option<TrainingSpec> {
    training_in(&trainer_state(dir)?)
}

/// The `training:` section a `trainer.json` records.
fn training_in(state: &serde_json::Value) -> Option<TrainingSpec> {
    serde_json::from_value(state.get("training")?.clone()).ok()
}

/// The learning-rate schedule checkpoint `dir` was trained under (its `training:` settings and
/// the re-warm it was in) and the tokens it trained, as its `trainer.json` records them; `None`
/// when it records no settings or cannot be read.
pub fn recorded_schedule(dir: &Path) -> Option<(crate::schedule::LrSchedule, u64)> {
    let state = trainer_state(dir)?;
    let rewarm = state
        .get("rewarm")
        .and_then(|r| serde_json::from_value(r.clone()).ok());
    let schedule = crate::schedule::LrSchedule::of(&training_in(&state)?).with_rewarm(rewarm);
    Some((schedule, state.get("tokens")?.as_u64()?))
}

/// The `training:` settings that shape what is learned (`optimizer.*`, `schedule.*`, `tokens`,
/// `seq_len`, `global_batch`) and differ between `recorded` (a checkpoint's) and `now` (the
/// job's), as `field before -> now`. Engine settings (micro-batch, ZeRO stage, recompute,
/// evaluation) are left out: changing them changes no result.
pub fn changed_training(recorded: &TrainingSpec, now: &TrainingSpec) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v.as_object() {
            Some(map) => {
                for (k, v) in map {
                    flatten(&format!("{prefix}{k}."), v, out);
                }
            }
            None => out.push((prefix.trim_end_matches('.').to_owned(), v.to_string())),
        }
    }
    let fields = |t: &TrainingSpec| {
        let mut out = Vec::new();
        flatten("", &serde_json::to_value(t).unwrap_or_default(), &mut out);
        out.retain(|(k, _)| {
            ["optimizer.", "schedule."].iter().any(|p| k.starts_with(p))
                || ["tokens", "seq_len", "global_batch"].contains(&k.as_str())
        });
        out
    };
    let before = fields(recorded);
    fields(now)
        .into_iter()
        .filter_map(|(k, v)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == k)
                .map(|(_, v)| v.as_str());
            (old != Some(v.as_str())).then(|| format!("{k} {} -> {v}", old.unwrap_or("unset")))
        })
        .collect()
}

/// The content digest of the corpus checkpoint `dir` was trained on, as its `trainer.json`
/// records it; `None` when it records none or cannot be read.
pub fn trained_corpus(dir: &Path) -> Option<String> {
    trainer_state(dir)?
        .get("corpus")?
        .as_str()
        .map(str::to_owned)
}
/// The checkpoint layout this dapt writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The name prefix of the hidden folders under `checkpoint.dir` where the ranks of a ZeRO job
/// stage their optimizer shards before rank 0 moves them into the checkpoint
/// (`.zero-shards-g<generation>-step-<step>`): dapt's, even when a failed checkpoint leaves one.
pub const ZERO_STAGING_PREFIX: &str = ".zero-shards-";

/// Marks a directory `dapt export` or `dapt import-gguf` wrote, so that a later run may replace
/// its files and nothing else's.
pub const EXPORT_MARKER: &str = "dapt-export.json";
/// Every file an export writes (its temporaries start with `.tmp`): what a directory marked by
/// [`EXPORT_MARKER`] may hold.
pub const EXPORT_FILES: [&str; 4] = [
    EXPORT_MARKER,
    "config.json",
    "model.safetensors",
    "tokenizer.json",
];

/// The base model's files a checkpoint carries into an export (`generation_config.json`,
/// `tokenizer_config.json`, `special_tokens_map.json`: the worker's `BASE_FILES`). An export
/// directory's copy is dapt's only when its [`EXPORT_MARKER`] lists it (`files`): one a user
/// put into an earlier export (the chat template dapt did not carry before) is theirs.
pub const CARRIED_FILES: [&str; 3] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Whether `name` may be in an export directory (one of [`EXPORT_FILES`], or a temporary).
pub fn is_export_file(name: &str) -> bool {
    EXPORT_FILES.contains(&name) || name.starts_with(".tmp")
}

/// The [`CARRIED_FILES`] that export directory `dir`'s marker says dapt wrote (none when it
/// lists none or cannot be read).
pub fn carried_files_written(dir: &Path) -> Vec<String> {
    export_marker(dir)
        .and_then(|marker| {
            marker.get("files")?.as_array().map(|files| {
                files
                    .iter()
                    .filter_map(|f| f.as_str())
                    .filter(|f| CARRIED_FILES.contains(f))
                    .map(str::to_owned)
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Export directory `dir`'s [`EXPORT_MARKER`] as JSON (its `files`, and `seq_len` and
/// `micro_batch` when the export knew how the model was trained); `None` when it cannot be read.
pub fn export_marker(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(dir.join(EXPORT_MARKER)).ok()?).ok()
}

/// Whether `name` in export directory `dir` is dapt's: [`is_export_file`], or one of the
/// [`CARRIED_FILES`] its marker lists ([`carried_files_written`]).
pub fn is_export_entry(dir: &Path, name: &str) -> bool {
    is_export_file(name)
        || (CARRIED_FILES.contains(&name) && carried_files_written(dir).iter().any(|f| f == name))
}

/// `manifest.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    pub format_version: u32,
    /// Steps completed when it was written.
    pub step: u64,
    /// Every other file of the directory.
    pub files: Vec<CheckpointFile>,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointFile {
    /// A plain file name inside the checkpoint directory.
    pub path: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// Why a directory is not a usable checkpoint; the message names the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {dir}: {message}")]
pub struct CheckpointError {
    pub dir: PathBuf,
    pub message: String,
}

impl CheckpointManifest {
    /// Reads `dir/manifest.json`; an error when it is missing, unreadable, not a dapt
    /// checkpoint manifest, or lists a path that is not a plain file name.
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let fail = |message: String| CheckpointError {
            dir: dir.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(|e| {
            // A checkpoint directory named instead of one of its checkpoints, or a step that
            // `keep` pruned: the checkpoints there are named (a new user's walk-through).
            let hint = match newest_step_dir(dir) {
                Some((step, newest)) => format!(
                    "; {} is a checkpoint directory: its newest checkpoint is step {step}, {}",
                    dir.display(),
                    newest.display()
                ),
                None => match dir.parent().and_then(newest_step_dir) {
                    Some((step, newest)) if step_of_name_path(dir).is_some() => format!(
                        "; the newest checkpoint beside it is step {step}, {} (checkpoint.keep \
                         prunes older ones)",
                        newest.display()
                    ),
                    _ => String::new(),
                },
            };
            fail(format!("no readable {MANIFEST_FILE}: {e}{hint}"))
        })?;
        let manifest: CheckpointManifest =
            serde_json::from_str(&text).map_err(|e| fail(format!("{MANIFEST_FILE}: {e}")))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(fail(format!(
                "{MANIFEST_FILE}: format version {} is not the {FORMAT_VERSION} this dapt reads",
                manifest.format_version
            )));
        }
        if let Some(f) = manifest.files.iter().find(|f| !is_plain_name(&f.path)) {
            return Err(fail(format!(
                "{MANIFEST_FILE} lists `{}`, which is not a file name inside the checkpoint",
                f.path
            )));
        }
        Ok(manifest)
    }

    /// Checks every listed file's size and SHA-256 (the whole content: no cache); the first
    /// mismatch is the error, naming the file.
    pub fn verify(&self, dir: &Path) -> Result<(), CheckpointError> {
        let fail = |message: String| CheckpointError {
            dir: dir.to_path_buf(),
            message,
        };
        for f in &self.files {
            let path = dir.join(&f.path);
            let bytes = std::fs::metadata(&path)
                .map_err(|e| fail(format!("{}: {e}", f.path)))?
                .len();
            if bytes != f.bytes {
                return Err(fail(format!(
                    "{} is {bytes} bytes, the manifest says {}: truncated or replaced",
                    f.path, f.bytes
                )));
            }
            let sha = dapt_corpus::tokenizer::sha256_file(&path)
                .map_err(|e| fail(format!("{}: {e}", f.path)))?;
            if sha != f.sha256 {
                return Err(fail(format!(
                    "{} has SHA-256 {sha}, the manifest says {}: the file is corrupt",
                    f.path, f.sha256
                )));
            }
        }
        Ok(())
    }
}

/// The name of the checkpoint directory of `step` (42 -> `step-00000042`).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step a checkpoint directory's name says (`step-00000042` -> 42).
pub fn step_of_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The newest `step-<n>` directory under `root` that holds a manifest (not read: this names a
/// place to look in an error message).
fn newest_step_dir(root: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            let step = step_of_name_path(&path)?;
            path.join(MANIFEST_FILE).is_file().then_some((step, path))
        })
        .max_by_key(|(step, _)| *step)
}

/// The step of a path named `step-<n>`, if it is so named.
fn step_of_name_path(dir: &Path) -> Option<u64> {
    step_of_name(dir.file_name()?.to_str()?)
}

/// The manifest of `dir` when it is a dapt checkpoint: named `step-<n>`, with a manifest of
/// this format whose step is `n`. `None` for anything else (a user's `step-1/` included).
pub fn identify(dir: &Path) -> Option<CheckpointManifest> {
    let step = step_of_name(dir.file_name()?.to_str()?)?;
    if !std::fs::symlink_metadata(dir).ok()?.is_dir() {
        return None;
    }
    CheckpointManifest::read(dir)
        .ok()
        .filter(|m| m.step == step)
}

/// Whether `path` is a regular file (not following a symlink).
pub fn regular_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// Whether the file at `path` reads as JSON of `T`.
pub fn parses_as<T: serde::de::DeserializeOwned>(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| serde_json::from_slice::<T>(&bytes).is_ok())
}

/// The coordinator's record of a checkpoint directory's committed step (`ledger::CommittedFile`
/// in dapt-coordinator): a directory holding one is a coordinator's.
pub const COMMITTED_FILE: &str = "committed.json";

/// The first entry of checkpoint directory `dir` that dapt does not write there, if any; `None`
/// for a missing directory. Dapt's: its checkpoints ([`identify`]) and their staging
/// directories, the directory's lock and `job.json` (when it parses as a job identity), atomic
/// writes' temporaries, `logs/` holding only `*.log` files (what `dapt launch` and
/// deploy/dapt-node.sh write there) and `export/` empty or an earlier export (a symlink or
/// anything else in them is foreign), and what `also_ours(name, path)` accepts (the
/// coordinator's ledger files). Used to refuse a checkpoint.dir that points at a user's folder.
///
/// # Errors
/// Reading `dir` (other than its absence).
pub fn foreign_entry(
    dir: &Path,
    also_ours: impl Fn(&str, &Path) -> bool,
) -> std::io::Result<Option<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut names: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .find(|(name, path)| {
            let ours = match name.as_str() {
                crate::identity::LOCK_FILE => true,
                crate::identity::JOB_FILE => {
                    regular_file(path) && parses_as::<crate::identity::JobIdentity>(path)
                }
                _ => false,
            } || also_ours(name, path)
                || dapt_corpus::manifest::is_atomic_temp(name)
                || (name == "logs" && holds_only_worker_logs(path))
                || (name == "export" && is_dapt_export_dir(path))
                || name.starts_with(".tmp-step-")
                || name.starts_with(ZERO_STAGING_PREFIX)
                || identify(path).is_some();
            !ours
        })
        .map(|(name, _)| name))
}

/// Whether `path` is a directory (not a symlink) whose entries are all regular files named
/// `*.log`: what dapt's launchers write there (`dapt launch`'s `worker-N.log`, the Slurm and
/// Kubernetes node script's `<node>-w<i>.log`, deploy/dapt-node.sh).
fn holds_only_worker_logs(path: &Path) -> bool {
    real_dir_entries(path).is_some_and(|entries| {
        entries
            .iter()
            .all(|(name, file)| *file && name.len() > 4 && name.ends_with(".log"))
    })
}

/// Whether `path` is a directory (not a symlink), empty or an earlier export: its marker and
/// only the files an export writes, all regular (the rule `dapt export` itself applies before
/// writing there, `dapt_proto::is_export_entry`).
fn is_dapt_export_dir(path: &Path) -> bool {
    real_dir_entries(path).is_some_and(|entries| {
        entries.is_empty()
            || (entries.iter().any(|(name, _)| name == EXPORT_MARKER)
                && entries
                    .iter()
                    .all(|(name, file)| *file && is_export_entry(path, name)))
    })
}

/// The entries of `path` with whether each is a regular file (not following symlinks), when
/// `path` itself is a directory and not a symlink.
fn real_dir_entries(path: &Path) -> Option<Vec<(String, bool)>> {
    if !std::fs::symlink_metadata(path).ok()?.is_dir() {
        return None;
    }
    std::fs::read_dir(path)
        .ok()?
        .map(|e| {
            let e = e.ok()?;
            let file = e.file_type().ok()?.is_file();
            Some((e.file_name().to_string_lossy().into_owned(), file))
        })
        .collect()
}

/// The dapt checkpoints directly under `root` (see [`identify`]), oldest first. A missing
/// `root` has none.
pub fn list(root: &Path) -> Vec<(u64, PathBuf, CheckpointManifest)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf, CheckpointManifest)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            identify(&path).map(|m| (m.step, path, m))
        })
        .collect();
    found.sort_by_key(|(step, _, _)| *step);
    found
}

/// Deletes checkpoint `dir`: the files its manifest lists, the manifest, then the directory,
/// which must then be empty. A directory holding anything else is left as it is, with an error
/// naming what dapt did not write.
pub fn remove(dir: &Path, manifest: &CheckpointManifest) -> Result<(), CheckpointError> {
    let fail = |message: String| CheckpointError {
        dir: dir.to_path_buf(),
        message,
    };
    let ours = |name: &str| name == MANIFEST_FILE || manifest.files.iter().any(|f| f.path == name);
    let entries = std::fs::read_dir(dir).map_err(|e| fail(e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| fail(e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ours(&name) {
            return Err(fail(format!(
                "holds `{name}`, which dapt did not write: not deleting it"
            )));
        }
    }
    for f in &manifest.files {
        match std::fs::remove_file(dir.join(&f.path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(format!("{}: {e}", f.path))),
        }
    }
    std::fs::remove_file(dir.join(MANIFEST_FILE))
        .map_err(|e| fail(format!("{MANIFEST_FILE}: {e}")))?;
    std::fs::remove_dir(dir).map_err(|e| fail(e.to_string()))
}

/// Removes the staging directories an interrupted checkpoint left in `root` (`.tmp-step-*`, the
/// rank's files before the rename into `step-N`; `.zero-shards-*`, the ranks' optimizer
/// shards): a process killed while writing left a whole checkpoint's size there for good (an
/// audit: ~84 GB for a 7B model). Only by a caller holding the directory's lock, with no
/// generation of its own that could be running (not a coordinator taking over under etcd, whose
/// ranks keep training), and only staging untouched for [`STALE_STAGING`]: a rank of a killed
/// coordinator may outlive it and still be writing (a writer touches its files as it goes). A
/// staging directory holding anything but regular files of the names a checkpoint has is left
/// as it is. Each is named in the log. Returns the directories removed and those left.
pub fn remove_stale_staging(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut removed, mut left) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(root) else {
        return (removed, left);
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".tmp-step-") || name.starts_with(ZERO_STAGING_PREFIX)) {
            continue;
        }
        let dir = entry.path();
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        if !untouched_for(&dir, STALE_STAGING) {
            continue;
        }
        let files: Option<Vec<PathBuf>> = std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries
                .map(|e| {
                    let e = e.ok()?;
                    let name = e.file_name().to_str()?.to_owned();
                    let regular = e.file_type().ok()?.is_file();
                    (regular && is_checkpoint_file(&name)).then(|| e.path())
                })
                .collect()
        });
        let done = files.is_some_and(|files| {
            files.iter().all(|f| std::fs::remove_file(f).is_ok())
                && std::fs::remove_dir(&dir).is_ok()
        });
        if done {
            tracing::info!(dir = %dir.display(), "removed the staging directory of an interrupted checkpoint");
            removed.push(dir);
        } else {
            tracing::warn!(dir = %dir.display(), "a checkpoint staging directory holds what dapt did not write there: left as it is");
            left.push(dir);
        }
    }
    (removed, left)
}

/// How long a checkpoint's staging directory must have been untouched to count as left by an
/// interrupted write ([`remove_stale_staging`]).
pub const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether neither `dir` nor anything directly in it was modified in the last `age`.
fn untouched_for(dir: &Path, age: std::time::Duration) -> bool {
    let recent = |meta: std::fs::Metadata| {
        meta.modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|elapsed| elapsed < age)
    };
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return false;
    };
    if recent(meta) {
        return false;
    }
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .all(|e| e.metadata().is_ok_and(|m| !recent(m)))
    })
}

/// Whether `name` is a file a checkpoint (or its staging) holds: the weights, config,
/// tokenizer, optimizer state (whole or a rank's shard), trainer state, manifest, the carried
/// base files, or a temporary of an atomic write.
fn is_checkpoint_file(name: &str) -> bool {
    is_export_file(name)
        || CARRIED_FILES.contains(&name)
        || [MANIFEST_FILE, TRAINER_FILE, "optimizer.safetensors"].contains(&name)
        || (name.starts_with("optimizer-") && name.ends_with(".safetensors"))
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name != MANIFEST_FILE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint interrupted by a kill left its staging directory (a whole checkpoint) for
    /// good (an audit): removed, with the ZeRO shards' staging; one holding a user's file, and
    /// a symlink, stay.
    #[test]
    fn interrupted_checkpoints_staging_is_removed_and_nothing_else() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let write = |rel: &str| {
            let path = r.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, b"x").expect("write");
        };
        write(".tmp-step-a1b2c3/model.safetensors");
        write(".tmp-step-a1b2c3/trainer.json");
        write(".tmp-step-a1b2c3/.tmpQwErTy");
        write(".zero-shards-g2-step-00000005/optimizer-00001-of-00002.safetensors");
        write(".tmp-step-zzzzzz/model.safetensors");
        write(".tmp-step-zzzzzz/notes.txt");
        write("elsewhere/model.safetensors");
        std::os::unix::fs::symlink(r.join("elsewhere"), r.join(".tmp-step-link")).expect("link");
        // A staging directory written to a moment ago may be a live rank's: left alone.
        write(".tmp-step-fresh1/model.safetensors");
        let (removed, left) = remove_stale_staging(r);
        assert!(
            removed.is_empty() && left.is_empty(),
            "{removed:?} {left:?}"
        );
        // Untouched for longer than STALE_STAGING: an interrupted write's.
        let old = std::time::SystemTime::now() - STALE_STAGING * 2;
        for dir in [
            ".tmp-step-a1b2c3",
            ".zero-shards-g2-step-00000005",
            ".tmp-step-zzzzzz",
        ] {
            for entry in std::fs::read_dir(r.join(dir)).expect("ls") {
                let file = std::fs::File::options()
                    .write(true)
                    .open(entry.expect("entry").path())
                    .expect("open");
                file.set_modified(old).expect("age");
            }
            std::fs::File::open(r.join(dir))
                .and_then(|d| d.set_modified(old))
                .expect("age the directory");
        }
        let (removed, left) = remove_stale_staging(r);
        let names = |dirs: &[PathBuf]| {
            let mut names: Vec<String> = dirs
                .iter()
                .map(|d| d.file_name().expect("name").to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&removed),
            [".tmp-step-a1b2c3", ".zero-shards-g2-step-00000005"]
        );
        assert_eq!(names(&left), [".tmp-step-zzzzzz"]);
        assert!(r.join(".tmp-step-fresh1/model.safetensors").is_file());
        assert!(r.join(".tmp-step-zzzzzz/notes.txt").is_file());
        assert!(r.join(".tmp-step-zzzzzz/model.safetensors").is_file());
        assert!(r.join("elsewhere/model.safetensors").is_file());
    }

    fn write_checkpoint(dir: &Path, step: u64) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("a.bin"), b"abc").expect("write");
        let manifest = CheckpointManifest {
            format_version: FORMAT_VERSION,
            step,
            files: vec![CheckpointFile {
                path: "a.bin".into(),
                bytes: 3,
                sha256: dapt_corpus::tokenizer::sha256_file(&dir.join("a.bin")).expect("sha"),
            }],
        };
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
    }

    #[test]
    fn only_directories_with_our_manifest_are_checkpoints_and_removed() {
        let root = tempfile::tempdir().expect("tmp");
        write_checkpoint(&root.path().join("step-00000005"), 5);
        // A user's folders: no manifest, a name that does not parse, a manifest of another step.
        std::fs::create_dir_all(root.path().join("step-1")).expect("mkdir");
        std::fs::write(root.path().join("step-1/results.csv"), b"1").expect("write");
        write_checkpoint(&root.path().join("step-2-notes"), 2);
        write_checkpoint(&root.path().join("step-7"), 3);
        let found: Vec<u64> = list(root.path()).iter().map(|c| c.0).collect();
        assert_eq!(found, vec![5]);

        let ck = root.path().join("step-00000005");
        let manifest = identify(&ck).expect("ours");
        manifest.verify(&ck).expect("verifies");
        std::fs::write(ck.join("a.bin"), b"abd").expect("flip");
        let err = manifest.verify(&ck).expect_err("corrupt").to_string();
        assert!(err.contains("a.bin") && err.contains("corrupt"), "{err}");

        std::fs::write(ck.join("notes.txt"), b"mine").expect("write");
        let err = remove(&ck, &manifest)
            .expect_err("foreign file")
            .to_string();
        assert!(err.contains("notes.txt"), "{err}");
        assert!(ck.join("a.bin").is_file(), "nothing deleted");
        std::fs::remove_file(ck.join("notes.txt")).expect("rm");
        remove(&ck, &manifest).expect("remove");
        assert!(!ck.exists());
        assert!(root.path().join("step-1/results.csv").is_file());
    }
}
