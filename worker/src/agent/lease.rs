//! etcd membership, worker side: a lease-bound key `members/<worker>` kept alive every third of
//! the TTL (the coordinator watches the prefix), the leader's URL for re-attaching, and leaving
//! (revoking the lease) on a clean stop so that the job re-forms at once.

use std::time::Duration;

use anyhow::Context;
use dapt_proto::etcd::connect;
use dapt_proto::job::{keys, EtcdSpec};
use etcd_client::{Client, PutOptions};

pub struct Membership {
    client: Client,
    lease: i64,
    leader_key: String,
    ttl: Duration,
    keeper: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Registers `worker` under a fresh lease. etcd being unreachable for a while (a restart,
    /// a leader election) is waited out for up to `patience`, as the coordinator rides out an
    /// outage; a refusal (credentials, permissions, a bad setting) fails at once.
    ///
    /// # Errors
    /// The last failure, naming etcd's endpoints.
    pub async fn register(
        spec: &EtcdSpec,
        job: &str,
        worker: &str,
        endpoint: &str,
        devices: &[String],
        patience: Duration,
    ) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(250);
        let (client, lease) = loop {
            match Self::grant_and_put(spec, job, worker, endpoint, devices).await {
                Ok(registered) => break registered,
                Err(e) if transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = pause.as_millis() as u64, "etcd is not reachable yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "registering worker `{worker}` in etcd at {} (cluster.etcd.endpoints)",
                        spec.endpoints.join(", ")
                    )))
                }
            }
        };
        let ttl = Duration::from_secs(spec.lease_ttl_s);
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl / 3));
        tracing::info!(lease, ttl_s = spec.lease_ttl_s, "registered in etcd");
        Ok(Membership {
            client,
            lease,
            leader_key: keys::leader(&spec.prefix, job),
            ttl,
            keeper,
        })
    }

    async fn grant_and_put(
        spec: &EtcdSpec,
        job: &str,
        worker: &str,
        endpoint: &str,
        devices: &[String],
    ) -> anyhow::Result<(Client, i64)> {
        let mut client = connect(spec, Duration::from_secs(5)).await?;
        let lease = client
            .lease_grant(spec.lease_ttl_s as i64, None)
            .await
            .context("granting the membership lease")?
            .id();
        let value = serde_json::json!({ "endpoint": endpoint, "devices": devices }).to_string();
        client
            .put(
                keys::member(&spec.prefix, job, worker),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .context("writing the membership key")?;
        Ok((client, lease))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The leading coordinator's URL, if one leads.
    pub async fn leader(&self) -> Option<String> {
        let mut client = self.client.clone();
        let response = client.get(self.leader_key.clone(), None).await.ok()?;
        let kv = response.kvs().first()?;
        kv.value_str().ok().map(str::to_string)
    }

    /// Revokes the lease: the member key goes at once.
    pub async fn leave(self) {
        self.keeper.abort();
        let mut client = self.client;
        match client.lease_revoke(self.lease).await {
            Ok(_) => tracing::info!("left the job (lease revoked)"),
            Err(e) => tracing::warn!("revoking the membership lease: {e}"),
        }
    }
}

/// Renews `lease` every `every`; a failed renewal is retried on the next round (etcd may be
/// restarting). If the lease expires meanwhile, the coordinator treats this worker as lost and
/// its reports are refused as stale; the worker learns it from the abort or a refusal.
async fn keep_alive(mut client: Client, lease: i64, every: Duration) {
    let mut keeper = None;
    loop {
        tokio::time::sleep(every).await;
        if keeper.is_none() {
            keeper = client.lease_keep_alive(lease).await.ok();
        }
        let ok = match keeper.as_mut() {
            Some((k, stream)) => {
                k.keep_alive().await.is_ok()
                    && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
            }
            None => false,
        };
        if !ok {
            keeper = None;
        }
    }
}

/// Whether a failure to register may pass by itself (etcd down or electing a leader): not a
/// refusal of credentials or permissions, nor a bad setting.
fn transient(error: &anyhow::Error) -> bool {
    for cause in error.chain() {
        if let Some(dapt_proto::etcd::EtcdError::Config(_)) = cause.downcast_ref() {
            return false;
        }
        let client = match cause.downcast_ref::<dapt_proto::etcd::EtcdError>() {
            Some(dapt_proto::etcd::EtcdError::Client { error, .. }) => Some(error),
            _ => cause.downcast_ref::<etcd_client::Error>(),
        };
        if let Some(etcd_client::Error::GRpcStatus(status)) = client {
            use tonic::Code;
            return !matches!(
                status.code(),
                Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
            );
        }
    }
    true
}
