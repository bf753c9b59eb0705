//! HTTP routes. Every `/api/v1` route needs a session (bearer token, or a
//! single-use ticket where headers cannot be sent); `/healthz`, `/readyz` and
//! `/metrics` do not.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

use crate::auth::{Claims, HasSessions, Session, Sessions};
use crate::config::Config;
use crate::domain::{
    self, AssignmentInput, Role, Submission, SubmissionFilter, SubmissionState, new_id,
};
use crate::error::{Error, Result};
use crate::intake::{self, UploadHint};
use crate::jobs::{self, BatchProgress};
use crate::metrics::Metrics;
use crate::scheduler::SchedulerHandle;
use crate::status::{QueueEntry, Snapshot};
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
    pub lti: crate::platforms::Lti,
    pub shutting_down: Arc<AtomicBool>,
}

impl HasSessions for AppState {
    fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/me", get(me))
        .route("/api/v1/status", get(status))
        .route("/api/v1/events", get(events))
        .route("/api/v1/tickets", post(ticket))
        .route(
            "/api/v1/assignments",
            get(list_assignments).post(create_assignment),
        )
        .route(
            "/api/v1/assignments/{id}",
            get(get_assignment)
                .put(update_assignment)
                .delete(delete_assignment),
        )
        .route(
            "/api/v1/assignments/{id}/submissions",
            post(upload)
                .get(list_assignment_submissions)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/submissions", get(list_submissions))
        .route("/api/v1/submissions/{id}", get(get_submission))
        .route("/api/v1/submissions/{id}/media", get(media))
        .route("/api/v1/users/{id}/export", get(export_user))
        .route("/api/v1/users/{id}", axum::routing::delete(delete_user))
        .route("/api/v1/admin/purge", post(purge))
        .route(
            "/api/v1/admin/timeline",
            get(crate::timeline::admin_timeline),
        )
        .merge(crate::plugins::routes())
        .merge(crate::lti_routes::routes())
        .merge(crate::review::routes())
        .merge(crate::widget::routes())
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): State<AppState>) -> Response {
    let problems = readiness_problems(&st).await;
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": problems.is_empty(), "problems": problems })),
    )
        .into_response()
}

/// Why the daemon cannot take work now, in words (empty when ready): shared
/// by `/readyz` and the admin view.
pub(crate) async fn readiness_problems(st: &AppState) -> Vec<String> {
    let snap = st.scheduler.snapshot();
    let mut problems = Vec::new();
    if st.shutting_down.load(Ordering::Relaxed) {
        problems.push("shutting down".to_owned());
    }
    if st.config.workers.stt.is_none() {
        problems.push("no STT worker is configured ([workers.stt])".to_owned());
    }
    if st.config.workers.evaluators.is_empty() {
        problems.push("no evaluator is configured ([workers.evaluators.<role>])".to_owned());
    }
    for (slot, err) in &snap.worker_errors {
        problems.push(format!("worker {slot}: {err}"));
    }
    let db_ok = st
        .store
        .read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await
        .is_ok();
    if !db_ok {
        problems.push("the database cannot be read".into());
    }
    problems
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct MeView {
    user_id: String,
    context_id: String,
    context_title: Option<String>,
    roles: Vec<Role>,
    name: Option<String>,
    expires_at: u64,
}

async fn me(State(st): State<AppState>, Session(c): Session) -> Result<Json<MeView>> {
    let ctx = c.ctx.clone();
    let title = st
        .store
        .read(move |conn| {
            use rusqlite::OptionalExtension;
            Ok(conn
                .query_row("SELECT title FROM contexts WHERE id = ?1", [ctx], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?)
        })
        .await?;
    Ok(Json(MeView {
        user_id: c.sub,
        context_id: c.ctx,
        context_title: title,
        roles: c.roles,
        name: c.name,
        expires_at: c.exp,
    }))
}

/// The queue as everyone may see it: no other students' ids.
#[derive(Serialize)]
struct StatusView {
    policy: &'static str,
    phase: &'static str,
    phase_since_ms: i64,
    batch: Option<BatchProgress>,
    batch_closed: bool,
    stt_queue: usize,
    eval_queue: usize,
    score_queue: usize,
    workers: Vec<crate::workers::ProcessInfo>,
    worker_errors: std::collections::BTreeMap<String, String>,
    stats: crate::status::StatsView,
    /// Instructors and admins: unfinished submissions of their context.
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<QueueEntry>>,
}

async fn status(State(st): State<AppState>, Session(c): Session) -> Result<Json<StatusView>> {
    let snap = st.scheduler.snapshot();
    let entries = if c.is_admin() {
        Some(snap.entries.values().cloned().collect())
    } else if c.has(Role::Instructor) {
        let ctx = c.ctx.clone();
        let ids: Vec<String> = snap.entries.keys().cloned().collect();
        let allowed = st
            .store
            .read(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT s.id FROM submissions s JOIN assignments a ON a.id = s.assignment_id
                     WHERE s.id = ?1 AND a.context_id = ?2",
                )?;
                let mut out = Vec::new();
                for id in ids {
                    if stmt.exists(rusqlite::params![id, ctx])? {
                        out.push(id);
                    }
                }
                Ok(out)
            })
            .await?;
        Some(
            allowed
                .iter()
                .filter_map(|id| snap.entries.get(id).cloned())
                .collect(),
        )
    } else {
        None
    };
    Ok(Json(StatusView {
        policy: snap.policy,
        phase: snap.phase,
        phase_since_ms: snap.phase_since_ms,
        batch: snap.batch.clone(),
        batch_closed: snap.batch_closed,
        stt_queue: snap.stt_queue,
        eval_queue: snap.eval_queue,
        score_queue: snap.score_queue,
        workers: snap.workers.clone(),
        worker_errors: snap.worker_errors.clone(),
        stats: snap.stats.clone(),
        entries,
    }))
}

fn context_for(c: &Claims, requested: Option<&str>) -> String {
    match requested {
        Some(ctx) if c.is_admin() => ctx.to_owned(),
        _ => c.ctx.clone(),
    }
}

#[derive(Deserialize)]
struct ContextQuery {
    context: Option<String>,
}

async fn list_assignments(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<ContextQuery>,
) -> Result<Json<Vec<domain::Assignment>>> {
    let ctx = context_for(&c, q.context.as_deref());
    Ok(Json(
        st.store
            .read(move |conn| domain::list_assignments(conn, &ctx))
            .await?,
    ))
}

async fn load_assignment(st: &AppState, c: &Claims, id: String) -> Result<domain::Assignment> {
    let a = st
        .store
        .read(move |conn| domain::get_assignment(conn, &id))
        .await?
        .ok_or(Error::NotFound("assignment"))?;
    if a.context_id != c.ctx && !c.is_admin() {
        return Err(Error::NotFound("assignment"));
    }
    Ok(a)
}

async fn get_assignment(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<domain::Assignment>> {
    Ok(Json(load_assignment(&st, &c, id).await?))
}

fn require_manage(c: &Claims, ctx: &str) -> Result<()> {
    if c.can_manage(ctx) {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only the course's instructors can change assignments".into(),
        ))
    }
}

async fn create_assignment(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<ContextQuery>,
    Json(input): Json<AssignmentInput>,
) -> Result<(StatusCode, Json<domain::Assignment>)> {
    let ctx = context_for(&c, q.context.as_deref());
    require_manage(&c, &ctx)?;
    input.validate()?;
    crate::plugins::check_assignment(&st, &ctx, &input).await?;
    let id = input.id.clone().unwrap_or_else(|| new_id("asg"));
    let actor = c.actor();
    let a = st
        .store
        .write(move |tx| {
            if domain::get_assignment(tx, &id)?.is_some() {
                return Err(Error::Conflict {
                    code: "assignment_exists",
                    message: format!("assignment {id} already exists; use PUT to change it"),
                });
            }
            domain::ensure_context(tx, &ctx, &ctx)?;
            let a = domain::upsert_assignment(tx, &ctx, &id, &input)?;
            domain::audit(tx, &actor, "assignment.create", &id, serde_json::json!({}))?;
            Ok(a)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(a)))
}

async fn update_assignment(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
    Json(input): Json<AssignmentInput>,
) -> Result<Json<domain::Assignment>> {
    let existing = load_assignment(&st, &c, id.clone()).await?;
    require_manage(&c, &existing.context_id)?;
    input.validate()?;
    if input.id.as_deref().is_some_and(|i| i != id) {
        return Err(Error::bad_request(
            "invalid_assignment",
            "the body's id differs from the URL's",
        ));
    }
    crate::plugins::check_assignment(&st, &existing.context_id, &input).await?;
    let actor = c.actor();
    let ctx = existing.context_id.clone();
    Ok(Json(
        st.store
            .write(move |tx| {
                let a = domain::upsert_assignment(tx, &ctx, &id, &input)?;
                domain::audit(tx, &actor, "assignment.update", &id, serde_json::json!({}))?;
                Ok(a)
            })
            .await?,
    ))
}

async fn delete_assignment(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let existing = load_assignment(&st, &c, id.clone()).await?;
    require_manage(&c, &existing.context_id)?;
    let actor = c.actor();
    st.store
        .write(move |tx| {
            domain::delete_assignment(tx, &id)?;
            domain::audit(tx, &actor, "assignment.delete", &id, serde_json::json!({}))
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct UploadQuery {
    filename: Option<String>,
}

async fn upload(
    State(st): State<AppState>,
    Session(c): Session,
    Path(assignment_id): Path<String>,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<SubmissionView>)> {
    let result = upload_inner(&st, &c, assignment_id, q, req).await;
    match &result {
        Ok(_) => st.metrics.uploads.inc(),
        Err(e) => {
            let (_, code) = e.status_and_code();
            st.metrics.uploads_rejected.with_label_values(&[code]).inc();
        }
    }
    result
}

async fn upload_inner(
    st: &AppState,
    c: &Claims,
    assignment_id: String,
    q: UploadQuery,
    req: Request,
) -> Result<(StatusCode, Json<SubmissionView>)> {
    if st.shutting_down.load(Ordering::Relaxed) {
        return Err(Error::Unavailable(
            "the server is restarting; try again in a minute".into(),
        ));
    }
    let assignment = load_assignment(st, c, assignment_id).await?;
    let upload_key = upload_key(req.headers())?;
    // A retry of an upload that already landed: that submission, not a
    // second one (the body is not read again).
    if let Some(key) = upload_key.clone()
        && let Some(sub) = submission_by_key(st, &assignment.id, &c.sub, key).await?
    {
        tracing::info!(submission = %sub.id, "upload retried with a known idempotency key");
        return Ok((StatusCode::OK, Json(view(st, c, sub, None))));
    }
    let limits = st.config.intake.limits();
    let staging = st.config.staging_dir();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let staged = if content_type
        .as_deref()
        .is_some_and(|t| t.starts_with("multipart/form-data"))
    {
        let mut mp = axum::extract::Multipart::from_request(req, st)
            .await
            .map_err(|e| Error::bad_request("bad_multipart", e.body_text()))?;
        loop {
            let field = mp
                .next_field()
                .await
                .map_err(|e| Error::bad_request("bad_multipart", e.body_text()))?
                .ok_or_else(|| {
                    Error::bad_request(
                        "empty_upload",
                        "the form has no file: send the recording in a field named \"file\"",
                    )
                })?;
            if field.name() == Some("file") || field.file_name().is_some() {
                let hint = UploadHint {
                    filename: field.file_name().map(str::to_owned).or(q.filename.clone()),
                    content_type: field.content_type().map(str::to_owned),
                    content_length: None,
                };
                break intake::receive(Box::pin(field), &hint, &limits, &staging).await?;
            }
        }
    } else {
        let hint = UploadHint {
            filename: q.filename.clone(),
            content_type,
            content_length,
        };
        let stream = req.into_body().into_data_stream();
        intake::receive(Box::pin(stream), &hint, &limits, &staging).await?
    };
    let sub_id = new_id("sub");
    let final_dir = st.config.media_dir().join(&sub_id);
    let sha256 = staged.sha256.clone();
    let size_bytes = staged.size_bytes;
    let original_name = staged.original_name.clone();
    let info = staged.info.clone();
    let media_json = serde_json::to_string(&info).map_err(|e| Error::Internal(e.to_string()))?;
    let m = staged.commit(&final_dir).await?;
    let c2 = c.clone();
    let a_id = assignment.id.clone();
    let sub_id2 = sub_id.clone();
    let ctx = assignment.context_id.clone();
    let key2 = upload_key.clone();
    let insert = st
        .store
        .write(move |tx| {
            // Two concurrent tries with one key: the first to commit wins.
            if let Some(key) = &key2 {
                let existing: Option<String> = tx
                    .query_row(
                        "SELECT id FROM submissions
                         WHERE assignment_id = ?1 AND user_id = ?2 AND upload_key = ?3",
                        rusqlite::params![a_id, c2.sub, key],
                        |r| r.get(0),
                    )
                    .optional()?;
                if existing.is_some() {
                    return Ok(existing);
                }
            }
            domain::ensure_member(tx, &ctx, &c2.sub, c2.name.as_deref(), &c2.roles)?;
            let attempt: i64 = tx.query_row(
                "SELECT COALESCE(MAX(attempt), 0) + 1 FROM submissions
                 WHERE assignment_id = ?1 AND user_id = ?2",
                rusqlite::params![a_id, c2.sub],
                |r| r.get(0),
            )?;
            let now = crate::now_ms();
            tx.execute(
                "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, original_name,
                     media_dir, original_path, wav_path, sha256, size_bytes, duration_seconds,
                     media_info, created_at, updated_at, upload_key)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14)",
                rusqlite::params![
                    sub_id2,
                    a_id,
                    c2.sub,
                    attempt,
                    original_name,
                    m.dir.display().to_string(),
                    m.original.display().to_string(),
                    m.wav.display().to_string(),
                    sha256,
                    size_bytes as i64,
                    info.duration_seconds,
                    media_json,
                    now,
                    key2
                ],
            )?;
            tx.execute(
                "INSERT INTO jobs (submission_id, stage, state, created_at) VALUES (?1, 'stt', 'queued', ?2)",
                rusqlite::params![sub_id2, now],
            )?;
            Ok(None)
        })
        .await;
    let (id, status) = match insert {
        Ok(None) => (sub_id.clone(), StatusCode::CREATED),
        Ok(Some(existing)) => {
            let _ = tokio::fs::remove_dir_all(&final_dir).await;
            (existing, StatusCode::OK)
        }
        Err(e) => {
            // Nothing half-written: the files go if the row did not land.
            let _ = tokio::fs::remove_dir_all(&final_dir).await;
            return Err(e);
        }
    };
    st.scheduler.poke();
    let sub = st
        .store
        .read(move |conn| domain::get_submission(conn, &id))
        .await?
        .ok_or(Error::NotFound("submission"))?;
    tracing::info!(submission = %sub.id, user = %sub.user_id, assignment = %sub.assignment_id,
        bytes = sub.size_bytes, seconds = sub.duration_seconds, "accepted upload");
    Ok((status, Json(view(st, c, sub, None))))
}

/// The optional `Idempotency-Key` header of an upload: 8 to 128 letters,
/// digits, `-`, `_`, `.` or `:`, chosen by the client per recording and sent
/// again with every retry of it.
fn upload_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or_default();
    let ok = (8..=128).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if !ok {
        return Err(Error::bad_request(
            "bad_idempotency_key",
            "the Idempotency-Key header must be 8 to 128 letters, digits, '-', '_', '.' or ':' (one random key per recording, sent again with each retry)",
        ));
    }
    Ok(Some(key.to_owned()))
}

async fn submission_by_key(
    st: &AppState,
    assignment_id: &str,
    user_id: &str,
    key: String,
) -> Result<Option<Submission>> {
    let (a, u) = (assignment_id.to_owned(), user_id.to_owned());
    st.store
        .read(move |conn| {
            let id: Option<String> = conn
                .query_row(
                    "SELECT id FROM submissions
                     WHERE assignment_id = ?1 AND user_id = ?2 AND upload_key = ?3",
                    rusqlite::params![a, u, key],
                    |r| r.get(0),
                )
                .optional()?;
            match id {
                Some(id) => domain::get_submission(conn, &id),
                None => Ok(None),
            }
        })
        .await
}

/// A submission with its live queue position, as clients see it.
#[derive(Serialize, Clone, PartialEq)]
pub struct SubmissionView {
    #[serde(flatten)]
    pub submission: Submission,
    /// Where it waits, while unfinished.
    pub queue: Option<QueueEntry>,
    /// The batch it belongs to, while that batch's STT phase runs.
    pub batch: Option<BatchProgress>,
    /// The scheduler's phase right now.
    pub system_phase: &'static str,
    pub phase: &'static str,
}

fn view(
    st: &AppState,
    c: &Claims,
    mut s: Submission,
    batch: Option<BatchProgress>,
) -> SubmissionView {
    let snap = st.scheduler.snapshot();
    let learner_only = !c.can_manage(&s.context_id);
    if learner_only && s.state != SubmissionState::Released {
        // Grades and model judgements wait for release.
        s.evaluations.clear();
        s.score = None;
    }
    view_from_snapshot(&snap, s, batch)
}

fn view_from_snapshot(
    snap: &Snapshot,
    s: Submission,
    batch: Option<BatchProgress>,
) -> SubmissionView {
    let queue = snap.entries.get(&s.id).cloned();
    let batch = batch.or_else(|| {
        snap.batch
            .as_ref()
            .filter(|b| Some(b.id) == s.batch_id)
            .cloned()
    });
    let phase = queue
        .as_ref()
        .map(|q| q.phase)
        .unwrap_or_else(|| s.state.phase());
    SubmissionView {
        submission: s,
        queue,
        batch,
        system_phase: snap.phase,
        phase,
    }
}

async fn load_readable(st: &AppState, c: &Claims, id: String) -> Result<Submission> {
    let s = st
        .store
        .read(move |conn| domain::get_submission(conn, &id))
        .await?
        .ok_or(Error::NotFound("submission"))?;
    // Someone else's submission is "not found", not "forbidden": ids do not leak.
    if !c.can_read(&s) {
        return Err(Error::NotFound("submission"));
    }
    Ok(s)
}

async fn batch_of(st: &AppState, s: &Submission) -> Result<Option<BatchProgress>> {
    match s.batch_id {
        Some(b) => Ok(Some(
            st.store.read(move |c| jobs::batch_progress(c, b)).await?,
        )),
        None => Ok(None),
    }
}

async fn get_submission(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<SubmissionView>> {
    let s = load_readable(&st, &c, id).await?;
    let batch = batch_of(&st, &s).await?;
    Ok(Json(view(&st, &c, s, batch)))
}

#[derive(Deserialize)]
struct ListQuery {
    user: Option<String>,
    context: Option<String>,
    limit: Option<u32>,
}

async fn list_submissions(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<SubmissionView>>> {
    let ctx = context_for(&c, q.context.as_deref());
    let filter = SubmissionFilter {
        context_id: Some(ctx.clone()),
        assignment_id: None,
        user_id: if c.can_manage(&ctx) {
            q.user
        } else {
            Some(c.sub.clone())
        },
        limit: q.limit,
    };
    let subs = st
        .store
        .read(move |conn| domain::list_submissions(conn, &filter))
        .await?;
    Ok(Json(
        subs.into_iter().map(|s| view(&st, &c, s, None)).collect(),
    ))
}

async fn list_assignment_submissions(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<SubmissionView>>> {
    let a = load_assignment(&st, &c, id).await?;
    let filter = SubmissionFilter {
        context_id: Some(a.context_id.clone()),
        assignment_id: Some(a.id),
        user_id: if c.can_manage(&a.context_id) {
            None
        } else {
            Some(c.sub.clone())
        },
        limit: None,
    };
    let subs = st
        .store
        .read(move |conn| domain::list_submissions(conn, &filter))
        .await?;
    Ok(Json(
        subs.into_iter().map(|s| view(&st, &c, s, None)).collect(),
    ))
}

#[derive(Deserialize)]
struct TicketRequest {
    /// "events" or "media:<submission id>".
    scope: String,
}

#[derive(Serialize)]
struct TicketResponse {
    ticket: String,
    expires_in: u64,
}

async fn ticket(
    State(st): State<AppState>,
    Session(c): Session,
    Json(req): Json<TicketRequest>,
) -> Result<Json<TicketResponse>> {
    if let Some(id) = req.scope.strip_prefix("media:") {
        load_readable(&st, &c, id.to_owned()).await?;
    } else if req.scope != "events" {
        return Err(Error::bad_request(
            "bad_scope",
            "scope must be \"events\" or \"media:<submission id>\"",
        ));
    }
    let (ticket, ttl) = st.sessions.ticket(&c, &req.scope);
    Ok(Json(TicketResponse {
        ticket,
        expires_in: ttl.as_secs(),
    }))
}

/// Bearer header, or else a single-use ticket for `scope`.
pub(crate) fn claims_from(
    st: &AppState,
    headers: &HeaderMap,
    ticket: Option<&str>,
    scope: &str,
) -> Result<Claims> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| Error::Unauthorized("malformed Authorization header".into()))?;
        let token = v
            .strip_prefix("Bearer ")
            .ok_or_else(|| Error::Unauthorized("the Authorization header must be Bearer".into()))?;
        return st.sessions.verify(token.trim());
    }
    match ticket {
        Some(t) => st.sessions.redeem(t, scope),
        None => Err(Error::Unauthorized(
            "send a bearer token, or a ticket from POST /api/v1/tickets as ?ticket=".into(),
        )),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    submission: Option<String>,
    ticket: Option<String>,
}

/// What the per-submission stream sends on every change.
#[derive(Serialize, Clone, PartialEq)]
struct SubmissionEvent {
    submission_id: String,
    state: SubmissionState,
    phase: &'static str,
    system_phase: &'static str,
    position: Option<usize>,
    queue_length: Option<usize>,
    eta_seconds: Option<f64>,
    batch: Option<BatchProgress>,
    failure_reason: Option<String>,
}

/// What the global stream sends on every change.
#[derive(Serialize, Clone, PartialEq)]
struct GlobalEvent {
    phase: &'static str,
    batch: Option<BatchProgress>,
    stt_queue: usize,
    eval_queue: usize,
    score_queue: usize,
}

async fn events(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let c = claims_from(&st, &headers, q.ticket.as_deref(), "events")?;
    let rx = st.scheduler.subscribe();
    let stream: futures::stream::BoxStream<'static, std::result::Result<Event, Infallible>> =
        match q.submission {
            Some(id) => {
                let s = load_readable(&st, &c, id).await?;
                submission_stream(st.clone(), s, rx).boxed()
            }
            None => global_stream(rx).boxed(),
        };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn global_stream(
    rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> {
    futures::stream::unfold(
        (rx, None::<GlobalEvent>, true),
        |(mut rx, last, first)| async move {
            loop {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let snap = rx.borrow_and_update().clone();
                let ev = GlobalEvent {
                    phase: snap.phase,
                    batch: snap.batch.clone(),
                    stt_queue: snap.stt_queue,
                    eval_queue: snap.eval_queue,
                    score_queue: snap.score_queue,
                };
                if last.as_ref() != Some(&ev) {
                    let e = Event::default()
                        .event("status")
                        .json_data(&ev)
                        .unwrap_or_default();
                    return Some((Ok(e), (rx, Some(ev), false)));
                }
                if first {
                    // Unchanged first value cannot happen (last is None), but keep the loop total.
                    continue;
                }
            }
        },
    )
}

fn submission_stream(
    st: AppState,
    sub: Submission,
    rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> {
    struct S {
        st: AppState,
        sub: Submission,
        rx: tokio::sync::watch::Receiver<Arc<Snapshot>>,
        last: Option<SubmissionEvent>,
        first: bool,
        finished: bool,
    }
    let init = S {
        st,
        sub,
        rx,
        last: None,
        first: true,
        finished: false,
    };
    futures::stream::unfold(init, |mut s| async move {
        if s.finished {
            return None;
        }
        loop {
            if !s.first && s.rx.changed().await.is_err() {
                return None;
            }
            s.first = false;
            let snap = s.rx.borrow_and_update().clone();
            let entry = snap.entries.get(&s.sub.id).cloned();
            if entry.is_none() {
                // Not in the queue: read its settled state from the store.
                let id = s.sub.id.clone();
                if let Ok(Some(fresh)) =
                    s.st.store
                        .read(move |c| domain::get_submission(c, &id))
                        .await
                {
                    s.sub = fresh;
                }
            }
            let batch = snap
                .batch
                .as_ref()
                .filter(|b| Some(b.id) == s.sub.batch_id)
                .cloned();
            let state = match &entry {
                Some(e) if e.phase == "stt" && e.running => SubmissionState::Transcribing,
                Some(e) if e.phase == "stt" => SubmissionState::Queued,
                Some(e) if e.phase == "evaluation" && e.running => SubmissionState::Evaluating,
                Some(e) if e.phase == "evaluation" => SubmissionState::Transcribed,
                Some(_) => SubmissionState::Evaluated,
                None => s.sub.state,
            };
            let ev = SubmissionEvent {
                submission_id: s.sub.id.clone(),
                state,
                phase: entry.as_ref().map(|e| e.phase).unwrap_or(state.phase()),
                system_phase: snap.phase,
                position: entry.as_ref().map(|e| e.position),
                queue_length: entry.as_ref().map(|e| e.queue_length),
                eta_seconds: entry.as_ref().map(|e| e.eta_seconds),
                batch,
                failure_reason: s.sub.failure_reason.clone(),
            };
            let settled =
                entry.is_none() && (state.is_settled() || state == SubmissionState::Evaluated);
            if s.last.as_ref() != Some(&ev) || settled {
                let e = Event::default()
                    .event(if settled { "done" } else { "status" })
                    .json_data(&ev)
                    .unwrap_or_default();
                s.last = Some(ev);
                s.finished = settled;
                return Some((Ok(e), s));
            }
        }
    })
}

#[derive(Deserialize)]
struct MediaQuery {
    ticket: Option<String>,
}

async fn media(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<MediaQuery>,
) -> Result<Response> {
    let c = claims_from(&st, &headers, q.ticket.as_deref(), &format!("media:{id}"))?;
    let s = load_readable(&st, &c, id).await?;
    let path = s
        .original_path
        .filter(|_| s.media_available)
        .ok_or(Error::NotFound(
            "media (deleted after the retention period)",
        ))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Error::NotFound("media"))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let ct = match std::path::Path::new(&path)
        .extension()
        .and_then(|e| e.to_str())
    {
        Some("mp4" | "m4a" | "mov") => "video/mp4",
        Some("webm") => "video/webm",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "opus") => "audio/ogg",
        Some("flac") => "audio/flac",
        _ => "application/octet-stream",
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, ct.to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
        ],
        body,
    )
        .into_response())
}

async fn export_user(
    State(st): State<AppState>,
    Session(c): Session,
    Path(user): Path<String>,
) -> Result<Json<serde_json::Value>> {
    if user != c.sub && !c.is_admin() {
        return Err(Error::Forbidden(
            "you can export only your own data; an administrator can export anyone's".into(),
        ));
    }
    Ok(Json(
        st.store
            .read(move |conn| crate::retention::export_user(conn, &user))
            .await?,
    ))
}

async fn delete_user(
    State(st): State<AppState>,
    Session(c): Session,
    Path(user): Path<String>,
) -> Result<Json<HashMap<&'static str, usize>>> {
    if !c.is_admin() {
        return Err(Error::Forbidden(
            "only an administrator can delete a user's data".into(),
        ));
    }
    let n = crate::retention::delete_user(&st.store, &user, &c.actor()).await?;
    Ok(Json(HashMap::from([("submissions_deleted", n)])))
}

async fn purge(
    State(st): State<AppState>,
    Session(c): Session,
) -> Result<Json<HashMap<&'static str, usize>>> {
    if !c.is_admin() {
        return Err(Error::Forbidden(
            "only an administrator can purge media".into(),
        ));
    }
    let n = crate::retention::purge_expired(&st.store, st.config.retention.retention_days).await?;
    Ok(Json(HashMap::from([("media_purged", n)])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_hides_nothing_from_settled_entries() {
        let snap = Snapshot::default();
        let s: Submission = serde_json::from_value(serde_json::json!({
            "id": "s", "assignment_id": "a", "context_id": "c", "user_id": "u", "attempt": 1,
            "state": "failed", "batch_id": null, "original_name": null, "sha256": "x",
            "size_bytes": 1, "duration_seconds": 1.0, "media_info": {}, "transcript": null,
            "evaluations": [], "score": null, "failure_code": "x", "failure_reason": "why",
            "created_at": 0, "updated_at": 0, "finished_at": null, "media_available": true
        }))
        .expect("submission");
        let v = view_from_snapshot(&snap, s, None);
        assert_eq!(v.phase, "failed");
        assert!(v.queue.is_none());
    }
}
