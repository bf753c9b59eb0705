//! Errors as HTTP responses: JSON `{"error": {"code", "message"}}` with a
//! stable `code`. Internals are logged, never sent.
//!
//! Every variant of every error enum mapped here is named in an exhaustive
//! `match` (no `_ =>`), so a new variant does not compile until someone
//! decides its status; the tests below pin each variant's status and code.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use viva_lti::LtiError;

use crate::error::Error;
use crate::intake::IntakeError;

/// HTTP status and stable code of an error.
pub(crate) fn status_and_code(e: &Error) -> (StatusCode, &'static str) {
    match e {
        Error::Intake(e) => (intake_status(e), e.code()),
        Error::Plugin(e) => plugin_status_and_code(e),
        Error::Lti(e) => (lti_status(e), e.code()),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        Error::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
        Error::Conflict { code, .. } => (StatusCode::CONFLICT, code),
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Error::TooManyRequests { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
        Error::Config(_)
        | Error::Db(_)
        | Error::SchemaTooNew { .. }
        | Error::Worker(_)
        | Error::Io { .. }
        | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

fn intake_status(e: &IntakeError) -> StatusCode {
    match e {
        IntakeError::Empty | IntakeError::Interrupted(_) => StatusCode::BAD_REQUEST,
        IntakeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        IntakeError::Stalled { .. } => StatusCode::REQUEST_TIMEOUT,
        IntakeError::NotMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        IntakeError::NoAudio
        | IntakeError::Silent { .. }
        | IntakeError::TooLong { .. }
        | IntakeError::Undecodable { .. }
        | IntakeError::Timeout { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        IntakeError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        IntakeError::TooManyUploads { .. }
        | IntakeError::IntakeBusy { .. }
        | IntakeError::DailyQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
        IntakeError::ToolMissing(_) | IntakeError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn plugin_status_and_code(e: &viva_plugins::Error) -> (StatusCode, &'static str) {
    use viva_plugins::Error as E;
    match e {
        E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "plugin_too_large"),
        E::NotAComponent(_) => (StatusCode::BAD_REQUEST, "not_a_component"),
        E::UnsupportedVersion { .. } => (StatusCode::BAD_REQUEST, "unsupported_plugin_version"),
        E::WrongWorld(_) => (StatusCode::BAD_REQUEST, "not_a_rubric_plugin"),
        E::UnknownImport { .. } => (StatusCode::BAD_REQUEST, "plugin_import_denied"),
        E::Compile(_) | E::CompileTimeout(_) | E::CompileMemory { .. } => {
            (StatusCode::BAD_REQUEST, "plugin_compile_failed")
        }
        E::InvalidInfo(_) => (StatusCode::BAD_REQUEST, "invalid_plugin_info"),
        E::InvalidConfig { .. } => (StatusCode::BAD_REQUEST, "invalid_plugin_config"),
        E::InputTooLarge { .. } | E::Call { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "plugin_failed")
        }
        E::Io { .. } | E::Engine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// The status of an LTI rejection: a bad request from the browser or
/// platform, an authentication failure, or a failure of the platform or of
/// this tool.
pub(crate) fn lti_status(e: &LtiError) -> StatusCode {
    match e {
        LtiError::MissingParam(_)
        | LtiError::InvalidParam { .. }
        | LtiError::AmbiguousIssuer(_)
        | LtiError::ForeignTargetLink(_)
        | LtiError::MalformedToken(_)
        | LtiError::MissingClaim(_)
        | LtiError::InvalidClaim { .. }
        | LtiError::UnsupportedVersion(_)
        | LtiError::UnsupportedMessageType(_)
        | LtiError::UnknownDeployment(_)
        | LtiError::TargetLinkMismatch { .. }
        | LtiError::UrlRefused { .. } => StatusCode::BAD_REQUEST,
        LtiError::UnknownRegistration { .. } => StatusCode::NOT_FOUND,
        LtiError::UnknownState
        | LtiError::StateExpired
        | LtiError::StateNotBound
        | LtiError::NonceMismatch
        | LtiError::BadSignature
        | LtiError::UnknownKid { .. }
        | LtiError::WeakKey { .. }
        | LtiError::DisallowedAlgorithm(_)
        | LtiError::MissingKid
        | LtiError::IssuerMismatch { .. }
        | LtiError::AudienceMismatch
        | LtiError::AzpMismatch
        | LtiError::Expired
        | LtiError::NotYetValid
        | LtiError::TooOld => StatusCode::UNAUTHORIZED,
        LtiError::Http { .. }
        | LtiError::Platform { .. }
        | LtiError::BadResponse { .. }
        | LtiError::Registration(_) => StatusCode::BAD_GATEWAY,
        LtiError::Keys(_) | LtiError::Io { .. } | LtiError::Signing(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// What a client is told: the error's own words, or for server faults
/// (but "unavailable", which says when to come back) a request to retry,
/// with the detail in the log only.
pub(crate) fn client_message(e: &Error, status: StatusCode) -> String {
    if status.is_server_error() && !matches!(e, Error::Unavailable(_)) {
        tracing::error!(error = %e, "request failed");
        "something went wrong on the server; try again, and tell your instructor if it keeps happening"
            .to_owned()
    } else {
        e.to_string()
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = status_and_code(&self);
        let message = client_message(&self, status);
        let mut resp = (
            status,
            Json(serde_json::json!({ "error": { "code": code, "message": message } })),
        )
            .into_response();
        let retry_after = match &self {
            Error::Intake(e) => e.retry_after_secs(),
            Error::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"viva\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;
    use crate::workers::WorkerError;

    fn io() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    // One witness per enum: an exhaustive match (no `_ =>`) numbering the
    // variants. A new variant stops these compiling until it is added here,
    // to the samples and to the pinned table.

    fn error_variant(e: &Error) -> usize {
        match e {
            Error::Config(_) => 0,
            Error::Db(_) => 1,
            Error::SchemaTooNew { .. } => 2,
            Error::Intake(_) => 3,
            Error::Worker(_) => 4,
            Error::Plugin(_) => 5,
            Error::Lti(_) => 6,
            Error::Io { .. } => 7,
            Error::NotFound(_) => 8,
            Error::Unauthorized(_) => 9,
            Error::Forbidden(_) => 10,
            Error::BadRequest { .. } => 11,
            Error::Conflict { .. } => 12,
            Error::Unavailable(_) => 13,
            Error::Internal(_) => 14,
            Error::TooManyRequests { .. } => 15,
        }
    }
    const ERROR_VARIANTS: usize = 16;

    fn intake_variant(e: &IntakeError) -> usize {
        match e {
            IntakeError::Empty => 0,
            IntakeError::TooLarge { .. } => 1,
            IntakeError::NotMedia => 2,
            IntakeError::NoAudio => 3,
            IntakeError::Silent { .. } => 4,
            IntakeError::TooLong { .. } => 5,
            IntakeError::Undecodable { .. } => 6,
            IntakeError::Timeout { .. } => 7,
            IntakeError::DiskFull { .. } => 8,
            IntakeError::Interrupted(_) => 9,
            IntakeError::ToolMissing(_) => 10,
            IntakeError::Io(_) => 11,
            IntakeError::TooManyUploads { .. } => 12,
            IntakeError::IntakeBusy { .. } => 13,
            IntakeError::DailyQuota { .. } => 14,
            IntakeError::Stalled { .. } => 15,
        }
    }
    const INTAKE_VARIANTS: usize = 16;

    fn plugin_variant(e: &viva_plugins::Error) -> usize {
        use viva_plugins::Error as E;
        match e {
            E::TooLarge { .. } => 0,
            E::NotAComponent(_) => 1,
            E::UnsupportedVersion { .. } => 2,
            E::WrongWorld(_) => 3,
            E::UnknownImport { .. } => 4,
            E::Compile(_) => 5,
            E::CompileTimeout(_) => 6,
            E::CompileMemory { .. } => 7,
            E::InvalidInfo(_) => 8,
            E::InvalidConfig { .. } => 9,
            E::InputTooLarge { .. } => 10,
            E::Call { .. } => 11,
            E::Io { .. } => 12,
            E::Engine(_) => 13,
        }
    }
    const PLUGIN_VARIANTS: usize = 14;

    fn lti_variant(e: &LtiError) -> usize {
        match e {
            LtiError::MissingParam(_) => 0,
            LtiError::InvalidParam { .. } => 1,
            LtiError::UnknownRegistration { .. } => 2,
            LtiError::AmbiguousIssuer(_) => 3,
            LtiError::ForeignTargetLink(_) => 4,
            LtiError::UnknownState => 5,
            LtiError::StateExpired => 6,
            LtiError::StateNotBound => 7,
            LtiError::NonceMismatch => 8,
            LtiError::MalformedToken(_) => 9,
            LtiError::DisallowedAlgorithm(_) => 10,
            LtiError::MissingKid => 11,
            LtiError::UnknownKid { .. } => 12,
            LtiError::WeakKey { .. } => 13,
            LtiError::BadSignature => 14,
            LtiError::IssuerMismatch { .. } => 15,
            LtiError::AudienceMismatch => 16,
            LtiError::AzpMismatch => 17,
            LtiError::Expired => 18,
            LtiError::NotYetValid => 19,
            LtiError::TooOld => 20,
            LtiError::MissingClaim(_) => 21,
            LtiError::InvalidClaim { .. } => 22,
            LtiError::UnsupportedVersion(_) => 23,
            LtiError::UnsupportedMessageType(_) => 24,
            LtiError::UnknownDeployment(_) => 25,
            LtiError::TargetLinkMismatch { .. } => 26,
            LtiError::UrlRefused { .. } => 27,
            LtiError::Http { .. } => 28,
            LtiError::Platform { .. } => 29,
            LtiError::BadResponse { .. } => 30,
            LtiError::Keys(_) => 31,
            LtiError::Io { .. } => 32,
            LtiError::Signing(_) => 33,
            LtiError::Registration(_) => 34,
        }
    }
    const LTI_VARIANTS: usize = 35;

    fn s(x: &str) -> String {
        x.to_owned()
    }

    /// Every variant of every enum, with its pinned status and code.
    fn pinned() -> Vec<(Error, u16, &'static str)> {
        use viva_plugins::Error as P;
        let intake = |e: IntakeError, status, code| (Error::Intake(e), status, code);
        let plugin = |e: P, status, code| (Error::Plugin(e), status, code);
        let lti = |e: LtiError, status, code| (Error::Lti(e), status, code);
        vec![
            (
                Error::Config(crate::config::ConfigError::Invalid {
                    origin: s(""),
                    message: s("x"),
                }),
                500,
                "internal",
            ),
            (Error::Db(crate::db::DbError::NoRows), 500, "internal"),
            (
                Error::SchemaTooNew {
                    path: s("viva.db"),
                    found: 99,
                    supported: 1,
                },
                500,
                "internal",
            ),
            (
                Error::Worker(WorkerError::Protocol(s("bad frame"))),
                500,
                "internal",
            ),
            (
                Error::Io {
                    context: s("x"),
                    source: io(),
                },
                500,
                "internal",
            ),
            (Error::NotFound("submission"), 404, "not_found"),
            (Error::Unauthorized(s("x")), 401, "unauthorized"),
            (Error::Forbidden(s("x")), 403, "forbidden"),
            (
                Error::bad_request("invalid_rubric", "x"),
                400,
                "invalid_rubric",
            ),
            (
                Error::Conflict {
                    code: "not_failed",
                    message: s("x"),
                },
                409,
                "not_failed",
            ),
            (Error::Unavailable(s("x")), 503, "unavailable"),
            (
                Error::TooManyRequests {
                    code: "rate_limited",
                    message: s("x"),
                    retry_after_secs: 1,
                },
                429,
                "rate_limited",
            ),
            (Error::Internal(s("secret detail")), 500, "internal"),
            // Intake.
            intake(IntakeError::Empty, 400, "empty_upload"),
            intake(IntakeError::TooLarge { limit: 1 }, 413, "too_large"),
            intake(IntakeError::NotMedia, 415, "not_media"),
            intake(IntakeError::NoAudio, 422, "no_audio"),
            intake(
                IntakeError::Silent {
                    db_below_full_scale: 80.0,
                },
                422,
                "no_speech",
            ),
            intake(
                IntakeError::TooLong {
                    seconds: 9.0,
                    limit_seconds: 1.0,
                },
                422,
                "too_long",
            ),
            intake(
                IntakeError::Undecodable { detail: s("x") },
                422,
                "undecodable",
            ),
            intake(
                IntakeError::Timeout { seconds: 1 },
                422,
                "processing_timeout",
            ),
            intake(
                IntakeError::DiskFull { free_bytes: 0 },
                507,
                "insufficient_storage",
            ),
            intake(
                IntakeError::Interrupted(s("reset")),
                400,
                "upload_interrupted",
            ),
            intake(IntakeError::Stalled { seconds: 60 }, 408, "upload_stalled"),
            intake(
                IntakeError::ToolMissing(s("ffmpeg")),
                500,
                "media_tools_missing",
            ),
            intake(IntakeError::Io(io()), 500, "internal"),
            intake(
                IntakeError::TooManyUploads {
                    limit: 2,
                    retry_after_secs: 10,
                },
                429,
                "too_many_uploads",
            ),
            intake(
                IntakeError::IntakeBusy {
                    retry_after_secs: 5,
                },
                429,
                "intake_busy",
            ),
            intake(
                IntakeError::DailyQuota {
                    used_mib: 1,
                    limit_mib: 1,
                    retry_after_secs: 60,
                },
                429,
                "daily_quota",
            ),
            // Plugins.
            plugin(P::TooLarge { size: 2, limit: 1 }, 413, "plugin_too_large"),
            plugin(P::NotAComponent(s("x")), 400, "not_a_component"),
            plugin(
                P::UnsupportedVersion { found: s("x") },
                400,
                "unsupported_plugin_version",
            ),
            plugin(P::WrongWorld(s("x")), 400, "not_a_rubric_plugin"),
            plugin(
                P::UnknownImport { name: s("x") },
                400,
                "plugin_import_denied",
            ),
            plugin(P::Compile(s("x")), 400, "plugin_compile_failed"),
            plugin(
                P::CompileTimeout(Duration::from_secs(1)),
                400,
                "plugin_compile_failed",
            ),
            plugin(P::CompileMemory { limit: 1 }, 400, "plugin_compile_failed"),
            plugin(P::InvalidInfo(s("x")), 400, "invalid_plugin_info"),
            plugin(
                P::InvalidConfig {
                    plugin: s("p"),
                    message: s("x"),
                },
                400,
                "invalid_plugin_config",
            ),
            plugin(P::InputTooLarge { size: 2, limit: 1 }, 422, "plugin_failed"),
            plugin(
                P::Call {
                    plugin: s("p"),
                    failure: viva_plugins::Failure::StackOverflow,
                    log: Box::default(),
                    usage: viva_plugins::Usage::default(),
                },
                422,
                "plugin_failed",
            ),
            plugin(
                P::Io {
                    context: s("x"),
                    source: io(),
                },
                500,
                "internal",
            ),
            plugin(P::Engine(s("x")), 500, "internal"),
            // LTI.
            lti(LtiError::MissingParam("iss"), 400, "missing_param"),
            lti(
                LtiError::InvalidParam {
                    name: "x",
                    reason: s("x"),
                },
                400,
                "invalid_param",
            ),
            lti(
                LtiError::UnknownRegistration {
                    issuer: s("i"),
                    client_id: None,
                },
                404,
                "unknown_registration",
            ),
            lti(LtiError::AmbiguousIssuer(s("i")), 400, "ambiguous_issuer"),
            lti(
                LtiError::ForeignTargetLink(s("u")),
                400,
                "foreign_target_link",
            ),
            lti(LtiError::UnknownState, 401, "unknown_state"),
            lti(LtiError::StateExpired, 401, "state_expired"),
            lti(LtiError::StateNotBound, 401, "state_not_bound"),
            lti(LtiError::NonceMismatch, 401, "nonce_mismatch"),
            lti(LtiError::MalformedToken(s("x")), 400, "malformed_token"),
            lti(
                LtiError::DisallowedAlgorithm(s("HS256")),
                401,
                "disallowed_algorithm",
            ),
            lti(LtiError::MissingKid, 401, "missing_kid"),
            lti(LtiError::UnknownKid { kid: s("k") }, 401, "unknown_kid"),
            lti(
                LtiError::WeakKey {
                    kid: s("k"),
                    bits: 512,
                },
                401,
                "weak_key",
            ),
            lti(LtiError::BadSignature, 401, "bad_signature"),
            lti(
                LtiError::IssuerMismatch {
                    expected: s("a"),
                    found: s("b"),
                },
                401,
                "issuer_mismatch",
            ),
            lti(LtiError::AudienceMismatch, 401, "audience_mismatch"),
            lti(LtiError::AzpMismatch, 401, "azp_mismatch"),
            lti(LtiError::Expired, 401, "token_expired"),
            lti(LtiError::NotYetValid, 401, "token_not_yet_valid"),
            lti(LtiError::TooOld, 401, "token_too_old"),
            lti(LtiError::MissingClaim("sub"), 400, "missing_claim"),
            lti(
                LtiError::InvalidClaim {
                    claim: "sub",
                    reason: s("x"),
                },
                400,
                "invalid_claim",
            ),
            lti(
                LtiError::UnsupportedVersion(s("1.1")),
                400,
                "unsupported_version",
            ),
            lti(
                LtiError::UnsupportedMessageType(s("x")),
                400,
                "unsupported_message_type",
            ),
            lti(
                LtiError::UnknownDeployment(s("d")),
                400,
                "unknown_deployment",
            ),
            lti(
                LtiError::TargetLinkMismatch {
                    expected: s("a"),
                    found: s("b"),
                },
                400,
                "target_link_mismatch",
            ),
            lti(
                LtiError::UrlRefused {
                    url: s("u"),
                    reason: s("x"),
                },
                400,
                "url_refused",
            ),
            lti(
                LtiError::Http {
                    url: s("u"),
                    reason: s("x"),
                },
                502,
                "platform_unreachable",
            ),
            lti(
                LtiError::Platform {
                    url: s("u"),
                    status: 500,
                    body: s("x"),
                },
                502,
                "platform_error",
            ),
            lti(
                LtiError::BadResponse {
                    url: s("u"),
                    reason: s("x"),
                },
                502,
                "platform_bad_response",
            ),
            lti(LtiError::Keys(s("x")), 500, "tool_keys"),
            lti(
                LtiError::Io {
                    context: s("x"),
                    source: io(),
                },
                500,
                "io",
            ),
            lti(LtiError::Signing(s("x")), 500, "signing"),
            lti(LtiError::Registration(s("x")), 502, "registration_failed"),
        ]
    }

    #[test]
    fn statuses_and_codes_are_pinned() {
        let cases = pinned();
        let (mut errors, mut intake, mut plugins, mut lti) = (
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
        );
        for (e, status, code) in &cases {
            let (s, c) = status_and_code(e);
            assert_eq!((s.as_u16(), c), (*status, *code), "{e:?}");
            errors.insert(error_variant(e));
            match e {
                Error::Intake(i) => {
                    intake.insert(intake_variant(i));
                }
                Error::Plugin(p) => {
                    plugins.insert(plugin_variant(p));
                }
                Error::Lti(l) => {
                    lti.insert(lti_variant(l));
                }
                _ => {}
            }
        }
        assert_eq!(
            errors.len(),
            ERROR_VARIANTS,
            "a daemon error variant has no case"
        );
        assert_eq!(
            intake.len(),
            INTAKE_VARIANTS,
            "an intake error variant has no case"
        );
        assert_eq!(
            plugins.len(),
            PLUGIN_VARIANTS,
            "a plugin error variant has no case"
        );
        assert_eq!(lti.len(), LTI_VARIANTS, "an LTI error variant has no case");
    }

    #[tokio::test]
    async fn internal_details_are_not_sent_to_clients() {
        let resp = Error::Internal("db password is hunter2".into()).into_response();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("hunter2"));
        assert!(text.contains("\"internal\""));
    }

    #[test]
    fn lti_errors_map_to_statuses() {
        assert_eq!(
            (
                lti_status(&LtiError::BadSignature),
                LtiError::BadSignature.code()
            ),
            (StatusCode::UNAUTHORIZED, "bad_signature")
        );
        assert_eq!(
            lti_status(&LtiError::MissingParam("iss")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            lti_status(&LtiError::Platform {
                url: String::new(),
                status: 500,
                body: String::new()
            }),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn plugin_errors_map_to_stable_codes() {
        use viva_plugins::Error as E;
        let cases = [
            (
                E::UnsupportedVersion { found: "x".into() },
                400,
                "unsupported_plugin_version",
            ),
            (
                E::UnknownImport { name: "x".into() },
                400,
                "plugin_import_denied",
            ),
            (
                E::InvalidConfig {
                    plugin: "p".into(),
                    message: "m".into(),
                },
                400,
                "invalid_plugin_config",
            ),
            (
                E::CompileTimeout(Duration::from_secs(1)),
                400,
                "plugin_compile_failed",
            ),
            (E::Engine("x".into()), 500, "internal"),
        ];
        for (e, status, code) in cases {
            let (s, c) = plugin_status_and_code(&e);
            assert_eq!((s.as_u16(), c), (status, code), "{e}");
        }
    }
}
