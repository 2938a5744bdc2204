//! The synthetic meter: the host's busy CPUs (`/proc/stat`) in; a fixture powercap tree
//! whose `package-0` counter advances by a known *nonlinear* function of them out, plus the
//! ground truth the report compares with (idle and dynamic energy, busy CPU-seconds) and one
//! training row per second for the model.
//!
//! The function, `P(b) = 4 + 5·b + 1.5·b²` W for `b` busy CPUs, is convex the way a real
//! package is once frequency and voltage rise with load, so a linear model cannot fit it
//! exactly and a split proportional to utilisation is not the truth: both errors are what
//! the report measures.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use optimus_tests::fakes::host_jiffies;

use super::rapl::Counter;

/// Idle power, W: `P(0)`.
pub const IDLE_WATTS: f64 = 4.0;
/// The function, as the report prints it.
pub const FUNCTION: &str = "P(b) = 4 + 5 b + 1.5 b^2 W, b = busy CPUs from /proc/stat";

/// The meter's power at `busy` CPUs.
pub fn watts(busy: f64) -> f64 {
    IDLE_WATTS + 5.0 * busy + 1.5 * busy * busy
}

/// Counter range (as on many Intel parts): it wraps every few minutes here, as RAPL does.
const MAX_ENERGY_RANGE_UJ: u64 = 4_294_967_295;
/// Counter step: short against the agent's 1 s interval, so a window's energy read by the
/// agent and by the harness differ by at most one step's worth.
const STEP: Duration = Duration::from_millis(50);
/// One training row per this.
const ROW: Duration = Duration::from_secs(1);

/// Cumulative truth since the meter started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Seconds since the meter started.
    pub seconds: f64,
    /// Energy the counter has advanced by, J (unwrapped).
    pub energy_j: f64,
    /// The part above idle, `∫ (P(b) − P(0)) dt`, J.
    pub dynamic_j: f64,
    /// Busy CPU-seconds of the whole host (`/proc/stat`, steal excluded).
    pub busy_cpu_s: f64,
    /// The real RAPL meter's package energy, J, where the host has one.
    pub rapl_j: Option<f64>,
}

/// One second of features and metered power, as the agent's power model sees them.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The scenario running then.
    pub scenario: String,
    pub busy_cpus: f64,
    /// Busy CPUs × their mean cpufreq GHz (0 where cpufreq says nothing, as the agent has it).
    pub busy_cpu_ghz: f64,
    /// Host block I/O of the physical disks, MB/s (the model's third feature).
    pub block_io_mb_per_second: f64,
    pub watts: f64,
    /// The real RAPL meter's package power over the same second, where there is one.
    pub rapl_watts: Option<f64>,
}

#[derive(Debug, Default)]
struct Shared {
    totals: Totals,
    rows: Vec<Row>,
    scenario: String,
    error: Option<String>,
}

/// The running meter; stopped and its tree removed on drop.
#[derive(Debug)]
pub struct SyntheticMeter {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl SyntheticMeter {
    /// Creates the tree (`intel-rapl:0`, `package-0`) and starts advancing it; reads the
    /// real meter `rapl` at each step too, where given.
    pub fn start(rapl: Option<Counter>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("optimus-validate-powercap-")
            .tempdir()
            .context("creating a temp dir for the synthetic meter's powercap tree")?;
        let zone = dir.path().join("intel-rapl:0");
        std::fs::create_dir_all(&zone).with_context(|| format!("creating {}", zone.display()))?;
        std::fs::write(zone.join("name"), "package-0\n")?;
        std::fs::write(
            zone.join("max_energy_range_uj"),
            format!("{MAX_ENERGY_RANGE_UJ}\n"),
        )?;
        write_counter(&zone, 0)?;
        host_jiffies().context("the synthetic meter reads /proc/stat")?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, flag) = (Arc::clone(&shared), Arc::clone(&stop));
        let writer = thread::Builder::new()
            .name("synthetic-meter".into())
            .spawn(move || advance(&zone, &s, &flag, rapl))
            .context("starting the synthetic meter")?;
        Ok(Self {
            shared,
            stop,
            writer: Some(writer),
            dir,
        })
    }

    /// The tree's root, for `optimus run --powercap-root`.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The truth so far; fails if the writer hit an error.
    pub fn totals(&self) -> Result<Totals> {
        let s = self.lock();
        if let Some(e) = &s.error {
            anyhow::bail!("the synthetic meter stopped: {e}");
        }
        Ok(s.totals)
    }

    /// Rows recorded from now on are labelled `scenario`.
    pub fn set_scenario(&self, scenario: &str) {
        scenario.clone_into(&mut self.lock().scenario);
    }

    /// Every training row so far.
    pub fn rows(&self) -> Vec<Row> {
        self.lock().rows.clone()
    }
}

impl Drop for SyntheticMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "jiffies, sectors and CPU counts of a run, far below 2^53"
)]
fn advance(zone: &Path, shared: &Mutex<Shared>, stop: &AtomicBool, mut rapl: Option<Counter>) {
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let mut last = (Instant::now(), host_jiffies().ok());
    let mut row_start = (Instant::now(), 0.0f64, 0.0f64, disk_bytes(), 0.0f64);
    let mut busy = 0.0;
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(STEP);
        let now = (Instant::now(), host_jiffies().ok());
        let dt = now.0.duration_since(last.0).as_secs_f64();
        let mut busy_cpu_s = 0.0;
        if let (Some((b0, t0, _)), Some((b1, t1, n))) = (last.1, now.1) {
            if t1 > t0 {
                let share = (b1.saturating_sub(b0) as f64 / (t1 - t0) as f64).min(1.0);
                busy = share * n as f64;
            }
            busy_cpu_s = b1.saturating_sub(b0) as f64 / hz;
        }
        let p = watts(busy);
        if let Some(r) = rapl.as_mut() {
            r.advance();
        }
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.totals.rapl_j = rapl.as_ref().map(|r| r.joules);
        s.totals.seconds += dt;
        s.totals.energy_j += p * dt;
        s.totals.dynamic_j += (p - IDLE_WATTS) * dt;
        s.totals.busy_cpu_s += busy_cpu_s;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "microjoules of a run, positive and far below 2^64"
        )]
        let counter = (s.totals.energy_j * 1e6) as u64 % (MAX_ENERGY_RANGE_UJ + 1);
        if let Err(e) = write_counter(zone, counter) {
            s.error = Some(format!("{e:#}"));
        }
        let row_secs = now.0.duration_since(row_start.0).as_secs_f64();
        if row_secs >= ROW.as_secs_f64() {
            let bytes = disk_bytes();
            let busy_cpus = (s.totals.busy_cpu_s - row_start.1) / row_secs;
            let row = Row {
                scenario: s.scenario.clone(),
                busy_cpus,
                busy_cpu_ghz: busy_cpus * mean_ghz(),
                block_io_mb_per_second: bytes.saturating_sub(row_start.3) as f64 / 1e6 / row_secs,
                watts: (s.totals.energy_j - row_start.2) / row_secs,
                rapl_watts: s.totals.rapl_j.map(|j| (j - row_start.4) / row_secs),
            };
            s.rows.push(row);
            row_start = (
                now.0,
                s.totals.busy_cpu_s,
                s.totals.energy_j,
                bytes,
                s.totals.rapl_j.unwrap_or(0.0),
            );
        }
        drop(s);
        last = now;
    }
}

/// Bytes read + written so far by the physical disks (`/sys/block/*/stat` sectors of the
/// devices with a `device` link), as the agent's model features count them.
fn disk_bytes() -> u64 {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .map(|s| {
            let f: Vec<u64> = s
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            (f.get(2).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0)).saturating_mul(512)
        })
        .fold(0, u64::saturating_add)
}

/// The mean current frequency of the CPUs that expose one (cpufreq `scaling_cur_freq`, kHz),
/// GHz; 0 when none does.
fn mean_ghz() -> f64 {
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu") else {
        return 0.0;
    };
    let khz: Vec<f64> = dir
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("cpufreq/scaling_cur_freq")).ok())
        .filter_map(|t| t.trim().parse::<f64>().ok())
        .filter(|k| *k > 0.0)
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
    let n = khz.len() as f64;
    if n > 0.0 {
        khz.iter().sum::<f64>() / n / 1e6
    } else {
        0.0
    }
}

/// Write-then-rename: the agent never reads a half-written number.
fn write_counter(zone: &Path, uj: u64) -> Result<()> {
    let tmp: PathBuf = zone.join("energy_uj.tmp");
    std::fs::write(&tmp, format!("{uj}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, zone.join("energy_uj"))
        .with_context(|| format!("renaming {}", tmp.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_function_is_convex_with_the_stated_idle() {
        assert!((super::watts(0.0) - super::IDLE_WATTS).abs() < 1e-12);
        let (a, b, c) = (super::watts(0.0), super::watts(1.0), super::watts(2.0));
        assert!(c - b > b - a, "convex: {a} {b} {c}");
        assert!((c - 20.0).abs() < 1e-12);
    }
}
