//! The energy half of a sample: reads the meters, turns the tracer's cumulative CPU time
//! into this interval's shares and hands both to [`crate::attribution`].

use std::collections::{BTreeMap, HashMap};

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
            // Clamped: the running slice makes a read slightly early or late, never less
            // than what the kernel already counted.
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
            });
            next_prev.insert(vm.id.clone(), now);
        }
        self.prev_vm_cpu = next_prev;

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
            idle_policy: self.idle_policy,
        };
        let splits = attribution::split(&input);
        self.ledger.add(&splits);
        self.ledger
            .retire_vms(|id| vms.iter().any(|vm| &vm.id == id));
        self.snapshot(&sample.zones, sample.interval.as_secs_f64())
    }

    fn snapshot(&self, readings: &[ZoneReading], interval_s: f64) -> EnergySnapshot {
        let mut out = EnergySnapshot {
            meters: self.meters.status(),
            ..EnergySnapshot::default()
        };
        for z in readings {
            let totals = self.ledger.zones.get(&z.key);
            out.zones.push(NodeZone {
                key: z.key.clone(),
                joules: z.total_uj.map(joules),
                watts: z
                    .delta_uj
                    .filter(|_| interval_s > 0.0)
                    .map(|d| joules(d) / interval_s),
                wraps: z.wraps,
                idle_joules: totals.map_or(0.0, |t| t.idle),
                unattributed_joules: totals.map_or(0.0, |t| t.unattributed),
            });
        }
        for (key, t) in &self.ledger.zones {
            for (id, e) in &t.vms {
                let last = t.last_vms.get(id).copied().unwrap_or(0.0);
                let watts = if interval_s > 0.0 {
                    last / interval_s
                } else {
                    0.0
                };
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
        out
    }
}
