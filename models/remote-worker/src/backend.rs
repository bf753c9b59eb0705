//! One inference server: the HTTP client, the bound on requests in flight,
//! retries with backoff, and the health the admin view shows.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{RequestBuilder, StatusCode};
use tokio::sync::Semaphore;
use viva_models::WorkerKind;
use viva_models::protocol::RemoteHealth;

use crate::Error;
use crate::options::{ApiKey, RemoteOptions};

/// Successful requests whose latency the health keeps (p50, p95).
const LATENCY_WINDOW: usize = 64;
/// Longest excerpt of a server's error body quoted in a reason.
const BODY_EXCERPT_CHARS: usize = 200;

/// Why one try of a request failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// No answer within `timeout`.
    Timeout(Duration),
    /// The connection could not be made or broke.
    Connect(String),
    /// An HTTP error status, with an excerpt of the body.
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    /// A 2xx answer that is not what was asked for (not JSON, not the
    /// expected shape, an evaluation that does not fit the rubric).
    Malformed(String),
}

impl Failure {
    /// Whether trying again may help: timeouts, connection failures, 408,
    /// 429, 5xx and malformed answers.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Timeout(_) | Failure::Connect(_) | Failure::Malformed(_) => true,
            Failure::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..600).contains(status)
            }
        }
    }

    /// The failure in plain words, after "the … server at URL".
    fn describe(&self) -> String {
        match self {
            Failure::Timeout(t) => {
                format!("did not answer within {}", humantime::format_duration(*t))
            }
            Failure::Connect(e) => format!("could not be reached ({e})"),
            Failure::Status { status, body, .. } => {
                let reason = StatusCode::from_u16(*status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                if body.is_empty() {
                    format!("returned HTTP {status} {reason}")
                } else {
                    format!("returned HTTP {status} {reason}: {body}")
                }
            }
            Failure::Malformed(e) => {
                format!("answered with something other than the expected JSON ({e})")
            }
        }
    }
}

/// A request that failed for good (after its retries).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The plain-words reason: which server, what went wrong, how often.
    pub message: String,
    pub last: Failure,
    pub tries: u32,
}

impl RequestError {
    /// Whether the same job may succeed later (everything but a request
    /// the server refuses as such: 400, 413, 422).
    pub fn job_retryable(&self) -> bool {
        !matches!(
            self.last,
            Failure::Status {
                status: 400 | 413 | 422,
                ..
            }
        )
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Default)]
struct HealthState {
    ok: bool,
    last_success_unix_ms: Option<u64>,
    last_failure_unix_ms: Option<u64>,
    last_error: Option<String>,
    latencies_ms: VecDeque<u64>,
    requests: u64,
    failures: u64,
}

/// The inference server of one worker.
pub struct Backend {
    client: reqwest::Client,
    options: RemoteOptions,
    key: Option<ApiKey>,
    /// The model name sent to the server.
    model: String,
    /// "the transcription server" / "the evaluation server".
    what: &'static str,
    permits: Semaphore,
    health: Mutex<HealthState>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

/// The innermost cause of a client error ("Connection refused (os error
/// 111)"): reqwest's own text ("error sending request for url …") says
/// less, and the reason names the server already.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if std::ptr::addr_eq(cause, e as &dyn std::error::Error) {
        return e.to_string();
    }
    cause.to_string()
}

/// An excerpt of a body for a reason: one line, printable, short.
fn excerpt(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = one_line.split_whitespace().collect::<Vec<_>>().join(" ");
    if trimmed.chars().count() > BODY_EXCERPT_CHARS {
        let cut: String = trimmed.chars().take(BODY_EXCERPT_CHARS).collect();
        format!("{cut}…")
    } else {
        trimmed
    }
}

impl Backend {
    /// The backend of `options` for a worker of `kind` whose configured
    /// model is `model_name`. Reads the API key.
    pub fn new(
        options: RemoteOptions,
        kind: WorkerKind,
        model_name: &str,
    ) -> Result<Backend, Error> {
        let key = options.api_key()?;
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .user_agent(concat!("viva-remote-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Options(format!("cannot build the HTTP client: {e}")))?;
        let model = options
            .model
            .clone()
            .unwrap_or_else(|| model_name.to_owned());
        let permits = Semaphore::new(options.concurrency as usize);
        Ok(Backend {
            client,
            key,
            model,
            what: match kind {
                WorkerKind::Stt => "the transcription server",
                WorkerKind::Evaluator => "the evaluation server",
            },
            permits,
            health: Mutex::new(HealthState::default()),
            options,
        })
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.options
    }

    /// The model name sent to the server.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// `{url}/{path}`.
    pub fn endpoint(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.options.base_url(),
            path.trim_start_matches('/')
        )
    }

    fn authorised(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.key {
            Some(k) => req.bearer_auth(k.expose()),
            None => req,
        }
    }

    /// Text safe to show: the key, if a server echoed it, redacted.
    fn safe(&self, text: &str) -> String {
        match &self.key {
            Some(k) => k.redact(text),
            None => text.to_owned(),
        }
    }

    /// The health as of now, for the admin view.
    pub fn health(&self) -> RemoteHealth {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted: Vec<u64> = h.latencies_ms.iter().copied().collect();
        sorted.sort_unstable();
        RemoteHealth {
            url: self.options.base_url().to_owned(),
            model: self.model.clone(),
            ok: h.ok,
            last_success_unix_ms: h.last_success_unix_ms,
            last_failure_unix_ms: h.last_failure_unix_ms,
            last_error: h.last_error.clone(),
            latency_p50_ms: percentile(&sorted, 0.5),
            latency_p95_ms: percentile(&sorted, 0.95),
            requests: h.requests,
            failures: h.failures,
            concurrency: self.options.concurrency,
        }
    }

    fn record(&self, result: Result<Duration, &str>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.requests += 1;
        match result {
            Ok(latency) => {
                h.ok = true;
                h.last_success_unix_ms = Some(unix_ms());
                if h.latencies_ms.len() >= LATENCY_WINDOW {
                    h.latencies_ms.pop_front();
                }
                h.latencies_ms
                    .push_back(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX));
            }
            Err(reason) => {
                h.ok = false;
                h.failures += 1;
                h.last_failure_unix_ms = Some(unix_ms());
                h.last_error = Some(reason.to_owned());
            }
        }
    }

    /// One try: send, read the body, parse it.
    async fn try_once<T>(
        &self,
        request: RequestBuilder,
        parse: &(dyn Fn(&[u8]) -> Result<T, String> + Sync),
    ) -> Result<T, Failure> {
        let timeout = self.options.timeout;
        let classify = |e: reqwest::Error| -> Failure {
            if e.is_timeout() {
                Failure::Timeout(timeout)
            } else {
                Failure::Connect(self.safe(&root_cause(&e)))
            }
        };
        let response = self.authorised(request).send().await.map_err(classify)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.map_err(classify)?;
        if !status.is_success() {
            return Err(Failure::Status {
                status: status.as_u16(),
                body: self.safe(&excerpt(&String::from_utf8_lossy(&body))),
                retry_after,
            });
        }
        parse(&body).map_err(|e| Failure::Malformed(self.safe(&excerpt(&e))))
    }

    /// Sends the request `build` makes (once per try), with a permit of
    /// the server's `concurrency`, retrying with exponential backoff what
    /// may succeed on a later try; `parse` turns a 2xx body into the
    /// answer (an `Err` is a malformed answer, retried too).
    pub async fn request<T>(
        &self,
        build: &(dyn Fn() -> Result<RequestBuilder, String> + Sync),
        parse: &(dyn Fn(&[u8]) -> Result<T, String> + Sync),
    ) -> Result<T, RequestError> {
        let tries = self.options.retries + 1;
        let mut delay = self.options.backoff;
        let mut failures: Vec<Failure> = Vec::new();
        for n in 1..=tries {
            let request = build().map_err(|e| RequestError {
                message: e.clone(),
                last: Failure::Malformed(e),
                tries: n,
            })?;
            let outcome = {
                let _permit = self.permits.acquire().await.map_err(|_| RequestError {
                    message: "the worker is shutting down".into(),
                    last: Failure::Connect("shutting down".into()),
                    tries: n,
                })?;
                let t0 = Instant::now();
                self.try_once(request, parse)
                    .await
                    .map(|v| (v, t0.elapsed()))
            };
            match outcome {
                Ok((value, latency)) => {
                    self.record(Ok(latency));
                    return Ok(value);
                }
                Err(failure) => {
                    let reason = format!(
                        "{} at {} {}",
                        self.what,
                        self.options.base_url(),
                        failure.describe()
                    );
                    self.record(Err(&reason));
                    let retry = failure.retryable() && n < tries;
                    eprintln!(
                        "viva-remote-worker: try {n} of {tries}: {reason}{}",
                        if retry { "; trying again" } else { "" }
                    );
                    let wait = match &failure {
                        Failure::Status {
                            retry_after: Some(r),
                            ..
                        } => (*r).min(self.options.max_backoff),
                        _ => delay,
                    };
                    failures.push(failure);
                    if !retry {
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(self.options.max_backoff);
                }
            }
        }
        Err(self.give_up(failures))
    }

    /// The reason after the last try: "the evaluation server at URL
    /// returned HTTP 500 3 times: …", or the last failure and the count.
    fn give_up(&self, failures: Vec<Failure>) -> RequestError {
        let tries = u32::try_from(failures.len()).unwrap_or(u32::MAX);
        let last = failures
            .last()
            .cloned()
            .unwrap_or(Failure::Malformed("no request was sent".into()));
        let same = failures.iter().all(|f| {
            std::mem::discriminant(f) == std::mem::discriminant(&last)
                && match (f, &last) {
                    (Failure::Status { status: a, .. }, Failure::Status { status: b, .. }) => {
                        a == b
                    }
                    _ => true,
                }
        });
        let times = match tries {
            1 => "once".to_owned(),
            2 => "twice".to_owned(),
            n => format!("{n} times"),
        };
        let what = format!("{} at {}", self.what, self.options.base_url());
        let message = if tries <= 1 {
            format!("{what} {}", last.describe())
        } else if same {
            // "returned HTTP 500 3 times: body" reads better than at the end.
            match &last {
                Failure::Status { status, body, .. } => {
                    let head = Failure::Status {
                        status: *status,
                        body: String::new(),
                        retry_after: None,
                    }
                    .describe();
                    if body.is_empty() {
                        format!("{what} {head} {times}")
                    } else {
                        format!("{what} {head} {times}: {body}")
                    }
                }
                other => format!("{what} {} ({times})", other.describe()),
            }
        } else {
            format!(
                "{what} failed {times}; the last time it {}",
                last.describe()
            )
        };
        RequestError {
            message,
            last,
            tries,
        }
    }

    /// The load-time check: `GET {url}/models` answers (a 404 is fine: not
    /// every server lists its models), the key is accepted, and the model
    /// is listed where the server lists models (a model it does not list
    /// is only warned about: names differ in tags and paths).
    pub async fn probe(&self) -> Result<(), Error> {
        let request = self.client.get(self.endpoint("models"));
        let t0 = Instant::now();
        let result = self
            .try_once(request, &|body: &[u8]| {
                let v: serde_json::Value =
                    serde_json::from_slice(body).map_err(|e| e.to_string())?;
                Ok(v.get("data").and_then(|d| d.as_array()).map(|a| {
                    a.iter()
                        .filter_map(|m| m.get("id").and_then(|i| i.as_str()))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                }))
            })
            .await;
        let what = format!("{} at {}", self.what, self.options.base_url());
        match result {
            Ok(listed) => {
                self.record(Ok(t0.elapsed()));
                if let Some(ids) = listed
                    && !ids.is_empty()
                    && !ids.iter().any(|i| i == &self.model)
                {
                    eprintln!(
                        "viva-remote-worker: warning: {what} does not list model {:?} (it lists {}); \
                         set the `model` option to one of them if requests fail",
                        self.model,
                        ids.join(", ")
                    );
                }
                Ok(())
            }
            Err(Failure::Status {
                status: 401 | 403, ..
            }) => {
                let reason = format!(
                    "{what} refused the API key (HTTP 401/403): check api_key_env or api_key_file"
                );
                self.record(Err(&reason));
                Err(Error::Unreachable(reason))
            }
            // A server without a model list (404, 405), or with an odd one.
            Err(Failure::Status { status, .. }) if (400..500).contains(&status) => {
                self.record(Ok(t0.elapsed()));
                Ok(())
            }
            Err(Failure::Malformed(_)) => {
                self.record(Ok(t0.elapsed()));
                Ok(())
            }
            Err(f) => {
                let reason = format!("{what} {}", f.describe());
                self.record(Err(&reason));
                Err(Error::Unreachable(reason))
            }
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_retried() {
        let s = |status| Failure::Status {
            status,
            body: String::new(),
            retry_after: None,
        };
        assert!(s(500).retryable());
        assert!(s(503).retryable());
        assert!(s(429).retryable());
        assert!(s(408).retryable());
        assert!(!s(400).retryable());
        assert!(!s(401).retryable());
        assert!(!s(404).retryable());
        assert!(Failure::Timeout(Duration::from_secs(1)).retryable());
        assert!(Failure::Malformed("x".into()).retryable());
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt("a\n\tb   c"), "a b c");
        let long = "x".repeat(500);
        assert_eq!(excerpt(&long).chars().count(), BODY_EXCERPT_CHARS + 1);
    }

    #[test]
    fn percentiles_of_recent_latencies() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[10], 0.5), Some(10));
        assert_eq!(percentile(&[10, 20, 30], 0.5), Some(20));
        assert_eq!(percentile(&[1, 2, 3, 4, 100], 0.95), Some(100));
    }

    fn backend() -> Backend {
        let o = RemoteOptions::from_json(
            &serde_json::json!({"url": "http://127.0.0.1:9/v1"}),
            WorkerKind::Evaluator,
        )
        .expect("options");
        Backend::new(o, WorkerKind::Evaluator, "m").expect("backend")
    }

    #[test]
    fn reasons_say_which_server_what_and_how_often() {
        let b = backend();
        let s500 = || Failure::Status {
            status: 500,
            body: "boom".into(),
            retry_after: None,
        };
        let e = b.give_up(vec![s500(), s500(), s500()]);
        assert_eq!(
            e.message,
            "the evaluation server at http://127.0.0.1:9/v1 returned HTTP 500 Internal Server Error 3 times: boom"
        );
        let e = b.give_up(vec![
            Failure::Timeout(Duration::from_secs(2)),
            Failure::Timeout(Duration::from_secs(2)),
        ]);
        assert_eq!(
            e.message,
            "the evaluation server at http://127.0.0.1:9/v1 did not answer within 2s (twice)"
        );
        let e = b.give_up(vec![s500(), Failure::Malformed("not JSON".into())]);
        assert!(e.message.contains("failed twice; the last time it answered with something other than the expected JSON (not JSON)"), "{}", e.message);
        assert!(e.job_retryable());
        let e = b.give_up(vec![Failure::Status {
            status: 400,
            body: String::new(),
            retry_after: None,
        }]);
        assert!(!e.job_retryable());
        assert!(
            e.message.ends_with("returned HTTP 400 Bad Request"),
            "{}",
            e.message
        );
    }
}
