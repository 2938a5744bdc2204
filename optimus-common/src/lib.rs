//! Types that cross the kernel/user boundary, one definition for both sides.
//!
//! Every type is `#[repr(C)]`, padded by hand and pinned in size, because the eBPF programs
//! and the agent must agree on the byte layout of every map key and value.
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

/// Bound of the map of tracked threads (and of the per-thread CPU time map). A host with
/// 1,000 VMs of 8 vCPUs and a dozen helper threads each stays well inside it.
pub const MAX_TRACKED_THREADS: u32 = 65_536;

/// Bound of the per-thread CPU time map in track-everything mode, where it is an LRU map:
/// the agent retires exited threads every interval, so eviction only happens on a host
/// with more live threads than this.
pub const MAX_THREADS_ALL: u32 = 65_536;

/// `PID_MAX_LIMIT` of 64-bit kernels (include/linux/threads.h): no tgid reaches it, so a
/// bitmap of this many bits covers every process whatever `kernel.pid_max` says.
pub const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;

/// Bound of the map of processes that exec'd QEMU since the agent last looked (it empties
/// it every interval).
pub const MAX_EXECED: u32 = 1024;

/// Words of the tracked-process bitmap (`TRACKED`): bit `tgid % 64` of word `tgid / 64` set
/// means every thread of process `tgid` is charged. 512 KiB of kernel memory.
pub const TRACKED_WORDS: u32 = PID_MAX_LIMIT / 64;

/// What the program records about the thread that runs on one CPU right now, so that
/// userspace can add the slice in progress at read time (a vCPU spinning for 10 s must show
/// 10 s, not 0 until it is preempted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunningSlice {
    /// Thread id now on this CPU (0: the idle task or unknown).
    pub tid: u32,
    /// Non-zero when that thread was tracked when it was switched in: bit 0 set, and bit 1
    /// when `since_runtime_ns` holds its runtime then.
    pub tracked: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it was switched in; only kept for a
    /// tracked thread (the clock is not read for switches between untracked threads).
    pub since_ns: u64,
    /// The tracked thread's `se.sum_exec_runtime` when it was switched in: its slice is
    /// charged as the kernel's own runtime delta (what schedstat and cgroups report), not
    /// as a clock delta, which would include time stolen by the hypervisor and the
    /// scheduler's own bookkeeping around the switch.
    pub since_runtime_ns: u64,
}
const _: () = assert!(size_of::<RunningSlice>() == 24);

/// Per-CPU counters of the tracer itself, the agent's own cost and health.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracerStats {
    /// `sched_switch` events seen.
    pub switches: u64,
    /// Switch-outs charged to a tracked thread.
    pub charged: u64,
    /// Charges that could not be stored (map full).
    pub dropped: u64,
    /// Kernel reads (`bpf_probe_read_kernel` of `next->pid`, of a block request or bio)
    /// that failed.
    pub read_errors: u64,
    /// Process change events (fork, exec, exit, rename of a tracked process) that did not
    /// fit in the event ring buffer: discovery then rescans /proc in full.
    pub lost_events: u64,
}
const _: () = assert!(size_of::<TracerStats>() == 40);

/// Everything `sched_switch` keeps per CPU, in one map value so that a switch costs one
/// lookup of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub slot: RunningSlice,
    pub stats: TracerStats,
}
const _: () = assert!(size_of::<CpuState>() == 64);

/// Bytes of the ring buffer of process change events (4-byte tgids in 16-byte records:
/// about 16,000 changes per sampling interval before one is lost).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Key of the block I/O map: who submitted how much to which device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockIoKey {
    /// Thread group id (process id) of the submitting task; 0 for kernel context.
    pub tgid: u32,
    /// Device number of the whole disk as the kernel encodes it (`major << 20 | minor`).
    pub dev: u32,
    /// One of the `BLOCK_DIR_*` values.
    pub direction: u32,
    /// `1` when the submitter is a kernel thread (`PF_KTHREAD`): writeback, journal.
    pub kthread: u32,
    /// For a kernel thread's I/O: the memory cgroup (kernfs id) that owns the first page
    /// written or read, when userspace listed it in `VM_CGROUPS`; else 0.
    pub owner_cgroup_id: u64,
}
const _: () = assert!(size_of::<BlockIoKey>() == 24);

/// Bound of the map of VM-owned memory cgroups the block program looks page owners up in.
pub const MAX_VM_CGROUPS: u32 = 16_384;

/// Where the block programs find what they read in kernel structs (no CO-RE in Rust eBPF):
/// byte offsets from the running kernel's BTF, set once at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOffsets {
    /// `1` once userspace filled in the offsets; the programs do nothing before.
    pub ready: u32,
    /// `1` when the page-owner offsets below resolved (the kernel has memory cgroups).
    pub owner: u32,
    /// `request::q`, `::cmd_flags`, `::__data_len`, `::bio`.
    pub rq_q: u32,
    pub rq_cmd_flags: u32,
    pub rq_data_len: u32,
    pub rq_bio: u32,
    /// `request_queue::disk`.
    pub q_disk: u32,
    /// `gendisk::major`, `::first_minor`.
    pub disk_major: u32,
    pub disk_first_minor: u32,
    /// `bio::bi_bdev`, `::bi_opf`, `::bi_iter` + `bvec_iter::bi_size`, `::bi_io_vec`.
    pub bio_bdev: u32,
    pub bio_opf: u32,
    pub bio_size: u32,
    pub bio_io_vec: u32,
    /// `block_device::bd_disk`.
    pub bdev_disk: u32,
    /// `bio_vec::bv_page`.
    pub bvec_page: u32,
    /// `page::compound_head`, `::memcg_data`.
    pub page_compound_head: u32,
    pub page_memcg_data: u32,
    /// `mem_cgroup::css` + `cgroup_subsys_state::cgroup`.
    pub memcg_cgroup: u32,
    /// `cgroup::kn`, `kernfs_node::id`.
    pub cgroup_kn: u32,
    pub kn_id: u32,
}
const _: () = assert!(size_of::<BlockOffsets>() == 80);

impl BlockOffsets {
    /// All zero: not ready.
    pub const ZERO: BlockOffsets = BlockOffsets {
        ready: 0,
        owner: 0,
        rq_q: 0,
        rq_cmd_flags: 0,
        rq_data_len: 0,
        rq_bio: 0,
        q_disk: 0,
        disk_major: 0,
        disk_first_minor: 0,
        bio_bdev: 0,
        bio_opf: 0,
        bio_size: 0,
        bio_io_vec: 0,
        bdev_disk: 0,
        bvec_page: 0,
        page_compound_head: 0,
        page_memcg_data: 0,
        memcg_cgroup: 0,
        cgroup_kn: 0,
        kn_id: 0,
    };
}

/// `REQ_OP_*` values (include/linux/blk_types.h, stable since 4.10) the programs map to a
/// direction: read; write; discard, secure erase and write-zeroes as discard; everything
/// else (flush, zone management, driver-private) as flush.
pub const REQ_OP_MASK: u32 = 0xff;
pub const REQ_OP_READ: u32 = 0;
pub const REQ_OP_WRITE: u32 = 1;
pub const REQ_OP_DISCARD: u32 = 3;
pub const REQ_OP_SECURE_ERASE: u32 = 5;
pub const REQ_OP_WRITE_ZEROES: u32 = 9;

/// The direction of a request or bio from its `cmd_flags` / `bi_opf`.
#[inline(always)]
pub fn block_direction(opf: u32) -> u32 {
    match opf & REQ_OP_MASK {
        REQ_OP_READ => BLOCK_DIR_READ,
        REQ_OP_WRITE => BLOCK_DIR_WRITE,
        REQ_OP_DISCARD | REQ_OP_SECURE_ERASE | REQ_OP_WRITE_ZEROES => BLOCK_DIR_DISCARD,
        _ => BLOCK_DIR_FLUSH,
    }
}

/// Block I/O direction: data read from the device.
pub const BLOCK_DIR_READ: u32 = 0;
/// Block I/O direction: data written to the device.
pub const BLOCK_DIR_WRITE: u32 = 1;
/// Block I/O direction: discard, secure erase or write-zeroes (no data moved by the host).
pub const BLOCK_DIR_DISCARD: u32 = 2;
/// Block I/O direction: a flush with no data.
pub const BLOCK_DIR_FLUSH: u32 = 3;

/// Value of the block I/O map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockIoValue {
    pub bytes: u64,
    pub ops: u64,
}
const _: () = assert!(size_of::<BlockIoValue>() == 16);

/// Bound of the map of live threads in the process tree `optimus measure` follows (exited
/// threads leave it at `sched_process_exit`).
pub const MAX_MEASURED_THREADS: u32 = 65_536;

/// Value of the measured-tree map: a thread of the measured command, charged.
pub const MEASURE_MEMBER: u32 = 1;
/// Value of the measured-tree map: the thread that spawns the command. Its children join
/// the tree; it is not charged itself.
pub const MEASURE_SEED: u32 = 2;

/// What the `optimus measure` switch program records about the thread on one CPU now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeasureSlice {
    /// Thread id now on this CPU (0: the idle task or unknown).
    pub tid: u32,
    /// `1` when that thread was in the measured tree when it was switched in.
    pub member: u32,
    /// Its `se.sum_exec_runtime` (the kernel's own on-CPU nanoseconds, what schedstat and
    /// getrusage report) when it was switched in.
    pub sum_exec_in: u64,
    /// `bpf_ktime_get_ns()` when it was switched in (members only): userspace adds the
    /// slice in progress at read time.
    pub since_ns: u64,
    /// When this CPU last left its idle task; 0 while it is idle (or not yet known).
    pub busy_since_ns: u64,
}
const _: () = assert!(size_of::<MeasureSlice>() == 32);

/// Per-CPU counters of the measured process tree since the programs were loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeasureCounters {
    /// On-CPU nanoseconds of the tree's threads on this CPU (closed slices).
    pub cpu_ns: u64,
    /// Nanoseconds this CPU ran anything but its idle task (closed busy stretches).
    pub busy_ns: u64,
    /// Bytes the tree's threads submitted to block devices, read and written.
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Threads that joined the tree.
    pub forks: u64,
    /// Threads that could not join it (map full) and are not counted.
    pub dropped: u64,
}
const _: () = assert!(size_of::<MeasureCounters>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of them are repr(C), Copy, hold only integers and have no implicit padding
    // (sizes pinned above), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::RunningSlice {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TracerStats {}
    // SAFETY: repr(C), two Pod structs, no padding (size pinned above).
    unsafe impl aya::Pod for super::CpuState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockIoKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockIoValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MeasureSlice {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MeasureCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_of_request_ops() {
        // REQ_PREFLUSH (bit 18) and REQ_SYNC (bit 11) on a write: still a write.
        assert_eq!(block_direction(1 | (1 << 18) | (1 << 11)), BLOCK_DIR_WRITE);
        assert_eq!(block_direction(0), BLOCK_DIR_READ);
        // Read-ahead flag (bit 19) on a read.
        assert_eq!(block_direction(1 << 19), BLOCK_DIR_READ);
        assert_eq!(block_direction(2), BLOCK_DIR_FLUSH);
        assert_eq!(block_direction(3), BLOCK_DIR_DISCARD);
        assert_eq!(block_direction(5), BLOCK_DIR_DISCARD);
        assert_eq!(block_direction(9), BLOCK_DIR_DISCARD);
        // Zone management and driver-private ops count as flush (no data, documented).
        assert_eq!(block_direction(10), BLOCK_DIR_FLUSH);
        assert_eq!(block_direction(34), BLOCK_DIR_FLUSH);
    }
}
