//! A deliberately small HTTP/1.1 server for `/metrics`: one GET route, bounded request
//! size, a read timeout, no keep-alive. Nothing a client sends is executed or echoed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::sampler::SharedSnapshot;

/// Largest request head accepted; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` (and a small index at `/`) until the task is dropped.
pub async fn serve(listener: TcpListener, shared: SharedSnapshot) {
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
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared).await {
                log::debug!("connection from {peer}: {e}");
            }
        });
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

/// Whether the request's Accept header asks for OpenMetrics (as Prometheus does).
fn wants_openmetrics(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    })
}

async fn handle(mut stream: TcpStream, shared: &SharedSnapshot) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_REQUEST {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if head.is_err() {
        return Ok(());
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        _ if buf.len() > MAX_REQUEST => (431, "text/plain", "request too large\n".to_owned()),
        ("GET" | "HEAD", "/metrics") => match super::render_shared(shared) {
            Ok(text) if wants_openmetrics(&buf) => (200, OPENMETRICS, text),
            Ok(text) => (200, CLASSIC, super::to_classic(&text)),
            Err(_) => (
                500,
                "text/plain",
                "encoding the metrics failed\n".to_owned(),
            ),
        },
        ("GET" | "HEAD", "/") => (
            200,
            "text/html; charset=utf-8",
            "<html><head><title>Optimus</title></head><body><h1>Optimus</h1>\
             <p><a href=\"/metrics\">Metrics</a></p></body></html>\n"
                .to_owned(),
        ),
        ("GET" | "HEAD", _) => (404, "text/plain", "not found; try /metrics\n".to_owned()),
        _ => (405, "text/plain", "method not allowed\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}
