//! The metrics port's HTTP server: its own accept loop over [`crate::net::Incoming`] (connections
//! per address and in all), hyper's HTTP/1 connection with a deadline for each request's header
//! ([`HEADER_READ`]; axum's `serve` set no timer, so a client sending its header a byte at a time
//! held its connection for ever), and over TLS a share of the handshakes per address
//! ([`HANDSHAKE_LIMITS`]) with a short deadline for the ClientHello ([`CLIENT_HELLO`]): 64 silent
//! connections held every handshake place for the whole 10 s handshake timeout, and scrapers
//! were locked out. A write that waits on a client that does not read for [`WRITE_STALL`] ends
//! its connection, and no connection lives past [`MAX_CONNECTION_AGE`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use dapt_proto::logging::Throttle;
use dapt_proto::rpc::StatusReply;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::Metrics;
use crate::net::{Admitted, Incoming, Limits, Places};

/// How long a client may take to send a request's header.
pub const HEADER_READ: Duration = Duration::from_secs(5);
/// How long an answer's write may wait on a client that does not read it: then the connection
/// is closed. A client that pipelined thousands of requests and never read held its connection
/// (and the kernel's buffers of its answers, ~45 MB each) for ever (an audit: 256 such
/// connections from 16 addresses locked scrapers out).
pub const WRITE_STALL: Duration = Duration::from_secs(10);
/// How long a connection is kept: then it is closed after the request in progress (a scraper
/// connects again); a client that reads a byte at a time cannot hold a place for good.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// TLS handshakes in progress: 8 from one address, 64 in all. More are closed at once.
pub const HANDSHAKE_LIMITS: Limits = Limits {
    per_address: 8,
    total: 64,
};
/// How long a TLS client may take to send its ClientHello (its first message, sent at once on
/// connecting); the rest of the handshake has [`dapt_proto::tls::HANDSHAKE_TIMEOUT`].
pub const CLIENT_HELLO: Duration = Duration::from_secs(3);

/// Whether a request's `Host` names loopback: `localhost`, or a loopback IP literal
/// (`127.0.0.1:PORT`, `[::1]:PORT`). A request without one (HTTP/1.0) is let through: a browser
/// always sends it.
fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Answers 421 Misdirected Request to a request whose `Host` is not loopback
/// ([`loopback_host`]).
async fn loopback_host_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .map(|h| h.to_str().unwrap_or(""));
    if loopback_host(host) {
        next.run(request).await
    } else {
        (
            axum::http::StatusCode::MISDIRECTED_REQUEST,
            "this port answers requests to localhost or a loopback address only\n",
        )
            .into_response()
    }
}

/// Handshakes refused for want of a place, logged at most once per 10 s with a count.
static TOO_MANY_HANDSHAKES: Throttle = Throttle::new(Duration::from_secs(10));

type ServerConfig = Arc<dapt_proto::tls::rustls::ServerConfig>;

/// Serves `GET /metrics` and the dashboard ([`crate::dashboard::routes`]: `/`,
/// `/api/dashboard`) on `incoming` until `stop` completes, over TLS when `tls` is given (the
/// coordinator's `cluster.tls`: a scraper needs its CA, and a client certificate when it has a
/// client CA). Connections open at `stop` finish their request and close.
pub async fn serve(
    mut incoming: Incoming,
    tls: Option<ServerConfig>,
    metrics: Arc<Metrics>,
    dashboard: Arc<std::sync::Mutex<crate::dashboard::Dashboard>>,
    status: watch::Receiver<StatusReply>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::http::header::CONTENT_TYPE;
    let pages = crate::dashboard::routes(dashboard, status.clone());
    let app = axum::Router::new().merge(pages).route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render(&status.borrow());
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    // A connection over loopback (`dapt launch`'s default address, or a wildcard one reached
    // at 127.0.0.1; a review) is answered only for requests addressed to loopback: a web page
    // the operator opens could otherwise point a name of its own at 127.0.0.1 (DNS rebinding)
    // and read the dashboard, which the browser takes for the page's own origin (an audit).
    let guarded = app
        .clone()
        .layer(axum::middleware::from_fn(loopback_host_only));
    let handshakes = Places::new(HANDSHAKE_LIMITS);
    let (closing, closed) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            _ = &mut stop => break,
            conn = incoming.next() => match conn {
                Some(Ok(conn)) => conn,
                // `Incoming` yields no errors and never ends.
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let over_loopback = conn.connection().ip().is_loopback();
        let app = if over_loopback {
            guarded.clone()
        } else {
            app.clone()
        };
        let closed = closed.clone();
        let Some(config) = &tls else {
            tokio::spawn(serve_http(conn, app, closed));
            continue;
        };
        let peer = conn.connection().peer;
        let slot = match handshakes.take(conn.connection().key) {
            Ok(slot) => slot,
            Err(verdict) => {
                if let Some(refused) = TOO_MANY_HANDSHAKES.admit() {
                    tracing::warn!(
                        %peer,
                        refused,
                        reason = verdict.reason(),
                        "too many metrics tls handshakes at once: closed connections"
                    );
                }
                continue;
            }
        };
        let config = config.clone();
        tokio::spawn(async move {
            let handshake = handshake(conn, config).await;
            drop(slot);
            match handshake {
                Ok(stream) => serve_http(stream, app, closed).await,
                Err(e) => tracing::debug!(%peer, "metrics tls handshake: {e}"),
            }
        });
    }
    // Dropping `incoming` closes the listening socket: nothing new comes in.
    closing.send_replace(true);
}

/// The server side of a TLS handshake: the ClientHello within [`CLIENT_HELLO`], the rest within
/// [`dapt_proto::tls::HANDSHAKE_TIMEOUT`].
async fn handshake(
    conn: Admitted,
    config: ServerConfig,
) -> io::Result<tokio_rustls::server::TlsStream<Admitted>> {
    let timed_out =
        |what: &str| io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"));
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
        tokio_rustls::rustls::server::Acceptor::default(),
        conn,
    );
    let hello = tokio::time::timeout(CLIENT_HELLO, acceptor)
        .await
        .map_err(|_| timed_out("waiting for the ClientHello"))??;
    tokio::time::timeout(
        dapt_proto::tls::HANDSHAKE_TIMEOUT,
        hello.into_stream(config),
    )
    .await
    .map_err(|_| timed_out("the handshake"))?
}

/// Serves HTTP/1 requests on `io` until the client closes, a header does not arrive within
/// [`HEADER_READ`], a write waits on the client for [`WRITE_STALL`], the connection is
/// [`MAX_CONNECTION_AGE`] old, or the server stops (`closing`); in the last two the request in
/// progress is answered first.
async fn serve_http<IO>(io: IO, app: axum::Router, mut closing: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    let conn = builder.serve_connection(
        hyper_util::rt::TokioIo::new(write_deadline(io)),
        hyper_util::service::TowerToHyperService::new(app),
    );
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!("metrics connection: {e}");
            }
            return;
        }
        _ = closing.wait_for(|closing| *closing) => {}
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// `io` whose writes must make progress: a write or flush that stays blocked for
/// [`WRITE_STALL`] (the peer stopped reading and the socket's buffers are full) fails with
/// `TimedOut`, which ends the connection (`tokio-io-timeout`; the timer restarts whenever a
/// write completes). Reads are `io`'s own (hyper bounds the header's wait).
fn write_deadline<IO: AsyncRead + AsyncWrite>(
    io: IO,
) -> std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<IO>>> {
    let mut stream = tokio_io_timeout::TimeoutStream::new(io);
    stream.set_write_timeout(Some(WRITE_STALL));
    Box::pin(stream)
}

#[cfg(test)]
mod tests {
    use super::loopback_host;

    #[test]
    fn only_loopback_hosts_are_loopback() {
        for host in [
            "127.0.0.1:9090",
            "localhost",
            "LOCALHOST:80",
            "[::1]:9090",
            "127.1.2.3",
        ] {
            assert!(loopback_host(Some(host)), "{host}");
        }
        for host in [
            "attacker.example",
            "evil:9090",
            "10.0.0.1:9090",
            "[::2]:1",
            "",
            "localhost.evil",
        ] {
            assert!(!loopback_host(Some(host)), "{host}");
        }
        assert!(loopback_host(None));
    }
}
