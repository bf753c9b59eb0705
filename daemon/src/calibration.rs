//! Calibration against the instructor's own grading, graded examples, and
//! the bulk views of an assignment's grades.
//!
//! - Instructor grades (`instructor_grades`): levels an instructor set
//!   *blind* (before seeing the evaluations: `POST …/blind-grade`) or points
//!   they set in an *override* on the review screen. A blind grade is never
//!   replaced by a later override: it is the independent measurement.
//! - The report compares, per criterion and pooled over criteria, each
//!   evaluator's level and the combined grade (the plugin's points as first
//!   scored, before any override) with the instructor's, using
//!   [`viva_models::calibration`]; with a plain-words verdict.
//! - A gate (`calibration_gates`) an assignment may set: automatic release
//!   only once the combined grade's pooled QWK reaches `min_qwk` on at least
//!   `min_sample` instructor-graded submissions ([`gate_hold`], called by the
//!   scheduler before a grade would be released).
//! - Exemplars (`exemplars`): instructor-graded submissions an instructor
//!   marked; evaluators get a few of them (transcript and levels, never who
//!   said it) in their prompt ([`exemplars_for`]).
//! - CSV of the calibration and of all grades (staff only: the routes check).

use std::collections::{BTreeMap, HashMap};

use crate::db::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use viva_models::calibration::{self as stats, Agreement, Rated};
use viva_models::{Criterion, Evaluation, Exemplar, ExemplarLevel, Rubric};

use crate::clock::now_ms;
use crate::domain::{self, Assignment, ReleasePolicy, SubmissionState};
use crate::error::{Error, Result};

/// The verdict's bar when an assignment sets no gate.
pub(crate) const DEFAULT_MIN_SAMPLE: usize = 10;

/// The most examples one evaluation receives, and how many per level of a
/// criterion are enough.
const MAX_EXEMPLARS: usize = 4;
const PER_LEVEL: usize = 1;

// ---- instructor grades -----------------------------------------------------------------

/// Body of `POST /api/v1/submissions/{id}/blind-grade`: a level label per
/// criterion, every criterion of the rubric.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BlindGrade {
    pub levels: BTreeMap<String, String>,
}

/// One criterion's instructor grade as stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct InstructorLevel {
    pub criterion_id: String,
    pub level: Option<String>,
    pub points: f64,
    /// `blind` or `override`.
    pub source: String,
    pub graded_by: String,
    pub graded_at: i64,
}

fn graded_submission(tx: &Connection, sid: &str) -> Result<(domain::Submission, Assignment)> {
    let s = domain::get_submission(tx, sid)?.ok_or(Error::NotFound("submission"))?;
    if !matches!(
        s.state,
        SubmissionState::AwaitingReview | SubmissionState::Released
    ) {
        return Err(Error::Conflict {
            code: "not_graded",
            message: format!(
                "this submission is {}; grade it once the evaluators have scored it",
                s.state.as_str().replace('_', " ")
            ),
        });
    }
    let a = domain::get_assignment(tx, &s.assignment_id)?.ok_or(Error::NotFound("assignment"))?;
    Ok((s, a))
}

/// Stores an instructor's blind levels (every criterion) and audits them.
pub(crate) fn record_blind(
    tx: &Transaction<'_>,
    sid: &str,
    actor: &str,
    req: &BlindGrade,
) -> Result<Vec<InstructorLevel>> {
    let (_, a) = graded_submission(tx, sid)?;
    for id in req.levels.keys() {
        if !a.rubric.criteria.iter().any(|c| &c.id == id) {
            return Err(Error::bad_request(
                "unknown_criterion",
                format!(
                    "the rubric has no criterion {id:?}; reload the page to see the current rubric"
                ),
            ));
        }
    }
    let now = now_ms();
    for c in &a.rubric.criteria {
        let label = req.levels.get(&c.id).ok_or_else(|| {
            Error::bad_request(
                "incomplete_grade",
                format!(
                    "choose a level for {} too: a blind grade covers every criterion",
                    c.title
                ),
            )
        })?;
        let level = c.levels.iter().find(|l| &l.label == label).ok_or_else(|| {
            Error::bad_request(
                "unknown_level",
                format!(
                    "{} has no level {label:?}; choose one of {}",
                    c.title,
                    c.levels
                        .iter()
                        .map(|l| l.label.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        tx.execute(
            "INSERT INTO instructor_grades (submission_id, criterion_id, level, points, source,
                                            graded_by, graded_at)
             VALUES (?1, ?2, ?3, ?4, 'blind', ?5, ?6)
             ON CONFLICT(submission_id, criterion_id) DO UPDATE SET level = ?3, points = ?4,
                 source = 'blind', graded_by = ?5, graded_at = ?6",
            params![sid, c.id, level.label, level.points, actor, now],
        )?;
    }
    domain::audit(
        tx,
        actor,
        "submission.blind_grade",
        sid,
        serde_json::json!({ "levels": req.levels }),
    )?;
    instructor_levels(tx, sid)
}

/// Records the points of an override as instructor grades (criteria the
/// override set points for), unless a blind grade exists for them.
pub(crate) fn record_override(
    tx: &Transaction<'_>,
    sid: &str,
    actor: &str,
    req: &crate::grades::OverrideRequest,
) -> Result<()> {
    let (_, a) = graded_submission(tx, sid)?;
    let now = now_ms();
    for o in &req.criteria {
        let (Some(points), Some(c)) = (
            o.points,
            a.rubric.criteria.iter().find(|c| c.id == o.criterion_id),
        ) else {
            continue;
        };
        let level = c
            .levels
            .iter()
            .find(|l| (l.points - points).abs() < 1e-9)
            .map(|l| l.label.clone());
        tx.execute(
            "INSERT INTO instructor_grades (submission_id, criterion_id, level, points, source,
                                            graded_by, graded_at)
             VALUES (?1, ?2, ?3, ?4, 'override', ?5, ?6)
             ON CONFLICT(submission_id, criterion_id) DO UPDATE SET level = ?3, points = ?4,
                 graded_by = ?5, graded_at = ?6 WHERE source = 'override'",
            params![sid, c.id, level, points, actor, now],
        )?;
    }
    Ok(())
}

pub(crate) fn instructor_levels(conn: &Connection, sid: &str) -> Result<Vec<InstructorLevel>> {
    let mut stmt = conn.prepare(
        "SELECT criterion_id, level, points, source, graded_by, graded_at FROM instructor_grades
         WHERE submission_id = ?1 ORDER BY criterion_id",
    )?;
    let rows = stmt
        .query_map([sid], |r| {
            Ok(InstructorLevel {
                criterion_id: r.get(0)?,
                level: r.get(1)?,
                points: r.get(2)?,
                source: r.get(3)?,
                graded_by: r.get(4)?,
                graded_at: r.get(5)?,
            })
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    Ok(rows)
}

/// What the review screen needs: the instructor's levels and whether the
/// submission is an exemplar.
#[derive(Debug, Serialize)]
pub(crate) struct InstructorGradeView {
    pub submission_id: String,
    pub levels: Vec<InstructorLevel>,
    pub exemplar: bool,
}

pub(crate) fn instructor_grade_view(conn: &Connection, sid: &str) -> Result<InstructorGradeView> {
    Ok(InstructorGradeView {
        submission_id: sid.to_owned(),
        levels: instructor_levels(conn, sid)?,
        exemplar: is_exemplar(conn, sid)?,
    })
}

// ---- exemplars -----------------------------------------------------------------------

fn is_exemplar(conn: &Connection, sid: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM exemplars WHERE submission_id = ?1",
            [sid],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false))
}

/// Marks (or unmarks) a graded submission as an exemplar of its assignment.
/// Marking needs the instructor's grade on every criterion (blind, or an
/// override that set its points) and a transcript.
pub(crate) fn set_exemplar(tx: &Transaction<'_>, sid: &str, actor: &str, on: bool) -> Result<()> {
    let (s, a) = graded_submission(tx, sid)?;
    if on {
        let have = instructor_levels(tx, sid)?;
        let missing: Vec<&str> = a
            .rubric
            .criteria
            .iter()
            .filter(|c| !have.iter().any(|l| l.criterion_id == c.id))
            .map(|c| c.title.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Conflict {
                code: "not_instructor_graded",
                message: format!(
                    "grade {} yourself first (blind grade or override): an exemplar shows the \
                     evaluators your levels",
                    missing.join(", ")
                ),
            });
        }
        if s.transcript
            .as_ref()
            .is_none_or(|t| t.text.trim().is_empty())
        {
            return Err(Error::Conflict {
                code: "no_transcript",
                message: "this submission has no transcript to show as an example".into(),
            });
        }
        tx.execute(
            "INSERT INTO exemplars (submission_id, assignment_id, marked_by, marked_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(submission_id) DO NOTHING",
            params![sid, a.id, actor, now_ms()],
        )?;
    } else {
        tx.execute("DELETE FROM exemplars WHERE submission_id = ?1", [sid])?;
    }
    domain::audit(
        tx,
        actor,
        if on {
            "submission.exemplar"
        } else {
            "submission.exemplar_removed"
        },
        sid,
        serde_json::json!({ "assignment": a.id }),
    )?;
    Ok(())
}

/// An assignment's exemplars with the instructor's level per criterion (the
/// level nearest to their points), oldest mark first, with submission ids
/// (for the daemon only: [`exemplars_for`] drops them).
fn exemplar_rows(conn: &Connection, a: &Assignment) -> Result<Vec<(String, Exemplar)>> {
    let mut stmt = conn.prepare(
        "SELECT e.submission_id, s.transcript FROM exemplars e
         JOIN submissions s ON s.id = e.submission_id
         WHERE e.assignment_id = ?1 ORDER BY e.marked_at, e.submission_id",
    )?;
    let rows = stmt
        .query_map([&a.id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (sid, transcript) in rows {
        let Some(text) = transcript
            .and_then(|t| serde_json::from_str::<viva_models::Transcript>(&t).ok())
            .map(|t| t.text)
        else {
            continue;
        };
        let graded = instructor_levels(conn, &sid)?;
        let levels: Vec<ExemplarLevel> = a
            .rubric
            .criteria
            .iter()
            .filter_map(|c| {
                let g = graded.iter().find(|l| l.criterion_id == c.id)?;
                Some(ExemplarLevel {
                    criterion_id: c.id.clone(),
                    level: nearest_level(c, g.points),
                })
            })
            .collect();
        if levels.len() == a.rubric.criteria.len() {
            out.push((
                sid,
                Exemplar {
                    transcript: text,
                    levels,
                },
            ));
        }
    }
    Ok(out)
}

fn nearest_level(c: &Criterion, points: f64) -> String {
    c.levels
        .iter()
        .min_by(|x, y| {
            (x.points - points)
                .abs()
                .total_cmp(&(y.points - points).abs())
        })
        .map(|l| l.label.clone())
        .unwrap_or_default()
}

/// The examples an evaluation of `for_submission` receives: at most
/// [`MAX_EXEMPLARS`], chosen in marking order while each still shows a
/// criterion's level that fewer than [`PER_LEVEL`] chosen ones show; never
/// the submission itself. Transcript and levels only.
pub(crate) fn exemplars_for(
    conn: &Connection,
    a: &Assignment,
    for_submissions: &[String],
) -> Result<HashMap<String, Vec<Exemplar>>> {
    let all = exemplar_rows(conn, a)?;
    let mut out = HashMap::new();
    for sid in for_submissions {
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        let mut chosen = Vec::new();
        for (eid, ex) in &all {
            if eid == sid || chosen.len() >= MAX_EXEMPLARS {
                continue;
            }
            let adds = ex.levels.iter().any(|l| {
                seen.get(&(l.criterion_id.clone(), l.level.clone()))
                    .copied()
                    .unwrap_or(0)
                    < PER_LEVEL
            });
            if adds {
                for l in &ex.levels {
                    *seen
                        .entry((l.criterion_id.clone(), l.level.clone()))
                        .or_insert(0) += 1;
                }
                chosen.push(ex.clone());
            }
        }
        out.insert(sid.clone(), chosen);
    }
    Ok(out)
}

// ---- the gate ------------------------------------------------------------------------

/// An assignment's calibration threshold for automatic release.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Gate {
    /// The combined grade's pooled QWK must reach this (0.70 is the usual bar).
    pub min_qwk: f64,
    /// Instructor-graded submissions needed before it counts.
    pub min_sample: usize,
}

impl Gate {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.min_qwk.is_finite() && (-1.0..=1.0).contains(&self.min_qwk)) {
            return Err(Error::bad_request(
                "invalid_gate",
                format!(
                    "min_qwk must be between -1 and 1 (0.70 is the usual bar); you gave {}",
                    self.min_qwk
                ),
            ));
        }
        if self.min_sample == 0 || self.min_sample > 10_000 {
            return Err(Error::bad_request(
                "invalid_gate",
                "min_sample must be between 1 and 10000 graded submissions",
            ));
        }
        Ok(())
    }
}

pub(crate) fn gate(conn: &Connection, assignment: &str) -> Result<Option<Gate>> {
    Ok(conn
        .query_row(
            "SELECT min_qwk, min_sample FROM calibration_gates WHERE assignment_id = ?1",
            [assignment],
            |r| {
                Ok(Gate {
                    min_qwk: r.get(0)?,
                    min_sample: r.get::<_, i64>(1)?.max(0) as usize,
                })
            },
        )
        .optional()?)
}

/// Sets or removes (`None`) an assignment's gate; audited.
pub(crate) fn set_gate(
    tx: &Transaction<'_>,
    assignment: &str,
    actor: &str,
    g: Option<Gate>,
) -> Result<()> {
    match g {
        Some(g) => {
            g.validate()?;
            tx.execute(
                "INSERT INTO calibration_gates (assignment_id, min_qwk, min_sample, updated_by, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(assignment_id) DO UPDATE SET min_qwk = ?2, min_sample = ?3,
                     updated_by = ?4, updated_at = ?5",
                params![assignment, g.min_qwk, g.min_sample as i64, actor, now_ms()],
            )?;
        }
        None => {
            tx.execute(
                "DELETE FROM calibration_gates WHERE assignment_id = ?1",
                [assignment],
            )?;
        }
    }
    domain::audit(
        tx,
        actor,
        "assignment.calibration_gate",
        assignment,
        serde_json::json!({ "gate": g }),
    )?;
    Ok(())
}

/// Why a grade of `a` must wait for review although its release policy is
/// automatic: its gate is set and not met. `None`: no gate, a manual
/// policy, or the gate is met.
pub(crate) fn gate_hold(conn: &Connection, a: &Assignment) -> Result<Option<String>> {
    if a.release_policy == ReleasePolicy::Manual {
        return Ok(None);
    }
    let Some(g) = gate(conn, &a.id)? else {
        return Ok(None);
    };
    let data = collect(conn, a)?;
    let pairs = pooled(&data, &a.rubric, Grader::Combined);
    let overall = stats::agreement(&pairs).map(|mut x| {
        x.n = data.len();
        x
    });
    let (ok, verdict) = stats::verdict(overall.as_ref(), g.min_sample, g.min_qwk);
    Ok((!ok).then(|| {
        format!(
            "calibration gate not met (automatic release needs QWK ≥ {:.2} on at least {} \
             instructor-graded submissions): {verdict}",
            g.min_qwk, g.min_sample
        )
    }))
}

// ---- the report ----------------------------------------------------------------------

/// One instructor-graded submission: the instructor's points, each
/// evaluator's level and the combined grade's points per criterion.
struct Graded {
    instructor: HashMap<String, f64>,
    evaluators: BTreeMap<String, HashMap<String, String>>,
    combined: HashMap<String, f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Grader<'a> {
    Evaluator(&'a str),
    Combined,
}

fn collect(conn: &Connection, a: &Assignment) -> Result<Vec<Graded>> {
    let mut stmt = conn.prepare(
        "SELECT g.submission_id, g.criterion_id, g.points FROM instructor_grades g
         JOIN submissions s ON s.id = g.submission_id
         WHERE s.assignment_id = ?1 AND s.state IN ('awaiting_review', 'released')
         ORDER BY s.created_at, s.id",
    )?;
    let rows = stmt
        .query_map([&a.id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, f64>(2)?,
            ))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    let mut order: Vec<String> = Vec::new();
    let mut instructor: HashMap<String, HashMap<String, f64>> = HashMap::new();
    for (sid, cid, points) in rows {
        if !instructor.contains_key(&sid) {
            order.push(sid.clone());
        }
        instructor.entry(sid).or_default().insert(cid, points);
    }
    let mut out = Vec::new();
    for sid in order {
        let (evaluators, combined) = machine_grades(conn, &sid)?;
        out.push(Graded {
            instructor: instructor.remove(&sid).unwrap_or_default(),
            evaluators,
            combined,
        });
    }
    Ok(out)
}

type EvaluatorLevels = BTreeMap<String, HashMap<String, String>>;

/// Each evaluator's levels and the combined points per criterion, as first
/// scored (the score job's result, before any override).
fn machine_grades(conn: &Connection, sid: &str) -> Result<(EvaluatorLevels, HashMap<String, f64>)> {
    let mut stmt = conn.prepare(
        "SELECT stage, result FROM jobs WHERE submission_id = ?1 AND state = 'done'
           AND stage IN ('eval', 'score') ORDER BY role",
    )?;
    let rows = stmt
        .query_map([sid], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })?
        .collect::<crate::db::Result<Vec<_>>>()?;
    let mut evaluators = BTreeMap::new();
    let mut combined = HashMap::new();
    for (stage, result) in rows {
        let Some(result) = result else { continue };
        if stage == "eval" {
            if let Ok(e) = serde_json::from_str::<Evaluation>(&result) {
                let levels = e
                    .ratings
                    .into_iter()
                    .map(|r| (r.criterion_id, r.level))
                    .collect();
                evaluators.insert(e.role, levels);
            }
        } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&result) {
            let report = if v["report"].is_object() {
                &v["report"]
            } else {
                &v
            };
            for c in report["criteria"].as_array().into_iter().flatten() {
                if let (Some(id), Some(p)) = (c["criterion_id"].as_str(), c["points"].as_f64()) {
                    combined.insert(id.to_owned(), p);
                }
            }
        }
    }
    Ok((evaluators, combined))
}

fn pairs_for(data: &[Graded], c: &Criterion, who: Grader<'_>) -> Vec<Rated> {
    let levels = c.levels.len();
    data.iter()
        .filter_map(|g| {
            let instructor = stats::rank_of_points(c, *g.instructor.get(&c.id)?);
            let grader = match who {
                Grader::Combined => stats::rank_of_points(c, *g.combined.get(&c.id)?),
                Grader::Evaluator(role) => {
                    stats::rank_of_level(c, g.evaluators.get(role)?.get(&c.id)?)?
                }
            };
            Some(Rated {
                grader,
                instructor,
                levels,
            })
        })
        .collect()
}

fn pooled(data: &[Graded], rubric: &Rubric, who: Grader<'_>) -> Vec<Rated> {
    rubric
        .criteria
        .iter()
        .flat_map(|c| pairs_for(data, c, who))
        .collect()
}

/// One grader's agreement with the instructor.
#[derive(Debug, Serialize)]
pub(crate) struct GraderAgreement {
    /// An evaluator's role (`a`, `b`) or `combined` (the grade).
    pub grader: String,
    #[serde(flatten)]
    pub agreement: Agreement,
}

#[derive(Debug, Serialize)]
pub(crate) struct CriterionReport {
    pub criterion_id: String,
    pub title: String,
    pub levels: usize,
    pub graders: Vec<GraderAgreement>,
    /// On the combined grade.
    pub verdict: String,
    pub trusted: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub assignment_id: String,
    /// Instructor-graded submissions (with a score) in the sample.
    pub graded: usize,
    pub blind: usize,
    pub gate: Option<Gate>,
    /// Whether automatic release is allowed by the gate (`true` without one).
    pub gate_met: bool,
    pub verdict: String,
    pub trusted: bool,
    pub method: &'static str,
    pub criteria: Vec<CriterionReport>,
    /// Pooled over criteria (ranks scaled to 0–1 for the QWK).
    pub overall: Vec<GraderAgreement>,
    pub exemplars: Vec<String>,
}

const METHOD: &str = "Levels are ranks among a criterion's levels (fractional for a combined grade \
    between levels). exact: same level; adjacent: at most one level apart; qwk: quadratic \
    weighted kappa (Cohen 1968) on ranks scaled to 0-1, pooled over criteria for the overall \
    figure; qwk_ci95: 95% percentile bootstrap interval, 2000 resamples, fixed seed; \
    mean_difference: grader minus instructor, in levels; smd: standardised mean difference. \
    The combined grade is the plugin's first score, before any override.";

fn graders_of(data: &[Graded]) -> Vec<String> {
    let mut roles: Vec<String> = data
        .iter()
        .flat_map(|g| g.evaluators.keys().cloned())
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

fn agreements(roles: &[String], pairs: &dyn Fn(Grader<'_>) -> Vec<Rated>) -> Vec<GraderAgreement> {
    roles
        .iter()
        .map(|r| (r.clone(), Grader::Evaluator(r.as_str())))
        .chain(std::iter::once(("combined".to_owned(), Grader::Combined)))
        .filter_map(|(name, who)| {
            stats::agreement(&pairs(who)).map(|agreement| GraderAgreement {
                grader: name,
                agreement,
            })
        })
        .collect()
}

pub(crate) fn report(conn: &Connection, a: &Assignment) -> Result<Report> {
    let data = collect(conn, a)?;
    let roles = graders_of(&data);
    let g = gate(conn, &a.id)?;
    let (min_sample, min_qwk) = g.map_or((DEFAULT_MIN_SAMPLE, stats::TRUSTED_QWK), |g| {
        (g.min_sample, g.min_qwk)
    });
    let criteria: Vec<CriterionReport> = a
        .rubric
        .criteria
        .iter()
        .map(|c| {
            let graders = agreements(&roles, &|who| pairs_for(&data, c, who));
            let combined = graders.iter().find(|x| x.grader == "combined");
            let (trusted, verdict) =
                stats::verdict(combined.map(|x| &x.agreement), min_sample, min_qwk);
            CriterionReport {
                criterion_id: c.id.clone(),
                title: c.title.clone(),
                levels: c.levels.len(),
                graders,
                verdict,
                trusted,
            }
        })
        .collect();
    let overall = agreements(&roles, &|who| pooled(&data, &a.rubric, who));
    let combined = overall.iter().find(|x| x.grader == "combined").map(|x| {
        let mut o = x.agreement.clone();
        o.n = data.len();
        o
    });
    let (trusted, verdict) = stats::verdict(combined.as_ref(), min_sample, min_qwk);
    let blind: usize = conn.query_row(
        "SELECT COUNT(DISTINCT g.submission_id) FROM instructor_grades g
         JOIN submissions s ON s.id = g.submission_id
         WHERE s.assignment_id = ?1 AND g.source = 'blind'
           AND s.state IN ('awaiting_review', 'released')",
        [&a.id],
        |r| r.get::<_, i64>(0),
    )? as usize;
    let mut stmt = conn.prepare(
        "SELECT submission_id FROM exemplars WHERE assignment_id = ?1 ORDER BY marked_at, submission_id",
    )?;
    let exemplars = stmt
        .query_map([&a.id], |r| r.get(0))?
        .collect::<crate::db::Result<Vec<String>>>()?;
    Ok(Report {
        assignment_id: a.id.clone(),
        graded: data.len(),
        blind,
        gate: g,
        gate_met: g.is_none() || trusted,
        verdict,
        trusted,
        method: METHOD,
        criteria,
        overall,
        exemplars,
    })
}

// ---- CSV -----------------------------------------------------------------------------

/// One CSV field: quoted when needed, and a leading `=`, `+`, `-`, `@`, tab or CR made
/// inert (a spreadsheet would run it as a formula; names come from outside).
fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn line(out: &mut String, fields: &[String]) {
    let v: Vec<String> = fields.iter().map(|f| field(f)).collect();
    out.push_str(&v.join(","));
    out.push_str("\r\n");
}

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_default()
}

/// The calibration report as CSV: one row per (criterion or `overall`,
/// grader).
pub(crate) fn report_csv(r: &Report) -> String {
    let mut out = String::new();
    line(
        &mut out,
        &[
            "criterion",
            "grader",
            "n",
            "exact",
            "adjacent",
            "qwk",
            "qwk_ci95_low",
            "qwk_ci95_high",
            "mean_difference",
            "smd",
            "verdict",
        ]
        .map(str::to_owned),
    );
    let rows = r
        .criteria
        .iter()
        .map(|c| (c.criterion_id.as_str(), &c.graders, c.verdict.as_str()))
        .chain(std::iter::once(("overall", &r.overall, r.verdict.as_str())));
    for (criterion, graders, verdict) in rows {
        for g in graders {
            let a = &g.agreement;
            line(
                &mut out,
                &[
                    criterion.to_owned(),
                    g.grader.clone(),
                    a.n.to_string(),
                    num(Some(a.exact)),
                    num(Some(a.adjacent)),
                    num(a.qwk),
                    num(a.qwk_ci95.map(|c| c[0])),
                    num(a.qwk_ci95.map(|c| c[1])),
                    num(Some(a.mean_difference)),
                    num(a.smd),
                    if g.grader == "combined" {
                        verdict.to_owned()
                    } else {
                        String::new()
                    },
                ],
            );
        }
    }
    out
}

/// Every submission of an assignment with its grade, per criterion (final
/// level and points, each evaluator's level, the instructor's), flags and
/// how far the evaluators agree. Staff only (the route checks): it holds
/// unreleased grades.
pub(crate) fn grades_csv(conn: &Connection, a: &Assignment) -> Result<String> {
    let subs = domain::list_submissions(
        conn,
        &domain::SubmissionFilter {
            context_id: Some(a.context_id.clone()),
            assignment_id: Some(a.id.clone()),
            user_id: None,
            limit: None,
        },
    )?;
    let names: HashMap<String, String> = {
        let mut stmt = conn.prepare(
            "SELECT u.id, u.name FROM users u JOIN memberships m ON m.user_id = u.id
             WHERE m.context_id = ?1",
        )?;
        stmt.query_map([&a.context_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<crate::db::Result<_>>()?
    };
    let mut roles: Vec<String> = subs
        .iter()
        .flat_map(|s| s.evaluations.iter().map(|e| e.role.clone()))
        .collect();
    roles.sort();
    roles.dedup();
    let mut head: Vec<String> = [
        "submission_id",
        "user_id",
        "name",
        "attempt",
        "state",
        "released",
        "total",
        "max",
        "needs_review",
        "evaluator_flags",
        "review_reasons",
        "evaluators_agree",
        "max_level_gap",
    ]
    .map(str::to_owned)
    .to_vec();
    for c in &a.rubric.criteria {
        head.push(format!("{}_level", c.id));
        head.push(format!("{}_points", c.id));
        for r in &roles {
            head.push(format!("{}_evaluator_{r}", c.id));
        }
        head.push(format!("{}_instructor", c.id));
    }
    let mut out = String::new();
    line(&mut out, &head);
    for s in subs {
        let score = s.score.clone().unwrap_or(serde_json::Value::Null);
        let report = if score["report"].is_object() {
            &score["report"]
        } else {
            &score
        };
        let strings = |v: &serde_json::Value| -> String {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default()
        };
        let flags: Vec<String> = s
            .evaluations
            .iter()
            .flat_map(|e| e.flags.iter().map(move |f| format!("{}: {f}", e.role)))
            .collect();
        let instructor = instructor_levels(conn, &s.id)?;
        // Agreement between the evaluators: criteria on which every
        // evaluator chose the same level, and the largest gap in levels.
        let mut agree = 0;
        let mut rated = 0;
        let mut gap: Option<f64> = None;
        for c in &a.rubric.criteria {
            let ranks: Vec<f64> = s
                .evaluations
                .iter()
                .filter_map(|e| {
                    let r = e.ratings.iter().find(|r| r.criterion_id == c.id)?;
                    stats::rank_of_level(c, &r.level)
                })
                .collect();
            if ranks.len() >= 2 {
                rated += 1;
                let (lo, hi) = ranks
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                if hi - lo < 1e-9 {
                    agree += 1;
                }
                gap = Some(gap.map_or(hi - lo, |g: f64| g.max(hi - lo)));
            }
        }
        let mut row = vec![
            s.id.clone(),
            s.user_id.clone(),
            names.get(&s.user_id).cloned().unwrap_or_default(),
            s.attempt.to_string(),
            s.state.as_str().to_owned(),
            (s.state == SubmissionState::Released).to_string(),
            num(score["total"].as_f64()),
            num(score["max"].as_f64()),
            score["needs_review"]
                .as_bool()
                .map(|b| b.to_string())
                .unwrap_or_default(),
            flags.join("; "),
            strings(&score["reasons"]),
            if rated > 0 {
                format!("{agree}/{rated}")
            } else {
                String::new()
            },
            num(gap),
        ];
        for c in &a.rubric.criteria {
            let entry = report["criteria"]
                .as_array()
                .and_then(|l| l.iter().find(|x| x["criterion_id"].as_str() == Some(&c.id)));
            row.push(
                entry
                    .and_then(|e| e["level"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
            );
            row.push(num(entry.and_then(|e| e["points"].as_f64())));
            for r in &roles {
                row.push(
                    s.evaluations
                        .iter()
                        .find(|e| &e.role == r)
                        .and_then(|e| e.ratings.iter().find(|x| x.criterion_id == c.id))
                        .map(|x| x.level.clone())
                        .unwrap_or_default(),
                );
            }
            row.push(
                instructor
                    .iter()
                    .find(|l| l.criterion_id == c.id)
                    .map(|l| {
                        l.level
                            .clone()
                            .unwrap_or_else(|| format!("{} points", l.points))
                    })
                    .unwrap_or_default(),
            );
        }
        line(&mut out, &row);
    }
    Ok(out)
}

// ---- release selected ----------------------------------------------------------------

/// Body of `POST /api/v1/assignments/{id}/release-selected`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseSelected {
    pub submission_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Skipped {
    pub id: String,
    pub reason: String,
}

/// Releases the listed grades of one assignment that await review (each
/// audited, `via: release_selected`); the others are listed with why.
pub(crate) fn release_selected(
    tx: &Transaction<'_>,
    assignment: &str,
    actor: &str,
    req: &ReleaseSelected,
) -> Result<(Vec<String>, Vec<Skipped>)> {
    if req.submission_ids.is_empty() || req.submission_ids.len() > 1000 {
        return Err(Error::bad_request(
            "invalid_selection",
            "select between 1 and 1000 submissions to release",
        ));
    }
    let now = now_ms();
    let mut released = Vec::new();
    let mut skipped = Vec::new();
    for id in &req.submission_ids {
        let row: Option<(String, String)> = tx
            .query_row(
                "SELECT assignment_id, state FROM submissions WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            Some((aid, _)) if aid != assignment => skipped.push(Skipped {
                id: id.clone(),
                reason: "not a submission of this assignment".into(),
            }),
            None => skipped.push(Skipped {
                id: id.clone(),
                reason: "not a submission of this assignment".into(),
            }),
            Some((_, state)) => {
                if crate::jobs::release(tx, id, actor, now, "release_selected")? {
                    released.push(id.clone());
                } else {
                    skipped.push(Skipped {
                        id: id.clone(),
                        reason: format!(
                            "it is {}; only a grade awaiting review can be released",
                            state.replace('_', " ")
                        ),
                    });
                }
            }
        }
    }
    Ok((released, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_made_inert() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(field("-1.5"), "-1.5", "numbers stay numbers");
        assert_eq!(field("@cmd"), "'@cmd");
        assert_eq!(field("\t=1+1"), "'\t=1+1");
    }

    #[test]
    fn gates_are_checked() {
        assert!(
            Gate {
                min_qwk: 0.7,
                min_sample: 10
            }
            .validate()
            .is_ok()
        );
        assert!(
            Gate {
                min_qwk: 1.5,
                min_sample: 10
            }
            .validate()
            .is_err()
        );
        assert!(
            Gate {
                min_qwk: 0.7,
                min_sample: 0
            }
            .validate()
            .is_err()
        );
        assert!(
            Gate {
                min_qwk: f64::NAN,
                min_sample: 3
            }
            .validate()
            .is_err()
        );
    }
}
