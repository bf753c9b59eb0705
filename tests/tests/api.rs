//! The HTTP API end to end: authorization, intake of real media (good and
//! bad), and live status over SSE.

use std::time::Duration;

use futures::StreamExt;
use viva_daemon::Role;
use viva_tests::{TestDaemon, speech, tone, video};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_enforced() {
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", "50".into())], |_| {}).await;
    let http = reqwest::Client::new();
    for path in [
        "/api/v1/me",
        "/api/v1/status",
        "/api/v1/assignments",
        "/api/v1/submissions/sub_x",
        "/api/v1/events",
    ] {
        let r = http
            .get(format!("{}{path}", d.url))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 401, "{path} without a token");
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        assert_eq!(body["error"]["code"], "unauthorized", "{path}");
    }
    let forged = http
        .get(format!("{}/api/v1/me", d.url))
        .bearer_auth("eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl")
        .send()
        .await
        .expect("request");
    assert_eq!(forged.status().as_u16(), 401);
    // The health endpoints stay open.
    let h = http
        .get(format!("{}/healthz", d.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(h.status().as_u16(), 200);

    let alice = d.token(Role::Learner, "alice", "sandbox");
    let bob = d.token(Role::Learner, "bob", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let other_teacher = d.token(Role::Instructor, "stranger", "chemistry-101");
    let f = tone(d.dir.path(), "alice.wav", 0.5);
    let (status, body) = d.upload(&alice, "sandbox-oral-1", &f).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/submissions/{id}");

    assert_eq!(d.get(&alice, &path).await.0, 200, "her own submission");
    // Learners see the queue, not the machinery: no pids, models or errors.
    let (status, learner_status) = d.get(&alice, "/api/v1/status").await;
    assert_eq!(status, 200);
    assert!(learner_status.get("phase").is_some(), "{learner_status}");
    for hidden in ["workers", "worker_errors", "stats", "entries"] {
        assert!(
            learner_status.get(hidden).is_none(),
            "{hidden}: {learner_status}"
        );
    }
    let (_, staff_status) = d.get(&teacher, "/api/v1/status").await;
    assert!(staff_status.get("workers").is_some(), "{staff_status}");
    // The data directory and what is in it are the owner's only.
    {
        use std::os::unix::fs::PermissionsExt;
        let data = d.dir.path().join("var");
        let mut private = vec![data.clone(), data.join("media")];
        if !viva_tests::pg::enabled() {
            private.push(data.join("viva.db"));
        }
        for p in private {
            let mode = std::fs::metadata(&p).expect("exists").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
        }
    }
    assert_eq!(
        d.get(&bob, &path).await.0,
        404,
        "another learner's submission"
    );
    assert_eq!(
        d.get(&teacher, &path).await.0,
        200,
        "instructor of the course"
    );
    assert_eq!(
        d.get(&other_teacher, &path).await.0,
        404,
        "instructor of another course"
    );
    let (_, list) = d.get(&bob, "/api/v1/submissions").await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(0),
        "bob sees none of alice's"
    );
    let (_, list) = d.get(&teacher, "/api/v1/submissions").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // Assignments: learners read, instructors write.
    let input = serde_json::json!({
        "id": "oral-2", "title": "Explain osmosis", "prompt": "Explain osmosis in a minute.",
        "rubric": {"criteria": [{"id": "content", "title": "Content", "levels": [
            {"label": "weak", "points": 0}, {"label": "strong", "points": 2}]}]}
    });
    let r = http
        .post(format!("{}/api/v1/assignments", d.url))
        .bearer_auth(&alice)
        .json(&input)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .post(format!("{}/api/v1/assignments", d.url))
        .bearer_auth(&teacher)
        .json(&input)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 201);
    let bad = serde_json::json!({"title": "x", "prompt": "y", "rubric": {"criteria": []}});
    let r = http
        .post(format!("{}/api/v1/assignments", d.url))
        .bearer_auth(&teacher)
        .json(&bad)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    assert_eq!(body["error"]["code"], "invalid_rubric");
    assert_eq!(
        d.get(&other_teacher, "/api/v1/assignments/oral-2").await.0,
        404
    );
    let (_, me) = d.get(&alice, "/api/v1/me").await;
    assert_eq!(me["user_id"], "alice");
    assert_eq!(me["roles"], serde_json::json!(["learner"]));
    d.stop().await;
}

async fn submission_count(d: &TestDaemon) -> i64 {
    d.state
        .store
        .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM submissions", [], |r| r.get(0))?))
        .await
        .expect("count")
}

fn dir_entries(p: &std::path::Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_accepts_real_media_and_rejects_bad_input_cleanly() {
    let d = TestDaemon::start(&[], |c| {
        c.intake.max_upload_bytes = 400 * 1024;
        c.intake.max_duration = Duration::from_secs(8);
        // No workers: this test is about intake only.
        c.workers.stt = None;
        c.workers.evaluators.clear();
    })
    .await;
    let tok = d.token(Role::Learner, "carol", "sandbox");
    let dir = d.dir.path();

    let good = [
        speech(
            dir,
            "answer.wav",
            "Plants make glucose from light.",
            "en-us",
        ),
        speech(dir, "answer.mp3", "Chlorophyll absorbs light.", "en-gb"),
        speech(dir, "answer.webm", "Oxygen is released.", "en+f3"),
        video(dir, "clip.mp4", 2.0, true),
    ];
    for f in &good {
        let (status, body) = d.upload(&tok, "sandbox-oral-1", f).await;
        assert_eq!(status, 201, "{}: {body}", f.display());
        assert!(body["duration_seconds"].as_f64().unwrap_or(0.0) > 0.5);
        assert_eq!(body["state"], "queued");
    }
    let accepted = submission_count(&d).await;
    assert_eq!(accepted, 4);

    // Multipart works too.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(std::fs::read(&good[0]).expect("read"))
            .file_name("form.wav")
            .mime_str("audio/wav")
            .expect("mime"),
    );
    let r = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/assignments/sandbox-oral-1/submissions",
            d.url
        ))
        .bearer_auth(&tok)
        .multipart(form)
        .send()
        .await
        .expect("multipart");
    assert_eq!(r.status().as_u16(), 201);
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    assert_eq!(body["attempt"], 5, "attempts are numbered per student");

    let empty = dir.join("empty.mp4");
    std::fs::write(&empty, b"").expect("write");
    let text = dir.join("essay.mp4");
    std::fs::write(&text, "This is my essay, not a video.\n".repeat(50)).expect("write");
    let full = video(dir, "whole.mp4", 3.0, true);
    let bytes = std::fs::read(&full).expect("read");
    let truncated = dir.join("truncated.mp4");
    std::fs::write(&truncated, &bytes[..bytes.len() * 6 / 10]).expect("write");
    let silent_video = video(dir, "silent.mp4", 2.0, false);
    let long = tone(dir, "long.wav", 10.0);
    let huge = tone(dir, "huge.wav", 7.5); // 16 kHz s16: 240 KB … under size
    let huge_bytes = std::fs::read(&huge).expect("read");
    let oversize = dir.join("oversize.wav");
    std::fs::write(&oversize, [huge_bytes.clone(), huge_bytes].concat()).expect("write");

    let cases = [
        (&empty, 400, "empty_upload"),
        (&text, 415, "not_media"),
        (&truncated, 422, "undecodable"),
        (&silent_video, 422, "no_audio"),
        (&long, 422, "too_long"),
        (&oversize, 413, "too_large"),
    ];
    for (file, status, code) in cases {
        let (got, body) = d.upload(&tok, "sandbox-oral-1", file).await;
        assert_eq!(got, status, "{}: {body}", file.display());
        assert_eq!(body["error"]["code"], code, "{}", file.display());
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "a message a student can act on"
        );
    }
    // Nothing half-written: no new rows, no staging leftovers, no media dirs.
    assert_eq!(submission_count(&d).await, 5);
    let var = dir.join("var");
    assert_eq!(dir_entries(&var.join("staging")), 0, "staging is empty");
    assert_eq!(
        dir_entries(&var.join("media")),
        5,
        "one media dir per accepted upload"
    );
    let metrics = d.state.metrics.render();
    assert!(metrics.contains("viva_uploads_rejected_total{code=\"not_media\"} 1"));
    d.stop().await;
}

/// A retried upload (same Idempotency-Key) returns the submission its first
/// try made, for that student only; a new key makes a new attempt; a
/// malformed key is refused before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_the_assignments_limit_is_refused_and_nothing_is_kept() {
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", "50".into())], |_| {}).await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let bob = d.token(Role::Learner, "bob", "sandbox");
    let http = reqwest::Client::new();
    let (_, a) = d.get(&teacher, "/api/v1/assignments/sandbox-oral-1").await;
    assert_eq!(
        a["max_attempts"],
        serde_json::Value::Null,
        "unlimited by default"
    );
    let put = |max: serde_json::Value| {
        let body = serde_json::json!({
            "title": a["title"], "prompt": a["prompt"], "rubric": a["rubric"],
            "plugin": a["plugin"], "plugin_config": a["plugin_config"],
            "release_policy": a["release_policy"], "max_attempts": max,
        });
        let (http, url, teacher) = (http.clone(), d.url.clone(), teacher.clone());
        async move {
            let r = http
                .put(format!("{url}/api/v1/assignments/sandbox-oral-1"))
                .bearer_auth(&teacher)
                .json(&body)
                .send()
                .await
                .expect("put");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, body) = put(serde_json::json!(0)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_assignment"))
    );
    let (status, body) = put(serde_json::json!(2)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["max_attempts"], 2);
    // A learner cannot lift it.
    let r = http
        .put(format!("{}/api/v1/assignments/sandbox-oral-1", d.url))
        .bearer_auth(&alice)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("put");
    assert!(r.status().is_client_error());

    let clip = tone(d.dir.path(), "answer.wav", 1.0);
    for attempt in 1..=2 {
        let (status, v) = d.upload(&alice, "sandbox-oral-1", &clip).await;
        assert_eq!(status, 201, "attempt {attempt}: {v}");
        assert_eq!(v["attempt"], attempt);
    }
    let media = d.dir.path().join("var/media");
    let staging = d.dir.path().join("var/staging");
    let (status, v) = d.upload(&alice, "sandbox-oral-1", &clip).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "attempts_used_up");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("all 2 attempts"), "{message}");
    assert!(message.contains("ask your instructor"), "{message}");
    assert_eq!(submission_count(&d).await, 2, "nothing of the third kept");
    assert_eq!(dir_entries(&media), 2);
    assert_eq!(dir_entries(&staging), 0);
    // Another student has their own attempts.
    let (status, v) = d.upload(&bob, "sandbox-oral-1", &clip).await;
    assert_eq!(status, 201, "{v}");
    // The instructor lifts the limit: alice's third attempt is taken.
    let (status, _) = put(serde_json::Value::Null).await;
    assert_eq!(status, 200);
    let (status, v) = d.upload(&alice, "sandbox-oral-1", &clip).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["attempt"], 3);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_upload_with_its_key_makes_one_submission() {
    let d = TestDaemon::start(&[], |c| {
        c.workers.stt = None;
        c.workers.evaluators.clear();
    })
    .await;
    let carol = d.token(Role::Learner, "carol", "sandbox");
    let dave = d.token(Role::Learner, "dave", "sandbox");
    let f = speech(d.dir.path(), "a.wav", "Plants make glucose.", "en-us");
    let bytes = std::fs::read(&f).expect("read");
    let send = |token: &str, key: &str| {
        reqwest::Client::new()
            .post(format!(
                "{}/api/v1/assignments/sandbox-oral-1/submissions",
                d.url
            ))
            .query(&[("filename", "a.wav")])
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .body(bytes.clone())
            .send()
    };
    let first = send(&carol, "rec-0001-aaaa").await.expect("upload");
    assert_eq!(first.status().as_u16(), 201);
    let first: serde_json::Value = first.json().await.expect("json");
    let again = send(&carol, "rec-0001-aaaa").await.expect("retry");
    assert_eq!(again.status().as_u16(), 200, "a retry is not a new upload");
    let again: serde_json::Value = again.json().await.expect("json");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["attempt"], 1);
    assert_eq!(submission_count(&d).await, 1);
    // Another student's key space is their own; a new key is a new attempt.
    let other = send(&dave, "rec-0001-aaaa").await.expect("upload");
    assert_eq!(other.status().as_u16(), 201);
    let next = send(&carol, "rec-0002-bbbb").await.expect("upload");
    assert_eq!(next.status().as_u16(), 201);
    let next: serde_json::Value = next.json().await.expect("json");
    assert_eq!(next["attempt"], 2);
    assert_ne!(next["id"], first["id"]);
    // A malformed key: a clear 400, nothing stored.
    let bad = send(&carol, "short").await.expect("upload");
    assert_eq!(bad.status().as_u16(), 400);
    let bad: serde_json::Value = bad.json().await.expect("json");
    assert_eq!(bad["error"]["code"], "bad_idempotency_key");
    assert_eq!(submission_count(&d).await, 3);
    assert_eq!(dir_entries(&d.dir.path().join("var/media")), 3);
    d.stop().await;
}

/// Reads SSE frames `(event, data)` until a "done" event.
async fn collect_sse(resp: reqwest::Response) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let event = frame
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                let v = serde_json::from_str(data.trim()).unwrap_or_default();
                let done = event == "done";
                out.push((event, v));
                if done {
                    return out;
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_shows_position_falling_and_phases_in_order() {
    // The STT worker stays "loading" until the gate file exists, so all four
    // uploads queue up before any runs, however slow the machine.
    let tmp = tempfile::tempdir().expect("tempdir");
    let gate = tmp.path().join("gate");
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", "300".into()),
            ("FAKE_LOAD_GATE", gate.display().to_string()),
        ],
        |_| {},
    )
    .await;
    let tok = d.token(Role::Learner, "dave", "sandbox");
    let mut ids = Vec::new();
    for i in 0..4 {
        let f = tone(d.dir.path(), &format!("sse{i}.wav"), 0.5);
        let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
        assert_eq!(status, 201);
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    // Watch the last one with a single-use ticket, as a browser would.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/tickets", d.url))
        .bearer_auth(&tok)
        .json(&serde_json::json!({"scope": "events"}))
        .send()
        .await
        .expect("ticket");
    let ticket: serde_json::Value = r.json().await.expect("json");
    let ticket = ticket["ticket"].as_str().expect("ticket").to_owned();
    let url = format!(
        "{}/api/v1/events?submission={}&ticket={ticket}",
        d.url, ids[3]
    );
    let resp = reqwest::get(&url).await.expect("sse");
    assert_eq!(resp.status().as_u16(), 200);
    std::fs::write(&gate, b"open").expect("open the gate");
    let events = tokio::time::timeout(Duration::from_secs(90), collect_sse(resp))
        .await
        .expect("stream finished");
    // The ticket was single-use.
    assert_eq!(
        reqwest::get(&url).await.expect("again").status().as_u16(),
        401
    );

    let stt_positions: Vec<u64> = events
        .iter()
        .filter(|(_, v)| v["phase"] == "stt")
        .filter_map(|(_, v)| v["position"].as_u64())
        .collect();
    assert!(stt_positions.len() >= 2, "{events:?}");
    assert!(
        stt_positions[0] > 1,
        "it started behind others: {stt_positions:?}"
    );
    assert!(
        stt_positions.windows(2).all(|w| w[1] <= w[0]),
        "position never rises: {stt_positions:?}"
    );
    assert_eq!(stt_positions.last(), Some(&1));
    let etas: Vec<f64> = events
        .iter()
        .filter(|(_, v)| v["phase"] == "stt")
        .filter_map(|(_, v)| v["eta_seconds"].as_f64())
        .collect();
    assert!(
        etas.iter().all(|e| *e > 0.0),
        "an ETA is always shown: {etas:?}"
    );
    // Phases appear in order: stt → evaluation → done, never backwards.
    let mut order: Vec<String> = Vec::new();
    for (_, v) in &events {
        let p = v["phase"].as_str().unwrap_or_default().to_owned();
        if order.last() != Some(&p) {
            order.push(p);
        }
    }
    let rank = |p: &str| match p {
        "stt" => 0,
        "evaluation" => 1,
        "scoring" => 2,
        _ => 3,
    };
    assert!(
        order.windows(2).all(|w| rank(&w[0]) < rank(&w[1])),
        "{order:?}"
    );
    assert!(order.contains(&"evaluation".to_owned()), "{order:?}");
    let (last_event, last) = events.last().expect("events");
    assert_eq!(last_event, "done");
    assert_eq!(last["state"], "evaluated");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_export_and_deletion() {
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", "20".into())], |c| {
        c.retention.retention_days = 30;
    })
    .await;
    let erin = d.token(Role::Learner, "erin", "sandbox");
    let frank = d.token(Role::Learner, "frank", "sandbox");
    let admin = d.token(Role::Admin, "root", "sandbox");
    let f = tone(d.dir.path(), "erin.wav", 0.5);
    let (_, body) = d.upload(&erin, "sandbox-oral-1", &f).await;
    let id = body["id"].as_str().expect("id").to_owned();
    d.wait_settled(std::slice::from_ref(&id), Duration::from_secs(60))
        .await;

    // Media plays with a single-use media ticket, never a token in the URL.
    let http = reqwest::Client::new();
    let t: serde_json::Value = http
        .post(format!("{}/api/v1/tickets", d.url))
        .bearer_auth(&erin)
        .json(&serde_json::json!({"scope": format!("media:{id}")}))
        .send()
        .await
        .expect("ticket")
        .json()
        .await
        .expect("json");
    let media_url = format!(
        "{}/api/v1/submissions/{id}/media?ticket={}",
        d.url,
        t["ticket"].as_str().expect("ticket")
    );
    let r = reqwest::get(&media_url).await.expect("media");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.bytes().await.expect("bytes").len() as u64,
        std::fs::metadata(&f).expect("meta").len()
    );
    assert_eq!(
        reqwest::get(&media_url)
            .await
            .expect("again")
            .status()
            .as_u16(),
        401
    );
    let denied = http
        .post(format!("{}/api/v1/tickets", d.url))
        .bearer_auth(&frank)
        .json(&serde_json::json!({"scope": format!("media:{id}")}))
        .send()
        .await
        .expect("ticket");
    assert_eq!(
        denied.status().as_u16(),
        404,
        "no media ticket for someone else's"
    );

    // Export: one's own data, not anyone else's.
    let (status, export) = d.get(&erin, "/api/v1/users/erin/export").await;
    assert_eq!(status, 200);
    assert_eq!(export["submissions"].as_array().map(Vec::len), Some(1));
    assert_eq!(d.get(&frank, "/api/v1/users/erin/export").await.0, 403);
    // Release means release: before it, a learner's own export holds no
    // evaluation, score, flag or review reason; the administrator's is whole.
    let mine = &export["submissions"][0];
    assert_eq!(mine["state"], "evaluated");
    assert_eq!(mine["evaluations"], serde_json::json!([]), "{mine}");
    assert!(mine["score"].is_null(), "{mine}");
    let (_, full) = d.get(&admin, "/api/v1/users/erin/export").await;
    assert!(
        full["submissions"][0]["evaluations"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "{full}"
    );
    let set_score = |state: &'static str, share: bool| {
        let sid = id.clone();
        let score = serde_json::json!({"total": 9.0, "max": 16.0, "needs_review": true,
            "reasons": ["instruction-like content in the transcript"],
            "override": {"by": "teacher@sandbox", "note": "suspected prompt injection", "share_note": share}});
        d.state.store.write(move |tx| {
            tx.execute(
                "UPDATE submissions SET state = ?2, score = ?3 WHERE id = ?1",
                viva_daemon::params![sid, state, score.to_string()],
            )?;
            Ok(())
        })
    };
    set_score("awaiting_review", false).await.expect("score");
    let (_, export) = d.get(&erin, "/api/v1/users/erin/export").await;
    let text = export.to_string();
    for hidden in ["needs_review", "instruction-like", "suspected", "\"total\""] {
        assert!(!text.contains(hidden), "{hidden} before release: {text}");
    }
    let (_, view) = d.get(&erin, &format!("/api/v1/submissions/{id}")).await;
    assert!(view["score"].is_null(), "{view}");
    // After release: the grade, but the override note only when shared.
    set_score("released", false).await.expect("score");
    let (_, export) = d.get(&erin, "/api/v1/users/erin/export").await;
    assert_eq!(export["submissions"][0]["score"]["total"], 9.0);
    assert!(!export.to_string().contains("suspected"), "{export}");
    let (_, view) = d.get(&erin, &format!("/api/v1/submissions/{id}")).await;
    assert!(view["score"]["override"].get("note").is_none(), "{view}");
    set_score("released", true).await.expect("score");
    let (_, export) = d.get(&erin, "/api/v1/users/erin/export").await;
    assert_eq!(
        export["submissions"][0]["score"]["override"]["note"],
        "suspected prompt injection"
    );
    set_score("evaluated", false).await.expect("score");

    // Retention: nothing is due yet; once settled 31 days ago, media goes.
    let purge = |tok: String| {
        let http = http.clone();
        let url = format!("{}/api/v1/admin/purge", d.url);
        async move {
            let r = http.post(url).bearer_auth(tok).send().await.expect("purge");
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    assert_eq!(purge(erin.clone()).await.0, 403);
    assert_eq!(purge(admin.clone()).await.1["media_purged"], 0);
    let sid = id.clone();
    d.state
        .store
        .write(move |tx| {
            tx.execute(
                "UPDATE submissions SET finished_at = ?2 WHERE id = ?1",
                viva_daemon::params![sid, viva_daemon::now_ms() - 31 * 86_400_000],
            )?;
            Ok(())
        })
        .await
        .expect("age it");
    assert_eq!(purge(admin.clone()).await.1["media_purged"], 1);
    let (_, s) = d.get(&erin, &format!("/api/v1/submissions/{id}")).await;
    assert_eq!(s["media_available"], false);
    assert!(s["transcript"]["text"].is_string(), "transcripts stay");
    let media_dir = d.dir.path().join("var/media").join(&id);
    assert!(!media_dir.exists());

    // Deletion: admins only; afterwards nothing of erin remains.
    let del = |tok: String| {
        let http = http.clone();
        let url = format!("{}/api/v1/users/erin", d.url);
        async move {
            http.delete(url)
                .bearer_auth(tok)
                .send()
                .await
                .expect("delete")
        }
    };
    assert_eq!(del(erin.clone()).await.status().as_u16(), 403);
    let r = del(admin.clone()).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        d.get(&admin, &format!("/api/v1/submissions/{id}")).await.0,
        404
    );
    let (_, export) = d.get(&admin, "/api/v1/users/erin/export").await;
    assert_eq!(export["submissions"].as_array().map(Vec::len), Some(0));
    assert!(export["profile"].is_null());
    d.stop().await;
}

/// `GET /api/v1/admin/doctor`: `viva doctor`'s checks, run by the daemon
/// for its administrators only; models load only when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_doctor_route_runs_the_installation_checks_for_admins_only() {
    let model_dir = tempfile::tempdir().expect("tempdir");
    let model = model_dir.path().join("fake-model.bin");
    std::fs::write(&model, b"fake model").expect("write");
    let m = model.clone();
    let d = TestDaemon::start(&[], move |c| {
        c.sandbox.enabled = false;
        c.public_url = Some("https://localhost".into());
        for w in c
            .workers
            .stt
            .iter_mut()
            .chain(c.workers.evaluators.values_mut())
        {
            w.model_path = m.clone();
        }
    })
    .await;
    let learner = d.token(Role::Learner, "alice", "sandbox");
    let teacher = d.token(Role::Instructor, "teach", "sandbox");
    let admin = d.token(Role::Admin, "root", "sandbox");
    for token in [&learner, &teacher] {
        let (s, v) = d.get(token, "/api/v1/admin/doctor").await;
        assert_eq!(s, 403, "{v}");
        assert_eq!(v["error"]["code"], "forbidden", "{v}");
    }
    let anon = reqwest::get(format!("{}/api/v1/admin/doctor", d.url))
        .await
        .expect("request");
    assert_eq!(anon.status().as_u16(), 401);

    let (s, report) = d.get(&admin, "/api/v1/admin/doctor").await;
    assert_eq!(s, 200, "{report}");
    let checks = report["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for name in [
        "config",
        "sandbox",
        "public_url",
        "data_dir",
        "disk",
        "database",
        "ffmpeg",
        "worker:stt",
        "worker:a",
        "worker:b",
        "platforms",
        "clock",
        "keys",
        "plugins",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert_eq!(report["ok"], true, "{report:#}");
    // Without load_models the workers are not started again.
    assert!(
        checks
            .iter()
            .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("worker:")))
            .all(|c| c["details"]["load_ms"].is_null()),
        "{report:#}"
    );

    let (s, loaded) = d.get(&admin, "/api/v1/admin/doctor?load_models=true").await;
    assert_eq!(s, 200, "{loaded}");
    let stt = loaded["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "worker:stt"))
        .expect("worker:stt");
    assert_eq!(stt["status"], "ok", "{stt}");
    assert!(stt["details"]["load_ms"].is_u64(), "{stt}");
    d.stop().await;

    // The test daemon's defaults: sandbox on, plain-http public_url, a
    // model "file" that is /dev/null. Each is its own failing line with a fix.
    let d = TestDaemon::start(&[], |_| {}).await;
    let admin = d.token(Role::Admin, "root", "sandbox");
    let (s, report) = d.get(&admin, "/api/v1/admin/doctor").await;
    assert_eq!(s, 200, "{report}");
    assert_eq!(report["ok"], false, "{report:#}");
    for name in ["sandbox", "public_url", "worker:stt", "worker:a"] {
        let c = report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("{name} missing: {report:#}"));
        assert_eq!(c["status"], "fail", "{c}");
        assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{c}");
    }
    d.stop().await;
}
