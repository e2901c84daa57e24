//! Joining the ring: dial the right neighbour, accept the left, and let in only a member of the
//! job (one that holds the ring key) of this generation, this world size and the right rank.
//!
//! Wire (little-endian u64 words, then raw bytes), a challenge-response in both directions:
//!
//! ```text
//! dialer   -> acceptor  HELLO      [MAGIC, HELLO, generation, world, from, to] + dialer nonce (32)
//! acceptor -> dialer    CHALLENGE  [MAGIC, CHALLENGE] + acceptor nonce (32)
//! dialer   -> acceptor  PROOF      HMAC(ring key, DIAL_PROOF, HELLO, acceptor nonce) (32)
//! acceptor -> dialer    ANSWER     [MAGIC, ACCEPT|REFUSE, generation, world, rank, to]
//!                                  + HMAC(ring key, ANSWER_PROOF, HELLO, acceptor nonce, words) (32)
//! ```
//!
//! The acceptor checks the proof (constant time) before it reads anything else; a connection
//! that fails it, says something else, or says it too slowly is closed without a word: only a
//! member learns this rank's generation, world or rank (a refusal's reasons). The dialer checks
//! the answer's proof the same way, so neither side follows a stranger, and fresh nonces from
//! both sides make a recorded handshake useless.
//!
//! Accepting never waits on one connection: each accepted connection shakes hands on a thread
//! of its own within [`GREET`], at most [`MAX_GREETING`] at once, and the first member to pass
//! is the left link. Silent or slow strangers cannot make a healthy rank time out, and
//! connections queued before the generation formed cannot take a rank's place.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dapt_proto::auth::{self, Key, Nonce, NONCE_LEN, TAG_LEN};

use super::link::{decode_words, encode_words, nap, Link, Watch, MAGIC};
use super::ring::RingConfig;
use super::{AbortHandle, CollectiveError};

const HELLO: u64 = 1;
const ACCEPT: u64 = 2;
const REFUSE: u64 = 3;
const CHALLENGE: u64 = 4;
/// HELLO and ANSWER: six words and a nonce or a tag.
const LONG_MESSAGE: usize = 48 + 32;
/// CHALLENGE: two words and a nonce.
const CHALLENGE_LEN: usize = 16 + NONCE_LEN;
/// The label of the dialer's proof.
const DIAL_PROOF: &str = "dapt ring dial v1";
/// The label of the acceptor's answer.
const ANSWER_PROOF: &str = "dapt ring answer v1";
/// How long the acceptor gives a connection to complete the handshake, all messages together:
/// a member dialing over any real network answers far sooner; a stranger's connection is closed.
pub(super) const GREET: Duration = Duration::from_secs(2);
/// Handshakes in progress at once on one acceptor; connections beyond it are closed at once
/// (the real neighbour's dialer just dials again). Connections from the left neighbour's IP
/// address have this many places of their own, so that a stranger elsewhere holding every
/// other place with silent connections cannot keep the ring from forming (it failed the job:
/// every generation timed out); from this host, only the connections of this user's sockets
/// ([`neighbours_user`]). A stranger on the neighbour's own host, another machine, dials from
/// the neighbour's address and is not told apart.
pub(super) const MAX_GREETING: usize = 64;
/// Whether a connection from the left neighbour's address may take the neighbour's places: from
/// another host, yes (its users cannot be told apart here); from this host, only when the
/// peer's socket is this user's, as `dapt launch`'s and a node's workers are (or when the kernel
/// no longer knows it). Another local user dialling from 127.0.0.1 held all 64 of the
/// neighbour's places with silent connections, and four generations in a row failed (an audit).
fn neighbours_user(stream: &TcpStream, peer: &SocketAddr) -> bool {
    let Ok(local) = stream.local_addr() else {
        return true;
    };
    if !dapt_proto::peer::on_this_host(peer, &local) {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    dapt_proto::peer::local_peer_uid(peer, &local).is_none_or(|uid| uid == ours)
}

/// Connections closed for not proving membership are logged at most once per this period, with
/// their count (a stranger's flood logged a line per connection).
static STRANGERS: dapt_proto::logging::Throttle =
    dapt_proto::logging::Throttle::new(Duration::from_secs(10));
/// One connect attempt's limit, which is also how late a dialer notices an abort: a peer in the
/// same network answers a SYN far sooner, and a lost SYN is simply dialled again.
const DIAL_ATTEMPT: Duration = Duration::from_millis(250);

/// The handshake's numbers, both ways: the dialer's HELLO, and the acceptor's ACCEPT or REFUSE
/// with its own view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    kind: u64,
    generation: u64,
    world: u64,
    from: u64,
    to: u64,
}

impl Hello {
    fn words(&self) -> [u8; 48] {
        encode_words([
            MAGIC,
            self.kind,
            self.generation,
            self.world,
            self.from,
            self.to,
        ])
    }

    /// The words followed by `tail` (a nonce or a tag).
    fn encode(&self, tail: &[u8; 32]) -> [u8; LONG_MESSAGE] {
        let mut out = [0; LONG_MESSAGE];
        out[..48].copy_from_slice(&self.words());
        out[48..].copy_from_slice(tail);
        out
    }

    /// None if the bytes are not a dapt ring handshake.
    fn decode(bytes: &[u8; LONG_MESSAGE]) -> Option<(Self, [u8; 32])> {
        let mut words = [0; 48];
        words.copy_from_slice(&bytes[..48]);
        let [magic, kind, generation, world, from, to] = decode_words(&words);
        let mut tail = [0; 32];
        tail.copy_from_slice(&bytes[48..]);
        (magic == MAGIC).then_some((
            Self {
                kind,
                generation,
                world,
                from,
                to,
            },
            tail,
        ))
    }
}

fn fresh_nonce() -> Result<Nonce, CollectiveError> {
    auth::nonce().map_err(|e| CollectiveError::Config(e.to_string()))
}

pub(super) fn dial_right(
    cfg: &RingConfig,
    key: &Key,
    deadline: Instant,
    watch: Watch,
) -> Result<Link, CollectiveError> {
    let right = (cfg.rank + 1) % cfg.world;
    let addr = cfg.peers[right];
    let hello = Hello {
        kind: HELLO,
        generation: cfg.generation,
        world: cfg.world as u64,
        from: cfg.rank as u64,
        to: right as u64,
    };
    let mut backoff = Duration::from_millis(10);
    loop {
        watch.check()?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CollectiveError::Timeout {
                peer: right,
                waited: cfg.timeout,
            });
        }
        let attempt = TcpStream::connect_timeout(&addr, remaining.min(DIAL_ATTEMPT))
            .map_err(|e| CollectiveError::io(right, e))
            .and_then(|stream| Link::new(stream, right))
            .and_then(|link| greet_right(link, hello, key, addr, remaining, watch));
        match attempt {
            Ok(link) => return Ok(link),
            // A refusal is final (fencing); everything else may be a peer still starting.
            Err(e @ (CollectiveError::Handshake { .. } | CollectiveError::Aborted)) => {
                return Err(e)
            }
            Err(error) => {
                tracing::debug!(rank = cfg.rank, peer = right, %error, "dial failed, retrying")
            }
        }
        // Exponential backoff with jitter, so restarted ranks do not dial in lockstep.
        let jitter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let pause = backoff.mul_f64(0.5 + f64::from(jitter % 1000) / 2000.0);
        nap(
            pause.min(deadline.saturating_duration_since(Instant::now())),
            watch,
        )?;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// The dialer's side of the handshake on one connection. A connection closed before the answer
/// (the peer is still starting, or did not take this proof) is worth dialing again; an answer
/// without a valid proof or a member's refusal is final.
fn greet_right(
    mut link: Link,
    hello: Hello,
    key: &Key,
    addr: SocketAddr,
    patience: Duration,
    watch: Watch,
) -> Result<Link, CollectiveError> {
    let watch = Watch {
        patience,
        deadline: Some(Instant::now() + patience),
        ..watch
    };
    let sent = hello.encode(&fresh_nonce()?);
    link.write_all(&sent, &watch)?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    link.read_exact(&mut challenge, &watch)?;
    let peer = link.peer;
    let refused = |message: String| Err(CollectiveError::Handshake { peer, message });
    let [magic, kind] = decode_words(&first_words(&challenge));
    if magic != MAGIC || kind != CHALLENGE {
        return refused(format!("{addr} does not speak the dapt ring protocol"));
    }
    let theirs = &challenge[16..];
    link.write_all(&key.tag(DIAL_PROOF, &[&sent, theirs]), &watch)?;
    let mut answer = [0u8; LONG_MESSAGE];
    link.read_exact(&mut answer, &watch)?;
    let proven = key.verify(ANSWER_PROOF, &[&sent, theirs, &answer[..48]], &answer[48..]);
    match Hello::decode(&answer) {
        Some(_) if !proven => refused(format!("{addr} did not prove it is a member of the job")),
        Some((r, _)) if r.kind == ACCEPT && r.generation == hello.generation => Ok(link),
        Some((r, _)) => refused(format!(
            "{addr} refused: it is rank {} of {} at generation {}; this is rank {} of {} at generation {}",
            r.from, r.world, r.generation, hello.from, hello.world, hello.generation
        )),
        None => refused(format!("{addr} does not speak the dapt ring protocol")),
    }
}

fn first_words(bytes: &[u8; CHALLENGE_LEN]) -> [u8; 16] {
    let mut words = [0; 16];
    words.copy_from_slice(&bytes[..16]);
    words
}

/// What a handshake thread reports to [`accept_left`].
enum Greeted {
    /// A member of this generation, at the right rank: the left link.
    Member(Link),
    /// A member of another generation, world or rank, told why.
    Refused(String),
}

/// What every handshake thread of one `accept_left` shares.
#[derive(Clone)]
struct Expect {
    generation: u64,
    world: u64,
    rank: u64,
    left: usize,
    key: Key,
    abort: AbortHandle,
    /// Set when `accept_left` returns: the threads still shaking hands close their connections.
    done: Arc<AtomicBool>,
    /// Handshakes in progress from any address but the left neighbour's, and from its.
    in_flight: Arc<AtomicUsize>,
    in_flight_left: Arc<AtomicUsize>,
}

/// Accepts connections until one from the left neighbour passes the handshake. Every
/// connection shakes hands on a thread of its own, so a silent one holds nothing up. Refused
/// members (another generation) do not end the wait, unless the dialer has already failed: then
/// the ring is over, and answering one connection is only so that the peer hears the reason
/// instead of a reset.
pub(super) fn accept_left(
    listener: &TcpListener,
    cfg: &RingConfig,
    key: &Key,
    deadline: Instant,
    watch: Watch,
    dial_failed: &AtomicBool,
) -> Result<Link, CollectiveError> {
    let left = (cfg.rank + cfg.world - 1) % cfg.world;
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::io(left, e))?;
    let expect = Expect {
        generation: cfg.generation,
        world: cfg.world as u64,
        rank: cfg.rank as u64,
        left,
        key: key.clone(),
        abort: watch.abort.clone(),
        done: Arc::default(),
        in_flight: Arc::default(),
        in_flight_left: Arc::default(),
    };
    // Canonical: an IPv4 neighbour accepted on a dual-stack socket shows as `::ffff:a.b.c.d`.
    let left_ip = cfg.peers.get(left).map(|a| a.ip().to_canonical());
    let _stop_greeters = SetOnDrop(expect.done.clone());
    let (tx, greeted) = mpsc::channel();
    let mut refused = None;
    loop {
        watch.check()?;
        while let Ok(g) = greeted.try_recv() {
            match g {
                Greeted::Member(link) => return Ok(link),
                Greeted::Refused(message) => refused = Some(message),
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answered_after_failure = refused.is_some() && dial_failed.load(Ordering::Acquire);
        if remaining.is_zero() || answered_after_failure {
            return Err(match refused {
                Some(message) => CollectiveError::Handshake {
                    peer: left,
                    message,
                },
                None => CollectiveError::Timeout {
                    peer: left,
                    waited: cfg.timeout,
                },
            });
        }
        match listener.accept() {
            Ok((stream, addr)) => {
                let in_flight = if Some(addr.ip().to_canonical()) == left_ip
                    && neighbours_user(&stream, &addr)
                {
                    expect.in_flight_left.clone()
                } else {
                    expect.in_flight.clone()
                };
                if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_GREETING {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    tracing::debug!(rank = cfg.rank, %addr, "too many ring handshakes at once: closed a connection");
                    continue;
                }
                let (greeter, tx, held) = (expect.clone(), tx.clone(), in_flight.clone());
                let until = Instant::now() + remaining.min(GREET);
                let spawned = thread::Builder::new()
                    .name("ring-greet".into())
                    .spawn(move || {
                        let outcome = greet_left(stream, addr, &greeter, until);
                        held.fetch_sub(1, Ordering::AcqRel);
                        if let Some(g) = outcome {
                            let _ = tx.send(g);
                        }
                    });
                if let Err(e) = spawned {
                    // The connection went with the closure; the real neighbour dials again.
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(rank = cfg.rank, error = %e, "cannot start a ring handshake thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(CollectiveError::io(left, e)),
        }
    }
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The acceptor's side of the handshake on one connection, by `until`. None: the connection was
/// closed without a word (not a member, not in time, or the acceptor is done).
fn greet_left(stream: TcpStream, addr: SocketAddr, e: &Expect, until: Instant) -> Option<Greeted> {
    let watch = Watch {
        abort: &e.abort,
        stop: &e.done,
        patience: until.saturating_duration_since(Instant::now()),
        deadline: Some(until),
    };
    let stranger = |why: &str| {
        if let Some(closed) = STRANGERS.admit() {
            tracing::warn!(rank = e.rank, generation = e.generation, %addr, why, closed, "closed a ring connection that did not prove membership");
        }
        None
    };
    let mut link = Link::new(stream, e.left).ok()?;
    let mut hello = [0u8; LONG_MESSAGE];
    if link.read_exact(&mut hello, &watch).is_err() {
        return stranger("no handshake in time");
    }
    let Some((theirs, _)) = Hello::decode(&hello).filter(|(h, _)| h.kind == HELLO) else {
        return stranger("not a dapt ring handshake");
    };
    let ours = fresh_nonce().ok()?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[..16].copy_from_slice(&encode_words::<2, 16>([MAGIC, CHALLENGE]));
    challenge[16..].copy_from_slice(&ours);
    let mut proof = [0u8; TAG_LEN];
    if link.write_all(&challenge, &watch).is_err() || link.read_exact(&mut proof, &watch).is_err() {
        return stranger("no proof in time");
    }
    if !e.key.verify(DIAL_PROOF, &[&hello, &ours], &proof) {
        return stranger("wrong proof");
    }
    // A member: it may hear why it is refused.
    let problem = if theirs.generation != e.generation {
        Some(format!(
            "it is at generation {}, this ring at {}",
            theirs.generation, e.generation
        ))
    } else if theirs.world != e.world {
        Some(format!(
            "it has world {}, this ring {}",
            theirs.world, e.world
        ))
    } else if (theirs.from, theirs.to) != (e.left as u64, e.rank) {
        Some(format!(
            "it dials as rank {} to {}, expected {} to {}",
            theirs.from, theirs.to, e.left, e.rank
        ))
    } else {
        None
    };
    let reply = Hello {
        kind: if problem.is_some() { REFUSE } else { ACCEPT },
        generation: e.generation,
        world: e.world,
        from: e.rank,
        to: theirs.from,
    };
    let words = reply.words();
    let answer = reply.encode(&e.key.tag(ANSWER_PROOF, &[&hello, &ours, &words]));
    let answered = link.write_all(&answer, &watch);
    match (problem, answered) {
        (Some(problem), _) => {
            tracing::warn!(rank = e.rank, generation = e.generation, %addr, %problem, "refused a ring connection");
            Some(Greeted::Refused(format!("refused {addr}: {problem}")))
        }
        (None, Ok(())) => Some(Greeted::Member(link)),
        (None, Err(_)) => None,
    }
}
