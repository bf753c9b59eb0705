//! Grade passback: the outbox worker.
//!
//! Scoring writes a `grade_outbox` row: `pending` when the grade waits for an
//! instructor (→ AGS `PendingManual`), `released` when it is out (→
//! `FullyGraded` with the score and feedback). `POST
//! /api/v1/submissions/{id}/release` moves an `awaiting_review` submission to
//! `released` and writes the `released` row. The worker here delivers rows to
//! every platform link the student launched the assignment from, with
//! retries and backoff; each score carries the time of the state change it
//! reports (the row's creation), so a retried or late POST never regresses
//! what the platform shows. A `pending` row is skipped once a `released` row
//! exists.
//!
//! Grades never go backwards on the platform: while a newer attempt waits
//! for review, the gradebook keeps the grade released for an earlier attempt
//! of the same assignment. Its `PendingManual` (no `scoreGiven`, a newer
//! timestamp) would make Moodle and Canvas show "no grade", so it is not
//! sent (the row is recorded as delivered with that note); the newer
//! attempt's grade replaces the old one when it is released. Platform refusals (Moodle's 400 for users who cannot be graded,
//! for instance) are recorded on the row and shown to instructors at
//! `GET /api/v1/submissions/{id}/passback`.

use std::time::Duration;

use crate::db::{OptionalExtension, params};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use viva_lti::LtiError;
use viva_lti::services::{ActivityProgress, GradingProgress, LineItem, Score, rfc3339_ms, scopes};

use crate::clock::now_ms;
use crate::domain;
use crate::error::Result;
use crate::lti::{self, Link, Lti};
use crate::store::Store;

/// What the outbox worker needs: the store and the LTI runtime.
#[derive(Clone)]
pub(crate) struct Passback {
    pub store: Store,
    pub lti: Lti,
    /// This node's id (the passback singleton is held under it).
    pub node: String,
}

/// One outbox row as instructors see it.
#[derive(Debug, Serialize, PartialEq)]
pub struct OutboxView {
    pub kind: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
}

pub fn outbox_rows(conn: &crate::db::Connection, submission: &str) -> Result<Vec<OutboxView>> {
    let mut stmt = conn.prepare(
        "SELECT kind, state, attempts, last_error, created_at, next_attempt_at, delivered_at
         FROM grade_outbox WHERE submission_id = ?1 ORDER BY created_at, id",
    )?;
    let rows = stmt
        .query_map([submission], |r| {
            Ok(OutboxView {
                kind: r.get(0)?,
                state: r.get(1)?,
                attempts: r.get(2)?,
                last_error: r.get(3)?,
                created_at: r.get(4)?,
                next_attempt_at: r.get(5)?,
                delivered_at: r.get(6)?,
            })
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

// ---- the worker -------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Row {
    id: i64,
    submission_id: String,
    kind: String,
    payload: serde_json::Value,
    attempts: i64,
    created_at: i64,
}

/// How a delivery ended.
enum Outcome {
    Delivered(Option<String>),
    Failed(LtiError),
}

/// How often a node looks for a key ring another node rotated.
const KEY_REFRESH: Duration = Duration::from_secs(60);

/// Delivers due outbox rows until `shutdown`; also runs tool key rotation.
pub(crate) async fn run(st: Passback, shutdown: CancellationToken) {
    let mut next_key_check = std::time::Instant::now();
    let mut next_key_refresh = std::time::Instant::now() + KEY_REFRESH;
    loop {
        if std::time::Instant::now() >= next_key_check {
            st.lti.maintain_keys(&st.store, &st.node).await;
            next_key_check = std::time::Instant::now() + Duration::from_secs(3600);
        }
        // Another node's rotation reaches this one within a minute (a new
        // key is published for `key_publish_lead` before it signs).
        if std::time::Instant::now() >= next_key_refresh {
            if let Err(e) = st.lti.refresh_keys(&st.store).await {
                tracing::warn!(error = %e, "LTI keys: cannot read the shared key ring");
            }
            next_key_refresh = std::time::Instant::now() + KEY_REFRESH;
        }
        // One node delivers at a time (several api nodes on one store).
        let node = st.node.clone();
        match st
            .store
            .write(move |tx| crate::jobs::claim_singleton(tx, "passback", &node, 30_000))
            .await
        {
            Ok(true) => {
                if let Err(e) = deliver_due(&st).await {
                    tracing::warn!(error = %e, "grade passback round failed");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "grade passback: cannot reach the store"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = st.lti.passback_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Delivers every due row once; returns how many rows were handled.
pub async fn deliver_due(st: &Passback) -> Result<usize> {
    let now = now_ms();
    let rows: Vec<Row> = st
        .store
        .read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, submission_id, kind, payload, attempts, created_at FROM grade_outbox
                 WHERE state = 'pending' AND next_attempt_at <= ?1
                 ORDER BY created_at, id LIMIT 20",
            )?;
            let rows = stmt
                .query_map([now], |r| {
                    let payload: String = r.get(3)?;
                    Ok(Row {
                        id: r.get(0)?,
                        submission_id: r.get(1)?,
                        kind: r.get(2)?,
                        payload: serde_json::from_str(&payload).unwrap_or_default(),
                        attempts: r.get(4)?,
                        created_at: r.get(5)?,
                    })
                })?
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    let n = rows.len();
    for row in rows {
        let outcome = deliver(st, &row).await;
        record(st, &row, outcome).await?;
    }
    Ok(n)
}

async fn record(st: &Passback, row: &Row, outcome: Outcome) -> Result<()> {
    let now = now_ms();
    let id = row.id;
    match outcome {
        Outcome::Delivered(note) => {
            st.store
                .write(move |tx| {
                    tx.execute(
                        "UPDATE grade_outbox SET state = 'delivered', delivered_at = ?2,
                         last_error = ?3 WHERE id = ?1",
                        params![id, now, note],
                    )?;
                    Ok(())
                })
                .await
        }
        Outcome::Failed(e) => {
            let attempts = row.attempts + 1;
            let max = i64::from(st.lti.config.passback_max_attempts.max(1));
            let dead = !e.is_transient() || attempts >= max;
            let base = st.lti.config.passback_retry_backoff.as_millis() as i64;
            let delay = base
                .saturating_mul(1i64 << (attempts - 1).clamp(0, 20))
                .min(3_600_000);
            let msg = e.to_string();
            if dead {
                tracing::warn!(submission = %row.submission_id, kind = %row.kind, code = e.code(), error = %msg, "grade passback gave up");
            } else {
                tracing::info!(submission = %row.submission_id, kind = %row.kind, code = e.code(), error = %msg, attempts, "grade passback will retry");
            }
            st.store
                .write(move |tx| {
                    tx.execute(
                        "UPDATE grade_outbox SET state = ?2, attempts = ?3, last_error = ?4,
                         next_attempt_at = ?5 WHERE id = ?1",
                        params![
                            id,
                            if dead { "dead" } else { "pending" },
                            attempts,
                            msg,
                            now + delay
                        ],
                    )?;
                    Ok(())
                })
                .await
        }
    }
}

/// The feedback text sent as the score's comment.
fn feedback(payload: &serde_json::Value) -> Option<String> {
    let report = &payload["report"];
    let text = report["feedback"]
        .as_str()
        .or_else(|| report["summary"].as_str())
        .map(str::to_owned)
        .or_else(|| {
            let reasons: Vec<&str> = payload["reasons"]
                .as_array()
                .map(|a| a.iter().filter_map(|r| r.as_str()).collect())
                .unwrap_or_default();
            (!reasons.is_empty()).then(|| reasons.join("\n"))
        })?;
    Some(text.chars().take(10_000).collect())
}

async fn deliver(st: &Passback, row: &Row) -> Outcome {
    let sid = row.submission_id.clone();
    let kind = row.kind.clone();
    let lookup = st
        .store
        .read(move |conn| {
            let superseded = kind == "pending"
                && conn
                    .query_row(
                        "SELECT 1 FROM grade_outbox WHERE submission_id = ?1 AND kind = 'released'",
                        [&sid],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
            // An earlier attempt's grade is out: keep it until this one is.
            let keeps_earlier = kind == "pending"
                && conn
                    .query_row(
                        "SELECT 1 FROM submissions s
                         JOIN submissions o ON o.assignment_id = s.assignment_id
                              AND o.user_id = s.user_id AND o.attempt < s.attempt
                         JOIN grade_outbox g ON g.submission_id = o.id AND g.kind = 'released'
                         WHERE s.id = ?1 LIMIT 1",
                        [&sid],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
            let targets = lti::passback_targets(conn, &sid)?;
            let mut out = Vec::new();
            for (link, sub) in targets {
                let reg = lti::get_registration(conn, &link.issuer, &link.client_id)?;
                let assignment = match &link.assignment_id {
                    Some(a) => domain::get_assignment(conn, a)?,
                    None => None,
                };
                out.push((link, sub, reg, assignment));
            }
            Ok((superseded, keeps_earlier, out))
        })
        .await;
    let (superseded, keeps_earlier, targets) = match lookup {
        Ok(v) => v,
        Err(e) => {
            return Outcome::Failed(LtiError::Http {
                url: String::new(),
                reason: format!("reading the outbox: {e}"),
            });
        }
    };
    if superseded {
        return Outcome::Delivered(Some("superseded by the release".into()));
    }
    if keeps_earlier {
        return Outcome::Delivered(Some(
            "not sent: the gradebook keeps the released grade of an earlier attempt until this one is released".into(),
        ));
    }
    if targets.is_empty() {
        return Outcome::Delivered(Some("not launched from a platform: nothing to send".into()));
    }
    let released = row.kind == "released";
    let now = viva_lti::now_secs();
    for (link, sub, reg, assignment) in targets {
        let Some(reg) = reg else {
            return Outcome::Failed(LtiError::UnknownRegistration {
                issuer: link.issuer.clone(),
                client_id: Some(link.client_id.clone()),
            });
        };
        let max = row.payload["max"]
            .as_f64()
            .filter(|m| *m > 0.0)
            .or_else(|| assignment.as_ref().map(|a| a.rubric.max_points()))
            .unwrap_or(0.0);
        let lineitem = match line_item(st, &reg, &link, assignment.as_ref(), max, now).await {
            Ok(li) => li,
            Err(e) => return Outcome::Failed(e),
        };
        let score = Score {
            user_id: sub,
            score_given: released.then(|| row.payload["total"].as_f64().unwrap_or(0.0)),
            score_maximum: released.then_some(max),
            comment: if released {
                feedback(&row.payload)
            } else {
                None
            },
            timestamp: rfc3339_ms(row.created_at),
            activity_progress: if released {
                ActivityProgress::Completed
            } else {
                ActivityProgress::Submitted
            },
            grading_progress: if released {
                GradingProgress::FullyGraded
            } else {
                GradingProgress::PendingManual
            },
        };
        if let Err(e) = st
            .lti
            .services
            .publish_score(&reg, &lineitem, &score, now)
            .await
        {
            return Outcome::Failed(e);
        }
        tracing::info!(submission = %row.submission_id, link = %link.id, kind = %row.kind, "grade sent to the platform");
    }
    Outcome::Delivered(None)
}

/// The link's line item: from the signed launch claim, else found or created
/// in the platform's line item container (and remembered).
async fn line_item(
    st: &Passback,
    reg: &viva_lti::Registration,
    link: &Link,
    assignment: Option<&domain::Assignment>,
    max: f64,
    now: u64,
) -> std::result::Result<String, LtiError> {
    if let Some(li) = &link.lineitem_url {
        return Ok(li.clone());
    }
    let Some(container) = &link.lineitems_url else {
        return Err(LtiError::InvalidClaim {
            claim: "ags endpoint",
            reason: "the platform gave this link neither a line item nor a line item service"
                .into(),
        });
    };
    if !link.ags_scopes.is_empty() && !link.ags_scopes.iter().any(|s| s == scopes::LINEITEM) {
        return Err(LtiError::InvalidClaim {
            claim: "ags scope",
            reason: "the platform did not allow this tool to create line items".into(),
        });
    }
    let label = assignment
        .map(|a| a.title.clone())
        .or(link.title.clone())
        .unwrap_or_else(|| "Viva".into());
    let spec = LineItem {
        id: None,
        score_maximum: if max > 0.0 { max } else { 100.0 },
        label,
        resource_id: link.assignment_id.clone(),
        resource_link_id: Some(link.resource_link_id.clone()),
        tag: Some("viva".into()),
    };
    let li = st
        .lti
        .services
        .find_or_create_line_item(reg, container, &spec, now)
        .await?;
    let url = li.id.unwrap_or_default();
    let (link_id, u) = (link.id.clone(), url.clone());
    st.store
        .write(move |tx| lti::set_link_lineitem(tx, &link_id, &u))
        .await
        .map_err(|e| LtiError::Http {
            url: String::new(),
            reason: format!("remembering the line item: {e}"),
        })?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_prefers_the_report() {
        let p = serde_json::json!({"total": 3, "max": 4, "reasons": ["a", "b"], "report": {"feedback": "Well done."}});
        assert_eq!(feedback(&p).as_deref(), Some("Well done."));
        let p = serde_json::json!({"reasons": ["a", "b"], "report": {}});
        assert_eq!(feedback(&p).as_deref(), Some("a\nb"));
        assert_eq!(feedback(&serde_json::json!({})), None);
    }
}
