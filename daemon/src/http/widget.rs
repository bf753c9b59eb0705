//! The web widget (`web-widget/`): its files are embedded in the binary and
//! served under `/widget/<version>/` (the version is a hash of their
//! contents, so they can be cached for a year); `/app` is the standalone page
//! (sandbox, demos, tests) that takes the session token from the URL
//! fragment, which browsers never send; LTI launches render the same shell
//! with the token in the page body ([`shell`]).
//!
//! Every page gets a strict Content-Security-Policy: scripts only from this
//! origin and the page's one nonce'd module, styles only from this origin,
//! media from `blob:` (recordings and fetched media) and no framing except by
//! the platforms the caller names.

use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::AppState;
use super::html::shell;
use crate::intake::IntakeLimits;

/// (file name, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        JS,
        include_bytes!("../../../web-widget/src/app.js"),
    ),
    (
        "api.js",
        JS,
        include_bytes!("../../../web-widget/src/api.js"),
    ),
    ("ui.js", JS, include_bytes!("../../../web-widget/src/ui.js")),
    (
        "strings.en.js",
        JS,
        include_bytes!("../../../web-widget/src/strings.en.js"),
    ),
    (
        "student.js",
        JS,
        include_bytes!("../../../web-widget/src/student.js"),
    ),
    (
        "recorder.js",
        JS,
        include_bytes!("../../../web-widget/src/recorder.js"),
    ),
    (
        "instructor.js",
        JS,
        include_bytes!("../../../web-widget/src/instructor.js"),
    ),
    (
        "schemaform.js",
        JS,
        include_bytes!("../../../web-widget/src/schemaform.js"),
    ),
    (
        "admin.js",
        JS,
        include_bytes!("../../../web-widget/src/admin.js"),
    ),
    (
        "calibration.js",
        JS,
        include_bytes!("../../../web-widget/src/calibration.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../web-widget/src/style.css"),
    ),
];

const JS: &str = "text/javascript; charset=utf-8";

/// File extensions intake accepts (mirrors `intake`), for the widget's check
/// before sending.
const ACCEPTED: &[&str] = &[
    "mp4", "webm", "mov", "mkv", "wav", "mp3", "m4a", "ogg", "opus", "flac",
];

/// Hash of every asset: part of their URLs, so a new build busts caches.
pub fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut h = Sha256::new();
        for (name, _, bytes) in ASSETS {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(bytes);
        }
        hex::encode(&h.finalize()[..8])
    })
}

/// Total bytes of the embedded JS and CSS.
pub fn assets() -> impl Iterator<Item = (&'static str, &'static [u8])> {
    ASSETS.iter().map(|(n, _, b)| (*n, *b))
}

pub(super) async fn asset(Path((v, file)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some((_, ct, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == file) else {
        return (StatusCode::NOT_FOUND, "no such widget file\n").into_response();
    };
    let etag = format!("\"{}\"", version());
    // A page from an older build asks for its version: give it today's files
    // but let nobody cache them under the old name.
    let cache = if v == version() {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == etag)
    {
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag),
                (header::CACHE_CONTROL, cache.to_owned()),
            ],
        )
            .into_response();
    }
    let mut resp = (StatusCode::OK, *bytes).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(e) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, e);
    }
    resp
}

/// Settings the widget needs from the daemon, merged into its page data.
pub(super) fn limits(st: &AppState) -> serde_json::Value {
    let l = IntakeLimits::from(&st.config.intake);
    serde_json::json!({
        "max_upload_bytes": l.max_upload_bytes,
        "max_duration_seconds": l.max_duration.as_secs(),
        "accepted": ACCEPTED,
    })
}

/// The standalone widget: the token comes from `#token=…` (never sent to
/// the server); `viva session` mints one.
pub(super) async fn app(State(st): State<AppState>) -> Response {
    shell(
        "Viva",
        serde_json::json!({ "standalone": true, "limits": limits(&st) }),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_and_the_version_is_stable() {
        assert!(ASSETS.iter().all(|(_, _, b)| !b.is_empty()));
        assert_eq!(version(), version());
        assert_eq!(version().len(), 16);
    }
}
