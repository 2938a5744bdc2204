//! The power model's error with a ground truth: the synthetic meter's one-second rows in;
//! the agent's own fitter run offline on them (`optimus model fit`, `optimus model score`)
//! over all rows (in-sample) and over all but one scenario's rows scored on that scenario
//! (leave-one-scenario-out) out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use optimus_tests::proc::run_ok;
use serde::{Deserialize, Serialize};

use super::meter::Row;
use super::scenarios::ScenarioRun;

const TIMEOUT: Duration = Duration::from_secs(120);

/// What `optimus model score` prints.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Score {
    pub rows: u64,
    /// Mean absolute percentage error (a ratio) over the rows with positive metered watts.
    pub mape: Option<f64>,
    /// Rows with a feature outside the model's trained range.
    pub extrapolated: u64,
    pub predicted_watts: Vec<f64>,
}

/// One scenario's model figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScenarioModel {
    pub rows: usize,
    /// The model fitted on every scenario, scored on this one's rows.
    pub mape_in_sample: Option<f64>,
    /// The model fitted on every other scenario, scored on this one's rows.
    pub mape_leave_one_out: Option<f64>,
    /// Rows of this scenario outside the range the leave-one-out model was trained on.
    pub extrapolated_leave_one_out: u64,
}

/// The offline fits.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelResults {
    /// One-second rows in all.
    pub rows: usize,
    /// The all-scenario fit: intercept (idle) and per-feature coefficients.
    pub intercept_watts: f64,
    pub coefficients: BTreeMap<String, f64>,
    /// Its MAPE over every row.
    pub mape_in_sample: Option<f64>,
    pub scenarios: BTreeMap<String, ScenarioModel>,
    /// Predicted watts of every row by the all-scenario fit (the model-fit plot).
    #[serde(skip)]
    pub predicted_watts: Vec<f64>,
}

/// A row with the watts a fit learns from it.
type Sample<'a> = (&'a Row, f64);

/// Which meter a fit learns: the synthetic one, or the real RAPL meter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Synthetic,
    Rapl,
}

impl Target {
    fn watts(self, r: &Row) -> Option<f64> {
        match self {
            Target::Synthetic => Some(r.watts),
            Target::Rapl => r.rapl_watts,
        }
    }
}

fn csv(rows: &[Sample<'_>]) -> String {
    let mut s = String::from("busy_cpus,busy_cpu_ghz,block_io_mb_per_second,watts\n");
    for (r, w) in rows {
        let _ = writeln!(
            s,
            "{},{},{},{w}",
            r.busy_cpus, r.busy_cpu_ghz, r.block_io_mb_per_second
        );
    }
    s
}

fn fit(bin: &Path, dir: &Path, name: &str, rows: &[Sample<'_>]) -> Result<std::path::PathBuf> {
    let samples = dir.join(format!("{name}.csv"));
    std::fs::write(&samples, csv(rows))
        .with_context(|| format!("writing {}", samples.display()))?;
    let model = dir.join(format!("{name}.json"));
    run_ok(
        Command::new(bin)
            .args(["model", "fit", "--samples"])
            .arg(&samples)
            .arg("--output")
            .arg(&model),
        TIMEOUT,
    )
    .context("optimus model fit")?;
    Ok(model)
}

fn score(bin: &Path, dir: &Path, model: &Path, name: &str, rows: &[Sample<'_>]) -> Result<Score> {
    let samples = dir.join(format!("{name}.csv"));
    std::fs::write(&samples, csv(rows))
        .with_context(|| format!("writing {}", samples.display()))?;
    let out = run_ok(
        Command::new(bin)
            .args(["model", "score", "--model"])
            .arg(model)
            .arg("--samples")
            .arg(&samples),
        TIMEOUT,
    )
    .context("optimus model score")?;
    serde_json::from_str(&out).with_context(|| format!("parsing optimus model score: {out}"))
}

/// Fits and scores against `target`'s watts; files go to `dir`.
pub fn analyse(
    bin: &Path,
    rows: &[Row],
    runs: &[ScenarioRun],
    dir: &Path,
    target: Target,
) -> Result<ModelResults> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let all: Vec<Sample<'_>> = rows
        .iter()
        .filter(|r| !r.scenario.is_empty())
        .filter_map(|r| Some((r, target.watts(r)?)))
        .collect();
    let model = fit(bin, dir, "all", &all)?;
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&model).with_context(|| format!("reading {}", model.display()))?,
    )
    .context("parsing the fitted model")?;
    let zone = &json["zones"][0];
    let mut results = ModelResults {
        rows: all.len(),
        intercept_watts: zone["intercept_watts"].as_f64().unwrap_or(f64::NAN),
        coefficients: zone["features"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| Some((f["name"].as_str()?.to_owned(), f["coefficient"].as_f64()?)))
            .collect(),
        ..ModelResults::default()
    };
    let everything = score(bin, dir, &model, "all-scored", &all)?;
    results.mape_in_sample = everything.mape;
    results.predicted_watts = everything.predicted_watts;
    for run in runs {
        let (mine, others): (Vec<Sample<'_>>, Vec<Sample<'_>>) =
            all.iter().partition(|(r, _)| r.scenario == run.name);
        let mut m = ScenarioModel {
            rows: mine.len(),
            ..ScenarioModel::default()
        };
        if !mine.is_empty() {
            m.mape_in_sample = score(bin, dir, &model, &format!("{}-in", run.name), &mine)?.mape;
            if !others.is_empty() {
                let held_out = fit(bin, dir, &format!("without-{}", run.name), &others)?;
                let s = score(bin, dir, &held_out, &format!("{}-out", run.name), &mine)?;
                m.mape_leave_one_out = s.mape;
                m.extrapolated_leave_one_out = s.extrapolated;
            }
        }
        results.scenarios.insert(run.name.clone(), m);
    }
    Ok(results)
}
