//! The data model: courses (contexts), users with roles, assignments and
//! submissions, and the SQL that reads and writes them.

use crate::db::{Connection, OptionalExtension, Row, Transaction, params};
use serde::{Deserialize, Serialize};
use viva_models::{Evaluation, Rubric, Transcript};

use crate::clock::now_ms;
use crate::error::{Error, Result};

/// A role within a context. LTI roles map onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Learner,
    Instructor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Learner => "learner",
            Role::Instructor => "instructor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "learner" => Some(Role::Learner),
            "instructor" => Some(Role::Instructor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReleasePolicy {
    /// An instructor releases every grade.
    #[default]
    Manual,
    /// Released at once unless the scorer flags the submission for review
    /// or an evaluator flagged it.
    AutoUnlessFlagged,
    /// Released at once, unless an evaluator flagged it (instruction-like
    /// content, evidence not in the transcript, degenerate output …): the
    /// daemon holds those for review whatever the plugin says.
    Auto,
}

impl ReleasePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleasePolicy::Manual => "manual",
            ReleasePolicy::AutoUnlessFlagged => "auto-unless-flagged",
            ReleasePolicy::Auto => "auto",
        }
    }

    fn parse(s: &str) -> ReleasePolicy {
        match s {
            "auto" => ReleasePolicy::Auto,
            "auto-unless-flagged" => ReleasePolicy::AutoUnlessFlagged,
            _ => ReleasePolicy::Manual,
        }
    }
}

/// Where a submission is in its life. `Failed`, `AwaitingReview` and
/// `Released` end processing; `Evaluated` does too while no scorer is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmissionState {
    /// Waiting for speech-to-text.
    Queued,
    Transcribing,
    /// Waiting for evaluation.
    Transcribed,
    Evaluating,
    /// Both evaluations done; waiting for the rubric plugin.
    Evaluated,
    /// Scored; the grade waits for an instructor to release it.
    AwaitingReview,
    /// Scored and released to the student and the gradebook.
    Released,
    Failed,
}

impl SubmissionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SubmissionState::Queued => "queued",
            SubmissionState::Transcribing => "transcribing",
            SubmissionState::Transcribed => "transcribed",
            SubmissionState::Evaluating => "evaluating",
            SubmissionState::Evaluated => "evaluated",
            SubmissionState::AwaitingReview => "awaiting_review",
            SubmissionState::Released => "released",
            SubmissionState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<SubmissionState> {
        Some(match s {
            "queued" => SubmissionState::Queued,
            "transcribing" => SubmissionState::Transcribing,
            "transcribed" => SubmissionState::Transcribed,
            "evaluating" => SubmissionState::Evaluating,
            "evaluated" => SubmissionState::Evaluated,
            "awaiting_review" => SubmissionState::AwaitingReview,
            "released" => SubmissionState::Released,
            "failed" => SubmissionState::Failed,
            _ => return None,
        })
    }

    /// Whether processing is over (a grade or a failure exists).
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            SubmissionState::AwaitingReview | SubmissionState::Released | SubmissionState::Failed
        )
    }

    /// The queue phase a student sees.
    pub fn phase(self) -> &'static str {
        match self {
            SubmissionState::Queued | SubmissionState::Transcribing => "stt",
            SubmissionState::Transcribed | SubmissionState::Evaluating => "evaluation",
            SubmissionState::Evaluated => "scoring",
            SubmissionState::AwaitingReview | SubmissionState::Released => "done",
            SubmissionState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub id: String,
    pub context_id: String,
    pub title: String,
    /// The spoken prompt students answer.
    pub prompt: String,
    pub rubric: Rubric,
    /// Name of the scoring plugin.
    pub plugin: String,
    pub plugin_config: serde_json::Value,
    pub release_policy: ReleasePolicy,
    /// Attempts each student has (`None`: unlimited).
    pub max_attempts: Option<u32>,
    /// The answers' language, a Whisper code such as "fr" (`None`: Whisper
    /// detects it from each recording).
    pub language: Option<String>,
    /// Course terms given to Whisper as its initial prompt, so it spells
    /// them as the course does (`None`: none).
    pub vocabulary: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The current version of the rubric, prompt, plugin and its
    /// configuration (see [`AssignmentVersion`]); new submissions are graded
    /// under it.
    #[serde(default)]
    pub version: i64,
    /// The plugin pinned by the sha256 of its file when the assignment was
    /// saved: a later upload under the same name changes no grade until the
    /// assignment is saved again. Empty: resolved by name (assignments from
    /// before versions, the sandbox, course copies of those).
    #[serde(default)]
    pub plugin_sha256: String,
}

/// Body of `POST /api/v1/assignments` and `PUT /api/v1/assignments/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentInput {
    #[serde(default)]
    pub id: Option<String>,
    pub title: String,
    pub prompt: String,
    pub rubric: Rubric,
    #[serde(default)]
    pub plugin: Option<String>,
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(default)]
    pub release_policy: Option<ReleasePolicy>,
    /// Attempts each student has (absent or null: unlimited).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The answers' language: a Whisper code ("fr"; a tag such as "fr-CA"
    /// is stored as "fr"), or absent, null, "" or "auto" to detect it.
    #[serde(default)]
    pub language: Option<String>,
    /// Course terms for Whisper's initial prompt (absent, null or "": none).
    #[serde(default)]
    pub vocabulary: Option<String>,
}

pub const DEFAULT_PLUGIN: &str = "weighted-criteria";

impl AssignmentInput {
    pub fn validate(&self) -> Result<()> {
        if self.title.trim().is_empty() {
            return Err(Error::bad_request(
                "invalid_assignment",
                "title must not be empty",
            ));
        }
        if self.prompt.trim().is_empty() {
            return Err(Error::bad_request(
                "invalid_assignment",
                "prompt must not be empty: it is the question students answer",
            ));
        }
        if let Some(id) = &self.id {
            validate_id(id, "assignment id")?;
        }
        self.rubric
            .validate()
            .map_err(|e| Error::bad_request("invalid_rubric", e.to_string()))?;
        if self.max_attempts == Some(0) {
            return Err(Error::bad_request(
                "invalid_assignment",
                "max_attempts must be at least 1 (leave it out for unlimited attempts)",
            ));
        }
        viva_models::language::normalise_language(self.language.as_deref())
            .map_err(|m| Error::bad_request("invalid_assignment", m))?;
        viva_models::language::normalise_vocabulary(self.vocabulary.as_deref())
            .map_err(|m| Error::bad_request("invalid_assignment", m))?;
        if let Some(cfg) = &self.plugin_config
            && !cfg.is_object()
        {
            return Err(Error::bad_request(
                "invalid_assignment",
                "plugin_config must be a JSON object",
            ));
        }
        Ok(())
    }
}

/// Ids that come from outside (LTI, API) must be safe in URLs and logs.
pub fn validate_id(id: &str, what: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(
            "invalid_id",
            format!(
                "{what} {id:?} must be 1-128 characters of letters, digits, '-', '_', '.', ':'"
            ),
        ))
    }
}

/// A random identifier with a readable prefix, e.g. `sub_3f9c…`.
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

pub fn ensure_context(tx: &Transaction<'_>, id: &str, title: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO contexts (id, title, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO NOTHING",
        params![id, title, now_ms()],
    )?;
    Ok(())
}

/// Creates or updates a user and their roles in a context.
pub fn ensure_member(
    tx: &Transaction<'_>,
    context_id: &str,
    user_id: &str,
    name: Option<&str>,
    roles: &[Role],
) -> Result<()> {
    let now = now_ms();
    tx.execute(
        "INSERT INTO users (id, name, created_at) VALUES (?1, COALESCE(?2, ''), ?3)
         ON CONFLICT(id) DO UPDATE SET name = COALESCE(?2, users.name)",
        params![user_id, name, now],
    )?;
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    tx.execute(
        "INSERT INTO memberships (context_id, user_id, roles, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(context_id, user_id) DO UPDATE SET roles = ?3, updated_at = ?4",
        params![context_id, user_id, roles.join(","), now],
    )?;
    Ok(())
}

fn assignment_from_row(r: &Row) -> crate::db::Result<(Assignment, String, String)> {
    Ok((
        Assignment {
            id: r.get("id")?,
            context_id: r.get("context_id")?,
            title: r.get("title")?,
            prompt: r.get("prompt")?,
            rubric: Rubric { criteria: vec![] },
            plugin: r.get("plugin")?,
            plugin_config: serde_json::Value::Null,
            release_policy: ReleasePolicy::parse(&r.get::<_, String>("release_policy")?),
            max_attempts: r.get("max_attempts")?,
            language: r.get("language")?,
            vocabulary: r.get("vocabulary")?,
            created_at: r.get("created_at")?,
            updated_at: r.get("updated_at")?,
            version: r.get("version")?,
            plugin_sha256: r.get("plugin_sha256")?,
        },
        r.get("rubric")?,
        r.get("plugin_config")?,
    ))
}

fn finish_assignment((mut a, rubric, cfg): (Assignment, String, String)) -> Result<Assignment> {
    a.rubric = serde_json::from_str(&rubric)
        .map_err(|e| Error::Internal(format!("stored rubric of {} is invalid: {e}", a.id)))?;
    a.plugin_config = serde_json::from_str(&cfg).unwrap_or(serde_json::Value::Null);
    Ok(a)
}

pub fn get_assignment(conn: &Connection, id: &str) -> Result<Option<Assignment>> {
    conn.query_row(
        "SELECT * FROM assignments WHERE id = ?1",
        [id],
        assignment_from_row,
    )
    .optional()?
    .map(finish_assignment)
    .transpose()
}

pub fn list_assignments(conn: &Connection, context_id: &str) -> Result<Vec<Assignment>> {
    let mut stmt =
        conn.prepare("SELECT * FROM assignments WHERE context_id = ?1 ORDER BY created_at, id")?;
    let rows = stmt
        .query_map([context_id], assignment_from_row)?
        .collect::<crate::db::Result<Vec<_>>>()?;
    rows.into_iter().map(finish_assignment).collect()
}

/// Inserts or replaces an assignment; returns it as stored. The plugin
/// stays pinned to the sha256 it had when its name is unchanged; see
/// [`save_assignment`] to pin a resolved one and name the actor.
pub fn upsert_assignment(
    tx: &Transaction<'_>,
    context_id: &str,
    id: &str,
    input: &AssignmentInput,
) -> Result<Assignment> {
    save_assignment(tx, context_id, id, input, None, "system").map(|(a, _)| a)
}

/// Inserts or replaces an assignment, pinning the plugin to `plugin_sha256`
/// (the file the name resolved to when it was checked; `None`: keep the
/// current pin when the name is unchanged). When the prompt, rubric, plugin
/// or its configuration changed, a new [`AssignmentVersion`] is recorded
/// and returned (a new assignment is version 1).
pub fn save_assignment(
    tx: &Transaction<'_>,
    context_id: &str,
    id: &str,
    input: &AssignmentInput,
    plugin_sha256: Option<&str>,
    actor: &str,
) -> Result<(Assignment, Option<AssignmentVersion>)> {
    let before = get_assignment(tx, id)?;
    let plugin = input.plugin.as_deref().unwrap_or(DEFAULT_PLUGIN);
    let sha = match (plugin_sha256, &before) {
        (Some(sha), _) => sha.to_owned(),
        (None, Some(b)) if b.plugin == plugin => b.plugin_sha256.clone(),
        (None, _) => String::new(),
    };
    let a = write_assignment(tx, context_id, id, input)?;
    tx.execute(
        "UPDATE assignments SET plugin_sha256 = ?2 WHERE id = ?1",
        params![id, sha],
    )?;
    let mut a = Assignment {
        plugin_sha256: sha,
        ..a
    };
    let change = match &before {
        None => Some((VersionChange::Created, "created".to_owned())),
        Some(b) => version_change(b, &a),
    };
    let Some((change, summary)) = change else {
        // Nothing graded changed (title, release policy, attempts).
        let v = before.map_or(1, |b| b.version);
        tx.execute(
            "UPDATE assignments SET version = ?2 WHERE id = ?1",
            params![id, v],
        )?;
        a.version = v;
        return Ok((a, None));
    };
    let version = before.map_or(1, |b| b.version + 1);
    let now = now_ms();
    let rubric = serde_json::to_string(&a.rubric)
        .map_err(|e| Error::Internal(format!("serialising rubric: {e}")))?;
    tx.execute(
        "INSERT INTO assignment_versions (assignment_id, version, prompt, rubric, plugin,
             plugin_sha256, plugin_config, change, summary, created_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            id,
            version,
            a.prompt,
            rubric,
            a.plugin,
            a.plugin_sha256,
            a.plugin_config.to_string(),
            change.as_str(),
            summary,
            actor,
            now
        ],
    )?;
    tx.execute(
        "UPDATE assignments SET version = ?2 WHERE id = ?1",
        params![id, version],
    )?;
    a.version = version;
    let v = get_version(tx, id, version)?.ok_or(Error::NotFound("assignment version"))?;
    Ok((a, Some(v)))
}

/// What an edit changed, and so what bringing a graded submission to the
/// new version costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum VersionChange {
    /// The first version.
    Created,
    /// Only points, weights, the plugin or its configuration: the stored
    /// evaluations still hold; the plugin scores them again (no model call).
    Scoring,
    /// The prompt, criteria, levels or their descriptions: the evaluators
    /// judge again, through the queue.
    Evaluation,
}

impl VersionChange {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionChange::Created => "created",
            VersionChange::Scoring => "scoring",
            VersionChange::Evaluation => "evaluation",
        }
    }

    fn parse(s: &str) -> VersionChange {
        match s {
            "scoring" => VersionChange::Scoring,
            "evaluation" => VersionChange::Evaluation,
            _ => VersionChange::Created,
        }
    }
}

/// The rubric as the evaluators judge it: without points and weights
/// (levels are judged by their labels and descriptors; points are the
/// plugin's business).
fn judged(r: &Rubric) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(cs) = v.get_mut("criteria").and_then(|c| c.as_array_mut()) {
        for c in cs {
            if let Some(o) = c.as_object_mut() {
                o.remove("weight");
            }
            if let Some(ls) = c.get_mut("levels").and_then(|l| l.as_array_mut()) {
                for l in ls {
                    if let Some(o) = l.as_object_mut() {
                        o.remove("points");
                    }
                }
            }
        }
    }
    v
}

/// What changed from `old` to `new` that grading depends on, with a summary
/// in plain words; `None` when nothing did.
pub fn version_change(old: &Assignment, new: &Assignment) -> Option<(VersionChange, String)> {
    let mut what = Vec::new();
    let mut change = None;
    if old.prompt != new.prompt {
        what.push("prompt");
        change = Some(VersionChange::Evaluation);
    }
    if judged(&old.rubric) != judged(&new.rubric) {
        what.push("criteria or levels");
        change = Some(VersionChange::Evaluation);
    } else if old.rubric != new.rubric {
        what.push("points or weights");
    }
    if old.plugin != new.plugin || old.plugin_sha256 != new.plugin_sha256 {
        what.push("plugin");
    }
    if old.plugin_config != new.plugin_config {
        what.push("plugin configuration");
    }
    if what.is_empty() {
        return None;
    }
    Some((change.unwrap_or(VersionChange::Scoring), what.join(", ")))
}

/// One version of an assignment's graded parts, as staff see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssignmentVersion {
    pub assignment_id: String,
    pub version: i64,
    pub prompt: String,
    pub rubric: Rubric,
    pub plugin: String,
    pub plugin_sha256: String,
    pub plugin_config: serde_json::Value,
    /// What this version changed from the one before.
    pub change: VersionChange,
    /// The same in plain words ("points or weights, plugin configuration").
    pub summary: String,
    pub created_by: String,
    pub created_at: i64,
}

fn version_from_row(r: &Row) -> crate::db::Result<(AssignmentVersion, String, String)> {
    Ok((
        AssignmentVersion {
            assignment_id: r.get("assignment_id")?,
            version: r.get("version")?,
            prompt: r.get("prompt")?,
            rubric: Rubric { criteria: vec![] },
            plugin: r.get("plugin")?,
            plugin_sha256: r.get("plugin_sha256")?,
            plugin_config: serde_json::Value::Null,
            change: VersionChange::parse(&r.get::<_, String>("change")?),
            summary: r.get("summary")?,
            created_by: r.get("created_by")?,
            created_at: r.get("created_at")?,
        },
        r.get("rubric")?,
        r.get("plugin_config")?,
    ))
}

fn finish_version(
    (mut v, rubric, cfg): (AssignmentVersion, String, String),
) -> Result<AssignmentVersion> {
    v.rubric = serde_json::from_str(&rubric).map_err(|e| {
        Error::Internal(format!(
            "stored rubric of {} version {} is invalid: {e}",
            v.assignment_id, v.version
        ))
    })?;
    v.plugin_config = serde_json::from_str(&cfg).unwrap_or(serde_json::Value::Null);
    Ok(v)
}

pub fn get_version(conn: &Connection, id: &str, version: i64) -> Result<Option<AssignmentVersion>> {
    conn.query_row(
        "SELECT * FROM assignment_versions WHERE assignment_id = ?1 AND version = ?2",
        params![id, version],
        version_from_row,
    )
    .optional()?
    .map(finish_version)
    .transpose()
}

/// Every version of an assignment, newest first.
pub fn list_versions(conn: &Connection, id: &str) -> Result<Vec<AssignmentVersion>> {
    let mut stmt = conn.prepare(
        "SELECT * FROM assignment_versions WHERE assignment_id = ?1 ORDER BY version DESC",
    )?;
    let rows = stmt
        .query_map([id], version_from_row)?
        .collect::<crate::db::Result<Vec<_>>>()?;
    rows.into_iter().map(finish_version).collect()
}

/// The assignment as a submission is graded: its graded parts (prompt,
/// rubric, plugin and configuration) from the version the submission
/// records, the rest current. A submission without a version, or whose
/// version row is missing, is graded under the current one.
pub fn assignment_for_submission(
    conn: &Connection,
    submission_id: &str,
) -> Result<Option<Assignment>> {
    let row: Option<(String, Option<i64>)> = conn
        .query_row(
            "SELECT assignment_id, assignment_version FROM submissions WHERE id = ?1",
            [submission_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((aid, version)) = row else {
        return Ok(None);
    };
    let Some(mut a) = get_assignment(conn, &aid)? else {
        return Ok(None);
    };
    if let Some(v) = version.filter(|v| *v != a.version)
        && let Some(v) = get_version(conn, &aid, v)?
    {
        a.prompt = v.prompt;
        a.rubric = v.rubric;
        a.plugin = v.plugin;
        a.plugin_sha256 = v.plugin_sha256;
        a.plugin_config = v.plugin_config;
        a.version = v.version;
    }
    Ok(Some(a))
}

fn write_assignment(
    tx: &Transaction<'_>,
    context_id: &str,
    id: &str,
    input: &AssignmentInput,
) -> Result<Assignment> {
    let now = now_ms();
    let rubric = serde_json::to_string(&input.rubric)
        .map_err(|e| Error::Internal(format!("serialising rubric: {e}")))?;
    let cfg = input
        .plugin_config
        .clone()
        .unwrap_or_else(|| serde_json::json!({}))
        .to_string();
    let bad = |m: String| Error::bad_request("invalid_assignment", m);
    let language =
        viva_models::language::normalise_language(input.language.as_deref()).map_err(bad)?;
    let vocabulary =
        viva_models::language::normalise_vocabulary(input.vocabulary.as_deref()).map_err(bad)?;
    tx.execute(
        "INSERT INTO assignments (id, context_id, title, prompt, rubric, plugin, plugin_config,
                                  release_policy, created_at, updated_at, max_attempts,
                                  language, vocabulary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11, ?12)
         ON CONFLICT(id) DO UPDATE SET title = ?3, prompt = ?4, rubric = ?5, plugin = ?6,
             plugin_config = ?7, release_policy = ?8, updated_at = ?9, max_attempts = ?10,
             language = ?11, vocabulary = ?12",
        params![
            id,
            context_id,
            input.title,
            input.prompt,
            rubric,
            input.plugin.as_deref().unwrap_or(DEFAULT_PLUGIN),
            cfg,
            input.release_policy.unwrap_or_default().as_str(),
            now,
            input.max_attempts,
            language,
            vocabulary
        ],
    )?;
    get_assignment(tx, id)?.ok_or(Error::NotFound("assignment"))
}

/// How many attempts `user` has made at `assignment` (their highest
/// attempt number).
pub fn attempts_made(conn: &Connection, assignment: &str, user: &str) -> Result<u32> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(attempt), 0) FROM submissions WHERE assignment_id = ?1 AND user_id = ?2",
        params![assignment, user],
        |r| r.get(0),
    )?)
}

/// The refusal of an attempt past an assignment's limit.
pub fn attempts_used_up(max: u32) -> Error {
    Error::Conflict {
        code: "attempts_used_up",
        message: format!(
            "you have used all {max} attempt{} at this assignment; ask your instructor if you need another",
            if max == 1 { "" } else { "s" }
        ),
    }
}

/// Deletes an assignment; refused while it has submissions (grades must not vanish).
pub fn delete_assignment(tx: &Transaction<'_>, id: &str) -> Result<()> {
    let n: i64 = tx.query_row(
        "SELECT COUNT(*) FROM submissions WHERE assignment_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    if n > 0 {
        return Err(Error::Conflict {
            code: "assignment_has_submissions",
            message: format!("assignment {id} has {n} submission(s); delete or export them first"),
        });
    }
    if tx.execute("DELETE FROM assignments WHERE id = ?1", [id])? == 0 {
        return Err(Error::NotFound("assignment"));
    }
    Ok(())
}

/// A submission as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Submission {
    pub id: String,
    pub assignment_id: String,
    pub context_id: String,
    pub user_id: String,
    pub attempt: i64,
    pub state: SubmissionState,
    pub batch_id: Option<i64>,
    pub original_name: Option<String>,
    pub sha256: String,
    pub size_bytes: i64,
    pub duration_seconds: f64,
    pub media_info: serde_json::Value,
    pub transcript: Option<Transcript>,
    pub evaluations: Vec<Evaluation>,
    pub score: Option<serde_json::Value>,
    pub failure_code: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub media_available: bool,
    /// The assignment version it is graded under (see [`AssignmentVersion`]).
    #[serde(default)]
    pub assignment_version: Option<i64>,
    /// The rescore that last moved it (`GET …/rescores`); a rescored grade
    /// is never released automatically.
    #[serde(default)]
    pub rescore_id: Option<String>,
    #[serde(skip)]
    pub wav_path: Option<String>,
    #[serde(skip)]
    pub original_path: Option<String>,
    #[serde(skip)]
    pub media_dir: Option<String>,
}

impl Submission {
    /// What its author (a learner, not managing the course) may see. Before
    /// release: no score, no evaluations, no flags or review reasons (release
    /// is the instructor's decision, and a flag tells a student which
    /// phrasing was caught). After release: everything but the instructor's
    /// override note, unless the instructor shared it (`share_note`), and
    /// the evaluators' evidence and rationale that fail
    /// [`viva_models::evidence`]'s checks (blanked). Whisper's per-word
    /// probabilities are for reviewers only, never for learners.
    pub fn redact_for_learner(&mut self) {
        if let Some(t) = &mut self.transcript {
            for s in &mut t.segments {
                s.words.clear();
            }
        }
        if self.state != SubmissionState::Released {
            self.evaluations.clear();
            self.score = None;
            return;
        }
        // Evidence not in the transcript and text that is not language are
        // never shown to a student.
        let transcript = self.transcript.as_ref().map_or("", |t| t.text.as_str());
        for e in &mut self.evaluations {
            viva_models::evidence::sanitise(e, transcript);
        }
        if let Some(o) = self
            .score
            .as_mut()
            .and_then(|s| s.get_mut("override"))
            .and_then(|o| o.as_object_mut())
            && o.get("share_note").and_then(|v| v.as_bool()) != Some(true)
        {
            o.remove("note");
        }
    }
}

const SUBMISSION_SELECT: &str = "SELECT s.*, a.context_id AS context_id FROM submissions s
     JOIN assignments a ON a.id = s.assignment_id";

fn submission_from_row(r: &Row) -> crate::db::Result<Submission> {
    let state: String = r.get("state")?;
    let transcript: Option<String> = r.get("transcript")?;
    let score: Option<String> = r.get("score")?;
    let media_info: String = r.get("media_info")?;
    let purged: Option<i64> = r.get("media_purged_at")?;
    Ok(Submission {
        id: r.get("id")?,
        assignment_id: r.get("assignment_id")?,
        context_id: r.get("context_id")?,
        user_id: r.get("user_id")?,
        attempt: r.get("attempt")?,
        state: SubmissionState::parse(&state).unwrap_or(SubmissionState::Failed),
        batch_id: r.get("batch_id")?,
        original_name: r.get("original_name")?,
        sha256: r.get("sha256")?,
        size_bytes: r.get("size_bytes")?,
        duration_seconds: r.get("duration_seconds")?,
        media_info: serde_json::from_str(&media_info).unwrap_or_default(),
        transcript: transcript.and_then(|t| serde_json::from_str(&t).ok()),
        evaluations: Vec::new(),
        score: score.and_then(|t| serde_json::from_str(&t).ok()),
        failure_code: r.get("failure_code")?,
        failure_reason: r.get("failure_reason")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
        finished_at: r.get("finished_at")?,
        media_available: purged.is_none(),
        assignment_version: r.get("assignment_version")?,
        rescore_id: r.get("rescore_id")?,
        wav_path: r.get("wav_path")?,
        original_path: r.get("original_path")?,
        media_dir: r.get("media_dir")?,
    })
}

fn with_evaluations(conn: &Connection, mut s: Submission) -> Result<Submission> {
    let mut stmt = conn.prepare(
        "SELECT result FROM jobs WHERE submission_id = ?1 AND stage = 'eval' AND state = 'done'
         ORDER BY role",
    )?;
    s.evaluations = stmt
        .query_map([&s.id], |r| r.get::<_, Option<String>>(0))?
        .filter_map(|r| r.ok().flatten())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    Ok(s)
}

pub fn get_submission(conn: &Connection, id: &str) -> Result<Option<Submission>> {
    let s = conn
        .query_row(
            &format!("{SUBMISSION_SELECT} WHERE s.id = ?1"),
            [id],
            submission_from_row,
        )
        .optional()?;
    s.map(|s| with_evaluations(conn, s)).transpose()
}

/// Filter for listing submissions; `None` fields do not filter.
#[derive(Debug, Default, Clone)]
pub struct SubmissionFilter {
    pub context_id: Option<String>,
    pub assignment_id: Option<String>,
    pub user_id: Option<String>,
    pub limit: Option<u32>,
}

pub fn list_submissions(conn: &Connection, f: &SubmissionFilter) -> Result<Vec<Submission>> {
    let mut stmt = conn.prepare(&format!(
        "{SUBMISSION_SELECT}
         WHERE (CAST(?1 AS TEXT) IS NULL OR a.context_id = ?1)
           AND (CAST(?2 AS TEXT) IS NULL OR s.assignment_id = ?2)
           AND (CAST(?3 AS TEXT) IS NULL OR s.user_id = ?3)
         ORDER BY s.created_at, s.id
         LIMIT ?4"
    ))?;
    let rows = stmt
        .query_map(
            params![
                f.context_id,
                f.assignment_id,
                f.user_id,
                f.limit.unwrap_or(10_000)
            ],
            submission_from_row,
        )?
        .collect::<crate::db::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|s| with_evaluations(conn, s))
        .collect()
}

/// Records an audit entry (who did what to which subject).
pub fn audit(
    tx: &Transaction<'_>,
    actor: &str,
    action: &str,
    subject: &str,
    details: serde_json::Value,
) -> Result<()> {
    tx.execute(
        "INSERT INTO audit_log (at, actor, action, subject, details) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now_ms(), actor, action, subject, details.to_string()],
    )?;
    Ok(())
}

/// The built-in sandbox course: context `sandbox`, assignment `sandbox-oral-1`.
pub fn ensure_sandbox(tx: &Transaction<'_>) -> Result<()> {
    ensure_context(tx, "sandbox", "Viva sandbox course")?;
    let exists: bool = tx
        .query_row(
            "SELECT 1 FROM assignments WHERE id = 'sandbox-oral-1'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !exists {
        let input = sandbox_assignment();
        upsert_assignment(tx, "sandbox", "sandbox-oral-1", &input)?;
    }
    Ok(())
}

pub fn sandbox_assignment() -> AssignmentInput {
    let rubric: Rubric = serde_json::from_value(serde_json::json!({
        "criteria": [
            {
                "id": "content",
                "title": "Content",
                "description": "Answers the question with correct, relevant ideas.",
                "weight": 2.0,
                "levels": [
                    {"label": "missing", "points": 0, "descriptor": "Does not address the question."},
                    {"label": "partial", "points": 2, "descriptor": "Addresses part of the question, or with errors."},
                    {"label": "complete", "points": 4, "descriptor": "Answers the question fully and correctly."}
                ]
            },
            {
                "id": "organisation",
                "title": "Organisation",
                "description": "Ideas come in a clear order with an introduction and a conclusion.",
                "weight": 1.0,
                "levels": [
                    {"label": "unclear", "points": 0, "descriptor": "Hard to follow."},
                    {"label": "mostly-clear", "points": 2, "descriptor": "Mostly in a sensible order."},
                    {"label": "clear", "points": 4, "descriptor": "Clear structure throughout."}
                ]
            },
            {
                "id": "language",
                "title": "Language",
                "description": "Uses the subject's vocabulary accurately.",
                "weight": 1.0,
                "levels": [
                    {"label": "limited", "points": 0, "descriptor": "Little subject vocabulary."},
                    {"label": "adequate", "points": 2, "descriptor": "Some subject vocabulary, mostly accurate."},
                    {"label": "precise", "points": 4, "descriptor": "Precise subject vocabulary."}
                ]
            }
        ]
    }))
    .unwrap_or(Rubric { criteria: vec![] });
    AssignmentInput {
        id: Some("sandbox-oral-1".into()),
        title: "Sandbox: explain photosynthesis".into(),
        prompt: "In one or two minutes, explain how plants turn sunlight into food. \
                 Name the inputs and outputs of photosynthesis and say where it happens."
            .into(),
        rubric,
        plugin: None,
        plugin_config: None,
        release_policy: Some(ReleasePolicy::Manual),
        max_attempts: None,
        language: None,
        vocabulary: Some(
            "photosynthesis, chlorophyll, chloroplast, glucose, carbon dioxide".into(),
        ),
    }
}

#[derive(Serialize)]
pub(crate) struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: serde_json::Value,
}

/// The audit log, newest first, of one subject or all.
pub(crate) fn audit_entries(
    conn: &Connection,
    subject: Option<&str>,
    limit: u32,
) -> Result<Vec<AuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at, actor, action, subject, details FROM audit_log
         WHERE (CAST(?1 AS TEXT) IS NULL OR subject = ?1) ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![subject, limit], audit_from_row)?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

/// An `audit_log` row selected as `id, at, actor, action, subject, details`.
fn audit_from_row(r: &crate::db::Row) -> crate::db::Result<AuditEntry> {
    let details: String = r.get(5)?;
    Ok(AuditEntry {
        id: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        subject: r.get(4)?,
        details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
    })
}

/// The audit log of an assignment and its submissions, newest first: who
/// edited the rubric or plugin, started a rescore, overrode or released a
/// grade.
pub(crate) fn assignment_audit(
    conn: &Connection,
    assignment_id: &str,
    limit: u32,
) -> Result<Vec<AuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at, actor, action, subject, details FROM audit_log
         WHERE subject = ?1 OR subject IN (SELECT id FROM submissions WHERE assignment_id = ?1)
         ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![assignment_id, limit], audit_from_row)?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Bytes `user` uploaded since `since_ms`, and when the oldest of those
/// uploads was made (for fair-use limits).
pub fn uploaded_since(conn: &Connection, user: &str, since_ms: i64) -> Result<(u64, Option<i64>)> {
    let (bytes, oldest): (i64, Option<i64>) = conn.query_row(
        "SELECT COALESCE(SUM(size_bytes), 0), MIN(created_at) FROM submissions
         WHERE user_id = ?1 AND created_at >= ?2",
        crate::params![user, since_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((u64::try_from(bytes).unwrap_or(0), oldest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(state: &str) -> Submission {
        serde_json::from_value(serde_json::json!({
            "id": "s", "assignment_id": "a", "context_id": "c", "user_id": "u", "attempt": 1,
            "state": state, "batch_id": null, "original_name": null, "sha256": "x",
            "size_bytes": 1, "duration_seconds": 1.0, "media_info": {}, "transcript": null,
            "evaluations": [{"role": "a", "model": "m", "ratings": [], "flags": ["injection"]}],
            "score": {"total": 3.0, "needs_review": true, "reasons": ["flagged"],
                      "override": {"by": "t", "note": "private", "share_note": false}},
            "failure_code": null, "failure_reason": null,
            "created_at": 0, "updated_at": 0, "finished_at": null, "media_available": true
        }))
        .expect("submission")
    }

    #[test]
    fn a_learner_sees_grades_after_release_and_notes_only_when_shared() {
        let mut s = scored("awaiting_review");
        s.redact_for_learner();
        assert!(
            s.score.is_none() && s.evaluations.is_empty(),
            "nothing before release"
        );
        let mut s = scored("released");
        s.redact_for_learner();
        let score = s.score.as_ref().expect("score after release");
        assert_eq!(score["total"], 3.0);
        assert!(score["override"].get("note").is_none(), "{score}");
        let mut s = scored("released");
        if let Some(o) = s.score.as_mut() {
            o["override"]["share_note"] = serde_json::json!(true);
        }
        s.redact_for_learner();
        assert_eq!(
            s.score.as_ref().expect("score")["override"]["note"],
            "private"
        );
    }

    #[test]
    fn a_learner_never_reads_junk_evidence_or_rationales() {
        let mut s = scored("released");
        s.transcript = Some(Transcript {
            text: "Plants use sunlight, water and carbon dioxide.".into(),
            language: None,
            segments: Vec::new(),
            audio_seconds: 1.0,
            processing_seconds: 0.1,
            model: String::new(),
        });
        let rating = |evidence: &str, rationale: &str| viva_models::CriterionRating {
            criterion_id: "content".into(),
            evidence: evidence.into(),
            rationale: rationale.into(),
            level: "complete".into(),
        };
        s.evaluations[0].ratings = vec![
            rating("water and carbon dioxide", "Names the inputs."),
            rating("1.1.1.1.1.1.1.1.1.1.1.1.1.1.1", "1"),
            rating("plants eat light, the student says", "none"),
        ];
        let instructor = s.evaluations.clone();
        s.redact_for_learner();
        let r = &s.evaluations[0].ratings;
        assert_eq!(
            (r[0].evidence.as_str(), r[0].rationale.as_str()),
            ("water and carbon dioxide", "Names the inputs.")
        );
        for junk in &r[1..] {
            assert_eq!((junk.evidence.as_str(), junk.rationale.as_str()), ("", ""));
        }
        assert_eq!(
            instructor[0].ratings[1].rationale, "1",
            "only the learner's copy"
        );
    }

    fn assignment() -> Assignment {
        let i = sandbox_assignment();
        Assignment {
            id: "a".into(),
            context_id: "c".into(),
            title: i.title,
            prompt: i.prompt,
            rubric: i.rubric,
            plugin: DEFAULT_PLUGIN.into(),
            plugin_config: serde_json::json!({}),
            release_policy: ReleasePolicy::Manual,
            max_attempts: None,
            created_at: 0,
            updated_at: 0,
            version: 1,
            plugin_sha256: "aa".into(),
            language: None,
            vocabulary: None,
        }
    }

    #[test]
    fn an_edit_is_classified_by_what_grading_must_redo() {
        let old = assignment();
        let mut same = old.clone();
        same.title = "Another title".into();
        same.release_policy = ReleasePolicy::Auto;
        assert_eq!(version_change(&old, &same), None, "nothing graded changed");

        let mut points = old.clone();
        points.rubric.criteria[0].levels[1].points = 3.0;
        points.rubric.criteria[1].weight = 2.0;
        assert_eq!(
            version_change(&old, &points),
            Some((VersionChange::Scoring, "points or weights".into()))
        );
        let mut plugin = old.clone();
        plugin.plugin_sha256 = "bb".into();
        plugin.plugin_config = serde_json::json!({"round_to": 1});
        assert_eq!(
            version_change(&old, &plugin),
            Some((
                VersionChange::Scoring,
                "plugin, plugin configuration".into()
            ))
        );
        let mut levels = points.clone();
        levels.rubric.criteria[0].levels[1].label = "developing".into();
        assert_eq!(
            version_change(&old, &levels),
            Some((VersionChange::Evaluation, "criteria or levels".into())),
            "a judged change wins over points"
        );
        let mut descriptor = old.clone();
        descriptor.rubric.criteria[2].levels[0].descriptor = "No subject words.".into();
        assert_eq!(
            version_change(&old, &descriptor).map(|c| c.0),
            Some(VersionChange::Evaluation)
        );
        let mut prompt = old.clone();
        prompt.prompt = "Explain respiration.".into();
        assert_eq!(
            version_change(&old, &prompt).map(|c| c.0),
            Some(VersionChange::Evaluation)
        );
    }

    #[test]
    fn a_learner_never_reads_whispers_word_probabilities() {
        let mut s = scored("released");
        s.transcript = Some(Transcript {
            text: "Plants use sunlight.".into(),
            language: Some("en".into()),
            segments: vec![viva_models::Segment {
                start_ms: 0,
                end_ms: 1000,
                text: "Plants use sunlight.".into(),
                avg_logprob: -0.2,
                no_speech_prob: 0.01,
                low_confidence: false,
                words: vec![viva_models::Word {
                    text: " Plants".into(),
                    p: 0.3,
                }],
            }],
            audio_seconds: 1.0,
            processing_seconds: 0.1,
            model: String::new(),
        });
        let staff = s.clone();
        s.redact_for_learner();
        let t = s.transcript.as_ref().expect("transcript");
        assert!(t.segments[0].words.is_empty());
        assert_eq!(t.segments[0].text, "Plants use sunlight.");
        assert_eq!(
            staff.transcript.as_ref().expect("staff").segments[0]
                .words
                .len(),
            1
        );
    }

    #[test]
    fn sandbox_rubric_is_valid() {
        let a = sandbox_assignment();
        a.validate().expect("valid");
        assert_eq!(a.rubric.criteria.len(), 3);
    }

    #[test]
    fn states_round_trip_and_settle() {
        for s in [
            SubmissionState::Queued,
            SubmissionState::Transcribing,
            SubmissionState::Transcribed,
            SubmissionState::Evaluating,
            SubmissionState::Evaluated,
            SubmissionState::AwaitingReview,
            SubmissionState::Released,
            SubmissionState::Failed,
        ] {
            assert_eq!(SubmissionState::parse(s.as_str()), Some(s));
        }
        assert!(SubmissionState::Failed.is_settled());
        assert!(!SubmissionState::Transcribed.is_settled());
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("sandbox-oral-1", "id").is_ok());
        assert!(validate_id("../etc", "id").is_err());
        assert!(validate_id("", "id").is_err());
        assert!(new_id("sub").starts_with("sub_"));
    }
}
