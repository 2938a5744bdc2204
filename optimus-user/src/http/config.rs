//! The web config file of Prometheus' exporter-toolkit (`--web.config.file`): YAML in,
//! a validated [`WebConfig`] out. The file that secures a user's node_exporter secures
//! Optimus unchanged: same keys, same defaults, same strictness (an unknown key is an
//! error, as exporter-toolkit's strict unmarshalling makes it).
//!
//! Format: <https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md>.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What is wrong with a web config file: the key, then what to do.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read the web config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("web config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("web config file {path}: `{key}` {problem}")]
    Key {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The file as written (field names are exporter-toolkit's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// A PEM source: a file (resolved against the config file's directory, as exporter-toolkit
/// does) or the PEM text inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

/// exporter-toolkit's `client_auth_type`, named as Go's `tls.ClientAuthType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

/// TLS protocol versions rustls speaks (TLS 1.0 and 1.1 are refused with the fix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// The TLS part, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: Pem,
    pub key: Pem,
    pub client_auth: ClientAuth,
    pub client_ca: Option<Pem>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// Go cipher suite names (`TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`); empty: rustls' set.
    pub cipher_suites: Vec<String>,
    /// Go curve names (`X25519`, `CurveP256`, `CurveP384`); empty: rustls' set.
    pub curves: Vec<String>,
    pub prefer_server_cipher_suites: bool,
}

/// A validated web config: TLS, basic-auth users (bcrypt hashes) and extra response headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebConfig {
    pub tls: Option<TlsSettings>,
    /// User name → bcrypt hash.
    pub users: BTreeMap<String, String>,
    /// Header name → value, sent on every response.
    pub headers: Vec<(String, String)>,
}

/// Headers exporter-toolkit lets a config set, with the values it allows (`None`: any).
const ALLOWED_HEADERS: [(&str, Option<&[&str]>); 4] = [
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
];

impl WebConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir).map_err(|e| e.at(path))
    }

    /// Parses the YAML `text`; relative file names are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<WebConfig, Problem> {
        // An empty file is a valid, empty config (exporter-toolkit accepts it too).
        let raw: RawFile = if text.trim().is_empty() {
            RawFile::default()
        } else {
            serde_norway::from_str(text).map_err(|e| Problem::Syntax(syntax_message(&e)))?
        };
        let tls = raw.tls_server_config.map(|t| tls(t, dir)).transpose()?;
        let users = raw.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.contains(':') {
                return Err(Problem::key(
                    format!("basic_auth_users.{user}"),
                    "contains `:`, which HTTP basic auth cannot carry; rename the user",
                ));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(Problem::key(
                    format!("basic_auth_users.{user}"),
                    "is not a bcrypt hash; make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`",
                ));
            }
        }
        let mut headers = Vec::new();
        if let Some(http) = raw.http_server_config {
            // http2 is accepted for compatibility; Optimus serves HTTP/1.1 only, which
            // every Prometheus speaks.
            let _ = http.http2;
            for (name, value) in http.headers.unwrap_or_default() {
                let key = format!("http_server_config.headers.{name}");
                let Some((_, allowed)) = ALLOWED_HEADERS
                    .iter()
                    .find(|(h, _)| h.eq_ignore_ascii_case(&name))
                else {
                    return Err(Problem::key(
                        key,
                        format!(
                            "cannot be configured; allowed headers: {}",
                            ALLOWED_HEADERS.map(|(h, _)| h).join(", ")
                        ),
                    ));
                };
                if let Some(values) = allowed {
                    if !values.iter().any(|v| v.eq_ignore_ascii_case(&value)) {
                        return Err(Problem::key(
                            key,
                            format!("is `{value}`; use one of: {}", values.join(", ")),
                        ));
                    }
                }
                if hyper::header::HeaderValue::from_str(&value).is_err() {
                    return Err(Problem::key(key, "holds characters a header cannot carry"));
                }
                headers.push((name, value));
            }
        }
        Ok(WebConfig {
            tls,
            users,
            headers,
        })
    }
}

/// A problem found while parsing, before the file's path is known.
#[derive(Debug, PartialEq, Eq)]
pub enum Problem {
    Syntax(String),
    Key { key: String, problem: String },
}

impl Problem {
    fn key(key: impl Into<String>, problem: impl Into<String>) -> Problem {
        Problem::Key {
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn at(self, path: &Path) -> WebConfigError {
        match self {
            Problem::Syntax(message) => WebConfigError::Syntax {
                path: path.to_owned(),
                message,
            },
            Problem::Key { key, problem } => WebConfigError::Key {
                path: path.to_owned(),
                key,
                problem,
            },
        }
    }
}

/// serde's message on one line, with its position and the fix for the usual cause.
fn syntax_message(e: &serde_norway::Error) -> String {
    let text = e.to_string().replace('\n', " ");
    if text.contains("unknown field") {
        format!("{text}; remove or fix that key (see exporter-toolkit's web-configuration.md)")
    } else {
        format!("{text}; fix the YAML")
    }
}

fn pem(
    file: Option<String>,
    inline: Option<String>,
    dir: &Path,
    key: &str,
) -> Result<Option<Pem>, Problem> {
    match (file, inline) {
        (Some(_), Some(_)) => Err(Problem::key(
            key,
            format!("is given both as `{key}_file` and inline as `{key}`; keep one"),
        )),
        (Some(f), None) if f.trim().is_empty() => Ok(None),
        (Some(f), None) => Ok(Some(Pem::File(dir.join(f)))),
        (None, Some(text)) if text.trim().is_empty() => Ok(None),
        (None, Some(text)) => Ok(Some(Pem::Inline(text))),
        (None, None) => Ok(None),
    }
}

fn version(v: Option<&str>, key: &str, default: TlsVersion) -> Result<TlsVersion, Problem> {
    match v {
        None | Some("") => Ok(default),
        Some("TLS12") => Ok(TlsVersion::Tls12),
        Some("TLS13") => Ok(TlsVersion::Tls13),
        Some("TLS10" | "TLS11") => Err(Problem::key(
            format!("tls_server_config.{key}"),
            "asks for a TLS version rustls does not speak (it has no TLS 1.0 or 1.1); use TLS12 or TLS13",
        )),
        Some(other) => Err(Problem::key(
            format!("tls_server_config.{key}"),
            format!("is `{other}`; use TLS12 or TLS13"),
        )),
    }
}

fn tls(t: RawTls, dir: &Path) -> Result<TlsSettings, Problem> {
    let cert = pem(t.cert_file, t.cert, dir, "cert")?;
    let key = pem(t.key_file, t.key, dir, "key")?;
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, _) => {
            return Err(Problem::key(
                "tls_server_config.cert_file",
                "is missing; give the server certificate (PEM) with its key_file",
            ))
        }
        (_, None) => {
            return Err(Problem::key(
                "tls_server_config.key_file",
                "is missing; give the private key (PEM) of cert_file",
            ))
        }
    };
    let client_auth = match t.client_auth_type.as_deref() {
        None | Some("" | "NoClientCert") => ClientAuth::NoClientCert,
        Some("RequestClientCert") => ClientAuth::RequestClientCert,
        Some("RequireAnyClientCert") => ClientAuth::RequireAnyClientCert,
        Some("VerifyClientCertIfGiven") => ClientAuth::VerifyClientCertIfGiven,
        Some("RequireAndVerifyClientCert") => ClientAuth::RequireAndVerifyClientCert,
        Some(other) => {
            return Err(Problem::key(
                "tls_server_config.client_auth_type",
                format!("is `{other}`; use NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"),
            ))
        }
    };
    let client_ca = pem(t.client_ca_file, None, dir, "client_ca")?;
    let verifies = matches!(
        client_auth,
        ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert
    );
    if verifies && client_ca.is_none() {
        return Err(Problem::key(
            "tls_server_config.client_ca_file",
            "is missing, and client_auth_type verifies client certificates against it; give the CA (PEM)",
        ));
    }
    if client_ca.is_some() && !verifies {
        // exporter-toolkit refuses this pairing too: a CA that is never used is a mistake.
        return Err(Problem::key(
            "tls_server_config.client_ca_file",
            "is set but client_auth_type does not verify; set client_auth_type to RequireAndVerifyClientCert",
        ));
    }
    if t.client_allowed_sans.is_some_and(|s| !s.is_empty()) {
        return Err(Problem::key(
            "tls_server_config.client_allowed_sans",
            "is not supported by Optimus yet; restrict clients with client_ca_file instead",
        ));
    }
    let min_version = version(t.min_version.as_deref(), "min_version", TlsVersion::Tls12)?;
    let max_version = version(t.max_version.as_deref(), "max_version", TlsVersion::Tls13)?;
    if min_version > max_version {
        return Err(Problem::key(
            "tls_server_config.min_version",
            "is above max_version; lower it or raise max_version",
        ));
    }
    let cipher_suites = t.cipher_suites.unwrap_or_default();
    for name in &cipher_suites {
        if super::tls::cipher_suite(name).is_none() {
            return Err(Problem::key(
                "tls_server_config.cipher_suites",
                format!("names `{name}`, which rustls does not offer; use TLS 1.2 ECDHE-GCM or CHACHA20 suites, or drop the key"),
            ));
        }
    }
    let curves = t.curve_preferences.unwrap_or_default();
    for name in &curves {
        if super::tls::curve(name).is_none() {
            return Err(Problem::key(
                "tls_server_config.curve_preferences",
                format!("names `{name}`, which rustls does not offer; use X25519, CurveP256 or CurveP384"),
            ));
        }
    }
    Ok(TlsSettings {
        cert,
        key,
        client_auth,
        client_ca,
        min_version,
        max_version,
        cipher_suites,
        curves,
        prefer_server_cipher_suites: t.prefer_server_cipher_suites.unwrap_or(true),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$04$XmFz5iIAjGfh11mbaRZwUO99HDKLDu/UQ7/2/vwmSHMRI6LlikLVS";

    fn parse(text: &str) -> Result<WebConfig, Problem> {
        WebConfig::parse(text, Path::new("/etc/optimus"))
    }

    fn key_of(p: Problem) -> String {
        match p {
            Problem::Key { key, .. } => key,
            Problem::Syntax(s) => panic!("syntax error instead of a key error: {s}"),
        }
    }

    #[test]
    fn node_exporter_file_parses_unchanged() {
        let cfg = parse(&format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\n\
             basic_auth_users:\n  prometheus: {HASH}\n\
             http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000\n"
        ))
        .unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!(
            tls.cert,
            Pem::File(PathBuf::from("/etc/optimus/server.crt"))
        );
        assert_eq!(tls.key, Pem::File(PathBuf::from("/etc/optimus/server.key")));
        assert_eq!(tls.client_auth, ClientAuth::NoClientCert);
        assert_eq!(tls.min_version, TlsVersion::Tls12);
        assert_eq!(cfg.users.get("prometheus").map(String::as_str), Some(HASH));
        assert_eq!(cfg.headers.len(), 2);
    }

    #[test]
    fn empty_file_is_no_tls_no_auth() {
        assert_eq!(parse("").unwrap(), WebConfig::default());
        assert_eq!(parse("# nothing\n").unwrap(), WebConfig::default());
    }

    #[test]
    fn absolute_paths_stay_absolute() {
        let cfg =
            parse("tls_server_config:\n  cert_file: /a/c.pem\n  key_file: /a/k.pem\n").unwrap();
        assert_eq!(cfg.tls.unwrap().cert, Pem::File(PathBuf::from("/a/c.pem")));
    }

    #[test]
    fn bad_files_name_the_key() {
        let e = parse("tls_server_config:\n  cert_file: c\n  kye_file: k\n").unwrap_err();
        assert!(
            matches!(&e, Problem::Syntax(s) if s.contains("kye_file")),
            "{e:?}"
        );
        let e = parse("tls_server_config:\n  cert_file: c\n").unwrap_err();
        assert_eq!(key_of(e), "tls_server_config.key_file");
        let e = parse("basic_auth_users:\n  alice: hunter2\n").unwrap_err();
        assert_eq!(key_of(e), "basic_auth_users.alice");
        let e = parse("tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS10\n")
            .unwrap_err();
        assert_eq!(key_of(e), "tls_server_config.min_version");
        let e = parse(
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n",
        )
        .unwrap_err();
        assert_eq!(key_of(e), "tls_server_config.client_ca_file");
        let e = parse("http_server_config:\n  headers:\n    Content-Type: x\n").unwrap_err();
        assert_eq!(key_of(e), "http_server_config.headers.Content-Type");
        let e = parse("http_server_config:\n  headers:\n    X-Frame-Options: allow\n").unwrap_err();
        assert_eq!(key_of(e), "http_server_config.headers.X-Frame-Options");
        let e = parse(
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
        )
        .unwrap_err();
        assert_eq!(key_of(e), "tls_server_config.cipher_suites");
        assert!(matches!(
            parse("tls_server_config: [1, 2"),
            Err(Problem::Syntax(_))
        ));
    }

    #[test]
    fn mutual_tls_needs_its_ca() {
        let cfg = parse(
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n",
        )
        .unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.client_auth, ClientAuth::RequireAndVerifyClientCert);
        assert_eq!(
            tls.client_ca,
            Some(Pem::File(PathBuf::from("/etc/optimus/ca.pem")))
        );
    }
}
