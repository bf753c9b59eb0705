//! The independent LTI 1.3 platform the LTI tests and `viva-lab` run against
//! (`tests/lti-platform/lti_platform.py`, PyPI lti1p3platform + PyJWT), and
//! what a browser does with the pages of a launch (the auto-submitted form,
//! the JSON a Viva page hands its script). One copy for both.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// How long the harness may take to print its hello line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

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

/// The platform harness process; killed when dropped.
pub struct Platform {
    pub base: String,
    child: Child,
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Platform {
    /// Starts the harness with `python` and waits for its hello line;
    /// panics when it cannot (tests).
    pub fn start(python: &Path) -> Platform {
        Platform::spawn(python, &script(), None).expect("start the platform harness")
    }

    /// Starts `script` with `python`, its stderr to `log` (else inherited),
    /// and waits up to [`START_TIMEOUT`] for the hello line with its base
    /// URL; the harness is killed if it does not come. Whatever it prints on
    /// stdout later is read and dropped, so it never blocks on a full pipe.
    pub fn spawn(python: &Path, script: &Path, log: Option<&Path>) -> anyhow::Result<Platform> {
        let stderr = match log {
            Some(l) => Stdio::from(
                std::fs::File::create(l).with_context(|| format!("creating {}", l.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let child = Command::new(python)
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting the LTI platform {} with {} (make the venv with scripts/lib.sh ensure_lti_platform)",
                    script.display(),
                    python.display()
                )
            })?;
        // Killed on every error from here on.
        let mut platform = Platform {
            base: String::new(),
            child,
        };
        let stdout = platform
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the platform has no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let res = r.read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let see = || {
            log.map(|l| format!(" (see {})", l.display()))
                .unwrap_or_default()
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reading the platform's hello{}: {e}", see()),
            Err(_) => bail!(
                "the platform did not announce itself within {START_TIMEOUT:?}{}",
                see()
            ),
        };
        let hello: Value = serde_json::from_str(&line)
            .with_context(|| format!("the platform did not announce itself{}: {line:?}", see()))?;
        platform.base = hello["base"]
            .as_str()
            .ok_or_else(|| anyhow!("the platform's hello has no base: {hello}"))?
            .to_owned();
        Ok(platform)
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
