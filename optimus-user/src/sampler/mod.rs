//! The sampler: on its own monotonic clock (default every second) it scans for VMs, points
//! the tracer at their threads, reads the kernel counters and meters, and publishes one
//! immutable [`Snapshot`]. Scrapes only read the latest snapshot, so any number of scrapers
//! never advance a counter twice.

pub mod blockio;
pub mod carbon;
pub mod cpu;
pub mod energy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::discovery::cgroup::VmCgroups;
use crate::discovery::{Discovery, VmId, VmSource};
use crate::host::{HostPaths, ProcessKind};
use crate::tracer::Tracer;
use blockio::{BlockIoLedger, DeviceIo, Submitter};

/// One VM as exported.
#[derive(Clone, Debug, PartialEq)]
pub struct VmSnapshot {
    pub id: VmId,
    pub source: VmSource,
    /// CPU seconds by `thread_kind`, indexed like [`cpu::KINDS`].
    pub cpu_seconds_by_kind: [f64; 4],
    /// CPU seconds per vCPU index.
    pub vcpu_seconds: BTreeMap<u32, f64>,
    /// Block I/O `[read, write]` submitted by the VM's QEMU process.
    pub block_io: [blockio::Io; 2],
}

/// The agent's own cost and health.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentStats {
    /// CPU seconds (user + system) the agent has used.
    pub cpu_seconds: f64,
    /// Resident memory now, bytes.
    pub resident_bytes: u64,
    /// `sched_switch` events the eBPF program has seen.
    pub sched_switch_events: u64,
    /// Charges or block I/O records the eBPF maps could not store (map full).
    pub ebpf_dropped: u64,
    /// Samples taken, and how long the last one took.
    pub samples: u64,
    pub last_sample_seconds: f64,
    /// Samples that failed (error or panic in a data source); the previous data is kept.
    pub sample_errors: u64,
}

/// Everything the exporter shows, as of one sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub vms: Vec<VmSnapshot>,
    /// Grid intensity and grams per VM; `None` when no intensity source is configured.
    pub carbon: Option<carbon::CarbonSnapshot>,
    /// Node energy, attribution and meter status; `None` with `--no-energy`.
    pub energy: Option<energy::EnergySnapshot>,
    /// Block I/O per (device, `BLOCK_DIR_*`); empty when block I/O is not traced.
    pub block_devices: BTreeMap<blockio::DeviceKey, DeviceIo>,
    pub agent: AgentStats,
}

/// The latest snapshot, shared between the sampler (writer) and the exporter (readers).
pub type SharedSnapshot = Arc<RwLock<Arc<Snapshot>>>;

const NS_PER_S: f64 = 1e9;

#[expect(
    clippy::cast_precision_loss,
    reason = "f64 holds nanosecond counts exactly up to 104 days; beyond, sub-microsecond rounding of a seconds value is fine"
)]
fn seconds(ns: u64) -> f64 {
    ns as f64 / NS_PER_S
}

/// Owns the data sources and the ledgers.
pub struct Sampler {
    discovery: Discovery,
    tracer: Tracer,
    ledger: cpu::CpuLedger,
    energy: Option<energy::EnergyState>,
    carbon: Option<carbon::CarbonState>,
    block_io: BlockIoLedger,
    /// QEMU pid → VM, from the last two scans (a QEMU that exited since still has I/O to
    /// fold in).
    vm_pids: HashMap<u32, VmId>,
    /// VMs' memory cgroups, for kernel writeback of their pages: new VMs looked up when
    /// found, all re-read every [`CGROUP_REFRESH`].
    cgroups: VmCgroups,
    cgroups_at: Option<Instant>,
    paths: HostPaths,
    stats: AgentStats,
}

/// How often every VM's memory cgroup is re-read (a process may join a VM's cgroup, or
/// libvirt add sub-cgroups, after the VM was first seen).
const CGROUP_REFRESH: Duration = Duration::from_secs(60);

impl Sampler {
    pub fn new(
        discovery: Discovery,
        tracer: Tracer,
        energy: Option<energy::EnergyState>,
        carbon: Option<carbon::CarbonState>,
        paths: HostPaths,
    ) -> Self {
        Self {
            discovery,
            tracer,
            ledger: cpu::CpuLedger::default(),
            energy,
            carbon,
            block_io: BlockIoLedger::default(),
            vm_pids: HashMap::new(),
            cgroups: VmCgroups::new(paths.proc.clone()),
            cgroups_at: None,
            paths,
            stats: AgentStats::default(),
        }
    }

    /// Takes one sample.
    pub fn step(&mut self) -> Snapshot {
        let started = Instant::now();
        let vms = cpu::merge_same_id(self.discovery.scan());
        let tids: HashSet<u32> = vms
            .iter()
            .flat_map(|vm| vm.threads.iter().map(|t| t.tid))
            .collect();
        if let Err(e) = self.tracer.set_tracked(&tids) {
            self.stats.sample_errors += 1;
            log::warn!("cannot update the tracked threads: {e}");
        }
        let reading = match self.tracer.read_cpu() {
            Ok(reading) => {
                let forget = self.ledger.update(&vms, &reading);
                self.tracer.forget(&forget);
                Some(reading)
            }
            Err(e) => {
                self.stats.sample_errors += 1;
                log::warn!("cannot read CPU time from the tracer: {e}");
                None
            }
        };
        let energy = self
            .energy
            .as_mut()
            .map(|e| e.step(reading.as_ref(), &vms, &self.ledger));
        let carbon = match (&mut self.carbon, &energy) {
            (Some(c), Some(e)) => Some(c.step(&e.vm_interval_joules)),
            _ => None,
        };
        self.fold_block_io(&vms);
        let vms = vms
            .iter()
            .filter_map(|vm| {
                let cpu = self.ledger.vm(&vm.id)?;
                Some(VmSnapshot {
                    id: vm.id.clone(),
                    source: vm.source,
                    cpu_seconds_by_kind: cpu.by_kind_ns.map(seconds),
                    vcpu_seconds: cpu.vcpu_ns.iter().map(|(k, v)| (*k, seconds(*v))).collect(),
                    block_io: self.block_io.vm(&vm.id),
                })
            })
            .collect();
        if let Ok(s) = self.tracer.stats() {
            self.stats.sched_switch_events = s.switches;
            self.stats.ebpf_dropped = s.dropped;
        }
        self.stats.samples += 1;
        self.stats.last_sample_seconds = started.elapsed().as_secs_f64();
        let (cpu_seconds, resident_bytes) = self_usage(&self.paths);
        self.stats.cpu_seconds = cpu_seconds;
        self.stats.resident_bytes = resident_bytes;
        Snapshot {
            vms,
            energy,
            carbon,
            block_devices: self.block_io.devices().clone(),
            agent: self.stats.clone(),
        }
    }

    fn fold_block_io(&mut self, vms: &[crate::discovery::Vm]) {
        let crate::tracer::BlockIoStatus::Attached { page_owner, .. } =
            self.tracer.block_io_status()
        else {
            return;
        };
        if page_owner.is_ok() {
            self.refresh_cgroups(vms);
        }
        let entries = match self.tracer.read_block_io() {
            Ok(e) => e,
            Err(e) => {
                self.stats.sample_errors += 1;
                log::warn!("cannot read block I/O from the tracer: {e}");
                return;
            }
        };
        let current: HashMap<u32, VmId> = vms.iter().map(|vm| (vm.pid, vm.id.clone())).collect();
        let previous = std::mem::take(&mut self.vm_pids);
        let paths = &self.paths;
        let cgroups = &self.cgroups;
        // Resolved afresh each sample: a device number can be reused after a hot-unplug.
        let mut names: HashMap<u32, String> = HashMap::new();
        let forget = self.block_io.update(
            &entries,
            |tgid| {
                let kind = paths.process_kind(tgid);
                let vm = current.get(&tgid).or_else(|| previous.get(&tgid));
                let who = match (vm, kind) {
                    (Some(id), _) => Submitter::Vm(id.clone()),
                    // tgid 0: issued from interrupt or idle context.
                    (None, Some(ProcessKind::Kernel)) => Submitter::Unattributed,
                    _ if tgid == 0 => Submitter::Unattributed,
                    (None, _) => Submitter::Process,
                };
                (who, kind.is_some() || tgid == 0)
            },
            |id| cgroups.vm_of(id).cloned(),
            |dev| {
                names
                    .entry(dev)
                    .or_insert_with(|| paths.block_device_name(dev))
                    .clone()
            },
        );
        self.tracer.forget_block_io(&forget);
        let live: HashSet<&VmId> = current.values().collect();
        self.block_io.retain_vms(|id| live.contains(id));
        self.vm_pids = current;
    }

    /// Lists the VMs' memory cgroups to the kernel: new VMs' as soon as they are found, and
    /// all of them afresh every [`CGROUP_REFRESH`].
    fn refresh_cgroups(&mut self, vms: &[crate::discovery::Vm]) {
        let now: Vec<(VmId, u32)> = vms.iter().map(|vm| (vm.id.clone(), vm.pid)).collect();
        let stale = self
            .cgroups_at
            .is_none_or(|at| at.elapsed() >= CGROUP_REFRESH);
        if stale {
            let first = self.cgroups_at.is_none();
            self.cgroups.refresh(&now);
            self.cgroups_at = Some(Instant::now());
            if let Some(why) = self.cgroups.unavailable().filter(|_| first) {
                log::warn!("{why}");
            }
        } else if !self.cgroups.update(&now) {
            return;
        }
        let ids: HashSet<u64> = self.cgroups.ids().collect();
        if let Err(e) = self.tracer.set_vm_cgroups(&ids) {
            self.stats.sample_errors += 1;
            log::warn!("cannot list the VMs' cgroups to the block program: {e}");
        }
    }
}

/// Runs the sampler on its own thread until `stop` is set, publishing into `shared`.
/// A panicking data source costs one sample (counted, logged), never the exporter.
pub fn spawn(
    mut sampler: Sampler,
    interval: Duration,
    shared: SharedSnapshot,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("optimus-sampler".into())
        .spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match catch_unwind(AssertUnwindSafe(|| sampler.step())) {
                    Ok(snapshot) => publish(&shared, snapshot),
                    Err(_) => {
                        sampler.stats.sample_errors += 1;
                        log::error!("a sample panicked; keeping the previous data");
                    }
                }
                // Fixed-rate ticks on the monotonic clock; after a stall, skip rather than
                // burst.
                next += interval;
                let now = Instant::now();
                if next < now {
                    next = now + interval;
                }
                while !stop.load(Ordering::Relaxed) {
                    let left = next.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(100)));
                }
            }
        })
}

fn publish(shared: &SharedSnapshot, snapshot: Snapshot) {
    let snapshot = Arc::new(snapshot);
    match shared.write() {
        Ok(mut guard) => *guard = snapshot,
        Err(poisoned) => *poisoned.into_inner() = snapshot,
    }
}

/// The agent's CPU seconds and resident bytes, from `/proc/self`.
fn self_usage(paths: &HostPaths) -> (f64, u64) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF always exists.
    let cpu = if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0 {
        // SAFETY: initialised by the successful call above.
        let u = unsafe { usage.assume_init() };
        let tv = |t: libc::timeval| {
            Duration::new(
                u64::try_from(t.tv_sec).unwrap_or(0),
                u32::try_from(t.tv_usec).unwrap_or(0) * 1000,
            )
        };
        (tv(u.ru_utime) + tv(u.ru_stime)).as_secs_f64()
    } else {
        0.0
    };
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let rss = std::fs::read_to_string(paths.proc.join("self/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    (cpu, rss)
}
