//! Which job a durable state belongs to: `dapt_proto::identity`, shared with `dapt train`.

pub use dapt_proto::identity::*;
