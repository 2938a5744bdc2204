//! The run's windows and model fits in; per-scenario figures, `report.json` (field names
//! documented here and in the README, stable) and `report.md` out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::meter;
use super::model::ModelResults;
use super::probe::ratio;
use super::rapl::Rapl;
use super::scenarios::ScenarioRun;
use super::Plan;

/// The JSON's `format` and `version`: bump the version when a field changes meaning.
pub const FORMAT: &str = "optimus-validate";
pub const VERSION: u32 = 1;

/// Every figure of a scenario; `null` where it does not apply, with the reason in
/// `not_applicable`.
pub const FIGURES: [&str; 13] = [
    "cpu_error_ratio",
    "cpu_error_seconds_max",
    "io_error_ratio",
    "conservation_residual_joules_max",
    "share_error_mean",
    "energy_error_ratio",
    "rule_error_ratio",
    "model_mape_in_sample",
    "model_mape_leave_one_out",
    "forecast_error_ratio",
    "agent_cpu_ratio",
    "agent_rss_bytes",
    "agent_peak_rss_bytes",
];

/// The host the run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub rapl: Rapl,
}

impl Host {
    /// This host; its RAPL meter looked for under `rapl_root`.
    pub fn detect(rapl_root: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            rapl: super::rapl::detect(rapl_root),
        }
    }
}

/// One scenario's figures (see [`FIGURES`]).
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    /// Σ|exported − schedstat| / Σ schedstat of the VMs' CPU seconds over the windows where
    /// the VM ran at least [`CPU_RAN_SECONDS`].
    pub cpu_error_ratio: Option<f64>,
    /// The largest |exported − schedstat| of one VM in one window, seconds.
    pub cpu_error_seconds_max: f64,
    /// Σ|exported − /proc/<pid>/io| / Σ /proc/<pid>/io bytes, reads and writes.
    pub io_error_ratio: Option<f64>,
    /// The largest |node − Σ VMs − host − idle| of the package totals at a window's end, J.
    pub conservation_residual_joules_max: f64,
    /// Mean |share exported − share truth| of a VM in the node's energy (a ratio).
    pub share_error_mean: Option<f64>,
    /// Σ|VM energy exported − truth| / Σ truth: the split rule's error.
    pub energy_error_ratio: Option<f64>,
    /// Σ|VM energy exported − Optimus' rule on the oracles| / Σ rule: the implementation's.
    pub rule_error_ratio: Option<f64>,
    /// The offline model's MAPE on this scenario's one-second rows: fitted on every
    /// scenario, and on every other scenario.
    pub model_mape_in_sample: Option<f64>,
    pub model_mape_leave_one_out: Option<f64>,
    /// Mean |forecast at a window's start − mean power over the window| / mean power.
    pub forecast_error_ratio: Option<f64>,
    /// The agent's CPU seconds / wall seconds, its RSS and peak RSS, bytes.
    pub agent_cpu_ratio: f64,
    pub agent_rss_bytes: u64,
    pub agent_peak_rss_bytes: u64,
    /// Why a `null` figure does not apply.
    pub not_applicable: BTreeMap<String, String>,
}

/// VM-windows under this many schedstat CPU-seconds (a paused or idle guest) stay out of
/// `cpu_error_ratio`: a few milliseconds of alignment would dominate their ratio (their
/// absolute error is in `cpu_error_seconds_max`).
pub const CPU_RAN_SECONDS: f64 = 0.25;

/// Below this a VM's mean power is too small for a relative forecast error (a paused guest).
const FORECAST_MIN_WATTS: f64 = 0.05;

impl Figures {
    fn of(run: &ScenarioRun, model: &ModelResults) -> Self {
        let vms = || run.windows.iter().flat_map(|w| &w.vms);
        let ran = || vms().filter(|v| v.cpu_seconds_schedstat >= CPU_RAN_SECONDS);
        let sched: f64 = ran().map(|v| v.cpu_seconds_schedstat).sum();
        let cpu_abs: f64 = ran()
            .map(|v| (v.cpu_seconds_exported - v.cpu_seconds_schedstat).abs())
            .sum();
        let cpu_max = vms()
            .map(|v| (v.cpu_seconds_exported - v.cpu_seconds_schedstat).abs())
            .fold(0.0, f64::max);
        let io_truth: f64 = vms()
            .map(|v| v.io_read_bytes_proc + v.io_write_bytes_proc)
            .sum();
        let io_abs: f64 = vms()
            .map(|v| {
                (v.io_read_bytes_exported - v.io_read_bytes_proc).abs()
                    + (v.io_write_bytes_exported - v.io_write_bytes_proc).abs()
            })
            .sum();
        let n_vm = vms().count();
        #[expect(clippy::cast_precision_loss, reason = "a few windows")]
        let shares = (n_vm > 0).then(|| {
            vms()
                .map(|v| (v.share_exported - v.share_truth).abs())
                .sum::<f64>()
                / n_vm as f64
        });
        let e_truth: f64 = vms().map(|v| v.energy_joules_truth).sum();
        let e_abs: f64 = vms()
            .map(|v| (v.energy_joules_exported - v.energy_joules_truth).abs())
            .sum();
        let e_rule: f64 = vms().map(|v| v.energy_joules_rule).sum();
        let rule_abs: f64 = vms()
            .map(|v| (v.energy_joules_exported - v.energy_joules_rule).abs())
            .sum();
        let forecasts: Vec<f64> = vms()
            .filter(|v| v.power_watts >= FORECAST_MIN_WATTS)
            .filter_map(|v| Some((v.forecast_watts? - v.power_watts).abs() / v.power_watts))
            .collect();
        #[expect(clippy::cast_precision_loss, reason = "a few windows")]
        let forecast =
            (!forecasts.is_empty()).then(|| forecasts.iter().sum::<f64>() / forecasts.len() as f64);
        let m = model.scenarios.get(&run.name);
        let mut na = BTreeMap::new();
        let mut need = |v: Option<f64>, name: &str, why: &str| {
            if v.is_none() {
                na.insert(name.to_owned(), why.to_owned());
            }
            v
        };
        Self {
            cpu_error_ratio: need(
                (sched > 0.0).then(|| cpu_abs / sched),
                "cpu_error_ratio",
                "no VM ran 0.25 CPU-seconds in a window",
            ),
            cpu_error_seconds_max: cpu_max,
            io_error_ratio: need(
                (io_truth >= 1e6).then(|| io_abs / io_truth),
                "io_error_ratio",
                "the scenario does no guest disk I/O (under 1 MB in /proc/<pid>/io)",
            ),
            conservation_residual_joules_max: run
                .windows
                .iter()
                .map(|w| w.conservation_residual_joules.abs())
                .fold(0.0, f64::max),
            share_error_mean: need(shares, "share_error_mean", "no VM in its windows"),
            energy_error_ratio: need(
                (e_truth > 0.0).then(|| ratio(e_abs, e_truth)),
                "energy_error_ratio",
                "no VM energy above idle in its windows",
            ),
            rule_error_ratio: need(
                (e_rule > 0.0).then(|| ratio(rule_abs, e_rule)),
                "rule_error_ratio",
                "no VM energy in its windows",
            ),
            model_mape_in_sample: need(
                m.and_then(|m| m.mape_in_sample),
                "model_mape_in_sample",
                "no one-second meter rows in this scenario",
            ),
            model_mape_leave_one_out: need(
                m.and_then(|m| m.mape_leave_one_out),
                "model_mape_leave_one_out",
                "no rows in this scenario or in the others",
            ),
            forecast_error_ratio: need(
                forecast,
                "forecast_error_ratio",
                "no VM with a forecast drew power in a window",
            ),
            agent_cpu_ratio: run.agent_cpu_ratio,
            agent_rss_bytes: run.agent_rss_bytes,
            agent_peak_rss_bytes: run.agent_peak_rss_bytes,
            not_applicable: na,
        }
    }
}

/// One scenario in the report: its measurements and figures.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    #[serde(flatten)]
    pub run: ScenarioRun,
    pub figures: Figures,
}

/// The synthetic meter, as the report states it.
#[derive(Clone, Debug, Serialize)]
pub struct MeterInfo {
    pub kind: &'static str,
    pub function: &'static str,
    pub idle_watts: f64,
}

/// The estimate's and the model's error against a real RAPL meter.
#[derive(Clone, Debug, Serialize)]
pub struct RaplComparison {
    /// Σ|estimated − RAPL| / Σ RAPL package joules over every window.
    pub estimate_error_ratio: Option<f64>,
    /// The model fitted on the real meter's one-second rows, over all of them.
    pub model_mape_in_sample: Option<f64>,
    pub model_intercept_watts: f64,
    pub model_coefficients: BTreeMap<String, f64>,
    pub scenarios: BTreeMap<String, RaplScenario>,
}

/// One scenario against the real meter.
#[derive(Clone, Debug, Serialize)]
pub struct RaplScenario {
    pub estimate_error_ratio: Option<f64>,
    pub model_mape_in_sample: Option<f64>,
    pub model_mape_leave_one_out: Option<f64>,
}

/// Σ|estimate − RAPL| / Σ RAPL over `windows`.
fn estimate_error<'a>(windows: impl Iterator<Item = &'a super::probe::Window>) -> Option<f64> {
    let (mut abs, mut total) = (0.0, 0.0);
    for w in windows {
        if let (Some(r), Some(e)) = (w.rapl_joules, w.estimate_joules) {
            abs += (e - r).abs();
            total += r;
        }
    }
    (total > 0.0).then(|| abs / total)
}

impl RaplComparison {
    fn of(runs: &[ScenarioRun], m: &ModelResults) -> Self {
        Self {
            estimate_error_ratio: estimate_error(runs.iter().flat_map(|r| &r.windows)),
            model_mape_in_sample: m.mape_in_sample,
            model_intercept_watts: m.intercept_watts,
            model_coefficients: m.coefficients.clone(),
            scenarios: runs
                .iter()
                .map(|r| {
                    let s = m.scenarios.get(&r.name);
                    (
                        r.name.clone(),
                        RaplScenario {
                            estimate_error_ratio: estimate_error(r.windows.iter()),
                            model_mape_in_sample: s.and_then(|s| s.mape_in_sample),
                            model_mape_leave_one_out: s.and_then(|s| s.mape_leave_one_out),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub version: u32,
    pub mode: &'static str,
    pub plan: Plan,
    pub generated_at: String,
    pub duration_seconds: f64,
    pub host: Host,
    pub meter: MeterInfo,
    /// The agent's live one-interval-ahead MAPE beside the synthetic meter at the end.
    pub model_live_error_ratio: Option<f64>,
    pub model: ModelResults,
    /// Against a real RAPL meter; `null` where there is none (the reason in
    /// `rapl_comparison_detail`).
    pub rapl_comparison: Option<RaplComparison>,
    pub rapl_comparison_detail: String,
    pub scenarios: Vec<Scenario>,
}

impl Report {
    pub fn new(
        plan: &Plan,
        host: Host,
        runs: Vec<ScenarioRun>,
        model: ModelResults,
        rapl_model: Option<&ModelResults>,
        live: Option<f64>,
        took: Duration,
    ) -> Self {
        let (rapl_comparison, detail) = match rapl_model {
            Some(m) if host.rapl.present => (
                Some(RaplComparison::of(&runs, m)),
                format!(
                    "a real RAPL meter ({}): the estimate (a second agent without it) and the model fitted on its one-second rows are compared with it in rapl_comparison",
                    host.rapl.detail
                ),
            ),
            _ => (
                None,
                format!(
                    "none on this host ({}); the estimate's and the model's error against a real meter cannot be measured here, and every energy figure is against the synthetic meter",
                    host.rapl.detail
                ),
            ),
        };
        let scenarios = runs
            .into_iter()
            .map(|run| Scenario {
                figures: Figures::of(&run, &model),
                run,
            })
            .collect();
        Self {
            format: FORMAT,
            version: VERSION,
            mode: plan.name,
            plan: plan.clone(),
            generated_at: now_utc(),
            duration_seconds: took.as_secs_f64(),
            host,
            meter: MeterInfo {
                kind: "synthetic powercap (fixture tree, advanced every 50 ms)",
                function: meter::FUNCTION,
                idle_watts: meter::IDLE_WATTS,
            },
            model_live_error_ratio: live,
            model,
            rapl_comparison,
            rapl_comparison_detail: detail,
            scenarios,
        }
    }

    pub fn write(&self, json: &Path, md: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("encoding the report")?;
        std::fs::write(json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(md, self.markdown()).with_context(|| format!("writing {}", md.display()))
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Optimus validation report ({} run)\n", self.mode);
        let _ = writeln!(
            s,
            "Generated {} in {:.0} s on {} ({} CPUs, kernel {}).\n",
            self.generated_at,
            self.duration_seconds,
            self.host.cpu_model,
            self.host.cpus,
            self.host.kernel
        );
        let _ = writeln!(
            s,
            "Meter: {}: `{}`.\n",
            self.meter.kind, self.meter.function
        );
        let _ = writeln!(s, "Real RAPL: {}.\n", self.rapl_comparison_detail);
        if let Some(r) = &self.rapl_comparison {
            let _ = writeln!(
                s,
                "Against the real meter: estimate error {}, model MAPE in-sample {} (idle {:.3} W).\n\n| scenario | estimate err | model MAPE in / LOSO |\n|---|---|---|",
                pct(r.estimate_error_ratio),
                pct(r.model_mape_in_sample),
                r.model_intercept_watts
            );
            for (name, sc) in &r.scenarios {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} / {} |",
                    pct(sc.estimate_error_ratio),
                    pct(sc.model_mape_in_sample),
                    pct(sc.model_mape_leave_one_out)
                );
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "| scenario | CPU err | max CPU err (s) | I/O err | conservation (J) | share err | VM energy err vs truth / vs rule | model MAPE in / LOSO | forecast err | agent CPU | agent RSS (MiB) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for sc in &self.scenarios {
            let f = &sc.figures;
            let _ = writeln!(
                s,
                "| {} ({}) | {} | {:.3} | {} | {:.1e} | {} | {} / {} | {} / {} | {} | {:.2} % | {:.1} |",
                sc.run.name,
                sc.run.kind,
                pct(f.cpu_error_ratio),
                f.cpu_error_seconds_max,
                pct(f.io_error_ratio),
                f.conservation_residual_joules_max,
                pct(f.share_error_mean),
                pct(f.energy_error_ratio),
                pct(f.rule_error_ratio),
                pct(f.model_mape_in_sample),
                pct(f.model_mape_leave_one_out),
                pct(f.forecast_error_ratio),
                f.agent_cpu_ratio * 100.0,
                mib(f.agent_rss_bytes),
            );
        }
        let m = &self.model;
        let _ = writeln!(
            s,
            "\nPower model fitted offline on all {} one-second rows: idle {:.3} W, {}; in-sample MAPE {}. Live one-interval-ahead MAPE of the agent beside the meter: {}.\n",
            m.rows,
            m.intercept_watts,
            m.coefficients
                .iter()
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            pct(m.mape_in_sample),
            pct(self.model_live_error_ratio),
        );
        for sc in &self.scenarios {
            let _ = writeln!(
                s,
                "## {} ({}): {}\n",
                sc.run.name, sc.run.kind, sc.run.description
            );
            let _ = writeln!(s, "{:.1} s. ", sc.run.duration_seconds);
            if let Some(c) = &sc.run.churn {
                let _ = writeln!(
                    s,
                    "{} started, {} exported, {} removed; slowest discovery {:.1} s, slowest removal {:.1} s.\n",
                    c.vms_started, c.vms_discovered, c.vms_removed, c.discovery_seconds_max, c.removal_seconds_max
                );
            }
            let _ = writeln!(s, "| window | busy CPUs | VM | CPU s exported / schedstat | VM J exported / truth | share exported / truth | I/O MB exported / proc |");
            let _ = writeln!(s, "|---|---|---|---|---|---|---|");
            for w in &sc.run.windows {
                for v in &w.vms {
                    let _ = writeln!(
                        s,
                        "| {} | {:.2} | {} | {:.3} / {:.3} | {:.2} / {:.2} | {:.3} / {:.3} | {:.1} / {:.1} |",
                        w.label,
                        w.busy_cpus,
                        v.vm_name,
                        v.cpu_seconds_exported,
                        v.cpu_seconds_schedstat,
                        v.energy_joules_exported,
                        v.energy_joules_truth,
                        v.share_exported,
                        v.share_truth,
                        (v.io_read_bytes_exported + v.io_write_bytes_exported) / 1e6,
                        (v.io_read_bytes_proc + v.io_write_bytes_proc) / 1e6,
                    );
                }
                if w.vms.is_empty() {
                    let _ = writeln!(s, "| {} | {:.2} | (none) | | | | |", w.label, w.busy_cpus);
                }
            }
            for (k, why) in &sc.figures.not_applicable {
                let _ = writeln!(s, "\n`{k}`: not applicable: {why}.");
            }
            s.push('\n');
        }
        s.push_str(HOW_TO_READ);
        s
    }
}

const HOW_TO_READ: &str = "## How to read it\n\n\
- *CPU err*: the agent's per-VM CPU seconds against the kernel's schedstat of the same QEMU threads over the same window.\n\
- *I/O err*: the VM's exported block I/O bytes against `/proc/<pid>/io` of its QEMU.\n\
- *conservation*: node − VMs − host − idle of the package totals (rounding only).\n\
- *VM energy err vs rule*: the exported VM energy against Optimus' own rule (the meter's energy × the VM's schedstat CPU time / (CPUs × window)) computed from the oracles: the implementation's error.\n\
- *share err* and *VM energy err vs truth*: against the ground truth, the meter's energy above idle, `P(b) − P(0)`, split by schedstat CPU time. Optimus splits the whole energy by its active fraction (busy / CPUs), which is exact only when power is proportional to load: the gap is the cost of that rule on a meter with idle power and a convex curve.\n\
- *model MAPE*: the agent's fitter (`optimus model fit`) on the meter's one-second rows, scored on a scenario's rows when fitted on every scenario (in) and on every other one (LOSO).\n\
- *forecast err*: a VM's 1 h forecast at a window's start against its mean power over that window (a short run is in the recent-mean fallback).\n\
- *agent CPU*: the agent's CPU time over the scenario's wall time; RSS at its end.\n\n\
Plots: `exported_vs_truth.png`, `error_cdf.png`, `model_fit.png`.\n";

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{:.2} %", v * 100.0))
}

#[expect(clippy::cast_precision_loss, reason = "a process's memory")]
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// RFC 3339 UTC, seconds (from `date`, which knows the calendar).
fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}
