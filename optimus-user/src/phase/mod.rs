//! Phases of a workload: line protocol in ([`line`]), per-phase usage out ([`ledger`]),
//! and the `/api/v1/phases` JSON ([`vms_json`]).
//!
//! Shared by `optimus measure` (one command's phases, from `$OPTIMUS_PHASE`), the agent
//! (each VM's phases, from `optimus phase` over the control socket) and anything else that
//! speaks the line protocol.

pub mod ledger;
pub mod line;

pub use ledger::{
    EnergyKey, Occurrence, PhaseLedger, PhaseTotals, Switched, Usage, MAX_NAMES, NONE, OTHER,
};
pub use line::{
    format_mark, parse_line, parse_words, quote, Labels, LineError, LineSplitter, Mark, Piece,
};

use serde_json::{json, Map, Value};

use crate::discovery::VmId;
use ledger::{ns_to_s, uj_to_j};

/// Closed occurrences the agent keeps per VM: with the one in progress, `/api/v1/phases`
/// returns each VM's last 1,000 occurrences.
pub const VM_HISTORY: usize = 999;

/// `{"package": 1.5, "dram": 0.2}`: joules per zone, summed over meters; zones no meter
/// covers are absent.
pub fn energy_json(usage: &Usage) -> Value {
    let map: Map<String, Value> = usage
        .zone_joules()
        .into_iter()
        .map(|(z, j)| (z.label().to_owned(), json!(j)))
        .collect();
    Value::Object(map)
}

/// One occurrence for `/api/v1/phases`. `unix_of` turns a CLOCK_MONOTONIC instant into
/// Unix seconds.
pub fn occurrence_json(o: &Occurrence, open: bool, unix_of: &dyn Fn(u64) -> f64) -> Value {
    json!({
        "name": o.name,
        "labels": o.labels,
        "start_unix_seconds": unix_of(o.start_ns),
        "duration_seconds": ns_to_s(o.wall_ns()),
        "cpu_seconds": ns_to_s(o.usage.cpu_ns),
        "energy_joules": energy_json(&o.usage),
        "in_progress": open,
    })
}

/// The body of `GET /api/v1/phases`: for each VM with phases, the phase in progress, its
/// last occurrences (oldest first, the one in progress last: 1,000 at most with a ledger of
/// [`VM_HISTORY`]) and totals per phase name. `mono_now_ns`/`unix_now_s` are one reading of both clocks, to date the
/// occurrences.
pub fn vms_json(vms: &[(&VmId, &PhaseLedger)], mono_now_ns: u64, unix_now_s: f64) -> Value {
    let unix_of = |ns: u64| unix_now_s - ns_to_s(mono_now_ns.saturating_sub(ns));
    let list: Vec<Value> = vms
        .iter()
        .map(|(id, l)| {
            let mut occurrences: Vec<Value> = l
                .history()
                .iter()
                .map(|o| occurrence_json(o, false, &unix_of))
                .collect();
            occurrences.push(occurrence_json(l.current(), true, &unix_of));
            let totals: Map<String, Value> = l
                .totals()
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        json!({
                            "occurrences": t.occurrences,
                            "wall_seconds": ns_to_s(t.wall_ns),
                            "cpu_seconds": ns_to_s(t.usage.cpu_ns),
                            "energy_joules": energy_json(&t.usage),
                        }),
                    )
                })
                .collect();
            json!({
                "vm_name": id.name,
                "vm_uuid": id.uuid,
                "current": l.current().name,
                "occurrences": occurrences,
                "occurrences_dropped": l.dropped(),
                "totals": totals,
            })
        })
        .collect();
    json!({ "vms": list })
}

/// Joules of a microjoule count (for exporters).
pub fn joules(uj: u64) -> f64 {
    uj_to_j(uj)
}

/// Seconds of a nanosecond count (for exporters).
pub fn seconds(ns: u64) -> f64 {
    ns_to_s(ns)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::energy::Zone;

    #[test]
    fn api_returns_the_last_1000_occurrences() {
        let id = VmId {
            name: "a".into(),
            uuid: "u".into(),
        };
        let mut l = PhaseLedger::new(0, Usage::default(), VM_HISTORY);
        for i in 0..1_500u64 {
            l.switch(
                i,
                parse_line(format!("p i={i}").as_bytes()).unwrap().unwrap(),
            );
        }
        let v = vms_json(&[(&id, &l)], 2_000, 10.0);
        let occ = v["vms"][0]["occurrences"].as_array().unwrap();
        assert_eq!(occ.len(), 1_000);
        assert_eq!(occ[999]["labels"]["i"], "1499");
        assert_eq!(occ[999]["in_progress"], true);
        assert_eq!(v["vms"][0]["occurrences_dropped"], 501);
    }

    #[test]
    fn api_json_shape() {
        let id = VmId {
            name: "vm \"a\"".into(),
            uuid: "u-1".into(),
        };
        let mut l = PhaseLedger::new(1_000_000_000, Usage::default(), VM_HISTORY);
        let at = |s: u64| s * 1_000_000_000;
        let cum = |cpu_s: u64, j: u64| Usage {
            cpu_ns: at(cpu_s),
            energy_uj: BTreeMap::from([((Zone::Package, "estimated"), j * 1_000_000)]),
            ..Usage::default()
        };
        l.observe(at(2), &cum(1, 3));
        l.switch(at(2), parse_line(b"train epoch=1").unwrap().unwrap());
        l.observe(at(5), &cum(3, 9));
        let v = vms_json(&[(&id, &l)], at(5), 1_700_000_005.0);
        let vm = &v["vms"][0];
        assert_eq!(vm["vm_name"], "vm \"a\"");
        assert_eq!(vm["current"], "train");
        let occ = vm["occurrences"].as_array().unwrap();
        assert_eq!(occ.len(), 2);
        assert_eq!(occ[0]["name"], "(none)");
        assert_eq!(occ[0]["start_unix_seconds"], 1_700_000_001.0);
        assert_eq!(occ[0]["duration_seconds"], 1.0);
        assert_eq!(occ[0]["cpu_seconds"], 1.0);
        assert_eq!(occ[0]["energy_joules"]["package"], 3.0);
        assert_eq!(occ[1]["labels"]["epoch"], "1");
        assert_eq!(occ[1]["duration_seconds"], 3.0);
        assert_eq!(occ[1]["in_progress"], true);
        assert_eq!(vm["totals"]["train"]["cpu_seconds"], 2.0);
        assert_eq!(vm["totals"]["train"]["energy_joules"]["package"], 6.0);
    }
}
