//! Gradient accumulation into the flat f32 buffer as one op (issue 12, item 4): a parameter's
//! gradient, in the compute dtype, added in f32 into its range of the buffer; and the buffer's
//! sum of squares in f64 (the global gradient norm) as one read.
//!
//! In Burn's ops that is a cast to f32 (a new f32 copy of the gradient), a slice of the buffer,
//! an add and a `slice_assign` back: about 26 bytes of memory traffic per element for a bf16
//! gradient. The CubeCL kernel reads the gradient (2 bytes) and the buffer (4) and writes the
//! buffer (4) in place: 10 bytes, no temporary. At the Llama-3.2-1B shape (1.24 B parameters)
//! that is 32 GB against 12 GB per micro-batch, about 4 ms at 4.8 TB/s.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};

/// The accumulation op of a backend; the default body is Burn's ops (the CPU backend's).
pub trait AccumulateOps: Backend {
    /// `acc` (flat, f32) with `grad` (flat, any float dtype) added in f32 into its elements
    /// `start..start + grad.len()`, in place where `acc` is uniquely owned. Panics if the range
    /// is outside `acc`.
    fn accumulate(
        acc: FloatTensor<Self>,
        start: usize,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let acc = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(acc));
        let grad = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(grad));
        let range = start..start + grad.dims()[0];
        let sum = grad.cast(FloatDType::F32) + acc.clone().slice(range.clone());
        acc.slice_assign(range, sum).into_primitive().tensor()
    }

    /// Partial sums of squares of the flat `x` (any float dtype), each accumulated in f64: a
    /// 1-D f64 tensor whose elements, added in order, give `sum_i x_i^2` (see
    /// [`sum_of_squares`]). How `x` is split into parts is the backend's, fixed by `x`'s length
    /// alone. The default body casts chunks of [`SQUARES_CHUNK`] elements to f64 (transient
    /// memory: 16 bytes per element of a chunk); the CubeCL kernel reads `x` once.
    fn sum_of_squares_parts(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(x));
        let n = x.dims()[0];
        let parts: Vec<_> = (0..n.div_ceil(SQUARES_CHUNK).max(1))
            .map(|c| {
                let chunk = x
                    .clone()
                    .slice(c * SQUARES_CHUNK..((c + 1) * SQUARES_CHUNK).min(n))
                    .cast(FloatDType::F64);
                (chunk.clone() * chunk).sum()
            })
            .collect();
        Tensor::cat(parts, 0).into_primitive().tensor()
    }
}

/// The elements of one f64 part in [`AccumulateOps::sum_of_squares_parts`]'s default body.
pub const SQUARES_CHUNK: usize = 1 << 22;

impl AccumulateOps for burn::backend::Flex {}

/// The trainers accumulate inner-backend tensors; `Autodiff` has the op for the bound's sake.
impl<B: AccumulateOps, C: CheckpointStrategy> AccumulateOps for Autodiff<B, C> {}

/// `sum_i x_i^2` over the flat `x`, accumulated in f64 (one read of `x` on a GPU, then its
/// partial sums read back and added on the host in order: one device synchronisation).
///
/// f64, not for the digits alone that one f32 sum over a billion elements would lose: under
/// ZeRO the sum is split by shard, and in f32 that regrouping moves the norm by ~1e-7, enough
/// to change the f32 clip factor; in f64 it moves by ~1e-16.
pub fn sum_of_squares<B: AccumulateOps>(x: Tensor<B, 1>) -> f64 {
    let parts = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::sum_of_squares_parts(
        x.into_primitive().tensor(),
    )));
    parts
        .into_data()
        .into_vec::<f64>()
        .expect("sum_of_squares_parts gives f64")
        .iter()
        .sum()
}

/// [`AccumulateOps::accumulate`] on `Tensor`s: `acc` with `grad` added into `start..`.
pub fn accumulate<B: AccumulateOps>(
    acc: Tensor<B, 1>,
    start: usize,
    grad: Tensor<B, 1>,
) -> Tensor<B, 1> {
    assert!(
        start + grad.dims()[0] <= acc.dims()[0],
        "accumulate: {} elements at {start} into {}",
        grad.dims()[0],
        acc.dims()[0]
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::accumulate(
        acc.into_primitive().tensor(),
        start,
        grad.into_primitive().tensor(),
    )))
}
