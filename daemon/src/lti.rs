//! LTI platforms as the daemon keeps them: the `[lti]` configuration, the
//! runtime (tool keys, platform key cache, login states, service client),
//! and the SQL for registrations, LTI users and resource links.
//!
//! LTI identities map onto the daemon's own: a user is
//! `lti-<hash(issuer, client_id, sub)>` (users from before migration 8 keep
//! their ids, bound to their registration in `lti_users`), a course is
//! `lti-<hash(issuer, client_id, deployment, context id)>`, so two platforms
//! (or two tenants of one hosted Canvas) can never share a course or a user.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::db::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use viva_lti::launch::DeepLinkingSettings;
use viva_lti::login::{LoginState, STATE_TTL_SECS, StateLimits};
use viva_lti::{HttpClient, JwksCache, LtiError, Registration, ServiceClient, ToolKeys, ToolUrls};

use crate::clock::now_ms;
use crate::config::{Config, LtiConfig};
use crate::domain::Role;
use crate::error::{Error, Result};
use crate::secrets::{self, SealingKey};
use crate::store::Store;

/// A deep-linking request waiting for the instructor's choice.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeepLinkContext {
    pub issuer: String,
    pub client_id: String,
    pub deployment_id: String,
    pub context_id: String,
    pub settings: DeepLinkingSettings,
    pub expires_at: u64,
}

/// The LTI runtime shared by routes and the passback worker.
#[derive(Clone)]
pub struct Lti {
    inner: Arc<LtiInner>,
}

pub struct LtiInner {
    pub config: LtiConfig,
    pub tool: ToolUrls,
    pub keys: Arc<ToolKeys>,
    pub jwks: JwksCache,
    pub services: ServiceClient,
    pub http: HttpClient,
    /// On a shared (PostgreSQL) store: the sealing key and the version of
    /// the key ring this node holds.
    shared: Option<SharedRing>,
    /// Wakes the passback worker (a release, a new outbox row).
    pub passback_wake: tokio::sync::Notify,
}

impl std::ops::Deref for Lti {
    type Target = LtiInner;
    fn deref(&self) -> &LtiInner {
        &self.inner
    }
}

/// Where the tool's keys live.
pub fn keys_dir(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("keys").join("lti")
}

/// The LTI key ring on a store several nodes share.
struct SharedRing {
    key: SealingKey,
    /// The store's `lti_keys` version this node's ring matches.
    version: AtomicI64,
}

/// The store's name of the sealed LTI key ring.
const RING: &str = "lti_keys";

impl Lti {
    /// Opens (creating on first use) the tool keys and builds the clients.
    /// On a PostgreSQL store the key ring is the store's (sealed with the
    /// secrets key): the first node to start seeds it with its own ring
    /// (a site moved with `viva migrate-store` keeps its keys), the others
    /// take it; `data_dir/keys/lti` then only caches it.
    pub async fn open(config: &Config, store: &Store) -> Result<Lti> {
        let lti = config.lti.clone();
        let tool = ToolUrls::new(&config.public_url())?;
        let dir = keys_dir(config);
        let keys = tokio::task::spawn_blocking(move || ToolKeys::open(&dir, viva_lti::now_secs()))
            .await
            .map_err(|e| Error::Internal(format!("opening LTI keys: {e}")))??;
        let keys = Arc::new(keys);
        let shared = match secrets::sealing_key(config)? {
            Some(key) => {
                let mine = keys.export()?;
                let k = key.clone();
                let (version, ring) = store
                    .write(move |tx| secrets::put_if_absent(tx, &k, RING, &mine))
                    .await?;
                keys.import(&ring)?;
                tracing::info!(kid = ?keys.current_kid(), version, "LTI tool keys from the shared store");
                Some(SharedRing {
                    key,
                    version: AtomicI64::new(version),
                })
            }
            None => None,
        };
        let http = HttpClient::new(lti.policy(), viva_lti::USER_AGENT)?;
        let mut jwks = JwksCache::new(http.clone());
        jwks.min_refetch = lti.jwks_refetch_interval;
        Ok(Lti {
            inner: Arc::new(LtiInner {
                services: ServiceClient::new(http.clone(), keys.clone()),
                config: lti,
                tool,
                keys,
                jwks,
                http,
                shared,
                passback_wake: tokio::sync::Notify::new(),
            }),
        })
    }

    /// On a shared store: takes the store's key ring when another node has
    /// rotated it (every node calls this every minute or so).
    pub async fn refresh_keys(&self, store: &Store) -> Result<()> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let stored = store.read(|c| secrets::version(c, RING)).await?;
        if stored == shared.version.load(Ordering::Acquire) {
            return Ok(());
        }
        let k = shared.key.clone();
        let Some((version, ring)) = store.read(move |c| secrets::get(c, &k, RING)).await? else {
            return Ok(());
        };
        let keys = self.keys.clone();
        let changed = tokio::task::spawn_blocking(move || keys.import(&ring))
            .await
            .map_err(|e| Error::Internal(format!("importing LTI keys: {e}")))??;
        shared.version.store(version, Ordering::Release);
        if changed {
            tracing::info!(kid = ?self.keys.current_kid(), version, "took the rotated LTI tool keys from the shared store");
        }
        Ok(())
    }

    /// Runs key rotation when due (called periodically). On a shared store
    /// one node rotates at a time (the `lti-keys` singleton), starting from
    /// the store's ring, and stores the result for the others.
    pub async fn maintain_keys(&self, store: &Store, node: &str) {
        if let Err(e) = self.maintain_keys_once(store, node).await {
            tracing::error!(error = %e, "LTI key rotation failed");
        }
    }

    async fn maintain_keys_once(&self, store: &Store, node: &str) -> Result<()> {
        if self.shared.is_some() {
            let node = node.to_owned();
            // Held two hours, renewed by the hourly check.
            let mine = store
                .write(move |tx| crate::jobs::claim_singleton(tx, "lti-keys", &node, 7_200_000))
                .await?;
            if !mine {
                return Ok(());
            }
            self.refresh_keys(store).await?;
        }
        let keys = self.keys.clone();
        let every = self.config.key_rotation.as_secs();
        let lead = self.config.key_publish_lead.as_secs();
        // Keep a retired key a day past the longest token it signed (5 min).
        let retire_after = lead.max(86_400);
        let (outcome, ring) = tokio::task::spawn_blocking(move || {
            let outcome = keys.maintain(viva_lti::now_secs(), every, lead, retire_after)?;
            let ring = keys.export()?;
            Ok::<_, LtiError>((outcome, ring))
        })
        .await
        .map_err(|e| Error::Internal(format!("LTI key rotation task failed: {e}")))??;
        if let Some(shared) = &self.shared
            && outcome != viva_lti::keys::Rotation::Idle
        {
            let k = shared.key.clone();
            let version = store
                .write(move |tx| secrets::replace(tx, &k, RING, &ring))
                .await?;
            shared.version.store(version, Ordering::Release);
        }
        Ok(())
    }
}

// ---- login states and deep-linking requests ----------------------------------
//
// Kept in the store, so the launch may reach another api node than the login
// did. Each is keyed by the sha256 of its token: what the store holds cannot
// be presented.

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Deletes the oldest `n` rows of `table` matching `filter` (`?1`).
fn evict_oldest(
    tx: &Transaction<'_>,
    table: &str,
    key: &str,
    filter: Option<&str>,
    n: i64,
) -> Result<()> {
    if n <= 0 {
        return Ok(());
    }
    match filter {
        Some(issuer) => tx.execute(
            &format!(
                "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE issuer = ?1 \
                 ORDER BY created_at, {key} LIMIT ?2)"
            ),
            params![issuer, n],
        )?,
        None => tx.execute(
            &format!(
                "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} \
                 ORDER BY created_at, {key} LIMIT ?1)"
            ),
            params![n],
        )?,
    };
    Ok(())
}

/// How many of `count` rows of total `bytes` to drop so that `count + 1`
/// rows and `bytes + size` fit `max_count` and `max_bytes`.
fn excess(count: i64, bytes: i64, size: i64, max_count: i64, max_bytes: i64) -> i64 {
    let by_count = count + 1 - max_count.max(1);
    let by_bytes = if bytes + size > max_bytes && count > 0 {
        let avg = (bytes / count).max(1);
        (bytes + size - max_bytes + avg - 1) / avg
    } else {
        0
    };
    by_count.max(by_bytes).clamp(0, count)
}

/// Keeps a login state until its launch, bounded as
/// [`viva_lti::login::MemoryStateStore`] is: expired states go first, a
/// state over `max_state_bytes` is refused, a flood naming one platform
/// evicts that platform's oldest states only (past `max_per_issuer` or
/// half of `max_bytes`), then the oldest of all past `max_states`/`max_bytes`.
pub fn put_login_state(
    tx: &Transaction<'_>,
    state: &str,
    value: &LoginState,
    limits: StateLimits,
) -> Result<()> {
    let json = serde_json::to_string(value)
        .map_err(|e| Error::Internal(format!("encoding a login state: {e}")))?;
    let size = (json.len() + state.len()) as i64;
    if size > limits.max_state_bytes as i64 {
        return Err(LtiError::InvalidParam {
            name: "login",
            reason: "the login request is too large".into(),
        }
        .into());
    }
    let now = value.created_at as i64;
    tx.execute(
        "DELETE FROM lti_states WHERE created_at <= ?1",
        [now - STATE_TTL_SECS as i64],
    )?;
    let (n, bytes): (i64, i64) = tx.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM lti_states WHERE issuer = ?1",
        [&value.issuer],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let drop = excess(
        n,
        bytes,
        size,
        limits.max_per_issuer as i64,
        (limits.max_bytes / 2) as i64,
    );
    evict_oldest(tx, "lti_states", "state_hash", Some(&value.issuer), drop)?;
    let (n, bytes): (i64, i64) = tx.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM lti_states",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let drop = excess(
        n,
        bytes,
        size,
        limits.max_states as i64,
        limits.max_bytes as i64,
    );
    evict_oldest(tx, "lti_states", "state_hash", None, drop)?;
    tx.execute(
        "INSERT INTO lti_states (state_hash, issuer, value, size, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![token_hash(state), value.issuer, json, size, now],
    )?;
    Ok(())
}

fn decode_state(json: String) -> Result<LoginState> {
    serde_json::from_str(&json).map_err(|e| Error::Internal(format!("a stored login state: {e}")))
}

/// A login state, not consumed (the launch may first need the binding from
/// platform storage).
pub fn peek_login_state(conn: &Connection<'_>, state: &str) -> Result<Option<LoginState>> {
    conn.query_row(
        "SELECT value FROM lti_states WHERE state_hash = ?1",
        [token_hash(state)],
        |r| r.get::<_, String>(0),
    )
    .optional()?
    .map(decode_state)
    .transpose()
}

/// Consumes a login state: of two launches with it, on any nodes, one gets it.
pub fn take_login_state(tx: &Transaction<'_>, state: &str) -> Result<Option<LoginState>> {
    tx.query_row(
        "DELETE FROM lti_states WHERE state_hash = ?1 RETURNING value",
        [token_hash(state)],
        |r| r.get::<_, String>(0),
    )
    .optional()?
    .map(decode_state)
    .transpose()
}

/// Deep-linking requests kept at once.
const DEEP_LINKS_MAX: i64 = 10_000;

/// Remembers a deep-linking request until `ctx.expires_at`; returns its handle.
pub fn save_deep_link(tx: &Transaction<'_>, ctx: &DeepLinkContext) -> Result<String> {
    let handle = viva_lti::login::random_token(16);
    let now = viva_lti::now_secs() as i64;
    tx.execute("DELETE FROM lti_deep_links WHERE expires_at <= ?1", [now])?;
    let n: i64 = tx.query_row("SELECT COUNT(*) FROM lti_deep_links", [], |r| r.get(0))?;
    evict_oldest(
        tx,
        "lti_deep_links",
        "handle_hash",
        None,
        n + 1 - DEEP_LINKS_MAX,
    )?;
    let json = serde_json::to_string(ctx)
        .map_err(|e| Error::Internal(format!("encoding a deep-linking request: {e}")))?;
    tx.execute(
        "INSERT INTO lti_deep_links (handle_hash, context, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4)",
        params![token_hash(&handle), json, now, ctx.expires_at as i64],
    )?;
    Ok(handle)
}

/// A deep-linking request not yet expired.
pub fn deep_link(conn: &Connection<'_>, handle: &str) -> Result<Option<DeepLinkContext>> {
    let json: Option<String> = conn
        .query_row(
            "SELECT context FROM lti_deep_links WHERE handle_hash = ?1 AND expires_at > ?2",
            params![token_hash(handle), viva_lti::now_secs() as i64],
            |r| r.get(0),
        )
        .optional()?;
    json.map(|j| {
        serde_json::from_str(&j)
            .map_err(|e| Error::Internal(format!("a stored deep-linking request: {e}")))
    })
    .transpose()
}

// ---- identities ---------------------------------------------------------------

fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..16])
}

/// The daemon user id of a new LTI user: the user `sub` of the registration
/// (issuer, client_id). Users from before migration 8 keep their ids
/// (see [`resolve_user`]).
pub fn user_id(issuer: &str, client_id: &str, sub: &str) -> String {
    format!("lti-{}", digest(&["user", issuer, client_id, sub]))
}

/// The daemon user of `sub` at the registration (issuer, client_id): the
/// one on record, else a new id from [`user_id`].
pub fn resolve_user(conn: &Connection, issuer: &str, client_id: &str, sub: &str) -> Result<String> {
    let known: Option<String> = conn
        .query_row(
            "SELECT user_id FROM lti_users WHERE issuer = ?1 AND client_id = ?2 AND sub = ?3",
            [issuer, client_id, sub],
            |r| r.get(0),
        )
        .optional()?;
    Ok(known.unwrap_or_else(|| user_id(issuer, client_id, sub)))
}

/// The daemon context id of an LTI context.
pub fn context_id(issuer: &str, client_id: &str, deployment: &str, context: &str) -> String {
    format!(
        "lti-{}",
        digest(&["context", issuer, client_id, deployment, context])
    )
}

/// LTI access levels as daemon roles.
pub fn daemon_roles(access: &[viva_lti::Access]) -> Vec<Role> {
    access
        .iter()
        .map(|a| match a {
            viva_lti::Access::Learner => Role::Learner,
            viva_lti::Access::Instructor => Role::Instructor,
            viva_lti::Access::Admin => Role::Admin,
        })
        .collect()
}

// ---- registrations --------------------------------------------------------------

/// A stored registration.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRegistration {
    #[serde(flatten)]
    pub registration: Registration,
    pub source: String,
    pub created_at: i64,
    pub updated_at: i64,
}

pub fn list_registrations(conn: &Connection) -> Result<Vec<StoredRegistration>> {
    let mut stmt = conn.prepare(
        "SELECT config, source, created_at, updated_at FROM lti_registrations
         ORDER BY issuer, client_id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(cfg, source, created_at, updated_at)| {
            Ok(StoredRegistration {
                registration: serde_json::from_str(&cfg).map_err(|e| {
                    Error::Internal(format!("a stored registration is invalid: {e}"))
                })?,
                source,
                created_at,
                updated_at,
            })
        })
        .collect()
}

/// Registrations of one issuer.
pub fn registrations_for(conn: &Connection, issuer: &str) -> Result<Vec<Registration>> {
    let mut stmt = conn.prepare("SELECT config FROM lti_registrations WHERE issuer = ?1")?;
    let rows = stmt
        .query_map([issuer], |r| r.get::<_, String>(0))?
        .collect::<crate::db::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|c| {
            serde_json::from_str(&c)
                .map_err(|e| Error::Internal(format!("a stored registration is invalid: {e}")))
        })
        .collect()
}

pub fn get_registration(
    conn: &Connection,
    issuer: &str,
    client_id: &str,
) -> Result<Option<Registration>> {
    let cfg: Option<String> = conn
        .query_row(
            "SELECT config FROM lti_registrations WHERE issuer = ?1 AND client_id = ?2",
            [issuer, client_id],
            |r| r.get(0),
        )
        .optional()?;
    cfg.map(|c| {
        serde_json::from_str(&c)
            .map_err(|e| Error::Internal(format!("a stored registration is invalid: {e}")))
    })
    .transpose()
}

/// Inserts a registration; with `replace`, overwrites an existing one.
pub fn save_registration(
    tx: &Transaction<'_>,
    r: &Registration,
    source: &str,
    replace: bool,
) -> Result<()> {
    let cfg = serde_json::to_string(r).map_err(|e| Error::Internal(e.to_string()))?;
    let now = now_ms();
    let exists = get_registration(tx, &r.issuer, &r.client_id)?.is_some();
    if exists && !replace {
        return Err(Error::Conflict {
            code: "registration_exists",
            message: format!(
                "a registration for {} with client id {} exists; remove it first or replace it",
                r.issuer, r.client_id
            ),
        });
    }
    tx.execute(
        "INSERT INTO lti_registrations (issuer, client_id, config, source, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT(issuer, client_id) DO UPDATE SET config = ?3, source = ?4, updated_at = ?5",
        params![r.issuer, r.client_id, cfg, source, now],
    )?;
    Ok(())
}

pub fn remove_registration(tx: &Transaction<'_>, issuer: &str, client_id: &str) -> Result<bool> {
    Ok(tx.execute(
        "DELETE FROM lti_registrations WHERE issuer = ?1 AND client_id = ?2",
        [issuer, client_id],
    )? > 0)
}

// ---- registration invitations ------------------------------------------------------

/// How long a registration invitation stays usable.
pub const INVITE_TTL_SECS: u64 = 3600;

/// A one-time registration invitation: the URL to paste into the platform.
#[derive(Debug, Clone, Serialize)]
pub struct Invite {
    pub url: String,
    pub issuer: Option<String>,
    pub expires_at: i64,
}

fn invite_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Creates a single-use invitation for dynamic registration, valid
/// [`INVITE_TTL_SECS`]. Only its hash is stored; the URL (with the token) is
/// shown once, to the administrator who made it. `issuer`, when given, is the
/// only issuer the registration may have, and may live on another host than
/// the platform's configuration URL (hosted Canvas).
pub fn create_invite(
    tx: &Transaction<'_>,
    tool: &ToolUrls,
    actor: &str,
    issuer: Option<&str>,
) -> Result<Invite> {
    if let Some(i) = issuer {
        viva_lti::registration::origin_of(i)
            .ok_or_else(|| Error::bad_request("invalid_issuer", format!("{i:?} is not a URL")))?;
    }
    let token = viva_lti::login::random_token(24);
    let now = now_ms();
    let expires_at = now + (INVITE_TTL_SECS as i64) * 1000;
    tx.execute(
        "INSERT INTO lti_invites (token_hash, issuer, created_by, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![invite_hash(&token), issuer, actor, now, expires_at],
    )?;
    crate::domain::audit(
        tx,
        actor,
        "platform.invite",
        issuer.unwrap_or(""),
        serde_json::json!({ "expires_at": expires_at }),
    )?;
    let url = url::Url::parse_with_params(&tool.register(), &[("invite", token.as_str())])
        .map_err(|e| Error::Internal(format!("building the invitation URL: {e}")))?;
    Ok(Invite {
        url: url.to_string(),
        issuer: issuer.map(str::to_owned),
        expires_at,
    })
}

/// The issuer an unused, unexpired invitation allows (`Some(None)`: any
/// issuer on the configuration URL's host); `None` when the token is not a
/// usable invitation.
pub fn peek_invite(conn: &Connection, token: &str) -> Result<Option<Option<String>>> {
    Ok(conn
        .query_row(
            "SELECT issuer FROM lti_invites
             WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
            params![invite_hash(token), now_ms()],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()?)
}

/// Marks an invitation used by the registration (issuer, client_id); false
/// when it was used (or expired) meanwhile.
pub fn use_invite(
    tx: &Transaction<'_>,
    token: &str,
    issuer: &str,
    client_id: &str,
) -> Result<bool> {
    Ok(tx.execute(
        "UPDATE lti_invites SET used_at = ?2, used_by = ?3
         WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
        params![
            invite_hash(token),
            now_ms(),
            format!("{issuer} {client_id}")
        ],
    )? > 0)
}

// ---- resource links -------------------------------------------------------------

/// A resource link placed in a platform course.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Link {
    pub id: String,
    pub issuer: String,
    pub client_id: String,
    pub deployment_id: String,
    pub resource_link_id: String,
    pub context_id: String,
    pub assignment_id: Option<String>,
    pub title: Option<String>,
    pub lineitem_url: Option<String>,
    pub lineitems_url: Option<String>,
    pub ags_scopes: Vec<String>,
    pub nrps_url: Option<String>,
}

fn link_from_row(r: &crate::db::Row) -> crate::db::Result<Link> {
    let scopes: String = r.get("ags_scopes")?;
    Ok(Link {
        id: r.get("id")?,
        issuer: r.get("issuer")?,
        client_id: r.get("client_id")?,
        deployment_id: r.get("deployment_id")?,
        resource_link_id: r.get("resource_link_id")?,
        context_id: r.get("context_id")?,
        assignment_id: r.get("assignment_id")?,
        title: r.get("title")?,
        lineitem_url: r.get("lineitem_url")?,
        lineitems_url: r.get("lineitems_url")?,
        ags_scopes: scopes.split_whitespace().map(str::to_owned).collect(),
        nrps_url: r.get("nrps_url")?,
    })
}

pub fn get_link(conn: &Connection, id: &str) -> Result<Option<Link>> {
    Ok(conn
        .query_row("SELECT * FROM lti_links WHERE id = ?1", [id], link_from_row)
        .optional()?)
}

/// Creates or refreshes a link from a launch. Service URLs come only from
/// signed launch claims; a launch without a service claim (platforms may
/// leave NRPS out of learners' launches) keeps the last one seen.
pub fn upsert_link(tx: &Transaction<'_>, l: &Link) -> Result<Link> {
    let now = now_ms();
    let existing: Option<String> = tx
        .query_row(
            "SELECT id FROM lti_links WHERE issuer = ?1 AND client_id = ?2 AND deployment_id = ?3
             AND resource_link_id = ?4",
            params![l.issuer, l.client_id, l.deployment_id, l.resource_link_id],
            |r| r.get(0),
        )
        .optional()?;
    let id = existing.unwrap_or_else(|| l.id.clone());
    tx.execute(
        "INSERT INTO lti_links (id, issuer, client_id, deployment_id, resource_link_id, context_id,
             assignment_id, title, lineitem_url, lineitems_url, ags_scopes, nrps_url, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13)
         ON CONFLICT(id) DO UPDATE SET context_id = ?6,
             assignment_id = COALESCE(lti_links.assignment_id, ?7), title = COALESCE(?8, lti_links.title),
             lineitem_url = COALESCE(?9, lti_links.lineitem_url), lineitems_url = COALESCE(?10, lti_links.lineitems_url),
             ags_scopes = CASE WHEN ?11 = '' THEN lti_links.ags_scopes ELSE ?11 END,
             nrps_url = COALESCE(?12, lti_links.nrps_url), updated_at = ?13",
        params![
            id,
            l.issuer,
            l.client_id,
            l.deployment_id,
            l.resource_link_id,
            l.context_id,
            l.assignment_id,
            l.title,
            l.lineitem_url,
            l.lineitems_url,
            l.ags_scopes.join(" "),
            l.nrps_url,
            now
        ],
    )?;
    get_link(tx, &id)?.ok_or(Error::NotFound("link"))
}

pub fn set_link_assignment(tx: &Transaction<'_>, link: &str, assignment: &str) -> Result<()> {
    tx.execute(
        "UPDATE lti_links SET assignment_id = ?2, updated_at = ?3 WHERE id = ?1",
        params![link, assignment, now_ms()],
    )?;
    Ok(())
}

pub fn set_link_lineitem(tx: &Transaction<'_>, link: &str, lineitem: &str) -> Result<()> {
    tx.execute(
        "UPDATE lti_links SET lineitem_url = ?2, updated_at = ?3 WHERE id = ?1",
        params![link, lineitem, now_ms()],
    )?;
    Ok(())
}

/// Records the LTI identity of `user` (LTI `sub` at the registration).
pub fn record_user(
    tx: &Transaction<'_>,
    user: &str,
    issuer: &str,
    client_id: &str,
    sub: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO lti_users (issuer, client_id, sub, user_id) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(issuer, client_id, sub) DO NOTHING",
        params![issuer, client_id, sub, user],
    )?;
    Ok(())
}

/// Records that `user` (LTI `sub`) launched `link`.
pub fn record_launch(tx: &Transaction<'_>, link: &str, user: &str, sub: &str) -> Result<()> {
    let now = now_ms();
    tx.execute(
        "INSERT INTO lti_link_members (link_id, user_id, sub, last_launch_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(link_id, user_id) DO UPDATE SET sub = ?3, last_launch_at = ?4",
        params![link, user, sub, now],
    )?;
    Ok(())
}

/// Where a submission's grade goes: each link of its assignment that its
/// author launched, with the author's LTI `sub` there.
pub fn passback_targets(conn: &Connection, submission: &str) -> Result<Vec<(Link, String)>> {
    let mut stmt = conn.prepare(
        "SELECT l.*, m.sub AS member_sub FROM submissions s
         JOIN lti_link_members m ON m.user_id = s.user_id
         JOIN lti_links l ON l.id = m.link_id AND l.assignment_id = s.assignment_id
         WHERE s.id = ?1 ORDER BY l.id",
    )?;
    let rows = stmt
        .query_map([submission], |r| {
            Ok((link_from_row(r)?, r.get::<_, String>("member_sub")?))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Whether `context` holds a link of the registration (issuer, client_id).
pub fn context_of_registration(
    conn: &Connection,
    context: &str,
    issuer: &str,
    client_id: &str,
) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM lti_links WHERE context_id = ?1 AND issuer = ?2 AND client_id = ?3 LIMIT 1",
            [context, issuer, client_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Opens the store for CLI use and returns it with the configuration.
pub fn open_store(config: &Config) -> Result<Store> {
    crate::open_data_dir(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_state(issuer: &str, now: u64) -> LoginState {
        LoginState {
            issuer: issuer.into(),
            client_id: "c".into(),
            nonce: "n".into(),
            binding: "b".into(),
            created_at: now,
            request: viva_lti::LoginRequest {
                iss: issuer.into(),
                login_hint: "h".into(),
                target_link_uri: "https://viva.example.edu/lti/launch".into(),
                lti_message_hint: None,
                client_id: Some("c".into()),
                lti_deployment_id: None,
                lti_storage_target: None,
            },
        }
    }

    #[tokio::test]
    async fn login_states_are_single_use_hashed_and_a_flood_evicts_its_own_platform_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("viva.db")).expect("open");
        let now = viva_lti::now_secs();
        let limits = StateLimits {
            max_states: 50,
            max_bytes: 1 << 20,
            max_state_bytes: 4096,
            max_per_issuer: 10,
        };
        let put = |state: String, issuer: &'static str, at: u64| {
            store.write(move |tx| put_login_state(tx, &state, &login_state(issuer, at), limits))
        };
        put("calm-1".into(), "https://calm.example", now)
            .await
            .expect("put");
        for i in 0..40 {
            put(format!("flood-{i}"), "https://flood.example", now)
                .await
                .expect("put");
        }
        let peek = |s: &'static str| store.read(move |c| peek_login_state(c, s));
        let take = |s: &'static str| store.write(move |tx| take_login_state(tx, s));
        assert!(
            peek("calm-1").await.expect("peek").is_some(),
            "another platform's state survives"
        );
        assert!(
            peek("flood-0").await.expect("peek").is_none(),
            "the flood's oldest went"
        );
        assert!(peek("flood-39").await.expect("peek").is_some());
        let flood: i64 = store
            .read(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM lti_states WHERE issuer = 'https://flood.example'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .expect("count");
        assert_eq!(flood, 10);
        let kept: Vec<String> = store
            .read(|c| {
                Ok(c.prepare("SELECT state_hash FROM lti_states")?
                    .query_map([], |r| r.get(0))?
                    .collect::<crate::db::Result<_>>()?)
            })
            .await
            .expect("hashes");
        assert!(
            !kept.iter().any(|k| k.contains("calm")),
            "only hashes are stored"
        );
        // Single use.
        assert_eq!(
            take("calm-1")
                .await
                .expect("take")
                .map(|s| s.issuer)
                .as_deref(),
            Some("https://calm.example")
        );
        assert!(take("calm-1").await.expect("take").is_none());
        // Expired states go on the next login.
        put(
            "old".into(),
            "https://calm.example",
            now - STATE_TTL_SECS - 1,
        )
        .await
        .expect("put");
        put("new".into(), "https://calm.example", now)
            .await
            .expect("put");
        assert!(peek("old").await.expect("peek").is_none());
        // An oversized login is refused.
        let mut big = login_state("https://calm.example", now);
        big.request.lti_message_hint = Some("x".repeat(8000));
        let e = store
            .write(move |tx| put_login_state(tx, "big", &big, limits))
            .await
            .expect_err("too large");
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[tokio::test]
    async fn deep_linking_requests_are_found_by_handle_until_they_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("viva.db")).expect("open");
        let ctx = |expires_at: u64| DeepLinkContext {
            issuer: "https://i".into(),
            client_id: "c".into(),
            deployment_id: "d".into(),
            context_id: "ctx".into(),
            settings: serde_json::from_value(serde_json::json!({
                "deep_link_return_url": "https://i/return",
                "accept_types": ["ltiResourceLink"],
                "accept_multiple": false,
                "data": null,
                "title": null
            }))
            .expect("settings"),
            expires_at,
        };
        let live = ctx(viva_lti::now_secs() + 3600);
        let handle = store
            .write(move |tx| save_deep_link(tx, &live))
            .await
            .expect("save");
        let h = handle.clone();
        let got = store.read(move |c| deep_link(c, &h)).await.expect("get");
        assert_eq!(got.map(|c| c.context_id).as_deref(), Some("ctx"));
        assert!(
            store
                .read(|c| deep_link(c, "guessed"))
                .await
                .expect("get")
                .is_none()
        );
        let dead = ctx(viva_lti::now_secs() - 1);
        let old = store
            .write(move |tx| save_deep_link(tx, &dead))
            .await
            .expect("save");
        assert!(
            store
                .read(move |c| deep_link(c, &old))
                .await
                .expect("get")
                .is_none()
        );
    }

    #[tokio::test]
    async fn invitations_are_shown_once_used_once_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("viva.db")).expect("open");
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        let make = |issuer: Option<&'static str>| {
            let tool = tool.clone();
            store.write(move |tx| create_invite(tx, &tool, "cli", issuer))
        };
        let invite = make(Some("https://canvas.instructure.com"))
            .await
            .expect("invite");
        let url = url::Url::parse(&invite.url).expect("url");
        assert_eq!(url.path(), "/lti/register");
        let token = url
            .query_pairs()
            .find(|(k, _)| k == "invite")
            .map(|(_, v)| v.into_owned())
            .expect("token");
        let t = token.clone();
        let stored: String = store
            .read(move |c| Ok(c.query_row("SELECT token_hash FROM lti_invites", [], |r| r.get(0))?))
            .await
            .expect("row");
        assert_ne!(stored, t, "only the hash is kept");
        let peek = |t: String| store.read(move |c| peek_invite(c, &t));
        assert_eq!(
            peek(token.clone()).await.expect("peek"),
            Some(Some("https://canvas.instructure.com".to_string()))
        );
        assert_eq!(peek("guessed".into()).await.expect("peek"), None);
        let take = |t: String| store.write(move |tx| use_invite(tx, &t, "https://i", "c"));
        assert!(take(token.clone()).await.expect("use"));
        assert!(!take(token.clone()).await.expect("use again"), "once");
        assert_eq!(peek(token).await.expect("peek"), None);
        // An expired invitation is no invitation.
        let old = make(None).await.expect("invite");
        let old_token = url::Url::parse(&old.url)
            .expect("url")
            .query_pairs()
            .find(|(k, _)| k == "invite")
            .map(|(_, v)| v.into_owned())
            .expect("token");
        store
            .write(|tx| Ok(tx.execute("UPDATE lti_invites SET expires_at = 0", [])?))
            .await
            .expect("expire");
        assert_eq!(peek(old_token.clone()).await.expect("peek"), None);
        assert!(!take(old_token).await.expect("use"));
    }

    #[test]
    fn identities_are_scoped_and_valid_ids() {
        let a = user_id("https://canvas.instructure.com", "100", "u1");
        let b = user_id("https://moodle.example.edu", "100", "u1");
        assert_ne!(a, b, "the same sub on two platforms is two users");
        let a2 = user_id("https://canvas.instructure.com", "200", "u1");
        assert_ne!(
            a, a2,
            "the same sub at two tenants sharing an issuer is two users"
        );
        crate::domain::validate_id(&a, "user").expect("valid id");
        let c1 = context_id("https://canvas.instructure.com", "100", "d", "c");
        let c2 = context_id("https://canvas.instructure.com", "200", "d", "c");
        assert_ne!(c1, c2, "two tenants sharing an issuer never share a course");
        crate::domain::validate_id(&c1, "context").expect("valid id");
    }
}
