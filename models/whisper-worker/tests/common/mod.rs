//! Shared by the real-model tests and the benchmark: finding the model,
//! making speech with espeak-ng, word error rate, and a blocking driver that
//! speaks the worker protocol to a spawned `viva-whisper-worker`. Every
//! process here runs with a deadline (viva_test_process).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use viva_models::manifest::Manifest;
use viva_models::protocol::{ModelSpec, decode, encode};
use viva_models::{
    DaemonMessage, JobPayload, JobResult, TranscribeRequest, Transcript, WorkerMessage,
};
use viva_test_process::{Lines, SHORT, output};

pub const WORKER: &str = env!("CARGO_BIN_EXE_viva-whisper-worker");

/// `$VIVA_MODELS_DIR`, else `~/.cache/viva/models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("VIVA_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/viva/models")
        })
}

/// A manifest model's file when it is in the models directory.
pub fn manifest_model(name: &str) -> Option<PathBuf> {
    let manifest = Manifest::builtin().expect("built-in manifest");
    let entry = manifest.find(name)?;
    let path = models_dir().join(&entry.file);
    path.is_file().then_some(path)
}

/// The manifest's Whisper model file; panics with the fix when it is missing.
pub fn whisper_model() -> PathBuf {
    let manifest = Manifest::builtin().expect("built-in manifest");
    let entry = manifest.find("whisper-tiny.en").expect("whisper entry");
    let dir = models_dir();
    let path = dir.join(&entry.file);
    assert!(
        path.is_file(),
        "the Whisper test model {} is missing: fetch it with `cargo run -p viva-daemon --bin viva -- models fetch --dir {}` (scripts/test does this and sets VIVA_MODELS_DIR)",
        path.display(),
        dir.display()
    );
    path
}

/// Speaks `text` with espeak-ng and writes a 16 kHz mono s16 WAV to `out`.
/// `max_seconds` cuts the audio. Returns the audio's duration.
pub fn espeak_wav(
    text: &str,
    voice: &str,
    speed: u32,
    out: &Path,
    max_seconds: Option<f64>,
) -> f64 {
    let raw = out.with_extension("raw.wav");
    let st = output(
        Command::new("espeak-ng")
            .args(["-v", voice, "-s", &speed.to_string(), "-w"])
            .arg(&raw)
            .arg(text),
        SHORT,
    )
    .expect("espeak-ng (not found? apt-get install espeak-ng)");
    assert!(
        st.status.success(),
        "espeak-ng failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-loglevel", "error", "-y", "-i"]).arg(&raw);
    if let Some(t) = max_seconds {
        cmd.args(["-t", &format!("{t}")]);
    }
    cmd.args(["-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le"])
        .arg(out);
    let st = output(&mut cmd, SHORT).expect("ffmpeg (not found? apt-get install ffmpeg)");
    assert!(
        st.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let _ = std::fs::remove_file(&raw);
    let bytes = std::fs::metadata(out).expect("wav").len();
    (bytes.saturating_sub(44)) as f64 / 32_000.0
}

fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| c.is_whitespace() || c == '-')
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Word error rate: word-level edit distance (substitutions, insertions,
/// deletions) over the number of reference words, after lower-casing and
/// dropping punctuation.
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let r = words(reference);
    let h = words(hypothesis);
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut cur = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            let sub = prev[j] + usize::from(rw != hw);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[h.len()] as f64 / r.len() as f64
}

/// Longest wait for one frame from the worker (a load, a transcription on
/// one thread of a loaded machine); then the worker is killed and the test
/// fails instead of hanging.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(300);

/// A worker process driven over its stdin/stdout; killed when dropped.
pub struct Driver {
    pub child: Child,
    stdin: Option<ChildStdin>,
    frames: Lines,
    pub hello: WorkerMessage,
    next: u64,
}

impl Driver {
    /// Spawns the worker and completes the handshake (not the load).
    pub fn spawn(args: &[&str]) -> Driver {
        let mut child = Command::new(WORKER)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the worker");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        // Drain stderr so the worker never blocks on a full pipe; keep it for
        // failure messages.
        if let Some(mut err) = child.stderr.take() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut err, &mut std::io::sink());
            });
        }
        let mut d = Driver {
            child,
            stdin,
            frames: Lines::spawn(stdout),
            hello: WorkerMessage::Bye,
            next: 0,
        };
        d.hello = d.recv().expect("worker closed stdout before hello");
        d.send(&DaemonMessage::Hello {
            protocol: viva_models::PROTOCOL_VERSION,
            daemon_version: "test".into(),
        });
        d
    }

    pub fn send(&mut self, msg: &DaemonMessage) {
        let frame = encode(msg).expect("encode");
        if let Some(stdin) = self.stdin.as_mut() {
            stdin.write_all(&frame).expect("write to worker");
            stdin.flush().expect("flush");
        }
    }

    /// The next frame, or `None` when the worker closed stdout. Fails the
    /// test (the worker is killed on drop) after [`FRAME_TIMEOUT`].
    pub fn recv(&mut self) -> Option<WorkerMessage> {
        let line = self
            .frames
            .next(FRAME_TIMEOUT)
            .unwrap_or_else(|e| panic!("worker {}: {e}", self.child.id()))?;
        Some(decode(line.as_bytes()).expect("frame"))
    }

    /// Waits for the worker to exit (it is killed after [`SHORT`]).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        viva_test_process::wait(&mut self.child, SHORT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends Load and returns the answer (Loaded or Error).
    pub fn load(&mut self, path: &Path, options: serde_json::Value) -> WorkerMessage {
        self.send(&DaemonMessage::Load {
            model: ModelSpec {
                name: "whisper-tiny.en".into(),
                path: path.display().to_string(),
                options,
            },
        });
        self.recv().expect("answer to load")
    }

    /// Starts a transcription; returns its job id.
    pub fn submit(&mut self, wav: &Path, initial_prompt: Option<&str>) -> String {
        self.submit_in(wav, None, initial_prompt)
    }

    /// Starts a transcription in `language` (`None`: the worker's default).
    pub fn submit_in(
        &mut self,
        wav: &Path,
        language: Option<&str>,
        initial_prompt: Option<&str>,
    ) -> String {
        self.next += 1;
        let job_id = format!("j{}", self.next);
        self.send(&DaemonMessage::Job {
            job_id: job_id.clone(),
            payload: JobPayload::Transcribe(TranscribeRequest {
                wav_path: wav.display().to_string(),
                audio_seconds: 0.0,
                language: language.map(str::to_owned),
                initial_prompt: initial_prompt.map(str::to_owned),
            }),
        });
        job_id
    }

    /// Waits for the result of the next finished job (skipping progress).
    pub fn result(&mut self) -> (String, Result<Transcript, String>) {
        loop {
            match self.recv().expect("worker closed stdout mid-job") {
                WorkerMessage::Progress { .. } => continue,
                WorkerMessage::Result {
                    job_id,
                    result: JobResult::Transcript(t),
                } => return (job_id, Ok(t)),
                WorkerMessage::Error {
                    job_id, message, ..
                } => return (job_id.unwrap_or_default(), Err(message)),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    pub fn transcribe(&mut self, wav: &Path) -> Transcript {
        self.submit(wav, None);
        self.result().1.expect("transcript")
    }

    /// Sends Shutdown, expects Bye, and returns how long until the process exited.
    pub fn shutdown(mut self) -> Duration {
        let t = Instant::now();
        self.send(&DaemonMessage::Shutdown);
        assert_eq!(self.recv(), Some(WorkerMessage::Bye));
        let st = self.wait();
        assert!(st.success(), "worker exited with {st}");
        t.elapsed()
    }

    /// Peak resident memory of the worker (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
