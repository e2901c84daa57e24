//! Writes one token stream (a source's training or held-out documents) as shards, hashing each
//! file while it is written so that nothing is read twice.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{CorpusError, Result};
use crate::manifest::{FileEntry, ShardManifest, StreamManifest, TokenDtype};

pub struct StreamWriter {
    dir: PathBuf,
    /// File name prefix relative to `dir`, e.g. `postgres/train`.
    prefix: String,
    dtype: TokenDtype,
    shard_tokens: u64,
    current: Option<OpenShard>,
    done: StreamManifest,
}

struct OpenShard {
    rel: String,
    out: HashingWriter,
    tokens: u64,
    doc_starts: Vec<u64>,
}

struct HashingWriter {
    path: PathBuf,
    file: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl HashingWriter {
    fn create(path: PathBuf) -> Result<Self> {
        let file = File::create(&path).map_err(CorpusError::io(&path))?;
        Ok(HashingWriter {
            path,
            file: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(CorpusError::io(&self.path))
    }

    fn finish(mut self, rel: String) -> Result<FileEntry> {
        self.file.flush().map_err(CorpusError::io(&self.path))?;
        Ok(FileEntry {
            path: rel,
            bytes: self.bytes,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

impl StreamWriter {
    pub fn new(dir: &Path, prefix: String, dtype: TokenDtype, shard_tokens: u64) -> Self {
        StreamWriter {
            dir: dir.to_path_buf(),
            prefix,
            dtype,
            shard_tokens,
            current: None,
            done: StreamManifest::default(),
        }
    }

    /// Appends one document's tokens followed by `eos`.
    pub fn push_document(&mut self, ids: &[u32], eos: u32) -> Result<()> {
        if self.current.is_none() {
            let rel = format!("{}-{:05}", self.prefix, self.done.shards.len());
            let path = self.dir.join(format!("{rel}.tok"));
            self.current = Some(OpenShard {
                out: HashingWriter::create(path)?,
                rel,
                tokens: 0,
                doc_starts: Vec::new(),
            });
        }
        let shard = self.current.as_mut().expect("opened above");
        shard.doc_starts.push(shard.tokens);
        let mut buf = Vec::with_capacity((ids.len() + 1) * self.dtype.bytes());
        for &id in ids.iter().chain(std::iter::once(&eos)) {
            match self.dtype {
                // The dtype was chosen from the vocabulary size, so ids fit.
                TokenDtype::U16 => buf.extend_from_slice(&(id as u16).to_le_bytes()),
                TokenDtype::U32 => buf.extend_from_slice(&id.to_le_bytes()),
            }
        }
        shard.out.write(&buf)?;
        shard.tokens += ids.len() as u64 + 1;
        if shard.tokens >= self.shard_tokens {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some(shard) = self.current.take() else {
            return Ok(());
        };
        let mut docs = HashingWriter::create(self.dir.join(format!("{}.doc", shard.rel)))?;
        let mut buf = Vec::with_capacity(shard.doc_starts.len() * 8);
        for start in &shard.doc_starts {
            buf.extend_from_slice(&start.to_le_bytes());
        }
        docs.write(&buf)?;
        self.done.tokens += shard.tokens;
        self.done.documents += shard.doc_starts.len() as u64;
        self.done.shards.push(ShardManifest {
            tokens: shard.tokens,
            documents: shard.doc_starts.len() as u64,
            token_file: shard.out.finish(format!("{}.tok", shard.rel))?,
            document_file: docs.finish(format!("{}.doc", shard.rel))?,
        });
        Ok(())
    }

    pub fn finish(mut self) -> Result<StreamManifest> {
        self.close_shard()?;
        Ok(self.done)
    }
}
