//! Dequantization of ggml blocks and llama.cpp's q/k row permutation.

use super::*;

// ---------------------------------------------------------------------------------------------
// Dequantization

/// Dequantizes `bytes`, which `tensor_bytes` has already checked to be a whole number of blocks
/// of a supported type.
pub(super) fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
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
pub(super) fn reorder_head_rows(
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
