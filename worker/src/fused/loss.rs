//! Cross-entropy fused with the output head's matmul and the log-softmax, chunked over the
//! vocabulary (issue 12), so that the `[tokens, vocab]` logits and their gradient never exist
//! whole: at most one chunk of `[tokens, chunk]` logits lives at a time, forward or backward.
//!
//! For final-normed hidden states `x` `[n, d]`, the head weight `W` `[vocab, d]` (Hugging Face
//! layout) and targets `t` `[n]`, the op computes the summed negative log-likelihood
//!
//! ```text
//! loss = sum_i (lse_i - z_i,t_i),    z = x W^T,    lse_i = log sum_v exp(z_i,v)
//! ```
//!
//! The forward pass goes over the vocabulary in chunks `W_c` `[c, d]`: `z_c = x W_c^T`, then an
//! online log-sum-exp per row (`lse = logaddexp(lse, lse(z_c))`) and the target's logit where
//! the target falls in the chunk. It keeps only `lse` `[n]` (f32) for the backward pass, which
//! recomputes each chunk's logits and, with `G_c = (softmax(z)_c - onehot(t)_c) * dloss`,
//! accumulates `dx += G_c W_c` and writes `dW_c = G_c^T x` (the gradient of a softmax
//! cross-entropy; e.g. the Liger kernel's fused linear cross-entropy does the same over token
//! chunks). The matmuls are the backend's own; the element-wise and row-reduction work of a
//! chunk is [`LossOps::cross_entropy_chunk_stats`] and [`LossOps::cross_entropy_chunk_grad`],
//! which the CubeCL backends run as kernels (`super::kernels::loss`).
//!
//! Whatever the compute dtype (f32, or bf16 under mixed precision), the log-sum-exp, the
//! target logits and the loss are f32, and so is `dx`'s accumulation over chunks.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use super::matmul::{matmul, MatmulOps};

pub use dapt_proto::model::{LOSS_CHUNK_ALIGN as CHUNK_ALIGN, LOSS_CHUNK_BYTES as CHUNK_BYTES};

/// The chunk (vocabulary columns per step) for `tokens` rows over a `vocab`-entry vocabulary:
/// as many columns as fit [`CHUNK_BYTES`] (128 MiB) of f32 logits, a multiple of
/// [`CHUNK_ALIGN`] (at least one multiple), and the whole vocabulary when it fits (one chunk:
/// no extra work). The Llama-3.2-1B vocabulary of 128,256 at 4,096 tokens goes in 16 chunks of
/// 8,192. The planner counts the same (`dapt_proto::model::loss_chunk`).
pub fn default_chunk(tokens: usize, vocab: usize) -> usize {
    dapt_proto::model::loss_chunk(tokens, vocab)
}

/// A chunk's running row statistics (see [`LossOps::cross_entropy_chunk_stats`]).
pub struct RowStats<B: Backend> {
    /// The log-sum-exp of each row's logits over the chunks seen so far, `[n]`, f32.
    pub lse: FloatTensor<B>,
    /// Each row's logit of its target where the target was in a chunk seen so far (0.0
    /// otherwise), `[n]`, f32.
    pub target_logit: FloatTensor<B>,
}

/// The fused loss ops of a backend. The default bodies are the reference implementation in
/// Burn's own tensor ops (the CPU backend runs them); the CubeCL backends override the two
/// per-chunk methods with kernels, and `Autodiff<B>` records
/// [`cross_entropy_forward`](LossOps::cross_entropy_forward) as one graph node whose backward
/// pass is [`cross_entropy_backward`](LossOps::cross_entropy_backward).
pub trait LossOps: MatmulOps {
    /// The summed cross-entropy of `targets` under `x W^T`, over the vocabulary in chunks of
    /// `chunk` rows of `w`.
    ///
    /// `x` `[n, d]` and `w` `[vocab, d]` share one float dtype; `targets` `[n]` holds ids in
    /// `0..vocab`. Returns the loss (one element) and the rows' log-sum-exp `[n]`, both f32.
    ///
    /// # Panics
    /// If `chunk` or the vocabulary is zero.
    fn cross_entropy_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, w) = (float::<Self, 2>(x), float::<Self, 2>(w));
        let mut stats: Option<RowStats<Self>> = None;
        for (offset, w_c) in chunks(&w, chunk) {
            let logits = matmul(x.clone(), w_c.transpose());
            stats = Some(Self::cross_entropy_chunk_stats(
                logits.into_primitive().tensor(),
                targets.clone(),
                offset,
                stats,
            ));
        }
        let stats = stats.expect("a vocabulary of at least one entry");
        let lse = float::<Self, 1>(stats.lse);
        let loss = (lse.clone() - float::<Self, 1>(stats.target_logit)).sum();
        (
            loss.into_primitive().tensor(),
            lse.into_primitive().tensor(),
        )
    }

    /// The gradients `(dx, dw)` of [`cross_entropy_forward`](LossOps::cross_entropy_forward)'s
    /// loss for the upstream gradient `grad` (one element, f32), given the `lse` it returned.
    /// `dx` `[n, d]` and `dw` `[vocab, d]` come in the dtypes of `x` and `w`.
    fn cross_entropy_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, w) = (float::<Self, 2>(x), float::<Self, 2>(w));
        let [vocab, d] = w.dims();
        let dtype = x.dtype();
        let mut dx: Option<Tensor<Self, 2>> = None;
        let mut dw: Option<Tensor<Self, 2>> = None;
        for (offset, w_c) in chunks(&w, chunk) {
            let logits = matmul(x.clone(), w_c.clone().transpose());
            let g = float::<Self, 2>(Self::cross_entropy_chunk_grad(
                logits.into_primitive().tensor(),
                targets.clone(),
                offset,
                lse.clone(),
                grad.clone(),
            ));
            let c = g.dims()[1];
            let dx_c = matmul(g.clone(), w_c).cast(FloatDType::F32);
            dx = Some(match dx {
                Some(acc) => acc + dx_c,
                None => dx_c,
            });
            let dw_c = matmul(g.transpose(), x.clone());
            dw = Some(match dw {
                None if c == vocab => dw_c,
                acc => acc
                    .unwrap_or_else(|| w.zeros_like())
                    .slice_assign([offset..offset + c, 0..d], dw_c),
            });
        }
        let dx = dx.expect("a vocabulary of at least one entry").cast(dtype);
        let dw = dw.expect("a vocabulary of at least one entry");
        (dx.into_primitive().tensor(), dw.into_primitive().tensor())
    }

    /// One chunk's step of the forward pass: `logits` `[n, c]` are the columns
    /// `offset..offset + c` of the full logits; `running` are the statistics over the chunks
    /// before it (`None` for the first). Returns the statistics including this chunk: the
    /// log-sum-exp combined as `logaddexp(running, lse(logits))`, and the target logits of the
    /// rows whose target is in `offset..offset + c` added. Computed in f32.
    fn cross_entropy_chunk_stats(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        offset: usize,
        running: Option<RowStats<Self>>,
    ) -> RowStats<Self> {
        let z = float::<Self, 2>(logits).cast(FloatDType::F32);
        let [n, c] = z.dims();
        let max = z.clone().max_dim(1);
        let lse = ((z.clone() - max.clone()).exp().sum_dim(1).log() + max).reshape([n]);
        let (index, outside) = local_targets::<Self>(targets, offset, c);
        let picked = z.gather(1, index).mask_fill(outside, 0.0).reshape([n]);
        let (lse, picked) = match running {
            None => (lse, picked),
            Some(prev) => {
                let prev_lse = float::<Self, 1>(prev.lse);
                let hi = prev_lse.clone().max_pair(lse.clone());
                let lo = prev_lse.min_pair(lse);
                let lse = (lo - hi.clone()).exp().log1p() + hi;
                (lse, float::<Self, 1>(prev.target_logit) + picked)
            }
        };
        RowStats {
            lse: lse.into_primitive().tensor(),
            target_logit: picked.into_primitive().tensor(),
        }
    }

    /// One chunk's gradient of the loss with respect to its logits:
    /// `(exp(logits - lse) - onehot(targets - offset)) * grad`, `[n, c]` in the dtype of
    /// `logits` (the columns `offset..offset + c`), with `lse` `[n]` the full rows' log-sum-exp
    /// and `grad` the loss's upstream gradient (one element), both f32. Computed in f32.
    fn cross_entropy_chunk_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        offset: usize,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let z = float::<Self, 2>(logits);
        let dtype = z.dtype();
        let [n, c] = z.dims();
        let p = (z.cast(FloatDType::F32) - float::<Self, 1>(lse).reshape([n, 1])).exp();
        let (index, outside) = local_targets::<Self>(targets, offset, c);
        let minus_one =
            Tensor::<Self, 2>::full([n, 1], -1.0, (&p.device(), p.dtype())).mask_fill(outside, 0.0);
        let g = p.scatter(1, index, minus_one, IndexingUpdateOp::Add)
            * float::<Self, 1>(grad).reshape([1, 1]);
        g.cast(dtype).into_primitive().tensor()
    }
}

/// The CPU backend runs the reference bodies: on Flex, with a small vocabulary in one chunk,
/// the training step measured within noise of the decomposed ops they replace (docs/model.md).
impl LossOps for burn::backend::Flex {}

impl<B: LossOps, C: CheckpointStrategy> LossOps for Autodiff<B, C> {
    fn cross_entropy_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match CrossEntropyBackward
            .prepare::<C>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (loss, lse) = B::cross_entropy_forward(
                    x.primitive.clone(),
                    w.primitive.clone(),
                    targets.clone(),
                    chunk,
                );
                let state = (x.primitive, w.primitive, targets, lse.clone(), chunk);
                (prep.finish(state, loss), Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (loss, lse) =
                    B::cross_entropy_forward(x.primitive, w.primitive, targets, chunk);
                (prep.finish(loss), Self::from_inner(lse))
            }
        }
    }
}

/// The backward step of the fused cross-entropy's graph node (parents: `x`, `w`).
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: LossOps> Backward<B, 2> for CrossEntropyBackward {
    /// `x`, `w`, the targets, the rows' log-sum-exp and the chunk: no logits.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        IntTensor<B>,
        FloatTensor<B>,
        usize,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, w, targets, lse, chunk) = ops.state;
        let (dx, dw) = B::cross_entropy_backward(x, w, targets, lse, grad, chunk);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw);
        }
    }
}

/// The summed next-token negative log-likelihood `sum_i -log softmax(x W^T)_i,targets_i` as a
/// one-element f32 tensor, without the `[n, vocab]` logits: see the module docs.
///
/// - `x`: the final-normed hidden states `[n, d]`, f32 or bf16;
/// - `w`: the output head `[vocab, d]` in the same dtype (a tied model passes its embedding:
///   on an autodiff backend the two gradients add up on that one tensor);
/// - `targets`: `[n]` or `[n, 1]` token ids in `0..vocab` (not checked: the caller's data is);
/// - `chunk`: vocabulary columns per step, `None` for [`default_chunk`].
///
/// # Panics
/// If `chunk` is `Some(0)` or the vocabulary is empty.
pub fn cross_entropy_sum<B: LossOps, const D: usize>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, D, Int>,
    chunk: Option<usize>,
) -> Tensor<B, 1> {
    let [n, _] = x.dims();
    let chunk = chunk.unwrap_or_else(|| default_chunk(n, w.dims()[0]));
    let targets = targets.reshape([n]);
    let (loss, _lse) = B::cross_entropy_forward(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        targets.into_primitive(),
        chunk,
    );
    float(loss)
}

/// The decomposed reference [`cross_entropy_sum`] replaces (what `Llama::nll_sum` computed
/// before issue 12): the whole `[n, vocab]` logits, an f32 log-softmax, the targets gathered.
#[doc(hidden)]
pub fn reference_cross_entropy_sum<B: Backend, const D: usize>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, D, Int>,
) -> Tensor<B, 1> {
    let [n, _] = x.dims();
    let logits = x.matmul(w.transpose()).cast(FloatDType::F32);
    burn::tensor::activation::log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .sum()
        .neg()
}

/// `w`'s rows in chunks of `chunk`: `(offset, w[offset..offset + c])`, the last one shorter
/// when `chunk` does not divide the vocabulary; `w` itself when one chunk covers it.
fn chunks<B: Backend>(
    w: &Tensor<B, 2>,
    chunk: usize,
) -> impl Iterator<Item = (usize, Tensor<B, 2>)> + '_ {
    let vocab = w.dims()[0];
    assert!(
        chunk > 0 && vocab > 0,
        "a chunk and a vocabulary of at least one"
    );
    (0..vocab).step_by(chunk).map(move |offset| {
        let c = chunk.min(vocab - offset);
        let w_c = if c == vocab {
            w.clone()
        } else {
            w.clone().narrow(0, offset, c)
        };
        (offset, w_c)
    })
}

/// The targets as column indices `[n, 1]` into a chunk of `c` columns at `offset` (clamped into
/// it), and the mask `[n, 1]` of the rows whose target is outside the chunk.
fn local_targets<B: Backend>(
    targets: IntTensor<B>,
    offset: usize,
    c: usize,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, burn::tensor::Bool>) {
    let targets = Tensor::<B, 1, Int>::from_primitive(targets);
    let n = targets.dims()[0];
    let local = targets.sub_scalar(offset as i64).reshape([n, 1]);
    let outside = local
        .clone()
        .lower_elem(0)
        .bool_or(local.clone().greater_equal_elem(c as i64));
    (local.clamp(0, c as i64 - 1), outside)
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}
