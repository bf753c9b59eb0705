//! The cost of rubric plugins: `cargo bench -p viva-plugins --bench plugin`.
//!
//! Prints, for the default plugin (`weighted-criteria`):
//! - compile time (Cranelift, in-process, no cache);
//! - cached load time (a new host loading the artifact from the disk cache:
//!   what a daemon restart pays);
//! - the warm per-call cost (a fresh store and instance from the
//!   pre-instantiated component, plus the `score` call) on a 30-minute
//!   transcript (4 500 words in 360 timed segments) with two evaluations.
//!   Target: under 1 ms.

use std::time::{Duration, Instant};

use viva_models::{CriterionRating, Evaluation, Rubric, Segment};
use viva_plugins::{HostOptions, PluginHost, ScoreRequest, SubmissionFacts, builtin};

fn rubric() -> Rubric {
    let level = |label: &str, points: f64| serde_json::json!({"label": label, "points": points, "descriptor": format!("{label} work")});
    let criteria: Vec<serde_json::Value> = ["content", "organisation", "language", "delivery"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            serde_json::json!({
                "id": id, "title": id.to_uppercase(), "description": format!("How good the {id} is."),
                "weight": 1.0 + i as f64,
                "levels": [level("weak", 0.0), level("fair", 2.0), level("good", 3.0), level("strong", 4.0)],
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "criteria": criteria })).expect("rubric")
}

/// A 30-minute answer: 150 words a minute in 5-second segments.
fn thirty_minute_request() -> ScoreRequest {
    let words = [
        "photosynthesis",
        "turns",
        "light",
        "into",
        "chemical",
        "energy",
        "in",
        "the",
        "chloroplasts",
        "of",
        "leaves",
        "and",
    ];
    let mut segments = Vec::new();
    let mut text = String::new();
    let mut w = 0usize;
    for i in 0..360u64 {
        let seg: Vec<&str> = (0..12)
            .map(|_| {
                w += 1;
                words[w % words.len()]
            })
            .collect();
        let seg_text = seg.join(" ");
        text.push_str(&seg_text);
        text.push(' ');
        segments.push(Segment {
            start_ms: i * 5000,
            end_ms: i * 5000 + 5000,
            text: seg_text,
            avg_logprob: -0.2 - (i % 7) as f32 * 0.05,
            no_speech_prob: 0.01,
            low_confidence: false,
            words: Vec::new(),
        });
    }
    let rubric = rubric();
    let evaluation = |role: &str, shift: usize| Evaluation {
        role: role.into(),
        model: format!("model-{role}"),
        ratings: rubric
            .criteria
            .iter()
            .enumerate()
            .map(|(i, c)| CriterionRating {
                criterion_id: c.id.clone(),
                evidence: "turns light into chemical energy in the chloroplasts of leaves".into(),
                rationale: "The explanation names the process and where it happens.".into(),
                level: c.levels[(i + shift) % c.levels.len()].label.clone(),
            })
            .collect(),
        flags: Vec::new(),
        prompt_tokens: 6000,
        generated_tokens: 400,
        seconds: 20.0,
    };
    ScoreRequest {
        submission: SubmissionFacts {
            id: "sub_bench".into(),
            transcript: text,
            language: Some("en".into()),
            duration_seconds: 1800.0,
            segments,
        },
        evaluations: vec![evaluation("a", 1), evaluation("b", 2)],
        rubric,
        config: serde_json::json!({}),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let wasm = builtin::WEIGHTED_CRITERIA;
    println!("weighted-criteria: {} KiB component", wasm.len() / 1024);

    // Compile: a host without a cache compiles every time.
    let host = PluginHost::new(HostOptions::default()).expect("host");
    let compiles: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let p = host.load(wasm).expect("load");
            let _ = p.load_stats();
            t.elapsed()
        })
        .collect();
    println!(
        "compile + prepare (no cache), median of 3: {}",
        ms(median(compiles))
    );

    // Cached load: what a restart pays with the artifact on disk.
    let dir = tempfile::tempdir().expect("tempdir");
    let options = HostOptions {
        cache_dir: Some(dir.path().to_owned()),
        ..HostOptions::default()
    };
    PluginHost::new(options.clone())
        .expect("host")
        .load(wasm)
        .expect("warm the cache");
    let loads: Vec<Duration> = (0..5)
        .map(|_| {
            let h = PluginHost::new(options.clone()).expect("host");
            let t = Instant::now();
            let p = h.load(wasm).expect("cached load");
            assert!(p.load_stats().from_cache);
            t.elapsed()
        })
        .collect();
    println!("cached load + prepare, median of 5: {}", ms(median(loads)));

    // Warm calls on a 30-minute transcript.
    let plugin = host.load(wasm).expect("load");
    let req = thirty_minute_request();
    println!(
        "request: {} words, {} segments, {} evaluations, ~{} KiB",
        req.submission.word_count(),
        req.submission.segments.len(),
        req.evaluations.len(),
        req.approximate_size() / 1024
    );
    for _ in 0..20 {
        plugin.score(&req).expect("warm-up");
    }
    let n = 300;
    let mut calls = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        let s = plugin.score(&req).expect("score");
        calls.push(t.elapsed());
        last = Some(s);
    }
    calls.sort();
    let mean = calls.iter().sum::<Duration>() / n as u32;
    let p95 = calls[n * 95 / 100];
    println!(
        "warm call (fresh store + instance + score + checks), {n} calls: median {}, p95 {}, mean {}",
        ms(calls[n / 2]),
        ms(p95),
        ms(mean)
    );
    if let Some(s) = last {
        println!(
            "per call: {} instructions of fuel, peak memory {:.2} MiB, total {:.2} of {:.2}",
            s.usage.fuel_consumed.unwrap_or(0),
            s.usage.peak_memory_bytes as f64 / (1 << 20) as f64,
            s.report.total,
            s.report.max
        );
    }
    let target = Duration::from_millis(1);
    println!(
        "target: warm call under {} → {}",
        ms(target),
        if calls[n / 2] < target {
            "met"
        } else {
            "NOT met"
        }
    );
}
