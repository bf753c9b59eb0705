//! Secrets every node shares, kept in the store sealed: the session signing
//! key and the LTI tool key ring, when several nodes serve one PostgreSQL
//! store (`[node] secrets_key_file`).
//!
//! Each secret is a row of `secrets` (migration 15): its name, a version
//! that grows with each change (nodes poll it to pick up a rotation), and
//! the value sealed with AES-256-GCM under the secrets key every node reads
//! from its own file — a random 96-bit nonce per seal, the secret's name as
//! associated data (a sealed value moved to another name does not open).
//! The database alone never yields a key; the key file alone holds no
//! secret. Plain values are never logged.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::clock::now_ms;
use crate::config::{Config, StoreLocation};
use crate::db::{Connection, OptionalExtension, Transaction, params};
use crate::error::{Error, Result};

/// The secrets key: seals and opens the shared secrets.
#[derive(Clone)]
pub struct SealingKey {
    key: Arc<RandomizedNonceKey>,
    /// Where it came from, for messages.
    origin: String,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

const KEY_HELP: &str = "create it once with `head -c 32 /dev/urandom > /etc/viva/secrets.key \
     && chmod 600 /etc/viva/secrets.key` and copy the same file to every node";

impl SealingKey {
    /// The key from 32 bytes.
    pub fn new(bytes: &[u8], origin: &str) -> Result<SealingKey> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes)
            .map_err(|_| Error::Internal(format!("{origin}: not a 32-byte key")))?;
        Ok(SealingKey {
            key: Arc::new(key),
            origin: origin.to_owned(),
        })
    }

    /// Reads `path`: 32 raw bytes, or 64 hex digits (surrounding whitespace
    /// allowed). A file others may read is made 0600, with a warning.
    pub fn from_file(path: &Path) -> Result<SealingKey> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Internal(format!(
                "cannot read the secrets key {shown} ([node] secrets_key_file): {e}; {KEY_HELP}"
            ))
        })?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %shown, "the secrets key is readable by other users; fixing its mode to 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(Error::io("fixing the secrets key's permissions"))?;
        }
        let key = match bytes.len() {
            32 => bytes,
            _ => std::str::from_utf8(&bytes)
                .ok()
                .map(str::trim)
                .filter(|t| t.len() == 64)
                .and_then(|t| hex::decode(t).ok())
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "the secrets key {shown} holds {} bytes: it must be 32 random bytes \
                         (or 64 hex digits); {KEY_HELP}",
                        bytes.len()
                    ))
                })?,
        };
        SealingKey::new(&key, &shown)
    }

    /// `name`'s value sealed: base64 of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<String> {
        let mut buf = plain.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| Error::Internal(format!("sealing the secret {name:?} failed")))?;
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&buf);
        Ok(STANDARD.encode(out))
    }

    /// Opens what [`seal`](Self::seal) made for `name`.
    pub fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>> {
        let wrong = || {
            Error::Internal(format!(
                "the secrets key {} does not open the shared secret {name:?} in the store: \
                 every node needs the same [node] secrets_key_file (copy the file the first \
                 node used)",
                self.origin
            ))
        };
        let raw = STANDARD.decode(sealed.trim()).map_err(|_| wrong())?;
        if raw.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

/// The secrets key this node seals with: `Some` on a PostgreSQL store
/// (required there), `None` on SQLite (one node; keys stay in files).
pub fn sealing_key(config: &Config) -> Result<Option<SealingKey>> {
    let location = config
        .store_location()
        .map_err(|e| Error::Internal(e.to_string()))?;
    match (&location, &config.node.secrets_key_file) {
        (StoreLocation::Sqlite(_), _) => Ok(None),
        (StoreLocation::Postgres(_), Some(path)) => SealingKey::from_file(path).map(Some),
        (StoreLocation::Postgres(_), None) => Err(Error::Internal(format!(
            "a PostgreSQL store keeps the session key and the LTI tool keys for every node, \
             sealed with a key from a file: set [node] secrets_key_file (or \
             VIVA_NODE__SECRETS_KEY_FILE); {KEY_HELP}"
        ))),
    }
}

/// A shared secret as the store holds it now: its version and plain value.
pub fn get(conn: &Connection<'_>, key: &SealingKey, name: &str) -> Result<Option<(i64, Vec<u8>)>> {
    let row: Option<(i64, String)> = conn
        .query_row(
            "SELECT version, sealed FROM secrets WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(v, sealed)| Ok((v, key.open(name, &sealed)?)))
        .transpose()
}

/// The version of `name` (0 when absent), without opening it.
pub fn version(conn: &Connection<'_>, name: &str) -> Result<i64> {
    Ok(conn
        .query_row("SELECT version FROM secrets WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

/// Stores `plain` as `name` unless the store has one already; returns what
/// the store holds afterwards (the first node to start seeds a secret, the
/// others adopt it).
pub fn put_if_absent(
    tx: &Transaction<'_>,
    key: &SealingKey,
    name: &str,
    plain: &[u8],
) -> Result<(i64, Vec<u8>)> {
    let sealed = key.seal(name, plain)?;
    tx.execute(
        "INSERT INTO secrets (name, sealed, version, updated_at) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (name) DO NOTHING",
        params![name, sealed, now_ms()],
    )?;
    get(tx, key, name)?
        .ok_or_else(|| Error::Internal(format!("the shared secret {name:?} was not stored")))
}

/// Replaces `name`'s value; returns its new version.
pub fn replace(tx: &Transaction<'_>, key: &SealingKey, name: &str, plain: &[u8]) -> Result<i64> {
    let sealed = key.seal(name, plain)?;
    tx.execute(
        "INSERT INTO secrets (name, sealed, version, updated_at) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed,
             version = secrets.version + 1, updated_at = excluded.updated_at",
        params![name, sealed, now_ms()],
    )?;
    version(tx, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_name() {
        let k = SealingKey::new(&[3u8; 32], "test").expect("key");
        let sealed = k.seal("session_key", b"very secret").expect("seal");
        assert!(!sealed.contains("very secret"));
        assert_eq!(
            k.open("session_key", &sealed).expect("open"),
            b"very secret"
        );
        // Two seals of one value differ (random nonces).
        assert_ne!(sealed, k.seal("session_key", b"very secret").expect("seal"));
        assert!(k.open("lti_keys", &sealed).is_err(), "another name");
        let other = SealingKey::new(&[4u8; 32], "other").expect("key");
        let e = other.open("session_key", &sealed).expect_err("another key");
        assert!(e.to_string().contains("secrets_key_file"), "{e}");
        let mut bent = STANDARD.decode(&sealed).expect("b64");
        let last = bent.len() - 1;
        bent[last] ^= 1;
        assert!(k.open("session_key", &STANDARD.encode(bent)).is_err());
        assert!(k.open("session_key", "short").is_err());
    }

    #[test]
    fn key_files_hold_32_bytes_or_64_hex_digits() {
        let dir = tempfile::tempdir().expect("tmp");
        let raw = dir.path().join("raw.key");
        std::fs::write(&raw, [9u8; 32]).expect("write");
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let a = SealingKey::from_file(&raw).expect("raw");
        assert_eq!(
            std::fs::metadata(&raw).expect("meta").permissions().mode() & 0o777,
            0o600,
            "made private"
        );
        let hexed = dir.path().join("hex.key");
        std::fs::write(&hexed, format!("{}\n", hex::encode([9u8; 32]))).expect("write");
        let b = SealingKey::from_file(&hexed).expect("hex");
        assert_eq!(
            b.open("x", &a.seal("x", b"same key").expect("seal"))
                .expect("open"),
            b"same key"
        );
        let short = dir.path().join("short.key");
        std::fs::write(&short, b"password").expect("write");
        let e = SealingKey::from_file(&short).expect_err("short");
        assert!(e.to_string().contains("32 random bytes"), "{e}");
        let e = SealingKey::from_file(&dir.path().join("absent")).expect_err("absent");
        assert!(e.to_string().contains("head -c 32 /dev/urandom"), "{e}");
    }

    #[tokio::test]
    async fn the_first_value_stored_wins_and_replacing_bumps_the_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::Store::open(&dir.path().join("v.db")).expect("store");
        let k = SealingKey::new(&[5u8; 32], "t").expect("key");
        let (k1, k2) = (k.clone(), k.clone());
        let first = store
            .write(move |tx| put_if_absent(tx, &k1, "s", b"one"))
            .await
            .expect("put");
        assert_eq!(first, (1, b"one".to_vec()));
        let second = store
            .write(move |tx| put_if_absent(tx, &k2, "s", b"two"))
            .await
            .expect("put");
        assert_eq!(second, (1, b"one".to_vec()), "the stored value stays");
        let k3 = k.clone();
        let v = store
            .write(move |tx| replace(tx, &k3, "s", b"three"))
            .await
            .expect("replace");
        assert_eq!(v, 2);
        let stored: String = store
            .read(|c| Ok(c.query_row("SELECT sealed FROM secrets", [], |r| r.get(0))?))
            .await
            .expect("row");
        assert!(!stored.contains("three"));
        let got = store.read(move |c| get(c, &k, "s")).await.expect("get");
        assert_eq!(got, Some((2, b"three".to_vec())));
    }
}
