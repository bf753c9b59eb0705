//! `GET /api/v1/admin/timeline`: batch and job times from the database, for
//! administrators only (as the rest of the admin API).

use std::time::Duration;

use viva_daemon::Role;
use viva_tests::{TestDaemon, tone};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_shows_batches_and_jobs_to_admins_only() {
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", "20".into())], |_| {}).await;
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let admin = d.token(Role::Admin, "root", "sandbox");
    let f = tone(d.dir.path(), "alice.wav", 0.5);
    let (status, body) = d.upload(&alice, "sandbox-oral-1", &f).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    d.wait_settled(std::slice::from_ref(&id), Duration::from_secs(60))
        .await;

    // Learners and instructors: forbidden, as admin/system is; no session: 401.
    for token in [&alice, &teacher] {
        let (s, v) = d.get(token, "/api/v1/admin/timeline").await;
        assert_eq!(s, 403, "{v}");
        assert_eq!(v["error"]["code"], "forbidden", "{v}");
    }
    let anon = reqwest::get(format!("{}/api/v1/admin/timeline", d.url))
        .await
        .expect("request");
    assert_eq!(anon.status().as_u16(), 401);

    let (s, t) = d.get(&admin, "/api/v1/admin/timeline").await;
    assert_eq!(s, 200, "{t}");
    let batches = t["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 1, "{t}");
    let b = &batches[0];
    assert_eq!(b["size"], 1, "{t}");
    let opened = b["opened_at"].as_i64().expect("opened_at");
    let stt_done = b["stt_done_at"].as_i64().expect("stt_done_at");
    assert!(opened <= stt_done, "{t}");
    let jobs = t["jobs"].as_array().expect("jobs");
    let mine: Vec<_> = jobs.iter().filter(|j| j["submission_id"] == id).collect();
    // One STT job and one evaluation per role ("a", "b"); this daemon does
    // not score.
    let mut stages: Vec<String> = mine
        .iter()
        .map(|j| {
            format!(
                "{}:{}",
                j["stage"].as_str().unwrap_or("?"),
                j["role"].as_str().unwrap_or("?")
            )
        })
        .collect();
    stages.sort();
    assert_eq!(stages, ["eval:a", "eval:b", "stt:"], "{t}");
    for j in &mine {
        assert_eq!(j["state"], "done", "{j}");
        assert_eq!(j["batch_id"], b["id"], "{j}");
        let started = j["started_at"].as_i64().expect("started_at");
        let finished = j["finished_at"].as_i64().expect("finished_at");
        assert!(
            j["created_at"].as_i64().expect("created_at") <= started,
            "{j}"
        );
        assert!(started <= finished, "{j}");
    }
    let stt = mine.iter().find(|j| j["stage"] == "stt").expect("stt job");
    let eval = mine
        .iter()
        .find(|j| j["stage"] == "eval")
        .expect("eval job");
    assert!(
        stt["finished_at"].as_i64() <= eval["started_at"].as_i64(),
        "{t}"
    );

    // `since` after everything: nothing; `limit` keeps the newest.
    let later = stt_done.max(eval["finished_at"].as_i64().unwrap_or(0)) + 60_000;
    let (_, none) = d
        .get(&admin, &format!("/api/v1/admin/timeline?since={later}"))
        .await;
    assert_eq!(none["batches"].as_array().map(Vec::len), Some(0), "{none}");
    assert_eq!(none["jobs"].as_array().map(Vec::len), Some(0), "{none}");
    let (_, one) = d.get(&admin, "/api/v1/admin/timeline?limit=1").await;
    assert_eq!(one["jobs"].as_array().map(Vec::len), Some(1), "{one}");
    d.stop().await;
}
