//! The names a run gives what it keeps inside the output directory, and the removal, file by
//! file, of what interrupted runs left there: only entries named as dapt names them, and inside
//! those only files named as dapt names its corpus files. Anything else is left where it is and
//! named.

use std::path::{Path, PathBuf};

use crate::manifest::{self, Manifest};

use super::lock::LOCK_FILE;

/// The staging directory a run writes its corpus into: this prefix and [`RANDOM`] letters and
/// digits (tempfile's), inside the output directory.
pub(crate) const STAGING_PREFIX: &str = ".dapt-prepare-";
/// Where the corpus being replaced is moved while it is deleted.
pub(crate) const REPLACED_PREFIX: &str = ".dapt-replaced-";
pub(crate) const RANDOM: usize = 6;

/// A top-level entry of the output directory that belongs to runs, not to the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunEntry {
    Lock,
    /// The readers' lock ([`crate::readers`]): kept, never removed.
    Readers,
    Staging,
    Replaced,
    /// `lost+found` at the root of a file system mounted there: the file system's, left alone.
    LostFound,
}

impl RunEntry {
    pub(crate) fn of(name: &str, is_dir: bool) -> Option<Self> {
        let random = |prefix: &str| {
            name.strip_prefix(prefix).is_some_and(|rest| {
                rest.len() == RANDOM && rest.bytes().all(|b| b.is_ascii_alphanumeric())
            })
        };
        match (name, is_dir) {
            (LOCK_FILE, false) => Some(RunEntry::Lock),
            (crate::readers::READERS_FILE, false) => Some(RunEntry::Readers),
            ("lost+found", true) => Some(RunEntry::LostFound),
            (_, true) if random(STAGING_PREFIX) => Some(RunEntry::Staging),
            (_, true) if random(REPLACED_PREFIX) => Some(RunEntry::Replaced),
            _ => None,
        }
    }
}

/// A file at the top of a corpus directory that dapt writes whatever the manifest says.
pub(crate) fn is_corpus_file(name: &str) -> bool {
    matches!(
        name,
        manifest::MANIFEST_FILE
            | manifest::REPORT_FILE
            | manifest::TOKENIZER_FILE
            | manifest::VERIFIED_FILE
            | crate::readers::READERS_FILE
    ) || manifest::is_atomic_temp(name)
}

/// A shard file as [`crate::shards::StreamWriter`] names it: `train-00000.tok`,
/// `heldout-00012.doc`.
fn is_shard_file(name: &str) -> bool {
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    let number = stem
        .strip_prefix("train-")
        .or_else(|| stem.strip_prefix("heldout-"));
    matches!(ext, "tok" | "doc")
        && number.is_some_and(|n| n.len() >= 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What [`remove_dapt_dir`] did: the directory is gone, or these entries (relative) kept it.
#[derive(Debug, Default)]
pub(crate) struct Removal {
    pub kept: Vec<String>,
}

/// Deletes a directory that holds a dapt corpus, whole or in part (a staging directory, a
/// replaced corpus), file by file: what `manifest` lists, then the files dapt names at the top
/// (manifest, report, tokenizer, verification cache, temporary files of an atomic write) and the
/// shard files in source directories, then the emptied directories. Never a recursive delete:
/// anything else stays, and so does every directory above it; they are returned.
pub(crate) fn remove_dapt_dir(dir: &Path, manifest: Option<&Manifest>) -> std::io::Result<Removal> {
    if let Some(manifest) = manifest {
        for (rel, _, _) in manifest.files() {
            remove_if_present(&dir.join(rel))?;
        }
    }
    let mut removal = Removal::default();
    let mut manifest_file = None;
    for (name, kind) in sorted_entries(dir)? {
        let path = dir.join(&name);
        if kind.is_file() && name == manifest::MANIFEST_FILE {
            manifest_file = Some(path);
        } else if kind.is_file() && is_corpus_file(&name) {
            remove_if_present(&path)?;
        } else if kind.is_dir() && crate::spec::SourceName::try_from(name.clone()).is_ok() {
            let mut kept_here = false;
            for (inner, inner_kind) in sorted_entries(&path)? {
                if inner_kind.is_file() && is_shard_file(&inner) {
                    remove_if_present(&path.join(&inner))?;
                } else {
                    removal.kept.push(format!("{name}/{inner}"));
                    kept_here = true;
                }
            }
            if !kept_here {
                std::fs::remove_dir(&path)?;
            }
        } else {
            removal.kept.push(name);
        }
    }
    // Last, so that a directory half removed still says what it held.
    if let Some(path) = manifest_file {
        remove_if_present(&path)?;
    }
    if removal.kept.is_empty() {
        std::fs::remove_dir(dir)?;
    }
    Ok(removal)
}

fn sorted_entries(dir: &Path) -> std::io::Result<Vec<(String, std::fs::FileType)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        out.push((name, entry.file_type()?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub(crate) fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What releases before this one left beside the output (they staged and set aside there):
/// `.OUT.old-<pid>` directories that hold a dapt corpus of dapt's files only are removed while
/// the output holds a corpus (else such a one may be the only copy, and is named); the
/// others, and `.dapt-prepare-XXXXXX` staging directories (which cannot be told apart from those
/// of an older dapt preparing another output in the same directory right now), are named.
pub(crate) fn beside(out: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    let Some(name) = out.file_name().and_then(|n| n.to_str()) else {
        return (removed, kept);
    };
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return (removed, kept);
    };
    let aside = format!(".{name}.old-");
    // An older release killed between its two renames left its only corpus aside: it is kept
    // while the output holds none.
    let out_has_corpus = matches!(super::check_output(out), Ok(super::Existing::Corpus(_)));
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let pid = entry_name.strip_prefix(&aside);
        if pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            let manifest = match super::check_output(&path) {
                Ok(super::Existing::Corpus(_)) if !out_has_corpus => {
                    kept.push((
                        path,
                        format!(
                            "a corpus an older dapt set aside, and {} holds none: rename it to \
                             {name} to keep it, or remove it",
                            out.display()
                        ),
                    ));
                    continue;
                }
                Ok(super::Existing::Corpus(manifest)) => manifest,
                Ok(_) => {
                    kept.push((path, "holds no dapt corpus".to_owned()));
                    continue;
                }
                Err(e) => {
                    kept.push((path, e.to_string()));
                    continue;
                }
            };
            match remove_dapt_dir(&path, Some(&manifest)) {
                Ok(r) if r.kept.is_empty() => removed.push(path),
                Ok(r) => kept.push((path, format!("holds {}", r.kept.join(", ")))),
                Err(e) => kept.push((path, e.to_string())),
            }
        } else if RunEntry::of(&entry_name, true) == Some(RunEntry::Staging) {
            kept.push((
                path,
                "an older dapt's staging directory: remove it once no older dapt prepare runs \
                 in this directory"
                    .to_owned(),
            ));
        }
    }
    (removed, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_recognized_exactly() {
        assert_eq!(
            RunEntry::of(".dapt-prepare-Ab12Cd", true),
            Some(RunEntry::Staging)
        );
        assert_eq!(
            RunEntry::of(".dapt-replaced-000000", true),
            Some(RunEntry::Replaced)
        );
        assert_eq!(RunEntry::of(".dapt-lock", false), Some(RunEntry::Lock));
        for (name, is_dir) in [
            (".dapt-prepare-Ab12Cd", false),
            (".dapt-prepare-Ab12C", true),
            (".dapt-prepare-Ab12Cde", true),
            (".dapt-prepare-Ab-2Cd", true),
            (".dapt-lock", true),
            ("lost+found", false),
        ] {
            assert_eq!(RunEntry::of(name, is_dir), None, "{name}");
        }
        assert!(is_corpus_file(".tmpAbC123") && is_corpus_file("report.json"));
        assert!(!is_corpus_file(".tmp-notes.txt") && !is_corpus_file(".tmpAbC1234"));
        assert!(is_shard_file("train-00000.tok") && is_shard_file("heldout-123456.doc"));
        assert!(!is_shard_file("train-0000.tok") && !is_shard_file("notes-00000.tok"));
        assert!(!is_shard_file("train-00000.txt"));
    }

    #[test]
    fn a_dapt_dir_is_removed_file_by_file_and_anything_else_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let staging = dir.path().join(".dapt-prepare-Ab12Cd");
        std::fs::create_dir_all(staging.join("sql")).expect("mkdir");
        for f in [
            "tokenizer.json",
            "report.json",
            ".tmpXy12Zw",
            "sql/train-00000.tok",
        ] {
            std::fs::write(staging.join(f), "x").expect("write");
        }
        let removal = remove_dapt_dir(&staging, None).expect("remove");
        assert!(removal.kept.is_empty() && !staging.exists(), "{removal:?}");

        std::fs::create_dir_all(staging.join("sql")).expect("mkdir");
        std::fs::create_dir_all(staging.join("Photos")).expect("mkdir");
        for f in [
            "tokenizer.json",
            "sql/train-00000.tok",
            "sql/notes.txt",
            "mine.txt",
        ] {
            std::fs::write(staging.join(f), "x").expect("write");
        }
        let removal = remove_dapt_dir(&staging, None).expect("remove");
        assert_eq!(removal.kept, vec!["Photos", "mine.txt", "sql/notes.txt"]);
        assert!(staging.join("mine.txt").is_file() && staging.join("sql/notes.txt").is_file());
        assert!(!staging.join("tokenizer.json").exists());
        assert!(!staging.join("sql/train-00000.tok").exists());
    }
}
