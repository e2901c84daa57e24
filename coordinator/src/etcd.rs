//! The etcd membership backend, coordinator side: leader election, the job's durable state, and
//! the members watch. Keys (see `dapt_proto::job::keys`) live under `<prefix>/<job>/`.
//!
//! * Leadership: a `leader` key holding this coordinator's URL, created only if absent
//!   (compare-and-swap on its version) and bound to a lease kept alive every third of its TTL.
//!   A standby retries until the key is gone (its holder died or stepped down).
//! * Fencing: every write of job state (generation, commit) is a transaction that succeeds only
//!   while the leader key is still bound to this coordinator's lease, so a deposed coordinator
//!   can never record a generation or a commit.
//! * A commit is one transaction: the ledger entries of the committed steps
//!   (`ledger/<step>`) and the new `committed` value, so the ledger and the committed step can
//!   never disagree.
//! * Membership: workers hold lease-bound `members/<worker>` keys; a delete (lease expired or
//!   revoked) becomes an [`Event::Expired`].

use std::time::{Duration, Instant};

use dapt_proto::etcd::connect;
use dapt_proto::job::{keys, EtcdSpec, JobSpec};
use dapt_proto::rpc::WorkerId;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, watch};

use crate::control::{Committed, Event, GenerationRecord, LedgerEntry};
use crate::ledger::CommittedFile;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Connect(#[from] dapt_proto::etcd::EtcdError),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("this coordinator no longer leads job `{0}` (its lease is gone); not written")]
    NotLeader(String),
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
    job: String,
    lease: i64,
    identity: CommittedFile,
}

impl EtcdStore {
    /// Connects and campaigns until this coordinator leads `job`. Returns the store and a flag
    /// that turns true if the leadership is lost (the lease could not be kept alive).
    pub async fn lead(
        spec: &EtcdSpec,
        job: &JobSpec,
        url: &str,
    ) -> Result<(Self, watch::Receiver<bool>), StoreError> {
        let identity = CommittedFile::identity(job).ok_or_else(|| StoreError::Invalid {
            key: String::new(),
            message: "the job has no `training:` section".into(),
        })?;
        let mut client = connect(spec, Duration::from_secs(5)).await?;
        let key = keys::leader(&spec.prefix, &job.job);
        let ttl = spec.lease_ttl_s as i64;
        let mut announced = false;
        let lease = loop {
            let lease = client.lease_grant(ttl, None).await?.id();
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    url,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = client.txn(txn).await?;
            if response.succeeded() {
                break lease;
            }
            let _ = client.lease_revoke(lease).await;
            if !announced {
                announced = true;
                let holder = current_leader(&mut client, &key).await.unwrap_or_default();
                tracing::info!(leader = %holder, job = %job.job, "standby: another coordinator leads");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tracing::info!(job = %job.job, %url, lease_ttl_s = ttl, "leading the job");
        let (lost_tx, lost) = watch::channel(false);
        tokio::spawn(keep_alive(client.clone(), lease, spec.lease_ttl_s, lost_tx));
        let store = EtcdStore {
            client,
            prefix: spec.prefix.clone(),
            job: job.job.clone(),
            lease,
            identity,
        };
        Ok((store, lost))
    }

    /// The committed checkpoint and the current generation, as the last leader left them.
    pub async fn load(
        &mut self,
    ) -> Result<(Option<Committed>, Option<GenerationRecord>), StoreError> {
        let key = keys::committed(&self.prefix, &self.job);
        let committed = match self.get_json::<CommittedFile>(&key).await? {
            Some(file) => {
                if let Some(field) = file.mismatch(&self.identity) {
                    return Err(StoreError::Invalid {
                        key,
                        message: format!("committed with another `{field}` than the job file says"),
                    });
                }
                Some(file.committed)
            }
            None => None,
        };
        let generation = self
            .get_json::<GenerationRecord>(&keys::generation(&self.prefix, &self.job))
            .await?;
        Ok((committed, generation))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let response = self.client.get(key, None).await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        serde_json::from_slice(kv.value())
            .map(Some)
            .map_err(|e| StoreError::Invalid {
                key: key.to_string(),
                message: e.to_string(),
            })
    }

    /// Runs `ops` only while this coordinator still leads.
    async fn fenced(&mut self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(
                keys::leader(&self.prefix, &self.job),
                CompareOp::Equal,
                self.lease,
            )])
            .and_then(ops);
        if self.client.txn(txn).await?.succeeded() {
            Ok(())
        } else {
            Err(StoreError::NotLeader(self.job.clone()))
        }
    }

    pub async fn record_generation(&mut self, record: &GenerationRecord) -> Result<(), StoreError> {
        let key = keys::generation(&self.prefix, &self.job);
        let value = serde_json::to_vec(record).expect("a record serializes");
        self.fenced(vec![TxnOp::put(key, value, None)]).await
    }

    /// The ledger entries and the committed step, in one transaction.
    pub async fn commit(
        &mut self,
        committed: &Committed,
        entries: &[LedgerEntry],
    ) -> Result<(), StoreError> {
        let ledger = format!(
            "{}{:012}",
            keys::ledger(&self.prefix, &self.job),
            committed.step
        );
        let record = CommittedFile {
            committed: committed.clone(),
            ..self.identity.clone()
        };
        let ops = vec![
            TxnOp::put(
                ledger,
                serde_json::to_vec(entries).expect("entries serialize"),
                None,
            ),
            TxnOp::put(
                keys::committed(&self.prefix, &self.job),
                serde_json::to_vec(&record).expect("committed serializes"),
                None,
            ),
        ];
        self.fenced(ops).await
    }

    /// Turns deletions of members' keys into `Expired` events.
    pub fn watch_members(&self, events: mpsc::UnboundedSender<Event>) {
        let mut client = self.client.clone();
        let prefix = keys::members(&self.prefix, &self.job);
        tokio::spawn(async move {
            let watch = client
                .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
                .await;
            let mut stream = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!("watching {prefix}: {e}");
                    return;
                }
            };
            while let Ok(Some(response)) = stream.message().await {
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
            tracing::warn!("the etcd members watch ended");
        });
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

/// Keeps `lease` alive every third of its TTL; flags `lost` once a whole TTL passed without
/// a successful renewal (the lease, and the leadership with it, is gone by then).
async fn keep_alive(mut client: Client, lease: i64, ttl_s: u64, lost: watch::Sender<bool>) {
    let ttl = Duration::from_secs(ttl_s);
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    let mut keeper = None;
    loop {
        tokio::time::sleep(every).await;
        if keeper.is_none() {
            keeper = client.lease_keep_alive(lease).await.ok();
        }
        let renewed = match keeper.as_mut() {
            Some((k, stream)) => match k.keep_alive().await {
                Ok(()) => matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0),
                Err(_) => false,
            },
            None => false,
        };
        if renewed {
            last_ok = Instant::now();
        } else {
            keeper = None;
            if last_ok.elapsed() >= ttl {
                let _ = lost.send(true);
                return;
            }
        }
    }
}
