//! `dapt prepare` over the real binary on inputs that real corpora and tokenizers hold: a byte
//! order mark, a declared legacy encoding, a special token spelled in text, a tokenizer whose
//! template adds a BOS, and the error messages for a few broken inputs. Each is a case users
//! reported (`shared/cases/`), rebuilt here byte for byte.

use std::path::{Path, PathBuf};

use dapt_corpus::manifest::TOKENIZER_FILE;
use dapt_corpus::CorpusReader;
use dapt_tests::{dapt, repo_root, text};

/// Writes `job.yaml` (one domain source over `in/`, `corpus_extra` under `corpus:`) and the
/// input files into a fresh directory.
fn case(corpus_extra: &str, files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("in")).expect("mkdir");
    for (name, bytes) in files {
        std::fs::write(dir.path().join("in").join(name), bytes).expect("write input");
    }
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "job: case\ncorpus:\n  output: out\n{corpus_extra}  sources:\n    - name: dom\n      role: domain\n      paths: [\"in\"]\n      weight: 1\n"
        ),
    )
    .expect("write job");
    (dir, job)
}

/// Runs `dapt prepare` and returns its stdout, failing with both streams if it fails.
fn prepare_ok(job: &Path) -> String {
    let out = dapt(&["prepare", job.to_str().expect("utf-8 path")]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    stdout
}

/// `(ids, text)` of every stored document, split after each EOS.
fn documents(out: &Path) -> Vec<(Vec<u32>, String)> {
    let reader = CorpusReader::open(out).expect("open corpus");
    let tokenizer = tokenizers::Tokenizer::from_file(out.join(TOKENIZER_FILE)).expect("tokenizer");
    let eos = reader.manifest().tokenizer.eos_id;
    let mut docs = Vec::new();
    for source in 0..reader.manifest().sources.len() {
        for stream in [reader.train(source), reader.held_out(source)] {
            let mut ids = vec![0u32; stream.len() as usize];
            stream.read(0, &mut ids).expect("ids in range");
            for doc in ids.split_inclusive(|&t| t == eos) {
                docs.push((doc.to_vec(), tokenizer.decode(doc, true).expect("decode")));
            }
        }
    }
    docs
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("out/report.json")).expect("report"))
        .expect("report json")
}

/// shared/cases/jsonl-utf8-bom
#[test]
fn a_utf8_byte_order_mark_is_not_text() {
    let (dir, job) = case(
        "  vocab_size: 300\n",
        &[
            (
                "a.jsonl",
                b"\xEF\xBB\xBF{\"text\": \"first record after a byte order mark\"}\n{\"text\": \"second record\"}\n{\"text\": \"third record\"}\n",
            ),
            (
                "b.md",
                b"\xEF\xBB\xBF# Notes\n\nA markdown file saved with a byte order mark.",
            ),
        ],
    );
    let stdout = prepare_ok(&job);
    assert!(!stdout.contains("JSONL lines"), "{stdout}");
    let mut texts: Vec<String> = documents(&dir.path().join("out"))
        .into_iter()
        .map(|d| d.1)
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            "# Notes\n\nA markdown file saved with a byte order mark.",
            "first record after a byte order mark",
            "second record",
            "third record"
        ]
    );
}

/// shared/cases/html-declared-charset
#[test]
fn html_is_decoded_in_the_charset_it_declares() {
    let (dir, job) = case(
        "  vocab_size: 300\n",
        &[(
            "latin1.html",
            b"<!DOCTYPE html><html><head><meta charset=\"iso-8859-1\"><title>t</title></head><body><p>Die Gr\xF6\xDFe der Tabelle: \xDCbersicht f\xFCr Anf\xE4nger.</p></body></html>",
        )],
    );
    let stdout = prepare_ok(&job);
    assert!(!stdout.contains("lossily"), "{stdout}");
    let texts: Vec<String> = documents(&dir.path().join("out"))
        .into_iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(texts, ["Die Größe der Tabelle: Übersicht für Anfänger."]);
    assert_eq!(
        report(dir.path())["sources"][0]["encodings"]["windows-1252"],
        1
    );
}

/// shared/cases/special-token-literal
#[test]
fn a_special_token_spelled_in_text_is_text() {
    let (dir, job) = case(
        "  vocab_size: 300\n",
        &[(
            "a.jsonl",
            b"{\"text\": \"A tutorial: GPT-2 marks document ends with the string <|endoftext|> between texts.\"}\n{\"text\": \"A second, ordinary document.\"}\n",
        )],
    );
    let stdout = prepare_ok(&job);
    assert!(
        stdout.contains("1 documents spell a special token") && stdout.contains("a.jsonl:1"),
        "{stdout}"
    );
    let out = dir.path().join("out");
    let eos = CorpusReader::open(&out)
        .expect("open")
        .manifest()
        .tokenizer
        .eos_id;
    let docs = documents(&out);
    assert_eq!(docs.len(), 2, "{docs:?}");
    for (ids, _) in &docs {
        assert_eq!(
            ids.iter().filter(|&&t| t == eos).count(),
            1,
            "EOS only at the end: {ids:?}"
        );
    }
    let texts: Vec<&str> = docs.iter().map(|d| d.1.as_str()).collect();
    assert!(
        texts.contains(
            &"A tutorial: GPT-2 marks document ends with the string <|endoftext|> between texts."
        ),
        "{texts:?}"
    );
    assert_eq!(
        report(dir.path())["sources"][0]["special_text_documents"],
        1
    );
}

/// shared/cases/bos-post-processor
#[test]
fn the_tokenizers_bos_template_starts_every_document() {
    let tokenizer = repo_root().join("tests/fixtures/llama3-style-tokenizer.json");
    let files: &[(&str, &[u8])] = &[(
        "a.jsonl",
        b"{\"text\": \"the cat sat\"}\n{\"text\": \"then the end\"}\n",
    )];
    let (dir, job) = case(&format!("  tokenizer: {}\n", tokenizer.display()), files);
    let stdout = prepare_ok(&job);
    assert!(
        stdout.contains("<|begin_of_text|> first (the tokenizer's template adds it)")
            && stdout.contains("special tokens added: <|begin_of_text|> <|end_of_text|>"),
        "{stdout}"
    );
    let out = dir.path().join("out");
    let docs = documents(&out);
    assert_eq!(docs.len(), 2);
    for (ids, _) in &docs {
        assert_eq!((ids[0], ids[ids.len() - 1]), (263, 264), "{ids:?}");
        assert!(!ids[1..ids.len() - 1].contains(&263), "{ids:?}");
    }
    let manifest = CorpusReader::open(&out).expect("open").manifest().clone();
    assert_eq!(manifest.tokenizer.bos_id, Some(263));
    assert_eq!(
        report(dir.path())["tokenizer"]["added_tokens"],
        serde_json::json!(["<|begin_of_text|>", "<|end_of_text|>"])
    );

    // The job can say no; the report says so.
    let (dir, job) = case(
        &format!("  tokenizer: {}\n  add_bos: false\n", tokenizer.display()),
        files,
    );
    let stdout = prepare_ok(&job);
    assert!(
        stdout.contains("no BOS (corpus.add_bos: false)"),
        "{stdout}"
    );
    let docs = documents(&dir.path().join("out"));
    assert!(docs.iter().all(|(ids, _)| ids[0] != 263), "{docs:?}");
}

/// Errors say their cause once, and name the user's files and the duplicate key's own line.
#[test]
fn errors_name_the_users_file_and_say_their_cause_once() {
    let tokenizer = repo_root().join("tests/fixtures/llama3-style-tokenizer.json");
    let (dir, job) = case(
        &format!(
            "  tokenizer: {}\n  eos_token: \"<nope>\"\n",
            tokenizer.display()
        ),
        &[("a.txt", b"text")],
    );
    let run = |job: &Path| {
        let out = dapt(&["prepare", job.to_str().expect("utf-8")]);
        assert!(!out.status.success());
        text(&out.stderr)
    };
    let stderr = run(&job);
    assert!(
        stderr.contains(&tokenizer.display().to_string()) && stderr.contains("<nope>"),
        "{stderr}"
    );
    assert!(!stderr.contains(".dapt-prepare-"), "{stderr}");

    let (_dir, job) = case(
        "  vocab_size: 300\n",
        &[("b.txt.gz", b"\x1f\x8b\x08\x00garbage")],
    );
    let stderr = run(&job);
    assert!(
        stderr.contains("b.txt.gz: not a valid gzip stream"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("deflate").count(), 1, "{stderr}");

    let missing = dir.path().join("missing.yaml");
    let stderr = run(&missing);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );

    // A repeated key is named at the repeat (line 10), not at its mapping (line 6).
    let (_dir, job) = case("  vocab_size: 300\n", &[("a.txt", b"text")]);
    let yaml = std::fs::read_to_string(&job).expect("job") + "      weight: 2\n";
    std::fs::write(&job, yaml).expect("write job");
    let stderr = run(&job);
    assert!(
        stderr.contains("duplicate key `weight`") && stderr.contains("line 10"),
        "{stderr}"
    );
}
