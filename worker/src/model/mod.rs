//! The Llama model: its configuration, its parameter layout and its forward pass.

pub mod llama;
pub mod params;

pub use dapt_proto::model::{Family, LlamaConfig, RopeScaling};
pub use llama::Llama;
pub use params::{ParamInfo, ParamKind, ParamLayout};
