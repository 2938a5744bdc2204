//! A real Prometheus server scraping one target, and `promtool check metrics`.

use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tempfile::TempDir;

use crate::env::require_tools;
use crate::proc::{file_tail, try_free_port, ChildGuard};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one API answer (the query engine can stall for seconds at start-up or
/// on a loaded machine; a scrape-sized 5 s is too short for it).
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A `prometheus` process on 127.0.0.1 with its own config and TSDB in a temp dir;
/// stopped on drop, then the temp dir is removed.
#[derive(Debug)]
pub struct Prometheus {
    // Declared first: stopped before its TSDB directory is removed.
    child: ChildGuard,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts `prometheus` on `127.0.0.1:<free port>`, scraping `target` (`host:port`,
    /// path `/metrics`, job `optimus`) every `interval` (scrape timeout the same), and waits
    /// (30 s at most) until `/-/ready` answers 200.
    pub fn start(target: &str, interval: Duration) -> anyhow::Result<Prometheus> {
        Self::start_with(target, interval, "")
    }

    /// [`Prometheus::start`] with `job_extra` added to the scrape job: YAML lines indented
    /// by four spaces, e.g. `    scheme: https\n` and a `tls_config` or `basic_auth`.
    pub fn start_with(
        target: &str,
        interval: Duration,
        job_extra: &str,
    ) -> anyhow::Result<Prometheus> {
        Self::start_many(&[target], interval, job_extra)
    }

    /// [`Prometheus::start_with`] scraping several targets in one job: each becomes its own
    /// `instance`, as several hosts' agents do.
    pub fn start_many(
        targets: &[&str],
        interval: Duration,
        job_extra: &str,
    ) -> anyhow::Result<Prometheus> {
        require_tools(&[("prometheus", "prometheus")])?;
        let dir = tempfile::Builder::new()
            .prefix("optimus-prometheus-")
            .tempdir()
            .context("create a temp dir for Prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(targets, interval, job_extra))
            .with_context(|| format!("write {}", config.display()))?;
        let log = dir.path().join("prometheus.log");
        // The free port may be taken again before Prometheus binds it: retry with another.
        let mut last_err = None;
        for _ in 0..3 {
            let port = try_free_port()?;
            match Self::spawn(dir.path(), &config, &log, port) {
                Ok(child) => {
                    return Ok(Prometheus {
                        child,
                        port,
                        log,
                        _dir: dir,
                    })
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("prometheus did not start")))
    }

    fn spawn(
        dir: &std::path::Path,
        config: &std::path::Path,
        log: &std::path::Path,
        port: u16,
    ) -> anyhow::Result<ChildGuard> {
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let log_out = log_file
            .try_clone()
            .with_context(|| format!("dup {}", log.display()))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log_file);
        let mut child = ChildGuard::spawn(cmd)?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "prometheus exited ({status}) before it was ready; log tail:\n{}",
                    file_tail(log, 30)
                );
            }
            if let Ok((200, _)) = crate::http::get(&addr, "/-/ready") {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus on {addr} not ready within {READY_TIMEOUT:?}; log tail:\n{}",
                    file_tail(log, 30)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `127.0.0.1:<port>` of its web API.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Process id of Prometheus.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Instant query: `GET /api/v1/query?query=<promql>`; returns `data.result` (for a
    /// vector, one object per series with `metric` and `value: [ts, "v"]`). Errors with
    /// Prometheus' `errorType`/`error` unless `status` is `success`.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        self.api(promql, &path)
    }

    /// Range query over the last `span` at `step`, as Grafana runs a time-series panel:
    /// `GET /api/v1/query_range`; returns `data.result` (one object per series with
    /// `metric` and `values: [[ts, "v"], ...]`).
    pub fn query_range(
        &self,
        promql: &str,
        span: Duration,
        step: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs_f64();
        let path = format!(
            "/api/v1/query_range?query={}&start={:.3}&end={end:.3}&step={:.3}",
            url_encode(promql),
            end - span.as_secs_f64(),
            step.as_secs_f64()
        );
        self.api(promql, &path)
    }

    /// [`Prometheus::query`] evaluated at unix time `time` (seconds).
    pub fn query_at(&self, promql: &str, time: i64) -> anyhow::Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}&time={time}", url_encode(promql));
        self.api(promql, &path)
    }

    fn api(&self, promql: &str, path: &str) -> anyhow::Result<Vec<Value>> {
        // A query can take seconds while Prometheus starts or the machine is busy.
        let (status, body) = crate::http::get_within(&self.addr(), path, QUERY_TIMEOUT)?;
        let json: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: HTTP {status}, body not JSON: {body}"))?;
        if json["status"] != "success" {
            bail!(
                "query {promql:?}: HTTP {status}, {}: {}\nprometheus log tail:\n{}",
                json["errorType"].as_str().unwrap_or("?"),
                json["error"].as_str().unwrap_or(&body),
                file_tail(&self.log, 10)
            );
        }
        match &json["data"]["result"] {
            Value::Array(items) => Ok(items.clone()),
            other => bail!("query {promql:?}: data.result is not an array: {other}"),
        }
    }

    /// Runs `promql` every 500 ms until `done(result)` holds or `timeout` passes (useful
    /// while the first scrapes land); returns the last result, or an error quoting it.
    pub fn query_until(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            // A query that fails outright (no answer in time, Prometheus still starting) is
            // retried like one whose answer is not there yet.
            let last = match self.query(promql) {
                Ok(result) if done(&result) => return Ok(result),
                Ok(result) => Value::Array(result).to_string(),
                Err(e) => format!("error: {e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "query {promql:?} did not reach the expected result within {timeout:?}; last: {last}"
                );
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The numeric value of one instant-vector result item (`value: [ts, "1.5"]`).
pub fn value(item: &Value) -> Option<f64> {
    match item["value"][1].as_str()? {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        text => text.parse().ok(),
    }
}

fn config_yaml(targets: &[&str], interval: Duration, job_extra: &str) -> String {
    let ms = interval.as_millis().max(1);
    // Single-quoted YAML scalars: only ' needs escaping (as '').
    let target = targets
        .iter()
        .map(|t| t.replace('\'', "''"))
        .collect::<Vec<_>>()
        .join("', '");
    format!(
        "global:\n  scrape_interval: {ms}ms\n  evaluation_interval: {ms}ms\n\
         scrape_configs:\n  - job_name: optimus\n    scrape_interval: {ms}ms\n    \
         scrape_timeout: {ms}ms\n{job_extra}    static_configs:\n      - targets: ['{target}']\n"
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Lints an exposition with `promtool check metrics` (text on stdin); errors with
/// promtool's complaints if it finds any.
///
/// promtool (2.42, Debian 12) parses only the Prometheus text format: fed OpenMetrics as
/// client_rust writes it (`# TYPE foo counter` then `foo_total`), it reports every counter
/// as "no help text". So an exposition ending in `# EOF` is first rewritten to the text
/// format the way Prometheus' own Go client would write the same metrics (see
/// [`openmetrics_to_text`]); [`promtool_check_raw`] lints the text exactly as given.
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    let is_openmetrics = text.lines().any(|l| l.trim_end() == "# EOF");
    if is_openmetrics {
        promtool_check_raw(&openmetrics_to_text(text))
            .context("promtool check metrics (on the OpenMetrics input rewritten to text format)")
    } else {
        promtool_check_raw(text)
    }
}

/// `promtool check metrics` on `text` exactly as given.
pub fn promtool_check_raw(text: &str) -> anyhow::Result<()> {
    require_tools(&[("promtool", "prometheus")])?;
    let out = crate::proc::run(
        Command::new("promtool").args(["check", "metrics"]),
        Some(text.as_bytes()),
        Duration::from_secs(30),
    )?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !complaints.trim().is_empty() {
        bail!(
            "promtool check metrics ({}) complains:\n{}",
            out.status,
            complaints.trim()
        );
    }
    Ok(())
}

/// Rewrites an OpenMetrics exposition into the Prometheus text format 0.0.4: counter
/// families `foo` (samples `foo_total`) become `foo_total`, `info` families `foo` become
/// gauges `foo_info`, `unknown`/`stateset`/`gaugehistogram` become `untyped`/`gauge`/
/// `histogram`; `# UNIT` and `# EOF` lines and exemplars are dropped.
pub fn openmetrics_to_text(text: &str) -> String {
    let mut counters = std::collections::BTreeSet::new();
    let mut infos = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                match kind {
                    "counter" => counters.insert(name.to_owned()),
                    "info" => infos.insert(name.to_owned()),
                    _ => false,
                };
            }
        }
    }
    let rename = |name: &str| -> String {
        if counters.contains(name) && !name.ends_with("_total") {
            format!("{name}_total")
        } else if infos.contains(name) {
            format!("{name}_info")
        } else {
            name.to_owned()
        }
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line.trim_end() == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let _ = writeln!(out, "# HELP {} {help}", rename(name));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = match kind.trim() {
                "info" | "stateset" => "gauge",
                "gaugehistogram" => "histogram",
                "unknown" => "untyped",
                other => other,
            };
            let _ = writeln!(out, "# TYPE {} {kind}", rename(name));
        } else if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else {
            // Exemplars follow " # " after the value, outside any quoted label value.
            out.push_str(strip_exemplar(line));
            out.push('\n');
        }
    }
    out
}

fn strip_exemplar(line: &str) -> &str {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '#' if !in_quotes && line[..i].ends_with(' ') => return line[..i].trim_end(),
            _ => {}
        }
    }
    line
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        assert_eq!(
            url_encode("rate(x{a=\"b c\"}[1m])"),
            "rate%28x%7Ba%3D%22b%20c%22%7D%5B1m%5D%29"
        );
    }

    #[test]
    fn yaml() {
        let y = config_yaml(&["127.0.0.1:9947"], Duration::from_secs(1), "");
        assert!(y.contains("scrape_interval: 1000ms"));
        assert!(y.contains("- targets: ['127.0.0.1:9947']"));
    }

    #[test]
    fn openmetrics_rewrite() {
        let om =
            "# HELP foo_seconds Foo.\n# TYPE foo_seconds counter\n# UNIT foo_seconds seconds\n\
                  foo_seconds_total{vm=\"a # b\"} 1 # {trace_id=\"x\"} 1\n\
                  # HELP build Build.\n# TYPE build info\nbuild_info{v=\"1\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP foo_seconds_total Foo.\n# TYPE foo_seconds_total counter\n\
             foo_seconds_total{vm=\"a # b\"} 1\n\
             # HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n"
        );
    }

    #[test]
    fn promtool() {
        if crate::env::find_tool("promtool").is_none() {
            eprintln!("SKIPPED promtool: no promtool here (apt-get install prometheus)");
            return;
        }
        let om = "# HELP foo_seconds Foo.\n# TYPE foo_seconds counter\n# UNIT foo_seconds seconds\nfoo_seconds_total 1\n# EOF\n";
        promtool_check(om).unwrap();
        assert!(promtool_check_raw(om).is_err());
        let err = promtool_check("foo_total 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("no help text"), "{err:#}");
    }
}
