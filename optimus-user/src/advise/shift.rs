//! When to run a job: its energy and duration, a deadline and a forecast curve in, the start
//! with the least forecast emissions out. Pure arithmetic over piecewise-constant periods:
//! the emissions of a window are smallest at a start where the window's start or end meets
//! a period boundary, so only those starts (and now) are tried.

use crate::carbon::forecast::Period;

/// The job to place in time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Job {
    pub kwh: f64,
    pub duration_seconds: i64,
}

/// The best start and what it saves against starting now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shift {
    pub start: i64,
    pub grams: f64,
    /// Emissions when started now; `None` when the forecast does not cover a job started
    /// now (it starts before the forecast's first period).
    pub grams_now: Option<f64>,
}

/// Why no start could be chosen.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShiftError {
    #[error(
        "the job ({duration}) does not fit between now and the deadline; give a later --deadline"
    )]
    NoRoom { duration: String },
    #[error("the forecast covers {covered} from now, too little for the job before the deadline; give an earlier --deadline or a shorter job")]
    NotCovered { covered: String },
}

/// Average intensity over `[start, start + len)`, if the curve covers it all.
fn mean_intensity(periods: &[Period], start: i64, len: i64) -> Option<f64> {
    let end = start + len;
    let mut covered = 0i64;
    let mut weighted = 0.0;
    for p in periods {
        let (a, b) = (p.start.max(start), p.end.min(end));
        if b > a {
            covered += b - a;
            #[expect(clippy::cast_precision_loss, reason = "seconds within days")]
            {
                weighted += p.g_per_kwh * (b - a) as f64;
            }
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds within days")]
    (covered >= len && len > 0).then(|| weighted / len as f64)
}

fn hours(seconds: i64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "seconds within days")]
    let h = seconds as f64 / 3600.0;
    format!("{h:.1} h")
}

/// The start in `[now, deadline - duration]` with the least forecast emissions (the
/// earliest among equals).
pub fn best_start(
    periods: &[Period],
    now: i64,
    deadline: i64,
    job: Job,
) -> Result<Shift, ShiftError> {
    let len = job.duration_seconds.max(1);
    let latest = deadline - len;
    if latest < now {
        return Err(ShiftError::NoRoom {
            duration: hours(len),
        });
    }
    let mut starts: Vec<i64> = vec![now, latest];
    for p in periods {
        for t in [p.start, p.end, p.start - len, p.end - len] {
            if (now..=latest).contains(&t) {
                starts.push(t);
            }
        }
    }
    starts.sort_unstable();
    starts.dedup();
    let grams = |s: i64| mean_intensity(periods, s, len).map(|g| g * job.kwh);
    let best = starts
        .iter()
        .filter_map(|&s| Some((s, grams(s)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let Some((start, g)) = best else {
        let covered = periods.iter().map(|p| p.end).max().unwrap_or(now) - now;
        return Err(ShiftError::NotCovered {
            covered: hours(covered.max(0)),
        });
    };
    Ok(Shift {
        start,
        grams: g,
        grams_now: grams(now),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn curve(values: &[f64]) -> Vec<Period> {
        values
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let i = i64::try_from(i).unwrap();
                Period {
                    start: i * 1800,
                    end: (i + 1) * 1800,
                    g_per_kwh: *g,
                }
            })
            .collect()
    }

    #[test]
    fn finds_the_known_minimum() {
        // 10 h of half-hours; the cleanest hour is 4:00-5:00 (values 50, 50).
        let mut v = vec![300.0; 20];
        v[8] = 50.0;
        v[9] = 50.0;
        let job = Job {
            kwh: 2.0,
            duration_seconds: 3600,
        };
        let s = best_start(&curve(&v), 0, 36_000, job).unwrap();
        assert_eq!(s.start, 8 * 1800);
        assert!((s.grams - 100.0).abs() < 1e-9);
        assert!((s.grams_now.unwrap() - 600.0).abs() < 1e-9);
    }

    #[test]
    fn a_minimum_past_the_deadline_is_not_taken() {
        let mut v = vec![300.0; 20];
        v[18] = 10.0;
        v[2] = 200.0;
        let job = Job {
            kwh: 1.0,
            duration_seconds: 1800,
        };
        let s = best_start(&curve(&v), 0, 4 * 3600, job).unwrap();
        assert_eq!(s.start, 2 * 1800);
    }

    #[test]
    fn windows_straddling_periods_are_weighted() {
        let v = [100.0, 300.0];
        assert_eq!(mean_intensity(&curve(&v), 900, 1800), Some(200.0));
        assert_eq!(mean_intensity(&curve(&v), 0, 7200), None);
    }

    #[test]
    fn impossible_jobs_say_why() {
        let job = Job {
            kwh: 1.0,
            duration_seconds: 7200,
        };
        assert!(matches!(
            best_start(&curve(&[1.0; 4]), 0, 3600, job),
            Err(ShiftError::NoRoom { .. })
        ));
        assert!(matches!(
            best_start(&curve(&[1.0; 2]), 0, 36_000, job),
            Err(ShiftError::NotCovered { .. })
        ));
    }
}
