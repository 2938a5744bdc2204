//! The live page at `/` and `GET /api/v1/snapshot`: published [`Snapshot`]s flow in (into a
//! bounded [`History`] ring), JSON and the embedded page's bytes flow out.
//!
//! Everything the page needs is compiled into the binary (`include_str!`): no CDN, no font,
//! no inline script or style, so [`CSP`] can forbid everything but same-origin files.

pub mod doc;
pub mod history;

pub use doc::SnapshotDoc;
pub use history::History;

use crate::sampler::Snapshot;

/// Content-Security-Policy of every page response: same-origin script, style, images and
/// fetches only; no inline code, no frames, no form targets.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    /// Request path, e.g. `/app.js`.
    pub path: &'static str,
    /// `Content-Type` header value.
    pub content_type: &'static str,
    pub body: &'static str,
}

/// The page: `/` (HTML), `/app.js`, `/style.css`.
pub const ASSETS: [Asset; 3] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("assets/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/style.css"),
    },
];

/// The embedded file served at `path` (`/index.html` is `/`).
pub fn asset(path: &str) -> Option<&'static Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS.iter().find(|a| a.path == path)
}

/// Headers every page and API response carries besides its content type: the CSP, no
/// MIME sniffing, no referrer (lowercase names, as HTTP/2 and `HeaderName::from_static`
/// want them).
pub const SECURITY_HEADERS: [(&str, &str); 3] = [
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

/// `GET /api/v1/snapshot[?since=T]`: the latest snapshot as JSON, with the history points
/// newer than `since` (unix seconds; all 15 minutes when absent). Shape: README "Live page".
pub fn snapshot_json(
    snapshot: &Snapshot,
    history: &History,
    since: Option<f64>,
) -> serde_json::Value {
    serde_json::to_value(SnapshotDoc::new(snapshot, history, since)).unwrap_or_else(|e| {
        // Only non-string map keys or a failing Serialize impl can fail here; neither exists.
        serde_json::json!({ "error": e.to_string() })
    })
}

/// Reads `since=<unix seconds>` from a query string (`a=1&since=1700000000.5`); anything
/// else, or a value that is not a finite number, is ignored.
pub fn since_param(query: &str) -> Option<f64> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "since")
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
}

#[cfg(test)]
pub(crate) mod tests;
