//! The calibration benchmark: how far the evaluators agree with an
//! instructor on a labelled set, through the real pipeline (not a test).
//!
//! ```text
//! cargo bench -p viva-tests --bench calibration
//! ```
//!
//! The labelled set is `tests/data/calibration/*.toml`: prompts with their
//! rubrics and spoken answers as text, each with the instructor's level per
//! criterion. espeak-ng reads every answer (voices alternate); a daemon with
//! the real workers (Whisper tiny.en, SmolLM2-135M as evaluator `a`,
//! Gemma-3-270M as `b`, models from `$VIVA_MODELS_DIR`) and the default
//! rubric plugin grades them; the instructor's levels go in as blind grades
//! over the API (`POST /api/v1/submissions/{id}/blind-grade`).
//!
//! Two runs per prompt, each on its own assignment:
//! - **without exemplars**: every answer;
//! - **with exemplars**: the answers marked `exemplar = true` are uploaded
//!   and blind-graded first and marked as exemplars
//!   (`PUT /api/v1/submissions/{id}/exemplar`), then the others are graded
//!   with those examples in the evaluators' prompt.
//!
//! The table compares both runs on the same answers (the non-exemplars),
//! per criterion and pooled, for evaluator a, b and the combined grade, with
//! [`viva_models::calibration`] — the code behind
//! `GET /api/v1/assignments/{id}/calibration`, whose verdicts on the runs
//! without exemplars (all answers) are printed too and cross-checked.
//!
//! `BENCH_CALIB_LIMIT=N` keeps the first N answers of each prompt (a quick
//! look); the numbers need the whole set.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use reqwest::Method;
use serde::Deserialize;
use viva_daemon::Role;
use viva_models::Rubric;
use viva_models::calibration::{self as stats, Agreement, Rated};
use viva_tests::real::use_real_workers;
use viva_tests::{TestDaemon, speech};

#[derive(Deserialize)]
struct Set {
    id: String,
    title: String,
    prompt: String,
    rubric: Rubric,
    answers: Vec<Answer>,
}

#[derive(Deserialize)]
struct Answer {
    text: String,
    levels: BTreeMap<String, String>,
    #[serde(default)]
    exemplar: bool,
}

/// One graded answer: the instructor's levels and what came back.
struct Outcome {
    set: usize,
    answer: usize,
    submission: serde_json::Value,
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/calibration")
}

fn load() -> anyhow::Result<Vec<Set>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .context("reading tests/data/calibration")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let limit: Option<usize> = std::env::var("BENCH_CALIB_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut sets = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let mut set: Set = toml::from_str(&text).with_context(|| format!("{}", f.display()))?;
        set.rubric
            .validate()
            .with_context(|| format!("rubric of {}", f.display()))?;
        for (i, a) in set.answers.iter().enumerate() {
            for c in &set.rubric.criteria {
                let l = a.levels.get(&c.id).with_context(|| {
                    format!("{} answer {i}: no level for {}", f.display(), c.id)
                })?;
                ensure!(
                    c.levels.iter().any(|x| &x.label == l),
                    "{} answer {i}: {l:?} is not a level of {}",
                    f.display(),
                    c.id
                );
            }
        }
        if let Some(n) = limit {
            set.answers.truncate(n.max(3));
        }
        sets.push(set);
    }
    Ok(sets)
}

async fn ok(
    d: &TestDaemon,
    method: Method,
    token: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (status, v) = d.send(method, token, path, body).await;
    ensure!((200..300).contains(&status), "{path}: {status} {v}");
    Ok(v)
}

async fn upload(
    d: &TestDaemon,
    sets: &[Set],
    assignment: &dyn Fn(&Set) -> String,
    pick: &dyn Fn(&Answer) -> bool,
) -> anyhow::Result<Vec<(usize, usize, String)>> {
    // Speech first, then the uploads in a burst: they form one STT batch
    // instead of one per synthesis.
    let mut files = Vec::new();
    for (si, set) in sets.iter().enumerate() {
        let aid = assignment(set);
        for (ai, a) in set.answers.iter().enumerate().filter(|(_, a)| pick(a)) {
            let voice = ["en-us", "en-gb", "en-us+f3"][ai % 3];
            let media = speech(d.dir.path(), &format!("{aid}-{ai}.wav"), &a.text, voice);
            files.push((si, ai, aid.clone(), media));
        }
    }
    let mut out = Vec::new();
    for (si, ai, aid, media) in files {
        let token = d.token(Role::Learner, &format!("student-{aid}-{ai}"), "sandbox");
        let (status, body) = d.upload(&token, &aid, &media).await;
        ensure!(status == 201, "upload {aid}/{ai}: {status} {body}");
        let id = body["id"].as_str().context("submission id")?.to_owned();
        out.push((si, ai, id));
    }
    Ok(out)
}

async fn grade(
    d: &TestDaemon,
    teacher: &str,
    sets: &[Set],
    subs: &[(usize, usize, String)],
) -> anyhow::Result<Vec<Outcome>> {
    let ids: Vec<String> = subs.iter().map(|s| s.2.clone()).collect();
    let done = d.wait_scored(&ids, Duration::from_secs(3600)).await;
    let mut out = Vec::new();
    for ((si, ai, id), s) in subs.iter().zip(done) {
        ensure!(
            s["state"] != "failed",
            "{id} failed: {}",
            s["failure_reason"]
        );
        let levels = &sets[*si].answers[*ai].levels;
        ok(
            d,
            Method::POST,
            teacher,
            &format!("/api/v1/submissions/{id}/blind-grade"),
            Some(serde_json::json!({ "levels": levels })),
        )
        .await?;
        out.push(Outcome {
            set: *si,
            answer: *ai,
            submission: s,
        });
    }
    Ok(out)
}

/// The pairs (grader, instructor) for one criterion id (or every criterion,
/// `None`) over `outcomes`.
fn pairs(sets: &[Set], outcomes: &[&Outcome], grader: &str, criterion: Option<&str>) -> Vec<Rated> {
    let mut v = Vec::new();
    for o in outcomes {
        let set = &sets[o.set];
        let answer = &set.answers[o.answer];
        for c in &set.rubric.criteria {
            if criterion.is_some_and(|id| id != c.id) {
                continue;
            }
            let Some(instructor) = answer
                .levels
                .get(&c.id)
                .and_then(|l| stats::rank_of_level(c, l))
            else {
                continue;
            };
            let s = &o.submission;
            let grade = if grader == "combined" {
                s["score"]["report"]["criteria"]
                    .as_array()
                    .and_then(|l| l.iter().find(|x| x["criterion_id"] == c.id.as_str()))
                    .and_then(|x| x["points"].as_f64())
                    .map(|p| stats::rank_of_points(c, p))
            } else {
                s["evaluations"]
                    .as_array()
                    .and_then(|l| l.iter().find(|e| e["role"] == grader))
                    .and_then(|e| e["ratings"].as_array())
                    .and_then(|l| l.iter().find(|r| r["criterion_id"] == c.id.as_str()))
                    .and_then(|r| r["level"].as_str())
                    .and_then(|l| stats::rank_of_level(c, l))
            };
            if let Some(g) = grade {
                v.push(Rated {
                    grader: g,
                    instructor,
                    levels: c.levels.len(),
                });
            }
        }
    }
    v
}

/// Two decimals, without a negative zero.
fn two(x: f64) -> String {
    let x = if x.abs() < 0.005 { 0.0 } else { x };
    format!("{x:+.2}")
}

/// exact | adjacent | QWK [CI] | mean difference, or dashes.
fn cells(a: Option<&Agreement>) -> String {
    match a {
        None => "— | — | — | —".into(),
        Some(a) => {
            let q = match (a.qwk, a.qwk_ci95) {
                (Some(q), Some([lo, hi])) => format!("{} [{}, {}]", two(q), two(lo), two(hi)),
                (Some(q), None) => two(q),
                (None, _) => "undefined".into(),
            };
            format!(
                "{:.2} | {:.2} | {q} | {}",
                a.exact,
                a.adjacent,
                two(a.mean_difference)
            )
        }
    }
}

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("calibration benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let sets = load()?;
    let n: usize = sets.iter().map(|s| s.answers.len()).sum();
    let ex: usize = sets
        .iter()
        .map(|s| s.answers.iter().filter(|a| a.exemplar).count())
        .sum();
    if sets.is_empty() {
        bail!("no labelled sets in {}", data_dir().display());
    }
    println!(
        "calibration benchmark: {} prompts, {n} spoken answers ({ex} exemplars), real workers",
        sets.len()
    );
    let started = Instant::now();
    let d = TestDaemon::start_scoring(&[], |c| {
        use_real_workers(c);
        for w in c.workers.evaluators.values_mut() {
            // Short fields keep the run within minutes on two cores.
            w.options
                .insert("evidence_chars".into(), toml::Value::Integer(60));
            w.options
                .insert("rationale_chars".into(), toml::Value::Integer(80));
        }
        c.scheduler.batch_window = Duration::from_secs(5);
        c.scheduler.stt_batch_size = 64;
        c.scheduler.eval_batch_size = 8;
        c.workers.load_timeout = Duration::from_secs(180);
        c.workers.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    for set in &sets {
        for run in ["plain", "anchored"] {
            ok(
                &d,
                Method::POST,
                &teacher,
                "/api/v1/assignments",
                Some(serde_json::json!({
                    "id": format!("{}-{run}", set.id),
                    "title": set.title, "prompt": set.prompt, "rubric": set.rubric,
                    "release_policy": "manual"
                })),
            )
            .await?;
        }
    }
    let plain_of = |s: &Set| format!("{}-plain", s.id);
    let anchored_of = |s: &Set| format!("{}-anchored", s.id);

    // Run 1: every answer without examples, and the examples themselves.
    let mut first = upload(&d, &sets, &plain_of, &|_| true).await?;
    let examples = upload(&d, &sets, &anchored_of, &|a| a.exemplar).await?;
    first.extend(examples.iter().cloned());
    let graded = grade(&d, &teacher, &sets, &first).await?;
    let t_plain = started.elapsed();
    for (_, _, id) in &examples {
        ok(
            &d,
            Method::PUT,
            &teacher,
            &format!("/api/v1/submissions/{id}/exemplar"),
            None,
        )
        .await?;
    }
    // Run 2: the other answers, with the examples in the prompt.
    let second = upload(&d, &sets, &anchored_of, &|a| !a.exemplar).await?;
    let anchored = grade(&d, &teacher, &sets, &second).await?;
    let wall = started.elapsed();

    let plain_ids: std::collections::HashSet<&str> = first[..first.len() - examples.len()]
        .iter()
        .map(|s| s.2.as_str())
        .collect();
    let plain: Vec<&Outcome> = graded
        .iter()
        .filter(|o| {
            o.submission["id"]
                .as_str()
                .is_some_and(|id| plain_ids.contains(id))
        })
        .collect();
    let plain_same: Vec<&Outcome> = plain
        .iter()
        .copied()
        .filter(|o| !sets[o.set].answers[o.answer].exemplar)
        .collect();
    let with: Vec<&Outcome> = anchored.iter().collect();

    let mut criteria: Vec<String> = sets
        .iter()
        .flat_map(|s| s.rubric.criteria.iter().map(|c| c.id.clone()))
        .collect();
    criteria.sort();
    criteria.dedup();
    println!();
    println!(
        "Agreement with the instructor on the {} answers that are not exemplars \
         (exact and adjacent agreement, QWK with its 95% bootstrap interval, mean \
         difference grader − instructor in levels; without and with exemplars):",
        plain_same.len()
    );
    println!();
    println!(
        "| grader | criterion | n | exact | adjacent | QWK [95% CI] | mean diff \
         | exact (with) | adjacent (with) | QWK [95% CI] (with) | mean diff (with) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for grader in ["a", "b", "combined"] {
        for c in criteria.iter().map(|c| Some(c.as_str())).chain([None]) {
            let without = stats::agreement(&pairs(&sets, &plain_same, grader, c));
            let within = stats::agreement(&pairs(&sets, &with, grader, c));
            let n = |a: &Option<Agreement>| a.as_ref().map_or(0, |a| a.n);
            let count = if n(&without) == n(&within) {
                n(&without).to_string()
            } else {
                format!("{} / {}", n(&without), n(&within))
            };
            println!(
                "| {grader} | {} | {count} | {} | {} |",
                c.unwrap_or("overall"),
                cells(without.as_ref()),
                cells(within.as_ref())
            );
        }
    }

    // The examples really reached the real evaluators: their prompts grew.
    let prompt_tokens = |list: &[&Outcome]| -> f64 {
        let v: Vec<f64> = list
            .iter()
            .flat_map(|o| {
                o.submission["evaluations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|e| e["prompt_tokens"].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (before, after) = (prompt_tokens(&plain_same), prompt_tokens(&with));
    println!();
    println!("Mean evaluator prompt: {before:.0} tokens without exemplars, {after:.0} with them.");
    ensure!(
        after > before + 20.0,
        "the exemplars did not reach the evaluators' prompts ({before:.0} → {after:.0} tokens)"
    );

    // What the instructor sees: the route's verdicts on the runs without
    // exemplars (every answer), cross-checked against the table's code.
    println!();
    println!("The instructor's view (GET /api/v1/assignments/{{id}}/calibration, all answers):");
    for (si, set) in sets.iter().enumerate() {
        let aid = plain_of(set);
        let r = ok(
            &d,
            Method::GET,
            &teacher,
            &format!("/api/v1/assignments/{aid}/calibration"),
            None,
        )
        .await?;
        let mine: Vec<&Outcome> = plain.iter().copied().filter(|o| o.set == si).collect();
        let local = stats::agreement(&pairs(&sets, &mine, "combined", None));
        let route = r["overall"]
            .as_array()
            .and_then(|l| l.iter().find(|g| g["grader"] == "combined"))
            .cloned()
            .unwrap_or_default();
        ensure!(
            route["n"].as_u64() == local.as_ref().map(|a| a.n as u64)
                && route["exact"]
                    .as_f64()
                    .zip(local.as_ref().map(|a| a.exact))
                    .is_some_and(|(x, y)| (x - y).abs() < 1e-9)
                && route["qwk"].as_f64().map(|q| (q * 1e9).round())
                    == local
                        .as_ref()
                        .and_then(|a| a.qwk)
                        .map(|q| (q * 1e9).round()),
            "{aid}: the route's overall {route} differs from the benchmark's {local:?}"
        );
        println!("- {aid}: {}", r["verdict"].as_str().unwrap_or_default());
    }
    println!();
    // The machine's load says how far the wall time is this code's.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "wall {:.0} s (run without exemplars and the examples {:.0} s, run with exemplars {:.0} s); \
         load average at the end {}",
        wall.as_secs_f64(),
        t_plain.as_secs_f64(),
        (wall - t_plain).as_secs_f64(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    d.stop().await;
    Ok(())
}
