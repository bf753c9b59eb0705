//! A protocol-correct test double of a Viva model worker.
//!
//! It speaks the worker protocol of `viva_models::protocol` exactly like the
//! real Whisper and llama workers, but "transcribes" and "evaluates" by
//! sleeping and returning canned results, so scheduler and end-to-end tests
//! can run without models.
//!
//! Arguments: `--kind stt|evaluator`, `--role NAME` (evaluators),
//! `--max-parallel N` (default 1; with N > 1 jobs run on threads).
//!
//! Environment:
//!
//! - `FAKE_LOG=/path`: one JSON line per event, appended with `O_APPEND` in a
//!   single write: `{"ev","pid","kind","role","job","items","t_ms"}` where
//!   `ev` is `start`, `loaded`, `job_start`, `job_end` or `exit`; `job` and
//!   `items` (batch size of an evaluator job) are null where they do not
//!   apply; `t_ms` is Unix time in milliseconds. `job_end` also has
//!   `"ok": true|false`. Before each `job_start` a `request` line has
//!   `"request"`: what the job asked for (STT: `wav_path`, `language`,
//!   `initial_prompt`; evaluator: each item's `submission_id` and
//!   `language`), so tests check what the daemon sent. A fake transcript's
//!   language is the requested one (else "en"), and its one segment's
//!   words have probability 0.95 except "transcript", 0.35 (unsure).
//! - `FAKE_LOAD_MS`: time to "load the model"; `FAKE_LOAD_GATE=/path`: keep
//!   loading until that file exists. `FAKE_LOAD_FAIL`: when set
//!   and not empty, loading fails with an `Error` frame and the worker exits 1.
//!   So does a model file (`model.path`) that is missing or whose contents
//!   begin with `CORRUPT` (a broken model file: `/dev/null`, the default,
//!   loads).
//! - `FAKE_STT_FIXED_MS` + `FAKE_STT_MS_PER_AUDIO_SEC` × audio seconds: the
//!   duration of a transcription. `FAKE_EVAL_FIXED_MS` +
//!   `FAKE_EVAL_MS_PER_ITEM` × items: the duration of an evaluation.
//!   All default to 0 and may be fractional.
//! - Failure injection by the WAV path: `fail-always` → job error
//!   `fake_failure` (retryable); `crash-once` → abort mid-job unless
//!   `<wav_path>.crashed` exists (which the crash creates); `crash-always` →
//!   abort mid-job; `hang` → never answer.
//! - `FAKE_DB=/path/viva.db` (or a `postgres://` URL): the daemon stores every normalised WAV as
//!   `<media>/<submission>/audio.wav`, so the upload's name is not in the
//!   path. With `FAKE_DB` set, the worker looks up the submission's
//!   `original_name` by `wav_path` (read-only) and matches the markers above
//!   against it too; the transcript then reads "fake transcript of <original
//!   name without extension>", so a transcript marker such as `EVAL_FAIL` can
//!   be planted through an upload's file name.
//! - Evaluator items whose transcript contains `EVAL_FAIL` get an outcome
//!   with an error; `EVAL_CRASH_ONCE` aborts the worker unless
//!   `$FAKE_MARKER_DIR/<submission_id>.crashed` exists (the crash creates it;
//!   `FAKE_MARKER_DIR` defaults to the temporary directory).
//! - Junk evaluations, as small models really write them under the grammar:
//!   items whose transcript contains `EVAL_JUNK`, and every item of the
//!   roles listed in `FAKE_EVAL_JUNK` (comma-separated, e.g. `a`), get an
//!   evaluation whose evidence and rationale are "1", "none",
//!   "1.1.1.1.…" up to 200 characters and a paraphrase that is not in the
//!   transcript, by criterion (the levels are the usual ones).
//!
//! - `FAKE_DEVICE_MEMORY_MB` (and `FAKE_DEVICE_TOTAL_MB`): report that much
//!   GPU memory held (`Memory` frames) after loading and after each job, as
//!   a real worker on a GPU does.
//! - `FAKE_REMOTE=1`: say `remote: true` in Hello, as `viva-remote-worker`
//!   does (its model is on an HTTP server; the scheduler keeps the role
//!   loaded in every phase), and report a simulated server's health
//!   (`Remote` frames) after loading and after each job.
//!
//! The worker exits 0 on `Shutdown` (after `Bye`) and when its stdin closes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use viva_models::protocol::{FrameWriter, exit_with_parent, take_stdio};
use viva_models::{
    CriterionRating, DaemonMessage, EvaluateItem, EvaluateRequest, EvaluateResponse, Evaluation,
    EvaluationOutcome, JobPayload, JobResult, PROTOCOL_VERSION, Segment, TranscribeRequest,
    Transcript, WorkerKind, WorkerMessage,
};

const PROGRAM: &str = concat!("fake-worker ", env!("CARGO_PKG_VERSION"));

struct Args {
    kind: WorkerKind,
    role: Option<String>,
    max_parallel: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut kind = None;
    let mut role = None;
    let mut max_parallel = 1u32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().with_context(|| format!("{name} needs a value")),
            }
        };
        match name.as_str() {
            "--kind" => {
                kind = Some(match value()?.as_str() {
                    "stt" => WorkerKind::Stt,
                    "evaluator" => WorkerKind::Evaluator,
                    other => bail!("unknown --kind {other:?} (stt or evaluator)"),
                })
            }
            "--role" => role = Some(value()?),
            "--max-parallel" => {
                let v = value()?;
                max_parallel = v
                    .parse::<u32>()
                    .with_context(|| format!("--max-parallel {v:?} is not a number"))?
                    .max(1);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let kind = kind.context("--kind stt|evaluator is required")?;
    Ok(Args {
        kind,
        role,
        max_parallel,
    })
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn env_ms(name: &str) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(0.0)
}

fn sleep_ms(ms: f64) {
    if ms > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(ms / 1000.0));
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Worker {
    kind: WorkerKind,
    role: Option<String>,
    pid: u32,
    model: String,
    log: Option<File>,
    writer: Mutex<FrameWriter<File>>,
}

impl Worker {
    fn log(&self, ev: &str, job: Option<&str>, items: Option<usize>, ok: Option<bool>) {
        let mut line = serde_json::json!({
            "ev": ev,
            "pid": self.pid,
            "kind": self.kind.as_str(),
            "role": self.role,
            "job": job,
            "items": items,
            "t_ms": now_unix_ms(),
        });
        if let (Some(ok), Some(obj)) = (ok, line.as_object_mut()) {
            obj.insert("ok".into(), ok.into());
        }
        self.log_line(line);
    }

    fn log_line(&self, line: serde_json::Value) {
        let Some(file) = &self.log else { return };
        let mut buf = line.to_string().into_bytes();
        buf.push(b'\n');
        // One write on an O_APPEND descriptor: lines of concurrent workers
        // never interleave.
        if let Err(e) = (&*file).write_all(&buf) {
            eprintln!("fake-worker: cannot write FAKE_LOG: {e}");
        }
    }

    /// The `request` line: what a job asked for.
    fn log_request(&self, job: &str, request: serde_json::Value) {
        let Some(file) = &self.log else { return };
        let line = serde_json::json!({
            "ev": "request",
            "pid": self.pid,
            "kind": self.kind.as_str(),
            "role": self.role,
            "job": job,
            "request": request,
            "t_ms": now_unix_ms(),
        });
        let mut buf = line.to_string().into_bytes();
        buf.push(b'\n');
        if let Err(e) = (&*file).write_all(&buf) {
            eprintln!("fake-worker: cannot write FAKE_LOG: {e}");
        }
    }

    fn send(&self, msg: &WorkerMessage) {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writer.send(msg) {
            // The daemon is gone: nobody to answer to.
            eprintln!("fake-worker: cannot write to the daemon: {e}");
            std::process::exit(1);
        }
    }

    fn exit(&self, code: i32) -> ! {
        self.log("exit", None, None, None);
        std::process::exit(code)
    }

    fn run_job(&self, job_id: &str, payload: JobPayload) {
        let answer = match (self.kind, payload) {
            (WorkerKind::Stt, JobPayload::Transcribe(req)) => self.transcribe(job_id, &req),
            (WorkerKind::Evaluator, JobPayload::Evaluate(req)) => self.evaluate(job_id, &req),
            (kind, _) => WorkerMessage::Error {
                job_id: Some(job_id.to_string()),
                code: "wrong_kind".into(),
                message: format!("this is a {} worker", kind.as_str()),
                retryable: false,
            },
        };
        self.send(&answer);
        self.report_memory();
    }

    /// `FAKE_DEVICE_MEMORY_MB`: the GPU memory a real worker on a GPU
    /// reports after loading and after each call (`Memory`), of a device of
    /// `FAKE_DEVICE_TOTAL_MB` (default 81 559, an H100) that it holds alone.
    fn report_memory(&self) {
        if env_flag("FAKE_REMOTE") {
            // As viva-remote-worker reports its server, after the load and
            // after each call.
            static REPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = REPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            self.send(&WorkerMessage::Remote {
                health: viva_models::protocol::RemoteHealth {
                    url: "http://fake-server.invalid/v1".into(),
                    model: self.model.clone(),
                    ok: true,
                    last_success_unix_ms: Some(now_unix_ms()),
                    last_failure_unix_ms: None,
                    last_error: None,
                    latency_p50_ms: Some(42),
                    latency_p95_ms: Some(80),
                    requests: n,
                    failures: 0,
                    concurrency: 4,
                },
            });
        }
        let mb = env_ms("FAKE_DEVICE_MEMORY_MB");
        if mb <= 0.0 {
            return;
        }
        let total = match env_ms("FAKE_DEVICE_TOTAL_MB") {
            t if t > 0.0 => t,
            _ => 81_559.0,
        };
        let mib = |v: f64| (v * 1024.0 * 1024.0) as u64;
        self.send(&WorkerMessage::Memory {
            device: viva_models::device::DeviceMemory {
                device: "simulated GPU (fake-worker)".into(),
                index: 0,
                process_bytes: mib(mb),
                free_bytes: mib((total - mb).max(0.0)),
                total_bytes: mib(total),
            },
        });
    }

    fn progress(&self, job_id: &str, done: u64, total: u64) {
        self.send(&WorkerMessage::Progress {
            job_id: job_id.to_string(),
            done,
            total,
            message: None,
        });
    }

    fn transcribe(&self, job_id: &str, req: &TranscribeRequest) -> WorkerMessage {
        self.log_request(
            job_id,
            serde_json::json!({
                "wav_path": req.wav_path,
                "language": req.language,
                "initial_prompt": req.initial_prompt,
            }),
        );
        self.log("job_start", Some(job_id), None, None);
        let started = Instant::now();
        let duration = env_ms("FAKE_STT_FIXED_MS")
            + env_ms("FAKE_STT_MS_PER_AUDIO_SEC") * req.audio_seconds.max(0.0);
        let path = req.wav_path.as_str();
        let original = original_name(path);
        let marked = |marker: &str| {
            path.contains(marker) || original.as_deref().is_some_and(|o| o.contains(marker))
        };
        if marked("hang") {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if marked("crash-always") {
            crash_mid_job(duration, None);
        }
        if marked("crash-once") {
            let marker = PathBuf::from(format!("{path}.crashed"));
            if !marker.exists() {
                crash_mid_job(duration, Some(&marker));
            }
        }
        self.progress(job_id, 0, 1);
        sleep_ms(duration);
        if marked("fail-always") {
            self.log("job_end", Some(job_id), None, Some(false));
            return WorkerMessage::Error {
                job_id: Some(job_id.to_string()),
                code: "fake_failure".into(),
                message: format!("fake failure injected for {path}"),
                retryable: true,
            };
        }
        self.progress(job_id, 1, 1);
        let stem = Path::new(original.as_deref().unwrap_or(path))
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = format!("fake transcript of {stem}");
        // Whisper-like words: "transcript" is the one it was unsure of.
        let words = text
            .split(' ')
            .enumerate()
            .map(|(i, w)| viva_models::Word {
                text: if i == 0 {
                    w.to_owned()
                } else {
                    format!(" {w}")
                },
                p: if w == "transcript" { 0.35 } else { 0.95 },
            })
            .collect();
        let end_ms = (req.audio_seconds.max(0.0) * 1000.0).round() as u64;
        let transcript = Transcript {
            text: text.clone(),
            language: Some(req.language.clone().unwrap_or_else(|| "en".into())),
            segments: vec![Segment {
                start_ms: 0,
                end_ms,
                text,
                avg_logprob: -0.25,
                no_speech_prob: 0.01,
                low_confidence: false,
                words,
            }],
            audio_seconds: req.audio_seconds,
            processing_seconds: started.elapsed().as_secs_f64(),
            model: self.model.clone(),
        };
        self.log("job_end", Some(job_id), None, Some(true));
        WorkerMessage::Result {
            job_id: job_id.to_string(),
            result: JobResult::Transcript(transcript),
        }
    }

    fn evaluate(&self, job_id: &str, req: &EvaluateRequest) -> WorkerMessage {
        let n = req.items.len();
        let items: Vec<serde_json::Value> = req
            .items
            .iter()
            .map(|i| serde_json::json!({"submission_id": i.submission_id, "language": i.language}))
            .collect();
        self.log_request(job_id, serde_json::json!({ "items": items }));
        self.log("job_start", Some(job_id), Some(n), None);
        let per_item = env_ms("FAKE_EVAL_MS_PER_ITEM");
        sleep_ms(env_ms("FAKE_EVAL_FIXED_MS"));
        let mut outcomes = Vec::with_capacity(n);
        for (i, item) in req.items.iter().enumerate() {
            if !item.exemplars.is_empty() {
                // What the daemon sent as the instructor's examples, for
                // tests of what an evaluator sees.
                self.log_line(serde_json::json!({
                    "ev": "exemplars", "role": self.role, "submission": item.submission_id,
                    "exemplars": item.exemplars, "t_ms": now_unix_ms(),
                }));
            }
            if item.transcript.contains("EVAL_CRASH_ONCE") {
                let marker = marker_dir().join(format!(
                    "{}.crashed",
                    sanitize_file_name(&item.submission_id)
                ));
                if !marker.exists() {
                    crash_mid_job(per_item, Some(&marker));
                }
            }
            let started = Instant::now();
            sleep_ms(per_item);
            outcomes.push(if item.transcript.contains("EVAL_FAIL") {
                EvaluationOutcome {
                    submission_id: item.submission_id.clone(),
                    evaluation: None,
                    error: Some("fake evaluation failure (EVAL_FAIL)".into()),
                }
            } else {
                EvaluationOutcome {
                    submission_id: item.submission_id.clone(),
                    evaluation: Some(self.evaluation(item, started.elapsed())),
                    error: None,
                }
            });
            self.progress(job_id, i as u64 + 1, n as u64);
        }
        self.log("job_end", Some(job_id), Some(n), Some(true));
        WorkerMessage::Result {
            job_id: job_id.to_string(),
            result: JobResult::Evaluations(EvaluateResponse { outcomes }),
        }
    }

    fn evaluation(&self, item: &EvaluateItem, took: Duration) -> Evaluation {
        let role = self.role.clone().unwrap_or_else(|| "fake".into());
        let evidence: String = item.transcript.chars().take(60).collect();
        let junk = item.transcript.contains("EVAL_JUNK")
            || std::env::var("FAKE_EVAL_JUNK")
                .unwrap_or_default()
                .split(',')
                .any(|r| r.trim() == role);
        let dots: String = "1.".repeat(100);
        let ratings = item
            .rubric
            .criteria
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let level = c.levels.get(c.levels.len() / 2)?;
                let (evidence, rationale) = match (junk, i % 3) {
                    (false, _) => (evidence.clone(), format!("fake evaluator {role}")),
                    (true, 0) => ("1".to_owned(), "1".to_owned()),
                    (true, 1) => ("none".to_owned(), dots.clone()),
                    (true, _) => (
                        "the student explains photosynthesis clearly".to_owned(),
                        "none".to_owned(),
                    ),
                };
                Some(CriterionRating {
                    criterion_id: c.id.clone(),
                    evidence,
                    rationale,
                    level: level.label.clone(),
                })
            })
            .collect::<Vec<_>>();
        let generated_tokens = 40 * ratings.len() as u64;
        Evaluation {
            role,
            model: self.model.clone(),
            ratings,
            flags: Vec::new(),
            prompt_tokens: (item.transcript.len() + item.assignment_prompt.len()) as u64 / 4 + 200,
            generated_tokens,
            seconds: took.as_secs_f64(),
        }
    }
}

/// The upload's file name of the submission whose WAV this is, from the
/// daemon's database at `$FAKE_DB` (unset, or not found: `None`).
fn original_name(wav_path: &str) -> Option<String> {
    let db = std::env::var_os("FAKE_DB").filter(|p| !p.is_empty())?;
    if let Some(url) = db.to_str().filter(|d| d.starts_with("postgres://")) {
        let found = postgres::Client::connect(url, postgres::NoTls).and_then(|mut c| {
            c.query_opt(
                "SELECT original_name FROM submissions WHERE wav_path = $1",
                &[&wav_path],
            )
        });
        return match found {
            Ok(row) => row
                .and_then(|r| r.get::<_, Option<String>>(0))
                .filter(|n| !n.is_empty()),
            Err(e) => {
                eprintln!("fake-worker: cannot look up {wav_path} in FAKE_DB: {e}");
                None
            }
        };
    }
    let lookup = || -> rusqlite::Result<Option<String>> {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut stmt = conn.prepare("SELECT original_name FROM submissions WHERE wav_path = ?1")?;
        let mut rows = stmt.query([wav_path])?;
        match rows.next()? {
            Some(row) => row.get(0),
            None => Ok(None),
        }
    };
    match lookup() {
        Ok(name) => name.filter(|n| !n.is_empty()),
        Err(e) => {
            eprintln!("fake-worker: cannot look up {wav_path} in FAKE_DB: {e}");
            None
        }
    }
}

fn marker_dir() -> PathBuf {
    std::env::var_os("FAKE_MARKER_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn sanitize_file_name(s: &str) -> String {
    s.chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect()
}

/// Works for half the job's time, then aborts (leaving `marker` behind).
fn crash_mid_job(duration_ms: f64, marker: Option<&Path>) -> ! {
    if let Some(marker) = marker
        && let Err(e) = File::create(marker)
    {
        eprintln!(
            "fake-worker: cannot create crash marker {}: {e}",
            marker.display()
        );
    }
    sleep_ms(duration_ms / 2.0);
    eprintln!("fake-worker: crashing on purpose");
    std::process::abort()
}

fn main() {
    exit_with_parent();
    if let Err(e) = run() {
        eprintln!("fake-worker: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (mut reader, writer) = take_stdio().context("taking stdio")?;
    let log = match std::env::var_os("FAKE_LOG").filter(|p| !p.is_empty()) {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening FAKE_LOG {}", Path::new(&path).display()))?,
        ),
        None => None,
    };
    let mut worker = Worker {
        kind: args.kind,
        role: args.role,
        pid: std::process::id(),
        model: String::new(),
        log,
        writer: Mutex::new(writer),
    };
    worker.log("start", None, None, None);
    worker.send(&WorkerMessage::Hello {
        protocol: PROTOCOL_VERSION,
        kind: args.kind,
        worker: PROGRAM.into(),
        pid: worker.pid,
        max_parallel_jobs: args.max_parallel,
        // FAKE_REMOTE=1: claim to be a remote worker (its model on an HTTP
        // server), which the scheduler keeps loaded in every phase.
        remote: env_flag("FAKE_REMOTE"),
    });

    match reader.read::<DaemonMessage>()? {
        Some(DaemonMessage::Hello { protocol, .. }) if protocol == PROTOCOL_VERSION => {}
        Some(DaemonMessage::Hello { protocol, .. }) => {
            worker.send(&WorkerMessage::Error {
                job_id: None,
                code: "protocol_mismatch".into(),
                message: format!(
                    "the daemon speaks protocol {protocol}, this worker speaks {PROTOCOL_VERSION}"
                ),
                retryable: false,
            });
            worker.exit(1);
        }
        Some(DaemonMessage::Shutdown) => shutdown(&worker),
        None => worker.exit(0),
        Some(other) => bail!("expected hello from the daemon, got {other:?}"),
    }

    let model = match reader.read::<DaemonMessage>()? {
        Some(DaemonMessage::Load { model }) => model,
        Some(DaemonMessage::Shutdown) => shutdown(&worker),
        None => worker.exit(0),
        Some(other) => bail!("expected load from the daemon, got {other:?}"),
    };
    let started = Instant::now();
    sleep_ms(env_ms("FAKE_LOAD_MS"));
    // FAKE_LOAD_GATE: hold "loading" until the test creates this file, so a
    // test can line uploads up before any of them runs.
    if let Some(gate) = std::env::var_os("FAKE_LOAD_GATE") {
        while !Path::new(&gate).exists() {
            sleep_ms(20.0);
        }
    }
    let corrupt = match std::fs::read(&model.path) {
        Ok(bytes) => bytes.starts_with(b"CORRUPT"),
        Err(_) => true,
    };
    if corrupt {
        worker.send(&WorkerMessage::Error {
            job_id: None,
            code: "model_load_failed".into(),
            message: format!("cannot load {}: not a valid model file", model.path),
            retryable: false,
        });
        worker.exit(1);
    }
    if std::env::var_os("FAKE_LOAD_FAIL").is_some_and(|v| !v.is_empty()) {
        worker.send(&WorkerMessage::Error {
            job_id: None,
            code: "fake_load_failure".into(),
            message: format!("cannot load {} (FAKE_LOAD_FAIL)", model.path),
            retryable: false,
        });
        worker.exit(1);
    }
    worker.model = model.name.clone();
    worker.log("loaded", None, None, None);
    worker.send(&WorkerMessage::Loaded {
        model: model.name,
        load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        memory_bytes: None,
        max_parallel_jobs: None,
    });
    worker.report_memory();

    let worker = Arc::new(worker);
    loop {
        match reader.read::<DaemonMessage>() {
            Ok(Some(DaemonMessage::Job { job_id, payload })) => {
                if args.max_parallel > 1 {
                    let w = worker.clone();
                    std::thread::Builder::new()
                        .name(format!("job-{job_id}"))
                        .spawn(move || w.run_job(&job_id, payload))
                        .context("spawning a job thread")?;
                } else {
                    worker.run_job(&job_id, payload);
                }
            }
            Ok(Some(DaemonMessage::Shutdown)) => shutdown(&worker),
            Ok(Some(other)) => worker.send(&WorkerMessage::Error {
                job_id: None,
                code: "unexpected_message".into(),
                message: format!("unexpected message from the daemon: {other:?}"),
                retryable: false,
            }),
            Ok(None) => worker.exit(0),
            Err(viva_models::Error::Io(e)) => {
                eprintln!("fake-worker: cannot read from the daemon: {e}");
                worker.exit(1);
            }
            Err(e) => {
                eprintln!("fake-worker: bad frame from the daemon: {e}");
                worker.send(&WorkerMessage::Error {
                    job_id: None,
                    code: "bad_frame".into(),
                    message: e.to_string(),
                    retryable: false,
                });
            }
        }
    }
}

fn shutdown(worker: &Worker) -> ! {
    worker.send(&WorkerMessage::Bye);
    worker.exit(0)
}
