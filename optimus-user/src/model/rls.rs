//! Recursive least squares with exponential forgetting and Huber weights: one (features,
//! target) pair per interval in; coefficients and one-step-ahead predictions out.
//!
//! Why this fitter: power is close to linear in busy CPUs, busy-weighted frequency, I/O and
//! GPU utilisation over a one-second interval, so a linear model with an intercept (the idle
//! power) captures it; RLS fits it exactly as batch least squares would, in O(d²) per sample
//! and O(d²) memory (d ≤ 6 here), with no history kept. Forgetting (factor λ, horizon about
//! 1 / (1 − λ) samples) lets the fit follow slow drift (temperature, firmware, a changed
//! power limit) and step changes. Huber weights make it robust: a residual beyond
//! [`HUBER_K`] robust standard deviations gets weight `K·s/|e|`, so one glitched meter
//! reading moves the fit as much as a K·s error would, not more. Covariance windup (P
//! growing as λ⁻ⁿ along directions the data never excites, e.g. a constant feature) is
//! bounded by capping the covariance's trace at its initial value.

use std::fmt;

/// Initial covariance diagonal: a weak prior (ridge 1/P0) pulling unexcited coefficients
/// towards zero, so constant or collinear features stay finite.
const P0: f64 = 1e4;
/// Residuals beyond this many robust standard deviations are down-weighted (Huber's 1.345
/// is for Gaussian efficiency; 2.5 keeps more of the data's weight and still bounds a spike).
pub const HUBER_K: f64 = 2.5;
/// Smoothing of the robust residual scale (about 20 samples).
const SCALE_SMOOTHING: f64 = 0.95;
/// Samples before Huber weights apply (the scale needs a few residuals first).
const WARMUP: u64 = 20;

/// Why an observation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RlsError {
    /// The feature vector has the wrong length.
    #[error("expected {expected} features, got {got}")]
    Dimension {
        /// The fitter's feature count.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// A feature or the target is NaN or infinite.
    #[error("non-finite {what} ({value})")]
    NonFinite {
        /// `feature N` or `target`.
        what: String,
        /// The value.
        value: f64,
    },
}

/// The fitter's state. Features include the intercept's constant 1 as element 0 when the
/// caller wants one (this module does not add it).
#[derive(Clone, PartialEq)]
pub struct Rls {
    theta: Vec<f64>,
    /// Covariance, row-major d × d, kept symmetric.
    p: Vec<f64>,
    lambda: f64,
    /// Robust residual standard deviation.
    scale: f64,
    samples: u64,
}

impl fmt::Debug for Rls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rls")
            .field("theta", &self.theta)
            .field("lambda", &self.lambda)
            .field("scale", &self.scale)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

impl Rls {
    /// A fitter for `d` features with forgetting factor `lambda` (clamped to 0.5..=1; 1 is
    /// no forgetting).
    pub fn new(d: usize, lambda: f64) -> Self {
        let mut p = vec![0.0; d * d];
        for i in 0..d {
            p[i * d + i] = P0;
        }
        Self {
            theta: vec![0.0; d],
            p,
            lambda: if lambda.is_finite() {
                lambda.clamp(0.5, 1.0)
            } else {
                1.0
            },
            scale: 0.0,
            samples: 0,
        }
    }

    /// A fitter resumed from saved coefficients, covariance and scale; `None` when they do
    /// not fit together or are not finite.
    pub fn resume(
        theta: Vec<f64>,
        p: Vec<f64>,
        lambda: f64,
        scale: f64,
        samples: u64,
    ) -> Option<Self> {
        let d = theta.len();
        let finite = theta.iter().chain(&p).all(|v| v.is_finite()) && scale.is_finite();
        (p.len() == d * d && finite && scale >= 0.0).then(|| {
            let mut r = Self::new(d, lambda);
            r.theta = theta;
            r.p = p;
            r.scale = scale;
            r.samples = samples;
            r
        })
    }

    /// The forgetting factor λ for a horizon of `horizon` samples (`1 − 1/horizon`).
    pub fn lambda_for(horizon: f64) -> f64 {
        if horizon.is_finite() && horizon > 1.0 {
            1.0 - 1.0 / horizon
        } else {
            1.0
        }
    }

    /// The coefficients (same order as the features).
    pub fn coefficients(&self) -> &[f64] {
        &self.theta
    }

    /// The covariance, row-major.
    pub fn covariance(&self) -> &[f64] {
        &self.p
    }

    /// Robust residual standard deviation, in the target's unit.
    pub fn residual_scale(&self) -> f64 {
        self.scale
    }

    /// Observations accepted so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The forgetting factor.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The prediction for `x` (0 for a wrong length or non-finite input).
    pub fn predict(&self, x: &[f64]) -> f64 {
        if x.len() != self.theta.len() {
            return 0.0;
        }
        dot(&self.theta, x)
    }

    fn check(&self, x: &[f64], y: f64) -> Result<(), RlsError> {
        if x.len() != self.theta.len() {
            return Err(RlsError::Dimension {
                expected: self.theta.len(),
                got: x.len(),
            });
        }
        if let Some((i, v)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(RlsError::NonFinite {
                what: format!("feature {i}"),
                value: *v,
            });
        }
        if !y.is_finite() {
            return Err(RlsError::NonFinite {
                what: "target".into(),
                value: y,
            });
        }
        Ok(())
    }

    /// Adds one observation; returns the a-priori residual `y − x·θ` (before the update).
    /// Refuses (and leaves the state untouched) a wrong length or a non-finite value.
    pub fn update(&mut self, x: &[f64], y: f64) -> Result<f64, RlsError> {
        self.check(x, y)?;
        let d = self.theta.len();
        let e = y - dot(&self.theta, x);
        let px: Vec<f64> = (0..d)
            .map(|i| dot(&self.p[i * d..(i + 1) * d], x))
            .collect();
        let xpx = dot(x, &px).max(0.0);
        // Huber weight from the robust scale, once there is one.
        let weight = if self.samples >= WARMUP && self.scale > 0.0 {
            let r = e.abs() / self.scale;
            if r <= HUBER_K {
                1.0
            } else {
                HUBER_K / r
            }
        } else {
            1.0
        };
        let denom = self.lambda / weight + xpx;
        if denom.is_finite() && denom > 0.0 {
            for (t, k) in self.theta.iter_mut().zip(&px) {
                *t += k / denom * e;
            }
            for i in 0..d {
                for j in 0..d {
                    let v = (self.p[i * d + j] - px[i] * px[j] / denom) / self.lambda;
                    self.p[i * d + j] = v;
                }
            }
            self.condition();
        }
        // Scale: clipped residuals, so an outlier does not inflate it; a real change
        // (every residual large) still grows it by about 25 % per sample.
        let e2 = if self.samples >= WARMUP {
            e.powi(2).min((HUBER_K * self.scale).powi(2))
        } else {
            e.powi(2)
        };
        self.scale = if self.samples == 0 {
            e.abs()
        } else {
            (SCALE_SMOOTHING * self.scale.powi(2) + (1.0 - SCALE_SMOOTHING) * e2).sqrt()
        };
        self.samples += 1;
        Ok(e)
    }

    /// Keeps the covariance symmetric, positive on the diagonal and its trace bounded
    /// (anti-windup); resets it if rounding ever made it non-finite.
    fn condition(&mut self) {
        let d = self.theta.len();
        for i in 0..d {
            for j in (i + 1)..d {
                let m = 0.5 * (self.p[i * d + j] + self.p[j * d + i]);
                self.p[i * d + j] = m;
                self.p[j * d + i] = m;
            }
        }
        let finite =
            self.p.iter().all(|v| v.is_finite()) && self.theta.iter().all(|v| v.is_finite());
        let trace: f64 = (0..d).map(|i| self.p[i * d + i]).sum();
        let max_trace = P0 * f64::from(u32::try_from(d).unwrap_or(u32::MAX));
        if !finite || (0..d).any(|i| self.p[i * d + i] < 0.0) {
            if !self.theta.iter().all(|v| v.is_finite()) {
                self.theta.iter_mut().for_each(|v| *v = 0.0);
            }
            self.p = Self::new(d, self.lambda).p;
        } else if trace > max_trace {
            let f = max_trace / trace;
            self.p.iter_mut().for_each(|v| *v *= f);
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a test's panic is its failure report; small loop counters"
)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in 0..1 (no rand dependency).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs()
    }

    #[test]
    fn recovers_known_coefficients_within_one_percent() {
        // Idle 42 W, 11 W per busy CPU, 1.5 W per busy CPU·GHz, 0.02 W per MB/s, with
        // ±0.5 W meter noise and 2 % of samples glitched by +300 W.
        let truth = [42.0, 11.0, 1.5, 0.02];
        let mut fit = Rls::new(4, Rls::lambda_for(3600.0));
        let mut rng = Lcg(7);
        for n in 0..3000 {
            let busy = 16.0 * rng.next();
            let ghz = busy * (1.2 + 2.0 * rng.next());
            let io = 500.0 * rng.next();
            let x = [1.0, busy, ghz, io];
            let mut y = dot(&truth, &x) + (rng.next() - 0.5);
            if n % 50 == 49 {
                y += 300.0;
            }
            fit.update(&x, y).unwrap();
        }
        for (got, want) in fit.coefficients().iter().zip(truth) {
            assert!(
                rel(*got, want) < 0.01,
                "{:?} vs {truth:?}",
                fit.coefficients()
            );
        }
    }

    #[test]
    fn constant_and_collinear_features_stay_finite_and_predict_well() {
        // Feature 1 constant at 3 (collinear with the intercept), feature 3 = 2 × feature 2
        // (a fixed frequency): the individual coefficients are not identifiable, but the
        // fit must stay finite, bounded and predict the target.
        let mut fit = Rls::new(4, Rls::lambda_for(100.0));
        let mut rng = Lcg(3);
        for _ in 0..20_000 {
            let busy = 8.0 * rng.next();
            let x = [1.0, 3.0, busy, 2.0 * busy];
            fit.update(&x, 30.0 + 10.0 * busy).unwrap();
        }
        assert!(fit
            .coefficients()
            .iter()
            .all(|c| c.is_finite() && c.abs() < 1e4));
        assert!(fit.covariance().iter().all(|c| c.is_finite()));
        let trace: f64 = (0..4).map(|i| fit.covariance()[i * 4 + i]).sum();
        assert!(trace <= 4.0 * P0 * 1.000_001, "windup: trace {trace}");
        for busy in [0.0, 2.5, 8.0] {
            let p = fit.predict(&[1.0, 3.0, busy, 2.0 * busy]);
            assert!((p - (30.0 + 10.0 * busy)).abs() < 0.05, "{p} at {busy}");
        }

        // Everything constant for a long time (an idle host): no windup, no blow-up.
        let mut fit = Rls::new(3, Rls::lambda_for(60.0));
        for _ in 0..100_000 {
            fit.update(&[1.0, 0.0, 0.0], 20.0).unwrap();
        }
        assert!((fit.predict(&[1.0, 0.0, 0.0]) - 20.0).abs() < 1e-6);
        assert!(fit.coefficients().iter().all(|c| c.is_finite()));
        // Then load arrives: the fit picks it up instead of exploding.
        let mut rng = Lcg(5);
        for _ in 0..600 {
            let b = 4.0 * rng.next();
            fit.update(&[1.0, b, 0.0], 20.0 + 5.0 * b).unwrap();
        }
        assert!(rel(fit.coefficients()[1], 5.0) < 0.01, "{fit:?}");
    }

    #[test]
    fn follows_a_step_change_within_the_forgetting_horizon() {
        let horizon = 200.0;
        let mut fit = Rls::new(2, Rls::lambda_for(horizon));
        let mut rng = Lcg(11);
        let mut step = |fit: &mut Rls, slope: f64, n: usize| {
            for _ in 0..n {
                let b = 8.0 * rng.next();
                fit.update(&[1.0, b], 10.0 + slope * b + 0.1 * (rng.next() - 0.5))
                    .unwrap();
            }
        };
        step(&mut fit, 5.0, 2000);
        assert!(rel(fit.coefficients()[1], 5.0) < 0.01);
        // The slope doubles (a raised power limit). Forgetting weighs the old regime by
        // λⁿ: after one horizon by 1/e, so exact weighted least squares has moved 1 − 1/e ≈
        // 63 % of the way (Huber weights cost a few samples while the scale adapts); after
        // three horizons 95 %, after six the old regime is 0.25 % of the weight.
        let moved = |fit: &Rls| (fit.coefficients()[1] - 5.0) / 5.0;
        step(&mut fit, 10.0, 200);
        assert!(
            moved(&fit) > 0.5,
            "moved {:.2} in one horizon: {fit:?}",
            moved(&fit)
        );
        step(&mut fit, 10.0, 400);
        assert!(
            moved(&fit) > 0.9,
            "moved {:.2} in three horizons: {fit:?}",
            moved(&fit)
        );
        step(&mut fit, 10.0, 600);
        assert!(rel(fit.coefficients()[1], 10.0) < 0.01, "{fit:?}");
        assert!(rel(fit.coefficients()[0], 10.0) < 0.01, "{fit:?}");
    }

    #[test]
    fn rejects_nan_and_infinite_inputs_without_changing_state() {
        let mut fit = Rls::new(2, 0.99);
        fit.update(&[1.0, 2.0], 5.0).unwrap();
        let before = fit.clone();
        assert!(matches!(
            fit.update(&[1.0, f64::NAN], 5.0),
            Err(RlsError::NonFinite { .. })
        ));
        assert!(matches!(
            fit.update(&[f64::INFINITY, 1.0], 5.0),
            Err(RlsError::NonFinite { .. })
        ));
        assert!(matches!(
            fit.update(&[1.0, 1.0], f64::NEG_INFINITY),
            Err(RlsError::NonFinite { .. })
        ));
        assert_eq!(
            fit.update(&[1.0], 5.0),
            Err(RlsError::Dimension {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(fit, before);
        assert_eq!(
            fit.update(&[1.0, f64::NAN], 1.0).unwrap_err().to_string(),
            "non-finite feature 1 (NaN)"
        );
    }
}
