//! The API everyone with a session uses: who am I, the queue, live events,
//! tickets, assignments, uploads, submissions and their media.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::db::OptionalExtension;
use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::access::{
    Session, TicketQuery, claims_from, context_for, load_assignment, load_media, load_readable,
    require_manage,
};
use super::limits::{ClientIp, Limited};
use crate::auth::Claims;
use crate::domain::{
    self, AssignmentInput, Role, Submission, SubmissionFilter, SubmissionState, new_id,
};
use crate::error::{Error, Result};
use crate::eta::{QueueEntry, Snapshot};
use crate::intake::{self, IntakeError, IntakeLimits, UploadHint};
use crate::jobs::{self, BatchProgress};

#[derive(Serialize)]
pub(super) struct MeView {
    user_id: String,
    context_id: String,
    context_title: Option<String>,
    roles: Vec<Role>,
    /// A Viva-wide administrator (an operator's session); an LTI platform's
    /// administrator is not one.
    viva_admin: bool,
    name: Option<String>,
    expires_at: u64,
}

pub(super) async fn me(State(st): State<AppState>, Session(c): Session) -> Result<Json<MeView>> {
    let ctx = c.ctx.clone();
    let title = st
        .store
        .read(move |conn| {
            use crate::db::OptionalExtension;
            Ok(conn
                .query_row("SELECT title FROM contexts WHERE id = ?1", [ctx], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?)
        })
        .await?;
    let viva_admin = c.is_admin();
    Ok(Json(MeView {
        user_id: c.sub,
        context_id: c.ctx,
        context_title: title,
        viva_admin,
        roles: c.roles,
        name: c.name,
        expires_at: c.exp,
    }))
}

/// The queue as everyone may see it: no other students' ids.
#[derive(Serialize)]
pub(super) struct StatusView {
    policy: &'static str,
    phase: &'static str,
    phase_since_ms: i64,
    batch: Option<BatchProgress>,
    batch_closed: bool,
    stt_queue: usize,
    eval_queue: usize,
    score_queue: usize,
    /// Staff only (instructors, admins): process ids, model names and
    /// internal errors are no business of learners, who see phase, position
    /// and ETA (their own submission's view carries those).
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<Vec<crate::workers::ProcessInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_errors: Option<std::collections::BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<crate::eta::StatsView>,
    /// Staff only: roles whose model cannot start (their submissions wait,
    /// paused; a learner's own submission says so in plain words).
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<Vec<crate::eta::Unavailable>>,
    /// Staff only: a phase switch held back to save a model swap.
    #[serde(skip_serializing_if = "Option::is_none")]
    hold: Option<crate::eta::Hold>,
    /// Admins only: the gpu nodes serving the queue, when several nodes
    /// share the store (host names are the site's business).
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_nodes: Option<Vec<String>>,
    /// Instructors and admins: unfinished submissions of their context.
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<QueueEntry>>,
}

pub(super) async fn status(
    State(st): State<AppState>,
    Session(c): Session,
) -> Result<Json<StatusView>> {
    let snap = st.scheduler.snapshot();
    let staff = c.can_manage(&c.ctx);
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
                    if stmt.exists(crate::params![id, ctx])? {
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
        workers: staff.then(|| snap.workers.clone()),
        worker_errors: staff.then(|| snap.worker_errors.clone()),
        stats: staff.then(|| snap.stats.clone()),
        unavailable: staff.then(|| snap.unavailable.values().cloned().collect()),
        hold: snap.hold.clone().filter(|_| staff),
        queue_nodes: (c.is_admin() && !snap.queue_nodes.is_empty())
            .then(|| snap.queue_nodes.clone()),
        entries,
    }))
}

#[derive(Deserialize)]
pub(super) struct ContextQuery {
    context: Option<String>,
}

pub(super) async fn list_assignments(
    State(st): State<AppState>,
    Session(mut c): Session,
    Query(q): Query<ContextQuery>,
) -> Result<Json<Vec<domain::Assignment>>> {
    let ctx = context_for(&st, &mut c, q.context.as_deref()).await?;
    Ok(Json(
        st.store
            .read(move |conn| domain::list_assignments(conn, &ctx))
            .await?,
    ))
}

pub(super) async fn get_assignment(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<domain::Assignment>> {
    Ok(Json(load_assignment(&st, &mut c, id).await?))
}

pub(super) async fn create_assignment(
    State(st): State<AppState>,
    Session(mut c): Session,
    Query(q): Query<ContextQuery>,
    Json(input): Json<AssignmentInput>,
) -> Result<(StatusCode, Json<domain::Assignment>)> {
    let ctx = context_for(&st, &mut c, q.context.as_deref()).await?;
    require_manage(&c, &ctx)?;
    input.validate()?;
    let sha = crate::plugins::check_assignment(&st.plugins, &ctx, &input).await?;
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
            let (a, _) = domain::save_assignment(tx, &ctx, &id, &input, Some(&sha), &actor)?;
            domain::audit(
                tx,
                &actor,
                "assignment.create",
                &id,
                serde_json::json!({"version": a.version, "plugin": a.plugin, "plugin_sha256": a.plugin_sha256}),
            )?;
            Ok(a)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(a)))
}

pub(super) async fn update_assignment(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
    Json(input): Json<AssignmentInput>,
) -> Result<Json<domain::Assignment>> {
    let existing = load_assignment(&st, &mut c, id.clone()).await?;
    require_manage(&c, &existing.context_id)?;
    input.validate()?;
    if input.id.as_deref().is_some_and(|i| i != id) {
        return Err(Error::bad_request(
            "invalid_assignment",
            "the body's id differs from the URL's",
        ));
    }
    let sha = crate::plugins::check_assignment(&st.plugins, &existing.context_id, &input).await?;
    let actor = c.actor();
    let ctx = existing.context_id.clone();
    Ok(Json(
        st.store
            .write(move |tx| {
                let (a, version) =
                    domain::save_assignment(tx, &ctx, &id, &input, Some(&sha), &actor)?;
                // Who changed what: the new version, what it changed and
                // the pinned plugin, or that nothing graded changed.
                let details = match &version {
                    Some(v) => serde_json::json!({
                        "version": v.version, "from_version": existing.version,
                        "change": v.change, "summary": v.summary,
                        "plugin": v.plugin, "plugin_sha256": v.plugin_sha256,
                    }),
                    None => serde_json::json!({"version": a.version, "change": null}),
                };
                domain::audit(tx, &actor, "assignment.update", &id, details)?;
                Ok(a)
            })
            .await?,
    ))
}

/// `GET /api/v1/assignments/{id}/versions`: every version of the graded
/// parts (staff), newest first, with how many submissions each grades.
pub(super) async fn list_versions(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let a = load_assignment(&st, &mut c, id.clone()).await?;
    require_manage(&c, &a.context_id)?;
    let current = a.version;
    let (versions, counts, stale) = st
        .store
        .read(move |conn| {
            let versions = domain::list_versions(conn, &id)?;
            let mut stmt = conn.prepare(
                "SELECT COALESCE(assignment_version, 0), COUNT(*) FROM submissions
                 WHERE assignment_id = ?1 GROUP BY 1",
            )?;
            let counts: std::collections::HashMap<i64, i64> = stmt
                .query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<crate::db::Result<_>>()?;
            let stale: i64 = conn.query_row(
                "SELECT COUNT(*) FROM submissions WHERE assignment_id = ?1
                   AND state IN ('awaiting_review', 'released')
                   AND COALESCE(assignment_version, 0) != ?2",
                crate::params![id, current],
                |r| r.get(0),
            )?;
            Ok((versions, counts, stale))
        })
        .await?;
    let versions: Vec<serde_json::Value> = versions
        .into_iter()
        .map(|v| {
            let n = counts.get(&v.version).copied().unwrap_or(0);
            let mut j = serde_json::to_value(&v).unwrap_or_default();
            j["submissions"] = n.into();
            j["current"] = (v.version == current).into();
            j
        })
        .collect();
    Ok(Json(serde_json::json!({
        "current": current,
        "needs_rescore": stale,
        "versions": versions,
    })))
}

/// `POST /api/v1/assignments/{id}/rescore`: brings every graded submission
/// to the current version ([`jobs::start_rescore`]); 202 with the batch.
pub(super) async fn rescore(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<crate::jobs::Rescore>)> {
    let a = load_assignment(&st, &mut c, id.clone()).await?;
    require_manage(&c, &a.context_id)?;
    let actor = c.actor();
    let r = st
        .store
        .write(move |tx| crate::jobs::start_rescore(tx, &id, &actor))
        .await?;
    st.scheduler.poke();
    Ok((StatusCode::ACCEPTED, Json(r)))
}

/// `GET /api/v1/assignments/{id}/rescores`: the assignment's rescores,
/// newest first, with progress (`done` of `total`, `failed`).
pub(super) async fn list_rescores(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<crate::jobs::Rescore>>> {
    let a = load_assignment(&st, &mut c, id.clone()).await?;
    require_manage(&c, &a.context_id)?;
    Ok(Json(
        st.store
            .read(move |conn| crate::jobs::rescores(conn, &id))
            .await?,
    ))
}

pub(super) async fn delete_assignment(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let existing = load_assignment(&st, &mut c, id.clone()).await?;
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
pub(super) struct UploadQuery {
    filename: Option<String>,
}

pub(super) async fn upload(
    State(st): State<AppState>,
    Session(c): Session,
    ClientIp(ip): ClientIp,
    Path(assignment_id): Path<String>,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<SubmissionView>)> {
    let result = match st.limits.check(Limited::Upload, ip, Some(&c.sub)) {
        Ok(()) => upload_inner(&st, &c, assignment_id, q, req).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(_) => st.metrics.uploads.inc(),
        Err(e) => {
            let (_, code) = super::error::status_and_code(e);
            st.metrics.uploads_rejected.with_label_values(&[code]).inc();
        }
    }
    result
}

/// `intake.max_bytes_per_user_per_day`: the user's uploads in the last 24
/// hours (what is stored of them; deleted media still counts).
async fn daily_quota(st: &AppState, c: &Claims) -> Result<()> {
    let limit = st.config.intake.max_bytes_per_user_per_day;
    if limit == 0 {
        return Ok(());
    }
    let user = c.sub.clone();
    let since = crate::clock::now_ms() - 24 * 3600 * 1000;
    let (used, oldest) = st
        .store
        .read(move |conn| domain::uploaded_since(conn, &user, since))
        .await?;
    if used < limit {
        return Ok(());
    }
    let retry_after_secs = oldest
        .map(|t| ((t + 24 * 3600 * 1000 - crate::clock::now_ms()) / 1000).max(1) as u64)
        .unwrap_or(3600);
    Err(Error::Intake(IntakeError::DailyQuota {
        used_mib: used / (1024 * 1024),
        limit_mib: limit / (1024 * 1024),
        retry_after_secs,
    }))
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
    let mut c = c.clone();
    let assignment = load_assignment(st, &mut c, assignment_id).await?;
    let upload_key = upload_key(req.headers())?;
    // A retry of an upload that already landed: that submission, not a
    // second one (the body is not read again).
    if let Some(key) = upload_key.clone()
        && let Some(sub) = submission_by_key(st, &assignment.id, &c.sub, key).await?
    {
        tracing::info!(submission = %sub.id, "upload retried with a known idempotency key");
        return Ok((StatusCode::OK, Json(view(st, &c, sub, None))));
    }
    // An attempt past the assignment's limit is refused before a byte is
    // read (and again when the attempt is written, against a race).
    if let Some(max) = assignment.max_attempts {
        let (a, u) = (assignment.id.clone(), c.sub.clone());
        let made = st
            .store
            .read(move |conn| domain::attempts_made(conn, &a, &u))
            .await?;
        if made >= max {
            return Err(domain::attempts_used_up(max));
        }
    }
    let limits = IntakeLimits::from(&st.config.intake);
    // Fair use, before a byte is written: uploads at once (this user's and
    // everyone's), then bytes in the last 24 hours.
    let _admitted = st.intake.admit(&c.sub, &limits)?;
    daily_quota(st, &c).await?;
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
                break intake::receive_reserved(
                    Box::pin(field),
                    &hint,
                    &limits,
                    &staging,
                    &st.intake.reserve,
                )
                .await?;
            }
        }
    } else {
        let hint = UploadHint {
            filename: q.filename.clone(),
            content_type,
            content_length,
        };
        let stream = req.into_body().into_data_stream();
        intake::receive_reserved(
            Box::pin(stream),
            &hint,
            &limits,
            &staging,
            &st.intake.reserve,
        )
        .await?
    };
    let sub_id = new_id("sub");
    let final_dir = st.config.media_dir().join(&sub_id);
    let sha256 = staged.sha256.clone();
    let size_bytes = staged.size_bytes;
    let original_name = staged.original_name.clone();
    let format = staged.extension.clone();
    let info = staged.info.clone();
    let media_json = serde_json::to_string(&info).map_err(|e| Error::Internal(e.to_string()))?;
    let m = staged.commit(&final_dir).await?;
    let new = jobs::NewSubmission {
        id: sub_id.clone(),
        assignment_id: assignment.id.clone(),
        context_id: assignment.context_id.clone(),
        user_id: c.sub.clone(),
        user_name: c.name.clone(),
        roles: c.roles.clone(),
        upload_key: upload_key.clone(),
        original_name,
        media_dir: m.dir.display().to_string(),
        original_path: m.original.display().to_string(),
        wav_path: m.wav.display().to_string(),
        sha256,
        size_bytes,
        duration_seconds: info.duration_seconds,
        media_info: media_json,
        max_attempts: assignment.max_attempts,
    };
    let insert = st
        .store
        .write(move |tx| jobs::accept_upload(tx, &new))
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
        bytes = sub.size_bytes, seconds = sub.duration_seconds, %format, "accepted upload");
    Ok((status, Json(view(st, &c, sub, None))))
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
                    crate::params![a, u, key],
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
    if !c.can_manage(&s.context_id) {
        // Grades and model judgements wait for release.
        s.redact_for_learner();
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

async fn batch_of(st: &AppState, s: &Submission) -> Result<Option<BatchProgress>> {
    match s.batch_id {
        Some(b) => Ok(Some(
            st.store.read(move |c| jobs::batch_progress(c, b)).await?,
        )),
        None => Ok(None),
    }
}

pub(super) async fn get_submission(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<SubmissionView>> {
    let s = load_readable(&st, &mut c, id).await?;
    let batch = batch_of(&st, &s).await?;
    Ok(Json(view(&st, &c, s, batch)))
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    user: Option<String>,
    context: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list_submissions(
    State(st): State<AppState>,
    Session(mut c): Session,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<SubmissionView>>> {
    let ctx = context_for(&st, &mut c, q.context.as_deref()).await?;
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

pub(super) async fn list_assignment_submissions(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<SubmissionView>>> {
    let a = load_assignment(&st, &mut c, id).await?;
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
pub(super) struct TicketRequest {
    /// "events" or "media:<submission id>".
    scope: String,
}

#[derive(Serialize)]
pub(super) struct TicketResponse {
    ticket: String,
    expires_in: u64,
}

pub(super) async fn ticket(
    State(st): State<AppState>,
    Session(mut c): Session,
    ClientIp(ip): ClientIp,
    Json(req): Json<TicketRequest>,
) -> Result<Json<TicketResponse>> {
    st.limits.check(Limited::Ticket, ip, Some(&c.sub))?;
    if let Some(id) = req.scope.strip_prefix("media:") {
        load_readable(&st, &mut c, id.to_owned()).await?;
    } else if req.scope != "events" {
        return Err(Error::bad_request(
            "bad_scope",
            "scope must be \"events\" or \"media:<submission id>\"",
        ));
    }
    let ttl = st.sessions.ticket_ttl();
    let ticket = st
        .store
        .write(move |tx| crate::auth::issue_ticket(tx, &c, &req.scope, ttl))
        .await?;
    Ok(Json(TicketResponse {
        ticket,
        expires_in: ttl.as_secs(),
    }))
}

#[derive(Deserialize)]
pub(super) struct EventsQuery {
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
    /// Why it waits although it could run (its model cannot start).
    paused: Option<String>,
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

pub(super) async fn events(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let mut c = claims_from(&st, &headers, q.ticket.as_deref(), "events").await?;
    // Held by the stream: its place is given back when the client goes.
    let slot = st.limits.open_stream(&c.sub)?;
    let rx = st.scheduler.subscribe();
    let stream: futures::stream::BoxStream<'static, std::result::Result<Event, Infallible>> =
        match q.submission {
            Some(id) => {
                let s = load_readable(&st, &mut c, id).await?;
                submission_stream(st.clone(), s, rx).boxed()
            }
            None => global_stream(rx).boxed(),
        };
    let stream = stream
        .map(move |e| {
            let _held = &slot;
            e
        })
        .boxed();
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
                eta_seconds: entry.as_ref().and_then(|e| e.eta_seconds),
                batch,
                failure_reason: s.sub.failure_reason.clone(),
                paused: entry.as_ref().and_then(|e| e.paused.clone()),
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

pub(super) async fn media(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TicketQuery>,
) -> Result<Response> {
    let s = load_media(&st, &headers, &q, id).await?;
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

/// `GET /api/v1/assignments/{id}/audit`: who changed the assignment's
/// rubric or plugin, rescored or released its grades (staff), newest first.
pub(super) async fn assignment_audit(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let a = load_assignment(&st, &mut c, id.clone()).await?;
    require_manage(&c, &a.context_id)?;
    let entries = st
        .store
        .read(move |conn| domain::assignment_audit(conn, &id, 500))
        .await?;
    Ok(Json(serde_json::to_value(entries).unwrap_or_default()))
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
