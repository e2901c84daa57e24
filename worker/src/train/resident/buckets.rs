//! ZeRO stage 2's gradient sharding: each parameter's gradient goes, as the backward pass hands
//! it over, into a bucket of adjacent parameters; a full bucket is reduced across the ranks to
//! the ranks that own it ([`GradReducer::reduce_bucket_mean`]) and each rank adds its part into
//! a gradient buffer of its own slice only. So a rank holds 4 bytes per parameter of f32
//! gradients over its slice (`shard_range(total, world, rank)`, 1/w of the model) plus one
//! bucket in flight, where stage 0 and 1 hold a whole flat f32 buffer: ZeRO-2 as in Rajbhandari
//! et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (SC 2020),
//! section 5.2, with DeepSpeed's bucketed reduction. The price is one reduction per micro-batch
//! instead of one per step.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

use super::{accumulate, take, GradReducer};
use crate::collective::CollectiveError;
use crate::fused::AccumulateOps;
use crate::memory::zeros_persistent;

/// Elements per bucket: 64 MiB of f32 (`dapt_proto::model::GRADIENT_BUCKET_ELEMENTS`, which the
/// planner counts). Larger parameters go in pieces of this size, so the f32 copy of a gradient
/// in flight is at most this big (and, when a bucket is made of adjacent parameters, once more
/// for their concatenation).
pub const BUCKET_ELEMENTS: usize = dapt_proto::model::GRADIENT_BUCKET_ELEMENTS;

/// One micro-batch's (or several's) gradients on their way to this rank's slice.
pub(super) struct Buckets<'r, B: Backend> {
    reducer: &'r mut dyn GradReducer<B>,
    total: usize,
    owned: Range<usize>,
    /// The reduced gradients of `owned` (f32), summed over the micro-batches so far.
    grads: Tensor<B, 1>,
    /// Parameters waiting in the open bucket, adjacent and in layout order, as f32, covering
    /// `open`.
    pending: Vec<Tensor<B, 1>>,
    open: Range<usize>,
    cap: usize,
    /// The first failure: nothing more is reduced after it (the generation is over).
    failed: Option<CollectiveError>,
    device: B::Device,
}

impl<'r, B: AccumulateOps> Buckets<'r, B> {
    /// Empty buckets for the gradients of a flat buffer of `total` elements, of which this
    /// rank owns `owned`, with at most `cap` elements per bucket.
    pub(super) fn new(
        reducer: &'r mut dyn GradReducer<B>,
        total: usize,
        owned: Range<usize>,
        cap: usize,
        device: &B::Device,
    ) -> Self {
        let len = owned.len();
        Buckets {
            reducer,
            total,
            // The rank's slice, alive across the passes: at its exact size.
            grads: zeros_persistent::<B>(len, device),
            owned,
            pending: Vec::new(),
            open: 0..0,
            cap: cap.max(1),
            failed: None,
            device: device.clone(),
        }
    }

    /// The gradient of elements `range` of the flat buffer (flat, any float dtype).
    pub(super) fn push(&mut self, range: Range<usize>, grad: Tensor<B, 1>) {
        if range.len() > self.cap {
            self.flush();
            for start in range.clone().step_by(self.cap) {
                let end = (start + self.cap).min(range.end);
                // Cast piece by piece: the f32 copy in flight is one bucket, never the whole
                // parameter (a 128k-entry embedding's would be 2 GB).
                let piece = grad
                    .clone()
                    .slice(start - range.start..end - range.start)
                    .cast(FloatDType::F32);
                self.reduce(piece, start);
            }
            return;
        }
        let grad = grad.cast(FloatDType::F32);
        if !self.pending.is_empty()
            && (range.start != self.open.end || self.open.len() + range.len() > self.cap)
        {
            self.flush();
        }
        if self.pending.is_empty() {
            self.open = range.start..range.start;
        }
        self.open.end = range.end;
        self.pending.push(grad);
    }

    /// Reduces the open bucket.
    pub(super) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let parts = std::mem::take(&mut self.pending);
        let bucket = if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            Tensor::cat(parts, 0)
        };
        let at = self.open.start;
        self.reduce(bucket, at);
    }

    /// The reduced gradients of this rank's slice (f32, `owned.len()` elements) once every
    /// bucket is reduced.
    ///
    /// # Errors
    /// The first collective failure.
    pub(super) fn finish(mut self) -> Result<Tensor<B, 1>, CollectiveError> {
        self.flush();
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.grads),
        }
    }

    fn reduce(&mut self, piece: Tensor<B, 1>, at: usize) {
        if self.failed.is_some() {
            return;
        }
        match self.reducer.reduce_bucket_mean(piece, at, self.total) {
            Ok(Some((part, values))) => {
                let local = part.start - self.owned.start..part.end - self.owned.start;
                self.grads = accumulate(take(&mut self.grads, &self.device), local, values);
            }
            Ok(None) => {}
            Err(e) => self.failed = Some(e),
        }
    }
}
