//! The Viva remote worker: a worker process whose "model" is an
//! OpenAI-compatible inference server reached over HTTP.
//!
//! It speaks the worker protocol of [`viva_models::protocol`] like the local
//! workers, so the daemon supervises it the same way, but says `remote:
//! true` in its Hello: its model holds no memory on this machine, so the
//! scheduler keeps its role loaded in every phase (no phase switch starts
//! or stops it) and never counts it against the GPU memory budget.
//!
//! - An STT worker (`--kind stt`) posts each job's WAV to
//!   `{url}/audio/transcriptions` (`verbose_json`: segments with their
//!   log-probabilities, marked low-confidence by the local worker's rule).
//! - An evaluator (`--kind evaluator`, or any worker started with `--role`)
//!   posts each item of a call to `{url}/chat/completions` with the local
//!   worker's prompt ([`viva_models::prompt`]) and the rubric's output
//!   constraint: a JSON Schema in `response_format` (default) or the GBNF
//!   grammar in `grammar` ([`options::Constraint`]). The answer goes through
//!   the same parser as the local worker's ([`viva_models::grammar`]), and
//!   the same flags (instruction-like transcript, transcript cut, answer
//!   addressing the grader) are added.
//!
//! Every request holds one permit of the server's `concurrency`; timeouts,
//! connection failures, HTTP 408/429/5xx and malformed answers are retried
//! with exponential backoff ([`backend::Backend::request`]); after the last
//! try the item or job fails with a plain reason naming the server. The API
//! key comes from an environment variable or a file and is never logged
//! ([`options::ApiKey`]). After its load check and after every call the
//! worker reports the server's health and latency (`Remote` frames), which
//! the admin view shows.

pub mod backend;
pub mod evaluate;
pub mod options;
pub mod transcribe;
pub mod worker;

/// Everything that can go wrong in the remote worker outside one request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid remote worker option: {0}")]
    Options(String),
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Protocol(#[from] viva_models::Error),
}
