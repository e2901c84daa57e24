//! Placeholder: the attention ops' trait, filled in by issue 12's work.

use burn::tensor::backend::Backend;

/// The fused attention ops of a backend.
pub trait AttentionOps: Backend {}

impl<B: Backend> AttentionOps for B {}
