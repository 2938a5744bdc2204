//! RAPL through the perf `power` PMU.
//!
//! The PMU describes itself in sysfs (kernel `arch/x86/events/rapl.c`,
//! `Documentation/ABI/testing/sysfs-bus-event_source-devices-events`):
//!
//! - `<perf_root>/power/type`: the PMU number for `perf_event_attr.type`;
//! - `events/energy-pkg`: the event term, `event=0x02` (`format/event` is `config:0-7`, so the
//!   event number is the attr's `config`);
//! - `events/energy-pkg.scale`: joules per count, `2.3283064365386962890625e-10` (2^-32);
//! - `events/energy-pkg.unit`: `Joules`;
//! - `cpumask`: one CPU per package (`0,24`), the CPU to open the package's events on.
//!
//! Events are opened in counting mode (no sampling, no `exclude_*` bits, which the PMU
//! rejects) with `pid = -1` and one CPU per package. The kernel accumulates the 32-bit MSR into
//! a 64-bit count, so this source does not wrap in practice (2^64 counts are 2^32 J, about eight
//! months of a 200 W package); the delta still goes through [`counter_delta`] for the one
//! case where it does. Opening needs root, `CAP_PERFMON`, or `kernel.perf_event_paranoid <= 0`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::{
    counter_delta, cpu_packages, describe, read_text, read_u64, round_to_u64, CounterStep,
    EnergyError, MeterSource, MeterState, MeterStatus, ReadFn, Zone, ZoneKey, ZoneReading,
};

/// One energy event of the power PMU.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PmuEvent {
    /// `energy-pkg`, `energy-ram`, ...
    pub(crate) name: String,
    pub(crate) zone: Zone,
    /// `perf_event_attr.config`.
    pub(crate) config: u64,
    /// Joules per count.
    pub(crate) scale: f64,
}

/// The power PMU's sysfs description.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PowerPmu {
    /// `perf_event_attr.type`.
    pub(crate) pmu_type: u32,
    pub(crate) events: Vec<PmuEvent>,
    /// One CPU per package, from `cpumask`, when the file exists.
    pub(crate) cpumask: Option<Vec<u32>>,
}

/// Which zone a power PMU event meters (`energy-gpu` is RAPL PP1, powercap's `uncore`).
fn event_zone(name: &str) -> Option<Zone> {
    match name {
        "energy-pkg" => Some(Zone::Package),
        "energy-cores" => Some(Zone::Core),
        "energy-gpu" => Some(Zone::Uncore),
        "energy-ram" => Some(Zone::Dram),
        "energy-psys" => Some(Zone::Psys),
        _ => None,
    }
}

/// `event=0x02` → 2. Only the `event` term is understood (the power PMU has no other).
pub(crate) fn parse_event_term(text: &str) -> Option<u64> {
    let mut config = None;
    for term in text.trim().split(',') {
        let (key, value) = term.split_once('=')?;
        if key.trim() != "event" {
            return None;
        }
        let value = value.trim();
        config = Some(match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok()?,
            None => value.parse().ok()?,
        });
    }
    config
}

/// CPU numbers a CPU list may name: the kernel's `CONFIG_NR_CPUS` is at most 8192 on
/// x86 (`MAXSMP`) and 4096 on arm64; twice that leaves room and bounds the list.
const MAX_CPUS: u32 = 16_384;

/// A kernel CPU list (`0,24`, `0-3,8`) → CPU numbers; `None` if malformed or naming more
/// CPUs, or higher ones, than any kernel has ([`MAX_CPUS`]).
pub(crate) fn parse_cpulist(text: &str) -> Option<Vec<u32>> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (lo, hi): (u32, u32) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                (cpu, cpu)
            }
        };
        // Found by fuzzing: `0-4294967295` asked for a 16 GiB list.
        let count = usize::try_from(hi.checked_sub(lo)?).ok()? + 1;
        if hi >= MAX_CPUS || cpus.len() + count > MAX_CPUS as usize {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    Some(cpus)
}

/// Reads `<dir>` (the `power` PMU directory). `Ok(None)` when the PMU does not exist.
pub(crate) fn parse_power_pmu(dir: &Path, read: ReadFn) -> Result<Option<PowerPmu>, EnergyError> {
    let type_path = dir.join("type");
    let pmu_type = match read_u64(read, &type_path) {
        Ok(t) => u32::try_from(t).map_err(|_| EnergyError::Parse {
            path: type_path.clone(),
            content: t.to_string(),
        })?,
        Err(err) if err.io_kind() == Some(io::ErrorKind::NotFound) => return Ok(None),
        Err(err) => return Err(err),
    };
    let events_dir = dir.join("events");
    let entries = std::fs::read_dir(&events_dir).map_err(|source| EnergyError::Io {
        op: "list",
        path: events_dir.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains('.'))
        .collect();
    names.sort();
    let mut events = Vec::new();
    for name in names {
        let Some(zone) = event_zone(&name) else {
            log::debug!("rapl-perf: event power/{name}/ is not metered");
            continue;
        };
        let path = events_dir.join(&name);
        let term = read_text(read, &path)?;
        let config = parse_event_term(&term).ok_or_else(|| EnergyError::Parse {
            path: path.clone(),
            content: term.chars().take(64).collect(),
        })?;
        let scale_path = events_dir.join(format!("{name}.scale"));
        let scale_text = read_text(read, &scale_path)?;
        let scale = scale_text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| EnergyError::Parse {
                path: scale_path.clone(),
                content: scale_text.chars().take(64).collect(),
            })?;
        let unit_path = events_dir.join(format!("{name}.unit"));
        let unit = read_text(read, &unit_path)?;
        if unit.trim() != "Joules" {
            log::warn!(
                "rapl-perf: {} says {:?}, expected \"Joules\": event power/{name}/ skipped",
                unit_path.display(),
                unit.trim()
            );
            continue;
        }
        events.push(PmuEvent {
            name,
            zone,
            config,
            scale,
        });
    }
    let cpumask = match read_text(read, &dir.join("cpumask")) {
        Ok(text) => parse_cpulist(&text),
        Err(_) => None,
    };
    Ok(Some(PowerPmu {
        pmu_type,
        events,
        cpumask,
    }))
}

/// One CPU per package to open package-scope events on: `(package label, cpu)` in package
/// order. From the PMU's `cpumask` where it has one, else the first CPU of each package in
/// `<sys>/devices/system/cpu`.
pub(crate) fn package_cpus(
    sys_root: &Path,
    cpumask: Option<&[u32]>,
    read: ReadFn,
) -> Vec<(String, u32)> {
    let cpus: Vec<u32> = match cpumask {
        Some(mask) => mask.to_vec(),
        None => online_cpus(sys_root),
    };
    let mut first: BTreeMap<u32, u32> = BTreeMap::new();
    for (cpu, package) in cpu_packages(sys_root, &cpus, read) {
        first.entry(package).or_insert(cpu);
    }
    if first.is_empty() {
        first.insert(0, 0);
    }
    first
        .into_iter()
        .map(|(package, cpu)| (format!("package-{package}"), cpu))
        .collect()
}

/// `cpu<N>` directories under `<sys>/devices/system/cpu`, sorted.
fn online_cpus(sys_root: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(sys_root.join("devices/system/cpu")) else {
        return Vec::new();
    };
    let mut cpus: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("cpu")?.parse().ok())
        .collect();
    cpus.sort_unstable();
    cpus
}

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER0` (64 bytes), which every kernel with
/// perf accepts; the fields after `flags` are unused in counting mode.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// `disabled`, `inherit`, `exclude_*` ... bits: all 0 (enabled at once, no filters).
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_ATTR_SIZE_VER0: u32 = 64;
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER0 as usize);
/// `include/uapi/linux/perf_event.h`; not in the libc crate.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// `perf_event_open(attr, pid = -1, cpu, group_fd = -1, FD_CLOEXEC)` for a counting event.
fn perf_event_open(pmu_type: u32, config: u64, cpu: u32) -> io::Result<File> {
    let attr = PerfEventAttr {
        type_: pmu_type,
        size: PERF_ATTR_SIZE_VER0,
        config,
        ..PerfEventAttr::default()
    };
    let cpu = libc::c_long::from(
        i32::try_from(cpu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    );
    let pid: libc::c_long = -1;
    let group_fd: libc::c_long = -1;
    // SAFETY: `attr` is a fully initialised #[repr(C)] perf_event_attr whose `size` field says
    // how many bytes the kernel may read (its exact size); it lives until the call returns. The
    // other arguments are plain integers. The call creates a new fd or returns -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_ref(&attr),
            pid,
            cpu,
            group_fd,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the syscall succeeded, so `fd` is a new open descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(File::from(owned))
}

/// Reads a counting event's 64-bit value (read_format 0: just the count).
fn read_count(file: &File) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    (&*file).read_exact(&mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// One open power event on one package.
#[derive(Debug)]
struct PerfCounter {
    key: ZoneKey,
    event: String,
    cpu: u32,
    file: File,
    /// Microjoules per count (`scale` × 10^6).
    uj_per_count: f64,
    prev: Option<u64>,
    /// Counts since open, wrap-corrected; u128 so that it cannot overflow.
    counts: u128,
    total_uj: u64,
    wraps: u64,
    failing: bool,
}

impl PerfCounter {
    fn sample(&mut self) -> ZoneReading {
        match read_count(&self.file) {
            Ok(now) => {
                self.failing = false;
                let delta = self.prev.map(|prev| {
                    // 64-bit counts of a scale read at open: no plausibility bound here.
                    let (d, wrapped) = match counter_delta(prev, now, u64::MAX, u64::MAX) {
                        CounterStep::Energy { delta, wrapped } => (delta, wrapped),
                        CounterStep::Glitch { delta } => (delta, false),
                    };
                    if wrapped {
                        self.wraps += 1;
                    }
                    self.counts += u128::from(d);
                    // Totals come from the count, converted once each time, so deltas of
                    // consecutive totals never drift from the counter through rounding.
                    let total = round_to_u64(self.counts as f64 * self.uj_per_count);
                    let delta = total.saturating_sub(self.total_uj);
                    self.total_uj = self.total_uj.max(total);
                    delta
                });
                self.prev = Some(now);
                ZoneReading {
                    key: self.key.clone(),
                    total_uj: Some(self.total_uj),
                    delta_uj: delta,
                    wraps: self.wraps,
                    glitches: 0,
                }
            }
            Err(source) => {
                if !self.failing {
                    self.failing = true;
                    let err = EnergyError::PerfRead {
                        event: self.event.clone(),
                        cpu: self.cpu,
                        source,
                    };
                    log::warn!(
                        "rapl-perf: {}: {} {} reported unavailable",
                        describe(&err),
                        self.key.device,
                        self.key.zone
                    );
                }
                self.prev = None;
                ZoneReading {
                    key: self.key.clone(),
                    total_uj: None,
                    delta_uj: None,
                    wraps: self.wraps,
                    glitches: 0,
                }
            }
        }
    }
}

/// RAPL energy through the perf power PMU.
#[derive(Debug)]
pub(crate) struct PerfMeter {
    counters: Vec<PerfCounter>,
}

const PERMISSION_FIX: &str = "run optimus as root, or give it CAP_PERFMON \
    (`setcap cap_perfmon+ep`), or allow it for all users with `sysctl kernel.perf_event_paranoid=0`";

impl PerfMeter {
    /// Opens every energy event on one CPU per package (psys once) and reads each once.
    pub(crate) fn open(
        perf_root: &Path,
        sys_root: &Path,
        read: ReadFn,
    ) -> (Option<PerfMeter>, MeterStatus) {
        let status = |state, detail: String| MeterStatus::new(MeterSource::RaplPerf, state, detail);
        let dir = perf_root.join("power");
        let pmu = match parse_power_pmu(&dir, read) {
            Ok(Some(pmu)) if !pmu.events.is_empty() => pmu,
            Ok(_) => {
                let detail = format!(
                    "no perf power PMU with energy events at {} (no RAPL on this CPU, e.g. in a VM, \
                     or a kernel without CONFIG_PERF_EVENTS_INTEL_RAPL)",
                    dir.display()
                );
                return (None, status(MeterState::NotFound, detail));
            }
            Err(err) => return (None, status(MeterState::Failed, describe(&err))),
        };
        let mut counters = Vec::new();
        let mut errors = Vec::new();
        for (rank, (device, cpu)) in package_cpus(sys_root, pmu.cpumask.as_deref(), read)
            .into_iter()
            .enumerate()
        {
            for event in &pmu.events {
                // psys is platform-wide: read it once, on the first package's CPU.
                let device = match event.zone {
                    Zone::Psys if rank > 0 => continue,
                    Zone::Psys => "platform-0".to_string(),
                    _ => device.clone(),
                };
                match perf_event_open(pmu.pmu_type, event.config, cpu) {
                    Ok(file) => counters.push(PerfCounter {
                        key: ZoneKey::new(event.zone, device, MeterSource::RaplPerf),
                        event: event.name.clone(),
                        cpu,
                        file,
                        uj_per_count: event.scale * 1e6,
                        prev: None,
                        counts: 0,
                        total_uj: 0,
                        wraps: 0,
                        failing: false,
                    }),
                    Err(source) => errors.push(EnergyError::PerfOpen {
                        event: event.name.clone(),
                        cpu,
                        source,
                    }),
                }
            }
        }
        let refused = errors.first().map(|e| {
            (
                describe(e),
                e.io_kind() == Some(io::ErrorKind::PermissionDenied),
            )
        });
        if counters.is_empty() {
            let (why, permission) =
                refused.unwrap_or_else(|| ("no event to open".to_string(), false));
            if permission {
                log::warn!("rapl-perf: {why}; fix: {PERMISSION_FIX}");
                return (
                    None,
                    status(
                        MeterState::NotPermitted,
                        format!("{why}; fix: {PERMISSION_FIX}"),
                    ),
                );
            }
            return (None, status(MeterState::Failed, why));
        }
        let mut meter = PerfMeter { counters };
        for counter in &mut meter.counters {
            counter.sample();
        }
        let names = meter
            .counters
            .iter()
            .map(|c| format!("{} {}", c.key.device, c.key.zone))
            .collect::<Vec<_>>()
            .join(", ");
        let mut detail = format!("{} counters: {names}", meter.counters.len());
        if let Some((why, _)) = refused {
            log::warn!("rapl-perf: {why}; that zone is not metered by perf");
            detail = format!(
                "{detail}; {} events could not be opened: {why}",
                errors.len()
            );
        }
        (Some(meter), status(MeterState::Active, detail))
    }

    /// Reads every counter once.
    pub(crate) fn sample(&mut self) -> Vec<ZoneReading> {
        self.counters.iter_mut().map(PerfCounter::sample).collect()
    }

    /// The (zone, device) pairs this meter reports, to keep powercap from reporting them too.
    pub(crate) fn covered(&self) -> HashSet<(Zone, String)> {
        self.counters
            .iter()
            .map(|c| (c.key.zone, c.key.device.clone()))
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
    use std::path::PathBuf;

    fn fs_read(path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn write(path: PathBuf, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// The power PMU as a two-socket Intel server's kernel describes it.
    fn power_pmu_fixture(root: &Path, pmu_type: &str) -> PathBuf {
        let dir = root.join("bus/event_source/devices/power");
        write(dir.join("type"), &format!("{pmu_type}\n"));
        write(dir.join("cpumask"), "0,24\n");
        write(dir.join("format/event"), "config:0-7\n");
        for (name, term) in [
            ("energy-cores", "event=0x01"),
            ("energy-pkg", "event=0x02"),
            ("energy-ram", "event=0x03"),
            ("energy-psys", "event=0x05"),
        ] {
            write(dir.join(format!("events/{name}")), &format!("{term}\n"));
            write(
                dir.join(format!("events/{name}.scale")),
                "2.3283064365386962890625e-10\n",
            );
            write(dir.join(format!("events/{name}.unit")), "Joules\n");
        }
        for (cpu, package) in [(0, 0), (1, 0), (24, 1), (25, 1)] {
            write(
                root.join(format!(
                    "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
                )),
                &format!("{package}\n"),
            );
        }
        dir
    }

    #[test]
    fn parses_power_pmu_sysfs_description() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = power_pmu_fixture(tmp.path(), "23");
        let pmu = parse_power_pmu(&dir, fs_read).unwrap().unwrap();
        assert_eq!(pmu.pmu_type, 23);
        assert_eq!(pmu.cpumask, Some(vec![0, 24]));
        let summary: Vec<(&str, Zone, u64)> = pmu
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.zone, e.config))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("energy-cores", Zone::Core, 1),
                ("energy-pkg", Zone::Package, 2),
                ("energy-psys", Zone::Psys, 5),
                ("energy-ram", Zone::Dram, 3),
            ]
        );
        // The kernel's decimal is exactly 2^-32 J per count.
        assert!(pmu.events.iter().all(|e| e.scale == 2f64.powi(-32)));
        // 2^32 counts are one joule.
        assert_eq!(
            round_to_u64(4_294_967_296.0 * pmu.events[1].scale * 1e6),
            1_000_000
        );
    }

    #[test]
    fn event_with_another_unit_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = power_pmu_fixture(tmp.path(), "23");
        write(dir.join("events/energy-ram.unit"), "Watts\n");
        let pmu = parse_power_pmu(&dir, fs_read).unwrap().unwrap();
        assert!(pmu.events.iter().all(|e| e.name != "energy-ram"));
        assert_eq!(pmu.events.len(), 3);
    }

    #[test]
    fn garbage_scale_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = power_pmu_fixture(tmp.path(), "23");
        write(dir.join("events/energy-pkg.scale"), "lots\n");
        let err = parse_power_pmu(&dir, fs_read).unwrap_err();
        assert!(err.to_string().contains("energy-pkg.scale"), "{err}");
    }

    #[test]
    fn event_terms_and_cpulists() {
        assert_eq!(parse_event_term("event=0x02\n"), Some(2));
        assert_eq!(parse_event_term("event=5"), Some(5));
        assert_eq!(parse_event_term("event=0x02,umask=0x1"), None);
        assert_eq!(parse_event_term("garbage"), None);
        assert_eq!(parse_cpulist("0,24\n"), Some(vec![0, 24]));
        assert_eq!(parse_cpulist("0-3,8"), Some(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpulist(""), None);
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("0-4294967295"), None);
        assert_eq!(parse_cpulist("16384"), None);
        assert_eq!(parse_cpulist(&["0-16383"; 2].join(",")), None);
        assert_eq!(parse_cpulist("0-16383").map(|c| c.len()), Some(16_384));
    }

    #[test]
    fn one_cpu_per_package_from_cpumask_or_topology() {
        let tmp = tempfile::tempdir().unwrap();
        power_pmu_fixture(tmp.path(), "23");
        let want = vec![("package-0".to_string(), 0), ("package-1".to_string(), 24)];
        assert_eq!(package_cpus(tmp.path(), Some(&[0, 24]), fs_read), want);
        // Without a cpumask: the first CPU of each package in sysfs.
        assert_eq!(package_cpus(tmp.path(), None, fs_read), want);
        // No topology at all (a container): one package on CPU 0.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            package_cpus(empty.path(), None, fs_read),
            vec![("package-0".to_string(), 0)]
        );
    }

    #[test]
    fn absent_power_pmu_is_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("bus/event_source/devices");
        assert_eq!(parse_power_pmu(&root.join("power"), fs_read).unwrap(), None);
        let (meter, status) = PerfMeter::open(&root, tmp.path(), fs_read);
        assert!(meter.is_none());
        assert_eq!(status.state, MeterState::NotFound, "{status}");
    }

    /// The syscall path runs for real: this host has no power PMU, so a fixture describing
    /// one with a PMU type the kernel does not have must fail to open cleanly (ENOENT, or
    /// EACCES/EPERM where perf is locked down), never panic or report a zone.
    #[test]
    fn perf_event_open_on_this_host_without_power_pmu_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        power_pmu_fixture(tmp.path(), "4000000");
        let (meter, status) = PerfMeter::open(
            &tmp.path().join("bus/event_source/devices"),
            tmp.path(),
            fs_read,
        );
        assert!(meter.is_none());
        assert!(
            matches!(status.state, MeterState::Failed | MeterState::NotPermitted),
            "{status}"
        );
        assert!(status.detail.contains("power/energy-"), "{status}");
        assert!(perf_event_open(4_000_000, 2, 0).is_err());
    }
}
