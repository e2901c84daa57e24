//! `dapt-coordinator`: the control plane of a dapt job and the `dapt` command line.
//!
//! So far it holds the `dapt` command line and [`plan`] (FLOPs, memory, GPU-hours, cost); the gRPC control loop, membership and ledger arrive
//! with the control-plane issue. The job file is parsed by [`dapt_proto::job`], which the
//! workers share.

pub mod control;
pub mod dashboard;
pub mod etcd;
pub mod guard;
pub mod launch;
pub mod ledger;
pub mod metrics;
pub mod net;
pub mod plan;
pub mod progress;
pub mod server;
pub mod stall_wire;
pub mod status_limit;

pub use dapt_proto::job as spec;
