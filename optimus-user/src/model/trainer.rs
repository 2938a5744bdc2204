//! Training beside a real meter: each interval's zone energy and features in; the fitted
//! zone models, their rolling one-interval-ahead error and the saved model file out.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::file::{FeatureModel, FitState, ModelFile, ZoneModel, FORMAT, VERSION};
use super::rls::Rls;
use super::{feature_names, features_of, modelled, HostIdentity, Observation, ZoneModelStatus};
use crate::energy::{MeterSource, Zone, ZoneReading};

/// Intervals in the rolling error (five minutes at the default 1 s interval).
pub const ERROR_WINDOW: usize = 300;
/// Intervals learnt before predictions are scored (the first ones are from an untrained fit).
pub const SCORE_AFTER: u64 = 30;
/// The forgetting horizon.
pub const HORIZON: Duration = Duration::from_secs(3600);
/// How often the model file is written.
pub const SAVE_EVERY: Duration = Duration::from_secs(300);

/// Running min, max and mean of one feature.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Stats {
    min: Option<f64>,
    max: Option<f64>,
    sum: f64,
    n: u64,
}

impl Stats {
    fn add(&mut self, v: f64) {
        self.min = Some(self.min.map_or(v, |m| m.min(v)));
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        self.sum += v;
        self.n += 1;
    }
    #[expect(clippy::cast_precision_loss, reason = "sample counts far below 2^53")]
    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// One zone's fit.
#[derive(Clone, Debug)]
pub struct ZoneFit {
    zone: Zone,
    names: &'static [&'static str],
    rls: Rls,
    features: Vec<Stats>,
    watts: Stats,
    errors: VecDeque<f64>,
}

impl ZoneFit {
    /// A fresh fit for `zone` with forgetting factor `lambda`.
    pub fn new(zone: Zone, lambda: f64) -> Self {
        let names = feature_names(zone);
        Self {
            zone,
            names,
            rls: Rls::new(names.len() + 1, lambda),
            features: vec![Stats::default(); names.len()],
            watts: Stats::default(),
            errors: VecDeque::with_capacity(ERROR_WINDOW),
        }
    }

    /// Learns one interval: `x` the features (no intercept), `watts` the metered power.
    /// Scores the prediction made before learning it.
    pub fn observe(&mut self, x: &[f64], watts: f64) {
        let mut full = Vec::with_capacity(x.len() + 1);
        full.push(1.0);
        full.extend_from_slice(x);
        let predicted = self.rls.predict(&full);
        let scored = self.rls.samples() >= SCORE_AFTER;
        match self.rls.update(&full, watts) {
            Ok(_) => {
                if scored && watts > 0.0 {
                    if self.errors.len() == ERROR_WINDOW {
                        self.errors.pop_front();
                    }
                    self.errors.push_back((predicted - watts).abs() / watts);
                }
                for (s, v) in self.features.iter_mut().zip(x) {
                    s.add(*v);
                }
                self.watts.add(watts);
            }
            Err(e) => log::debug!("power model {}: interval skipped: {e}", self.zone),
        }
    }

    /// Rolling MAPE of the one-interval-ahead prediction; `None` before the first score.
    #[expect(clippy::cast_precision_loss, reason = "at most ERROR_WINDOW values")]
    pub fn error_ratio(&self) -> Option<f64> {
        (!self.errors.is_empty())
            .then(|| self.errors.iter().sum::<f64>() / self.errors.len() as f64)
    }

    /// Intervals learnt.
    pub fn samples(&self) -> u64 {
        self.rls.samples()
    }

    /// The fit as a model file entry.
    pub fn to_model(&self, device: &str) -> ZoneModel {
        let c = self.rls.coefficients();
        ZoneModel {
            zone: self.zone.label().to_owned(),
            device: device.to_owned(),
            intercept_watts: c.first().copied().unwrap_or(0.0),
            features: self
                .names
                .iter()
                .zip(&self.features)
                .enumerate()
                .map(|(i, (name, s))| FeatureModel {
                    name: (*name).to_owned(),
                    coefficient: c.get(i + 1).copied().unwrap_or(0.0),
                    min: s.min,
                    max: s.max,
                    mean: s.mean(),
                })
                .collect(),
            samples: self.rls.samples(),
            error_ratio: self.error_ratio(),
            watts_min: self.watts.min,
            watts_max: self.watts.max,
            fit: FitState {
                covariance: self.rls.covariance().to_vec(),
                residual_scale: self.rls.residual_scale(),
                lambda: self.rls.lambda(),
            },
            negative_intercept: c.first().is_some_and(|i| *i < 0.0),
        }
    }

    /// A fit resumed from a saved entry; `None` when the entry does not match `zone`'s
    /// features.
    pub fn from_model(zone: Zone, m: &ZoneModel) -> Option<Self> {
        let names = feature_names(zone);
        let same = m.features.len() == names.len()
            && m.features.iter().zip(names).all(|(f, n)| f.name == *n);
        if !same {
            return None;
        }
        let mut theta = vec![m.intercept_watts];
        theta.extend(m.features.iter().map(|f| f.coefficient));
        let rls = Rls::resume(
            theta,
            m.fit.covariance.clone(),
            m.fit.lambda,
            m.fit.residual_scale,
            m.samples,
        )?;
        let stats = |min: Option<f64>, max: Option<f64>, mean: Option<f64>| Stats {
            min,
            max,
            // The mean is kept as if from one sample, so new data moves it (approximate
            // after a restart, exact range).
            sum: mean.unwrap_or(0.0),
            n: u64::from(mean.is_some()),
        };
        Some(Self {
            zone,
            names,
            rls,
            features: m
                .features
                .iter()
                .map(|f| stats(f.min, f.max, f.mean))
                .collect(),
            watts: stats(m.watts_min, m.watts_max, None),
            errors: VecDeque::with_capacity(ERROR_WINDOW),
        })
    }
}

fn zone_of(label: &str) -> Option<Zone> {
    [Zone::Package, Zone::Dram, Zone::Gpu]
        .into_iter()
        .find(|z| z.label() == label)
}

/// Trains one fit per metered zone and device, and saves them.
#[derive(Debug)]
pub struct Trainer {
    fits: BTreeMap<(Zone, String), ZoneFit>,
    host: HostIdentity,
    interval: Duration,
    lambda: f64,
    path: Option<PathBuf>,
    saved_at: Instant,
    save_failed: bool,
}

impl Trainer {
    /// A trainer for a host sampled every `interval`, saving to `path` (none: never saved).
    /// Resumes from the file at `path` when it was trained on this host.
    pub fn new(host: HostIdentity, interval: Duration, path: Option<PathBuf>) -> Self {
        let horizon = HORIZON.as_secs_f64() / interval.as_secs_f64().max(1e-3);
        let mut t = Self {
            fits: BTreeMap::new(),
            host,
            interval,
            lambda: Rls::lambda_for(horizon),
            path,
            saved_at: Instant::now(),
            save_failed: false,
        };
        t.resume();
        t
    }

    fn resume(&mut self) {
        let Some(path) = self.path.clone().filter(|p| p.exists()) else {
            return;
        };
        let file = match ModelFile::load(&path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("power model: not resuming from the saved model: {e}; training afresh (it will be overwritten)");
                return;
            }
        };
        if file.host != self.host {
            log::warn!(
                "power model: {} was trained on another host ({} CPUs {:?}, kernel {}): training afresh (it will be overwritten)",
                path.display(),
                file.host.cpus,
                file.host.cpu_model,
                file.host.kernel
            );
            return;
        }
        for m in &file.zones {
            if let Some(fit) = zone_of(&m.zone).and_then(|z| ZoneFit::from_model(z, m)) {
                self.fits.insert((fit.zone, m.device.clone()), fit);
            }
        }
        log::info!(
            "power model: resumed {} zone model(s) from {}",
            self.fits.len(),
            path.display()
        );
    }

    /// Learns one interval from the real meters' readings (estimated and modelled zones are
    /// skipped: a model must never learn from itself).
    pub fn observe(&mut self, zones: &[ZoneReading], interval_s: f64, obs: &Observation) {
        if interval_s <= 0.0 {
            return;
        }
        for z in zones {
            let real = !matches!(z.key.source, MeterSource::Estimated | MeterSource::Model);
            let (Some(delta), true, true) = (z.delta_uj, real, modelled(z.key.zone)) else {
                continue;
            };
            let Some(x) = features_of(z.key.zone, &z.key.device, obs) else {
                continue;
            };
            #[expect(
                clippy::cast_precision_loss,
                reason = "µJ of one interval, far below 2^53"
            )]
            let watts = delta as f64 / 1e6 / interval_s;
            let lambda = self.lambda;
            self.fits
                .entry((z.key.zone, z.key.device.clone()))
                .or_insert_with(|| ZoneFit::new(z.key.zone, lambda))
                .observe(&x, watts);
        }
        if self.saved_at.elapsed() >= SAVE_EVERY {
            self.save();
        }
    }

    /// Each fit's live error and sample count.
    pub fn status(&self) -> Vec<ZoneModelStatus> {
        self.fits
            .iter()
            .map(|((zone, device), f)| ZoneModelStatus {
                zone: *zone,
                device: device.clone(),
                error_ratio: f.error_ratio(),
                samples: f.samples(),
                extrapolated: None,
            })
            .collect()
    }

    /// The model file as of now.
    pub fn to_file(&self) -> ModelFile {
        ModelFile {
            format: FORMAT.to_owned(),
            version: VERSION,
            saved_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            host: self.host.clone(),
            interval_seconds: self.interval.as_secs_f64(),
            forgetting_horizon_seconds: HORIZON.as_secs_f64(),
            zones: self.fits.iter().map(|((_, d), f)| f.to_model(d)).collect(),
        }
    }

    /// Writes the model file (when there is a path and something trained); a failure is
    /// logged once per streak and retried at the next save.
    pub fn save(&mut self) {
        self.saved_at = Instant::now();
        let Some(path) = &self.path else { return };
        if self.fits.is_empty() {
            return;
        }
        match self.to_file().save(path) {
            Ok(()) => {
                self.save_failed = false;
                log::debug!("power model saved to {}", path.display());
            }
            Err(e) => {
                if !self.save_failed {
                    log::warn!(
                        "power model not saved: {}; fix --state-dir",
                        crate::energy::describe(&e)
                    );
                }
                self.save_failed = true;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use super::*;
    use crate::energy::ZoneKey;
    use crate::model::features::PackageLoad;

    fn obs(busy: f64) -> Observation {
        Observation {
            packages: BTreeMap::from([(
                0,
                PackageLoad {
                    busy_cpus: busy,
                    ..PackageLoad::default()
                },
            )]),
            ..Observation::default()
        }
    }

    fn reading(source: MeterSource, uj: u64) -> ZoneReading {
        ZoneReading {
            key: ZoneKey::new(Zone::Package, "package-0", source),
            total_uj: Some(uj),
            delta_uj: Some(uj),
            wraps: 0,
            glitches: 0,
        }
    }

    #[test]
    fn learns_from_meters_only_scores_out_of_sample_and_resumes_from_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("power-model.json");
        let host = HostIdentity {
            cpu_model: "Test".into(),
            cpus: 2,
            kernel: "6.18".into(),
        };
        let mut t = Trainer::new(host.clone(), Duration::from_secs(1), Some(path.clone()));
        for i in 0..200u32 {
            let busy = f64::from(i % 5) * 0.5;
            let watts = 10.0 + 15.0 * busy;
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "test values"
            )]
            let uj = (watts * 1e6) as u64;
            t.observe(
                &[reading(MeterSource::RaplPowercap, uj), {
                    let mut r = reading(MeterSource::Estimated, 1);
                    r.key.device = "package-9".into();
                    r
                }],
                1.0,
                &obs(busy),
            );
        }
        let s = t.status();
        assert_eq!(s.len(), 1, "the estimated zone is not learnt from: {s:?}");
        assert_eq!(s[0].samples, 200);
        assert!(s[0].error_ratio.unwrap() < 0.01, "{s:?}");
        t.save();
        let file = ModelFile::load(&path).unwrap();
        assert!(
            (file.zones[0].intercept_watts - 10.0).abs() < 0.05,
            "{file:?}"
        );
        assert!((file.zones[0].features[0].coefficient - 15.0).abs() < 0.05);
        assert_eq!(file.zones[0].features[0].max, Some(2.0));

        let resumed = Trainer::new(host, Duration::from_secs(1), Some(path.clone()));
        assert_eq!(resumed.status()[0].samples, 200);
        let other = HostIdentity {
            cpu_model: "Other".into(),
            cpus: 2,
            kernel: "6.18".into(),
        };
        assert!(Trainer::new(other, Duration::from_secs(1), Some(path))
            .status()
            .is_empty());
    }
}
