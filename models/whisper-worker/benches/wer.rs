//! Word error rate per espeak-ng voice on a fixed set of sentences (printed
//! tables, not a timed test): Whisper tiny.en (the tests' model) against
//! the demo's multilingual Whisper base when it is in the models directory
//! (`viva models fetch whisper-base`), each without and with the course
//! vocabulary as Whisper's initial prompt (what an assignment's
//! `vocabulary` does), then French sentences on base with the language
//! given and detected.
//!
//! `cargo bench -p viva-whisper-worker --bench wer` (add `--profile dev` to
//! reuse the test build: the C++ is optimised in both). Needs the models
//! (see `viva models fetch`), espeak-ng and ffmpeg. `WER_VOICES` (comma-
//! separated espeak-ng voices) and `WER_THREADS` (default 2) override the
//! defaults; `WER_SENTENCES=N` uses the first N sentences of each set (a
//! quicker run on a busy machine). WER is word-level edit distance over the reference's words,
//! after lower-casing and dropping punctuation (`common::wer`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{Driver, espeak_wav, manifest_model, wer};
use viva_models::WorkerMessage;

/// Answers to "explain photosynthesis", as students say them: course terms
/// Whisper tiny.en is known to mishear, none of them in any test prompt.
const SENTENCES: [&str; 8] = [
    "Plants use sunlight, water and carbon dioxide to make glucose and oxygen.",
    "Chlorophyll in the chloroplasts absorbs red and blue light.",
    "The light dependent reactions split water and release oxygen.",
    "The Calvin cycle fixes carbon dioxide into sugar in the stroma.",
    "Stomata on the underside of the leaf let carbon dioxide in.",
    "Glucose is stored as starch or used in respiration by the mitochondria.",
    "Without photosynthesis there would be almost no oxygen in the atmosphere.",
    "The thylakoid membranes hold the pigments that capture light energy.",
];

const VOCABULARY: &str = "photosynthesis, chlorophyll, chloroplasts, glucose, carbon dioxide, \
                          stomata, stroma, thylakoid, Calvin cycle, mitochondria, respiration";

const FRENCH: [&str; 4] = [
    "Les plantes utilisent la lumière du soleil, l'eau et le dioxyde de carbone.",
    "La chlorophylle absorbe la lumière rouge et la lumière bleue.",
    "Le glucose est stocké sous forme d'amidon dans les feuilles.",
    "Sans photosynthèse, il n'y aurait presque pas d'oxygène dans l'air.",
];

const FRENCH_VOCABULARY: &str = "photosynthèse, chlorophylle, chloroplaste, glucose, amidon";

const VOICES: [&str; 6] = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-029",
    "en-us+f3",
    "en-gb-x-rp+m3",
];

struct Clip {
    voice: String,
    text: &'static str,
    wav: PathBuf,
    seconds: f64,
}

/// Mean WER of `clips` on `driver` (language, prompt), and the processing
/// time per second of audio.
fn run(
    driver: &mut Driver,
    clips: &[&Clip],
    language: Option<&str>,
    prompt: Option<&str>,
    worst: &mut Vec<(f64, String, String)>,
) -> (f64, f64) {
    let (mut sum, mut secs, mut audio) = (0.0, 0.0, 0.0);
    for c in clips {
        driver.submit_in(&c.wav, language, prompt);
        let t = driver.result().1.expect("transcript");
        let w = wer(c.text, &t.text);
        eprintln!(
            "  {:<16} {:>5.2} s  WER {w:.2}  {}",
            c.voice, t.processing_seconds, t.text
        );
        worst.push((w, c.text.to_owned(), t.text.clone()));
        sum += w;
        secs += t.processing_seconds;
        audio += c.seconds;
    }
    (sum / clips.len().max(1) as f64, secs / audio.max(1e-9))
}

fn main() {
    let threads: u32 = std::env::var("WER_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let voices: Vec<String> = std::env::var("WER_VOICES")
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_else(|_| VOICES.iter().map(|s| (*s).to_owned()).collect());
    let n_sentences: usize = std::env::var("WER_SENTENCES")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(SENTENCES.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut clips = Vec::new();
    for (vi, voice) in voices.iter().enumerate() {
        for (si, text) in SENTENCES.iter().take(n_sentences).enumerate() {
            let wav = dir.path().join(format!("en-{vi}-{si}.wav"));
            let seconds = espeak_wav(text, voice, 165, &wav, None);
            clips.push(Clip {
                voice: voice.clone(),
                text,
                wav,
                seconds,
            });
        }
    }
    let mut french = Vec::new();
    for (si, text) in FRENCH.iter().take(n_sentences).enumerate() {
        let wav = dir.path().join(format!("fr-{si}.wav"));
        let seconds = espeak_wav(text, "fr-fr", 165, &wav, None);
        french.push(Clip {
            voice: "fr-fr".into(),
            text,
            wav,
            seconds,
        });
    }

    let models: Vec<(&str, PathBuf)> = ["whisper-tiny.en", "whisper-base"]
        .into_iter()
        .filter_map(|name| match manifest_model(name) {
            Some(p) => Some((name, p)),
            None => {
                println!("({name} is not in the models directory: `viva models fetch {name}`)");
                None
            }
        })
        .collect();
    println!(
        "\n# Whisper word error rate per espeak-ng voice ({} sentences each, greedy, {threads} threads)\n",
        n_sentences.min(SENTENCES.len())
    );
    // results[model][prompt][voice] = (wer, rtf)
    let mut table: Vec<Vec<Vec<(f64, f64)>>> = Vec::new();
    let mut worst = Vec::new();
    let mut french_rows = Vec::new();
    for (name, path) in &models {
        let mut d = Driver::spawn(&[]);
        let t0 = Instant::now();
        match d.load(path, serde_json::json!({ "threads": threads })) {
            WorkerMessage::Loaded { .. } => {}
            other => panic!("{name}: load failed: {other:?}"),
        }
        eprintln!("{name} loaded in {:.1} s", t0.elapsed().as_secs_f64());
        let mut per_prompt = Vec::new();
        for prompt in [None, Some(VOCABULARY)] {
            let mut per_voice = Vec::new();
            for voice in &voices {
                let cs: Vec<&Clip> = clips.iter().filter(|c| &c.voice == voice).collect();
                let mut sink = Vec::new();
                let w = run(&mut d, &cs, None, prompt, &mut sink);
                if prompt.is_none() && *name == "whisper-tiny.en" {
                    worst.extend(sink);
                }
                per_voice.push(w);
            }
            per_prompt.push(per_voice);
        }
        table.push(per_prompt);
        if *name == "whisper-base" {
            let cs: Vec<&Clip> = french.iter().collect();
            for (label, lang, prompt) in [
                ("language fr", Some("fr"), None),
                (
                    "language fr + vocabulary",
                    Some("fr"),
                    Some(FRENCH_VOCABULARY),
                ),
                ("detected (auto)", None, None),
            ] {
                let mut sink = Vec::new();
                let (w, rtf) = run(&mut d, &cs, lang, prompt, &mut sink);
                french_rows.push((label, w, rtf, sink));
            }
        }
        d.shutdown();
    }

    let mut header = String::from("| voice |");
    let mut rule = String::from("|---|");
    for (name, _) in &models {
        header.push_str(&format!(" {name} | {name} + vocabulary |"));
        rule.push_str("---|---|");
    }
    println!("{header}\n{rule}");
    for (vi, voice) in voices.iter().enumerate() {
        let mut row = format!("| {voice} |");
        for m in &table {
            for p in m {
                row.push_str(&format!(" {:.2} |", p[vi].0));
            }
        }
        println!("{row}");
    }
    let mut mean = String::from("| **mean** |");
    let mut rtf = String::from("| RTF (processing s per audio s) |");
    for m in &table {
        for p in m {
            let n = p.len().max(1) as f64;
            mean.push_str(&format!(
                " **{:.2}** |",
                p.iter().map(|x| x.0).sum::<f64>() / n
            ));
            rtf.push_str(&format!(" {:.2} |", p.iter().map(|x| x.1).sum::<f64>() / n));
        }
    }
    println!("{mean}\n{rtf}");

    if !french_rows.is_empty() {
        println!(
            "\n# French (espeak-ng fr-fr, {} sentences) on whisper-base\n",
            french.len()
        );
        println!("| decoding | WER | RTF |\n|---|---|---|");
        for (label, w, rtf, _) in &french_rows {
            println!("| {label} | {w:.2} | {rtf:.2} |");
        }
        if let Some((_, _, _, sink)) = french_rows.first() {
            println!("\nwhisper-base, language fr:");
            for (w, reference, heard) in sink {
                println!("  {w:.2}  {reference}\n        → {heard}");
            }
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("\nworst tiny.en transcriptions (no vocabulary):");
    for (w, reference, heard) in worst.iter().take(4) {
        println!("  {w:.2}  {reference}\n        → {heard}");
    }
}
