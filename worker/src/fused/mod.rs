//! Fused operations with their own backward pass: the parts of the Llama step that Burn's
//! decomposed ops make slow or memory-hungry on a GPU (issue 12).
//!
//! Each family of ops is a backend extension trait (the pattern of Burn's
//! `examples/custom-cubecl-kernel`): a reference implementation in Burn's own tensor ops for the
//! CPU backend, CubeCL kernels for the CubeCL backends (CUDA in production; wgpu on Mesa's
//! lavapipe in the CPU-only tests), and an implementation for `Autodiff<B>` that records one
//! graph node per fused op with its own backward. The model asks for all of them through
//! [`FusedOps`].
//!
//! - [`norm`]: RMSNorm, RoPE and SwiGLU.
//! - [`attention`]: causal grouped-query flash attention with its log-sum-exp;
//!   [`blockwise`]: the same op in blocks of Burn matmuls (tensor cores on a GPU) with one
//!   softmax kernel per block each way.
//! - [`loss`]: cross-entropy fused with the log-softmax, chunked over the vocabulary.
//! - [`accumulate`]: a gradient added in f32 into its range of the flat buffer, in place; the
//!   buffer's sum of squares in f64.
//! - [`adamw`]: the AdamW update of the flat buffers, in place.
//! - [`matmul`]: the model's projections and the other ops' products, with a named cubek
//!   strategy on the CubeCL backends (`DAPT_MATMUL`).

pub mod accumulate;
pub mod adamw;
pub mod attention;
pub mod blockwise;
pub mod gemm;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod kernels;
pub mod loss;
pub mod matmul;
pub mod norm;

use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::memory::DeviceMemory;

pub use accumulate::AccumulateOps;
pub use adamw::AdamwOps;
pub use attention::AttentionOps;
pub use loss::LossOps;
pub use matmul::MatmulOps;
pub use norm::NormOps;

/// Every fused op dapt's model uses: the bound on the backends it runs on. With them,
/// [`DeviceMemory`] (what the device's allocator holds, for the step's log).
pub trait FusedOps:
    Backend + NormOps + AttentionOps + LossOps + AccumulateOps + AdamwOps + MatmulOps + DeviceMemory
{
}

impl<
        B: Backend
            + NormOps
            + AttentionOps
            + LossOps
            + AccumulateOps
            + AdamwOps
            + MatmulOps
            + DeviceMemory,
    > FusedOps for B
{
}

/// An autodiff backend whose inner backend has the fused ops too (the trainers' bound).
pub trait FusedAutodiff: AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}

impl<B: AutodiffBackend<InnerBackend: FusedOps> + FusedOps> FusedAutodiff for B {}
