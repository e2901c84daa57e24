//! RMSNorm, rotary position embedding (RoPE) and SwiGLU as fused ops (issue 12).
//!
//! Each op is a method of [`NormOps`] on primitives with a default body in Burn's own tensor
//! ops: that body is the reference, and the CPU backend's implementation. The autodiff backend
//! records one graph node per op with its own backward (`norm/autodiff.rs`); the CubeCL backends
//! override the methods with kernels (`fused::kernels::norm`). The model calls the wrappers on
//! `Tensor`s: [`rms_norm`], [`rope`] (with [`RopeTables`]) and [`swiglu`].
//!
//! The formulas are Hugging Face transformers' (`LlamaRMSNorm`, `apply_rotary_pos_emb` with
//! `rotate_half`, `LlamaMLP`'s `act_fn(gate_proj(x)) * up_proj(x)` with `silu`).

mod autodiff;
mod flex;
pub mod reference;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData};

use reference::{primitive, tensor};

/// The fused RMSNorm, RoPE and SwiGLU ops of a backend.
///
/// Shapes are those of dapt's model, whose activations are 2-D `[rows, features]`
/// (`rows = batch * seq`). Every tensor of one call has the same float dtype (f32, f16 or
/// bf16), except RMSNorm's inverse rms, which is always f32.
pub trait NormOps: Backend {
    /// RMSNorm of the rows of `x` `[n, d]` with gain `w` `[1, d]`:
    /// `y = w * (x * inv_rms)`, `inv_rms = 1 / sqrt(mean(x^2) + eps)` over each row.
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, w, eps).0
    }

    /// [`Self::rms_norm`]'s output `y` `[n, d]` (in `x`'s dtype) and the inverse rms of each
    /// row `[n]` (f32), which the backward pass reuses ([`reference::rms_norm_forward`]).
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::rms_norm_forward::<Self>(x, w, eps)
    }

    /// The gradients `(dx [n, d], dw [1, d])` of [`Self::rms_norm`] given `dy` `[n, d]`, the
    /// forward's inputs and its inverse rms `[n]` (f32) ([`reference::rms_norm_backward`]).
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::rms_norm_backward::<Self>(x, w, inv_rms, dy)
    }

    /// Rotary position embedding of `x` `[batch * seq, heads * head_dim]` with `cos` and
    /// `sin` `[seq, head_dim]` in `x`'s dtype ([`reference::rope`]). Its backward pass is
    /// this op with `-sin`.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        reference::rope::<Self>(x, cos, sin, heads)
    }

    /// SwiGLU's gated product `silu(gate) * up` of `gate` and `up` `[n, k]`
    /// ([`reference::swiglu`]).
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::swiglu::<Self>(gate, up)
    }

    /// The gradients `(d gate, d up)` of [`Self::swiglu`] given `dy` `[n, k]`
    /// ([`reference::swiglu_backward`]).
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::swiglu_backward::<Self>(gate, up, dy)
    }
}

/// RMSNorm over the rows of `x` `[n, d]` with gain `w` `[1, d]` (same dtype), `eps` added to
/// the mean square ([`NormOps::rms_norm`]).
pub fn rms_norm<B: NormOps>(x: Tensor<B, 2>, w: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    tensor(B::rms_norm(primitive(x), primitive(w), eps))
}

/// RoPE of `x` `[batch * seq, heads * head_dim]` with `tables` for `seq` positions
/// ([`NormOps::rope`]).
pub fn rope<B: NormOps>(x: Tensor<B, 2>, heads: usize, tables: &RopeTables<B>) -> Tensor<B, 2> {
    tensor(B::rope(
        primitive(x),
        primitive(tables.cos.clone()),
        primitive(tables.sin.clone()),
        heads,
    ))
}

/// `silu(gate) * up` for `gate` and `up` `[n, k]` ([`NormOps::swiglu`]).
pub fn swiglu<B: NormOps>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    tensor(B::swiglu(primitive(gate), primitive(up)))
}

/// The `cos` and `sin` of the rotary angles, `[seq, head_dim]` each: row `p` holds
/// `cos(p * f)` and `sin(p * f)` for the inverse frequencies `f` over both halves of a head,
/// as transformers builds them (the angle in f32, then cast to the activations' dtype). Small:
/// every sequence of a batch and every head reads the same rows.
#[derive(Clone, Debug)]
pub struct RopeTables<B: Backend> {
    /// `[seq, head_dim]`.
    pub cos: Tensor<B, 2>,
    /// `[seq, head_dim]`.
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// The tables for positions `0..seq` and `inv_freq` (`head_dim / 2` inverse frequencies,
    /// `LlamaConfig::inv_freq`), in `dtype`.
    pub fn new(inv_freq: &[f64], seq: usize, dtype: DType, device: &B::Device) -> Self {
        let hd = 2 * inv_freq.len();
        let mut cos = Vec::with_capacity(seq * hd);
        let mut sin = Vec::with_capacity(seq * hd);
        for pos in 0..seq {
            for _ in 0..2 {
                for f in inv_freq {
                    // f32, as the reference rounds the angle.
                    let angle = pos as f32 * *f as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |values: Vec<f32>| {
            Tensor::<B, 2>::from_data(TensorData::new(values, [seq, hd]), device).cast(dtype)
        };
        RopeTables {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// The tables of another backend, sharing its tensors (e.g. the inner backend's as
    /// constants of an autodiff backend).
    pub fn map<C: Backend>(&self, f: impl Fn(Tensor<B, 2>) -> Tensor<C, 2>) -> RopeTables<C> {
        RopeTables {
            cos: f(self.cos.clone()),
            sin: f(self.sin.clone()),
        }
    }
}
