//! `viva-remote-worker` against OpenAI-compatible HTTP servers, spoken to
//! over the real worker protocol (the test plays the daemon).
//!
//! - Faults, against a small HTTP server in this file whose answers depend
//!   on markers in the request: HTTP 500, an answer slower than the
//!   worker's timeout, malformed JSON. Each fails only its own item or job,
//!   after the retries, with a plain reason; the other items succeed; no
//!   more requests are in flight than `concurrency`; the API key reaches
//!   the server and never the worker's log or a reason.
//! - Real servers, started by the test from the PyPI packages that
//!   `scripts/lib.sh`'s `ensure_remote_servers` installs: llama-cpp-python's
//!   server (chat completions constrained by the rubric's schema, and by its
//!   GBNF grammar) on SmolLM2-135M, and faster-whisper-server on the
//!   CTranslate2 Whisper tiny.en of the model manifest. Skipped with a loud
//!   message when that venv is missing, unless `VIVA_REQUIRE_REMOTE=1`
//!   (scripts/test sets it).
//! - The documented configurations (viva.example.toml, docs/deploy.md)
//!   parse, and their remote workers' options pass the worker's own check.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use viva_models::protocol::{ModelSpec, RemoteHealth, decode, encode};
use viva_models::{
    DaemonMessage, EvaluateItem, EvaluateRequest, EvaluationOutcome, JobPayload, JobResult,
    PROTOCOL_VERSION, TranscribeRequest, WorkerMessage,
};
use viva_tests::process;
use viva_tests::real::{EVALUATOR_A_MODEL, model, worker_bin};

const KEY: &str = "sk-test-SECRET-4242";

// ---- the worker, driven as the daemon drives it ------------------------------

struct Worker {
    child: Child,
    stdin: ChildStdin,
    out: process::Lines,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// The last health the worker reported.
    health: Option<RemoteHealth>,
}

impl Worker {
    /// Starts the worker, checks its Hello, sends Load; returns it with the
    /// answer to Load (Loaded, or the Error that says why not).
    fn start(
        args: &[&str],
        env: &[(&str, &str)],
        name: &str,
        options: Value,
    ) -> (Worker, WorkerMessage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("worker.log");
        let mut cmd = Command::new(worker_bin("viva-remote-worker"));
        cmd.args(args)
            .env_remove("VIVA_TEST_REMOTE_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let mut child = cmd.spawn().expect("start viva-remote-worker");
        let stdin = child.stdin.take().expect("stdin");
        let out = process::Lines::spawn(child.stdout.take().expect("stdout"));
        let mut w = Worker {
            child,
            stdin,
            out,
            log,
            _dir: dir,
            health: None,
        };
        let hello = w.recv(Duration::from_secs(20));
        assert!(
            matches!(hello, WorkerMessage::Hello { remote: true, protocol, .. } if protocol == PROTOCOL_VERSION),
            "{hello:?}"
        );
        w.send(&DaemonMessage::Hello {
            protocol: PROTOCOL_VERSION,
            daemon_version: "test".into(),
        });
        w.send(&DaemonMessage::Load {
            model: ModelSpec {
                name: name.into(),
                path: String::new(),
                options,
            },
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match w.recv(deadline.saturating_duration_since(Instant::now())) {
                WorkerMessage::Remote { health } => w.health = Some(health),
                m @ (WorkerMessage::Loaded { .. } | WorkerMessage::Error { .. }) => return (w, m),
                other => panic!("unexpected {other:?} while loading"),
            }
        }
    }

    fn send(&mut self, msg: &DaemonMessage) {
        let frame = encode(msg).expect("encode");
        self.stdin.write_all(&frame).expect("write to the worker");
        self.stdin.flush().expect("flush");
    }

    fn recv(&mut self, timeout: Duration) -> WorkerMessage {
        match self.out.next(timeout) {
            Ok(Some(line)) => decode(line.trim().as_bytes())
                .unwrap_or_else(|e| panic!("bad frame {line:?}: {e}\n{}", self.log())),
            Ok(None) => panic!("the worker closed its stdout\n{}", self.log()),
            Err(e) => panic!("{e}\n{}", self.log()),
        }
    }

    /// Runs one job; returns its Result or Error frame (after which the
    /// worker reports its health, which is kept).
    fn call(&mut self, job_id: &str, payload: JobPayload, timeout: Duration) -> WorkerMessage {
        self.send(&DaemonMessage::Job {
            job_id: job_id.into(),
            payload,
        });
        let deadline = Instant::now() + timeout;
        let mut answer = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left.max(Duration::from_millis(1))) {
                WorkerMessage::Remote { health } => {
                    self.health = Some(health);
                    if let Some(a) = answer.take() {
                        return a;
                    }
                }
                WorkerMessage::Progress { .. } => {}
                m @ (WorkerMessage::Result { .. } | WorkerMessage::Error { .. }) => {
                    answer = Some(m)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn log(&self) -> String {
        format!(
            "--- viva-remote-worker's log ---\n{}\n--- end ---",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    fn stop(mut self) -> String {
        // The worker may have exited already (a failed load): no answer.
        if let Ok(frame) = encode(&DaemonMessage::Shutdown) {
            let _ = self
                .stdin
                .write_all(&frame)
                .and_then(|()| self.stdin.flush());
        }
        let _ = process::wait(&mut self.child, Duration::from_secs(10));
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
        let _ = self.child.kill();
        let _ = process::wait(&mut self.child, Duration::from_secs(10));
    }
}

fn rubric() -> viva_models::Rubric {
    serde_json::from_value(json!({"criteria": [
        {"id": "content", "title": "Content", "description": "Explains how plants make food.",
         "levels": [{"label": "weak", "points": 0, "descriptor": "wrong or missing"},
                    {"label": "strong", "points": 2, "descriptor": "correct and complete"}]},
        {"id": "clarity", "title": "Clarity",
         "levels": [{"label": "unclear", "points": 0}, {"label": "clear", "points": 1}]}]}))
    .expect("rubric")
}

fn item(id: &str, transcript: &str) -> EvaluateItem {
    EvaluateItem {
        submission_id: id.into(),
        assignment_prompt: "Explain photosynthesis in a few sentences.".into(),
        rubric: rubric(),
        transcript: transcript.into(),
        exemplars: Vec::new(),
        language: Some("en".into()),
    }
}

fn outcomes(answer: WorkerMessage) -> HashMap<String, EvaluationOutcome> {
    match answer {
        WorkerMessage::Result {
            result: JobResult::Evaluations(r),
            ..
        } => r
            .outcomes
            .into_iter()
            .map(|o| (o.submission_id.clone(), o))
            .collect(),
        other => panic!("expected evaluations, got {other:?}"),
    }
}

// ---- a server that fails on demand -------------------------------------------

/// What the fault server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    auth: Option<String>,
    body: String,
}

/// An HTTP/1.1 server on 127.0.0.1 (one thread per connection, each closed
/// after one answer). Chat completions: a transcript with `FAULT_500` gets
/// HTTP 500 (echoing the Authorization header, which the worker must
/// redact), `FAULT_SLOW` an answer after 3 s, `FAULT_JUNK` an answer that is
/// not the evaluation JSON; anything else a valid evaluation after 150 ms.
/// Transcriptions: the same markers in the `prompt` field. Every request
/// without `Authorization: Bearer KEY` gets 401.
struct FaultServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    max_in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FaultServer {
    fn start() -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, m, st) = (seen.clone(), in_flight, max_in_flight.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (s, f, m) = (s.clone(), f.clone(), m.clone());
                std::thread::spawn(move || {
                    let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    let _ = serve(conn, &s, InFlight(&f));
                });
            }
        });
        FaultServer {
            addr,
            seen,
            max_in_flight,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Forgets the most requests in flight seen so far.
    fn reset_max(&self) {
        self.max_in_flight.store(0, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// One request counted in flight until its answer is about to be written
/// (the client cannot send its next request before that, so the count
/// never exceeds what the client holds in flight).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(conn: TcpStream, seen: &Mutex<Vec<Seen>>, in_flight: InFlight<'_>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let (mut length, mut chunked, mut auth) = (0usize, false, None);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                "authorization" => auth = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            path: path.clone(),
            auth: auth.clone(),
            body: body.clone(),
        });
    }
    let (status, answer) = if auth.as_deref() != Some(&format!("Bearer {KEY}")) {
        (
            401,
            json!({"error": {"message": "invalid api key"}}).to_string(),
        )
    } else if path.ends_with("/models") {
        (
            200,
            json!({"object": "list", "data": [{"id": "fault-model"}]}).to_string(),
        )
    } else if body.contains("FAULT_500") {
        (
            500,
            format!("boom, and you sent {}", auth.unwrap_or_default()),
        )
    } else if body.contains("FAULT_SLOW") {
        std::thread::sleep(Duration::from_secs(3));
        (200, completion(&valid_answer_for(&body)))
    } else if body.contains("FAULT_JUNK") {
        (200, completion("certainly! here is my evaluation: strong"))
    } else if path.ends_with("/chat/completions") {
        std::thread::sleep(Duration::from_millis(150));
        (200, completion(&valid_answer_for(&body)))
    } else if path.ends_with("/audio/transcriptions") {
        (
            200,
            json!({"task": "transcribe", "language": "english", "duration": 1.0,
                   "text": " Plants make sugar.",
                   "segments": [{"id": 0, "start": 0.0, "end": 1.0, "text": " Plants make sugar.",
                                 "avg_logprob": -0.1, "no_speech_prob": 0.01}]})
            .to_string(),
        )
    } else {
        (404, "{}".to_owned())
    };
    let mut conn = conn;
    drop(in_flight);
    write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    conn.flush()
}

/// A valid answer to the request's rubric (read from its schema: each
/// criterion with its last level), else to this file's rubric.
fn valid_answer_for(body: &str) -> String {
    let request: Value = serde_json::from_str(body).unwrap_or_default();
    let criteria =
        request["response_format"]["json_schema"]["schema"]["properties"]["ratings"]["prefixItems"]
            .as_array()
            .cloned()
            .unwrap_or_default();
    if criteria.is_empty() {
        return valid_answer();
    }
    let ratings: Vec<Value> = criteria
        .iter()
        .map(|c| {
            let p = &c["properties"];
            json!({"criterion_id": p["criterion_id"]["const"],
                   "evidence": "fake transcript",
                   "rationale": "it names the topic",
                   "level": p["level"]["enum"].as_array().and_then(|l| l.last()).cloned()
                       .unwrap_or_default()})
        })
        .collect();
    json!({"addresses_grader": false, "ratings": ratings}).to_string()
}

fn valid_answer() -> String {
    json!({"addresses_grader": false, "ratings": [
        {"criterion_id": "content", "evidence": "plants make sugar from light",
         "rationale": "names the inputs and the product", "level": "strong"},
        {"criterion_id": "clarity", "evidence": "plants make sugar from light",
         "rationale": "one clear sentence", "level": "clear"}]})
    .to_string()
}

fn completion(content: &str) -> String {
    json!({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 321, "completion_tokens": 54, "total_tokens": 375}})
    .to_string()
}

fn fault_options(server: &FaultServer) -> Value {
    json!({
        "url": server.url(),
        "model": "fault-model",
        "api_key_env": "VIVA_TEST_REMOTE_KEY",
        "timeout": "1s",
        "retries": 2,
        "backoff": "50ms",
        "max_backoff": "100ms",
        "concurrency": 2,
    })
}

#[test]
fn faults_fail_only_their_own_item_with_a_plain_reason_after_the_retries() {
    let server = FaultServer::start();
    let (mut w, loaded) = Worker::start(
        &["--role", "b"],
        &[("VIVA_TEST_REMOTE_KEY", KEY)],
        "remote-evaluator",
        fault_options(&server),
    );
    assert!(
        matches!(
            loaded,
            WorkerMessage::Loaded {
                max_parallel_jobs: Some(2),
                ..
            }
        ),
        "{loaded:?}\n{}",
        w.log()
    );
    // Good items only: no more requests in flight than `concurrency` (a
    // timed-out request would leave the server busy after the worker let
    // go of it, so this is measured without faults).
    server.reset_max();
    let warm = (0..6)
        .map(|i| item(&format!("w{i}"), "Plants make sugar from light."))
        .collect();
    let out = outcomes(w.call(
        "job-0",
        JobPayload::Evaluate(EvaluateRequest { items: warm }),
        Duration::from_secs(60),
    ));
    assert!(out.values().all(|o| o.evaluation.is_some()), "{out:?}");
    let max = server.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&max),
        "{max} requests in flight at once, concurrency is 2"
    );
    let items = vec![
        item("ok1", "Plants make sugar from light."),
        item("e500", "FAULT_500 plants"),
        item("ok2", "Leaves take in carbon dioxide."),
        item("slow", "FAULT_SLOW plants"),
        item("junk", "FAULT_JUNK plants"),
        item("ok3", "Chlorophyll absorbs light."),
    ];
    let answer = w.call(
        "job-1",
        JobPayload::Evaluate(EvaluateRequest { items }),
        Duration::from_secs(60),
    );
    let out = outcomes(answer);
    let base = server.url();
    for id in ["ok1", "ok2", "ok3"] {
        let e = out[id]
            .evaluation
            .as_ref()
            .unwrap_or_else(|| panic!("{id}: {:?}", out[id]));
        assert_eq!(e.role, "b");
        assert_eq!(e.model, "remote-evaluator");
        assert_eq!(e.ratings.len(), 2);
        assert_eq!(e.ratings[0].level, "strong");
        assert_eq!((e.prompt_tokens, e.generated_tokens), (321, 54));
        assert!(e.flags.is_empty(), "{:?}", e.flags);
    }
    let reason = |id: &str| {
        assert!(out[id].evaluation.is_none(), "{id} should have failed");
        out[id].error.clone().unwrap_or_default()
    };
    assert_eq!(
        reason("e500"),
        format!(
            "the evaluation server at {base} returned HTTP 500 Internal Server Error 3 times: \
             boom, and you sent Bearer [redacted]"
        )
    );
    assert_eq!(
        reason("slow"),
        format!("the evaluation server at {base} did not answer within 1s (3 times)")
    );
    let junk = reason("junk");
    assert!(
        junk.starts_with(&format!(
            "the evaluation server at {base} answered with something other than the expected JSON"
        )) && junk.ends_with("(3 times)"),
        "{junk}"
    );
    // The retries: three tries of each fault, one of each good item.
    let seen = server.seen();
    let count = |m: &str| seen.iter().filter(|s| s.body.contains(m)).count();
    assert_eq!(count("FAULT_500"), 3);
    assert_eq!(count("FAULT_SLOW"), 3);
    assert_eq!(count("FAULT_JUNK"), 3);
    assert_eq!(count("Chlorophyll"), 1);
    assert!(
        seen.iter()
            .all(|s| s.auth.as_deref() == Some(&format!("Bearer {KEY}"))),
        "every request carries the key"
    );
    // The request: the rubric's schema, the local prompt, greedy.
    let body: Value = serde_json::from_str(
        &seen
            .iter()
            .find(|s| s.body.contains("Chlorophyll"))
            .expect("ok3's request")
            .body,
    )
    .expect("json body");
    assert_eq!(body["model"], "fault-model");
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["ratings"]["prefixItems"][1]
            ["properties"]["level"]["enum"],
        json!(["unclear", "clear"])
    );
    // Health for the admin view: every try counted, latency of successes.
    let h = w.health.clone().expect("a health report");
    assert_eq!(h.url, base);
    assert_eq!(h.model, "fault-model");
    assert_eq!(h.requests, 1 + 6 + 3 + 9, "{h:?}");
    assert_eq!(h.failures, 9, "{h:?}");
    assert!(
        h.latency_p50_ms.is_some() && h.last_success_unix_ms.is_some(),
        "{h:?}"
    );
    assert_eq!(h.concurrency, 2);
    let log = w.stop();
    assert!(
        log.contains("try 1 of 3"),
        "the log tells the retries:\n{log}"
    );
    assert!(
        !log.contains("SECRET-4242"),
        "the API key is in the worker's log:\n{log}"
    );
}

#[test]
fn a_transcription_server_answering_junk_or_500_fails_that_job_only() {
    let server = FaultServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = viva_tests::tone(dir.path(), "a.wav", 1.0);
    let (mut w, loaded) = Worker::start(
        &["--kind", "stt"],
        &[("VIVA_TEST_REMOTE_KEY", KEY)],
        "remote-whisper",
        fault_options(&server),
    );
    assert!(matches!(loaded, WorkerMessage::Loaded { .. }), "{loaded:?}");
    let job = |prompt: Option<&str>| {
        JobPayload::Transcribe(TranscribeRequest {
            wav_path: wav.display().to_string(),
            audio_seconds: 1.0,
            language: None,
            initial_prompt: prompt.map(str::to_owned),
        })
    };
    match w.call("good", job(Some("photosynthesis")), Duration::from_secs(30)) {
        WorkerMessage::Result {
            result: JobResult::Transcript(t),
            ..
        } => {
            assert_eq!(t.text, "Plants make sugar.");
            assert_eq!(t.language.as_deref(), Some("en"));
            assert_eq!(t.segments.len(), 1);
            assert_eq!(t.model, "remote-whisper");
        }
        other => panic!("expected a transcript, got {other:?}"),
    }
    let base = server.url();
    for (marker, expected) in [
        (
            "FAULT_500",
            format!(
                "the transcription server at {base} returned HTTP 500 Internal Server Error 3 times"
            ),
        ),
        (
            "FAULT_JUNK",
            format!(
                "the transcription server at {base} answered with something other than the expected JSON"
            ),
        ),
    ] {
        match w.call(marker, job(Some(marker)), Duration::from_secs(30)) {
            WorkerMessage::Error {
                job_id,
                message,
                retryable,
                ..
            } => {
                assert_eq!(job_id.as_deref(), Some(marker));
                assert!(message.starts_with(&expected), "{message}");
                assert!(!message.contains("SECRET"), "{message}");
                assert!(retryable, "a later attempt may succeed");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    // The server got the request as OpenAI's API has it.
    let seen = server.seen();
    let good = seen
        .iter()
        .find(|s| s.path.ends_with("/audio/transcriptions") && s.body.contains("photosynthesis"))
        .expect("the good request");
    for field in ["name=\"file\"", "name=\"model\"", "verbose_json", "RIFF"] {
        assert!(good.body.contains(field), "{field} missing");
    }
    let log = w.stop();
    assert!(!log.contains("SECRET-4242"), "{log}");
}

#[test]
fn a_server_that_is_down_or_refuses_the_key_fails_the_load_with_a_reason() {
    // Nothing listens on a port just released.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let (w, answer) = Worker::start(
        &["--role", "a"],
        &[],
        "m",
        json!({"url": url, "connect_timeout": "2s"}),
    );
    match answer {
        WorkerMessage::Error { code, message, .. } => {
            assert_eq!(code, "server_unreachable");
            // The cause in plain words, not reqwest's "error sending request".
            assert!(
                message.starts_with(&format!(
                    "the evaluation server at {url} could not be reached (Connection refused"
                )),
                "{message}"
            );
        }
        other => panic!("expected a load error, got {other:?}"),
    }
    drop(w);
    // A wrong key: refused at load, with the fix, and the key unsaid.
    let server = FaultServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-wrong-WRONGKEY\n").expect("key file");
    let (w, answer) = Worker::start(
        &["--kind", "stt"],
        &[],
        "m",
        json!({"url": server.url(), "api_key_file": key_file}),
    );
    match answer {
        WorkerMessage::Error { code, message, .. } => {
            assert_eq!(code, "server_unreachable");
            assert!(message.contains("refused the API key"), "{message}");
            assert!(!message.contains("WRONGKEY"), "{message}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
    let log = w.stop();
    assert!(!log.contains("WRONGKEY"), "{log}");
    // A key variable that is not set: refused before any request.
    let (_w, answer) = Worker::start(
        &["--kind", "stt"],
        &[],
        "m",
        json!({"url": server.url(), "api_key_env": "VIVA_TEST_REMOTE_KEY"}),
    );
    match answer {
        WorkerMessage::Error { code, message, .. } => {
            assert_eq!(code, "bad_options");
            assert!(message.contains("VIVA_TEST_REMOTE_KEY"), "{message}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_daemon_a_failing_server_fails_only_those_submissions_with_its_reason() {
    // Evaluator "b" is viva-remote-worker on the fault server; STT and
    // evaluator "a" are fake local workers. The fake transcript carries the
    // upload's file name, so its markers reach the server.
    let server = FaultServer::start();
    let options: toml::Table = toml::from_str(&format!(
        "url = \"{}\"\nmodel = \"fault-model\"\napi_key_env = \"VIVA_TEST_REMOTE_KEY\"\n\
         timeout = \"1s\"\nretries = 2\nbackoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
        server.url()
    ))
    .expect("options");
    let d = viva_tests::TestDaemon::start(&[("FAKE_STT_FIXED_MS", "50".into())], |c| {
        c.scheduler.max_attempts = 2;
        c.scheduler.retry_backoff = Duration::from_millis(100);
        c.scheduler.swap_work_ratio = 0.0;
        let b = c.workers.evaluators.get_mut("b").expect("evaluator b");
        b.command = worker_bin("viva-remote-worker");
        b.args.clear();
        b.model = "remote-b".into();
        b.model_path = PathBuf::new();
        b.memory_mb = 0;
        b.options = options;
        b.env.insert("VIVA_TEST_REMOTE_KEY".into(), KEY.into());
    })
    .await;
    let tok = d.token(viva_daemon::Role::Learner, "student", "sandbox");
    let mut ids = Vec::new();
    for name in [
        "ok-one.wav",
        "FAULT_500.wav",
        "FAULT_JUNK.wav",
        "ok-two.wav",
    ] {
        let f = viva_tests::tone(d.dir.path(), name, 0.5);
        let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    let done = d.wait_settled(&ids, Duration::from_secs(120)).await;
    let base = server.url();
    for i in [0, 3] {
        assert_eq!(done[i]["state"], "evaluated", "{}", done[i]);
        let evals = done[i]["evaluations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            evals
                .iter()
                .any(|e| e["role"] == "b" && e["model"] == "remote-b"),
            "{}",
            done[i]
        );
    }
    for (i, expected) in [
        (
            1,
            format!(
                "the evaluation server at {base} returned HTTP 500 Internal Server Error 3 times"
            ),
        ),
        (
            2,
            format!(
                "the evaluation server at {base} answered with something other than the expected JSON"
            ),
        ),
    ] {
        assert_eq!(done[i]["state"], "failed", "{}", done[i]);
        let reason = done[i]["failure_reason"].as_str().unwrap_or_default();
        assert!(reason.contains(&expected), "{reason}");
        assert!(!reason.contains("SECRET"), "{reason}");
    }
    // Each attempt made its three tries: two attempts, six requests.
    let seen = server.seen();
    assert_eq!(
        seen.iter().filter(|s| s.body.contains("FAULT_500")).count(),
        6
    );
    // The remote evaluator stayed one process through it all.
    let spawned = d
        .state
        .scheduler
        .supervisor
        .history()
        .iter()
        .filter(|e| e.slot == "evaluator:b" && e.event == "spawned")
        .count();
    assert_eq!(spawned, 1);
    d.stop().await;
}

#[test]
fn viva_doctor_checks_that_each_remote_server_answers() {
    let server = FaultServer::start();
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let remote = worker_bin("viva-remote-worker");
    let config = dir.path().join("viva.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[workers.evaluators.a]
command = "{remote}"
model = "down"
options = {{ url = "http://127.0.0.1:{closed}/v1", connect_timeout = "2s" }}
[workers.evaluators.b]
command = "{remote}"
model = "up"
env = {{ VIVA_TEST_REMOTE_KEY = "{KEY}" }}
options = {{ url = "{url}", api_key_env = "VIVA_TEST_REMOTE_KEY" }}
"#,
            data = dir.path().join("var").display(),
            remote = remote.display(),
            url = server.url(),
        ),
    )
    .expect("config");
    let doctor = |extra: &[&str]| {
        let mut cmd = Command::new(viva_tests::viva_bin());
        process::clean_viva_env(&mut cmd)
            .arg("--config")
            .arg(&config)
            .args(["doctor", "--json"])
            .args(extra);
        let o = process::output(&mut cmd, process::SHORT).unwrap_or_else(|e| panic!("{e}"));
        let report: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}):\n{}", process::text(&o)));
        let check = |name: &str| {
            report["checks"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == name))
                .cloned()
                .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
        };
        (check("worker:a"), check("worker:b"))
    };
    let (a, b) = doctor(&[]);
    assert_eq!(b["status"], "ok", "{b}");
    assert!(
        b["summary"]
            .as_str()
            .is_some_and(|s| s.contains("answered the handshake")),
        "{b}"
    );
    assert_eq!(a["status"], "fail", "{a}");
    assert!(
        a["summary"]
            .as_str()
            .is_some_and(|s| s.contains("could not be reached")),
        "{a}"
    );
    assert!(!a.to_string().contains("SECRET") && !b.to_string().contains("SECRET"));
    let (a, b) = doctor(&["--no-load"]);
    for c in [a, b] {
        assert_eq!(c["status"], "ok", "{c}");
        assert!(
            c["summary"]
                .as_str()
                .is_some_and(|s| s.contains("a remote worker")),
            "{c}"
        );
    }
}

// ---- real servers ---------------------------------------------------------------

/// `$VIVA_CACHE`, else `~/.cache/viva` (where scripts/lib.sh keeps its venvs).
fn cache_dir() -> PathBuf {
    std::env::var_os("VIVA_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/viva")
        })
}

/// The venv of `ensure_remote_servers`, or `None` (and a loud message)
/// when it is missing and not required.
fn remote_python() -> Option<PathBuf> {
    let required = std::env::var("VIVA_REQUIRE_REMOTE").is_ok_and(|v| v == "1");
    let python = std::env::var_os("VIVA_REMOTE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("remote-venv/bin/python"));
    let python = Some(python).filter(|p| p.exists());
    if python.is_none() {
        let msg = "SKIPPED: the OpenAI-compatible test servers are not installed (no \
                   VIVA_REMOTE_PYTHON, no $VIVA_CACHE/remote-venv): run \
                   `source scripts/lib.sh && ensure_remote_servers` (scripts/test does)";
        assert!(!required, "VIVA_REQUIRE_REMOTE=1 but {msg}");
        eprintln!("\n*** {msg} ***\n");
    }
    python
}

/// A server started from the venv (`sh -c 'exec … 2>&1'`, so its log and
/// uvicorn's ready line come on stdout), until it announces its address.
fn start_server(name: &str, python: &Path, args: &[String]) -> (process::Background, String) {
    let mut line = format!("exec '{}'", python.display());
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    line.push_str(" 2>&1");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line]);
    let (bg, url) = process::Background::start(&mut cmd, Duration::from_secs(180), |l| {
        l.split("Uvicorn running on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(|u| format!("{}/v1", u.trim_end_matches('/')))
    })
    .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
    (bg, url)
}

#[test]
fn real_openai_compatible_servers_transcribe_and_evaluate() {
    let Some(python) = remote_python() else {
        return;
    };
    let ct2 = std::env::var_os("VIVA_REMOTE_CT2_WHISPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("ct2-whisper-tiny.en"));
    assert!(
        ct2.join("model.bin").is_file(),
        "{} has no model.bin: run `source scripts/lib.sh && ensure_remote_servers`",
        ct2.display()
    );
    let ct2 = ct2.display().to_string();
    let gguf = model(EVALUATOR_A_MODEL);
    let (whisper_server, whisper_url) = start_server(
        "faster-whisper-server",
        &python,
        &[
            "-m".into(),
            "faster_whisper_server".into(),
            ct2,
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
        ],
    );
    let (llama_server, llama_url) = start_server(
        "llama-cpp-python server",
        &python,
        &[
            "-m".into(),
            "llama_cpp.server".into(),
            "--model".into(),
            gguf.display().to_string(),
            "--model_alias".into(),
            "smollm2".into(),
            "--n_ctx".into(),
            "4096".into(),
            "--n_threads".into(),
            "2".into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
        ],
    );

    // Speech to text: espeak-ng's voice through Whisper tiny.en.
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = viva_tests::speech(
        dir.path(),
        "answer.wav",
        "Photosynthesis turns light into sugar in the leaves of plants.",
        "en-us",
    );
    let (mut stt, loaded) = Worker::start(
        &["--kind", "stt"],
        &[],
        "whisper-tiny.en-ct2",
        json!({"url": whisper_url, "model": "whisper-1", "timeout": "120s"}),
    );
    assert!(matches!(loaded, WorkerMessage::Loaded { .. }), "{loaded:?}");
    let t0 = Instant::now();
    let transcript = match stt.call(
        "stt-1",
        JobPayload::Transcribe(TranscribeRequest {
            wav_path: wav.display().to_string(),
            audio_seconds: 4.0,
            language: Some("en".into()),
            initial_prompt: Some("photosynthesis".into()),
        }),
        Duration::from_secs(180),
    ) {
        WorkerMessage::Result {
            result: JobResult::Transcript(t),
            ..
        } => t,
        other => panic!(
            "expected a transcript, got {other:?}\n{}",
            whisper_server.log()
        ),
    };
    let stt_seconds = t0.elapsed().as_secs_f64();
    let text = transcript.text.to_lowercase();
    assert!(
        text.contains("light") || text.contains("sugar"),
        "{transcript:?}"
    );
    assert!(!transcript.segments.is_empty());
    assert_eq!(transcript.language.as_deref(), Some("en"));
    let stt_health = stt.health.clone().expect("health");
    assert!(
        stt_health.ok && stt_health.latency_p50_ms.is_some(),
        "{stt_health:?}"
    );
    stt.stop();

    // Evaluation, constrained by the rubric's schema, then by its grammar.
    let mut seconds = Vec::new();
    for constraint in ["json_object", "grammar"] {
        let (mut ev, loaded) = Worker::start(
            &["--role", "a"],
            &[],
            "smollm2-remote",
            json!({"url": llama_url, "model": "smollm2", "constraint": constraint,
                   "timeout": "300s", "evidence_chars": 80, "rationale_chars": 80,
                   "concurrency": 1}),
        );
        assert!(matches!(loaded, WorkerMessage::Loaded { .. }), "{loaded:?}");
        let t0 = Instant::now();
        let answer = ev.call(
            "eval-1",
            JobPayload::Evaluate(EvaluateRequest {
                items: vec![item("s1", &transcript.text)],
            }),
            Duration::from_secs(400),
        );
        seconds.push((constraint, t0.elapsed().as_secs_f64()));
        let out = outcomes(answer);
        let e = out["s1"].evaluation.clone().unwrap_or_else(|| {
            panic!(
                "{constraint}: {:?}\n{}",
                out["s1"].error,
                llama_server.log()
            )
        });
        // The answer went through the local worker's parser: every
        // criterion in order, each with one of its levels.
        let ids: Vec<&str> = e.ratings.iter().map(|r| r.criterion_id.as_str()).collect();
        assert_eq!(ids, ["content", "clarity"], "{constraint}");
        for (r, c) in e.ratings.iter().zip(&rubric().criteria) {
            assert!(
                c.levels.iter().any(|l| l.label == r.level),
                "{constraint}: {r:?}"
            );
        }
        assert!(e.generated_tokens > 0 && e.prompt_tokens > 0, "{e:?}");
        ev.stop();
    }
    eprintln!(
        "real servers: transcription {stt_seconds:.1} s (first request loads the model); \
         evaluation {}",
        seconds
            .iter()
            .map(|(c, s)| format!("{c} {s:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

// ---- the documented configurations ---------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ```toml blocks of a Markdown file that configure a remote worker.
fn remote_blocks(text: &str) -> Vec<String> {
    text.split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .filter(|b| b.contains("viva-remote-worker"))
        .map(|b| format!("{b}\n"))
        .collect()
}

/// Every remote worker of `config` passes the worker's own option check,
/// run as the daemon would start it; returns their URLs.
fn check_remote_workers(config: &viva_daemon::Config, what: &str) -> Vec<String> {
    let mut workers: Vec<(Option<&str>, &viva_daemon::config::WorkerConfig)> =
        config.workers.stt.iter().map(|w| (None, w)).collect();
    workers.extend(
        config
            .workers
            .evaluators
            .iter()
            .map(|(r, w)| (Some(r.as_str()), w)),
    );
    let mut urls = Vec::new();
    for (role, w) in workers {
        if !w.command.ends_with("viva-remote-worker") {
            continue;
        }
        let mut args = w.args.clone();
        if let Some(role) = role
            && !args.iter().any(|a| a == "--role")
        {
            args.extend(["--role".to_owned(), role.to_owned()]);
        }
        let options = serde_json::to_string(&w.options).expect("options");
        let mut cmd = Command::new(worker_bin("viva-remote-worker"));
        cmd.args(&args).args(["--check-options", &options]);
        let out = process::output(&mut cmd, process::SHORT).expect("run --check-options");
        assert!(
            out.status.success(),
            "{what}: {role:?}'s options are refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resolved: Value = serde_json::from_slice(&out.stdout).expect("resolved options");
        urls.push(resolved["url"].as_str().unwrap_or_default().to_owned());
    }
    urls
}

#[test]
fn documented_remote_configurations_parse_and_their_options_pass_the_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = Vec::new();
    for doc in ["docs/deploy.md", "viva.example.toml"] {
        let text = std::fs::read_to_string(repo().join(doc)).expect(doc);
        let blocks = if doc.ends_with(".toml") {
            // The example file keeps its remote examples commented out:
            // uncommented, each must parse on its own.
            remote_examples_of_the_example_file(&text)
        } else {
            remote_blocks(&text)
        };
        assert!(!blocks.is_empty(), "{doc} shows no remote worker");
        for block in blocks {
            let file = dir.path().join("viva.toml");
            std::fs::write(&file, &block).expect("write");
            let config = viva_daemon::Config::load(Some(&file), std::iter::empty(), &[])
                .unwrap_or_else(|e| panic!("{doc}: a remote example does not parse: {e}\n{block}"));
            servers.extend(check_remote_workers(&config, doc));
        }
    }
    for (name, port) in [
        ("vLLM", ":8000/v1"),
        ("llama.cpp", ":8080/v1"),
        ("Ollama", ":11434/v1"),
    ] {
        assert!(
            servers.iter().any(|u| u.ends_with(port)),
            "no {name} example ({port}) among {servers:?}"
        );
    }
}

/// The commented `# [workers…]` examples of viva.example.toml between the
/// `# remote-example:` markers, uncommented.
fn remote_examples_of_the_example_file(text: &str) -> Vec<String> {
    text.split("# remote-example:")
        .skip(1)
        .map(|part| {
            part.lines()
                .skip(1)
                .take_while(|l| l.starts_with('#') && !l.starts_with("# end-remote-example"))
                .map(|l| {
                    l.strip_prefix("# ")
                        .or_else(|| l.strip_prefix('#'))
                        .unwrap_or(l)
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        })
        .collect()
}
