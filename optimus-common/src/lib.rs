//! Types that cross the kernel/user boundary, one definition for both sides.
//!
//! Every type is `#[repr(C)]`, padded by hand and pinned in size, because the eBPF programs
//! and the agent must agree on the byte layout of every map key and value.
#![no_std]

use core::mem::size_of;

/// Bound of the map of tracked threads (and of the per-thread CPU time map). A host with
/// 1,000 VMs of 8 vCPUs and a dozen helper threads each stays well inside it.
pub const MAX_TRACKED_THREADS: u32 = 65_536;

/// Bound of the per-thread CPU time map in track-everything mode, where it is an LRU map:
/// the agent retires exited threads every interval, so eviction only happens on a host
/// with more live threads than this.
pub const MAX_THREADS_ALL: u32 = 65_536;

/// Value of the tracked-threads map: which thread is charged. Userspace writes
/// `TRACKED_YES`; the key is the thread id (the kernel's `pid`).
pub const TRACKED_YES: u32 = 1;

/// What the program records about the thread that runs on one CPU right now, so that
/// userspace can add the slice in progress at read time (a vCPU spinning for 10 s must show
/// 10 s, not 0 until it is preempted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunningSlice {
    /// Thread id now on this CPU (0: the idle task or unknown).
    pub tid: u32,
    /// `1` when that thread was tracked when it was switched in.
    pub tracked: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it was switched in; only kept for a
    /// tracked thread (the clock is not read for switches between untracked threads).
    pub since_ns: u64,
    /// When this CPU last left its idle task; 0 while it is idle (or not yet known).
    pub busy_since_ns: u64,
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
    /// Reads of `next->pid` that failed.
    pub read_errors: u64,
    /// Nanoseconds this CPU ran any task but its idle task, counted at each busy → idle
    /// edge (the busy stretch in progress is added by userspace at read time).
    /// Attribution's active/idle split rests on it.
    pub busy_ns: u64,
}
const _: () = assert!(size_of::<TracerStats>() == 40);

/// Key of the block I/O map: who submitted how much to which device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockIoKey {
    /// Thread group id (process id) of the submitting task; 0 for kernel context.
    pub tgid: u32,
    /// Device number as the kernel encodes it in tracepoints (`major << 20 | minor`).
    pub dev: u32,
    /// cgroup id (`bpf_get_current_cgroup_id`) of the submitting task.
    pub cgroup_id: u64,
    /// One of the `BLOCK_DIR_*` values.
    pub direction: u32,
    /// `1` when the submitter is a kernel thread (`PF_KTHREAD`): writeback, journal.
    pub kthread: u32,
}
const _: () = assert!(size_of::<BlockIoKey>() == 24);

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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are repr(C), Copy, hold only integers and have no implicit padding
    // (sizes pinned above), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::RunningSlice {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TracerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockIoKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockIoValue {}
}
