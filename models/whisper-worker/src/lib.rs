//! Viva's speech-to-text worker: whisper.cpp (through whisper-rs) behind the
//! worker protocol of `viva_models::protocol`.
//!
//! The `viva-whisper-worker` binary loads one ggml Whisper model per process
//! and transcribes the 16 kHz mono WAV files the daemon names. This library
//! holds what the binary, its tests and its benchmark share: the WAV reader
//! ([`wav`]), the load options ([`LoadOptions`]) and the [`Engine`] that
//! turns audio into a [`Transcript`] with segments, per-segment confidence
//! and timings.
//!
//! This crate links whisper.cpp and must never link llama.cpp: their vendored
//! ggml copies clash in one binary.
//!
//! Build notes: whisper.cpp is compiled by whisper-rs-sys with cmake. The
//! workspace sets `debug-assertions = false` for that package so dev and test
//! builds get the same `-O3` Release C++ as `--release`. By default ggml is
//! built with `GGML_NATIVE=ON` (`-march=native`): fast here, but the binary
//! may crash with SIGILL on an older CPU. For a portable release build set
//! `GGML_NATIVE=OFF` and the instruction sets to require in the environment
//! (whisper-rs-sys passes every `GGML_*`/`WHISPER_*`/`CMAKE_*` variable to
//! cmake), e.g. for x86-64-v3 (Haswell and newer):
//! `GGML_NATIVE=OFF GGML_AVX=ON GGML_AVX2=ON GGML_FMA=ON GGML_F16C=ON GGML_BMI2=ON cargo build --release -p viva-whisper-worker`.
//! The `cuda` feature builds whisper.cpp's CUDA backend (needs the CUDA
//! toolkit; not verified on the CPU-only development machines).

pub mod wav;

use std::ffi::{CStr, c_char, c_void};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use viva_models::{Segment, TranscribeRequest, Transcript, Word};
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

/// Default for [`LoadOptions::low_confidence_logprob`]. Calibrated on
/// tiny.en with espeak-ng speech: correct sentences scored -0.18 to -0.52,
/// misheard ones and a hallucination ("Let me know in the comments below.")
/// -0.64 to -0.9. (OpenAI Whisper's -1.0 decides when to re-decode, a
/// different question.)
pub const LOW_LOGPROB: f32 = -0.6;
/// Default for [`LoadOptions::no_speech_threshold`]: Whisper tends to invent
/// text in silence (OpenAI Whisper's `no_speech_threshold`).
pub const HIGH_NO_SPEECH: f32 = 0.6;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "model file {path} does not exist: run `viva models fetch`, or fix model_path in viva.toml"
    )]
    ModelMissing { path: PathBuf },
    #[error(
        "model file {path} is not a usable whisper.cpp model ({reason}): delete it and run `viva models fetch`, or point model_path at a ggml Whisper file"
    )]
    ModelCorrupt { path: PathBuf, reason: String },
    #[error("invalid worker options: {0}")]
    Options(String),
    #[error("cannot use audio file {path}: {reason}")]
    Audio { path: PathBuf, reason: String },
    #[error("transcription failed: {0}")]
    Transcribe(String),
    #[error(transparent)]
    Protocol(#[from] viva_models::Error),
}

impl WorkerError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            WorkerError::ModelMissing { .. } => "model_missing",
            WorkerError::ModelCorrupt { .. } => "model_corrupt",
            WorkerError::Options(_) => "bad_options",
            WorkerError::Audio { .. } => "bad_audio",
            WorkerError::Transcribe(_) => "transcription_failed",
            WorkerError::Protocol(_) => "protocol",
        }
    }

    /// Whether the same job may succeed if tried again.
    pub fn retryable(&self) -> bool {
        matches!(self, WorkerError::Transcribe(_))
    }
}

/// `ModelSpec.options` of the `Load` frame. Unknown keys are refused.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadOptions {
    /// Threads per transcription (default: available cores divided by
    /// the parallel states, at least 1). On a busy 2-core machine 1 thread
    /// can beat 2; see the benchmark.
    #[serde(default)]
    pub threads: Option<u32>,
    /// 0 or absent: greedy decoding; n > 0: beam search with n beams.
    #[serde(default)]
    pub beam_size: Option<u32>,
    /// Whisper states (decoders) on the one loaded model: how many
    /// transcriptions run at once. Defaults to the worker's
    /// `--parallel-states` (what its Hello advertised).
    #[serde(default)]
    pub parallel_states: Option<u32>,
    /// Default language when a job names none ("en", "de", or "auto" to
    /// detect; English-only models always use English).
    #[serde(default)]
    pub language: Option<String>,
    /// Use the GPU when built with the `cuda` feature (default true there).
    #[serde(default)]
    pub use_gpu: Option<bool>,
    #[serde(default)]
    pub flash_attn: Option<bool>,
    /// Segments whose mean token log-probability is below this are marked
    /// low confidence (default [`LOW_LOGPROB`]).
    #[serde(default)]
    pub low_confidence_logprob: Option<f32>,
    /// Segments whose no-speech probability is above this are marked low
    /// confidence (default [`HIGH_NO_SPEECH`]).
    #[serde(default)]
    pub no_speech_threshold: Option<f32>,
    /// A file to which the worker appends one JSON line per transcription:
    /// what it was asked (`wav_path`, `language`, `initial_prompt`) and the
    /// language it decoded with (`language_used`). For audits and tests;
    /// it names recordings, not their words (absent: no log).
    #[serde(default)]
    pub request_log: Option<String>,
}

/// whisper.cpp's limit on decoders (`WHISPER_MAX_DECODERS`): a larger
/// `beam_size` would fail every transcription.
pub const MAX_BEAM_SIZE: u32 = 8;

impl LoadOptions {
    /// Parses the options object (`null` means all defaults) and refuses
    /// values whisper.cpp would only refuse later, job by job.
    pub fn from_json(v: &serde_json::Value) -> Result<LoadOptions, WorkerError> {
        if v.is_null() {
            return Ok(LoadOptions::default());
        }
        // TOML integers arrive as JSON numbers; accept floats like 2.0 too.
        let opts: LoadOptions =
            serde_json::from_value(v.clone()).map_err(|e| WorkerError::Options(e.to_string()))?;
        opts.validate()?;
        Ok(opts)
    }

    fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: String| Err(WorkerError::Options(m));
        if self.beam_size.is_some_and(|b| b > MAX_BEAM_SIZE) {
            return bad(format!(
                "beam_size must be at most {MAX_BEAM_SIZE} (whisper.cpp's limit); 0 = greedy"
            ));
        }
        if self.parallel_states.is_some_and(|n| !(1..=64).contains(&n)) {
            return bad("parallel_states must be from 1 to 64".into());
        }
        if let Some(lang) = &self.language
            && lang != "auto"
            && (lang.contains('\0') || whisper_rs::get_lang_id(lang).is_none())
        {
            return bad(format!(
                "language {lang:?} is not one Whisper knows: use \"auto\" or a code such as \
                 \"en\", \"de\", \"fr\""
            ));
        }
        if self
            .low_confidence_logprob
            .is_some_and(|l| !l.is_finite() || l > 0.0)
        {
            return bad("low_confidence_logprob must be a log-probability (0 or less)".into());
        }
        if self
            .no_speech_threshold
            .is_some_and(|p| !(0.0..=1.0).contains(&p))
        {
            return bad("no_speech_threshold must be a probability from 0 to 1".into());
        }
        Ok(())
    }

    /// The options with every default filled in, for `--check-options`.
    pub fn resolved(&self, advertised_states: u32) -> serde_json::Value {
        let states = self
            .parallel_states
            .unwrap_or(advertised_states)
            .clamp(1, 64);
        serde_json::json!({
            "threads": self.threads_for(states),
            "beam_size": self.beam_size.unwrap_or(0),
            "parallel_states": states,
            "language": self.language.clone().unwrap_or_else(|| "auto".into()),
            "use_gpu": self.use_gpu.unwrap_or(cfg!(feature = "cuda")),
            "flash_attn": self.flash_attn.unwrap_or(false),
            "low_confidence_logprob": decimal(self.low_confidence_logprob.unwrap_or(LOW_LOGPROB)),
            "no_speech_threshold": decimal(self.no_speech_threshold.unwrap_or(HIGH_NO_SPEECH)),
            "request_log": self.request_log,
        })
    }

    /// Threads per transcription given `states` parallel states.
    pub fn threads_for(&self, states: u32) -> u32 {
        self.threads.filter(|t| *t > 0).unwrap_or_else(|| {
            let cores = std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1);
            (cores / states.max(1)).max(1)
        })
    }
}

/// An f32 as the decimal it was written as (-0.6, not -0.6000000238…).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The worker's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--parallel-states N` (1 to 64, default 1): the jobs at once that
    /// Hello advertises; the daemon sends at most
    /// min(this, `scheduler.stt_concurrency`).
    pub parallel_states: u32,
    /// `--version`: print the version and exit.
    pub version: bool,
    /// `--check-options JSON`: check an `options` object (as the daemon
    /// sends it) against these arguments, print it with every default
    /// filled in, and exit.
    pub check_options: Option<String>,
}

const USAGE: &str =
    "usage: viva-whisper-worker [--parallel-states N] [--check-options JSON] [--version]";

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            parallel_states: 1,
            version: false,
            check_options: None,
        };
        let mut flags = viva_models::flags::Flags::new(args, USAGE);
        while let Some((name, inline)) = flags.next_flag() {
            let mut value = || flags.value(&name, inline.clone());
            match name.as_str() {
                "--parallel-states" => {
                    let v = value()?;
                    parsed.parallel_states = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| {
                            format!("--parallel-states {v:?} is not a number from 1 to 64")
                        })?;
                }
                "--check-options" => parsed.check_options = Some(value()?),
                "--version" => parsed.version = true,
                other => return Err(format!("unknown argument {other:?}; {USAGE}")),
            }
        }
        Ok(parsed)
    }
}

/// `--check-options JSON`: the options with every default filled in (one
/// JSON line), or why the worker would refuse them at `Load`. A
/// `parallel_states` that differs from `--parallel-states` is refused here
/// (at `Load` it is only a warning): the extra states would hold memory and
/// never run, or jobs would queue for missing ones.
pub fn check_options(json: &str, advertised_states: u32) -> Result<String, WorkerError> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| WorkerError::Options(format!("--check-options takes a JSON object: {e}")))?;
    let opts = LoadOptions::from_json(&value)?;
    if let Some(n) = opts.parallel_states
        && n != advertised_states
    {
        return Err(WorkerError::Options(format!(
            "parallel_states = {n} but --parallel-states {advertised_states}: the daemon sends at \
             most {advertised_states} job(s) at once; drop the option or make both the same"
        )));
    }
    Ok(opts.resolved(advertised_states).to_string())
}

/// A loaded model.
pub struct Engine {
    ctx: WhisperContext,
    name: String,
    threads: u32,
    beam_size: u32,
    language: Option<String>,
    multilingual: bool,
    low_logprob: f32,
    high_no_speech: f32,
    request_log: Option<Mutex<File>>,
}

/// Routes whisper.cpp's and ggml's log lines to stderr (the daemon's log of
/// this worker), dropping debug chatter. Call once, before loading.
pub fn install_log_filter() {
    unsafe extern "C" fn log(
        level: whisper_rs::whisper_rs_sys::ggml_log_level,
        text: *const c_char,
        _: *mut c_void,
    ) {
        if text.is_null()
            || level == whisper_rs::whisper_rs_sys::ggml_log_level_GGML_LOG_LEVEL_DEBUG
        {
            return;
        }
        // SAFETY: whisper.cpp passes a NUL-terminated string valid for the call.
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        eprint!("{s}");
    }
    // SAFETY: installs a callback with static lifetime and no user data.
    unsafe {
        whisper_rs::whisper_rs_sys::whisper_log_set(Some(log), std::ptr::null_mut());
        whisper_rs::whisper_rs_sys::ggml_log_set(Some(log), std::ptr::null_mut());
    }
}

/// Checks that `path` looks like a complete ggml Whisper file, so a missing,
/// truncated or wrong file gets a message naming it (whisper.cpp only says
/// "failed to load").
pub fn check_model_file(path: &Path) -> Result<(), WorkerError> {
    if !path.exists() {
        return Err(WorkerError::ModelMissing {
            path: path.to_path_buf(),
        });
    }
    let summary =
        viva_models::ct2::read_ggml_summary(path).map_err(|e| WorkerError::ModelCorrupt {
            path: path.to_path_buf(),
            reason: match e {
                viva_models::Error::Convert(m) => m
                    .strip_prefix(&format!("{}: ", path.display()))
                    .unwrap_or(&m)
                    .to_owned(),
                other => other.to_string(),
            },
        })?;
    let want = summary.hparams.expected_tensors();
    if summary.tensors.len() != want {
        return Err(WorkerError::ModelCorrupt {
            path: path.to_path_buf(),
            reason: format!("{} tensors, expected {want}", summary.tensors.len()),
        });
    }
    Ok(())
}

impl Engine {
    /// Loads the model at `path` (checked first with [`check_model_file`]).
    pub fn load(
        name: &str,
        path: &Path,
        opts: &LoadOptions,
        states: u32,
    ) -> Result<Engine, WorkerError> {
        check_model_file(path)?;
        let mut params = WhisperContextParameters::default();
        params.use_gpu(opts.use_gpu.unwrap_or(cfg!(feature = "cuda")));
        params.flash_attn(opts.flash_attn.unwrap_or(false));
        let ctx = WhisperContext::new_with_params(path, params).map_err(|e| {
            WorkerError::ModelCorrupt {
                path: path.to_path_buf(),
                reason: format!("whisper.cpp refused it: {e} (see the lines above in this log)"),
            }
        })?;
        let multilingual = ctx.is_multilingual();
        let request_log = match opts.request_log.as_deref().filter(|p| !p.is_empty()) {
            None => None,
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        WorkerError::Options(format!(
                            "request_log: cannot open {p} for appending ({e}); make its \
                             directory writable by the worker or drop the option"
                        ))
                    })?,
            )),
        };
        Ok(Engine {
            ctx,
            name: name.to_owned(),
            threads: opts.threads_for(states),
            beam_size: opts.beam_size.unwrap_or(0),
            language: opts.language.clone(),
            multilingual,
            low_logprob: opts.low_confidence_logprob.unwrap_or(LOW_LOGPROB),
            high_no_speech: opts.no_speech_threshold.unwrap_or(HIGH_NO_SPEECH),
            request_log,
        })
    }

    /// A decoding state; one per concurrent transcription.
    pub fn new_state(&self) -> Result<WhisperState, WorkerError> {
        self.ctx
            .create_state()
            .map_err(|e| WorkerError::Transcribe(format!("cannot create a Whisper state: {e}")))
    }

    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// Transcribes the request's WAV file. `progress(percent)` is called as
    /// whisper.cpp advances.
    pub fn transcribe(
        &self,
        state: &mut WhisperState,
        req: &TranscribeRequest,
        progress: Option<Box<dyn FnMut(i32)>>,
    ) -> Result<Transcript, WorkerError> {
        let started = Instant::now();
        let mut samples = wav::read_wav(Path::new(&req.wav_path))?;
        if samples.is_empty() {
            return Err(WorkerError::Audio {
                path: PathBuf::from(&req.wav_path),
                reason: "it holds no audio samples".into(),
            });
        }
        let audio_seconds = samples.len() as f64 / f64::from(wav::SAMPLE_RATE);
        // whisper.cpp skips inputs under one second; pad them with silence.
        if samples.len() < wav::SAMPLE_RATE as usize + 1600 {
            samples.resize(wav::SAMPLE_RATE as usize + 1600, 0.0);
        }
        let language = self.language_for(req);
        self.log_request(req, &language);
        self.run(state, &samples, req, &language, progress)?;
        let eot = self.ctx.token_eot();
        let mut segments = Vec::new();
        let mut text = String::new();
        for seg in state.as_iter() {
            let seg_text = seg
                .to_str_lossy()
                .map(|s| s.into_owned())
                .unwrap_or_default();
            let (mut sum, mut n) = (0f32, 0u32);
            let mut words = WordBuilder::default();
            for i in 0..seg.n_tokens() {
                if let Some(tok) = seg.get_token(i) {
                    let data = tok.token_data();
                    // Timestamps and special tokens carry no text.
                    if data.id < eot {
                        sum += data.plog;
                        n += 1;
                        words.push(tok.to_bytes().unwrap_or_default(), data.p);
                    }
                }
            }
            let avg_logprob = if n > 0 { sum / n as f32 } else { 0.0 };
            let no_speech_prob = seg.no_speech_probability();
            text.push_str(&seg_text);
            segments.push(Segment {
                // whisper.cpp counts in 10 ms steps.
                start_ms: (seg.start_timestamp().max(0) as u64) * 10,
                end_ms: ((seg.end_timestamp().max(0) as u64) * 10)
                    .min((audio_seconds * 1000.0).ceil() as u64),
                text: seg_text.trim().to_owned(),
                avg_logprob,
                no_speech_prob,
                low_confidence: avg_logprob < self.low_logprob
                    || no_speech_prob > self.high_no_speech,
                words: words.finish(),
            });
        }
        let language = if self.multilingual {
            whisper_rs::get_lang_str(state.full_lang_id_from_state()).map(str::to_owned)
        } else {
            Some("en".to_owned())
        };
        Ok(Transcript {
            text: text.trim().to_owned(),
            language,
            segments,
            audio_seconds,
            processing_seconds: started.elapsed().as_secs_f64(),
            model: self.name.clone(),
        })
    }

    /// The language to decode with: the job's, else the load option's, else
    /// detection; English-only models always use English.
    fn language_for(&self, req: &TranscribeRequest) -> String {
        if self.multilingual {
            req.language
                .clone()
                .filter(|l| !l.is_empty())
                .or_else(|| self.language.clone())
                .unwrap_or_else(|| "auto".into())
                .replace('\0', "")
        } else {
            "en".to_owned()
        }
    }

    /// Appends the request's line to `request_log` (see [`LoadOptions`]).
    fn log_request(&self, req: &TranscribeRequest, language_used: &str) {
        let Some(log) = &self.request_log else { return };
        let line = serde_json::json!({
            "t_ms": SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "model": self.name,
            "wav_path": req.wav_path,
            "language": req.language,
            "initial_prompt": req.initial_prompt,
            "language_used": language_used,
        });
        let mut buf = line.to_string().into_bytes();
        buf.push(b'\n');
        let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&buf) {
            eprintln!("viva-whisper-worker: cannot write request_log: {e}");
        }
    }

    fn run(
        &self,
        state: &mut WhisperState,
        samples: &[f32],
        req: &TranscribeRequest,
        language: &str,
        progress: Option<Box<dyn FnMut(i32)>>,
    ) -> Result<(), WorkerError> {
        let strategy = if self.beam_size > 0 {
            SamplingStrategy::BeamSearch {
                beam_size: self.beam_size as i32,
                patience: -1.0,
            }
        } else {
            SamplingStrategy::Greedy { best_of: 1 }
        };
        let mut params = FullParams::new(strategy);
        params.set_n_threads(self.threads as i32);
        // Never carry text from one student's recording into the next.
        params.set_no_context(true);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_print_special(false);
        params.set_language(Some(language));
        if let Some(prompt) = req
            .initial_prompt
            .as_deref()
            .filter(|p| !p.trim().is_empty())
        {
            params.set_initial_prompt(&prompt.replace('\0', " "));
        }
        if let Some(cb) = progress {
            params.set_progress_callback_safe::<Option<Box<dyn FnMut(i32)>>, Box<dyn FnMut(i32)>>(
                Some(cb),
            );
        }
        state
            .full(params, samples)
            .map_err(|e| WorkerError::Transcribe(format!("whisper.cpp failed: {e}")))
    }
}

/// Groups a segment's text tokens into words: a token whose text starts
/// with a space starts a new word. A word's bytes are joined before they
/// are decoded (a character may be split over tokens); its probability is
/// its least sure token's.
#[derive(Default)]
struct WordBuilder {
    words: Vec<(Vec<u8>, f32)>,
}

impl WordBuilder {
    fn push(&mut self, bytes: &[u8], p: f32) {
        if bytes.is_empty() {
            return;
        }
        let starts_word = bytes[0] == b' ';
        match self.words.last_mut() {
            Some((text, min)) if !starts_word => {
                text.extend_from_slice(bytes);
                *min = min.min(p);
            }
            _ => self.words.push((bytes.to_vec(), p)),
        }
    }

    fn finish(self) -> Vec<Word> {
        self.words
            .into_iter()
            .map(|(bytes, p)| Word {
                text: String::from_utf8_lossy(&bytes).into_owned(),
                // Two decimals are all a reviewer needs, and keep the
                // stored transcript small.
                p: (p.clamp(0.0, 1.0) * 100.0).round() / 100.0,
            })
            .filter(|w| !w.text.trim().is_empty())
            .collect()
    }
}

/// Resident set size of this process (VmRSS), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_become_words_with_their_least_sure_token() {
        let mut w = WordBuilder::default();
        w.push(b" Photos", 0.9);
        w.push(b"ynth", 0.4);
        w.push(b"\xc3", 0.8); // "è" split over two tokens
        w.push(b"\xa8se", 0.7);
        w.push(b",", 0.99);
        w.push(b" water", 0.95);
        let words = w.finish();
        assert_eq!(
            words
                .iter()
                .map(|w| (w.text.as_str(), w.p))
                .collect::<Vec<_>>(),
            [(" Photosynthèse,", 0.4), (" water", 0.95)]
        );
    }

    #[test]
    fn options_parse_and_refuse_typos() {
        let o = LoadOptions::from_json(&serde_json::json!({"threads": 2, "beam_size": 5}))
            .expect("options");
        assert_eq!(o.threads, Some(2));
        assert_eq!(o.threads_for(4), 2);
        assert_eq!(
            LoadOptions::from_json(&serde_json::Value::Null).expect("null"),
            LoadOptions::default()
        );
        let err = LoadOptions::from_json(&serde_json::json!({"thread": 2})).expect_err("typo");
        assert!(err.to_string().contains("thread"), "{err}");
        assert!(LoadOptions::default().threads_for(64) >= 1);
        // The key the old deploy guide used: refused, as the worker refuses it.
        let err = LoadOptions::from_json(&serde_json::json!({"gpu": true})).expect_err("gpu");
        assert!(err.to_string().contains("unknown field `gpu`"), "{err}");
    }

    #[test]
    fn values_whisper_cpp_would_refuse_per_job_are_refused_at_load() {
        let ok = |v: serde_json::Value| LoadOptions::from_json(&v);
        assert!(ok(serde_json::json!({"language": "de", "beam_size": 8})).is_ok());
        assert!(ok(serde_json::json!({"language": "auto"})).is_ok());
        let e = ok(serde_json::json!({"language": "klingon"})).expect_err("language");
        assert!(e.to_string().contains("\"klingon\""), "{e}");
        let e = ok(serde_json::json!({"beam_size": 9})).expect_err("beam");
        assert!(e.to_string().contains("at most 8"), "{e}");
        assert!(ok(serde_json::json!({"no_speech_threshold": 1.5})).is_err());
        assert!(ok(serde_json::json!({"low_confidence_logprob": 0.5})).is_err());
        assert!(ok(serde_json::json!({"parallel_states": 0})).is_err());
    }

    #[test]
    fn arguments_and_the_option_check() {
        let p = |v: &[&str]| Args::parse(v.iter().map(|s| s.to_string()));
        assert_eq!(p(&[]).map(|a| a.parallel_states), Ok(1));
        assert_eq!(
            p(&["--parallel-states", "2"]).map(|a| a.parallel_states),
            Ok(2)
        );
        assert_eq!(
            p(&["--parallel-states=3"]).map(|a| a.parallel_states),
            Ok(3)
        );
        assert!(p(&["--parallel-states", "0"]).is_err());
        assert!(p(&["--parallel-states"]).is_err());
        assert!(p(&["--gpu"]).is_err());
        let a = p(&["--parallel-states", "2", "--check-options", "{}"]).expect("args");
        assert_eq!(a.check_options.as_deref(), Some("{}"));

        let out = check_options(r#"{"threads": 4, "use_gpu": true}"#, 2).expect("valid");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["threads"], 4);
        assert_eq!(v["parallel_states"], 2);
        assert_eq!(v["use_gpu"], true);
        assert_eq!(v["beam_size"], 0);
        assert_eq!(v["low_confidence_logprob"], -0.6);
        let e = check_options(r#"{"threads": 4, "gpu": true}"#, 1).expect_err("unknown key");
        assert!(e.to_string().contains("unknown field `gpu`"), "{e}");
        let e = check_options(r#"{"parallel_states": 2}"#, 1).expect_err("mismatch");
        assert!(e.to_string().contains("--parallel-states 1"), "{e}");
        assert!(check_options(r#"{"parallel_states": 2}"#, 2).is_ok());
    }

    #[test]
    fn missing_and_corrupt_models_name_the_file_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.bin");
        let err = check_model_file(&missing).expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("nope.bin") && msg.contains("viva models fetch"),
            "{msg}"
        );
        let junk = dir.path().join("junk.bin");
        std::fs::write(&junk, b"this is not a model").expect("write");
        let msg = check_model_file(&junk).expect_err("junk").to_string();
        assert!(msg.contains("junk.bin") && msg.contains("magic"), "{msg}");
        assert!(msg.contains("viva models fetch"), "{msg}");
    }
}
