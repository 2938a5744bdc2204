//! Per-VM forecasts: each interval's busy CPUs and attributed watts of every VM (and the
//! wall-clock time) in; its power and energy for the next hour and the next day, and the
//! forecasts' error scored against what happened, out.
//!
//! The feature forecast is additive Holt-Winters without trend on hourly means: a level
//! and a 24-slot daily profile (hour of day, UTC), smoothed exponentially (level α = 0.2,
//! profile γ = 0.3 per day). Until a VM has a full day of hours it falls back to the
//! recent mean (an exponential mean with a one-hour time constant, normalised by its own
//! weight so that a VM seen for minutes gets the mean of those minutes, not a value still
//! anchored to its first interval). Busy CPUs are then
//! turned into watts with the VM's own watts per busy CPU over its history (what the
//! node's meter or model and the attribution gave it), or its mean watts when it was
//! never busy. The next hour is the profile slot of `now + 30 min`; the next day is the
//! level plus the profile's mean.

use std::collections::{BTreeMap, VecDeque};

/// Seconds per hour.
const HOUR: f64 = 3600.0;
const ALPHA: f64 = 0.2;
const GAMMA: f64 = 0.3;
/// Scores kept per horizon for the error ratio.
const SCORES: usize = 200;

/// The two horizons, as exported (`1h`, `24h`), with their length in seconds.
pub const HORIZONS: [(&str, f64); 2] = [("1h", HOUR), ("24h", 24.0 * HOUR)];

/// One VM's forecast.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VmForecast {
    /// Mean watts over the next hour and the next day.
    pub watts: [f64; 2],
    /// Whether the daily profile was used (else the recent mean).
    pub seasonal: bool,
}

#[derive(Clone, Debug, Default)]
struct Hourly {
    /// Hour index since the epoch of the bucket being filled.
    hour: Option<i64>,
    busy_s: f64,
    secs: f64,
}

#[derive(Clone, Debug)]
struct Pending {
    due: f64,
    horizon: usize,
    watts: f64,
    joules_then: f64,
    at: f64,
}

/// What one VM's history holds.
#[derive(Clone, Debug, Default)]
pub struct VmHistory {
    bucket: Hourly,
    /// Completed hours of the first day, before the profile starts.
    first_day: Vec<(usize, f64)>,
    level: Option<f64>,
    profile: [f64; 24],
    /// Σ busy·secs and Σ secs, each decayed by e^(−Δt / 1 h): their ratio is the recent mean.
    recent_busy_s: f64,
    recent_secs: f64,
    busy_s: f64,
    joules: f64,
    secs: f64,
    pending: Vec<Pending>,
}

fn hour_of_day(hour: i64) -> usize {
    usize::try_from(hour.rem_euclid(24)).unwrap_or(0)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "hours since the epoch fit i64 for any clock"
)]
fn hour_index(unix_s: f64) -> i64 {
    (unix_s / HOUR).floor() as i64
}

impl VmHistory {
    /// Adds one interval: `busy` CPUs and `watts` over `secs` seconds ending at `now`
    /// (Unix seconds). Returns the absolute percentage errors of forecasts that fell due,
    /// by horizon index.
    pub fn add(&mut self, now: f64, secs: f64, busy: f64, watts: f64) -> Vec<(usize, f64)> {
        if !(secs > 0.0 && busy.is_finite() && watts.is_finite() && now.is_finite()) {
            return Vec::new();
        }
        let (busy, watts) = (busy.max(0.0), watts.max(0.0));
        let decay = (-secs / HOUR).exp();
        self.recent_busy_s = self.recent_busy_s * decay + busy * secs;
        self.recent_secs = self.recent_secs * decay + secs;
        self.busy_s += busy * secs;
        self.joules += watts * secs;
        self.secs += secs;

        let hour = hour_index(now);
        match self.bucket.hour {
            Some(h) if h != hour => {
                if self.bucket.secs > 0.0 {
                    let mean = self.bucket.busy_s / self.bucket.secs;
                    self.learn(hour_of_day(h), mean);
                }
                self.bucket = Hourly {
                    hour: Some(hour),
                    ..Hourly::default()
                };
                // A forecast at each hour boundary, scored when it falls due.
                let f = self.forecast(now);
                for (i, (_, len)) in HORIZONS.iter().enumerate() {
                    self.pending.push(Pending {
                        due: now + len,
                        horizon: i,
                        watts: f.watts[i],
                        joules_then: self.joules,
                        at: now,
                    });
                }
            }
            None => self.bucket.hour = Some(hour),
            Some(_) => {}
        }
        self.bucket.busy_s += busy * secs;
        self.bucket.secs += secs;

        let mut scored = Vec::new();
        let joules = self.joules;
        self.pending.retain(|p| {
            if now < p.due {
                return true;
            }
            let actual = (joules - p.joules_then) / (now - p.at).max(1e-9);
            if actual > 0.0 {
                scored.push((p.horizon, (p.watts - actual).abs() / actual));
            }
            false
        });
        scored
    }

    /// Holt-Winters step for a completed hour with mean busy `y` at hour of day `h`.
    fn learn(&mut self, h: usize, y: f64) {
        let Some(level) = self.level else {
            self.first_day.push((h, y));
            if self.first_day.len() >= 24 {
                #[expect(clippy::cast_precision_loss, reason = "24 values")]
                let mean = self.first_day.iter().map(|(_, v)| v).sum::<f64>()
                    / self.first_day.len() as f64;
                for (h, v) in self.first_day.drain(..) {
                    self.profile[h] = v - mean;
                }
                self.level = Some(mean);
            }
            return;
        };
        let new_level = ALPHA * (y - self.profile[h]) + (1.0 - ALPHA) * level;
        self.profile[h] = GAMMA * (y - new_level) + (1.0 - GAMMA) * self.profile[h];
        self.level = Some(new_level);
    }

    /// Forecast busy CPUs for the next hour and the next day from `now`, and whether the
    /// profile was used.
    pub fn busy_forecast(&self, now: f64) -> ([f64; 2], bool) {
        match self.level {
            Some(level) => {
                let next = self.profile[hour_of_day(hour_index(now + HOUR / 2.0))];
                let day = self.profile.iter().sum::<f64>() / 24.0;
                ([(level + next).max(0.0), (level + day).max(0.0)], true)
            }
            None => {
                let m = if self.recent_secs > 0.0 {
                    self.recent_busy_s / self.recent_secs
                } else {
                    0.0
                };
                ([m, m], false)
            }
        }
    }

    /// Forecast watts: busy CPUs × the VM's watts per busy CPU.
    pub fn forecast(&self, now: f64) -> VmForecast {
        let (busy, seasonal) = self.busy_forecast(now);
        let watts = if self.busy_s > 0.0 {
            let per_busy = self.joules / self.busy_s;
            busy.map(|b| b * per_busy)
        } else if self.secs > 0.0 {
            [self.joules / self.secs; 2]
        } else {
            [0.0; 2]
        };
        VmForecast { watts, seasonal }
    }
}

/// Forecasts of every VM, and their scores.
#[derive(Clone, Debug)]
pub struct Forecaster<K: Ord + Clone> {
    vms: BTreeMap<K, VmHistory>,
    scores: [VecDeque<f64>; 2],
}

impl<K: Ord + Clone> Default for Forecaster<K> {
    fn default() -> Self {
        Self {
            vms: BTreeMap::new(),
            scores: [VecDeque::new(), VecDeque::new()],
        }
    }
}

impl<K: Ord + Clone> Forecaster<K> {
    /// Adds one interval of every live VM (`(id, busy CPUs, watts)`); VMs not listed are
    /// forgotten.
    pub fn add(&mut self, now: f64, secs: f64, vms: &[(K, f64, f64)]) {
        // A set, not a scan of `vms` per entry: quadratic at a thousand VMs.
        let live: std::collections::BTreeSet<&K> = vms.iter().map(|(k, _, _)| k).collect();
        self.vms.retain(|id, _| live.contains(id));
        for (id, busy, watts) in vms {
            // The id is cloned only for a VM seen for the first time.
            if !self.vms.contains_key(id) {
                self.vms.insert(id.clone(), VmHistory::default());
            }
            let Some(history) = self.vms.get_mut(id) else {
                continue;
            };
            let scored = history.add(now, secs, *busy, *watts);
            for (h, e) in scored {
                let q = &mut self.scores[h];
                if q.len() == SCORES {
                    q.pop_front();
                }
                q.push_back(e);
            }
        }
    }

    /// Each VM's forecast from `now`.
    pub fn forecasts(&self, now: f64) -> BTreeMap<K, VmForecast> {
        self.vms
            .iter()
            .map(|(k, h)| (k.clone(), h.forecast(now)))
            .collect()
    }

    /// MAPE of the forecasts scored so far, per horizon; `None` before the first score.
    #[expect(clippy::cast_precision_loss, reason = "at most SCORES values")]
    pub fn error_ratio(&self) -> [Option<f64>; 2] {
        self.scores
            .each_ref()
            .map(|q| (!q.is_empty()).then(|| q.iter().sum::<f64>() / q.len() as f64))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test's panic is its failure report")]
mod tests {
    use super::*;

    /// A VM busy 3 CPUs during office hours (08-18 UTC) and 0.2 otherwise, 10 W per busy
    /// CPU, sampled every minute for `days`.
    fn office(days: u32) -> Vec<(f64, f64, f64)> {
        (0..days * 24 * 60)
            .map(|m| {
                let t = f64::from(m + 1) * 60.0;
                let h = (m / 60) % 24;
                let busy = if (8..18).contains(&h) { 3.0 } else { 0.2 };
                (t, busy, 10.0 * busy)
            })
            .collect()
    }

    #[test]
    fn the_forecast_on_a_daily_pattern_beats_the_recent_mean() {
        let mut f: Forecaster<&str> = Forecaster::default();
        let data = office(10);
        let (train, test) = data.split_at(7 * 24 * 60);
        for (t, b, w) in train {
            f.add(*t, 60.0, &[("vm", *b, *w)]);
        }
        // Score both on the next three days, hour by hour: forecast at each hour's start vs
        // the mean watts of that hour.
        let mut seasonal_err = 0.0;
        let mut recent_err = 0.0;
        let mut n = 0.0;
        for hour in test.chunks(60) {
            let now = hour[0].0 - 60.0;
            let h = &f.vms["vm"];
            let forecast = h.forecast(now).watts[0];
            assert!(h.forecast(now).seasonal);
            let per_busy = h.joules / h.busy_s;
            let recent = h.recent_busy_s / h.recent_secs * per_busy;
            let actual = hour.iter().map(|x| x.2).sum::<f64>() / 60.0;
            seasonal_err += (forecast - actual).abs() / actual;
            recent_err += (recent - actual).abs() / actual;
            n += 1.0;
            for (t, b, w) in hour {
                f.add(*t, 60.0, &[("vm", *b, *w)]);
            }
        }
        let (seasonal_err, recent_err) = (seasonal_err / n, recent_err / n);
        assert!(
            seasonal_err < 0.5 * recent_err,
            "seasonal MAPE {seasonal_err:.3} vs recent mean {recent_err:.3}"
        );
        assert!(seasonal_err < 0.05, "seasonal MAPE {seasonal_err:.3}");
        // The live score of the 1 h forecasts agrees, the 24 h one has been scored too.
        let [one, day] = f.error_ratio();
        assert!(one.unwrap() < 0.1, "{one:?}");
        assert!(day.unwrap() < 0.1, "{day:?}");
        // The next day's mean: 10 h at 30 W + 14 h at 2 W = 13.67 W.
        let w = f.forecasts(test.last().unwrap().0)["vm"].watts[1];
        assert!((w - 13.667).abs() < 0.3, "{w}");
    }

    #[test]
    fn short_history_falls_back_to_the_recent_mean_and_gone_vms_are_forgotten() {
        let mut f: Forecaster<&str> = Forecaster::default();
        for m in 0..120 {
            f.add(
                f64::from(m) * 60.0 + 60.0,
                60.0,
                &[("a", 2.0, 16.0), ("b", 0.0, 1.5)],
            );
        }
        let fc = f.forecasts(7200.0);
        assert!(!fc["a"].seasonal);
        assert!((fc["a"].watts[0] - 16.0).abs() < 1e-9, "{fc:?}");
        assert!((fc["a"].watts[1] - 16.0).abs() < 1e-9);
        assert!(
            (fc["b"].watts[0] - 1.5).abs() < 1e-9,
            "never busy: its mean watts"
        );
        f.add(7260.0, 60.0, &[("a", 2.0, 16.0)]);
        assert!(!f.forecasts(7260.0).contains_key("b"));
        // Non-finite input is ignored.
        f.add(7320.0, 60.0, &[("a", f64::NAN, 16.0)]);
        assert!((f.forecasts(7320.0)["a"].watts[0] - 16.0).abs() < 1e-9);
    }

    #[test]
    fn a_new_vm_is_forecast_at_the_mean_of_its_minutes_not_its_first_interval() {
        // Found while booting (idle), then busy for five minutes: the recent mean is the
        // time-weighted mean of what it did (cargo xtask validate saw forecasts of ~0 W for
        // busy guests when the mean was anchored to the first interval).
        let mut f: Forecaster<&str> = Forecaster::default();
        f.add(1.0, 1.0, &[("vm", 0.0, 0.0)]);
        for s in 2..=300 {
            f.add(f64::from(s), 1.0, &[("vm", 1.0, 8.0)]);
        }
        let w = f.forecasts(300.0)["vm"].watts[0];
        // 299 s of 1 busy CPU and 1 s idle: 0.9967 busy CPUs × 8 W per busy CPU.
        assert!((w - 8.0 * 299.0 / 300.0).abs() < 0.01, "{w}");
    }
}
