//! Block I/O ledger: folds the kernel's per-(process, device, direction, owner) counters
//! into per-VM and per-device totals that never go backwards, and lets the tracer drop the
//! entries of processes that have exited.
//!
//! Attribution rule (README "Block I/O"):
//! - I/O submitted by any thread of a VM's QEMU process counts to that VM (with
//!   `cache=none` QEMU's worker threads submit the guest's I/O themselves).
//! - I/O submitted by kernel threads (buffered writeback from kworker, jbd2; the eBPF
//!   program marks them with `PF_KTHREAD` at submission) counts to the VM whose memory
//!   cgroup owns the pages (the eBPF program reads the owner of the bio's first page and
//!   keeps it when it is one of the VMs' cgroups userspace listed); otherwise it is
//!   node-level *unattributed*.
//! - Everything else is other host processes, including processes that have exited.
//!
//! So per device and direction: VMs + other processes + unattributed = node total, exactly.

use std::collections::{BTreeMap, HashMap};

use optimus_common::{
    BlockIoKey, BlockIoValue, BLOCK_DIR_DISCARD, BLOCK_DIR_FLUSH, BLOCK_DIR_READ, BLOCK_DIR_WRITE,
};

use crate::discovery::VmId;

/// `direction` label of a `BLOCK_DIR_*` value.
pub fn direction_label(d: u32) -> &'static str {
    match d {
        BLOCK_DIR_READ => "read",
        BLOCK_DIR_WRITE => "write",
        BLOCK_DIR_DISCARD => "discard",
        BLOCK_DIR_FLUSH => "flush",
        _ => "other",
    }
}

/// Who submitted an I/O, as far as the sampler can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitter {
    Vm(VmId),
    /// A kernel thread (writeback, journal): no process to charge.
    Unattributed,
    /// Any other host process.
    Process,
}

/// Bytes and operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Io {
    pub bytes: u64,
    pub ops: u64,
}

impl Io {
    fn add(&mut self, d: Io) {
        self.bytes += d.bytes;
        self.ops += d.ops;
    }
}

/// Totals for one device and direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceIo {
    pub total: Io,
    /// Charged to VMs (read and write also appear per VM; discard and flush only here).
    pub vms: Io,
    /// The part of `vms` that kernel threads submitted for pages a VM's cgroup owns.
    pub vm_writeback: Io,
    pub unattributed: Io,
    pub processes: Io,
}

/// Device and direction, e.g. (`vda`, `BLOCK_DIR_WRITE`).
pub type DeviceKey = (String, u32);

/// Cumulative block I/O since the agent started.
#[derive(Debug, Default)]
pub struct BlockIoLedger {
    /// Last value read per kernel key (to turn cumulative kernel counts into deltas).
    last: HashMap<BlockIoKey, BlockIoValue>,
    vms: HashMap<VmId, [Io; 2]>,
    devices: BTreeMap<DeviceKey, DeviceIo>,
}

impl BlockIoLedger {
    /// Folds in one read. `classify` says who a user-space tgid is (and whether it still
    /// exists); `owner` names the VM owning a memory cgroup, for kernel-thread entries
    /// (unattributed when it names none). `device` names a kernel device number. Returns
    /// the keys the tracer can forget: their counts are in the ledger for good.
    pub fn update(
        &mut self,
        entries: &[(BlockIoKey, BlockIoValue)],
        mut classify: impl FnMut(u32) -> (Submitter, bool),
        mut owner: impl FnMut(u64) -> Option<VmId>,
        mut device: impl FnMut(u32) -> String,
    ) -> Vec<BlockIoKey> {
        let mut forget = Vec::new();
        let mut verdicts: HashMap<u32, (Submitter, bool)> = HashMap::new();
        for (key, value) in entries {
            let prev = self.last.get(key).copied().unwrap_or_default();
            // A kernel counter only grows while its entry exists; a smaller value means the
            // entry was dropped and re-created, so the whole value is new.
            let delta = if value.bytes >= prev.bytes && value.ops >= prev.ops {
                Io {
                    bytes: value.bytes - prev.bytes,
                    ops: value.ops - prev.ops,
                }
            } else {
                Io {
                    bytes: value.bytes,
                    ops: value.ops,
                }
            };
            self.last.insert(*key, *value);
            let (who, alive) = verdicts
                .entry(key.tgid)
                .or_insert_with(|| classify(key.tgid))
                .clone();
            // Only a gone submitter's entry is dropped: one still alive may count more
            // between this read and a delete, which would be lost.
            let mut alive = alive;
            let mut writeback = false;
            let who = if key.kthread != 0 {
                match (key.owner_cgroup_id, owner(key.owner_cgroup_id)) {
                    (0, _) => Submitter::Unattributed,
                    (_, Some(vm)) => {
                        writeback = true;
                        Submitter::Vm(vm)
                    }
                    // The owner's VM is gone (its cgroup no longer listed to the kernel,
                    // so this entry cannot grow): fold it as unattributed and, once it
                    // is quiet, forget it, or kernel threads x dead VMs fill the map.
                    (_, None) => {
                        alive = alive && delta != Io::default();
                        Submitter::Unattributed
                    }
                }
            } else {
                who
            };
            let dev = self
                .devices
                .entry((device(key.dev), key.direction))
                .or_default();
            dev.total.add(delta);
            match &who {
                Submitter::Vm(id) => {
                    dev.vms.add(delta);
                    if writeback {
                        dev.vm_writeback.add(delta);
                    }
                    if let Some(slot) = rw_index(key.direction) {
                        self.vms.entry(id.clone()).or_default()[slot].add(delta);
                    }
                }
                Submitter::Unattributed => dev.unattributed.add(delta),
                Submitter::Process => dev.processes.add(delta),
            }
            if !alive {
                forget.push(*key);
            }
        }
        for key in &forget {
            self.last.remove(key);
        }
        forget
    }

    /// Read and write totals of a VM, `[read, write]`.
    pub fn vm(&self, id: &VmId) -> [Io; 2] {
        self.vms.get(id).copied().unwrap_or_default()
    }

    /// Drops VMs that are gone (their series are retired with them).
    pub fn retain_vms(&mut self, live: impl Fn(&VmId) -> bool) {
        self.vms.retain(|id, _| live(id));
    }

    /// Totals per device and direction.
    pub fn devices(&self) -> &BTreeMap<DeviceKey, DeviceIo> {
        &self.devices
    }
}

fn rw_index(direction: u32) -> Option<usize> {
    match direction {
        BLOCK_DIR_READ => Some(0),
        BLOCK_DIR_WRITE => Some(1),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(tgid: u32, dir: u32) -> BlockIoKey {
        BlockIoKey {
            tgid,
            dev: 253 << 20,
            direction: dir,
            kthread: u32::from(tgid == 7),
            owner_cgroup_id: 0,
        }
    }

    fn no_owner(_: u64) -> Option<VmId> {
        None
    }

    /// A kernel thread's entry for pages owned by memory cgroup `owner`.
    fn writeback(owner: u64) -> BlockIoKey {
        BlockIoKey {
            owner_cgroup_id: owner,
            ..key(7, BLOCK_DIR_WRITE)
        }
    }

    fn val(bytes: u64, ops: u64) -> BlockIoValue {
        BlockIoValue { bytes, ops }
    }

    fn vm_id() -> VmId {
        VmId {
            name: "g".into(),
            uuid: "u".into(),
        }
    }

    fn classify(tgid: u32) -> (Submitter, bool) {
        match tgid {
            100 => (Submitter::Vm(vm_id()), true),
            7 => (Submitter::Unattributed, true),
            200 => (Submitter::Process, true),
            _ => (Submitter::Process, false),
        }
    }

    #[test]
    fn conservation_per_device_and_direction() {
        let mut l = BlockIoLedger::default();
        let dev = |_| "vda".to_owned();
        l.update(
            &[
                (key(100, BLOCK_DIR_WRITE), val(4096, 1)),
                (key(7, BLOCK_DIR_WRITE), val(8192, 2)),
                (key(200, BLOCK_DIR_WRITE), val(512, 1)),
                (key(100, BLOCK_DIR_READ), val(1 << 20, 8)),
            ],
            classify,
            no_owner,
            dev,
        );
        l.update(
            &[
                (key(100, BLOCK_DIR_WRITE), val(4096 * 3, 3)),
                (key(7, BLOCK_DIR_WRITE), val(8192, 2)),
                (key(200, BLOCK_DIR_WRITE), val(1024, 2)),
                (key(100, BLOCK_DIR_READ), val(1 << 20, 8)),
            ],
            classify,
            no_owner,
            dev,
        );
        let [r, w] = l.vm(&vm_id());
        assert_eq!(
            r,
            Io {
                bytes: 1 << 20,
                ops: 8
            }
        );
        assert_eq!(
            w,
            Io {
                bytes: 12288,
                ops: 3
            }
        );
        let d = l.devices()[&("vda".to_owned(), BLOCK_DIR_WRITE)];
        assert_eq!(d.total.bytes, 12288 + 8192 + 1024);
        assert_eq!(d.unattributed.bytes, 8192);
        assert_eq!(d.processes.bytes, 1024);
        assert_eq!(d.vms.bytes, w.bytes);
        assert_eq!(
            w.bytes + d.unattributed.bytes + d.processes.bytes,
            d.total.bytes
        );
    }

    #[test]
    fn exited_submitter_is_folded_then_forgotten_and_never_lost() {
        let mut l = BlockIoLedger::default();
        let dev = |_| "vda".to_owned();
        let forget = l.update(
            &[(key(555, BLOCK_DIR_WRITE), val(1000, 1))],
            classify,
            no_owner,
            dev,
        );
        assert_eq!(forget, vec![key(555, BLOCK_DIR_WRITE)]);
        // The tracer dropped the entry; the same key counting again starts from zero.
        l.update(
            &[(key(555, BLOCK_DIR_WRITE), val(10, 1))],
            classify,
            no_owner,
            dev,
        );
        let d = l.devices()[&("vda".to_owned(), BLOCK_DIR_WRITE)];
        assert_eq!(d.total.bytes, 1010);
        assert_eq!(d.processes.bytes, 1010);
    }

    #[test]
    fn discard_and_flush_stay_node_level() {
        let mut l = BlockIoLedger::default();
        l.update(
            &[
                (key(100, BLOCK_DIR_DISCARD), val(1 << 20, 1)),
                (key(100, BLOCK_DIR_FLUSH), val(0, 4)),
            ],
            classify,
            no_owner,
            |_| "vda".to_owned(),
        );
        assert_eq!(l.vm(&vm_id()), [Io::default(); 2]);
        let flush = l.devices()[&("vda".to_owned(), BLOCK_DIR_FLUSH)];
        assert_eq!(flush.total.ops, 4);
        assert_eq!(flush.vms.ops, 4);
        assert_eq!(direction_label(BLOCK_DIR_DISCARD), "discard");
    }

    #[test]
    fn kernel_writeback_of_a_vms_pages_counts_to_the_vm() {
        let mut l = BlockIoLedger::default();
        let owner = |id: u64| (id == 42).then(vm_id);
        let dev = |_| "vda".to_owned();
        l.update(
            &[
                (writeback(42), val(32 << 20, 40)),
                (writeback(0), val(4096, 1)),
                (key(100, BLOCK_DIR_WRITE), val(8192, 2)),
            ],
            classify,
            owner,
            dev,
        );
        let [_, w] = l.vm(&vm_id());
        assert_eq!(w.bytes, (32 << 20) + 8192);
        assert_eq!(w.ops, 42);
        let d = l.devices()[&("vda".to_owned(), BLOCK_DIR_WRITE)];
        assert_eq!(d.vm_writeback.bytes, 32 << 20);
        assert_eq!(d.vms.bytes, w.bytes);
        assert_eq!(d.unattributed.bytes, 4096);
        assert_eq!(
            d.vms.bytes + d.unattributed.bytes + d.processes.bytes,
            d.total.bytes
        );
    }

    #[test]
    fn writeback_of_a_gone_vm_is_unattributed_then_forgotten_once_quiet() {
        let mut l = BlockIoLedger::default();
        let dev = |_| "vda".to_owned();
        let forget = l.update(
            &[(writeback(42), val(4096, 1))],
            classify,
            |_| Some(vm_id()),
            dev,
        );
        assert!(forget.is_empty());
        // The VM is gone: what its pages still got written counts, as unattributed.
        let forget = l.update(&[(writeback(42), val(8192, 2))], classify, no_owner, dev);
        assert!(forget.is_empty(), "still moving: keep it");
        let forget = l.update(&[(writeback(42), val(8192, 2))], classify, no_owner, dev);
        assert_eq!(forget, vec![writeback(42)]);
        let d = l.devices()[&("vda".to_owned(), BLOCK_DIR_WRITE)];
        assert_eq!(d.total.bytes, 8192);
        assert_eq!(d.vm_writeback.bytes, 4096);
        assert_eq!(d.unattributed.bytes, 4096);
    }
}
