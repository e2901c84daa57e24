//! Training: the step (gradients, then clip + AdamW), the LR schedule, evaluation, and the
//! single-rank training loop.

pub mod eval;
pub mod optimizer;
pub mod run;
pub mod schedule;
pub mod step;

pub use step::{MicroBatch, StepStats, Trainer};
