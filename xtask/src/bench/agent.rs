//! The agent under test: started on a free port, stopped on drop, and measured from the
//! outside (its /metrics, `/proc/<pid>/stat` and `/proc/<pid>/status`).
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use optimus_tests::proc::{file_tail, try_free_port, ChildGuard};
use serde::Serialize;

use super::fleet::NAME_PREFIX;

/// How the agent runs in one measurement.
#[derive(Clone, Copy, Default)]
pub struct Mode {
    /// `--track-all`: charge every thread on the host.
    pub track_all: bool,
    /// `--bench-baseline`: also attach the empty sched_switch program.
    pub baseline: bool,
    /// `--bench-baseline-only`: attach the empty sched_switch program and nothing else.
    pub baseline_only: bool,
}

pub struct Agent {
    child: ChildGuard,
    addr: String,
    log: PathBuf,
}

/// Longest wait for the agent to serve /metrics with every simulated vCPU in it.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
const METRIC_VCPU: &str = "optimus_vcpu_cpu_seconds_total{";

impl Agent {
    /// Starts `bin run` at 1 s sampling without libvirt (the simulated VMs are found in
    /// /proc), its output in a log file under `log_dir`.
    pub fn start(bin: &Path, mode: Mode, log_dir: &Path) -> Result<Self> {
        let port = try_free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let log = log_dir.join(format!("agent-{port}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "run",
            "--listen",
            &addr,
            "--libvirt-uri",
            "",
            "--interval",
            "1s",
        ])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        if mode.track_all {
            cmd.arg("--track-all");
        }
        if mode.baseline {
            cmd.arg("--bench-baseline");
        }
        if mode.baseline_only {
            cmd.arg("--bench-baseline-only");
        }
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Gone with xtask even if xtask is killed outright.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = ChildGuard::spawn(cmd).context("starting the agent")?;
        Ok(Self { child, addr, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Waits until /metrics lists at least `vcpus` vCPUs of simulated VMs (0: until it
    /// answers at all); returns how many it lists.
    pub fn wait_ready(&mut self, vcpus: usize) -> Result<usize> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            crate::bench::check_interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the agent exited ({status}) before it was ready; its log:\n{}",
                    file_tail(&self.log, 20)
                );
            }
            match scrape(&self.addr) {
                Ok(s) if s.status == 200 => {
                    let seen = s.text().map_or(0, simulated_vcpus);
                    if seen >= vcpus {
                        return Ok(seen);
                    }
                    last = format!("{seen} of {vcpus} simulated vCPUs listed");
                }
                Ok(s) => last = format!("HTTP {}", s.status),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "the agent was not ready within {READY_TIMEOUT:?} ({last}); its log:\n{}",
            file_tail(&self.log, 20)
        )
    }
}

/// vCPU series of simulated VMs in an exposition.
fn simulated_vcpus(body: &str) -> usize {
    let needle = format!("vm_name=\"{NAME_PREFIX}");
    body.lines()
        .filter(|l| l.starts_with(METRIC_VCPU) && l.contains(&needle))
        .count()
}

/// CPU time of process `pid` so far, all threads (utime + stime of `/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (_, ticks) = parse_stat(&text).with_context(|| format!("{path}: unexpected format"))?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()?))
}

/// comm and utime + stime (clock ticks) from a `/proc/<pid>/stat` text.
pub fn parse_stat(text: &str) -> Option<(String, u64)> {
    // comm is in parentheses and may hold both; the fields after it start at field 3.
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let field = |n: usize| -> Option<u64> { rest.split_whitespace().nth(n - 3)?.parse().ok() };
    Some((comm, field(14)? + field(15)?))
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` times.
pub fn clock_ticks() -> Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz)
        .ok()
        .filter(|&h| h > 0)
        .context("sysconf(_SC_CLK_TCK) failed")
}

/// Resident memory of a process, from `/proc/<pid>/status`, in bytes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Memory {
    /// Peak resident set (VmHWM).
    pub peak: u64,
    /// Resident now (VmRSS), and its anonymous and file-backed parts.
    pub rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|v| v * 1024)
            .with_context(|| format!("{path}: no {key} in kB"))
    };
    Ok(Memory {
        peak: kib("VmHWM")?,
        rss: kib("VmRSS")?,
        rss_anon: kib("RssAnon")?,
        rss_file: kib("RssFile")?,
    })
}

/// One GET /metrics, timed from connect to the last byte.
pub struct Scrape {
    pub status: u16,
    pub took: Duration,
    /// The body as sent (gzip-compressed when [`Scrape::gzip`]).
    pub body: Vec<u8>,
    /// The server answered `Content-Encoding: gzip`.
    pub gzip: bool,
}

impl Scrape {
    /// The body as text (`None` when compressed or not UTF-8).
    pub fn text(&self) -> Option<&str> {
        (!self.gzip).then(|| std::str::from_utf8(&self.body).ok())?
    }
}

/// GET /metrics over HTTP/1.0 (the server closes the connection after the body).
pub fn scrape(addr: &str) -> Result<Scrape> {
    get_metrics(addr, false)
}

/// GET /metrics over HTTP/1.0, asking for gzip as Prometheus does
/// (`Accept-Encoding: gzip`) when `gzip`.
pub fn get_metrics(addr: &str, gzip: bool) -> Result<Scrape> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream
        .set_read_timeout(Some(SCRAPE_TIMEOUT))
        .context("setting a read timeout")?;
    let accept = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n"
    )
    .with_context(|| format!("sending GET /metrics to {addr}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the /metrics response from {addr}"))?;
    let took = start.elapsed();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the /metrics response has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let body = raw.split_off(end + 4);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {:?}", head.lines().next()))?;
    let gzip = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("content-encoding") && v.trim() == "gzip"
        })
    });
    Ok(Scrape {
        status,
        took,
        body,
        gzip,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_only_simulated_vcpus() {
        let body = "# TYPE optimus_vcpu_cpu_seconds counter\n\
            optimus_vcpu_cpu_seconds_total{vm_name=\"bench-0\",vm_uuid=\"u\",vcpu=\"0\"} 0.0\n\
            optimus_vcpu_cpu_seconds_total{vm_name=\"bench-0\",vm_uuid=\"u\",vcpu=\"1\"} 0.0\n\
            optimus_vcpu_cpu_seconds_total{vm_name=\"demo\",vm_uuid=\"v\",vcpu=\"0\"} 3.0\n\
            optimus_vm_cpu_seconds_total{vm_name=\"bench-0\",vm_uuid=\"u\"} 0.0\n";
        assert_eq!(super::simulated_vcpus(body), 2);
    }

    #[test]
    fn stat_with_odd_comm() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 10 0 0 0 7 5 0 0 20 0 1 0 9 0 0";
        assert_eq!(super::parse_stat(stat), Some(("a) b (c".to_owned(), 12)));
    }
}
