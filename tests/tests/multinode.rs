//! Several `viva serve` nodes on one PostgreSQL store: one api node (HTTP,
//! intake, passback; no workers) and two gpu nodes (the two-phase queue
//! over the jobs each claims, with fake workers). 60 uploads; one gpu node
//! is killed with SIGKILL in the middle of an STT job and the api node in
//! the middle of an upload (then started again). Every accepted submission
//! ends exactly once, graded; the surviving gpu node takes over the dead
//! one's batch and leases; no node ever had an STT and an evaluator process
//! alive at once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use viva_daemon::store::{Location, Store};
use viva_tests::nodes::{
    FakeTimes, events, get_json, kinds_overlapped, session, start, upload, write_config,
};
use viva_tests::tone;

const UPLOADS: usize = 60;

fn skip() -> bool {
    if viva_tests::pg::bin_dir().is_none() && std::env::var_os("VIVA_TEST_POSTGRES").is_none() {
        assert!(
            std::env::var_os("VIVA_REQUIRE_POSTGRES").is_none(),
            "VIVA_REQUIRE_POSTGRES is set but PostgreSQL's server is not installed"
        );
        eprintln!("SKIPPED: PostgreSQL's server is not installed (apt-get install postgresql)");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_grade_every_upload_once_through_two_kills() {
    if skip() {
        return;
    }
    let root = tempfile::tempdir().expect("tmp");
    let url = viva_tests::pg::fresh_database().expect("a test database");
    let times = FakeTimes {
        stt_ms: 400,
        eval_ms: 150,
    };
    let api_cfg = write_config(&root.path().join("api"), &url, "api-1", "api", times);
    let gpu1_cfg = write_config(&root.path().join("gpu1"), &url, "gpu-1", "gpu", times);
    let gpu2_cfg = write_config(&root.path().join("gpu2"), &url, "gpu-2", "gpu", times);
    let mut api = start(&api_cfg);
    let mut gpu1 = start(&gpu1_cfg);
    let _gpu2 = start(&gpu2_cfg);
    let student = session(&api_cfg, "learner", "many-nodes-student");
    let admin = session(&api_cfg, "admin", "many-nodes-admin");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let media = root.path().join("media");
    std::fs::create_dir_all(&media).expect("media dir");
    let files: Vec<PathBuf> = (0..UPLOADS)
        .map(|i| tone(&media, &format!("u{i:02}.wav"), 1.0 + (i % 3) as f64 * 0.5))
        .collect();

    let gpu1_log = root.path().join("gpu1/fake.log");
    let mut accepted = Vec::new();
    let mut gpu1_killed = false;
    let mut cut_off: Vec<String> = Vec::new();
    let mut api_killed = false;
    for (i, f) in files.iter().enumerate() {
        // gpu-1 dies in the middle of an STT job.
        if !gpu1_killed && i >= 12 {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let evs = events(&gpu1_log);
                let started: HashSet<&str> = evs
                    .iter()
                    .filter(|e| e["ev"] == "job_start" && e["kind"] == "stt")
                    .filter_map(|e| e["job"].as_str())
                    .collect();
                let ended: HashSet<&str> = evs
                    .iter()
                    .filter(|e| e["ev"] == "job_end" && e["kind"] == "stt")
                    .filter_map(|e| e["job"].as_str())
                    .collect();
                let running: Vec<&str> = started.difference(&ended).copied().collect();
                if !running.is_empty() {
                    // The recordings gpu-1 is transcribing as it dies.
                    cut_off = evs
                        .iter()
                        .filter(|e| e["ev"] == "request" && e["kind"] == "stt")
                        .filter(|e| running.contains(&e["job"].as_str().unwrap_or("")))
                        .filter_map(|e| e["request"]["wav_path"].as_str().map(str::to_owned))
                        .collect();
                    break;
                }
                assert!(Instant::now() < deadline, "gpu-1 never ran an STT job");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            gpu1.kill().expect("kill -9 gpu-1");
            gpu1_killed = true;
        }
        // The api node dies in the middle of an upload, and comes back.
        if !api_killed && i == 30 {
            let (c, u, t, file) = (client.clone(), api.url(), student.clone(), f.clone());
            let inflight = tokio::spawn(async move { upload(&c, &u, &t, &file).await });
            tokio::time::sleep(Duration::from_millis(30)).await;
            api.kill().expect("kill -9 the api node");
            api_killed = true;
            if let Ok(Some(id)) = inflight.await {
                accepted.push(id);
            }
            api = start(&api_cfg);
            continue;
        }
        if let Some(id) = upload(&client, &api.url(), &student, f).await {
            accepted.push(id);
        }
    }
    assert!(gpu1_killed && api_killed);
    assert!(accepted.len() >= UPLOADS - 2, "{} accepted", accepted.len());

    // Every accepted submission ends, graded, exactly once.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last = Vec::new();
    loop {
        let mut settled = 0;
        last.clear();
        for id in &accepted {
            let v = get_json(
                &client,
                &format!("{}/api/v1/submissions/{id}", api.url()),
                &admin,
            )
            .await;
            let state = v["state"].as_str().unwrap_or("").to_owned();
            if ["awaiting_review", "released"].contains(&state.as_str()) {
                settled += 1;
            }
            last.push((id.clone(), state));
        }
        if settled == accepted.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all graded: {:?}",
            last.iter()
                .filter(|(_, s)| s != "released" && s != "awaiting_review")
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The api node's admin status names the gpu node still serving.
    let status = get_json(&client, &format!("{}/api/v1/status", api.url()), &admin).await;
    let nodes: Vec<&str> = status["queue_nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(nodes.contains(&"gpu-2"), "{status}");
    let store = Store::open_at(&Location::Postgres(url)).expect("the store");
    let ids = accepted.clone();
    let (subs, jobs, unfinished, batches_by_node): (i64, i64, i64, Vec<(String, i64)>) = store
        .read(move |c| {
            let subs: i64 = c.query_row("SELECT COUNT(*) FROM submissions", [], |r| r.get(0))?;
            let jobs: i64 = c.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?;
            let unfinished: i64 =
                c.query_row("SELECT COUNT(*) FROM jobs WHERE state <> 'done'", [], |r| {
                    r.get(0)
                })?;
            let nodes = c
                .prepare("SELECT COALESCE(node, ''), COUNT(*) FROM batches GROUP BY 1 ORDER BY 1")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<viva_daemon::db::Result<_>>()?;
            let _ = ids;
            Ok((subs, jobs, unfinished, nodes))
        })
        .await
        .expect("counts");
    // One submission per accepted upload (an upload cut by the kill left
    // nothing), one STT, two evaluations and one score each, all done once.
    assert_eq!(subs as usize, accepted.len());
    assert_eq!(jobs as usize, accepted.len() * 4);
    assert_eq!(unfinished, 0);
    let by: HashMap<String, i64> = batches_by_node.into_iter().collect();
    assert!(by.get("gpu-1").copied().unwrap_or(0) >= 1, "{by:?}");
    assert!(by.get("gpu-2").copied().unwrap_or(0) >= 1, "{by:?}");
    // The dead node's STT jobs ran again on the live one.
    assert!(!cut_off.is_empty(), "gpu-1 was killed mid-STT");
    let gpu2_ended: HashSet<String> = {
        let evs = events(&root.path().join("gpu2/fake.log"));
        let done: HashSet<&str> = evs
            .iter()
            .filter(|e| e["ev"] == "job_end" && e["ok"] == true)
            .filter_map(|e| e["job"].as_str())
            .collect();
        evs.iter()
            .filter(|e| e["ev"] == "request" && e["kind"] == "stt")
            .filter(|e| done.contains(e["job"].as_str().unwrap_or("")))
            .filter_map(|e| e["request"]["wav_path"].as_str().map(str::to_owned))
            .collect()
    };
    for wav in &cut_off {
        assert!(
            gpu2_ended.contains(wav),
            "{wav}, cut off on gpu-1, was not transcribed by gpu-2"
        );
    }
    eprintln!(
        "{} uploads accepted; batches by node {by:?}; taken over from gpu-1: {cut_off:?}",
        accepted.len()
    );
    // No node had both kinds of model loaded at once.
    for node in ["gpu1", "gpu2"] {
        let log = root.path().join(node).join("fake.log");
        assert!(!events(&log).is_empty(), "{node} ran nothing");
        if let Some(what) = kinds_overlapped(&log) {
            panic!("{node}: {what}");
        }
    }
}
