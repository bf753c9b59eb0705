//! What the web widget's instructor and admin views need beyond the core
//! API: a grade override (per-criterion points and feedback) recorded in the
//! audit log, retry of a failed submission, release of every grade awaiting
//! review, the course's queue dashboard and roster, playable previews of
//! uploads browsers cannot play, and the administrator's view of models,
//! workers, plugin failures, health and the audit log.
//!
//! Roles: learners reach none of these routes except `preview` (their own
//! submissions); instructors act on their context; admins on every context.
//! Another context's submission is "not found", as in the core API.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{Connection, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::auth::{Claims, Session};
use crate::domain::{self, Submission, SubmissionState};
use crate::error::{Error, Result};
use crate::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/submissions/{id}/override", post(override_grade))
        .route("/api/v1/submissions/{id}/retry", post(retry))
        .route("/api/v1/submissions/{id}/audit", get(submission_audit))
        .route("/api/v1/submissions/{id}/preview", get(preview))
        .route("/api/v1/assignments/{id}/release-all", post(release_all))
        .route("/api/v1/assignments/{id}/dashboard", get(dashboard))
        .route("/api/v1/assignments/{id}/roster", get(roster))
        .route("/api/v1/admin/system", get(admin_system))
        .route("/api/v1/admin/audit", get(admin_audit))
        .route("/api/v1/admin/plugin-failures", get(plugin_failures))
}

/// A submission the caller may manage (course instructor or admin).
async fn load_managed(st: &AppState, c: &Claims, id: String) -> Result<Submission> {
    let s = st
        .store
        .read(move |conn| domain::get_submission(conn, &id))
        .await?
        .ok_or(Error::NotFound("submission"))?;
    if !c.can_read(&s) {
        return Err(Error::NotFound("submission"));
    }
    if !c.can_manage(&s.context_id) {
        return Err(Error::Forbidden(
            "only the course's instructors can do this; ask your instructor".into(),
        ));
    }
    Ok(s)
}

fn require_manage(c: &Claims, ctx: &str) -> Result<()> {
    if c.can_manage(ctx) {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only the course's instructors can see this".into(),
        ))
    }
}

fn require_admin(c: &Claims) -> Result<()> {
    if c.is_admin() {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "only an administrator can see this; sign in from the platform as an administrator"
                .into(),
        ))
    }
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
    require_manage(c, &a.context_id)?;
    Ok(a)
}

// ---- override ----------------------------------------------------------------------

/// Body of `POST /api/v1/submissions/{id}/override`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideRequest {
    #[serde(default)]
    pub criteria: Vec<CriterionOverride>,
    /// Replaces the overall feedback.
    #[serde(default)]
    pub feedback: Option<String>,
    /// Why, for the audit log.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriterionOverride {
    pub criterion_id: String,
    /// Points before the criterion's weight.
    #[serde(default)]
    pub points: Option<f64>,
    #[serde(default)]
    pub feedback: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Change {
    pub criterion_id: Option<String>,
    pub field: &'static str,
    pub from: serde_json::Value,
    pub to: serde_json::Value,
}

/// Applies an override to a stored score (`{total, max, needs_review,
/// reasons, report: {criteria, feedback, …}}` as the scheduler stores it, or
/// a bare report); returns the changes. The total is recomputed as the
/// weighted sum of the criteria's points, in both places.
pub fn apply_override(
    rubric: &viva_models::Rubric,
    score: &mut serde_json::Value,
    req: &OverrideRequest,
) -> Result<Vec<Change>> {
    if !score.is_object() {
        return Err(no_score());
    }
    let old_total = score["total"].as_f64().unwrap_or(0.0);
    let max = rubric.max_points();
    let wrapped = score["report"].is_object();
    let report = if wrapped {
        &mut score["report"]
    } else {
        &mut *score
    };
    let (changes, total) = override_report(rubric, report, req, old_total)?;
    report["total"] = serde_json::json!(total);
    report["max"] = serde_json::json!(max);
    if wrapped {
        score["total"] = serde_json::json!(total);
        score["max"] = serde_json::json!(max);
    }
    Ok(changes)
}

fn no_score() -> Error {
    Error::Conflict {
        code: "no_score",
        message: "this submission has no score to change; retry it or wait for scoring".into(),
    }
}

fn override_report(
    rubric: &viva_models::Rubric,
    report: &mut serde_json::Value,
    req: &OverrideRequest,
    old_total: f64,
) -> Result<(Vec<Change>, f64)> {
    let obj = report.as_object_mut().ok_or_else(no_score)?;
    let mut changes = Vec::new();
    let criteria = obj
        .entry("criteria")
        .or_insert_with(|| serde_json::json!([]));
    if !criteria.is_array() {
        *criteria = serde_json::json!([]);
    }
    let list = criteria
        .as_array_mut()
        .ok_or(Error::Internal("score criteria are not a list".into()))?;
    for o in &req.criteria {
        let c = rubric
            .criteria
            .iter()
            .find(|c| c.id == o.criterion_id)
            .ok_or_else(|| {
                Error::bad_request(
                    "unknown_criterion",
                    format!(
                        "the rubric has no criterion {:?}; reload the page to see the current rubric",
                        o.criterion_id
                    ),
                )
            })?;
        let max = c.levels.iter().map(|l| l.points).fold(0.0, f64::max);
        let idx = match list
            .iter()
            .position(|x| x["criterion_id"].as_str() == Some(c.id.as_str()))
        {
            Some(i) => i,
            None => {
                list.push(serde_json::json!({
                    "criterion_id": c.id, "points": 0.0, "level": null, "feedback": ""
                }));
                list.len() - 1
            }
        };
        let entry = &mut list[idx];
        if let Some(p) = o.points {
            if !p.is_finite() || p < 0.0 || p > max {
                return Err(Error::bad_request(
                    "points_out_of_range",
                    format!(
                        "points for {} must be between 0 and {max}; you gave {p}",
                        c.title
                    ),
                ));
            }
            let old = entry["points"].as_f64().unwrap_or(0.0);
            if (old - p).abs() > 1e-9 {
                changes.push(Change {
                    criterion_id: Some(c.id.clone()),
                    field: "points",
                    from: serde_json::json!(old),
                    to: serde_json::json!(p),
                });
                entry["points"] = serde_json::json!(p);
                let level = c
                    .levels
                    .iter()
                    .find(|l| (l.points - p).abs() < 1e-9)
                    .map(|l| l.label.clone());
                entry["level"] = serde_json::json!(level);
            }
        }
        if let Some(f) = &o.feedback {
            let old = entry["feedback"].as_str().unwrap_or_default().to_owned();
            if old != *f {
                changes.push(Change {
                    criterion_id: Some(c.id.clone()),
                    field: "feedback",
                    from: serde_json::json!(old),
                    to: serde_json::json!(f),
                });
                entry["feedback"] = serde_json::json!(f);
            }
        }
    }
    let total: f64 = rubric
        .criteria
        .iter()
        .map(|c| {
            let p = list
                .iter()
                .find(|x| x["criterion_id"].as_str() == Some(c.id.as_str()))
                .and_then(|x| x["points"].as_f64())
                .unwrap_or(0.0);
            c.weight * p
        })
        .sum();
    if let Some(f) = &req.feedback {
        let old = obj
            .get("feedback")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if old != *f {
            changes.push(Change {
                criterion_id: None,
                field: "feedback",
                from: serde_json::json!(old),
                to: serde_json::json!(f),
            });
            obj.insert("feedback".into(), serde_json::json!(f));
        }
    }
    if (old_total - total).abs() > 1e-9 {
        changes.push(Change {
            criterion_id: None,
            field: "total",
            from: serde_json::json!(old_total),
            to: serde_json::json!(total),
        });
    }
    Ok((changes, total))
}

#[derive(Serialize)]
struct OverrideResponse {
    id: String,
    score: serde_json::Value,
    changes: Vec<Change>,
}

async fn override_grade(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
    Json(req): Json<OverrideRequest>,
) -> Result<Json<OverrideResponse>> {
    load_managed(&st, &c, id.clone()).await?;
    let actor = c.actor();
    let sid = id.clone();
    let (score, changes) = st
        .store
        .write(move |tx| {
            let s = domain::get_submission(tx, &sid)?.ok_or(Error::NotFound("submission"))?;
            if s.state != SubmissionState::AwaitingReview {
                return Err(Error::Conflict {
                    code: "not_awaiting_review",
                    message: format!(
                        "this grade is {}; only a grade awaiting review can be changed",
                        s.state.as_str().replace('_', " ")
                    ),
                });
            }
            let a = domain::get_assignment(tx, &s.assignment_id)?
                .ok_or(Error::NotFound("assignment"))?;
            let mut score = s.score.unwrap_or(serde_json::Value::Null);
            let changes = apply_override(&a.rubric, &mut score, &req)?;
            if changes.is_empty() {
                return Err(Error::bad_request(
                    "nothing_changed",
                    "the override changes nothing: edit points or feedback first",
                ));
            }
            let now = now_ms();
            if let Some(o) = score.as_object_mut() {
                o.insert(
                    "override".into(),
                    serde_json::json!({ "by": actor, "at": now, "note": req.note }),
                );
            }
            tx.execute(
                "UPDATE submissions SET score = ?2, updated_at = ?3 WHERE id = ?1",
                params![sid, score.to_string(), now],
            )?;
            domain::audit(
                tx,
                &actor,
                "submission.override",
                &sid,
                serde_json::json!({ "changes": changes, "note": req.note }),
            )?;
            Ok((score, changes))
        })
        .await?;
    Ok(Json(OverrideResponse { id, score, changes }))
}

// ---- retry -------------------------------------------------------------------------

#[derive(Serialize)]
struct RetryResponse {
    id: String,
    state: SubmissionState,
}

/// Puts a failed submission back where it failed: its failed jobs are queued
/// again with fresh attempts; an STT retry joins the next batch.
pub fn retry_in_tx(tx: &Transaction<'_>, id: &str, actor: &str) -> Result<SubmissionState> {
    let s = domain::get_submission(tx, id)?.ok_or(Error::NotFound("submission"))?;
    if s.state != SubmissionState::Failed {
        return Err(Error::Conflict {
            code: "not_failed",
            message: format!(
                "this submission is {}; only a failed one can be retried",
                s.state.as_str().replace('_', " ")
            ),
        });
    }
    let undone = |stage: &str| -> Result<i64> {
        Ok(tx.query_row(
            "SELECT COUNT(*) FROM jobs WHERE submission_id = ?1 AND stage = ?2 AND state != 'done'",
            params![id, stage],
            |r| r.get(0),
        )?)
    };
    let stt_done: i64 = tx.query_row(
        "SELECT COUNT(*) FROM jobs WHERE submission_id = ?1 AND stage = 'stt' AND state = 'done'",
        [id],
        |r| r.get(0),
    )?;
    let state = if stt_done == 0 {
        if !s.media_available || s.wav_path.is_none() {
            return Err(Error::Conflict {
                code: "media_purged",
                message: "the recording was deleted after the retention period; the student must submit again".into(),
            });
        }
        SubmissionState::Queued
    } else if undone("eval")? > 0 {
        SubmissionState::Transcribed
    } else {
        SubmissionState::Evaluated
    };
    let now = now_ms();
    tx.execute(
        "UPDATE jobs SET state = 'queued', attempts = 0, not_before = 0, lease_owner = NULL,
                lease_expires_at = NULL, started_at = NULL, finished_at = NULL
         WHERE submission_id = ?1 AND state = 'failed'",
        [id],
    )?;
    if state == SubmissionState::Queued {
        // A fresh STT job, if the upload's was never created.
        tx.execute(
            "INSERT INTO jobs (submission_id, stage, state, created_at) VALUES (?1, 'stt', 'queued', ?2)
             ON CONFLICT DO NOTHING",
            params![id, now],
        )?;
    }
    if state == SubmissionState::Evaluated {
        tx.execute(
            "INSERT INTO jobs (submission_id, stage, role, state, created_at)
             VALUES (?1, 'score', '', 'queued', ?2) ON CONFLICT DO NOTHING",
            params![id, now],
        )?;
    }
    let batch_clear = if state == SubmissionState::Queued {
        ", batch_id = NULL"
    } else {
        ""
    };
    tx.execute(
        &format!(
            "UPDATE submissions SET state = ?2, failure_code = NULL, failure_reason = NULL,
                 finished_at = NULL, updated_at = ?3{batch_clear} WHERE id = ?1"
        ),
        params![id, state.as_str(), now],
    )?;
    domain::audit(
        tx,
        actor,
        "submission.retry",
        id,
        serde_json::json!({ "from": "failed", "to": state.as_str(), "failure": s.failure_reason }),
    )?;
    Ok(state)
}

async fn retry(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<RetryResponse>> {
    load_managed(&st, &c, id.clone()).await?;
    let actor = c.actor();
    let sid = id.clone();
    let state = st
        .store
        .write(move |tx| retry_in_tx(tx, &sid, &actor))
        .await?;
    st.scheduler.poke();
    Ok(Json(RetryResponse { id, state }))
}

// ---- release all -------------------------------------------------------------------

#[derive(Serialize)]
struct ReleaseAll {
    released: Vec<String>,
}

async fn release_all(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<ReleaseAll>> {
    let a = load_assignment(&st, &c, id).await?;
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
                    .collect::<rusqlite::Result<_>>()?
            };
            let now = now_ms();
            let mut out = Vec::new();
            for id in ids {
                if crate::passback::release_in_tx(tx, &id, &actor, now, "release_all")? {
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
struct Dashboard {
    assignment_id: String,
    title: String,
    system_phase: &'static str,
    batch: Option<crate::jobs::BatchProgress>,
    stt_queue: usize,
    eval_queue: usize,
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
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

async fn dashboard(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<Dashboard>> {
    let a = load_assignment(&st, &c, id).await?;
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
                eta_seconds: q.map(|q| q.eta_seconds),
                running: q.is_some_and(|q| q.running),
                retrying: q.is_some_and(|q| q.retrying),
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
        counts,
        rows,
    }))
}

#[derive(Serialize)]
struct RosterEntry {
    user_id: String,
    name: String,
    roles: Vec<String>,
    learner: bool,
    submitted: bool,
}

/// The people Viva knows in the course (everyone who launched or submitted),
/// marking who has submitted. With an LMS, `/api/v1/lti/members` (Names and
/// Roles) also knows those who never opened the assignment.
async fn roster(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<RosterEntry>>> {
    let a = load_assignment(&st, &c, id).await?;
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
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    Ok(Json(rows))
}

// ---- audit ---------------------------------------------------------------------------

#[derive(Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: serde_json::Value,
}

pub fn audit_entries(
    conn: &Connection,
    subject: Option<&str>,
    limit: u32,
) -> Result<Vec<AuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at, actor, action, subject, details FROM audit_log
         WHERE (?1 IS NULL OR subject = ?1) ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![subject, limit], |r| {
            let details: String = r.get(5)?;
            Ok(AuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                subject: r.get(4)?,
                details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

async fn submission_audit(
    State(st): State<AppState>,
    Session(c): Session,
    Path(id): Path<String>,
) -> Result<Json<Vec<AuditEntry>>> {
    load_managed(&st, &c, id.clone()).await?;
    Ok(Json(
        st.store
            .read(move |conn| audit_entries(conn, Some(&id), 500))
            .await?,
    ))
}

#[derive(Deserialize)]
struct AuditQuery {
    subject: Option<String>,
    limit: Option<u32>,
}

async fn admin_audit(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>> {
    require_admin(&c)?;
    let limit = q.limit.unwrap_or(100).min(1000);
    Ok(Json(
        st.store
            .read(move |conn| audit_entries(conn, q.subject.as_deref(), limit))
            .await?,
    ))
}

// ---- admin: system, plugin failures ---------------------------------------------------

#[derive(Serialize)]
struct ModelRow {
    kind: viva_models::WorkerKind,
    role: Option<String>,
    model: String,
    model_file: String,
    memory_mb: u64,
    loaded: bool,
    process: Option<crate::workers::ProcessInfo>,
}

#[derive(Serialize)]
struct System {
    version: &'static str,
    policy: &'static str,
    phase: &'static str,
    phase_since_ms: i64,
    gpu_memory_budget_mb: u64,
    ready: bool,
    problems: Vec<String>,
    data_dir: String,
    free_bytes: Option<u64>,
    queues: serde_json::Value,
    models: Vec<ModelRow>,
    worker_errors: std::collections::BTreeMap<String, String>,
    phase_history: Vec<crate::scheduler::PhaseChange>,
    process_history: Vec<crate::workers::ProcessEvent>,
    stats: crate::status::StatsView,
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn admin_system(State(st): State<AppState>, Session(c): Session) -> Result<Json<System>> {
    require_admin(&c)?;
    let snap = st.scheduler.snapshot();
    let cfg = &st.config;
    let mut models = Vec::new();
    let find = |kind: viva_models::WorkerKind, role: Option<&str>| {
        snap.workers
            .iter()
            .find(|p| p.kind == kind && p.role.as_deref() == role)
            .cloned()
    };
    if let Some(w) = &cfg.workers.stt {
        let process = find(viva_models::WorkerKind::Stt, None)
            .or_else(|| find(viva_models::WorkerKind::Stt, Some("")));
        models.push(ModelRow {
            kind: viva_models::WorkerKind::Stt,
            role: None,
            model: w.model.clone(),
            model_file: file_name(&w.model_path),
            memory_mb: w.memory_mb,
            loaded: process.as_ref().is_some_and(|p| p.state != "starting"),
            process,
        });
    }
    for (role, w) in &cfg.workers.evaluators {
        let process = find(viva_models::WorkerKind::Evaluator, Some(role));
        models.push(ModelRow {
            kind: viva_models::WorkerKind::Evaluator,
            role: Some(role.clone()),
            model: w.model.clone(),
            model_file: file_name(&w.model_path),
            memory_mb: w.memory_mb,
            loaded: process.as_ref().is_some_and(|p| p.state != "starting"),
            process,
        });
    }
    let mut problems = crate::api::readiness_problems(&st).await;
    let data_dir = cfg.data_dir.clone();
    let free_bytes = tokio::task::spawn_blocking(move || crate::intake::free_bytes(&data_dir).ok())
        .await
        .ok()
        .flatten();
    let min_free = cfg.intake.limits().min_free_bytes;
    if free_bytes.is_some_and(|f| f < min_free) {
        problems.push(format!(
            "less than {} MiB free in the data directory: uploads are refused until space is freed",
            min_free / (1024 * 1024)
        ));
    }
    let mut process_history = st.scheduler.supervisor.history();
    let keep = process_history.len().saturating_sub(100);
    process_history.drain(..keep);
    let mut phase_history = st.scheduler.phase_history();
    let keep = phase_history.len().saturating_sub(100);
    phase_history.drain(..keep);
    Ok(Json(System {
        version: env!("CARGO_PKG_VERSION"),
        policy: snap.policy,
        phase: snap.phase,
        phase_since_ms: snap.phase_since_ms,
        gpu_memory_budget_mb: cfg.scheduler.gpu_memory_budget_mb,
        ready: problems.is_empty(),
        problems,
        data_dir: cfg.data_dir.display().to_string(),
        free_bytes,
        queues: serde_json::json!({
            "stt": snap.stt_queue, "eval": snap.eval_queue, "score": snap.score_queue
        }),
        models,
        worker_errors: snap.worker_errors.clone(),
        phase_history,
        process_history,
        stats: snap.stats.clone(),
    }))
}

#[derive(Serialize)]
struct PluginFailure {
    submission_id: String,
    assignment_id: String,
    context_id: String,
    plugin: String,
    attempts: i64,
    error: String,
    at: i64,
    state: String,
}

/// Rubric plugin failures still on record (a job that later succeeded
/// clears its error), newest first.
async fn plugin_failures(
    State(st): State<AppState>,
    Session(c): Session,
) -> Result<Json<Vec<PluginFailure>>> {
    require_admin(&c)?;
    let rows = st
        .store
        .read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT j.submission_id, a.id, a.context_id, a.plugin, j.attempts, j.last_error,
                        COALESCE(j.finished_at, j.started_at, j.created_at), j.state
                 FROM jobs j JOIN submissions s ON s.id = j.submission_id
                 JOIN assignments a ON a.id = s.assignment_id
                 WHERE j.stage = 'score' AND j.last_error IS NOT NULL
                   AND j.last_error NOT LIKE 'cancelled%'
                 ORDER BY 7 DESC LIMIT 50",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(PluginFailure {
                        submission_id: r.get(0)?,
                        assignment_id: r.get(1)?,
                        context_id: r.get(2)?,
                        plugin: r.get(3)?,
                        attempts: r.get(4)?,
                        error: r.get(5)?,
                        at: r.get(6)?,
                        state: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    Ok(Json(rows))
}

// ---- playable preview ---------------------------------------------------------------

#[derive(Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

/// How a browser can play a stored upload.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Playable {
    /// The original, with this content type.
    Original(&'static str),
    /// Audio only, in a format browsers may not play: the normalised WAV.
    Wav,
    /// Video browsers cannot play: transcode to H.264/AAC MP4.
    Transcode,
}

/// Decides from the probe facts (`media_info`) and the stored extension.
pub fn playable(info: &serde_json::Value, ext: &str) -> Playable {
    let has_video = info["has_video"].as_bool().unwrap_or(false);
    let v = info["video_codec"].as_str().unwrap_or_default();
    let a = info["audio_codec"].as_str().unwrap_or_default();
    let audio_ok = |list: &[&str]| a.is_empty() || list.contains(&a);
    match (ext, has_video) {
        ("mp4" | "m4a", true) if v == "h264" && audio_ok(&["aac", "mp3"]) => {
            Playable::Original("video/mp4")
        }
        ("webm", true) if ["vp8", "vp9", "av1"].contains(&v) && audio_ok(&["opus", "vorbis"]) => {
            Playable::Original("video/webm")
        }
        (_, true) => Playable::Transcode,
        ("mp4" | "m4a", false) if audio_ok(&["aac", "mp3"]) => Playable::Original("audio/mp4"),
        ("webm", false) if audio_ok(&["opus", "vorbis"]) => Playable::Original("audio/webm"),
        ("mp3", false) => Playable::Original("audio/mpeg"),
        ("ogg" | "opus", false) if audio_ok(&["opus", "vorbis"]) => Playable::Original("audio/ogg"),
        ("wav", false) => Playable::Original("audio/wav"),
        ("flac", false) => Playable::Original("audio/flac"),
        _ => Playable::Wav,
    }
}

/// One transcode at a time: the machine's cores belong to the models.
fn transcode_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// Transcodes `input` to `<dir>/preview.mp4` once; later calls reuse it.
async fn ensure_preview(
    ffmpeg: &std::path::Path,
    input: &std::path::Path,
    dir: &std::path::Path,
    timeout: Duration,
) -> Result<std::path::PathBuf> {
    let out = dir.join("preview.mp4");
    let _guard = transcode_lock().lock().await;
    if tokio::fs::metadata(&out).await.is_ok() {
        return Ok(out);
    }
    let tmp = dir.join("preview.tmp.mp4");
    let mut cmd = tokio::process::Command::new(ffmpeg);
    cmd.args(["-nostdin", "-y", "-v", "error", "-i"])
        .arg(input)
        .args([
            "-map",
            "0:v:0",
            "-map",
            "0:a:0?",
            "-vf",
            "scale='min(1280,iw)':-2",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "28",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "96k",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
        ])
        .arg(&tmp)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(Error::io(
        "starting ffmpeg for a playable preview (is ffmpeg installed?)",
    ))?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(Error::io("waiting for ffmpeg"))?,
        Err(_) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Error::Unavailable(format!(
                "making a playable copy took longer than {} s; download the original instead",
                timeout.as_secs()
            )));
        }
    };
    if !output.status.success() {
        let _ = tokio::fs::remove_file(&tmp).await;
        let err = String::from_utf8_lossy(&output.stderr);
        tracing::warn!(input = %input.display(), error = %err.trim(), "preview transcode failed");
        return Err(Error::Unavailable(
            "this recording cannot be converted for the browser; download the original instead"
                .into(),
        ));
    }
    tokio::fs::rename(&tmp, &out)
        .await
        .map_err(Error::io("storing the playable preview"))?;
    Ok(out)
}

/// The submission's media in a form the browser can play: the original when
/// it can, else the normalised audio, else an MP4 made on first view and
/// kept next to the original (deleted with it).
async fn preview(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TicketQuery>,
) -> Result<Response> {
    let c = crate::api::claims_from(&st, &headers, q.ticket.as_deref(), &format!("media:{id}"))?;
    let sid = id.clone();
    let s = st
        .store
        .read(move |conn| domain::get_submission(conn, &sid))
        .await?
        .filter(|s| c.can_read(s))
        .ok_or(Error::NotFound("submission"))?;
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
    let (path, ct, how) = match playable(&s.media_info, &ext) {
        Playable::Original(ct) => (original, ct, "original"),
        Playable::Wav => (
            s.wav_path
                .clone()
                .map(std::path::PathBuf::from)
                .ok_or(Error::NotFound("media"))?,
            "audio/wav",
            "audio",
        ),
        Playable::Transcode => {
            let dir = original
                .parent()
                .map(std::path::Path::to_path_buf)
                .ok_or(Error::NotFound("media"))?;
            let limits = st.config.intake.limits();
            let timeout = limits.timeout.min(Duration::from_secs(600));
            let out = ensure_preview(&limits.ffmpeg, &original, &dir, timeout).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rubric() -> viva_models::Rubric {
        domain::sandbox_assignment().rubric
    }

    #[test]
    fn override_changes_points_and_feedback_and_recomputes_the_total() {
        let mut score = serde_json::json!({
            "criteria": [
                {"criterion_id": "content", "points": 2.0, "level": "partial", "feedback": "ok"},
                {"criterion_id": "organisation", "points": 2.0, "level": "mostly-clear", "feedback": ""},
                {"criterion_id": "language", "points": 2.0, "level": "adequate", "feedback": ""}
            ],
            "total": 8.0, "max": 16.0, "feedback": "old"
        });
        let req: OverrideRequest = serde_json::from_value(serde_json::json!({
            "criteria": [{"criterion_id": "content", "points": 4, "feedback": "excellent"}],
            "feedback": "new"
        }))
        .expect("request");
        let changes = apply_override(&rubric(), &mut score, &req).expect("applied");
        assert_eq!(score["total"], 12.0, "content weighs 2");
        assert_eq!(score["criteria"][0]["level"], "complete");
        assert_eq!(score["criteria"][0]["feedback"], "excellent");
        assert_eq!(score["feedback"], "new");
        let fields: Vec<_> = changes.iter().map(|c| c.field).collect();
        assert_eq!(fields, ["points", "feedback", "feedback", "total"]);
        assert_eq!(changes[0].from, 2.0);
        assert_eq!(changes[0].to, 4.0);
    }

    #[test]
    fn override_updates_the_report_inside_a_stored_score() {
        let mut score = serde_json::json!({
            "total": 8.0, "max": 16.0, "needs_review": true, "reasons": ["x"],
            "report": {"criteria": [
                {"criterion_id": "content", "points": 2.0, "level": "partial", "feedback": ""},
                {"criterion_id": "organisation", "points": 2.0, "level": "mostly-clear", "feedback": ""},
                {"criterion_id": "language", "points": 2.0, "level": "adequate", "feedback": ""}
            ], "total": 8.0, "max": 16.0, "feedback": "f"}
        });
        let req: OverrideRequest = serde_json::from_value(serde_json::json!({
            "criteria": [{"criterion_id": "language", "points": 0}]
        }))
        .expect("request");
        let changes = apply_override(&rubric(), &mut score, &req).expect("applied");
        assert_eq!(score["total"], 6.0);
        assert_eq!(score["report"]["total"], 6.0);
        assert_eq!(score["report"]["criteria"][2]["level"], "limited");
        assert_eq!(changes.last().map(|c| c.field), Some("total"));
    }

    #[test]
    fn override_refuses_unknown_criteria_and_points_out_of_range() {
        let mut score = serde_json::json!({"criteria": [], "total": 0.0});
        for (body, code) in [
            (
                serde_json::json!({"criteria": [{"criterion_id": "nope", "points": 1}]}),
                "unknown_criterion",
            ),
            (
                serde_json::json!({"criteria": [{"criterion_id": "content", "points": 5}]}),
                "points_out_of_range",
            ),
            (
                serde_json::json!({"criteria": [{"criterion_id": "content", "points": -1}]}),
                "points_out_of_range",
            ),
        ] {
            let req: OverrideRequest = serde_json::from_value(body).expect("request");
            let e = apply_override(&rubric(), &mut score, &req).expect_err("refused");
            assert_eq!(e.status_and_code().1, code);
        }
        let mut none = serde_json::Value::Null;
        let req: OverrideRequest =
            serde_json::from_value(serde_json::json!({"criteria": []})).expect("request");
        assert_eq!(
            apply_override(&rubric(), &mut none, &req)
                .expect_err("no score")
                .status_and_code()
                .1,
            "no_score"
        );
    }

    #[test]
    fn browsers_get_the_original_only_when_they_can_play_it() {
        let info = |v: Option<&str>, a: Option<&str>| serde_json::json!({"has_video": v.is_some(), "video_codec": v, "audio_codec": a});
        assert_eq!(
            playable(&info(Some("h264"), Some("aac")), "mp4"),
            Playable::Original("video/mp4")
        );
        assert_eq!(
            playable(&info(Some("vp8"), Some("opus")), "webm"),
            Playable::Original("video/webm")
        );
        assert_eq!(
            playable(&info(Some("h264"), Some("aac")), "mov"),
            Playable::Transcode
        );
        assert_eq!(
            playable(&info(Some("h264"), Some("aac")), "mkv"),
            Playable::Transcode
        );
        assert_eq!(
            playable(&info(Some("hevc"), Some("aac")), "mp4"),
            Playable::Transcode
        );
        assert_eq!(
            playable(&info(None, Some("pcm_s16le")), "wav"),
            Playable::Original("audio/wav")
        );
        assert_eq!(playable(&info(None, Some("amr_nb")), "3gp"), Playable::Wav);
    }
}
