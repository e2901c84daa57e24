//! Device-resident training: the same step as [`Trainer`], with the master weights (f32), the
//! AdamW moments and the gradients living on the training device as Burn tensors, so a step
//! never copies the model between host and device.
//!
//! Once per step the f32 master weights are sliced (views, no copy) into one tensor per
//! parameter and cast to the compute dtype (a no-op for f32; one bf16 copy per step for mixed
//! precision, shared by the step's micro-batches); each micro-batch wraps them as fresh autodiff
//! leaves: Burn 0.21's autodiff gives wrong gradients when the leaves of an already-backpropagated
//! graph are reused (see `step.rs`), and a fresh leaf over the same tensor costs nothing. Each
//! parameter's gradient is added, in f32, into its range of one flat, uniquely owned buffer in
//! the [`ParamLayout`] order (the buffer a [`GradReducer`] all-reduces in place; at ZeRO stage 2
//! into buckets instead, see below) as soon as the backward pass has it, and then dropped. The
//! step clips
//! that buffer by its global norm (`fused::accumulate::sum_of_squares`, f64) and applies AdamW
//! with the same formula and operation order, in f32, as `optimizer.rs` (`fused::adamw`: one
//! kernel per run of decayed or undecayed parameters on a GPU, Burn's ops on the CPU).
//!
//! Memory: besides the four flat f32 buffers (weights, two moments, gradients) and, in mixed
//! precision, the bf16 compute copy of the weights, a step holds no full-size copy. The
//! weight-decay mask is a list of ranges, not a buffer; the AdamW update runs
//! on the moments and weights in place, with no full-size temporary on a GPU (on the CPU,
//! Burn's ops leave a few per run of parameters); the RoPE tables and the causal mask are made once per
//! micro-batch shape. The model-sized buffers (the flat f32 ones, the bf16 compute copy) are
//! allocated at their exact size (`memory::allocate_persistent`), not in pages of CubeCL's
//! largest pool (a quarter of the device), and dropping the trainer gives the device's free
//! pages back (`memory::release_freed_memory`). With `training.activation_checkpointing` the backward pass recomputes each
//! decoder block from its kept input ([`Llama::backward_recompute`]).
//!
//! ZeRO (`training.zero_stage` 1 or 2, more than one rank): the trainer comes from a host
//! [`Trainer`] that holds only its rank's optimizer shard ([`Trainer::shard`]), and keeps the
//! moments of that slice of the flat buffer (`owned`) only, so they fall as 1/w per rank. The step
//! ([`train_step`]) is the host path's (`train/zero.rs`) on device tensors: the gradient's mean
//! over the ranks, all-reduced and sliced (stage 1) or, at stage 2, reduced to its owners bucket
//! by bucket during the backward passes (`buckets.rs`) into the owned slice; the global norm
//! from every rank's sum of squares over its slice ([`GradReducer::total`], the same bits on
//! every rank); clip and AdamW on the slice; the updated weights all-gathered.
//! In f32 the weights are the master and stay whole. With a narrower compute dtype (bf16) the
//! f32 master weights are sharded as well (`master`: the owned slice only): AdamW updates that
//! slice, its cast goes into the whole bf16 compute copy the passes read (so the master weights
//! are no longer cast per micro-batch), and the bf16 copy is all-gathered.
//! [`ResidentTrainer::to_host_gathered`] gives a host trainer holding the same optimizer shard and
//! the whole f32 master (gathered to the host when sharded), which is what the sharded checkpoint
//! writes (`checkpoint/shards.rs`); a resumed shard of any split comes back through
//! [`ResidentTrainer::from_host`]: checkpoints are interchangeable with the host engine's.
//!
//! Generic over the backend: CUDA in production, and the CPU backend in the tests, which check
//! it against the host [`Trainer`].

mod buckets;
mod reducer;
mod step;

pub use buckets::BUCKET_ELEMENTS;
pub use reducer::{owned_part, GradReducer, HostStaged, OwnedPart};
pub use step::train_step;

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use dapt_proto::job::{OptimizerSpec, TrainingSpec};

use buckets::Buckets;

use super::schedule::LrSchedule;
use super::step::{admit, MicroBatch, StepStats, Trainer};
use crate::collective::CollectiveError;
use crate::error::Result;
use crate::fused::accumulate::sum_of_squares;
use crate::fused::adamw::{adamw, AdamwStep};
use crate::fused::{AccumulateOps, FusedAutodiff};
use crate::memory::{allocate_persistent, zeros_persistent};
use crate::model::llama::param_shape;
use crate::model::llama::Constants;
use crate::model::{Llama, LlamaConfig, ParamLayout};

/// A rank's share of the loss (one element) and its f32 gradients (flat), on the device.
pub type LossAndGradients<B> = (Tensor<B, 1>, Tensor<B, 1>);

/// Weights, AdamW state and the schedule's position, on `B`'s device.
pub struct ResidentTrainer<B: FusedAutodiff> {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    training: TrainingSpec,
    /// The weights the passes read, flat, in layout order, whole on every rank: the f32 master
    /// weights, or when `master` holds them, their copy in the compute dtype.
    weights: Tensor<B::InnerBackend, 1>,
    /// Under ZeRO with a compute dtype narrower than f32 (bf16): the f32 master weights of
    /// `owned` only; `weights` is then the compute copy, all-gathered every step.
    master: Option<Tensor<B::InnerBackend, 1>>,
    /// The slice of the flat buffer this rank's AdamW state covers: all of it, or under ZeRO
    /// `shard_range(total, world, rank)`.
    owned: Range<usize>,
    /// AdamW's moments of `owned`.
    m: Tensor<B::InnerBackend, 1>,
    v: Tensor<B::InnerBackend, 1>,
    /// Where weight decay applies within `owned` (offsets into the slice; adjacent parameters
    /// merged).
    decay: Vec<Range<usize>>,
    /// The RoPE tables and mask of the last micro-batch shape.
    constants: Option<Constants<B::InnerBackend>>,
    /// Optimizer steps taken (bias correction).
    optimizer_steps: u64,
    /// ZeRO stage 2: the most gradient elements reduced at once ([`BUCKET_ELEMENTS`]).
    bucket_elements: usize,
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
    /// Moves `host` (a fresh or resumed trainer, whole or holding one ZeRO shard of the
    /// optimizer state) to `device`; the passes run in `compute` (f32, or bf16 with f32 master
    /// weights).
    pub fn from_host(host: Trainer, compute: FloatDType, device: &B::Device) -> Self {
        let upload = |v: Vec<f32>, dtype: FloatDType| upload_exact(v, dtype, device);
        let owned = host.optimizer.range.clone();
        let decay = decay_ranges(&host.layout, &host.optimizer.spec, &owned);
        let shard = owned != (0..host.layout.total);
        let f32 = FloatDType::F32;
        let (weights, master) = if shard && compute != f32 {
            let master = upload(host.weights[owned.clone()].to_vec(), f32);
            (upload(host.weights, compute), Some(master))
        } else {
            (upload(host.weights, f32), None)
        };
        ResidentTrainer {
            config: host.config,
            layout: host.layout,
            training: host.training,
            weights,
            master,
            owned,
            m: upload(host.optimizer.m, f32),
            v: upload(host.optimizer.v, f32),
            decay,
            constants: None,
            optimizer_steps: host.optimizer.t,
            bucket_elements: BUCKET_ELEMENTS,
            schedule: host.schedule,
            step: host.step,
            tokens: host.tokens,
            skipped_steps: host.skipped_steps,
            compute,
            device: device.clone(),
        }
    }

    /// A host [`Trainer`] with this state (for checkpoints): downloads the weights and the
    /// moments, which cover the same slice as here (a ZeRO shard stays one).
    ///
    /// # Panics
    /// When this rank holds only its slice of the f32 master weights (ZeRO with bf16 compute):
    /// use [`ResidentTrainer::to_host_gathered`].
    pub fn to_host(&self) -> Trainer {
        assert!(
            self.master.is_none(),
            "the f32 master weights are sharded: gather them (to_host_gathered)"
        );
        self.host_with(download(&self.weights))
    }

    /// [`ResidentTrainer::to_host`] that also works when the f32 master weights are sharded:
    /// every rank's slice comes to the host through `reducer` (no model-sized device buffer).
    /// Every rank must call it at the same step.
    ///
    /// # Errors
    /// The collective's, or a sharded master without a reducer.
    pub fn to_host_gathered(
        &self,
        reducer: Option<&mut dyn GradReducer<B::InnerBackend>>,
    ) -> std::result::Result<Trainer, CollectiveError> {
        let weights =
            match (&self.master, reducer) {
                (None, _) => download(&self.weights),
                (Some(master), Some(r)) => r.gather_to_host(master.clone(), self.layout.total)?,
                (Some(_), None) => return Err(CollectiveError::Config(
                    "the f32 master weights are sharded and there is no collective to gather them"
                        .into(),
                )),
            };
        Ok(self.host_with(weights))
    }

    /// A host trainer with `weights` (whole, f32) and this trainer's moments and position.
    fn host_with(&self, weights: Vec<f32>) -> Trainer {
        let mut host = Trainer::new_sharded(
            self.config.clone(),
            weights,
            &self.training,
            self.owned.clone(),
        );
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
    ) -> LossAndGradients<B::InnerBackend> {
        // One flat buffer, uniquely owned: what the all-reduce writes into in place.
        let device = self.device.clone();
        let total = self.layout.total;
        let mut grads = zeros_persistent::<B::InnerBackend>(total, &device);
        let passes: Vec<_> = micro.iter().map(|mb| (mb, denominator)).collect();
        let loss = self.passes(&passes, &mut |range, g| {
            if let Some(g) = g {
                grads = accumulate(take(&mut grads, &device), range, g);
            }
        });
        (loss, grads)
    }

    /// ZeRO stage 2: [`ResidentTrainer::gradients`] with the gradients reduced across the ranks
    /// bucket by bucket as the backward passes make them (`buckets.rs`), so that only this
    /// rank's slice of them is ever held whole. Returns this rank's share of the loss and the
    /// mean across ranks of the gradients of `owned` (f32, `owned.len()` elements).
    ///
    /// Every rank reduces the same buckets in the same order once per micro-batch, so every
    /// rank makes as many passes as the rank with the most micro-batches (their counts are
    /// exchanged first; a global batch need not divide by the world): a rank with fewer repeats
    /// its first micro-batch (a window of token 0 if it has none) with the loss divided by
    /// infinity, whose gradients are exact zeros, while the others make their last passes.
    ///
    /// # Errors
    /// The first collective failure (the passes run to the end regardless).
    pub fn gradients_sharded(
        &mut self,
        micro: &[MicroBatch],
        denominator: f64,
        reducer: &mut dyn GradReducer<B::InnerBackend>,
    ) -> std::result::Result<LossAndGradients<B::InnerBackend>, CollectiveError> {
        let counts = reducer.gather_u64(micro.len() as u64)?;
        let rounds = counts.into_iter().max().unwrap_or(0) as usize;
        let idle = match micro.first() {
            Some(mb) => mb.clone(),
            None => MicroBatch {
                ids: vec![0; self.training.seq_len as usize + 1],
                samples: 1,
            },
        };
        let passes: Vec<_> = (0..rounds)
            .map(|i| match micro.get(i) {
                Some(mb) => (mb, denominator),
                None => (&idle, f64::INFINITY),
            })
            .collect();
        let (total, owned, device) = (self.layout.total, self.owned.clone(), self.device.clone());
        let mut buckets = Buckets::new(reducer, total, owned, self.bucket_elements, &device);
        let loss = self.passes(&passes, &mut |range, g| match g {
            Some(g) => buckets.push(range, g),
            None => buckets.flush(),
        });
        Ok((loss, buckets.finish()?))
    }

    /// Forward and backward over each micro-batch of `passes`, each token's loss divided by the
    /// denominator beside it; every parameter's gradient goes to `sink` with its range in the
    /// flat buffer, flat, in the compute dtype, as soon as the backward pass has it, and `None`
    /// after each pass. Returns the sum of the scaled losses (one element, on the device).
    fn passes(
        &mut self,
        passes: &[(&MicroBatch, f64)],
        sink: &mut dyn FnMut(Range<usize>, Option<Tensor<B::InnerBackend, 1>>),
    ) -> Tensor<B::InnerBackend, 1> {
        let width = self.training.seq_len as usize + 1;
        let mut loss: Option<Tensor<B::InnerBackend, 1>> = None;
        // The weights in the compute dtype, once per step rather than once per micro-batch:
        // with bf16 compute and whole f32 master weights (stage 0 and 1) this is the step's one
        // cast, alive while the passes run (as each pass's copy was); otherwise views.
        let views: Vec<Tensor<B::InnerBackend, 2>> = self.param_views().collect();
        for &(mb, denominator) in passes {
            debug_assert_eq!(mb.ids.len(), mb.samples * width);
            let consts = self.constants(mb.samples, width - 1);
            let ids: Vec<i64> = mb.ids.iter().map(|&i| i as i64).collect();
            let ids = TensorData::new(ids, [mb.samples, width]);
            let layout = &self.layout;
            let mut add =
                |i: usize, g: Tensor<B::InnerBackend, 1>| sink(layout.params[i].range(), Some(g));
            let value = if self.training.activation_checkpointing {
                let model = Llama::<B::InnerBackend>::from_params(
                    &self.config,
                    views.clone(),
                    &self.device,
                );
                let ids = Tensor::<B::InnerBackend, 2, Int>::from_data(ids, &self.device);
                model.backward_recompute::<B>(ids, denominator, &consts, &mut add)
            } else {
                // Fresh autodiff leaves for every pass (see `step.rs`), over the same tensors.
                let leaves = views
                    .iter()
                    .map(|w| Tensor::<B, 2>::from_inner(w.clone()).require_grad())
                    .collect();
                let model = Llama::<B>::from_params(&self.config, leaves, &self.device);
                let ids = Tensor::<B, 2, Int>::from_data(ids, &self.device);
                let scaled = model
                    .nll_sum_with(ids, &Constants::from_inner(&consts))
                    .div_scalar(denominator);
                let value = scaled.clone().inner();
                let mut g = scaled.backward();
                model.drain_gradients(&mut g, &mut add);
                value
            };
            sink(0..0, None);
            loss = Some(match loss {
                Some(l) => l + value,
                None => value,
            });
        }
        loss.unwrap_or_else(|| Tensor::zeros([1], &self.device))
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

    /// The slice of the flat buffer this rank's optimizer state covers (all of it without ZeRO).
    pub fn owned(&self) -> Range<usize> {
        self.owned.clone()
    }

    /// Bytes of f32 gradients a step holds whole: this rank's slice under ZeRO stage 2 (the
    /// rest leaves in buckets of at most [`BUCKET_ELEMENTS`]), else the whole flat buffer.
    pub fn gradient_bytes(&self) -> usize {
        let elements = if self.training.zero_stage >= 2 {
            self.owned.len()
        } else {
            self.layout.total
        };
        elements * std::mem::size_of::<f32>()
    }

    /// Sets the most gradient elements ZeRO stage 2 reduces at once (tests: small buckets
    /// that cut parameters).
    #[cfg(test)]
    pub(crate) fn set_bucket_elements(&mut self, elements: usize) {
        self.bucket_elements = elements;
    }

    /// Bytes of AdamW state on the device: the two f32 moments of the owned slice (no decay
    /// mask: ranges), 8 per owned parameter, 1/w of the whole under ZeRO.
    pub fn optimizer_bytes(&self) -> usize {
        (self.m.dims()[0] + self.v.dims()[0]) * std::mem::size_of::<f32>()
    }

    /// Bytes of f32 master weights on the device: the owned slice's when they are sharded
    /// (ZeRO in bf16), else the whole buffer's.
    pub fn master_bytes(&self) -> usize {
        let elements = self
            .master
            .as_ref()
            .map_or(self.layout.total, |m| m.dims()[0]);
        elements * std::mem::size_of::<f32>()
    }

    /// Whether this rank holds one ZeRO shard of the optimizer state rather than all of it.
    fn is_shard(&self) -> bool {
        self.owned != (0..self.layout.total)
    }

    /// Clips `grads` (the whole buffer, already reduced across ranks) by their global norm and
    /// takes an AdamW step over `step_tokens`, unless `loss` (this rank's share) or the norm is
    /// not finite (see [`admit`]). Waits for the device once, to read the norm.
    pub fn apply(
        &mut self,
        grads: Tensor<B::InnerBackend, 1>,
        loss: f64,
        step_tokens: u64,
    ) -> Result<StepStats> {
        // The parameters lie back to back: the buffer's squares are the parameters'.
        let grad_norm = sum_of_squares(grads.clone()).sqrt();
        let grads = if self.is_shard() {
            grads.slice(self.owned.clone())
        } else {
            grads
        };
        self.apply_owned(grads, grad_norm, loss, step_tokens)
    }

    /// [`ResidentTrainer::apply`] for the owned slice: `grads` are the reduced gradients of
    /// `owned` only, `grad_norm` the global norm of the whole buffer. Only the owned weights
    /// change; under ZeRO the caller all-gathers them.
    pub fn apply_owned(
        &mut self,
        grads: Tensor<B::InnerBackend, 1>,
        grad_norm: f64,
        loss: f64,
        step_tokens: u64,
    ) -> Result<StepStats> {
        let spec: OptimizerSpec = self.training.optimizer;
        let lr = self.schedule.lr(self.tokens);
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
        let grad_scale = if spec.grad_clip > 0.0 && grad_norm > spec.grad_clip {
            (spec.grad_clip / (grad_norm + 1e-6)) as f32
        } else {
            1.0
        };
        self.optimizer_steps += 1;
        let step = AdamwStep::new(&spec, lr, self.optimizer_steps as i32, grad_scale);
        let decay = (lr * spec.weight_decay) as f32;
        // In place (`fused::adamw`: one kernel per run of decayed or undecayed parameters on a
        // GPU): the moments and the weights are taken out of `self`, not cloned. Under ZeRO the
        // owned slice is updated on its own (from the sharded f32 master when there is one,
        // else inside the whole buffer) and every other rank's slice comes with the all-gather.
        let device = self.device.clone();
        let (mut m, mut v) = (take(&mut self.m, &device), take(&mut self.v, &device));
        let sharded_master = self.master.take();
        let had_master = sharded_master.is_some();
        let (mut w, offset) = match sharded_master {
            Some(master) => (master, 0),
            None if self.is_shard() => (take(&mut self.weights, &device), self.owned.start),
            None => (take(&mut self.weights, &device), 0),
        };
        for (range, decays) in segments(self.owned.len(), &self.decay) {
            let step = AdamwStep {
                decay: if decays { decay } else { 0.0 },
                ..step
            };
            (w, m, v) = adamw(w, offset, m, v, &grads, range, step);
        }
        drop(grads);
        if had_master {
            // The compute copy of the owned slice, cast once per step, piece by piece (of a
            // gradient bucket's size) into the whole copy, in place: no transient the size of
            // the slice.
            let mut all = take(&mut self.weights, &device);
            let (n, piece) = (w.dims()[0], self.bucket_elements);
            for start in (0..n).step_by(piece) {
                let end = (start + piece).min(n);
                let at = self.owned.start + start;
                let piece = w.clone().slice(start..end).cast(self.compute);
                all = all.slice_assign(at..at + (end - start), piece);
            }
            self.weights = all;
            self.master = Some(w);
        } else {
            self.weights = w;
        }
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
            if self.compute == FloatDType::F32 || self.master.is_some() {
                // Already in the compute dtype.
                w
            } else {
                w.cast(self.compute)
            }
        })
    }
}

/// The trainer's device buffers are freed, then every free page of the device's pools on this
/// thread's stream goes back to the driver (`memory::release_freed_memory`): in the agent each
/// generation trains on its own thread, whose stream's pools would otherwise keep the last
/// generation's whole model and optimizer state while the next one allocates its own.
impl<B: FusedAutodiff> Drop for ResidentTrainer<B> {
    fn drop(&mut self) {
        let device = self.device.clone();
        for t in [&mut self.weights, &mut self.m, &mut self.v] {
            drop(take(t, &device));
        }
        self.master = None;
        self.constants = None;
        crate::memory::release_freed_memory::<B::InnerBackend>(&device);
    }
}

/// `0..len` cut at the edges of `decay` (sorted, disjoint ranges within it): each piece with
/// whether weight decay applies to it, in order.
fn segments(len: usize, decay: &[Range<usize>]) -> Vec<(Range<usize>, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in decay {
        if at < r.start {
            out.push((at..r.start, false));
        }
        if r.start < r.end {
            out.push((r.clone(), true));
        }
        at = r.end;
    }
    if at < len {
        out.push((at..len, false));
    }
    out
}

/// The ranges of `owned` that weight decay applies to (as `optimizer.rs` decides per
/// parameter), as offsets into that slice, adjacent parameters merged: a few ranges per layer
/// instead of a full-size mask.
fn decay_ranges(
    layout: &ParamLayout,
    spec: &OptimizerSpec,
    owned: &Range<usize>,
) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for p in &layout.params {
        let decays = p.kind.decays(spec.decay_embeddings);
        let r = p.range();
        let (start, end) = (r.start.max(owned.start), r.end.min(owned.end));
        if !decays || start >= end {
            continue;
        }
        let part = start - owned.start..end - owned.start;
        match out.last_mut() {
            Some(last) if last.end == part.start => last.end = part.end,
            _ => out.push(part),
        }
    }
    out
}

/// `host` on the device in `dtype`, flat, allocated at its exact size (`allocate_persistent`).
/// A narrower dtype is cast on the device (the rounding of the step's own casts) piece by
/// piece of [`dapt_proto::model::ADAMW_CHUNK_ELEMENTS`] into that buffer, so the transients
/// are one piece in f32 and in `dtype`: never a whole f32 copy beside the compute copy (7B's
/// would be 25 GiB, above an 80 GB GPU's largest allocator page) nor a second compute copy.
fn upload_exact<B: Backend>(host: Vec<f32>, dtype: FloatDType, device: &B::Device) -> Tensor<B, 1> {
    let n = host.len();
    if dtype == FloatDType::F32 {
        // A copy from the host, no kernel.
        return allocate_persistent::<B, _>(device, || {
            Tensor::from_data(TensorData::new(host, [n]), device)
        });
    }
    let mut out = allocate_persistent::<B, _>(device, || {
        Tensor::<B, 1>::empty([n], (device, dtype.into()))
    });
    let mut at = 0;
    for piece in host.chunks(dapt_proto::model::ADAMW_CHUNK_ELEMENTS) {
        let len = piece.len();
        let piece = Tensor::<B, 1>::from_data(TensorData::new(piece.to_vec(), [len]), device);
        out = out.slice_assign(at..at + len, piece.cast(dtype));
        at += len;
    }
    out
}

/// A flat f32 tensor's values on the host.
fn download<B: Backend>(t: &Tensor<B, 1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .into_vec::<f32>()
        .expect("master weights and moments are f32")
}

/// `t`, leaving an empty tensor in its place: so that an op on it owns its memory uniquely.
fn take<B: Backend>(t: &mut Tensor<B, 1>, device: &B::Device) -> Tensor<B, 1> {
    std::mem::replace(t, empty(device))
}

fn empty<B: Backend>(device: &B::Device) -> Tensor<B, 1> {
    Tensor::empty([0], device)
}

/// `grad` (one parameter's, flat, in the compute dtype) added in f32 into `range` of the flat
/// buffer `acc`, in place when `acc` is uniquely owned (this function's caller takes it out of
/// its owner): the fused op of `fused::accumulate` (one kernel on a GPU).
fn accumulate<B: AccumulateOps>(
    acc: Tensor<B, 1>,
    range: Range<usize>,
    grad: Tensor<B, 1>,
) -> Tensor<B, 1> {
    debug_assert_eq!(range.len(), grad.dims()[0]);
    crate::fused::accumulate::accumulate(acc, range.start, grad)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod zero_tests;
