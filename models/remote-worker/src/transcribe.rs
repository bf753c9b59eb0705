//! Transcription through `POST {url}/audio/transcriptions` (multipart, the
//! `verbose_json` format for segments with their log-probabilities).

use std::time::Instant;

use serde::Deserialize;
use viva_models::language::{WHISPER_LANGUAGES, language_name};
use viva_models::{Segment, TranscribeRequest, Transcript};

use crate::backend::{Backend, RequestError};
use crate::options::{HIGH_NO_SPEECH, LOW_LOGPROB, SttFormat};

#[derive(Deserialize)]
struct Verbose {
    text: String,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    segments: Option<Vec<VerboseSegment>>,
}

#[derive(Deserialize)]
struct VerboseSegment {
    start: f64,
    end: f64,
    text: String,
    #[serde(default)]
    avg_logprob: Option<f32>,
    #[serde(default)]
    no_speech_prob: Option<f32>,
}

/// A server's language as a Whisper code: OpenAI answers "english",
/// faster-whisper servers "en".
pub fn language_code(value: &str) -> Option<String> {
    let v = value.trim().to_ascii_lowercase();
    if language_name(&v).is_some() {
        return Some(v);
    }
    WHISPER_LANGUAGES
        .iter()
        .find(|(_, name)| name.eq_ignore_ascii_case(&v))
        .map(|(code, _)| (*code).to_owned())
}

fn ms(seconds: f64) -> u64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).round() as u64
    } else {
        0
    }
}

/// Parses a `verbose_json` (or plain `json`) answer into a transcript.
pub fn parse_transcript(
    body: &[u8],
    backend: &Backend,
    model_name: &str,
    audio_seconds: f64,
) -> Result<Transcript, String> {
    let v: Verbose =
        serde_json::from_slice(body).map_err(|e| format!("not a transcription: {e}"))?;
    let low = backend
        .options()
        .low_confidence_logprob
        .unwrap_or(LOW_LOGPROB);
    let silent = backend
        .options()
        .no_speech_threshold
        .unwrap_or(HIGH_NO_SPEECH);
    let segments = v
        .segments
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let avg_logprob = s.avg_logprob.unwrap_or(0.0);
            let no_speech_prob = s.no_speech_prob.unwrap_or(0.0);
            Segment {
                start_ms: ms(s.start),
                end_ms: ms(s.end),
                text: s.text,
                avg_logprob,
                no_speech_prob,
                low_confidence: avg_logprob < low || no_speech_prob > silent,
                words: Vec::new(),
            }
        })
        .collect();
    Ok(Transcript {
        text: v.text.trim().to_owned(),
        language: v.language.as_deref().and_then(language_code),
        segments,
        audio_seconds,
        processing_seconds: 0.0,
        model: model_name.to_owned(),
    })
}

/// Why a transcription failed.
pub enum TranscribeError {
    /// The WAV cannot be read (the job's file, not the server).
    Audio(String),
    Request(RequestError),
}

pub async fn transcribe(
    backend: &Backend,
    model_name: &str,
    req: &TranscribeRequest,
) -> Result<Transcript, TranscribeError> {
    let wav = tokio::fs::read(&req.wav_path)
        .await
        .map_err(|e| TranscribeError::Audio(format!("cannot read {}: {e}", req.wav_path)))?;
    let language = req
        .language
        .clone()
        .or_else(|| backend.options().language.clone());
    let url = backend.endpoint("audio/transcriptions");
    let build = || {
        let part = reqwest::multipart::Part::bytes(wav.clone())
            .file_name("audio.wav")
            .mime_str("audio/wav")
            .map_err(|e| e.to_string())?;
        let mut form = reqwest::multipart::Form::new()
            .part("file", part)
            .text("model", backend.model().to_owned())
            .text("temperature", "0");
        form = match backend.options().response_format {
            Some(SttFormat::Json) => form.text("response_format", "json"),
            _ => form
                .text("response_format", "verbose_json")
                .text("timestamp_granularities[]", "segment"),
        };
        if let Some(l) = &language {
            form = form.text("language", l.clone());
        }
        if let Some(p) = &req.initial_prompt {
            form = form.text("prompt", p.clone());
        }
        Ok(backend.client().post(&url).multipart(form))
    };
    let parse = |body: &[u8]| parse_transcript(body, backend, model_name, req.audio_seconds);
    let t0 = Instant::now();
    let mut t = backend
        .request(&build, &parse)
        .await
        .map_err(TranscribeError::Request)?;
    t.processing_seconds = t0.elapsed().as_secs_f64();
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::RemoteOptions;
    use viva_models::WorkerKind;

    #[test]
    fn languages_come_back_as_whisper_codes() {
        assert_eq!(language_code("en").as_deref(), Some("en"));
        assert_eq!(language_code("English").as_deref(), Some("en"));
        assert_eq!(language_code("french").as_deref(), Some("fr"));
        assert_eq!(language_code("elvish"), None);
    }

    #[test]
    fn verbose_json_becomes_a_transcript_with_confidence() {
        let o =
            RemoteOptions::from_json(&serde_json::json!({"url": "http://h/v1"}), WorkerKind::Stt)
                .expect("options");
        let b = Backend::new(o, WorkerKind::Stt, "whisper-remote").expect("backend");
        let body = br#"{"text":" Hello there. ","language":"english","duration":2.0,
            "segments":[{"id":0,"start":0.0,"end":1.25,"text":" Hello","avg_logprob":-0.2,"no_speech_prob":0.01},
                        {"id":1,"start":1.25,"end":2.0,"text":" there.","avg_logprob":-1.2,"no_speech_prob":0.1}]}"#;
        let t = parse_transcript(body, &b, "whisper-remote", 2.0).expect("parse");
        assert_eq!(t.text, "Hello there.");
        assert_eq!(t.language.as_deref(), Some("en"));
        assert_eq!(t.segments.len(), 2);
        assert_eq!(t.segments[0].end_ms, 1250);
        assert!(!t.segments[0].low_confidence);
        assert!(t.segments[1].low_confidence);
        assert_eq!(t.model, "whisper-remote");
        // Plain `json` has no segments; still a transcript.
        let t = parse_transcript(br#"{"text":"hi"}"#, &b, "m", 1.0).expect("plain");
        assert!(t.segments.is_empty());
        assert!(parse_transcript(b"<html>", &b, "m", 1.0).is_err());
    }
}
