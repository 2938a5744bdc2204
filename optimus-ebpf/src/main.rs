//! Optimus' eBPF programs.
//!
//! `sched_switch` charges on-CPU nanoseconds to tracked threads, per CPU (so attribution can
//! charge the right package); `block_rq` and `block_bio_merge` count block I/O bytes and
//! operations per submitting process, device and (for kernel threads) page owner.
//! No CO-RE here: every kernel struct field read is at an offset userspace takes from the
//! kernel's BTF and sets as a global at load time.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::RawTracePointContext,
};
use optimus_common::{
    block_direction, BlockIoKey, BlockIoValue, BlockOffsets, RunningSlice, TracerStats,
    MAX_TRACKED_THREADS, MAX_VM_CGROUPS,
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
/// Kernel struct offsets the block programs read, from the kernel's BTF.
#[no_mangle]
static BLOCK_OFFSETS: BlockOffsets = BlockOffsets::ZERO;

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

/// Memory cgroups (kernfs ids) that belong to a VM, written by userspace: a kernel thread's
/// I/O on pages they own is recorded with that owner.
#[map]
static VM_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_VM_CGROUPS, 0);

/// Block I/O per (process, device, direction, page owner). Bounded: a full map
/// counts a drop.
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

/// `block_io_start(struct request *rq)` (6.5+, in the submitting task's context), or
/// `block_rq_issue(struct request *rq)` where that does not exist: one operation of the
/// request's bytes.
#[raw_tracepoint(tracepoint = "block_io_start")]
pub fn block_rq(ctx: RawTracePointContext) -> i32 {
    let rq: *const u8 = ctx.arg(0);
    try_block_rq(rq);
    0
}

/// `block_bio_backmerge` / `block_bio_frontmerge(struct bio *bio)`: a bio joins a request
/// that was already counted, so its bytes count but it is no new operation. Without this,
/// writeback of many small files (merged by the I/O scheduler) mostly went uncounted.
#[raw_tracepoint(tracepoint = "block_bio_backmerge")]
pub fn block_bio_merge(ctx: RawTracePointContext) -> i32 {
    let bio: *const u8 = ctx.arg(0);
    try_block_bio_merge(bio);
    0
}

#[inline(always)]
fn try_block_rq(rq: *const u8) {
    let o = block_offsets();
    if o.ready == 0 {
        return;
    }
    let (Some(opf), Some(bytes)) = (
        read::<u32>(rq, o.rq_cmd_flags),
        read::<u32>(rq, o.rq_data_len),
    ) else {
        return;
    };
    let disk = read_ptr(rq, o.rq_q).and_then(|q| read_ptr(q, o.q_disk));
    let dev = disk.map_or(0, |d| disk_dev(d, &o));
    let bio = read_ptr(rq, o.rq_bio);
    account(dev, block_direction(opf), bytes, 1, bio, &o);
}

#[inline(always)]
fn try_block_bio_merge(bio: *const u8) {
    let o = block_offsets();
    if o.ready == 0 {
        return;
    }
    let (Some(opf), Some(bytes)) = (read::<u32>(bio, o.bio_opf), read::<u32>(bio, o.bio_size))
    else {
        return;
    };
    let disk = read_ptr(bio, o.bio_bdev).and_then(|b| read_ptr(b, o.bdev_disk));
    let dev = disk.map_or(0, |d| disk_dev(d, &o));
    account(dev, block_direction(opf), bytes, 0, Some(bio), &o);
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
    dev: u32,
    direction: u32,
    bytes: u32,
    ops: u64,
    bio: Option<*const u8>,
    o: &BlockOffsets,
) {
    #[expect(clippy::cast_possible_truncation, reason = "the high half is the tgid")]
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
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
            if let Some(stats) = STATS.get_ptr_mut(0) {
                // SAFETY: this CPU's slot; nobody else writes it now.
                unsafe { (*stats).dropped += 1 };
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
fn block_offsets() -> BlockOffsets {
    // SAFETY: reading a global set once at load time.
    unsafe { core::ptr::read_volatile(&BLOCK_OFFSETS) }
}

#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
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

#[inline(always)]
fn read_global(v: &u64) -> usize {
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
