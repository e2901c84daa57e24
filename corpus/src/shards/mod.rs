//! Token shards: writing them during `prepare`, and reading samples out of them.

pub mod reader;
pub mod writer;

pub use reader::{CorpusReader, TokenStream};
pub use writer::StreamWriter;
