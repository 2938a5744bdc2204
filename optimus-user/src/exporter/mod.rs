//! Exporter: renders the latest [`Snapshot`] as OpenMetrics text (served by [`crate::http`]).
//!
//! Metric names are a contract (README "Metrics"); every family is written from the
//! snapshot on each scrape, so series of VMs that are gone simply stop appearing.

mod capacity;
mod guest;
mod phases;

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::discovery::VmId;
use crate::sampler::blockio::{direction_label, DeviceIo, Io};
use crate::sampler::carbon::CarbonSnapshot;
use crate::sampler::cpu::KINDS;
use crate::sampler::energy::{EnergySnapshot, NodeZone};
use crate::sampler::{SharedSnapshot, Snapshot, VmSnapshot};

/// Renders a snapshot into OpenMetrics text.
pub fn render(snapshot: &Snapshot) -> Result<String, fmt::Error> {
    render_arc(std::sync::Arc::new(snapshot.clone()))
}

/// Renders a shared snapshot without copying it (the collector must own what it encodes).
fn render_arc(snapshot: std::sync::Arc<Snapshot>) -> Result<String, fmt::Error> {
    // About 3 KB of text per VM: one allocation, not a dozen doublings of a 3 MB string.
    let capacity = 4096 + snapshot.vms.len() * 3072;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::with_capacity(capacity);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Renders whatever the sampler published last.
pub fn render_shared(shared: &SharedSnapshot) -> Result<String, fmt::Error> {
    let snapshot = match shared.read() {
        Ok(guard) => std::sync::Arc::clone(&guard),
        Err(poisoned) => std::sync::Arc::clone(&poisoned.into_inner()),
    };
    render_arc(snapshot)
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

/// Sources of `optimus_sample_errors_total`, exported from the start (at 0) so that a rate
/// over them works before the first failure.
pub const SAMPLE_ERROR_SOURCES: [&str; 6] = [
    "proc", "libvirt", "tracer", "block_io", "cgroups", "sampler",
];

#[derive(Debug)]
struct SnapshotCollector(std::sync::Arc<Snapshot>);

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// A VM's series labels: `vm_name`, `vm_uuid`, then `vm_namespace` for a KubeVirt VM only
/// (other VMs' series keep their exact label set), then `rest`.
struct VmLabels<'a, const N: usize> {
    id: &'a VmId,
    namespace: Option<&'a str>,
    rest: Labels<'a, N>,
}

fn vm_labels<'a, const N: usize>(vm: &'a VmSnapshot, rest: Labels<'a, N>) -> VmLabels<'a, N> {
    VmLabels {
        id: &vm.id,
        namespace: vm.namespace.as_deref(),
        rest,
    }
}

impl<const N: usize> EncodeLabelSet for VmLabels<'_, N> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        [
            ("vm_name", self.id.name.as_str()),
            ("vm_uuid", self.id.uuid.as_str()),
        ]
        .encode(encoder)?;
        if let Some(namespace) = self.namespace {
            [("vm_namespace", namespace)].encode(encoder)?;
        }
        self.rest.encode(encoder)
    }
}

/// Writes one family of counters.
pub(crate) fn counters<'a, const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (Labels<'a, N>, f64)>,
) -> fmt::Result {
    labelled_counters(enc, name, help, unit, series)
}

/// Writes one family of counters whose label sets are any [`EncodeLabelSet`] (VM series).
fn labelled_counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, f64)>,
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
pub(crate) fn gauges<'a, const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (Labels<'a, N>, f64)>,
) -> fmt::Result {
    labelled_gauges(enc, name, help, unit, series)
}

/// Writes one family of gauges whose label sets are any [`EncodeLabelSet`] (VM series).
fn labelled_gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, f64)>,
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
pub(crate) fn count(v: u64) -> f64 {
    v as f64
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &*self.0;
        // Inside a VM (`optimus guest`): only that VM's own families.
        if let Some(view) = &s.guest_view {
            return crate::guest::metrics::encode(&mut enc, view);
        }
        // Info metrics are gauges named `*_info` with value 1 (what OpenMetrics' info type
        // means): the classic text parser of `promtool check metrics` rejects type `info`.
        gauges(
            &mut enc,
            "optimus_build_info",
            "Optimus build information",
            None,
            [([("version", env!("CARGO_PKG_VERSION"))], 1.0)],
        )?;
        labelled_gauges(
            &mut enc,
            "optimus_vm_info",
            "A VM on this host: its name, UUID and where its identity comes from (libvirt or proc)",
            None,
            s.vms
                .iter()
                .map(|vm| (vm_labels(vm, [("source", vm.source.as_str())]), 1.0)),
        )?;

        labelled_counters(
            &mut enc,
            "optimus_vm_cpu",
            "On-CPU time of a VM's threads by kind (vcpu, emulator, iothread, vhost; unclassified instead of vcpu when its vCPU threads cannot be told apart), from eBPF sched_switch",
            Some(&Unit::Seconds),
            s.vms.iter().flat_map(|vm| {
                // No vCPU thread known: no vcpu series (not a measured-looking zero), the
                // time is under `unclassified`.
                let skip = if vm.vcpu_seconds.is_empty() {
                    "vcpu"
                } else {
                    "unclassified"
                };
                KINDS
                    .iter()
                    .zip(vm.cpu_seconds_by_kind)
                    .filter(move |(kind, _)| **kind != skip)
                    .map(|(kind, v)| {
                    (vm_labels(vm, [("thread_kind", *kind)]), v)
                    })
            }),
        )?;

        let vcpu_labels: Vec<(&VmSnapshot, String, f64)> = s
            .vms
            .iter()
            .flat_map(|vm| {
                vm.vcpu_seconds
                    .iter()
                    .map(move |(n, v)| (vm, n.to_string(), *v))
            })
            .collect();
        labelled_counters(
            &mut enc,
            "optimus_vcpu_cpu",
            "On-CPU time of one vCPU thread, from eBPF sched_switch",
            Some(&Unit::Seconds),
            vcpu_labels
                .iter()
                .map(|(vm, n, v)| (vm_labels(vm, [("vcpu", n.as_str())]), *v)),
        )?;

        // One series per VM and direction, valued by `pick` (bytes or operations).
        let vm_io = |pick: fn(&Io) -> u64| {
            s.vms.iter().flat_map(move |vm| {
                ["read", "write"]
                    .into_iter()
                    .zip(vm.block_io)
                    .map(move |(dir, io)| (vm_labels(vm, [("direction", dir)]), count(pick(&io))))
            })
        };
        labelled_counters(
            &mut enc,
            "optimus_vm_block_io",
            "Block I/O of a VM: submitted by its QEMU process, plus kernel writeback of pages its memory cgroup owns",
            Some(&Unit::Bytes),
            vm_io(|io| io.bytes),
        )?;
        labelled_counters(
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

        capacity::encode(&mut enc, s)?;
        phases::encode(&mut enc, s)?;
        guest::encode(&mut enc, s)?;

        gauges(
            &mut enc,
            "optimus_vms",
            "VMs found in the last scan",
            None,
            [([], count(s.vms.len() as u64))],
        )?;
        counters(
            &mut enc,
            "optimus_vm_identity_conflicts",
            "Processes that claimed the UUID of a VM another process already is (never merged into it; their time stays unattributed)",
            None,
            [([], count(s.agent.identity_conflicts))],
        )?;
        counters(
            &mut enc,
            "optimus_vms_over_limit",
            "VMs left out because --max-vms was reached (each counted once per stretch over the cap)",
            None,
            [([], count(s.agent.vms_over_limit))],
        )?;
        counters(
            &mut enc,
            "optimus_discovery_rescan_missed",
            "Processes or thread lists that the full /proc rescan (every 30 s) found changed although the kernel's change events had not reported them",
            None,
            [([], count(s.agent.discovery_rescan_missed))],
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
        let sources = SAMPLE_ERROR_SOURCES
            .iter()
            .copied()
            .chain(a.sample_errors.keys().copied())
            .collect::<std::collections::BTreeSet<&str>>();
        counters(
            &mut enc,
            "optimus_sample_errors",
            "Failures of a data source while sampling, by source (its previous data was kept)",
            None,
            sources.into_iter().map(|source| {
                (
                    [("source", source)],
                    count(a.sample_errors.get(source).copied().unwrap_or(0)),
                )
            }),
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

fn encode_energy<'a>(
    enc: &mut DescriptorEncoder,
    s: &'a Snapshot,
    e: &EnergySnapshot,
) -> fmt::Result {
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
    let zd_glitch: Vec<([(&'static str, &str); 2], u64)> = {
        let mut by: std::collections::BTreeMap<(&'static str, &str), u64> =
            std::collections::BTreeMap::new();
        for z in &e.zones {
            *by.entry((z.key.zone.label(), z.key.device.as_str()))
                .or_default() += z.glitches;
        }
        by.into_iter()
            .map(|((zone, device), n)| ([("zone", zone), ("device", device)], n))
            .collect()
    };
    counters(
        enc,
        "optimus_node_energy_glitches",
        "Energy counter steps rejected because the power they imply is above the zone's plausible maximum (that interval's energy is unknown, never added)",
        None,
        zd_glitch.iter().map(|(l, n)| (*l, count(*n))),
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
    encode_model(enc, &e.model)?;
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
    let rows: Vec<(&VmSnapshot, &'static str, &'static str, f64, f64)> = s
        .vms
        .iter()
        .filter_map(|vm| e.vms.get(&vm.id).map(|z| (vm, z)))
        .flat_map(|(vm, z)| {
            z.iter()
                .map(move |((zone, source), (j, w))| (vm, zone.label(), *source, *j, *w))
        })
        .collect();
    let labels = |r: &(&'a VmSnapshot, &'static str, &'static str, f64, f64)| {
        vm_labels(r.0, [("zone", r.1), ("source", r.2)])
    };
    labelled_counters(
        enc,
        "optimus_vm_energy",
        "Energy attributed to a VM per zone (summed over devices) and meter source",
        Some(&Unit::Joules),
        rows.iter().map(|r| (labels(r), r.3)),
    )?;
    labelled_gauges(
        enc,
        "optimus_vm_power",
        "Average power attributed to a VM over the last sampling interval per zone and source",
        Some(&Unit::Other("watts".into())),
        rows.iter().map(|r| (labels(r), r.4)),
    )?;
    encode_forecasts(enc, s, e)
}

/// Per-VM power and energy forecasts for the next hour and day, and their scored error.
fn encode_forecasts(enc: &mut DescriptorEncoder, s: &Snapshot, e: &EnergySnapshot) -> fmt::Result {
    use crate::model::forecast::HORIZONS;
    let rows: Vec<(&VmSnapshot, &'static str, f64, f64)> = s
        .vms
        .iter()
        .filter_map(|vm| Some((vm, e.forecasts.get(&vm.id)?)))
        .flat_map(|(vm, f)| {
            HORIZONS
                .iter()
                .zip(f.watts)
                .map(move |((h, secs), w)| (vm, *h, w, w * secs))
        })
        .collect();
    labelled_gauges(
        enc,
        "optimus_vm_power_forecast",
        "Forecast mean power of a VM (package + dram + gpu) over the next hour or day: its daily profile of busy CPUs (its recent mean while it has less than a day of history) times its watts per busy CPU",
        Some(&Unit::Other("watts".into())),
        rows.iter().map(|r| (vm_labels(r.0, [("horizon", r.1)]), r.2)),
    )?;
    labelled_gauges(
        enc,
        "optimus_vm_energy_forecast",
        "Forecast energy of a VM over the next hour or day (the forecast power times the horizon)",
        Some(&Unit::Joules),
        rows.iter()
            .map(|r| (vm_labels(r.0, [("horizon", r.1)]), r.3)),
    )?;
    gauges(
        enc,
        "optimus_vm_power_forecast_error_ratio",
        "Mean absolute percentage error (as a ratio) of the VMs' power forecasts scored against what happened (last 200 forecasts), per horizon; absent until the first falls due",
        None,
        HORIZONS
            .iter()
            .zip(e.forecast_error)
            .filter_map(|((h, _), err)| Some(([("horizon", *h)], err?))),
    )
}

/// The power model's families: live error and samples beside a meter; where predicting,
/// the error it had where it was trained, and how often it extrapolated.
fn encode_model(
    enc: &mut DescriptorEncoder,
    model: &[crate::model::ZoneModelStatus],
) -> fmt::Result {
    let labels = |m: &'_ crate::model::ZoneModelStatus| -> [(&'static str, String); 2] {
        [
            ("zone", m.zone.label().to_owned()),
            ("device", m.device.clone()),
        ]
    };
    let rows: Vec<_> = model.iter().map(|m| (labels(m), m)).collect();
    gauges(
        enc,
        "optimus_power_model_error_ratio",
        "Rolling mean absolute percentage error (as a ratio) of the power model's one-interval-ahead prediction against the meter, over the last 300 intervals; where the model predicts (source=\"model\"), its error when it was saved on the host it was trained on",
        None,
        rows.iter()
            .filter_map(|(l, m)| Some((borrowed(l), m.error_ratio?))),
    )?;
    counters(
        enc,
        "optimus_power_model_samples",
        "Intervals the power model learnt from, per zone and device",
        None,
        rows.iter().map(|(l, m)| (borrowed(l), count(m.samples))),
    )?;
    counters(
        enc,
        "optimus_power_model_extrapolated",
        "Intervals the power model predicted with a feature outside the range it was trained on (source=\"model\")",
        None,
        rows.iter()
            .filter_map(|(l, m)| Some((borrowed(l), count(m.extrapolated?)))),
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
    gauges(
        enc,
        "optimus_grid_carbon_intensity_forecast_grams_per_kwh",
        "Forecast grid carbon intensity the `horizon` label ahead of now (1h to 48h), grams CO2eq per kWh, from providers that publish forecasts (ukgrid, electricitymaps)",
        None,
        c.intensity.iter().flat_map(|(_, zone, source)| {
            forecast_labels(&c.forecast)
                .map(move |(h, g)| ([("zone", zone.as_str()), ("source", *source), ("horizon", h)], g))
        }),
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
    labelled_counters(
        enc,
        "optimus_vm_carbon_grams",
        "Grams CO2eq of a VM's energy (package + dram + gpu zones) at the intensity in force during each interval, times the PUE",
        None,
        s.vms.iter().filter_map(|vm| {
            let g = c.vm_grams.get(&vm.id)?;
            Some((vm_labels(vm, []), *g))
        }),
    )
}

/// `(hours, g/kWh)` as `("6h", g)`, the labels being static strings for 1 to 48 hours.
fn forecast_labels(forecast: &[(u32, f64)]) -> impl Iterator<Item = (&'static str, f64)> + '_ {
    forecast.iter().filter_map(|(h, g)| {
        let i = usize::try_from(*h).ok()?.checked_sub(1)?;
        Some((*HORIZONS.get(i)?, *g))
    })
}

/// Horizon label values, `HORIZONS[h - 1]` for `h` hours ahead.
pub const HORIZONS: [&str; 48] = [
    "1h", "2h", "3h", "4h", "5h", "6h", "7h", "8h", "9h", "10h", "11h", "12h", "13h", "14h", "15h",
    "16h", "17h", "18h", "19h", "20h", "21h", "22h", "23h", "24h", "25h", "26h", "27h", "28h",
    "29h", "30h", "31h", "32h", "33h", "34h", "35h", "36h", "37h", "38h", "39h", "40h", "41h",
    "42h", "43h", "44h", "45h", "46h", "47h", "48h",
];

#[cfg(test)]
mod tests;
