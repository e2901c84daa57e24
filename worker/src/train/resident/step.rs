//! One step of the resident engine: forward and backward, the reduction across ranks (the
//! all-reduce of stages 0 and 1, or stage 2's bucket reduces during the backward passes; under
//! ZeRO the norm exchange and all-gather), clipping and AdamW.

use std::time::Instant;

use burn::tensor::ElementConversion;

use super::{take, GradReducer, ResidentTrainer};
use crate::collective::shard_range;
use crate::error::{Result, WorkerError};
use crate::fused::FusedAutodiff;
use crate::memory::DeviceMemory;
use crate::train::step::{MicroBatch, StepStats};

/// Waits for the device (so that the step's phases are timed apart) and reads the loss.
fn settle<B: FusedAutodiff>(
    trainer: &ResidentTrainer<B>,
    loss: burn::tensor::Tensor<B::InnerBackend, 1>,
) -> f64 {
    let _ = B::sync(trainer.device());
    loss.into_scalar().elem()
}

/// The step's loss and gradients reduced across ranks by `reducer` (if any), then applied.
/// Under `training.zero_stage` 1 or 2 with a reducer the step is ZeRO's (see the module's
/// overview in `resident/mod.rs`): the trainer must hold the reducer's shard ([`crate::train::Trainer::shard`] before
/// [`ResidentTrainer::from_host`]). Returns the loss (this rank's share, as
/// [`crate::train::Trainer::gradients`] reports it) and the stats.
///
/// # Errors
/// A collective failure ([`WorkerError::Collective`]: the generation is over, and so is this
/// trainer, whose weights an all-gather that failed midway leaves empty), a non-finite step
/// ([`crate::train::step::admit`]), or a shard that is not the reducer's ([`WorkerError::Invalid`]).
pub fn train_step<B: FusedAutodiff>(
    trainer: &mut ResidentTrainer<B>,
    reducer: Option<&mut dyn GradReducer<B::InnerBackend>>,
    micro: &[MicroBatch],
    denominator: f64,
    step_tokens: u64,
) -> Result<(f64, StepStats)> {
    let stage = trainer.training.zero_stage;
    // Which slice this rank's optimizer state must cover: the reducer's under ZeRO.
    let split = reducer
        .as_ref()
        .filter(|_| stage > 0)
        .map(|r| (r.rank(), r.world()));
    let expected = match split {
        Some((rank, world)) => shard_range(trainer.layout.total, world, rank),
        None => 0..trainer.layout.total,
    };
    if trainer.owned != expected {
        return Err(WorkerError::Invalid(match split {
            Some((rank, world)) => format!(
                "zero_stage {stage}: this trainer holds the optimizer state of {:?} of the flat buffer, rank {rank} of {world} owns {expected:?}",
                trainer.owned
            ),
            None => format!(
                "this trainer holds the optimizer state of {:?} of the flat buffer only, but the step has no ZeRO collective (zero_stage {stage})",
                trainer.owned
            ),
        }));
    }
    // Where the step's time goes: each phase ends with the device idle (one extra wait between
    // the backward passes and the reduction, which the NCCL path waits for anyway). Under
    // stage 2 the reduction runs bucket by bucket inside the backward passes, and its time
    // counts there.
    let started = Instant::now();
    let (stats, backward, reduced, applied) = match reducer {
        Some(r) if stage > 0 => {
            let (loss, owned, backward) = if stage >= 2 {
                let (loss, owned) = trainer.gradients_sharded(micro, denominator, &mut *r)?;
                (settle::<B>(trainer, loss), owned, started.elapsed())
            } else {
                let (loss, grads) = trainer.gradients(micro, denominator);
                let loss = settle::<B>(trainer, loss);
                let backward = started.elapsed();
                let owned = r.all_reduce_mean(grads)?.slice(expected.clone());
                (loss, owned, backward)
            };
            // As `step::poison`: a non-finite loss on this rank reaches every rank's norm.
            let partial = if loss.is_finite() {
                crate::fused::accumulate::sum_of_squares(owned.clone())
            } else {
                f64::NAN
            };
            let grad_norm = r.total(partial)?.sqrt();
            let reduced = started.elapsed();
            let stats = trainer.apply_owned(owned, grad_norm, loss, step_tokens)?;
            let applied = started.elapsed();
            if stats.applied {
                let device = trainer.device.clone();
                trainer.weights = r.all_gather(take(&mut trainer.weights, &device))?;
            }
            ((loss, stats), backward, reduced, applied)
        }
        reducer => {
            let (loss, grads) = trainer.gradients(micro, denominator);
            let loss = settle::<B>(trainer, loss);
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
            ((loss, stats), backward, reduced, done)
        }
    };
    let (loss, stats) = stats;
    let done = started.elapsed();
    // The allocator's view after the step (a GPU's; none on the CPU): what the tensors alive
    // take, and what its pools keep on the device (their high-water mark, roughly: pages are
    // kept for reuse), beside nvidia-smi's figure.
    let memory = <B::InnerBackend as DeviceMemory>::device_memory(&trainer.device);
    let mib = |b: u64| format!("{:.0}", b as f64 / 1048576.0);
    tracing::info!(
        step = trainer.step,
        zero_stage = stage,
        device_in_use_mib = memory.map(|m| mib(m.in_use)),
        device_reserved_mib = memory.map(|m| mib(m.reserved)),
        forward_backward_s = backward.as_secs_f64(),
        all_reduce_s = (reduced - backward).as_secs_f64(),
        clip_adamw_s = (applied - reduced).as_secs_f64(),
        all_gather_s = (done - applied).as_secs_f64(),
        "step phases"
    );
    Ok((loss, stats))
}
