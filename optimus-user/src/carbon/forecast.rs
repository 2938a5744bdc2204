//! Forecast grid intensity, from the providers that publish one: the UK Carbon Intensity
//! API's 48-hour forecast (`/intensity/{from}/fw48h`) and Electricity Maps'
//! `/v3/carbon-intensity/forecast`. Config in; a curve of periods (start, end, g/kWh) out,
//! refreshed by a background thread, and read as hourly horizons for export and by
//! `optimus advise` for time-shifting.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::http::{self, FetchError};
use super::CarbonConfig;

/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);
/// Furthest horizon exported, hours (the UK forecast covers 48).
pub const MAX_HORIZON_HOURS: u32 = 48;

/// One forecast period, unix seconds `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Period {
    pub start: i64,
    pub end: i64,
    pub g_per_kwh: f64,
}

/// Where a forecast comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForecastProvider {
    UkGrid {
        base_url: String,
    },
    ElectricityMaps {
        base_url: String,
        zone: String,
        token: Option<String>,
    },
}

impl ForecastProvider {
    /// The provider of `cfg`, if it publishes forecasts (a static value does not).
    pub fn of(cfg: &CarbonConfig) -> Option<ForecastProvider> {
        match cfg {
            CarbonConfig::UkGrid { base_url } => Some(ForecastProvider::UkGrid {
                base_url: base_url.clone(),
            }),
            CarbonConfig::ElectricityMaps {
                zone,
                token,
                base_url,
            } => Some(ForecastProvider::ElectricityMaps {
                base_url: base_url.clone(),
                zone: zone.clone(),
                token: token.clone(),
            }),
            CarbonConfig::None | CarbonConfig::Static { .. } => None,
        }
    }

    /// Fetches the forecast from now on.
    pub fn fetch(&self, agent: &ureq::Agent, now: i64) -> Result<Vec<Period>, FetchError> {
        match self {
            ForecastProvider::UkGrid { base_url } => {
                let from = chrono::DateTime::from_timestamp(now, 0)
                    .unwrap_or_default()
                    .format("%Y-%m-%dT%H:%MZ");
                let url = format!("{}/intensity/{from}/fw48h", base_url.trim_end_matches('/'));
                parse_uk(&http::get_body(agent.get(&url))?)
            }
            ForecastProvider::ElectricityMaps {
                base_url,
                zone,
                token,
            } => parse_electricity_maps(&http::get_body(super::electricity_maps::request(
                agent,
                base_url,
                "forecast",
                zone,
                token.as_deref(),
            ))?),
        }
    }
}

#[derive(Deserialize)]
struct UkAnswer {
    data: Vec<UkPeriod>,
}

#[derive(Deserialize)]
struct UkPeriod {
    from: String,
    to: String,
    intensity: UkValues,
}

#[derive(Deserialize)]
struct UkValues {
    forecast: Option<f64>,
}

/// The UK API's `{"data":[{"from":"2026-12-01T12:30Z","to":"…","intensity":{"forecast":266,…}}]}`.
pub fn parse_uk(body: &[u8]) -> Result<Vec<Period>, FetchError> {
    let answer: UkAnswer = serde_json::from_slice(body).map_err(FetchError::malformed)?;
    let mut out = Vec::with_capacity(answer.data.len());
    for p in answer.data {
        let (Some(start), Some(end)) = (parse_time(&p.from), parse_time(&p.to)) else {
            return Err(FetchError::Malformed(format!(
                "period {:?}..{:?} is not a UTC time",
                cut(&p.from),
                cut(&p.to)
            )));
        };
        let Some(g) = p.intensity.forecast else {
            continue;
        };
        if end > start {
            out.push(Period {
                start,
                end,
                g_per_kwh: http::check_intensity(g)?,
            });
        }
    }
    finish(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmAnswer {
    forecast: Vec<EmPoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmPoint {
    carbon_intensity: Option<f64>,
    datetime: String,
}

/// Electricity Maps' `{"zone":"DE","forecast":[{"carbonIntensity":300,"datetime":"…Z"}]}`:
/// each point holds until the next one (the last for an hour).
pub fn parse_electricity_maps(body: &[u8]) -> Result<Vec<Period>, FetchError> {
    let answer: EmAnswer = serde_json::from_slice(body).map_err(FetchError::malformed)?;
    let mut points = Vec::with_capacity(answer.forecast.len());
    for p in answer.forecast {
        let t = parse_time(&p.datetime).ok_or_else(|| {
            FetchError::Malformed(format!("datetime {:?} is not a UTC time", cut(&p.datetime)))
        })?;
        if let Some(g) = p.carbon_intensity {
            points.push((t, http::check_intensity(g)?));
        }
    }
    points.sort_by_key(|(t, _)| *t);
    let out = points
        .iter()
        .enumerate()
        .map(|(i, (t, g))| Period {
            start: *t,
            end: points.get(i + 1).map_or(t + 3600, |(next, _)| *next),
            g_per_kwh: *g,
        })
        .filter(|p| p.end > p.start)
        .collect();
    finish(out)
}

fn finish(mut periods: Vec<Period>) -> Result<Vec<Period>, FetchError> {
    if periods.is_empty() {
        return Err(FetchError::NoData("the forecast has no periods"));
    }
    periods.sort_by_key(|p| p.start);
    Ok(periods)
}

fn cut(s: &str) -> &str {
    let end = s.char_indices().nth(40).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

/// `2026-12-01T12:30Z` (the UK API's form) or any RFC 3339 time, as unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp());
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%MZ")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

/// The forecast value in force at unix time `t`.
pub fn value_at(periods: &[Period], t: i64) -> Option<f64> {
    periods
        .iter()
        .find(|p| p.start <= t && t < p.end)
        .map(|p| p.g_per_kwh)
}

/// Hourly horizons `(h, g/kWh)` for `h` = 1 to 48 hours after `now`, where covered.
pub fn hourly(periods: &[Period], now: i64) -> Vec<(u32, f64)> {
    (1..=MAX_HORIZON_HOURS)
        .filter_map(|h| Some((h, value_at(periods, now + i64::from(h) * 3600)?)))
        .collect()
}

/// Seconds since the epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The latest forecast, kept up to date by a background thread.
#[derive(Debug)]
pub struct ForecastSource {
    shared: Arc<Mutex<Vec<Period>>>,
    _stop: mpsc::Sender<()>,
}

impl ForecastSource {
    /// Starts refreshing every `refresh`, under the same bounds as the intensity refresher
    /// (at least a minute against a public API; backoff with jitter on 429/5xx, honouring
    /// `Retry-After`; up to 30 min while it fails otherwise).
    pub fn start(
        provider: ForecastProvider,
        refresh: Duration,
        timeout: Duration,
    ) -> std::io::Result<ForecastSource> {
        let shared = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread_shared = Arc::clone(&shared);
        let base_url = match &provider {
            ForecastProvider::UkGrid { base_url }
            | ForecastProvider::ElectricityMaps { base_url, .. } => base_url.clone(),
        };
        let refresh = super::refresh::effective_refresh(&base_url, refresh);
        thread::Builder::new()
            .name("optimus-forecast".to_owned())
            .spawn(move || {
                let agent = http::agent(timeout);
                let mut failures: u32 = 0;
                loop {
                    let wait = match provider.fetch(&agent, unix_now()) {
                        Ok(periods) => {
                            failures = 0;
                            *thread_shared.lock().unwrap_or_else(PoisonError::into_inner) = periods;
                            refresh
                        }
                        Err(e) => {
                            if failures == 0 {
                                log::warn!("carbon intensity forecast unavailable: {e}");
                            }
                            failures = failures.saturating_add(1);
                            if e.is_throttle() {
                                super::refresh::backoff(
                                    refresh,
                                    failures,
                                    e.retry_after(),
                                    fastrand::f64(),
                                )
                            } else {
                                refresh
                                    .saturating_mul(1 << failures.min(6))
                                    .min(MAX_BACKOFF.max(refresh))
                            }
                        }
                    };
                    match stopped.recv_timeout(wait) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(ForecastSource {
            shared,
            _stop: stop,
        })
    }

    /// Hourly horizons from now.
    pub fn hourly(&self) -> Vec<(u32, f64)> {
        let periods = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        hourly(&periods, unix_now())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uk_forecast_parses_and_reads_hourly() {
        let body = br#"{"data":[
            {"from":"2026-12-01T12:00Z","to":"2026-12-01T12:30Z","intensity":{"forecast":200,"actual":null,"index":"moderate"}},
            {"from":"2026-12-01T12:30Z","to":"2026-12-01T13:00Z","intensity":{"forecast":100,"actual":null,"index":"low"}},
            {"from":"2026-12-01T13:00Z","to":"2026-12-01T13:30Z","intensity":{"forecast":300,"actual":null,"index":"high"}}
        ]}"#;
        let p = parse_uk(body).unwrap();
        assert_eq!(p.len(), 3);
        let noon = parse_time("2026-12-01T12:00Z").unwrap();
        assert_eq!(noon, 1_796_126_400);
        assert_eq!(value_at(&p, noon + 1800), Some(100.0));
        assert_eq!(value_at(&p, noon + 5400), None);
        assert_eq!(hourly(&p, noon + 600), vec![(1, 300.0)]);
    }

    #[test]
    fn electricity_maps_points_hold_until_the_next() {
        let body = br#"{"zone":"DE","forecast":[
            {"carbonIntensity":300,"datetime":"2026-12-01T14:00:00.000Z"},
            {"carbonIntensity":250,"datetime":"2026-12-01T15:00:00.000Z"}
        ],"updatedAt":"2026-12-01T13:00:00.000Z"}"#;
        let p = parse_electricity_maps(body).unwrap();
        let t = parse_time("2026-12-01T14:00:00Z").unwrap();
        assert_eq!(value_at(&p, t + 3599), Some(300.0));
        assert_eq!(value_at(&p, t + 3600 + 3599), Some(250.0));
        assert_eq!(value_at(&p, t + 7200), None);
    }

    #[test]
    fn bad_forecasts_are_refused() {
        assert!(parse_uk(b"{}").is_err());
        assert!(parse_uk(br#"{"data":[]}"#).is_err());
        assert!(parse_uk(
            br#"{"data":[{"from":"yesterday","to":"today","intensity":{"forecast":1}}]}"#
        )
        .is_err());
        assert!(parse_uk(
            br#"{"data":[{"from":"2026-12-01T12:00Z","to":"2026-12-01T12:30Z","intensity":{"forecast":-5}}]}"#
        )
        .is_err());
        assert!(parse_electricity_maps(
            br#"{"forecast":[{"carbonIntensity":1e9,"datetime":"2026-12-01T14:00:00Z"}]}"#
        )
        .is_err());
    }
}
