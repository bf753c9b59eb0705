//! Rubric plugins end to end: the daemon scores evaluated submissions with
//! the assignment's real WebAssembly plugin and stores the report; plugin
//! uploads, listing and disabling over the API; configurations validated
//! against the plugin's schema when an assignment is saved; a failing plugin
//! fails its submission with the plugin's log while the daemon keeps going.

use std::time::Duration;

use serde_json::{Value, json};
use viva_daemon::Role;
use viva_tests::{TestDaemon, tone};

fn fast() -> Vec<(&'static str, String)> {
    vec![
        ("FAKE_STT_FIXED_MS", "20".into()),
        ("FAKE_EVAL_FIXED_MS", "20".into()),
    ]
}

fn short_window(c: &mut viva_daemon::Config) {
    c.scheduler.batch_window = Duration::from_millis(300);
}

async fn upload_plugin(d: &TestDaemon, token: &str, bytes: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/plugins", d.url))
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("upload");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

fn hostile_wasm() -> Vec<u8> {
    std::fs::read(viva_plugins::builtin::built_guest("hostile")).expect("hostile plugin built")
}

fn assignment(id: &str, plugin: &str, config: Value, release: &str) -> Value {
    let sandbox = viva_daemon::sandbox_assignment();
    json!({
        "id": id,
        "title": "Plugin test",
        "prompt": "Explain photosynthesis.",
        "rubric": sandbox.rubric,
        "plugin": plugin,
        "plugin_config": config,
        "release_policy": release,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_plugin_scores_every_evaluated_submission() {
    let d = TestDaemon::start_scoring(&fast(), short_window).await;
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let mut ids = Vec::new();
    for i in 0..2 {
        let f = tone(d.dir.path(), &format!("answer-{i}.wav"), 1.0);
        let (status, body) = d.upload(&alice, "sandbox-oral-1", &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    let done = d.wait_scored(&ids, Duration::from_secs(60)).await;
    for s in &done {
        // The sandbox releases manually, so a scored submission waits for review.
        assert_eq!(s["state"], "awaiting_review", "{s}");
        let score = &s["score"];
        // The fake evaluators both choose every criterion's middle level
        // (2 of 4 points): 2×2 + 2 + 2 = 8 of 2×4 + 4 + 4 = 16.
        assert_eq!(score["total"], 8.0, "{score}");
        assert_eq!(score["max"], 16.0, "{score}");
        assert_eq!(score["needs_review"], false, "{score}");
        let report = &score["report"];
        assert_eq!(report["plugin"]["name"], "weighted-criteria");
        assert_eq!(report["plugin"]["interface"], "viva:rubric@0.1.0");
        assert_eq!(report["criteria"].as_array().map(Vec::len), Some(3));
        assert_eq!(report["criteria"][0]["level"], "partial");
        assert!(
            report["usage"]["fuel_consumed"]
                .as_u64()
                .is_some_and(|f| f > 0)
        );
    }
    // The instructor sees the grade; the learner not before release.
    let (_, mine) = d
        .get(&alice, &format!("/api/v1/submissions/{}", ids[0]))
        .await;
    assert!(mine["score"].is_null(), "{mine}");
    let (_, theirs) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", ids[0]))
        .await;
    assert_eq!(theirs["score"]["total"], 8.0);
    // One pending grade per submission in the outbox.
    let outbox: i64 = d
        .state
        .store
        .read(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM grade_outbox WHERE kind = 'pending'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .expect("outbox");
    assert_eq!(outbox, 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_configurations_are_validated_against_the_plugin() {
    let d = TestDaemon::start(&fast(), |_| {}).await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let post = reqwest::Method::POST;
    let (status, body) = d
        .send(
            post.clone(),
            &teacher,
            "/api/v1/assignments",
            Some(assignment(
                "a1",
                "weighted-criteria",
                json!({"max_level_gap": 11}),
                "manual",
            )),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_plugin_config");
    assert_eq!(
        body["error"]["message"],
        "invalid configuration for weighted-criteria: max_level_gap: 11 is greater than the maximum of 10"
    );
    // The plugin's own validate-config speaks where the schema cannot.
    let bands = json!({"bands": [{"label": "A", "min_percent": 0}, {"label": "B", "min_percent": 60},
                                 {"label": "C", "min_percent": 40}]});
    let (status, body) = d
        .send(
            post.clone(),
            &teacher,
            "/api/v1/assignments",
            Some(assignment("a2", "holistic-band", bands, "manual")),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("must start above B")),
        "{body}"
    );
    let (status, body) = d
        .send(
            post.clone(),
            &teacher,
            "/api/v1/assignments",
            Some(assignment("a3", "no-such-plugin", json!({}), "manual")),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "unknown_plugin");
    // Valid choices save, and an update is checked the same way.
    let (status, body) = d
        .send(
            post,
            &teacher,
            "/api/v1/assignments",
            Some(assignment(
                "a4",
                "holistic-band",
                json!({"scale_max": 20}),
                "auto",
            )),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["plugin"], "holistic-band");
    let (status, body) = d
        .send(
            reqwest::Method::PUT,
            &teacher,
            "/api/v1/assignments/a4",
            Some(assignment(
                "a4",
                "holistic-band",
                json!({"scale_max": -1}),
                "auto",
            )),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("scale_max: -1 must be greater than 0")),
        "{body}"
    );
    // The configuration form can check before saving.
    let (status, body) = d
        .send(
            reqwest::Method::POST,
            &teacher,
            "/api/v1/plugins/builtin:weighted-criteria/validate-config",
            Some(json!({"combine": "median"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_uploaded_listed_and_disabled() {
    let d = TestDaemon::start(&fast(), |_| {}).await;
    let admin = d.token(Role::Admin, "root", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let learner = d.token(Role::Learner, "alice", "sandbox");

    assert_eq!(upload_plugin(&d, &learner, hostile_wasm()).await.0, 403);
    let (status, body) = upload_plugin(&d, &teacher, hostile_wasm()).await;
    assert_eq!(status, 403, "instructor uploads are off by default: {body}");

    let (status, body) = upload_plugin(&d, &admin, hostile_wasm()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], "hostile");
    assert_eq!(body["builtin"], false);
    assert_eq!(body["enabled"], true);
    assert!(body["context_id"].is_null(), "admins upload site-wide");
    let id = body["id"].as_str().expect("id").to_owned();
    let sha = body["sha256"].as_str().expect("sha").to_owned();
    assert!(
        d.dir
            .path()
            .join(format!("var/plugins/{sha}.wasm"))
            .exists()
    );
    // The same file again is the same plugin.
    let (status, again) = upload_plugin(&d, &admin, hostile_wasm()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id.as_str());

    // Refused uploads name the problem.
    let (status, body) = upload_plugin(&d, &admin, b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "not_a_component");
    let (status, body) = upload_plugin(&d, &admin, b"hello".to_vec()).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("not_a_component"))
    );

    let (status, list) = d.get(&teacher, "/api/v1/plugins").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["weighted-criteria", "holistic-band", "hostile"]);
    let (_, builtin) = d
        .get(&teacher, "/api/v1/plugins/builtin:weighted-criteria")
        .await;
    assert_eq!(builtin["builtin"], true);
    assert_eq!(
        builtin["config_schema"]["properties"]["combine"]["default"],
        "mean"
    );

    let post = reqwest::Method::POST;
    let (status, _) = d
        .send(
            post.clone(),
            &teacher,
            "/api/v1/assignments",
            Some(assignment("h1", "hostile", json!({"mode": "ok"}), "auto")),
        )
        .await;
    assert_eq!(status, 201);
    // Instructors cannot disable site-wide plugins; admins can.
    let (status, _) = d
        .send(
            post.clone(),
            &teacher,
            &format!("/api/v1/plugins/{id}/disable"),
            None,
        )
        .await;
    assert_eq!(status, 403);
    let (status, body) = d
        .send(
            post.clone(),
            &admin,
            &format!("/api/v1/plugins/{id}/disable"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enabled"], false);
    let (status, body) = d
        .send(
            post.clone(),
            &teacher,
            "/api/v1/assignments",
            Some(assignment("h2", "hostile", json!({}), "auto")),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("unknown_plugin"))
    );
    let (status, _) = d
        .send(
            post.clone(),
            &admin,
            &format!("/api/v1/plugins/{id}/enable"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = d
        .send(
            post,
            &admin,
            "/api/v1/plugins/builtin:weighted-criteria/disable",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("builtin_plugin"))
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructors_upload_for_their_course_when_allowed() {
    let d = TestDaemon::start(&fast(), |c| c.plugins.instructor_upload = true).await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let stranger = d.token(Role::Instructor, "stranger", "chemistry-101");
    let (status, body) = upload_plugin(&d, &teacher, hostile_wasm()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["context_id"], "sandbox");
    let id = body["id"].as_str().expect("id").to_owned();
    // Another course neither sees nor uses it.
    let (status, _) = d.get(&stranger, &format!("/api/v1/plugins/{id}")).await;
    assert_eq!(status, 404);
    let (_, list) = d.get(&stranger, "/api/v1/plugins").await;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let (status, body) = d
        .send(
            reqwest::Method::POST,
            &stranger,
            "/api/v1/assignments",
            Some(assignment("c1", "hostile", json!({}), "auto")),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("unknown_plugin"))
    );
    // Its own instructors may disable it.
    let (status, _) = d
        .send(
            reqwest::Method::POST,
            &teacher,
            &format!("/api/v1/plugins/{id}/disable"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_fails_only_its_submission_once_with_a_plain_reason() {
    let d = TestDaemon::start_scoring(&fast(), short_window).await;
    let admin = d.token(Role::Admin, "root", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let (status, body) = upload_plugin(&d, &admin, hostile_wasm()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = d
        .send(
            reqwest::Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(assignment(
                "panics",
                "hostile",
                json!({"mode": "panic"}),
                "auto",
            )),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = d
        .send(
            reqwest::Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(assignment(
                "loops",
                "hostile",
                json!({"mode": "loop"}),
                "auto",
            )),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let mut ids = Vec::new();
    for (i, assignment) in ["panics", "loops", "sandbox-oral-1"].iter().enumerate() {
        let f = tone(d.dir.path(), &format!("answer-{i}.wav"), 1.0);
        let (status, body) = d.upload(&alice, assignment, &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    let done = d.wait_scored(&ids, Duration::from_secs(120)).await;
    assert_eq!(done[0]["state"], "failed", "{}", done[0]);
    assert_eq!(done[0]["failure_code"], "scoring_failed");
    let reason = done[0]["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("panicked: hostile plugin panicked on purpose (code 42)"),
        "{reason}"
    );
    // Students read this reason: plain words, no plugin log.
    assert!(!reason.contains("plugin log"), "{reason}");
    assert!(reason.chars().count() < 500, "{reason}");
    // A deterministic failure is not retried: one score attempt each.
    let db = rusqlite::Connection::open(d.dir.path().join("var/viva.db")).expect("open db");
    for id in &ids[..2] {
        let attempts: i64 = db
            .query_row(
                "SELECT attempts FROM jobs WHERE submission_id = ?1 AND stage = 'score'",
                [id],
                |r| r.get(0),
            )
            .expect("score job");
        assert_eq!(attempts, 1, "submission {id} was scored {attempts} times");
    }
    assert_eq!(done[1]["state"], "failed", "{}", done[1]);
    let reason = done[1]["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ran out of fuel"), "{reason}");
    // The daemon kept scoring everything else.
    assert_eq!(done[2]["state"], "awaiting_review", "{}", done[2]);
    assert_eq!(done[2]["score"]["total"], 8.0);
    d.stop().await;
}

/// The same component with a custom section appended: another file (another
/// sha256), the same plugin.
fn with_custom_section(mut wasm: Vec<u8>, tag: &str) -> Vec<u8> {
    let name = b"viva-test";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    assert!(payload.len() < 128, "one-byte LEB128 size");
    wasm.push(0);
    wasm.push(payload.len() as u8);
    wasm.extend_from_slice(&payload);
    wasm
}

/// Issue 16: an assignment pins its plugin by sha256 when saved; a newer
/// upload under the same name changes no pending grade; saving the
/// assignment again pins the new file as a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_keeps_its_pinned_plugin_until_saved_again() {
    let d = TestDaemon::start_scoring(&fast(), short_window).await;
    let admin = d.token(Role::Admin, "admin", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let (status, first) = upload_plugin(&d, &admin, hostile_wasm()).await;
    assert_eq!(status, 201, "{first}");
    let body = assignment("pinned", "hostile", json!({"mode": "ok"}), "manual");
    let (status, a) = d
        .send(
            reqwest::Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    assert_eq!(a["plugin_sha256"], first["sha256"]);
    // A newer upload of the "same" plugin: another file.
    let (status, second) =
        upload_plugin(&d, &admin, with_custom_section(hostile_wasm(), "v2")).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["name"], first["name"]);
    assert_ne!(second["sha256"], first["sha256"]);

    let alice = d.token(Role::Learner, "alice", "sandbox");
    let f = tone(d.dir.path(), "a.wav", 1.0);
    let (status, sub) = d.upload(&alice, "pinned", &f).await;
    assert_eq!(status, 201, "{sub}");
    let id = sub["id"].as_str().expect("id").to_owned();
    let done = d.wait_scored(&[id], Duration::from_secs(60)).await;
    assert_eq!(
        done[0]["score"]["report"]["plugin"]["sha256"], first["sha256"],
        "scored with the pinned file, not the newest upload: {}",
        done[0]
    );

    // A disabled upload is out of use, pinned or not: scoring fails with
    // a reason that says what to do.
    let (status, _) = d
        .send(
            reqwest::Method::POST,
            &admin,
            &format!(
                "/api/v1/plugins/{}/disable",
                first["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let bob = d.token(Role::Learner, "bob", "sandbox");
    let (status, sub) = d.upload(&bob, "pinned", &f).await;
    assert_eq!(status, 201, "{sub}");
    let id = sub["id"].as_str().expect("id").to_owned();
    let done = d.wait_scored(&[id], Duration::from_secs(60)).await;
    assert_eq!(done[0]["state"], "failed", "{}", done[0]);
    assert!(
        done[0]["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("is disabled; enable it, or save the assignment")),
        "{}",
        done[0]
    );

    // Saved again: the newest enabled upload is pinned, as version 2.
    let (status, a2) = d
        .send(
            reqwest::Method::PUT,
            &teacher,
            "/api/v1/assignments/pinned",
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{a2}");
    assert_eq!(a2["plugin_sha256"], second["sha256"]);
    assert_eq!(a2["version"], 2);
    let (_, versions) = d.get(&teacher, "/api/v1/assignments/pinned/versions").await;
    assert_eq!(versions["versions"][0]["summary"], "plugin", "{versions}");
    assert_eq!(versions["versions"][0]["change"], "scoring");
    assert_eq!(versions["versions"][1]["plugin_sha256"], first["sha256"]);
    assert_eq!(versions["needs_rescore"], 1, "alice's grade; bob's failed");
    d.stop().await;
}

/// Several nodes share uploaded plugins through the store: a daemon with a
/// data directory that never saw the upload (another node on the same
/// store) scores with the pinned file, and keeps its own copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_plugin_reaches_a_node_that_never_saw_the_file() {
    let d = TestDaemon::start_scoring(&fast(), |c| {
        c.store = None;
        short_window(c);
    })
    .await;
    let admin = d.token(Role::Admin, "admin", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let (status, up) = upload_plugin(&d, &admin, hostile_wasm()).await;
    assert_eq!(status, 201, "{up}");
    let sha = up["sha256"].as_str().expect("sha").to_owned();
    let body = assignment("shared", "hostile", json!({"mode": "ok"}), "manual");
    let (status, a) = d
        .send(
            reqwest::Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(body),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let kept = d.stop_keeping_files().await;
    let db = kept.path().join("var/viva.db");

    let other = TestDaemon::start_scoring(&fast(), move |c| {
        c.store = Some(format!("sqlite:{}", db.display()));
        short_window(c);
    })
    .await;
    let copy = other
        .dir
        .path()
        .join("var/plugins")
        .join(format!("{sha}.wasm"));
    assert!(!copy.exists(), "this node never saw the upload");
    let alice = other.token(Role::Learner, "alice", "sandbox");
    let f = tone(other.dir.path(), "a.wav", 1.0);
    let (status, sub) = other.upload(&alice, "shared", &f).await;
    assert_eq!(status, 201, "{sub}");
    let id = sub["id"].as_str().expect("id").to_owned();
    let done = other.wait_scored(&[id], Duration::from_secs(60)).await;
    assert_eq!(done[0]["state"], "awaiting_review", "{}", done[0]);
    assert_eq!(
        done[0]["score"]["report"]["plugin"]["sha256"], sha,
        "scored with the uploaded file from the store: {}",
        done[0]
    );
    assert!(copy.exists(), "the node keeps its own copy");
    other.stop().await;
    drop(kept);
}
