//! LTI Dynamic Registration (Moodle 4.x "add tool by URL", Canvas
//! `/api/lti/registrations`) and the Canvas developer-key JSON configuration.
//!
//! The platform opens the tool's registration URL with
//! `openid_configuration` (a URL) and usually a `registration_token`. The tool
//! fetches the configuration (SSRF-checked), checks that the issuer lives on
//! the configuration URL's host, posts its own configuration to the
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
pub fn parse_configuration(
    config_url: &str,
    v: &Value,
    http: &HttpClient,
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
    // The issuer must live where the configuration came from: a configuration
    // URL on one host cannot speak for another platform's issuer.
    if host_of(&issuer).is_none() || host_of(&issuer) != host_of(config_url) {
        return Err(bad(format!(
            "the issuer {issuer:?} is not on the configuration URL's host"
        )));
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
                    "placements": [
                        "ContentArea",
                        "assignment_selection",
                        "link_selection",
                        "homework_submission"
                    ],
                    "supported_types": ["ltiResourceLink"],
                }
            ],
        },
    })
}

/// Fetches the platform's configuration, registers, and returns the new
/// registration (its deployment included when the platform names one).
pub async fn register(
    http: &HttpClient,
    openid_configuration: &str,
    registration_token: Option<&str>,
    tool: &ToolUrls,
    desc: &ToolDescription,
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
    let cfg = parse_configuration(openid_configuration, &resp.json::<Value>()?, http)?;
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
                    placement("homework_submission", "LtiDeepLinkingRequest"),
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
        let c = parse_configuration(url, &config("https://moodle.example.edu"), &http).expect("ok");
        assert_eq!(c.product_family_code.as_deref(), Some("moodle"));
        let e = parse_configuration(url, &config("https://canvas.instructure.com"), &http)
            .expect_err("host mismatch");
        assert_eq!(e.code(), "registration_failed");
        let mut private = config("https://moodle.example.edu");
        private["jwks_uri"] = json!("https://169.254.169.254/keys");
        let e = parse_configuration(url, &private, &http).expect_err("ssrf");
        assert_eq!(e.code(), "url_refused");
        let mut hs = config("https://moodle.example.edu");
        hs["id_token_signing_alg_values_supported"] = json!(["HS256"]);
        assert!(parse_configuration(url, &hs, &http).is_err());
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
            placements
                .iter()
                .any(|p| p["placement"] == "homework_submission")
        );
        assert!(
            placements
                .iter()
                .any(|p| p["placement"] == "assignment_selection")
        );
    }
}
