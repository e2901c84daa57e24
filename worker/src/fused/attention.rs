//! Causal grouped-query attention as one op with its own backward (flash attention).
//!
//! Layout: the model's row layout, `q` `[batch * seq, heads * head_dim]` and `k`, `v`
//! `[batch * seq, kv_heads * head_dim]`, with the output `[batch * seq, heads * head_dim]` (what
//! the output projection takes). These are the projections' own contiguous results, so the GPU
//! path needs no `swap_dims` copy to bring the heads to the front and no `repeat_kv` copy of the
//! key/value heads: a kernel reads head `h`'s `head_dim` values of row `r` where they lie.
//!
//! The formula: for query `i` of head `h` (kv head `h / (heads / kv_heads)`),
//! `out_i = softmax_j(q_i · k_j / sqrt(head_dim)) v_j` over the keys `j` it sees: `j <= i`, and
//! with a sliding window `w` also `i - w < j` (Mistral; transformers' `sliding_window_overlay`).
//! The forward also writes each row's log-sum-exp of the scaled scores (`[batch, heads, seq]`,
//! f32); the backward recomputes the probabilities from it, FlashAttention-2 style (Dao 2023,
//! "FlashAttention-2", Algorithm 2): `D = rowsum(dO * O)`, `P = exp(S - lse)`, `dV = P^T dO`,
//! `dP = dO V^T`, `dS = P * (dP - D)`, `dQ = dS K * scale`, `dK = dS^T Q * scale`, with `dK` and
//! `dV` summed over the query heads that share a kv head.
//!
//! The default bodies (the CPU backend's implementation) use Burn's tensor ops on one
//! `[batch, kv_heads, group * seq, seq]` score tensor (a kv head's query heads stacked as rows,
//! so neither the keys nor the values are repeated); the CubeCL kernels
//! (`super::kernels::attention`) never materialise scores. Under `Autodiff` the op is one graph
//! node that keeps `q`, `k`, `v`, the output and the log-sum-exp, never the probabilities.
//!
//! The model calls [`causal_attention`]: this op where the backend's
//! [`AttentionOps::FUSED_ATTENTION`] is set (the CubeCL backends), else the decomposed formula
//! [`reference_attention`] (the CPU backend, where the op's forward + backward measured about
//! 1.4x the decomposed formula's time under `Autodiff`, its backward recomputing the scores).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, FloatDType, Tensor, TensorPrimitive};

/// The shape of one attention call: how the rows and columns of `q`, `k` and `v` divide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences in the micro-batch.
    pub batch: usize,
    /// Tokens per sequence (the rows are `batch * seq`, sequence-major).
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads` (query head `h` uses kv head `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Sliding window: query `i` sees key `j` iff `i - window < j <= i`; `None` is plain causal.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// The shape of `batch` sequences of `seq` tokens, `heads` query heads over `kv_heads`
    /// key/value heads of `head_dim` values, with an optional sliding `window`.
    pub fn new(
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> Self {
        AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            window,
        }
    }

    /// `1 / sqrt(head_dim)`, the scores' scale.
    pub fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The window as far as it limits anything: `seq` when there is none or it is wider.
    pub fn effective_window(&self) -> usize {
        self.window.map_or(self.seq, |w| w.min(self.seq))
    }
}

/// Attention's fused ops. The default bodies are the CPU implementation in Burn's tensor ops;
/// CubeCL backends override them with kernels; `Autodiff` overrides [`Self::flash_attention`]
/// with one graph node.
pub trait AttentionOps: Backend {
    /// Whether the model's attention ([`causal_attention`]) is the fused op on this backend
    /// and on `Autodiff` over it; where it is `false` the model runs the decomposed formula
    /// ([`reference_attention`]) in Burn's ops instead. `false` on the CPU backend, where the
    /// fused op measured slower (its backward recomputes the scores; docs/model.md).
    const FUSED_ATTENTION: bool = true;

    /// The attention output `[batch * seq, heads * head_dim]` (dtype of `q`) and the scores'
    /// log-sum-exp per query row `[batch, heads, seq]` (f32), for `q`
    /// `[batch * seq, heads * head_dim]` and `k`, `v` `[batch * seq, kv_heads * head_dim]`.
    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let s = shape;
        let scores = grouped_scores::<Self>(group_rows(tensor(q), &s), kv_rows(tensor(k), &s), &s);
        let max = scores.clone().max_dim(3);
        let exp = (scores - max.clone()).exp();
        let sum = exp.clone().sum_dim(3);
        let lse = (max + sum.clone().log()).reshape([s.batch, s.heads, s.seq]);
        let out = (exp / sum).matmul(kv_rows(tensor(v), &s));
        (
            primitive(ungroup_rows(out, &s)),
            primitive(lse.cast(FloatDType::F32)),
        )
    }

    /// The gradients `(dq, dk, dv)` of the attention for the output's gradient `dout`, from
    /// the forward's inputs, output `out` and log-sum-exp `lse` (shapes as in
    /// [`Self::flash_attention_forward`]). `dk` and `dv` are summed over the query heads of
    /// each kv head.
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let s = shape;
        let scale = s.scale();
        let q = group_rows(tensor::<Self, 2>(q), &s);
        let dtype = q.dtype();
        let (k, v) = (kv_rows(tensor(k), &s), kv_rows(tensor(v), &s));
        let dout = group_rows(tensor(dout), &s);
        let out = group_rows(tensor(out), &s);
        let lse =
            tensor::<Self, 3>(lse)
                .cast(dtype)
                .reshape([s.batch, s.kv_heads, s.group() * s.seq, 1]);
        let probs = (grouped_scores(q.clone(), k.clone(), &s) - lse).exp();
        let dv = probs.clone().swap_dims(2, 3).matmul(dout.clone());
        let dprobs = dout.clone().matmul(v.swap_dims(2, 3));
        let delta = (dout * out).sum_dim(3);
        let dscores = probs * (dprobs - delta);
        let dq = dscores.clone().matmul(k).mul_scalar(scale);
        let dk = dscores.swap_dims(2, 3).matmul(q).mul_scalar(scale);
        (
            primitive(ungroup_rows(dq, &s)),
            primitive(unkv_rows(dk, &s)),
            primitive(unkv_rows(dv, &s)),
        )
    }

    /// The attention output alone (see [`Self::flash_attention_forward`]); under `Autodiff`
    /// one graph node whose backward is [`Self::flash_attention_backward`].
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> FloatTensor<Self> {
        Self::flash_attention_forward(q, k, v, shape).0
    }
}

/// The model's causal grouped-query attention: [`flash_attention`] where the backend's
/// [`AttentionOps::FUSED_ATTENTION`] says so, else [`reference_attention`] (same shapes and
/// values).
pub fn causal_attention<B: AttentionOps>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    shape: AttentionShape,
) -> Tensor<B, 2> {
    if B::FUSED_ATTENTION {
        flash_attention(q, k, v, shape)
    } else {
        reference_attention(q, k, v, shape)
    }
}

/// Causal grouped-query attention of `q` `[batch * seq, heads * head_dim]` over `k`, `v`
/// `[batch * seq, kv_heads * head_dim]`: `[batch * seq, heads * head_dim]` (see the module
/// docs for the formula), always the fused op. Panics if the tensors' shapes do not match
/// `shape`.
pub fn flash_attention<B: AttentionOps>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    shape: AttentionShape,
) -> Tensor<B, 2> {
    let rows = shape.batch * shape.seq;
    assert_eq!(q.dims(), [rows, shape.heads * shape.head_dim], "q's shape");
    assert_eq!(
        k.dims(),
        [rows, shape.kv_heads * shape.head_dim],
        "k's shape"
    );
    assert_eq!(v.dims(), k.dims(), "v's shape");
    assert_eq!(shape.heads % shape.kv_heads, 0, "kv heads divide the heads");
    Tensor::from_primitive(TensorPrimitive::Float(B::flash_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        shape,
    )))
}

/// The decomposed formula the fused op replaces (the model's attention before issue 12):
/// heads to the front, key/value heads repeated, scores masked and softmaxed, all in Burn's
/// tensor ops and differentiated by them: the tests' reference, and the model's attention on
/// backends where the fused op is slower (the CPU). Same shapes as
/// [`flash_attention`].
pub fn reference_attention<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    shape: AttentionShape,
) -> Tensor<B, 2> {
    let AttentionShape {
        batch: b,
        seq: t,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
        ..
    } = shape;
    let heads = |y: Tensor<B, 2>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
    let repeat_kv = |x: Tensor<B, 4>| {
        let n = nh / nkv;
        if n == 1 {
            return x;
        }
        x.unsqueeze_dim::<5>(2)
            .repeat_dim(2, n)
            .reshape([b, nkv * n, t, hd])
    };
    let (q, k, v) = (heads(q, nh), heads(k, nkv), heads(v, nkv));
    let (k, v) = (repeat_kv(k), repeat_kv(v));
    let mask = attention_mask::<B>(t, shape.window, &q.device())
        .unsqueeze::<4>()
        .expand([b, nh, t, t]);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(shape.scale())
        .mask_fill(mask, f32::NEG_INFINITY)
        .reshape([b * nh * t, t]);
    let probs = softmax(scores, 1).reshape([b, nh, t, t]);
    probs.matmul(v).swap_dims(1, 2).reshape([b * t, nh * hd])
}

/// The `[t, t]` attention mask, true where a query (row) must not see a key (column): the
/// future, and with a sliding `window` of `w` the keys `w` or more positions back (Mistral, as
/// transformers' `sliding_window_overlay`: key `j` is seen from query `i` iff `i - w < j <= i`).
/// Built on the device from two triangles.
pub fn attention_mask<B: Backend>(
    t: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let future = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, device);
    match window {
        // `triu_mask(offset)` is true where `j - i < offset`: here `j <= i - w`.
        Some(w) if w < t => future.bool_or(Tensor::triu_mask([t, t], 1 - w as i64, device)),
        _ => future,
    }
}

/// The CPU backend: the default bodies, and the decomposed formula for the model (measured
/// faster there: `cpu_speed_of_fused_and_decomposed_attention` in tests/fused_attention.rs).
impl AttentionOps for burn::backend::Flex {
    const FUSED_ATTENTION: bool = false;
}

impl<B: AttentionOps, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
    const FUSED_ATTENTION: bool = B::FUSED_ATTENTION;

    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tracked_forward::<B, C>(q, k, v, shape)
    }

    /// The gradients on the inner backend, as untracked tensors (the op is differentiable
    /// once: there is no double backward).
    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::flash_attention_backward(
            q.primitive,
            k.primitive,
            v.primitive,
            out.primitive,
            lse.primitive,
            dout.primitive,
            shape,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        shape: AttentionShape,
    ) -> FloatTensor<Self> {
        tracked_forward::<B, C>(q, k, v, shape).0
    }
}

/// A float tensor of `Autodiff<B, C>`.
type AdTensor<B, C> = FloatTensor<Autodiff<B, C>>;

/// The forward on the inner backend as one graph node with [`FlashAttentionBackward`]; the
/// log-sum-exp comes back untracked.
fn tracked_forward<B: AttentionOps, C: CheckpointStrategy>(
    q: AdTensor<B, C>,
    k: AdTensor<B, C>,
    v: AdTensor<B, C>,
    shape: AttentionShape,
) -> (AdTensor<B, C>, AdTensor<B, C>) {
    let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    match (FlashAttentionBackward { shape })
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = B::flash_attention_forward(
                q.primitive.clone(),
                k.primitive.clone(),
                v.primitive.clone(),
                shape,
            );
            let state = FlashAttentionState {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
                lse: lse.clone(),
            };
            (prep.finish(state, out), untracked(lse))
        }
        OpsKind::UnTracked(prep) => {
            let (out, lse) =
                B::flash_attention_forward(q.primitive, k.primitive, v.primitive, shape);
            (prep.finish(out), untracked(lse))
        }
    }
}

/// The attention node's backward: the inner backend's [`AttentionOps::flash_attention_backward`].
#[derive(Debug)]
struct FlashAttentionBackward {
    shape: AttentionShape,
}

/// What the backward keeps from the forward: its inputs, output and log-sum-exp (no
/// `[seq, seq]` probabilities).
#[derive(Debug, Clone)]
struct FlashAttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
}

impl<B: AttentionOps> Backward<B, 3> for FlashAttentionBackward {
    type State = FlashAttentionState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dout = grads.consume::<B>(&ops.node);
        let FlashAttentionState { q, k, v, out, lse } = ops.state;
        let (dq, dk, dv) = B::flash_attention_backward(q, k, v, out, lse, dout, self.shape);
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `q`-like rows `[b * t, heads * hd]` as `[b, kv_heads, group * t, hd]`: each kv head's
/// query heads stacked (row `g * t + i` is query `i` of the kv head's `g`-th query head).
fn group_rows<B: Backend>(x: Tensor<B, 2>, s: &AttentionShape) -> Tensor<B, 4> {
    x.reshape([s.batch, s.seq, s.kv_heads, s.group(), s.head_dim])
        .permute([0, 2, 3, 1, 4])
        .reshape([s.batch, s.kv_heads, s.group() * s.seq, s.head_dim])
}

/// The inverse of [`group_rows`].
fn ungroup_rows<B: Backend>(x: Tensor<B, 4>, s: &AttentionShape) -> Tensor<B, 2> {
    x.reshape([s.batch, s.kv_heads, s.group(), s.seq, s.head_dim])
        .permute([0, 3, 1, 2, 4])
        .reshape([s.batch * s.seq, s.heads * s.head_dim])
}

/// `k`-like rows `[b * t, kv_heads * hd]` as `[b, kv_heads, t, hd]`.
fn kv_rows<B: Backend>(x: Tensor<B, 2>, s: &AttentionShape) -> Tensor<B, 4> {
    x.reshape([s.batch, s.seq, s.kv_heads, s.head_dim])
        .swap_dims(1, 2)
}

/// The inverse of [`kv_rows`].
fn unkv_rows<B: Backend>(x: Tensor<B, 4>, s: &AttentionShape) -> Tensor<B, 2> {
    x.swap_dims(1, 2)
        .reshape([s.batch * s.seq, s.kv_heads * s.head_dim])
}

/// The scaled, masked scores `[b, kv_heads, group * t, t]` of grouped queries over keys.
fn grouped_scores<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    s: &AttentionShape,
) -> Tensor<B, 4> {
    let (t, rows) = (s.seq, s.group() * s.seq);
    let mask = attention_mask::<B>(t, s.window, &q.device())
        .unsqueeze::<3>()
        .expand([s.group(), t, t])
        .reshape([rows, t])
        .unsqueeze::<4>()
        .expand([s.batch, s.kv_heads, rows, t]);
    q.matmul(k.swap_dims(2, 3))
        .mul_scalar(s.scale())
        .mask_fill(mask, f32::NEG_INFINITY)
}
