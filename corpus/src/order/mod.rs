//! The global sample order: the contract between the data and the distributed trainer.
//!
//! * A **sample** is a window of `seq_len + 1` tokens of one source's training stream; window
//!   `j` starts at token `j * seq_len`, so consecutive windows share one token and every token
//!   after the first is a prediction target exactly once per epoch. A source of `T` tokens has
//!   `(T - 1) / seq_len` windows.
//! * **Global sample `g`** is a pure function of `(seed, g)`: the [`Mixture`] says which source
//!   and that source's sample count `k`; `epoch = k / windows`, and the window is a seeded
//!   [`Permutation`] of `[0, windows)` (keyed by seed, source and epoch) applied to
//!   `k % windows`. A source that runs out simply starts its next epoch.
//! * **Step `s`** with global batch `B` consumes `[s*B, (s+1)*B)`. Rank `r` of world `w` takes a
//!   contiguous slice of it (see [`rank_slice`]) and splits it into micro-batches of at most `m`
//!   consecutive samples ([`micro_batches`]). What a step sees never depends on `w`.

pub mod feistel;
pub mod mixture;

use std::ops::Range;

use serde::Serialize;

pub use feistel::Permutation;
pub use mixture::Mixture;

use crate::error::{CorpusError, Result};

/// Where a global sample comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct SampleRef {
    /// Index of the source in the manifest.
    pub source: usize,
    /// How many times this source has been gone through before this sample.
    pub epoch: u64,
    /// The window within the source's training stream.
    pub window: u64,
}

/// The deterministic order of all training samples of a corpus.
#[derive(Debug, Clone)]
pub struct SampleOrder {
    seed: u64,
    mixture: Mixture,
    windows: Vec<u64>,
}

impl SampleOrder {
    /// `windows[i]` is the number of windows of source `i`; each must be at least 1, except for
    /// a source of weight 0, which is never sampled.
    pub fn new(seed: u64, weights: &[f64], windows: Vec<u64>) -> Result<Self> {
        if weights.len() != windows.len() {
            return Err(CorpusError::Invalid(format!(
                "{} weights for {} sources",
                weights.len(),
                windows.len()
            )));
        }
        if let Some(i) = (0..windows.len()).find(|&i| windows[i] == 0 && weights[i] > 0.0) {
            return Err(CorpusError::Invalid(format!(
                "source {i} has no complete sample window"
            )));
        }
        Ok(SampleOrder {
            seed,
            mixture: Mixture::new(weights)?,
            windows,
        })
    }

    pub fn mixture(&self) -> &Mixture {
        &self.mixture
    }

    pub fn windows(&self) -> &[u64] {
        &self.windows
    }

    /// Global sample `g`.
    pub fn sample(&self, g: u64) -> SampleRef {
        let (source, k) = self.mixture.locate(g);
        let n = self.windows[source];
        let epoch = k / n;
        let key = feistel::mix(self.seed ^ feistel::mix(source as u64 ^ feistel::mix(epoch)));
        SampleRef {
            source,
            epoch,
            window: Permutation::new(n, key).apply(k % n),
        }
    }

    /// Epochs of each source that the first `samples` global samples go through.
    pub fn epochs(&self, samples: u64) -> Vec<f64> {
        self.mixture
            .counts(samples)
            .iter()
            .zip(&self.windows)
            .map(|(&c, &n)| if c == 0 { 0.0 } else { c as f64 / n as f64 })
            .collect()
    }
}

/// The global samples of step `step`.
pub fn step_range(step: u64, global_batch: u64) -> Range<u64> {
    step * global_batch..(step + 1) * global_batch
}

/// The slice of step `step` that rank `rank` of `world` trains on: the step's range cut into
/// `world` contiguous pieces in rank order, the first `global_batch % world` of them one sample
/// longer. Empty for ranks beyond the batch when `world > global_batch`.
pub fn rank_slice(step: u64, global_batch: u64, rank: u32, world: u32) -> Range<u64> {
    assert!(world > 0 && rank < world, "rank {rank} of world {world}");
    let (w, r) = (world as u64, rank as u64);
    let base = global_batch / w;
    let extra = global_batch % w;
    let start = step * global_batch + r * base + r.min(extra);
    let len = base + u64::from(r < extra);
    start..start + len
}

/// `range` cut into consecutive micro-batches of at most `micro_batch` samples.
pub fn micro_batches(range: Range<u64>, micro_batch: u64) -> impl Iterator<Item = Range<u64>> {
    let micro_batch = micro_batch.max(1);
    let end = range.end;
    (range.start..end)
        .step_by(micro_batch as usize)
        .map(move |s| s..(s + micro_batch).min(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rank_slices_partition_the_step(
            world in 1u32..=64,
            step in 0u64..1_000_000,
            batch in 1u64..2048,
            micro in 1u64..64,
        ) {
            let order = SampleOrder::new(7, &[3.0, 1.0], vec![1000, 77]).expect("order");
            let step_samples: Vec<SampleRef> = step_range(step, batch).map(|g| order.sample(g)).collect();
            let mut covered = Vec::new();
            for rank in 0..world {
                let slice = rank_slice(step, batch, rank, world);
                let micro: Vec<u64> = micro_batches(slice.clone(), micro).flatten().collect();
                prop_assert_eq!(micro, slice.clone().collect::<Vec<_>>());
                covered.extend(slice);
            }
            // Disjoint, in order, and exactly the step's range.
            prop_assert_eq!(&covered, &step_range(step, batch).collect::<Vec<_>>());
            // The samples the ranks read, in rank order, are the step's samples whatever the world.
            let by_ranks: Vec<SampleRef> = covered.iter().map(|&g| order.sample(g)).collect();
            prop_assert_eq!(by_ranks, step_samples);
        }

        #[test]
        fn consecutive_steps_cover_each_epoch_once(
            windows in 1u64..3000,
            batch in 1u64..100,
            seed in any::<u64>(),
        ) {
            let order = SampleOrder::new(seed, &[1.0], vec![windows]).expect("order");
            let steps = windows.div_ceil(batch) * 2 + 1;
            let mut seen = vec![0u32; ((steps * batch / windows + 1) * windows) as usize];
            for step in 0..steps {
                for g in step_range(step, batch) {
                    let s = order.sample(g);
                    prop_assert!(s.window < windows);
                    seen[(s.epoch * windows + s.window) as usize] += 1;
                    prop_assert_eq!(s.epoch, g / windows);
                }
            }
            // Every complete epoch visits every window exactly once.
            let complete = (steps * batch / windows) as usize;
            for e in 0..complete {
                let epoch = &seen[e * windows as usize..(e + 1) * windows as usize];
                prop_assert!(epoch.iter().all(|&c| c == 1), "epoch {} not covered once", e);
            }
        }
    }

    #[test]
    fn sample_is_a_pure_function_of_seed_and_position() {
        let a = SampleOrder::new(1, &[2.0, 1.0], vec![500, 40]).expect("order");
        let b = SampleOrder::new(1, &[2.0, 1.0], vec![500, 40]).expect("order");
        let c = SampleOrder::new(2, &[2.0, 1.0], vec![500, 40]).expect("order");
        let xs: Vec<_> = (0..300).map(|g| a.sample(g)).collect();
        assert_eq!(xs, (0..300).map(|g| b.sample(g)).collect::<Vec<_>>());
        assert_ne!(xs, (0..300).map(|g| c.sample(g)).collect::<Vec<_>>());
        // Each epoch is its own permutation.
        let single = SampleOrder::new(1, &[1.0], vec![50]).expect("order");
        let e0: Vec<u64> = (0..50).map(|g| single.sample(g).window).collect();
        let e1: Vec<u64> = (50..100).map(|g| single.sample(g).window).collect();
        assert_ne!(e0, e1);
        assert_eq!(a.epochs(900), vec![600.0 / 500.0, 300.0 / 40.0]);
        assert!(SampleOrder::new(1, &[1.0], vec![0]).is_err());
    }

    #[test]
    fn a_weight_zero_source_is_never_sampled_and_may_have_no_windows() {
        let order = SampleOrder::new(3, &[1.0, 0.0], vec![100, 0]).expect("order");
        assert!((0..1000).all(|g| order.sample(g).source == 0));
        assert_eq!(order.epochs(1000), vec![10.0, 0.0]);
        // The domain's samples are those of a corpus without the unused source.
        let alone = SampleOrder::new(3, &[1.0], vec![100]).expect("order");
        assert!((0..1000).all(|g| order.sample(g) == alone.sample(g)));
    }
}
