//! Training: the step (gradients, then clip + AdamW) on the host or resident on a device, the LR
//! schedule, evaluation, and the single-rank training loop.

pub mod engine;
pub mod eval;
pub mod optimizer;
pub mod resident;
pub mod run;
pub use dapt_proto::schedule;
pub mod step;
pub mod zero;

pub use step::{MicroBatch, StepStats, Trainer};
