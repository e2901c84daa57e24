//! `dapt-worker`: the node agent's training side.
//!
//! * [`agent`] — the node agent: the session with the coordinator, one training thread per
//!   generation.
//! * [`model`] — the Llama decoder in Burn, generic over the backend, and its flat parameter
//!   layout (the seam for the optimizer, collectives, checkpoints and export).
//! * [`import`] — Hugging Face directories and llama.cpp GGUF files in; Hugging Face out.
//! * [`train`] — the step (gradients, then clip + AdamW over flat buffers), LR schedule,
//!   held-out perplexity and the single-rank loop.
//! * [`collective`] — the `Collective` trait, the CPU TCP ring all-reduce between workers, and
//!   NCCL between GPUs (feature `cuda`).
//! * [`device`] — `--device cpu|cuda:N`, and the checks that run before any GPU code.
//! * [`kernel_cache`] — where compiled PTX and autotune results are kept, per GPU model and build.
//! * [`checkpoint`] — checksummed, atomically published checkpoints that resume bitwise.
//! * [`progress`] — where a rank is (phase, collective bytes, the peer it waits for), for the
//!   heartbeats.

pub mod agent;
pub mod cache_dir;
pub mod checkpoint;
pub mod collective;
pub mod device;
pub mod error;
pub mod fused;
pub mod import;
pub mod kernel_cache;
pub mod memory;
pub mod model;
pub mod progress;
pub mod train;

pub use error::{Result, WorkerError};

/// The CPU backend.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with reverse-mode autodiff.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
/// The CUDA backend (Burn's CubeCL kernels, no fusion), f32 by default.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<f32, i32>;
/// Burn's wgpu backend on Vulkan, f32: the fused ops' CubeCL kernels run on it in the tests
/// (Mesa's lavapipe on a machine without a GPU). Not a training device.
#[cfg(feature = "wgpu")]
pub type Vulkan = burn::backend::Vulkan<f32, i32>;
