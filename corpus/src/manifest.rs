//! `manifest.json`: what a prepared corpus holds, and the checksums that guard it.
//!
//! A job trusts a shard only after its size and SHA-256 match the manifest. Hashing a large
//! corpus at every restart would be slow, so a verified file's (size, mtime, hash) is remembered
//! in `.verified.json` beside the manifest; a file whose size or mtime changed is hashed again.
//! That cache cannot see a byte changed with the mtime kept (bit rot, `cp -a`), so
//! [`VerifyMode::Full`] ignores it: `dapt prepare` and `dapt launch` verify in full by default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::error::{CorpusError, Result};
use crate::spec::Role;
use crate::tokenizer::sha256_file;

/// Bumped whenever the layout of a prepared corpus changes.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const REPORT_FILE: &str = "report.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The verification cache: each verified file's size, mtime and hash.
pub const VERIFIED_FILE: &str = ".verified.json";

/// How much of a corpus is hashed again before it is trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Every byte of every file: catches bit rot and a file changed with its mtime kept
    /// (`cp -a`, `touch -r`). What `dapt prepare` and `dapt launch` do by default.
    #[default]
    Full,
    /// Files whose size and mtime match what the last verification recorded are trusted
    /// without reading them (`.verified.json`); others are hashed.
    Cached,
}

impl std::str::FromStr for VerifyMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(VerifyMode::Full),
            "cached" => Ok(VerifyMode::Cached),
            _ => Err(format!("unknown verify mode `{s}`: use full or cached")),
        }
    }
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifyMode::Full => "full",
            VerifyMode::Cached => "cached",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    /// Hash of the corpus spec, the tokenizer and every input file's path, size and mtime, and
    /// of the text rules it was prepared under.
    pub inputs_fingerprint: String,
    /// The version of dapt's text rules (decoding, extraction, tokenization) it was prepared
    /// under ([`crate::prepare::TEXT_RULES`]; 3 for corpora from before it was recorded).
    #[serde(default = "rules_before_recorded")]
    pub text_rules: u32,
    /// Hash of the inputs alone (the corpus spec, the tokenizer, every input file's path, size
    /// and mtime), without dapt's version or text rules: a corpus of older rules from the same
    /// inputs is told by it (absent in corpora from before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_only_fingerprint: Option<String>,
    pub tokenizer: TokenizerInfo,
    pub token_dtype: TokenDtype,
    pub sources: Vec<SourceManifest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// The tokenizer, copied beside the shards.
    pub file: String,
    pub sha256: String,
    pub vocab_size: u32,
    pub eos_token: String,
    pub eos_id: u32,
    /// The beginning-of-sequence token that starts every document of the corpus (`None`: the
    /// documents start with their text). A document is `[bos] text eos`; windows cut across
    /// documents, so a window starts with BOS only where a document starts.
    #[serde(default)]
    pub bos_token: Option<String>,
    #[serde(default)]
    pub bos_id: Option<u32>,
    /// Trained by `dapt prepare` rather than given.
    pub trained: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceManifest {
    pub name: String,
    pub role: Role,
    pub weight: f64,
    pub held_out_fraction: f64,
    pub train: StreamManifest,
    pub held_out: StreamManifest,
}

/// One token stream (a source's training or held-out documents), as shards in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamManifest {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardManifest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardManifest {
    pub tokens: u64,
    pub documents: u64,
    /// Little-endian token ids.
    pub token_file: FileEntry,
    /// Little-endian u64 offsets (in tokens, within the shard) where each document starts.
    pub document_file: FileEntry,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the corpus directory.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

fn rules_before_recorded() -> u32 {
    3
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(CorpusError::io(&path))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| CorpusError::Manifest {
                path: path.clone(),
                message: format!("not a dapt corpus manifest: {e}"),
            })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(CorpusError::Manifest {
                path,
                message: format!(
                    "format version {} is not the {} this dapt reads: run `dapt prepare` again",
                    manifest.format_version, FORMAT_VERSION
                ),
            });
        }
        manifest
            .check_paths()
            .and_then(|()| manifest.check_values())
            .map_err(|message| CorpusError::Manifest { path, message })?;
        Ok(manifest)
    }

    /// The numbers agree with one another as `dapt prepare` writes them, so that nothing
    /// downstream sizes a model or a buffer from a damaged or hand-edited field: the vocabulary
    /// within [`crate::spec::MAX_VOCAB_SIZE`] and the token dtype it implies, the EOS and BOS
    /// ids inside it, each source named once with a finite weight of at least 0 and a held-out
    /// fraction in [0, 1), each shard's token file `tokens` ids long, and each stream's counts
    /// the sums of its shards', no file listed twice. The error names the field (or the file).
    fn check_values(&self) -> std::result::Result<(), String> {
        let t = &self.tokenizer;
        if t.vocab_size == 0 || t.vocab_size > crate::spec::MAX_VOCAB_SIZE {
            return Err(format!(
                "tokenizer.vocab_size {} is not between 1 and {}",
                t.vocab_size,
                crate::spec::MAX_VOCAB_SIZE
            ));
        }
        if self.token_dtype != TokenDtype::for_vocab(t.vocab_size) {
            return Err(format!(
                "token_dtype {:?} does not fit tokenizer.vocab_size {}",
                self.token_dtype, t.vocab_size
            ));
        }
        if t.eos_id >= t.vocab_size {
            return Err(format!(
                "tokenizer.eos_id {} is not below tokenizer.vocab_size {}",
                t.eos_id, t.vocab_size
            ));
        }
        match (&t.bos_token, t.bos_id) {
            (None, None) => {}
            (Some(_), Some(id)) if id < t.vocab_size => {}
            (Some(_), Some(id)) => {
                return Err(format!(
                    "tokenizer.bos_id {id} is not below tokenizer.vocab_size {}",
                    t.vocab_size
                ))
            }
            _ => {
                return Err(
                    "tokenizer.bos_token and tokenizer.bos_id: one without the other".into(),
                )
            }
        }
        let width = self.token_dtype.bytes() as u64;
        let mut names = std::collections::HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            if !names.insert(source.name.as_str()) {
                return Err(format!(
                    "sources[{i}].name `{}` is there twice",
                    source.name
                ));
            }
            if !(source.weight.is_finite() && source.weight >= 0.0) {
                return Err(format!(
                    "sources[{i}].weight {} is not a finite number of at least 0",
                    source.weight
                ));
            }
            if !(0.0..1.0).contains(&source.held_out_fraction) {
                return Err(format!(
                    "sources[{i}].held_out_fraction {} is not in [0, 1)",
                    source.held_out_fraction
                ));
            }
            for (stream, manifest) in [("train", &source.train), ("held_out", &source.held_out)] {
                let (mut tokens, mut documents) = (0u64, 0u64);
                for (j, shard) in manifest.shards.iter().enumerate() {
                    let field = format!("sources[{i}].{stream}.shards[{j}]");
                    if shard.tokens.checked_mul(width) != Some(shard.token_file.bytes) {
                        return Err(format!(
                            "{field}.tokens {} does not match its token_file's {} bytes",
                            shard.tokens, shard.token_file.bytes
                        ));
                    }
                    if shard.documents.checked_mul(8) != Some(shard.document_file.bytes) {
                        return Err(format!(
                            "{field}.documents {} does not match its document_file's {} bytes",
                            shard.documents, shard.document_file.bytes
                        ));
                    }
                    tokens = tokens.checked_add(shard.tokens).ok_or_else(|| {
                        format!("sources[{i}].{stream}: the shards' tokens overflow")
                    })?;
                    documents = documents.checked_add(shard.documents).ok_or_else(|| {
                        format!("sources[{i}].{stream}: the shards' documents overflow")
                    })?;
                }
                if (tokens, documents) != (manifest.tokens, manifest.documents) {
                    return Err(format!(
                        "sources[{i}].{stream}: tokens {} and documents {} are not the sums of its \
                         shards' ({tokens} and {documents})",
                        manifest.tokens, manifest.documents
                    ));
                }
            }
        }
        let mut files = std::collections::HashSet::new();
        for (path, _, _) in self.files() {
            if !files.insert(path) {
                return Err(format!("`{path}` is listed twice"));
            }
        }
        Ok(())
    }

    /// Every path the manifest names stays inside its corpus directory, as `dapt prepare`
    /// writes them: source names as the job allows them, the tokenizer a plain file name, each
    /// shard file `<its source>/<a plain file name>`. `dapt prepare` deletes a replaced corpus
    /// by these paths and readers open them, so a manifest that names `../x` or `/x` (handed
    /// over, or damaged) is refused, naming the field, before anything is read or removed.
    fn check_paths(&self) -> std::result::Result<(), String> {
        fn plain(name: &str) -> bool {
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
        }
        if !plain(&self.tokenizer.file) {
            return Err(format!(
                "tokenizer.file `{}` is not a file name inside the corpus directory",
                self.tokenizer.file.escape_debug()
            ));
        }
        for (i, source) in self.sources.iter().enumerate() {
            crate::spec::SourceName::try_from(source.name.clone())
                .map_err(|e| format!("sources[{i}].name: {e}"))?;
            for (stream, manifest) in [("train", &source.train), ("held_out", &source.held_out)] {
                for (j, shard) in manifest.shards.iter().enumerate() {
                    for (field, file) in [
                        ("token_file", &shard.token_file),
                        ("document_file", &shard.document_file),
                    ] {
                        let inside = file
                            .path
                            .split_once('/')
                            .is_some_and(|(dir, name)| dir == source.name && plain(name));
                        if !inside {
                            return Err(format!(
                                "sources[{i}].{stream}.shards[{j}].{field}.path `{}` is not \
                                 `{}/<file name>`",
                                file.path.escape_debug(),
                                source.name
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What decides the token windows a job trains on, as one SHA-256 (lowercase hex): the
    /// tokenizer's hash, the token dtype, and each source's name, weight, held-out fraction and
    /// shards' hashes, in order. Two corpora with the same digest give the same samples for the
    /// same seed and `seq_len`; a checkpoint records it, so that a job resumed on a corpus
    /// prepared again differently is refused rather than trained on other samples (or other
    /// token ids) under the same ledger.
    pub fn content_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.tokenizer.sha256.as_bytes());
        h.update([self.token_dtype.bytes() as u8]);
        for s in &self.sources {
            h.update(b"\0source\0");
            h.update(s.name.as_bytes());
            h.update(s.weight.to_le_bytes());
            h.update(s.held_out_fraction.to_le_bytes());
            for shard in s.train.shards.iter().chain(&s.held_out.shards) {
                h.update(shard.token_file.sha256.as_bytes());
            }
        }
        hex::encode(h.finalize())
    }

    /// The job's corpus section names the sources this corpus was prepared with, with the same
    /// roles, weights and held-out fractions (what the sample order is made of). A job file
    /// edited after `dapt prepare` would otherwise train on the old mixture without a word.
    ///
    /// # Errors
    /// The first difference, naming the job's field, and saying to run `dapt prepare` again.
    pub fn check_spec(&self, spec: &crate::CorpusSpec) -> std::result::Result<(), String> {
        let again = "run `dapt prepare` again";
        let job = spec.sources();
        for (i, source) in job.iter().enumerate() {
            let Some(prepared) = self.sources.iter().find(|s| s.name == source.name.as_str())
            else {
                return Err(format!(
                    "corpus.sources[{i}] `{}` is not in the corpus at {}: {again}",
                    source.name,
                    spec.output.display()
                ));
            };
            for (field, job_value, was) in [
                ("weight", source.weight.get(), prepared.weight),
                (
                    "held_out",
                    source.held_out.get(),
                    prepared.held_out_fraction,
                ),
            ] {
                if job_value != was {
                    return Err(format!(
                        "corpus.sources[{i}].{field} is {job_value}, but the corpus at {} was \
                         prepared with {was}: {again}",
                        spec.output.display()
                    ));
                }
            }
            if source.role != prepared.role {
                return Err(format!(
                    "corpus.sources[{i}].role differs from the one the corpus at {} was \
                     prepared with: {again}",
                    spec.output.display()
                ));
            }
        }
        if let Some(extra) = self
            .sources
            .iter()
            .find(|s| !job.iter().any(|j| j.name.as_str() == s.name))
        {
            return Err(format!(
                "the corpus at {} has a source `{}` that the job's corpus.sources does not: \
                 {again}",
                spec.output.display(),
                extra.name
            ));
        }
        Ok(())
    }

    /// Every file the manifest vouches for, tokenizer included.
    pub fn files(&self) -> impl Iterator<Item = (&str, Option<u64>, &str)> {
        let tokenizer = std::iter::once((
            self.tokenizer.file.as_str(),
            None,
            self.tokenizer.sha256.as_str(),
        ));
        let shards = self
            .sources
            .iter()
            .flat_map(|s| s.train.shards.iter().chain(&s.held_out.shards))
            .flat_map(|shard| [&shard.token_file, &shard.document_file])
            .map(|f| (f.path.as_str(), Some(f.bytes), f.sha256.as_str()));
        tokenizer.chain(shards)
    }

    /// Checks every file's size and SHA-256, skipping files whose size, mtime and hash were
    /// already verified (unless `full`). The first mismatch is the error.
    pub fn verify(&self, dir: &Path, full: bool) -> Result<VerifySummary> {
        let cache_path = dir.join(VERIFIED_FILE);
        let mut cache: BTreeMap<String, Verified> = if full {
            BTreeMap::new()
        } else {
            std::fs::read(&cache_path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default()
        };
        let mut summary = VerifySummary::default();
        for (rel, bytes, sha256) in self.files() {
            let path = dir.join(rel);
            let meta = std::fs::metadata(&path).map_err(CorpusError::io(&path))?;
            if let Some(expected) = bytes {
                if meta.len() != expected {
                    return Err(CorpusError::SizeMismatch {
                        path,
                        expected,
                        found: meta.len(),
                    });
                }
            }
            let seen = Verified {
                bytes: meta.len(),
                mtime_ns: mtime_ns(&meta),
                sha256: sha256.to_owned(),
            };
            if cache.get(rel) == Some(&seen) {
                summary.cached += 1;
                continue;
            }
            let found = sha256_file(&path)?;
            if found != sha256 {
                return Err(CorpusError::ChecksumMismatch {
                    path,
                    expected: sha256.to_owned(),
                    found,
                });
            }
            summary.hashed += 1;
            summary.hashed_bytes += meta.len();
            cache.insert(rel.to_owned(), seen);
        }
        if summary.hashed > 0 {
            // Best effort: a read-only corpus directory still verifies, just every time.
            if let Ok(json) = serde_json::to_vec(&cache) {
                let _ = write_atomic(&cache_path, &json);
            }
        }
        Ok(summary)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifySummary {
    pub hashed: u64,
    pub hashed_bytes: u64,
    pub cached: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Verified {
    bytes: u64,
    mtime_ns: u128,
    sha256: String,
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// What [`write_atomic`]'s temporary files are called: this prefix and
/// [`ATOMIC_TEMP_RANDOM`] random letters and digits. A run interrupted mid-write leaves one; only
/// names of exactly this shape are taken for dapt's own in a corpus directory.
pub const ATOMIC_TEMP_PREFIX: &str = ".tmp";
pub const ATOMIC_TEMP_RANDOM: usize = 6;

/// Whether `name` is one of [`write_atomic`]'s temporary files (`.tmpAbC123`), as opposed to,
/// say, a user's `.tmp-notes.txt`.
pub fn is_atomic_temp(name: &str) -> bool {
    name.strip_prefix(ATOMIC_TEMP_PREFIX).is_some_and(|rest| {
        rest.len() == ATOMIC_TEMP_RANDOM && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place. The file gets the
/// permissions of any file the process creates (0666 less the umask: 0644 under the usual
/// umask), not the 0600 of a private temporary file: a corpus or a checkpoint is read by workers
/// that may run as another user.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(ATOMIC_TEMP_PREFIX)
        .rand_bytes(ATOMIC_TEMP_RANDOM)
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(CorpusError::io(dir))?;
    std::io::Write::write_all(&mut tmp, bytes)
        .map_err(CorpusError::io(tmp.path().to_path_buf()))?;
    tmp.as_file()
        .sync_all()
        .map_err(CorpusError::io(tmp.path().to_path_buf()))?;
    tmp.persist(path).map_err(|e| CorpusError::Io {
        path: PathBuf::from(path),
        error: e.error,
    })?;
    Ok(())
}
