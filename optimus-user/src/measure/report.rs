//! What `optimus measure` reports: the table on stderr, `--json` (field names are a
//! contract, README "optimus measure") and `--csv` (CodeCarbon's `emissions.csv` columns and
//! units). Pure formatting of a finished run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::energy::Zone;
use crate::phase::{energy_json, joules, seconds, EnergyKey, Occurrence, PhaseTotals, Usage};

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// What `optimus measure` exits with: the command's status, or 128 + N for signal N.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(n) => 128 + n,
        }
    }
}

/// Carbon intensity used, for the report.
#[derive(Clone, Debug, PartialEq)]
pub struct CarbonNote {
    /// `static`, `electricitymaps`, `ukgrid`.
    pub source: &'static str,
    /// The last intensity in force, g/kWh.
    pub g_per_kwh: f64,
    pub pue: f64,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub command: Vec<String>,
    pub exit: Exit,
    /// Unix seconds when the command started.
    pub start_unix_s: f64,
    /// CLOCK_MONOTONIC ns when the command started (occurrences count from it).
    pub origin_ns: u64,
    pub wall_ns: u64,
    pub total: Usage,
    pub node_uj: BTreeMap<EnergyKey, u64>,
    /// `None`: no carbon source, or its intensity never arrived: grams are null.
    pub carbon: Option<CarbonNote>,
    /// Kept occurrences, oldest first, the last one included.
    pub occurrences: Vec<Occurrence>,
    /// Older occurrences left out of `occurrences` (still in `totals`).
    pub dropped: u64,
    pub totals: BTreeMap<String, PhaseTotals>,
    /// A UUID for this run (CodeCarbon's `run_id`).
    pub run_id: String,
}

fn zones_json(uj: &BTreeMap<EnergyKey, u64>) -> Value {
    let mut by_zone: BTreeMap<Zone, u64> = BTreeMap::new();
    for ((z, _), v) in uj {
        *by_zone.entry(*z).or_default() += v;
    }
    Value::Object(
        by_zone
            .into_iter()
            .map(|(z, v)| (z.label().to_owned(), json!(joules(v))))
            .collect(),
    )
}

/// Joules of one zone (over meters); `None` when no meter covers it.
fn zone_uj(uj: &BTreeMap<EnergyKey, u64>, zone: Zone) -> Option<u64> {
    let mut it = uj.iter().filter(|((z, _), _)| *z == zone).peekable();
    it.peek()?;
    Some(it.map(|(_, v)| v).sum())
}

impl Report {
    fn grams(&self, u: &Usage) -> Option<f64> {
        self.carbon.as_ref().map(|_| u.carbon_ng as f64 / 1e9)
    }

    /// The meters behind the numbers, e.g. `rapl-powercap`, or `nvml+rapl-powercap`.
    pub fn energy_source(&self) -> Option<String> {
        let sources: BTreeSet<&str> = self.node_uj.keys().map(|(_, s)| *s).collect();
        (!sources.is_empty()).then(|| sources.into_iter().collect::<Vec<_>>().join("+"))
    }

    fn io_json(u: &Usage) -> Value {
        json!({"read": u.read_bytes, "write": u.write_bytes})
    }

    /// The `--json` document.
    pub fn json(&self) -> Value {
        let phases: Vec<Value> = self
            .occurrences
            .iter()
            .map(|o| {
                json!({
                    "name": o.name,
                    "labels": o.labels,
                    "start_seconds": seconds(o.start_ns.saturating_sub(self.origin_ns)),
                    "wall_seconds": seconds(o.wall_ns()),
                    "cpu_seconds": seconds(o.usage.cpu_ns),
                    "block_io_bytes": Self::io_json(&o.usage),
                    "energy_joules": energy_json(&o.usage),
                    "carbon_grams": self.grams(&o.usage),
                })
            })
            .collect();
        let totals: Map<String, Value> = self
            .totals
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    json!({
                        "occurrences": t.occurrences,
                        "wall_seconds": seconds(t.wall_ns),
                        "cpu_seconds": seconds(t.usage.cpu_ns),
                        "block_io_bytes": Self::io_json(&t.usage),
                        "energy_joules": energy_json(&t.usage),
                        "carbon_grams": self.grams(&t.usage),
                    }),
                )
            })
            .collect();
        let sources: Map<String, Value> = self
            .node_uj
            .keys()
            .map(|(z, s)| (z.label().to_owned(), json!(s)))
            .collect();
        let (exit_code, signal) = match self.exit {
            Exit::Code(c) => (c, None),
            Exit::Signal(n) => (128 + n, Some(n)),
        };
        json!({
            "command": self.command,
            "exit_code": exit_code,
            "signal": signal,
            "run_id": self.run_id,
            "start_unix_seconds": self.start_unix_s,
            "origin_monotonic_ns": self.origin_ns,
            "wall_seconds": seconds(self.wall_ns),
            "cpu_seconds": seconds(self.total.cpu_ns),
            "block_io_bytes": Self::io_json(&self.total),
            "energy_joules": energy_json(&self.total),
            "node_energy_joules": zones_json(&self.node_uj),
            "energy_source": self.energy_source(),
            "energy_sources": sources,
            "carbon_grams": self.grams(&self.total),
            "carbon_intensity_g_per_kwh": self.carbon.as_ref().map(|c| c.g_per_kwh),
            "phases": phases,
            "phases_dropped": self.dropped,
            "phase_totals": totals,
        })
    }

    /// The `--csv` text: CodeCarbon's `emissions.csv` columns (energy in kWh, emissions in
    /// kg CO2eq, duration in s), then `phase` and one column per label key; one row per
    /// kept occurrence, then a `(total)` row. An empty cell is a value no meter covers.
    pub fn csv(&self) -> String {
        const FIXED: [&str; 11] = [
            "timestamp",
            "project_name",
            "run_id",
            "duration",
            "emissions",
            "emissions_rate",
            "cpu_energy",
            "gpu_energy",
            "ram_energy",
            "energy_consumed",
            "phase",
        ];
        let keys: BTreeSet<&String> = self
            .occurrences
            .iter()
            .flat_map(|o| o.labels.keys())
            .collect();
        let mut header: Vec<String> = FIXED.iter().map(|s| (*s).to_owned()).collect();
        for k in &keys {
            header.push(if FIXED.contains(&k.as_str()) {
                format!("label_{k}")
            } else {
                (*k).clone()
            });
        }
        let mut out = String::new();
        push_row(&mut out, &header);
        let project = self
            .command
            .first()
            .map(|c| c.rsplit('/').next().unwrap_or(c).to_owned())
            .unwrap_or_default();
        let row = |end_ns: u64,
                   wall_ns: u64,
                   u: &Usage,
                   phase: &str,
                   labels: Option<&crate::phase::Labels>| {
            let kwh = |z: Zone| zone_uj(&u.energy_uj, z).map(|uj| joules(uj) / 3.6e6);
            let cpu = kwh(Zone::Package).or_else(|| kwh(Zone::Psys));
            let (gpu, ram) = (kwh(Zone::Gpu), kwh(Zone::Dram));
            let consumed = (cpu.is_some() || gpu.is_some() || ram.is_some())
                .then(|| cpu.unwrap_or(0.0) + gpu.unwrap_or(0.0) + ram.unwrap_or(0.0));
            let kg = self.grams(u).map(|g| g / 1000.0);
            let duration = seconds(wall_ns);
            let rate = kg.map(|k| if duration > 0.0 { k / duration } else { 0.0 });
            let opt = |v: Option<f64>| v.map(|x| format!("{x:e}")).unwrap_or_default();
            let mut cells = vec![
                iso_utc(self.start_unix_s + seconds(end_ns.saturating_sub(self.origin_ns))),
                project.clone(),
                self.run_id.clone(),
                format!("{duration}"),
                opt(kg),
                opt(rate),
                opt(cpu),
                opt(gpu),
                opt(ram),
                opt(consumed),
                phase.to_owned(),
            ];
            for k in &keys {
                cells.push(labels.and_then(|l| l.get(*k)).cloned().unwrap_or_default());
            }
            cells
        };
        for o in &self.occurrences {
            push_row(
                &mut out,
                &row(o.end_ns, o.wall_ns(), &o.usage, &o.name, Some(&o.labels)),
            );
        }
        push_row(
            &mut out,
            &row(
                self.origin_ns + self.wall_ns,
                self.wall_ns,
                &self.total,
                "(total)",
                None,
            ),
        );
        out
    }

    /// The table printed on stderr.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let exit = match self.exit {
            Exit::Code(c) => format!("{c}"),
            Exit::Signal(n) => format!("killed by signal {n} (exit {})", 128 + n),
        };
        let _ = writeln!(t, "\n optimus measure: {}", self.command.join(" "));
        let _ = writeln!(t, "   exit               {exit}");
        let _ = writeln!(t, "   wall time          {:.3} s", seconds(self.wall_ns));
        let _ = writeln!(
            t,
            "   CPU time           {:.3} s",
            seconds(self.total.cpu_ns)
        );
        let _ = writeln!(t, "   block I/O read     {}", bytes(self.total.read_bytes));
        let _ = writeln!(t, "   block I/O written  {}", bytes(self.total.write_bytes));
        let zones: BTreeSet<EnergyKey> = self.node_uj.keys().copied().collect();
        if zones.is_empty() {
            let _ = writeln!(t, "   energy             no meter (see `optimus check`)");
        }
        for key @ (zone, source) in &zones {
            let mine = self.total.energy_uj.get(key).copied().unwrap_or(0);
            let node = self.node_uj.get(key).copied().unwrap_or(0);
            let how = if *source == "estimated" {
                "estimated".to_owned()
            } else {
                format!("measured, {source}")
            };
            let _ = writeln!(
                t,
                "   energy {:<11} {:>10.3} J  of node {:.3} J ({how})",
                zone.label(),
                joules(mine),
                joules(node)
            );
        }
        if !zones.is_empty() {
            let node_total: u64 = self
                .node_uj
                .iter()
                .filter(|((z, _), _)| crate::sampler::energy::CARBON_ZONES.contains(z))
                .map(|(_, v)| v)
                .sum();
            let _ = writeln!(
                t,
                "   node total         {:.3} J (package + dram + gpu)",
                joules(node_total)
            );
        }
        match &self.carbon {
            Some(c) => {
                let _ = writeln!(
                    t,
                    "   carbon             {:.6} g CO2eq ({} {:.0} g/kWh, PUE {})",
                    self.total.carbon_ng as f64 / 1e9,
                    c.source,
                    c.g_per_kwh,
                    c.pue
                );
            }
            None => {
                let _ = writeln!(t, "   carbon             no intensity (--carbon-intensity, --electricitymaps-zone or --uk-grid)");
            }
        }
        let zone_cols: BTreeSet<Zone> = zones.iter().map(|(z, _)| *z).collect();
        let _ = write!(
            t,
            "\n   {:<20} {:>6} {:>10} {:>10} {:>10} {:>10}",
            "phase", "count", "wall s", "CPU s", "read", "written"
        );
        for z in &zone_cols {
            let _ = write!(t, " {:>11}", format!("{} J", z.label()));
        }
        if self.carbon.is_some() {
            let _ = write!(t, " {:>10}", "g CO2eq");
        }
        t.push('\n');
        for (name, p) in &self.totals {
            let _ = write!(
                t,
                "   {:<20} {:>6} {:>10.3} {:>10.3} {:>10} {:>10}",
                name,
                p.occurrences,
                seconds(p.wall_ns),
                seconds(p.usage.cpu_ns),
                bytes(p.usage.read_bytes),
                bytes(p.usage.write_bytes)
            );
            for z in &zone_cols {
                let j = zone_uj(&p.usage.energy_uj, *z).map_or(0.0, joules);
                let _ = write!(t, " {j:>11.3}");
            }
            if let Some(g) = self.grams(&p.usage) {
                let _ = write!(t, " {g:>10.6}");
            }
            t.push('\n');
        }
        if self.dropped > 0 {
            let _ = writeln!(
                t,
                "   ({} early occurrences are in the totals but not listed in --json/--csv)",
                self.dropped
            );
        }
        t
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn push_row(out: &mut String, cells: &[String]) {
    let quoted: Vec<String> = cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect();
    out.push_str(&quoted.join(","));
    out.push('\n');
}

/// `2026-12-01T13:05:09` in UTC (CodeCarbon's timestamp format).
pub fn iso_utc(unix_s: f64) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "seconds since 1970 fit in i64"
    )]
    let secs = unix_s.floor() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::phase::{parse_line, PhaseLedger};

    fn report(carbon: bool) -> Report {
        let s = 1_000_000_000u64;
        let cum = |cpu: u64, pkg: u64, dram: u64, g: u64| Usage {
            cpu_ns: cpu * s,
            read_bytes: 0,
            write_bytes: 4096 * cpu,
            energy_uj: BTreeMap::from([
                ((Zone::Package, "rapl-powercap"), pkg * 1_000_000),
                ((Zone::Dram, "rapl-powercap"), dram * 1_000_000),
            ]),
            carbon_ng: g,
        };
        let mut l = PhaseLedger::new(10 * s, Usage::default(), 100);
        l.observe(11 * s, &cum(1, 10, 1, 1_000));
        l.switch(11 * s, parse_line(b"train epoch=1").unwrap().unwrap());
        l.observe(15 * s, &cum(5, 50, 5, 5_000));
        l.switch(15 * s, parse_line(b"train epoch=2,b").unwrap().unwrap());
        l.observe(16 * s, &cum(6, 60, 6, 6_000));
        let mut occurrences: Vec<Occurrence> = l.history().iter().cloned().collect();
        occurrences.push(l.current().clone());
        Report {
            command: vec!["/usr/bin/python3".into(), "train.py".into()],
            exit: Exit::Code(0),
            start_unix_s: 1_764_594_000.0,
            origin_ns: 10 * s,
            wall_ns: 6 * s,
            total: l.total().usage,
            node_uj: BTreeMap::from([
                ((Zone::Package, "rapl-powercap"), 90_000_000),
                ((Zone::Dram, "rapl-powercap"), 9_000_000),
            ]),
            carbon: carbon.then_some(CarbonNote {
                source: "static",
                g_per_kwh: 300.0,
                pue: 1.0,
            }),
            occurrences,
            dropped: 0,
            totals: l.totals(),
            run_id: "5b1d2c3e-0000-4000-8000-000000000000".into(),
        }
    }

    #[test]
    fn json_has_the_contract_fields() {
        let v = report(true).json();
        assert_eq!(v["command"], json!(["/usr/bin/python3", "train.py"]));
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["wall_seconds"], 6.0);
        assert_eq!(v["cpu_seconds"], 6.0);
        assert_eq!(v["block_io_bytes"], json!({"read": 0, "write": 24576}));
        assert_eq!(v["energy_joules"], json!({"package": 60.0, "dram": 6.0}));
        assert_eq!(
            v["node_energy_joules"],
            json!({"package": 90.0, "dram": 9.0})
        );
        assert_eq!(v["energy_source"], "rapl-powercap");
        assert_eq!(v["carbon_grams"], 6e-6);
        let p = v["phases"].as_array().unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1]["name"], "train");
        assert_eq!(p[1]["labels"], json!({"epoch": "1"}));
        assert_eq!(p[1]["start_seconds"], 1.0);
        assert_eq!(p[1]["wall_seconds"], 4.0);
        assert_eq!(p[1]["cpu_seconds"], 4.0);
        assert_eq!(p[1]["energy_joules"]["package"], 40.0);
        assert_eq!(p[1]["carbon_grams"], 4e-6);
        for key in [
            "name",
            "labels",
            "start_seconds",
            "wall_seconds",
            "cpu_seconds",
            "block_io_bytes",
            "energy_joules",
            "carbon_grams",
        ] {
            assert!(p[0].get(key).is_some(), "{key}");
        }
        assert_eq!(report(false).json()["carbon_grams"], Value::Null);
        assert_eq!(
            report(false).json()["phases"][0]["carbon_grams"],
            Value::Null
        );
    }

    #[test]
    fn csv_has_codecarbon_columns_and_a_total_row() {
        let csv = report(true).csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "timestamp,project_name,run_id,duration,emissions,emissions_rate,cpu_energy,gpu_energy,ram_energy,energy_consumed,phase,epoch"
        );
        assert_eq!(lines.len(), 1 + 3 + 1);
        // train epoch=1: 40 J package, 4 J dram, 4 µg.
        let cells: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(cells[0], "2025-12-01T13:00:05");
        assert_eq!(cells[1], "python3");
        assert_eq!(cells[3], "4");
        assert!((cells[4].parse::<f64>().unwrap() - 4e-9).abs() < 1e-20);
        assert!((cells[6].parse::<f64>().unwrap() - 40.0 / 3.6e6).abs() < 1e-15);
        assert_eq!(cells[7], "", "no GPU meter: empty, never 0");
        assert!((cells[9].parse::<f64>().unwrap() - 44.0 / 3.6e6).abs() < 1e-15);
        assert_eq!(cells[10], "train");
        assert_eq!(cells[11], "1");
        assert!(lines[3].ends_with(",train,\"2,b\""), "{}", lines[3]);
        assert!(lines[4].contains(",(total),"), "{}", lines[4]);
    }

    #[test]
    fn table_lists_zones_and_phases() {
        let t = report(true).table();
        assert!(t.contains("energy package"), "{t}");
        assert!(t.contains("measured, rapl-powercap"), "{t}");
        assert!(t.contains("train"), "{t}");
        assert!(t.contains("g CO2eq"), "{t}");
        let killed = Report {
            exit: Exit::Signal(9),
            ..report(false)
        };
        assert_eq!(killed.exit.code(), 137);
        assert!(killed.table().contains("killed by signal 9"));
    }

    #[test]
    fn utc_timestamps() {
        assert_eq!(iso_utc(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso_utc(951_782_400.5), "2000-02-29T00:00:00");
        assert_eq!(iso_utc(1_764_594_000.0), "2025-12-01T13:00:00");
    }
}
