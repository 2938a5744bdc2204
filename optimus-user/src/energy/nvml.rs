//! NVIDIA GPUs through NVML (nvml-wrapper 0.13, which `dlopen`s `libnvidia-ml.so.1` and
//! resolves each symbol when first used).
//!
//! Per GPU (`gpu-<index>`, NVML's index):
//!
//! - energy: `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver loaded, Volta and
//!   newer) where supported; otherwise `nvmlDeviceGetPowerUsage` (mW, averaged by the driver
//!   over about a second) integrated over the interval with the trapezoid rule;
//! - processes: `nvmlDeviceGetComputeRunningProcesses_v3` (which host pids hold a compute
//!   context) joined with `nvmlDeviceGetProcessUtilization` (their SM utilisation since the
//!   previous sample), so attribution can charge a VM's QEMU (GPU passthrough is invisible
//!   here: a passed-through GPU belongs to the guest's driver and NVML on the host does not
//!   see it) or a host process;
//! - vGPU: with NVIDIA vGPU host drivers, each active vGPU instance
//!   (`nvmlDeviceGetActiveVgpus`) is listed with its VM id (`nvmlVgpuInstanceGetVmID`: on
//!   KVM the VM's UUID), its mdev UUID (`nvmlVgpuInstanceGetMdevUUID`), and its SM
//!   utilisation (`nvmlDeviceGetVgpuUtilization`, averaged over the samples since the
//!   previous call). Guests' work does not show as host processes there, so this is how a
//!   vGPU VM is charged (`attribution::vgpu` matches the instance to its VM). Drivers without
//!   vGPU say "not supported", which is silent. nvml-wrapper's `Device::active_vgpus` hides
//!   the instance ids that the utilisation samples are keyed by, and it has no call for vGPU
//!   utilisation, so those two go through its raw `nvml-wrapper-sys` function table (the same
//!   loaded library); VM id and mdev UUID go through its `VgpuInstance`.
//!
//! No NVML library (no NVIDIA driver): one info line, no GPU source; nothing else changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::vgpu::VgpuInstance;
use nvml_wrapper::{Device, Nvml};

use super::{
    counter_delta, describe, CounterStep, EnergyError, GpuProcess, GpuVgpu, MeterSource,
    MeterState, MeterStatus, Zone, ZoneKey, ZoneReading,
};

/// Whether and from where to load NVML.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NvmlConfig {
    /// Do not look for GPUs.
    Disabled,
    /// The system's `libnvidia-ml.so.1`.
    #[default]
    Default,
    /// A given `libnvidia-ml.so` (a driver outside the loader path; tests' fake library).
    LibPath(PathBuf),
}

/// The library name nvml-wrapper loads by default.
const DEFAULT_LIB: &str = "libnvidia-ml.so.1";

// NVML return codes (nvml.h) for the two raw calls.
const NVML_SUCCESS: u32 = 0;
const NVML_ERROR_NOT_FOUND: u32 = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: u32 = 7;
// nvmlValueType_t
const NVML_VALUE_TYPE_DOUBLE: u32 = 0;
const NVML_VALUE_TYPE_UNSIGNED_INT: u32 = 1;
const NVML_VALUE_TYPE_UNSIGNED_LONG: u32 = 2;
const NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: u32 = 3;

/// Most vGPU instances read per GPU (the largest NVIDIA profiles split a GPU 32 ways).
const MAX_VGPUS: usize = 256;

/// `nvmlVgpuInstanceUtilizationSample_t`: the four `nvmlValue_t` unions (8 bytes, 8-aligned)
/// are held as their raw bits and decoded by the sample value type.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct VgpuUtilizationSample {
    vgpu_instance: u32,
    time_stamp: u64,
    sm_util: u64,
    mem_util: u64,
    enc_util: u64,
    dec_util: u64,
}

const _: () = assert!(std::mem::size_of::<VgpuUtilizationSample>() == 48);

/// An `nvmlValue_t` of the given type, as a whole percentage.
fn value_percent(bits: u64, value_type: u32) -> Option<u32> {
    let bytes = bits.to_ne_bytes();
    let low = [bytes[0], bytes[1], bytes[2], bytes[3]];
    match value_type {
        NVML_VALUE_TYPE_DOUBLE => {
            let v = f64::from_bits(bits);
            (v.is_finite() && v >= 0.0)
                .then(|| u32::try_from(super::round_to_u64(v)).unwrap_or(u32::MAX))
        }
        NVML_VALUE_TYPE_UNSIGNED_INT => Some(u32::from_ne_bytes(low)),
        NVML_VALUE_TYPE_UNSIGNED_LONG | NVML_VALUE_TYPE_UNSIGNED_LONG_LONG => {
            Some(u32::try_from(bits).unwrap_or(u32::MAX))
        }
        _ => None,
    }
}

/// How a GPU's energy is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GpuMode {
    /// Not decided yet (first successful read decides).
    Unknown,
    /// `nvmlDeviceGetTotalEnergyConsumption`.
    Counter,
    /// `nvmlDeviceGetPowerUsage`, integrated.
    Power,
}

/// Energy of a power reading that went linearly from `p0_mw` to `p1_mw` over `dt`, in µJ.
fn trapezoid_uj(p0_mw: u32, p1_mw: u32, dt: Duration) -> u64 {
    // mW × ns = 1e-12 J = 1e-6 µJ; halve for the trapezoid's mean.
    let uj = (u128::from(p0_mw) + u128::from(p1_mw)) * dt.as_nanos() / 2_000_000;
    u64::try_from(uj).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct Gpu {
    index: u32,
    key: ZoneKey,
    mode: GpuMode,
    prev_mj: Option<u64>,
    prev_power: Option<(Instant, u32)>,
    total_uj: u64,
    last_process_ts: Option<u64>,
    last_vgpu_ts: u64,
    failing: bool,
}

impl Gpu {
    fn new(index: u32) -> Self {
        Self {
            index,
            key: ZoneKey::new(Zone::Gpu, format!("gpu-{index}"), MeterSource::Nvml),
            mode: GpuMode::Unknown,
            prev_mj: None,
            prev_power: None,
            total_uj: 0,
            last_process_ts: None,
            last_vgpu_ts: 0,
            failing: false,
        }
    }

    fn nvml_error(&self, op: &str, source: NvmlError) -> EnergyError {
        EnergyError::Nvml {
            op: format!("{op} on {}", self.key.device),
            source,
        }
    }

    /// This interval's energy in µJ (`None` on the first reading), or the failure.
    fn energy(&mut self, device: &Device<'_>, now: Instant) -> Result<Option<u64>, EnergyError> {
        if self.mode != GpuMode::Power {
            match device.total_energy_consumption() {
                Ok(mj) => {
                    self.mode = GpuMode::Counter;
                    let delta = self.prev_mj.map(|prev| {
                        if mj < prev {
                            // A 64-bit mJ counter does not wrap; going down is a driver reload,
                            // which restarts it at 0: what it shows now is certain.
                            log::info!(
                                "nvml: {} energy counter restarted (driver reload)",
                                self.key.device
                            );
                            mj.saturating_mul(1000)
                        } else {
                            match counter_delta(prev, mj, u64::MAX, u64::MAX) {
                                CounterStep::Energy { delta, .. }
                                | CounterStep::Glitch { delta } => delta.saturating_mul(1000),
                            }
                        }
                    });
                    self.prev_mj = Some(mj);
                    return Ok(delta);
                }
                Err(NvmlError::NotSupported) if self.mode == GpuMode::Unknown => {
                    log::info!(
                        "nvml: {} has no energy counter (before Volta): integrating its power readings",
                        self.key.device
                    );
                    self.mode = GpuMode::Power;
                }
                Err(e) => return Err(self.nvml_error("nvmlDeviceGetTotalEnergyConsumption", e)),
            }
        }
        let mw = device
            .power_usage()
            .map_err(|e| self.nvml_error("nvmlDeviceGetPowerUsage", e))?;
        let delta = self
            .prev_power
            .map(|(then, p0)| trapezoid_uj(p0, mw, now.saturating_duration_since(then)));
        self.prev_power = Some((now, mw));
        Ok(delta)
    }

    fn sample(&mut self, device: Result<Device<'_>, NvmlError>, now: Instant) -> ZoneReading {
        let result = device
            .map_err(|e| self.nvml_error("nvmlDeviceGetHandleByIndex_v2", e))
            .and_then(|d| self.energy(&d, now));
        match result {
            Ok(delta) => {
                if self.failing {
                    log::info!(
                        "nvml: {} readable again; its total continues",
                        self.key.device
                    );
                    self.failing = false;
                }
                if let Some(d) = delta {
                    self.total_uj = self.total_uj.saturating_add(d);
                }
                ZoneReading {
                    key: self.key.clone(),
                    total_uj: Some(self.total_uj),
                    delta_uj: delta,
                    wraps: 0,
                    glitches: 0,
                }
            }
            Err(err) => {
                if !self.failing {
                    self.failing = true;
                    log::warn!(
                        "nvml: {}: {} reported unavailable",
                        describe(&err),
                        self.key.device
                    );
                }
                self.prev_mj = None;
                self.prev_power = None;
                ZoneReading {
                    key: self.key.clone(),
                    total_uj: None,
                    delta_uj: None,
                    wraps: 0,
                    glitches: 0,
                }
            }
        }
    }

    /// Compute processes and their SM utilisation since the previous call.
    fn processes(&mut self, device: &Device<'_>) -> Vec<GpuProcess> {
        let mut util: BTreeMap<u32, (u64, u64)> = BTreeMap::new(); // pid -> (sum, samples)
        match device.process_utilization_stats(self.last_process_ts) {
            Ok(samples) => {
                for s in samples {
                    let entry = util.entry(s.pid).or_default();
                    entry.0 += u64::from(s.sm_util);
                    entry.1 += 1;
                    self.last_process_ts = Some(self.last_process_ts.unwrap_or(0).max(s.timestamp));
                }
            }
            // NOT_FOUND: no sample since the last timestamp.
            Err(NvmlError::NotFound | NvmlError::NotSupported) => {}
            Err(e) => log::debug!(
                "nvml: {}",
                describe(&self.nvml_error("nvmlDeviceGetProcessUtilization", e))
            ),
        }
        let mut pids: Vec<u32> = match device.running_compute_processes() {
            Ok(list) => list.into_iter().map(|p| p.pid).collect(),
            Err(e) => {
                log::debug!(
                    "nvml: {}",
                    describe(&self.nvml_error("nvmlDeviceGetComputeRunningProcesses_v3", e))
                );
                Vec::new()
            }
        };
        pids.extend(util.keys().copied());
        pids.sort_unstable();
        pids.dedup();
        pids.into_iter()
            .map(|pid| GpuProcess {
                device: self.key.device.clone(),
                pid,
                sm_util_percent: util.get(&pid).map_or(0, |&(sum, n)| {
                    u32::try_from(sum / n.max(1)).unwrap_or(u32::MAX)
                }),
            })
            .collect()
    }

    /// Active vGPU instances with their VM and utilisation (empty where not supported).
    fn vgpus(&mut self, nvml: &Nvml, device: &Device<'_>) -> Vec<GpuVgpu> {
        let ids = match active_vgpu_ids(nvml, device) {
            Ok(ids) => ids,
            Err(code) => {
                log::trace!(
                    "nvml: {} nvmlDeviceGetActiveVgpus returned {code}",
                    self.key.device
                );
                return Vec::new();
            }
        };
        if ids.is_empty() {
            return Vec::new();
        }
        let util = match vgpu_utilization(nvml, device, self.last_vgpu_ts, ids.len()) {
            Ok(samples) => samples,
            Err(code) => {
                log::trace!(
                    "nvml: {} nvmlDeviceGetVgpuUtilization returned {code}",
                    self.key.device
                );
                Vec::new()
            }
        };
        // instance -> (sum, samples): NVML gives one sample per instance, averaged here in
        // case a driver gives several since `last_vgpu_ts`.
        let mut sm: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for (instance, ts, percent) in util {
            self.last_vgpu_ts = self.last_vgpu_ts.max(ts);
            if let Some(p) = percent {
                let entry = sm.entry(instance).or_default();
                entry.0 += u64::from(p);
                entry.1 += 1;
            }
        }
        ids.into_iter()
            .map(|id| {
                let instance = VgpuInstance::new(id, device);
                let vm_id = instance.vm_id().ok().map(|vm| match vm {
                    nvml_wrapper::enum_wrappers::vgpu::VmId::Domain(d) => d,
                    nvml_wrapper::enum_wrappers::vgpu::VmId::Uuid(u) => u,
                });
                GpuVgpu {
                    device: self.key.device.clone(),
                    instance: id,
                    vm_id,
                    mdev_uuid: instance.mdev_uuid().ok(),
                    sm_util_percent: sm
                        .get(&id)
                        .map(|&(sum, n)| u32::try_from(sum / n.max(1)).unwrap_or(u32::MAX)),
                }
            })
            .collect()
    }
}

/// Raw `nvmlDeviceGetActiveVgpus` (the wrapper hides instance ids). Err: the NVML code.
fn active_vgpu_ids(nvml: &Nvml, device: &Device<'_>) -> Result<Vec<u32>, u32> {
    let Ok(sym) = nvml.lib().nvmlDeviceGetActiveVgpus.as_ref() else {
        return Ok(Vec::new());
    };
    let mut count: u32 = 0;
    // SAFETY: `sym` is nvmlDeviceGetActiveVgpus from the loaded library, called with a valid
    // device handle from the same library, a valid `count` and a null array, which asks for
    // the count only (documented NVML usage).
    let code = unsafe { sym(device.handle(), &mut count, std::ptr::null_mut()) };
    match code {
        NVML_SUCCESS if count == 0 => return Ok(Vec::new()),
        NVML_SUCCESS | NVML_ERROR_INSUFFICIENT_SIZE => {}
        other => return Err(other),
    }
    let mut ids = vec![0u32; usize::try_from(count).unwrap_or(0).min(MAX_VGPUS)];
    let mut count = u32::try_from(ids.len()).unwrap_or(0);
    // SAFETY: as above, with `ids` an array of `count` nvmlVgpuInstance_t (u32) that NVML
    // fills up to `count` entries and then sets `count` to the number written.
    let code = unsafe { sym(device.handle(), &mut count, ids.as_mut_ptr()) };
    if code != NVML_SUCCESS {
        return Err(code);
    }
    ids.truncate(usize::try_from(count).unwrap_or(0));
    Ok(ids)
}

/// Raw `nvmlDeviceGetVgpuUtilization`: `(instance, timestamp µs, SM %)` per vGPU sampled
/// since `last_seen`. Err: the NVML code.
fn vgpu_utilization(
    nvml: &Nvml,
    device: &Device<'_>,
    last_seen: u64,
    expected: usize,
) -> Result<Vec<(u32, u64, Option<u32>)>, u32> {
    let Ok(sym) = nvml.lib().nvmlDeviceGetVgpuUtilization.as_ref() else {
        return Ok(Vec::new());
    };
    let mut want = expected;
    // One retry with the size NVML asks for (an instance started since the listing).
    let (mut samples, count, value_type) = loop {
        let mut samples = vec![VgpuUtilizationSample::default(); want];
        let mut count = u32::try_from(samples.len()).unwrap_or(0);
        let mut value_type: u32 = 0;
        // SAFETY: `sym` is nvmlDeviceGetVgpuUtilization from the loaded library, called with
        // a valid device handle, valid out-pointers for the value type and count, and an
        // array of `count` samples laid out as nvmlVgpuInstanceUtilizationSample_t (48 bytes,
        // checked by the const assertion above); NVML writes at most `count` of them.
        let code = unsafe {
            sym(
                device.handle(),
                last_seen,
                std::ptr::from_mut(&mut value_type).cast(),
                &mut count,
                samples.as_mut_ptr().cast(),
            )
        };
        match code {
            NVML_SUCCESS => break (samples, count, value_type),
            NVML_ERROR_NOT_FOUND => return Ok(Vec::new()),
            NVML_ERROR_INSUFFICIENT_SIZE if want == expected => {
                // Bounded: NVML cannot host more instances than a u32 counts, and a GPU
                // hosts at most a few dozen.
                want = usize::try_from(count)
                    .unwrap_or(0)
                    .clamp(expected, MAX_VGPUS);
                if want == expected {
                    return Err(NVML_ERROR_INSUFFICIENT_SIZE);
                }
            }
            other => return Err(other),
        }
    };
    samples.truncate(usize::try_from(count).unwrap_or(0));
    Ok(samples
        .into_iter()
        .map(|s| {
            (
                s.vgpu_instance,
                s.time_stamp,
                value_percent(s.sm_util, value_type),
            )
        })
        .collect())
}

/// Output of one NVML sample.
#[derive(Debug, Default)]
pub(crate) struct GpuSample {
    pub(crate) zones: Vec<ZoneReading>,
    pub(crate) processes: Vec<GpuProcess>,
    pub(crate) vgpus: Vec<GpuVgpu>,
    /// Per device: SM and memory utilisation, percent (`nvmlDeviceGetUtilizationRates`).
    pub(crate) utilisation: BTreeMap<String, (u32, u32)>,
}

/// NVIDIA GPUs.
pub(crate) struct NvmlMeter {
    nvml: Nvml,
    gpus: Vec<Gpu>,
}

impl std::fmt::Debug for NvmlMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlMeter")
            .field("gpus", &self.gpus)
            .finish_non_exhaustive()
    }
}

impl NvmlMeter {
    /// Loads NVML, lists the GPUs and reads each once (the baseline).
    pub(crate) fn open(cfg: &NvmlConfig, now: Instant) -> (Option<NvmlMeter>, MeterStatus) {
        let status = |state, detail: String| MeterStatus::new(MeterSource::Nvml, state, detail);
        let (init, lib) = match cfg {
            NvmlConfig::Disabled => {
                return (
                    None,
                    status(
                        MeterState::Disabled,
                        "turned off by configuration".to_string(),
                    ),
                )
            }
            NvmlConfig::Default => (Nvml::init(), DEFAULT_LIB.to_string()),
            NvmlConfig::LibPath(path) => (
                Nvml::builder().lib_path(path.as_os_str()).init(),
                path.display().to_string(),
            ),
        };
        let nvml = match init {
            Ok(nvml) => nvml,
            Err(NvmlError::LibloadingError(e)) => {
                // dlerror's text names the library already.
                let detail = format!(
                    "no NVML library ({e}): no GPU energy; install the NVIDIA driver or point the \
                     NVML library path at libnvidia-ml.so"
                );
                log::info!("nvml: {detail}");
                return (None, status(MeterState::NotFound, detail));
            }
            Err(NvmlError::DriverNotLoaded) => {
                let detail =
                    format!("{lib} loaded but the NVIDIA kernel driver is not: no GPU energy");
                log::info!("nvml: {detail}");
                return (None, status(MeterState::NotFound, detail));
            }
            Err(NvmlError::NoPermission) => {
                let detail = format!(
                    "{lib}: no permission to talk to the NVIDIA driver; run optimus as root or give \
                     it access to /dev/nvidia*"
                );
                log::warn!("nvml: {detail}");
                return (None, status(MeterState::NotPermitted, detail));
            }
            Err(e) => {
                let err = EnergyError::Nvml {
                    op: format!("nvmlInit_v2 ({lib})"),
                    source: e,
                };
                log::warn!("nvml: {}", describe(&err));
                return (None, status(MeterState::Failed, describe(&err)));
            }
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                let err = EnergyError::Nvml {
                    op: "nvmlDeviceGetCount_v2".to_string(),
                    source: e,
                };
                return (None, status(MeterState::Failed, describe(&err)));
            }
        };
        if count == 0 {
            return (
                None,
                status(MeterState::NotFound, format!("{lib}: no NVIDIA GPU")),
            );
        }
        let mut meter = NvmlMeter {
            gpus: (0..count).map(Gpu::new).collect(),
            nvml,
        };
        meter.sample(now);
        let described = meter
            .gpus
            .iter()
            .map(|gpu| {
                let name = meter
                    .nvml
                    .device_by_index(gpu.index)
                    .and_then(|d| d.name())
                    .unwrap_or_else(|_| "unnamed".to_string());
                let how = match gpu.mode {
                    GpuMode::Counter => "energy counter",
                    GpuMode::Power => "power integrated",
                    GpuMode::Unknown => "unreadable",
                };
                format!("{} {name} ({how})", gpu.key.device)
            })
            .collect::<Vec<_>>()
            .join(", ");
        (
            Some(meter),
            status(MeterState::Active, format!("{count} GPU(s): {described}")),
        )
    }

    /// Reads every GPU's energy, processes and vGPUs once.
    pub(crate) fn sample(&mut self, now: Instant) -> GpuSample {
        let mut out = GpuSample::default();
        for gpu in &mut self.gpus {
            let device = self.nvml.device_by_index(gpu.index);
            if let Ok(d) = &device {
                out.processes.extend(gpu.processes(d));
                out.vgpus.extend(gpu.vgpus(&self.nvml, d));
                // Where the driver lacks it, the GPU has no model features (not zeros).
                if let Ok(u) = d.utilization_rates() {
                    out.utilisation
                        .insert(gpu.key.device.clone(), (u.gpu.min(100), u.memory.min(100)));
                }
            }
            out.zones.push(gpu.sample(device, now));
        }
        out
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
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn trapezoid_arithmetic() {
        // 100 W then 120 W over 2 s: 220 J.
        assert_eq!(
            trapezoid_uj(100_000, 120_000, Duration::from_secs(2)),
            220_000_000
        );
        assert_eq!(trapezoid_uj(1, 1, Duration::from_nanos(1)), 0);
        assert_eq!(trapezoid_uj(250, 250, Duration::from_millis(500)), 125_000);
    }

    #[test]
    fn nvml_values_decode_by_type() {
        // A C union holding an unsigned int: its 4 bytes first, the rest zero.
        let mut union = [0u8; 8];
        union[..4].copy_from_slice(&40u32.to_ne_bytes());
        assert_eq!(
            value_percent(u64::from_ne_bytes(union), NVML_VALUE_TYPE_UNSIGNED_INT),
            Some(40)
        );
        assert_eq!(
            value_percent(12.6f64.to_bits(), NVML_VALUE_TYPE_DOUBLE),
            Some(13)
        );
        assert_eq!(
            value_percent(7, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG),
            Some(7)
        );
        assert_eq!(value_percent(7, 99), None);
    }

    #[test]
    fn missing_library_is_not_found_and_nothing_else_breaks() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = NvmlConfig::LibPath(tmp.path().join("libnvidia-ml.so"));
        let (meter, status) = NvmlMeter::open(&cfg, Instant::now());
        assert!(meter.is_none());
        assert_eq!(status.state, MeterState::NotFound, "{status}");
        assert!(status.detail.contains("no NVML library"), "{status}");
        let (meter, status) = NvmlMeter::open(&NvmlConfig::Disabled, Instant::now());
        assert!(meter.is_none());
        assert_eq!(status.state, MeterState::Disabled);
    }

    /// Builds `tests/fixtures/fake-nvml/fake_nvml.c` into a fresh `libnvidia-ml.so` (each test
    /// gets its own copy, so its own counters).
    fn build_fake_nvml(dir: &Path) -> PathBuf {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fake-nvml/fake_nvml.c");
        let lib = dir.join("libnvidia-ml.so");
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .expect("cc runs");
        assert!(
            out.status.success(),
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lib
    }

    fn zone<'a>(zones: &'a [ZoneReading], device: &str) -> &'a ZoneReading {
        zones.iter().find(|z| z.key.device == device).unwrap()
    }

    #[test]
    fn fake_nvml_library_energy_counter() {
        println!("fake_nvml_library_energy_counter: FAKE libnvidia-ml.so built from fake_nvml.c, no GPU on this host");
        let tmp = tempfile::tempdir().unwrap();
        let lib = build_fake_nvml(tmp.path());
        let t0 = Instant::now();
        let (meter, status) = NvmlMeter::open(&NvmlConfig::LibPath(lib), t0);
        let mut meter = meter.unwrap();
        assert_eq!(status.state, MeterState::Active, "{status}");
        assert_eq!(
            status.detail,
            "2 GPU(s): gpu-0 Fake GPU 0 (energy counter), gpu-1 Fake GPU 1 (power integrated)"
        );
        // gpu-0's counter advances 5_000 mJ per read.
        let s = meter.sample(t0 + Duration::from_secs(1));
        let g0 = zone(&s.zones, "gpu-0");
        assert_eq!(g0.key, ZoneKey::new(Zone::Gpu, "gpu-0", MeterSource::Nvml));
        assert_eq!(
            (g0.delta_uj, g0.total_uj, g0.wraps),
            (Some(5_000_000), Some(5_000_000), 0)
        );
        let s = meter.sample(t0 + Duration::from_secs(2));
        let g0 = zone(&s.zones, "gpu-0");
        assert_eq!(
            (g0.delta_uj, g0.total_uj),
            (Some(5_000_000), Some(10_000_000))
        );
    }

    #[test]
    fn fake_nvml_library_power_integration_without_energy_counter() {
        println!("fake_nvml_library_power_integration_without_energy_counter: FAKE libnvidia-ml.so, no GPU on this host");
        let tmp = tempfile::tempdir().unwrap();
        let lib = build_fake_nvml(tmp.path());
        let t0 = Instant::now();
        // gpu-1 answers NOT_SUPPORTED for the energy counter; its power reads 100 W, then
        // +20 W per read.
        let (meter, _) = NvmlMeter::open(&NvmlConfig::LibPath(lib), t0);
        let mut meter = meter.unwrap();
        let s = meter.sample(t0 + Duration::from_secs(2));
        let g1 = zone(&s.zones, "gpu-1");
        // (100 W + 120 W) / 2 × 2 s = 220 J
        assert_eq!(
            (g1.delta_uj, g1.total_uj),
            (Some(220_000_000), Some(220_000_000))
        );
        let s = meter.sample(t0 + Duration::from_millis(2500));
        let g1 = zone(&s.zones, "gpu-1");
        // (120 W + 140 W) / 2 × 0.5 s = 65 J
        assert_eq!(
            (g1.delta_uj, g1.total_uj),
            (Some(65_000_000), Some(285_000_000))
        );
    }

    #[test]
    fn fake_nvml_library_processes_and_vgpus() {
        println!(
            "fake_nvml_library_processes_and_vgpus: FAKE libnvidia-ml.so, no GPU on this host"
        );
        let tmp = tempfile::tempdir().unwrap();
        let lib = build_fake_nvml(tmp.path());
        let t0 = Instant::now();
        let (meter, _) = NvmlMeter::open(&NvmlConfig::LibPath(lib), t0);
        let mut meter = meter.unwrap();
        let s = meter.sample(t0 + Duration::from_secs(1));
        // gpu-0: QEMU pid 4242 at 70 % SM, host pid 4343 listed with no utilisation sample
        // (0 %), pid 5151 with a sample but no compute context (a graphics client).
        assert_eq!(
            s.processes,
            vec![
                GpuProcess {
                    device: "gpu-0".into(),
                    pid: 4242,
                    sm_util_percent: 70
                },
                GpuProcess {
                    device: "gpu-0".into(),
                    pid: 4343,
                    sm_util_percent: 0
                },
                GpuProcess {
                    device: "gpu-0".into(),
                    pid: 5151,
                    sm_util_percent: 15
                },
            ]
        );
        // gpu-1 hosts one vGPU for libvirt domain 7.
        assert_eq!(
            s.vgpus,
            vec![GpuVgpu {
                device: "gpu-1".into(),
                instance: 11,
                vm_id: Some("7".into()),
                mdev_uuid: Some("4b20d080-1b54-4048-85b3-a6a62d165c01".into()),
                sm_util_percent: Some(40),
            }]
        );
    }

    #[test]
    fn fake_nvml_vgpus_from_config_file() {
        println!("fake_nvml_vgpus_from_config_file: FAKE libnvidia-ml.so, no GPU on this host");
        let tmp = tempfile::tempdir().unwrap();
        let lib = build_fake_nvml(tmp.path());
        std::fs::write(
            tmp.path().join("fake_nvml.conf"),
            "# two instances on gpu-1, one on gpu-0\n\
             vgpu 1 21 uuid 3F6B2C1D-8E9A-4B5C-A1D2-E3F4A5B6C7D8 - 50\n\
             \n\
             vgpu 1 22 domain web b1ae8bf6-38b0-4c81-9d44-78ce3f520496 25 # trailing\n\
             vgpu 0 30 uuid 00000000-0000-4000-8000-0000000000ff - 0\n\
             processes off\n",
        )
        .unwrap();
        let t0 = Instant::now();
        let (meter, status) = NvmlMeter::open(&NvmlConfig::LibPath(lib), t0);
        assert_eq!(status.state, MeterState::Active, "{status}");
        let s = meter.unwrap().sample(t0 + Duration::from_secs(1));
        assert_eq!(s.processes, Vec::new());
        let v = |device: &str, instance, vm_id: &str, mdev: Option<&str>, sm| GpuVgpu {
            device: device.into(),
            instance,
            vm_id: Some(vm_id.into()),
            mdev_uuid: mdev.map(str::to_owned),
            sm_util_percent: Some(sm),
        };
        assert_eq!(
            s.vgpus,
            vec![
                v("gpu-0", 30, "00000000-0000-4000-8000-0000000000ff", None, 0),
                v(
                    "gpu-1",
                    21,
                    "3F6B2C1D-8E9A-4B5C-A1D2-E3F4A5B6C7D8",
                    None,
                    50
                ),
                v(
                    "gpu-1",
                    22,
                    "web",
                    Some("b1ae8bf6-38b0-4c81-9d44-78ce3f520496"),
                    25
                ),
            ]
        );
    }

    #[test]
    fn fake_nvml_bad_config_fails_loudly() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = build_fake_nvml(tmp.path());
        std::fs::write(tmp.path().join("fake_nvml.conf"), "vgpu 1 21 uuid\n").unwrap();
        let (meter, status) = NvmlMeter::open(&NvmlConfig::LibPath(lib), Instant::now());
        assert!(meter.is_none());
        assert_eq!(status.state, MeterState::Failed, "{status}");
    }
}
