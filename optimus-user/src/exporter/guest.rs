//! The guest channel's families: per VM with a channel, whether the agent is connected,
//! the messages it accepted and the lines and claims it refused. No family at all when no
//! VM has a channel, so such a host's output is what it was before channels existed.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;

use super::{count, labelled_counters, labelled_gauges, vm_labels};
use crate::channel::protocol::ErrorKind;
use crate::sampler::Snapshot;

/// Message types counted in `optimus_guest_channel_messages_total`.
const MESSAGE_TYPES: [&str; 3] = ["hello", "gpu", "phase"];

pub(super) fn encode(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    if s.guest_channels.is_empty() {
        return Ok(());
    }
    let vms: Vec<_> = s
        .vms
        .iter()
        .filter_map(|vm| Some((vm, s.guest_channels.get(&vm.id)?)))
        .collect();
    labelled_gauges(
        enc,
        "optimus_guest_channel_connected",
        "1 while the agent is connected to the VM's guest channel socket (virtio-serial org.optimus.agent.0), else 0",
        None,
        vms.iter()
            .map(|(vm, c)| (vm_labels(vm, []), if c.connected { 1.0 } else { 0.0 })),
    )?;
    labelled_counters(
        enc,
        "optimus_guest_channel_messages",
        "Messages from the VM's guest agent that were accepted, by type (a gpu message's refused readings are counted as errors)",
        None,
        vms.iter().flat_map(|(vm, c)| {
            MESSAGE_TYPES.iter().map(move |t| {
                (
                    vm_labels(vm, [("type", *t)]),
                    count(c.messages.get(t).copied().unwrap_or(0)),
                )
            })
        }),
    )?;
    let reported: Vec<_> = vms
        .iter()
        .flat_map(|(vm, c)| {
            c.reported_mj
                .iter()
                .map(move |(d, mj)| (*vm, d.as_str(), *mj))
        })
        .collect();
    labelled_gauges(
        enc,
        "optimus_guest_gpu_reported_energy_joules",
        "The last accepted energy reading of a passthrough GPU as the guest's NVML reported it (its energy counter, or its integral of power); the VM's guest-nvml GPU energy is the sum of the accepted increases",
        None,
        reported
            .iter()
            .map(|(vm, d, mj)| (vm_labels(vm, [("device", *d)]), joules(*mj))),
    )?;
    labelled_counters(
        enc,
        "optimus_guest_channel_errors",
        "Lines and claims from the VM's guest that were refused and dropped, by kind (malformed, oversized, flood, version, invalid_value, wrong_vm, not_owned, non_monotonic, over_max_watts, bad_phase)",
        None,
        vms.iter().flat_map(|(vm, c)| {
            ErrorKind::ALL.iter().map(move |k| {
                (
                    vm_labels(vm, [("kind", k.label())]),
                    count(c.errors.get(k).copied().unwrap_or(0)),
                )
            })
        }),
    )
}

#[expect(clippy::cast_precision_loss, reason = "millijoules, far below 2^53")]
fn joules(mj: u64) -> f64 {
    mj as f64 / 1e3
}
