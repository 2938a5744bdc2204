//! The page's memory: a ring of power points over the last 15 minutes, and the rates
//! (vCPU busy, I/O bytes per second, the node's split into VMs, host and idle) that need two
//! consecutive snapshots. Fed by the sampler with every published snapshot; read by
//! `GET /api/v1/snapshot`.
//!
//! Bounded three ways: by age ([`WINDOW`]), by count ([`MAX_POINTS`]; points closer than
//! [`MIN_SPACING`] are not recorded, so a 10 ms interval still spans 15 minutes), and
//! by VMs per point ([`VMS_PER_POINT`], the most powerful; the rest count in `vms_w`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::energy::ZoneKey;
use crate::sampler::energy::CARBON_ZONES;
use crate::sampler::Snapshot;

/// How far back the ring reaches.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Points closer together than this are not recorded.
pub const MIN_SPACING: Duration = Duration::from_millis(500);
/// Most points kept: [`WINDOW`] at [`MIN_SPACING`].
pub const MAX_POINTS: usize = 1800;
const _: () = assert!(WINDOW.as_millis() / MIN_SPACING.as_millis() == MAX_POINTS as u128);
/// Most VMs charted per point.
pub const VMS_PER_POINT: usize = 8;

/// A VM's name and UUID, shared by every point that charts it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VmLabel {
    pub name: String,
    pub uuid: String,
}

/// One moment of the chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Unix seconds.
    pub t: f64,
    /// Node power, package + dram + gpu, W; `None` without any meter.
    pub node_w: Option<f64>,
    /// Power of all VMs together, W.
    pub vms_w: f64,
    /// Host processes (node − VMs − idle) and idle, W; `None` until two samples exist.
    pub host_w: Option<f64>,
    pub idle_w: Option<f64>,
    /// The most powerful VMs, W.
    pub vm_w: Vec<(Arc<VmLabel>, f32)>,
    at: Instant,
}

/// The node's power split over the last interval, W (package + dram + gpu).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Split {
    pub vms: f64,
    pub host: f64,
    pub idle: f64,
}

/// One VM's rates over the last interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmRates {
    /// Busy fraction of each vCPU (1.0 = one host CPU fully).
    pub vcpu_busy: BTreeMap<u32, f64>,
    /// Block I/O, bytes per second, read and write; `None` on the VM's first sample.
    pub read_bps: Option<f64>,
    pub write_bps: Option<f64>,
}

/// Rates from the last two snapshots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    /// Unix seconds of the latest snapshot; `None` before the first.
    pub time: Option<f64>,
    pub split: Option<Split>,
    /// By VM UUID.
    pub vms: HashMap<String, VmRates>,
}

/// Cumulative values of the previous snapshot.
#[derive(Debug, Default)]
struct Previous {
    at: Option<Instant>,
    /// Per carbon zone: node joules and idle joules.
    zones: HashMap<ZoneKey, (f64, f64)>,
    /// Per VM UUID: vCPU seconds, read bytes, write bytes.
    vms: HashMap<String, (BTreeMap<u32, f64>, u64, u64)>,
}

#[derive(Debug, Default)]
struct Ring {
    points: VecDeque<Point>,
    labels: HashMap<(String, String), Arc<VmLabel>>,
    prev: Previous,
    rates: Rates,
}

/// The ring and the latest rates, shared between the sampler thread and HTTP handlers.
#[derive(Debug, Default)]
pub struct History {
    ring: Mutex<Ring>,
}

#[expect(
    clippy::cast_precision_loss,
    reason = "byte counts of one interval, far below 2^53"
)]
fn bytes_f64(v: u64) -> f64 {
    v as f64
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "watts to chart precision (f32 keeps 7 digits)"
)]
fn chart_watts(w: f64) -> f32 {
    w as f32
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring consistent (each push replaces
        // whole values), so a poisoned lock is still usable.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a snapshot the sampler has just published.
    pub fn push(&self, snapshot: &Snapshot) {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.push_at(snapshot, Instant::now(), unix);
    }

    /// [`History::push`] at a given monotonic instant and unix time (tests).
    pub fn push_at(&self, snapshot: &Snapshot, at: Instant, unix: f64) {
        let mut ring = self.lock();
        let ring = &mut *ring;
        let dt = ring
            .prev
            .at
            .map(|p| at.saturating_duration_since(p).as_secs_f64())
            .filter(|dt| *dt > 0.0);

        // Per-VM rates from the cumulative counters.
        let mut vms = HashMap::with_capacity(snapshot.vms.len());
        let mut prev_vms = HashMap::with_capacity(snapshot.vms.len());
        for vm in &snapshot.vms {
            let [read, write] = vm.block_io;
            let mut rates = VmRates::default();
            if let (Some(dt), Some((vcpus, r, w))) = (dt, ring.prev.vms.get(&vm.id.uuid)) {
                for (n, s) in &vm.vcpu_seconds {
                    let before = vcpus.get(n).copied().unwrap_or(*s);
                    rates.vcpu_busy.insert(*n, ((s - before) / dt).max(0.0));
                }
                rates.read_bps = Some(bytes_f64(read.bytes.saturating_sub(*r)) / dt);
                rates.write_bps = Some(bytes_f64(write.bytes.saturating_sub(*w)) / dt);
            }
            vms.insert(vm.id.uuid.clone(), rates);
            prev_vms.insert(
                vm.id.uuid.clone(),
                (vm.vcpu_seconds.clone(), read.bytes, write.bytes),
            );
        }

        // The node's split: idle from the idle ledger's share of each zone's last
        // interval, host as the residual (as attribution defines it), so the parts add up.
        let mut node_w = None::<f64>;
        let mut idle_w = 0.0;
        let mut split_known = true;
        let mut prev_zones = HashMap::new();
        let mut vm_watts: BTreeMap<&str, f64> = BTreeMap::new();
        if let Some(e) = &snapshot.energy {
            for z in e
                .zones
                .iter()
                .filter(|z| CARBON_ZONES.contains(&z.key.zone))
            {
                let (Some(j), Some(w)) = (z.joules, z.watts) else {
                    continue;
                };
                *node_w.get_or_insert(0.0) += w;
                match ring.prev.zones.get(&z.key) {
                    Some((pj, pidle)) if j > *pj => {
                        idle_w += (z.idle_joules - pidle).max(0.0) * w / (j - pj);
                    }
                    Some(_) => {}
                    None => split_known = false,
                }
                prev_zones.insert(z.key.clone(), (j, z.idle_joules));
            }
            for (id, zones) in &e.vms {
                let w: f64 = zones
                    .iter()
                    .filter(|((zone, _), _)| CARBON_ZONES.contains(zone))
                    .map(|(_, (_, w))| *w)
                    .sum();
                vm_watts.insert(id.uuid.as_str(), w);
            }
        }
        // A fold from +0.0: an empty f64 sum is -0.0, which JSON would show as such.
        let vms_w = vm_watts.values().fold(0.0, |a, w| a + w);
        let split = node_w.filter(|_| split_known).map(|node| Split {
            vms: vms_w,
            idle: idle_w,
            host: (node - vms_w - idle_w).max(0.0),
        });

        ring.rates = Rates {
            time: Some(unix),
            split,
            vms,
        };
        ring.prev = Previous {
            at: Some(at),
            zones: prev_zones,
            vms: prev_vms,
        };

        // Chart point, unless the last one is too recent.
        let too_soon = ring
            .points
            .back()
            .is_some_and(|p| at.saturating_duration_since(p.at) < MIN_SPACING);
        if !too_soon {
            ring.labels
                .retain(|(_, uuid), _| vm_watts.contains_key(uuid.as_str()));
            // The most powerful first; labels (two strings each) only for those kept, not
            // for every VM at every sample.
            let mut ranked: Vec<(&crate::discovery::VmId, f32)> = snapshot
                .vms
                .iter()
                .filter_map(|vm| {
                    let w = *vm_watts.get(vm.id.uuid.as_str())?;
                    Some((&vm.id, chart_watts(w)))
                })
                .collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.name.cmp(&b.0.name)));
            ranked.truncate(VMS_PER_POINT);
            let top: Vec<(Arc<VmLabel>, f32)> = ranked
                .into_iter()
                .map(|(id, w)| {
                    let label = ring
                        .labels
                        .entry((id.name.clone(), id.uuid.clone()))
                        .or_insert_with(|| {
                            Arc::new(VmLabel {
                                name: id.name.clone(),
                                uuid: id.uuid.clone(),
                            })
                        })
                        .clone();
                    (label, w)
                })
                .collect();
            ring.points.push_back(Point {
                t: unix,
                node_w,
                vms_w,
                host_w: split.map(|s| s.host),
                idle_w: split.map(|s| s.idle),
                vm_w: top,
                at,
            });
        }
        while ring.points.len() > MAX_POINTS
            || ring
                .points
                .front()
                .is_some_and(|p| at.saturating_duration_since(p.at) > WINDOW)
        {
            ring.points.pop_front();
        }
    }

    /// The rates from the last two snapshots.
    pub fn rates(&self) -> Rates {
        self.lock().rates.clone()
    }

    /// Points newer than `since` (unix seconds), oldest first; all of them when `None`.
    pub fn points_since(&self, since: Option<f64>) -> Vec<Point> {
        let ring = self.lock();
        let start = since.map_or(0, |s| ring.points.partition_point(|p| p.t <= s));
        ring.points.range(start..).cloned().collect()
    }

    /// Number of points held.
    pub fn len(&self) -> usize {
        self.lock().points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
