//! What transcription and evaluation jobs carry and return.
//!
//! Jobs name files on disk (the normalised 16 kHz mono WAV), never audio
//! bytes. The model workers' issue refines these payloads; fields are only
//! ever added, with serde defaults, so older peers keep working.

use serde::{Deserialize, Serialize};

use crate::rubric::Rubric;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobPayload {
    Transcribe(TranscribeRequest),
    Evaluate(EvaluateRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobResult {
    Transcript(Transcript),
    Evaluations(EvaluateResponse),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscribeRequest {
    /// Absolute path of a 16 kHz mono 16-bit PCM WAV file.
    pub wav_path: String,
    /// Duration of the audio, from intake.
    pub audio_seconds: f64,
    /// ISO 639-1 language, or `None` to detect.
    #[serde(default)]
    pub language: Option<String>,
    /// Course vocabulary that biases decoding.
    #[serde(default)]
    pub initial_prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub start_ms: u64,
    pub end_ms: u64,
    pub text: String,
    /// Mean token log-probability; low values mean an unsure transcription.
    #[serde(default)]
    pub avg_logprob: f32,
    /// Probability that the segment is silence (Whisper hallucinates there).
    #[serde(default)]
    pub no_speech_prob: f32,
    /// The worker's judgement that this segment may be wrong: a low
    /// `avg_logprob` or a high `no_speech_prob` (text "heard" in silence).
    /// Reviewers should listen to these parts.
    #[serde(default)]
    pub low_confidence: bool,
    /// The segment's words with Whisper's probability for each (the lowest
    /// of its tokens'), so a reviewer sees which words Whisper was unsure
    /// of. Empty from workers that do not report them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub words: Vec<Word>,
}

/// One word of a segment as Whisper decoded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Word {
    /// The word with its leading space, if any, as Whisper wrote it.
    pub text: String,
    /// The lowest probability of the word's tokens (0 to 1).
    pub p: f32,
}

/// Below this probability a word is shown to reviewers as unsure.
pub const LOW_WORD_PROBABILITY: f32 = 0.5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub text: String,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub segments: Vec<Segment>,
    pub audio_seconds: f64,
    pub processing_seconds: f64,
    #[serde(default)]
    pub model: String,
}

impl Transcript {
    /// The segments marked [`Segment::low_confidence`].
    pub fn low_confidence_segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| s.low_confidence)
    }

    /// Processing time per second of audio (lower is faster).
    pub fn real_time_factor(&self) -> f64 {
        if self.audio_seconds > 0.0 {
            self.processing_seconds / self.audio_seconds
        } else {
            0.0
        }
    }
}

/// One evaluator call: several submissions decoded together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateRequest {
    pub items: Vec<EvaluateItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateItem {
    pub submission_id: String,
    /// The spoken prompt the student answered.
    pub assignment_prompt: String,
    pub rubric: Rubric,
    /// Untrusted student data: workers must delimit it in the prompt.
    pub transcript: String,
    /// Answers the instructor graded, as anchors for the levels (transcript
    /// text and levels only: never who gave them). The daemon picks a few
    /// per level within a size budget; the prompt fences them like the
    /// transcript.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exemplars: Vec<Exemplar>,
    /// The answer's language (a Whisper code such as "fr": the
    /// assignment's, else the one Whisper detected), stated in the prompt.
    #[serde(default)]
    pub language: Option<String>,
}

/// An instructor-graded answer shown to an evaluator as an example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exemplar {
    pub transcript: String,
    pub levels: Vec<ExemplarLevel>,
}

/// The instructor's level for one criterion of an [`Exemplar`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExemplarLevel {
    pub criterion_id: String,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateResponse {
    pub outcomes: Vec<EvaluationOutcome>,
}

/// The result for one item of a batch: an evaluation or that item's error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationOutcome {
    pub submission_id: String,
    #[serde(default)]
    pub evaluation: Option<Evaluation>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Evaluator role ("a", "b"), as configured in the daemon.
    pub role: String,
    pub model: String,
    pub ratings: Vec<CriterionRating>,
    /// Reasons for human review, e.g. instruction-like content in the transcript.
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub generated_tokens: u64,
    #[serde(default)]
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionRating {
    pub criterion_id: String,
    pub evidence: String,
    pub rationale: String,
    /// One of the criterion's level labels.
    pub level: String,
}
