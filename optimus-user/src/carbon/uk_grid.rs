//! National Grid ESO Carbon Intensity API (Great Britain), `GET /intensity`: the national
//! value for the current half hour. No authentication.
//! <https://carbon-intensity.github.io/api-definitions/>

use serde::Deserialize;

use super::http::{self, FetchError};

/// Default API root; the path is appended to it.
pub const DEFAULT_BASE_URL: &str = "https://api.carbonintensity.org.uk";

/// Zone label for the national figure.
pub const ZONE: &str = "GB";

#[derive(Debug, Deserialize)]
struct Answer {
    data: Vec<Period>,
}

#[derive(Debug, Deserialize)]
struct Period {
    intensity: Values,
}

/// g CO2/kWh. `actual` is null until the half hour has been measured.
#[derive(Debug, Deserialize)]
struct Values {
    forecast: Option<f64>,
    actual: Option<f64>,
}

/// Fetches the national carbon intensity for the current half hour, g CO2/kWh: the measured
/// value when there is one, else the forecast.
pub fn fetch(agent: &ureq::Agent, base_url: &str) -> Result<f64, FetchError> {
    let url = format!("{}/intensity", base_url.trim_end_matches('/'));
    parse(&http::get_body(agent.get(&url))?)
}

pub(crate) fn parse(body: &[u8]) -> Result<f64, FetchError> {
    let answer: Answer = serde_json::from_slice(body).map_err(FetchError::malformed)?;
    let period = answer
        .data
        .first()
        .ok_or(FetchError::NoData("data is empty"))?;
    let value = period
        .intensity
        .actual
        .or(period.intensity.forecast)
        .ok_or(FetchError::NoData("neither actual nor forecast is set"))?;
    http::check_intensity(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::test_server::{Reply, TestServer};
    use super::*;

    /// The documented example answer.
    const DOC_ANSWER: &str = r#"{
        "data": [{
            "from": "2018-01-20T12:00Z",
            "to": "2018-01-20T12:30Z",
            "intensity": { "forecast": 266, "actual": 263, "index": "moderate" }
        }]
    }"#;

    fn fetch_from(server: &TestServer, timeout: Duration) -> Result<f64, FetchError> {
        fetch(&http::agent(timeout), &server.base_url())
    }

    fn kind_of(reply: Reply) -> &'static str {
        let server = TestServer::start(vec![reply]);
        fetch_from(&server, Duration::from_secs(2))
            .map_err(|e| e.kind())
            .unwrap_err()
    }

    #[test]
    fn uses_actual_when_present() {
        let server = TestServer::start(vec![Reply::ok(DOC_ANSWER)]);
        assert_eq!(
            fetch_from(&server, Duration::from_secs(2)).ok(),
            Some(263.0)
        );
        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        assert!(
            requests[0].starts_with("GET /intensity HTTP/1.1\r\n"),
            "{}",
            requests[0]
        );
    }

    #[test]
    fn falls_back_to_forecast() {
        for body in [
            r#"{"data":[{"from":"a","to":"b","intensity":{"forecast":120,"actual":null,"index":"low"}}]}"#,
            r#"{"data":[{"intensity":{"forecast":120,"index":"low"}}]}"#,
        ] {
            let server = TestServer::start(vec![Reply::ok(body)]);
            assert_eq!(
                fetch_from(&server, Duration::from_secs(2)).ok(),
                Some(120.0),
                "{body}"
            );
        }
    }

    #[test]
    fn empty_answers_are_no_data() {
        assert_eq!(kind_of(Reply::ok(r#"{"data":[]}"#)), "no_data");
        let nulls = r#"{"data":[{"intensity":{"forecast":null,"actual":null}}]}"#;
        assert_eq!(kind_of(Reply::ok(nulls)), "no_data");
    }

    #[test]
    fn http_failures_are_counted_by_kind() {
        assert_eq!(kind_of(Reply::status(401)), "http_401");
        assert_eq!(kind_of(Reply::status(429)), "http_429");
        assert_eq!(kind_of(Reply::status(500)), "http_5xx");
        assert_eq!(kind_of(Reply::status(400)), "http_4xx");
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
            "null",
            r#"{"data":{}}"#,
            r#"{"data":[{"intensity":{"forecast":"266"}}]}"#,
            r#"{"error":{"code":"400 Bad Request"}}"#,
        ] {
            assert_eq!(kind_of(Reply::ok(body)), "malformed", "{body}");
        }
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for value in ["-3", "5001", "1e400"] {
            let body = format!(r#"{{"data":[{{"intensity":{{"forecast":1,"actual":{value}}}}}]}}"#);
            assert_eq!(kind_of(Reply::ok(&body)), "malformed", "{body}");
        }
    }
}
