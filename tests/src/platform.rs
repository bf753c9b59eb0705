//! The independent LTI 1.3 platform the LTI and lab tests run against
//! (`tests/lti-platform/lti_platform.py`, PyPI lti1p3platform + PyJWT).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

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
    /// Starts the harness with `python` and waits for its hello line.
    pub fn start(python: &Path) -> Platform {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lti-platform/lti_platform.py");
        let mut child = Command::new(python)
            .arg(&script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the platform harness");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("platform announces itself");
        let hello: Value = serde_json::from_str(&line).expect("platform hello JSON");
        Platform {
            base: hello["base"].as_str().expect("base").to_owned(),
            child,
        }
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
