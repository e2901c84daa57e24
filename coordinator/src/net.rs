//! What a stranger can hold on the coordinator's listening ports
//! (docs/control-plane.md#security). Every connection, gRPC and `/metrics`, is accepted here
//! rather than by tonic or axum, so that:
//!
//! - one IP address holds at most [`Limits::per_address`] connections, and all addresses
//!   together at most [`Limits::total`], well below the process's file-descriptor limit; a
//!   connection beyond them is closed at once, logged at most once per 10 s with a count;
//! - running out of file descriptors (`EMFILE`, `ENFILE`) pauses accepting for [`FD_BACKOFF`]
//!   instead of retrying at once (tonic's loop did, spinning a core while nothing could close);
//! - a gRPC connection that has not made its first request within a deadline is closed: a
//!   silent connection, or an HTTP/2 preface and then silence, held its descriptor for ever
//!   (HTTP/2 pings are answered by any client library, so keep-alive does not find it).
//!
//! [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard one when the coordinator starts.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use dapt_proto::logging::Throttle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;

/// How long accepting pauses when the process is out of file descriptors.
pub const FD_BACKOFF: Duration = Duration::from_millis(100);
/// How long a gRPC connection may take to make its first request: a worker opens its session at
/// once, `dapt status` sends its request at once.
pub const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// Connections refused in one go before the accept loop lets other tasks run.
const REFUSALS_PER_POLL: usize = 64;

/// How many connections the coordinator keeps open on one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From one IP address (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub per_address: usize,
    /// From all addresses together.
    pub total: usize,
}

impl Limits {
    /// The gRPC port's, for a process allowed `fds` open files: 64 per address (a node runs a
    /// handful of workers, each with one connection; `dapt status` opens one more) and half the
    /// descriptors in all, at most 4096, leaving the rest to checkpoints, the ledger, etcd and
    /// the metrics port.
    pub fn grpc(fds: u64) -> Self {
        Limits {
            per_address: 64,
            total: share(fds, 2, 4096),
        }
    }

    /// The metrics port's: a scraper keeps one connection, a browser a few; an eighth of the
    /// descriptors in all, at most 256.
    pub fn metrics(fds: u64) -> Self {
        Limits {
            per_address: 16,
            total: share(fds, 8, 256),
        }
    }
}

/// `fds / part`, at most `most`, at least 16.
fn share(fds: u64, part: u64, most: usize) -> usize {
    usize::try_from(fds / part)
        .map_or(most, |n| n.min(most))
        .max(16)
}

/// What becomes of a new connection, given what its address and everyone hold already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Its address holds [`Limits::per_address`] connections.
    AddressFull,
    /// All addresses together hold [`Limits::total`].
    Full,
}

impl Verdict {
    pub fn reason(self) -> &'static str {
        match self {
            Verdict::Admit => "admitted",
            Verdict::AddressFull => "its address holds as many connections as one may",
            Verdict::Full => "as many connections are open as the coordinator keeps",
        }
    }
}

/// The decision on a new connection from an address that holds `from_address` of `total`.
pub fn judge(limits: Limits, from_address: usize, total: usize) -> Verdict {
    if from_address >= limits.per_address {
        Verdict::AddressFull
    } else if total >= limits.total {
        Verdict::Full
    } else {
        Verdict::Admit
    }
}

pub use dapt_proto::peer::{canonical, local_peer_uid, PeerKey};

#[derive(Default, Debug)]
struct Counts {
    per_address: HashMap<PeerKey, usize>,
    total: usize,
}

/// Places for connections (or handshakes), per address and in all.
#[derive(Clone)]
pub struct Places {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// One connection's place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    key: PeerKey,
    counts: Arc<Mutex<Counts>>,
}

impl Places {
    pub fn new(limits: Limits) -> Self {
        Places {
            limits,
            counts: Arc::default(),
        }
    }

    /// A place for a connection from `key` (an address already [`canonical`], and a loopback
    /// peer's user), or why there is none.
    pub fn take(&self, key: impl Into<PeerKey>) -> Result<Place, Verdict> {
        let key = key.into();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let held = counts.per_address.get(&key).copied().unwrap_or(0);
        match judge(self.limits, held, counts.total) {
            Verdict::Admit => {}
            refused => return Err(refused),
        }
        *counts.per_address.entry(key).or_insert(0) += 1;
        counts.total += 1;
        Ok(Place {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Places held: by `key`, and in all.
    pub fn held(&self, key: impl Into<PeerKey>) -> (usize, usize) {
        let key = key.into();
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (
            counts.per_address.get(&key).copied().unwrap_or(0),
            counts.total,
        )
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_address.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.per_address.remove(&self.key);
            }
        }
    }
}

/// Whether an accept error means the process (`EMFILE`) or the system (`ENFILE`) has no file
/// descriptor left, or the kernel no memory for one more socket: it lasts until something
/// closes, so retrying at once only burns a core.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The connections of one listener, as a stream for `serve_with_incoming_shutdown` (gRPC) or
/// the metrics server's accept loop. It never yields an error: refused connections are closed
/// and logged here, and accept errors wait here.
pub struct Incoming {
    listener: TcpListener,
    places: Places,
    /// The deadline for a connection's first request ([`Connection::used`]), if it has one.
    first_request: Option<Duration>,
    /// The port's name in log lines (`grpc`, `metrics`).
    port: &'static str,
    refused: Throttle,
    exhausted: Throttle,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(
        listener: TcpListener,
        limits: Limits,
        first_request: Option<Duration>,
        port: &'static str,
    ) -> Self {
        Incoming {
            listener,
            places: Places::new(limits),
            first_request,
            port,
            refused: Throttle::new(Duration::from_secs(10)),
            exhausted: Throttle::new(Duration::from_secs(10)),
            backoff: None,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Stream for Incoming {
    type Item = io::Result<Admitted>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..REFUSALS_PER_POLL {
            if let Some(backoff) = this.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((tcp, peer)) => {
                    match this.places.take(PeerKey::of(&peer, tcp.local_addr().ok())) {
                        Ok(place) => {
                            return Poll::Ready(Some(Ok(Admitted::new(
                                tcp,
                                peer,
                                place,
                                this.first_request,
                            ))))
                        }
                        Err(verdict) => {
                            if let Some(refused) = this.refused.admit() {
                                tracing::warn!(
                                    port = this.port,
                                    peer = %peer,
                                    refused,
                                    reason = verdict.reason(),
                                    "refused connections"
                                );
                            }
                            drop(tcp);
                        }
                    }
                }
                Err(e) if out_of_descriptors(&e) => {
                    if let Some(times) = this.exhausted.admit() {
                        tracing::error!(
                            port = this.port,
                            times,
                            "accepting a connection: {e}; pausing {} ms",
                            FD_BACKOFF.as_millis()
                        );
                    }
                    this.backoff = Some(Box::pin(tokio::time::sleep(FD_BACKOFF)));
                }
                // A connection reset before it was accepted, and the like: nothing to keep.
                Err(e) => tracing::debug!(port = this.port, "accepting a connection: {e}"),
            }
        }
        // A flood being refused: let the runtime's other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// What a request knows of its connection: tonic puts it in each request's extensions
/// (under `TlsConnectInfo` over TLS; see [`connection`]).
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// What it is counted under ([`PeerKey`]).
    pub key: PeerKey,
    used: Arc<AtomicBool>,
}

impl Connection {
    /// The address the connection is counted under.
    pub fn ip(&self) -> IpAddr {
        canonical(&self.peer)
    }

    /// The connection made a request: its first-request deadline no longer applies.
    pub fn used(&self) {
        self.used.store(true, Ordering::Relaxed);
    }
}

/// The connection a request came on, if it came through an [`Incoming`].
pub fn connection(extensions: &tonic::codegen::http::Extensions) -> Option<&Connection> {
    extensions.get::<Connection>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<Connection>>()
            .map(|tls| tls.get_ref())
    })
}

/// Connections closed for making no request in time, logged at most once per 10 s.
static SILENT_CLOSED: Throttle = Throttle::new(Duration::from_secs(10));

/// An accepted connection: it holds its [`Place`] while open, and fails its next read once its
/// first-request deadline passes unless a request marked it [`Connection::used`] before.
pub struct Admitted {
    tcp: TcpStream,
    info: Connection,
    deadline: Option<Pin<Box<Sleep>>>,
    _place: Place,
}

impl Admitted {
    fn new(tcp: TcpStream, peer: SocketAddr, place: Place, deadline: Option<Duration>) -> Self {
        // Small messages (heartbeats, reports) go out at once.
        let _ = tcp.set_nodelay(true);
        Admitted {
            tcp,
            info: Connection {
                peer,
                key: place.key,
                used: Arc::default(),
            },
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
            _place: place,
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.info
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut() {
            if this.info.used.load(Ordering::Relaxed) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                // Once: the server drops the connection on this error.
                this.deadline = None;
                this.info.used();
                if let Some(closed) = SILENT_CLOSED.admit() {
                    tracing::info!(
                        peer = %this.info.peer,
                        closed,
                        "closed connections that made no request within {} s",
                        FIRST_REQUEST.as_secs()
                    );
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request in time",
                )));
            }
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Admitted {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        self.info.clone()
    }
}

/// Raises this process's soft limit on open files to its hard limit and returns the limit in
/// force: the connection caps are fractions of it (a default soft limit of 1024 let a
/// stranger's 1,000 silent connections take every descriptor, and a commit's ledger write
/// failed with `EMFILE`).
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `setrlimit` reads one `rlimit` through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(
                soft = limit.rlim_cur,
                hard = limit.rlim_max,
                "could not raise the open-file limit to its hard limit: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests;
