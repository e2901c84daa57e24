//! The gRPC protocol (`proto/dapt/v1/coordinator.proto`, package `dapt.v1`): generated messages,
//! client and server, the id newtypes both sides use, and refusals as typed errors that survive
//! the trip through a `tonic::Status`.

use std::fmt;

tonic::include_proto!("dapt.v1");

pub use coordinator_client::CoordinatorClient;
pub use coordinator_server::{Coordinator, CoordinatorServer};

/// The metadata key of a refusal's [`ErrorCode`] in a `tonic::Status`.
pub const ERROR_CODE_KEY: &str = "dapt-error";

/// This build's software version; a worker and a coordinator work together when the major and
/// minor versions match.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether software `a` and `b` (semver) can work together: same major and minor.
pub fn compatible(a: &str, b: &str) -> bool {
    let major_minor = |v: &str| {
        let mut parts = v.split('.');
        Some((
            parts.next()?.parse::<u64>().ok()?,
            parts.next()?.parse::<u64>().ok()?,
        ))
    };
    matches!((major_minor(a), major_minor(b)), (Some(x), Some(y)) if x == y)
}

/// The most bytes of free text (an error message) a worker puts in one message: the coordinator
/// reads no message over 1 MiB (`dapt_coordinator::server::MAX_MESSAGE`), and a panic's message
/// could in principle be anything. An error chain is a few hundred bytes.
pub const MAX_TEXT: usize = 16 * 1024;

/// `text` cut to at most [`MAX_TEXT`] bytes, at a character boundary, saying how much was cut.
pub fn bounded_text(mut text: String) -> String {
    if text.len() <= MAX_TEXT {
        return text;
    }
    // Room for the note.
    let mut end = MAX_TEXT - 32;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" ... ({cut} bytes cut)"));
    text
}

/// A worker's id within its job.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A generation of the job: the fencing token of one set of members and ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A refusal: what was refused and why, with its code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", code.as_str_name())]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The gRPC status that carries this refusal.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let grpc = match self.code {
            ErrorCode::WrongToken => Code::Unauthenticated,
            ErrorCode::OtherJob | ErrorCode::IncompatibleVersion | ErrorCode::JobOver => {
                Code::FailedPrecondition
            }
            ErrorCode::DuplicateWorker => Code::AlreadyExists,
            ErrorCode::StaleGeneration => Code::Aborted,
            ErrorCode::NotJoined => Code::FailedPrecondition,
            ErrorCode::Invalid | ErrorCode::Unspecified => Code::InvalidArgument,
        };
        let mut status = tonic::Status::new(grpc, self.message.clone());
        if let Ok(value) = self.code.as_str_name().parse() {
            status.metadata_mut().insert(ERROR_CODE_KEY, value);
        }
        status
    }

    /// The refusal in `status`, if it is one. Its message comes from the network: control
    /// characters are escaped ([`crate::auth::printable`]), so that printing it forges no log
    /// line and sends no terminal escape.
    pub fn from_status(status: &tonic::Status) -> Option<Self> {
        let code = status.metadata().get(ERROR_CODE_KEY)?.to_str().ok()?;
        Some(Refusal {
            code: ErrorCode::from_str_name(code)?,
            message: crate::auth::printable(status.message()).into_owned(),
        })
    }
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Self {
        Refused {
            code: r.code as i32,
            message: r.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_survive_a_status() {
        for code in [
            ErrorCode::WrongToken,
            ErrorCode::OtherJob,
            ErrorCode::DuplicateWorker,
            ErrorCode::IncompatibleVersion,
            ErrorCode::StaleGeneration,
        ] {
            let refusal = Refusal::new(code, "why");
            let status = refusal.to_status();
            assert_eq!(Refusal::from_status(&status), Some(refusal));
        }
        assert_eq!(Refusal::from_status(&tonic::Status::internal("x")), None);
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        assert_eq!(bounded_text("short".into()), "short");
        let long = "é".repeat(MAX_TEXT);
        let cut = bounded_text(long.clone());
        assert!(cut.len() <= MAX_TEXT, "{}", cut.len());
        assert!(cut.starts_with("éé"));
        let kept = cut.find(" ... (").expect("the note");
        assert!(cut.ends_with(&format!("({} bytes cut)", long.len() - kept)));
    }

    #[test]
    fn versions_match_on_major_and_minor() {
        assert!(compatible("0.1.0", "0.1.7"));
        assert!(!compatible("0.1.0", "0.2.0"));
        assert!(!compatible("1.1.0", "0.1.0"));
        assert!(!compatible("garbage", "0.1.0"));
    }
}
