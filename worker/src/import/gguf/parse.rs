//! Reading the GGUF header: a little-endian cursor, metadata values and tensor infos.

use super::*;

// ---------------------------------------------------------------------------------------------
// Header parsing

/// A little-endian cursor over the mapped file. Its errors carry only positions; callers add
/// what was being read with [`ReadError::while_reading`], whose closure runs only on failure so
/// the hot path (a 50k-token vocabulary) formats nothing.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
}

pub(super) enum ReadError {
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
    pub(super) fn while_reading(self, what: impl FnOnce() -> String) -> GgufError {
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
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn bytes(&mut self, n: u64) -> Result<&'a [u8], ReadError> {
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

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N as u64)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(super) fn string(&mut self) -> Result<String, ReadError> {
        let len = self.u64()?;
        let start = self.pos;
        let bytes = self.bytes(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ReadError::BadUtf8 { offset: start })
    }
}

/// GGUF metadata value type ids.
pub(super) mod value_type {
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

/// Elements a metadata array may hold (2^22; Gemma's 262,144-token vocabulary is the largest
/// real one known).
pub(super) const MAX_ARRAY_ELEMENTS: u64 = 1 << 22;

pub(super) fn read_value(r: &mut Reader, key: &str) -> Result<Value> {
    let type_id = r
        .u32()
        .map_err(|e| e.while_reading(|| format!("the type of metadata key {key}")))?;
    read_typed_value(r, type_id, &|| format!("metadata key {key}"), 0)
}

/// Reads one value of type `type_id`; `what` describes it (key and array index) for errors.
pub(super) fn read_typed_value(
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
            // Each element is held as a `Value` of some 32 bytes: bounded, so that a megabyte
            // array of bytes cannot take 32 times its size (the largest real ones, a tokenizer's
            // tokens and merges, hold a few hundred thousand).
            if count > MAX_ARRAY_ELEMENTS {
                return Err(malformed(
                    what(),
                    format!(
                        "an array of {count} elements; dapt reads at most {MAX_ARRAY_ELEMENTS}"
                    ),
                ));
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

pub(super) fn read_tensor_info(r: &mut Reader, index: u64) -> Result<TensorInfo> {
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
