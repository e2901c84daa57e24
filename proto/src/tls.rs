//! TLS for the coordinator's endpoints (its gRPC service and its `/metrics`): the server side
//! from `cluster.tls` in the job file (or `dapt coordinator --tls-*`), the client side
//! (`dapt-worker`, `dapt status`) from a pinned CA and an optional client certificate.
//!
//! One crypto provider: rustls with `ring` (the one etcd-client's `tls` feature compiles too);
//! [`install_crypto_provider`] makes it the process default before any configuration is built,
//! so that no other provider compiled in by a later dependency can make rustls panic at run
//! time for want of a choice.
//!
//! A client trusts only the CA it is given (`--coordinator-ca`): no system roots. An `https://`
//! URL without a CA is refused, and so is an `http://` one when a CA is given: a worker that pins
//! the coordinator's CA never sends its Join to a plain-text address (e.g. one an intruder wrote
//! into etcd as the leader's URL).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::job::CoordinatorTls;

/// How long a client has to finish its TLS handshake with the coordinator.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The OS error is a plain field, not the `source()`: a reporter that prints the chain
    /// (anyhow's `{:#}`) said it twice.
    #[error("{field}: {}: {error}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{field}: {}: {message}", path.display())]
    Pem {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

/// Makes rustls' `ring` provider the process default (a no-op when one is set already). Call
/// it before building any TLS configuration (tonic's server builds its own from the default).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The coordinator's TLS, ready to serve: tonic's configuration for the gRPC service and
/// rustls' for `/metrics` (HTTP/1.1), from the same files.
pub struct ServerTls {
    pub grpc: ServerTlsConfig,
    pub http: Arc<rustls::ServerConfig>,
    /// Whether clients must present a certificate signed by `client_ca`.
    pub mutual: bool,
}

/// Reads and checks `spec`'s certificate, key and client CA. Errors name the field and file.
pub fn server(spec: &CoordinatorTls) -> Result<ServerTls, TlsError> {
    install_crypto_provider();
    let names = spec.names;
    let cert_pem = read(names.cert, &spec.cert)?;
    let key_pem = read(names.key, &spec.key)?;
    warn_if_readable_by_others(names.key, &spec.key);
    let certs = certificates(names.cert, &spec.cert, &cert_pem)?;
    check_leaf(names.cert, &spec.cert, &certs[0], Role::Server)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        field: names.key,
        path: spec.key.clone(),
        message: format!("no PEM private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut grpc = ServerTlsConfig::new()
        .identity(Identity::from_pem(&cert_pem, &key_pem))
        .timeout(HANDSHAKE_TIMEOUT);
    let builder = match &spec.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let pem = read(names.client_ca, path)?;
            let roots = roots(names.client_ca, path, &pem, "the workers'")?;
            grpc = grpc.client_ca_root(Certificate::from_pem(&pem));
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| TlsError::Pem {
                        field: names.client_ca,
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut http = builder.with_single_cert(certs, key).map_err(|e| match e {
        // The certificate itself cannot be read (bad DER inside good PEM).
        rustls::Error::InvalidCertificate(_) => TlsError::Pem {
            field: names.cert,
            path: spec.cert.clone(),
            message: format!("not a certificate rustls can read: {e}"),
        },
        e => TlsError::Pem {
            field: names.key,
            path: spec.key.clone(),
            message: format!("does not go with {}: {e}", names.cert),
        },
    })?;
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        grpc,
        http: Arc::new(http),
        mutual: spec.client_ca.is_some(),
    })
}

/// How a client (a worker, `dapt status`) reaches the coordinator over TLS; the same flags and
/// variables on both.
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct ClientTls {
    /// The CA (PEM) that signed the coordinator's certificate, the only one trusted: needed for
    /// an https:// coordinator URL, and with it an http:// one is refused.
    #[arg(
        long = "coordinator-ca",
        id = "coordinator_ca",
        env = "DAPT_COORDINATOR_CA"
    )]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires one (mutual TLS).
    #[arg(long = "client-cert", id = "client_cert", env = "DAPT_CLIENT_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long = "client-key", id = "client_key", env = "DAPT_CLIENT_KEY")]
    pub key: Option<PathBuf>,
    /// The name the coordinator's certificate carries, when it is not the URL's host (e.g. a
    /// pod IP in the URL, the Service name in the certificate).
    #[arg(
        long = "coordinator-domain",
        id = "coordinator_domain",
        env = "DAPT_COORDINATOR_DOMAIN"
    )]
    pub domain: Option<String>,
}

/// A gRPC endpoint for `url`: `https://` with `tls` (its CA required), or `http://` (refused
/// when `tls` pins a CA, so that nothing goes out in clear text to a coordinator that should
/// have proved itself).
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, TlsError> {
    install_crypto_provider();
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| TlsError::Config(format!("coordinator URL `{url}`: {e}")))?;
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(TlsError::Config(
            "give both --client-cert and --client-key, or neither".into(),
        ));
    }
    match endpoint.uri().scheme_str() {
        Some("https") => {}
        Some("http") if tls.ca.is_some() => {
            return Err(TlsError::Config(format!(
                "refusing `{url}`: a CA is pinned (--coordinator-ca) but the URL is plain http://; \
                 a coordinator with TLS is reached at https://"
            )))
        }
        // TLS settings on a plain URL would be ignored: the user thinks the session is
        // authenticated and encrypted.
        Some("http") if tls.cert.is_some() || tls.domain.is_some() => {
            return Err(TlsError::Config(format!(
                "refusing `{url}`: {} given but the URL is plain http://, which would ignore \
                 it; a coordinator with TLS is reached at https:// (with --coordinator-ca)",
                if tls.cert.is_some() {
                    "--client-cert/--client-key"
                } else {
                    "--coordinator-domain"
                }
            )))
        }
        Some("http") => return Ok(endpoint),
        _ => {
            return Err(TlsError::Config(format!(
                "coordinator URL `{url}`: use http://HOST:PORT or https://HOST:PORT"
            )))
        }
    }
    let Some(ca) = &tls.ca else {
        return Err(TlsError::Config(format!(
            "`{url}` is https: give the CA that signed the coordinator's certificate \
             (--coordinator-ca or DAPT_COORDINATOR_CA)"
        )));
    };
    let ca_pem = read("--coordinator-ca", ca)?;
    let ca_roots = roots("--coordinator-ca", ca, &ca_pem, "the coordinator's")?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .timeout(HANDSHAKE_TIMEOUT);
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let cert_pem = read("--client-cert", cert)?;
        let certs = certificates("--client-cert", cert, &cert_pem)?;
        check_leaf("--client-cert", cert, &certs[0], Role::Client)?;
        let key_pem = read("--client-key", key)?;
        warn_if_readable_by_others("--client-key", key);
        let parsed = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            field: "--client-key",
            path: key.clone(),
            message: format!("no PEM private key: {e}"),
        })?;
        // rustls checks that the key is the certificate's (tonic would say "KeyMismatch"
        // at the first call, naming neither file).
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(ca_roots)
        .with_client_auth_cert(certs, parsed)
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(_) => TlsError::Pem {
                field: "--client-cert",
                path: cert.clone(),
                message: format!("not a certificate rustls can read: {e}"),
            },
            e => TlsError::Pem {
                field: "--client-key",
                path: key.clone(),
                message: format!("does not go with --client-cert {}: {e}", cert.display()),
            },
        })?;
        config = config.identity(Identity::from_pem(cert_pem, key_pem));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    endpoint
        .tls_config(config)
        .map_err(|e| TlsError::Config(format!("TLS for `{url}`: {}", chain(&e))))
}

/// Whether `url`'s host is this machine (`localhost`, 127.0.0.0/8, ::1): traffic to it never
/// crosses a network.
pub fn is_loopback_url(url: &str) -> bool {
    url.parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|u| u.host().map(is_loopback_host))
        .unwrap_or(false)
}

/// Whether `host` (a name or an IP address, IPv6 with or without brackets) is a loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `error` and its sources as one line, with what to do when a TLS check failed.
pub fn explain(error: &(dyn std::error::Error + 'static)) -> String {
    let text = chain(error);
    match tls_failure(error).and_then(hint) {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

/// [`explain`] for the first call on a new connection to `url` made with `tls`. Under TLS 1.3 a
/// coordinator that wants a client certificate refuses one's absence after the client has
/// finished its handshake: the client sees only the connection close under its first call, not
/// the reason. So when that happens without a client certificate, say what is likely missing.
pub fn explain_first_call(
    error: &(dyn std::error::Error + 'static),
    url: &str,
    tls: &ClientTls,
) -> String {
    let text = explain(error);
    let closed = !is_tls_failure(error)
        && url.starts_with("https://")
        && tls.cert.is_none()
        && error.downcast_ref::<tonic::Status>().is_some_and(|s| {
            matches!(
                s.code(),
                tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
            )
        });
    // A TLS server answers a plain HTTP/2 preface with a TLS alert record, which the HTTP/2
    // client reads as a frame header of an impossible size.
    let plain_to_tls = !is_tls_failure(error)
        && url.starts_with("http://")
        && (text.contains("frame with invalid size")
            || error.downcast_ref::<tonic::Status>().is_some_and(|s| {
                matches!(
                    s.code(),
                    tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
                )
            }));
    if closed {
        format!(
            "{text} (the coordinator closed the connection right after the TLS handshake: if it \
             requires client certificates, give --client-cert and --client-key)"
        )
    } else if plain_to_tls {
        format!(
            "{text} (the coordinator closed the connection at the first call: if it serves TLS, \
             its URL starts with https://)"
        )
    } else {
        text
    }
}

/// [`explain_first_call`], after asking the address itself when the call failed on a plain
/// `http://` URL without a TLS error: an address that answers an HTTP/1.1 request is not a gRPC
/// endpoint (most often the coordinator's `/metrics` and dashboard port given to `dapt status`
/// or a worker), which the call alone cannot tell from a TLS server.
pub async fn explain_first_call_probing(
    error: &(dyn std::error::Error + 'static),
    url: &str,
    tls: &ClientTls,
) -> String {
    if url.starts_with("http://") && !is_tls_failure(error) && answers_http1(url).await {
        return format!(
            "{} ({url} answers HTTP/1.1, not gRPC: it looks like the coordinator's /metrics and \
             dashboard port; give the coordinator's own address: `dapt launch` prints it as \
             `coordinator`, `dapt coordinator` listens on its --listen)",
            chain(error)
        );
    }
    explain_first_call(error, url, tls)
}

/// Whether the server at `url` (`http://HOST:PORT`) answers `GET /` with an HTTP/1.x status
/// line within a second.
async fn answers_http1(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
        return false;
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: dapt\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 8];
        stream.read_exact(&mut head).await?;
        std::io::Result::Ok(head.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ask).await,
        Ok(Ok(true))
    )
}

/// Whether `error` (or one of its sources) is a TLS failure: a certificate refused by either
/// side. Retrying does not help.
pub fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    tls_failure(error).is_some()
}

fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        // io::Error's `source` skips the error it wraps: look inside.
        if let Some(r) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        next = e.source();
    }
    None
}

fn hint(error: &rustls::Error) -> Option<&'static str> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    Some(match error {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the coordinator's certificate is not signed by the CA in --coordinator-ca"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the coordinator's certificate does not name the URL's host: give the name it \
             carries with --coordinator-domain"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the coordinator's certificate has expired"
        }
        E::AlertReceived(
            A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::AccessDenied,
        ) => {
            "the coordinator requires a client certificate signed by its client CA: give \
             --client-cert and --client-key"
        }
        E::InvalidMessage(_) => {
            "is the coordinator serving TLS? a coordinator without it is reached at http://"
        }
        _ => return None,
    })
}

/// `error: source: source ...`, each message once (a gRPC status by its message: its own
/// text repeats its source).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        // A status's message is the server's text: a stranger posing as the coordinator put
        // terminal escapes and forged log lines in it (an audit). Escaped, as every string
        // from the network is before it is printed.
        let text = match e.downcast_ref::<tonic::Status>() {
            Some(status) => crate::auth::printable(status.message()).into_owned(),
            None => crate::auth::printable(&e.to_string()).into_owned(),
        };
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Whether a file's permission bits let users other than its owner read it (group or other).
fn readable_by_others(mode: u32) -> bool {
    mode & 0o044 != 0
}

/// A private key that other users of the machine can read is worth a warning (as ssh refuses
/// such keys); a mounted Kubernetes secret is 0644 by default, so it is not refused.
fn warn_if_readable_by_others(field: &'static str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if readable_by_others(meta.permissions().mode()) {
            tracing::warn!(
                field,
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the private key can be read by other users of this machine (chmod 600 it)"
            );
        }
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        field,
        path: path.to_path_buf(),
        error,
    })
}

fn certificates(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            field,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            field,
            path: path.to_path_buf(),
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The trust anchors in `pem`; `signed` says whose certificates they are to have signed, for
/// the error when one of them is a leaf rather than a CA.
fn roots(
    field: &'static str,
    path: &Path,
    pem: &[u8],
    signed: &str,
) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(field, path, pem)? {
        check_authority(field, path, &cert, signed)?;
        roots.add(cert).map_err(|e| TlsError::Pem {
            field,
            path: path.to_path_buf(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Checks a PEM file of trust anchors as the coordinator and its clients check theirs: a leaf
/// certificate in it (`basicConstraints` CA:FALSE) is refused, naming `field` and `path`;
/// `signed` says whose certificates it is to have signed ("etcd's").
pub fn check_ca_file(field: &'static str, path: &Path, signed: &str) -> Result<(), TlsError> {
    let pem = read(field, path)?;
    roots(field, path, &pem, signed).map(|_| ())
}

/// Checks the first certificate of a client's PEM file as a worker checks `--client-cert`:
/// within its validity period, not a CA, an `extendedKeyUsage` (if any) allowing `clientAuth`.
pub fn check_client_certificate_file(field: &'static str, path: &Path) -> Result<(), TlsError> {
    let pem = read(field, path)?;
    let certs = certificates(field, path, &pem)?;
    check_leaf(field, path, &certs[0], Role::EtcdClient)
}

/// Which end of a connection a certificate identifies (its `extendedKeyUsage` must allow it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Server,
    Client,
    /// A client of etcd, whose Go server does not refuse a CA certificate as a client's.
    EtcdClient,
}

/// How far ahead of this machine's clock a certificate's `notBefore` may be (a certificate made
/// a moment ago on a machine whose clock runs ahead) before it is refused rather than warned of.
const CLOCK_SKEW: i64 = 300;

/// A certificate this close to its `notAfter` is warned about when it is loaded.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

fn parse<'a>(
    field: &'static str,
    path: &Path,
    der: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| TlsError::Pem {
            field,
            path: path.to_path_buf(),
            message: format!("not an X.509 certificate: {e}"),
        })
}

/// Refuses, at load, a leaf certificate (the first of `path`) that every peer would refuse at
/// the handshake, where the error names neither file nor cause on this side: outside its
/// validity period (RFC 5280 4.1.2.5), a CA certificate used as an end entity
/// (`basicConstraints` CA:TRUE, which webpki refuses as `CaUsedAsEndEntity`), or an
/// `extendedKeyUsage` without `serverAuth` / `clientAuth` for its `role` (RFC 5280 4.2.1.12).
/// Warns when it expires within [`EXPIRY_WARNING`]. Errors name `field` and `path`.
fn check_leaf(
    field: &'static str,
    path: &Path,
    der: &CertificateDer<'_>,
    role: Role,
) -> Result<(), TlsError> {
    let cert = parse(field, path, der)?;
    let fail = |message: String| TlsError::Pem {
        field,
        path: path.to_path_buf(),
        message,
    };
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        let ahead = validity.not_before.timestamp() - now.timestamp();
        if ahead <= CLOCK_SKEW {
            tracing::warn!(
                field,
                path = %path.display(),
                not_before = %validity.not_before,
                "the certificate is valid only from {ahead} s from now by this machine's clock: peers with a clock behind it refuse it until then"
            );
        }
    }
    if validity.not_before.timestamp() - now.timestamp() > CLOCK_SKEW {
        return Err(fail(format!(
            "the certificate for {} is not valid before {} (this machine's clock says {now}): \
             peers would refuse it",
            cert.subject(),
            validity.not_before
        )));
    }
    if now > validity.not_after {
        return Err(fail(format!(
            "the certificate for {} expired on {}: peers would refuse it; renew it",
            cert.subject(),
            validity.not_after
        )));
    }
    if validity
        .time_to_expiration()
        .is_some_and(|left| left.whole_seconds() < EXPIRY_WARNING.as_secs() as i64)
    {
        tracing::warn!(
            field,
            path = %path.display(),
            not_after = %validity.not_after,
            "the certificate expires within 7 days: a job still running then loses its connections"
        );
    }
    if role != Role::EtcdClient
        && cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca)
    {
        return Err(fail(format!(
            "the certificate for {} is a CA certificate (basicConstraints CA:TRUE), which peers \
             refuse as a {}'s: give the certificate the CA signed for it",
            cert.subject(),
            match role {
                Role::Server => "server",
                Role::Client | Role::EtcdClient => "client",
            }
        )));
    }
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let eku = eku.value;
        let (allowed, wanted) = match role {
            Role::Server => (eku.any || eku.server_auth, "serverAuth"),
            Role::Client | Role::EtcdClient => (eku.any || eku.client_auth, "clientAuth"),
        };
        if !allowed {
            return Err(fail(format!(
                "the certificate for {} has an extendedKeyUsage without {wanted}, so peers \
                 refuse it for this end of the connection",
                cert.subject()
            )));
        }
    }
    Ok(())
}

/// Refuses a trust anchor that is a leaf certificate (`basicConstraints` CA:FALSE): it signed
/// nothing, so every peer would be refused as signed by an unknown issuer (a common mix-up of
/// `ca.pem` with a server's or client's own certificate). A certificate without the extension
/// (an X.509 v1 root) is taken as it is. The anchor's dates are not checked: TLS libraries,
/// rustls' webpki among them, ignore them.
fn check_authority(
    field: &'static str,
    path: &Path,
    der: &CertificateDer<'_>,
    signed: &str,
) -> Result<(), TlsError> {
    let cert = parse(field, path, der)?;
    if cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| !b.value.ca)
        // A self-issued leaf pinned as its own anchor (a self-signed server certificate) is
        // one webpki accepts: only a leaf another CA issued signs nothing a peer presents.
        && cert.issuer() != cert.subject()
    {
        return Err(TlsError::Pem {
            field,
            path: path.to_path_buf(),
            message: format!(
                "the certificate for {} is not a CA (basicConstraints CA:FALSE): give the CA \
                 that signed {signed} certificates, not a leaf certificate",
                cert.subject()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// A server's error text is printed by the worker and `dapt status`: its terminal escapes
    /// and newlines (a forged "job completed" log line, an audit) come out escaped, and so does
    /// a refusal's message.
    #[test]
    fn a_servers_error_text_is_escaped_before_it_is_printed() {
        let hostile = "no\x1b]0;owned\x07\n{\"level\":\"INFO\",\"message\":\"job completed\"}";
        let text = explain(&tonic::Status::internal(hostile));
        assert!(!text.contains(['\x1b', '\x07', '\n']), "{text}");
        assert!(text.contains(r"\u{1b}]0;owned"), "{text}");
        let mut status = tonic::Status::failed_precondition(hostile);
        status.metadata_mut().insert(
            crate::rpc::ERROR_CODE_KEY,
            "ERROR_CODE_OTHER_JOB".parse().expect("ascii"),
        );
        let refusal = crate::rpc::Refusal::from_status(&status).expect("a refusal");
        assert!(
            !refusal.message.contains(['\x1b', '\n']),
            "{}",
            refusal.message
        );
    }

    use super::*;

    #[test]
    fn keys_readable_by_group_or_others_are_told_apart() {
        assert!(!readable_by_others(0o100600));
        assert!(!readable_by_others(0o100400));
        assert!(readable_by_others(0o100644));
        assert!(readable_by_others(0o100640));
        assert!(readable_by_others(0o100604));
    }

    #[test]
    fn a_plain_call_closed_at_once_hints_at_https() {
        let status = tonic::Status::unavailable("error trying to connect: broken pipe");
        let text = explain_first_call(&status, "http://coord:7070", &ClientTls::default());
        assert!(text.contains("https://"), "{text}");
        let text = explain_first_call(&status, "https://coord:7070", &ClientTls::default());
        assert!(!text.contains("its URL starts with https://"), "{text}");
        // a TLS alert read as an HTTP/2 frame
        let alert = tonic::Status::internal("h2 protocol error: frame with invalid size");
        let text = explain_first_call(&alert, "http://coord:7070", &ClientTls::default());
        assert!(text.contains("its URL starts with https://"), "{text}");
        let refused = tonic::Status::permission_denied("no");
        let text = explain_first_call(&refused, "http://coord:7070", &ClientTls::default());
        assert!(!text.contains("https://"), "{text}");
    }

    #[test]
    fn loopback_hosts() {
        for url in [
            "http://127.0.0.1:7070",
            "http://localhost:1",
            "https://[::1]:7070",
            "http://127.8.0.1:80",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:7070",
            "http://0.0.0.0:7070",
            "http://coord:1",
            "nonsense",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn https_needs_a_ca_and_a_pinned_ca_refuses_http() {
        let err = endpoint("https://10.0.0.1:7070", &ClientTls::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--coordinator-ca"), "{err}");
        let pinned = ClientTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..ClientTls::default()
        };
        let err = endpoint("http://10.0.0.1:7070", &pinned)
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain http"), "{err}");
        let err = endpoint("https://10.0.0.1:7070", &pinned)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--coordinator-ca: /nonexistent/ca.pem"),
            "{err}"
        );
        assert!(endpoint("http://10.0.0.1:7070", &ClientTls::default()).is_ok());
        let half = ClientTls {
            cert: Some("c.pem".into()),
            ..ClientTls::default()
        };
        assert!(endpoint("http://h:1", &half).is_err());
        // TLS settings with a plain URL would be ignored: refused by flag.
        let client = ClientTls {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..ClientTls::default()
        };
        let err = endpoint("http://h:1", &client).unwrap_err().to_string();
        assert!(
            err.contains("--client-cert") && err.contains("plain http"),
            "{err}"
        );
        let named = ClientTls {
            domain: Some("coordinator.svc".into()),
            ..ClientTls::default()
        };
        let err = endpoint("http://h:1", &named).unwrap_err().to_string();
        assert!(err.contains("--coordinator-domain"), "{err}");
    }

    /// A self-signed certificate for 127.0.0.1 made by rcgen with `edit` applied to its
    /// parameters: (certificate PEM, key PEM).
    fn certificate(edit: impl FnOnce(&mut rcgen::CertificateParams)) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "dapt-test");
        edit(&mut params);
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf certificate issued by a throwaway CA (so not self-issued): its PEM.
    fn issued_leaf() -> String {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "dapt-test-ca");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut leaf =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "dapt-leaf");
        leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
        leaf.signed_by(&key, &issuer).expect("signed").pem()
    }

    fn server_with(
        dir: &Path,
        cert: &(String, String),
        client_ca: Option<&str>,
    ) -> Result<ServerTls, TlsError> {
        std::fs::write(dir.join("cert.pem"), &cert.0).expect("write");
        std::fs::write(dir.join("key.pem"), &cert.1).expect("write");
        let client_ca = client_ca.map(|pem| {
            std::fs::write(dir.join("client-ca.pem"), pem).expect("write");
            dir.join("client-ca.pem")
        });
        server(&CoordinatorTls {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca,
            names: crate::job::TlsFieldNames::JOB,
        })
    }

    fn error(result: Result<impl Sized, TlsError>) -> String {
        match result {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    /// Certificates every peer would refuse at the handshake are refused when the coordinator
    /// loads them, by field and file (found by an audit: an expired certificate started a
    /// coordinator that no worker could reach, each worker saying only "certificate expired").
    #[test]
    fn certificates_peers_would_refuse_are_named_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = certificate(|p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        });
        assert!(server_with(dir.path(), &good, None).is_ok());
        let ca = certificate(|p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        });
        assert!(server_with(dir.path(), &good, Some(&ca.0)).is_ok());

        let expired = certificate(|p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        let err = error(server_with(dir.path(), &expired, None));
        assert!(
            err.starts_with("cluster.tls.cert: ")
                && err.contains("cert.pem")
                && err.contains("expired on"),
            "{err}"
        );
        let early = certificate(|p| {
            p.not_before = rcgen::date_time_ymd(2999, 1, 1);
            p.not_after = rcgen::date_time_ymd(3000, 1, 1);
        });
        let err = error(server_with(dir.path(), &early, None));
        assert!(
            err.contains("not valid before") && err.contains("clock"),
            "{err}"
        );
        // ca.pem given as the coordinator's own certificate
        let err = error(server_with(dir.path(), &ca, None));
        assert!(err.contains("is a CA certificate"), "{err}");
        // a client certificate given as the server's
        let client = certificate(|p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        });
        let err = error(server_with(dir.path(), &client, None));
        assert!(err.contains("without serverAuth"), "{err}");
        // a leaf (another CA's) given as the client CA
        let err = error(server_with(dir.path(), &good, Some(&issued_leaf())));
        assert!(
            err.starts_with("cluster.tls.client_ca: ")
                && err.contains("client-ca.pem")
                && err.contains("not a CA"),
            "{err}"
        );
    }

    /// The client side checks its pinned CA and its own certificate the same way.
    #[test]
    fn a_client_names_a_leaf_as_its_ca_and_a_server_certificate_as_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write");
            Some(path)
        };
        let ca = certificate(|p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        });
        let leaf = issued_leaf();
        // A self-signed leaf pinned as its own anchor is one rustls accepts.
        let self_signed = certificate(|p| p.is_ca = rcgen::IsCa::ExplicitNoCa);
        let client = certificate(|p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        });
        let server_only = certificate(|p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        });
        let with = |ca: &str, cert: &(String, String)| ClientTls {
            ca: write("ca.pem", ca),
            cert: write("client.pem", &cert.0),
            key: write("client.key", &cert.1),
            domain: None,
        };
        assert!(endpoint("https://127.0.0.1:7070", &with(&ca.0, &client)).is_ok());
        assert!(endpoint("https://127.0.0.1:7070", &with(&self_signed.0, &client)).is_ok());
        let err = error(endpoint("https://127.0.0.1:7070", &with(&leaf, &client)));
        assert!(
            err.starts_with("--coordinator-ca: ") && err.contains("not a CA"),
            "{err}"
        );
        let err = error(endpoint(
            "https://127.0.0.1:7070",
            &with(&ca.0, &server_only),
        ));
        assert!(
            err.starts_with("--client-cert: ") && err.contains("without clientAuth"),
            "{err}"
        );
    }

    /// `dapt status` given the metrics port was told to try https:// (an audit's finding):
    /// an address that answers HTTP/1.1 is named as such.
    #[tokio::test]
    async fn an_http1_server_is_told_from_a_tls_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let http1 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", http1.local_addr().expect("addr"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = http1.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closed_url = format!("http://{}", closed.local_addr().expect("addr"));
        tokio::spawn(async move {
            while let Ok((s, _)) = closed.accept().await {
                drop(s);
            }
        });
        let status = tonic::Status::unavailable("error trying to connect: broken pipe");
        let text = explain_first_call_probing(&status, &url, &ClientTls::default()).await;
        assert!(
            text.contains("answers HTTP/1.1") && text.contains("/metrics"),
            "{text}"
        );
        assert!(!text.contains("https://"), "{text}");
        let text = explain_first_call_probing(&status, &closed_url, &ClientTls::default()).await;
        assert!(text.contains("its URL starts with https://"), "{text}");
    }
}
