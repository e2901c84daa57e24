//! The ops of [`NormOps`](super::NormOps) in Burn's own tensor ops: the trait's default bodies
//! (the CPU backend's implementation) and the reference the kernels are tested against.
//!
//! Generic over any backend and float dtype; the statistics of RMSNorm are taken in f32.

use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Tensor, TensorMetadata, TensorPrimitive};

/// RMSNorm's `y = w * (x * inv_rms)` `[n, d]` (in `x`'s dtype) and `inv_rms` `[n]` (f32),
/// `inv_rms = 1 / sqrt(mean(x^2) + eps)` over each row of `x` `[n, d]`; `w` is `[1, d]`.
///
/// As transformers' `LlamaRMSNorm`: the statistics are taken in f32, `x * inv_rms` is
/// rounded to `x`'s dtype, then multiplied by the gain. In f32 this is exactly the
/// decomposed `x * inv_rms * w`.
pub fn rms_norm_forward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = tensor::<B, 2>(x);
    let dtype = x.dtype();
    let xf = x.cast(FloatDType::F32);
    let inv_rms = xf
        .clone()
        .powi_scalar(2)
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    let y = (xf * inv_rms.clone()).cast(dtype) * tensor::<B, 2>(w);
    let n = inv_rms.dims()[0];
    (primitive(y), primitive(inv_rms.reshape([n])))
}

/// RMSNorm's gradients `(dx [n, d], dw [1, d])` given `dy` `[n, d]`, the forward's inputs and
/// its `inv_rms` `[n]` (f32). With `g = dy * w`:
/// `dx = inv_rms * (g - x * inv_rms^2 * mean(g * x))` over each row and
/// `dw = sum over rows of dy * x * inv_rms`, computed in f32 and returned in the dtypes of `x`
/// and `w`.
pub fn rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    inv_rms: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
    let f32 = |t: FloatTensor<B>| tensor::<B, 2>(t).cast(FloatDType::F32);
    let (x, w, dy) = (f32(x), f32(w), f32(dy));
    let n = x.dims()[0];
    let inv_rms = tensor::<B, 1>(inv_rms).reshape([n, 1]);
    let dw = (dy.clone() * x.clone() * inv_rms.clone())
        .sum_dim(0)
        .cast(w_dtype);
    let g = dy * w;
    let dot = (g.clone() * x.clone()).mean_dim(1);
    let dx = (g - x * (inv_rms.clone().powi_scalar(2) * dot)) * inv_rms;
    (primitive(dx.cast(x_dtype)), primitive(dw))
}

/// Rotary position embedding of `x` `[batch * seq, heads * head_dim]` (rows ordered by
/// sequence, then position; each row's heads side by side) with `cos` and `sin`
/// `[seq, head_dim]` in `x`'s dtype (`RopeTables`): row `r` is at position `r % seq`.
///
/// `y = x * cos + rotate_half(x) * sin` per head, `rotate_half(x) = cat(-x2, x1)` over the two
/// halves of the head (transformers' layout, not adjacent pairs).
pub fn rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    heads: usize,
) -> FloatTensor<B> {
    let x = tensor::<B, 2>(x);
    let [rows, width] = x.dims();
    let [seq, hd] = cos.shape().dims();
    assert_eq!(width, heads * hd, "x is [batch * seq, heads * head_dim]");
    assert_eq!(rows % seq, 0, "x has whole sequences of the tables' length");
    let table = |t: FloatTensor<B>| tensor::<B, 2>(t).reshape([1, seq, 1, hd]);
    let per_head = x.reshape([rows / seq, seq, heads, hd]);
    let half = hd / 2;
    let x1 = per_head.clone().narrow(3, 0, half);
    let x2 = per_head.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let y = per_head * table(cos) + rotated * table(sin);
    primitive(y.reshape([rows, width]))
}

/// SwiGLU's `silu(gate) * up` for `gate` and `up` `[n, k]`, `silu(g) = g * sigmoid(g)`.
pub fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let gate = tensor::<B, 2>(gate);
    let silu = gate.clone() * sigmoid(gate);
    primitive(silu * tensor::<B, 2>(up))
}

/// SwiGLU's gradients `(d gate, d up)` given `dy` `[n, k]`: `d up = dy * silu(gate)` and
/// `d gate = dy * up * s * (1 + gate * (1 - s))` with `s = sigmoid(gate)`.
pub fn swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (gate, up, dy) = (tensor::<B, 2>(gate), tensor::<B, 2>(up), tensor::<B, 2>(dy));
    let s = sigmoid(gate.clone());
    let d_up = dy.clone() * gate.clone() * s.clone();
    let slope = s.clone() * (s.neg().add_scalar(1.0) * gate).add_scalar(1.0);
    let d_gate = dy * up * slope;
    (primitive(d_gate), primitive(d_up))
}

/// A primitive as a `D`-dimensional tensor.
pub(super) fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A tensor's primitive.
pub(super) fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}
