//! One command's share of each interval: tree readings and meter samples in, cumulative
//! [`Usage`] (the command's) and node energy out. The split is the agent's own
//! [`attribution::split`], with the command standing where a VM would: socket-aware CPU
//! share of each package's active energy, DRAM likewise, GPU by its processes' utilisation.
//! Pure arithmetic: no I/O, no clock.

use std::collections::BTreeMap;

use crate::attribution::{self, IdlePolicy, IntervalInput, VmInterval};
use crate::discovery::VmId;
use crate::energy::{round_to_u64, EnergySample};
use crate::phase::{EnergyKey, Usage};
use crate::sampler::energy::CARBON_ZONES;

use super::tree::TreeReading;

/// Grid intensity and PUE, to turn joules into grams.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CarbonRate {
    pub g_per_kwh: f64,
    pub pue: f64,
}

/// Cumulative counters of the command and of the node since the command started.
#[derive(Debug)]
pub struct Accountant {
    cpu_package: Vec<u32>,
    idle_policy: IdlePolicy,
    /// Highest per-CPU counters read so far (a slice in progress is estimated at read
    /// time; the clamp keeps every counter monotonic).
    cpu_ns: Vec<u64>,
    busy_ns: Vec<u64>,
    at_ns: u64,
    /// Block I/O counters at the start.
    io_base: (u64, u64),
    start_cpu_ns: u64,
    usage: Usage,
    node_uj: BTreeMap<EnergyKey, u64>,
    /// Joules in carbon zones spent while no intensity was known.
    uncovered_carbon_j: f64,
}

fn clamp_delta(prev: &mut Vec<u64>, now: &[u64]) -> Vec<u64> {
    if prev.len() < now.len() {
        prev.resize(now.len(), 0);
    }
    prev.iter_mut()
        .zip(now)
        .map(|(p, n)| {
            let d = n.saturating_sub(*p);
            *p = (*p).max(*n);
            d
        })
        .collect()
}

impl Accountant {
    /// Starts from `base`, the reading taken as the command started.
    pub fn new(base: &TreeReading, cpu_package: Vec<u32>, idle_policy: IdlePolicy) -> Self {
        Self {
            cpu_package,
            idle_policy,
            cpu_ns: base.cpu_ns.clone(),
            busy_ns: base.busy_ns.clone(),
            at_ns: base.at_ns,
            io_base: (base.read_bytes, base.write_bytes),
            start_cpu_ns: base.cpu_ns.iter().sum(),
            usage: Usage::default(),
            node_uj: BTreeMap::new(),
            uncovered_carbon_j: 0.0,
        }
    }

    /// Folds in the interval that ends with `now` and `energy` (meters sampled at the same
    /// instant). `gpu_pids`: processes of the tree among `energy.gpu_processes`. `carbon`:
    /// the intensity in force, `None` when unknown (or not configured: then pass `None` and
    /// ignore [`Accountant::uncovered_carbon_joules`]).
    pub fn step(
        &mut self,
        now: &TreeReading,
        energy: &EnergySample,
        gpu_pids: &[u32],
        carbon: Option<CarbonRate>,
    ) -> &Usage {
        let interval_ns = now.at_ns.saturating_sub(self.at_ns);
        self.at_ns = self.at_ns.max(now.at_ns);
        let cpu = clamp_delta(&mut self.cpu_ns, &now.cpu_ns);
        let busy = clamp_delta(&mut self.busy_ns, &now.busy_ns);
        self.usage.cpu_ns = self
            .cpu_ns
            .iter()
            .sum::<u64>()
            .saturating_sub(self.start_cpu_ns);
        self.usage.read_bytes = now
            .read_bytes
            .saturating_sub(self.io_base.0)
            .max(self.usage.read_bytes);
        self.usage.write_bytes = now
            .write_bytes
            .saturating_sub(self.io_base.1)
            .max(self.usage.write_bytes);

        let id = VmId {
            name: "command".to_owned(),
            uuid: String::new(),
        };
        // The command is the only consumer: with an idle policy it takes the idle energy.
        let mut vms = vec![VmInterval {
            id: id.clone(),
            cpu_ns: cpu,
            pid: gpu_pids.first().copied().unwrap_or(0),
            vcpus: 1,
            memory_bytes: 1,
            guest_gpu_uj: std::collections::BTreeMap::new(),
        }];
        // GPU shares are matched by pid: one more zero-CPU entry per extra GPU process.
        vms.extend(gpu_pids.iter().skip(1).map(|&pid| VmInterval {
            id: id.clone(),
            cpu_ns: Vec::new(),
            pid,
            vcpus: 0,
            memory_bytes: 0,
            guest_gpu_uj: std::collections::BTreeMap::new(),
        }));
        let input = IntervalInput {
            zones: energy
                .zones
                .iter()
                .filter_map(|z| Some((z.key.clone(), z.delta_uj?)))
                .collect(),
            cpu_package: self.cpu_package.clone(),
            busy_ns: Some(busy),
            interval_ns,
            vms,
            gpu_processes: energy
                .gpu_processes
                .iter()
                .map(|p| (p.device.clone(), p.pid, p.sm_util_percent))
                .collect(),
            // vGPU instances are VMs, never the measured tree: they count in the GPU's
            // total use (so the tree's share stays right when the GPU is oversubscribed).
            gpu_vgpus: crate::attribution::vgpu::unowned(&energy.vgpus),
            idle_policy: self.idle_policy,
        };
        let mut carbon_j = 0.0;
        for (key, split) in attribution::split(&input) {
            let k = (key.zone, key.source.label());
            *self.node_uj.entry(k).or_default() += round_to_u64(split.node * 1e6);
            let mine = split.vms.get(&id).copied().unwrap_or(0.0);
            *self.usage.energy_uj.entry(k).or_default() += round_to_u64(mine * 1e6);
            if CARBON_ZONES.contains(&key.zone) {
                carbon_j += mine;
            }
        }
        match carbon {
            Some(rate) => {
                let g = crate::carbon::grams(carbon_j, rate.g_per_kwh, rate.pue);
                self.usage.carbon_ng += round_to_u64(g * 1e9);
            }
            None => self.uncovered_carbon_j += carbon_j,
        }
        &self.usage
    }

    /// The command's counters so far.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// The node's energy so far per zone and meter, microjoules.
    pub fn node_uj(&self) -> &BTreeMap<EnergyKey, u64> {
        &self.node_uj
    }

    /// Joules in carbon zones spent while the intensity was unknown.
    pub fn uncovered_carbon_joules(&self) -> f64 {
        self.uncovered_carbon_j
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::energy::{MeterSource, Zone, ZoneKey, ZoneReading};

    fn reading(at_s: u64, cpu: &[u64], busy: &[u64]) -> TreeReading {
        TreeReading {
            at_ns: at_s * 1_000_000_000,
            cpu_ns: cpu.to_vec(),
            busy_ns: busy.to_vec(),
            ..TreeReading::default()
        }
    }

    fn sample(pkg_uj: &[u64]) -> EnergySample {
        EnergySample {
            zones: pkg_uj
                .iter()
                .enumerate()
                .map(|(i, uj)| ZoneReading {
                    key: ZoneKey::new(
                        Zone::Package,
                        format!("package-{i}"),
                        MeterSource::RaplPowercap,
                    ),
                    total_uj: Some(*uj),
                    delta_uj: Some(*uj),
                    wraps: 0,
                    glitches: 0,
                })
                .collect(),
            ..EnergySample::default()
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn command_share_is_its_cpu_share_of_active_energy_per_socket() {
        // Two CPUs on two packages; the command ran 0.5 s on CPU 0 (which was busy 1 s of
        // 1 s) and nothing on CPU 1 (busy 0.5 s).
        let mut a = Accountant::new(&reading(0, &[0, 0], &[0, 0]), vec![0, 1], IdlePolicy::None);
        let u = a
            .step(
                &reading(1, &[S / 2, 0], &[S, S / 2]),
                &sample(&[10_000_000, 8_000_000]),
                &[],
                Some(CarbonRate {
                    g_per_kwh: 360.0,
                    pue: 1.0,
                }),
            )
            .clone();
        assert_eq!(u.cpu_ns, S / 2);
        // Package 0: fully active, the command half of the busy time: 5 J.
        assert_eq!(u.energy_uj[&(Zone::Package, "rapl-powercap")], 5_000_000);
        assert_eq!(a.node_uj()[&(Zone::Package, "rapl-powercap")], 18_000_000);
        // 5 J at 360 g/kWh = 0.0005 g.
        assert_eq!(u.carbon_ng, 500_000);
    }

    #[test]
    fn idle_policy_gives_the_command_the_idle_energy() {
        let mut a = Accountant::new(&reading(0, &[0], &[0]), vec![0], IdlePolicy::Vcpus);
        let u = a
            .step(
                &reading(1, &[S / 4], &[S / 2]),
                &sample(&[4_000_000]),
                &[],
                None,
            )
            .clone();
        // Active half: 2 J, the command's half of the busy time: 1 J; idle half: 2 J.
        assert_eq!(u.energy_uj[&(Zone::Package, "rapl-powercap")], 3_000_000);
        assert_eq!(a.uncovered_carbon_joules(), 3.0);
        assert_eq!(u.carbon_ng, 0);
    }

    #[test]
    fn counters_start_at_the_base_and_never_go_back() {
        let mut base = reading(0, &[7 * S], &[9 * S]);
        base.write_bytes = 4096;
        let mut a = Accountant::new(&base, vec![0], IdlePolicy::None);
        let mut r = reading(1, &[8 * S], &[10 * S]);
        r.write_bytes = 8192;
        assert_eq!(a.step(&r, &EnergySample::default(), &[], None).cpu_ns, S);
        assert_eq!(a.usage().write_bytes, 4096);
        // An estimate of a running slice read a little high before: no step back.
        let r2 = reading(2, &[8 * S - 10], &[10 * S]);
        assert_eq!(a.step(&r2, &EnergySample::default(), &[], None).cpu_ns, S);
        // No meter: no zone at all, never a zero.
        assert!(a.usage().energy_uj.is_empty());
        assert!(a.node_uj().is_empty());
    }
}
