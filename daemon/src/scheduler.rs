//! The two-phase scheduler: one state machine, two policies.
//!
//! ```text
//!            upload                batch full / window over / all STT done
//!   Idle ──────────────▶ STT phase ─────────────────────────────▶ Evaluation phase
//!    ▲                    (only STT workers alive,                 (only evaluator workers alive,
//!    │                     ≤ stt_concurrency transcriptions)        ≤ eval_concurrency busy workers,
//!    │                                                              ≤ eval_batch_size items per call)
//!    └──────────── nothing waits ◀──── uploads wait? → next STT phase ◀──┘
//! ```
//!
//! Policy `two-phase` runs exactly that; `pipelined` keeps both kinds of
//! worker alive and dispatches STT and evaluation side by side with no
//! barrier; `auto` picks one from the memory budget at start-up.
//!
//! The loop owns all scheduling state. The database is the source of truth
//! for jobs (see [`crate::jobs`]): every decision starts from a fresh read of
//! the pending jobs, every claim and completion is its own short transaction,
//! and model calls run in spawned tasks that report back over a channel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use viva_models::{
    EvaluateItem, EvaluateRequest, Evaluation, JobPayload, JobResult, TranscribeRequest,
    Transcript, WorkerKind,
};

use crate::clock::now_ms;
use crate::config::{Config, NodeRole, Policy, SchedulerConfig, WorkerConfig};
use crate::domain::{Assignment, ReleasePolicy};
use crate::error::{Error, Result};
use crate::eta::{PlanInput, ServiceStats, Snapshot, StatsView, Unavailable};
use crate::jobs::{self, Claimed, FailOutcome, OpenBatch, PendingJob, QueueView, Stage, Sweep};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::swap;
use crate::workers::{
    Supervisor, WorkerError, WorkerExit, WorkerHandle, WorkerSpec, WorkerTimeouts,
};

/// Scores an evaluated submission: [`crate::plugins::PluginScorer`] runs the
/// assignment's rubric plugin. Without a scorer (tests of the pipeline),
/// submissions rest in state `evaluated`.
pub trait Scorer: Send + Sync + 'static {
    /// Scores one submission. Runs on a blocking thread.
    fn score(&self, input: &ScoreInput) -> std::result::Result<ScoreOutcome, ScoreError>;
}

/// Why scoring failed. `message` is shown to the student and instructor as
/// the failure reason, so it is plain words without plugin logs (those go to
/// the daemon log and the admin view). Deterministic failures (a trap, out of
/// fuel, invalid output) fail the submission at once: a retry would only
/// repeat them. Transient ones (deadline under load, I/O) are retried.
#[derive(Debug, Clone)]
pub struct ScoreError {
    pub message: String,
    pub retryable: bool,
}

impl ScoreError {
    pub fn transient(message: impl Into<String>) -> ScoreError {
        ScoreError {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn permanent(message: impl Into<String>) -> ScoreError {
        ScoreError {
            message: message.into(),
            retryable: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScoreInput {
    pub assignment: Assignment,
    pub submission_id: String,
    pub duration_seconds: f64,
    pub transcript: Transcript,
    pub evaluations: Vec<Evaluation>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScoreOutcome {
    pub total: f64,
    pub max: f64,
    pub needs_review: bool,
    pub reasons: Vec<String>,
    /// The plugin's full report, stored with the submission.
    pub report: serde_json::Value,
    /// Every evaluator flag, as a review reason, set by the daemon whatever
    /// the plugin says (see [`hold_for_evaluator_flags`]). Not empty: the
    /// grade is never released automatically, under any release policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluator_flags: Vec<String>,
    /// Set by the daemon when the assignment's calibration gate is not met
    /// (see [`crate::calibration::gate_hold`]): the grade waits for review
    /// under an automatic release policy, with this reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_hold: Option<String>,
}

/// Holds a grade for review, with the reason among its reasons, while its
/// assignment's calibration gate is not met.
pub(crate) fn hold_for_calibration(
    mut outcome: ScoreOutcome,
    hold: Option<String>,
) -> ScoreOutcome {
    if let Some(reason) = &hold {
        if !outcome.reasons.contains(reason) {
            outcome.reasons.push(reason.clone());
        }
        outcome.needs_review = true;
    }
    outcome.calibration_hold = hold;
    outcome
}

/// The daemon's own rule, whatever the plugin reports: an evaluator flag
/// (instruction-like content, evidence not in the transcript, degenerate
/// output, a cut transcript …) sends the grade to review, with each flag
/// among its reasons, and blocks automatic release (`finish_score`).
pub(crate) fn hold_for_evaluator_flags(
    mut outcome: ScoreOutcome,
    evaluations: &[Evaluation],
) -> ScoreOutcome {
    let flags: Vec<String> = evaluations
        .iter()
        .flat_map(|e| {
            e.flags
                .iter()
                .map(move |f| format!("evaluator {} ({}) flagged: {f}", e.role, e.model))
        })
        .collect();
    for f in &flags {
        if !outcome.reasons.contains(f) {
            outcome.reasons.push(f.clone());
        }
    }
    outcome.needs_review |= !flags.is_empty();
    outcome.evaluator_flags = flags;
    outcome
}

/// Whether a scored grade is released at once.
pub(crate) fn releases_at_once(policy: ReleasePolicy, outcome: &ScoreOutcome) -> bool {
    let flagged = !outcome.evaluator_flags.is_empty() || outcome.calibration_hold.is_some();
    match policy {
        ReleasePolicy::Auto => !flagged,
        ReleasePolicy::AutoUnlessFlagged => !outcome.needs_review && !flagged,
        ReleasePolicy::Manual => false,
    }
}

/// The scheduler's current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Stt,
    Evaluation,
    Pipelined,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Stt => "stt",
            Phase::Evaluation => "evaluation",
            Phase::Pipelined => "pipelined",
        }
    }
}

/// A phase switch, for status and tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseChange {
    pub at_ms: i64,
    pub phase: &'static str,
    pub batch_id: Option<i64>,
}

/// Cheap handle for the rest of the daemon.
#[derive(Clone)]
pub struct SchedulerHandle {
    notify: Arc<Notify>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    pub supervisor: Supervisor,
    phases: Arc<std::sync::Mutex<VecDeque<PhaseChange>>>,
    memory_swaps: Arc<std::sync::Mutex<VecDeque<SwapMemory>>>,
    retries: mpsc::UnboundedSender<String>,
    node: Arc<str>,
}

impl SchedulerHandle {
    /// This daemon's node id (leases, batches and singletons are held under it).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Wakes the scheduler (new upload, retry request …).
    pub fn poke(&self) {
        self.notify.notify_one();
    }

    /// An administrator's "try again" for a role that cannot start ("stt"
    /// or an evaluator's role): its next start is due now.
    pub fn retry_worker(&self, role: &str) {
        let slot = if role == "stt" {
            "stt".to_owned()
        } else {
            format!("evaluator:{role}")
        };
        let _ = self.retries.send(slot);
        self.notify.notify_one();
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    pub fn phase_history(&self) -> Vec<PhaseChange> {
        self.phases
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// GPU memory around the recent phase switches (oldest first), where
    /// the workers measure it.
    pub fn memory_swaps(&self) -> Vec<SwapMemory> {
        self.memory_swaps
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default()
    }
}

enum SlotState {
    Down,
    Starting,
    Ready(WorkerHandle),
    Stopping,
}

struct Slot {
    spec_kind: WorkerKind,
    role: Option<String>,
    config: WorkerConfig,
    state: SlotState,
    in_flight: usize,
    failures: u32,
    /// Consecutive failed starts (a successful load resets it): past
    /// `unavailable_after_failures` the slot's circuit breaker opens.
    load_failures: u32,
    /// Since when the breaker is open: the role cannot start, its jobs wait
    /// and the scheduler serves everything else; probed at `next_start_ms`.
    unavailable_since: Option<i64>,
    next_start_ms: i64,
    idle_since: Instant,
    last_error: Option<String>,
    /// The slot's worker said `remote` in its Hello (learned at its first
    /// start, then kept): its model is on an inference server, so the slot
    /// is always loaded — started whenever it is down, never stopped by a
    /// phase switch or for idleness, dispatched to in every phase, bounded
    /// by its own `concurrency` (the worker's `max_parallel_jobs`) instead
    /// of `stt_concurrency`/`eval_concurrency`, and never counted against
    /// the GPU memory budget.
    remote: bool,
    /// When the worker now starting was spawned (ms): the ETA planner
    /// counts what is left of its load, not a whole one.
    starting_since_ms: i64,
}

enum Event {
    Started {
        slot: String,
        result: std::result::Result<WorkerHandle, WorkerError>,
        seconds: f64,
    },
    Stopped {
        slot: String,
        seconds: f64,
    },
    JobDone {
        slot: String,
        jobs: Vec<Claimed>,
        result: std::result::Result<JobResult, WorkerError>,
        seconds: f64,
    },
    ScoreDone {
        job: Box<Claimed>,
        result: std::result::Result<(ScoreOutcome, ReleasePolicy), ScoreError>,
    },
}

pub struct Scheduler {
    store: Store,
    cfg: SchedulerConfig,
    job_timeout: Duration,
    policy: Policy,
    instance: String,
    /// What this node does (`[node] role`); an api node runs no queue.
    role: NodeRole,
    /// Several nodes may share the store (PostgreSQL): batches are per
    /// node, leases are taken over only once expired, and the queue is
    /// read again every second (other nodes add to it).
    shared: bool,
    supervisor: Supervisor,
    scorer: Option<Arc<dyn Scorer>>,
    metrics: Metrics,
    roles: Vec<String>,
    slots: BTreeMap<String, Slot>,
    stats: ServiceStats,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    exits_rx: mpsc::UnboundedReceiver<WorkerExit>,
    retries_rx: mpsc::UnboundedReceiver<String>,
    notify: Arc<Notify>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    phases: Arc<std::sync::Mutex<VecDeque<PhaseChange>>>,
    phase: Phase,
    phase_since: Instant,
    phase_since_ms: i64,
    batch: Option<OpenBatch>,
    wake_at_ms: Option<i64>,
    version: u64,
    last_lease_sweep: Instant,
    score_in_flight: usize,
    /// Upload times (ms) of the submissions seen waiting for STT, for the
    /// recent arrival rate; `last_arrival_ms` is the newest seen.
    arrivals: VecDeque<i64>,
    last_arrival_ms: i64,
    /// A phase switch held back to save a model swap: to which kind, until
    /// when (ms). The ETA planner starts that phase no earlier.
    hold: Option<(WorkerKind, i64)>,
    /// The batch opened on the quick path a lone upload is promised
    /// (`swap::quick_path`): closed at once, its evaluation not held.
    quick_batch: Option<i64>,
    /// `scheduler.policy = "auto"`: decided again from measured GPU memory.
    auto: bool,
    /// Each slot's GPU memory as its worker last reported it (MiB): what
    /// `auto` and the admin view use instead of `memory_mb` once known.
    measured_mb: BTreeMap<String, u64>,
    /// A phase switch whose memory is being recorded (see `SwapMemory`).
    pending_swap: Option<SwapMemory>,
    memory_swaps: Arc<std::sync::Mutex<VecDeque<SwapMemory>>>,
}

/// GPU memory around one phase switch, measured by the workers (NVML):
/// what Viva's workers held before (the outgoing kind), what they hold
/// once the incoming kind has loaded and the outgoing processes are gone,
/// and the device's free memory as each side reported it. The outgoing
/// kind's memory is back when `device_free_after_mb` ≈
/// `device_free_before_mb + before_mb − after_mb`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwapMemory {
    pub at_ms: i64,
    /// "stt" or "evaluator": the kind loaded by the switch.
    pub to: &'static str,
    pub before_mb: u64,
    pub device_free_before_mb: Option<u64>,
    pub after_mb: Option<u64>,
    pub device_free_after_mb: Option<u64>,
    pub device_total_mb: Option<u64>,
}

const DAEMON_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often a node sharing the store reads the queue again.
const SHARED_POLL: Duration = Duration::from_secs(1);

impl Scheduler {
    pub fn new(
        config: &Config,
        store: Store,
        instance: String,
        metrics: Metrics,
        scorer: Option<Arc<dyn Scorer>>,
    ) -> (Scheduler, SchedulerHandle) {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let supervisor = Supervisor::new(
            DAEMON_VERSION,
            WorkerTimeouts::from(&config.workers),
            exits_tx,
        );
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (retries_tx, retries_rx) = mpsc::unbounded_channel();
        let notify = Arc::new(Notify::new());
        let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let phases = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let memory_swaps = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let mut slots = BTreeMap::new();
        if let Some(stt) = &config.workers.stt {
            slots.insert(
                "stt".to_owned(),
                Slot::new(WorkerKind::Stt, None, stt.clone()),
            );
        }
        for (role, w) in &config.workers.evaluators {
            slots.insert(
                format!("evaluator:{role}"),
                Slot::new(WorkerKind::Evaluator, Some(role.clone()), w.clone()),
            );
        }
        let handle = SchedulerHandle {
            notify: notify.clone(),
            snapshot: snapshot_rx,
            supervisor: supervisor.clone(),
            phases: phases.clone(),
            memory_swaps: memory_swaps.clone(),
            retries: retries_tx,
            node: Arc::from(instance.as_str()),
        };
        let store_shared = store.engine() == crate::db::Engine::Postgres;
        let scheduler = Scheduler {
            store,
            cfg: config.scheduler.clone(),
            job_timeout: config.workers.job_timeout,
            policy: config.effective_policy(),
            auto: config.scheduler.policy == crate::config::Policy::Auto,
            measured_mb: BTreeMap::new(),
            pending_swap: None,
            memory_swaps: memory_swaps.clone(),
            instance,
            supervisor,
            scorer,
            metrics,
            roles: config.workers.evaluators.keys().cloned().collect(),
            slots,
            stats: ServiceStats::default(),
            events_tx,
            events_rx,
            exits_rx,
            retries_rx,
            notify,
            snapshot_tx,
            phases,
            phase: Phase::Idle,
            phase_since: Instant::now(),
            phase_since_ms: now_ms(),
            batch: None,
            wake_at_ms: None,
            version: 0,
            last_lease_sweep: Instant::now(),
            role: config.node.role,
            shared: store_shared,
            score_in_flight: 0,
            arrivals: VecDeque::new(),
            last_arrival_ms: 0,
            hold: None,
            quick_batch: None,
        };
        (scheduler, handle)
    }

    /// Runs until `shutdown` fires, then stops workers and hands running
    /// jobs back to the queue.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let instance = self.instance.clone();
        let (role, shared) = (self.role, self.shared);
        let released = self
            .store
            .write(move |tx| {
                jobs::node_seen(tx, &instance, role.as_str(), true)?;
                if !role.runs_queue() {
                    return Ok(0);
                }
                if shared {
                    jobs::release_stale_leases(tx, &instance, Sweep::Expired { restart: true })
                } else {
                    jobs::adopt_open_batches(tx, &instance)?;
                    jobs::release_stale_leases(tx, &instance, Sweep::NotMine)
                }
            })
            .await?;
        if released > 0 {
            tracing::info!(
                released,
                "returned jobs of a previous daemon run to the queue"
            );
        }
        self.seed_stats().await;
        let mut renew = tokio::time::interval(self.cfg.lease / 3);
        loop {
            if let Err(e) = self.tick().await {
                tracing::error!(error = %e, "scheduler step failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut sleep_for = self
                .wake_at_ms
                .map(|t| Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64))
                .unwrap_or(Duration::from_secs(3600));
            if self.shared {
                // Other nodes add uploads and finish jobs: look again.
                sleep_for = sleep_for.min(SHARED_POLL);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.notify.notified() => {}
                Some(ev) = self.events_rx.recv() => self.handle(ev).await,
                Some(exit) = self.exits_rx.recv() => self.handle_exit(exit),
                Some(slot) = self.retries_rx.recv() => self.retry_now(&slot),
                _ = tokio::time::sleep(sleep_for) => {}
                _ = renew.tick() => self.renew_leases().await,
            }
            // Drain what else has arrived before deciding again.
            while let Ok(ev) = self.events_rx.try_recv() {
                self.handle(ev).await;
            }
            while let Ok(exit) = self.exits_rx.try_recv() {
                self.handle_exit(exit);
            }
        }
        tracing::info!("scheduler stopping: stopping workers and returning running jobs");
        self.supervisor.stop_all().await;
        let instance = self.instance.clone();
        let n = self
            .store
            .write(move |tx| jobs::release_own_leases(tx, &instance))
            .await?;
        tracing::info!(returned = n, "scheduler stopped");
        Ok(())
    }

    async fn seed_stats(&mut self) {
        for kind in [WorkerKind::Stt, WorkerKind::Evaluator] {
            let models = self.kind_models(kind);
            let k = kind.as_str();
            if let Ok(Some((start, stop))) = self
                .store
                .read(move |c| jobs::worker_times(c, k, &models))
                .await
            {
                self.stats.seed_times(k, start, stop);
            }
        }
        let Ok(rows) = self
            .store
            .read(|c| jobs::recent_service_times(c, 200))
            .await
        else {
            return;
        };
        for (stage, secs, dur) in rows.into_iter().rev() {
            if stage == Stage::Stt {
                self.stats.stt.observe(dur, secs);
            }
        }
        if let Ok(calls) = self.store.read(|c| jobs::recent_eval_calls(c, 64)).await {
            for (role, items, audio, secs) in calls.into_iter().rev() {
                if self.roles.contains(&role) {
                    self.stats
                        .eval_model(&role)
                        .observe(items as f64, audio, secs);
                }
            }
        }
    }

    async fn renew_leases(&mut self) {
        let instance = self.instance.clone();
        let role = self.role;
        let until = now_ms() + self.cfg.lease.as_millis() as i64;
        if let Err(e) = self
            .store
            .write(move |tx| {
                jobs::node_seen(tx, &instance, role.as_str(), false)?;
                jobs::renew_leases(tx, &instance, until)
            })
            .await
        {
            tracing::warn!(error = %e, "renewing job leases failed");
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase == phase {
            return;
        }
        let secs = self.phase_since.elapsed().as_secs_f64();
        self.metrics
            .phase_seconds
            .with_label_values(&[self.phase.as_str()])
            .observe(secs);
        self.metrics
            .phase
            .with_label_values(&[self.phase.as_str()])
            .set(0);
        self.metrics
            .phase
            .with_label_values(&[phase.as_str()])
            .set(1);
        tracing::info!(from = self.phase.as_str(), to = phase.as_str(), batch = ?self.batch.as_ref().map(|b| b.id), "phase switch");
        self.phase = phase;
        self.phase_since = Instant::now();
        self.phase_since_ms = now_ms();
        if let Ok(mut p) = self.phases.lock() {
            if p.len() >= 1000 {
                p.pop_front();
            }
            p.push_back(PhaseChange {
                at_ms: self.phase_since_ms,
                phase: phase.as_str(),
                batch_id: self.batch.as_ref().map(|b| b.id),
            });
        }
    }

    fn wake_at(&mut self, t: i64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(t, |w| w.min(t)));
    }

    /// One decision step.
    async fn tick(&mut self) -> Result<()> {
        self.wake_at_ms = None;
        if !self.role.runs_queue() {
            // An api node: the queue as the nodes that run it left it, for
            // students' positions and ETAs.
            return self.publish().await;
        }
        if self.last_lease_sweep.elapsed() >= self.cfg.lease {
            self.last_lease_sweep = Instant::now();
            let instance = self.instance.clone();
            let shared = self.shared;
            let alive_ms = self.cfg.lease.as_millis() as i64;
            self.store
                .write(move |tx| {
                    if shared {
                        jobs::release_stale_leases(
                            tx,
                            &instance,
                            Sweep::Expired { restart: false },
                        )?;
                        jobs::dissolve_dead_batches(tx, &instance, alive_ms)
                    } else {
                        jobs::release_stale_leases(tx, &instance, Sweep::NotMine)
                    }
                })
                .await?;
        }
        // A decision can unlock another (batch finished → evaluation), so
        // repeat until nothing changes, bounded.
        self.start_slots(|s| s.remote);
        for _ in 0..4 {
            let view = self.queue_view();
            let (pending, batch) = self
                .store
                .read(move |c| jobs::load_pending(c, &view))
                .await?;
            self.batch = batch;
            self.note_arrivals(&pending, now_ms());
            let changed = match self.policy {
                Policy::Pipelined => self.step_pipelined(&pending).await?,
                _ => self.step_two_phase(&pending).await?,
            };
            let scored = self.dispatch_scores(&pending).await?;
            if !changed && !scored {
                break;
            }
        }
        self.unload_idle();
        self.publish().await
    }

    async fn step_two_phase(&mut self, pending: &[PendingJob]) -> Result<bool> {
        let now = now_ms();
        // Remote evaluator roles are served in every phase and take no
        // part in the phase decision (a remote STT slot makes the policy
        // pipelined, see `remote_policy`).
        let remote_evals: Vec<&PendingJob> = pending
            .iter()
            .filter(|j| j.stage == Stage::Eval && self.is_remote_role(&j.role))
            .collect();
        if !remote_evals.is_empty() {
            self.dispatch_evals(&remote_evals).await?;
        }
        // A role that cannot start holds nothing up: while its breaker is
        // open (and no probe is due) its jobs are left out of the decision,
        // so the other phase and the other roles keep being served.
        let stt_paused = self.paused("stt", now);
        if let Some(batch) = self.batch.clone().filter(|_| !stt_paused) {
            self.set_phase(Phase::Stt);
            if !batch.closed {
                let window_ms = self.cfg.batch_window.as_millis() as i64;
                // With cost-aware switching, a batch also stops taking
                // uploads once a submission it holds up (its own, or one
                // waiting for evaluation) has waited `max_phase_wait`: the
                // switch was held long enough already.
                let bound = self.cfg.max_phase_wait.as_millis() as i64;
                let overdue = self.cfg.swap_work_ratio > 0.0
                    && pending.iter().any(|j| {
                        (j.stage == Stage::Eval || j.batch_id == Some(batch.id))
                            && now - j.submitted_at >= bound
                    });
                let window_over = overdue || now - batch.opened_at >= window_ms;
                let mut size = batch.size;
                if !window_over && size < self.cfg.stt_batch_size {
                    let joiners: Vec<String> = pending
                        .iter()
                        .filter(|j| j.stage == Stage::Stt && j.batch_id.is_none())
                        .take(self.cfg.stt_batch_size - size)
                        .map(|j| j.submission_id.clone())
                        .collect();
                    if !joiners.is_empty() {
                        size += joiners.len();
                        let id = batch.id;
                        self.store
                            .write(move |tx| jobs::add_to_batch(tx, id, &joiners))
                            .await?;
                        if size < self.cfg.stt_batch_size {
                            self.wake_at(batch.opened_at + window_ms);
                        }
                        let id = batch.id;
                        if size >= self.cfg.stt_batch_size {
                            self.store
                                .write(move |tx| jobs::close_batch(tx, id))
                                .await?;
                        }
                        return Ok(true);
                    }
                }
                if size >= self.cfg.stt_batch_size || window_over {
                    let id = batch.id;
                    self.store
                        .write(move |tx| jobs::close_batch(tx, id))
                        .await?;
                } else {
                    self.wake_at(batch.opened_at + window_ms);
                }
            }
            let members: Vec<&PendingJob> = pending
                .iter()
                .filter(|j| j.stage == Stage::Stt && j.batch_id == Some(batch.id))
                .collect();
            if members.is_empty() {
                let id = batch.id;
                self.store
                    .write(move |tx| jobs::finish_batch_stt(tx, id))
                    .await?;
                tracing::info!(batch = id, "STT phase of batch finished");
                return Ok(true);
            }
            if self.ensure_only(WorkerKind::Stt) {
                self.dispatch_stt(&members).await?;
            }
            return Ok(false);
        }
        let eval_pending: Vec<&PendingJob> = pending
            .iter()
            .filter(|j| {
                j.stage == Stage::Eval
                    && !self.paused(&format!("evaluator:{}", j.role), now)
                    && !self.is_remote_role(&j.role)
            })
            .collect();
        let waiting: Vec<&PendingJob> = pending
            .iter()
            .filter(|j| j.stage == Stage::Stt && j.batch_id.is_none() && !stt_paused)
            .collect();
        self.hold = None;
        if let Some(q) = self.quick_batch
            && !pending.iter().any(|j| j.batch_id == Some(q))
        {
            self.quick_batch = None;
        }
        // The quick path's batch is evaluated at once (see `swap::quick_path`).
        let quick = self
            .quick_batch
            .is_some_and(|q| eval_pending.iter().any(|j| j.batch_id == Some(q)));
        if !eval_pending.is_empty() && self.loaded() == Some(WorkerKind::Stt) && !quick {
            // The STT model is loaded and idle: evaluate now only when the
            // waiting evaluations pay for the swap (see `swap`); meanwhile
            // new uploads are transcribed by the model already loaded.
            if let swap::Swap::HoldFor(s) = self.swap_to(WorkerKind::Evaluator, &eval_pending, now)
            {
                let until = now + (s * 1000.0).ceil() as i64;
                let recheck = self.recheck_at(now).unwrap_or(until).min(until);
                if !waiting.is_empty() {
                    self.open_batch(&waiting, false).await?;
                    return Ok(true);
                }
                self.hold = Some((WorkerKind::Evaluator, until));
                self.set_phase(Phase::Idle);
                self.wake_at(recheck);
                return Ok(false);
            }
        }
        if !eval_pending.is_empty() {
            self.set_phase(Phase::Evaluation);
            if self.ensure_only(WorkerKind::Evaluator) {
                self.dispatch_evals(&eval_pending).await?;
            }
            return Ok(false);
        }
        if let Some(first) = waiting.first() {
            if self.loaded() == Some(WorkerKind::Evaluator)
                && let swap::Swap::HoldFor(s) = self.swap_to(WorkerKind::Stt, &waiting, now)
            {
                // The evaluators are loaded and idle: gather uploads until
                // their transcription pays for the swap (see `swap`).
                let until = now + (s * 1000.0).ceil() as i64;
                let recheck = self.recheck_at(now).unwrap_or(until).min(until);
                self.hold = Some((WorkerKind::Stt, until));
                self.set_phase(Phase::Idle);
                self.wake_at(recheck);
                return Ok(false);
            }
            let open_at = first.submitted_at + self.cfg.min_batch_wait.as_millis() as i64;
            if now >= open_at {
                let quick = self.quick_path(&waiting, now);
                self.open_batch(&waiting, quick).await?;
                return Ok(true);
            }
            // Gathering a batch: warm the STT worker meanwhile.
            self.set_phase(Phase::Idle);
            self.ensure_only(WorkerKind::Stt);
            self.wake_at(open_at);
            return Ok(false);
        }
        self.set_phase(Phase::Idle);
        Ok(false)
    }

    /// Opens an STT batch of the first waiting uploads (closed at once when
    /// full, or when it is the quick path of a lone upload).
    async fn open_batch(&mut self, waiting: &[&PendingJob], quick: bool) -> Result<()> {
        let ids: Vec<String> = waiting
            .iter()
            .take(self.cfg.stt_batch_size)
            .map(|j| j.submission_id.clone())
            .collect();
        let full = quick || ids.len() >= self.cfg.stt_batch_size;
        let node = self.instance.clone();
        let id = self
            .store
            .write(move |tx| {
                let id = jobs::open_batch(tx, &ids, &node)?;
                if full {
                    jobs::close_batch(tx, id)?;
                }
                Ok(id)
            })
            .await?;
        tracing::info!(batch = id, quick, "opened STT batch");
        self.quick_batch = quick.then_some(id);
        Ok(())
    }

    /// When the last local worker of `kind` now loading was spawned (ms), if
    /// one is loading.
    fn loading_since(&self, kind: WorkerKind) -> Option<i64> {
        self.slots
            .values()
            .filter(|s| s.spec_kind == kind && !s.remote && matches!(s.state, SlotState::Starting))
            .map(|s| s.starting_since_ms)
            .max()
    }

    /// Whether a batch of the `waiting` uploads opened now is the quick
    /// path of a lone upload (see [`swap::quick_path`]).
    fn quick_path(&self, waiting: &[&PendingJob], now: i64) -> bool {
        let audio: Vec<f64> = waiting
            .iter()
            .take(self.cfg.stt_batch_size)
            .map(|j| j.duration_seconds)
            .collect();
        let (work, _) = crate::eta::swap_work(
            &self.stats,
            &self.roles,
            self.cfg.eval_batch_size,
            false,
            &audio,
        );
        let window = 2.0 * self.cfg.max_phase_wait.as_secs_f64();
        swap::quick_path(
            self.cfg.swap_work_ratio,
            swap::arrival_rate(self.arrivals.iter().copied(), now, window),
            work,
            self.stats.round_trip_seconds(),
        )
    }

    /// The kind whose workers are loaded or loading now (two-phase: at most
    /// one), if any.
    fn loaded(&self) -> Option<WorkerKind> {
        self.slots
            .values()
            .find(|s| {
                !s.remote
                    && (s.in_flight > 0
                        || matches!(s.state, SlotState::Ready(_) | SlotState::Starting))
            })
            .map(|s| s.spec_kind)
    }

    /// Whether switching to `to` for the `waiting` jobs pays now (see
    /// [`swap`]): their predicted work against the measured round trip.
    fn swap_to(&self, to: WorkerKind, waiting: &[&PendingJob], now: i64) -> swap::Swap {
        let ratio = self.cfg.swap_work_ratio;
        if ratio <= 0.0 || waiting.is_empty() {
            return swap::Swap::Now;
        }
        // One entry per submission (an upload waits with one STT job,
        // a transcript with one job per role).
        let mut seen = std::collections::HashSet::new();
        let audio: Vec<f64> = waiting
            .iter()
            .filter(|j| seen.insert(j.submission_id.as_str()))
            .map(|j| j.duration_seconds)
            .collect();
        let (work, per_item) = crate::eta::swap_work(
            &self.stats,
            &self.roles,
            self.cfg.eval_batch_size,
            to == WorkerKind::Stt,
            &audio,
        );
        let oldest = waiting.iter().map(|j| j.submitted_at).min().unwrap_or(now);
        let window = 2.0 * self.cfg.max_phase_wait.as_secs_f64();
        let input = swap::SwapInput {
            waiting_work_s: work,
            oldest_wait_s: (now - oldest).max(0) as f64 / 1000.0,
            per_item_work_s: per_item,
            arrival_rate: swap::arrival_rate(self.arrivals.iter().copied(), now, window),
            round_trip_s: self.stats.round_trip_seconds(),
            ratio,
            max_wait_s: self.cfg.max_phase_wait.as_secs_f64(),
        };
        let decision = swap::decide(&input);
        if let swap::Swap::HoldFor(s) = decision {
            tracing::debug!(
                to = to.as_str(),
                waiting = audio.len(),
                work_s = input.waiting_work_s,
                round_trip_s = input.round_trip_s,
                arrivals_per_min = input.arrival_rate * 60.0,
                hold_s = s,
                "phase switch held: the waiting work does not pay for the swap yet"
            );
        }
        decision
    }

    /// When silence will end the recent arrival rate: a held switch is
    /// decided again then.
    fn recheck_at(&self, now: i64) -> Option<i64> {
        let window = 2.0 * self.cfg.max_phase_wait.as_secs_f64();
        swap::silent_at(self.arrivals.iter().copied(), now, window).map(|t| t + 1)
    }

    /// Notes the upload times of newly seen submissions waiting for STT.
    fn note_arrivals(&mut self, pending: &[PendingJob], now: i64) {
        let mut new: Vec<i64> = pending
            .iter()
            .filter(|j| j.stage == Stage::Stt && j.submitted_at > self.last_arrival_ms)
            .map(|j| j.submitted_at)
            .collect();
        new.sort_unstable();
        if let Some(&last) = new.last() {
            self.last_arrival_ms = last;
        }
        self.arrivals.extend(new);
        let keep_from = now - 2 * self.cfg.max_phase_wait.as_millis() as i64;
        while self.arrivals.front().is_some_and(|&t| t < keep_from) || self.arrivals.len() > 10_000
        {
            self.arrivals.pop_front();
        }
    }

    async fn step_pipelined(&mut self, pending: &[PendingJob]) -> Result<bool> {
        let stt: Vec<&PendingJob> = pending.iter().filter(|j| j.stage == Stage::Stt).collect();
        let eval: Vec<&PendingJob> = pending.iter().filter(|j| j.stage == Stage::Eval).collect();
        if stt.is_empty() && eval.is_empty() {
            self.set_phase(Phase::Idle);
            return Ok(false);
        }
        self.set_phase(Phase::Pipelined);
        // Both kinds stay loaded in pipelined: the evaluators load while the
        // first upload is transcribed, not after (as the ETA plans them).
        self.ensure_started(WorkerKind::Evaluator);
        if !stt.is_empty() {
            self.ensure_started(WorkerKind::Stt);
            self.dispatch_stt(&stt).await?;
        }
        if !eval.is_empty() {
            self.dispatch_evals(&eval).await?;
        }
        Ok(false)
    }

    /// Whether `slot`'s breaker is open and its next probe not yet due.
    fn paused(&self, slot: &str, now: i64) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.unavailable_since.is_some() && now < s.next_start_ms)
    }

    /// An administrator asked to try a slot again: its next start is due now.
    fn retry_now(&mut self, slot: &str) {
        if let Some(s) = self.slots.get_mut(slot) {
            tracing::info!(%slot, "an administrator asked to try this worker again");
            s.next_start_ms = 0;
        }
    }

    /// Two-phase rule: stop the other kind's workers, and start ours only
    /// once every process of the other kind is confirmed gone. Returns whether
    /// our workers may be used now.
    fn ensure_only(&mut self, kind: WorkerKind) -> bool {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        let switching = self.slots.values().any(|s| {
            s.spec_kind != kind
                && !s.remote
                && s.in_flight == 0
                && matches!(s.state, SlotState::Ready(_))
        });
        if switching {
            self.begin_swap_record(kind);
        }
        for name in &names {
            let Some(slot) = self.slots.get_mut(name) else {
                continue;
            };
            if slot.spec_kind == kind || slot.in_flight > 0 || slot.remote {
                continue;
            }
            if let SlotState::Ready(h) = &slot.state {
                let h = h.clone();
                slot.state = SlotState::Stopping;
                let tx = self.events_tx.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let status = h.stop().await;
                    let seconds = t0.elapsed().as_secs_f64();
                    tracing::info!(slot = %name, %status, seconds, "worker stopped for the phase switch");
                    let _ = tx.send(Event::Stopped {
                        slot: name,
                        seconds,
                    });
                });
            }
        }
        let other = match kind {
            WorkerKind::Stt => WorkerKind::Evaluator,
            WorkerKind::Evaluator => WorkerKind::Stt,
        };
        let others_alive = self.supervisor.alive_local(other) > 0
            || self
                .slots
                .values()
                .any(|s| s.spec_kind == other && !s.remote && !matches!(s.state, SlotState::Down));
        if others_alive {
            return false;
        }
        self.ensure_started(kind);
        true
    }

    fn ensure_started(&mut self, kind: WorkerKind) {
        self.start_slots(|s| s.spec_kind == kind);
    }

    /// Starts the slots `pick` chooses that are down and due.
    fn start_slots(&mut self, pick: impl Fn(&Slot) -> bool) {
        let now = now_ms();
        let mut earliest: Option<i64> = None;
        for (name, slot) in self.slots.iter_mut() {
            if !pick(slot) || !matches!(slot.state, SlotState::Down) {
                continue;
            }
            if now < slot.next_start_ms {
                earliest =
                    Some(earliest.map_or(slot.next_start_ms, |e: i64| e.min(slot.next_start_ms)));
                continue;
            }
            slot.state = SlotState::Starting;
            slot.starting_since_ms = now;
            let spec = slot.spec(name);
            let sup = self.supervisor.clone();
            let tx = self.events_tx.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let result = sup.start(spec).await;
                let _ = tx.send(Event::Started {
                    slot: name,
                    result,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            });
        }
        if let Some(t) = earliest {
            self.wake_at(t);
        }
    }

    /// Whether `role`'s evaluator is known to be remote.
    fn is_remote_role(&self, role: &str) -> bool {
        self.slots
            .get(&format!("evaluator:{role}"))
            .is_some_and(|s| s.remote)
    }

    /// Two-phase exists so that STT and the evaluators never hold the GPU
    /// together; when either side is wholly remote there is nothing to
    /// keep apart, and the policy is pipelined.
    fn remote_policy(&self, policy: Policy) -> Policy {
        let stt_remote = self.slots.get("stt").is_some_and(|s| s.remote);
        let mut evals = self
            .slots
            .values()
            .filter(|s| s.spec_kind == WorkerKind::Evaluator)
            .peekable();
        let evals_remote = evals.peek().is_some() && evals.all(|s| s.remote);
        if policy == Policy::TwoPhase && (stt_remote || evals_remote) {
            Policy::Pipelined
        } else {
            policy
        }
    }

    fn ready_slot(
        &self,
        kind: WorkerKind,
        role: Option<&str>,
    ) -> Option<(String, WorkerHandle, usize)> {
        self.slots.iter().find_map(|(name, s)| match &s.state {
            SlotState::Ready(h) if s.spec_kind == kind && s.role.as_deref() == role => {
                Some((name.clone(), h.clone(), s.in_flight))
            }
            _ => None,
        })
    }

    async fn claim(&self, ids: Vec<i64>) -> Result<Vec<Claimed>> {
        let instance = self.instance.clone();
        let until = now_ms() + self.cfg.lease.as_millis() as i64;
        let started = Instant::now();
        let claimed = self
            .store
            .write(move |tx| jobs::claim(tx, &ids, &instance, until))
            .await;
        self.metrics
            .claim_seconds
            .observe(started.elapsed().as_secs_f64());
        claimed
    }

    async fn dispatch_stt(&mut self, candidates: &[&PendingJob]) -> Result<()> {
        let Some((slot, handle, in_flight)) = self.ready_slot(WorkerKind::Stt, None) else {
            return Ok(());
        };
        let parallel = handle.max_parallel_jobs().max(1) as usize;
        let limit = if handle.is_remote() {
            parallel
        } else {
            self.cfg.stt_concurrency.min(parallel)
        };
        let capacity = limit.saturating_sub(in_flight);
        if capacity == 0 {
            return Ok(());
        }
        let now = now_ms();
        let mut ids = Vec::new();
        for j in candidates {
            if j.running {
                continue;
            }
            if j.not_before > now {
                self.wake_at(j.not_before);
                continue;
            }
            if ids.len() < capacity {
                ids.push(j.id);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        for job in self.claim(ids).await? {
            if let Some(s) = self.slots.get_mut(&slot) {
                s.in_flight += 1;
            }
            let payload = JobPayload::Transcribe(TranscribeRequest {
                wav_path: job.wav_path.clone(),
                audio_seconds: job.duration_seconds,
                language: job.language.clone(),
                initial_prompt: job.vocabulary.clone(),
            });
            self.spawn_call(slot.clone(), handle.clone(), vec![job], payload);
        }
        Ok(())
    }

    async fn dispatch_evals(&mut self, candidates: &[&PendingJob]) -> Result<()> {
        let now = now_ms();
        // Busy local evaluators; remote ones have their own limit.
        let mut busy = self
            .slots
            .values()
            .filter(|s| s.spec_kind == WorkerKind::Evaluator && s.in_flight > 0 && !s.remote)
            .count();
        // Roles whose oldest ready job is oldest go first (fair alternation
        // when eval_concurrency is below the number of roles).
        let mut by_role: BTreeMap<String, Vec<&PendingJob>> = BTreeMap::new();
        for j in candidates {
            if j.running {
                continue;
            }
            if j.not_before > now {
                self.wake_at(j.not_before);
                continue;
            }
            by_role.entry(j.role.clone()).or_default().push(j);
        }
        let mut order: Vec<(String, i64)> = by_role
            .iter()
            .map(|(r, v)| {
                (
                    r.clone(),
                    v.first().map(|j| j.submitted_at).unwrap_or(i64::MAX),
                )
            })
            .collect();
        order.sort_by_key(|(r, t)| (*t, r.clone()));
        for (role, _) in order {
            let Some((slot, handle, in_flight)) =
                self.ready_slot(WorkerKind::Evaluator, Some(&role))
            else {
                continue;
            };
            let remote = handle.is_remote();
            // A local evaluator takes one call at a time; a remote one as
            // many as fill its server's `concurrency` (one request per
            // submission), sent together.
            let rounds = if remote {
                let batch = self.cfg.eval_batch_size.max(1);
                (handle.max_parallel_jobs().max(1) as usize)
                    .div_ceil(batch)
                    .saturating_sub(in_flight)
            } else if busy >= self.cfg.eval_concurrency || in_flight > 0 {
                0
            } else {
                1
            };
            for round in 0..rounds {
                let ids: Vec<i64> = by_role
                    .get(&role)
                    .map(|v| {
                        v.iter()
                            .skip(round * self.cfg.eval_batch_size)
                            .take(self.cfg.eval_batch_size)
                            .map(|j| j.id)
                            .collect()
                    })
                    .unwrap_or_default();
                if ids.is_empty() {
                    break;
                }
                let claimed = self.claim(ids).await?;
                if claimed.is_empty() {
                    continue;
                }
                // Each submission is judged under the assignment version it
                // records (a rubric edit affects it only through a rescore),
                // with the instructor's examples for it.
                let submission_ids: Vec<String> =
                    claimed.iter().map(|c| c.submission_id.clone()).collect();
                let (assignments, mut exemplars): (
                    HashMap<String, Assignment>,
                    HashMap<String, Vec<viva_models::Exemplar>>,
                ) = self
                    .store
                    .read(move |c| {
                        let mut m = HashMap::new();
                        let mut ex = HashMap::new();
                        for id in submission_ids {
                            if let Some(a) = crate::domain::assignment_for_submission(c, &id)? {
                                ex.extend(crate::calibration::exemplars_for(
                                    c,
                                    &a,
                                    std::slice::from_ref(&id),
                                )?);
                                m.insert(id, a);
                            }
                        }
                        Ok((m, ex))
                    })
                    .await?;
                let mut items = Vec::new();
                let mut jobs_in_call = Vec::new();
                for c in claimed {
                    match (assignments.get(&c.submission_id), &c.transcript) {
                        (Some(a), Some(t)) => {
                            items.push(EvaluateItem {
                                submission_id: c.submission_id.clone(),
                                assignment_prompt: a.prompt.clone(),
                                rubric: a.rubric.clone(),
                                transcript: t.text.clone(),
                                exemplars: exemplars.remove(&c.submission_id).unwrap_or_default(),
                                // The instructor's language, else what Whisper
                                // heard (an English-only model always says "en").
                                language: a.language.clone().or_else(|| t.language.clone()),
                            });
                            jobs_in_call.push(c);
                        }
                        _ => {
                            tracing::warn!(submission = %c.submission_id, assignment = %c.assignment_id,
                                "an evaluation job lost its assignment or transcript");
                            let instance = self.instance.clone();
                            let max = self.cfg.max_attempts;
                            self.store
                                .write(move |tx| {
                                    jobs::fail_job(
                                        tx,
                                        c.job_id,
                                        &instance,
                                        "its assignment or transcript is missing",
                                        false,
                                        max,
                                        0,
                                    )
                                })
                                .await?;
                        }
                    }
                }
                if items.is_empty() {
                    continue;
                }
                if let Some(s) = self.slots.get_mut(&slot) {
                    s.in_flight += 1;
                }
                if !remote {
                    busy += 1;
                }
                self.spawn_call(
                    slot.clone(),
                    handle.clone(),
                    jobs_in_call,
                    JobPayload::Evaluate(EvaluateRequest { items }),
                );
            }
        }
        Ok(())
    }

    fn spawn_call(
        &self,
        slot: String,
        handle: WorkerHandle,
        jobs: Vec<Claimed>,
        payload: JobPayload,
    ) {
        let tx = self.events_tx.clone();
        let timeout = self.job_timeout;
        tokio::spawn(async move {
            let t0 = Instant::now();
            let result = match tokio::time::timeout(timeout, handle.call(payload, None)).await {
                Ok(r) => r,
                Err(_) => {
                    // A stuck native call: kill the worker; the job is retried.
                    let _ = handle.stop().await;
                    Err(WorkerError::Job {
                        code: "timeout".into(),
                        message: format!(
                            "the worker did not answer within {}",
                            humantime::format_duration(timeout)
                        ),
                        retryable: true,
                    })
                }
            };
            let _ = tx.send(Event::JobDone {
                slot,
                jobs,
                result,
                seconds: t0.elapsed().as_secs_f64(),
            });
        });
    }

    async fn dispatch_scores(&mut self, pending: &[PendingJob]) -> Result<bool> {
        let Some(scorer) = self.scorer.clone() else {
            return Ok(false);
        };
        let now = now_ms();
        let ids: Vec<i64> = pending
            .iter()
            .filter(|j| j.stage == Stage::Score && !j.running && j.not_before <= now)
            .take(8usize.saturating_sub(self.score_in_flight))
            .map(|j| j.id)
            .collect();
        if ids.is_empty() {
            return Ok(false);
        }
        for job in self.claim(ids).await? {
            self.score_in_flight += 1;
            let store = self.store.clone();
            let scorer = scorer.clone();
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                let sub_id = job.submission_id.clone();
                let input = store
                    .read(move |c| {
                        let s = crate::domain::get_submission(c, &sub_id)?
                            .ok_or(Error::NotFound("submission"))?;
                        let a = crate::domain::assignment_for_submission(c, &s.id)?
                            .ok_or(Error::NotFound("assignment"))?;
                        let transcript = s.transcript.ok_or(Error::NotFound("transcript"))?;
                        // The plugin never sees (so never copies into a
                        // student's feedback) evidence that is not in the
                        // transcript or text that is not language; the
                        // flags stay.
                        let mut evaluations = s.evaluations;
                        for e in &mut evaluations {
                            viva_models::evidence::sanitise(e, &transcript.text);
                        }
                        let hold = crate::calibration::gate_hold(c, &a)?;
                        Ok((
                            ScoreInput {
                                assignment: a,
                                submission_id: s.id,
                                duration_seconds: s.duration_seconds,
                                transcript,
                                evaluations,
                            },
                            hold,
                        ))
                    })
                    .await;
                let result = match input {
                    Err(e) => Err(ScoreError::transient(e.to_string())),
                    Ok((input, hold)) => {
                        let policy = input.assignment.release_policy;
                        tokio::task::spawn_blocking(move || {
                            scorer
                                .score(&input)
                                .map(|o| hold_for_evaluator_flags(o, &input.evaluations))
                                .map(|o| hold_for_calibration(o, hold))
                        })
                        .await
                        .map_err(|e| ScoreError::permanent(format!("the scorer panicked: {e}")))
                        .and_then(|r| r)
                        .map(|o| (o, policy))
                    }
                };
                let _ = tx.send(Event::ScoreDone {
                    job: Box::new(job),
                    result,
                });
            });
        }
        Ok(true)
    }

    fn handle_exit(&mut self, exit: WorkerExit) {
        let Some(slot) = self.slots.get_mut(&exit.slot) else {
            return;
        };
        if exit.expected {
            return;
        }
        slot.failures += 1;
        let backoff = (500i64 << slot.failures.min(6)).min(30_000);
        slot.next_start_ms = now_ms() + backoff;
        slot.state = SlotState::Down;
        slot.last_error = Some(format!("worker exited unexpectedly ({})", exit.status));
        self.metrics
            .worker_restarts
            .with_label_values(&[&exit.slot])
            .inc();
        tracing::warn!(slot = %exit.slot, pid = exit.pid, status = %exit.status, backoff_ms = backoff, "worker crashed; it will be restarted");
        let t = slot.next_start_ms;
        self.wake_at(t);
    }

    async fn handle(&mut self, ev: Event) {
        // A measured load or stop is kept in the store too (see
        // `persist_worker_time`).
        let measured = match &ev {
            Event::Started {
                slot,
                result: Ok(_),
                ..
            } => Some((slot.clone(), true)),
            Event::Stopped { slot, .. } => Some((slot.clone(), false)),
            _ => None,
        };
        self.handle_event(ev).await;
        if let Some((slot, start)) = measured {
            self.persist_worker_time(&slot, start).await;
        }
    }

    /// The models (with their options) of `kind`'s workers: what its
    /// recorded load and stop times are valid for.
    fn kind_models(&self, kind: WorkerKind) -> String {
        let mut v: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.spec_kind == kind)
            .map(|s| {
                format!(
                    "{}{}",
                    s.config.model,
                    serde_json::to_string(&s.config.options).unwrap_or_default()
                )
            })
            .collect();
        v.sort();
        v.join(",")
    }

    /// Stores the running average of `slot`'s kind's load (`start`) or stop
    /// time, so the next daemon on this data directory weighs a swap by
    /// what it costs on this machine from its first decision.
    async fn persist_worker_time(&mut self, slot: &str, start: bool) {
        let Some(kind) = self.slots.get(slot).map(|s| s.spec_kind) else {
            return;
        };
        let models = self.kind_models(kind);
        let k = kind.as_str();
        let (start_s, stop_s) = if start {
            (Some(self.stats.start_seconds(k)), None)
        } else {
            (None, self.stats.stop_seconds(k))
        };
        if let Err(e) = self
            .store
            .write(move |tx| jobs::record_worker_time(tx, k, &models, start_s, stop_s))
            .await
        {
            tracing::warn!(error = %e, "recording a worker's load time failed");
        }
    }

    async fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Started {
                slot,
                result,
                seconds,
            } => {
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                match result {
                    Ok(h) => {
                        tracing::info!(%slot, pid = h.pid(), load_ms = h.load_ms(), remote = h.is_remote(), "worker ready");
                        let learned = h.is_remote() && !s.remote;
                        s.remote = h.is_remote();
                        s.state = SlotState::Ready(h);
                        s.idle_since = Instant::now();
                        s.last_error = None;
                        s.load_failures = 0;
                        if s.unavailable_since.take().is_some() {
                            tracing::info!(%slot, "worker available again: its waiting jobs resume");
                            self.metrics
                                .worker_unavailable
                                .with_label_values(&[&slot])
                                .set(0);
                        }
                        // A remote start loads no model: it stays out of
                        // the swap's measured cost.
                        if !s.remote {
                            self.stats.observe_start(s.spec_kind.as_str(), seconds);
                        }
                        if learned {
                            let policy = self.remote_policy(self.policy);
                            if policy != self.policy {
                                tracing::info!(%slot, ?policy, "a remote worker leaves nothing to keep apart on the GPU: the policy is pipelined");
                                self.policy = policy;
                            }
                            self.notify.notify_one();
                        }
                    }
                    Err(e) => {
                        s.failures += 1;
                        s.load_failures += 1;
                        let now = now_ms();
                        let threshold = self.cfg.unavailable_after_failures.max(1);
                        let backoff = if s.load_failures >= threshold {
                            // Breaker open: probe with backoff, from 15 s up
                            // to `unavailable_probe_max`.
                            let max = self.cfg.unavailable_probe_max.as_millis() as i64;
                            (15_000i64 << (s.load_failures - threshold).min(10)).min(max.max(1))
                        } else {
                            (1000i64 << s.failures.min(6)).min(60_000)
                        };
                        s.next_start_ms = now + backoff;
                        s.state = SlotState::Down;
                        s.last_error = Some(e.to_string());
                        tracing::error!(%slot, error = %e, backoff_ms = backoff, "worker failed to start");
                        if s.load_failures >= threshold && s.unavailable_since.is_none() {
                            s.unavailable_since = Some(now);
                            tracing::error!(%slot, failures = s.load_failures, error = %e, "worker unavailable: its jobs wait, everything else goes on");
                            self.metrics
                                .worker_unavailable
                                .with_label_values(&[&slot])
                                .set(1);
                        }
                        let t = s.next_start_ms;
                        self.wake_at(t);
                    }
                }
            }
            Event::Stopped { slot, seconds } => {
                if let Some(s) = self.slots.get_mut(&slot)
                    && matches!(s.state, SlotState::Stopping)
                {
                    s.state = SlotState::Down;
                    self.stats.observe_stop(s.spec_kind.as_str(), seconds);
                }
            }
            Event::JobDone {
                slot,
                jobs,
                result,
                seconds,
            } => {
                if let Some(s) = self.slots.get_mut(&slot) {
                    s.in_flight = s.in_flight.saturating_sub(1);
                    s.idle_since = Instant::now();
                    if result.is_ok() {
                        s.failures = 0;
                    }
                }
                if let Err(e) = self.finish_call(&slot, jobs, result, seconds).await {
                    tracing::error!(error = %e, "recording a job result failed; its lease will expire and it will run again");
                }
            }
            Event::ScoreDone { job, result } => {
                self.score_in_flight = self.score_in_flight.saturating_sub(1);
                if let Err(e) = self.finish_score(*job, result).await {
                    tracing::error!(error = %e, "recording a score failed");
                }
            }
        }
    }

    async fn finish_call(
        &mut self,
        slot: &str,
        jobs: Vec<Claimed>,
        result: std::result::Result<JobResult, WorkerError>,
        seconds: f64,
    ) -> Result<()> {
        let role = self
            .slots
            .get(slot)
            .and_then(|s| s.role.clone())
            .unwrap_or_default();
        let model = self
            .slots
            .get(slot)
            .map(|s| s.config.model.clone())
            .unwrap_or_default();
        match result {
            Ok(JobResult::Transcript(t)) => {
                let Some(job) = jobs.into_iter().next() else {
                    return Ok(());
                };
                self.stats.stt.observe(job.duration_seconds, seconds);
                self.metrics
                    .stage_seconds
                    .with_label_values(&["stt"])
                    .observe(seconds);
                self.metrics.jobs.with_label_values(&["stt", "done"]).inc();
                let instance = self.instance.clone();
                let roles = self.roles.clone();
                self.store
                    .write(move |tx| jobs::complete_stt(tx, job.job_id, &instance, &t, &roles))
                    .await?;
            }
            Ok(JobResult::Evaluations(resp)) => {
                let audio: f64 = jobs.iter().map(|j| j.duration_seconds).sum();
                self.stats
                    .eval_model(&role)
                    .observe(jobs.len() as f64, audio, seconds);
                self.metrics
                    .stage_seconds
                    .with_label_values(&["eval"])
                    .observe(seconds);
                let mut by_sub: HashMap<String, viva_models::EvaluationOutcome> = resp
                    .outcomes
                    .into_iter()
                    .map(|o| (o.submission_id.clone(), o))
                    .collect();
                for job in jobs {
                    let outcome = by_sub.remove(&job.submission_id);
                    let evaluation = match outcome {
                        Some(viva_models::EvaluationOutcome {
                            evaluation: Some(mut e),
                            ..
                        }) => {
                            e.role = role.clone();
                            if e.model.is_empty() {
                                e.model = model.clone();
                            }
                            self.check_evaluation(&job, &mut e).await.map(|_| e)
                        }
                        Some(o) => Err(o
                            .error
                            .unwrap_or_else(|| "the evaluator returned no evaluation".into())),
                        None => Err("the evaluator's answer left this submission out".into()),
                    };
                    match evaluation {
                        Ok(e) => {
                            self.metrics.jobs.with_label_values(&["eval", "done"]).inc();
                            let instance = self.instance.clone();
                            let score = self.scorer.is_some();
                            let all_done = self
                                .store
                                .write(move |tx| {
                                    jobs::complete_eval(tx, job.job_id, &instance, &e, score)
                                })
                                .await?
                                .flatten();
                            if let Some(submitted_at) = all_done {
                                // End to end: upload accepted → both evaluations in.
                                self.metrics
                                    .stage_seconds
                                    .with_label_values(&["total"])
                                    .observe((now_ms() - submitted_at) as f64 / 1000.0);
                            }
                        }
                        Err(msg) => self.fail(job, &msg, true).await?,
                    }
                }
            }
            Err(WorkerError::Stopped) => {
                // Not the job's fault: back to the queue, no attempt charged.
                for job in jobs {
                    let instance = self.instance.clone();
                    self.store
                        .write(move |tx| jobs::requeue(tx, job.job_id, &instance))
                        .await?;
                }
            }
            Err(e) => {
                let retryable = match &e {
                    WorkerError::Job { retryable, .. } => *retryable,
                    _ => true,
                };
                let msg = match &e {
                    WorkerError::Crashed { .. } => "the model worker crashed".to_owned(),
                    WorkerError::Job { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                for job in jobs {
                    self.fail(job, &msg, retryable).await?;
                }
            }
        }
        Ok(())
    }

    /// The evaluation must rate every rubric criterion with one of its
    /// levels (else the job fails). Its evidence is checked against the
    /// transcript and its text for junk: problems become flags
    /// (`evidence_not_in_transcript`, `degenerate_output`, see
    /// [`viva_models::evidence::flags`]) that hold the grade for review.
    async fn check_evaluation(
        &self,
        job: &Claimed,
        e: &mut Evaluation,
    ) -> std::result::Result<(), String> {
        let sub = job.submission_id.clone();
        let (a, transcript) = self
            .store
            .read(move |c| {
                let a = crate::domain::assignment_for_submission(c, &sub)?;
                let t = crate::domain::get_submission(c, &sub)?.and_then(|s| s.transcript);
                Ok((a, t))
            })
            .await
            .map_err(|e| e.to_string())?;
        let a = a.ok_or("its assignment was deleted")?;
        let text = transcript.map(|t| t.text).unwrap_or_default();
        for flag in viva_models::evidence::flags(e, &text) {
            if !e.flags.contains(&flag) {
                e.flags.push(flag);
            }
        }
        for c in &a.rubric.criteria {
            let r = e
                .ratings
                .iter()
                .find(|r| r.criterion_id == c.id)
                .ok_or_else(|| format!("the evaluation does not rate criterion {:?}", c.id))?;
            if !c.levels.iter().any(|l| l.label == r.level) {
                return Err(format!(
                    "the evaluation gives criterion {:?} an unknown level {:?}",
                    c.id, r.level
                ));
            }
        }
        Ok(())
    }

    async fn fail(&mut self, job: Claimed, msg: &str, retryable: bool) -> Result<()> {
        let instance = self.instance.clone();
        let max = self.cfg.max_attempts;
        let backoff = self.cfg.retry_backoff.as_millis() as i64;
        let m = msg.to_owned();
        let stage = job.stage;
        let outcome = self
            .store
            .write(move |tx| jobs::fail_job(tx, job.job_id, &instance, &m, retryable, max, backoff))
            .await?;
        match &outcome {
            FailOutcome::Retry { at, attempts } => {
                tracing::warn!(submission = %job.submission_id, stage = stage.as_str(), attempts, error = msg, "job failed; retrying");
                self.wake_at(*at);
                self.metrics
                    .jobs
                    .with_label_values(&[stage.as_str(), "retried"])
                    .inc();
            }
            FailOutcome::Failed => {
                tracing::warn!(submission = %job.submission_id, stage = stage.as_str(), error = msg, "job failed for good");
                self.metrics
                    .jobs
                    .with_label_values(&[stage.as_str(), "failed"])
                    .inc();
            }
            FailOutcome::Ignored => {}
        }
        Ok(())
    }

    async fn finish_score(
        &mut self,
        job: Claimed,
        result: std::result::Result<(ScoreOutcome, ReleasePolicy), ScoreError>,
    ) -> Result<()> {
        match result {
            Ok((outcome, policy)) => {
                let release = releases_at_once(policy, &outcome);
                let report = serde_json::to_value(&outcome)
                    .map_err(|e| Error::Internal(format!("serialising a score: {e}")))?;
                let instance = self.instance.clone();
                self.store
                    .write(move |tx| {
                        jobs::complete_score(tx, job.job_id, &instance, &report, release)
                    })
                    .await?;
                self.metrics
                    .jobs
                    .with_label_values(&["score", "done"])
                    .inc();
                Ok(())
            }
            Err(e) => self.fail(job, &e.message, e.retryable).await,
        }
    }

    fn unload_idle(&mut self) {
        let after = self.cfg.idle_unload_after;
        if after.is_zero() || self.phase != Phase::Idle {
            return;
        }
        for (name, slot) in self.slots.iter_mut() {
            if slot.in_flight > 0 || slot.remote {
                continue;
            }
            if let SlotState::Ready(h) = &slot.state {
                if slot.idle_since.elapsed() < after {
                    let t = now_ms() + (after - slot.idle_since.elapsed()).as_millis() as i64;
                    self.wake_at_ms = Some(self.wake_at_ms.map_or(t, |w| w.min(t)));
                    continue;
                }
                let h = h.clone();
                slot.state = SlotState::Stopping;
                let tx = self.events_tx.clone();
                let name = name.clone();
                tracing::info!(slot = %name, "unloading idle worker");
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    h.stop().await;
                    let seconds = t0.elapsed().as_secs_f64();
                    let _ = tx.send(Event::Stopped {
                        slot: name,
                        seconds,
                    });
                });
            }
        }
    }

    /// Starts the memory record of a switch to `to`: what the workers
    /// hold now (only where they measure GPU memory).
    fn begin_swap_record(&mut self, to: WorkerKind) {
        let table = self.supervisor.table();
        let live: Vec<&viva_models::device::DeviceMemory> = table
            .iter()
            .filter(|p| p.state != "exited" && p.kind != to)
            .filter_map(|p| p.device_memory.as_ref())
            .collect();
        if live.is_empty() {
            return;
        }
        self.pending_swap = Some(SwapMemory {
            at_ms: now_ms(),
            to: to.as_str(),
            before_mb: live.iter().map(|d| d.process_bytes >> 20).sum(),
            device_free_before_mb: live.iter().map(|d| d.free_bytes >> 20).min(),
            after_mb: None,
            device_free_after_mb: None,
            device_total_mb: live.iter().map(|d| d.total_bytes >> 20).max(),
        });
    }

    /// Keeps the workers' measured GPU memory (metrics, `auto`), and
    /// completes a switch's memory record once the incoming kind has
    /// loaded and reported while no outgoing process is left.
    fn note_device_memory(&mut self) {
        let table = self.supervisor.table();
        for p in table.iter().filter(|p| p.state != "exited") {
            if let Some(d) = &p.device_memory {
                self.measured_mb
                    .insert(p.slot.clone(), d.process_bytes >> 20);
                self.metrics
                    .worker_device_memory
                    .with_label_values(&[&p.slot])
                    .set(i64::try_from(d.process_bytes).unwrap_or(i64::MAX));
            }
        }
        if let Some(mut rec) = self.pending_swap.take() {
            let incoming: Vec<&crate::workers::ProcessInfo> = table
                .iter()
                .filter(|p| p.state != "exited" && p.kind.as_str() == rec.to)
                .collect();
            let outgoing_left = table
                .iter()
                .any(|p| p.state != "exited" && p.kind.as_str() != rec.to);
            let wanted = self
                .slots
                .values()
                .filter(|s| s.spec_kind.as_str() == rec.to)
                .count();
            let measured: Vec<&viva_models::device::DeviceMemory> = incoming
                .iter()
                .filter(|p| p.state != "starting")
                .filter_map(|p| p.device_memory.as_ref())
                .collect();
            if outgoing_left || measured.len() < wanted {
                self.pending_swap = Some(rec);
            } else {
                rec.after_mb = Some(measured.iter().map(|d| d.process_bytes >> 20).sum());
                rec.device_free_after_mb = measured.iter().map(|d| d.free_bytes >> 20).min();
                tracing::info!(
                    to = rec.to,
                    before_mb = rec.before_mb,
                    after_mb = rec.after_mb,
                    device_free_before_mb = rec.device_free_before_mb,
                    device_free_after_mb = rec.device_free_after_mb,
                    "phase switch: GPU memory measured before and after"
                );
                if let Ok(mut v) = self.memory_swaps.lock() {
                    if v.len() >= 100 {
                        v.pop_front();
                    }
                    v.push_back(rec);
                }
            }
        }
        if self.auto {
            // `auto`: pipelined while every model fits the budget together,
            // by measured memory where a worker has reported it.
            let total: u64 = self
                .slots
                .iter()
                .filter(|(_, s)| !s.remote)
                .map(|(name, s)| {
                    self.measured_mb
                        .get(name)
                        .copied()
                        .unwrap_or(s.config.memory_mb)
                })
                .sum();
            let budget = self.cfg.gpu_memory_budget_mb;
            let policy = self.remote_policy(if budget > 0 && total <= budget {
                Policy::Pipelined
            } else {
                Policy::TwoPhase
            });
            if policy != self.policy {
                tracing::info!(
                    total_mb = total,
                    budget_mb = budget,
                    ?policy,
                    "auto policy decided again from the models' measured GPU memory"
                );
                self.policy = policy;
                self.notify.notify_one();
            }
        }
    }

    /// The queue this node decides over.
    fn queue_view(&self) -> QueueView {
        if self.shared && self.role.runs_queue() {
            QueueView::Node(self.instance.clone())
        } else {
            QueueView::All
        }
    }

    async fn publish(&mut self) -> Result<()> {
        self.note_device_memory();
        let (pending, batch) = self
            .store
            .read(|c| jobs::load_pending(c, &QueueView::All))
            .await?;
        let progress = match &batch {
            Some(b) => {
                let id = b.id;
                Some(
                    self.store
                        .read(move |c| jobs::batch_progress(c, id))
                        .await?,
                )
            }
            None => None,
        };
        let stt_ready = self.ready_slot(WorkerKind::Stt, None).is_some();
        let eval_ready = self
            .slots
            .values()
            .filter(|s| s.spec_kind == WorkerKind::Evaluator)
            .all(|s| matches!(s.state, SlotState::Ready(_)));
        let unavailable = self.unavailable();
        let down: std::collections::BTreeSet<String> = unavailable.keys().cloned().collect();
        let now = now_ms();
        // Several GPU nodes serve the queue side by side: planned as that
        // many times the places (each node runs its own phases).
        let queue_nodes = if self.shared {
            let alive_ms = self.cfg.lease.as_millis() as i64;
            self.store
                .read(move |c| jobs::live_queue_nodes(c, alive_ms))
                .await?
        } else {
            Vec::new()
        };
        let parallel = queue_nodes.len().max(1);
        let inp = PlanInput {
            now_ms: now,
            policy: self.policy,
            jobs: &pending,
            batch: batch.clone(),
            stt_batch_size: self.cfg.stt_batch_size,
            batch_window_ms: self.cfg.batch_window.as_millis() as i64,
            stt_concurrency: self.cfg.stt_concurrency * parallel,
            eval_concurrency: self.cfg.eval_concurrency * parallel,
            eval_batch_size: self.cfg.eval_batch_size,
            min_batch_wait_ms: self.cfg.min_batch_wait.as_millis() as i64,
            roles: &self.roles,
            stt_ready,
            eval_ready,
            unavailable: &down,
            hold_stt_until_ms: self.hold.filter(|h| h.0 == WorkerKind::Stt).map(|h| h.1),
            hold_eval_until_ms: self
                .hold
                .filter(|h| h.0 == WorkerKind::Evaluator)
                .map(|h| h.1),
            quick_batch: self.quick_batch,
            stt_loading_since_ms: self.loading_since(WorkerKind::Stt),
            eval_loading_since_ms: self.loading_since(WorkerKind::Evaluator),
            arrival_rate: swap::arrival_rate(
                self.arrivals.iter().copied(),
                now,
                2.0 * self.cfg.max_phase_wait.as_secs_f64(),
            ),
            swap_work_ratio: self.cfg.swap_work_ratio,
            max_phase_wait_ms: self.cfg.max_phase_wait.as_millis() as i64,
        };
        let mut entries = crate::eta::entries(&inp, &self.stats);
        if !unavailable.is_empty() {
            let mut waits_on: HashMap<&str, Vec<&str>> = HashMap::new();
            for j in &pending {
                let role = match j.stage {
                    Stage::Stt => "stt",
                    Stage::Eval => j.role.as_str(),
                    Stage::Score => continue,
                };
                if !j.running && unavailable.contains_key(role) {
                    waits_on
                        .entry(j.submission_id.as_str())
                        .or_default()
                        .push(role);
                }
            }
            for (id, entry) in entries.iter_mut() {
                if let Some(role) = waits_on.get(id.as_str()).and_then(|r| r.first())
                    && let Some(u) = unavailable.get(*role)
                {
                    entry.paused = Some(u.reason.clone());
                }
            }
        }
        let count = |stage: Stage| pending.iter().filter(|j| j.stage == stage).count();
        let (stt_q, eval_q, score_q) = (count(Stage::Stt), count(Stage::Eval), count(Stage::Score));
        self.metrics
            .queue_length
            .with_label_values(&["stt"])
            .set(stt_q as i64);
        self.metrics
            .queue_length
            .with_label_values(&["eval"])
            .set(eval_q as i64);
        self.metrics
            .queue_length
            .with_label_values(&["score"])
            .set(score_q as i64);
        self.version += 1;
        let snapshot = Snapshot {
            version: self.version,
            at_ms: now_ms(),
            policy: match self.policy {
                Policy::Pipelined => "pipelined",
                _ => "two-phase",
            },
            phase: self.phase.as_str(),
            phase_since_ms: self.phase_since_ms,
            batch_closed: batch.as_ref().map(|b| b.closed).unwrap_or(false),
            batch: progress,
            stt_queue: stt_q,
            eval_queue: eval_q,
            score_queue: score_q,
            workers: self.supervisor.table(),
            worker_errors: self
                .slots
                .iter()
                .filter_map(|(n, s)| s.last_error.clone().map(|e| (n.clone(), e)))
                .collect(),
            unavailable,
            ready: if self.role.runs_queue() {
                self.slots.contains_key("stt") && !self.roles.is_empty()
            } else {
                !queue_nodes.is_empty()
            },
            entries,
            stats: StatsView::from(&self.stats),
            measured_mb: self.measured_mb.clone(),
            queue_nodes,
            hold: self.hold.map(|(kind, until_ms)| crate::eta::Hold {
                phase: match kind {
                    WorkerKind::Stt => "stt",
                    WorkerKind::Evaluator => "evaluation",
                },
                until_ms,
            }),
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
        Ok(())
    }
}

impl Scheduler {
    /// Roles whose breaker is open, keyed as `viva workers retry` takes them.
    fn unavailable(&self) -> BTreeMap<String, Unavailable> {
        self.slots
            .iter()
            .filter_map(|(name, s)| {
                let since = s.unavailable_since?;
                let (role, reason) = match &s.role {
                    None => (
                        "stt".to_owned(),
                        "transcription paused: the speech-to-text model cannot start; your instructor has been told".to_owned(),
                    ),
                    Some(r) => (
                        r.clone(),
                        format!("evaluation paused: the evaluator \"{r}\" cannot start; your instructor has been told"),
                    ),
                };
                Some((
                    role.clone(),
                    Unavailable {
                        slot: name.clone(),
                        role,
                        error: s.last_error.clone().unwrap_or_default(),
                        failures: s.load_failures,
                        since_ms: since,
                        next_probe_ms: s.next_start_ms,
                        reason,
                    },
                ))
            })
            .collect()
    }
}

impl Slot {
    fn new(kind: WorkerKind, role: Option<String>, config: WorkerConfig) -> Slot {
        Slot {
            spec_kind: kind,
            role,
            config,
            state: SlotState::Down,
            in_flight: 0,
            failures: 0,
            load_failures: 0,
            unavailable_since: None,
            next_start_ms: 0,
            idle_since: Instant::now(),
            last_error: None,
            remote: false,
            starting_since_ms: 0,
        }
    }

    fn spec(&self, name: &str) -> WorkerSpec {
        WorkerSpec::from_config(name, self.spec_kind, self.role.as_deref(), &self.config)
    }
}
