//! Sessions: short-lived signed bearer tokens scoped to a context, a user and
//! roles, and single-use tickets for places that cannot send headers
//! (EventSource, `<video src>`).
//!
//! Tokens are HS256 JWTs signed with a 256-bit key kept in
//! `<data_dir>/keys/session.key` (mode 0600, created on first use). LTI
//! launches and `viva session` both mint these same tokens.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::{Role, Submission};
use crate::error::{Error, Result};

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

/// Signs and verifies session tokens; keeps single-use tickets.
#[derive(Clone)]
pub struct Sessions {
    encoding: Arc<EncodingKey>,
    decoding: Arc<DecodingKey>,
    ttl: Duration,
    ticket_ttl: Duration,
    tickets: Arc<Mutex<Tickets>>,
}

/// Tickets not yet redeemed, bounded: at most [`TICKETS_PER_USER`] per user
/// and [`TICKETS_MAX`] in all (the oldest go first), expired ones dropped
/// from the front of the expiry order on every mint (O(log n)).
#[derive(Default)]
struct Tickets {
    by_id: HashMap<String, Ticket>,
    /// (expiry, sequence) → ticket: expiry and global eviction order.
    order: std::collections::BTreeMap<(i64, u64), String>,
    /// user → their tickets by sequence, oldest first.
    by_user: HashMap<String, std::collections::BTreeMap<u64, String>>,
    seq: u64,
}

/// Unredeemed tickets one user may hold (the widget needs two or three).
pub const TICKETS_PER_USER: usize = 32;
/// Unredeemed tickets in all.
pub const TICKETS_MAX: usize = 100_000;

impl Tickets {
    fn remove(&mut self, id: &str) -> Option<Ticket> {
        let t = self.by_id.remove(id)?;
        self.order.remove(&(t.expires_at_ms, t.seq));
        if let Some(mine) = self.by_user.get_mut(&t.claims.sub) {
            mine.remove(&t.seq);
            if mine.is_empty() {
                self.by_user.remove(&t.claims.sub);
            }
        }
        Some(t)
    }

    fn insert(&mut self, id: String, mut t: Ticket, now: i64) {
        while let Some(((exp, _), oldest)) = self.order.first_key_value() {
            if *exp > now && self.by_id.len() < TICKETS_MAX {
                break;
            }
            let oldest = oldest.clone();
            self.remove(&oldest);
        }
        let user = t.claims.sub.clone();
        while self
            .by_user
            .get(&user)
            .is_some_and(|m| m.len() >= TICKETS_PER_USER)
        {
            let Some(oldest) = self
                .by_user
                .get(&user)
                .and_then(|m| m.first_key_value())
                .map(|(_, id)| id.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
        self.seq += 1;
        t.seq = self.seq;
        self.order.insert((t.expires_at_ms, t.seq), id.clone());
        self.by_user
            .entry(user)
            .or_default()
            .insert(t.seq, id.clone());
        self.by_id.insert(id, t);
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[derive(Debug, Clone)]
struct Ticket {
    claims: Claims,
    scope: String,
    expires_at_ms: i64,
    seq: u64,
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
            tickets: Arc::new(Mutex::new(Tickets::default())),
        }
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

    /// Mints a single-use ticket for `scope` ("events", "media:<id>").
    pub fn ticket(&self, claims: &Claims, scope: &str) -> (String, Duration) {
        let ticket = hex::encode(rand::random::<[u8; 24]>());
        let now = crate::clock::now_ms();
        if let Ok(mut t) = self.tickets.lock() {
            t.insert(
                ticket.clone(),
                Ticket {
                    claims: claims.clone(),
                    scope: scope.to_owned(),
                    expires_at_ms: now + self.ticket_ttl.as_millis() as i64,
                    seq: 0,
                },
                now,
            );
        }
        (ticket, self.ticket_ttl)
    }

    /// Unredeemed tickets kept now.
    pub fn tickets_held(&self) -> usize {
        self.tickets.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Consumes a ticket: valid once, within its lifetime, for its scope.
    pub fn redeem(&self, ticket: &str, scope: &str) -> Result<Claims> {
        let t = self
            .tickets
            .lock()
            .ok()
            .and_then(|mut t| t.remove(ticket))
            .ok_or_else(|| Error::Unauthorized("the ticket is unknown or already used".into()))?;
        if t.expires_at_ms <= crate::clock::now_ms() {
            return Err(Error::Unauthorized("the ticket has expired".into()));
        }
        if t.scope != scope {
            return Err(Error::Unauthorized(format!(
                "the ticket is for {:?}, not {scope:?}",
                t.scope
            )));
        }
        Ok(t.claims)
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

    #[test]
    fn tickets_are_single_use_and_scoped() {
        let s = sessions();
        let (_, claims) = s.mint("a", "c", &[Role::Learner], None).expect("mint");
        let (t, _) = s.ticket(&claims, "events");
        assert!(s.redeem(&t, "media:x").is_err(), "wrong scope");
        let (t, _) = s.ticket(&claims, "events");
        assert_eq!(s.redeem(&t, "events").expect("ok").sub, "a");
        assert!(s.redeem(&t, "events").is_err(), "second use");
    }

    #[test]
    fn tickets_are_bounded_per_user_and_the_newest_work() {
        let s = sessions();
        let (_, a) = s.mint("a", "c", &[Role::Learner], None).expect("mint");
        let (_, b) = s.mint("b", "c", &[Role::Learner], None).expect("mint");
        let (tb, _) = s.ticket(&b, "events");
        let mut last = String::new();
        for _ in 0..10_000 {
            last = s.ticket(&a, "events").0;
        }
        assert_eq!(
            s.tickets_held(),
            TICKETS_PER_USER + 1,
            "one user cannot fill the map"
        );
        assert_eq!(s.redeem(&last, "events").expect("newest").sub, "a");
        assert_eq!(
            s.redeem(&tb, "events").expect("b's ticket survives").sub,
            "b"
        );
        assert_eq!(s.tickets_held(), TICKETS_PER_USER - 1);
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
