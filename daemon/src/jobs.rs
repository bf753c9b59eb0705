//! The durable job queue: one row per (submission, stage, role) in `jobs`.
//!
//! A job is claimed with a lease (owner = this daemon instance) in one short
//! transaction and completed or failed in another, each guarded by
//! `state = 'running' AND lease_owner = me`: a result that arrives after its
//! lease was lost is dropped, so a submission never gets two final results.
//! On start-up, leases of previous instances go back to the queue at once.

use crate::db::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use viva_models::{Evaluation, Transcript};

use crate::clock::now_ms;
use crate::domain::{self, Role, SubmissionState};
use crate::error::{Error, Result};
use crate::grades;

// ---- the timeline (read-only) -------------------------------------------------------

/// One STT batch; times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct BatchTimes {
    pub id: i64,
    pub opened_at: i64,
    pub closed_at: Option<i64>,
    pub stt_done_at: Option<i64>,
    /// Submissions in the batch.
    pub size: i64,
}

/// One job of one submission; times are milliseconds since the Unix epoch.
/// `started_at` is the last claim's start (a retried job restarts it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct JobTimes {
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

#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Timeline {
    /// Oldest first.
    pub batches: Vec<BatchTimes>,
    /// Oldest first.
    pub jobs: Vec<JobTimes>,
}

/// The newest `limit` batches opened and jobs created at or after `since_ms`,
/// each list oldest first.
pub(crate) fn timeline(
    conn: &Connection,
    since_ms: i64,
    limit: u32,
) -> crate::db::Result<Timeline> {
    let mut stmt = conn.prepare(
        "SELECT b.id, b.opened_at, b.closed_at, b.stt_done_at,
                (SELECT COUNT(*) FROM submissions s WHERE s.batch_id = b.id)
         FROM batches b WHERE b.opened_at >= ?1 ORDER BY b.id DESC LIMIT ?2",
    )?;
    let mut batches = stmt
        .query_map(crate::params![since_ms, limit], |r| {
            Ok(BatchTimes {
                id: r.get(0)?,
                opened_at: r.get(1)?,
                closed_at: r.get(2)?,
                stt_done_at: r.get(3)?,
                size: r.get(4)?,
            })
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    batches.reverse();
    let mut stmt = conn.prepare(
        "SELECT j.submission_id, s.batch_id, j.stage, j.role, j.state, j.attempts,
                j.service_ms, j.created_at, j.started_at, j.finished_at
         FROM jobs j JOIN submissions s ON s.id = j.submission_id
         WHERE j.created_at >= ?1 ORDER BY j.id DESC LIMIT ?2",
    )?;
    let mut jobs = stmt
        .query_map(crate::params![since_ms, limit], |r| {
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
        .collect::<crate::db::Result<Vec<_>>>()?;
    jobs.reverse();
    Ok(Timeline { batches, jobs })
}

// ---- uploads ---------------------------------------------------------------------

/// An upload whose files are in place under the media directory.
pub(crate) struct NewSubmission {
    pub id: String,
    pub assignment_id: String,
    pub context_id: String,
    pub user_id: String,
    pub user_name: Option<String>,
    pub roles: Vec<Role>,
    /// The client's `Idempotency-Key`: one submission per key.
    pub upload_key: Option<String>,
    pub original_name: Option<String>,
    pub media_dir: String,
    pub original_path: String,
    pub wav_path: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub duration_seconds: f64,
    /// ffprobe's findings, JSON.
    pub media_info: String,
    /// The assignment's attempt limit (`None`: unlimited).
    pub max_attempts: Option<u32>,
}

/// → `queued`: an accepted upload becomes the student's next attempt with its
/// STT job, in one transaction. When an upload with the same idempotency key
/// already landed (two concurrent tries: the first to commit wins), nothing
/// is written and that submission's id is returned.
pub(crate) fn accept_upload(tx: &Transaction<'_>, n: &NewSubmission) -> Result<Option<String>> {
    if let Some(key) = &n.upload_key {
        let existing: Option<String> = tx
            .query_row(
                "SELECT id FROM submissions
                 WHERE assignment_id = ?1 AND user_id = ?2 AND upload_key = ?3",
                params![n.assignment_id, n.user_id, key],
                |r| r.get(0),
            )
            .optional()?;
        if existing.is_some() {
            return Ok(existing);
        }
    }
    domain::ensure_member(
        tx,
        &n.context_id,
        &n.user_id,
        n.user_name.as_deref(),
        &n.roles,
    )?;
    // Checked again here, in the transaction that writes the attempt: two
    // uploads at once cannot both take the last one.
    let attempt = domain::attempts_made(tx, &n.assignment_id, &n.user_id)? + 1;
    if let Some(max) = n.max_attempts
        && attempt > max
    {
        return Err(domain::attempts_used_up(max));
    }
    let now = now_ms();
    tx.execute(
        "INSERT INTO submissions (id, assignment_id, user_id, attempt, state, original_name,
             media_dir, original_path, wav_path, sha256, size_bytes, duration_seconds,
             media_info, created_at, updated_at, upload_key, assignment_version)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14,
                 (SELECT version FROM assignments WHERE id = ?2))",
        params![
            n.id,
            n.assignment_id,
            n.user_id,
            attempt,
            n.original_name,
            n.media_dir,
            n.original_path,
            n.wav_path,
            n.sha256,
            n.size_bytes as i64,
            n.duration_seconds,
            n.media_info,
            now,
            n.upload_key
        ],
    )?;
    tx.execute(
        "INSERT INTO jobs (submission_id, stage, state, created_at) VALUES (?1, 'stt', 'queued', ?2)",
        params![n.id, now],
    )?;
    Ok(None)
}

// ---- the queue ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Stt,
    Eval,
    Score,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Stt => "stt",
            Stage::Eval => "eval",
            Stage::Score => "score",
        }
    }

    fn parse(s: &str) -> Stage {
        match s {
            "stt" => Stage::Stt,
            "eval" => Stage::Eval,
            _ => Stage::Score,
        }
    }
}

/// A job that is queued or running, with what the scheduler needs to plan.
#[derive(Debug, Clone, Serialize)]
pub struct PendingJob {
    pub id: i64,
    pub submission_id: String,
    pub stage: Stage,
    pub role: String,
    pub running: bool,
    pub attempts: u32,
    pub not_before: i64,
    pub batch_id: Option<i64>,
    pub submitted_at: i64,
    pub duration_seconds: f64,
    pub started_at: Option<i64>,
}

/// The STT batch whose phase has not finished.
#[derive(Debug, Clone, Serialize)]
pub struct OpenBatch {
    pub id: i64,
    pub opened_at: i64,
    pub closed: bool,
    pub size: usize,
}

/// Whose queue [`load_pending`] reads.
#[derive(Debug, Clone, PartialEq)]
pub enum QueueView {
    /// Everything unfinished: the one node of a site, or an api node
    /// showing the queue.
    All,
    /// A GPU node among several: queued jobs it may take (not STT jobs in
    /// another node's batch) and the jobs it runs; its own open batch.
    Node(String),
}

/// Everything not yet finished, in queue order (oldest submission first).
pub fn load_pending(
    conn: &Connection,
    view: &QueueView,
) -> Result<(Vec<PendingJob>, Option<OpenBatch>)> {
    let (filter, node) = match view {
        QueueView::All => ("j.state IN ('queued', 'running')", ""),
        QueueView::Node(node) => (
            "((j.state = 'queued' AND NOT (j.stage = 'stt' AND b.node IS NOT NULL AND b.node <> ?1))
              OR (j.state = 'running' AND j.lease_owner = ?1))",
            node.as_str(),
        ),
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT j.id, j.submission_id, j.stage, j.role, j.state, j.attempts, j.not_before,
                s.batch_id, s.created_at, s.duration_seconds, j.started_at
         FROM jobs j JOIN submissions s ON s.id = j.submission_id
         LEFT JOIN batches b ON b.id = s.batch_id
         WHERE {filter} AND CAST(?1 AS TEXT) IS NOT NULL
         ORDER BY s.created_at, s.id, j.stage, j.role"
    ))?;
    let jobs = stmt
        .query_map([node], |r| {
            Ok(PendingJob {
                id: r.get(0)?,
                submission_id: r.get(1)?,
                stage: Stage::parse(&r.get::<_, String>(2)?),
                role: r.get(3)?,
                running: r.get::<_, String>(4)? == "running",
                attempts: r.get(5)?,
                not_before: r.get(6)?,
                batch_id: r.get(7)?,
                submitted_at: r.get(8)?,
                duration_seconds: r.get(9)?,
                started_at: r.get(10)?,
            })
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    let batch = conn
        .query_row(
            "SELECT b.id, b.opened_at, b.closed_at IS NOT NULL,
                    (SELECT COUNT(*) FROM submissions s WHERE s.batch_id = b.id)
             FROM batches b WHERE b.stt_done_at IS NULL
               AND (?1 = '' OR b.node IS NULL OR b.node = ?1)
             ORDER BY b.id LIMIT 1",
            [node],
            |r| {
                Ok(OpenBatch {
                    id: r.get(0)?,
                    opened_at: r.get(1)?,
                    closed: r.get(2)?,
                    size: r.get::<_, i64>(3)? as usize,
                })
            },
        )
        .optional()?;
    Ok((jobs, batch))
}

/// Facts about a batch for status displays.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct BatchProgress {
    pub id: i64,
    pub size: usize,
    pub stt_done: usize,
    pub eval_done: usize,
    pub failed: usize,
}

pub fn batch_progress(conn: &Connection, batch_id: i64) -> Result<BatchProgress> {
    Ok(conn.query_row(
        "SELECT COUNT(*),
                SUM(CASE WHEN state NOT IN ('queued', 'transcribing', 'failed') THEN 1 ELSE 0 END),
                SUM(CASE WHEN state IN ('evaluated', 'awaiting_review', 'released') THEN 1 ELSE 0 END),
                SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END)
         FROM submissions WHERE batch_id = ?1",
        [batch_id],
        |r| {
            Ok(BatchProgress {
                id: batch_id,
                size: r.get::<_, i64>(0)? as usize,
                stt_done: r.get::<_, Option<i64>>(1)?.unwrap_or(0) as usize,
                eval_done: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as usize,
                failed: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as usize,
            })
        },
    )?)
}

/// Opens a new STT batch holding the given submissions.
pub fn open_batch(tx: &Transaction<'_>, submission_ids: &[String], node: &str) -> Result<i64> {
    let id: i64 = tx.query_row(
        "INSERT INTO batches (opened_at, node) VALUES (?1, ?2) RETURNING id",
        params![now_ms(), node],
        |r| r.get(0),
    )?;
    add_to_batch(tx, id, submission_ids)?;
    Ok(id)
}

pub fn add_to_batch(tx: &Transaction<'_>, batch_id: i64, submission_ids: &[String]) -> Result<()> {
    let mut stmt =
        tx.prepare("UPDATE submissions SET batch_id = ?1 WHERE id = ?2 AND batch_id IS NULL")?;
    for id in submission_ids {
        stmt.execute(params![batch_id, id])?;
    }
    Ok(())
}

pub fn close_batch(tx: &Transaction<'_>, batch_id: i64) -> Result<()> {
    tx.execute(
        "UPDATE batches SET closed_at = COALESCE(closed_at, ?2) WHERE id = ?1",
        params![batch_id, now_ms()],
    )?;
    Ok(())
}

pub fn finish_batch_stt(tx: &Transaction<'_>, batch_id: i64) -> Result<()> {
    let now = now_ms();
    tx.execute(
        "UPDATE batches SET closed_at = COALESCE(closed_at, ?2), stt_done_at = ?2 WHERE id = ?1",
        params![batch_id, now],
    )?;
    Ok(())
}

/// Which leases a sweep returns to the queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sweep {
    /// The one node of a site: every lease not its own (a previous run's),
    /// and expired ones.
    NotMine,
    /// One of several nodes: expired leases, and at start (`restart`) this
    /// node's own from its previous run.
    Expired { restart: bool },
}

/// Puts stale leases back in the queue (see [`Sweep`]). Attempts are not
/// charged: the job did not fail, its node went away.
pub fn release_stale_leases(tx: &Transaction<'_>, instance: &str, sweep: Sweep) -> Result<usize> {
    let now = now_ms();
    let which = match sweep {
        Sweep::NotMine => "lease_owner IS DISTINCT FROM ?1 OR lease_expires_at < ?2",
        Sweep::Expired { restart: true } => "lease_owner = ?1 OR lease_expires_at < ?2",
        Sweep::Expired { restart: false } => {
            "lease_expires_at < ?2 AND CAST(?1 AS TEXT) IS NOT NULL"
        }
    };
    let n = tx.execute(
        &format!(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
             WHERE state = 'running' AND ({which})"
        ),
        params![instance, now],
    )?;
    if n > 0 {
        tx.execute(
            "UPDATE submissions SET state = 'queued', updated_at = ?1
             WHERE state = 'transcribing'
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.submission_id = submissions.id
                               AND j.stage = 'stt' AND j.state = 'running')",
            [now],
        )?;
    }
    Ok(n)
}

/// Puts this instance's running jobs back (graceful shutdown).
pub fn release_own_leases(tx: &Transaction<'_>, instance: &str) -> Result<usize> {
    let n = tx.execute(
        "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
         WHERE state = 'running' AND lease_owner = ?1",
        [instance],
    )?;
    tx.execute(
        "UPDATE submissions SET state = 'queued', updated_at = ?1 WHERE state = 'transcribing'",
        [now_ms()],
    )?;
    Ok(n)
}

/// Records that `node` is alive (at start and with each lease renewal).
pub fn node_seen(tx: &Transaction<'_>, node: &str, role: &str, starting: bool) -> Result<()> {
    let now = now_ms();
    tx.execute(
        "INSERT INTO nodes (id, role, started_at, seen_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (id) DO UPDATE SET role = excluded.role, seen_at = excluded.seen_at,
             started_at = CASE WHEN ?4 = 1 THEN excluded.started_at ELSE nodes.started_at END",
        params![node, role, now, i64::from(starting)],
    )?;
    Ok(())
}

/// Nodes running the GPU queue seen within `alive_ms`.
pub fn live_queue_nodes(conn: &Connection, alive_ms: i64) -> Result<Vec<String>> {
    Ok(conn
        .prepare("SELECT id FROM nodes WHERE role IN ('all', 'gpu') AND seen_at >= ?1 ORDER BY id")?
        .query_map([now_ms() - alive_ms], |r| r.get(0))?
        .collect::<crate::db::Result<_>>()?)
}

/// Takes over the open batches of queue nodes not seen within `alive_ms`
/// (killed, or cut off): their submissions still waiting for STT leave the
/// batch (any node batches them again) and the batch is closed. Returns how
/// many submissions were freed.
pub fn dissolve_dead_batches(tx: &Transaction<'_>, me: &str, alive_ms: i64) -> Result<usize> {
    let now = now_ms();
    let dead = "SELECT b.id FROM batches b WHERE b.stt_done_at IS NULL AND b.node IS NOT NULL
                  AND b.node <> ?1
                  AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = b.node AND n.seen_at >= ?2)";
    let freed = tx.execute(
        &format!(
            "UPDATE submissions SET batch_id = NULL, updated_at = ?3
             WHERE batch_id IN ({dead})
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.submission_id = submissions.id
                           AND j.stage = 'stt' AND j.state IN ('queued', 'running'))"
        ),
        params![me, now - alive_ms, now],
    )?;
    let closed = tx.execute(
        &format!(
            "UPDATE batches SET closed_at = COALESCE(closed_at, ?3), stt_done_at = ?3
             WHERE id IN ({dead})"
        ),
        params![me, now - alive_ms, now],
    )?;
    if closed > 0 {
        tracing::warn!(
            batches = closed,
            submissions = freed,
            "took over the open batches of a node that stopped answering"
        );
    }
    Ok(freed)
}

/// Adopts the open batches of this site's previous runs (one node: its
/// instance id is new at each start).
pub fn adopt_open_batches(tx: &Transaction<'_>, me: &str) -> Result<usize> {
    Ok(tx.execute(
        "UPDATE batches SET node = ?1 WHERE stt_done_at IS NULL",
        [me],
    )?)
}

/// Holds the singleton job `name` (grade passback, retention) for
/// `ttl_ms` when no other node holds it: true when this node may run it now.
pub fn claim_singleton(tx: &Transaction<'_>, name: &str, node: &str, ttl_ms: i64) -> Result<bool> {
    let now = now_ms();
    tx.execute(
        "INSERT INTO singletons (name, node, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO NOTHING",
        params![name, node, now + ttl_ms],
    )?;
    let n = tx.execute(
        "UPDATE singletons SET node = ?2, expires_at = ?3
         WHERE name = ?1 AND (node = ?2 OR expires_at < ?4)",
        params![name, node, now + ttl_ms, now],
    )?;
    Ok(n > 0)
}

pub fn renew_leases(tx: &Transaction<'_>, instance: &str, until: i64) -> Result<usize> {
    Ok(tx.execute(
        "UPDATE jobs SET lease_expires_at = ?2 WHERE state = 'running' AND lease_owner = ?1",
        params![instance, until],
    )?)
}

/// A claimed job with what its worker needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job_id: i64,
    pub submission_id: String,
    pub stage: Stage,
    pub wav_path: String,
    pub duration_seconds: f64,
    pub transcript: Option<Transcript>,
    pub assignment_id: String,
    /// The assignment's language (`None`: detect it) and vocabulary, for
    /// the STT job.
    pub language: Option<String>,
    pub vocabulary: Option<String>,
}

/// Claims queued jobs (those still queued; others are skipped).
pub fn claim(
    tx: &Transaction<'_>,
    job_ids: &[i64],
    instance: &str,
    lease_until: i64,
) -> Result<Vec<Claimed>> {
    let now = now_ms();
    let mut out = Vec::new();
    for &id in job_ids {
        let n = tx.execute(
            "UPDATE jobs SET state = 'running', lease_owner = ?2, lease_expires_at = ?3, started_at = ?4
             WHERE id = ?1 AND state = 'queued'",
            params![id, instance, lease_until, now],
        )?;
        if n == 0 {
            continue;
        }
        let c = tx.query_row(
            "SELECT j.submission_id, j.stage, COALESCE(s.wav_path, ''),
                    s.duration_seconds, s.transcript, s.assignment_id, a.language, a.vocabulary
             FROM jobs j JOIN submissions s ON s.id = j.submission_id
             LEFT JOIN assignments a ON a.id = s.assignment_id WHERE j.id = ?1",
            [id],
            |r| {
                let transcript: Option<String> = r.get(4)?;
                Ok(Claimed {
                    job_id: id,
                    submission_id: r.get(0)?,
                    stage: Stage::parse(&r.get::<_, String>(1)?),
                    wav_path: r.get(2)?,
                    duration_seconds: r.get(3)?,
                    transcript: transcript.and_then(|t| serde_json::from_str(&t).ok()),
                    assignment_id: r.get(5)?,
                    language: r.get(6)?,
                    vocabulary: r.get(7)?,
                })
            },
        )?;
        let new_state = match c.stage {
            Stage::Stt => Some(SubmissionState::Transcribing),
            Stage::Eval => Some(SubmissionState::Evaluating),
            Stage::Score => None,
        };
        if let Some(state) = new_state {
            tx.execute(
                "UPDATE submissions SET state = ?2, updated_at = ?3 WHERE id = ?1 AND state NOT IN ('failed')",
                params![c.submission_id, state.as_str(), now],
            )?;
        }
        out.push(c);
    }
    Ok(out)
}

fn finish_job(
    tx: &Transaction<'_>,
    job_id: i64,
    instance: &str,
    result: &str,
) -> Result<Option<String>> {
    let now = now_ms();
    let n = tx.execute(
        "UPDATE jobs SET state = 'done', result = ?3, finished_at = ?4, lease_owner = NULL,
                lease_expires_at = NULL, service_ms = ?4 - started_at, last_error = NULL
         WHERE id = ?1 AND state = 'running' AND lease_owner = ?2",
        params![job_id, instance, result, now],
    )?;
    if n == 0 {
        // The lease was lost (released at shutdown or expired): drop the result.
        return Ok(None);
    }
    Ok(Some(tx.query_row(
        "SELECT submission_id FROM jobs WHERE id = ?1",
        [job_id],
        |r| r.get(0),
    )?))
}

/// Stores a transcript and queues one evaluation per role. Returns false when
/// the lease was lost and the result dropped.
pub fn complete_stt(
    tx: &Transaction<'_>,
    job_id: i64,
    instance: &str,
    transcript: &Transcript,
    roles: &[String],
) -> Result<bool> {
    let json = serde_json::to_string(transcript)
        .map_err(|e| Error::Internal(format!("serialising transcript: {e}")))?;
    let Some(sub) = finish_job(tx, job_id, instance, &json)? else {
        return Ok(false);
    };
    let now = now_ms();
    let state = if roles.is_empty() {
        SubmissionState::Evaluated
    } else {
        SubmissionState::Transcribed
    };
    tx.execute(
        "UPDATE submissions SET transcript = ?2, state = ?3, updated_at = ?4 WHERE id = ?1",
        params![sub, json, state.as_str(), now],
    )?;
    let mut stmt = tx.prepare(
        "INSERT INTO jobs (submission_id, stage, role, state, created_at)
         VALUES (?1, 'eval', ?2, 'queued', ?3) ON CONFLICT DO NOTHING",
    )?;
    for role in roles {
        stmt.execute(params![sub, role, now])?;
    }
    Ok(true)
}

/// Stores one evaluation. Returns `Some(Some(submitted_at_ms))` when it was
/// the last one the submission needed, `Some(None)` when others are
/// outstanding, `None` when the lease was lost.
pub fn complete_eval(
    tx: &Transaction<'_>,
    job_id: i64,
    instance: &str,
    evaluation: &Evaluation,
    queue_scoring: bool,
) -> Result<Option<Option<i64>>> {
    let json = serde_json::to_string(evaluation)
        .map_err(|e| Error::Internal(format!("serialising evaluation: {e}")))?;
    let Some(sub) = finish_job(tx, job_id, instance, &json)? else {
        return Ok(None);
    };
    let outstanding: i64 = tx.query_row(
        "SELECT COUNT(*) FROM jobs WHERE submission_id = ?1 AND stage = 'eval' AND state != 'done'",
        [&sub],
        |r| r.get(0),
    )?;
    if outstanding > 0 {
        return Ok(Some(None));
    }
    let now = now_ms();
    tx.execute(
        "UPDATE submissions SET state = 'evaluated', updated_at = ?2 WHERE id = ?1 AND state != 'failed'",
        params![sub, now],
    )?;
    if queue_scoring {
        tx.execute(
            "INSERT INTO jobs (submission_id, stage, role, state, created_at)
             VALUES (?1, 'score', '', 'queued', ?2) ON CONFLICT DO NOTHING",
            params![sub, now],
        )?;
    }
    let submitted_at: i64 = tx.query_row(
        "SELECT created_at FROM submissions WHERE id = ?1",
        [&sub],
        |r| r.get(0),
    )?;
    Ok(Some(Some(submitted_at)))
}

/// What became of a failed job.
#[derive(Debug, Clone, PartialEq)]
pub enum FailOutcome {
    /// Back in the queue, runnable at this time (ms since the epoch).
    Retry { at: i64, attempts: u32 },
    /// Out of attempts (or not retryable): the submission failed.
    Failed,
    /// The lease was lost; nothing recorded.
    Ignored,
}

/// Records a failure: retried with exponential backoff while attempts remain,
/// else the submission fails with a human-readable reason.
pub fn fail_job(
    tx: &Transaction<'_>,
    job_id: i64,
    instance: &str,
    error: &str,
    retryable: bool,
    max_attempts: u32,
    backoff_ms: i64,
) -> Result<FailOutcome> {
    let now = now_ms();
    let row: Option<(String, String, u32)> = tx
        .query_row(
            "SELECT submission_id, stage, attempts FROM jobs
             WHERE id = ?1 AND state = 'running' AND lease_owner = ?2",
            params![job_id, instance],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((sub, stage, attempts)) = row else {
        return Ok(FailOutcome::Ignored);
    };
    let attempts = attempts + 1;
    if retryable && attempts < max_attempts {
        let delay = backoff_ms
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(300_000);
        let at = now + delay;
        tx.execute(
            "UPDATE jobs SET state = 'queued', attempts = ?2, not_before = ?3, last_error = ?4,
                    lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
             WHERE id = ?1",
            params![job_id, attempts, at, error],
        )?;
        return Ok(FailOutcome::Retry { at, attempts });
    }
    tx.execute(
        "UPDATE jobs SET state = 'failed', attempts = ?2, last_error = ?3, finished_at = ?4,
                lease_owner = NULL, lease_expires_at = NULL
         WHERE id = ?1",
        params![job_id, attempts, error, now],
    )?;
    let (code, what) = match Stage::parse(&stage) {
        Stage::Stt => ("transcription_failed", "Transcribing your recording"),
        Stage::Eval => ("evaluation_failed", "Evaluating your answer"),
        Stage::Score => ("scoring_failed", "Scoring your answer"),
    };
    let times = if attempts == 1 {
        "once".to_owned()
    } else {
        format!("{attempts} times")
    };
    let reason = format!(
        "{what} failed {times} ({error}). Nothing you did caused this: your recording is saved. \
         Your instructor can retry it from the queue dashboard, or you can submit again."
    );
    fail_submission(tx, &sub, code, &reason)?;
    Ok(FailOutcome::Failed)
}

/// Marks a submission failed and cancels its other outstanding jobs.
pub fn fail_submission(tx: &Transaction<'_>, sub: &str, code: &str, reason: &str) -> Result<()> {
    let now = now_ms();
    tx.execute(
        "UPDATE submissions SET state = 'failed', failure_code = ?2, failure_reason = ?3,
                updated_at = ?4, finished_at = ?4
         WHERE id = ?1 AND state NOT IN ('failed', 'awaiting_review', 'released')",
        params![sub, code, reason, now],
    )?;
    tx.execute(
        "UPDATE jobs SET state = 'failed', last_error = 'cancelled: the submission failed',
                finished_at = ?2, lease_owner = NULL, lease_expires_at = NULL
         WHERE submission_id = ?1 AND state IN ('queued', 'running')",
        params![sub, now],
    )?;
    Ok(())
}

/// Puts one claimed job back without charging an attempt (its worker was
/// stopped for a reason that is not the job's fault).
pub fn requeue(tx: &Transaction<'_>, job_id: i64, instance: &str) -> Result<()> {
    tx.execute(
        "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
         WHERE id = ?1 AND state = 'running' AND lease_owner = ?2",
        params![job_id, instance],
    )?;
    Ok(())
}

/// Records a kind's measured load (`start`) or stop time, as the running
/// average the scheduler keeps, for these models (`models`: the kind's
/// workers' models and options; another configuration starts afresh).
pub fn record_worker_time(
    tx: &Transaction,
    kind: &str,
    models: &str,
    start: Option<f64>,
    stop: Option<f64>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO worker_times (kind, models, start_seconds, stop_seconds, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (kind, models) DO UPDATE SET
             start_seconds = COALESCE(excluded.start_seconds, worker_times.start_seconds),
             stop_seconds = COALESCE(excluded.stop_seconds, worker_times.stop_seconds),
             updated_at = excluded.updated_at",
        params![kind, models, start, stop, now_ms()],
    )?;
    Ok(())
}

/// The recorded load and stop times of `kind` with these models.
pub fn worker_times(
    conn: &Connection,
    kind: &str,
    models: &str,
) -> Result<Option<(Option<f64>, Option<f64>)>> {
    Ok(conn
        .query_row(
            "SELECT start_seconds, stop_seconds FROM worker_times WHERE kind = ?1 AND models = ?2",
            params![kind, models],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// Recent service times, newest first, to seed the ETA estimator at start-up.
pub fn recent_service_times(conn: &Connection, limit: u32) -> Result<Vec<(Stage, f64, f64)>> {
    let mut stmt = conn.prepare(
        "SELECT j.stage, j.service_ms, s.duration_seconds FROM jobs j
         JOIN submissions s ON s.id = j.submission_id
         WHERE j.state = 'done' AND j.service_ms IS NOT NULL AND j.stage IN ('stt', 'eval')
         ORDER BY j.finished_at DESC LIMIT ?1",
    )?;
    let rows = stmt
        .query_map([limit], |r| {
            Ok((
                Stage::parse(&r.get::<_, String>(0)?),
                r.get::<_, i64>(1)? as f64 / 1000.0,
                r.get::<_, f64>(2)?,
            ))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Recent evaluator calls, newest first, to seed the ETA estimator at
/// start-up: (role, items, their audio seconds, call seconds). The jobs of
/// one call were claimed together, so they share `started_at`.
pub fn recent_eval_calls(conn: &Connection, limit: u32) -> Result<Vec<(String, usize, f64, f64)>> {
    let mut stmt = conn.prepare(
        "SELECT j.role, COUNT(*), SUM(s.duration_seconds), MAX(j.service_ms) FROM jobs j
         JOIN submissions s ON s.id = j.submission_id
         WHERE j.state = 'done' AND j.stage = 'eval' AND j.service_ms IS NOT NULL
           AND j.started_at IS NOT NULL
         GROUP BY j.role, j.started_at
         ORDER BY MAX(j.finished_at) DESC LIMIT ?1",
    )?;
    let rows = stmt
        .query_map([limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as usize,
                r.get::<_, f64>(2)?,
                r.get::<_, i64>(3)? as f64 / 1000.0,
            ))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Stores a score, moves the submission to `released` or `awaiting_review`
/// by the assignment's release policy, and queues the grade in the outbox.
/// Returns the new state, or `None` when the lease was lost.
pub fn complete_score(
    tx: &Transaction<'_>,
    job_id: i64,
    instance: &str,
    report: &serde_json::Value,
    release: bool,
) -> Result<Option<SubmissionState>> {
    let json = report.to_string();
    let Some(sub) = finish_job(tx, job_id, instance, &json)? else {
        return Ok(None);
    };
    let now = now_ms();
    // A rescored grade waits for the instructor: a rubric edit changes what
    // a student and the gradebook see only on the instructor's release.
    let rescored: bool = tx.query_row(
        "SELECT rescore_id IS NOT NULL FROM submissions WHERE id = ?1",
        [&sub],
        |r| r.get(0),
    )?;
    let release = release && !rescored;
    let state = if release {
        SubmissionState::Released
    } else {
        SubmissionState::AwaitingReview
    };
    let n = tx.execute(
        "UPDATE submissions SET score = ?2, state = ?3, updated_at = ?4, finished_at = ?4
         WHERE id = ?1 AND state = 'evaluated'",
        params![sub, json, state.as_str(), now],
    )?;
    if n == 0 {
        return Ok(None);
    }
    let kind = if release { "released" } else { "pending" };
    tx.execute(
        "INSERT INTO grade_outbox (submission_id, kind, payload, next_attempt_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT DO NOTHING",
        params![sub, kind, json, now],
    )?;
    Ok(Some(state))
}
// ---- instructors: override, release, retry ------------------------------------------

/// An instructor's change to a grade awaiting review: points and feedback
/// per criterion, overall feedback; the total is recomputed and the change
/// audited. The state does not move (release is separate).
pub(crate) fn override_grade(
    tx: &Transaction<'_>,
    sid: &str,
    actor: &str,
    req: &grades::OverrideRequest,
) -> Result<(serde_json::Value, Vec<grades::Change>)> {
    let s = domain::get_submission(tx, sid)?.ok_or(Error::NotFound("submission"))?;
    if s.state != SubmissionState::AwaitingReview {
        return Err(Error::Conflict {
            code: "not_awaiting_review",
            message: format!(
                "this grade is {}; only a grade awaiting review can be changed",
                s.state.as_str().replace('_', " ")
            ),
        });
    }
    let a = domain::get_assignment(tx, &s.assignment_id)?.ok_or(Error::NotFound("assignment"))?;
    let mut score = s.score.unwrap_or(serde_json::Value::Null);
    let changes = grades::apply_override(&a.rubric, &mut score, req)?;
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
            serde_json::json!({
                "by": actor, "at": now, "note": req.note, "share_note": req.share_note
            }),
        );
    }
    tx.execute(
        "UPDATE submissions SET score = ?2, updated_at = ?3 WHERE id = ?1",
        params![sid, score.to_string(), now],
    )?;
    domain::audit(
        tx,
        actor,
        "submission.override",
        sid,
        serde_json::json!({ "changes": changes, "note": req.note }),
    )?;
    Ok((score, changes))
}

/// Releases one grade awaiting review inside `tx`: the submission becomes
/// `released`, the `released` outbox row (FullyGraded) is queued and the
/// release is audited with `via` (the route that did it). Returns false,
/// changing nothing, when the submission was not awaiting review.
pub(crate) fn release(
    tx: &Transaction<'_>,
    id: &str,
    actor: &str,
    now: i64,
    via: &str,
) -> Result<bool> {
    let n = tx.execute(
        "UPDATE submissions SET state = 'released', updated_at = ?2
         WHERE id = ?1 AND state = 'awaiting_review'",
        params![id, now],
    )?;
    if n == 0 {
        return Ok(false);
    }
    let score: Option<String> =
        tx.query_row("SELECT score FROM submissions WHERE id = ?1", [id], |r| {
            r.get(0)
        })?;
    // Released again after a rescore: the row is sent again with the new
    // grade, timestamped now (a newer score than the one it replaces).
    tx.execute(
        "INSERT INTO grade_outbox (submission_id, kind, payload, next_attempt_at, created_at)
         VALUES (?1, 'released', ?2, ?3, ?3)
         ON CONFLICT (submission_id, kind) DO UPDATE SET payload = excluded.payload,
             state = 'pending', attempts = 0, next_attempt_at = excluded.next_attempt_at,
             last_error = NULL, created_at = excluded.created_at, delivered_at = NULL",
        params![id, score.clone().unwrap_or_else(|| "{}".into()), now],
    )?;
    let total = score
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|s| s.get("total").cloned());
    domain::audit(
        tx,
        actor,
        "submission.release",
        id,
        serde_json::json!({ "via": via, "total": total }),
    )?;
    Ok(true)
}

/// Puts a failed submission back where it failed: its failed jobs are queued
/// again with fresh attempts; an STT retry joins the next batch.
pub(crate) fn retry(tx: &Transaction<'_>, id: &str, actor: &str) -> Result<SubmissionState> {
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

// ---- rescoring after a rubric or plugin edit ------------------------------------------

/// A rescore: settled submissions of an assignment brought to its current
/// version, each by the cheapest correct path.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rescore {
    pub id: String,
    pub assignment_id: String,
    /// The version the submissions are brought to.
    pub version: i64,
    pub total: i64,
    /// Scored again from their stored evaluations (no model call).
    pub scoring_only: i64,
    /// Evaluated again through the queue.
    pub reevaluate: i64,
    /// Settled again (awaiting review, released or failed).
    pub done: i64,
    pub failed: i64,
    pub created_by: String,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

fn rescore_from_row(r: &crate::db::Row) -> crate::db::Result<Rescore> {
    Ok(Rescore {
        id: r.get("id")?,
        assignment_id: r.get("assignment_id")?,
        version: r.get("version")?,
        total: r.get("total")?,
        scoring_only: r.get("scoring_only")?,
        reevaluate: r.get("reevaluate")?,
        done: r.get::<_, Option<i64>>("done")?.unwrap_or(0),
        failed: r.get::<_, Option<i64>>("failed")?.unwrap_or(0),
        created_by: r.get("created_by")?,
        created_at: r.get("created_at")?,
        finished_at: r.get("finished_at")?,
    })
}

/// An assignment's rescores, newest first, with their progress (counted
/// live until they finish).
pub fn rescores(conn: &Connection, assignment_id: &str) -> Result<Vec<Rescore>> {
    let mut stmt = conn.prepare(
        "SELECT * FROM rescores WHERE assignment_id = ?1 ORDER BY created_at DESC, id DESC",
    )?;
    let mut rows = stmt
        .query_map([assignment_id], rescore_from_row)?
        .collect::<crate::db::Result<Vec<_>>>()?;
    for r in &mut rows {
        if r.finished_at.is_none() {
            let (done, failed) = rescore_counts(conn, &r.id)?;
            r.done = done;
            r.failed = failed;
        }
    }
    Ok(rows)
}

/// (settled, failed) submissions of a rescore.
fn rescore_counts(conn: &Connection, id: &str) -> Result<(i64, i64)> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(CASE WHEN state IN ('awaiting_review', 'released', 'failed') THEN 1 ELSE 0 END), 0),
                COALESCE(SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END), 0)
         FROM submissions WHERE rescore_id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Records the counts of an assignment's rescores whose submissions have
/// all settled (a later rescore takes the submissions over).
fn finish_rescores(tx: &Transaction<'_>, assignment_id: &str) -> Result<bool> {
    let open: Vec<(String, i64)> = {
        let mut stmt = tx.prepare(
            "SELECT id, total FROM rescores WHERE assignment_id = ?1 AND finished_at IS NULL",
        )?;
        stmt.query_map([assignment_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<crate::db::Result<Vec<_>>>()?
    };
    let mut running = false;
    for (id, total) in open {
        let (done, failed) = rescore_counts(tx, &id)?;
        if done < total {
            running = true;
            continue;
        }
        tx.execute(
            "UPDATE rescores SET done = ?2, failed = ?3, finished_at = ?4 WHERE id = ?1",
            params![id, done, failed, now_ms()],
        )?;
    }
    Ok(running)
}

/// Starts a rescore of `assignment_id`: every submission awaiting review
/// or released under an older version is brought to the current one.
/// When only points, weights, the plugin or its configuration changed
/// since its version, its score job is queued again (the plugin rescores
/// the stored evaluations: no model call); when the prompt, criteria or
/// levels changed, its evaluations are queued again. Either way it is
/// scored anew and waits for the instructor's release (`complete_score`),
/// so the student and the gradebook keep the released grade until then.
/// Refused while an earlier rescore of the assignment is still running.
/// Audited as `assignment.rescore`.
pub(crate) fn start_rescore(
    tx: &Transaction<'_>,
    assignment_id: &str,
    actor: &str,
) -> Result<Rescore> {
    let a = domain::get_assignment(tx, assignment_id)?.ok_or(Error::NotFound("assignment"))?;
    if finish_rescores(tx, assignment_id)? {
        return Err(Error::Conflict {
            code: "rescore_running",
            message: "a rescore of this assignment is still running; wait for it to finish \
                      (GET /api/v1/assignments/{id}/rescores shows its progress)"
                .into(),
        });
    }
    let current = domain::get_version(tx, assignment_id, a.version)?;
    let stale: Vec<(String, Option<i64>)> = {
        let mut stmt = tx.prepare(
            "SELECT id, assignment_version FROM submissions
             WHERE assignment_id = ?1 AND state IN ('awaiting_review', 'released')
               AND COALESCE(assignment_version, 0) != ?2
             ORDER BY created_at, id",
        )?;
        stmt.query_map(params![assignment_id, a.version], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?
    };
    let id = domain::new_id("rsc");
    let now = now_ms();
    let (mut scoring_only, mut reevaluate) = (0i64, 0i64);
    for (sid, version) in &stale {
        let before = match version {
            Some(v) => domain::get_version(tx, assignment_id, *v)?,
            None => None,
        };
        let change = match (&before, &current) {
            (Some(b), Some(c)) => rescore_change(b, c),
            _ => domain::VersionChange::Evaluation,
        };
        if change == domain::VersionChange::Evaluation {
            reevaluate += 1;
            tx.execute(
                "DELETE FROM jobs WHERE submission_id = ?1 AND stage = 'score'",
                [sid],
            )?;
            tx.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, not_before = 0, result = NULL,
                        last_error = NULL, lease_owner = NULL, lease_expires_at = NULL,
                        started_at = NULL, finished_at = NULL, service_ms = NULL
                 WHERE submission_id = ?1 AND stage = 'eval'",
                [sid],
            )?;
            tx.execute(
                "UPDATE submissions SET state = 'transcribed', assignment_version = ?2,
                        rescore_id = ?3, updated_at = ?4, finished_at = NULL
                 WHERE id = ?1",
                params![sid, a.version, id, now],
            )?;
        } else {
            scoring_only += 1;
            tx.execute(
                "INSERT INTO jobs (submission_id, stage, role, state, created_at)
                 VALUES (?1, 'score', '', 'queued', ?2)
                 ON CONFLICT (submission_id, stage, role) DO UPDATE SET state = 'queued',
                     attempts = 0, not_before = 0, last_error = NULL, lease_owner = NULL,
                     lease_expires_at = NULL, started_at = NULL, finished_at = NULL",
                params![sid, now],
            )?;
            tx.execute(
                "UPDATE submissions SET state = 'evaluated', assignment_version = ?2,
                        rescore_id = ?3, updated_at = ?4, finished_at = NULL
                 WHERE id = ?1",
                params![sid, a.version, id, now],
            )?;
        }
    }
    let total = scoring_only + reevaluate;
    tx.execute(
        "INSERT INTO rescores (id, assignment_id, version, total, scoring_only, reevaluate,
             created_by, created_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, CASE WHEN ?4 = 0 THEN ?8 END)",
        params![
            id,
            assignment_id,
            a.version,
            total,
            scoring_only,
            reevaluate,
            actor,
            now
        ],
    )?;
    domain::audit(
        tx,
        actor,
        "assignment.rescore",
        assignment_id,
        serde_json::json!({
            "rescore": id, "version": a.version, "total": total,
            "scoring_only": scoring_only, "reevaluate": reevaluate,
            "submissions": stale.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        }),
    )?;
    Ok(tx.query_row(
        "SELECT * FROM rescores WHERE id = ?1",
        [&id],
        rescore_from_row,
    )?)
}

/// What bringing a submission graded under `from` to `to` needs: a new
/// evaluation when the judged parts differ, else scoring only.
fn rescore_change(
    from: &domain::AssignmentVersion,
    to: &domain::AssignmentVersion,
) -> domain::VersionChange {
    let as_assignment = |v: &domain::AssignmentVersion| domain::Assignment {
        id: v.assignment_id.clone(),
        context_id: String::new(),
        title: String::new(),
        prompt: v.prompt.clone(),
        rubric: v.rubric.clone(),
        plugin: v.plugin.clone(),
        plugin_config: v.plugin_config.clone(),
        release_policy: domain::ReleasePolicy::Manual,
        max_attempts: None,
        created_at: 0,
        updated_at: 0,
        version: v.version,
        plugin_sha256: v.plugin_sha256.clone(),
        // Language and vocabulary shape transcription, not grading: they
        // are not part of a version.
        language: None,
        vocabulary: None,
    };
    domain::version_change(&as_assignment(from), &as_assignment(to))
        .map_or(domain::VersionChange::Scoring, |(c, _)| c)
}
