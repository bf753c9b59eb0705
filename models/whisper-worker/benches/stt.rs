//! STT benchmark on the real Whisper tiny.en model (printed tables, not a
//! timed test): real-time factor by clip length (5, 20, 60 s of espeak-ng
//! speech) and threads (1, 2), and the worker's start-to-ready and
//! stop-to-exit times — the cost of a phase switch.
//!
//! `cargo bench -p viva-whisper-worker --bench stt`. Needs the model (see
//! `viva models fetch`), espeak-ng and ffmpeg. `BENCH_REPEATS` (default 2)
//! runs each clip that many times and reports the best.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Driver, espeak_wav, whisper_model};
use viva_models::WorkerMessage;

const TEXT: &str = "Plants make their own food from light. This is called photosynthesis. \
Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose and oxygen. \
It happens in the chloroplasts, which contain the green pigment chlorophyll. \
The light dependent reactions take place in the thylakoid membranes and produce energy carriers. \
The Calvin cycle then uses that energy to fix carbon dioxide into sugars in the stroma. \
Without photosynthesis there would be almost no oxygen in the atmosphere, and most food chains would collapse. \
Animals depend on plants for food, and plants depend on animals for carbon dioxide and for spreading their seeds. \
In the ocean, tiny algae called phytoplankton produce about half of the oxygen we breathe. \
Scientists study photosynthesis to design better crops and to make clean fuels from sunlight. \
Some plants, such as cacti, open their pores only at night to save water in hot deserts. \
The efficiency of photosynthesis is low, but over the whole planet it captures an enormous amount of energy every year.";

fn main() {
    let model = whisper_model();
    let repeats: usize = std::env::var("BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2);
    let dir = tempfile::tempdir().expect("tempdir");
    // Whole sentences, as close as they come to 5, 20 and 60 s (a clip cut
    // mid-word makes Whisper stumble and would time the stumble).
    let sentences: Vec<&str> = TEXT.split_inclusive(". ").collect();
    let mut clips = Vec::new();
    for secs in [5.0, 20.0, 60.0] {
        let wav = dir.path().join(format!("clip{secs}.wav"));
        let speak = |n: usize| espeak_wav(&sentences[..n].concat(), "en-us", 165, &wav, None);
        let mut n = 1;
        let mut got = speak(n);
        while got < secs && n < sentences.len() {
            let shorter = got;
            n += 1;
            got = speak(n);
            if got >= secs && secs - shorter < got - secs {
                n -= 1;
                got = speak(n);
                break;
            }
        }
        clips.push((secs, got, wav));
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("\nWhisper tiny.en (ggml f16, converted), greedy, {cores} CPU core(s)");
    println!(
        "{:>8} {:>8} {:>10} {:>10} {:>8}",
        "threads", "audio s", "process s", "RTF", "x real"
    );
    let mut lifecycle = Vec::new();
    for threads in [1u32, 2] {
        let t0 = Instant::now();
        let mut w = Driver::spawn(&[]);
        let hello_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let load_ms = match w.load(&model, serde_json::json!({ "threads": threads })) {
            WorkerMessage::Loaded { load_ms, .. } => load_ms,
            other => panic!("load failed: {other:?}"),
        };
        let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // Warm-up: first-call allocations and page faults.
        w.transcribe(&clips[0].2);
        for (_, audio, wav) in &clips {
            let best = (0..repeats)
                .map(|_| w.transcribe(wav).processing_seconds)
                .fold(f64::INFINITY, f64::min);
            println!(
                "{threads:>8} {audio:>8.1} {best:>10.2} {:>10.3} {:>8.1}",
                best / audio,
                audio / best
            );
        }
        let peak = w.peak_rss().unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let stop = w.shutdown();
        lifecycle.push((
            threads,
            hello_ms,
            load_ms,
            ready_ms,
            stop.as_secs_f64() * 1000.0,
            peak,
        ));
    }
    println!("\nworker lifecycle (the phase-switch cost)");
    println!(
        "{:>8} {:>10} {:>9} {:>14} {:>13} {:>13}",
        "threads", "hello ms", "load ms", "start→ready ms", "stop→exit ms", "peak RSS MiB"
    );
    for (threads, hello, load, ready, stop, peak) in lifecycle {
        println!("{threads:>8} {hello:>10.1} {load:>9} {ready:>14.1} {stop:>13.1} {peak:>13.0}");
    }
}
