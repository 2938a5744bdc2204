//! The server over real loopback connections: keep-alive, gzip, limits, the connection
//! cap, basic auth and TLS (fixture certificates under tests/fixtures/tls).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;
use crate::sampler::Snapshot;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tls")
        .join(name)
}

async fn start(security: Security, max_connections: usize) -> SocketAddr {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = AppState {
        snapshot: Arc::new(RwLock::new(Arc::new(Snapshot::default()))),
        history: Arc::new(crate::web::History::new()),
    };
    tokio::spawn(serve(
        listener,
        app,
        security,
        ServeOptions { max_connections },
    ));
    addr
}

#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Writes `request` and reads one response (Content-Length framed, as the server sends).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &str) -> Resp {
    s.write_all(request.as_bytes()).await.unwrap();
    read_response(s, request.starts_with("HEAD")).await
}

async fn read_response<S: AsyncRead + Unpin>(s: &mut S, head_only: bool) -> Resp {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let split = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut body = buf[split + 4..].to_vec();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut resp = Resp {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = resp
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    if !head_only {
        while body.len() < len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-body");
            body.extend_from_slice(&chunk[..n]);
        }
        resp.body = body;
    }
    resp
}

const GET: &str = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn keep_alive_serves_two_requests_on_one_connection() {
    let addr = start(Security::none(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let a = exchange(&mut s, GET).await;
    let b = exchange(&mut s, GET).await;
    assert_eq!((a.status, b.status), (200, 200));
    assert!(String::from_utf8_lossy(&b.body).contains("optimus_build_info"));
    assert_eq!(a.header("content-type").as_deref(), Some(routes::CLASSIC));
}

#[tokio::test]
async fn openmetrics_when_asked() {
    let addr = start(Security::none(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let r = exchange(
        &mut s,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
    )
    .await;
    assert_eq!(
        r.header("content-type").as_deref(),
        Some(routes::OPENMETRICS)
    );
    assert!(String::from_utf8_lossy(&r.body).ends_with("# EOF\n"));
}

#[tokio::test]
async fn gzip_when_asked_identity_otherwise() {
    let addr = start(Security::none(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let plain = exchange(&mut s, GET).await;
    assert_eq!(plain.header("content-encoding"), None);
    let z = exchange(
        &mut s,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await;
    assert_eq!(z.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(z.header("vary").as_deref(), Some("Accept-Encoding"));
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&z.body[..])
        .read_to_end(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, plain.body);
    assert!(z.body.len() < plain.body.len());
    let refused = exchange(
        &mut s,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip;q=0, identity\r\n\r\n",
    )
    .await;
    assert_eq!(refused.header("content-encoding"), None);
}

#[tokio::test]
async fn junk_is_400_and_bare_lf_is_answered_at_once() {
    let addr = start(Security::none(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let r = exchange(&mut s, "HELLO THERE\r\n\r\n").await;
    assert_eq!(r.status, 400);

    let mut s = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        exchange(&mut s, "GET /metrics HTTP/1.1\nHost: t\n\n"),
    )
    .await
    .expect("a bare-LF request waited for a reply");
    assert!(r.status == 200 || r.status == 400, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn only_get_and_head() {
    let addr = start(Security::none(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let r = exchange(
        &mut s,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET, HEAD"));
    let head = exchange(&mut s, "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(head.status, 200);
    let len: usize = head.header("content-length").unwrap().parse().unwrap();
    assert!(len > 0);
    // The connection is still usable: the HEAD response carried no body.
    let get = exchange(&mut s, GET).await;
    assert_eq!(get.body.len(), len);
    let missing = exchange(&mut s, "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn oversized_head_is_refused() {
    let addr = start(Security::none(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The server may answer 431 before it has read it all, then close: ignore write errors.
    let _ = s.write_all(big.as_bytes()).await;
    let r = read_response(&mut s, false).await;
    assert_eq!(r.status, 431);
}

#[tokio::test]
async fn idle_connections_cannot_keep_a_scrape_out() {
    let addr = start(Security::none(), 16).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Half-sent requests too (slowloris): they are idle as far as the cap is concerned.
    for s in idle.iter_mut().take(50) {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost:")
            .await
            .unwrap();
    }
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), exchange(&mut s, GET))
        .await
        .expect("a scrape was kept out by idle connections");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("web.yml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_configured_headers() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let path = write_config(
        &dir,
        &format!(
            "basic_auth_users:\n  prom: {hash}\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        ),
    );
    let addr = start(Security::from_file(&path).unwrap(), 16).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let none = exchange(&mut s, GET).await;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.header("www-authenticate").as_deref(),
        Some("Basic realm=\"optimus\"")
    );
    let wrong = exchange(
        &mut s,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Basic cHJvbTp3cm9uZw==\r\n\r\n",
    )
    .await;
    assert_eq!(wrong.status, 401);
    let right = exchange(
        &mut s,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n\r\n",
    )
    .await;
    assert_eq!(right.status, 200);
    assert_eq!(right.header("x-frame-options").as_deref(), Some("deny"));
}

fn tls_client(with_client_cert: bool) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fixture("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = if with_client_cert {
        let chain = CertificateDer::pem_file_iter(fixture("client.crt"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(fixture("client.key")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_get(addr: SocketAddr, with_client_cert: bool) -> Result<Resp, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tls_client(with_client_cert).connect(name, tcp).await?;
    tls.write_all(GET.as_bytes()).await?;
    let mut buf = Vec::new();
    // Reading the whole response on a keep-alive connection: take the head only.
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    Ok(Resp {
        status,
        head,
        body: Vec::new(),
    })
}

/// A server with the fixture's certificate (for `localhost` and 127.0.0.1).
async fn start_tls() -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            fixture("server.crt").display(),
            fixture("server.key").display()
        ),
    );
    // The configuration is read here; the file may go with the directory.
    start(Security::from_file(&path).unwrap(), 16).await
}

#[tokio::test]
async fn tls_serves_https_and_refuses_plain_http() {
    let addr = start_tls().await;
    assert_eq!(tls_get(addr, false).await.unwrap().status, 200);
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(GET.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "plain HTTP got metrics from a TLS port"
    );
}

/// `optimus top`'s client reads an https agent behind the fixture CA with `--ca-file`, and
/// refuses it without (one line naming the flag).
#[tokio::test]
async fn top_reads_an_https_agent_through_its_ca_file() {
    use crate::top::client::Client;
    let addr = start_tls().await;
    // The fixture certificate names localhost.
    let url = format!("https://localhost:{}", addr.port());
    let ca = fixture("ca.crt");
    let (with_ca, without) = tokio::task::spawn_blocking(move || {
        (
            Client::new(&url, Some(&ca)).unwrap().fetch(None),
            Client::new(&url, None).unwrap().fetch(None),
        )
    })
    .await
    .unwrap();
    // A parsed snapshot document (the server's empty snapshot): TLS verified by the CA.
    with_ca.unwrap();
    let err = without.unwrap_err().to_string();
    assert!(err.contains("cannot reach the agent"), "{err}");
    assert!(err.contains("--ca-file"), "{err}");
    let bad = Client::new("https://localhost:1", Some(&fixture("server.key")))
        .unwrap_err()
        .to_string();
    assert!(bad.starts_with("--ca-file "), "{bad}");
    assert_eq!(bad.lines().count(), 1, "{bad}");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n  min_version: TLS13\n",
            fixture("server.crt").display(),
            fixture("server.key").display(),
            fixture("ca.crt").display()
        ),
    );
    let addr = start(Security::from_file(&path).unwrap(), 16).await;
    assert_eq!(tls_get(addr, true).await.unwrap().status, 200);
    assert!(tls_get(addr, false).await.is_err());
}

#[test]
fn bad_web_configs_are_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
            "cert_file",
        ),
        (
            &format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                fixture("server.crt").display(),
                fixture("client.key").display()
            ),
            "key_file",
        ),
        (
            "basic_auth_users:\n  prom: plaintext\n",
            "basic_auth_users.prom",
        ),
        ("tls_server_configs: {}\n", "tls_server_configs"),
    ];
    for (text, key) in cases {
        let path = write_config(&dir, text);
        let msg = Security::from_file(&path).unwrap_err().to_string();
        assert!(msg.contains(key), "{msg} does not name {key}");
        assert!(!msg.contains('\n'), "not one line: {msg}");
    }
    let msg = Security::from_file(&dir.path().join("missing.yml"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.yml"), "{msg}");
}

#[test]
fn gzip_negotiation() {
    let h = |v: &str| {
        let mut m = hyper::HeaderMap::new();
        m.insert(ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        accepts_gzip(&m)
    };
    assert!(h("gzip"));
    assert!(h("deflate, gzip;q=1.0, *;q=0.5"));
    assert!(h("*"));
    assert!(!h("gzip;q=0"));
    assert!(!h("identity"));
    assert!(!accepts_gzip(&hyper::HeaderMap::new()));
}

#[test]
fn connection_budget_keeps_descriptors_for_sampling() {
    assert!(connection_budget(usize::MAX) >= 1);
    assert!(connection_budget(3) <= 3);
}
