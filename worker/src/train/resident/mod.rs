//! Device-resident training: the same step as [`Trainer`], with the master weights (f32), the
//! AdamW moments and the gradients living on the training device as Burn tensors, so a step
//! never copies the model between host and device.
//!
//! Per micro-batch the f32 master weights are sliced (views, no copy) into one tensor per
//! parameter, cast to the compute dtype (a no-op for f32; a bf16 copy for mixed precision) and
//! wrapped as fresh autodiff leaves: Burn 0.21's autodiff gives wrong gradients when the leaves
//! of an already-backpropagated graph are reused (see `step.rs`), and on a device a fresh leaf
//! costs nothing but the cast. Each parameter's gradient is added, in f32, into its range of one
//! flat, uniquely owned buffer in the [`ParamLayout`] order (the buffer a [`GradReducer`]
//! all-reduces in place) as soon as the backward pass has it, and then dropped. The step clips
//! that buffer by its global norm and applies AdamW as element-wise tensor ops with the same
//! formula, in f32, as `optimizer.rs`.
//!
//! Memory: besides the four flat f32 buffers (weights, two moments, gradients) and, in mixed
//! precision, the bf16 compute copy of the weights, a step holds no full-size copy. The weight-decay mask is a list of ranges, not a buffer; the AdamW update runs
//! on the moments and weights in place (Burn reuses a uniquely owned operand's memory), with at
//! most two full-size temporaries; the RoPE tables and the causal mask are made once per
//! micro-batch shape. With `training.activation_checkpointing` the backward pass recomputes each
//! decoder block from its kept input ([`Llama::backward_recompute`]).
//!
//! Generic over the backend: CUDA in production, and the CPU backend in the tests, which check
//! it against the host [`Trainer`].

use std::ops::Range;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, FloatDType, Int, Tensor, TensorData};
use dapt_proto::job::{OptimizerSpec, TrainingSpec};

use super::schedule::LrSchedule;
use super::step::{admit, MicroBatch, StepStats, Trainer};
use crate::collective::{Collective, CollectiveError};
use crate::error::Result;
use crate::fused::FusedAutodiff;
use crate::model::llama::param_shape;
use crate::model::llama::Constants;
use crate::model::{Llama, LlamaConfig, ParamLayout};

/// Averages a flat f32 gradient buffer across ranks, on the device where it lives.
pub trait GradReducer<B: Backend> {
    fn all_reduce_mean(&mut self, grads: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError>;
}

/// Any host [`Collective`] (the TCP ring) as a [`GradReducer`]: the buffer is downloaded,
/// reduced on the host and uploaded again. For CPU ranks, and for tests.
pub struct HostStaged<C>(pub C);

impl<B: Backend, C: Collective> GradReducer<B> for HostStaged<C> {
    fn all_reduce_mean(&mut self, grads: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError> {
        let device = grads.device();
        let mut host = grads
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| CollectiveError::Config(format!("gradients are not f32: {e:?}")))?;
        self.0.all_reduce_mean(&mut host)?;
        let n = host.len();
        Ok(Tensor::from_data(TensorData::new(host, [n]), &device))
    }
}

/// Weights, AdamW state and the schedule's position, on `B`'s device.
pub struct ResidentTrainer<B: FusedAutodiff> {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    training: TrainingSpec,
    /// f32 master weights, flat, in layout order.
    weights: Tensor<B::InnerBackend, 1>,
    m: Tensor<B::InnerBackend, 1>,
    v: Tensor<B::InnerBackend, 1>,
    /// Where weight decay applies: ranges of the flat buffer (adjacent parameters merged).
    decay: Vec<Range<usize>>,
    /// The RoPE tables and mask of the last micro-batch shape.
    constants: Option<Constants<B::InnerBackend>>,
    /// Optimizer steps taken (bias correction).
    optimizer_steps: u64,
    schedule: LrSchedule,
    pub step: u64,
    pub tokens: u64,
    /// Steps passed over under `training.nonfinite: skip`.
    skipped_steps: u64,
    /// The dtype of the forward and backward passes.
    compute: FloatDType,
    device: B::Device,
}

impl<B: FusedAutodiff> ResidentTrainer<B> {
    /// Moves `host` (a fresh or resumed trainer) to `device`; the passes run in `compute`
    /// (f32, or bf16 with f32 master weights).
    pub fn from_host(host: Trainer, compute: FloatDType, device: &B::Device) -> Self {
        let upload = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(v, [n]), device)
        };
        let decay = decay_ranges(&host.layout, &host.optimizer.spec);
        ResidentTrainer {
            config: host.config,
            layout: host.layout,
            training: host.training,
            weights: upload(host.weights),
            m: upload(host.optimizer.m),
            v: upload(host.optimizer.v),
            decay,
            constants: None,
            optimizer_steps: host.optimizer.t,
            schedule: host.schedule,
            step: host.step,
            tokens: host.tokens,
            skipped_steps: host.skipped_steps,
            compute,
            device: device.clone(),
        }
    }

    /// A host [`Trainer`] with this state (for checkpoints): downloads weights and moments.
    pub fn to_host(&self) -> Trainer {
        let download = |t: &Tensor<B::InnerBackend, 1>| {
            t.clone()
                .into_data()
                .into_vec::<f32>()
                .expect("master weights and moments are f32")
        };
        let mut host = Trainer::new(self.config.clone(), download(&self.weights), &self.training);
        // The fresh trainer's zero moments go before the downloads, not after: one host copy
        // of each at a time.
        host.optimizer.m = Vec::new();
        host.optimizer.m = download(&self.m);
        host.optimizer.v = Vec::new();
        host.optimizer.v = download(&self.v);
        host.optimizer.t = self.optimizer_steps;
        host.step = self.step;
        host.tokens = self.tokens;
        host.skipped_steps = self.skipped_steps;
        host
    }

    /// Forward and backward over `micro`, with the loss scaling of [`Trainer::gradients`].
    /// Returns this rank's share of the loss and the flat f32 gradients, both on the device
    /// (nothing waits for the device here).
    pub fn gradients(
        &mut self,
        micro: &[MicroBatch],
        denominator: f64,
    ) -> (Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 1>) {
        let width = self.training.seq_len as usize + 1;
        let mut loss: Option<Tensor<B::InnerBackend, 1>> = None;
        // One flat buffer, uniquely owned: what the all-reduce writes into in place.
        let mut grads = Tensor::<B::InnerBackend, 1>::zeros([self.layout.total], &self.device);
        for mb in micro {
            debug_assert_eq!(mb.ids.len(), mb.samples * width);
            let consts = self.constants(mb.samples, width - 1);
            let ids: Vec<i64> = mb.ids.iter().map(|&i| i as i64).collect();
            let ids = TensorData::new(ids, [mb.samples, width]);
            let layout = &self.layout;
            let device = &self.device;
            let mut add = |i: usize, g: Tensor<B::InnerBackend, 1>| {
                grads = accumulate(take(&mut grads, device), layout.params[i].range(), g);
            };
            let value = if self.training.activation_checkpointing {
                let model = Llama::<B::InnerBackend>::from_params(
                    &self.config,
                    self.param_views().collect(),
                    &self.device,
                );
                let ids = Tensor::<B::InnerBackend, 2, Int>::from_data(ids, &self.device);
                model.backward_recompute::<B>(ids, denominator, &consts, &mut add)
            } else {
                let model = Llama::<B>::from_params(&self.config, self.leaves(), &self.device);
                let ids = Tensor::<B, 2, Int>::from_data(ids, &self.device);
                let scaled = model
                    .nll_sum_with(ids, &Constants::from_inner(&consts))
                    .div_scalar(denominator);
                let value = scaled.clone().inner();
                let mut g = scaled.backward();
                model.drain_gradients(&mut g, &mut add);
                value
            };
            loss = Some(match loss {
                Some(l) => l + value,
                None => value,
            });
        }
        (
            loss.unwrap_or_else(|| Tensor::zeros([1], &self.device)),
            grads,
        )
    }

    /// The RoPE tables and mask for micro-batches of `batch` x `seq`, made once per shape.
    fn constants(&mut self, batch: usize, seq: usize) -> Constants<B::InnerBackend> {
        match &self.constants {
            Some(c) if c.shape() == (batch, seq) => c.clone(),
            _ => {
                let dtype = self.compute.into();
                let c = Constants::new(&self.config, batch, seq, dtype, &self.device);
                self.constants = Some(c.clone());
                c
            }
        }
    }

    /// Clips `grads` (already reduced across ranks) by their global norm and takes an AdamW
    /// step over `step_tokens`, unless `loss` (this rank's share) or the norm is not finite
    /// (see [`admit`]). Waits for the device once, to read the norm.
    pub fn apply(
        &mut self,
        grads: Tensor<B::InnerBackend, 1>,
        loss: f64,
        step_tokens: u64,
    ) -> Result<StepStats> {
        let spec: OptimizerSpec = self.training.optimizer;
        let lr = self.schedule.lr(self.tokens);
        let grad_norm = self.global_norm(&grads);
        if !admit(
            &self.training,
            self.step,
            loss,
            grad_norm,
            self.skipped_steps,
        )? {
            self.skipped_steps += 1;
            self.step += 1;
            self.tokens += step_tokens;
            return Ok(StepStats {
                lr,
                grad_norm,
                applied: false,
            });
        }
        let g = if spec.grad_clip > 0.0 && grad_norm > spec.grad_clip {
            grads.mul_scalar(spec.grad_clip / (grad_norm + 1e-6))
        } else {
            grads
        };
        self.optimizer_steps += 1;
        let t = self.optimizer_steps as i32;
        let (b1, b2) = spec.betas;
        let step_size = lr / (1.0 - b1.powi(t));
        let inv_bc2_sqrt = 1.0 / (1.0 - b2.powi(t)).sqrt();
        let decay = lr * spec.weight_decay;
        // In place where Burn can: an element-wise op writes into its first operand's memory
        // when that operand is uniquely owned, so the moments and the weights are taken out of
        // `self` (not cloned) and `g` is consumed. Full-size temporaries: `g * (1 - b1)` (gone
        // before `g * g` is made), then `denom` and the update. Same formula and operation
        // order as `optimizer.rs`.
        let device = self.device.clone();
        let scaled = g.clone().mul_scalar(1.0 - b1);
        let m = take(&mut self.m, &device).mul_scalar(b1) + scaled;
        let square = g.clone() * g;
        let v = take(&mut self.v, &device).mul_scalar(b2) + square.mul_scalar(1.0 - b2);
        let denom = v
            .clone()
            .sqrt()
            .mul_scalar(inv_bc2_sqrt)
            .add_scalar(spec.eps);
        let mut w = take(&mut self.weights, &device);
        for r in &self.decay {
            let part = w.clone().slice(r.clone());
            let decayed = part.clone() - part.mul_scalar(decay);
            w = w.slice_assign(r.clone(), decayed);
        }
        let update = m.clone().mul_scalar(step_size) / denom;
        self.weights = w - update;
        self.m = m;
        self.v = v;
        self.step += 1;
        self.tokens += step_tokens;
        Ok(StepStats {
            lr,
            grad_norm,
            applied: true,
        })
    }

    /// The global L2 norm of the flat `grads`: f32 sums of squares per parameter on the device
    /// (one read for all of them), added in f64 on the host. One f32 sum over a billion
    /// elements would lose digits the host path (f64 throughout) keeps.
    fn global_norm(&self, grads: &Tensor<B::InnerBackend, 1>) -> f64 {
        let sums = self
            .layout
            .params
            .iter()
            .map(|p| grads.clone().slice(p.range()).powi_scalar(2).sum())
            .collect();
        let sums = Tensor::cat(sums, 0)
            .into_data()
            .into_vec::<f32>()
            .expect("f32 gradients");
        sums.iter().map(|&s| s as f64).sum::<f64>().sqrt()
    }

    /// The model in the compute dtype, without gradients (for evaluation).
    pub fn eval_model(&self) -> Llama<B::InnerBackend> {
        let params = self.param_views().collect();
        Llama::from_params(&self.config, params, &self.device)
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The master weights as one tensor per parameter (views of the flat buffer) in the
    /// compute dtype.
    fn param_views(&self) -> impl Iterator<Item = Tensor<B::InnerBackend, 2>> + '_ {
        self.layout.params.iter().map(move |p| {
            let w = self
                .weights
                .clone()
                .slice(p.range())
                .reshape(param_shape(&p.shape));
            if self.compute == FloatDType::F32 {
                w
            } else {
                w.cast(self.compute)
            }
        })
    }

    /// Fresh autodiff leaves over the master weights.
    fn leaves(&self) -> Vec<Tensor<B, 2>> {
        self.param_views()
            .map(|w| Tensor::<B, 2>::from_inner(w).require_grad())
            .collect()
    }
}

/// The step's loss and gradients reduced across ranks by `reducer` (if any), then applied.
/// Returns the loss (this rank's share, as [`Trainer::gradients`] reports it) and the stats.
pub fn train_step<B: FusedAutodiff>(
    trainer: &mut ResidentTrainer<B>,
    reducer: Option<&mut dyn GradReducer<B::InnerBackend>>,
    micro: &[MicroBatch],
    denominator: f64,
    step_tokens: u64,
) -> Result<(f64, StepStats)> {
    // Where the step's time goes: each phase ends with the device idle (one extra wait between
    // the backward passes and the reduction, which the NCCL path waits for anyway).
    let started = Instant::now();
    let (loss, grads) = trainer.gradients(micro, denominator);
    let _ = B::sync(trainer.device());
    // One value, from a device that is idle now.
    let loss: f64 = loss.into_scalar().elem();
    // As `step::poison`: a non-finite loss on this rank reaches every rank's norm.
    let grads = if loss.is_finite() {
        grads
    } else {
        grads.add_scalar(f64::NAN)
    };
    let backward = started.elapsed();
    let grads = match reducer {
        Some(r) => r.all_reduce_mean(grads)?,
        None => grads,
    };
    let reduced = started.elapsed();
    let stats = trainer.apply(grads, loss, step_tokens)?;
    let done = started.elapsed();
    tracing::info!(
        step = trainer.step,
        forward_backward_s = format!("{:.4}", backward.as_secs_f64()),
        all_reduce_s = format!("{:.4}", (reduced - backward).as_secs_f64()),
        clip_adamw_s = format!("{:.4}", (done - reduced).as_secs_f64()),
        "step phases"
    );
    Ok((loss, stats))
}

/// The ranges of the flat buffer that weight decay applies to (as `optimizer.rs` decides per
/// parameter), adjacent parameters merged: a few ranges per layer instead of a full-size mask.
fn decay_ranges(layout: &ParamLayout, spec: &OptimizerSpec) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for p in &layout.params {
        let decays = p.kind.decays(spec.decay_embeddings);
        if !decays || p.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == p.offset => last.end = p.range().end,
            _ => out.push(p.range()),
        }
    }
    out
}

/// `t`, leaving an empty tensor in its place: so that an op on it owns its memory uniquely.
fn take<B: Backend>(t: &mut Tensor<B, 1>, device: &B::Device) -> Tensor<B, 1> {
    std::mem::replace(t, empty(device))
}

fn empty<B: Backend>(device: &B::Device) -> Tensor<B, 1> {
    Tensor::empty([0], device)
}

/// `grad` (one parameter's, flat, in the compute dtype) added in f32 into `range` of the flat
/// buffer `acc`, in place: the sum is made in `grad`'s memory (or its f32 cast's), and written
/// into `acc`, whose only owner is this function.
fn accumulate<B: Backend>(
    acc: Tensor<B, 1>,
    range: Range<usize>,
    grad: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let sum = grad.cast(FloatDType::F32) + acc.clone().slice(range.clone());
    acc.slice_assign(range, sum)
}

#[cfg(test)]
mod tests;
