//! `viva-lab`: the design log's lab day, made real and measured.
//!
//! Generates N student recordings (espeak-ng, ffmpeg), then, on this
//! machine and the same small real models:
//!
//! 1. runs the baselines through the worker binaries directly
//!    ([`baseline`]: traditional sequential with load/unload per
//!    submission, and sequential with the models kept loaded);
//! 2. runs the real daemon (`viva serve`, a child process) once per policy,
//!    with the real workers, behind the independent LTI platform of the
//!    tests (`tests/lti-platform/lti_platform.py`, started with
//!    [`viva_tests::platform`]): dynamic registration, an instructor's deep
//!    link, one launch per student, uploads arriving on the chosen pattern,
//!    instructor release, grades in the platform;
//! 3. checks the platform's final state (one line item, one current score
//!    per student equal to the released grade, bad files failed with a
//!    reason), reports ETA honesty, memory and the lower bound, and writes
//!    `report.json` and `chart.png`.
//!
//! `--chaos` kills the daemon (SIGKILL) and workers at random moments,
//! makes the platform's score endpoint fail and stall, and checks that
//! nothing is lost or duplicated.
//!
//! The daemon is a black box here: the lab reaches it through the `viva`
//! binary (`serve`, and `session` for an administrator's token) and its HTTP
//! API (the submission view for states and scores, `/api/v1/status` for
//! phases and ETAs, `/api/v1/admin/timeline` for batch and job times). Only
//! the baselines, which run without a daemon, use its library: the worker
//! supervisor and `WorkerConfig`.

mod baseline;
mod chart;
mod media;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use viva_daemon::config::WorkerConfig;
use viva_tests::platform::{Lti, Platform};

const ROLE: &str = "http://purl.imsglobal.org/vocab/lis/v2/membership#";

/// Simulate a lab day on the real models and measure it against the alternatives.
#[derive(Parser, Debug, Clone)]
#[command(name = "viva-lab", version)]
pub struct LabArgs {
    /// Number of students.
    #[arg(long, default_value_t = 30)]
    students: usize,
    /// Directory for report.json, chart.png, the recordings and logs.
    #[arg(long)]
    report: PathBuf,
    /// Shortest recording, seconds.
    #[arg(long, default_value_t = 20.0)]
    min_seconds: f64,
    /// Longest recording, seconds.
    #[arg(long, default_value_t = 180.0)]
    max_seconds: f64,
    /// Arrival pattern: `all` (everyone uploads at once) or `spread:SECONDS`
    /// (uploads evenly spread over that many seconds).
    #[arg(long, default_value = "spread:120")]
    arrival: String,
    /// Seed for voices, speeds, lengths and texts (same seed, same lab).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Viva policies to run, comma-separated: two-phase, pipelined, auto.
    #[arg(long, default_value = "two-phase,pipelined")]
    policies: String,
    /// Skip the baselines (traditional and kept-loaded sequential).
    #[arg(long)]
    no_baselines: bool,
    /// Kill the daemon and workers at random moments, fail and stall the
    /// platform's score endpoint (one Viva run, no baselines).
    #[arg(long)]
    chaos: bool,
    /// How many times `--chaos` kills the daemon.
    #[arg(long, default_value_t = 10)]
    chaos_kills: usize,
    /// How long each of the three stalled score posts hangs in the platform
    /// under `--chaos` (Viva's AGS client gives up after 30 s and retries).
    #[arg(long, default_value = "2m")]
    chaos_stall: humantime::Duration,
    /// Model files (default: $VIVA_MODELS_DIR, else ~/.cache/viva/models).
    #[arg(long, env = "VIVA_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Directory of viva, viva-whisper-worker and viva-llama-worker (default:
    /// next to viva-lab, as cargo builds them: target/<profile>).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Python with lti1p3platform (default: $VIVA_LTI_PYTHON, else
    /// $VIVA_CACHE/lti-venv/bin/python as scripts/lib.sh makes it).
    #[arg(long, env = "VIVA_LTI_PYTHON")]
    python: Option<PathBuf>,
    /// The platform harness script (default: tests/lti-platform/lti_platform.py
    /// of the source tree viva-lab was built from).
    #[arg(long)]
    platform_script: Option<PathBuf>,
    /// Use this already running platform harness instead of starting one.
    #[arg(long)]
    platform_url: Option<String>,
    /// Threads per worker process.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    #[arg(long, default_value_t = 10)]
    stt_batch_size: usize,
    #[arg(long, default_value = "20s")]
    batch_window: humantime::Duration,
    #[arg(long, default_value_t = 4)]
    eval_batch_size: usize,
    /// Give up on a Viva run after this long.
    #[arg(long, default_value = "3h")]
    timeout: humantime::Duration,
    /// Simulate a GPU: the fake workers with this profile's times instead of
    /// the real models (`h100`: Whisper large-v3 and two 8 B Q4 evaluators
    /// on one H100; see ARCHITECTURE.md, "Cost-aware phase switching"). No
    /// baselines; the lower bound is the profile's. Recordings, uploads, the
    /// daemon, the platform and the checks are the same as without it.
    #[arg(long)]
    profile: Option<String>,
    /// With --profile: run this many times faster than full scale (worker
    /// times, arrivals, the batch window and `max_phase_wait` divided by it;
    /// the report gives times at full scale too).
    #[arg(long, default_value_t = 10.0)]
    scale: f64,
    /// With --profile: the cost-aware switch's latency bound
    /// (`scheduler.max_phase_wait`), at full scale.
    #[arg(long, default_value = "5m")]
    max_phase_wait: humantime::Duration,
    /// Before the class: this many uploads through the sandbox course
    /// (`viva submit`), each followed to its end, then a restart of the
    /// daemon on the same data directory. The class then meets a daemon that
    /// has served before (its measured service, load and stop times kept in
    /// its database) with no model loaded, as on any day but the first.
    #[arg(long, default_value_t = 0)]
    warm_up: usize,
    /// Each run's daemon keeps its store in a fresh PostgreSQL database (a
    /// throwaway cluster of Debian's server, or the server
    /// VIVA_TEST_POSTGRES names) instead of SQLite.
    #[arg(long)]
    postgres: bool,
}

impl LabArgs {
    /// The GPU profile, if --profile names one.
    fn gpu(&self) -> anyhow::Result<Option<viva_tests::gpu_profile::Profile>> {
        match &self.profile {
            None => Ok(None),
            Some(n) => viva_tests::gpu_profile::by_name(n)
                .map(Some)
                .ok_or_else(|| anyhow!("unknown --profile {n:?}: the profiles are: h100")),
        }
    }

    /// Full-scale seconds per second of this run (1 without --profile).
    fn time_scale(&self) -> f64 {
        if self.profile.is_some() {
            self.scale.max(1.0)
        } else {
            1.0
        }
    }
}

fn say(s: &str) {
    eprintln!("{s}");
}

/// Milliseconds since the Unix epoch (the daemon's clock too: its times in
/// the API are on the same scale).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Memory: the sum of RSS of a process tree, sampled from /proc.

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// (pid, ppid, comm) of every process.
fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        out.push((pid, ppid, comm));
    }
    out
}

fn descendants(root: u32) -> Vec<(u32, String)> {
    let all = processes();
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for (pid, ppid, comm) in &all {
            if *ppid == p {
                out.push((*pid, comm.clone()));
                todo.push(*pid);
            }
        }
    }
    out
}

fn tree_rss_bytes(root: u32, skip: &[u32]) -> u64 {
    let mut kb = rss_kb(root);
    for (pid, _) in descendants(root) {
        if !skip.contains(&pid) {
            kb += rss_kb(pid);
        }
    }
    kb * 1024
}

/// Samples the RSS of a process tree every 200 ms; the root may change
/// (a restarted daemon).
struct MemSampler {
    root: Arc<AtomicU32>,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    skip: Arc<Mutex<Vec<u32>>>,
}

impl MemSampler {
    fn start(root: u32) -> MemSampler {
        let s = MemSampler {
            root: Arc::new(AtomicU32::new(root)),
            peak: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            skip: Arc::new(Mutex::new(Vec::new())),
        };
        let (r, p, st, sk) = (
            s.root.clone(),
            s.peak.clone(),
            s.stop.clone(),
            s.skip.clone(),
        );
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let skip = sk.lock().map(|v| v.clone()).unwrap_or_default();
                let v = tree_rss_bytes(r.load(Ordering::Relaxed), &skip);
                p.fetch_max(v, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        s
    }
    fn finish(&self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------
// The platform harness and the daemon as child processes.

/// How long `viva serve` may take to announce its address.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(120);

/// `viva serve` as a child process: its stderr (and whatever it prints on
/// stdout) goes to `log`, whose tail every start-up error quotes.
struct DaemonProc {
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Where the daemon listens, once its first start announced it.
    addr: Option<SocketAddr>,
    url: String,
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    format!("{} (last lines):\n{tail}", path.display())
}

impl DaemonProc {
    /// Starts `viva serve` and waits (up to [`ANNOUNCE_TIMEOUT`]) for its
    /// `viva listening on http://ADDR` line on stdout; returns its pid.
    ///
    /// The first start listens on 127.0.0.1:0 and learns the port the kernel
    /// gave it from that line: no free-port race. A restart (after a chaos
    /// kill -9) asks for that same address again, on purpose: dynamic
    /// registration gave the LTI platform the tool's URLs (login, launch,
    /// JWKS, redirect URIs) on that port, and the gradebook and the
    /// students' launches must keep reaching the restarted daemon there.
    /// The port was the killed daemon's a moment ago and the kernel gave it
    /// out once already, so another program holding it now is unlikely; if
    /// one does, the restart fails and says so rather than moving.
    async fn spawn(&mut self) -> anyhow::Result<u32> {
        let listen = self
            .addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:0".to_owned());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .arg("--listen")
            .arg(&listen)
            .env_remove("VIVA_DATA_DIR")
            .env_remove("VIVA_LISTEN")
            .env_remove("VIVA_PUBLIC_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .spawn()
            .with_context(|| format!("starting {} serve", self.exe.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        self.child = Some(child);
        let stdout = stdout.ok_or_else(|| anyhow!("viva serve has no stdout"))?;
        // Read the announcement, then keep draining stdout into the log so
        // the daemon never blocks on a full pipe.
        let (tx, mut rx) = tokio::sync::oneshot::channel::<String>();
        let mut drain = log;
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if let Some(addr) = line.trim().strip_prefix("viva listening on http://")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
                let _ = drain.write_all(line.as_bytes());
            }
        });
        let deadline = Instant::now() + ANNOUNCE_TIMEOUT;
        let mut closed = false;
        let announced = loop {
            if closed {
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                match tokio::time::timeout(Duration::from_millis(200), &mut rx).await {
                    Ok(Ok(addr)) => break addr,
                    // stdout closed without the line: the daemon is exiting.
                    Ok(Err(_)) => closed = true,
                    Err(_) => {}
                }
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                bail!(
                    "viva serve --listen {listen} exited ({status}) before listening; {}",
                    log_tail(&self.log)
                );
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!(
                    "viva serve --listen {listen} did not announce its address within {ANNOUNCE_TIMEOUT:?}; {}",
                    log_tail(&self.log)
                );
            }
        };
        let addr: SocketAddr = announced
            .parse()
            .with_context(|| format!("viva serve announced {announced:?}, not an address"))?;
        if self.addr.is_some_and(|a| a != addr) {
            self.kill9();
            bail!(
                "the restarted daemon listens on {addr}, not on {listen} where the platform knows it"
            );
        }
        self.addr = Some(addr);
        self.url = format!("http://{addr}");
        Ok(pid)
    }

    /// Whether the daemon process is there (not killed, not exited).
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "the daemon exited ({status}) while starting; {}",
                    log_tail(&self.log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not answer /healthz within 2 minutes; {}",
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn token_of(data: &Value) -> anyhow::Result<String> {
    data["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no session token in the launch"))
}

// ---------------------------------------------------------------------------
// One Viva run.

#[derive(Debug, Clone, Serialize, Default)]
struct StudentRun {
    user: String,
    kind: String,
    audio_seconds: f64,
    arrival_seconds: f64,
    submission: Option<String>,
    rejected: Option<Value>,
    upload_attempts: u32,
    eta_read_seconds: Option<f64>,
    eta_seconds: Option<f64>,
    batch: Option<i64>,
    waited_seconds: Option<f64>,
    stt_seconds: Option<f64>,
    eval_seconds: Option<f64>,
    scored_seconds: Option<f64>,
    latency_seconds: Option<f64>,
    released_seconds: Option<f64>,
    state: String,
    failure_reason: Option<String>,
    score: Option<f64>,
    max: Option<f64>,
    needs_review: Option<bool>,
    eta_error_seconds: Option<f64>,
    eta_error_relative: Option<f64>,
    /// The ETA the queue showed for this submission while it waited:
    /// (seconds since the start, ETA seconds), one sample per 5 s.
    eta_samples: Vec<(f64, f64)>,
    stt_span: Option<(f64, f64)>,
    eval_span: Option<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Default)]
struct FinalState {
    line_items: usize,
    good_students: usize,
    graded_correctly: usize,
    lost: Vec<String>,
    duplicated: Vec<String>,
    wrong: Vec<String>,
    regressed: Vec<String>,
    bad_files: usize,
    bad_failed_with_reason: usize,
    bad_unclear: Vec<String>,
    pending_manual_seen: usize,
    scores_refused_by_platform: usize,
    ok: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
struct VivaRun {
    policy: String,
    wall_seconds: f64,
    peak_rss_bytes: u64,
    students: Vec<StudentRun>,
    phases: Vec<(f64, String)>,
    batches: Vec<Value>,
    final_state: FinalState,
    chaos: Option<Value>,
}

struct Setup {
    exe: PathBuf,
    workers: baseline::Workers,
    python: Option<PathBuf>,
    script: PathBuf,
    rubric: viva_models::Rubric,
}

fn worker(
    bin: &Path,
    name: &str,
    args: &[&str],
    model: &str,
    file: PathBuf,
    threads: u32,
    memory_mb: u64,
) -> WorkerConfig {
    let mut options = toml::Table::new();
    options.insert("threads".into(), toml::Value::Integer(threads as i64));
    if name.starts_with("viva-llama") {
        options.insert("evidence_chars".into(), toml::Value::Integer(120));
        options.insert("rationale_chars".into(), toml::Value::Integer(160));
        if model.starts_with("gemma") {
            // The base Gemma GGUF has no chat template of its own.
            options.insert("template".into(), toml::Value::String("chatml".into()));
        }
    }
    WorkerConfig {
        command: bin.join(name),
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        env: Default::default(),
        model: model.to_owned(),
        model_path: file,
        options,
        memory_mb,
    }
}

/// The real workers on the small test models.
fn real_workers(bin: &Path, models: &Path, t: u32) -> anyhow::Result<baseline::Workers> {
    let model = |f: &str| -> anyhow::Result<PathBuf> {
        let p = models.join(f);
        if !p.is_file() {
            bail!(
                "model {} is missing: run `viva models fetch --dir {}`",
                p.display(),
                models.display()
            );
        }
        Ok(p)
    };
    Ok(baseline::Workers {
        stt: worker(
            bin,
            "viva-whisper-worker",
            &["--parallel-states", "1"],
            "whisper-tiny.en",
            model("whisper-tiny.en-f16.bin")?,
            t,
            320,
        ),
        evaluators: vec![
            (
                "a".into(),
                worker(
                    bin,
                    "viva-llama-worker",
                    &["--role", "a"],
                    "smollm2-135m-instruct",
                    model("smollm2-135m-instruct-q4_1.gguf")?,
                    t,
                    300,
                ),
            ),
            (
                "b".into(),
                worker(
                    bin,
                    "viva-llama-worker",
                    &["--role", "b"],
                    "gemma-3-270m",
                    model("gemma-3-270m-q4_k_m.gguf")?,
                    t,
                    450,
                ),
            ),
        ],
    })
}

fn daemon_config(
    args: &LabArgs,
    setup: &Setup,
    policy: &str,
    data: &Path,
) -> anyhow::Result<String> {
    let mut evaluators = toml::Table::new();
    for (role, w) in &setup.workers.evaluators {
        evaluators.insert(role.clone(), toml::Value::try_from(w)?);
    }
    let mut workers = toml::Table::new();
    workers.insert("load_timeout".into(), "10m".into());
    workers.insert("handshake_timeout".into(), "60s".into());
    workers.insert("stop_grace".into(), "3s".into());
    // Two-phase: nothing else runs during the STT phase, so the STT worker
    // gets the whole machine as parallel transcriptions of `threads` threads
    // each. Pipelined: STT shares the machine with the evaluators.
    // A simulated GPU runs one Whisper.
    let stt_parallel = if policy == "pipelined" || args.profile.is_some() {
        1
    } else {
        (cores() / args.threads.max(1) as usize).max(1)
    };
    let mut stt = setup.workers.stt.clone();
    if args.profile.is_none() {
        stt.args = vec!["--parallel-states".into(), stt_parallel.to_string()];
    }
    let scale = args.time_scale();
    let scaled = |d: Duration| {
        humantime::format_duration(Duration::from_millis(
            (d.as_millis() as f64 / scale).round().max(1.0) as u64,
        ))
        .to_string()
    };
    workers.insert("stt".into(), toml::Value::try_from(&stt)?);
    workers.insert("evaluators".into(), toml::Value::Table(evaluators));
    // No `listen` or `public_url`: `viva serve --listen` sets the address
    // (see `DaemonProc::spawn`), and the public URL follows it.
    let mut cfg = json!({
        "data_dir": data.display().to_string(),
        "intake": {"min_free_bytes": 64 * 1024 * 1024},
        "sessions": {"ttl": "24h"},
        // --warm-up uploads through the sandbox course.
        "sandbox": {"enabled": args.warm_up > 0},
        "scheduler": {
            "policy": policy,
            "stt_batch_size": args.stt_batch_size,
            "stt_concurrency": stt_parallel,
            "batch_window": scaled(*args.batch_window),
            "max_phase_wait": scaled(*args.max_phase_wait),
            // A simulated GPU's memory, less 5 % headroom: what `auto`
            // compares the models' measured memory with.
            "gpu_memory_budget_mb": args.gpu()?.map(|p| p.device_memory_mb * 95 / 100).unwrap_or(0),
            "eval_batch_size": args.eval_batch_size,
            "retry_backoff": "1s",
            "lease": "20s",
        },
        "lti": {
            "allow_insecure_platforms": true,
            "passback_retry_backoff": "1s",
            "passback_max_attempts": 1000,
        },
        // Every simulated student comes from 127.0.0.1: per-address rate
        // limits would throttle the class as one client.
        "limits": {
            "login_per_ip_per_minute": 0,
            "uploads_per_ip_per_minute": 0,
            "tickets_per_ip_per_minute": 0,
        },
    });
    if args.postgres {
        cfg["store"] = json!(viva_tests::pg::fresh_database()?);
        cfg["node"] = json!({
            "secrets_key_file": viva_tests::pg::secrets_key_file().display().to_string()
        });
    }
    let mut table: toml::Table = toml::Value::try_from(cfg)?
        .as_table()
        .cloned()
        .ok_or_else(|| anyhow!("config is not a table"))?;
    table.insert("workers".into(), toml::Value::Table(workers));
    Ok(toml::to_string(&table)?)
}

/// Waits up to `wait` for a job to be running and returns its phase
/// ("stt" or "evaluation").
async fn running_phase(
    http: &reqwest::Client,
    tool: &str,
    token: &str,
    wait: Duration,
) -> Option<String> {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if let Ok(r) = http
            .get(format!("{tool}/api/v1/status"))
            .bearer_auth(token)
            .send()
            .await
            && let Ok(v) = r.json::<Value>().await
            && let Some(entries) = v["entries"].as_array()
            && let Some(phase) = entries.iter().find_map(|e| {
                (e["running"] == true)
                    .then(|| e["phase"].as_str().map(str::to_owned))
                    .flatten()
                    .filter(|p| p == "stt" || p == "evaluation")
            })
        {
            return Some(phase);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A session token minted by `viva session` from the run's data directory
/// (the daemon's own key): an administrator's, for the admin API.
async fn admin_token(exe: &Path, config: &Path) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--config")
        .arg(config)
        .args(["session", "--role", "admin", "--user", "lab-admin"])
        .args(["--context", "lab-admin"])
        .env_remove("VIVA_DATA_DIR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| anyhow!("viva session did not answer within 60 s"))?
        .with_context(|| format!("running {} session", exe.display()))?;
    if !out.status.success() {
        bail!(
            "viva session failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A GET on the daemon's API as JSON, failing on any error status.
async fn api_get(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<Value> {
    let r = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("GET {url} answered {status}: {body}");
    }
    Ok(body)
}

async fn viva_run(
    args: &LabArgs,
    setup: &Setup,
    students: &[media::Student],
    policy: &str,
    chaos: bool,
) -> anyhow::Result<VivaRun> {
    let work = args.report.join("work");
    let data = work.join(format!(
        "viva-{policy}{}",
        if chaos { "-chaos" } else { "" }
    ));
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("clearing {}", data.display()))?;
    }
    std::fs::create_dir_all(&data)?;
    // The platform: one fresh process per run (its state is in memory).
    let _platform;
    let platform_base = match &args.platform_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let python = setup.python.clone().ok_or_else(|| {
                anyhow!("no Python with lti1p3platform: run scripts/test once (it makes $VIVA_CACHE/lti-venv), or pass --python or --platform-url")
            })?;
            let p = Platform::spawn(&python, &setup.script, Some(&data.join("platform.log")))
                .context("pass --python or --platform-url if this Python is not the one")?;
            let b = p.base.clone();
            _platform = p;
            b
        }
    };
    let cfg_path = data.join("viva.toml");
    std::fs::write(
        &cfg_path,
        daemon_config(args, setup, policy, &data.join("var"))?,
    )?;
    let mut daemon = DaemonProc {
        exe: setup.exe.clone(),
        config: cfg_path.clone(),
        log: data.join("daemon.log"),
        child: None,
        addr: None,
        url: String::new(),
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut pid = daemon.spawn().await?;
    daemon.wait_ready(&http).await?;
    if args.warm_up > 0 {
        say(&format!(
            "▶ warm-up: {} uploads before the class, then a restart",
            args.warm_up
        ));
        let good = students.iter().filter(|s| !s.kind.is_bad()).cycle();
        for (k, s) in good.take(args.warm_up).enumerate() {
            let mut cmd = tokio::process::Command::new(&setup.exe);
            cmd.arg("--config")
                .arg(&cfg_path)
                .args(["submit", "--url", &daemon.url, "--user"])
                .arg(format!("warm-up-{k}"))
                .arg(&s.file)
                .env_remove("VIVA_DATA_DIR")
                .stdin(Stdio::null())
                .kill_on_drop(true);
            let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
                .await
                .map_err(|_| anyhow!("warm-up upload {k} did not finish within 10 minutes"))?
                .context("running viva submit")?;
            if !out.status.success() {
                bail!(
                    "warm-up upload {k} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        daemon.terminate();
        pid = daemon.spawn().await?;
        daemon.wait_ready(&http).await?;
    }
    // For the batch and job times at the end (an admin-only route).
    let admin = admin_token(&setup.exe, &cfg_path).await?;
    say(&format!(
        "▶ Viva ({policy}{}): daemon pid {pid} on {}; platform {platform_base}",
        if chaos { ", chaos" } else { "" },
        daemon.url
    ));
    let lti = Arc::new(Lti {
        http: http.clone(),
        platform: platform_base.clone(),
        tool: daemon.url.clone(),
    });
    lti.register(&admin).await?;
    // The instructor places the assignment with deep linking.
    let teacher = json!({"user": "teacher-1", "roles": [format!("{ROLE}Instructor")],
                         "name": "Tia Teacher", "kind": "deeplink", "context": "course-1"});
    let dl = token_of(&lti.launch(teacher).await?)?;
    let placed: Value = http
        .post(format!("{}/lti/deep-link", daemon.url))
        .bearer_auth(&dl)
        .json(&json!({"assignment": {"title": "Lab day: photosynthesis", "prompt": media::PROMPT, "rubric": setup.rubric}}))
        .send()
        .await?
        .json()
        .await?;
    let ret = placed["return_url"]
        .as_str()
        .ok_or_else(|| anyhow!("deep linking answered no return URL: {placed}"))?;
    let answer: Value = http
        .post(ret)
        .form(&[("JWT", placed["jwt"].as_str().unwrap_or_default())])
        .send()
        .await?
        .json()
        .await?;
    let assignment = answer["items"][0]["custom"]["viva_assignment"]
        .as_str()
        .ok_or_else(|| anyhow!("the platform did not accept the deep link: {answer}"))?
        .to_owned();
    let link = format!("rl-lab-{policy}");
    let spec_for = |user: &str, roles: &str| {
        json!({"user": user, "roles": [format!("{ROLE}{roles}")], "name": format!("Lab {user}"),
               "context": "course-1", "resource_link": link,
               "custom": {"viva_assignment": assignment}, "ags": {"lineitems": true}})
    };
    let instructor = token_of(&lti.launch(spec_for("teacher-1", "Instructor")).await?)?;

    let t0 = now_ms();
    let secs = move |ms: i64| (ms - t0) as f64 / 1000.0;
    let mem = MemSampler::start(pid);
    let results: Arc<Mutex<Vec<StudentRun>>> = Arc::new(Mutex::new(Vec::new()));
    let daemon_up = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for s in students {
        let (lti, results, s, assignment, spec) = (
            lti.clone(),
            results.clone(),
            s.clone(),
            assignment.clone(),
            spec_for(&s.user, "Learner"),
        );
        tasks.push(tokio::spawn(async move {
            let wait = s.arrival_seconds - (now_ms() - t0) as f64 / 1000.0;
            if wait > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
            let mut r = StudentRun {
                user: s.user.clone(),
                kind: format!("{:?}", s.kind),
                audio_seconds: s.audio_seconds,
                arrival_seconds: secs(now_ms()),
                ..Default::default()
            };
            let bytes = tokio::fs::read(&s.file).await.unwrap_or_default();
            let name = s
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Retry while the daemon is down (chaos): launch, then upload,
            // with one idempotency key for every try of this recording (a
            // try that landed before the daemon died is not made twice).
            let key = format!("lab-{}-{:016x}", r.user, rand::random::<u64>());
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                r.upload_attempts += 1;
                let attempt: anyhow::Result<()> = async {
                    let token = token_of(&lti.launch(spec.clone()).await?)?;
                    let resp = lti
                        .http
                        .post(format!("{}/api/v1/assignments/{assignment}/submissions", lti.tool))
                        .query(&[("filename", &name)])
                        .bearer_auth(&token)
                        .header("Idempotency-Key", &key)
                        .body(bytes.clone())
                        .send()
                        .await?;
                    let status = resp.status();
                    let body: Value = resp.json().await.unwrap_or_default();
                    if status.as_u16() == 201 || status.as_u16() == 200 {
                        let id = body["id"].as_str().unwrap_or_default().to_owned();
                        r.submission = Some(id.clone());
                        // The ETA the student sees right after the upload.
                        for _ in 0..40 {
                            let v: Value = lti
                                .http
                                .get(format!("{}/api/v1/submissions/{id}", lti.tool))
                                .bearer_auth(&token)
                                .send()
                                .await?
                                .json()
                                .await?;
                            if let Some(eta) = v["queue"]["eta_seconds"].as_f64() {
                                r.eta_read_seconds = Some(secs(now_ms()));
                                r.eta_seconds = Some(eta);
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(())
                    } else if status.is_client_error() && body["error"]["code"].is_string() {
                        r.rejected = Some(json!({"status": status.as_u16(), "code": body["error"]["code"], "message": body["error"]["message"]}));
                        Ok(())
                    } else {
                        bail!("upload answered {status}: {body}")
                    }
                }
                .await;
                match attempt {
                    Ok(()) => break,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        r.failure_reason = Some(format!("could not upload: {e:#}"));
                        break;
                    }
                }
            }
            if let Ok(mut v) = results.lock() {
                v.push(r);
            }
        }));
    }

    // Chaos: kills of the daemon and its workers, a failing and stalling platform.
    let chaos_log: Arc<Mutex<Value>> = Arc::new(Mutex::new(
        json!({"daemon_kills": 0, "worker_kills": 0, "worker_kills_mid_job": 0, "score_failures_injected": 0, "score_stalls_injected": 0, "score_stall_seconds": 0}),
    ));
    let daemon = Arc::new(tokio::sync::Mutex::new(daemon));
    let chaos_task = if chaos {
        let (daemon, log, lti, up, http, mem_root, instructor) = (
            daemon.clone(),
            chaos_log.clone(),
            lti.clone(),
            daemon_up.clone(),
            http.clone(),
            mem.root.clone(),
            instructor.clone(),
        );
        let kills = args.chaos_kills;
        let stall = args.chaos_stall.as_secs_f64();
        let seed = args.seed;
        Some(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC4A05);
            let statuses: Vec<u16> = (0..8).map(|i| if i % 2 == 0 { 500 } else { 503 }).collect();
            if lti
                .post_json(
                    "/control/fail-scores",
                    json!({"statuses": statuses, "stall_seconds": stall, "stall_count": 3}),
                )
                .await
                .is_ok()
                && let Ok(mut l) = log.lock()
            {
                l["score_failures_injected"] = json!(8);
                l["score_stalls_injected"] = json!(3);
                l["score_stall_seconds"] = json!(stall);
            }
            let mut done = 0;
            while done < kills {
                tokio::time::sleep(Duration::from_millis(rng.random_range(3000..15000))).await;
                // Now and then a worker instead, while it has a job: wait
                // (up to 20 s) for a running job and kill a worker of that
                // phase.
                let busy = if rng.random_range(0..3) == 0 {
                    running_phase(&http, &lti.tool, &instructor, Duration::from_secs(20)).await
                } else {
                    None
                };
                let mut d = daemon.lock().await;
                if let Some(phase) = busy {
                    let prefix = if phase == "stt" {
                        "viva-whisper"
                    } else {
                        "viva-llama"
                    };
                    let workers: Vec<(u32, String)> = descendants(d.pid())
                        .into_iter()
                        .filter(|(_, c)| c.starts_with(prefix))
                        .collect();
                    if let Some((wpid, comm)) = workers.first() {
                        // SAFETY: SIGKILL to a worker process of our daemon.
                        unsafe {
                            libc::kill(*wpid as i32, libc::SIGKILL);
                        }
                        say(&format!(
                            "  chaos: kill -9 worker {comm} (pid {wpid}) during a {phase} job"
                        ));
                        if let Ok(mut l) = log.lock() {
                            let n = l["worker_kills"].as_u64().unwrap_or(0) + 1;
                            l["worker_kills"] = json!(n);
                            let n = l["worker_kills_mid_job"].as_u64().unwrap_or(0) + 1;
                            l["worker_kills_mid_job"] = json!(n);
                        }
                        continue;
                    }
                }
                up.store(false, Ordering::Relaxed);
                d.kill9();
                done += 1;
                say(&format!(
                    "  chaos: kill -9 daemon ({done}/{kills}); restarting on the same data directory"
                ));
                if let Ok(mut l) = log.lock() {
                    l["daemon_kills"] = json!(done);
                }
                match d.spawn().await {
                    Ok(p) => {
                        mem_root.store(p, Ordering::Relaxed);
                        if let Err(e) = d.wait_ready(&http).await {
                            say(&format!("  chaos: restart failed: {e:#}"));
                            return;
                        }
                    }
                    Err(e) => {
                        say(&format!("  chaos: restart failed: {e:#}"));
                        return;
                    }
                }
                up.store(true, Ordering::Relaxed);
            }
        }))
    } else {
        None
    };

    // Watch phases and submissions, release what awaits review, until every
    // good submission's grade is in the platform.
    let deadline = Instant::now() + *args.timeout;
    let mut phases: Vec<(f64, String)> = Vec::new();
    let mut states: HashMap<String, String> = HashMap::new();
    let mut released: HashMap<String, f64> = HashMap::new();
    let mut eta_samples: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    let mut last_print = Instant::now();
    loop {
        let uploads_done = tasks.iter().all(|t| t.is_finished());
        if let Ok(r) = http
            .get(format!("{}/api/v1/status", lti.tool))
            .bearer_auth(&instructor)
            .send()
            .await
            && let Ok(v) = r.json::<Value>().await
        {
            let phase = v["phase"].as_str().unwrap_or("?").to_owned();
            let batch = v["batch"]["id"].as_i64();
            let label = match batch {
                Some(b) if phase != "idle" => format!("{phase}#{b}"),
                _ => phase,
            };
            if phases.last().map(|p| &p.1) != Some(&label) {
                say(&format!("  {:>7.1} s  phase {label}", secs(now_ms())));
                phases.push((secs(now_ms()), label));
            }
            // The ETAs on show now (what each student's status view says).
            let t = secs(now_ms());
            for e in v["entries"].as_array().into_iter().flatten() {
                if let (Some(id), Some(eta)) =
                    (e["submission_id"].as_str(), e["eta_seconds"].as_f64())
                {
                    let v = eta_samples.entry(id.to_owned()).or_default();
                    if v.last().is_none_or(|l| t - l.0 >= 5.0) {
                        v.push((t, eta));
                    }
                }
            }
        }
        let ids: Vec<String> = results
            .lock()
            .map(|v| v.iter().filter_map(|s| s.submission.clone()).collect())
            .unwrap_or_default();
        for id in &ids {
            let st = states.get(id).cloned().unwrap_or_default();
            if st == "failed" || released.contains_key(id) {
                continue;
            }
            let Ok(resp) = http
                .get(format!("{}/api/v1/submissions/{id}", lti.tool))
                .bearer_auth(&instructor)
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = resp.json::<Value>().await else {
                continue;
            };
            let state = v["state"].as_str().unwrap_or("?").to_owned();
            if state != st {
                states.insert(id.clone(), state.clone());
            }
            if state == "awaiting_review" {
                let ok = http
                    .post(format!("{}/api/v1/submissions/{id}/release", lti.tool))
                    .bearer_auth(&instructor)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ok {
                    released.insert(id.clone(), secs(now_ms()));
                }
            } else if state == "released" {
                released.insert(id.clone(), secs(now_ms()));
            }
        }
        let settled = ids
            .iter()
            .all(|id| released.contains_key(id) || states.get(id).is_some_and(|s| s == "failed"));
        let chaos_done = chaos_task.as_ref().is_none_or(|t| t.is_finished());
        if uploads_done && settled && chaos_done {
            // Every release is a FullyGraded score in the platform? (On
            // this run's line item: a platform shared by several runs has
            // the earlier runs' scores for the same students.)
            if let Ok(log) = lti.log().await {
                let items: Vec<u64> = log["line_items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| i["resourceLinkId"] == link.as_str())
                    .filter_map(line_item_number)
                    .collect();
                let full = log["scores"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .filter(|e| {
                                e.get("refused").is_none()
                                    && e["body"]["gradingProgress"] == "FullyGraded"
                                    && e["lineitem"].as_u64().is_some_and(|n| items.contains(&n))
                            })
                            .filter_map(|e| e["body"]["userId"].as_str().map(str::to_owned))
                            .collect::<std::collections::HashSet<_>>()
                            .len()
                    })
                    .unwrap_or(0);
                if full >= released.len() {
                    break;
                }
            }
        }
        if last_print.elapsed() > Duration::from_secs(15) {
            last_print = Instant::now();
            say(&format!(
                "  {:>7.1} s  {} uploaded, {} released, {} failed",
                secs(now_ms()),
                ids.len(),
                released.len(),
                states.values().filter(|s| *s == "failed").count()
            ));
        }
        if Instant::now() > deadline {
            say("  timed out waiting for the lab to finish; reporting what there is");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let peak = mem.finish();
    if let Some(t) = chaos_task {
        t.abort();
    }
    for t in tasks {
        t.abort();
    }
    let platform_log = lti.log().await.unwrap_or_default();
    let mut d = daemon.lock().await;
    // A chaos kill stopped mid-restart leaves no daemon to ask: start it.
    if !d.running() {
        d.spawn().await?;
    }
    d.wait_ready(&http).await?;

    // Timings from the daemon (its database is the truth), over its API:
    // each submission's state, score and arrival, and the batch and job
    // times of the admin timeline.
    let tool = d.url.clone();
    let timeline = api_get(
        &http,
        &format!("{tool}/api/v1/admin/timeline?limit=10000"),
        &admin,
    )
    .await?;
    let mut students_out: Vec<StudentRun> = results.lock().map(|v| v.clone()).unwrap_or_default();
    students_out.sort_by(|a, b| a.user.cmp(&b.user));
    for s in &mut students_out {
        let Some(id) = s.submission.clone() else {
            continue;
        };
        let sub = api_get(
            &http,
            &format!("{tool}/api/v1/submissions/{id}"),
            &instructor,
        )
        .await?;
        let created = sub["created_at"]
            .as_i64()
            .ok_or_else(|| anyhow!("submission {id} has no created_at: {sub}"))?;
        s.state = sub["state"].as_str().unwrap_or("?").to_owned();
        s.failure_reason = sub["failure_reason"].as_str().map(str::to_owned);
        s.batch = sub["batch_id"].as_i64();
        let sc = &sub["score"];
        if sc.is_object() {
            s.score = sc["total"].as_f64();
            s.max = sc["max"].as_f64();
            s.needs_review = sc["needs_review"].as_bool();
        }
        // (stage, started_at, finished_at) of each of its jobs.
        let jobs: Vec<(&str, Option<i64>, Option<i64>)> = timeline["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["submission_id"] == id.as_str())
            .map(|j| {
                (
                    j["stage"].as_str().unwrap_or(""),
                    j["started_at"].as_i64(),
                    j["finished_at"].as_i64(),
                )
            })
            .collect();
        let span = |stage: &str| {
            let st = jobs
                .iter()
                .filter(|j| j.0 == stage)
                .filter_map(|j| j.1)
                .min();
            let en = jobs
                .iter()
                .filter(|j| j.0 == stage)
                .filter_map(|j| j.2)
                .max();
            st.zip(en).map(|(a, b)| (secs(a), secs(b)))
        };
        s.stt_span = span("stt");
        s.eval_span = span("eval");
        let scored = span("score").map(|x| x.1);
        s.waited_seconds = s.stt_span.map(|x| x.0 - secs(created));
        s.stt_seconds = s.stt_span.map(|x| x.1 - x.0);
        s.eval_seconds = s.eval_span.map(|x| x.1 - x.0);
        s.scored_seconds = scored;
        s.latency_seconds = scored.map(|x| x - s.arrival_seconds);
        s.released_seconds = released.get(&id).copied();
        s.eta_samples = eta_samples.remove(&id).unwrap_or_default();
        if let (Some(read), Some(eta), Some(done)) = (s.eta_read_seconds, s.eta_seconds, scored) {
            let actual = done - read;
            s.eta_error_seconds = Some((read + eta - done).abs());
            s.eta_error_relative = Some((read + eta - done).abs() / actual.max(1.0));
        }
    }
    let mut batches = Vec::new();
    for b in timeline["batches"].as_array().into_iter().flatten() {
        let (Some(id), Some(o)) = (b["id"].as_i64(), b["opened_at"].as_i64()) else {
            continue;
        };
        let (closed, done) = (b["closed_at"].as_i64(), b["stt_done_at"].as_i64());
        batches.push(json!({"id": id, "opened": secs(o), "closed": closed.map(secs), "stt_done": done.map(secs)}));
    }
    d.terminate();
    drop(d);
    let wall = students_out
        .iter()
        .filter_map(|s| s.scored_seconds)
        .fold(0.0, f64::max);
    let final_state = final_state(&students_out, students, &platform_log, &link);
    let chaos_value = if chaos {
        chaos_log.lock().ok().map(|v| v.clone())
    } else {
        None
    };
    Ok(VivaRun {
        policy: policy.to_owned(),
        wall_seconds: wall,
        peak_rss_bytes: peak,
        students: students_out,
        phases,
        batches,
        final_state,
        chaos: chaos_value,
    })
}

/// The platform's final state against what Viva released.
/// The platform's number of a line item (`…/lineitems/N…` in its id).
fn line_item_number(item: &Value) -> Option<u64> {
    item["id"]
        .as_str()?
        .split("/lineitems/")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

fn final_state(
    runs: &[StudentRun],
    students: &[media::Student],
    log: &Value,
    link: &str,
) -> FinalState {
    let mut f = FinalState::default();
    let items: Vec<&Value> = log["line_items"]
        .as_array()
        .map(|v| v.iter().filter(|i| i["resourceLinkId"] == link).collect())
        .unwrap_or_default();
    f.line_items = items.len();
    let item_numbers: Vec<u64> = items.iter().copied().filter_map(line_item_number).collect();
    let scores: Vec<&Value> = log["scores"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    f.scores_refused_by_platform = scores.iter().filter(|s| s.get("refused").is_some()).count();
    let accepted: Vec<&&Value> = scores
        .iter()
        .filter(|s| s.get("refused").is_none())
        .filter(|s| {
            s["lineitem"]
                .as_u64()
                .is_some_and(|n| item_numbers.contains(&n))
        })
        .collect();
    f.pending_manual_seen = accepted
        .iter()
        .filter(|s| s["body"]["gradingProgress"] == "PendingManual")
        .count();
    for st in students {
        let run = runs.iter().find(|r| r.user == st.user);
        if st.kind.is_bad() {
            f.bad_files += 1;
            let reason = run.and_then(|r| {
                r.rejected
                    .as_ref()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .or_else(|| {
                        (r.state == "failed")
                            .then(|| r.failure_reason.clone())
                            .flatten()
                    })
            });
            match reason {
                Some(m) if !m.trim().is_empty() => f.bad_failed_with_reason += 1,
                _ => f.bad_unclear.push(st.user.clone()),
            }
            continue;
        }
        f.good_students += 1;
        let Some(r) = run else {
            f.lost.push(st.user.clone());
            continue;
        };
        let mine: Vec<&&&Value> = accepted
            .iter()
            .filter(|s| s["body"]["userId"] == st.user.as_str())
            .collect();
        let lines: std::collections::HashSet<u64> =
            mine.iter().filter_map(|s| s["lineitem"].as_u64()).collect();
        if lines.len() > 1 {
            f.duplicated.push(st.user.clone());
        }
        // The current score: the latest timestamp wins, as AGS says.
        let current = mine.iter().max_by(|a, b| {
            a["body"]["timestamp"]
                .as_str()
                .cmp(&b["body"]["timestamp"].as_str())
        });
        let last_received = mine.last();
        match current {
            None => f.lost.push(st.user.clone()),
            Some(c) => {
                let full = c["body"]["gradingProgress"] == "FullyGraded";
                let given = c["body"]["scoreGiven"].as_f64();
                let same = matches!((given, r.score), (Some(g), Some(s)) if (g - s).abs() < 1e-6);
                if !full || !same || r.released_seconds.is_none() {
                    f.wrong.push(format!(
                        "{}: platform {} {:?}, Viva {:?} ({})",
                        st.user, c["body"]["gradingProgress"], given, r.score, r.state
                    ));
                } else {
                    f.graded_correctly += 1;
                }
                if let Some(l) = last_received
                    && l["body"]["gradingProgress"] != "FullyGraded"
                    && l["body"]["timestamp"].as_str() > c["body"]["timestamp"].as_str()
                {
                    f.regressed.push(st.user.clone());
                }
            }
        }
    }
    f.ok = f.line_items == 1
        && f.lost.is_empty()
        && f.duplicated.is_empty()
        && f.wrong.is_empty()
        && f.regressed.is_empty()
        && f.bad_unclear.is_empty()
        && f.graded_correctly == f.good_students;
    f
}

// ---------------------------------------------------------------------------
// Statistics and the report.

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

#[derive(Debug, Clone, Serialize)]
struct Summary {
    method: String,
    wall_seconds: f64,
    latency_median: f64,
    latency_p95: f64,
    latency_max: f64,
    throughput_per_minute: f64,
    peak_rss_mib: f64,
    graded: usize,
}

fn summary(method: &str, wall: f64, lat: &[f64], peak: u64) -> Summary {
    Summary {
        method: method.to_owned(),
        wall_seconds: wall,
        latency_median: percentile(lat, 50.0),
        latency_p95: percentile(lat, 95.0),
        latency_max: lat.iter().copied().fold(0.0, f64::max),
        throughput_per_minute: if wall > 0.0 {
            lat.len() as f64 * 60.0 / wall
        } else {
            0.0
        },
        peak_rss_mib: peak as f64 / (1024.0 * 1024.0),
        graded: lat.len(),
    }
}

fn check_tool(name: &str, arg: &str) -> anyhow::Result<()> {
    match Command::new(name).arg(arg).output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("`{name}` is needed by viva-lab: install it (apt-get install ffmpeg espeak-ng)"),
    }
}

fn main() -> ExitCode {
    let args = LabArgs::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: LabArgs) -> anyhow::Result<ExitCode> {
    check_tool("ffmpeg", "-version")?;
    check_tool("espeak-ng", "--version")?;
    let me = std::env::current_exe().context("locating the viva-lab executable")?;
    let bin = args
        .bin_dir
        .clone()
        .or_else(|| me.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let gpu = args.gpu()?;
    let needed: &[(&str, &str)] = if gpu.is_some() {
        &[("viva", "viva-daemon"), ("fake-worker", "viva-tests")]
    } else {
        &[
            ("viva", "viva-daemon"),
            ("viva-whisper-worker", "viva-whisper-worker"),
            ("viva-llama-worker", "viva-llama-worker"),
        ]
    };
    for (b, package) in needed {
        if !bin.join(b).exists() {
            bail!(
                "{} is missing: build it (cargo build -p {package}) or pass --bin-dir",
                bin.join(b).display()
            );
        }
    }
    let exe = bin.join("viva");
    let models = args.models_dir.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/viva/models")
    });
    let t = args.threads;
    let workers = match gpu {
        Some(p) => {
            let scale = args.time_scale();
            let fake = |kind: &str,
                        role: Option<&str>,
                        env: Vec<(&str, String)>,
                        model: &str,
                        memory_mb: u64| {
                let mut a = vec!["--kind".to_owned(), kind.to_owned()];
                if let Some(r) = role {
                    a.extend(["--role".to_owned(), r.to_owned()]);
                }
                WorkerConfig {
                    command: bin.join("fake-worker"),
                    args: a,
                    env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    model: model.to_owned(),
                    model_path: "/dev/null".into(),
                    options: Default::default(),
                    memory_mb,
                }
            };
            // Memory as the admin view shows it (not used by two-phase).
            baseline::Workers {
                stt: fake(
                    "stt",
                    None,
                    p.stt_env(scale, false),
                    "whisper-large-v3 (simulated)",
                    4_000,
                ),
                evaluators: ["a", "b"]
                    .into_iter()
                    .map(|r| {
                        (
                            r.to_owned(),
                            fake(
                                "evaluator",
                                Some(r),
                                p.eval_env(scale),
                                "8B Q4_K_M (simulated)",
                                6_000,
                            ),
                        )
                    })
                    .collect(),
            }
        }
        None => real_workers(&bin, &models, t)?,
    };
    let script = args
        .platform_script
        .clone()
        .unwrap_or_else(viva_tests::platform::script);
    let setup = Setup {
        exe,
        workers,
        python: args.python.clone().or_else(viva_tests::platform::python),
        script,
        // The sandbox assignment's rubric: the library's definition, not a
        // copy (no daemon runs yet to ask, and the baselines need it too).
        rubric: viva_daemon::sandbox_assignment().rubric,
    };
    std::fs::create_dir_all(&args.report)
        .with_context(|| format!("creating the report directory {}", args.report.display()))?;
    let spread = match args.arrival.as_str() {
        "all" => 0.0,
        s => s
            .strip_prefix("spread:")
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("--arrival must be `all` or `spread:SECONDS`, not {s:?}"))?,
    };
    say(&format!(
        "▶ generating {} student recordings ({}–{} s, seed {})",
        args.students, args.min_seconds, args.max_seconds, args.seed
    ));
    let plan = media::Plan {
        students: args.students,
        min_seconds: args.min_seconds,
        max_seconds: args.max_seconds,
        seed: args.seed,
        spread_seconds: spread / args.time_scale(),
    };
    let dir = args.report.join("media");
    let students = tokio::task::spawn_blocking(move || media::generate(&plan, &dir)).await??;
    let audio: f64 = students.iter().map(|s| s.audio_seconds).sum();
    say(&format!(
        "  {} files, {:.0} s of audio; {} bad ({} corrupt or truncated, {} silent), {} off-topic",
        students.len(),
        audio,
        students.iter().filter(|s| s.kind.is_bad()).count(),
        students
            .iter()
            .filter(|s| matches!(s.kind, media::Kind::Corrupt | media::Kind::Truncated))
            .count(),
        students
            .iter()
            .filter(|s| s.kind == media::Kind::Silent)
            .count(),
        students
            .iter()
            .filter(|s| s.kind == media::Kind::OffTopic)
            .count(),
    ));

    let mut baselines = Vec::new();
    if !args.no_baselines && !args.chaos && gpu.is_none() {
        for (name, keep) in [
            ("traditional-sequential", false),
            ("sequential-kept-loaded", true),
        ] {
            say(&format!("▶ baseline {name}"));
            let mem = MemSampler::start(std::process::id());
            let r = baseline::run(
                name,
                keep,
                &setup.workers,
                &students,
                &setup.rubric,
                &args.report.join("work"),
                args.eval_batch_size,
                &say,
            )
            .await?;
            let mut r = r;
            r.peak_rss_bytes = mem.finish();
            say(&format!("  {name}: {:.1} s", r.wall_seconds));
            baselines.push(r);
        }
    }
    let policies: Vec<String> = if args.chaos {
        vec![
            args.policies
                .split(',')
                .next()
                .unwrap_or("two-phase")
                .trim()
                .to_owned(),
        ]
    } else {
        args.policies
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut runs = Vec::new();
    for p in &policies {
        runs.push(viva_run(&args, &setup, &students, p, args.chaos).await?);
    }
    report(&args, &students, &baselines, &runs)
}

fn report(
    args: &LabArgs,
    students: &[media::Student],
    baselines: &[baseline::BaselineRun],
    runs: &[VivaRun],
) -> anyhow::Result<ExitCode> {
    let mut summaries = Vec::new();
    for b in baselines {
        let lat: Vec<f64> = b
            .students
            .iter()
            .filter(|s| s.failed.is_none())
            .map(|s| s.latency_seconds)
            .collect();
        let wall = b
            .students
            .iter()
            .filter(|s| s.failed.is_none())
            .map(|s| s.done_seconds)
            .fold(0.0, f64::max);
        summaries.push(summary(&b.name, wall, &lat, b.peak_rss_bytes));
    }
    for r in runs {
        let lat: Vec<f64> = r
            .students
            .iter()
            .filter_map(|s| s.latency_seconds)
            .collect();
        summaries.push(summary(
            &format!("viva-{}", r.policy),
            r.wall_seconds,
            &lat,
            r.peak_rss_bytes,
        ));
    }
    // Lower bound from pure compute at the best batching (kept-loaded run):
    // `cores ÷ threads` parallel transcriptions, one worker per evaluator
    // role, `cores` cores shared, and no earlier than the last arrival plus
    // that student's own compute.
    let stt_servers = (cores() / args.threads.max(1) as usize).max(1) as f64;
    let cores = cores() as f64;
    let scale = args.time_scale();
    let gpu_bound = args.gpu()?.zip(runs.first()).map(|(p, r)| {
        // The first run's recorded arrivals, at full scale.
        let uploads: Vec<(f64, f64)> = r
            .students
            .iter()
            .filter(|s| s.latency_seconds.is_some())
            .map(|s| (s.arrival_seconds * scale, s.audio_seconds))
            .collect();
        let full = p.lower_bound(&uploads);
        let two_phase = p.two_phase_lower_bound(&uploads);
        json!({
            "seconds": full / scale,
            "full_scale_seconds": full,
            "two_phase_full_scale_seconds": two_phase,
            "profile": p.name,
            "scale": scale,
            "method": format!(
                "the {} profile at full scale: every model loaded once, then each submission's \
                 transcription and evaluation back to back after the later of its arrival and the \
                 previous one's (STT and evaluators never wait for each other), divided by the scale",
                p.name
            ),
        })
    });
    let lower_bound = gpu_bound.or_else(|| baselines.iter().find(|b| b.name == "sequential-kept-loaded").map(|b| {
        let n = b.stt_compute.len() as f64;
        let stt: f64 = b.stt_compute.iter().sum();
        let norm: f64 = b.normalize_seconds.iter().sum();
        let per_item = |role: &str| -> f64 {
            let single = b.eval_compute.get(role).map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64).unwrap_or(0.0);
            match b.eval_batched.get(role) {
                Some((k, s)) if *k > 0 => single.min(s / *k as f64),
                _ => single,
            }
        };
        let roles: Vec<f64> = b.eval_compute.keys().map(|r| per_item(r) * n).collect();
        let eval_max = roles.iter().copied().fold(0.0, f64::max);
        let eval_sum: f64 = roles.iter().sum();
        let compute = (stt / stt_servers).max(eval_max).max((stt + eval_sum + norm) / cores);
        let last = students.iter().filter(|s| !s.kind.is_bad()).map(|s| s.arrival_seconds).fold(0.0, f64::max);
        let tail = b.stt_compute.last().copied().unwrap_or(0.0) + b.eval_compute.keys().map(|r| per_item(r)).fold(0.0, f64::max);
        json!({
            "seconds": compute.max(last + tail),
            "stt_compute_seconds": stt,
            "eval_compute_seconds_per_role_best_batching": b.eval_compute.keys().zip(roles.iter()).map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>(),
            "normalize_seconds": norm,
            "cores": cores,
            "stt_servers": stt_servers,
            "method": "max(ΣSTT / parallel transcriptions (cores ÷ threads), max over roles of n × best per-item evaluation time, (ΣSTT + Σevaluations + Σnormalisation) / cores, last arrival + its own STT and evaluation); per-item evaluation time is the smaller of single-item and one batch of eval_batch_size, all measured with the models loaded",
        })
    }));
    let trad = summaries
        .iter()
        .find(|s| s.method == "traditional-sequential")
        .map(|s| s.wall_seconds);
    let lb = lower_bound.as_ref().and_then(|l| l["seconds"].as_f64());

    // ---- print ----
    println!();
    for r in runs {
        println!("== Viva {} — timeline ==", r.policy);
        for (t, p) in &r.phases {
            println!("  {t:>8.1} s  {p}");
        }
        for b in &r.batches {
            println!(
                "  batch {}: opened {:.1} s, closed {}, STT done {}",
                b["id"],
                b["opened"].as_f64().unwrap_or(0.0),
                b["closed"]
                    .as_f64()
                    .map(|v| format!("{v:.1} s"))
                    .unwrap_or("-".into()),
                b["stt_done"]
                    .as_f64()
                    .map(|v| format!("{v:.1} s"))
                    .unwrap_or("-".into())
            );
        }
        println!();
        println!(
            "  {:<11} {:<10} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:<6} state",
            "student",
            "kind",
            "audio",
            "waited",
            "STT",
            "eval",
            "total",
            "ETA",
            "ETA err",
            "score",
            "review",
        );
        for s in &r.students {
            let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or("-".into());
            println!(
                "  {:<11} {:<10} {:>6.1} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:<6} {}",
                s.user,
                s.kind,
                s.audio_seconds,
                f(s.waited_seconds),
                f(s.stt_seconds),
                f(s.eval_seconds),
                f(s.latency_seconds),
                f(s.eta_seconds),
                f(s.eta_error_seconds),
                f(s.score),
                s.needs_review
                    .map(|b| if b { "yes" } else { "no" })
                    .unwrap_or("-"),
                match (&s.rejected, &s.failure_reason) {
                    (Some(rj), _) => format!(
                        "rejected {}: {}",
                        rj["code"].as_str().unwrap_or("?"),
                        rj["message"].as_str().unwrap_or("")
                    ),
                    (None, Some(fr)) => format!("{}: {fr}", s.state),
                    _ => s.state.clone(),
                }
            );
        }
        println!();
    }
    println!("== Summary ==");
    println!(
        "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "method",
        "wall s",
        "lat p50",
        "lat p95",
        "lat max",
        "per min",
        "peak MiB",
        "÷ trad",
        "÷ bound"
    );
    for s in &summaries {
        println!(
            "  {:<24} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>9.0} {:>9} {:>8}",
            s.method,
            s.wall_seconds,
            s.latency_median,
            s.latency_p95,
            s.latency_max,
            s.throughput_per_minute,
            s.peak_rss_mib,
            trad.map(|t| format!("{:.2}", s.wall_seconds / t))
                .unwrap_or("-".into()),
            lb.map(|t| format!("{:.2}", s.wall_seconds / t))
                .unwrap_or("-".into()),
        );
    }
    if let Some(l) = &lower_bound {
        println!(
            "  lower bound {:.1} s: {}",
            l["seconds"].as_f64().unwrap_or(0.0),
            l["method"].as_str().unwrap_or("")
        );
    }
    for b in baselines {
        for (m, v) in &b.load_ms {
            let avg = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
            println!(
                "  load {m:<24} {:>4} loads, mean {avg:.0} ms ({})",
                v.len(),
                b.name
            );
        }
    }
    // ETA honesty.
    let mut eta = Vec::new();
    for r in runs {
        let first_batch_done = r
            .students
            .iter()
            .filter(|s| s.batch == r.students.iter().filter_map(|s| s.batch).min())
            .filter_map(|s| s.scored_seconds)
            .fold(0.0, f64::max);
        let all: Vec<f64> = r
            .students
            .iter()
            .filter_map(|s| s.eta_error_seconds)
            .collect();
        // Students of the first batch, at upload: the batch was still
        // open, so the ETA had to foresee who else would join it. Pipelined
        // runs have no batches: the first `stt_batch_size` arrivals.
        let first_batch = r.students.iter().filter_map(|s| s.batch).min();
        let mut by_arrival: Vec<&StudentRun> = r
            .students
            .iter()
            .filter(|s| s.eta_error_relative.is_some())
            .collect();
        by_arrival.sort_by(|a, b| a.arrival_seconds.total_cmp(&b.arrival_seconds));
        // The first `stt_batch_size` arrivals, whatever the batches: they
        // upload while the first batches are open, before anything of
        // this class is measured (under two-phase a lone first upload is a
        // batch of its own, so its batch alone says little).
        let first_arrivals: Vec<f64> = by_arrival
            .iter()
            .take(args.stt_batch_size)
            .filter_map(|s| s.eta_error_relative)
            .collect();
        let mut first_at_upload: Vec<f64> = r
            .students
            .iter()
            .filter(|s| s.batch.is_some() && s.batch == first_batch)
            .filter_map(|s| s.eta_error_relative)
            .collect();
        if first_batch.is_none() {
            first_at_upload = first_arrivals.clone();
        }
        let rel_after: Vec<f64> = r
            .students
            .iter()
            .filter(|s| s.eta_read_seconds.is_some_and(|t| t >= first_batch_done))
            .filter_map(|s| s.eta_error_relative)
            .collect();
        let rel_all: Vec<f64> = r
            .students
            .iter()
            .filter_map(|s| s.eta_error_relative)
            .collect();
        // Once the first batch is done (service times measured): the ETA
        // each still-waiting student saw at that moment, and every ETA shown
        // from then on, against when each actually finished.
        let mut at_first = Vec::new();
        let mut shown_after = Vec::new();
        for s in &r.students {
            let Some(done) = s.scored_seconds else {
                continue;
            };
            let rel = |(t, eta): (f64, f64)| (t + eta - done).abs() / (done - t).max(1.0);
            let later: Vec<(f64, f64)> = s
                .eta_samples
                .iter()
                .copied()
                .filter(|(t, _)| *t >= first_batch_done && *t < done)
                .collect();
            if let Some(first) = later.first() {
                at_first.push(rel(*first));
            }
            shown_after.extend(later.into_iter().map(rel));
        }
        let e = json!({
            "policy": r.policy,
            "n": all.len(),
            "mae_seconds": all.iter().sum::<f64>() / all.len().max(1) as f64,
            "p90_seconds": percentile(&all, 90.0),
            "p90_relative": percentile(&rel_all, 90.0),
            "after_first_batch_n": rel_after.len(),
            "after_first_batch_p90_relative": percentile(&rel_after, 90.0),
            "first_batch_done_seconds": first_batch_done,
            "waiting_at_first_batch_n": at_first.len(),
            "waiting_at_first_batch_p90_relative": percentile(&at_first, 90.0),
            "waiting_at_first_batch_mean_relative": at_first.iter().sum::<f64>() / at_first.len().max(1) as f64,
            "shown_after_first_batch_samples": shown_after.len(),
            "shown_after_first_batch_p90_relative": percentile(&shown_after, 90.0),
            "first_batch_at_upload_n": first_at_upload.len(),
            "first_batch_at_upload_p90_relative": percentile(&first_at_upload, 90.0),
            "first_arrivals_at_upload_n": first_arrivals.len(),
            "first_arrivals_at_upload_p90_relative": percentile(&first_arrivals, 90.0),
        });
        println!(
            "  ETA ({}): n {}, MAE {:.1} s, p90 {:.1} s, p90 relative {:.0}%; after the first batch ({:.0} s): n {}, p90 relative {:.0}%",
            r.policy,
            all.len(),
            e["mae_seconds"].as_f64().unwrap_or(f64::NAN),
            e["p90_seconds"].as_f64().unwrap_or(f64::NAN),
            100.0 * e["p90_relative"].as_f64().unwrap_or(f64::NAN),
            first_batch_done,
            rel_after.len(),
            100.0
                * e["after_first_batch_p90_relative"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
        );
        println!(
            "  ETA ({}) once the first batch is done: {} students still waiting then, p90 relative error {:.0}% (mean {:.0}%); all {} ETAs shown after it, p90 {:.0}%",
            r.policy,
            at_first.len(),
            100.0
                * e["waiting_at_first_batch_p90_relative"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            100.0
                * e["waiting_at_first_batch_mean_relative"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            shown_after.len(),
            100.0
                * e["shown_after_first_batch_p90_relative"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
        );
        println!(
            "  ETA ({}) at upload for the first batch's {} students: p90 relative error {:.0}%",
            r.policy,
            first_at_upload.len(),
            100.0 * percentile(&first_at_upload, 90.0),
        );
        if let Some(l) = &lower_bound
            && let Some(full) = l["full_scale_seconds"].as_f64()
        {
            // Each policy is judged against the bound of the schedules it
            // may run: two-phase never holds both kinds of model, so its
            // target is its own bound (no two-phase schedule beats it; the
            // co-resident bound is printed beside it).
            let (target, two_phase) = match (
                r.policy.as_str(),
                l["two_phase_full_scale_seconds"].as_f64(),
            ) {
                ("two-phase", Some(b)) => (
                    "",
                    format!(
                        "; two-phase's own lower bound (the kinds never loaded together) {b:.0} s, wall / it {:.2} (target ≤ 1.2)",
                        r.wall_seconds * scale / b.max(1e-9)
                    ),
                ),
                _ => (" (target ≤ 1.2)", String::new()),
            };
            println!(
                "  GPU profile {} at full scale ({}): wall {:.0} s, lower bound {:.0} s, wall / lower bound {:.2}{target}{two_phase}; ETA at upload, p90 relative: first batch {:.0}%, first {} arrivals {:.0}% (target ≤ 25%)",
                l["profile"].as_str().unwrap_or("?"),
                r.policy,
                r.wall_seconds * scale,
                full,
                r.wall_seconds * scale / full.max(1e-9),
                100.0 * percentile(&first_at_upload, 90.0),
                first_arrivals.len(),
                100.0 * percentile(&first_arrivals, 90.0),
            );
        }
        eta.push(e);
    }
    let mut ok = true;
    for r in runs {
        let f = &r.final_state;
        ok &= f.ok;
        println!(
            "  platform ({}): {} line item(s); {}/{} good submissions graded correctly; lost {}, duplicated {}, wrong {}, regressed {}; bad files {} ({} failed with a reason); {} PendingManual seen; {} score posts refused by the platform{}",
            r.policy,
            f.line_items,
            f.graded_correctly,
            f.good_students,
            f.lost.len(),
            f.duplicated.len(),
            f.wrong.len(),
            f.regressed.len(),
            f.bad_files,
            f.bad_failed_with_reason,
            f.pending_manual_seen,
            f.scores_refused_by_platform,
            if f.ok { "" } else { "  ✗ FINAL STATE WRONG" }
        );
        for w in f.wrong.iter().chain(&f.lost).chain(&f.duplicated) {
            println!("    ✗ {w}");
        }
        if let Some(c) = &r.chaos {
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            let attempts: u32 = r.students.iter().map(|s| s.upload_attempts).sum();
            let retried = r.students.iter().filter(|s| s.upload_attempts > 1).count();
            println!(
                "  chaos: {} daemon kill -9s, {} worker kill -9s ({} during a job), {} score posts failed (500/503), {} stalled {:.0} s",
                n("daemon_kills"),
                n("worker_kills"),
                n("worker_kills_mid_job"),
                n("score_failures_injected"),
                n("score_stalls_injected"),
                c["score_stall_seconds"].as_f64().unwrap_or(0.0),
            );
            println!(
                "  chaos: {attempts} upload attempts for {} students ({retried} retried after a refused or dropped upload)",
                r.students.len()
            );
        }
    }

    let report = json!({
        "generated_at_ms": now_ms(),
        "args": format!("{args:?}"),
        "machine": {"cores": cores},
        "students": students,
        "baselines": baselines,
        "viva": runs,
        "summary": summaries,
        "lower_bound": lower_bound,
        "eta": eta,
        "ok": ok,
    });
    let path = args.report.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    // Chart: the first Viva run's Gantt and every method's wall time.
    if let Some(r) = runs.first() {
        let mut phases = Vec::new();
        for (i, (t, p)) in r.phases.iter().enumerate() {
            let end = r
                .phases
                .get(i + 1)
                .map(|x| x.0)
                .unwrap_or(r.wall_seconds.max(*t));
            phases.push((*t, end, p.split('#').next().unwrap_or("").to_owned()));
        }
        let rows = r
            .students
            .iter()
            .map(|s| {
                let mut spans = Vec::new();
                let end = s
                    .scored_seconds
                    .or(s.released_seconds)
                    .unwrap_or(s.arrival_seconds + 0.5);
                if s.rejected.is_some() || s.state == "failed" {
                    spans.push(chart::Span {
                        start: s.arrival_seconds,
                        end: s.arrival_seconds + 1.0,
                        color: chart::FAILED,
                    });
                }
                if let Some((a, b)) = s.stt_span {
                    spans.push(chart::Span {
                        start: s.arrival_seconds,
                        end: a,
                        color: chart::WAIT,
                    });
                    spans.push(chart::Span {
                        start: a,
                        end: b,
                        color: chart::STT,
                    });
                }
                if let Some((a, b)) = s.eval_span {
                    if let Some((_, e)) = s.stt_span {
                        spans.push(chart::Span {
                            start: e,
                            end: a,
                            color: chart::WAIT,
                        });
                    }
                    spans.push(chart::Span {
                        start: a,
                        end: b,
                        color: chart::EVAL,
                    });
                    spans.push(chart::Span {
                        start: b,
                        end: s.released_seconds.unwrap_or(end).max(b),
                        color: chart::SCORE,
                    });
                }
                chart::Row {
                    label: s.user.clone(),
                    spans,
                    marker: s.eta_read_seconds.zip(s.eta_seconds).map(|(a, b)| a + b),
                }
            })
            .collect();
        let mut bars: Vec<(String, f64)> = summaries
            .iter()
            .map(|s| (s.method.clone(), s.wall_seconds))
            .collect();
        if let Some(l) = lb {
            bars.push(("lower bound".into(), l));
        }
        if let Some(two) = lower_bound
            .as_ref()
            .and_then(|l| l["two_phase_full_scale_seconds"].as_f64())
            && runs.iter().any(|r| r.policy == "two-phase")
        {
            bars.push(("two-phase lower bound".into(), two / scale));
        }
        let c = chart::Chart {
            title: format!(
                "Viva lab: {} students, {} policy, per-student latency and phases",
                students.len(),
                r.policy
            ),
            phases,
            rows,
            bars,
        };
        chart::draw(&c, &args.report.join("chart.png"))?;
    }
    println!(
        "  report: {}  chart: {}",
        path.display(),
        args.report.join("chart.png").display()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
