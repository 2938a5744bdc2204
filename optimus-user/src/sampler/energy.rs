//! The energy half of a sample: reads the meters, turns the tracer's cumulative CPU time
//! into this interval's shares and hands both to [`crate::attribution`].

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::attribution::{self, EnergyLedger, IdlePolicy, IntervalInput, VmInterval};
use crate::discovery::{ThreadKind, Vm, VmId};
use crate::energy::{EnergyMeters, MeterStatus, Zone, ZoneKey, ZoneReading};
use crate::tracer::CpuReading;

use super::cpu::CpuLedger;

/// One node zone as exported.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeZone {
    pub key: ZoneKey,
    /// Cumulative joules from the meter; `None` while the zone is unavailable.
    pub joules: Option<f64>,
    /// Power over the last interval; `None` when unknown.
    pub watts: Option<f64>,
    pub wraps: u64,
    /// Counter steps rejected as glitches (implausible power).
    pub glitches: u64,
    /// Cumulative joules that went to idle and to host processes.
    pub idle_joules: f64,
    pub unattributed_joules: f64,
}

/// A VM's energy per (zone, source label): cumulative joules and last-interval watts.
pub type VmEnergy = BTreeMap<(Zone, &'static str), (f64, f64)>;

/// Energy part of a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnergySnapshot {
    pub zones: Vec<NodeZone>,
    /// Per VM, per (zone, source): cumulative joules and last-interval watts.
    pub vms: BTreeMap<VmId, VmEnergy>,
    /// Per VM: joules of the last interval in the zones that count for carbon.
    pub vm_interval_joules: BTreeMap<VmId, f64>,
    pub meters: Vec<MeterStatus>,
    /// The power model per zone and device: trained here beside a meter, or predicting
    /// from `--power-model` (empty when neither).
    pub model: Vec<crate::model::ZoneModelStatus>,
    /// Per VM: forecast mean watts for the next hour and the next day.
    pub forecasts: BTreeMap<VmId, crate::model::forecast::VmForecast>,
    /// MAPE of the forecasts scored so far over the VMs, per horizon (`1h`, `24h`).
    pub forecast_error: [Option<f64>; 2],
}

/// Zones summed for a VM's carbon: package, dram and gpu do not overlap (psys contains
/// package; core and uncore are inside package).
pub const CARBON_ZONES: [Zone; 3] = [Zone::Package, Zone::Dram, Zone::Gpu];

/// Meters, previous cumulative readings and the attribution ledger.
pub struct EnergyState {
    meters: EnergyMeters,
    cpu_package: Vec<u32>,
    idle_policy: IdlePolicy,
    prev_busy: Option<(u64, Vec<u64>)>,
    prev_vm_cpu: HashMap<VmId, Vec<u64>>,
    ledger: EnergyLedger,
    /// Trains the power model wherever a real meter exists (with its feature reader).
    trainer: Option<(crate::model::trainer::Trainer, crate::model::FeatureReader)>,
    forecaster: crate::model::forecast::Forecaster<VmId>,
    /// Power gauges of node zones and of VMs per zone, over windows of at least
    /// [`MIN_POWER_WINDOW_S`].
    node_power: PowerWindow<ZoneKey>,
    vm_power: PowerWindow<(VmId, ZoneKey)>,
    /// Guest-reported GPU energy of the coming interval (µJ per VM and device), and the
    /// devices each VM ever reported (a quiet interval charges them 0, not the last power).
    guest_gpu: BTreeMap<VmId, BTreeMap<String, u64>>,
    guest_devices: BTreeMap<VmId, std::collections::BTreeSet<String>>,
}

/// The shortest span a power gauge is computed over. A sample can close a much shorter
/// interval (the first one, milliseconds after the meters' baseline; a phase switch
/// between two ticks), and over a few milliseconds a meter's update granularity (RAPL
/// about 1 ms, the powercap fixtures 10 ms, many GPUs' energy counters 20-100 ms) is a
/// large error: such an interval is carried into the next one, and the gauge keeps its
/// last value (absent until the first full window). Joules are never affected.
pub const MIN_POWER_WINDOW_S: f64 = 0.5;

/// Joules and seconds gathered per key until they span [`MIN_POWER_WINDOW_S`].
#[derive(Debug)]
struct PowerWindow<K> {
    open: HashMap<K, (f64, f64)>,
    last: HashMap<K, f64>,
}

impl<K> Default for PowerWindow<K> {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
            last: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> PowerWindow<K> {
    /// Adds `joules` over `secs` to `key`'s window; its watts once the window is long
    /// enough, else the last full window's (`None` before the first). `None` joules (the
    /// zone unavailable now) close nothing and report `None`.
    fn watts(&mut self, key: &K, joules: Option<f64>, secs: f64) -> Option<f64> {
        let Some(j) = joules else {
            // The interval's energy is unknown: its window cannot be completed.
            self.open.remove(key);
            return None;
        };
        let w = self.open.entry(key.clone()).or_insert((0.0, 0.0));
        w.0 += j;
        w.1 += secs;
        if w.1 >= MIN_POWER_WINDOW_S {
            let watts = w.0 / w.1;
            self.open.remove(key);
            self.last.insert(key.clone(), watts);
            return Some(watts);
        }
        self.last.get(key).copied()
    }

    /// Forgets keys not in `keep` (VMs that went away).
    fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        self.open.retain(|k, _| keep(k));
        self.last.retain(|k, _| keep(k));
    }
}

fn delta_vec(now: &[u64], prev: Option<&Vec<u64>>) -> Vec<u64> {
    now.iter()
        .enumerate()
        .map(|(i, v)| v.saturating_sub(prev.and_then(|p| p.get(i).copied()).unwrap_or(0)))
        .collect()
}

#[expect(
    clippy::cast_precision_loss,
    reason = "microjoules of one meter, far below 2^53"
)]
fn joules(uj: u64) -> f64 {
    uj as f64 / 1e6
}

impl EnergyState {
    pub fn new(meters: EnergyMeters, cpu_package: Vec<u32>, idle_policy: IdlePolicy) -> Self {
        Self {
            meters,
            cpu_package,
            idle_policy,
            prev_busy: None,
            prev_vm_cpu: HashMap::new(),
            ledger: EnergyLedger::default(),
            trainer: None,
            forecaster: crate::model::forecast::Forecaster::default(),
            node_power: PowerWindow::default(),
            vm_power: PowerWindow::default(),
            guest_gpu: BTreeMap::new(),
            guest_devices: BTreeMap::new(),
        }
    }

    /// GPU energy the VMs' guests reported and the guest channel accepted since the last
    /// step, microjoules per VM and device (`crate::channel`).
    pub fn set_guest_gpu(&mut self, claims: BTreeMap<VmId, BTreeMap<String, u64>>) {
        self.guest_gpu = claims;
    }

    /// Trains a power model on every interval of the real meters, reading features with
    /// `reader`.
    #[must_use]
    pub fn with_trainer(
        mut self,
        trainer: crate::model::trainer::Trainer,
        reader: crate::model::FeatureReader,
    ) -> Self {
        self.trainer = Some((trainer, reader));
        self
    }

    /// Saves the trained model (on exit).
    pub fn finish(&mut self) {
        if let Some((t, _)) = self.trainer.as_mut() {
            t.save();
        }
    }

    /// Samples the meters and attributes the interval. `reading` is `None` when the tracer
    /// could not be read this time.
    pub fn step(
        &mut self,
        reading: Option<&CpuReading>,
        vms: &[Vm],
        cpu: &CpuLedger,
    ) -> EnergySnapshot {
        let sample = self.meters.sample();
        if let Some((trainer, reader)) = self.trainer.as_mut() {
            if let Some(mut obs) = reader.read(std::time::Instant::now()) {
                obs.gpus = sample
                    .gpu_utilisation
                    .iter()
                    .map(|(d, (sm, mem))| {
                        (d.clone(), (f64::from(*sm) / 100.0, f64::from(*mem) / 100.0))
                    })
                    .collect();
                trainer.observe(&sample.zones, sample.interval.as_secs_f64(), &obs);
            }
        }
        // Busy time unknown (no /proc/stat): no busy, so no idle share.
        let reading = reading.filter(|r| !r.busy_ns.is_empty());
        let (busy_ns, interval_ns) = match (reading, &self.prev_busy) {
            (Some(r), Some((at, prev))) => (
                Some(delta_vec(&r.busy_ns, Some(prev))),
                r.at_ns.saturating_sub(*at),
            ),
            _ => (
                None,
                u64::try_from(sample.interval.as_nanos()).unwrap_or(u64::MAX),
            ),
        };
        if let Some(r) = reading {
            // Clamped: /proc/stat shows idle time in whole ticks, so busy time read from
            // it can step back by under one.
            let mut busy = self.prev_busy.take().map(|(_, b)| b).unwrap_or_default();
            super::cpu::merge_into(&mut busy, &r.busy_ns, u64::max);
            self.prev_busy = Some((r.at_ns, busy));
        }
        let mut intervals = Vec::with_capacity(vms.len());
        let mut next_prev = HashMap::with_capacity(vms.len());
        for vm in vms {
            let now = cpu.vm(&vm.id).map(|c| c.per_cpu_ns).unwrap_or_default();
            intervals.push(VmInterval {
                id: vm.id.clone(),
                cpu_ns: delta_vec(&now, self.prev_vm_cpu.get(&vm.id)),
                pid: vm.pid,
                vcpus: u32::try_from(
                    vm.threads
                        .iter()
                        .filter(|t| matches!(t.kind, ThreadKind::Vcpu(_)))
                        .count(),
                )
                .unwrap_or(u32::MAX),
                memory_bytes: vm.memory_bytes.unwrap_or(0),
                guest_gpu_uj: {
                    let mut uj = self.guest_gpu.remove(&vm.id).unwrap_or_default();
                    let known = self.guest_devices.entry(vm.id.clone()).or_default();
                    known.extend(uj.keys().cloned());
                    for d in known.iter() {
                        uj.entry(d.clone()).or_insert(0);
                    }
                    uj
                },
            });
            next_prev.insert(vm.id.clone(), now);
        }
        self.prev_vm_cpu = next_prev;
        self.guest_gpu.clear();
        // A set, not a scan of `vms` per entry: quadratic at a thousand VMs.
        let live: HashSet<&VmId> = vms.iter().map(|vm| &vm.id).collect();
        self.guest_devices.retain(|id, _| live.contains(id));
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds of one interval")]
        let busy: Vec<(VmId, f64)> = intervals
            .iter()
            .map(|i| {
                let ns: u64 = i.cpu_ns.iter().sum();
                (i.id.clone(), ns as f64 / (interval_ns.max(1) as f64))
            })
            .collect();

        let input = IntervalInput {
            zones: sample
                .zones
                .iter()
                .filter_map(|z| Some((z.key.clone(), z.delta_uj?)))
                .collect(),
            cpu_package: self.cpu_package.clone(),
            busy_ns,
            interval_ns,
            vms: intervals,
            gpu_processes: sample
                .gpu_processes
                .iter()
                .map(|p| (p.device.clone(), p.pid, p.sm_util_percent))
                .collect(),
            gpu_vgpus: attribution::vgpu::shares(&sample.vgpus, vms),
            idle_policy: self.idle_policy,
        };
        let splits = attribution::split(&input);
        self.ledger.add(&splits);
        self.ledger.retire_vms(|id| live.contains(id));
        let secs = sample.interval.as_secs_f64();
        let mut out = self.snapshot(&sample.zones, secs);
        if secs > 0.0 {
            #[expect(
                clippy::cast_precision_loss,
                reason = "milliseconds since 1970 fit f64 exactly"
            )]
            let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
            let rows: Vec<(VmId, f64, f64)> = busy
                .into_iter()
                .map(|(id, b)| {
                    let w = out.vm_interval_joules.get(&id).copied().unwrap_or(0.0) / secs;
                    (id, b, w)
                })
                .collect();
            self.forecaster.add(now, secs, &rows);
            out.forecasts = self.forecaster.forecasts(now);
            out.forecast_error = self.forecaster.error_ratio();
        }
        out
    }

    fn snapshot(&mut self, readings: &[ZoneReading], interval_s: f64) -> EnergySnapshot {
        let mut model = self.meters.model_status();
        if let Some((t, _)) = &self.trainer {
            model.extend(t.status());
        }
        let mut out = EnergySnapshot {
            meters: self.meters.status(),
            model,
            ..EnergySnapshot::default()
        };
        for z in readings {
            let totals = self.ledger.zones.get(&z.key);
            out.zones.push(NodeZone {
                key: z.key.clone(),
                joules: z.total_uj.map(joules),
                watts: self
                    .node_power
                    .watts(&z.key, z.delta_uj.map(joules), interval_s),
                wraps: z.wraps,
                glitches: z.glitches,
                idle_joules: totals.map_or(0.0, |t| t.idle),
                unattributed_joules: totals.map_or(0.0, |t| t.unattributed),
            });
        }
        // GPUs only a guest measures: the node's energy there is what its VM was charged.
        for (key, t) in &self.ledger.zones {
            if key.source == crate::energy::MeterSource::GuestNvml {
                let last: f64 = t.last_vms.values().sum();
                out.zones.push(NodeZone {
                    key: key.clone(),
                    joules: Some(t.node),
                    watts: self.node_power.watts(key, Some(last), interval_s),
                    wraps: 0,
                    glitches: 0,
                    idle_joules: t.idle,
                    unattributed_joules: t.unattributed,
                });
            }
        }
        for (key, t) in &self.ledger.zones {
            for (id, e) in &t.vms {
                let last = t.last_vms.get(id).copied().unwrap_or(0.0);
                let watts = self
                    .vm_power
                    .watts(&(id.clone(), key.clone()), Some(last), interval_s)
                    // Before its first full window: this interval's own figure.
                    .unwrap_or(if interval_s > 0.0 {
                        last / interval_s
                    } else {
                        0.0
                    });
                let slot = out
                    .vms
                    .entry(id.clone())
                    .or_default()
                    .entry((key.zone, key.source.label()))
                    .or_default();
                slot.0 += e;
                slot.1 += watts;
                if CARBON_ZONES.contains(&key.zone) {
                    *out.vm_interval_joules.entry(id.clone()).or_default() += last;
                }
            }
        }
        let zones = &self.ledger.zones;
        self.vm_power
            .retain(|(id, key)| zones.get(key).is_some_and(|t| t.vms.contains_key(id)));
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn power_is_never_computed_over_a_sliver_of_an_interval() {
        let mut w = PowerWindow::<u8>::default();
        // The first sample closes 5 ms holding one 10 ms fixture step (0.2 J at 20 W):
        // 40 W over that sliver. No gauge yet.
        assert_eq!(w.watts(&0, Some(0.2), 0.005), None);
        // The next full interval carries the sliver in: 20.2 J over 1.005 s.
        let first = w.watts(&0, Some(20.0), 1.0).unwrap();
        assert!((first - 20.2 / 1.005).abs() < 1e-12, "{first}");
        // A phase switch 20 ms into the next interval: the gauge keeps its value...
        assert_eq!(w.watts(&0, Some(0.0), 0.02), Some(first));
        // ...and the rest of that interval completes the window.
        let second = w.watts(&0, Some(19.6), 0.98).unwrap();
        assert!((second - 19.6).abs() < 1e-12, "{second}");
        // An unavailable zone has no power, and its window starts afresh.
        assert_eq!(w.watts(&0, None, 1.0), None);
        assert_eq!(w.watts(&0, Some(0.1), 0.1), Some(second));
        w.retain(|_| false);
        assert_eq!(w.watts(&0, Some(0.1), 0.1), None);
    }
}
