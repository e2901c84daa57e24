//! The one error type of `dapt-worker`; each variant names the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    // The OS error is a plain field, not the `source()`: anyhow's `{:#}` printed it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Corpus(#[from] dapt_corpus::CorpusError),
    #[error(transparent)]
    Gguf(#[from] crate::import::gguf::GgufError),
    #[error("{0}")]
    Invalid(String),
    /// The training device is missing or unusable (no GPU, no driver, no NVRTC, no headers).
    #[error("device: {0}")]
    Device(String),
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    /// A training step whose loss or global gradient norm is not finite, under
    /// `training.nonfinite: stop` or past `training.max_skipped_steps`. The step was not applied.
    #[error("step {step}: {}; the step was not applied and training stops ({})", not_finite(.loss, .grad_norm), stop_reason(.skipped, .max_skipped))]
    NonFiniteStep {
        /// The step's index, as the step log lines number it.
        step: u64,
        /// This rank's share of the step's loss.
        loss: f64,
        /// The global gradient norm, after the reduction.
        grad_norm: f64,
        /// Steps skipped before this one.
        skipped: u64,
        /// `training.max_skipped_steps` (0 under `nonfinite: stop`).
        max_skipped: u64,
    },
    /// A held-out evaluation whose perplexity is not finite: a mean NLL that is not (weights
    /// whose activations overflow, or a diverged model), or one above ln(f64::MAX) = 709.78
    /// nats, whose `exp` overflows (a model far worse than a uniform guess, ln V nats). It is an
    /// error, never a report of null (JSON has no infinity) nor a forgetting-guard baseline of
    /// infinity. `step` is the training step (`None` for `dapt eval`).
    #[error("held-out evaluation of source `{source_name}`{}: the mean NLL over {tokens} tokens is {mean_nll}, so its perplexity (exp of it) is not finite (NaN, or a mean NLL above 709.78 nats, where exp overflows); the model's logits overflow or are NaN on these windows, or it predicts them far worse than a uniform guess", at_step(.step))]
    NonFiniteEval {
        source_name: String,
        step: Option<u64>,
        mean_nll: f64,
        tokens: u64,
    },
    /// A step whose global gradient norm is exactly zero at a positive loss: the model no longer
    /// learns (saturated outputs, weights decayed away). Fatal, never skipped.
    #[error("step {step}: the gradient is exactly zero at a loss of {loss}: the model no longer learns (its outputs saturated or its weights decayed away: a learning rate or weight decay far too large?); the step was not applied and training stops")]
    ZeroGradient { step: u64, loss: f64 },
    /// The model after step `step` gives a mean NLL (nats per token) on a training window that
    /// is not finite or is above 709.78 (where `exp` overflows; a uniform guess is ln V): the
    /// step diverged into weights that are finite but broken (1e14 after an lr typo). Checked
    /// before that step's checkpoint is written, so it is never committed and the earlier ones
    /// are not pruned for it; a finite-weights check alone let such a checkpoint push out the
    /// last good one (an audit).
    #[error("the model after step {step} gives a mean NLL of {mean_nll} nats per token on a training window (not finite, or above 709.78, where its perplexity overflows): training diverged (a learning rate or weight decay far too large?); its checkpoint is not written, and the earlier ones are kept")]
    Diverged { step: u64, mean_nll: f64 },
    /// A tensor holding NaN or infinite values, which dapt never writes (a checkpoint, an
    /// export) and never loads.
    #[error("{path}: tensor `{tensor}`: {bad} of {len} values are not finite (NaN or infinite){}", more_tensors(.others))]
    NonFiniteTensor {
        path: PathBuf,
        tensor: String,
        bad: usize,
        len: usize,
        /// Further tensors that hold non-finite values.
        others: usize,
    },
}

fn not_finite(loss: &f64, grad_norm: &f64) -> String {
    if loss.is_finite() {
        format!("the gradient norm is {grad_norm}")
    } else {
        format!("the loss is {loss}")
    }
}

fn stop_reason(skipped: &u64, max_skipped: &u64) -> String {
    if *max_skipped == 0 {
        "training.nonfinite: stop; a learning rate far too high is the usual cause, and every \
         checkpoint written holds finite weights"
            .into()
    } else if skipped < max_skipped {
        format!(
            "the {skipped} steps before it were all skipped too: a job that trained nothing does \
             not end as finished"
        )
    } else {
        format!("{skipped} steps were skipped already, training.max_skipped_steps is {max_skipped}")
    }
}

fn at_step(step: &Option<u64>) -> String {
    step.map(|s| format!(" at step {s}")).unwrap_or_default()
}

fn more_tensors(others: &usize) -> String {
    match *others {
        0 => String::new(),
        n => format!(", and {n} more tensors hold non-finite values"),
    }
}

impl WorkerError {
    /// Whether the same work, retried from the same checkpoint, fails the same way: a
    /// non-finite step, evaluation or tensor is a property of the job and its data, not of a
    /// machine; a full (or over-quota, or read-only) file system stays so while the job trains
    /// the same steps again to write the same checkpoint (three more checkpoint intervals were
    /// trained into a full disk before the job failed; a new user's walk-through).
    pub fn recurs_on_retry(&self) -> bool {
        match self {
            WorkerError::NonFiniteStep { .. }
            | WorkerError::NonFiniteTensor { .. }
            | WorkerError::NonFiniteEval { .. }
            | WorkerError::Diverged { .. }
            | WorkerError::ZeroGradient { .. } => true,
            // The job's model and its corpus disagree: every generation met it again, four
            // "recoveries" and 15 s before the job failed (a new user's walk-through).
            WorkerError::Corpus(dapt_corpus::CorpusError::ModelTokenizer { .. }) => true,
            WorkerError::Io { error, .. } => matches!(
                error.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS)
            ),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let path = path.into();
        move |error| WorkerError::Io { path, error }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A full, over-quota or read-only file system fails the job at once: a retry trains the
    /// same steps again to write the same checkpoint into it (three more checkpoint intervals
    /// before; a new user's walk-through). Other I/O errors may pass.
    #[test]
    fn a_full_or_read_only_file_system_recurs_on_retry() {
        let io = |code| WorkerError::Io {
            path: "ck/.tmp-step-x/model.safetensors".into(),
            error: std::io::Error::from_raw_os_error(code),
        };
        for code in [libc::ENOSPC, libc::EDQUOT, libc::EROFS] {
            assert!(io(code).recurs_on_retry(), "{code}");
        }
        for code in [libc::EIO, libc::ENOENT, libc::ECONNRESET] {
            assert!(!io(code).recurs_on_retry(), "{code}");
        }
    }
}
