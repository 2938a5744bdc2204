//! RAPL through powercap sysfs.
//!
//! Layout (kernel `Documentation/power/powercap/powercap.rst`): under `/sys/class/powercap`
//! each top-level RAPL zone is a directory `intel-rapl:<n>` (or `amd-rapl:<n>`) with files
//! `name` (`package-0`, `psys`), `energy_uj` and `max_energy_range_uj`; its subzones are
//! subdirectories `intel-rapl:<n>:<m>` named `core`, `uncore` or `dram`. `energy_uj` is a
//! 32-bit hardware counter scaled to microjoules: it wraps to 0 after `max_energy_range_uj`
//! (every few minutes to hours), which [`counter_delta`] corrects.
//!
//! `intel-rapl-mmio:*` zones read the same package counter through MMIO and would count it
//! twice: they are skipped, as is the `intel-rapl` control-type directory.
//!
//! Since CVE-2020-8694 (Platypus) `energy_uj` is readable by root only; that case is explained
//! once, with the fix, and the zone is reported unavailable.
//!
//! Every step goes through [`counter_delta`] with the zone's plausible maximum power: the
//! highest `constraint_*_max_power_uw` or `constraint_*_power_limit_uw` of the zone (or of
//! its package, for a subzone) times [`CONSTRAINT_MARGIN`], else `--max-zone-watts`, else
//! [`DEFAULT_MAX_ZONE_WATTS`]. A step above it is a glitch: counted, never added, the
//! interval's energy unknown. The next reading is taken against the last good one (a
//! transient bad value) or, failing that, against the glitch (the counter jumped). When an
//! unreadable zone comes back, the delta across the gap is taken if it is plausible for the
//! gap's length and the gap is too short for the counter to have wrapped unseen.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    counter_delta, describe, max_energy_uj, read_text, read_u64, CounterStep, EnergyError,
    MeterSource, MeterState, MeterStatus, ReadFn, Zone, ZoneKey, ZoneReading,
    DEFAULT_MAX_ZONE_WATTS,
};

/// RAPL enforces its limits as averages over time windows and may exceed them briefly:
/// a zone's plausible maximum is this many times its highest declared limit.
pub const CONSTRAINT_MARGIN: f64 = 2.0;

/// Constraints below this are not a plausible bound (unset limits read 0).
const MIN_CONSTRAINT_WATTS: f64 = 1.0;

/// Powercap zone directory prefixes that are RAPL energy counters.
const PREFIXES: [&str; 2] = ["intel-rapl", "amd-rapl"];

/// What to do about a zone that cannot be read.
fn fix_hint(err: &EnergyError) -> &'static str {
    match err.io_kind() {
        Some(io::ErrorKind::PermissionDenied) => {
            "energy_uj is readable by root only since CVE-2020-8694: run optimus as root, or \
             grant read access with `chmod o+r` on the file, or persistently with a udev rule \
             such as ACTION==\"add\", SUBSYSTEM==\"powercap\", RUN+=\"/bin/chmod o+r /sys%p/energy_uj\""
        }
        Some(io::ErrorKind::NotFound) => {
            "the zone disappeared (package offlined or intel_rapl driver unloaded); it is \
             reported unavailable and its total so far is kept"
        }
        Some(_) => "the kernel refused the read; check `dmesg` for intel_rapl errors",
        None if matches!(err, EnergyError::ZeroRange { .. }) => {
            "a zone whose counter range is 0 cannot be read; check the intel_rapl driver \
             (`dmesg`)"
        }
        None => {
            "the file should hold one unsigned integer; check the intel_rapl driver (`dmesg`)"
        }
    }
}

/// The highest power limit the zone's constraint files declare (the largest of every
/// `constraint_*_max_power_uw` and `constraint_*_power_limit_uw`), watts.
fn constraint_watts(dir: &Path, read: ReadFn) -> Option<f64> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut best: Option<u64> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("constraint_")
            && (name.ends_with("_max_power_uw") || name.ends_with("_power_limit_uw"))
        {
            if let Ok(uw) = read_u64(read, &entry.path()) {
                best = Some(best.map_or(uw, |b| b.max(uw)));
            }
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "microwatts, far below 2^53")]
    let watts = best? as f64 / 1e6;
    (watts >= MIN_CONSTRAINT_WATTS).then_some(watts)
}

/// One RAPL zone's counter state.
#[derive(Debug)]
struct PowercapZone {
    key: ZoneKey,
    dir: PathBuf,
    /// `max_energy_range_uj`, once read.
    max_range: Option<u64>,
    /// The zone's plausible maximum power, watts, and where it comes from.
    max_watts: f64,
    max_watts_from: &'static str,
    /// The last good raw `energy_uj` and when it was read; kept across failed reads, so the
    /// delta across a short gap can be taken.
    prev: Option<(u64, Instant)>,
    /// A reading rejected as a glitch since `prev`, and when: the base if the counter
    /// really jumped.
    glitch: Option<(u64, Instant)>,
    total_uj: u64,
    wraps: u64,
    glitches: u64,
    /// Whether the zone is in a streak of failed reads (warned once at its start).
    failing: bool,
    /// Warnings logged for this zone (tests check there is one per failure streak).
    warnings: u32,
}

impl PowercapZone {
    fn new(key: ZoneKey, dir: PathBuf, max_watts: f64, max_watts_from: &'static str) -> Self {
        Self {
            key,
            dir,
            max_range: None,
            max_watts,
            max_watts_from,
            prev: None,
            glitch: None,
            total_uj: 0,
            wraps: 0,
            glitches: 0,
            failing: false,
            warnings: 0,
        }
    }

    /// Reads `energy_uj` (and `max_energy_range_uj` until it has been read once).
    fn read_counter(&mut self, read: ReadFn) -> Result<(u64, u64), EnergyError> {
        let max_range = match self.max_range {
            Some(m) => m,
            None => {
                let path = self.dir.join("max_energy_range_uj");
                let m = read_u64(read, &path)?;
                if m == 0 {
                    return Err(EnergyError::ZeroRange { path });
                }
                self.max_range = Some(m);
                m
            }
        };
        let now = read_u64(read, &self.dir.join("energy_uj"))?;
        Ok((now, max_range))
    }

    /// Reads the counter at `at` and updates the total; the error (if any) is returned after
    /// the zone has been marked unavailable and, at the start of a failure streak, warned
    /// about.
    fn sample(&mut self, read: ReadFn, at: Instant) -> (ZoneReading, Option<EnergyError>) {
        match self.read_counter(read) {
            Ok((now, max_range)) => {
                let back_after = self.failing.then(|| {
                    self.failing = false;
                    self.prev
                        .map(|(_, t)| at.saturating_duration_since(t))
                        .unwrap_or_default()
                });
                let delta = self.step(now, max_range, at, back_after);
                (self.reading(Some(self.total_uj), delta), None)
            }
            Err(err) => {
                if !self.failing {
                    self.failing = true;
                    self.warnings += 1;
                    log::warn!(
                        "rapl-powercap: {}: {} {} reported unavailable; fix: {}",
                        describe(&err),
                        self.key.device,
                        self.key.zone,
                        fix_hint(&err)
                    );
                }
                (self.reading(None, None), Some(err))
            }
        }
    }

    /// Folds in reading `now` taken at `at`: the interval's energy, or `None` when it is
    /// unknown (first reading, a glitch, a gap too long to bridge). `back_after` is the
    /// length of the read gap that just ended, if one did.
    fn step(
        &mut self,
        now: u64,
        max_range: u64,
        at: Instant,
        back_after: Option<Duration>,
    ) -> Option<u64> {
        let Some((prev, prev_at)) = self.prev else {
            self.prev = Some((now, at));
            return None;
        };
        let since = |t: Instant| at.saturating_duration_since(t);
        let bound = |t: Instant| max_energy_uj(self.max_watts, since(t));
        if let Some(gap) = back_after {
            if bound(prev_at) >= max_range {
                // Long enough to have wrapped unseen: the gap's energy cannot be known.
                log::info!(
                    "rapl-powercap: {} {} ({}) readable again after {:.1} s, too long to \
                     bridge (it could have wrapped unseen at {} W); its total continues",
                    self.key.device,
                    self.key.zone,
                    self.dir.display(),
                    gap.as_secs_f64(),
                    self.max_watts
                );
                self.prev = Some((now, at));
                self.glitch = None;
                return None;
            }
            log::info!(
                "rapl-powercap: {} {} ({}) readable again after {:.1} s; the energy across \
                 the gap is taken if plausible",
                self.key.device,
                self.key.zone,
                self.dir.display(),
                gap.as_secs_f64()
            );
        }
        let mut step = counter_delta(prev, now, max_range, bound(prev_at));
        if matches!(step, CounterStep::Glitch { .. }) {
            // Against the rejected reading instead: the counter may really have jumped.
            if let Some((g, g_at)) = self.glitch {
                if let s @ CounterStep::Energy { .. } =
                    counter_delta(g, now, max_range, bound(g_at))
                {
                    step = s;
                }
            }
        }
        match step {
            CounterStep::Energy { delta, wrapped } => {
                if wrapped {
                    self.wraps += 1;
                    log::debug!(
                        "rapl-powercap: {} {} wrapped ({prev} -> {now}, range {max_range})",
                        self.key.device,
                        self.key.zone
                    );
                }
                self.total_uj = self.total_uj.saturating_add(delta);
                self.prev = Some((now, at));
                self.glitch = None;
                Some(delta)
            }
            CounterStep::Glitch { delta } => {
                self.glitches += 1;
                #[expect(clippy::cast_precision_loss, reason = "for a log line")]
                let watts = delta as f64 / 1e6 / since(prev_at).as_secs_f64().max(1e-3);
                log::warn!(
                    "rapl-powercap: {} {}: counter step {prev} -> {now} would be {:.0} J in \
                     {:.3} s ({watts:.0} W, above the plausible {} W {}): counted as a glitch, \
                     not energy",
                    self.key.device,
                    self.key.zone,
                    {
                        #[expect(clippy::cast_precision_loss, reason = "for a log line")]
                        let j = delta as f64 / 1e6;
                        j
                    },
                    since(prev_at).as_secs_f64(),
                    self.max_watts,
                    self.max_watts_from
                );
                self.glitch = Some((now, at));
                None
            }
        }
    }

    fn reading(&self, total_uj: Option<u64>, delta_uj: Option<u64>) -> ZoneReading {
        ZoneReading {
            key: self.key.clone(),
            total_uj,
            delta_uj,
            wraps: self.wraps,
            glitches: self.glitches,
        }
    }
}

/// RAPL energy through powercap sysfs.
#[derive(Debug)]
pub(crate) struct PowercapMeter {
    zones: Vec<PowercapZone>,
    read: ReadFn,
}

impl PowercapMeter {
    /// Finds the zones under `root` and reads each once at `now` (the baseline). `None` when
    /// there is no RAPL zone at all; zones that cannot be read are kept, unavailable, and
    /// retried. `max_zone_watts` overrides every zone's plausible maximum.
    pub(crate) fn open(
        root: &Path,
        read: ReadFn,
        max_zone_watts: Option<f64>,
        now: Instant,
    ) -> (Option<PowercapMeter>, MeterStatus) {
        let status =
            |state, detail: String| MeterStatus::new(MeterSource::RaplPowercap, state, detail);
        if root.exists() && !root.is_dir() {
            let detail = format!(
                "{} is not a directory: --powercap-root must name the powercap class \
                 directory (normally /sys/class/powercap)",
                root.display()
            );
            return (None, status(MeterState::Failed, detail));
        }
        let found = match discover(root, read) {
            Ok(found) => found,
            Err(err) => {
                let detail = format!("{}: {}", describe(&err), fix_hint(&err));
                return (None, status(MeterState::Failed, detail));
            }
        };
        if found.is_empty() {
            let detail = format!(
                "no intel-rapl or amd-rapl zone under {} (no RAPL on this CPU, e.g. in a VM, or the \
                 intel_rapl_msr module is not loaded: `modprobe intel_rapl_msr`)",
                root.display()
            );
            return (None, status(MeterState::NotFound, detail));
        }
        let mut package_watts: BTreeMap<String, f64> = BTreeMap::new();
        let zones = found
            .into_iter()
            .map(|(key, dir)| {
                let (watts, from) = match max_zone_watts {
                    Some(w) => (w, "from --max-zone-watts"),
                    None => match constraint_watts(&dir, read)
                        .or_else(|| package_watts.get(&key.device).copied())
                    {
                        Some(w) => {
                            if key.zone == Zone::Package || key.zone == Zone::Psys {
                                package_watts.insert(key.device.clone(), w);
                            }
                            (w * CONSTRAINT_MARGIN, "(twice its powercap limit)")
                        }
                        None => (DEFAULT_MAX_ZONE_WATTS, "(default; see --max-zone-watts)"),
                    },
                };
                PowercapZone::new(key, dir, watts, from)
            })
            .collect();
        let mut meter = PowercapMeter { zones, read };
        let mut first_error = None;
        for zone in &mut meter.zones {
            let (_, err) = zone.sample(read, now);
            if first_error.is_none() {
                first_error = err;
            }
        }
        let readable = meter.readable_zones();
        let total = meter.zones.len();
        let names = meter
            .zones
            .iter()
            .map(|z| format!("{} {}", z.key.device, z.key.zone))
            .collect::<Vec<_>>()
            .join(", ");
        let st = match first_error {
            None => status(MeterState::Active, format!("{total} zones: {names}")),
            Some(err) => {
                let why = format!("{}: {}", describe(&err), fix_hint(&err));
                if readable > 0 {
                    status(
                        MeterState::Active,
                        format!("{readable} of {total} zones readable ({names}); {why}"),
                    )
                } else if err.io_kind() == Some(io::ErrorKind::PermissionDenied) {
                    status(
                        MeterState::NotPermitted,
                        format!("{total} zones, none readable; {why}"),
                    )
                } else {
                    status(
                        MeterState::Failed,
                        format!("{total} zones, none readable; {why}"),
                    )
                }
            }
        };
        (Some(meter), st)
    }

    /// Reads every zone once, at `now`.
    pub(crate) fn sample(&mut self, now: Instant) -> Vec<ZoneReading> {
        let read = self.read;
        self.zones
            .iter_mut()
            .map(|z| z.sample(read, now).0)
            .collect()
    }

    /// Zones whose last read succeeded.
    pub(crate) fn readable_zones(&self) -> usize {
        self.zones.iter().filter(|z| !z.failing).count()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// Moves the zones matching `pred` into a meter of their own.
    pub(crate) fn split_off(&mut self, pred: impl Fn(&ZoneKey) -> bool) -> PowercapMeter {
        let (taken, kept) = std::mem::take(&mut self.zones)
            .into_iter()
            .partition(|z| pred(&z.key));
        self.zones = kept;
        PowercapMeter {
            zones: taken,
            read: self.read,
        }
    }

    /// Keeps only the zones matching `pred`.
    pub(crate) fn retain(&mut self, pred: impl Fn(&ZoneKey) -> bool) {
        self.zones.retain(|z| pred(&z.key));
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<ZoneKey> {
        self.zones.iter().map(|z| z.key.clone()).collect()
    }

    #[cfg(test)]
    fn warnings(&self) -> u32 {
        self.zones.iter().map(|z| z.warnings).sum()
    }
}

/// `intel-rapl:3` → `Some(("intel-rapl", [3]))`, `intel-rapl:0:1` → `Some(("intel-rapl", [0, 1]))`.
pub(crate) fn parse_zone_dir_name(name: &str) -> Option<(&'static str, Vec<u32>)> {
    let (prefix, rest) = name.split_once(':')?;
    let prefix = PREFIXES.into_iter().find(|p| *p == prefix)?;
    let ids = rest
        .split(':')
        .map(|part| part.parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    Some((prefix, ids))
}

/// Subdirectory names of `dir` that are RAPL zones with `depth` ids, in numeric order.
fn zone_dirs(dir: &Path, depth: usize) -> Result<Vec<(String, PathBuf)>, EnergyError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(EnergyError::Io {
                op: "list",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut found = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((prefix, ids)) = parse_zone_dir_name(&name) {
            if ids.len() == depth {
                found.insert((prefix, ids), (name, entry.path()));
            }
        }
    }
    Ok(found.into_values().collect())
}

/// Finds every RAPL zone under the powercap root, with its key.
fn discover(root: &Path, read: ReadFn) -> Result<Vec<(ZoneKey, PathBuf)>, EnergyError> {
    let mut zones = Vec::new();
    let mut platforms = 0;
    for (top_name, top_dir) in zone_dirs(root, 1)? {
        let name = match read_text(read, &top_dir.join("name")) {
            Ok(name) => name.trim().to_string(),
            Err(err) => {
                log::warn!("rapl-powercap: {}: zone {top_name} skipped", describe(&err));
                continue;
            }
        };
        let (zone, device) = if name.starts_with("package-") {
            (Zone::Package, name)
        } else if name == "psys" {
            platforms += 1;
            (Zone::Psys, format!("platform-{}", platforms - 1))
        } else {
            log::debug!("rapl-powercap: zone {top_name} named {name:?} is not metered");
            continue;
        };
        zones.push((
            ZoneKey::new(zone, device.clone(), MeterSource::RaplPowercap),
            top_dir.clone(),
        ));
        for (sub_name, sub_dir) in zone_dirs(&top_dir, 2)? {
            let name = match read_text(read, &sub_dir.join("name")) {
                Ok(name) => name.trim().to_string(),
                Err(err) => {
                    log::warn!("rapl-powercap: {}: zone {sub_name} skipped", describe(&err));
                    continue;
                }
            };
            let zone = match name.as_str() {
                "core" => Zone::Core,
                "uncore" => Zone::Uncore,
                "dram" => Zone::Dram,
                other => {
                    log::debug!("rapl-powercap: subzone {sub_name} named {other:?} is not metered");
                    continue;
                }
            };
            zones.push((
                ZoneKey::new(zone, device.clone(), MeterSource::RaplPowercap),
                sub_dir,
            ));
        }
    }
    Ok(zones)
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

    const MAX: u64 = 262_143_328_850;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/powercap")
            .join(name)
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// The checked-in two-socket tree, copied so a test can change it.
    fn two_packages() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("powercap");
        copy_dir(&fixture("two-packages"), &root);
        (tmp, root)
    }

    fn fs_read(path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    /// A meter on a test clock: each sample is one second after the previous one.
    struct Clocked {
        meter: PowercapMeter,
        at: Instant,
    }

    impl Clocked {
        fn sample(&mut self) -> Vec<ZoneReading> {
            self.sample_after(Duration::from_secs(1))
        }
        fn sample_after(&mut self, d: Duration) -> Vec<ZoneReading> {
            self.at += d;
            self.meter.sample(self.at)
        }
    }

    impl std::ops::Deref for Clocked {
        type Target = PowercapMeter;
        fn deref(&self) -> &PowercapMeter {
            &self.meter
        }
    }

    impl std::ops::DerefMut for Clocked {
        fn deref_mut(&mut self) -> &mut PowercapMeter {
            &mut self.meter
        }
    }

    fn open_with(
        root: &Path,
        read: ReadFn,
        max_zone_watts: Option<f64>,
    ) -> (Option<Clocked>, MeterStatus) {
        let at = Instant::now();
        let (meter, status) = PowercapMeter::open(root, read, max_zone_watts, at);
        (meter.map(|meter| Clocked { meter, at }), status)
    }

    fn open(root: &Path, read: ReadFn) -> (Option<Clocked>, MeterStatus) {
        open_with(root, read, None)
    }

    fn set(root: &Path, zone: &str, file: &str, value: &str) {
        fs::write(root.join(zone).join(file), value).unwrap();
    }

    fn reading<'a>(readings: &'a [ZoneReading], device: &str, zone: Zone) -> &'a ZoneReading {
        readings
            .iter()
            .find(|r| r.key.device == device && r.key.zone == zone)
            .unwrap_or_else(|| panic!("no {device} {zone} in {readings:?}"))
    }

    fn key(zone: Zone, device: &str) -> ZoneKey {
        ZoneKey::new(zone, device, MeterSource::RaplPowercap)
    }

    #[test]
    fn discovers_two_packages_with_subzones_and_psys() {
        let (_tmp, root) = two_packages();
        let (meter, status) = open(&root, fs_read);
        let meter = meter.unwrap();
        assert_eq!(status.state, MeterState::Active, "{status}");
        // intel-rapl (control type) and intel-rapl-mmio:0 (duplicate package) are skipped.
        assert_eq!(
            meter.keys(),
            vec![
                key(Zone::Package, "package-0"),
                key(Zone::Core, "package-0"),
                key(Zone::Dram, "package-0"),
                key(Zone::Package, "package-1"),
                key(Zone::Core, "package-1"),
                key(Zone::Dram, "package-1"),
                key(Zone::Psys, "platform-0"),
            ]
        );
        assert!(status.detail.starts_with("7 zones"), "{status}");
    }

    #[test]
    fn deltas_and_totals_in_exact_microjoules() {
        let (_tmp, root) = two_packages();
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        // Fixture: package-0 at 100_000_000 µJ, package-1 at 200_000_000, their dram at
        // 30_000_000 / 40_000_000, psys at 500_000_000.
        set(&root, "intel-rapl:0", "energy_uj", "112500000\n"); // +12.5 J
        set(&root, "intel-rapl:1", "energy_uj", "207250000\n"); // +7.25 J
        set(
            &root,
            "intel-rapl:0/intel-rapl:0:1",
            "energy_uj",
            "31000000\n",
        ); // +1 J
        set(&root, "intel-rapl:2", "energy_uj", "530000000\n"); // +30 J
        let s = meter.sample();
        assert_eq!(s.len(), 7);
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!(
            (p0.delta_uj, p0.total_uj, p0.wraps),
            (Some(12_500_000), Some(12_500_000), 0)
        );
        let p1 = reading(&s, "package-1", Zone::Package);
        assert_eq!(
            (p1.delta_uj, p1.total_uj),
            (Some(7_250_000), Some(7_250_000))
        );
        let dram0 = reading(&s, "package-0", Zone::Dram);
        assert_eq!(dram0.delta_uj, Some(1_000_000));
        let dram1 = reading(&s, "package-1", Zone::Dram);
        assert_eq!(
            dram1.delta_uj,
            Some(0),
            "an idle zone reads 0, it is not unavailable"
        );
        assert_eq!(
            reading(&s, "platform-0", Zone::Psys).delta_uj,
            Some(30_000_000)
        );

        set(&root, "intel-rapl:0", "energy_uj", "113500000\n"); // +1 J
        let s = meter.sample();
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!(
            (p0.delta_uj, p0.total_uj),
            (Some(1_000_000), Some(13_500_000))
        );
    }

    #[test]
    fn counter_about_to_wrap_is_corrected_and_counted() {
        let (_tmp, root) = two_packages();
        // 999_999 µJ below the top of the range.
        set(
            &root,
            "intel-rapl:0",
            "energy_uj",
            &(MAX - 999_999).to_string(),
        );
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        set(&root, "intel-rapl:0", "energy_uj", "2000000");
        let s = meter.sample();
        let p0 = reading(&s, "package-0", Zone::Package);
        // 999_999 to the top + 1 step to 0 + 2_000_000 = 3 J, not dropped.
        assert_eq!(
            (p0.delta_uj, p0.total_uj, p0.wraps),
            (Some(3_000_000), Some(3_000_000), 1)
        );
        set(&root, "intel-rapl:0", "energy_uj", "2500000");
        let s = meter.sample();
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!(
            (p0.delta_uj, p0.total_uj, p0.wraps),
            (Some(500_000), Some(3_500_000), 1)
        );
    }

    #[test]
    fn small_range_counter_wrapping_in_two_consecutive_intervals() {
        let (_tmp, root) = two_packages();
        // A counter that wraps "fast": range 0..=999_999 µJ (modulus 1 J).
        let core0 = "intel-rapl:0/intel-rapl:0:0";
        set(&root, core0, "max_energy_range_uj", "999999");
        set(&root, core0, "energy_uj", "900000");
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();

        set(&root, core0, "energy_uj", "400000"); // wrapped: 100_000 + 400_000
        let s = meter.sample();
        let c = reading(&s, "package-0", Zone::Core);
        assert_eq!(
            (c.delta_uj, c.total_uj, c.wraps),
            (Some(500_000), Some(500_000), 1)
        );

        set(&root, core0, "energy_uj", "100000"); // wrapped again: 600_000 + 100_000
        let s = meter.sample();
        let c = reading(&s, "package-0", Zone::Core);
        assert_eq!(
            (c.delta_uj, c.total_uj, c.wraps),
            (Some(700_000), Some(1_200_000), 2)
        );
    }

    /// Tests run as root, where `chmod 000` does not stop a read. The EACCES a non-root agent
    /// gets from `energy_uj` (CVE-2020-8694) is injected through the meter's read function.
    fn eacces_on_package_1(path: &Path) -> io::Result<String> {
        if path.ends_with("intel-rapl:1/energy_uj") {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        fs::read_to_string(path)
    }

    #[test]
    fn unreadable_energy_uj_eacces_injected_is_unavailable_with_one_warning() {
        let (_tmp, root) = two_packages();
        let (meter, status) = open(&root, eacces_on_package_1);
        let mut meter = meter.unwrap();
        assert_eq!(
            status.state,
            MeterState::Active,
            "other zones still work: {status}"
        );
        assert!(status.detail.contains("6 of 7 zones readable"), "{status}");
        assert!(
            status.detail.contains("intel-rapl:1/energy_uj"),
            "names the file: {status}"
        );
        assert!(
            status.detail.contains("CVE-2020-8694"),
            "gives the fix: {status}"
        );
        assert!(status.detail.contains("udev"), "{status}");
        for _ in 0..3 {
            let s = meter.sample();
            let p1 = reading(&s, "package-1", Zone::Package);
            assert_eq!(
                (p1.total_uj, p1.delta_uj),
                (None, None),
                "unavailable, never 0 W"
            );
            assert_eq!(reading(&s, "package-0", Zone::Package).delta_uj, Some(0));
        }
        assert_eq!(meter.warnings(), 1, "one warning, not one per sample");
    }

    fn eacces_everywhere(path: &Path) -> io::Result<String> {
        if path.ends_with("energy_uj") {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        fs::read_to_string(path)
    }

    #[test]
    fn nothing_readable_is_not_permitted_with_the_fix() {
        let (_tmp, root) = two_packages();
        let (meter, status) = open(&root, eacces_everywhere);
        assert_eq!(meter.unwrap().readable_zones(), 0);
        assert_eq!(status.state, MeterState::NotPermitted, "{status}");
        assert!(status.detail.contains("run optimus as root"), "{status}");
    }

    #[test]
    fn unreadable_energy_uj_real_eisdir_is_unavailable_with_one_warning() {
        // A real OS error from the real read path: energy_uj replaced by a directory (EISDIR).
        let (_tmp, root) = two_packages();
        let dram0 = root.join("intel-rapl:0/intel-rapl:0:1");
        fs::remove_file(dram0.join("energy_uj")).unwrap();
        fs::create_dir(dram0.join("energy_uj")).unwrap();
        let (meter, status) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        assert!(
            status.detail.contains("intel-rapl:0:1/energy_uj"),
            "{status}"
        );
        let s = meter.sample();
        let d = reading(&s, "package-0", Zone::Dram);
        assert_eq!((d.total_uj, d.delta_uj), (None, None));
        meter.sample();
        assert_eq!(meter.warnings(), 1);
    }

    #[test]
    fn garbage_content_is_unavailable_then_recovers_keeping_its_total() {
        let (_tmp, root) = two_packages();
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        set(&root, "intel-rapl:1", "energy_uj", "205000000"); // +5 J
        let s = meter.sample();
        assert_eq!(
            reading(&s, "package-1", Zone::Package).total_uj,
            Some(5_000_000)
        );

        set(&root, "intel-rapl:1", "energy_uj", "12ab\u{0}garbage\n");
        for _ in 0..2 {
            let s = meter.sample();
            let p1 = reading(&s, "package-1", Zone::Package);
            assert_eq!((p1.total_uj, p1.delta_uj), (None, None));
        }
        assert_eq!(meter.warnings(), 1);

        // Back after a 3 s gap: 95 J across it is plausible (32 W), so it is taken.
        set(&root, "intel-rapl:1", "energy_uj", "300000000");
        let s = meter.sample();
        let p1 = reading(&s, "package-1", Zone::Package);
        assert_eq!(
            (p1.total_uj, p1.delta_uj),
            (Some(100_000_000), Some(95_000_000))
        );
        set(&root, "intel-rapl:1", "energy_uj", "302000000"); // +2 J
        let s = meter.sample();
        let p1 = reading(&s, "package-1", Zone::Package);
        assert_eq!(
            (p1.total_uj, p1.delta_uj),
            (Some(102_000_000), Some(2_000_000))
        );
    }

    #[test]
    fn zone_that_disappears_is_unavailable_and_keeps_its_total() {
        let (tmp, root) = two_packages();
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        set(&root, "intel-rapl:1", "energy_uj", "203000000"); // +3 J
        meter.sample();

        let parked = tmp.path().join("parked");
        fs::rename(root.join("intel-rapl:1"), &parked).unwrap();
        let s = meter.sample();
        assert_eq!(s.len(), 7, "the zone is still listed");
        for zone in [Zone::Package, Zone::Core, Zone::Dram] {
            let r = reading(&s, "package-1", zone);
            assert_eq!((r.total_uj, r.delta_uj), (None, None), "{zone}");
        }
        assert_eq!(reading(&s, "package-0", Zone::Package).delta_uj, Some(0));

        fs::rename(&parked, root.join("intel-rapl:1")).unwrap();
        set(&root, "intel-rapl:1", "energy_uj", "210000000");
        // +7 J across the 2 s gap: taken.
        let s = meter.sample();
        let p1 = reading(&s, "package-1", Zone::Package);
        assert_eq!(p1.delta_uj, Some(7_000_000));
        set(&root, "intel-rapl:1", "energy_uj", "211000000"); // +1 J
        let s = meter.sample();
        let p1 = reading(&s, "package-1", Zone::Package);
        assert_eq!(
            (p1.total_uj, p1.delta_uj),
            (Some(11_000_000), Some(1_000_000))
        );
    }

    #[test]
    fn a_tiny_step_back_is_a_glitch_not_a_262_kj_wrap() {
        let (_tmp, root) = two_packages();
        set(&root, "intel-rapl:0", "energy_uj", "1010000000");
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        set(&root, "intel-rapl:0", "energy_uj", "1009999000");
        let s = meter.sample_after(Duration::from_millis(500));
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!(
            (p0.delta_uj, p0.total_uj, p0.wraps, p0.glitches),
            (None, Some(0), 0, 1),
            "unknown interval, nothing added, no wrap"
        );
        // The counter goes on: 4.999 J since the last good reading, plausible, taken.
        set(&root, "intel-rapl:0", "energy_uj", "1014999000");
        let s = meter.sample_after(Duration::from_millis(500));
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!(
            (p0.delta_uj, p0.total_uj, p0.glitches),
            (Some(4_999_000), Some(4_999_000), 1)
        );
    }

    #[test]
    fn a_spike_is_a_glitch_and_the_next_reading_bridges_it() {
        let (_tmp, root) = two_packages();
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        // package-0 starts at 100_000_000; +262 kJ in 0.5 s (524 kW) is not energy.
        set(&root, "intel-rapl:0", "energy_uj", "262100000000");
        let s = meter.sample_after(Duration::from_millis(500));
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!((p0.delta_uj, p0.glitches), (None, 1));
        // Back to normal: 10 J over the two intervals, from the last good reading.
        set(&root, "intel-rapl:0", "energy_uj", "110000000");
        let s = meter.sample_after(Duration::from_millis(500));
        let p0 = reading(&s, "package-0", Zone::Package);
        assert_eq!(
            (p0.delta_uj, p0.total_uj, p0.glitches),
            (Some(10_000_000), Some(10_000_000), 1)
        );
    }

    #[test]
    fn the_plausible_maximum_comes_from_constraints_then_the_flag() {
        let (_tmp, root) = two_packages();
        // A 100 W limit: 2x margin makes 200 W the most package-0 can do.
        set(
            &root,
            "intel-rapl:0",
            "constraint_0_power_limit_uw",
            "100000000",
        );
        set(&root, "intel-rapl:0", "constraint_0_max_power_uw", "0");
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        assert_eq!(meter.zones[0].max_watts, 200.0);
        // Its core subzone has no constraint of its own: the package's.
        assert_eq!(meter.zones[1].max_watts, 200.0);
        // package-1 has none: the 5 kW default.
        assert_eq!(meter.zones[3].max_watts, DEFAULT_MAX_ZONE_WATTS);
        set(&root, "intel-rapl:0", "energy_uj", "400000000"); // 300 J in 1 s
        let s = meter.sample();
        assert_eq!(reading(&s, "package-0", Zone::Package).glitches, 1);
        // 300.15 J since the last good reading 2 s ago: 150 W, plausible, so taken.
        set(&root, "intel-rapl:0", "energy_uj", "400150000");
        let s = meter.sample();
        assert_eq!(
            reading(&s, "package-0", Zone::Package).delta_uj,
            Some(300_150_000)
        );

        let (meter, _) = open_with(&root, fs_read, Some(50.0));
        assert!(meter.unwrap().zones.iter().all(|z| z.max_watts == 50.0));
    }

    #[test]
    fn a_gap_too_long_to_bridge_starts_a_new_baseline() {
        let (_tmp, root) = two_packages();
        let (meter, _) = open_with(&root, eacces_on_package_1_later, Some(1000.0));
        let mut meter = meter.unwrap();
        FAIL_PACKAGE_1.store(true, std::sync::atomic::Ordering::SeqCst);
        meter.sample();
        FAIL_PACKAGE_1.store(false, std::sync::atomic::Ordering::SeqCst);
        // 300 s at up to 1 kW is 300 kJ, more than the 262 kJ range: it could have wrapped.
        set(&root, "intel-rapl:1", "energy_uj", "201000000");
        let s = meter.sample_after(Duration::from_secs(300));
        let p1 = reading(&s, "package-1", Zone::Package);
        assert_eq!((p1.delta_uj, p1.total_uj, p1.glitches), (None, Some(0), 0));
        set(&root, "intel-rapl:1", "energy_uj", "202000000");
        let s = meter.sample();
        assert_eq!(
            reading(&s, "package-1", Zone::Package).delta_uj,
            Some(1_000_000)
        );
    }

    static FAIL_PACKAGE_1: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    fn eacces_on_package_1_later(path: &Path) -> io::Result<String> {
        if FAIL_PACKAGE_1.load(std::sync::atomic::Ordering::SeqCst)
            && path.ends_with("intel-rapl:1/energy_uj")
        {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        fs::read_to_string(path)
    }

    #[test]
    fn zero_range_and_a_file_as_root_say_what_is_wrong() {
        let (_tmp, root) = two_packages();
        set(&root, "intel-rapl:1", "max_energy_range_uj", "0");
        let (_, status) = open(&root, fs_read);
        assert!(
            status
                .detail
                .contains("is 0: the counter range must be above 0"),
            "{status}"
        );
        assert!(!status.detail.contains("one unsigned integer"), "{status}");

        let file = root.join("intel-rapl:0/name");
        let (meter, status) = open(&file, fs_read);
        assert!(meter.is_none());
        assert_eq!(status.state, MeterState::Failed);
        assert!(status.detail.contains("is not a directory"), "{status}");
        assert!(!status.detail.contains("kernel"), "{status}");
    }

    #[test]
    fn amd_rapl_tree() {
        let (meter, status) = open(&fixture("amd"), fs_read);
        let meter = meter.unwrap();
        assert_eq!(status.state, MeterState::Active, "{status}");
        assert_eq!(
            meter.keys(),
            vec![
                key(Zone::Package, "package-0"),
                key(Zone::Core, "package-0")
            ]
        );
    }

    #[test]
    fn no_powercap_root_is_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let (meter, status) = open(&tmp.path().join("nope"), fs_read);
        assert!(meter.is_none());
        assert_eq!(status.state, MeterState::NotFound);
        assert!(status.detail.contains("intel_rapl_msr"), "{status}");
    }

    #[test]
    fn zone_dir_names() {
        assert_eq!(
            parse_zone_dir_name("intel-rapl:0"),
            Some(("intel-rapl", vec![0]))
        );
        assert_eq!(
            parse_zone_dir_name("amd-rapl:1:2"),
            Some(("amd-rapl", vec![1, 2]))
        );
        assert_eq!(parse_zone_dir_name("intel-rapl-mmio:0"), None);
        assert_eq!(parse_zone_dir_name("intel-rapl"), None);
        assert_eq!(parse_zone_dir_name("intel-rapl:x"), None);
    }

    #[test]
    fn split_off_moves_matching_zones() {
        let (_tmp, root) = two_packages();
        let (meter, _) = open(&root, fs_read);
        let mut meter = meter.unwrap();
        let mut packages = meter.split_off(|k| k.zone != Zone::Core);
        packages.retain(|k| k.zone == Zone::Package);
        assert_eq!(
            meter.keys(),
            vec![key(Zone::Core, "package-0"), key(Zone::Core, "package-1")]
        );
        assert_eq!(
            packages.keys(),
            vec![
                key(Zone::Package, "package-0"),
                key(Zone::Package, "package-1")
            ]
        );
    }
}
