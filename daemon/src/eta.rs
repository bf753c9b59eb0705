//! Live status and honest ETAs.
//!
//! After every scheduler step a [`Snapshot`] is published: the phase, the
//! current batch's progress, queue lengths, workers, and for every unfinished
//! submission its state, position in its queue and predicted completion.
//!
//! The prediction replays the scheduler's own policy forward in time
//! ([`plan`]) with service times measured on this machine
//! ([`ServiceStats`]): STT time as a linear function of audio duration,
//! evaluator call time as a linear function of the items in the call and of
//! their total audio duration (a stand-in for transcript length, known before
//! the transcript exists), and worker start-up time per kind. It is a
//! simulation of the phase plan, not a constant per position.
//!
//! [`plan`] mirrors `scheduler.rs` rather than calling it: batch size and
//! window, the concurrency limits, the phase switch with worker start-ups,
//! evaluator call sizes and the order roles are served in are re-stated here.
//! A change to the scheduler's policy needs the same change in [`plan`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::Serialize;

use crate::config::Policy;
use crate::jobs::{BatchProgress, OpenBatch, PendingJob, Stage};
use crate::swap;
use crate::workers::ProcessInfo;

/// Online least-squares fit of `seconds = a + b * x` over recent samples.
#[derive(Debug, Clone)]
pub struct LinearModel {
    samples: VecDeque<(f64, f64)>,
    cap: usize,
    prior: (f64, f64),
}

impl LinearModel {
    pub fn new(prior_a: f64, prior_b: f64) -> Self {
        Self {
            samples: VecDeque::new(),
            cap: 64,
            prior: (prior_a, prior_b),
        }
    }

    pub fn observe(&mut self, x: f64, seconds: f64) {
        if !x.is_finite() || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back((x, seconds));
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// Returns (a, b), falling back to a ratio through the origin when the
    /// samples cannot separate the fixed and proportional parts.
    pub fn coefficients(&self) -> (f64, f64) {
        let n = self.samples.len() as f64;
        if self.samples.is_empty() {
            return self.prior;
        }
        let mx = self.samples.iter().map(|s| s.0).sum::<f64>() / n;
        let my = self.samples.iter().map(|s| s.1).sum::<f64>() / n;
        let sxx: f64 = self.samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
        let sxy: f64 = self.samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
        if self.samples.len() >= 3 && sxx > 1e-9 * n.max(1.0) {
            let b = (sxy / sxx).max(0.0);
            let a = (my - b * mx).max(0.0);
            return (a, b);
        }
        if mx > 0.0 { (0.0, my / mx) } else { (my, 0.0) }
    }

    pub fn predict(&self, x: f64) -> f64 {
        let (a, b) = self.coefficients();
        (a + b * x).max(0.0)
    }
}

/// Online fit of an evaluator call's time,
/// `seconds = a + b * items + c * audio_seconds`, over recent calls.
///
/// Prompt processing grows with the transcripts in the call (audio duration
/// stands in for their length), generation with the number of items. The fit
/// is non-negative least squares over the subsets of the three terms (the
/// best-fitting subset whose coefficients are all ≥ 0); until it has as many
/// calls as terms it scales the prior to the calls seen.
#[derive(Debug, Clone)]
pub struct EvalModel {
    samples: VecDeque<([f64; 3], f64)>,
    cap: usize,
    prior: [f64; 3],
}

impl EvalModel {
    pub fn new(prior: [f64; 3]) -> Self {
        Self {
            samples: VecDeque::new(),
            cap: 64,
            prior,
        }
    }

    pub fn observe(&mut self, items: f64, audio_seconds: f64, seconds: f64) {
        if ![items, audio_seconds, seconds]
            .iter()
            .all(|v| v.is_finite())
            || seconds < 0.0
            || items <= 0.0
            || audio_seconds < 0.0
        {
            return;
        }
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples
            .push_back(([1.0, items, audio_seconds], seconds));
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// (a, b, c).
    pub fn coefficients(&self) -> [f64; 3] {
        if self.samples.is_empty() {
            return self.prior;
        }
        // Calls that all had the same number of items cannot tell the
        // fixed part from the per-item part: the fit keeps one intercept
        // (the fixed term) and splits it as the prior does, so a larger
        // call is predicted to cost more — not the same as a one-item call
        // (that underestimate held phase switches for far too long).
        let items0 = self.samples[0].0[1];
        let same_items = self
            .samples
            .iter()
            .all(|(x, _)| (x[1] - items0).abs() < 1e-9);
        let mut best: Option<([f64; 3], f64)> = None;
        for mask in 1u8..8 {
            if same_items && mask & 0b010 != 0 {
                continue;
            }
            let terms: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
            if self.samples.len() < terms.len() + 1 {
                continue;
            }
            let Some(theta) = self.solve(&terms) else {
                continue;
            };
            if theta.iter().any(|v| *v < 0.0) {
                continue;
            }
            let sse: f64 = self
                .samples
                .iter()
                .map(|(x, y)| (y - dot(&theta, x)).powi(2))
                .sum();
            // Prefer fewer terms unless more terms fit clearly better.
            let penalty = 1.0 + 0.02 * terms.len() as f64;
            if best.is_none_or(|(_, b)| sse * penalty < b) {
                best = Some((theta, sse * penalty));
            }
        }
        if let Some((mut theta, _)) = best {
            if same_items && items0 > 0.0 {
                let [a, b, _] = self.prior;
                let fixed_share = if a + b * items0 > 0.0 {
                    a / (a + b * items0)
                } else {
                    1.0
                };
                let intercept = theta[0];
                theta[0] = intercept * fixed_share;
                theta[1] = intercept * (1.0 - fixed_share) / items0;
            }
            return theta;
        }
        let predicted: f64 = self.samples.iter().map(|(x, _)| dot(&self.prior, x)).sum();
        let seen: f64 = self.samples.iter().map(|(_, y)| y).sum();
        let k = if predicted > 0.0 {
            seen / predicted
        } else {
            1.0
        };
        self.prior.map(|v| v * k)
    }

    /// Least squares on the chosen terms (others 0), by the normal
    /// equations; `None` when they are singular.
    fn solve(&self, terms: &[usize]) -> Option<[f64; 3]> {
        let k = terms.len();
        let mut m = [[0.0f64; 4]; 3];
        for (x, y) in &self.samples {
            for (r, &i) in terms.iter().enumerate() {
                for (c, &j) in terms.iter().enumerate() {
                    m[r][c] += x[i] * x[j];
                }
                m[r][k] += x[i] * y;
            }
        }
        // Gaussian elimination with partial pivoting.
        for col in 0..k {
            let pivot = (col..k).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
            let scale = (0..k).map(|r| m[r][r].abs()).fold(0.0, f64::max).max(1.0);
            if m[pivot][col].abs() < 1e-9 * scale {
                return None;
            }
            m.swap(col, pivot);
            for r in 0..k {
                if r != col {
                    let f = m[r][col] / m[col][col];
                    let pivot_row = m[col];
                    for (v, p) in m[r].iter_mut().zip(pivot_row).skip(col).take(k + 1 - col) {
                        *v -= f * p;
                    }
                }
            }
        }
        let mut theta = [0.0; 3];
        for (r, &i) in terms.iter().enumerate() {
            theta[i] = m[r][k] / m[r][r];
        }
        Some(theta)
    }

    pub fn predict(&self, items: f64, audio_seconds: f64) -> f64 {
        dot(&self.coefficients(), &[1.0, items, audio_seconds]).max(0.0)
    }
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Until measured: a small LLM call takes seconds, plus a little per
/// second of speech it reads.
const EVAL_PRIOR: [f64; 3] = [5.0, 5.0, 0.02];

/// Measured service times.
#[derive(Debug, Clone)]
pub struct ServiceStats {
    /// STT seconds as a function of audio seconds.
    pub stt: LinearModel,
    /// Evaluator call seconds as a function of the items in the call and
    /// their audio seconds, per role.
    pub eval: BTreeMap<String, EvalModel>,
    /// Worker start-up (spawn to loaded) seconds per kind: "stt", "evaluator".
    pub start: HashMap<&'static str, f64>,
    /// Worker stop (asked to exit to gone) seconds per kind.
    pub stop: HashMap<&'static str, f64>,
}

impl Default for ServiceStats {
    fn default() -> Self {
        Self {
            // Priors until the first measurements: Whisper on CPU runs at
            // roughly a fifth of real time; a small LLM call takes seconds.
            stt: LinearModel::new(1.0, 0.2),
            eval: BTreeMap::new(),
            start: HashMap::new(),
            stop: HashMap::new(),
        }
    }
}

impl ServiceStats {
    pub fn eval_model(&mut self, role: &str) -> &mut EvalModel {
        self.eval
            .entry(role.to_owned())
            .or_insert_with(|| EvalModel::new(EVAL_PRIOR))
    }

    pub(crate) fn eval_seconds(&self, role: &str, items: usize, audio_seconds: f64) -> f64 {
        self.eval
            .get(role)
            .map(|m| m.predict(items as f64, audio_seconds))
            .unwrap_or_else(|| dot(&EVAL_PRIOR, &[1.0, items as f64, audio_seconds]))
    }

    pub fn observe_start(&mut self, kind: &'static str, seconds: f64) {
        let e = self.start.entry(kind).or_insert(seconds);
        *e = 0.7 * *e + 0.3 * seconds;
    }

    pub(crate) fn start_seconds(&self, kind: &str) -> f64 {
        self.start.get(kind).copied().unwrap_or(1.0)
    }

    pub fn observe_stop(&mut self, kind: &'static str, seconds: f64) {
        let e = self.stop.entry(kind).or_insert(seconds);
        *e = 0.7 * *e + 0.3 * seconds;
    }

    pub(crate) fn stop_seconds(&self, kind: &str) -> Option<f64> {
        self.stop.get(kind).copied()
    }

    /// Load and stop times recorded by an earlier run with the same models.
    pub fn seed_times(&mut self, kind: &'static str, start: Option<f64>, stop: Option<f64>) {
        if let Some(v) = start.filter(|v| v.is_finite() && *v >= 0.0) {
            self.start.insert(kind, v);
        }
        if let Some(v) = stop.filter(|v| v.is_finite() && *v >= 0.0) {
            self.stop.insert(kind, v);
        }
    }

    /// A switch there and back: both kinds loaded once and stopped once.
    pub(crate) fn round_trip_seconds(&self) -> f64 {
        ["stt", "evaluator"]
            .iter()
            .map(|k| self.start_seconds(k) + self.stop.get(k).copied().unwrap_or(0.0))
            .sum()
    }
}

/// What the planner needs to know about the scheduler right now.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub now_ms: i64,
    pub policy: Policy,
    pub jobs: &'a [PendingJob],
    /// The STT batch whose phase has not finished.
    pub batch: Option<OpenBatch>,
    pub stt_batch_size: usize,
    /// How long a batch takes uploads after it opens.
    pub batch_window_ms: i64,
    pub stt_concurrency: usize,
    pub eval_concurrency: usize,
    pub eval_batch_size: usize,
    pub min_batch_wait_ms: i64,
    pub roles: &'a [String],
    pub stt_ready: bool,
    pub eval_ready: bool,
    /// Roles whose model cannot start ("stt" or an evaluator's name): their
    /// waiting jobs do not run, so the plan leaves them out, and a submission
    /// that waits on one has no ETA (it depends on when the model is fixed).
    pub unavailable: &'a BTreeSet<String>,
    /// A phase switch the scheduler holds back to save a model swap
    /// (`swap`): the STT phase, or the evaluation phase, starts no earlier
    /// than this (ms); while evaluation is held, new uploads are transcribed
    /// first by the STT model already loaded.
    pub hold_stt_until_ms: Option<i64>,
    pub hold_eval_until_ms: Option<i64>,
    /// The batch the scheduler opened on the quick path of a lone upload
    /// (`swap::quick_path`): it takes no one else and its evaluation is not
    /// held.
    pub quick_batch: Option<i64>,
    /// Since when the STT worker, or the last evaluator, now loading has
    /// been loading (ms): only the rest of its load is still to come.
    pub stt_loading_since_ms: Option<i64>,
    pub eval_loading_since_ms: Option<i64>,
    /// Recent uploads per second ([`swap::arrival_rate`]): the plan expects
    /// more at this rate, who join the open batch and weigh in the held
    /// switches, as they will.
    pub arrival_rate: f64,
    /// `scheduler.swap_work_ratio` and `max_phase_wait`: the cost-aware
    /// switch, replayed for the phases ahead (0: switch at once).
    pub swap_work_ratio: f64,
    pub max_phase_wait_ms: i64,
}

impl PlanInput<'_> {
    /// Seconds until a worker of `kind` ("stt" or "evaluator") that is not
    /// ready can work: what is left of a load in progress, else a whole
    /// one.
    fn start_left(&self, stats: &ServiceStats, kind: &str) -> f64 {
        let full = stats.start_seconds(kind);
        let since = match kind {
            "stt" => self.stt_loading_since_ms,
            _ => self.eval_loading_since_ms,
        };
        match since {
            Some(t) => (full - (self.now_ms - t) as f64 / 1000.0).max(0.0),
            None => full,
        }
    }

    /// A job that waits on a model that cannot start.
    fn blocked(&self, j: &PendingJob) -> bool {
        !j.running
            && match j.stage {
                Stage::Stt => self.unavailable.contains("stt"),
                Stage::Eval => self.unavailable.contains(&j.role),
                Stage::Score => false,
            }
    }
}

/// Predicted times (ms since the epoch) for one submission.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub stt_done_ms: i64,
    pub done_ms: i64,
}

#[derive(Debug, Clone)]
struct Sub {
    id: String,
    duration: f64,
    stt: Option<(bool, Option<i64>)>, // (running, started_at)
    evals: Vec<(String, bool, Option<i64>)>,
    batch: Option<i64>,
    score_pending: bool,
    /// Upload time (s).
    arrived: f64,
}

fn group(jobs: &[PendingJob]) -> Vec<Sub> {
    let mut order: Vec<Sub> = Vec::new();
    let mut idx: HashMap<&str, usize> = HashMap::new();
    for j in jobs {
        let i = *idx.entry(j.submission_id.as_str()).or_insert_with(|| {
            order.push(Sub {
                id: j.submission_id.clone(),
                duration: j.duration_seconds,
                stt: None,
                evals: Vec::new(),
                batch: j.batch_id,
                score_pending: false,
                arrived: j.submitted_at as f64 / 1000.0,
            });
            order.len() - 1
        });
        let s = &mut order[i];
        match j.stage {
            Stage::Stt => s.stt = Some((j.running, j.started_at)),
            Stage::Eval => s.evals.push((j.role.clone(), j.running, j.started_at)),
            Stage::Score => s.score_pending = true,
        }
    }
    order
}

/// Multi-server FIFO: returns finish time of each job in order.
fn run_servers(start: f64, servers: usize, durations: &[f64]) -> Vec<f64> {
    let mut free = vec![start; servers.max(1)];
    durations
        .iter()
        .map(|d| {
            let (i, t) = free
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f64::MAX),
                    |acc, (i, t)| if t < acc.1 { (i, t) } else { acc },
                );
            free[i] = t + d;
            free[i]
        })
        .collect()
}

/// Simulates evaluator calls. Items are (submission index, role, when it may
/// start, its audio seconds). Returns when the last call ends.
fn run_evals(
    inp: &PlanInput<'_>,
    stats: &ServiceStats,
    start: f64,
    items: &[(usize, String, f64, f64)],
    running_remaining: &HashMap<String, f64>,
    done: &mut HashMap<usize, f64>,
) -> f64 {
    let mut end = start;
    let concurrency = inp.eval_concurrency.max(1);
    let mut slot_free = vec![start; concurrency];
    let mut role_free: HashMap<&str, f64> = HashMap::new();
    for (role, rem) in running_remaining {
        role_free.insert(role.as_str(), start + rem);
        // A running call holds a concurrency slot until it ends.
        if let Some(s) = slot_free.iter_mut().min_by(|a, b| a.total_cmp(b)) {
            *s = start + rem;
        }
    }
    let mut per_role: BTreeMap<&str, VecDeque<(usize, f64, f64)>> = BTreeMap::new();
    for (sub, role, avail, audio) in items {
        per_role
            .entry(role.as_str())
            .or_default()
            .push_back((*sub, *avail, *audio));
    }
    loop {
        // The role whose next chunk can start earliest goes next.
        let mut best: Option<(&str, f64)> = None;
        for (role, q) in &per_role {
            if let Some(&(_, avail, _)) = q.front() {
                let t = avail.max(*role_free.get(role).unwrap_or(&start));
                if best.is_none_or(|(_, bt)| t < bt) {
                    best = Some((role, t));
                }
            }
        }
        let Some((role, ready)) = best else { break };
        let (si, slot_t) =
            slot_free
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f64::MAX),
                    |acc, (i, t)| if t < acc.1 { (i, t) } else { acc },
                );
        let t0 = ready.max(slot_t);
        let Some(q) = per_role.get_mut(role) else {
            break;
        };
        let mut chunk = Vec::new();
        let mut audio = 0.0;
        while chunk.len() < inp.eval_batch_size.max(1) {
            match q.front() {
                Some(&(sub, avail, a)) if avail <= t0 + 1e-9 => {
                    chunk.push(sub);
                    audio += a;
                    q.pop_front();
                }
                _ => break,
            }
        }
        if chunk.is_empty() {
            continue;
        }
        let t1 = t0 + stats.eval_seconds(role, chunk.len(), audio);
        slot_free[si] = t1;
        role_free.insert(role, t1);
        end = end.max(t1);
        for sub in chunk {
            let e = done.entry(sub).or_insert(t1);
            *e = e.max(t1);
        }
    }
    end
}

/// The evaluator calls still to make for these submissions, each available
/// from its time in `avail` (or `floor`, whichever is later): every role
/// that can start for one still to transcribe, the roles not yet running
/// for a transcribed one.
fn queued_evals(
    inp: &PlanInput<'_>,
    subs: &[Sub],
    indices: &[usize],
    avail: &HashMap<usize, f64>,
    floor: f64,
) -> Vec<(usize, String, f64, f64)> {
    let mut items = Vec::new();
    for &i in indices {
        let s = &subs[i];
        let a = avail.get(&i).copied().unwrap_or(floor).max(floor);
        if s.stt.is_some() {
            for role in inp.roles.iter().filter(|r| !inp.unavailable.contains(*r)) {
                items.push((i, role.clone(), a, s.duration));
            }
        } else {
            for (role, running, _) in &s.evals {
                if !running {
                    items.push((i, role.clone(), a, s.duration));
                }
            }
        }
    }
    items
}

/// The service seconds a phase switch would serve, and what one more
/// upload adds to it: the one copy of this sum, used by the scheduler's
/// cost-aware switch ([`swap`]) and by [`plan`] replaying it. `audio` has
/// one entry per waiting submission (seconds). Switching to STT serves the
/// uploads' transcriptions and then their evaluations; switching to
/// evaluation, the evaluations. Evaluator roles run side by side in calls
/// of `eval_batch_size`: the slowest role's share counts.
pub(crate) fn swap_work(
    stats: &ServiceStats,
    roles: &[String],
    eval_batch_size: usize,
    to_stt: bool,
    audio: &[f64],
) -> (f64, f64) {
    let n = audio.len().max(1);
    let total: f64 = audio.iter().sum();
    let mean = total / n as f64;
    let batch = eval_batch_size.max(1);
    let eval = |items: usize, audio: f64| -> f64 {
        let calls = items.div_ceil(batch).max(1);
        roles
            .iter()
            .map(|r| calls as f64 * stats.eval_seconds(r, items.min(batch), audio / calls as f64))
            .fold(0.0, f64::max)
    };
    let per_item = stats.stt.predict(mean) + eval(1, mean);
    let work = if to_stt {
        audio.iter().map(|&a| stats.stt.predict(a)).sum::<f64>() + eval(n, total)
    } else {
        eval(n, total)
    };
    (work, per_item)
}

/// The most uploads the plan expects beyond those it knows.
const MAX_EXPECTED: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Loaded {
    Stt,
    Evaluators,
}

/// The two-phase policy replayed forward from now, step for step as
/// `scheduler::step_two_phase` takes it: the open batch takes uploads while
/// it is being transcribed (until `stt_batch_size`, the window, or — when
/// switches are cost-aware — `max_phase_wait`), a finished batch's
/// evaluations run in one evaluation phase, and a switch whose work does
/// not pay for the swap is held (`swap::decide`, with the same inputs),
/// new uploads being transcribed meanwhile by the model already loaded.
///
/// Future uploads are part of it: at the recent arrival rate, uploads of
/// the mean duration are expected until the window and the latency bound
/// are over (they cannot delay anyone known now any later than that). A
/// student who uploads first into a class that is still uploading is told
/// when the batch will really close and the switch really happen, not when
/// it would if nobody else came (the lab measured 61 % p90 error at upload
/// for the first batch without them).
#[allow(clippy::too_many_arguments)]
fn two_phase(
    inp: &PlanInput<'_>,
    stats: &ServiceStats,
    known: &[Sub],
    stt_times: &[f64],
    running_eval: &HashMap<String, f64>,
    stt_done: &mut HashMap<usize, f64>,
    done: &mut HashMap<usize, f64>,
) {
    let now = inp.now_ms as f64 / 1000.0;
    let n_known = known.len();
    let mut subs: Vec<Sub> = known.to_vec();
    let mut stt_dur: Vec<f64> = stt_times.to_vec();
    let window = inp.batch_window_ms as f64 / 1000.0;
    let bound = inp.max_phase_wait_ms as f64 / 1000.0;
    let cost_aware = inp.swap_work_ratio > 0.0;
    if inp.arrival_rate > 0.0 {
        let gap = 1.0 / inp.arrival_rate;
        let mean = if n_known > 0 {
            known.iter().map(|s| s.duration).sum::<f64>() / n_known as f64
        } else {
            60.0
        };
        let last = known.iter().map(|s| s.arrived).fold(now - gap, f64::max);
        let horizon = now + window + if cost_aware { bound } else { 0.0 };
        let mut at = (last + gap).max(now);
        while at <= horizon && subs.len() < n_known + MAX_EXPECTED {
            subs.push(Sub {
                id: String::new(),
                duration: mean,
                stt: Some((false, None)),
                evals: Vec::new(),
                batch: None,
                score_pending: false,
                arrived: at,
            });
            stt_dur.push(stats.stt.predict(mean));
            at += gap;
        }
    }
    let arrived = |i: usize| subs[i].arrived;
    let decide = |to_stt: bool, waiting: &[usize], t: f64| -> swap::Swap {
        if !cost_aware {
            return swap::Swap::Now;
        }
        let audio: Vec<f64> = waiting.iter().map(|&i| subs[i].duration).collect();
        let (work, per_item) = swap_work(stats, inp.roles, inp.eval_batch_size, to_stt, &audio);
        let oldest = waiting.iter().map(|&i| subs[i].arrived).fold(t, f64::min);
        swap::decide(&swap::SwapInput {
            waiting_work_s: work,
            oldest_wait_s: (t - oldest).max(0.0),
            per_item_work_s: per_item,
            arrival_rate: inp.arrival_rate,
            round_trip_s: stats.round_trip_seconds(),
            ratio: inp.swap_work_ratio,
            max_wait_s: bound,
        })
    };

    struct Batch {
        opened: f64,
        closed: bool,
        size: usize,
        members: Vec<usize>,
        /// The quick path of a lone upload: evaluated at once.
        quick: bool,
    }
    let mut batch: Option<Batch> = None;
    let mut unbatched: VecDeque<usize> = VecDeque::new();
    let mut eval_wait: Vec<usize> = Vec::new();
    // The evaluations waiting include a quick-path batch's: not held.
    let mut quick_eval = false;
    let mut known_left = 0usize;
    for (i, s) in known.iter().enumerate() {
        if s.stt.is_some() {
            known_left += 1;
            match (s.batch, &inp.batch) {
                (Some(_), Some(b)) => {
                    let quick = inp.quick_batch == Some(b.id);
                    let open = batch.get_or_insert_with(|| Batch {
                        opened: b.opened_at as f64 / 1000.0,
                        closed: b.closed || quick,
                        size: b.size,
                        members: Vec::new(),
                        quick,
                    });
                    open.members.push(i);
                }
                // Batched, but the batch is over (a snapshot between two
                // writes): transcribed with the next one.
                _ => unbatched.push_back(i),
            }
        } else if s.evals.iter().any(|e| !e.1) {
            known_left += 1;
            eval_wait.push(i);
            quick_eval |= s.batch.is_some() && s.batch == inp.quick_batch;
        }
    }
    unbatched.extend(n_known..subs.len());
    let mut loaded = if inp.stt_ready {
        Some(Loaded::Stt)
    } else if inp.eval_ready {
        Some(Loaded::Evaluators)
    } else {
        None
    };
    let mut hold_stt = inp.hold_stt_until_ms.map(|t| t as f64 / 1000.0);
    let mut hold_eval = inp.hold_eval_until_ms.map(|t| t as f64 / 1000.0);
    // A hold that ran out is decided again as due: the scheduler then
    // switches (the arrivals it waited for came, or the bound is near).
    let mut hold_over = false;
    let mut first_eval = true;
    // A load in progress now has only its rest to go; later ones are whole.
    let mut stt_start = Some(inp.start_left(stats, "stt"));
    let mut eval_start = Some(inp.start_left(stats, "evaluator"));
    let mut t = now;
    for _ in 0..(4 * subs.len() + 64) {
        if known_left == 0 {
            break;
        }
        if let Some(mut b) = batch.take() {
            // STT phase: the batch's members, and whoever joins it while
            // it is being transcribed.
            let mut start = t;
            if loaded != Some(Loaded::Stt) {
                start += stt_start
                    .take()
                    .unwrap_or_else(|| stats.start_seconds("stt"));
                loaded = Some(Loaded::Stt);
            }
            let mut free = vec![start; inp.stt_concurrency.max(1)];
            let mut end = start;
            let mut run = |i: usize, from: f64, free: &mut Vec<f64>| -> f64 {
                let (k, f) = free
                    .iter()
                    .copied()
                    .enumerate()
                    .fold((0, f64::MAX), |a, (k, f)| if f < a.1 { (k, f) } else { a });
                let fin = f.max(from) + stt_dur[i];
                free[k] = fin;
                stt_done.insert(i, fin);
                fin
            };
            for &i in &b.members {
                end = end.max(run(i, start, &mut free));
            }
            let mut oldest = b
                .members
                .iter()
                .chain(eval_wait.iter())
                .map(|&i| arrived(i))
                .fold(f64::MAX, f64::min);
            while !b.closed && b.size < inp.stt_batch_size {
                let Some(&j) = unbatched.front() else { break };
                let at = arrived(j).max(t);
                if at > end + 1e-9 {
                    // The batch is transcribed before the next upload.
                    break;
                }
                oldest = oldest.min(arrived(j));
                if at - b.opened >= window || (cost_aware && at - oldest >= bound) {
                    b.closed = true;
                    break;
                }
                unbatched.pop_front();
                b.size += 1;
                b.members.push(j);
                end = end.max(run(j, at, &mut free));
            }
            eval_wait.extend(b.members.iter().copied());
            quick_eval |= b.quick;
            t = end;
            continue;
        }
        let next_upload = unbatched.front().map(|&j| arrived(j));
        let upload_here = next_upload.is_some_and(|a| a <= t + 1e-9);
        if !eval_wait.is_empty() && loaded == Some(Loaded::Stt) && !hold_over && !quick_eval {
            let until = hold_eval.or_else(|| match decide(false, &eval_wait, t) {
                swap::Swap::Now => None,
                swap::Swap::HoldFor(s) => Some(t + s),
            });
            if let Some(until) = until.filter(|&u| u > t + 1e-6) {
                if upload_here {
                    batch = Some(open(&mut unbatched, &subs, t, inp.stt_batch_size));
                    continue;
                }
                match next_upload {
                    Some(a) if a < until => t = a,
                    _ => {
                        t = until;
                        hold_over = true;
                    }
                }
                continue;
            }
        }
        if !eval_wait.is_empty() {
            // Evaluation phase: everything transcribed so far.
            let mut start = t;
            if loaded != Some(Loaded::Evaluators) {
                start += eval_start
                    .take()
                    .unwrap_or_else(|| stats.start_seconds("evaluator"));
                loaded = Some(Loaded::Evaluators);
            }
            if let Some(h) = hold_eval.take().filter(|_| !quick_eval) {
                start = start.max(h);
            }
            let items = queued_evals(inp, &subs, &eval_wait, &HashMap::new(), start);
            let empty = HashMap::new();
            let running = if first_eval { running_eval } else { &empty };
            t = run_evals(inp, stats, start, &items, running, done).max(start);
            known_left -= eval_wait.iter().filter(|&&i| i < n_known).count();
            eval_wait.clear();
            first_eval = false;
            hold_over = false;
            quick_eval = false;
            continue;
        }
        let Some(first) = next_upload else { break };
        if !upload_here {
            // Idle until the next upload.
            t = first;
            continue;
        }
        if (loaded == Some(Loaded::Evaluators) || hold_stt.is_some()) && !hold_over {
            let waiting: Vec<usize> = unbatched
                .iter()
                .copied()
                .take_while(|&j| arrived(j) <= t + 1e-9)
                .collect();
            let until = hold_stt.or_else(|| match decide(true, &waiting, t) {
                swap::Swap::Now => None,
                swap::Swap::HoldFor(s) => Some(t + s),
            });
            if let Some(until) = until.filter(|&u| u > t + 1e-6) {
                let next = unbatched
                    .iter()
                    .map(|&j| arrived(j))
                    .find(|&a| a > t + 1e-9);
                match next {
                    Some(a) if a < until => t = a,
                    _ => {
                        t = until;
                        hold_over = true;
                    }
                }
                continue;
            }
        }
        hold_stt = None;
        hold_over = false;
        let open_at = first + inp.min_batch_wait_ms as f64 / 1000.0;
        if t + 1e-9 < open_at {
            t = open_at;
            continue;
        }
        let mut b = open(&mut unbatched, &subs, t, inp.stt_batch_size);
        // A lone upload into a quiet daemon: the quick path, as the
        // scheduler takes it (`swap::quick_path`).
        if cost_aware {
            let audio: Vec<f64> = b.members.iter().map(|&i| subs[i].duration).collect();
            let (work, _) = swap_work(stats, inp.roles, inp.eval_batch_size, false, &audio);
            if swap::quick_path(
                inp.swap_work_ratio,
                inp.arrival_rate,
                work,
                stats.round_trip_seconds(),
            ) {
                b.quick = true;
                b.closed = true;
            }
        }
        batch = Some(b);
    }

    /// Opens a batch at `t` of the uploads there by then (closed when full).
    fn open(unbatched: &mut VecDeque<usize>, subs: &[Sub], t: f64, cap: usize) -> Batch {
        let mut members = Vec::new();
        while members.len() < cap.max(1) {
            match unbatched.front() {
                Some(&j) if subs[j].arrived <= t + 1e-9 => {
                    members.push(j);
                    unbatched.pop_front();
                }
                _ => break,
            }
        }
        Batch {
            opened: t,
            closed: members.len() >= cap.max(1),
            size: members.len(),
            members,
            quick: false,
        }
    }
}

/// Predicts when each unfinished submission will be done.
pub fn plan(inp: &PlanInput<'_>, stats: &ServiceStats) -> HashMap<String, Prediction> {
    let now = inp.now_ms as f64 / 1000.0;
    // Jobs waiting on a model that cannot start take no time from the
    // others: the scheduler serves every other phase and role meanwhile.
    let runnable: Vec<PendingJob> = inp
        .jobs
        .iter()
        .filter(|j| !inp.blocked(j))
        .cloned()
        .collect();
    let subs = group(&runnable);
    let stt_time = |s: &Sub| -> f64 {
        let full = stats.stt.predict(s.duration);
        match s.stt {
            Some((true, Some(started))) => {
                (full - (now - started as f64 / 1000.0)).max(0.2 * full.min(1.0))
            }
            _ => full,
        }
    };
    let mut stt_done: HashMap<usize, f64> = HashMap::new();
    let mut done: HashMap<usize, f64> = HashMap::new();
    // Submissions whose STT is over already wait only for evaluation.
    let stt_start_cost = if inp.stt_ready {
        0.0
    } else {
        inp.start_left(stats, "stt")
    };
    let eval_start_cost = if inp.eval_ready {
        0.0
    } else {
        inp.start_left(stats, "evaluator")
    };
    // A role's running call holds the items of that role now running (one
    // worker per role, one call at a time): its remaining time is the model's
    // time for those items, not for a full `eval_batch_size` call.
    let mut running_items: HashMap<&str, (usize, f64, Option<i64>)> = HashMap::new();
    for (duration, (role, _, started)) in subs
        .iter()
        .flat_map(|s| s.evals.iter().map(move |e| (s.duration, e)))
        .filter(|(_, (_, running, _))| *running)
    {
        let e = running_items
            .entry(role.as_str())
            .or_insert((0, 0.0, *started));
        e.0 += 1;
        e.1 += duration;
        e.2 = match (e.2, *started) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let running_eval: HashMap<String, f64> = running_items
        .into_iter()
        .map(|(role, (items, audio, started))| {
            let full = stats.eval_seconds(role, items, audio);
            let elapsed = started.map(|t| now - t as f64 / 1000.0).unwrap_or(0.0);
            (role.to_owned(), (full - elapsed).max(0.5))
        })
        .collect();
    match inp.policy {
        Policy::Pipelined | Policy::Auto => {
            let stt_idx: Vec<usize> = (0..subs.len()).filter(|&i| subs[i].stt.is_some()).collect();
            let durs: Vec<f64> = stt_idx.iter().map(|&i| stt_time(&subs[i])).collect();
            let ends = run_servers(now + stt_start_cost, inp.stt_concurrency, &durs);
            for (k, &i) in stt_idx.iter().enumerate() {
                stt_done.insert(i, ends[k]);
            }
            let all: Vec<usize> = (0..subs.len()).collect();
            let items = queued_evals(inp, &subs, &all, &stt_done, now + eval_start_cost);
            run_evals(inp, stats, now, &items, &running_eval, &mut done);
        }
        Policy::TwoPhase => {
            let times: Vec<f64> = subs.iter().map(stt_time).collect();
            two_phase(
                inp,
                stats,
                &subs,
                &times,
                &running_eval,
                &mut stt_done,
                &mut done,
            );
        }
    }
    // Submissions with only running evaluations left end with those calls.
    for (i, s) in subs.iter().enumerate() {
        done.entry(i).or_insert_with(|| {
            s.evals
                .iter()
                .filter_map(|(r, _, _)| running_eval.get(r).map(|x| now + x))
                .fold(now, f64::max)
        });
    }
    subs.iter()
        .enumerate()
        .map(|(i, s)| {
            let d = done.get(&i).copied().unwrap_or(now);
            let sd = stt_done.get(&i).copied().unwrap_or(now).min(d);
            (
                s.id.clone(),
                Prediction {
                    stt_done_ms: (sd * 1000.0) as i64,
                    done_ms: (d * 1000.0) as i64,
                },
            )
        })
        .collect()
}

/// One unfinished submission as students see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueEntry {
    pub submission_id: String,
    /// "stt", "evaluation" or "scoring".
    pub phase: &'static str,
    /// Position in its phase's queue (1 = next or running).
    pub position: usize,
    /// Jobs in that queue.
    pub queue_length: usize,
    pub batch_id: Option<i64>,
    pub running: bool,
    /// Seconds until the result; none while the submission waits on a
    /// model that cannot start (see `paused`).
    pub eta_seconds: Option<f64>,
    /// Seconds until the transcript; none while the STT model cannot start.
    pub stt_eta_seconds: Option<f64>,
    pub retrying: bool,
    /// Why this submission waits although it could run: the model it needs
    /// cannot start (see [`Unavailable`]). Plain words for the student.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// A worker role whose model cannot load (its circuit breaker is open): the
/// scheduler serves everything else meanwhile and probes it with backoff.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Unavailable {
    /// The scheduler slot: "stt" or "evaluator:<role>".
    pub slot: String,
    /// What `viva workers retry` takes: "stt" or the evaluator's role.
    pub role: String,
    /// The worker's own error from its last try.
    pub error: String,
    /// Consecutive failed starts.
    pub failures: u32,
    pub since_ms: i64,
    /// When it is tried again by itself.
    pub next_probe_ms: i64,
    /// The reason waiting submissions show.
    pub reason: String,
}

/// A phase switch the scheduler holds back: the models loaded have nothing
/// left to do, and the other phase's waiting work does not yet pay for the
/// swap.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hold {
    /// The phase it switches to: "stt" or "evaluation".
    pub phase: &'static str,
    /// At the latest then (ms); earlier once enough work has arrived.
    pub until_ms: i64,
}

/// The published state of the whole queue.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Snapshot {
    pub version: u64,
    pub at_ms: i64,
    pub policy: &'static str,
    /// "idle", "stt" or "evaluation" (pipelined: "pipelined").
    pub phase: &'static str,
    pub phase_since_ms: i64,
    pub batch: Option<BatchProgress>,
    pub batch_closed: bool,
    pub stt_queue: usize,
    pub eval_queue: usize,
    pub score_queue: usize,
    pub workers: Vec<ProcessInfo>,
    pub worker_errors: BTreeMap<String, String>,
    /// Roles that cannot start now, by role ("stt" or the evaluator's name).
    pub unavailable: BTreeMap<String, Unavailable>,
    pub ready: bool,
    /// A phase switch held back to save a model swap (see `swap`).
    pub hold: Option<Hold>,
    pub entries: BTreeMap<String, QueueEntry>,
    pub stats: StatsView,
    /// Each slot's GPU memory as its worker last measured it (MiB), kept
    /// after the worker stops (it is the model's footprint).
    pub measured_mb: BTreeMap<String, u64>,
    /// The nodes running the GPU queue, when several share the store
    /// (empty on a single node).
    pub queue_nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct StatsView {
    pub stt_fixed_seconds: f64,
    pub stt_real_time_factor: f64,
    pub stt_samples: usize,
    /// Per role: (seconds per call, per item, per audio second, calls seen).
    pub eval: BTreeMap<String, (f64, f64, f64, usize)>,
    pub worker_start_seconds: BTreeMap<String, f64>,
}

impl StatsView {
    pub fn from(stats: &ServiceStats) -> Self {
        let (a, b) = stats.stt.coefficients();
        StatsView {
            stt_fixed_seconds: a,
            stt_real_time_factor: b,
            stt_samples: stats.stt.samples(),
            eval: stats
                .eval
                .iter()
                .map(|(r, m)| {
                    let [a, b, c] = m.coefficients();
                    (r.clone(), (a, b, c, m.samples()))
                })
                .collect(),
            worker_start_seconds: stats
                .start
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }
}

/// Positions and ETAs for every unfinished submission.
pub fn entries(inp: &PlanInput<'_>, stats: &ServiceStats) -> BTreeMap<String, QueueEntry> {
    let predictions = plan(inp, stats);
    let subs = group(inp.jobs);
    let now = inp.now_ms;
    let stt_queue: Vec<&Sub> = subs.iter().filter(|s| s.stt.is_some()).collect();
    let eval_queue: Vec<&Sub> = subs
        .iter()
        .filter(|s| s.stt.is_none() && !s.evals.is_empty())
        .collect();
    let score_queue: Vec<&Sub> = subs
        .iter()
        .filter(|s| s.stt.is_none() && s.evals.is_empty() && s.score_pending)
        .collect();
    let retrying: std::collections::HashSet<&str> = inp
        .jobs
        .iter()
        .filter(|j| j.attempts > 0 && !j.running)
        .map(|j| j.submission_id.as_str())
        .collect();
    // Waiting on a model that cannot start: no finish time to promise (and
    // no transcription time either when it is the STT model).
    let blocked: std::collections::HashSet<&str> = inp
        .jobs
        .iter()
        .filter(|j| inp.blocked(j))
        .map(|j| j.submission_id.as_str())
        .collect();
    let stt_blocked = inp.unavailable.contains("stt");
    // Still to be transcribed while an evaluator is down: the transcript has
    // an ETA, the result does not.
    let eval_blocked = inp.roles.iter().any(|r| inp.unavailable.contains(r));
    let mut out = BTreeMap::new();
    for (phase, queue) in [
        ("stt", &stt_queue),
        ("evaluation", &eval_queue),
        ("scoring", &score_queue),
    ] {
        for (pos, s) in queue.iter().enumerate() {
            let p = predictions.get(&s.id).copied().unwrap_or(Prediction {
                stt_done_ms: now,
                done_ms: now,
            });
            let running = match phase {
                "stt" => s.stt.map(|x| x.0).unwrap_or(false),
                "evaluation" => s.evals.iter().any(|e| e.1),
                _ => false,
            };
            let no_eta = blocked.contains(s.id.as_str()) || (eval_blocked && phase == "stt");
            out.insert(
                s.id.clone(),
                QueueEntry {
                    submission_id: s.id.clone(),
                    phase,
                    position: pos + 1,
                    queue_length: queue.len(),
                    batch_id: s.batch,
                    running,
                    eta_seconds: (!no_eta).then(|| ((p.done_ms - now) as f64 / 1000.0).max(0.0)),
                    stt_eta_seconds: (!(stt_blocked && phase == "stt" && !running))
                        .then(|| ((p.stt_done_ms - now) as f64 / 1000.0).max(0.0)),
                    retrying: retrying.contains(s.id.as_str()),
                    paused: None,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(
        sub: &str,
        stage: Stage,
        role: &str,
        t: i64,
        dur: f64,
        batch: Option<i64>,
    ) -> PendingJob {
        PendingJob {
            id: t,
            submission_id: sub.into(),
            stage,
            role: role.into(),
            running: false,
            attempts: 0,
            not_before: 0,
            batch_id: batch,
            submitted_at: -t,
            duration_seconds: dur,
            started_at: None,
        }
    }

    fn stats() -> ServiceStats {
        let mut s = ServiceStats::default();
        for d in [10.0, 20.0, 30.0] {
            s.stt.observe(d, 1.0 + 0.1 * d);
        }
        for r in ["a", "b"] {
            for k in [1.0, 2.0, 4.0] {
                s.eval_model(r).observe(k, 10.0 * k, 2.0 + 1.0 * k);
            }
        }
        s.observe_start("stt", 0.5);
        s.observe_start("evaluator", 1.0);
        s
    }

    fn input<'a>(jobs: &'a [PendingJob], roles: &'a [String], policy: Policy) -> PlanInput<'a> {
        PlanInput {
            now_ms: 0,
            policy,
            jobs,
            batch: None,
            stt_batch_size: 2,
            batch_window_ms: 120_000,
            stt_concurrency: 1,
            eval_concurrency: 2,
            eval_batch_size: 4,
            min_batch_wait_ms: 0,
            roles,
            stt_ready: true,
            eval_ready: false,
            unavailable: &NONE_DOWN,
            hold_stt_until_ms: None,
            hold_eval_until_ms: None,
            quick_batch: None,
            stt_loading_since_ms: None,
            eval_loading_since_ms: None,
            arrival_rate: 0.0,
            swap_work_ratio: 0.0,
            max_phase_wait_ms: 300_000,
        }
    }

    static NONE_DOWN: BTreeSet<String> = BTreeSet::new();

    #[test]
    fn linear_model_recovers_fixed_and_proportional_parts() {
        let mut m = LinearModel::new(9.0, 9.0);
        assert_eq!(m.predict(1.0), 18.0, "prior before samples");
        for x in [1.0, 2.0, 3.0, 4.0] {
            m.observe(x, 0.5 + 2.0 * x);
        }
        let (a, b) = m.coefficients();
        assert!((a - 0.5).abs() < 1e-9 && (b - 2.0).abs() < 1e-9, "{a} {b}");
        let mut same = LinearModel::new(0.0, 0.0);
        same.observe(10.0, 5.0);
        same.observe(10.0, 7.0);
        assert!((same.predict(20.0) - 12.0).abs() < 1e-9);
    }

    #[test]
    fn eval_model_separates_items_from_transcript_length() {
        let mut m = EvalModel::new([5.0, 5.0, 0.0]);
        // Before enough calls: the prior, scaled to what was seen.
        m.observe(2.0, 60.0, 7.5);
        assert!((m.predict(2.0, 60.0) - 7.5).abs() < 1e-9);
        // True model: 1 s + 2 s per item + 0.1 s per audio second.
        let truth = |n: f64, a: f64| 1.0 + 2.0 * n + 0.1 * a;
        let mut m = EvalModel::new([5.0, 5.0, 0.0]);
        for (n, a) in [
            (1.0, 20.0),
            (1.0, 180.0),
            (4.0, 100.0),
            (4.0, 600.0),
            (2.0, 30.0),
        ] {
            m.observe(n, a, truth(n, a));
        }
        let [a, b, c] = m.coefficients();
        assert!((a - 1.0).abs() < 1e-6 && (b - 2.0).abs() < 1e-6 && (c - 0.1).abs() < 1e-6);
        // A 3-minute answer costs more than a 20-second one.
        assert!(m.predict(1.0, 180.0) > m.predict(1.0, 20.0) + 15.0);
        // Coefficients never go negative: time falling with items is
        // explained without a negative per-item cost.
        let mut odd = EvalModel::new([5.0, 5.0, 0.0]);
        for (n, a, y) in [
            (1.0, 10.0, 9.0),
            (2.0, 20.0, 8.0),
            (3.0, 30.0, 7.0),
            (4.0, 40.0, 6.0),
        ] {
            odd.observe(n, a, y);
        }
        assert!(odd.coefficients().iter().all(|v| *v >= 0.0));
    }

    /// Only one-item calls seen so far (a warm-up, a trickle): a call of
    /// four is predicted to cost more than one, split as the prior splits
    /// fixed and per-item time, not the same as a single item.
    #[test]
    fn one_item_calls_do_not_make_a_batch_free() {
        let mut m = EvalModel::new([5.0, 5.0, 0.0]);
        for audio in [90.0, 100.0, 110.0] {
            m.observe(1.0, audio, 2.2);
        }
        let one = m.predict(1.0, 100.0);
        let four = m.predict(4.0, 400.0);
        assert!((one - 2.2).abs() < 0.05, "{one}");
        assert!(
            (four - 5.5).abs() < 0.2,
            "half fixed, half per item: {four}"
        );
    }

    #[test]
    fn a_running_call_lasts_as_long_as_its_own_items() {
        // One submission's evaluations run (one item per role, started at
        // t = 0); a new upload's STT waits for them. Measured: 2 s + 1 s per
        // item, so the running calls end at 3 s, not at the 6 s of a full
        // 4-item call (the lab saw ETAs 30 s too long from this).
        let roles = vec!["a".to_string(), "b".to_string()];
        let mut jobs = Vec::new();
        for r in ["a", "b"] {
            let mut j = job("s1", Stage::Eval, r, 1, 10.0, None);
            j.running = true;
            j.started_at = Some(0);
            jobs.push(j);
        }
        jobs.push(job("s2", Stage::Stt, "", 3, 10.0, None));
        let mut inp = input(&jobs, &roles, Policy::Pipelined);
        inp.eval_ready = true;
        let p = plan(&inp, &stats());
        let near = |ms: i64, want: i64| (ms - want).abs() <= 1;
        assert!(near(p["s1"].done_ms, 3000), "{:?}", p["s1"]);
        // Pipelined: s2's STT (2 s) overlaps; its evaluations start when the
        // running calls free the evaluators (3 s) and take 3 s.
        assert!(near(p["s2"].stt_done_ms, 2000), "{:?}", p["s2"]);
        assert!(near(p["s2"].done_ms, 6000), "{:?}", p["s2"]);
    }

    /// Evaluator b cannot start: s1 (waiting only on b) has no ETA, and its
    /// evaluation no longer delays s2's transcription; s2 gets a transcript
    /// ETA but no result ETA (it will need b too). The STT model down: no
    /// transcript ETA for what waits on it.
    #[test]
    fn a_model_that_cannot_start_has_no_eta_and_delays_nothing_else() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let jobs = vec![
            job("s1", Stage::Eval, "b", 1, 10.0, Some(1)),
            job("s2", Stage::Stt, "", 2, 10.0, None),
            job("s3", Stage::Eval, "a", 3, 10.0, Some(1)),
            job("s3", Stage::Eval, "b", 3, 10.0, Some(1)),
        ];
        let st = stats();
        let up = input(&jobs, &roles, Policy::TwoPhase);
        let all_up = entries(&up, &st);
        assert!(all_up.values().all(|e| e.eta_seconds.is_some()));
        let b_down: BTreeSet<String> = ["b".to_string()].into();
        let down = PlanInput {
            unavailable: &b_down,
            ..input(&jobs, &roles, Policy::TwoPhase)
        };
        let e = entries(&down, &st);
        assert_eq!(e["s1"].eta_seconds, None, "waits on b: no promise");
        assert_eq!(e["s3"].eta_seconds, None, "waits on b too, though a runs");
        assert_eq!(
            e["s2"].eta_seconds, None,
            "will need b after its transcript"
        );
        let (with_b, without_b) = (
            all_up["s2"].stt_eta_seconds.expect("stt eta"),
            e["s2"].stt_eta_seconds.expect("stt eta while b is down"),
        );
        assert!(
            without_b < with_b,
            "b's evaluations no longer delay the transcript: {without_b} vs {with_b}"
        );
        // Positions are unchanged: the queue is what it is.
        assert_eq!(e["s1"].position, all_up["s1"].position);
        let stt_down: BTreeSet<String> = ["stt".to_string()].into();
        let down = PlanInput {
            unavailable: &stt_down,
            ..input(&jobs, &roles, Policy::TwoPhase)
        };
        let e = entries(&down, &st);
        assert_eq!(e["s2"].stt_eta_seconds, None);
        assert_eq!(e["s2"].eta_seconds, None);
        assert!(e["s1"].eta_seconds.is_some(), "evaluation goes on");
    }

    /// The planner follows the scheduler's held switch (`swap`): a held
    /// STT phase starts no earlier than the hold; while evaluation is held,
    /// a new upload is transcribed first and the held evaluations start
    /// once due.
    #[test]
    fn held_switches_delay_that_phase_and_transcribe_first() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let st = stats();
        let upload = vec![job("s1", Stage::Stt, "", 1, 10.0, None)];
        let free = plan(&input(&upload, &roles, Policy::TwoPhase), &st);
        let held = PlanInput {
            hold_stt_until_ms: Some(100_000),
            ..input(&upload, &roles, Policy::TwoPhase)
        };
        let p = plan(&held, &st);
        assert!(free["s1"].stt_done_ms < 10_000, "{:?}", free["s1"]);
        assert!(p["s1"].stt_done_ms >= 100_000, "{:?}", p["s1"]);

        let jobs = vec![
            job("s1", Stage::Eval, "a", 1, 10.0, Some(1)),
            job("s1", Stage::Eval, "b", 1, 10.0, Some(1)),
            job("s2", Stage::Stt, "", 2, 10.0, None),
        ];
        let eager = plan(&input(&jobs, &roles, Policy::TwoPhase), &st);
        assert!(
            eager["s2"].stt_done_ms > eager["s1"].done_ms,
            "today: evaluation first"
        );
        let held = PlanInput {
            hold_eval_until_ms: Some(50_000),
            stt_ready: true,
            ..input(&jobs, &roles, Policy::TwoPhase)
        };
        let p = plan(&held, &st);
        assert!(
            p["s2"].stt_done_ms < p["s1"].done_ms,
            "held: the new upload is transcribed first: {p:?}"
        );
        assert!(p["s1"].done_ms >= 50_000, "{p:?}");
        assert_eq!(
            p["s1"].done_ms, p["s2"].done_ms,
            "one evaluation phase for both"
        );
    }

    /// The first upload into a class that is still uploading: the open
    /// batch will take the next arrivals while it is being transcribed, and
    /// its evaluation phase waits for them. The plan expects them at the
    /// recent arrival rate (without it, the first student's ETA was the
    /// time the batch would take alone: the lab's 61 % error at upload).
    #[test]
    fn the_open_batch_expects_the_uploads_still_coming() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let jobs = vec![job("s1", Stage::Stt, "", 1, 10.0, Some(1))];
        let st = stats();
        let open = PlanInput {
            batch: Some(OpenBatch {
                id: 1,
                opened_at: 0,
                closed: false,
                size: 1,
            }),
            ..input(&jobs, &roles, Policy::TwoPhase)
        };
        // Alone: STT 2 s, evaluator start 1 s, one call of 1 item (3 s).
        assert_eq!(plan(&open, &st)["s1"].done_ms, 6000);
        // One upload every 2 s: the next joins at 2 s (the batch's second
        // and last place), transcribed by 4 s; then one call of 2 items.
        let busy = PlanInput {
            arrival_rate: 0.5,
            ..open.clone()
        };
        let p = plan(&busy, &st)["s1"];
        assert_eq!(p.stt_done_ms, 2000);
        assert_eq!(p.done_ms, 9000);
        // A window already over by then takes nobody.
        let late = PlanInput {
            batch_window_ms: 1500,
            ..busy.clone()
        };
        assert_eq!(plan(&late, &st)["s1"].done_ms, 6000);
    }

    /// Cost-aware switching, replayed: evaluations that do not pay for the
    /// swap wait, while the STT model takes the uploads expected meanwhile,
    /// until the work pays for it; with no arrivals expected they go at
    /// once.
    #[test]
    fn the_plan_replays_a_held_switch_with_the_expected_uploads() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let mut st = stats();
        // A GPU-like swap: about 20 s to load each kind.
        for _ in 0..20 {
            st.observe_start("stt", 20.0);
            st.observe_start("evaluator", 20.0);
        }
        let load = st.start_seconds("evaluator");
        assert!(load > 15.0, "{load}");
        let jobs = vec![
            job("s1", Stage::Eval, "a", 1, 10.0, Some(1)),
            job("s1", Stage::Eval, "b", 1, 10.0, Some(1)),
        ];
        let quiet = PlanInput {
            swap_work_ratio: 1.0,
            stt_batch_size: 10,
            ..input(&jobs, &roles, Policy::TwoPhase)
        };
        // Evaluator start, one call of 1 item: 3 s.
        let alone = ((load + 3.0) * 1000.0) as i64;
        assert!((plan(&quiet, &st)["s1"].done_ms - alone).abs() <= 1);
        let trickle = PlanInput {
            arrival_rate: 0.1,
            ..quiet.clone()
        };
        let p = plan(&trickle, &st)["s1"];
        assert!(
            p.done_ms > alone + 10_000,
            "held for the uploads expected every 10 s: {p:?}"
        );
        assert!(
            p.done_ms <= 300_000 + alone,
            "and never past the latency bound: {p:?}"
        );
    }

    /// A GPU-like swap: about 20 s to load each kind.
    fn gpu_stats() -> ServiceStats {
        let mut st = stats();
        for _ in 0..20 {
            st.observe_start("stt", 20.0);
            st.observe_start("evaluator", 20.0);
        }
        st
    }

    /// The quick path a lone upload is promised (`swap::quick_path`) is
    /// kept, and planned so: its batch takes no one else and its
    /// evaluation is not held, however busy the arrivals have become since;
    /// a batch that is not on it takes the next uploads and waits for the
    /// work to pay for the swap.
    #[test]
    fn the_quick_path_of_a_lone_upload_is_planned_as_kept() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let st = gpu_stats();
        let load = st.start_seconds("evaluator");
        let jobs = vec![job("s1", Stage::Stt, "", 1, 10.0, Some(1))];
        let busy = PlanInput {
            batch: Some(OpenBatch {
                id: 1,
                opened_at: 0,
                closed: false,
                size: 1,
            }),
            stt_batch_size: 10,
            swap_work_ratio: 1.0,
            arrival_rate: 0.5,
            ..input(&jobs, &roles, Policy::TwoPhase)
        };
        // STT 2 s, the evaluators' load, one call of 1 item (3 s).
        let quick_done = ((2.0 + load + 3.0) * 1000.0) as i64;
        let quick = PlanInput {
            quick_batch: Some(1),
            ..busy.clone()
        };
        let p = plan(&quick, &st)["s1"];
        assert!((p.done_ms - quick_done).abs() <= 1, "{p:?} vs {quick_done}");
        let p = plan(&busy, &st)["s1"];
        assert!(
            p.done_ms > quick_done + 5_000,
            "not on the quick path: joined and held: {p:?}"
        );
        // A lone upload into a quiet daemon, not yet in a batch: the plan
        // opens it on the quick path too (nobody is expected to join).
        let lone = vec![job("s1", Stage::Stt, "", 1, 10.0, None)];
        let quiet = PlanInput {
            stt_batch_size: 10,
            swap_work_ratio: 1.0,
            ..input(&lone, &roles, Policy::TwoPhase)
        };
        assert!((plan(&quiet, &st)["s1"].done_ms - quick_done).abs() <= 1);
    }

    #[test]
    fn two_phase_plan_finishes_a_batch_before_the_next_starts() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let jobs = vec![
            job("s1", Stage::Stt, "", 1, 10.0, None),
            job("s2", Stage::Stt, "", 2, 10.0, None),
            job("s3", Stage::Stt, "", 3, 10.0, None),
        ];
        let p = plan(&input(&jobs, &roles, Policy::TwoPhase), &stats());
        // Batch 1 = s1, s2 (size 2): STT 2 s each, back to back.
        assert_eq!(p["s1"].stt_done_ms, 2000);
        assert_eq!(p["s2"].stt_done_ms, 4000);
        // Then evaluator start 1 s, one call of 2 items per role: 4 s.
        assert_eq!(p["s1"].done_ms, 9000);
        assert_eq!(p["s2"].done_ms, 9000);
        // s3 waits for batch 1's evaluation, then an STT start (0.5 s).
        assert_eq!(p["s3"].stt_done_ms, 11_500);
        assert!(p["s3"].done_ms > p["s2"].done_ms);
    }

    #[test]
    fn pipelined_plan_overlaps_and_eta_falls_with_position() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let jobs = vec![
            job("s1", Stage::Stt, "", 1, 10.0, None),
            job("s2", Stage::Stt, "", 2, 10.0, None),
            job("s3", Stage::Stt, "", 3, 10.0, None),
        ];
        let st = stats();
        let two = plan(&input(&jobs, &roles, Policy::TwoPhase), &st);
        let pipe = plan(&input(&jobs, &roles, Policy::Pipelined), &st);
        assert!(pipe["s3"].done_ms < two["s3"].done_ms);
        let e = entries(&input(&jobs, &roles, Policy::TwoPhase), &st);
        assert_eq!(e["s1"].position, 1);
        assert_eq!(e["s3"].position, 3);
        assert!(e["s1"].eta_seconds <= e["s2"].eta_seconds);
        assert!(e["s2"].eta_seconds < e["s3"].eta_seconds);
    }

    #[test]
    fn evaluation_queue_entries_have_their_own_positions() {
        let roles = vec!["a".to_string(), "b".to_string()];
        let jobs = vec![
            job("s1", Stage::Eval, "a", 1, 10.0, Some(1)),
            job("s1", Stage::Eval, "b", 1, 10.0, Some(1)),
            job("s2", Stage::Eval, "a", 2, 10.0, Some(1)),
            job("s3", Stage::Stt, "", 3, 10.0, None),
        ];
        let e = entries(&input(&jobs, &roles, Policy::TwoPhase), &stats());
        assert_eq!(e["s1"].phase, "evaluation");
        assert_eq!(e["s2"].position, 2);
        assert_eq!(e["s3"].phase, "stt");
        assert_eq!(e["s3"].position, 1);
        assert!(e["s3"].eta_seconds > e["s1"].eta_seconds);
    }
}
