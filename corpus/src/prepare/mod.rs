//! `dapt prepare`: sources in, verified token shards, manifest and report out.
//!
//! Everything is written into a staging directory inside the output and moved into place only
//! when complete ([`output`]), so a failed or interrupted run leaves the previous corpus (or
//! nothing) behind, never a half-written shard. A run whose inputs (spec, tokenizer, every
//! file's path, size and mtime) match the existing manifest does nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed};

use crate::error::{CorpusError, Result};
use crate::ingest::{self, Discovery, InputFile};
use crate::manifest::{
    self, Manifest, SourceManifest, TokenDtype, TokenizerInfo, VerifyMode, FORMAT_VERSION,
};
use crate::report::{self, Report, SourceStats, WordCounts};
use crate::shards::StreamWriter;
use crate::spec::{CorpusSpec, Role, SourceSpec, TrainingPlan};
use crate::tokenizer::{self, CorpusTokenizer, TokenizerOptions};

mod output;
mod progress;
use progress::Progress;

/// Raw bytes read before a chunk of documents is normalized and tokenized together.
const CHUNK_BYTES: u64 = 8 << 20;
/// Seed of the held-out split hash: changing it would move documents between splits.
const SPLIT_SEED: u64 = 0x6461_7074_5f68_656c; // "dapt_hel"
/// Bumped whenever the same inputs would give other tokens (decoding, normalization, special
/// tokens, BOS), so that a corpus prepared under older rules is rebuilt, not trusted.
/// 3: UTF-32 BOMs, U+FEFF removed from documents, a `<meta>` later in the head, tokenizer
/// truncation/padding not applied, control-shaped added tokens split, BOS = EOS, template EOS.
/// 4: HTML laid out as browsers show it (spaces between inline elements, hidden elements,
/// preformatted text), XHTML read as XML, JSONL line ends and Python's constants, a config's
/// EOS and pad token.
/// 5: the first line's indentation kept (only leading blank lines trimmed); what browsers'
/// default style sheet hides skipped (a closed `dialog`, `title`, `rp`, MathML annotations);
/// binary data without magic bytes refused; JSONL records read past serde_json's `Value` limits;
/// `add_bos_token` applied only for the tokenizer classes transformers applies it for, a chat
/// turn's end never a document end, BPE dropout not applied.
/// 6: UTF-8 under a stale legacy declaration read as UTF-8 with a few bad bytes too, and under
/// multi-byte declarations (Shift_JIS, GBK, Big5, EUC-KR, EUC-JP); XHTML found past a prolog of
/// any length, its XML declaration after leading whitespace; a late `<meta>` in an implied head;
/// XHTML's numeric references to C1 controls read as HTML reads them.
/// 7: CJK compatibility ideographs kept as written ([`normalize`]).
pub const TEXT_RULES: u32 = 7;

#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Rebuild even when the inputs did not change.
    pub force: bool,
    /// Show a progress bar (when stderr is a terminal) or periodic log lines.
    pub progress: bool,
    /// How an existing corpus made from the same inputs is checked before it is trusted.
    pub verify: VerifyMode,
    /// A corpus not to replace with one of other content: a job's checkpoints were trained on
    /// it (`dapt launch` resuming).
    pub keep: Option<KeepCorpus>,
}

/// The corpus a job's committed checkpoint (else its newest) was trained on, which `dapt launch`
/// asks prepare not to replace with another: a new corpus would make the checkpoint
/// unresumable, and the old one can only be rebuilt from the exact old inputs. (A rebuild of
/// the same content is published.)
#[derive(Debug, Clone)]
pub struct KeepCorpus {
    /// [`Manifest::content_digest`] of that corpus, as the checkpoint records it.
    pub digest: String,
    /// The checkpoint, for the message.
    pub checkpoint: PathBuf,
}

#[derive(Debug)]
pub enum PrepareOutcome {
    /// The corpus at `dir` was made from these very inputs; nothing was done.
    UpToDate { dir: PathBuf, manifest: Manifest },
    Prepared {
        dir: PathBuf,
        manifest: Manifest,
        report: Box<Report>,
        stats: RunStats,
    },
}

/// How the run went, for throughput numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub elapsed: Duration,
    pub tokenizer_training: Duration,
    /// Raw input bytes after decompression.
    pub input_bytes: u64,
    pub tokens: u64,
}

/// Prepares the corpus described by `spec` (paths already resolved).
pub fn prepare(
    spec: &CorpusSpec,
    plan: Option<TrainingPlan>,
    options: &PrepareOptions,
) -> Result<PrepareOutcome> {
    let started = Instant::now();
    let discoveries = spec
        .sources()
        .iter()
        .map(ingest::discover)
        .collect::<Result<Vec<_>>>()?;
    let given_tokenizer = match &spec.tokenizer {
        // Named as the job's field (a bare "No such file or directory" named only the path; a
        // new user's walk-through).
        Some(path) if !path.exists() => {
            return Err(CorpusError::Tokenizer {
                path: path.clone(),
                message: "no such file (corpus.tokenizer): name a Hugging Face tokenizer.json, \
                          or a model's folder holding one"
                    .into(),
            })
        }
        Some(path) => {
            // A tokenizer_config.json beside it can decide the BOS: its bytes are an input too.
            let config = path.with_file_name(tokenizer::HF_TOKENIZER_CONFIG);
            let mut sha = tokenizer::sha256_file(path)?;
            // (`exists`: a FIFO or a device there is refused by the hash, not passed over to
            // block or fill memory when the config is read.)
            if config.exists() {
                sha = format!("{sha}+{}", tokenizer::sha256_file(&config)?);
                // ... and so can the model's tokenizer class, from config.json beside it, when
                // the tokenizer config names none.
                if let Some(class) = tokenizer::class_of_model(&path.with_file_name("config.json"))
                {
                    sha = format!("{sha}+{class}");
                }
            }
            Some((path.clone(), sha))
        }
        None => None,
    };
    let tokenizer_sha = given_tokenizer.as_ref().map(|t| t.1.as_str());
    let fingerprint = fingerprint(spec, tokenizer_sha, &discoveries, TEXT_RULES);
    let out = spec.output.clone();
    // Before any work: an output that is not ours is refused, never replaced, and one that
    // another run is preparing is refused too. Held until the end (declared before the staging
    // directory, so dropped after it).
    let claim = output::Claim::new(&out)?;
    if !options.force {
        if let Some(manifest) = up_to_date(&out, &fingerprint, options.verify) {
            return Ok(PrepareOutcome::UpToDate { dir: out, manifest });
        }
        // Resuming on a corpus made from these very inputs under older text rules: kept (a new
        // one would hold other tokens, and the checkpoints need this one), and said.
        if let Some(keep) = &options.keep {
            let inputs_only = inputs_fingerprint(spec, tokenizer_sha, &discoveries);
            let older = Manifest::read(&out).ok().filter(|m| {
                let same_inputs = match &m.inputs_only_fingerprint {
                    Some(recorded) => *recorded == inputs_only,
                    // (Recorded since rules 4: older corpora by the whole fingerprint, as that
                    // dapt made it.)
                    None => {
                        m.inputs_fingerprint
                            == self::fingerprint(spec, tokenizer_sha, &discoveries, m.text_rules)
                    }
                };
                m.text_rules != TEXT_RULES && m.content_digest() == keep.digest && same_inputs
            });
            if let Some(older) = older {
                if let Some(manifest) = up_to_date(&out, &older.inputs_fingerprint, options.verify)
                {
                    tracing::warn!(
                        corpus = %out.display(),
                        checkpoint = %keep.checkpoint.display(),
                        rules = manifest.text_rules,
                        current = TEXT_RULES,
                        "the corpus was prepared by an older dapt, under older text rules; kept, \
                         as the job's checkpoints were trained on it (`dapt prepare` makes it \
                         again under the current rules, for a new job)"
                    );
                    return Ok(PrepareOutcome::UpToDate { dir: out, manifest });
                }
            }
        }
    }

    // A job or an evaluation reading the corpus would have it change under it: refused before
    // any work (and again when publishing, for a reader that came meanwhile).
    drop(crate::readers::no_readers(&out, false)?);
    let staging = claim.staging()?;

    // The tokenizer: given (copied beside the shards) or trained on the training documents.
    // Errors name the user's file, never the staging copy (which is gone by then).
    let tokenizer_path = staging.path().join(manifest::TOKENIZER_FILE);
    let tokenizer_options = TokenizerOptions::from(spec);
    let mut tokenizer_training = Duration::ZERO;
    let trained = given_tokenizer.is_none();
    let tk = match &given_tokenizer {
        Some((path, _)) => {
            output::copy_file(path, &tokenizer_path)?;
            CorpusTokenizer::load(path, &tokenizer_options)?
        }
        None => {
            let t0 = Instant::now();
            tracing::info!(
                vocab_size = spec.vocab_size.get(),
                "training byte-level bpe tokenizer"
            );
            let mut read_error = None;
            let texts = TrainingTexts::new(spec, &discoveries, options, &mut read_error);
            let trained = tokenizer::train_byte_level_bpe(texts, spec.vocab_size.get());
            if let Some(e) = read_error {
                return Err(e);
            }
            let trained = trained?;
            trained
                .save(&tokenizer_path, false)
                .map_err(|e| CorpusError::Tokenizer {
                    path: tokenizer_path.clone(),
                    message: e.to_string(),
                })?;
            tokenizer_training = t0.elapsed();
            CorpusTokenizer::new(
                trained,
                Path::new("(trained by dapt prepare)"),
                &tokenizer_options,
            )?
        }
    };
    let dtype = TokenDtype::for_vocab(tk.vocab_size);

    let total_bytes: u64 = discoveries
        .iter()
        .flat_map(|d| &d.files)
        .map(|f| f.size)
        .sum();
    let mut progress = Progress::new(options.progress, total_bytes, "tokenizing");
    let mut dedup = HashSet::new();
    let mut sources = Vec::new();
    let mut stats = Vec::new();
    let mut words = WordCounts::default();
    for (source, discovery) in spec.sources().iter().zip(&discoveries) {
        std::fs::create_dir_all(staging.path().join(source.name.as_str()))
            .map_err(CorpusError::io(staging.path()))?;
        let mut train = StreamWriter::new(
            staging.path(),
            format!("{}/train", source.name),
            dtype,
            spec.shard_tokens.get(),
        );
        let mut held_out = StreamWriter::new(
            staging.path(),
            format!("{}/heldout", source.name),
            dtype,
            spec.shard_tokens.get(),
        );
        let mut st = SourceStats::new(source, discovery);
        for chunk in chunks(&discovery.files) {
            let docs = read_chunk(
                source,
                chunk,
                Some(&tk),
                spec.max_file_bytes,
                &mut dedup,
                &mut st,
            )?;
            progress.advance(chunk.iter().map(|f| f.size).sum());
            let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
            let role_words = match source.role {
                Role::Domain => &mut words.domain,
                Role::Replay => &mut words.replay,
            };
            let (ids, chunk_words) = rayon::join(
                || tk.encode_batch(texts),
                || {
                    report::count_words(
                        docs.iter().filter(|d| !d.held_out).map(|d| d.text.as_str()),
                    )
                },
            );
            report::merge_words(role_words, chunk_words);
            let ids = ids.map_err(|e| match e {
                CorpusError::TokenizerOnText {
                    path,
                    text,
                    message,
                } => CorpusError::Tokenizer {
                    path,
                    message: format!(
                        "{message}; in document {}",
                        docs.get(text).map_or_else(String::new, |d| {
                            let file = chunk[d.file].path.display();
                            match d.line {
                                Some(line) => format!("{file}:{line}"),
                                None => file.to_string(),
                            }
                        })
                    ),
                },
                e => e,
            })?;
            for (doc, ids) in docs.iter().zip(ids) {
                // Documents are never empty here: a text that encodes to nothing is one the
                // tokenizer's vocabulary cannot represent (junk a normalizer strips, or every
                // document under an empty vocabulary): skipped and counted.
                if ids.is_empty() {
                    st.without_tokens += 1;
                    continue;
                }
                let unknown = tk.unknown_count(&ids);
                if unknown > 0 {
                    st.add_unknown(&chunk[doc.file].path, doc.line, unknown);
                }
                let ids = tk.with_bos(ids);
                st.add_document(
                    doc.text.len() as u64,
                    doc.words,
                    ids.len() as u64 + 1,
                    doc.held_out,
                );
                let writer = if doc.held_out {
                    &mut held_out
                } else {
                    &mut train
                };
                writer.push_document(&ids, tk.eos_id)?;
            }
        }
        if st.documents() == 0 && st.without_tokens > 0 {
            return Err(CorpusError::Tokenizer {
                path: tk.origin().to_path_buf(),
                message: format!(
                    "encodes every document of source `{}` ({}) to no tokens at all: its \
                     vocabulary cannot represent the corpus's text",
                    source.name, st.without_tokens
                ),
            });
        }
        if st.documents() == 0 {
            // Say what was passed over: a JSONL source keyed `content` instead of `text` has
            // every line skipped.
            let mut passed_over = String::new();
            if st.bad_jsonl_lines > 0 {
                passed_over = format!("; {}", st.bad_jsonl_summary());
            }
            if st.skipped_files > 0 {
                passed_over += &format!(
                    "; {} files of unsupported types were passed over, e.g. {}",
                    st.skipped_files,
                    st.skipped_examples.join(", ")
                );
            }
            return Err(CorpusError::EmptySource {
                source_name: source.name.to_string(),
                duplicates: st.duplicates,
                empty: st.empty,
                passed_over,
            });
        }
        sources.push(SourceManifest {
            name: source.name.to_string(),
            role: source.role,
            weight: source.weight.get(),
            held_out_fraction: source.held_out.get(),
            train: train.finish()?,
            held_out: held_out.finish()?,
        });
        stats.push(st);
    }
    progress.finish();

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_by: format!("dapt {}", env!("CARGO_PKG_VERSION")),
        inputs_fingerprint: fingerprint,
        text_rules: TEXT_RULES,
        inputs_only_fingerprint: Some(inputs_fingerprint(
            spec,
            given_tokenizer.as_ref().map(|t| t.1.as_str()),
            &discoveries,
        )),
        tokenizer: TokenizerInfo {
            file: manifest::TOKENIZER_FILE.to_owned(),
            sha256: tokenizer::sha256_file(&tokenizer_path)?,
            vocab_size: tk.vocab_size,
            eos_token: tk.eos_token.clone(),
            eos_id: tk.eos_id,
            bos_token: tk.bos.as_ref().map(|b| b.0.clone()),
            bos_id: tk.bos.as_ref().map(|b| b.1),
            trained,
        },
        token_dtype: dtype,
        sources,
    };
    let report = report::build(&manifest, &stats, &words, &tk, plan)?;
    manifest::write_atomic(
        &staging.path().join(manifest::REPORT_FILE),
        &to_json(&report)?,
    )?;
    manifest::write_atomic(
        &staging.path().join(manifest::MANIFEST_FILE),
        &to_json(&manifest)?,
    )?;
    // The corpus the job's checkpoints need (`dapt launch` resuming) is replaced only by the
    // same content (inputs restored with new mtimes, or an edit that changes no token): before,
    // launch deleted it and then found the checkpoints unresumable on the new one (an audit).
    // The new corpus is discarded with its staging directory.
    if let Some(keep) = &options.keep {
        if manifest.content_digest() != keep.digest
            && Manifest::read(&out).is_ok_and(|m| m.content_digest() == keep.digest)
        {
            return Err(CorpusError::NeededByCheckpoint {
                output: out,
                checkpoint: keep.checkpoint.clone(),
            });
        }
    }
    {
        let _no_readers = crate::readers::no_readers(&out, true)?;
        claim.publish(staging)?;
    }

    let run = RunStats {
        elapsed: started.elapsed(),
        tokenizer_training,
        input_bytes: stats.iter().map(|s| s.input_bytes).sum(),
        tokens: manifest
            .sources
            .iter()
            .map(|s| s.train.tokens + s.held_out.tokens)
            .sum(),
    };
    Ok(PrepareOutcome::Prepared {
        dir: out,
        manifest,
        report: Box::new(report),
        stats: run,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value)
        .map_err(|e| CorpusError::Invalid(format!("cannot serialize: {e}")))
}

/// A normalized, deduplicated document and its split.
struct Doc {
    text: String,
    /// Whitespace-separated words, for tokens per word.
    words: u64,
    held_out: bool,
    /// Its file's index in the chunk it was read from, and its 1-based line in a JSONL file:
    /// what an error about it names.
    file: usize,
    line: Option<u64>,
}

/// A document after normalization, with its content hash and word count.
struct Normalized {
    text: String,
    hash: u128,
    words: u64,
    /// Its 1-based line in a JSONL file.
    line: Option<u64>,
    /// The first special token its text spells.
    special: Option<String>,
}

/// The text a document is tokenized as: without U+FEFF (a byte order mark that files joined
/// with `cat` or gzip members carry inside the text, or the zero-width no-break space that
/// Unicode deprecated for U+2060), without its leading blank lines and trailing whitespace
/// ([`trim_blank_lines`]), line endings as `\n` (from `\r\n` and lone `\r`, in every format),
/// NFC except for CJK compatibility ideographs ([`nfc_keeping_cjk_compatibility`]).
pub fn normalize(text: &str) -> String {
    let without_bom;
    let text = if text.contains('\u{FEFF}') {
        without_bom = text.replace('\u{FEFF}', "");
        without_bom.as_str()
    } else {
        text
    };
    let text = trim_blank_lines(text);
    if text.contains('\r') {
        nfc_keeping_cjk_compatibility(&text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        nfc_keeping_cjk_compatibility(text)
    }
}

/// A CJK compatibility ideograph: U+F900..U+FAFF or U+2F800..U+2FA1F (Unicode 16, ch. 18.1).
fn is_cjk_compatibility_ideograph(c: char) -> bool {
    matches!(c, '\u{F900}'..='\u{FAFF}' | '\u{2F800}'..='\u{2FA1F}')
}

/// `text` in NFC, but for its CJK compatibility ideographs, kept as written. NFC replaces most
/// of them by their unified ideograph (singleton decompositions: U+F900 豈 becomes U+8C48 豈),
/// which erases what the writer chose: Korean hanja encoded once per reading (KS X 1001) and
/// the variant forms of names in Japanese registers (JIS X 0213), in the very legal and
/// medical records a domain corpus is made of; the tokenizer would then never see, in
/// training, the characters that it meets at inference. (W3C's Character Model for the World
/// Wide Web: String Matching names these singletons as why NFC is not applied to content.)
///
/// The text between two such ideographs is normalized on its own: an ideograph is a starter
/// that nothing composes with, so every other character comes out as whole-text NFC gives it.
fn nfc_keeping_cjk_compatibility(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(is_cjk_compatibility_ideograph) {
        out.extend(rest[..at].nfc());
        let kept = rest[at..].chars().next().expect("a char at a found index");
        out.push(kept);
        rest = &rest[at + kept.len_utf8()..];
    }
    out.extend(rest.nfc());
    out
}

/// `text` without its leading lines of whitespace only and its trailing whitespace: the first
/// line's indentation is text (a `<pre>` listing, YAML, COBOL columns; `trim` took it off the
/// first line only). A text of whitespace only becomes empty.
fn trim_blank_lines(text: &str) -> &str {
    let text = text.trim_end();
    let first = text
        .find(|c: char| !c.is_whitespace())
        .unwrap_or(text.len());
    let line_start = text[..first].rfind(['\n', '\r']).map_or(0, |i| i + 1);
    &text[line_start..]
}

/// Consecutive files of about `CHUNK_BYTES` of text together (a `.gz` file counted by the size
/// its trailer gives: 100 KB of gzip can hold 16 MB of text, all read at once).
fn chunks(files: &[InputFile]) -> Vec<&[InputFile]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, f) in files.iter().enumerate() {
        bytes += ingest::text_bytes_estimate(f);
        if bytes >= CHUNK_BYTES || i + 1 - start >= 4096 {
            out.push(&files[start..=i]);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < files.len() {
        out.push(&files[start..]);
    }
    out
}

/// Reads and normalizes a chunk of files in parallel, then drops empty documents and exact
/// duplicates (first occurrence wins, across all sources) and splits off held-out documents.
/// With a tokenizer, documents that spell one of its special tokens are counted.
fn read_chunk(
    source: &SourceSpec,
    files: &[InputFile],
    tokenizer: Option<&CorpusTokenizer>,
    max_file_bytes: u64,
    seen: &mut HashSet<u128>,
    stats: &mut SourceStats,
) -> Result<Vec<Doc>> {
    let fallback = source.encoding.map_or(encoding_rs::UTF_8, |e| e.get());
    let read: Vec<(usize, ingest::FileText, Vec<Normalized>)> = files
        .par_iter()
        .enumerate()
        .map(|(i, file)| {
            let text = ingest::read_file(file, &source.text_field, fallback, max_file_bytes)?;
            let docs = text
                .documents
                .iter()
                .enumerate()
                .map(|(j, d)| {
                    let normalized = normalize(d);
                    let hash = xxh3_128(normalized.as_bytes());
                    let words = normalized.split_whitespace().count() as u64;
                    let special = tokenizer
                        .and_then(|tk| tk.special_in_text(&normalized))
                        .map(str::to_owned);
                    Normalized {
                        text: normalized,
                        hash,
                        words,
                        line: text.lines.get(j).copied(),
                        special,
                    }
                })
                .collect();
            Ok((i, text, docs))
        })
        .collect::<Result<_>>()?;
    let mut docs = Vec::new();
    for (i, text, normalized) in read {
        stats.add_file(&files[i].path, &text);
        for Normalized {
            text: doc,
            hash,
            words,
            line,
            special,
        } in normalized
        {
            if doc.is_empty() {
                stats.add_empty(&files[i].path, line);
                continue;
            }
            if !seen.insert(hash) {
                stats.duplicates += 1;
                continue;
            }
            if let Some(token) = special {
                stats.add_special_text(&files[i].path, line, &token);
            }
            docs.push(Doc {
                held_out: is_held_out(&doc, source.held_out.get()),
                text: doc,
                words,
                file: i,
                line,
            });
        }
    }
    Ok(docs)
}

/// The held-out split depends on the document's text alone, so it never moves between runs.
fn is_held_out(text: &str, fraction: f64) -> bool {
    fraction > 0.0
        && (xxh3_64_with_seed(text.as_bytes(), SPLIT_SEED) as f64) < fraction * u64::MAX as f64
}

/// Training documents (held-out excluded) for tokenizer training, read lazily chunk by chunk so
/// that memory holds one chunk of text, not the corpus. The first error ends the iteration and
/// waits in `error`.
struct TrainingTexts<'a> {
    sources: &'a [SourceSpec],
    max_file_bytes: u64,
    chunks: Vec<(usize, &'a [InputFile])>,
    next_chunk: usize,
    buffered: std::vec::IntoIter<Doc>,
    seen: HashSet<u128>,
    stats: Vec<SourceStats>,
    progress: Progress,
    error: &'a mut Option<CorpusError>,
}

impl<'a> TrainingTexts<'a> {
    fn new(
        spec: &'a CorpusSpec,
        discoveries: &'a [Discovery],
        options: &PrepareOptions,
        error: &'a mut Option<CorpusError>,
    ) -> Self {
        let total = discoveries
            .iter()
            .flat_map(|d| &d.files)
            .map(|f| f.size)
            .sum();
        TrainingTexts {
            sources: spec.sources(),
            max_file_bytes: spec.max_file_bytes,
            chunks: discoveries
                .iter()
                .enumerate()
                .flat_map(|(i, d)| chunks(&d.files).into_iter().map(move |c| (i, c)))
                .collect(),
            next_chunk: 0,
            buffered: Vec::new().into_iter(),
            seen: HashSet::new(),
            stats: spec
                .sources()
                .iter()
                .zip(discoveries)
                .map(|(s, d)| SourceStats::new(s, d))
                .collect(),
            progress: Progress::new(options.progress, total, "reading for tokenizer training"),
            error,
        }
    }
}

impl Iterator for TrainingTexts<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(doc) = self.buffered.by_ref().find(|d| !d.held_out) {
                return Some(doc.text);
            }
            let &(source, files) = self.chunks.get(self.next_chunk)?;
            self.next_chunk += 1;
            let read = read_chunk(
                &self.sources[source],
                files,
                None,
                self.max_file_bytes,
                &mut self.seen,
                &mut self.stats[source],
            );
            self.progress.advance(files.iter().map(|f| f.size).sum());
            match read {
                Ok(docs) => self.buffered = docs.into_iter(),
                Err(e) => {
                    *self.error = Some(e);
                    self.next_chunk = self.chunks.len();
                    return None;
                }
            }
        }
    }
}

impl Drop for TrainingTexts<'_> {
    fn drop(&mut self) {
        self.progress.finish();
    }
}

fn fingerprint(
    spec: &CorpusSpec,
    tokenizer_sha: Option<&str>,
    discoveries: &[Discovery],
    text_rules: u32,
) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update(text_rules.to_le_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    hash_inputs(&mut h, spec, tokenizer_sha, discoveries);
    hex::encode(h.finalize())
}

/// The inputs' part of [`fingerprint`] alone ([`Manifest::inputs_only_fingerprint`]).
fn inputs_fingerprint(
    spec: &CorpusSpec,
    tokenizer_sha: Option<&str>,
    discoveries: &[Discovery],
) -> String {
    let mut h = Sha256::new();
    hash_inputs(&mut h, spec, tokenizer_sha, discoveries);
    hex::encode(h.finalize())
}

fn hash_inputs(
    h: &mut Sha256,
    spec: &CorpusSpec,
    tokenizer_sha: Option<&str>,
    discoveries: &[Discovery],
) {
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    h.update(tokenizer_sha.unwrap_or("trained").as_bytes());
    for d in discoveries {
        for f in &d.files {
            h.update(f.path.to_string_lossy().as_bytes());
            h.update([0]);
            h.update(f.size.to_le_bytes());
            h.update(f.mtime_ns.to_le_bytes());
        }
        h.update([1]);
    }
}

/// The existing manifest, when it was made from these inputs and its files still verify
/// (every byte hashed again with [`VerifyMode::Full`]; size and mtime trusted for files
/// verified before with [`VerifyMode::Cached`]).
fn up_to_date(out: &Path, fingerprint: &str, verify: VerifyMode) -> Option<Manifest> {
    let manifest = Manifest::read(out).ok()?;
    if manifest.inputs_fingerprint != fingerprint {
        return None;
    }
    match manifest.verify(out, verify == VerifyMode::Full) {
        Ok(_) => Some(manifest),
        Err(e) => {
            tracing::warn!(error = %e, "existing corpus failed verification, rebuilding it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `trim` took the first line's indentation off a `<pre>` listing, YAML or COBOL (an audit):
    /// only blank lines before the text and whitespace after it go.
    #[test]
    fn the_first_lines_indentation_is_kept() {
        assert_eq!(
            normalize("    key: 1\n  other: 2\n"),
            "    key: 1\n  other: 2"
        );
        assert_eq!(
            normalize("\n \t\r\n\n   IDENTIFICATION DIVISION.\r\n"),
            "   IDENTIFICATION DIVISION."
        );
        assert_eq!(normalize("\u{FEFF}  \n\tcode();\n\n"), "\tcode();");
        assert_eq!(normalize("\u{3000}全角 text  \t\n"), "\u{3000}全角 text");
        assert_eq!(normalize(" \n\t \n"), "");
        assert_eq!(normalize("plain"), "plain");
    }

    /// NFC replaced CJK compatibility ideographs by their unified forms (an audit): a Korean
    /// record's 樂 of one reading (U+F914) became the unified 樂 (U+6A02), and a document
    /// differing from another only there was dropped as its duplicate. They are kept; the rest
    /// of the text is NFC as before, combining marks next to them included.
    #[test]
    fn cjk_compatibility_ideographs_are_kept_and_the_rest_is_nfc() {
        // U+F900, U+F914, U+2F800: each NFC-decomposes to a unified ideograph.
        for kept in ['\u{F900}', '\u{F914}', '\u{FA5C}', '\u{2F800}'] {
            assert_ne!(kept.to_string().nfc().collect::<String>(), kept.to_string());
            let text = format!("e\u{301} {kept}\u{301} A\u{30A}{kept}{kept}\r\ncafe\u{301}");
            assert_eq!(
                normalize(&text),
                format!("\u{E9} {kept}\u{301} \u{C5}{kept}{kept}\ncaf\u{E9}"),
                "{kept:?}"
            );
        }
        // Marks after a kept ideograph are put in canonical order as NFC puts them.
        assert_eq!(
            normalize("\u{F900}\u{301}\u{316}x"),
            "\u{F900}\u{316}\u{301}x"
        );
        // A text without any is whole-text NFC.
        let hangul = "\u{1112}\u{1161}\u{11AB} \u{212B}";
        assert_eq!(normalize(hangul), hangul.nfc().collect::<String>());
        assert_eq!(normalize(hangul), "\u{D55C} \u{C5}");
        // Two documents that differ only there stay two.
        assert_ne!(normalize("\u{F914}"), normalize("\u{6A02}"));
    }

    /// A corpus prepared by an older dapt (older text rules) from the same inputs is kept when a
    /// job resumes on it (its checkpoints were trained on it: a rebuild would hold other tokens
    /// and refuse the resume as if the inputs had changed), and rebuilt otherwise.
    #[test]
    fn a_corpus_under_older_text_rules_is_kept_for_a_resume_and_rebuilt_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("in")).expect("mkdir");
        for (name, text) in [("a.txt", "first document words"), ("b.md", "second text")] {
            std::fs::write(d.join("in").join(name), text).expect("write");
        }
        let yaml = "output: out\nvocab_size: 300\nsources:\n  - name: dom\n    role: domain\n    \
                    paths: [in]\n    weight: 1\n";
        let mut spec: CorpusSpec = serde_yaml::from_str(yaml).expect("spec");
        spec.resolve_paths(d);
        let out = d.join("out");
        let options = PrepareOptions::default();
        assert!(matches!(
            prepare(&spec, None, &options).expect("prepare"),
            PrepareOutcome::Prepared { .. }
        ));
        // As an older dapt would have written it: rules 3 in the manifest and its fingerprint.
        let mut manifest = Manifest::read(&out).expect("manifest");
        let discoveries: Vec<_> = spec
            .sources()
            .iter()
            .map(|s| ingest::discover(s).expect("discover"))
            .collect();
        manifest.text_rules = 3;
        manifest.inputs_fingerprint = fingerprint(&spec, None, &discoveries, 3);
        let recorded = manifest.inputs_only_fingerprint.take();
        assert_eq!(
            recorded.as_deref(),
            Some(inputs_fingerprint(&spec, None, &discoveries).as_str())
        );
        manifest::write_atomic(
            &out.join(manifest::MANIFEST_FILE),
            &to_json(&manifest).expect("json"),
        )
        .expect("write");
        let keep = KeepCorpus {
            digest: manifest.content_digest(),
            checkpoint: d.join("ck/step-00000002"),
        };
        let resuming = PrepareOptions {
            keep: Some(keep),
            ..PrepareOptions::default()
        };
        match prepare(&spec, None, &resuming).expect("resume") {
            PrepareOutcome::UpToDate { manifest, .. } => assert_eq!(manifest.text_rules, 3),
            PrepareOutcome::Prepared { .. } => panic!("replaced the corpus a resume needs"),
        }
        match prepare(&spec, None, &options).expect("prepare") {
            PrepareOutcome::Prepared { manifest, .. } => {
                assert_eq!(manifest.text_rules, TEXT_RULES)
            }
            PrepareOutcome::UpToDate { .. } => panic!("kept a corpus of older rules"),
        }
    }
}
