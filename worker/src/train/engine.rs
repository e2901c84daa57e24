//! One rank's training state as the training loops see it, wherever it lives: the host
//! [`Trainer`] on the CPU backend with an optional gradient reducer, or a [`ResidentTrainer`] on a GPU with an optional gradient
//! reducer between the two halves of the step.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use dapt_corpus::shards::TokenStream;

use super::eval::{perplexity, perplexity_of, Perplexity};
use super::resident::{train_step, GradReducer, ResidentTrainer};
use super::{MicroBatch, StepStats, Trainer};
use crate::checkpoint;
use crate::collective::Collective;
use crate::error::Result;
use crate::fused::FusedAutodiff;
use crate::model::LlamaConfig;

pub trait Engine {
    fn config(&self) -> &LlamaConfig;
    /// Steps completed.
    fn step(&self) -> u64;
    /// Forward/backward over this rank's `micro`, each token's loss divided by `denominator`
    /// (the step's tokens / the number of ranks, as in [`Trainer::gradients`]), reduce (the
    /// engine's reducer, if any), clip, AdamW over `step_tokens`. Returns this rank's share of
    /// the loss and the stats. A step whose loss or gradient norm is not finite is never
    /// applied: it is skipped or fails with [`crate::error::WorkerError::NonFiniteStep`]
    /// (see [`super::step::admit`]).
    fn train_step(
        &mut self,
        micro: &[MicroBatch],
        denominator: f64,
        step_tokens: u64,
    ) -> Result<(f64, StepStats)>;
    /// The state as a host [`Trainer`] (a copy, for a device engine): what checkpoints and
    /// weight digests are made from. Under ZeRO with sharded f32 master weights (a device
    /// engine in bf16) every rank's slice is gathered over the reducer, so every rank calls it
    /// at the same step.
    ///
    /// # Errors
    /// That gather's collective failure.
    fn host(&mut self) -> Result<Cow<'_, Trainer>>;
    /// Writes a checkpoint of the current state under `root`.
    fn save(
        &mut self,
        root: &Path,
        seed: u64,
        origin: Option<checkpoint::Origin>,
    ) -> Result<PathBuf> {
        let host = self.host()?;
        checkpoint::save(root, &host, seed, origin)
    }
    fn perplexity(
        &self,
        stream: &TokenStream,
        seq_len: u32,
        max_tokens: u64,
        batch: usize,
    ) -> Option<Perplexity>;
}

/// The host trainer and the reducer its gradients go through between the two halves of each
/// step (the TCP ring across ranks; none for one rank). Under `training.zero_stage` 1 or 2 the
/// trainer holds only its rank's optimizer shard ([`Trainer::shard`]) and the step is
/// [`super::zero::step`].
pub struct HostEngine {
    pub trainer: Trainer,
    pub reducer: Option<Box<dyn Collective>>,
}

impl HostEngine {
    /// One rank on its own.
    pub fn alone(trainer: Trainer) -> Self {
        HostEngine {
            trainer,
            reducer: None,
        }
    }
}

impl Engine for HostEngine {
    fn config(&self) -> &LlamaConfig {
        &self.trainer.config
    }

    fn step(&self) -> u64 {
        self.trainer.step
    }

    fn train_step(
        &mut self,
        micro: &[MicroBatch],
        denominator: f64,
        step_tokens: u64,
    ) -> Result<(f64, StepStats)> {
        let stage = self.trainer.training.zero_stage;
        if stage > 0 {
            let collective = self
                .reducer
                .as_deref_mut()
                .map(|c| c as &mut dyn Collective);
            return super::zero::step(
                &mut self.trainer,
                collective,
                stage,
                micro,
                denominator,
                step_tokens,
            );
        }
        let (loss, mut grads) = self.trainer.gradients(micro, denominator);
        super::step::poison(loss, &mut grads);
        if let Some(reducer) = self.reducer.as_deref_mut() {
            reducer.all_reduce_mean(&mut grads)?;
        }
        let stats = self.trainer.apply(&mut grads, loss, step_tokens)?;
        Ok((loss, stats))
    }

    fn host(&mut self) -> Result<Cow<'_, Trainer>> {
        Ok(Cow::Borrowed(&self.trainer))
    }

    fn perplexity(
        &self,
        stream: &TokenStream,
        seq_len: u32,
        max_tokens: u64,
        batch: usize,
    ) -> Option<Perplexity> {
        let t = &self.trainer;
        perplexity(&t.config, &t.weights, stream, seq_len, max_tokens, batch)
    }
}

/// A device-resident trainer and the reducer its gradients go through (none for one rank).
pub struct ResidentEngine<B: FusedAutodiff> {
    pub trainer: ResidentTrainer<B>,
    pub reducer: Option<Box<dyn GradReducer<B::InnerBackend>>>,
}

impl<B: FusedAutodiff> Engine for ResidentEngine<B> {
    fn config(&self) -> &LlamaConfig {
        &self.trainer.config
    }

    fn step(&self) -> u64 {
        self.trainer.step
    }

    fn train_step(
        &mut self,
        micro: &[MicroBatch],
        denominator: f64,
        step_tokens: u64,
    ) -> Result<(f64, StepStats)> {
        let reducer = self
            .reducer
            .as_deref_mut()
            .map(|r| r as &mut dyn GradReducer<B::InnerBackend>);
        train_step(&mut self.trainer, reducer, micro, denominator, step_tokens)
    }

    fn host(&mut self) -> Result<Cow<'_, Trainer>> {
        let reducer = self
            .reducer
            .as_deref_mut()
            .map(|r| r as &mut dyn GradReducer<B::InnerBackend>);
        Ok(Cow::Owned(self.trainer.to_host_gathered(reducer)?))
    }

    fn perplexity(
        &self,
        stream: &TokenStream,
        seq_len: u32,
        max_tokens: u64,
        batch: usize,
    ) -> Option<Perplexity> {
        perplexity_of(
            &self.trainer.eval_model(),
            stream,
            seq_len,
            max_tokens,
            batch,
        )
    }
}

/// `trainer` moved to `device` of backend `B` as a [`ResidentEngine`] computing in
/// `precision`, with `reducer` between the two halves of each step (none for one rank). With
/// `activation_checkpointing` the engine recomputes each decoder block in the backward pass
/// from its kept input (see [`crate::model::Llama::backward_recompute`]).
fn resident<B: crate::fused::FusedOps>(
    mut trainer: Trainer,
    device: &B::Device,
    precision: crate::device::Precision,
    activation_checkpointing: bool,
    reducer: Option<Box<dyn GradReducer<B>>>,
) -> Box<dyn Engine> {
    use burn::backend::Autodiff;
    // The resident trainer reads the flag from its training section.
    trainer.training.activation_checkpointing = activation_checkpointing;
    let compute = crate::device::dtype(precision);
    let trainer = ResidentTrainer::<Autodiff<B>>::from_host(trainer, compute, device);
    let owned = trainer.owned();
    tracing::info!(
        optimizer_bytes = trainer.optimizer_bytes(),
        master_bytes = trainer.master_bytes(),
        gradient_bytes = trainer.gradient_bytes(),
        owned_start = owned.start,
        owned_end = owned.end,
        "optimizer state on the device"
    );
    Box::new(ResidentEngine { trainer, reducer })
}

/// `trainer` as a [`ResidentEngine`] on Burn's wgpu backend (Vulkan), f32, one rank: the GPU's
/// engine and kernels for `dapt-worker train --device vulkan`.
#[cfg(feature = "wgpu")]
pub fn on_vulkan(trainer: Trainer, activation_checkpointing: bool) -> Box<dyn Engine> {
    resident::<crate::Vulkan>(
        trainer,
        &Default::default(),
        crate::device::Precision::F32,
        activation_checkpointing,
        None,
    )
}

/// `trainer` as a [`ResidentEngine`] on the CPU backend: the GPU's engine, run where there is no
/// GPU (`dapt-worker --engine resident`), so that the agent's device path can be tested.
pub fn on_cpu(
    trainer: Trainer,
    precision: crate::device::Precision,
    activation_checkpointing: bool,
    reducer: Option<Box<dyn GradReducer<crate::Cpu>>>,
) -> Box<dyn Engine> {
    let device = Default::default();
    resident(
        trainer,
        &device,
        precision,
        activation_checkpointing,
        reducer,
    )
}

/// `trainer` on GPU `ordinal` (see [`resident`]).
#[cfg(feature = "cuda")]
pub fn on_cuda(
    trainer: Trainer,
    ordinal: usize,
    precision: crate::device::Precision,
    activation_checkpointing: bool,
    reducer: Option<Box<dyn GradReducer<crate::Gpu>>>,
) -> Box<dyn Engine> {
    let device = burn::backend::cuda::CudaDevice::new(ordinal);
    resident(
        trainer,
        &device,
        precision,
        activation_checkpointing,
        reducer,
    )
}
