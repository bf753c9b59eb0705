//! Evaluator benchmarks on the real test models (printed tables, not timed
//! tests): `cargo bench -p viva-llama-worker --bench evaluate`.
//!
//! 1. Prompt and generation tokens/s, one submission at a time against
//!    batches of 2, 4 and 8 decoded together, and the throughput ratio.
//! 2. `continuous`: 1 to 16 items through 1 to 8 slots in rounds
//!    (`continuous_batching` off) and with slots refilled as answers
//!    finish, each without and with shared prompt prefixes
//!    (`share_prompt_prefix`):
//!    wall time, generated tokens per wall-clock second, and whether the
//!    answers are the same in every mode.
//! 3. Grammar sampling: the whole vocabulary every step ("naive") against
//!    the unconstrained-argmax-first fast path, with the outputs compared.
//! 4. The KV cache kept across calls (`reuse_kv_cache`, a worker's session)
//!    against a new context per call: setup time, wall time, and whether
//!    the answers are the same.
//! 5. Worker start-to-ready (spawn → `Loaded`) and stop-to-exit (`Shutdown`
//!    → reaped): the cost of a phase switch.
//! 6. `judge` (not in the default sections): each model's level, evidence
//!    and rationale for five answers whose right level is known, to compare
//!    evaluators by eye: `BENCH_MODELS=smollm2,qwen BENCH_SECTIONS=judge`
//!    (qwen is the demo's Qwen2.5-Coder-0.5B, `viva models fetch
//!    qwen2.5-coder-0.5b-instruct-q4_k_m`).
//!
//! Environment: `VIVA_MODELS_DIR` (default `~/.cache/viva/models`),
//! `BENCH_MODELS` (default `smollm2,gemma`), `BENCH_THREADS` (default 2),
//! `BENCH_ITEMS` (submissions per table row, default 8), `BENCH_SECTIONS`
//! (default `batches,continuous,grammar,reuse,lifecycle`), `BENCH_REPEAT`
//! (rounds of the continuous and reuse tables, default 2),
//! `BENCH_CONTINUOUS` (rows of the continuous table as items x slots,
//! default `1x1,4x4,8x8,16x4,16x8`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use viva_llama_worker::engine::{CallStats, Engine};
use viva_models::protocol::{ModelSpec, decode, encode};
use viva_models::{DaemonMessage, EvaluateItem, PROTOCOL_VERSION, Rubric, WorkerMessage};

fn models_dir() -> PathBuf {
    match std::env::var_os("VIVA_MODELS_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/viva/models")
        }
    }
}

fn rubric() -> Rubric {
    serde_json::from_value(serde_json::json!({"criteria": [
        {"id": "content", "title": "Content", "weight": 2,
         "description": "Answers the question with correct, relevant ideas.",
         "levels": [
            {"label": "missing", "points": 0, "descriptor": "Does not address the question."},
            {"label": "partial", "points": 2, "descriptor": "Addresses part of the question."},
            {"label": "complete", "points": 4, "descriptor": "Answers fully and correctly."}]},
        {"id": "organisation", "title": "Organisation",
         "levels": [
            {"label": "unclear", "points": 0}, {"label": "mostly-clear", "points": 2},
            {"label": "clear", "points": 4}]},
        {"id": "language", "title": "Language",
         "levels": [
            {"label": "limited", "points": 0}, {"label": "adequate", "points": 2},
            {"label": "precise", "points": 4}]}
    ]}))
    .unwrap_or(Rubric { criteria: vec![] })
}

const TRANSCRIPTS: [&str; 8] = [
    "Plants use sunlight, water and carbon dioxide to make glucose and oxygen in the chloroplasts.",
    "Photosynthesis is when plants eat soil. It happens in the roots at night.",
    "Light energy becomes chemical energy. Inputs: water, carbon dioxide. Outputs: glucose, oxygen.",
    "Chlorophyll in the leaves absorbs light; the Calvin cycle then fixes carbon into sugar.",
    "I am not sure. Plants need light to grow, and they make oxygen, I think.",
    "First the light reactions split water and release oxygen, then the Calvin cycle makes glucose.",
    "Plants breathe in oxygen and breathe out carbon dioxide, like us, and that is photosynthesis.",
    "In the chloroplast, light, water and carbon dioxide produce glucose and oxygen. In conclusion, \
     leaves feed the plant.",
];

fn items(n: usize) -> Vec<EvaluateItem> {
    (0..n)
        .map(|i| EvaluateItem {
            submission_id: format!("s{i}"),
            assignment_prompt: "Explain how plants turn sunlight into food: inputs, outputs, \
                                and where it happens."
                .into(),
            rubric: rubric(),
            transcript: TRANSCRIPTS[i % TRANSCRIPTS.len()].into(),
            exemplars: Vec::new(),
            language: None,
        })
        .collect()
}

fn run(engine: &Engine, items: &[EvaluateItem]) -> (Vec<String>, CallStats, f64) {
    let started = Instant::now();
    let (outcomes, stats) =
        match engine.evaluate(items, "bench", &AtomicBool::new(false), &mut |_, _| {}) {
            Ok(r) => r,
            Err(e) => panic!("evaluation failed: {e}"),
        };
    let wall = started.elapsed().as_secs_f64();
    let answers = outcomes
        .iter()
        .map(|o| match &o.evaluation {
            Some(e) => serde_json::to_string(&e.ratings).unwrap_or_default(),
            None => format!("error: {:?}", o.error),
        })
        .collect();
    (answers, stats, wall)
}

/// Five answers with the content level a teacher would give.
const JUDGED: [(&str, &str); 5] = [
    (
        "Plants use sunlight, water and carbon dioxide to make glucose and oxygen in the chloroplasts.",
        "complete",
    ),
    (
        "Photosynthesis is when plants eat soil. It happens in the roots at night.",
        "missing",
    ),
    (
        "I am not sure. Plants need light to grow, and they make oxygen, I think.",
        "partial",
    ),
    (
        "Plants breathe in oxygen and breathe out carbon dioxide, like us, and that is photosynthesis.",
        "missing",
    ),
    (
        "In the chloroplast, light, water and carbon dioxide produce glucose and oxygen. In conclusion, \
         leaves feed the plant.",
        "complete",
    ),
];

fn bench_judge(name: &str, engine: &Engine) {
    let items: Vec<EvaluateItem> = JUDGED
        .iter()
        .enumerate()
        .map(|(i, (t, _))| EvaluateItem {
            submission_id: format!("j{i}"),
            assignment_prompt: "Explain how plants turn sunlight into food: inputs, outputs, \
                                and where it happens."
                .into(),
            rubric: rubric(),
            transcript: (*t).into(),
            language: Some("en".into()),
            exemplars: Vec::new(),
        })
        .collect();
    let started = Instant::now();
    let (outcomes, _) =
        match engine.evaluate(&items, "bench", &AtomicBool::new(false), &mut |_, _| {}) {
            Ok(r) => r,
            Err(e) => panic!("evaluation failed: {e}"),
        };
    println!(
        "\n## {name}: judgements of five answers ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("| answer | right content level | content level | evidence | rationale |");
    println!("|---|---|---|---|---|");
    let short = |s: &str, n: usize| s.chars().take(n).collect::<String>().replace('|', "/");
    let mut right = 0;
    for ((text, want), o) in JUDGED.iter().zip(&outcomes) {
        let rating = o
            .evaluation
            .as_ref()
            .and_then(|e| e.ratings.iter().find(|r| r.criterion_id == "content"));
        let (level, evidence, rationale) = rating
            .map(|r| (r.level.as_str(), r.evidence.as_str(), r.rationale.as_str()))
            .unwrap_or(("(error)", "", ""));
        right += usize::from(level == *want);
        println!(
            "| {} | {want} | {level} | {} | {} |",
            short(text, 40),
            short(evidence, 50),
            short(rationale, 70)
        );
    }
    println!("\n{name}: {right} of {} content levels right", JUDGED.len());
}

fn bench_items() -> usize {
    std::env::var("BENCH_ITEMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(8)
}

fn bench_batches(name: &str, engine: &mut Engine) {
    let n = bench_items();
    println!(
        "\n## {name}: batched decoding (threads {})",
        engine.options().threads.unwrap_or(0)
    );
    println!(
        "| batch | items | prompt tok | prompt tok/s | gen tok | gen tok/s | steps | wall s | items/s | gen ratio | items/s ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let base_options = engine.options().clone();
    // One at a time: n items, each decoded alone.
    let mut options = base_options.clone();
    options.parallel = 1;
    engine.set_options(options);
    let (_, single, wall1) = run(engine, &items(n));
    let single_gen = single.generation_tokens_per_second();
    let single_items = n as f64 / wall1;
    print_row(1, &single, wall1, single_gen, single_items);
    for batch in [2usize, 4, 8] {
        let mut options = base_options.clone();
        options.parallel = batch as u32;
        engine.set_options(options);
        let (_, stats, wall) = run(engine, &items(n));
        print_row(batch, &stats, wall, single_gen, single_items);
    }
    engine.set_options(base_options);
}

fn print_row(batch: usize, s: &CallStats, wall: f64, single_gen: f64, single_items: f64) {
    let items_s = s.items as f64 / wall;
    println!(
        "| {batch} | {} | {} | {:.0} | {} | {:.1} | {} | {:.2} | {:.2} | {:.2}× | {:.2}× |",
        s.items,
        s.prompt_tokens,
        s.prompt_tokens_per_second(),
        s.generated_tokens,
        s.generation_tokens_per_second(),
        s.steps,
        wall,
        items_s,
        s.generation_tokens_per_second() / single_gen.max(1e-9),
        items_s / single_items.max(1e-9),
    );
}

/// (items, slots) of the continuous-batching table; `BENCH_CONTINUOUS`
/// (e.g. `16x4,16x8`) picks others.
const CONTINUOUS_ROWS: [(usize, u32); 5] = [(1, 1), (4, 4), (8, 8), (16, 4), (16, 8)];

fn continuous_rows() -> Vec<(usize, u32)> {
    let Ok(spec) = std::env::var("BENCH_CONTINUOUS") else {
        return CONTINUOUS_ROWS.to_vec();
    };
    spec.split(',')
        .filter_map(|r| {
            let (n, k) = r.trim().split_once('x')?;
            Some((n.parse().ok()?, k.parse().ok()?))
        })
        .filter(|&(n, k)| n > 0 && k > 0)
        .collect()
}

fn bench_repeat() -> usize {
    std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(2)
}

fn bench_continuous(name: &str, engine: &mut Engine) {
    let repeat = bench_repeat();
    println!(
        "\n## {name}: rounds against continuous batching, without and with shared prompt \
         prefixes (threads {}; modes alternate, best wall of {repeat})",
        engine.options().threads.unwrap_or(0)
    );
    println!(
        "| items | slots | mode | prompt tok decoded | prompt tok shared | gen tok | steps | best wall s | gen tok/s (wall) | items/s | × rounds | same answers |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let base = engine.options().clone();
    let modes = [
        ("rounds", false, false),
        ("continuous", true, false),
        ("rounds + prefix (default)", false, true),
        ("continuous + prefix", true, true),
    ];
    for (n, slots) in continuous_rows() {
        // Per mode: answers, stats, best wall.
        let mut results: Vec<Option<(Vec<String>, CallStats, f64)>> = vec![None; modes.len()];
        for _ in 0..repeat {
            for (k, (_, continuous, share)) in modes.into_iter().enumerate() {
                let mut options = base.clone();
                options.parallel = slots;
                options.continuous_batching = continuous;
                options.share_prompt_prefix = share;
                engine.set_options(options);
                let (answers, s, wall) = run(engine, &items(n));
                let best = results[k].as_ref().map_or(f64::MAX, |r| r.2);
                if wall < best {
                    results[k] = Some((answers, s, wall));
                }
            }
        }
        let Some((first, _, first_wall)) = results[0].clone() else {
            continue;
        };
        for ((mode, _, _), r) in modes.iter().zip(&results) {
            let Some((answers, s, wall)) = r else {
                continue;
            };
            println!(
                "| {n} | {slots} | {mode} | {} | {} | {} | {} | {wall:.2} | {:.1} | {:.2} | {:.2}× | {} |",
                s.prompt_tokens,
                s.prompt_tokens_shared,
                s.generated_tokens,
                s.steps,
                s.generated_tokens as f64 / wall,
                n as f64 / wall,
                first_wall / wall.max(1e-9),
                *answers == first,
            );
        }
    }
    engine.set_options(base);
}

fn bench_grammar(name: &str, engine: &mut Engine) {
    let n = bench_items().min(4);
    println!("\n## {name}: grammar sampling, one item at a time ({n} items)");
    println!("| path | gen tok | gen tok/s | full-vocabulary passes | fast accepts | wall s |");
    println!("|---|---|---|---|---|---|");
    let base = engine.options().clone();
    let mut results = Vec::new();
    for fast in [false, true] {
        let mut options = base.clone();
        options.parallel = 1;
        options.grammar_fast_path = fast;
        engine.set_options(options);
        let (answers, s, wall) = run(engine, &items(n));
        println!(
            "| {} | {} | {:.1} | {} | {} | {:.2} |",
            if fast {
                "fast (argmax first)"
            } else {
                "naive (whole vocabulary)"
            },
            s.generated_tokens,
            s.generation_tokens_per_second(),
            s.full_passes,
            s.fast_accepts,
            wall
        );
        results.push((answers, s));
    }
    engine.set_options(base);
    let speedup = results[1].1.generation_tokens_per_second()
        / results[0].1.generation_tokens_per_second().max(1e-9);
    println!(
        "\nfast path speed-up: {speedup:.2}×; identical output: {}",
        results[0].0 == results[1].0
    );
}

/// Calls of `call_size` items in one session, the worker's way (the
/// daemon's `eval_batch_size` items per call), with `reuse_kv_cache` on or
/// off: answers, summed stats, wall seconds, cells of the kept context.
fn run_session(
    engine: &mut Engine,
    n: usize,
    call_size: usize,
    reuse: bool,
) -> (Vec<String>, CallStats, f64, Option<u32>) {
    let mut options = engine.options().clone();
    options.reuse_kv_cache = reuse;
    engine.set_options(options);
    let all = items(n);
    let mut session = engine.session();
    let mut answers = Vec::new();
    let mut total = CallStats::default();
    let started = Instant::now();
    for call in all.chunks(call_size) {
        let (outcomes, stats) =
            match session.evaluate(call, "bench", &AtomicBool::new(false), &mut |_, _| {}) {
                Ok(r) => r,
                Err(e) => panic!("evaluation failed: {e}"),
            };
        answers.extend(outcomes.iter().map(|o| match &o.evaluation {
            Some(e) => serde_json::to_string(&e.ratings).unwrap_or_default(),
            None => format!("error: {:?}", o.error),
        }));
        total.add(&stats);
    }
    let wall = started.elapsed().as_secs_f64();
    let cells = session.context_cells();
    (answers, total, wall, cells)
}

fn bench_reuse(name: &str, engine: &mut Engine) {
    let n = bench_items();
    let repeat = bench_repeat();
    println!(
        "\n## {name}: KV cache kept across calls (reuse_kv_cache) against a new context per \
         call ({n} items, off and on alternately, {repeat} times)"
    );
    println!(
        "| calls of | reuse | contexts new/reused | setup ms per call | prompt tok/s | gen tok/s | wall s | kept cells | same answers as new contexts |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let base = engine.options().clone();
    for call_size in [1usize, 4] {
        let mut fresh_answers = None;
        let mut best = [f64::MAX; 2];
        for _ in 0..repeat {
            for (k, reuse) in [false, true].into_iter().enumerate() {
                let (answers, s, wall, cells) = run_session(engine, n, call_size, reuse);
                best[k] = best[k].min(wall);
                let calls = (s.contexts_created + s.contexts_reused).max(1);
                let same = match &fresh_answers {
                    None => {
                        fresh_answers = Some(answers);
                        "-".to_owned()
                    }
                    Some(f) => (answers == *f).to_string(),
                };
                println!(
                    "| {call_size} | {} | {}/{} | {:.1} | {:.0} | {:.1} | {:.2} | {} | {same} |",
                    if reuse { "on" } else { "off" },
                    s.contexts_created,
                    s.contexts_reused,
                    s.setup_seconds * 1000.0 / calls as f64,
                    s.prompt_tokens_per_second(),
                    s.generation_tokens_per_second(),
                    wall,
                    cells.map_or("-".into(), |c| c.to_string()),
                );
            }
        }
        println!(
            "| {call_size} | best wall off / on | | | | | {:.2} / {:.2} | | |",
            best[0], best[1]
        );
    }
    engine.set_options(base);
}

fn bench_lifecycle(name: &str, path: &std::path::Path, threads: u32) {
    println!("\n## {name}: worker start-to-ready and stop-to-exit (3 runs)");
    println!("| run | spawn → Loaded ms | load_ms (worker) | Shutdown → exit ms |");
    println!("|---|---|---|---|");
    for run in 1..=3 {
        match lifecycle(path, threads) {
            Ok((ready, load_ms, stop)) => println!(
                "| {run} | {:.0} | {load_ms} | {:.0} |",
                ready.as_secs_f64() * 1000.0,
                stop.as_secs_f64() * 1000.0
            ),
            Err(e) => println!("| {run} | failed: {e} | | |"),
        }
    }
}

fn lifecycle(path: &std::path::Path, threads: u32) -> Result<(Duration, u64, Duration), String> {
    // Every wait has a deadline; the worker is killed whatever happens.
    struct Worker(std::process::Child);
    impl Drop for Worker {
        fn drop(&mut self) {
            let _ = viva_test_process::wait(&mut self.0, Duration::ZERO);
        }
    }
    const FRAME: Duration = Duration::from_secs(300);
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_viva-llama-worker"))
        .args(["--role", "bench"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("no pipes".into());
    };
    let mut child = Worker(child);
    let frames = viva_test_process::Lines::spawn(stdout);
    let mut send = |m: &DaemonMessage| -> Result<(), String> {
        let buf = encode(m).map_err(|e| e.to_string())?;
        stdin.write_all(&buf).map_err(|e| e.to_string())
    };
    let next = || -> Result<WorkerMessage, String> {
        let line = frames
            .next(FRAME)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "worker closed stdout".to_string())?;
        decode(line.as_bytes()).map_err(|e| e.to_string())
    };
    next()?; // Hello
    send(&DaemonMessage::Hello {
        protocol: PROTOCOL_VERSION,
        daemon_version: "bench".into(),
    })?;
    send(&DaemonMessage::Load {
        model: ModelSpec {
            name: "bench".into(),
            path: path.display().to_string(),
            options: serde_json::json!({"threads": threads}),
        },
    })?;
    let load_ms = match next()? {
        WorkerMessage::Loaded { load_ms, .. } => load_ms,
        other => return Err(format!("expected Loaded, got {other:?}")),
    };
    let ready = started.elapsed();
    let stopping = Instant::now();
    send(&DaemonMessage::Shutdown)?;
    viva_test_process::wait(&mut child.0, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    Ok((ready, load_ms, stopping.elapsed()))
}

fn main() {
    let threads: u32 = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let wanted = std::env::var("BENCH_MODELS").unwrap_or_else(|_| "smollm2,gemma".into());
    let models = [
        ("smollm2", "smollm2-135m-instruct-q4_1.gguf"),
        ("gemma", "gemma-3-270m-q4_k_m.gguf"),
        ("qwen", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ];
    // llama.cpp's load chatter would bury the tables.
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    println!("# viva-llama-worker benchmarks (threads {threads})");
    for (name, file) in models {
        if !wanted.split(',').any(|w| w.trim() == name) {
            continue;
        }
        let path = models_dir().join(file);
        if !path.is_file() {
            println!(
                "\n{} is missing: run `viva models fetch` (or set VIVA_MODELS_DIR)",
                path.display()
            );
            continue;
        }
        let spec = ModelSpec {
            name: name.into(),
            path: path.display().to_string(),
            options: serde_json::json!({
                "threads": threads, "evidence_chars": 80, "rationale_chars": 80
            }),
        };
        let mut engine = match Engine::load(&spec) {
            Ok(e) => e,
            Err(e) => {
                println!("\n{name}: cannot load: {e}");
                continue;
            }
        };
        println!(
            "\n# {name} ({}), chat template: {}",
            path.display(),
            engine.template_source()
        );
        // Warm the page cache and the allocator.
        let _ = run(&engine, &items(1));
        let sections = std::env::var("BENCH_SECTIONS")
            .unwrap_or_else(|_| "batches,continuous,grammar,reuse,lifecycle".into());
        let want = |s: &str| sections.split(',').any(|w| w.trim() == s);
        if want("judge") {
            bench_judge(name, &engine);
        }
        if want("batches") {
            bench_batches(name, &mut engine);
        }
        if want("continuous") {
            bench_continuous(name, &mut engine);
        }
        if want("grammar") {
            bench_grammar(name, &mut engine);
        }
        if want("reuse") {
            bench_reuse(name, &mut engine);
        }
        if !want("lifecycle") {
            continue;
        }
        bench_lifecycle(name, &path, threads);
    }
}
