//! Fault containment: a model that cannot load stalls nothing else. Real
//! daemon, real worker processes (the `fake-worker` test double, which fails
//! to load a model file that begins with `CORRUPT`, like a real worker on a
//! corrupt GGUF), the real `viva` CLI for the administrator's retry.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use viva_daemon::Role;
use viva_tests::{TestDaemon, real, speech, tone, viva_bin};

/// Tests that measure this process's memory or the disk's free space, or
/// use much of either, run one at a time (the harness runs two tests at
/// once, in one process, on one disk).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn upload_n(d: &TestDaemon, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        // One student each: fair-use limits are not what this test is about.
        let tok = d.token(Role::Learner, &format!("student-{i}"), "sandbox");
        let f = tone(d.dir.path(), &format!("clip-{i}.wav"), 0.5);
        let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
        assert_eq!(
            status, 201,
            "an upload is accepted while a model is down: {body}"
        );
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    ids
}

/// Polls every submission until `ok` holds for all of them (or panics).
async fn wait_until(
    d: &TestDaemon,
    ids: &[String],
    timeout: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let admin = d.token(Role::Admin, "test-admin", "sandbox");
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = Vec::new();
        for id in ids {
            all.push(d.get(&admin, &format!("/api/v1/submissions/{id}")).await.1);
        }
        if all.iter().all(&ok) {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "not every submission {what} within {timeout:?}: {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn roles_of(s: &serde_json::Value) -> Vec<String> {
    let mut r: Vec<String> = s["evaluations"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["role"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    r.sort();
    r
}

async fn readyz(d: &TestDaemon) -> (u16, String) {
    let resp = reqwest::get(format!("{}/readyz", d.url))
        .await
        .expect("readyz");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// `viva workers retry ROLE` against the running daemon, with a deadline.
async fn cli_retry(d: &TestDaemon, role: &str) -> String {
    let admin = d.token(Role::Admin, "test-admin", "sandbox");
    let mut cmd = tokio::process::Command::new(viva_bin());
    cmd.args(["workers", "retry", role, "--url", &d.url, "--token", &admin])
        .env_remove("VIVA_CONFIG")
        .current_dir(d.dir.path())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("viva workers retry finished within 30 s")
        .expect("viva workers retry ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "viva workers retry failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Rows of the jobs table for one stage and role: (submission, state).
async fn jobs_of(d: &TestDaemon, stage: &'static str, role: &'static str) -> Vec<(String, String)> {
    d.state
        .store
        .read(move |c| {
            let mut stmt = c.prepare(
                "SELECT submission_id, state FROM jobs WHERE stage = ?1 AND COALESCE(role, '') = ?2
                 ORDER BY submission_id",
            )?;
            let rows = stmt
                .query_map([stage, role], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<viva_daemon::db::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
        .expect("jobs")
}

/// A test daemon whose worker `point` aims at `model`, a file the fake
/// worker refuses to load (it begins with `CORRUPT`): the breaker opens
/// after two failed starts and is probed again only on an administrator's
/// retry during the test.
async fn with_broken_model(
    model: &std::path::Path,
    point: impl FnOnce(&mut viva_daemon::Config, std::path::PathBuf) + Send + 'static,
) -> TestDaemon {
    std::fs::write(model, b"CORRUPT: truncated download").expect("corrupt model");
    let path = model.to_path_buf();
    TestDaemon::start(&[("FAKE_STT_FIXED_MS", "50".to_owned())], move |c| {
        c.scheduler.unavailable_after_failures = 2;
        c.scheduler.unavailable_probe_max = Duration::from_secs(3600);
        c.scheduler.batch_window = Duration::from_millis(500);
        point(c, path);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_evaluator_pauses_only_its_role_until_an_admin_retries() {
    let models = tempfile::tempdir().expect("tempdir");
    let b_model = models.path().join("b.gguf");
    let d = with_broken_model(&b_model, |c, path| {
        if let Some(b) = c.workers.evaluators.get_mut("b") {
            b.model_path = path;
        }
    })
    .await;

    let ids = upload_n(&d, 5).await;
    // Every upload is transcribed and evaluated by "a"; each waits for "b"
    // with the plain reason.
    let waiting = wait_until(
        &d,
        &ids,
        Duration::from_secs(90),
        "was evaluated by a and paused",
        |s| {
            roles_of(s) == ["a"]
                && s["queue"]["paused"]
                    .as_str()
                    .is_some_and(|p| p.contains("evaluation paused") && p.contains("\"b\""))
        },
    )
    .await;
    for s in &waiting {
        assert_ne!(
            s["state"], "failed",
            "a model being down never fails a submission: {s}"
        );
        assert!(
            s["queue"]["eta_seconds"].is_null(),
            "a paused submission promises no ETA: {s}"
        );
    }

    let (status, body) = readyz(&d).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("role b is unavailable"), "{body}");
    assert!(
        !body.contains("b.gguf") && !body.contains("not a valid model file"),
        "strangers get the state, not the worker's error with its paths: {body}"
    );
    let metrics = d.state.metrics.render();
    assert!(
        metrics.contains("viva_worker_unavailable{slot=\"evaluator:b\"} 1"),
        "{metrics}"
    );
    let admin = d.token(Role::Admin, "test-admin", "sandbox");
    let (code, system) = d.get(&admin, "/api/v1/admin/system").await;
    assert_eq!(code, 200, "{system}");
    assert_eq!(system["unavailable"][0]["role"], "b", "{system}");
    assert!(
        system["unavailable"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("b.gguf")),
        "{system}"
    );
    let instructor = d.token(Role::Instructor, "teacher", "sandbox");
    let (code, dash) = d
        .get(&instructor, "/api/v1/assignments/sandbox-oral-1/dashboard")
        .await;
    assert_eq!(code, 200, "{dash}");
    assert_eq!(dash["unavailable"][0]["role"], "b", "{dash}");
    assert!(
        dash["rows"]
            .as_array()
            .is_some_and(|r| r.iter().all(|row| row["paused"].is_string())),
        "{dash}"
    );
    // An upload during the outage is still transcribed and evaluated by "a"
    // (the scheduler does not sit in the evaluation phase for "b").
    let late = upload_n(&d, 1).await;
    wait_until(
        &d,
        &late,
        Duration::from_secs(60),
        "was evaluated by a",
        |s| roles_of(s) == ["a"],
    )
    .await;

    // The fix: a good model file, then the administrator's retry.
    std::fs::write(&b_model, b"GGUF fixed").expect("fix the model");
    let said = cli_retry(&d, "b").await;
    assert!(said.contains("trying to start it again"), "{said}");
    let all: Vec<String> = ids.iter().chain(&late).cloned().collect();
    let done = d.wait_settled(&all, Duration::from_secs(90)).await;
    for s in &done {
        assert_eq!(s["state"], "evaluated", "{s}");
        assert_eq!(
            roles_of(s),
            ["a", "b"],
            "each role evaluated it exactly once: {s}"
        );
    }
    let b_jobs = jobs_of(&d, "eval", "b").await;
    assert_eq!(b_jobs.len(), 6, "{b_jobs:?}");
    assert!(b_jobs.iter().all(|(_, st)| st == "done"), "{b_jobs:?}");
    let (status, body) = readyz(&d).await;
    assert_eq!(status, 200, "ready again once b loads: {body}");
    assert!(
        d.state
            .metrics
            .render()
            .contains("viva_worker_unavailable{slot=\"evaluator:b\"} 0")
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stt_model_queues_uploads_with_a_reason_until_retried() {
    let models = tempfile::tempdir().expect("tempdir");
    let stt_model = models.path().join("whisper.bin");
    let d = with_broken_model(&stt_model, |c, path| {
        if let Some(stt) = c.workers.stt.as_mut() {
            stt.model_path = path;
        }
    })
    .await;
    let ids = upload_n(&d, 3).await;
    let waiting = wait_until(&d, &ids, Duration::from_secs(60), "was paused", |s| {
        s["state"] == "queued"
            && s["queue"]["paused"]
                .as_str()
                .is_some_and(|p| p.contains("transcription paused"))
    })
    .await;
    assert_eq!(waiting.len(), 3);
    let (status, body) = readyz(&d).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("role stt is unavailable"), "{body}");
    // Uploads keep being accepted meanwhile.
    let more = upload_n(&d, 1).await;

    std::fs::write(&stt_model, b"ggml fixed").expect("fix the model");
    // The admin view's button posts this route.
    let admin = d.token(Role::Admin, "test-admin", "sandbox");
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/admin/workers/stt/retry", d.url))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("retry");
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["was_unavailable"], true, "{body}");
    let all: Vec<String> = ids.iter().chain(&more).cloned().collect();
    let done = d.wait_settled(&all, Duration::from_secs(90)).await;
    for s in &done {
        assert_eq!(s["state"], "evaluated", "{s}");
        assert_eq!(roles_of(s), ["a", "b"], "{s}");
    }
    let stt_jobs = jobs_of(&d, "stt", "").await;
    assert_eq!(stt_jobs.len(), 4, "{stt_jobs:?}");
    // A learner may not press the button; an unknown role is 404.
    let learner = d.token(Role::Learner, "student-0", "sandbox");
    for (tok, role, want) in [(&learner, "stt", 403), (&admin, "nope", 404)] {
        let resp = reqwest::Client::new()
            .post(format!("{}/api/v1/admin/workers/{role}/retry", d.url))
            .bearer_auth(tok)
            .send()
            .await
            .expect("retry");
        assert_eq!(resp.status().as_u16(), want, "{role}");
    }
    d.stop().await;
}

/// The worker's own error for an unavailable role, as the admin view has
/// it (empty when the role is available), and the whole view.
async fn unavailable_error(d: &TestDaemon, role: &str) -> (String, serde_json::Value) {
    let admin = d.token(Role::Admin, "test-admin", "sandbox");
    let (_, system) = d.get(&admin, "/api/v1/admin/system").await;
    let error = system["unavailable"]
        .as_array()
        .and_then(|u| u.iter().find(|x| x["role"] == role))
        .and_then(|x| x["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    (error, system)
}

/// The first `len` bytes of a real model: what a truncated download leaves.
fn truncated_copy(from: &std::path::Path, to: &std::path::Path, len: u64) {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(from)
        .expect("open model")
        .take(len)
        .read_to_end(&mut head)
        .expect("read model");
    std::fs::write(to, &head).expect("write truncated model");
}

/// Puts the real model back where the truncated one was (a link: other
/// tests on this disk measure its free space).
fn restore(real: &std::path::Path, at: &std::path::Path) {
    std::fs::remove_file(at).expect("remove the truncated model");
    std::os::unix::fs::symlink(real, at).expect("link the real model");
}

/// The real workers on really corrupt model files (truncated downloads of
/// the test models): whisper-rs and llama.cpp refuse them, the breaker opens
/// with the worker's own error, uploads wait with a reason and no ETA, and
/// once the real files are back and an administrator retries, every upload
/// is transcribed by Whisper and evaluated by llama.cpp exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_workers_on_truncated_models_pause_until_the_files_are_fixed() {
    let _heavy = HEAVY.lock().await;
    let models = tempfile::tempdir().expect("tempdir");
    let stt_model = models.path().join("whisper.bin");
    let b_model = models.path().join("b.gguf");
    truncated_copy(&real::model(real::WHISPER_MODEL), &stt_model, 1 << 20);
    truncated_copy(&real::model(real::EVALUATOR_A_MODEL), &b_model, 1 << 20);
    let (stt_path, b_path) = (stt_model.clone(), b_model.clone());
    let d = TestDaemon::start(&[], move |c| {
        c.scheduler.unavailable_after_failures = 2;
        c.scheduler.unavailable_probe_max = Duration::from_secs(3600);
        c.scheduler.batch_window = Duration::from_millis(500);
        let mut stt = real::whisper_worker();
        stt.model_path = stt_path;
        c.workers.stt = Some(stt);
        let mut b = real::llama_worker("b", real::EVALUATOR_A_MODEL, "smollm2-135m-instruct");
        b.model_path = b_path;
        c.workers.evaluators.insert("b".into(), b);
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let tok = d.token(Role::Learner, &format!("student-{i}"), "sandbox");
        let f = speech(
            d.dir.path(),
            &format!("answer-{i}.wav"),
            "Plants use sunlight, water and carbon dioxide to make glucose.",
            "en",
        );
        let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    wait_until(
        &d,
        &ids,
        Duration::from_secs(90),
        "was paused for STT",
        |s| {
            s["state"] == "queued"
                && s["queue"]["eta_seconds"].is_null()
                && s["queue"]["paused"]
                    .as_str()
                    .is_some_and(|p| p.contains("transcription paused"))
        },
    )
    .await;
    let (stt_error, system) = unavailable_error(&d, "stt").await;
    assert!(
        stt_error.contains("whisper.bin"),
        "the Whisper worker's own error names the file: {system}"
    );

    // Whisper's file is fixed first: transcripts come, "a" evaluates, and
    // each submission waits for "b" (whose GGUF is still truncated).
    restore(&real::model(real::WHISPER_MODEL), &stt_model);
    assert!(
        cli_retry(&d, "stt")
            .await
            .contains("trying to start it again")
    );
    wait_until(
        &d,
        &ids,
        Duration::from_secs(120),
        "was transcribed, evaluated by a and paused for b",
        |s| {
            roles_of(s) == ["a"]
                && s["queue"]["eta_seconds"].is_null()
                && s["queue"]["paused"]
                    .as_str()
                    .is_some_and(|p| p.contains("evaluation paused"))
        },
    )
    .await;
    let (b_error, system) = unavailable_error(&d, "b").await;
    assert!(
        b_error.contains("b.gguf"),
        "llama.cpp's refusal names the file: {system}"
    );
    let (status, body) = readyz(&d).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("role b is unavailable"), "{body}");

    restore(&real::model(real::EVALUATOR_A_MODEL), &b_model);
    assert!(
        cli_retry(&d, "b")
            .await
            .contains("trying to start it again")
    );
    let done = d.wait_settled(&ids, Duration::from_secs(240)).await;
    for s in &done {
        assert_eq!(s["state"], "evaluated", "{s}");
        assert_eq!(roles_of(s), ["a", "b"], "{s}");
        let transcript = s["transcript"]["text"]
            .as_str()
            .or_else(|| s["transcript"].as_str())
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            transcript.contains("glucose"),
            "Whisper transcribed it: {s}"
        );
    }
    let b_jobs = jobs_of(&d, "eval", "b").await;
    assert_eq!(b_jobs.len(), 2, "{b_jobs:?}");
    assert!(b_jobs.iter().all(|(_, st)| st == "done"), "{b_jobs:?}");
    let (status, body) = readyz(&d).await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}

/// An ffmpeg that logs each preview transcode and holds the one of the
/// submission named in `slow-id` until `gate` exists (at most 60 s).
fn gated_ffmpeg(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("ffmpeg-wrapper.sh");
    let d = dir.display();
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
case "$*" in
  *preview.tmp.mp4*)
    echo "$*" >> "{d}/previews.log"
    slow=$(cat "{d}/slow-id" 2>/dev/null)
    if [ -n "$slow" ]; then
      case "$*" in
        *"$slow"*) i=0; while [ ! -e "{d}/gate" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done ;;
      esac
    fi ;;
esac
exec ffmpeg "$@"
"#
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

fn preview_runs(dir: &std::path::Path, id: &str) -> usize {
    std::fs::read_to_string(dir.join("previews.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_preview_runs_ffmpeg_once_and_blocks_no_other_preview() {
    let tools = tempfile::tempdir().expect("tempdir");
    let wrapper = gated_ffmpeg(tools.path());
    let d = TestDaemon::start(&[], move |c| c.intake.ffmpeg = wrapper).await;
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let bob = d.token(Role::Learner, "bob", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let mut ids = Vec::new();
    for (tok, name) in [(&alice, "bad.mkv"), (&bob, "good.mkv")] {
        let f = viva_tests::video(&media, name, 1.0, true);
        let (s, sub) = d.upload(tok, "sandbox-oral-1", &f).await;
        assert_eq!(s, 201, "{sub}");
        ids.push(sub["id"].as_str().expect("id").to_owned());
    }
    let (bad, good) = (ids[0].clone(), ids[1].clone());
    // The stored original of `bad` is damaged after intake.
    let bad_dir = d.dir.path().join("var/media").join(&bad);
    let mut damaged = 0;
    for e in std::fs::read_dir(&bad_dir).expect("media dir").flatten() {
        if e.path().extension().is_some_and(|x| x == "mkv") {
            std::fs::write(e.path(), b"CORRUPT\0not a matroska file at all").expect("damage");
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "the original is stored as .mkv");
    std::fs::write(tools.path().join("slow-id"), &bad).expect("slow id");

    let client = reqwest::Client::new();
    let preview = |id: &str, tok: &str| {
        client
            .get(format!("{}/api/v1/submissions/{id}/preview", d.url))
            .bearer_auth(tok)
            .send()
    };
    let mut views = Vec::new();
    for _ in 0..50 {
        let req = preview(&bad, &alice);
        views.push(tokio::spawn(async move {
            let r = req.await.expect("preview");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while preview_runs(tools.path(), &bad) == 0 {
        assert!(
            Instant::now() < deadline,
            "the transcode of bad never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile the instructor's preview of another submission is served.
    let r = tokio::time::timeout(Duration::from_secs(60), preview(&good, &teacher))
        .await
        .expect("the other preview is not held up")
        .expect("preview");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-viva-preview"], "transcoded");
    assert!(
        views.iter().all(|v| !v.is_finished()),
        "served while bad's transcode was still running"
    );
    std::fs::write(tools.path().join("gate"), b"open").expect("open the gate");
    for v in views {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), v)
            .await
            .expect("the view answered")
            .expect("join");
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot be converted")),
            "{body}"
        );
    }
    assert_eq!(
        preview_runs(tools.path(), &bad),
        1,
        "ffmpeg ran once for 50 views"
    );
    assert!(
        bad_dir.join("preview.failed").exists(),
        "the failure is remembered"
    );
    // A later view answers from the remembered failure.
    let r = preview(&bad, &teacher).await.expect("preview");
    assert_eq!(r.status(), 503);
    assert_eq!(preview_runs(tools.path(), &bad), 1);
    d.stop().await;
}

/// Free bytes of the filesystem holding `path` (`df`, with a deadline).
async fn free_bytes(path: &std::path::Path) -> u64 {
    let mut cmd = tokio::process::Command::new("df");
    cmd.args(["-B1", "--output=avail"])
        .arg(path)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("df finished")
        .expect("df ran");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

/// Bytes under `dir`, recursively.
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_learner_cannot_hog_intake_and_uploads_never_cross_the_disk_reserve() {
    let _heavy = HEAVY.lock().await;
    const MIB: u64 = 1024 * 1024;
    let base = tempfile::tempdir().expect("tempdir");
    // The reserve is set just below the free space: 160 MiB may be written.
    let budget = 160 * MIB;
    let min_free = free_bytes(base.path()).await.saturating_sub(budget);
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", "50".to_owned())], move |c| {
        c.intake.min_free_bytes = min_free;
        c.intake.max_uploads_per_user = 2;
    })
    .await;
    let hog = d.token(Role::Learner, "hog", "sandbox");
    let url = format!("{}/api/v1/assignments/sandbox-oral-1/submissions", d.url);
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let chunk = vec![0u8; MIB as usize];
    let mut uploads = Vec::new();
    for i in 0..20 {
        // 200 MiB, chunked (no Content-Length): one chunk, then the rest
        // once the gate opens, so the admitted uploads are still running
        // while every other one is answered.
        let gate = gate_rx.clone();
        let chunk = chunk.clone();
        let body = futures::stream::unfold(0u32, move |n| {
            let chunk = chunk.clone();
            let mut gate = gate.clone();
            async move {
                if n >= 200 {
                    return None;
                }
                if n == 1 {
                    let _ = gate.wait_for(|open| *open).await;
                }
                Some((Ok::<_, std::io::Error>(chunk), n + 1))
            }
        });
        let req = reqwest::Client::new()
            .post(&url)
            .query(&[("filename", format!("hog-{i}.webm"))])
            .bearer_auth(&hog)
            .body(reqwest::Body::wrap_stream(body));
        uploads.push(tokio::spawn(async move {
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    (status, retry, body)
                }
                Err(e) => (0, None, serde_json::json!({ "transport": e.to_string() })),
            }
        }));
    }
    // 18 are refused at once, before a byte is written.
    let staging = d.dir.path().join("var/staging");
    let deadline = Instant::now() + Duration::from_secs(60);
    while uploads.iter().filter(|u| u.is_finished()).count() < 18 {
        assert!(Instant::now() < deadline, "the refusals did not come");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = uploads.iter().filter(|u| !u.is_finished()).count();
    let mut peak = bytes_under(&staging);
    gate_tx.send_replace(true);
    let mut results = Vec::new();
    for u in uploads {
        let fut = async {
            let mut u = u;
            loop {
                tokio::select! {
                    r = &mut u => return r.expect("join"),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        peak = peak.max(bytes_under(&staging));
                    }
                }
            }
        };
        results.push(
            tokio::time::timeout(Duration::from_secs(120), fut)
                .await
                .expect("an upload answered"),
        );
    }
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(running, 2, "two ran at once");
    assert_eq!(refused.len(), 18, "{results:?}");
    for (_, retry, body) in &refused {
        assert_eq!(body["error"]["code"], "too_many_uploads", "{body}");
        assert!(
            retry
                .as_deref()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s > 0),
            "Retry-After: {retry:?}"
        );
    }
    // The two admitted ones ran into the reserve and stopped there.
    let full: Vec<_> = results.iter().filter(|r| r.0 == 507).collect();
    assert_eq!(full.len(), 2, "{results:?}");
    eprintln!(
        "peak staged: {} MiB of a {} MiB budget",
        peak / MIB,
        budget / MIB
    );
    assert!(peak > 0, "the admitted uploads were written");
    assert!(
        peak <= budget + 8 * MIB,
        "staged {} MiB with a budget of {} MiB",
        peak / MIB,
        budget / MIB
    );
    assert_eq!(bytes_under(&staging), 0, "nothing half-written is left");
    assert_eq!(d.state.intake.in_flight(), 0);
    assert_eq!(d.state.intake.reserve.claimed(), 0);
    // The database is intact and intake works for everyone else.
    let ids = upload_n(&d, 1).await;
    let done = d.wait_settled(&ids, Duration::from_secs(90)).await;
    assert_eq!(done[0]["state"], "evaluated", "{}", done[0]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_byte_quota_refuses_with_retry_after_and_writes_nothing() {
    let d = TestDaemon::start(&[], |c| c.intake.max_bytes_per_user_per_day = 1).await;
    let tok = d.token(Role::Learner, "quota", "sandbox");
    let f = tone(d.dir.path(), "first.wav", 0.5);
    let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
    assert_eq!(status, 201, "{body}");
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/assignments/sandbox-oral-1/submissions?filename=second.wav",
            d.url
        ))
        .bearer_auth(&tok)
        .body(std::fs::read(&f).expect("read"))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry > 0 && retry <= 24 * 3600, "{retry}");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "daily_quota", "{body}");
    let subs: i64 = d
        .state
        .store
        .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM submissions", [], |r| r.get(0))?))
        .await
        .expect("count");
    assert_eq!(subs, 1, "the refused upload left nothing");
    // Another student is not affected.
    let other = d.token(Role::Learner, "other", "sandbox");
    assert_eq!(d.upload(&other, "sandbox-oral-1", &f).await.0, 201);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticket_floods_are_rate_limited_and_bounded() {
    let _heavy = HEAVY.lock().await;
    let d = TestDaemon::start(&[], |c| {
        c.limits.tickets_per_user_per_minute = 100;
        // Everyone here is 127.0.0.1: only the per-user limit is under test.
        c.limits.tickets_per_ip_per_minute = 0;
        c.limits.max_streams_per_user = 3;
    })
    .await;
    let tok = d.token(Role::Learner, "flooder", "sandbox");
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/tickets", d.url);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (client, url, tok) = (client.clone(), url.clone(), tok.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in (w..10_000).step_by(16) {
                let r = client
                    .post(&url)
                    .bearer_auth(&tok)
                    .json(&serde_json::json!({"scope": "events"}))
                    .send()
                    .await
                    .expect("ticket");
                let retry = r.headers().get("retry-after").is_some();
                out.push((r.status().as_u16(), retry));
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(
            tokio::time::timeout(Duration::from_secs(300), t)
                .await
                .expect("the flood finished")
                .expect("join"),
        );
    }
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited = results.iter().filter(|r| r.0 == 429 && r.1).count();
    assert_eq!(
        ok + limited,
        10_000,
        "every answer is 200 or 429 with Retry-After"
    );
    assert!(
        (100..=110).contains(&ok),
        "about one minute's allowance: {ok}"
    );
    let held: i64 = d
        .state
        .store
        .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM tickets", [], |r| r.get(0))?))
        .await
        .expect("tickets");
    assert!(
        held as usize <= viva_daemon::TICKETS_PER_USER,
        "unredeemed tickets are bounded: {held}"
    );
    // Another user is not affected.
    let other = d.token(Role::Learner, "calm", "sandbox");
    let r = client
        .post(&url)
        .bearer_auth(&other)
        .json(&serde_json::json!({"scope": "events"}))
        .send()
        .await
        .expect("ticket");
    assert_eq!(r.status().as_u16(), 200);

    // Live status streams: three per user, the fourth is refused until one closes.
    let events = format!("{}/api/v1/events", d.url);
    let mut open = Vec::new();
    for _ in 0..3 {
        let r = client
            .get(&events)
            .bearer_auth(&other)
            .send()
            .await
            .expect("events");
        assert_eq!(r.status().as_u16(), 200);
        open.push(r);
    }
    let r = client
        .get(&events)
        .bearer_auth(&other)
        .send()
        .await
        .expect("events");
    assert_eq!(r.status().as_u16(), 429);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .get(&events)
            .bearer_auth(&other)
            .send()
            .await
            .expect("events");
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream gives its place back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Open streams would hold the graceful shutdown.
    drop(open);
    drop(client);
    tokio::time::timeout(Duration::from_secs(60), d.stop())
        .await
        .expect("the daemon stopped");
}

/// This process's resident set (the in-process daemon's, with the test's).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_login_floods_stay_bounded_and_real_logins_work() {
    let _heavy = HEAVY.lock().await;
    let d = TestDaemon::start(&[], |c| {
        c.public_url = Some("https://viva.example.edu".into());
        // The login-state store's own bounds are under test, not the rate limit.
        c.limits.login_per_ip_per_minute = 0;
    })
    .await;
    let admin = d.token(Role::Admin, "root", "sandbox");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let reg = serde_json::json!({
        "issuer": "https://moodle.example.edu",
        "client_id": "abc",
        "name": "Moodle",
        "auth_login_url": "https://moodle.example.edu/mod/lti/auth.php",
        "auth_token_url": "https://moodle.example.edu/mod/lti/token.php",
        "key_set_url": "https://moodle.example.edu/mod/lti/certs.php",
        "deployments": ["1"],
    });
    let r = client
        .post(format!("{}/api/v1/admin/platforms", d.url))
        .bearer_auth(&admin)
        .json(&reg)
        .send()
        .await
        .expect("add platform");
    assert_eq!(
        r.status().as_u16(),
        201,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let login = |hint: String, message: String| {
        client
            .get(format!("{}/lti/login", d.url))
            .query(&[
                ("iss", "https://moodle.example.edu"),
                ("client_id", "abc"),
                ("target_link_uri", "https://viva.example.edu/lti/launch"),
                ("login_hint", hint.as_str()),
                ("lti_message_hint", message.as_str()),
            ])
            .send()
    };
    let real = login("2".into(), "m".into()).await.expect("login");
    assert_eq!(
        real.status().as_u16(),
        302,
        "a real login works before the flood"
    );
    let before = rss_bytes();
    let big = "x".repeat(4000);
    let mut tasks = Vec::new();
    for w in 0..16usize {
        let (client, url, big) = (client.clone(), d.url.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            let mut codes = HashMap::new();
            for i in (w..100_000).step_by(16) {
                let r = client
                    .get(format!("{url}/lti/login"))
                    .query(&[
                        ("iss", "https://moodle.example.edu"),
                        ("client_id", "abc"),
                        ("target_link_uri", "https://viva.example.edu/lti/launch"),
                        ("login_hint", big.as_str()),
                        (
                            "lti_message_hint",
                            &big[..if i % 2 == 0 { 3000 } else { 4000 }],
                        ),
                    ])
                    .send()
                    .await
                    .expect("forged login");
                *codes.entry(r.status().as_u16()).or_insert(0usize) += 1;
            }
            codes
        }));
    }
    let mut codes: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        let c = tokio::time::timeout(Duration::from_secs(500), t)
            .await
            .expect("the flood finished")
            .expect("join");
        for (k, v) in c {
            *codes.entry(k).or_default() += v;
        }
    }
    let growth = rss_bytes().saturating_sub(before);
    eprintln!(
        "forged logins: {codes:?}; RSS growth {} MiB",
        growth / (1024 * 1024)
    );
    assert_eq!(codes.values().sum::<usize>(), 100_000);
    assert!(
        growth < 64 * 1024 * 1024,
        "RSS grew by {} MiB",
        growth / (1024 * 1024)
    );
    let real = login("2".into(), "m".into()).await.expect("login");
    assert_eq!(
        real.status().as_u16(),
        302,
        "a real login still works after the flood"
    );
    let location = real.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(location.contains("state="), "{location}");
    d.stop().await;
}

/// Reads from a raw connection until the server closes it (or `deadline`
/// passes: then the test fails); returns what the server sent.
async fn read_until_closed(conn: &mut tokio::net::TcpStream, deadline: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open past {deadline:?}; it sent: {}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Slow clients hold nothing: connections that send nothing, or their
/// headers a few bytes at a time, are closed after `header_read_timeout`,
/// while other clients are served; an upload whose body stops is cut with
/// 408 `upload_stalled` after `body_idle_timeout`, and the student's upload
/// place is given back (their next upload, with one place, is accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_hold_nothing() {
    use tokio::io::AsyncWriteExt;
    let d = TestDaemon::start(&[], |c| {
        c.limits.header_read_timeout = Duration::from_secs(1);
        c.intake.body_idle_timeout = Duration::from_secs(1);
        c.intake.max_uploads_per_user = 1;
    })
    .await;
    let addr = d.url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // Meanwhile everyone else is served.
    let ok = reqwest::get(format!("{}/healthz", d.url))
        .await
        .expect("healthz");
    assert_eq!(ok.status().as_u16(), 200);
    let started = Instant::now();
    // One more header line a little later: dribbling bytes does not reset the clock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = slow.write_all(b"X-Slow: 1\r\n").await;
    let sent = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(
        !String::from_utf8_lossy(&sent).contains("200 OK"),
        "a request whose headers never ended was answered"
    );
    for conn in &mut idle {
        read_until_closed(conn, Duration::from_secs(10)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "idle connections were closed late: {:?}",
        started.elapsed()
    );

    // A stalled upload body: headers promise 1 MB, 16 bytes come, then nothing.
    let tok = d.token(Role::Learner, "slowpoke", "sandbox");
    let mut up = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/v1/assignments/sandbox-oral-1/submissions?filename=a.wav HTTP/1.1\r\n\
         Host: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 1000000\r\n\r\nRIFF....WAVEfmt "
    );
    up.write_all(head.as_bytes()).await.expect("write");
    let answer =
        String::from_utf8_lossy(&read_until_closed(&mut up, Duration::from_secs(15)).await)
            .into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("upload_stalled"), "{answer}");
    // The place is back: the same student (one place) uploads at once.
    let f = tone(d.dir.path(), "after.wav", 0.5);
    let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
    assert_eq!(status, 201, "{body}");
    d.stop().await;
}
