//! The tool's own RSA signing keys: generation (aws-lc-rs, RSA 2048),
//! storage (PKCS#8 files with mode 0600 in a 0700 directory), the public JWKS,
//! signing (jsonwebtoken's aws-lc-rs backend) and rotation.
//!
//! Rotation publishes before it signs: a new key first enters the JWKS as
//! `next` and signs nothing; only after it has been published for a while
//! (platforms cache key sets) is it promoted to `current`. The previous key
//! stays in the JWKS as `retired` until every token it signed has expired.
//! Private key material is never logged or put in error messages.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{LtiError, Result};

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Published, not yet signing.
    Next,
    /// Published and signing.
    Current,
    /// Published so tokens it signed still verify; signs nothing.
    Retired,
}

/// Metadata of one key (the private part lives in `<kid>.pk8`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    pub kid: String,
    pub state: KeyState,
    pub created_at: u64,
    /// When the key last changed state.
    pub changed_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    keys: Vec<KeyMeta>,
}

/// The ring as [`ToolKeys::export`] gives it.
#[derive(Serialize, Deserialize)]
struct Exported {
    keys: Vec<ExportedKey>,
}

#[derive(Serialize, Deserialize)]
struct ExportedKey {
    meta: KeyMeta,
    /// PKCS#8 DER, base64url.
    pkcs8: String,
}

struct LoadedKey {
    meta: KeyMeta,
    /// PKCS#1 RSAPrivateKey DER, what jsonwebtoken's aws-lc backend signs with.
    pkcs1: Vec<u8>,
    n: String,
    e: String,
}

/// What a rotation step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// Nothing due.
    Idle,
    /// A new key was generated and published; it signs after the lead time.
    Prepared { kid: String },
    /// The published next key now signs; the previous one is retired.
    Promoted { kid: String, retired: String },
}

/// The tool's key ring.
pub struct ToolKeys {
    dir: PathBuf,
    keys: RwLock<Vec<LoadedKey>>,
}

impl std::fmt::Debug for ToolKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolKeys")
            .field("dir", &self.dir)
            .field("keys", &self.metadata())
            .finish()
    }
}

fn keys_err(msg: impl Into<String>) -> LtiError {
    LtiError::Keys(msg.into())
}

impl ToolKeys {
    /// Opens the key ring in `dir`, creating it and a first signing key when
    /// there is none.
    pub fn open(dir: &Path, now: u64) -> Result<ToolKeys> {
        std::fs::create_dir_all(dir)
            .map_err(LtiError::io(format!("creating {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(LtiError::io(format!("securing {}", dir.display())))?;
        let manifest_path = dir.join("keys.json");
        let manifest: Manifest = match std::fs::read(&manifest_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| keys_err(format!("{} is damaged: {e}", manifest_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => {
                return Err(LtiError::io(format!("reading {}", manifest_path.display()))(e));
            }
        };
        let mut loaded = Vec::new();
        for meta in manifest.keys {
            loaded.push(load_key(dir, meta)?);
        }
        let ring = ToolKeys {
            dir: dir.to_owned(),
            keys: RwLock::new(loaded),
        };
        if ring.current_kid().is_none() {
            // Nothing was ever published, so nothing can be caught out: the
            // first key signs at once.
            let key = generate(dir, KeyState::Current, now)?;
            tracing::info!(kid = %key.meta.kid, "generated the first LTI tool key");
            ring.write()?.push(key);
            ring.save()?;
        }
        Ok(ring)
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, Vec<LoadedKey>>> {
        self.keys.write().map_err(|_| keys_err("key ring poisoned"))
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Vec<LoadedKey>>> {
        self.keys.read().map_err(|_| keys_err("key ring poisoned"))
    }

    fn save(&self) -> Result<()> {
        let manifest = Manifest {
            keys: self.metadata(),
        };
        let path = self.dir.join("keys.json");
        let tmp = self.dir.join(format!("keys.json.{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| keys_err(e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(LtiError::io(format!("writing {}", path.display())))
    }

    /// Every key's metadata, oldest first.
    pub fn metadata(&self) -> Vec<KeyMeta> {
        self.keys
            .read()
            .map(|k| k.iter().map(|k| k.meta.clone()).collect())
            .unwrap_or_default()
    }

    pub fn current_kid(&self) -> Option<String> {
        self.keys.read().ok().and_then(|k| {
            k.iter()
                .find(|k| k.meta.state == KeyState::Current)
                .map(|k| k.meta.kid.clone())
        })
    }

    /// The public key set (`next`, `current` and `retired` keys).
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .read()
            .map(|k| {
                k.iter()
                    .map(|k| {
                        serde_json::json!({
                            "kty": "RSA", "alg": "RS256", "use": "sig",
                            "kid": k.meta.kid, "n": k.n, "e": k.e,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "keys": keys })
    }

    /// Signs `claims` as an RS256 JWT with the current key (header `kid`).
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String> {
        let keys = self.read()?;
        let key = keys
            .iter()
            .find(|k| k.meta.state == KeyState::Current)
            .ok_or_else(|| keys_err("no current signing key"))?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.meta.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(&key.pkcs1))
            .map_err(|e| LtiError::Signing(e.to_string()))
    }

    /// One rotation step: purge retired keys older than `retire_after`,
    /// promote a `next` key published for at least `publish_lead`, or
    /// generate a `next` key.
    pub fn rotate(&self, now: u64, publish_lead: u64, retire_after: u64) -> Result<Rotation> {
        self.purge(now, retire_after)?;
        let outcome = {
            let mut keys = self.write()?;
            match keys.iter().position(|k| k.meta.state == KeyState::Next) {
                Some(i) if now.saturating_sub(keys[i].meta.created_at) >= publish_lead => {
                    let mut retired = String::new();
                    for k in keys.iter_mut() {
                        if k.meta.state == KeyState::Current {
                            k.meta.state = KeyState::Retired;
                            k.meta.changed_at = now;
                            retired = k.meta.kid.clone();
                        }
                    }
                    keys[i].meta.state = KeyState::Current;
                    keys[i].meta.changed_at = now;
                    Rotation::Promoted {
                        kid: keys[i].meta.kid.clone(),
                        retired,
                    }
                }
                Some(_) => Rotation::Idle,
                None => {
                    let key = generate(&self.dir, KeyState::Next, now)?;
                    let kid = key.meta.kid.clone();
                    keys.push(key);
                    Rotation::Prepared { kid }
                }
            }
        };
        if outcome != Rotation::Idle {
            self.save()?;
            tracing::info!(?outcome, "LTI tool key rotation");
        }
        Ok(outcome)
    }

    /// Automatic rotation: once the current key is older than `every`, move
    /// one step (prepare, then promote after `publish_lead`). `every == 0`
    /// only purges.
    pub fn maintain(
        &self,
        now: u64,
        every: u64,
        publish_lead: u64,
        retire_after: u64,
    ) -> Result<Rotation> {
        self.purge(now, retire_after)?;
        if every == 0 {
            return Ok(Rotation::Idle);
        }
        let (current_since, has_next) = {
            let keys = self.read()?;
            (
                keys.iter()
                    .find(|k| k.meta.state == KeyState::Current)
                    .map(|k| k.meta.changed_at.max(k.meta.created_at)),
                keys.iter().any(|k| k.meta.state == KeyState::Next),
            )
        };
        let due = current_since.is_none_or(|t| now.saturating_sub(t) >= every);
        if due || has_next {
            self.rotate(now, publish_lead, retire_after)
        } else {
            Ok(Rotation::Idle)
        }
    }

    /// The whole ring as one value (every key's metadata and private key),
    /// for a store several nodes share, which keeps it sealed. It holds
    /// private keys: never log it.
    pub fn export(&self) -> Result<Vec<u8>> {
        let mut keys = Vec::new();
        for meta in self.metadata() {
            let path = key_file(&self.dir, &meta.kid);
            let pkcs8 = std::fs::read(&path)
                .map_err(LtiError::io(format!("reading {}", path.display())))?;
            keys.push(ExportedKey {
                meta,
                pkcs8: URL_SAFE_NO_PAD.encode(pkcs8),
            });
        }
        serde_json::to_vec(&Exported { keys }).map_err(|e| keys_err(e.to_string()))
    }

    /// Makes the ring what `exported` ([`export`](Self::export) on another
    /// node) holds: writes the keys it lacks (0600), drops the ones no
    /// longer there. Every key is checked against its id; a ring without a
    /// current key is refused. Returns whether the ring changed.
    pub fn import(&self, exported: &[u8]) -> Result<bool> {
        let ring: Exported = serde_json::from_slice(exported)
            .map_err(|e| keys_err(format!("the shared key ring is damaged: {e}")))?;
        if !ring.keys.iter().any(|k| k.meta.state == KeyState::Current) {
            return Err(keys_err("the shared key ring has no current key"));
        }
        let mut loaded = Vec::new();
        for k in ring.keys {
            let path = key_file(&self.dir, &k.meta.kid);
            let fresh = !path.exists();
            if fresh {
                let pkcs8 = URL_SAFE_NO_PAD
                    .decode(k.pkcs8.as_bytes())
                    .map_err(|_| keys_err(format!("the shared key {} is damaged", k.meta.kid)))?;
                let tmp = self
                    .dir
                    .join(format!("{}.pk8.{}", k.meta.kid, std::process::id()));
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .and_then(|mut f| f.write_all(&pkcs8).and_then(|_| f.sync_all()))
                    .and_then(|_| std::fs::rename(&tmp, &path));
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(LtiError::io(format!("writing {}", path.display()))(e));
                }
            }
            match load_key(&self.dir, k.meta) {
                Ok(key) => loaded.push(key),
                Err(e) => {
                    if fresh {
                        let _ = std::fs::remove_file(&path);
                    }
                    return Err(e);
                }
            }
        }
        let before = self.metadata();
        let after: Vec<KeyMeta> = loaded.iter().map(|k| k.meta.clone()).collect();
        if before == after {
            return Ok(false);
        }
        let gone: Vec<String> = before
            .iter()
            .filter(|m| !after.iter().any(|a| a.kid == m.kid))
            .map(|m| m.kid.clone())
            .collect();
        *self.write()? = loaded;
        self.save()?;
        for kid in gone {
            let _ = std::fs::remove_file(key_file(&self.dir, &kid));
        }
        Ok(true)
    }

    fn purge(&self, now: u64, retire_after: u64) -> Result<()> {
        let gone: Vec<String> = {
            let mut keys = self.write()?;
            let gone = keys
                .iter()
                .filter(|k| {
                    k.meta.state == KeyState::Retired
                        && now.saturating_sub(k.meta.changed_at) >= retire_after
                })
                .map(|k| k.meta.kid.clone())
                .collect::<Vec<_>>();
            keys.retain(|k| !gone.contains(&k.meta.kid));
            gone
        };
        if !gone.is_empty() {
            self.save()?;
            for kid in gone {
                let _ = std::fs::remove_file(self.dir.join(format!("{kid}.pk8")));
                tracing::info!(%kid, "removed a retired LTI tool key");
            }
        }
        Ok(())
    }
}

fn key_file(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}.pk8"))
}

fn generate(dir: &Path, state: KeyState, now: u64) -> Result<LoadedKey> {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048)
        .map_err(|_| keys_err("generating an RSA key failed"))?;
    let pkcs8 = pair
        .as_der()
        .map_err(|_| keys_err("encoding an RSA key failed"))?;
    let (n, e) = public_parts(&pair);
    let kid = thumbprint(&n, &e);
    let path = key_file(dir, &kid);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(LtiError::io(format!("creating {}", path.display())))?;
    f.write_all(pkcs8.as_ref())
        .and_then(|_| f.sync_all())
        .map_err(LtiError::io(format!("writing {}", path.display())))?;
    Ok(LoadedKey {
        pkcs1: pkcs8_to_pkcs1(pkcs8.as_ref())?.to_vec(),
        meta: KeyMeta {
            kid,
            state,
            created_at: now,
            changed_at: now,
        },
        n,
        e,
    })
}

fn load_key(dir: &Path, meta: KeyMeta) -> Result<LoadedKey> {
    let path = key_file(dir, &meta.kid);
    let mode = std::fs::metadata(&path)
        .map_err(LtiError::io(format!("reading {}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "an LTI tool key was readable by others; fixing its mode to 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(LtiError::io(format!("securing {}", path.display())))?;
    }
    let pkcs8 =
        std::fs::read(&path).map_err(LtiError::io(format!("reading {}", path.display())))?;
    let pair = RsaKeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| keys_err(format!("{} is not an RSA private key", path.display())))?;
    let (n, e) = public_parts(&pair);
    if thumbprint(&n, &e) != meta.kid {
        return Err(keys_err(format!(
            "{} does not hold key {}",
            path.display(),
            meta.kid
        )));
    }
    Ok(LoadedKey {
        pkcs1: pkcs8_to_pkcs1(&pkcs8)?.to_vec(),
        meta,
        n,
        e,
    })
}

fn public_parts(pair: &RsaKeyPair) -> (String, String) {
    let public = pair.public_key();
    (
        URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
        URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
    )
}

/// RFC 7638 JWK thumbprint, used as the key id.
pub fn thumbprint(n: &str, e: &str) -> String {
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Reads one DER TLV with the expected tag; returns (contents, rest).
fn der_tlv(input: &[u8], tag: u8) -> Result<(&[u8], &[u8])> {
    let bad = || keys_err("malformed PKCS#8 key");
    let (&t, rest) = input.split_first().ok_or_else(bad)?;
    if t != tag {
        return Err(bad());
    }
    let (&first, rest) = rest.split_first().ok_or_else(bad)?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(bad());
    }
    Ok((&rest[..len], &rest[len..]))
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo`.
pub fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Result<&[u8]> {
    let (info, _) = der_tlv(pkcs8, 0x30)?;
    let (_version, rest) = der_tlv(info, 0x02)?;
    let (_algorithm, rest) = der_tlv(rest, 0x30)?;
    let (key, _) = der_tlv(rest, 0x04)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn verify(keys: &ToolKeys, token: &str) -> serde_json::Value {
        let header = jsonwebtoken::decode_header(token).expect("header");
        let kid = header.kid.expect("kid");
        let jwks = keys.jwks();
        let jwk = jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .expect("published");
        let key = DecodingKey::from_rsa_components(
            jwk["n"].as_str().expect("n"),
            jwk["e"].as_str().expect("e"),
        )
        .expect("key");
        let mut v = Validation::new(Algorithm::RS256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .expect("verifies")
            .claims
    }

    #[test]
    fn first_key_is_private_published_and_signs() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = ToolKeys::open(&dir.path().join("lti"), 100).expect("open");
        let meta = keys.metadata();
        assert_eq!(meta.len(), 1);
        assert_eq!(meta[0].state, KeyState::Current);
        let file = dir.path().join("lti").join(format!("{}.pk8", meta[0].kid));
        let mode = std::fs::metadata(&file).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(dir.path().join("lti"))
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        let jwks = keys.jwks();
        let n = jwks["keys"][0]["n"].as_str().expect("n");
        assert_eq!(
            crate::jwks::modulus_bits(&URL_SAFE_NO_PAD.decode(n).expect("b64")),
            2048
        );
        assert!(!jwks.to_string().contains("\"d\""), "no private parts");
        let token = keys
            .sign(&serde_json::json!({"hello": "world"}))
            .expect("sign");
        assert_eq!(verify(&keys, &token)["hello"], "world");
        // Reopening loads the same key.
        let again = ToolKeys::open(&dir.path().join("lti"), 200).expect("reopen");
        assert_eq!(again.current_kid(), keys.current_kid());
        assert!(!format!("{keys:?}").contains("pkcs1"));
    }

    #[test]
    fn a_ring_exported_on_one_node_signs_and_rotates_the_same_on_another() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = ToolKeys::open(&dir.path().join("a"), 0).expect("a");
        let b = ToolKeys::open(&dir.path().join("b"), 0).expect("b");
        assert_ne!(a.current_kid(), b.current_kid(), "two fresh rings");
        assert!(b.import(&a.export().expect("export")).expect("import"));
        assert_eq!(b.current_kid(), a.current_kid());
        assert_eq!(b.jwks(), a.jwks());
        let token = b.sign(&serde_json::json!({"from": "b"})).expect("sign");
        assert_eq!(
            verify(&a, &token)["from"],
            "b",
            "a's JWKS verifies b's token"
        );
        // b's own first key is gone, file and all.
        assert_eq!(
            std::fs::read_dir(dir.path().join("b"))
                .expect("dir")
                .filter(|e| e
                    .as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "pk8")))
                .count(),
            1
        );
        assert!(
            !b.import(&a.export().expect("export")).expect("again"),
            "no change"
        );
        // A rotation on a reaches b with the next import; b survives a restart.
        let Rotation::Prepared { kid } = a.rotate(10, 0, 100).expect("prepare") else {
            panic!("prepared");
        };
        assert!(b.import(&a.export().expect("export")).expect("import"));
        a.rotate(20, 0, 100).expect("promote");
        b.import(&a.export().expect("export")).expect("import");
        assert_eq!(b.current_kid().as_deref(), Some(kid.as_str()));
        let reopened = ToolKeys::open(&dir.path().join("b"), 30).expect("reopen");
        assert_eq!(reopened.metadata(), a.metadata());
        // Damaged or keyless rings are refused, and change nothing.
        assert!(b.import(b"{not json").is_err());
        assert!(b.import(br#"{"keys":[]}"#).is_err());
        let mut bad: serde_json::Value =
            serde_json::from_slice(&a.export().expect("export")).expect("json");
        bad["keys"][0]["meta"]["kid"] = "someone-else".into();
        bad["keys"][0]["meta"]["state"] = "current".into();
        assert!(
            b.import(bad.to_string().as_bytes()).is_err(),
            "a key not matching its id"
        );
        assert_eq!(b.metadata(), a.metadata());
    }

    #[test]
    fn rotation_publishes_before_signing_and_keeps_the_old_key_a_while() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = ToolKeys::open(dir.path(), 0).expect("open");
        let first = keys.current_kid().expect("current");
        let Rotation::Prepared { kid: next } = keys.rotate(10, 3600, 7200).expect("prepare") else {
            panic!("expected a prepared key");
        };
        // Published, but the old key still signs.
        assert_eq!(keys.jwks()["keys"].as_array().expect("keys").len(), 2);
        let t = keys.sign(&serde_json::json!({})).expect("sign");
        assert_eq!(
            jsonwebtoken::decode_header(&t).expect("h").kid.as_deref(),
            Some(first.as_str())
        );
        assert_eq!(keys.rotate(100, 3600, 7200).expect("early"), Rotation::Idle);
        let r = keys.rotate(3610, 3600, 7200).expect("promote");
        assert_eq!(
            r,
            Rotation::Promoted {
                kid: next.clone(),
                retired: first.clone()
            }
        );
        let t = keys.sign(&serde_json::json!({})).expect("sign");
        assert_eq!(
            jsonwebtoken::decode_header(&t).expect("h").kid.as_deref(),
            Some(next.as_str())
        );
        assert_eq!(keys.jwks()["keys"].as_array().expect("keys").len(), 2);
        // The retired key goes once its tokens have expired.
        keys.maintain(3610 + 7200, 0, 3600, 7200).expect("purge");
        let kids: Vec<String> = keys.metadata().into_iter().map(|m| m.kid).collect();
        assert_eq!(kids, vec![next]);
        assert!(!dir.path().join(format!("{first}.pk8")).exists());
    }

    #[test]
    fn maintain_rotates_when_due() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = ToolKeys::open(dir.path(), 0).expect("open");
        assert_eq!(keys.maintain(10, 1000, 50, 100).expect("m"), Rotation::Idle);
        assert!(matches!(
            keys.maintain(1000, 1000, 50, 100).expect("m"),
            Rotation::Prepared { .. }
        ));
        assert!(matches!(
            keys.maintain(1060, 1000, 50, 100).expect("m"),
            Rotation::Promoted { .. }
        ));
        assert_eq!(
            keys.maintain(1070, 1000, 50, 100).expect("m"),
            Rotation::Idle
        );
    }

    #[test]
    fn pkcs8_unwrapping_refuses_garbage() {
        assert!(pkcs8_to_pkcs1(&[]).is_err());
        assert!(pkcs8_to_pkcs1(&[0x30, 0x82, 0xff]).is_err());
        assert!(pkcs8_to_pkcs1(&[0x04, 0x00]).is_err());
    }
}
