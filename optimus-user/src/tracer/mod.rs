//! The kernel side, seen from userspace: loads the eBPF programs, tells them which threads
//! to charge, and reads per-thread, per-CPU on-CPU nanoseconds and block I/O counters.
//!
//! Reads are raw kernel numbers; keeping VM totals monotonic across thread exits is the
//! job of [`crate::sampler`].
//!
//! The programs' rare error paths (a failed kernel read, a full map) log through aya-log
//! under the target [`EBPF_LOG_TARGET`]. Only when that target is enabled at debug level
//! (`--log-level debug`) does the loader switch the programs' log level on and read their
//! ring buffer ([`Tracer::flush_logs`]); otherwise the programs skip even the log call.

mod batch;
pub mod btf;
mod child;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use std::os::fd::AsFd as _;

use aya::maps::{
    Array, HashMap as BpfHashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap,
    RingBuf,
};
use aya::programs::{BtfTracePoint, ProgramError, RawTracePoint};
use aya::{Ebpf, EbpfError, EbpfLoader};
use optimus_common::{
    BlockIoKey, BlockIoValue, BlockOffsets, CpuState, TracerStats, PID_MAX_LIMIT,
};

/// The `log` target of the eBPF programs' own records (set in `optimus-ebpf`).
pub const EBPF_LOG_TARGET: &str = "optimus::ebpf";

/// The compiled eBPF object, built by `build.rs` from the `optimus-ebpf` crate.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/optimus"));

/// How to load the tracer.
#[derive(Clone, Debug)]
pub struct TracerOptions {
    /// Charge every thread on the host, not only the tracked ones.
    pub track_all: bool,
    /// Attach the block I/O program too.
    pub block_io: bool,
    /// Also attach an empty program to `sched_switch`: the baseline `cargo xtask bench`
    /// compares the tracer's per-event cost against.
    pub attach_baseline: bool,
    /// Attach the empty program only: no charging, no block I/O (the floor the bench
    /// compares the tracer's workload slowdown against).
    pub baseline_only: bool,
    /// Kernel BTF, normally `/sys/kernel/btf/vmlinux`.
    pub btf_path: PathBuf,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            track_all: false,
            block_io: true,
            attach_baseline: false,
            baseline_only: false,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
        }
    }
}

/// Why the tracer cannot run; each message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("kernel BTF unavailable (Optimus needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF programs failed (run as root, or grant CAP_BPF and CAP_PERFMON)")]
    Load(#[source] EbpfError),
    #[error("this agent was built with AYA_BUILD_SKIP=1 and holds no eBPF programs: rebuild it without that variable")]
    NotBuilt,
    #[error("this kernel's task_struct does not keep tgid right after pid (pid at byte {pid}, tgid at {tgid}); the tracer reads both in one load")]
    TaskLayout { pid: u32, tgid: u32 },
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("eBPF program {name}: {op} failed")]
    Program {
        name: &'static str,
        op: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {op} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
}

/// Whether block I/O is being traced, and from which tracepoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockIoStatus {
    /// Not asked for.
    Disabled,
    /// Attached to the raw tracepoint `block:<tracepoint>` (and the bio merge tracepoints).
    /// `page_owner`: whether kernel-thread I/O can be traced to the memory cgroup owning
    /// its pages (why not, otherwise).
    Attached {
        tracepoint: &'static str,
        page_owner: Result<(), String>,
    },
    /// Asked for, but neither tracepoint could be used: the reason, for the logs and `check`.
    Unavailable(String),
}

/// On-CPU time of the tracked threads at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuReading {
    /// CLOCK_MONOTONIC nanoseconds of the read.
    pub at_ns: u64,
    /// Per thread id: nanoseconds on each CPU (index = CPU id), the running slice included.
    pub threads: HashMap<u32, Vec<u64>>,
    /// Per CPU: nanoseconds it ran anything but its idle task. Not the tracer's: the
    /// sampler fills it from the kernel's idle accounting ([`crate::sampler::busy`]);
    /// empty when unknown.
    pub busy_ns: Vec<u64>,
}

impl CpuReading {
    /// A thread's total over all CPUs.
    pub fn total_ns(&self, tid: u32) -> Option<u64> {
        self.threads.get(&tid).map(|v| v.iter().sum())
    }
}

/// The loaded programs and typed handles to their maps. Dropping it detaches everything.
pub struct Tracer {
    /// The object, where it was loaded in-process: keeps programs and links alive.
    _ebpf: Option<Ebpf>,
    /// Programs and links a loader child attached ([`child`]): closing them detaches.
    _fds: Vec<std::os::fd::OwnedFd>,
    /// Reader of the programs' aya-log ring buffer, at debug level only. It owns the map's
    /// fd: dropped before the programs load, their load fails (ENGINEERING.md).
    logs: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Tracked-process bitmap by tgid (`TRACKED_WORDS` words).
    tracked: Array<MapData, u64>,
    cpu_ns: PerCpuHashMap<MapData, u32, u64>,
    /// Each charged thread's runtime at its last charge (kept by the kernel side).
    last_runtime: aya::maps::HashMap<MapData, u32, u64>,
    cpu_state: PerCpuArray<MapData, CpuState>,
    /// Processes the exec program saw become QEMU (and set tracked) since the last step.
    execed: BpfHashMap<MapData, u32, u32>,
    /// The exec program is attached.
    exec_hook: bool,
    /// Processes that changed (fork, exit, rename, exec), from the change programs; `None`
    /// where they could not be attached.
    events: Option<RingBuf<MapData>>,
    /// Events lost to a full ring buffer, as of the last drain.
    lost_events: u64,
    /// Processes set tracked at exec that discovery has not listed yet, with the steps
    /// they have waited.
    pending: HashMap<u32, u8>,
    /// Processes tracked now: the last set asked for, and the pending ones.
    tracked_set: HashSet<u32>,
    block_io: PerCpuHashMap<MapData, BlockIoKey, BlockIoValue>,
    vm_cgroups: BpfHashMap<MapData, u64, u32>,
    vm_cgroup_set: HashSet<u64>,
    /// The bitmap's non-zero words as last written.
    tracked_words: HashMap<u32, u64>,
    /// Possible CPUs (the length of every per-CPU value); `None`: unknown, so `CPU_NS` is
    /// read by iterating.
    possible_cpus: Option<usize>,
    /// `CPU_NS` is read in batches (false after the kernel refused one).
    batch_reads: std::cell::Cell<bool>,
    track_all: bool,
    block_status: BlockIoStatus,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, TracerError> {
    ebpf.take_map(name).ok_or(TracerError::Map {
        name,
        op: "find",
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })
}

/// Takes map `name` out of the object as a typed handle.
pub(crate) fn open_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, TracerError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    T::try_from(take_map(ebpf, name)?).map_err(map_err(name, "open"))
}

pub(crate) fn map_err(
    name: &'static str,
    op: &'static str,
) -> impl FnOnce(MapError) -> TracerError {
    move |source| TracerError::Map { name, op, source }
}

pub(crate) fn prog_err(
    name: &'static str,
    op: &'static str,
) -> impl FnOnce(ProgramError) -> TracerError {
    move |source| TracerError::Program { name, op, source }
}

impl Tracer {
    /// Loads and attaches the programs. Needs root (or CAP_BPF + CAP_PERFMON).
    ///
    /// Loading reads the kernel's BTF three times (here for struct offsets, in aya's
    /// loader, and for the BTF tracepoint), about 20 MB at its peak: in the agent, that peak
    /// stayed its high-water mark for life. So a short-lived child ([`child`]) loads and
    /// attaches everything and hands back the fds of the maps, programs and links. At
    /// debug level for [`EBPF_LOG_TARGET`] the programs' logger needs aya's object, so the
    /// load stays in-process; it does too, with a line in the log, where the child fails.
    pub fn load(opts: &TracerOptions) -> Result<Self, TracerError> {
        if EBPF_OBJECT.is_empty() {
            return Err(TracerError::NotBuilt);
        }
        raise_memlock_limit();
        let ebpf_debug = log::log_enabled!(target: EBPF_LOG_TARGET, log::Level::Debug);
        if !ebpf_debug {
            let loaded = child::run(|| {
                let (ebpf, _, report) =
                    load_object(opts, false).map_err(|e| crate::discovery::error_chain(&e))?;
                // Kept open until the child exits, after it sent them.
                std::mem::forget(ebpf);
                serde_json::to_vec(&report).map_err(|e| e.to_string())
            });
            match loaded.and_then(|(report, fds)| {
                Self::from_fds(opts, &report, fds).map_err(child::ChildError::Step)
            }) {
                Ok(tracer) => return Ok(tracer),
                Err(e) => log::info!("loading the eBPF programs in-process: {e}"),
            }
        }
        let (mut ebpf, logs, report) = load_object(opts, ebpf_debug)?;
        let maps = MapSource::Object(&mut ebpf);
        let mut tracer = Self::with_maps(opts, maps, &report, Vec::new())?;
        tracer.logs = logs;
        tracer._ebpf = Some(ebpf);
        Ok(tracer)
    }

    /// The tracer over what a loader child handed back: its report and fds.
    fn from_fds(
        opts: &TracerOptions,
        report: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Self, String> {
        let report: LoadReport =
            serde_json::from_slice(report).map_err(|e| format!("its report: {e}"))?;
        let mut maps = HashMap::new();
        let mut others = Vec::new();
        for fd in fds {
            use std::os::fd::AsRawFd as _;
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if link != "anon_inode:bpf-map" {
                // Programs, links and BTF objects: held open, they stay loaded and attached.
                others.push(fd);
                continue;
            }
            let data = MapData::from_fd(fd).map_err(|e| format!("a map it passed: {e}"))?;
            let name = data
                .info()
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_owned))
                .unwrap_or_default();
            maps.insert(name, data);
        }
        Self::with_maps(opts, MapSource::Fds(maps), &report, others)
            .map_err(|e| crate::discovery::error_chain(&e))
    }

    /// Typed handles to the maps, the programs kept alive by `fds` (and the object, set
    /// by the caller where it loaded in-process).
    fn with_maps(
        opts: &TracerOptions,
        mut maps: MapSource<'_>,
        report: &LoadReport,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Self, TracerError> {
        let events = if report.events {
            Some(maps.open("EVENTS")?)
        } else {
            None
        };
        Ok(Self {
            _ebpf: None,
            _fds: fds,
            logs: None,
            tracked: maps.open("TRACKED")?,
            cpu_ns: maps.open("CPU_NS")?,
            last_runtime: maps.open("LAST_RUNTIME")?,
            cpu_state: maps.open("CPU_STATE")?,
            execed: maps.open("EXECED")?,
            exec_hook: report.exec_hook,
            events,
            lost_events: 0,
            pending: HashMap::new(),
            tracked_set: HashSet::new(),
            block_io: maps.open("BLOCK_IO")?,
            vm_cgroups: maps.open("VM_CGROUPS")?,
            vm_cgroup_set: HashSet::new(),
            tracked_words: HashMap::new(),
            possible_cpus: aya::util::nr_cpus().ok(),
            batch_reads: std::cell::Cell::new(true),
            track_all: opts.track_all,
            block_status: report.block.status(),
        })
    }

    /// Passes the records the programs logged since the last call to the `log` crate
    /// (target [`EBPF_LOG_TARGET`], debug level); nothing to do unless loaded at debug level.
    pub fn flush_logs(&mut self) {
        if let Some(logs) = &mut self.logs {
            logs.flush();
        }
    }

    /// Whether block I/O is traced.
    pub fn block_io_status(&self) -> &BlockIoStatus {
        &self.block_status
    }

    /// True in track-everything mode.
    pub fn tracks_all(&self) -> bool {
        self.track_all
    }

    /// Makes the in-kernel filter charge every thread of the processes `tgids` (ignored in
    /// track-everything mode), and of those that became QEMU since the last call (set
    /// tracked at exec by the kernel): kept one more call for discovery to list them, then
    /// dropped unless `tgids` has them. Writes only the bitmap words that change.
    pub fn set_tracked(&mut self, tgids: &HashSet<u32>) -> Result<(), TracerError> {
        if self.track_all {
            return Ok(());
        }
        // One step of grace: an exec after this step's scan is listed by the next one.
        self.pending
            .retain(|tgid, waited| !tgids.contains(tgid) && *waited < 1);
        for waited in self.pending.values_mut() {
            *waited += 1;
        }
        if self.exec_hook {
            let fresh: Vec<u32> = self.execed.keys().filter_map(Result::ok).collect();
            for tgid in fresh {
                // Already gone is fine: the map is emptied by us alone.
                let _ = self.execed.remove(&tgid);
                if !tgids.contains(&tgid) {
                    self.pending.insert(tgid, 0);
                }
            }
        }
        let mut wanted = tgids.clone();
        wanted.extend(self.pending.keys().copied());
        let words = bitmap_words(&wanted);
        for (&index, &word) in &words {
            if self.tracked_words.get(&index) != Some(&word) {
                self.tracked
                    .set(index, word, 0)
                    .map_err(map_err("TRACKED", "update"))?;
            }
        }
        for &index in self.tracked_words.keys() {
            if !words.contains_key(&index) {
                self.tracked
                    .set(index, 0, 0)
                    .map_err(map_err("TRACKED", "update"))?;
            }
        }
        self.tracked_words = words;
        self.tracked_set = wanted;
        Ok(())
    }

    /// The processes that changed since the last call (forked, lost or renamed a thread,
    /// exec'd; or became QEMU), for discovery to re-read; `None` when that is not known
    /// (the change programs are not attached, or events were lost): rescan everything.
    pub fn take_changes(&mut self) -> Option<HashSet<u32>> {
        let events = self.events.as_mut()?;
        let mut changed = HashSet::new();
        while let Some(item) = events.next() {
            if let Ok(bytes) = <[u8; 4]>::try_from(&*item) {
                changed.insert(u32::from_ne_bytes(bytes));
            }
        }
        let lost = self.stats().map_or(u64::MAX, |s| s.lost_events);
        if lost != self.lost_events {
            self.lost_events = lost;
            return None;
        }
        Some(changed)
    }

    /// The processes whose threads are charged now (after [`Tracer::set_tracked`]).
    pub fn tracked(&self) -> &HashSet<u32> {
        &self.tracked_set
    }

    /// Makes the block programs record kernel-thread I/O on pages owned by exactly these
    /// memory cgroups (kernfs ids of VMs' cgroups) with that owner.
    pub fn set_vm_cgroups(&mut self, ids: &HashSet<u64>) -> Result<(), TracerError> {
        for &id in ids.difference(&self.vm_cgroup_set) {
            self.vm_cgroups
                .insert(id, 1, 0)
                .map_err(map_err("VM_CGROUPS", "insert"))?;
        }
        let gone: Vec<u64> = self.vm_cgroup_set.difference(ids).copied().collect();
        for id in gone {
            // Already absent is fine: the map is ours alone.
            let _ = self.vm_cgroups.remove(&id);
        }
        self.vm_cgroup_set.clone_from(ids);
        Ok(())
    }

    /// Reads every charged thread's per-CPU nanoseconds, plus the slice each CPU's tracked
    /// thread is running right now.
    pub fn read_cpu(&self) -> Result<CpuReading, TracerError> {
        let mut threads = self.read_cpu_ns()?;
        // Map and counters first, then slots, then the clock: a switch between the reads can only
        // under-count until the next read (which the sampler's monotonic clamp absorbs),
        // never count a slice twice.
        let states = self
            .cpu_state
            .get(&0, 0)
            .map_err(map_err("CPU_STATE", "read"))?;
        let slots: Vec<_> = states.iter().map(|s| s.slot).collect();
        let at_ns = monotonic_ns();
        let ncpus = slots.len();
        for (cpu, slot) in slots.iter().enumerate() {
            if slot.tracked == 0 || slot.tid == 0 || slot.since_ns == 0 {
                continue;
            }
            let per_cpu = threads.entry(slot.tid).or_insert_with(|| vec![0; ncpus]);
            if let Some(v) = per_cpu.get_mut(cpu) {
                *v += at_ns.saturating_sub(slot.since_ns);
            }
        }
        Ok(CpuReading {
            at_ns,
            threads,
            busy_ns: Vec::new(),
        })
    }

    /// Every thread's per-CPU nanoseconds in `CPU_NS`: in batches of thousands per syscall,
    /// or, where the kernel has no batch reads, two syscalls per thread.
    fn read_cpu_ns(&self) -> Result<HashMap<u32, Vec<u64>>, TracerError> {
        if let (true, Some(ncpus)) = (self.batch_reads.get(), self.possible_cpus) {
            let fd = self.cpu_ns.map().fd().as_fd();
            match batch::percpu_u32_u64(fd, ncpus) {
                Ok(entries) => return Ok(entries.into_iter().collect()),
                Err(e) => {
                    log::info!("batch reads of CPU_NS unavailable ({e}); iterating instead");
                    self.batch_reads.set(false);
                }
            }
        }
        let mut threads = HashMap::new();
        for entry in self.cpu_ns.iter() {
            let (tid, values) = entry.map_err(map_err("CPU_NS", "iterate"))?;
            threads.insert(tid, values.to_vec());
        }
        Ok(threads)
    }

    /// Drops the kernel counters of threads that have exited (after their final read).
    pub fn forget(&mut self, tids: &[u32]) {
        for tid in tids {
            let _ = self.cpu_ns.remove(tid);
            // Else a later thread given the same id would start from this one's runtime.
            let _ = self.last_runtime.remove(tid);
        }
    }

    /// The programs' own counters, summed over CPUs.
    pub fn stats(&self) -> Result<TracerStats, TracerError> {
        let per_cpu = self
            .cpu_state
            .get(&0, 0)
            .map_err(map_err("CPU_STATE", "read"))?;
        Ok(per_cpu
            .iter()
            .map(|c| c.stats)
            .fold(TracerStats::default(), |a, s| TracerStats {
                switches: a.switches + s.switches,
                charged: a.charged + s.charged,
                dropped: a.dropped + s.dropped,
                read_errors: a.read_errors + s.read_errors,
                lost_events: a.lost_events + s.lost_events,
            }))
    }

    /// Block I/O counters per (process, device, direction, page owner), summed over CPUs.
    pub fn read_block_io(&self) -> Result<Vec<(BlockIoKey, BlockIoValue)>, TracerError> {
        let mut out = Vec::new();
        for entry in self.block_io.iter() {
            let (key, values) = entry.map_err(map_err("BLOCK_IO", "iterate"))?;
            let sum = values
                .iter()
                .fold(BlockIoValue::default(), |a, v| BlockIoValue {
                    bytes: a.bytes + v.bytes,
                    ops: a.ops + v.ops,
                });
            out.push((key, sum));
        }
        Ok(out)
    }

    /// Drops block I/O entries whose counts the caller has folded into its own totals.
    pub fn forget_block_io(&mut self, keys: &[BlockIoKey]) {
        for key in keys {
            let _ = self.block_io.remove(key);
        }
    }
}

/// The tracked-process bitmap's non-zero words: word `tgid / 64`, bit `tgid % 64`. Ids at or
/// above `PID_MAX_LIMIT` name no process and are left out.
fn bitmap_words(tgids: &HashSet<u32>) -> HashMap<u32, u64> {
    let mut words: HashMap<u32, u64> = HashMap::new();
    for &tgid in tgids.iter().filter(|&&t| t < PID_MAX_LIMIT) {
        *words.entry(tgid / 64).or_default() |= 1 << (tgid % 64);
    }
    words
}

/// What a load attached, beside the object: passed back by a loader child as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoadReport {
    exec_hook: bool,
    events: bool,
    block: BlockReport,
}

/// [`BlockIoStatus`] as data.
#[derive(serde::Serialize, serde::Deserialize)]
enum BlockReport {
    Disabled,
    Attached {
        tracepoint: String,
        page_owner: Result<(), String>,
    },
    Unavailable(String),
}

impl BlockReport {
    fn new(status: &BlockIoStatus) -> Self {
        match status {
            BlockIoStatus::Disabled => Self::Disabled,
            BlockIoStatus::Attached {
                tracepoint,
                page_owner,
            } => Self::Attached {
                tracepoint: (*tracepoint).to_owned(),
                page_owner: page_owner.clone(),
            },
            BlockIoStatus::Unavailable(why) => Self::Unavailable(why.clone()),
        }
    }

    fn status(&self) -> BlockIoStatus {
        match self {
            Self::Disabled => BlockIoStatus::Disabled,
            Self::Attached {
                tracepoint,
                page_owner,
            } => BlockIoStatus::Attached {
                tracepoint: BLOCK_TRACEPOINTS
                    .iter()
                    .find(|t| **t == tracepoint.as_str())
                    .copied()
                    .unwrap_or("block_io_start"),
                page_owner: page_owner.clone(),
            },
            Self::Unavailable(why) => BlockIoStatus::Unavailable(why.clone()),
        }
    }
}

/// Where the maps come from: the object loaded here, or fds a loader child passed back
/// (by the names the kernel keeps).
enum MapSource<'a> {
    Object(&'a mut Ebpf),
    Fds(HashMap<String, MapData>),
}

impl MapSource<'_> {
    fn open<T>(&mut self, name: &'static str) -> Result<T, TracerError>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        match self {
            Self::Object(ebpf) => open_map(ebpf, name),
            Self::Fds(maps) => {
                let data = maps.remove(name).ok_or(TracerError::Map {
                    name,
                    op: "find",
                    source: MapError::InvalidName {
                        name: name.to_owned(),
                    },
                })?;
                let map = aya::maps::Map::from_map_data(data).map_err(map_err(name, "open"))?;
                T::try_from(map).map_err(map_err(name, "open"))
            }
        }
    }
}

/// Loads the object with the kernel's offsets and attaches its programs: the object, its
/// logger (at debug level) and what was attached.
#[expect(
    clippy::type_complexity,
    reason = "one call site each for the two ways of loading"
)]
fn load_object(
    opts: &TracerOptions,
    ebpf_debug: bool,
) -> Result<
    (
        Ebpf,
        Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
        LoadReport,
    ),
    TracerError,
> {
    let btf = btf::Btf::load(&opts.btf_path)?;
    let pid = btf.member_offset("task_struct", "pid")?;
    let tgid = btf.member_offset("task_struct", "tgid")?;
    if tgid != pid + 4 {
        return Err(TracerError::TaskLayout { pid, tgid });
    }
    let pid_offset = u64::from(pid);
    let flags_offset = u64::from(btf.member_offset("task_struct", "flags")?);
    // Slices are charged as the kernel's runtime deltas where its BTF says where that
    // counter is (else as clock deltas, which count stolen time too).
    let runtime_offset = btf.task_runtime_offset().unwrap_or_else(|e| {
        log::info!("CPU slices timed by the clock, not the scheduler's runtime: {e}");
        0
    });
    let track_all = u32::from(opts.track_all);
    let block_offsets = if opts.block_io {
        block_offsets(&btf)
    } else {
        Err(String::new())
    };
    // The kernel's BTF (several MB here) is not needed below: free it before aya loads.
    drop(btf);
    // aya 0.14 parses the kernel's BTF here whatever `.btf()` says later (the reason the
    // load runs in a loader child). None: there are no CO-RE relocations to resolve, the
    // offsets come in as globals.
    let mut loader = EbpfLoader::new();
    loader
        .btf(None)
        .override_global("TRACK_ALL", &track_all, true)
        .override_global("TASK_PID_OFFSET", &pid_offset, true)
        .override_global("TASK_FLAGS_OFFSET", &flags_offset, true)
        .override_global("TASK_SUM_EXEC_OFFSET", &runtime_offset, true);
    if let Ok((offsets, _)) = &block_offsets {
        loader.override_global("BLOCK_OFFSETS", offsets, true);
    }
    // Off (0) unless debug records would be shown: then the programs' error paths skip
    // formatting and the ring buffer write too.
    let log_level: u8 = if ebpf_debug {
        aya_log::Level::Debug.into()
    } else {
        0
    };
    loader.override_global(aya_log::LEVEL, &log_level, true);
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(TracerError::Load)?;
    let logs = if ebpf_debug {
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::warn!("eBPF debug logs unavailable: {e}");
                None
            }
        }
    } else {
        None
    };

    attach_switch(&mut ebpf, opts)?;

    let exec_hook = !opts.track_all && !opts.baseline_only && attach_exec_hook(&mut ebpf);
    let events = exec_hook && attach_change_hooks(&mut ebpf);

    let block_status = match block_offsets {
        Ok((_, page_owner)) if opts.block_io && !opts.baseline_only => {
            match attach_block(&mut ebpf) {
                Ok(tracepoint) => BlockIoStatus::Attached {
                    tracepoint,
                    page_owner,
                },
                Err(why) => BlockIoStatus::Unavailable(why),
            }
        }
        Err(why) if opts.block_io && !opts.baseline_only => BlockIoStatus::Unavailable(why),
        _ => BlockIoStatus::Disabled,
    };

    let report = LoadReport {
        exec_hook,
        events,
        block: BlockReport::new(&block_status),
    };
    Ok((ebpf, logs, report))
}

pub(crate) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, TracerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(TracerError::MissingProgram { name })?
        .try_into()
        .map_err(prog_err(name, "open"))
}

/// Attaches the sched_switch program (and the empty baseline beside it, or alone, as
/// `opts` asks): the BTF tracepoint, whose direct loads of `next`'s ids are cheaper, else
/// the raw tracepoint. The kernel BTF the BTF tracepoint needs is parsed here and dropped
/// at once.
fn attach_switch(ebpf: &mut Ebpf, opts: &TracerOptions) -> Result<(), TracerError> {
    let programs = |real, empty| -> Vec<&'static str> {
        let mut names = Vec::new();
        if !opts.baseline_only {
            names.push(real);
        }
        if opts.attach_baseline || opts.baseline_only {
            names.push(empty);
        }
        names
    };
    let tp_btf = |ebpf: &mut Ebpf| -> Result<(), String> {
        // aya parses the whole kernel BTF to find the tracepoint's type by name.
        let btf = aya::Btf::parse_file(&opts.btf_path, aya::Endianness::default())
            .map_err(|e| e.to_string())?;
        for name in programs("sched_switch", "sched_switch_empty") {
            let prog: &mut BtfTracePoint = program(ebpf, name).map_err(|e| e.to_string())?;
            prog.load("sched_switch", &btf)
                .map_err(|e| crate::discovery::error_chain(&e))?;
            prog.attach()
                .map_err(|e| crate::discovery::error_chain(&e))?;
        }
        Ok(())
    };
    let Err(why) = tp_btf(ebpf) else {
        return Ok(());
    };
    log::info!("sched_switch traced as a raw tracepoint (the BTF tracepoint failed: {why})");
    for name in programs("ss_raw", "ss_raw_empty") {
        let prog: &mut RawTracePoint = program(ebpf, name)?;
        prog.load().map_err(prog_err(name, "load"))?;
        prog.attach("sched_switch")
            .map_err(prog_err(name, "attach"))?;
    }
    Ok(())
}

/// Attaches the program that tracks a process from the moment it execs QEMU; false (and a
/// warning) where it cannot, as new VMs are then tracked from the next scan instead.
fn attach_exec_hook(ebpf: &mut Ebpf) -> bool {
    let attached = program::<RawTracePoint>(ebpf, "qemu_exec").and_then(|prog| {
        prog.load().map_err(prog_err("qemu_exec", "load"))?;
        prog.attach("sched_process_exec")
            .map_err(prog_err("qemu_exec", "attach"))
    });
    match attached {
        Ok(_) => true,
        Err(e) => {
            log::warn!(
                "new QEMU processes are tracked from the next scan, not from their exec: {}",
                crate::discovery::error_chain(&e)
            );
            false
        }
    }
}

/// Attaches the programs that report process changes (fork, exit, thread rename); false
/// (and a warning) where one cannot be, as discovery then lists /proc every interval.
fn attach_change_hooks(ebpf: &mut Ebpf) -> bool {
    let hooks = [
        ("task_fork", "sched_process_fork"),
        ("task_exit", "sched_process_exit"),
        ("task_rename", "task_rename"),
    ];
    for (name, tracepoint) in hooks {
        let attached = program::<RawTracePoint>(ebpf, name).and_then(|prog| {
            prog.load().map_err(prog_err(name, "load"))?;
            prog.attach(tracepoint).map_err(prog_err(name, "attach"))
        });
        if let Err(e) = attached {
            log::warn!(
                "discovery lists /proc every interval (no process change events): {}",
                crate::discovery::error_chain(&e)
            );
            return false;
        }
    }
    true
}

/// The kernel struct offsets the block programs need, from BTF, and whether the optional
/// page-owner part resolved (kernels without memory cgroups have no `page::memcg_data`).
pub(crate) fn block_offsets(btf: &btf::Btf) -> Result<(BlockOffsets, Result<(), String>), String> {
    let off = |strukt: &'static str, member: &'static str| {
        btf.member_offset(strukt, member)
            .map_err(|e| format!("{e}: block I/O tracing reads the block structs of recent kernels (tested on Linux 6.18)"))
    };
    let mut o = BlockOffsets {
        ready: 1,
        rq_q: off("request", "q")?,
        rq_cmd_flags: off("request", "cmd_flags")?,
        rq_data_len: off("request", "__data_len")?,
        rq_bio: off("request", "bio")?,
        q_disk: off("request_queue", "disk")?,
        disk_major: off("gendisk", "major")?,
        disk_first_minor: off("gendisk", "first_minor")?,
        bio_bdev: off("bio", "bi_bdev")?,
        bio_opf: off("bio", "bi_opf")?,
        bio_size: off("bio", "bi_iter")? + off("bvec_iter", "bi_size")?,
        bio_io_vec: off("bio", "bi_io_vec")?,
        bdev_disk: off("block_device", "bd_disk")?,
        ..BlockOffsets::ZERO
    };
    let owner = (|| -> Result<(), String> {
        let off = |strukt: &'static str, member: &'static str| {
            btf.member_offset(strukt, member).map_err(|e| e.to_string())
        };
        o.bvec_page = off("bio_vec", "bv_page")?;
        o.page_compound_head = off("page", "compound_head")?;
        o.page_memcg_data = off("page", "memcg_data")?;
        o.memcg_cgroup = off("mem_cgroup", "css")? + off("cgroup_subsys_state", "cgroup")?;
        o.cgroup_kn = off("cgroup", "kn")?;
        o.kn_id = off("kernfs_node", "id")?;
        o.owner = 1;
        Ok(())
    })();
    Ok((o, owner))
}

/// The request tracepoints the block program attaches to, in order of preference.
const BLOCK_TRACEPOINTS: [&str; 2] = ["block_io_start", "block_rq_issue"];

/// Attaches the block programs: requests at `block_io_start` (6.5+, in the submitter's
/// context), else at `block_rq_issue`; bios merged into counted requests at both merge
/// tracepoints. Returns the request tracepoint used.
fn attach_block(ebpf: &mut Ebpf) -> Result<&'static str, String> {
    let prog: &mut RawTracePoint = program(ebpf, "block_rq").map_err(|e| e.to_string())?;
    prog.load()
        .map_err(|e| format!("loading the block program failed: {e}"))?;
    let mut why = Vec::new();
    let mut chosen = None;
    for tp in BLOCK_TRACEPOINTS {
        match prog.attach(tp) {
            Ok(_) => {
                chosen = Some(tp);
                break;
            }
            Err(e) => why.push(format!("block:{tp}: {e}")),
        }
    }
    let tracepoint =
        chosen.ok_or_else(|| format!("no usable block tracepoint ({})", why.join("; ")))?;
    let merge: &mut RawTracePoint = program(ebpf, "block_bio_merge").map_err(|e| e.to_string())?;
    merge
        .load()
        .map_err(|e| format!("loading the bio merge program failed: {e}"))?;
    for tp in ["block_bio_backmerge", "block_bio_frontmerge"] {
        merge
            .attach(tp)
            .map_err(|e| format!("attaching block:{tp} failed: {e}"))?;
    }
    Ok(tracepoint)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
pub(crate) fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we own; failure only matters on old kernels, where
    // the map creation error that follows says so.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        log::debug!("setrlimit(RLIMIT_MEMLOCK) failed; fine on kernels 5.11 and later");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn block_offsets_of_the_running_kernel() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI host has no BTF"
            );
            eprintln!(
                "SKIPPED block_offsets_of_the_running_kernel: no {}",
                path.display()
            );
            return;
        }
        let (o, owner) = block_offsets(&btf::Btf::load(path).unwrap()).unwrap();
        assert_eq!(o.ready, 1);
        // Every kernel with a BTF has memory cgroups built in (distribution configs do).
        assert_eq!(owner, Ok(()));
        assert_eq!(o.owner, 1);
        // `struct request` starts with its queue; `page::compound_head` is the second word.
        assert_eq!(o.rq_q, 0);
        assert_eq!(o.page_compound_head, 8);
        assert!(o.bio_size > o.bio_bdev && o.rq_bio > o.rq_data_len);
    }

    #[test]
    fn bitmap_words_set_one_bit_per_process() {
        let words = bitmap_words(&HashSet::from([
            0,
            1,
            63,
            64,
            130,
            PID_MAX_LIMIT - 1,
            PID_MAX_LIMIT,
        ]));
        assert_eq!(words.len(), 4);
        assert_eq!(words[&0], 1 | 2 | 1 << 63);
        assert_eq!(words[&1], 1);
        assert_eq!(words[&2], 1 << 2);
        assert_eq!(words[&(PID_MAX_LIMIT / 64 - 1)], 1 << 63);
        assert!(bitmap_words(&HashSet::new()).is_empty());
    }

    #[test]
    fn a_kernel_without_the_block_structs_says_which_field() {
        let btf = btf::Btf::parse(btf::tests::blob()).unwrap();
        let why = block_offsets(&btf).unwrap_err();
        assert!(why.contains("struct request has no member q"), "{why}");
    }
}
