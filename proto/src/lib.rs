//! `dapt-proto`: the vocabulary the coordinator and the workers share. The worker never depends
//! on the coordinator crate nor the coordinator on the worker crate; they meet here and in
//! `dapt-corpus`.
//!
//! * [`checkpoint`] — what makes a directory a dapt checkpoint (its manifest), and removing one.
//! * [`device`] — the compute precision on GPUs (`--precision`).
//! * [`job`] — the job file (model, corpus, training, checkpoints), parsed and checked once.
//! * [`logging`] — the binaries' log output.
//! * [`model`] — a Llama model's shape, from and to a Hugging Face `config.json`.
//! * [`etcd`] — connecting to the job's etcd (membership backend).
//! * [`rpc`] — the gRPC protocol (`proto/dapt/v1/*.proto`), id newtypes and typed refusals.

pub mod checkpoint;
pub mod device;
pub mod etcd;
pub mod job;
pub mod logging;
pub mod model;
pub mod rpc;
