//! The output grammar of an evaluator, generated from the rubric, and the
//! parser that checks a model's answer against it.
//!
//! The evaluator's answer is one JSON object:
//!
//! ```json
//! {"addresses_grader":false,"ratings":[{"criterion_id":"content","evidence":"…","rationale":"…","level":"complete"}, …]}
//! ```
//!
//! `addresses_grader` comes first: the model judges the whole answer —
//! does it speak to whoever grades it, or about its own grading or marks,
//! instead of answering the question? — before it rates anything, so the
//! judgement does not follow from the levels it chose. `true` becomes the
//! evaluator flag [`crate::injection::ADDRESSES_GRADER`], which holds the
//! grade for review (a layer beside the keyword detector, see
//! [`crate::injection`]).
//!
//! with every criterion exactly once, in rubric order. The GBNF grammar
//! (llama.cpp's grammar format) makes any other output impossible: criterion
//! ids are literals, each level is one of that criterion's labels, and
//! evidence and rationale come *before* the level, so the model writes down
//! what it saw and why before it commits to a judgement. Strings have a
//! bounded length (no quotes, backslashes or control characters), so
//! generation always terminates within [`OutputGrammar::max_output_chars`].

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::payload::CriterionRating;
use crate::rubric::Rubric;

/// Largest bound of a free-text field: llama.cpp's grammar parser turns a
/// repetition of more than 2000 into an unbounded one, so larger limits are
/// clamped to this.
pub const MAX_FIELD_CHARS: usize = 2000;

/// Bounds of the free-text fields of an evaluation (at most
/// [`MAX_FIELD_CHARS`] each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarLimits {
    /// Most characters of `evidence` (a quote or paraphrase of the transcript).
    pub evidence_chars: usize,
    /// Most characters of `rationale`.
    pub rationale_chars: usize,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        Self {
            evidence_chars: 200,
            rationale_chars: 240,
        }
    }
}

/// A generated grammar and what it implies.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputGrammar {
    /// GBNF text; its start rule is `root`.
    pub gbnf: String,
    /// Longest output (in characters) the grammar admits. Every token of a
    /// model is at least one character, so this also bounds the generated
    /// tokens: a `max_tokens` at least this large never cuts an answer short.
    pub max_output_chars: usize,
}

/// Writes `text` as a GBNF string literal (with its quotes).
fn gbnf_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `text` as a JSON string (with its quotes), as the model must write it.
fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Builds the grammar for `rubric` (which should be valid, see
/// [`Rubric::validate`]).
pub fn output_grammar(rubric: &Rubric, limits: GrammarLimits) -> OutputGrammar {
    let limits = GrammarLimits {
        evidence_chars: limits.evidence_chars.min(MAX_FIELD_CHARS),
        rationale_chars: limits.rationale_chars.min(MAX_FIELD_CHARS),
    };
    // Fixed punctuation: no whitespace except an optional single space after
    // `:` and `,`, which models trained on pretty JSON like to emit. Fewer
    // choices also mean the unconstrained best token is usually accepted,
    // which keeps the fast sampling path fast.
    let mut gbnf = String::new();
    let mut max = 0usize;

    let items: Vec<String> = (0..rubric.criteria.len())
        .map(|i| format!("c{i}"))
        .collect();
    gbnf.push_str("root ::= ");
    gbnf.push_str(&gbnf_literal("{\"addresses_grader\":"));
    gbnf.push_str(" sp (\"true\" | \"false\") \",\" sp ");
    gbnf.push_str(&gbnf_literal("\"ratings\":"));
    gbnf.push_str(" sp \"[\" ");
    gbnf.push_str(&items.join(" \",\" sp "));
    gbnf.push_str(" \"]}\"\n");
    max += "{\"addresses_grader\": false, ".len()
        + "\"ratings\": [".len()
        + "]}".len()
        + 2 * rubric.criteria.len().saturating_sub(1);

    for (i, c) in rubric.criteria.iter().enumerate() {
        let head = "{\"criterion_id\":";
        gbnf.push_str(&format!(
            "c{i} ::= {} sp {} \",\" sp {} sp evidence \",\" sp {} sp rationale \",\" sp {} sp c{i}-level \"}}\"\n",
            gbnf_literal(head),
            gbnf_literal(&json_string(&c.id)),
            gbnf_literal("\"evidence\":"),
            gbnf_literal("\"rationale\":"),
            gbnf_literal("\"level\":"),
        ));
        let labels: Vec<String> = c
            .levels
            .iter()
            .map(|l| gbnf_literal(&json_string(&l.label)))
            .collect();
        gbnf.push_str(&format!("c{i}-level ::= {}\n", labels.join(" | ")));
        let longest_label = c
            .levels
            .iter()
            .map(|l| json_string(&l.label).chars().count())
            .max()
            .unwrap_or(0);
        max += head.len()
            + json_string(&c.id).chars().count()
            + ",\"evidence\":".len()
            + ",\"rationale\":".len()
            + ",\"level\":".len()
            + "}".len()
            + 7 // optional spaces
            + 2 * 2 // quotes of evidence and rationale
            + limits.evidence_chars
            + limits.rationale_chars
            + longest_label;
    }
    gbnf.push_str(&format!(
        "evidence ::= \"\\\"\" char{{0,{}}} \"\\\"\"\n",
        limits.evidence_chars
    ));
    gbnf.push_str(&format!(
        "rationale ::= \"\\\"\" char{{0,{}}} \"\\\"\"\n",
        limits.rationale_chars
    ));
    // Any character but a quote, a backslash or a control character: the
    // output is valid JSON without escapes.
    gbnf.push_str("char ::= [^\"\\\\\\x00-\\x1F\\x7F]\n");
    gbnf.push_str("sp ::= \" \"?\n");
    OutputGrammar {
        gbnf,
        max_output_chars: max,
    }
}

/// The same answer as [`output_grammar`], as a JSON Schema (draft 2020-12
/// subset), for inference servers that constrain output by a schema
/// (OpenAI's `response_format` of type `json_schema`: vLLM, llama.cpp's
/// server, Ollama). Serialised, its properties are in the order the model
/// must write them (evidence and rationale before the level), which
/// llama.cpp's and vLLM's schema-to-grammar converters keep; a
/// `serde_json::Value` would sort them, hence typed structs. `prefixItems`
/// fixes the criteria's order; [`parse_answer`] checks the rest whatever a
/// server made of the schema.
pub fn output_schema(rubric: &Rubric, limits: GrammarLimits) -> OutputSchema {
    let evidence = limits.evidence_chars.min(MAX_FIELD_CHARS);
    let rationale = limits.rationale_chars.min(MAX_FIELD_CHARS);
    let criteria: Vec<CriterionSchema> = rubric
        .criteria
        .iter()
        .map(|c| CriterionSchema {
            kind: "object",
            properties: CriterionProperties {
                criterion_id: ConstString {
                    kind: "string",
                    value: c.id.clone(),
                },
                evidence: BoundedString {
                    kind: "string",
                    max_length: evidence,
                },
                rationale: BoundedString {
                    kind: "string",
                    max_length: rationale,
                },
                level: OneOfStrings {
                    kind: "string",
                    values: c.levels.iter().map(|l| l.label.clone()).collect(),
                },
            },
            required: ["criterion_id", "evidence", "rationale", "level"],
            additional_properties: false,
        })
        .collect();
    let n = criteria.len();
    OutputSchema {
        kind: "object",
        properties: AnswerProperties {
            addresses_grader: TypeOnly { kind: "boolean" },
            ratings: RatingsSchema {
                kind: "array",
                prefix_items: criteria,
                items: false,
                min_items: n,
                max_items: n,
            },
        },
        required: ["addresses_grader", "ratings"],
        additional_properties: false,
    }
}

/// The JSON Schema of an evaluator's answer (see [`output_schema`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputSchema {
    #[serde(rename = "type")]
    kind: &'static str,
    properties: AnswerProperties,
    required: [&'static str; 2],
    #[serde(rename = "additionalProperties")]
    additional_properties: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct AnswerProperties {
    addresses_grader: TypeOnly,
    ratings: RatingsSchema,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct RatingsSchema {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "prefixItems")]
    prefix_items: Vec<CriterionSchema>,
    items: bool,
    #[serde(rename = "minItems")]
    min_items: usize,
    #[serde(rename = "maxItems")]
    max_items: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct CriterionSchema {
    #[serde(rename = "type")]
    kind: &'static str,
    properties: CriterionProperties,
    required: [&'static str; 4],
    #[serde(rename = "additionalProperties")]
    additional_properties: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct CriterionProperties {
    criterion_id: ConstString,
    evidence: BoundedString,
    rationale: BoundedString,
    level: OneOfStrings,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct ConstString {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "const")]
    value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct BoundedString {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "maxLength")]
    max_length: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct OneOfStrings {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "enum")]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    /// Absent in answers from before the field (and from workers that
    /// do not ask for it).
    #[serde(default)]
    addresses_grader: Option<bool>,
    ratings: Vec<CriterionRating>,
}

/// A parsed answer: the per-submission judgement and the ratings.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedAnswer {
    /// Whether the model judged that the answer speaks to the grader or
    /// about its grading (`None`: not asked).
    pub addresses_grader: Option<bool>,
    pub ratings: Vec<CriterionRating>,
}

/// Parses a model's answer and checks it against the rubric: every
/// criterion exactly once, in rubric order, each with one of its labels.
/// (Grammar-constrained output always passes; this guards against a model
/// or backend that ignored the grammar.)
pub fn parse_ratings(output: &str, rubric: &Rubric) -> Result<Vec<CriterionRating>, Error> {
    parse_answer(output, rubric).map(|a| a.ratings)
}

/// [`parse_ratings`] with the `addresses_grader` judgement.
pub fn parse_answer(output: &str, rubric: &Rubric) -> Result<ParsedAnswer, Error> {
    let answer: Answer = serde_json::from_str(output.trim())
        .map_err(|e| Error::Output(format!("not the expected JSON ({e})")))?;
    if answer.ratings.len() != rubric.criteria.len() {
        return Err(Error::Output(format!(
            "{} ratings for {} criteria",
            answer.ratings.len(),
            rubric.criteria.len()
        )));
    }
    for (r, c) in answer.ratings.iter().zip(&rubric.criteria) {
        if r.criterion_id != c.id {
            return Err(Error::Output(format!(
                "rating for {:?} where criterion {:?} was expected",
                r.criterion_id, c.id
            )));
        }
        if !c.levels.iter().any(|l| l.label == r.level) {
            return Err(Error::Output(format!(
                "criterion {:?} rated {:?}, which is not one of its levels",
                c.id, r.level
            )));
        }
    }
    Ok(ParsedAnswer {
        addresses_grader: answer.addresses_grader,
        ratings: answer.ratings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rubric() -> Rubric {
        serde_json::from_str(
            r#"{"criteria":[
              {"id":"content","title":"Content","weight":2,
               "levels":[{"label":"missing","points":0},{"label":"partial","points":2},
                         {"label":"complete","points":4}]},
              {"id":"delivery","title":"Delivery",
               "levels":[{"label":"weak \"ok\"","points":1},{"label":"strong","points":3}]}]}"#,
        )
        .expect("parse")
    }

    #[test]
    fn schema_names_every_criterion_in_order_with_its_labels() {
        let schema = output_schema(&rubric(), GrammarLimits::default());
        let text = serde_json::to_string(&schema).expect("serialise");
        let s: serde_json::Value = serde_json::from_str(&text).expect("json");
        let items = s["properties"]["ratings"]["prefixItems"]
            .as_array()
            .expect("prefixItems");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["properties"]["criterion_id"]["const"], "content");
        assert_eq!(
            items[1]["properties"]["level"]["enum"],
            serde_json::json!(["weak \"ok\"", "strong"])
        );
        assert_eq!(items[0]["properties"]["evidence"]["maxLength"], 200);
        assert_eq!(s["properties"]["ratings"]["minItems"], 2);
        assert_eq!(s["properties"]["ratings"]["items"], false);
        // In the text, evidence and rationale come before the level (the
        // order a schema-to-grammar converter makes the model write them).
        let at = |k: &str| text.find(k).expect(k);
        assert!(at("\"addresses_grader\"") < at("\"ratings\""), "{text}");
        assert!(at("\"evidence\"") < at("\"rationale\""), "{text}");
        assert!(at("\"rationale\"") < at("\"level\""), "{text}");
    }

    #[test]
    fn grammar_names_every_criterion_in_order_with_its_labels() {
        let g = output_grammar(&rubric(), GrammarLimits::default());
        let root = g.gbnf.lines().next().expect("root");
        assert!(
            root.starts_with(
                "root ::= \"{\\\"addresses_grader\\\":\" sp (\"true\" | \"false\") \",\" sp \"\\\"ratings\\\":\""
            ),
            "{root}"
        );
        assert!(root.contains("c0 \",\" sp c1"), "{root}");
        assert!(
            g.gbnf
                .contains("c0 ::= \"{\\\"criterion_id\\\":\" sp \"\\\"content\\\"\"")
        );
        assert!(g.gbnf.contains(
            "c0-level ::= \"\\\"missing\\\"\" | \"\\\"partial\\\"\" | \"\\\"complete\\\"\""
        ));
        // A label with a quote is JSON-escaped, then GBNF-escaped.
        assert!(
            g.gbnf
                .contains(r#"c1-level ::= "\"weak \\\"ok\\\"\"" | "\"strong\"""#)
        );
        // Evidence and rationale come before the level.
        let c0 = g
            .gbnf
            .lines()
            .find(|l| l.starts_with("c0 ::="))
            .expect("c0");
        let (e, r, l) = (
            c0.find("evidence").expect("e"),
            c0.find("rationale").expect("r"),
            c0.find("c0-level").expect("l"),
        );
        assert!(e < r && r < l, "{c0}");
        assert!(g.gbnf.contains("char{0,200}") && g.gbnf.contains("char{0,240}"));
    }

    #[test]
    fn longest_answer_fits_the_bound() {
        let r = rubric();
        let limits = GrammarLimits {
            evidence_chars: 7,
            rationale_chars: 9,
        };
        let g = output_grammar(&r, limits);
        let ratings: Vec<String> = r
            .criteria
            .iter()
            .map(|c| {
                format!(
                    "{{\"criterion_id\": {}, \"evidence\": \"{}\", \"rationale\": \"{}\", \"level\": {}}}",
                    json_string(&c.id),
                    "e".repeat(7),
                    "r".repeat(9),
                    json_string(&c.levels[0].label)
                )
            })
            .collect();
        let longest = format!(
            "{{\"addresses_grader\": false, \"ratings\": [{}]}}",
            ratings.join(", ")
        );
        assert!(
            longest.chars().count() <= g.max_output_chars,
            "{} > {}",
            longest.chars().count(),
            g.max_output_chars
        );
        let parsed = parse_answer(&longest, &r).expect("parses");
        assert_eq!(parsed.ratings[1].level, "weak \"ok\"");
        assert_eq!(parsed.addresses_grader, Some(false));
    }

    #[test]
    fn the_grader_judgement_is_parsed_and_optional() {
        let r = rubric();
        let ratings = r#""ratings":[{"criterion_id":"content","evidence":"","rationale":"","level":"partial"},{"criterion_id":"delivery","evidence":"","rationale":"","level":"strong"}]"#;
        let yes =
            parse_answer(&format!("{{\"addresses_grader\":true,{ratings}}}"), &r).expect("parses");
        assert_eq!(yes.addresses_grader, Some(true));
        let old = parse_answer(&format!("{{{ratings}}}"), &r).expect("older answers parse");
        assert_eq!(old.addresses_grader, None);
        assert!(parse_answer(&format!("{{\"addresses_grader\":\"yes\",{ratings}}}"), &r).is_err());
    }

    #[test]
    fn parser_rejects_missing_reordered_and_unknown() {
        let r = rubric();
        let one = |id: &str, level: &str| {
            format!(r#"{{"criterion_id":"{id}","evidence":"","rationale":"","level":"{level}"}}"#)
        };
        let ok = format!(
            r#"{{"ratings":[{},{}]}}"#,
            one("content", "partial"),
            one("delivery", "strong")
        );
        assert_eq!(parse_ratings(&ok, &r).expect("ok").len(), 2);
        let missing = format!(r#"{{"ratings":[{}]}}"#, one("content", "partial"));
        assert!(parse_ratings(&missing, &r).is_err());
        let swapped = format!(
            r#"{{"ratings":[{},{}]}}"#,
            one("delivery", "strong"),
            one("content", "partial")
        );
        assert!(parse_ratings(&swapped, &r).is_err());
        let unknown = format!(
            r#"{{"ratings":[{},{}]}}"#,
            one("content", "excellent"),
            one("delivery", "strong")
        );
        assert!(parse_ratings(&unknown, &r).is_err());
        assert!(parse_ratings("{\"ratings\":[", &r).is_err());
    }

    #[test]
    fn field_bounds_are_clamped_to_what_llama_cpp_keeps_bounded() {
        let g = output_grammar(
            &rubric(),
            GrammarLimits {
                evidence_chars: 5000,
                rationale_chars: 10,
            },
        );
        assert!(g.gbnf.contains("char{0,2000}") && g.gbnf.contains("char{0,10}"));
    }

    #[test]
    fn literals_escape_controls() {
        assert_eq!(gbnf_literal("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\x01""#);
    }
}
