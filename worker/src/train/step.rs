//! One training step, in two halves so that a collective fits between them:
//! [`Trainer::gradients`] (forward and backward over the micro-batches, gradients summed into
//! one flat f32 buffer in the parameter layout) and [`Trainer::apply`] (global-norm clipping and
//! AdamW on the flat buffers).
//!
//! Between the two halves sits the guard every engine shares ([`admit`]): a step whose loss
//! or global gradient norm is not finite is never applied. The job's `training.nonfinite` says
//! whether it then stops the job ([`WorkerError::NonFiniteStep`]) or passes over the step
//! (bounded by `training.max_skipped_steps`). The norm is the one clipping computes anyway, and
//! it is taken after the reduction, so every rank sees the same one; a rank whose own loss is
//! not finite marks its gradients first ([`poison`]) so that the reduction carries that to every
//! rank, and all of them decide the same.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use dapt_corpus::{micro_batches, CorpusReader, SampleOrder};
use dapt_proto::job::TrainingSpec;

use super::optimizer::{clip_to, global_norm, AdamW};
use super::schedule::LrSchedule;
use crate::error::{Result, WorkerError};
use crate::fused::FusedAutodiff;
use crate::model::{Llama, LlamaConfig, ParamLayout};
use crate::Cpu;

/// Samples of one forward/backward pass: `samples` windows of `seq_len + 1` token ids.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub ids: Vec<u32>,
    pub samples: usize,
}

impl MicroBatch {
    /// Global samples `range` in `order`, read straight into one buffer.
    ///
    /// # Errors
    /// A token id outside the corpus vocabulary, naming the shard.
    pub fn read(
        reader: &CorpusReader,
        order: &SampleOrder,
        range: Range<u64>,
        seq_len: u32,
    ) -> Result<Self, dapt_corpus::CorpusError> {
        let width = seq_len as usize + 1;
        let samples = (range.end - range.start) as usize;
        let mut ids = vec![0u32; samples * width];
        for (window, g) in ids.chunks_exact_mut(width).zip(range) {
            reader.read_sample(order.sample(g), seq_len, window)?;
        }
        Ok(MicroBatch { ids, samples })
    }

    /// A rank's slice of a step (see `dapt_corpus::rank_slice`) as micro-batches of at most
    /// `micro_batch` samples.
    pub fn split(
        reader: &CorpusReader,
        order: &SampleOrder,
        slice: Range<u64>,
        micro_batch: u64,
        seq_len: u32,
    ) -> Result<Vec<Self>, dapt_corpus::CorpusError> {
        micro_batches(slice, micro_batch)
            .map(|range| Self::read(reader, order, range, seq_len))
            .collect()
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False for a step passed over under `training.nonfinite: skip`: its loss or gradient norm
    /// was not finite, and the weights and AdamW state are as they were before it.
    pub applied: bool,
}

/// Whether the step `step`, whose loss (this rank's share) is `loss` and whose reduced
/// gradients have global norm `grad_norm`, may be applied: `Ok(true)` if both are finite,
/// `Ok(false)` to skip it (`training.nonfinite: skip`, fewer than `max_skipped_steps` skipped
/// so far), else [`WorkerError::NonFiniteStep`].
pub fn admit(
    training: &TrainingSpec,
    step: u64,
    loss: f64,
    grad_norm: f64,
    skipped: u64,
) -> Result<bool> {
    // Exactly zero gradients at a positive loss: the model no longer learns (its outputs
    // saturated, every weight decayed away); a run trained 40 such steps at the uniform loss
    // ln V and ended "training finished", exit 0 (an audit). Never skipped: it recurs.
    if grad_norm == 0.0 && loss > 0.0 {
        return Err(WorkerError::ZeroGradient { step, loss });
    }
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(true);
    }
    let max_skipped = training.max_skipped_steps();
    // The job's last step with every step before it skipped too: a job that applied no step
    // ended "training finished", exit 0, its base model committed and exported as the result
    // (an audit, with max_skipped_steps at least the job's steps).
    let nothing_trained = step + 1 == training.steps() && skipped == step;
    if skipped < max_skipped && !nothing_trained {
        tracing::warn!(
            step,
            loss,
            grad_norm,
            skipped = skipped + 1,
            max_skipped,
            "non-finite step skipped"
        );
        return Ok(false);
    }
    Err(WorkerError::NonFiniteStep {
        step,
        loss,
        grad_norm,
        skipped,
        max_skipped,
    })
}

/// Marks `grads` non-finite when this rank's `loss` is not, so that the reduction carries it to
/// every rank (each rank then sees a non-finite norm and [`admit`] decides the same on all).
pub fn poison(loss: f64, grads: &mut [f32]) {
    if !loss.is_finite() {
        if let Some(g) = grads.first_mut() {
            *g = f32::NAN;
        }
    }
}

/// Weights, optimizer state and the position in the schedule.
#[derive(Clone)]
pub struct Trainer {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    pub weights: Vec<f32>,
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
    /// Steps completed (applied or skipped).
    pub step: u64,
    /// Tokens trained on so far (the schedule's clock).
    pub tokens: u64,
    /// Steps passed over under `training.nonfinite: skip`, over the whole job.
    pub skipped_steps: u64,
    /// The job's training section (the device-resident trainer starts from it).
    pub training: TrainingSpec,
}

impl Trainer {
    pub fn new(config: LlamaConfig, weights: Vec<f32>, training: &TrainingSpec) -> Self {
        let total = weights.len();
        Self::new_sharded(config, weights, training, 0..total)
    }

    /// [`Trainer::new`] with fresh optimizer state for `range` of the flat buffer only (a ZeRO
    /// shard).
    pub fn new_sharded(
        config: LlamaConfig,
        weights: Vec<f32>,
        training: &TrainingSpec,
        range: Range<usize>,
    ) -> Self {
        let layout = ParamLayout::llama(&config);
        assert_eq!(
            weights.len(),
            layout.total,
            "weights laid out for this config"
        );
        Trainer {
            optimizer: AdamW::sharded(training.optimizer, &layout, range),
            schedule: LrSchedule::of(training),
            config,
            layout,
            weights,
            step: 0,
            tokens: 0,
            skipped_steps: 0,
            training: *training,
        }
    }

    /// Keeps only `rank`'s ZeRO shard of the optimizer state (of `world`; see
    /// [`crate::collective::shard_range`]); the weights stay whole.
    pub fn shard(&mut self, rank: usize, world: usize) {
        let range = crate::collective::shard_range(self.layout.total, world, rank);
        self.optimizer = self.optimizer.narrowed(&self.layout, range);
    }

    /// Forward and backward over `micro`. Each token's loss is divided by `denominator`, and
    /// the gradients are summed over the micro-batches. With `denominator` = the tokens of the
    /// whole step / the number of ranks, the mean of the ranks' gradients (what the all-reduce
    /// computes) is the gradient of the step's mean loss, however the step is split. Returns this
    /// rank's share of the loss on the same scale, and the gradients.
    pub fn gradients(&self, micro: &[MicroBatch], denominator: f64) -> (f64, Vec<f32>) {
        if self.training.activation_checkpointing {
            gradients::<Autodiff<Cpu, BalancedCheckpointing>>(self, micro, denominator)
        } else {
            gradients::<Autodiff<Cpu>>(self, micro, denominator)
        }
    }

    /// Clips `grads` (the whole buffer, already reduced across ranks) and takes an AdamW step
    /// over `step_tokens`, unless `loss` (this rank's share) or the gradient norm is not finite:
    /// see [`admit`]. Updates the weights of the optimizer's range (all of them unless sharded).
    pub fn apply(&mut self, grads: &mut [f32], loss: f64, step_tokens: u64) -> Result<StepStats> {
        let grad_norm = global_norm(grads);
        let owned = self.optimizer.range.clone();
        self.apply_owned(&mut grads[owned], grad_norm, loss, step_tokens)
    }

    /// [`Trainer::apply`] for the optimizer's own range only (a ZeRO shard): `grads` are the
    /// reduced gradients of that range, `grad_norm` the global norm of the whole buffer (from
    /// every rank's [`super::optimizer::sum_of_squares`]). Only the weights of the range change;
    /// the caller all-gathers them.
    pub fn apply_owned(
        &mut self,
        grads: &mut [f32],
        grad_norm: f64,
        loss: f64,
        step_tokens: u64,
    ) -> Result<StepStats> {
        let lr = self.schedule.lr(self.tokens);
        let applied = admit(
            &self.training,
            self.step,
            loss,
            grad_norm,
            self.skipped_steps,
        )?;
        if applied {
            clip_to(grads, grad_norm, self.optimizer.spec.grad_clip);
            let owned = self.optimizer.range.clone();
            self.optimizer.step(&mut self.weights[owned], grads, lr);
        } else {
            self.skipped_steps += 1;
        }
        self.step += 1;
        self.tokens += step_tokens;
        Ok(StepStats {
            lr,
            grad_norm,
            applied,
        })
    }
}

fn gradients<B: FusedAutodiff>(
    trainer: &Trainer,
    micro: &[MicroBatch],
    denominator: f64,
) -> (f64, Vec<f32>) {
    let device = B::Device::default();
    let mut grads = vec![0f32; trainer.layout.total];
    let mut loss = 0.0;
    let width = trainer.training.seq_len as usize + 1;
    for mb in micro {
        // A fresh set of leaf tensors per micro-batch: with Burn 0.21's autodiff, reusing the
        // leaves of a graph that was already backpropagated gives wrong gradients on the next
        // backward pass (worker/tests/data_parallel.rs caught it: 1.2e-2 relative error).
        let model = Llama::<B>::from_flat(&trainer.config, &trainer.weights, &device, true);
        debug_assert_eq!(mb.ids.len(), mb.samples * width);
        let ids: Vec<i64> = mb.ids.iter().map(|&i| i as i64).collect();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [mb.samples, width]), &device);
        let scaled = model.nll_sum(ids).div_scalar(denominator);
        loss += scaled.clone().into_scalar().elem::<f64>();
        let g = scaled.backward();
        model.add_gradients(&g, &mut grads);
    }
    (loss, grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `max_skipped_steps` at least the job's steps, every step could be skipped: the job
    /// ended "training finished", exit 0, its base model committed (an audit). The last step of
    /// a job whose every earlier step was skipped fails instead; one applied step before it is
    /// enough to end as usual.
    #[test]
    fn a_job_whose_every_step_was_skipped_fails_at_its_last() {
        let spec = dapt_proto::job::JobSpec::parse(
            "job: t\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: 16\n  global_batch: 4\n  tokens: 256\n  nonfinite: skip\n  max_skipped_steps: 100\n",
        )
        .expect("job");
        let training = spec.training.expect("training");
        assert_eq!(training.steps(), 4);
        for step in 0..3 {
            assert!(!admit(&training, step, f64::NAN, f64::NAN, step).expect("skipped"));
        }
        let err = admit(&training, 3, f64::INFINITY, f64::NAN, 3).expect_err("nothing trained");
        assert!(err.to_string().contains("were all skipped too"), "{err}");
        assert!(!admit(&training, 3, f64::NAN, f64::NAN, 2).expect("one step was applied"));
        assert!(admit(&training, 3, 1.0, 1.0, 3).expect("a finite last step"));
        let err = admit(&training, 1, 6.238, 0.0, 0).expect_err("a model that no longer learns");
        assert!(err.to_string().contains("exactly zero"), "{err}");
        assert!(err.recurs_on_retry());
    }
}
