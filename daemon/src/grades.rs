//! A stored grade and an instructor's override of it: pure functions on the
//! score report, no database. [`crate::jobs::override_grade`] applies them
//! inside the transaction that stores the result.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Body of `POST /api/v1/submissions/{id}/override`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OverrideRequest {
    #[serde(default)]
    pub criteria: Vec<CriterionOverride>,
    /// Replaces the overall feedback.
    #[serde(default)]
    pub feedback: Option<String>,
    /// Why, for the audit log; instructors only, unless `share_note`.
    #[serde(default)]
    pub note: Option<String>,
    /// Show the note to the student once the grade is released.
    #[serde(default)]
    pub share_note: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CriterionOverride {
    pub criterion_id: String,
    /// Points before the criterion's weight.
    #[serde(default)]
    pub points: Option<f64>,
    #[serde(default)]
    pub feedback: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Change {
    pub criterion_id: Option<String>,
    pub field: &'static str,
    pub from: serde_json::Value,
    pub to: serde_json::Value,
}

/// Applies an override to a stored score (`{total, max, needs_review,
/// reasons, report: {criteria, feedback, …}}` as the scheduler stores it, or
/// a bare report); returns the changes. The total is recomputed as the
/// weighted sum of the criteria's points, in both places.
pub(crate) fn apply_override(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: &Error) -> &'static str {
        match e {
            Error::BadRequest { code, .. } | Error::Conflict { code, .. } => code,
            _ => "other",
        }
    }

    fn rubric() -> viva_models::Rubric {
        crate::domain::sandbox_assignment().rubric
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
            assert_eq!(code_of(&e), code);
        }
        let mut none = serde_json::Value::Null;
        let req: OverrideRequest =
            serde_json::from_value(serde_json::json!({"criteria": []})).expect("request");
        assert_eq!(
            code_of(&apply_override(&rubric(), &mut none, &req).expect_err("no score")),
            "no_score"
        );
    }
}
