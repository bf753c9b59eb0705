//! OIDC third-party login initiation and the state that binds a launch to the
//! browser that started it.
//!
//! The platform sends the browser to the tool's login URL (GET or POST) with
//! `iss`, `login_hint`, `target_link_uri` and usually `client_id`,
//! `lti_message_hint`, `lti_deployment_id`, `lti_storage_target`. The tool
//! answers with a redirect to the platform's authorization endpoint carrying a
//! fresh `state` and `nonce`. The state record holds the nonce (so a nonce is
//! usable only with its state) and a random browser *binding* that the launch
//! must present, from a cookie or from the platform's client-side storage.
//! States are single use and live at most [`STATE_TTL_SECS`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{LtiError, Result};
use crate::registration::{Registration, ToolUrls};

/// Longest time between login and launch.
pub const STATE_TTL_SECS: u64 = 600;

/// The parameters of a login initiation request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginRequest {
    pub iss: String,
    pub login_hint: String,
    pub target_link_uri: String,
    pub lti_message_hint: Option<String>,
    pub client_id: Option<String>,
    pub lti_deployment_id: Option<String>,
    /// The frame that offers client-side storage (`_parent`, or Canvas's
    /// `post_message_forwarding`).
    pub lti_storage_target: Option<String>,
}

const MAX_PARAM: usize = 4096;

impl LoginRequest {
    /// Reads the request from query or form parameters (first value wins).
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<LoginRequest> {
        let mut map: HashMap<&str, &str> = HashMap::new();
        for (k, v) in params {
            map.entry(k).or_insert(v);
        }
        let get = |name: &'static str| -> Result<Option<String>> {
            match map.get(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) if v.len() > MAX_PARAM => Err(LtiError::InvalidParam {
                    name,
                    reason: format!("longer than {MAX_PARAM} characters"),
                }),
                Some(v) => Ok(Some((*v).to_owned())),
            }
        };
        let need = |name: &'static str| -> Result<String> {
            get(name)?.ok_or(LtiError::MissingParam(name))
        };
        let req = LoginRequest {
            iss: need("iss")?,
            login_hint: need("login_hint")?,
            target_link_uri: need("target_link_uri")?,
            lti_message_hint: get("lti_message_hint")?,
            client_id: get("client_id")?,
            lti_deployment_id: get("lti_deployment_id")?,
            lti_storage_target: get("lti_storage_target")?,
        };
        if let Some(t) = &req.lti_storage_target
            && !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(LtiError::InvalidParam {
                name: "lti_storage_target",
                reason: "must be a frame name".into(),
            });
        }
        Ok(req)
    }

    /// The parameters again, to restart the login (the "open in a new
    /// window" fallback).
    pub fn to_params(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("iss", self.iss.clone()),
            ("login_hint", self.login_hint.clone()),
            ("target_link_uri", self.target_link_uri.clone()),
        ];
        for (k, v) in [
            ("lti_message_hint", &self.lti_message_hint),
            ("client_id", &self.client_id),
            ("lti_deployment_id", &self.lti_deployment_id),
        ] {
            if let Some(v) = v {
                out.push((k, v.clone()));
            }
        }
        out
    }
}

/// What the tool remembers between login and launch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginState {
    pub issuer: String,
    pub client_id: String,
    pub nonce: String,
    /// Secret the launching browser must present (cookie or platform storage).
    pub binding: String,
    pub created_at: u64,
    pub request: LoginRequest,
}

impl std::fmt::Debug for LoginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginState")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl LoginState {
    pub fn expired(&self, now: u64) -> bool {
        now >= self.created_at.saturating_add(STATE_TTL_SECS)
    }
}

/// Where login states wait for their launch.
pub trait StateStore: Send + Sync {
    /// Stores a new state.
    fn put(&self, state: &str, value: LoginState) -> Result<()>;
    /// Reads a state without consuming it.
    fn peek(&self, state: &str) -> Option<LoginState>;
    /// Removes and returns a state (single use).
    fn take(&self, state: &str) -> Option<LoginState>;
}

/// Bounds of a [`MemoryStateStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// States kept at once, over all platforms.
    pub max_states: usize,
    /// Their approximate size in bytes, over all platforms.
    pub max_bytes: usize,
    /// One state's approximate size: larger login requests are refused.
    pub max_state_bytes: usize,
    /// States of one issuer (platform) at once: a flood of logins naming one
    /// platform evicts that platform's oldest states, never another's.
    pub max_per_issuer: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            max_states: 50_000,
            max_bytes: 32 * 1024 * 1024,
            max_state_bytes: 8 * 1024,
            max_per_issuer: 25_000,
        }
    }
}

struct Entry {
    seq: u64,
    size: usize,
    value: LoginState,
}

#[derive(Default)]
struct IssuerUse {
    order: BTreeMap<u64, String>,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    states: HashMap<String, Entry>,
    /// Insertion order (≈ creation order): expiry and eviction take the
    /// oldest first in O(log n).
    order: BTreeMap<u64, String>,
    by_issuer: HashMap<String, IssuerUse>,
    bytes: usize,
    next_seq: u64,
}

impl Inner {
    fn remove(&mut self, state: &str) -> Option<LoginState> {
        let e = self.states.remove(state)?;
        self.order.remove(&e.seq);
        self.bytes = self.bytes.saturating_sub(e.size);
        if let Some(u) = self.by_issuer.get_mut(&e.value.issuer) {
            u.order.remove(&e.seq);
            u.bytes = u.bytes.saturating_sub(e.size);
            if u.order.is_empty() {
                self.by_issuer.remove(&e.value.issuer);
            }
        }
        Some(e.value)
    }

    fn oldest(&self) -> Option<String> {
        self.order.first_key_value().map(|(_, k)| k.clone())
    }

    fn oldest_of(&self, issuer: &str) -> Option<String> {
        self.by_issuer
            .get(issuer)?
            .order
            .first_key_value()
            .map(|(_, k)| k.clone())
    }
}

/// An in-memory [`StateStore`], bounded: a cap on each state's size, on the
/// states of one platform and on all of them (count and bytes). When full,
/// the oldest states go first (a flood of forged logins delays nobody's real
/// login by more than pushing out older forged ones); expired ones are
/// dropped from the front on every insert.
pub struct MemoryStateStore {
    inner: Mutex<Inner>,
    limits: StateLimits,
}

impl MemoryStateStore {
    /// A store of at most `max` states, the other limits at their defaults.
    pub fn new(max: usize) -> MemoryStateStore {
        MemoryStateStore::with_limits(StateLimits {
            max_states: max,
            max_per_issuer: max.div_ceil(2).max(1),
            ..StateLimits::default()
        })
    }

    pub fn with_limits(limits: StateLimits) -> MemoryStateStore {
        MemoryStateStore {
            inner: Mutex::new(Inner::default()),
            limits,
        }
    }

    /// States kept now, and their approximate size in bytes.
    pub fn usage(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map(|i| (i.states.len(), i.bytes))
            .unwrap_or((0, 0))
    }
}

impl Default for MemoryStateStore {
    fn default() -> Self {
        MemoryStateStore::with_limits(StateLimits::default())
    }
}

/// What a state costs in memory, near enough: its strings and a fixed overhead.
fn approx_size(state: &str, v: &LoginState) -> usize {
    let r = &v.request;
    let opt = |o: &Option<String>| o.as_ref().map_or(0, String::len);
    256 + state.len()
        + v.issuer.len()
        + v.client_id.len()
        + v.nonce.len()
        + v.binding.len()
        + r.iss.len()
        + r.login_hint.len()
        + r.target_link_uri.len()
        + opt(&r.lti_message_hint)
        + opt(&r.client_id)
        + opt(&r.lti_deployment_id)
        + opt(&r.lti_storage_target)
}

impl StateStore for MemoryStateStore {
    fn put(&self, state: &str, value: LoginState) -> Result<()> {
        let size = approx_size(state, &value);
        if size > self.limits.max_state_bytes {
            return Err(LtiError::InvalidParam {
                name: "login",
                reason: "the login request is too large".into(),
            });
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| LtiError::Keys("state store poisoned".into()))?;
        let now = value.created_at;
        // Expired states leave from the front (insertion order).
        while let Some(k) = inner.oldest() {
            if !inner.states.get(&k).is_some_and(|e| e.value.expired(now)) {
                break;
            }
            inner.remove(&k);
        }
        let l = self.limits;
        let issuer = value.issuer.clone();
        let issuer_bytes = l.max_bytes / 2;
        while inner.by_issuer.get(&issuer).is_some_and(|u| {
            u.order.len() >= l.max_per_issuer.max(1) || u.bytes + size > issuer_bytes
        }) {
            let Some(k) = inner.oldest_of(&issuer) else {
                break;
            };
            inner.remove(&k);
        }
        while !inner.states.is_empty()
            && (inner.states.len() >= l.max_states.max(1) || inner.bytes + size > l.max_bytes)
        {
            let Some(k) = inner.oldest() else { break };
            inner.remove(&k);
        }
        inner.remove(state);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.order.insert(seq, state.to_owned());
        let u = inner.by_issuer.entry(issuer).or_default();
        u.order.insert(seq, state.to_owned());
        u.bytes += size;
        inner.bytes += size;
        inner
            .states
            .insert(state.to_owned(), Entry { seq, size, value });
        Ok(())
    }

    fn peek(&self, state: &str) -> Option<LoginState> {
        self.inner
            .lock()
            .ok()?
            .states
            .get(state)
            .map(|e| e.value.clone())
    }

    fn take(&self, state: &str) -> Option<LoginState> {
        self.inner.lock().ok()?.remove(state)
    }
}

/// The answer to a login request: where to send the browser and what to
/// remember there.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginStart {
    /// The platform's authorization endpoint with the auth request.
    pub redirect_url: String,
    pub state: String,
    /// Store in the state cookie and, where offered, platform storage.
    pub binding: String,
}

impl std::fmt::Debug for LoginStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginStart").finish_non_exhaustive()
    }
}

/// A random URL-safe token of `bytes` bytes.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

/// Validates a login request against its registration and the tool's URLs,
/// stores a new state and builds the authorization redirect.
///
/// `redirect_uri` is always the tool's configured launch URL, never derived
/// from the request (Host headers and the like).
pub fn begin_login(
    req: &LoginRequest,
    registration: &Registration,
    tool: &ToolUrls,
    store: &dyn StateStore,
    now: u64,
) -> Result<LoginStart> {
    let (start, state) = prepare_login(req, registration, tool, now)?;
    store.put(&start.state, state)?;
    Ok(start)
}

/// [`begin_login`] without the store: the redirect and the state to keep
/// under `start.state` (for a caller whose state store is asynchronous).
pub fn prepare_login(
    req: &LoginRequest,
    registration: &Registration,
    tool: &ToolUrls,
    now: u64,
) -> Result<(LoginStart, LoginState)> {
    if req.iss != registration.issuer {
        return Err(LtiError::UnknownRegistration {
            issuer: req.iss.clone(),
            client_id: req.client_id.clone(),
        });
    }
    if !tool.owns(&req.target_link_uri) {
        return Err(LtiError::ForeignTargetLink(req.target_link_uri.clone()));
    }
    if let Some(d) = &req.lti_deployment_id
        && !registration.has_deployment(d)
    {
        return Err(LtiError::UnknownDeployment(d.clone()));
    }
    let state = random_token(32);
    let nonce = random_token(24);
    let binding = random_token(24);
    let mut url = Url::parse(&registration.auth_login_url).map_err(|_| LtiError::InvalidParam {
        name: "auth_login_url",
        reason: "the registration's authorization URL is invalid".into(),
    })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("scope", "openid")
            .append_pair("response_type", "id_token")
            .append_pair("response_mode", "form_post")
            .append_pair("prompt", "none")
            .append_pair("client_id", &registration.client_id)
            .append_pair("redirect_uri", &tool.launch())
            .append_pair("login_hint", &req.login_hint)
            .append_pair("state", &state)
            .append_pair("nonce", &nonce);
        if let Some(h) = &req.lti_message_hint {
            q.append_pair("lti_message_hint", h);
        }
        if let Some(d) = &req.lti_deployment_id {
            q.append_pair("lti_deployment_id", d);
        }
    }
    let kept = LoginState {
        issuer: registration.issuer.clone(),
        client_id: registration.client_id.clone(),
        nonce,
        binding: binding.clone(),
        created_at: now,
        request: req.clone(),
    };
    Ok((
        LoginStart {
            redirect_url: url.to_string(),
            state,
            binding,
        },
        kept,
    ))
}

/// The cookie that carries a state's binding.
pub fn state_cookie_name(state: &str) -> String {
    // Cookie names allow hex; the state is hex.
    format!("viva_lti_{}", &state[..state.len().min(64)])
}

/// The key under which the binding is kept in platform storage.
pub fn storage_key(state: &str) -> String {
    format!("viva_state_{state}")
}

/// Checks a presented binding against the state (without consuming it) and
/// returns the state. Expired states are removed.
pub fn check_binding(
    store: &dyn StateStore,
    state: &str,
    presented: Option<&str>,
    now: u64,
) -> Result<LoginState> {
    let s = store.peek(state).ok_or(LtiError::UnknownState)?;
    if let Err(e) = check_state(&s, presented, now) {
        if matches!(e, LtiError::StateExpired) {
            store.take(state);
        }
        return Err(e);
    }
    Ok(s)
}

/// [`check_binding`] on a state already read: `StateExpired` (the caller
/// removes it) or `StateNotBound` unless `presented` is its binding.
pub fn check_state(s: &LoginState, presented: Option<&str>, now: u64) -> Result<()> {
    if s.expired(now) {
        return Err(LtiError::StateExpired);
    }
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), s.binding.as_bytes()) => Ok(()),
        _ => Err(LtiError::StateNotBound),
    }
}

/// Consumes a state whose binding was checked; a second use fails.
pub fn consume(store: &dyn StateStore, state: &str) -> Result<LoginState> {
    store.take(state).ok_or(LtiError::UnknownState)
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> Registration {
        Registration {
            issuer: "https://moodle.example.edu".into(),
            client_id: "abc".into(),
            name: String::new(),
            auth_login_url: "https://moodle.example.edu/mod/lti/auth.php?x=1".into(),
            auth_token_url: "https://moodle.example.edu/mod/lti/token.php".into(),
            auth_token_audience: None,
            key_set_url: "https://moodle.example.edu/mod/lti/certs.php".into(),
            deployments: vec!["7".into()],
            algorithms: vec![],
            frame_origins: vec![],
        }
    }

    fn params(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut p = vec![
            ("iss", "https://moodle.example.edu"),
            ("login_hint", "2"),
            ("target_link_uri", "https://viva.example.edu/lti/launch"),
            ("client_id", "abc"),
        ];
        p.extend_from_slice(extra);
        p
    }

    #[test]
    fn required_parameters_are_named() {
        for missing in ["iss", "login_hint", "target_link_uri"] {
            let p: Vec<_> = params(&[])
                .into_iter()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = LoginRequest::from_params(p).expect_err(missing);
            assert!(matches!(e, LtiError::MissingParam(m) if m == missing));
        }
        let e = LoginRequest::from_params(params(&[("lti_storage_target", "x'><script>")]))
            .expect_err("bad frame");
        assert_eq!(e.code(), "invalid_param");
    }

    #[test]
    fn login_redirects_to_the_registered_endpoint_with_state_and_nonce() {
        let store = MemoryStateStore::default();
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        let req = LoginRequest::from_params(params(&[("lti_message_hint", "h")])).expect("req");
        let start = begin_login(&req, &registration(), &tool, &store, 1000).expect("login");
        let url = Url::parse(&start.redirect_url).expect("url");
        assert_eq!(url.host_str(), Some("moodle.example.edu"));
        let q: HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["x"], "1", "existing query kept");
        assert_eq!(q["redirect_uri"], "https://viva.example.edu/lti/launch");
        assert_eq!(q["state"], start.state);
        assert_eq!(q["response_mode"], "form_post");
        assert_eq!(q["prompt"], "none");
        assert_eq!(q["lti_message_hint"], "h");
        let stored = store.peek(&start.state).expect("stored");
        assert_eq!(q["nonce"], stored.nonce);
        assert!(!start.redirect_url.contains(&start.binding));
    }

    #[test]
    fn foreign_targets_and_unknown_deployments_are_refused() {
        let store = MemoryStateStore::default();
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        let req = LoginRequest::from_params(vec![
            ("iss", "https://moodle.example.edu"),
            ("login_hint", "2"),
            ("target_link_uri", "https://evil.example.com/phish"),
        ])
        .expect("req");
        let e = begin_login(&req, &registration(), &tool, &store, 0).expect_err("foreign");
        assert_eq!(e.code(), "foreign_target_link");
        let req = LoginRequest::from_params(params(&[("lti_deployment_id", "99")])).expect("req");
        let e = begin_login(&req, &registration(), &tool, &store, 0).expect_err("deployment");
        assert_eq!(e.code(), "unknown_deployment");
        assert_eq!(store.usage().0, 0, "no state kept");
    }

    #[test]
    fn states_are_bound_single_use_and_expire() {
        let store = MemoryStateStore::default();
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        let req = LoginRequest::from_params(params(&[])).expect("req");
        let s = begin_login(&req, &registration(), &tool, &store, 1000).expect("login");
        let e = check_binding(&store, &s.state, Some("wrong"), 1001).expect_err("binding");
        assert_eq!(e.code(), "state_not_bound");
        let e = check_binding(&store, &s.state, None, 1001).expect_err("no binding");
        assert_eq!(e.code(), "state_not_bound");
        check_binding(&store, &s.state, Some(&s.binding), 1001).expect("bound");
        consume(&store, &s.state).expect("first use");
        let e = consume(&store, &s.state).expect_err("second use");
        assert_eq!(e.code(), "unknown_state");

        let s = begin_login(&req, &registration(), &tool, &store, 1000).expect("login");
        let e = check_binding(&store, &s.state, Some(&s.binding), 1000 + STATE_TTL_SECS)
            .expect_err("expired");
        assert_eq!(e.code(), "state_expired");
        assert!(store.peek(&s.state).is_none(), "expired state removed");
    }

    #[test]
    fn the_store_is_bounded() {
        let store = MemoryStateStore::new(2);
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        let req = LoginRequest::from_params(params(&[])).expect("req");
        let first = begin_login(&req, &registration(), &tool, &store, 0).expect("1");
        begin_login(&req, &registration(), &tool, &store, 0).expect("2");
        // Full: the oldest goes, the new login works.
        let third = begin_login(&req, &registration(), &tool, &store, 1).expect("3");
        assert!(store.peek(&first.state).is_none(), "the oldest was evicted");
        assert!(store.peek(&third.state).is_some());
        assert_eq!(store.usage().0, 1, "one platform holds at most half");
        // Old ones expire and make room.
        begin_login(&req, &registration(), &tool, &store, STATE_TTL_SECS + 5).expect("room");
        assert!(store.peek(&third.state).is_none(), "expired");
    }

    #[test]
    fn a_flood_of_large_forged_logins_stays_bounded_and_real_logins_work() {
        let limits = StateLimits::default();
        let store = MemoryStateStore::default();
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        // Another platform's student logged in just before the flood.
        let mut canvas = registration();
        canvas.issuer = "https://canvas.example.edu".into();
        canvas.auth_login_url = "https://canvas.example.edu/api/lti/authorize_redirect".into();
        let creq = LoginRequest::from_params(vec![
            ("iss", "https://canvas.example.edu"),
            ("login_hint", "7"),
            ("target_link_uri", "https://viva.example.edu/lti/launch"),
        ])
        .expect("req");
        let other = begin_login(&creq, &canvas, &tool, &store, 10).expect("canvas login");
        let big = "x".repeat(MAX_PARAM - 1);
        let bigger = "y".repeat(3000);
        let forged = LoginRequest::from_params(vec![
            ("iss", "https://moodle.example.edu"),
            ("login_hint", big.as_str()),
            ("target_link_uri", "https://viva.example.edu/lti/launch"),
            ("lti_message_hint", bigger.as_str()),
        ])
        .expect("forged");
        let huge = LoginRequest::from_params(vec![
            ("iss", "https://moodle.example.edu"),
            ("login_hint", big.as_str()),
            ("target_link_uri", "https://viva.example.edu/lti/launch"),
            ("lti_message_hint", big.as_str()),
        ])
        .expect("huge");
        let mut refused = 0;
        for i in 0..100_000u64 {
            let req = if i % 2 == 0 { &forged } else { &huge };
            if begin_login(req, &registration(), &tool, &store, 10 + i / 1000).is_err() {
                refused += 1;
            }
            let (n, bytes) = store.usage();
            assert!(
                n <= limits.max_states && bytes <= limits.max_bytes,
                "{n} states, {bytes} bytes"
            );
        }
        assert_eq!(refused, 50_000, "states over the per-state cap are refused");
        assert!(
            store.peek(&other.state).is_some(),
            "another platform's login survives"
        );
        let real = LoginRequest::from_params(params(&[])).expect("req");
        let s = begin_login(&real, &registration(), &tool, &store, 200).expect("real login");
        let got = check_binding(&store, &s.state, Some(&s.binding), 201).expect("bound");
        assert_eq!(got.request, real);
    }
}
