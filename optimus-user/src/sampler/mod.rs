//! The sampler: on its own monotonic clock (default every second) it scans for VMs, points
//! the tracer at their threads, reads the kernel counters and meters, and publishes one
//! immutable [`Snapshot`]. Scrapes only read the latest snapshot, so any number of scrapers
//! never advance a counter twice.

pub mod blockio;
pub mod busy;
pub mod carbon;
pub mod cpu;
pub mod energy;
pub mod phases;

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
    pub cpu_seconds_by_kind: [f64; 5],
    /// CPU seconds per vCPU index.
    pub vcpu_seconds: BTreeMap<u32, f64>,
    /// Block I/O `[read, write]` submitted by the VM's QEMU process.
    pub block_io: [blockio::Io; 2],
    /// vCPU threads found (the VM's size for placement); `None` when none is known.
    pub vcpus: Option<u32>,
    /// Guest memory size, bytes; `None` when unknown.
    pub memory_bytes: Option<u64>,
    /// Kubernetes namespace of a KubeVirt VM (`vm_namespace`); `None` for any other VM.
    pub namespace: Option<String>,
}

/// The host's size and load, for placing VMs (`optimus advise`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeSnapshot {
    /// Online logical CPUs.
    pub cpus: u32,
    /// Memory, bytes (`MemTotal`, `MemAvailable`); `None` when unreadable.
    pub memory_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
    /// Busy time summed over CPUs since the agent started, from eBPF sched_switch; `None`
    /// until the tracer has been read.
    pub cpu_busy_seconds: Option<f64>,
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
    /// Failures of a data source, by source (`proc`, `libvirt`, `tracer`, `block_io`,
    /// `cgroups`, `sampler` for a panic); the previous data of that source is kept.
    pub sample_errors: BTreeMap<&'static str, u64>,
    /// Processes that claimed another VM's identity (never merged into it).
    pub identity_conflicts: u64,
    /// VMs left out because `--max-vms` was reached.
    pub vms_over_limit: u64,
    /// Changes the 30 s full /proc rescan found that the kernel's change events missed.
    pub discovery_rescan_missed: u64,
}

impl AgentStats {
    /// Counts one failure of `source`.
    pub fn error(&mut self, source: &'static str) {
        *self.sample_errors.entry(source).or_default() += 1;
    }
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
    pub node: NodeSnapshot,
    pub agent: AgentStats,
    /// Phases of the VMs given one with `optimus phase` (empty otherwise).
    pub phases: BTreeMap<VmId, crate::phase::PhaseLedger>,
    /// Guest channels of the VMs that have one (empty otherwise).
    pub guest_channels: BTreeMap<VmId, crate::channel::ChannelStatus>,
    /// Set only inside a VM by `optimus guest`: what the host sent it (rendered instead of
    /// everything else).
    pub guest_view: Option<crate::guest::metrics::GuestView>,
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
    /// `--vm-filter`: only VMs whose names match are tracked and exported.
    vm_filter: Option<regex::Regex>,
    /// `--libvirt-only`: only VMs that libvirt runs are tracked and exported.
    libvirt_only: bool,
    /// Per-CPU busy time from the kernel's idle accounting.
    busy: busy::BusyClock,
    /// Per-CPU busy ns, kept monotonic (a reading is late by under one USER_HZ tick).
    node_busy_ns: Vec<u64>,
    /// VM phases, and the control socket's requests for them.
    phases: phases::VmPhases,
    requests: Option<std::sync::mpsc::Receiver<crate::control::PhaseRequest>>,
    /// Guest channels, and the interval their figures describe.
    channels: Option<(crate::channel::Channels, Duration)>,
    /// Processes first tracked at the last sample: re-read at the next one.
    newly_tracked: HashSet<u32>,
    /// Charged threads in no VM's list yet, with the samples they have been so.
    strays: HashMap<u32, u8>,
}

/// Samples a charged thread may stay out of every VM's list before /proc is asked whether
/// it still belongs to a tracked process: scans list a new QEMU thread within one or two.
const STRAY_GRACE: u8 = 2;

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
            busy: busy::BusyClock::new(&paths.proc),
            paths,
            stats: AgentStats::default(),
            vm_filter: None,
            libvirt_only: false,
            node_busy_ns: Vec::new(),
            phases: phases::VmPhases::default(),
            requests: None,
            channels: None,
            newly_tracked: HashSet::new(),
            strays: HashMap::new(),
        }
    }

    /// Talks to the VMs' guest channels: their GPU claims are charged, their figures (of
    /// each `interval`) sent back.
    #[must_use]
    pub fn with_guest_channels(
        mut self,
        channels: crate::channel::Channels,
        interval: Duration,
    ) -> Self {
        self.channels = Some((channels, interval));
        self
    }

    /// Serves VM phase switches from `requests` (the control socket) between samples.
    #[must_use]
    pub fn with_phase_requests(
        mut self,
        requests: std::sync::mpsc::Receiver<crate::control::PhaseRequest>,
    ) -> Self {
        self.requests = Some(requests);
        self
    }

    /// Waits up to `wait` for a phase request (sleeps when there is no control socket).
    fn next_request(&mut self, wait: Duration) -> Option<crate::control::PhaseRequest> {
        let Some(rx) = &self.requests else {
            std::thread::sleep(wait);
            return None;
        };
        match rx.recv_timeout(wait) {
            Ok(req) => Some(req),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                self.requests = None;
                None
            }
        }
    }

    /// Takes a sample for a phase boundary, switches the VM's phase at it, publishes.
    fn serve_phase(
        &mut self,
        req: crate::control::PhaseRequest,
        shared: &SharedSnapshot,
        on_publish: &mut impl FnMut(&Snapshot),
    ) {
        let reply = match catch_unwind(AssertUnwindSafe(|| self.step())) {
            Ok(mut snapshot) => {
                let reply = self.phases.switch(&req.vm, req.mark);
                snapshot.phases.clone_from(self.phases.ledgers());
                on_publish(&snapshot);
                publish(shared, snapshot);
                reply
            }
            Err(_) => {
                self.stats.error("sampler");
                log::error!("a sample panicked; keeping the previous data");
                crate::control::Reply::error("the agent could not read its counters; see its log")
            }
        };
        // The client may have given up waiting: nothing to do then.
        let _ = req.reply.send(reply);
    }

    /// Tracks and exports only the VMs whose names match `filter` (all with `None`).
    #[must_use]
    pub fn with_vm_filter(mut self, filter: Option<regex::Regex>) -> Self {
        self.vm_filter = filter;
        self
    }

    /// Saves what must outlive the agent (the trained power model).
    pub fn finish(&mut self) {
        if let Some(e) = self.energy.as_mut() {
            e.finish();
        }
    }

    /// Tracks and exports only the VMs that libvirt runs (`--libvirt-only`).
    #[must_use]
    pub fn with_libvirt_only(mut self, libvirt_only: bool) -> Self {
        self.libvirt_only = libvirt_only;
        self
    }

    /// Takes one sample.
    pub fn step(&mut self) -> Snapshot {
        let started = Instant::now();
        // The first sample lists /proc in full: the change programs only report processes
        // already tracked. A process tracked since the last sample is looked at once more,
        // in case it changed before its bit was set.
        let changes = self
            .tracer
            .take_changes()
            .filter(|_| self.stats.samples > 0);
        let changes = changes.map(|mut c| {
            c.extend(self.newly_tracked.drain());
            c
        });
        let mut vms = self.discovery.scan_changes(changes.as_ref());
        if let Some(filter) = &self.vm_filter {
            vms.retain(|vm| filter.is_match(&vm.id.name));
        }
        if self.libvirt_only {
            vms.retain(|vm| vm.source == VmSource::Libvirt);
        }
        // Before merging: a VM running as two processes has two tgids.
        let tgids = cpu::tracked_processes(&vms);
        let vms = cpu::merge_same_id(vms);
        let tids: HashSet<u32> = vms
            .iter()
            .flat_map(|vm| vm.threads.iter().map(|t| t.tid))
            .collect();
        for (source, n) in self.discovery.errors() {
            self.stats.sample_errors.insert(source, *n);
        }
        self.stats.identity_conflicts = self.discovery.identity_conflicts();
        self.stats.discovery_rescan_missed = self.discovery.rescan_missed();
        self.stats.vms_over_limit = self.discovery.vms_over_limit();
        let before = self.tracer.tracked().clone();
        self.newly_tracked = tgids.difference(&before).copied().collect();
        if let Err(e) = self.tracer.set_tracked(&tgids) {
            self.stats.error("tracer");
            log::warn!("cannot update the tracked threads: {e}");
        }
        let reading = match self.tracer.read_cpu() {
            Ok(mut reading) => {
                reading.busy_ns = self.busy.read(reading.at_ns);
                cpu::merge_into(&mut self.node_busy_ns, &reading.busy_ns, u64::max);
                let forget = self.ledger.update(&vms, &reading);
                self.tracer.forget(&forget);
                if !self.tracer.tracks_all() {
                    // Threads charged by process but in no VM's list: a tracked QEMU's new
                    // thread (kept: the next scan lists it, with every slice since its first
                    // switch), or one that is gone or left a tracked process (dropped).
                    // Only those still unlisted after STRAY_GRACE samples are looked up
                    // in /proc: a thousand new VMs bring thousands of new threads, and a
                    // status read each cost the agent a second of CPU.
                    let mut strays = HashMap::new();
                    let mut gone = Vec::new();
                    for &tid in reading.threads.keys().filter(|tid| !tids.contains(tid)) {
                        let samples = self.strays.get(&tid).map_or(1, |n| n.saturating_add(1));
                        if samples <= STRAY_GRACE {
                            strays.insert(tid, samples);
                        } else if self
                            .paths
                            .thread_group(tid)
                            .is_none_or(|tgid| !self.tracer.tracked().contains(&tgid))
                        {
                            gone.push(tid);
                        }
                    }
                    self.strays = strays;
                    self.tracer.forget(&gone);
                }
                Some(reading)
            }
            Err(e) => {
                self.stats.error("tracer");
                log::warn!("cannot read CPU time from the tracer: {e}");
                None
            }
        };
        if let Some((channels, _)) = &mut self.channels {
            channels.sync(&vms);
            let claims = channels.take_gpu();
            if let Some(e) = self.energy.as_mut() {
                e.set_guest_gpu(claims);
            }
        }
        let energy = self
            .energy
            .as_mut()
            .map(|e| e.step(reading.as_ref(), &vms, &self.ledger));
        let carbon = match (&mut self.carbon, &energy) {
            (Some(c), Some(e)) => Some(c.step(&e.vm_interval_joules)),
            _ => None,
        };
        self.fold_block_io(&vms);
        let (vms, cpu_totals): (Vec<VmSnapshot>, Vec<u64>) = vms
            .iter()
            .filter_map(|vm| {
                let cpu = self.ledger.vm(&vm.id)?;
                let total_ns: u64 = cpu.by_kind_ns.iter().sum();
                Some((
                    VmSnapshot {
                        id: vm.id.clone(),
                        source: vm.source,
                        cpu_seconds_by_kind: cpu.by_kind_ns.map(seconds),
                        vcpu_seconds: cpu.vcpu_ns.iter().map(|(k, v)| (*k, seconds(*v))).collect(),
                        block_io: self.block_io.vm(&vm.id),
                        vcpus: u32::try_from(
                            vm.threads
                                .iter()
                                .filter(|t| matches!(t.kind, crate::discovery::ThreadKind::Vcpu(_)))
                                .count(),
                        )
                        .ok()
                        .filter(|n| *n > 0),
                        memory_bytes: vm.memory_bytes,
                        namespace: vm.namespace.clone(),
                    },
                    total_ns,
                ))
            })
            .unzip();
        let at_ns = reading
            .as_ref()
            .map_or_else(crate::tracer::monotonic_ns, |r| r.at_ns);
        let with_cpu: Vec<(&VmSnapshot, u64)> = vms.iter().zip(cpu_totals).collect();
        self.phases.observe(at_ns, &with_cpu, energy.as_ref());
        if let Ok(s) = self.tracer.stats() {
            self.stats.sched_switch_events = s.switches;
            self.stats.ebpf_dropped = s.dropped;
        }
        self.tracer.flush_logs();
        self.stats.samples += 1;
        self.stats.last_sample_seconds = started.elapsed().as_secs_f64();
        let (cpu_seconds, resident_bytes) = self_usage();
        self.stats.cpu_seconds = cpu_seconds;
        self.stats.resident_bytes = resident_bytes;
        let mut snapshot = Snapshot {
            vms,
            energy,
            carbon,
            block_devices: self.block_io.devices().clone(),
            node: self.node(),
            agent: self.stats.clone(),
            phases: self.phases.ledgers().clone(),
            guest_channels: BTreeMap::new(),
            guest_view: None,
        };
        if let Some((channels, interval)) = &self.channels {
            snapshot.guest_channels = channels.status();
            channels.send(&snapshot, *interval);
        }
        snapshot
    }

    fn node(&self) -> NodeSnapshot {
        let mem = self.paths.meminfo();
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        NodeSnapshot {
            cpus: u32::try_from(online).unwrap_or(0),
            memory_bytes: mem.total,
            memory_available_bytes: mem.available,
            cpu_busy_seconds: (!self.node_busy_ns.is_empty())
                .then(|| seconds(self.node_busy_ns.iter().sum())),
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
                self.stats.error("block_io");
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
            self.stats.error("cgroups");
            log::warn!("cannot list the VMs' cgroups to the block program: {e}");
        }
    }
}

/// Runs the sampler on its own thread until `stop` is set, publishing into `shared` and
/// handing each published snapshot to `on_publish` (the live page's history).
/// A panicking data source costs one sample (counted, logged), never the exporter.
pub fn spawn(
    mut sampler: Sampler,
    interval: Duration,
    shared: SharedSnapshot,
    stop: Arc<AtomicBool>,
    mut on_publish: impl FnMut(&Snapshot) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("optimus-sampler".into())
        .spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match catch_unwind(AssertUnwindSafe(|| sampler.step())) {
                    Ok(snapshot) => {
                        on_publish(&snapshot);
                        publish(&shared, snapshot);
                    }
                    Err(_) => {
                        sampler.stats.error("sampler");
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
                    if let Some(req) = sampler.next_request(left.min(Duration::from_millis(100))) {
                        sampler.serve_phase(req, &shared, &mut on_publish);
                    }
                }
            }
            sampler.finish();
        })
}

fn publish(shared: &SharedSnapshot, snapshot: Snapshot) {
    let snapshot = Arc::new(snapshot);
    match shared.write() {
        Ok(mut guard) => *guard = snapshot,
        Err(poisoned) => *poisoned.into_inner() = snapshot,
    }
}

/// The agent's CPU seconds and resident bytes, from the agent's own `/proc/self` (not the
/// `--proc-root`, which may be a fixture or another mount).
fn self_usage() -> (f64, u64) {
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
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    (cpu, rss)
}
