//! The kernel side, seen from userspace: loads the eBPF programs, tells them which threads
//! to charge, and reads per-thread, per-CPU on-CPU nanoseconds and block I/O counters.
//!
//! Reads are raw kernel numbers; keeping VM totals monotonic across thread exits is the
//! job of [`crate::sampler`].

pub mod btf;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::programs::{ProgramError, RawTracePoint};
use aya::{Ebpf, EbpfError, EbpfLoader};
use optimus_common::{
    BlockIoKey, BlockIoValue, BlockOffsets, RunningSlice, TracerStats, TRACKED_YES,
};

/// The compiled eBPF object, built by `build.rs` from the `optimus-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/optimus"));

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
    /// Kernel BTF, normally `/sys/kernel/btf/vmlinux`.
    pub btf_path: PathBuf,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            track_all: false,
            block_io: true,
            attach_baseline: false,
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
    /// Per CPU: nanoseconds it ran anything but its idle task since the tracer loaded, the
    /// running slice included.
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
    // Keeps programs and links alive.
    _ebpf: Ebpf,
    tracked: BpfHashMap<MapData, u32, u32>,
    cpu_ns: PerCpuHashMap<MapData, u32, u64>,
    running: PerCpuArray<MapData, RunningSlice>,
    stats: PerCpuArray<MapData, TracerStats>,
    block_io: PerCpuHashMap<MapData, BlockIoKey, BlockIoValue>,
    vm_cgroups: BpfHashMap<MapData, u64, u32>,
    vm_cgroup_set: HashSet<u64>,
    tracked_set: HashSet<u32>,
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

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(MapError) -> TracerError {
    move |source| TracerError::Map { name, op, source }
}

fn prog_err(name: &'static str, op: &'static str) -> impl FnOnce(ProgramError) -> TracerError {
    move |source| TracerError::Program { name, op, source }
}

impl Tracer {
    /// Loads and attaches the programs. Needs root (or CAP_BPF + CAP_PERFMON).
    pub fn load(opts: &TracerOptions) -> Result<Self, TracerError> {
        raise_memlock_limit();
        let btf = btf::Btf::load(&opts.btf_path)?;
        let pid_offset = u64::from(btf.member_offset("task_struct", "pid")?);
        let flags_offset = u64::from(btf.member_offset("task_struct", "flags")?);
        let track_all = u32::from(opts.track_all);
        let block_offsets = if opts.block_io {
            block_offsets(&btf)
        } else {
            Err(String::new())
        };
        // The kernel's BTF (several MB here) is not needed below: free it before aya loads.
        drop(btf);
        let mut loader = EbpfLoader::new();
        // No CO-RE relocations to resolve (offsets come in as globals), so aya need not
        // parse the kernel's BTF: that parse was most of the agent's peak memory.
        loader
            .btf(None)
            .override_global("TRACK_ALL", &track_all, true)
            .override_global("TASK_PID_OFFSET", &pid_offset, true)
            .override_global("TASK_FLAGS_OFFSET", &flags_offset, true);
        if let Ok((offsets, _)) = &block_offsets {
            loader.override_global("BLOCK_OFFSETS", offsets, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(TracerError::Load)?;

        let prog: &mut RawTracePoint = program(&mut ebpf, "sched_switch")?;
        prog.load().map_err(prog_err("sched_switch", "load"))?;
        prog.attach("sched_switch")
            .map_err(prog_err("sched_switch", "attach"))?;

        if opts.attach_baseline {
            let prog: &mut RawTracePoint = program(&mut ebpf, "sched_switch_empty")?;
            prog.load()
                .map_err(prog_err("sched_switch_empty", "load"))?;
            prog.attach("sched_switch")
                .map_err(prog_err("sched_switch_empty", "attach"))?;
        }

        let block_status = match block_offsets {
            Ok((_, page_owner)) if opts.block_io => match attach_block(&mut ebpf) {
                Ok(tracepoint) => BlockIoStatus::Attached {
                    tracepoint,
                    page_owner,
                },
                Err(why) => BlockIoStatus::Unavailable(why),
            },
            Err(why) if opts.block_io => BlockIoStatus::Unavailable(why),
            _ => BlockIoStatus::Disabled,
        };

        let tracked = BpfHashMap::try_from(take_map(&mut ebpf, "TRACKED")?)
            .map_err(map_err("TRACKED", "open"))?;
        let cpu_ns = PerCpuHashMap::try_from(take_map(&mut ebpf, "CPU_NS")?)
            .map_err(map_err("CPU_NS", "open"))?;
        let running = PerCpuArray::try_from(take_map(&mut ebpf, "RUNNING")?)
            .map_err(map_err("RUNNING", "open"))?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "STATS")?)
            .map_err(map_err("STATS", "open"))?;
        let block_io = PerCpuHashMap::try_from(take_map(&mut ebpf, "BLOCK_IO")?)
            .map_err(map_err("BLOCK_IO", "open"))?;
        let vm_cgroups = BpfHashMap::try_from(take_map(&mut ebpf, "VM_CGROUPS")?)
            .map_err(map_err("VM_CGROUPS", "open"))?;
        Ok(Self {
            _ebpf: ebpf,
            tracked,
            cpu_ns,
            running,
            stats,
            block_io,
            vm_cgroups,
            vm_cgroup_set: HashSet::new(),
            tracked_set: HashSet::new(),
            track_all: opts.track_all,
            block_status,
        })
    }

    /// Whether block I/O is traced.
    pub fn block_io_status(&self) -> &BlockIoStatus {
        &self.block_status
    }

    /// True in track-everything mode.
    pub fn tracks_all(&self) -> bool {
        self.track_all
    }

    /// Makes the in-kernel filter charge exactly `tids` (ignored in track-everything mode).
    pub fn set_tracked(&mut self, tids: &HashSet<u32>) -> Result<(), TracerError> {
        if self.track_all {
            return Ok(());
        }
        for &tid in tids.difference(&self.tracked_set) {
            self.tracked
                .insert(tid, TRACKED_YES, 0)
                .map_err(map_err("TRACKED", "insert"))?;
        }
        let gone: Vec<u32> = self.tracked_set.difference(tids).copied().collect();
        for tid in gone {
            // Already absent is fine: the map is ours alone.
            let _ = self.tracked.remove(&tid);
        }
        self.tracked_set.clone_from(tids);
        Ok(())
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
        let mut threads = HashMap::new();
        for entry in self.cpu_ns.iter() {
            let (tid, values) = entry.map_err(map_err("CPU_NS", "iterate"))?;
            threads.insert(tid, values.to_vec());
        }
        // Map and counters first, then slots, then the clock: a switch between the reads can only
        // under-count until the next read (which the sampler's monotonic clamp absorbs),
        // never count a slice twice.
        let mut busy_ns: Vec<u64> = self
            .stats
            .get(&0, 0)
            .map_err(map_err("STATS", "read"))?
            .iter()
            .map(|s| s.busy_ns)
            .collect();
        let slots = self
            .running
            .get(&0, 0)
            .map_err(map_err("RUNNING", "read"))?;
        let at_ns = monotonic_ns();
        let ncpus = slots.len();
        for (cpu, slot) in slots.iter().enumerate() {
            if slot.busy_since_ns != 0 {
                if let Some(b) = busy_ns.get_mut(cpu) {
                    *b += at_ns.saturating_sub(slot.busy_since_ns);
                }
            }
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
            busy_ns,
        })
    }

    /// Drops the kernel counters of threads that have exited (after their final read).
    pub fn forget(&mut self, tids: &[u32]) {
        for tid in tids {
            let _ = self.cpu_ns.remove(tid);
        }
    }

    /// The programs' own counters, summed over CPUs.
    pub fn stats(&self) -> Result<TracerStats, TracerError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err("STATS", "read"))?;
        Ok(per_cpu
            .iter()
            .fold(TracerStats::default(), |a, s| TracerStats {
                switches: a.switches + s.switches,
                charged: a.charged + s.charged,
                dropped: a.dropped + s.dropped,
                read_errors: a.read_errors + s.read_errors,
                busy_ns: a.busy_ns + s.busy_ns,
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

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, TracerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(TracerError::MissingProgram { name })?
        .try_into()
        .map_err(prog_err(name, "open"))
}

/// The kernel struct offsets the block programs need, from BTF, and whether the optional
/// page-owner part resolved (kernels without memory cgroups have no `page::memcg_data`).
fn block_offsets(btf: &btf::Btf) -> Result<(BlockOffsets, Result<(), String>), String> {
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

/// Attaches the block programs: requests at `block_io_start` (6.5+, in the submitter's
/// context), else at `block_rq_issue`; bios merged into counted requests at both merge
/// tracepoints. Returns the request tracepoint used.
fn attach_block(ebpf: &mut Ebpf) -> Result<&'static str, String> {
    let prog: &mut RawTracePoint = program(ebpf, "block_rq").map_err(|e| e.to_string())?;
    prog.load()
        .map_err(|e| format!("loading the block program failed: {e}"))?;
    let mut why = Vec::new();
    let mut chosen = None;
    for tp in ["block_io_start", "block_rq_issue"] {
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
fn raise_memlock_limit() {
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
    fn a_kernel_without_the_block_structs_says_which_field() {
        let btf = btf::Btf::parse(btf::tests::blob()).unwrap();
        let why = block_offsets(&btf).unwrap_err();
        assert!(why.contains("struct request has no member q"), "{why}");
    }
}
