//! The independent LTI 1.3 platform the LTI and lab tests run against
//! (`tests/lti-platform/lti_platform.py`, PyPI lti1p3platform + PyJWT).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::process::{Background, STARTUP};

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
    _process: Background,
}

impl Platform {
    /// Starts the harness with `python` and waits (at most
    /// [`STARTUP`]) for its hello line, `{"base": …}` on stdout.
    pub fn start(python: &Path) -> Platform {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lti-platform/lti_platform.py");
        let (process, base) =
            Background::start(Command::new(python).arg(&script), STARTUP, |line| {
                let hello: Value = serde_json::from_str(line).ok()?;
                hello["base"].as_str().map(str::to_owned)
            })
            .unwrap_or_else(|e| panic!("the LTI platform harness did not start: {e}"));
        Platform {
            base,
            _process: process,
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
