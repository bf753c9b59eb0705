//! `weighted-criteria`: Viva's default rubric plugin.
//!
//! Per criterion it reconciles the evaluators: when their levels are within
//! `max_level_gap` of each other it combines their points (`combine`: mean,
//! min or max); otherwise it takes `fallback` and flags the submission for
//! review, saying which criterion and how far apart the evaluators were. The
//! total is the weighted sum of the criteria. It also flags every submission
//! an evaluator flagged (e.g. instruction-like content in the transcript),
//! every submission whose speech-to-text confidence is low, and empty
//! transcripts. Feedback is assembled from the evaluators' evidence and
//! rationales; where no evaluator wrote a rationale that says something,
//! the level's descriptor from the rubric stands in. (The daemon blanks
//! evidence that is not in the transcript and text that is not language
//! before a plugin sees it; this plugin also skips fields without a letter.)

use serde::Deserialize;
use viva_plugin_sdk::{
    Criterion, CriterionScore, Evaluation, Plugin, PluginInfo, ScoreError, ScoreReport,
    ScoreRequest, Segment, parse_config,
};

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "Weighted criteria",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "combine": {
      "title": "Combine agreeing evaluations",
      "description": "How to combine the evaluators' points when they agree within the allowed gap.",
      "type": "string",
      "enum": ["mean", "min", "max"],
      "default": "mean"
    },
    "max_level_gap": {
      "title": "Largest level gap that counts as agreement",
      "description": "Evaluators further apart than this many levels send the submission to review.",
      "type": "integer",
      "minimum": 0,
      "maximum": 10,
      "default": 1
    },
    "fallback": {
      "title": "Points when evaluators disagree",
      "description": "Which evaluator's points to use when they disagree (the submission is flagged for review either way).",
      "type": "string",
      "enum": ["min", "max", "mean"],
      "default": "min"
    },
    "min_segment_confidence": {
      "title": "Lowest acceptable speech-to-text confidence per segment",
      "type": "number",
      "minimum": 0,
      "maximum": 1,
      "default": 0.4
    },
    "max_low_confidence_share": {
      "title": "Largest share of the recording allowed below that confidence",
      "description": "Above this share (0-1) of the recording's time in low-confidence segments, the submission is flagged for review.",
      "type": "number",
      "minimum": 0,
      "maximum": 1,
      "default": 0.1
    }
  }
}"#;

const DEFAULT_CONFIG: &str = r#"{"combine":"mean","max_level_gap":1,"fallback":"min","min_segment_confidence":0.4,"max_low_confidence_share":0.1}"#;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Combine {
    Mean,
    Min,
    Max,
}

impl Combine {
    fn apply(self, points: &[f64]) -> f64 {
        match self {
            Combine::Mean => points.iter().sum::<f64>() / points.len().max(1) as f64,
            Combine::Min => points.iter().copied().fold(f64::INFINITY, f64::min),
            Combine::Max => points.iter().copied().fold(0.0, f64::max),
        }
    }

    fn words(self) -> &'static str {
        match self {
            Combine::Mean => "the mean",
            Combine::Min => "the lower",
            Combine::Max => "the higher",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    combine: Combine,
    max_level_gap: u32,
    fallback: Combine,
    min_segment_confidence: f64,
    max_low_confidence_share: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            combine: Combine::Mean,
            max_level_gap: 1,
            fallback: Combine::Min,
            min_segment_confidence: 0.4,
            max_low_confidence_share: 0.1,
        }
    }
}

struct WeightedCriteria;

impl Plugin for WeightedCriteria {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "weighted-criteria".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Reconciles the two evaluations per criterion (agreement within a level \
                          gap is combined, larger disagreement goes to review) and totals the \
                          weighted criteria. Flags evaluator concerns and low speech-to-text \
                          confidence for review."
                .into(),
            config_schema: SCHEMA.into(),
            default_config: DEFAULT_CONFIG.into(),
        }
    }

    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Config>(config).map(|_| ())
    }

    fn score(request: ScoreRequest) -> Result<ScoreReport, ScoreError> {
        let config: Config = parse_config(&request.config).map_err(ScoreError::InvalidConfig)?;
        if request.evaluations.is_empty() {
            return Err(ScoreError::MissingEvaluation(
                "no evaluation arrived for this submission".into(),
            ));
        }
        let mut reasons = Vec::new();
        let mut criteria = Vec::new();
        let mut total = 0.0;
        for criterion in &request.rubric.criteria {
            let scored = score_criterion(criterion, &request.evaluations, &config, &mut reasons);
            total += criterion.weight * scored.points;
            criteria.push(scored);
        }
        let max = request.rubric.max_total();
        for evaluation in &request.evaluations {
            for flag in &evaluation.flags {
                push_unique(
                    &mut reasons,
                    format!(
                        "evaluator {} ({}) flagged: {flag}",
                        evaluation.role, evaluation.model
                    ),
                );
            }
        }
        if request.submission.word_count == 0 {
            reasons.push("the transcript is empty: check the recording".into());
        }
        if let Some(reason) = low_confidence(&request.submission.segments, &config) {
            reasons.push(reason);
        }
        let mut feedback: Vec<String> = request
            .rubric
            .criteria
            .iter()
            .zip(&criteria)
            .map(|(c, s)| format!("{}: {}", c.title, s.feedback))
            .collect();
        feedback.push(format!("Total: {} of {}.", fmt(total), fmt(max)));
        Ok(ScoreReport {
            criteria,
            total,
            max,
            feedback: feedback.join("\n"),
            needs_review: !reasons.is_empty(),
            review_reasons: reasons,
        })
    }
}

viva_plugin_sdk::export_plugin!(WeightedCriteria);

/// One evaluator's usable rating of a criterion.
struct Judgement<'a> {
    role: &'a str,
    level: &'a str,
    rank: usize,
    points: f64,
    evidence: &'a str,
    rationale: &'a str,
}

fn score_criterion(
    criterion: &Criterion,
    evaluations: &[Evaluation],
    config: &Config,
    reasons: &mut Vec<String>,
) -> CriterionScore {
    let mut judgements = Vec::new();
    for evaluation in evaluations {
        let Some(rating) = evaluation.rating(&criterion.id) else {
            reasons.push(format!(
                "{}: evaluator {} gave no rating",
                criterion.title, evaluation.role
            ));
            continue;
        };
        match (
            criterion.level(&rating.level),
            criterion.rank(&rating.level),
        ) {
            (Some(level), Some(rank)) => judgements.push(Judgement {
                role: &evaluation.role,
                level: &level.label,
                rank,
                points: level.points,
                evidence: says_something(rating.evidence.trim()),
                rationale: says_something(rating.rationale.trim()),
            }),
            _ => reasons.push(format!(
                "{}: evaluator {} chose {:?}, which is not one of the criterion's levels",
                criterion.title, evaluation.role, rating.level
            )),
        }
    }
    if judgements.is_empty() {
        reasons.push(format!(
            "{}: no usable rating; scored 0 until a person checks it",
            criterion.title
        ));
        return CriterionScore {
            criterion_id: criterion.id.clone(),
            points: 0.0,
            level: None,
            feedback: "not rated".into(),
        };
    }
    let points: Vec<f64> = judgements.iter().map(|j| j.points).collect();
    let lowest = judgements.iter().map(|j| j.rank).min().unwrap_or(0);
    let highest = judgements.iter().map(|j| j.rank).max().unwrap_or(0);
    let gap = highest - lowest;
    let value = if gap as u32 <= config.max_level_gap {
        config.combine.apply(&points)
    } else {
        let chosen = config.fallback.apply(&points);
        let who: Vec<String> = judgements
            .iter()
            .map(|j| format!("{}: {}", j.role, j.level))
            .collect();
        reasons.push(format!(
            "{}: evaluators disagree by {gap} levels ({}); used {} ({} points)",
            criterion.title,
            who.join(", "),
            config.fallback.words(),
            fmt(chosen)
        ));
        chosen
    };
    let level = criterion.label_for(value);
    let mut feedback = format!(
        "{} ({} of {} points).",
        level.as_deref().unwrap_or("between levels"),
        fmt(value),
        fmt(criterion.max_points())
    );
    let mut seen = Vec::new();
    for j in &judgements {
        if !j.rationale.is_empty() && !seen.contains(&j.rationale) {
            feedback.push(' ');
            feedback.push_str(j.rationale);
            seen.push(j.rationale);
        }
    }
    if seen.is_empty()
        && let Some(d) = level
            .as_deref()
            .and_then(|l| criterion.level(l))
            .map(|l| l.descriptor.trim())
            .filter(|d| !d.is_empty())
    {
        // No rationale worth reading: the rubric's words for the level.
        feedback.push(' ');
        feedback.push_str(d);
    }
    let evidence: Vec<String> = judgements
        .iter()
        .filter(|j| !j.evidence.is_empty())
        .map(|j| format!("\u{201c}{}\u{201d}", j.evidence))
        .fold(Vec::new(), |mut acc, e| {
            if !acc.contains(&e) {
                acc.push(e);
            }
            acc
        });
    if !evidence.is_empty() {
        feedback.push_str(" Evidence: ");
        feedback.push_str(&evidence.join("; "));
        feedback.push('.');
    }
    CriterionScore {
        criterion_id: criterion.id.clone(),
        points: value,
        level,
        feedback,
    }
}

/// A review reason when too much of the recording was transcribed with low
/// confidence.
fn low_confidence(segments: &[Segment], config: &Config) -> Option<String> {
    if segments.is_empty() {
        return None;
    }
    let span = |s: &Segment| s.end_ms.saturating_sub(s.start_ms) as f64;
    let all: f64 = segments.iter().map(span).sum();
    let low: Vec<&Segment> = segments
        .iter()
        .filter(|s| s.low_confidence || f64::from(s.confidence) < config.min_segment_confidence)
        .collect();
    if low.is_empty() {
        return None;
    }
    let share = if all > 0.0 {
        low.iter().map(|s| span(s)).sum::<f64>() / all
    } else {
        low.len() as f64 / segments.len() as f64
    };
    if share <= config.max_low_confidence_share {
        return None;
    }
    let first = low[0].start_ms / 1000;
    Some(format!(
        "low speech-to-text confidence: {} of {} segments ({:.0}% of the recording) are unsure, \
         the first at {}:{:02}; check the transcript against the recording",
        low.len(),
        segments.len(),
        share * 100.0,
        first / 60,
        first % 60
    ))
}

/// `text`, or nothing when it has no letter ("1", "2.5", "--").
fn says_something(text: &str) -> &str {
    if text.chars().any(char::is_alphabetic) {
        text
    } else {
        ""
    }
}

fn push_unique(reasons: &mut Vec<String>, reason: String) {
    if !reasons.contains(&reason) {
        reasons.push(reason);
    }
}

/// Numbers as a person writes them: 2, 2.5, 2.33.
fn fmt(x: f64) -> String {
    let r = (x * 100.0).round() / 100.0;
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        let s = format!("{r:.2}");
        s.trim_end_matches('0').to_owned()
    }
}
