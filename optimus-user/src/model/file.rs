//! The model file: a trained model and the host it was trained on in, versioned JSON out
//! (and back, refusing what it cannot trust with a one-line reason).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{feature_unit, HostIdentity};

/// The `format` field of every model file.
pub const FORMAT: &str = "optimus-power-model";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;
/// The file's name under `--state-dir`.
pub const FILE_NAME: &str = "power-model.json";
/// Larger files are refused (a model is a few KiB).
const MAX_BYTES: u64 = 4 << 20;

/// A saved power model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when written by this build.
    pub version: u32,
    /// When it was saved, RFC 3339 UTC.
    pub saved_at: String,
    /// The host it was trained on.
    pub host: HostIdentity,
    /// The agent's sampling interval while training, seconds.
    pub interval_seconds: f64,
    /// The fit's forgetting horizon, seconds (older intervals weigh less than 1/e).
    pub forgetting_horizon_seconds: f64,
    /// One model per zone and device.
    pub zones: Vec<ZoneModel>,
}

/// The model of one zone and device: `watts = intercept_watts + Σ coefficient × feature`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneModel {
    /// `package`, `dram` or `gpu`.
    pub zone: String,
    /// `package-N` or `gpu-N`.
    pub device: String,
    /// Idle power, watts.
    pub intercept_watts: f64,
    /// The features, in model order.
    pub features: Vec<FeatureModel>,
    /// Intervals it learnt from.
    pub samples: u64,
    /// Rolling MAPE of its one-interval-ahead prediction against the meter when saved;
    /// `null` before the first scored interval.
    pub error_ratio: Option<f64>,
    /// Metered power seen in training, watts.
    pub watts_min: Option<f64>,
    pub watts_max: Option<f64>,
    /// The fitter's state, to resume training after a restart.
    pub fit: FitState,
    /// Written (`true`) only when the fitted idle (intercept) is below 0 W, which no host
    /// draws: training never saw the host near idle, so idle and load were not told apart.
    /// Predictions are clamped at 0 W (and below the trained range counted as
    /// extrapolated); `optimus model show` and the agent's log say so.
    #[serde(default, skip_serializing_if = "is_false")]
    pub negative_intercept: bool,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if signature"
)]
fn is_false(b: &bool) -> bool {
    !*b
}

/// One feature of a zone model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureModel {
    pub name: String,
    /// Watts per unit of the feature.
    pub coefficient: f64,
    /// The range and mean seen in training (`null` before any sample).
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

/// The RLS state behind a zone model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitState {
    /// Covariance, row-major, (features + 1)².
    pub covariance: Vec<f64>,
    pub residual_scale: f64,
    pub lambda: f64,
}

/// Why a model file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_BYTES} bytes: not a model file", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is truncated (the JSON ends early): it was cut while being copied or written; use a complete copy", path.display())]
    Truncated { path: PathBuf },
    #[error("{} is not a model file ({why})", path.display())]
    NotAModel { path: PathBuf, why: String },
    #[error("{} has model file version {version}, this optimus reads version {VERSION}: use an optimus of the same version or retrain", path.display())]
    UnknownVersion { path: PathBuf, version: u64 },
    #[error("{} was trained on CPU model {trained:?}, this host has {here:?}: its watts would be another machine's; retrain here, or pass --power-model-any-cpu to use it anyway", path.display())]
    OtherCpu {
        path: PathBuf,
        trained: String,
        here: String,
    },
}

impl ModelFile {
    /// Reads and checks a model file (format, version, complete JSON, finite numbers).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let io = |op, source| ModelError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(|e| io("read", e))?.len();
        if len > MAX_BYTES {
            return Err(ModelError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| io("read", e))?;
        Self::parse(&text, path)
    }

    /// [`ModelFile::load`] on text already read; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        let not = |why: String| ModelError::NotAModel {
            path: path.to_path_buf(),
            why,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            if e.is_eof() {
                ModelError::Truncated {
                    path: path.to_path_buf(),
                }
            } else {
                not(e.to_string())
            }
        })?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(not(format!("no \"format\": \"{FORMAT}\"")));
        }
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(version) => {
                return Err(ModelError::UnknownVersion {
                    path: path.to_path_buf(),
                    version,
                })
            }
            None => return Err(not("no numeric \"version\"".into())),
        }
        let file: ModelFile = serde_json::from_value(value).map_err(|e| not(e.to_string()))?;
        file.validate().map_err(not)?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), String> {
        for z in &self.zones {
            if !matches!(z.zone.as_str(), "package" | "dram" | "gpu") {
                return Err(format!("unknown zone {:?}", z.zone));
            }
            let d = z.features.len() + 1;
            let finite = z.intercept_watts.is_finite()
                && z.features.iter().all(|f| f.coefficient.is_finite())
                && z.fit.covariance.iter().all(|v| v.is_finite());
            if !finite {
                return Err(format!(
                    "{} {}: a coefficient is not finite",
                    z.zone, z.device
                ));
            }
            if z.fit.covariance.len() != d * d {
                return Err(format!(
                    "{} {}: covariance is not {d}×{d}",
                    z.zone, z.device
                ));
            }
        }
        Ok(())
    }

    /// Refuses a model trained on another CPU model, unless `any_cpu`.
    pub fn check_host(
        &self,
        here: &HostIdentity,
        path: &Path,
        any_cpu: bool,
    ) -> Result<(), ModelError> {
        if any_cpu || self.host.cpu_model == here.cpu_model {
            return Ok(());
        }
        Err(ModelError::OtherCpu {
            path: path.to_path_buf(),
            trained: self.host.cpu_model.clone(),
            here: here.cpu_model.clone(),
        })
    }

    /// The JSON text (pretty, one field a line, for people reading it too).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Writes the file atomically (a temp file beside it, then rename), creating the
    /// directory if needed.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let io = |op, p: &Path, source| ModelError::Io {
            op,
            path: p.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, self.to_json()).map_err(|e| io("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename into", path, e))
    }

    /// What `optimus model show` prints.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "power model (format {FORMAT} version {}), saved {}",
            self.version, self.saved_at
        );
        let _ = writeln!(
            out,
            "trained on: {} ({} CPUs), kernel {}",
            self.host.cpu_model, self.host.cpus, self.host.kernel
        );
        let _ = writeln!(
            out,
            "sampling interval {} s, forgetting horizon {} s",
            self.interval_seconds, self.forgetting_horizon_seconds
        );
        for z in &self.zones {
            let error = z.error_ratio.map_or_else(
                || "not scored yet".to_owned(),
                |e| format!("{:.2} %", e * 100.0),
            );
            let _ = writeln!(
                out,
                "\n{} {}: {} samples, error (MAPE, one interval ahead) {error}",
                z.zone, z.device, z.samples
            );
            let watts = match (z.watts_min, z.watts_max) {
                (Some(lo), Some(hi)) => format!(" (metered {lo:.2} to {hi:.2} W)"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  idle (intercept)        {:>10.4} W{watts}",
                z.intercept_watts
            );
            if z.negative_intercept {
                let _ = writeln!(
                    out,
                    "  note: the fitted idle is below 0 W (training never saw this host near idle): predictions are clamped at 0 W"
                );
            }
            for f in &z.features {
                let range = match (f.min, f.max, f.mean) {
                    (Some(lo), Some(hi), Some(m)) => {
                        format!("trained {lo:.3} to {hi:.3}, mean {m:.3}")
                    }
                    _ => "never seen".to_owned(),
                };
                let unit = feature_unit(&f.name);
                let _ = writeln!(
                    out,
                    "  {:<24}{:>10.4} W per {unit:<9} {range}",
                    f.name, f.coefficient
                );
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_file() -> ModelFile {
        ModelFile {
            format: FORMAT.into(),
            version: VERSION,
            saved_at: "2026-12-01T14:00:00Z".into(),
            host: HostIdentity {
                cpu_model: "Test CPU @ 2.0GHz".into(),
                cpus: 2,
                kernel: "6.18.0".into(),
            },
            interval_seconds: 1.0,
            forgetting_horizon_seconds: 3600.0,
            zones: vec![ZoneModel {
                zone: "package".into(),
                device: "package-0".into(),
                intercept_watts: 10.0,
                features: ["busy_cpus", "busy_cpu_ghz", "block_io_mb_per_second"]
                    .iter()
                    .zip([15.0, 0.0, 0.01])
                    .map(|(n, c)| FeatureModel {
                        name: (*n).into(),
                        coefficient: c,
                        min: Some(0.0),
                        max: Some(2.0),
                        mean: Some(1.0),
                    })
                    .collect(),
                samples: 600,
                error_ratio: Some(0.0123),
                watts_min: Some(10.0),
                watts_max: Some(40.0),
                fit: FitState {
                    covariance: (0..16)
                        .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
                        .collect(),
                    residual_scale: 0.1,
                    lambda: 0.9997,
                },
                negative_intercept: false,
            }],
        }
    }

    #[test]
    fn round_trip_keeps_it_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state/power-model.json");
        let file = sample_file();
        file.save(&path).unwrap();
        assert_eq!(ModelFile::load(&path).unwrap(), file);
        let text = file.describe();
        assert!(
            text.contains("trained on: Test CPU @ 2.0GHz (2 CPUs), kernel 6.18.0"),
            "{text}"
        );
        assert!(text.contains("busy_cpus"), "{text}");
        assert!(text.contains("1.23 %"), "{text}");
    }

    #[test]
    fn refuses_unknown_version_truncation_and_another_cpu_in_one_line() {
        let path = Path::new("/x/power-model.json");
        let json = sample_file().to_json();
        let one_line = |e: ModelError| {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
            s
        };

        let v7 = json.replacen("\"version\": 1", "\"version\": 7", 1);
        let e = one_line(ModelFile::parse(&v7, path).unwrap_err());
        assert!(e.contains("version 7, this optimus reads version 1"), "{e}");

        let cut = &json[..json.len() / 2];
        let e = one_line(ModelFile::parse(cut, path).unwrap_err());
        assert!(e.contains("is truncated"), "{e}");

        let e = one_line(ModelFile::parse("{\"hello\": 1}", path).unwrap_err());
        assert!(e.contains("not a model file"), "{e}");

        let file = ModelFile::parse(&json, path).unwrap();
        let other = HostIdentity {
            cpu_model: "AMD EPYC 7763".into(),
            ..file.host.clone()
        };
        let e = one_line(file.check_host(&other, path, false).unwrap_err());
        assert!(
            e.contains(
                "trained on CPU model \"Test CPU @ 2.0GHz\", this host has \"AMD EPYC 7763\""
            ),
            "{e}"
        );
        assert!(e.contains("--power-model-any-cpu"), "{e}");
        file.check_host(&other, path, true).unwrap();
        file.check_host(&file.host, path, false).unwrap();

        let nan = json.replacen("\"intercept_watts\": 10.0", "\"intercept_watts\": 1e999", 1);
        assert!(ModelFile::parse(&nan, path).is_err());
    }
}
