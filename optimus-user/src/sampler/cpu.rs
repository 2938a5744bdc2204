//! Per-VM CPU time ledger: turns raw per-thread kernel readings into VM counters that never
//! go backwards, across thread exits, and forgets VMs that are gone.
//!
//! Pure arithmetic: no I/O, no clock. The sampler feeds it discovery results and tracer
//! readings; it answers which thread counters the kernel may now drop.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::discovery::{ThreadKind, Vm, VmId};
use crate::tracer::CpuReading;

/// Index of a thread kind in per-kind arrays, in `KINDS` order.
pub fn kind_index(kind: ThreadKind) -> usize {
    match kind {
        ThreadKind::Vcpu(_) => 0,
        ThreadKind::Emulator => 1,
        ThreadKind::IoThread => 2,
        ThreadKind::Vhost => 3,
        ThreadKind::Unclassified => 4,
    }
}

/// `thread_kind` label values, indexed by [`kind_index`]. A VM has either `vcpu` time or
/// `unclassified` time (its vCPU threads could not be told apart), never both.
pub const KINDS: [&str; 5] = ["vcpu", "emulator", "iothread", "vhost", "unclassified"];

#[derive(Clone, Debug)]
struct ThreadLedger {
    kind: ThreadKind,
    /// Highest per-CPU nanoseconds seen (the read includes a running slice that a later
    /// read can see slightly lower; the clamp keeps every counter monotonic).
    per_cpu: Vec<u64>,
    /// The part of `per_cpu` already charged under an earlier kind: a thread first seen
    /// before QEMU named it (`qemu-system-x86`, so emulator) is reclassified when its name
    /// changes, and only its time since then counts under the new kind.
    base: Vec<u64>,
}

impl ThreadLedger {
    /// Per-CPU nanoseconds charged under the current kind (no copy for a thread never
    /// renamed, which is every thread once QEMU has named it: this runs per thread per
    /// sample).
    fn charged(&self) -> Cow<'_, [u64]> {
        if self.base.is_empty() {
            return Cow::Borrowed(&self.per_cpu);
        }
        self.per_cpu
            .iter()
            .enumerate()
            .map(|(cpu, ns)| ns.saturating_sub(self.base.get(cpu).copied().unwrap_or(0)))
            .collect()
    }
}

/// One VM's CPU time.
#[derive(Clone, Debug, Default)]
struct VmLedger {
    threads: HashMap<u32, ThreadLedger>,
    /// Final counts of exited threads, by kind.
    retired_by_kind: [u64; 5],
    /// Final counts of exited vCPU threads, by vCPU index.
    retired_vcpu: BTreeMap<u32, u64>,
    /// Final counts of exited threads, by CPU.
    retired_per_cpu: Vec<u64>,
}

/// CPU time of one VM, as exported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmCpu {
    /// Nanoseconds by thread kind, indexed by [`kind_index`].
    pub by_kind_ns: [u64; 5],
    /// Nanoseconds per vCPU index.
    pub vcpu_ns: BTreeMap<u32, u64>,
    /// Nanoseconds per host CPU (all threads), for socket-aware attribution.
    pub per_cpu_ns: Vec<u64>,
}

/// CPU time ledgers of every VM seen in the last scan.
#[derive(Debug, Default)]
pub struct CpuLedger {
    vms: HashMap<VmId, VmLedger>,
}

/// Combines `src` into `dst` element by element (growing `dst` as needed): per-CPU vectors
/// are added when threads are summed and clamped (`max`) when a reading is folded in.
pub(crate) fn merge_into(dst: &mut Vec<u64>, src: &[u64], op: fn(u64, u64) -> u64) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = op(*d, *s);
    }
}

fn add_into(dst: &mut Vec<u64>, src: &[u64]) {
    merge_into(dst, src, |a, b| a + b);
}

fn clamp_into(dst: &mut Vec<u64>, src: &[u64]) {
    merge_into(dst, src, u64::max);
}

/// The processes whose threads the tracer charges: each VM's QEMU process, and each vhost
/// kernel worker (a process of its own before Linux 6.4; later a QEMU thread, whose id then
/// names no process and costs nothing).
pub fn tracked_processes(vms: &[Vm]) -> HashSet<u32> {
    vms.iter()
        .flat_map(|vm| {
            let vhost = vm.threads.iter().filter(|t| t.kind == ThreadKind::Vhost);
            std::iter::once(vm.pid).chain(vhost.map(|t| t.tid))
        })
        .collect()
}

/// Merges VMs that share an identity (a QEMU migrating into this same host briefly runs
/// twice under one UUID): one ledger entry, the threads of both processes.
pub fn merge_same_id(mut vms: Vec<Vm>) -> Vec<Vm> {
    vms.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out: Vec<Vm> = Vec::with_capacity(vms.len());
    for vm in vms {
        match out.last_mut() {
            Some(last) if last.id == vm.id => last.threads.extend(vm.threads),
            _ => out.push(vm),
        }
    }
    out
}

impl CpuLedger {
    /// Folds in one interval: `vms` from discovery, `reading` from the tracer taken after
    /// the scan. Returns the thread ids whose kernel counters are now in the ledger for good
    /// (exited threads, threads of vanished VMs), which the tracer may forget.
    pub fn update(&mut self, vms: &[Vm], reading: &CpuReading) -> Vec<u32> {
        let mut forget = Vec::new();
        let live: HashSet<&VmId> = vms.iter().map(|vm| &vm.id).collect();
        self.vms.retain(|id, ledger| {
            let keep = live.contains(id);
            if !keep {
                forget.extend(ledger.threads.keys().copied());
            }
            keep
        });
        for vm in vms {
            let ledger = self.vms.entry(vm.id.clone()).or_default();
            let present: HashSet<u32> = vm.threads.iter().map(|t| t.tid).collect();
            let exited: Vec<u32> = ledger
                .threads
                .keys()
                .filter(|tid| !present.contains(tid))
                .copied()
                .collect();
            for tid in exited {
                let Some(mut t) = ledger.threads.remove(&tid) else {
                    continue;
                };
                // The last read, taken after the thread vanished from /proc, holds its
                // final count; fold it in before the kernel entry is dropped.
                if let Some(v) = reading.threads.get(&tid) {
                    clamp_into(&mut t.per_cpu, v);
                }
                retire(ledger, &t);
                forget.push(tid);
            }
            for thread in &vm.threads {
                let t = ledger
                    .threads
                    .entry(thread.tid)
                    .or_insert_with(|| ThreadLedger {
                        kind: thread.kind,
                        per_cpu: Vec::new(),
                        base: Vec::new(),
                    });
                // Renamed: what it ran so far stays with the old kind (counters never go
                // backwards), what it runs from now on goes to the new one.
                let renamed = (t.kind != thread.kind).then(|| {
                    let old = t.clone();
                    t.base.clone_from(&t.per_cpu);
                    t.kind = thread.kind;
                    old
                });
                if let Some(v) = reading.threads.get(&thread.tid) {
                    clamp_into(&mut t.per_cpu, v);
                }
                if let Some(old) = renamed {
                    retire(ledger, &old);
                }
            }
        }
        forget
    }

    /// CPU time of a VM, or `None` if it was not in the last scan.
    pub fn vm(&self, id: &VmId) -> Option<VmCpu> {
        let ledger = self.vms.get(id)?;
        let mut out = VmCpu {
            by_kind_ns: ledger.retired_by_kind,
            vcpu_ns: ledger.retired_vcpu.clone(),
            per_cpu_ns: ledger.retired_per_cpu.clone(),
        };
        for t in ledger.threads.values() {
            let charged = t.charged();
            let total: u64 = charged.iter().sum();
            out.by_kind_ns[kind_index(t.kind)] += total;
            if let ThreadKind::Vcpu(n) = t.kind {
                *out.vcpu_ns.entry(n).or_default() += total;
            }
            add_into(&mut out.per_cpu_ns, &charged);
        }
        Some(out)
    }
}

/// Moves a thread's count (under its current kind) into the VM's retired totals.
fn retire(ledger: &mut VmLedger, t: &ThreadLedger) {
    let charged = t.charged();
    let total: u64 = charged.iter().sum();
    ledger.retired_by_kind[kind_index(t.kind)] += total;
    if let ThreadKind::Vcpu(n) = t.kind {
        *ledger.retired_vcpu.entry(n).or_default() += total;
    }
    add_into(&mut ledger.retired_per_cpu, &charged);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::discovery::{VmSource, VmThread};

    fn vm(name: &str, threads: &[(u32, ThreadKind)]) -> Vm {
        Vm {
            id: VmId {
                name: name.into(),
                uuid: format!("uuid-{name}"),
            },
            source: VmSource::Proc,
            pid: threads[0].0,
            memory_bytes: None,
            namespace: None,
            mdev_uuids: Vec::new(),
            threads: threads
                .iter()
                .map(|&(tid, kind)| VmThread { tid, kind })
                .collect(),
        }
    }

    fn reading(v: &[(u32, &[u64])]) -> CpuReading {
        CpuReading {
            at_ns: 0,
            busy_ns: Vec::new(),
            threads: v.iter().map(|(t, ns)| (*t, ns.to_vec())).collect(),
        }
    }

    #[test]
    fn sums_threads_by_kind_and_vcpu() {
        let mut l = CpuLedger::default();
        let a = vm(
            "a",
            &[
                (10, ThreadKind::Emulator),
                (11, ThreadKind::Vcpu(0)),
                (12, ThreadKind::Vcpu(1)),
                (13, ThreadKind::Vhost),
            ],
        );
        let forget = l.update(
            std::slice::from_ref(&a),
            &reading(&[
                (10, &[5, 0]),
                (11, &[100, 50]),
                (12, &[0, 7]),
                (13, &[1, 1]),
            ]),
        );
        assert!(forget.is_empty());
        let cpu = l.vm(&a.id).unwrap();
        assert_eq!(cpu.by_kind_ns, [157, 5, 0, 2, 0]);
        assert_eq!(cpu.vcpu_ns, BTreeMap::from([(0, 150), (1, 7)]));
        assert_eq!(cpu.per_cpu_ns, vec![106, 58]);
    }

    #[test]
    fn exited_thread_keeps_its_final_count() {
        let mut l = CpuLedger::default();
        let full = vm(
            "a",
            &[(10, ThreadKind::Emulator), (11, ThreadKind::IoThread)],
        );
        l.update(
            std::slice::from_ref(&full),
            &reading(&[(10, &[5]), (11, &[20])]),
        );
        // 11 exits after running 30 ns in total; the read after the scan still sees it.
        let less = vm("a", &[(10, ThreadKind::Emulator)]);
        let forget = l.update(
            std::slice::from_ref(&less),
            &reading(&[(10, &[6]), (11, &[30])]),
        );
        assert_eq!(forget, vec![11]);
        assert_eq!(l.vm(&less.id).unwrap().by_kind_ns, [0, 6, 30, 0, 0]);
        // Next interval the kernel entry is gone; the VM total does not drop.
        l.update(std::slice::from_ref(&less), &reading(&[(10, &[7])]));
        assert_eq!(l.vm(&less.id).unwrap().by_kind_ns, [0, 7, 30, 0, 0]);
    }

    #[test]
    fn counters_never_go_backwards() {
        let mut l = CpuLedger::default();
        let a = vm("a", &[(10, ThreadKind::Vcpu(0))]);
        l.update(std::slice::from_ref(&a), &reading(&[(10, &[100])]));
        // A read that saw the running slice end a little earlier than the previous clock.
        l.update(std::slice::from_ref(&a), &reading(&[(10, &[98])]));
        assert_eq!(l.vm(&a.id).unwrap().vcpu_ns[&0], 100);
        l.update(std::slice::from_ref(&a), &reading(&[]));
        assert_eq!(l.vm(&a.id).unwrap().vcpu_ns[&0], 100);
    }

    #[test]
    fn a_renamed_thread_moves_to_its_new_kind_from_then_on() {
        let mut l = CpuLedger::default();
        // Seen before QEMU named it: the process name, so emulator.
        let before = vm(
            "a",
            &[(10, ThreadKind::Emulator), (11, ThreadKind::Emulator)],
        );
        l.update(
            std::slice::from_ref(&before),
            &reading(&[(10, &[1, 0]), (11, &[3, 2])]),
        );
        let after = vm(
            "a",
            &[(10, ThreadKind::Emulator), (11, ThreadKind::Vcpu(1))],
        );
        l.update(
            std::slice::from_ref(&after),
            &reading(&[(10, &[1, 0]), (11, &[10, 4])]),
        );
        let cpu = l.vm(&after.id).unwrap();
        // 5 ns stay emulator time (it never goes backwards); the 9 ns since count as vCPU 1.
        assert_eq!(cpu.by_kind_ns, [9, 6, 0, 0, 0]);
        assert_eq!(cpu.vcpu_ns, BTreeMap::from([(1, 9)]));
        assert_eq!(cpu.per_cpu_ns, vec![11, 4]);
        l.update(
            std::slice::from_ref(&after),
            &reading(&[(10, &[1, 0]), (11, &[20, 4])]),
        );
        assert_eq!(l.vm(&after.id).unwrap().vcpu_ns, BTreeMap::from([(1, 19)]));
        // It exits: its final count is kept under its last kind.
        let gone = vm("a", &[(10, ThreadKind::Emulator)]);
        let forget = l.update(
            std::slice::from_ref(&gone),
            &reading(&[(10, &[1, 0]), (11, &[21, 4])]),
        );
        assert_eq!(forget, vec![11]);
        let cpu = l.vm(&gone.id).unwrap();
        assert_eq!(cpu.by_kind_ns, [20, 6, 0, 0, 0]);
        assert_eq!(cpu.per_cpu_ns, vec![22, 4]);
    }

    #[test]
    fn same_id_twice_is_one_vm() {
        let mut l = CpuLedger::default();
        let a = vm("a", &[(10, ThreadKind::Emulator)]);
        let a2 = vm("a", &[(20, ThreadKind::Emulator)]);
        let merged = merge_same_id(vec![a.clone(), a2]);
        assert_eq!(merged.len(), 1);
        for _ in 0..3 {
            let forget = l.update(&merged, &reading(&[(10, &[1]), (20, &[2])]));
            assert!(forget.is_empty());
        }
        assert_eq!(l.vm(&a.id).unwrap().by_kind_ns, [0, 3, 0, 0, 0]);
    }

    #[test]
    fn vanished_vm_is_dropped_and_its_threads_forgotten() {
        let mut l = CpuLedger::default();
        let a = vm("a", &[(10, ThreadKind::Emulator)]);
        let b = vm(
            "b",
            &[(20, ThreadKind::Emulator), (21, ThreadKind::Vcpu(0))],
        );
        l.update(&[a.clone(), b.clone()], &reading(&[(10, &[1]), (20, &[2])]));
        let mut forget = l.update(std::slice::from_ref(&a), &reading(&[(10, &[1])]));
        forget.sort_unstable();
        assert_eq!(forget, vec![20, 21]);
        assert!(l.vm(&b.id).is_none());
        assert!(l.vm(&a.id).is_some());
    }
}
