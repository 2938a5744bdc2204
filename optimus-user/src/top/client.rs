//! Reads a running agent's `GET /api/v1/snapshot` with a blocking client and a short
//! timeout; the answer is bounded in size before it is parsed.
use std::io::Read as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::web::SnapshotDoc;

/// Longest wait for one answer.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read (a snapshot of 1,000 VMs is well under a megabyte).
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// Why the agent could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {url}: {reason}; is `optimus run` running there? (pass its address with --url)")]
    Unreachable { url: String, reason: String },
    #[error("the agent at {url} answered HTTP {status} to /api/v1/snapshot; is it an optimus agent of this version? (pass another with --url)")]
    Status { url: String, status: u16 },
    #[error("the agent at {url} refused the request (HTTP 401): it wants basic-auth credentials, wrong or missing; put user:password@ in --url, e.g. http://ops:PASSWORD@host:9947")]
    Unauthorized { url: String },
    #[error("the agent at {url} sent an answer that is not a snapshot: {reason}")]
    Malformed { url: String, reason: String },
    #[error("--ca-file {path}: {reason}; give the PEM certificate of the CA that signed the agent's certificate")]
    CaFile { path: String, reason: String },
}

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    /// `base` without a password, for messages.
    shown: String,
    agent: ureq::Agent,
}

impl Client {
    /// `base` is the agent's root URL, e.g. `http://127.0.0.1:9947`. An `https://` agent
    /// is checked against the public web roots, or only against the CAs in `ca_file`.
    pub fn new(base: &str, ca_file: Option<&std::path::Path>) -> Result<Self, ClientError> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(TIMEOUT)
            .timeout(TIMEOUT)
            .redirects(0);
        if let Some(path) = ca_file {
            builder = builder.tls_config(std::sync::Arc::new(tls_trusting(path)?));
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            shown: without_password(base.trim_end_matches('/')),
            agent: builder.build(),
        })
    }

    /// The agent's URL as shown: without a password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The latest snapshot, with the history points after `since` (unix seconds; by
    /// default now: top charts nothing, so it asks for no backlog).
    pub fn fetch(&self, since: Option<f64>) -> Result<SnapshotDoc, ClientError> {
        let since = since.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        });
        let url = format!("{}/api/v1/snapshot?since={since}", self.base);
        let base = || self.shown.clone();
        let response = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(401, _)) => {
                return Err(ClientError::Unauthorized { url: base() })
            }
            Err(ureq::Error::Status(status, _)) => {
                return Err(ClientError::Status {
                    url: base(),
                    status,
                })
            }
            Err(ureq::Error::Transport(t)) => {
                // Transport's own Display repeats the URL; its source says what failed.
                let mut reason = std::error::Error::source(&t)
                    .map_or_else(|| t.kind().to_string(), ToString::to_string);
                if reason.to_lowercase().contains("certificate") {
                    reason.push_str(" (an agent behind a private CA: pass that CA with --ca-file)");
                }
                return Err(ClientError::Unreachable {
                    url: base(),
                    reason,
                });
            }
        };
        let mut body = Vec::new();
        response
            .into_reader()
            .take(MAX_BODY)
            .read_to_end(&mut body)
            .map_err(|e| ClientError::Unreachable {
                url: base(),
                reason: e.to_string(),
            })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Malformed {
            url: base(),
            reason: e.to_string(),
        })
    }
}

/// A TLS client configuration trusting only the CA certificates in `path` (PEM), as
/// `curl --cacert` does: an agent behind a private CA (the web config's usual case).
fn tls_trusting(path: &std::path::Path) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let fail = |reason: String| ClientError::CaFile {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| fail(format!("not a PEM certificate ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("not a usable CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(fail("holds no certificate".to_owned()));
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(e.to_string()))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// `http://user:secret@host` → `http://user@host`: a basic-auth password in `--url` never
/// reaches the screen or a log.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}{}", &rest[host_end..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_shown() {
        use super::without_password as w;
        assert_eq!(
            w("http://ops:s3cret@10.0.0.5:9947"),
            "http://ops@10.0.0.5:9947"
        );
        assert_eq!(w("https://h:1/x@y"), "https://h:1/x@y");
        assert_eq!(w("http://127.0.0.1:9947"), "http://127.0.0.1:9947");
    }
}
