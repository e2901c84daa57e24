//! One training step, in two halves so that a collective fits between them:
//! [`Trainer::gradients`] (forward and backward over the micro-batches, gradients summed into
//! one flat f32 buffer in the parameter layout) and [`Trainer::apply`] (global-norm clipping and
//! AdamW on the flat buffers).

use std::ops::Range;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use dapt_corpus::{micro_batches, CorpusReader, SampleOrder};
use dapt_proto::job::TrainingSpec;

use super::optimizer::{clip_global_norm, AdamW};
use super::schedule::LrSchedule;
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
}

/// Weights, optimizer state and the position in the schedule.
#[derive(Clone)]
pub struct Trainer {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    pub weights: Vec<f32>,
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
    /// Steps completed.
    pub step: u64,
    /// Tokens trained on so far (the schedule's clock).
    pub tokens: u64,
    /// The job's training section (the device-resident trainer starts from it).
    pub training: TrainingSpec,
}

impl Trainer {
    pub fn new(config: LlamaConfig, weights: Vec<f32>, training: &TrainingSpec) -> Self {
        let layout = ParamLayout::llama(&config);
        assert_eq!(
            weights.len(),
            layout.total,
            "weights laid out for this config"
        );
        Trainer {
            optimizer: AdamW::new(training.optimizer, &layout),
            schedule: LrSchedule {
                peak: training.optimizer.lr,
                spec: training.schedule,
                total_tokens: training.steps() * training.tokens_per_step(),
            },
            config,
            layout,
            weights,
            step: 0,
            tokens: 0,
            training: *training,
        }
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

    /// Clips `grads` (already reduced across ranks) and takes an AdamW step over `step_tokens`.
    pub fn apply(&mut self, grads: &mut [f32], step_tokens: u64) -> StepStats {
        let lr = self.schedule.lr(self.tokens);
        let grad_norm = clip_global_norm(grads, self.optimizer.spec.grad_clip);
        self.optimizer.step(&mut self.weights, grads, lr);
        self.step += 1;
        self.tokens += step_tokens;
        StepStats { lr, grad_norm }
    }
}

fn gradients<B: AutodiffBackend>(
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
