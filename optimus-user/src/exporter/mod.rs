//! Exporter: renders the latest [`Snapshot`] as OpenMetrics text and serves it over HTTP.
//!
//! Metric names are a contract (README "Metrics"); every family is written from the
//! snapshot on each scrape, so series of VMs that are gone simply stop appearing.

pub mod http;

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::discovery::VmId;
use crate::sampler::blockio::{direction_label, DeviceIo, Io};
use crate::sampler::carbon::CarbonSnapshot;
use crate::sampler::cpu::KINDS;
use crate::sampler::energy::{EnergySnapshot, NodeZone};
use crate::sampler::{SharedSnapshot, Snapshot};

/// Renders a snapshot into OpenMetrics text.
pub fn render(snapshot: &Snapshot) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(std::sync::Arc::new(
        snapshot.clone(),
    ))));
    let mut out = String::with_capacity(4096 + snapshot.vms.len() * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Renders whatever the sampler published last.
pub fn render_shared(shared: &SharedSnapshot) -> Result<String, fmt::Error> {
    let snapshot = match shared.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    render(&snapshot)
}

/// Rewrites OpenMetrics text into the classic Prometheus text format (0.0.4), for clients
/// that do not ask for OpenMetrics (curl, `promtool check metrics`, older scrapers).
///
/// The two differ only where this matters: a classic counter family is named with its
/// `_total` suffix, and there are no `# UNIT` or `# EOF` lines.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct SnapshotCollector(std::sync::Arc<Snapshot>);

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// Writes one family of counters.
fn counters<'a, const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (Labels<'a, N>, f64)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in series {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, f64>(&value, None)?;
    }
    Ok(())
}

/// Writes one family of gauges.
fn gauges<'a, const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (Labels<'a, N>, f64)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

#[expect(
    clippy::cast_precision_loss,
    reason = "event counts stay far below 2^53 for the life of a host"
)]
fn count(v: u64) -> f64 {
    v as f64
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &*self.0;
        // Info metrics are gauges named `*_info` with value 1 (what OpenMetrics' info type
        // means): the classic text parser of `promtool check metrics` rejects type `info`.
        gauges(
            &mut enc,
            "optimus_build_info",
            "Optimus build information",
            None,
            [([("version", env!("CARGO_PKG_VERSION"))], 1.0)],
        )?;
        gauges(
            &mut enc,
            "optimus_vm_info",
            "A VM on this host: its name, UUID and where its identity comes from (libvirt or proc)",
            None,
            s.vms.iter().map(|vm| {
                (
                    [
                        ("vm_name", vm.id.name.as_str()),
                        ("vm_uuid", vm.id.uuid.as_str()),
                        ("source", vm.source.as_str()),
                    ],
                    1.0,
                )
            }),
        )?;

        counters(
            &mut enc,
            "optimus_vm_cpu",
            "On-CPU time of a VM's threads by kind (vcpu, emulator, iothread, vhost), from eBPF sched_switch",
            Some(&Unit::Seconds),
            s.vms.iter().flat_map(|vm| {
                KINDS.iter().zip(vm.cpu_seconds_by_kind).map(|(kind, v)| {
                    (
                        [
                            ("vm_name", vm.id.name.as_str()),
                            ("vm_uuid", vm.id.uuid.as_str()),
                            ("thread_kind", *kind),
                        ],
                        v,
                    )
                })
            }),
        )?;

        let vcpu_labels: Vec<(&VmId, String, f64)> = s
            .vms
            .iter()
            .flat_map(|vm| {
                vm.vcpu_seconds
                    .iter()
                    .map(move |(n, v)| (&vm.id, n.to_string(), *v))
            })
            .collect();
        counters(
            &mut enc,
            "optimus_vcpu_cpu",
            "On-CPU time of one vCPU thread, from eBPF sched_switch",
            Some(&Unit::Seconds),
            vcpu_labels.iter().map(|(id, n, v)| {
                (
                    [
                        ("vm_name", id.name.as_str()),
                        ("vm_uuid", id.uuid.as_str()),
                        ("vcpu", n.as_str()),
                    ],
                    *v,
                )
            }),
        )?;

        // One series per VM and direction, valued by `pick` (bytes or operations).
        let vm_io = |pick: fn(&Io) -> u64| {
            s.vms.iter().flat_map(move |vm| {
                ["read", "write"]
                    .into_iter()
                    .zip(vm.block_io)
                    .map(move |(dir, io)| {
                        (
                            [
                                ("vm_name", vm.id.name.as_str()),
                                ("vm_uuid", vm.id.uuid.as_str()),
                                ("direction", dir),
                            ],
                            count(pick(&io)),
                        )
                    })
            })
        };
        counters(
            &mut enc,
            "optimus_vm_block_io",
            "Block I/O of a VM: submitted by its QEMU process, plus kernel writeback of pages its memory cgroup owns",
            Some(&Unit::Bytes),
            vm_io(|io| io.bytes),
        )?;
        counters(
            &mut enc,
            "optimus_vm_block_io_operations",
            "Block I/O requests of a VM (as for optimus_vm_block_io_bytes_total)",
            None,
            vm_io(|io| io.ops),
        )?;
        let devices: Vec<(&str, &str, &DeviceIo)> = s
            .block_devices
            .iter()
            .map(|((dev, dir), io)| (dev.as_str(), direction_label(*dir), io))
            .collect();
        let bytes_dirs = || {
            devices
                .iter()
                .filter(|(_, dir, _)| matches!(*dir, "read" | "write"))
        };
        counters(
            &mut enc,
            "optimus_node_block_io",
            "Block I/O bytes per device, everything the block layer did (VMs + other processes + unattributed)",
            Some(&Unit::Bytes),
            bytes_dirs().map(|(dev, dir, io)| ([("device", *dev), ("direction", *dir)], count(io.total.bytes))),
        )?;
        counters(
            &mut enc,
            "optimus_node_block_io_unattributed",
            "Block I/O bytes submitted by kernel threads (writeback, journal) for pages no VM owns: no process to charge",
            Some(&Unit::Bytes),
            bytes_dirs().map(|(dev, dir, io)| {
                ([("device", *dev), ("direction", *dir)], count(io.unattributed.bytes))
            }),
        )?;
        counters(
            &mut enc,
            "optimus_node_block_io_vm",
            "Block I/O bytes per device charged to VMs (their QEMU processes and kernel writeback of their pages)",
            Some(&Unit::Bytes),
            bytes_dirs().map(|(dev, dir, io)| {
                ([("device", *dev), ("direction", *dir)], count(io.vms.bytes))
            }),
        )?;
        counters(
            &mut enc,
            "optimus_node_block_io_vm_writeback",
            "Block I/O bytes kernel threads submitted for pages a VM's memory cgroup owns (part of optimus_node_block_io_vm_bytes_total)",
            Some(&Unit::Bytes),
            bytes_dirs().map(|(dev, dir, io)| {
                ([("device", *dev), ("direction", *dir)], count(io.vm_writeback.bytes))
            }),
        )?;
        counters(
            &mut enc,
            "optimus_node_block_io_operations",
            "Block I/O requests per device, direction read, write, discard or flush",
            None,
            devices.iter().map(|(dev, dir, io)| {
                ([("device", *dev), ("direction", *dir)], count(io.total.ops))
            }),
        )?;

        if let Some(e) = &s.energy {
            encode_energy(&mut enc, s, e)?;
        }
        if let Some(c) = &s.carbon {
            encode_carbon(&mut enc, s, c)?;
        }

        gauges(
            &mut enc,
            "optimus_vms",
            "VMs found in the last scan",
            None,
            [([], count(s.vms.len() as u64))],
        )?;

        let a = &s.agent;
        counters(
            &mut enc,
            "optimus_agent_cpu",
            "CPU time the agent itself has used (user + system)",
            Some(&Unit::Seconds),
            [([], a.cpu_seconds)],
        )?;
        gauges(
            &mut enc,
            "optimus_agent_resident_memory",
            "Resident memory of the agent",
            Some(&Unit::Bytes),
            [([], count(a.resident_bytes))],
        )?;
        counters(
            &mut enc,
            "optimus_ebpf_events",
            "Events seen by an eBPF program",
            None,
            [([("program", "sched_switch")], count(a.sched_switch_events))],
        )?;
        counters(
            &mut enc,
            "optimus_ebpf_dropped",
            "Records an eBPF program could not store because its map was full",
            None,
            [([], count(a.ebpf_dropped))],
        )?;
        counters(
            &mut enc,
            "optimus_samples",
            "Samples taken by the agent",
            None,
            [([], count(a.samples))],
        )?;
        counters(
            &mut enc,
            "optimus_sample_errors",
            "Samples in which a data source failed (its previous data was kept)",
            None,
            [([], count(a.sample_errors))],
        )?;
        gauges(
            &mut enc,
            "optimus_sample_duration",
            "How long the last sample took",
            Some(&Unit::Seconds),
            [([], a.last_sample_seconds)],
        )?;
        Ok(())
    }
}

/// Owned label values as the borrowed form the encoders take.
fn borrowed<'a, const N: usize>(
    l: &'a [(&'static str, String); N],
) -> [(&'static str, &'a str); N] {
    l.each_ref().map(|(k, v)| (*k, v.as_str()))
}

fn zone_labels(z: &NodeZone) -> [(&'static str, &str); 3] {
    [
        ("zone", z.key.zone.label()),
        ("device", z.key.device.as_str()),
        ("source", z.key.source.label()),
    ]
}

fn encode_energy(enc: &mut DescriptorEncoder, s: &Snapshot, e: &EnergySnapshot) -> fmt::Result {
    counters(
        enc,
        "optimus_node_energy",
        "Energy the node used per zone and device, from a meter (rapl-powercap, rapl-perf, nvml) or estimated (source=\"estimated\"); psys contains package, package contains core and uncore: do not add them",
        Some(&Unit::Joules),
        e.zones
            .iter()
            .filter_map(|z| Some((zone_labels(z), z.joules?))),
    )?;
    gauges(
        enc,
        "optimus_node_power",
        "Average power over the last sampling interval per zone and device",
        Some(&Unit::Other("watts".into())),
        e.zones
            .iter()
            .filter_map(|z| Some((zone_labels(z), z.watts?))),
    )?;
    gauges(
        enc,
        "optimus_node_energy_zone_available",
        "1 when the zone's meter could be read at the last sample, 0 when it is unavailable (its energy series is then absent, never zero)",
        None,
        e.zones
            .iter()
            .map(|z| (zone_labels(z), if z.joules.is_some() { 1.0 } else { 0.0 })),
    )?;
    counters(
        enc,
        "optimus_node_energy_wraps",
        "Energy counter wrap-arounds corrected (never dropped)",
        None,
        e.zones.iter().map(|z| (zone_labels(z), count(z.wraps))),
    )?;
    gauges(
        enc,
        "optimus_energy_meter_info",
        "Each energy meter and its state (active, standby, not found, not permitted, failed, disabled)",
        None,
        e.meters
            .iter()
            .map(|m| ([("source", m.source.label()), ("state", m.state.label())], 1.0)),
    )?;
    let zd = |z: &'_ NodeZone| -> [(&'static str, String); 2] {
        [
            ("zone", z.key.zone.label().to_owned()),
            ("device", z.key.device.clone()),
        ]
    };
    let idle: Vec<_> = e.zones.iter().map(|z| (zd(z), z.idle_joules)).collect();
    let unattributed: Vec<_> = e
        .zones
        .iter()
        .map(|z| (zd(z), z.unattributed_joules))
        .collect();
    counters(
        enc,
        "optimus_node_idle_energy",
        "Node energy attributed to idle (the zone's CPUs or GPU not busy), per zone and device",
        Some(&Unit::Joules),
        idle.iter().map(|(l, v)| (borrowed(l), *v)),
    )?;
    counters(
        enc,
        "optimus_node_unattributed_energy",
        "Active node energy of host processes (not a VM), per zone and device; VMs that stopped move here",
        Some(&Unit::Joules),
        unattributed.iter().map(|(l, v)| (borrowed(l), *v)),
    )?;
    let vm_rows: Vec<(&VmId, &'static str, &'static str, f64, f64)> = s
        .vms
        .iter()
        .filter_map(|vm| e.vms.get(&vm.id).map(|z| (&vm.id, z)))
        .flat_map(|(id, z)| {
            z.iter()
                .map(move |((zone, source), (j, w))| (id, zone.label(), *source, *j, *w))
        })
        .collect();
    let vm_labels =
        |r: &(&'_ VmId, &'static str, &'static str, f64, f64)| -> [(&'static str, String); 4] {
            [
                ("vm_name", r.0.name.clone()),
                ("vm_uuid", r.0.uuid.clone()),
                ("zone", r.1.to_owned()),
                ("source", r.2.to_owned()),
            ]
        };
    let rows: Vec<_> = vm_rows.iter().map(|r| (vm_labels(r), r.3, r.4)).collect();
    counters(
        enc,
        "optimus_vm_energy",
        "Energy attributed to a VM per zone (summed over devices) and meter source",
        Some(&Unit::Joules),
        rows.iter().map(|(l, j, _)| (borrowed(l), *j)),
    )?;
    gauges(
        enc,
        "optimus_vm_power",
        "Average power attributed to a VM over the last sampling interval per zone and source",
        Some(&Unit::Other("watts".into())),
        rows.iter().map(|(l, _, w)| (borrowed(l), *w)),
    )
}

fn encode_carbon(enc: &mut DescriptorEncoder, s: &Snapshot, c: &CarbonSnapshot) -> fmt::Result {
    gauges(
        enc,
        "optimus_grid_carbon_intensity_grams_per_kwh",
        "Grid carbon intensity in force, grams CO2eq per kWh (static, electricitymaps or ukgrid)",
        None,
        c.intensity
            .iter()
            .map(|(g, zone, source)| ([("zone", zone.as_str()), ("source", *source)], *g)),
    )?;
    gauges(
        enc,
        "optimus_grid_carbon_intensity_age",
        "Time since the intensity in force was fetched; it is kept when a refresh fails",
        Some(&Unit::Seconds),
        c.intensity
            .iter()
            .zip(c.age_seconds)
            .map(|((_, zone, source), age)| ([("zone", zone.as_str()), ("source", *source)], age)),
    )?;
    counters(
        enc,
        "optimus_grid_carbon_intensity_errors",
        "Failed refreshes of the carbon intensity, by kind",
        None,
        c.errors
            .iter()
            .map(|(kind, n)| ([("kind", *kind)], count(*n))),
    )?;
    counters(
        enc,
        "optimus_vm_carbon_grams",
        "Grams CO2eq of a VM's energy (package + dram + gpu zones) at the intensity in force during each interval, times the PUE",
        None,
        s.vms.iter().filter_map(|vm| {
            let g = c.vm_grams.get(&vm.id)?;
            Some((
                [("vm_name", vm.id.name.as_str()), ("vm_uuid", vm.id.uuid.as_str())],
                *g,
            ))
        }),
    )
}

#[cfg(test)]
mod tests;
