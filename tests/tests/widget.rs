//! The web widget against the real daemon: its embedded assets and headers,
//! the instructor/admin APIs behind it (roles, override, audit, retry,
//! release-all, previews), and the three views in real headless Chromium
//! (Debian's chromium + chromedriver through selenium, `tests/widget/widget.py`),
//! with axe-core accessibility checks and screenshots saved as artifacts
//! under `<target>/widget-artifacts/<test>/`.
//!
//! Browser tests skip (saying so) without chromium, chromedriver, the
//! selenium venv or axe-core, unless `VIVA_REQUIRE_BROWSER` is set, as
//! `scripts/test` does. The recording test uses the real Whisper worker and
//! model; it skips without the model unless `VIVA_MODELS_DIR` is set (as
//! `scripts/test` does after fetching it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use viva_daemon::Role;
use viva_tests::process::{SHORT, output};
use viva_tests::{TestDaemon, bin_dir, speech, tone, video};

// ---- helpers -------------------------------------------------------------------------

fn cache_dir() -> PathBuf {
    std::env::var("VIVA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/viva")
        })
}

fn required() -> bool {
    std::env::var_os("VIVA_REQUIRE_BROWSER").is_some()
}

/// Python with selenium, chromium, chromedriver and axe-core, or `None` (skip).
struct Browser {
    python: PathBuf,
    axe: PathBuf,
}

fn browser() -> Option<Browser> {
    let python = std::env::var("VIVA_LTI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("lti-venv/bin/python"));
    let axe = std::env::var("VIVA_AXE_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("axe-core-4.10.3/axe.min.js"));
    let missing: Vec<&str> = [
        (!python.exists()).then_some("the selenium venv (scripts/lib.sh ensure_lti_platform)"),
        (!Path::new("/usr/bin/chromium").exists()).then_some("chromium (apt-get install chromium)"),
        (!Path::new("/usr/bin/chromedriver").exists())
            .then_some("chromedriver (apt-get install chromium-driver)"),
        (!axe.exists()).then_some("axe-core (scripts/lib.sh ensure_axe)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Some(Browser { python, axe });
    }
    if required() {
        panic!("the widget browser tests need: {}", missing.join(", "));
    }
    eprintln!("SKIPPED: missing {}", missing.join(", "));
    None
}

/// Where a test's screenshots go (kept after the run).
fn artifacts(test: &str) -> PathBuf {
    let dir = bin_dir().join("widget-artifacts").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("artifact dir");
    eprintln!("screenshots: {}", dir.display());
    dir
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("widget/widget.py")
}

/// Runs a scenario; returns its JSON report (asserting it passed).
async fn scenario(b: &Browser, d: &TestDaemon, name: &str, out: &Path, extra: &[String]) -> Value {
    let mut cmd = Command::new(&b.python);
    cmd.arg(script())
        .arg(name)
        .args(["--base", &d.url])
        .arg("--axe")
        .arg(&b.axe)
        .arg("--out")
        .arg(out)
        .args(extra);
    let started = Instant::now();
    // Off the runtime's threads: the daemon under test serves meanwhile.
    // After 5 minutes the driver and its browser are killed.
    let out = tokio::task::spawn_blocking(move || output(&mut cmd, Duration::from_secs(300)))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("the {name} browser scenario: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap_or_else(|_| {
            panic!(
                "{name}: no JSON report\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!(
        "{name} took {:.1} s: {report}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(report["ok"], true, "{name} failed: {}", report["error"]);
    assert!(
        report["console"].as_array().is_some_and(|c| c.is_empty()),
        "{report}"
    );
    report
}

async fn fast_daemon(extra_env: &[(&str, String)]) -> TestDaemon {
    let mut env = vec![
        ("FAKE_STT_FIXED_MS", "1200".to_owned()),
        ("FAKE_EVAL_FIXED_MS", "1500".to_owned()),
    ];
    env.extend(extra_env.iter().map(|(k, v)| (*k, v.clone())));
    TestDaemon::start_scoring(&env, |_| {}).await
}

async fn send(
    d: &TestDaemon,
    method: &str,
    token: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut r = c
        .request(method.parse().expect("method"), format!("{}{path}", d.url))
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// A criterion's points in a stored score (`{total, …, report: {criteria}}`).
fn points_of(score: &Value, criterion: &str) -> f64 {
    score["report"]["criteria"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["criterion_id"] == criterion))
        .and_then(|c| c["points"].as_f64())
        .unwrap_or(-1.0)
}

// ---- assets and headers ------------------------------------------------------------------

#[tokio::test]
async fn assets_are_embedded_small_and_served_with_a_strict_policy() {
    let d = TestDaemon::start(&[], |_| {}).await;
    let c = reqwest::Client::new();
    let page = c.get(format!("{}/app", d.url)).send().await.expect("app");
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for part in [
        "default-src 'none'",
        "script-src 'self' 'nonce-",
        "style-src 'self';",
        "frame-ancestors 'self'",
        "media-src 'self' blob: mediastream:",
    ] {
        assert!(csp.contains(part), "{part} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "no unsafe-inline/eval: {csp}");
    let html = page.text().await.expect("html");
    assert!(!html.contains("<script>"), "every script carries the nonce");
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("nonce");
    assert!(html.contains(&format!("nonce=\"{nonce}\"")));
    let v = viva_daemon::widget::version();
    assert!(html.contains(&format!("/widget/{v}/app.js")), "{html}");

    // Every asset: right type, cached for a year under its versioned URL, 304 on revalidation.
    let mut raw = Vec::new();
    for (name, bytes) in viva_daemon::widget::assets() {
        let r = c
            .get(format!("{}/widget/{v}/{name}", d.url))
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status(), 200, "{name}");
        let h = r.headers().clone();
        let ct = h["content-type"].to_str().unwrap_or_default();
        assert!(
            if name.ends_with(".css") {
                ct.starts_with("text/css")
            } else {
                ct.starts_with("text/javascript")
            },
            "{name}: {ct}"
        );
        assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let etag = h["etag"].to_str().expect("etag").to_owned();
        assert_eq!(r.bytes().await.expect("body").as_ref(), bytes);
        let again = c
            .get(format!("{}/widget/{v}/{name}", d.url))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("revalidate");
        assert_eq!(again.status(), 304, "{name}");
        raw.extend_from_slice(bytes);
    }
    let stale = c
        .get(format!("{}/widget/0000000000000000/app.js", d.url))
        .send()
        .await
        .expect("old version");
    assert_eq!(
        stale.headers()["cache-control"],
        "no-cache",
        "old URLs are not cached"
    );
    let missing = c
        .get(format!("{}/widget/{v}/nope.js", d.url))
        .send()
        .await
        .expect("missing");
    assert_eq!(missing.status(), 404);

    // Size budget: all JS and CSS, gzipped, under 150 KB.
    let tmp = d.dir.path().join("all-assets");
    std::fs::write(&tmp, &raw).expect("write");
    let gz = output(Command::new("gzip").args(["-9", "-c"]).arg(&tmp), SHORT).expect("gzip");
    eprintln!(
        "widget assets: {} bytes, {} bytes gzipped",
        raw.len(),
        gz.stdout.len()
    );
    assert!(
        gz.stdout.len() < 150 * 1024,
        "{} bytes gzipped",
        gz.stdout.len()
    );

    // No third-party origin anywhere in the assets.
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.contains("http://") && !text.contains("https://"),
        "assets must not load anything from elsewhere"
    );
    d.stop().await;
}

// ---- the APIs behind the views ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_apis_check_roles_and_record_every_change() {
    let d = fast_daemon(&[]).await;
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let bob = d.token(Role::Learner, "bob", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let stranger = d.token(Role::Instructor, "other-teacher", "other-course");
    let admin = d.token(Role::Admin, "root", "sandbox");

    let (s, a) = d
        .upload(&alice, "sandbox-oral-1", &tone(&media, "alice.wav", 2.0))
        .await;
    assert_eq!(s, 201, "{a}");
    let (s, b) = d
        .upload(
            &bob,
            "sandbox-oral-1",
            &tone(&media, "fail-always.wav", 1.0),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (aid, bid) = (
        a["id"].as_str().expect("id").to_owned(),
        b["id"].as_str().expect("id").to_owned(),
    );
    let done = d
        .wait_scored(&[aid.clone(), bid.clone()], Duration::from_secs(60))
        .await;
    assert_eq!(done[0]["state"], "awaiting_review", "{}", done[0]);
    assert_eq!(done[1]["state"], "failed", "{}", done[1]);

    // Learners reach none of the instructor routes (even for their own
    // submission); another course's instructor sees nothing.
    let ov = json!({"criteria": [{"criterion_id": "content", "points": 4, "feedback": "Great"}], "note": "re-listened"});
    for (tok, code) in [(&alice, 403), (&stranger, 404)] {
        assert_eq!(
            send(
                &d,
                "POST",
                tok,
                &format!("/api/v1/submissions/{aid}/override"),
                Some(ov.clone())
            )
            .await
            .0,
            code
        );
        assert_eq!(
            send(
                &d,
                "POST",
                tok,
                &format!("/api/v1/submissions/{aid}/retry"),
                None
            )
            .await
            .0,
            code
        );
        assert_eq!(
            send(
                &d,
                "GET",
                tok,
                &format!("/api/v1/submissions/{aid}/audit"),
                None
            )
            .await
            .0,
            code
        );
    }
    for path in [
        "/api/v1/assignments/sandbox-oral-1/dashboard",
        "/api/v1/assignments/sandbox-oral-1/roster",
    ] {
        assert_eq!(send(&d, "GET", &alice, path, None).await.0, 403, "{path}");
        assert_eq!(
            send(&d, "GET", &stranger, path, None).await.0,
            404,
            "{path}"
        );
    }
    assert_eq!(
        send(
            &d,
            "POST",
            &alice,
            "/api/v1/assignments/sandbox-oral-1/release-all",
            None
        )
        .await
        .0,
        403
    );
    for path in [
        "/api/v1/admin/system",
        "/api/v1/admin/audit",
        "/api/v1/admin/plugin-failures",
    ] {
        assert_eq!(send(&d, "GET", &teacher, path, None).await.0, 403, "{path}");
        assert_eq!(send(&d, "GET", &admin, path, None).await.0, 200, "{path}");
    }
    // Learners see neither grade nor evaluations before release.
    let (_, mine) = d.get(&alice, &format!("/api/v1/submissions/{aid}")).await;
    assert!(
        mine["score"].is_null() && mine["evaluations"].as_array().is_some_and(|e| e.is_empty()),
        "{mine}"
    );

    // Dashboard: both rows, names, the failure in plain words.
    let (s, dash) = send(
        &d,
        "GET",
        &teacher,
        "/api/v1/assignments/sandbox-oral-1/dashboard",
        None,
    )
    .await;
    assert_eq!(s, 200, "{dash}");
    let rows = dash["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    let failed = rows
        .iter()
        .find(|r| r["submission_id"] == bid.as_str())
        .expect("bob's row");
    assert!(
        failed["failure_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("retry"),
        "{failed}"
    );
    let (_, roster) = send(
        &d,
        "GET",
        &teacher,
        "/api/v1/assignments/sandbox-oral-1/roster",
        None,
    )
    .await;
    assert!(
        roster.as_array().is_some_and(|r| r
            .iter()
            .any(|m| m["user_id"] == "alice" && m["submitted"] == true)),
        "{roster}"
    );

    // Override: validated, applied, total recomputed, audited with who and what.
    let bad = json!({"criteria": [{"criterion_id": "content", "points": 99}]});
    let (s, e) = send(
        &d,
        "POST",
        &teacher,
        &format!("/api/v1/submissions/{aid}/override"),
        Some(bad),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("points_out_of_range")),
        "{e}"
    );
    let (s, r) = send(
        &d,
        "POST",
        &teacher,
        &format!("/api/v1/submissions/{aid}/override"),
        Some(ov.clone()),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(points_of(&r["score"], "content"), 4.0);
    assert_eq!(r["score"]["total"], 12.0, "2×4 + 2 + 2: {r}");
    let (s, e) = send(
        &d,
        "POST",
        &teacher,
        &format!("/api/v1/submissions/{aid}/override"),
        Some(ov.clone()),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("nothing_changed"))
    );

    // Retry: the failed one goes back to the queue (and fails again: its marker stays).
    let (s, r) = send(
        &d,
        "POST",
        &teacher,
        &format!("/api/v1/submissions/{bid}/retry"),
        None,
    )
    .await;
    assert_eq!((s, r["state"].as_str()), (200, Some("queued")), "{r}");
    let (s, e) = send(
        &d,
        "POST",
        &teacher,
        &format!("/api/v1/submissions/{aid}/retry"),
        None,
    )
    .await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("not_failed")));
    let again = d
        .wait_scored(std::slice::from_ref(&bid), Duration::from_secs(60))
        .await;
    assert_eq!(again[0]["state"], "failed");

    // Release all: alice's grade goes out; the override is locked afterwards.
    let (s, r) = send(
        &d,
        "POST",
        &teacher,
        "/api/v1/assignments/sandbox-oral-1/release-all",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(r["released"], json!([aid]));
    let (s, e) = send(
        &d,
        "POST",
        &teacher,
        &format!("/api/v1/submissions/{aid}/override"),
        Some(ov),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("not_awaiting_review"))
    );
    let (_, mine) = d.get(&alice, &format!("/api/v1/submissions/{aid}")).await;
    assert_eq!(
        mine["score"]["total"], 12.0,
        "the student sees the overridden grade"
    );
    assert_eq!(points_of(&mine["score"], "content"), 4.0);

    // The audit log: who, when, what.
    let (_, log) = send(
        &d,
        "GET",
        &teacher,
        &format!("/api/v1/submissions/{aid}/audit"),
        None,
    )
    .await;
    let actions: Vec<&str> = log
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["submission.release", "submission.override"],
        "{log}"
    );
    let o = &log[1];
    assert_eq!(o["actor"], "teacher@sandbox");
    assert!(o["at"].as_i64().is_some_and(|t| t > 0));
    assert_eq!(o["details"]["note"], "re-listened");
    let changes = o["details"]["changes"].as_array().expect("changes");
    assert!(
        changes
            .iter()
            .any(|c| c["field"] == "points" && c["from"] == 2.0 && c["to"] == 4.0),
        "{o}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c["field"] == "feedback" && c["to"] == "Great"),
        "{o}"
    );
    let (_, all) = send(&d, "GET", &admin, "/api/v1/admin/audit", None).await;
    assert!(
        all.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["action"] == "submission.retry" && e["subject"] == bid.as_str())),
        "{all}"
    );

    // Admin: models per role with their processes, phase history, health.
    let (_, sys) = send(&d, "GET", &admin, "/api/v1/admin/system", None).await;
    let models = sys["models"].as_array().expect("models");
    assert_eq!(models.len(), 3, "{sys}");
    assert!(
        models
            .iter()
            .any(|m| m["kind"] == "stt" && m["model"] == "fake-stt")
    );
    assert!(models.iter().any(|m| m["role"] == "a") && models.iter().any(|m| m["role"] == "b"));
    assert!(
        sys["phase_history"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["phase"] == "evaluation")),
        "{sys}"
    );
    assert!(
        sys["process_history"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    assert_eq!(sys["ready"], true, "{sys}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn formats_browsers_cannot_play_get_a_transcoded_preview_once() {
    let d = TestDaemon::start(&[], |_| {}).await;
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let mallory = d.token(Role::Learner, "mallory", "sandbox");
    let c = reqwest::Client::new();
    for (name, how) in [
        ("a.mp4", "original"),
        ("b.mov", "transcoded"),
        ("c.mkv", "transcoded"),
    ] {
        let file = video(&media, name, 2.0, true);
        let (s, sub) = d.upload(&alice, "sandbox-oral-1", &file).await;
        assert_eq!(s, 201, "{sub}");
        let id = sub["id"].as_str().expect("id");
        // Only through a single-use media ticket (or the bearer header).
        let (_, t) = send(
            &d,
            "POST",
            &alice,
            "/api/v1/tickets",
            Some(json!({"scope": format!("media:{id}")})),
        )
        .await;
        let ticket = t["ticket"].as_str().expect("ticket");
        let url = format!("{}/api/v1/submissions/{id}/preview?ticket={ticket}", d.url);
        let started = Instant::now();
        let r = c.get(&url).send().await.expect("preview");
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.headers()["x-viva-preview"], how, "{name}");
        assert_eq!(r.headers()["content-type"], "video/mp4", "{name}");
        let bytes = r.bytes().await.expect("bytes");
        eprintln!(
            "{name}: {how} preview, {} bytes in {:?}",
            bytes.len(),
            started.elapsed()
        );
        assert_eq!(&bytes[4..8], b"ftyp", "{name}: an MP4 the browser can play");
        assert_eq!(
            c.get(&url).send().await.expect("again").status(),
            401,
            "tickets are single use"
        );
        let (s, _) = send(
            &d,
            "GET",
            &mallory,
            &format!("/api/v1/submissions/{id}/preview"),
            None,
        )
        .await;
        assert_eq!(s, 404, "another student's media is not found");
        if how == "transcoded" {
            let dir = d.dir.path().join("var/media").join(id);
            assert!(dir.join("preview.mp4").exists(), "kept for the next view");
            let started = Instant::now();
            let (s, _) = send(
                &d,
                "GET",
                &alice,
                &format!("/api/v1/submissions/{id}/preview"),
                None,
            )
            .await;
            assert_eq!(s, 200);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the second view reuses it"
            );
        }
    }
    d.stop().await;
}

// ---- the three views in Chromium ---------------------------------------------------------

/// A student uploads a generated video in the browser, watches the phase
/// change and their position fall (the STT worker is held loading until the
/// browser shows the queue), then sees the released result with the video.
/// Both evaluators write junk ("1", "none", "1.1.1.…") as the small test
/// models do: the student reads the rubric's level descriptors instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn student_uploads_watches_phase_and_position_then_reads_the_result() {
    let Some(b) = browser() else { return };
    let gate_dir = tempfile::tempdir().expect("tmp");
    let gate = gate_dir.path().join("stt-gate");
    let d = fast_daemon(&[
        ("FAKE_LOAD_GATE", gate.display().to_string()),
        ("FAKE_EVAL_JUNK", "a,b".to_owned()),
    ])
    .await;
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    for who in ["s1", "s2", "s3"] {
        let t = d.token(Role::Learner, who, "sandbox");
        let (s, v) = d
            .upload(
                &t,
                "sandbox-oral-1",
                &tone(&media, &format!("{who}.wav"), 2.0),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let file = video(&media, "answer.mp4", 3.0, true);
    let student = d.token(Role::Learner, "browser-student", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let out = artifacts("student-upload");
    let args = [
        "--token".to_owned(),
        student.clone(),
        "--instructor-token".into(),
        teacher,
        "--file".into(),
        file.display().to_string(),
    ];
    let run = scenario(&b, &d, "student-upload", &out, &args);
    // Open the gate once the browser's upload has sat in the queue a moment.
    let opener = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, subs) = d
                .get(&student, "/api/v1/assignments/sandbox-oral-1/submissions")
                .await;
            if subs.as_array().is_some_and(|a| !a.is_empty()) {
                break;
            }
            assert!(Instant::now() < deadline, "the browser never uploaded");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        std::fs::write(&gate, b"go").expect("open the gate");
    };
    let (report, ()) = tokio::join!(run, opener);
    let seen = &report["seen"];
    let positions: Vec<u64> = seen["positions"]
        .as_array()
        .expect("positions")
        .iter()
        .filter_map(|p| p.as_str())
        .filter(|p| p.contains("speech-to-text queue"))
        .filter_map(|p| {
            p.strip_prefix("Position ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
        })
        .collect();
    assert!(
        positions.first().is_some_and(|p| *p >= 4),
        "queued behind three others: {seen}"
    );
    assert!(
        positions.windows(2).all(|w| w[1] <= w[0]) && positions.len() >= 2,
        "the position in the STT queue fell: {positions:?}"
    );
    let phases: Vec<&str> = seen["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    let stt = phases
        .iter()
        .position(|p| *p == "stt")
        .expect("STT phase shown");
    let eval = phases
        .iter()
        .position(|p| *p == "evaluation")
        .expect("evaluation phase shown");
    assert!(stt < eval, "{phases:?}");
    assert!(
        seen["system"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "System status: Speech-to-text phase")),
        "{seen}"
    );
    assert!(
        seen["batch"].as_array().is_some_and(|s| s.iter().any(|x| x
            .as_str()
            .is_some_and(|x| x.ends_with("/4 students completed speech-to-text")))),
        "{seen}"
    );
    assert!(
        seen["eta"].as_array().is_some_and(|s| !s.is_empty()),
        "an ETA was shown: {seen}"
    );
    assert_eq!(seen["uploaded"], "Your video uploaded successfully.");
    assert!(
        seen["awaiting_review"]
            .as_str()
            .is_some_and(|s| s.contains("waiting for your instructor")),
        "{seen}"
    );
    assert!(
        seen["total"]
            .as_str()
            .is_some_and(|t| t.contains("8 of 16 points")),
        "{seen}"
    );
    assert_eq!(seen["criteria_rows"], 3);
    // The evaluators' junk never reaches the student; the level's
    // descriptor from the rubric does.
    let result = seen["result_text"].as_str().unwrap_or_default();
    assert!(
        seen["criteria_text"].as_str().is_some_and(|t| t
            .contains("Addresses part of the question, or with errors.")
            && t.contains("Mostly in a sensible order.")
            && t.contains("Some subject vocabulary, mostly accurate.")),
        "{seen}"
    );
    for junk in ["\u{201c}1\u{201d}", "1.1.1", "none", "Evidence:"] {
        assert!(
            !result.contains(junk),
            "{junk:?} shown to the student: {result}"
        );
    }
    assert_eq!(seen["preview"], "original");
    assert!(
        seen["transcript"]
            .as_str()
            .is_some_and(|t| t.contains("fake transcript of answer")),
        "{seen}"
    );
    assert!(
        report["screenshots"]
            .as_array()
            .is_some_and(|s| s.len() >= 5)
    );
    d.stop().await;
}

fn whisper_model() -> Option<PathBuf> {
    let dir = std::env::var_os("VIVA_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models"));
    let model = dir.join("whisper-tiny.en-f16.bin");
    if model.is_file() {
        return Some(model);
    }
    if std::env::var_os("VIVA_MODELS_DIR").is_some() {
        panic!(
            "{} is missing: run `viva models fetch --dir {}`",
            model.display(),
            dir.display()
        );
    }
    eprintln!("SKIPPED: no Whisper model at {}", model.display());
    None
}

/// Keyboard only: record with Chromium's fake camera and a microphone fed
/// an espeak-ng WAV, submit, and read the real Whisper transcript; then play
/// the recording from a transcript line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn student_records_with_the_keyboard_only_and_reads_the_real_transcript() {
    let Some(b) = browser() else { return };
    let Some(model) = whisper_model() else { return };
    let worker = bin_dir().join("viva-whisper-worker");
    assert!(
        worker.exists(),
        "{} is missing: `cargo build -p viva-whisper-worker` (cargo test --workspace builds it)",
        worker.display()
    );
    let stt: viva_daemon::config::WorkerConfig = serde_json::from_value(json!({
        "command": worker,
        "model": "whisper-tiny.en",
        "model_path": model,
        "options": {"threads": 2},
        "memory_mb": 320,
    }))
    .expect("worker config");
    let d = TestDaemon::start_scoring(&[("FAKE_EVAL_FIXED_MS", "500".to_owned())], |c| {
        c.workers.stt = Some(stt);
    })
    .await;
    let spoken = speech(
        d.dir.path(),
        "spoken.wav",
        "Plants use sunlight, water and carbon dioxide to make glucose.",
        "en-us",
    );
    // The fake microphone starts with the camera, before the widget's
    // three-second countdown: lead with silence so the sentence is recorded.
    let audio = d.dir.path().join("mic.wav");
    let pad = output(
        Command::new("ffmpeg")
            .args(["-nostdin", "-y", "-v", "error", "-i"])
            .arg(&spoken)
            .args([
                "-af",
                "adelay=4500:all=1,apad=pad_dur=2",
                "-c:a",
                "pcm_s16le",
            ])
            .arg(&audio),
        SHORT,
    )
    .expect("ffmpeg");
    assert!(
        pad.status.success(),
        "{}",
        String::from_utf8_lossy(&pad.stderr)
    );
    let student = d.token(Role::Learner, "recorder", "sandbox");
    let out = artifacts("student-record");
    let report = scenario(
        &b,
        &d,
        "student-record",
        &out,
        &[
            "--token".into(),
            student,
            "--audio".into(),
            audio.display().to_string(),
            "--record-seconds".into(),
            "9".into(),
            "--timeout".into(),
            "180".into(),
        ],
    )
    .await;
    let seen = &report["seen"];
    let transcript = seen["transcript"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    let heard = ["plant", "sunlight", "water", "carbon", "glucose"]
        .iter()
        .filter(|w| transcript.contains(*w))
        .count();
    assert!(
        heard >= 3,
        "Whisper heard the espeak-ng sentence: {transcript:?}"
    );
    assert!(
        seen["max_level"].as_f64().is_some_and(|l| l > 0.01),
        "the level meter moved: {seen}"
    );
    assert!(
        seen["presses"]["start"].as_u64().is_some_and(|n| n <= 10),
        "the recorder is near the top of the tab order: {seen}"
    );
    d.stop().await;
}

/// An instructor edits the rubric and configures the plugin through the
/// generated form (a stricter confidence threshold), a submission (a .mov)
/// is flagged for review, and the instructor reviews it (transcoded video,
/// both evaluations side by side with a disagreement highlighted), overrides
/// a criterion, releases, and sees both in the audit log; a failed
/// submission is retried from the dashboard. Evaluator a writes junk ("1",
/// "1.1.1.…" to the cap, a paraphrase): the review names the flags and the
/// raw text stays readable at 320 px.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instructor_edits_rubric_configures_plugin_reviews_overrides_and_releases() {
    let Some(b) = browser() else { return };
    let d = fast_daemon(&[("FAKE_EVAL_JUNK", "a".to_owned())]).await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let out = artifacts("instructor");
    scenario(
        &b,
        &d,
        "instructor-edit",
        &out,
        &["--token".into(), teacher.clone()],
    )
    .await;
    let (_, a) = d.get(&teacher, "/api/v1/assignments/sandbox-oral-1").await;
    assert_eq!(
        a["rubric"]["criteria"][0]["title"], "Scientific content",
        "{a}"
    );
    assert_eq!(
        a["rubric"]["criteria"][0]["levels"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    assert_eq!(
        a["rubric"]["criteria"][0]["levels"][3],
        json!({"label": "outstanding", "points": 5.0, "descriptor": ""})
    );
    assert_eq!(a["plugin_config"]["min_segment_confidence"], 0.95, "{a}");
    assert_eq!(a["plugin_config"]["max_level_gap"], 0);

    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let (_, sub) = d
        .upload(
            &alice,
            "sandbox-oral-1",
            &video(&media, "answer.mov", 2.0, true),
        )
        .await;
    let id = sub["id"].as_str().expect("id").to_owned();
    let bob = d.token(Role::Learner, "bob", "sandbox");
    let (_, bad) = d
        .upload(
            &bob,
            "sandbox-oral-1",
            &tone(&media, "fail-always.wav", 1.0),
        )
        .await;
    let bad_id = bad["id"].as_str().expect("id").to_owned();
    let done = d
        .wait_scored(&[id.clone(), bad_id.clone()], Duration::from_secs(60))
        .await;
    assert_eq!(done[0]["state"], "awaiting_review");
    assert_eq!(
        done[0]["score"]["needs_review"], true,
        "the configured threshold flags it: {}",
        done[0]
    );
    // Evaluator b rated the first criterion one level lower (the fake
    // evaluators always agree): the review must highlight it.
    let db = rusqlite::Connection::open(d.dir.path().join("var/viva.db")).expect("db");
    db.busy_timeout(Duration::from_secs(10)).expect("timeout");
    let n = db
        .execute(
            "UPDATE jobs SET result = json_set(result, '$.ratings[0].level', 'partial')
             WHERE submission_id = ?1 AND stage = 'eval' AND role = 'b'",
            [&id],
        )
        .expect("update");
    assert_eq!(n, 1);
    drop(db);

    let report = scenario(
        &b,
        &d,
        "instructor-review",
        &out,
        &[
            "--token".into(),
            teacher.clone(),
            "--submission".into(),
            id.clone(),
            "--criterion".into(),
            "content".into(),
            "--points".into(),
            "5".into(),
        ],
    )
    .await;
    let seen = &report["seen"];
    assert_eq!(
        seen["preview"], "transcoded",
        "the .mov plays as a transcoded MP4: {seen}"
    );
    assert!(
        seen["reasons"]
            .as_str()
            .is_some_and(|r| r.contains("confidence")
                && r.contains("flagged: evidence_not_in_transcript")
                && r.contains("flagged: degenerate_output")),
        "{seen}"
    );
    assert_eq!(
        seen["evaluator_columns"], 4,
        "criterion, evaluator a, evaluator b, plugin"
    );
    assert_eq!(seen["disagreements"], 1, "{seen}");
    // The plugin a submission was scored with: by name, and by its file's
    // sha256 (a later upload under the same name is another file).
    assert!(
        seen["plugin_report"]
            .as_str()
            .is_some_and(|r| r.contains("weighted-criteria") && r.contains("SHA-256")),
        "{seen}"
    );
    assert_eq!(seen["retry_buttons"], 1);
    assert!(
        seen["audit_override"]
            .as_str()
            .is_some_and(|s| s.contains("teacher@sandbox")
                && s.contains("content points 4 → 5")
                && s.contains("listened to the recording")),
        "{seen}"
    );
    assert!(
        seen["audit_release"]
            .as_str()
            .is_some_and(|s| s.contains("submission.release")),
        "{seen}"
    );
    assert_eq!(seen["locked"], true, "a released grade cannot be changed");

    let (_, s) = d.get(&alice, &format!("/api/v1/submissions/{id}")).await;
    assert_eq!(s["state"], "released", "{s}");
    assert_eq!(points_of(&s["score"], "content"), 5.0);
    assert_eq!(s["score"]["report"]["criteria"][0]["level"], "outstanding");
    assert_eq!(
        s["score"]["total"], 14.0,
        "2×5 + 2 + 2 (the evaluators' middle levels elsewhere)"
    );
    let (_, passback) = send(
        &d,
        "GET",
        &teacher,
        &format!("/api/v1/submissions/{id}/passback"),
        None,
    )
    .await;
    assert!(
        passback
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["kind"] == "released")),
        "{passback}"
    );
    let (_, log) = send(
        &d,
        "GET",
        &teacher,
        &format!("/api/v1/submissions/{bad_id}/audit"),
        None,
    )
    .await;
    assert!(
        log.as_array()
            .is_some_and(|l| l.iter().any(|e| e["action"] == "submission.retry")),
        "the dashboard's retry: {log}"
    );
    d.stop().await;
}

/// Issue 16's versions in the instructor view: after a points-only edit the
/// Versions tab lists both versions and the stale grade; "Rescore" runs the
/// plugin again (no model call) with a progress bar; axe-clean, no sideways
/// scrolling at 320 px; the rescored grade waits for release.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instructor_sees_versions_and_rescores_with_progress() {
    let Some(b) = browser() else { return };
    let d = fast_daemon(&[]).await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let (_, sub) = d
        .upload(&alice, "sandbox-oral-1", &tone(&media, "answer.wav", 1.0))
        .await;
    let id = sub["id"].as_str().expect("id").to_owned();
    let before = d
        .wait_scored(std::slice::from_ref(&id), Duration::from_secs(60))
        .await;
    let (_, a) = d.get(&teacher, "/api/v1/assignments/sandbox-oral-1").await;
    let mut rubric = a["rubric"].clone();
    rubric["criteria"][0]["weight"] = json!(3);
    let (status, saved) = send(
        &d,
        "PUT",
        &teacher,
        "/api/v1/assignments/sandbox-oral-1",
        Some(
            json!({"title": a["title"], "prompt": a["prompt"], "rubric": rubric,
                    "plugin": a["plugin"], "plugin_config": a["plugin_config"],
                    "release_policy": a["release_policy"]}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved["version"], 2);
    let evals = |d: &TestDaemon| {
        d.fake_events()
            .iter()
            .filter(|e| e["ev"] == "job_start" && e["kind"] == "evaluator")
            .count()
    };
    let calls = evals(&d);
    let out = artifacts("versions");
    let report = scenario(
        &b,
        &d,
        "instructor-versions",
        &out,
        &["--token".into(), teacher.clone()],
    )
    .await;
    let seen = &report["seen"];
    assert!(
        seen["status"]
            .as_str()
            .is_some_and(|s| s.contains("Version 2 is current")
                && s.contains("1 graded submission uses an older version")),
        "{seen}"
    );
    assert!(
        seen["table"].as_str().is_some_and(
            |t| t.contains("Scoring only: points or weights") && t.contains("teacher@sandbox")
        ),
        "{seen}"
    );
    assert!(
        seen["rescores"]
            .as_str()
            .is_some_and(|r| r.contains("To version 2: 1 of 1 done")
                && r.contains("1 by the plugin only (no model call), 0 evaluated again")
                && r.contains("wait for your release")),
        "{seen}"
    );
    assert_eq!(seen["progress"], json!([1, 1]), "{seen}");
    assert!(
        seen["done_status"]
            .as_str()
            .is_some_and(|s| s.contains("Every graded submission uses the current version")),
        "{seen}"
    );
    assert_eq!(evals(&d), calls, "no model call");
    let (_, after) = d.get(&teacher, &format!("/api/v1/submissions/{id}")).await;
    assert_eq!(after["state"], "awaiting_review", "{after}");
    assert_eq!(after["assignment_version"], 2);
    assert_ne!(after["score"]["total"], before[0]["score"]["total"]);
    assert!(
        report["screenshots"]
            .as_array()
            .is_some_and(|s| s.len() >= 3),
        "{report}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructor_releases_a_selection_grades_blind_and_reads_the_calibration() {
    let Some(b) = browser() else { return };
    let d = fast_daemon(&[]).await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let mut ids = Vec::new();
    for (i, who) in ["ana", "ben", "cem", "dee", "eve"].iter().enumerate() {
        let token = d.token(Role::Learner, who, "sandbox");
        let (status, sub) = d
            .upload(
                &token,
                "sandbox-oral-1",
                &tone(&media, &format!("answer-{i}.wav"), 1.0),
            )
            .await;
        assert_eq!(status, 201, "{sub}");
        ids.push(sub["id"].as_str().expect("id").to_owned());
    }
    let done = d.wait_scored(&ids, Duration::from_secs(60)).await;
    assert!(done.iter().all(|s| s["state"] == "awaiting_review"));
    // Two submissions the instructor graded blind before, so the
    // calibration table has something to compare.
    for (id, level) in [(&ids[3], "complete"), (&ids[4], "missing")] {
        let (status, r) = send(
            &d,
            "POST",
            &teacher,
            &format!("/api/v1/submissions/{id}/blind-grade"),
            Some(json!({"levels": {"content": level, "organisation": "clear", "language": "adequate"}})),
        )
        .await;
        assert_eq!(status, 200, "{r}");
    }
    let out = artifacts("calibration");
    let report = scenario(
        &b,
        &d,
        "instructor-calibration",
        &out,
        &[
            "--token".into(),
            teacher.clone(),
            "--select".into(),
            format!("{},{}", ids[0], ids[1]),
            "--submission".into(),
            ids[2].clone(),
            "--levels".into(),
            "content=partial,organisation=unclear,language=precise".into(),
        ],
    )
    .await;
    let seen = &report["seen"];
    assert_eq!(seen["button"], "Release selected (2)", "{seen}");
    assert_eq!(seen["after_refresh"], "Release selected (2)", "{seen}");
    assert!(
        seen["released_message"]
            .as_str()
            .is_some_and(|t| t.contains("Released 2 grades")),
        "{seen}"
    );
    assert_eq!(seen["hidden"], true, "the evaluations stay hidden: {seen}");
    assert!(
        seen["mine"]
            .as_str()
            .is_some_and(|t| t.contains("Content: partial (blind)")),
        "{seen}"
    );
    assert!(
        seen["verdict"]
            .as_str()
            .is_some_and(|t| t.contains("Too few graded submissions: grade at least 7 more")),
        "{seen}"
    );
    assert_eq!(
        seen["rows"], 12,
        "3 criteria and overall × a, b, combined: {seen}"
    );
    assert!(
        seen["gate"].as_str().is_some_and(|t| t.contains("not met")),
        "{seen}"
    );
    // What the browser did, through the API.
    let after = d.wait_scored(&ids, Duration::from_secs(5)).await;
    let states: Vec<&str> = after.iter().filter_map(|s| s["state"].as_str()).collect();
    assert_eq!(
        states,
        [
            "released",
            "released",
            "awaiting_review",
            "awaiting_review",
            "awaiting_review"
        ]
    );
    let (_, audit) = d
        .get(&teacher, &format!("/api/v1/submissions/{}/audit", ids[0]))
        .await;
    assert!(audit.to_string().contains("release_selected"), "{audit}");
    let (_, mine) = d
        .get(
            &teacher,
            &format!("/api/v1/submissions/{}/instructor-grade", ids[2]),
        )
        .await;
    assert_eq!(mine["exemplar"], true, "{mine}");
    assert_eq!(mine["levels"][1]["level"], "precise", "{mine}");
    let (_, r) = d
        .get(&teacher, "/api/v1/assignments/sandbox-oral-1/calibration")
        .await;
    assert_eq!(
        (r["graded"].as_u64(), r["blind"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(r["gate"], json!({"min_qwk": 0.7, "min_sample": 5}));
    for name in ["1-selection", "2-blind", "3-revealed", "4-calibration"] {
        assert!(
            out.join(format!("instructor-calibration-{name}.png"))
                .exists(),
            "{name}"
        );
    }
    d.stop().await;
}

/// The admin view (health, models and workers, registrations, plugins with
/// a refused upload) with axe checks on every tab.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_view_shows_models_registrations_and_plugins_accessibly() {
    let Some(b) = browser() else { return };
    // Workers that report GPU memory, as the `cuda` builds do; evaluator
    // "b" is remote (its Hello says so, and it reports its server's health).
    let d = TestDaemon::start_scoring(
        &[
            ("FAKE_STT_FIXED_MS", "1200".to_owned()),
            ("FAKE_EVAL_FIXED_MS", "1500".to_owned()),
            ("FAKE_DEVICE_MEMORY_MB", "2000".into()),
        ],
        |c| {
            if let Some(b) = c.workers.evaluators.get_mut("b") {
                b.env.insert("FAKE_REMOTE".into(), "1".into());
            }
        },
    )
    .await;
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let (_, sub) = d
        .upload(&alice, "sandbox-oral-1", &tone(&media, "a.wav", 1.0))
        .await;
    d.wait_scored(
        &[sub["id"].as_str().expect("id").to_owned()],
        Duration::from_secs(60),
    )
    .await;
    let bogus = media.join("not-a-plugin.wasm");
    std::fs::write(&bogus, b"\0asm\x01\0\0\0").expect("write");
    let admin = d.token(Role::Admin, "root", "sandbox");
    let out = artifacts("admin");
    let report = scenario(
        &b,
        &d,
        "admin",
        &out,
        &[
            "--token".into(),
            admin,
            "--file".into(),
            bogus.display().to_string(),
        ],
    )
    .await;
    let seen = &report["seen"];
    assert_eq!(seen["health"], "Ready", "{seen}");
    let models = seen["models"].as_str().unwrap_or_default();
    for m in [
        "Speech-to-text",
        "fake-stt",
        "Evaluator a",
        "Evaluator b",
        "fake-evaluator",
        "100 MiB",
        "2000 MiB on the GPU (measured; configured 100 MiB)",
    ] {
        assert!(models.contains(m), "{m} missing from {models}");
    }
    assert!(
        models.contains("remote: fake-evaluator")
            && models.contains("on its server (not this machine)"),
        "{models}"
    );
    // The remote evaluator's server: health and latency.
    let remote = seen["remote"].as_str().unwrap_or_default();
    for r in [
        "Evaluator b",
        "http://fake-server.invalid/v1",
        "answering",
        "median 42 ms, 95% under 80 ms",
        "0 failed",
    ] {
        assert!(remote.contains(r), "{r} missing from {remote:?}");
    }
    assert!(!remote.contains("Evaluator a"), "{remote}");
    // The switch from STT to evaluation, measured: the STT worker's
    // 2000 MiB before, the two evaluators' 4000 MiB after.
    let swaps = seen["swaps"].as_str().unwrap_or_default();
    assert!(
        swaps.contains("Evaluators") && swaps.contains("2000 MiB") && swaps.contains("4000 MiB"),
        "{seen}"
    );
    assert!(
        seen["dynreg"]
            .as_str()
            .is_some_and(|t| t.contains("/lti/register") && t.contains("Moodle")),
        "{seen}"
    );
    // The one-time registration URL the admin made, shown once.
    assert!(
        seen["invite"]
            .as_str()
            .is_some_and(|t| t.contains("/lti/register?invite=")),
        "{seen}"
    );
    assert!(
        seen["plugins"]
            .as_str()
            .is_some_and(|t| t.contains("weighted-criteria") && t.contains("holistic-band"))
    );
    assert!(
        seen["upload"]
            .as_str()
            .is_some_and(|t| t.to_lowercase().contains("component")),
        "a core module is refused by name: {seen}"
    );
    // The installation checks: the test daemon's sandbox, unset public address
    // and /dev/null model files are failing lines, each with what to do.
    let doctor = seen["doctor"].as_str().unwrap_or_default();
    for s in [
        "sandbox",
        "enabled = false",
        "public_url is not set",
        "ffmpeg",
        "worker:stt",
        "failing",
        "plugins",
    ] {
        assert!(doctor.contains(s), "{s} missing from the checks: {doctor}");
    }
    assert!(
        seen["doctor_summary"]
            .as_str()
            .is_some_and(|t| t.contains("failing")),
        "{seen}"
    );
    let axe = report["axe"].as_object().expect("axe");
    assert!(axe.len() >= 5, "{axe:?}");
    d.stop().await;
}

// ---- languages ----------------------------------------------------------------------------

#[tokio::test]
async fn the_page_language_follows_accept_language() {
    let d = fast_daemon(&[]).await;
    let page = |lang: Option<&'static str>| {
        let url = format!("{}/app", d.url);
        async move {
            let mut r = reqwest::Client::new().get(url);
            if let Some(l) = lang {
                r = r.header("Accept-Language", l);
            }
            r.send().await.expect("page").text().await.expect("body")
        }
    };
    let fr = page(Some("fr-FR,fr;q=0.9,en;q=0.8")).await;
    assert!(fr.contains("<html lang=\"fr\">"), "{fr}");
    assert!(fr.contains("\"locale\":\"fr\""), "{fr}");
    let en = page(Some("en-GB,en;q=0.9")).await;
    assert!(en.contains("<html lang=\"en\">") && en.contains("\"locale\":\"en\""));
    // A language the widget lacks: English until the script asks the browser.
    let de = page(Some("de-DE")).await;
    assert!(
        de.contains("<html lang=\"en\">") && !de.contains("\"locale\""),
        "{de}"
    );
    // Both catalogues are served.
    let v = page(None).await;
    let version = v
        .split("/widget/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .expect("widget version")
        .to_owned();
    for file in ["i18n.js", "strings.fr.js"] {
        let r = reqwest::get(format!("{}/widget/{version}/{file}", d.url))
            .await
            .expect("asset");
        assert_eq!(r.status(), 200, "{file}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_french_browser_gets_the_widget_in_french_accessibly() {
    let Some(b) = browser() else { return };
    let d = fast_daemon(&[]).await;
    let teacher = d.token(Role::Instructor, "enseignante", "sandbox");
    let (status, a) = send(
        &d,
        "POST",
        &teacher,
        "/api/v1/assignments",
        Some(json!({
            "id": "oral-fr",
            "title": "Oral : la photosynthèse",
            "prompt": "Expliquez la photosynthèse en une minute.",
            "language": "fr",
            "vocabulary": "photosynthèse, chlorophylle",
            "release_policy": "auto",
            "rubric": {"criteria": [
                {"id": "content", "title": "Contenu",
                 "levels": [{"label": "missing", "points": 0}, {"label": "partial", "points": 2},
                            {"label": "complete", "points": 4}]}]}
        })),
    )
    .await;
    assert!(status == 201 || status == 200, "{status} {a}");
    let media = d.dir.path().join("media");
    std::fs::create_dir_all(&media).expect("dir");
    let file = video(&media, "reponse.mp4", 2.0, true);
    let student = d.token(Role::Learner, "eleve", "sandbox");
    let out = artifacts("french");
    let lang = ["--lang".to_owned(), "fr-FR".into()];
    let mut args = vec![
        "--token".to_owned(),
        student.clone(),
        "--assignment".into(),
        "oral-fr".into(),
        "--file".into(),
        file.display().to_string(),
    ];
    args.extend(lang.iter().cloned());
    let r = scenario(&b, &d, "student-french", &out, &args).await;
    let seen = &r["seen"];
    assert_eq!(seen["lang"], "fr", "{seen}");
    assert!(
        seen["result_text"]
            .as_str()
            .is_some_and(|t| t.starts_with("Votre résultat") && t.contains("Critère")),
        "{seen}"
    );
    assert!(
        seen["total"]
            .as_str()
            .is_some_and(|t| t.contains("sur") && t.contains("points")),
        "{seen}"
    );
    // Captions are tagged with the transcript's language, not `en`.
    assert_eq!(seen["captions_lang"], "fr", "{seen}");
    // Whisper's word probabilities are for staff only.
    assert_eq!(seen["unsure_marks"], 0, "{seen}");

    let (_, subs) = d
        .get(&student, "/api/v1/assignments/oral-fr/submissions")
        .await;
    let id = subs[0]["id"].as_str().expect("submission").to_owned();
    let mut args = vec![
        "--token".to_owned(),
        teacher,
        "--assignment".into(),
        "oral-fr".into(),
        "--submission".into(),
        id,
    ];
    args.extend(lang.iter().cloned());
    let r = scenario(&b, &d, "instructor-french", &out, &args).await;
    let seen = &r["seen"];
    assert_eq!(seen["language"], "fr", "{seen}");
    assert!(
        seen["language_text"]
            .as_str()
            .is_some_and(|t| t.starts_with("français")),
        "the language's name in French: {seen}"
    );
    assert_eq!(seen["vocabulary"], "photosynthèse, chlorophylle");
    // The word the (fake) Whisper was unsure of, marked with how sure it was.
    assert_eq!(seen["unsure"], "transcript", "{seen}");
    assert!(
        seen["unsure_title"]
            .as_str()
            .is_some_and(|t| t.contains("qu’à 35 %")),
        "{seen}"
    );
    d.stop().await;
}
