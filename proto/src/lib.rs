//! `dapt-proto`: the vocabulary the coordinator and the workers share. The worker never depends
//! on the coordinator crate nor the coordinator on the worker crate; they meet here and in
//! `dapt-corpus`.
//!
//! * [`auth`] — proof of job membership by challenge-response, keyed from the job's token.
//! * [`checkpoint`] — what makes a directory a dapt checkpoint (its manifest), and removing one.
//! * [`device`] — the compute precision on GPUs (`--precision`).
//! * [`join`] — a worker's side of opening a session (challenge-response, `Join`), and
//!   `dapt status` requests that prove the token.
//! * [`job`] — the job file (model, corpus, training, checkpoints), parsed and checked once.
//! * [`logging`] — the binaries' log output.
//! * [`model`] — a Llama model's shape, from and to a Hugging Face `config.json`.
//! * [`etcd`] — connecting to the job's etcd (membership backend).
//! * [`schedule`] — the learning rate over a job's tokens, and the re-warm of an edited resume.
//! * [`rpc`] — the gRPC protocol (`proto/dapt/v1/*.proto`), id newtypes and typed refusals.
//! * [`tls`] — TLS for the coordinator's endpoints, server and client side.
//! * [`token`] — the job's token: token files, the least a coordinator accepts.

pub mod auth;
pub mod checkpoint;
pub mod device;
pub mod etcd;
pub mod identity;
pub mod job;
pub mod join;
pub mod logging;
pub mod model;
pub mod peer;
pub mod rpc;
pub mod schedule;
pub mod tls;
pub mod token;
