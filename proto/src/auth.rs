//! Proof of membership in a job, without the job's token ever crossing the network.
//!
//! Every party of a job (the coordinator, its workers, `dapt status`) holds the job's token. They
//! prove it to each other with HMAC-SHA256 tags over fresh nonces from both sides
//! (challenge-response): a recorded exchange cannot be replayed, and a party that is not a
//! member learns nothing it can use from a tag it is shown. Tags are compared in constant time.
//!
//! Keys are derived from the token per purpose ([`Key::control`], [`Key::ring`]), and every kind
//! of proof has its own label, so a tag made for one purpose is never valid for another. Each
//! part of a tagged message is length-prefixed, so parts cannot run into each other.
//!
//! The token must be hard to guess (`dapt launch` makes a 128-bit one): a stranger who is shown
//! a tag can test guesses of the token against it offline. See docs/control-plane.md#security.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce: fresh from the operating system's generator for every exchange.
pub const NONCE_LEN: usize = 32;
/// Bytes of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;

/// A fresh random challenge.
pub type Nonce = [u8; NONCE_LEN];
/// An HMAC-SHA256 tag.
pub type Tag = [u8; TAG_LEN];

/// The label of the coordinator's proof to a worker (parts: job, worker nonce, coordinator
/// nonce).
pub const COORDINATOR_PROOF: &str = "dapt coordinator proof v1";
/// The label of a worker's proof in its `Join` (see [`join_parts`]).
pub const WORKER_PROOF: &str = "dapt worker proof v1";
/// The label of a `dapt status` request's proof (parts: the time in ms since the Unix epoch, the
/// client's nonce).
pub const STATUS_PROOF: &str = "dapt status proof v1";

/// A key derived from a job's token for one purpose. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The operating system's random generator failed (it does not, on any system dapt runs on).
#[derive(Debug, thiserror::Error)]
#[error("no random bytes from the operating system: {0}")]
pub struct NoRandomness(getrandom::Error);

impl Key {
    /// The control plane's key: coordinator sessions and `dapt status`.
    pub fn control(token: &str) -> Self {
        Self::derive(token, "dapt control v1", "")
    }

    /// The collective ring's key of job `job`: HMAC(token, "dapt ring v1" || 0 || job).
    pub fn ring(token: &str, job: &str) -> Self {
        Self::derive(token, "dapt ring v1", job)
    }

    fn derive(token: &str, purpose: &str, job: &str) -> Self {
        let mut mac = hmac(token.as_bytes());
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(job.as_bytes());
        Key(mac.finalize().into_bytes().into())
    }

    /// The tag of `parts` under `label`.
    pub fn tag(&self, label: &str, parts: &[&[u8]]) -> Tag {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is [`Key::tag`] of `label` and `parts`, compared in constant time. A tag of
    /// the wrong length is simply wrong.
    pub fn verify(&self, label: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(label, parts).verify_slice(tag).is_ok()
    }

    fn mac(&self, label: &str, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = hmac(&self.0);
        for part in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

fn hmac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; the error type exists for fixed-size-key MACs only.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// A fresh nonce from the operating system.
pub fn nonce() -> Result<Nonce, NoRandomness> {
    let mut n = [0; NONCE_LEN];
    getrandom::fill(&mut n).map_err(NoRandomness)?;
    Ok(n)
}

/// What a worker's proof covers besides the nonces: every field of its `Join` but the proof, so
/// a `Join` cannot be altered and keep its proof.
pub fn join_parts(join: &crate::rpc::Join) -> Vec<Vec<u8>> {
    let mut parts = vec![
        join.job.as_bytes().to_vec(),
        join.worker_id.as_bytes().to_vec(),
        join.version.as_bytes().to_vec(),
        join.collective_endpoint.as_bytes().to_vec(),
        join.attach_generation.to_le_bytes().to_vec(),
        join.attach_rank.to_le_bytes().to_vec(),
        (join.devices.len() as u64).to_le_bytes().to_vec(),
    ];
    parts.extend(join.devices.iter().map(|d| d.as_bytes().to_vec()));
    parts
}

/// The worker's proof in `join` (its `proof` field aside), answering the coordinator's nonce.
pub fn worker_proof(key: &Key, join: &crate::rpc::Join, worker: &Nonce, coordinator: &[u8]) -> Tag {
    let fields = join_parts(join);
    let mut parts: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    parts.extend([coordinator, worker.as_slice()]);
    key.tag(WORKER_PROOF, &parts)
}

/// Whether `join.proof` proves the token, for the nonces of this session.
pub fn verify_worker(
    key: &Key,
    join: &crate::rpc::Join,
    worker: &[u8],
    coordinator: &Nonce,
) -> bool {
    let fields = join_parts(join);
    let mut parts: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    parts.extend([coordinator.as_slice(), worker]);
    key.verify(WORKER_PROOF, &parts, &join.proof)
}

/// Text from the network made safe for a log line: control characters (a newline that would
/// forge a line, an ANSI escape that would rewrite a terminal) are escaped as `\n`, `\u{1b}`;
/// everything else is kept. Returns the input unchanged when there is nothing to escape.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_verifies_only_with_its_key_label_and_parts() {
        let key = Key::ring("t0ken", "job");
        let tag = key.tag("l", &[b"ab", b"c"]);
        assert!(key.verify("l", &[b"ab", b"c"], &tag));
        // Parts are length-prefixed: the same bytes cut elsewhere are another message.
        assert!(!key.verify("l", &[b"a", b"bc"], &tag));
        assert!(!key.verify("m", &[b"ab", b"c"], &tag));
        assert!(!Key::ring("t0ken", "other").verify("l", &[b"ab", b"c"], &tag));
        assert!(!Key::ring("token", "job").verify("l", &[b"ab", b"c"], &tag));
        assert!(!Key::control("t0ken").verify("l", &[b"ab", b"c"], &tag));
        assert!(!key.verify("l", &[b"ab", b"c"], &tag[..31]));
        assert_eq!(format!("{key:?}"), "Key(..)");
    }

    #[test]
    fn a_join_proof_covers_every_field_and_both_nonces() {
        let key = Key::control("t0ken");
        let (w, c) = (nonce().expect("nonce"), nonce().expect("nonce"));
        assert_ne!(w, c);
        let mut join = crate::rpc::Join {
            job: "j".into(),
            worker_id: "w0".into(),
            devices: vec!["cpu".into()],
            version: "0.1.0".into(),
            collective_endpoint: "127.0.0.1:1".into(),
            attach_generation: 0,
            attach_rank: 0,
            proof: Vec::new(),
        };
        join.proof = worker_proof(&key, &join, &w, &c).to_vec();
        assert!(verify_worker(&key, &join, &w, &c));
        assert!(!verify_worker(&key, &join, &c, &w));
        assert!(!verify_worker(&Key::control("guess"), &join, &w, &c));
        let mut moved = join.clone();
        moved.collective_endpoint = "10.0.0.9:1".into();
        assert!(!verify_worker(&key, &moved, &w, &c));
    }

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert!(matches!(
            printable("w0 ü"),
            std::borrow::Cow::Borrowed("w0 ü")
        ));
        assert_eq!(
            printable("w0\nfake line\x1b[2J"),
            "w0\\nfake line\\u{1b}[2J"
        );
    }
}
