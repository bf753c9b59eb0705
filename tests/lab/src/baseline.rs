//! The alternatives Viva is measured against, on the same worker binaries
//! and models, driven directly through the daemon's [`Supervisor`]:
//!
//! - *traditional sequential* (the design log's "30 × 50 s"): for each
//!   submission in arrival order, load Whisper, transcribe, unload, load
//!   evaluator A, evaluate, unload, load evaluator B, evaluate, unload;
//! - *sequential, models kept loaded*: the three models loaded once, each
//!   submission transcribed then evaluated by A then B, one at a time.
//!
//! Both normalise each upload with ffmpeg first, as Viva's intake does.
//! The kept-loaded run also measures one evaluator call at the best batch
//! size, for the lower bound.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use tokio::sync::mpsc;
use viva_daemon::config::WorkerConfig;
use viva_daemon::workers::{Supervisor, WorkerHandle, WorkerSpec, WorkerTimeouts};
use viva_models::protocol::ModelSpec;
use viva_models::{
    EvaluateItem, EvaluateRequest, JobPayload, JobResult, Rubric, TranscribeRequest, WorkerKind,
};

use crate::media::{self, Student};

/// The lab's three workers.
#[derive(Clone)]
pub struct Workers {
    pub stt: WorkerConfig,
    /// (role, worker) in role order.
    pub evaluators: Vec<(String, WorkerConfig)>,
}

fn spec(slot: &str, kind: WorkerKind, role: Option<&str>, c: &WorkerConfig) -> WorkerSpec {
    WorkerSpec {
        slot: slot.to_owned(),
        kind,
        role: role.map(str::to_owned),
        command: c.command.clone(),
        args: c.args.clone(),
        env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        model: ModelSpec {
            name: c.model.clone(),
            path: c.model_path.display().to_string(),
            options: serde_json::to_value(&c.options).unwrap_or_default(),
        },
        memory_mb: c.memory_mb,
    }
}

/// One student's path through a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub user: String,
    pub arrival_seconds: f64,
    pub started_seconds: f64,
    pub done_seconds: f64,
    pub latency_seconds: f64,
    pub stt_seconds: f64,
    pub eval_seconds: f64,
    pub failed: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct BaselineRun {
    pub name: String,
    pub wall_seconds: f64,
    pub students: Vec<Timing>,
    /// Model load times (spawn → loaded), per model, in milliseconds.
    pub load_ms: BTreeMap<String, Vec<u64>>,
    pub peak_rss_bytes: u64,
    /// Pure compute: seconds of each transcription.
    pub stt_compute: Vec<f64>,
    /// Pure compute per role: seconds of each single-item evaluation.
    pub eval_compute: BTreeMap<String, Vec<f64>>,
    /// Per role: (items, seconds) of one call at the best batch size.
    pub eval_batched: BTreeMap<String, (usize, f64)>,
    pub normalize_seconds: Vec<f64>,
}

struct Ctx {
    sup: Supervisor,
    rubric: Rubric,
    prompt: String,
    work: std::path::PathBuf,
}

fn supervisor() -> Supervisor {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Exits are reported by the handles' own errors here; drain the channel.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    Supervisor::new(
        env!("CARGO_PKG_VERSION"),
        WorkerTimeouts {
            handshake: Duration::from_secs(60),
            load: Duration::from_secs(600),
            stop_grace: Duration::from_secs(5),
        },
        tx,
    )
}

async fn start(
    ctx: &Ctx,
    run: &mut BaselineRun,
    slot: &str,
    kind: WorkerKind,
    role: Option<&str>,
    c: &WorkerConfig,
) -> anyhow::Result<WorkerHandle> {
    let h = ctx
        .sup
        .start(spec(slot, kind, role, c))
        .await
        .with_context(|| format!("starting the {slot} worker ({})", c.command.display()))?;
    run.load_ms
        .entry(c.model.clone())
        .or_default()
        .push(h.load_ms());
    Ok(h)
}

async fn transcribe(h: &WorkerHandle, wav: &Path) -> anyhow::Result<(String, f64)> {
    let secs = media::wav_seconds(wav)?;
    let t = Instant::now();
    let r = h
        .call(
            JobPayload::Transcribe(TranscribeRequest {
                wav_path: wav.display().to_string(),
                audio_seconds: secs,
                language: None,
                initial_prompt: None,
            }),
            None,
        )
        .await
        .map_err(|e| anyhow!("transcription failed: {e}"))?;
    let JobResult::Transcript(tr) = r else {
        bail!("the STT worker answered with something else than a transcript");
    };
    Ok((tr.text, t.elapsed().as_secs_f64()))
}

async fn evaluate(
    ctx: &Ctx,
    h: &WorkerHandle,
    transcripts: &[(String, String)],
) -> anyhow::Result<f64> {
    let items = transcripts
        .iter()
        .map(|(id, text)| EvaluateItem {
            submission_id: id.clone(),
            assignment_prompt: ctx.prompt.clone(),
            rubric: ctx.rubric.clone(),
            transcript: text.clone(),
            exemplars: Vec::new(),
            language: None,
        })
        .collect();
    let t = Instant::now();
    let r = h
        .call(JobPayload::Evaluate(EvaluateRequest { items }), None)
        .await
        .map_err(|e| anyhow!("evaluation failed: {e}"))?;
    if !matches!(r, JobResult::Evaluations(_)) {
        bail!("the evaluator answered with something else than evaluations");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Runs one baseline. `keep_loaded` selects the variant.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    name: &str,
    keep_loaded: bool,
    workers: &Workers,
    students: &[Student],
    rubric: &Rubric,
    work: &Path,
    best_batch: usize,
    progress: &dyn Fn(&str),
) -> anyhow::Result<BaselineRun> {
    let ctx = Ctx {
        sup: supervisor(),
        rubric: rubric.clone(),
        prompt: media::PROMPT.to_owned(),
        work: work.join(name),
    };
    std::fs::create_dir_all(&ctx.work)?;
    let mut run = BaselineRun {
        name: name.to_owned(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut loaded: Option<(WorkerHandle, Vec<(String, WorkerHandle)>)> = None;
    if keep_loaded {
        let stt = start(&ctx, &mut run, "stt", WorkerKind::Stt, None, &workers.stt).await?;
        let mut evs = Vec::new();
        for (role, c) in &workers.evaluators {
            let slot = format!("evaluator:{role}");
            evs.push((
                role.clone(),
                start(&ctx, &mut run, &slot, WorkerKind::Evaluator, Some(role), c).await?,
            ));
        }
        loaded = Some((stt, evs));
    }
    let mut order: Vec<&Student> = students.iter().collect();
    order.sort_by(|a, b| a.arrival_seconds.total_cmp(&b.arrival_seconds));
    let mut transcripts = Vec::new();
    for (i, s) in order.iter().enumerate() {
        let wait = s.arrival_seconds - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let started = t0.elapsed().as_secs_f64();
        let mut timing = Timing {
            user: s.user.clone(),
            arrival_seconds: s.arrival_seconds,
            started_seconds: started,
            done_seconds: 0.0,
            latency_seconds: 0.0,
            stt_seconds: 0.0,
            eval_seconds: 0.0,
            failed: None,
        };
        let wav = ctx.work.join(format!("{}.wav", s.user));
        let tn = Instant::now();
        let norm = {
            let (input, out) = (s.file.clone(), wav.clone());
            tokio::task::spawn_blocking(move || media::normalize(&input, &out)).await?
        };
        run.normalize_seconds.push(tn.elapsed().as_secs_f64());
        let outcome: anyhow::Result<()> = async {
            norm.context("the file is not usable media")?;
            // The same work as Viva: its intake refuses a silent recording
            // (`no_speech`) after normalising it, so the baselines do too.
            if s.kind == media::Kind::Silent {
                bail!("nothing audible: refused at upload, as Viva's intake does");
            }
            let ts = Instant::now();
            let (text, compute) = match &loaded {
                Some((stt, _)) => transcribe(stt, &wav).await?,
                None => {
                    let h =
                        start(&ctx, &mut run, "stt", WorkerKind::Stt, None, &workers.stt).await?;
                    let r = transcribe(&h, &wav).await;
                    h.stop().await;
                    r?
                }
            };
            run.stt_compute.push(compute);
            timing.stt_seconds = ts.elapsed().as_secs_f64();
            let te = Instant::now();
            let item = vec![(s.user.clone(), text.clone())];
            for (role, c) in &workers.evaluators {
                let secs = match &loaded {
                    Some((_, evs)) => {
                        let h = evs
                            .iter()
                            .find(|(r, _)| r == role)
                            .map(|(_, h)| h)
                            .ok_or_else(|| anyhow!("no evaluator {role}"))?;
                        evaluate(&ctx, h, &item).await?
                    }
                    None => {
                        let slot = format!("evaluator:{role}");
                        let h = start(&ctx, &mut run, &slot, WorkerKind::Evaluator, Some(role), c)
                            .await?;
                        let r = evaluate(&ctx, &h, &item).await;
                        h.stop().await;
                        r?
                    }
                };
                run.eval_compute.entry(role.clone()).or_default().push(secs);
            }
            timing.eval_seconds = te.elapsed().as_secs_f64();
            transcripts.push((s.user.clone(), text));
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            timing.failed = Some(format!("{e:#}"));
        }
        timing.done_seconds = t0.elapsed().as_secs_f64();
        timing.latency_seconds = timing.done_seconds - s.arrival_seconds;
        progress(&format!(
            "  {name}: {}/{} {} done at {:.1} s{}",
            i + 1,
            order.len(),
            s.user,
            timing.done_seconds,
            timing
                .failed
                .as_ref()
                .map(|f| format!(" (failed: {f})"))
                .unwrap_or_default()
        ));
        run.students.push(timing);
    }
    run.wall_seconds = t0.elapsed().as_secs_f64();
    if let Some((stt, evs)) = loaded {
        // Not part of the baseline's time: one call per role at the best
        // batch size, for the lower bound.
        let k = best_batch.min(transcripts.len());
        if k > 1 {
            for (role, h) in &evs {
                let secs = evaluate(&ctx, h, &transcripts[..k]).await?;
                run.eval_batched.insert(role.clone(), (k, secs));
            }
        }
        stt.stop().await;
        for (_, h) in evs {
            h.stop().await;
        }
    }
    Ok(run)
}
