//! The corpus tokenizer: a Hugging Face `tokenizer.json`, given or trained here.
//!
//! Corpus text is data. It is encoded with the tokenizer's special tokens *split* (the
//! `tokenizers` crate's `encode_special_tokens`), so a document that spells `<|endoftext|>`,
//! `</s>` or `<|im_end|>` gets ordinary text pieces for it, never the control id: the only
//! special tokens in a token stream are the ones dapt puts there, the BOS before each document
//! (when the tokenizer's post-processor template adds one, or the job says so) and the EOS
//! after it. Documents that spell a special token are counted for the report.

use std::io::Read;
use std::path::{Path, PathBuf};

use aho_corasick::AhoCorasick;
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{CorpusError, Result};
use crate::spec::{AddBos, CorpusSpec};

/// End-of-document tokens looked up, in order, when the job names none.
pub const EOS_CANDIDATES: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|im_end|>",
];
/// The [`EOS_CANDIDATES`] that end a document (the others end a chat turn): a
/// `tokenizer_config.json`'s `eos_token` among these is taken first.
const DOCUMENT_ENDS: &[&str] = &["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"];
/// Beginning-of-sequence tokens looked up, in order, for `add_bos: true` when neither the
/// tokenizer's template nor the job names one.
pub const BOS_CANDIDATES: &[&str] = &["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"];
/// The end-of-document token of a tokenizer trained by dapt.
pub const TRAINED_EOS: &str = "<|endoftext|>";
/// Text encoded to learn what the post-processor template adds around a sequence.
const TEMPLATE_PROBE: &str = "probe";

/// The job's tokenizer settings (`corpus.eos_token`, `corpus.add_bos`, `corpus.bos_token`).
#[derive(Debug, Clone, Default)]
pub struct TokenizerOptions {
    pub eos_token: Option<String>,
    pub add_bos: AddBos,
    pub bos_token: Option<String>,
}

impl From<&CorpusSpec> for TokenizerOptions {
    fn from(spec: &CorpusSpec) -> Self {
        TokenizerOptions {
            eos_token: spec.eos_token.clone(),
            add_bos: spec.add_bos,
            bos_token: spec.bos_token.clone(),
        }
    }
}

/// Why documents do or do not start with a BOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BosFrom {
    /// The tokenizer's post-processor template adds it (`add_bos: auto`).
    Template,
    /// The template's BOS is the EOS itself (`add_bos: auto`), which already ends the document
    /// before: not added again, or every boundary would be two EOS.
    TemplateBosIsEos,
    /// `add_bos: true`.
    Job,
    /// The template adds none (`add_bos: auto`).
    TemplateAddsNone,
    /// `add_bos: false`.
    JobSaysNo,
    /// The `tokenizer_config.json` beside the `tokenizer.json` says to add one where the
    /// template adds none (`add_bos_token: true`, or a Llama/Gemma tokenizer class, whose
    /// default that is), as transformers does when it loads that folder (`add_bos: auto`).
    TokenizerConfig,
    /// The `tokenizer_config.json` says `add_bos_token: false` where the template adds one
    /// (`add_bos: auto`).
    TokenizerConfigSaysNo,
    /// The `tokenizer_config.json` says to add one, and its `bos_token` is the EOS (not added,
    /// as [`BosFrom::TemplateBosIsEos`]).
    TokenizerConfigBosIsEos,
}

/// The `tokenizer_config.json` that transformers reads beside a `tokenizer.json`.
pub const HF_TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// transformers' tokenizer classes that rebuild the post-processor from `add_bos_token` when
/// they load (`update_post_processor`), with the default each gives it: a folder of one of these
/// adds a BOS even when its `tokenizer.json` template adds none (Llama, CodeLlama, Gemma,
/// Cohere), or drops the template's (GPT-NeoX). Every other class (`PreTrainedTokenizerFast`,
/// `GPT2TokenizerFast`, `Qwen2TokenizerFast` ...) ignores `add_bos_token`: the template decides
/// (read in transformers 4.42.4 and 4.57.6, `models/*/tokenization_*_fast.py`; dapt applied
/// the key for every class, an audit).
const BOS_REBUILDING_CLASSES: &[(&str, bool)] = &[
    ("LlamaTokenizer", true),
    ("LlamaTokenizerFast", true),
    ("CodeLlamaTokenizer", true),
    ("CodeLlamaTokenizerFast", true),
    ("GemmaTokenizer", true),
    ("GemmaTokenizerFast", true),
    ("CohereTokenizerFast", true),
    ("GPTNeoXTokenizerFast", false),
];

/// What a `tokenizer_config.json` says about the BOS, as transformers applies it when it loads
/// the folder: `add_bos_token`, or its default, only for the classes of
/// [`BOS_REBUILDING_CLASSES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfBos {
    /// Whether a BOS starts each sequence (`None`: the config says nothing of it).
    pub add: Option<bool>,
    /// The config's `bos_token`, if it names one.
    pub token: Option<String>,
    /// Why, for the report: `add_bos_token: true` or `tokenizer_class LlamaTokenizerFast`.
    pub reason: String,
    /// The config's `eos_token` and `pad_token`, if it names them: a pad token is no
    /// document end, even when it is one of [`EOS_CANDIDATES`] (a Llama 2 fine-tune that added
    /// `<|endoftext|>` as its pad had its documents end with it; an audit).
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// An `add_bos_token` that transformers does not apply for the config's class, said in the
    /// report (`tokenizer_config.json: add_bos_token false is not applied ...`).
    pub ignored: Option<String>,
}

impl HfBos {
    /// Reads `tokenizer_config.json` beside `tokenizer_json`, if there is one. `None` when there
    /// is none or it says nothing of the BOS (no `add_bos_token`, another tokenizer class) and
    /// names no EOS or pad token.
    ///
    /// # Errors
    /// A file that cannot be read or is not a JSON object, or whose `add_bos_token`,
    /// `bos_token` or `tokenizer_class` has another type, naming the file and field: it could
    /// change every document, so it is not skipped.
    pub fn beside(tokenizer_json: &Path) -> Result<Option<HfBos>> {
        let path = tokenizer_json.with_file_name(HF_TOKENIZER_CONFIG);
        match std::fs::metadata(&path) {
            // (transformers then takes the model's class, whose default would decide for
            // Llama and Gemma; dapt's own exports have a Llama config.json and a tokenizer
            // without `<s>`, for which transformers adds a token the model does not have: the
            // template decides, as it always did here.)
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CorpusError::io(&path)(e)),
            // A FIFO would block the read, a device never end it.
            Ok(meta) if !meta.is_file() => return Err(CorpusError::NotAFile { path }),
            Ok(_) => {}
        }
        let text = std::fs::read_to_string(&path).map_err(CorpusError::io(&path))?;
        let fail = |message: String| CorpusError::Tokenizer {
            path: path.clone(),
            message,
        };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("is not JSON: {e}")))?;
        let Some(config) = config.as_object() else {
            return Err(fail("is not a JSON object".into()));
        };
        let field = |key: &str| config.get(key).filter(|v| !v.is_null());
        let add = match field("add_bos_token") {
            None => None,
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(v) => return Err(fail(format!("`add_bos_token` is {v}, not true or false"))),
        };
        // A token is a string, or an AddedToken object with its `content`.
        let token_field = |key: &str| match field(key) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(fail(format!(
                    "`{key}` is {v}, not a token string or an object with its `content`"
                ))),
            },
        };
        let token = token_field("bos_token")?;
        let eos_token = token_field("eos_token")?;
        let pad_token = token_field("pad_token")?;
        let class = match field("tokenizer_class") {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(fail(format!("`tokenizer_class` is {v}, not a class name"))),
        };
        // Without a class of its own, transformers takes the model's (`config.json` beside:
        // its `tokenizer_class`, else its `model_type`'s tokenizer). That one decides whether an
        // explicit `add_bos_token` applies, not a default BOS: dapt's own exports have a Llama
        // config.json and a tokenizer without `<s>`, to which transformers adds a token the
        // model does not have.
        let named = class.is_some();
        let class = class.or_else(|| class_of_model(&tokenizer_json.with_file_name("config.json")));
        let class = class.as_deref();
        // transformers loads the Fast class of a name without "Fast" when there is one
        // (`GPTNeoXTokenizer` is `GPTNeoXTokenizerFast`; a review).
        let rebuilds = class.and_then(rebuilding_class);
        let (add, reason, ignored) = match (add, rebuilds) {
            (Some(add), Some(_)) => (
                Some(add),
                format!("{HF_TOKENIZER_CONFIG}: add_bos_token {add}"),
                None,
            ),
            (None, Some((class, default))) if named => (
                Some(default),
                format!(
                    "{HF_TOKENIZER_CONFIG}: tokenizer_class {class}, which {} by default",
                    if default { "adds it" } else { "adds none" }
                ),
                None,
            ),
            (Some(add), None) => (
                None,
                String::new(),
                Some(format!(
                    "{HF_TOKENIZER_CONFIG}: add_bos_token {add} is not applied, as transformers \
                     does not apply it for {}",
                    class.map_or("a config without tokenizer_class".to_owned(), |c| format!(
                        "tokenizer_class {c}"
                    ))
                )),
            ),
            (None, _) => (None, String::new(), None),
        };
        Ok(
            (add.is_some() || pad_token.is_some() || eos_token.is_some() || ignored.is_some())
                .then_some(HfBos {
                    add,
                    token,
                    reason,
                    eos_token,
                    pad_token,
                    ignored,
                }),
        )
    }
}

/// The class of [`BOS_REBUILDING_CLASSES`] transformers loads for `class`, with its default:
/// the class itself, or its Fast class for a name without "Fast" (transformers tries that
/// first: `GPTNeoXTokenizer` loads `GPTNeoXTokenizerFast`; a review).
fn rebuilding_class(class: &str) -> Option<(&'static str, bool)> {
    BOS_REBUILDING_CLASSES
        .iter()
        .find(|(name, _)| *name == class || *name == format!("{class}Fast"))
        .copied()
}

/// The tokenizer class transformers gives a model folder whose `tokenizer_config.json` names
/// none: `config.json`'s `tokenizer_class`, else its `model_type`'s, for the model types whose
/// tokenizer class rebuilds the template (`TOKENIZER_MAPPING` in transformers 4.57's
/// `models/auto/tokenization_auto.py`); `None` for any other, or without a readable
/// `config.json` (a small file; a FIFO or a directory there is passed over).
pub(crate) fn class_of_model(config_json: &Path) -> Option<String> {
    if !std::fs::metadata(config_json).is_ok_and(|m| m.is_file() && m.len() < 1 << 20) {
        return None;
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config_json).ok()?).ok()?;
    if let Some(class) = config.get("tokenizer_class").and_then(|c| c.as_str()) {
        return Some(class.to_owned());
    }
    let class = match config.get("model_type")?.as_str()? {
        "llama" | "mistral" | "mistral3" | "mixtral" => "LlamaTokenizerFast",
        "gemma" | "gemma2" | "gemma3" | "gemma3_text" | "gemma3n" | "gemma3n_text" => {
            "GemmaTokenizerFast"
        }
        "cohere" | "cohere2" => "CohereTokenizerFast",
        "gpt_neox" => "GPTNeoXTokenizerFast",
        _ => return None,
    };
    Some(class.to_owned())
}

/// A loaded tokenizer and the facts the shards depend on.
pub struct CorpusTokenizer {
    pub tokenizer: Tokenizer,
    pub eos_token: String,
    pub eos_id: u32,
    /// The token put before each document's text, if any.
    pub bos: Option<(String, u32)>,
    pub bos_from: BosFrom,
    /// When [`BosFrom::TokenizerConfig`] or [`BosFrom::TokenizerConfigSaysNo`]: what the
    /// `tokenizer_config.json` said (`add_bos_token: true`, ...), for the report.
    pub bos_reason: Option<String>,
    /// What the tokenizer's post-processor template puts after a sequence (dapt puts its EOS
    /// there instead); reported when it is not just the EOS.
    pub template_suffix: Vec<String>,
    /// One more than the largest token id.
    pub vocab_size: u32,
    /// Settings of the tokenizer file that dapt does not apply to corpus documents
    /// (`truncation`, `padding`: for batched inference; a document is encoded whole).
    pub ignored_settings: Vec<&'static str>,
    /// Added tokens that the file does not mark special but that are shaped like control tokens
    /// (`<tool_call>`, `<|fim_prefix|>`, `[INST]`): split in text like the special ones.
    pub split_added_tokens: Vec<String>,
    /// The model's unknown token and its id (BPE, WordPiece, Unigram, WordLevel): what a
    /// character outside the vocabulary becomes when the model has no byte fallback. Text
    /// produces it, so it is counted per source in the report.
    pub unknown: Option<(String, u32)>,
    /// The special tokens, whose text a document may spell but never produce.
    special: Vec<String>,
    special_text: Option<AhoCorasick>,
    /// `control[id]`: `id` is a special token (BOS, EOS and the like, not the unknown token).
    control: Vec<bool>,
    /// How errors name the tokenizer: the user's file, or "trained".
    origin: PathBuf,
    /// The ids of `"\n"` and the places where a long text may be cut into pieces (each later
    /// piece encoded after a `"\n"` whose ids are dropped): `None` when the probe found that
    /// every kind of cut changes tokens ([`safe_cuts`]).
    safe_cuts: Option<(Vec<u32>, Vec<Cut>)>,
}

/// Most bytes of text given to `tokenizers` in one call (its memory while encoding is ~50-180
/// times the text).
pub const ENCODE_BATCH_BYTES: usize = 2 << 20;
/// A text longer than this is encoded in pieces of about this size.
pub const PIECE_BYTES: usize = 256 << 10;
/// Longest text encoded whole when it cannot be cut into pieces (no place where the tokenizer's
/// probe allows a cut, or a cut whose ids did not line up): at ~50-200 bytes per byte, up to
/// ~1.7 GB while it encodes. A longer one is refused, naming the document, rather than take
/// memory without bound (a 16 MiB document took 3.4 GB).
pub const MAX_WHOLE_BYTES: usize = 8 << 20;

/// A place where a long text may be cut, each later piece then encoded after a `"\n"` whose ids
/// are dropped. Each is used only for a tokenizer whose probe at load ([`safe_cuts`]) finds that
/// it changes no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Right after a lone `\n` between two characters that are not whitespace.
    AfterLineBreak,
    /// Right after a run of two or more `\n` (blank lines, the usual paragraph break) between
    /// two characters that are not whitespace: for tokenizers that keep such a run whole
    /// (Llama 3's `\s*[\r\n]+`).
    AfterBlankLines,
    /// Right before the last `\n` of such a run: for tokenizers that split it before the
    /// text that follows (GPT-2's `\s+(?!\S)` leaves the last `\n` alone).
    BeforeLastLineBreak,
    /// Right before a lone space between two characters that are not whitespace (a word
    /// boundary): the last resort, for a text without line breaks.
    BeforeSpace,
}

/// The places `cuts` are made at, for a message: `a lone line break, a blank line`. Two kinds of
/// cut are both at a blank line (after the run, before its last `\n`): named once (a message
/// read "a blank line, a blank line").
fn cut_places(cuts: &[Cut]) -> String {
    let mut places: Vec<&str> = Vec::new();
    for cut in cuts {
        let place = match cut {
            Cut::AfterLineBreak => "a lone line break",
            Cut::AfterBlankLines | Cut::BeforeLastLineBreak => "a blank line",
            Cut::BeforeSpace => "a space between words",
        };
        if !places.contains(&place) {
            places.push(place);
        }
    }
    places.join(", ")
}

/// The whitespace between the two sides of each [`CUT_PROBES`] pair for a cut, and where in it
/// the cut falls.
fn cut_separators(cut: Cut) -> Vec<(String, usize)> {
    match cut {
        Cut::AfterLineBreak => vec![("\n".into(), 1)],
        Cut::AfterBlankLines => (2..=8).map(|n| ("\n".repeat(n), n)).collect(),
        Cut::BeforeLastLineBreak => (2..=8).map(|n| ("\n".repeat(n), n - 1)).collect(),
        Cut::BeforeSpace => vec![(" ".into(), 0)],
    }
}

/// Where the whitespace run `text[s..e]` (all `\n` or all spaces) may be cut under `cuts`, if
/// anywhere: only a run between two characters that are not whitespace, the shapes the probes
/// check.
fn cut_in_run(text: &str, s: usize, e: usize, cuts: &[Cut]) -> Option<usize> {
    let before = text[..s].chars().next_back()?;
    let after = text[e..].chars().next()?;
    if before.is_whitespace() || after.is_whitespace() {
        return None;
    }
    let has = |cut| cuts.contains(&cut);
    match (text.as_bytes()[s], e - s) {
        (b'\n', 1) if has(Cut::AfterLineBreak) => Some(e),
        (b'\n', n) if n > 1 && has(Cut::AfterBlankLines) => Some(e),
        (b'\n', n) if n > 1 && has(Cut::BeforeLastLineBreak) => Some(e - 1),
        (b' ', 1) if has(Cut::BeforeSpace) => Some(s),
        _ => None,
    }
}

/// The first place at or after byte `from` (a char boundary) where `text` may be cut under
/// `cuts`, looking at the whitespace runs that start before `to`.
fn first_cut(text: &str, from: usize, to: usize, cuts: &[Cut]) -> Option<usize> {
    let bytes = text.as_bytes();
    let to = to.min(bytes.len());
    let mut i = from;
    while i < to {
        // `\n` and ` ` are ASCII, never part of a multi-byte character: byte positions are
        // char boundaries.
        let s = i + bytes[i..to].iter().position(|&b| b == b'\n' || b == b' ')?;
        let e = s + bytes[s..].iter().take_while(|&&b| b == bytes[s]).count();
        if let Some(at) = cut_in_run(text, s, e, cuts).filter(|&at| at >= from) {
            return Some(at);
        }
        i = e;
    }
    None
}

/// `text` cut into pieces of at least `target` bytes (the last may be shorter), at the places
/// `cuts` allows: a line or paragraph break within the next `target` bytes if there is one,
/// else a word boundary there, else the first place further on. A text without such a place
/// stays whole.
fn pieces_at<'a>(text: &'a str, target: usize, cuts: &[Cut]) -> Vec<&'a str> {
    let lines: Vec<Cut> = cuts
        .iter()
        .copied()
        .filter(|&c| c != Cut::BeforeSpace)
        .collect();
    let words = [Cut::BeforeSpace];
    let words: &[Cut] = if cuts.contains(&Cut::BeforeSpace) {
        &words
    } else {
        &[]
    };
    let mut pieces = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut from = start + target;
        while !text.is_char_boundary(from) {
            from += 1;
        }
        let window = from.saturating_add(target);
        let cut = first_cut(text, from, window, &lines)
            .or_else(|| first_cut(text, from, window, words))
            .or_else(|| first_cut(text, window, text.len(), cuts));
        match cut {
            Some(cut) => {
                pieces.push(&text[start..cut]);
                start = cut;
            }
            None => break,
        }
    }
    pieces.push(&text[start..]);
    pieces
}

/// Texts on both sides of a cut (each side's end at the cut is not whitespace), joined by each
/// [`cut_separators`] of a [`Cut`] to check that this tokenizer encodes a later piece (after a
/// `"\n"` whose ids are dropped) as it encodes it inside the whole.
const CUT_PROBES: &[(&str, &str)] = &[
    ("Hello world.", "Next line here"),
    ("x", "Y"),
    ("end.", "(paren) text"),
    ("a list", "1. item"),
    ("über", "Äpfel und Birnen"),
    ("code();", "}"),
    ("text", "<b> more"),
    ("  indented", "#heading"),
    ("SELECT 1;", "-- comment"),
    ("价格", "是多少"),
    ("word", "'s"),
    ("dosage", "12.5 mg"),
    ("x", "\u{2014}dash"),
];

/// The ids of `"\n"` and the [`Cut`]s at which cutting a text and encoding the later piece
/// after a `"\n"` (its ids then dropped) gives the tokens of the whole text on every probe
/// (a line break for byte-level BPE such as GPT-2's and Llama 3's, and SentencePiece-style
/// ones that prepend `▁` only to a sequence's start; a blank line, one side or the other of
/// its last `\n`, as their pre-tokenizers split it; a word boundary). `None` when there is none,
/// and long texts are then encoded whole up to [`MAX_WHOLE_BYTES`].
fn safe_cuts(tokenizer: &Tokenizer) -> Option<(Vec<u32>, Vec<Cut>)> {
    let ids = |text: &str| {
        tokenizer
            .encode_fast(text, false)
            .ok()
            .map(|e| e.get_ids().to_vec())
    };
    let context = ids("\n")?;
    let passes = |cut: Cut| {
        cut_separators(cut).iter().all(|(sep, at)| {
            CUT_PROBES.iter().all(|(a, b)| {
                let whole = ids(&format!("{a}{sep}{b}"));
                let first = ids(&format!("{a}{}", &sep[..*at]));
                let later = ids(&format!("\n{}{b}", &sep[*at..]));
                match (whole, first, later) {
                    (Some(whole), Some(mut cut), Some(later)) => {
                        match later.strip_prefix(context.as_slice()) {
                            Some(rest) => {
                                cut.extend_from_slice(rest);
                                whole == cut
                            }
                            None => false,
                        }
                    }
                    _ => false,
                }
            })
        })
    };
    let cuts: Vec<Cut> = [
        Cut::AfterLineBreak,
        Cut::AfterBlankLines,
        Cut::BeforeLastLineBreak,
        Cut::BeforeSpace,
    ]
    .into_iter()
    .filter(|&cut| passes(cut))
    .collect();
    (!cuts.is_empty()).then_some((context, cuts))
}

/// `error` (the tokenizers crate's, reading `path`), with what the file is when it is not JSON
/// at all: a SentencePiece `tokenizer.model` (a protobuf) got "expected value at line 2 column
/// 1", which did not say that dapt reads a Hugging Face `tokenizer.json` (an audit).
fn not_tokenizer_json(path: &Path, error: &str) -> String {
    use std::io::Read;
    let mut head = [0u8; 64];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let json = head[..n]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|&b| b == b'{');
    if json {
        return error.to_string();
    }
    let sentencepiece = path.extension().is_some_and(|e| e == "model");
    format!(
        "is not a Hugging Face tokenizer.json ({error}){}; dapt reads tokenizer.json: \
         transformers writes one beside the model's files with \
         `AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(OUT_DIR)`",
        if sentencepiece {
            ": it looks like a SentencePiece model"
        } else {
            ""
        }
    )
}

impl CorpusTokenizer {
    /// Loads `path` and finds its end-of-document token and its BOS: the template's, or what a
    /// `tokenizer_config.json` beside it says ([`HfBos::beside`]).
    pub fn load(path: &Path, options: &TokenizerOptions) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| CorpusError::Tokenizer {
            path: path.to_path_buf(),
            message: not_tokenizer_json(path, &e.to_string()),
        })?;
        let hf_bos = HfBos::beside(path)?;
        Self::with_config(tokenizer, path, options, hf_bos.as_ref())
    }

    /// `origin` names the tokenizer in errors (the user's file, not a copy).
    pub fn new(tokenizer: Tokenizer, origin: &Path, options: &TokenizerOptions) -> Result<Self> {
        Self::with_config(tokenizer, origin, options, None)
    }

    /// As [`CorpusTokenizer::new`], with what a `tokenizer_config.json` says of the BOS
    /// (under `add_bos: auto` it decides where it differs from the template).
    pub fn with_config(
        mut tokenizer: Tokenizer,
        origin: &Path,
        options: &TokenizerOptions,
        hf_bos: Option<&HfBos>,
    ) -> Result<Self> {
        let fail = |message: String| CorpusError::Tokenizer {
            path: origin.to_path_buf(),
            message,
        };
        // A tokenizer.json may carry `truncation` and `padding` for batched inference: applied
        // to a corpus they would cut documents short or put pad ids inside them (and cut the
        // template probe below).
        let mut ignored_settings = Vec::new();
        if tokenizer.get_truncation().is_some() {
            ignored_settings.push("truncation");
            tokenizer
                .with_truncation(None)
                .map_err(|e| fail(e.to_string()))?;
        }
        if tokenizer.get_padding().is_some() {
            ignored_settings.push("padding");
            tokenizer.with_padding(None);
        }
        // BPE dropout (a training-time regulariser) splits words at random: the same text gave
        // other ids on each prepare (an audit).
        if let ModelWrapper::BPE(bpe) = tokenizer.get_model() {
            if bpe.dropout.is_some_and(|p| p > 0.0) {
                let mut bpe = bpe.clone();
                bpe.dropout = None;
                tokenizer.with_model(bpe);
                ignored_settings.push("dropout");
            }
        }
        let (prefix, suffix) = template(&tokenizer).map_err(&fail)?;
        let (eos_token, eos_id) = match (&options.eos_token, suffix.as_slice()) {
            (Some(name), _) => match tokenizer.token_to_id(name) {
                Some(id) => (name.clone(), id),
                None => return Err(fail(format!("has no token `{name}` (corpus.eos_token)"))),
            },
            // The token the template ends a sequence with is the model's end of sequence.
            (None, [id]) => (token_name(&tokenizer, *id), *id),
            // The config's `eos_token` when it is a document end (not a chat turn's end, as an
            // Instruct model's `<|eot_id|>` or `<|im_end|>` is), else the first of the usual
            // document ends that is not the config's pad token (a Llama 2 fine-tune that added
            // `<|endoftext|>` as its pad keeps `</s>`), else one that is (Qwen2.5-Instruct pads
            // with `<|endoftext|>`, its document separator, and ends turns with `<|im_end|>`,
            // which ended every document before; an audit). Never a chat turn's end.
            (None, _) => {
                let config_eos = hf_bos.and_then(|hf| hf.eos_token.as_deref());
                let pad = hf_bos
                    .and_then(|hf| hf.pad_token.as_deref())
                    .filter(|pad| config_eos != Some(*pad));
                let candidates: Vec<&str> = config_eos
                    .filter(|eos| DOCUMENT_ENDS.contains(eos))
                    .into_iter()
                    .chain(DOCUMENT_ENDS.iter().copied().filter(|n| Some(*n) != pad))
                    .chain(DOCUMENT_ENDS.iter().copied().filter(|n| Some(*n) == pad))
                    .collect();
                find_token(&tokenizer, &candidates).ok_or_else(|| {
                    let turn_end = EOS_CANDIDATES
                        .iter()
                        .find(|n| !DOCUMENT_ENDS.contains(n) && tokenizer.token_to_id(n).is_some());
                    fail(format!(
                        "has none of the usual end-of-document tokens ({}){}: set \
                         corpus.eos_token",
                        DOCUMENT_ENDS.join(", "),
                        turn_end
                            .map(|t| format!(" (`{t}` ends a chat turn, not a document)"))
                            .unwrap_or_default()
                    ))
                })?
            }
        };
        let named_bos = match &options.bos_token {
            Some(name) => match tokenizer.token_to_id(name) {
                Some(id) => Some((name.clone(), id)),
                None => return Err(fail(format!("has no token `{name}` (corpus.bos_token)"))),
            },
            None => None,
        };
        let template_bos = match prefix.as_slice() {
            [] => None,
            [id] => Some((token_name(&tokenizer, *id), *id)),
            more => {
                return Err(fail(format!(
                    "its post-processor template puts {} tokens ({}) before a sequence; dapt \
                     supports one BOS: set corpus.add_bos (and corpus.bos_token)",
                    more.len(),
                    more.iter()
                        .map(|&id| token_name(&tokenizer, id))
                        .collect::<Vec<_>>()
                        .join(" ")
                )))
            }
        };
        let (bos, bos_from) = match options.add_bos {
            AddBos::Never if named_bos.is_some() => {
                return Err(CorpusError::Invalid(
                    "corpus.bos_token is set but corpus.add_bos is false".into(),
                ))
            }
            AddBos::Never => (None, BosFrom::JobSaysNo),
            AddBos::Auto => match (template_bos, hf_bos) {
                // transformers rebuilds the template from the config when it loads the folder.
                (Some(_), Some(hf)) if hf.add == Some(false) => {
                    if let Some((name, _)) = named_bos {
                        return Err(named_but_not_added(&name, &hf.reason));
                    }
                    (None, BosFrom::TokenizerConfigSaysNo)
                }
                (None, Some(hf)) if hf.add == Some(true) => {
                    let bos = match (named_bos, &hf.token) {
                        (Some(named), _) => named,
                        (None, Some(name)) => match tokenizer.token_to_id(name) {
                            Some(id) => (name.clone(), id),
                            None => {
                                return Err(fail(format!(
                                    "has no token `{name}`, the bos_token of {}",
                                    hf.reason
                                )))
                            }
                        },
                        (None, None) => {
                            find_token(&tokenizer, BOS_CANDIDATES).ok_or_else(|| {
                                fail(format!(
                                    "has none of the usual beginning-of-sequence tokens ({}) \
                                     for {}: set corpus.bos_token",
                                    BOS_CANDIDATES.join(", "),
                                    hf.reason
                                ))
                            })?
                        }
                    };
                    if bos.1 == eos_id {
                        // As with a template whose BOS is the EOS: the EOS before separates.
                        (None, BosFrom::TokenizerConfigBosIsEos)
                    } else {
                        (Some(bos), BosFrom::TokenizerConfig)
                    }
                }
                (Some((_, id)), _) if id == eos_id && named_bos.is_none() => {
                    (None, BosFrom::TemplateBosIsEos)
                }
                (Some(t), _) => (Some(named_bos.unwrap_or(t)), BosFrom::Template),
                // A BOS the job names but nothing adds was ignored without a word (an audit).
                (None, hf) => {
                    if let Some((name, _)) = named_bos {
                        let reason = match hf.filter(|hf| hf.add == Some(false)) {
                            Some(hf) => hf.reason.clone(),
                            None => "its post-processor template adds none".to_owned(),
                        };
                        return Err(named_but_not_added(&name, &reason));
                    }
                    (None, BosFrom::TemplateAddsNone)
                }
            },
            AddBos::Always => {
                let bos = named_bos
                    .or(template_bos)
                    .or_else(|| find_token(&tokenizer, BOS_CANDIDATES))
                    .ok_or_else(|| {
                        fail(format!(
                            "has none of the usual beginning-of-sequence tokens ({}) for \
                             corpus.add_bos: true: set corpus.bos_token",
                            BOS_CANDIDATES.join(", ")
                        ))
                    })?;
                (Some(bos), BosFrom::Job)
            }
        };
        let template_suffix = if suffix == [eos_id] {
            Vec::new()
        } else {
            suffix
                .iter()
                .map(|&id| token_name(&tokenizer, id))
                .collect()
        };

        // Every special token, the BOS and EOS whatever their flag in the file, and added tokens
        // shaped like control tokens are split when they appear in text.
        let added = tokenizer.get_added_tokens_decoder();
        let mut split_added_tokens: Vec<(u32, String)> = added
            .iter()
            .filter(|(id, t)| !t.special && **id != eos_id && looks_like_control(&t.content))
            .map(|(id, t)| (*id, t.content.clone()))
            .collect();
        split_added_tokens.sort();
        let boundaries: Vec<AddedToken> = std::iter::once((&eos_token, eos_id))
            .chain(bos.iter().map(|(name, id)| (name, *id)))
            .filter(|(_, id)| !added.get(id).is_some_and(|t| t.special))
            .map(|(name, _)| AddedToken::from(name.clone(), true))
            .chain(
                split_added_tokens
                    .iter()
                    .filter(|(id, _)| bos.as_ref().is_none_or(|b| b.1 != *id))
                    .map(|(_, content)| AddedToken::from(content.clone(), true)),
            )
            .collect();
        tokenizer
            .add_special_tokens(boundaries)
            .map_err(|e| fail(e.to_string()))?;
        let split_added_tokens = split_added_tokens.into_iter().map(|t| t.1).collect();
        tokenizer.set_encode_special_tokens(true);
        let unknown = unknown_token(tokenizer.get_model());
        let mut special: Vec<(u32, String)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        special.sort();
        let largest = tokenizer.get_vocab(true).values().max().copied();
        // The model's embedding has a row per id up to the largest: one stray huge id would
        // make a model of hundreds of GB (and a table here of as many entries).
        if let Some(id) = largest.filter(|&id| id >= crate::spec::MAX_VOCAB_SIZE) {
            return Err(fail(format!(
                "its largest token id is {id}: dapt takes vocabularies of at most {} ids",
                crate::spec::MAX_VOCAB_SIZE
            )));
        }
        let vocab_size = largest.map_or(0, |m| m + 1);
        // A template may name ids that are no token of the vocabulary.
        for (what, id) in std::iter::once(("EOS", eos_id)).chain(bos.iter().map(|b| ("BOS", b.1))) {
            if id >= vocab_size {
                return Err(fail(format!(
                    "its {what} id {id} is not in its vocabulary of {vocab_size} ids"
                )));
            }
        }
        let mut control = vec![false; vocab_size as usize];
        // A byte-fallback model (Llama 2's SentencePiece BPE) encodes a character outside its
        // vocabulary as its UTF-8 bytes, `<0x00>`..`<0xFF>`: ordinary text, even where a
        // training recipe flagged those pieces special (an audit: one rare character refused
        // the whole corpus).
        let byte_fallback = byte_fallback(tokenizer.get_model());
        for (id, content) in &special {
            if unknown.as_deref() != Some(content.as_str())
                && !(byte_fallback && is_byte_piece(content))
            {
                if let Some(c) = control.get_mut(*id as usize) {
                    *c = true;
                }
            }
        }
        let unknown_id = unknown.as_deref().and_then(|u| tokenizer.token_to_id(u));
        let unknown = unknown.zip(unknown_id);
        let special: Vec<String> = special.into_iter().map(|(_, content)| content).collect();
        let special_text = if special.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&special).map_err(|e| fail(e.to_string()))?)
        };
        // After the special tokens are split: the probe encodes as documents are encoded.
        let safe_cuts = safe_cuts(&tokenizer);
        Ok(CorpusTokenizer {
            tokenizer,
            eos_token,
            eos_id,
            bos_reason: hf_bos.and_then(|hf| match bos_from {
                BosFrom::TokenizerConfig
                | BosFrom::TokenizerConfigSaysNo
                | BosFrom::TokenizerConfigBosIsEos => Some(hf.reason.clone()),
                // The template decided; a key transformers does not apply is said beside it.
                BosFrom::Template | BosFrom::TemplateAddsNone | BosFrom::TemplateBosIsEos => {
                    hf.ignored.clone()
                }
                _ => None,
            }),
            bos,
            bos_from,
            template_suffix,
            vocab_size,
            ignored_settings,
            split_added_tokens,
            unknown,
            special,
            special_text,
            control,
            origin: origin.to_path_buf(),
            safe_cuts,
        })
    }

    /// How many of `ids` are the model's unknown token.
    pub fn unknown_count(&self, ids: &[u32]) -> u64 {
        self.unknown.as_ref().map_or(0, |(_, unknown)| {
            ids.iter().filter(|&id| id == unknown).count() as u64
        })
    }

    /// How errors name the tokenizer: the user's file, or "(trained)".
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The first special token that `text` spells, if any (it is encoded as ordinary text).
    pub fn special_in_text(&self, text: &str) -> Option<&str> {
        let found = self.special_text.as_ref()?.find(text)?;
        self.special
            .get(found.pattern().as_usize())
            .map(String::as_str)
    }

    /// Token ids of `text` as ordinary text: no BOS, no EOS, no special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self.encode_batch(vec![text]) {
            Ok(mut ids) => Ok(ids.remove(0)),
            Err(CorpusError::TokenizerOnText { path, message, .. }) => {
                Err(CorpusError::Tokenizer { path, message })
            }
            Err(e) => Err(e),
        }
    }

    /// Token ids of many texts as ordinary text, in parallel on all cores, with bounded
    /// memory: `tokenizers` holds ~50-180 bytes per input byte while it encodes (its
    /// `Encoding`s and normalized strings), so texts go to it in batches of at most
    /// [`ENCODE_BATCH_BYTES`], and a text longer than [`PIECE_BYTES`] in pieces cut after a line
    /// break, at a blank line or, as a last resort, at a space between words (the kinds of cut
    /// that the probe at load found change no token; else whole, up to [`MAX_WHOLE_BYTES`]).
    ///
    /// # Errors
    /// [`CorpusError::TokenizerOnText`] naming the first text that encodes to a control token,
    /// or that is longer than [`MAX_WHOLE_BYTES`] and cannot be cut (the caller names its
    /// document); [`CorpusError::Invalid`] when `tokenizers` fails.
    pub fn encode_batch(&self, texts: Vec<&str>) -> Result<Vec<Vec<u32>>> {
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); texts.len()];
        // (text, whether it is a later piece, encoded after a line break to drop) per unit
        let mut batch: Vec<(usize, bool, std::borrow::Cow<str>)> = Vec::new();
        let mut batch_bytes = 0;
        let mut cut_wrong = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let pieces = match &self.safe_cuts {
                Some((_, cuts)) if text.len() > PIECE_BYTES => pieces_at(text, PIECE_BYTES, cuts),
                _ => vec![*text],
            };
            // Each piece, not only a text left whole: a cut far on (the last resort) left a
            // piece of any size after a short first one (a review).
            for piece in &pieces {
                self.check_whole_bound(i, piece)?;
            }
            for (k, piece) in pieces.into_iter().enumerate() {
                let unit = if k == 0 {
                    std::borrow::Cow::Borrowed(piece)
                } else {
                    std::borrow::Cow::Owned(format!("\n{piece}"))
                };
                batch_bytes += unit.len();
                batch.push((i, k > 0, unit));
                if batch_bytes >= ENCODE_BATCH_BYTES {
                    self.encode_units(std::mem::take(&mut batch), &mut out, &mut cut_wrong)?;
                    batch_bytes = 0;
                }
            }
        }
        self.encode_units(batch, &mut out, &mut cut_wrong)?;
        // A text whose cut did change its tokens (the probe missed a case) is encoded whole,
        // up to the bound.
        cut_wrong.dedup();
        for i in cut_wrong {
            self.check_whole_bound(i, texts[i])?;
            out[i] = self.encode_whole(texts[i])?;
        }
        for (i, ids) in out.iter().enumerate() {
            self.check_no_control(ids).map_err(|e| match e {
                CorpusError::Tokenizer { path, message } => CorpusError::TokenizerOnText {
                    path,
                    text: i,
                    message,
                },
                e => e,
            })?;
        }
        Ok(out)
    }

    /// Refuses to encode `text` (the `i`-th text, or a piece of it between two cut places) in
    /// one call when it is longer than [`MAX_WHOLE_BYTES`].
    fn check_whole_bound(&self, i: usize, text: &str) -> Result<()> {
        if text.len() <= MAX_WHOLE_BYTES {
            return Ok(());
        }
        let places = match &self.safe_cuts {
            None => "this tokenizer changes tokens at every kind of cut dapt tries (after a line \
                     break, at a blank line, at a space between words)"
                .to_owned(),
            Some((_, cuts)) => format!(
                "it has no place where this tokenizer's text can be cut without changing its \
                 tokens ({})",
                cut_places(cuts)
            ),
        };
        Err(CorpusError::TokenizerOnText {
            path: self.origin.clone(),
            text: i,
            message: format!(
                "{:.1} MiB of a document cannot be encoded in smaller pieces: {places}; encoded \
                 in one piece it would take ~200 bytes of memory per byte, so dapt refuses a \
                 stretch of text over {} MiB that cannot be cut: split it",
                text.len() as f64 / f64::from(1 << 20),
                MAX_WHOLE_BYTES >> 20
            ),
        })
    }

    /// Encodes a batch of units and appends each one's ids to its text's.
    fn encode_units(
        &self,
        units: Vec<(usize, bool, std::borrow::Cow<str>)>,
        out: &mut [Vec<u32>],
        cut_wrong: &mut Vec<usize>,
    ) -> Result<()> {
        if units.is_empty() {
            return Ok(());
        }
        let encodings = self
            .tokenizer
            .encode_batch_fast(units.iter().map(|u| u.2.as_ref()).collect(), false)
            .map_err(|e| CorpusError::Invalid(format!("tokenizing failed: {e}")))?;
        let context = self
            .safe_cuts
            .as_ref()
            .map(|(context, _)| context.as_slice())
            .unwrap_or_default();
        for ((i, later, _), encoding) in units.into_iter().zip(encodings) {
            let ids = encoding.get_ids();
            match later {
                false => out[i].extend_from_slice(ids),
                true => match ids.strip_prefix(context) {
                    Some(rest) => out[i].extend_from_slice(rest),
                    None => cut_wrong.push(i),
                },
            }
        }
        Ok(())
    }

    fn encode_whole(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| CorpusError::Invalid(format!("tokenizing failed: {e}")))
    }

    /// A document's text ids with the BOS (if any) put first; the shard writer appends the EOS.
    pub fn with_bos(&self, text_ids: Vec<u32>) -> Vec<u32> {
        match &self.bos {
            None => text_ids,
            Some((_, bos)) => {
                let mut ids = Vec::with_capacity(text_ids.len() + 1);
                ids.push(*bos);
                ids.extend(text_ids);
                ids
            }
        }
    }

    /// The tokens dapt adds to each document, in order (`<|begin_of_text|>`, `<|end_of_text|>`).
    pub fn added_tokens(&self) -> Vec<String> {
        self.bos
            .iter()
            .map(|b| b.0.clone())
            .chain(std::iter::once(self.eos_token.clone()))
            .collect()
    }

    /// Split special tokens can still come back if the model itself merges ordinary text into
    /// a special token's id; a stream must never hold one, so that is refused.
    fn check_no_control(&self, ids: &[u32]) -> Result<()> {
        match ids
            .iter()
            .find(|&&id| self.control.get(id as usize).copied().unwrap_or(false))
        {
            None => Ok(()),
            Some(&id) => Err(CorpusError::Tokenizer {
                path: self.origin.clone(),
                message: format!(
                    "encodes ordinary text as the special token `{}` (id {id}); dapt never puts \
                     a special token inside a document",
                    token_name(&self.tokenizer, id)
                ),
            }),
        }
    }
}

/// `<name>` or `[NAME]` without whitespace (`<tool_call>`, `<|fim_prefix|>`, `[INST]`): the
/// shape of a control token, not of a word or a run of spaces that a vocabulary adds.
fn looks_like_control(content: &str) -> bool {
    let inner = content
        .strip_prefix('<')
        .and_then(|r| r.strip_suffix('>'))
        .or_else(|| content.strip_prefix('[').and_then(|r| r.strip_suffix(']')));
    inner.is_some_and(|i| !i.is_empty() && !i.chars().any(char::is_whitespace))
}

/// `corpus.bos_token` set under `add_bos: auto` for a tokenizer that adds no BOS (`why`).
fn named_but_not_added(name: &str, why: &str) -> CorpusError {
    CorpusError::Invalid(format!(
        "corpus.bos_token is `{name}`, but under corpus.add_bos: auto the tokenizer adds no BOS \
         ({why}): set corpus.add_bos: true to start each document with `{name}`, or leave \
         corpus.bos_token out"
    ))
}

fn find_token(tokenizer: &Tokenizer, names: &[&str]) -> Option<(String, u32)> {
    names.iter().find_map(|name| {
        tokenizer
            .token_to_id(name)
            .map(|id| ((*name).to_owned(), id))
    })
}

fn token_name(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer
        .id_to_token(id)
        .unwrap_or_else(|| format!("#{id}"))
}

/// The ids the post-processor puts before and after a single sequence, found by encoding a
/// probe with and without them (whatever the post-processor's kind: TemplateProcessing, a
/// Sequence holding one, Bert or Roberta processing).
///
/// `tokenizers` panics on a template that names a special token its `special_tokens` does not
/// define (`processors/template.rs`); that is caught here and returned as an error.
fn template(tokenizer: &Tokenizer) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
    if let Some(name) = undefined_template_token(tokenizer) {
        return Err(format!(
            "its post-processor template names the special token `{name}`, which its \
             `special_tokens` does not define"
        ));
    }
    let encode = |with_template: bool| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokenizer.encode_fast(TEMPLATE_PROBE, with_template)
        }))
        .map_err(|_| {
            "its post-processor cannot encode a sequence (a template that names a special \
             token its `special_tokens` does not define?)"
                .to_owned()
        })?
        .map_err(|e| e.to_string())
    };
    let plain = encode(false)?;
    let full = encode(true)?;
    let (plain, full) = (plain.get_ids(), full.get_ids());
    if plain.is_empty() || full.len() < plain.len() {
        return Ok((Vec::new(), Vec::new()));
    }
    let at = (0..=full.len() - plain.len()).find(|&i| full[i..i + plain.len()] == *plain);
    Ok(match at {
        Some(i) => (full[..i].to_vec(), full[i + plain.len()..].to_vec()),
        None => (Vec::new(), Vec::new()),
    })
}

/// A special token that a `TemplateProcessing` post-processor (alone or in a `Sequence`) puts in
/// a sequence without defining it in its `special_tokens`, read from its JSON form.
fn undefined_template_token(tokenizer: &Tokenizer) -> Option<String> {
    fn walk(v: &serde_json::Value) -> Option<String> {
        if v["type"] == "TemplateProcessing" {
            let defined = v["special_tokens"].as_object();
            for side in ["single", "pair"] {
                for piece in v[side].as_array().into_iter().flatten() {
                    if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                        if !defined.is_some_and(|d| d.contains_key(id)) {
                            return Some(id.to_owned());
                        }
                    }
                }
            }
        }
        v["processors"].as_array()?.iter().find_map(walk)
    }
    walk(&serde_json::to_value(tokenizer.get_post_processor()?).ok()?)
}

/// Whether `model` encodes what its vocabulary lacks as byte pieces `<0xNN>`.
fn byte_fallback(model: &ModelWrapper) -> bool {
    match model {
        ModelWrapper::BPE(bpe) => bpe.byte_fallback,
        ModelWrapper::Unigram(unigram) => unigram.byte_fallback(),
        _ => false,
    }
}

/// `<0xNN>` with two hex digits: a byte-fallback piece.
fn is_byte_piece(content: &str) -> bool {
    content
        .strip_prefix("<0x")
        .and_then(|r| r.strip_suffix('>'))
        .is_some_and(|hex| hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The model's unknown token: text may legitimately produce it.
fn unknown_token(model: &ModelWrapper) -> Option<String> {
    match model {
        ModelWrapper::BPE(bpe) => bpe.get_unk_token().clone(),
        ModelWrapper::WordPiece(wp) => Some(wp.unk_token.clone()),
        // Their unknown token is not public but is in their serialized form (a Unigram model's
        // `<unk>` was taken for a control token and refused the whole corpus at the first
        // character outside its vocabulary; an audit).
        ModelWrapper::Unigram(_) => {
            let json = serde_json::to_value(model).ok()?;
            let id = usize::try_from(json.get("unk_id")?.as_u64()?).ok()?;
            Some(json.get("vocab")?.get(id)?.get(0)?.as_str()?.to_owned())
        }
        ModelWrapper::WordLevel(_) => {
            let json = serde_json::to_value(model).ok()?;
            Some(json.get("unk_token")?.as_str()?.to_owned())
        }
    }
}

/// Trains a GPT-2 style byte-level BPE with `vocab_size` entries (including [`TRAINED_EOS`]).
/// Longest run of non-whitespace characters a tokenizer is trained on: BPE training's work grows
/// with the square of a word's length (huggingface/tokenizers#497: a 500,000-character run took
/// minutes), so longer runs are cut with spaces in the training text (only there; documents are
/// stored as they are). A run this long is no word whose merges matter.
pub const MAX_TRAINING_RUN: usize = 256;

/// `text` with a space put after every [`MAX_TRAINING_RUN`] characters of a run of
/// non-whitespace characters (borrowed when it has no such run).
fn cut_long_runs(text: &str) -> std::borrow::Cow<'_, str> {
    let mut run = 0;
    let long = text.chars().any(|c| {
        run = if c.is_whitespace() { 0 } else { run + 1 };
        run > MAX_TRAINING_RUN
    });
    if !long {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + text.len() / MAX_TRAINING_RUN);
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_whitespace() { 0 } else { run + 1 };
        if run > MAX_TRAINING_RUN {
            out.push(' ');
            run = 1;
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

pub fn train_byte_level_bpe<I, S>(texts: I, vocab_size: u32) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let fail = |e: tokenizers::Error| CorpusError::Tokenizer {
        path: PathBuf::from("(trained)"),
        message: e.to_string(),
    };
    let eos = AddedToken::from(TRAINED_EOS, true);
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size as usize)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![eos.clone()])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::new(false, true, true)));
    tokenizer
        .train(
            &mut trainer,
            texts.map(|t| cut_long_runs(t.as_ref()).into_owned()),
        )
        .map_err(fail)?;
    tokenizer.add_special_tokens([eos]).map_err(fail)?;
    Ok(tokenizer)
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    // A FIFO would block the open, a device never end the read (`tokenizer: /dev/zero` hashed
    // for ever; an audit).
    if !std::fs::metadata(path)
        .map_err(CorpusError::io(path))?
        .is_file()
    {
        return Err(CorpusError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut file = std::fs::File::open(path).map_err(CorpusError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(CorpusError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `corpus.tokenizer: /dev/zero` was hashed for ever, a FIFO blocked (an audit).
    /// A tokenizer safe to cut at a blank line either way (after the run of `\n`, before its
    /// last one) was named with "a blank line, a blank line" (an audit).
    #[test]
    fn each_place_a_text_can_be_cut_is_named_once() {
        assert_eq!(
            cut_places(&[
                Cut::AfterLineBreak,
                Cut::AfterBlankLines,
                Cut::BeforeLastLineBreak,
                Cut::BeforeSpace
            ]),
            "a lone line break, a blank line, a space between words"
        );
        assert_eq!(cut_places(&[Cut::BeforeLastLineBreak]), "a blank line");
    }

    #[test]
    fn only_a_regular_file_is_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("tokenizer.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        for path in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
            let err = sha256_file(path).expect_err("refused");
            assert!(matches!(err, CorpusError::NotAFile { .. }), "{err}");
        }
        // A `tokenizer_config.json` that is a FIFO beside the tokenizer blocked the read too.
        let config = dir.path().join(HF_TOKENIZER_CONFIG);
        let made = std::process::Command::new("mkfifo")
            .arg(&config)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let err = HfBos::beside(&fifo).expect_err("refused");
        assert!(matches!(err, CorpusError::NotAFile { .. }), "{err}");
    }

    /// A SentencePiece `tokenizer.model` given as `corpus.tokenizer` is named for what it is,
    /// with how to get a tokenizer.json (it said "expected value at line 2 column 1").
    #[test]
    fn a_sentencepiece_model_is_named_not_parsed_as_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.model");
        std::fs::write(
            &path,
            b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0b",
        )
        .expect("write");
        let err = CorpusTokenizer::load(&path, &TokenizerOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("tokenizer.model")
                && err.contains("SentencePiece")
                && err.contains("save_pretrained"),
            "{err}"
        );
        // A JSON file that is not a tokenizer keeps the parser's own message.
        std::fs::write(dir.path().join("t.json"), "{\"a\": 1}").expect("write");
        let err = CorpusTokenizer::load(&dir.path().join("t.json"), &TokenizerOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(!err.contains("SentencePiece"), "{err}");
    }

    #[test]
    fn pieces_are_cut_after_a_line_break_at_a_lines_start() {
        let text = "one line\n\n  indented\nnext ünï\n\tx\nlast".repeat(50);
        for target in [1, 7, 64, 1000, 10_000] {
            let pieces = pieces_at(&text, target, &[Cut::AfterLineBreak]);
            assert_eq!(pieces.concat(), text);
            for (i, piece) in pieces.iter().enumerate() {
                if i + 1 < pieces.len() {
                    assert!(piece.len() >= target && piece.ends_with('\n'), "{piece:?}");
                    let before = piece[..piece.len() - 1].chars().next_back();
                    assert!(before.is_some_and(|c| !c.is_whitespace()), "{piece:?}");
                    let next = pieces[i + 1].chars().next().expect("not empty");
                    assert!(!next.is_whitespace(), "{:?}", pieces[i + 1]);
                }
            }
        }
        assert_eq!(
            pieces_at("one line only", 2, &[Cut::AfterLineBreak]),
            ["one line only"]
        );
    }

    /// Paragraphs separated by blank lines (the usual JSONL layout) and text without a line
    /// break were never cut: a 16 MiB document took 3.4 GB (an audit).
    #[test]
    fn pieces_are_cut_at_blank_lines_and_as_a_last_resort_between_words() {
        let text = "First paragraph ends.\n\nSecond one\n\n\nthird, ünï.".repeat(40);
        let after = pieces_at(&text, 30, &[Cut::AfterBlankLines]);
        let before = pieces_at(&text, 30, &[Cut::BeforeLastLineBreak]);
        for pieces in [&after, &before] {
            assert!(pieces.len() > 20, "{pieces:?}");
            assert_eq!(pieces.concat(), text);
        }
        for piece in &after[1..] {
            assert!(!piece.starts_with(char::is_whitespace), "{piece:?}");
        }
        for (i, piece) in before.iter().enumerate().skip(1) {
            assert!(piece.starts_with('\n') && !piece[1..].starts_with('\n'));
            assert!(before[i - 1].ends_with('\n'), "the run's other line breaks");
        }
        // A line break is preferred to a space within reach; without one, a space.
        let all = [Cut::AfterLineBreak, Cut::BeforeSpace];
        let lines = "some words here\nmore words".repeat(20);
        for piece in &pieces_at(&lines, 40, &all)[1..] {
            assert!(piece.starts_with("more"), "{piece:?}");
        }
        let words = "no line break in this text at all ".repeat(20);
        let words = words.trim_end();
        let pieces = pieces_at(words, 40, &all);
        assert!(pieces.len() > 10, "{pieces:?}");
        assert_eq!(pieces.concat(), words);
        for piece in &pieces[1..] {
            assert!(
                piece.starts_with(' ') && !piece[1..].starts_with(' '),
                "{piece:?}"
            );
        }
        // Runs of spaces and whitespace at either side are never cut.
        assert_eq!(pieces_at("a  b \nc\n d", 1, &all), ["a  b \nc\n d"]);
    }

    /// A long text encoded in pieces (bounded memory) has the ids of the whole, for a
    /// byte-level BPE; a tokenizer whose probe fails encodes whole.
    #[test]
    fn a_long_text_in_pieces_has_the_ids_of_the_whole() {
        let lines: Vec<String> = (0..40_000)
            .map(|i| match i % 5 {
                0 => format!(
                    "Section {i}: the patient's dosage was {}.{} mg",
                    i % 97,
                    i % 7
                ),
                1 => format!("  indented code_{i}();"),
                2 => String::new(),
                3 => format!("价格 {i} über Äpfel <b>bold</b>"),
                _ => format!("\tSELECT * FROM t{i}; -- done"),
            })
            .collect();
        let text = lines.join("\n");
        assert!(text.len() > 4 * PIECE_BYTES);
        // Trained on texts that end with a blank line, so that it learns the line-break merge
        // `ĊĊ` (GPT-2's pre-tokenizer keeps `\n\n` whole only before the end or more
        // whitespace): a piece cut after `\n\n` would end with it where the whole text has
        // two `Ċ`.
        let training: Vec<String> = lines
            .chunks(50)
            .take(40)
            .map(|c| c.join("\n") + "\n\n")
            .collect();
        let tokenizer = train_byte_level_bpe(training.iter(), 600).expect("train");
        let tk = CorpusTokenizer::new(tokenizer, Path::new("t"), &TokenizerOptions::default())
            .expect("tokenizer");
        assert!(
            tk.tokenizer.token_to_id("ĊĊ").is_some(),
            "a blank line is one token"
        );
        let cuts = &tk.safe_cuts.as_ref().expect("byte-level BPE cuts").1;
        assert_eq!(
            cuts,
            &[
                Cut::AfterLineBreak,
                Cut::BeforeLastLineBreak,
                Cut::BeforeSpace
            ],
            "GPT-2's pre-tokenizer leaves a blank line's last line break alone"
        );
        let whole = tk.encode_whole(&text).expect("whole");
        let batch = tk
            .encode_batch(vec![&text, "short one", &text])
            .expect("batch");
        // (not assert_eq: a failure would print two million ids)
        assert!(
            batch[0] == whole,
            "the pieces' ids differ from the whole text's"
        );
        assert!(
            batch[2] == whole,
            "the pieces' ids differ from the whole text's"
        );
        assert_eq!(batch[1], tk.encode_whole("short one").expect("short"));

        // Paragraphs between blank lines, and one paragraph without a line break, are cut too
        // (they were encoded whole: ~200 bytes of memory per byte) and keep their ids.
        let paragraphs: Vec<String> = (0..12_000)
            .map(|i| {
                format!(
                    "Section {i}: the patient's dosage was {}.{} mg; 价格 über <b>bold</b>.",
                    i % 97,
                    i % 7
                )
            })
            .collect();
        for sep in ["\n\n", "\n\n\n", " "] {
            let text = paragraphs.join(sep);
            assert!(text.len() > 2 * PIECE_BYTES);
            assert!(pieces_at(&text, PIECE_BYTES, cuts).len() > 2, "{sep:?}");
            let batch = tk.encode_batch(vec![&text]).expect("batch");
            assert!(
                batch[0] == tk.encode_whole(&text).expect("whole"),
                "{sep:?}"
            );
        }
    }

    /// A Metaspace (SentencePiece-style) tokenizer: `▁` for spaces, put before a sequence's
    /// first piece only; its pieces keep their ids too.
    #[test]
    fn a_metaspace_tokenizer_cuts_at_blank_lines_with_the_ids_of_the_whole() {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert((*t).into(), i.into());
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
        }
        let mut next = 259;
        let mut add = |piece: String| {
            if !vocab.contains_key(&piece) {
                vocab.insert(piece, next.into());
                next += 1;
            }
        };
        for c in "▁abcdefghijklmnopqrstuvwxyzST.:;0123456789".chars() {
            add(c.to_string());
        }
        let merges = [
            ("▁", "t"),
            ("▁t", "h"),
            ("▁th", "e"),
            ("e", "."),
            ("▁", "S"),
        ];
        for (a, b) in merges {
            add(format!("{a}{b}"));
        }
        let metaspace = serde_json::json!({"type": "Metaspace", "replacement": "▁",
            "prepend_scheme": "first", "split": true});
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": null, "pre_tokenizer": metaspace, "post_processor": null,
            "decoder": metaspace,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab,
                "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
        });
        let tokenizer: Tokenizer = serde_json::from_value(json).expect("a tokenizer");
        let tk = CorpusTokenizer::new(tokenizer, Path::new("t"), &TokenizerOptions::default())
            .expect("tokenizer");
        let cuts = tk.safe_cuts.as_ref().expect("metaspace cuts").1.clone();
        assert!(
            cuts.contains(&Cut::AfterBlankLines) || cuts.contains(&Cut::BeforeLastLineBreak),
            "{cuts:?}"
        );
        // 3 MiB of paragraphs between blank lines: cut, and the ids of the whole.
        let paragraph = "Section 12: the dose was 5.5 mg; the end.";
        let mut text = String::new();
        let mut i = 0;
        while text.len() < 3 << 20 {
            text.push_str(&format!("{paragraph} {i}"));
            text.push_str(if i % 3 == 0 { "\n\n\n" } else { "\n\n" });
            i += 1;
        }
        let text = text.trim_end();
        assert!(pieces_at(text, PIECE_BYTES, &cuts).len() > 8);
        let batch = tk.encode_batch(vec![text]).expect("batch");
        assert!(batch[0] == tk.encode_whole(text).expect("whole"));
    }

    /// A document longer than [`MAX_WHOLE_BYTES`] with no place to cut is refused before it is
    /// encoded (it would take ~200 bytes of memory per byte), naming the text for the caller.
    #[test]
    fn a_long_text_that_cannot_be_cut_is_refused() {
        let tokenizer = train_byte_level_bpe(["some text to train on"].iter(), 300).expect("train");
        let tk = CorpusTokenizer::new(tokenizer, Path::new("t.json"), &TokenizerOptions::default())
            .expect("tokenizer");
        let long = "x".repeat(MAX_WHOLE_BYTES + 1);
        let err = tk.encode_batch(vec!["short", &long]).expect_err("refused");
        match err {
            CorpusError::TokenizerOnText { text, message, .. } => {
                assert_eq!(text, 1);
                assert!(
                    message.contains("cannot be encoded in smaller pieces"),
                    "{message}"
                );
                assert!(message.contains("split it"), "{message}");
            }
            e => panic!("{e}"),
        }
        // A short paragraph, a line break, then the long run: the cut after the paragraph
        // left the run as one piece of any size (a review).
        let behind = format!("A first paragraph.\n{long}");
        let err = tk.encode_batch(vec![&behind]).expect_err("refused");
        assert!(
            matches!(err, CorpusError::TokenizerOnText { text: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn long_runs_are_cut_for_training_only() {
        assert!(matches!(
            cut_long_runs("short words"),
            std::borrow::Cow::Borrowed(_)
        ));
        let long = "x".repeat(2 * MAX_TRAINING_RUN + 5);
        let cut = cut_long_runs(&long);
        let runs: Vec<usize> = cut.split(' ').map(str::len).collect();
        assert_eq!(runs, [MAX_TRAINING_RUN, MAX_TRAINING_RUN, 5]);
        // a 200,000-character run trains in moments (minutes before the cut)
        let started = std::time::Instant::now();
        let texts = ["a".repeat(200_000), "ordinary text here".to_owned()];
        train_byte_level_bpe(texts.iter(), 300).expect("train");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_template_naming_an_undefined_token_is_an_error_not_a_panic() {
        let mut tokenizer =
            train_byte_level_bpe(["some text to train on"].iter(), 300).expect("train");
        // `<s>` is not in `special_tokens`.
        let json = serde_json::json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {}});
        let processor: tokenizers::processors::PostProcessorWrapper =
            serde_json::from_value(json).expect("processor");
        tokenizer.with_post_processor(Some(processor));
        let err =
            CorpusTokenizer::new(tokenizer, Path::new("t.json"), &TokenizerOptions::default())
                .err()
                .expect("refused");
        assert!(
            err.to_string().contains("t.json") && err.to_string().contains("template"),
            "{err}"
        );
    }

    #[test]
    fn trains_a_byte_level_bpe_that_round_trips() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("SELECT name FROM accounts WHERE id = {i}; -- ünïcode ok"))
            .collect();
        let tokenizer = train_byte_level_bpe(texts.iter(), 400).expect("train");
        let tk = CorpusTokenizer::new(tokenizer, Path::new("t"), &TokenizerOptions::default())
            .expect("eos");
        assert_eq!(tk.eos_token, TRAINED_EOS);
        assert!(
            tk.vocab_size <= 400 && tk.vocab_size > 256,
            "{}",
            tk.vocab_size
        );
        let ids = tk.encode("SELECT name FROM accounts").expect("encode");
        assert!(ids.len() < 10, "{ids:?}");
        let back = tk.tokenizer.decode(&ids, false).expect("decode");
        assert_eq!(back, "SELECT name FROM accounts");
        let nope = TokenizerOptions {
            eos_token: Some("<nope>".into()),
            ..TokenizerOptions::default()
        };
        let err = CorpusTokenizer::new(tk.tokenizer.clone(), Path::new("t.json"), &nope)
            .err()
            .expect("missing eos");
        assert!(err.to_string().contains("t.json") && err.to_string().contains("<nope>"));
    }
}
