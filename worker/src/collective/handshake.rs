//! Joining the ring: dial the right neighbour, accept the left, and fence out any connection
//! from another generation, another world size or the wrong rank.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::link::{decode_words, encode_words, nap, Link, Watch, MAGIC};
use super::ring::RingConfig;
use super::CollectiveError;

const HELLO: u64 = 1;
const ACCEPT: u64 = 2;
const REFUSE: u64 = 3;
/// How long the acceptor waits for a HELLO on a connection it accepted (a real dialer sends it
/// at once; this bounds a silent stray client).
const GREET: Duration = Duration::from_secs(1);
/// One connect attempt's limit, which is also how late a dialer notices an abort: a peer in the
/// same network answers a SYN far sooner, and a lost SYN is simply dialled again.
const DIAL_ATTEMPT: Duration = Duration::from_millis(250);

/// The handshake message, both ways: the dialer sends HELLO, the acceptor answers ACCEPT or
/// REFUSE with its own view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    kind: u64,
    generation: u64,
    world: u64,
    from: u64,
    to: u64,
}

impl Hello {
    fn encode(&self) -> [u8; 48] {
        encode_words([
            MAGIC,
            self.kind,
            self.generation,
            self.world,
            self.from,
            self.to,
        ])
    }

    /// None if the bytes are not a dapt ring handshake.
    fn decode(bytes: &[u8; 48]) -> Option<Self> {
        let [magic, kind, generation, world, from, to] = decode_words(bytes);
        (magic == MAGIC).then_some(Self {
            kind,
            generation,
            world,
            from,
            to,
        })
    }
}

pub(super) fn dial_right(
    cfg: &RingConfig,
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
            .and_then(|link| greet_right(link, hello, addr, remaining, watch));
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

fn greet_right(
    mut link: Link,
    hello: Hello,
    addr: SocketAddr,
    patience: Duration,
    watch: Watch,
) -> Result<Link, CollectiveError> {
    let watch = Watch { patience, ..watch };
    link.write_all(&hello.encode(), &watch)?;
    let mut reply = [0u8; 48];
    link.read_exact(&mut reply, &watch)?;
    let peer = link.peer;
    let refused = |message: String| Err(CollectiveError::Handshake { peer, message });
    match Hello::decode(&reply) {
        None => refused(format!("{addr} does not speak the dapt ring protocol")),
        Some(r) if r.kind == ACCEPT && r.generation == hello.generation => Ok(link),
        Some(r) => refused(format!(
            "{addr} refused: it is rank {} of {} at generation {}; this is rank {} of {} at generation {}",
            r.from, r.world, r.generation, hello.from, hello.world, hello.generation
        )),
    }
}

/// Accepts connections until one from the left neighbour passes the handshake. Refused
/// connections (another generation, a stray client) do not end the wait, unless the dialer has
/// already failed: then the ring is over, and answering one connection is only so that the peer
/// hears the reason instead of a reset.
pub(super) fn accept_left(
    listener: &TcpListener,
    cfg: &RingConfig,
    deadline: Instant,
    watch: Watch,
    dial_failed: &AtomicBool,
) -> Result<Link, CollectiveError> {
    let left = (cfg.rank + cfg.world - 1) % cfg.world;
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::io(left, e))?;
    let mut refused = None;
    loop {
        watch.check()?;
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
            Ok((stream, addr)) => match greet_left(stream, cfg, left, remaining.min(GREET), watch)?
            {
                Ok(link) => return Ok(link),
                Err(message) => {
                    tracing::warn!(rank = cfg.rank, generation = cfg.generation, %addr, %message, "refused a ring connection");
                    refused = Some(format!("refused {addr}: {message}"));
                }
            },
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

/// Reads a dialer's HELLO and answers it. The outer error stops the ring (abort); the inner one
/// refuses this connection only, and the acceptor keeps waiting for the right one.
fn greet_left(
    stream: TcpStream,
    cfg: &RingConfig,
    left: usize,
    patience: Duration,
    watch: Watch,
) -> Result<Result<Link, String>, CollectiveError> {
    let watch = Watch { patience, ..watch };
    let mut link = match Link::new(stream, left) {
        Ok(link) => link,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut bytes = [0u8; 48];
    match link.read_exact(&mut bytes, &watch) {
        Ok(()) => {}
        Err(CollectiveError::Aborted) => return Err(CollectiveError::Aborted),
        Err(e) => return Ok(Err(e.to_string())),
    }
    let Some(hello) = Hello::decode(&bytes) else {
        return Ok(Err("not a dapt ring handshake".into()));
    };
    let problem = if hello.kind != HELLO {
        Some(format!("unexpected handshake message {}", hello.kind))
    } else if hello.generation != cfg.generation {
        Some(format!(
            "it is at generation {}, this ring at {}",
            hello.generation, cfg.generation
        ))
    } else if hello.world != cfg.world as u64 {
        Some(format!(
            "it has world {}, this ring {}",
            hello.world, cfg.world
        ))
    } else if (hello.from, hello.to) != (left as u64, cfg.rank as u64) {
        Some(format!(
            "it dials as rank {} to {}, expected {} to {}",
            hello.from, hello.to, left, cfg.rank
        ))
    } else {
        None
    };
    let reply = Hello {
        kind: if problem.is_some() { REFUSE } else { ACCEPT },
        generation: cfg.generation,
        world: cfg.world as u64,
        from: cfg.rank as u64,
        to: hello.from,
    };
    let answered = link.write_all(&reply.encode(), &watch);
    match (problem, answered) {
        (Some(problem), _) => Ok(Err(problem)),
        (None, Ok(())) => Ok(Ok(link)),
        (None, Err(CollectiveError::Aborted)) => Err(CollectiveError::Aborted),
        (None, Err(e)) => Ok(Err(e.to_string())),
    }
}
