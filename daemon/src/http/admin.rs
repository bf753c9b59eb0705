//! Probes, metrics, personal data (export and deletion) and the
//! administrator's view: models, workers, phases, plugin failures, the audit
//! log, media purge.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::access::{Session, require_admin};
use crate::domain;
use crate::error::{Error, Result};
use crate::jobs;

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

pub(super) async fn readyz(State(st): State<AppState>) -> Response {
    // Anyone may ask: the problems without the workers' own errors (which
    // name model paths); the admin view and `viva status` have those.
    let problems = readiness_problems(&st, false).await;
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
/// by `/readyz` and the admin view; `detail` adds the workers' own errors.
pub(crate) async fn readiness_problems(st: &AppState, detail: bool) -> Vec<String> {
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
        if detail {
            problems.push(format!("worker {slot}: {err}"));
        } else {
            problems.push(format!(
                "worker {slot} failed (its error is in the admin view and `viva status`)"
            ));
        }
    }
    for (role, u) in &snap.unavailable {
        let what = format!(
            "role {role} is unavailable after {} failed starts (its submissions wait; `viva workers retry {role}` tries again now)",
            u.failures
        );
        problems.push(if detail {
            format!("{what}: {}", u.error)
        } else {
            what
        });
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

pub(super) async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

pub(super) async fn export_user(
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
            .read(move |conn| crate::retention::export_user(conn, &user, |ctx| c.can_manage(ctx)))
            .await?,
    ))
}

pub(super) async fn delete_user(
    State(st): State<AppState>,
    Session(c): Session,
    Path(user): Path<String>,
) -> Result<Json<HashMap<&'static str, usize>>> {
    require_admin(&c)?;
    let n = crate::retention::delete_user(&st.store, &user, &c.actor()).await?;
    Ok(Json(HashMap::from([("submissions_deleted", n)])))
}

pub(super) async fn purge(
    State(st): State<AppState>,
    Session(c): Session,
) -> Result<Json<HashMap<&'static str, usize>>> {
    require_admin(&c)?;
    let n = crate::retention::purge_expired(&st.store, st.config.retention.retention_days).await?;
    Ok(Json(HashMap::from([("media_purged", n)])))
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    subject: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn audit(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<domain::AuditEntry>>> {
    require_admin(&c)?;
    let limit = q.limit.unwrap_or(100).min(1000);
    Ok(Json(
        st.store
            .read(move |conn| domain::audit_entries(conn, q.subject.as_deref(), limit))
            .await?,
    ))
}

#[derive(Serialize)]
struct ModelRow {
    kind: viva_models::WorkerKind,
    role: Option<String>,
    model: String,
    model_file: String,
    memory_mb: u64,
    /// GPU memory the running worker measured (NVML), MiB: where known,
    /// the figure `auto` and this view use instead of `memory_mb`.
    measured_mb: Option<u64>,
    loaded: bool,
    /// A remote worker's server (health, latency), as it last reported.
    remote: Option<viva_models::protocol::RemoteHealth>,
    process: Option<crate::workers::ProcessInfo>,
}

#[derive(Serialize)]
pub(super) struct System {
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
    /// Roles whose model cannot start (the alert, with the worker's error).
    unavailable: Vec<crate::eta::Unavailable>,
    phase_history: Vec<crate::scheduler::PhaseChange>,
    /// GPU memory before and after the recent phase switches (measured).
    memory_swaps: Vec<crate::scheduler::SwapMemory>,
    process_history: Vec<crate::workers::ProcessEvent>,
    stats: crate::eta::StatsView,
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) async fn system(
    State(st): State<AppState>,
    Session(c): Session,
) -> Result<Json<System>> {
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
            measured_mb: process
                .as_ref()
                .and_then(|p| p.device_memory.as_ref())
                .map(|d| d.process_bytes >> 20)
                .or_else(|| snap.measured_mb.get("stt").copied()),
            loaded: process.as_ref().is_some_and(|p| p.state != "starting"),
            remote: process.as_ref().and_then(|p| p.remote_health.clone()),
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
            measured_mb: process
                .as_ref()
                .and_then(|p| p.device_memory.as_ref())
                .map(|d| d.process_bytes >> 20)
                .or_else(|| snap.measured_mb.get(&format!("evaluator:{role}")).copied()),
            loaded: process.as_ref().is_some_and(|p| p.state != "starting"),
            remote: process.as_ref().and_then(|p| p.remote_health.clone()),
            process,
        });
    }
    let mut problems = readiness_problems(&st, true).await;
    let data_dir = cfg.data_dir.clone();
    let free_bytes = tokio::task::spawn_blocking(move || crate::intake::free_bytes(&data_dir).ok())
        .await
        .ok()
        .flatten();
    let min_free = cfg.intake.min_free_bytes;
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
        unavailable: snap.unavailable.values().cloned().collect(),
        phase_history,
        memory_swaps: st.scheduler.memory_swaps(),
        process_history,
        stats: snap.stats.clone(),
    }))
}

/// `POST /api/v1/admin/workers/{role}/retry`: an administrator's "try
/// again" for a role ("stt" or an evaluator's name) that cannot start.
pub(super) async fn retry_worker(
    State(st): State<AppState>,
    Session(c): Session,
    Path(role): Path<String>,
) -> Result<Json<serde_json::Value>> {
    require_admin(&c)?;
    let known = if role == "stt" {
        st.config.workers.stt.is_some()
    } else {
        st.config.workers.evaluators.contains_key(&role)
    };
    if !known {
        return Err(Error::NotFound("worker role"));
    }
    let was_unavailable = st.scheduler.snapshot().unavailable.contains_key(&role);
    st.scheduler.retry_worker(&role);
    tracing::info!(%role, by = %c.sub, "worker retry requested");
    Ok(Json(serde_json::json!({
        "role": role,
        "was_unavailable": was_unavailable,
        "retrying": true,
    })))
}

#[derive(Serialize)]
pub(super) struct PluginFailure {
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
pub(super) async fn plugin_failures(
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
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    Ok(Json(rows))
}

// ---- timeline -------------------------------------------------------------------------

/// Rows the timeline returns when the caller gives no `limit`, and the most
/// it may ask for.
const TIMELINE_DEFAULT_LIMIT: u32 = 1000;
const TIMELINE_MAX_LIMIT: u32 = 10_000;

/// When each STT batch opened, closed and finished its STT phase, and when
/// each job was queued, started and finished: "what did the scheduler do,
/// and when", after the fact and across restarts (the phase history of
/// `system` lives in memory). `viva-lab` measures its runs with it.
#[derive(Deserialize)]
pub(super) struct TimelineQuery {
    /// Only batches opened and jobs created at or after this time (ms).
    since: Option<i64>,
    /// At most this many batches and this many jobs, the newest (default
    /// 1000, at most 10 000).
    limit: Option<u32>,
}

/// `GET /api/v1/admin/timeline?since=MS&limit=N`: administrators only.
pub(super) async fn timeline(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<TimelineQuery>,
) -> Result<Json<jobs::Timeline>> {
    require_admin(&c)?;
    let since = q.since.unwrap_or(0);
    let limit = q
        .limit
        .unwrap_or(TIMELINE_DEFAULT_LIMIT)
        .clamp(1, TIMELINE_MAX_LIMIT);
    Ok(Json(
        st.store
            .read(move |conn| Ok(jobs::timeline(conn, since, limit)?))
            .await?,
    ))
}

#[derive(Deserialize)]
pub(super) struct DoctorQuery {
    /// Start each worker and load its model beside the running ones (slow,
    /// and the models' memory twice for that long).
    #[serde(default)]
    load_models: bool,
}

/// The installation checks of `viva doctor`, run by the daemon itself: its
/// store, keys and plugin registry, and what the scheduler knows of its
/// workers (models are loaded only with `?load_models=true`).
pub(super) async fn doctor(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<DoctorQuery>,
) -> Result<Json<crate::doctor::Report>> {
    require_admin(&c)?;
    let snap = st.scheduler.snapshot();
    let mut worker_errors: Vec<(String, String)> = snap
        .worker_errors
        .iter()
        .map(|(slot, e)| (slot.clone(), e.clone()))
        .collect();
    worker_errors.extend(
        snap.unavailable
            .values()
            .map(|u| (u.slot.clone(), u.error.clone())),
    );
    let registrations = st.store.read(crate::lti::list_registrations).await;
    let skipped = registrations
        .as_ref()
        .err()
        .map(|e| format!("the registrations cannot be read: {e}"));
    let inputs = crate::doctor::Inputs {
        config: &st.config,
        config_file: None,
        load_models: q.load_models,
        registrations: registrations.ok(),
        keys: Some(st.lti.keys.clone()),
        keys_error: None,
        plugins: Some(st.plugins.clone()),
        skipped,
        worker_errors,
    };
    Ok(Json(crate::doctor::run(&inputs).await))
}
