//! Platform registrations and the tool's own URLs.
//!
//! A registration is keyed by (issuer, client_id): every hosted Canvas shares
//! the issuer `https://canvas.instructure.com`, so the issuer alone never
//! identifies a tenant. Each registration lists the deployment ids it accepts.

use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{LtiError, Result};
use crate::http::UrlPolicy;

/// What the tool knows about one platform registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The platform's issuer (`iss`), compared exactly.
    pub issuer: String,
    /// The client id the platform assigned to this tool.
    pub client_id: String,
    /// A name for people (product family or the admin's label).
    #[serde(default)]
    pub name: String,
    /// The platform's OIDC authorization endpoint (where login redirects).
    pub auth_login_url: String,
    /// The platform's OAuth 2 token endpoint (client-credentials grant).
    pub auth_token_url: String,
    /// The `aud` of client assertions when the platform wants something other
    /// than the token URL (the openid configuration's `authorization_server`).
    #[serde(default)]
    pub auth_token_audience: Option<String>,
    /// The platform's JWKS URL; keys are looked up only here.
    pub key_set_url: String,
    /// Accepted deployment ids.
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Accepted id_token algorithms; empty means RS256 only.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Extra origins allowed to frame the tool (`frame-ancestors`), e.g. a
    /// Canvas instance's own domain.
    #[serde(default)]
    pub frame_origins: Vec<String>,
}

/// The id_token algorithms accepted when a registration names none.
pub const DEFAULT_ALGORITHMS: &[&str] = &["RS256"];
/// Algorithms a registration may name: asymmetric RSA only (no `none`, no HMAC).
pub const PERMITTED_ALGORITHMS: &[&str] = &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"];

impl Registration {
    /// Checks URLs (with `policy`), algorithms and ids.
    pub fn validate(&self, policy: UrlPolicy) -> Result<()> {
        let bad = |name: &'static str, reason: String| LtiError::InvalidParam { name, reason };
        if self.issuer.trim().is_empty() || self.issuer.len() > 512 {
            return Err(bad("issuer", "must be 1-512 characters".into()));
        }
        if self.client_id.trim().is_empty() || self.client_id.len() > 512 {
            return Err(bad("client_id", "must be 1-512 characters".into()));
        }
        for (name, url) in [
            ("auth_login_url", &self.auth_login_url),
            ("auth_token_url", &self.auth_token_url),
            ("key_set_url", &self.key_set_url),
        ] {
            policy.check(url).map_err(|e| bad(name, e.to_string()))?;
        }
        for alg in &self.algorithms {
            if !PERMITTED_ALGORITHMS.contains(&alg.as_str()) {
                return Err(bad(
                    "algorithms",
                    format!("{alg:?} is not an RSA signature algorithm"),
                ));
            }
        }
        for d in &self.deployments {
            if d.is_empty() || d.len() > 255 {
                return Err(bad("deployments", "ids must be 1-255 characters".into()));
            }
        }
        for o in &self.frame_origins {
            origin_of(o).ok_or_else(|| bad("frame_origins", format!("{o:?} is not an origin")))?;
        }
        Ok(())
    }

    /// The algorithms accepted for this platform's id_tokens.
    pub fn accepted_algorithms(&self) -> Vec<&str> {
        if self.algorithms.is_empty() {
            DEFAULT_ALGORITHMS.to_vec()
        } else {
            self.algorithms.iter().map(String::as_str).collect()
        }
    }

    pub fn has_deployment(&self, id: &str) -> bool {
        self.deployments.iter().any(|d| d == id)
    }

    /// The origin the platform's pages live on, used as the target origin of
    /// postMessage calls (client-side storage and `org.imsglobal.lti.close`).
    pub fn platform_origin(&self) -> Option<String> {
        origin_of(&self.auth_login_url)
    }

    /// Origins allowed to frame the tool for this platform: the issuer's,
    /// the login and token endpoints' (hosted Canvas: the token endpoint is
    /// on the school's own Canvas domain, where its pages frame the tool),
    /// and `frame_origins`.
    pub fn frame_ancestors(&self) -> Vec<String> {
        let mut out: Vec<String> = [&self.issuer, &self.auth_login_url, &self.auth_token_url]
            .into_iter()
            .filter_map(|u| origin_of(u))
            .collect();
        out.extend(self.frame_origins.iter().filter_map(|o| origin_of(o)));
        out.sort();
        out.dedup();
        out
    }

    /// The client assertion audience.
    pub fn token_audience(&self) -> &str {
        self.auth_token_audience
            .as_deref()
            .unwrap_or(&self.auth_token_url)
    }
}

/// `scheme://host[:port]` of a URL, if it has one.
pub fn origin_of(url: &str) -> Option<String> {
    let u = Url::parse(url).ok()?;
    match u.origin() {
        url::Origin::Tuple(..) => Some(u.origin().ascii_serialization()),
        url::Origin::Opaque(_) => None,
    }
}

/// Finds the registration for a login: by (issuer, client_id) when the
/// platform sends a client id, else the issuer's only registration.
pub fn select<'a>(
    registrations: &'a [Registration],
    issuer: &str,
    client_id: Option<&str>,
) -> Result<&'a Registration> {
    let mut matches = registrations.iter().filter(|r| r.issuer == issuer);
    match client_id {
        Some(cid) => {
            matches
                .find(|r| r.client_id == cid)
                .ok_or_else(|| LtiError::UnknownRegistration {
                    issuer: issuer.to_owned(),
                    client_id: Some(cid.to_owned()),
                })
        }
        None => {
            let first = matches
                .next()
                .ok_or_else(|| LtiError::UnknownRegistration {
                    issuer: issuer.to_owned(),
                    client_id: None,
                })?;
            if matches.next().is_some() {
                return Err(LtiError::AmbiguousIssuer(issuer.to_owned()));
            }
            Ok(first)
        }
    }
}

/// The tool's public endpoints, all under one base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUrls {
    base: Url,
}

impl ToolUrls {
    /// `public_url` is how browsers and platforms reach the tool, e.g.
    /// `https://viva.example.edu` (a path prefix is kept).
    pub fn new(public_url: &str) -> Result<ToolUrls> {
        let mut base = Url::parse(public_url).map_err(|e| LtiError::InvalidParam {
            name: "public_url",
            reason: e.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(LtiError::InvalidParam {
                name: "public_url",
                reason: "must be an http(s) URL with a host".into(),
            });
        }
        base.set_query(None);
        base.set_fragment(None);
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        Ok(ToolUrls { base })
    }

    fn join(&self, path: &str) -> String {
        self.base
            .join(path)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| format!("{}{path}", self.base))
    }

    pub fn base(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }
    pub fn origin(&self) -> String {
        self.base.origin().ascii_serialization()
    }
    pub fn host(&self) -> String {
        self.base.host_str().unwrap_or_default().to_owned()
    }
    pub fn login(&self) -> String {
        self.join("lti/login")
    }
    pub fn launch(&self) -> String {
        self.join("lti/launch")
    }
    pub fn jwks(&self) -> String {
        self.join("lti/jwks.json")
    }
    pub fn register(&self) -> String {
        self.join("lti/register")
    }
    pub fn deep_link(&self) -> String {
        self.join("lti/deep-link")
    }
    pub fn canvas_config(&self) -> String {
        self.join("lti/canvas.json")
    }

    /// Whether `uri` points at this tool (same origin, under the base path):
    /// a login may only ask to land here, never elsewhere.
    pub fn owns(&self, uri: &str) -> bool {
        let Ok(u) = Url::parse(uri) else {
            return false;
        };
        u.origin() == self.base.origin()
            && u.path().starts_with(self.base.path())
            && u.username().is_empty()
            && u.password().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(issuer: &str, client: &str) -> Registration {
        Registration {
            issuer: issuer.into(),
            client_id: client.into(),
            name: String::new(),
            auth_login_url: "https://canvas.example.edu/api/lti/authorize_redirect".into(),
            auth_token_url: "https://canvas.example.edu/login/oauth2/token".into(),
            auth_token_audience: None,
            key_set_url: "https://canvas.example.edu/api/lti/security/jwks".into(),
            deployments: vec!["1:abc".into()],
            algorithms: vec![],
            frame_origins: vec![],
        }
    }

    #[test]
    fn selection_uses_issuer_and_client_id() {
        let regs = vec![
            reg("https://canvas.instructure.com", "100"),
            reg("https://canvas.instructure.com", "200"),
            reg("https://moodle.example.edu", "m1"),
        ];
        let r = select(&regs, "https://canvas.instructure.com", Some("200")).expect("found");
        assert_eq!(r.client_id, "200");
        let e = select(&regs, "https://canvas.instructure.com", None).expect_err("ambiguous");
        assert_eq!(e.code(), "ambiguous_issuer");
        assert_eq!(
            select(&regs, "https://moodle.example.edu", None)
                .expect("only one")
                .client_id,
            "m1"
        );
        let e = select(&regs, "https://canvas.instructure.com", Some("300")).expect_err("unknown");
        assert_eq!(e.code(), "unknown_registration");
        let e = select(&regs, "https://canvas.instructure.com/", Some("100")).expect_err("exact");
        assert_eq!(e.code(), "unknown_registration");
    }

    #[test]
    fn validation_refuses_hmac_and_insecure_urls() {
        let mut r = reg("https://x.example.edu", "1");
        r.validate(UrlPolicy::strict()).expect("valid");
        r.algorithms = vec!["HS256".into()];
        assert!(r.validate(UrlPolicy::strict()).is_err());
        r.algorithms = vec![];
        r.key_set_url = "http://x.example.edu/jwks".into();
        assert!(r.validate(UrlPolicy::strict()).is_err());
        assert!(
            r.validate(UrlPolicy {
                allow_insecure: true
            })
            .is_ok()
        );
    }

    #[test]
    fn tool_urls_join_and_own() {
        let t = ToolUrls::new("https://viva.example.edu/tools/viva").expect("urls");
        assert_eq!(t.login(), "https://viva.example.edu/tools/viva/lti/login");
        assert_eq!(
            t.jwks(),
            "https://viva.example.edu/tools/viva/lti/jwks.json"
        );
        assert!(t.owns("https://viva.example.edu/tools/viva/lti/launch"));
        assert!(!t.owns("https://viva.example.edu/other"));
        assert!(!t.owns("https://evil.example.com/tools/viva/lti/launch"));
        assert!(!t.owns("https://viva.example.edu.evil.com/tools/viva/"));
        assert!(!t.owns("javascript:alert(1)"));
        assert_eq!(t.origin(), "https://viva.example.edu");
    }

    #[test]
    fn frame_ancestors_are_origins() {
        let mut r = reg("https://canvas.instructure.com", "1");
        r.frame_origins = vec!["https://school.instructure.com/courses/1".into()];
        assert_eq!(
            r.frame_ancestors(),
            vec![
                "https://canvas.example.edu".to_string(),
                "https://canvas.instructure.com".to_string(),
                "https://school.instructure.com".to_string()
            ]
        );
        // Hosted Canvas registered by hand: login on sso.canvaslms.com, the
        // token endpoint on the school's domain, which frames the tool.
        let mut r = reg("https://canvas.instructure.com", "1");
        r.auth_login_url = "https://sso.canvaslms.com/api/lti/authorize_redirect".into();
        r.auth_token_url = "https://college.instructure.com/login/oauth2/token".into();
        assert!(
            r.frame_ancestors()
                .contains(&"https://college.instructure.com".to_string())
        );
        assert!(
            !r.frame_ancestors()
                .contains(&"https://other.instructure.com".to_string())
        );
    }
}
