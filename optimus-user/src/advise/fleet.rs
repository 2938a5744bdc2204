//! The fleet as Prometheus sees it: every host's grid intensity (now and forecast) and
//! capacity, every VM's power and size. Queries out, a [`Fleet`] in; hosts that cannot
//! be judged are kept with the reason they are excluded.

use std::collections::BTreeMap;
use std::time::Duration;

use super::prom::{Prom, PromError, Series};

/// One host (a value of the host label: `instance` by default).
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub name: String,
    pub zone: Option<String>,
    /// Grid intensity in force, g CO2eq/kWh.
    pub intensity: Option<f64>,
    /// Age of that intensity, s (0 for a static value, which never ages).
    pub intensity_age: Option<f64>,
    /// Forecast intensity by hours ahead.
    pub forecast: BTreeMap<u32, f64>,
    pub cpus: Option<f64>,
    /// Busy CPUs over the window (measured).
    pub cpus_busy: Option<f64>,
    pub memory_bytes: Option<f64>,
    pub memory_available_bytes: Option<f64>,
    /// vCPUs and memory of the VMs placed on it.
    pub allocated_vcpus: f64,
    pub allocated_memory_bytes: f64,
    pub excluded: Option<String>,
}

impl Host {
    /// CPUs not allocated to VMs, with `overcommit` vCPUs allowed per CPU.
    pub fn cpus_free(&self, overcommit: f64) -> f64 {
        self.cpus
            .map_or(0.0, |c| (c * overcommit - self.allocated_vcpus).max(0.0))
    }

    /// Memory free for a new VM: what the kernel says is available, and no more than what
    /// is not allocated to VMs already.
    pub fn memory_free_bytes(&self) -> f64 {
        let unallocated = self
            .memory_bytes
            .map_or(f64::INFINITY, |m| m - self.allocated_memory_bytes);
        self.memory_available_bytes
            .unwrap_or(0.0)
            .min(unallocated)
            .max(0.0)
    }
}

/// One VM on one host.
#[derive(Clone, Debug, PartialEq)]
pub struct VmRow {
    pub host: String,
    pub name: String,
    pub uuid: String,
    /// Power over the window: package + DRAM + GPU, W.
    pub power_watts: f64,
    pub vcpus: Option<f64>,
    pub memory_bytes: Option<f64>,
}

/// Hosts and VMs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    pub hosts: Vec<Host>,
    pub vms: Vec<VmRow>,
}

/// What one look at Prometheus returned, query by query.
#[derive(Debug, Default)]
pub struct Answers {
    pub agents: Vec<Series>,
    pub power: Vec<Series>,
    pub vcpus: Vec<Series>,
    pub memory: Vec<Series>,
    pub intensity: Vec<Series>,
    pub age: Vec<Series>,
    pub forecast: Vec<Series>,
    pub cpus: Vec<Series>,
    pub busy: Vec<Series>,
    pub mem_total: Vec<Series>,
    pub mem_available: Vec<Series>,
}

/// PromQL's duration syntax for `d` (whole seconds).
pub fn promql_duration(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// Asks Prometheus everything advise needs.
pub fn gather(prom: &Prom, label: &str, window: Duration) -> Result<Answers, PromError> {
    let w = promql_duration(window);
    let by_vm = format!("{label}, vm_name, vm_uuid");
    Ok(Answers {
        agents: prom.query(&format!("max by ({label}) (optimus_build_info)"))?,
        power: prom.query(&format!(
            "sum by ({by_vm}) (rate(optimus_vm_energy_joules_total{{zone=~\"package|dram|gpu\"}}[{w}]))"
        ))?,
        vcpus: prom.query(&format!("max by ({by_vm}) (optimus_vm_vcpus)"))?,
        memory: prom.query(&format!("max by ({by_vm}) (optimus_vm_memory_bytes)"))?,
        intensity: prom.query(&format!(
            "max by ({label}, zone) (optimus_grid_carbon_intensity_grams_per_kwh)"
        ))?,
        age: prom.query(&format!(
            "max by ({label}) (optimus_grid_carbon_intensity_age_seconds)"
        ))?,
        forecast: prom.query(&format!(
            "max by ({label}, horizon) (optimus_grid_carbon_intensity_forecast_grams_per_kwh)"
        ))?,
        cpus: prom.query(&format!("max by ({label}) (optimus_node_cpus)"))?,
        busy: prom.query(&format!(
            "sum by ({label}) (rate(optimus_node_cpu_busy_seconds_total[{w}]))"
        ))?,
        mem_total: prom.query(&format!("max by ({label}) (optimus_node_memory_bytes)"))?,
        mem_available: prom.query(&format!(
            "max by ({label}) (optimus_node_memory_available_bytes)"
        ))?,
    })
}

fn per_host<'a>(series: &'a [Series], label: &str, host: &str) -> impl Iterator<Item = &'a Series> {
    let label = label.to_owned();
    let host = host.to_owned();
    series
        .iter()
        .filter(move |s| s.label(&label) == Some(host.as_str()))
}

fn one(series: &[Series], label: &str, host: &str) -> Option<f64> {
    per_host(series, label, host).next().map(|s| s.value)
}

/// Builds the fleet; `max_age` is the oldest intensity still trusted.
pub fn assemble(a: &Answers, label: &str, max_age: Duration) -> Fleet {
    let mut names: Vec<String> = a
        .agents
        .iter()
        .chain(&a.power)
        .chain(&a.intensity)
        .chain(&a.cpus)
        .filter_map(|s| s.label(label).map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();

    let mut vms = Vec::new();
    for s in &a.power {
        let (Some(host), Some(name), Some(uuid)) =
            (s.label(label), s.label("vm_name"), s.label("vm_uuid"))
        else {
            continue;
        };
        let of = |series: &[Series]| {
            series
                .iter()
                .find(|v| {
                    v.label(label) == Some(host)
                        && v.label("vm_uuid") == Some(uuid)
                        && v.label("vm_name") == Some(name)
                })
                .map(|v| v.value)
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        vms.push(VmRow {
            host: host.to_owned(),
            name: name.to_owned(),
            uuid: uuid.to_owned(),
            power_watts: if s.value.is_finite() && s.value >= 0.0 {
                s.value
            } else {
                0.0
            },
            vcpus: of(&a.vcpus),
            memory_bytes: of(&a.memory),
        });
    }
    vms.sort_by(|x, y| (&x.host, &x.name, &x.uuid).cmp(&(&y.host, &y.name, &y.uuid)));

    let hosts = names
        .into_iter()
        .map(|name| {
            let intensity_series = per_host(&a.intensity, label, &name).next();
            let intensity = intensity_series.map(|s| s.value);
            let zone = intensity_series.and_then(|s| s.label("zone").map(str::to_owned));
            // A static intensity exports no age: it never goes stale.
            let intensity_age = intensity.map(|_| one(&a.age, label, &name).unwrap_or(0.0));
            let forecast = per_host(&a.forecast, label, &name)
                .filter(|s| s.value.is_finite() && s.value >= 0.0)
                .filter_map(|s| {
                    let h = s.label("horizon")?.strip_suffix('h')?.parse().ok()?;
                    Some((h, s.value))
                })
                .collect();
            let mine = vms.iter().filter(|v| v.host == name);
            let allocated_vcpus = mine.clone().filter_map(|v| v.vcpus).sum();
            let allocated_memory_bytes = mine.filter_map(|v| v.memory_bytes).sum();
            let mut host = Host {
                zone,
                intensity,
                intensity_age,
                forecast,
                cpus: one(&a.cpus, label, &name),
                cpus_busy: one(&a.busy, label, &name),
                memory_bytes: one(&a.mem_total, label, &name),
                memory_available_bytes: one(&a.mem_available, label, &name),
                allocated_vcpus,
                allocated_memory_bytes,
                excluded: None,
                name,
            };
            host.excluded = exclusion(&host, max_age);
            host
        })
        .collect();
    Fleet { hosts, vms }
}

/// Why a host cannot be compared, if it cannot.
fn exclusion(h: &Host, max_age: Duration) -> Option<String> {
    let Some(g) = h.intensity else {
        return Some("no grid carbon intensity: start its agent with --carbon-intensity, --electricitymaps-zone or --uk-grid".to_owned());
    };
    if !g.is_finite() || g < 0.0 {
        return Some(format!(
            "its agent serves an invalid carbon intensity ({g}); fix that exporter"
        ));
    }
    let age = h.intensity_age.unwrap_or(0.0);
    if !age.is_finite() || age > max_age.as_secs_f64() {
        return Some(format!(
            "carbon intensity is stale ({age:.0} s old, more than {} s); check its provider",
            max_age.as_secs()
        ));
    }
    match (h.cpus, h.memory_available_bytes) {
        (Some(c), Some(m)) if c.is_finite() && c > 0.0 && m.is_finite() && m >= 0.0 => None,
        _ => Some(
            "no capacity metrics (optimus_node_cpus, optimus_node_memory_available_bytes): upgrade its agent"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }

    #[test]
    fn hosts_are_excluded_with_their_reason() {
        let a = Answers {
            agents: vec![
                s(&[("instance", "a")], 1.0),
                s(&[("instance", "b")], 1.0),
                s(&[("instance", "c")], 1.0),
                s(&[("instance", "d")], 1.0),
                s(&[("instance", "e")], 1.0),
            ],
            intensity: vec![
                s(&[("instance", "a"), ("zone", "static")], 400.0),
                s(&[("instance", "b"), ("zone", "GB")], 100.0),
                s(&[("instance", "c"), ("zone", "static")], f64::NAN),
                s(&[("instance", "e"), ("zone", "static")], 50.0),
            ],
            age: vec![s(&[("instance", "b")], 7200.0)],
            cpus: vec![
                s(&[("instance", "a")], 8.0),
                s(&[("instance", "b")], 8.0),
                s(&[("instance", "c")], 8.0),
                s(&[("instance", "d")], 8.0),
            ],
            mem_available: vec![
                s(&[("instance", "a")], 8e9),
                s(&[("instance", "b")], 8e9),
                s(&[("instance", "c")], 8e9),
                s(&[("instance", "d")], 8e9),
            ],
            ..Answers::default()
        };
        let f = assemble(&a, "instance", Duration::from_secs(3600));
        let why = |n: &str| {
            f.hosts
                .iter()
                .find(|h| h.name == n)
                .unwrap()
                .excluded
                .clone()
        };
        assert_eq!(why("a"), None);
        assert!(why("b").unwrap().contains("stale"));
        assert!(why("c").unwrap().contains("invalid"));
        assert!(why("d").unwrap().contains("no grid carbon intensity"));
        assert!(why("e").unwrap().contains("no capacity"));
    }

    #[test]
    fn vms_carry_their_size_and_hosts_their_allocation() {
        fn vm(host: &'static str, name: &'static str) -> [(&'static str, &'static str); 3] {
            [("instance", host), ("vm_name", name), ("vm_uuid", name)]
        }
        let a = Answers {
            power: vec![s(&vm("a", "x"), 10.0), s(&vm("a", "y"), f64::NAN)],
            vcpus: vec![s(&vm("a", "x"), 2.0), s(&vm("a", "y"), 1.0)],
            memory: vec![s(&vm("a", "x"), 1e9)],
            cpus: vec![s(&[("instance", "a")], 4.0)],
            mem_total: vec![s(&[("instance", "a")], 4e9)],
            mem_available: vec![s(&[("instance", "a")], 3.5e9)],
            ..Answers::default()
        };
        let f = assemble(&a, "instance", Duration::from_secs(3600));
        assert_eq!(f.vms.len(), 2);
        assert_eq!(f.vms[0].vcpus, Some(2.0));
        assert_eq!(f.vms[1].power_watts, 0.0, "NaN power is no power");
        assert_eq!(f.vms[1].memory_bytes, None);
        let h = &f.hosts[0];
        assert_eq!(h.allocated_vcpus, 3.0);
        assert_eq!(h.cpus_free(1.0), 1.0);
        assert_eq!(h.memory_free_bytes(), 3e9);
    }
}
