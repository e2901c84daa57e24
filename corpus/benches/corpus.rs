//! Corpus benchmark: `prepare` throughput against the `tokenizers` crate's own batch encoding
//! of the same text (the ceiling), and sample reads from the page cache.
//!
//! ```text
//! examples/fetch-data.sh data/raw                  # PostgreSQL 15 docs + State of the Union
//! cargo bench -p dapt-corpus --bench corpus        # or: ... -- DATA_DIR [REPEATS]
//! ```
//!
//! It measures and prints; it asserts nothing about speed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dapt_corpus::ingest;
use dapt_corpus::manifest::TOKENIZER_FILE;
use dapt_corpus::tokenizer::CorpusTokenizer;
use dapt_corpus::{prepare, CorpusReader, CorpusSpec, PrepareOptions, PrepareOutcome};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let data = PathBuf::from(args.first().cloned().unwrap_or_else(|| "data/raw".into()));
    let data = if data.is_relative() && !data.exists() {
        // `cargo bench` runs in the crate directory; the data lives at the workspace root.
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&data)
    } else {
        data
    };
    let repeats: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    if !data.join("postgres-15-html").is_dir() || !data.join("sotu").is_dir() {
        eprintln!(
            "no corpora under {}: run `examples/fetch-data.sh data/raw` first",
            data.display()
        );
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    println!(
        "machine: {} threads (rayon), data: {}",
        rayon::current_num_threads(),
        data.display()
    );

    // 1. Train the tokenizer once (this is `prepare` without a tokenizer), then reuse it so the
    //    timed runs compare like with like.
    let spec_yaml = |tokenizer: &str, out: &Path| {
        format!(
            "output: {}\n{tokenizer}vocab_size: 16384\nsources:\n  - name: postgres\n    role: domain\n    paths: [\"{}/postgres-15-html/*.html\"]\n    weight: 3\n    held_out: 0.05\n  - name: sotu\n    role: replay\n    paths: [\"{}/sotu/*.txt\"]\n    weight: 1\n    held_out: 0.05\n",
            out.display(),
            data.display(),
            data.display()
        )
    };
    let first: CorpusSpec =
        serde_yaml::from_str(&spec_yaml("", &work.path().join("trained"))).expect("spec");
    let t0 = Instant::now();
    let PrepareOutcome::Prepared { stats, .. } =
        prepare(&first, None, &PrepareOptions::default()).expect("prepare")
    else {
        panic!("fresh directory")
    };
    println!(
        "prepare with tokenizer training (vocab 16384): {:.2} s total, {:.2} s training, {:.1} MB input",
        t0.elapsed().as_secs_f64(),
        stats.tokenizer_training.as_secs_f64(),
        stats.input_bytes as f64 / 1e6
    );
    let tokenizer_path = work.path().join("tokenizer.json");
    std::fs::copy(
        work.path().join("trained").join(TOKENIZER_FILE),
        &tokenizer_path,
    )
    .expect("copy tokenizer");

    // 2. The ceiling: the same documents, already extracted and normalized in memory, through
    //    the tokenizers crate's parallel batch encoding.
    let tk = CorpusTokenizer::load(&tokenizer_path, &Default::default()).expect("tokenizer");
    let mut texts = Vec::new();
    let mut raw_bytes = 0u64;
    for source in first.sources() {
        for file in ingest::discover(source).expect("discover").files {
            let text = ingest::read_file(
                &file,
                "text",
                encoding_rs::UTF_8,
                dapt_corpus::spec::DEFAULT_MAX_FILE_BYTES,
            )
            .expect("read");
            raw_bytes += text.bytes;
            texts.extend(
                text.documents
                    .iter()
                    .map(|d| dapt_corpus::prepare::normalize(d)),
            );
        }
    }
    // 3. `prepare` end to end (read, parse HTML, NFC, dedup, split, tokenize, count words, write
    //    and hash shards) with the tokenizer given. The two alternate, so that whatever else
    //    the machine does falls on both alike.
    let given = format!("tokenizer: {}\n", tokenizer_path.display());
    let spec: CorpusSpec =
        serde_yaml::from_str(&spec_yaml(&given, &work.path().join("given"))).expect("spec");
    let mut ceiling = Vec::new();
    let mut ceiling_tokens = 0;
    let mut runs = Vec::new();
    let mut prepared_tokens = 0;
    for _ in 0..repeats {
        let batch: Vec<&str> = texts.iter().map(String::as_str).collect();
        let t = Instant::now();
        let ids = tk
            .tokenizer
            .encode_batch_fast(batch, false)
            .expect("encode");
        ceiling.push(t.elapsed());
        ceiling_tokens = ids.iter().map(|e| e.get_ids().len() as u64).sum::<u64>();
        drop(ids);

        let options = PrepareOptions {
            force: true,
            progress: false,
            ..PrepareOptions::default()
        };
        let PrepareOutcome::Prepared { stats, .. } =
            prepare(&spec, None, &options).expect("prepare")
        else {
            panic!("forced")
        };
        runs.push(stats.elapsed);
        prepared_tokens = stats.tokens;
    }
    let (c, p) = (median(&mut ceiling), median(&mut runs));
    let mb = raw_bytes as f64 / 1e6;
    println!("| what | median of {repeats} | MB/s raw text | tokens/s |");
    println!("|---|---|---|---|");
    println!(
        "| tokenizers encode_batch_fast (ceiling) | {:.2} s | {:.2} | {:.0} |",
        c.as_secs_f64(),
        mb / c.as_secs_f64(),
        ceiling_tokens as f64 / c.as_secs_f64()
    );
    println!(
        "| dapt prepare, tokenizer given | {:.2} s | {:.2} | {:.0} |",
        p.as_secs_f64(),
        mb / p.as_secs_f64(),
        prepared_tokens as f64 / p.as_secs_f64()
    );
    println!(
        "prepare / ceiling = {:.2} (tokens: prepare {prepared_tokens} incl. one EOS per document, ceiling {ceiling_tokens})",
        c.as_secs_f64() / p.as_secs_f64()
    );

    // 4. Sample reads in the global order: from the prepared corpus (small enough to sit in
    //    the CPU caches), then from a synthetic 1 GiB corpus that only the page cache can hold.
    let reader = CorpusReader::open(&work.path().join("given")).expect("open");
    sample_reads("prepared corpus", &reader, repeats);
    let synthetic = synthetic_corpus(work.path(), &tokenizer_path, 512 << 20);
    let t = Instant::now();
    let reader = CorpusReader::open_with(&synthetic, true).expect("open synthetic");
    println!(
        "verifying 1 GiB of shards on open (full SHA-256): {:.2} s; cached re-open: {:.3} s",
        t.elapsed().as_secs_f64(),
        {
            let t = Instant::now();
            CorpusReader::open(&synthetic).expect("reopen");
            t.elapsed().as_secs_f64()
        }
    );
    sample_reads("synthetic 1 GiB corpus", &reader, repeats);
}

fn sample_reads(what: &str, reader: &CorpusReader, repeats: usize) {
    let dtype_bytes = reader.manifest().token_dtype.bytes() as f64;
    for seq_len in [256u32, 2048] {
        let order = reader.sample_order(1234, seq_len).expect("order");
        let mut buf = vec![0u32; seq_len as usize + 1];
        let samples = (256 << 20) / (seq_len as u64 * 2); // ~256 MB of u16 tokens per pass
        let mut best = Duration::MAX;
        let mut checksum = 0u64;
        for _ in 0..repeats.max(2) {
            let t = Instant::now();
            for g in 0..samples {
                reader
                    .read_sample(order.sample(g), seq_len, &mut buf)
                    .expect("ids in range");
                checksum = checksum.wrapping_add(buf[0] as u64);
            }
            best = best.min(t.elapsed());
        }
        let tokens = samples as f64 * (seq_len as f64 + 1.0);
        println!(
            "sample reads, {what}, seq_len {seq_len}: {:.0} samples/s, {:.2} GB/s of token data ({:.2} GB/s as u32 out) [checksum {checksum}]",
            samples as f64 / best.as_secs_f64(),
            tokens * dtype_bytes / best.as_secs_f64() / 1e9,
            tokens * 4.0 / best.as_secs_f64() / 1e9,
        );
    }
}

/// A one-source corpus of `tokens` pseudo-random u16 tokens, written with the real shard writer.
fn synthetic_corpus(work: &Path, tokenizer: &Path, tokens: u64) -> PathBuf {
    use dapt_corpus::manifest::{
        self, Manifest, SourceManifest, StreamManifest, TokenDtype, TokenizerInfo,
    };
    use dapt_corpus::shards::StreamWriter;
    let dir = work.join("synthetic");
    std::fs::create_dir_all(dir.join("syn")).expect("mkdir");
    std::fs::copy(tokenizer, dir.join(TOKENIZER_FILE)).expect("copy");
    let mut writer = StreamWriter::new(&dir, "syn/train".into(), TokenDtype::U16, 64 << 20);
    let mut x = 0x1234_5678u32;
    let doc: Vec<u32> = (0..2047)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % 16384
        })
        .collect();
    for _ in 0..tokens / 2048 {
        writer.push_document(&doc, 0).expect("write");
    }
    let train = writer.finish().expect("finish");
    let m = Manifest {
        format_version: manifest::FORMAT_VERSION,
        created_by: "corpus bench".into(),
        inputs_fingerprint: "synthetic".into(),
        text_rules: dapt_corpus::prepare::TEXT_RULES,
        inputs_only_fingerprint: None,
        tokenizer: TokenizerInfo {
            file: TOKENIZER_FILE.into(),
            sha256: dapt_corpus::tokenizer::sha256_file(&dir.join(TOKENIZER_FILE)).expect("sha"),
            vocab_size: 16384,
            eos_token: "<|endoftext|>".into(),
            eos_id: 0,
            bos_token: None,
            bos_id: None,
            trained: true,
        },
        token_dtype: TokenDtype::U16,
        sources: vec![SourceManifest {
            name: "syn".into(),
            role: dapt_corpus::Role::Domain,
            weight: 1.0,
            held_out_fraction: 0.0,
            train,
            held_out: StreamManifest::default(),
        }],
    };
    manifest::write_atomic(
        &dir.join(manifest::MANIFEST_FILE),
        &serde_json::to_vec(&m).expect("json"),
    )
    .expect("manifest");
    dir
}

fn median(xs: &mut [Duration]) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}
