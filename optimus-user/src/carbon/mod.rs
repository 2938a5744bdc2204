//! Grid carbon intensity, and the grams of CO2eq that energy stands for.
//!
//! The intensity comes from a fixed value or from a provider API polled by a background
//! thread ([`CarbonSource`]). A failed refresh keeps the last good value, counts the failure
//! under a fixed kind and logs once per streak of the same kind; the age of the value in
//! force is exported so a stale figure is visible. With nothing configured there is no value
//! at all, so no carbon series are exported rather than zeros.

pub(crate) mod electricity_maps;
pub mod forecast;
mod http;
mod refresh;
#[cfg(test)]
mod test_server;
pub(crate) mod uk_grid;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

pub use electricity_maps::{token_from_env, TOKEN_ENV};
pub use http::{MAX_G_PER_KWH, MAX_RESPONSE_BYTES};

use refresh::{Provider, State};

/// Default Electricity Maps API root.
pub const DEFAULT_ELECTRICITY_MAPS_URL: &str = electricity_maps::DEFAULT_BASE_URL;
/// Default UK Carbon Intensity API root.
pub const DEFAULT_UK_GRID_URL: &str = uk_grid::DEFAULT_BASE_URL;
/// Default time between two API refreshes. Both APIs publish at most every 30-60 min.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Default bound on one API request, connect to last body byte.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest power usage effectiveness accepted; real data centres are below 3.
pub const MAX_PUE: f64 = 10.0;

const JOULES_PER_KWH: f64 = 3.6e6;

/// Where the carbon intensity comes from.
#[derive(Clone, Default, PartialEq)]
pub enum CarbonConfig {
    /// No carbon accounting: no value, no carbon metrics.
    #[default]
    None,
    /// A fixed intensity, g CO2eq/kWh.
    Static { g_per_kwh: f64 },
    /// Electricity Maps v3 `carbon-intensity/latest` for a zone key (`DE`, `US-CAL-CISO`).
    ElectricityMaps {
        zone: String,
        /// Sent as the `auth-token` header; see [`token_from_env`].
        token: Option<String>,
        /// API root, [`DEFAULT_ELECTRICITY_MAPS_URL`] unless testing or proxying.
        base_url: String,
    },
    /// National Grid ESO Carbon Intensity API, national (GB) value.
    UkGrid {
        /// API root, [`DEFAULT_UK_GRID_URL`] unless testing or proxying.
        base_url: String,
    },
}

// By hand so the token never reaches a log line.
impl fmt::Debug for CarbonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Static { g_per_kwh } => f
                .debug_struct("Static")
                .field("g_per_kwh", g_per_kwh)
                .finish(),
            Self::ElectricityMaps {
                zone,
                token,
                base_url,
            } => f
                .debug_struct("ElectricityMaps")
                .field("zone", zone)
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("base_url", base_url)
                .finish(),
            Self::UkGrid { base_url } => f
                .debug_struct("UkGrid")
                .field("base_url", base_url)
                .finish(),
        }
    }
}

impl CarbonConfig {
    /// Checks the settings without contacting anything.
    pub fn validate(&self) -> Result<(), CarbonError> {
        match self {
            Self::None => Ok(()),
            Self::Static { g_per_kwh } => http::check_intensity(*g_per_kwh)
                .map(drop)
                .map_err(|_| CarbonError::InvalidIntensity { value: *g_per_kwh }),
            Self::ElectricityMaps {
                zone,
                token,
                base_url,
            } => {
                if !electricity_maps::is_zone_key(zone) {
                    return Err(CarbonError::InvalidZone { zone: zone.clone() });
                }
                if token
                    .as_deref()
                    .is_some_and(|t| !electricity_maps::is_token(t))
                {
                    return Err(CarbonError::InvalidToken);
                }
                check_base_url(base_url)
            }
            Self::UkGrid { base_url } => check_base_url(base_url),
        }
    }
}

fn check_base_url(url: &str) -> Result<(), CarbonError> {
    match http::base_url_problem(url) {
        None => Ok(()),
        Some(reason) => Err(CarbonError::InvalidBaseUrl {
            url: url.to_owned(),
            reason,
        }),
    }
}

/// Carbon settings that cannot work, found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum CarbonError {
    #[error("carbon intensity {value} g/kWh is outside 0..={MAX_G_PER_KWH}")]
    InvalidIntensity { value: f64 },
    #[error("pue {value} is outside 1..={MAX_PUE}")]
    InvalidPue { value: f64 },
    #[error("electricity maps zone {zone:?} is not a zone key (letters, digits, '-', '_')")]
    InvalidZone { zone: String },
    #[error("electricity maps token has characters that cannot go in a header")]
    InvalidToken,
    #[error("carbon api url {url:?} {reason}")]
    InvalidBaseUrl { url: String, reason: &'static str },
    #[error("carbon refresh interval and timeout must be above zero")]
    InvalidInterval,
    #[error("spawn the carbon refresher thread")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

/// A carbon intensity in force.
#[derive(Clone, Debug, PartialEq)]
pub struct Intensity {
    /// g CO2eq per kWh drawn from the grid.
    pub g_per_kwh: f64,
    /// Label for the grid: the Electricity Maps zone key as configured, `GB` for the UK API,
    /// `static` for a fixed value. Never taken from fetched data.
    pub zone: String,
    /// `static`, `electricitymaps` or `ukgrid`.
    pub source: &'static str,
    /// When the value was last fetched successfully (when it was set, for a fixed value).
    pub fetched_at: Instant,
}

/// A snapshot of a [`CarbonSource`] for the exporter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CarbonStatus {
    /// The intensity in force, `None` until the first good fetch.
    pub current: Option<Intensity>,
    /// Time since `current` was fetched; `None` without a value and for a fixed value,
    /// which never goes stale.
    pub age: Option<Duration>,
    /// Failed refreshes since start by kind: `http_401`, `http_403`, `http_429`, `http_4xx`,
    /// `http_5xx`, `http_other`, `timeout`, `connect`, `too_large`, `malformed`, `no_data`,
    /// `protocol`, `transport`.
    pub errors: BTreeMap<&'static str, u64>,
    /// Kind of the failure streak in progress; `None` when the last refresh succeeded.
    pub last_error: Option<&'static str>,
}

/// The carbon intensity provider, refreshed in the background. Dropping it stops the
/// refresher after its request in flight, if any, ends.
#[derive(Debug)]
pub struct CarbonSource {
    shared: Arc<Mutex<State>>,
    configured: bool,
    // Never sent on: dropping it wakes the refresher out of its wait, which then exits.
    _stop: Option<mpsc::Sender<()>>,
}

impl CarbonSource {
    /// Checks `cfg` and, for an API, starts the refresher thread, which fetches at once and
    /// then every `refresh`, each request bounded by `timeout`. Never waits for the network.
    pub fn start(
        cfg: CarbonConfig,
        refresh: Duration,
        timeout: Duration,
    ) -> Result<Self, CarbonError> {
        cfg.validate()?;
        let mut state = State::default();
        let provider = match cfg {
            CarbonConfig::None => return Ok(Self::without_thread(state, false)),
            CarbonConfig::Static { g_per_kwh } => {
                state.current = Some(Intensity {
                    g_per_kwh,
                    zone: STATIC.to_owned(),
                    source: STATIC,
                    fetched_at: Instant::now(),
                });
                return Ok(Self::without_thread(state, true));
            }
            CarbonConfig::ElectricityMaps {
                zone,
                token,
                base_url,
            } => Provider::ElectricityMaps {
                zone,
                token,
                base_url,
            },
            CarbonConfig::UkGrid { base_url } => Provider::UkGrid { base_url },
        };
        if refresh.is_zero() || timeout.is_zero() {
            return Err(CarbonError::InvalidInterval);
        }
        if matches!(provider, Provider::ElectricityMaps { token: None, .. }) {
            log::warn!("{TOKEN_ENV} is not set: Electricity Maps will refuse the requests");
        }
        let shared = Arc::new(Mutex::new(state));
        let (stop_tx, stop_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("optimus-carbon".to_owned())
            .spawn(move || refresh::run(&provider, refresh, timeout, &thread_shared, &stop_rx))
            .map_err(|source| CarbonError::Spawn { source })?;
        Ok(Self {
            shared,
            configured: true,
            _stop: Some(stop_tx),
        })
    }

    fn without_thread(state: State, configured: bool) -> Self {
        Self {
            shared: Arc::new(Mutex::new(state)),
            configured,
            _stop: None,
        }
    }

    /// Whether carbon accounting is on at all (anything but [`CarbonConfig::None`]).
    pub fn configured(&self) -> bool {
        self.configured
    }

    /// The intensity in force now: `None` until the first good value, and forever for
    /// [`CarbonConfig::None`].
    pub fn current(&self) -> Option<Intensity> {
        self.lock().current.clone()
    }

    /// The value in force, its age and the failure counts.
    pub fn status(&self) -> CarbonStatus {
        let state = self.lock();
        let age = state
            .current
            .as_ref()
            .filter(|i| i.source != STATIC)
            .map(|i| i.fetched_at.elapsed());
        CarbonStatus {
            current: state.current.clone(),
            age,
            errors: state.errors.clone(),
            last_error: state.streak,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is replaced whole under the lock, so a panic elsewhere cannot leave it
        // half-written.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Grams of CO2eq for `joules` of energy at `g_per_kwh` in a facility of power usage
/// effectiveness `pue`: `joules / 3.6e6 × g_per_kwh × pue`.
pub fn grams(joules: f64, g_per_kwh: f64, pue: f64) -> f64 {
    joules / JOULES_PER_KWH * g_per_kwh * pue
}

/// Checks a power usage effectiveness: finite, in `1..=MAX_PUE` (1 is a perfect facility).
pub fn check_pue(pue: f64) -> Result<f64, CarbonError> {
    if pue.is_finite() && (1.0..=MAX_PUE).contains(&pue) {
        Ok(pue)
    } else {
        Err(CarbonError::InvalidPue { value: pue })
    }
}

const STATIC: &str = "static";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grams_match_hand_computed_values() {
        // 1 kWh at 200 g/kWh in a PUE 1.2 facility: 240 g.
        assert!((grams(3.6e6, 200.0, 1.2) - 240.0).abs() < 1e-9);
        // 0.5 kWh at 300 g/kWh, PUE 1: 150 g.
        assert!((grams(1.8e6, 300.0, 1.0) - 150.0).abs() < 1e-9);
        // 1 J at 3600 g/kWh: 1 mg.
        assert!((grams(1.0, 3600.0, 1.0) - 0.001).abs() < 1e-15);
        assert!(grams(0.0, 500.0, 1.5).abs() < f64::EPSILON);
    }

    #[test]
    fn pue_is_checked() {
        assert_eq!(check_pue(1.0).ok(), Some(1.0));
        assert_eq!(check_pue(1.58).ok(), Some(1.58));
        for bad in [0.0, 0.99, 12.0, f64::NAN, f64::INFINITY] {
            assert!(check_pue(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nothing_configured_means_no_value_ever() {
        let src =
            CarbonSource::start(CarbonConfig::None, DEFAULT_REFRESH, DEFAULT_TIMEOUT).unwrap();
        assert!(!src.configured());
        assert_eq!(src.current(), None);
        assert_eq!(src.status(), CarbonStatus::default());
    }

    #[test]
    fn static_value_is_in_force_at_once_and_never_ages() {
        let cfg = CarbonConfig::Static { g_per_kwh: 56.0 };
        let src = CarbonSource::start(cfg, DEFAULT_REFRESH, DEFAULT_TIMEOUT).unwrap();
        assert!(src.configured());
        let status = src.status();
        let current = status.current.unwrap();
        assert_eq!(
            (current.g_per_kwh, current.zone.as_str(), current.source),
            (56.0, "static", "static")
        );
        assert_eq!(status.age, None);
        assert!(status.errors.is_empty());
    }

    #[test]
    fn bad_settings_are_refused_before_start() {
        let start = |cfg| CarbonSource::start(cfg, DEFAULT_REFRESH, DEFAULT_TIMEOUT).map(drop);
        for g_per_kwh in [-1.0, 5000.5, f64::NAN] {
            assert!(matches!(
                start(CarbonConfig::Static { g_per_kwh }),
                Err(CarbonError::InvalidIntensity { .. })
            ));
        }
        let em = |zone: &str, token: Option<&str>, base_url: &str| CarbonConfig::ElectricityMaps {
            zone: zone.to_owned(),
            token: token.map(str::to_owned),
            base_url: base_url.to_owned(),
        };
        assert!(matches!(
            start(em("DE&zone=FR", None, DEFAULT_ELECTRICITY_MAPS_URL)),
            Err(CarbonError::InvalidZone { .. })
        ));
        assert!(matches!(
            start(em("DE", Some("a\r\nb"), DEFAULT_ELECTRICITY_MAPS_URL)),
            Err(CarbonError::InvalidToken)
        ));
        assert!(matches!(
            start(em("DE", Some("t"), "http://api.electricitymap.org")),
            Err(CarbonError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            start(CarbonConfig::UkGrid {
                base_url: "ftp://x".to_owned()
            }),
            Err(CarbonError::InvalidBaseUrl { .. })
        ));
        let uk = CarbonConfig::UkGrid {
            base_url: DEFAULT_UK_GRID_URL.to_owned(),
        };
        assert!(matches!(
            CarbonSource::start(uk, Duration::ZERO, DEFAULT_TIMEOUT),
            Err(CarbonError::InvalidInterval)
        ));
    }

    #[test]
    fn debug_output_hides_the_token() {
        let cfg = CarbonConfig::ElectricityMaps {
            zone: "DE".to_owned(),
            token: Some("very-secret".to_owned()),
            base_url: DEFAULT_ELECTRICITY_MAPS_URL.to_owned(),
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
