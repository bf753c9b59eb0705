//! Deep Linking 2.0 responses: an `ltiResourceLink` content item (with a
//! line item and custom parameters) signed with the tool's current key, to be
//! form-posted to the return URL from the *signed* request claim, echoing the
//! request's `data`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{LtiError, Result};
use crate::keys::ToolKeys;
use crate::launch::{DeepLinkingSettings, Launch, MessageType, claims};
use crate::login::random_token;

/// A line item to create with the link.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LineItemSpec {
    pub score_maximum: f64,
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// An `ltiResourceLink` content item.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceLinkItem {
    pub title: String,
    pub text: Option<String>,
    /// Where the link launches (the tool's launch URL).
    pub url: String,
    pub custom: BTreeMap<String, String>,
    pub line_item: Option<LineItemSpec>,
}

impl ResourceLinkItem {
    pub fn to_json(&self) -> Value {
        let mut item = json!({
            "type": "ltiResourceLink",
            "title": self.title,
            "url": self.url,
        });
        if let Some(t) = &self.text {
            item["text"] = json!(t);
        }
        if !self.custom.is_empty() {
            item["custom"] = json!(self.custom);
        }
        if let Some(li) = &self.line_item {
            item["lineItem"] = json!(li);
        }
        item
    }
}

/// The signed response and where to post it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeepLinkResponse {
    pub return_url: String,
    /// The form field `JWT`.
    pub jwt: String,
}

/// Builds and signs the response to a deep-linking `launch`.
pub fn respond(
    launch: &Launch,
    items: &[ResourceLinkItem],
    keys: &ToolKeys,
    now: u64,
) -> Result<DeepLinkResponse> {
    if launch.message_type != MessageType::LtiDeepLinkingRequest {
        return Err(LtiError::UnsupportedMessageType(
            "a deep-linking response needs a deep-linking request".into(),
        ));
    }
    let settings = launch
        .deep_linking
        .as_ref()
        .ok_or(LtiError::MissingClaim("deep_linking_settings"))?;
    respond_to(
        &launch.issuer,
        &launch.client_id,
        &launch.deployment_id,
        settings,
        items,
        keys,
        now,
    )
}

/// [`respond`] from the saved parts of a deep-linking launch.
pub fn respond_to(
    platform_issuer: &str,
    client_id: &str,
    deployment_id: &str,
    settings: &DeepLinkingSettings,
    items: &[ResourceLinkItem],
    keys: &ToolKeys,
    now: u64,
) -> Result<DeepLinkResponse> {
    if !settings.accept_types.is_empty()
        && !settings.accept_types.iter().any(|t| t == "ltiResourceLink")
        && !items.is_empty()
    {
        return Err(LtiError::InvalidClaim {
            claim: "deep_linking_settings.accept_types",
            reason: "the platform does not accept ltiResourceLink items here".into(),
        });
    }
    if items.len() > 1 && !settings.accept_multiple {
        return Err(LtiError::InvalidParam {
            name: "items",
            reason: "the platform accepts one item here".into(),
        });
    }
    let mut body = json!({
        "iss": client_id,
        "aud": [platform_issuer],
        "azp": client_id,
        "iat": now,
        "exp": now + 300,
        "nonce": random_token(16),
        claims::DEPLOYMENT_ID: deployment_id,
        claims::MESSAGE_TYPE: "LtiDeepLinkingResponse",
        claims::VERSION: "1.3.0",
        claims::DL_CONTENT_ITEMS: items.iter().map(ResourceLinkItem::to_json).collect::<Vec<_>>(),
    });
    if let Some(data) = &settings.data {
        body[claims::DL_DATA] = json!(data);
    }
    Ok(DeepLinkResponse {
        return_url: settings.deep_link_return_url.clone(),
        jwt: keys.sign(&body)?,
    })
}
