//! The routes: a request's method, path and headers in, a [`Reply`] out. Transport
//! (keep-alive, TLS, auth, gzip, HEAD) is `http/mod.rs`'s business; this file only knows
//! what each path serves. Add a route as one arm of the `match` in [`route`].

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, ALLOW};
use hyper::{Method, StatusCode};

use crate::sampler::SharedSnapshot;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";

/// What the routes read: the sampler's latest snapshot (and, as they land, the other
/// shared state a route serves).
#[derive(Clone, Debug)]
pub struct AppState {
    pub snapshot: SharedSnapshot,
    /// The live page's 15 minutes of points and rates, fed with each snapshot.
    pub history: std::sync::Arc<crate::web::History>,
}

/// One response, before transport concerns are applied.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    /// Headers of this route only (e.g. a Content-Security-Policy).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// A plain-text reply (errors, hints).
    pub fn text(status: StatusCode, body: &'static str) -> Reply {
        Reply::new(status, TEXT, body)
    }

    /// A JSON reply; an encoding failure is a 500, never a partial body.
    pub fn json(value: &serde_json::Value) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply::new(StatusCode::OK, JSON, body),
            Err(_) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "encoding JSON failed\n"),
        }
    }

    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: &'static str) -> Reply {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }
}

/// Whether the client asks for OpenMetrics (as Prometheus does).
pub fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers.get_all(ACCEPT).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.to_ascii_lowercase()
                .contains("application/openmetrics-text")
        })
    })
}

/// Routes one request (`query` is the URI's query string, "" when none). Only GET and
/// HEAD exist: anything else is 405 with `Allow`.
pub fn route(
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    app: &AppState,
) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return Reply::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use GET\n",
        )
        .with_header(ALLOW, "GET, HEAD");
    }
    match path {
        "/metrics" => metrics(headers, app),
        "/api/v1/snapshot" => snapshot(query, app),
        "/api/v1/phases" => phases(app),
        _ => match crate::web::asset(path) {
            Some(a) => web(Reply::new(
                StatusCode::OK,
                a.content_type,
                Bytes::from_static(a.body.as_bytes()),
            )),
            None => Reply::text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
        },
    }
}

/// The live page's headers: same-origin only (CSP), never sniffed, no referrer.
fn web(mut reply: Reply) -> Reply {
    for (name, value) in crate::web::SECURITY_HEADERS {
        reply = reply.with_header(HeaderName::from_static(name), value);
    }
    reply
}

/// `GET /api/v1/snapshot[?since=T]`: the latest snapshot and the page's history.
fn snapshot(query: &str, app: &AppState) -> Reply {
    let snap = match app.snapshot.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let since = crate::web::since_param(query);
    web(Reply::json(&crate::web::snapshot_json(
        &snap,
        &app.history,
        since,
    )))
    .with_header(hyper::header::CACHE_CONTROL, "no-store")
}

/// `GET /api/v1/phases`: each VM's phases (last 1,000 occurrences, totals per name).
fn phases(app: &AppState) -> Reply {
    let snap = match app.snapshot.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let vms: Vec<_> = snap.phases.iter().collect();
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Reply::json(&crate::phase::vms_json(
        &vms,
        crate::tracer::monotonic_ns(),
        unix_now,
    ))
    .with_header(hyper::header::CACHE_CONTROL, "no-store")
}

fn metrics(headers: &HeaderMap, app: &AppState) -> Reply {
    match crate::exporter::render_shared(&app.snapshot) {
        Ok(text) if wants_openmetrics(headers) => Reply::new(StatusCode::OK, OPENMETRICS, text),
        Ok(text) => Reply::new(StatusCode::OK, CLASSIC, crate::exporter::to_classic(&text)),
        Err(_) => Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        ),
    }
}
