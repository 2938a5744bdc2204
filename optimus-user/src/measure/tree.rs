//! The kernel side of `optimus measure`: loads its own copy of the programs (its own maps,
//! so it works beside a running agent), seeds the process tree, and reads the tree's
//! counters: per-CPU on-CPU time, per-CPU busy time, block I/O.

use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader};
use optimus_common::{MeasureCounters, MeasureSlice, MEASURE_SEED};

use crate::tracer::{
    block_offsets, btf, map_err, monotonic_ns, open_map, prog_err, program, raise_memlock_limit,
    TracerError, EBPF_OBJECT,
};

/// The tree's counters at one instant, since the programs were loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeReading {
    /// CLOCK_MONOTONIC nanoseconds of the read.
    pub at_ns: u64,
    /// On-CPU nanoseconds of the tree per CPU (index = CPU id), slices in progress included.
    pub cpu_ns: Vec<u64>,
    /// Busy (non-idle) nanoseconds of each CPU, stretches in progress included.
    pub busy_ns: Vec<u64>,
    /// Block I/O bytes the tree submitted.
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Threads that joined the tree, and those that could not (map full).
    pub forks: u64,
    pub dropped: u64,
}

/// The loaded programs; dropping it detaches them.
pub struct TreeTracer {
    _ebpf: Ebpf,
    tree: BpfHashMap<MapData, u32, u32>,
    running: PerCpuArray<MapData, MeasureSlice>,
    counters: PerCpuArray<MapData, MeasureCounters>,
    /// Whether block I/O is counted (why not, otherwise).
    block_io: Result<(), String>,
}

impl TreeTracer {
    /// Loads and attaches the measure programs. Needs root (or CAP_BPF + CAP_PERFMON).
    pub fn load(btf_path: &Path) -> Result<Self, TracerError> {
        raise_memlock_limit();
        let btf = btf::Btf::load(btf_path)?;
        let pid_offset = u64::from(btf.member_offset("task_struct", "pid")?);
        let sum_exec_offset = btf.task_runtime_offset()?;
        let blocks = block_offsets(&btf);
        drop(btf);
        let mut loader = EbpfLoader::new();
        loader
            .btf(None)
            .override_global("TASK_PID_OFFSET", &pid_offset, true)
            .override_global("TASK_SUM_EXEC_OFFSET", &sum_exec_offset, true);
        if let Ok((offsets, _)) = &blocks {
            loader.override_global("BLOCK_OFFSETS", offsets, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(TracerError::Load)?;
        for (name, tracepoint) in [
            ("measure_fork", "sched_process_fork"),
            ("measure_switch", "sched_switch"),
        ] {
            let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name, "load"))?;
            prog.attach(tracepoint).map_err(prog_err(name, "attach"))?;
        }
        let block_io = blocks.map(drop).and_then(|()| attach_block(&mut ebpf));
        let tree = open_map(&mut ebpf, "MEASURE_TREE")?;
        let running = open_map(&mut ebpf, "MEASURE_RUNNING")?;
        let counters = open_map(&mut ebpf, "MEASURE_COUNTERS")?;
        Ok(Self {
            _ebpf: ebpf,
            tree,
            running,
            counters,
            block_io,
        })
    }

    /// Whether block I/O is counted, and why not.
    pub fn block_io(&self) -> &Result<(), String> {
        &self.block_io
    }

    /// Makes the children thread `tid` forks from now on join the tree (it is not charged).
    pub fn seed(&mut self, tid: u32) -> Result<(), TracerError> {
        self.tree
            .insert(tid, MEASURE_SEED, 0)
            .map_err(map_err("MEASURE_TREE", "insert"))
    }

    /// Ends [`TreeTracer::seed`].
    pub fn unseed(&mut self, tid: u32) {
        // Absent already is fine: the map is ours alone.
        let _ = self.tree.remove(&tid);
    }

    /// Whether thread `tid` (for a process: its pid) is in the tree now.
    pub fn contains(&self, tid: u32) -> bool {
        self.tree
            .get(&tid, 0)
            .is_ok_and(|v| v == optimus_common::MEASURE_MEMBER)
    }

    /// Reads the counters, adding each CPU's slice and busy stretch in progress.
    ///
    /// The counters and the running slots are two map reads: a slice that closes between
    /// them would be in neither (or in both, read the other way round), and a phase
    /// boundary would hand it to the next phase. So each CPU's pair is taken only when the
    /// counters read before and after the slots agree (nothing closed on that CPU in
    /// between); a CPU that keeps switching is retried a few times, then read as counters
    /// after plus a slot that is provably still open.
    pub fn read(&self) -> Result<TreeReading, TracerError> {
        const ROUNDS: usize = 8;
        let read_counters = || {
            self.counters
                .get(&0, 0)
                .map_err(map_err("MEASURE_COUNTERS", "read"))
        };
        let read_slots = || {
            self.running
                .get(&0, 0)
                .map_err(map_err("MEASURE_RUNNING", "read"))
        };
        let mut settled: Vec<Option<(MeasureCounters, MeasureSlice, u64)>> = Vec::new();
        let mut last = None;
        for round in 0..ROUNDS {
            let before = read_counters()?;
            let slots = read_slots()?;
            let at_ns = monotonic_ns();
            let after = read_counters()?;
            if settled.len() < after.len() {
                settled.resize(after.len(), None);
            }
            for (cpu, ((b, s), a)) in before
                .iter()
                .zip(slots.iter())
                .zip(after.iter())
                .enumerate()
            {
                let quiet = b.cpu_ns == a.cpu_ns && b.busy_ns == a.busy_ns;
                if settled[cpu].is_none() && (quiet || round + 1 == ROUNDS) {
                    settled[cpu] = Some(if quiet {
                        (*a, *s, at_ns)
                    } else {
                        // Still switching after every round: the closed slices of `after`
                        // alone (the open one is counted at the next read).
                        (*a, MeasureSlice::default(), at_ns)
                    });
                }
            }
            last = Some(at_ns);
            if settled.iter().all(Option::is_some) {
                break;
            }
        }
        let at_ns = last.unwrap_or_else(monotonic_ns);
        let mut out = TreeReading {
            at_ns,
            ..TreeReading::default()
        };
        for (c, slot, slot_at) in settled.into_iter().flatten() {
            let mut cpu = c.cpu_ns;
            if slot.member != 0 && slot.tid != 0 && slot.since_ns != 0 {
                cpu += slot_at.saturating_sub(slot.since_ns);
            }
            let mut busy = c.busy_ns;
            if slot.busy_since_ns != 0 {
                busy += slot_at.saturating_sub(slot.busy_since_ns);
            }
            out.cpu_ns.push(cpu);
            out.busy_ns.push(busy);
            out.read_bytes += c.read_bytes;
            out.write_bytes += c.write_bytes;
            out.forks += c.forks;
            out.dropped += c.dropped;
        }
        Ok(out)
    }
}

/// Attaches the measure block programs (requests at `block_io_start`, else
/// `block_rq_issue`; merged bios at both merge tracepoints).
fn attach_block(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut RawTracePoint = program(ebpf, "measure_block_rq").map_err(|e| e.to_string())?;
    prog.load()
        .map_err(|e| format!("loading the block program failed: {e}"))?;
    if prog.attach("block_io_start").is_err() {
        prog.attach("block_rq_issue")
            .map_err(|e| format!("no usable block tracepoint: {e}"))?;
    }
    let merge: &mut RawTracePoint =
        program(ebpf, "measure_bio_merge").map_err(|e| e.to_string())?;
    merge
        .load()
        .map_err(|e| format!("loading the bio merge program failed: {e}"))?;
    for tp in ["block_bio_backmerge", "block_bio_frontmerge"] {
        merge
            .attach(tp)
            .map_err(|e| format!("attaching block:{tp} failed: {e}"))?;
    }
    Ok(())
}
