//! `dapt-worker`: the node agent's training side.
//!
//! * [`agent`] — the node agent: the session with the coordinator, one training thread per
//!   generation.
//! * [`model`] — the Llama decoder in Burn, generic over the backend, and its flat parameter
//!   layout (the seam for the optimizer, collectives, checkpoints and export).
//! * [`import`] — Hugging Face directories and llama.cpp GGUF files in; Hugging Face out.
//! * [`train`] — the step (gradients, then clip + AdamW over flat buffers), LR schedule,
//!   held-out perplexity and the single-rank loop.
//! * [`collective`] — the `Collective` trait and the CPU TCP ring all-reduce between workers.
//! * [`checkpoint`] — checksummed, atomically published checkpoints that resume bitwise.

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod error;
pub mod import;
pub mod memory;
pub mod model;
pub mod train;

pub use error::{Result, WorkerError};

/// The CPU backend.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with reverse-mode autodiff.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
