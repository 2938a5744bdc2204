//! The VM phase families: per phase name, a VM's CPU seconds and attributed energy, and
//! which phase it is in. Only the phase *name* is a label (at most 64 per VM, then `other`);
//! phase labels such as `epoch=3` stay in `/api/v1/phases`. Written only when some VM has
//! phases.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::{labelled_counters, labelled_gauges, VmLabels};
use crate::discovery::VmId;
use crate::phase::{joules, seconds};
use crate::sampler::Snapshot;

pub(super) fn encode(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    if s.phases.is_empty() {
        return Ok(());
    }
    // A KubeVirt VM's phase series carry its vm_namespace, as its other series do.
    let namespace_of = |id: &VmId| {
        s.vms
            .iter()
            .find(|vm| &vm.id == id)
            .and_then(|vm| vm.namespace.as_deref())
    };
    let totals: Vec<_> = s
        .phases
        .iter()
        .map(|(id, l)| (id, namespace_of(id), l.totals(), l.current().name.clone()))
        .collect();
    labelled_counters(
        enc,
        "optimus_vm_phase_energy",
        "Energy attributed to a VM while in each phase (optimus phase), per zone and meter source; a VM's phases add up to its optimus_vm_energy_joules_total",
        Some(&Unit::Joules),
        totals.iter().flat_map(|(id, ns, t, _)| {
            t.iter().flat_map(move |(name, p)| {
                p.usage.energy_uj.iter().map(move |((zone, source), uj)| {
                    let rest = [
                        ("phase", name.as_str()),
                        ("zone", zone.label()),
                        ("source", *source),
                    ];
                    let labels = VmLabels {
                        id,
                        namespace: *ns,
                        rest,
                    };
                    (labels, joules(*uj))
                })
            })
        }),
    )?;
    labelled_counters(
        enc,
        "optimus_vm_phase_cpu",
        "On-CPU time of a VM's threads while in each phase (optimus phase)",
        Some(&Unit::Seconds),
        totals.iter().flat_map(|(id, ns, t, _)| {
            t.iter().map(move |(name, p)| {
                (
                    VmLabels {
                        id,
                        namespace: *ns,
                        rest: [("phase", name.as_str())],
                    },
                    seconds(p.usage.cpu_ns),
                )
            })
        }),
    )?;
    labelled_gauges(
        enc,
        "optimus_vm_phase_info",
        "1 for the phase a VM is in now, 0 for its other phases so far",
        None,
        totals.iter().flat_map(|(id, ns, t, current)| {
            t.keys().map(move |name| {
                (
                    VmLabels {
                        id,
                        namespace: *ns,
                        rest: [("phase", name.as_str())],
                    },
                    if name == current { 1.0 } else { 0.0 },
                )
            })
        }),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use crate::discovery::VmId;
    use crate::energy::Zone;
    use crate::phase::{parse_line, PhaseLedger, Usage};
    use crate::sampler::Snapshot;

    #[test]
    fn phase_families_name_only_the_phase() {
        let id = VmId {
            name: "vm \"1\"".into(),
            uuid: "u-1".into(),
        };
        let mut l = PhaseLedger::new(0, Usage::default(), 10);
        let cum = |cpu: u64, uj: u64| Usage {
            cpu_ns: cpu,
            energy_uj: BTreeMap::from([((Zone::Package, "estimated"), uj)]),
            ..Usage::default()
        };
        l.observe(1, &cum(1_000_000_000, 2_000_000));
        l.switch(1, parse_line(b"train epoch=7").unwrap().unwrap());
        l.observe(2, &cum(3_500_000_000, 2_500_000));
        let s = Snapshot {
            phases: BTreeMap::from([(id, l)]),
            ..Snapshot::default()
        };
        let text = crate::exporter::to_classic(&crate::exporter::render(&s).unwrap());
        for line in [
            "optimus_vm_phase_cpu_seconds_total{vm_name=\"vm \\\"1\\\"\",vm_uuid=\"u-1\",phase=\"train\"} 2.5",
            "optimus_vm_phase_cpu_seconds_total{vm_name=\"vm \\\"1\\\"\",vm_uuid=\"u-1\",phase=\"(none)\"} 1.0",
            "optimus_vm_phase_energy_joules_total{vm_name=\"vm \\\"1\\\"\",vm_uuid=\"u-1\",phase=\"train\",zone=\"package\",source=\"estimated\"} 0.5",
            "optimus_vm_phase_info{vm_name=\"vm \\\"1\\\"\",vm_uuid=\"u-1\",phase=\"train\"} 1",
            "optimus_vm_phase_info{vm_name=\"vm \\\"1\\\"\",vm_uuid=\"u-1\",phase=\"(none)\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert!(
            !text.contains("epoch"),
            "labels never become Prometheus labels"
        );
        // No phases anywhere: no phase families at all.
        let empty = crate::exporter::render(&Snapshot::default()).unwrap();
        assert!(!empty.contains("optimus_vm_phase"));
    }
}
