//! Placeholder: the norm ops' trait, filled in by issue 12's work.

use burn::tensor::backend::Backend;

/// The fused norm ops of a backend.
pub trait NormOps: Backend {}

impl<B: Backend> NormOps for B {}
