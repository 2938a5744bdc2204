//! Order statistics for small samples of run times and ratios.
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
    fn single_and_empty() {
        let s = Spread::of(&[7.0]).unwrap();
        assert_eq!((s.median, s.p99, s.min, s.max), (7.0, 7.0, 7.0, 7.0));
        assert!(Spread::of(&[]).is_none());
    }
}
