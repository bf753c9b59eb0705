//! 5. Phase switching at GPU scale, simulated on this machine.
//!
//! The fake workers take a profile of one H100 running Whisper large-v3 and
//! two 8 B Q4_K_M evaluators (`H100`, sources in ARCHITECTURE.md, "Cost-aware
//! phase switching"), with every time — loads, transcription, evaluation,
//! arrivals, the batch window and `max_phase_wait` — divided by
//! `BENCH_GPU_SCALE` (100), so an hour of uploads runs in about 40 s
//! (`BENCH_GPU_SCENARIOS=trickle,burst,lab` picks scenarios). The
//! scheduler's rules only compare times with each other, so the decisions
//! are those it would take at full scale; its own overhead (milliseconds)
//! is what the scaling magnifies. Reported at full scale: wall time, phase
//! changes (STT ↔ evaluation), worker starts, time spent loading, latency
//! (upload to evaluated) p50/p95 and the longest wait for a phase, for
//! today's two-phase (every switch at once), cost-aware two-phase (the
//! default) and pipelined (both kinds loaded: needs memory for all three
//! models), against a lower bound.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use viva_daemon::Role;
use viva_daemon::config::Policy;
use viva_tests::gpu_profile::{H100, Profile};
use viva_tests::{TestDaemon, tone};

use super::{Goal, Row, Section, pct, sorted};

/// Every upload's clip (s, full scale).
const CLIP: f64 = 45.0;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Eager,
    CostAware,
    Pipelined,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "two-phase, switch at once (before)",
            Mode::CostAware => "two-phase, cost-aware (default)",
            Mode::Pipelined => "pipelined (all models loaded)",
        }
    }
}

struct Outcome {
    wall: f64,
    /// Upload times as the daemon recorded them (full-scale seconds).
    arrivals: Vec<f64>,
    phase_changes: usize,
    starts: usize,
    loading: f64,
    latency: Vec<f64>,
    max_phase_wait: f64,
}

/// A small deterministic generator (the same arrivals for every policy).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Arrival times (full-scale seconds from the start) of each scenario.
fn arrivals(scenario: &str) -> Vec<f64> {
    let mut rng = Lcg(42);
    match scenario {
        // One upload every 20–60 s.
        "trickle" => {
            let mut t = 0.0;
            (0..200)
                .map(|_| {
                    let at = t;
                    t += 20.0 + 40.0 * rng.next();
                    at
                })
                .collect()
        }
        // 30 students at once.
        "burst" => vec![0.0; 30],
        // Four classes of 25, each uploading within 15 minutes, an hour apart.
        _ => {
            let mut v: Vec<f64> = (0..4)
                .flat_map(|c| (0..25).map(move |_| c as f64 * 3600.0))
                .map(|base| base + 900.0 * rng.next())
                .collect();
            v.sort_by(f64::total_cmp);
            v
        }
    }
}

/// The lower bound at full scale ([`Profile::lower_bound`]).
fn lower_bound(p: &Profile, arrivals: &[f64]) -> f64 {
    let uploads: Vec<(f64, f64)> = arrivals.iter().map(|&a| (a, CLIP)).collect();
    p.lower_bound(&uploads)
}

async fn run(p: &Profile, scale: f64, at: &[f64], mode: Mode) -> anyhow::Result<Outcome> {
    // The tones are `scale` times shorter too: the real-time factor stays.
    let stt_env = p.stt_env(scale, true);
    let eval_env = p.eval_env(scale);
    let secs = |s: f64| Duration::from_secs_f64(s / scale);
    let d = TestDaemon::start(&[], move |c| {
        c.scheduler.policy = if mode == Mode::Pipelined {
            Policy::Pipelined
        } else {
            Policy::TwoPhase
        };
        c.scheduler.swap_work_ratio = if mode == Mode::CostAware { 1.0 } else { 0.0 };
        c.scheduler.max_phase_wait = secs(300.0);
        c.scheduler.batch_window = secs(120.0);
        c.scheduler.idle_unload_after = secs(600.0);
        c.scheduler.stt_batch_size = 10;
        c.scheduler.eval_batch_size = 4;
        c.intake.max_uploads_per_user = 0;
        c.intake.max_bytes_per_user_per_day = 0;
        c.limits.uploads_per_user_per_minute = 0;
        c.limits.uploads_per_ip_per_minute = 0;
        if let Some(w) = c.workers.stt.as_mut() {
            w.env
                .extend(stt_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        }
        for w in c.workers.evaluators.values_mut() {
            w.env
                .extend(eval_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        }
    })
    .await;
    let clip = std::fs::read(tone(d.dir.path(), "clip.wav", CLIP / scale))?;
    let url = format!(
        "{}/api/v1/assignments/sandbox-oral-1/submissions?filename=clip.wav",
        d.url
    );
    let client = reqwest::Client::new();
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, &a) in at.iter().enumerate() {
        let token = d.token(Role::Learner, &format!("student-{i}"), "sandbox");
        let (client, url, clip) = (client.clone(), url.clone(), clip.clone());
        let when = t0 + Duration::from_secs_f64(a / scale);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(when).await;
            let r = client
                .post(&url)
                .bearer_auth(token)
                .body(clip)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "upload answered {}", r.status());
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("uploader panicked")??;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        let left: i64 = d
            .state
            .store
            .read(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM submissions WHERE state NOT IN ('evaluated', 'failed')",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} submissions were not evaluated within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Per submission: upload, STT start and end, first evaluation start, last end.
    type Times = (i64, i64, i64, i64, i64);
    let rows: Vec<Times> = d
        .state
        .store
        .read(|c| {
            let mut stmt = c.prepare(
                "SELECT s.created_at,
                        MAX(CASE WHEN j.stage = 'stt' THEN j.started_at END),
                        MAX(CASE WHEN j.stage = 'stt' THEN j.finished_at END),
                        MIN(CASE WHEN j.stage = 'eval' THEN j.started_at END),
                        MAX(CASE WHEN j.stage = 'eval' THEN j.finished_at END)
                 FROM submissions s JOIN jobs j ON j.submission_id = s.id
                 GROUP BY s.id",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<viva_daemon::db::Result<Vec<Times>>>()?;
            Ok(rows)
        })
        .await?;
    let s = |ms: i64| ms as f64 / 1000.0 * scale;
    // From the first upload the daemon recorded: intake (ffmpeg, 50–100 ms
    // of this machine per upload) is not GPU time, but it is magnified by
    // the scale like everything else, so arrivals are taken as recorded.
    let first = rows.iter().map(|r| r.0).min().unwrap_or(0);
    let last = rows.iter().map(|r| r.4).max().unwrap_or(first);
    let wall = s(last - first);
    let mut recorded: Vec<f64> = rows.iter().map(|r| s(r.0 - first)).collect();
    recorded.sort_by(f64::total_cmp);
    let latency = sorted(rows.iter().map(|r| s(r.4 - r.0)).collect());
    let max_phase_wait = rows
        .iter()
        .map(|r| s(r.1 - r.0).max(s(r.3 - r.2)))
        .fold(0.0, f64::max);
    let phases: Vec<&str> = d
        .state
        .scheduler
        .phase_history()
        .iter()
        .map(|c| c.phase)
        .filter(|p| *p != "idle")
        .collect();
    let phase_changes = phases.windows(2).filter(|w| w[0] != w[1]).count() + 1;
    let events = d.fake_events();
    let mut started_at: HashMap<i64, i64> = HashMap::new();
    let mut loading = 0.0;
    let mut starts = 0;
    for e in &events {
        let (Some(pid), Some(t)) = (e["pid"].as_i64(), e["t_ms"].as_i64()) else {
            continue;
        };
        match e["ev"].as_str() {
            Some("start") => {
                starts += 1;
                started_at.insert(pid, t);
            }
            Some("loaded") => {
                if let Some(t0) = started_at.get(&pid) {
                    loading += s(t - t0);
                }
            }
            _ => {}
        }
    }
    d.stop().await;
    Ok(Outcome {
        wall,
        arrivals: recorded,
        phase_changes,
        starts,
        loading,
        latency,
        max_phase_wait,
    })
}

pub(super) async fn bench_gpu_scale() -> anyhow::Result<Section> {
    let scale = super::env_num("BENCH_GPU_SCALE", 100.0f64).max(1.0);
    let p = H100;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let only = std::env::var("BENCH_GPU_SCENARIOS").unwrap_or_default();
    for scenario in ["trickle", "burst", "lab day"] {
        if !only.is_empty() && !only.split(',').any(|s| scenario.starts_with(s.trim())) {
            continue;
        }
        let at = arrivals(scenario);
        let mut out = Vec::new();
        for mode in [Mode::Eager, Mode::CostAware, Mode::Pipelined] {
            let o = run(&p, scale, &at, mode)
                .await
                .with_context(|| format!("{scenario}, {}", mode.name()))?;
            let bound = lower_bound(&p, &o.arrivals);
            rows.push(Row::info(
                format!("{scenario}: {}: wall", mode.name()),
                o.wall,
                "s",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: wall / lower bound", mode.name()),
                o.wall / bound,
                "x",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: phase changes", mode.name()),
                o.phase_changes as f64,
                "",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: worker starts", mode.name()),
                o.starts as f64,
                "",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: time loading", mode.name()),
                o.loading,
                "s",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: latency p50", mode.name()),
                pct(&o.latency, 0.5),
                "s",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: latency p95", mode.name()),
                pct(&o.latency, 0.95),
                "s",
            ));
            rows.push(Row::info(
                format!("{scenario}: {}: longest wait for a phase", mode.name()),
                o.max_phase_wait,
                "s",
            ));
            out.push(o);
        }
        let (eager, cost) = (&out[0], &out[1]);
        if scenario == "trickle" {
            rows.push(Row::target(
                "trickle: cost-aware phase changes / before",
                cost.phase_changes as f64 / eager.phase_changes.max(1) as f64,
                "x",
                Goal::AtMost(0.2),
            ));
            rows.push(Row::target(
                "trickle: cost-aware time loading / before",
                cost.loading / eager.loading.max(1e-9),
                "x",
                Goal::AtMost(0.2),
            ));
            rows.push(Row::target(
                "trickle: cost-aware longest wait for a phase",
                cost.max_phase_wait,
                "s",
                Goal::AtMost(300.0),
            ));
            rows.push(Row::target(
                "trickle: cost-aware latency p95 (upload to evaluated)",
                pct(&cost.latency, 0.95),
                "s",
                Goal::AtMost(300.0),
            ));
        } else {
            rows.push(Row::target(
                format!("{scenario}: cost-aware wall / before"),
                cost.wall / eager.wall.max(1e-9),
                "x",
                Goal::AtMost(1.05),
            ));
        }
        notes.push(format!(
            "{scenario}: {} uploads; lower bound {:.0} s (with the arrivals of the cost-aware run)",
            at.len(),
            lower_bound(&p, &cost.arrivals)
        ));
    }
    notes.push(format!(
        "times are at full scale; the run was {scale}x faster (BENCH_GPU_SCALE). Profile: \
         Whisper large-v3 load {} s, {} s + {} x audio per clip of {} s; each 8 B evaluator load {} s, \
         {} s + {} s per item per call; max_phase_wait 300 s, batch of 10 or 120 s, calls of 4.",
        p.stt_load, p.stt_fixed, p.stt_rtf, CLIP, p.eval_load, p.eval_fixed, p.eval_per_item
    ));
    notes.push(
        "longest wait for a phase: upload to its transcription's start, or transcript to its first \
         evaluation's start, whichever is longer (the bound is max_phase_wait, plus the loads and \
         the phase ahead of it)."
            .into(),
    );
    Ok(Section {
        title: "5. Phase switching at GPU scale (simulated; one H100 profile)".into(),
        rows,
        notes,
    })
}
