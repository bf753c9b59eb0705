//! LTI Dynamic Registration (Moodle 4.x "add tool by URL", Canvas
//! `/api/lti/registrations`) and the Canvas developer-key JSON configuration.
//!
//! The platform opens the tool's registration URL with
//! `openid_configuration` (a URL) and usually a `registration_token`. The tool
//! fetches the configuration (SSRF-checked), checks that the issuer lives on
//! the configuration URL's host — or, when the administrator who allowed the
//! registration named the issuer (hosted Canvas serves its configuration from
//! the school's domain with the shared issuer `https://canvas.instructure.com`),
//! that it is exactly that issuer — posts its own configuration to the
//! registration endpoint with the token, and turns the answer into a
//! [`Registration`]. The registration token is never logged or stored.

use serde_json::{Value, json};
use url::Url;

use crate::error::{LtiError, Result};
use crate::http::{Body, HttpClient, redact_url};
use crate::registration::{Registration, ToolUrls};
use crate::services::scopes;

/// What the tool tells platforms about itself.
#[derive(Debug, Clone)]
pub struct ToolDescription {
    pub name: String,
    pub description: String,
}

impl Default for ToolDescription {
    fn default() -> Self {
        ToolDescription {
            name: "Viva".into(),
            description: "Spoken and video assignments, transcribed and evaluated against your \
                          rubric by two models, graded with your review."
                .into(),
        }
    }
}

/// The platform's openid configuration, as far as registration needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformConfiguration {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub registration_endpoint: String,
    pub authorization_server: Option<String>,
    pub product_family_code: Option<String>,
    pub raw: Value,
}

fn host_of(url: &str) -> Option<String> {
    Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.to_ascii_lowercase()))
}

/// Parses and checks an openid configuration fetched from `config_url`.
///
/// `expected_issuer` is the issuer a tool administrator named when allowing
/// this registration: the configuration's issuer must then be exactly that
/// (and may live on another host); without it, the issuer must live on the
/// configuration URL's host.
pub fn parse_configuration(
    config_url: &str,
    v: &Value,
    http: &HttpClient,
    expected_issuer: Option<&str>,
) -> Result<PlatformConfiguration> {
    let bad = |m: String| LtiError::Registration(m);
    let get = |name: &str| -> Result<String> {
        v.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("the platform configuration has no {name}")))
    };
    let issuer = get("issuer")?;
    http.policy().check(&issuer).map_err(|e| {
        bad(format!(
            "the issuer {issuer:?} is not an acceptable URL: {e}"
        ))
    })?;
    match expected_issuer {
        // An administrator named this issuer: exactly it, from any host.
        Some(want) if want != issuer => {
            return Err(bad(format!(
                "the issuer {issuer:?} is not the one the administrator allowed ({want:?})"
            )));
        }
        Some(_) => {}
        // Otherwise the issuer must live where the configuration came from: a
        // configuration URL on one host cannot speak for another platform's issuer.
        None if host_of(&issuer).is_none() || host_of(&issuer) != host_of(config_url) => {
            return Err(bad(format!(
                "the issuer {issuer:?} is not on the configuration URL's host \
                 (a tool administrator can allow it by naming the issuer in the invitation)"
            )));
        }
        None => {}
    }
    let cfg = PlatformConfiguration {
        authorization_endpoint: get("authorization_endpoint")?,
        token_endpoint: get("token_endpoint")?,
        jwks_uri: get("jwks_uri")?,
        registration_endpoint: get("registration_endpoint")?,
        authorization_server: v
            .get("authorization_server")
            .and_then(Value::as_str)
            .map(str::to_owned),
        product_family_code: v
            .get("https://purl.imsglobal.org/spec/lti-platform-configuration")
            .and_then(|p| p.get("product_family_code"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        issuer,
        raw: v.clone(),
    };
    for url in [
        &cfg.authorization_endpoint,
        &cfg.token_endpoint,
        &cfg.jwks_uri,
        &cfg.registration_endpoint,
    ] {
        http.policy().check(url)?;
    }
    if let Some(algs) = v
        .get("id_token_signing_alg_values_supported")
        .and_then(Value::as_array)
        && !algs.iter().any(|a| a.as_str() == Some("RS256"))
    {
        return Err(bad("the platform does not sign with RS256".into()));
    }
    Ok(cfg)
}

/// The tool configuration posted to the registration endpoint.
pub fn tool_configuration(tool: &ToolUrls, desc: &ToolDescription) -> Value {
    let launch = tool.launch();
    json!({
        "application_type": "web",
        "response_types": ["id_token"],
        "grant_types": ["implicit", "client_credentials"],
        "initiate_login_uri": tool.login(),
        "redirect_uris": [launch],
        "client_name": desc.name,
        "jwks_uri": tool.jwks(),
        "token_endpoint_auth_method": "private_key_jwt",
        "scope": scopes::ALL.join(" "),
        "https://purl.imsglobal.org/spec/lti-tool-configuration": {
            "domain": tool.host(),
            "description": desc.description,
            "target_link_uri": launch,
            "claims": ["iss", "sub", "name", "given_name", "family_name", "email"],
            "messages": [
                {
                    "type": "LtiResourceLinkRequest",
                    "target_link_uri": launch,
                    "label": desc.name,
                },
                {
                    "type": "LtiDeepLinkingRequest",
                    "target_link_uri": launch,
                    "label": desc.name,
                    // Not `homework_submission`: students submit from the
                    // Viva assignment an instructor placed, not from Canvas's
                    // submission dialog (a learner's deep-linking launch is refused).
                    "placements": [
                        "ContentArea",
                        "assignment_selection",
                        "link_selection"
                    ],
                    "supported_types": ["ltiResourceLink"],
                }
            ],
        },
    })
}

/// Fetches the platform's configuration, registers, and returns the new
/// registration (its deployment included when the platform names one).
/// `expected_issuer`: see [`parse_configuration`].
pub async fn register(
    http: &HttpClient,
    openid_configuration: &str,
    registration_token: Option<&str>,
    tool: &ToolUrls,
    desc: &ToolDescription,
    expected_issuer: Option<&str>,
) -> Result<Registration> {
    http.policy().check(openid_configuration)?;
    let resp = http
        .send(
            reqwest::Method::GET,
            openid_configuration,
            &[("accept", "application/json")],
            None,
        )
        .await?
        .success()?;
    let cfg = parse_configuration(
        openid_configuration,
        &resp.json::<Value>()?,
        http,
        expected_issuer,
    )?;
    let auth;
    let mut headers: Vec<(&str, &str)> = vec![("accept", "application/json")];
    if let Some(t) = registration_token {
        auth = format!("Bearer {t}");
        headers.push(("authorization", &auth));
    }
    let resp = http
        .send(
            reqwest::Method::POST,
            &cfg.registration_endpoint,
            &headers,
            Some(Body::Json(
                "application/json",
                tool_configuration(tool, desc),
            )),
        )
        .await?
        .success()?;
    let answer: Value = resp.json()?;
    let client_id = match answer.get("client_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(LtiError::Registration(format!(
                "the registration answer from {} has no client_id",
                redact_url(&cfg.registration_endpoint)
            )));
        }
    };
    let deployment = answer
        .get("https://purl.imsglobal.org/spec/lti-tool-configuration")
        .and_then(|c| c.get("deployment_id"))
        .and_then(|d| match d {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    let registration = Registration {
        issuer: cfg.issuer.clone(),
        client_id,
        name: cfg
            .product_family_code
            .clone()
            .unwrap_or_else(|| host_of(&cfg.issuer).unwrap_or_default()),
        auth_login_url: cfg.authorization_endpoint.clone(),
        auth_token_url: cfg.token_endpoint.clone(),
        auth_token_audience: cfg.authorization_server.clone(),
        key_set_url: cfg.jwks_uri.clone(),
        deployments: deployment.into_iter().collect(),
        algorithms: vec![],
        frame_origins: Url::parse(openid_configuration)
            .ok()
            .map(|u| vec![u.origin().ascii_serialization()])
            .unwrap_or_default(),
    };
    registration.validate(http.policy())?;
    Ok(registration)
}

/// Canvas developer-key JSON ("Enter URL" configuration method).
pub fn canvas_configuration(tool: &ToolUrls, desc: &ToolDescription) -> Value {
    let launch = tool.launch();
    let placement = |name: &str, message: &str| {
        json!({
            "placement": name,
            "message_type": message,
            "target_link_uri": launch,
            "text": desc.name,
        })
    };
    json!({
        "title": desc.name,
        "description": desc.description,
        "oidc_initiation_url": tool.login(),
        "target_link_uri": launch,
        "public_jwk_url": tool.jwks(),
        "scopes": scopes::ALL,
        "extensions": [{
            "platform": "canvas.instructure.com",
            "domain": tool.host(),
            "tool_id": "viva",
            "privacy_level": "public",
            "settings": {
                "text": desc.name,
                "placements": [
                    placement("assignment_selection", "LtiDeepLinkingRequest"),
                    placement("link_selection", "LtiDeepLinkingRequest"),
                ],
            },
        }],
        "custom_fields": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::UrlPolicy;

    fn config(issuer: &str) -> Value {
        json!({
            "issuer": issuer,
            "authorization_endpoint": "https://moodle.example.edu/mod/lti/auth.php",
            "token_endpoint": "https://moodle.example.edu/mod/lti/token.php",
            "jwks_uri": "https://moodle.example.edu/mod/lti/certs.php",
            "registration_endpoint": "https://moodle.example.edu/mod/lti/openid-registration.php",
            "id_token_signing_alg_values_supported": ["RS256"],
            "https://purl.imsglobal.org/spec/lti-platform-configuration": {"product_family_code": "moodle"}
        })
    }

    #[test]
    fn issuer_must_match_the_configuration_host() {
        let http = HttpClient::new(UrlPolicy::strict(), "test").expect("client");
        let url = "https://moodle.example.edu/mod/lti/openid-configuration.php";
        let c = parse_configuration(url, &config("https://moodle.example.edu"), &http, None)
            .expect("ok");
        assert_eq!(c.product_family_code.as_deref(), Some("moodle"));
        let canvas = config("https://canvas.instructure.com");
        let e = parse_configuration(url, &canvas, &http, None).expect_err("host mismatch");
        assert_eq!(e.code(), "registration_failed");
        // Hosted Canvas: an administrator named the shared issuer.
        let c = parse_configuration(url, &canvas, &http, Some("https://canvas.instructure.com"))
            .expect("the named issuer, from another host");
        assert_eq!(c.issuer, "https://canvas.instructure.com");
        let e = parse_configuration(url, &canvas, &http, Some("https://other.example.edu"))
            .expect_err("not the named issuer");
        assert_eq!(e.code(), "registration_failed");
        let insecure = config("http://canvas.instructure.com");
        assert!(
            parse_configuration(url, &insecure, &http, Some("http://canvas.instructure.com"))
                .is_err(),
            "an http issuer stays refused"
        );
        let mut private = config("https://moodle.example.edu");
        private["jwks_uri"] = json!("https://169.254.169.254/keys");
        let e = parse_configuration(url, &private, &http, None).expect_err("ssrf");
        assert_eq!(e.code(), "url_refused");
        let mut hs = config("https://moodle.example.edu");
        hs["id_token_signing_alg_values_supported"] = json!(["HS256"]);
        assert!(parse_configuration(url, &hs, &http, None).is_err());
    }

    #[test]
    fn tool_configuration_asks_for_both_messages_and_the_services() {
        let tool = ToolUrls::new("https://viva.example.edu").expect("tool");
        let c = tool_configuration(&tool, &ToolDescription::default());
        let msgs = &c["https://purl.imsglobal.org/spec/lti-tool-configuration"]["messages"];
        assert_eq!(msgs[0]["type"], "LtiResourceLinkRequest");
        assert_eq!(msgs[1]["type"], "LtiDeepLinkingRequest");
        assert!(c["scope"].as_str().expect("scope").contains("lti-nrps"));
        assert_eq!(
            c["initiate_login_uri"],
            "https://viva.example.edu/lti/login"
        );
        let canvas = canvas_configuration(&tool, &ToolDescription::default());
        let placements = canvas["extensions"][0]["settings"]["placements"]
            .as_array()
            .expect("placements");
        assert!(
            !placements
                .iter()
                .any(|p| p["placement"] == "homework_submission"),
            "a learner's deep-linking launch is refused: the placement is not offered"
        );
        let dl = msgs[1]["placements"].as_array().expect("placements");
        assert!(!dl.iter().any(|p| p == "homework_submission"));
        assert!(
            placements
                .iter()
                .any(|p| p["placement"] == "assignment_selection")
        );
    }
}
