//! Reads samples from a prepared corpus through memory maps: O(1) per sample, no index in RAM
//! beyond one offset per shard, and nothing of the corpus copied except the sample itself.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{CorpusError, Result};
use crate::manifest::{Manifest, StreamManifest, TokenDtype, VerifySummary};
use crate::order::{SampleOrder, SampleRef};
use crate::tokenizer::sha256_file;

/// One source's training or held-out tokens, as the concatenation of its shards.
pub struct TokenStream {
    maps: Vec<Mmap>,
    /// Each shard's token file, to name it in errors.
    paths: Vec<PathBuf>,
    /// Token ids must be below this (the corpus tokenizer's vocabulary).
    vocab: u32,
    /// Token offset of each shard in the stream, plus the total at the end.
    starts: Vec<u64>,
    dtype: TokenDtype,
}

impl TokenStream {
    fn open(dir: &Path, stream: &StreamManifest, dtype: TokenDtype, vocab: u32) -> Result<Self> {
        let mut maps = Vec::with_capacity(stream.shards.len());
        let mut paths = Vec::with_capacity(stream.shards.len());
        let mut starts = vec![0u64];
        for shard in &stream.shards {
            let path = dir.join(&shard.token_file.path);
            let file = File::open(&path).map_err(CorpusError::io(&path))?;
            // SAFETY: the shard was verified against its checksum and dapt never writes to a
            // published shard (prepare writes a new directory and renames it into place, and
            // not while a reader holds the corpus: `crate::readers`). A file truncated
            // underneath a running job by anything else would fault the reader (SIGBUS);
            // `read` checks each shard's size before it touches its map, so that a truncation
            // is an error naming the shard (an audit: the workers died of SIGBUS, and nothing
            // named the file), and only a truncation in the microseconds between that check
            // and the copy still faults.
            let map = unsafe { Mmap::map(&file) }.map_err(CorpusError::io(&path))?;
            // `Manifest::read` checked that this does not overflow; a manifest built otherwise
            // saturates and fails the size check.
            let expected = shard.tokens.saturating_mul(dtype.bytes() as u64);
            if map.len() as u64 != expected {
                return Err(CorpusError::SizeMismatch {
                    path,
                    expected,
                    found: map.len() as u64,
                });
            }
            maps.push(map);
            paths.push(path);
            starts.push(starts.last().copied().unwrap_or(0) + shard.tokens);
        }
        Ok(TokenStream {
            maps,
            paths,
            vocab,
            starts,
            dtype,
        })
    }

    /// Tokens in the stream.
    pub fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Windows of `seq_len + 1` tokens with stride `seq_len`.
    pub fn windows(&self, seq_len: u32) -> u64 {
        self.len().saturating_sub(1) / seq_len.max(1) as u64
    }

    /// The windows an evaluation of at most `max_tokens` predicted tokens reads: whole windows
    /// of `seq_len` that fit in `max_tokens`, and at least one (a budget under one window
    /// evaluates one), never more than the stream holds. Before, the budget was rounded up: an
    /// `eval_tokens` of 33 at `seq_len` 32 evaluated 64 tokens.
    pub fn eval_windows(&self, seq_len: u32, max_tokens: u64) -> u64 {
        self.windows(seq_len)
            .min((max_tokens / seq_len.max(1) as u64).max(1))
    }

    /// Copies tokens `[start, start + out.len())` into `out`; the range must lie in the stream.
    ///
    /// # Errors
    /// [`CorpusError::TokenOutOfRange`], naming the shard, when an id is not below the corpus
    /// tokenizer's vocabulary: a shard damaged in a way its checksum was not asked to catch
    /// (the verification cache trusts size and mtime). The model would index past its
    /// embedding with it.
    pub fn read(&self, start: u64, out: &mut [u32]) -> Result<()> {
        assert!(
            start + out.len() as u64 <= self.len(),
            "tokens {start}..{} outside a stream of {}",
            start + out.len() as u64,
            self.len()
        );
        let mut shard = self.starts.partition_point(|&s| s <= start) - 1;
        let mut pos = start;
        let mut filled = 0;
        while filled < out.len() {
            let local = (pos - self.starts[shard]) as usize;
            let available = (self.starts[shard + 1] - pos) as usize;
            let n = available.min(out.len() - filled);
            let part = &mut out[filled..filled + n];
            let expected = self.maps[shard].len() as u64;
            // By path, not through an open file: a corpus of a thousand shards would need a
            // thousand descriptors. A shard replaced by a rename leaves the mapped file whole;
            // only one cut short in place is caught here (and needs catching).
            let found = std::fs::metadata(&self.paths[shard])
                .map_err(CorpusError::io(&self.paths[shard]))?
                .len();
            if found < expected {
                return Err(CorpusError::SizeMismatch {
                    path: self.paths[shard].clone(),
                    expected,
                    found,
                });
            }
            decode(self.dtype, &self.maps[shard], local, part);
            if let Some(i) = part.iter().position(|&id| id >= self.vocab) {
                return Err(CorpusError::TokenOutOfRange {
                    path: self.paths[shard].clone(),
                    position: (local + i) as u64,
                    id: part[i],
                    vocab: self.vocab,
                });
            }
            filled += n;
            pos += n as u64;
            shard += 1;
        }
        Ok(())
    }

    /// Copies window `window` (tokens `[window * seq_len, window * seq_len + seq_len + 1)`);
    /// errors as [`read`](Self::read).
    pub fn read_window(&self, window: u64, seq_len: u32, out: &mut [u32]) -> Result<()> {
        assert_eq!(
            out.len(),
            seq_len as usize + 1,
            "a window is seq_len + 1 tokens"
        );
        self.read(window * seq_len as u64, out)
    }
}

impl TokenStream {
    /// Checks the ids of the windows an evaluation over at most `max_tokens` predicted tokens
    /// reads ([`eval_windows`](Self::eval_windows)); errors as [`read`](Self::read).
    pub fn check_eval_windows(&self, seq_len: u32, max_tokens: u64) -> Result<()> {
        let windows = self.eval_windows(seq_len, max_tokens);
        let mut buf = vec![0u32; seq_len as usize + 1];
        for w in 0..windows {
            self.read_window(w, seq_len, &mut buf)?;
        }
        Ok(())
    }
}

fn decode(dtype: TokenDtype, bytes: &[u8], first: usize, out: &mut [u32]) {
    match dtype {
        TokenDtype::U16 => {
            let src = &bytes[first * 2..(first + out.len()) * 2];
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]) as u32;
            }
        }
        TokenDtype::U32 => {
            let src = &bytes[first * 4..(first + out.len()) * 4];
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// A prepared corpus, verified and mapped.
pub struct CorpusReader {
    dir: PathBuf,
    manifest: Manifest,
    /// The tokenizer file beside the shards as it was when the corpus was opened (its SHA-256
    /// checked against the manifest's), `None` when there is none: what a checkpoint copies,
    /// so that a corpus prepared again later (another tokenizer) cannot slip into it.
    tokenizer: Option<Vec<u8>>,
    /// Held while the reader lives: `dapt prepare` refuses to replace the corpus meanwhile.
    _readers: Option<crate::readers::ReadLock>,
    train: Vec<TokenStream>,
    held_out: Vec<TokenStream>,
    verified: VerifySummary,
}

impl CorpusReader {
    /// Opens the corpus at `dir`, verifying every file's checksum (cached by size and mtime).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    /// As [`open`](Self::open); `full_verify` re-hashes every file regardless of the cache.
    pub fn open_with(dir: &Path, full_verify: bool) -> Result<Self> {
        // Before anything is read: a publication in progress finishes first, and none starts
        // while this reader lives.
        let readers = crate::readers::read_lock(dir)?;
        let manifest = Manifest::read(dir)?;
        let verified = manifest.verify(dir, full_verify)?;
        let tokenizer_path = dir.join(&manifest.tokenizer.file);
        let tokenizer = match std::fs::read(&tokenizer_path) {
            Ok(bytes) => {
                use sha2::Digest;
                let found = hex::encode(sha2::Sha256::digest(&bytes));
                if found != manifest.tokenizer.sha256 {
                    return Err(CorpusError::TokenizerMismatch {
                        path: tokenizer_path,
                        corpus: dir.to_path_buf(),
                        expected: manifest.tokenizer.sha256.clone(),
                        found,
                    });
                }
                Some(bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CorpusError::io(&tokenizer_path)(e)),
        };
        let dtype = manifest.token_dtype;
        let vocab = manifest.tokenizer.vocab_size;
        let mut train = Vec::new();
        let mut held_out = Vec::new();
        for source in &manifest.sources {
            train.push(TokenStream::open(dir, &source.train, dtype, vocab)?);
            held_out.push(TokenStream::open(dir, &source.held_out, dtype, vocab)?);
        }
        Ok(CorpusReader {
            dir: dir.to_path_buf(),
            manifest,
            tokenizer,
            _readers: readers,
            train,
            held_out,
            verified,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The corpus's `tokenizer.json` as it was when the corpus was opened (checked against the
    /// manifest's SHA-256), `None` when the corpus has none beside its shards.
    pub fn tokenizer_bytes(&self) -> Option<&[u8]> {
        self.tokenizer.as_deref()
    }

    pub fn verified(&self) -> VerifySummary {
        self.verified
    }

    /// Refuses a tokenizer other than the one the corpus was made with.
    pub fn check_tokenizer(&self, path: &Path) -> Result<()> {
        let found = sha256_file(path)?;
        if found != self.manifest.tokenizer.sha256 {
            return Err(CorpusError::ModelTokenizer {
                path: path.to_path_buf(),
                corpus: self.dir.clone(),
                expected: self.manifest.tokenizer.sha256.clone(),
                found,
            });
        }
        Ok(())
    }

    pub fn train(&self, source: usize) -> &TokenStream {
        &self.train[source]
    }

    pub fn held_out(&self, source: usize) -> &TokenStream {
        &self.held_out[source]
    }

    /// The global sample order of this corpus for a job's seed and sequence length.
    pub fn sample_order(&self, seed: u64, seq_len: u32) -> Result<SampleOrder> {
        for (source, stream) in self.manifest.sources.iter().zip(&self.train) {
            // A source of weight 0 is only evaluated: it needs no training window.
            if source.weight > 0.0 && stream.windows(seq_len) == 0 {
                return Err(CorpusError::SourceTooSmall {
                    source_name: source.name.clone(),
                    tokens: stream.len(),
                    needed: seq_len as u64 + 1,
                });
            }
        }
        let weights: Vec<f64> = self.manifest.sources.iter().map(|s| s.weight).collect();
        let windows = self.train.iter().map(|s| s.windows(seq_len)).collect();
        SampleOrder::new(seed, &weights, windows)
    }

    /// Copies the tokens of `sample` into `out` (`seq_len + 1` of them); errors as
    /// [`TokenStream::read`].
    pub fn read_sample(&self, sample: SampleRef, seq_len: u32, out: &mut [u32]) -> Result<()> {
        self.train[sample.source].read_window(sample.window, seq_len, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::StreamWriter;

    /// Writes documents of known ids in small shards and reads windows across shard edges.
    fn round_trip(dtype: TokenDtype) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("s")).expect("mkdir");
        let mut writer = StreamWriter::new(dir.path(), "s/train".into(), dtype, 1024);
        let big = if dtype == TokenDtype::U32 { 70_000 } else { 0 };
        let mut expected = Vec::new();
        for doc in 0..50u32 {
            let ids: Vec<u32> = (0..97).map(|i| big + doc * 100 + i).collect();
            writer.push_document(&ids, 7).expect("push");
            expected.extend(ids);
            expected.push(7);
        }
        let stream_manifest = writer.finish().expect("finish");
        assert!(
            stream_manifest.shards.len() >= 4,
            "{}",
            stream_manifest.shards.len()
        );
        assert_eq!(stream_manifest.tokens, expected.len() as u64);
        assert_eq!(stream_manifest.documents, 50);
        let stream =
            TokenStream::open(dir.path(), &stream_manifest, dtype, u32::MAX).expect("open");
        let seq_len = 300;
        let mut out = vec![0u32; seq_len as usize + 1];
        for w in 0..stream.windows(seq_len) {
            stream.read_window(w, seq_len, &mut out).expect("read");
            let start = (w * seq_len as u64) as usize;
            assert_eq!(
                out,
                expected[start..start + seq_len as usize + 1],
                "window {w}"
            );
        }
        assert_eq!(stream.windows(seq_len), (expected.len() as u64 - 1) / 300);
        // An evaluation's budget in whole windows, at most the budget (601 tokens evaluated
        // 900 before), at least one, at most the stream.
        for (budget, windows) in [(601, 2), (600, 2), (599, 1), (1, 1), (u64::MAX, 16)] {
            assert_eq!(stream.eval_windows(seq_len, budget), windows, "{budget}");
        }
    }

    /// A shard truncated under a running reader (by something other than dapt) killed the
    /// workers with SIGBUS, naming nothing (an audit): the read is refused naming the shard.
    #[test]
    fn a_shard_truncated_under_the_reader_is_named_not_a_fault() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("s")).expect("mkdir");
        let mut writer = StreamWriter::new(dir.path(), "s/train".into(), TokenDtype::U16, 1 << 20);
        for doc in 0..20u32 {
            let ids: Vec<u32> = (0..5000).map(|i| (doc + i) % 1000).collect();
            writer.push_document(&ids, 7).expect("push");
        }
        let manifest = writer.finish().expect("finish");
        let stream = TokenStream::open(dir.path(), &manifest, TokenDtype::U16, 1000).expect("open");
        let path = dir.path().join(&manifest.shards[0].token_file.path);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(4096)
            .expect("truncate");
        let mut out = vec![0u32; 257];
        let err = stream
            .read_window(300, 256, &mut out)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn windows_cross_shards_u16() {
        round_trip(TokenDtype::U16);
    }

    #[test]
    fn windows_cross_shards_u32() {
        round_trip(TokenDtype::U32);
    }

    #[test]
    fn an_id_past_the_vocabulary_is_an_error_naming_the_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("s")).expect("mkdir");
        let mut writer = StreamWriter::new(dir.path(), "s/train".into(), TokenDtype::U16, 1024);
        writer.push_document(&[1, 2, 3, 900, 4], 7).expect("push");
        let manifest = writer.finish().expect("finish");
        let stream = TokenStream::open(dir.path(), &manifest, TokenDtype::U16, 512).expect("open");
        let mut out = [0u32; 3];
        stream.read(0, &mut out).expect("ids below 512");
        let err = stream
            .read(1, &mut out)
            .expect_err("900 >= 512")
            .to_string();
        assert!(
            err.contains("train-00000.tok") && err.contains("900") && err.contains("512"),
            "{err}"
        );
    }
}
