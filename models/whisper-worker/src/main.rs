//! `viva-whisper-worker`: the STT worker process.
//!
//! Speaks the worker protocol (`viva_models::protocol`) on stdin/stdout:
//! Hello (kind `stt`, `max_parallel_jobs` = `--parallel-states`), then Load
//! (the ggml model at `ModelSpec.path`; options in [`LoadOptions`]) answered
//! by Loaded only once the model is in memory, then Transcribe jobs, each
//! answered by a Transcript or an Error frame. Jobs run on one thread per
//! Whisper state; more jobs than states wait their turn. Exits 0 on Shutdown
//! (after Bye) or when stdin closes, and dies with its parent.
//!
//! Arguments: `--parallel-states N` (default 1), which the daemon learns from
//! Hello before it sends Load, so set it in the worker's `args` in viva.toml;
//! `--check-options JSON` checks an options object and exits (see
//! [`viva_whisper_worker::check_options`]); `--version`.

use std::fs::File;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use viva_models::protocol::{FrameWriter, exit_with_parent, take_stdio};
use viva_models::{
    DaemonMessage, JobPayload, JobResult, PROTOCOL_VERSION, TranscribeRequest, WorkerKind,
    WorkerMessage,
};
use viva_whisper_worker::{
    Args, Engine, LoadOptions, WorkerError, check_options, install_log_filter, resident_bytes,
};

const PROGRAM: &str = concat!("viva-whisper-worker ", env!("CARGO_PKG_VERSION"));

type Writer = Arc<Mutex<FrameWriter<File>>>;

fn send(writer: &Writer, msg: &WorkerMessage) {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = w.send(msg) {
        // The daemon is gone: nobody to answer to.
        eprintln!("viva-whisper-worker: cannot write to the daemon: {e}");
        std::process::exit(1);
    }
}

fn error_frame(job_id: Option<String>, e: &WorkerError) -> WorkerMessage {
    WorkerMessage::Error {
        job_id,
        code: e.code().into(),
        message: e.to_string(),
        retryable: e.retryable(),
    }
}

fn main() {
    exit_with_parent();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("viva-whisper-worker: {e}");
            std::process::exit(2);
        }
    };
    if args.version {
        println!("{PROGRAM}");
        return;
    }
    if let Some(json) = &args.check_options {
        match check_options(json, args.parallel_states) {
            Ok(resolved) => {
                println!("{resolved}");
                return;
            }
            Err(e) => {
                eprintln!("viva-whisper-worker: {e}");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(args.parallel_states) {
        eprintln!("viva-whisper-worker: {e}");
        std::process::exit(1);
    }
}

fn run(advertised_states: u32) -> Result<(), WorkerError> {
    let (mut reader, writer) = take_stdio()?;
    let writer: Writer = Arc::new(Mutex::new(writer));
    install_log_filter();
    send(
        &writer,
        &WorkerMessage::Hello {
            protocol: PROTOCOL_VERSION,
            kind: WorkerKind::Stt,
            worker: PROGRAM.into(),
            pid: std::process::id(),
            max_parallel_jobs: advertised_states,
            remote: false,
        },
    );

    match reader.read::<DaemonMessage>()? {
        Some(DaemonMessage::Hello { protocol, .. }) if protocol == PROTOCOL_VERSION => {}
        Some(DaemonMessage::Hello { protocol, .. }) => {
            send(
                &writer,
                &WorkerMessage::Error {
                    job_id: None,
                    code: "protocol_mismatch".into(),
                    message: format!(
                        "the daemon speaks protocol {protocol}, this worker speaks {PROTOCOL_VERSION}"
                    ),
                    retryable: false,
                },
            );
            std::process::exit(1);
        }
        Some(DaemonMessage::Shutdown) => bye(&writer),
        None => std::process::exit(0),
        Some(other) => {
            return Err(WorkerError::Options(format!(
                "expected hello from the daemon, got {other:?}"
            )));
        }
    }

    let model = match reader.read::<DaemonMessage>()? {
        Some(DaemonMessage::Load { model }) => model,
        Some(DaemonMessage::Shutdown) => bye(&writer),
        None => std::process::exit(0),
        Some(other) => {
            return Err(WorkerError::Options(format!(
                "expected load from the daemon, got {other:?}"
            )));
        }
    };
    let started = Instant::now();
    let loaded = LoadOptions::from_json(&model.options).and_then(|opts| {
        let states = opts.parallel_states.unwrap_or(advertised_states).clamp(1, 64);
        if states != advertised_states {
            eprintln!(
                "viva-whisper-worker: parallel_states {states} differs from --parallel-states {advertised_states}; the daemon sends at most {advertised_states} jobs at once"
            );
        }
        let engine = Engine::load(&model.name, std::path::Path::new(&model.path), &opts, states)?;
        let mut pool = Vec::with_capacity(states as usize);
        for _ in 0..states {
            pool.push(engine.new_state()?);
        }
        Ok((engine, pool))
    });
    let (engine, pool) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("viva-whisper-worker: {e}");
            send(&writer, &error_frame(None, &e));
            std::process::exit(1);
        }
    };
    eprintln!(
        "viva-whisper-worker: loaded {} ({}) with {} state(s), {} thread(s) each, in {} ms",
        model.name,
        model.path,
        pool.len(),
        engine.threads(),
        started.elapsed().as_millis()
    );
    send(
        &writer,
        &WorkerMessage::Loaded {
            model: model.name.clone(),
            load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            memory_bytes: resident_bytes(),
            max_parallel_jobs: None,
        },
    );
    if let Some(m) = viva_models::device::frame(cfg!(feature = "cuda")) {
        send(&writer, &m);
    }

    let engine = Arc::new(engine);
    let (jobs_tx, jobs_rx) = mpsc::channel::<(String, TranscribeRequest)>();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    for (i, mut state) in pool.into_iter().enumerate() {
        let engine = engine.clone();
        let writer = writer.clone();
        let jobs_rx = jobs_rx.clone();
        std::thread::Builder::new()
            .name(format!("whisper-state-{i}"))
            .spawn(move || {
                loop {
                    let next = jobs_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((job_id, req)) = next else { return };
                    let answer = transcribe(&engine, &mut state, &writer, &job_id, &req);
                    send(&writer, &answer);
                    if let Some(m) = viva_models::device::frame(cfg!(feature = "cuda")) {
                        send(&writer, &m);
                    }
                }
            })
            .map_err(|e| WorkerError::Transcribe(format!("cannot start a decoding thread: {e}")))?;
    }

    loop {
        match reader.read::<DaemonMessage>() {
            Ok(Some(DaemonMessage::Job { job_id, payload })) => match payload {
                JobPayload::Transcribe(req) => {
                    if jobs_tx.send((job_id.clone(), req)).is_err() {
                        send(
                            &writer,
                            &WorkerMessage::Error {
                                job_id: Some(job_id),
                                code: "worker_broken".into(),
                                message: "no decoding thread is left".into(),
                                retryable: true,
                            },
                        );
                    }
                }
                JobPayload::Evaluate(_) => send(
                    &writer,
                    &WorkerMessage::Error {
                        job_id: Some(job_id),
                        code: "wrong_kind".into(),
                        message: "this is an stt worker; it cannot evaluate".into(),
                        retryable: false,
                    },
                ),
            },
            Ok(Some(DaemonMessage::Shutdown)) => bye(&writer),
            Ok(Some(other)) => send(
                &writer,
                &WorkerMessage::Error {
                    job_id: None,
                    code: "unexpected_message".into(),
                    message: format!("unexpected message from the daemon: {other:?}"),
                    retryable: false,
                },
            ),
            Ok(None) => std::process::exit(0),
            Err(viva_models::Error::Io(e)) => {
                eprintln!("viva-whisper-worker: cannot read from the daemon: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("viva-whisper-worker: bad frame from the daemon: {e}");
                send(
                    &writer,
                    &WorkerMessage::Error {
                        job_id: None,
                        code: "bad_frame".into(),
                        message: e.to_string(),
                        retryable: false,
                    },
                );
            }
        }
    }
}

fn transcribe(
    engine: &Engine,
    state: &mut whisper_rs::WhisperState,
    writer: &Writer,
    job_id: &str,
    req: &TranscribeRequest,
) -> WorkerMessage {
    let progress_writer = writer.clone();
    let progress_job = job_id.to_owned();
    let mut last = -1;
    let progress: Box<dyn FnMut(i32)> = Box::new(move |pct: i32| {
        if pct != last {
            last = pct;
            send(
                &progress_writer,
                &WorkerMessage::Progress {
                    job_id: progress_job.clone(),
                    done: pct.clamp(0, 100) as u64,
                    total: 100,
                    message: None,
                },
            );
        }
    });
    match engine.transcribe(state, req, Some(progress)) {
        Ok(t) => {
            eprintln!(
                "viva-whisper-worker: job {job_id}: {:.1} s of audio in {:.2} s (RTF {:.3}), {} segment(s), {} low confidence",
                t.audio_seconds,
                t.processing_seconds,
                t.real_time_factor(),
                t.segments.len(),
                t.low_confidence_segments().count()
            );
            WorkerMessage::Result {
                job_id: job_id.to_owned(),
                result: JobResult::Transcript(t),
            }
        }
        Err(e) => {
            eprintln!("viva-whisper-worker: job {job_id} failed: {e}");
            error_frame(Some(job_id.to_owned()), &e)
        }
    }
}

/// Answers Shutdown and exits. In-flight jobs are abandoned: the daemon
/// treats them as stopped and retries them elsewhere.
fn bye(writer: &Writer) -> ! {
    send(writer, &WorkerMessage::Bye);
    std::process::exit(0)
}
