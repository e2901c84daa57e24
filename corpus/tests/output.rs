//! The output directory of `prepare`, over real files, renames and `flock`: one run at a time,
//! rebuilds that keep working whatever earlier runs left, the user's directory and files kept,
//! and files other users can read.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use dapt_corpus::manifest::{MANIFEST_FILE, REPORT_FILE, TOKENIZER_FILE, VERIFIED_FILE};
use dapt_corpus::{prepare, CorpusError, CorpusReader, CorpusSpec, PrepareOptions, PrepareOutcome};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("src")).expect("mkdir");
        for i in 0..20 {
            std::fs::write(
                dir.path().join(format!("src/doc{i}.txt")),
                format!("Document {i} about PostgreSQL indexes, vacuum and the write-ahead log number {}.", i * 7),
            )
            .expect("write");
        }
        Fixture { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spec(&self, output: &str, extra: &str) -> CorpusSpec {
        let yaml = format!(
            "output: {output}\nvocab_size: 300\nshard_tokens: 1024\n{extra}sources:\n  - name: dom\n    role: domain\n    paths: [src]\n    weight: 1\n"
        );
        let mut spec: CorpusSpec = serde_yaml::from_str(&yaml).expect("spec");
        spec.resolve_paths(self.dir.path());
        spec
    }

    /// An input changes, so that the next run rebuilds.
    fn change_input(&self, i: usize) {
        std::fs::write(
            self.path("src/doc0.txt"),
            format!("Document 0, edited {i} times, about autovacuum."),
        )
        .expect("write");
    }
}

fn run(spec: &CorpusSpec) -> Result<PrepareOutcome, CorpusError> {
    prepare(spec, None, &PrepareOptions::default())
}

fn prepared(spec: &CorpusSpec) {
    match run(spec).expect("prepare") {
        PrepareOutcome::Prepared { .. } => {}
        PrepareOutcome::UpToDate { .. } => panic!("expected a fresh prepare"),
    }
}

/// Hidden entries but the verification cache: what runs keep inside the output or (releases
/// before) beside it.
fn hidden(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with('.') && n != VERIFIED_FILE && n != dapt_corpus::readers::READERS_FILE
        })
        .collect();
    names.sort();
    names
}

/// Another `dapt prepare` holding the output: a real `flock` on another open file.
fn hold_lock(out: &Path) -> std::fs::File {
    let path = out.join(".dapt-lock");
    std::fs::write(&path, "pid 4242").expect("write");
    let file = std::fs::File::open(&path).expect("open");
    // SAFETY: the descriptor is `file`'s, open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "flock");
    file
}

#[test]
fn a_second_prepare_on_the_same_output_is_refused_while_another_holds_it() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    let manifest = std::fs::read(fx.path("out").join(MANIFEST_FILE)).expect("manifest");
    fx.change_input(1);
    let held = hold_lock(&fx.path("out"));
    let err = run(&spec).expect_err("refused");
    let msg = err.to_string();
    assert!(
        matches!(err, CorpusError::OutputLocked { .. })
            && msg.contains(&fx.path("out").display().to_string())
            && msg.contains("another dapt prepare (pid 4242)"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(fx.path("out").join(MANIFEST_FILE)).expect("manifest"),
        manifest,
        "the corpus is untouched"
    );
    drop(held);
    prepared(&spec);
    assert!(
        hidden(&fx.path("out")).is_empty(),
        "{:?}",
        hidden(&fx.path("out"))
    );
}

/// A corpus that a job reads is not prepared again under it: the ranks kept training on the
/// shards they had mapped while every later checkpoint took the new corpus's tokenizer (an
/// audit: an export with a tokenizer of other ids than its model's, exit 0). Refused while a
/// reader holds it, naming the output, with the corpus untouched; an up to date corpus is still
/// only checked; once the reader is gone the corpus is prepared again.
#[test]
fn a_corpus_being_read_is_not_prepared_again_under_its_reader() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    let manifest = std::fs::read(fx.path("out").join(MANIFEST_FILE)).expect("manifest");
    let reader = CorpusReader::open(&fx.path("out")).expect("open");
    assert!(matches!(run(&spec), Ok(PrepareOutcome::UpToDate { .. })));
    fx.change_input(1);
    let err = run(&spec).expect_err("refused");
    let msg = err.to_string();
    assert!(
        matches!(err, CorpusError::OutputInUse { .. })
            && msg.contains(&fx.path("out").display().to_string())
            && msg.contains("in use"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(fx.path("out").join(MANIFEST_FILE)).expect("manifest"),
        manifest,
        "the corpus is untouched"
    );
    assert!(
        hidden(&fx.path("out")).is_empty(),
        "{:?}",
        hidden(&fx.path("out"))
    );
    drop(reader);
    prepared(&spec);
    assert_ne!(
        std::fs::read(fx.path("out").join(MANIFEST_FILE)).expect("manifest"),
        manifest
    );
}

/// What a checkpoint copies as the corpus's tokenizer is the file as the reader opened it
/// (checked against the manifest), not as it is when the checkpoint is written; a tokenizer
/// that is not the manifest's is refused at open.
#[test]
fn a_reader_keeps_the_tokenizer_it_opened_and_refuses_another() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    let path = fx.path("out").join(TOKENIZER_FILE);
    let original = std::fs::read(&path).expect("tokenizer");
    let reader = CorpusReader::open(&fx.path("out")).expect("open");
    std::fs::write(&path, b"{\"model\": {}}").expect("overwrite");
    assert_eq!(reader.tokenizer_bytes(), Some(original.as_slice()));
    let err = match CorpusReader::open(&fx.path("out")) {
        Ok(_) => panic!("another tokenizer was accepted"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(TOKENIZER_FILE), "{err}");
}

/// A temporary file of an interrupted atomic write in the corpus goes with it, and rebuilds go
/// on working: the replaced corpus was left in `.OUT.old-<pid>`, and with the same pid (a
/// container's, or this test's) the next rebuild failed "Directory not empty", every time.
#[test]
fn a_stale_temporary_file_goes_with_the_corpus_and_every_rebuild_works() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    std::fs::write(fx.path("out/.tmpAbC123"), "{\"partial").expect("write");
    for i in 0..3 {
        fx.change_input(i);
        prepared(&spec);
        assert!(
            hidden(&fx.path("out")).is_empty(),
            "{:?}",
            hidden(&fx.path("out"))
        );
        assert!(
            hidden(fx.dir.path()).is_empty(),
            "{:?}",
            hidden(fx.dir.path())
        );
    }
    CorpusReader::open_with(&fx.path("out"), true).expect("sound");
}

/// Only `write_atomic`'s exact temporary names are dapt's: a user's `.tmp-notes.txt` refuses
/// the run, named, and stays where it is (it was moved into a hidden `.out.old-<pid>`).
#[test]
fn a_users_tmp_named_file_in_the_corpus_is_refused_not_moved() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    std::fs::write(fx.path("out/.tmp-notes.txt"), "my notes").expect("write");
    let forced = PrepareOptions {
        force: true,
        ..PrepareOptions::default()
    };
    let err = prepare(&spec, None, &forced)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("`.tmp-notes.txt`"), "{err}");
    assert_eq!(
        std::fs::read_to_string(fx.path("out/.tmp-notes.txt")).expect("kept"),
        "my notes"
    );
    assert_eq!(hidden(fx.dir.path()), Vec::<String>::new());
}

/// An empty directory the user made (a volume's mount point, a directory shared with the
/// workers' group) is published into, never replaced: the same directory, with its mode, keeps
/// the corpus through rebuilds. A rename of the output itself is what failed on a mount point
/// ("Device or resource busy") and lost the directory's group, mode and ACL elsewhere.
#[test]
fn an_empty_output_directory_is_published_into_and_kept_through_rebuilds() {
    let fx = Fixture::new();
    let out = fx.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o2750)).expect("chmod");
    let before = std::fs::metadata(&out).expect("meta");
    let spec = fx.spec("out", "");
    prepared(&spec);
    for i in 0..2 {
        let now = std::fs::metadata(&out).expect("meta");
        assert_eq!(
            (now.ino(), now.mode()),
            (before.ino(), before.mode()),
            "rebuild {i}"
        );
        fx.change_input(i);
        prepared(&spec);
    }
    CorpusReader::open_with(&out, true).expect("sound");
    assert!(hidden(&out).is_empty(), "{:?}", hidden(&out));
}

/// What dapt writes in a corpus has the mode of any new file (the umask's), not the 0600 of a
/// private temporary file or of the tokenizer it copied: workers may run as another user.
#[test]
fn corpus_files_get_the_mode_of_any_new_file() {
    let fx = Fixture::new();
    let reference = fx.path("reference");
    std::fs::File::create(&reference).expect("create");
    let mode = |path: &Path| std::fs::metadata(path).expect("meta").mode() & 0o777;
    let expected = mode(&reference);
    prepared(&fx.spec("out", ""));
    let private_tokenizer = fx.path("tokenizer.json");
    std::fs::copy(fx.path("out").join(TOKENIZER_FILE), &private_tokenizer).expect("copy");
    std::fs::set_permissions(&private_tokenizer, std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    prepared(&fx.spec(
        "given",
        "tokenizer: tokenizer.json
",
    ));
    for out in ["out", "given"] {
        for file in [
            MANIFEST_FILE,
            REPORT_FILE,
            TOKENIZER_FILE,
            "dom/train-00000.tok",
        ] {
            let path = fx.path(out).join(file);
            assert_eq!(mode(&path), expected, "{}", path.display());
        }
    }
}

/// An output name of 250 bytes (NAME_MAX is 255) rebuilds: the replaced corpus was renamed to
/// `.<name>.old-<pid>`, too long a name, and every rebuild failed "File name too long".
#[test]
fn a_long_output_name_rebuilds() {
    let fx = Fixture::new();
    let name = "c".repeat(250);
    let spec = fx.spec(&name, "");
    prepared(&spec);
    for i in 0..2 {
        fx.change_input(i);
        prepared(&spec);
    }
    CorpusReader::open_with(&fx.path(&name), true).expect("sound");
    assert!(
        hidden(fx.dir.path()).is_empty(),
        "{:?}",
        hidden(fx.dir.path())
    );
}

/// A run interrupted while tokenizing (SIGINT, SIGTERM, SIGKILL: no destructor runs) leaves its
/// staging directory; the next run, even one with nothing to do, removes it.
#[test]
fn the_staging_directory_of_an_interrupted_run_is_removed_by_the_next_one() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    let staging = fx.path("out/.dapt-prepare-Ab12Cd");
    std::fs::create_dir_all(staging.join("dom")).expect("mkdir");
    std::fs::copy(
        fx.path("out").join(TOKENIZER_FILE),
        staging.join(TOKENIZER_FILE),
    )
    .expect("cp");
    std::fs::write(staging.join("dom/train-00000.tok"), [7u8; 100]).expect("write");
    assert!(matches!(
        run(&spec).expect("prepare"),
        PrepareOutcome::UpToDate { .. }
    ));
    assert!(
        hidden(&fx.path("out")).is_empty(),
        "{:?}",
        hidden(&fx.path("out"))
    );
}

/// What releases before this one left beside the output: a replaced corpus `.OUT.old-<pid>`
/// (a run killed between its two renames, or one whose deletion failed) is removed when it holds
/// only dapt's files; one holding a user's file is kept, as is an older staging directory (it
/// may belong to an older dapt preparing another output there now).
#[test]
fn an_older_releases_leftovers_beside_the_output_are_cleared_when_provably_dapts() {
    let fx = Fixture::new();
    let spec = fx.spec("out", "");
    prepared(&spec);
    let copy = |to: &str| {
        for entry in walkdir::WalkDir::new(fx.path("out")) {
            let entry = entry.expect("walk");
            let target = fx
                .path(to)
                .join(entry.path().strip_prefix(fx.path("out")).expect("under"));
            if entry.file_type().is_dir() {
                std::fs::create_dir_all(&target).expect("mkdir");
            } else {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    };
    copy(".out.old-1");
    std::fs::write(fx.path(".out.old-1/.tmpAbC123"), "{").expect("write");
    copy(".out.old-2");
    std::fs::write(fx.path(".out.old-2/.tmp-notes.txt"), "mine").expect("write");
    copy(".dapt-prepare-Xy12Zw");
    copy(".other.old-3");
    assert!(matches!(
        run(&spec).expect("prepare"),
        PrepareOutcome::UpToDate { .. }
    ));
    assert_eq!(
        hidden(fx.dir.path()),
        vec![".dapt-prepare-Xy12Zw", ".other.old-3", ".out.old-2"]
    );
    assert!(fx.path(".out.old-2/.tmp-notes.txt").is_file());

    // An older release killed between its renames: no corpus at the output, the only copy
    // aside. It is kept (and named) while the output holds none.
    std::fs::remove_dir_all(fx.path(".out.old-2")).expect("rm");
    copy(".out.old-4");
    std::fs::remove_dir_all(fx.path("out")).expect("rm");
    assert!(matches!(
        run(&spec).expect("prepare"),
        PrepareOutcome::Prepared { .. }
    ));
    assert!(
        fx.path(".out.old-4/manifest.json").is_file(),
        "the only copy was kept"
    );
    // With a corpus at the output again, the next run removes it.
    run(&spec).expect("prepare");
    assert!(!fx.path(".out.old-4").exists());
}

/// A run that fails before publishing leaves the output as it found it: no directory where
/// there was none, nothing added to one there.
#[test]
fn a_failed_run_leaves_no_output_directory_and_no_staging() {
    let fx = Fixture::new();
    std::fs::write(fx.path("src/broken.txt.gz"), b"\x1f\x8b\x08\x00garbage").expect("write");
    let spec = fx.spec("deep/out", "");
    run(&spec).expect_err("broken gzip");
    assert!(!fx.path("deep/out").exists());
    std::fs::remove_file(fx.path("src/broken.txt.gz")).expect("rm");
    prepared(&spec);
    std::fs::write(fx.path("src/broken.txt.gz"), b"\x1f\x8b\x08\x00garbage").expect("write");
    run(&spec).expect_err("broken gzip");
    assert!(
        hidden(&fx.path("deep/out")).is_empty(),
        "{:?}",
        hidden(&fx.path("deep/out"))
    );
    CorpusReader::open_with(&fx.path("deep/out"), true).expect("the previous corpus");
}
