//! The JSON document of `GET /api/v1/snapshot`, one type for both ends: the agent
//! serialises it, `optimus top` deserialises it. Field names are a contract (README
//! "Live page"); units are in the names (`_watts`, `_joules`, `_grams`, `_seconds`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::history::{History, Point};
use crate::energy::MeterSource;
use crate::sampler::energy::CARBON_ZONES;
use crate::sampler::Snapshot;

/// The whole document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDoc {
    /// Agent version.
    pub version: String,
    /// Unix seconds of the snapshot; `null` before the first sample.
    pub time: Option<f64>,
    pub node: NodeDoc,
    /// `null` when no carbon intensity source is configured.
    pub carbon: Option<CarbonDoc>,
    pub vms: Vec<VmDoc>,
    pub agent: AgentDoc,
    pub history: HistoryDoc,
}

/// The node's meters and its power split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeDoc {
    /// Every zone of every meter (zones overlap: psys ⊃ package ⊃ core, uncore).
    pub zones: Vec<ZoneDoc>,
    /// package + dram + gpu over the last interval, W; `null` without any meter.
    pub power_watts: Option<f64>,
    /// package + dram + gpu since the agent started, J.
    pub energy_joules: Option<f64>,
    /// `power_watts` split into VMs, host processes and idle; `null` until two samples.
    pub split_watts: Option<SplitDoc>,
}

/// One meter zone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ZoneDoc {
    /// `package`, `core`, `uncore`, `dram`, `psys` or `gpu`.
    pub zone: String,
    /// `package-N`, `psys`, `gpu-N`.
    pub device: String,
    /// `rapl-perf`, `rapl-powercap`, `nvml` or `estimated`.
    pub source: String,
    /// False when `source` is `estimated` (a model, not a meter).
    pub measured: bool,
    /// False while the zone cannot be read (then `watts` and `joules` are `null`).
    pub available: bool,
    pub watts: Option<f64>,
    pub joules: Option<f64>,
}

/// Watts of VMs, host processes and idle; they add up to the node's package + dram + gpu.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitDoc {
    pub vms: f64,
    pub host: f64,
    pub idle: f64,
}

/// Grid intensity in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CarbonDoc {
    /// g CO2eq per kWh; `null` until the first good value.
    pub intensity_g_per_kwh: Option<f64>,
    pub zone: Option<String>,
    /// `static`, `electricitymaps` or `ukgrid`.
    pub source: Option<String>,
    /// Seconds since the value was fetched (APIs only).
    pub age_seconds: Option<f64>,
}

/// One VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmDoc {
    pub name: String,
    pub uuid: String,
    /// `libvirt` or `proc`.
    pub source: String,
    /// package + dram + gpu over the last interval, W.
    pub power_watts: f64,
    /// package + dram + gpu since the VM was first seen, J.
    pub energy_joules: f64,
    /// g CO2eq since first seen; `null` without a carbon source.
    pub carbon_grams: Option<f64>,
    /// On-CPU seconds of all its threads.
    pub cpu_seconds: f64,
    pub vcpus: Vec<VcpuDoc>,
    pub block_io: IoDoc,
    /// The phase it is in (`optimus phase`), `null` where none was ever set.
    pub phase: Option<String>,
}

/// One vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuDoc {
    pub vcpu: u32,
    pub cpu_seconds: f64,
    /// Busy fraction over the last interval (1.0 = one host CPU); `null` on the first sample.
    pub busy: Option<f64>,
}

/// Block I/O of a VM: totals and the last interval's rates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IoDoc {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_operations: u64,
    pub write_operations: u64,
    pub read_bytes_per_second: Option<f64>,
    pub write_bytes_per_second: Option<f64>,
}

/// The agent's own cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentDoc {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub ebpf_events: u64,
    pub ebpf_dropped: u64,
    pub samples: u64,
    pub sample_errors: u64,
    pub last_sample_seconds: f64,
}

/// Chart points of the last 15 minutes (or those after `?since=`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryDoc {
    pub window_seconds: f64,
    pub points: Vec<PointDoc>,
    /// Names of the VMs the points chart, by UUID.
    pub names: BTreeMap<String, String>,
}

/// One chart point, W.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PointDoc {
    /// Unix seconds.
    pub t: f64,
    pub node: Option<f64>,
    pub vms: f64,
    pub host: Option<f64>,
    pub idle: Option<f64>,
    /// The most powerful VMs (at most 8), by UUID.
    pub vm: BTreeMap<String, f64>,
}

fn history_doc(points: &[Point]) -> HistoryDoc {
    let mut names = BTreeMap::new();
    let points = points
        .iter()
        .map(|p| PointDoc {
            t: p.t,
            node: p.node_w,
            vms: p.vms_w,
            host: p.host_w,
            idle: p.idle_w,
            vm: p
                .vm_w
                .iter()
                .map(|(label, w)| {
                    names
                        .entry(label.uuid.clone())
                        .or_insert_with(|| label.name.clone());
                    (label.uuid.clone(), f64::from(*w))
                })
                .collect(),
        })
        .collect();
    HistoryDoc {
        window_seconds: super::history::WINDOW.as_secs_f64(),
        points,
        names,
    }
}

impl SnapshotDoc {
    /// The document for `snapshot`, with `history`'s rates and the points after `since`.
    pub fn new(snapshot: &Snapshot, history: &History, since: Option<f64>) -> Self {
        let rates = history.rates();
        let energy = snapshot.energy.as_ref();
        let zones: Vec<ZoneDoc> = energy
            .map(|e| {
                e.zones
                    .iter()
                    .map(|z| ZoneDoc {
                        zone: z.key.zone.label().to_owned(),
                        device: z.key.device.clone(),
                        source: z.key.source.label().to_owned(),
                        measured: !matches!(
                            z.key.source,
                            MeterSource::Estimated | MeterSource::Model
                        ),
                        available: z.joules.is_some(),
                        watts: z.watts,
                        joules: z.joules,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let carbon_zones = || {
            energy
                .into_iter()
                .flat_map(|e| &e.zones)
                .filter(|z| CARBON_ZONES.contains(&z.key.zone))
        };
        let sum = |vals: Vec<f64>| (!vals.is_empty()).then(|| vals.iter().sum::<f64>());
        let node = NodeDoc {
            power_watts: sum(carbon_zones().filter_map(|z| z.watts).collect()),
            energy_joules: sum(carbon_zones().filter_map(|z| z.joules).collect()),
            split_watts: rates.split.map(|s| SplitDoc {
                vms: s.vms,
                host: s.host,
                idle: s.idle,
            }),
            zones,
        };
        let carbon = snapshot.carbon.as_ref().map(|c| CarbonDoc {
            intensity_g_per_kwh: c.intensity.as_ref().map(|i| i.0),
            zone: c.intensity.as_ref().map(|i| i.1.clone()),
            source: c.intensity.as_ref().map(|i| i.2.to_owned()),
            age_seconds: c.age_seconds,
        });
        let vms = snapshot
            .vms
            .iter()
            .map(|vm| {
                let (power_watts, energy_joules) =
                    energy
                        .and_then(|e| e.vms.get(&vm.id))
                        .map_or((0.0, 0.0), |zones| {
                            zones
                                .iter()
                                .filter(|((zone, _), _)| CARBON_ZONES.contains(zone))
                                .fold((0.0, 0.0), |(w, j), (_, (vj, vw))| (w + vw, j + vj))
                        });
                let r = rates.vms.get(&vm.id.uuid);
                let [read, write] = vm.block_io;
                VmDoc {
                    name: vm.id.name.clone(),
                    uuid: vm.id.uuid.clone(),
                    source: vm.source.as_str().to_owned(),
                    power_watts,
                    energy_joules,
                    carbon_grams: snapshot
                        .carbon
                        .as_ref()
                        .and_then(|c| c.vm_grams.get(&vm.id).copied()),
                    cpu_seconds: vm.cpu_seconds_by_kind.iter().sum(),
                    vcpus: vm
                        .vcpu_seconds
                        .iter()
                        .map(|(n, s)| VcpuDoc {
                            vcpu: *n,
                            cpu_seconds: *s,
                            busy: r.and_then(|r| r.vcpu_busy.get(n).copied()),
                        })
                        .collect(),
                    block_io: IoDoc {
                        read_bytes: read.bytes,
                        write_bytes: write.bytes,
                        read_operations: read.ops,
                        write_operations: write.ops,
                        read_bytes_per_second: r.and_then(|r| r.read_bps),
                        write_bytes_per_second: r.and_then(|r| r.write_bps),
                    },
                    phase: snapshot
                        .phases
                        .get(&vm.id)
                        .map(|l| l.current().name.clone()),
                }
            })
            .collect();
        let a = &snapshot.agent;
        SnapshotDoc {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            time: rates.time,
            node,
            carbon,
            vms,
            agent: AgentDoc {
                cpu_seconds: a.cpu_seconds,
                resident_bytes: a.resident_bytes,
                ebpf_events: a.sched_switch_events,
                ebpf_dropped: a.ebpf_dropped,
                samples: a.samples,
                sample_errors: a.sample_errors.values().sum(),
                last_sample_seconds: a.last_sample_seconds,
            },
            history: history_doc(&history.points_since(since)),
        }
    }
}
