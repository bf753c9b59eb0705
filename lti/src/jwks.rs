//! Platform key sets: fetched from the registration's JWKS URL, cached, and
//! refetched at most once per [`JwksCache::min_refetch`] when a token names a
//! key id the cache does not know (platforms rotate keys).
//!
//! Only RSA keys of at least 2048 bits are usable; a key set entry is looked
//! up only in the key set of the registration the token claims to come from.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde_json::Value;

use crate::error::{LtiError, Result};
use crate::http::{HttpClient, redact_url};

/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// One usable platform key.
#[derive(Clone)]
pub struct PlatformKey {
    pub kid: String,
    /// The `alg` the key set pins, if any.
    pub alg: Option<String>,
    pub bits: usize,
    pub key: DecodingKey,
}

impl std::fmt::Debug for PlatformKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("bits", &self.bits)
            .finish()
    }
}

/// A parsed key set: kid → raw JWK.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Value>,
}

impl KeySet {
    /// Parses `{"keys": [...]}`; entries without a kid, or not for
    /// signatures, are skipped.
    pub fn parse(v: &Value) -> Result<KeySet> {
        let arr = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| LtiError::BadResponse {
                url: String::new(),
                reason: "a key set must be {\"keys\": [...]}".into(),
            })?;
        let mut keys = HashMap::new();
        for k in arr {
            let Some(kid) = k.get("kid").and_then(Value::as_str) else {
                continue;
            };
            if k.get("use")
                .and_then(Value::as_str)
                .is_some_and(|u| u != "sig")
            {
                continue;
            }
            keys.entry(kid.to_owned()).or_insert_with(|| k.clone());
        }
        Ok(KeySet { keys })
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The usable key `kid`: RSA, at least [`MIN_RSA_BITS`].
    pub fn key(&self, kid: &str) -> Result<PlatformKey> {
        let jwk = self.keys.get(kid).ok_or_else(|| LtiError::UnknownKid {
            kid: kid.to_owned(),
        })?;
        rsa_key(kid, jwk)
    }
}

fn rsa_key(kid: &str, jwk: &Value) -> Result<PlatformKey> {
    let unusable = |why: &str| LtiError::UnknownKid {
        kid: format!("{kid} ({why})"),
    };
    if jwk.get("kty").and_then(Value::as_str) != Some("RSA") {
        return Err(unusable("not an RSA key"));
    }
    let b64 = |name: &str| -> Result<Vec<u8>> {
        let s = jwk
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| unusable("incomplete"))?;
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| unusable("bad base64"))
    };
    let n = b64("n")?;
    let e = b64("e")?;
    let bits = modulus_bits(&n);
    if bits < MIN_RSA_BITS {
        return Err(LtiError::WeakKey {
            kid: kid.to_owned(),
            bits,
        });
    }
    let e_trimmed: Vec<u8> = e.iter().copied().skip_while(|b| *b == 0).collect();
    if e_trimmed.is_empty() || e_trimmed.last().is_some_and(|b| b % 2 == 0) || e_trimmed == [1] {
        return Err(unusable("bad exponent"));
    }
    Ok(PlatformKey {
        kid: kid.to_owned(),
        alg: jwk.get("alg").and_then(Value::as_str).map(str::to_owned),
        bits,
        key: DecodingKey::from_rsa_raw_components(&n, &e),
    })
}

/// Bit length of a big-endian unsigned integer.
pub fn modulus_bits(n: &[u8]) -> usize {
    let trimmed: &[u8] = {
        let start = n.iter().position(|b| *b != 0).unwrap_or(n.len());
        &n[start..]
    };
    match trimmed.first() {
        None => 0,
        Some(first) => trimmed.len() * 8 - first.leading_zeros() as usize,
    }
}

/// What the cache holds for one key set URL.
#[derive(Default)]
struct Slot {
    set: Option<KeySet>,
    /// When `set` was fetched.
    fetched: Option<Instant>,
    /// When the last fetch (successful or not) started.
    attempted: Option<Instant>,
    /// Why the last fetch failed, while no newer one succeeded.
    failure: Option<String>,
}

/// Caches platform key sets by URL.
///
/// One platform never waits for another: the map's lock is never held across
/// a fetch, and fetches of one URL go one at a time through that URL's own
/// gate (so concurrent launches of one platform share one fetch). A failed
/// fetch is remembered for [`JwksCache::min_refetch`] like a successful one,
/// so a platform whose key set is down or slow is asked at most once per
/// interval.
pub struct JwksCache {
    http: HttpClient,
    slots: std::sync::Mutex<HashMap<String, Slot>>,
    gates: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// A key set is refetched after this long even without a miss.
    pub ttl: Duration,
    /// At most one refetch on an unknown kid (or after a failure) per this
    /// interval and URL.
    pub min_refetch: Duration,
}

/// Most key set URLs the cache remembers (one per registration in practice).
const MAX_URLS: usize = 10_000;

impl JwksCache {
    pub fn new(http: HttpClient) -> JwksCache {
        JwksCache {
            http,
            slots: std::sync::Mutex::new(HashMap::new()),
            gates: std::sync::Mutex::new(HashMap::new()),
            ttl: Duration::from_secs(3600),
            min_refetch: Duration::from_secs(60),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic while holding this short lock leaves consistent data.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gate(&self, url: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates.len() >= MAX_URLS && !gates.contains_key(url) {
            gates.retain(|_, g| Arc::strong_count(g) > 1);
        }
        gates.entry(url.to_owned()).or_default().clone()
    }

    /// Puts a key set in the cache as if fetched now (tests, static keys).
    pub async fn preload(&self, url: &str, jwks: &Value) -> Result<()> {
        let set = KeySet::parse(jwks)?;
        let now = Instant::now();
        self.slots().insert(
            url.to_owned(),
            Slot {
                set: Some(set),
                fetched: Some(now),
                attempted: Some(now),
                failure: None,
            },
        );
        Ok(())
    }

    async fn fetch(&self, url: &str) -> Result<KeySet> {
        let resp = self
            .http
            .send(
                reqwest::Method::GET,
                url,
                &[("accept", "application/json")],
                None,
            )
            .await?
            .success()?;
        let v: Value = resp.json()?;
        KeySet::parse(&v).map_err(|e| match e {
            LtiError::BadResponse { reason, .. } => LtiError::BadResponse {
                url: redact_url(url),
                reason,
            },
            other => other,
        })
    }

    /// Whether the slot for `url` must be (re)fetched to answer `kid`.
    fn needs_fetch(&self, url: &str, kid: &str, now: Instant) -> bool {
        let slots = self.slots();
        let Some(slot) = slots.get(url) else {
            return true;
        };
        let since = |t: Option<Instant>| t.map(|t| now.duration_since(t));
        let recently_tried = since(slot.attempted).is_some_and(|d| d < self.min_refetch);
        match &slot.set {
            _ if recently_tried => false,
            None => true,
            Some(_) if since(slot.fetched).is_none_or(|d| d >= self.ttl) => true,
            Some(set) => !set.contains(kid),
        }
    }

    /// The key `kid` from the key set at `url`, fetching the set when it is
    /// not cached or stale, and refetching once (rate-limited) on a miss.
    pub async fn key(&self, url: &str, kid: &str) -> Result<PlatformKey> {
        if self.needs_fetch(url, kid, Instant::now()) {
            let gate = self.gate(url);
            let _one_at_a_time = gate.lock().await;
            // Another launch may have fetched while this one waited.
            if self.needs_fetch(url, kid, Instant::now()) {
                {
                    let mut slots = self.slots();
                    if slots.len() >= MAX_URLS && !slots.contains_key(url) {
                        slots.clear();
                    }
                    slots.entry(url.to_owned()).or_default().attempted = Some(Instant::now());
                }
                let fetched = self.fetch(url).await;
                let mut slots = self.slots();
                let slot = slots.entry(url.to_owned()).or_default();
                match fetched {
                    Ok(set) => {
                        tracing::debug!(url = %redact_url(url), keys = set.len(), "fetched platform key set");
                        slot.set = Some(set);
                        slot.fetched = Some(Instant::now());
                        slot.failure = None;
                    }
                    Err(e) => {
                        // A stale set still serves its keys while the platform is down.
                        tracing::warn!(url = %redact_url(url), error = %e, "fetching a platform key set failed");
                        slot.failure = Some(e.to_string());
                        if slot.set.is_none() {
                            return Err(e);
                        }
                    }
                }
            }
        }
        let slots = self.slots();
        match slots.get(url) {
            Some(Slot { set: Some(set), .. }) => set.key(kid),
            Some(Slot {
                failure: Some(why), ..
            }) => Err(LtiError::BadResponse {
                url: redact_url(url),
                reason: format!("the key set could not be fetched recently ({why}); retried later"),
            }),
            _ => Err(LtiError::UnknownKid {
                kid: kid.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key set endpoint that answers 500 and counts the requests.
    async fn failing_endpoint() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        (url, hits)
    }

    #[tokio::test]
    async fn a_failed_fetch_is_remembered_for_the_refetch_interval() {
        let http = HttpClient::new(
            crate::http::UrlPolicy {
                allow_insecure: true,
            },
            "test",
        )
        .expect("client");
        let mut cache = JwksCache::new(http);
        cache.min_refetch = Duration::from_millis(300);
        let (url, hits) = failing_endpoint().await;
        let hits = || hits.load(std::sync::atomic::Ordering::SeqCst);
        assert!(cache.key(&url, "k1").await.is_err());
        assert_eq!(hits(), 1);
        for kid in ["k1", "k2", "k3"] {
            assert!(cache.key(&url, kid).await.is_err());
        }
        assert_eq!(hits(), 1, "no refetch within the interval after a failure");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(cache.key(&url, "k1").await.is_err());
        assert_eq!(hits(), 2, "one retry once the interval has passed");
    }

    #[test]
    fn bit_lengths() {
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(modulus_bits(&[0, 0, 1]), 1);
        assert_eq!(modulus_bits(&[0x80, 0]), 16);
        assert_eq!(modulus_bits(&[0, 0x7f, 0]), 15);
    }

    #[test]
    fn small_and_non_rsa_keys_are_refused() {
        let n512 = URL_SAFE_NO_PAD.encode([0xc5u8; 64]);
        let n2048 = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let set = KeySet::parse(&serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "small", "n": n512, "e": "AQAB"},
            {"kty": "RSA", "kid": "ok", "n": n2048, "e": "AQAB", "alg": "RS256"},
            {"kty": "RSA", "kid": "even-e", "n": n2048, "e": "Ag"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": n2048, "e": "AQAB"},
            {"kty": "RSA", "n": n2048, "e": "AQAB"}
        ]}))
        .expect("parse");
        assert!(matches!(
            set.key("small"),
            Err(LtiError::WeakKey { bits: 512, .. })
        ));
        let k = set.key("ok").expect("usable");
        assert_eq!(k.bits, 2048);
        assert_eq!(k.alg.as_deref(), Some("RS256"));
        for kid in ["even-e", "ec", "hmac", "enc", "missing"] {
            assert_eq!(set.key(kid).expect_err(kid).code(), "unknown_kid", "{kid}");
        }
    }
}
