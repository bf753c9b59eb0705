//! The instructor's rubric: criteria with weights and levels.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rubric {
    pub criteria: Vec<Criterion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    /// Stable identifier: lowercase letters, digits, `-` and `_`.
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
    pub levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    pub label: String,
    pub points: f64,
    #[serde(default)]
    pub descriptor: String,
}

fn default_weight() -> f64 {
    1.0
}

impl Rubric {
    /// Checks what a grader relies on; the message says what to fix.
    pub fn validate(&self) -> Result<(), Error> {
        if self.criteria.is_empty() {
            return Err(Error::Rubric(
                "a rubric needs at least one criterion".into(),
            ));
        }
        let mut ids = HashSet::new();
        for c in &self.criteria {
            let valid_id = !c.id.is_empty()
                && c.id.len() <= 64
                && c.id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_id {
                return Err(Error::Rubric(format!(
                    "criterion id {:?} must be 1-64 characters of a-z, 0-9, '-' or '_'",
                    c.id
                )));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(Error::Rubric(format!(
                    "criterion id {:?} appears twice",
                    c.id
                )));
            }
            if c.title.trim().is_empty() {
                return Err(Error::Rubric(format!("criterion {:?} needs a title", c.id)));
            }
            if !c.weight.is_finite() || c.weight <= 0.0 {
                return Err(Error::Rubric(format!(
                    "criterion {:?} has weight {}; weights must be positive numbers",
                    c.id, c.weight
                )));
            }
            if c.levels.len() < 2 {
                return Err(Error::Rubric(format!(
                    "criterion {:?} needs at least two levels",
                    c.id
                )));
            }
            let mut labels = HashSet::new();
            for l in &c.levels {
                if l.label.trim().is_empty() {
                    return Err(Error::Rubric(format!(
                        "criterion {:?} has a level without a label",
                        c.id
                    )));
                }
                if !labels.insert(l.label.as_str()) {
                    return Err(Error::Rubric(format!(
                        "criterion {:?} has level {:?} twice",
                        c.id, l.label
                    )));
                }
                if !l.points.is_finite() || l.points < 0.0 {
                    return Err(Error::Rubric(format!(
                        "level {:?} of criterion {:?} has points {}; points must be zero or more",
                        l.label, c.id, l.points
                    )));
                }
            }
        }
        Ok(())
    }

    /// Highest possible total: the weighted sum of each criterion's best level.
    pub fn max_points(&self) -> f64 {
        self.criteria
            .iter()
            .map(|c| c.weight * c.levels.iter().map(|l| l.points).fold(0.0, f64::max))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rubric() -> Rubric {
        serde_json::from_str(
            r#"{"criteria":[
              {"id":"content","title":"Content","weight":2,
               "levels":[{"label":"weak","points":0},{"label":"strong","points":4}]},
              {"id":"delivery","title":"Delivery",
               "levels":[{"label":"weak","points":1},{"label":"strong","points":3}]}]}"#,
        )
        .expect("parse")
    }

    #[test]
    fn valid_rubric_and_max_points() {
        let r = rubric();
        r.validate().expect("valid");
        assert_eq!(r.max_points(), 2.0 * 4.0 + 3.0);
    }

    #[test]
    fn duplicate_ids_bad_weights_and_points_are_rejected() {
        let mut r = rubric();
        r.criteria[1].id = "content".into();
        assert!(r.validate().is_err());
        let mut r = rubric();
        r.criteria[0].weight = f64::NAN;
        assert!(r.validate().is_err());
        let mut r = rubric();
        r.criteria[0].levels[0].points = -1.0;
        assert!(r.validate().is_err());
        let mut r = rubric();
        r.criteria[0].id = "Has Space".into();
        assert!(r.validate().is_err());
        assert!(Rubric { criteria: vec![] }.validate().is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<Rubric>(r#"{"criteria":[],"extra":1}"#);
        assert!(e.is_err());
    }
}
