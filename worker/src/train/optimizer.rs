//! AdamW over the flat parameter buffer, with decoupled weight decay (Loshchilov & Hutter) on
//! the parameters the job says, and global-norm gradient clipping over all parameters.
//!
//! Element-wise and in a fixed order, so a step is bitwise reproducible on any thread count.

use dapt_proto::job::OptimizerSpec;
use rayon::prelude::*;

use crate::model::{ParamKind, ParamLayout};

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub spec: OptimizerSpec,
    /// First moments, laid out like the weights.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Steps taken (for bias correction).
    pub t: u64,
    /// 1.0 where weight decay applies, else 0.0.
    decay_mask: Vec<f32>,
}

impl AdamW {
    pub fn new(spec: OptimizerSpec, layout: &ParamLayout) -> Self {
        let mut decay_mask = vec![0f32; layout.total];
        for p in &layout.params {
            let decays = match p.kind {
                ParamKind::Matrix => true,
                ParamKind::Embedding => spec.decay_embeddings,
                ParamKind::Norm | ParamKind::Bias => false,
            };
            if decays {
                decay_mask[p.range()].fill(1.0);
            }
        }
        AdamW {
            spec,
            m: vec![0.0; layout.total],
            v: vec![0.0; layout.total],
            t: 0,
            decay_mask,
        }
    }

    /// One update of `weights` with `grads` at learning rate `lr`.
    pub fn step(&mut self, weights: &mut [f32], grads: &[f32], lr: f64) {
        self.t += 1;
        let (b1, b2) = (self.spec.betas.0 as f32, self.spec.betas.1 as f32);
        let bc1 = 1.0 - self.spec.betas.0.powi(self.t as i32);
        let bc2 = 1.0 - self.spec.betas.1.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let inv_bc2_sqrt = (1.0 / bc2.sqrt()) as f32;
        let eps = self.spec.eps as f32;
        let decay = (lr * self.spec.weight_decay) as f32;
        weights
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK))
            .zip(self.decay_mask.par_chunks(CHUNK))
            .for_each(|((((w, g), m), v), mask)| {
                for i in 0..w.len() {
                    let gi = g[i];
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let denom = v[i].sqrt() * inv_bc2_sqrt + eps;
                    w[i] -= decay * mask[i] * w[i];
                    w[i] -= step_size * m[i] / denom;
                }
            });
    }
}

/// The global L2 norm of `grads` (f64 sums of fixed chunks, added in order: deterministic).
pub fn global_norm(grads: &[f32]) -> f64 {
    let partial: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum())
        .collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Scales `grads` so that their global norm is at most `max_norm` (0 disables); returns the
/// norm before clipping.
pub fn clip_global_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use dapt_proto::job::Preset;

    #[test]
    fn matches_the_adamw_formula_and_spares_norms() {
        let cfg = LlamaConfig::preset(Preset::Tiny, 64);
        let layout = ParamLayout::llama(&cfg);
        let spec = OptimizerSpec {
            lr: 0.1,
            betas: (0.9, 0.99),
            eps: 1e-8,
            weight_decay: 0.5,
            decay_embeddings: false,
            grad_clip: 0.0,
        };
        let mut opt = AdamW::new(spec, &layout);
        let mut w = vec![1.0f32; layout.total];
        let g = vec![0.5f32; layout.total];
        opt.step(&mut w, &g, 0.1);
        // Step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (plus decay on matrices).
        let q = layout
            .get("model.layers.0.self_attn.q_proj.weight")
            .expect("q");
        let norm = layout.get("model.norm.weight").expect("norm");
        let embed = layout.get("model.embed_tokens.weight").expect("embed");
        let expect_matrix = 1.0 - 0.1 * 0.5 - 0.1;
        assert!(
            (w[q.offset] - expect_matrix).abs() < 1e-6,
            "{}",
            w[q.offset]
        );
        assert!((w[norm.offset] - 0.9).abs() < 1e-6);
        assert!((w[embed.offset] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn clips_the_global_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_global_norm(&mut g, 10.0), 5.0);
        assert_eq!(g, vec![3.0, 4.0]);
        let norm = clip_global_norm(&mut g, 1.0);
        assert_eq!(norm, 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
    }
}
