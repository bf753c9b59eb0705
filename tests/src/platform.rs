//! The independent LTI 1.3 platform the LTI tests and `viva-lab` run against
//! (`tests/lti-platform/lti_platform.py`, PyPI lti1p3platform + PyJWT), and
//! what a browser does with the pages of a launch (the auto-submitted form,
//! the JSON a Viva page hands its script). One copy for both.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::anyhow;
use serde_json::Value;

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
