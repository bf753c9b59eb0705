//! The worker process: the protocol of [`viva_models::protocol`] around a
//! [`Backend`].
//!
//! A reader thread owns stdin and forwards frames to the async main loop,
//! which runs each job in a task of its own (the server's `concurrency`
//! bounds the requests, not the jobs). Frames are written under a lock, one
//! whole frame at a time. `Shutdown` answers `Bye` and exits at once:
//! requests in flight are abandoned, and the daemon hands their jobs back to
//! the queue.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use viva_models::protocol::{
    FrameReader, FrameWriter, Incoming, ModelSpec, exit_with_parent, read_daemon_frames, take_stdio,
};
use viva_models::{
    DaemonMessage, EvaluateResponse, JobPayload, JobResult, PROTOCOL_VERSION, WorkerKind,
    WorkerMessage,
};

use crate::backend::Backend;
use crate::options::{RemoteOptions, check_options};
use crate::transcribe::TranscribeError;
use crate::{Error, evaluate, transcribe};

const PROGRAM: &str = concat!("viva-remote-worker ", env!("CARGO_PKG_VERSION"));

const USAGE: &str =
    "usage: viva-remote-worker [--kind stt|evaluator] [--role NAME] [--check-options JSON]";

/// Command-line arguments: `--kind` (default: `evaluator` when `--role` is
/// given, which the daemon adds to every evaluator, else `stt`), `--role`,
/// and `--check-options JSON`, which checks an options object and exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub kind: WorkerKind,
    pub role: String,
    pub check_options: Option<String>,
}

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut kind = None;
        let mut role = None;
        let mut check = None;
        let mut flags = viva_models::flags::Flags::new(args, USAGE);
        while let Some((name, inline)) = flags.next_flag() {
            let mut value = || flags.value(&name, inline.clone());
            match name.as_str() {
                "--kind" => {
                    kind = Some(match value()?.as_str() {
                        "stt" => WorkerKind::Stt,
                        "evaluator" => WorkerKind::Evaluator,
                        other => {
                            return Err(format!(
                                "--kind must be stt or evaluator, not {other:?}; {USAGE}"
                            ));
                        }
                    })
                }
                "--role" => role = Some(value()?),
                "--check-options" => check = Some(value()?),
                "--help" | "-h" => {
                    return Err(format!(
                        "{PROGRAM}: Viva worker whose model is an OpenAI-compatible server \
                         (transcriptions or chat completions). Started by the daemon; speaks \
                         JSON lines on stdin/stdout.\n{USAGE}\n--check-options checks an \
                         options object (JSON) and prints it with every default filled in"
                    ));
                }
                _ => return Err(format!("unknown argument {name:?}; {USAGE}")),
            }
        }
        let kind = kind.unwrap_or(if role.is_some() {
            WorkerKind::Evaluator
        } else {
            WorkerKind::Stt
        });
        Ok(Args {
            kind,
            role: role.unwrap_or_else(|| "evaluator".into()),
            check_options: check,
        })
    }
}

#[derive(Clone)]
struct Out(Arc<Mutex<FrameWriter<File>>>);

impl Out {
    fn send(&self, msg: &WorkerMessage) {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.send(msg) {
            // The daemon is gone: nobody to answer to.
            eprintln!("viva-remote-worker: cannot write to the daemon: {e}");
            std::process::exit(1);
        }
    }

    fn fail(&self, job_id: Option<String>, code: &str, message: String, retryable: bool) {
        self.send(&WorkerMessage::Error {
            job_id,
            code: code.into(),
            message,
            retryable,
        });
    }

    fn health(&self, backend: &Backend) {
        self.send(&WorkerMessage::Remote {
            health: backend.health(),
        });
    }
}

fn spawn_reader(reader: FrameReader<File>) -> mpsc::UnboundedReceiver<Incoming> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("protocol-reader".into())
        .spawn(move || read_daemon_frames(reader, |incoming| tx.send(incoming).is_ok()));
    if let Err(e) = spawned {
        eprintln!("viva-remote-worker: cannot start the reader thread: {e}");
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
        return match check_options(json, args.kind) {
            Ok(resolved) => {
                println!("{resolved}");
                0
            }
            Err(e) => {
                eprintln!("viva-remote-worker: {e}");
                2
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("viva-remote-worker: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> i32 {
    let (reader, writer) = match take_stdio() {
        Ok(io) => io,
        Err(e) => {
            eprintln!("viva-remote-worker: cannot take stdio: {e}");
            return 1;
        }
    };
    let out = Out(Arc::new(Mutex::new(writer)));
    let mut rx = spawn_reader(reader);
    out.send(&WorkerMessage::Hello {
        protocol: PROTOCOL_VERSION,
        kind: args.kind,
        worker: PROGRAM.into(),
        pid: std::process::id(),
        max_parallel_jobs: 1,
        remote: true,
    });

    match rx.recv().await {
        Some(Incoming::Frame(DaemonMessage::Hello { protocol, .. }))
            if protocol == PROTOCOL_VERSION => {}
        Some(Incoming::Frame(DaemonMessage::Hello { protocol, .. })) => {
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
        Some(Incoming::Frame(DaemonMessage::Shutdown)) => return bye(&out),
        Some(Incoming::Closed) | None => return 0,
        Some(Incoming::Frame(other)) => {
            eprintln!("viva-remote-worker: expected hello from the daemon, got {other:?}");
            return 1;
        }
        Some(Incoming::Bad(e)) => {
            eprintln!("viva-remote-worker: bad frame from the daemon: {e}");
            return 1;
        }
    }

    let spec = match rx.recv().await {
        Some(Incoming::Frame(DaemonMessage::Load { model })) => model,
        Some(Incoming::Frame(DaemonMessage::Shutdown)) => return bye(&out),
        Some(Incoming::Closed) | None => return 0,
        Some(Incoming::Frame(other)) => {
            eprintln!("viva-remote-worker: expected load from the daemon, got {other:?}");
            return 1;
        }
        Some(Incoming::Bad(e)) => {
            eprintln!("viva-remote-worker: bad frame from the daemon: {e}");
            return 1;
        }
    };
    let started = Instant::now();
    let backend = match load(&spec, args.kind).await {
        Ok(b) => Arc::new(b),
        Err((e, backend)) => {
            let code = match e {
                Error::Options(_) => "bad_options",
                _ => "server_unreachable",
            };
            eprintln!("viva-remote-worker: {e}");
            if let Some(b) = backend {
                out.health(&b);
            }
            out.fail(None, code, e.to_string(), false);
            return 1;
        }
    };
    let load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    eprintln!(
        "viva-remote-worker: {} {} at {} (server model {:?}, concurrency {}, timeout {}, {} retries), checked in {load_ms} ms",
        args.kind.as_str(),
        spec.name,
        backend.options().base_url(),
        backend.model(),
        backend.options().concurrency,
        humantime::format_duration(backend.options().timeout),
        backend.options().retries,
    );
    out.send(&WorkerMessage::Loaded {
        model: spec.name.clone(),
        load_ms,
        memory_bytes: None,
        max_parallel_jobs: Some(backend.options().concurrency),
    });
    out.health(&backend);

    let model_name: Arc<str> = spec.name.as_str().into();
    let role: Arc<str> = args.role.as_str().into();
    loop {
        match rx.recv().await {
            Some(Incoming::Frame(DaemonMessage::Job { job_id, payload })) => {
                let (out, backend, model_name, role) = (
                    out.clone(),
                    backend.clone(),
                    model_name.clone(),
                    role.clone(),
                );
                let kind = args.kind;
                tokio::spawn(async move {
                    run_job(&backend, kind, &role, &model_name, &job_id, payload, &out).await;
                    out.health(&backend);
                });
            }
            Some(Incoming::Frame(DaemonMessage::Shutdown)) => return bye(&out),
            Some(Incoming::Frame(other)) => out.fail(
                None,
                "unexpected_message",
                format!("unexpected message from the daemon: {other:?}"),
                false,
            ),
            Some(Incoming::Bad(e)) => out.fail(None, "bad_frame", e, false),
            Some(Incoming::Closed) | None => return 0,
        }
    }
}

/// Reads the options and the key, and checks that the server answers.
async fn load(spec: &ModelSpec, kind: WorkerKind) -> Result<Backend, (Error, Option<Backend>)> {
    let options = RemoteOptions::from_json(&spec.options, kind).map_err(|e| (e, None))?;
    let backend = Backend::new(options, kind, &spec.name).map_err(|e| (e, None))?;
    match backend.probe().await {
        Ok(()) => Ok(backend),
        Err(e) => Err((e, Some(backend))),
    }
}

async fn run_job(
    backend: &Backend,
    kind: WorkerKind,
    role: &str,
    model_name: &str,
    job_id: &str,
    payload: JobPayload,
    out: &Out,
) {
    match (kind, payload) {
        (WorkerKind::Stt, JobPayload::Transcribe(req)) => {
            match transcribe::transcribe(backend, model_name, &req).await {
                Ok(t) => {
                    eprintln!(
                        "viva-remote-worker: job {job_id}: {:.1} s of audio in {:.2} s, {} segment(s)",
                        t.audio_seconds,
                        t.processing_seconds,
                        t.segments.len()
                    );
                    out.send(&WorkerMessage::Result {
                        job_id: job_id.to_owned(),
                        result: JobResult::Transcript(t),
                    });
                }
                Err(TranscribeError::Audio(m)) => {
                    out.fail(Some(job_id.to_owned()), "audio_unreadable", m, true)
                }
                Err(TranscribeError::Request(e)) => {
                    eprintln!("viva-remote-worker: job {job_id} failed: {e}");
                    let retryable = e.job_retryable();
                    out.fail(
                        Some(job_id.to_owned()),
                        "remote_failed",
                        e.message,
                        retryable,
                    )
                }
            }
        }
        (WorkerKind::Evaluator, JobPayload::Evaluate(req)) => {
            let total = req.items.len() as u64;
            out.send(&WorkerMessage::Progress {
                job_id: job_id.to_owned(),
                done: 0,
                total,
                message: None,
            });
            // Items run side by side; the server's `concurrency` bounds them.
            let done = std::sync::atomic::AtomicU64::new(0);
            let outcomes = futures::future::join_all(req.items.iter().map(|item| async {
                let outcome = evaluate::evaluate_item(backend, role, model_name, item).await;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                out.send(&WorkerMessage::Progress {
                    job_id: job_id.to_owned(),
                    done: n,
                    total,
                    message: None,
                });
                outcome
            }))
            .await;
            let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
            eprintln!(
                "viva-remote-worker: job {job_id}: {} item(s), {failed} failed",
                outcomes.len()
            );
            out.send(&WorkerMessage::Result {
                job_id: job_id.to_owned(),
                result: JobResult::Evaluations(EvaluateResponse { outcomes }),
            });
        }
        (WorkerKind::Stt, JobPayload::Evaluate(_)) => out.fail(
            Some(job_id.to_owned()),
            "wrong_kind",
            "this is an stt worker; it cannot evaluate".into(),
            false,
        ),
        (WorkerKind::Evaluator, JobPayload::Transcribe(_)) => out.fail(
            Some(job_id.to_owned()),
            "wrong_kind",
            "this is an evaluator worker; it cannot transcribe".into(),
            false,
        ),
    }
}

fn bye(out: &Out) -> i32 {
    out.send(&WorkerMessage::Bye);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_follows_the_role_unless_named() {
        let p = |v: &[&str]| Args::parse(v.iter().map(|s| s.to_string()));
        assert_eq!(p(&[]).map(|a| a.kind), Ok(WorkerKind::Stt));
        let a = p(&["--role", "a"]).expect("role");
        assert_eq!((a.kind, a.role.as_str()), (WorkerKind::Evaluator, "a"));
        assert_eq!(
            p(&["--kind=evaluator"]).map(|a| a.kind),
            Ok(WorkerKind::Evaluator)
        );
        assert_eq!(
            p(&["--kind", "stt", "--role", "x"]).map(|a| a.kind),
            Ok(WorkerKind::Stt)
        );
        assert!(p(&["--kind", "gpu"]).is_err());
        assert!(p(&["--model", "x"]).is_err());
        assert_eq!(
            p(&["--check-options", "{}"]).map(|a| a.check_options),
            Ok(Some("{}".into()))
        );
    }
}
