//! Blockwise attention: the flash-attention op's forward and backward as Burn tensor ops over
//! blocks of query positions, so that the two products per block (`Q K^T` and `P V`, and the
//! four of the backward) run as the backend's matmul, which on a GPU is cubek's tensor-core
//! (cmma) matmul, where the unit-level kernels of `kernels/attention.rs` run on the CUDA cores.
//!
//! Same op, shapes and results as [`super::attention::AttentionOps`]'s (the output and the f32
//! log-sum-exp per row; `(dq, dk, dv)` with `dk`, `dv` summed over each kv head's query heads),
//! FlashAttention-2's algorithm (Dao 2023, Algorithm 2) with blocks of query rows instead of
//! register tiles: per block of `block` query positions (all query heads of a kv head stacked
//! as rows, so a group's queries share one `K` and `V` and nothing is repeated), the keys the
//! block can see (from the window's start to the block's last position: blocks above the
//! diagonal are never computed), the scaled scores in f32, masked, their row max and
//! log-sum-exp in f32; the backward recomputes `P = exp(S - lse)` per block and accumulates
//! `dK`, `dV` in f32 over the blocks. At most one block's `[batch, heads, block, keys]` scores
//! exist at a time: [`block_positions`] sizes the block for 128 MiB of them in f32. The scores
//! are rounded to the compute dtype by the matmul (bf16 on a GPU: Burn's matmul returns its
//! inputs' dtype), then handled in f32 by [`BlockOps`]: one kernel per block each way on the
//! CubeCL backends, Burn's ops on the CPU.
//!
//! Chosen at run time on the CubeCL backends by `DAPT_ATTENTION` ([`AttentionChoice`]): the
//! default (`auto`) since an H200 measured it faster than the unit-level kernels at head dims
//! 64 and 128 (docs/gpu.md).

use std::ops::Range;
use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};

use super::attention::{attention_mask, AttentionShape};
use super::matmul::{matmul, MatmulOps};

/// f32 score bytes one block may take (`[batch, heads, block, seq]`): 128 MiB.
pub const BLOCK_SCORE_BYTES: usize = 128 << 20;

/// How the CubeCL backends run the attention op (`DAPT_ATTENTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionChoice {
    /// `auto` (the default; also unset or empty): blockwise, the faster of the two on an H200
    /// at every head dim measured (2026-11-29, docs/benchmarks.md: forward + backward at the 1B
    /// attention shape in bf16 5.6 ms blockwise against 16.8 ms for the kernels, 7.1 against
    /// 135 ms with head dim 128; the 1B step 6,892 against 5,284 tokens/s).
    Auto,
    /// `kernels`: the unit-level flash-attention kernels (`kernels/attention.rs`).
    Kernels,
    /// `blockwise`: this module.
    Blockwise,
}

impl AttentionChoice {
    /// Whether attention runs blockwise under this choice.
    pub fn blockwise(self) -> bool {
        self != AttentionChoice::Kernels
    }
}

/// Whether the CubeCL backends run attention blockwise rather than with the unit-level kernels
/// ([`AttentionChoice`]). `DAPT_ATTENTION` is read once per process, and logged then; the
/// worker refuses any other value at its start ([`attention_from_env`]).
pub fn use_blockwise() -> bool {
    static CHOICE: OnceLock<AttentionChoice> = OnceLock::new();
    CHOICE
        .get_or_init(|| {
            let choice = attention_from_env().unwrap_or(AttentionChoice::Auto);
            tracing::info!(attention = ?choice, "attention on the GPU (DAPT_ATTENTION)");
            choice
        })
        .blockwise()
}

/// `DAPT_ATTENTION` read: `auto` when unset or empty.
///
/// # Errors
/// Any other value than `auto`, `kernels` or `blockwise`, named.
pub fn attention_from_env() -> Result<AttentionChoice, String> {
    parse_attention(std::env::var("DAPT_ATTENTION").ok().as_deref())
}

fn parse_attention(value: Option<&str>) -> Result<AttentionChoice, String> {
    match value {
        None | Some("" | "auto") => Ok(AttentionChoice::Auto),
        Some("kernels") => Ok(AttentionChoice::Kernels),
        Some("blockwise") => Ok(AttentionChoice::Blockwise),
        Some(other) => Err(format!(
            "DAPT_ATTENTION={other:?}: expected `auto` (the default), `kernels` or `blockwise`"
        )),
    }
}

/// Query positions per block for `shape`: `DAPT_ATTENTION_BLOCK` when set ([`block_from_env`]),
/// else as many as keep one block's f32 scores `[batch, heads, block, seq]` within
/// [`BLOCK_SCORE_BYTES`], a multiple of 64 (at least 64); the whole sequence when it fits.
pub fn block_positions(shape: &AttentionShape) -> usize {
    static CHOICE: OnceLock<Option<usize>> = OnceLock::new();
    let chosen = *CHOICE.get_or_init(|| {
        let block = block_from_env().unwrap_or(None);
        if let Some(block) = block {
            tracing::info!(
                block,
                "attention blocks of query positions (DAPT_ATTENTION_BLOCK)"
            );
        }
        block
    });
    match chosen {
        Some(block) => block.min(shape.seq),
        None => fitted_block_positions(shape),
    }
}

/// [`block_positions`] by the score budget alone.
pub fn fitted_block_positions(shape: &AttentionShape) -> usize {
    let per_position = 4 * shape.batch * shape.heads * shape.seq;
    let fit = (BLOCK_SCORE_BYTES / per_position.max(1)) / 64 * 64;
    fit.max(64).min(shape.seq)
}

/// `DAPT_ATTENTION_BLOCK` read: query positions per block of blockwise attention (a whole
/// number, at least 1), or None when unset or empty (the score budget decides). A GPU session's
/// knob: fewer, larger blocks mean fewer launches and copies, more of the masked upper triangle
/// computed, and `[batch, heads, block, seq]` f32 scores per block.
///
/// # Errors
/// A value that is not a whole number of at least 1, named.
pub fn block_from_env() -> Result<Option<usize>, String> {
    parse_block(std::env::var("DAPT_ATTENTION_BLOCK").ok().as_deref())
}

fn parse_block(value: Option<&str>) -> Result<Option<usize>, String> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(format!(
                "DAPT_ATTENTION_BLOCK={v:?}: expected query positions per block, a whole number of at least 1 (unset: sized for {} MiB of scores)",
                BLOCK_SCORE_BYTES >> 20
            )),
        },
    }
}

/// Where one block's scores sit in the sequence, for [`BlockOps`]. A block's scores are
/// `[batch, kv_heads, rows, keys]`: the rows are `rows / queries` runs (one per query head of
/// the kv head) of the query positions `first_query..first_query + queries` (row `r` is
/// position `first_query + r % queries`), the columns the key positions
/// `first_key..first_key + keys`. A query sees the keys at or before it and less than `window`
/// positions back; `scale` (`1/sqrt(head_dim)`) multiplies the raw scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockSpan {
    pub first_query: usize,
    pub queries: usize,
    pub first_key: usize,
    pub window: usize,
    pub scale: f32,
}

/// The per-block softmax work of blockwise attention: everything between its matmuls, in f32.
/// The default bodies are Burn's tensor ops (the CPU backend's, and the reference); the CubeCL
/// backends run each as one kernel (`kernels/blockwise.rs`), which never materialises an f32
/// copy of the scores or a mask.
pub trait BlockOps: MatmulOps {
    /// The softmax of one block's raw scores `scores` `[batch, kv_heads, rows, keys]` (`Q K^T`
    /// in the compute dtype, unscaled) along the keys: scaled by `span.scale`, the keys a query
    /// does not see masked out, in f32. Returns `(probs, lse)`: the probabilities in `scores`'
    /// dtype and the log-sum-exp of the scaled, masked scores `[batch, kv_heads, rows]` (f32).
    fn block_softmax(
        scores: FloatTensor<Self>,
        span: BlockSpan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let scores = tensor::<Self, 4>(scores);
        let dtype = FloatDType::from(scores.dtype());
        let [b, h, rows, _] = scores.dims();
        let s = masked_scores(scores, &span);
        let max = s.clone().max_dim(3);
        let exp = (s - max.clone()).exp();
        let sum = exp.clone().sum_dim(3);
        let probs = (exp / sum.clone()).cast(dtype);
        (
            primitive(probs),
            primitive((max + sum.log()).reshape([b, h, rows])),
        )
    }

    /// The backward's probabilities and score gradients for one block: `P = exp(scale S -
    /// lse)` (0 where the key is not seen) and `dS = scale P (dP - delta)`, both in `scores`'
    /// dtype, from the raw scores `scores` and `dprobs` (`dO V^T`) `[batch, kv_heads, rows,
    /// keys]` (the compute dtype) and the f32 `lse` and `delta` (`rowsum(dO * O)`)
    /// `[batch, kv_heads, rows]`. Returns `(probs, dscores)`.
    fn block_grad(
        scores: FloatTensor<Self>,
        dprobs: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        span: BlockSpan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let scores = tensor::<Self, 4>(scores);
        let dtype = FloatDType::from(scores.dtype());
        let lse = tensor::<Self, 3>(lse).unsqueeze_dim::<4>(3);
        let delta = tensor::<Self, 3>(delta).unsqueeze_dim::<4>(3);
        let probs = (masked_scores(scores, &span) - lse).exp();
        let dprobs = tensor::<Self, 4>(dprobs).cast(FloatDType::F32);
        let dscores = (probs.clone() * (dprobs - delta)).mul_scalar(span.scale);
        (primitive(probs.cast(dtype)), primitive(dscores.cast(dtype)))
    }
}

impl BlockOps for burn::backend::Flex {}

/// `scores` in f32, scaled, with the keys a query does not see at -inf.
fn masked_scores<B: Backend>(scores: Tensor<B, 4>, span: &BlockSpan) -> Tensor<B, 4> {
    let [b, h, rows, keys] = scores.dims();
    // The model's causal + window mask over positions 0..end, cut to the block.
    let end = span.first_key + keys;
    let last_query = span.first_query + span.queries;
    assert!(
        last_query <= end,
        "a block's keys reach its last query: {span:?}, {keys} keys"
    );
    let hidden = attention_mask::<B>(end, Some(span.window), &scores.device())
        .slice([span.first_query..last_query, span.first_key..end])
        .repeat_dim(0, rows / span.queries.max(1));
    scores
        .cast(FloatDType::F32)
        .mul_scalar(span.scale)
        .mask_fill(
            hidden.unsqueeze::<4>().expand([b, h, rows, keys]),
            f32::NEG_INFINITY,
        )
}

/// The output `[batch * seq, heads * head_dim]` and the log-sum-exp `[batch, heads, seq]` (f32)
/// of `q` `[batch * seq, heads * head_dim]` over `k`, `v` `[batch * seq, kv_heads * head_dim]`,
/// in blocks of `block` query positions (the last block may be shorter).
pub fn forward<B: BlockOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    shape: AttentionShape,
    block: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = shape;
    let q = queries::<B>(tensor(q), &s);
    let (k, v) = (keys::<B>(tensor(k), &s), keys::<B>(tensor(v), &s));
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (rows, cols) in blocks(&s, block) {
        let n = rows.len();
        let span = span(&s, &rows, &cols);
        let qb = block_rows(q.clone(), &s, rows);
        let (kb, vb) = (key_rows(&k, &s, cols.clone()), key_rows(&v, &s, cols));
        let (probs, lse) = B::block_softmax(primitive(matmul(qb, kb.swap_dims(2, 3))), span);
        let out = matmul(tensor::<B, 4>(probs), vb);
        outs.push(out.reshape([s.batch, s.kv_heads, s.group(), n, s.head_dim]));
        lses.push(tensor::<B, 3>(lse).reshape([s.batch, s.kv_heads, s.group(), n]));
    }
    let out = cat(outs, 3);
    let lse = cat(lses, 3).reshape([s.batch, s.heads, s.seq]);
    (primitive(unqueries(out, &s)), primitive(lse))
}

/// `(dq, dk, dv)` for the output's gradient `dout`, from the forward's inputs, output and
/// log-sum-exp (shapes as in [`forward`]), in blocks of `block` query positions; `dk`, `dv`
/// accumulate in f32.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: BlockOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    shape: AttentionShape,
    block: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let s = shape;
    let q = queries::<B>(tensor(q), &s);
    let dtype = FloatDType::from(q.dtype());
    let (k, v) = (keys::<B>(tensor(k), &s), keys::<B>(tensor(v), &s));
    let dout = queries::<B>(tensor(dout), &s);
    let grouped = [s.batch, s.kv_heads, s.group(), s.seq];
    let lse = tensor::<B, 3>(lse).cast(FloatDType::F32).reshape(grouped);
    // delta = rowsum(dO * O) in f32, once for every query row.
    let delta = (dout.clone().cast(FloatDType::F32)
        * queries::<B>(tensor(out), &s).cast(FloatDType::F32))
    .sum_dim(4)
    .reshape(grouped);
    let device = q.device();
    let kv_shape = [s.batch, s.kv_heads, s.seq, s.head_dim];
    // `dK`, `dV` in f32, summed over the blocks. The blocks run last first: without a window
    // the last block sees every key, so its `dK`, `dV` start the sums (no zeros, no first
    // add); with a window that cuts the first keys off, the sums start from zeros.
    let (mut dk, mut dv): (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) = (None, None);
    let mut dqs = Vec::new();
    let per_row = |t: &Tensor<B, 4>, rows: Range<usize>| {
        let n = rows.len();
        primitive(
            t.clone()
                .slice([0..s.batch, 0..s.kv_heads, 0..s.group(), rows])
                .reshape([s.batch, s.kv_heads, s.group() * n]),
        )
    };
    for (rows, cols) in blocks(&s, block).into_iter().rev() {
        let n = rows.len();
        let span = span(&s, &rows, &cols);
        let qb = block_rows(q.clone(), &s, rows.clone());
        let dob = block_rows(dout.clone(), &s, rows.clone());
        let (kb, vb) = (
            key_rows(&k, &s, cols.clone()),
            key_rows(&v, &s, cols.clone()),
        );
        let scores = matmul(qb.clone(), kb.clone().swap_dims(2, 3));
        let dprobs = matmul(dob.clone(), vb.swap_dims(2, 3));
        let (probs, dscores) = B::block_grad(
            primitive(scores),
            primitive(dprobs),
            per_row(&lse, rows.clone()),
            per_row(&delta, rows),
            span,
        );
        let (probs, dscores) = (tensor::<B, 4>(probs), tensor::<B, 4>(dscores));
        let dvb = matmul(probs.swap_dims(2, 3), dob);
        dqs.push(matmul(dscores.clone(), kb).reshape([
            s.batch,
            s.kv_heads,
            s.group(),
            n,
            s.head_dim,
        ]));
        let dkb = matmul(dscores.swap_dims(2, 3), qb);
        let sum = |acc: Option<Tensor<B, 4>>, part: Tensor<B, 4>| match acc {
            None if cols == (0..s.seq) => part.cast(FloatDType::F32),
            None => add_rows(
                Tensor::<B, 4>::zeros(kv_shape, &device).cast(FloatDType::F32),
                cols.clone(),
                part,
            ),
            Some(acc) => add_rows(acc, cols.clone(), part),
        };
        dk = Some(sum(dk, dkb));
        dv = Some(sum(dv, dvb));
    }
    let (dk, dv) = (
        dk.expect("one block at least"),
        dv.expect("one block at least"),
    );
    dqs.reverse();
    let dq = unqueries(cat(dqs, 3), &s);
    let unkeys = |x: Tensor<B, 4>| {
        x.cast(dtype)
            .swap_dims(1, 2)
            .reshape([s.batch * s.seq, s.kv_heads * s.head_dim])
    };
    (primitive(dq), primitive(unkeys(dk)), primitive(unkeys(dv)))
}

/// The [`BlockSpan`] of the block of query positions `rows` over the key positions `cols`.
fn span(s: &AttentionShape, rows: &Range<usize>, cols: &Range<usize>) -> BlockSpan {
    BlockSpan {
        first_query: rows.start,
        queries: rows.len(),
        first_key: cols.start,
        window: s.effective_window(),
        scale: s.scale() as f32,
    }
}

/// The blocks: query positions `rows` and the key positions `cols` they see (from the
/// window's start for the first row to the last row).
fn blocks(s: &AttentionShape, block: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let block = block.max(1);
    (0..s.seq)
        .step_by(block)
        .map(|start| {
            let end = (start + block).min(s.seq);
            let first = start + 1 - s.effective_window().min(start + 1);
            (start..end, first..end)
        })
        .collect()
}

/// Query-like rows `[b * t, heads * hd]` as `[b, kv_heads, group, t, hd]`.
fn queries<B: Backend>(x: Tensor<B, 2>, s: &AttentionShape) -> Tensor<B, 5> {
    x.reshape([s.batch, s.seq, s.kv_heads, s.group(), s.head_dim])
        .permute([0, 2, 3, 1, 4])
}

/// The inverse of [`queries`].
fn unqueries<B: Backend>(x: Tensor<B, 5>, s: &AttentionShape) -> Tensor<B, 2> {
    x.permute([0, 3, 1, 2, 4])
        .reshape([s.batch * s.seq, s.heads * s.head_dim])
}

/// Key-like rows `[b * t, kv_heads * hd]` as `[b, kv_heads, t, hd]`, contiguous (on CUDA a row
/// of `hd` values whose bytes are not a power of two is pitched, and cubek copies again; the
/// presets' head dims, 64 and 128, are not): one copy here,
/// where a view of the rows (kv-head stride `hd` below the row stride `kv_heads * hd`) is one
/// that cubek's matmul copies before every product it takes part in ("highly permuted",
/// cubecl-std's `matrix_batch_layout`): four times a block in the backward pass. Its blocks of
/// key positions ([`key_rows`]) are then views that the matmul reads in place.
fn keys<B: Backend>(x: Tensor<B, 2>, s: &AttentionShape) -> Tensor<B, 4> {
    x.reshape([s.batch, s.seq, s.kv_heads, s.head_dim])
        .swap_dims(1, 2)
        // A reshape that merges the swapped dimensions copies them into that order.
        .reshape([s.batch * s.kv_heads, s.seq, s.head_dim])
        .reshape([s.batch, s.kv_heads, s.seq, s.head_dim])
}

/// Positions `rows` of every query head, as `[b, kv_heads, group * rows, hd]` (a kv head's
/// query heads stacked).
fn block_rows<B: Backend>(x: Tensor<B, 5>, s: &AttentionShape, rows: Range<usize>) -> Tensor<B, 4> {
    let n = rows.len();
    x.slice([0..s.batch, 0..s.kv_heads, 0..s.group(), rows, 0..s.head_dim])
        .reshape([s.batch, s.kv_heads, s.group() * n, s.head_dim])
}

/// Key positions `cols` of `k` (or `v`) `[batch, kv_heads, seq, head_dim]` (a view).
fn key_rows<B: Backend>(k: &Tensor<B, 4>, s: &AttentionShape, cols: Range<usize>) -> Tensor<B, 4> {
    k.clone()
        .slice([0..s.batch, 0..s.kv_heads, cols, 0..s.head_dim])
}

/// `parts` joined along `dim`; one part is itself (Burn's `cat` copies even one).
fn cat<B: Backend, const D: usize>(mut parts: Vec<Tensor<B, D>>, dim: usize) -> Tensor<B, D> {
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    Tensor::cat(parts, dim)
}

/// `acc` (f32) with `part` added into positions `cols` of its third dimension.
fn add_rows<B: Backend>(acc: Tensor<B, 4>, cols: Range<usize>, part: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, _, d] = acc.dims();
    let range = [0..b, 0..h, cols, 0..d];
    let sum = acc.clone().slice(range.clone()) + part.cast(FloatDType::F32);
    acc.slice_assign(range, sum)
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

#[cfg(test)]
mod tests {
    use super::parse_attention;

    #[test]
    fn dapt_attention_takes_auto_kernels_or_blockwise_and_names_anything_else() {
        use super::AttentionChoice::*;
        assert_eq!(parse_attention(None), Ok(Auto));
        assert_eq!(parse_attention(Some("")), Ok(Auto));
        assert_eq!(parse_attention(Some("auto")), Ok(Auto));
        assert_eq!(parse_attention(Some("kernels")), Ok(Kernels));
        assert_eq!(parse_attention(Some("blockwise")), Ok(Blockwise));
        let e = parse_attention(Some("flash")).unwrap_err();
        assert!(
            e.contains("DAPT_ATTENTION=\"flash\"") && e.contains("blockwise"),
            "{e}"
        );
    }

    #[test]
    fn dapt_attention_block_takes_a_positive_whole_number_and_names_anything_else() {
        use super::parse_block;
        assert_eq!(parse_block(None), Ok(None));
        assert_eq!(parse_block(Some("")), Ok(None));
        assert_eq!(parse_block(Some("1024")), Ok(Some(1024)));
        for bad in ["0", "-4", "big", "2.5"] {
            let e = parse_block(Some(bad)).unwrap_err();
            assert!(e.contains("DAPT_ATTENTION_BLOCK") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn auto_and_blockwise_run_blockwise_and_kernels_the_kernels() {
        use super::AttentionChoice::*;
        assert!(Auto.blockwise() && Blockwise.blockwise() && !Kernels.blockwise());
    }
}
