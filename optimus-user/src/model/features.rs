//! Per-interval model features read from the host: `/proc/stat` (busy time per CPU), cpufreq
//! (each CPU's current frequency, where exposed) and `/sys/block/*/stat` (block I/O bytes)
//! in; busy CPUs and busy-weighted GHz per package and node block I/O MB/s out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::energy::{parse_proc_stat, CpuTimes};

/// The CPU side of one package over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PackageLoad {
    /// Busy CPUs: the sum over the package's CPUs of busy time / interval (0..=CPUs).
    pub busy_cpus: f64,
    /// Σ busy_i × GHz_i over the package's CPUs whose cpufreq says their frequency; 0 when
    /// none does.
    pub busy_cpu_ghz: f64,
    /// Whether any CPU of the package exposed its frequency.
    pub frequency_known: bool,
}

/// Everything a zone model may use from one interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Per package number (as in `package-N`).
    pub packages: BTreeMap<u32, PackageLoad>,
    /// Block I/O read + written by the host's disks, MB (10⁶ bytes) per second.
    pub block_io_mb_per_second: f64,
    /// Per GPU device (`gpu-0`): SM and memory utilisation, 0..=1.
    pub gpus: BTreeMap<String, (f64, f64)>,
}

/// Reads the features every interval; keeps the previous readings.
#[derive(Debug)]
pub struct FeatureReader {
    proc_root: PathBuf,
    sys_root: PathBuf,
    cpu_package: BTreeMap<u32, u32>,
    prev: Option<(Instant, BTreeMap<u32, CpuTimes>, u64)>,
}

impl FeatureReader {
    /// A reader of `<proc>/stat`, `<sys>/devices/system/cpu/cpu*/cpufreq` and
    /// `<sys>/block`; `cpu_package[i]` is CPU i's package.
    pub fn new(proc_root: &Path, sys_root: &Path, cpu_package: &[u32]) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            sys_root: sys_root.to_path_buf(),
            cpu_package: cpu_package
                .iter()
                .enumerate()
                .filter_map(|(cpu, p)| Some((u32::try_from(cpu).ok()?, *p)))
                .collect(),
            prev: None,
        }
    }

    /// This interval's observation (GPUs left empty for the caller), or `None` on the first
    /// call and when `/proc/stat` cannot be read.
    pub fn read(&mut self, now: Instant) -> Option<Observation> {
        let stat = parse_proc_stat(&std::fs::read_to_string(self.proc_root.join("stat")).ok()?);
        let io = block_bytes(&self.sys_root);
        let prev = self.prev.replace((now, stat.clone(), io));
        let (then, before, io_before) = prev?;
        let seconds = now.saturating_duration_since(then).as_secs_f64();
        let mut packages: BTreeMap<u32, PackageLoad> = BTreeMap::new();
        for (cpu, t) in &stat {
            let Some(b) = before.get(cpu) else { continue };
            let total = t.total.saturating_sub(b.total);
            let busy = if total == 0 {
                0.0
            } else {
                ratio(t.busy.saturating_sub(b.busy).min(total), total)
            };
            let package = self.cpu_package.get(cpu).copied().unwrap_or(0);
            let load = packages.entry(package).or_default();
            load.busy_cpus += busy;
            if let Some(ghz) = cpu_ghz(&self.sys_root, *cpu) {
                load.busy_cpu_ghz += busy * ghz;
                load.frequency_known = true;
            }
        }
        let block_io_mb_per_second = if seconds > 0.0 {
            ratio(io.saturating_sub(io_before), 1) / 1e6 / seconds
        } else {
            0.0
        };
        Some(Observation {
            packages,
            block_io_mb_per_second,
            gpus: BTreeMap::new(),
        })
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "jiffies and byte counts of one interval, far below 2^53"
)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

/// CPU `cpu`'s current frequency in GHz from cpufreq (`scaling_cur_freq`, kHz).
fn cpu_ghz(sys_root: &Path, cpu: u32) -> Option<f64> {
    let path = sys_root.join(format!(
        "devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq"
    ));
    let khz: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (khz > 0).then(|| ratio(khz, 1_000_000))
}

/// Bytes read + written so far by the host's physical disks: `/sys/block/<dev>/stat`
/// sectors (fields 3 and 7, 512 bytes each) of every device with a `device` link, which
/// leaves out partitions, loop, device-mapper and RAM disks (they would count twice).
fn block_bytes(sys_root: &Path) -> u64 {
    let Ok(dir) = std::fs::read_dir(sys_root.join("block")) else {
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
        .fold(0u64, u64::saturating_add)
}

/// The host a model was trained on (or is used on).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostIdentity {
    /// `/proc/cpuinfo` `model name` of the first CPU (`unknown` when absent).
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Kernel release (`uname -r`).
    pub kernel: String,
}

impl HostIdentity {
    /// This host, from `<proc>/cpuinfo`, `<proc>/stat` and `<proc>/sys/kernel/osrelease`.
    pub fn detect(proc_root: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string(proc_root.join("cpuinfo")).unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        let cpus = std::fs::read_to_string(proc_root.join("stat"))
            .map(|s| parse_proc_stat(&s).len())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Self {
            cpu_model,
            cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
            kernel,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    #[test]
    fn busy_cpus_frequency_and_block_io_from_a_fixture_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        let sys = tmp.path().join("sys");
        fs::create_dir_all(&proc_root).unwrap();
        for cpu in 0..2 {
            let d = sys.join(format!("devices/system/cpu/cpu{cpu}/cpufreq"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("scaling_cur_freq"), "2400000\n").unwrap();
        }
        let disk = sys.join("block/vda");
        fs::create_dir_all(disk.join("device")).unwrap();
        fs::create_dir_all(sys.join("block/loop0")).unwrap();
        fs::write(sys.join("block/loop0/stat"), "0 0 999999 0 0 0 999999 0\n").unwrap();
        fs::write(disk.join("stat"), "1 0 1000 0 1 0 1000 0\n").unwrap();
        fs::write(
            proc_root.join("stat"),
            "cpu0 100 0 0 900 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0\n",
        )
        .unwrap();
        let mut r = FeatureReader::new(&proc_root, &sys, &[0, 0]);
        let t0 = Instant::now();
        assert!(r.read(t0).is_none(), "the first reading is the baseline");
        // cpu0 fully busy, cpu1 half busy; 2000 sectors (1.024 MB) more in 2 s.
        fs::write(
            proc_root.join("stat"),
            "cpu0 200 0 0 900 0 0 0 0\ncpu1 50 0 0 1050 0 0 0 0\n",
        )
        .unwrap();
        fs::write(disk.join("stat"), "1 0 2000 0 1 0 2000 0\n").unwrap();
        let o = r.read(t0 + Duration::from_secs(2)).unwrap();
        let p = o.packages[&0];
        assert!((p.busy_cpus - 1.5).abs() < 1e-12, "{p:?}");
        assert!((p.busy_cpu_ghz - 3.6).abs() < 1e-12, "{p:?}");
        assert!(p.frequency_known);
        assert!((o.block_io_mb_per_second - 0.512).abs() < 1e-12, "{o:?}");
    }

    #[test]
    fn host_identity() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("sys/kernel")).unwrap();
        fs::write(
            tmp.path().join("cpuinfo"),
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n\nprocessor\t: 1\n",
        )
        .unwrap();
        fs::write(
            tmp.path().join("stat"),
            "cpu 1 1 1 1\ncpu0 1 1 1 1\ncpu1 1 1 1 1\n",
        )
        .unwrap();
        fs::write(tmp.path().join("sys/kernel/osrelease"), "6.18.0-1-amd64\n").unwrap();
        assert_eq!(
            HostIdentity::detect(tmp.path()),
            HostIdentity {
                cpu_model: "Intel(R) Xeon(R) Gold 6338".into(),
                cpus: 2,
                kernel: "6.18.0-1-amd64".into()
            }
        );
    }
}
