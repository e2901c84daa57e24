//! The one error type of `dapt-corpus`. Every variant names the file (and line, where there is
//! one) so that the user can act on it without a debugger.
//!
//! A variant that shows an underlying error in its message keeps it as a plain field, not as
//! its `source()`: a reporter that prints the whole chain (anyhow's `{:#}`) would otherwise say
//! the cause twice ("No such file or directory (os error 2): No such file or directory").

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("source `{source_name}`: pattern `{pattern}` matches no file")]
    NoMatch {
        source_name: String,
        pattern: String,
    },
    /// A literal path in a source's `paths` that cannot be read (missing, no permission).
    #[error("source `{source_name}`: paths[{index}] {path}: {error}")]
    MissingPath {
        source_name: String,
        index: usize,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("source `{source_name}`: invalid glob pattern `{pattern}`: {message}")]
    BadPattern {
        source_name: String,
        pattern: String,
        message: String,
    },
    #[error(
        "{path}: unsupported file type (expected {})",
        crate::ingest::SUPPORTED_EXTENSIONS
    )]
    UnsupportedFormat { path: PathBuf },
    /// A FIFO, socket or device named in a source's `paths` (or a tokenizer that is not a file):
    /// its read would block or never end.
    #[error("{path}: not a regular file (a directory, FIFO, socket or device): dapt reads regular files")]
    NotAFile { path: PathBuf },
    /// The bytes are not text dapt can read ([`crate::ingest::encoding::Undecodable`]).
    #[error("{path}: {reason}")]
    NotText { path: PathBuf, reason: String },
    #[error("{path}: not a valid gzip stream: {error}")]
    Gzip {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("source `{source_name}` has no non-empty documents (after removing {duplicates} duplicates and {empty} empty ones){passed_over}")]
    EmptySource {
        source_name: String,
        duplicates: u64,
        empty: u64,
        /// `; N JSONL lines were not ...`: what was passed over, or empty.
        passed_over: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// [`CorpusError::Tokenizer`] on the `text`-th text of a batch given to
    /// `CorpusTokenizer::encode_batch`, for the caller to name the document.
    #[error("tokenizer {path}: {message} (text {text} of the batch)")]
    TokenizerOnText {
        path: PathBuf,
        text: usize,
        message: String,
    },
    #[error("tokenizer {path} has SHA-256 {found}, but the corpus at {corpus} was tokenized with {expected}: run `dapt prepare` again")]
    TokenizerMismatch {
        path: PathBuf,
        corpus: PathBuf,
        expected: String,
        found: String,
    },
    /// A model's tokenizer that is not the corpus's (`dapt eval`, `dapt train` from a base
    /// model): preparing the corpus again would not help (it said so), the model belongs to
    /// another tokenizer.
    #[error("{path}: this model's tokenizer (SHA-256 {found}) is not the one the corpus at {corpus} was tokenized with ({expected}): every id would mean another token; use the corpus prepared with this model's tokenizer, or prepare one with `corpus.tokenizer: {path}`")]
    ModelTokenizer {
        path: PathBuf,
        corpus: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: size is {found} bytes, the manifest says {expected}: the file is cut short or was replaced")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: SHA-256 is {found}, the manifest says {expected}: the file is corrupt")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("source `{source_name}` has {tokens} training tokens, fewer than one sample of seq_len + 1 = {needed}")]
    SourceTooSmall {
        source_name: String,
        tokens: u64,
        needed: u64,
    },
    #[error("{path}: token {position} has id {id}, not below the vocabulary of {vocab}: the shard is corrupt (run `dapt prepare --verify full`)")]
    TokenOutOfRange {
        path: PathBuf,
        /// Index of the token within the shard.
        position: u64,
        id: u32,
        vocab: u32,
    },
    #[error("{path}: decompresses to more than {limit} bytes (corpus.max_file_bytes): split the file or raise the limit")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{link}: a symbolic link to {target}, outside the source directory {root}: dapt does not follow links out of a corpus tree (name the target in `paths` if it belongs to the corpus)")]
    LinkOutsideTree {
        link: PathBuf,
        target: PathBuf,
        root: PathBuf,
    },
    /// Another `dapt prepare` (or `dapt launch`) holds the output's lock: retrying once it has
    /// finished helps.
    #[error("corpus.output {output} is being prepared by another dapt prepare ({holder}), which holds {lock}: wait for it to finish, or give this job a corpus.output of its own")]
    OutputLocked {
        output: PathBuf,
        lock: PathBuf,
        /// Who holds it, as the lock file says (`pid 1234`), or `unknown pid`.
        holder: String,
    },
    /// `dapt launch` resuming: the corpus is out of date with the job file, and preparing it again
    /// would replace the one the job's checkpoint was trained on.
    #[error("corpus.output {output}: the job's checkpoint {checkpoint} was trained on the corpus there, and the corpus's inputs changed since (the job file's corpus: section, the tokenizer or the source files): the corpus they make now is another, and it would replace the corpus the resume needs (kept; the new one was discarded); restore the inputs to resume; or, to go on training the adapted model on the new inputs, start a new job from its weights (model.hf: the checkpoint's export, `dapt export`; another checkpoint.dir: its schedule starts again); `dapt prepare` replaces the corpus here, after which this checkpoint.dir cannot resume")]
    NeededByCheckpoint {
        output: PathBuf,
        checkpoint: PathBuf,
    },
    /// A job (or an evaluation) reads the corpus: a new one would change it under the job.
    #[error("corpus.output {output} is in use: a training job or an evaluation reads the corpus there (a process holds {lock}), and preparing it again would change the corpus and tokenizer under it; stop it first, or give this job a corpus.output of its own")]
    OutputInUse { output: PathBuf, lock: PathBuf },
    /// Publishing stopped part way: the output holds no corpus until the next run, which finishes
    /// publishing the one kept in `staged`.
    #[error("corpus.output {output}: publishing the new corpus stopped part way ({path}: {error}); it is kept whole in {staged}, and the next dapt prepare on this output finishes publishing it")]
    PublishInterrupted {
        output: PathBuf,
        staged: PathBuf,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl CorpusError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CorpusError {
        let path = path.into();
        move |error| CorpusError::Io { path, error }
    }
}

pub type Result<T, E = CorpusError> = std::result::Result<T, E>;
