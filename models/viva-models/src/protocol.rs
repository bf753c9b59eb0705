//! The worker protocol: newline-delimited JSON frames over a worker's
//! stdin (daemon → worker) and stdout (worker → daemon). A worker's stderr is
//! its log, captured by the daemon.
//!
//! Lifecycle of a worker process:
//!
//! ```text
//! daemon                         worker
//!   spawn ───────────────────────▶
//!   ◀──────────────────────────── Hello { protocol, kind, pid, … }
//!   Hello { protocol } ──────────▶            (version check on both sides)
//!   Load { model } ──────────────▶
//!   ◀──────────────────────────── Loaded { load_ms, memory_bytes }
//!   ◀──────────────────────────── Memory { device }           (on a GPU)
//!   Job { job_id, payload } ─────▶   (several may be in flight; ids demultiplex)
//!   ◀──────────────────────────── Progress { job_id, … }*
//!   ◀──────────────────────────── Result { job_id, result } | Error { job_id, … }
//!   ◀──────────────────────────── Memory { device }           (on a GPU)
//!   ◀──────────────────────────── Remote { health }           (a remote worker)
//!   Shutdown ────────────────────▶
//!   ◀──────────────────────────── Bye                        (then exit 0)
//! ```
//!
//! A remote worker (`viva-remote-worker`: its model is on an HTTP inference
//! server) says `remote: true` in Hello, names its concurrency in
//! `Loaded.max_parallel_jobs` (its options arrive with Load, after Hello),
//! and reports the server's health after its load check and after each job.
//!
//! A worker also exits when its stdin closes and when its parent dies
//! ([`exit_with_parent`]), so a killed daemon never leaves a model loaded.
//!
//! Evolution: [`PROTOCOL_VERSION`] is bumped on any incompatible change; new
//! optional fields may be added without a bump (unknown fields are ignored).

use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::Error;
use crate::payload::{JobPayload, JobResult};

/// Version of the envelope. Both sides refuse a peer with another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts (a batch of long transcripts fits easily).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// What a worker process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerKind {
    /// Speech to text (Whisper).
    Stt,
    /// Rubric evaluation by an LLM (one process per evaluator role).
    Evaluator,
}

impl WorkerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Stt => "stt",
            WorkerKind::Evaluator => "evaluator",
        }
    }
}

/// Which model a worker should load, and backend-specific options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelSpec {
    /// Human-readable model name, reported in results ("whisper-tiny.en").
    pub name: String,
    /// Path of the model file on disk.
    pub path: String,
    /// Backend options (threads, GPU layers, beam size …) as a JSON object.
    #[serde(default)]
    pub options: serde_json::Value,
}

/// Messages from the daemon to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DaemonMessage {
    Hello {
        protocol: u32,
        daemon_version: String,
    },
    Load {
        model: ModelSpec,
    },
    Job {
        job_id: String,
        payload: JobPayload,
    },
    Shutdown,
}

/// Messages from a worker to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Hello {
        protocol: u32,
        kind: WorkerKind,
        /// Program name and version, e.g. "viva-whisper-worker 0.1.0".
        worker: String,
        pid: u32,
        /// Most jobs this worker runs at once (parallel decoding states).
        #[serde(default = "one")]
        max_parallel_jobs: u32,
        /// The worker's model runs on an inference server it calls over
        /// HTTP (`viva-remote-worker`), not in this process: it holds no
        /// GPU memory here, so the scheduler treats its role as always
        /// loaded (no phase switch starts or stops it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        remote: bool,
    },
    Loaded {
        model: String,
        load_ms: u64,
        /// Memory the loaded model occupies, when the backend knows it.
        #[serde(default)]
        memory_bytes: Option<u64>,
        /// Replaces Hello's `max_parallel_jobs` once the options are known
        /// (a remote worker's `concurrency` arrives with Load).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_parallel_jobs: Option<u32>,
    },
    /// A remote worker's backend health, after its load check and after
    /// each call: for the admin view.
    Remote {
        health: RemoteHealth,
    },
    /// The GPU memory this worker holds, measured (NVML) after its model
    /// loaded and after each call; only from a worker whose model is on a
    /// GPU ([`crate::device`]).
    Memory {
        device: crate::device::DeviceMemory,
    },
    Progress {
        job_id: String,
        done: u64,
        total: u64,
        #[serde(default)]
        message: Option<String>,
    },
    Result {
        job_id: String,
        result: JobResult,
    },
    /// A failure. `job_id` is `None` for failures outside a job (load failed).
    Error {
        #[serde(default)]
        job_id: Option<String>,
        code: String,
        message: String,
        /// Whether trying the same job again can succeed.
        #[serde(default)]
        retryable: bool,
    },
    Bye,
}

fn one() -> u32 {
    1
}

/// How a remote worker's inference server has been answering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RemoteHealth {
    /// The server's base URL (without credentials).
    pub url: String,
    /// The model name sent to the server.
    pub model: String,
    /// Whether the last request (after its retries) succeeded.
    pub ok: bool,
    #[serde(default)]
    pub last_success_unix_ms: Option<u64>,
    #[serde(default)]
    pub last_failure_unix_ms: Option<u64>,
    /// The last failure, in plain words (never a credential).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Median and 95th percentile of the recent successful requests.
    #[serde(default)]
    pub latency_p50_ms: Option<u64>,
    #[serde(default)]
    pub latency_p95_ms: Option<u64>,
    /// HTTP requests sent (retries included) and those that failed.
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub failures: u64,
    /// Most requests in flight at once to this server.
    #[serde(default)]
    pub concurrency: u32,
}

/// Serialises one frame (a JSON object and a newline).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let mut buf = serde_json::to_vec(msg)?;
    if buf.len() > MAX_FRAME_BYTES {
        return Err(Error::FrameTooLarge {
            len: buf.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    buf.push(b'\n');
    Ok(buf)
}

/// Parses one frame (without its newline).
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, Error> {
    Ok(serde_json::from_slice(line)?)
}

/// What a worker's reader thread hands to its main loop.
#[derive(Debug)]
pub enum Incoming {
    Frame(DaemonMessage),
    /// A frame that is not valid protocol; the worker answers with an error.
    Bad(String),
    /// The daemon closed stdin (or it broke): time to exit.
    Closed,
}

/// A worker's reader loop: reads the daemon's frames until stdin ends,
/// passing each to `deliver` (which returns false when nobody listens any
/// more). Run it on a thread of its own; the last thing delivered is
/// [`Incoming::Closed`] unless `deliver` stopped it first.
pub fn read_daemon_frames<R: Read>(
    mut reader: FrameReader<R>,
    mut deliver: impl FnMut(Incoming) -> bool,
) {
    loop {
        let incoming = match reader.read::<DaemonMessage>() {
            Ok(Some(msg)) => Incoming::Frame(msg),
            Ok(None) | Err(Error::Io(_)) => {
                deliver(Incoming::Closed);
                return;
            }
            Err(e) => Incoming::Bad(e.to_string()),
        };
        if !deliver(incoming) {
            return;
        }
    }
}

/// Blocking frame reader, for worker binaries.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner: BufReader::new(inner),
            line: Vec::new(),
        }
    }

    /// Reads the next frame; `Ok(None)` at end of stream (the daemon is gone
    /// or closed our stdin: time to exit).
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        loop {
            self.line.clear();
            let n = (&mut self.inner)
                .take(MAX_FRAME_BYTES as u64 + 1)
                .read_until(b'\n', &mut self.line)?;
            if n == 0 {
                return Ok(None);
            }
            if self.line.len() > MAX_FRAME_BYTES {
                return Err(Error::FrameTooLarge {
                    len: self.line.len(),
                    max: MAX_FRAME_BYTES,
                });
            }
            let trimmed = self.line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            return decode(trimmed).map(Some);
        }
    }
}

/// Blocking frame writer, for worker binaries. Flushes after every frame.
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    pub fn send(&mut self, msg: &WorkerMessage) -> Result<(), Error> {
        let buf = encode(msg)?;
        self.inner.write_all(&buf)?;
        self.inner.flush()?;
        Ok(())
    }
}

/// Takes the process's stdio for the protocol: returns a reader on stdin and
/// a writer on a private duplicate of stdout, then points file descriptor 1 at
/// stderr. Native libraries that `printf` to stdout therefore land in the log
/// instead of corrupting the protocol stream.
pub fn take_stdio() -> Result<(FrameReader<std::fs::File>, FrameWriter<std::fs::File>), Error> {
    use std::os::fd::FromRawFd;
    // SAFETY: dup/dup2 on the process's own standard descriptors; the
    // duplicated descriptors are owned by the returned `File`s alone.
    unsafe {
        let proto_out = libc::dup(1);
        if proto_out < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let proto_in = libc::dup(0);
        if proto_in < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok((
            FrameReader::new(std::fs::File::from_raw_fd(proto_in)),
            FrameWriter::new(std::fs::File::from_raw_fd(proto_out)),
        ))
    }
}

/// Asks the kernel to kill this process when its parent dies, and exits at
/// once if the parent is already gone. Call first thing in a worker's `main`.
pub fn exit_with_parent() {
    // SAFETY: prctl with PR_SET_PDEATHSIG only changes this process's own
    // death signal; getppid has no preconditions.
    unsafe {
        let parent = libc::getppid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The parent may have died between our start and the prctl (a
        // daemon running as PID 1 in a container is fine: it is unchanged).
        if libc::getppid() != parent {
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::TranscribeRequest;

    #[test]
    fn frames_round_trip_and_are_single_lines() {
        let msg = DaemonMessage::Job {
            job_id: "j1".into(),
            payload: JobPayload::Transcribe(TranscribeRequest {
                wav_path: "/tmp/a\nb.wav".into(),
                audio_seconds: 3.5,
                language: None,
                initial_prompt: Some("photosynthesis".into()),
            }),
        };
        let buf = encode(&msg).expect("encode");
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
        let back: DaemonMessage = decode(&buf[..buf.len() - 1]).expect("decode");
        assert_eq!(back, msg);
    }

    #[test]
    fn reader_skips_blank_lines_and_reports_eof() {
        let input = b"\n{\"type\":\"bye\"}\n\n".to_vec();
        let mut r = FrameReader::new(&input[..]);
        let m: Option<WorkerMessage> = r.read().expect("read");
        assert_eq!(m, Some(WorkerMessage::Bye));
        let m: Option<WorkerMessage> = r.read().expect("read");
        assert_eq!(m, None);
    }

    #[test]
    fn hello_defaults_parallelism_to_one() {
        let m: WorkerMessage =
            decode(br#"{"type":"hello","protocol":1,"kind":"stt","worker":"w","pid":7}"#)
                .expect("decode");
        match m {
            WorkerMessage::Hello {
                max_parallel_jobs,
                remote,
                ..
            } => {
                assert_eq!(max_parallel_jobs, 1);
                assert!(!remote);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn remote_fields_are_optional_and_left_out_when_unset() {
        let m: WorkerMessage = decode(
            br#"{"type":"hello","protocol":1,"kind":"evaluator","worker":"w","pid":7,"remote":true}"#,
        )
        .expect("decode");
        assert!(matches!(m, WorkerMessage::Hello { remote: true, .. }));
        let loaded = WorkerMessage::Loaded {
            model: "m".into(),
            load_ms: 1,
            memory_bytes: None,
            max_parallel_jobs: None,
        };
        let text = String::from_utf8(encode(&loaded).expect("encode")).expect("utf8");
        assert!(!text.contains("max_parallel_jobs"), "{text}");
        let health = WorkerMessage::Remote {
            health: RemoteHealth {
                url: "http://x/v1".into(),
                ok: true,
                latency_p50_ms: Some(12),
                ..RemoteHealth::default()
            },
        };
        let back: WorkerMessage =
            decode(encode(&health).expect("encode").trim_ascii()).expect("decode");
        assert_eq!(back, health);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut r = FrameReader::new(&b"not json\n"[..]);
        assert!(r.read::<WorkerMessage>().is_err());
    }
}
