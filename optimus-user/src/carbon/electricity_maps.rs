//! Electricity Maps API v3, `GET /v3/carbon-intensity/latest?zone=..`.
//!
//! Auth is an `auth-token` header. Without a usable zone the API falls back to locating the
//! caller by IP; `shouldUseFallbackCallerLookup=false` turns that off, so a typo in the zone
//! is an error instead of silently reporting the grid of wherever the egress IP geolocates.
//! <https://static.electricitymaps.com/api/docs/index.html>

use serde::Deserialize;

use super::http::{self, FetchError};

/// Default API root; the path is appended to it.
pub const DEFAULT_BASE_URL: &str = "https://api.electricitymap.org";

/// Environment variable holding the API token.
pub const TOKEN_ENV: &str = "ELECTRICITYMAPS_TOKEN";

/// The part of the documented answer used here (`datetime`, `updatedAt`, `isEstimated`,
/// `estimationMethod`, ... are ignored). `carbonIntensity` is g CO2eq/kWh and can be null
/// when the zone has a data gap.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Latest {
    zone: Option<String>,
    carbon_intensity: Option<f64>,
}

/// Fetches the latest carbon intensity of `zone`, g CO2eq/kWh.
pub fn fetch(
    agent: &ureq::Agent,
    base_url: &str,
    zone: &str,
    token: Option<&str>,
) -> Result<f64, FetchError> {
    parse(
        &http::get_body(request(agent, base_url, "latest", zone, token))?,
        zone,
    )
}

/// A GET of `/v3/carbon-intensity/<endpoint>` for `zone`: never with the caller's IP as
/// the zone (`shouldUseFallbackCallerLookup=false`), the token as `auth-token` if given.
pub(crate) fn request(
    agent: &ureq::Agent,
    base_url: &str,
    endpoint: &str,
    zone: &str,
    token: Option<&str>,
) -> ureq::Request {
    let url = format!(
        "{}/v3/carbon-intensity/{endpoint}",
        base_url.trim_end_matches('/')
    );
    let request = agent
        .get(&url)
        .query("zone", zone)
        .query("shouldUseFallbackCallerLookup", "false");
    match token {
        Some(token) => request.set("auth-token", token),
        None => request,
    }
}

pub(crate) fn parse(body: &[u8], zone: &str) -> Result<f64, FetchError> {
    let latest: Latest = serde_json::from_slice(body).map_err(FetchError::malformed)?;
    if let Some(answered) = latest.zone.as_deref() {
        if !answered.eq_ignore_ascii_case(zone) {
            return Err(FetchError::Malformed(format!(
                "answer is for zone {answered:?}, asked for {zone:?}"
            )));
        }
    }
    let value = latest
        .carbon_intensity
        .ok_or(FetchError::NoData("carbonIntensity is null or missing"))?;
    http::check_intensity(value)
}

/// Reads the token from [`TOKEN_ENV`]; unset or blank is `None`.
pub fn token_from_env() -> Option<String> {
    std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// A zone key as listed by `/v3/zones`: `DE`, `US-CAL-CISO`, `DK-DK1`.
pub fn is_zone_key(zone: &str) -> bool {
    !zone.is_empty()
        && zone.len() <= 64
        && zone
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A token that can go in a header: printable ASCII without spaces.
pub fn is_token(token: &str) -> bool {
    !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::test_server::{Reply, TestServer};
    use super::*;

    /// The documented example answer, with the fields newer API versions add.
    const DOC_ANSWER: &str = r#"{
        "zone": "DE",
        "carbonIntensity": 302,
        "datetime": "2018-04-25T18:07:00.350Z",
        "updatedAt": "2018-04-25T18:07:01.000Z",
        "createdAt": "2018-04-25T18:07:01.000Z",
        "emissionFactorType": "lifecycle",
        "isEstimated": false,
        "estimationMethod": null
    }"#;

    fn fetch_from(server: &TestServer, timeout: Duration) -> Result<f64, FetchError> {
        let agent = http::agent(timeout);
        fetch(&agent, &server.base_url(), "DE", Some("s3cret-token"))
    }

    fn kind_of(reply: Reply) -> &'static str {
        let server = TestServer::start(vec![reply]);
        fetch_from(&server, Duration::from_secs(2))
            .map_err(|e| e.kind())
            .unwrap_err()
    }

    #[test]
    fn sends_zone_token_and_no_caller_lookup_and_parses_documented_answer() {
        let server = TestServer::start(vec![Reply::ok(DOC_ANSWER)]);
        assert_eq!(
            fetch_from(&server, Duration::from_secs(2)).ok(),
            Some(302.0)
        );

        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        let head = &requests[0];
        let request_line = head.lines().next().unwrap();
        assert!(
            request_line.starts_with("GET /v3/carbon-intensity/latest?"),
            "{request_line}"
        );
        assert!(request_line.contains("zone=DE"), "{request_line}");
        assert!(
            request_line.contains("shouldUseFallbackCallerLookup=false"),
            "{request_line}"
        );
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case("auth-token: s3cret-token")),
            "{head}"
        );
    }

    #[test]
    fn no_token_means_no_auth_header() {
        let server = TestServer::start(vec![Reply::ok(DOC_ANSWER)]);
        let agent = http::agent(Duration::from_secs(2));
        assert_eq!(
            fetch(&agent, &server.base_url(), "DE", None).ok(),
            Some(302.0)
        );
        let head = &server.requests()[0];
        assert!(!head.to_ascii_lowercase().contains("auth-token"), "{head}");
    }

    #[test]
    fn trailing_slash_in_base_url_is_tolerated() {
        let server = TestServer::start(vec![Reply::ok(DOC_ANSWER)]);
        let agent = http::agent(Duration::from_secs(2));
        let base = format!("{}/", server.base_url());
        assert_eq!(fetch(&agent, &base, "DE", None).ok(), Some(302.0));
        assert!(server.requests()[0].starts_with("GET /v3/carbon-intensity/latest?"));
    }

    #[test]
    fn http_failures_are_counted_by_kind() {
        assert_eq!(kind_of(Reply::status(401)), "http_401");
        assert_eq!(kind_of(Reply::status(429)), "http_429");
        assert_eq!(kind_of(Reply::status(500)), "http_5xx");
        assert_eq!(kind_of(Reply::status(503)), "http_5xx");
        assert_eq!(kind_of(Reply::status(404)), "http_4xx");
        // Not followed: the token must not be replayed to wherever Location points.
        assert_eq!(kind_of(Reply::status(302)), "http_other");
    }

    #[test]
    fn slow_answer_times_out() {
        let server = TestServer::start(vec![Reply::ok(DOC_ANSWER).delayed(Duration::from_secs(2))]);
        let started = Instant::now();
        let result = fetch_from(&server, Duration::from_millis(300));
        assert_eq!(result.map_err(|e| e.kind()), Err("timeout"));
        assert!(started.elapsed() < Duration::from_millis(1500));
    }

    #[test]
    fn malformed_answers_are_rejected() {
        for body in [
            "{",
            "",
            "[]",
            "<html>Bad gateway</html>",
            r#"{"zone":"DE","carbonIntensity":"high"}"#,
        ] {
            assert_eq!(kind_of(Reply::ok(body)), "malformed", "{body}");
        }
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for value in ["-1", "5000.5", "1e308"] {
            let body = format!(r#"{{"zone":"DE","carbonIntensity":{value}}}"#);
            assert_eq!(kind_of(Reply::ok(&body)), "malformed", "{body}");
        }
    }

    #[test]
    fn null_intensity_is_no_data() {
        let body = r#"{"zone":"DE","carbonIntensity":null,"isEstimated":true}"#;
        assert_eq!(kind_of(Reply::ok(body)), "no_data");
    }

    #[test]
    fn answer_for_another_zone_is_rejected() {
        let body = r#"{"zone":"FR","carbonIntensity":50}"#;
        assert_eq!(kind_of(Reply::ok(body)), "malformed");
    }

    #[test]
    fn oversized_answer_is_rejected() {
        let padding = " ".repeat(http::MAX_RESPONSE_BYTES);
        let body = format!(r#"{{"zone":"DE","carbonIntensity":300}}{padding}"#);
        assert_eq!(kind_of(Reply::ok(&body)), "too_large");
    }

    #[test]
    fn refused_connection_is_connect() {
        let port = TestServer::closed_port();
        let agent = http::agent(Duration::from_secs(2));
        let result = fetch(&agent, &format!("http://127.0.0.1:{port}"), "DE", None);
        assert_eq!(result.map_err(|e| e.kind()), Err("connect"));
    }

    #[test]
    fn zone_keys_and_tokens_are_validated() {
        for ok in ["DE", "US-CAL-CISO", "DK-DK1", "GB"] {
            assert!(is_zone_key(ok), "{ok}");
        }
        for bad in ["", "DE&x=1", "DE ", "../x", &"A".repeat(65)] {
            assert!(!is_zone_key(bad), "{bad}");
        }
        assert!(is_token("abc123-_.XYZ"));
        for bad in ["", "a b", "a\r\nx: y", "tök"] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }
}
