//! A tiny HTTP/1.0 client and a Prometheus/OpenMetrics text parser, enough to scrape an
//! exporter and read one sample.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Total time one [`get`] may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` from `addr` (`"127.0.0.1:9947"`) over HTTP/1.0, 5 s timeout in all.
/// Returns the status code and the body (de-chunked if the server chunked it anyway),
/// whatever the status.
pub fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    get_within(addr, path, TIMEOUT)
}

/// [`get`] with `timeout` in all (a Prometheus query on a loaded machine takes longer than
/// a scrape).
pub fn get_within(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let sockaddr = addr
        .to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&sockaddr, timeout)
        .with_context(|| format!("connect to {addr}"))?;
    stream
        .set_write_timeout(Some(timeout))
        .context("set write timeout")?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: optimus-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("send GET {path} to {addr}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("GET http://{addr}{path}: no complete response within {timeout:?}");
        }
        stream
            .set_read_timeout(Some(left))
            .context("set read timeout")?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| format!("read response of GET http://{addr}{path}"))
            }
        }
    }
    parse_response(&raw).with_context(|| format!("GET http://{addr}{path}"))
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("headers are not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") {
        bail!("bad status line {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).context("body is not UTF-8")?;
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&body[..eol]).context("chunk size not UTF-8")?;
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).context("truncated chunk")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).context("truncated chunk")?;
    }
}

/// One sample of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sample name as written (`foo_total`, `foo_bucket`...).
    pub name: String,
    /// Label name to unescaped value.
    pub labels: BTreeMap<String, String>,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

/// Every sample of a Prometheus text or OpenMetrics exposition, in order. Comment lines
/// (`# HELP`, `# TYPE`, `# EOF`...) and lines that do not parse are skipped; timestamps and
/// exemplars after the value are ignored.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The value of the first sample named `name` whose labels include all of `labels` (exact
/// values, after unescaping `\"`, `\\` and `\n`); other labels may be present.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.trim_start().starts_with(name))
        .filter_map(parse_line)
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|got| got == v))
        })
        .map(|s| s.value)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value_text = rest.split_whitespace().next()?;
    let value = parse_value(value_text)?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and the text after `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        };
        labels.insert(key, value);
        s = s[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP optimus_vm_cpu_seconds Time.
# TYPE optimus_vm_cpu_seconds counter
optimus_vm_cpu_seconds_total{vm="a",vcpu="0"} 1.5
optimus_vm_cpu_seconds_total{vm="a",vcpu="1"} 0.25 1700000000
optimus_vm_cpu_seconds_total{vm="we\"ird \\ na,me}\n",vcpu="0"} 7e-3 # {trace_id="x"} 1
optimus_up 1
optimus_inf{le="+Inf"} +Inf
# EOF
"#;

    #[test]
    fn finds_samples() {
        assert_eq!(
            sample(TEXT, "optimus_vm_cpu_seconds_total", &[("vcpu", "1")]),
            Some(0.25)
        );
        assert_eq!(
            sample(TEXT, "optimus_vm_cpu_seconds_total", &[("vm", "a")]),
            Some(1.5)
        );
        assert_eq!(
            sample(
                TEXT,
                "optimus_vm_cpu_seconds_total",
                &[("vm", "we\"ird \\ na,me}\n")]
            ),
            Some(0.007)
        );
        assert_eq!(sample(TEXT, "optimus_up", &[]), Some(1.0));
        assert_eq!(sample(TEXT, "optimus_u", &[]), None);
        assert_eq!(sample(TEXT, "optimus_up", &[("x", "y")]), None);
        assert_eq!(
            sample(TEXT, "optimus_inf", &[("le", "+Inf")]),
            Some(f64::INFINITY)
        );
        assert_eq!(parse(TEXT).len(), 5);
    }

    #[test]
    fn responses() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello";
        assert_eq!(parse_response(raw).unwrap(), (200, "hello".to_owned()));
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (404, "abcde".to_owned()));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn get_from_a_local_server() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = conn.read(&mut req).unwrap();
            let req = String::from_utf8_lossy(&req[..n]).into_owned();
            conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nup 1\n").unwrap();
            req
        });
        let (status, body) = get(&addr, "/metrics").unwrap();
        assert_eq!((status, body.as_str()), (200, "up 1\n"));
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /metrics HTTP/1.0\r\n"));
    }
}
