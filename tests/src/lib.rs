//! Support for Viva's end-to-end tests: real media made with espeak-ng and
//! ffmpeg, an in-process daemon wired to the test-double worker
//! (`fake-worker`, a real process speaking the real protocol), and helpers to
//! find the real `viva` binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use viva_daemon::Config;
use viva_daemon::Role;
use viva_daemon::config::WorkerConfig;

pub mod gpu_profile;
pub mod nodes;
pub mod pg;
pub mod platform;
pub mod real;

/// Child processes with deadlines (the `viva-test-process` crate): every
/// process a test waits on goes through it.
pub use viva_test_process as process;

/// The directory holding this build's binaries (target/<profile>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The test-double worker binary, built with this package.
pub fn fake_worker() -> PathBuf {
    let p = bin_dir().join("fake-worker");
    assert!(
        p.exists(),
        "{} is missing: build with `cargo test --workspace`",
        p.display()
    );
    p
}

/// The real `viva` binary (built because viva-daemon has integration tests).
pub fn viva_bin() -> PathBuf {
    let p = bin_dir().join("viva");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p viva-daemon`)",
        p.display()
    );
    p
}

/// The `viva-lab` binary (package viva-lab, tests/lab). Another package's
/// binary is not built for this package's tests: `cargo test --workspace`
/// builds it for viva-lab's own integration test, so does scripts/test.
pub fn lab_bin() -> PathBuf {
    let p = bin_dir().join("viva-lab");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace --no-run` (scripts/test does)",
        p.display()
    );
    p
}

/// Runs a media tool (espeak-ng, ffmpeg) with a deadline.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = process::output(cmd, process::SHORT)
        .context("install ffmpeg and espeak-ng: scripts/test does")?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            process::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Speech with espeak-ng, re-encoded by ffmpeg to the extension's format.
pub fn speech(dir: &Path, name: &str, text: &str, voice: &str) -> PathBuf {
    let wav = dir.join(format!("{name}.espeak.wav"));
    run(Command::new("espeak-ng")
        .args(["-v", voice, "-s", "160", "-w"])
        .arg(&wav)
        .arg(text))
    .expect("espeak-ng");
    let out = dir.join(name);
    if name.ends_with(".wav") {
        std::fs::rename(&wav, &out).expect("rename");
    } else {
        run(Command::new("ffmpeg")
            .args(["-nostdin", "-y", "-v", "error", "-i"])
            .arg(&wav)
            .arg(&out))
        .expect("ffmpeg encode");
    }
    out
}

/// A sine tone of `seconds` as WAV: quick to make, exact duration.
pub fn tone(dir: &Path, name: &str, seconds: f64) -> PathBuf {
    let out = dir.join(name);
    run(Command::new("ffmpeg")
        .args(["-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={seconds}"))
        .args(["-ar", "16000", "-ac", "1"])
        .arg(&out))
    .expect("ffmpeg tone");
    out
}

/// A small H.264 video, with or without an AAC audio track.
pub fn video(dir: &Path, name: &str, seconds: f64, with_audio: bool) -> PathBuf {
    let out = dir.join(name);
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i"])
        .arg(format!("testsrc=duration={seconds}:size=160x120:rate=10"));
    if with_audio {
        cmd.args(["-f", "lavfi", "-i"])
            .arg(format!("sine=frequency=300:duration={seconds}"))
            .args(["-c:a", "aac", "-shortest"]);
    }
    cmd.args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(&out);
    run(&mut cmd).expect("ffmpeg video");
    out
}

/// A daemon running in this process on an ephemeral port, with fake workers.
pub struct TestDaemon {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub state: viva_daemon::AppState,
    pub fake_log: PathBuf,
    shutdown: CancellationToken,
    join: Option<tokio::task::JoinHandle<viva_daemon::Result<()>>>,
}

/// Fake worker settings shared by every worker of a test daemon.
pub fn fake_worker_config(
    kind: &str,
    env: &[(&str, String)],
    log: &Path,
    db: &Path,
) -> WorkerConfig {
    let mut e: std::collections::BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    e.insert("FAKE_LOG".into(), log.display().to_string());
    e.insert("FAKE_DB".into(), db.display().to_string());
    e.insert(
        "FAKE_MARKER_DIR".into(),
        log.parent()
            .unwrap_or(Path::new("/tmp"))
            .display()
            .to_string(),
    );
    WorkerConfig {
        command: fake_worker(),
        args: vec!["--kind".into(), kind.into()],
        env: e,
        model: format!("fake-{kind}"),
        model_path: "/dev/null".into(),
        options: Default::default(),
        memory_mb: 100,
    }
}

impl TestDaemon {
    /// Starts a daemon with the sandbox course, one fake STT worker and two
    /// fake evaluators ("a", "b"); `env` configures the fake workers and
    /// `customize` anything else. No scorer: submissions rest in `evaluated`.
    pub async fn start(env: &[(&str, String)], customize: impl FnOnce(&mut Config)) -> TestDaemon {
        TestDaemon::start_with(env, customize, viva_daemon::Scoring::Off).await
    }

    /// Like [`TestDaemon::start`], but evaluated submissions are scored by
    /// the assignment's real rubric plugin (WebAssembly, in-process compiles).
    pub async fn start_scoring(
        env: &[(&str, String)],
        customize: impl FnOnce(&mut Config),
    ) -> TestDaemon {
        let scoring = viva_daemon::Scoring::Plugins(viva_plugins::Compiler::InProcess);
        TestDaemon::start_with(env, customize, scoring).await
    }

    pub async fn start_with(
        env: &[(&str, String)],
        customize: impl FnOnce(&mut Config),
        scoring: viva_daemon::Scoring,
    ) -> TestDaemon {
        if let Ok(filter) = std::env::var("VIVA_TEST_LOG") {
            // The in-process daemon's log, on the test's output.
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("var");
        let fake_log = dir.path().join("fake.log");
        let mut config = Config {
            data_dir: data.clone(),
            ..Default::default()
        };
        config.sandbox.enabled = true;
        config.intake.min_free_bytes = 64 * 1024 * 1024;
        config.scheduler.retry_backoff = Duration::from_millis(100);
        config.scheduler.batch_window = Duration::from_secs(120);
        config.workers.stop_grace = Duration::from_secs(2);
        // Fake workers' work is instant next to their loads, so the
        // cost-aware switch would hold every phase for `max_phase_wait`:
        // switch at once, as the seed does (tests of the rule opt in).
        config.scheduler.swap_work_ratio = 0.0;
        let mut db = data.join("viva.db");
        // Used only on PostgreSQL (a test may switch a daemon to it).
        config.node.secrets_key_file = Some(pg::secrets_key_file());
        if pg::enabled() {
            let url = pg::fresh_database().expect("a PostgreSQL test database");
            db = PathBuf::from(&url);
            config.store = Some(url);
        }
        config.workers.stt = Some(fake_worker_config("stt", env, &fake_log, &db));
        for role in ["a", "b"] {
            config.workers.evaluators.insert(
                role.into(),
                fake_worker_config("evaluator", env, &fake_log, &db),
            );
        }
        // Bound first, as `viva serve` does: the links the daemon hands out
        // (public_url's default) carry the real port.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let bound = listener.local_addr().expect("addr");
        config.listen = bound;
        customize(&mut config);
        let daemon = viva_daemon::Daemon::build_with(config, scoring)
            .await
            .expect("daemon builds");
        let state = daemon.state.clone();
        let url = format!("http://{bound}");
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(daemon.serve(listener, shutdown.clone()));
        TestDaemon {
            url,
            dir,
            state,
            fake_log,
            shutdown,
            join: Some(join),
        }
    }

    pub fn token(&self, role: Role, user: &str, context: &str) -> String {
        self.state
            .sessions
            .mint(user, context, &[role], None)
            .expect("mint")
            .0
    }

    /// Uploads a file as raw body; returns (status, JSON body).
    pub async fn upload(
        &self,
        token: &str,
        assignment: &str,
        file: &Path,
    ) -> (u16, serde_json::Value) {
        let bytes = std::fs::read(file).expect("read media");
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let resp = reqwest::Client::new()
            .post(format!(
                "{}/api/v1/assignments/{assignment}/submissions",
                self.url
            ))
            .query(&[("filename", name)])
            .bearer_auth(token)
            .body(bytes)
            .send()
            .await
            .expect("upload request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    pub async fn get(&self, token: &str, path: &str) -> (u16, serde_json::Value) {
        self.send(reqwest::Method::GET, token, path, None).await
    }

    /// One API request with a session and an optional JSON body; returns
    /// (status, JSON body or null).
    pub async fn send(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Waits until every submission has left processing (or `timeout`).
    pub async fn wait_settled(&self, ids: &[String], timeout: Duration) -> Vec<serde_json::Value> {
        let states = ["evaluated", "awaiting_review", "released", "failed"];
        self.wait_states(ids, timeout, &states).await
    }

    /// Waits until every submission is scored or failed (daemons with a scorer).
    pub async fn wait_scored(&self, ids: &[String], timeout: Duration) -> Vec<serde_json::Value> {
        let states = ["awaiting_review", "released", "failed"];
        self.wait_states(ids, timeout, &states).await
    }

    /// Waits until every submission is in one of `states` (or `timeout`).
    pub async fn wait_states(
        &self,
        ids: &[String],
        timeout: Duration,
        states: &[&str],
    ) -> Vec<serde_json::Value> {
        let admin = self.token(Role::Admin, "test-admin", "sandbox");
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = Vec::new();
            for id in ids {
                let (_, v) = self.get(&admin, &format!("/api/v1/submissions/{id}")).await;
                all.push(v);
            }
            let settled = all
                .iter()
                .all(|v| v["state"].as_str().is_some_and(|s| states.contains(&s)));
            if settled {
                return all;
            }
            if Instant::now() > deadline {
                panic!(
                    "submissions did not settle within {timeout:?}: {:?}",
                    all.iter()
                        .map(|v| (v["id"].clone(), v["state"].clone()))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The fake workers' event log, in order.
    pub fn fake_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.fake_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the daemon (graceful shutdown) and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }

    /// Stops the daemon and hands over its directory (data, media, logs),
    /// which then outlives it.
    pub async fn stop_keeping_files(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
        self.dir
    }
}

/// Largest number of overlapping intervals among `(start, end)` event pairs
/// read in log order: counts, not timings.
pub fn max_overlap<'a>(events: impl IntoIterator<Item = (&'a str, bool)>) -> usize {
    let mut open = std::collections::HashSet::new();
    let mut max = 0;
    for (key, is_start) in events {
        if is_start {
            open.insert(key);
            max = max.max(open.len());
        } else {
            open.remove(key);
        }
    }
    max
}
