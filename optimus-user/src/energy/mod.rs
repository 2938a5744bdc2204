//! Energy meters: where the joules come from.
//!
//! One module per meter, each opened once and then sampled once per interval by the sampler
//! (never by a scrape):
//!
//! - `perf`: RAPL through the perf `power` PMU (`/sys/bus/event_source/devices/power`), read
//!   with `perf_event_open`. Preferred when present: its counters are 64-bit, accumulated by the
//!   kernel, so they do not wrap in practice. Cross-checked once against powercap at start.
//! - `powercap`: RAPL through powercap sysfs (`/sys/class/powercap/{intel,amd}-rapl:*`),
//!   32-bit counters that wrap every few minutes to hours; wraps are corrected with
//!   `max_energy_range_uj` and counted, never dropped.
//! - `nvml`: NVIDIA GPUs through NVML (`libnvidia-ml.so.1`), energy counter or integrated
//!   power, plus the processes using each GPU and vGPU instances where the driver has them.
//! - `estimate`: a power model from per-CPU busy time in `/proc/stat`, used only when no
//!   RAPL meter is readable, so that a host without counters still gets numbers, marked
//!   `estimated`.
//!
//! # Units and availability
//!
//! Energy stays in integer microjoules ([`ZoneReading::total_uj`], [`ZoneReading::delta_uj`])
//! until export. A zone that cannot be read is *unavailable* (`None`), never 0 W: the reason is
//! logged once (with the fix) and shown by [`EnergyMeters::status`]. Its total so far is kept
//! inside the meter and continues from there if the zone comes back.
//!
//! # Overlap rule: do not add zones together
//!
//! RAPL domains nest: `psys` (the whole SoC/platform) ⊇ `package` ⊇ `core`, `uncore`
//! (`core` + `uncore` ≤ `package`, the rest is the package's own uncounted logic); `dram` is
//! separate from `package`. Summing `psys` + `package` + `core` counts the same joules two or
//! three times. The CPU energy of a host is `package` (plus `dram` where wanted); `psys` is an
//! alternative whole-platform view on client parts. GPU energy (`gpu`) is separate from all of
//! them.
//!
//! Each [`ZoneKey`] comes from exactly one source: when both perf and powercap expose a zone,
//! only perf's reading is reported, and the estimate is used only when no RAPL source is
//! readable, so a consumer can sum the `package` zones of one sample without double counting.

pub(crate) mod estimate;
mod nvml;
pub(crate) mod perf;
pub(crate) mod powercap;

pub(crate) use estimate::{parse_proc_stat, CpuTimes};
pub use estimate::{CpuFamily, CpuWatts, EstimateConfig};
pub use nvml::NvmlConfig;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The part of the machine an energy reading covers (see the overlap rule in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Zone {
    /// A whole CPU package (socket or die): cores, caches, memory controller.
    Package,
    /// All cores of a package (RAPL PP0); part of [`Zone::Package`].
    Core,
    /// The package's uncore / integrated graphics (RAPL PP1); part of [`Zone::Package`].
    Uncore,
    /// DRAM attached to a package; separate from [`Zone::Package`].
    Dram,
    /// The platform (SoC plus what the platform sensor covers); contains [`Zone::Package`].
    Psys,
    /// One GPU board.
    Gpu,
}

impl Zone {
    /// The `zone` label value: `package`, `core`, `uncore`, `dram`, `psys`, `gpu`.
    pub fn label(self) -> &'static str {
        match self {
            Zone::Package => "package",
            Zone::Core => "core",
            Zone::Uncore => "uncore",
            Zone::Dram => "dram",
            Zone::Psys => "psys",
            Zone::Gpu => "gpu",
        }
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Which meter produced a reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeterSource {
    /// RAPL counters from powercap sysfs.
    RaplPowercap,
    /// RAPL counters from the perf `power` PMU.
    RaplPerf,
    /// NVIDIA GPUs through NVML.
    Nvml,
    /// The CPU power model (no meter).
    Estimated,
    /// A power model trained on a real meter (`--power-model`; no meter here).
    Model,
    /// A passthrough GPU's NVML inside its VM, reported over the guest channel.
    GuestNvml,
}

impl MeterSource {
    /// The `source` label value: `rapl-powercap`, `rapl-perf`, `nvml`, `estimated`, `model`,
    /// `guest-nvml`.
    pub fn label(self) -> &'static str {
        match self {
            MeterSource::RaplPowercap => "rapl-powercap",
            MeterSource::RaplPerf => "rapl-perf",
            MeterSource::Nvml => "nvml",
            MeterSource::Estimated => "estimated",
            MeterSource::Model => "model",
            MeterSource::GuestNvml => "guest-nvml",
        }
    }
}

impl fmt::Display for MeterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Identifies one energy series: what it covers, which instance, which meter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneKey {
    /// What part of the machine.
    pub zone: Zone,
    /// Which instance: `package-0` (also for its core/uncore/dram subzones), `platform-0` for
    /// psys, `gpu-0` for GPUs (NVML index).
    pub device: String,
    /// Which meter.
    pub source: MeterSource,
}

impl ZoneKey {
    /// A key from its parts.
    pub fn new(zone: Zone, device: impl Into<String>, source: MeterSource) -> Self {
        Self {
            zone,
            device: device.into(),
            source,
        }
    }
}

/// One zone's reading at one sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneReading {
    /// The series.
    pub key: ZoneKey,
    /// Cumulative energy since the meter started, in microjoules: wrap-corrected and
    /// monotonic. `None` when the zone is unavailable now; the meter keeps the total and
    /// continues from it if the zone comes back.
    pub total_uj: Option<u64>,
    /// Energy in the last interval, in microjoules (for power and attribution). `None` when
    /// unavailable now, and on the first reading of a zone (no interval yet).
    pub delta_uj: Option<u64>,
    /// How many counter wraps were corrected since the meter started.
    pub wraps: u64,
    /// Counter steps rejected since the meter started because the power they imply is above
    /// the zone's plausible maximum (their interval's energy is unknown, never added).
    pub glitches: u64,
}

/// A process seen using a GPU in the last interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuProcess {
    /// The GPU, as in [`ZoneKey::device`] (`gpu-0`).
    pub device: String,
    /// Host process id (a VM's QEMU or a host process).
    pub pid: u32,
    /// Share of the GPU's streaming multiprocessors this process used, in percent (0 when
    /// NVML listed the process but reported no utilisation sample for it).
    pub sm_util_percent: u32,
}

/// A vGPU instance (NVIDIA GRID / mdev) on a GPU, where the driver exposes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuVgpu {
    /// The physical GPU, as in [`ZoneKey::device`].
    pub device: String,
    /// The NVML vGPU instance id.
    pub instance: u32,
    /// The VM as the driver names it: a libvirt domain id or a UUID.
    pub vm_id: Option<String>,
    /// The mediated device's UUID (the `mdev` QEMU was given), when known.
    pub mdev_uuid: Option<String>,
    /// SM utilisation of this vGPU in the last interval, in percent, when the driver reports it.
    pub sm_util_percent: Option<u32>,
}

/// Everything the meters measured in one interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnergySample {
    /// One reading per known zone, unavailable ones included.
    pub zones: Vec<ZoneReading>,
    /// Processes using a GPU.
    pub gpu_processes: Vec<GpuProcess>,
    /// vGPU instances (empty where the driver has none or does not say).
    pub vgpus: Vec<GpuVgpu>,
    /// Per GPU device (`gpu-0`): SM and memory utilisation in percent over NVML's last
    /// sample period, where the driver reports it (the power model's GPU features).
    pub gpu_utilisation: std::collections::BTreeMap<String, (u32, u32)>,
    /// Time since the previous sample (zero for the first one).
    pub interval: Duration,
}

/// Where to look for meters, and how to estimate without one.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergyConfig {
    /// powercap class directory, normally `/sys/class/powercap`.
    pub powercap_root: PathBuf,
    /// perf event sources, normally `/sys/bus/event_source/devices`.
    pub perf_root: PathBuf,
    /// sysfs root, normally `/sys` (CPU topology).
    pub sys_root: PathBuf,
    /// procfs root, normally `/proc` (`stat`, `cpuinfo` for the estimate).
    pub proc_root: PathBuf,
    /// Whether and from where to load NVML.
    pub nvml: NvmlConfig,
    /// The power model's coefficients.
    pub estimate: EstimateConfig,
    /// Estimate CPU energy when no RAPL meter is readable.
    pub allow_estimate: bool,
    /// `--max-zone-watts`: the most power any zone can plausibly draw; `None` takes it from
    /// each zone's powercap constraints, else [`DEFAULT_MAX_ZONE_WATTS`].
    pub max_zone_watts: Option<f64>,
    /// `--power-model`: a model file (already checked against this host) that replaces the
    /// estimate where no RAPL meter is readable.
    pub power_model: Option<(PathBuf, crate::model::ModelFile)>,
}

/// The plausible maximum of a zone without powercap constraints: 5 kW, above any CPU
/// package, its DRAM or a platform (psys) sold today, far below what a counter glitch
/// implies (a 32-bit counter stepping back by 1 mJ reads as a 262 kJ wrap).
pub const DEFAULT_MAX_ZONE_WATTS: f64 = 5000.0;

impl Default for EnergyConfig {
    fn default() -> Self {
        Self::under(Path::new("/sys"), Path::new("/proc"))
    }
}

impl EnergyConfig {
    /// All paths under the given sysfs and procfs roots (fixture trees in tests), NVML from
    /// the default library, estimate allowed with the default table.
    pub fn under(sys_root: &Path, proc_root: &Path) -> Self {
        Self {
            powercap_root: sys_root.join("class/powercap"),
            perf_root: sys_root.join("bus/event_source/devices"),
            sys_root: sys_root.to_path_buf(),
            proc_root: proc_root.to_path_buf(),
            nvml: NvmlConfig::Default,
            estimate: EstimateConfig::default(),
            allow_estimate: true,
            max_zone_watts: None,
            power_model: None,
        }
    }
}

/// How a meter fared on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeterState {
    /// In use.
    Active,
    /// Present but not used: another source covers the same zones.
    Standby,
    /// Not present on this host.
    NotFound,
    /// Present, but this process may not read it (the detail says how to fix that).
    NotPermitted,
    /// Present but unusable for another reason (the detail says which).
    Failed,
    /// Turned off by configuration, or not needed.
    Disabled,
}

impl MeterState {
    /// Lowercase words for `optimus check`.
    pub fn label(self) -> &'static str {
        match self {
            MeterState::Active => "active",
            MeterState::Standby => "standby",
            MeterState::NotFound => "not found",
            MeterState::NotPermitted => "not permitted",
            MeterState::Failed => "failed",
            MeterState::Disabled => "disabled",
        }
    }
}

/// One line of `optimus check` for one meter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeterStatus {
    /// The meter.
    pub source: MeterSource,
    /// What happened when it was opened.
    pub state: MeterState,
    /// What was found, or what went wrong and how to fix it.
    pub detail: String,
}

impl MeterStatus {
    pub(crate) fn new(source: MeterSource, state: MeterState, detail: impl Into<String>) -> Self {
        Self {
            source,
            state,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for MeterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.source,
            self.state.label(),
            self.detail
        )
    }
}

/// Errors of the energy meters. Each carries the file or counter it concerns.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    /// A file could not be read.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done (`read`, `list`).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `max_energy_range_uj` is 0: no counter can be read against it.
    #[error("{} is 0: the counter range must be above 0", path.display())]
    ZeroRange {
        /// The `max_energy_range_uj` file.
        path: PathBuf,
    },
    /// A file did not hold what it should.
    #[error("unexpected content {content:?} in {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held (cut to 64 bytes).
        content: String,
    },
    /// `perf_event_open` refused a power PMU event.
    #[error("cannot open perf event power/{event}/ on cpu {cpu}")]
    PerfOpen {
        /// The event name (`energy-pkg`).
        event: String,
        /// The CPU it was opened on.
        cpu: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading an open perf counter failed.
    #[error("cannot read perf event power/{event}/ on cpu {cpu}")]
    PerfRead {
        /// The event name.
        event: String,
        /// The CPU.
        cpu: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An NVML call failed.
    #[error("nvml {op} failed")]
    Nvml {
        /// The call (`nvmlDeviceGetPowerUsage on gpu-0`).
        op: String,
        /// NVML's error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
}

impl EnergyError {
    /// The OS error kind, when this is an I/O error.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            EnergyError::Io { source, .. }
            | EnergyError::PerfOpen { source, .. }
            | EnergyError::PerfRead { source, .. } => Some(source.kind()),
            EnergyError::Parse { .. }
            | EnergyError::ZeroRange { .. }
            | EnergyError::Nvml { .. } => None,
        }
    }
}

/// How files are read: `std::fs::read_to_string` in production; tests swap in one that fails
/// the way a real sysfs file does as non-root (EACCES), which root cannot otherwise see.
pub(crate) type ReadFn = fn(&Path) -> io::Result<String>;

/// Reads a small sysfs/procfs file.
pub(crate) fn read_text(read: ReadFn, path: &Path) -> Result<String, EnergyError> {
    read(path).map_err(|source| EnergyError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file holding one unsigned integer (surrounding whitespace allowed).
pub(crate) fn read_u64(read: ReadFn, path: &Path) -> Result<u64, EnergyError> {
    let text = read_text(read, path)?;
    text.trim().parse().map_err(|_| EnergyError::Parse {
        path: path.to_path_buf(),
        content: text.chars().take(64).collect(),
    })
}

/// An error and its causes on one line, for logs and `optimus check`
/// (`cannot read /sys/...: Permission denied (os error 13)`).
pub(crate) fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Package number of CPUs `0..ncpus` (index = CPU id), numbered as powercap's `package-<n>`;
/// what attribution uses to charge a thread from the package it ran on.
pub fn package_of_cpus(sys_root: &Path, ncpus: usize) -> Vec<u32> {
    let cpus: Vec<u32> = (0..ncpus).filter_map(|c| u32::try_from(c).ok()).collect();
    let map = cpu_packages(sys_root, &cpus, |p| std::fs::read_to_string(p));
    cpus.iter()
        .map(|c| map.get(c).copied().unwrap_or(0))
        .collect()
}

/// Maps each given logical CPU to its package number: the rank of its
/// `<sys>/devices/system/cpu/cpu<N>/topology/physical_package_id` among the distinct ids seen,
/// which is how the kernel numbers `package-<n>` in powercap (logical package ids, 0..n).
/// A CPU without topology (containers, fixtures) counts as package 0.
pub(crate) fn cpu_packages(
    sys_root: &Path,
    cpus: &[u32],
    read: ReadFn,
) -> std::collections::BTreeMap<u32, u32> {
    let cpu_dir = sys_root.join("devices/system/cpu");
    let physical: Vec<(u32, u64)> = cpus
        .iter()
        .map(|&cpu| {
            let path = cpu_dir.join(format!("cpu{cpu}/topology/physical_package_id"));
            (cpu, read_u64(read, &path).unwrap_or(0))
        })
        .collect();
    let mut ids: Vec<u64> = physical.iter().map(|&(_, id)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    physical
        .into_iter()
        .map(|(cpu, id)| {
            let rank = ids.iter().position(|&i| i == id).unwrap_or(0);
            (cpu, u32::try_from(rank).unwrap_or(u32::MAX))
        })
        .collect()
}

/// One step of an energy counter, judged by [`counter_delta`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterStep {
    /// Energy in the interval, and whether a wrap was corrected.
    Energy { delta: u64, wrapped: bool },
    /// The step implies more energy than `max_delta`: a glitch (a counter that stepped back
    /// a little, a bogus jump), not energy. `delta` is what it would have meant.
    Glitch { delta: u64 },
}

/// Wrap-aware, plausibility-checked counter delta: the one function every energy counter
/// goes through.
///
/// The counter takes values `0..=max_range` and wraps to 0 after `max_range` (for powercap,
/// `max_range` is the zone's `max_energy_range_uj`; for a 64-bit perf counter, `u64::MAX`).
/// When `now < prev` the counter wrapped once: the delta is `(max_range - prev) + now + 1`,
/// exact for a counter of modulus `max_range + 1` and, for powercap (whose true modulus is
/// `max_energy_range_uj` plus one raw step of 15 to 61 µJ), within one raw step. A counter
/// that wrapped more than once within one interval cannot be told from one that wrapped
/// once; the sampler's interval is far shorter than a wrap period (minutes at full load).
///
/// `max_delta` is the most the zone can plausibly have used since `prev` (its plausible
/// maximum power times the time elapsed; `u64::MAX` for no check). A larger delta is a
/// [`CounterStep::Glitch`]: that is how a small step backwards (1 010 000 000 → 1 009 999 000
/// µJ, which as a wrap would be 262 kJ) and a jump worth hundreds of kW are told from energy.
pub fn counter_delta(prev: u64, now: u64, max_range: u64, max_delta: u64) -> CounterStep {
    let (delta, wrapped) = if now >= prev {
        (now - prev, false)
    } else {
        let to_top = u128::from(max_range.saturating_sub(prev));
        let delta = to_top + u128::from(now) + 1;
        (u64::try_from(delta).unwrap_or(u64::MAX), true)
    };
    if delta > max_delta {
        CounterStep::Glitch { delta }
    } else {
        CounterStep::Energy { delta, wrapped }
    }
}

/// The most energy, in µJ, a zone of plausible maximum `max_watts` can use in `elapsed`,
/// plus 10 ms of slack for when the counter and the clock were read.
pub fn max_energy_uj(max_watts: f64, elapsed: Duration) -> u64 {
    round_to_u64(max_watts * (elapsed.as_secs_f64() + 0.010) * 1e6)
}

/// Converts a non-negative float amount (of microjoules) to an integer, rounding to nearest;
/// negative or NaN gives 0, too large gives `u64::MAX`.
pub(crate) fn round_to_u64(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "non-negative here; `as` from float saturates at u64::MAX by definition"
    )]
    let v = x.round() as u64;
    v
}

/// Relative difference `|a - b| / max(a, b)`; `None` when both are zero.
pub(crate) fn relative_difference(a: u64, b: u64) -> Option<f64> {
    let hi = a.max(b);
    if hi == 0 {
        return None;
    }
    Some(a.abs_diff(b) as f64 / hi as f64)
}

/// The perf and powercap readings of the same package may differ a little (they are read at
/// slightly different instants); more than this means one of them is wrong.
const CROSS_CHECK_TOLERANCE: f64 = 0.05;

/// All energy meters of the host, opened once, sampled once per interval.
pub struct EnergyMeters {
    perf: Option<perf::PerfMeter>,
    powercap: Option<powercap::PowercapMeter>,
    /// Powercap's view of the zones perf covers, kept for one interval for the cross-check.
    shadow: Option<powercap::PowercapMeter>,
    estimate: Option<estimate::Estimator>,
    nvml: Option<nvml::NvmlMeter>,
    model: Option<crate::model::meter::ModelMeter>,
    statuses: Vec<MeterStatus>,
    last: Option<Instant>,
}

impl fmt::Debug for EnergyMeters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnergyMeters")
            .field("statuses", &self.statuses)
            .finish_non_exhaustive()
    }
}

impl EnergyMeters {
    /// Finds and opens every meter. Never fails: each meter ends up active, not found, not
    /// permitted (with the fix) or failed, as [`EnergyMeters::status`] reports. Each meter takes
    /// a first (baseline) reading, so that the first [`EnergyMeters::sample`] has deltas.
    pub fn open(cfg: &EnergyConfig) -> EnergyMeters {
        Self::open_at(cfg, Instant::now())
    }

    /// [`EnergyMeters::open`] with the baseline taken at `now`.
    pub fn open_at(cfg: &EnergyConfig, now: Instant) -> EnergyMeters {
        Self::open_with(cfg, now, |path| std::fs::read_to_string(path))
    }

    pub(crate) fn open_with(cfg: &EnergyConfig, now: Instant, read: ReadFn) -> EnergyMeters {
        let (mut powercap, mut powercap_status) =
            powercap::PowercapMeter::open(&cfg.powercap_root, read, cfg.max_zone_watts, now);
        let (perf, perf_status) = perf::PerfMeter::open(&cfg.perf_root, &cfg.sys_root, read);

        let mut shadow = None;
        if let (Some(perf), Some(pc)) = (&perf, powercap.as_mut()) {
            let covered = perf.covered();
            let mut covered_by_perf =
                pc.split_off(|k| covered.contains(&(k.zone, k.device.clone())));
            covered_by_perf.retain(|k| k.zone == Zone::Package);
            if covered_by_perf.readable_zones() > 0 {
                shadow = Some(covered_by_perf);
            }
            if pc.is_empty() {
                powercap_status = MeterStatus::new(
                    MeterSource::RaplPowercap,
                    MeterState::Standby,
                    "rapl-perf covers the same zones and is preferred (64-bit counters); used once to cross-check",
                );
                powercap = None;
            } else {
                powercap_status.detail =
                    format!("{} (zones rapl-perf does not have)", powercap_status.detail);
            }
        }
        if let Some(pc) = &powercap {
            if pc.readable_zones() == 0 {
                // Not one zone readable: keep the status (it carries the fix), fall back to
                // the estimate rather than report a tree of unavailable zones.
                powercap = None;
            }
        }

        let cpu_meter = perf.is_some() || powercap.is_some();
        let mut model = None;
        let mut model_status = None;
        if let Some((path, file)) = &cfg.power_model {
            if cpu_meter {
                model_status = Some(MeterStatus::new(
                    MeterSource::Model,
                    MeterState::Disabled,
                    format!(
                        "not needed: a RAPL meter is readable ({} not used)",
                        path.display()
                    ),
                ));
            } else {
                let cpus: Vec<u32> = read_text(read, &cfg.proc_root.join("stat"))
                    .map(|t| estimate::parse_proc_stat(&t).keys().copied().collect())
                    .unwrap_or_default();
                let map = cpu_packages(&cfg.sys_root, &cpus, read);
                let len = cpus.iter().max().map_or(0, |m| *m as usize + 1);
                let package: Vec<u32> = (0..len)
                    .map(|c| {
                        u32::try_from(c)
                            .ok()
                            .and_then(|c| map.get(&c).copied())
                            .unwrap_or(0)
                    })
                    .collect();
                let meter = crate::model::meter::ModelMeter::new(
                    file.clone(),
                    &cfg.proc_root,
                    &cfg.sys_root,
                    &package,
                    now,
                );
                let detail = meter.describe(path);
                log::info!("model: {detail}");
                model_status = Some(MeterStatus::new(
                    MeterSource::Model,
                    MeterState::Active,
                    detail,
                ));
                model = Some(meter);
            }
        }
        let (estimate, estimate_status) = if cpu_meter {
            (
                None,
                MeterStatus::new(
                    MeterSource::Estimated,
                    MeterState::Disabled,
                    "not needed: a RAPL meter is readable",
                ),
            )
        } else if model.is_some() {
            (
                None,
                MeterStatus::new(
                    MeterSource::Estimated,
                    MeterState::Disabled,
                    "replaced by the power model (--power-model)",
                ),
            )
        } else if !cfg.allow_estimate {
            (
                None,
                MeterStatus::new(
                    MeterSource::Estimated,
                    MeterState::Disabled,
                    "no RAPL meter readable and estimation turned off: no CPU energy",
                ),
            )
        } else {
            estimate::Estimator::open(&cfg.proc_root, &cfg.sys_root, &cfg.estimate, read, now)
        };

        let (nvml, nvml_status) = nvml::NvmlMeter::open(&cfg.nvml, now);

        let mut statuses = vec![perf_status, powercap_status, estimate_status, nvml_status];
        statuses.extend(model_status);
        // Every meter took its baseline reading while opening.
        EnergyMeters {
            perf,
            powercap,
            shadow,
            estimate,
            nvml,
            model,
            statuses,
            last: Some(now),
        }
    }

    /// One line per meter for `optimus check`: found, not found, not permitted (with the fix).
    pub fn status(&self) -> Vec<MeterStatus> {
        self.statuses.clone()
    }

    /// The predicting power model's zones (empty when none is in use).
    pub fn model_status(&self) -> Vec<crate::model::ZoneModelStatus> {
        self.model.as_ref().map(|m| m.status()).unwrap_or_default()
    }

    /// Reads every meter once; call once per interval.
    pub fn sample(&mut self) -> EnergySample {
        self.sample_at(Instant::now())
    }

    /// [`EnergyMeters::sample`] at a given instant (the sampler's clock; tests).
    pub fn sample_at(&mut self, now: Instant) -> EnergySample {
        let interval = self
            .last
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
        self.last = Some(now);

        let mut zones = Vec::new();
        if let Some(m) = self.perf.as_mut() {
            zones.extend(m.sample());
        }
        if let Some(m) = self.powercap.as_mut() {
            zones.extend(m.sample(now));
        }
        if let Some(m) = self.shadow.as_mut() {
            let reference = m.sample(now);
            if reference.iter().any(|r| r.delta_uj.is_some()) {
                let notes = cross_check(&zones, &reference);
                if let Some(status) = self
                    .statuses
                    .iter_mut()
                    .find(|s| s.source == MeterSource::RaplPerf)
                {
                    for note in notes {
                        status.detail = format!("{}; {note}", status.detail);
                    }
                }
                self.shadow = None;
            }
        }
        if let Some(m) = self.estimate.as_mut() {
            zones.extend(m.sample(now));
        }
        if let Some(m) = self.model.as_mut() {
            zones.extend(m.sample(now, interval.as_secs_f64()));
        }
        let mut gpu_processes = Vec::new();
        let mut vgpus = Vec::new();
        let mut gpu_utilisation = std::collections::BTreeMap::new();
        if let Some(m) = self.nvml.as_mut() {
            let gpu = m.sample(now);
            zones.extend(gpu.zones);
            gpu_processes = gpu.processes;
            vgpus = gpu.vgpus;
            gpu_utilisation = gpu.utilisation;
        }
        EnergySample {
            zones,
            gpu_processes,
            vgpus,
            gpu_utilisation,
            interval,
        }
    }
}

/// Compares perf's package deltas with powercap's over the same interval; warns (and returns
/// a note) for each package where they differ by more than [`CROSS_CHECK_TOLERANCE`].
fn cross_check(perf: &[ZoneReading], powercap: &[ZoneReading]) -> Vec<String> {
    let mut notes = Vec::new();
    for reference in powercap {
        let Some(b) = reference.delta_uj else {
            continue;
        };
        let Some(a) = perf
            .iter()
            .find(|r| {
                r.key.source == MeterSource::RaplPerf
                    && r.key.zone == reference.key.zone
                    && r.key.device == reference.key.device
            })
            .and_then(|r| r.delta_uj)
        else {
            continue;
        };
        match relative_difference(a, b) {
            Some(d) if d > CROSS_CHECK_TOLERANCE => {
                let note = format!(
                    "cross-check: {} {} differs from rapl-powercap by {:.1} % ({a} µJ vs {b} µJ)",
                    reference.key.device,
                    reference.key.zone,
                    d * 100.0
                );
                log::warn!(
                    "{note}; one of the two RAPL interfaces is misreporting, check the kernel's intel_rapl and perf rapl drivers"
                );
                notes.push(note);
            }
            _ => log::debug!(
                "cross-check: {} {} rapl-perf {a} µJ, rapl-powercap {b} µJ: agree",
                reference.key.device,
                reference.key.zone
            ),
        }
    }
    notes
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test's panic is its failure report"
)]
mod tests {
    use super::*;

    fn energy(delta: u64, wrapped: bool) -> CounterStep {
        CounterStep::Energy { delta, wrapped }
    }

    #[test]
    fn counter_delta_without_wrap() {
        assert_eq!(
            counter_delta(1_000, 4_500, 262_143_328_850, u64::MAX),
            energy(3_500, false)
        );
        assert_eq!(counter_delta(7, 7, 100, 0), energy(0, false));
    }

    #[test]
    fn counter_delta_across_wrap() {
        // 999_999 µJ to the top, one step over the top, then 2 J more: 3 J.
        let max = 262_143_328_850;
        assert_eq!(
            counter_delta(max - 999_999, 2_000_000, max, u64::MAX),
            energy(3_000_000, true)
        );
        // Wrap from the very top to zero is one step.
        assert_eq!(counter_delta(max, 0, max, 1), energy(1, true));
    }

    #[test]
    fn counter_delta_full_64_bit_range() {
        // A 64-bit counter wraps modulo 2^64: exactly wrapping_sub.
        let prev = u64::MAX - 9;
        assert_eq!(counter_delta(prev, 5, u64::MAX, u64::MAX), energy(15, true));
        assert_eq!(5u64.wrapping_sub(prev), 15);
    }

    #[test]
    fn counter_delta_inconsistent_prev_above_range() {
        // prev beyond the declared range: count what is certain (now + 1), do not underflow.
        assert_eq!(counter_delta(150, 10, 100, u64::MAX), energy(11, true));
    }

    #[test]
    fn counter_delta_rejects_implausible_steps() {
        let max = 262_143_328_850;
        let half_second = max_energy_uj(DEFAULT_MAX_ZONE_WATTS, Duration::from_millis(500));
        assert_eq!(half_second, 2_550_000_000, "5 kW over 0.51 s");
        // A step back of 1 mJ is not a 262 kJ wrap.
        assert_eq!(
            counter_delta(1_010_000_000, 1_009_999_000, max, half_second),
            CounterStep::Glitch {
                delta: 262_143_327_851
            }
        );
        // A jump worth 524 kW in 0.5 s is not energy either.
        assert!(matches!(
            counter_delta(
                1_010_000_000,
                1_010_000_000 + 262_000_000_000,
                max,
                half_second
            ),
            CounterStep::Glitch { .. }
        ));
        // A real wrap at 200 W is.
        assert_eq!(
            counter_delta(max - 50_000_000, 49_999_999, max, half_second),
            energy(100_000_000, true)
        );
        // Exactly at the bound is still energy.
        assert_eq!(counter_delta(0, 10, 100, 10), energy(10, false));
        assert_eq!(
            counter_delta(0, 11, 100, 10),
            CounterStep::Glitch { delta: 11 }
        );
    }

    #[test]
    fn relative_difference_and_cross_check() {
        assert_eq!(relative_difference(0, 0), None);
        assert_eq!(relative_difference(100, 95), Some(0.05));
        let key = |s| ZoneKey::new(Zone::Package, "package-0", s);
        let perf = vec![ZoneReading {
            key: key(MeterSource::RaplPerf),
            total_uj: Some(0),
            delta_uj: Some(10_000_000),
            wraps: 0,
            glitches: 0,
        }];
        let close = vec![ZoneReading {
            key: key(MeterSource::RaplPowercap),
            total_uj: Some(0),
            delta_uj: Some(9_600_000),
            wraps: 0,
            glitches: 0,
        }];
        assert!(cross_check(&perf, &close).is_empty());
        let far = vec![ZoneReading {
            delta_uj: Some(8_000_000),
            ..close[0].clone()
        }];
        let notes = cross_check(&perf, &far);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("20.0 %"), "{}", notes[0]);
    }

    #[test]
    fn meters_can_move_to_the_sampler_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<EnergyMeters>();
        assert_send::<EnergySample>();
    }

    #[test]
    fn labels() {
        assert_eq!(Zone::Package.label(), "package");
        assert_eq!(Zone::Gpu.to_string(), "gpu");
        assert_eq!(MeterSource::RaplPowercap.label(), "rapl-powercap");
        assert_eq!(MeterSource::Estimated.to_string(), "estimated");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// A fixture host: `<tmp>/sys`, `<tmp>/proc` with two CPUs on one package, optionally the
    /// two-socket powercap tree.
    fn host(with_powercap: bool) -> (tempfile::TempDir, EnergyConfig) {
        let tmp = tempfile::tempdir().unwrap();
        let (sys, proc) = (tmp.path().join("sys"), tmp.path().join("proc"));
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(
            proc.join("stat"),
            "cpu0 100 0 0 900 0 0 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0 0 0\n",
        )
        .unwrap();
        if with_powercap {
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/powercap/two-packages");
            copy_dir(&fixture, &sys.join("class/powercap"));
        }
        let mut cfg = EnergyConfig::under(&sys, &proc);
        cfg.nvml = NvmlConfig::Disabled;
        cfg.estimate.watts = Some(CpuWatts {
            min_w: 1.0,
            max_w: 3.0,
        });
        (tmp, cfg)
    }

    fn states(meters: &EnergyMeters) -> Vec<(MeterSource, MeterState)> {
        meters
            .status()
            .iter()
            .map(|s| (s.source, s.state))
            .collect()
    }

    #[test]
    fn no_rapl_means_estimate_per_package() {
        let (_tmp, cfg) = host(false);
        let t0 = Instant::now();
        let mut meters = EnergyMeters::open_at(&cfg, t0);
        assert_eq!(
            states(&meters),
            vec![
                (MeterSource::RaplPerf, MeterState::NotFound),
                (MeterSource::RaplPowercap, MeterState::NotFound),
                (MeterSource::Estimated, MeterState::Active),
                (MeterSource::Nvml, MeterState::Disabled),
            ]
        );
        // 4 s later: cpu0 went 50 % busy (200 of 400 jiffies), cpu1 stayed idle.
        std::fs::write(
            cfg.proc_root.join("stat"),
            "cpu0 300 0 0 1100 0 0 0 0 0 0\ncpu1 100 0 0 1300 0 0 0 0 0 0\n",
        )
        .unwrap();
        let s = meters.sample_at(t0 + Duration::from_secs(4));
        assert_eq!(s.interval, Duration::from_secs(4));
        // (1 + 2 × 0.5) W + 1 W = 3 W × 4 s = 12 J
        assert_eq!(
            s.zones,
            vec![ZoneReading {
                key: ZoneKey::new(Zone::Package, "package-0", MeterSource::Estimated),
                total_uj: Some(12_000_000),
                delta_uj: Some(12_000_000),
                wraps: 0,
                glitches: 0,
            }]
        );
        assert!(s.gpu_processes.is_empty() && s.vgpus.is_empty());
    }

    #[test]
    fn readable_rapl_means_no_estimate() {
        let (_tmp, cfg) = host(true);
        let t0 = Instant::now();
        let mut meters = EnergyMeters::open_at(&cfg, t0);
        assert_eq!(meters.status()[1].state, MeterState::Active);
        assert_eq!(meters.status()[2].state, MeterState::Disabled);
        std::fs::write(
            cfg.powercap_root.join("intel-rapl:0/energy_uj"),
            "110000000",
        )
        .unwrap();
        let s = meters.sample_at(t0 + Duration::from_secs(1));
        assert_eq!(s.zones.len(), 7);
        assert!(s
            .zones
            .iter()
            .all(|z| z.key.source == MeterSource::RaplPowercap));
        assert_eq!(s.zones[0].delta_uj, Some(10_000_000));
    }

    fn eacces_on_energy_uj(path: &Path) -> io::Result<String> {
        if path.ends_with("energy_uj") {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        std::fs::read_to_string(path)
    }

    #[test]
    fn unreadable_rapl_is_not_permitted_and_falls_back_to_estimate() {
        let (_tmp, cfg) = host(true);
        let meters = EnergyMeters::open_with(&cfg, Instant::now(), eacces_on_energy_uj);
        let status = meters.status();
        assert_eq!(status[1].state, MeterState::NotPermitted);
        assert!(
            status[1]
                .to_string()
                .starts_with("rapl-powercap: not permitted: 7 zones, none readable"),
            "{}",
            status[1]
        );
        assert!(status[1].detail.contains("CVE-2020-8694"), "{}", status[1]);
        assert_eq!(status[2].state, MeterState::Active);
    }

    #[test]
    fn estimate_can_be_turned_off() {
        let (_tmp, mut cfg) = host(false);
        cfg.allow_estimate = false;
        let mut meters = EnergyMeters::open(&cfg);
        assert_eq!(meters.status()[2].state, MeterState::Disabled);
        assert!(meters.sample().zones.is_empty());
    }

    /// Whatever this host has (here: no RAPL, no GPU), opening never fails.
    #[test]
    fn open_on_this_host_never_fails() {
        let mut meters = EnergyMeters::open(&EnergyConfig::default());
        for line in meters.status() {
            println!("this host: {line}");
        }
        let _ = meters.sample();
    }

    #[test]
    fn round_to_u64_saturates() {
        assert_eq!(round_to_u64(-3.0), 0);
        assert_eq!(round_to_u64(f64::NAN), 0);
        assert_eq!(round_to_u64(2.5), 3);
        assert_eq!(round_to_u64(1e30), u64::MAX);
    }
}
