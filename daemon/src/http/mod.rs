//! The HTTP layer: the only part of the daemon that knows axum, status codes,
//! extractors and HTML. [`router`] lists every route of the daemon in one
//! place; handlers live in the submodules by audience and call the modules
//! below (store, jobs, intake, lti, plugins, …), which know nothing of HTTP.
//!
//! Every `/api/v1` route needs a session (bearer token, or a single-use
//! ticket where headers cannot be sent); `/healthz`, `/readyz`, `/metrics`,
//! the widget's assets and the `/lti/*` endpoints (which authenticate with
//! LTI's own messages) do not.

mod access;
mod admin;
mod api;
mod calibration;
mod error;
mod html;
mod limits;
mod lti;
mod plugins;
mod review;
mod serve;
pub mod widget;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{delete, get, post, put};

use crate::auth::Sessions;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::scheduler::SchedulerHandle;
use crate::store::Store;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub sessions: Sessions,
    pub scheduler: SchedulerHandle,
    pub metrics: Metrics,
    pub plugins: Arc<crate::plugins::PluginRegistry>,
    pub lti: crate::lti::Lti,
    pub shutting_down: Arc<AtomicBool>,
    /// Uploads in flight (per user and in all) and their disk reserve.
    pub intake: crate::intake::Admission,
    /// Rate limits and stream caps.
    pub limits: Arc<RateLimits>,
}

pub use limits::RateLimits;
pub use serve::serve;

/// Every route of the daemon.
pub fn router(state: AppState) -> Router {
    Router::new()
        // Probes and metrics: no session.
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        // The widget (static assets, and the standalone page that reads its
        // token from the URL fragment): no session.
        .route("/widget/{version}/{file}", get(widget::asset))
        .route("/app", get(widget::app))
        // Everyone with a session.
        .route("/api/v1/me", get(api::me))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/events", get(api::events))
        .route("/api/v1/tickets", post(api::ticket))
        // Assignments: read by the course, changed by its instructors.
        .route(
            "/api/v1/assignments",
            get(api::list_assignments).post(api::create_assignment),
        )
        .route(
            "/api/v1/assignments/{id}",
            get(api::get_assignment)
                .put(api::update_assignment)
                .delete(api::delete_assignment),
        )
        .route(
            "/api/v1/assignments/{id}/submissions",
            post(api::upload)
                .get(api::list_assignment_submissions)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/assignments/{id}/versions", get(api::list_versions))
        .route("/api/v1/assignments/{id}/rescore", post(api::rescore))
        .route("/api/v1/assignments/{id}/rescores", get(api::list_rescores))
        .route("/api/v1/assignments/{id}/audit", get(api::assignment_audit))
        .route(
            "/api/v1/assignments/{id}/release-all",
            post(review::release_all),
        )
        // Calibration against the instructor's grading, and bulk tools.
        .route(
            "/api/v1/assignments/{id}/calibration",
            get(calibration::report),
        )
        .route(
            "/api/v1/assignments/{id}/calibration.csv",
            get(calibration::report_csv),
        )
        .route(
            "/api/v1/assignments/{id}/calibration/gate",
            put(calibration::put_gate).delete(calibration::delete_gate),
        )
        .route(
            "/api/v1/assignments/{id}/grades.csv",
            get(calibration::grades_csv),
        )
        .route(
            "/api/v1/assignments/{id}/release-selected",
            post(calibration::release_selected),
        )
        .route(
            "/api/v1/submissions/{id}/blind-grade",
            post(calibration::blind_grade),
        )
        .route(
            "/api/v1/submissions/{id}/instructor-grade",
            get(calibration::instructor_grade),
        )
        .route(
            "/api/v1/submissions/{id}/exemplar",
            put(calibration::mark_exemplar).delete(calibration::unmark_exemplar),
        )
        .route("/api/v1/assignments/{id}/dashboard", get(review::dashboard))
        .route("/api/v1/assignments/{id}/roster", get(review::roster))
        // Submissions: their owner reads, instructors review and release.
        .route("/api/v1/submissions", get(api::list_submissions))
        .route("/api/v1/submissions/{id}", get(api::get_submission))
        .route("/api/v1/submissions/{id}/media", get(api::media))
        .route("/api/v1/submissions/{id}/preview", get(review::preview))
        .route(
            "/api/v1/submissions/{id}/override",
            post(review::override_grade),
        )
        .route("/api/v1/submissions/{id}/retry", post(review::retry))
        .route("/api/v1/submissions/{id}/release", post(review::release))
        .route(
            "/api/v1/submissions/{id}/passback",
            get(review::passback_status),
        )
        .route(
            "/api/v1/submissions/{id}/audit",
            get(review::submission_audit),
        )
        // Rubric plugins.
        .route(
            "/api/v1/plugins",
            get(plugins::list_plugins)
                .post(plugins::upload_plugin)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/plugins/{id}", get(plugins::get_plugin))
        .route(
            "/api/v1/plugins/{id}/disable",
            post(plugins::disable_plugin),
        )
        .route("/api/v1/plugins/{id}/enable", post(plugins::enable_plugin))
        .route(
            "/api/v1/plugins/{id}/validate-config",
            post(plugins::validate_plugin_config),
        )
        // Personal data.
        .route("/api/v1/users/{id}/export", get(admin::export_user))
        .route("/api/v1/users/{id}", delete(admin::delete_user))
        // Administrators.
        .route("/api/v1/admin/purge", post(admin::purge))
        .route("/api/v1/admin/system", get(admin::system))
        .route("/api/v1/admin/doctor", get(admin::doctor))
        .route("/api/v1/admin/audit", get(admin::audit))
        .route("/api/v1/admin/plugin-failures", get(admin::plugin_failures))
        .route("/api/v1/admin/timeline", get(admin::timeline))
        .route(
            "/api/v1/admin/workers/{role}/retry",
            post(admin::retry_worker),
        )
        .route(
            "/api/v1/admin/platforms",
            get(lti::list_platforms)
                .post(lti::add_platform)
                .delete(lti::remove_platform),
        )
        // LTI 1.3: the platform's messages (no session), and the roster.
        .route("/api/v1/admin/platforms/invites", post(lti::create_invite))
        .route(
            "/lti/login",
            get(lti::login_get)
                .post(lti::login_post)
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    limits::login_limit,
                )),
        )
        .route("/lti/launch", post(lti::launch))
        .route("/lti/jwks.json", get(lti::jwks))
        .route("/lti/register", get(lti::register))
        .route("/lti/canvas.json", get(lti::canvas_json))
        .route("/lti/deep-link", post(lti::deep_link))
        .route("/api/v1/lti/members", get(lti::members))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::request_timeout,
        ))
        .with_state(state)
}
