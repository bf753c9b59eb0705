//! Durability: the real `viva serve` process is killed with SIGKILL in the
//! middle of a phase, restarted, and every accepted submission still reaches
//! exactly one final state. The kill also takes the worker processes down
//! (PR_SET_PDEATHSIG), so no model stays loaded.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use viva_tests::process::{Daemon, SHORT, STARTUP, clean_viva_env, output};
use viva_tests::{fake_worker, tone, viva_bin};

/// The configuration; `listen` is left out: each start gets a port of its
/// own (the helper sets `VIVA_LISTEN=127.0.0.1:0`) and the test reads the
/// address the daemon announces, restarts included.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let log = dir.join("fake.log");
    let worker = fake_worker();
    let env = format!(
        "env = {{ FAKE_LOG = \"{}\", FAKE_STT_FIXED_MS = \"250\", FAKE_EVAL_FIXED_MS = \"300\" }}",
        log.display()
    );
    let config = format!(
        r#"data_dir = "{data}"

[sandbox]
enabled = true

[intake]
min_free_bytes = 67108864

[scheduler]
stt_batch_size = 8
batch_window = "5s"
# Fake workers' instant work never pays for a swap: switch at once.
swap_work_ratio = 0
retry_backoff = "100ms"
lease = "5s"

[workers]
stop_grace = "2s"

[workers.stt]
command = "{worker}"
args = ["--kind", "stt"]
model = "fake-stt"
model_path = "/dev/null"
{env}

[workers.evaluators.a]
command = "{worker}"
args = ["--kind", "evaluator"]
model = "fake-a"
model_path = "/dev/null"
{env}

[workers.evaluators.b]
command = "{worker}"
args = ["--kind", "evaluator"]
model = "fake-b"
model_path = "/dev/null"
{env}
"#,
        data = dir.join("var").display(),
        worker = worker.display(),
    );
    let path = dir.join("viva.toml");
    std::fs::write(&path, config).expect("config");
    path
}

/// `viva command args…` with this test's configuration and no `VIVA_*`
/// variable from the caller's environment.
fn viva(config: &Path) -> Command {
    let mut cmd = Command::new(viva_bin());
    clean_viva_env(&mut cmd).arg("--config").arg(config);
    cmd
}

/// `viva serve`, once it announces its address; killed (and its log
/// printed if the test fails) when dropped.
fn start(config: &Path) -> Daemon {
    Daemon::start(viva(config).arg("serve"), STARTUP).unwrap_or_else(|e| panic!("{e}"))
}

async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{url}/healthz")).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("viva did not become healthy at {url}");
}

fn session(config: &Path) -> String {
    let out = output(
        viva(config).args([
            "session",
            "--role",
            "admin",
            "--user",
            "crash-admin",
            "--context",
            "sandbox",
        ]),
        SHORT,
    )
    .expect("viva session");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn worker_pids(log: &Path) -> Vec<u32> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["ev"] == "start")
        .filter_map(|e| e["pid"].as_u64().map(|p| p as u32))
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes: its memory is already returned.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn stt_jobs_done(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"job_end\"") && l.contains("\"stt\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_phase_loses_nothing_and_grades_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let log = dir.path().join("fake.log");

    let mut daemon = start(&config);
    let url = daemon.url();
    wait_healthy(&url).await;
    let token = session(&config);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let f = tone(
            dir.path(),
            &format!("student{i:02}.wav"),
            0.5 + (i % 3) as f64 * 0.5,
        );
        let r = http
            .post(format!(
                "{url}/api/v1/assignments/sandbox-oral-1/submissions"
            ))
            .bearer_auth(&token)
            .body(std::fs::read(&f).expect("read"))
            .send()
            .await
            .expect("upload");
        assert_eq!(r.status().as_u16(), 201);
        let v: serde_json::Value = r.json().await.expect("json");
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    // Kill it in the middle of the first STT phase.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stt_jobs_done(&log) < 3 {
        assert!(Instant::now() < deadline, "STT never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill().unwrap_or_else(|e| panic!("{e}"));
    // The workers die with it.
    let pids = worker_pids(&log);
    assert!(!pids.is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in &pids {
        assert!(!alive(*p), "worker {p} outlived the killed daemon");
    }

    // Restart; kill again during the evaluation phase, then let it finish.
    let mut daemon = start(&config);
    let url = daemon.url();
    wait_healthy(&url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = std::fs::read_to_string(&log).unwrap_or_default();
        if events.contains("\"evaluator\"") && events.contains("\"job_start\"") {
            break;
        }
        assert!(Instant::now() < deadline, "evaluation never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill().unwrap_or_else(|e| panic!("{e}"));

    let mut daemon = start(&config);
    let url = daemon.url();
    wait_healthy(&url).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let finals = loop {
        let mut states = Vec::new();
        for id in &ids {
            let r = http
                .get(format!("{url}/api/v1/submissions/{id}"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("get");
            assert_eq!(r.status().as_u16(), 200, "submission {id} was lost");
            let v: serde_json::Value = r.json().await.expect("json");
            states.push(v);
        }
        // `viva serve` scores with the default rubric plugin; the sandbox
        // releases manually, so every submission ends awaiting review.
        if states.iter().all(|v| v["state"] == "awaiting_review") {
            break states;
        }
        assert!(
            Instant::now() < deadline,
            "not all settled: {:?}",
            states
                .iter()
                .map(|v| v["state"].clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Graceful stop (SIGTERM) exits cleanly.
    let status = daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "SIGTERM → clean exit, got {status}");

    // Exactly one result per stage: one transcript, one evaluation per role,
    // one score.
    let db = rusqlite::Connection::open(dir.path().join("var/viva.db")).expect("db");
    for (v, id) in finals.iter().zip(&ids) {
        assert!(v["transcript"]["text"].as_str().is_some(), "{id}");
        assert_eq!(v["evaluations"].as_array().map(Vec::len), Some(2), "{id}");
        assert_eq!(v["score"]["total"], 8.0, "{id}: {v}");
        assert_eq!(v["score"]["report"]["plugin"]["name"], "weighted-criteria");
        let (done, other): (i64, i64) = db
            .query_row(
                "SELECT SUM(state = 'done'), SUM(state != 'done') FROM jobs WHERE submission_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("jobs");
        assert_eq!(
            (done, other),
            (4, 0),
            "{id}: one STT + two evaluations + one score, all done"
        );
    }
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM submissions", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 20, "no submission lost or duplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viva_submit_follows_a_submission_to_its_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut daemon = start(&config);
    wait_healthy(&daemon.url()).await;
    let f = viva_tests::speech(
        dir.path(),
        "answer.wav",
        "Photosynthesis turns light into chemical energy.",
        "en-us",
    );
    let url = daemon.url();
    let out = tokio::task::spawn_blocking(move || {
        output(
            viva(&config).arg("submit").arg(&f).args(["--url", &url]),
            Duration::from_secs(300),
        )
    })
    .await
    .expect("join")
    .expect("viva submit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("uploaded answer.wav"), "{stderr}");
    assert!(stderr.contains("STT phase"), "progress is shown: {stderr}");
    assert!(stdout.contains(": awaiting_review"), "{stdout}");
    assert!(
        stdout.contains("transcript: fake transcript of"),
        "{stdout}"
    );
    daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}
