//! The Llama model: its configuration, its parameter layout and its forward pass.

pub mod config;
pub mod llama;
pub mod params;

pub use config::LlamaConfig;
pub use llama::Llama;
pub use params::{ParamInfo, ParamKind, ParamLayout};
