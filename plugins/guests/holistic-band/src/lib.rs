//! `holistic-band`: places a submission in a band (CEFR A1–C2 by default).
//!
//! The evaluators' points are combined per criterion (mean by default) into
//! a weighted percentage of the rubric's maximum; the band is the highest
//! whose `min_percent` that percentage reaches. The grade is the percentage
//! on a `scale_max` scale (100 by default). Submissions within
//! `borderline_margin` percentage points of a band boundary, and every
//! submission an evaluator flagged, go to review: a person decides the
//! close calls.

use serde::Deserialize;
use viva_plugin_sdk::{
    CriterionScore, Plugin, PluginInfo, ScoreError, ScoreReport, ScoreRequest, parse_config,
};

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "Holistic band",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "bands": {
      "title": "Bands",
      "description": "From the lowest up; each starts at min_percent of the rubric's maximum. The first starts at 0.",
      "type": "array",
      "minItems": 1,
      "maxItems": 20,
      "items": {
        "type": "object",
        "additionalProperties": false,
        "required": ["label", "min_percent"],
        "properties": {
          "label": {"type": "string", "minLength": 1, "maxLength": 40},
          "min_percent": {"type": "number", "minimum": 0, "maximum": 100}
        }
      }
    },
    "scale_max": {
      "title": "Grade out of",
      "type": "number",
      "exclusiveMinimum": 0,
      "maximum": 1000,
      "default": 100
    },
    "combine": {
      "title": "Combine the evaluators",
      "type": "string",
      "enum": ["mean", "min", "max"],
      "default": "mean"
    },
    "borderline_margin": {
      "title": "Review margin around band boundaries (percentage points)",
      "type": "number",
      "minimum": 0,
      "maximum": 50,
      "default": 2
    }
  }
}"#;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Band {
    label: String,
    min_percent: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Combine {
    Mean,
    Min,
    Max,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    bands: Vec<Band>,
    scale_max: f64,
    combine: Combine,
    borderline_margin: f64,
}

impl Default for Config {
    fn default() -> Self {
        let cefr = [
            ("A1", 0.0),
            ("A2", 20.0),
            ("B1", 40.0),
            ("B2", 60.0),
            ("C1", 75.0),
            ("C2", 90.0),
        ];
        Config {
            bands: cefr
                .iter()
                .map(|(label, min_percent)| Band {
                    label: (*label).into(),
                    min_percent: *min_percent,
                })
                .collect(),
            scale_max: 100.0,
            combine: Combine::Mean,
            borderline_margin: 2.0,
        }
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let Some(first) = self.bands.first() else {
            return Err("bands: give at least one band".into());
        };
        if first.min_percent != 0.0 {
            return Err(format!(
                "bands: the first band ({}) must start at min_percent 0, so every submission has a band",
                first.label
            ));
        }
        for pair in self.bands.windows(2) {
            if pair[1].min_percent <= pair[0].min_percent {
                return Err(format!(
                    "bands: {} (from {}%) must start above {} (from {}%): list bands from the lowest up",
                    pair[1].label, pair[1].min_percent, pair[0].label, pair[0].min_percent
                ));
            }
        }
        for (i, band) in self.bands.iter().enumerate() {
            if self.bands[..i].iter().any(|b| b.label == band.label) {
                return Err(format!("bands: the label {:?} appears twice", band.label));
            }
        }
        if !(self.scale_max.is_finite() && self.scale_max > 0.0) {
            return Err("scale_max must be a positive number".into());
        }
        Ok(())
    }
}

struct HolisticBand;

impl Plugin for HolisticBand {
    fn info() -> PluginInfo {
        let default = r#"{"bands":[{"label":"A1","min_percent":0},{"label":"A2","min_percent":20},{"label":"B1","min_percent":40},{"label":"B2","min_percent":60},{"label":"C1","min_percent":75},{"label":"C2","min_percent":90}],"scale_max":100,"combine":"mean","borderline_margin":2}"#;
        PluginInfo {
            name: "holistic-band".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Places the submission in a band (CEFR A1-C2 by default) from the \
                          weighted rubric percentage; close calls near a band boundary go to review."
                .into(),
            config_schema: SCHEMA.into(),
            default_config: default.into(),
        }
    }

    fn validate_config(config: &str) -> Result<(), String> {
        parse_config::<Config>(config)?.check()
    }

    fn score(request: ScoreRequest) -> Result<ScoreReport, ScoreError> {
        let config: Config = parse_config(&request.config).map_err(ScoreError::InvalidConfig)?;
        config.check().map_err(ScoreError::InvalidConfig)?;
        if request.evaluations.is_empty() {
            return Err(ScoreError::MissingEvaluation(
                "no evaluation arrived for this submission".into(),
            ));
        }
        let mut reasons = Vec::new();
        let mut criteria = Vec::new();
        let mut weighted = 0.0;
        for criterion in &request.rubric.criteria {
            let points: Vec<f64> = request
                .evaluations
                .iter()
                .filter_map(|e| e.rating(&criterion.id))
                .filter_map(|r| criterion.level(&r.level))
                .map(|l| l.points)
                .collect();
            if points.len() < request.evaluations.len() {
                reasons.push(format!(
                    "{}: {} of {} evaluators gave a usable rating",
                    criterion.title,
                    points.len(),
                    request.evaluations.len()
                ));
            }
            let value = if points.is_empty() {
                0.0
            } else {
                match config.combine {
                    Combine::Mean => points.iter().sum::<f64>() / points.len() as f64,
                    Combine::Min => points.iter().copied().fold(f64::INFINITY, f64::min),
                    Combine::Max => points.iter().copied().fold(0.0, f64::max),
                }
            };
            weighted += criterion.weight * value;
            criteria.push(CriterionScore {
                criterion_id: criterion.id.clone(),
                points: value,
                level: criterion.label_for(value),
                feedback: format!("{value:.1} of {:.1} points", criterion.max_points()),
            });
        }
        let max = request.rubric.max_total();
        let percent = if max > 0.0 {
            (weighted / max * 100.0).clamp(0.0, 100.0)
        } else {
            0.0
        };
        let index = config
            .bands
            .iter()
            .rposition(|b| percent >= b.min_percent)
            .unwrap_or(0);
        let band = &config.bands[index];
        for boundary in config.bands.iter().skip(1) {
            if (percent - boundary.min_percent).abs() < config.borderline_margin {
                reasons.push(format!(
                    "borderline: {percent:.1}% is within {} points of the {} boundary at {}%",
                    config.borderline_margin, boundary.label, boundary.min_percent
                ));
            }
        }
        for evaluation in &request.evaluations {
            for flag in &evaluation.flags {
                reasons.push(format!(
                    "evaluator {} ({}) flagged: {flag}",
                    evaluation.role, evaluation.model
                ));
            }
        }
        let mut feedback = format!("Band {} ({percent:.0}% of the rubric).", band.label);
        if let Some(next) = config.bands.get(index + 1) {
            feedback.push_str(&format!(
                " The next band, {}, starts at {}%.",
                next.label, next.min_percent
            ));
        }
        Ok(ScoreReport {
            criteria,
            total: percent / 100.0 * config.scale_max,
            max: config.scale_max,
            feedback,
            needs_review: !reasons.is_empty(),
            review_reasons: reasons,
        })
    }
}

viva_plugin_sdk::export_plugin!(HolisticBand);
