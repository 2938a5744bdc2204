//! The agent's fitter run offline, for `cargo xtask validate` (held-out scores need a fit on
//! chosen rows): a CSV of recorded intervals (`busy_cpus, busy_cpu_ghz,
//! block_io_mb_per_second, watts`, one row per interval) in; a model file of one
//! `package`/`package-0` zone (`optimus model fit`), or a JSON score of a model on such rows
//! (`optimus model score`) out.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::file::ModelFile;
use super::meter::predict;
use super::trainer::{Trainer, ZoneFit, HORIZON};
use super::{HostIdentity, CPU_FEATURES};
use crate::energy::Zone;

/// Rows read from a file at most (a day of one-second intervals).
const MAX_ROWS: usize = 86_400;
/// A samples file larger than this is refused before it is read.
const MAX_BYTES: u64 = 16 << 20;

/// The rows of a samples file: features in [`CPU_FEATURES`] order, then watts. Columns are
/// found by header name (others ignored); a row that is not all finite numbers is an error.
pub fn read_samples(path: &Path) -> Result<Vec<(Vec<f64>, f64)>, String> {
    let shown = path.display();
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .len();
    if size > MAX_BYTES {
        return Err(format!(
            "{shown} is {size} bytes, over the {MAX_BYTES}-byte limit"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{shown} is empty"))?
        .split(',')
        .map(str::trim)
        .collect();
    let column = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            format!(
                "{shown} has no {name} column (header: {})",
                header.join(",")
            )
        })
    };
    let features: Vec<usize> = CPU_FEATURES
        .iter()
        .map(|n| column(n))
        .collect::<Result<_, _>>()?;
    let watts = column("watts")?;
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        if rows.len() == MAX_ROWS {
            return Err(format!("{shown} has more than {MAX_ROWS} rows"));
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |c: usize| {
            cells
                .get(c)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    format!(
                        "{shown} row {}: not a finite number in column {}",
                        i + 2,
                        c + 1
                    )
                })
        };
        let x = features.iter().map(|&c| num(c)).collect::<Result<_, _>>()?;
        rows.push((x, num(watts)?));
    }
    Ok(rows)
}

/// A model file of the `package-0` zone fitted on `rows` in order (one interval each), the
/// way the agent trains it (same forgetting, robust weights and one-interval-ahead error).
pub fn fit(rows: &[(Vec<f64>, f64)], host: HostIdentity, interval: Duration) -> ModelFile {
    let horizon = HORIZON.as_secs_f64() / interval.as_secs_f64().max(1e-3);
    let mut zone = ZoneFit::new(Zone::Package, super::rls::Rls::lambda_for(horizon));
    for (x, w) in rows {
        zone.observe(x, *w);
    }
    let mut file = Trainer::new(host, interval, None).to_file();
    file.zones = vec![zone.to_model("package-0")];
    file
}

/// A model's score on rows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Score {
    pub rows: usize,
    /// Mean |predicted − metered| / metered over rows with positive metered watts.
    pub mape: Option<f64>,
    /// Rows with a feature outside the trained range (still predicted).
    pub extrapolated: usize,
    pub predicted_watts: Vec<f64>,
}

/// Scores the file's `package` zone (the first one) on `rows`.
pub fn score(file: &ModelFile, rows: &[(Vec<f64>, f64)]) -> Option<Score> {
    let m = file.zones.iter().find(|z| z.zone == "package")?;
    let mut errors = Vec::new();
    let mut extrapolated = 0;
    let mut predicted_watts = Vec::with_capacity(rows.len());
    for (x, w) in rows {
        let (p, outside) = predict(m, x);
        extrapolated += usize::from(outside);
        if *w > 0.0 {
            errors.push((p - w).abs() / w);
        }
        predicted_watts.push(p);
    }
    #[expect(clippy::cast_precision_loss, reason = "at most MAX_ROWS values")]
    let mape = (!errors.is_empty()).then(|| errors.iter().sum::<f64>() / errors.len() as f64);
    Some(Score {
        rows: rows.len(),
        mape,
        extrapolated,
        predicted_watts,
    })
}

/// `optimus model fit --samples CSV --output FILE`.
pub fn fit_main(samples: &Path, output: &Path, interval: Duration) -> ExitCode {
    let rows = match read_samples(samples) {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => {
            eprintln!("error: {} has a header but no rows", samples.display());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let file = fit(&rows, HostIdentity::detect(Path::new("/proc")), interval);
    if let Err(e) = file.save(output) {
        eprintln!("error: {}", crate::energy::describe(&e));
        return ExitCode::FAILURE;
    }
    println!("fitted {} rows into {}", rows.len(), output.display());
    ExitCode::SUCCESS
}

/// `optimus model score --model FILE --samples CSV`: the score as JSON on stdout.
pub fn score_main(model: &Path, samples: &Path) -> ExitCode {
    let file = match ModelFile::load(model) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {}", crate::energy::describe(&e));
            return ExitCode::FAILURE;
        }
    };
    let rows = match read_samples(samples) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(s) = score(&file, &rows) else {
        eprintln!("error: {} has no package zone to score", model.display());
        return ExitCode::FAILURE;
    };
    match serde_json::to_string(&s) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: encoding the score: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use super::*;

    fn host() -> HostIdentity {
        HostIdentity {
            cpu_model: "Test CPU".into(),
            cpus: 2,
            kernel: "6.18".into(),
        }
    }

    #[test]
    fn fits_recorded_rows_and_scores_them() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("rows.csv");
        let mut text =
            String::from("scenario,busy_cpus,busy_cpu_ghz,block_io_mb_per_second,watts\n");
        for i in 0..400 {
            let b = f64::from(i % 21) / 10.0;
            let io = f64::from(i % 7);
            text.push_str(&format!("s,{b},0,{io},{}\n", 5.0 + 8.0 * b + 0.1 * io));
        }
        std::fs::write(&csv, text).unwrap();
        let rows = read_samples(&csv).unwrap();
        assert_eq!(rows.len(), 400);
        let file = fit(&rows, host(), Duration::from_secs(1));
        let m = &file.zones[0];
        assert!((m.intercept_watts - 5.0).abs() < 0.05, "{m:?}");
        assert!((m.features[0].coefficient - 8.0).abs() < 0.05, "{m:?}");
        let s = score(&file, &rows).unwrap();
        assert!(s.mape.unwrap() < 1e-3, "{s:?}");
        assert_eq!(s.extrapolated, 0);
        let outside = score(&file, &[(vec![3.0, 0.0, 0.0], 29.0)]).unwrap();
        assert_eq!(outside.extrapolated, 1);
    }

    #[test]
    fn a_fit_with_a_negative_idle_is_flagged() {
        // A host kept near saturation whose power rises steeply there: the line through
        // 1.9 … 2.0 busy CPUs crosses 0 W above zero load.
        let rows: Vec<(Vec<f64>, f64)> = (0..200)
            .map(|i| {
                let b = 1.9 + f64::from(i % 11) / 100.0;
                (vec![b, 0.0, 0.0], -10.0 + 15.0 * b)
            })
            .collect();
        let m = &fit(&rows, host(), Duration::from_secs(1)).zones[0];
        assert!(m.intercept_watts < 0.0, "{m:?}");
        assert!(m.negative_intercept);
        let good = &fit(
            &[(vec![1.0, 0.0, 0.0], 20.0)],
            host(),
            Duration::from_secs(1),
        )
        .zones[0];
        assert_eq!(good.negative_intercept, good.intercept_watts < 0.0);
    }

    #[test]
    fn refuses_bad_samples_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.csv");
        std::fs::write(&p, "busy_cpus,watts\n1,2\n").unwrap();
        let e = read_samples(&p).unwrap_err();
        assert!(e.contains("no busy_cpu_ghz column"), "{e}");
        std::fs::write(
            &p,
            "busy_cpus,busy_cpu_ghz,block_io_mb_per_second,watts\n1,0,0,NaN\n",
        )
        .unwrap();
        let e = read_samples(&p).unwrap_err();
        assert!(e.contains("row 2") && !e.contains('\n'), "{e}");
    }
}
