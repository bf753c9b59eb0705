//! What goes into a plugin and what comes out, as the daemon and the
//! `viva plugin run` request files see them (JSON with serde), and the
//! host's checks of a plugin's report.
//!
//! A request file (`plugins/examples/*.json`) is a [`ScoreRequest`]: the
//! rubric and evaluations in the same JSON as the API, the submission facts,
//! and the instructor's configuration object.

use serde::{Deserialize, Serialize};
use viva_models::{Evaluation, Rubric, Segment, Transcript};

use crate::v0_1::viva::rubric::types as wit;

/// Everything a plugin gets for one submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub rubric: Rubric,
    pub submission: SubmissionFacts,
    pub evaluations: Vec<Evaluation>,
    /// The instructor's configuration object (`{}` for the plugin's defaults).
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// Facts about the submission that Viva measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmissionFacts {
    #[serde(default)]
    pub id: String,
    /// The transcript text.
    pub transcript: String,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub duration_seconds: f64,
    #[serde(default)]
    pub segments: Vec<Segment>,
}

impl SubmissionFacts {
    pub fn from_transcript(id: &str, duration_seconds: f64, t: &Transcript) -> SubmissionFacts {
        SubmissionFacts {
            id: id.to_owned(),
            transcript: t.text.clone(),
            language: t.language.clone(),
            duration_seconds,
            segments: t.segments.clone(),
        }
    }

    pub fn word_count(&self) -> u32 {
        self.transcript.split_whitespace().count() as u32
    }
}

/// Speech-to-text confidence of a segment: exp(avg_logprob), clamped to 0..1.
pub fn confidence(avg_logprob: f32) -> f32 {
    if avg_logprob.is_finite() {
        avg_logprob.exp().clamp(0.0, 1.0)
    } else {
        0.0
    }
}

impl ScoreRequest {
    /// The size the request occupies in the guest, roughly: all strings plus
    /// a fixed cost per record. Cheap to compute (no serialisation).
    pub fn approximate_size(&self) -> u64 {
        let rubric: usize = self
            .rubric
            .criteria
            .iter()
            .map(|c| {
                c.id.len()
                    + c.title.len()
                    + c.description.len()
                    + 16
                    + c.levels
                        .iter()
                        .map(|l| l.label.len() + l.descriptor.len() + 24)
                        .sum::<usize>()
            })
            .sum();
        let segments: usize = self
            .submission
            .segments
            .iter()
            .map(|s| s.text.len() + 32)
            .sum();
        let evaluations: usize = self
            .evaluations
            .iter()
            .map(|e| {
                e.role.len()
                    + e.model.len()
                    + e.flags.iter().map(|f| f.len() + 8).sum::<usize>()
                    + e.ratings
                        .iter()
                        .map(|r| {
                            r.criterion_id.len()
                                + r.evidence.len()
                                + r.rationale.len()
                                + r.level.len()
                                + 32
                        })
                        .sum::<usize>()
            })
            .sum();
        // Serialising the config is the only allocation; configs are small.
        let config = self.config.to_string().len();
        (rubric + segments + evaluations + config + self.submission.transcript.len() + 64) as u64
    }

    pub(crate) fn to_wit(&self) -> wit::ScoreRequest {
        wit::ScoreRequest {
            rubric: wit::Rubric {
                criteria: self
                    .rubric
                    .criteria
                    .iter()
                    .map(|c| wit::Criterion {
                        id: c.id.clone(),
                        title: c.title.clone(),
                        description: c.description.clone(),
                        weight: c.weight,
                        levels: c
                            .levels
                            .iter()
                            .map(|l| wit::Level {
                                label: l.label.clone(),
                                points: l.points,
                                descriptor: l.descriptor.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            },
            submission: wit::Submission {
                id: self.submission.id.clone(),
                transcript: self.submission.transcript.clone(),
                language: self.submission.language.clone(),
                duration_seconds: self.submission.duration_seconds,
                word_count: self.submission.word_count(),
                segments: self
                    .submission
                    .segments
                    .iter()
                    .map(|s| wit::Segment {
                        start_ms: s.start_ms,
                        end_ms: s.end_ms,
                        text: s.text.clone(),
                        avg_logprob: s.avg_logprob,
                        no_speech_prob: s.no_speech_prob,
                        confidence: confidence(s.avg_logprob),
                        low_confidence: s.low_confidence,
                    })
                    .collect(),
            },
            evaluations: self
                .evaluations
                .iter()
                .map(|e| wit::Evaluation {
                    role: e.role.clone(),
                    model: e.model.clone(),
                    ratings: e
                        .ratings
                        .iter()
                        .map(|r| wit::Rating {
                            criterion_id: r.criterion_id.clone(),
                            evidence: r.evidence.clone(),
                            rationale: r.rationale.clone(),
                            level: r.level.clone(),
                        })
                        .collect(),
                    flags: e.flags.clone(),
                })
                .collect(),
            config: self.config.to_string(),
        }
    }
}

/// A plugin's grade, checked against the rubric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    pub criteria: Vec<CriterionScore>,
    pub total: f64,
    pub max: f64,
    pub feedback: String,
    pub needs_review: bool,
    pub review_reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionScore {
    pub criterion_id: String,
    /// Points before the criterion's weight.
    pub points: f64,
    pub level: Option<String>,
    pub feedback: String,
}

/// Bytes of all strings in a report.
pub(crate) fn output_size(r: &wit::ScoreReport) -> u64 {
    let criteria: usize = r
        .criteria
        .iter()
        .map(|c| {
            c.criterion_id.len() + c.feedback.len() + c.level.as_ref().map_or(0, String::len) + 16
        })
        .sum();
    let reasons: usize = r.review_reasons.iter().map(|s| s.len() + 8).sum();
    (criteria + reasons + r.feedback.len() + 32) as u64
}

pub(crate) fn score_error_parts(e: wit::ScoreError) -> (&'static str, String) {
    match e {
        wit::ScoreError::InvalidConfig(m) => ("invalid-config", m),
        wit::ScoreError::MissingEvaluation(m) => ("missing-evaluation", m),
        wit::ScoreError::InvalidInput(m) => ("invalid-input", m),
        wit::ScoreError::Internal(m) => ("internal", m),
    }
}

/// Slack for floating-point sums when comparing against the rubric.
const EPSILON: f64 = 1e-9;

/// Checks a report against the rubric: known criterion ids, each at most
/// once, points within the criterion's range, level labels that exist,
/// finite total within `0..=max`, positive finite max.
pub(crate) fn check(rubric: &Rubric, r: wit::ScoreReport) -> Result<ScoreReport, String> {
    if !(r.max.is_finite() && r.max > 0.0) {
        return Err(format!("max is {}; it must be a positive number", r.max));
    }
    if !r.total.is_finite() {
        return Err(format!("total is {}; it must be a number", r.total));
    }
    if r.total < -EPSILON || r.total > r.max * (1.0 + EPSILON) + EPSILON {
        return Err(format!(
            "total {} is outside 0..{} (its own max)",
            r.total, r.max
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut criteria = Vec::with_capacity(r.criteria.len());
    for c in r.criteria {
        let Some(rc) = rubric.criteria.iter().find(|x| x.id == c.criterion_id) else {
            return Err(format!(
                "criterion {:?} is not in the rubric",
                c.criterion_id
            ));
        };
        if !seen.insert(c.criterion_id.clone()) {
            return Err(format!("criterion {:?} is scored twice", c.criterion_id));
        }
        let best = rc.levels.iter().map(|l| l.points).fold(0.0, f64::max);
        if !c.points.is_finite() || c.points < -EPSILON || c.points > best + EPSILON {
            return Err(format!(
                "criterion {:?} got {} points, outside the rubric's 0..{}",
                c.criterion_id, c.points, best
            ));
        }
        if let Some(level) = &c.level
            && !rc.levels.iter().any(|l| &l.label == level)
        {
            return Err(format!(
                "criterion {:?} names level {level:?}, which it does not have",
                c.criterion_id
            ));
        }
        criteria.push(CriterionScore {
            criterion_id: c.criterion_id,
            points: c.points,
            level: c.level,
            feedback: c.feedback,
        });
    }
    Ok(ScoreReport {
        criteria,
        total: r.total,
        max: r.max,
        feedback: r.feedback,
        // A report with reasons always goes to review.
        needs_review: r.needs_review || !r.review_reasons.is_empty(),
        review_reasons: r.review_reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rubric() -> Rubric {
        serde_json::from_value(serde_json::json!({"criteria": [
            {"id": "c", "title": "C", "levels": [{"label": "lo", "points": 0}, {"label": "hi", "points": 4}]}
        ]}))
        .expect("rubric")
    }

    fn report(points: f64, total: f64) -> wit::ScoreReport {
        wit::ScoreReport {
            criteria: vec![wit::CriterionScore {
                criterion_id: "c".into(),
                points,
                level: None,
                feedback: String::new(),
            }],
            total,
            max: 4.0,
            feedback: String::new(),
            needs_review: false,
            review_reasons: vec![],
        }
    }

    #[test]
    fn reports_within_the_rubric_pass() {
        let r = check(&rubric(), report(4.0, 4.0)).expect("valid");
        assert_eq!(r.total, 4.0);
    }

    #[test]
    fn points_outside_the_rubric_nan_and_unknown_ids_fail() {
        assert!(check(&rubric(), report(5.0, 4.0)).is_err());
        assert!(check(&rubric(), report(-1.0, 0.0)).is_err());
        assert!(check(&rubric(), report(f64::NAN, 1.0)).is_err());
        assert!(check(&rubric(), report(1.0, f64::NAN)).is_err());
        assert!(check(&rubric(), report(1.0, 9.0)).is_err());
        let mut r = report(1.0, 1.0);
        r.criteria[0].criterion_id = "zzz".into();
        assert!(check(&rubric(), r).expect_err("unknown").contains("zzz"));
        let mut r = report(1.0, 1.0);
        r.criteria[0].level = Some("mid".into());
        assert!(check(&rubric(), r).is_err());
    }

    #[test]
    fn confidence_is_a_probability() {
        assert_eq!(confidence(0.0), 1.0);
        assert!((confidence(-1.0) - 0.3679).abs() < 1e-3);
        assert_eq!(confidence(f32::NAN), 0.0);
    }
}
