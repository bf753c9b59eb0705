//! The remote worker's options (`options = { … }` of its
//! `[workers.stt]` or `[workers.evaluators.<role>]` entry), and its API key.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use viva_models::WorkerKind;
use viva_models::grammar::{GrammarLimits, MAX_FIELD_CHARS};
use viva_models::prompt::PromptOptions;

use crate::Error;

/// How an evaluator's answer is constrained on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// OpenAI's `response_format: {type: "json_schema", …}` with the
    /// rubric's schema (vLLM, llama.cpp's server, Ollama).
    JsonSchema,
    /// `response_format: {type: "json_object", schema: …}`: the older form
    /// llama-cpp-python's server (0.3) takes; llama.cpp's server takes it
    /// too.
    JsonObject,
    /// The rubric's GBNF grammar in the request's `grammar` field: the
    /// exact grammar the local worker uses (llama.cpp's server and
    /// llama-cpp-python take it; others ignore or refuse it).
    Grammar,
    /// Nothing but the prompt: for servers that take neither. The answer is
    /// still checked against the rubric, and a malformed one is retried.
    None,
}

/// Options of a remote worker. Unknown keys are refused, and so are the
/// keys of the other kind (`language` on an evaluator, `constraint` on an
/// STT worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteOptions {
    /// Base URL of the OpenAI-compatible API, up to and including its
    /// version: "http://gpu-1:8000/v1". The worker posts to
    /// `{url}/chat/completions` or `{url}/audio/transcriptions`.
    pub url: String,
    /// The model name the server knows; default: the worker's `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Name of an environment variable holding the API key (sent as
    /// `Authorization: Bearer …`; never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// A file holding the API key (one line; mode 0600 advised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Longest one HTTP request may take, body included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest connecting may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most requests in flight to this server at once (across calls).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Tries after the first when a request times out, cannot connect, gets
    /// HTTP 408, 429 or 5xx, or an answer that is not the expected JSON.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry; doubles per retry up to `max_backoff`
    /// (a `Retry-After` of up to `max_backoff` is honoured instead).
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,

    // Evaluators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// 0 (default): greedy, as the local worker decodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Most tokens of one answer; default: the longest answer the rubric's
    /// grammar admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_chars: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale_chars: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_transcript_chars: Option<usize>,

    // STT.
    /// Language when the assignment names none (a Whisper code); default:
    /// the server detects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// A segment whose mean log-probability is below this is marked low
    /// confidence (default -0.6, as the local worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_confidence_logprob: Option<f32>,
    /// A segment whose no-speech probability is above this is marked low
    /// confidence (default 0.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_speech_threshold: Option<f32>,
    /// `verbose_json` (default: segments with their log-probabilities) or
    /// `json` (text only) for servers without the verbose format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<SttFormat>,
}

/// The transcription format asked of an STT server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SttFormat {
    VerboseJson,
    Json,
}

fn default_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_concurrency() -> u32 {
    4
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(10)
}

/// Same defaults as the local workers.
pub const LOW_LOGPROB: f32 = -0.6;
pub const HIGH_NO_SPEECH: f32 = 0.6;

const EVALUATOR_KEYS: [&str; 7] = [
    "constraint",
    "temperature",
    "seed",
    "max_tokens",
    "evidence_chars",
    "rationale_chars",
    "max_transcript_chars",
];
const STT_KEYS: [&str; 4] = [
    "language",
    "low_confidence_logprob",
    "no_speech_threshold",
    "response_format",
];

impl RemoteOptions {
    /// Reads and checks the options object of a model spec for a worker of
    /// `kind`.
    pub fn from_json(value: &serde_json::Value, kind: WorkerKind) -> Result<Self, Error> {
        let bad = |m: String| Err(Error::Options(m));
        let Some(map) = value.as_object() else {
            return bad(
                "a remote worker needs options, at least url = \"http://host:port/v1\"".into(),
            );
        };
        let (wrong, other) = match kind {
            WorkerKind::Stt => (&EVALUATOR_KEYS[..], "evaluator"),
            WorkerKind::Evaluator => (&STT_KEYS[..], "stt"),
        };
        if let Some(k) = map.keys().find(|k| wrong.contains(&k.as_str())) {
            return bad(format!(
                "option {k:?} is for {other} workers, and this is a {} worker",
                kind.as_str()
            ));
        }
        let o: RemoteOptions =
            serde_json::from_value(value.clone()).map_err(|e| Error::Options(e.to_string()))?;
        let url = reqwest::Url::parse(&o.url)
            .map_err(|e| Error::Options(format!("url {:?} is not a URL: {e}", o.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return bad(format!("url {:?} must be http:// or https://", o.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad("put no credentials in url: use api_key_env or api_key_file".into());
        }
        if o.api_key_env.is_some() && o.api_key_file.is_some() {
            return bad("set api_key_env or api_key_file, not both".into());
        }
        if o.concurrency == 0 || o.concurrency > 256 {
            return bad("concurrency must be from 1 to 256".into());
        }
        if o.retries > 10 {
            return bad("retries must be at most 10".into());
        }
        if o.timeout.is_zero() || o.connect_timeout.is_zero() {
            return bad("timeout and connect_timeout must be more than 0".into());
        }
        if o.backoff > o.max_backoff {
            return bad("backoff must not exceed max_backoff".into());
        }
        if o.temperature.is_some_and(|t| !t.is_finite() || t < 0.0) {
            return bad("temperature must be 0 or more".into());
        }
        if o.max_tokens == Some(0) {
            return bad("max_tokens must be at least 1".into());
        }
        if o.evidence_chars.unwrap_or(0) > MAX_FIELD_CHARS
            || o.rationale_chars.unwrap_or(0) > MAX_FIELD_CHARS
        {
            return bad(format!(
                "evidence_chars and rationale_chars must be at most {MAX_FIELD_CHARS}"
            ));
        }
        if o.max_transcript_chars == Some(0) {
            return bad("max_transcript_chars must be at least 1".into());
        }
        let mut o = o;
        // "fr-CA" → "fr"; "auto" → none (the server detects it).
        o.language = viva_models::language::normalise_language(o.language.as_deref())
            .map_err(Error::Options)?;
        if o.low_confidence_logprob
            .is_some_and(|v| v.is_nan() || v > 0.0)
        {
            return bad("low_confidence_logprob must be a log-probability (0 or less)".into());
        }
        if o.no_speech_threshold
            .is_some_and(|v| !(0.0..=1.0).contains(&v))
        {
            return bad("no_speech_threshold must be a probability from 0 to 1".into());
        }
        Ok(o)
    }

    /// The options with every default of `kind` filled in, for
    /// `--check-options` (never the key itself: only where it comes from).
    pub fn resolved(&self, kind: WorkerKind) -> RemoteOptions {
        let mut o = self.clone();
        match kind {
            WorkerKind::Evaluator => {
                let limits = GrammarLimits::default();
                o.constraint.get_or_insert(Constraint::JsonSchema);
                o.temperature.get_or_insert(0.0);
                o.evidence_chars.get_or_insert(limits.evidence_chars);
                o.rationale_chars.get_or_insert(limits.rationale_chars);
                o.max_transcript_chars
                    .get_or_insert(PromptOptions::default().max_transcript_chars);
            }
            WorkerKind::Stt => {
                o.low_confidence_logprob.get_or_insert(LOW_LOGPROB);
                o.no_speech_threshold.get_or_insert(HIGH_NO_SPEECH);
                o.response_format.get_or_insert(SttFormat::VerboseJson);
            }
        }
        o
    }

    pub fn limits(&self) -> GrammarLimits {
        let d = GrammarLimits::default();
        GrammarLimits {
            evidence_chars: self.evidence_chars.unwrap_or(d.evidence_chars),
            rationale_chars: self.rationale_chars.unwrap_or(d.rationale_chars),
        }
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// Reads the API key from where the options say (none: no key).
    pub fn api_key(&self) -> Result<Option<ApiKey>, Error> {
        if let Some(name) = &self.api_key_env {
            return match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => Ok(Some(ApiKey(v.trim().to_owned()))),
                _ => Err(Error::Options(format!(
                    "api_key_env names the environment variable {name}, which is not set or \
                     empty in the worker's environment (set it for the daemon, or in the \
                     worker's env table)"
                ))),
            };
        }
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Options(format!(
                    "cannot read api_key_file {}: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
            let key = text.trim();
            if key.is_empty() {
                return Err(Error::Options(format!(
                    "api_key_file {} is empty",
                    path.display()
                )));
            }
            return Ok(Some(ApiKey(key.to_owned())));
        }
        Ok(None)
    }
}

/// An API key. Its `Debug` is redacted and it has no `Display`: the only
/// way out is [`ApiKey::expose`], for the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the key replaced (a server may echo
    /// what it was sent in an error body).
    pub fn redact(&self, text: &str) -> String {
        if self.0.len() < 4 {
            return text.to_owned();
        }
        text.replace(&self.0, "[redacted]")
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// `--check-options JSON` for a worker of `kind`: the options with every
/// default filled in (one JSON line), or why the worker would refuse them.
pub fn check_options(json: &str, kind: WorkerKind) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("--check-options takes a JSON object: {e}"))?;
    let options = RemoteOptions::from_json(&value, kind).map_err(|e| e.to_string())?;
    serde_json::to_string(&options.resolved(kind)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value, kind: WorkerKind) -> Result<RemoteOptions, String> {
        RemoteOptions::from_json(&v, kind).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_in_and_durations_read_as_humantime() {
        let o = parse(
            json!({"url": "http://127.0.0.1:8000/v1/", "timeout": "45s"}),
            WorkerKind::Evaluator,
        )
        .expect("valid");
        assert_eq!(o.base_url(), "http://127.0.0.1:8000/v1");
        assert_eq!(o.timeout, Duration::from_secs(45));
        assert_eq!(o.concurrency, 4);
        assert_eq!(o.retries, 2);
        let r = check_options(r#"{"url":"https://h/v1"}"#, WorkerKind::Evaluator).expect("ok");
        let v: serde_json::Value = serde_json::from_str(&r).expect("json");
        assert_eq!(v["constraint"], "json_schema");
        assert_eq!(v["timeout"], "2m");
        assert_eq!(v["evidence_chars"], 200);
        let r = check_options(r#"{"url":"https://h/v1"}"#, WorkerKind::Stt).expect("ok");
        let v: serde_json::Value = serde_json::from_str(&r).expect("json");
        assert!(v.get("constraint").is_none(), "{r}");
        assert!((v["no_speech_threshold"].as_f64().expect("f") - 0.6).abs() < 1e-6);
        assert_eq!(v["response_format"], "verbose_json");
        assert!(
            check_options(
                r#"{"url":"https://h/v1","response_format":"text"}"#,
                WorkerKind::Stt
            )
            .is_err()
        );
    }

    #[test]
    fn typos_other_kinds_keys_and_bad_values_are_refused() {
        let e = parse(json!({"url": "http://h/v1", "urll": 1}), WorkerKind::Stt)
            .expect_err("unknown key");
        assert!(e.contains("unknown field `urll`"), "{e}");
        let e = parse(
            json!({"url": "http://h/v1", "constraint": "grammar"}),
            WorkerKind::Stt,
        )
        .expect_err("evaluator key");
        assert!(e.contains("for evaluator workers"), "{e}");
        let e = parse(
            json!({"url": "http://h/v1", "language": "fr"}),
            WorkerKind::Evaluator,
        )
        .expect_err("stt key");
        assert!(e.contains("for stt workers"), "{e}");
        assert!(parse(json!({}), WorkerKind::Stt).is_err());
        assert!(parse(serde_json::Value::Null, WorkerKind::Stt).is_err());
        assert!(parse(json!({"url": "ftp://h/v1"}), WorkerKind::Stt).is_err());
        assert!(parse(json!({"url": "not a url"}), WorkerKind::Stt).is_err());
        let e = parse(json!({"url": "http://u:secret@h/v1"}), WorkerKind::Stt)
            .expect_err("credentials");
        assert!(!e.contains("secret"), "{e}");
        assert!(
            parse(
                json!({"url": "http://h/v1", "concurrency": 0}),
                WorkerKind::Stt
            )
            .is_err()
        );
        assert!(
            parse(
                json!({"url": "http://h/v1", "api_key_env": "A", "api_key_file": "/k"}),
                WorkerKind::Stt
            )
            .is_err()
        );
        assert!(
            parse(
                json!({"url": "http://h/v1", "timeout": "soon"}),
                WorkerKind::Stt
            )
            .is_err()
        );
        assert!(
            parse(
                json!({"url": "http://h/v1", "language": "klingon"}),
                WorkerKind::Stt
            )
            .is_err()
        );
        assert!(
            parse(
                json!({"url": "http://h/v1", "constraint": "regex"}),
                WorkerKind::Evaluator
            )
            .is_err()
        );
    }

    #[test]
    fn the_key_comes_from_env_or_file_and_never_shows() {
        let dir = std::env::temp_dir().join(format!("viva-remote-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("key");
        std::fs::write(&file, "sk-file-123456\n").expect("write");
        let o = parse(
            json!({"url": "http://h/v1", "api_key_file": file}),
            WorkerKind::Stt,
        )
        .expect("valid");
        let key = o.api_key().expect("read").expect("some");
        assert_eq!(key.expose(), "sk-file-123456");
        assert_eq!(format!("{key:?}"), "ApiKey([redacted])");
        assert_eq!(key.redact("echo sk-file-123456!"), "echo [redacted]!");
        let o = parse(
            json!({"url": "http://h/v1", "api_key_env": "VIVA_TEST_SURELY_UNSET_KEY"}),
            WorkerKind::Stt,
        )
        .expect("valid");
        let e = o.api_key().expect_err("unset").to_string();
        assert!(e.contains("VIVA_TEST_SURELY_UNSET_KEY"), "{e}");
        std::fs::write(&file, "  \n").expect("write");
        let o = parse(
            json!({"url": "http://h/v1", "api_key_file": file}),
            WorkerKind::Stt,
        )
        .expect("valid");
        assert!(o.api_key().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
