//! The corpus tokenizer: a Hugging Face `tokenizer.json`, given or trained here.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{CorpusError, Result};

/// End-of-document tokens looked up, in order, when the job names none.
pub const EOS_CANDIDATES: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|im_end|>",
];
/// The end-of-document token of a tokenizer trained by dapt.
pub const TRAINED_EOS: &str = "<|endoftext|>";

/// A loaded tokenizer and the facts the shards depend on.
pub struct CorpusTokenizer {
    pub tokenizer: Tokenizer,
    pub eos_token: String,
    pub eos_id: u32,
    /// One more than the largest token id.
    pub vocab_size: u32,
}

impl CorpusTokenizer {
    /// Loads `path` and finds its end-of-document token.
    pub fn load(path: &Path, eos: Option<&str>) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| CorpusError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::new(tokenizer, path, eos)
    }

    pub fn new(tokenizer: Tokenizer, path: &Path, eos: Option<&str>) -> Result<Self> {
        let (eos_token, eos_id) = match eos {
            Some(name) => match tokenizer.token_to_id(name) {
                Some(id) => (name.to_owned(), id),
                None => {
                    return Err(CorpusError::Tokenizer {
                        path: path.to_path_buf(),
                        message: format!("has no token `{name}` (corpus.eos_token)"),
                    })
                }
            },
            None => EOS_CANDIDATES
                .iter()
                .find_map(|name| {
                    tokenizer
                        .token_to_id(name)
                        .map(|id| ((*name).to_owned(), id))
                })
                .ok_or_else(|| CorpusError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!(
                        "has none of the usual end-of-document tokens ({}): set corpus.eos_token",
                        EOS_CANDIDATES.join(", ")
                    ),
                })?,
        };
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m + 1);
        Ok(CorpusTokenizer {
            tokenizer,
            eos_token,
            eos_id,
            vocab_size,
        })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| CorpusError::Invalid(format!("tokenizing failed: {e}")))
    }

    /// Token ids of many texts, in parallel on all cores.
    pub fn encode_batch(&self, texts: Vec<&str>) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts, false)
            .map_err(|e| CorpusError::Invalid(format!("tokenizing failed: {e}")))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }
}

/// Trains a GPT-2 style byte-level BPE with `vocab_size` entries (including [`TRAINED_EOS`]).
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
    tokenizer.train(&mut trainer, texts).map_err(fail)?;
    tokenizer.add_special_tokens([eos]).map_err(fail)?;
    Ok(tokenizer)
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
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

    #[test]
    fn trains_a_byte_level_bpe_that_round_trips() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("SELECT name FROM accounts WHERE id = {i}; -- ünïcode ok"))
            .collect();
        let tokenizer = train_byte_level_bpe(texts.iter(), 400).expect("train");
        let tk = CorpusTokenizer::new(tokenizer, Path::new("t"), None).expect("eos");
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
        let err = CorpusTokenizer::new(tk.tokenizer.clone(), Path::new("t.json"), Some("<nope>"))
            .err()
            .expect("missing eos");
        assert!(err.to_string().contains("t.json") && err.to_string().contains("<nope>"));
    }
}
