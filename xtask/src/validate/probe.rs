//! One instant of a measurement window: the agent's scrape taken right after a sample, and
//! the oracles read at once after it (the synthetic meter's truth, each VM's schedstat and
//! `/proc/<pid>/io`, the agent's own usage) in; one window's comparison out.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context as _, Result};
use optimus_tests::proc::proc_io;
use serde::Serialize;

use super::agent::Metrics;
use super::meter::Totals;
use super::Ctx;

/// A VM under test, as the oracles find it.
#[derive(Clone, Debug)]
pub struct VmRef {
    pub name: String,
    pub uuid: String,
    pub pid: u32,
}

/// What one VM's oracles say at one instant.
#[derive(Clone, Copy, Debug, Default)]
struct VmOracle {
    cpu_ns: u64,
    cpu_oracle: CpuOracle,
    io: (u64, u64),
}

/// Everything read at one instant.
pub struct Probe {
    at: Instant,
    pub metrics: Metrics,
    /// The estimating agent's scrape, taken right after, where the host has a real meter.
    estimate: Option<Metrics>,
    meter: Totals,
    vms: BTreeMap<String, VmOracle>,
}

/// Σ over the live threads of `pid` of their on-CPU nanoseconds (schedstat's first field;
/// it includes the slice running now).
pub fn process_cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry.with_context(|| format!("reading {dir}"))?;
        // A thread can exit between readdir and read: its time is lost to the oracle
        // (QEMU's vCPU and main threads live as long as the VM).
        if let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Where a VM's CPU time came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuOracle {
    /// Its libvirt cgroup's usage (`cpuacct.usage` or `cpu.stat` `usage_usec`): the same
    /// per-task runtime schedstat reports, summed over every QEMU thread, exited ones too.
    #[default]
    Cgroup,
    /// Σ schedstat of the QEMU process's live threads (no libvirt cgroup found).
    Threads,
}

/// The VM's on-CPU nanoseconds and where they came from: its libvirt cgroup, else its live
/// threads. The cgroup matters: QEMU starts and ends helper threads (boot, I/O workers),
/// and a thread that exits inside a window is missing from a sum over live threads.
pub fn vm_cpu_ns(pid: u32) -> Result<(u64, CpuOracle)> {
    match cgroup_cpu_ns(pid) {
        Some(ns) => Ok((ns, CpuOracle::Cgroup)),
        None => Ok((process_cpu_ns(pid)?, CpuOracle::Threads)),
    }
}

/// The usage of the libvirt cgroup (`…/machine/qemu-N-NAME.libvirt-qemu`) holding `pid`,
/// nanoseconds: cgroup v2 (or the unified hierarchy of a hybrid v1 host) `cpu.stat`, else v1
/// `cpuacct.usage`.
fn cgroup_cpu_ns(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(end) = path
            .find(".libvirt-qemu")
            .map(|i| i + ".libvirt-qemu".len())
        else {
            continue;
        };
        let dir = path.get(..end).unwrap_or(path).trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            // v2, or v1 with the unified hierarchy beside it (hybrid): `usage_usec` is there
            // even without the cpu controller.
            for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let stat = std::fs::read_to_string(format!("{mount}/{dir}/cpu.stat")).ok();
                if let Some(us) = stat.as_deref().and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                }) {
                    return Some(us * 1000);
                }
            }
        } else if controllers.split(',').any(|c| c == "cpuacct") {
            for mount in [controllers, "cpuacct", "cpu,cpuacct"] {
                let usage = format!("/sys/fs/cgroup/{mount}/{dir}/cpuacct.usage");
                if let Some(ns) = std::fs::read_to_string(usage)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    return Some(ns);
                }
            }
        }
    }
    None
}

impl Probe {
    /// The agent's next sample, then at once every oracle.
    pub fn take(ctx: &Ctx<'_>, vms: &[VmRef]) -> Result<Self> {
        let metrics = ctx.agent.next_sample()?;
        let at = Instant::now();
        let meter = ctx.meter.totals()?;
        let mut oracles = BTreeMap::new();
        for vm in vms {
            let (cpu_ns, cpu_oracle) = vm_cpu_ns(vm.pid)?;
            let o = VmOracle {
                cpu_ns,
                cpu_oracle,
                io: proc_io(vm.pid)?,
            };
            oracles.insert(vm.uuid.clone(), o);
        }
        let estimate = match ctx.estimate {
            Some(agent) => Some(agent.next_sample()?),
            None => None,
        };
        Ok(Self {
            at,
            metrics,
            estimate,
            meter,
            vms: oracles,
        })
    }
}

/// One VM over one window: what the agent exported against the oracles.
#[derive(Clone, Debug, Serialize)]
pub struct VmWindow {
    pub vm_name: String,
    /// Σ `optimus_vm_cpu_seconds_total` over thread kinds, and the kernel's runtime of the
    /// VM's threads (what schedstat counts), over the window.
    pub cpu_seconds_exported: f64,
    pub cpu_seconds_schedstat: f64,
    /// Where `cpu_seconds_schedstat` came from: `cgroup` (every QEMU thread, exited ones
    /// included) or `threads` (Σ schedstat of the live threads).
    pub cpu_oracle: CpuOracle,
    /// `optimus_vm_energy_joules_total{zone="package"}` over the window, and the truth:
    /// the meter's dynamic energy (above `P(0)`) × the VM's schedstat CPU-seconds / the
    /// host's busy CPU-seconds.
    pub energy_joules_exported: f64,
    pub energy_joules_truth: f64,
    /// Optimus' own rule applied to the oracles: the meter's energy × the VM's schedstat
    /// CPU-seconds / (the host's CPUs × the window). Exported against this is the
    /// implementation's error; against `truth`, the rule's.
    pub energy_joules_rule: f64,
    /// Those over the node's energy (exported, and the meter's).
    pub share_exported: f64,
    pub share_truth: f64,
    /// `optimus_vm_block_io_bytes_total` and `/proc/<pid>/io` (`read_bytes`,
    /// `write_bytes`) over the window.
    pub io_read_bytes_exported: f64,
    pub io_write_bytes_exported: f64,
    pub io_read_bytes_proc: f64,
    pub io_write_bytes_proc: f64,
    /// `optimus_vm_power_forecast_watts{horizon="1h"}` at the window's start (absent while
    /// the agent has no forecast yet), and the VM's mean exported power over the window.
    pub forecast_watts: Option<f64>,
    pub power_watts: f64,
}

/// One window of a scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    pub label: String,
    pub seconds: f64,
    /// The host's busy CPUs over the window (`/proc/stat`, everything on it).
    pub busy_cpus: f64,
    /// The node's package energy exported, and the meter's, over the window.
    pub node_energy_joules_exported: f64,
    pub node_energy_joules_meter: f64,
    /// `node − Σ VMs − host − idle` of the package totals at the window's end, J.
    pub conservation_residual_joules: f64,
    /// Where the host has a real RAPL meter: its package energy over the window, and the
    /// estimate's (`source="estimated"`, from a second agent without the meter; its scrape
    /// is taken right after the first agent's, so its window ends up to one interval later).
    pub rapl_joules: Option<f64>,
    pub estimate_joules: Option<f64>,
    pub vms: Vec<VmWindow>,
}

#[expect(clippy::cast_precision_loss, reason = "nanoseconds and bytes of a run")]
fn f(v: u64) -> f64 {
    v as f64
}

/// The comparison of `a` and `b` for `vms`.
pub fn window(label: &str, a: &Probe, b: &Probe, vms: &[VmRef], cpus: usize) -> Window {
    let seconds = b.at.duration_since(a.at).as_secs_f64();
    let zone = [("zone", "package")];
    let delta = |name: &str, labels: &[(&str, &str)]| {
        b.metrics.total(name, labels) - a.metrics.total(name, labels)
    };
    let node = delta("optimus_node_energy_joules_total", &zone);
    let meter_j = b.meter.energy_j - a.meter.energy_j;
    let dynamic = b.meter.dynamic_j - a.meter.dynamic_j;
    let busy = b.meter.busy_cpu_s - a.meter.busy_cpu_s;
    #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
    let cpus_f = cpus as f64;
    let vms = vms
        .iter()
        .map(|vm| {
            let id = ("vm_uuid", vm.uuid.as_str());
            let (o0, o1) = (
                a.vms.get(&vm.uuid).copied().unwrap_or_default(),
                b.vms.get(&vm.uuid).copied().unwrap_or_default(),
            );
            let cpu_sched = f(o1.cpu_ns.saturating_sub(o0.cpu_ns)) / 1e9;
            let energy = delta("optimus_vm_energy_joules_total", &[id, zone[0]]);
            let truth = if busy > 0.0 {
                dynamic * (cpu_sched / busy).min(1.0)
            } else {
                0.0
            };
            let io = |d: &str| delta("optimus_vm_block_io_bytes_total", &[id, ("direction", d)]);
            VmWindow {
                vm_name: vm.name.clone(),
                cpu_seconds_exported: delta("optimus_vm_cpu_seconds_total", &[id]),
                cpu_seconds_schedstat: cpu_sched,
                cpu_oracle: o1.cpu_oracle,
                energy_joules_exported: energy,
                energy_joules_truth: truth,
                energy_joules_rule: ratio(meter_j * cpu_sched, cpus_f * seconds),
                share_exported: ratio(energy, node),
                share_truth: ratio(truth, meter_j),
                io_read_bytes_exported: io("read"),
                io_write_bytes_exported: io("write"),
                io_read_bytes_proc: f(o1.io.0.saturating_sub(o0.io.0)),
                io_write_bytes_proc: f(o1.io.1.saturating_sub(o0.io.1)),
                forecast_watts: a
                    .metrics
                    .sum("optimus_vm_power_forecast_watts", &[id, ("horizon", "1h")]),
                power_watts: ratio(energy, seconds),
            }
        })
        .collect();
    Window {
        label: label.to_owned(),
        seconds,
        busy_cpus: ratio(busy, seconds),
        node_energy_joules_exported: node,
        node_energy_joules_meter: meter_j,
        conservation_residual_joules: b.metrics.conservation_residual(),
        rapl_joules: b.meter.rapl_j.zip(a.meter.rapl_j).map(|(b, a)| b - a),
        estimate_joules: b.estimate.as_ref().zip(a.estimate.as_ref()).map(|(b, a)| {
            let est = [("zone", "package"), ("source", "estimated")];
            b.total("optimus_node_energy_joules_total", &est)
                - a.total("optimus_node_energy_joules_total", &est)
        }),
        vms,
    }
}

/// `a / b`, 0 when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}
