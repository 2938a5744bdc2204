//! The HTTP plumbing shared by the providers: one blocking agent, a size-capped body read and
//! the mapping of every way a fetch can fail onto a small, fixed set of error kinds (metric
//! label values, so they never come from fetched data).

use std::io::{self, Read};
use std::time::Duration;

/// Largest response body read from a provider; a latest-value answer is well under 1 KiB.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Highest carbon intensity accepted, g CO2eq/kWh. Real grids stay under about 1,200 (coal);
/// anything above this is a broken or hostile answer, not a dirty grid.
pub const MAX_G_PER_KWH: f64 = 5000.0;

const USER_AGENT: &str = concat!("optimus/", env!("CARGO_PKG_VERSION"));

/// Why one fetch failed. [`FetchError::kind`] is the bounded label it is counted under.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("http status {0}")]
    Status(u16),
    /// A 429 or 5xx that said when to come back (`Retry-After`).
    #[error("http status {code}, retry after {} s", after.as_secs())]
    RetryAfter { code: u16, after: Duration },
    #[error("timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("no value in response: {0}")]
    NoData(&'static str),
    #[error("bad http response: {0}")]
    Protocol(String),
    #[error("transport error: {0}")]
    Transport(String),
}

impl FetchError {
    /// The error counter label for this failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Status(401) => "http_401",
            Self::Status(403) => "http_403",
            Self::Status(429) => "http_429",
            Self::Status(400..=499) => "http_4xx",
            Self::Status(500..=599) => "http_5xx",
            Self::Status(_) => "http_other",
            Self::RetryAfter { code, .. } => Self::Status(*code).kind(),
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
            Self::NoData(_) => "no_data",
            Self::Protocol(_) => "protocol",
            Self::Transport(_) => "transport",
        }
    }

    /// A JSON decoding failure. serde_json's message quotes at most a short token of the
    /// input; it is cut anyway so a hostile answer cannot flood the log.
    pub fn malformed(err: impl std::fmt::Display) -> Self {
        let mut msg = err.to_string();
        if let Some((cut, _)) = msg.char_indices().nth(200) {
            msg.truncate(cut);
        }
        Self::Malformed(msg)
    }
}

/// One agent per refresher: `timeout` bounds the whole request (connect, headers and body).
/// Redirects are not followed, so the `auth-token` header never goes to another host.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(timeout)
        .timeout(timeout)
        .redirects(0)
        .user_agent(USER_AGENT)
        .build()
}

/// Sends `request` and returns its body: at most [`MAX_RESPONSE_BYTES`], from a 2xx answer.
pub fn get_body(request: ureq::Request) -> Result<Vec<u8>, FetchError> {
    let response = request
        .set("accept", "application/json")
        .call()
        .map_err(from_ureq)?;
    let status = response.status();
    if !(200..300).contains(&status) {
        return Err(FetchError::Status(status));
    }
    read_capped(response.into_reader(), MAX_RESPONSE_BYTES)
}

fn read_capped(reader: impl Read, cap: usize) -> Result<Vec<u8>, FetchError> {
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let mut body = Vec::new();
    reader
        .take(limit)
        .read_to_end(&mut body)
        .map_err(|err| from_io(&err))?;
    if body.len() > cap {
        return Err(FetchError::TooLarge);
    }
    Ok(body)
}

/// Checks a fetched intensity, g CO2eq/kWh: finite and within `0..=MAX_G_PER_KWH`.
pub fn check_intensity(value: f64) -> Result<f64, FetchError> {
    if value.is_finite() && (0.0..=MAX_G_PER_KWH).contains(&value) {
        Ok(value)
    } else {
        Err(FetchError::Malformed(format!(
            "carbon intensity {value} is outside 0..={MAX_G_PER_KWH} g/kWh"
        )))
    }
}

/// Why a base URL is refused, or `None` when it is usable: `https://`, or `http://` to a
/// loopback host (tests, a local caching proxy). A token must never cross a network in clear.
pub fn base_url_problem(url: &str) -> Option<&'static str> {
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://") {
        if !is_loopback_authority(authority(rest)) {
            return Some("must use https (plain http only to a loopback address)");
        }
        rest
    } else {
        return Some("must start with https://");
    };
    let host = authority(rest);
    if host.is_empty() {
        Some("has no host")
    } else if host.contains('@') {
        Some("must not carry credentials")
    } else if rest.contains(['?', '#']) || rest.chars().any(char::is_whitespace) {
        Some("must not carry a query, a fragment or spaces")
    } else {
        None
    }
}

impl FetchError {
    /// Whether the server asked to be left alone (429 or 5xx): the refresher backs off.
    pub fn is_throttle(&self) -> bool {
        match self {
            Self::Status(code) | Self::RetryAfter { code, .. } => *code == 429 || *code >= 500,
            _ => false,
        }
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }
}

/// A `Retry-After` value: delay-seconds, or an IMF-fixdate (`Wed, 21 Oct 2015 07:28:00
/// GMT`) turned into the delay from now (0 if past). Anything else: `None`.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = imf_fixdate_unix(value)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the Unix epoch of an IMF-fixdate (RFC 9110 5.6.7).
fn imf_fixdate_unix(text: &str) -> Option<u64> {
    let (_, rest) = text.split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month_name = parts.next()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month_name)?;
    let year: u64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(str::parse::<u64>);
    let (h, m, s) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
    if parts.next()? != "GMT"
        || !(1..=31).contains(&day)
        || year < 1970
        || h > 23
        || m > 59
        || s > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), for years from 1970.
    let month = u64::try_from(month).ok()? + 1;
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// Whether `url` (`http://HOST…`, `https://HOST…`) names a loopback host.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    is_loopback_authority(authority(rest))
}

fn authority(after_scheme: &str) -> &str {
    after_scheme.split('/').next().unwrap_or_default()
}

fn is_loopback_authority(authority: &str) -> bool {
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn from_ureq(err: ureq::Error) -> FetchError {
    match err {
        ureq::Error::Status(code, response) => {
            match response.header("retry-after").and_then(parse_retry_after) {
                Some(after) if code == 429 || code >= 500 => FetchError::RetryAfter { code, after },
                _ => FetchError::Status(code),
            }
        }
        ureq::Error::Transport(transport) => from_transport(&transport),
    }
}

fn from_transport(transport: &ureq::Transport) -> FetchError {
    use ureq::ErrorKind;
    // ureq reports an expired deadline as an io::Error of kind TimedOut somewhere in the
    // source chain, whether it hit while connecting, sending or reading.
    if io_kind_in_chain(transport).is_some_and(is_timeout) {
        return FetchError::Timeout;
    }
    let msg = transport.to_string();
    match transport.kind() {
        ErrorKind::Dns | ErrorKind::ConnectionFailed | ErrorKind::ProxyConnect => {
            FetchError::Connect(msg)
        }
        ErrorKind::BadStatus | ErrorKind::BadHeader => FetchError::Protocol(msg),
        _ => FetchError::Transport(msg),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod retry_after_tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            imf_fixdate_unix("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1_445_412_480)
        );
        assert_eq!(imf_fixdate_unix("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        for bad in ["soon", "-5", "Wed, 21 Foo 2015 07:28:00 GMT", ""] {
            assert_eq!(parse_retry_after(bad), None, "{bad}");
        }
        assert!(is_loopback_url("http://127.0.0.1:8080"));
        assert!(is_loopback_url("http://[::1]:1/x"));
        assert!(!is_loopback_url("https://api.carbonintensity.org.uk"));
    }
}

fn io_kind_in_chain(err: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        next = err.source();
    }
    None
}

fn is_timeout(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

fn from_io(err: &io::Error) -> FetchError {
    if is_timeout(err.kind()) {
        FetchError::Timeout
    } else {
        FetchError::Transport(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_bounded_kinds() {
        let kinds: Vec<_> = [401, 403, 429, 404, 500, 503, 301]
            .into_iter()
            .map(|code| FetchError::Status(code).kind())
            .collect();
        assert_eq!(
            kinds,
            [
                "http_401",
                "http_403",
                "http_429",
                "http_4xx",
                "http_5xx",
                "http_5xx",
                "http_other"
            ]
        );
    }

    #[test]
    fn intensity_range_is_enforced() {
        assert_eq!(check_intensity(0.0).ok(), Some(0.0));
        assert_eq!(check_intensity(5000.0).ok(), Some(5000.0));
        for bad in [-0.5, 5000.1, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(check_intensity(bad).map_err(|e| e.kind()), Err("malformed"));
        }
    }

    #[test]
    fn body_cap_is_exact() {
        let at_cap = [b'x'; 16];
        assert_eq!(read_capped(&at_cap[..], 16).map(|b| b.len()).ok(), Some(16));
        let over = [b'x'; 17];
        assert_eq!(
            read_capped(&over[..], 16).map_err(|e| e.kind()),
            Err("too_large")
        );
    }

    #[test]
    fn malformed_message_is_cut() {
        let err = FetchError::malformed("y".repeat(10_000));
        assert!(err.to_string().len() < 300);
    }

    #[test]
    fn base_url_must_be_https_or_loopback_http() {
        for ok in [
            "https://api.electricitymap.org",
            "https://api.carbonintensity.org.uk/",
            "https://proxy.example:8443/em",
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:9000/x",
        ] {
            assert_eq!(base_url_problem(ok), None, "{ok}");
        }
        for bad in [
            "http://api.electricitymap.org",
            "http://10.0.0.1",
            "http://127.0.0.1.evil.example",
            "ftp://x",
            "api.electricitymap.org",
            "https://",
            "https://user:pw@host",
            "https://host/?zone=DE",
            "https://host/#x",
            "https://ho st",
        ] {
            assert!(base_url_problem(bad).is_some(), "{bad}");
        }
    }
}
