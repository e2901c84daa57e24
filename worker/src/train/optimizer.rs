//! AdamW over the flat parameter buffer, with decoupled weight decay (Loshchilov & Hutter) on
//! the parameters the job says, and global-norm gradient clipping over all parameters.
//!
//! Element-wise and in a fixed order, so a step is bitwise reproducible on any thread count.
//!
//! Under ZeRO (`training.zero_stage` 1 or 2) a rank's [`AdamW`] covers only its own slice of the
//! flat buffer ([`AdamW::sharded`], the slice `collective::shard_range` gives): its moments and
//! decay mask are that long, so the optimizer bytes a rank holds fall as 1/world.

use dapt_proto::job::OptimizerSpec;
use rayon::prelude::*;

use crate::model::ParamLayout;

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub spec: OptimizerSpec,
    /// The slice of the flat parameter buffer this state covers: all of it, or a ZeRO shard.
    pub range: std::ops::Range<usize>,
    /// First moments of `range`, laid out like the weights.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Steps taken (for bias correction).
    pub t: u64,
    /// 1.0 where weight decay applies, else 0.0.
    decay_mask: Vec<f32>,
}

impl AdamW {
    /// Fresh state over the whole buffer.
    pub fn new(spec: OptimizerSpec, layout: &ParamLayout) -> Self {
        Self::sharded(spec, layout, 0..layout.total)
    }

    /// Fresh state over `range` of the flat buffer (a ZeRO shard).
    pub fn sharded(
        spec: OptimizerSpec,
        layout: &ParamLayout,
        range: std::ops::Range<usize>,
    ) -> Self {
        let mut decay_mask = vec![0f32; range.len()];
        for p in &layout.params {
            let decays = p.kind.decays(spec.decay_embeddings);
            let (start, end) = (
                p.offset.max(range.start),
                (p.offset + p.len()).min(range.end),
            );
            if decays && start < end {
                decay_mask[start - range.start..end - range.start].fill(1.0);
            }
        }
        AdamW {
            spec,
            m: vec![0.0; range.len()],
            v: vec![0.0; range.len()],
            t: 0,
            decay_mask,
            range,
        }
    }

    /// This state cut down to `range` (inside its own): the moments of those elements, as they
    /// are. How a rank keeps its ZeRO shard of a replicated state.
    ///
    /// # Panics
    /// When `range` is not inside `self.range` (a caller's bug).
    pub fn narrowed(&self, layout: &ParamLayout, range: std::ops::Range<usize>) -> Self {
        assert!(self.range.start <= range.start && range.end <= self.range.end);
        let local = range.start - self.range.start..range.end - self.range.start;
        let mut out = Self::sharded(self.spec, layout, range);
        out.m.copy_from_slice(&self.m[local.clone()]);
        out.v.copy_from_slice(&self.v[local]);
        out.t = self.t;
        out
    }

    /// Bytes of optimizer state held: both moments and the decay mask.
    pub fn bytes(&self) -> usize {
        (self.m.len() + self.v.len() + self.decay_mask.len()) * std::mem::size_of::<f32>()
    }

    /// One update of `weights` (the elements of `self.range`) with `grads` (the same elements)
    /// at learning rate `lr`.
    pub fn step(&mut self, weights: &mut [f32], grads: &[f32], lr: f64) {
        debug_assert_eq!(weights.len(), self.m.len());
        debug_assert_eq!(grads.len(), self.m.len());
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
    sum_of_squares(grads).sqrt()
}

/// The sum of squares of `grads` in f64 (fixed chunks, added in order): one rank's part of the
/// global norm under ZeRO, where each rank holds only its shard of the reduced gradients.
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    let partial: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum())
        .collect();
    partial.iter().sum::<f64>()
}

/// Scales `grads` so that their global norm is at most `max_norm` (0 disables); returns the
/// norm before clipping.
pub fn clip_global_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    clip_to(grads, norm, max_norm);
    norm
}

/// Scales `grads`, part of a buffer whose global norm is `norm`, so that the whole buffer's norm
/// is at most `max_norm` (0 disables). Every rank's shard gets the same factor.
pub fn clip_to(grads: &mut [f32], norm: f64, max_norm: f64) {
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use dapt_proto::job::Preset;

    /// Large steps and weight decay, no clipping, embeddings not decayed.
    fn test_spec() -> OptimizerSpec {
        OptimizerSpec {
            lr: 0.1,
            betas: (0.9, 0.99),
            eps: 1e-8,
            weight_decay: 0.5,
            decay_embeddings: false,
            grad_clip: 0.0,
        }
    }

    #[test]
    fn matches_the_adamw_formula_and_spares_norms() {
        let cfg = LlamaConfig::preset(Preset::Tiny, 64);
        let layout = ParamLayout::llama(&cfg);
        let spec = test_spec();
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
    fn shards_step_like_the_whole_and_hold_their_share() {
        let cfg = LlamaConfig::preset(Preset::Tiny, 64);
        let layout = ParamLayout::llama(&cfg);
        let spec = test_spec();
        let g: Vec<f32> = (0..layout.total)
            .map(|i| ((i % 13) as f32 - 6.0) * 1e-3)
            .collect();
        let mut whole = AdamW::new(spec, &layout);
        let mut w = vec![1.0f32; layout.total];
        whole.step(&mut w, &g, 0.1);
        whole.step(&mut w, &g, 0.1);
        for world in 1..=4 {
            let mut joined = vec![1.0f32; layout.total];
            for rank in 0..world {
                let r = crate::collective::shard_range(layout.total, world, rank);
                let mut shard = AdamW::sharded(spec, &layout, r.clone());
                assert!(shard.bytes() <= whole.bytes() / world + 12);
                shard.step(&mut joined[r.clone()], &g[r.clone()], 0.1);
                shard.step(&mut joined[r.clone()], &g[r.clone()], 0.1);
                assert_eq!(
                    shard,
                    whole.narrowed(&layout, r),
                    "world {world} rank {rank}"
                );
            }
            assert_eq!(joined, w, "world {world}");
        }
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
