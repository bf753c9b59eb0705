//! The daemon's error type. It knows nothing of HTTP: `http::error` maps
//! every variant (and every variant of the error enums it wraps) to a status
//! and a stable code.

use crate::config::ConfigError;
use crate::intake::IntakeError;
use crate::workers::WorkerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Db(e.into())
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Db(e.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database error: {0}")]
    Db(#[from] crate::db::DbError),
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
    /// A rate limit or cap: try again after `retry_after_secs`.
    #[error("{message}")]
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    },
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
}
