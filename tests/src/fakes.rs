//! Stand-ins for what this machine lacks, at the lowest level the agent reads: a RAPL
//! powercap tree whose counters advance at a set power (no RAPL here), NVIDIA's
//! `libnvidia-ml.so` (no GPU here), and the UK Carbon Intensity API over local HTTP (no
//! internet here).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use tempfile::TempDir;

/// Counter range of the fake zones (about 4,295 J, as on many Intel parts).
const MAX_ENERGY_RANGE_UJ: u64 = 4_294_967_295;
const STEP: Duration = Duration::from_millis(10);

/// A powercap tree with one package (`intel-rapl:0`, `package-0`) and its `dram` subzone,
/// counting at constant watts from a writer thread; stopped and removed on drop.
#[derive(Debug)]
pub struct FakeRapl {
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    dir: TempDir,
}

impl FakeRapl {
    /// Starts the counters at 0 and advances them every 10 ms by `package_w` and `dram_w`
    /// watts (wrapping at `max_energy_range_uj`, as RAPL does).
    pub fn start(package_w: f64, dram_w: f64) -> anyhow::Result<FakeRapl> {
        let dir = tempfile::Builder::new()
            .prefix("optimus-powercap-")
            .tempdir()
            .context("create a temp dir for the powercap tree")?;
        let pkg = dir.path().join("intel-rapl:0");
        let dram = pkg.join("intel-rapl:0:0");
        for (zone, name) in [(&pkg, "package-0"), (&dram, "dram")] {
            std::fs::create_dir_all(zone).with_context(|| format!("create {}", zone.display()))?;
            std::fs::write(zone.join("name"), format!("{name}\n"))?;
            std::fs::write(
                zone.join("max_energy_range_uj"),
                format!("{MAX_ENERGY_RANGE_UJ}\n"),
            )?;
            write_counter(zone, 0)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let writer = thread::Builder::new()
            .name("fake-rapl".into())
            .spawn(move || {
                let started = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    let s = started.elapsed().as_secs_f64();
                    for (zone, w) in [(&pkg, package_w), (&dram, dram_w)] {
                        #[expect(
                            clippy::cast_possible_truncation,
                            clippy::cast_sign_loss,
                            reason = "microjoules of a test run, positive and far below 2^64"
                        )]
                        let uj = (s * w * 1e6) as u64 % (MAX_ENERGY_RANGE_UJ + 1);
                        if let Err(e) = write_counter(zone, uj) {
                            eprintln!("fake-rapl: {e:#}");
                        }
                    }
                    thread::sleep(STEP);
                }
            })
            .context("start the fake RAPL writer")?;
        Ok(FakeRapl {
            stop,
            writer: Some(writer),
            dir,
        })
    }

    /// The tree's root, for `optimus run --powercap-root`.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

/// Write-then-rename: the agent never reads a half-written number.
fn write_counter(zone: &Path, uj: u64) -> anyhow::Result<()> {
    let tmp: PathBuf = zone.join("energy_uj.tmp");
    std::fs::write(&tmp, format!("{uj}\n")).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, zone.join("energy_uj"))
        .with_context(|| format!("rename {}", tmp.display()))
}

impl Drop for FakeRapl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// A powercap tree with one package (`intel-rapl:0`, `package-0`) whose counter advances at
/// a known function of the host's busy CPUs: every 100 ms the writer reads `/proc/stat`,
/// takes the busy CPUs of that step (user + nice + system + irq + softirq over those plus
/// idle + iowait, times the CPU count, as the agent counts them) and adds
/// `watts(busy) × step` joules. The ground truth of a power model's test.
#[derive(Debug)]
pub struct LoadRapl {
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    dir: TempDir,
}

/// Busy and busy + idle jiffies of the whole host, and its CPU count.
pub fn host_jiffies() -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let mut busy = 0;
    let mut total = 0;
    let mut cpus = 0;
    for line in stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
    {
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        let b = at(0) + at(1) + at(2) + at(5) + at(6);
        busy += b;
        total += b + at(3) + at(4);
        cpus += 1;
    }
    Ok((busy, total, cpus))
}

impl LoadRapl {
    /// Starts the counter at 0, advancing by `watts(busy CPUs)`.
    pub fn start(watts: fn(f64) -> f64) -> anyhow::Result<LoadRapl> {
        let dir = tempfile::Builder::new()
            .prefix("optimus-load-powercap-")
            .tempdir()
            .context("create a temp dir for the powercap tree")?;
        let pkg = dir.path().join("intel-rapl:0");
        std::fs::create_dir_all(&pkg).with_context(|| format!("create {}", pkg.display()))?;
        std::fs::write(pkg.join("name"), "package-0\n")?;
        std::fs::write(
            pkg.join("max_energy_range_uj"),
            format!("{MAX_ENERGY_RANGE_UJ}\n"),
        )?;
        write_counter(&pkg, 0)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let writer = thread::Builder::new()
            .name("load-rapl".into())
            .spawn(move || {
                let mut uj = 0f64;
                let mut last = (Instant::now(), host_jiffies().ok());
                let mut busy_cpus = 0.0;
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(100));
                    let now = (Instant::now(), host_jiffies().ok());
                    if let (Some((b0, t0, _)), Some((b1, t1, n))) = (last.1, now.1) {
                        if t1 > t0 {
                            #[expect(clippy::cast_precision_loss, reason = "jiffies of 100 ms")]
                            let share = (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64;
                            #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
                            let n = n as f64;
                            busy_cpus = share.min(1.0) * n;
                        }
                    }
                    uj += watts(busy_cpus) * now.0.duration_since(last.0).as_secs_f64() * 1e6;
                    last = now;
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "microjoules of a test run, positive and far below 2^64"
                    )]
                    let counter = uj as u64 % (MAX_ENERGY_RANGE_UJ + 1);
                    if let Err(e) = write_counter(&pkg, counter) {
                        eprintln!("load-rapl: {e:#}");
                    }
                }
            })
            .context("start the load-following RAPL writer")?;
        Ok(LoadRapl {
            stop,
            writer: Some(writer),
            dir,
        })
    }

    /// The tree's root, for `optimus run --powercap-root`.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The package counter now, joules (it does not wrap within a test: 4,295 J at 30 W
    /// is over two minutes; callers compare deltas well inside that).
    pub fn joules(&self) -> anyhow::Result<f64> {
        let path = self.dir.path().join("intel-rapl:0/energy_uj");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let uj: u64 = text
            .trim()
            .parse()
            .with_context(|| format!("parse {text:?}"))?;
        #[expect(clippy::cast_precision_loss, reason = "microjoules far below 2^53")]
        Ok(uj as f64 / 1e6)
    }
}

impl Drop for LoadRapl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The UK Carbon Intensity API on 127.0.0.1, stopped on drop: `GET /intensity` answers
/// the same national value every time, `GET /intensity/{from}/fw48h` a 48-hour forecast
/// of half-hour periods from the current one, `g_per_kwh + 2 × i` for period `i`.
#[derive(Debug)]
pub struct FakeGridApi {
    addr: String,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl FakeGridApi {
    /// Serves `g_per_kwh` as both forecast and actual.
    pub fn start(g_per_kwh: f64) -> anyhow::Result<FakeGridApi> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the fake grid API")?;
        let addr = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let body = format!(
            "{{\"data\":[{{\"from\":\"2026-12-01T12:00Z\",\"to\":\"2026-12-01T12:30Z\",\
             \"intensity\":{{\"forecast\":{g_per_kwh},\"actual\":{g_per_kwh},\"index\":\"moderate\"}}}}]}}"
        );
        let server = thread::Builder::new()
            .name("fake-grid-api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        answer(conn, |path| {
                            if path.ends_with("/fw48h") {
                                forecast_body(g_per_kwh)
                            } else {
                                body.clone()
                            }
                        });
                    }
                }
            })
            .context("start the fake grid API")?;
        Ok(FakeGridApi {
            addr,
            stop,
            server: Some(server),
        })
    }

    /// Base URL, for `optimus run --uk-grid-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// 96 half-hour periods from the current one.
fn forecast_body(g_per_kwh: f64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let start = now - now % 1800;
    let periods: Vec<String> = (0..96u32)
        .map(|i| {
            let from = start + u64::from(i) * 1800;
            format!(
                "{{\"from\":\"{}\",\"to\":\"{}\",\"intensity\":{{\"forecast\":{},\"actual\":null,\"index\":\"moderate\"}}}}",
                utc_minutes(from),
                utc_minutes(from + 1800),
                g_per_kwh + 2.0 * f64::from(i)
            )
        })
        .collect();
    format!("{{\"data\":[{}]}}", periods.join(","))
}

/// `YYYY-MM-DDTHH:MMZ` of a unix time (the API's format), by Howard Hinnant's
/// days-to-civil algorithm (<https://howardhinnant.github.io/date_algorithms.html>).
fn utc_minutes(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60
    )
}

fn answer(mut conn: TcpStream, body: impl Fn(&str) -> String) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/");
    let body = body(path);
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes());
}

impl Drop for FakeGridApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_minutes() {
        assert_eq!(super::utc_minutes(0), "1970-01-01T00:00Z");
        assert_eq!(super::utc_minutes(951_782_400), "2000-02-29T00:00Z");
        assert_eq!(super::utc_minutes(1_796_131_800), "2026-12-01T13:30Z");
    }
}

/// The fake `libnvidia-ml.so` (`tests/fixtures/fake-nvml/fake_nvml.c`, whose header says
/// what it reports), built with `cc` into its own temp dir with the given `fake_nvml.conf`
/// beside it (its vGPU instances); removed on drop. Point the agent at
/// [`FakeNvml::lib`] with `--nvml-library`.
#[derive(Debug)]
pub struct FakeNvml {
    lib: PathBuf,
    _dir: TempDir,
}

impl FakeNvml {
    /// Builds a fresh copy (its own counters) configured by `config`.
    pub fn build(config: &str) -> anyhow::Result<FakeNvml> {
        let dir = tempfile::Builder::new()
            .prefix("optimus-fake-nvml-")
            .tempdir()
            .context("create a temp dir for the fake NVML library")?;
        let src = crate::env::workspace_root().join("tests/fixtures/fake-nvml/fake_nvml.c");
        let lib = dir.path().join("libnvidia-ml.so");
        std::fs::write(dir.path().join("fake_nvml.conf"), config)
            .context("write fake_nvml.conf")?;
        let out = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .context("run cc (apt-get install gcc)")?;
        anyhow::ensure!(
            out.status.success(),
            "cc {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(FakeNvml { lib, _dir: dir })
    }

    /// The library's path.
    pub fn lib(&self) -> &Path {
        &self.lib
    }
}
