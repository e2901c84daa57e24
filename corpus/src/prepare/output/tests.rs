//! Publication stopped at every step, on real corpora and real renames: a rename made to fail
//! leaves the disk exactly as a kill before it would (no destructor runs past the failure that
//! matters: the staging directory is kept once the output was touched).

use std::path::{Path, PathBuf};

use super::*;
use crate::{prepare, CorpusReader, CorpusSpec, PrepareOptions};

/// Two corpora of different layouts, prepared once: `v1` (sources `sql`, `general`) and `v2`
/// (`sql`, `web`), so that an old source directory must go and a new one come.
struct Corpora {
    dir: tempfile::TempDir,
}

impl Corpora {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (sub, text) in [
            (
                "sql",
                "An index lets the planner find rows without a sequential scan",
            ),
            (
                "general",
                "Fellow citizens, the state of the union is strong",
            ),
            (
                "web",
                "A web page about caching, proxies and the HTTP headers they read",
            ),
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
            for i in 0..12 {
                std::fs::write(
                    dir.path().join(format!("{sub}/doc{i}.txt")),
                    format!("{text}, number {i}. {text} again, {i}."),
                )
                .expect("write");
            }
        }
        for (output, second) in [("v1", "general"), ("v2", "web")] {
            let spec = spec(dir.path(), output, second);
            prepare(&spec, None, &PrepareOptions::default()).expect("prepare");
        }
        Corpora { dir }
    }

    /// `out` holding v1 with what readers and interrupted writes add, and a finished v2 staged
    /// inside it, as a run is just before it publishes.
    fn about_to_publish(&self, name: &str) -> (PathBuf, PathBuf) {
        let out = self.dir.path().join(name);
        copy_tree(&self.dir.path().join("v1"), &out);
        std::fs::write(out.join(".tmpAbC123"), "{\"partial").expect("write");
        let staged = out.join(".dapt-prepare-Test01");
        copy_tree(&self.dir.path().join("v2"), &staged);
        (out, staged)
    }

    fn manifest(&self, version: &str) -> Manifest {
        Manifest::read(&self.dir.path().join(version)).expect("manifest")
    }
}

fn spec(base: &Path, output: &str, second: &str) -> CorpusSpec {
    let yaml = format!(
        "output: {output}\nvocab_size: 300\nshard_tokens: 1024\nsources:\n  - name: sql\n    role: domain\n    paths: [sql]\n    weight: 1\n  - name: {second}\n    role: replay\n    paths: [{second}]\n    weight: 1\n"
    );
    let mut spec: CorpusSpec = serde_yaml::from_str(&yaml).expect("spec");
    spec.resolve_paths(base);
    spec
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.expect("walk");
        let target = to.join(entry.path().strip_prefix(from).expect("under"));
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
        } else if entry.file_name() == crate::readers::READERS_FILE {
            // A reader's lock of the fixture, not part of the corpus a run stages.
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A rename that works `n` times, then fails as a kill would stop it.
fn failing_after(n: usize) -> impl FnMut(&Path, &Path) -> std::io::Result<()> {
    let mut left = n;
    move |from, to| {
        if left == 0 {
            return Err(std::io::Error::other("killed here"));
        }
        left -= 1;
        std::fs::rename(from, to)
    }
}

/// Every entry of `out` that a run keeps there (lock, staging, replaced corpus).
fn run_leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The readers' lock stays with the corpus (any reader of it makes it).
        .filter(|n| n.starts_with(".dapt-") && n != crate::readers::READERS_FILE)
        .collect()
}

#[test]
fn a_publication_stopped_after_any_rename_is_finished_by_the_next_run() {
    let corpora = Corpora::new();
    let (v1, v2) = (corpora.manifest("v1"), corpora.manifest("v2"));
    let mut finished = false;
    for renames in 0..40 {
        let (out, staged) = corpora.about_to_publish(&format!("out{renames}"));
        match finish_publish(&out, &staged, &mut failing_after(renames)) {
            Ok(()) => finished = true,
            Err(e) => {
                assert_eq!(e.started, renames > 0, "after {renames} renames");
                let existing = check_output(&out).expect("not refused");
                if renames == 0 {
                    assert!(matches!(existing, Existing::Corpus(_)), "{existing:?}");
                } else {
                    assert!(
                        matches!(&existing, Existing::Interrupted { staged: s } if *s == staged),
                        "after {renames} renames: {existing:?}"
                    );
                }
                drop(Claim::new(&out).expect("the next run claims it"));
            }
        }
        let expected = if renames == 0 { &v1 } else { &v2 };
        let found = Manifest::read(&out).expect("a corpus at the output");
        assert_eq!(
            found.content_digest(),
            expected.content_digest(),
            "after {renames} renames"
        );
        CorpusReader::open_with(&out, true).expect("every file there and sound");
        let left = run_leftovers(&out);
        assert!(left.is_empty(), "after {renames} renames: {left:?}");
        if renames > 0 {
            assert!(!out.join(".tmpAbC123").exists() && !out.join("general").exists());
        }
        if finished {
            // v1's 6 entries aside (manifest first), then v2's 5 in (manifest last).
            assert!(renames >= 11, "{renames}");
            return;
        }
    }
    panic!("never finished");
}

/// A staging directory for `publish_with`, as [`Claim::staging`] makes it, holding `staged`.
fn staging_with(out: &Path, staged: &Path) -> TempDir {
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .rand_bytes(RANDOM)
        .tempdir_in(out)
        .expect("tempdir");
    std::fs::remove_dir(staging.path()).expect("rmdir");
    std::fs::rename(staged, staging.path()).expect("mv");
    staging
}

#[test]
fn a_publish_that_fails_before_touching_the_output_removes_its_staging() {
    let corpora = Corpora::new();
    let (out, staged) = corpora.about_to_publish("out");
    let staging = staging_with(&out, &staged);
    let err = publish_with(&out, staging, &mut failing_after(0)).expect_err("fails");
    assert!(matches!(err, CorpusError::Io { .. }), "{err}");
    assert!(run_leftovers(&out).is_empty(), "{:?}", run_leftovers(&out));
    let found = Manifest::read(&out).expect("the old corpus");
    assert_eq!(
        found.content_digest(),
        corpora.manifest("v1").content_digest()
    );
}

#[test]
fn a_publish_that_fails_part_way_keeps_its_staging_and_says_the_next_run_finishes_it() {
    let corpora = Corpora::new();
    let (out, staged) = corpora.about_to_publish("out");
    let staging = staging_with(&out, &staged);
    let kept = staging.path().to_path_buf();
    let err = publish_with(&out, staging, &mut failing_after(9)).expect_err("fails");
    let msg = err.to_string();
    assert!(
        matches!(err, CorpusError::PublishInterrupted { .. })
            && msg.contains(&kept.display().to_string())
            && msg.contains("the next dapt prepare on this output finishes publishing it"),
        "{msg}"
    );
    assert!(kept.join(manifest::MANIFEST_FILE).is_file(), "kept whole");
    let recovered = recover(&out).expect("recover");
    assert_eq!(recovered.finished.as_deref(), Some(kept.as_path()));
    assert_eq!(
        Manifest::read(&out).expect("published").content_digest(),
        corpora.manifest("v2").content_digest()
    );
    assert!(run_leftovers(&out).is_empty(), "{:?}", run_leftovers(&out));
}

/// An interrupted publication is finished only over dapt's files: a file of the user's in the
/// output refuses it, naming the file, and nothing moves.
#[test]
fn an_interrupted_publication_beside_a_users_file_is_refused() {
    let corpora = Corpora::new();
    let (out, staged) = corpora.about_to_publish("out");
    finish_publish(&out, &staged, &mut failing_after(3)).expect_err("stopped");
    std::fs::write(out.join("notes.txt"), "mine").expect("write");
    let before = run_leftovers(&out);
    let err = Claim::new(&out).expect_err("refused").to_string();
    assert!(err.contains("`notes.txt`"), "{err}");
    assert_eq!(run_leftovers(&out), before);
    assert!(staged.join(manifest::MANIFEST_FILE).is_file());
}

#[test]
fn leftovers_of_interrupted_runs_are_removed_and_a_users_file_among_them_kept() {
    let corpora = Corpora::new();
    let (out, staged) = corpora.about_to_publish("out");
    // A run killed while tokenizing (no manifest yet), one killed before publishing (complete),
    // the replaced corpus of one killed while deleting it, and a staging-named directory that
    // holds a file of the user's.
    let partial = out.join(".dapt-prepare-Part01");
    std::fs::create_dir_all(partial.join("sql")).expect("mkdir");
    std::fs::write(partial.join("tokenizer.json"), "{}").expect("write");
    std::fs::write(partial.join("sql/train-00000.tok"), [0u8; 10]).expect("write");
    let replaced = out.join(".dapt-replaced-Old001");
    copy_tree(&corpora.dir.path().join("v2"), &replaced);
    let odd = out.join(".dapt-prepare-Mine01");
    std::fs::create_dir_all(&odd).expect("mkdir");
    std::fs::write(odd.join("thesis.txt"), "mine").expect("write");

    let recovered = recover(&out).expect("recover");
    let mut removed = recovered.removed.clone();
    removed.sort();
    assert_eq!(removed, vec![partial, staged, replaced]);
    assert_eq!(recovered.kept.len(), 1, "{:?}", recovered.kept);
    assert!(
        recovered.kept[0].0 == odd && recovered.kept[0].1.contains("thesis.txt"),
        "{:?}",
        recovered.kept
    );
    assert!(odd.join("thesis.txt").is_file());
    assert!(recovered.finished.is_none());
    assert_eq!(
        Manifest::read(&out).expect("untouched").content_digest(),
        corpora.manifest("v1").content_digest()
    );
}

/// corpus.output a symlink to a directory on another disk: the corpus is written into that
/// directory, rebuilt there, and the link stays a link (it was refused as "exists and is not a
/// directory"). A link to a file or to nothing is refused naming its target, which is left as
/// it was (nothing is created at the far end of a dangling link).
#[test]
fn a_symlink_to_a_directory_is_an_output_and_stays_a_link() {
    let corpora = Corpora::new();
    let base = corpora.dir.path();
    let store = base.join("store");
    std::fs::create_dir_all(store.join("corpus")).expect("mkdir");
    let link = base.join("linked");
    std::os::unix::fs::symlink(store.join("corpus"), &link).expect("symlink");
    let is_link = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
    for (second, gone) in [("general", "web"), ("web", "general")] {
        prepare(
            &spec(base, "linked", second),
            None,
            &PrepareOptions::default(),
        )
        .unwrap_or_else(|e| panic!("prepare through the link ({second}): {e}"));
        assert!(is_link(&link), "the link was replaced");
        assert!(store.join("corpus/manifest.json").is_file());
        assert!(store.join("corpus").join(second).is_dir());
        assert!(!store.join("corpus").join(gone).exists());
        CorpusReader::open(&link).expect("read through the link");
    }
    let names: Vec<String> = std::fs::read_dir(&store)
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["corpus"], "nothing written beside the target");

    std::fs::write(store.join("notes.txt"), "mine").expect("write");
    let cases = [
        ("to-file", store.join("notes.txt"), "is not a directory"),
        ("dangling", store.join("missing"), "does not exist"),
    ];
    for (name, target, why) in cases {
        let link = base.join(name);
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = prepare(
            &spec(base, name, "general"),
            None,
            &PrepareOptions::default(),
        )
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains(why) && err.contains(&*target.to_string_lossy()),
            "{name}: {err}"
        );
        assert!(is_link(&link), "{name}: the link was replaced");
    }
    assert_eq!(
        std::fs::read_to_string(store.join("notes.txt")).expect("read"),
        "mine"
    );
    assert!(
        !store.join("missing").exists(),
        "made at the far end of a link"
    );
}

/// A copy that fails to write names the file written, not the one read: a full output disk was
/// blamed on the user's tokenizer file (a new user's walk-through).
#[test]
fn a_failed_copy_names_the_file_it_failed_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let from = dir.path().join("tokenizer.json");
    std::fs::write(&from, vec![b'x'; 100_000]).expect("write");
    let err = copy_file(&from, Path::new("/dev/full"))
        .expect_err("a full device")
        .to_string();
    assert!(
        err.contains("/dev/full") && !err.contains("tokenizer.json"),
        "{err}"
    );
    let err = copy_file(&dir.path().join("missing.json"), &dir.path().join("copy"))
        .expect_err("nothing to read")
        .to_string();
    assert!(err.contains("missing.json"), "{err}");
}
