//! Outbound HTTP to platforms, with SSRF protection.
//!
//! Every URL Viva fetches on a platform's say-so (key sets, token endpoints,
//! line items, membership lists, openid configurations) passes
//! [`UrlPolicy::check`]: `https` only, no credentials in the URL, and no
//! loopback, private, link-local or otherwise non-public addresses. Host names
//! are checked again after DNS resolution by the client's resolver (so a name
//! that resolves to 169.254.169.254 is refused too, and DNS rebinding cannot
//! switch addresses between the check and the connect), and every redirect is
//! checked. `allow_insecure` lifts all of this for development and tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use url::Url;

use crate::error::{LtiError, Result};

/// Which platform URLs may be contacted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Permit `http` and loopback/private addresses (development and tests only).
    pub allow_insecure: bool,
}

impl UrlPolicy {
    pub fn strict() -> UrlPolicy {
        UrlPolicy {
            allow_insecure: false,
        }
    }

    /// Parses `raw` and checks it may be contacted.
    pub fn check(&self, raw: &str) -> Result<Url> {
        let refused = |reason: &str| LtiError::UrlRefused {
            url: redact_url(raw),
            reason: reason.to_owned(),
        };
        let url = Url::parse(raw).map_err(|_| refused("not an absolute URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_insecure => {}
            "http" => return Err(refused("only https URLs are allowed")),
            _ => return Err(refused("only https URLs are allowed")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refused("URLs with credentials are not allowed"));
        }
        let host = url.host().ok_or_else(|| refused("the URL has no host"))?;
        if self.allow_insecure {
            return Ok(url);
        }
        match host {
            url::Host::Ipv4(ip) if !is_public_ip(IpAddr::V4(ip)) => {
                Err(refused("the address is not public"))
            }
            url::Host::Ipv6(ip) if !is_public_ip(IpAddr::V6(ip)) => {
                Err(refused("the address is not public"))
            }
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if d == "localhost" || d.ends_with(".localhost") || !d.contains('.') {
                    Err(refused("the host is not a public name"))
                } else {
                    Ok(url)
                }
            }
            _ => Ok(url),
        }
    }
}

/// The URL without its query and fragment, for error messages and logs
/// (registration tokens and similar secrets travel in query strings).
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut u) => {
            let had_query = u.query().is_some();
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_password(None);
            let _ = u.set_username("");
            let mut s = u.to_string();
            if had_query {
                s.push_str("?…");
            }
            s
        }
        Err(_) => raw.chars().take(64).collect(),
    }
}

/// Whether an address is on the public internet.
pub fn is_public_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let seg = v6.segments();
            // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                let v4 = Ipv4Addr::new(
                    (seg[6] >> 8) as u8,
                    seg[6] as u8,
                    (seg[7] >> 8) as u8,
                    seg[7] as u8,
                );
                return is_public_v4(v4);
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || (seg[0] & 0xffc0) == 0xfec0 // site local (deprecated)
                || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::from(1u128)) // ::1 spelled differently
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_unspecified()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
        || o[0] >= 240)
}

/// Resolves names and drops every non-public address (unless insecure).
struct SafeResolver {
    allow_insecure: bool,
}

impl reqwest::dns::Resolve for SafeResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_insecure = self.allow_insecure;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_insecure || is_public_ip(a.ip()))
                .collect();
            if addrs.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves to no public address").into();
                return Err(e);
            }
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

/// A response body read in full (bounded).
#[derive(Debug)]
pub struct HttpResponse {
    pub url: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// Fails with [`LtiError::Platform`] unless the status is 2xx.
    pub fn success(self) -> Result<HttpResponse> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(LtiError::Platform {
                url: redact_url(&self.url),
                status: self.status,
                body: snippet(&self.body),
            })
        }
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| LtiError::BadResponse {
            url: redact_url(&self.url),
            reason: format!("not the expected JSON: {e}"),
        })
    }
}

/// The first few hundred characters of a body, on one line, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if text.chars().count() > 300 {
        s.push('…');
    }
    s.trim().to_owned()
}

/// HTTP client for platform calls: SSRF-safe, bounded, with a User-Agent
/// (Canvas rejects API calls without one).
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    policy: UrlPolicy,
}

/// Largest response body read from a platform.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

impl HttpClient {
    pub fn new(policy: UrlPolicy, user_agent: &str) -> Result<HttpClient> {
        let redirect_policy = policy;
        let client = reqwest::Client::builder()
            .user_agent(user_agent)
            // A proxy from HTTP(S)_PROXY would resolve platform hosts itself,
            // past the SSRF-safe resolver below: never use one.
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .dns_resolver(Arc::new(SafeResolver {
                allow_insecure: policy.allow_insecure,
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    return attempt.error("too many redirects");
                }
                match redirect_policy.check(attempt.url().as_str()) {
                    Ok(_) => attempt.follow(),
                    Err(e) => attempt.error(e.to_string()),
                }
            }))
            .build()
            .map_err(|e| LtiError::Http {
                url: String::new(),
                reason: format!("building the HTTP client: {e}"),
            })?;
        Ok(HttpClient { client, policy })
    }

    pub fn policy(&self) -> UrlPolicy {
        self.policy
    }

    /// Sends a request to a checked URL and reads the whole body (at most
    /// [`MAX_BODY`] bytes). Non-2xx statuses are returned, not errors.
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Body>,
    ) -> Result<HttpResponse> {
        let checked = self.policy.check(url)?;
        let mut req = self.client.request(method, checked.clone());
        for (k, v) in headers {
            let value = HeaderValue::from_str(v).map_err(|_| LtiError::Http {
                url: redact_url(url),
                reason: format!("invalid {k} header value"),
            })?;
            req = req.header(*k, value);
        }
        req = match body {
            None => req,
            Some(Body::Form(pairs)) => req.form(&pairs),
            Some(Body::Json(content_type, value)) => req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(value.to_string()),
        };
        let transport = |e: reqwest::Error| LtiError::Http {
            url: redact_url(url),
            reason: describe(&e),
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let final_url = resp.url().to_string();
        let headers = resp.headers().clone();
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(LtiError::BadResponse {
                    url: redact_url(url),
                    reason: format!("the response is larger than {MAX_BODY} bytes"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(HttpResponse {
            url: final_url,
            status,
            headers,
            body: buf,
        })
    }
}

/// A request body.
pub enum Body {
    Form(Vec<(String, String)>),
    Json(&'static str, serde_json::Value),
}

/// reqwest's error with its sources, which is where the useful part is.
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    // reqwest includes the full URL (with its query) in its messages.
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), &redact_url(u.as_str()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_policy_refuses_http_private_and_credentials() {
        let p = UrlPolicy::strict();
        assert!(p.check("https://canvas.instructure.com/api/lti").is_ok());
        for bad in [
            "http://canvas.instructure.com/x",
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://192.168.0.1/x",
            "https://172.16.5.5/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[64:ff9b::a9fe:a9fe]/x",
            "https://localhost/x",
            "https://foo.localhost/x",
            "https://intranet/x",
            "https://user:pw@moodle.example.edu/x",
            "ftp://moodle.example.edu/x",
            "file:///etc/passwd",
            "not a url",
        ] {
            let e = p.check(bad).expect_err(bad);
            assert_eq!(e.code(), "url_refused", "{bad}");
        }
    }

    #[test]
    fn insecure_policy_allows_loopback_http() {
        let p = UrlPolicy {
            allow_insecure: true,
        };
        assert!(p.check("http://127.0.0.1:8080/jwks").is_ok());
        assert!(p.check("http://localhost/x").is_ok());
        assert!(p.check("ftp://localhost/x").is_err());
    }

    #[test]
    fn redaction_drops_queries_and_credentials() {
        assert_eq!(
            redact_url("https://u:p@moodle.example.edu/reg?registration_token=SECRET"),
            "https://moodle.example.edu/reg?…"
        );
        assert!(!redact_url("https://x.example/a?token=SECRET").contains("SECRET"));
    }

    #[tokio::test]
    async fn resolver_refuses_names_of_private_addresses() {
        use reqwest::dns::Resolve;
        let r = SafeResolver {
            allow_insecure: false,
        };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        assert!(r.resolve(name).await.is_err());
        let r = SafeResolver {
            allow_insecure: true,
        };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        assert!(r.resolve(name).await.is_ok());
    }
}
