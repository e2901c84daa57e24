//! The collectives the resident engine's step needs, on flat f32 tensors where they live: the
//! all-reduce of stages 0 and 1 and, for ZeRO (`training.zero_stage` 1 and 2), the all-gather
//! over the same split as the host path ([`shard_range`]), the reduction of one bucket of stage
//! 2's gradients to the ranks that own it, and the bit-exact sum of every rank's partial sum of
//! squares (the global gradient norm).

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorData};

use crate::collective::{shard_range, Collective, CollectiveError};

/// Averages and gathers flat f32 buffers across the data-parallel ranks, on the device where
/// they live. Rank `r` of `w` owns `shard_range(len, w, r)` of a buffer of `len` elements.
pub trait GradReducer<B: Backend> {
    /// This rank's place in the split.
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The mean across ranks of `grads` (every rank passes the same length), whole, on every
    /// rank.
    fn all_reduce_mean(&mut self, grads: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError>;
    /// ZeRO stage 2, one bucket of the gradients at a time, as the backward pass makes them:
    /// every rank passes `piece`, its f32 gradients of `at..at + piece.len()` of a flat buffer
    /// of `total` elements (the same buckets on every rank, in the same order). Returns the mean
    /// across ranks of the part of the bucket this rank owns ([`owned_part`]) as that part's
    /// range in the flat buffer and its values, or None when the rank owns none of it: no rank
    /// ever holds a reduced gradient buffer the size of the model.
    fn reduce_bucket_mean(
        &mut self,
        piece: Tensor<B, 1>,
        at: usize,
        total: usize,
    ) -> Result<OwnedPart<B>, CollectiveError>;
    /// Every rank passes the whole `buf` (f32, or bf16: the compute copy of sharded master
    /// weights) with its own slice current; returns the whole buffer, in the same dtype,
    /// holding every rank's slice, bitwise as its owner had it.
    fn all_gather(&mut self, buf: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError>;
    /// The whole flat f32 buffer of `len` elements on the host, from every rank's slice: `own`
    /// is this rank's (`shard_range(len, world, rank)`, f32, on the device). For a checkpoint
    /// of sharded f32 master weights, without a device buffer the size of the model.
    fn gather_to_host(
        &mut self,
        own: Tensor<B, 1>,
        len: usize,
    ) -> Result<Vec<f32>, CollectiveError>;
    /// Every rank's `value`, in rank order, on every rank (bit for bit: see
    /// `train::zero::gather_u64`).
    fn gather_u64(&mut self, value: u64) -> Result<Vec<u64>, CollectiveError>;
    /// The sum over ranks of each rank's `partial`, the same bits on every rank: the f64 bits
    /// gathered, added in rank order.
    fn total(&mut self, partial: f64) -> Result<f64, CollectiveError> {
        Ok(self
            .gather_u64(partial.to_bits())?
            .into_iter()
            .map(f64::from_bits)
            .sum())
    }
}

/// What [`GradReducer::reduce_bucket_mean`] leaves a rank: the range of the flat buffer it owns
/// within the bucket and the reduced values there, or None.
pub type OwnedPart<B> = Option<(Range<usize>, Tensor<B, 1>)>;

/// The part of the bucket `at..at + len` of a flat buffer of `total` elements that `rank` of
/// `world` owns (`shard_range(total, world, rank)`), if any.
pub fn owned_part(
    at: usize,
    len: usize,
    total: usize,
    world: usize,
    rank: usize,
) -> Option<Range<usize>> {
    let own = shard_range(total, world, rank);
    let (start, end) = (own.start.max(at), own.end.min(at + len));
    (start < end).then_some(start..end)
}

/// Any host [`Collective`] (the TCP ring) as a [`GradReducer`]: buffers are downloaded, reduced
/// on the host and uploaded again. For CPU ranks, and for tests.
pub struct HostStaged<C>(pub C);

/// `t`'s values on the host as f32 (exact for bf16, which f32 holds).
fn download<B: Backend>(t: Tensor<B, 1>) -> Result<Vec<f32>, CollectiveError> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| CollectiveError::Config(format!("a collective's buffer: {e:?}")))
}

fn upload<B: Backend>(host: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = host.len();
    Tensor::from_data(TensorData::new(host, [n]), device)
}

impl<B: Backend, C: Collective> GradReducer<B> for HostStaged<C> {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world(&self) -> usize {
        self.0.world()
    }

    fn all_reduce_mean(&mut self, grads: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError> {
        let device = grads.device();
        let mut host = download(grads)?;
        self.0.all_reduce_mean(&mut host)?;
        Ok(upload(host, &device))
    }

    /// Through the ring's all-reduce of the whole bucket (the ring has no reduce to one rank):
    /// twice the traffic of a reduce, on CPU ranks only; the host copy is one bucket's.
    fn reduce_bucket_mean(
        &mut self,
        piece: Tensor<B, 1>,
        at: usize,
        total: usize,
    ) -> Result<OwnedPart<B>, CollectiveError> {
        let device = piece.device();
        let mut host = download(piece)?;
        self.0.all_reduce_mean(&mut host)?;
        let (world, rank) = (self.0.world(), self.0.rank());
        Ok(owned_part(at, host.len(), total, world, rank).map(|part| {
            let values = host[part.start - at..part.end - at].to_vec();
            (part, upload(values, &device))
        }))
    }

    fn all_gather(&mut self, buf: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError> {
        let (device, dtype) = (buf.device(), buf.dtype());
        let len = buf.dims()[0];
        let own = shard_range(len, self.0.world(), self.0.rank());
        // Only the owned slice comes down: the ring overwrites everything else. A bf16 slice
        // travels as f32 and is cast back, exactly.
        let mut host = vec![0f32; len];
        host[own.clone()].copy_from_slice(&download(buf.slice(own))?);
        self.0.all_gather(&mut host)?;
        let gathered = upload::<B>(host, &device);
        Ok(if gathered.dtype() == dtype {
            gathered
        } else {
            gathered.cast(FloatDType::from(dtype))
        })
    }

    fn gather_to_host(
        &mut self,
        own: Tensor<B, 1>,
        len: usize,
    ) -> Result<Vec<f32>, CollectiveError> {
        let range = shard_range(len, self.0.world(), self.0.rank());
        let mut host = vec![0f32; len];
        host[range].copy_from_slice(&download(own)?);
        self.0.all_gather(&mut host)?;
        Ok(host)
    }

    fn gather_u64(&mut self, value: u64) -> Result<Vec<u64>, CollectiveError> {
        crate::train::zero::gather_u64(&mut self.0, value)
    }
}
