//! The power model: each interval's features (busy CPUs, CPU frequency, block I/O, GPU
//! utilisation) and, where a real meter exists, its zone energy in; a per-zone online fit,
//! its live error, a versioned model file, and watts predicted where no meter exists out.
//!
//! One linear model per zone and device (`package` / `package-N`, `dram` / `package-N`,
//! `gpu` / `gpu-N`): `P = idle + Σ cᵢ·featureᵢ`, the intercept being the idle power,
//! fitted by [`rls::Rls`] (recursive least squares with a one-hour forgetting horizon and
//! Huber weights; the module says why). [`trainer::Trainer`] trains it beside a meter and
//! scores each interval's prediction *before* it learns from that interval (one-interval-
//! ahead, so the error is out of sample); [`file::ModelFile`] is what is saved under
//! `--state-dir`; [`meter::ModelMeter`] turns a model file into energy readings with
//! `source="model"` on a host without a meter.

pub mod features;
pub mod file;
pub mod forecast;
pub mod meter;
pub mod offline;
pub mod predict;
pub mod rls;
pub mod trainer;

use crate::energy::Zone;
pub use features::{FeatureReader, HostIdentity, Observation};
pub use file::{ModelError, ModelFile};

/// Features of the CPU zones (`package`, `dram`), in model order after the intercept.
pub const CPU_FEATURES: [&str; 3] = ["busy_cpus", "busy_cpu_ghz", "block_io_mb_per_second"];
/// Features of a GPU zone.
pub const GPU_FEATURES: [&str; 2] = ["gpu_sm_util", "gpu_mem_util"];

/// The unit of a feature, for `optimus model show`.
pub fn feature_unit(name: &str) -> &'static str {
    match name {
        "busy_cpus" => "CPUs",
        "busy_cpu_ghz" => "CPU·GHz",
        "block_io_mb_per_second" => "MB/s",
        "gpu_sm_util" | "gpu_mem_util" => "fraction",
        _ => "",
    }
}

/// The zones a model is fitted for.
pub fn modelled(zone: Zone) -> bool {
    matches!(zone, Zone::Package | Zone::Dram | Zone::Gpu)
}

/// The feature names of a zone.
pub fn feature_names(zone: Zone) -> &'static [&'static str] {
    if zone == Zone::Gpu {
        &GPU_FEATURES
    } else {
        &CPU_FEATURES
    }
}

/// The package number of a `package-N` device.
pub fn package_number(device: &str) -> Option<u32> {
    device.strip_prefix("package-")?.parse().ok()
}

/// A zone's feature values (without the intercept) from an observation; `None` when the
/// observation does not cover the zone's device.
pub fn features_of(zone: Zone, device: &str, obs: &Observation) -> Option<Vec<f64>> {
    if zone == Zone::Gpu {
        let (sm, mem) = obs.gpus.get(device)?;
        return Some(vec![*sm, *mem]);
    }
    let load = obs.packages.get(&package_number(device)?)?;
    Some(vec![
        load.busy_cpus,
        load.busy_cpu_ghz,
        obs.block_io_mb_per_second,
    ])
}

/// One zone's model state as exported.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneModelStatus {
    pub zone: Zone,
    pub device: String,
    /// Rolling MAPE of the one-interval-ahead prediction against the meter (training), or
    /// the model file's error where it was trained (prediction); `None` before the first
    /// scored interval.
    pub error_ratio: Option<f64>,
    /// Intervals the model learnt from.
    pub samples: u64,
    /// Intervals predicted with a feature outside the trained range (prediction only).
    pub extrapolated: Option<u64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use crate::cli::{Cli, Command};
    use crate::energy::{EnergyMeters, MeterSource, MeterState};
    use clap::Parser as _;
    use std::fs;
    use std::path::Path;

    /// A host without RAPL: `/proc/stat`, `cpuinfo` naming the CPU, no powercap tree.
    fn host(root: &Path, cpu: &str) {
        let proc_root = root.join("proc");
        fs::create_dir_all(proc_root.join("sys/kernel")).unwrap();
        fs::create_dir_all(root.join("sys")).unwrap();
        fs::write(
            proc_root.join("stat"),
            "cpu0 100 0 0 900 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0\n",
        )
        .unwrap();
        fs::write(
            proc_root.join("cpuinfo"),
            format!("processor\t: 0\nmodel name\t: {cpu}\n\n"),
        )
        .unwrap();
        fs::write(proc_root.join("sys/kernel/osrelease"), "6.18.0\n").unwrap();
    }

    fn meters(root: &Path, extra: &[&str]) -> EnergyMeters {
        let mut args = vec![
            "optimus".to_owned(),
            "check".to_owned(),
            "--proc-root".to_owned(),
            root.join("proc").display().to_string(),
            "--sys-root".to_owned(),
            root.join("sys").display().to_string(),
            "--no-nvml".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let Some(Command::Check(c)) = Cli::try_parse_from(args).unwrap().command else {
            unreachable!()
        };
        EnergyMeters::open(&c.energy.config(&c.host))
    }

    fn state(m: &EnergyMeters, source: MeterSource) -> Option<MeterState> {
        m.status()
            .iter()
            .find(|s| s.source == source)
            .map(|s| s.state)
    }

    #[test]
    fn a_refused_model_file_leaves_the_estimate_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        host(tmp.path(), "Test CPU @ 2.0GHz");
        let good = tmp.path().join("good.json");
        let mut file = super::file::tests::sample_file();
        file.save(&good).unwrap();
        let json = fs::read_to_string(&good).unwrap();

        let m = meters(tmp.path(), &["--power-model", good.to_str().unwrap()]);
        assert_eq!(state(&m, MeterSource::Model), Some(MeterState::Active));
        assert_eq!(
            state(&m, MeterSource::Estimated),
            Some(MeterState::Disabled)
        );

        let bad = [
            (
                "v9.json",
                json.replacen("\"version\": 1", "\"version\": 9", 1),
            ),
            ("cut.json", json[..json.len() - 40].to_owned()),
        ];
        for (name, text) in bad {
            let p = tmp.path().join(name);
            fs::write(&p, text).unwrap();
            let m = meters(tmp.path(), &["--power-model", p.to_str().unwrap()]);
            assert_eq!(state(&m, MeterSource::Model), None, "{name}");
            assert_eq!(
                state(&m, MeterSource::Estimated),
                Some(MeterState::Active),
                "{name}"
            );
        }

        file.host.cpu_model = "AMD EPYC 7763".into();
        let other = tmp.path().join("other.json");
        file.save(&other).unwrap();
        let m = meters(tmp.path(), &["--power-model", other.to_str().unwrap()]);
        assert_eq!(state(&m, MeterSource::Estimated), Some(MeterState::Active));
        let m = meters(
            tmp.path(),
            &[
                "--power-model",
                other.to_str().unwrap(),
                "--power-model-any-cpu",
            ],
        );
        assert_eq!(state(&m, MeterSource::Model), Some(MeterState::Active));
    }
}
