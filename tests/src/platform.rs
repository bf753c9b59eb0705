//! The independent LTI 1.3 platform the LTI tests and `viva-lab` run against
//! (`tests/lti-platform/lti_platform.py`, PyPI lti1p3platform + PyJWT), and
//! what a browser does with the pages of a launch (the auto-submitted form,
//! the JSON a Viva page hands its script). One copy for both.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail};
use serde_json::{Value, json};

use crate::process::{Background, STARTUP};

/// The harness script in this source tree. The only place its path is
/// spelled out: the tests use it, and `viva-lab` (a dev tool built from this
/// tree) takes it as the default of `--platform-script`.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lti-platform/lti_platform.py")
}

/// The Python with lti1p3platform: `$VIVA_LTI_PYTHON`, else the venv
/// scripts/test makes in `$VIVA_CACHE` (default ~/.cache/viva).
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("VIVA_LTI_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var("VIVA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/viva")
        });
    let p = cache.join("lti-venv/bin/python");
    p.exists().then_some(p)
}

/// The platform harness process; killed when dropped, its log (stderr)
/// printed when the test fails.
pub struct Platform {
    pub base: String,
    process: Background,
    log_copy: Option<PathBuf>,
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some(path) = &self.log_copy {
            let _ = std::fs::write(path, self.process.log());
        }
    }
}

impl Platform {
    /// Starts the harness with `python` and waits for its hello line;
    /// panics when it cannot (tests).
    pub fn start(python: &Path) -> Platform {
        Platform::spawn(python, &script(), None)
            .unwrap_or_else(|e| panic!("the LTI platform harness did not start: {e:#}"))
    }

    /// Starts `script` with `python` and waits (at most [`STARTUP`]) for its
    /// hello line, `{"base": …}` on stdout; on failure the harness is killed
    /// and the error carries its log. Its output goes to a log that a failing
    /// test prints; with `log`, that log is also copied there when the
    /// platform stops (`viva-lab` keeps it beside its report).
    pub fn spawn(python: &Path, script: &Path, log: Option<&Path>) -> anyhow::Result<Platform> {
        let (process, base) =
            Background::start(Command::new(python).arg(script), STARTUP, |line| {
                let hello: Value = serde_json::from_str(line).ok()?;
                hello["base"].as_str().map(str::to_owned)
            })
            .map_err(|e| {
                anyhow!(
                    "starting the LTI platform {} with {} (make the venv with scripts/lib.sh ensure_lti_platform): {e}",
                    script.display(),
                    python.display()
                )
            })?;
        Ok(Platform {
            base,
            process,
            log_copy: log.map(Path::to_path_buf),
        })
    }

    /// Starts the harness, or `None` (the test then passes with a SKIPPED
    /// line) when there is no Python with lti1p3platform, unless
    /// VIVA_REQUIRE_LTI_PLATFORM is set.
    pub fn start_or_skip() -> Option<Platform> {
        let Some(py) = python() else {
            if std::env::var("VIVA_REQUIRE_LTI_PLATFORM").is_ok() {
                panic!("no Python with lti1p3platform: run scripts/test, or set VIVA_LTI_PYTHON");
            }
            eprintln!("SKIPPED: no LTI platform harness (run scripts/test to create it)");
            return None;
        };
        Some(Platform::start(&py))
    }
}

// ---------------------------------------------------------------------------
// The browser's part of a launch.

/// HTML attribute unescaping (what the platform's and Viva's pages escape).
pub fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The login-initiation parameters of a launch the platform prepared
/// (`/control/launch`'s `params`), in order; None when it prepared none.
pub fn launch_params(prepared: &Value) -> Option<Vec<(String, String)>> {
    Some(
        prepared["params"]
            .as_object()?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
    )
}

/// The action and the named fields, in page order, of the first form in a
/// page (the platform's auto-submitted launch form).
pub fn parse_form(html: &str) -> (String, Vec<(String, String)>) {
    let action = html
        .split("action=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .map(unescape)
        .unwrap_or_default();
    let mut fields = Vec::new();
    for part in html.split("name=\"").skip(1) {
        let name = part.split('"').next().unwrap_or_default().to_owned();
        let value = part
            .split("value=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(unescape)
            .unwrap_or_default();
        fields.push((name, value));
    }
    (action, fields)
}

/// The JSON a Viva page hands its script (`<script type="application/json"
/// id="viva-data">`).
pub fn page_data(html: &str) -> Option<Value> {
    let start = html.find("id=\"viva-data\">")?;
    let rest = &html[start..];
    let json = rest.split_once('>')?.1.split("</script>").next()?;
    serde_json::from_str(json).ok()
}

/// The harness's registration token (`REGISTRATION_TOKEN` in the script).
pub const REGISTRATION_TOKEN: &str = "reg-token-3f9c2a";

/// The LTI launch dance as a browser does it, against the harness
/// (`platform`) and a Viva (`tool`: a daemon, or a load balancer in front of
/// several api nodes). `http` must not follow redirects.
pub struct Lti {
    pub http: reqwest::Client,
    pub platform: String,
    pub tool: String,
}

impl Lti {
    pub async fn post_json(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.platform))
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("platform {path}: {}", r.status());
        }
        Ok(r.json().await?)
    }

    pub async fn log(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/control/log", self.platform))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Dynamic registration through a one-time registration URL that a
    /// Viva administrator (`admin`, a `viva session --role admin` token) makes.
    pub async fn register(&self, admin: &str) -> anyhow::Result<()> {
        let invite: Value = self
            .http
            .post(format!("{}/api/v1/admin/platforms/invites", self.tool))
            .bearer_auth(admin)
            .json(&json!({}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let url = invite["url"]
            .as_str()
            .ok_or_else(|| anyhow!("the invitation has no url: {invite}"))?;
        let r = self
            .http
            .get(url)
            .query(&[
                (
                    "openid_configuration",
                    format!("{}/.well-known/openid-configuration", self.platform),
                ),
                ("registration_token", REGISTRATION_TOKEN.to_owned()),
            ])
            .send()
            .await?;
        if !r.status().is_success() {
            let code = r
                .headers()
                .get("x-viva-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            bail!("dynamic registration failed: {} {code}", r.status());
        }
        Ok(())
    }

    /// login → platform auth → launch; returns the launched page's data.
    pub async fn launch(&self, spec: Value) -> anyhow::Result<Value> {
        let prepared = self.post_json("/control/launch", spec).await?;
        let params =
            launch_params(&prepared).ok_or_else(|| anyhow!("the platform prepared no launch"))?;
        let resp = self
            .http
            .post(format!("{}/lti/login", self.tool))
            .form(&params)
            .send()
            .await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let cookie = resp
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("viva_lti_"))
            .and_then(|c| c.split(';').next())
            .map(str::to_owned);
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let auth_url = match location {
            Some(l) => l,
            None => page_data(&body)
                .and_then(|d| d["next"].as_str().map(str::to_owned))
                .ok_or_else(|| anyhow!("login answered {status} and went nowhere"))?,
        };
        let auth = self.http.get(&auth_url).send().await?;
        let auth_status = auth.status();
        let auth_body = auth.text().await?;
        if !auth_status.is_success() {
            bail!("the platform refused the auth request: {auth_body}");
        }
        let (launch_url, form) = parse_form(&auth_body);
        let mut req = self.http.post(&launch_url).form(&form);
        if let Some(c) = cookie {
            req = req.header(reqwest::header::COOKIE, c);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-viva-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("launch refused: {status} {code}");
        }
        page_data(&body).ok_or_else(|| anyhow!("the launch page carries no session"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_form_and_page_data_are_read_as_a_browser_would() {
        let html = r#"<form method="post" action="http://t/lti/launch?a=1&amp;b=2">
            <input type="hidden" name="id_token" value="x.y.z">
            <input type="hidden" name="state" value="&quot;s&#x27;&lt;&gt;">
            </form><script type="application/json" id="viva-data">{"token":"t"}</script>"#;
        let (action, fields) = parse_form(html);
        assert_eq!(action, "http://t/lti/launch?a=1&b=2");
        assert_eq!(
            fields,
            vec![
                ("id_token".to_owned(), "x.y.z".to_owned()),
                ("state".to_owned(), "\"s'<>".to_owned())
            ]
        );
        assert_eq!(page_data(html), Some(serde_json::json!({"token": "t"})));
        assert_eq!(page_data("<p>no data</p>"), None);
    }
}
