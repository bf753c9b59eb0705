//! Checks of an evaluator's free text: is a quoted piece of evidence really
//! in the transcript, and is a field language at all?
//!
//! Small evaluator models fill `evidence` and `rationale` with junk under
//! the grammar: "1", "none", "1.1.1.1.…" up to the field's cap. Nothing of
//! that may reach a student, and none of it may be released without a
//! person looking. Both sides use these checks:
//!
//! - the llama worker watches the open string field while it decodes
//!   ([`repetition_tail`]) and closes a field that has degenerated into
//!   repetition, saving the rest of the field's tokens;
//! - the daemon checks every returned evaluation against the stored
//!   transcript ([`flags`]: [`EVIDENCE_NOT_IN_TRANSCRIPT`],
//!   [`DEGENERATE_OUTPUT`]), and gives rubric plugins and learners only
//!   fields that pass ([`sanitise`]).
//!
//! Quote matching (see [`quote_in_transcript`]) normalises case,
//! punctuation and whitespace, and allows speech-to-text-sized
//! differences: words split or joined ("sun light" / "sunlight"), a letter
//! off in a longer word, and up to a quarter of a longer quote's words
//! missing or different. A paraphrase does not pass: it shares too few of
//! the transcript's words in order.

use crate::payload::{CriterionRating, Evaluation};

/// Flag code: an evidence quote that is not in the transcript.
pub const EVIDENCE_NOT_IN_TRANSCRIPT: &str = "evidence_not_in_transcript";
/// Flag code: evidence or rationale that is not language (repetition,
/// no letters, a placeholder such as "none").
pub const DEGENERATE_OUTPUT: &str = "degenerate_output";

/// Share of a quote's words (four words or more) that must appear, in
/// order, in one stretch of the transcript.
pub const MIN_QUOTE_OVERLAP: f64 = 0.75;

/// What is wrong with one free-text field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Nothing but whitespace.
    Empty,
    /// A stand-in for nothing: "none", "n/a", "null", "nothing" …
    Placeholder,
    /// One short unit repeated (the unit is kept): "1.1.1.1", "ok ok ok ok".
    Repetition(String),
    /// No letters at all: "1", "2.5", "--".
    NotLanguage,
    /// Evidence only: language, but not found in the transcript.
    NotInTranscript,
}

impl Problem {
    /// Whether the text is junk (not merely absent or unsupported).
    pub fn is_degenerate(&self) -> bool {
        matches!(
            self,
            Problem::Placeholder | Problem::Repetition(_) | Problem::NotLanguage
        )
    }
}

const PLACEHOLDERS: &[&str] = &[
    "none",
    "n a",
    "na",
    "null",
    "nil",
    "nothing",
    "no evidence",
    "no quote",
    "not applicable",
    "not found",
    "none found",
    "unknown",
    "tbd",
    "todo",
    "evidence",
    "rationale",
    "quote",
    "no",
    "yes",
    "ok",
];

/// Lowercased words: letters and digits, apostrophes dropped ("don't" →
/// "dont"), everything else a separator.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else if c == '\'' || c == '\u{2019}' {
            // inside a word: dropped
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The repeated unit when `text` ends in at least `min_periods` copies of a
/// unit of 1 to 16 characters covering at least `min_chars` characters
/// (whitespace counts as a single space). "1.1.1.1.1.1" → "1." (or ".1").
pub fn repetition_tail(text: &str, min_chars: usize, min_periods: usize) -> Option<String> {
    periodic_tail(text, min_chars, min_periods).map(|(unit, _)| unit)
}

/// [`repetition_tail`] with the length of the repeated run (in characters).
fn periodic_tail(text: &str, min_chars: usize, min_periods: usize) -> Option<(String, usize)> {
    let mut chars: Vec<char> = Vec::with_capacity(text.len());
    for c in text.trim_end().chars() {
        let c = if c.is_whitespace() { ' ' } else { c };
        if c == ' ' && chars.last() == Some(&' ') {
            continue;
        }
        chars.push(c);
    }
    let n = chars.len();
    for p in 1..=16usize.min(n / min_periods.max(2)) {
        // Length of the suffix that is periodic with period p.
        let mut run = p;
        while run < n && chars[n - 1 - run] == chars[n - 1 - run + p] {
            run += 1;
        }
        if run >= min_chars && run / p >= min_periods {
            let unit: String = chars[n - p..].iter().collect();
            if unit.trim().is_empty() {
                continue;
            }
            return Some((unit, run));
        }
    }
    None
}

/// What is wrong with a rationale (or any free text that is not a quote).
pub fn text_problem(text: &str) -> Option<Problem> {
    let t = text.trim();
    if t.is_empty() {
        return Some(Problem::Empty);
    }
    if let Some((unit, run)) = periodic_tail(t, 12, 4) {
        // At least half the field: a sentence that merely ends in "ha ha
        // ha ha" is not junk.
        if run * 2 >= t.chars().count() {
            return Some(Problem::Repetition(unit));
        }
    }
    if !t.chars().any(char::is_alphabetic) {
        return Some(Problem::NotLanguage);
    }
    let w = words(t).join(" ");
    if PLACEHOLDERS.contains(&w.as_str()) {
        return Some(Problem::Placeholder);
    }
    None
}

/// What is wrong with a piece of evidence quoted from `transcript`.
pub fn evidence_problem(evidence: &str, transcript: &str) -> Option<Problem> {
    if let Some(p) = text_problem(evidence) {
        // "none" spoken by the student is a quote, not a placeholder.
        if p == Problem::Placeholder && quote_in_transcript(evidence, transcript) {
            return None;
        }
        return Some(p);
    }
    if quote_in_transcript(evidence, transcript) {
        None
    } else {
        Some(Problem::NotInTranscript)
    }
}

/// Whether the Levenshtein distance of `a` and `b` is at most `max`.
fn within(a: &str, b: &str, max: usize) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > max {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()] <= max
}

/// Two words that speech-to-text could have confused.
fn similar(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let n = a.chars().count().min(b.chars().count());
    match n {
        0..=3 => false,
        4..=7 => within(a, b, 1),
        _ => within(a, b, 2),
    }
}

/// Longest common subsequence of `q` in `w` with [`similar`] words.
fn lcs(q: &[String], w: &[String]) -> usize {
    let mut prev = vec![0usize; w.len() + 1];
    for a in q {
        let mut cur = vec![0usize; w.len() + 1];
        for (j, b) in w.iter().enumerate() {
            cur[j + 1] = if similar(a, b) {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    prev[w.len()]
}

/// Whether `quote` is in `transcript` (see the module's notes). A quote of
/// several parts ("… plants … carbon dioxide"; ellipses, semicolons or
/// inner quotation marks between them) passes when every part does.
pub fn quote_in_transcript(quote: &str, transcript: &str) -> bool {
    let t = words(transcript);
    if one_quote(&words(quote), &t) {
        return true;
    }
    let parts: Vec<Vec<String>> = quote
        .split(['…', ';', '"', '\u{201c}', '\u{201d}'])
        .flat_map(|p| p.split("..."))
        .map(words)
        .filter(|p| !p.is_empty())
        .collect();
    parts.len() > 1 && parts.iter().all(|p| one_quote(p, &t))
}

fn one_quote(q: &[String], t: &[String]) -> bool {
    if q.is_empty() || t.is_empty() {
        return false;
    }
    // Exact, in order.
    if t.windows(q.len()).any(|w| w == q) {
        return true;
    }
    // Words split or joined differently: compare without spaces (long
    // enough not to match by chance).
    let qc: String = q.concat();
    if qc.chars().count() >= 8 && t.concat().contains(&qc) {
        return true;
    }
    // Speech-to-text-sized differences, for quotes of four words or more.
    if q.len() < 4 {
        return q.len() == 1
            && t.iter()
                .any(|w| similar(&q[0], w) && q[0].chars().count() >= 5);
    }
    let need = (q.len() as f64 * MIN_QUOTE_OVERLAP).ceil() as usize;
    let span = q.len() + q.len() / 4 + 1;
    // A stretch worth scoring starts with one of the quote's first words.
    let heads = &q[..=q.len() - need];
    (0..t.len()).any(|i| {
        heads.iter().any(|h| similar(h, &t[i])) && lcs(q, &t[i..(i + span).min(t.len())]) >= need
    })
}

/// The per-rating verdicts of an evaluation.
pub fn rating_problems(
    r: &CriterionRating,
    transcript: &str,
) -> (Option<Problem>, Option<Problem>) {
    (
        evidence_problem(&r.evidence, transcript),
        text_problem(&r.rationale),
    )
}

/// The review flags an evaluation earns against `transcript`, each
/// `"<code>: <plain words>"`: [`EVIDENCE_NOT_IN_TRANSCRIPT`] naming the
/// criteria whose quote is not in the transcript, [`DEGENERATE_OUTPUT`]
/// naming the criteria whose evidence or rationale is not language (or
/// when no field of the evaluation says anything). Junk is not repeated in
/// the flag (flags reach students with a released grade); the instructor
/// sees the evaluation itself in review.
pub fn flags(evaluation: &Evaluation, transcript: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let mut junk = Vec::new();
    let mut usable = 0usize;
    for r in &evaluation.ratings {
        let (e, why) = rating_problems(r, transcript);
        let mut bad = false;
        for p in [&e, &why].into_iter().flatten() {
            bad |= p.is_degenerate();
        }
        if bad {
            junk.push(r.criterion_id.as_str());
        }
        if e == Some(Problem::NotInTranscript) {
            missing.push(r.criterion_id.as_str());
        }
        usable += usize::from(e.is_none()) + usize::from(why.is_none());
    }
    let mut out = Vec::new();
    if !missing.is_empty() {
        out.push(format!(
            "{EVIDENCE_NOT_IN_TRANSCRIPT}: the evidence quoted for {} is not in the transcript",
            missing.join(", ")
        ));
    }
    if !junk.is_empty() {
        out.push(format!(
            "{DEGENERATE_OUTPUT}: the evidence or rationale for {} is not language \
             (repetition, no letters, or a placeholder such as \u{201c}none\u{201d}); \
             this evaluator's levels there are not to be trusted",
            junk.join(", ")
        ));
    } else if usable == 0 && !evaluation.ratings.is_empty() {
        out.push(format!(
            "{DEGENERATE_OUTPUT}: the evaluator gave no usable evidence or rationale for any criterion"
        ));
    }
    out
}

/// Blanks every field a student must not read and a plugin must not copy
/// into feedback: evidence that is junk or not in the transcript, rationale
/// that is junk. Levels and flags stay.
pub fn sanitise(evaluation: &mut Evaluation, transcript: &str) {
    for r in &mut evaluation.ratings {
        let (e, why) = rating_problems(r, transcript);
        if e.is_some() {
            r.evidence.clear();
        }
        if why.is_some() {
            r.rationale.clear();
        }
    }
}

/// The code of a flag written as `"<code>: <words>"` (the whole flag when
/// it has no code).
pub fn flag_code(flag: &str) -> &str {
    flag.split_once(':').map_or(flag, |(c, _)| c.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "Plants use sunlight, water and carbon dioxide to make glucose and oxygen. \
                     This happens in the chloroplasts, mostly in the leaves.";

    fn rating(id: &str, evidence: &str, rationale: &str) -> CriterionRating {
        CriterionRating {
            criterion_id: id.into(),
            evidence: evidence.into(),
            rationale: rationale.into(),
            level: "complete".into(),
        }
    }

    fn evaluation(ratings: Vec<CriterionRating>) -> Evaluation {
        Evaluation {
            role: "a".into(),
            model: "m".into(),
            ratings,
            flags: Vec::new(),
            prompt_tokens: 0,
            generated_tokens: 0,
            seconds: 0.0,
        }
    }

    #[test]
    fn real_junk_from_the_test_models_is_caught() {
        // SmolLM2-135M and Gemma-3-270M under the grammar, as seen on the
        // hidden-style check.
        let dots = "1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1";
        assert_eq!(evidence_problem("1", T), Some(Problem::NotLanguage));
        assert_eq!(text_problem("1"), Some(Problem::NotLanguage));
        assert_eq!(evidence_problem("none", T), Some(Problem::Placeholder));
        assert_eq!(text_problem("None."), Some(Problem::Placeholder));
        assert_eq!(text_problem("N/A"), Some(Problem::Placeholder));
        assert!(matches!(
            evidence_problem("1.1.1.1.1", T),
            Some(Problem::NotLanguage | Problem::Repetition(_))
        ));
        assert!(matches!(text_problem(dots), Some(Problem::Repetition(_))));
        assert!(matches!(
            text_problem(&"some order ".repeat(12)),
            Some(Problem::Repetition(_))
        ));
        assert_eq!(
            evidence_problem("some order", T),
            Some(Problem::NotInTranscript)
        );
        assert_eq!(text_problem(""), Some(Problem::Empty));
        assert_eq!(text_problem("   "), Some(Problem::Empty));
    }

    #[test]
    fn real_quotes_pass_with_asr_sized_differences() {
        // Verbatim.
        assert_eq!(evidence_problem("water and carbon dioxide", T), None);
        // Case, punctuation and whitespace differ.
        assert_eq!(
            evidence_problem("PLANTS use sunlight water,  and Carbon-Dioxide", T),
            None
        );
        assert_eq!(evidence_problem("\"in the chloroplasts\"", T), None);
        // Words split differently, a letter off.
        assert_eq!(
            evidence_problem("plants use sun light water and carbon dioxid", T),
            None
        );
        // One word heard differently, one extra.
        assert_eq!(
            evidence_problem("the plans use sunlight water and carbon dioxide", T),
            None
        );
        // Several parts.
        assert_eq!(
            evidence_problem("plants use sunlight … in the leaves", T),
            None
        );
        // One distinctive word.
        assert_eq!(evidence_problem("chloroplasts", T), None);
    }

    #[test]
    fn paraphrases_and_invented_quotes_do_not_pass() {
        assert_eq!(
            evidence_problem("the student explains that plants turn light into food", T),
            Some(Problem::NotInTranscript)
        );
        assert_eq!(
            evidence_problem("photosynthesis happens in the mitochondria", T),
            Some(Problem::NotInTranscript)
        );
        assert_eq!(
            evidence_problem("plants use sunlight … the mitochondria", T),
            Some(Problem::NotInTranscript)
        );
        // Short words are not matched loosely.
        assert_eq!(
            evidence_problem("the sun", T),
            Some(Problem::NotInTranscript)
        );
    }

    #[test]
    fn rationales_that_say_something_pass() {
        assert_eq!(
            text_problem("Names all three inputs and both products correctly."),
            None
        );
        // Ends in a few repeated characters, but is a sentence.
        assert_eq!(text_problem("Very good answer, well done!!!!"), None);
        assert_eq!(text_problem("Mentions 3 inputs."), None);
    }

    #[test]
    fn repetition_is_seen_at_the_tail_while_decoding() {
        assert_eq!(
            repetition_tail("Plants use 1.1.1.1.1.1.1.1.1.1.1.1.", 24, 6).as_deref(),
            Some("1.")
        );
        assert!(repetition_tail("Plants use 1.1.1.", 24, 6).is_none());
        assert!(
            repetition_tail(
                "The student names sunlight, water and carbon dioxide",
                24,
                6
            )
            .is_none()
        );
        assert!(repetition_tail(&"some order ".repeat(7), 24, 6).is_some());
        assert!(repetition_tail(&"some order ".repeat(3), 24, 6).is_none());
        assert!(repetition_tail("aaaaaaaaaaaaaaaaaaaaaaaaaaaa", 24, 6).is_some());
    }

    #[test]
    fn flags_name_the_criteria_and_never_the_junk() {
        let e = evaluation(vec![
            rating("content", "water and carbon dioxide", "Names the inputs."),
            rating(
                "order",
                "photosynthesis happens in the mitochondria",
                "Clear.",
            ),
            rating("vocabulary", "1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1", "1"),
        ]);
        let f = flags(&e, T);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(flag_code(&f[0]), EVIDENCE_NOT_IN_TRANSCRIPT);
        assert!(f[0].contains("order") && !f[0].contains("content"), "{f:?}");
        assert_eq!(flag_code(&f[1]), DEGENERATE_OUTPUT);
        assert!(f[1].contains("vocabulary"), "{f:?}");
        assert!(!f.iter().any(|x| x.contains("mitochondria")), "{f:?}");
        let good = evaluation(vec![rating(
            "content",
            "water and carbon dioxide",
            "Names the inputs.",
        )]);
        assert!(flags(&good, T).is_empty());
        // Nothing said anywhere.
        let empty = evaluation(vec![rating("content", "", ""), rating("order", "", "")]);
        let f = flags(&empty, T);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(flag_code(&f[0]), DEGENERATE_OUTPUT);
    }

    #[test]
    fn sanitise_keeps_levels_and_blanks_what_a_student_must_not_read() {
        let mut e = evaluation(vec![
            rating("content", "water and carbon dioxide", "Names the inputs."),
            rating("order", "the student says plants eat light", "1"),
        ]);
        sanitise(&mut e, T);
        assert_eq!(e.ratings[0].evidence, "water and carbon dioxide");
        assert_eq!(e.ratings[0].rationale, "Names the inputs.");
        assert_eq!(e.ratings[1].evidence, "");
        assert_eq!(e.ratings[1].rationale, "");
        assert_eq!(e.ratings[1].level, "complete");
    }

    #[test]
    fn words_normalise_case_punctuation_and_apostrophes() {
        assert_eq!(words("Don't  STOP—now!"), ["dont", "stop", "now"]);
        assert!(words("...").is_empty());
    }
}
