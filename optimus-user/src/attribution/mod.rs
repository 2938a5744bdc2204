//! Attribution: splits each interval's node energy, per zone and device, between VMs, host
//! processes (unattributed) and idle, so that for every zone and device
//!
//! ```text
//! Σ VMs + unattributed + idle = node energy
//! ```
//!
//! holds at every sample (up to floating-point rounding). Pure arithmetic: no I/O, no clock.
//!
//! Rules (README "Attribution"):
//! - **CPU zones** (`package`, `core`, `uncore`, `dram` of `package-N`; `psys` over all
//!   CPUs): the zone's *active fraction* is the busy time of its CPUs (anything but the idle
//!   task, from eBPF) over (its CPU count × the interval); the rest is idle. Active energy
//!   goes to threads by their on-CPU time on that package's CPUs, so a vCPU that ran on
//!   socket 1 is charged from socket 1's counter. A VM is the sum of its threads; every
//!   other thread is host (unattributed). `dram` uses the same CPU-time share: no per-thread
//!   memory-traffic signal is available without hardware counters.
//! - **GPU zones**: active fraction = min(1, Σ SM utilisation of the processes and vGPU
//!   instances on it); active energy goes to each by its SM-utilisation share; a process that
//!   is a VM's QEMU charges that VM, a vGPU instance charges the VM NVML says it belongs to
//!   (matched by [`vgpu::vm_of`]; a VM seen both ways on one GPU counts once, by its vGPU),
//!   other processes and instances of no known VM are host (unattributed, never dropped);
//!   the rest is idle.
//! - **Idle**: stays node idle, unless an [`IdlePolicy`] spreads it over running VMs by
//!   vCPU count or memory size (cloud-billing style).

use std::collections::{BTreeMap, HashMap};

use crate::discovery::VmId;
use crate::energy::{MeterSource, Zone, ZoneKey};

pub mod vgpu;

/// What to do with idle energy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IdlePolicy {
    /// Idle energy stays node idle.
    #[default]
    None,
    /// Spread over running VMs by vCPU count.
    Vcpus,
    /// Spread over running VMs by memory size.
    Memory,
}

/// One VM's share signals for one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct VmInterval {
    pub id: VmId,
    /// On-CPU nanoseconds of all its threads in the interval, per CPU (index = CPU id).
    pub cpu_ns: Vec<u64>,
    /// QEMU process id (GPU processes are matched on it).
    pub pid: u32,
    /// vCPU and memory size, for the idle policies.
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// GPU energy its guest measured on passthrough GPUs the host cannot see, accepted by
    /// the guest channel: microjoules per device (`pci-<host address>`). All of it is the
    /// VM's (source `guest-nvml`).
    pub guest_gpu_uj: BTreeMap<String, u64>,
}

/// Everything one interval's split needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntervalInput {
    /// Energy of each available zone in the interval, microjoules.
    pub zones: Vec<(ZoneKey, u64)>,
    /// Package number of each CPU (index = CPU id).
    pub cpu_package: Vec<u32>,
    /// Busy nanoseconds of each CPU in the interval; `None` when the tracer could not be
    /// read (then all active energy is host energy and idle is unknown: all unattributed).
    pub busy_ns: Option<Vec<u64>>,
    /// Length of the interval, nanoseconds.
    pub interval_ns: u64,
    pub vms: Vec<VmInterval>,
    /// GPU processes: device (`gpu-0`), pid, SM utilisation in percent.
    pub gpu_processes: Vec<(String, u32, u32)>,
    /// vGPU instances: device (`gpu-0`), the VM it belongs to (`None`: no running VM
    /// matches, so its share is host energy), SM utilisation in percent.
    pub gpu_vgpus: Vec<(String, Option<VmId>, u32)>,
    pub idle_policy: IdlePolicy,
}

/// One zone's split, joules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZoneSplit {
    pub node: f64,
    pub idle: f64,
    pub unattributed: f64,
    pub vms: BTreeMap<VmId, f64>,
}

const UJ_PER_J: f64 = 1e6;

#[expect(
    clippy::cast_precision_loss,
    reason = "energy and time deltas of one interval"
)]
fn f(v: u64) -> f64 {
    v as f64
}

/// Which package a `package-N` device names; `None` for other devices.
fn package_index(device: &str) -> Option<u32> {
    device.strip_prefix("package-")?.parse().ok()
}

/// Splits one interval.
pub fn split(input: &IntervalInput) -> Vec<(ZoneKey, ZoneSplit)> {
    let guest = input.vms.iter().flat_map(|vm| {
        vm.guest_gpu_uj.iter().map(|(device, uj)| {
            let j = f(*uj) / UJ_PER_J;
            let key = ZoneKey::new(Zone::Gpu, device.clone(), MeterSource::GuestNvml);
            let split = ZoneSplit {
                node: j,
                vms: [(vm.id.clone(), j)].into(),
                ..ZoneSplit::default()
            };
            (key, split)
        })
    });
    input
        .zones
        .iter()
        .map(|(key, uj)| (key.clone(), split_zone(input, key, f(*uj) / UJ_PER_J)))
        .chain(guest)
        .collect()
}

fn split_zone(input: &IntervalInput, key: &ZoneKey, energy: f64) -> ZoneSplit {
    let mut out = ZoneSplit {
        node: energy,
        ..ZoneSplit::default()
    };
    // Active fraction and each VM's weight within the active part.
    let (active_fraction, weights, total_weight) = if key.zone == Zone::Gpu {
        gpu_shares(input, &key.device)
    } else {
        match &input.busy_ns {
            Some(busy) => cpu_shares(input, busy, package_index(&key.device)),
            None => (1.0, Vec::new(), 1.0),
        }
    };
    let active = energy * active_fraction.clamp(0.0, 1.0);
    let mut idle = energy - active;
    for (id, w) in weights {
        if w > 0.0 && total_weight > 0.0 {
            *out.vms.entry(id).or_default() += active * (w / total_weight);
        }
    }
    let spread = idle_spread(input);
    if !spread.is_empty() && idle > 0.0 {
        let total: f64 = spread.iter().map(|(_, w)| w).sum();
        for (id, w) in spread {
            let e = idle * (w / total);
            *out.vms.entry(id).or_default() += e;
        }
        idle = 0.0;
    }
    out.idle = idle;
    // Host = the residual, so the identity holds exactly by construction; clamped at 0
    // against rounding (VM weights never exceed the active total).
    let vms: f64 = out.vms.values().sum();
    out.unattributed = (energy - idle - vms).max(0.0);
    out
}

/// (active fraction, VM weights, total weight) for a CPU zone of package `pkg` (`None`:
/// a platform zone such as psys, over all CPUs).
fn cpu_shares(
    input: &IntervalInput,
    busy: &[u64],
    pkg: Option<u32>,
) -> (f64, Vec<(VmId, f64)>, f64) {
    let on_pkg = |cpu: usize| match pkg {
        Some(p) => input.cpu_package.get(cpu).copied().unwrap_or(0) == p,
        None => true,
    };
    let ncpus = (0..input.cpu_package.len().max(busy.len()))
        .filter(|&c| on_pkg(c))
        .count();
    let cap = f(input.interval_ns) * f(u64::try_from(ncpus).unwrap_or(0));
    let busy_total: f64 = busy
        .iter()
        .enumerate()
        .filter(|(c, _)| on_pkg(*c))
        .map(|(_, b)| f(*b))
        .sum();
    let weights: Vec<(VmId, f64)> = input
        .vms
        .iter()
        .map(|vm| {
            let ns: f64 = vm
                .cpu_ns
                .iter()
                .enumerate()
                .filter(|(c, _)| on_pkg(*c))
                .map(|(_, n)| f(*n))
                .sum();
            (vm.id.clone(), ns)
        })
        .collect();
    let vm_total: f64 = weights.iter().map(|(_, w)| w).sum();
    // Two clocks read microseconds apart can make VM time exceed busy time by a hair;
    // normalise by the larger so VM shares never exceed the active energy.
    let busy_total = busy_total.max(vm_total);
    let active_fraction = if cap > 0.0 { busy_total / cap } else { 0.0 };
    (active_fraction, weights, busy_total)
}

fn gpu_shares(input: &IntervalInput, device: &str) -> (f64, Vec<(VmId, f64)>, f64) {
    let by_pid: HashMap<u32, &VmId> = input.vms.iter().map(|vm| (vm.pid, &vm.id)).collect();
    let util = |percent: u32| f(u64::from(percent)) / 100.0;
    let on_vgpu: Vec<&VmId> = input
        .gpu_vgpus
        .iter()
        .filter(|(d, _, _)| d == device)
        .filter_map(|(_, vm, _)| vm.as_ref())
        .collect();
    // Every user of the GPU with its SM share: processes (a VM when the pid is its QEMU),
    // then vGPU instances (a VM when NVML's VM id matched one). A VM seen both ways on this
    // GPU counts once, by its vGPU: a driver that also lists the QEMU behind a vGPU as a
    // process shows the same work twice.
    let users: Vec<(Option<&VmId>, f64)> = input
        .gpu_processes
        .iter()
        .filter(|(d, _, _)| d == device)
        .map(|(_, pid, u)| (by_pid.get(pid).copied(), util(*u)))
        .filter(|(vm, _)| vm.is_none_or(|vm| !on_vgpu.contains(&vm)))
        .chain(
            input
                .gpu_vgpus
                .iter()
                .filter(|(d, _, _)| d == device)
                .map(|(_, vm, u)| (vm.as_ref(), util(*u))),
        )
        .collect();
    let total: f64 = users.iter().map(|(_, u)| u).sum();
    let weights = users
        .iter()
        .filter_map(|(vm, u)| Some(((*vm)?.clone(), *u)))
        .collect();
    (total.min(1.0), weights, total)
}

fn idle_spread(input: &IntervalInput) -> Vec<(VmId, f64)> {
    let weight = |vm: &VmInterval| match input.idle_policy {
        IdlePolicy::None => 0.0,
        IdlePolicy::Vcpus => f(u64::from(vm.vcpus)),
        IdlePolicy::Memory => f(vm.memory_bytes),
    };
    input
        .vms
        .iter()
        .map(|vm| (vm.id.clone(), weight(vm)))
        .filter(|(_, w)| *w > 0.0)
        .collect()
}

/// Cumulative attribution since the agent started: what the exporter shows.
#[derive(Debug, Default)]
pub struct EnergyLedger {
    pub zones: BTreeMap<ZoneKey, ZoneTotals>,
}

/// Cumulative joules of one zone and device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZoneTotals {
    pub node: f64,
    pub idle: f64,
    pub unattributed: f64,
    pub vms: BTreeMap<VmId, f64>,
    /// Each VM's share of the last interval, joules (for power).
    pub last_vms: BTreeMap<VmId, f64>,
}

impl EnergyLedger {
    /// Adds one interval's split.
    pub fn add(&mut self, splits: &[(ZoneKey, ZoneSplit)]) {
        for (key, s) in splits {
            let t = self.zones.entry(key.clone()).or_default();
            t.node += s.node;
            t.idle += s.idle;
            t.unattributed += s.unattributed;
            t.last_vms.clone_from(&s.vms);
            for (id, e) in &s.vms {
                *t.vms.entry(id.clone()).or_default() += e;
            }
        }
    }

    /// Retires VMs that are gone: their joules move to `unattributed`, so the identity
    /// keeps holding on the exported series after theirs vanish.
    pub fn retire_vms(&mut self, live: impl Fn(&VmId) -> bool) {
        for t in self.zones.values_mut() {
            let gone: Vec<VmId> = t.vms.keys().filter(|id| !live(id)).cloned().collect();
            for id in gone {
                if let Some(e) = t.vms.remove(&id) {
                    t.unattributed += e;
                }
                t.last_vms.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
