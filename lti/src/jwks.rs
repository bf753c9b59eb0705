//! Platform key sets: fetched from the registration's JWKS URL, cached, and
//! refetched at most once per [`JwksCache::min_refetch`] when a token names a
//! key id the cache does not know (platforms rotate keys).
//!
//! Only RSA keys of at least 2048 bits are usable; a key set entry is looked
//! up only in the key set of the registration the token claims to come from.

use std::collections::HashMap;
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

struct Entry {
    set: KeySet,
    fetched: Instant,
}

/// Caches platform key sets by URL.
pub struct JwksCache {
    http: HttpClient,
    entries: tokio::sync::Mutex<HashMap<String, Entry>>,
    /// A key set is refetched after this long even without a miss.
    pub ttl: Duration,
    /// At most one refetch on an unknown kid per this interval and URL.
    pub min_refetch: Duration,
}

impl JwksCache {
    pub fn new(http: HttpClient) -> JwksCache {
        JwksCache {
            http,
            entries: tokio::sync::Mutex::new(HashMap::new()),
            ttl: Duration::from_secs(3600),
            min_refetch: Duration::from_secs(60),
        }
    }

    /// Puts a key set in the cache as if fetched now (tests, static keys).
    pub async fn preload(&self, url: &str, jwks: &Value) -> Result<()> {
        let set = KeySet::parse(jwks)?;
        self.entries.lock().await.insert(
            url.to_owned(),
            Entry {
                set,
                fetched: Instant::now(),
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

    /// The key `kid` from the key set at `url`, fetching the set when it is
    /// not cached or stale, and refetching once (rate-limited) on a miss.
    pub async fn key(&self, url: &str, kid: &str) -> Result<PlatformKey> {
        let mut entries = self.entries.lock().await;
        let now = Instant::now();
        let needs_fetch = match entries.get(url) {
            None => true,
            Some(e) if now.duration_since(e.fetched) >= self.ttl => true,
            Some(e) if !e.set.contains(kid) => now.duration_since(e.fetched) >= self.min_refetch,
            Some(_) => false,
        };
        if needs_fetch {
            match self.fetch(url).await {
                Ok(set) => {
                    tracing::debug!(url = %redact_url(url), keys = set.len(), "fetched platform key set");
                    entries.insert(
                        url.to_owned(),
                        Entry {
                            set,
                            fetched: Instant::now(),
                        },
                    );
                }
                // A stale set still serves its keys while the platform is down.
                Err(e) if entries.contains_key(url) => {
                    tracing::warn!(url = %redact_url(url), error = %e, "refreshing a platform key set failed");
                }
                Err(e) => return Err(e),
            }
        }
        match entries.get(url) {
            Some(e) => e.set.key(kid),
            None => Err(LtiError::UnknownKid {
                kid: kid.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
