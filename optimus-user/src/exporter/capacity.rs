//! The capacity family: each VM's size and the host's size and load, what
//! `optimus advise` needs to place VMs (snapshot in, gauges and one counter out).

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::{count, counters, gauges, labelled_gauges, vm_labels};
use crate::sampler::Snapshot;

pub(super) fn encode(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    labelled_gauges(
        enc,
        "optimus_vm_vcpus",
        "vCPUs of a VM (its vCPU threads)",
        None,
        s.vms
            .iter()
            .filter_map(|vm| Some((vm_labels(vm, []), f64::from(vm.vcpus?)))),
    )?;
    labelled_gauges(
        enc,
        "optimus_vm_memory",
        "Guest memory size of a VM (QEMU -m)",
        Some(&Unit::Bytes),
        s.vms
            .iter()
            .filter_map(|vm| Some((vm_labels(vm, []), count(vm.memory_bytes?)))),
    )?;
    let n = &s.node;
    gauges(
        enc,
        "optimus_node_cpus",
        "Online logical CPUs of the host",
        None,
        (n.cpus > 0).then(|| ([], f64::from(n.cpus))),
    )?;
    gauges(
        enc,
        "optimus_node_memory",
        "Memory of the host (MemTotal)",
        Some(&Unit::Bytes),
        n.memory_bytes.map(|b| ([], count(b))),
    )?;
    gauges(
        enc,
        "optimus_node_memory_available",
        "Memory available without swapping (MemAvailable)",
        Some(&Unit::Bytes),
        n.memory_available_bytes.map(|b| ([], count(b))),
    )?;
    counters(
        enc,
        "optimus_node_cpu_busy",
        "Busy time of all CPUs together since the agent started, from the kernel's idle accounting (rate = busy CPUs)",
        Some(&Unit::Seconds),
        n.cpu_busy_seconds.map(|v| ([], v)),
    )
}
