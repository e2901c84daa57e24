//! ZeRO stages 1 and 2 on the host trainer (`training.zero_stage`), over the flat buffer.
//!
//! Rank r of w owns the contiguous slice `collective::shard_range(total, w, r)` of the flat
//! parameter buffer: its [`super::optimizer::AdamW`] holds moments (and, on the CPU where the
//! weights are f32 already, the master weights are that slice of the weights) for that slice
//! only. A step:
//!
//! 1. forward/backward over the rank's micro-batches into a whole-size gradient buffer (the
//!    autodiff backward makes every parameter's gradient);
//! 2. the gradient's mean across ranks: stage 1 all-reduces it and keeps the owned slice,
//!    stage 2 reduce-scatters it (half the ring traffic; only the owned slice is reduced);
//! 3. the global norm from every rank's f64 sum of squares over its slice, exchanged bit-exact
//!    through an all-gather (every rank adds them in rank order, so all agree bitwise);
//! 4. clip and AdamW on the owned slice ([`Trainer::apply_owned`]);
//! 5. all-gather of the updated weights, so every rank holds the whole model again.
//!
//! The ring's reduce-scatter leaves each slice bitwise what its all-reduce leaves there, so the
//! gradients are those of stage 0; only the norm's f64 sum is grouped differently (by shard),
//! which moves it by rounding in the last bits.

use super::optimizer::sum_of_squares;
use super::step::poison;
use super::{MicroBatch, StepStats, Trainer};
use crate::collective::{shard_range, Collective, CollectiveError};
use crate::error::Result;

/// One training step at `stage` (1 or 2) over `collective` (None: one rank). See the module's
/// overview. Returns this rank's share of the loss and the step's stats.
///
/// # Errors
/// A collective failure ([`crate::error::WorkerError::Collective`]) or a non-finite step
/// ([`super::step::admit`]).
pub fn step(
    trainer: &mut Trainer,
    mut collective: Option<&mut dyn Collective>,
    stage: u8,
    micro: &[MicroBatch],
    denominator: f64,
    step_tokens: u64,
) -> Result<(f64, StepStats)> {
    let (loss, mut grads) = trainer.gradients(micro, denominator);
    poison(loss, &mut grads);
    if let Some(c) = collective.as_deref_mut() {
        if stage >= 2 {
            c.reduce_scatter_mean(&mut grads)?;
        } else {
            c.all_reduce_mean(&mut grads)?;
        }
    }
    // Only the owned slice is needed from here on: one copy of it, and the whole-size buffer
    // (scratch outside the slice under stage 2) is freed now.
    let mut grads = grads[trainer.optimizer.range.clone()].to_vec();
    let partial = sum_of_squares(&grads);
    let grad_norm = match collective.as_deref_mut() {
        Some(c) => total_of(c, partial)?,
        None => partial,
    }
    .sqrt();
    let stats = trainer.apply_owned(&mut grads, grad_norm, loss, step_tokens)?;
    drop(grads);
    if stats.applied {
        if let Some(c) = collective {
            c.all_gather(&mut trainer.weights)?;
        }
    }
    Ok((loss, stats))
}

/// The sum over ranks of each rank's `partial`, the same bits on every rank: the partials travel
/// as raw f64 bits through [`gather_u64`] and every rank adds them in rank order. Shared with the
/// resident engine's ZeRO step.
pub(crate) fn total_of(c: &mut dyn Collective, partial: f64) -> Result<f64, CollectiveError> {
    Ok(gather_u64(c, partial.to_bits())?
        .into_iter()
        .map(f64::from_bits)
        .sum())
}

/// Every rank's `value`, in rank order, on every rank: the values travel as two f32 words each
/// (their bits, not their numbers) through an all-gather, which copies bytes.
pub(crate) fn gather_u64(c: &mut dyn Collective, value: u64) -> Result<Vec<u64>, CollectiveError> {
    let world = c.world();
    let mut words = vec![0f32; 2 * world];
    let own = shard_range(words.len(), world, c.rank());
    words[own.start] = f32::from_bits(value as u32);
    words[own.start + 1] = f32::from_bits((value >> 32) as u32);
    c.all_gather(&mut words)?;
    Ok(words
        .chunks_exact(2)
        .map(|w| u64::from(w[0].to_bits()) | u64::from(w[1].to_bits()) << 32)
        .collect())
}
