//! What `optimus guest` serves on /metrics: its VM's own figures as the host agent last
//! sent them, under the host agent's metric names, plus what the guest itself measured.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use crate::channel::protocol::{Figures, GpuReading};
use crate::exporter::{count, counters, gauges};

/// The guest's view, kept in the snapshot the HTTP server renders.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestView {
    /// The host's last figures; `None` before the first.
    pub figures: Option<Figures>,
    /// Whether figures arrived within the last few host intervals.
    pub fresh: bool,
    /// The last reading of each GPU, as sent to the host.
    pub gpus: Vec<GpuReading>,
}

#[expect(clippy::cast_precision_loss, reason = "millijoules, far below 2^53")]
fn joules(r: &GpuReading) -> Option<f64> {
    Some(r.energy_mj.as_u64()? as f64 / 1e3)
}

/// The families of a [`GuestView`].
pub fn encode<'a>(enc: &mut DescriptorEncoder, v: &'a GuestView) -> fmt::Result {
    gauges(
        enc,
        "optimus_build_info",
        "Optimus build information",
        None,
        [([("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    )?;
    gauges(
        enc,
        "optimus_guest_channel_connected",
        "1 while the host agent's figures arrive over the guest channel (within the last 5 host intervals), else 0",
        None,
        [([], if v.fresh { 1.0 } else { 0.0 })],
    )?;
    counters(
        enc,
        "optimus_guest_gpu_energy",
        "Energy of a GPU of this VM as its NVML reads it here (method counter: the GPU's energy counter; power: power integrated since optimus guest started), as claimed to the host",
        Some(&Unit::Joules),
        v.gpus.iter().filter_map(|g| {
            Some((
                [
                    ("gpu_uuid", g.uuid.as_str()),
                    ("pci_bus_id", g.pci_bus_id.as_str()),
                    ("method", g.method.as_str()),
                ],
                joules(g)?,
            ))
        }),
    )?;
    let Some(f) = &v.figures else {
        return Ok(());
    };
    let vm = |rest: (&'static str, &'a str)| {
        [
            ("vm_name", f.vm_name.as_str()),
            ("vm_uuid", f.vm_uuid.as_str()),
            rest,
        ]
    };
    gauges(
        enc,
        "optimus_guest_host_interval",
        "The host agent's sample number (its optimus_samples_total) that the figures below are from",
        None,
        [([], count(f.interval))],
    )?;
    gauges(
        enc,
        "optimus_vm_info",
        "This VM as the host agent knows it: its name and UUID",
        None,
        [(
            [
                ("vm_name", f.vm_name.as_str()),
                ("vm_uuid", f.vm_uuid.as_str()),
            ],
            1.0,
        )],
    )?;
    let skip = if f.vcpu_seconds.is_empty() {
        "vcpu"
    } else {
        "unclassified"
    };
    counters(
        enc,
        "optimus_vm_cpu",
        "On-CPU time of this VM's threads on the host by kind, from the host agent's eBPF",
        Some(&Unit::Seconds),
        f.cpu_seconds
            .iter()
            .filter(|(k, _)| k.as_str() != skip)
            .map(|(k, s)| (vm(("thread_kind", k.as_str())), *s)),
    )?;
    let mut vcpus: Vec<(&String, f64)> = f.vcpu_seconds.iter().map(|(n, s)| (n, *s)).collect();
    // In vCPU order (1, 2, 10), not text order.
    vcpus.sort_by_key(|(n, _)| n.parse::<u32>().unwrap_or(u32::MAX));
    counters(
        enc,
        "optimus_vcpu_cpu",
        "On-CPU time of one vCPU thread of this VM on the host, from the host agent's eBPF",
        Some(&Unit::Seconds),
        vcpus.iter().map(|(n, s)| {
            (
                [
                    ("vm_name", f.vm_name.as_str()),
                    ("vm_uuid", f.vm_uuid.as_str()),
                    ("vcpu", n.as_str()),
                ],
                *s,
            )
        }),
    )?;
    let energy = || f.energy.iter();
    let labels = |z: &'a crate::channel::protocol::ZoneFigure| {
        [
            ("vm_name", f.vm_name.as_str()),
            ("vm_uuid", f.vm_uuid.as_str()),
            ("zone", z.zone.as_str()),
            ("source", z.source.as_str()),
        ]
    };
    counters(
        enc,
        "optimus_vm_energy",
        "Energy the host agent attributed to this VM per zone and meter source",
        Some(&Unit::Joules),
        energy().map(|z| (labels(z), z.joules)),
    )?;
    gauges(
        enc,
        "optimus_vm_power",
        "Average power the host agent attributed to this VM over its last sampling interval",
        Some(&Unit::Other("watts".into())),
        energy().map(|z| (labels(z), z.watts)),
    )?;
    if let Some(g) = f.carbon_grams {
        counters(
            enc,
            "optimus_vm_carbon_grams",
            "Grams CO2eq of this VM's energy, as the host agent counts them",
            None,
            [(
                [
                    ("vm_name", f.vm_name.as_str()),
                    ("vm_uuid", f.vm_uuid.as_str()),
                ],
                g,
            )],
        )?;
    }
    if let Some(p) = &f.phase {
        gauges(
            enc,
            "optimus_vm_phase_info",
            "This VM's current phase on the host agent (1)",
            None,
            [(vm(("phase", p.as_str())), 1.0)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::channel::protocol::ZoneFigure;
    use crate::sampler::Snapshot;

    #[test]
    fn renders_only_the_vms_own_families_under_the_host_names() {
        let view = GuestView {
            figures: Some(Figures {
                interval: 42,
                interval_seconds: 1.0,
                vm_name: "web".into(),
                vm_uuid: "u-1".into(),
                cpu_seconds: [("vcpu".to_owned(), 3.5), ("unclassified".to_owned(), 0.0)].into(),
                vcpu_seconds: [("10".to_owned(), 1.0), ("2".to_owned(), 2.5)].into(),
                energy: vec![ZoneFigure {
                    zone: "gpu".into(),
                    source: "guest-nvml".into(),
                    joules: 35.0,
                    watts: 5.0,
                }],
                carbon_grams: Some(0.5),
                phase: Some("train".into()),
            }),
            fresh: true,
            gpus: vec![GpuReading {
                uuid: "GPU-x".into(),
                pci_bus_id: "00000000:00:05.0".into(),
                energy_mj: 1_075_000u64.into(),
                method: "counter".into(),
            }],
        };
        let text = crate::exporter::to_classic(
            &crate::exporter::render(&Snapshot {
                guest_view: Some(view),
                ..Snapshot::default()
            })
            .unwrap(),
        );
        for line in [
            "optimus_guest_host_interval 42",
            "optimus_vm_cpu_seconds_total{vm_name=\"web\",vm_uuid=\"u-1\",thread_kind=\"vcpu\"} 3.5",
            "optimus_vm_energy_joules_total{vm_name=\"web\",vm_uuid=\"u-1\",zone=\"gpu\",source=\"guest-nvml\"} 35.0",
            "optimus_vm_carbon_grams_total{vm_name=\"web\",vm_uuid=\"u-1\"} 0.5",
            "optimus_vm_phase_info{vm_name=\"web\",vm_uuid=\"u-1\",phase=\"train\"} 1",
            "optimus_guest_gpu_energy_joules_total{gpu_uuid=\"GPU-x\",pci_bus_id=\"00000000:00:05.0\",method=\"counter\"} 1075.0",
        ] {
            let found = text.lines().any(|l| l.replace("{}", "").starts_with(line));
            assert!(found, "no {line:?} in:\n{text}");
        }
        assert!(!text.contains("unclassified"), "{text}");
        // vCPUs in numeric order; none of the host's own families.
        let v2 = text.find("vcpu=\"2\"").unwrap();
        assert!(v2 < text.find("vcpu=\"10\"").unwrap());
        for host_only in ["optimus_samples_total", "optimus_node_", "optimus_agent_"] {
            let series = text.lines().filter(|l| !l.starts_with('#'));
            assert!(
                !series.clone().any(|l| l.starts_with(host_only)),
                "{host_only} in:\n{text}"
            );
        }
    }
}
