//! `optimus predict` and `optimus model show`: a model file and a load (busy CPUs, GPU
//! utilisation, block I/O) in; watts per zone and in total, or the file described, out.

use std::path::Path;
use std::process::ExitCode;

use super::file::{ModelFile, ZoneModel};
use super::meter::{predict, zone_of};
use super::package_number;
use crate::energy::Zone;

/// The load to price.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Load {
    /// Busy CPUs on the whole host (spread evenly over its packages).
    pub busy_cpus: f64,
    /// SM utilisation per GPU in index order, 0..=1 (GPUs not given: idle).
    pub gpu_util: Vec<f64>,
    /// Block I/O, MB/s; `None`: the mean it was trained on.
    pub io_mb_per_second: Option<f64>,
}

/// One zone's predicted power.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneWatts {
    pub zone: String,
    pub device: String,
    pub watts: f64,
    /// A feature was outside the trained range.
    pub extrapolated: bool,
}

fn mean_of(m: &ZoneModel, name: &str) -> Option<f64> {
    m.features.iter().find(|f| f.name == name)?.mean
}

/// `a / b` of two trained means (how a derived feature scales with the given one), `None`
/// when either is unknown or the denominator is zero.
fn ratio_of_means(m: &ZoneModel, num: &str, den: &str) -> Option<f64> {
    let (n, d) = (mean_of(m, num)?, mean_of(m, den)?);
    (d > 0.0).then(|| n / d)
}

/// Each zone's watts for `load`. Features the load does not give are derived from the
/// training means: busy-weighted GHz = busy CPUs × the trained GHz per busy CPU, GPU memory
/// utilisation = SM utilisation × the trained ratio, block I/O (when not given) = its
/// trained mean.
pub fn watts(file: &ModelFile, load: &Load) -> Vec<ZoneWatts> {
    let packages = file
        .zones
        .iter()
        .filter(|m| m.zone == "package")
        .count()
        .max(1);
    #[expect(clippy::cast_precision_loss, reason = "a handful of packages")]
    let per_package = load.busy_cpus / packages as f64;
    file.zones
        .iter()
        .filter_map(|m| {
            let x = match zone_of(m)? {
                Zone::Gpu => {
                    let i = m.device.strip_prefix("gpu-")?.parse::<usize>().ok()?;
                    let sm = load.gpu_util.get(i).copied().unwrap_or(0.0);
                    vec![
                        sm,
                        sm * ratio_of_means(m, "gpu_mem_util", "gpu_sm_util").unwrap_or(1.0),
                    ]
                }
                _ => {
                    package_number(&m.device)?;
                    let ghz = ratio_of_means(m, "busy_cpu_ghz", "busy_cpus").unwrap_or(0.0);
                    let io = load
                        .io_mb_per_second
                        .or_else(|| mean_of(m, "block_io_mb_per_second"))
                        .unwrap_or(0.0);
                    vec![per_package, per_package * ghz, io]
                }
            };
            let (watts, extrapolated) = predict(m, &x);
            Some(ZoneWatts {
                zone: m.zone.clone(),
                device: m.device.clone(),
                watts,
                extrapolated,
            })
        })
        .collect()
}

/// The text `optimus predict` prints.
pub fn render(zones: &[ZoneWatts]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for z in zones {
        let note = if z.extrapolated {
            "  (outside the trained range: extrapolated)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:>9.2} W{note}",
            z.zone, z.device, z.watts
        );
    }
    let total: f64 = zones.iter().map(|z| z.watts).sum();
    let _ = writeln!(out, "{:<19} {total:>9.2} W", "total");
    out
}

fn load_or_report(path: &Path) -> Option<ModelFile> {
    match ModelFile::load(path) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("error: {}", crate::energy::describe(&e));
            None
        }
    }
}

/// `optimus model show FILE`.
pub fn show_main(path: &Path) -> ExitCode {
    let Some(file) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    print!("{}", file.describe());
    ExitCode::SUCCESS
}

/// `optimus predict --model FILE ...`.
pub fn predict_main(path: &Path, load: &Load) -> ExitCode {
    let Some(file) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    if file.zones.is_empty() {
        eprintln!(
            "error: {} holds no trained zone: let the agent train it longer beside a meter",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    print!("{}", render(&watts(&file, load)));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::file::tests::sample_file;

    #[test]
    fn prices_a_load_and_flags_extrapolation() {
        let file = sample_file();
        let z = watts(
            &file,
            &Load {
                busy_cpus: 1.5,
                io_mb_per_second: Some(100.0),
                ..Load::default()
            },
        );
        // 10 W + 15 W × 1.5 + 0.01 W × 100 MB/s = 33.5 W (GHz coefficient 0).
        assert_eq!(z.len(), 1);
        assert!((z[0].watts - 33.5).abs() < 1e-9, "{z:?}");
        assert!(z[0].extrapolated, "100 MB/s is beyond the trained 0..2");
        let text = render(&z);
        assert!(text.contains("total"), "{text}");
        assert!(text.contains("33.50 W"), "{text}");
        let z = watts(
            &file,
            &Load {
                busy_cpus: 2.0,
                ..Load::default()
            },
        );
        // Block I/O not given: its trained mean, 1 MB/s (0.01 W).
        assert!((z[0].watts - 40.01).abs() < 1e-9, "{z:?}");
        assert!(!z[0].extrapolated);
    }
}
