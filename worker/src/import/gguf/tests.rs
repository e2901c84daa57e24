//! Tests of the GGUF reader and converter on synthetic files written here (and SmolLM2 when fetched).

use super::*;
use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(super) type BoxError = Box<dyn Error + Send + Sync>;
pub(super) type TestResult = std::result::Result<(), BoxError>;

// -----------------------------------------------------------------------------------------
// A minimal GGUF writer, so tests can build exactly the file they need.

struct TestTensor {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

pub(super) struct Writer {
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

    pub(super) fn kv(mut self, key: &str, value: Value) -> Self {
        self.kvs.push((key.to_owned(), value));
        self
    }

    fn without(mut self, key: &str) -> Self {
        self.kvs.retain(|(k, _)| k != key);
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
pub(super) struct TempFile(PathBuf);

impl TempFile {
    fn with(bytes: &[u8]) -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("dapt-gguf-test-{}-{n}.gguf", std::process::id()));
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

pub(super) fn open_writer(w: &Writer) -> std::result::Result<(TempFile, GgufFile), BoxError> {
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
    let w =
        tokenizer_kvs(Writer::new(), "gpt2").kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
    let tok = tokenizer_from(w)?;
    assert_eq!(tok.encode("ab", true)?.get_ids(), &[0, 5]);
    assert_eq!(tok.encode("ab", false)?.get_ids(), &[5]);
    Ok(())
}

/// `add_eos_token` appends the EOS (llama.cpp does; the template was BOS-only before), alone or
/// after a BOS.
#[test]
fn add_eos_token_appends_eos() -> TestResult {
    let w =
        tokenizer_kvs(Writer::new(), "gpt2").kv("tokenizer.ggml.add_eos_token", Value::Bool(true));
    let tok = tokenizer_from(w)?;
    assert_eq!(tok.encode("ab", true)?.get_ids(), &[5, 0]);
    let w = tokenizer_kvs(Writer::new(), "gpt2")
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .kv("tokenizer.ggml.add_eos_token", Value::Bool(true));
    let tok = tokenizer_from(w)?;
    assert_eq!(tok.encode("ab", true)?.get_ids(), &[0, 5, 0]);
    Ok(())
}

/// The imported folder's `tokenizer_config.json` makes transformers load `tokenizer.json` as it
/// is (without it, transformers 4 took the Llama class of config.json and put a `<s>` the
/// vocabulary lacks before every sequence; the chat template was lost: an audit), names the
/// file's special tokens and keeps its chat template; the marker lists it as dapt's.
#[test]
fn the_import_writes_how_transformers_loads_its_tokenizer() -> TestResult {
    let out = tempfile::tempdir()?;
    let w = tiny_llama(None)
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .kv(
            "tokenizer.chat_template",
            Value::String("{{ messages }}".into()),
        );
    let (_tmp, gguf) = open_writer(&w)?;
    crate::import::import_gguf(&gguf, out.path())?;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.path().join("tokenizer_config.json"),
    )?)?;
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["bos_token"], TOKENS[0]);
    assert_eq!(config["eos_token"], TOKENS[0]);
    assert_eq!(config["add_bos_token"], true);
    assert_eq!(config["add_eos_token"], false);
    assert_eq!(config["chat_template"], "{{ messages }}");
    assert_eq!(
        dapt_proto::checkpoint::carried_files_written(out.path()),
        ["tokenizer_config.json"]
    );
    Ok(())
}

/// Without `tokenizer.ggml.pre`, or with `default`, llama.cpp splits text by its default
/// pre-tokenizer, which is neither GPT-2's nor the model's own: taken for GPT-2's, a sixth of
/// texts got other ids (an audit). Refused; llama.cpp's `gpt-2` name is GPT-2's split.
#[test]
fn a_default_or_absent_pre_tokenizer_is_refused() -> TestResult {
    for pre in [Some("default"), None] {
        let w = match pre {
            Some(p) => tokenizer_kvs(Writer::new(), p),
            None => tokenizer_kvs(Writer::new(), "x").without("tokenizer.ggml.pre"),
        };
        let msg = tokenizer_from(w)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("tokenizer.ggml.pre") && msg.contains("default (or absent)"),
            "{pre:?}: {msg}"
        );
    }
    let tok = tokenizer_from(tokenizer_kvs(Writer::new(), "gpt-2"))?;
    assert_eq!(tok.encode("ab ab", false)?.get_ids(), &[5, 6]);
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
pub(super) fn tiny_llama(skip_key: Option<&str>) -> Writer {
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
    let ascending = |v: &[f32], base: f32| v.iter().enumerate().all(|(i, &x)| x == base + i as f32);
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

/// A tensor that maps to a Hugging Face name the Llama layout does not use (an output or MLP
/// bias; the config says no attention bias, as only q's bias sets it) refuses the import, by
/// name, rather than being dropped; so does a NaN in a tensor.
#[test]
fn unused_and_non_finite_tensors_refuse_the_import() -> TestResult {
    let out = tempfile::tempdir()?;
    let w = tiny_llama(None)
        .f32_tensor("blk.0.attn_output.bias", &[8], &[0.5; 8])
        .f32_tensor("blk.0.ffn_up.bias", &[4], &[0.5; 4]);
    let (_tmp, gguf) = open_writer(&w)?;
    let msg = crate::import::import_gguf(&gguf, &out.path().join("hf"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("2 tensors that dapt's Llama does not use")
            && msg.contains(
                "`model.layers.0.mlp.up_proj.bias`, `model.layers.0.self_attn.o_proj.bias`"
            ),
        "{msg}"
    );
    assert!(!out.path().join("hf").exists());

    let mut w = tiny_llama(None);
    let mut bad = vec![1.0f32; 32];
    bad[5] = f32::INFINITY;
    w.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
    let (_tmp, gguf) = open_writer(&w.f32_tensor("blk.0.ffn_up.weight", &[8, 4], &bad))?;
    let msg = crate::import::import_gguf(&gguf, &out.path().join("hf"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("tensor `model.layers.0.mlp.up_proj.weight`: 1 of 32 values are not finite"),
        "{msg}"
    );
    // A refused file leaves no output directory (`dapt import-gguf` claimed it, marker and all,
    // before converting; an audit).
    assert!(!out.path().join("hf").exists());
    Ok(())
}

/// A one-layer Qwen2 (`arch` `qwen2`, with q/k/v biases) or Qwen3 (`qwen3`, with per-head q/k
/// norms and an explicit head dim): hidden 8, 2 heads of 4 (Qwen3: of 6), 1 KV head, FFN 4,
/// untied. llama.cpp keeps Hugging Face's q/k row order for these (NeoX RoPE): values are
/// ascending as written.
pub(super) fn tiny_qwen(arch: &str) -> Writer {
    let hd: u64 = if arch == "qwen3" { 6 } else { 4 };
    let mut w = Writer::new()
        .kv("general.architecture", Value::String(arch.into()))
        .kv(&format!("{arch}.embedding_length"), Value::U32(8))
        .kv(&format!("{arch}.feed_forward_length"), Value::U32(4))
        .kv(&format!("{arch}.block_count"), Value::U32(1))
        .kv(&format!("{arch}.attention.head_count"), Value::U32(2))
        .kv(&format!("{arch}.attention.head_count_kv"), Value::U32(1))
        .kv(
            &format!("{arch}.attention.key_length"),
            Value::U32(hd as u32),
        )
        .kv(
            &format!("{arch}.attention.value_length"),
            Value::U32(hd as u32),
        )
        .kv(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        )
        .kv(&format!("{arch}.rope.freq_base"), Value::F32(1_000_000.0))
        .kv(&format!("{arch}.context_length"), Value::U32(4096));
    w = tokenizer_kvs(w, "qwen2");
    let vals = |n: u64, base: f32| (0..n).map(|i| base + i as f32).collect::<Vec<_>>();
    let (q, kv) = (2 * hd, hd);
    w = w
        .f32_tensor("token_embd.weight", &[8, 11], &vals(88, 0.0))
        .f32_tensor("output.weight", &[8, 11], &vals(88, 50.0))
        .f32_tensor("output_norm.weight", &[8], &vals(8, 100.0))
        .f32_tensor("blk.0.attn_norm.weight", &[8], &vals(8, 200.0))
        .f32_tensor("blk.0.ffn_norm.weight", &[8], &vals(8, 300.0))
        .f32_tensor("blk.0.attn_q.weight", &[8, q], &vals(8 * q, 400.0))
        .f32_tensor("blk.0.attn_k.weight", &[8, kv], &vals(8 * kv, 500.0))
        .f32_tensor("blk.0.attn_v.weight", &[8, kv], &vals(8 * kv, 600.0))
        .f32_tensor("blk.0.attn_output.weight", &[q, 8], &vals(8 * q, 700.0))
        .f32_tensor("blk.0.ffn_gate.weight", &[8, 4], &vals(32, 800.0))
        .f32_tensor("blk.0.ffn_up.weight", &[8, 4], &vals(32, 900.0))
        .f32_tensor("blk.0.ffn_down.weight", &[4, 8], &vals(32, 1000.0));
    if arch == "qwen2" {
        w = w
            .f32_tensor("blk.0.attn_q.bias", &[q], &vals(q, 1100.0))
            .f32_tensor("blk.0.attn_k.bias", &[kv], &vals(kv, 1200.0))
            .f32_tensor("blk.0.attn_v.bias", &[kv], &vals(kv, 1300.0));
    } else {
        w = w
            .f32_tensor("blk.0.attn_q_norm.weight", &[hd], &vals(hd, 1400.0))
            .f32_tensor("blk.0.attn_k_norm.weight", &[hd], &vals(hd, 1500.0));
    }
    w
}

/// Qwen2 and Qwen3 GGUFs import as their own family: config.json with the family's
/// model_type, every tensor (biases, q/k norms) used, q/k rows kept in order; a missing bias
/// or norm is named; an unknown architecture is refused by name.
#[test]
fn converts_tiny_qwen2_and_qwen3() -> TestResult {
    for (arch, family, extra) in [
        (
            "qwen2",
            Family::Qwen2,
            "model.layers.0.self_attn.q_proj.bias",
        ),
        (
            "qwen3",
            Family::Qwen3,
            "model.layers.0.self_attn.q_norm.weight",
        ),
    ] {
        let (_tmp, gguf) = open_writer(&tiny_qwen(arch))?;
        let out = tempfile::tempdir()?;
        let model = crate::import::import_gguf(&gguf, &out.path().join("hf"))?;
        assert_eq!(model.config.family, family);
        assert!(!model.config.tie_word_embeddings);
        assert_eq!(model.config.rope_theta, 1_000_000.0);
        assert_eq!(model.layout.total as u64, model.config.num_params());
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("hf/config.json"))?)?;
        assert_eq!(written["model_type"], arch);
        let get = |name: &str| {
            model
                .layout
                .get(name)
                .map(|p| model.weights[p.range()].to_vec())
        };
        for (name, base) in [
            ("model.layers.0.self_attn.q_proj.weight", 400.0),
            ("model.layers.0.self_attn.k_proj.weight", 500.0),
            (extra, if arch == "qwen2" { 1100.0 } else { 1400.0 }),
        ] {
            let v = get(name).ok_or(name)?;
            assert!(
                v.iter().enumerate().all(|(i, &x)| x == base + i as f32),
                "{arch} {name} was reordered: {v:?}"
            );
        }
        let missing = if arch == "qwen2" {
            "blk.0.attn_v.bias"
        } else {
            "blk.0.attn_k_norm.weight"
        };
        let mut w = tiny_qwen(arch);
        w.tensors.retain(|t| t.name != missing);
        let (_tmp, gguf) = open_writer(&w)?;
        let msg = to_hf(&gguf)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(msg, format!("tensor {missing} is not in the file"));
    }
    let mut w = tiny_qwen("qwen2");
    w.kvs[0].1 = Value::String("gemma2".into());
    let (_tmp, gguf) = open_writer(&w)?;
    let msg = to_hf(&gguf)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("general.architecture = gemma2"), "{msg}");
    Ok(())
}

#[test]
fn qwen2_pre_tokenizer_splits_single_digits_and_keeps_spaces() -> TestResult {
    let tok = tokenizer_from(tokenizer_kvs(Writer::new(), "qwen2"))?;
    assert_eq!(tok.encode("12", false)?.get_ids(), &[7, 8]);
    assert_eq!(tok.encode("ab ab", false)?.get_ids(), &[5, 6]);
    assert_eq!(tok.decode(&[7, 8, 6], false)?, "12 ab");
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
        let rms = (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
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

/// A block count the file's tensors cannot hold is refused by key before anything is sized
/// from it (2^32 - 1 blocks grew a list of tensor names without end), and a metadata array
/// longer than dapt reads is refused by key (each element was held as a 32-byte value).
#[test]
fn sizes_the_file_cannot_hold_are_refused_by_key() -> TestResult {
    let w = tiny_llama(Some("llama.block_count")).kv("llama.block_count", Value::U32(u32::MAX));
    let (_tmp, gguf) = open_writer(&w)?;
    let msg = to_hf(&gguf)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("llama.block_count") && msg.contains("tensors"),
        "{msg}"
    );

    let big = vec![Value::U8(7); super::parse::MAX_ARRAY_ELEMENTS as usize + 1];
    let w = tiny_llama(None).kv("general.padding", Value::Array(big));
    let msg = open_writer(&w)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("general.padding") && msg.contains("at most"),
        "{msg}"
    );
    Ok(())
}

/// A GGUF imported into an earlier dapt export whose checkpoint carried its base model's
/// `generation_config.json` (listed in the export's marker) does not keep that file beside the
/// imported model: it described another model. A file the export did not write refuses it.
#[test]
fn an_import_over_an_export_drops_the_files_it_carried() -> TestResult {
    let out = tempfile::tempdir()?;
    let marker = serde_json::json!({"created_by": "dapt", "files": ["generation_config.json"]});
    std::fs::write(
        out.path().join(crate::import::hf::EXPORT_MARKER),
        marker.to_string(),
    )?;
    std::fs::write(out.path().join("generation_config.json"), "{}")?;
    let (_tmp, gguf) = open_writer(&tiny_llama(None))?;
    // A file the export did not write there refuses the import (as `dapt import-gguf` did
    // before the import claimed the folder itself), and nothing is changed.
    std::fs::write(out.path().join("notes.txt"), "mine")?;
    assert!(crate::import::import_gguf(&gguf, out.path()).is_err());
    assert!(out.path().join("generation_config.json").is_file());
    std::fs::remove_file(out.path().join("notes.txt"))?;
    crate::import::import_gguf(&gguf, out.path())?;
    assert!(out.path().join("model.safetensors").is_file());
    assert!(!out.path().join("generation_config.json").exists());
    assert_eq!(
        dapt_proto::checkpoint::carried_files_written(out.path()),
        ["tokenizer_config.json"]
    );
    Ok(())
}
