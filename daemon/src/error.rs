//! The daemon's error type and its mapping to HTTP responses.
//!
//! Every client-facing error is JSON `{"error": {"code", "message"}}` with a
//! stable `code`; internals are logged, never sent (see `into_response`).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::config::ConfigError;
use crate::intake::IntakeError;
use crate::workers::WorkerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(
        "the database at {path} has schema version {found}, newer than this viva ({supported}); \
         run the newer viva release that wrote it, or restore a backup"
    )]
    SchemaTooNew {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Plugin(#[from] viva_plugins::Error),
    #[error(transparent)]
    Lti(#[from] viva_lti::LtiError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("authentication required: {0}")]
    Unauthorized(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Error {
        Error::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// HTTP status and stable code for this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::Intake(e) => (e.status(), e.code()),
            Error::Plugin(e) => crate::plugins::status_and_code(e),
            Error::Lti(e) => crate::platforms::status_and_code(e),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Error::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Config(_)
            | Error::Db(_)
            | Error::SchemaTooNew { .. }
            | Error::Worker(_)
            | Error::Io { .. }
            | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() && !matches!(self, Error::Unavailable(_)) {
            // Internals stay in the log; the client gets a request to retry.
            tracing::error!(error = %self, "request failed");
            "something went wrong on the server; try again, and tell your instructor if it keeps happening"
                .to_owned()
        } else {
            self.to_string()
        };
        let mut resp = (
            status,
            Json(serde_json::json!({ "error": { "code": code, "message": message } })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"viva\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_are_pinned() {
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::NotFound("submission"), 404, "not_found"),
            (Error::Unauthorized("x".into()), 401, "unauthorized"),
            (Error::Forbidden("x".into()), 403, "forbidden"),
            (
                Error::bad_request("invalid_rubric", "x"),
                400,
                "invalid_rubric",
            ),
            (Error::Unavailable("x".into()), 503, "unavailable"),
            (Error::Internal("secret detail".into()), 500, "internal"),
            (Error::Intake(IntakeError::Empty), 400, "empty_upload"),
            (
                Error::Plugin(viva_plugins::Error::NotAComponent("x".into())),
                400,
                "not_a_component",
            ),
            (
                Error::Plugin(viva_plugins::Error::TooLarge { size: 2, limit: 1 }),
                413,
                "plugin_too_large",
            ),
            (
                Error::Lti(viva_lti::LtiError::BadSignature),
                401,
                "bad_signature",
            ),
            (
                Error::Lti(viva_lti::LtiError::MissingParam("iss")),
                400,
                "missing_param",
            ),
        ];
        for (e, status, code) in cases {
            let (s, c) = e.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code));
        }
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
}
