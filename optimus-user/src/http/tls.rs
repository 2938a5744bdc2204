//! TLS for the listener: a validated [`TlsSettings`] in, a rustls `ServerConfig` out
//! (ring provider; certificates, keys and client CAs read from PEM once, at start).

use std::sync::Arc;

use rustls::crypto::{ring, CryptoProvider, SupportedKxGroup};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SupportedCipherSuite};

use super::config::{ClientAuth, Pem, TlsSettings, TlsVersion};

/// Why TLS could not be set up: the key of the web config, the file, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("tls_server_config.{key}: {problem}")]
pub struct TlsError {
    pub key: &'static str,
    pub problem: String,
}

fn err(key: &'static str, problem: impl Into<String>) -> TlsError {
    TlsError {
        key,
        problem: problem.into(),
    }
}

/// rustls' TLS 1.2 suite for a Go cipher suite name (TLS 1.3 suites are not configurable
/// in Go either, so they are always on).
pub fn cipher_suite(go_name: &str) -> Option<SupportedCipherSuite> {
    // Go also accepts the pre-1.16 names without the `_SHA256` of CHACHA20 suites.
    let name = if go_name.ends_with("_CHACHA20_POLY1305") {
        format!("{go_name}_SHA256")
    } else {
        go_name.to_owned()
    };
    ring::ALL_CIPHER_SUITES
        .iter()
        .copied()
        .filter(|s| s.tls13().is_none())
        .find(|s| format!("{:?}", s.suite()) == name)
}

/// rustls' key exchange group for a Go curve name.
pub fn curve(go_name: &str) -> Option<&'static dyn SupportedKxGroup> {
    match go_name {
        "X25519" => Some(ring::kx_group::X25519),
        "CurveP256" => Some(ring::kx_group::SECP256R1),
        "CurveP384" => Some(ring::kx_group::SECP384R1),
        _ => None,
    }
}

fn read_pem(pem: &Pem, key: &'static str) -> Result<Vec<u8>, TlsError> {
    match pem {
        Pem::Inline(text) => Ok(text.as_bytes().to_vec()),
        Pem::File(path) => std::fs::read(path).map_err(|e| {
            err(
                key,
                format!(
                    "cannot read {}: {e}; fix the path or its permissions",
                    path.display()
                ),
            )
        }),
    }
}

fn certs(pem: &Pem, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(pem, key)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(key, format!("is not a PEM certificate ({e}); give a PEM file with `-----BEGIN CERTIFICATE-----`")))?;
    if certs.is_empty() {
        return Err(err(
            key,
            "holds no certificate; give a PEM file with `-----BEGIN CERTIFICATE-----`",
        ));
    }
    Ok(certs)
}

/// Builds the rustls server configuration.
pub fn server_config(t: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(&t.cert, "cert_file")?;
    let key_bytes = read_pem(&t.key, "key_file")?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        err(
            "key_file",
            format!("holds no usable private key ({e}); give the PEM key (PKCS#8, PKCS#1 or SEC1) of cert_file"),
        )
    })?;

    let mut provider = ring::default_provider();
    if !t.cipher_suites.is_empty() {
        let chosen: Vec<_> = t
            .cipher_suites
            .iter()
            .filter_map(|n| cipher_suite(n))
            .collect();
        provider
            .cipher_suites
            .retain(|s| s.tls13().is_some() || chosen.iter().any(|c| c.suite() == s.suite()));
        if !t.prefer_server_cipher_suites {
            log::debug!(
                "prefer_server_cipher_suites: false is honoured by following the client's order"
            );
        }
    }
    if !t.curves.is_empty() {
        provider.kx_groups = t.curves.iter().filter_map(|n| curve(n)).collect();
    }
    let provider = Arc::new(provider);
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (t.min_version..=t.max_version).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| {
            err(
                "min_version",
                format!("{e}; widen min_version..max_version"),
            )
        })?;

    let builder = match t.client_auth {
        ClientAuth::NoClientCert => builder.with_no_client_auth(),
        ClientAuth::RequestClientCert | ClientAuth::RequireAnyClientCert => builder
            .with_client_cert_verifier(Arc::new(AnyClientCert {
                mandatory: t.client_auth == ClientAuth::RequireAnyClientCert,
                provider: provider.clone(),
            })),
        ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert => {
            let ca = t.client_ca.as_ref().ok_or_else(|| {
                err(
                    "client_ca_file",
                    "is missing; give the CA (PEM) that signs client certificates",
                )
            })?;
            let mut roots = RootCertStore::empty();
            for cert in certs(ca, "client_ca_file")? {
                roots.add(cert).map_err(|e| {
                    err(
                        "client_ca_file",
                        format!("holds a certificate rustls cannot use as a root ({e})"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if t.client_auth == ClientAuth::VerifyClientCertIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| {
                err(
                    "client_ca_file",
                    format!("{e}; give a valid CA certificate"),
                )
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        err(
            "key_file",
            format!("does not fit cert_file ({e}); give the key that belongs to the certificate"),
        )
    })?;
    config.ignore_client_order = t.prefer_server_cipher_suites;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Go's `RequestClientCert` / `RequireAnyClientCert`: a client certificate is asked for
/// (or required) but not verified against any CA; its handshake signature still is, so
/// the client holds the key.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn go_names_map_to_rustls() {
        assert!(cipher_suite("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256").is_some());
        assert!(cipher_suite("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305").is_some());
        assert!(cipher_suite("TLS_RSA_WITH_RC4_128_SHA").is_none());
        assert!(cipher_suite("TLS13_AES_128_GCM_SHA256").is_none());
        assert!(curve("X25519").is_some());
        assert!(curve("CurveP521").is_none());
    }

    #[test]
    fn unreadable_files_name_the_key() {
        let t = TlsSettings {
            cert: Pem::File("/nonexistent/c.pem".into()),
            key: Pem::File("/nonexistent/k.pem".into()),
            client_auth: ClientAuth::NoClientCert,
            client_ca: None,
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            cipher_suites: vec![],
            curves: vec![],
            prefer_server_cipher_suites: true,
        };
        let e = server_config(&t).unwrap_err();
        assert_eq!(e.key, "cert_file");
        let t = TlsSettings {
            cert: Pem::Inline("not pem".into()),
            ..t
        };
        assert_eq!(server_config(&t).unwrap_err().key, "cert_file");
    }
}
