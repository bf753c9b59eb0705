//! A Viva rubric plugin: `my-rubric-plugin` (copy this directory to start
//! your own; see plugins/README.md).
//!
//! What it does, as an example to change: the grade is the weighted mean of
//! the evaluators' points per criterion, and an answer shorter than
//! `min_words` is capped at `cap_percent` of the maximum and sent to review.
//! Every evaluator flag also sends the submission to review.

use serde::Deserialize;
use viva_plugin_sdk::{
    CriterionScore, Plugin, PluginInfo, ScoreError, ScoreReport, ScoreRequest, info,
    parse_config,
};

/// The configuration form instructors fill in. Each property becomes a
/// field: `title` is its label, `description` its help text, `default` its
/// initial value, `minimum`/`maximum` its range.
const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "My rubric plugin",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "min_words": {
      "title": "Shortest acceptable answer (words)",
      "type": "integer",
      "minimum": 0,
      "maximum": 10000,
      "default": 50
    },
    "cap_percent": {
      "title": "Highest grade for a shorter answer (% of the maximum)",
      "type": "number",
      "minimum": 0,
      "maximum": 100,
      "default": 50
    }
  }
}"#;

/// The same settings in Rust; serde fills in defaults for missing ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    min_words: u32,
    cap_percent: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_words: 50,
            cap_percent: 50.0,
        }
    }
}

struct MyPlugin;

impl Plugin for MyPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "my-rubric-plugin".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Weighted mean of the evaluators; short answers are capped and reviewed."
                .into(),
            config_schema: SCHEMA.into(),
            default_config: r#"{"min_words":50,"cap_percent":50}"#.into(),
        }
    }

    /// Checks what the schema cannot say. This plugin has nothing to add
    /// beyond parsing; return `Err("message for the instructor")` to refuse.
    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Config>(config).map(|_| ())
    }

    fn score(request: ScoreRequest) -> Result<ScoreReport, ScoreError> {
        let config: Config = parse_config(&request.config).map_err(ScoreError::InvalidConfig)?;
        if request.evaluations.is_empty() {
            return Err(ScoreError::MissingEvaluation("no evaluations".into()));
        }
        let mut reasons = Vec::new();
        let mut criteria = Vec::new();
        let mut total = 0.0;
        for criterion in &request.rubric.criteria {
            // Each evaluator's level for this criterion, as points.
            let points: Vec<f64> = request
                .evaluations
                .iter()
                .filter_map(|e| e.rating(&criterion.id))
                .filter_map(|r| criterion.level(&r.level))
                .map(|l| l.points)
                .collect();
            if points.is_empty() {
                reasons.push(format!("{}: no evaluator rated it", criterion.title));
            }
            let mean = points.iter().sum::<f64>() / points.len().max(1) as f64;
            total += criterion.weight * mean;
            criteria.push(CriterionScore {
                criterion_id: criterion.id.clone(),
                points: mean,
                level: criterion.label_for(mean),
                feedback: format!("{mean:.1} of {:.1} points", criterion.max_points()),
            });
        }
        let max = request.rubric.max_total();
        let words = request.submission.word_count;
        if words < config.min_words {
            let cap = max * config.cap_percent / 100.0;
            info!("{words} words < {}: capping {total} at {cap}", config.min_words);
            total = total.min(cap);
            reasons.push(format!(
                "the answer has {words} words, fewer than the {} expected; the grade is capped at {}%",
                config.min_words, config.cap_percent
            ));
        }
        for evaluation in &request.evaluations {
            for flag in &evaluation.flags {
                reasons.push(format!("evaluator {} flagged: {flag}", evaluation.role));
            }
        }
        Ok(ScoreReport {
            criteria,
            total,
            max,
            feedback: format!("{total:.1} of {max:.1} points."),
            needs_review: !reasons.is_empty(),
            review_reasons: reasons,
        })
    }
}

viva_plugin_sdk::export_plugin!(MyPlugin);
