//! Benchmarks of Viva's core, printed as tables against targets (not a test).
//!
//! ```text
//! cargo bench -p viva-tests --bench core [-- scheduler|upload|sse|burst|gpu ...]
//! ```
//!
//! 1. **Scheduler overhead with instant workers**: an in-process daemon with
//!    fake workers that answer at once. Pass A uploads `BENCH_JOBS` (200) tiny
//!    WAVs while the scheduler runs and times intake, the drain after intake,
//!    and end to end. Pass B measures the scheduler alone: the same number of
//!    uploads are queued by a daemon without workers, then a daemon with
//!    workers starts on that data directory and drains the backlog.
//! 2. **Peak daemon RSS while streaming a `BENCH_UPLOAD_MIB` (1024) MiB
//!    upload**: a separate `viva serve` process; the WAV body is generated on
//!    the fly by the client (nothing is written to disk but by the daemon).
//! 3. **Status latency with `BENCH_SUBSCRIBERS` (1000) SSE subscribers**: a
//!    separate `viva serve` process with fake workers; GET /api/v1/status
//!    latency (`BENCH_STATUS_REQUESTS`, 500, issued open-loop every 10 ms)
//!    while uploads make status events flow, and the fan-out spread of each
//!    event across subscribers.
//! 4. **A burst of uploads**: `BENCH_BURST_STUDENTS` (300) students, each
//!    with their own session, upload `BENCH_BURST_CLIP_S` (30) s clips within
//!    `BENCH_BURST_WINDOW_S` (60) s to a separate `viva serve` with fake
//!    workers and the default fair-use limits, retrying after Retry-After:
//!    accepted, told to retry, lost (target 0), GET /api/v1/status p99
//!    during the burst (target 200 ms), daemon RSS peak.
//! 5. **Phase switching at GPU scale** (`core/gpu_scale.rs`): trickle, burst
//!    and lab-day arrivals against fake workers with a one-H100 profile, time
//!    scaled down by `BENCH_GPU_SCALE` (100): switching at once vs the
//!    cost-aware rule vs pipelined, against the lower bound.
//!
//! The separate daemon is `target/<profile>/viva` when it exists and is newer
//! than the daemon's sources (`cargo build --release -p viva-daemon`), else
//! this very executable re-run as `viva` (it links the same
//! `viva_daemon::cli::main`); `BENCH_VIVA=/path/to/viva` forces a binary.
//! `BENCH_STRICT=1` exits with status 1 when a target is missed.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use viva_daemon::Config;
use viva_daemon::Role;
use viva_tests::process::{Daemon, SHORT, STARTUP, output};
use viva_tests::{TestDaemon, bin_dir, tone};

#[path = "core/gpu_scale.rs"]
mod gpu_scale;

/// Set in the environment of a child process to make it run as `viva`.
const AS_VIVA_ENV: &str = "BENCH_CORE_RUN_AS_VIVA";
const SETTLED: &[&str] = &["evaluated", "awaiting_review", "released", "failed"];
const MIB: f64 = 1024.0 * 1024.0;

fn main() -> ExitCode {
    if std::env::var_os(AS_VIVA_ENV).is_some() {
        return viva_daemon::cli::main();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_all()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- reporting

#[derive(Clone, Copy)]
enum Goal {
    AtMost(f64),
}

struct Row {
    metric: String,
    value: f64,
    unit: &'static str,
    goal: Option<Goal>,
}

impl Row {
    fn info(metric: impl Into<String>, value: f64, unit: &'static str) -> Row {
        Row {
            metric: metric.into(),
            value,
            unit,
            goal: None,
        }
    }

    fn target(metric: impl Into<String>, value: f64, unit: &'static str, goal: Goal) -> Row {
        Row {
            metric: metric.into(),
            value,
            unit,
            goal: Some(goal),
        }
    }

    fn passed(&self) -> Option<bool> {
        self.goal.map(|Goal::AtMost(t)| self.value <= t)
    }
}

struct Section {
    title: String,
    rows: Vec<Row>,
    notes: Vec<String>,
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn print_section(s: &Section) {
    println!();
    println!("== {} ==", s.title);
    println!(
        "{:<50} {:>14} {:>14} {:>7}  result",
        "metric", "value", "target", "ratio"
    );
    for r in &s.rows {
        let value = format!("{} {}", fmt_num(r.value), r.unit);
        let (target, ratio, verdict) = match r.goal {
            None => ("-".to_owned(), "-".to_owned(), "info"),
            Some(g) => {
                let Goal::AtMost(t) = g;
                let sym = "<=";
                let ratio = if t != 0.0 {
                    format!("{:.2}", r.value / t)
                } else {
                    "-".to_owned()
                };
                let v = if r.passed() == Some(true) {
                    "PASS"
                } else {
                    "FAIL"
                };
                (format!("{sym} {} {}", fmt_num(t), r.unit), ratio, v)
            }
        };
        println!(
            "{:<50} {:>14} {:>14} {:>7}  {verdict}",
            r.metric, value, target, ratio
        );
    }
    for n in &s.notes {
        println!("  note: {n}");
    }
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn run_all() -> anyhow::Result<ExitCode> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    raise_fd_limit();
    let started = Instant::now();

    let fake = bin_dir().join("fake-worker");
    if !fake.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p viva-tests --bins` first \
             (cargo bench builds it with the benchmark; a plain `rustc`/copied binary does not)",
            fake.display()
        );
    }
    let viva = VivaCmd::locate();
    println!("Viva core benchmark ({} CPUs)", cpus());
    println!("daemon process for 2 and 3: {}", viva.describe);

    let mut results: Vec<(String, anyhow::Result<Section>)> = Vec::new();
    if wanted("scheduler") {
        let n = env_num("BENCH_JOBS", 200usize).max(1);
        let r = bench_scheduler(n).await;
        if let Ok(s) = &r {
            print_section(s);
        }
        results.push(("1. scheduler".into(), r));
    }
    if wanted("upload") {
        let mib = env_num("BENCH_UPLOAD_MIB", 1024u64).max(1);
        let r = bench_upload(&viva, mib).await;
        if let Ok(s) = &r {
            print_section(s);
        }
        results.push(("2. upload".into(), r));
    }
    if wanted("sse") {
        let subs = env_num("BENCH_SUBSCRIBERS", 1000usize).max(1);
        let reqs = env_num("BENCH_STATUS_REQUESTS", 500usize).max(10);
        let r = bench_sse(&viva, &fake, subs, reqs).await;
        if let Ok(s) = &r {
            print_section(s);
        }
        results.push(("3. sse".into(), r));
    }
    if wanted("burst") {
        let r = bench_burst(&viva, &fake).await;
        if let Ok(s) = &r {
            print_section(s);
        }
        results.push(("4. burst".into(), r));
    }
    if wanted("gpu") {
        let r = gpu_scale::bench_gpu_scale().await;
        if let Ok(s) = &r {
            print_section(s);
        }
        results.push(("5. gpu scale".into(), r));
    }

    println!();
    let (mut pass, mut fail, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for (name, r) in &results {
        match r {
            Ok(s) => {
                for row in &s.rows {
                    match row.passed() {
                        Some(true) => pass.push(format!("{name}: {}", row.metric)),
                        Some(false) => fail.push(format!("{name}: {}", row.metric)),
                        None => {}
                    }
                }
            }
            Err(e) => {
                println!("ERROR in {name}: {e:#}");
                errors.push(name.clone());
            }
        }
    }
    for f in &fail {
        println!("missed target: {f}");
    }
    println!(
        "SUMMARY: {}/{} targets met, {} missed, {} benchmark(s) errored; total {:.1} s",
        pass.len(),
        pass.len() + fail.len(),
        fail.len(),
        errors.len(),
        started.elapsed().as_secs_f64()
    );
    let strict = std::env::var("BENCH_STRICT").is_ok_and(|v| v == "1");
    Ok(if !errors.is_empty() || (strict && !fail.is_empty()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

// ---------------------------------------------------------------- helpers

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}

fn free_disk_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: zeroed statvfs is a valid out-parameter; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    ensure!(
        rc == 0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Percentile (nearest rank) of an ascending-sorted slice.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn upload_bytes(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Vec<u8>,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let resp = client
        .post(format!(
            "{url}/api/v1/assignments/sandbox-oral-1/submissions"
        ))
        .query(&[("filename", name)])
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .context("upload request")?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    ensure!(status.as_u16() == 201, "upload answered {status}: {text}");
    serde_json::from_str(&text).context("upload response is not JSON")
}

/// Uploads `n` copies of `body` with `concurrency` uploaders; returns the
/// submission ids and when the last upload was accepted.
async fn upload_many(
    url: &str,
    token: &str,
    body: Arc<Vec<u8>>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<String>, Instant)> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, body) = (client.clone(), next.clone(), body.clone());
        let (url, token) = (url.to_owned(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut last = None;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let v =
                    upload_bytes(&client, &url, &token, body.as_ref().clone(), "bench.wav").await?;
                last = Some(Instant::now());
                ids.push(v["id"].as_str().unwrap_or_default().to_owned());
            }
            anyhow::Ok((ids, last))
        }));
    }
    let mut ids = Vec::new();
    let mut last = None::<Instant>;
    for t in tasks {
        let (i, l) = t.await.context("uploader panicked")??;
        ids.extend(i);
        last = match (last, l) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    Ok((ids, last.unwrap_or_else(Instant::now)))
}

async fn get_json(
    client: &reqwest::Client,
    url: &str,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let resp = client.get(url).bearer_auth(token).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.is_success(), "GET {url} answered {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

fn queue_sum(status: &serde_json::Value) -> u64 {
    ["stt_queue", "eval_queue", "score_queue"]
        .iter()
        .map(|k| status[*k].as_u64().unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------- 1. scheduler

fn sched_config(c: &mut Config) {
    c.scheduler.stt_batch_size = 50;
    c.scheduler.batch_window = Duration::from_secs(1);
    c.scheduler.eval_batch_size = 4;
    // One learner uploads from several tasks: this measures the scheduler,
    // not the fair-use limits.
    c.intake.max_uploads_per_user = 0;
    c.intake.max_bytes_per_user_per_day = 0;
    c.limits.uploads_per_user_per_minute = 0;
    c.limits.uploads_per_ip_per_minute = 0;
}

fn instant_env() -> Vec<(&'static str, String)> {
    ["FAKE_STT_FIXED_MS", "FAKE_EVAL_FIXED_MS", "FAKE_LOAD_MS"]
        .into_iter()
        .map(|k| (k, "0".to_owned()))
        .collect()
}

async fn unsettled(d: &TestDaemon) -> anyhow::Result<i64> {
    d.state
        .store
        .read(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM submissions
                 WHERE state NOT IN ('evaluated', 'awaiting_review', 'released', 'failed')",
                [],
                |r| r.get::<_, i64>(0),
            )?)
        })
        .await
        .context("counting unsettled submissions")
}

async fn states(d: &TestDaemon) -> anyhow::Result<Vec<(String, i64)>> {
    d.state
        .store
        .read(|c| {
            let mut stmt =
                c.prepare("SELECT state, COUNT(*) FROM submissions GROUP BY state ORDER BY state")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
        .context("reading submission states")
}

async fn service_ms_total(d: &TestDaemon) -> anyhow::Result<i64> {
    d.state
        .store
        .read(|c| {
            Ok(
                c.query_row("SELECT COALESCE(SUM(service_ms), 0) FROM jobs", [], |r| {
                    r.get::<_, i64>(0)
                })?,
            )
        })
        .await
        .context("summing service times")
}

/// Polls GET /api/v1/status until every queue is empty, then confirms in the
/// database that nothing is left unsettled; returns when that was seen.
async fn wait_drained(d: &TestDaemon, admin: &str, timeout: Duration) -> anyhow::Result<Instant> {
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/status", d.url);
    let deadline = Instant::now() + timeout;
    loop {
        let st = get_json(&client, &url, admin).await?;
        if queue_sum(&st) == 0 {
            let at = Instant::now();
            if unsettled(d).await? == 0 {
                return Ok(at);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "not drained within {timeout:?}: status {st}, states {:?}",
                states(d).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn verify_all_evaluated(
    d: &TestDaemon,
    admin: &str,
    ids: &[String],
    n: usize,
) -> anyhow::Result<()> {
    let st = states(d).await?;
    let evaluated = st
        .iter()
        .find(|(s, _)| s == "evaluated")
        .map(|(_, c)| *c)
        .unwrap_or(0);
    ensure!(
        evaluated == n as i64,
        "expected {n} submissions in state evaluated, found {st:?}"
    );
    let client = reqwest::Client::new();
    let picks = [0, ids.len() / 2, ids.len().saturating_sub(1)];
    for i in picks {
        let Some(id) = ids.get(i) else { continue };
        let v = get_json(
            &client,
            &format!("{}/api/v1/submissions/{id}", d.url),
            admin,
        )
        .await?;
        ensure!(
            v["state"] == "evaluated",
            "submission {id} is {} over the API",
            v["state"]
        );
    }
    Ok(())
}

/// Fake worker processes the daemon started (from the fake workers' log).
fn worker_starts(d: &TestDaemon) -> usize {
    d.fake_events()
        .iter()
        .filter(|e| e["ev"] == "start")
        .count()
}

async fn bench_scheduler(n: usize) -> anyhow::Result<Section> {
    let media = tempfile::tempdir()?;
    let wav = Arc::new(std::fs::read(tone(media.path(), "tone.wav", 0.5))?);
    let env = instant_env();
    let uploaders = 4;
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // Pass A: uploads and scheduling at the same time.
    let d = TestDaemon::start(&env, sched_config).await;
    let learner = d.token(Role::Learner, "bench", "sandbox");
    let admin = d.token(Role::Admin, "bench-admin", "sandbox");
    let t0 = Instant::now();
    let (ids, last_accept) = upload_many(&d.url, &learner, wav.clone(), n, uploaders).await?;
    let left_at_intake = unsettled(&d).await?;
    let done = wait_drained(&d, &admin, Duration::from_secs(180)).await?;
    verify_all_evaluated(&d, &admin, &ids, n).await?;
    let phases_a = d.state.scheduler.phase_history().len();
    let starts_a = worker_starts(&d);
    d.stop().await;
    let intake_a = last_accept - t0;
    let total_a = done - t0;
    let drain_a = done.saturating_duration_since(last_accept);

    // Pass B: a backlog queued by a daemon without workers, drained by a
    // daemon with workers (the scheduler alone, no intake competing).
    let data = tempfile::tempdir()?;
    let data_dir = data.path().join("var");
    let dd = data_dir.clone();
    let d1 = TestDaemon::start(&env, move |c| {
        sched_config(c);
        c.data_dir = dd;
        c.workers.stt = None;
        c.workers.evaluators.clear();
    })
    .await;
    let learner1 = d1.token(Role::Learner, "bench", "sandbox");
    let t1 = Instant::now();
    let (ids_b, last_b) = upload_many(&d1.url, &learner1, wav.clone(), n, uploaders).await?;
    let intake_b = last_b - t1;
    d1.stop().await;
    let dd = data_dir.clone();
    let t2 = Instant::now();
    let d2 = TestDaemon::start(&env, move |c| {
        sched_config(c);
        c.data_dir = dd;
    })
    .await;
    let admin2 = d2.token(Role::Admin, "bench-admin", "sandbox");
    let done_b = wait_drained(&d2, &admin2, Duration::from_secs(180)).await?;
    verify_all_evaluated(&d2, &admin2, &ids_b, n).await?;
    let service = service_ms_total(&d2).await?;
    let phases_b = d2.state.scheduler.phase_history().len();
    let starts_b = worker_starts(&d2);
    d2.stop().await;
    let drain_b = done_b - t2;

    let per_job_b = ms(drain_b) / n as f64;
    rows.push(Row::info(
        "A: intake, all uploads accepted",
        intake_a.as_secs_f64(),
        "s",
    ));
    rows.push(Row::info(
        "A: intake rate (4 uploaders)",
        n as f64 / intake_a.as_secs_f64(),
        "up/s",
    ));
    rows.push(Row::info(
        "A: unsettled when intake ended",
        left_at_intake as f64,
        "jobs",
    ));
    rows.push(Row::info(
        "A: drain after intake",
        drain_a.as_secs_f64(),
        "s",
    ));
    if left_at_intake > 0 && drain_a > Duration::ZERO {
        rows.push(Row::info(
            "A: drain rate after intake",
            left_at_intake as f64 / drain_a.as_secs_f64(),
            "jobs/s",
        ));
    }
    rows.push(Row::info("A: end to end", total_a.as_secs_f64(), "s"));
    rows.push(Row::info(
        "A: end-to-end throughput",
        n as f64 / total_a.as_secs_f64(),
        "jobs/s",
    ));
    rows.push(Row::info(
        "B: intake without workers",
        intake_b.as_secs_f64(),
        "s",
    ));
    rows.push(Row::info(
        "B: backlog drain (daemon start to all evaluated)",
        drain_b.as_secs_f64(),
        "s",
    ));
    rows.push(Row::info(
        "B: scheduler throughput",
        n as f64 / drain_b.as_secs_f64(),
        "jobs/s",
    ));
    rows.push(Row::target(
        "B: scheduler overhead per submission",
        per_job_b,
        "ms",
        Goal::AtMost(50.0),
    ));
    notes.push(format!(
        "N={n} submissions of a 0.5 s WAV; stt_batch_size 50, batch_window 1s, eval_batch_size 4, two evaluator roles \
         (1 STT job + 2 evaluations each); fake workers with every delay 0; worker-reported service time \
         in pass B: {service} ms in total."
    ));
    notes.push(format!(
        "phase changes recorded: pass A {phases_a}, pass B {phases_b}; worker processes started: pass A \
         {starts_a}, pass B {starts_b} (each STT<->evaluation switch stops and \
         starts worker processes); pass B includes daemon start-up and worker spawns."
    ));
    notes.push(
        "the 50 ms/submission target is this benchmark's own (none was specified): the scheduler should add \
         well under 1% to real STT + evaluation times of seconds per submission."
            .into(),
    );
    Ok(Section {
        title: format!("1. Scheduler overhead per job, instant workers (N={n})"),
        rows,
        notes,
    })
}

// ---------------------------------------------------------------- separate daemon

struct VivaCmd {
    exe: PathBuf,
    self_exec: bool,
    describe: String,
}

impl VivaCmd {
    fn locate() -> VivaCmd {
        let me = std::env::current_exe().unwrap_or_default();
        if let Some(p) = std::env::var_os("BENCH_VIVA") {
            let exe = PathBuf::from(p);
            return VivaCmd {
                describe: format!("{} (BENCH_VIVA)", exe.display()),
                exe,
                self_exec: false,
            };
        }
        let viva = bin_dir().join("viva");
        let built = std::fs::metadata(&viva).and_then(|m| m.modified()).ok();
        // Stale when a source it is built from changed after it was.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sources = [
            root.join("daemon"),
            root.join("models/viva-models"),
            root.join("Cargo.lock"),
        ];
        let newest_source = sources.iter().filter_map(|p| newest_mtime(p)).max();
        let why = match (built, newest_source) {
            (None, _) => "is missing",
            (Some(b), Some(src)) if src > b => "is older than the daemon's sources",
            _ => {
                return VivaCmd {
                    describe: format!("{} (the real viva binary)", viva.display()),
                    exe: viva,
                    self_exec: false,
                };
            }
        };
        VivaCmd {
            describe: format!(
                "this benchmark executable re-run as viva (it links the same viva_daemon::cli::main): \
                 {} {why}; `cargo build --release -p viva-daemon` builds it",
                viva.display(),
            ),
            exe: me,
            self_exec: true,
        }
    }

    fn command(&self, config: &Path) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.exe);
        // Unknown VIVA_* variables are configuration errors; start clean.
        viva_tests::process::clean_viva_env(&mut cmd)
            .arg("--config")
            .arg(config);
        if self.self_exec {
            cmd.env(AS_VIVA_ENV, "1");
        }
        cmd
    }
}

/// Latest modification time of a file, or of any file under a directory.
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "target")
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// A `viva serve` child process on a port of its own choosing; killed when
/// dropped (its log printed if the benchmark panics).
struct Served {
    daemon: Daemon,
    pid: u32,
    url: String,
    config: PathBuf,
}

fn toml_str(s: &str) -> String {
    // A JSON string literal is a valid TOML basic string.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

async fn serve(viva: &VivaCmd, root: &Path, extra_toml: &str) -> anyhow::Result<Served> {
    let data = root.join("var");
    let config = root.join("viva.toml");
    let text = format!(
        "data_dir = {}\n{extra_toml}",
        toml_str(&data.display().to_string())
    );
    std::fs::write(&config, text)?;
    let mut cmd = viva.command(&config);
    cmd.arg("serve").env("VIVA_LOG", "info");
    // Daemon::start listens on 127.0.0.1:0 and reads the address `viva
    // serve` announces, failing at once with its log if it exits first.
    let daemon = tokio::task::spawn_blocking(move || Daemon::start(&mut cmd, STARTUP))
        .await
        .context("joining the start-up")?
        .with_context(|| format!("starting {}", viva.exe.display()))?;
    let s = Served {
        pid: daemon.pid(),
        url: daemon.url(),
        daemon,
        config,
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{}/healthz", s.url)).send().await
            && r.status().is_success()
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "viva did not answer /healthz within 30 s: {}",
                s.daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Served {
    async fn mint(&self, viva: &VivaCmd, role: &str, user: &str) -> anyhow::Result<String> {
        let mut cmd = viva.command(&self.config);
        cmd.args([
            "session",
            "--role",
            role,
            "--user",
            user,
            "--context",
            "sandbox",
        ]);
        let out = tokio::task::spawn_blocking(move || output(&mut cmd, SHORT)).await??;
        ensure!(
            out.status.success(),
            "viva session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(!token.is_empty(), "viva session printed no token");
        Ok(token)
    }

    /// SIGTERM, then a kill if it has not stopped within 15 s.
    async fn stop(self) {
        let mut daemon = self.daemon;
        let _ = tokio::task::spawn_blocking(move || {
            daemon.terminate(Duration::from_secs(15)).map(|_| ())
        })
        .await;
    }
}

/// (VmRSS, VmHWM) of a process, in bytes.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds (user + system) of a process, and of its reaped children.
fn cpu_secs(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0.0) / hz;
    Some((field(14) + field(15), field(16) + field(17)))
}

// ---------------------------------------------------------------- 2. upload

const RATE: u32 = 48_000;
const CHANNELS: u16 = 2;
/// 480 Hz at 48 kHz: exactly 100 frames per period, so chunks repeat seamlessly.
const PERIOD_FRAMES: usize = 100;
const CHUNK_PERIODS: usize = 640;

fn wav_header(data_len: u32) -> Vec<u8> {
    let block = CHANNELS * 2;
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data_len).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&CHANNELS.to_le_bytes());
    h.extend_from_slice(&RATE.to_le_bytes());
    h.extend_from_slice(&(RATE * u32::from(block)).to_le_bytes());
    h.extend_from_slice(&block.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_len.to_le_bytes());
    h
}

fn pcm_chunk() -> Vec<u8> {
    let mut period = Vec::with_capacity(PERIOD_FRAMES * 4);
    for i in 0..PERIOD_FRAMES {
        let x = (i as f64 / PERIOD_FRAMES as f64 * std::f64::consts::TAU).sin();
        let s = (x * 8000.0) as i16;
        for _ in 0..CHANNELS {
            period.extend_from_slice(&s.to_le_bytes());
        }
    }
    period.repeat(CHUNK_PERIODS)
}

/// A streaming WAV body (44-byte header + `data_len` bytes of PCM); records when the
/// last byte was handed to the HTTP client.
fn wav_stream(
    data_len: u64,
    finished: Arc<OnceLock<Instant>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunk = Arc::new(pcm_chunk());
    let header = wav_header(data_len as u32);
    futures::stream::unfold((Some(header), 0u64), move |(header, sent)| {
        let chunk = chunk.clone();
        let finished = finished.clone();
        async move {
            if let Some(h) = header {
                return Some((Ok(h), (None, 0)));
            }
            if sent >= data_len {
                let _ = finished.set(Instant::now());
                return None;
            }
            let n = (chunk.len() as u64).min(data_len - sent) as usize;
            let piece = chunk[..n].to_vec();
            if sent + n as u64 >= data_len {
                // The HTTP client need not poll again once Content-Length is met.
                let _ = finished.set(Instant::now());
            }
            Some((Ok(piece), (None, sent + n as u64)))
        }
    })
}

async fn bench_upload(viva: &VivaCmd, mib: u64) -> anyhow::Result<Section> {
    let total = mib * 1024 * 1024;
    ensure!(
        total < 4 * 1024 * 1024 * 1024 - 64,
        "BENCH_UPLOAD_MIB must be under 4096 (one RIFF file)"
    );
    let block = u64::from(CHANNELS) * 2;
    let data_len = (total - 44) / block * block;
    let body_len = data_len + 44;
    let seconds = data_len as f64 / (f64::from(RATE) * block as f64);

    let root = tempfile::tempdir()?;
    // The original, the 16 kHz mono WAV (1/6 of a 48 kHz stereo one) and slack.
    let need = body_len + body_len / 6 + 512 * 1024 * 1024;
    let free = free_disk_bytes(root.path())?;
    ensure!(
        free >= need,
        "{} has {:.0} MiB free; the {mib} MiB upload needs about {:.0} MiB (set BENCH_UPLOAD_MIB lower)",
        root.path().display(),
        free as f64 / MIB,
        need as f64 / MIB
    );
    let extra = "[intake]\nmax_upload_bytes = 2147483648\nmax_duration = \"3h\"\nmin_free_bytes = 67108864\n\
                 [sandbox]\nenabled = true\n";
    let served = serve(viva, root.path(), extra).await?;
    let result = upload_inner(&served, viva, root.path(), mib, body_len, data_len, seconds).await;
    served.stop().await;
    let _ = std::fs::remove_dir_all(root.path().join("var"));
    result
}

async fn upload_inner(
    served: &Served,
    viva: &VivaCmd,
    root: &Path,
    mib: u64,
    body_len: u64,
    data_len: u64,
    seconds: f64,
) -> anyhow::Result<Section> {
    let token = served.mint(viva, "learner", "bench").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (start_rss, _) = rss(served.pid).context("reading the daemon's RSS")?;
    // Warm-up: one small upload exercises the whole path once.
    let client = reqwest::Client::new();
    let small = std::fs::read(tone(root, "warm.wav", 1.0))?;
    upload_bytes(&client, &served.url, &token, small, "warm.wav").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base_rss, _) = rss(served.pid).context("reading the daemon's RSS")?;

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(base_rss));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak, samples, pid) = (stop.clone(), peak.clone(), samples.clone(), served.pid);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some((r, _)) = rss(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let finished = Arc::new(OnceLock::new());
    let body = reqwest::Body::wrap_stream(wav_stream(data_len, finished.clone()));
    let cpu0 = cpu_secs(served.pid).unwrap_or_default();
    let t0 = Instant::now();
    let resp = client
        .post(format!(
            "{}/api/v1/assignments/sandbox-oral-1/submissions",
            served.url
        ))
        .query(&[("filename", "big.wav")])
        .bearer_auth(&token)
        .header(reqwest::header::CONTENT_TYPE, "audio/wav")
        .header(reqwest::header::CONTENT_LENGTH, body_len)
        .timeout(Duration::from_secs(900))
        .body(body)
        .send()
        .await;
    let t201 = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let resp = resp.context("big upload")?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    ensure!(
        status.as_u16() == 201,
        "big upload answered {status}: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let got_secs = v["duration_seconds"].as_f64().unwrap_or(0.0);
    let (_, hwm) = rss(served.pid).context("reading the daemon's RSS")?;
    let cpu1 = cpu_secs(served.pid).unwrap_or_default();
    let peak = peak.load(Ordering::Relaxed);
    let stream_end = finished.get().copied().unwrap_or(t201);
    let stream_s = (stream_end - t0).as_secs_f64();
    let total_s = (t201 - t0).as_secs_f64();
    let growth = peak.saturating_sub(base_rss) as f64 / MIB;
    let growth_hwm = hwm.saturating_sub(base_rss) as f64 / MIB;

    let rows = vec![
        Row::info("upload size", body_len as f64 / MIB, "MiB"),
        Row::info("RSS at start (idle daemon)", start_rss as f64 / MIB, "MiB"),
        Row::info(
            "RSS before upload (after warm-up)",
            base_rss as f64 / MIB,
            "MiB",
        ),
        Row::info(
            "RSS peak during upload (50 ms samples)",
            peak as f64 / MIB,
            "MiB",
        ),
        Row::target(
            "RSS growth during upload (sampled peak)",
            growth,
            "MiB",
            Goal::AtMost(64.0),
        ),
        Row::target(
            "RSS growth by VmHWM (kernel high-water mark)",
            growth_hwm,
            "MiB",
            Goal::AtMost(64.0),
        ),
        Row::info("body streamed in", stream_s, "s"),
        Row::info("upload stream throughput", mib as f64 / stream_s, "MiB/s"),
        Row::info(
            "request start to 201 (incl. probe + normalise)",
            total_s,
            "s",
        ),
        Row::info(
            "after body end to 201 (probe + normalise)",
            total_s - stream_s,
            "s",
        ),
        Row::info(
            "end-to-end throughput to 201",
            mib as f64 / total_s,
            "MiB/s",
        ),
        Row::info("daemon CPU during the request", cpu1.0 - cpu0.0, "s"),
        Row::info("ffprobe/ffmpeg CPU (reaped children)", cpu1.1 - cpu0.1, "s"),
    ];
    let mut notes = vec![format!(
        "a {seconds:.0} s 48 kHz stereo s16 WAV generated by the client (Content-Length set); the daemon \
         reported duration_seconds {got_secs:.0}; {} RSS samples; ffprobe/ffmpeg children are separate \
         processes and not counted.",
        samples.load(Ordering::Relaxed)
    )];
    if (got_secs - seconds).abs() > 2.0 {
        notes.push(format!(
            "duration mismatch: sent {seconds:.1} s, daemon says {got_secs:.1} s"
        ));
    }
    notes.push(
        "\"body streamed\" ends when the client hands the last chunk to its HTTP stack; a few MiB may still \
         sit in socket buffers."
            .into(),
    );
    Ok(Section {
        title: format!("2. Streaming a {mib} MiB upload to a separate daemon process"),
        rows,
        notes,
    })
}

// ---------------------------------------------------------------- 3. SSE

struct SubResult {
    /// (hash of the event's data, arrival) of every "status" event.
    events: Vec<(u64, Instant)>,
    error: Option<String>,
}

async fn subscriber(
    client: reqwest::Client,
    url: String,
    token: String,
    connected: Arc<AtomicUsize>,
    cancel: CancellationToken,
) -> SubResult {
    let mut out = SubResult {
        events: Vec::new(),
        error: None,
    };
    let resp = match client
        .get(format!("{url}/api/v1/events"))
        .bearer_auth(&token)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            out.error = Some(format!("events answered {}", r.status()));
            return out;
        }
        Err(e) => {
            out.error = Some(format!("events: {e}"));
            return out;
        }
    };
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut first = true;
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => break,
            item = stream.next() => item,
        };
        let chunk = match item {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                out.error = Some(format!("stream: {e}"));
                break;
            }
            None => {
                out.error = Some("stream ended".into());
                break;
            }
        };
        let at = Instant::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let frame: String = buf.drain(..pos + 2).collect();
            let mut event = "";
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if event == "status" {
                let mut h = DefaultHasher::new();
                data.hash(&mut h);
                out.events.push((h.finish(), at));
                if first {
                    first = false;
                    connected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    out
}

/// GET /api/v1/status `n` times, one every `every`, each on its own task
/// (open loop: a slow answer does not delay the next request); latencies in ms.
async fn status_load(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    n: usize,
    every: Duration,
) -> anyhow::Result<Vec<f64>> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, token) = (client.clone(), token.to_owned());
        let url = format!("{url}/api/v1/status");
        let at = start + every * i as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let t = Instant::now();
            let resp = client.get(&url).bearer_auth(&token).send().await?;
            let status = resp.status();
            let _ = resp.bytes().await?;
            ensure!(status.is_success(), "status answered {status}");
            anyhow::Ok(ms(t.elapsed()))
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.context("status task panicked")??);
    }
    Ok(sorted(out))
}

async fn bench_sse(
    viva: &VivaCmd,
    fake: &Path,
    subs: usize,
    reqs: usize,
) -> anyhow::Result<Section> {
    let limit = fd_limit();
    ensure!(
        limit as usize > subs + 200,
        "the open-file limit is {limit}: raise it (ulimit -n) above {} for {subs} subscribers",
        subs + 200
    );
    let root = tempfile::tempdir()?;
    let fake = toml_str(&fake.display().to_string());
    let extra = format!(
        "[sandbox]\nenabled = true\n\
         [intake]\nmin_free_bytes = 67108864\n\
         [limits]\nmax_streams_per_user = 0\ntickets_per_user_per_minute = 0\ntickets_per_ip_per_minute = 0\n\
         [scheduler]\nstt_batch_size = 10\nbatch_window = \"1s\"\nswap_work_ratio = 0\n\
         [workers.stt]\ncommand = {fake}\nargs = [\"--kind\", \"stt\"]\nmodel = \"fake\"\nmodel_path = \"/dev/null\"\n\
         env = {{ FAKE_STT_FIXED_MS = \"300\" }}\n\
         [workers.evaluators.a]\ncommand = {fake}\nargs = [\"--kind\", \"evaluator\"]\nmodel = \"fake\"\nmodel_path = \"/dev/null\"\n\
         env = {{ FAKE_EVAL_FIXED_MS = \"200\" }}\n\
         [workers.evaluators.b]\ncommand = {fake}\nargs = [\"--kind\", \"evaluator\"]\nmodel = \"fake\"\nmodel_path = \"/dev/null\"\n\
         env = {{ FAKE_EVAL_FIXED_MS = \"200\" }}\n"
    );
    let served = serve(viva, root.path(), &extra).await?;
    let result = sse_inner(&served, viva, root.path(), subs, reqs).await;
    served.stop().await;
    result
}

async fn sse_inner(
    served: &Served,
    viva: &VivaCmd,
    root: &Path,
    subs: usize,
    reqs: usize,
) -> anyhow::Result<Section> {
    let token = served.mint(viva, "learner", "bench").await?;
    let wav = std::fs::read(tone(root, "tone.wav", 1.0))?;
    let status_client = reqwest::Client::new();
    let every = Duration::from_millis(10);

    // Baseline: status latency with no subscribers and nothing happening.
    let idle = status_load(&status_client, &served.url, &token, 100, every).await?;

    // Connect the subscribers, in waves, each confirmed by its first event.
    let sse_client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let connected = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let mut tasks = Vec::with_capacity(subs);
    let t_conn = Instant::now();
    while tasks.len() < subs {
        for _ in 0..(subs - tasks.len()).min(100) {
            tasks.push(tokio::spawn(subscriber(
                sse_client.clone(),
                served.url.clone(),
                token.clone(),
                connected.clone(),
                cancel.clone(),
            )));
        }
        let want = tasks.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while connected.load(Ordering::Relaxed) < want {
            if Instant::now() > deadline {
                cancel.cancel();
                bail!(
                    "only {} of {want} subscribers got their first event within 30 s",
                    connected.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let connect_s = t_conn.elapsed().as_secs_f64();
    let daemon_rss = rss(served.pid)
        .map(|(r, _)| r as f64 / MIB)
        .unwrap_or(f64::NAN);
    let quiet = status_load(&status_client, &served.url, &token, 100, every).await?;

    // Load: uploads make the status change while status requests run.
    let t_load = Instant::now();
    let uploads = 10usize;
    let uploader = {
        let (url, token, wav) = (served.url.clone(), token.clone(), wav.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            for i in 0..uploads {
                let v =
                    upload_bytes(&client, &url, &token, wav.clone(), &format!("u{i}.wav")).await?;
                ids.push(v["id"].as_str().unwrap_or_default().to_owned());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::Ok(ids)
        })
    };
    let loaded = status_load(&status_client, &served.url, &token, reqs, every).await;
    let ids = uploader.await.context("uploader panicked")??;
    let loaded = loaded?;
    let load_s = t_load.elapsed().as_secs_f64();

    // Let the uploads finish processing so their events flow too.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut all = true;
        for id in &ids {
            let v = get_json(
                &status_client,
                &format!("{}/api/v1/submissions/{id}", served.url),
                &token,
            )
            .await?;
            if !SETTLED.contains(&v["state"].as_str().unwrap_or("")) {
                all = false;
                break;
            }
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            cancel.cancel();
            bail!("the uploads did not settle within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events_s = t_load.elapsed().as_secs_f64();
    cancel.cancel();
    let mut results = Vec::with_capacity(subs);
    for t in tasks {
        results.push(t.await.context("subscriber panicked")?);
    }

    // Fan-out: the same event (same data, same occurrence) at every subscriber.
    let errors = results.iter().filter(|r| r.error.is_some()).count();
    let mut arrivals: HashMap<(u64, usize), Vec<Instant>> = HashMap::new();
    for r in &results {
        let mut seen: HashMap<u64, usize> = HashMap::new();
        // The first event is the state at connection time: not a change.
        for (h, at) in r.events.iter().skip(1) {
            let k = seen.entry(*h).or_insert(0);
            *k += 1;
            if *at >= t_load {
                arrivals.entry((*h, *k)).or_default().push(*at);
            }
        }
    }
    let majority: Vec<&Vec<Instant>> = arrivals.values().filter(|v| v.len() * 2 >= subs).collect();
    let mut spreads = Vec::new();
    let mut delays = Vec::new();
    let mut coverage = 0.0;
    for v in &majority {
        let first = v.iter().min().copied().unwrap_or(t_load);
        let last = v.iter().max().copied().unwrap_or(t_load);
        spreads.push(ms(last - first));
        delays.extend(v.iter().map(|t| ms(*t - first)));
        coverage += v.len() as f64 / subs as f64;
    }
    ensure!(
        !majority.is_empty(),
        "no status event reached half of the subscribers"
    );
    let coverage = coverage / majority.len() as f64;
    let spreads = sorted(spreads);
    let delays = sorted(delays);

    let rows = vec![
        Row::info("status p50, idle (no subscribers)", pct(&idle, 0.5), "ms"),
        Row::info("status p99, idle (no subscribers)", pct(&idle, 0.99), "ms"),
        Row::info(
            format!("status p99, {subs} subscribers, quiet"),
            pct(&quiet, 0.99),
            "ms",
        ),
        Row::info(
            format!("status p50, {subs} subs + events"),
            pct(&loaded, 0.5),
            "ms",
        ),
        Row::info(
            format!("status p95, {subs} subs + events"),
            pct(&loaded, 0.95),
            "ms",
        ),
        Row::target(
            format!("status p99, {subs} subs + events"),
            pct(&loaded, 0.99),
            "ms",
            Goal::AtMost(100.0),
        ),
        Row::info(
            format!("status max, {subs} subs + events"),
            pct(&loaded, 1.0),
            "ms",
        ),
        Row::info(
            "fan-out: events reaching >= half the subs",
            majority.len() as f64,
            "events",
        ),
        Row::info(
            "fan-out: mean share of subs per event",
            coverage * 100.0,
            "%",
        ),
        Row::info("fan-out spread (first->last) p50", pct(&spreads, 0.5), "ms"),
        Row::target(
            "fan-out spread (first->last) p99",
            pct(&spreads, 0.99),
            "ms",
            Goal::AtMost(100.0),
        ),
        Row::info(
            "fan-out delay after first arrival p50",
            pct(&delays, 0.5),
            "ms",
        ),
        Row::info(
            "fan-out delay after first arrival p99",
            pct(&delays, 0.99),
            "ms",
        ),
        Row::info("daemon RSS with subscribers connected", daemon_rss, "MiB"),
    ];
    let notes = vec![
        format!(
            "{subs} SSE connections (global stream, learner bearer token) opened in {connect_s:.1} s; \
             {errors} ended with an error; {reqs} status requests every {} ms open-loop over {load_s:.1} s \
             while {uploads} 1 s uploads (fake STT 300 ms, evaluators 200 ms) ran; events observed for {events_s:.1} s.",
            every.as_millis()
        ),
        "the subscribers, the status client and the daemon share this machine's CPUs: client-side \
         scheduling delay is included in every number."
            .into(),
        "the daemon sends only the latest status (watch channel): a subscriber that falls behind skips \
         intermediate events, which shows as a share below 100 %."
            .into(),
    ];
    Ok(Section {
        title: format!("3. Status latency with {subs} SSE subscribers"),
        rows,
        notes,
    })
}

// ---------------------------------------------------------------- 4. burst

/// `BENCH_BURST_STUDENTS` (300) students, each with their own session, upload
/// a `BENCH_BURST_CLIP_S` (30) s clip at evenly spread times within
/// `BENCH_BURST_WINDOW_S` (60) s to a separate `viva serve` with fake
/// workers and the default fair-use limits. An upload told to wait (429,
/// 503, 507) is retried after its Retry-After with the same Idempotency-Key.
/// Meanwhile an instructor polls GET /api/v1/status every 50 ms (open loop).
/// Reported: accepted, told to retry, lost (never accepted, or missing or
/// failed once drained), status p50/p99, daemon RSS peak (VmHWM).
async fn bench_burst(viva: &VivaCmd, fake: &Path) -> anyhow::Result<Section> {
    let students = env_num("BENCH_BURST_STUDENTS", 300usize).max(1);
    let clip_s = env_num("BENCH_BURST_CLIP_S", 30.0f64);
    let window = Duration::from_secs_f64(env_num("BENCH_BURST_WINDOW_S", 60.0f64));
    let root = tempfile::tempdir()?;
    let fake = toml_str(&fake.display().to_string());
    let extra = format!(
        "[sandbox]\nenabled = true\n\
         [intake]\nmin_free_bytes = 67108864\n\
         [scheduler]\nstt_batch_size = 10\nbatch_window = \"2s\"\nswap_work_ratio = 0\n\
         [workers.stt]\ncommand = {fake}\nargs = [\"--kind\", \"stt\", \"--max-parallel\", \"2\"]\nmodel = \"fake\"\nmodel_path = \"/dev/null\"\n\
         env = {{ FAKE_STT_FIXED_MS = \"50\", FAKE_STT_MS_PER_AUDIO_SEC = \"2\" }}\n\
         [workers.evaluators.a]\ncommand = {fake}\nargs = [\"--kind\", \"evaluator\"]\nmodel = \"fake\"\nmodel_path = \"/dev/null\"\n\
         env = {{ FAKE_EVAL_FIXED_MS = \"50\", FAKE_EVAL_MS_PER_ITEM = \"10\" }}\n\
         [workers.evaluators.b]\ncommand = {fake}\nargs = [\"--kind\", \"evaluator\"]\nmodel = \"fake\"\nmodel_path = \"/dev/null\"\n\
         env = {{ FAKE_EVAL_FIXED_MS = \"50\", FAKE_EVAL_MS_PER_ITEM = \"10\" }}\n"
    );
    let served = serve(viva, root.path(), &extra).await?;
    let result = burst_inner(&served, viva, root.path(), students, clip_s, window).await;
    served.stop().await;
    result
}

async fn burst_inner(
    served: &Served,
    viva: &VivaCmd,
    root: &Path,
    students: usize,
    clip_s: f64,
    window: Duration,
) -> anyhow::Result<Section> {
    let wav = Arc::new(std::fs::read(tone(root, "clip.wav", clip_s))?);
    let teacher = served.mint(viva, "instructor", "burst-teacher").await?;
    let mut tokens = Vec::with_capacity(students);
    for i in 0..students {
        tokens.push(
            served
                .mint(viva, "learner", &format!("burst-{i:04}"))
                .await?,
        );
    }
    let start_rss = rss(served.pid).map(|(r, _)| r).unwrap_or(0);
    let client = reqwest::Client::new();
    let every = Duration::from_millis(50);
    let polls = (window.as_millis() / every.as_millis()).max(1) as usize;
    let status = {
        let (client, url, teacher) = (client.clone(), served.url.clone(), teacher.clone());
        tokio::spawn(async move { status_load(&client, &url, &teacher, polls, every).await })
    };
    let retries = Arc::new(AtomicUsize::new(0));
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(students);
    for (i, token) in tokens.into_iter().enumerate() {
        let at = t0 + window.mul_f64(i as f64 / students as f64);
        let (client, url, wav, retries) = (
            client.clone(),
            served.url.clone(),
            wav.clone(),
            retries.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let key = format!("burst-{i:04}-clip");
            for _ in 0..20 {
                let resp = client
                    .post(format!(
                        "{url}/api/v1/assignments/sandbox-oral-1/submissions"
                    ))
                    .query(&[("filename", "clip.wav")])
                    .header("Idempotency-Key", &key)
                    .bearer_auth(&token)
                    .body(wav.as_ref().clone())
                    .send()
                    .await;
                let Ok(resp) = resp else {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let code = resp.status().as_u16();
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                match code {
                    200 | 201 => {
                        return (token, body["id"].as_str().map(str::to_owned));
                    }
                    429 | 503 | 507 => {
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(wait.min(10))).await;
                    }
                    _ => return (token, None),
                }
            }
            (token, None)
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        let (token, id) = t.await.context("upload task panicked")?;
        if let Some(id) = id {
            accepted.push((token, id));
        }
    }
    let intake_s = t0.elapsed().as_secs_f64();
    let lat = status.await.context("status task panicked")??;
    // Drain: every accepted submission evaluated (none lost, none failed).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut settled = 0usize;
    let mut failed = 0usize;
    for (token, id) in &accepted {
        loop {
            let v = get_json(
                &client,
                &format!("{}/api/v1/submissions/{id}", served.url),
                token,
            )
            .await?;
            match v["state"].as_str() {
                Some("evaluated" | "awaiting_review" | "released") => {
                    settled += 1;
                    break;
                }
                Some("failed") => {
                    failed += 1;
                    break;
                }
                _ if Instant::now() > deadline => bail!("{id} did not settle: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let drained_s = t0.elapsed().as_secs_f64();
    let (_, hwm) = rss(served.pid).unwrap_or((0, 0));
    let lost = students - settled;
    Ok(Section {
        title: format!(
            "4. Burst: {students} students upload {clip_s:.0} s clips within {:.0} s (fake workers)",
            window.as_secs_f64()
        ),
        rows: vec![
            Row::info("accepted", accepted.len() as f64, "uploads"),
            Row::info(
                "told to retry (429/503/507) or reconnect",
                retries.load(Ordering::Relaxed) as f64,
                "answers",
            ),
            Row::target(
                "lost (never accepted, or failed)",
                lost as f64,
                "uploads",
                Goal::AtMost(0.0),
            ),
            Row::info("failed after acceptance", failed as f64, "uploads"),
            Row::info("last upload accepted after", intake_s, "s"),
            Row::info("all evaluated after", drained_s, "s"),
            Row::info(
                "GET /api/v1/status p50 during the burst",
                pct(&lat, 0.5),
                "ms",
            ),
            Row::target(
                "GET /api/v1/status p99 during the burst",
                pct(&lat, 0.99),
                "ms",
                Goal::AtMost(200.0),
            ),
            Row::info("daemon RSS at start", start_rss as f64 / MIB, "MiB"),
            Row::info("daemon RSS peak (VmHWM)", hwm as f64 / MIB, "MiB"),
        ],
        notes: vec![format!(
            "{} status requests, open loop every {} ms",
            lat.len(),
            every.as_millis()
        )],
    })
}
