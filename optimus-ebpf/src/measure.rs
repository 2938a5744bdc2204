//! The programs of `optimus measure`: follow one command's process tree from fork to exit
//! and count its on-CPU time, the CPUs' busy time and its block I/O, per CPU.
//!
//! The tree lives in `MEASURE_TREE`: userspace enters the thread that spawns the command
//! as a seed, every thread a member or the seed forks joins as a member before it first
//! runs (`sched_process_fork` fires before the child is woken), and a member leaves at its
//! very last switch-out (`prev_state == TASK_DEAD`), not at `sched_process_exit`: the
//! address-space teardown after that tracepoint is CPU time getrusage charges to it.
//! No /proc scan, so a child that lives a millisecond is counted.
//! CPU time is the kernel's own `se.sum_exec_runtime` delta over each slice, the figure
//! schedstat and getrusage report (a `bpf_ktime_get_ns` slice would include steal time).

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use optimus_common::{
    block_direction, MeasureCounters, MeasureSlice, BLOCK_DIR_READ, BLOCK_DIR_WRITE,
    MAX_MEASURED_THREADS, MEASURE_MEMBER, MEASURE_SEED,
};

use crate::{
    block_offsets, current_ids, read, task_offset, unsafe_ktime, TASK_PID_OFFSET,
    TASK_SUM_EXEC_OFFSET,
};

/// Threads of the measured tree: `MEASURE_MEMBER` or `MEASURE_SEED`.
#[map]
static MEASURE_TREE: HashMap<u32, u32> = HashMap::with_max_entries(MAX_MEASURED_THREADS, 0);

/// Each member's `se.sum_exec_runtime` when it was last charged (0 from its fork): a slice
/// is charged as the runtime since, so a switch the tracepoint never showed (this host's
/// kernel switches some tasks without it) cannot lose the member's next slice.
#[map]
static MEASURE_LAST: HashMap<u32, u64> = HashMap::with_max_entries(MAX_MEASURED_THREADS, 0);

/// The thread on each CPU now (one slot per CPU).
#[map]
static MEASURE_RUNNING: PerCpuArray<MeasureSlice> = PerCpuArray::with_max_entries(1, 0);

/// The tree's counters (one slot per CPU).
#[map]
static MEASURE_COUNTERS: PerCpuArray<MeasureCounters> = PerCpuArray::with_max_entries(1, 0);

/// `TASK_DEAD` from include/linux/sched.h: the state of a task's final switch-out.
const TASK_DEAD: u64 = 0x80;

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn measure_switch(ctx: RawTracePointContext) -> i32 {
    try_measure_switch(&ctx);
    0
}

#[inline(always)]
fn try_measure_switch(ctx: &RawTracePointContext) {
    let (Some(counters), Some(slot)) = (
        MEASURE_COUNTERS.get_ptr_mut(0),
        MEASURE_RUNNING.get_ptr_mut(0),
    ) else {
        return;
    };
    // SAFETY: per-CPU slots of this CPU; the program cannot be preempted on its CPU while it
    // runs, so nobody else writes them now.
    let (counters, slot) = unsafe { (&mut *counters, &mut *slot) };
    // At sched_switch `current` is still the outgoing task.
    let (prev, _) = current_ids();
    let next_task: *const u8 = ctx.arg(2);
    let next = read::<i32>(next_task, task_offset(&TASK_PID_OFFSET))
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    let sum_exec_offset = task_offset(&TASK_SUM_EXEC_OFFSET);

    let prev_member = prev != 0 && MEASURE_TREE.get_ptr(&prev).is_some_and(is_member);
    if prev_member {
        // The scheduler updated prev's sum_exec_runtime (put_prev_task) before this
        // tracepoint.
        // SAFETY: bpf_get_current_task has no preconditions.
        let current = unsafe { bpf_get_current_task() } as *const u8;
        if let Some(now_sum) = read::<u64>(current, sum_exec_offset) {
            let since = match MEASURE_LAST.get_ptr_mut(&prev) {
                Some(last) => {
                    // SAFETY: a pointer the lookup just returned; only this thread's
                    // switches (never two at once) write its entry.
                    let last = unsafe { &mut *last };
                    let since = *last;
                    *last = now_sum;
                    Some(since)
                }
                // Full at its fork: the switch-in this CPU saw, if any.
                None => (slot.member != 0 && slot.tid == prev).then_some(slot.sum_exec_in),
            };
            if let Some(since) = since {
                counters.cpu_ns += now_sum.saturating_sub(since);
            }
        }
        let prev_state: u64 = ctx.arg(3);
        if prev_state & TASK_DEAD != 0 {
            // Its last slice is charged: it leaves the tree (absent already is fine).
            let _ = MEASURE_TREE.remove(&prev);
            let _ = MEASURE_LAST.remove(&prev);
        }
    }
    let next_member = next != 0 && MEASURE_TREE.get_ptr(&next).is_some_and(is_member);
    let busy_edge = (prev == 0) != (next == 0) || (next != 0 && slot.busy_since_ns == 0);
    slot.tid = next;
    slot.member = u32::from(next_member);
    if !(next_member || busy_edge) {
        return;
    }
    let now = unsafe_ktime();
    if busy_edge {
        busy_edge_at(next, now, &mut slot.busy_since_ns, &mut counters.busy_ns);
    }
    if next_member {
        slot.since_ns = now;
        slot.sum_exec_in = read::<u64>(next_task, sum_exec_offset).unwrap_or(0);
    }
}

#[inline(always)]
fn is_member(v: *const u32) -> bool {
    // SAFETY: a pointer the map lookup just returned, valid for this program run.
    unsafe { *v == MEASURE_MEMBER }
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, in the
/// parent's context (kernel_clone), before the child is first woken: a thread or process
/// forked by a member (or by the seed) joins the tree.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn measure_fork(ctx: RawTracePointContext) -> i32 {
    try_measure_fork(&ctx);
    0
}

#[inline(always)]
fn try_measure_fork(ctx: &RawTracePointContext) {
    let (parent, _) = current_ids();
    let Some(v) = MEASURE_TREE.get_ptr(&parent) else {
        return;
    };
    // SAFETY: a pointer the map lookup just returned, valid for this program run.
    let v = unsafe { *v };
    if v != MEASURE_MEMBER && v != MEASURE_SEED {
        return;
    }
    let child: *const u8 = ctx.arg(1);
    let Some(tid) =
        read::<i32>(child, task_offset(&TASK_PID_OFFSET)).and_then(|p| u32::try_from(p).ok())
    else {
        return;
    };
    let Some(counters) = MEASURE_COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nobody else writes it now.
    let counters = unsafe { &mut *counters };
    if MEASURE_TREE.insert(&tid, &MEASURE_MEMBER, 0).is_ok() {
        // A new task's runtime starts at 0 (sched_fork).
        let _ = MEASURE_LAST.insert(&tid, &0, 0);
        counters.forks += 1;
    } else {
        counters.dropped += 1;
    }
}

/// `block_io_start(struct request *rq)` (or `block_rq_issue`), in the submitter's context:
/// a request submitted by a member of the tree.
#[raw_tracepoint(tracepoint = "block_io_start")]
pub fn measure_block_rq(ctx: RawTracePointContext) -> i32 {
    let rq: *const u8 = ctx.arg(0);
    let o = block_offsets();
    if o.ready != 0 {
        if let (Some(opf), Some(bytes)) = (
            read::<u32>(rq, o.rq_cmd_flags),
            read::<u32>(rq, o.rq_data_len),
        ) {
            count_io(opf, bytes);
        }
    }
    0
}

/// `block_bio_backmerge` / `block_bio_frontmerge(struct bio *bio)`: a member's bio joined
/// a request already counted.
#[raw_tracepoint(tracepoint = "block_bio_backmerge")]
pub fn measure_bio_merge(ctx: RawTracePointContext) -> i32 {
    let bio: *const u8 = ctx.arg(0);
    let o = block_offsets();
    if o.ready != 0 {
        if let (Some(opf), Some(bytes)) =
            (read::<u32>(bio, o.bio_opf), read::<u32>(bio, o.bio_size))
        {
            count_io(opf, bytes);
        }
    }
    0
}

#[inline(always)]
fn count_io(opf: u32, bytes: u32) {
    let (tid, _) = current_ids();
    if !MEASURE_TREE.get_ptr(&tid).is_some_and(is_member) {
        return;
    }
    let Some(counters) = MEASURE_COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nobody else writes it now.
    let counters = unsafe { &mut *counters };
    match block_direction(opf) {
        BLOCK_DIR_READ => counters.read_bytes += u64::from(bytes),
        BLOCK_DIR_WRITE => counters.write_bytes += u64::from(bytes),
        _ => {}
    }
}

/// At a busy/idle edge of this CPU (`next == 0`: it goes idle), closes the busy stretch
/// into `busy_ns` or opens one.
#[inline(always)]
fn busy_edge_at(next: u32, now: u64, busy_since_ns: &mut u64, busy_ns: &mut u64) {
    if next == 0 {
        if *busy_since_ns != 0 {
            *busy_ns += now.saturating_sub(*busy_since_ns);
        }
        *busy_since_ns = 0;
    } else if *busy_since_ns == 0 {
        *busy_since_ns = now;
    }
}
