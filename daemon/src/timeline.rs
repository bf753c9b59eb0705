//! The administrator's timeline: when each STT batch opened, closed and
//! finished its STT phase, and when each job (STT, evaluation per role,
//! scoring) was queued, started and finished. `GET /api/v1/admin/timeline`
//! answers "what did the scheduler do, and when" after the fact, from the
//! database (the in-memory phase history of `/api/v1/admin/system` is lost
//! on restart); `viva-lab` measures its runs with it.
//!
//! Read-only: [`timeline`] only SELECTs.

use axum::Json;
use axum::extract::{Query, State};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::auth::Session;
use crate::error::{Error, Result};

/// Rows returned when the caller gives no `limit`, and the most it may ask.
const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 10_000;

/// One STT batch; times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchTimes {
    pub id: i64,
    pub opened_at: i64,
    pub closed_at: Option<i64>,
    pub stt_done_at: Option<i64>,
    /// Submissions in the batch.
    pub size: i64,
}

/// One job of one submission; times are milliseconds since the Unix epoch.
/// `started_at` is the last claim's start (a retried job restarts it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobTimes {
    pub submission_id: String,
    pub batch_id: Option<i64>,
    /// `stt`, `eval` or `score`.
    pub stage: String,
    /// The evaluator role for `eval` jobs, else empty.
    pub role: String,
    /// `queued`, `running`, `done` or `failed`.
    pub state: String,
    pub attempts: i64,
    pub service_ms: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// Oldest first.
    pub batches: Vec<BatchTimes>,
    /// Oldest first.
    pub jobs: Vec<JobTimes>,
}

/// The newest `limit` batches opened and jobs created at or after `since_ms`,
/// each list oldest first.
pub fn timeline(conn: &Connection, since_ms: i64, limit: u32) -> rusqlite::Result<Timeline> {
    let mut stmt = conn.prepare(
        "SELECT b.id, b.opened_at, b.closed_at, b.stt_done_at,
                (SELECT COUNT(*) FROM submissions s WHERE s.batch_id = b.id)
         FROM batches b WHERE b.opened_at >= ?1 ORDER BY b.id DESC LIMIT ?2",
    )?;
    let mut batches = stmt
        .query_map(rusqlite::params![since_ms, limit], |r| {
            Ok(BatchTimes {
                id: r.get(0)?,
                opened_at: r.get(1)?,
                closed_at: r.get(2)?,
                stt_done_at: r.get(3)?,
                size: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    batches.reverse();
    let mut stmt = conn.prepare(
        "SELECT j.submission_id, s.batch_id, j.stage, j.role, j.state, j.attempts,
                j.service_ms, j.created_at, j.started_at, j.finished_at
         FROM jobs j JOIN submissions s ON s.id = j.submission_id
         WHERE j.created_at >= ?1 ORDER BY j.id DESC LIMIT ?2",
    )?;
    let mut jobs = stmt
        .query_map(rusqlite::params![since_ms, limit], |r| {
            Ok(JobTimes {
                submission_id: r.get(0)?,
                batch_id: r.get(1)?,
                stage: r.get(2)?,
                role: r.get(3)?,
                state: r.get(4)?,
                attempts: r.get(5)?,
                service_ms: r.get(6)?,
                created_at: r.get(7)?,
                started_at: r.get(8)?,
                finished_at: r.get(9)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    jobs.reverse();
    Ok(Timeline { batches, jobs })
}

#[derive(Deserialize)]
pub struct TimelineQuery {
    /// Only batches opened and jobs created at or after this time (ms).
    since: Option<i64>,
    /// At most this many batches and this many jobs, the newest (default
    /// 1000, at most 10 000).
    limit: Option<u32>,
}

/// `GET /api/v1/admin/timeline?since=MS&limit=N`: administrators only.
pub async fn admin_timeline(
    State(st): State<AppState>,
    Session(c): Session,
    Query(q): Query<TimelineQuery>,
) -> Result<Json<Timeline>> {
    if !c.is_admin() {
        return Err(Error::Forbidden(
            "only an administrator can see this; sign in from the platform as an administrator"
                .into(),
        ));
    }
    let since = q.since.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    Ok(Json(
        st.store
            .read(move |conn| Ok(timeline(conn, since, limit)?))
            .await?,
    ))
}
