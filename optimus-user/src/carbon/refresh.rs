//! The refresher thread: fetch, record the outcome, log a failure once per streak, wait.
//!
//! How long it waits is bounded on both sides, so a public API is never hammered: at least
//! [`MIN_PUBLIC_REFRESH`] between requests to a host that is not loopback (a local proxy or
//! test server may be polled faster), and after a 429 or 5xx an exponential backoff with
//! jitter ([`backoff`]), never shorter than the server's `Retry-After`.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::http::{self, FetchError};
use super::{electricity_maps, uk_grid, Intensity};

/// A polled API, from a validated [`super::CarbonConfig`].
pub(super) enum Provider {
    ElectricityMaps {
        zone: String,
        token: Option<String>,
        base_url: String,
    },
    UkGrid {
        base_url: String,
    },
}

impl Provider {
    fn source(&self) -> &'static str {
        match self {
            Self::ElectricityMaps { .. } => "electricitymaps",
            Self::UkGrid { .. } => "ukgrid",
        }
    }

    fn zone(&self) -> &str {
        match self {
            Self::ElectricityMaps { zone, .. } => zone,
            Self::UkGrid { .. } => uk_grid::ZONE,
        }
    }

    fn fetch(&self, agent: &ureq::Agent) -> Result<f64, FetchError> {
        match self {
            Self::ElectricityMaps {
                zone,
                token,
                base_url,
            } => electricity_maps::fetch(agent, base_url, zone, token.as_deref()),
            Self::UkGrid { base_url } => uk_grid::fetch(agent, base_url),
        }
    }

    fn base_url(&self) -> &str {
        match self {
            Self::ElectricityMaps { base_url, .. } | Self::UkGrid { base_url } => base_url,
        }
    }

    fn hint(&self, err: &FetchError) -> &'static str {
        match (self, err.kind()) {
            (Self::ElectricityMaps { .. }, "http_401" | "http_403") => {
                " (check the token in ELECTRICITYMAPS_TOKEN and the zone's access)"
            }
            (_, "http_429") => " (rate limited: a longer refresh interval may help)",
            _ => "",
        }
    }
}

/// What the refresher shares with [`super::CarbonSource`].
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) current: Option<Intensity>,
    pub(super) errors: BTreeMap<&'static str, u64>,
    /// Kind of the failure streak in progress.
    pub(super) streak: Option<&'static str>,
}

/// What one refresh changed, which decides what is logged.
#[derive(Debug, PartialEq, Eq)]
enum Transition {
    /// The first value since start.
    First,
    Good,
    Recovered(&'static str),
    NewFailure,
    SameFailure,
}

impl State {
    fn record_ok(&mut self, intensity: Intensity) -> Transition {
        let first = self.current.replace(intensity).is_none();
        match self.streak.take() {
            Some(kind) => Transition::Recovered(kind),
            None if first => Transition::First,
            None => Transition::Good,
        }
    }

    fn record_err(&mut self, kind: &'static str) -> Transition {
        *self.errors.entry(kind).or_insert(0) += 1;
        if self.streak.replace(kind) == Some(kind) {
            Transition::SameFailure
        } else {
            Transition::NewFailure
        }
    }
}

/// The shortest refresh against a host that is not loopback: both APIs publish at most
/// every 30 minutes, and they are shared by everyone.
pub const MIN_PUBLIC_REFRESH: Duration = Duration::from_secs(60);
/// The first backoff after a 429/5xx is at least this long, whatever the refresh.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Backoff and `Retry-After` are capped here, so a hostile or broken server cannot stop the
/// refreshes for good.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// `refresh`, raised to [`MIN_PUBLIC_REFRESH`] for a host that is not loopback.
pub fn effective_refresh(base_url: &str, refresh: Duration) -> Duration {
    if http::is_loopback_url(base_url) {
        refresh
    } else {
        refresh.max(MIN_PUBLIC_REFRESH)
    }
}

/// The wait after the `failures`-th 429/5xx in a row (1 for the first): the larger of the
/// refresh and [`MIN_BACKOFF`], doubled for each further failure, capped at [`MAX_BACKOFF`],
/// with "equal jitter" (a uniform draw from its upper half, `jitter` in 0..1) so many agents
/// do not retry in step; never less than `retry_after` (capped too) nor than `refresh`.
pub fn backoff(
    refresh: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let base = refresh.max(MIN_BACKOFF);
    let exp = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let jittered = exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    jittered
        .max(retry_after.unwrap_or_default().min(MAX_BACKOFF))
        .max(refresh)
}

/// Fetches at once, then every `refresh` (see the module doc for its bounds), until the
/// sender side of `stop` is dropped.
pub(super) fn run(
    provider: &Provider,
    refresh: Duration,
    timeout: Duration,
    shared: &Mutex<State>,
    stop: &mpsc::Receiver<()>,
) {
    let agent = http::agent(timeout);
    let (source, zone) = (provider.source(), provider.zone());
    let wanted = refresh;
    let refresh = effective_refresh(provider.base_url(), refresh);
    if refresh != wanted {
        log::warn!(
            "carbon intensity {source}: --carbon-refresh {wanted:?} is below the {} s floor \
             for a public API; refreshing every {refresh:?}",
            MIN_PUBLIC_REFRESH.as_secs()
        );
    }
    let mut throttled = 0u32;
    loop {
        let outcome = provider.fetch(&agent);
        let transition = {
            let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
            match &outcome {
                Ok(g_per_kwh) => state.record_ok(Intensity {
                    g_per_kwh: *g_per_kwh,
                    zone: zone.to_owned(),
                    source,
                    fetched_at: Instant::now(),
                }),
                Err(err) => state.record_err(err.kind()),
            }
        };
        match (&outcome, transition) {
            (Ok(g), Transition::First) => {
                log::info!("carbon intensity {source}/{zone}: {g} g/kWh");
            }
            (Ok(g), Transition::Good) => {
                log::debug!("carbon intensity {source}/{zone}: {g} g/kWh");
            }
            (Ok(g), Transition::Recovered(kind)) => {
                log::info!(
                    "carbon intensity {source}/{zone} is back after {kind} failures: {g} g/kWh"
                );
            }
            (Err(err), Transition::NewFailure) => log::warn!(
                "carbon intensity {source}/{zone}: {err}{}; keeping the last good value, \
                 not logging this again until it changes",
                provider.hint(err)
            ),
            (Err(err), _) => log::debug!("carbon intensity {source}/{zone}: {err}"),
            (Ok(_), _) => {}
        }
        let wait = match &outcome {
            Err(err) if err.is_throttle() => {
                throttled += 1;
                let wait = backoff(refresh, throttled, err.retry_after(), fastrand::f64());
                log::debug!(
                    "carbon intensity {source}/{zone}: backing off {wait:?} after {throttled} \
                     throttled answer(s)"
                );
                wait
            }
            _ => {
                throttled = 0;
                refresh
            }
        };
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::thread;

    use super::super::test_server::{Reply, TestServer};
    use super::super::{CarbonConfig, CarbonSource, CarbonStatus, DEFAULT_REFRESH};
    use super::*;

    const EM_250: &str = r#"{"zone":"DE","carbonIntensity":250,"datetime":"2024-05-01T10:00:00.000Z","updatedAt":"2024-05-01T09:55:00.000Z","isEstimated":true,"estimationMethod":"TIME_SLICER_AVERAGE"}"#;

    fn em(server: &TestServer) -> CarbonConfig {
        CarbonConfig::ElectricityMaps {
            zone: "DE".to_owned(),
            token: Some("tok".to_owned()),
            base_url: server.base_url(),
        }
    }

    /// Polls `src` until `cond` holds; fails after 5 s.
    fn wait_for(
        src: &CarbonSource,
        what: &str,
        cond: impl Fn(&CarbonStatus) -> bool,
    ) -> CarbonStatus {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = src.status();
            if cond(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}: {status:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn count(status: &CarbonStatus, kind: &str) -> u64 {
        status.errors.get(kind).copied().unwrap_or(0)
    }
    #[test]
    fn failures_are_logged_once_per_streak() {
        let mut state = State::default();
        let good = |g| Intensity {
            g_per_kwh: g,
            zone: "DE".to_owned(),
            source: "electricitymaps",
            fetched_at: Instant::now(),
        };
        let seen = [
            state.record_ok(good(90.0)),
            state.record_ok(good(95.0)),
            state.record_err("timeout"),
            state.record_err("timeout"),
            state.record_ok(good(100.0)),
            state.record_ok(good(110.0)),
            state.record_err("http_5xx"),
            state.record_err("http_5xx"),
            state.record_err("http_429"),
            state.record_err("http_5xx"),
            state.record_ok(good(120.0)),
        ];
        use Transition::*;
        assert_eq!(
            seen,
            [
                First,
                Good,
                NewFailure,
                SameFailure,
                Recovered("timeout"),
                Good,
                NewFailure,
                SameFailure,
                NewFailure,
                NewFailure,
                Recovered("http_5xx"),
            ]
        );
        let counts: Vec<_> = state.errors.into_iter().collect();
        assert_eq!(counts, [("http_429", 1), ("http_5xx", 3), ("timeout", 2)]);
        assert_eq!(state.streak, None);
    }

    #[test]
    fn refresher_keeps_last_good_value_and_counts_failures_by_kind() {
        let server = TestServer::start(vec![
            Reply::ok(EM_250),
            Reply::status(500),
            Reply::status(401),
            Reply::status(429),
            Reply::ok("{not json"),
            Reply::ok(r#"{"zone":"DE","carbonIntensity":9999}"#),
        ]);
        let src = CarbonSource::start(
            em(&server),
            Duration::from_millis(20),
            Duration::from_secs(2),
        )
        .unwrap();
        let first = wait_for(&src, "two malformed answers", |s| {
            count(s, "malformed") >= 2
        });
        assert_eq!(count(&first, "http_5xx"), 1);
        assert_eq!(count(&first, "http_401"), 1);
        assert_eq!(count(&first, "http_429"), 1);
        assert_eq!(first.last_error, Some("malformed"));
        let kept = first.current.clone().unwrap();
        assert_eq!(
            (kept.g_per_kwh, kept.zone.as_str(), kept.source),
            (250.0, "DE", "electricitymaps")
        );

        thread::sleep(Duration::from_millis(60));
        let later = src.status();
        assert_eq!(later.current, Some(kept));
        assert!(later.age.unwrap() > first.age.unwrap());
        assert!(later.age.unwrap() >= Duration::from_millis(60));

        // Every request asked for the zone and refused the IP fallback.
        for head in server.requests() {
            assert!(head.contains("zone=DE"), "{head}");
            assert!(
                head.contains("shouldUseFallbackCallerLookup=false"),
                "{head}"
            );
        }
    }

    #[test]
    fn refresher_survives_a_timeout_and_recovers() {
        let uk = |g: u32| {
            format!(
                r#"{{"data":[{{"from":"a","to":"b","intensity":{{"forecast":{g},"actual":null,"index":"low"}}}}]}}"#
            )
        };
        let server = TestServer::start(vec![
            Reply::ok(&uk(150)),
            Reply::ok(&uk(999)).delayed(Duration::from_secs(2)),
            Reply::ok(&uk(160)),
        ]);
        let cfg = CarbonConfig::UkGrid {
            base_url: server.base_url(),
        };
        let src = CarbonSource::start(cfg, Duration::from_millis(20), Duration::from_millis(300))
            .unwrap();
        let during = wait_for(&src, "a timeout", |s| count(s, "timeout") == 1);
        assert_eq!(during.current.as_ref().map(|i| i.g_per_kwh), Some(150.0));
        assert_eq!(during.current.as_ref().map(|i| i.zone.as_str()), Some("GB"));
        let after = wait_for(&src, "recovery", |s| {
            s.current.as_ref().is_some_and(|i| i.g_per_kwh == 160.0)
        });
        assert_eq!(after.last_error, None);
        assert_eq!(count(&after, "timeout"), 1);
        assert!(after.age.unwrap() < during.age.unwrap() + Duration::from_secs(1));
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // From at least 1 s, doubling, jitter in the upper half.
        assert_eq!(backoff(ms(10), 1, None, 0.0), ms(500));
        assert_eq!(backoff(ms(10), 1, None, 1.0), s(1));
        assert_eq!(backoff(ms(10), 3, None, 1.0), s(4));
        assert_eq!(
            backoff(s(300), 2, None, 0.0),
            s(300),
            "never below the refresh"
        );
        assert_eq!(backoff(s(300), 2, None, 1.0), s(600));
        assert_eq!(backoff(s(60), 40, None, 1.0), MAX_BACKOFF, "capped");
        // Retry-After wins when longer, capped at an hour.
        assert_eq!(backoff(ms(10), 1, Some(s(30)), 0.5), s(30));
        assert_eq!(backoff(ms(10), 1, Some(s(86_400)), 0.5), MAX_BACKOFF);
        assert_eq!(backoff(ms(10), 3, Some(s(1)), 0.0), s(2));
    }

    #[test]
    fn public_apis_are_refreshed_at_most_once_a_minute() {
        let ms = Duration::from_millis;
        assert_eq!(
            effective_refresh("https://api.carbonintensity.org.uk", ms(10)),
            MIN_PUBLIC_REFRESH
        );
        assert_eq!(
            effective_refresh(
                "https://api.electricitymap.org/v3",
                Duration::from_secs(600)
            ),
            Duration::from_secs(600)
        );
        assert_eq!(effective_refresh("http://127.0.0.1:9999", ms(10)), ms(10));
    }

    /// The reproduction of issue 10 G: `--carbon-refresh 10ms` against a server answering
    /// 429. Before the backoff this made about 73 requests/s; now a handful in 3 s.
    #[test]
    fn a_throttling_server_is_not_hammered() {
        let uk = r#"{"data":[{"from":"a","to":"b","intensity":{"forecast":150,"actual":null,"index":"low"}}]}"#;
        let server = TestServer::start(vec![Reply::ok(uk), Reply::status(429)]);
        let cfg = CarbonConfig::UkGrid {
            base_url: server.base_url(),
        };
        let src =
            CarbonSource::start(cfg, Duration::from_millis(10), Duration::from_secs(1)).unwrap();
        thread::sleep(Duration::from_secs(3));
        let n = server.requests().len();
        drop(src);
        eprintln!("requests in 3 s against a 429 server at --carbon-refresh 10ms: {n}");
        // 1 good + 429s after waits of >= 10 ms, 0.5-1 s, 1-2 s: at most 4 in 3 s.
        assert!((2..=4).contains(&n), "{n} requests in 3 s");
    }

    #[test]
    fn retry_after_is_honoured() {
        let server = TestServer::start(vec![
            Reply::status(503).header("Retry-After", "2"),
            Reply::ok(EM_250),
        ]);
        let started = Instant::now();
        let src = CarbonSource::start(
            em(&server),
            Duration::from_millis(10),
            Duration::from_secs(1),
        )
        .unwrap();
        let status = wait_for(&src, "the value after Retry-After", |s| s.current.is_some());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
        assert_eq!(count(&status, "http_5xx"), 1);
        assert_eq!(server.requests().len(), 2);
    }

    #[test]
    fn start_never_waits_for_the_network() {
        let server = TestServer::start(vec![Reply::ok(EM_250).delayed(Duration::from_secs(2))]);
        let started = Instant::now();
        let src =
            CarbonSource::start(em(&server), DEFAULT_REFRESH, Duration::from_secs(5)).unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        assert!(src.configured());
        assert_eq!(src.current(), None);
        assert_eq!(src.status().age, None);
    }

    #[test]
    fn unreachable_provider_counts_connect_errors_without_value() {
        let base_url = format!("http://127.0.0.1:{}", TestServer::closed_port());
        let cfg = CarbonConfig::UkGrid { base_url };
        let src =
            CarbonSource::start(cfg, Duration::from_millis(20), Duration::from_secs(1)).unwrap();
        let status = wait_for(&src, "connect errors", |s| count(s, "connect") >= 2);
        assert_eq!(status.current, None);
        assert_eq!(status.age, None);
        assert_eq!(status.last_error, Some("connect"));
    }

    #[test]
    fn dropping_the_source_stops_the_refresher() {
        let server = TestServer::start(vec![Reply::ok(EM_250)]);
        let src = CarbonSource::start(
            em(&server),
            Duration::from_millis(20),
            Duration::from_secs(1),
        )
        .unwrap();
        wait_for(&src, "a value", |s| s.current.is_some());
        drop(src);
        thread::sleep(Duration::from_millis(100));
        let seen = server.requests().len();
        thread::sleep(Duration::from_millis(200));
        assert_eq!(server.requests().len(), seen);
    }
}
