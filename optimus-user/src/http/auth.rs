//! HTTP basic auth against the web config's bcrypt hashes: an `Authorization` header in,
//! allowed or not out. bcrypt costs tens of milliseconds per check by design, so a
//! verified (user, password) pair is remembered by its SHA-256 (never the password), the
//! checks run off the async threads, and at most two run at once: a client guessing
//! passwords slows only its own requests, never the sampler or a scrape that already
//! holds the right credentials.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::sync::Semaphore;

/// Cached successes are forgotten past this many (a new user or a password change
/// refills it); it bounds memory whatever clients send.
const CACHE_LIMIT: usize = 1024;
/// Longest base64 credentials looked at (bcrypt reads at most 72 password bytes anyway).
const MAX_CREDENTIALS: usize = 4096;
/// Concurrent bcrypt checks.
const CHECKS_AT_ONCE: usize = 2;

/// The users of a web config and what has been verified already.
#[derive(Debug)]
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
    checks: Semaphore,
    /// Checked for unknown users, so they cost the same time as known ones (no user
    /// enumeration by timing), as exporter-toolkit does.
    dummy_hash: String,
}

impl BasicAuth {
    /// `None` when the config has no users: every request is then allowed.
    pub fn new(users: BTreeMap<String, String>) -> Option<Arc<BasicAuth>> {
        if users.is_empty() {
            return None;
        }
        // Cost of the first user's hash, so the dummy check takes as long as a real one.
        let cost = users
            .values()
            .next()
            .and_then(|h| h.parse::<bcrypt::HashParts>().ok())
            .map_or(bcrypt::DEFAULT_COST, |p| p.get_cost());
        let dummy_hash = bcrypt::hash("optimus-dummy", cost).unwrap_or_default();
        Some(Arc::new(BasicAuth {
            users,
            verified: Mutex::new(HashSet::new()),
            checks: Semaphore::new(CHECKS_AT_ONCE),
            dummy_hash,
        }))
    }

    /// Whether the `Authorization` header value (if any) names a user with its password.
    pub async fn allows(self: &Arc<Self>, header: Option<&[u8]>) -> bool {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return false;
        };
        let digest = fingerprint(&user, &password);
        if self.lock().contains(&digest) {
            return true;
        }
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let me = Arc::clone(self);
        let ok = tokio::task::spawn_blocking(move || {
            let (hash, known) = match me.users.get(&user) {
                Some(h) => (h.as_str(), true),
                None => (me.dummy_hash.as_str(), false),
            };
            bcrypt::verify(&password, hash).unwrap_or(false) && known
        })
        .await
        .unwrap_or(false);
        if ok {
            let mut cache = self.lock();
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(digest);
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// SHA-256 of the pair, with a separator that cannot occur in a user name.
fn fingerprint(user: &str, password: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(user.as_bytes());
    ctx.update(b":");
    ctx.update(password.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    if encoded.len() > MAX_CREDENTIALS {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        assert_eq!(
            parse_basic(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==").unwrap(),
            ("Aladdin".into(), "open sesame".into())
        );
        assert!(parse_basic(b"Bearer abc").is_none());
        assert!(parse_basic(b"Basic").is_none());
        assert!(parse_basic(b"Basic YWJj").is_none()); // no colon
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn right_password_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(BTreeMap::from([("prom".to_owned(), hash)])).unwrap();
        // "prom:s3cret", "prom:wrong", "eve:s3cret"
        assert!(auth.allows(Some(b"Basic cHJvbTpzM2NyZXQ=")).await);
        assert!(auth.allows(Some(b"Basic cHJvbTpzM2NyZXQ=")).await, "cached");
        assert!(!auth.allows(Some(b"Basic cHJvbTp3cm9uZw==")).await);
        assert!(!auth.allows(Some(b"Basic ZXZlOnMzY3JldA==")).await);
        assert!(!auth.allows(None).await);
        assert!(BasicAuth::new(BTreeMap::new()).is_none());
    }
}
