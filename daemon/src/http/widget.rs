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
        "i18n.js",
        JS,
        include_bytes!("../../../web-widget/src/i18n.js"),
    ),
    (
        "strings.en.js",
        JS,
        include_bytes!("../../../web-widget/src/strings.en.js"),
    ),
    (
        "strings.fr.js",
        JS,
        include_bytes!("../../../web-widget/src/strings.fr.js"),
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
pub(super) async fn app(State(st): State<AppState>, headers: HeaderMap) -> Response {
    shell(
        "Viva",
        serde_json::json!({ "standalone": true, "limits": limits(&st) }),
        None,
        pick_locale(None, &headers),
    )
}

/// The languages the widget's string catalogue is complete in
/// (`web-widget/src/strings.<code>.js`; a test holds every key of English
/// in each). English first: the fallback.
pub(super) const LOCALES: &[&str] = &["en", "fr"];

/// The widget's language: `preferred` (an LTI launch's
/// `launch_presentation.locale`, e.g. "fr-CA") when the widget has it, else
/// the first language of the request's `Accept-Language` (by q-value) that
/// it has; `None` when neither names one (the script then asks the
/// browser, `navigator.languages`).
pub(super) fn pick_locale(preferred: Option<&str>, headers: &HeaderMap) -> Option<&'static str> {
    let known = |tag: &str| {
        let primary = tag
            .trim()
            .split(['-', '_'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        LOCALES.iter().copied().find(|l| *l == primary)
    };
    if let Some(l) = preferred.and_then(known) {
        return Some(l);
    }
    let accept = headers.get(header::ACCEPT_LANGUAGE)?.to_str().ok()?;
    let mut ranges: Vec<(f32, usize, &str)> = accept
        .split(',')
        .enumerate()
        .filter_map(|(i, part)| {
            let mut it = part.split(';');
            let tag = it.next()?.trim();
            let q = it
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (q > 0.0 && !tag.is_empty()).then_some((q, i, tag))
        })
        .collect();
    // Highest q first; equal q in the order given.
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranges.into_iter().find_map(|(_, _, tag)| known(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locale_comes_from_the_launch_then_accept_language() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::ACCEPT_LANGUAGE,
                HeaderValue::from_str(v).expect("header"),
            );
            h
        };
        let none = HeaderMap::new();
        assert_eq!(pick_locale(Some("fr-CA"), &none), Some("fr"));
        assert_eq!(pick_locale(Some("fr_FR"), &with("en")), Some("fr"));
        // A launch locale the widget lacks falls through to the browser.
        assert_eq!(
            pick_locale(Some("de-DE"), &with("fr;q=0.5, de")),
            Some("fr")
        );
        assert_eq!(
            pick_locale(None, &with("de-DE, en-GB;q=0.8, fr;q=0.9")),
            Some("fr")
        );
        assert_eq!(pick_locale(None, &with("en-US,en;q=0.9")), Some("en"));
        assert_eq!(pick_locale(None, &with("fr;q=0, en;q=0.1")), Some("en"));
        assert_eq!(pick_locale(None, &with("de")), None);
        assert_eq!(pick_locale(None, &none), None);
    }

    /// The keys of a catalogue file: every `name:` or `'name':` that starts
    /// a line, with its nesting (`views.student`).
    fn catalogue_keys(src: &str) -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        let mut path: Vec<(usize, String)> = Vec::new();
        let body = src.split_once("export default {").map_or(src, |(_, b)| b);
        for line in body.lines() {
            let indent = line.len() - line.trim_start().len();
            let t = line.trim_start();
            let Some((key, rest)) = t.split_once(':') else {
                continue;
            };
            let key = key.trim_matches(|c| c == '\'' || c == '"');
            if key.is_empty() || !key.chars().all(|c| c.is_alphanumeric() || "_-".contains(c)) {
                continue;
            }
            path.retain(|(i, _)| *i < indent);
            let full = path
                .iter()
                .map(|(_, k)| k.as_str())
                .chain([key])
                .collect::<Vec<_>>()
                .join(".");
            let rest = rest.trim().trim_end_matches(',');
            if rest == "{" {
                path.push((indent, key.to_owned()));
            } else if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                // A one-line object: `views: { student: '…', admin: '…' }`.
                for pair in inner.split(',') {
                    if let Some((k, _)) = pair.split_once(':') {
                        keys.insert(format!("{full}.{}", k.trim().trim_matches('\'')));
                    }
                }
            }
            keys.insert(full);
        }
        keys
    }

    #[test]
    fn the_french_catalogue_has_every_key_of_the_english_one() {
        let asset = |name: &str| {
            ASSETS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, _, b)| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| panic!("{name} is not embedded"))
        };
        let en = catalogue_keys(&asset("strings.en.js"));
        assert!(en.len() > 250, "the parser lost keys: {}", en.len());
        assert!(en.contains("views.student") && en.contains("states.awaiting_review"));
        for l in LOCALES.iter().filter(|l| **l != "en") {
            let other = catalogue_keys(&asset(&format!("strings.{l}.js")));
            let missing: Vec<&String> = en.difference(&other).collect();
            assert!(
                missing.is_empty(),
                "strings.{l}.js lacks {missing:?}: add them (web-widget/README.md, \"Strings\")"
            );
            let extra: Vec<&String> = other.difference(&en).collect();
            assert!(
                extra.is_empty(),
                "strings.{l}.js has keys English lacks: {extra:?}"
            );
        }
    }

    #[test]
    fn every_asset_is_embedded_and_the_version_is_stable() {
        assert!(ASSETS.iter().all(|(_, _, b)| !b.is_empty()));
        assert_eq!(version(), version());
        assert_eq!(version().len(), 16);
    }
}
