//! id_token validation: every check of the 1EdTech security framework's
//! tool-side list, each failing with its own [`LtiError`] variant.
//!
//! Order: structure → header (alg allow-list, `kid` required, `crit`
//! refused; `jku`, `x5u`, `jwk` and `x5c` are never read) → key from the
//! registration's own key set (RSA ≥ 2048) → signature → claims (exact
//! `iss`, `aud` contains the client id, `azp`, `exp`/`iat`/`nbf` against an
//! injected clock, `nonce` of this launch's state, version 1.3.0, message
//! type, known deployment, `sub`, roles, resource link, `target_link_uri`).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LtiError, Result};
use crate::jwks::{JwksCache, PlatformKey};
use crate::login::constant_time_eq;
use crate::registration::Registration;

/// Claim names.
pub mod claims {
    pub const MESSAGE_TYPE: &str = "https://purl.imsglobal.org/spec/lti/claim/message_type";
    pub const VERSION: &str = "https://purl.imsglobal.org/spec/lti/claim/version";
    pub const DEPLOYMENT_ID: &str = "https://purl.imsglobal.org/spec/lti/claim/deployment_id";
    pub const TARGET_LINK_URI: &str = "https://purl.imsglobal.org/spec/lti/claim/target_link_uri";
    pub const RESOURCE_LINK: &str = "https://purl.imsglobal.org/spec/lti/claim/resource_link";
    pub const ROLES: &str = "https://purl.imsglobal.org/spec/lti/claim/roles";
    pub const CONTEXT: &str = "https://purl.imsglobal.org/spec/lti/claim/context";
    pub const CUSTOM: &str = "https://purl.imsglobal.org/spec/lti/claim/custom";
    pub const LAUNCH_PRESENTATION: &str =
        "https://purl.imsglobal.org/spec/lti/claim/launch_presentation";
    pub const TOOL_PLATFORM: &str = "https://purl.imsglobal.org/spec/lti/claim/tool_platform";
    pub const AGS_ENDPOINT: &str = "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint";
    pub const NRPS: &str = "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice";
    pub const DL_SETTINGS: &str =
        "https://purl.imsglobal.org/spec/lti-dl/claim/deep_linking_settings";
    pub const DL_CONTENT_ITEMS: &str = "https://purl.imsglobal.org/spec/lti-dl/claim/content_items";
    pub const DL_DATA: &str = "https://purl.imsglobal.org/spec/lti-dl/claim/data";
}

/// Seconds of clock skew tolerated on `exp`, `iat` and `nbf`.
pub const LEEWAY_SECS: u64 = 60;
/// Oldest `iat` accepted. Generous on purpose: platforms (Canvas) issue
/// tokens valid for an hour and too-tight windows break real launches; the
/// single-use state and nonce are what stop replays.
pub const MAX_TOKEN_AGE_SECS: u64 = 3600;
/// Largest id_token accepted.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// The message kinds the tool handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageType {
    LtiResourceLinkRequest,
    LtiDeepLinkingRequest,
}

/// A launch's context (course).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub id: String,
    pub title: Option<String>,
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLink {
    pub id: String,
    pub title: Option<String>,
}

/// The Assignment and Grade Services endpoint claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AgsEndpoint {
    pub scope: Vec<String>,
    pub lineitems: Option<String>,
    pub lineitem: Option<String>,
}

/// The Names and Role Provisioning Services claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NrpsEndpoint {
    pub context_memberships_url: String,
    pub service_versions: Vec<String>,
}

/// Deep Linking settings of a deep-linking request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeepLinkingSettings {
    pub deep_link_return_url: String,
    pub accept_types: Vec<String>,
    pub accept_multiple: bool,
    /// Opaque value the response must echo, as sent (usually a string;
    /// some platforms send an object).
    pub data: Option<Value>,
    pub title: Option<String>,
}

/// A validated launch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub message_type: MessageType,
    pub issuer: String,
    pub client_id: String,
    pub deployment_id: String,
    pub sub: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub roles: Vec<String>,
    pub context: Option<Context>,
    pub resource_link: Option<ResourceLink>,
    pub target_link_uri: String,
    /// Custom parameters; non-string values are kept as their JSON text.
    pub custom: BTreeMap<String, String>,
    pub ags: Option<AgsEndpoint>,
    pub nrps: Option<NrpsEndpoint>,
    pub deep_linking: Option<DeepLinkingSettings>,
    pub return_url: Option<String>,
    pub locale: Option<String>,
    pub iat: u64,
    pub exp: u64,
}

/// What a launch must match besides the registration.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// The nonce stored with the launch's state.
    pub nonce: &'a str,
    /// The `target_link_uri` of the login request, when known.
    pub target_link_uri: Option<&'a str>,
    /// Seconds since the Unix epoch.
    pub now: u64,
}

/// The header fields the validator reads.
struct JoseHeader {
    alg: String,
    kid: Option<String>,
}

fn b64_json(part: &str, what: &str) -> Result<Value> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| LtiError::MalformedToken(format!("the {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| LtiError::MalformedToken(format!("the {what} is not JSON")))
}

fn split(token: &str) -> Result<(JoseHeader, Value)> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(LtiError::MalformedToken("the token is too large".into()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    // An empty signature is left to the algorithm check ("none" is refused
    // there by name) and to signature verification.
    if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() {
        return Err(LtiError::MalformedToken(
            "a JWS must have three parts and a header and payload".into(),
        ));
    }
    let header = b64_json(parts[0], "header")?;
    let header_obj = header
        .as_object()
        .ok_or_else(|| LtiError::MalformedToken("the header is not an object".into()))?;
    if header_obj.contains_key("crit") {
        return Err(LtiError::MalformedToken(
            "critical header extensions are not supported".into(),
        ));
    }
    let alg = header_obj
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| LtiError::MalformedToken("the header has no alg".into()))?
        .to_owned();
    let kid = header_obj
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    let payload = b64_json(parts[1], "payload")?;
    if !payload.is_object() {
        return Err(LtiError::MalformedToken(
            "the payload is not an object".into(),
        ));
    }
    Ok((JoseHeader { alg, kid }, payload))
}

fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        _ => return None,
    })
}

/// Checks the header against the registration; returns the algorithm and kid.
fn check_header(token: &str, registration: &Registration) -> Result<(Algorithm, String)> {
    let (header, _) = split(token)?;
    let accepted = registration.accepted_algorithms();
    if !accepted.contains(&header.alg.as_str()) {
        return Err(LtiError::DisallowedAlgorithm(header.alg));
    }
    let alg = algorithm(&header.alg).ok_or(LtiError::DisallowedAlgorithm(header.alg))?;
    let kid = header.kid.ok_or(LtiError::MissingKid)?;
    Ok((alg, kid))
}

/// Verifies the signature with `key`; returns the payload.
fn verify_signature(token: &str, alg: Algorithm, key: &PlatformKey) -> Result<Value> {
    if let Some(pinned) = &key.alg
        && algorithm(pinned) != Some(alg)
    {
        return Err(LtiError::DisallowedAlgorithm(format!(
            "{alg:?} (the key is for {pinned})"
        )));
    }
    let mut v = Validation::new(alg);
    // Time and audience are checked below with the injected clock and
    // specific errors; jsonwebtoken checks the signature only.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key.key, &v)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => LtiError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                LtiError::DisallowedAlgorithm(format!("{alg:?}"))
            }
            _ => LtiError::MalformedToken(e.to_string()),
        })
}

/// Validates an id_token from `registration`: signature with a key from the
/// registration's key set, then every claim.
pub async fn validate_id_token(
    token: &str,
    registration: &Registration,
    jwks: &JwksCache,
    expect: Expectations<'_>,
) -> Result<Launch> {
    let (alg, kid) = check_header(token, registration)?;
    let key = jwks.key(&registration.key_set_url, &kid).await?;
    let payload = verify_signature(token, alg, &key)?;
    check_claims(&payload, registration, expect)
}

/// [`validate_id_token`] with a key set given directly (fixtures, tests).
pub fn validate_with_key_set(
    token: &str,
    registration: &Registration,
    key_set: &crate::jwks::KeySet,
    expect: Expectations<'_>,
) -> Result<Launch> {
    let (alg, kid) = check_header(token, registration)?;
    let key = key_set.key(&kid)?;
    let payload = verify_signature(token, alg, &key)?;
    check_claims(&payload, registration, expect)
}

fn str_claim<'a>(p: &'a Value, name: &'static str) -> Result<Option<&'a str>> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(LtiError::InvalidClaim {
            claim: name,
            reason: "must be a string".into(),
        }),
    }
}

fn required_str<'a>(p: &'a Value, name: &'static str) -> Result<&'a str> {
    str_claim(p, name)?
        .filter(|s| !s.is_empty())
        .ok_or(LtiError::MissingClaim(name))
}

fn time_claim(p: &Value, name: &'static str) -> Result<Option<u64>> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(LtiError::InvalidClaim {
                claim: name,
                reason: "must be a number of seconds".into(),
            }),
    }
}

fn opt_string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Checks the claims of a verified payload.
pub fn check_claims(
    p: &Value,
    registration: &Registration,
    expect: Expectations<'_>,
) -> Result<Launch> {
    // iss: exact.
    let iss = required_str(p, "iss")?;
    if iss != registration.issuer {
        return Err(LtiError::IssuerMismatch {
            expected: registration.issuer.clone(),
            found: iss.to_owned(),
        });
    }
    // aud: a string or an array containing the client id.
    let auds: Vec<&str> = match p.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        None | Some(Value::Null) => return Err(LtiError::MissingClaim("aud")),
        Some(_) => {
            return Err(LtiError::InvalidClaim {
                claim: "aud",
                reason: "must be a string or an array of strings".into(),
            });
        }
    };
    if !auds.contains(&registration.client_id.as_str()) {
        return Err(LtiError::AudienceMismatch);
    }
    // azp: required with several audiences; when present it must be us.
    match str_claim(p, "azp")? {
        Some(azp) if azp != registration.client_id => return Err(LtiError::AzpMismatch),
        None if auds.len() > 1 => return Err(LtiError::AzpMismatch),
        _ => {}
    }
    // Times.
    let now = expect.now;
    let exp = time_claim(p, "exp")?.ok_or(LtiError::MissingClaim("exp"))?;
    let iat = time_claim(p, "iat")?.ok_or(LtiError::MissingClaim("iat"))?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(LtiError::Expired);
    }
    if iat > now.saturating_add(LEEWAY_SECS) {
        return Err(LtiError::NotYetValid);
    }
    if let Some(nbf) = time_claim(p, "nbf")?
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(LtiError::NotYetValid);
    }
    if now.saturating_sub(iat) > MAX_TOKEN_AGE_SECS + LEEWAY_SECS {
        return Err(LtiError::TooOld);
    }
    // nonce: the one stored with this launch's state.
    let nonce = required_str(p, "nonce")?;
    if !constant_time_eq(nonce.as_bytes(), expect.nonce.as_bytes()) {
        return Err(LtiError::NonceMismatch);
    }
    // LTI.
    let version = str_claim(p, claims::VERSION)?.ok_or(LtiError::MissingClaim("version"))?;
    if version != "1.3.0" {
        return Err(LtiError::UnsupportedVersion(version.to_owned()));
    }
    let mt = str_claim(p, claims::MESSAGE_TYPE)?.ok_or(LtiError::MissingClaim("message_type"))?;
    let message_type = match mt {
        "LtiResourceLinkRequest" => MessageType::LtiResourceLinkRequest,
        "LtiDeepLinkingRequest" => MessageType::LtiDeepLinkingRequest,
        other => return Err(LtiError::UnsupportedMessageType(other.to_owned())),
    };
    let deployment_id = str_claim(p, claims::DEPLOYMENT_ID)?
        .filter(|d| !d.is_empty())
        .ok_or(LtiError::MissingClaim("deployment_id"))?;
    if !registration.has_deployment(deployment_id) {
        return Err(LtiError::UnknownDeployment(deployment_id.to_owned()));
    }
    let sub = required_str(p, "sub")?;
    if sub.len() > 255 {
        return Err(LtiError::InvalidClaim {
            claim: "sub",
            reason: "longer than 255 characters".into(),
        });
    }
    // Roles: required; may be empty; non-strings are ignored.
    let roles: Vec<String> = match p.get(claims::ROLES) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        None | Some(Value::Null) => return Err(LtiError::MissingClaim("roles")),
        Some(_) => {
            return Err(LtiError::InvalidClaim {
                claim: "roles",
                reason: "must be an array".into(),
            });
        }
    };
    let target_link_uri = str_claim(p, claims::TARGET_LINK_URI)?
        .filter(|t| !t.is_empty())
        .ok_or(LtiError::MissingClaim("target_link_uri"))?;
    let resource_link = match p.get(claims::RESOURCE_LINK) {
        Some(rl) if rl.is_object() => Some(ResourceLink {
            id: opt_string(rl.get("id")).ok_or(LtiError::MissingClaim("resource_link.id"))?,
            title: opt_string(rl.get("title")),
        }),
        _ => None,
    };
    let deep_linking = match p.get(claims::DL_SETTINGS) {
        Some(s) if s.is_object() => Some(DeepLinkingSettings {
            deep_link_return_url: opt_string(s.get("deep_link_return_url")).ok_or(
                LtiError::MissingClaim("deep_linking_settings.deep_link_return_url"),
            )?,
            accept_types: s
                .get("accept_types")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            accept_multiple: s
                .get("accept_multiple")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            data: s.get("data").filter(|d| !d.is_null()).cloned(),
            title: opt_string(s.get("title")),
        }),
        _ => None,
    };
    match message_type {
        MessageType::LtiResourceLinkRequest => {
            if resource_link.is_none() {
                return Err(LtiError::MissingClaim("resource_link.id"));
            }
        }
        MessageType::LtiDeepLinkingRequest => {
            let dl = deep_linking
                .as_ref()
                .ok_or(LtiError::MissingClaim("deep_linking_settings"))?;
            url::Url::parse(&dl.deep_link_return_url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or(LtiError::InvalidClaim {
                    claim: "deep_link_return_url",
                    reason: "must be an http(s) URL".into(),
                })?;
        }
    }
    // The launch must land where the login said it would.
    if let Some(expected) = expect.target_link_uri
        && expected != target_link_uri
    {
        return Err(LtiError::TargetLinkMismatch {
            expected: expected.to_owned(),
            found: target_link_uri.to_owned(),
        });
    }
    let context = match p.get(claims::CONTEXT) {
        Some(c) if c.is_object() => Some(Context {
            id: opt_string(c.get("id")).ok_or(LtiError::MissingClaim("context.id"))?,
            title: opt_string(c.get("title")),
            label: opt_string(c.get("label")),
        }),
        _ => None,
    };
    let custom = match p.get(claims::CUSTOM) {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let ags = match p.get(claims::AGS_ENDPOINT) {
        Some(a) if a.is_object() => Some(AgsEndpoint {
            scope: a
                .get("scope")
                .and_then(Value::as_array)
                .map(|s| {
                    s.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            lineitems: opt_string(a.get("lineitems")),
            lineitem: opt_string(a.get("lineitem")),
        }),
        _ => None,
    };
    let nrps = match p.get(claims::NRPS) {
        Some(n) if n.is_object() => {
            opt_string(n.get("context_memberships_url")).map(|url| NrpsEndpoint {
                context_memberships_url: url,
                service_versions: n
                    .get("service_versions")
                    .and_then(Value::as_array)
                    .map(|s| {
                        s.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }
        _ => None,
    };
    let presentation = p.get(claims::LAUNCH_PRESENTATION);
    Ok(Launch {
        message_type,
        issuer: iss.to_owned(),
        client_id: registration.client_id.clone(),
        deployment_id: deployment_id.to_owned(),
        sub: sub.to_owned(),
        name: opt_string(p.get("name")).or_else(|| {
            let given = opt_string(p.get("given_name"));
            let family = opt_string(p.get("family_name"));
            match (given, family) {
                (Some(g), Some(f)) => Some(format!("{g} {f}")),
                (g, f) => g.or(f),
            }
        }),
        email: opt_string(p.get("email")),
        roles,
        context,
        resource_link,
        target_link_uri: target_link_uri.to_owned(),
        custom,
        ags,
        nrps,
        deep_linking,
        return_url: presentation.and_then(|lp| opt_string(lp.get("return_url"))),
        locale: presentation
            .and_then(|lp| opt_string(lp.get("locale")))
            .or_else(|| opt_string(p.get("locale"))),
        iat,
        exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_errors_are_specific() {
        assert_eq!(
            split("a.b").err().map(|e| e.code()),
            Some("malformed_token")
        );
        assert_eq!(split("..").err().map(|e| e.code()), Some("malformed_token"));
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        assert!(
            split(&format!("{none}.e30.")).is_ok(),
            "an empty signature fails later, by name"
        );
        assert_eq!(
            split("!!!.e30.sig").err().map(|e| e.code()),
            Some("malformed_token")
        );
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","crit":["exp"]}"#);
        assert!(split(&format!("{h}.e30.c2ln")).is_err());
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(split(&big).is_err());
    }
}
