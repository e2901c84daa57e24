//! The etcd membership backend, coordinator side: leader election, the job's durable state, and
//! the members watch. Keys (see `dapt_proto::job::keys`) live under `<prefix>/<job>/`.
//!
//! * Leadership: a `leader` key holding this coordinator's URL, created only if absent
//!   (compare-and-swap on its version) and bound to a lease kept alive every third of its TTL.
//!   A standby retries until the key is gone (its holder died or stepped down).
//! * Fencing: every write of job state (generation, commit) is a transaction that succeeds only
//!   while the leader key is still bound to this coordinator's lease, so a deposed coordinator
//!   can never record a generation or a commit.
//! * A commit is one transaction: the ledger entries of the committed steps (one key per
//!   step, `ledger/<step + 1>`) and the new `committed` value, so the ledger and the committed
//!   step can never disagree, and a commit sent again (its answer was lost) writes the same keys.
//! * Membership: workers hold lease-bound `members/<worker>` keys; a delete (lease expired or
//!   revoked) becomes an [`Event::Expired`]. The watch is re-established after an etcd outage
//!   from the revision after the last one seen, so no deletion is missed.
//! * An etcd outage is ridden out, not fled: while etcd does not answer, the leader keeps its
//!   workers training and queues its commits (a [`Committer`] task retries them, so the control
//!   loop never waits on etcd). It steps down only when etcd answers that its lease is gone.
//!   Nothing it did during the outage is durable until etcd takes the queued commit, and a
//!   standby cannot lead without etcd either, so no two coordinators ever record the same
//!   generation or commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dapt_proto::etcd::connect;
use dapt_proto::job::{keys, EtcdSpec, JobSpec};
use dapt_proto::rpc::WorkerId;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::{Committed, Event, GenerationRecord, LedgerEntry};
use crate::ledger::CommittedFile;
use dapt_proto::identity::JobIdentity;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Connect(#[from] dapt_proto::etcd::EtcdError),
    /// The client's error is a plain field, not the `source()`: anyhow's `{:#}` printed it
    /// twice ("etcd: grpc request error: ...: grpc request error: ...").
    #[error("etcd: {0}")]
    Etcd(etcd_client::Error),
    #[error("etcd key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("etcd prefix {prefix} already holds the state of job `{job}`, and {reason}: this coordinator neither leads nor stands by; set cluster.etcd.prefix to a prefix of this job's own, or rename the job")]
    OtherJob {
        prefix: String,
        job: String,
        reason: String,
    },
    #[error("this coordinator no longer leads job `{0}` (its lease is gone, or another wrote the generation); not written")]
    NotLeader(String),
}

impl From<etcd_client::Error> for StoreError {
    fn from(error: etcd_client::Error) -> Self {
        StoreError::Etcd(error)
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    job: String,
    lease: i64,
    identity: CommittedFile,
    /// Turns true once this coordinator knows it no longer leads.
    lost: Arc<watch::Sender<bool>>,
    /// The leadership lease's TTL.
    ttl: Duration,
    /// The `generation` key's mod revision as this coordinator last read or wrote it (0: the
    /// key did not exist): the next generation is written only if it is still that.
    generation_revision: i64,
}

impl EtcdStore {
    /// Connects and campaigns until this coordinator leads `job`. Returns the store and a flag
    /// that turns true if the leadership is lost (etcd says the lease is gone, or a fenced write
    /// failed its comparison).
    pub async fn lead(
        spec: &EtcdSpec,
        job: &JobSpec,
        url: &str,
        ours: &JobIdentity,
    ) -> Result<(Self, watch::Receiver<bool>), StoreError> {
        let identity = CommittedFile::identity(job).ok_or_else(|| StoreError::Invalid {
            key: String::new(),
            message: "the job has no `training:` section".into(),
        })?;
        let mut client = reach(spec, ours, STARTUP_PATIENCE).await?;
        let key = keys::leader(&spec.prefix, &job.job);
        let ttl = spec.lease_ttl_s as i64;
        let mut announced = false;
        let mut outage: Option<Instant> = None;
        let lease = loop {
            match campaign(&mut client, &key, url, ttl).await {
                Ok(Some(lease)) => break lease,
                Ok(None) => {
                    if let Some(since) = outage.take() {
                        tracing::info!(
                            after_ms = since.elapsed().as_millis() as u64,
                            "etcd answers again; still a standby"
                        );
                    }
                    if !announced {
                        announced = true;
                        let holder = current_leader(&mut client, &key).await.unwrap_or_default();
                        tracing::info!(leader = %holder, job = %job.job, "standby: another coordinator leads");
                    }
                }
                // A standby rides out an etcd outage (a restart, a lost member) like the leader
                // does: it cannot lead without etcd, and once etcd answers it may have to.
                // Before the first answer an error is the configuration's: said at once.
                Err(e @ StoreError::Etcd(_)) if announced => {
                    if outage.is_none() {
                        outage = Some(Instant::now());
                        tracing::warn!("standby: etcd does not answer: {e}; trying again");
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // Checked again under the lease (another job may have led while this one stood by),
        // and recorded at the first lead; a refusal hands the leadership back at once.
        if let Err(e) = claim_identity(&mut client, &spec.prefix, &key, lease, ours).await {
            let _ = client.lease_revoke(lease).await;
            return Err(e);
        }
        tracing::info!(job = %job.job, %url, lease_ttl_s = ttl, "leading the job");
        let (lost_tx, lost) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        tokio::spawn(keep_alive(
            client.clone(),
            lease,
            spec.lease_ttl_s,
            lost_tx.clone(),
        ));
        let store = EtcdStore {
            client,
            prefix: spec.prefix.clone(),
            job: job.job.clone(),
            lease,
            identity,
            lost: lost_tx,
            ttl: Duration::from_secs(spec.lease_ttl_s),
            generation_revision: 0,
        };
        Ok((store, lost))
    }

    /// The committed checkpoint and the current generation, as the last leader left them.
    pub async fn load(
        &mut self,
    ) -> Result<(Option<Committed>, Option<GenerationRecord>), StoreError> {
        let key = keys::committed(&self.prefix, &self.job);
        let committed = match self.get_json::<CommittedFile>(&key).await? {
            Some((file, revision)) => {
                if let Some(field) = file.mismatch(&self.identity) {
                    return Err(StoreError::Invalid {
                        key,
                        message: format!("committed with another `{field}` than the job file says"),
                    });
                }
                Some((file.committed, revision))
            }
            None => None,
        };
        let key = keys::generation(&self.prefix, &self.job);
        let (generation, revision) = match self.get_json::<GenerationRecord>(&key).await? {
            Some((record, revision)) => {
                if let Some(message) = impossible_generation(&record) {
                    return Err(StoreError::Invalid { key, message });
                }
                (Some(record), revision)
            }
            None => (None, 0),
        };
        self.generation_revision = revision;
        Ok((committed.map(|(c, _)| c), generation))
    }

    /// The value of `key` as JSON, with its mod revision.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<Option<(T, i64)>, StoreError> {
        let response = self.client.get(key, None).await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        serde_json::from_slice(kv.value())
            .map(|value| Some((value, kv.mod_revision())))
            .map_err(|e| StoreError::Invalid {
                key: key.to_string(),
                message: e.to_string(),
            })
    }

    /// Runs `ops` only while this coordinator still leads and `also` holds; returns the
    /// revision the transaction wrote at.
    async fn fenced(&mut self, also: Vec<Compare>, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        let mut compares = vec![Compare::lease(
            keys::leader(&self.prefix, &self.job),
            CompareOp::Equal,
            self.lease,
        )];
        compares.extend(also);
        let txn = Txn::new().when(compares).and_then(ops);
        let response = self.client.txn(txn).await?;
        if response.succeeded() {
            Ok(response.header().map_or(0, |h| h.revision()))
        } else {
            Err(StoreError::NotLeader(self.job.clone()))
        }
    }

    /// Records a new generation: a compare-and-swap on the `generation` key (it must be as this
    /// coordinator last saw it) inside the leadership fence, so no two coordinators can ever
    /// both own one generation.
    pub async fn record_generation(&mut self, record: &GenerationRecord) -> Result<(), StoreError> {
        let key = keys::generation(&self.prefix, &self.job);
        let value = serde_json::to_vec(record).expect("a record serializes");
        let unchanged =
            Compare::mod_revision(key.clone(), CompareOp::Equal, self.generation_revision);
        let revision = self
            .fenced(vec![unchanged], vec![TxnOp::put(key, value, None)])
            .await?;
        self.generation_revision = revision;
        Ok(())
    }

    /// [`EtcdStore::record_generation`] through an etcd outage (a restart): retried with
    /// backoff, a warning every 10 s, for up to three lease TTLs (at least 10 s) from the first
    /// failure; no rank is assigned before its generation is recorded. A lost leadership, another
    /// writer, or a value that cannot be one are final, and so is the deadline: by then another
    /// coordinator may lead. An attempt whose answer was lost but that etcd carried out is
    /// recognised by the value it left (its compare would fail the next attempt).
    pub async fn record_generation_patiently(
        &mut self,
        record: &GenerationRecord,
    ) -> Result<(), StoreError> {
        let started = tokio::time::Instant::now();
        let patience = (self.ttl * 3).max(Duration::from_secs(10));
        let mut pause = Duration::from_millis(250);
        let mut warned = None::<tokio::time::Instant>;
        let mut failed_once = false;
        loop {
            if failed_once && self.recorded_already(record).await {
                return Ok(());
            }
            let error = match self.record_generation(record).await {
                Ok(()) => return Ok(()),
                Err(e @ (StoreError::NotLeader(_) | StoreError::Invalid { .. }))
                | Err(e @ StoreError::OtherJob { .. }) => return Err(e),
                Err(e) if *self.lost.borrow() || started.elapsed() > patience => return Err(e),
                Err(e) => e,
            };
            failed_once = true;
            if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    generation = record.generation,
                    "recording the generation in etcd: {error}; retrying"
                );
                warned = Some(tokio::time::Instant::now());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether the `generation` key holds `record` already (then its revision is taken as
    /// this coordinator's last write).
    async fn recorded_already(&mut self, record: &GenerationRecord) -> bool {
        let key = keys::generation(&self.prefix, &self.job);
        let Ok(response) = self.client.get(key, None).await else {
            return false;
        };
        let Some(kv) = response.kvs().first() else {
            return false;
        };
        let ours = serde_json::to_vec(record).expect("a record serializes");
        if kv.value() != ours.as_slice() || kv.lease() != 0 && kv.lease() != self.lease {
            return false;
        }
        self.generation_revision = kv.mod_revision();
        true
    }

    /// The ledger entries and the committed step, in one transaction. Each step's entries go
    /// under that step's own key ([`EtcdStore::ledger_puts`]), so sending a commit again is idempotent: a
    /// commit etcd applied but whose answer was lost (a restart, a broken connection) travels
    /// again with the next one ([`Committer`]), and its steps' keys are written again with the
    /// same entries instead of a second copy under the later commit's key.
    pub async fn commit(
        &mut self,
        committed: &Committed,
        entries: &[LedgerEntry],
    ) -> Result<(), StoreError> {
        let record = CommittedFile {
            committed: committed.clone(),
            ..self.identity.clone()
        };
        let mut ops = self.ledger_puts(entries);
        ops.push(TxnOp::put(
            keys::committed(&self.prefix, &self.job),
            serde_json::to_vec(&record).expect("committed serializes"),
            None,
        ));
        self.fenced(Vec::new(), ops).await.map(|_| ())
    }

    /// One put per step of `entries`: key `ledger/<step + 1, 12 digits>` (the number of steps
    /// done once it is, as `committed.step` counts them), value the JSON array of that step's
    /// entries (every rank's; a step is always committed whole). Key `ledger/<n>` holds steps
    /// before `n` both here and in the one key per commit that earlier versions wrote (a
    /// commit's steps under its step), so [`EtcdStore::fall_back`]'s deletion of the keys
    /// after `earlier` fits either.
    fn ledger_puts(&self, entries: &[LedgerEntry]) -> Vec<TxnOp> {
        let mut steps: BTreeMap<u64, Vec<LedgerEntry>> = BTreeMap::new();
        for entry in entries {
            steps.entry(entry.step).or_default().push(*entry);
        }
        let ledger = keys::ledger(&self.prefix, &self.job);
        steps
            .into_iter()
            .map(|(step, entries)| {
                TxnOp::put(
                    format!("{ledger}{:012}", step + 1),
                    serde_json::to_vec(&entries).expect("entries serialize"),
                    None,
                )
            })
            .collect()
    }

    /// Falls back from a corrupt committed checkpoint to `earlier` (see
    /// [`crate::ledger::fallback`]): in one fenced transaction, the ledger keys of the steps
    /// after it are deleted, `entries` (of steps before it, not recorded yet: queued in an
    /// outage) are recorded with it, and `committed` says `earlier`, so the steps after it are
    /// trained again and counted once.
    pub async fn fall_back(
        &mut self,
        earlier: &Committed,
        entries: &[LedgerEntry],
    ) -> Result<(), StoreError> {
        let ledger = keys::ledger(&self.prefix, &self.job);
        // The keys of steps after `earlier`, up to the end of the ledger's prefix (its last
        // byte, `/`, plus one).
        let from = format!("{ledger}{:012}", earlier.step + 1);
        let mut end = ledger.into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let record = CommittedFile {
            committed: earlier.clone(),
            ..self.identity.clone()
        };
        let mut ops = vec![TxnOp::delete(
            from,
            Some(DeleteOptions::new().with_range(end)),
        )];
        // Steps before `earlier`: keys up to `earlier.step`, before the deleted range.
        ops.extend(self.ledger_puts(entries));
        ops.push(TxnOp::put(
            keys::committed(&self.prefix, &self.job),
            serde_json::to_vec(&record).expect("committed serializes"),
            None,
        ));
        self.fenced(Vec::new(), ops).await.map(|_| ())
    }

    /// Turns deletions of members' keys into `Expired` events. Survives etcd outages: the watch
    /// is opened again from the revision after the last response, so deletions that happened
    /// meanwhile are still seen.
    pub fn watch_members(&self, events: mpsc::UnboundedSender<Event>) {
        let mut client = self.client.clone();
        let prefix = keys::members(&self.prefix, &self.job);
        tokio::spawn(async move {
            let mut from = 0;
            let mut broken_since: Option<Instant> = None;
            loop {
                let mut options = WatchOptions::new().with_prefix();
                if from > 0 {
                    options = options.with_start_revision(from);
                }
                match client.watch(prefix.clone(), Some(options)).await {
                    Ok(mut stream) => {
                        if let Some(since) = broken_since.take() {
                            tracing::info!(
                                after_ms = since.elapsed().as_millis() as u64,
                                from_revision = from,
                                "the etcd members watch is back"
                            );
                        }
                        while let Ok(Some(response)) = stream.message().await {
                            if response.canceled() {
                                // Compacted past `from`: events in between are gone. The
                                // members' sessions and heartbeats still catch a lost worker.
                                tracing::warn!(
                                    compact_revision = response.compact_revision(),
                                    "the etcd members watch was cancelled; watching from now"
                                );
                                from = 0;
                                break;
                            }
                            if let Some(header) = response.header() {
                                from = header.revision() + 1;
                            }
                            for event in response.events() {
                                if event.event_type() != EventType::Delete {
                                    continue;
                                }
                                let Some(worker) = event
                                    .kv()
                                    .and_then(|kv| kv.key_str().ok())
                                    .and_then(|k| k.strip_prefix(&prefix))
                                else {
                                    continue;
                                };
                                let worker = WorkerId(worker.to_string());
                                if events.send(Event::Expired { worker }).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!("watching {prefix}: {e}"),
                }
                if events.is_closed() {
                    return;
                }
                if broken_since.is_none() {
                    tracing::warn!("the etcd members watch broke; opening it again");
                    broken_since = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// Starts the task that records commits (see [`Committer`]); `keep` checkpoints are kept
    /// below each recorded one, and `recorded` hears of each once etcd has it.
    pub fn committer(
        &self,
        root: std::path::PathBuf,
        keep: usize,
        recorded: Box<dyn Fn(&Committed) + Send>,
    ) -> Committer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(commit_loop(self.clone(), rx, root, keep, recorded));
        Committer { tx }
    }
}

/// Why `record` cannot be a generation a leader wrote, if it cannot: a number no job reaches
/// (the next one would overflow: a worker of it waited forever while the leader logged an
/// invariant error every tick), or ranks and peers that do not pair up.
fn impossible_generation(record: &GenerationRecord) -> Option<String> {
    const MAX_GENERATION: u64 = 1 << 53;
    if record.generation > MAX_GENERATION {
        return Some(format!(
            "generation {} is not one a leader writes (at most 2^53)",
            record.generation
        ));
    }
    if record.ranks.len() != record.peers.len() {
        return Some(format!(
            "generation {} has {} ranks and {} peers",
            record.generation,
            record.ranks.len(),
            record.peers.len()
        ));
    }
    None
}

/// The identity recorded under `prefix` for `ours.job`, with its version (0: none yet).
async fn recorded_identity(
    client: &mut Client,
    prefix: &str,
    ours: &JobIdentity,
) -> Result<(Option<JobIdentity>, i64), StoreError> {
    let key = keys::identity(prefix, &ours.job);
    let response = client.get(key.as_str(), None).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok((None, 0));
    };
    let recorded = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Invalid {
        key: key.clone(),
        message: e.to_string(),
    })?;
    Ok((Some(recorded), kv.version()))
}

/// Refuses when `prefix` holds another job's identity under `ours.job`.
/// How long a coordinator starting while etcd is unreachable (a restart, an election) waits
/// for it, as workers do: before, it exited at once, and no leader could start until etcd was
/// back (an audit).
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// A client of `spec` that has checked the job's identity there ([`check_identity`]): another
/// job's state under this prefix and name is refused before standing by. etcd unreachable is
/// waited out for up to `patience`; a refusal (credentials, permissions) fails at once.
async fn reach(
    spec: &EtcdSpec,
    ours: &JobIdentity,
    patience: Duration,
) -> Result<Client, StoreError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(250);
    loop {
        let attempt = async {
            let mut client = connect(spec, Duration::from_secs(5)).await?;
            check_identity(&mut client, &spec.prefix, ours).await?;
            Ok::<_, StoreError>(client)
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            Err(e) if unreachable(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "etcd is not reachable yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `error` says etcd could not be reached (no answer, a connection refused or cut, an
/// election in progress), as opposed to a refusal or a bad setting.
fn unreachable(error: &StoreError) -> bool {
    let client = match error {
        StoreError::Connect(dapt_proto::etcd::EtcdError::Client { error, .. }) => error,
        StoreError::Etcd(error) => error,
        _ => return false,
    };
    match client {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

async fn check_identity(
    client: &mut Client,
    prefix: &str,
    ours: &JobIdentity,
) -> Result<(), StoreError> {
    match recorded_identity(client, prefix, ours).await? {
        (Some(recorded), _) => match ours.differs(&recorded) {
            Some(reason) => Err(StoreError::OtherJob {
                prefix: prefix.to_string(),
                job: ours.job.clone(),
                reason,
            }),
            None => Ok(()),
        },
        (None, _) => Ok(()),
    }
}

/// [`check_identity`] by the new leader, which records `ours` when nothing is recorded yet
/// (or only without a token digest: `dapt launch`'s), in a transaction fenced by its lease.
async fn claim_identity(
    client: &mut Client,
    prefix: &str,
    leader: &str,
    lease: i64,
    ours: &JobIdentity,
) -> Result<(), StoreError> {
    check_identity(client, prefix, ours).await?;
    let (recorded, version) = recorded_identity(client, prefix, ours).await?;
    if recorded.is_some_and(|r| r.token_digest.is_some() || ours.token_digest.is_none()) {
        return Ok(());
    }
    let key = keys::identity(prefix, &ours.job);
    let txn = Txn::new()
        .when([
            Compare::lease(leader, CompareOp::Equal, lease),
            Compare::version(key.as_str(), CompareOp::Equal, version),
        ])
        .and_then([TxnOp::put(
            key.as_str(),
            serde_json::to_vec(ours).expect("an identity serializes"),
            None,
        )]);
    if client.txn(txn).await?.succeeded() {
        Ok(())
    } else {
        Err(StoreError::NotLeader(ours.job.clone()))
    }
}

/// One round of the leader election: `Some(lease)` when this coordinator now holds `key` (bound
/// to that lease), `None` when another does. A `key` that is held without a lease was written
/// by no coordinator (each binds it to its lease, so it goes when the lease does) and would keep
/// every coordinator of the job a standby forever: refused, naming the key and what it holds.
async fn campaign(
    client: &mut Client,
    key: &str,
    url: &str,
    ttl: i64,
) -> Result<Option<i64>, StoreError> {
    let lease = client.lease_grant(ttl, None).await?.id();
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            url,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let response = client.txn(txn).await?;
    if response.succeeded() {
        return Ok(Some(lease));
    }
    let _ = client.lease_revoke(lease).await;
    let held = response.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| (kv.lease(), String::from_utf8_lossy(kv.value()).into_owned())),
        _ => None,
    });
    if let Some((0, holder)) = held {
        return Err(StoreError::Invalid {
            key: key.to_string(),
            message: format!(
                "holds `{holder}` without a lease: no dapt coordinator wrote it (a coordinator's \
                 leader key lives on its lease and goes with it), and while it is there no \
                 coordinator of this job can lead; if no coordinator of this job runs, remove it \
                 (`etcdctl del {key}`)"
            ),
        });
    }
    Ok(None)
}

/// Records commits in etcd from a task of its own, so that the control loop never waits on
/// etcd. A commit etcd did not take is kept and merged with the next one (its ledger entries
/// travel with the later committed step, in the same transaction), and retried until etcd
/// answers: the durable ledger never skips a committed step.
pub struct Committer {
    tx: mpsc::UnboundedSender<CommitRequest>,
}

enum CommitRequest {
    Commit(Committed, Vec<LedgerEntry>),
    /// Fall back to an earlier commit (its checkpoint verifies, the committed one does not).
    FallBack(Committed),
    /// Answers true once every queued commit is in etcd, false if the leadership is lost.
    Flush(oneshot::Sender<bool>),
}

impl Committer {
    pub fn commit(&self, committed: Committed, entries: Vec<LedgerEntry>) {
        let _ = self.tx.send(CommitRequest::Commit(committed, entries));
    }

    /// Records the fallback to `earlier` ([`EtcdStore::fall_back`]) before any commit queued
    /// after it; queued commits after `earlier` are dropped, their entries before it kept.
    pub fn fall_back(&self, earlier: Committed) {
        let _ = self.tx.send(CommitRequest::FallBack(earlier));
    }

    /// Waits until every commit queued so far is in etcd. False if this coordinator lost the
    /// leadership first (those commits are not durable; the next leader resumes before them).
    pub async fn flush(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(CommitRequest::Flush(tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

type Pending = Option<(Committed, Vec<LedgerEntry>)>;

/// Adds `request` to what `commit_loop` has to do: a commit is merged into the pending one; a
/// fallback takes the place of the pending commit (and of an earlier pending fallback), keeping
/// their entries of the steps before it.
fn queue(
    request: CommitRequest,
    pending: &mut Pending,
    fallback: &mut Pending,
    flushes: &mut Vec<oneshot::Sender<bool>>,
) {
    match request {
        CommitRequest::FallBack(earlier) => {
            let entries = fallback
                .take()
                .into_iter()
                .chain(pending.take())
                .flat_map(|(_, entries)| entries)
                .filter(|e| e.step < earlier.step)
                .collect();
            *fallback = Some((earlier, entries));
        }
        CommitRequest::Commit(committed, mut entries) => {
            *pending = Some(match pending.take() {
                None => (committed, entries),
                Some((_, mut earlier)) => {
                    earlier.append(&mut entries);
                    (committed, earlier)
                }
            });
        }
        CommitRequest::Flush(tx) => flushes.push(tx),
    }
}

/// `root`: the job's `checkpoint.dir`, where old checkpoints are pruned (not the parent of the
/// directory a rank reported, which a member could point elsewhere).
async fn commit_loop(
    mut store: EtcdStore,
    mut rx: mpsc::UnboundedReceiver<CommitRequest>,
    root: std::path::PathBuf,
    keep: usize,
    recorded: Box<dyn Fn(&Committed) + Send>,
) {
    let mut pending: Pending = None;
    let mut fallback: Pending = None;
    let mut flushes: Vec<oneshot::Sender<bool>> = Vec::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        if pending.is_none() && fallback.is_none() {
            for tx in flushes.drain(..) {
                let _ = tx.send(true);
            }
            match rx.recv().await {
                Some(request) => queue(request, &mut pending, &mut fallback, &mut flushes),
                None => return,
            }
        }
        while let Ok(request) = rx.try_recv() {
            queue(request, &mut pending, &mut fallback, &mut flushes);
        }
        if let Some((earlier, entries)) = &fallback {
            match store.fall_back(earlier, entries).await {
                Ok(()) => {
                    tracing::info!(step = earlier.step, "the fallback is recorded in etcd");
                    fallback = None;
                }
                Err(StoreError::NotLeader(job)) => {
                    tracing::error!(%job, step = earlier.step, "not recording the fallback: this coordinator no longer leads");
                    let _ = store.lost.send(true);
                    for tx in flushes.drain(..) {
                        let _ = tx.send(false);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        step = earlier.step,
                        "recording the fallback in etcd: {e}; retrying"
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
            continue;
        }
        let Some((committed, entries)) = &pending else {
            continue;
        };
        match store.commit(committed, entries).await {
            Ok(()) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        step = committed.step,
                        after_ms = since.elapsed().as_millis() as u64,
                        "etcd answers again: the queued commits are recorded"
                    );
                }
                recorded(committed);
                let _ = crate::ledger::prune_dir(&root, committed.step, keep);
                pending = None;
            }
            Err(StoreError::NotLeader(job)) => {
                tracing::error!(%job, step = committed.step, "not recording the commit: this coordinator no longer leads");
                let _ = store.lost.send(true);
                for tx in flushes.drain(..) {
                    let _ = tx.send(false);
                }
                return;
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(
                        step = committed.step,
                        "recording the commit in etcd: {e}; retrying (training goes on; nothing \
                         more is durable until etcd answers)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The whole ledger of `job` in etcd, in step order.
pub async fn ledger(spec: &EtcdSpec, job: &str) -> Result<Vec<LedgerEntry>, StoreError> {
    let mut client = connect(spec, Duration::from_secs(5)).await?;
    let response = client
        .get(
            keys::ledger(&spec.prefix, job),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut entries = Vec::new();
    for kv in response.kvs() {
        let mut batch: Vec<LedgerEntry> =
            serde_json::from_slice(kv.value()).map_err(|e| StoreError::Invalid {
                key: kv.key_str().unwrap_or_default().to_string(),
                message: e.to_string(),
            })?;
        entries.append(&mut batch);
    }
    Ok(entries)
}

async fn current_leader(client: &mut Client, key: &str) -> Option<String> {
    let response = client.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    kv.value_str().ok().map(str::to_string)
}

/// Keeps `lease` alive every third of its TTL. Flags `lost` only when etcd answers that the
/// lease is gone. While etcd does not answer at all, the leadership is kept: no other coordinator
/// can lead without etcd either, and a restarted etcd extends every lease by its TTL.
async fn keep_alive(mut client: Client, lease: i64, ttl_s: u64, lost: Arc<watch::Sender<bool>>) {
    let ttl = Duration::from_secs(ttl_s);
    let every = ttl / 3;
    let mut unreachable_since: Option<Instant> = None;
    let mut warned = false;
    let mut keeper = None;
    loop {
        tokio::time::sleep(every).await;
        if *lost.borrow() {
            return;
        }
        if keeper.is_none() {
            keeper = client.lease_keep_alive(lease).await.ok();
        }
        let answer = match keeper.as_mut() {
            Some((k, stream)) => match k.keep_alive().await {
                Ok(()) => match stream.message().await {
                    Ok(Some(r)) => Some(r.ttl()),
                    _ => None,
                },
                Err(_) => None,
            },
            None => None,
        };
        match answer {
            Some(left) if left > 0 => {
                if let Some(since) = unreachable_since.take() {
                    tracing::info!(
                        after_ms = since.elapsed().as_millis() as u64,
                        "etcd answers again; still leading"
                    );
                }
                warned = false;
            }
            Some(_) => {
                tracing::error!(lease, "etcd says the leadership lease is gone");
                let _ = lost.send(true);
                return;
            }
            None => {
                keeper = None;
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ttl && !warned {
                    warned = true;
                    tracing::warn!(
                        unreachable_ms = since.elapsed().as_millis() as u64,
                        "etcd does not answer: still leading (the workers keep training; \
                         membership changes and commits wait for etcd)"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn an_etcd_error_is_said_once() {
        let error = anyhow::Error::from(StoreError::from(etcd_client::Error::InvalidArgs(
            "the one reason".into(),
        )));
        let text = format!("{error:#}");
        assert_eq!(text.matches("the one reason").count(), 1, "{text}");
    }
}
