//! viva-lti: the tool side of LTI 1.3 and LTI Advantage, independent of any
//! web framework (the daemon owns the HTTP routes).
//!
//! A launch, start to end:
//!
//! 1. [`login::LoginRequest::from_params`] reads the platform's OIDC login
//!    initiation; [`registration::select`] finds the registration by
//!    (issuer, client_id); [`login::begin_login`] stores a state (nonce +
//!    browser binding) and builds the redirect to the platform.
//! 2. At the launch, [`login::check_binding`] compares the binding the
//!    browser presents (cookie or client-side storage) with the state, then
//!    [`login::consume`] uses the state up and
//!    [`launch::validate_id_token`] checks the id_token against the
//!    registration's key set ([`jwks::JwksCache`]) and every claim.
//! 3. [`roles::map_roles`] turns LTI roles into access levels.
//! 4. Deep linking answers with [`deep_linking::respond`], signed by the
//!    tool's [`keys::ToolKeys`], which also serve the tool JWKS and rotate.
//! 5. Grades go back through [`services::ServiceClient`] (AGS), rosters come
//!    from it too (NRPS); [`dynreg::register`] performs dynamic registration.
//!
//! All outbound HTTP goes through [`http::HttpClient`], which refuses
//! non-https and non-public addresses unless the policy allows insecure
//! platforms. Errors are one enum, [`LtiError`], with stable codes.

pub mod deep_linking;
pub mod dynreg;
pub mod error;
pub mod http;
pub mod jwks;
pub mod keys;
pub mod launch;
pub mod login;
pub mod registration;
pub mod roles;
pub mod services;

pub use error::{LtiError, Result};
pub use http::{HttpClient, UrlPolicy};
pub use jwks::JwksCache;
pub use keys::ToolKeys;
pub use launch::{Launch, MessageType};
pub use login::{LoginRequest, LoginState, MemoryStateStore, StateLimits, StateStore};
pub use registration::{Registration, ToolUrls};
pub use roles::Access;
pub use services::ServiceClient;

/// The User-Agent of every platform call (Canvas requires one).
pub const USER_AGENT: &str = concat!("Viva-LTI/", env!("CARGO_PKG_VERSION"));

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
