//! LTI Advantage services: OAuth 2 client-credentials tokens with a JWT
//! client assertion, Assignment and Grade Services (line items, scores) and
//! Names and Role Provisioning Services (with `Link: rel="next"` paging).
//!
//! Every URL comes from a signed launch claim or the registration and is
//! checked by the client's [`UrlPolicy`](crate::http::UrlPolicy) on each call.
//! Tokens are cached per (token URL, client id, scopes) and never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use crate::error::{LtiError, Result};
use crate::http::{Body, HttpClient, HttpResponse, redact_url};
use crate::keys::ToolKeys;
use crate::login::random_token;
use crate::registration::{Registration, origin_of};

/// AGS and NRPS scopes.
pub mod scopes {
    pub const LINEITEM: &str = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem";
    pub const LINEITEM_READONLY: &str =
        "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem.readonly";
    pub const RESULT_READONLY: &str =
        "https://purl.imsglobal.org/spec/lti-ags/scope/result.readonly";
    pub const SCORE: &str = "https://purl.imsglobal.org/spec/lti-ags/scope/score";
    pub const NRPS: &str =
        "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly";
    /// Everything the tool asks for at registration.
    pub const ALL: &[&str] = &[LINEITEM, LINEITEM_READONLY, RESULT_READONLY, SCORE, NRPS];
}

const SCORE_TYPE: &str = "application/vnd.ims.lis.v1.score+json";
const LINEITEM_TYPE: &str = "application/vnd.ims.lis.v2.lineitem+json";
const LINEITEMS_TYPE: &str = "application/vnd.ims.lis.v2.lineitemcontainer+json";
const MEMBERSHIPS_TYPE: &str = "application/vnd.ims.lti-nrps.v2.membershipcontainer+json";

/// Lifetime of a client assertion (the checklist's maximum is 5 minutes).
pub const ASSERTION_TTL_SECS: u64 = 300;
/// Most NRPS pages followed.
pub const MAX_PAGES: usize = 200;

/// Appends a path segment to a URL *before* its query string:
/// `…/lineitem?type_id=7` + `scores` → `…/lineitem/scores?type_id=7`.
pub fn join_path(base: &str, segment: &str) -> Result<String> {
    let mut url = Url::parse(base).map_err(|_| LtiError::UrlRefused {
        url: redact_url(base),
        reason: "not an absolute URL".into(),
    })?;
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{path}/{}", segment.trim_start_matches('/')));
    Ok(url.to_string())
}

/// Adds query parameters, keeping the ones already there.
pub fn with_query(base: &str, pairs: &[(&str, &str)]) -> Result<String> {
    let mut url = Url::parse(base).map_err(|_| LtiError::UrlRefused {
        url: redact_url(base),
        reason: "not an absolute URL".into(),
    })?;
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    Ok(url.to_string())
}

/// RFC 3339 UTC with milliseconds, from Unix milliseconds.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// `activityProgress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivityProgress {
    Initialized,
    Started,
    InProgress,
    Submitted,
    Completed,
}

/// `gradingProgress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GradingProgress {
    FullyGraded,
    Pending,
    PendingManual,
    Failed,
    NotReady,
}

/// An AGS score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Score {
    /// The launch's `sub`.
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_given: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_maximum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When the grade reached this state; platforms ignore scores older than
    /// the newest they have, so a retried POST never regresses.
    pub timestamp: String,
    pub activity_progress: ActivityProgress,
    pub grading_progress: GradingProgress,
}

/// An AGS line item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LineItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub score_maximum: f64,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_link_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// One NRPS member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user_id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// One service request.
struct Call<'a> {
    method: reqwest::Method,
    url: &'a str,
    accept: &'a str,
    body: Option<(&'static str, Value)>,
}

struct CachedToken {
    token: String,
    expires: Instant,
}

/// Calls platform services on behalf of the tool.
pub struct ServiceClient {
    http: HttpClient,
    keys: Arc<ToolKeys>,
    /// Never locked across a request: one platform's slow token endpoint
    /// must not hold up another's passback.
    tokens: std::sync::Mutex<HashMap<(String, String, String), CachedToken>>,
}

/// The `next` target of a `Link` header.
pub fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let Ok(v) = value.to_str() else { continue };
        for part in v.split(',') {
            let mut pieces = part.split(';');
            let Some(target) = pieces.next() else {
                continue;
            };
            let target = target.trim();
            let is_next = pieces.any(|p| {
                let p = p.trim();
                p.strip_prefix("rel=")
                    .map(|r| r.trim_matches('"').split_whitespace().any(|r| r == "next"))
                    .unwrap_or(false)
            });
            if is_next && target.starts_with('<') && target.ends_with('>') {
                return Some(target[1..target.len() - 1].to_owned());
            }
        }
    }
    None
}

impl ServiceClient {
    pub fn new(http: HttpClient, keys: Arc<ToolKeys>) -> ServiceClient {
        ServiceClient {
            http,
            keys,
            tokens: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), CachedToken>> {
        // The map stays consistent if a holder panicked: use it.
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client assertion for `registration`'s token endpoint.
    pub fn client_assertion(&self, registration: &Registration, now: u64) -> Result<String> {
        self.keys.sign(&json!({
            "iss": registration.client_id,
            "sub": registration.client_id,
            "aud": registration.token_audience(),
            "iat": now,
            "exp": now + ASSERTION_TTL_SECS,
            "jti": random_token(16),
        }))
    }

    /// An access token for `scopes`, cached until shortly before it expires.
    pub async fn access_token(
        &self,
        registration: &Registration,
        scopes: &[&str],
        now: u64,
    ) -> Result<String> {
        let mut sorted: Vec<&str> = scopes.to_vec();
        sorted.sort();
        sorted.dedup();
        let scope = sorted.join(" ");
        let key = (
            registration.auth_token_url.clone(),
            registration.client_id.clone(),
            scope.clone(),
        );
        if let Some(t) = self.tokens().get(&key)
            && t.expires > Instant::now()
        {
            return Ok(t.token.clone());
        }
        let assertion = self.client_assertion(registration, now)?;
        let form = vec![
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            (
                "client_assertion_type".to_owned(),
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
            ),
            ("client_assertion".to_owned(), assertion),
            ("scope".to_owned(), scope),
        ];
        let resp = self
            .http
            .send(
                reqwest::Method::POST,
                &registration.auth_token_url,
                &[("accept", "application/json")],
                Some(Body::Form(form)),
            )
            .await?
            .success()?;
        let v: Value = resp.json()?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| LtiError::BadResponse {
                url: redact_url(&registration.auth_token_url),
                reason: "no access_token in the token response".into(),
            })?
            .to_owned();
        let expires_in = v.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
        // Renew a minute early; never cache a token for less than nothing.
        let life = Duration::from_secs(expires_in.saturating_sub(60).max(1));
        let mut cache = self.tokens();
        let now = Instant::now();
        cache.retain(|_, t| t.expires > now);
        cache.insert(
            key,
            CachedToken {
                token: token.clone(),
                expires: now + life,
            },
        );
        Ok(token)
    }

    async fn forget_token(&self, registration: &Registration) {
        self.tokens().retain(|(url, client, _), _| {
            !(url == &registration.auth_token_url && client == &registration.client_id)
        });
    }

    /// Sends an authorized request; on 401 renews the token once.
    async fn authorized(
        &self,
        registration: &Registration,
        scopes: &[&str],
        call: Call<'_>,
        now: u64,
    ) -> Result<HttpResponse> {
        let Call {
            method,
            url,
            accept,
            body,
        } = call;
        for attempt in 0..2 {
            let token = self.access_token(registration, scopes, now).await?;
            let auth = format!("Bearer {token}");
            let resp = self
                .http
                .send(
                    method.clone(),
                    url,
                    &[("authorization", &auth), ("accept", accept)],
                    body.clone().map(|(ct, v)| Body::Json(ct, v)),
                )
                .await?;
            if resp.status == 401 && attempt == 0 {
                self.forget_token(registration).await;
                continue;
            }
            return resp.success();
        }
        Err(LtiError::Platform {
            url: redact_url(url),
            status: 401,
            body: "the platform refused a fresh access token".into(),
        })
    }

    /// Posts a score to `{lineitem}/scores`.
    pub async fn publish_score(
        &self,
        registration: &Registration,
        lineitem_url: &str,
        score: &Score,
        now: u64,
    ) -> Result<()> {
        let url = join_path(lineitem_url, "scores")?;
        let body = serde_json::to_value(score).map_err(|e| LtiError::Signing(e.to_string()))?;
        self.authorized(
            registration,
            &[scopes::SCORE],
            Call {
                method: reqwest::Method::POST,
                url: &url,
                accept: "application/json",
                body: Some((SCORE_TYPE, body)),
            },
            now,
        )
        .await?;
        Ok(())
    }

    /// Finds the line item for `spec` (by resource link id and tag) in the
    /// container, or creates it.
    pub async fn find_or_create_line_item(
        &self,
        registration: &Registration,
        lineitems_url: &str,
        spec: &LineItem,
        now: u64,
    ) -> Result<LineItem> {
        let mut filters: Vec<(&str, &str)> = Vec::new();
        if let Some(rl) = &spec.resource_link_id {
            filters.push(("resource_link_id", rl));
        }
        if let Some(tag) = &spec.tag {
            filters.push(("tag", tag));
        }
        let list_url = with_query(lineitems_url, &filters)?;
        let resp = self
            .authorized(
                registration,
                &[scopes::LINEITEM],
                Call {
                    method: reqwest::Method::GET,
                    url: &list_url,
                    accept: LINEITEMS_TYPE,
                    body: None,
                },
                now,
            )
            .await?;
        let items: Vec<LineItem> = resp
            .json::<Vec<Value>>()?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        if let Some(found) = items.into_iter().find(|li| {
            li.id.is_some()
                && (spec.resource_link_id.is_none() || li.resource_link_id == spec.resource_link_id)
                && (spec.tag.is_none() || li.tag == spec.tag)
                && (spec.resource_id.is_none() || li.resource_id == spec.resource_id)
        }) {
            return Ok(found);
        }
        let body = serde_json::to_value(spec).map_err(|e| LtiError::Signing(e.to_string()))?;
        let resp = self
            .authorized(
                registration,
                &[scopes::LINEITEM],
                Call {
                    method: reqwest::Method::POST,
                    url: lineitems_url,
                    accept: LINEITEM_TYPE,
                    body: Some((LINEITEM_TYPE, body)),
                },
                now,
            )
            .await?;
        let created: LineItem = resp.json()?;
        if created.id.is_none() {
            return Err(LtiError::BadResponse {
                url: redact_url(lineitems_url),
                reason: "the created line item has no id".into(),
            });
        }
        Ok(created)
    }

    /// Every member of a context, following `Link: rel="next"`. Next pages
    /// must stay on the first page's origin (the token goes with them).
    pub async fn members(
        &self,
        registration: &Registration,
        memberships_url: &str,
        now: u64,
    ) -> Result<Vec<Member>> {
        let origin = origin_of(memberships_url);
        let mut url = memberships_url.to_owned();
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let resp = self
                .authorized(
                    registration,
                    &[scopes::NRPS],
                    Call {
                        method: reqwest::Method::GET,
                        url: &url,
                        accept: MEMBERSHIPS_TYPE,
                        body: None,
                    },
                    now,
                )
                .await?;
            let v: Value = resp.json()?;
            let members = v.get("members").and_then(Value::as_array).ok_or_else(|| {
                LtiError::BadResponse {
                    url: redact_url(&url),
                    reason: "no members array".into(),
                }
            })?;
            out.extend(
                members
                    .iter()
                    .filter_map(|m| serde_json::from_value::<Member>(m.clone()).ok()),
            );
            match next_link(&resp.headers) {
                None => return Ok(out),
                Some(next) => {
                    let next = Url::parse(&url)
                        .and_then(|base| base.join(&next))
                        .map(|u| u.to_string())
                        .map_err(|_| LtiError::BadResponse {
                            url: redact_url(&url),
                            reason: "an invalid next link".into(),
                        })?;
                    if origin_of(&next) != origin {
                        return Err(LtiError::UrlRefused {
                            url: redact_url(&next),
                            reason: "the next page is on another origin".into(),
                        });
                    }
                    url = next;
                }
            }
        }
        Err(LtiError::BadResponse {
            url: redact_url(memberships_url),
            reason: format!("more than {MAX_PAGES} pages"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_keep_query_strings() {
        assert_eq!(
            join_path(
                "https://moodle.example.edu/mod/lti/services.php/2/lineitems/5/lineitem?type_id=7",
                "scores"
            )
            .expect("join"),
            "https://moodle.example.edu/mod/lti/services.php/2/lineitems/5/lineitem/scores?type_id=7"
        );
        assert_eq!(
            join_path(
                "https://canvas.example.edu/api/lti/courses/1/line_items/9/",
                "scores"
            )
            .expect("join"),
            "https://canvas.example.edu/api/lti/courses/1/line_items/9/scores"
        );
        assert_eq!(
            with_query("https://x.example/li?type_id=7", &[("tag", "a b")]).expect("q"),
            "https://x.example/li?type_id=7&tag=a+b"
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_565_536_444_123), "2019-08-11T15:14:04.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn link_headers_give_the_next_page() {
        let mut h = reqwest::header::HeaderMap::new();
        h.append(
            reqwest::header::LINK,
            "<https://x.example/m?p=1>; rel=\"differences\", <https://x.example/m?p=2>; rel=\"next\""
                .parse()
                .expect("header"),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://x.example/m?p=2"));
        let mut h = reqwest::header::HeaderMap::new();
        h.append(
            reqwest::header::LINK,
            "<https://x.example/m>; rel=\"prev\"".parse().expect("h"),
        );
        assert_eq!(next_link(&h), None);
    }

    #[test]
    fn scores_serialise_as_ags_expects() {
        let s = Score {
            user_id: "u1".into(),
            score_given: None,
            score_maximum: None,
            comment: None,
            timestamp: rfc3339_ms(0),
            activity_progress: ActivityProgress::Submitted,
            grading_progress: GradingProgress::PendingManual,
        };
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["userId"], "u1");
        assert_eq!(v["gradingProgress"], "PendingManual");
        assert_eq!(v["activityProgress"], "Submitted");
        assert!(v.get("scoreGiven").is_none());
    }
}
