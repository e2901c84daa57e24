//! The corpus report: what was read, what was kept, how well the tokenizer fits the domain, and
//! what the job's plan will make of it. Printed as tables and written as `report.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::ingest::encoding::Declared;
use crate::ingest::{Discovery, FileText};
use crate::manifest::Manifest;
use crate::order::Mixture;
use crate::spec::{Role, SourceSpec, TrainingPlan};
use crate::tokenizer::{BosFrom, CorpusTokenizer};

/// Below this many training tokens the domain is too small for continued pretraining to tell.
pub const MIN_DOMAIN_TOKENS: u64 = 500_000;
/// Below this many held-out tokens a perplexity is too noisy to compare runs by.
pub const MIN_HELD_OUT_TOKENS: u64 = 20_000;
/// Repeating data beyond about four epochs stops paying (Muennighoff et al., 2023).
pub const MAX_USEFUL_EPOCHS: f64 = 4.0;
const SATURATION_CANDIDATES: usize = 1000;
const LISTED_WORDS: usize = 20;
const MIN_OVER_REPRESENTED_COUNT: u64 = 20;
const EXAMPLES_KEPT: usize = 5;
/// More of a source's tokens than this share being the tokenizer's unknown token is warned
/// about: each is a character the model learns to predict as "unknown".
pub const MAX_UNKNOWN_SHARE: f64 = 0.001;

pub type WordMap = HashMap<String, u64>;

mod render;
pub use render::render;

/// Word frequencies of the training documents, per role.
#[derive(Debug, Default)]
pub struct WordCounts {
    pub domain: WordMap,
    pub replay: WordMap,
}

/// Lowercased words and their counts. A word is a run of letters, digits and `_` holding at
/// least one letter and at least two characters, so `pg_stat_activity` is one word and `t.id`
/// two. (A plain character scan: Unicode word segmentation cost several times more and made
/// the report a visible share of `prepare`.)
pub fn count_words<'a>(texts: impl Iterator<Item = &'a str>) -> WordMap {
    let mut counts = WordMap::new();
    let mut word = String::new();
    for text in texts {
        let mut start = None;
        for (i, c) in text
            .char_indices()
            .chain(std::iter::once((text.len(), ' ')))
        {
            if c.is_alphanumeric() || c == '_' {
                start.get_or_insert(i);
                continue;
            }
            let Some(s) = start.take() else { continue };
            let w = &text[s..i];
            if w.len() < 2 || !w.chars().any(char::is_alphabetic) {
                continue;
            }
            if w.bytes().all(|b| !b.is_ascii_uppercase()) && w.is_ascii() {
                if let Some(n) = counts.get_mut(w) {
                    *n += 1;
                    continue;
                }
                counts.insert(w.to_owned(), 1);
            } else {
                word.clear();
                word.extend(w.chars().flat_map(char::to_lowercase));
                match counts.get_mut(word.as_str()) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(word.clone(), 1);
                    }
                }
            }
        }
    }
    counts
}

pub fn merge_words(into: &mut WordMap, from: WordMap) {
    for (word, count) in from {
        *into.entry(word).or_default() += count;
    }
}

/// What `prepare` saw of one source.
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    pub name: String,
    pub role: Option<Role>,
    pub files: u64,
    pub skipped_files: u64,
    pub skipped_examples: Vec<String>,
    pub input_bytes: u64,
    /// Files by the encoding they were decoded from (its WHATWG name).
    pub encodings: BTreeMap<String, u64>,
    pub lossy_files: u64,
    /// Of those, files read in the encoding they declare (a byte order mark, a `<meta>`, an
    /// XML declaration), which the source's `encoding` does not change.
    pub lossy_declared_files: u64,
    pub lossy_examples: Vec<String>,
    /// Files whose declared encoding label names none (ignored), and `path (label)` of a few.
    pub unknown_label_files: u64,
    pub unknown_label_examples: Vec<String>,
    /// UTF-8 files with non-ASCII text decoded with the source's legacy `encoding`.
    pub utf8_under_legacy_files: u64,
    pub utf8_under_legacy_examples: Vec<String>,
    /// Files declaring a legacy encoding whose bytes are UTF-8 with non-ASCII text (valid, or
    /// but for a few bad bytes), read as UTF-8, and `path (declared)` of a few.
    pub utf8_over_declared_files: u64,
    pub utf8_over_declared_examples: Vec<String>,
    /// 8-bit text files decoded as UTF-16 by the source's `encoding`.
    pub not_utf16_files: u64,
    pub not_utf16_examples: Vec<String>,
    /// XHTML files that are not well-formed XML, read as HTML, and `path (why)` of a few.
    pub not_xml_files: u64,
    pub not_xml_examples: Vec<String>,
    pub bad_jsonl_lines: u64,
    pub bad_jsonl_examples: Vec<String>,
    /// The source's `text_field` (what a JSONL line's object must hold as a string).
    pub text_field: String,
    /// Kept documents whose text spells a special token of the tokenizer.
    pub special_text_documents: u64,
    /// `path[:line] (token)` of the first few.
    pub special_text_examples: Vec<String>,
    pub empty: u64,
    /// `path[:line]` of the first few empty documents.
    pub empty_examples: Vec<String>,
    pub duplicates: u64,
    /// Documents the tokenizer encoded to no tokens at all (skipped).
    pub without_tokens: u64,
    /// Occurrences of the tokenizer's unknown token in the kept documents (characters outside
    /// its vocabulary, without byte fallback), and `path[:line] (count)` of the first few
    /// documents holding it.
    pub unknown_tokens: u64,
    pub unknown_examples: Vec<String>,
    pub documents_train: u64,
    pub documents_held_out: u64,
    pub text_bytes: u64,
    pub words: u64,
    pub tokens_train: u64,
    pub tokens_held_out: u64,
}

impl SourceStats {
    /// `N JSONL lines were not ... first at path:line, ...`, naming the `text_field` setting.
    pub fn bad_jsonl_summary(&self) -> String {
        format!(
            "{} JSONL lines were not JSON objects with a string `{}` field (the source's \
             `text_field`) and were skipped, first at {}",
            self.bad_jsonl_lines,
            self.text_field,
            self.bad_jsonl_examples.join(", ")
        )
    }

    pub fn new(source: &SourceSpec, discovery: &Discovery) -> Self {
        SourceStats {
            name: source.name.to_string(),
            role: Some(source.role),
            text_field: source.text_field.clone(),
            skipped_files: discovery.skipped.len() as u64,
            skipped_examples: discovery
                .skipped
                .iter()
                .take(EXAMPLES_KEPT)
                .map(|p| p.display().to_string())
                .collect(),
            ..SourceStats::default()
        }
    }

    pub fn add_file(&mut self, path: &Path, text: &FileText) {
        self.files += 1;
        self.input_bytes += text.bytes;
        *self.encodings.entry(text.encoding.to_owned()).or_default() += 1;
        if text.lossy {
            self.lossy_files += 1;
            let declared = text.declared != Declared::Fallback;
            self.lossy_declared_files += u64::from(declared);
            if self.lossy_examples.len() < EXAMPLES_KEPT {
                let how = match text.utf8_over_declared {
                    Some(over) => format!("{}, declares {over}", text.encoding),
                    None if declared => format!("{}, as it declares", text.encoding),
                    None => text.encoding.to_owned(),
                };
                self.lossy_examples
                    .push(format!("{} ({how})", path.display()));
            }
        }
        if let Some(label) = &text.unknown_label {
            self.unknown_label_files += 1;
            if self.unknown_label_examples.len() < EXAMPLES_KEPT {
                self.unknown_label_examples
                    .push(format!("{} (`{label}`)", path.display()));
            }
        }
        if let Some(why) = &text.not_xml {
            self.not_xml_files += 1;
            if self.not_xml_examples.len() < EXAMPLES_KEPT {
                self.not_xml_examples
                    .push(format!("{} ({why})", path.display()));
            }
        }
        if let Some(declared) = text.utf8_over_declared {
            self.utf8_over_declared_files += 1;
            if self.utf8_over_declared_examples.len() < EXAMPLES_KEPT {
                self.utf8_over_declared_examples
                    .push(format!("{} (declares {declared})", path.display()));
            }
        }
        if text.not_utf16 {
            self.not_utf16_files += 1;
            if self.not_utf16_examples.len() < EXAMPLES_KEPT {
                self.not_utf16_examples.push(path.display().to_string());
            }
        }
        if text.utf8_under_legacy {
            self.utf8_under_legacy_files += 1;
            if self.utf8_under_legacy_examples.len() < EXAMPLES_KEPT {
                self.utf8_under_legacy_examples
                    .push(path.display().to_string());
            }
        }
        self.bad_jsonl_lines += text.bad_lines;
        for line in &text.bad_line_numbers {
            if self.bad_jsonl_examples.len() < EXAMPLES_KEPT {
                // The source's first bad line says why (serde_json's error: "recursion limit
                // exceeded", "expected value"), not only that it was passed over.
                let why = match (&text.first_bad_reason, self.bad_jsonl_examples.is_empty()) {
                    (Some(why), true) => format!(" ({why})"),
                    _ => String::new(),
                };
                self.bad_jsonl_examples
                    .push(format!("{}:{line}{why}", path.display()));
            }
        }
    }

    /// A document with no text once extracted and trimmed (an empty record, a page of chrome
    /// only), left out.
    pub fn add_empty(&mut self, path: &Path, line: Option<u64>) {
        self.empty += 1;
        if self.empty_examples.len() < EXAMPLES_KEPT {
            self.empty_examples.push(match line {
                Some(line) => format!("{}:{line}", path.display()),
                None => path.display().to_string(),
            });
        }
    }

    /// A kept document of the file at `path` (at `line` of a JSONL file) spells `token`.
    pub fn add_special_text(&mut self, path: &Path, line: Option<u64>, token: &str) {
        self.special_text_documents += 1;
        if self.special_text_examples.len() < EXAMPLES_KEPT {
            self.special_text_examples.push(match line {
                Some(line) => format!("{}:{line} ({token})", path.display()),
                None => format!("{} ({token})", path.display()),
            });
        }
    }

    /// A kept document of the file at `path` (at `line` of a JSONL file) holds `count`
    /// unknown tokens.
    pub fn add_unknown(&mut self, path: &Path, line: Option<u64>, count: u64) {
        self.unknown_tokens += count;
        if self.unknown_examples.len() < EXAMPLES_KEPT {
            self.unknown_examples.push(match line {
                Some(line) => format!("{}:{line} ({count})", path.display()),
                None => format!("{} ({count})", path.display()),
            });
        }
    }

    /// A kept document of `bytes` of text, `words` whitespace-separated words and `tokens`
    /// tokens (EOS included).
    pub fn add_document(&mut self, bytes: u64, words: u64, tokens: u64, held_out: bool) {
        self.text_bytes += bytes;
        self.words += words;
        if held_out {
            self.documents_held_out += 1;
            self.tokens_held_out += tokens;
        } else {
            self.documents_train += 1;
            self.tokens_train += tokens;
        }
    }

    pub fn documents(&self) -> u64 {
        self.documents_train + self.documents_held_out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sources: Vec<SourceRow>,
    pub tokenizer: TokenizerRow,
    /// The domain's frequent words that the tokenizer cuts into the most pieces.
    pub vocabulary_saturation: Vec<WordPieces>,
    /// Mean pieces per word over the domain's most frequent words.
    pub mean_pieces_frequent_domain_words: f64,
    /// Words far more frequent in the domain than in the replay text.
    pub over_represented: Vec<OverRepresented>,
    pub plan: Option<PlanRow>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceRow {
    pub name: String,
    pub role: Role,
    pub weight: f64,
    /// Share of training samples (quantized weight / sum).
    pub share: f64,
    pub files: u64,
    pub skipped_files: u64,
    pub input_bytes: u64,
    /// Files by the encoding they were decoded from: a byte order mark, an HTML `<meta>`, the
    /// source's `encoding`, else UTF-8.
    pub encodings: BTreeMap<String, u64>,
    /// Files with bytes invalid in their encoding (decoded with U+FFFD).
    pub lossy_files: u64,
    pub lossy_examples: Vec<String>,
    /// Files declaring an encoding label that names none (the declaration was ignored).
    pub unknown_label_files: u64,
    pub unknown_label_examples: Vec<String>,
    /// UTF-8 files with non-ASCII text decoded with the source's legacy `encoding`.
    pub utf8_under_legacy_files: u64,
    pub utf8_under_legacy_examples: Vec<String>,
    /// Files declaring a legacy encoding whose bytes are UTF-8 with non-ASCII text (valid, or
    /// but for a few bad bytes): read as UTF-8.
    pub utf8_over_declared_files: u64,
    pub utf8_over_declared_examples: Vec<String>,
    /// Files of 8-bit text (no NUL byte, mostly ASCII bytes) decoded as UTF-16 by the
    /// source's `encoding`.
    #[serde(default)]
    pub not_utf16_files: u64,
    #[serde(default)]
    pub not_utf16_examples: Vec<String>,
    /// XHTML files that are not well-formed XML: read as HTML.
    #[serde(default)]
    pub not_xml_files: u64,
    #[serde(default)]
    pub not_xml_examples: Vec<String>,
    pub bad_jsonl_lines: u64,
    pub bad_jsonl_examples: Vec<String>,
    /// Documents whose text spells a special token (encoded as ordinary text).
    pub special_text_documents: u64,
    pub special_text_examples: Vec<String>,
    pub empty_documents: u64,
    /// `path[:line]` of the first few empty documents.
    pub empty_examples: Vec<String>,
    pub duplicates_removed: u64,
    /// Documents the tokenizer encoded to no tokens at all (skipped).
    pub documents_without_tokens: u64,
    /// Occurrences of the tokenizer's unknown token (characters outside its vocabulary, where
    /// it has no byte fallback), stored as training targets like any token.
    pub unknown_tokens: u64,
    /// `path[:line] (count)` of the first few documents holding it.
    pub unknown_token_examples: Vec<String>,
    pub documents_train: u64,
    pub documents_held_out: u64,
    pub words: u64,
    pub tokens_train: u64,
    pub tokens_held_out: u64,
    /// UTF-8 bytes of normalized text per token.
    pub bytes_per_token: f64,
    /// Tokens per whitespace-separated word.
    pub tokens_per_word: f64,
    /// Epochs of this source the job's plan goes through.
    pub epochs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizerRow {
    pub vocab_size: u32,
    pub eos_token: String,
    /// The token that starts every document, if any.
    pub bos_token: Option<String>,
    /// Why documents do or do not start with a BOS.
    pub bos_from: BosFrom,
    /// What the `tokenizer_config.json` said when it decided (`tokenizer_config.json:
    /// add_bos_token true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_reason: Option<String>,
    /// The special tokens dapt adds to each document, in order (`[bos,] eos`).
    pub added_tokens: Vec<String>,
    /// What the tokenizer's template puts after a sequence when that is not just the EOS
    /// (dapt ends each document with its EOS alone).
    pub template_suffix_not_applied: Vec<String>,
    /// Settings of the tokenizer file not applied to documents (`truncation`, `padding`).
    pub ignored_settings: Vec<String>,
    /// Added tokens not marked special but shaped like control tokens, split in text too.
    pub split_added_tokens: Vec<String>,
    /// The model's unknown token, whose occurrences each source counts.
    pub unknown_token: Option<String>,
    pub trained: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct WordPieces {
    pub word: String,
    pub count: u64,
    pub pieces: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverRepresented {
    pub word: String,
    pub domain_count: u64,
    pub replay_count: u64,
    /// log2 of the ratio of relative frequencies (add-one smoothed).
    pub log2_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    pub seq_len: u32,
    pub global_batch: u64,
    pub steps: u64,
    pub training_tokens: u64,
}

pub fn build(
    manifest: &Manifest,
    stats: &[SourceStats],
    words: &WordCounts,
    tk: &CorpusTokenizer,
    plan: Option<TrainingPlan>,
) -> Result<Report> {
    let weights: Vec<f64> = manifest.sources.iter().map(|s| s.weight).collect();
    let mixture = Mixture::new(&weights)?;
    let counts = plan.map(|p| mixture.counts(p.total_samples()));
    let mut warnings = Vec::new();
    let mut rows = Vec::new();
    for (i, (source, st)) in manifest.sources.iter().zip(stats).enumerate() {
        let tokens = (st.tokens_train + st.tokens_held_out).max(1) as f64;
        let epochs = plan.zip(counts.as_ref()).map(|(p, c)| {
            let windows = source.train.tokens.saturating_sub(1) / p.seq_len.max(1) as u64;
            if c[i] == 0 {
                0.0
            } else if windows == 0 {
                f64::INFINITY
            } else {
                c[i] as f64 / windows as f64
            }
        });
        rows.push(SourceRow {
            name: source.name.clone(),
            role: source.role,
            weight: source.weight,
            share: mixture.share(i),
            files: st.files,
            skipped_files: st.skipped_files,
            input_bytes: st.input_bytes,
            encodings: st.encodings.clone(),
            lossy_files: st.lossy_files,
            lossy_examples: st.lossy_examples.clone(),
            unknown_label_files: st.unknown_label_files,
            unknown_label_examples: st.unknown_label_examples.clone(),
            utf8_under_legacy_files: st.utf8_under_legacy_files,
            utf8_under_legacy_examples: st.utf8_under_legacy_examples.clone(),
            utf8_over_declared_files: st.utf8_over_declared_files,
            utf8_over_declared_examples: st.utf8_over_declared_examples.clone(),
            not_utf16_files: st.not_utf16_files,
            not_utf16_examples: st.not_utf16_examples.clone(),
            not_xml_files: st.not_xml_files,
            not_xml_examples: st.not_xml_examples.clone(),
            bad_jsonl_lines: st.bad_jsonl_lines,
            bad_jsonl_examples: st.bad_jsonl_examples.clone(),
            special_text_documents: st.special_text_documents,
            special_text_examples: st.special_text_examples.clone(),
            empty_documents: st.empty,
            empty_examples: st.empty_examples.clone(),
            duplicates_removed: st.duplicates,
            documents_without_tokens: st.without_tokens,
            unknown_tokens: st.unknown_tokens,
            unknown_token_examples: st.unknown_examples.clone(),
            documents_train: st.documents_train,
            documents_held_out: st.documents_held_out,
            words: st.words,
            tokens_train: st.tokens_train,
            tokens_held_out: st.tokens_held_out,
            bytes_per_token: st.text_bytes as f64 / tokens,
            tokens_per_word: tokens / st.words.max(1) as f64,
            epochs,
        });
        warnings.extend(source_warnings(rows.last().expect("pushed"), st, plan));
        if let Some(warning) = unknown_warning(rows.last().expect("pushed"), tk) {
            warnings.push(warning);
        }
    }
    let domain_tokens: u64 = rows
        .iter()
        .filter(|r| r.role == Role::Domain)
        .map(|r| r.tokens_train)
        .sum();
    if domain_tokens < MIN_DOMAIN_TOKENS {
        warnings.push(format!(
            "the domain has {domain_tokens} training tokens, fewer than {MIN_DOMAIN_TOKENS}: too little for continued pretraining to show a reliable effect"
        ));
    }
    let (vocabulary_saturation, mean_pieces) = saturation(&words.domain, tk);
    Ok(Report {
        sources: rows,
        tokenizer: TokenizerRow {
            vocab_size: tk.vocab_size,
            eos_token: tk.eos_token.clone(),
            bos_token: tk.bos.as_ref().map(|b| b.0.clone()),
            bos_from: tk.bos_from,
            bos_reason: tk.bos_reason.clone(),
            added_tokens: tk.added_tokens(),
            template_suffix_not_applied: tk.template_suffix.clone(),
            ignored_settings: tk
                .ignored_settings
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            split_added_tokens: tk.split_added_tokens.clone(),
            unknown_token: tk.unknown.as_ref().map(|u| u.0.clone()),
            trained: manifest.tokenizer.trained,
        },
        vocabulary_saturation,
        mean_pieces_frequent_domain_words: mean_pieces,
        over_represented: over_represented(&words.domain, &words.replay),
        plan: plan.map(|p| PlanRow {
            seq_len: p.seq_len,
            global_batch: p.global_batch,
            steps: p.steps,
            training_tokens: p.total_samples() * p.seq_len as u64,
        }),
        warnings,
    })
}

fn source_warnings(row: &SourceRow, st: &SourceStats, plan: Option<TrainingPlan>) -> Vec<String> {
    let mut w = Vec::new();
    let name = &row.name;
    let measure = match row.role {
        Role::Domain => "domain",
        Role::Replay => "general",
    };
    if row.documents_held_out == 0 {
        w.push(format!(
            "source `{name}` holds out none of its {} documents: {measure} perplexity cannot be measured on it (held_out is 0, or its fraction picked none: each document is held out by a hash of its text, so a few documents may give none; set or raise held_out, or add documents)",
            row.documents_train
        ));
    } else {
        let too_few_windows =
            plan.is_some_and(|p| row.tokens_held_out / (p.seq_len as u64 + 1) < 8);
        if row.tokens_held_out < MIN_HELD_OUT_TOKENS || too_few_windows {
            w.push(format!(
                "source `{name}` holds out {} tokens in {} documents: too few to measure {measure} perplexity reliably (want at least {MIN_HELD_OUT_TOKENS} tokens)",
                row.tokens_held_out, row.documents_held_out
            ));
        }
    }
    if st.lossy_files > 0 {
        // The source's `encoding` reads only the files that declare none: advice to set it is
        // no help for a page whose own `<meta>` wins over it.
        let mut advice = Vec::new();
        if st.lossy_declared_files < st.lossy_files {
            advice.push(
                "a legacy encoding that the files do not declare can be set with the source's \
                 `encoding`",
            );
        }
        if st.lossy_declared_files > 0 {
            advice.push(
                "a file that declares its encoding (a byte order mark, a `<meta charset>`, an \
                 XML declaration) is read as it declares whatever the source's `encoding` says: \
                 its bad bytes are damage (a file cut short, bytes of another encoding pasted \
                 in)",
            );
        }
        w.push(format!(
            "source `{name}`: {} files were not valid in their encoding and were decoded lossily \
             (bad bytes became U+FFFD), e.g. {}; {}",
            st.lossy_files,
            st.lossy_examples.join(", "),
            advice.join("; ")
        ));
    }
    if st.without_tokens > 0 {
        w.push(format!(
            "source `{name}`: {} documents encode to no tokens at all with the tokenizer and were \
             skipped (text its vocabulary or normalizer drops entirely)",
            st.without_tokens
        ));
    }
    if st.unknown_label_files > 0 {
        w.push(format!(
            "source `{name}`: {} files declare an encoding label that names no encoding the \
             Encoding Standard knows, so the declaration was ignored (as a browser ignores it), \
             e.g. {}; set the source's `encoding` if they are not UTF-8",
            st.unknown_label_files,
            st.unknown_label_examples.join(", ")
        ));
    }
    if st.empty > 0 {
        w.push(format!(
            "source `{name}`: {} documents have no text once extracted (an empty record, a page \
             of navigation only) and were left out, e.g. {}",
            st.empty,
            st.empty_examples.join(", ")
        ));
    }
    if st.not_xml_files > 0 {
        w.push(format!(
            "source `{name}`: {} XHTML files are not well-formed XML and were read as HTML (a browser showing them as XHTML would stop at the error; check their text), e.g. {}",
            st.not_xml_files,
            st.not_xml_examples.join(", ")
        ));
    }
    if st.utf8_over_declared_files > 0 {
        w.push(format!(
            "source `{name}`: {} files declare a legacy encoding but are UTF-8 with non-ASCII \
             text (valid, or but for a few bad bytes), so they were read as UTF-8 (read as \
             declared they would be mojibake such as `GrÃ¶ÃŸe`), e.g. {}",
            st.utf8_over_declared_files,
            st.utf8_over_declared_examples.join(", ")
        ));
    }
    if st.utf8_under_legacy_files > 0 {
        w.push(format!(
            "source `{name}`: {} files are valid UTF-8 (or but for a few bad bytes) with non-ASCII \
             text but were decoded as \
             the source's `encoding` says, e.g. {}: check that setting (a UTF-8 file read as a \
             legacy encoding becomes mojibake such as `GrÃ¶ÃŸe`)",
            st.utf8_under_legacy_files,
            st.utf8_under_legacy_examples.join(", ")
        ));
    }
    if st.not_utf16_files > 0 {
        w.push(format!(
            "source `{name}`: {} files were decoded as UTF-16 as the source's `encoding` says but \
             are 8-bit text (no NUL byte, which UTF-16 gives every ASCII character such as a \
             space or a line break, and bytes mostly ASCII, or private-use characters read as \
             UTF-16), e.g. {}: every two of their bytes became one CJK character; check that \
             setting (such files belong in a source of their own)",
            st.not_utf16_files,
            st.not_utf16_examples.join(", ")
        ));
    }
    if st.special_text_documents > 0 {
        w.push(format!(
            "source `{name}`: {} documents spell a special token of the tokenizer in their text \
             (encoded as ordinary text, not as the token), e.g. {}",
            st.special_text_documents,
            st.special_text_examples.join(", ")
        ));
    }
    if st.bad_jsonl_lines > 0 {
        w.push(format!("source `{name}`: {}", st.bad_jsonl_summary()));
    }
    if st.skipped_files > 0 {
        w.push(format!(
            "source `{name}`: {} files of unsupported types (or not regular files, dangling links, or names that are not UTF-8, which a glob cannot match: name their folder instead) were skipped, e.g. {}",
            st.skipped_files,
            st.skipped_examples.join(", ")
        ));
    }
    match row.epochs {
        Some(e) if e.is_infinite() => w.push(format!(
            "source `{name}` has fewer than seq_len + 1 training tokens: the job cannot sample from it"
        )),
        Some(e) if row.role == Role::Domain && e > MAX_USEFUL_EPOCHS => w.push(format!(
            "the plan goes through domain source `{name}` {e:.1} times: beyond about {MAX_USEFUL_EPOCHS} epochs repeated data stops paying; add data or train fewer tokens"
        )),
        _ => {}
    }
    w
}

/// A source more than [`MAX_UNKNOWN_SHARE`] of whose tokens are the unknown token: characters
/// the vocabulary lacks (a script it was not trained on, symbols), each stored as `<unk>` and
/// trained on as a target, said nowhere before (an audit).
fn unknown_warning(row: &SourceRow, tk: &CorpusTokenizer) -> Option<String> {
    let (unknown, _) = tk.unknown.as_ref()?;
    let tokens = row.tokens_train + row.tokens_held_out;
    let share = row.unknown_tokens as f64 / tokens.max(1) as f64;
    (share > MAX_UNKNOWN_SHARE).then(|| {
        format!(
            "source `{}`: {} of its {tokens} tokens ({:.2}%) are the tokenizer's unknown token              {unknown} (characters outside its vocabulary, which it has no byte fallback for),              stored as training targets, e.g. in {}: use a tokenizer that covers the text              (byte-level or with byte fallback), or clean the text",
            row.name,
            row.unknown_tokens,
            share * 100.0,
            row.unknown_token_examples.join(", ")
        )
    })
}

fn saturation(domain: &WordMap, tk: &CorpusTokenizer) -> (Vec<WordPieces>, f64) {
    let mut frequent: Vec<(&String, &u64)> = domain.iter().collect();
    frequent.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    frequent.truncate(SATURATION_CANDIDATES);
    // Words inside running text follow a space, which byte-level BPE folds into the token.
    let texts: Vec<String> = frequent.iter().map(|(w, _)| format!(" {w}")).collect();
    let pieces = tk
        .encode_batch(texts.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let mut rows: Vec<WordPieces> = frequent
        .iter()
        .zip(&pieces)
        .map(|((word, &count), ids)| WordPieces {
            word: (*word).clone(),
            count,
            pieces: ids.len(),
        })
        .collect();
    let total: u64 = rows.iter().map(|r| r.count).sum();
    let mean = rows
        .iter()
        .map(|r| r.pieces as f64 * r.count as f64)
        .sum::<f64>()
        / total.max(1) as f64;
    rows.sort_by(|a, b| b.pieces.cmp(&a.pieces).then(b.count.cmp(&a.count)));
    rows.truncate(LISTED_WORDS);
    (rows, mean)
}

fn over_represented(domain: &WordMap, replay: &WordMap) -> Vec<OverRepresented> {
    if replay.is_empty() {
        return Vec::new();
    }
    let nd = domain.values().sum::<u64>() as f64 + domain.len() as f64;
    let nr = replay.values().sum::<u64>() as f64 + replay.len() as f64;
    let mut rows: Vec<OverRepresented> = domain
        .iter()
        .filter(|(_, &c)| c >= MIN_OVER_REPRESENTED_COUNT)
        .map(|(word, &d)| {
            let r = replay.get(word).copied().unwrap_or(0);
            OverRepresented {
                word: word.clone(),
                domain_count: d,
                replay_count: r,
                log2_ratio: (((d + 1) as f64 / nd) / ((r + 1) as f64 / nr)).log2(),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.log2_ratio
            .total_cmp(&a.log2_ratio)
            .then(a.word.cmp(&b.word))
    });
    rows.truncate(LISTED_WORDS);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_lowercased_and_need_a_letter() {
        let counts =
            count_words(["SELECT select 42 a Vacuum x1 pg_stat_activity t.id ÜBER"].into_iter());
        assert_eq!(counts.get("select"), Some(&2));
        assert_eq!(counts.get("vacuum"), Some(&1));
        assert_eq!(counts.get("x1"), Some(&1));
        assert_eq!(counts.get("pg_stat_activity"), Some(&1));
        assert_eq!(counts.get("id"), Some(&1));
        assert_eq!(counts.get("über"), Some(&1));
        assert!(
            !counts.contains_key("42") && !counts.contains_key("a") && !counts.contains_key("t")
        );
    }

    #[test]
    fn over_representation_ranks_domain_terms_first() {
        let domain = count_words(["the index the vacuum vacuum ".repeat(30).as_str()].into_iter());
        let replay = count_words(["the nation the people ".repeat(30).as_str()].into_iter());
        let rows = over_represented(&domain, &replay);
        assert_eq!(rows[0].word, "vacuum");
        assert_eq!(rows.last().map(|r| r.word.as_str()), Some("the"));
    }
}
