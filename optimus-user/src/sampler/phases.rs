//! VM phases on the agent: `optimus phase` requests in (from the control socket), per-VM
//! [`PhaseLedger`]s out. Each sample feeds every VM that has phases with its cumulative CPU
//! time, block I/O and attributed energy; a request is answered right after a sample taken
//! for it, so a boundary lands at the instant it was asked for.

use std::collections::BTreeMap;

use crate::control::Reply;
use crate::discovery::VmId;
use crate::energy::round_to_u64;
use crate::phase::{format_mark, Mark, PhaseLedger, Switched, Usage, VM_HISTORY};

use super::energy::EnergySnapshot;
use super::VmSnapshot;

/// Per-VM phase ledgers (only VMs that were ever given a phase).
#[derive(Debug, Default)]
pub struct VmPhases {
    ledgers: BTreeMap<VmId, PhaseLedger>,
    /// Cumulative usage of every VM at the last sample (what a new ledger starts from).
    last: BTreeMap<VmId, Usage>,
    /// When each VM was first sampled: where its first `(none)` starts.
    first_seen: BTreeMap<VmId, u64>,
    at_ns: u64,
}

/// A VM's cumulative usage from a sample.
fn usage(vm: &VmSnapshot, cpu_ns: u64, energy: Option<&EnergySnapshot>) -> Usage {
    let energy_uj = energy
        .and_then(|e| e.vms.get(&vm.id))
        .map(|z| {
            z.iter()
                .map(|(k, (j, _))| (*k, round_to_u64(j * 1e6)))
                .collect()
        })
        .unwrap_or_default();
    Usage {
        cpu_ns,
        read_bytes: vm.block_io[0].bytes,
        write_bytes: vm.block_io[1].bytes,
        energy_uj,
        carbon_ng: 0,
    }
}

impl VmPhases {
    /// Folds in one sample taken at `at_ns`: `vms` with each one's total on-CPU ns.
    /// Ledgers of VMs that are gone are dropped.
    pub fn observe(
        &mut self,
        at_ns: u64,
        vms: &[(&VmSnapshot, u64)],
        energy: Option<&EnergySnapshot>,
    ) {
        self.at_ns = at_ns;
        self.last = vms
            .iter()
            .map(|(vm, cpu_ns)| (vm.id.clone(), usage(vm, *cpu_ns, energy)))
            .collect();
        self.ledgers.retain(|id, _| self.last.contains_key(id));
        self.first_seen.retain(|id, _| self.last.contains_key(id));
        for id in self.last.keys() {
            self.first_seen.entry(id.clone()).or_insert(at_ns);
        }
        for (id, ledger) in &mut self.ledgers {
            if let Some(u) = self.last.get(id) {
                ledger.observe(at_ns, u);
            }
        }
    }

    /// Switches the phase of the VM named or identified by `vm`, at the last sample.
    pub fn switch(&mut self, vm: &str, mark: Mark) -> Reply {
        let matches: Vec<&VmId> = self
            .last
            .keys()
            .filter(|id| id.uuid.eq_ignore_ascii_case(vm) || id.name == vm)
            .collect();
        let id = match matches.as_slice() {
            [id] => (*id).clone(),
            [] => {
                let known: Vec<String> = self
                    .last
                    .keys()
                    .take(5)
                    .map(|id| format!("{:?} ({})", id.name, id.uuid))
                    .collect();
                let known = if known.is_empty() {
                    "none is running".to_owned()
                } else {
                    format!("running: {}", known.join(", "))
                };
                return Reply::error(format!("unknown VM {vm:?} ({known})"));
            }
            many => {
                return Reply::error(format!(
                    "{} VMs are named {vm:?}: give the UUID",
                    many.len()
                ))
            }
        };
        let at_ns = self.at_ns;
        let start = self.last.get(&id).cloned().unwrap_or_default();
        let since = self.first_seen.get(&id).copied().unwrap_or(at_ns);
        let ledger = self.ledgers.entry(id.clone()).or_insert_with(|| {
            // Everything the VM used since the agent first saw it, before its first phase,
            // is `(none)`: its phases then add up to its totals.
            let mut l = PhaseLedger::new(since, Usage::default(), VM_HISTORY);
            l.observe(at_ns, &start);
            l
        });
        let wanted = format_mark(&mark);
        if ledger.switch(at_ns, mark) == Switched::Overflow {
            log::warn!(
                "VM {:?}: more than {} phase names; further new names count as `{}`",
                id.name,
                crate::phase::MAX_NAMES,
                crate::phase::OTHER
            );
        }
        let now = &ledger.current().name;
        Reply {
            ok: true,
            phase: Some(if now == crate::phase::NONE || wanted == "-" {
                now.clone()
            } else {
                format_mark(&Mark::Start {
                    name: now.clone(),
                    labels: ledger.current().labels.clone(),
                })
            }),
            vm_name: Some(id.name),
            vm_uuid: Some(id.uuid),
            error: None,
        }
    }

    /// The ledgers, for the snapshot.
    pub fn ledgers(&self) -> &BTreeMap<VmId, PhaseLedger> {
        &self.ledgers
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::discovery::VmSource;
    use crate::energy::Zone;
    use crate::phase::parse_line;

    fn vm(name: &str) -> VmSnapshot {
        VmSnapshot {
            id: VmId {
                name: name.into(),
                uuid: format!("UUID-{name}"),
            },
            source: VmSource::Proc,
            cpu_seconds_by_kind: Default::default(),
            vcpu_seconds: BTreeMap::new(),
            block_io: Default::default(),
            vcpus: None,
            memory_bytes: None,
            namespace: None,
        }
    }

    fn energy(v: &VmSnapshot, j: f64) -> EnergySnapshot {
        let mut e = EnergySnapshot::default();
        e.vms.insert(
            v.id.clone(),
            BTreeMap::from([((Zone::Package, "estimated"), (j, 0.0))]),
        );
        e
    }

    #[test]
    fn phases_of_a_vm_sum_to_its_totals() {
        let (a, b) = (vm("a"), vm("b"));
        let mut p = VmPhases::default();
        p.observe(500, &[(&a, 20), (&b, 3)], None);
        p.observe(1_000, &[(&a, 50), (&b, 7)], Some(&energy(&a, 2.0)));
        let r = p.switch("a", parse_line(b"train epoch=1").unwrap().unwrap());
        assert!(r.ok, "{r:?}");
        assert_eq!(r.phase.as_deref(), Some("train epoch=1"));
        p.observe(2_000, &[(&a, 80), (&b, 9)], Some(&energy(&a, 5.0)));
        // By UUID, case-insensitive.
        assert!(p.switch("uuid-a", Mark::End).ok);
        p.observe(3_000, &[(&a, 81), (&b, 9)], Some(&energy(&a, 5.5)));
        let l = &p.ledgers()[&a.id];
        let t = l.totals();
        assert_eq!(t["(none)"].usage.cpu_ns, 51);
        // The first (none) runs from the VM's first sample to its first phase.
        assert_eq!(l.history()[0].start_ns, 500);
        assert_eq!(t["(none)"].wall_ns, 500 + 1_000);
        assert_eq!(t["train"].usage.cpu_ns, 30);
        assert_eq!(
            t["train"].usage.energy_uj[&(Zone::Package, "estimated")],
            3_000_000
        );
        assert_eq!(
            l.total().usage.energy_uj[&(Zone::Package, "estimated")],
            5_500_000
        );
        assert_eq!(l.total().usage.cpu_ns, 81);
        // Only VMs given a phase have a ledger; a VM that is gone loses its ledger.
        assert!(!p.ledgers().contains_key(&b.id));
        p.observe(4_000, &[(&b, 10)], None);
        assert!(p.ledgers().is_empty());
    }

    #[test]
    fn unknown_and_ambiguous_vms_are_one_line() {
        let mut p = VmPhases::default();
        let r = p.switch("x", Mark::End);
        assert_eq!(
            r.error.as_deref(),
            Some("unknown VM \"x\" (none is running)")
        );
        let (a1, mut a2) = (vm("a"), vm("a"));
        a2.id.uuid = "other".into();
        p.observe(1, &[(&a1, 0), (&a2, 0)], None);
        let r = p.switch("a", Mark::End);
        assert_eq!(
            r.error.as_deref(),
            Some("2 VMs are named \"a\": give the UUID")
        );
        let r = p.switch("zz", Mark::End);
        assert!(r
            .error
            .unwrap()
            .starts_with("unknown VM \"zz\" (running: \"a\""));
        assert!(p.switch("other", Mark::End).ok);
    }
}
