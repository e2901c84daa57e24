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
//! [`to_hf`] converts a `general.architecture = llama` file into what a Hugging Face checkpoint
//! holds: a `config.json` value, tensors under HF names in HF (row-major) shape with llama.cpp's
//! RoPE row permutation of `q_proj`/`k_proj` undone, and a `tokenizers::Tokenizer` rebuilt from
//! the `tokenizer.ggml.*` metadata.
//!
//! Every error names the tensor or metadata key it is about; nothing in here panics on file
//! content, because GGUF files come from the internet.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer};

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
    #[error("cannot open GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF spelling of this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any non-negative integer, whatever its width: writers disagree on whether counts are
    /// u32, i32 or u64, so readers should not care.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer, whatever its width and signedness.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            Value::U64(v) => i64::try_from(v).ok(),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float, or an integer read as one.
    ///
    /// An `f32` is widened through its shortest decimal form, so that `1e-5f32` becomes `1e-5`
    /// rather than `9.999999747378752e-6` when written into `config.json`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.to_string().parse().unwrap_or(f64::from(v))),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A short description for "expected X, found Y" messages: scalars show their value, arrays
    /// and strings only their type and size (a vocabulary would swamp the message).
    fn describe(&self) -> String {
        match self {
            Value::String(s) if s.len() <= 64 => format!("string {s:?}"),
            Value::String(s) => format!("a string of {} bytes", s.len()),
            Value::Array(items) => format!("an array of {} items", items.len()),
            other => format!("{} {}", other.type_name(), other.scalar_text()),
        }
    }

    fn scalar_text(&self) -> String {
        match self {
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            Value::String(s) => s.clone(),
            Value::Array(items) => format!("[{} items]", items.len()),
        }
    }
}

/// A ggml tensor element type. Only the types dapt dequantizes get their own variant; the rest
/// keep their numeric id so error messages can still name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// llama.cpp's name for the type (`ggml_type_name`), or "unknown".
    pub fn name(self) -> &'static str {
        #[rustfmt::skip]
        const NAMES: [&str; 40] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4",
            "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
        ];
        usize::try_from(self.id())
            .ok()
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("unknown")
    }

    /// `(values per block, bytes per block)` for the types dapt dequantizes.
    fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 2 + 16)),
            GgmlType::Q4_1 => Some((32, 2 + 2 + 16)),
            GgmlType::Q8_0 => Some((32, 2 + 32)),
            GgmlType::Other(_) => None,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.id())
    }
}

/// One entry of the tensor-info table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `ne[0]` first, and it is the fastest-varying (contiguous) dimension.
    pub shape: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the tensor's data from the start of the data region.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in Hugging Face / row-major order: `ne` reversed.
    pub fn hf_shape(&self) -> Vec<usize> {
        // Fits: `open` checked every dimension fits in usize.
        self.shape.iter().rev().map(|&d| d as usize).collect()
    }

    fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

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
        let io_err = |source| GgufError::Io {
            path: path.to_owned(),
            source,
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
    fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
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

    fn require(&self, key: &str) -> Result<&Value> {
        self.metadata(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_owned(),
        })
    }

    fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
    }

    fn optional_u64(&self, key: &str) -> Result<Option<u64>> {
        self.metadata(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn optional_f64(&self, key: &str) -> Result<Option<f64>> {
        self.metadata(key)
            .map(|v| v.as_f64().ok_or_else(|| wrong_type(key, "a number", v)))
            .transpose()
    }

    fn require_f64(&self, key: &str) -> Result<f64> {
        self.optional_f64(key)?
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_owned(),
            })
    }

    fn optional_str(&self, key: &str) -> Result<Option<&str>> {
        self.metadata(key)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string", v)))
            .transpose()
    }

    fn require_str(&self, key: &str) -> Result<&str> {
        self.optional_str(key)?
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_owned(),
            })
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        self.metadata(key)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "a bool", v)))
            .transpose()
    }

    fn optional_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.metadata(key)
            .map(|v| v.as_array().ok_or_else(|| wrong_type(key, "an array", v)))
            .transpose()
    }

    fn require_array(&self, key: &str) -> Result<&[Value]> {
        self.optional_array(key)?
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_owned(),
            })
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
        found: found.describe(),
    }
}

fn malformed(what: impl Into<String>, reason: impl Into<String>) -> GgufError {
    GgufError::Malformed {
        what: what.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Header parsing

/// A little-endian cursor over the mapped file. Its errors carry only positions; callers add
/// what was being read with [`ReadError::while_reading`], whose closure runs only on failure so
/// the hot path (a 50k-token vocabulary) formats nothing.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum ReadError {
    Short {
        offset: usize,
        needed: u64,
        file_len: usize,
    },
    BadUtf8 {
        offset: usize,
    },
}

impl ReadError {
    fn while_reading(self, what: impl FnOnce() -> String) -> GgufError {
        match self {
            ReadError::Short {
                offset,
                needed,
                file_len,
            } => GgufError::Truncated {
                what: what(),
                offset: offset as u64,
                needed,
                file_len: file_len as u64,
            },
            ReadError::BadUtf8 { offset } => GgufError::Malformed {
                what: what(),
                reason: format!("the string at offset {offset} is not UTF-8"),
            },
        }
    }
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: u64) -> Result<&'a [u8], ReadError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.buf.len());
        let Some(end) = end else {
            return Err(ReadError::Short {
                offset: self.pos,
                needed: n,
                file_len: self.buf.len(),
            });
        };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N as u64)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, ReadError> {
        let len = self.u64()?;
        let start = self.pos;
        let bytes = self.bytes(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ReadError::BadUtf8 { offset: start })
    }
}

/// GGUF metadata value type ids.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

fn read_value(r: &mut Reader, key: &str) -> Result<Value> {
    let type_id = r
        .u32()
        .map_err(|e| e.while_reading(|| format!("the type of metadata key {key}")))?;
    read_typed_value(r, type_id, &|| format!("metadata key {key}"), 0)
}

/// Reads one value of type `type_id`; `what` describes it (key and array index) for errors.
fn read_typed_value(
    r: &mut Reader,
    type_id: u32,
    what: &dyn Fn() -> String,
    depth: usize,
) -> Result<Value> {
    use value_type as t;
    let ctx = |e: ReadError| e.while_reading(what);
    Ok(match type_id {
        t::U8 => Value::U8(r.u8().map_err(ctx)?),
        t::I8 => Value::I8(r.u8().map_err(ctx)? as i8),
        t::U16 => Value::U16(r.u16().map_err(ctx)?),
        t::I16 => Value::I16(r.u16().map_err(ctx)? as i16),
        t::U32 => Value::U32(r.u32().map_err(ctx)?),
        t::I32 => Value::I32(r.u32().map_err(ctx)? as i32),
        t::U64 => Value::U64(r.u64().map_err(ctx)?),
        t::I64 => Value::I64(r.u64().map_err(ctx)? as i64),
        t::F32 => Value::F32(f32::from_bits(r.u32().map_err(ctx)?)),
        t::F64 => Value::F64(f64::from_bits(r.u64().map_err(ctx)?)),
        // The spec says 0 or 1; llama.cpp reads any non-zero byte as true, and so do we.
        t::BOOL => Value::Bool(r.u8().map_err(ctx)? != 0),
        t::STRING => Value::String(r.string().map_err(ctx)?),
        t::ARRAY => {
            if depth >= MAX_ARRAY_NESTING {
                return Err(malformed(what(), "arrays nest too deeply"));
            }
            let elem_type = r
                .u32()
                .map_err(|e| e.while_reading(|| format!("the element type of {}", what())))?;
            let count = r
                .u64()
                .map_err(|e| e.while_reading(|| format!("the length of {}", what())))?;
            // Every element takes at least one byte, so a count larger than what is left of the
            // file is a lie; checking first keeps it from sizing a huge allocation.
            if count > r.remaining() as u64 {
                return Err(GgufError::Truncated {
                    what: format!("{} ({count} elements)", what()),
                    offset: r.pos as u64,
                    needed: count,
                    file_len: r.buf.len() as u64,
                });
            }
            let mut items = Vec::with_capacity(count as usize);
            for i in 0..count {
                let elem_what = || format!("{}[{i}]", what());
                items.push(read_typed_value(r, elem_type, &elem_what, depth + 1)?);
            }
            Value::Array(items)
        }
        other => {
            return Err(malformed(
                what(),
                format!("unknown metadata value type {other}"),
            ))
        }
    })
}

fn read_tensor_info(r: &mut Reader, index: u64) -> Result<TensorInfo> {
    let name = r
        .string()
        .map_err(|e| e.while_reading(|| format!("the name of tensor info {index}")))?;
    let what = || format!("the tensor info of {name}");
    let n_dims = r.u32().map_err(|e| e.while_reading(what))?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::BadTensor {
            name,
            reason: format!("it has {n_dims} dimensions; ggml allows at most {MAX_DIMS}"),
        });
    }
    let mut shape = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        shape.push(r.u64().map_err(|e| e.while_reading(what))?);
    }
    let ggml_type = GgmlType::from_id(r.u32().map_err(|e| e.while_reading(what))?);
    let offset = r.u64().map_err(|e| e.while_reading(what))?;
    let info = TensorInfo {
        name,
        shape,
        ggml_type,
        offset,
    };
    // `hf_shape` and the dequantizers index with usize; refuse what cannot be addressed.
    let addressable = |n: u64| usize::try_from(n).is_ok();
    if !info.element_count().is_some_and(addressable) || !info.shape.iter().all(|&d| addressable(d))
    {
        return Err(GgufError::BadTensor {
            reason: format!("shape {:?} has too many elements", info.shape),
            name: info.name,
        });
    }
    Ok(info)
}

// ---------------------------------------------------------------------------------------------
// Dequantization

/// Dequantizes `bytes`, which `tensor_bytes` has already checked to be a whole number of blocks
/// of a supported type.
fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| f16_at(b, 0)).collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        // block_q8_0: f16 scale d, then 32 signed quants; x = d * q.
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
            for block in bytes.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
            out
        }
        // block_q4_0: f16 scale d, then 16 bytes holding 32 nibbles offset by 8. Low nibbles are
        // the first 16 values and high nibbles the last 16 (not interleaved).
        GgmlType::Q4_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
            for block in bytes.chunks_exact(18) {
                let d = f16_at(block, 0);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| d * f32::from((q & 0x0F) as i8 - 8)));
                out.extend(qs.iter().map(|&q| d * f32::from((q >> 4) as i8 - 8)));
            }
            out
        }
        // block_q4_1: f16 scale d, f16 minimum m, then nibbles laid out as in Q4_0; x = d*q + m.
        GgmlType::Q4_1 => {
            let mut out = Vec::with_capacity(bytes.len() / 20 * 32);
            for block in bytes.chunks_exact(20) {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0F) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
            out
        }
        // `tensor_bytes` refuses these before we get here.
        GgmlType::Other(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE row permutation

/// Applies llama.cpp's `convert_hf_to_gguf.py` permutation to the rows of a `[rows, cols]`
/// row-major q or k projection (or its bias, with `cols = 1`).
///
/// HF Llama rotates the two halves of each head (`rotate_half`); ggml's RoPE rotates adjacent
/// pairs. The converter reorders each head's rows so that row `j * half + i` (half `j`, index
/// `i`) moves to row `2 * i + j`, which is
/// `w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)`.
/// `n_head` is the attention head count for q and the KV head count for k.
pub fn permute_rope_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    reorder_head_rows(w, rows, cols, n_head, |half, j, i| {
        (2 * i + j, j * half + i)
    })
}

/// Undoes [`permute_rope_rows`]:
/// `w.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn unpermute_rope_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    reorder_head_rows(w, rows, cols, n_head, |half, j, i| {
        (j * half + i, 2 * i + j)
    })
}

/// Copies whole rows head by head; `map(half, j, i)` gives the (destination, source)
/// row within a head for half `j` in 0..2 and index `i` in 0..half. Callers check that `rows`
/// is a multiple of `2 * n_head` and `w.len() == rows * cols`.
fn reorder_head_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    map: impl Fn(usize, usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        let base = h * head_dim;
        for j in 0..2 {
            for i in 0..half {
                let (dst, src) = map(half, j, i);
                let (dst, src) = ((base + dst) * cols, (base + src) * cols);
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Conversion to Hugging Face form

/// One converted tensor: `(HF name, row-major shape, values)`.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// A Llama checkpoint in Hugging Face form, converted from GGUF.
pub struct HfModel {
    /// The `config.json` contents.
    pub config: serde_json::Value,
    /// `(HF name, row-major shape, values)`, in the GGUF file's tensor order.
    pub tensors: Vec<HfTensor>,
    pub tokenizer: Tokenizer,
}

impl fmt::Debug for HfModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfModel")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// The `llama.*` hyperparameters a conversion needs.
struct LlamaParams {
    hidden: u64,
    intermediate: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
}

/// Converts a Llama-architecture GGUF to Hugging Face form: `config.json` from the `llama.*`
/// metadata, every tensor dequantized, renamed and reshaped (with q/k un-permuted), and the
/// tokenizer rebuilt from `tokenizer.ggml.*`.
pub fn to_hf(file: &GgufFile) -> Result<HfModel> {
    let arch = file.require_str("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::UnsupportedModel {
            key: "general.architecture".into(),
            value: arch.into(),
            reason: "only llama is converted".into(),
        });
    }
    let params = llama_params(file)?;
    let tokenizer = build_tokenizer(file)?;
    let tensors = convert_tensors(file, &params)?;
    let config = llama_config(file, &params, &tensors)?;
    Ok(HfModel {
        config,
        tensors,
        tokenizer,
    })
}

fn llama_params(file: &GgufFile) -> Result<LlamaParams> {
    let hidden = file.require_u64("llama.embedding_length")?;
    let heads = file.require_u64("llama.attention.head_count")?;
    let kv_heads = file
        .optional_u64("llama.attention.head_count_kv")?
        .unwrap_or(heads);
    let unsupported = |key: &str, value: String, reason: &str| GgufError::UnsupportedModel {
        key: key.into(),
        value,
        reason: reason.into(),
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(unsupported(
            "llama.attention.head_count_kv",
            kv_heads.to_string(),
            &format!("must be non-zero and divide llama.attention.head_count = {heads}"),
        ));
    }
    let head_dim = match file.optional_u64("llama.attention.key_length")? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(unsupported(
                "llama.attention.head_count",
                heads.to_string(),
                &format!("does not divide llama.embedding_length = {hidden}"),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(unsupported(
            "llama.attention.key_length",
            head_dim.to_string(),
            "RoPE needs an even head dimension",
        ));
    }
    // HF Llama rotates the whole head; partial rotary and mixture-of-experts Llamas need more
    // than this converter writes, so refuse them rather than produce a subtly wrong model.
    if let Some(rot) = file.optional_u64("llama.rope.dimension_count")? {
        if rot != head_dim {
            return Err(unsupported(
                "llama.rope.dimension_count",
                rot.to_string(),
                &format!("HF Llama rotates the whole head of {head_dim}"),
            ));
        }
    }
    if let Some(experts) = file.optional_u64("llama.expert_count")? {
        if experts > 0 {
            return Err(unsupported(
                "llama.expert_count",
                experts.to_string(),
                "mixture-of-experts models are not converted",
            ));
        }
    }
    if let Some(scaling) = file.optional_str("llama.rope.scaling.type")? {
        if scaling != "none" {
            return Err(unsupported(
                "llama.rope.scaling.type",
                scaling.into(),
                "RoPE scaling is not converted",
            ));
        }
    }
    Ok(LlamaParams {
        hidden,
        intermediate: file.require_u64("llama.feed_forward_length")?,
        layers: file.require_u64("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
    })
}

fn llama_config(
    file: &GgufFile,
    p: &LlamaParams,
    tensors: &[HfTensor],
) -> Result<serde_json::Value> {
    let tied = file.tensor_info("output.weight").is_none();
    // The embedding's rows are the model's vocabulary; the token list normally has exactly as
    // many entries, but a padded embedding may have more (never fewer).
    let embd = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            name: "token_embd.weight".into(),
        })?;
    let vocab_rows = embd.shape.get(1).copied().unwrap_or(0);
    let n_tokens = file.require_array("tokenizer.ggml.tokens")?.len() as u64;
    if n_tokens > vocab_rows {
        return Err(GgufError::BadTensor {
            name: "token_embd.weight".into(),
            reason: format!(
                "it has {vocab_rows} rows but tokenizer.ggml.tokens has {n_tokens} tokens"
            ),
        });
    }
    let attention_bias = tensors.iter().any(|(n, _, _)| n.ends_with("q_proj.bias"));
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "rms_norm_eps": file.require_f64("llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": file.optional_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
        "max_position_embeddings": file.require_u64("llama.context_length")?,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": tied,
        "attention_bias": attention_bias,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = file.optional_u64(key)? {
            config[field] = json!(id);
        }
    }
    Ok(config)
}

/// The HF name of a GGUF Llama tensor, or `None` if it has no HF Llama counterpart.
fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{suffix}"))
}

fn convert_tensors(file: &GgufFile, p: &LlamaParams) -> Result<Vec<HfTensor>> {
    // Check the full set first, so a missing tensor is reported before minutes of dequantizing.
    let mut required = vec![
        "token_embd.weight".to_owned(),
        "output_norm.weight".to_owned(),
    ];
    for layer in 0..p.layers {
        for part in [
            "attn_norm",
            "ffn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            required.push(format!("blk.{layer}.{part}.weight"));
        }
    }
    if let Some(name) = required.iter().find(|n| file.tensor_info(n).is_none()) {
        return Err(GgufError::MissingTensor { name: name.clone() });
    }

    let mut out = Vec::with_capacity(file.tensors().len());
    for info in file.tensors() {
        let name = hf_name(&info.name).ok_or_else(|| GgufError::BadTensor {
            name: info.name.clone(),
            reason: "it has no Hugging Face Llama counterpart".into(),
        })?;
        let (mut values, shape) = file.tensor_f32(&info.name)?;
        let rope_heads = if name.contains(".q_proj.") {
            Some(p.heads)
        } else if name.contains(".k_proj.") {
            Some(p.kv_heads)
        } else {
            None
        };
        if let Some(n_head) = rope_heads {
            // The row count must be exactly the heads the metadata promises, or un-permuting
            // would silently scramble rows across heads.
            let rows = shape.first().copied().unwrap_or(0);
            let cols = shape.get(1).copied().unwrap_or(1);
            if shape.len() > 2 || Some(rows as u64) != n_head.checked_mul(p.head_dim) {
                return Err(GgufError::BadTensor {
                    name: info.name.clone(),
                    reason: format!(
                        "HF shape {shape:?} is not {n_head} heads of {} rows",
                        p.head_dim
                    ),
                });
            }
            let n_head = n_head as usize; // at most `rows`, checked above
            values = unpermute_rope_rows(&values, rows, cols, n_head);
        }
        out.push((name, shape, values));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Rebuilds a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) the way its
/// `tokenizer.json` would have described it.
fn build_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    const MODEL_KEY: &str = "tokenizer.ggml.model";
    const TOKENS_KEY: &str = "tokenizer.ggml.tokens";
    const MERGES_KEY: &str = "tokenizer.ggml.merges";
    const TYPES_KEY: &str = "tokenizer.ggml.token_type";
    const PRE_KEY: &str = "tokenizer.ggml.pre";

    let model = file.require_str(MODEL_KEY)?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedModel {
            key: MODEL_KEY.into(),
            value: model.into(),
            reason: "only byte-level BPE (gpt2) tokenizers are rebuilt".into(),
        });
    }
    let element_str = |key: &str, i: usize, v: &Value| -> Result<String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| wrong_type(&format!("{key}[{i}]"), "a string", v))
    };
    let tokens = file
        .require_array(TOKENS_KEY)?
        .iter()
        .enumerate()
        .map(|(i, v)| element_str(TOKENS_KEY, i, v))
        .collect::<Result<Vec<_>>>()?;
    let token_types = file
        .optional_array(TYPES_KEY)?
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_i64()
                .ok_or_else(|| wrong_type(&format!("{TYPES_KEY}[{i}]"), "an integer", v))
        })
        .collect::<Result<Vec<_>>>()?;
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(GgufError::Tokenizer {
            key: TYPES_KEY.into(),
            reason: format!(
                "it has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            ),
        });
    }
    let merges = file
        .optional_array(MERGES_KEY)?
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let merge = element_str(MERGES_KEY, i, v)?;
            // Byte-level tokens never contain a real space (it is spelled "Ġ"), so the single
            // space in "a b" is an unambiguous separator.
            match merge.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_owned(), b.to_owned()))
                }
                _ => Err(GgufError::Tokenizer {
                    key: format!("{MERGES_KEY}[{i}]"),
                    reason: format!("{merge:?} is not two tokens separated by one space"),
                }),
            }
        })
        .collect::<Result<Vec<_>>>()?;

    // Ids are list positions. Should a vocabulary list a string twice, the later id wins, as
    // it would in a tokenizer.json vocab object.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| GgufError::Tokenizer {
            key: MERGES_KEY.into(),
            reason: e.to_string(),
        })?;
    let mut tokenizer = Tokenizer::new(bpe);

    let byte_level = ByteLevel::new(false, true, true);
    let pre = file.optional_str(PRE_KEY)?.unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "default" | "gpt2" => byte_level.into(),
        // SmolLM's tokenizer.json splits every digit off before the byte-level split.
        "smollm" => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        other => {
            return Err(GgufError::UnsupportedModel {
                key: PRE_KEY.into(),
                value: other.into(),
                reason: "dapt rebuilds only the default, gpt2 and smollm pre-tokenizers".into(),
            })
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens are special (skipped when decoding with skip_special_tokens); user-defined
    // ones are ordinary added tokens. Both must be added so that the text "<|im_start|>" maps to
    // its single id instead of being split by BPE.
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (token, &ty) in tokens.iter().zip(&token_types) {
        match ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(token.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => user_defined.push(AddedToken::from(token.clone(), false)),
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| GgufError::Tokenizer {
            key: TYPES_KEY.into(),
            reason: e.to_string(),
        })?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| GgufError::Tokenizer {
            key: TYPES_KEY.into(),
            reason: e.to_string(),
        })?;

    let byte_level_post: PostProcessorWrapper = ByteLevel::new(false, false, true).into();
    let post = match file.optional_bool("tokenizer.ggml.add_bos_token")? {
        // llama.cpp prepends BOS when asked; HF expresses that with a template after the
        // byte-level offset fix-up, as Llama 3's tokenizer.json does.
        Some(true) => {
            let bos_key = "tokenizer.ggml.bos_token_id";
            let bos_id = file.require_u64(bos_key)?;
            let bos = usize::try_from(bos_id)
                .ok()
                .and_then(|i| tokens.get(i))
                .ok_or_else(|| GgufError::Tokenizer {
                    key: bos_key.into(),
                    reason: format!("id {bos_id} is not in {TOKENS_KEY}"),
                })?;
            let template_err = |e: String| GgufError::Tokenizer {
                key: bos_key.into(),
                reason: format!("cannot build the add-BOS template: {e}"),
            };
            let template = TemplateProcessing::builder()
                .try_single(vec![bos.as_str(), "$A:0"])
                .and_then(|b| b.try_pair(vec![bos.as_str(), "$A:0", &format!("{bos}:1"), "$B:1"]))
                .map_err(template_err)?
                .special_tokens(vec![(bos.clone(), bos_id as u32)])
                .build()
                .map_err(|e| template_err(e.to_string()))?;
            ProcessorSequence::new(vec![byte_level_post, template.into()]).into()
        }
        _ => byte_level_post,
    };
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type BoxError = Box<dyn Error + Send + Sync>;
    type TestResult = std::result::Result<(), BoxError>;

    // -----------------------------------------------------------------------------------------
    // A minimal GGUF writer, so tests can build exactly the file they need.

    struct TestTensor {
        name: String,
        ne: Vec<u64>,
        type_id: u32,
        data: Vec<u8>,
    }

    struct Writer {
        version: u32,
        alignment: usize,
        kvs: Vec<(String, Value)>,
        tensors: Vec<TestTensor>,
    }

    impl Writer {
        fn new() -> Self {
            Writer {
                version: 3,
                alignment: 32,
                kvs: Vec::new(),
                tensors: Vec::new(),
            }
        }

        fn kv(mut self, key: &str, value: Value) -> Self {
            self.kvs.push((key.to_owned(), value));
            self
        }

        fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, data: Vec<u8>) -> Self {
            self.tensors.push(TestTensor {
                name: name.to_owned(),
                ne: ne.to_vec(),
                type_id,
                data,
            });
            self
        }

        fn f32_tensor(self, name: &str, ne: &[u64], values: &[f32]) -> Self {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensor(name, ne, 0, data)
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&self.version.to_le_bytes());
            b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
            for (key, value) in &self.kvs {
                put_string(&mut b, key);
                b.extend_from_slice(&type_id(value).to_le_bytes());
                put_value(&mut b, value);
            }
            // Tensor data is packed with each tensor starting on an aligned offset; nothing
            // follows the last one, so any truncation cuts into some tensor.
            let mut offsets = Vec::new();
            let mut next = 0usize;
            for t in &self.tensors {
                next = next.next_multiple_of(self.alignment);
                offsets.push(next);
                next += t.data.len();
            }
            for (t, &offset) in self.tensors.iter().zip(&offsets) {
                put_string(&mut b, &t.name);
                b.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
                for d in &t.ne {
                    b.extend_from_slice(&d.to_le_bytes());
                }
                b.extend_from_slice(&t.type_id.to_le_bytes());
                b.extend_from_slice(&(offset as u64).to_le_bytes());
            }
            let data_start = b.len().next_multiple_of(self.alignment);
            for (t, &offset) in self.tensors.iter().zip(&offsets) {
                b.resize(data_start + offset, 0);
                b.extend_from_slice(&t.data);
            }
            b
        }
    }

    fn put_string(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        use value_type as t;
        match v {
            Value::U8(_) => t::U8,
            Value::I8(_) => t::I8,
            Value::U16(_) => t::U16,
            Value::I16(_) => t::I16,
            Value::U32(_) => t::U32,
            Value::I32(_) => t::I32,
            Value::U64(_) => t::U64,
            Value::I64(_) => t::I64,
            Value::F32(_) => t::F32,
            Value::F64(_) => t::F64,
            Value::Bool(_) => t::BOOL,
            Value::String(_) => t::STRING,
            Value::Array(_) => t::ARRAY,
        }
    }

    fn put_value(b: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => b.push(*x),
            Value::I8(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => b.push(u8::from(*x)),
            Value::String(s) => put_string(b, s),
            Value::Array(items) => {
                let elem = items.first().map_or(value_type::STRING, type_id);
                b.extend_from_slice(&elem.to_le_bytes());
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(b, item);
                }
            }
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    }

    /// A file in the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with(bytes: &[u8]) -> std::io::Result<Self> {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("dapt-gguf-test-{}-{n}.gguf", std::process::id()));
            std::fs::write(&path, bytes)?;
            Ok(TempFile(path))
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn open_bytes(bytes: &[u8]) -> std::result::Result<(TempFile, Result<GgufFile>), BoxError> {
        let file = TempFile::with(bytes)?;
        let gguf = GgufFile::open(&file.0);
        Ok((file, gguf))
    }

    fn open_writer(w: &Writer) -> std::result::Result<(TempFile, GgufFile), BoxError> {
        let (file, gguf) = open_bytes(&w.bytes())?;
        Ok((file, gguf?))
    }

    // -----------------------------------------------------------------------------------------
    // Reference quantizers, written the way ggml's `quantize_row_*_ref` are.

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16_bytes(d));
            out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
        }
        out
    }

    fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(32) {
            // The value of largest magnitude, with its sign, maps to -8.
            let max = block
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16_bytes(d));
            let q = |v: f32| ((v * id + 8.5) as u8).min(15);
            out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
        }
        out
    }

    fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(32) {
            let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16_bytes(d));
            out.extend_from_slice(&f16_bytes(min));
            let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
            out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
        }
        out
    }

    /// Deterministic values in [-2, 2), with an all-zero block to exercise d = 0.
    fn sample_values(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_u32;
        (0..n)
            .map(|i| {
                if (32..64).contains(&i) {
                    return 0.0;
                }
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    // -----------------------------------------------------------------------------------------
    // Format tests

    #[test]
    fn dequantizes_every_supported_type() -> TestResult {
        let x = sample_values(128);
        let ne = [64u64, 2];
        let f16_data: Vec<u8> = x.iter().flat_map(|&v| f16_bytes(v)).collect();
        let bf16_data: Vec<u8> = x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let w = Writer::new()
            .kv("general.architecture", Value::String("llama".into()))
            .f32_tensor("f32", &ne, &x)
            .tensor("f16", &ne, 1, f16_data)
            .tensor("bf16", &ne, 30, bf16_data)
            .tensor("q8_0", &ne, 8, quantize_q8_0(&x))
            .tensor("q4_0", &ne, 2, quantize_q4_0(&x))
            .tensor("q4_1", &ne, 3, quantize_q4_1(&x));
        let (_tmp, gguf) = open_writer(&w)?;
        assert_eq!(gguf.version(), 3);
        assert_eq!(
            gguf.metadata("general.architecture"),
            Some(&Value::String("llama".into()))
        );
        assert_eq!(
            gguf.tensor_info("q4_1").map(|t| t.ggml_type),
            Some(GgmlType::Q4_1)
        );

        let (f32s, shape) = gguf.tensor_f32("f32")?;
        assert_eq!(shape, vec![2, 64], "HF shape is ne reversed");
        assert_eq!(f32s, x);

        // Half formats: exactly what the converting crate gives for each value.
        let expect_f16: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(gguf.tensor_f32("f16")?.0, expect_f16);
        let expect_bf16: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(gguf.tensor_f32("bf16")?.0, expect_bf16);

        // Block formats: each value within the format's rounding of the original. Scales are
        // per block of 32, so bound each block by its own step d.
        let block_bound = |name: &str, step: &dyn Fn(&[f32]) -> f32, steps: f32| -> TestResult {
            let (y, shape) = gguf.tensor_f32(name)?;
            assert_eq!(shape, vec![2, 64], "{name}");
            assert_eq!(y.len(), x.len(), "{name}");
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let d = step(xb);
                // The stored scale (and Q4_1's minimum) are f16, off by up to 2^-11 relative:
                // that is at most 127 * 2^-11 < 0.07 steps, plus half an f16 ulp of the minimum.
                let tol = (steps + 0.07) * d + 1e-3;
                let err = max_abs_diff(xb, yb);
                assert!(err <= tol, "{name}: block error {err} > {tol} (d = {d})");
            }
            Ok(())
        };
        let amax = |b: &[f32]| b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let range = |b: &[f32]| {
            let (lo, hi) = b
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            hi - lo
        };
        block_bound("q8_0", &|b| amax(b) / 127.0, 0.5)?;
        // Q4_0 maps the signed extreme to -8, so the opposite extreme clamps at +7: one full step.
        block_bound("q4_0", &|b| amax(b) / 8.0, 1.0)?;
        block_bound("q4_1", &|b| range(b) / 15.0, 0.5)?;

        // And exactly: hand-decode one Q4_1 block from its bytes.
        let q = quantize_q4_1(&x[..32]);
        let d = f16::from_le_bytes([q[0], q[1]]).to_f32();
        let m = f16::from_le_bytes([q[2], q[3]]).to_f32();
        let y = gguf.tensor_f32("q4_1")?.0;
        assert_eq!(y[3], d * f32::from(q[4 + 3] & 0x0F) + m);
        assert_eq!(y[16 + 3], d * f32::from(q[4 + 3] >> 4) + m);
        Ok(())
    }

    #[test]
    fn reads_every_metadata_type() -> TestResult {
        let values = vec![
            ("u8", Value::U8(7)),
            ("i8", Value::I8(-7)),
            ("u16", Value::U16(700)),
            ("i16", Value::I16(-700)),
            ("u32", Value::U32(70_000)),
            ("i32", Value::I32(-70_000)),
            ("u64", Value::U64(1 << 40)),
            ("i64", Value::I64(-(1 << 40))),
            ("f32", Value::F32(1e-5)),
            ("f64", Value::F64(0.25)),
            ("bool", Value::Bool(true)),
            ("string", Value::String("héllo".into())),
            ("array", Value::Array(vec![Value::I32(1), Value::I32(-2)])),
            (
                "nested",
                Value::Array(vec![strings(&["a"]), strings(&["b", "c"])]),
            ),
        ];
        let mut w = Writer::new();
        w.version = 2;
        w.alignment = 64;
        w = w.kv("general.alignment", Value::U32(64));
        for (k, v) in &values {
            w = w.kv(k, v.clone());
        }
        let w = w.f32_tensor("t", &[3], &[1.0, 2.0, 3.0]);
        let (_tmp, gguf) = open_writer(&w)?;
        assert_eq!(gguf.version(), 2);
        for (k, v) in &values {
            assert_eq!(gguf.metadata(k), Some(v), "{k}");
        }
        assert_eq!(gguf.data_offset() % 64, 0);
        assert_eq!(gguf.tensor_f32("t")?, (vec![1.0, 2.0, 3.0], vec![3]));
        // The f32 epsilon widens to the decimal it was written as.
        assert_eq!(gguf.metadata("f32").and_then(Value::as_f64), Some(1e-5));
        Ok(())
    }

    #[test]
    fn truncated_file_is_an_error_at_every_length() -> TestResult {
        let x = sample_values(64);
        let full = Writer::new()
            .kv("general.name", Value::String("truncate me".into()))
            .kv("tokenizer.ggml.tokens", strings(&["a", "b", "c"]))
            .f32_tensor("a", &[64], &x)
            .tensor("b", &[64], 3, quantize_q4_1(&x))
            .bytes();
        let (_tmp, whole) = open_bytes(&full)?;
        assert!(whole.is_ok());
        for len in 0..full.len() {
            let (_tmp, opened) = open_bytes(&full[..len])?;
            let failed = match opened {
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    true
                }
                Ok(gguf) => gguf
                    .tensors()
                    .iter()
                    .any(|t| gguf.tensor_f32(&t.name).is_err()),
            };
            assert!(
                failed,
                "a file cut to {len} of {} bytes read cleanly",
                full.len()
            );
        }
        // The message says what was being read.
        let cut = full.len() - 8;
        let (_tmp, opened) = open_bytes(&full[..cut])?;
        let msg = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("tensor b") && msg.contains("past the end"),
            "{msg}"
        );
        // 24 header bytes, the key (8 + 12), its type (4), the value's length (8): 60 is in
        // the value's text.
        let (_tmp, opened) = open_bytes(&full[..60])?;
        let msg = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("general.name"), "{msg}");
        Ok(())
    }

    #[test]
    fn unsupported_type_names_the_tensor() -> TestResult {
        let w = Writer::new().tensor("blk.0.attn_q.weight", &[256], 13, vec![0; 176]);
        let (_tmp, gguf) = open_writer(&w)?;
        let err = gguf
            .tensor_f32("blk.0.attn_q.weight")
            .err()
            .ok_or("Q5_K was dequantized")?;
        let msg = err.to_string();
        assert!(
            matches!(err, GgufError::UnsupportedTensorType { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("blk.0.attn_q.weight") && msg.contains("Q5_K (13)"),
            "{msg}"
        );
        assert!(
            msg.contains("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn bad_magic_and_version_are_errors() -> TestResult {
        let mut bytes = Writer::new().bytes();
        bytes[3] = b'X';
        let (_tmp, opened) = open_bytes(&bytes)?;
        assert!(
            matches!(opened, Err(GgufError::BadMagic { .. })),
            "{opened:?}"
        );

        let mut w = Writer::new();
        w.version = 1;
        let (_tmp, opened) = open_bytes(&w.bytes())?;
        assert!(
            matches!(
                opened,
                Err(GgufError::UnsupportedVersion { version: 1, .. })
            ),
            "{opened:?}"
        );
        Ok(())
    }

    #[test]
    fn malformed_headers_are_errors() -> TestResult {
        // An array claiming more elements than the file holds must not allocate them.
        let mut bytes = Writer::new()
            .kv("big", Value::Array(vec![Value::U8(1)]))
            .bytes();
        let count_at = bytes.len() - 9; // u64 count, then the one element
        bytes[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let (_tmp, opened) = open_bytes(&bytes)?;
        let msg = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("metadata key big"), "{msg}");

        // An unknown value type.
        let mut bytes = Writer::new().kv("odd", Value::U8(1)).bytes();
        let type_at = bytes.len() - 5;
        bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
        let (_tmp, opened) = open_bytes(&bytes)?;
        let msg = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("metadata key odd") && msg.contains("type 99"),
            "{msg}"
        );

        // A quantized row that is not whole blocks.
        let w = Writer::new().tensor("ragged", &[31], 8, vec![0; 34]);
        let (_tmp, opened) = open_bytes(&w.bytes())?;
        let msg = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("tensor ragged") && msg.contains("block size 32"),
            "{msg}"
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // RoPE permutation

    #[test]
    fn unpermute_inverts_permute() {
        for (rows, cols, n_head) in [(8, 3, 2), (12, 5, 3), (64, 1, 1), (36, 2, 9)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let p = permute_rope_rows(&w, rows, cols, n_head);
            assert_ne!(p, w, "{rows}x{cols}/{n_head} should move rows");
            assert_eq!(unpermute_rope_rows(&p, rows, cols, n_head), w);
            assert_eq!(
                permute_rope_rows(
                    &unpermute_rope_rows(&w, rows, cols, n_head),
                    rows,
                    cols,
                    n_head
                ),
                w
            );
        }
    }

    #[test]
    fn unpermute_matches_hand_computed_case() {
        // 2 heads of dim 4 (half = 2), one column holding the GGUF row index. GGUF row
        // h*4 + 2i + j holds HF row h*4 + j*2 + i, so per head the HF order of GGUF rows is
        // [0, 2, 1, 3]: HF row 1 (j=0, i=1) is GGUF row 2, HF row 2 (j=1, i=0) is GGUF row 1.
        let gguf: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let hf = unpermute_rope_rows(&gguf, 8, 1, 2);
        assert_eq!(hf, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        // Two columns: whole rows move together.
        let gguf: Vec<f32> = vec![0., 10., 1., 11., 2., 12., 3., 13.];
        let hf = unpermute_rope_rows(&gguf, 4, 2, 1);
        assert_eq!(hf, vec![0., 10., 2., 12., 1., 11., 3., 13.]);
        // A head of dim 6 (half = 3): HF rows [0,1,2 | 3,4,5] come from GGUF rows [0,2,4 | 1,3,5].
        let gguf: Vec<f32> = (0..6).map(|i| i as f32).collect();
        assert_eq!(
            unpermute_rope_rows(&gguf, 6, 1, 1),
            vec![0., 2., 4., 1., 3., 5.]
        );
    }

    // -----------------------------------------------------------------------------------------
    // Tokenizer and Llama conversion

    const TOKENS: [&str; 11] = [
        "<|endoftext|>",
        "a",
        "b",
        "c",
        "Ġ",
        "ab",
        "Ġab",
        "1",
        "2",
        "12",
        "<x>",
    ];

    fn tokenizer_kvs(w: Writer, pre: &str) -> Writer {
        let mut types = vec![Value::I32(1); TOKENS.len()];
        types[0] = Value::I32(3);
        types[10] = Value::I32(4);
        w.kv("tokenizer.ggml.model", Value::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", Value::String(pre.into()))
            .kv("tokenizer.ggml.tokens", strings(&TOKENS))
            .kv("tokenizer.ggml.token_type", Value::Array(types))
            .kv("tokenizer.ggml.merges", strings(&["a b", "Ġ ab", "1 2"]))
            .kv("tokenizer.ggml.bos_token_id", Value::U32(0))
            .kv("tokenizer.ggml.eos_token_id", Value::U32(0))
    }

    fn tokenizer_from(w: Writer) -> std::result::Result<Tokenizer, BoxError> {
        let (_tmp, gguf) = open_writer(&w)?;
        Ok(build_tokenizer(&gguf)?)
    }

    #[test]
    fn tokenizer_round_trips() -> TestResult {
        let tok = tokenizer_from(tokenizer_kvs(Writer::new(), "gpt2"))?;
        let enc = tok.encode("ab abc<|endoftext|>", false)?;
        assert_eq!(enc.get_ids(), &[5, 6, 3, 0]);
        assert_eq!(tok.decode(enc.get_ids(), false)?, "ab abc<|endoftext|>");
        assert_eq!(
            tok.decode(enc.get_ids(), true)?,
            "ab abc",
            "control tokens are special"
        );
        // A user-defined token is matched whole and is not special.
        let enc = tok.encode("a<x>b", true)?;
        assert_eq!(enc.get_ids(), &[1, 10, 2]);
        assert_eq!(tok.decode(enc.get_ids(), true)?, "a<x>b");
        // Without digit splitting, "12" merges.
        assert_eq!(tok.encode("12", false)?.get_ids(), &[9]);
        Ok(())
    }

    #[test]
    fn smollm_pre_tokenizer_splits_digits() -> TestResult {
        let tok = tokenizer_from(tokenizer_kvs(Writer::new(), "smollm"))?;
        assert_eq!(tok.encode("12", false)?.get_ids(), &[7, 8]);
        assert_eq!(tok.encode("ab ab", false)?.get_ids(), &[5, 6]);
        assert_eq!(tok.decode(&[7, 8, 6], false)?, "12 ab");
        Ok(())
    }

    #[test]
    fn add_bos_token_prepends_bos() -> TestResult {
        let w = tokenizer_kvs(Writer::new(), "gpt2")
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
        let tok = tokenizer_from(w)?;
        assert_eq!(tok.encode("ab", true)?.get_ids(), &[0, 5]);
        assert_eq!(tok.encode("ab", false)?.get_ids(), &[5]);
        Ok(())
    }

    #[test]
    fn other_tokenizers_are_refused_by_key() -> TestResult {
        let w = tokenizer_kvs(Writer::new(), "llama-bpe");
        let msg = tokenizer_from(w)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("tokenizer.ggml.pre") && msg.contains("llama-bpe"),
            "{msg}"
        );
        let w = Writer::new().kv("tokenizer.ggml.model", Value::String("llama".into()));
        let msg = tokenizer_from(w)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("tokenizer.ggml.model") && msg.contains("llama"),
            "{msg}"
        );
        Ok(())
    }

    /// A one-layer Llama: hidden 8, 2 heads of 4, 1 KV head, FFN 4, tied embeddings; every
    /// tensor's values are its element indices plus a per-tensor offset. q and k are stored
    /// permuted, as llama.cpp's converter writes them.
    fn tiny_llama(skip_key: Option<&str>) -> Writer {
        let mut w = Writer::new();
        for (k, v) in [
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(8)),
            ("llama.feed_forward_length", Value::U32(4)),
            ("llama.block_count", Value::U32(1)),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.attention.head_count_kv", Value::U32(1)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(100000.0)),
            ("llama.rope.dimension_count", Value::U32(4)),
            ("llama.context_length", Value::U32(2048)),
        ] {
            if Some(k) != skip_key {
                w = w.kv(k, v);
            }
        }
        w = tokenizer_kvs(w, "smollm");
        let vals = |n: usize, base: f32| (0..n).map(|i| base + i as f32).collect::<Vec<_>>();
        w.f32_tensor("token_embd.weight", &[8, 11], &vals(88, 0.0))
            .f32_tensor("output_norm.weight", &[8], &vals(8, 100.0))
            .f32_tensor("blk.0.attn_norm.weight", &[8], &vals(8, 200.0))
            .f32_tensor("blk.0.ffn_norm.weight", &[8], &vals(8, 300.0))
            .f32_tensor(
                "blk.0.attn_q.weight",
                &[8, 8],
                &permute_rope_rows(&vals(64, 400.0), 8, 8, 2),
            )
            .f32_tensor(
                "blk.0.attn_k.weight",
                &[8, 4],
                &permute_rope_rows(&vals(32, 500.0), 4, 8, 1),
            )
            .f32_tensor("blk.0.attn_v.weight", &[8, 4], &vals(32, 600.0))
            .f32_tensor("blk.0.attn_output.weight", &[8, 8], &vals(64, 700.0))
            .f32_tensor("blk.0.ffn_gate.weight", &[8, 4], &vals(32, 800.0))
            .f32_tensor("blk.0.ffn_up.weight", &[8, 4], &vals(32, 900.0))
            .f32_tensor("blk.0.ffn_down.weight", &[4, 8], &vals(32, 1000.0))
    }

    #[test]
    fn converts_a_tiny_llama() -> TestResult {
        let (_tmp, gguf) = open_writer(&tiny_llama(None))?;
        let hf = to_hf(&gguf)?;
        let c = &hf.config;
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["hidden_size"], 8);
        assert_eq!(c["intermediate_size"], 4);
        assert_eq!(c["num_hidden_layers"], 1);
        assert_eq!(c["num_attention_heads"], 2);
        assert_eq!(c["num_key_value_heads"], 1);
        assert_eq!(c["head_dim"], 4);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["max_position_embeddings"], 2048);
        assert_eq!(c["vocab_size"], 11);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["bos_token_id"], 0);
        assert_eq!(c["eos_token_id"], 0);
        assert_eq!(c["torch_dtype"], "float32");

        let names: Vec<&str> = hf.tensors.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.norm.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight",
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
            ]
        );
        let get = |name: &str| hf.tensors.iter().find(|(n, _, _)| n == name);
        let ascending =
            |v: &[f32], base: f32| v.iter().enumerate().all(|(i, &x)| x == base + i as f32);
        for (name, shape, base) in [
            ("model.embed_tokens.weight", vec![11, 8], 0.0),
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 8], 400.0),
            ("model.layers.0.self_attn.k_proj.weight", vec![4, 8], 500.0),
            ("model.layers.0.mlp.down_proj.weight", vec![8, 4], 1000.0),
        ] {
            let (_, s, v) = get(name).ok_or(name)?;
            assert_eq!(s, &shape, "{name}");
            assert!(ascending(v, base), "{name} was not restored: {v:?}");
        }
        assert_eq!(
            hf.tokenizer.encode("ab 12", false)?.get_ids(),
            &[5, 4, 7, 8]
        );
        Ok(())
    }

    #[test]
    fn missing_llama_key_is_named() -> TestResult {
        for key in [
            "llama.context_length",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.block_count",
        ] {
            let (_tmp, gguf) = open_writer(&tiny_llama(Some(key)))?;
            let msg = to_hf(&gguf)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert_eq!(msg, format!("metadata key {key} is missing"));
        }
        // head_count_kv defaults to head_count: then k has too few rows for 2 heads of 4.
        let (_tmp, gguf) = open_writer(&tiny_llama(Some("llama.attention.head_count_kv")))?;
        let msg = to_hf(&gguf)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("blk.0.attn_k.weight"), "{msg}");
        Ok(())
    }

    #[test]
    fn missing_tensor_is_named() -> TestResult {
        let mut w = tiny_llama(None);
        w.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
        let (_tmp, gguf) = open_writer(&w)?;
        let msg = to_hf(&gguf)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(msg, "tensor blk.0.ffn_up.weight is not in the file");
        Ok(())
    }

    /// The SmolLM2-135M-Instruct GGUF another helper fetches for dapt's quickstart. Run with
    /// `cargo test real_smollm2 -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs data/models/smollm2-135m/*.gguf"]
    fn real_smollm2() -> TestResult {
        // The worker crate sits one level below the workspace's data/.
        let dir = std::env::var_os("SMOLLM2_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/models/smollm2-135m"),
            PathBuf::from,
        );
        let path = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "gguf"))
            .ok_or("no .gguf file")?;
        let start = std::time::Instant::now();
        let gguf = GgufFile::open(&path)?;
        println!("{}: {gguf:?}", path.display());
        let hf = to_hf(&gguf)?;
        println!("to_hf took {:.1?}", start.elapsed());
        println!("{}", serde_json::to_string_pretty(&hf.config)?);
        let total: usize = hf.tensors.iter().map(|(_, _, v)| v.len()).sum();
        println!("{} tensors, {total} values", hf.tensors.len());
        for (name, shape, v) in hf.tensors.iter().filter(|(n, _, _)| {
            n.contains("embed") || n == "model.norm.weight" || n.starts_with("model.layers.0.")
        }) {
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
            let rms =
                (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let (lo, hi) = v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
                    (l.min(x), h.max(x))
                });
            println!("{name:50} {shape:?} mean {mean:+.5} rms {rms:.5} min {lo:+.4} max {hi:+.4}");
        }
        let special = hf
            .tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .count();
        println!(
            "vocab {} (with added), {special} special tokens",
            hf.tokenizer.get_vocab_size(true)
        );
        let text = "SELECT * FROM pg_class WHERE relname = 'foo';";
        let enc = hf.tokenizer.encode(text, true)?;
        println!("ids {:?}", enc.get_ids());
        println!("tokens {:?}", enc.get_tokens());
        assert_eq!(hf.tokenizer.decode(enc.get_ids(), false)?, text);
        let chat = "<|im_start|>user\nWhat is 2024?<|im_end|>";
        println!("chat ids {:?}", hf.tokenizer.encode(chat, true)?.get_ids());
        Ok(())
    }
}
