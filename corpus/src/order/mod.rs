//! The global sample order: the contract between the data and the distributed trainer.
//!
//! * A **sample** is a window of `seq_len + 1` tokens of one source's training stream; window
//!   `j` starts at token `j * seq_len`, so consecutive windows share one token and every token
//!   after the first is a prediction target exactly once per epoch. A source of `T` tokens has
//!   `(T - 1) / seq_len` windows.
//! * **Global sample `g`** is a pure function of `(seed, mixture schedule, g)`: the [`Mixture`]
//!   in force at `g` says which source and that source's sample count `k`; `epoch = k /
//!   windows`, and the window is a seeded [`Permutation`] of `[0, windows)` (keyed by seed,
//!   source and epoch) applied to `k % windows`. A source that runs out simply starts its next
//!   epoch.
//! * **Mixture schedule.** The corpus weights hold from sample 0; a [`MixtureChange`] (the
//!   forgetting guard's rebalance) gives new weights from a later sample on. Each source's
//!   count `k` carries on across a change (the samples it had before are counted, not
//!   restarted), so every source still goes through each epoch's permutation once, in order,
//!   whatever the schedule. Without changes the order is the corpus weights' alone.
//! * **Step `s`** with global batch `B` consumes `[s*B, (s+1)*B)`. Rank `r` of world `w` takes a
//!   contiguous slice of it (see [`rank_slice`]) and splits it into micro-batches of at most `m`
//!   consecutive samples ([`micro_batches`]). What a step sees never depends on `w`.

pub mod feistel;
pub mod mixture;

use std::ops::Range;

use serde::{Deserialize, Serialize};

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

/// New mixture weights from global sample `start` on (one entry of a mixture schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureChange {
    /// The first global sample drawn with `weights`.
    pub start: u64,
    /// One weight per source, in manifest order (finite, >= 0, at least one above 0).
    pub weights: Vec<f64>,
}

/// One stretch of the order under one mixture.
#[derive(Debug, Clone)]
struct Segment {
    /// The first global sample of the stretch.
    start: u64,
    mixture: Mixture,
    /// How many samples each source had before `start`.
    before: Vec<u64>,
}

/// The deterministic order of all training samples of a corpus.
#[derive(Debug, Clone)]
pub struct SampleOrder {
    seed: u64,
    windows: Vec<u64>,
    /// By `start`, the first at 0 (the corpus weights).
    segments: Vec<Segment>,
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
        check_windows(weights, &windows)?;
        Ok(SampleOrder {
            seed,
            segments: vec![Segment {
                start: 0,
                mixture: Mixture::new(weights)?,
                before: vec![0; windows.len()],
            }],
            windows,
        })
    }

    /// This order with the mixture changed as `changes` say (their `start`s increasing, all
    /// past 0). Errors name the change: a start out of order, a weight per source missing, or
    /// weights that [`Mixture::new`] refuses.
    pub fn with_schedule(mut self, changes: &[MixtureChange]) -> Result<Self> {
        for change in changes {
            let last = self.segments.last().expect("the corpus weights' segment");
            if change.start <= last.start {
                return Err(CorpusError::Invalid(format!(
                    "mixture change at sample {} does not come after the one at sample {}",
                    change.start, last.start
                )));
            }
            if change.weights.len() != self.windows.len() {
                return Err(CorpusError::Invalid(format!(
                    "mixture change at sample {} has {} weights for {} sources",
                    change.start,
                    change.weights.len(),
                    self.windows.len()
                )));
            }
            check_windows(&change.weights, &self.windows)?;
            let counts = last.mixture.counts(change.start - last.start);
            let before = last.before.iter().zip(counts).map(|(b, c)| b + c).collect();
            let mixture = Mixture::new(&change.weights)?;
            self.segments.push(Segment {
                start: change.start,
                mixture,
                before,
            });
        }
        Ok(self)
    }

    /// The mixture of the corpus weights (in force until the first change).
    pub fn mixture(&self) -> &Mixture {
        &self.segments[0].mixture
    }

    /// The mixture in force at global sample `g`.
    pub fn mixture_at(&self, g: u64) -> &Mixture {
        &self.segment(g).mixture
    }

    fn segment(&self, g: u64) -> &Segment {
        // segments[0] starts at 0, so at least one starts at or before g.
        let i = self.segments.partition_point(|s| s.start <= g);
        &self.segments[i.saturating_sub(1)]
    }

    pub fn windows(&self) -> &[u64] {
        &self.windows
    }

    /// Global sample `g`.
    pub fn sample(&self, g: u64) -> SampleRef {
        let segment = self.segment(g);
        let (source, k) = segment.mixture.locate(g - segment.start);
        let k = segment.before[source] + k;
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
        self.counts(samples)
            .iter()
            .zip(&self.windows)
            .map(|(&c, &n)| if c == 0 { 0.0 } else { c as f64 / n as f64 })
            .collect()
    }

    /// How many of the first `samples` global samples each source gives.
    pub fn counts(&self, samples: u64) -> Vec<u64> {
        let segment = self.segment(samples.saturating_sub(1));
        let within = samples.saturating_sub(segment.start);
        let counts = segment.mixture.counts(within);
        segment
            .before
            .iter()
            .zip(counts)
            .map(|(b, c)| b + c)
            .collect()
    }
}

/// Every source that `weights` samples has at least one window.
fn check_windows(weights: &[f64], windows: &[u64]) -> Result<()> {
    match (0..windows.len()).find(|&i| windows[i] == 0 && weights[i] > 0.0) {
        Some(i) => Err(CorpusError::Invalid(format!(
            "source {i} has no complete sample window"
        ))),
        None => Ok(()),
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

    /// A schedule of up to 4 changes over 3 sources: increasing starts, weights that may be 0
    /// (never all).
    fn schedule() -> impl Strategy<Value = Vec<MixtureChange>> {
        proptest::collection::vec(
            (
                1u64..400,
                proptest::collection::vec(prop_oneof![Just(0.0), 0.01f64..10.0], 3),
            ),
            0..5,
        )
        .prop_map(|changes| {
            let mut start = 0;
            changes
                .into_iter()
                .map(|(gap, mut weights)| {
                    start += gap;
                    if weights.iter().all(|&w| w == 0.0) {
                        weights[0] = 1.0;
                    }
                    MixtureChange { start, weights }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn a_schedule_keeps_every_source_on_its_own_permutation(
            changes in schedule(),
            windows in proptest::collection::vec(1u64..60, 3),
            seed in any::<u64>(),
        ) {
            let base = SampleOrder::new(seed, &[3.0, 1.0, 0.0], windows.clone()).expect("order");
            let order = base.clone().with_schedule(&changes).expect("schedule");
            let end = changes.last().map_or(0, |c| c.start) + 500;
            let samples: Vec<SampleRef> = (0..end).map(|g| order.sample(g)).collect();
            // Before the first change, the order is the corpus weights' own.
            let first = changes.first().map_or(end, |c| c.start);
            for g in 0..first {
                prop_assert_eq!(samples[g as usize], base.sample(g));
            }
            // Each source's samples are its k-th samples in turn, k = 0, 1, 2...: across
            // changes no window of an epoch is skipped or repeated.
            let counts = order.counts(end);
            for (source, &n) in windows.iter().enumerate() {
                let mine: Vec<&SampleRef> = samples.iter().filter(|s| s.source == source).collect();
                for (k, s) in mine.iter().enumerate() {
                    prop_assert_eq!(s.epoch, k as u64 / n);
                    prop_assert!(s.window < n);
                    // The same window as the source's own k-th sample under the seed.
                    let key = feistel::mix(seed ^ feistel::mix(source as u64 ^ feistel::mix(s.epoch)));
                    prop_assert_eq!(s.window, Permutation::new(n, key).apply(k as u64 % n));
                }
                prop_assert_eq!(counts[source], mine.len() as u64);
            }
            // Within each stretch the blend follows that stretch's weights to within one sample.
            let mut starts: Vec<u64> = vec![0];
            starts.extend(changes.iter().map(|c| c.start));
            starts.push(end);
            for pair in starts.windows(2) {
                let mixture = order.mixture_at(pair[0]);
                let mut counts = [0u64; 3];
                for g in pair[0]..pair[1] {
                    counts[samples[g as usize].source] += 1;
                    let n = (g - pair[0] + 1) as f64;
                    for (i, &c) in counts.iter().enumerate() {
                        prop_assert!((c as f64 - n * mixture.share(i)).abs() < 1.0);
                    }
                }
            }
            // The order is a pure function of (seed, schedule, g).
            let again = SampleOrder::new(seed, &[3.0, 1.0, 0.0], windows).expect("order")
                .with_schedule(&changes).expect("schedule");
            prop_assert!((0..end).all(|g| again.sample(g) == samples[g as usize]));
        }
    }

    #[test]
    fn a_schedule_out_of_order_or_of_the_wrong_width_is_refused() {
        let order = SampleOrder::new(1, &[1.0, 0.0], vec![10, 0]).expect("order");
        let change = |start, weights: &[f64]| MixtureChange {
            start,
            weights: weights.to_vec(),
        };
        let err = |changes: &[MixtureChange]| {
            order
                .clone()
                .with_schedule(changes)
                .expect_err("refused")
                .to_string()
        };
        assert!(err(&[change(0, &[1.0, 0.0])]).contains("does not come after"));
        assert!(
            err(&[change(5, &[1.0, 0.0]), change(5, &[1.0, 0.0])]).contains("does not come after")
        );
        assert!(err(&[change(5, &[1.0])]).contains("1 weights for 2 sources"));
        // A change may not sample a source that has no window.
        assert!(err(&[change(5, &[1.0, 1.0])]).contains("no complete sample window"));
        assert!(order.clone().with_schedule(&[]).is_ok());
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
