//! The one error type of `dapt-worker`; each variant names the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
}

impl WorkerError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let path = path.into();
        move |source| WorkerError::Io { path, source }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
