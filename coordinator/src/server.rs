//! The coordinator at run time: the gRPC service turns what workers say into [`Event`]s on one
//! channel; one task owns the [`JobState`], feeds each event (and a timer tick) through
//! [`decide`], and carries out the actions: messages to sessions, commits to the ledger, log lines.
//! No lock is held across an `.await`; the sessions' senders sit in a map the task reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dapt_proto::auth;
use dapt_proto::job::JobSpec;
use dapt_proto::join;
use dapt_proto::rpc::{
    self, coordinator_message, worker_message, CoordinatorMessage, CoordinatorServer, ErrorCode,
    Generation, Refusal, StatusReply, StatusRequest, WorkerId, WorkerMessage,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::control::{
    decide_checked, Action, ConnId, ControlConfig, Event, JobState, JoinRequest, Phase, StepInfo,
    StepTimes,
};
use crate::etcd::{Committer, EtcdStore};
use crate::ledger::Ledger;
use crate::progress::Progress;

/// How often time-based decisions (timeouts, the formation grace) are made.
const TICK: Duration = Duration::from_millis(100);

/// How the job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed {
        step: u64,
        checkpoint: PathBuf,
    },
    Failed(String),
    /// This coordinator stopped leading (etcd: its lease gone, or another wrote the
    /// generation); the job goes on under the one that leads now.
    SteppedDown(String),
    Stopped {
        reason: String,
        committed: Option<(u64, PathBuf)>,
    },
}

/// A running coordinator.
pub struct Handle {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    events: mpsc::UnboundedSender<Event>,
    progress: Arc<Mutex<Progress>>,
    status: watch::Receiver<StatusReply>,
    done: tokio::task::JoinHandle<Outcome>,
}

/// Stops a running coordinator's job from elsewhere (a signal handler).
#[derive(Clone)]
pub struct Stopper(mpsc::UnboundedSender<Event>);

impl Stopper {
    /// Stops the job now: every rank aborts the step in flight; committed checkpoints stay.
    pub fn shutdown(&self, reason: &str) {
        let _ = self.0.send(Event::Shutdown {
            reason: reason.to_string(),
        });
    }

    /// Asks the job to stop after the step in progress, with its checkpoint committed
    /// ([`Event::Stop`]); asked a second time, it stops at once.
    pub fn stop(&self, reason: &str) {
        let _ = self.0.send(Event::Stop {
            reason: reason.to_string(),
        });
    }
}

impl Handle {
    pub fn events(&self) -> Stopper {
        Stopper(self.events.clone())
    }

    /// The job's status as `dapt status` reads it, as it changes (its `phase` is
    /// [`Phase::name`]'s).
    pub fn status(&self) -> watch::Receiver<StatusReply> {
        self.status.clone()
    }

    /// The job's figures so far (for the end summary: read it after [`Handle::wait`]).
    pub fn progress(&self) -> Arc<Mutex<Progress>> {
        self.progress.clone()
    }

    pub async fn wait(self) -> Outcome {
        match self.done.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(format!("the control loop died: {e}")),
        }
    }
}

type Outbound = mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>;
type Sessions = Arc<Mutex<HashMap<ConnId, Outbound>>>;

/// Where the job's durable state goes.
enum Store {
    /// `committed.json` and `ledger.jsonl` under the checkpoint directory (embedded).
    Files(Ledger),
    Etcd {
        store: Box<EtcdStore>,
        committer: Committer,
    },
}

/// The job's token, and whether it is the same every run (which binds the job's durable state
/// to it: [`dapt_proto::identity`]).
#[derive(Clone)]
pub enum Token {
    /// `dapt coordinator`'s: given by the user, the same every run.
    Lasting(String),
    /// `dapt launch`'s: made anew every run.
    PerRun(String),
}

impl Token {
    pub fn secret(&self) -> &str {
        match self {
            Token::Lasting(t) | Token::PerRun(t) => t,
        }
    }

    fn lasting(&self) -> Option<&str> {
        match self {
            Token::Lasting(t) => Some(t),
            Token::PerRun(_) => None,
        }
    }
}

/// Refuses to start over `dapt train`'s checkpoints: a `step-N` past the committed step (or any,
/// with nothing committed) whose `trainer.json` records no generation was written by a single
/// rank without a coordinator (or by a dapt from before generations were recorded). The job would
/// start from its own committed state and prune them; before, `dapt launch` after `dapt train`
/// started at step 0 and deleted them without a word (an audit).
fn refuse_single_rank_checkpoints(job: &JobSpec, committed: Option<u64>) -> anyhow::Result<()> {
    let ahead: Vec<(u64, std::path::PathBuf)> = dapt_proto::checkpoint::list(&job.checkpoint.dir)
        .into_iter()
        .filter(|(step, _, _)| committed.is_none_or(|c| *step > c))
        .filter(|(_, dir, _)| {
            dapt_proto::checkpoint::trainer_state(dir)
                .is_some_and(|state| state.get("generation").is_none())
        })
        .map(|(step, dir, _)| (step, dir))
        .collect();
    if let Some((_, dir)) = ahead.last() {
        anyhow::bail!(
            "{}: checkpoint.dir holds {} (and {} more) past the last committed step ({}), \
             written without a coordinator (`dapt train`): a coordinator starts from its own \
             committed checkpoint and would prune them; go on with `dapt train`, or move the \
             step-* directories past it out of checkpoint.dir to run the job under a coordinator \
             from its last commit",
            job.checkpoint.dir.display(),
            dir.display(),
            ahead.len() - 1,
            committed.map_or("none".to_string(), |c| c.to_string()),
        );
    }
    Ok(())
}

/// Refuses a committed checkpoint that cannot be this job's: a directory outside its
/// `checkpoint.dir` (another job's state), or a step past its total (another job's, or the job
/// file's `training.tokens` cut below what was trained). `source` names where it was read.
fn check_committed(
    job: &JobSpec,
    total_steps: u64,
    committed: &crate::control::Committed,
    source: &str,
) -> anyhow::Result<()> {
    let root = &job.checkpoint.dir;
    let dir = std::path::Path::new(&committed.dir);
    let inside = dir.is_absolute() == root.is_absolute()
        && dir.starts_with(root)
        && dir != root.as_path()
        && !dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    anyhow::ensure!(
        inside,
        "{source}: the committed checkpoint {} is not under the job's checkpoint.dir {}: that state is another job's (refusing to resume from it)",
        committed.dir,
        root.display()
    );
    anyhow::ensure!(
        committed.step <= total_steps,
        "{source}: the committed step {} is past the job's {total_steps} steps (training.tokens): that state is another job's, or training.tokens was cut below what was trained; restore training.tokens to at least {} tokens, or use another checkpoint.dir",
        committed.step,
        job.training
            .map_or(0, |t| t.tokens_per_step())
            .saturating_mul(committed.step)
    );
    Ok(())
}

/// Binds `listen`, starts serving and supervising `job`, and returns once this coordinator
/// leads (at once with embedded membership; with etcd, after winning the election).
/// `advertise` is the URL workers reach it at (default: `http://<listen address>`).
pub async fn start(
    job: JobSpec,
    token: Token,
    listen: SocketAddr,
    advertise: Option<String>,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<Handle> {
    let training = job
        .training
        .ok_or_else(|| anyhow::anyhow!("the job has no `training:` section"))?;
    let tls = match &job.cluster.tls {
        Some(spec) => Some(dapt_proto::tls::server(spec)?),
        None => None,
    };
    let fds = match crate::net::raise_fd_limit() {
        Ok(fds) => {
            tracing::info!(open_files = fds, "open-file limit");
            fds
        }
        Err(e) => {
            tracing::warn!("reading the open-file limit: {e}; assuming 1024");
            1024
        }
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let url = advertised_url(advertise, addr, tls.is_some())?;
    match &tls {
        Some(tls) => tracing::info!(mutual = tls.mutual, "serving over TLS"),
        None if !addr.ip().is_loopback() => tracing::warn!(
            %addr,
            "serving without TLS on a network address: every message (not the token, which is only \
             ever proven) crosses the network in clear text and a relay in the middle could alter \
             it (give cluster.tls in the job, or --tls-cert and --tls-key)"
        ),
        None => {}
    }
    let c = &job.cluster;
    let mut lost = None;
    let sessions: Sessions = Arc::default();
    let identity = dapt_proto::identity::JobIdentity::new(&job, token.lasting());
    // Held while this coordinator leads (embedded membership): no second coordinator of
    // checkpoint.dir, of this job or another.
    let mut dir_lock = None;
    let (mut store, committed, record, formed) = match c.etcd() {
        None => {
            let (ledger, committed, lock) = Ledger::claim(&job, &identity)?;
            dir_lock = Some(lock);
            if let Some(c) = &committed {
                let source = job.checkpoint.dir.join(crate::ledger::COMMITTED_FILE);
                check_committed(&job, training.steps(), c, &source.display().to_string())?;
            }
            refuse_single_rank_checkpoints(&job, committed.as_ref().map(|c| c.step))?;
            let formed = ledger.last_generation()?;
            (Store::Files(ledger), committed, None, formed)
        }
        Some(spec) => {
            let (mut store, lost_flag) = EtcdStore::lead(spec, &job, &url, &identity).await?;
            lost = Some(lost_flag);
            // Under etcd the lease fences the leaders (a flock would outlive a deposed leader
            // that hangs, and hold the next one off); checkpoint.dir's job.json is checked, or
            // written, where this machine sees the directory.
            if job.checkpoint.dir.is_dir() {
                crate::ledger::check_foreign(&job.checkpoint.dir)?;
                dapt_proto::identity::check_or_write(&job.checkpoint.dir, &identity)?;
            }
            let (mut committed, mut record) = store.load().await?;
            if let Some(c) = &committed {
                let key = dapt_proto::job::keys::committed(&spec.prefix, &job.job);
                check_committed(&job, training.steps(), c, &format!("etcd key {key}"))?;
            }
            let formed = record.as_ref().map(|r| r.generation);
            if let Some(c) = &committed {
                if let Some(earlier) = crate::ledger::fallback(&job.checkpoint.dir, c)? {
                    store.fall_back(&earlier, &[]).await?;
                    committed = Some(earlier);
                    // The running generation trained past the corrupt checkpoint; what it
                    // reports cannot fill in the steps now to be trained again: form anew.
                    record = None;
                }
            }
            let announce = {
                let sessions = sessions.clone();
                move |c: &crate::control::Committed| broadcast_committed(&sessions, c)
            };
            let committer = store.committer(
                job.checkpoint.dir.clone(),
                job.checkpoint.keep,
                Box::new(announce),
            );
            let store = Store::Etcd {
                store: Box::new(store),
                committer,
            };
            (store, committed, record, formed)
        }
    };
    let gate = Arc::new(Gate {
        job: job.job.clone(),
        key: auth::Key::control(token.secret()),
        seen_status: Default::default(),
    });
    let config = ControlConfig {
        job: job.job.clone(),
        version: rpc::VERSION.to_string(),
        min_workers: c.min_workers as usize,
        max_workers: c.max_workers.map(|m| m as usize),
        session_timeout: Duration::from_millis(c.session_timeout_ms),
        formation_grace: Duration::from_millis(c.formation_grace_ms),
        abort_timeout: Duration::from_millis(c.abort_timeout_ms),
        total_steps: training.steps(),
        global_batch: training.global_batch,
        micro_batch: training.micro_batch(),
        max_failed_generations: 3,
        stall: crate::control::StallConfig {
            factor: c.stall_factor,
            floor: Duration::from_millis(c.stall_floor_ms),
            timeout: (c.stall_timeout_s > 0).then(|| Duration::from_secs(c.stall_timeout_s)),
        },
        eval_every: training.eval_every,
        checkpoint_every: job.checkpoint.every,
        sources: job
            .corpus
            .sources
            .0
            .iter()
            .map(|s| s.name.to_string())
            .collect(),
    };
    if let Some(committed) = &committed {
        tracing::info!(
            step = committed.step,
            checkpoint = %committed.dir,
            "resuming from the committed checkpoint"
        );
        // The ranks say it too, but under `dapt launch` only into their own logs.
        if let Some(recorded) =
            dapt_proto::checkpoint::recorded_training(std::path::Path::new(&committed.dir))
        {
            let changed = dapt_proto::checkpoint::changed_training(&recorded, &training);
            if !changed.is_empty() {
                tracing::warn!(
                    checkpoint = %committed.dir,
                    changed = %changed.join(", "),
                    "resuming with other training settings than the checkpoint was trained under (the job file was edited)"
                );
            }
        }
        // The ranks re-warm the rate when the edit would make it jump; said here too.
        if let Some((recorded, tokens)) =
            dapt_proto::checkpoint::recorded_schedule(std::path::Path::new(&committed.dir))
        {
            dapt_proto::schedule::LrSchedule::of(&training).resume(
                Some(&recorded),
                tokens,
                training.tokens_per_step(),
            );
        }
    }
    let unfinished = committed
        .as_ref()
        .is_none_or(|c| c.step < config.total_steps);
    let guard = crate::guard::Guard::new(
        &job,
        &committed
            .as_ref()
            .map(|c| c.guard_base.clone())
            .unwrap_or_default(),
        committed.as_ref().map_or(&[][..], |c| &c.schedule),
    );
    let state = match record.filter(|_| unfinished) {
        Some(record) => {
            // A generation was running under the previous leader: its ranks keep training and
            // re-attach here; they have a session timeout plus a lease TTL to find this leader.
            let now = Instant::now();
            let patience = config.session_timeout
                + Duration::from_secs(c.etcd.as_ref().map_or(0, |e| e.lease_ttl_s));
            tracing::info!(
                generation = record.generation,
                ranks = %record.ranks.join(","),
                "taking over the running generation; waiting for its ranks to re-attach"
            );
            JobState::take_over(config, committed, record, now, now + patience)
        }
        None => JobState::new(config, committed).after_generation(formed.map(Generation)),
    }
    .with_guard(guard);
    let (events, rx) = mpsc::unbounded_channel();
    if let Store::Etcd { store, .. } = &mut store {
        store.watch_members(events.clone());
    }
    let (status_tx, status_rx) = watch::channel(snapshot(&state));
    // The gRPC and metrics servers run until the control loop says stop (or is gone).
    let (stop_servers, servers_stop) = watch::channel(false);
    let until_stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let metrics = Arc::new(crate::metrics::Metrics::new(&job.job));
    let dashboard = Arc::new(Mutex::new(crate::dashboard::Dashboard::for_job(
        &job,
        Instant::now(),
    )));
    let mut metrics_addr = None;
    if let Some(addr) = metrics_listen {
        let listener = crate::metrics::bind(addr).await?;
        metrics_addr = Some(listener.local_addr()?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(addr = %listener.local_addr()?, scheme, "serving /metrics");
        if !addr.ip().is_loopback() {
            // A deliberate choice (docs/control-plane.md#security): Prometheus scrapes without
            // the job's token; whoever reaches this address reads the job's progress.
            tracing::warn!(%addr, "/metrics and the dashboard have no authentication: bind them where only your monitoring and your people reach");
        }
        tokio::spawn(crate::metrics::serve(
            crate::net::Incoming::new(listener, crate::net::Limits::metrics(fds), None, "metrics"),
            tls.as_ref().map(|t| t.http.clone()),
            metrics.clone(),
            dashboard.clone(),
            status_rx.clone(),
            until_stopped(servers_stop.clone()),
        ));
    }
    let incoming = crate::net::Incoming::new(
        listener,
        crate::net::Limits::grpc(fds),
        Some(crate::net::FIRST_REQUEST),
        "grpc",
    );
    let service = Service {
        events: events.clone(),
        sessions: sessions.clone(),
        next_conn: Arc::new(AtomicU64::new(1)),
        status: status_rx.clone(),
        joined: Arc::new(serde_json::to_string(&job).expect("a job spec serializes")),
        heartbeat_ms: c.heartbeat_ms as u32,
        gate,
        unjoined: Unjoined::new(),
    };
    // Bounded for strangers: connections per address and in all, and a deadline for the first
    // request (`incoming`); dead connections are found by HTTP/2 pings; one connection cannot
    // open streams without end; no message is larger than `MAX_MESSAGE`, and `Status` requests
    // are read a few at a time (`StatusLimit`).
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        // hyper's guard against a client that makes the server reset stream after stream
        // ("MadeYouReset"): a GOAWAY after 1,024 (tonic's default leaves it off).
        .http2_max_local_error_reset_streams(Some(1024));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.grpc)?;
    }
    tokio::spawn(async move {
        let result = builder
            .add_service(crate::status_limit::StatusLimit::new(
                CoordinatorServer::new(service).max_decoding_message_size(MAX_MESSAGE),
            ))
            .serve_with_incoming_shutdown(incoming, until_stopped(servers_stop))
            .await;
        if let Err(e) = result {
            tracing::error!("gRPC server: {e}");
        }
    });
    tracing::info!(%addr, %url, job = %job.job, steps = training.steps(), "coordinator listening");
    let keep = job.checkpoint.keep;
    let progress = Arc::new(Mutex::new(Progress::new(&job)));
    // A resumed job compares its evaluations with the base model's, recorded at a commit (its
    // log, summary and dashboard took their first evaluation after the resume for the base).
    if let Some(committed) = &state.committed {
        let now = Instant::now();
        let mut seeded = progress.lock().expect("progress");
        for (source, &perplexity) in &committed.base_perplexity {
            let line = crate::control::Log::Eval {
                step: 0,
                source: source.clone(),
                perplexity,
                tokens: 0,
            };
            seeded.seed_base(source, perplexity);
            dashboard
                .lock()
                .expect("dashboard")
                .observe(&line, &seeded, now);
        }
    }
    let done = tokio::spawn(control_loop(
        state,
        rx,
        Executor {
            sessions,
            store,
            file_commits: Default::default(),
            checkpoints: job.checkpoint.dir.clone(),
            keep,
            metrics,
            progress: progress.clone(),
            dashboard,
            _dir_lock: dir_lock,
        },
        status_tx,
        stop_servers,
        lost,
    ));
    Ok(Handle {
        addr,
        metrics_addr,
        events,
        progress,
        status: status_rx,
        done,
    })
}

/// The URL workers reach this coordinator at: `advertise`, or `http(s)://<bound address>`. Its
/// scheme must match whether the coordinator serves TLS: under etcd it is what workers find as
/// the leader's address, and a worker that pins the CA joins only an `https://` one.
fn advertised_url(
    advertise: Option<String>,
    addr: SocketAddr,
    tls: bool,
) -> anyhow::Result<String> {
    let scheme = if tls { "https" } else { "http" };
    let Some(url) = advertise else {
        return Ok(format!("{scheme}://{addr}"));
    };
    if !url.starts_with(&format!("{scheme}://")) {
        anyhow::bail!(
            "--advertise {url}: this coordinator serves {}, so its URL starts with {scheme}://",
            if tls {
                "TLS"
            } else {
                "plain HTTP/2 (no cluster.tls)"
            }
        );
    }
    Ok(url)
}

#[allow(clippy::too_many_arguments)]
async fn control_loop(
    mut state: JobState,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut exec: Executor,
    status: watch::Sender<StatusReply>,
    stop_servers: watch::Sender<bool>,
    mut lost: Option<watch::Receiver<bool>>,
) -> Outcome {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deposed = None;
    while !state.phase.is_over() {
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(e) => e,
                None => break,
            },
            _ = ticker.tick() => Event::Tick,
            Ok(()) = async { match lost.as_mut() { Some(l) => l.changed().await, None => std::future::pending().await } } => {
                if lost.as_ref().is_some_and(|l| *l.borrow()) {
                    // Another coordinator may lead by now: decide nothing more, abort nobody
                    // (the workers keep training for the next leader).
                    tracing::error!("lost the etcd leadership: stepping down");
                    deposed = Some("lost the etcd leadership (its lease is gone)".to_string());
                    break;
                }
                continue;
            }
        };
        // A rank that failed on the committed checkpoint: when it is corrupt, the job falls
        // back to an earlier one before the failure is decided on, so that the next
        // generation resumes from that one.
        let decide = exec.fallback_for(&state, event).await;
        for event in decide {
            let (next, actions) = decide_checked(state, event, Instant::now());
            state = next;
            for action in actions {
                if let Err(reason) = exec.run(action).await {
                    // Not leading any more: carry out nothing else (no assignment of a
                    // generation that could not be recorded).
                    deposed = Some(reason);
                    break;
                }
            }
            if deposed.is_some() {
                break;
            }
        }
        status.send_replace(snapshot(&state));
        if deposed.is_some() {
            break;
        }
    }
    if let Some(reason) = deposed {
        exec.sessions.lock().expect("sessions").clear();
        stop_servers.send_replace(true);
        return Outcome::SteppedDown(reason);
    }
    // Let the last orders (finish, abort) reach the workers before the server goes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !exec.sessions.lock().expect("sessions").is_empty() {
        tokio::select! {
            Some(event) = rx.recv() => {
                // Sessions ending; nothing more to decide.
                if let Event::Disconnected { conn, .. } = event {
                    exec.sessions.lock().expect("sessions").remove(&conn);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    exec.sessions.lock().expect("sessions").clear();
    stop_servers.send_replace(true);
    if let Store::Files(files) = &exec.store {
        // The job's end is only as durable as its last commit: one that failed to be written
        // is tried once more, and the job fails if it still cannot be.
        if let Some(step) = exec.file_commits.pending_step() {
            if let Err(e) = exec.file_commits.flush(files) {
                let lost = format!("the commit of step {step} could not be recorded: {e}");
                // A job that failed or stopped keeps its own reason; the lost commit is logged.
                if !matches!(state.phase, Phase::Completed) {
                    tracing::error!("{lost}");
                } else {
                    return Outcome::Failed(lost);
                }
            }
        }
    }
    if let Store::Etcd { committer, .. } = &exec.store {
        // The job's end is only as durable as its last commit: wait for etcd to take it.
        if !flushed(committer, "waiting for etcd to record the last commit").await {
            return Outcome::Failed(
                "lost the etcd leadership before the last commit was recorded".into(),
            );
        }
    }
    match &state.phase {
        Phase::Completed => {
            let c = state.committed.clone().unwrap_or_default();
            Outcome::Completed {
                step: c.step,
                checkpoint: PathBuf::from(c.dir),
            }
        }
        Phase::Stopped(reason) => Outcome::Stopped {
            reason: reason.clone(),
            committed: state
                .committed
                .as_ref()
                .map(|c| (c.step, PathBuf::from(&c.dir))),
        },
        Phase::Failed(reason) => Outcome::Failed(reason.clone()),
        _ => Outcome::Failed("the control loop's event channel closed".into()),
    }
}

/// Waits until etcd holds every commit `committer` was given (saying `waiting` once it takes
/// more than a second); false when this coordinator lost the leadership first.
async fn flushed(committer: &Committer, waiting: &str) -> bool {
    let flush = committer.flush();
    tokio::pin!(flush);
    tokio::select! {
        flushed = &mut flush => flushed,
        _ = tokio::time::sleep(Duration::from_secs(1)) => {
            tracing::warn!("{waiting}");
            flush.await
        }
    }
}

/// Tells every session that `committed` is durable (the workers trim what they keep to replay).
fn broadcast_committed(sessions: &Sessions, committed: &crate::control::Committed) {
    let message = CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Committed(rpc::Committed {
            generation: committed.generation,
            step: committed.step,
        })),
    };
    for tx in sessions.lock().expect("sessions").values() {
        let _ = tx.send(Ok(message.clone()));
    }
}

struct Executor {
    sessions: Sessions,
    store: Store,
    /// The file store's commits not yet written (`Store::Files` only).
    file_commits: crate::ledger::FileCommits,
    /// `checkpoint.dir`, as this machine sees it.
    checkpoints: PathBuf,
    keep: usize,
    metrics: Arc<crate::metrics::Metrics>,
    progress: Arc<Mutex<Progress>>,
    dashboard: Arc<Mutex<crate::dashboard::Dashboard>>,
    /// The lock on checkpoint.dir (embedded membership), held until the control loop ends.
    _dir_lock: Option<dapt_proto::identity::DirLock>,
}

impl Executor {
    /// The events to decide on for `event`. When it is a failure of a rank of the current
    /// generation whose reason names the committed checkpoint, and that checkpoint fails
    /// verification (every file's SHA-256; only on this rare path): [`Event::FellBack`] to the
    /// newest earlier kept checkpoint that verifies, then the failure; or, when none does, the
    /// failure made fatal with the verification's finding (every generation would meet the same
    /// corrupt files: four failed generations and their recoveries went by before the job
    /// failed; an audit). Otherwise `event` alone.
    async fn fallback_for(&self, state: &JobState, event: Event) -> Vec<Event> {
        let Event::Failed {
            reason, generation, ..
        } = &event
        else {
            return vec![event];
        };
        let Some(committed) = state.committed.clone() else {
            return vec![event];
        };
        if *generation != state.generation || !reason.contains(&committed.dir) {
            return vec![event];
        }
        let root = self.checkpoints.clone();
        let found =
            tokio::task::spawn_blocking(move || crate::ledger::fallback(&root, &committed)).await;
        match found {
            Ok(Ok(earlier)) => earlier
                .map(|earlier| Event::FellBack { earlier })
                .into_iter()
                .chain([event])
                .collect(),
            Ok(Err(e)) => {
                tracing::error!("{e}");
                let mut event = event;
                if let Event::Failed { reason, fatal, .. } = &mut event {
                    *reason = format!("{reason}; {e}");
                    *fatal = true;
                }
                vec![event]
            }
            Err(e) => {
                tracing::error!("verifying the committed checkpoint: {e}");
                vec![event]
            }
        }
    }

    fn send(&self, conn: ConnId, message: coordinator_message::Kind) {
        if let Some(tx) = self.sessions.lock().expect("sessions").get(&conn) {
            let _ = tx.send(Ok(CoordinatorMessage {
                kind: Some(message),
            }));
        }
    }

    /// Ends session `conn`, with `status` as its last word if given.
    fn close(&self, conn: ConnId, status: Option<Status>) {
        if let Some(tx) = self.sessions.lock().expect("sessions").remove(&conn) {
            if let Some(status) = status {
                let _ = tx.send(Err(status));
            }
        }
    }

    /// Carries out `action`. An error means this coordinator must stop deciding (it lost the
    /// leadership).
    async fn run(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::Accept { .. } => {
                // The session task sent `Joined` already; acceptance only makes it a member.
            }
            Action::RefuseJoin { conn, refusal } => self.close(conn, Some(refusal.to_status())),
            Action::Refuse { conn, refusal, .. } => {
                self.send(conn, coordinator_message::Kind::Refused(refusal.into()))
            }
            Action::Assign {
                conn,
                assignment: a,
                ..
            } => self.send(
                conn,
                coordinator_message::Kind::Assign(rpc::Assignment {
                    generation: a.generation.0,
                    rank: a.rank,
                    world: a.world,
                    peers: a.peers,
                    resume_step: a.resume_step,
                    checkpoint: a.checkpoint.unwrap_or_default(),
                    micro_batch: a.micro_batch,
                    accumulation: a.accumulation,
                    total_steps: a.total_steps,
                    mixture_schedule: a
                        .schedule
                        .into_iter()
                        .map(|c| rpc::MixtureChange {
                            step: c.step,
                            weights: c.weights,
                        })
                        .collect(),
                }),
            ),
            Action::Abort {
                conn,
                generation,
                reason,
                ..
            } => self.send(
                conn,
                coordinator_message::Kind::Abort(rpc::Abort {
                    generation: generation.0,
                    reason,
                }),
            ),
            Action::Stop {
                conn,
                generation,
                reason,
                ..
            } => self.send(
                conn,
                coordinator_message::Kind::Stop(rpc::Stop {
                    generation: generation.0,
                    reason,
                }),
            ),
            Action::Drop { conn, .. } => self.close(conn, None),
            Action::RecordGeneration(record) => {
                match &mut self.store {
                    Store::Etcd { store, .. } => {
                        // No rank is assigned before its generation is recorded: through an
                        // etcd outage that means waiting (`record_generation_patiently`).
                        if let Err(e) = store.record_generation_patiently(&record).await {
                            return Err(format!("recording generation {}: {e}", record.generation));
                        }
                    }
                    Store::Files(files) => {
                        if let Err(e) = files.record_generation(&record) {
                            // Only a restart's numbering depends on it, and a restart also
                            // counts the generations its checkpoints record
                            // (`Ledger::last_generation`): the job goes on.
                            tracing::error!(
                                generation = record.generation,
                                "recording the generation: {e}"
                            );
                        }
                    }
                }
            }
            Action::Commit { committed, ledger } => match &mut self.store {
                Store::Files(files) => {
                    let step = committed.step;
                    if let Err(e) = self.file_commits.commit(files, committed.clone(), ledger) {
                        // The step stays uncommitted on disk (a restart resumes from the one
                        // before); its ledger entries go with the next commit.
                        tracing::error!(
                            "recording the commit of step {step}: {e}; it is written with the next commit"
                        );
                    } else {
                        broadcast_committed(&self.sessions, &committed);
                        if let Err(e) = files.prune(committed.step, self.keep) {
                            tracing::warn!("pruning old checkpoints: {e}");
                        }
                    }
                }
                // Recorded (and old checkpoints pruned) by the committer task, which retries
                // through an etcd outage; a lost leadership reaches the loop through `lost`.
                Store::Etcd { committer, .. } => committer.commit(committed, ledger),
            },
            Action::FallBack { committed } => match &mut self.store {
                Store::Files(files) => {
                    let step = committed.step;
                    if let Err(e) = self.file_commits.fall_back(files, committed) {
                        tracing::error!(
                            "recording the fallback to the checkpoint of step {step}: {e}; it is written with the next commit"
                        );
                    }
                }
                Store::Etcd { committer, .. } => committer.fall_back(committed),
            },
            Action::Finish {
                conn, step, dir, ..
            } => {
                // The workers leave only once the last commit is durable: told to finish while
                // etcd was down, they exited 0, and a leader lost before etcd took the commit
                // left a job its next leader waited on for ever (an audit).
                if let Store::Etcd { committer, .. } = &self.store {
                    let waiting =
                        "waiting for etcd to record the last commit before the workers finish";
                    if !flushed(committer, waiting).await {
                        return Err(
                            "lost the etcd leadership before the last commit was recorded".into(),
                        );
                    }
                }
                self.send(
                    conn,
                    coordinator_message::Kind::Finish(rpc::Finish {
                        step,
                        checkpoint: dir,
                    }),
                )
            }
            Action::Log(line) => {
                self.metrics.observe(&line);
                let now = Instant::now();
                let mut progress = self.progress.lock().expect("progress");
                progress.observe(&line, now);
                self.dashboard
                    .lock()
                    .expect("dashboard")
                    .observe(&line, &progress, now);
                crate::progress::emit(line, &progress, now);
            }
        }
        Ok(())
    }
}

fn snapshot(state: &JobState) -> StatusReply {
    let last = state.last_step.as_ref();
    StatusReply {
        job: state.config.job.clone(),
        phase: state.phase_name().to_string(),
        generation: state.generation.0,
        members: state
            .members
            .iter()
            .map(|(w, m)| rpc::Member {
                worker_id: w.0.clone(),
                rank: m.rank.map_or(-1, |r| r as i32),
                collective_endpoint: m.endpoint.clone(),
                devices: m.devices.clone(),
            })
            .collect(),
        step: last.map_or(0, |s| s.step + 1),
        total_steps: state.config.total_steps,
        loss: last.map_or(0.0, |s| s.loss),
        tokens_per_s: last.map_or(0.0, |s| {
            let train = if s.times.train.is_zero() {
                s.elapsed
            } else {
                s.times.train
            };
            s.tokens as f64 / train.as_secs_f64().max(1e-9)
        }),
        committed_step: state.committed_step(),
        committed_checkpoint: state
            .committed
            .as_ref()
            .map(|c| c.dir.clone())
            .unwrap_or_default(),
        reason: match &state.phase {
            Phase::Failed(r) | Phase::Stopped(r) => r.clone(),
            _ => String::new(),
        },
        stalls: crate::stall_wire::stalls(&state.stall),
        guard_json: state
            .guard
            .as_ref()
            .and_then(|g| serde_json::to_string(g).ok())
            .unwrap_or_default(),
    }
}

/// How long a session may take to say `Hello`, and then to answer the challenge with `Join`:
/// a worker answers at once; a silent stranger is cut off.
const FIRST_MESSAGE: Duration = Duration::from_secs(10);
/// Sessions that have not proven the token yet, at most; more are refused at once
/// (`RESOURCE_EXHAUSTED`), so strangers cannot pile up sessions.
const MAX_UNJOINED: usize = 64;
/// Of those, at most this many from one IP address: a stranger holding every slot with silent
/// sessions kept the workers (from other addresses) from joining at all. A node's agents join
/// well within it; a refused session tries again (as the workers do).
const MAX_UNJOINED_PER_PEER: usize = 16;
/// Refused sessions are logged at most once per this period, with their count (a stranger's
/// flood logged a line per stream: 18 MB in 45 s).
static REFUSED_SESSIONS: dapt_proto::logging::Throttle =
    dapt_proto::logging::Throttle::new(Duration::from_secs(10));
/// Status requests without the token's proof, the same way.
static REFUSED_STATUS: dapt_proto::logging::Throttle =
    dapt_proto::logging::Throttle::new(Duration::from_secs(10));
static TOO_MANY_UNJOINED: dapt_proto::logging::Throttle =
    dapt_proto::logging::Throttle::new(Duration::from_secs(10));

/// Unjoined sessions per IP address (a session without an address counts as one address).
type PerPeer = Arc<std::sync::Mutex<HashMap<Option<crate::net::PeerKey>, usize>>>;

/// The sessions that have not joined yet: [`MAX_UNJOINED`] in all, [`MAX_UNJOINED_PER_PEER`]
/// per IP address.
#[derive(Clone)]
struct Unjoined {
    total: Arc<tokio::sync::Semaphore>,
    per_peer: PerPeer,
}

/// One session's place among the unjoined, given back when dropped.
struct UnjoinedSlot {
    _total: tokio::sync::OwnedSemaphorePermit,
    peer: Option<crate::net::PeerKey>,
    per_peer: PerPeer,
}

impl Unjoined {
    fn new() -> Self {
        Unjoined {
            total: Arc::new(tokio::sync::Semaphore::new(MAX_UNJOINED)),
            per_peer: Arc::default(),
        }
    }

    /// A place for a session from `peer`, if its address and the whole have one left.
    fn take(&self, peer: Option<crate::net::PeerKey>) -> Option<UnjoinedSlot> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if per_peer
            .get(&peer)
            .is_some_and(|&n| n >= MAX_UNJOINED_PER_PEER)
        {
            return None;
        }
        // The permit first: an address refused for want of one leaves no entry behind.
        let permit = self.total.clone().try_acquire_owned().ok()?;
        *per_peer.entry(peer).or_insert(0) += 1;
        Some(UnjoinedSlot {
            _total: permit,
            peer,
            per_peer: self.per_peer.clone(),
        })
    }
}

impl Drop for UnjoinedSlot {
    fn drop(&mut self) {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}
/// The largest message the coordinator reads (tonic's default: 4 MiB). The largest a worker
/// sends is a `Failed` report, whose reason is an error message (a few hundred bytes; a panic's
/// message at most a few KiB); a `CheckpointReport` carries a path (at most 4 KiB on Linux) and
/// a 32-digit digest; a `Join` a few short strings; a `StatusRequest` 80 bytes. 1 MiB is over
/// 200 times the largest of them, and a quarter of what each of a stranger's streams could make
/// the coordinator hold before.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// HTTP/2 streams one connection may hold open at once (a worker needs one, `dapt status` one;
/// a client multiplexing many simulated workers, like the scale benchmark, 128).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

#[derive(Clone)]
struct Service {
    events: mpsc::UnboundedSender<Event>,
    sessions: Sessions,
    next_conn: Arc<AtomicU64>,
    status: watch::Receiver<StatusReply>,
    joined: Arc<String>,
    heartbeat_ms: u32,
    gate: Arc<Gate>,
    unjoined: Unjoined,
}

/// What a session must prove before it hears anything about the job.
struct Gate {
    job: String,
    /// `auth::Key::control` of the job's token.
    key: auth::Key,
    /// Proven `Status` requests already answered, so that a recorded one is not answered again.
    seen_status: std::sync::Mutex<join::SeenStatusNonces>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl rpc::Coordinator for Service {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        // The first-request deadline stops applying only once the session has joined: a
        // stranger's refused session does not keep its connection open.
        let connection = crate::net::connection(request.extensions()).cloned();
        let peer = connection.as_ref().map(|c| c.peer);
        let Some(unjoined) = self.unjoined.take(connection.as_ref().map(|c| c.key)) else {
            if let Some(refused) = TOO_MANY_UNJOINED.admit() {
                tracing::warn!(
                    peer = ?peer,
                    refused,
                    "too many sessions that have not joined, in all or from this address: refused sessions"
                );
            }
            return Err(Status::resource_exhausted(
                "too many sessions are joining at once; try again",
            ));
        };
        let mut inbound = request.into_inner();
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let events = self.events.clone();
        let sessions = self.sessions.clone();
        let gate = self.gate.clone();
        let joined = rpc::Joined {
            job_json: self.joined.to_string(),
            heartbeat_interval_ms: self.heartbeat_ms,
            version: rpc::VERSION.to_string(),
        };
        tokio::spawn(async move {
            // Nothing about the job, not even its name, goes out before the proof.
            let join = match authenticate(&mut inbound, &tx, &gate).await {
                Ok(join) => join,
                Err(Unjoinable { refusal, proven }) => {
                    // A member's refusal is always logged; a stranger's at most once per 10 s.
                    let refused = if proven {
                        Some(1)
                    } else {
                        REFUSED_SESSIONS.admit()
                    };
                    if let Some(refused) = refused {
                        tracing::warn!(
                            peer = ?peer,
                            code = refusal.code.as_str_name(),
                            reason = %refusal.message,
                            refused,
                            "refused a session"
                        );
                    }
                    let _ = tx.send(Err(refusal.to_status()));
                    return;
                }
            };
            drop(unjoined);
            if let Some(c) = &connection {
                c.used();
            }
            let worker = WorkerId(join.worker_id.clone());
            let _ = tx.send(Ok(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Joined(joined)),
            }));
            // The reader holds only a weak sender: the session's stream ends as soon as the
            // control loop drops the one in `sessions` (a `Drop` or a refusal), even while the
            // worker keeps sending (one cut off by a partition does not know yet).
            let weak = tx.downgrade();
            sessions.lock().expect("sessions").insert(conn, tx);
            // A refusal from the control loop (a duplicate id, another version) ends the
            // session with an error the worker reads after `Joined`.
            if events.send(join_event(conn, join)).is_ok() {
                loop {
                    let message = match inbound.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) | Err(_) => break,
                    };
                    let Some(out) = weak.upgrade() else {
                        // Ended by the coordinator: what still comes in belongs to nobody.
                        break;
                    };
                    match to_event(conn, &worker, message) {
                        Ok(Some(event)) => {
                            if events.send(event).is_err() {
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(refusal) => {
                            let _ = out.send(Err(refusal.to_status()));
                            break;
                        }
                    }
                }
            }
            let _ = events.send(Event::Disconnected { conn, worker });
            sessions.lock().expect("sessions").remove(&conn);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    /// Answers only a request that proves the token (`dapt_proto::join::status_request`).
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let connection = crate::net::connection(request.extensions());
        let peer = connection.map(|c| c.peer);
        let now = join::unix_ms();
        let fresh = join::status_allowed(&self.gate.key, request.get_ref(), now)
            && self
                .gate
                .seen_status
                .lock()
                .expect("seen status nonces")
                .first_use(request.get_ref(), now);
        if !fresh {
            // Logged at most once per 10 s, with a count: a flood logged a line per request
            // (8,900 lines in 10 s).
            if let Some(refused) = REFUSED_STATUS.admit() {
                tracing::warn!(
                    peer = ?peer,
                    refused,
                    "refused a status request without the token's proof"
                );
            }
            return Err(Refusal::new(
                ErrorCode::WrongToken,
                "the request did not prove the job's token (or its clock is more than 5 minutes \
                 off, or it is a recorded request sent again)",
            )
            .to_status());
        }
        // Only a proven request lifts the connection's first-request deadline.
        if let Some(c) = connection {
            c.used();
        }
        Ok(Response::new(self.status.borrow().clone()))
    }
}

/// Why a session did not join, and whether it had proven the job's token first.
struct Unjoinable {
    refusal: Refusal,
    proven: bool,
}

impl From<Refusal> for Unjoinable {
    fn from(refusal: Refusal) -> Self {
        Unjoinable {
            refusal,
            proven: false,
        }
    }
}

/// The coordinator's side of the challenge-response (`dapt_proto::join`): `Hello`, our
/// `Challenge` with our proof, then a `Join` whose proof answers our nonce. Each message within
/// [`FIRST_MESSAGE`]. A refusal tells nothing about the job.
async fn authenticate(
    inbound: &mut Streaming<WorkerMessage>,
    out: &Outbound,
    gate: &Gate,
) -> Result<rpc::Join, Unjoinable> {
    use worker_message::Kind;
    let not_proven = || {
        Refusal::new(
            ErrorCode::WrongToken,
            "the session did not prove the job's token",
        )
    };
    let Kind::Hello(hello) = next_message(inbound).await? else {
        return Err(Refusal::new(
            ErrorCode::NotJoined,
            "the first message of a session must be a Hello",
        )
        .into());
    };
    if hello.nonce.len() != auth::NONCE_LEN {
        return Err(Refusal::new(ErrorCode::Invalid, "a Hello's nonce is 32 bytes").into());
    }
    let ours = auth::nonce().map_err(|e| Refusal::new(ErrorCode::Unspecified, e.to_string()))?;
    let proof = gate.key.tag(
        auth::COORDINATOR_PROOF,
        &[gate.job.as_bytes(), &hello.nonce, &ours],
    );
    let _ = out.send(Ok(CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Challenge(rpc::Challenge {
            nonce: ours.to_vec(),
            proof: proof.to_vec(),
        })),
    }));
    let Kind::Join(join) = next_message(inbound).await? else {
        return Err(not_proven().into());
    };
    if !auth::verify_worker(&gate.key, &join, &hello.nonce, &ours) {
        return Err(not_proven().into());
    }
    if join.worker_id.chars().any(char::is_control) {
        return Err(Unjoinable {
            refusal: Refusal::new(
                ErrorCode::Invalid,
                format!(
                    "worker id `{}` has control characters",
                    auth::printable(&join.worker_id)
                ),
            ),
            proven: true,
        });
    }
    Ok(join)
}

/// The next message of a session that has not joined, within [`FIRST_MESSAGE`].
async fn next_message(
    inbound: &mut Streaming<WorkerMessage>,
) -> Result<worker_message::Kind, Refusal> {
    let refused = |why: &str| Refusal::new(ErrorCode::NotJoined, why);
    match tokio::time::timeout(FIRST_MESSAGE, inbound.message()).await {
        Ok(Ok(Some(WorkerMessage { kind: Some(kind) }))) => Ok(kind),
        Ok(Ok(Some(_))) => Err(refused("an empty message before joining")),
        Ok(Ok(None)) | Ok(Err(_)) => Err(refused("the session ended before it joined")),
        Err(_) => Err(refused("no Hello or Join in time")),
    }
}

/// Text from the wire as it may enter the coordinator's state and log lines: control characters
/// escaped (`auth::printable`). Every string of a worker's messages passes here.
fn clean(text: String) -> String {
    match auth::printable(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(escaped) => escaped,
    }
}

/// The event of an authenticated `Join`.
fn join_event(conn: ConnId, j: rpc::Join) -> Event {
    Event::Join {
        conn,
        request: JoinRequest {
            job: clean(j.job),
            worker: WorkerId(clean(j.worker_id)),
            devices: j.devices.into_iter().map(clean).collect(),
            version: clean(j.version),
            endpoint: clean(j.collective_endpoint),
            attach: (j.attach_generation > 0)
                .then_some((Generation(j.attach_generation), j.attach_rank)),
        },
    }
}

/// The event a joined worker's message stands for.
fn to_event(
    conn: ConnId,
    worker: &WorkerId,
    message: WorkerMessage,
) -> Result<Option<Event>, Refusal> {
    use worker_message::Kind;
    let Some(kind) = message.kind else {
        return Ok(None);
    };
    let id = worker.clone();
    let event = match kind {
        Kind::Join(_) | Kind::Hello(_) => {
            return Err(Refusal::new(ErrorCode::Invalid, "a session joins once"))
        }
        Kind::Heartbeat(h) => match crate::stall_wire::from_heartbeat(&h) {
            Some(report) => Event::Progress {
                conn,
                worker: id,
                report,
            },
            None => Event::Heartbeat { conn, worker: id },
        },
        Kind::Step(s) => Event::Step {
            conn,
            worker: id,
            generation: Generation(s.generation),
            info: StepInfo {
                step: s.step,
                rank: s.rank,
                samples: (s.samples_start, s.samples_end),
                loss: s.loss,
                grad_norm: s.grad_norm,
                lr: s.lr,
                tokens: s.tokens,
                elapsed: seconds(s.elapsed_ms / 1e3),
                times: StepTimes {
                    train: seconds(s.train_ms / 1e3),
                    eval: seconds(s.eval_ms / 1e3),
                    checkpoint: seconds(s.checkpoint_ms / 1e3),
                },
                peak_flops: (s.peak_flops.is_finite() && s.peak_flops > 0.0)
                    .then_some(s.peak_flops),
            },
        },
        Kind::Checkpoint(c) => Event::Checkpoint {
            conn,
            worker: id,
            generation: Generation(c.generation),
            step: c.step,
            rank: c.rank,
            dir: clean(c.dir),
            digest: clean(c.weights_digest),
            stop: c.stop,
        },
        Kind::Aborted(a) => Event::Aborted {
            conn,
            worker: id,
            generation: Generation(a.generation),
        },
        Kind::Failed(f) => Event::Failed {
            conn,
            worker: id,
            generation: Generation(f.generation),
            reason: clean(f.reason),
            fatal: f.fatal,
            peer_fault: f.peer_fault,
        },
        Kind::Eval(e) => Event::Eval {
            conn,
            worker: id,
            generation: Generation(e.generation),
            step: e.step,
            source: clean(e.source),
            perplexity: e.perplexity,
            tokens: e.tokens,
        },
    };
    Ok(Some(event))
}

/// A duration from a number off the wire: NaN, negative or huge values do not panic.
fn seconds(secs: f64) -> Duration {
    if secs.is_finite() {
        Duration::from_secs_f64(secs.clamp(0.0, 1e9))
    } else {
        Duration::ZERO
    }
}
