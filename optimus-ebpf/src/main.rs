//! Optimus' eBPF programs.
//!
//! `sched_switch` charges on-CPU nanoseconds to tracked threads, per CPU (so attribution can
//! charge the right package); `block_io_start` counts block I/O bytes and operations per
//! submitting process, cgroup and device. No CO-RE here: the one kernel struct field read
//! (`task_struct::pid` of the incoming task) is at an offset userspace takes from the
//! kernel's BTF and sets as a global at load time.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
};
use optimus_common::{
    BlockIoKey, BlockIoValue, RunningSlice, TracerStats, BLOCK_DIR_DISCARD, BLOCK_DIR_FLUSH,
    BLOCK_DIR_READ, BLOCK_DIR_WRITE, MAX_TRACKED_THREADS,
};

// Settings written by userspace at load time (`EbpfLoader::override_global`). Read them
// with `read_volatile`, or the compiler folds the initial values in.

/// Non-zero: charge every thread, not only the tracked ones.
#[no_mangle]
static TRACK_ALL: u32 = 0;
/// Byte offset of `pid` (the thread id) in `struct task_struct`, from the kernel's BTF.
#[no_mangle]
static TASK_PID_OFFSET: u64 = 0;
/// Byte offset of `flags` in `struct task_struct`, from the kernel's BTF.
#[no_mangle]
static TASK_FLAGS_OFFSET: u64 = 0;
/// `PF_KTHREAD` from include/linux/sched.h.
const PF_KTHREAD: u32 = 0x0020_0000;
/// Byte offsets of the `block_io_start` tracepoint record fields, from its format file.
#[no_mangle]
static BIO_DEV_OFFSET: u64 = 8;
#[no_mangle]
static BIO_BYTES_OFFSET: u64 = 28;
#[no_mangle]
static BIO_RWBS_OFFSET: u64 = 34;

/// Thread ids to charge (value `TRACKED_YES`), written by userspace from VM discovery.
#[map]
static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// On-CPU nanoseconds per thread id, one value per CPU.
#[map]
static CPU_NS: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// The thread on each CPU now and since when (one slot per CPU).
#[map]
static RUNNING: PerCpuArray<RunningSlice> = PerCpuArray::with_max_entries(1, 0);

/// The tracer's own counters (one slot per CPU).
#[map]
static STATS: PerCpuArray<TracerStats> = PerCpuArray::with_max_entries(1, 0);

/// Block I/O per (process, cgroup, device, direction). Bounded: a full map counts a drop.
#[map]
static BLOCK_IO: PerCpuHashMap<BlockIoKey, BlockIoValue> =
    PerCpuHashMap::with_max_entries(16_384, 0);

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)`.
/// Raw tracepoint: measured a little cheaper than tp_btf and the classic tracepoint here.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    try_sched_switch(&ctx);
    0
}

/// An empty program on the same hook, the baseline `cargo xtask bench` compares against.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_empty(_ctx: RawTracePointContext) -> i32 {
    0
}

#[inline(always)]
fn try_sched_switch(ctx: &RawTracePointContext) {
    let Some(stats) = STATS.get_ptr_mut(0) else {
        return;
    };
    let Some(slot) = RUNNING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slots of this CPU; the program cannot be preempted on its CPU while it
    // runs, so nobody else writes them now.
    let (stats, slot) = unsafe { (&mut *stats, &mut *slot) };
    stats.switches += 1;

    // At sched_switch `current` is still the outgoing task.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the low half is the thread id"
    )]
    let prev = bpf_get_current_pid_tgid() as u32;
    let next = match read_next_tid(ctx) {
        Some(tid) => tid,
        None => {
            stats.read_errors += 1;
            0
        }
    };
    let next_tracked = next != 0 && is_tracked(next);
    // tid 0 is this CPU's idle task; an empty slot (first switch after load) names nobody.
    let charge_prev = slot.tracked != 0 && slot.tid == prev && prev != 0;
    // Busy time changes only at idle edges (and must start being counted once per CPU).
    let busy_edge = (prev == 0) != (next == 0) || (next != 0 && slot.busy_since_ns == 0);
    slot.tid = next;
    slot.tracked = u32::from(next_tracked);
    // A switch between two untracked, non-idle threads (the common case on a busy host)
    // needs no clock read at all.
    if !(charge_prev || next_tracked || busy_edge) {
        return;
    }
    let now = unsafe_ktime();
    if charge_prev {
        charge(prev, now.saturating_sub(slot.since_ns), stats);
    }
    if busy_edge {
        if next == 0 {
            if slot.busy_since_ns != 0 {
                stats.busy_ns += now.saturating_sub(slot.busy_since_ns);
            }
            slot.busy_since_ns = 0;
        } else if slot.busy_since_ns == 0 {
            slot.busy_since_ns = now;
        }
    }
    if next_tracked {
        slot.since_ns = now;
    }
}

#[inline(always)]
fn unsafe_ktime() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn is_tracked(tid: u32) -> bool {
    // SAFETY: reading a global set once at load time.
    if unsafe { core::ptr::read_volatile(&TRACK_ALL) } != 0 {
        return true;
    }
    TRACKED.get_ptr(tid).is_some()
}

#[inline(always)]
fn read_next_tid(ctx: &RawTracePointContext) -> Option<u32> {
    let next: *const u8 = ctx.arg(2);
    // SAFETY: reading a global set once at load time.
    let offset = unsafe { core::ptr::read_volatile(&TASK_PID_OFFSET) };
    if next.is_null() || offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    let pid: i32 =
        unsafe { bpf_probe_read_kernel(next.wrapping_add(offset as usize).cast()) }.ok()?;
    u32::try_from(pid).ok()
}

#[inline(always)]
fn charge(tid: u32, ns: u64, stats: &mut TracerStats) {
    stats.charged += 1;
    if let Some(total) = CPU_NS.get_ptr_mut(tid) {
        // SAFETY: this CPU's value of a per-CPU map entry; nobody else writes it now.
        unsafe { *total += ns };
    } else if CPU_NS.insert(tid, ns, 0).is_err() {
        stats.dropped += 1;
    }
}

/// `block:block_io_start`: runs in the context of the task that submits the I/O.
#[tracepoint(category = "block", name = "block_io_start")]
pub fn block_io_start(ctx: TracePointContext) -> u32 {
    try_block_io(&ctx);
    0
}

/// Fallback for kernels without `block_io_start` (before 6.5): `block_rq_issue` has the same
/// leading fields; it runs in the submitter's context when the request is issued directly.
#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    try_block_io(&ctx);
    0
}

#[inline(always)]
fn try_block_io(ctx: &TracePointContext) {
    // SAFETY: offsets come from the tracepoint's own format file; read_at bounds-checks.
    let (dev, bytes, rwbs) = unsafe {
        let dev: u32 = match ctx.read_at(read_global(&BIO_DEV_OFFSET)) {
            Ok(v) => v,
            Err(_) => return,
        };
        let bytes: u32 = match ctx.read_at(read_global(&BIO_BYTES_OFFSET)) {
            Ok(v) => v,
            Err(_) => return,
        };
        let rwbs: [u8; 8] = match ctx.read_at(read_global(&BIO_RWBS_OFFSET)) {
            Ok(v) => v,
            Err(_) => return,
        };
        (dev, bytes, rwbs)
    };
    #[expect(clippy::cast_possible_truncation, reason = "the high half is the tgid")]
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let key = BlockIoKey {
        tgid,
        dev,
        cgroup_id,
        direction: direction(&rwbs),
        kthread: u32::from(current_is_kthread()),
    };
    if let Some(v) = BLOCK_IO.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map entry; nobody else writes it now.
        unsafe {
            (*v).bytes += u64::from(bytes);
            (*v).ops += 1;
        }
    } else {
        let v = BlockIoValue {
            bytes: u64::from(bytes),
            ops: 1,
        };
        if BLOCK_IO.insert(&key, &v, 0).is_err() {
            if let Some(stats) = STATS.get_ptr_mut(0) {
                // SAFETY: this CPU's slot; nobody else writes it now.
                unsafe { (*stats).dropped += 1 };
            }
        }
    }
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

#[inline(always)]
fn read_global(v: &u64) -> usize {
    // SAFETY: reading a global set once at load time.
    let off = unsafe { core::ptr::read_volatile(v) };
    off as usize
}

/// The rule (same as blktrace's rwbs letters): the first of `D` (discard, also secure erase),
/// `W` (write, also write-zeroes), `R` (read) decides; otherwise a bare `F` flush. Documented
/// in the README; userspace exports read and write, and counts discard and flush apart.
#[inline(always)]
fn direction(rwbs: &[u8; 8]) -> u32 {
    let mut i = 0;
    while i < rwbs.len() {
        match rwbs[i] {
            b'D' => return BLOCK_DIR_DISCARD,
            b'W' => return BLOCK_DIR_WRITE,
            b'R' => return BLOCK_DIR_READ,
            0 => break,
            _ => {}
        }
        i += 1;
    }
    BLOCK_DIR_FLUSH
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
