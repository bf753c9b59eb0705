//! Retention and students' data rights: media deleted `retention_days` after
//! a submission settles, per-student export and deletion.

use crate::db::{Connection, params};

use crate::clock::now_ms;
use crate::domain::{self, SubmissionFilter};
use crate::error::Result;
use crate::store::Store;

/// Deletes the media of submissions settled more than `days` days ago.
/// Transcripts, evaluations and grades stay. Returns how many were purged.
pub async fn purge_expired(store: &Store, days: u32) -> Result<usize> {
    if days == 0 {
        return Ok(0);
    }
    let cutoff = now_ms() - i64::from(days) * 86_400_000;
    let due: Vec<(String, Option<String>)> = store
        .read(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, media_dir FROM submissions
                 WHERE finished_at IS NOT NULL AND finished_at < ?1 AND media_purged_at IS NULL",
            )?;
            let rows = stmt
                .query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    let mut n = 0;
    for (id, dir) in due {
        if let Some(dir) = &dir {
            match tokio::fs::remove_dir_all(dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(submission = %id, error = %e, "could not delete media; will retry");
                    continue;
                }
            }
        }
        store
            .write(move |tx| {
                tx.execute(
                    "UPDATE submissions SET media_purged_at = ?2, wav_path = NULL, original_path = NULL
                     WHERE id = ?1",
                    params![id, now_ms()],
                )?;
                domain::audit(tx, "viva", "media.purge", &id, serde_json::json!({ "days": days }))
            })
            .await?;
        n += 1;
    }
    if n > 0 {
        tracing::info!(purged = n, days, "deleted media past its retention period");
    }
    Ok(n)
}

/// Everything Viva holds about one user, as JSON. Submissions for which
/// `full_view(context)` is false are shown as their author sees them
/// ([`domain::Submission::redact_for_learner`]): a learner's own export
/// holds no unreleased grade.
pub fn export_user(
    conn: &Connection,
    user: &str,
    full_view: impl Fn(&str) -> bool,
) -> Result<serde_json::Value> {
    let profile: Option<(String, String, i64)> = {
        use crate::db::OptionalExtension;
        conn.query_row(
            "SELECT name, email, created_at FROM users WHERE id = ?1",
            [user],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
    };
    let mut stmt = conn.prepare("SELECT context_id, roles FROM memberships WHERE user_id = ?1")?;
    let memberships: Vec<serde_json::Value> = stmt
        .query_map([user], |r| {
            Ok(serde_json::json!({ "context_id": r.get::<_, String>(0)?, "roles": r.get::<_, String>(1)? }))
        })?
        .collect::<crate::db::Result<_>>()?;
    let mut submissions = domain::list_submissions(
        conn,
        &SubmissionFilter {
            user_id: Some(user.to_owned()),
            ..Default::default()
        },
    )?;
    for s in &mut submissions {
        if !full_view(&s.context_id) {
            s.redact_for_learner();
        }
    }
    Ok(serde_json::json!({
        "user_id": user,
        "profile": profile.map(|(name, email, created_at)| serde_json::json!({
            "name": name, "email": email, "created_at": created_at
        })),
        "memberships": memberships,
        "submissions": submissions,
        "exported_at": now_ms(),
    }))
}

/// Deletes a user's submissions (rows and media), memberships and profile.
/// Returns the number of submissions deleted.
pub async fn delete_user(store: &Store, user: &str, actor: &str) -> Result<usize> {
    let u = user.to_owned();
    let dirs: Vec<Option<String>> = store
        .read(move |c| {
            let mut stmt = c.prepare("SELECT media_dir FROM submissions WHERE user_id = ?1")?;
            let rows = stmt
                .query_map([u], |r| r.get(0))?
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await?;
    let u = user.to_owned();
    let actor = actor.to_owned();
    let n = store
        .write(move |tx| {
            tx.execute(
                "DELETE FROM jobs WHERE submission_id IN (SELECT id FROM submissions WHERE user_id = ?1)",
                [&u],
            )?;
            tx.execute(
                "DELETE FROM grade_outbox WHERE submission_id IN (SELECT id FROM submissions WHERE user_id = ?1)",
                [&u],
            )?;
            let n = tx.execute("DELETE FROM submissions WHERE user_id = ?1", [&u])?;
            tx.execute("DELETE FROM memberships WHERE user_id = ?1", [&u])?;
            tx.execute("DELETE FROM users WHERE id = ?1", [&u])?;
            domain::audit(tx, &actor, "user.delete", &u, serde_json::json!({ "submissions": n }))?;
            Ok(n)
        })
        .await?;
    for dir in dirs.into_iter().flatten() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    Ok(n)
}
