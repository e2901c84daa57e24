//! Reading llama.cpp GGUF files and turning a Llama GGUF into Hugging Face form.
//!
//! A GGUF file (versions 2 and 3; everything little-endian) is laid out as
//!
//! ```text
//! "GGUF" | u32 version | u64 tensor_count | u64 metadata_kv_count
//! metadata:     (string key, u32 value type, value) × metadata_kv_count
//! tensor infos: (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset) × tensor_count
//! padding up to `general.alignment` (default 32)
//! tensor data; each tensor's offset is relative to this aligned start
//! ```
//!
//! where a string is a u64 byte length followed by UTF-8 bytes. [`GgufFile`] memory-maps the file,
//! parses the header eagerly (so a malformed header fails at [`GgufFile::open`]) and dequantizes
//! tensors to `f32` on demand with [`GgufFile::tensor_f32`].
//!
//! [`to_hf`] converts a `general.architecture` `llama`, `qwen2` or `qwen3` file into what a
//! Hugging Face checkpoint holds: a `config.json` value of that family, tensors under HF names in
//! HF (row-major) shape with llama.cpp's RoPE row permutation of a Llama's `q_proj`/`k_proj`
//! undone, and a `tokenizers::Tokenizer` rebuilt from the `tokenizer.ggml.*` metadata.
//!
//! Every error names the tensor or metadata key it is about; nothing in here panics on file
//! content, because GGUF files come from the internet.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use dapt_proto::model::Family;
use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// The 4 bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the tensor data region when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Arrays may nest in GGUF, but nothing real nests more than once; the cap keeps a hostile file
/// from recursing the parser off the stack.
const MAX_ARRAY_NESTING: usize = 8;
/// The types [`GgufFile::tensor_f32`] can dequantize, for error messages.
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// Everything that can go wrong reading a GGUF file or converting it to Hugging Face form.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // The OS error is a plain field, not the `source()`: anyhow's `{:#}` printed it twice.
    #[error("cannot open GGUF file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a GGUF file: it starts with {found:?}, not \"GGUF\"")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("GGUF version {version} is not supported (dapt reads versions 2 and 3{hint})")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error("GGUF file ends early while reading {what}: needed {needed} bytes at offset {offset}, but the file has {file_len}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("malformed GGUF while reading {what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("metadata key {key} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key} holds {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor {name} is not in the file")]
    MissingTensor { name: String },
    #[error("tensor {name} has ggml type {ggml_type}, which dapt does not dequantize; supported: {SUPPORTED_TYPES}")]
    UnsupportedTensorType { name: String, ggml_type: GgmlType },
    #[error("tensor {name}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("metadata key {key} = {value} is not supported: {reason}")]
    UnsupportedModel {
        key: String,
        value: String,
        reason: String,
    },
    #[error("cannot build the tokenizer from {key}: {reason}")]
    Tokenizer { key: String, reason: String },
}

type Result<T, E = GgufError> = std::result::Result<T, E>;

mod arch_keys;
mod convert;
mod dequant;
#[cfg(test)]
mod metadata_tests;
mod parse;
#[cfg(test)]
mod tests;
mod tokenizer;
mod types;

pub use convert::{to_hf, HfModel, HfTensor};
use dequant::*;
pub use dequant::{permute_rope_rows, unpermute_rope_rows};
use parse::*;
use tokenizer::*;
pub use types::{GgmlType, TensorInfo, Value};

/// An open, memory-mapped GGUF file with its header parsed.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    tensor_index: BTreeMap<String, usize>,
    /// Absolute file offset of the (aligned) tensor data region.
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and parses its header, metadata and tensor table.
    ///
    /// Fails on a bad magic or version, on a header that is truncated or malformed, and on a
    /// tensor of a supported type whose data would lie outside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let io_err = |error| GgufError::Io {
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to this struct. As with every mmap, another
        // process truncating or rewriting the file while it is mapped would be undefined
        // behaviour; model files are written once and then only read, which is the usual
        // contract (safetensors and llama.cpp map them the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;

        let mut r = Reader::new(&mmap);
        let magic = r
            .bytes(4)
            .map_err(|e| e.while_reading(|| "the magic".into()))?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.to_owned(),
                found: magic.to_vec(),
            });
        }
        let version = r
            .u32()
            .map_err(|e| e.while_reading(|| "the version".into()))?;
        match version {
            2 | 3 => {}
            // A big-endian GGUF has the version's bytes swapped when read little-endian.
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(GgufError::UnsupportedVersion {
                    version: v.swap_bytes(),
                    hint: "; this file is big-endian",
                })
            }
            v => {
                return Err(GgufError::UnsupportedVersion {
                    version: v,
                    hint: if v == 1 {
                        "; version 1 uses 32-bit counts"
                    } else {
                        ""
                    },
                })
            }
        }
        let tensor_count = r
            .u64()
            .map_err(|e| e.while_reading(|| "the tensor count".into()))?;
        let kv_count = r
            .u64()
            .map_err(|e| e.while_reading(|| "the metadata count".into()))?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r
                .string()
                .map_err(|e| e.while_reading(|| format!("the key of metadata entry {i}")))?;
            let value = read_value(&mut r, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(malformed(
                    format!("metadata key {key}"),
                    "the key appears twice",
                ));
            }
        }

        let mut tensors = Vec::new();
        let mut tensor_index = BTreeMap::new();
        for i in 0..tensor_count {
            let info = read_tensor_info(&mut r, i)?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(malformed(
                    format!("tensor {}", info.name),
                    "the name appears twice",
                ));
            }
            tensors.push(info);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(malformed(
                        "metadata key general.alignment",
                        format!("{} is not a power-of-two integer", v.describe()),
                    ))
                }
            },
        };
        let header_end = r.pos as u64;
        let data_offset = header_end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| malformed("the tensor data offset", "it overflows"))?;

        let gguf = GgufFile {
            path: path.to_owned(),
            mmap,
            version,
            metadata,
            tensors,
            tensor_index,
            data_offset,
        };
        for info in &gguf.tensors {
            if info.offset % alignment != 0 {
                return Err(GgufError::BadTensor {
                    name: info.name.clone(),
                    reason: format!(
                        "data offset {} is not a multiple of general.alignment {alignment}",
                        info.offset
                    ),
                });
            }
            // Unsupported types are checked when (if) someone asks for them, with a better error.
            if info.ggml_type.block_layout().is_some() {
                gguf.tensor_bytes(info)?;
            }
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn metadata_all(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Absolute file offset of the tensor data region.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The tensor `name` dequantized to `f32`, with its shape in Hugging Face (row-major) order,
    /// i.e. GGUF's `ne` reversed.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                name: name.to_owned(),
            })?;
        let bytes = self.tensor_bytes(info)?;
        Ok((dequantize(info.ggml_type, bytes), info.hf_shape()))
    }

    /// The raw bytes of a tensor of a supported type, after checking its shape suits the type's
    /// blocks and its data lies inside the file.
    pub(super) fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let bad = |reason: String| GgufError::BadTensor {
            name: info.name.clone(),
            reason,
        };
        let (block_values, block_bytes) =
            info.ggml_type
                .block_layout()
                .ok_or_else(|| GgufError::UnsupportedTensorType {
                    name: info.name.clone(),
                    ggml_type: info.ggml_type,
                })?;
        // ggml quantizes each row separately, so rows must be whole blocks.
        let row_len = info.shape.first().copied().unwrap_or(1);
        if row_len % block_values as u64 != 0 {
            return Err(bad(format!(
                "row length ne[0] = {row_len} is not a multiple of the {} block size {block_values}",
                info.ggml_type.name()
            )));
        }
        let size = info
            .element_count()
            .map(|n| n / block_values as u64)
            .and_then(|blocks| blocks.checked_mul(block_bytes as u64))
            .ok_or_else(|| bad(format!("shape {:?} overflows", info.shape)))?;
        let file_len = self.mmap.len() as u64;
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                // In range of the map, hence of usize.
                Ok(&self.mmap[start as usize..end as usize])
            }
            _ => Err(bad(format!(
                "its {size} bytes of data at offset {} from the data region (file offset {}) \
                 run past the end of the file ({file_len} bytes)",
                info.offset, self.data_offset
            ))),
        }
    }

    pub(super) fn require(&self, key: &str) -> Result<&Value> {
        self.metadata(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_owned(),
        })
    }

    pub(super) fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
    }

    pub(super) fn optional_u64(&self, key: &str) -> Result<Option<u64>> {
        self.metadata(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    pub(super) fn optional_f64(&self, key: &str) -> Result<Option<f64>> {
        self.metadata(key)
            .map(|v| {
                // A NaN or an infinity would reach config.json as null (serde_json), which
                // reads as the field's default: named here instead.
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| wrong_type(key, "a finite number", v))
            })
            .transpose()
    }

    pub(super) fn require_f64(&self, key: &str) -> Result<f64> {
        self.optional_f64(key)?
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_owned(),
            })
    }

    pub(super) fn optional_str(&self, key: &str) -> Result<Option<&str>> {
        self.metadata(key)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string", v)))
            .transpose()
    }

    pub(super) fn require_str(&self, key: &str) -> Result<&str> {
        self.optional_str(key)?
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_owned(),
            })
    }

    pub(super) fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        self.metadata(key)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "a bool", v)))
            .transpose()
    }

    pub(super) fn optional_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.metadata(key)
            .map(|v| v.as_array().ok_or_else(|| wrong_type(key, "an array", v)))
            .transpose()
    }

    pub(super) fn require_array(&self, key: &str) -> Result<&[Value]> {
        self.optional_array(key)?
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_owned(),
            })
    }
}

pub(super) fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
        found: found.describe(),
    }
}

pub(super) fn malformed(what: impl Into<String>, reason: impl Into<String>) -> GgufError {
    GgufError::Malformed {
        what: what.into(),
        reason: reason.into(),
    }
}
