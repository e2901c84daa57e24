//! The output directory of `dapt prepare`: how a run claims it, and how a finished corpus
//! replaces the one there.
//!
//! The directory `OUT` itself is never renamed or replaced. It may be a mount point (a volume,
//! which `rename` cannot move), a directory its owner made with a group, a mode or an ACL of
//! their choosing, or a symlink to a directory (on another disk), which is worked through and
//! stays a link; readers find it by its path. Everything a run needs lives inside it, under
//! names no corpus file has:
//!
//! * `.dapt-lock`: an advisory `flock`, held for the whole run ([`lock`]), so that a second
//!   `dapt prepare` on the same output is refused at once instead of racing the first;
//! * `.dapt-prepare-XXXXXX`: the staging directory the new corpus is written into;
//! * `.dapt-replaced-XXXXXX`: the corpus being replaced, moved aside while it is deleted.
//!
//! Publishing moves the corpus there aside entry by entry, its `manifest.json` first, then the
//! new corpus in, its `manifest.json` last: a reader finds a whole corpus or no manifest, never a
//! manifest whose files are not all there. Each step is a rename inside one directory, so on one
//! file system, and the steps can be replayed from what is on disk: a run killed while
//! publishing is finished by the next one, which also removes, file by file, what interrupted
//! runs left ([`leftovers`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::error::{CorpusError, Result};
use crate::manifest::{self, Manifest};

mod leftovers;
mod lock;
#[cfg(test)]
mod tests;

use leftovers::{RunEntry, RANDOM, REPLACED_PREFIX, STAGING_PREFIX};
use lock::OutputLock;

/// What is at the output now, and whether `dapt prepare` may replace it.
#[derive(Debug)]
pub(super) enum Existing {
    /// Nothing.
    Absent,
    /// A directory without a corpus: empty, or holding only what runs leave there. It is used
    /// as it is (an empty directory the user made keeps its owner, group, mode and ACL).
    Empty,
    /// A dapt corpus holding only files dapt wrote: the manifest's, its source directories and
    /// what a corpus directory gets besides (report, tokenizer, verification cache, temporary
    /// files of an atomic write).
    Corpus(Box<Manifest>),
    /// A publication that a run began and did not finish: its finished corpus waits in
    /// `staged`; the output holds part of it and part of the corpus it replaces, nothing else.
    Interrupted { staged: PathBuf },
}

/// The output directory, checked, locked and cleared of what interrupted runs left; dropping it
/// releases the lock.
#[derive(Debug)]
pub(super) struct Claim {
    out: PathBuf,
    lock: Option<OutputLock>,
    /// This run made the directory: a run that publishes nothing removes it again.
    created: bool,
}

impl Claim {
    /// Claims `out` for a run, before any work. Refuses, without writing anything there, an
    /// output that is not a dapt corpus; refuses one that another run holds.
    pub(super) fn new(out: &Path) -> Result<Self> {
        let created = matches!(check_output(out)?, Existing::Absent);
        if created {
            std::fs::create_dir_all(out).map_err(CorpusError::io(out))?;
        }
        let mut claim = Claim {
            out: out.to_path_buf(),
            lock: None,
            created,
        };
        claim.lock = OutputLock::acquire(out)?;
        if claim.lock.is_some() {
            recover(out)?.log(out);
        }
        Ok(claim)
    }

    /// A new staging directory inside the output, removed when dropped unless published.
    pub(super) fn staging(&self) -> Result<TempDir> {
        tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .rand_bytes(RANDOM)
            .tempdir_in(&self.out)
            .map_err(CorpusError::io(&self.out))
    }

    /// Replaces the corpus at the output (checked again: a file the user put there meanwhile is
    /// refused, and nothing is moved) with the finished one in `staging`.
    pub(super) fn publish(&self, staging: TempDir) -> Result<()> {
        publish_with(&self.out, staging, &mut |from, to| {
            std::fs::rename(from, to)
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.lock.take();
        if self.created {
            // Only when empty: the run failed before publishing anything.
            let _ = std::fs::remove_dir(&self.out);
        }
    }
}

/// Copies a file into the corpus as a new file (umask permissions), not with the mode of the
/// original (`std::fs::copy` keeps a private 0600 tokenizer private, out of workers' reach).
/// Copies `from` to `to`, an error naming the file it concerns: a full output disk was blamed on
/// the user's tokenizer file it was copied from (a new user's walk-through).
pub(super) fn copy_file(from: &Path, to: &Path) -> crate::error::Result<()> {
    use std::io::{Read, Write};
    let mut source = std::fs::File::open(from).map_err(CorpusError::io(from))?;
    let mut copy = std::fs::File::create(to).map_err(CorpusError::io(to))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CorpusError::io(from)(e)),
        };
        copy.write_all(&buf[..n]).map_err(CorpusError::io(to))?;
    }
    copy.flush().map_err(CorpusError::io(to))
}

/// The names a corpus's manifest (or several: a publication interrupted between two) vouches
/// for.
#[derive(Debug, Default)]
struct Layout {
    top_files: HashSet<String>,
    source_dirs: HashSet<String>,
    listed: HashSet<String>,
}

impl Layout {
    fn add(&mut self, manifest: &Manifest) {
        self.listed
            .extend(manifest.files().map(|(p, _, _)| p.to_owned()));
        self.source_dirs
            .extend(manifest.sources.iter().map(|s| s.name.clone()));
        self.top_files.extend(
            [
                manifest::MANIFEST_FILE,
                manifest::REPORT_FILE,
                manifest::VERIFIED_FILE,
                &manifest.tokenizer.file,
            ]
            .map(str::to_owned),
        );
    }

    fn allows_top(&self, name: &str, is_dir: bool) -> bool {
        if is_dir {
            self.source_dirs.contains(name)
        } else {
            self.top_files.contains(name)
                || self.listed.contains(name)
                || manifest::is_atomic_temp(name)
        }
    }
}

/// The top-level entries of `out` that are not runs' (lock, staging, replaced corpora,
/// `lost+found`), sorted, with whether each is a directory.
fn corpus_entries(out: &Path) -> std::io::Result<Vec<(String, bool)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(out)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type()?.is_dir();
        if RunEntry::of(&name, is_dir).is_none() {
            entries.push((name, is_dir));
        }
    }
    entries.sort();
    Ok(entries)
}

/// The run entries of `out` of one kind.
fn run_entries(out: &Path, kind: RunEntry) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(out)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if RunEntry::of(&name, entry.file_type()?.is_dir()) == Some(kind) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Refuses an `out` that is not a dapt corpus: a file, a directory without a readable manifest
/// (and no interrupted publication), or a corpus directory that holds something dapt did not
/// write (named).
pub(super) fn check_output(out: &Path) -> Result<Existing> {
    let refuse = |why: String| {
        CorpusError::Invalid(format!(
            "corpus.output {} {why}; dapt prepare replaces only a corpus it wrote: choose a new or empty directory for corpus.output",
            out.display()
        ))
    };
    let meta = match std::fs::symlink_metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(CorpusError::io(out)(e)),
    };
    if meta.file_type().is_symlink() {
        check_link(out)?;
    } else if !meta.is_dir() {
        return Err(refuse("exists and is not a directory".into()));
    }
    let entries = corpus_entries(out).map_err(CorpusError::io(out))?;
    let mut layout = Layout::default();
    let existing = if entries
        .iter()
        .any(|(name, _)| name == manifest::MANIFEST_FILE)
    {
        let manifest = Manifest::read(out)
            .map_err(|e| refuse(format!("exists and is not a dapt corpus ({e})")))?;
        layout.add(&manifest);
        Existing::Corpus(Box::new(manifest))
    } else {
        // No manifest: a publication stopped between its first and last rename, if a finished
        // staging directory waits (its manifest is the last file a run writes).
        let staged: Vec<(PathBuf, Manifest)> = run_entries(out, RunEntry::Staging)
            .map_err(CorpusError::io(out))?
            .into_iter()
            .filter_map(|dir| Manifest::read(&dir).ok().map(|m| (dir, m)))
            .collect();
        match <[_; 1]>::try_from(staged) {
            Ok([(staged, new)]) => {
                layout.add(&new);
                for replaced in
                    run_entries(out, RunEntry::Replaced).map_err(CorpusError::io(out))?
                {
                    if let Ok(old) = Manifest::read(&replaced) {
                        layout.add(&old);
                    }
                }
                Existing::Interrupted { staged }
            }
            Err(_) if entries.is_empty() => return Ok(Existing::Empty),
            Err(_) => {
                let why = Manifest::read(out)
                    .err()
                    .map_or_else(|| "no manifest".to_owned(), |e| e.to_string());
                return Err(refuse(format!("exists and is not a dapt corpus ({why})")));
            }
        }
    };
    for (name, is_dir) in &entries {
        if !layout.allows_top(name, *is_dir) {
            return Err(refuse(format!(
                "holds `{name}`, which is not part of the dapt corpus there"
            )));
        }
        if !is_dir {
            continue;
        }
        for entry in walkdir::WalkDir::new(out.join(name))
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| CorpusError::Io {
                path: e.path().unwrap_or(out).to_path_buf(),
                error: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("file system loop")),
            })?;
            let rel = entry
                .path()
                .strip_prefix(out)
                .unwrap_or(entry.path())
                .to_string_lossy()
                .into_owned();
            if !(entry.file_type().is_file() && layout.listed.contains(&rel)) {
                return Err(refuse(format!(
                    "holds `{rel}`, which is not part of the dapt corpus there"
                )));
            }
        }
    }
    Ok(existing)
}

/// Accepts an output that is a symlink to a directory (a corpus kept on another disk): a run
/// works inside the directory it points to, through the link, and never renames, replaces or
/// removes the link itself (see the module's overview). Refuses one to anything else, or to
/// nothing: dapt does not make a directory at the far end of a link.
fn check_link(out: &Path) -> Result<()> {
    let target = std::fs::read_link(out).map_err(CorpusError::io(out))?;
    let refuse = |why: &str| {
        Err(CorpusError::Invalid(format!(
            "corpus.output {} is a symlink to {}, which {why}",
            out.display(),
            target.display()
        )))
    };
    match std::fs::metadata(out) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => refuse(
            "is not a directory: a corpus is written into a directory; give corpus.output a directory or a symlink to one",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => refuse(
            "does not exist (a dangling symlink): make that directory (dapt does not create one at the far end of a link), or give corpus.output another path",
        ),
        Err(e) => Err(CorpusError::io(out)(e)),
    }
}

/// What [`recover`] did, for the log.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// The staging directory of an interrupted publication, now published.
    pub finished: Option<PathBuf>,
    /// Leftovers of interrupted runs, removed.
    pub removed: Vec<PathBuf>,
    /// Leftovers not removed, and why (something in them dapt did not write).
    pub kept: Vec<(PathBuf, String)>,
}

impl Recovered {
    fn log(&self, out: &Path) {
        if let Some(staged) = &self.finished {
            tracing::info!(
                output = %out.display(),
                staged = %staged.display(),
                "finished publishing the corpus an interrupted run left"
            );
        }
        if !self.removed.is_empty() {
            let removed: Vec<String> = self
                .removed
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            tracing::info!(
                output = %out.display(),
                removed = %removed.join(", "),
                "removed what interrupted runs left"
            );
        }
        for (dir, why) in &self.kept {
            tracing::warn!(
                output = %out.display(),
                dir = %dir.display(),
                reason = %why,
                "leftover of an earlier run left in place"
            );
        }
    }
}

/// Under the lock, before the run's own work: finishes a publication an interrupted run began,
/// and removes the staging directories and replaced corpora interrupted runs left, inside the
/// output and (older releases) beside it.
pub(super) fn recover(out: &Path) -> Result<Recovered> {
    let mut recovered = Recovered::default();
    if let Existing::Interrupted { staged } = check_output(out)? {
        finish_publish(out, &staged, &mut |from, to| std::fs::rename(from, to))
            .map_err(|e| e.into_error(out, &staged))?;
        recovered.finished = Some(staged);
    }
    for kind in [RunEntry::Staging, RunEntry::Replaced] {
        for dir in run_entries(out, kind).map_err(CorpusError::io(out))? {
            match leftovers::remove_dapt_dir(&dir, None) {
                Ok(r) if r.kept.is_empty() => recovered.removed.push(dir),
                Ok(r) => recovered
                    .kept
                    .push((dir, format!("holds {}", r.kept.join(", ")))),
                Err(e) => recovered.kept.push((dir, e.to_string())),
            }
        }
    }
    let (removed, kept) = leftovers::beside(out);
    recovered.removed.extend(removed);
    recovered.kept.extend(kept);
    Ok(recovered)
}

/// [`Claim::publish`] with the rename a test can make fail. A failure before the corpus there
/// was touched removes the staging directory (dropped); a later one keeps it whole for the next
/// run to finish publishing.
fn publish_with(
    out: &Path,
    staging: TempDir,
    rename: &mut dyn FnMut(&Path, &Path) -> std::io::Result<()>,
) -> Result<()> {
    if let Existing::Absent = check_output(out)? {
        return Err(CorpusError::io(out)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "removed during the run",
        )));
    }
    match finish_publish(out, staging.path(), rename) {
        Ok(()) => Ok(()),
        Err(e) if !e.started => Err(CorpusError::io(e.path)(e.error)),
        Err(e) => {
            let staged = staging.keep();
            Err(e.into_error(out, &staged))
        }
    }
}

/// A publication that failed: at `path`, and whether the output had been touched.
#[derive(Debug)]
struct PublishError {
    started: bool,
    path: PathBuf,
    error: std::io::Error,
}

impl PublishError {
    fn into_error(self, out: &Path, staged: &Path) -> CorpusError {
        if self.started {
            CorpusError::PublishInterrupted {
                output: out.to_path_buf(),
                staged: staged.to_path_buf(),
                path: self.path,
                error: self.error,
            }
        } else {
            CorpusError::Io {
                path: self.path,
                error: self.error,
            }
        }
    }
}

/// Moves the finished corpus in `staged` into `out`, the corpus there aside first, then deletes
/// that. Replayable: run again on what an interruption left, it carries on where it stopped. An
/// entry at `out` is the new corpus's when the new manifest names it and `staged` no longer has
/// it (it only leaves `staged` by this move); every other one is the old corpus's.
fn finish_publish(
    out: &Path,
    staged: &Path,
    rename: &mut dyn FnMut(&Path, &Path) -> std::io::Result<()>,
) -> std::result::Result<(), PublishError> {
    let mut started = false;
    let fail = |started: bool, path: &Path| {
        let path = path.to_path_buf();
        move |error| PublishError {
            started,
            path,
            error,
        }
    };
    let new = Manifest::read(staged).map_err(|e| PublishError {
        started,
        path: staged.join(manifest::MANIFEST_FILE),
        error: std::io::Error::other(e.to_string()),
    })?;
    let mut new_names: HashSet<String> = new.sources.iter().map(|s| s.name.clone()).collect();
    new_names.extend(
        [
            manifest::MANIFEST_FILE,
            manifest::REPORT_FILE,
            &new.tokenizer.file,
        ]
        .map(str::to_owned),
    );

    // 1. The corpus there aside, its manifest first: from then on `out` holds no corpus to read.
    let mut old: Vec<String> = corpus_entries(out)
        .map_err(fail(started, out))?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !new_names.contains(name) || staged.join(name).exists())
        .collect();
    old.sort_by_key(|name| name != manifest::MANIFEST_FILE);
    let aside = if old.is_empty() {
        None
    } else {
        let dir = tempfile::Builder::new()
            .prefix(REPLACED_PREFIX)
            .rand_bytes(RANDOM)
            .tempdir_in(out)
            .map_err(fail(started, out))?
            .keep();
        for name in &old {
            if let Err(e) = rename(&out.join(name), &dir.join(name)) {
                if !started {
                    let _ = std::fs::remove_dir(&dir);
                }
                return Err(fail(started, &out.join(name))(e));
            }
            started = true;
        }
        Some(dir)
    };

    // 2. The new corpus in, its manifest last: a reader sees it once it is all there.
    let mut moving: Vec<String> = corpus_entries(staged)
        .map_err(fail(started, staged))?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| new_names.contains(name))
        .collect();
    moving.sort_by_key(|name| name == manifest::MANIFEST_FILE);
    for name in &moving {
        rename(&staged.join(name), &out.join(name)).map_err(fail(started, &out.join(name)))?;
        started = true;
    }

    // 3. What is left: the emptied staging directory, the replaced corpus (clutter now; the
    // next run removes what is left of either).
    if let Err(e) = std::fs::remove_dir(staged) {
        tracing::warn!(dir = %staged.display(), error = %e, "could not remove the staging directory");
    }
    if let Some(aside) = aside {
        let old_manifest = Manifest::read(&aside).ok();
        match leftovers::remove_dapt_dir(&aside, old_manifest.as_ref()) {
            Ok(r) if r.kept.is_empty() => {}
            Ok(r) => tracing::warn!(
                dir = %aside.display(),
                kept = %r.kept.join(", "),
                "the replaced corpus holds files dapt did not write: left in place"
            ),
            Err(e) => tracing::warn!(
                dir = %aside.display(),
                error = %e,
                "could not remove the replaced corpus"
            ),
        }
    }
    Ok(())
}
