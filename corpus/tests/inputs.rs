//! Inputs that real corpora hold, through `prepare` and back out of the shards: byte order
//! marks, declared and configured encodings, special tokens spelled in text, the tokenizer's
//! BOS template, line endings.

use std::io::Write;
use std::path::{Path, PathBuf};

use dapt_corpus::manifest::TOKENIZER_FILE;
use dapt_corpus::report::Report;
use dapt_corpus::{prepare, CorpusReader, CorpusSpec, PrepareOptions, PrepareOutcome};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// `(ids, text)` of every stored document, training then held-out, split after each EOS.
fn stored(out: &Path) -> Vec<(Vec<u32>, String)> {
    let reader = CorpusReader::open(out).expect("open corpus");
    let tokenizer = Tokenizer::from_file(out.join(TOKENIZER_FILE)).expect("tokenizer");
    let eos = reader.manifest().tokenizer.eos_id;
    let mut docs = Vec::new();
    for source in 0..reader.manifest().sources.len() {
        for stream in [reader.train(source), reader.held_out(source)] {
            let mut ids = vec![0u32; stream.len() as usize];
            stream.read(0, &mut ids).expect("ids in range");
            for doc in ids.split_inclusive(|&t| t == eos) {
                let text = tokenizer.decode(doc, false).expect("decode");
                docs.push((doc.to_vec(), text));
            }
        }
    }
    docs
}

fn texts(out: &Path) -> Vec<String> {
    let mut texts: Vec<String> = stored(out).into_iter().map(|d| d.1).collect();
    texts.sort();
    texts
}

fn spec(dir: &Path, head: &str, source_extra: &str) -> CorpusSpec {
    let yaml = format!(
        "output: out\n{head}sources:\n  - name: dom\n    role: domain\n    paths: [in]\n    weight: 1\n{source_extra}"
    );
    let mut spec: CorpusSpec = serde_yaml::from_str(&yaml).expect("spec");
    spec.resolve_paths(dir);
    spec
}

fn prepared(spec: &CorpusSpec) -> Report {
    match prepare(spec, None, &PrepareOptions::default()).expect("prepare") {
        PrepareOutcome::Prepared { report, .. } => *report,
        PrepareOutcome::UpToDate { .. } => panic!("expected a fresh prepare"),
    }
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join("in").join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gz");
    gz.finish().expect("gz")
}

fn utf16(bom_and_bytes: fn(u16) -> [u8; 2], bom: &[u8], text: &str) -> Vec<u8> {
    let mut out = bom.to_vec();
    out.extend(text.encode_utf16().flat_map(bom_and_bytes));
    out
}

#[test]
fn byte_order_marks_are_removed_in_every_format_and_under_gzip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let bom = b"\xEF\xBB\xBF";
    let jsonl = [
        &bom[..],
        b"{\"text\": \"first record after a byte order mark\"}\n{\"text\": \"second record\"}\n",
    ]
    .concat();
    write(d, "a.jsonl", &jsonl);
    write(d, "b.md", [&bom[..], b"# Notes in markdown"].concat());
    write(
        d,
        "c.txt.gz",
        gzip(&[&bom[..], b"plain text under gzip"].concat()),
    );
    write(d, "d.rst", [&bom[..], b"Restructured text"].concat());
    write(
        d,
        "e.jsonl.gz",
        gzip(&[&bom[..], b"{\"text\": \"gzipped record\"}\n"].concat()),
    );
    write(
        d,
        "f.txt",
        utf16(u16::to_le_bytes, b"\xFF\xFE", "UTF-16LE text: Größe"),
    );
    write(
        d,
        "g.jsonl",
        utf16(
            u16::to_be_bytes,
            b"\xFE\xFF",
            "{\"text\": \"UTF-16BE record: Übersicht\"}\n",
        ),
    );
    write(d, "h.html", [&bom[..], b"<p>an html page</p>"].concat());
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let row = &report.sources[0];
    assert_eq!((row.bad_jsonl_lines, row.lossy_files), (0, 0), "{report:?}");
    assert_eq!(
        texts(&d.join("out")),
        [
            "# Notes in markdown",
            "Restructured text",
            "UTF-16BE record: Übersicht",
            "UTF-16LE text: Größe",
            "an html page",
            "first record after a byte order mark",
            "gzipped record",
            "plain text under gzip",
            "second record",
        ]
        .map(|t| format!("{t}<|endoftext|>"))
    );
    assert_eq!(
        row.encodings.get("UTF-16LE"),
        Some(&1),
        "{:?}",
        row.encodings
    );
    assert_eq!(
        row.encodings.get("UTF-16BE"),
        Some(&1),
        "{:?}",
        row.encodings
    );
}

#[test]
fn html_is_decoded_in_the_encoding_it_declares_and_text_in_the_sources() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (cyrillic, _, _) = encoding_rs::WINDOWS_1251.encode("Привет, мир");
    write(
        d,
        "latin1.html",
        b"<html><head><meta charset=\"iso-8859-1\"></head><body><p>Die Gr\xF6\xDFe der Tabelle: \xDCbersicht f\xFCr Anf\xE4nger.</p></body></html>",
    );
    write(
        d,
        "equiv.html",
        [
            &b"<html><head><title>t</title><meta name=viewport content=\"width=device-width\">\
               <meta http-equiv=\"Content-Type\" content=\"text/html; charset=windows-1251\"></head><body><p>"[..],
            &cyrillic,
            b"</p></body></html>",
        ]
        .concat(),
    );
    write(
        d,
        "page.xhtml",
        b"<?xml version=\"1.0\" encoding=\"ISO-8859-15\"?><html><body><p>Prix: 5 \xA4</p></body></html>",
    );
    // windows-1252's euro sign at 0x80: what "iso-8859-1" means to every browser.
    write(d, "euro.htm", b"<meta charset=latin1><p>Preis: 5 \x80</p>");
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let got = texts(&d.join("out"));
    for want in [
        "Die Größe der Tabelle: Übersicht für Anfänger.",
        "Привет, мир",
        "Prix: 5 €",
        "Preis: 5 €",
    ] {
        assert!(
            got.iter().any(|t| t.contains(want)),
            "{want:?} not in {got:?}"
        );
    }
    assert!(!got.iter().any(|t| t.contains('\u{FFFD}')), "{got:?}");
    assert_eq!(report.sources[0].lossy_files, 0);
    assert_eq!(report.sources[0].encodings.get("windows-1252"), Some(&2));
}

#[test]
fn a_source_encoding_decodes_plain_text_that_declares_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "old.txt", b"Caf\xE9 cr\xE8me, 5 \x80");
    write(d, "bom.txt", b"\xEF\xBB\xBFa BOM still wins: \xC3\xA9");
    // Without the setting: lossy UTF-8, counted by file.
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    assert_eq!(report.sources[0].lossy_files, 1);
    assert!(
        report.warnings.iter().any(|w| w.contains("old.txt")),
        "{:?}",
        report.warnings
    );
    let report = prepared(&spec(
        d,
        "vocab_size: 300\n",
        "    encoding: windows-1252\n",
    ));
    assert_eq!(report.sources[0].lossy_files, 0);
    let got = texts(&d.join("out"));
    assert!(
        got.contains(&"Café crème, 5 €<|endoftext|>".to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&"a BOM still wins: é<|endoftext|>".to_owned()),
        "{got:?}"
    );
}

#[test]
fn line_endings_are_newlines_in_every_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.txt", "first line\r\nsecond line\r\n");
    write(d, "b.md", "old mac\rline");
    write(d, "c.jsonl", "{\"text\": \"json\\r\\nlines\"}\r\n");
    // Records on lone `\r` line ends (a classic Mac file): before, one bad line, all lost.
    write(
        d,
        "d.jsonl",
        "{\"text\": \"mac one\"}\r{\"text\": \"mac two\"}\r",
    );
    // Both kinds in one file (files joined): before, the `\r` records and the first `\n` one
    // were one bad line.
    write(
        d,
        "e.jsonl",
        "{\"text\": \"mixed one\"}\r{\"text\": \"mixed two\"}\r{\"text\": \"mixed three\"}\n\
         {\"text\": \"mixed four\"}\r\n",
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    assert_eq!(report.sources[0].bad_jsonl_lines, 0, "{report:?}");
    let got = texts(&d.join("out"));
    for mac in [
        "mac one<|endoftext|>",
        "mac two<|endoftext|>",
        "mixed one<|endoftext|>",
        "mixed two<|endoftext|>",
        "mixed three<|endoftext|>",
        "mixed four<|endoftext|>",
    ] {
        assert!(got.contains(&mac.to_owned()), "{got:?}");
    }
    assert!(!got.iter().any(|t| t.contains('\r')), "{got:?}");
    assert!(
        got.contains(&"first line\nsecond line<|endoftext|>".to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&"old mac\nline<|endoftext|>".to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&"json\nlines<|endoftext|>".to_owned()),
        "{got:?}"
    );
}

/// The special ids inside a document (before its final EOS).
fn inner_specials(docs: &[(Vec<u32>, String)], special: &[u32]) -> Vec<u32> {
    docs.iter()
        .flat_map(|(ids, _)| ids[..ids.len() - 1].iter().copied())
        .filter(|id| special.contains(id))
        .collect()
}

#[test]
fn special_tokens_spelled_in_text_stay_text_with_a_trained_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "a.jsonl",
        "{\"text\": \"A tutorial: GPT-2 marks document ends with the string <|endoftext|> between texts.\"}\n{\"text\": \"A second, ordinary document.\"}\n",
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let docs = stored(&d.join("out"));
    assert_eq!(docs.len(), 2);
    let eos = CorpusReader::open(&d.join("out"))
        .expect("open")
        .manifest()
        .tokenizer
        .eos_id;
    assert_eq!(inner_specials(&docs, &[eos]), Vec::<u32>::new());
    assert!(docs
        .iter()
        .any(|(_, t)| t.contains("string <|endoftext|> between")));
    let row = &report.sources[0];
    assert_eq!(row.special_text_documents, 1);
    assert!(
        row.special_text_examples[0].ends_with("a.jsonl:1 (<|endoftext|>)"),
        "{row:?}"
    );
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("spell a special token")));
}

/// A SentencePiece-style (Llama-2) `tokenizer.json`: byte-fallback BPE over `▁`-prefixed
/// pieces, `<unk>` 0, `<s>` 1, `</s>` 2, and a template that puts `<s>` first.
fn llama2_style_tokenizer(path: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*t).into(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    let pieces = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ<>/|_.,:";
    for (i, c) in pieces.chars().enumerate() {
        vocab.insert(c.to_string(), (259 + i).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let metaspace = serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false});
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": metaspace,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    std::fs::write(path, serde_json::to_vec(&json).expect("json")).expect("write tokenizer");
    Tokenizer::from_file(path).expect("a valid tokenizer.json");
}

#[test]
fn a_sentencepiece_template_adds_bos_and_its_specials_in_text_stay_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    llama2_style_tokenizer(&d.join("tok.json"));
    write(
        d,
        "a.jsonl",
        "{\"text\": \"close the tag with </s> then open <s> again\"}\n{\"text\": \"plain words\"}\n",
    );
    let head = format!("tokenizer: {}\n", d.join("tok.json").display());
    let report = prepared(&spec(d, &head, ""));
    let docs = stored(&d.join("out"));
    assert_eq!(docs.len(), 2, "{docs:?}");
    for (ids, _) in &docs {
        assert_eq!((ids[0], ids[ids.len() - 1]), (1, 2), "{ids:?}");
    }
    assert_eq!(
        inner_specials(&docs[..], &[1, 2]).len(),
        docs.len(),
        "only the BOS"
    );
    assert!(
        docs.iter()
            .any(|(_, t)| t.contains("close the tag with </s> then open <s> again")),
        "{docs:?}"
    );
    let t = &report.tokenizer;
    assert_eq!(t.added_tokens, ["<s>", "</s>"]);
    assert_eq!(t.bos_token.as_deref(), Some("<s>"));
    assert_eq!(report.sources[0].special_text_documents, 1);
    let manifest = CorpusReader::open(&d.join("out"))
        .expect("open")
        .manifest()
        .clone();
    assert_eq!(
        (
            manifest.tokenizer.bos_token.as_deref(),
            manifest.tokenizer.bos_id
        ),
        (Some("<s>"), Some(1))
    );

    // add_bos: false leaves the text alone.
    let report = prepared(&spec(d, &format!("{head}add_bos: false\n"), ""));
    assert_eq!(report.tokenizer.added_tokens, ["</s>"]);
    assert!(stored(&d.join("out")).iter().all(|(ids, _)| ids[0] != 1));
}

/// A byte-level tokenizer (trained here) given to prepare with chat tokens added as special
/// and a template that adds nothing.
#[test]
fn any_special_token_of_a_given_tokenizer_stays_text_and_add_bos_true_needs_a_bos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let texts_in = [
        "user said <|im_end|> and <|im_start|> in a bug report",
        "more text here",
    ];
    let mut tokenizer =
        dapt_corpus::tokenizer::train_byte_level_bpe(texts_in.iter(), 300).expect("train");
    tokenizer
        .add_special_tokens([
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ])
        .expect("special");
    let _ = tokenizer.with_post_processor(Some(ByteLevel::default()));
    tokenizer.save(d.join("tok.json"), false).expect("save");
    write(
        d,
        "a.jsonl",
        texts_in
            .iter()
            .map(|t| format!("{{\"text\": \"{t}\"}}\n"))
            .collect::<String>(),
    );
    let head = format!("tokenizer: {}\n", d.join("tok.json").display());
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.added_tokens, ["<|endoftext|>"]);
    let docs = stored(&d.join("out"));
    let tk = Tokenizer::from_file(d.join("tok.json")).expect("tok");
    let special: Vec<u32> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .filter_map(|t| tk.token_to_id(t))
        .collect();
    assert_eq!(special.len(), 3);
    assert_eq!(inner_specials(&docs, &special), Vec::<u32>::new());
    assert_eq!(report.sources[0].special_text_documents, 1);

    // add_bos: true without any BOS in the tokenizer is refused, naming the user's file.
    let err = prepare(
        &spec(d, &format!("{head}add_bos: true\n"), ""),
        None,
        &PrepareOptions::default(),
    )
    .expect_err("no bos");
    let msg = err.to_string();
    assert!(
        msg.contains("tok.json") && msg.contains("corpus.bos_token"),
        "{msg}"
    );
    assert!(!msg.contains(".dapt-prepare-"), "{msg}");
    // ... and works once the job names one.
    let report = prepared(&spec(
        d,
        &format!("{head}add_bos: true\nbos_token: \"<|im_start|>\"\n"),
        "",
    ));
    assert_eq!(
        report.tokenizer.added_tokens,
        ["<|im_start|>", "<|endoftext|>"]
    );
    let start = tk.token_to_id("<|im_start|>").expect("id");
    assert!(stored(&d.join("out"))
        .iter()
        .all(|(ids, _)| ids[0] == start));
}

#[test]
fn a_missing_eos_names_the_users_tokenizer_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    llama2_style_tokenizer(&d.join("tok.json"));
    write(d, "a.txt", "text");
    let head = format!(
        "tokenizer: {}\neos_token: \"<nope>\"\n",
        d.join("tok.json").display()
    );
    let err = prepare(&spec(d, &head, ""), None, &PrepareOptions::default())
        .expect_err("missing eos")
        .to_string();
    assert!(
        err.contains(&d.join("tok.json").display().to_string()) && err.contains("<nope>"),
        "{err}"
    );
}

/// UTF-32 byte order marks, and byte order marks past the first one: a file that starts with two,
/// each member of a gzip stream made by `cat a.gz b.gz`, a JSONL text field that starts with one.
/// None is text, no record is lost.
#[test]
fn utf32_and_repeated_byte_order_marks_are_not_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let utf32 = |bom: [u8; 4], big: bool, text: &str| -> Vec<u8> {
        let mut out = bom.to_vec();
        out.extend(text.chars().flat_map(|c| {
            if big {
                (c as u32).to_be_bytes()
            } else {
                (c as u32).to_le_bytes()
            }
        }));
        out
    };
    write(
        d,
        "le.txt",
        utf32([0xFF, 0xFE, 0, 0], false, "Größe in UTF-32LE"),
    );
    write(
        d,
        "be.jsonl",
        utf32(
            [0, 0, 0xFE, 0xFF],
            true,
            "{\"text\": \"Größe in UTF-32BE\"}\n",
        ),
    );
    let bom = "\u{FEFF}";
    write(
        d,
        "joined.jsonl.gz",
        [
            gzip(format!("{bom}{{\"text\": \"first member\"}}\n").as_bytes()),
            gzip(format!("{bom}{{\"text\": \"second member\"}}\n").as_bytes()),
        ]
        .concat(),
    );
    write(
        d,
        "joined.txt.gz",
        [
            gzip(format!("{bom}part one\n").as_bytes()),
            gzip(format!("{bom}part two").as_bytes()),
        ]
        .concat(),
    );
    write(
        d,
        "double.jsonl",
        format!("{bom}{bom}{{\"text\": \"after two marks\"}}\n"),
    );
    write(
        d,
        "field.jsonl",
        format!("{{\"text\": \"{bom}a mark in the field\"}}\n"),
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let got = texts(&d.join("out"));
    assert_eq!(
        got,
        [
            "Größe in UTF-32BE<|endoftext|>",
            "Größe in UTF-32LE<|endoftext|>",
            "a mark in the field<|endoftext|>",
            "after two marks<|endoftext|>",
            "first member<|endoftext|>",
            "part one\npart two<|endoftext|>",
            "second member<|endoftext|>",
        ]
    );
    let row = &report.sources[0];
    assert_eq!((row.lossy_files, row.bad_jsonl_lines), (0, 0), "{row:?}");
    assert_eq!(row.encodings.get("UTF-32LE"), Some(&1));
    assert_eq!(row.encodings.get("UTF-32BE"), Some(&1));
}

/// UTF-16 without a byte order mark read as UTF-8 is valid UTF-8 full of NULs: refused by file
/// name with the setting that reads it, never stored as text.
#[test]
fn text_full_of_nuls_is_refused_by_name_with_the_setting_that_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "ok.txt", "an ordinary document");
    write(
        d,
        "wide.txt",
        utf16(u16::to_le_bytes, b"", "plain utf16 text without a bom"),
    );
    let err = prepare(
        &spec(d, "vocab_size: 300\n", ""),
        None,
        &PrepareOptions::default(),
    )
    .expect_err("NULs")
    .to_string();
    assert!(
        err.contains("wide.txt") && err.contains("encoding: utf-16le"),
        "{err}"
    );
    assert!(!d.join("out").exists(), "nothing published");
    std::fs::remove_file(d.join("in/ok.txt")).expect("rm");
    prepared(&spec(d, "vocab_size: 300\n", "    encoding: utf-16le\n"));
    assert_eq!(
        texts(&d.join("out")),
        ["plain utf16 text without a bom<|endoftext|>"]
    );
}

/// What an HTML page declares beyond the first 1024 bytes' `<meta>`: a `<meta>` later in the
/// `<head>`, a UTF-16 XML declaration without a byte order mark, an encoding that decodes to
/// U+FFFD alone (refused by its label), a label that names no encoding (named in the report);
/// and UTF-8 files read with a legacy source encoding (named in the report).
#[test]
fn html_declarations_beyond_the_prescan_and_labels_that_cannot_be_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut late = b"<html><head><style>".to_vec();
    late.extend(b"/* a long style sheet */\n".repeat(60));
    late.extend(
        b"</style><meta charset=\"windows-1252\"></head><body><p>Die Gr\xF6\xDFe</p></body></html>",
    );
    write(d, "late.html", late);
    let xml =
        "<?xml version=\"1.0\" encoding=\"UTF-16\"?><html><body><p>Übersicht</p></body></html>";
    write(d, "wide.xhtml", utf16(u16::to_le_bytes, b"", xml));
    write(
        d,
        "unknown.html",
        b"<meta charset=\"latin-1\"><p>f\xFCr</p>",
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let got = texts(&d.join("out"));
    assert!(
        got.contains(&"Die Größe<|endoftext|>".to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&"Übersicht<|endoftext|>".to_owned()),
        "{got:?}"
    );
    let row = &report.sources[0];
    assert_eq!(row.unknown_label_files, 1, "{row:?}");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("unknown.html (`latin-1`)")),
        "{:?}",
        report.warnings
    );

    write(d, "kr.html", b"<meta charset=\"iso-2022-kr\"><p>hello</p>");
    let err = prepare(
        &spec(d, "vocab_size: 300\n", ""),
        None,
        &PrepareOptions::default(),
    )
    .expect_err("replacement")
    .to_string();
    assert!(
        err.contains("kr.html") && err.contains("`iso-2022-kr`"),
        "{err}"
    );
    std::fs::remove_file(d.join("in/kr.html")).expect("rm");

    write(d, "utf8.txt", "Größe in UTF-8");
    let report = prepared(&spec(
        d,
        "vocab_size: 300\n",
        "    encoding: windows-1252\n",
    ));
    assert_eq!(report.sources[0].utf8_under_legacy_files, 1);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("utf8.txt") && w.contains("valid UTF-8")),
        "{:?}",
        report.warnings
    );
}

/// What an audit found decoded wrong, without a word, through `prepare`: a UTF-8 page under a
/// stale `iso-8859-1` cut mid-character, and one under a stale `Shift_JIS` (both mojibake); an
/// XHTML page whose namespace came after a long comment (read as HTML5, `<title/>` swallowed
/// its end); a `.xhtml` with a line break before its declaration (declared encoding ignored);
/// a late `<meta>` in a page without head or body tags (ignored). The lossy warning does not
/// tell the user to set `encoding` for a page whose own declaration wins over it.
#[test]
fn stale_declarations_long_prologs_and_implied_heads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cut = "<meta charset=\"iso-8859-1\"><p>Die Größe der Tabelle: Übersicht für Anfänger.</p>\
               <p>Ende: Grüße</p>";
    write(
        d,
        "cut.html",
        &cut.as_bytes()[..cut.find("üße").expect("in page") + 1],
    );
    write(
        d,
        "sjis.html",
        "<meta charset=\"Shift_JIS\"><p>東京の天気は晴れ。</p>",
    );
    let comment = format!("<!-- {} -->", "licence text ".repeat(400));
    write(
        d,
        "long.html",
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n{comment}\n<html \
             xmlns=\"http://www.w3.org/1999/xhtml\"><head><title>t</title></head><body>\
             <p>one</p><script/><p>two</p><title/><p>three</p></body></html>"
        ),
    );
    write(
        d,
        "ws.xhtml",
        b"\n<?xml version=\"1.0\" encoding=\"windows-1252\"?>\n<html \
          xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>Gr\xF6\xDFe</p><title/><p>after</p>\
          </body></html>",
    );
    write(
        d,
        "late.html",
        [
            format!("<!DOCTYPE html>{comment}<meta charset=\"windows-1252\"><title>t</title>")
                .as_bytes(),
            b"<p>Sch\xF6n</p>",
        ]
        .concat(),
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let got = texts(&d.join("out"));
    for want in [
        "Die Größe der Tabelle: Übersicht für Anfänger.\nEnde: Gr\u{FFFD}<|endoftext|>",
        "東京の天気は晴れ。<|endoftext|>",
        "one\ntwo\nthree<|endoftext|>",
        "Größe\nafter<|endoftext|>",
        "Schön<|endoftext|>",
    ] {
        assert!(got.contains(&want.to_owned()), "{want:?} in {got:?}");
    }
    let row = &report.sources[0];
    assert_eq!(
        (
            row.utf8_over_declared_files,
            row.lossy_files,
            row.not_xml_files
        ),
        (2, 1, 0),
        "{row:?}"
    );
    let lossy = report
        .warnings
        .iter()
        .find(|w| w.contains("decoded lossily"))
        .expect("a lossy warning");
    assert!(
        lossy.contains("cut.html (UTF-8, declares windows-1252)")
            && lossy.contains("is read as it declares")
            && !lossy.contains("can be set with the source's `encoding`"),
        "{lossy}"
    );
}

/// windows-1252 text under a source `encoding: utf-16le` has no NUL byte and was stored as
/// CJK characters without a word (an audit): named in a warning; real UTF-16 without a byte
/// order mark, with NULs (Latin script) or without (Japanese), is not.
#[test]
fn eight_bit_text_under_a_utf16_setting_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let german = "Der Käse und die Brötchen vom Müller im Café kosten wenig Geld.\n".repeat(10);
    write(d, "latin1.txt", encoding_rs::WINDOWS_1252.encode(&german).0);
    write(
        d,
        "wide.txt",
        utf16(u16::to_le_bytes, b"", "Ein zweites Dokument: äöü\n"),
    );
    write(
        d,
        "ja.txt",
        utf16(u16::to_le_bytes, b"", "東京の天気は晴れ。"),
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", "    encoding: utf-16le\n"));
    assert_eq!(report.sources[0].not_utf16_files, 1, "{report:?}");
    let warning = report
        .warnings
        .iter()
        .find(|w| w.contains("8-bit text"))
        .expect("a warning");
    assert!(
        warning.contains("latin1.txt")
            && !warning.contains("wide.txt")
            && !warning.contains("ja.txt"),
        "{warning}"
    );
}

/// Rewrites the `tokenizer.json` at `path` with `edit`.
fn edit_tokenizer(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    edit(&mut json);
    std::fs::write(path, serde_json::to_vec(&json).expect("json")).expect("write");
    Tokenizer::from_file(path).expect("a valid tokenizer.json");
}

/// A template `single` of special token `first` (or none), the sequence, then `last` (or none).
fn single_template(first: Option<(&str, u32)>, last: Option<(&str, u32)>) -> serde_json::Value {
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    for (name, id) in first.iter().chain(last.iter()) {
        specials.insert(
            (*name).into(),
            serde_json::json!({"id": name, "ids": [id], "tokens": [name]}),
        );
    }
    if let Some((name, _)) = first {
        single.push(serde_json::json!({"SpecialToken": {"id": name, "type_id": 0}}));
    }
    single.push(serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some((name, _)) = last {
        single.push(serde_json::json!({"SpecialToken": {"id": name, "type_id": 0}}));
    }
    serde_json::json!({"type": "TemplateProcessing", "single": single, "pair": single.clone(),
        "special_tokens": specials})
}

/// What a tokenizer file says beyond its vocabulary, applied as it means for corpus documents:
/// `truncation` and `padding` (batched inference) not at all; an added token shaped like a
/// control token but not marked special (Qwen2.5's `<tool_call>`) split in text like the special
/// ones; a template whose BOS is the EOS (OPT's `</s>`) not doubling every boundary; a template
/// that ends a sequence with `</s>` giving the EOS even where `<|endoftext|>` exists too.
#[test]
fn a_tokenizer_files_inference_settings_control_shaped_tokens_and_template_are_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tok = d.join("tok.json");
    let text = "call <tool_call> then the rest of a long document";
    write(
        d,
        "a.jsonl",
        format!("{{\"text\": \"{text}\"}}\n{{\"text\": \"plain words\"}}\n"),
    );
    let head = format!("tokenizer: {}\n", tok.display());

    llama2_style_tokenizer(&tok);
    edit_tokenizer(&tok, |t| {
        t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4,
            "strategy": "LongestFirst", "stride": 0});
        t["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"});
        t["added_tokens"]
            .as_array_mut()
            .expect("added")
            .push(serde_json::json!({"id": 400,
            "content": "<tool_call>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": false}));
    });
    let report = prepared(&spec(d, &head, ""));
    let docs = stored(&d.join("out"));
    assert!(docs.iter().any(|(_, t)| t.contains(text)), "{docs:?}");
    for (ids, _) in &docs {
        assert_eq!(
            (ids[0], ids[ids.len() - 1]),
            (1, 2),
            "<s> first, </s> last: {ids:?}"
        );
        assert!(
            !ids.contains(&0) && !ids.contains(&400),
            "no pad, no <tool_call> id: {ids:?}"
        );
    }
    let t = &report.tokenizer;
    assert_eq!(t.ignored_settings, ["truncation", "padding"]);
    assert_eq!(t.split_added_tokens, ["<tool_call>"]);
    assert_eq!(report.sources[0].special_text_documents, 1);

    // BPE dropout (a training-time regulariser; at 1.0 it drops every merge) is not applied:
    // the same text gave other ids on each prepare (an audit).
    llama2_style_tokenizer(&tok);
    edit_tokenizer(&tok, |t| {
        let vocab = t["model"]["vocab"].as_object_mut().expect("vocab");
        vocab.insert("▁p".into(), 500.into());
        vocab.insert("▁pl".into(), 501.into());
        t["model"]["merges"] = serde_json::json!(["▁ p", "▁p l"]);
        t["model"]["dropout"] = serde_json::json!(1.0);
    });
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.ignored_settings, ["dropout"]);
    let plain = stored(&d.join("out"))
        .into_iter()
        .find(|(_, t)| t.contains("plain words"))
        .unwrap_or_else(|| panic!("{:?}", stored(&d.join("out"))));
    assert!(
        plain.0.contains(&501),
        "merged as without dropout: {plain:?}"
    );
    assert!(dapt_corpus::report::render(&report).contains("BPE dropout"));

    // BOS = EOS: one `</s>` between documents.
    llama2_style_tokenizer(&tok);
    edit_tokenizer(&tok, |t| {
        t["post_processor"] = single_template(Some(("</s>", 2)), None);
    });
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(
        (
            report.tokenizer.bos_token.as_deref(),
            report.tokenizer.added_tokens.clone()
        ),
        (None, vec!["</s>".to_owned()])
    );
    for (ids, _) in stored(&d.join("out")) {
        assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 1, "{ids:?}");
    }

    // `$A </s>` with `<|endoftext|>` in the vocabulary too: the template's `</s>` ends documents.
    llama2_style_tokenizer(&tok);
    edit_tokenizer(&tok, |t| {
        t["post_processor"] = single_template(None, Some(("</s>", 2)));
        t["added_tokens"]
            .as_array_mut()
            .expect("added")
            .push(serde_json::json!({"id": 401,
            "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true}));
    });
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.eos_token, "</s>");
    assert!(report.tokenizer.template_suffix_not_applied.is_empty());
    for (ids, _) in stored(&d.join("out")) {
        assert_eq!(ids[ids.len() - 1], 2, "{ids:?}");
    }
}

/// A Unigram model's unknown token (T5, ALBERT, mT5 style `tokenizer.json`) is text, as a BPE's
/// is: the first character outside its vocabulary refused the whole corpus, calling `<unk>` a
/// control token (an audit).
#[test]
fn a_unigram_models_unknown_token_is_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tok = d.join("unigram.json");
    let mut vocab = vec![
        serde_json::json!(["<unk>", 0.0]),
        serde_json::json!(["</s>", 0.0]),
        serde_json::json!(["▁", -2.0]),
    ];
    for c in "abcdefghijklmnopqrstuvwxyz".chars() {
        vocab.push(serde_json::json!([c.to_string(), -3.0]));
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let metaspace = serde_json::json!({"type": "Metaspace", "replacement": "▁",
        "prepend_scheme": "always", "split": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "</s>")],
        "normalizer": null, "pre_tokenizer": metaspace, "post_processor": null,
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": false}
    });
    std::fs::write(&tok, serde_json::to_vec(&json).expect("json")).expect("write");
    write(
        d,
        "a.jsonl",
        "{\"text\": \"plain words\"}\n{\"text\": \"a Zebra here\"}\n",
    );
    let report = prepared(&spec(d, &format!("tokenizer: {}\n", tok.display()), ""));
    assert_eq!(report.tokenizer.eos_token, "</s>");
    let docs = stored(&d.join("out"));
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert!(
        docs.iter()
            .any(|(ids, _)| ids[..ids.len() - 1].contains(&0)),
        "the unknown character is stored as <unk>: {docs:?}"
    );
}

/// A tokenizer whose vocabulary cannot represent the text (here none of its characters, and no
/// unknown token) is refused, naming it, rather than storing empty documents; one document it
/// cannot represent among others is skipped and counted.
#[test]
fn a_tokenizer_that_encodes_text_to_nothing_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tok = d.join("tok.json");
    llama2_style_tokenizer(&tok);
    edit_tokenizer(&tok, |t| {
        t["model"]["vocab"] = serde_json::json!({"<unk>": 0, "<s>": 1, "</s>": 2});
        t["model"]["unk_token"] = serde_json::Value::Null;
        t["model"]["byte_fallback"] = false.into();
    });
    write(d, "a.txt", "words the vocabulary does not have");
    let head = format!("tokenizer: {}\n", tok.display());
    let err = prepare(&spec(d, &head, ""), None, &PrepareOptions::default())
        .expect_err("nothing to train on")
        .to_string();
    assert!(
        err.contains("tok.json") && err.contains("no tokens"),
        "{err}"
    );
}

/// `d/model/tokenizer.json`, a Llama-2 style tokenizer without a post-processor template (as
/// older Llama-2 and Mistral folders ship it), and the path of its `tokenizer_config.json`
/// (not written).
fn model_folder_without_template(d: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(d.join("model")).expect("mkdir");
    let tok = d.join("model").join("tokenizer.json");
    llama2_style_tokenizer(&tok);
    edit_tokenizer(&tok, |json| {
        json["post_processor"] = serde_json::Value::Null
    });
    (tok, d.join("model").join("tokenizer_config.json"))
}

/// A Llama 2 fine-tune that added `<|endoftext|>` as its pad token: its documents ended with
/// the pad (the first of the usual EOS names) instead of `</s>`, the EOS its config names (an
/// audit). A pad token is never taken for the EOS unless it is also the config's EOS (GPT-2).
/// And a `corpus.bos_token` that nothing adds under `add_bos: auto` was ignored without a word:
/// refused, saying how to add it.
#[test]
fn the_pad_token_never_ends_documents_and_a_named_bos_is_never_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (tok, config) = model_folder_without_template(d);
    edit_tokenizer(&tok, |t| {
        t["added_tokens"].as_array_mut().expect("added").push(
            serde_json::json!({"id": 400, "content": "<|endoftext|>",
                "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
                "special": true}),
        );
    });
    write(d, "a.jsonl", "{\"text\": \"plain words\"}\n");
    let head = format!("tokenizer: {}\n", tok.display());
    std::fs::write(
        &config,
        r#"{"add_bos_token": false, "eos_token": "</s>", "pad_token": "<|endoftext|>"}"#,
    )
    .expect("write config");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.eos_token, "</s>");
    for (ids, _) in stored(&d.join("out")) {
        assert_eq!(ids[ids.len() - 1], 2, "{ids:?}");
        assert!(!ids.contains(&400), "{ids:?}");
    }
    // The config's EOS, a document end, comes before the usual names (`<|endoftext|>` added
    // for another use is not the EOS of a `</s>` model).
    std::fs::write(&config, r#"{"eos_token": "</s>"}"#).expect("write config");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.eos_token, "</s>");
    // A chat turn's end named there is not taken for the document end.
    std::fs::write(&config, r#"{"eos_token": "<|im_end|>"}"#).expect("write config");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.eos_token, "<|endoftext|>");
    // Qwen2.5-Instruct: the config's EOS ends a chat turn and its pad is the document
    // separator; with no other document end, the pad's document end ends documents, never the
    // turn's end (every document ended with `<|im_end|>`: an audit).
    let qwen = d.join("qwen");
    std::fs::create_dir_all(&qwen).expect("mkdir");
    let qwen_tok = qwen.join("tokenizer.json");
    std::fs::copy(&tok, &qwen_tok).expect("copy");
    edit_tokenizer(&qwen_tok, |t| {
        let vocab = t["model"]["vocab"].as_object_mut().expect("vocab");
        vocab.remove("</s>");
        vocab.insert("<|im_end|>".into(), 2.into());
        t["added_tokens"][2]["content"] = "<|im_end|>".into();
    });
    std::fs::write(
        qwen.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}"#,
    )
    .expect("write config");
    let qwen_head = format!("tokenizer: {}\n", qwen_tok.display());
    let report = prepared(&spec(d, &qwen_head, ""));
    assert_eq!(report.tokenizer.eos_token, "<|endoftext|>");
    // Without any document end it is refused, naming the turn's end, not taken.
    edit_tokenizer(&qwen_tok, |t| {
        t["added_tokens"].as_array_mut().expect("added").pop();
    });
    let err = prepare(&spec(d, &qwen_head, ""), None, &PrepareOptions::default())
        .expect_err("no document end")
        .to_string();
    assert!(
        err.contains("`<|im_end|>` ends a chat turn, not a document")
            && err.contains("corpus.eos_token"),
        "{err}"
    );
    // The pad that is also the EOS (GPT-2's `<|endoftext|>`) ends documents.
    std::fs::write(
        &config,
        r#"{"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#,
    )
    .expect("write config");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.eos_token, "<|endoftext|>");

    // `bos_token` named, but nothing adds a BOS under `add_bos: auto`.
    for config_text in [r#"{"add_bos_token": false}"#, r#"{}"#] {
        std::fs::write(&config, config_text).expect("write config");
        let err = prepare(
            &spec(d, &format!("{head}bos_token: \"<s>\"\n"), ""),
            None,
            &PrepareOptions::default(),
        )
        .expect_err("a named BOS nothing adds")
        .to_string();
        assert!(
            err.contains("corpus.bos_token is `<s>`") && err.contains("add_bos: true"),
            "{config_text}: {err}"
        );
    }
    // With add_bos: true it is added.
    prepared(&spec(
        d,
        &format!("{head}bos_token: \"<s>\"\nadd_bos: true\n"),
        "",
    ));
    assert!(stored(&d.join("out")).iter().all(|(ids, _)| ids[0] == 1));
}

/// A model folder's `tokenizer_config.json` decides the BOS as transformers applies it when it
/// loads the folder: an explicit `add_bos_token`, or a Llama/Gemma tokenizer class (BOS by
/// default) where the `tokenizer.json` has no template (older Llama-2 and Mistral exports).
#[test]
fn a_tokenizer_config_beside_the_tokenizer_decides_the_bos_as_transformers_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (tok, config) = model_folder_without_template(d);
    write(
        d,
        "a.jsonl",
        "{\"text\": \"plain words\"}\n{\"text\": \"more words\"}\n",
    );
    let head = format!("tokenizer: {}\n", tok.display());
    let first_ids = |d: &Path| -> Vec<u32> {
        stored(&d.join("out"))
            .iter()
            .map(|(ids, _)| ids[0])
            .collect()
    };

    // No config: the template adds nothing.
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.bos_token, None);
    assert!(first_ids(d).iter().all(|&id| id != 1));

    // add_bos_token: true with its bos_token (what LlamaTokenizerFast rebuilds the template from).
    std::fs::write(
        &config,
        r#"{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "add_eos_token": false,
            "bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .expect("write config");
    let report = prepared(&spec(d, &head, "")); // a fresh prepare: the config is an input
    assert_eq!(report.tokenizer.bos_token.as_deref(), Some("<s>"));
    assert_eq!(report.tokenizer.added_tokens, ["<s>", "</s>"]);
    let reason = report.tokenizer.bos_reason.clone().expect("reason");
    assert!(reason.contains("tokenizer_config.json") && reason.contains("add_bos_token"));
    assert_eq!(first_ids(d), [1, 1]);
    let rendered = dapt_corpus::report::render(&report);
    assert!(rendered.contains("tokenizer_config.json"), "{rendered}");

    // A Llama class without the key adds it by default; bos_token as an AddedToken object.
    std::fs::write(
        &config,
        r#"{"tokenizer_class": "LlamaTokenizerFast",
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": true}}"#,
    )
    .expect("write config");
    prepared(&spec(d, &head, ""));
    assert_eq!(first_ids(d), [1, 1]);

    // Another class says nothing of the BOS: the template decides.
    std::fs::write(&config, r#"{"tokenizer_class": "PreTrainedTokenizerFast"}"#).expect("write");
    prepared(&spec(d, &head, ""));
    assert!(first_ids(d).iter().all(|&id| id != 1));

    // The job's add_bos: false still wins.
    std::fs::write(&config, r#"{"add_bos_token": true, "bos_token": "<s>"}"#).expect("write");
    prepared(&spec(d, &format!("{head}add_bos: false\n"), ""));
    assert!(first_ids(d).iter().all(|&id| id != 1));

    // For a class that does not rebuild the template (or none), transformers does not apply
    // `add_bos_token` and neither does dapt (it did, for every class: an audit): the template
    // decides, and the report says the key was not applied.
    std::fs::write(&config, r#"{"add_bos_token": true, "bos_token": "<s>"}"#).expect("write");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.bos_token, None);
    assert!(first_ids(d).iter().all(|&id| id != 1));
    let rendered = dapt_corpus::report::render(&report);
    assert!(
        rendered.contains("add_bos_token true is not applied")
            && rendered.contains("a config without tokenizer_class"),
        "{rendered}"
    );
    llama2_style_tokenizer(&tok);
    std::fs::write(
        &config,
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": false}"#,
    )
    .expect("write");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.bos_token.as_deref(), Some("<s>"));
    assert_eq!(first_ids(d), [1, 1]);
    let rendered = dapt_corpus::report::render(&report);
    assert!(
        rendered.contains("the tokenizer's template adds it; tokenizer_config.json: add_bos_token false is not applied")
            && rendered.contains("tokenizer_class PreTrainedTokenizerFast"),
        "{rendered}"
    );

    // add_bos_token: false of a Llama class where the template adds <s>: none, and the report
    // says why; GPT-NeoX's class drops the template's by default, named with or without "Fast"
    // (transformers loads the Fast class of a name without it; a review).
    for config_text in [
        r#"{"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": false}"#,
        r#"{"tokenizer_class": "LlamaTokenizer", "add_bos_token": false}"#,
        r#"{"tokenizer_class": "GPTNeoXTokenizerFast"}"#,
        r#"{"tokenizer_class": "GPTNeoXTokenizer"}"#,
    ] {
        std::fs::write(&config, config_text).expect("write config");
        let report = prepared(&spec(d, &head, ""));
        assert_eq!(report.tokenizer.bos_token, None, "{config_text}");
        assert!(first_ids(d).iter().all(|&id| id != 1), "{config_text}");
        let rendered = dapt_corpus::report::render(&report);
        assert!(
            rendered.contains("add_bos_token false") || rendered.contains("adds none by default"),
            "{rendered}"
        );
    }

    // A tokenizer_config.json without a class takes the model's, from config.json beside it,
    // as transformers does: a Llama model's applies add_bos_token.
    let model_config = tok.with_file_name("config.json");
    std::fs::write(&model_config, r#"{"model_type": "llama"}"#).expect("write");
    std::fs::write(&config, r#"{"add_bos_token": false}"#).expect("write config");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.bos_token, None);
    std::fs::write(&model_config, r#"{"model_type": "qwen2"}"#).expect("write");
    let report = prepared(&spec(d, &head, ""));
    assert_eq!(report.tokenizer.bos_token.as_deref(), Some("<s>"));
    std::fs::remove_file(&model_config).expect("rm");

    // A config that cannot be read as transformers would is an error naming file and field.
    for (bad, field) in [
        (r#"{"add_bos_token": "yes"}"#, "add_bos_token"),
        (r#"{"add_bos_token": true, "bos_token": 5}"#, "bos_token"),
        (
            r#"{"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": true, "bos_token": "<nope>"}"#,
            "<nope>",
        ),
        (r#"[1, 2]"#, "JSON object"),
        ("{not json", "JSON"),
    ] {
        edit_tokenizer(&tok, |json| {
            json["post_processor"] = serde_json::Value::Null
        });
        std::fs::write(&config, bad).expect("write config");
        let err =
            prepare(&spec(d, &head, ""), None, &PrepareOptions::default()).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains(field), "{bad}: {msg}");
        if field != "<nope>" {
            assert!(msg.contains("tokenizer_config.json"), "{bad}: {msg}");
        }
    }
}

/// Wildcard characters the user did not write as wildcards are text: the job's folder
/// (`proj[v2]/`, which as a glob matches `projv/`), and a file name that exists as written.
#[test]
fn wildcard_characters_in_the_job_folder_or_a_file_name_are_not_wildcards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("proj[v2]");
    let put = |path: std::path::PathBuf, text: &str| {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    put(job.join("docs/a.txt"), "the job's own document");
    put(job.join("globbed/b.txt"), "a globbed document");
    put(
        dir.path().join("projv/docs/other.txt"),
        "another project's document",
    );
    put(
        dir.path().join("projv/globbed/c.txt"),
        "another project's globbed document",
    );
    put(job.join("src/notes [draft].txt"), "the draft notes");
    put(job.join("src/notes d.txt"), "not the draft notes");
    let yaml = "output: out\nsources:\n  - name: dom\n    role: domain\n    weight: 1\n    \
                paths: [docs, \"src/notes [draft].txt\", \"glob*/*.txt\"]\n";
    let mut spec: CorpusSpec = serde_yaml::from_str(yaml).expect("spec");
    spec.resolve_paths(&job);
    prepared(&spec);
    assert_eq!(
        texts(&job.join("out")),
        [
            "a globbed document<|endoftext|>",
            "the draft notes<|endoftext|>",
            "the job's own document<|endoftext|>"
        ]
    );

    // A literal path under such a folder that does not exist is an error, never a glob.
    let yaml = yaml.replace("docs,", "missing,");
    let mut spec: CorpusSpec = serde_yaml::from_str(&yaml).expect("spec");
    spec.resolve_paths(&job);
    let err = prepare(&spec, None, &PrepareOptions::default()).expect_err("refused");
    assert!(err.to_string().contains("missing"), "{err}");

    // An empty path would name the job's whole folder: refused by field.
    let err = serde_yaml::from_str::<CorpusSpec>(&yaml.replace("missing,", "\"\","))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("paths[0] is empty"), "{err}");
}

/// What a source folder may hold besides text files: a FIFO (whose read blocks forever), a
/// dangling link (an editor's lock file), a file name that is not UTF-8, a link to a folder
/// above it. The first two are passed over and counted, the third read, the loop not followed
/// again; a FIFO named in `paths` is refused by name.
#[test]
fn fifos_dangling_links_and_non_utf8_names_in_a_source_folder() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d, "a.txt", "an ordinary document");
    let fifo = d.join("in").join("pipe.txt");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    std::os::unix::fs::symlink(d.join("in").join("gone.md"), d.join("in").join(".#lock.md"))
        .expect("symlink");
    // A link back up the tree (its folder's files are read once; the run failed with a bare
    // "file system loop").
    std::fs::create_dir(d.join("in").join("sub")).expect("mkdir");
    std::os::unix::fs::symlink("..", d.join("in").join("sub").join("up")).expect("symlink");
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    std::fs::write(d.join("in").join(latin1), "a file whose name is Latin-1").expect("write");

    // On another thread: a read of the FIFO would never return.
    let run = |extra: &'static str, paths: &'static str| {
        let d = d.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let yaml = format!(
                "output: out\nsources:\n  - name: dom\n    role: domain\n    weight: 1\n    paths: {paths}\n{extra}"
            );
            let mut spec: CorpusSpec = serde_yaml::from_str(&yaml).expect("spec");
            spec.resolve_paths(&d);
            let _ = tx.send(prepare(
                &spec,
                None,
                &PrepareOptions {
                    force: true,
                    ..Default::default()
                },
            ));
        });
        rx.recv_timeout(std::time::Duration::from_secs(120))
            .expect("prepare returned (a FIFO was not read)")
    };
    for paths in ["[in]", "[\"in/*.txt\", \"in/*.md\"]"] {
        let report = match run("", paths).expect("prepared") {
            PrepareOutcome::Prepared { report, .. } => report,
            PrepareOutcome::UpToDate { .. } => panic!("forced"),
        };
        // The glob crate cannot match names that are not UTF-8 (docs/corpus.md says so): such a
        // file is counted with the skipped ones.
        let latin1_doc = (paths == "[in]").then_some("a file whose name is Latin-1<|endoftext|>");
        let expected: Vec<&str> = latin1_doc
            .into_iter()
            .chain(["an ordinary document<|endoftext|>"])
            .collect();
        assert_eq!(texts(&d.join("out")), expected, "{paths}");
        let skipped = if paths == "[in]" { 2 } else { 3 };
        assert_eq!(report.sources[0].skipped_files, skipped, "{paths}");
    }
    let err = run("", "[in/a.txt, in/pipe.txt]").expect_err("refused");
    assert!(
        err.to_string().contains("pipe.txt") && err.to_string().contains("not a regular file"),
        "{err}"
    );
}

/// A document far longer than one encoding piece is stored with the ids of the whole text,
/// for a SentencePiece-style tokenizer (which prepends `▁` to a sequence's start) as for
/// byte-level BPE (the unit tests of `tokenizer.rs`).
#[test]
fn a_long_document_is_stored_with_the_ids_of_the_whole_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tok = d.join("tok.json");
    llama2_style_tokenizer(&tok);
    let text: String = (0..60_000)
        .map(|i| match i % 4 {
            0 => format!("line {i} of a long book\n"),
            1 => "  indented, then a blank line\n\n".to_owned(),
            2 => format!("<s> and </s> spelled in text {i}\n"),
            _ => "Next: a_b.c,d|e/f\n".to_owned(),
        })
        .collect();
    let text = text.trim().to_owned();
    assert!(text.len() > (1 << 20));
    write(d, "book.txt", &text);
    prepared(&spec(
        d,
        &format!("tokenizer: {}\nadd_bos: false\n", tok.display()),
        "",
    ));
    let stored = stored(&d.join("out"));
    assert_eq!(stored.len(), 1);
    let mut whole = Tokenizer::from_file(&tok).expect("tokenizer");
    whole.set_encode_special_tokens(true);
    let mut expected = whole
        .encode_fast(text.as_str(), false)
        .expect("encode")
        .get_ids()
        .to_vec();
    expected.push(2); // </s>
    assert_eq!(stored[0].0.len(), expected.len());
    assert!(
        stored[0].0 == expected,
        "the stored ids differ from the whole text's"
    );
}

/// A byte-fallback tokenizer whose `<0xNN>` pieces are flagged special (the common `tokenizers`
/// training recipe that lists them in `special_tokens`) encodes a character outside its
/// vocabulary as those pieces: ordinary text, stored and decoded back. Before, one such
/// character refused the whole corpus ("encodes ordinary text as the special token <0xC3>"),
/// naming no document. A tokenizer that really does turn text into a control token is still
/// refused, now naming the document's file and line.
#[test]
fn byte_fallback_pieces_flagged_special_are_text_and_a_real_control_token_names_its_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tok = d.join("tok.json");
    llama2_style_tokenizer(&tok);
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    edit_tokenizer(&tok, |t| {
        let added = t["added_tokens"].as_array_mut().expect("added tokens");
        added.extend((0..=255u32).map(|b| special(3 + b, &format!("<0x{b:02X}>"))));
    });
    write(
        d,
        "a.jsonl",
        "{\"text\": \"plain words\"}\n{\"text\": \"caf\\u00e9 and sun \\ud83c\\udf1e, quite\"}\n",
    );
    let head = format!("tokenizer: {}\n", tok.display());
    prepared(&spec(d, &head, ""));
    let docs = stored(&d.join("out"));
    let cafe = docs
        .iter()
        .find(|(_, t)| t.contains("caf"))
        .expect("the document with bytes outside the vocabulary");
    // This tokenizer's decoder shows byte pieces as they are (it has no ByteFallback step).
    assert!(
        cafe.1
            .contains("caf<0xC3><0xA9> and sun <0xF0><0x9F><0x8C><0x9E>, quite"),
        "{:?}",
        cafe.1
    );

    // `q` made a special token of its own id: the model itself emits it for ordinary text.
    let tok2 = d.join("tok2.json");
    llama2_style_tokenizer(&tok2);
    edit_tokenizer(&tok2, |t| {
        let q = t["model"]["vocab"]["q"].as_u64().expect("q") as u32;
        t["added_tokens"]
            .as_array_mut()
            .expect("added tokens")
            .push(special(q, "q"));
    });
    let out2 = d.join("out2");
    let mut spec2 = spec(d, &format!("tokenizer: {}\n", tok2.display()), "");
    spec2.output = out2;
    let err = prepare(&spec2, None, &PrepareOptions::default())
        .expect_err("a control token inside a document")
        .to_string();
    assert!(
        err.contains("tok2.json") && err.contains("`q`") && err.contains("a.jsonl:2"),
        "{err}"
    );
}

/// A JSONL record whose text holds half of a surrogate pair as an escape (`\ud83d` alone: an
/// emoji cut before `json.dumps`, common in scraped data) keeps its text with U+FFFD there, and
/// its file counts as lossy; a valid pair and an escaped backslash before `u` stay as they
/// are. Before, serde_json refused the line and the whole record was dropped as "not a JSON
/// object with a string `text` field".
#[test]
fn a_lone_surrogate_escape_is_a_replacement_character_not_a_lost_record() {
    jsonl_read_as(
        concat!(
            "{\"text\": \"whole emoji \\ud83c\\udf1e here\"}\n",
            "{\"text\": \"half emoji \\ud83d then more text\", \"id\": 2}\n",
            "{\"text\": \"a low half \\udc00 and a path C:\\\\ud83d\"}\n",
        ),
        (0, 1),
        &[
            "whole emoji 🌞 here<|endoftext|>",
            "half emoji \u{FFFD} then more text<|endoftext|>",
            "a low half \u{FFFD} and a path C:\\ud83d<|endoftext|>",
        ],
    );
}

/// Prepares one JSONL file of `records` and checks the source's `(bad_jsonl_lines,
/// lossy_files)` and that every one of `kept` is a stored document.
fn jsonl_read_as(records: &str, bad_and_lossy: (u64, u64), kept: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "a.jsonl", records);
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let row = &report.sources[0];
    assert_eq!(
        (row.bad_jsonl_lines, row.lossy_files),
        bad_and_lossy,
        "{report:?}"
    );
    let got = texts(&d.join("out"));
    for text in kept {
        assert!(got.contains(&(*text).to_owned()), "{text:?} not in {got:?}");
    }
}

/// Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` for such floats (a crawl's
/// score field): the record's text is kept (before, 6 of 12 records were dropped as "not a
/// JSON object with a string `text` field"); the same words inside a string stay as written,
/// and a record whose text is itself NaN is still a bad line.
#[test]
fn python_json_constants_in_other_fields_keep_the_record() {
    jsonl_read_as(
        concat!(
            "{\"text\": \"scored NaN times\", \"score\": NaN}\n",
            "{\"score\": -Infinity, \"text\": \"Infinity and \\\"NaN\\\" in text\"}\n",
            "{\"text\": \"plain\", \"s\": [Infinity, 1.5]}\n",
            "{\"text\": NaN}\n",
        ),
        (1, 0),
        &[
            "scored NaN times<|endoftext|>",
            "Infinity and \"NaN\" in text<|endoftext|>",
            "plain<|endoftext|>",
        ],
    );
}

/// An XHTML chapter with one bare `&` is not XML: read as HTML (its `<iframe/>` no longer
/// swallowing the rest), and named in a warning with the XML error (before: two of three
/// paragraphs lost, nothing said; an audit).
#[test]
fn xhtml_that_is_not_xml_is_read_whole_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "ch1.xhtml",
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><html xmlns=\"http://www.w3.org/1999/xhtml\">\
         <body><p>Chapter one: AT&T history.</p><iframe src=\"a.html\"/><p>Second \
         paragraph.</p><p>Third paragraph.</p></body></html>",
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let got = texts(&d.join("out"));
    assert_eq!(
        got,
        ["Chapter one: AT&T history.\nSecond paragraph.\nThird paragraph.<|endoftext|>"],
        "{report:?}"
    );
    let warning = report
        .warnings
        .iter()
        .find(|w| w.contains("not well-formed XML"))
        .expect("a warning");
    assert!(warning.contains("ch1.xhtml ("), "{warning}");
    assert_eq!(report.sources[0].not_xml_files, 1);
}

/// A glob matches only UTF-8 names: `in/*.txt` passed over `caf\xe9.txt` (a Latin-1 file name
/// from an old archive) with `skipped_files: 0` (an audit). Now counted and named with the
/// skipped files; a folder in `paths` reads it.
#[test]
fn a_name_a_glob_cannot_match_is_named_not_passed_over() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "plain.txt", "an ordinary file");
    let odd = d
        .join("in")
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    std::fs::write(&odd, "a Latin-1 name").expect("write");
    let mut spec = spec(d, "vocab_size: 300\n", "");
    spec.sources.0[0].paths = vec![format!("{}/in/*.txt", d.display())];
    spec.sources.0[0].literal.clear();
    let report = prepared(&spec);
    assert_eq!(report.sources[0].skipped_files, 1, "{report:?}");
    let warning = report
        .warnings
        .iter()
        .find(|w| w.contains("not UTF-8"))
        .expect("a warning");
    assert!(warning.contains("caf\u{FFFD}.txt"), "{warning}");
    // Named by its folder, it is read.
    let report = prepared(&self::spec(d, "vocab_size: 301\n", ""));
    assert_eq!(report.sources[0].skipped_files, 0, "{report:?}");
    assert!(texts(&d.join("out")).contains(&"a Latin-1 name<|endoftext|>".to_owned()));
    // A glob that matches only such names says so (it said "matches no file"), also in a job
    // folder whose name has glob characters (escaped in the pattern).
    let odd_folder = d.join("p[v2]").join("in");
    std::fs::create_dir_all(&odd_folder).expect("mkdir");
    std::fs::write(
        odd_folder.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")),
        "x",
    )
    .expect("write");
    let mut spec = self::spec(&d.join("p[v2]"), "vocab_size: 300\n", "");
    spec.sources.0[0].paths = vec![format!(
        "{}/in/*.txt",
        glob::Pattern::escape(&d.join("p[v2]").display().to_string())
    )];
    spec.sources.0[0].literal.clear();
    let err = prepare(&spec, None, &PrepareOptions::default())
        .expect_err("only unmatchable names")
        .to_string();
    assert!(err.contains("not UTF-8") && err.contains("caf"), "{err}");
}

/// Documents with no text once extracted are left out and named in a warning (before: a count
/// in report.json only, so a page whose text the extractor lost went unseen).
#[test]
fn empty_documents_are_named_in_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "a.jsonl",
        "{\"text\": \"words\"}\n{\"text\": \"  \"}\n{\"text\": \"more words\"}\n",
    );
    write(
        d,
        "b.html",
        "<html><head><title>T</title></head><body><nav>x</nav></body></html>",
    );
    let report = prepared(&spec(d, "vocab_size: 300\n", ""));
    let row = &report.sources[0];
    assert_eq!(row.empty_documents, 2, "{report:?}");
    let warning = report
        .warnings
        .iter()
        .find(|w| w.contains("no text once extracted"))
        .expect("a warning");
    assert!(
        warning.contains("a.jsonl:2") && warning.contains("b.html"),
        "{warning}"
    );
}
