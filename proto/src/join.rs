//! Opening a worker's session with a coordinator: the challenge-response of [`crate::auth`]
//! in both directions, then `Join` and `Joined` (proto/dapt/v1/coordinator.proto). The worker
//! checks the coordinator's proof before it says anything more, and its own proof answers the
//! coordinator's fresh nonce, so a coordinator that is not the job's learns nothing it can use.

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::auth::{self, Key, NoRandomness, COORDINATOR_PROOF, STATUS_PROOF};
use crate::rpc::{
    coordinator_message, worker_message, CoordinatorClient, CoordinatorMessage, Hello, Join,
    Joined, Refusal, StatusRequest, WorkerMessage,
};

/// A session the coordinator accepted.
pub struct Session {
    /// What the coordinator sends from now on.
    pub inbound: tonic::Streaming<CoordinatorMessage>,
    /// What this worker sends (the session ends when it is dropped).
    pub outbound: mpsc::UnboundedSender<WorkerMessage>,
    pub joined: Joined,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the coordinator refused this worker: {0}")]
    Refused(Refusal),
    /// The coordinator's proof is wrong: another job's, another token's, or no dapt coordinator.
    /// Nothing about this worker was sent.
    #[error("the coordinator did not prove that it runs job `{job}` with this token (it runs another job, holds another token, or is not a dapt coordinator); not joining it")]
    Unproven { job: String },
    #[error("lost the coordinator: {0}")]
    Lost(tonic::Status),
    #[error("the coordinator answered {0} instead of {1}")]
    Unexpected(String, &'static str),
    #[error(transparent)]
    NoRandomness(#[from] NoRandomness),
}

impl SessionError {
    /// Whether the coordinator refused on purpose (or could not prove itself): trying the same
    /// coordinator again cannot help.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Refused(_) | Self::Unproven { .. })
    }

    /// Whether the coordinator turned the session away because too many sessions were still
    /// joining (`RESOURCE_EXHAUSTED`): asking again shortly can help.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Lost(s) if s.code() == tonic::Code::ResourceExhausted)
    }
}

fn lost(status: tonic::Status) -> SessionError {
    match Refusal::from_status(&status) {
        Some(r) => SessionError::Refused(r),
        None => SessionError::Lost(status),
    }
}

/// Opens a session: `Hello`, check the coordinator's `Challenge`, `Join` (with `join.proof` set
/// here), `Joined`. `key` is [`Key::control`] of the job's token.
pub async fn open(
    client: &mut CoordinatorClient<tonic::transport::Channel>,
    key: &Key,
    mut join: Join,
) -> Result<Session, SessionError> {
    let send = |tx: &mpsc::UnboundedSender<WorkerMessage>, kind| {
        let _ = tx.send(WorkerMessage { kind: Some(kind) });
    };
    let (outbound, rx) = mpsc::unbounded_channel();
    let ours = auth::nonce()?;
    send(
        &outbound,
        worker_message::Kind::Hello(Hello {
            nonce: ours.to_vec(),
        }),
    );
    let mut inbound = client
        .session(UnboundedReceiverStream::new(rx))
        .await
        .map_err(lost)?
        .into_inner();
    let challenge = match inbound.message().await.map_err(lost)? {
        Some(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Challenge(c)),
        }) => c,
        other => {
            return Err(SessionError::Unexpected(
                format!("{other:?}"),
                "a challenge",
            ))
        }
    };
    let parts: [&[u8]; 3] = [join.job.as_bytes(), &ours, &challenge.nonce];
    if !key.verify(COORDINATOR_PROOF, &parts, &challenge.proof) {
        return Err(SessionError::Unproven { job: join.job });
    }
    join.proof = auth::worker_proof(key, &join, &ours, &challenge.nonce).to_vec();
    send(&outbound, worker_message::Kind::Join(join));
    let joined = match inbound.message().await.map_err(lost)? {
        Some(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Joined(j)),
        }) => j,
        other => return Err(SessionError::Unexpected(format!("{other:?}"), "`Joined`")),
    };
    Ok(Session {
        inbound,
        outbound,
        joined,
    })
}

/// How far a `dapt status` request's clock may be from the coordinator's.
pub const STATUS_SKEW_MS: u64 = 5 * 60 * 1000;

/// A `Status` request that proves the token, made at `unix_ms` (ms since the Unix epoch).
pub fn status_request(key: &Key, unix_ms: u64) -> Result<StatusRequest, NoRandomness> {
    let nonce = auth::nonce()?;
    let proof = key.tag(STATUS_PROOF, &[&unix_ms.to_le_bytes(), &nonce]);
    Ok(StatusRequest {
        unix_ms,
        nonce: nonce.to_vec(),
        proof: proof.to_vec(),
    })
}

/// Whether `request` proves the token and was made within [`STATUS_SKEW_MS`] of `now_ms`.
pub fn status_allowed(key: &Key, request: &StatusRequest, now_ms: u64) -> bool {
    let proven = key.verify(
        STATUS_PROOF,
        &[&request.unix_ms.to_le_bytes(), &request.nonce],
        &request.proof,
    );
    proven && request.unix_ms.abs_diff(now_ms) <= STATUS_SKEW_MS
}

/// The nonces of the proven `Status` requests whose clock window is still open: a request
/// recorded on the wire and sent again (by someone without the token) is refused.
#[derive(Debug, Default)]
pub struct SeenStatusNonces {
    /// The nonces seen, and (end of its window, nonce) in the order windows close.
    seen: std::collections::HashSet<auth::Nonce>,
    closing: std::collections::BTreeSet<(u64, auth::Nonce)>,
}

impl SeenStatusNonces {
    /// The most open windows kept: only token holders make proven requests, so a full set is a
    /// token holder's flood, refused until windows close.
    pub const MAX: usize = 1 << 16;

    /// Whether `request` (already proven by [`status_allowed`]) is seen for the first time;
    /// remembers it until its window closes. A nonce of another length than
    /// [`auth::NONCE_LEN`] is refused.
    pub fn first_use(&mut self, request: &StatusRequest, now_ms: u64) -> bool {
        while let Some(&(until, nonce)) = self.closing.first() {
            if until >= now_ms {
                break;
            }
            self.closing.pop_first();
            self.seen.remove(&nonce);
        }
        let Ok(nonce) = auth::Nonce::try_from(request.nonce.as_slice()) else {
            return false;
        };
        if self.seen.len() >= Self::MAX || !self.seen.insert(nonce) {
            return false;
        }
        self.closing
            .insert((request.unix_ms.saturating_add(STATUS_SKEW_MS), nonce));
        true
    }
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_proof_needs_the_token_and_a_recent_clock() {
        let key = Key::control("t0ken");
        let now = unix_ms();
        let request = status_request(&key, now).expect("request");
        assert!(status_allowed(&key, &request, now + 1000));
        assert!(!status_allowed(&Key::control("guess"), &request, now));
        assert!(!status_allowed(&key, &request, now + STATUS_SKEW_MS + 1));
        let mut altered = request.clone();
        altered.unix_ms += 1;
        assert!(!status_allowed(&key, &altered, now));
        assert!(!status_allowed(&key, &StatusRequest::default(), now));
        // A proven request is answered once: sent again within its window, it is a replay.
        let mut seen = SeenStatusNonces::default();
        assert!(seen.first_use(&request, now));
        assert!(!seen.first_use(&request, now + 60_000));
        let other = status_request(&key, now).expect("request");
        assert!(seen.first_use(&other, now + 60_000));
        // Once its window has closed, the clock check refuses it; the set forgets it.
        assert!(!status_allowed(&key, &request, now + 2 * STATUS_SKEW_MS));
        seen.first_use(
            &status_request(&key, now).expect("r"),
            now + 2 * STATUS_SKEW_MS,
        );
        assert_eq!((seen.seen.len(), seen.closing.len()), (1, 1));
        // A nonce of another length is no proof of freshness.
        let mut short = status_request(&key, now).expect("r");
        short.nonce.truncate(8);
        assert!(!seen.first_use(&short, now));
    }
}
