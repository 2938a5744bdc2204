//! Which VM to move where: a [`Fleet`] and the migration's cost model in, recommendations
//! out. Pure arithmetic (no I/O, no clock), so every figure is tested by hand.
//!
//! For a VM drawing `P` kW on host S, moving it to host T saves `P × (I_S − I_T)` grams
//! per hour. The move itself sends the VM's memory, `M × (1 + dirty factor)` GB, at
//! `network kWh/GB`, emitted half at each end's intensity. It pays back after
//! `migration grams / saving per hour`. With forecasts on both hosts the saving is summed
//! hour by hour over the horizon, so a saving that the forecast says will vanish before
//! break-even is no saving; with the current intensity only, it is assumed to hold.

use super::fleet::{Fleet, Host, VmRow};

/// The cost model and limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Hours over which a move must pay back.
    pub horizon_hours: u32,
    pub network_kwh_per_gb: f64,
    pub dirty_factor: f64,
    pub downtime_seconds: f64,
    pub cpu_overcommit: f64,
}

/// One recommended move (the `--json` contract's names).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Recommendation {
    pub vm_name: String,
    pub vm_uuid: String,
    pub from: String,
    pub to: String,
    pub power_watts: f64,
    pub saving_grams_per_hour: f64,
    pub migration_grams: f64,
    pub break_even_hours: f64,
    pub horizon_saving_grams: f64,
    pub confidence: &'static str,
    pub reason: String,
    pub downtime_seconds: f64,
}

/// Why a VM stays (for the table and `--json`'s `kept`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Kept {
    pub vm_name: String,
    pub vm_uuid: String,
    pub host: String,
    pub power_watts: f64,
    pub reason: String,
}

/// The outcome of one planning round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub recommendations: Vec<Recommendation>,
    pub kept: Vec<Kept>,
}

/// Intensity `h` hours ahead: the forecast if it covers `h`, else `None`.
fn forecast_at(h: &Host, hour: u32) -> Option<f64> {
    h.forecast.get(&hour).copied()
}

/// Whether both hosts' forecasts cover every hour of the horizon.
fn forecasts_cover(a: &Host, b: &Host, horizon: u32) -> bool {
    (1..=horizon).all(|h| forecast_at(a, h).is_some() && forecast_at(b, h).is_some())
}

/// The figures of moving `vm` from `src` to `dst`.
pub fn evaluate(vm: &VmRow, src: &Host, dst: &Host, p: &Params) -> Option<Recommendation> {
    let (i_src, i_dst) = (src.intensity?, dst.intensity?);
    let kw = vm.power_watts / 1000.0;
    let saving_now = kw * (i_src - i_dst);
    let gb = vm.memory_bytes? / 1e9 * (1.0 + p.dirty_factor);
    let migration_grams = gb * p.network_kwh_per_gb * (i_src + i_dst) / 2.0;
    let horizon = f64::from(p.horizon_hours);
    let (confidence, horizon_saving, break_even) = if forecasts_cover(src, dst, p.horizon_hours) {
        // Hour h runs from h-1 to h; its intensity is the forecast at its end, the first
        // hour's is known now.
        let mut cumulative = 0.0;
        let mut break_even = f64::INFINITY;
        for h in 1..=p.horizon_hours {
            let (s, d) = if h == 1 {
                (i_src, i_dst)
            } else {
                (forecast_at(src, h - 1)?, forecast_at(dst, h - 1)?)
            };
            let hourly = kw * (s - d);
            let before = cumulative;
            cumulative += hourly;
            if break_even.is_infinite() && cumulative >= migration_grams && hourly > 0.0 {
                break_even = f64::from(h - 1) + (migration_grams - before) / hourly;
            } else if cumulative < migration_grams {
                // The forecast takes the saving back below the cost: not paid back yet.
                break_even = f64::INFINITY;
            }
        }
        ("forecast", cumulative - migration_grams, break_even)
    } else {
        let be = if saving_now > 0.0 {
            migration_grams / saving_now
        } else {
            f64::INFINITY
        };
        ("current-only", saving_now * horizon - migration_grams, be)
    };
    let reason = if confidence == "forecast" {
        format!(
            "{:.1} g/kWh on {} against {:.1} on {}; the forecast keeps the saving over {} h; \
             moving {gb:.2} GB costs {migration_grams:.3} g, paid back in {break_even:.2} h",
            i_src, src.name, i_dst, dst.name, p.horizon_hours
        )
    } else {
        format!(
            "{:.1} g/kWh on {} against {:.1} on {} (no forecast for both: the current \
             intensities are assumed to hold for {} h); moving {gb:.2} GB costs \
             {migration_grams:.3} g, paid back in {break_even:.2} h",
            i_src, src.name, i_dst, dst.name, p.horizon_hours
        )
    };
    Some(Recommendation {
        vm_name: vm.name.clone(),
        vm_uuid: vm.uuid.clone(),
        from: src.name.clone(),
        to: dst.name.clone(),
        power_watts: vm.power_watts,
        saving_grams_per_hour: saving_now,
        migration_grams,
        break_even_hours: break_even,
        horizon_saving_grams: horizon_saving,
        confidence,
        reason,
        downtime_seconds: p.downtime_seconds,
    })
}

/// Plans the moves: each VM (most power first) goes to the candidate with room that saves
/// the most over the horizon, if that pays back within it. Capacity moves with each
/// recommendation, so two VMs are never sent into the same last free CPU.
pub fn plan(fleet: &Fleet, p: &Params) -> Plan {
    let mut hosts = fleet.hosts.clone();
    let mut vms: Vec<&VmRow> = fleet.vms.iter().collect();
    vms.sort_by(|a, b| b.power_watts.total_cmp(&a.power_watts));
    let mut out = Plan::default();
    for vm in vms {
        let keep = |reason: String| Kept {
            vm_name: vm.name.clone(),
            vm_uuid: vm.uuid.clone(),
            host: vm.host.clone(),
            power_watts: vm.power_watts,
            reason,
        };
        let Some(si) = hosts.iter().position(|h| h.name == vm.host) else {
            continue;
        };
        if let Some(why) = &hosts[si].excluded {
            out.kept.push(keep(format!("its host is excluded: {why}")));
            continue;
        }
        let (Some(vcpus), Some(mem)) = (vm.vcpus, vm.memory_bytes) else {
            out.kept.push(keep(
                "its size is unknown (no optimus_vm_vcpus or optimus_vm_memory_bytes): cannot check room or price the move".to_owned(),
            ));
            continue;
        };
        let best = hosts
            .iter()
            .enumerate()
            .filter(|(i, h)| {
                *i != si
                    && h.excluded.is_none()
                    && h.cpus_free(p.cpu_overcommit) >= vcpus
                    && h.memory_free_bytes() >= mem
            })
            .filter_map(|(i, h)| Some((i, evaluate(vm, &hosts[si], h, p)?)))
            .filter(|(_, r)| {
                r.saving_grams_per_hour > 0.0
                    && r.horizon_saving_grams > 0.0
                    && r.break_even_hours <= f64::from(p.horizon_hours)
            })
            .max_by(|a, b| {
                a.1.horizon_saving_grams
                    .total_cmp(&b.1.horizon_saving_grams)
            });
        match best {
            Some((ti, r)) => {
                hosts[ti].allocated_vcpus += vcpus;
                hosts[ti].allocated_memory_bytes += mem;
                hosts[si].allocated_vcpus -= vcpus;
                hosts[si].allocated_memory_bytes -= mem;
                out.recommendations.push(r);
            }
            None => out.kept.push(keep(
                "no host with room saves more than the move costs within the horizon".to_owned(),
            )),
        }
    }
    out.recommendations
        .sort_by(|a, b| b.horizon_saving_grams.total_cmp(&a.horizon_saving_grams));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn host(name: &str, g: f64, cpus: f64) -> Host {
        Host {
            name: name.to_owned(),
            zone: Some("static".into()),
            intensity: Some(g),
            intensity_age: Some(0.0),
            forecast: BTreeMap::new(),
            cpus: Some(cpus),
            cpus_busy: Some(0.5),
            memory_bytes: Some(64e9),
            memory_available_bytes: Some(32e9),
            allocated_vcpus: 0.0,
            allocated_memory_bytes: 0.0,
            excluded: None,
        }
    }

    fn vm(host: &str, name: &str, watts: f64) -> VmRow {
        VmRow {
            host: host.into(),
            name: name.into(),
            uuid: format!("uuid-{name}"),
            power_watts: watts,
            vcpus: Some(2.0),
            memory_bytes: Some(4e9),
        }
    }

    fn params() -> Params {
        Params {
            horizon_hours: 24,
            network_kwh_per_gb: 0.06,
            dirty_factor: 0.5,
            downtime_seconds: 0.3,
            cpu_overcommit: 1.0,
        }
    }

    #[test]
    fn figures_by_hand() {
        let (a, b) = (host("a", 500.0, 8.0), host("b", 100.0, 8.0));
        let r = evaluate(&vm("a", "x", 200.0), &a, &b, &params()).unwrap();
        // 0.2 kW × 400 g/kWh
        assert!((r.saving_grams_per_hour - 80.0).abs() < 1e-9);
        // 4 GB × 1.5 × 0.06 kWh/GB × 300 g/kWh
        assert!((r.migration_grams - 108.0).abs() < 1e-9);
        assert!((r.break_even_hours - 1.35).abs() < 1e-9);
        assert!((r.horizon_saving_grams - (80.0 * 24.0 - 108.0)).abs() < 1e-9);
        assert_eq!(r.confidence, "current-only");
    }

    #[test]
    fn busy_vm_goes_to_the_cleanest_host_with_room() {
        let mut full = host("clean-full", 20.0, 2.0);
        full.allocated_vcpus = 2.0;
        let fleet = Fleet {
            hosts: vec![host("dirty", 600.0, 8.0), full, host("medium", 150.0, 8.0)],
            vms: vec![vm("dirty", "busy", 100.0), vm("dirty", "idle", 0.001)],
        };
        let plan = plan(&fleet, &params());
        assert_eq!(plan.recommendations.len(), 1, "{plan:?}");
        let r = &plan.recommendations[0];
        assert_eq!((r.vm_name.as_str(), r.to.as_str()), ("busy", "medium"));
        assert_eq!(plan.kept.len(), 1);
        assert_eq!(plan.kept[0].vm_name, "idle");
    }

    #[test]
    fn room_is_used_up_by_earlier_moves() {
        let fleet = Fleet {
            hosts: vec![host("dirty", 600.0, 8.0), host("clean", 50.0, 2.0)],
            vms: vec![vm("dirty", "one", 100.0), vm("dirty", "two", 90.0)],
        };
        let plan = plan(&fleet, &params());
        assert_eq!(plan.recommendations.len(), 1);
        assert_eq!(plan.recommendations[0].vm_name, "one");
    }

    #[test]
    fn a_forecast_that_takes_the_saving_away_blocks_the_move() {
        let mut a = host("a", 300.0, 8.0);
        let mut b = host("b", 200.0, 8.0);
        // After the first hour b becomes dirtier than a for the rest of the day.
        for h in 1..=24 {
            a.forecast.insert(h, 300.0);
            b.forecast.insert(h, 400.0);
        }
        let r = evaluate(&vm("a", "x", 200.0), &a, &b, &params()).unwrap();
        assert_eq!(r.confidence, "forecast");
        assert!(r.horizon_saving_grams < 0.0);
        let fleet = Fleet {
            hosts: vec![a, b],
            vms: vec![vm("a", "x", 200.0)],
        };
        assert!(plan(&fleet, &params()).recommendations.is_empty());
    }

    #[test]
    fn forecast_break_even_is_interpolated() {
        let mut a = host("a", 500.0, 8.0);
        let mut b = host("b", 100.0, 8.0);
        for h in 1..=24 {
            a.forecast.insert(h, 500.0);
            b.forecast.insert(h, 100.0);
        }
        let r = evaluate(&vm("a", "x", 200.0), &a, &b, &params()).unwrap();
        assert_eq!(r.confidence, "forecast");
        assert!(
            (r.break_even_hours - 1.35).abs() < 1e-9,
            "{}",
            r.break_even_hours
        );
        assert!((r.horizon_saving_grams - (80.0 * 24.0 - 108.0)).abs() < 1e-9);
    }

    #[test]
    fn unknown_size_or_excluded_host_keeps_the_vm_with_a_reason() {
        let mut x = host("x", 600.0, 8.0);
        x.excluded = Some("stale".into());
        let mut nomem = vm("dirty", "nomem", 50.0);
        nomem.memory_bytes = None;
        let fleet = Fleet {
            hosts: vec![host("dirty", 600.0, 8.0), host("clean", 10.0, 8.0), x],
            vms: vec![nomem, vm("x", "onstale", 50.0)],
        };
        let plan = plan(&fleet, &params());
        assert!(plan.recommendations.is_empty());
        assert_eq!(plan.kept.len(), 2);
        assert!(plan
            .kept
            .iter()
            .any(|k| k.reason.contains("size is unknown")));
        assert!(plan.kept.iter().any(|k| k.reason.contains("excluded")));
    }
}
