//! CPU power estimated from busy time, for hosts without a RAPL meter.
//!
//! The model is Cloud Carbon Footprint's (CCF) linear one, applied per logical CPU ("vCPU"
//! in CCF's words) over each interval:
//!
//! ```text
//! P_cpu = Pmin + (Pmax - Pmin) × u_cpu         u_cpu = Δbusy / (Δbusy + Δidle)  from /proc/stat
//! E_package = Σ_{cpu in package} P_cpu × Δt
//! ```
//!
//! `busy` is user + nice + system + irq + softirq jiffies (guest time is already inside user
//! and nice), `idle` is idle + iowait; steal is left out of both, as time the CPU was not this
//! host's to spend. The result is reported as zone `package`, device `package-<n>`, source
//! `estimated`.
//!
//! Default coefficients (watts per logical CPU, min = idle, max = 100 % busy) are CCF's, which
//! it derives from SPECpower_ssj2008 results by microarchitecture
//! (<https://www.cloudcarbonfootprint.org/docs/methodology/>, values from
//! `packages/core/src/compute/ComputeProcessorTypes.ts` of
//! <https://github.com/cloud-carbon-footprint/cloud-carbon-footprint>):
//!
//! | family            | min W | max W |
//! |-------------------|------:|------:|
//! | Sandy Bridge      | 2.17  | 8.58  |
//! | Ivy Bridge        | 3.04  | 8.25  |
//! | Haswell           | 1.00  | 4.74  |
//! | Broadwell         | 0.71  | 3.69  |
//! | Skylake           | 0.65  | 4.26  |
//! | Cascade Lake      | 0.64  | 3.97  |
//! | Coffee Lake       | 1.14  | 5.42  |
//! | AMD EPYC 1st gen  | 0.82  | 2.55  |
//! | AMD EPYC 2nd gen  | 0.47  | 1.69  |
//! | AMD EPYC 3rd gen  | 0.45  | 2.02  |
//! | unknown           | 0.74  | 3.50  |
//!
//! "unknown" is CCF's average over AWS's fleet (`MIN_WATTS_AVG`/`MAX_WATTS_AVG` in
//! `packages/aws/src/domain/AwsFootprintEstimationConstants.ts`), used when `/proc/cpuinfo`
//! does not name a family in the table. [`EstimateConfig::watts`] overrides the table.
//! The estimate covers the CPU package only (no DRAM, no platform), like RAPL's `package`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    cpu_packages, describe, read_text, round_to_u64, MeterSource, MeterState, MeterStatus, ReadFn,
    Zone, ZoneKey, ZoneReading,
};

/// Power of one logical CPU at idle and at full load, in watts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuWatts {
    /// Watts per logical CPU when idle.
    pub min_w: f64,
    /// Watts per logical CPU when 100 % busy.
    pub max_w: f64,
}

/// The power model's configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EstimateConfig {
    /// Watts per logical CPU; `None` picks CCF's coefficients for the detected CPU family.
    pub watts: Option<CpuWatts>,
}

/// CPU microarchitectures with published CCF coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuFamily {
    /// Intel Sandy Bridge.
    SandyBridge,
    /// Intel Ivy Bridge.
    IvyBridge,
    /// Intel Haswell.
    Haswell,
    /// Intel Broadwell.
    Broadwell,
    /// Intel Skylake.
    Skylake,
    /// Intel Cascade Lake (and Cooper Lake, same model number).
    CascadeLake,
    /// Intel Kaby / Coffee Lake.
    CoffeeLake,
    /// AMD EPYC Naples.
    EpycGen1,
    /// AMD EPYC Rome.
    EpycGen2,
    /// AMD EPYC Milan.
    EpycGen3,
    /// Anything else: CCF's fleet average.
    Unknown,
}

impl CpuFamily {
    /// CCF's per-logical-CPU coefficients for this family (table in the module docs).
    pub fn ccf_watts(self) -> CpuWatts {
        let (min_w, max_w) = match self {
            CpuFamily::SandyBridge => (2.17, 8.58),
            CpuFamily::IvyBridge => (3.04, 8.25),
            CpuFamily::Haswell => (1.0, 4.74),
            CpuFamily::Broadwell => (0.71, 3.69),
            CpuFamily::Skylake => (0.65, 4.26),
            CpuFamily::CascadeLake => (0.64, 3.97),
            CpuFamily::CoffeeLake => (1.14, 5.42),
            CpuFamily::EpycGen1 => (0.82, 2.55),
            CpuFamily::EpycGen2 => (0.47, 1.69),
            CpuFamily::EpycGen3 => (0.45, 2.02),
            CpuFamily::Unknown => (0.74, 3.5),
        };
        CpuWatts { min_w, max_w }
    }

    /// A short name for logs and `optimus check`.
    pub fn label(self) -> &'static str {
        match self {
            CpuFamily::SandyBridge => "Sandy Bridge",
            CpuFamily::IvyBridge => "Ivy Bridge",
            CpuFamily::Haswell => "Haswell",
            CpuFamily::Broadwell => "Broadwell",
            CpuFamily::Skylake => "Skylake",
            CpuFamily::CascadeLake => "Cascade Lake",
            CpuFamily::CoffeeLake => "Coffee Lake",
            CpuFamily::EpycGen1 => "AMD EPYC 1st gen",
            CpuFamily::EpycGen2 => "AMD EPYC 2nd gen",
            CpuFamily::EpycGen3 => "AMD EPYC 3rd gen",
            CpuFamily::Unknown => "unknown",
        }
    }

    /// The family of the first CPU in `/proc/cpuinfo` text, from vendor, family, model and
    /// stepping (Intel SDM model numbers; AMD family 17h/19h models).
    pub fn detect(cpuinfo: &str) -> CpuFamily {
        let block = cpuinfo.split("\n\n").next().unwrap_or("");
        let field = |name: &str| {
            block.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        let number = |name: &str| field(name).and_then(|v| v.parse::<u32>().ok());
        let (Some(vendor), Some(family), Some(model)) =
            (field("vendor_id"), number("cpu family"), number("model"))
        else {
            return CpuFamily::Unknown;
        };
        let stepping = number("stepping").unwrap_or(0);
        match (vendor.as_str(), family, model) {
            ("GenuineIntel", 6, 0x2a | 0x2d) => CpuFamily::SandyBridge,
            ("GenuineIntel", 6, 0x3a | 0x3e) => CpuFamily::IvyBridge,
            ("GenuineIntel", 6, 0x3c | 0x3f | 0x45 | 0x46) => CpuFamily::Haswell,
            ("GenuineIntel", 6, 0x3d | 0x47 | 0x4f | 0x56) => CpuFamily::Broadwell,
            // Skylake-SP steppings 0-4; Cascade Lake 5-7, Cooper Lake 10-11.
            ("GenuineIntel", 6, 0x55) if stepping >= 5 => CpuFamily::CascadeLake,
            ("GenuineIntel", 6, 0x4e | 0x5e | 0x55) => CpuFamily::Skylake,
            ("GenuineIntel", 6, 0x8e | 0x9e) => CpuFamily::CoffeeLake,
            ("AuthenticAMD", 0x17, 0x01) => CpuFamily::EpycGen1,
            ("AuthenticAMD", 0x17, 0x31) => CpuFamily::EpycGen2,
            ("AuthenticAMD", 0x19, 0x01) => CpuFamily::EpycGen3,
            _ => CpuFamily::Unknown,
        }
    }
}

/// Busy and counted (busy + idle) jiffies of one logical CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    pub(crate) busy: u64,
    pub(crate) total: u64,
}

/// The `cpu<N>` lines of `/proc/stat` (the aggregate `cpu` line is skipped).
pub(crate) fn parse_proc_stat(text: &str) -> BTreeMap<u32, CpuTimes> {
    let mut cpus = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal guest guest_nice. Saturating: a
        // counter near 2^64 (garbage, or a --proc-root fixture) overflowed the sum.
        let sum = |fields: &[usize]| fields.iter().fold(0u64, |a, &i| a.saturating_add(at(i)));
        let busy = sum(&[0, 1, 2, 5, 6]);
        let idle = sum(&[3, 4]);
        cpus.insert(
            cpu,
            CpuTimes {
                busy,
                total: busy.saturating_add(idle),
            },
        );
    }
    cpus
}

/// Utilisation of one CPU between two readings, in 0..=1 (0 when no time was counted).
fn utilisation(prev: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy).min(total);
    busy as f64 / total as f64
}

/// Estimated energy of each package over `seconds`, in microjoules. CPUs present in only one
/// of the readings (hotplug) are left out; a package with none left is absent.
pub(crate) fn package_energy_uj(
    prev: &BTreeMap<u32, CpuTimes>,
    now: &BTreeMap<u32, CpuTimes>,
    cpu_package: &BTreeMap<u32, u32>,
    watts: CpuWatts,
    seconds: f64,
) -> BTreeMap<u32, u64> {
    let mut joules: BTreeMap<u32, f64> = BTreeMap::new();
    for (cpu, times) in now {
        let Some(before) = prev.get(cpu) else {
            continue;
        };
        let power = watts.min_w + (watts.max_w - watts.min_w) * utilisation(*before, *times);
        let package = cpu_package.get(cpu).copied().unwrap_or(0);
        *joules.entry(package).or_default() += power * seconds;
    }
    joules
        .into_iter()
        .map(|(package, j)| (package, round_to_u64(j * 1e6)))
        .collect()
}

/// The estimating meter.
#[derive(Debug)]
pub(crate) struct Estimator {
    stat_path: PathBuf,
    read: ReadFn,
    watts: CpuWatts,
    cpu_package: BTreeMap<u32, u32>,
    packages: BTreeSet<u32>,
    prev: Option<(Instant, BTreeMap<u32, CpuTimes>)>,
    totals: BTreeMap<u32, u64>,
    failing: bool,
}

impl Estimator {
    /// Reads `/proc/stat` once (the baseline, at `now`) and the CPU topology.
    pub(crate) fn open(
        proc_root: &Path,
        sys_root: &Path,
        cfg: &EstimateConfig,
        read: ReadFn,
        now: Instant,
    ) -> (Option<Estimator>, MeterStatus) {
        let stat_path = proc_root.join("stat");
        let status =
            |state, detail: String| MeterStatus::new(MeterSource::Estimated, state, detail);
        let stat = match read_text(read, &stat_path) {
            Ok(text) => parse_proc_stat(&text),
            Err(err) => {
                let detail = format!("{}: no CPU energy", describe(&err));
                return (None, status(MeterState::Failed, detail));
            }
        };
        let cpus: Vec<u32> = stat.keys().copied().collect();
        let cpu_package = cpu_packages(sys_root, &cpus, read);
        let packages: BTreeSet<u32> = cpu_package.values().copied().collect();
        let (watts, origin) = match cfg.watts {
            Some(w) => (w, "configured".to_string()),
            None => {
                let family = read_text(read, &proc_root.join("cpuinfo"))
                    .map(|text| CpuFamily::detect(&text))
                    .unwrap_or(CpuFamily::Unknown);
                (
                    family.ccf_watts(),
                    format!("Cloud Carbon Footprint, CPU family {}", family.label()),
                )
            }
        };
        let detail = format!(
            "no RAPL meter: CPU power estimated from /proc/stat busy time for {} logical CPUs in {} \
             package(s), {:.2} W idle to {:.2} W busy per CPU ({origin})",
            cpus.len(),
            packages.len(),
            watts.min_w,
            watts.max_w
        );
        log::info!("estimated: {detail}");
        let mut estimator = Estimator {
            totals: packages.iter().map(|&p| (p, 0)).collect(),
            stat_path,
            read,
            watts,
            cpu_package,
            packages,
            prev: None,
            failing: false,
        };
        estimator.sample(now);
        (Some(estimator), status(MeterState::Active, detail))
    }

    /// Estimates each package's energy since the previous call.
    pub(crate) fn sample(&mut self, now: Instant) -> Vec<ZoneReading> {
        let stat = match read_text(self.read, &self.stat_path) {
            Ok(text) => {
                self.failing = false;
                Some(parse_proc_stat(&text))
            }
            Err(err) => {
                if !self.failing {
                    self.failing = true;
                    log::warn!("estimated: {}: CPU energy unavailable", describe(&err));
                }
                None
            }
        };
        let deltas = match (&stat, &self.prev) {
            (Some(stat), Some((then, prev))) => {
                let seconds = now.saturating_duration_since(*then).as_secs_f64();
                Some(package_energy_uj(
                    prev,
                    stat,
                    &self.cpu_package,
                    self.watts,
                    seconds,
                ))
            }
            _ => None,
        };
        let available = stat.is_some();
        self.prev = stat.map(|s| (now, s));
        self.packages
            .iter()
            .map(|&package| {
                let delta = deltas
                    .as_ref()
                    .map(|d| d.get(&package).copied().unwrap_or(0));
                let total = self.totals.entry(package).or_insert(0);
                if let Some(d) = delta {
                    *total = total.saturating_add(d);
                }
                ZoneReading {
                    key: ZoneKey::new(
                        Zone::Package,
                        format!("package-{package}"),
                        MeterSource::Estimated,
                    ),
                    total_uj: available.then_some(*total),
                    delta_uj: delta,
                    wraps: 0,
                    glitches: 0,
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test's panic is its failure report"
)]
mod tests {
    use super::*;
    use std::fs;
    use std::io;
    use std::time::Duration;

    fn fs_read(path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    // Four logical CPUs; cpu0/cpu1 on package 0, cpu2/cpu3 on package 1.
    const STAT_T0: &str = "\
cpu  4000 0 2000 34000 0 0 0 0 0 0
cpu0 1000 0 500 8500 0 0 0 0 0 0
cpu1 1000 0 500 8500 0 0 0 0 0 0
cpu2 1000 0 500 8500 0 0 0 0 0 0
cpu3 1000 0 500 8500 0 0 0 0 0 0
intr 12345 0 0
ctxt 67890
";
    // 10 s later (1000 jiffies per CPU at USER_HZ 100):
    // cpu0: 500 user + 100 nice + 200 sys + 100 irq + 100 softirq = 1000 busy of 1000 -> 100 %
    // cpu1: 250 busy (user), 700 idle + 50 iowait -> 25 %
    // cpu2: 0 busy, 1000 idle -> 0 %
    // cpu3: 500 busy (300 user, incl. 100 guest; 200 system), 500 idle, +200 steal ignored -> 50 %
    const STAT_T1: &str = "\
cpu  5550 100 2600 36750 50 100 100 200 100 0
cpu0 1500 100 700 8500 0 100 100 0 0 0
cpu1 1250 0 500 9200 50 0 0 0 0 0
cpu2 1000 0 500 9500 0 0 0 0 0 0
cpu3 1300 0 700 9000 0 0 0 200 100 0
intr 23456 0 0
ctxt 78901
";

    fn topology(root: &Path) {
        for (cpu, package) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
            let dir = root.join(format!("sys/devices/system/cpu/cpu{cpu}/topology"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("physical_package_id"), format!("{package}\n")).unwrap();
        }
    }

    #[test]
    fn proc_stat_parsing() {
        let t1 = parse_proc_stat(STAT_T1);
        assert_eq!(t1.len(), 4, "the aggregate line is skipped");
        assert_eq!(
            t1[&0],
            CpuTimes {
                busy: 2500,
                total: 11000
            }
        );
        assert_eq!(
            t1[&3],
            CpuTimes {
                busy: 2000,
                total: 11000
            }
        );
        // Found with the proc_stat fuzz target: the sum overflowed (a panic in debug builds,
        // a wrapped, tiny busy time in release ones).
        let huge = parse_proc_stat("cpu0 18446744073709551615 1 0 7\n");
        assert_eq!(
            huge[&0],
            CpuTimes {
                busy: u64::MAX,
                total: u64::MAX
            }
        );
    }

    #[test]
    fn estimate_arithmetic_matches_hand_computation() {
        let watts = CpuWatts {
            min_w: 1.0,
            max_w: 3.0,
        };
        let cpu_package = BTreeMap::from([(0, 0), (1, 0), (2, 1), (3, 1)]);
        let e = package_energy_uj(
            &parse_proc_stat(STAT_T0),
            &parse_proc_stat(STAT_T1),
            &cpu_package,
            watts,
            10.0,
        );
        // package 0: cpu0 1 + 2 × 1.00 = 3.0 W, cpu1 1 + 2 × 0.25 = 1.5 W -> 4.5 W × 10 s = 45 J
        // package 1: cpu2 1 + 2 × 0.00 = 1.0 W, cpu3 1 + 2 × 0.50 = 2.0 W -> 3.0 W × 10 s = 30 J
        assert_eq!(e, BTreeMap::from([(0, 45_000_000), (1, 30_000_000)]));

        // With CCF's fleet average (0.74 W idle, 3.5 W busy):
        // package 0: (0.74 + 2.76) + (0.74 + 0.69) = 4.93 W -> 49.3 J
        // package 1: (0.74) + (0.74 + 1.38) = 2.86 W -> 28.6 J
        let e = package_energy_uj(
            &parse_proc_stat(STAT_T0),
            &parse_proc_stat(STAT_T1),
            &cpu_package,
            CpuFamily::Unknown.ccf_watts(),
            10.0,
        );
        assert_eq!(e, BTreeMap::from([(0, 49_300_000), (1, 28_600_000)]));
    }

    #[test]
    fn estimator_reports_packages_from_fixture_proc_and_sys() {
        let tmp = tempfile::tempdir().unwrap();
        topology(tmp.path());
        let proc_root = tmp.path().join("proc");
        fs::create_dir_all(&proc_root).unwrap();
        fs::write(proc_root.join("stat"), STAT_T0).unwrap();
        let cfg = EstimateConfig {
            watts: Some(CpuWatts {
                min_w: 1.0,
                max_w: 3.0,
            }),
        };
        let t0 = Instant::now();
        let (est, status) = Estimator::open(&proc_root, &tmp.path().join("sys"), &cfg, fs_read, t0);
        let mut est = est.unwrap();
        assert_eq!(status.state, MeterState::Active);
        assert!(
            status.detail.contains("4 logical CPUs in 2 package(s)"),
            "{status}"
        );

        fs::write(proc_root.join("stat"), STAT_T1).unwrap();
        let r = est.sample(t0 + Duration::from_secs(10));
        let key = |p: &str| ZoneKey::new(Zone::Package, p, MeterSource::Estimated);
        assert_eq!(
            r,
            vec![
                ZoneReading {
                    key: key("package-0"),
                    total_uj: Some(45_000_000),
                    delta_uj: Some(45_000_000),
                    wraps: 0,
                    glitches: 0
                },
                ZoneReading {
                    key: key("package-1"),
                    total_uj: Some(30_000_000),
                    delta_uj: Some(30_000_000),
                    wraps: 0,
                    glitches: 0
                },
            ]
        );

        // /proc/stat unreadable: unavailable, not 0 W; the total is kept.
        fs::remove_file(proc_root.join("stat")).unwrap();
        let r = est.sample(t0 + Duration::from_secs(20));
        assert!(r
            .iter()
            .all(|z| z.total_uj.is_none() && z.delta_uj.is_none()));
    }

    #[test]
    fn cpu_family_detection() {
        let info = |vendor: &str, family: u32, model: u32, stepping: u32| {
            format!(
                "processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n\
                 model name\t: whatever\nstepping\t: {stepping}\n\nprocessor\t: 1\n"
            )
        };
        assert_eq!(
            CpuFamily::detect(&info("GenuineIntel", 6, 85, 7)),
            CpuFamily::CascadeLake
        );
        assert_eq!(
            CpuFamily::detect(&info("GenuineIntel", 6, 85, 4)),
            CpuFamily::Skylake
        );
        assert_eq!(
            CpuFamily::detect(&info("GenuineIntel", 6, 79, 1)),
            CpuFamily::Broadwell
        );
        assert_eq!(
            CpuFamily::detect(&info("AuthenticAMD", 23, 49, 0)),
            CpuFamily::EpycGen2
        );
        assert_eq!(
            CpuFamily::detect(&info("AuthenticAMD", 25, 1, 1)),
            CpuFamily::EpycGen3
        );
        assert_eq!(
            CpuFamily::detect(&info("GenuineIntel", 6, 143, 8)),
            CpuFamily::Unknown
        );
        assert_eq!(CpuFamily::detect(""), CpuFamily::Unknown);
        let unknown = CpuFamily::Unknown.ccf_watts();
        assert_eq!((unknown.min_w, unknown.max_w), (0.74, 3.5));
    }
}
