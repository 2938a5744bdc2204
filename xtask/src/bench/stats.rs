//! Order statistics for small samples of run times and ratios, and bootstrap intervals.
use serde::Serialize;

/// Where a sample lies: median, quartiles, p99 and the extremes, from `n` values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub n: usize,
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for an empty sample.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        Some(Self {
            n: sorted.len(),
            median: quantile(&sorted, 0.5),
            p25: quantile(&sorted, 0.25),
            p75: quantile(&sorted, 0.75),
            p99: quantile(&sorted, 0.99),
            min,
            max,
        })
    }
}

/// A statistic with its bootstrap 95 % interval (percentile method).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Estimate {
    /// Half the interval's width.
    pub fn half_width(&self) -> f64 {
        (self.hi - self.lo) / 2.0
    }
}

/// Bootstrap resamples: enough for stable 2.5 % and 97.5 % percentiles.
const RESAMPLES: usize = 4000;

/// `stat` of `items` and its bootstrap 95 % interval: `items` resampled with replacement
/// [`RESAMPLES`] times from a fixed seed (the same data gives the same interval).
/// Resamples whose statistic is not finite are left out. `None` for an empty sample.
pub fn bootstrap<T: Copy>(items: &[T], stat: impl Fn(&[T]) -> f64) -> Option<Estimate> {
    if items.is_empty() {
        return None;
    }
    let value = stat(items);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut resample = Vec::with_capacity(items.len());
    let mut stats = Vec::with_capacity(RESAMPLES);
    for _ in 0..RESAMPLES {
        resample.clear();
        for _ in 0..items.len() {
            // xorshift64: plenty for picking indices.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            #[expect(
                clippy::cast_possible_truncation,
                reason = "the remainder is below items.len()"
            )]
            let i = (rng % items.len() as u64) as usize;
            resample.push(items[i]);
        }
        let s = stat(&resample);
        if s.is_finite() {
            stats.push(s);
        }
    }
    stats.sort_by(f64::total_cmp);
    if stats.is_empty() {
        return Some(Estimate {
            value,
            lo: f64::NAN,
            hi: f64::NAN,
        });
    }
    Some(Estimate {
        value,
        lo: quantile(&stats, 0.025),
        hi: quantile(&stats, 0.975),
    })
}

/// The median of a non-empty sample (NaN for an empty one).
pub fn median(values: &[f64]) -> f64 {
    Spread::of(values).map_or(f64::NAN, |s| s.median)
}

/// The `q` quantile of a sorted, non-empty sample, interpolated linearly between the two
/// nearest ranks (what numpy calls "linear").
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len().saturating_sub(1);
    #[expect(
        clippy::cast_precision_loss,
        reason = "sample sizes are far below 2^52"
    )]
    let pos = q.clamp(0.0, 1.0) * last as f64;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "pos is in 0..=last"
    )]
    let below = pos.floor() as usize;
    let above = (below + 1).min(last);
    #[expect(clippy::cast_precision_loss, reason = "below is small")]
    let frac = pos - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * frac
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failing test should panic with a backtrace"
)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_samples() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert!((s.median - 2.5).abs() < 1e-12);
        assert!((s.p25 - 1.75).abs() < 1e-12);
        assert!((s.p99 - 3.97).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_interval_brackets_the_median() {
        let values: Vec<f64> = (0..41).map(f64::from).collect();
        let e = bootstrap(&values, median).unwrap();
        assert!((e.value - 20.0).abs() < 1e-12);
        assert!(e.lo < 20.0 && e.hi > 20.0, "{e:?}");
        // About ±1.96 σ/√n·√(π/2) for a uniform sample: a few units, far from the extremes.
        assert!(e.lo > 12.0 && e.hi < 28.0, "{e:?}");
        assert_eq!(bootstrap(&values, median), Some(e), "fixed seed");
        let same = bootstrap(&[5.0; 9], median).unwrap();
        assert_eq!((same.lo, same.hi), (5.0, 5.0));
        assert!(bootstrap::<f64>(&[], median).is_none());
    }

    #[test]
    fn single_and_empty() {
        let s = Spread::of(&[7.0]).unwrap();
        assert_eq!((s.median, s.p99, s.min, s.max), (7.0, 7.0, 7.0, 7.0));
        assert!(Spread::of(&[]).is_none());
    }
}
