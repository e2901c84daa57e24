//! `dapt-corpus`: from raw domain and replay text to verified token shards, and the
//! deterministic global sample order that the distributed trainer reads them in.
//!
//! * [`prepare`] — `dapt prepare`: discover, read (txt, md, rst, jsonl, html; gzip), normalize
//!   (NFC), deduplicate, split held-out documents by hash, tokenize in parallel, write shards with
//!   SHA-256 checksums and a [`manifest`], and a [`report`].
//! * [`order`] — global sample `g` as a pure function of `(seed, g)`; steps and rank slices.
//! * [`shards`] — memory-mapped reading of any sample in O(1), after checksum verification.

pub mod error;
pub mod ingest;
pub mod manifest;
pub mod order;
pub mod prepare;
pub mod readers;
pub mod report;
pub mod shards;
pub mod spec;
pub mod tokenizer;

pub use error::{CorpusError, Result};
pub use manifest::{Manifest, VerifyMode};
pub use order::{micro_batches, rank_slice, step_range, MixtureChange, SampleOrder, SampleRef};
pub use prepare::{prepare, PrepareOptions, PrepareOutcome};
pub use shards::CorpusReader;
pub use spec::{CorpusSpec, Role, SourceSpec, TrainingPlan};
