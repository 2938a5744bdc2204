//! HTTP serving: a listener and the sampler's snapshot in, `/metrics` and the API out,
//! through hyper 1 (HTTP/1.1, keep-alive), optionally TLS (rustls) and basic auth from an
//! exporter-toolkit web config file ([`config`]).
//!
//! Limits, so that no client can hurt a scrape or the sampler:
//! - request heads are capped at [`MAX_HEAD_BYTES`] (431 beyond), and must arrive within
//!   [`HEADER_READ_TIMEOUT`] of the connection going idle (hyper's header timer), which
//!   is also how long an idle keep-alive connection is kept;
//! - a response must be taken by the client within [`WRITE_TIMEOUT`] per write;
//! - at most `max_connections` at once. At the cap, the connection idle the longest is
//!   closed to admit the new one, so hundreds of idle or slow connections cannot keep a
//!   scraper out; only when every connection is mid-request is the newcomer refused.
//! - TLS handshakes must finish within [`HANDSHAKE_TIMEOUT`].
//!
//! Nothing a client sends is executed or echoed back.

pub mod auth;
pub mod config;
pub mod routes;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, VARY,
    WWW_AUTHENTICATE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use self::auth::BasicAuth;
use self::config::WebConfig;
use self::routes::{AppState, Reply};

/// Largest request head (request line and headers); a scrape's is a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time for a request head to arrive once a connection is idle; also the keep-alive idle
/// limit (above the usual 15 s scrape interval, so Prometheus keeps its connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time one write of a response may wait on the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on concurrent connections (`--web.max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Responses smaller than this are sent as they are: gzip would not pay for itself.
const GZIP_MIN_BYTES: usize = 1024;

/// Why the server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Config(#[from] config::WebConfigError),
    #[error("web config file {path}: {source}")]
    Tls {
        path: std::path::PathBuf,
        #[source]
        source: tls::TlsError,
    },
}

/// Settings of the server that are not in the web config file.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Transport security and access rules, built once from the web config.
#[derive(Clone, Default)]
pub struct Security {
    tls: Option<tokio_rustls::TlsAcceptor>,
    auth: Option<Arc<BasicAuth>>,
    headers: Arc<Vec<(HeaderName, HeaderValue)>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("basic_auth", &self.auth.is_some())
            .field("headers", &self.headers.len())
            .finish()
    }
}

impl Security {
    /// No TLS, no auth: plain HTTP, as without `--web.config.file`.
    pub fn none() -> Security {
        Security::default()
    }

    /// Reads and checks `path` (certificates and keys included), so a bad file stops the
    /// agent before anything is served.
    pub fn from_file(path: &std::path::Path) -> Result<Security, HttpError> {
        let cfg = WebConfig::load(path)?;
        Security::from_config(cfg, path)
    }

    fn from_config(cfg: WebConfig, path: &std::path::Path) -> Result<Security, HttpError> {
        let tls = cfg
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()
            .map_err(|source| HttpError::Tls {
                path: path.to_owned(),
                source,
            })?
            .map(tokio_rustls::TlsAcceptor::from);
        let headers = cfg
            .headers
            .iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        Ok(Security {
            tls,
            auth: BasicAuth::new(cfg.users),
            headers: Arc::new(headers),
        })
    }

    /// Whether connections are TLS (for the log line and the URL scheme).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether basic auth is required.
    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }
}

/// Binds the listener, with a one-line cause and fix on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "cannot listen on {addr}: address already in use (another optimus running?); pick another with --listen ADDR"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot listen on {addr}: permission denied; use a port above 1023 with --listen ADDR"
        ),
        _ => format!("cannot listen on {addr}: {e}; pick another with --listen ADDR"),
    })
}

/// The cap on connections that the process' open-file limit allows: a quarter of the soft
/// limit, so that sampling (procfs reads, perf events, libvirt) always has descriptors left.
pub fn connection_budget(requested: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; no other precondition.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    requested.min(soft / 4).max(1)
}

/// Live connections and which of them are idle, for the cap's eviction.
#[derive(Debug, Default)]
struct Tracker {
    inner: Mutex<Conns>,
}

#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    live: HashMap<u64, Conn>,
}

#[derive(Debug)]
struct Conn {
    /// `None` while a request is being handled.
    idle_since: Option<Instant>,
    close: Arc<Notify>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a new connection, closing the longest-idle one if at `max`. `None` when
    /// every connection is busy with a request.
    fn admit(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut conns = self.lock();
        if conns.live.len() >= max {
            let oldest = conns
                .live
                .iter()
                .filter_map(|(id, c)| c.idle_since.map(|t| (t, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(evicted) = conns.live.remove(&oldest) {
                evicted.close.notify_one();
            }
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let close = Arc::new(Notify::new());
        conns.live.insert(
            id,
            Conn {
                idle_since: Some(Instant::now()),
                close: Arc::clone(&close),
            },
        );
        Some(Slot {
            id,
            close,
            tracker: Arc::clone(self),
        })
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(c) = self.lock().live.get_mut(&id) {
            c.idle_since = (!busy).then(Instant::now);
        }
    }
}

/// A connection's place under the cap; dropping it frees the place.
struct Slot {
    id: u64,
    close: Arc<Notify>,
    tracker: Arc<Tracker>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.lock().live.remove(&self.id);
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, app: AppState, security: Security, opts: ServeOptions) {
    let app = Arc::new(app);
    let tracker = Arc::new(Tracker::default());
    let max = opts.max_connections.max(1);
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = tracker.admit(max) else {
            refused += 1;
            if refused.is_power_of_two() {
                log::warn!(
                    "{refused} connection(s) refused: all {max} connections are busy with requests (--web.max-connections)"
                );
            }
            drop(stream);
            continue;
        };
        let app = Arc::clone(&app);
        let security = security.clone();
        tokio::spawn(async move {
            let close = Arc::clone(&slot.close);
            tokio::select! {
                () = connection(stream, peer, &slot, app, security) => {}
                () = close.notified() => log::debug!("connection from {peer} closed to admit a new one (at the connection cap)"),
            }
            drop(slot);
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: &Slot,
    app: Arc<AppState>,
    security: Security,
) {
    let _ = stream.set_nodelay(true);
    let mut timed = tokio_io_timeout::TimeoutStream::new(stream);
    timed.set_write_timeout(Some(WRITE_TIMEOUT));
    let timed = Box::pin(timed);
    let id = slot.id;
    let tracker = Arc::clone(&slot.tracker);
    match &security.tls {
        Some(acceptor) => {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(timed)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return log::debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => return log::debug!("TLS handshake with {peer} timed out"),
            };
            http1(tls, peer, id, tracker, app, security).await;
        }
        None => http1(timed, peer, id, tracker, app, security).await,
    }
}

async fn http1<S>(
    io: S,
    peer: SocketAddr,
    id: u64,
    tracker: Arc<Tracker>,
    app: Arc<AppState>,
    security: Security,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let app = Arc::clone(&app);
        let security = security.clone();
        let tracker = Arc::clone(&tracker);
        async move {
            tracker.set_busy(id, true);
            let response = respond(&req, &app, &security).await;
            tracker.set_busy(id, false);
            Ok::<_, Infallible>(response)
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = result {
        log::debug!("connection from {peer}: {e}");
    }
}

/// Auth, the route, then gzip and the configured headers.
async fn respond(
    req: &Request<Incoming>,
    app: &AppState,
    security: &Security,
) -> Response<Full<Bytes>> {
    let reply = match &security.auth {
        Some(auth)
            if !auth
                .allows(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
                .await =>
        {
            Reply::text(StatusCode::UNAUTHORIZED, "unauthorized\n")
                .with_header(WWW_AUTHENTICATE, "Basic realm=\"optimus\"")
        }
        _ => routes::route(
            req.method(),
            req.uri().path(),
            req.uri().query().unwrap_or(""),
            req.headers(),
            app,
        ),
    };
    let gzip = reply.body.len() >= GZIP_MIN_BYTES && accepts_gzip(req.headers());
    let mut builder = Response::builder()
        .status(reply.status)
        .header(CONTENT_TYPE, reply.content_type);
    for (name, value) in reply.headers.iter().chain(security.headers.iter()) {
        builder = builder.header(name, value);
    }
    let body = if gzip {
        match gzip_bytes(&reply.body) {
            Ok(z) => {
                builder = builder
                    .header(CONTENT_ENCODING, "gzip")
                    .header(VARY, "Accept-Encoding");
                z
            }
            Err(_) => reply.body,
        }
    } else {
        reply.body
    };
    builder.body(Full::new(body)).unwrap_or_else(|_| {
        let mut r = Response::new(Full::new(Bytes::from_static(b"internal error\n")));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// Whether `Accept-Encoding` admits gzip (a `q=0` refuses it).
fn accepts_gzip(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// gzip at the fastest level: a 1,000-VM scrape shrinks about tenfold either way, and the
/// scrape's latency is what counts.
fn gzip_bytes(body: &[u8]) -> std::io::Result<Bytes> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    Ok(Bytes::from(enc.finish()?))
}

#[cfg(test)]
mod tests;
