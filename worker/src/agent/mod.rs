//! The node agent: one session with the coordinator (`dapt-worker --coordinator URL`).
//!
//! It joins, sends heartbeats, and runs each generation's training on an OS thread
//! ([`rank::train`]) off the async runtime. An assignment replaces the running generation; an
//! abort order fires the ring's abort handle, waits for the thread to stop and confirms; a
//! finish ends the agent. A stop order (the operator stopping the job at the coordinator) sets
//! the generation's stop flag: its ranks checkpoint the step in progress and end their training
//! ([`rank::train`]). Ctrl-C or SIGTERM on the worker itself aborts the step in flight and exits
//! (status 130), whatever the agent is waiting on, joining again included: the last committed
//! checkpoint stays as it was (after a stop the coordinator asked for, it says so instead: the
//! launcher signals its workers once the job stopped). A session lost without a refusal is
//! joined again: under etcd membership by re-attaching to the next leader, under embedded
//! membership by joining the same coordinator anew (for `--connect-timeout-s`).

mod lease;
pub mod rank;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dapt_proto::auth::{self, Key};
use dapt_proto::job::JobSpec;
use dapt_proto::join;
use dapt_proto::rpc::{
    self, coordinator_message, worker_message::Kind, CoordinatorClient, Refusal, WorkerMessage,
};
use tokio::sync::mpsc;

use crate::collective::{AbortHandle, RingListener, TcpRing};
use rank::{Progress, RankError};

/// `Debug` leaves the token out (a `?options` in a log line must not print it).
#[derive(Clone)]
pub struct AgentOptions {
    /// The coordinator's URL, e.g. `http://10.0.0.1:7070`.
    pub coordinator: String,
    /// The job this worker is for: a coordinator of another job refuses it.
    pub job: String,
    pub worker_id: String,
    pub token: String,
    /// The collective's listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// The collective endpoint other ranks dial, when `listen` is not reachable as it is
    /// (e.g. it is 0.0.0.0).
    pub advertise: Option<String>,
    /// Where this worker's rank trains: the CPU, or one GPU (one worker per GPU).
    pub placement: rank::Placement,
    /// How long to keep trying to reach the coordinator at the start.
    pub connect_timeout: Duration,
    /// TLS to the coordinator: the pinned CA, a client certificate. The same for every
    /// coordinator this worker joins (a standby that takes over included).
    pub tls: dapt_proto::tls::ClientTls,
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("coordinator", &self.coordinator)
            .field("job", &self.job)
            .field("worker_id", &self.worker_id)
            .field("token", &"<redacted>")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("placement", &self.placement)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// How the agent ended, when it ended well.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentExit {
    Finished {
        step: u64,
        checkpoint: String,
    },
    /// Ended by SIGINT or SIGTERM; `stopped_at`: the step whose checkpoint the job had stopped
    /// at, as the coordinator asked, when that was the last thing this worker did (the launcher
    /// or a node script then signals its workers).
    Interrupted {
        stopped_at: Option<u64>,
    },
}

/// The end on a signal, before the agent says where a stop left it (at its end).
const SIGNALLED: AgentExit = AgentExit::Interrupted { stopped_at: None };

/// Runs the agent to its end.
pub fn run(options: AgentOptions) -> anyhow::Result<AgentExit> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(session(options))
}

struct Generation {
    generation: u64,
    rank: u32,
    abort: AbortHandle,
    /// Set by the coordinator's `Stop`: read by the training thread at each step.
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// SIGINT (Ctrl-C) and SIGTERM, caught from the start of the session: whatever the agent is
/// waiting on (the coordinator, a re-join, a generation's end), either one ends it.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Errors: the runtime could not install the handlers.
    fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// `work`'s output, or `None` when a signal comes first (`work` is dropped).
    async fn unless<T>(&mut self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            out = work => Some(out),
            _ = self.recv() => None,
        }
    }
}

impl Generation {
    /// Fires the abort and waits until the training thread is gone.
    async fn stop(self) {
        self.abort.abort();
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

async fn session(mut o: AgentOptions) -> anyhow::Result<AgentExit> {
    if o.placement.device == crate::device::DeviceSpec::Vulkan {
        anyhow::bail!(rank::VULKAN_NOT_A_RANK);
    }
    if let crate::device::DeviceSpec::Cuda(ordinal) = o.placement.device {
        // Before joining: a worker that cannot train must not become a rank.
        let info = crate::device::cuda_ready(ordinal)?;
        o.placement.peak_flops = dapt_proto::device::peak_flops(&info.name);
        tracing::info!(device = %o.placement.device, name = %info.name, precision = %o.placement.precision, "training on the gpu");
    } else if o.placement.engine == crate::device::EngineKind::Resident {
        tracing::info!(precision = %o.placement.precision, "the resident (GPU) engine on the cpu");
    }
    let devices = vec![o.placement.device.to_string()];
    // The ring admits only peers that prove this key: the job's members (see `collective`).
    let ring_key = Key::ring(&o.token, &o.job);
    let listener = Arc::new(
        TcpRing::bind(o.listen, ring_key)
            .with_context(|| format!("binding the collective's listen address {}", o.listen))?,
    );
    let endpoint = o
        .advertise
        .clone()
        .unwrap_or_else(|| listener.local_addr().to_string());
    // Everything for the coordinator goes through `outbox`; the loop below forwards it to the
    // current session, so that a new session (after a coordinator failover) picks up where the
    // old one stopped.
    let (outbox, mut outbox_rx) = mpsc::unbounded_channel::<Kind>();
    let send = move |kind: Kind| {
        let _ = outbox.send(kind);
    };
    let key = Key::control(&o.token);
    let join = rpc::Join {
        job: o.job.clone(),
        worker_id: o.worker_id.clone(),
        devices: devices.clone(),
        version: rpc::VERSION.to_string(),
        collective_endpoint: endpoint.clone(),
        attach_generation: 0,
        attach_rank: 0,
        proof: Vec::new(),
    };
    let mut signals = Signals::catch()?;
    let Some(session) = signals
        .unless(Session::open(
            &o.coordinator,
            &o.tls,
            o.connect_timeout,
            &key,
            join.clone(),
        ))
        .await
    else {
        return Ok(SIGNALLED);
    };
    let mut session = session?;
    let job: JobSpec =
        serde_json::from_str(&session.joined.job_json).context("the job the coordinator sent")?;
    tracing::info!(worker = %o.worker_id, job = %job.job, %endpoint, coordinator = %o.coordinator, "joined");
    let membership = match job.cluster.etcd() {
        Some(spec) => {
            let register = lease::Membership::register(
                spec,
                &job.job,
                &o.worker_id,
                &endpoint,
                &devices,
                o.connect_timeout,
            );
            match signals.unless(register).await {
                Some(m) => Some(m?),
                None => return Ok(SIGNALLED),
            }
        }
        None => None,
    };

    let progress = Arc::new(Progress::default());
    let heartbeat = {
        let progress = progress.clone();
        let send = send.clone();
        let every = Duration::from_millis(u64::from(session.joined.heartbeat_interval_ms.max(10)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                send(Kind::Heartbeat(rpc::Heartbeat {
                    generation: progress.generation.load(Ordering::Relaxed),
                    step: progress.step.load(Ordering::Relaxed),
                    phase: progress.phase() as i32,
                    collective: progress.collective(),
                }));
            }
        })
    };
    let job = Arc::new(job);
    let mut current: Option<Generation> = None;
    // Reports of the running generation, replayed to a coordinator that takes over; trimmed
    // to what the last durable commit does not cover.
    let mut replay: Vec<Kind> = Vec::new();
    let result = loop {
        let message = tokio::select! {
            m = session.inbound.message() => m,
            Some(kind) = outbox_rx.recv() => {
                // Only etcd membership re-attaches, so only it needs the replay.
                if membership.is_some() && matches!(kind, Kind::Step(_) | Kind::Checkpoint(_)) {
                    replay.push(kind.clone());
                }
                session.send(kind);
                continue;
            }
            _ = signals.recv() => break Ok(SIGNALLED),
        };
        let kind = match message {
            Ok(Some(rpc::CoordinatorMessage { kind: Some(kind) })) => kind,
            Ok(Some(_)) => continue,
            Err(status) if Refusal::from_status(&status).is_some() => break Err(refused(status)),
            Ok(None) | Err(_) if membership.is_some() => {
                // etcd membership: the coordinator went away, not this worker. Keep training
                // and re-attach to whoever leads next.
                let lead = membership.as_ref().expect("etcd membership");
                let mut attach = join.clone();
                if let Some(g) = &current {
                    attach.attach_generation = g.generation;
                    attach.attach_rank = g.rank;
                }
                tracing::warn!(
                    generation = attach.attach_generation,
                    "lost the coordinator; re-attaching to the next leader"
                );
                let reattach = reattach(lead, &key, attach, &o.tls, o.connect_timeout);
                match signals.unless(reattach).await {
                    None => break Ok(SIGNALLED),
                    Some(Ok(s)) => {
                        session = s;
                        for kind in &replay {
                            session.send(kind.clone());
                        }
                        tracing::info!(replayed = replay.len(), "re-attached");
                    }
                    Some(Err(e)) => break Err(e),
                }
                continue;
            }
            Ok(None) | Err(_) => {
                // Embedded membership: the coordinator ended this session (it declared this
                // worker lost: a partition, a stall) or went away (a restart). Join it again as
                // a new member; the generation this worker was in is stale by now, and its
                // reports until the next assignment are refused as such.
                tracing::warn!("lost the session with the coordinator; joining it again");
                // Its generation is stale: stopped before it writes anything more (a checkpoint
                // over the new generation's).
                if let Some(g) = current.take() {
                    g.stop().await;
                }
                let open = Session::open(
                    &o.coordinator,
                    &o.tls,
                    o.connect_timeout,
                    &key,
                    join.clone(),
                );
                match signals.unless(open).await {
                    None => break Ok(SIGNALLED),
                    Some(Ok(s)) => {
                        session = s;
                        replay.clear();
                        tracing::info!(coordinator = %o.coordinator, "joined again");
                    }
                    Some(Err(e)) => break Err(e),
                }
                continue;
            }
        };
        match kind {
            coordinator_message::Kind::Assign(a) => {
                if let Some(g) = current.take() {
                    g.stop().await;
                }
                replay.clear();
                progress.forget_stop();
                tracing::info!(
                    generation = a.generation,
                    rank = a.rank,
                    world = a.world,
                    resume_step = a.resume_step,
                    mixture_changes = a.mixture_schedule.len(),
                    "assigned"
                );
                current = Some(start(
                    &job,
                    a,
                    o.placement,
                    &listener,
                    &progress,
                    send.clone(),
                ));
            }
            coordinator_message::Kind::Abort(a) => {
                if let Some(g) = current.take() {
                    if g.generation == a.generation {
                        tracing::warn!(generation = a.generation, reason = %auth::printable(&a.reason), "aborting");
                        g.stop().await;
                        replay.clear();
                    } else {
                        current = Some(g);
                    }
                }
                send(Kind::Aborted(rpc::Aborted {
                    generation: a.generation,
                }));
            }
            coordinator_message::Kind::Stop(s) => match &current {
                Some(g) if g.generation == s.generation => {
                    tracing::warn!(generation = s.generation, reason = %auth::printable(&s.reason), "stopping after the step in progress, with its checkpoint");
                    g.stop.store(true, Ordering::SeqCst);
                }
                // Another generation's: its abort, or the next assignment, follows.
                _ => {}
            },
            coordinator_message::Kind::Finish(f) => {
                break Ok(AgentExit::Finished {
                    step: f.step,
                    checkpoint: f.checkpoint,
                })
            }
            coordinator_message::Kind::Refused(r) => {
                tracing::warn!(code = r.code().as_str_name(), reason = %auth::printable(&r.message), "coordinator refused a message");
            }
            coordinator_message::Kind::Committed(c) => {
                // What that commit covers, a new leader reads from etcd: no need to replay it.
                replay.retain(|kind| match kind {
                    Kind::Step(r) => r.step >= c.step,
                    Kind::Checkpoint(r) => r.step > c.step,
                    _ => true,
                });
            }
            coordinator_message::Kind::Joined(_) | coordinator_message::Kind::Challenge(_) => {}
        }
    };
    if let Some(g) = current.take() {
        g.stop().await;
    }
    // Where a stop the coordinator asked for left this worker, read once the training thread
    // is gone: a stop it finished as the signal came counts.
    let result = match result {
        Ok(AgentExit::Interrupted { .. }) => Ok(AgentExit::Interrupted {
            stopped_at: progress.stopped_at(),
        }),
        other => other,
    };
    heartbeat.abort();
    if let Some(m) = membership {
        // Leave at once rather than when the lease runs out: the job re-forms without waiting.
        m.leave().await;
    }
    result
}

/// One session with a coordinator.
struct Session {
    inbound: tonic::Streaming<rpc::CoordinatorMessage>,
    outbound: mpsc::UnboundedSender<WorkerMessage>,
    joined: rpc::Joined,
}

impl Session {
    /// Connects to `url` and opens a session (for `patience`): the coordinator proves it runs
    /// the job before this worker sends anything about itself (`dapt_proto::join`). A coordinator
    /// busy with other joiners is asked again (for `patience`); any other failure is returned.
    async fn open(
        url: &str,
        tls: &dapt_proto::tls::ClientTls,
        patience: Duration,
        key: &Key,
        join: rpc::Join,
    ) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let mut client = connect(url, tls, patience).await?;
            match join::open(&mut client, key, join.clone()).await {
                Ok(session) => {
                    return Ok(Session {
                        inbound: session.inbound,
                        outbound: session.outbound,
                        joined: session.joined,
                    })
                }
                // Only a busy coordinator is asked again here: any other loss (a refused client
                // certificate shows as one) is the caller's to handle.
                Err(e)
                    if (e.is_busy() || closed_at_once(&e, url))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(%url, error = %e, "joining again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The first call on the connection: a failure may be a refused client
                // certificate.
                Err(join::SessionError::Lost(status)) => anyhow::bail!(
                    "joining the coordinator at {url}: lost the coordinator: {}",
                    dapt_proto::tls::explain_first_call_probing(&status, url, tls).await
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("joining the coordinator at {url}"))
                }
            }
        }
    }

    fn send(&self, kind: Kind) {
        let _ = self.outbound.send(WorkerMessage { kind: Some(kind) });
    }
}

/// Finds the leading coordinator in etcd and joins it with `attach`, for as long as `patience`
/// plus a lease TTL (the time a dead leader's key takes to expire).
async fn reattach(
    membership: &lease::Membership,
    key: &Key,
    attach: rpc::Join,
    tls: &dapt_proto::tls::ClientTls,
    patience: Duration,
) -> anyhow::Result<Session> {
    let deadline = tokio::time::Instant::now() + patience + membership.ttl();
    let mut last_error = None;
    while tokio::time::Instant::now() < deadline {
        if let Some(url) = membership.leader().await {
            match Session::open(&url, tls, Duration::from_secs(2), key, attach.clone()).await {
                Ok(s) => return Ok(s),
                Err(e) => last_error = Some(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no coordinator leads the job")))
        .context("re-attaching to a coordinator")
}

fn start(
    job: &Arc<JobSpec>,
    a: rpc::Assignment,
    placement: rank::Placement,
    listener: &Arc<RingListener>,
    progress: &Arc<Progress>,
    send: impl Fn(Kind) + Send + 'static,
) -> Generation {
    let abort = AbortHandle::new();
    let stop = Arc::new(AtomicBool::new(false));
    let generation = a.generation;
    let rank = a.rank;
    let (job, listener, progress, thread_abort, thread_stop) = (
        job.clone(),
        listener.clone(),
        progress.clone(),
        abort.clone(),
        stop.clone(),
    );
    let thread = std::thread::Builder::new()
        .name(format!("train-g{generation}"))
        .spawn(move || {
            // A panic on this thread is a failure like any other: caught here and reported,
            // or the coordinator would wait on a rank that heartbeats and never trains.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rank::train(
                    &job,
                    &a,
                    placement,
                    &listener,
                    &thread_abort,
                    &thread_stop,
                    &progress,
                    &send,
                )
            }))
            .unwrap_or_else(|payload| {
                Err(RankError::Failed {
                    message: format!(
                        "the training thread panicked: {}",
                        panic_message(payload.as_ref())
                    ),
                    peer_fault: false,
                    // A bug, not the data: the coordinator re-forms, and fails the job once
                    // every generation fails the same way.
                    fatal: false,
                })
            });
            match result {
                Ok(rank::RankEnd::Done) => tracing::info!(generation, "generation's training done"),
                Ok(rank::RankEnd::Stopped { step }) => {
                    progress.stopped(step);
                    tracing::info!(
                        generation,
                        step,
                        "stopped as the coordinator asked, with this step's checkpoint"
                    )
                }
                Err(RankError::Aborted) => tracing::info!(generation, "training aborted"),
                Err(RankError::Failed {
                    message,
                    peer_fault,
                    fatal,
                }) => {
                    // Reported first: whatever happens to the log line (a full disk under it),
                    // the coordinator hears of the failure.
                    send(Kind::Failed(rpc::Failed {
                        generation,
                        // Within what the coordinator reads of one message.
                        reason: rpc::bounded_text(message.clone()),
                        peer_fault,
                        fatal,
                    }));
                    tracing::error!(generation, peer_fault, fatal, "training failed: {message}");
                }
            }
        })
        .expect("spawning the training thread");
    Generation {
        generation,
        rank,
        abort,
        stop,
        thread,
    }
}

/// The message a panic was raised with (`panic!("...")`, `expect`, an index out of bounds).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Whether the coordinator closed a plain-HTTP connection before it answered the session, and
/// trying again may help: it closes a connection at once when its address, or all addresses
/// together, hold as many as it keeps (a stranger flooding it; docs/control-plane.md#security).
/// Over https such a connection fails its TLS handshake, which [`connect`] tries again; a
/// connection closed after the handshake means a refused client certificate, which waiting
/// does not change.
fn closed_at_once(e: &join::SessionError, url: &str) -> bool {
    let join::SessionError::Lost(status) = e else {
        return false;
    };
    url.starts_with("http://")
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        )
}

/// A client of the coordinator at `url`, retried for `patience` while it cannot be reached; a
/// refused certificate (either side's) ends the attempts at once: waiting does not change it.
async fn connect(
    url: &str,
    tls: &dapt_proto::tls::ClientTls,
    patience: Duration,
) -> anyhow::Result<CoordinatorClient<tonic::transport::Channel>> {
    let endpoint = dapt_proto::tls::endpoint(url, tls)?.connect_timeout(Duration::from_secs(5));
    if endpoint.uri().scheme_str() == Some("http") && !dapt_proto::tls::is_loopback_url(url) {
        tracing::warn!(
            coordinator = %url,
            "joining without TLS: every message (not the token, which is only ever proven) crosses \
             the network in clear text (an https:// coordinator and --coordinator-ca prevent it)"
        );
    }
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(CoordinatorClient::new(channel)),
            Err(e) if dapt_proto::tls::is_tls_failure(&e) => anyhow::bail!(
                "cannot reach the coordinator at {url}: {}",
                dapt_proto::tls::explain(&e)
            ),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("coordinator {url} not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!(
                "cannot reach the coordinator at {url}: {}",
                dapt_proto::tls::explain(&e)
            ),
        }
    }
}

/// A gRPC status as an error; a refusal keeps its code in the message, a TLS failure says what
/// to check.
fn refused(status: tonic::Status) -> anyhow::Error {
    match Refusal::from_status(&status) {
        Some(r) => anyhow::anyhow!("the coordinator refused this worker: {r}"),
        None => anyhow::anyhow!(
            "lost the coordinator: {}",
            dapt_proto::tls::explain(&status)
        ),
    }
}
