//! The worker process: the protocol of [`viva_models::protocol`] around an
//! [`Engine`].
//!
//! A reader thread owns stdin and forwards frames to the main thread, which
//! runs one job at a time (`max_parallel_jobs` 1: a call already decodes its
//! items together), all in one [`Session`], so the context and its KV cache
//! are kept from job to job. A `Shutdown` frame or the end of stdin also
//! raises a cancel flag, so a running job stops at its next decoding step
//! and the process exits promptly instead of finishing a long batch nobody
//! waits for.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use viva_models::protocol::{
    FrameReader, FrameWriter, Incoming, exit_with_parent, read_daemon_frames, take_stdio,
};
use viva_models::{
    DaemonMessage, EvaluateResponse, JobPayload, JobResult, PROTOCOL_VERSION, WorkerKind,
    WorkerMessage,
};

use crate::Error;
use crate::engine::{Engine, EngineOptions, Session};

const PROGRAM: &str = concat!("viva-llama-worker ", env!("CARGO_PKG_VERSION"));

const USAGE: &str = "usage: viva-llama-worker [--role NAME] [--check-options JSON]";

/// Command-line arguments: `--role NAME` (the daemon adds it; default
/// "evaluator"), and `--check-options JSON`, which only checks an `options`
/// object (as the daemon would send it) and exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub role: String,
    pub check_options: Option<String>,
}

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            role: "evaluator".to_owned(),
            check_options: None,
        };
        let mut flags = viva_models::flags::Flags::new(args, USAGE);
        while let Some((name, inline)) = flags.next_flag() {
            let mut value = || flags.value(&name, inline.clone());
            match name.as_str() {
                "--role" => parsed.role = value()?,
                "--check-options" => parsed.check_options = Some(value()?),
                "--help" | "-h" => {
                    return Err(format!(
                        "{PROGRAM}: Viva evaluator worker (llama.cpp). Started by the daemon; \
                         speaks JSON lines on stdin/stdout.\n{USAGE}\n--check-options checks \
                         an options object (JSON) and prints it with every default filled in"
                    ));
                }
                _ => return Err(format!("unknown argument {name:?}; {USAGE}")),
            }
        }
        Ok(parsed)
    }
}

/// `--check-options JSON`: the options with every default filled in (one
/// JSON line), or why the worker would refuse them.
pub fn check_options(json: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("--check-options takes a JSON object: {e}"))?;
    let options = EngineOptions::from_json(&value).map_err(|e| e.to_string())?;
    serde_json::to_string(&options).map_err(|e| e.to_string())
}

struct Out {
    writer: FrameWriter<File>,
}

impl Out {
    fn send(&mut self, msg: &WorkerMessage) {
        if let Err(e) = self.writer.send(msg) {
            // The daemon is gone: nobody to answer to.
            eprintln!("viva-llama-worker: cannot write to the daemon: {e}");
            std::process::exit(1);
        }
    }

    fn fail(&mut self, job_id: Option<String>, code: &str, message: String, retryable: bool) {
        self.send(&WorkerMessage::Error {
            job_id,
            code: code.into(),
            message,
            retryable,
        });
    }
}

fn spawn_reader(reader: FrameReader<File>, cancel: Arc<AtomicBool>) -> mpsc::Receiver<Incoming> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("protocol-reader".into())
        .spawn(move || {
            read_daemon_frames(reader, |incoming| {
                if matches!(
                    incoming,
                    Incoming::Closed | Incoming::Frame(DaemonMessage::Shutdown)
                ) {
                    cancel.store(true, Ordering::Relaxed);
                }
                tx.send(incoming).is_ok()
            })
        });
    if let Err(e) = spawned {
        eprintln!("viva-llama-worker: cannot start the reader thread: {e}");
        std::process::exit(1);
    }
    rx
}

/// Runs the worker until `Shutdown` or the end of stdin; returns the exit
/// code.
pub fn main() -> i32 {
    exit_with_parent();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    if let Some(json) = &args.check_options {
        return match check_options(json) {
            Ok(resolved) => {
                println!("{resolved}");
                0
            }
            Err(e) => {
                eprintln!("viva-llama-worker: {e}");
                2
            }
        };
    }
    init_logs();
    let (reader, writer) = match take_stdio() {
        Ok(io) => io,
        Err(e) => {
            eprintln!("viva-llama-worker: cannot take stdio: {e}");
            return 1;
        }
    };
    let mut out = Out { writer };
    let cancel = Arc::new(AtomicBool::new(false));
    let rx = spawn_reader(reader, cancel.clone());
    out.send(&WorkerMessage::Hello {
        protocol: PROTOCOL_VERSION,
        kind: WorkerKind::Evaluator,
        worker: PROGRAM.into(),
        pid: std::process::id(),
        max_parallel_jobs: 1,
        remote: false,
    });

    match rx.recv() {
        Ok(Incoming::Frame(DaemonMessage::Hello { protocol, .. }))
            if protocol == PROTOCOL_VERSION => {}
        Ok(Incoming::Frame(DaemonMessage::Hello { protocol, .. })) => {
            out.fail(
                None,
                "protocol_mismatch",
                format!(
                    "the daemon speaks protocol {protocol}, this worker speaks {PROTOCOL_VERSION}"
                ),
                false,
            );
            return 1;
        }
        Ok(Incoming::Frame(DaemonMessage::Shutdown)) => return bye(&mut out),
        Ok(Incoming::Closed) | Err(_) => return 0,
        Ok(Incoming::Frame(other)) => {
            eprintln!("viva-llama-worker: expected hello from the daemon, got {other:?}");
            return 1;
        }
        Ok(Incoming::Bad(e)) => {
            eprintln!("viva-llama-worker: bad frame from the daemon: {e}");
            return 1;
        }
    }

    let spec = match rx.recv() {
        Ok(Incoming::Frame(DaemonMessage::Load { model })) => model,
        Ok(Incoming::Frame(DaemonMessage::Shutdown)) => return bye(&mut out),
        Ok(Incoming::Closed) | Err(_) => return 0,
        Ok(Incoming::Frame(other)) => {
            eprintln!("viva-llama-worker: expected load from the daemon, got {other:?}");
            return 1;
        }
        Ok(Incoming::Bad(e)) => {
            eprintln!("viva-llama-worker: bad frame from the daemon: {e}");
            return 1;
        }
    };
    let started = Instant::now();
    let engine = match Engine::load(&spec) {
        Ok(e) => e,
        Err(e) => {
            let code = match e {
                Error::ModelMissing { .. } => "model_missing",
                Error::ModelCorrupt { .. } => "model_corrupt",
                Error::Options(_) => "bad_options",
                _ => "load_failed",
            };
            eprintln!("viva-llama-worker: {e}");
            out.fail(None, code, e.to_string(), false);
            return 1;
        }
    };
    let load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    eprintln!(
        "viva-llama-worker: loaded {} ({}) in {load_ms} ms, chat template: {}, role {}",
        engine.name(),
        engine.path().display(),
        engine.template_source(),
        args.role
    );
    out.send(&WorkerMessage::Loaded {
        model: engine.name().to_owned(),
        load_ms,
        memory_bytes: Some(engine.memory_bytes()),
        max_parallel_jobs: None,
    });
    if let Some(m) = viva_models::device::frame(cfg!(feature = "cuda")) {
        out.send(&m);
    }

    // One context for the worker's life, cleared between calls (see
    // `engine::Session`).
    let mut session = engine.session();
    loop {
        match rx.recv() {
            Ok(Incoming::Frame(DaemonMessage::Job { job_id, payload })) => {
                if cancel.load(Ordering::Relaxed) {
                    // A Shutdown is queued behind this job: leave it.
                    continue;
                }
                run_job(
                    &mut session,
                    &args.role,
                    &job_id,
                    payload,
                    &cancel,
                    &mut out,
                );
            }
            Ok(Incoming::Frame(DaemonMessage::Shutdown)) => return bye(&mut out),
            Ok(Incoming::Frame(other)) => out.fail(
                None,
                "unexpected_message",
                format!("unexpected message from the daemon: {other:?}"),
                false,
            ),
            Ok(Incoming::Bad(e)) => out.fail(None, "bad_frame", e, false),
            Ok(Incoming::Closed) | Err(_) => return 0,
        }
    }
}

fn run_job(
    session: &mut Session<'_>,
    role: &str,
    job_id: &str,
    payload: JobPayload,
    cancel: &AtomicBool,
    out: &mut Out,
) {
    let req = match payload {
        JobPayload::Evaluate(req) => req,
        JobPayload::Transcribe(_) => {
            out.fail(
                Some(job_id.into()),
                "wrong_kind",
                "this is an evaluator worker; it cannot transcribe".into(),
                false,
            );
            return;
        }
    };
    let total = req.items.len();
    let mut progress = |done: usize, total: usize| {
        out.send(&WorkerMessage::Progress {
            job_id: job_id.to_owned(),
            done: done as u64,
            total: total as u64,
            message: None,
        })
    };
    progress(0, total);
    let result = session.evaluate(&req.items, role, cancel, &mut progress);
    match result {
        Ok((outcomes, stats)) => {
            eprintln!("viva-llama-worker: job {job_id}: {}", stats.summary());
            out.send(&WorkerMessage::Result {
                job_id: job_id.to_owned(),
                result: JobResult::Evaluations(EvaluateResponse { outcomes }),
            });
        }
        Err(Error::Cancelled) => {
            eprintln!("viva-llama-worker: job {job_id} cancelled: shutting down");
        }
        Err(e) => {
            eprintln!("viva-llama-worker: job {job_id} failed: {e}");
            out.fail(
                Some(job_id.to_owned()),
                "evaluation_failed",
                e.to_string(),
                true,
            );
        }
    }
    if let Some(m) = viva_models::device::frame(cfg!(feature = "cuda")) {
        out.send(&m);
    }
}

fn bye(out: &mut Out) -> i32 {
    out.send(&WorkerMessage::Bye);
    0
}

/// llama.cpp's log goes through `tracing` to stderr (the worker's log, which
/// the daemon captures), at `VIVA_LLAMA_LOG` level (default `warn`: its
/// load-time chatter stays out, its warnings and errors stay in).
fn init_logs() {
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIVA_LLAMA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_take_a_role() {
        let p = |v: &[&str]| Args::parse(v.iter().map(|s| s.to_string()));
        assert_eq!(p(&[]).map(|a| a.role), Ok("evaluator".into()));
        assert_eq!(p(&["--role", "a"]).map(|a| a.role), Ok("a".into()));
        assert_eq!(p(&["--role=b"]).map(|a| a.role), Ok("b".into()));
        assert!(p(&["--role"]).is_err());
        assert!(p(&["--kind", "stt"]).is_err());
        let a = p(&["--role", "a", "--check-options", "{}"]).expect("check");
        assert_eq!(a.check_options.as_deref(), Some("{}"));
        assert_eq!(
            p(&["--check-options={\"threads\":1}"]).map(|a| a.check_options),
            Ok(Some("{\"threads\":1}".into()))
        );
        assert!(p(&["--check-options"]).is_err());
    }

    #[test]
    fn check_options_fills_defaults_and_refuses_typos() {
        let out = check_options(r#"{"gpu_layers": 99, "type_k": "q8_0"}"#).expect("valid");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["gpu_layers"], 99);
        assert_eq!(v["type_k"], "q8_0");
        assert_eq!(v["type_v"], "f16");
        assert_eq!(v["flash_attn"], false);
        assert_eq!(v["split_mode"], "layer");
        let e = check_options(r#"{"gpu": true}"#).expect_err("unknown key");
        assert!(e.contains("unknown field `gpu`"), "{e}");
        assert!(check_options("threads=4").is_err());
    }
}
