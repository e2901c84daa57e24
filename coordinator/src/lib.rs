//! `dapt-coordinator`: the control plane of a dapt job and the `dapt` command line.
//!
//! So far it holds the job file ([`spec`]) and the `prepare` command; the gRPC control loop,
//! membership and ledger arrive with the control-plane issue.

pub mod spec;
