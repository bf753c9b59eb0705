//! What instructors do with submissions beyond reading them: override a
//! grade awaiting review (recorded in the audit log), retry a failed
//! submission, release one grade or all of an assignment's, follow grade
//! passback, the course's queue dashboard and roster, a submission's audit
//! trail, and playable previews of uploads browsers cannot play.
//!
//! Roles: learners reach none of these routes except `preview` (their own
//! submissions); instructors act on their context; admins on every context.
//! Another context's submission is "not found", as in the core API. The
//! state changes themselves are functions of `jobs`.

use std::time::Duration;

use crate::db::{Connection, params};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::access::{Session, TicketQuery, load_managed, load_managed_assignment, load_media};
use crate::clock::now_ms;
use crate::domain::{self, SubmissionState};
use crate::error::{Error, Result};
use crate::grades::{Change, OverrideRequest};
use crate::intake::{self, IntakeError, IntakeLimits};
use crate::jobs;
use crate::passback::{OutboxView, outbox_rows};

// ---- override ----------------------------------------------------------------------

#[derive(Serialize)]
pub(super) struct OverrideResponse {
    id: String,
    score: serde_json::Value,
    changes: Vec<Change>,
}

pub(super) async fn override_grade(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
    Json(req): Json<OverrideRequest>,
) -> Result<Json<OverrideResponse>> {
    load_managed(&st, &mut c, id.clone()).await?;
    let actor = c.actor();
    let sid = id.clone();
    let (score, changes) = st
        .store
        .write(move |tx| {
            let out = jobs::override_grade(tx, &sid, &actor, &req)?;
            // The instructor's points are calibration data too.
            crate::calibration::record_override(tx, &sid, &actor, &req)?;
            Ok(out)
        })
        .await?;
    Ok(Json(OverrideResponse { id, score, changes }))
}

// ---- retry -------------------------------------------------------------------------

#[derive(Serialize)]
pub(super) struct RetryResponse {
    id: String,
    state: SubmissionState,
}

pub(super) async fn retry(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<RetryResponse>> {
    load_managed(&st, &mut c, id.clone()).await?;
    let actor = c.actor();
    let sid = id.clone();
    let state = st
        .store
        .write(move |tx| jobs::retry(tx, &sid, &actor))
        .await?;
    st.scheduler.poke();
    Ok(Json(RetryResponse { id, state }))
}

// ---- release and passback ----------------------------------------------------------

#[derive(Serialize)]
pub(super) struct Released {
    id: String,
    state: SubmissionState,
    released_at: i64,
}

pub(super) async fn release(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Released>> {
    load_managed(&st, &mut c, id.clone()).await?;
    let actor = c.actor();
    let now = now_ms();
    let sid = id.clone();
    st.store
        .write(move |tx| {
            if jobs::release(tx, &sid, &actor, now, "release")? {
                return Ok(());
            }
            let state: String =
                tx.query_row("SELECT state FROM submissions WHERE id = ?1", [&sid], |r| {
                    r.get(0)
                })?;
            Err(Error::Conflict {
                code: "not_awaiting_review",
                message: format!(
                    "submission {sid} is {state}; only a grade awaiting review can be released"
                ),
            })
        })
        .await?;
    st.lti.passback_wake.notify_one();
    st.scheduler.poke();
    Ok(Json(Released {
        id,
        state: SubmissionState::Released,
        released_at: now,
    }))
}

pub(super) async fn passback_status(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<OutboxView>>> {
    load_managed(&st, &mut c, id.clone()).await?;
    Ok(Json(
        st.store.read(move |conn| outbox_rows(conn, &id)).await?,
    ))
}

// ---- release all -------------------------------------------------------------------

#[derive(Serialize)]
pub(super) struct ReleaseAll {
    released: Vec<String>,
}

pub(super) async fn release_all(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<ReleaseAll>> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let actor = c.actor();
    let released = st
        .store
        .write(move |tx| {
            let ids: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT id FROM submissions WHERE assignment_id = ?1 AND state = 'awaiting_review'
                     ORDER BY created_at, id",
                )?;
                stmt.query_map([&a.id], |r| r.get(0))?
                    .collect::<crate::db::Result<_>>()?
            };
            let now = now_ms();
            let mut out = Vec::new();
            for id in ids {
                if jobs::release(tx, &id, &actor, now, "release_all")? {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await?;
    if !released.is_empty() {
        st.lti.passback_wake.notify_one();
        st.scheduler.poke();
    }
    Ok(Json(ReleaseAll { released }))
}

// ---- dashboard and roster ------------------------------------------------------------

#[derive(Serialize)]
struct DashboardRow {
    submission_id: String,
    user_id: String,
    user_name: String,
    attempt: i64,
    state: SubmissionState,
    phase: &'static str,
    position: Option<usize>,
    queue_length: Option<usize>,
    eta_seconds: Option<f64>,
    running: bool,
    retrying: bool,
    /// Why it waits although it could run (its model cannot start).
    paused: Option<String>,
    failure_code: Option<String>,
    failure_reason: Option<String>,
    needs_review: bool,
    review_reasons: Vec<String>,
    total: Option<f64>,
    max: Option<f64>,
    duration_seconds: f64,
    created_at: i64,
}

#[derive(Serialize)]
pub(super) struct Dashboard {
    assignment_id: String,
    title: String,
    system_phase: &'static str,
    batch: Option<crate::jobs::BatchProgress>,
    stt_queue: usize,
    eval_queue: usize,
    /// Models that cannot start now, with the worker's own error: the
    /// instructor's alert (their students' submissions wait, paused).
    unavailable: Vec<crate::eta::Unavailable>,
    counts: std::collections::BTreeMap<&'static str, usize>,
    rows: Vec<DashboardRow>,
}

fn user_names(conn: &Connection, ctx: &str) -> Result<std::collections::HashMap<String, String>> {
    let mut stmt = conn.prepare(
        "SELECT u.id, u.name FROM users u JOIN memberships m ON m.user_id = u.id
         WHERE m.context_id = ?1",
    )?;
    let rows = stmt
        .query_map([ctx], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<crate::db::Result<_>>()?;
    Ok(rows)
}

pub(super) async fn dashboard(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Dashboard>> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let filter = domain::SubmissionFilter {
        context_id: Some(a.context_id.clone()),
        assignment_id: Some(a.id.clone()),
        user_id: None,
        limit: None,
    };
    let ctx = a.context_id.clone();
    let (subs, names) = st
        .store
        .read(move |conn| {
            Ok((
                domain::list_submissions(conn, &filter)?,
                user_names(conn, &ctx)?,
            ))
        })
        .await?;
    let snap = st.scheduler.snapshot();
    let mut counts = std::collections::BTreeMap::new();
    let mut rows: Vec<DashboardRow> = subs
        .into_iter()
        .map(|s| {
            let q = snap.entries.get(&s.id);
            *counts.entry(s.state.as_str()).or_insert(0) += 1;
            let score = s.score.as_ref();
            DashboardRow {
                user_name: names.get(&s.user_id).cloned().unwrap_or_default(),
                phase: q.map(|q| q.phase).unwrap_or_else(|| s.state.phase()),
                position: q.map(|q| q.position),
                queue_length: q.map(|q| q.queue_length),
                eta_seconds: q.and_then(|q| q.eta_seconds),
                running: q.is_some_and(|q| q.running),
                retrying: q.is_some_and(|q| q.retrying),
                paused: q.and_then(|q| q.paused.clone()),
                needs_review: score
                    .and_then(|v| v["needs_review"].as_bool())
                    .unwrap_or(false),
                review_reasons: score
                    .and_then(|v| {
                        v["reasons"]
                            .as_array()
                            .or_else(|| v["report"]["review_reasons"].as_array())
                    })
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                total: score.and_then(|v| v["total"].as_f64()),
                max: score.and_then(|v| v["max"].as_f64()),
                submission_id: s.id,
                user_id: s.user_id,
                attempt: s.attempt,
                state: s.state,
                failure_code: s.failure_code,
                failure_reason: s.failure_reason,
                duration_seconds: s.duration_seconds,
                created_at: s.created_at,
            }
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    Ok(Json(Dashboard {
        assignment_id: a.id,
        title: a.title,
        system_phase: snap.phase,
        batch: snap.batch.clone(),
        stt_queue: snap.stt_queue,
        eval_queue: snap.eval_queue,
        unavailable: snap.unavailable.values().cloned().collect(),
        counts,
        rows,
    }))
}

#[derive(Serialize)]
pub(super) struct RosterEntry {
    user_id: String,
    name: String,
    roles: Vec<String>,
    learner: bool,
    submitted: bool,
}

/// The people Viva knows in the course (everyone who launched or submitted),
/// marking who has submitted. With an LMS, `/api/v1/lti/members` (Names and
/// Roles) also knows those who never opened the assignment.
pub(super) async fn roster(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<RosterEntry>>> {
    let a = load_managed_assignment(&st, &mut c, id).await?;
    let rows = st
        .store
        .read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT u.id, u.name, m.roles,
                        EXISTS(SELECT 1 FROM submissions s WHERE s.user_id = u.id AND s.assignment_id = ?2)
                 FROM memberships m JOIN users u ON u.id = m.user_id
                 WHERE m.context_id = ?1 ORDER BY u.name, u.id",
            )?;
            let rows = stmt
                .query_map(params![a.context_id, a.id], |r| {
                    let roles: String = r.get(2)?;
                    let roles: Vec<String> = roles
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                    Ok(RosterEntry {
                        user_id: r.get(0)?,
                        name: r.get(1)?,
                        learner: !roles.iter().any(|r| r == "instructor" || r == "admin"),
                        roles,
                        submitted: r.get(3)?,
                    })
                })?
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    Ok(Json(rows))
}

// ---- audit ---------------------------------------------------------------------------

pub(super) async fn submission_audit(
    State(st): State<AppState>,
    Session(mut c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<domain::AuditEntry>>> {
    load_managed(&st, &mut c, id.clone()).await?;
    Ok(Json(
        st.store
            .read(move |conn| domain::audit_entries(conn, Some(&id), 500))
            .await?,
    ))
}

// ---- playable preview ---------------------------------------------------------------

/// The submission's media in a form the browser can play: the original when
/// it can, else the normalised audio, else an MP4 made on first view and
/// kept next to the original (deleted with it).
pub(super) async fn preview(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TicketQuery>,
) -> Result<Response> {
    let s = load_media(&st, &headers, &q, id).await?;
    let original = s
        .original_path
        .clone()
        .filter(|_| s.media_available)
        .ok_or(Error::NotFound(
            "media (deleted after the retention period)",
        ))?;
    let original = std::path::PathBuf::from(original);
    let ext = original
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (path, ct, how) = match intake::playable(&s.media_info, &ext) {
        intake::Playable::Original(ct) => (original, ct, "original"),
        intake::Playable::Wav => (
            s.wav_path
                .clone()
                .map(std::path::PathBuf::from)
                .ok_or(Error::NotFound("media"))?,
            "audio/wav",
            "audio",
        ),
        intake::Playable::Transcode => {
            let dir = original
                .parent()
                .map(std::path::Path::to_path_buf)
                .ok_or(Error::NotFound("media"))?;
            let limits = IntakeLimits::from(&st.config.intake);
            let timeout = limits.timeout.min(Duration::from_secs(600));
            let out = intake::transcode_preview(&limits, &original, &dir, timeout)
                .await
                .map_err(|e| match e {
                    IntakeError::Timeout { seconds } => Error::Unavailable(format!(
                        "making a playable copy took longer than {seconds} s; download the original instead"
                    )),
                    IntakeError::Undecodable { .. } => Error::Unavailable(
                        "this recording cannot be converted for the browser; download the original instead"
                            .into(),
                    ),
                    e => Error::Intake(e),
                })?;
            (out, "video/mp4", "transcoded")
        }
    };
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Error::NotFound("media"))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, ct.to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
            (
                header::HeaderName::from_static("x-viva-preview"),
                how.to_owned(),
            ),
        ],
        body,
    )
        .into_response())
}
