//! Bounds on `Status` requests, applied before their message is read. A `Status` request is
//! answered only once its whole message has arrived and proven the token, so until then it is a
//! stranger's: 2 connections with 128 streams each, every one announcing a 4 MiB message and
//! sending most of it, took the coordinator from 19 MB to 1 GB. The message size is bounded by
//! `max_decoding_message_size` ([`crate::server::MAX_MESSAGE`]); this bounds how many are read at
//! once ([`STATUS_LIMITS`]: per address and in all; more are refused at once with
//! `RESOURCE_EXHAUSTED`) and for how long ([`STATUS_DEADLINE`]). `dapt status` sends one small
//! request and reads its answer at once.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::task::{Context, Poll};
use std::time::Duration;

use dapt_proto::logging::Throttle;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::net::{connection, Limits, Places};

/// The method bounded here.
const STATUS_PATH: &str = "/dapt.v1.Coordinator/Status";
/// `Status` requests read at once: 4 from one address, 16 in all.
pub const STATUS_LIMITS: Limits = Limits {
    per_address: 4,
    total: 16,
};
/// How long a `Status` request may take to arrive whole.
pub const STATUS_DEADLINE: Duration = Duration::from_secs(5);

/// Refused for want of a place, logged at most once per 10 s with a count.
static TOO_MANY: Throttle = Throttle::new(Duration::from_secs(10));

/// The coordinator's gRPC service with its `Status` requests bounded.
#[derive(Clone)]
pub struct StatusLimit<S> {
    inner: S,
    places: Places,
}

impl<S> StatusLimit<S> {
    pub fn new(inner: S) -> Self {
        StatusLimit {
            inner,
            places: Places::new(STATUS_LIMITS),
        }
    }
}

impl<S, B> Service<http::Request<B>> for StatusLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STATUS_PATH {
            return Box::pin(self.inner.call(request));
        }
        // A request from no known connection (none in tests) counts under one address.
        let key = connection(request.extensions()).map_or(
            crate::net::PeerKey::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            |c| c.key,
        );
        let ip = key.ip;
        let place = match self.places.take(key) {
            Ok(place) => place,
            Err(verdict) => {
                if let Some(refused) = TOO_MANY.admit() {
                    tracing::warn!(
                        peer = %ip,
                        refused,
                        reason = verdict.reason(),
                        "too many status requests at once: refused status requests"
                    );
                }
                let refusal = Status::resource_exhausted("too many status requests at once");
                return Box::pin(std::future::ready(Ok(refusal.into_http())));
            }
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = tokio::time::timeout(STATUS_DEADLINE, answer).await;
            drop(place);
            match answer {
                Ok(answer) => answer,
                Err(_) => Ok(Status::deadline_exceeded(
                    "the status request did not arrive in time",
                )
                .into_http()),
            }
        })
    }
}

impl<S: NamedService> NamedService for StatusLimit<S> {
    const NAME: &'static str = S::NAME;
}
