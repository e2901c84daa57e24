//! Placeholder: the loss ops' trait, filled in by issue 12's work.

use burn::tensor::backend::Backend;

/// The fused loss ops of a backend.
pub trait LossOps: Backend {}

impl<B: Backend> LossOps for B {}
