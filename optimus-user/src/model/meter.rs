//! Energy from a model file where no meter exists: each interval's features in; zone
//! readings labelled `source="model"` and how often a feature left the trained range out.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::file::{ModelFile, ZoneModel};
use super::{features_of, FeatureReader, Observation, ZoneModelStatus};
use crate::energy::{round_to_u64, MeterSource, Zone, ZoneKey, ZoneReading};

/// Watts of one zone model for feature values `x` (no intercept), never negative, and
/// whether any feature lay outside the trained range.
pub fn predict(m: &ZoneModel, x: &[f64]) -> (f64, bool) {
    let mut watts = m.intercept_watts;
    let mut outside = false;
    for (f, v) in m.features.iter().zip(x) {
        watts += f.coefficient * v;
        // A small slack: a busy ratio of 2.0000001 on a 2-CPU host is not extrapolation.
        let slack = 1e-6 * f.max.unwrap_or(0.0).abs().max(1.0);
        match (f.min, f.max) {
            (Some(lo), Some(hi)) => outside |= *v < lo - slack || *v > hi + slack,
            _ => outside |= v.abs() > 0.0,
        }
    }
    (watts.max(0.0), outside)
}

/// The zone of a model entry (`package`, `dram`, `gpu`).
pub fn zone_of(m: &ZoneModel) -> Option<Zone> {
    [Zone::Package, Zone::Dram, Zone::Gpu]
        .into_iter()
        .find(|z| z.label() == m.zone)
}

/// The modelling meter: predicts the CPU zones (`package`, `dram`) of a model file.
#[derive(Debug)]
pub struct ModelMeter {
    file: ModelFile,
    reader: FeatureReader,
    totals: BTreeMap<(Zone, String), u64>,
    extrapolated: BTreeMap<(Zone, String), u64>,
}

impl ModelMeter {
    /// A meter for `file`, reading features under the host roots; takes its baseline now.
    pub fn new(
        file: ModelFile,
        proc_root: &Path,
        sys_root: &Path,
        cpu_package: &[u32],
        now: Instant,
    ) -> Self {
        let mut reader = FeatureReader::new(proc_root, sys_root, cpu_package);
        let _ = reader.read(now);
        let keys: Vec<(Zone, String)> = file
            .zones
            .iter()
            .filter_map(|m| Some((zone_of(m)?, m.device.clone())))
            .filter(|(z, _)| *z != Zone::Gpu)
            .collect();
        Self {
            totals: keys.iter().map(|k| (k.clone(), 0)).collect(),
            extrapolated: keys.into_iter().map(|k| (k, 0)).collect(),
            file,
            reader,
        }
    }

    /// One line for `optimus check` and the log.
    pub fn describe(&self, path: &Path) -> String {
        let zones: Vec<String> = self
            .file
            .zones
            .iter()
            .filter(|m| m.zone != "gpu")
            .map(|m| {
                let e = m.error_ratio.map_or_else(
                    || "unscored".to_owned(),
                    |e| format!("{:.1} % MAPE", e * 100.0),
                );
                let clamped = if m.negative_intercept {
                    "; fitted idle below 0 W, predictions clamped at 0 W"
                } else {
                    ""
                };
                format!(
                    "{} {} ({} samples, {e}{clamped})",
                    m.zone, m.device, m.samples
                )
            })
            .collect();
        format!(
            "no RAPL meter: CPU power predicted by the power model {} trained on {} ({} CPUs, kernel {}), saved {}: {}",
            path.display(),
            self.file.host.cpu_model,
            self.file.host.cpus,
            self.file.host.kernel,
            self.file.saved_at,
            zones.join(", ")
        )
    }

    /// Predicts each zone's energy since the previous call; unavailable (not 0 W) when the
    /// features cannot be read.
    pub fn sample(&mut self, now: Instant, interval_s: f64) -> Vec<ZoneReading> {
        let obs = self.reader.read(now);
        self.readings(obs.as_ref(), interval_s)
    }

    fn readings(&mut self, obs: Option<&Observation>, interval_s: f64) -> Vec<ZoneReading> {
        let mut out = Vec::new();
        for m in &self.file.zones {
            let Some(zone) = zone_of(m).filter(|z| *z != Zone::Gpu) else {
                continue;
            };
            let key = (zone, m.device.clone());
            let delta = obs.and_then(|o| features_of(zone, &m.device, o)).map(|x| {
                let (watts, outside) = predict(m, &x);
                if outside {
                    *self.extrapolated.entry(key.clone()).or_default() += 1;
                }
                round_to_u64(watts * interval_s * 1e6)
            });
            let total = self.totals.entry(key).or_default();
            if let Some(d) = delta {
                *total = total.saturating_add(d);
            }
            out.push(ZoneReading {
                key: ZoneKey::new(zone, m.device.clone(), MeterSource::Model),
                total_uj: delta.map(|_| *total),
                delta_uj: delta,
                wraps: 0,
                glitches: 0,
            });
        }
        out
    }

    /// Each predicted zone: the error where it was trained, its samples and how often it
    /// extrapolated here.
    pub fn status(&self) -> Vec<ZoneModelStatus> {
        self.file
            .zones
            .iter()
            .filter_map(|m| {
                let zone = zone_of(m).filter(|z| *z != Zone::Gpu)?;
                Some(ZoneModelStatus {
                    zone,
                    device: m.device.clone(),
                    error_ratio: m.error_ratio,
                    samples: m.samples,
                    extrapolated: Some(
                        self.extrapolated
                            .get(&(zone, m.device.clone()))
                            .copied()
                            .unwrap_or(0),
                    ),
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use super::*;
    use crate::model::features::PackageLoad;
    use crate::model::file::tests::sample_file;

    #[test]
    fn predicts_model_energy_and_counts_extrapolation() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = ModelMeter::new(
            sample_file(),
            tmp.path(),
            tmp.path(),
            &[0, 0],
            Instant::now(),
        );
        let obs = |busy: f64| Observation {
            packages: BTreeMap::from([(
                0,
                PackageLoad {
                    busy_cpus: busy,
                    ..PackageLoad::default()
                },
            )]),
            ..Observation::default()
        };
        // 10 W idle + 15 W per busy CPU: 1.5 busy CPUs for 2 s = 65 J.
        let r = m.readings(Some(&obs(1.5)), 2.0);
        assert_eq!(r[0].key.source, MeterSource::Model);
        assert_eq!(r[0].delta_uj, Some(65_000_000));
        assert_eq!(m.status()[0].extrapolated, Some(0));
        // 3 busy CPUs is outside the trained 0..2: still predicted (55 W), and counted.
        let r = m.readings(Some(&obs(3.0)), 1.0);
        assert_eq!(r[0].delta_uj, Some(55_000_000));
        assert_eq!(r[0].total_uj, Some(120_000_000));
        assert_eq!(m.status()[0].extrapolated, Some(1));
        // Features unreadable: unavailable, never 0 W.
        let r = m.readings(None, 1.0);
        assert_eq!((r[0].delta_uj, r[0].total_uj), (None, None));
    }

    #[test]
    fn a_negative_fitted_idle_never_predicts_below_zero_and_says_so() {
        // As fitted on a host other load kept saturated: −10 W + 15 W per busy CPU,
        // trained between 1.9 and 2.0 busy CPUs.
        let mut file = sample_file();
        let zone = &mut file.zones[0];
        zone.intercept_watts = -10.0;
        zone.features[0].min = Some(1.9);
        zone.negative_intercept = true;
        let tmp = tempfile::tempdir().unwrap();
        let saved = tmp.path().join("m.json");
        file.save(&saved).unwrap();
        let text = std::fs::read_to_string(&saved).unwrap();
        assert!(text.contains("\"negative_intercept\": true"), "{text}");
        assert_eq!(crate::model::ModelFile::load(&saved).unwrap(), file);
        assert!(
            file.describe().contains("predictions are clamped at 0 W"),
            "{}",
            file.describe()
        );
        // A file without the field (a positive idle) reads as false and writes none.
        let plain = tmp.path().join("plain.json");
        sample_file().save(&plain).unwrap();
        assert!(!std::fs::read_to_string(&plain)
            .unwrap()
            .contains("negative_intercept"));

        let (w, outside) = predict(&file.zones[0], &[0.2, 0.0, 0.0]);
        assert_eq!(w, 0.0, "−10 + 3 W clamped");
        assert!(outside, "0.2 busy CPUs is below the trained range");
        let m = ModelMeter::new(file, tmp.path(), tmp.path(), &[0, 0], Instant::now());
        assert!(
            m.describe(&saved).contains("predictions clamped at 0 W"),
            "{}",
            m.describe(&saved)
        );
    }
}
