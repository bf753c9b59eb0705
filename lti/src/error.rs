//! The crate's one error type. Every variant has a stable [`LtiError::code`]
//! so HTTP layers and tests can tell rejections apart without parsing text.
//! Messages never contain tokens, keys or registration secrets.

/// Everything that can go wrong on the tool side of LTI.
#[derive(Debug, thiserror::Error)]
pub enum LtiError {
    // ---- OIDC login initiation -------------------------------------------------
    #[error("the request is missing the `{0}` parameter")]
    MissingParam(&'static str),
    #[error("the `{name}` parameter is invalid: {reason}")]
    InvalidParam { name: &'static str, reason: String },
    #[error("no platform is registered for issuer {issuer:?} and client id {client_id:?}")]
    UnknownRegistration {
        issuer: String,
        client_id: Option<String>,
    },
    #[error(
        "issuer {0:?} has several registrations here; the platform must send client_id with the login"
    )]
    AmbiguousIssuer(String),
    #[error("target_link_uri {0:?} does not point at this tool")]
    ForeignTargetLink(String),

    // ---- state and nonce --------------------------------------------------------
    #[error("the launch state is unknown or was already used; start the launch again")]
    UnknownState,
    #[error("the launch state has expired; start the launch again")]
    StateExpired,
    #[error("this launch was not started by this browser")]
    StateNotBound,
    #[error("the id_token's nonce does not belong to this launch")]
    NonceMismatch,

    // ---- JWT structure, algorithm and key ---------------------------------------
    #[error("the token is malformed: {0}")]
    MalformedToken(String),
    #[error("signing algorithm {0:?} is not accepted for this platform")]
    DisallowedAlgorithm(String),
    #[error("the token header has no key id (kid)")]
    MissingKid,
    #[error("the platform's key set has no usable key {kid:?}")]
    UnknownKid { kid: String },
    #[error("the platform key {kid:?} is {bits}-bit RSA; at least 2048 bits are required")]
    WeakKey { kid: String, bits: usize },
    #[error("the token's signature does not verify")]
    BadSignature,

    // ---- claims -----------------------------------------------------------------
    #[error("the token's issuer {found:?} is not {expected:?}")]
    IssuerMismatch { expected: String, found: String },
    #[error("the token's audience does not contain this tool's client id")]
    AudienceMismatch,
    #[error("the token's authorized party (azp) is not this tool's client id")]
    AzpMismatch,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (issued in the future)")]
    NotYetValid,
    #[error("the token was issued too long ago")]
    TooOld,
    #[error("the token lacks the required claim {0}")]
    MissingClaim(&'static str),
    #[error("the claim {claim} is invalid: {reason}")]
    InvalidClaim { claim: &'static str, reason: String },
    #[error("LTI version {0:?} is not supported (1.3.0 is)")]
    UnsupportedVersion(String),
    #[error("LTI message type {0:?} is not supported")]
    UnsupportedMessageType(String),
    #[error("deployment {0:?} is not registered for this platform")]
    UnknownDeployment(String),
    #[error(
        "the token's target_link_uri {found:?} is not the one the login asked for ({expected:?})"
    )]
    TargetLinkMismatch { expected: String, found: String },

    // ---- outbound HTTP (JWKS, AGS, NRPS, registration) ----------------------------
    #[error("refused to contact {url}: {reason}")]
    UrlRefused { url: String, reason: String },
    #[error("request to {url} failed: {reason}")]
    Http { url: String, reason: String },
    #[error("the platform answered HTTP {status} at {url}: {body}")]
    Platform {
        url: String,
        status: u16,
        body: String,
    },
    #[error("unexpected response from {url}: {reason}")]
    BadResponse { url: String, reason: String },

    // ---- tool keys and signing ----------------------------------------------------
    #[error("tool keys: {0}")]
    Keys(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("signing failed: {0}")]
    Signing(String),

    // ---- dynamic registration -----------------------------------------------------
    #[error("dynamic registration failed: {0}")]
    Registration(String),
}

impl LtiError {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            LtiError::MissingParam(_) => "missing_param",
            LtiError::InvalidParam { .. } => "invalid_param",
            LtiError::UnknownRegistration { .. } => "unknown_registration",
            LtiError::AmbiguousIssuer(_) => "ambiguous_issuer",
            LtiError::ForeignTargetLink(_) => "foreign_target_link",
            LtiError::UnknownState => "unknown_state",
            LtiError::StateExpired => "state_expired",
            LtiError::StateNotBound => "state_not_bound",
            LtiError::NonceMismatch => "nonce_mismatch",
            LtiError::MalformedToken(_) => "malformed_token",
            LtiError::DisallowedAlgorithm(_) => "disallowed_algorithm",
            LtiError::MissingKid => "missing_kid",
            LtiError::UnknownKid { .. } => "unknown_kid",
            LtiError::WeakKey { .. } => "weak_key",
            LtiError::BadSignature => "bad_signature",
            LtiError::IssuerMismatch { .. } => "issuer_mismatch",
            LtiError::AudienceMismatch => "audience_mismatch",
            LtiError::AzpMismatch => "azp_mismatch",
            LtiError::Expired => "token_expired",
            LtiError::NotYetValid => "token_not_yet_valid",
            LtiError::TooOld => "token_too_old",
            LtiError::MissingClaim(_) => "missing_claim",
            LtiError::InvalidClaim { .. } => "invalid_claim",
            LtiError::UnsupportedVersion(_) => "unsupported_version",
            LtiError::UnsupportedMessageType(_) => "unsupported_message_type",
            LtiError::UnknownDeployment(_) => "unknown_deployment",
            LtiError::TargetLinkMismatch { .. } => "target_link_mismatch",
            LtiError::UrlRefused { .. } => "url_refused",
            LtiError::Http { .. } => "platform_unreachable",
            LtiError::Platform { .. } => "platform_error",
            LtiError::BadResponse { .. } => "platform_bad_response",
            LtiError::Keys(_) => "tool_keys",
            LtiError::Io { .. } => "io",
            LtiError::Signing(_) => "signing",
            LtiError::Registration(_) => "registration_failed",
        }
    }

    /// Whether the error is the client's (a bad or forged request) rather
    /// than the tool's or a platform's.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            LtiError::Http { .. }
                | LtiError::Platform { .. }
                | LtiError::BadResponse { .. }
                | LtiError::Keys(_)
                | LtiError::Io { .. }
                | LtiError::Signing(_)
                | LtiError::Registration(_)
        )
    }

    /// Whether retrying the same call later may succeed (network trouble,
    /// throttling, platform outages), as opposed to a refusal that will
    /// repeat (Moodle's 400 for a user who cannot be graded).
    pub fn is_transient(&self) -> bool {
        match self {
            LtiError::Http { .. } => true,
            LtiError::Platform { status, .. } => {
                matches!(*status, 401 | 408 | 425 | 429) || *status >= 500
            }
            _ => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LtiError {
        let context = context.into();
        move |source| LtiError::Io { context, source }
    }
}

pub type Result<T, E = LtiError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let all = [
            LtiError::MissingParam("iss"),
            LtiError::InvalidParam {
                name: "x",
                reason: String::new(),
            },
            LtiError::UnknownRegistration {
                issuer: String::new(),
                client_id: None,
            },
            LtiError::AmbiguousIssuer(String::new()),
            LtiError::ForeignTargetLink(String::new()),
            LtiError::UnknownState,
            LtiError::StateExpired,
            LtiError::StateNotBound,
            LtiError::NonceMismatch,
            LtiError::MalformedToken(String::new()),
            LtiError::DisallowedAlgorithm(String::new()),
            LtiError::MissingKid,
            LtiError::UnknownKid { kid: String::new() },
            LtiError::WeakKey {
                kid: String::new(),
                bits: 0,
            },
            LtiError::BadSignature,
            LtiError::IssuerMismatch {
                expected: String::new(),
                found: String::new(),
            },
            LtiError::AudienceMismatch,
            LtiError::AzpMismatch,
            LtiError::Expired,
            LtiError::NotYetValid,
            LtiError::TooOld,
            LtiError::MissingClaim("x"),
            LtiError::InvalidClaim {
                claim: "x",
                reason: String::new(),
            },
            LtiError::UnsupportedVersion(String::new()),
            LtiError::UnsupportedMessageType(String::new()),
            LtiError::UnknownDeployment(String::new()),
            LtiError::TargetLinkMismatch {
                expected: String::new(),
                found: String::new(),
            },
        ];
        let mut codes: Vec<&str> = all.iter().map(|e| e.code()).collect();
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
        assert!(all.iter().all(|e| e.is_client_error()));
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        let p = |status| LtiError::Platform {
            url: "u".into(),
            status,
            body: String::new(),
        };
        assert!(p(503).is_transient());
        assert!(p(429).is_transient());
        assert!(!p(400).is_transient(), "Moodle's non-gradable user");
        assert!(!p(422).is_transient());
        assert!(!LtiError::BadSignature.is_transient());
    }
}
