//! Sessions: short-lived signed bearer tokens scoped to a context, a user and
//! roles, and single-use tickets for places that cannot send headers
//! (EventSource, `<video src>`).
//!
//! Tokens are HS256 JWTs signed with a 256-bit key: on SQLite kept in
//! `<data_dir>/keys/session.key` (mode 0600, created on first use); on a
//! PostgreSQL store several nodes share, kept in the store sealed with the
//! secrets key (`secrets`), so every api node verifies every session. LTI
//! launches and `viva session` both mint these same tokens. Tickets live in
//! the store (`tickets`, by the sha256 of the ticket), so a ticket minted by
//! one node is redeemed, once, by any.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::db::{OptionalExtension, Transaction, params};
use crate::domain::{Role, Submission};
use crate::error::{Error, Result};
use crate::secrets;
use crate::store::Store;

const ISSUER: &str = "viva";
const AUDIENCE: &str = "viva-session";

/// What a session token says about its bearer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Context (course) id.
    pub ctx: String,
    pub roles: Vec<Role>,
    #[serde(default)]
    pub name: Option<String>,
    /// Where an LTI launch came from (absent for `viva session` tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lti: Option<LtiScope>,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
}

impl Claims {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// A Viva-wide administrator: only sessions minted by the operator
    /// (`viva session --role admin`), never an LTI launch. A platform's
    /// administrator is an administrator of that platform only (see
    /// [`Claims::is_platform_admin`]): hosted Canvas tenants share one issuer
    /// and every account admin carries the institution Administrator role.
    pub fn is_admin(&self) -> bool {
        self.has(Role::Admin) && self.lti.is_none()
    }

    /// An administrator of the LTI platform registration the session was
    /// launched from: manages the contexts of that registration (the launch's
    /// own here; `http::access::act_in` moves it into another of them) and
    /// may see and remove its own registration, nothing of other
    /// registrations and nothing Viva-wide.
    pub fn is_platform_admin(&self) -> bool {
        self.has(Role::Admin) && self.lti.is_some()
    }

    /// Whether this session administers the registration (issuer, client_id):
    /// Viva-wide admins all, a platform admin its own.
    pub fn administers_registration(&self, issuer: &str, client_id: &str) -> bool {
        self.is_admin()
            || (self.is_platform_admin()
                && self
                    .lti
                    .as_ref()
                    .is_some_and(|l| l.platform == issuer && l.client_id == client_id))
    }

    /// Instructors (and platform admins) manage their own context; Viva-wide
    /// admins every context.
    pub fn can_manage(&self, context_id: &str) -> bool {
        self.is_admin()
            || ((self.has(Role::Instructor) || self.is_platform_admin()) && self.ctx == context_id)
    }

    /// Learners read their own submissions in their context; instructors
    /// their context's; admins all.
    pub fn can_read(&self, s: &Submission) -> bool {
        self.can_manage(&s.context_id) || (s.user_id == self.sub && s.context_id == self.ctx)
    }

    /// Who did it, for the audit log.
    pub fn actor(&self) -> String {
        format!("{}@{}", self.sub, self.ctx)
    }
}

/// The LTI launch a session came from: platform, deployment, resource link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LtiScope {
    /// The platform's issuer.
    pub platform: String,
    pub client_id: String,
    pub deployment: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_link: Option<String>,
    /// The daemon's id of the resource link (`lti_links.id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<String>,
    /// Handle of a pending deep-linking request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deep_link: Option<String>,
}

/// Signs and verifies session tokens.
#[derive(Clone)]
pub struct Sessions {
    encoding: Arc<EncodingKey>,
    decoding: Arc<DecodingKey>,
    ttl: Duration,
    ticket_ttl: Duration,
}

/// Unredeemed tickets one user may hold (the widget needs two or three).
pub const TICKETS_PER_USER: usize = 32;
/// Unredeemed tickets in all.
pub const TICKETS_MAX: usize = 100_000;

fn ticket_hash(ticket: &str) -> String {
    hex::encode(Sha256::digest(ticket.as_bytes()))
}

/// Stores a single-use ticket for `scope` ("events", "media:<id>") carrying
/// `claims`, valid `ttl`; returns it. Bounded: expired tickets go first,
/// then the user's oldest past [`TICKETS_PER_USER`], then the oldest of all
/// past [`TICKETS_MAX`].
pub fn issue_ticket(
    tx: &Transaction<'_>,
    claims: &Claims,
    scope: &str,
    ttl: Duration,
) -> Result<String> {
    let ticket = hex::encode(rand::random::<[u8; 24]>());
    let now = crate::clock::now_ms();
    tx.execute("DELETE FROM tickets WHERE expires_at <= ?1", [now])?;
    let mine: i64 = tx.query_row(
        "SELECT COUNT(*) FROM tickets WHERE user_id = ?1",
        [&claims.sub],
        |r| r.get(0),
    )?;
    let over = mine + 1 - TICKETS_PER_USER as i64;
    if over > 0 {
        tx.execute(
            "DELETE FROM tickets WHERE id_hash IN (SELECT id_hash FROM tickets \
             WHERE user_id = ?1 ORDER BY created_at, id_hash LIMIT ?2)",
            params![claims.sub, over],
        )?;
    }
    let all: i64 = tx.query_row("SELECT COUNT(*) FROM tickets", [], |r| r.get(0))?;
    let over = all + 1 - TICKETS_MAX as i64;
    if over > 0 {
        tx.execute(
            "DELETE FROM tickets WHERE id_hash IN (SELECT id_hash FROM tickets \
             ORDER BY created_at, id_hash LIMIT ?1)",
            params![over],
        )?;
    }
    let json = serde_json::to_string(claims)
        .map_err(|e| Error::Internal(format!("encoding a ticket: {e}")))?;
    tx.execute(
        "INSERT INTO tickets (id_hash, user_id, scope, claims, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            ticket_hash(&ticket),
            claims.sub,
            scope,
            json,
            now,
            now + ttl.as_millis() as i64
        ],
    )?;
    Ok(ticket)
}

/// Consumes a ticket: valid once (on any node), within its lifetime, for
/// its scope.
pub fn redeem_ticket(tx: &Transaction<'_>, ticket: &str, scope: &str) -> Result<Claims> {
    let row: Option<(String, String, i64)> = tx
        .query_row(
            "DELETE FROM tickets WHERE id_hash = ?1 RETURNING scope, claims, expires_at",
            [ticket_hash(ticket)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (held_scope, claims, expires_at) =
        row.ok_or_else(|| Error::Unauthorized("the ticket is unknown or already used".into()))?;
    if expires_at <= crate::clock::now_ms() {
        return Err(Error::Unauthorized("the ticket has expired".into()));
    }
    if held_scope != scope {
        return Err(Error::Unauthorized(format!(
            "the ticket is for {held_scope:?}, not {scope:?}"
        )));
    }
    serde_json::from_str(&claims).map_err(|e| Error::Internal(format!("a stored ticket: {e}")))
}

/// The session signing key: the store's (sealed) on PostgreSQL — seeded by
/// the first node from its `data_dir/keys/session.key` when it has one (a
/// site moved with `viva migrate-store`), else a new random key — or the
/// data directory's file on SQLite.
pub async fn session_key(config: &Config, store: &Store) -> Result<Vec<u8>> {
    match secrets::sealing_key(config)? {
        None => {
            let dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || load_or_create_key(&dir))
                .await
                .map_err(|e| Error::Internal(format!("reading the session key: {e}")))?
        }
        Some(key) => {
            let local = key_path(&config.data_dir);
            let seed = match std::fs::read(&local) {
                Ok(k) if k.len() >= 32 => k,
                _ => rand::random::<[u8; 32]>().to_vec(),
            };
            let (_, shared) = store
                .write(move |tx| secrets::put_if_absent(tx, &key, "session_key", &seed))
                .await?;
            if shared.len() < 32 {
                return Err(Error::Internal(
                    "the shared session key is shorter than 32 bytes".into(),
                ));
            }
            Ok(shared)
        }
    }
}

pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("session.key")
}

/// Reads the session key, creating it (0600) on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<Vec<u8>> {
    let path = key_path(data_dir);
    match std::fs::read(&path) {
        Ok(key) if key.len() >= 32 => {
            let mode = std::fs::metadata(&path)
                .map_err(Error::io("reading the session key's permissions"))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "session key is readable by other users; fixing its mode to 0600"
                );
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(Error::io("fixing the session key's permissions"))?;
            }
            Ok(key)
        }
        Ok(_) => Err(Error::Internal(format!(
            "the session key {} is shorter than 32 bytes; delete it to generate a new one \
             (existing sessions will end)",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(data_dir);
            std::fs::create_dir_all(dir).map_err(Error::io("creating the keys directory"))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(Error::io("securing the keys directory"))?;
            let key: [u8; 32] = rand::random();
            let tmp = dir.join(format!("session.key.{}", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(Error::io("creating the session key"))?;
            f.write_all(&key)
                .and_then(|_| f.sync_all())
                .map_err(Error::io("writing the session key"))?;
            // A concurrent creator may have won; then use theirs.
            if std::fs::hard_link(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
                return std::fs::read(&path).map_err(Error::io("reading the session key"));
            }
            let _ = std::fs::remove_file(&tmp);
            Ok(key.to_vec())
        }
        Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
    }
}

impl Sessions {
    pub fn new(key: &[u8], ttl: Duration, ticket_ttl: Duration) -> Sessions {
        Sessions {
            encoding: Arc::new(EncodingKey::from_secret(key)),
            decoding: Arc::new(DecodingKey::from_secret(key)),
            ttl,
            ticket_ttl,
        }
    }

    /// How long a ticket is valid.
    pub fn ticket_ttl(&self) -> Duration {
        self.ticket_ttl
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Mints a session token.
    pub fn mint(
        &self,
        user: &str,
        context: &str,
        roles: &[Role],
        name: Option<String>,
    ) -> Result<(String, Claims)> {
        self.mint_scoped(user, context, roles, name, None)
    }

    /// Mints a session token for an LTI launch.
    pub fn mint_scoped(
        &self,
        user: &str,
        context: &str,
        roles: &[Role],
        name: Option<String>,
        lti: Option<LtiScope>,
    ) -> Result<(String, Claims)> {
        let now = crate::clock::now_ms() as u64 / 1000;
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        let claims = Claims {
            sub: user.to_owned(),
            ctx: context.to_owned(),
            roles,
            name,
            lti,
            iat: now,
            exp: now + self.ttl.as_secs().max(1),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            jti: hex::encode(rand::random::<[u8; 12]>()),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("signing a session token: {e}")))?;
        Ok((token, claims))
    }

    /// Verifies signature, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.leeway = 5;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| {
                let why = match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        "the session has expired; open the assignment again from your course"
                    }
                    _ => "the session token is invalid",
                };
                Error::Unauthorized(why.into())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(&[7u8; 32], Duration::from_secs(60), Duration::from_secs(60))
    }

    #[test]
    fn tokens_verify_and_forgeries_do_not() {
        let s = sessions();
        let (token, claims) = s.mint("alice", "c1", &[Role::Learner], None).expect("mint");
        assert_eq!(s.verify(&token).expect("valid"), claims);
        let other = Sessions::new(&[8u8; 32], Duration::from_secs(60), Duration::from_secs(60));
        assert!(other.verify(&token).is_err(), "another key must not verify");
        let mut tampered = token.clone();
        tampered.insert(tampered.len() / 2, 'x');
        assert!(s.verify(&tampered).is_err());
    }

    #[test]
    fn a_platform_admin_is_admin_of_its_own_registration_only() {
        let s = sessions();
        let scope = LtiScope {
            platform: "https://canvas.instructure.com".into(),
            client_id: "100".into(),
            deployment: "d".into(),
            ..Default::default()
        };
        let (_, lti_admin) = s
            .mint_scoped("u", "c1", &[Role::Admin], None, Some(scope))
            .expect("mint");
        assert!(
            !lti_admin.is_admin(),
            "no LTI launch makes a Viva-wide admin"
        );
        assert!(lti_admin.is_platform_admin());
        assert!(lti_admin.can_manage("c1"), "the launch's own course");
        assert!(!lti_admin.can_manage("c2"), "another course");
        assert!(lti_admin.administers_registration("https://canvas.instructure.com", "100"));
        assert!(
            !lti_admin.administers_registration("https://canvas.instructure.com", "200"),
            "another tenant sharing the issuer"
        );
        let (_, ops) = s.mint("ops", "ops", &[Role::Admin], None).expect("mint");
        assert!(ops.is_admin() && ops.can_manage("c2"));
        assert!(ops.administers_registration("https://canvas.instructure.com", "200"));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let s = Sessions::new(&[7u8; 32], Duration::from_secs(1), Duration::from_secs(1));
        let (_, mut claims) = s.mint("a", "c", &[Role::Learner], None).expect("mint");
        claims.exp = claims.iat - 100;
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &s.encoding)
            .expect("encode");
        let e = s.verify(&token).expect_err("expired");
        assert!(e.to_string().contains("expired"));
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("t.db")).expect("store");
        (dir, store)
    }

    async fn ticket(store: &Store, c: &Claims, scope: &str) -> String {
        let (c, scope) = (c.clone(), scope.to_owned());
        store
            .write(move |tx| issue_ticket(tx, &c, &scope, Duration::from_secs(60)))
            .await
            .expect("ticket")
    }

    async fn redeem(store: &Store, t: &str, scope: &str) -> Result<Claims> {
        let (t, scope) = (t.to_owned(), scope.to_owned());
        store.write(move |tx| redeem_ticket(tx, &t, &scope)).await
    }

    async fn held(store: &Store) -> usize {
        let n: i64 = store
            .read(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM tickets WHERE expires_at > ?1",
                    [crate::clock::now_ms()],
                    |r| r.get(0),
                )?)
            })
            .await
            .expect("count");
        n as usize
    }

    #[tokio::test]
    async fn tickets_are_single_use_scoped_and_kept_hashed() {
        let (_dir, store) = store();
        let s = sessions();
        let (_, claims) = s.mint("a", "c", &[Role::Learner], None).expect("mint");
        let t = ticket(&store, &claims, "events").await;
        assert!(redeem(&store, &t, "media:x").await.is_err(), "wrong scope");
        let t = ticket(&store, &claims, "events").await;
        let kept: String = store
            .read(|c| Ok(c.query_row("SELECT id_hash FROM tickets", [], |r| r.get(0))?))
            .await
            .expect("row");
        assert_ne!(kept, t, "only the ticket's hash is stored");
        assert_eq!(redeem(&store, &t, "events").await.expect("ok"), claims);
        assert!(redeem(&store, &t, "events").await.is_err(), "second use");
        // An expired ticket is refused.
        let c = claims.clone();
        let old = store
            .write(move |tx| issue_ticket(tx, &c, "events", Duration::ZERO))
            .await
            .expect("ticket");
        let e = redeem(&store, &old, "events").await.expect_err("expired");
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[tokio::test]
    async fn tickets_are_bounded_per_user_and_the_newest_work() {
        let (_dir, store) = store();
        let s = sessions();
        let (_, a) = s.mint("a", "c", &[Role::Learner], None).expect("mint");
        let (_, b) = s.mint("b", "c", &[Role::Learner], None).expect("mint");
        let tb = ticket(&store, &b, "events").await;
        let mut last = String::new();
        for _ in 0..(TICKETS_PER_USER * 4) {
            last = ticket(&store, &a, "events").await;
        }
        assert_eq!(
            held(&store).await,
            TICKETS_PER_USER + 1,
            "one user cannot fill the table"
        );
        assert_eq!(
            redeem(&store, &last, "events").await.expect("newest").sub,
            "a"
        );
        assert_eq!(
            redeem(&store, &tb, "events")
                .await
                .expect("b's ticket survives")
                .sub,
            "b"
        );
        assert_eq!(held(&store).await, TICKETS_PER_USER - 1);
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k1 = load_or_create_key(dir.path()).expect("create");
        let mode = std::fs::metadata(key_path(dir.path()))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create_key(dir.path()).expect("reuse");
        assert_eq!(k1, k2);
    }
}
