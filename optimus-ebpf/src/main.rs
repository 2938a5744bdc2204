//! Optimus' eBPF programs.
//!
//! `sched_switch` charges on-CPU nanoseconds to tracked threads, per CPU (so attribution can
//! charge the right package); `block_rq` and `block_bio_merge` count block I/O bytes and
//! operations per submitting process, device and (for kernel threads) page owner.
//! [`measure`] holds the programs of `optimus measure` (one command's process tree).
//! No CO-RE here: every kernel struct field read is at an offset userspace takes from the
//! kernel's BTF and sets as a global at load time.
//!
//! The rare error paths (a failed `bpf_probe_read_kernel`, a full map) log through aya-log
//! at debug level, shown by the agent at `--log-level debug` (its loader turns the level
//! off otherwise). They log the 1st, 2nd, 4th, 8th... occurrence per CPU only
//! ([`rare`]), so a broken offset cannot flood the ring buffer; the hot path has no log
//! call at all.
#![no_std]
#![no_main]

mod measure;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use optimus_common::{
    block_direction, BlockIoKey, BlockIoValue, BlockOffsets, CpuState, TracerStats, EVENTS_BYTES,
    MAX_EXECED, MAX_TRACKED_THREADS, MAX_VM_CGROUPS, TRACKED_WORDS,
};

// Settings written by userspace at load time (`EbpfLoader::override_global`). Read them
// with `read_volatile`, or the compiler folds the initial values in.

/// Non-zero: charge every thread, not only the tracked ones.
#[no_mangle]
static TRACK_ALL: u32 = 0;
/// Byte offset of `pid` (the thread id) in `struct task_struct`, from the kernel's BTF;
/// `tgid` follows it (userspace checks), so one 8-byte read gets both.
#[no_mangle]
pub(crate) static TASK_PID_OFFSET: u64 = 0;
/// Byte offset of `se.sum_exec_runtime` in `struct task_struct`, from the kernel's BTF
/// (0: unknown, slices are then clock deltas).
#[no_mangle]
pub(crate) static TASK_SUM_EXEC_OFFSET: u64 = 0;
/// Byte offset of `flags` in `struct task_struct`, from the kernel's BTF.
#[no_mangle]
static TASK_FLAGS_OFFSET: u64 = 0;
/// `PF_KTHREAD` from include/linux/sched.h.
const PF_KTHREAD: u32 = 0x0020_0000;
/// Kernel struct offsets the block programs read, from the kernel's BTF.
#[no_mangle]
static BLOCK_OFFSETS: BlockOffsets = BlockOffsets::ZERO;

/// Processes whose threads are charged, a bitmap by tgid (bit `tgid % 64` of word
/// `tgid / 64`), written by userspace from VM discovery. Keyed by process, not thread: a
/// tracked QEMU's new threads are charged from their first switch, before any scan has seen
/// them. An array lookup is inlined by the verifier (no helper call, no hashing).
#[map]
static TRACKED: Array<u64> = Array::with_max_entries(TRACKED_WORDS, 0);

/// Processes that exec'd a QEMU binary since userspace last emptied this map: their bit in
/// [`TRACKED`] was set at exec, and userspace keeps it only if discovery then finds a VM.
#[map]
static EXECED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_EXECED, 0);

/// Processes (tgids) whose threads or identity changed: a tracked process forked, lost a
/// thread, renamed one or exec'd, or a process became QEMU. Discovery re-reads only
/// these in /proc instead of listing every process each interval.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// On-CPU nanoseconds per thread id, one value per CPU.
#[map]
static CPU_NS: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// Per thread: its `se.sum_exec_runtime` when it was last charged (or first switched in).
/// A slice is charged as the runtime since then, so a switch the tracepoint never showed
/// (this host's kernel switches some tasks without it) cannot lose the slice after it.
#[map]
static LAST_RUNTIME: HashMap<u32, u64> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// Per CPU: the thread on it now and since when, and the tracer's own counters, in one
/// value so a switch looks up one map entry.
#[map]
static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// Memory cgroups (kernfs ids) that belong to a VM, written by userspace: a kernel thread's
/// I/O on pages they own is recorded with that owner.
#[map]
static VM_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_VM_CGROUPS, 0);

/// Block I/O per (process, device, direction, page owner). Bounded: a full map
/// counts a drop.
#[map]
static BLOCK_IO: PerCpuHashMap<BlockIoKey, BlockIoValue> =
    PerCpuHashMap::with_max_entries(16_384, 0);

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)` as
/// a BTF tracepoint: `next` is a pointer the verifier trusts, so `next->pid` and
/// `next->tgid` are two plain loads (checked against the kernel's BTF at load time, the
/// offsets being constants of the read-only `.rodata`) instead of a `bpf_probe_read_kernel`
/// call. The agent falls back to [`ss_raw`] where this cannot load.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let offset = read_global(&TASK_PID_OFFSET);
    // SAFETY: `prev` and `next` are the kernel's trusted `task_struct *`s; the verifier
    // checks these loads against its BTF (pid and tgid, two adjacent `pid_t`s) and guards
    // them. Two plain loads each, where the helper for `current`'s ids was a call.
    let ids = |task: *const u8| unsafe {
        if task.is_null() || offset == 0 {
            return None;
        }
        let pid = core::ptr::read_volatile(task.wrapping_add(offset).cast::<i32>());
        let tgid = core::ptr::read_volatile(task.wrapping_add(offset + 4).cast::<i32>());
        u32::try_from(pid).ok().zip(u32::try_from(tgid).ok())
    };
    let prev_ids = ids(prev).unwrap_or_else(current_ids);
    try_sched_switch(&ctx, prev, next, prev_ids, ids(next), |task, offset| {
        // SAFETY: `task` is `prev` or `next`, trusted pointers of this tracepoint, and
        // `offset` is `se.sum_exec_runtime`'s from the kernel's BTF (a read-only constant):
        // the verifier checks the load against the BTF, no helper call needed.
        Some(unsafe { core::ptr::read_volatile(task.wrapping_add(offset as usize).cast::<u64>()) })
    });
    0
}

/// The same as a raw tracepoint, reading `next`'s ids with `bpf_probe_read_kernel`: for
/// kernels where the BTF tracepoint cannot load.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn ss_raw(ctx: RawTracePointContext) -> i32 {
    try_sched_switch(
        &ctx,
        ctx.arg(1),
        ctx.arg(2),
        // At sched_switch `current` is still the outgoing task.
        current_ids(),
        read_next_ids(&ctx),
        |task, offset| read::<u64>(task, offset),
    );
    0
}

/// An empty program on the same hook as [`sched_switch`], the baseline `cargo xtask bench`
/// compares against.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_empty(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// An empty program on the same hook as [`ss_raw`].
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn ss_raw_empty(_ctx: RawTracePointContext) -> i32 {
    0
}

#[inline(always)]
fn try_sched_switch<C: EbpfContext>(
    ctx: &C,
    prev_task: *const u8,
    next_task: *const u8,
    (prev, prev_tgid): (u32, u32),
    next_ids: Option<(u32, u32)>,
    runtime_of: impl Fn(*const u8, u32) -> Option<u64>,
) {
    let Some(state) = CPU_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; the program cannot be preempted on its CPU while it runs, so
    // nobody else writes it now.
    let CpuState { slot, stats } = unsafe { &mut *state };
    stats.switches += 1;

    let (next, next_tgid) = match next_ids {
        Some(ids) => ids,
        None => {
            stats.read_errors += 1;
            if rare(stats.read_errors) {
                debug!(
                    ctx,
                    target: LOG_TARGET,
                    "sched_switch: reading next->pid failed ({} times on this CPU)",
                    stats.read_errors
                );
            }
            (0, 0)
        }
    };
    let next_tracked = next != 0 && is_tracked(next_tgid);
    // tid 0 is this CPU's idle task; an empty slot (first switch after load) names nobody.
    let prev_tracked = prev != 0 && is_tracked(prev_tgid);
    // A switch between two untracked threads (the common case on a busy host, and every
    // switch to or from idle) touches nothing else: no clock, no map. Busy time is the
    // kernel's own idle accounting (/proc/stat), not counted here.
    if !(prev_tracked || next_tracked || slot.tracked != 0) {
        return;
    }
    // Whether this CPU's last switch seen brought prev in, and with its runtime then.
    let slot_is_prev = slot.tracked != 0 && slot.tid == prev;
    let prev_runtime_known = slot_is_prev && slot.tracked & SLICE_RUNTIME != 0;
    let (since_ns, since_runtime_ns) = (slot.since_ns, slot.since_runtime_ns);
    slot.tid = next;
    slot.tracked = u32::from(next_tracked);
    let runtime_offset = task_offset(&TASK_SUM_EXEC_OFFSET);
    if prev_tracked {
        // The scheduler brought prev's sum_exec_runtime up to date (put_prev_task) before
        // this tracepoint.
        let runtime = if runtime_offset == 0 || prev_task.is_null() {
            None
        } else {
            runtime_of(prev_task, runtime_offset)
        };
        let ns = match (runtime, LAST_RUNTIME.get_ptr_mut(&prev)) {
            (Some(rt), Some(last)) => {
                // SAFETY: a pointer the map lookup just returned; only this thread's
                // switches (never two at once) write its entry.
                let last = unsafe { &mut *last };
                // Lower: the id names a new thread (its runtime restarted from 0).
                let ns = rt.saturating_sub(*last);
                *last = rt;
                Some(ns)
            }
            (Some(rt), None) => {
                // Its first charge (entries are made here, and at a QEMU exec), or
                // userspace dropped its entry, or the map is full: this slice from the
                // switch-in this CPU saw, if any.
                let _ = LAST_RUNTIME.insert(&prev, &rt, 0);
                prev_runtime_known.then(|| rt.saturating_sub(since_runtime_ns))
            }
            // No runtime to read: the clock since the switch-in seen.
            (None, _) => slot_is_prev.then(|| unsafe_ktime().saturating_sub(since_ns)),
        };
        if let Some(ns) = ns {
            charge(ctx, prev, ns, stats);
        }
    }
    if next_tracked {
        // For userspace's view of the slice in progress (and the clock-delta fallback).
        slot.since_ns = unsafe_ktime();
        // A thread's first slice is timed from here: its switch-out finds no
        // LAST_RUNTIME entry and takes the slot's runtime instead.
        if runtime_offset != 0 && !next_task.is_null() {
            if let Some(rt) = runtime_of(next_task, runtime_offset) {
                slot.since_runtime_ns = rt;
                slot.tracked |= SLICE_RUNTIME;
            }
        }
    }
}

/// Bit of [`RunningSlice::tracked`]: `since_runtime_ns` holds the thread's runtime at
/// switch-in, so its slice is the runtime delta.
const SLICE_RUNTIME: u32 = 2;

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// in the exec'ing task after its comm became the new binary's name: a process that
/// becomes QEMU is tracked from its first instruction on, not from the next discovery scan
/// (a new VM's threads are charged from their first switch).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn qemu_exec(_ctx: RawTracePointContext) -> i32 {
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    let (tid, tgid) = current_ids();
    if !looks_like_qemu(&comm) {
        // A VM's QEMU that execs something else is a VM no more.
        if process_tracked(tgid) {
            changed(tgid);
        }
        return 0;
    }
    if let Some(word) = TRACKED.get_ptr_mut(tgid / 64) {
        // SAFETY: an element of an array map. Not atomic: userspace rewrites a word only
        // when one of its own bits in it changes, and re-sets this bit from EXECED at its
        // next step if that write raced this one.
        unsafe { *word |= 1 << (tgid % 64) };
    }
    // Its slices count from here: the slice in progress began untracked, so its
    // switch-out charges the runtime since the exec (as of the scheduler's last update).
    let offset = task_offset(&TASK_SUM_EXEC_OFFSET);
    if offset != 0 {
        // SAFETY: bpf_get_current_task has no preconditions.
        let current = unsafe { bpf_get_current_task() } as *const u8;
        if let Some(rt) = read::<u64>(current, offset) {
            let _ = LAST_RUNTIME.insert(&tid, &rt, 0);
        }
    }
    // Full (1,024 QEMU execs within one interval): the next scan finds it anyway.
    let _ = EXECED.insert(&tgid, &1, 0);
    changed(tgid);
    0
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, in the
/// parent: a tracked process gained a thread (or forked a process of its own).
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn task_fork(ctx: RawTracePointContext) -> i32 {
    let (_, parent) = current_ids();
    if !process_tracked(parent) {
        return 0;
    }
    changed(parent);
    if let Some((_, child)) = read_task_ids(ctx.arg(1)) {
        if child != parent {
            changed(child);
        }
    }
    0
}

/// `sched_process_exit(struct task_struct *p)`, in the exiting thread.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn task_exit(_ctx: RawTracePointContext) -> i32 {
    let (_, tgid) = current_ids();
    if process_tracked(tgid) {
        changed(tgid);
    }
    0
}

/// `task_rename(struct task_struct *task, const char *comm)`: QEMU names its threads (`CPU
/// 0/KVM`, `IO ...`) just after creating them, which is what classifies them.
#[raw_tracepoint(tracepoint = "task_rename")]
pub fn task_rename(ctx: RawTracePointContext) -> i32 {
    if let Some((_, tgid)) = read_task_ids(ctx.arg(0)) {
        if process_tracked(tgid) {
            changed(tgid);
        }
    }
    0
}

/// Tells discovery that process `tgid` changed; a full ring buffer is counted, and makes
/// discovery rescan everything.
#[inline(always)]
fn changed(tgid: u32) {
    // BPF_RB_NO_WAKEUP: userspace drains the buffer once per interval, nobody waits on it.
    if EVENTS.output::<u32>(tgid, 1).is_err() {
        if let Some(state) = CPU_STATE.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; nobody else writes it now.
            unsafe { (*state).stats.lost_events += 1 };
        }
    }
}

/// Whether process `tgid`'s bit is set in [`TRACKED`] (whatever `TRACK_ALL` says).
#[inline(always)]
fn process_tracked(tgid: u32) -> bool {
    TRACKED
        .get(tgid / 64)
        .is_some_and(|word| word & (1 << (tgid % 64)) != 0)
}

/// Whether a comm is that of a QEMU binary (`qemu-system-*`, `qemu-kvm`), as discovery
/// judges it (`discovery::procfs::looks_like_qemu`).
#[inline(always)]
fn looks_like_qemu(comm: &[u8; 16]) -> bool {
    const SYSTEM: &[u8; 12] = b"qemu-system-";
    const KVM: &[u8; 8] = b"qemu-kvm";
    let mut system = true;
    let mut kvm = true;
    let mut i = 0;
    while i < SYSTEM.len() {
        system &= comm[i] == SYSTEM[i];
        if i < KVM.len() {
            kvm &= comm[i] == KVM[i];
        }
        i += 1;
    }
    system || kvm
}

/// The log target the agent's `--log-level` filters eBPF records by.
const LOG_TARGET: &str = "optimus::ebpf";

/// Whether the `n`th occurrence (from 1) of an error is logged: 1, 2, 4, 8, ...
#[inline(always)]
fn rare(n: u64) -> bool {
    n & n.wrapping_sub(1) == 0
}

/// The current task's thread id and tgid.
#[inline(always)]
pub(crate) fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the low half is the thread id, the high half the tgid"
    )]
    (id as u32, (id >> 32) as u32)
}

#[inline(always)]
pub(crate) fn unsafe_ktime() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn is_tracked(tgid: u32) -> bool {
    // SAFETY: reading a global set once at load time.
    if unsafe { core::ptr::read_volatile(&TRACK_ALL) } != 0 {
        return true;
    }
    process_tracked(tgid)
}

/// `next->pid` and `next->tgid` of the task switched in.
#[inline(always)]
fn read_next_ids(ctx: &RawTracePointContext) -> Option<(u32, u32)> {
    read_task_ids(ctx.arg(2))
}

/// A task's `pid` and `tgid`, adjacent in `task_struct`, in one kernel read.
#[inline(always)]
fn read_task_ids(task: *const u8) -> Option<(u32, u32)> {
    // SAFETY: reading a global set once at load time.
    let offset = unsafe { core::ptr::read_volatile(&TASK_PID_OFFSET) };
    if task.is_null() || offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    let ids: [i32; 2] =
        unsafe { bpf_probe_read_kernel(task.wrapping_add(offset as usize).cast()) }.ok()?;
    Some((u32::try_from(ids[0]).ok()?, u32::try_from(ids[1]).ok()?))
}

#[inline(always)]
fn charge<C: EbpfContext>(ctx: &C, tid: u32, ns: u64, stats: &mut TracerStats) {
    stats.charged += 1;
    if let Some(total) = CPU_NS.get_ptr_mut(tid) {
        // SAFETY: this CPU's value of a per-CPU map entry; nobody else writes it now.
        unsafe { *total += ns };
    } else if CPU_NS.insert(tid, ns, 0).is_err() {
        stats.dropped += 1;
        if rare(stats.dropped) {
            debug!(
                ctx,
                target: LOG_TARGET,
                "sched_switch: CPU_NS is full, {} ns of thread {} dropped ({} drops on this CPU)",
                ns,
                tid,
                stats.dropped
            );
        }
    }
}

/// `block_io_start(struct request *rq)` (6.5+, in the submitting task's context), or
/// `block_rq_issue(struct request *rq)` where that does not exist: one operation of the
/// request's bytes.
#[raw_tracepoint(tracepoint = "block_io_start")]
pub fn block_rq(ctx: RawTracePointContext) -> i32 {
    let rq: *const u8 = ctx.arg(0);
    try_block_rq(&ctx, rq);
    0
}

/// `block_bio_backmerge` / `block_bio_frontmerge(struct bio *bio)`: a bio joins a request
/// that was already counted, so its bytes count but it is no new operation. Without this,
/// writeback of many small files (merged by the I/O scheduler) mostly went uncounted.
#[raw_tracepoint(tracepoint = "block_bio_backmerge")]
pub fn block_bio_merge(ctx: RawTracePointContext) -> i32 {
    let bio: *const u8 = ctx.arg(0);
    try_block_bio_merge(&ctx, bio);
    0
}

#[inline(always)]
fn try_block_rq(ctx: &RawTracePointContext, rq: *const u8) {
    let o = block_offsets();
    if o.ready == 0 {
        return;
    }
    let (Some(opf), Some(bytes)) = (
        read::<u32>(rq, o.rq_cmd_flags),
        read::<u32>(rq, o.rq_data_len),
    ) else {
        if let Some(n) = count_read_error() {
            debug!(
                ctx,
                target: LOG_TARGET,
                "block_rq: reading struct request failed ({} failed reads on this CPU)",
                n
            );
        }
        return;
    };
    let disk = read_ptr(rq, o.rq_q).and_then(|q| read_ptr(q, o.q_disk));
    let dev = disk.map_or(0, |d| disk_dev(d, &o));
    let bio = read_ptr(rq, o.rq_bio);
    account(ctx, dev, block_direction(opf), bytes, 1, bio, &o);
}

#[inline(always)]
fn try_block_bio_merge(ctx: &RawTracePointContext, bio: *const u8) {
    let o = block_offsets();
    if o.ready == 0 {
        return;
    }
    let (Some(opf), Some(bytes)) = (read::<u32>(bio, o.bio_opf), read::<u32>(bio, o.bio_size))
    else {
        if let Some(n) = count_read_error() {
            debug!(
                ctx,
                target: LOG_TARGET,
                "block_bio_merge: reading struct bio failed ({} failed reads on this CPU)",
                n
            );
        }
        return;
    };
    let disk = read_ptr(bio, o.bio_bdev).and_then(|b| read_ptr(b, o.bdev_disk));
    let dev = disk.map_or(0, |d| disk_dev(d, &o));
    account(ctx, dev, block_direction(opf), bytes, 0, Some(bio), &o);
}

/// Counts a failed kernel read of a block program; the count when it is one to log
/// ([`rare`]).
#[inline(always)]
fn count_read_error() -> Option<u64> {
    let state = CPU_STATE.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nobody else writes it now.
    let stats = unsafe { &mut (*state).stats };
    stats.read_errors += 1;
    rare(stats.read_errors).then_some(stats.read_errors)
}

/// `MKDEV(major, first_minor)` of a gendisk, in the kernel's encoding: the whole disk.
#[inline(always)]
fn disk_dev(disk: *const u8, o: &BlockOffsets) -> u32 {
    let major = read::<i32>(disk, o.disk_major).unwrap_or(0);
    let minor = read::<i32>(disk, o.disk_first_minor).unwrap_or(0);
    #[expect(clippy::cast_sign_loss, reason = "device numbers are never negative")]
    let (major, minor) = (major as u32, minor as u32);
    (major << 20) | (minor & 0xf_ffff)
}

#[inline(always)]
fn account(
    ctx: &RawTracePointContext,
    dev: u32,
    direction: u32,
    bytes: u32,
    ops: u64,
    bio: Option<*const u8>,
    o: &BlockOffsets,
) {
    let (_, tgid) = current_ids();
    let kthread = current_is_kthread();
    // Only a kernel thread's I/O needs the pages' owner: a process's I/O is its own.
    let owner_cgroup_id = match bio {
        Some(bio) if kthread && o.owner != 0 => page_owner(bio, o),
        _ => 0,
    };
    let key = BlockIoKey {
        tgid,
        dev,
        direction,
        kthread: u32::from(kthread),
        owner_cgroup_id,
    };
    if let Some(v) = BLOCK_IO.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map entry; nobody else writes it now.
        unsafe {
            (*v).bytes += u64::from(bytes);
            (*v).ops += ops;
        }
    } else {
        let v = BlockIoValue {
            bytes: u64::from(bytes),
            ops,
        };
        if BLOCK_IO.insert(&key, &v, 0).is_err() {
            if let Some(state) = CPU_STATE.get_ptr_mut(0) {
                // SAFETY: this CPU's slot; nobody else writes it now.
                let stats = unsafe { &mut (*state).stats };
                stats.dropped += 1;
                if rare(stats.dropped) {
                    debug!(
                        ctx,
                        target: LOG_TARGET,
                        "block I/O: BLOCK_IO is full, {} bytes of process {} dropped ({} drops on this CPU)",
                        bytes,
                        tgid,
                        stats.dropped
                    );
                }
            }
        }
    }
}

/// The memory cgroup that owns the bio's first page (the cgroup charged when the page
/// entered the page cache: the writer of a dirty page), if userspace listed it as a VM's.
/// A bio may carry pages of several owners; the first one decides (README "Block I/O").
#[inline(always)]
fn page_owner(bio: *const u8, o: &BlockOffsets) -> u64 {
    let Some(page) = read_ptr(bio, o.bio_io_vec).and_then(|v| read_ptr(v, o.bvec_page)) else {
        return 0;
    };
    // A tail page of a large folio points at its head (low bit set); the head holds the
    // owner.
    let head = match read::<u64>(page, o.page_compound_head) {
        Some(h) if h & 1 != 0 => (h - 1) as *const u8,
        _ => page,
    };
    let Some(memcg_data) = read::<u64>(head, o.page_memcg_data) else {
        return 0;
    };
    // Low bits flag slab (OBJEXTS) or kernel (KMEM) memory: no page-cache owner to name.
    if memcg_data & MEMCG_DATA_FLAGS != 0 || memcg_data == 0 {
        return 0;
    }
    let memcg = memcg_data as *const u8;
    let Some(id) = read_ptr(memcg, o.memcg_cgroup)
        .and_then(|cg| read_ptr(cg, o.cgroup_kn))
        .and_then(|kn| read::<u64>(kn, o.kn_id))
    else {
        return 0;
    };
    if VM_CGROUPS.get_ptr(&id).is_some() {
        id
    } else {
        0
    }
}

/// `MEMCG_DATA_OBJEXTS | MEMCG_DATA_KMEM` (include/linux/memcontrol.h).
const MEMCG_DATA_FLAGS: u64 = 0x3;

#[inline(always)]
pub(crate) fn block_offsets() -> BlockOffsets {
    // SAFETY: reading a global set once at load time.
    unsafe { core::ptr::read_volatile(&BLOCK_OFFSETS) }
}

#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

#[inline(always)]
fn read_ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    read::<u64>(base, offset)
        .filter(|&p| p != 0)
        .map(|p| p as *const u8)
}

/// Whether the current task is a kernel thread: its I/O (writeback, journal) belongs to no
/// process, and userspace must not guess one after the fact.
#[inline(always)]
fn current_is_kthread() -> bool {
    let off = read_global(&TASK_FLAGS_OFFSET);
    if off == 0 {
        return false;
    }
    // SAFETY: bpf_get_current_task has no preconditions; bpf_probe_read_kernel checks the
    // address it is given.
    let flags: Result<u32, _> = unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.wrapping_add(off).cast())
    };
    flags.is_ok_and(|f| f & PF_KTHREAD != 0)
}

/// A byte offset into `task_struct`, set by userspace at load time.
#[inline(always)]
pub(crate) fn task_offset(global: &u64) -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "task_struct is far below 4 GiB"
    )]
    let off = read_global(global) as u32;
    off
}

#[inline(always)]
pub(crate) fn read_global(v: &u64) -> usize {
    // SAFETY: reading a global set once at load time.
    let off = unsafe { core::ptr::read_volatile(v) };
    off as usize
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
