//! A small client of the Prometheus HTTP API (`/api/v1/query`): PromQL in, labelled values
//! out. Bounded: one timeout per request and a cap on the answer's size.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::time::Duration;

use serde::Deserialize;

/// Largest answer read (a fleet of thousands of VMs fits many times over).
const MAX_ANSWER_BYTES: u64 = 32 << 20;

/// Why Prometheus could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("cannot reach Prometheus at {url}: {message}; check --prometheus URL and that Prometheus runs")]
    Unreachable { url: String, message: String },
    #[error("Prometheus at {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("Prometheus refused the query `{query}`: {error_type}: {error}")]
    Query {
        query: String,
        error_type: String,
        error: String,
    },
    #[error("Prometheus' answer to `{query}` is not what its API documents: {message}")]
    Malformed { query: String, message: String },
}

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    /// The value; NaN and infinities are passed through (a broken exporter may serve them).
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A Prometheus server.
#[derive(Debug)]
pub struct Prom {
    agent: ureq::Agent,
    base: String,
    /// Evaluation time of every query (unix s), so that all of them describe one instant.
    at: Option<i64>,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default)]
    error: String,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl Prom {
    pub fn new(base: &str, timeout: Duration) -> Prom {
        Prom {
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            base: base.trim_end_matches('/').to_owned(),
            at: None,
        }
    }

    /// Evaluates every query at unix time `t` instead of the server's now.
    #[must_use]
    pub fn at(mut self, t: i64) -> Prom {
        self.at = Some(t);
        self
    }

    /// The base URL, for messages.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// An instant query at the server's now.
    pub fn query(&self, query: &str) -> Result<Vec<Series>, PromError> {
        let url = format!("{}/api/v1/query", self.base);
        let mut request = self.agent.get(&url).query("query", query);
        if let Some(t) = self.at {
            request = request.query("time", &t.to_string());
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                let body = read_capped(r).unwrap_or_default();
                // Prometheus answers 400/422 with its JSON error for a bad query.
                if let Ok(a) = serde_json::from_slice::<Answer>(&body) {
                    if a.status == "error" {
                        return Err(PromError::Query {
                            query: query.to_owned(),
                            error_type: a.error_type,
                            error: a.error,
                        });
                    }
                }
                return Err(PromError::Status {
                    url,
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                });
            }
            Err(ureq::Error::Transport(t)) => {
                // Transport errors lead with the whole URL, which the message already has.
                let mut message = t.kind().to_string();
                for part in [
                    t.message().map(str::to_owned),
                    std::error::Error::source(&t).map(ToString::to_string),
                ]
                .into_iter()
                .flatten()
                {
                    message = format!("{message}: {part}");
                }
                return Err(PromError::Unreachable {
                    url: self.base.clone(),
                    message,
                });
            }
        };
        let body = read_capped(response).map_err(|e| PromError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        })?;
        parse(query, &body)
    }
}

fn read_capped(r: ureq::Response) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    r.into_reader()
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut body)?;
    Ok(body)
}

/// The `data.result` of an instant-vector answer.
pub fn parse(query: &str, body: &[u8]) -> Result<Vec<Series>, PromError> {
    let malformed = |message: String| PromError::Malformed {
        query: query.to_owned(),
        message,
    };
    let answer: Answer = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
    if answer.status != "success" {
        return Err(PromError::Query {
            query: query.to_owned(),
            error_type: answer.error_type,
            error: answer.error,
        });
    }
    let data = answer.data.ok_or_else(|| malformed("no data".to_owned()))?;
    if data.result_type != "vector" {
        return Err(malformed(format!(
            "resultType is {}, not vector",
            data.result_type
        )));
    }
    data.result
        .into_iter()
        .map(|s| {
            // Prometheus writes values as strings, with NaN, +Inf and -Inf spelled out.
            let value = match s.value.1.as_str() {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .map_err(|_| malformed(format!("value {v:?} is not a number")))?,
            };
            Ok(Series {
                labels: s.metric,
                value,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vectors_parse_with_special_values() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"instance":"a"},"value":[1.5,"42.5"]},
            {"metric":{"instance":"b"},"value":[1.5,"NaN"]}]}}"#;
        let r = parse("q", body).unwrap();
        assert_eq!(r[0].label("instance"), Some("a"));
        assert_eq!(r[0].value, 42.5);
        assert!(r[1].value.is_nan());
    }

    #[test]
    fn errors_say_what_happened() {
        let e = parse(
            "q",
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad_data: parse error"), "{e}");
        assert!(parse("q", b"<html>").is_err());
        assert!(parse(
            "q",
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#
        )
        .is_err());
    }

    #[test]
    fn unreachable_server_is_one_line() {
        let prom = Prom::new("http://127.0.0.1:1", Duration::from_secs(2));
        let e = prom.query("up").unwrap_err().to_string();
        assert!(
            e.starts_with("cannot reach Prometheus at http://127.0.0.1:1"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
