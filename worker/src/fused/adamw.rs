//! The AdamW update of the flat f32 buffers as one op (issues 12 and 13): per element, the
//! clip factor, both moments, the bias-corrected step and the weight decay, in place.
//!
//! In Burn's element-wise ops the update is about fifteen full passes over the buffers
//! (`g * (1 - b1)`, `m * b1`, their sum, `g * g`, ... `w - update`), each reading and writing
//! 4 bytes per element and several leaving a full-size temporary (the scaled gradient, its
//! square, the denominator, the update), plus a slice, a product, a difference and a
//! `slice_assign` per range of decayed parameters. The CubeCL kernel reads the gradient, both
//! moments and the weight and writes the moments and the weight: 28 bytes per element, no
//! temporary (at the 1.24 B-parameter 1B shape 35 GB, ~11 ms at 3.3 TB/s, against ~200 GB
//! through Burn's ops; predicted, not measured on a GPU).
//!
//! The formula is `train::optimizer::AdamW::step`'s (Loshchilov and Hutter 2019, "Decoupled
//! Weight Decay Regularization", Algorithm 2, with PyTorch's placement of the bias corrections),
//! in f32, with the operation order and f32 constants of the resident trainer's former
//! element-wise update (`1 - b1` rounded from f64; `(g g) (1 - b2)`): on the CPU (this default
//! body) its steps are unchanged bit for bit, and within an ulp or two of the host optimizer's.
//! On CUDA, NVRTC contracts the kernel's `m b1 + g (1 - b1)` and the like into fused
//! multiply-adds (cubecl-cuda compiles without `--fmad=false`), so a GPU step may differ from
//! the former element-wise one by an ulp; every rank runs the same kernel per element, so ZeRO's
//! shards still agree with stage 0 exactly as before.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use dapt_proto::job::OptimizerSpec;
use dapt_proto::model::ADAMW_CHUNK_ELEMENTS;

/// The scalars of one AdamW update, in f32 as the kernel and the host optimizer use them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    /// The gradient's multiplier: the clip factor `max_norm / (norm + 1e-6)`, or 1.
    pub grad_scale: f32,
    pub b1: f32,
    /// `1 - b1`, rounded from f64 (not `1.0f32 - b1`: one ulp apart).
    pub one_minus_b1: f32,
    pub b2: f32,
    /// `1 - b2`, rounded from f64.
    pub one_minus_b2: f32,
    /// `lr / (1 - b1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - b2^t)`.
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
    /// `lr * weight_decay` for decayed parameters, 0 for the others.
    pub decay: f32,
}

impl AdamwStep {
    /// The scalars of optimizer step `t` (1 for the first) at learning rate `lr` under `spec`,
    /// with the gradient's multiplier `grad_scale` and no weight decay (set `decay` per run of
    /// decayed parameters: `lr * weight_decay`). Made in f64, then rounded to f32, as Burn's
    /// `mul_scalar` rounded them when the resident trainer's update was element-wise tensor ops
    /// (its CPU steps unchanged, bit for bit); the bias corrections are PyTorch's.
    pub fn new(spec: &OptimizerSpec, lr: f64, t: i32, grad_scale: f32) -> AdamwStep {
        let (b1, b2) = spec.betas;
        AdamwStep {
            grad_scale,
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            inv_bc2_sqrt: (1.0 / (1.0 - b2.powi(t)).sqrt()) as f32,
            eps: spec.eps as f32,
            decay: 0.0,
        }
    }
}

/// The AdamW op of a backend; the default body is Burn's ops (the CPU backend's).
pub trait AdamwOps: Backend {
    /// One AdamW update of the elements `range` of the flat f32 moments `m`, `v` and gradient
    /// `grads` (all the same length: the owned slice of the flat buffer) and of the weights
    /// `weights[offset + i]` for `i` in `range` (`weights` f32: the whole flat buffer with
    /// `offset` the owned slice's start, or the slice itself with 0):
    ///
    /// ```text
    /// g = grads[i] * grad_scale
    /// m[i] = m[i] b1 + g one_minus_b1
    /// v[i] = v[i] b2 + (g g) one_minus_b2
    /// w -= w decay
    /// w -= (m[i] step_size) / (sqrt(v[i]) inv_bc2_sqrt + eps)
    /// ```
    ///
    /// Returns `(weights, m, v)`, each updated in place where uniquely owned (else a copy is
    /// written; another owner's values never change). Panics if a range is outside a buffer.
    fn adamw(
        weights: FloatTensor<Self>,
        offset: usize,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grads: FloatTensor<Self>,
        range: Range<usize>,
        step: AdamwStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let t = |x| Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(x));
        let (mut weights, mut m, mut v, grads) = (t(weights), t(m), t(v), t(grads));
        // In chunks, so that the temporaries (five f32 tensors at the peak) stay small.
        for start in range.clone().step_by(ADAMW_CHUNK_ELEMENTS) {
            let part = start..(start + ADAMW_CHUNK_ELEMENTS).min(range.end);
            let w_part = offset + part.start..offset + part.end;
            let g = grads
                .clone()
                .slice(part.clone())
                .mul_scalar(step.grad_scale);
            let m_new = m.clone().slice(part.clone()).mul_scalar(step.b1)
                + g.clone().mul_scalar(step.one_minus_b1);
            let v_new = v.clone().slice(part.clone()).mul_scalar(step.b2)
                + (g.clone() * g).mul_scalar(step.one_minus_b2);
            let denom = v_new
                .clone()
                .sqrt()
                .mul_scalar(step.inv_bc2_sqrt)
                .add_scalar(step.eps);
            let w = weights.clone().slice(w_part.clone());
            let w = w.clone() - w.mul_scalar(step.decay);
            let w = w - m_new.clone().mul_scalar(step.step_size) / denom;
            weights = weights.slice_assign(w_part, w);
            m = m.slice_assign(part.clone(), m_new);
            v = v.slice_assign(part, v_new);
        }
        let p = |x: Tensor<Self, 1>| x.into_primitive().tensor();
        (p(weights), p(m), p(v))
    }
}

impl AdamwOps for burn::backend::Flex {}

/// The trainers update inner-backend tensors; `Autodiff` has the op for the bound's sake.
impl<B: AdamwOps, C: CheckpointStrategy> AdamwOps for Autodiff<B, C> {}

/// [`AdamwOps::adamw`] on `Tensor`s. Panics if a range is outside its buffer.
pub fn adamw<B: AdamwOps>(
    weights: Tensor<B, 1>,
    offset: usize,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    grads: &Tensor<B, 1>,
    range: Range<usize>,
    step: AdamwStep,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let len = m.dims()[0];
    assert!(
        range.end <= len && v.dims()[0] == len && grads.dims()[0] == len,
        "adamw: {range:?} of m {len}, v {}, grads {}",
        v.dims()[0],
        grads.dims()[0]
    );
    assert!(
        offset + range.end <= weights.dims()[0],
        "adamw: {range:?} at {offset} of weights {}",
        weights.dims()[0]
    );
    let (w, m, v) = B::adamw(
        weights.into_primitive().tensor(),
        offset,
        m.into_primitive().tensor(),
        v.into_primitive().tensor(),
        grads.clone().into_primitive().tensor(),
        range,
        step,
    );
    let t = |x| Tensor::from_primitive(TensorPrimitive::Float(x));
    (t(w), t(m), t(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{ParamInfo, ParamKind, ParamLayout};
    use crate::train::optimizer::AdamW;
    use burn::backend::Flex;

    /// Three steps of the op, one call per parameter (decayed or not by its kind), give
    /// `optimizer.rs`'s host AdamW within a few f32 ulps (its constants are rounded from f64
    /// here, `1.0f32 - b1` there), with and without clipping, on the whole buffer and inside a
    /// bigger weight buffer at an offset; the lead of that buffer is untouched. The last
    /// parameter spans two of the default body's chunks.
    #[test]
    fn the_op_is_the_host_optimizer() {
        let kinds = [
            ParamKind::Norm,
            ParamKind::Matrix,
            ParamKind::Bias,
            ParamKind::Matrix,
        ];
        let mut offset = 0;
        let params: Vec<ParamInfo> = kinds
            .iter()
            .zip([7, 45, 3, ADAMW_CHUNK_ELEMENTS + 13])
            .enumerate()
            .map(|(i, (&kind, len))| {
                let p = ParamInfo {
                    name: format!("p{i}"),
                    shape: vec![len],
                    offset,
                    kind,
                };
                offset += len;
                p
            })
            .collect();
        let layout = ParamLayout {
            params,
            total: offset,
        };
        let n = layout.total;
        let spec = OptimizerSpec::default();
        let wave = |i: usize, f: f32| ((i as f32 * f).sin() * 0.5) + 0.01;
        let device = Default::default();
        for (lead, grad_scale) in [(0, 1.0f32), (11, 0.37)] {
            let mut host = AdamW::new(spec, &layout);
            let mut w: Vec<f32> = (0..n).map(|i| wave(i, 0.7)).collect();
            let mut buffer: Vec<f32> = (0..lead).map(|i| wave(i, 1.3)).collect();
            buffer.extend(&w);
            let mut weights = Tensor::<Flex, 1>::from_floats(buffer.as_slice(), &device);
            let mut m = Tensor::<Flex, 1>::zeros([n], &device);
            let mut v = Tensor::<Flex, 1>::zeros([n], &device);
            for t in 1..=3 {
                let g: Vec<f32> = (0..n).map(|i| wave(i + t, 0.9) * 3.0).collect();
                let lr = 1e-2 * t as f64;
                let scaled: Vec<f32> = g.iter().map(|x| x * grad_scale).collect();
                host.step(&mut w, &scaled, lr);
                let step = AdamwStep::new(&spec, lr, t as i32, grad_scale);
                let grads = Tensor::<Flex, 1>::from_floats(g.as_slice(), &device);
                for p in &layout.params {
                    let decay = if p.kind.decays(spec.decay_embeddings) {
                        (lr * spec.weight_decay) as f32
                    } else {
                        0.0
                    };
                    (weights, m, v) = adamw(
                        weights,
                        lead,
                        m,
                        v,
                        &grads,
                        p.range(),
                        AdamwStep { decay, ..step },
                    );
                }
                let got = weights.to_data().into_vec::<f32>().expect("f32");
                assert_eq!(&got[..lead], &buffer[..lead], "the lead is untouched");
                // A few ulps of the larger of the value and the step's update (`lr`).
                let same = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .all(|(x, y)| (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(lr as f32))
                };
                assert!(same(&got[lead..], &w), "step {t}, lead {lead}: weights");
                let m_got = m.to_data().into_vec::<f32>().expect("f32");
                let v_got = v.to_data().into_vec::<f32>().expect("f32");
                assert!(same(&m_got, &host.m), "step {t}: m");
                assert!(same(&v_got, &host.v), "step {t}: v");
            }
        }
    }
}
