//! Connecting to the job's etcd (`cluster.etcd` in the job file): endpoints, user and password
//! (from the environment variable the job names), TLS. Coordinators and workers both use it.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::job::EtcdSpec;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    // The client's error is a plain field, not the `source()`: anyhow's `{:#}` printed it twice.
    #[error("etcd at {endpoints}: {error}")]
    Client {
        endpoints: String,
        error: etcd_client::Error,
    },
    #[error("cluster.etcd: {0}")]
    Config(String),
}

/// A client for `spec`, connected within `timeout`.
pub async fn connect(spec: &EtcdSpec, timeout: Duration) -> Result<Client, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(user) = &spec.user {
        let password = match &spec.password_env {
            Some(var) => std::env::var(var)
                .map_err(|_| EtcdError::Config(format!("password_env: ${var} is not set")))?,
            None => String::new(),
        };
        options = options.with_user(user.clone(), password);
    }
    if let Some(tls) = &spec.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| EtcdError::Config(format!("tls: {}: {e}", p.display())))
        };
        let checked = |e: crate::tls::TlsError| EtcdError::Config(e.to_string());
        crate::tls::check_ca_file("tls.ca", &tls.ca, "etcd's").map_err(checked)?;
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            crate::tls::check_client_certificate_file("tls.cert", cert).map_err(checked)?;
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &tls.domain {
            t = t.domain_name(domain.clone());
        }
        options = options.with_tls(t);
    }
    Client::connect(spec.endpoints.clone(), Some(options))
        .await
        .map_err(|error| EtcdError::Client {
            endpoints: spec.endpoints.join(","),
            error,
        })
}
