//! `prepare` and the reader on small real-format inputs: what is kept, what is refused, and
//! that nothing half-written is ever published.

use std::io::Write;
use std::path::{Path, PathBuf};

use dapt_corpus::manifest::{MANIFEST_FILE, TOKENIZER_FILE};
use dapt_corpus::{prepare, CorpusError, CorpusReader, CorpusSpec, PrepareOptions, PrepareOutcome};

struct Fixture {
    dir: tempfile::TempDir,
}

const SQL_DOC: &str = "CREATE INDEX ON accounts (id); An index lets the planner find rows without a sequential scan of the whole table.";

impl Fixture {
    /// A domain source in every format and a replay source, with one duplicate, one empty
    /// document, invalid UTF-8 and two bad JSONL lines.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("domain/nested")).expect("mkdir");
        std::fs::create_dir_all(d.join("replay")).expect("mkdir");
        for i in 0..40 {
            std::fs::write(
                d.join(format!("domain/page{i:02}.txt")),
                format!("{SQL_DOC} Page {i}: VACUUM reclaims storage occupied by dead tuples {i}."),
            )
            .expect("write");
        }
        std::fs::write(
            d.join("domain/copy.md"),
            format!("{SQL_DOC} Page 3: VACUUM reclaims storage occupied by dead tuples 3."),
        )
        .expect("write");
        std::fs::write(d.join("domain/empty.rst"), "  \n\t\n").expect("write");
        std::fs::write(
            d.join("domain/nested/page.html"),
            "<html><head><style>x</style></head><body><div class=\"navheader\">Prev Next</div><p>Tuning <b>work_mem</b> helps sorts.</p></body></html>",
        )
        .expect("write");
        std::fs::write(
            d.join("domain/latin1.txt"),
            b"Caf\xe9 tables are not UTF-8.",
        )
        .expect("write");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"text\": \"EXPLAIN ANALYZE shows the plan.\"}\nnot json\n{\"body\": \"no text\"}\n{\"text\": \"Caf\\u0065\\u0301 is NFC-normalized.\"}\n")
            .expect("gz");
        std::fs::write(d.join("domain/records.jsonl.gz"), gz.finish().expect("gz")).expect("write");
        std::fs::write(d.join("domain/README"), "not a corpus file").expect("write");
        for i in 0..20 {
            std::fs::write(
                d.join(format!("replay/speech{i:02}.txt")),
                format!("Fellow citizens, the state of the union is strong in year {i}. The people and the nation prosper."),
            )
            .expect("write");
        }
        Fixture { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spec(&self, extra: &str) -> CorpusSpec {
        let yaml = format!(
            "output: out\nvocab_size: 400\nshard_tokens: 1024\n{extra}sources:\n  - name: sql\n    role: domain\n    paths: [domain]\n    weight: 3\n    held_out: 0.2\n  - name: general\n    role: replay\n    paths: [\"replay/*.txt\"]\n    weight: 1\n    held_out: 0.2\n"
        );
        let mut spec: CorpusSpec = serde_yaml::from_str(&yaml).expect("spec");
        spec.resolve_paths(self.dir.path());
        spec
    }
}

fn run(spec: &CorpusSpec) -> Result<PrepareOutcome, CorpusError> {
    prepare(spec, None, &PrepareOptions::default())
}

fn prepared(spec: &CorpusSpec) -> dapt_corpus::report::Report {
    match run(spec).expect("prepare") {
        PrepareOutcome::Prepared { report, .. } => *report,
        PrepareOutcome::UpToDate { .. } => panic!("expected a fresh prepare"),
    }
}

#[test]
fn prepares_every_format_and_counts_what_it_dropped() {
    let fx = Fixture::new();
    let spec = fx.spec("");
    let report = prepared(&spec);
    let sql = &report.sources[0];
    // 40 pages + copy (duplicate) + empty + html + latin1 + 2 JSONL records.
    assert_eq!(sql.files, 45);
    assert_eq!(sql.duplicates_removed, 1);
    assert_eq!(sql.empty_documents, 1);
    assert_eq!(sql.documents_train + sql.documents_held_out, 40 + 1 + 1 + 2);
    assert_eq!(sql.lossy_files, 1);
    assert_eq!(sql.bad_jsonl_lines, 2);
    // The first bad line says why, in serde_json's words (`not json`: `n` starts `null`).
    assert!(
        sql.bad_jsonl_examples[0]
            .ends_with("records.jsonl.gz:2 (expected ident at line 1 column 2)"),
        "{:?}",
        sql.bad_jsonl_examples
    );
    assert!(
        sql.bad_jsonl_examples[1].ends_with("records.jsonl.gz:3"),
        "{:?}",
        sql.bad_jsonl_examples
    );
    assert_eq!(sql.skipped_files, 1);
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("decoded lossily") && w.contains("latin1.txt")));
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("JSONL") && w.contains("records.jsonl.gz:2")));
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("fewer than 500000")));
    assert!(fx.path("out/report.json").is_file());

    // Every document is followed by EOS, and the text decodes back (NFC-normalized).
    let reader = CorpusReader::open(&fx.path("out")).expect("open");
    let m = reader.manifest();
    assert_eq!(m.sources[0].train.tokens, sql.tokens_train);
    let tokenizer =
        tokenizers::Tokenizer::from_file(fx.path("out").join(TOKENIZER_FILE)).expect("tokenizer");
    let mut all = Vec::new();
    for source in 0..2 {
        for stream in [reader.train(source), reader.held_out(source)] {
            let mut ids = vec![0u32; stream.len() as usize];
            stream.read(0, &mut ids).expect("read");
            all.extend(ids);
        }
    }
    let eos = m.tokenizer.eos_id;
    let docs: Vec<String> = all
        .split(|&t| t == eos)
        .filter(|d| !d.is_empty())
        .map(|d| tokenizer.decode(d, false).expect("decode"))
        .collect();
    assert_eq!(
        docs.len() as u64,
        m.sources
            .iter()
            .map(|s| s.train.documents + s.held_out.documents)
            .sum::<u64>()
    );
    assert!(
        docs.iter().any(|d| d == "Tuning work_mem helps sorts."),
        "html text"
    );
    assert!(
        docs.iter().any(|d| d == "Caf\u{e9} is NFC-normalized."),
        "nfc"
    );
    assert!(
        docs.iter()
            .any(|d| d == "Caf\u{fffd} tables are not UTF-8."),
        "lossy"
    );
    assert!(
        m.sources[0].train.shards.len() > 1,
        "small shard_tokens makes several shards"
    );
}

#[test]
fn second_run_does_nothing_until_an_input_changes() {
    let fx = Fixture::new();
    let spec = fx.spec("");
    prepared(&spec);
    assert!(matches!(
        run(&spec).expect("prepare"),
        PrepareOutcome::UpToDate { .. }
    ));
    std::fs::write(
        fx.path("replay/speech00.txt"),
        "A different speech about the union and its people.",
    )
    .expect("write");
    assert!(matches!(
        run(&spec).expect("prepare"),
        PrepareOutcome::Prepared { .. }
    ));
    // A damaged shard is rebuilt rather than trusted.
    let shard = fx.path("out/sql/train-00000.tok");
    let mut bytes = std::fs::read(&shard).expect("read");
    bytes[3] ^= 0x40;
    std::fs::write(&shard, bytes).expect("write");
    assert!(matches!(
        run(&spec).expect("prepare"),
        PrepareOutcome::Prepared { .. }
    ));
    CorpusReader::open_with(&fx.path("out"), true).expect("rebuilt corpus verifies");
}

/// A corpus manifest that names files outside its directory (handed over, or damaged) is
/// refused by field before anything is read or removed: `dapt prepare` deleted a replaced
/// corpus by its manifest's paths, `../victim.txt` and absolute ones included.
#[test]
fn a_manifest_naming_files_outside_the_corpus_is_refused_and_nothing_is_deleted() {
    let fx = Fixture::new();
    let spec = fx.spec("");
    prepared(&spec);
    let manifest_path = fx.path("out/manifest.json");
    let original = std::fs::read_to_string(&manifest_path).expect("manifest");
    let victim = fx.path("victim.txt");
    let absolute = fx.path("absolute-victim.txt");
    for (field, from, to) in [
        (
            "sources[0].train.shards[0].token_file.path",
            "\"sql/train-00000.tok\"",
            "\"../victim.txt\"".to_string(),
        ),
        (
            "sources[0].train.shards[0].document_file.path",
            "\"sql/train-00000.doc\"",
            format!("\"{}\"", absolute.display()),
        ),
        (
            "sources[1].train.shards[0].token_file.path",
            "\"general/train-00000.tok\"",
            "\"sql/train-00000.tok\"".to_string(),
        ),
        (
            "tokenizer.file",
            "\"tokenizer.json\"",
            "\"../victim.txt\"".to_string(),
        ),
        (
            "sources[0].name",
            "\"name\": \"sql\"",
            "\"name\": \"..\"".to_string(),
        ),
    ] {
        std::fs::write(&victim, "the user's").expect("write");
        std::fs::write(&absolute, "the user's").expect("write");
        assert!(original.contains(from), "{from} in the manifest");
        std::fs::write(&manifest_path, original.replacen(from, &to, 1)).expect("write");
        let err = CorpusReader::open(&fx.path("out"))
            .err()
            .expect("the reader refuses it")
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
        // A changed input makes prepare replace the corpus: it refuses instead.
        std::fs::write(
            fx.path("replay/speech00.txt"),
            format!("A new speech {field}."),
        )
        .expect("write");
        let err = run(&spec).expect_err("prepare refuses").to_string();
        assert!(err.contains(field), "{field}: {err}");
        assert!(
            victim.exists() && absolute.exists(),
            "{field}: a file outside was deleted"
        );
        assert!(manifest_path.exists(), "{field}: the corpus is still there");
    }
}

#[test]
fn flipped_byte_and_truncation_are_refused_by_name() {
    let fx = Fixture::new();
    prepared(&fx.spec(""));
    let out = fx.path("out");
    CorpusReader::open(&out).expect("fresh corpus opens");
    let shard = out.join("general/train-00000.tok");
    let original = std::fs::read(&shard).expect("read");

    let mut flipped = original.clone();
    flipped[10] ^= 1;
    std::fs::write(&shard, &flipped).expect("write");
    for full in [false, true] {
        let err = CorpusReader::open_with(&out, full)
            .err()
            .expect("corrupt shard refused");
        assert!(matches!(err, CorpusError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("general/train-00000.tok"), "{err}");
    }

    std::fs::write(&shard, &original[..original.len() - 2]).expect("write");
    let err = CorpusReader::open(&out).err().expect("short shard refused");
    assert!(matches!(err, CorpusError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("cut short"), "{err}");

    std::fs::write(&shard, &original).expect("write");
    CorpusReader::open(&out).expect("restored shard opens");
}

/// A `corpus.tokenizer` that does not exist is named as the job's field (it said only "No such
/// file or directory" after the path; a new user's walk-through).
#[test]
fn a_missing_tokenizer_names_the_field() {
    let fx = Fixture::new();
    let err = prepare(
        &fx.spec("tokenizer: nomodel\n"),
        None,
        &PrepareOptions::default(),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains("nomodel") && err.contains("corpus.tokenizer"),
        "{err}"
    );
}

#[test]
fn another_tokenizer_is_refused_and_a_given_one_is_used() {
    let fx = Fixture::new();
    prepared(&fx.spec(""));
    let reader = CorpusReader::open(&fx.path("out")).expect("open");
    let trained = fx.path("trained-tokenizer.json");
    std::fs::copy(fx.path("out").join(TOKENIZER_FILE), &trained).expect("copy");
    reader.check_tokenizer(&trained).expect("same tokenizer");

    // Retrain with another vocabulary: a different tokenizer.
    let other_spec = fx.spec("").clone();
    let mut other_spec = other_spec;
    other_spec.output = fx.path("other");
    other_spec.vocab_size = serde_yaml::from_str("350").expect("vocab");
    prepared(&other_spec);
    let err = reader
        .check_tokenizer(&fx.path("other").join(TOKENIZER_FILE))
        .expect_err("mismatch");
    assert!(matches!(err, CorpusError::ModelTokenizer { .. }), "{err}");
    // Preparing again would not help: the message says what would.
    assert!(
        err.to_string().contains("corpus.tokenizer:") && !err.to_string().contains("again"),
        "{err}"
    );

    // A given tokenizer is copied, not retrained: same tokens as the run that trained it.
    let mut given = fx.spec(&format!("tokenizer: {}\n", trained.display()));
    given.output = fx.path("given");
    prepared(&given);
    let a = CorpusReader::open(&fx.path("out")).expect("open");
    let b = CorpusReader::open(&fx.path("given")).expect("open");
    assert!(!b.manifest().tokenizer.trained);
    assert_eq!(a.manifest().sources, b.manifest().sources);

    // A given tokenizer with one stray huge id (a model of 1e9 embedding rows) is refused by
    // name before anything else.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trained).expect("read")).expect("json");
    let last = json["model"]["vocab"]
        .as_object()
        .and_then(|v| v.keys().next_back())
        .expect("a BPE vocabulary")
        .clone();
    // The largest u32 too: `largest + 1` wrapped to 0 there.
    for id in [1_000_000_000u64, u64::from(u32::MAX)] {
        json["model"]["vocab"][&last] = serde_json::json!(id);
        let huge = fx.path("huge-tokenizer.json");
        std::fs::write(&huge, json.to_string()).expect("write");
        let mut given = fx.spec(&format!("tokenizer: {}\n", huge.display()));
        given.output = fx.path("huge");
        let err = run(&given).expect_err("refused").to_string();
        assert!(
            err.contains("huge-tokenizer.json") && err.contains(&id.to_string()),
            "{err}"
        );
    }
}

#[test]
fn failures_publish_nothing_and_keep_the_previous_corpus() {
    let fx = Fixture::new();
    let spec = fx.spec("");
    // A corrupt gzip file fails the run before anything is published.
    std::fs::write(fx.path("domain/broken.txt.gz"), b"\x1f\x8b\x08\x00garbage").expect("write");
    let err = run(&spec).expect_err("broken gzip");
    assert!(err.to_string().contains("broken.txt.gz"), "{err}");
    assert!(!fx.path("out").exists());
    assert_no_staging(fx.dir.path());

    std::fs::remove_file(fx.path("domain/broken.txt.gz")).expect("rm");
    prepared(&spec);
    let before = std::fs::read(fx.path("out/manifest.json")).expect("manifest");
    std::fs::write(fx.path("domain/broken.txt.gz"), b"\x1f\x8b\x08\x00garbage").expect("write");
    run(&spec).expect_err("broken gzip");
    assert_eq!(
        std::fs::read(fx.path("out/manifest.json")).expect("manifest"),
        before
    );
    CorpusReader::open_with(&fx.path("out"), true).expect("old corpus intact");
    assert_no_staging(fx.dir.path());
}

#[test]
fn empty_and_missing_sources_are_named() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.path("blank")).expect("mkdir");
    std::fs::write(fx.path("blank/a.txt"), "   ").expect("write");
    let mut spec = fx.spec("");
    spec.sources.0[1].paths = vec![fx.path("blank").to_string_lossy().into_owned()];
    let err = run(&spec).expect_err("empty source");
    assert!(
        matches!(err, CorpusError::EmptySource { .. }) && err.to_string().contains("general"),
        "{err}"
    );

    spec.sources.0[1].paths = vec![fx.path("nothing/*.txt").to_string_lossy().into_owned()];
    let err = run(&spec).expect_err("no match");
    assert!(
        err.to_string().contains("general") && err.to_string().contains("matches no file"),
        "{err}"
    );

    spec.sources.0[1].paths = vec![fx.path("missing.txt").to_string_lossy().into_owned()];
    spec.sources.0[1].literal = vec![true];
    let err = run(&spec).expect_err("missing file");
    // Named with its source and place in `paths` (it named only the path).
    assert!(
        err.to_string().contains("missing.txt")
            && err.to_string().starts_with("source `general`: paths[0]"),
        "{err}"
    );
}

#[test]
fn held_out_split_is_stable_when_other_documents_change() {
    let fx = Fixture::new();
    let spec = fx.spec("");
    prepared(&spec);
    let held = held_out_texts(&fx.path("out"));
    for i in 40..60 {
        std::fs::write(
            fx.path(&format!("domain/page{i:02}.txt")),
            format!("Another page {i} about WAL and checkpoints {i}."),
        )
        .expect("write");
    }
    prepared(&spec);
    let after = held_out_texts(&fx.path("out"));
    assert!(
        held.iter().all(|d| after.contains(d)),
        "held-out documents moved"
    );
    assert!(after.len() > held.len());
}

#[test]
fn weight_zero_source_is_evaluated_on_the_same_documents_but_never_sampled() {
    let fx = Fixture::new();
    let mixed = fx.spec("");
    prepared(&mixed);
    let mut only_domain = fx.spec("");
    only_domain.output = fx.path("out-zero");
    only_domain.sources.0[1].weight = dapt_corpus::spec::Weight(0.0);
    let plan = dapt_corpus::TrainingPlan {
        seq_len: 8,
        global_batch: 4,
        steps: 50,
    };
    let report =
        match prepare(&only_domain, Some(plan), &PrepareOptions::default()).expect("prepare") {
            PrepareOutcome::Prepared { report, .. } => *report,
            PrepareOutcome::UpToDate { .. } => panic!("expected a fresh prepare"),
        };
    let row = &report.sources[1];
    assert_eq!((row.share, row.epochs), (0.0, Some(0.0)));
    assert!(row.tokens_held_out > 0);

    let a = CorpusReader::open(&fx.path("out")).expect("open");
    let b = CorpusReader::open(&fx.path("out-zero")).expect("open");
    for source in 0..2 {
        // The same held-out documents, as the same tokens: the evaluation sets match.
        let (x, y) = (a.held_out(source), b.held_out(source));
        let (mut xs, mut ys) = (vec![0u32; x.len() as usize], vec![0u32; y.len() as usize]);
        x.read(0, &mut xs).expect("read");
        y.read(0, &mut ys).expect("read");
        assert!(!xs.is_empty());
        assert_eq!(xs, ys, "held-out stream of source {source}");
    }
    let order = b.sample_order(5, 8).expect("order");
    assert!((0..10_000).all(|g| order.sample(g).source == 0));
    assert_eq!(order.mixture().counts(10_000), vec![10_000, 0]);
}

/// Held-out documents of the domain source, as text (the tokenizer is retrained between runs).
fn held_out_texts(out: &Path) -> Vec<String> {
    let reader = CorpusReader::open(out).expect("open");
    let tokenizer = tokenizers::Tokenizer::from_file(out.join(TOKENIZER_FILE)).expect("tokenizer");
    let eos = reader.manifest().tokenizer.eos_id;
    let stream = reader.held_out(0);
    let mut ids = vec![0u32; stream.len() as usize];
    stream.read(0, &mut ids).expect("read");
    ids.split(|&t| t == eos)
        .filter(|d| !d.is_empty())
        .map(|d| tokenizer.decode(d, false).expect("decode"))
        .collect()
}

/// No staging directory beside the output `dir/out` nor (where it is staged now) inside it.
fn assert_no_staging(dir: &Path) {
    let out = dir.join("out");
    let leftovers: Vec<_> = [dir, out.as_path()]
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(".dapt-") && name != dapt_corpus::readers::READERS_FILE
        })
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

/// A manifest whose numbers disagree with each other (damaged, or edited by hand) is refused
/// by field when opened, before anything sizes a model or a buffer from it: a vocabulary of
/// 2^32 ids (a 4 TB embedding), a shard's `tokens` near 2^64 (an overflow), ids outside the
/// vocabulary, a held-out fraction past 1, a weight that is no number.
#[test]
fn a_manifest_with_inconsistent_numbers_is_refused_by_field() {
    let fx = Fixture::new();
    prepared(&fx.spec(""));
    let out = fx.path("out");
    let path = out.join(MANIFEST_FILE);
    let original = std::fs::read_to_string(&path).expect("manifest");
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 10] = [
        ("tokenizer.vocab_size", |m| {
            m["tokenizer"]["vocab_size"] = 4_294_967_295u32.into()
        }),
        ("token_dtype", |m| m["token_dtype"] = "u32".into()),
        ("tokenizer.eos_id", |m| {
            m["tokenizer"]["eos_id"] = 65_000.into()
        }),
        ("tokenizer.bos_id", |m| m["tokenizer"]["bos_id"] = 3.into()),
        ("sources[0].held_out_fraction", |m| {
            m["sources"][0]["held_out_fraction"] = 5.into()
        }),
        ("sources[0].weight", |m| {
            m["sources"][0]["weight"] = (-1).into()
        }),
        ("sources[1].name", |m| {
            m["sources"][1] = m["sources"][0].clone()
        }),
        ("sources[0].train.shards[0].tokens", |m| {
            m["sources"][0]["train"]["shards"][0]["tokens"] = (1u64 << 63).into()
        }),
        ("sources[0].train: tokens", |m| {
            m["sources"][0]["train"]["tokens"] = 7.into()
        }),
        ("listed twice", |m| {
            m["sources"][0]["held_out"] = m["sources"][0]["train"].clone()
        }),
    ];
    for (field, edit) in cases {
        let mut manifest: serde_json::Value = serde_json::from_str(&original).expect("json");
        edit(&mut manifest);
        std::fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write");
        let err = CorpusReader::open(&out).err().expect("refused").to_string();
        assert!(
            err.contains(field) && err.contains(MANIFEST_FILE),
            "{field}: {err}"
        );
    }
    std::fs::write(&path, &original).expect("restore");
    CorpusReader::open(&out).expect("the original opens");
}

/// A tokenizer with an unknown token and no byte fallback turns characters outside its
/// vocabulary into it, and those ids are stored as training targets: each source counts them,
/// with the first documents holding them, in `report.json` and the printed report, and a
/// warning names a source past 0.1% of its tokens (an audit: nothing was said).
#[test]
fn unknown_tokens_are_counted_per_source_and_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut vocab = serde_json::Map::new();
    for word in ["<unk>", "</s>", "the", "quick", "fox"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..600).map(|i| i.to_string()))
    {
        let id = vocab.len();
        vocab.insert(word, id.into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(d.join("tokenizer.json"), tokenizer.to_string()).expect("write");
    std::fs::create_dir_all(d.join("greek")).expect("mkdir");
    std::fs::create_dir_all(d.join("english")).expect("mkdir");
    // 4 + 4 unknown of 3 + 8 + 8 tokens (each document's EOS included)
    std::fs::write(
        d.join("greek/docs.jsonl"),
        "{\"text\": \"the fox\"}\n{\"text\": \"Ζ = ∑ αβγ the quick fox\"}\n\
         {\"text\": \"Δ δ ε ζ the quick fox\"}\n",
    )
    .expect("write");
    // one document, 1 unknown of its 2,402 tokens: counted, under the warning's 0.1%
    let english: String = (0..600)
        .map(|i| format!("the quick fox {i}\n\n"))
        .collect::<String>()
        + "Ω";
    std::fs::write(d.join("english/book.txt"), english).expect("write");
    let yaml = "output: out\ntokenizer: tokenizer.json\nshard_tokens: 1024\nsources:\n  - name: \
                greek\n    role: domain\n    paths: [greek]\n    weight: 1\n  - name: english\n    \
                role: replay\n    paths: [english]\n    weight: 1\n";
    let mut spec: CorpusSpec = serde_yaml::from_str(yaml).expect("spec");
    spec.resolve_paths(d);
    let report = prepared(&spec);
    assert_eq!(report.tokenizer.unknown_token.as_deref(), Some("<unk>"));
    let (greek, english) = (&report.sources[0], &report.sources[1]);
    assert_eq!(greek.unknown_tokens, 8);
    let docs = d.join("greek/docs.jsonl").display().to_string();
    assert_eq!(
        greek.unknown_token_examples,
        [format!("{docs}:2 (4)"), format!("{docs}:3 (4)")]
    );
    assert_eq!(english.unknown_tokens, 1);
    let unknown_warnings: Vec<&String> = report
        .warnings
        .iter()
        .filter(|w| w.contains("unknown token"))
        .collect();
    assert_eq!(unknown_warnings.len(), 1, "{unknown_warnings:?}");
    assert!(
        unknown_warnings[0].contains("source `greek`: 8 of its 19 tokens (42.11%)")
            && unknown_warnings[0].contains(&format!("{docs}:2 (4)")),
        "{}",
        unknown_warnings[0]
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/report.json")).expect("report.json"),
    )
    .expect("json");
    assert_eq!(json["sources"][0]["unknown_tokens"], 8);
    assert_eq!(json["sources"][1]["unknown_tokens"], 1);
    let printed = dapt_corpus::report::render(&report);
    assert!(
        printed.contains("unknown token <unk>")
            && printed.contains("`greek` 8 of 19 (42.105%)")
            && printed.contains("`english` 1 of 2402 (0.042%)"),
        "{printed}"
    );
}

/// NFC turned CJK compatibility ideographs into their unified forms (an audit): a Korean
/// record with 樂 of one reading (U+F914) became the record with the unified 樂 (U+6A02), was
/// dropped as its duplicate, and the tokens never held the character the writer chose. Both
/// records are kept, and each decodes back to its own text; a true copy is still a duplicate.
#[test]
fn cjk_compatibility_ideographs_survive_normalization_and_deduplication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("records")).expect("mkdir");
    let record = |c: char| format!("진료 기록: 音{c} 치료 (환자 1047), 처방 유지.");
    let (compatibility, unified) = (record('\u{F914}'), record('\u{6A02}'));
    for (name, text) in [
        ("a.txt", &compatibility),
        ("b.txt", &unified),
        ("c.txt", &compatibility),
    ] {
        std::fs::write(d.join("records").join(name), text).expect("write");
    }
    let yaml = "output: out\nvocab_size: 300\nsources:\n  - name: records\n    role: domain\n    \
                paths: [records]\n    weight: 1\n";
    let mut spec: CorpusSpec = serde_yaml::from_str(yaml).expect("spec");
    spec.resolve_paths(d);
    let report = prepared(&spec);
    let source = &report.sources[0];
    assert_eq!(source.duplicates_removed, 1);
    assert_eq!(source.documents_train + source.documents_held_out, 2);
    let reader = CorpusReader::open(&d.join("out")).expect("open");
    let tokenizer =
        tokenizers::Tokenizer::from_file(d.join("out").join(TOKENIZER_FILE)).expect("tokenizer");
    let mut ids = Vec::new();
    for stream in [reader.train(0), reader.held_out(0)] {
        let mut part = vec![0u32; stream.len() as usize];
        stream.read(0, &mut part).expect("read");
        ids.extend(part);
    }
    let eos = reader.manifest().tokenizer.eos_id;
    let mut docs: Vec<String> = ids
        .split(|&t| t == eos)
        .filter(|d| !d.is_empty())
        .map(|d| tokenizer.decode(d, false).expect("decode"))
        .collect();
    docs.sort();
    let mut expected = vec![compatibility, unified];
    expected.sort();
    assert_eq!(docs, expected);
}
