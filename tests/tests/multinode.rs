//! Several `viva serve` nodes on one PostgreSQL store, as a school runs
//! them: one api node, or two (HTTP, intake, LTI, grade passback; no
//! workers) behind a round-robin load balancer with no sticky sessions, and two gpu
//! nodes (the two-phase queue over the jobs each claims, with fake workers).
//! 60 students launch from the independent LTI test platform (a launch's
//! login and its id token may reach different api nodes) and upload; one
//! gpu node is killed with SIGKILL in the middle of an STT job and an api
//! node in the middle of an upload (then started again; the student retries
//! under the same idempotency key). Every accepted submission ends exactly
//! once, graded; the surviving gpu node takes over the dead one's batch and
//! leases; no node ever had an STT and an evaluator process alive at once;
//! a session and a ticket from one api node work on the other; after the
//! instructor releases, the platform's gradebook has one line item and each
//! student's grade once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use viva_daemon::store::{Location, Store};
use viva_tests::nodes::{
    Balancer, FakeTimes, append_config, events, get_json, kinds_overlapped, session,
    set_public_url, set_top_level, start, upload_to, write_config,
};
use viva_tests::platform::{Lti, Platform};
use viva_tests::tone;

const STUDENTS: usize = 60;
const ROLE: &str = "http://purl.imsglobal.org/vocab/lis/v2/membership#";
const LINK: &str = "rl-many-nodes";

fn spec(user: &str, role: &str, assignment: Option<&str>) -> Value {
    let mut s = json!({"user": user, "roles": [format!("{ROLE}{role}")], "name": format!("Student {user}"),
                       "context": "course-1", "resource_link": LINK, "ags": {"lineitems": true}});
    if let Some(a) = assignment {
        s["custom"] = json!({"viva_assignment": a});
    }
    s
}

fn token_of(page: &Value) -> String {
    page["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no session in the launch page: {page}"))
        .to_owned()
}

/// The shape: one api node (killed mid-upload: an outage until it
/// is back) and two gpu nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_and_two_gpu_nodes_grade_every_student_once_through_two_kills() {
    many_nodes(1).await;
}

/// Two api nodes behind the balancer (one killed mid-upload, the other
/// serving meanwhile) and two gpu nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_nodes_behind_a_balancer_and_two_gpu_nodes_grade_every_student_once() {
    many_nodes(2).await;
}

async fn many_nodes(api_nodes: usize) {
    if viva_tests::pg::unavailable() {
        return;
    }
    let Some(platform) = Platform::start_or_skip() else {
        return;
    };
    let root = tempfile::tempdir().expect("tmp");
    let url = viva_tests::pg::fresh_database().expect("a test database");
    let times = FakeTimes {
        stt_ms: 400,
        eval_ms: 150,
    };
    let lb = Balancer::start().await;
    // One media directory for every node (a shared filesystem on a real
    // site: NFS or CephFS mounted at the same path).
    let shared_media = root.path().join("shared/media");
    let media_line = format!("media_dir = \"{}\"", shared_media.display());
    let api_node = |name: &str, id: &str| {
        let cfg = write_config(&root.path().join(name), &url, id, "api", times);
        set_public_url(&cfg, &lb.url());
        set_top_level(&cfg, &media_line);
        append_config(
            &cfg,
            "[lti]\nallow_insecure_platforms = true\npassback_retry_backoff = \"200ms\"",
        );
        cfg
    };
    let api1_cfg = api_node("api1", "api-1");
    let api2_cfg = (api_nodes > 1).then(|| api_node("api2", "api-2"));
    let gpu1_cfg = write_config(&root.path().join("gpu1"), &url, "gpu-1", "gpu", times);
    let gpu2_cfg = write_config(&root.path().join("gpu2"), &url, "gpu-2", "gpu", times);
    set_top_level(&gpu1_cfg, &media_line);
    set_top_level(&gpu2_cfg, &media_line);
    let mut api1 = start(&api1_cfg);
    let api2 = api2_cfg.as_ref().map(|c| start(c));
    let backends = |a1: &viva_tests::process::Daemon| {
        let mut b = vec![a1.addr()];
        b.extend(api2.as_ref().map(|d| d.addr()));
        b
    };
    lb.set_backends(backends(&api1));
    let mut gpu1 = start(&gpu1_cfg);
    let _gpu2 = start(&gpu2_cfg);

    // Browsers and the platform open a connection per request, so the
    // balancer spreads every step of a launch over both api nodes.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    // A token minted with api-1's configuration works on both nodes.
    let admin = session(&api1_cfg, "admin", "many-nodes-admin");
    for node in [Some(&api1), api2.as_ref()].into_iter().flatten() {
        let r = http
            .get(format!("{}/api/v1/admin/system", node.url()))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("admin system");
        assert_eq!(r.status(), 200, "{} refused the session", node.url());
    }
    let lti = Lti {
        http: http.clone(),
        platform: platform.base.clone(),
        tool: lb.url(),
    };
    lti.register(&admin)
        .await
        .expect("dynamic registration through the balancer");
    // The instructor places the assignment with deep linking.
    let teacher = json!({"user": "teacher-1", "roles": [format!("{ROLE}Instructor")],
                         "name": "Tia Teacher", "kind": "deeplink", "context": "course-1"});
    let dl = token_of(&lti.launch(teacher).await.expect("deep-linking launch"));
    let rubric = viva_daemon::sandbox_assignment().rubric;
    let placed: Value = http
        .post(format!("{}/lti/deep-link", lb.url()))
        .bearer_auth(&dl)
        .json(&json!({"assignment": {"title": "Many nodes", "prompt": "Explain how plants make food.", "rubric": rubric}}))
        .send()
        .await
        .expect("deep link")
        .json()
        .await
        .expect("deep link answer");
    let answer: Value = http
        .post(placed["return_url"].as_str().expect("return url"))
        .form(&[("JWT", placed["jwt"].as_str().unwrap_or_default())])
        .send()
        .await
        .expect("deep link return")
        .json()
        .await
        .expect("platform answer");
    let assignment = answer["items"][0]["custom"]["viva_assignment"]
        .as_str()
        .unwrap_or_else(|| panic!("the platform did not accept the deep link: {answer}"))
        .to_owned();
    let instructor = token_of(
        &lti.launch(spec("teacher-1", "Instructor", Some(&assignment)))
            .await
            .expect("instructor launch"),
    );
    // A ticket minted on api-1 is redeemed on api-2 (when there is one), once.
    let api2_url = api2.as_ref().map(|d| d.url()).unwrap_or_else(|| api1.url());
    let ticket: Value = http
        .post(format!("{}/api/v1/tickets", api1.url()))
        .bearer_auth(&instructor)
        .json(&json!({"scope": "events"}))
        .send()
        .await
        .expect("ticket")
        .json()
        .await
        .expect("ticket json");
    let t = ticket["ticket"].as_str().expect("ticket").to_owned();
    let on2 = http
        .get(format!("{api2_url}/api/v1/events"))
        .query(&[("ticket", &t)])
        .send()
        .await
        .expect("events on api-2");
    assert_eq!(on2.status(), 200, "api-2 redeems api-1's ticket");
    drop(on2);
    let again = http
        .get(format!("{}/api/v1/events", api1.url()))
        .query(&[("ticket", &t)])
        .send()
        .await
        .expect("events on api-1");
    assert_eq!(again.status(), 401, "a ticket is single use across nodes");

    // Every student launches through the balancer.
    let mut students = Vec::new();
    for i in 0..STUDENTS {
        let user = format!("student-{i:02}");
        let page = lti
            .launch(spec(&user, "Learner", Some(&assignment)))
            .await
            .unwrap_or_else(|e| panic!("{user}'s launch: {e:#}"));
        students.push((user, token_of(&page)));
    }
    let media = root.path().join("media");
    std::fs::create_dir_all(&media).expect("media dir");
    let files: Vec<PathBuf> = (0..STUDENTS)
        .map(|i| tone(&media, &format!("u{i:02}.wav"), 1.0 + (i % 3) as f64 * 0.5))
        .collect();

    let gpu1_log = root.path().join("gpu1/fake.log");
    // student → the submission accepted for them.
    let mut accepted: HashMap<String, String> = HashMap::new();
    let mut gpu1_killed = false;
    let mut cut_off: Vec<String> = Vec::new();
    let mut api_killed = false;
    for (i, f) in files.iter().enumerate() {
        let (user, token) = &students[i];
        let key = format!("upload-{user}");
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
        // api-1 dies in the middle of an upload sent to it, and comes back;
        // the student tries again through the balancer, with the same key.
        if !api_killed && i == 30 {
            let (c, u, t, a, file, k) = (
                http.clone(),
                api1.url(),
                token.clone(),
                assignment.clone(),
                f.clone(),
                key.clone(),
            );
            let inflight =
                tokio::spawn(async move { upload_to(&c, &u, &t, &a, &file, Some(&k)).await });
            tokio::time::sleep(Duration::from_millis(30)).await;
            api1.kill().expect("kill -9 api-1");
            api_killed = true;
            let first = inflight.await.ok().flatten();
            api1 = start(&api1_cfg);
            lb.set_backends(backends(&api1));
            let retry = upload_to(&http, &lb.url(), token, &assignment, f, Some(&key)).await;
            if let (Some(a), Some(b)) = (&first, &retry) {
                assert_eq!(a, b, "a retry under the same key is the same submission");
            }
            if let Some(id) = retry.or(first) {
                accepted.insert(user.clone(), id);
            }
            continue;
        }
        if let Some(id) = upload_to(&http, &lb.url(), token, &assignment, f, Some(&key)).await {
            accepted.insert(user.clone(), id);
        }
    }
    assert!(gpu1_killed && api_killed);
    assert_eq!(
        accepted.len(),
        STUDENTS,
        "every student's upload was accepted"
    );

    // Every accepted submission ends, graded, exactly once; the instructor
    // releases each as it awaits review.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut scores: HashMap<String, f64> = HashMap::new();
    loop {
        let mut waiting = Vec::new();
        for (user, id) in &accepted {
            if scores.contains_key(user) {
                continue;
            }
            let v = get_json(
                &http,
                &format!("{}/api/v1/submissions/{id}", lb.url()),
                &instructor,
            )
            .await;
            match v["state"].as_str() {
                Some("awaiting_review") => {
                    let _ = http
                        .post(format!("{}/api/v1/submissions/{id}/release", lb.url()))
                        .bearer_auth(&instructor)
                        .send()
                        .await;
                    waiting.push((user.clone(), "releasing".to_owned()));
                }
                Some("released") => {
                    let total = v["score"]["total"].as_f64().expect("a released score");
                    scores.insert(user.clone(), total);
                }
                other => waiting.push((user.clone(), other.unwrap_or("?").to_owned())),
            }
        }
        if waiting.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "not all released: {waiting:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The platform's gradebook: one line item, each student's released
    // grade once (one FullyGraded score each, equal to Viva's).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (items, full) = loop {
        let log = lti.log().await.expect("platform log");
        let items: Vec<Value> = log["line_items"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|i| i["resourceLinkId"] == LINK)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let full: Vec<Value> = log["scores"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|s| s.get("refused").is_none())
                    .filter(|s| s["body"]["gradingProgress"] == "FullyGraded")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let users: HashSet<&str> = full
            .iter()
            .filter_map(|s| s["body"]["userId"].as_str())
            .collect();
        if users.len() >= STUDENTS {
            break (items, full);
        }
        assert!(
            Instant::now() < deadline,
            "grades reached the platform for {} of {STUDENTS} students",
            users.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(items.len(), 1, "one line item: {items:?}");
    let mut per_user: HashMap<&str, Vec<&Value>> = HashMap::new();
    for s in &full {
        per_user
            .entry(s["body"]["userId"].as_str().unwrap_or(""))
            .or_default()
            .push(s);
    }
    for (user, _) in &students {
        let posted = per_user.get(user.as_str()).cloned().unwrap_or_default();
        assert_eq!(
            posted.len(),
            1,
            "{user}'s grade reached the gradebook {} times: {posted:?}",
            posted.len()
        );
        let given = posted[0]["body"]["scoreGiven"].as_f64();
        assert_eq!(
            given,
            scores.get(user).copied(),
            "{user}: platform {given:?}, Viva {:?}",
            scores.get(user)
        );
    }

    // Each api node serves every recording (uploaded through either).
    for id in accepted.values().take(4) {
        let mut lens = Vec::new();
        let other = api2.as_ref().map(|d| d.url()).unwrap_or_else(|| api1.url());
        for node in [api1.url(), other] {
            let r = http
                .get(format!("{node}/api/v1/submissions/{id}/media"))
                .bearer_auth(&instructor)
                .send()
                .await
                .expect("media");
            assert_eq!(r.status(), 200, "{node} does not serve {id}'s media");
            lens.push(r.bytes().await.expect("media bytes").len());
        }
        assert!(lens[0] > 0 && lens[0] == lens[1], "{lens:?}");
    }
    let stored: Vec<PathBuf> = std::fs::read_dir(&shared_media)
        .expect("the shared media directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(
        stored.len(),
        STUDENTS,
        "one recording each in the shared media_dir"
    );

    // `viva doctor` checks a node's secrets key against the store's: the
    // shared file passes, another node's fails with what to do.
    let doctor = |config: &std::path::Path| -> Value {
        let mut cmd = std::process::Command::new(viva_tests::viva_bin());
        viva_tests::process::clean_viva_env(&mut cmd)
            .arg("--config")
            .arg(config)
            .args(["doctor", "--json", "--no-load"]);
        let o = viva_tests::process::output(&mut cmd, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let report: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}):\n{}", viva_tests::process::text(&o)));
        report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "secrets key"))
            .cloned()
            .unwrap_or_else(|| panic!("no secrets key check in {report:#}"))
    };
    let good = doctor(&api1_cfg);
    assert_eq!(good["status"], "ok", "{good}");
    let wrong_key = root.path().join("wrong.key");
    std::fs::write(&wrong_key, [7u8; 32]).expect("key");
    let stranger = root.path().join("stranger.toml");
    std::fs::write(
        &stranger,
        std::fs::read_to_string(&api1_cfg)
            .expect("config")
            .replace(
                &viva_tests::pg::secrets_key_file().display().to_string(),
                &wrong_key.display().to_string(),
            )
            .replace(
                &root.path().join("api1/var").display().to_string(),
                &root.path().join("stranger/var").display().to_string(),
            ),
    )
    .expect("config");
    let bad = doctor(&stranger);
    assert_eq!(bad["status"], "fail", "{bad}");
    assert!(bad.to_string().contains("does not open"), "{bad}");

    // The balancer spread the work over both api nodes.
    let served = lb.served();
    if let Some(api2) = &api2 {
        let on_api2 = served.get(&api2.addr()).copied().unwrap_or(0);
        let on_api1: u64 = served
            .iter()
            .filter(|(a, _)| **a != api2.addr())
            .map(|(_, n)| n)
            .sum();
        assert!(
            on_api1 >= 50 && on_api2 >= 50,
            "connections per node: {served:?}"
        );
    }

    // The api node's admin status names the gpu node still serving.
    let status = get_json(&http, &format!("{}/api/v1/status", lb.url()), &admin).await;
    let nodes: Vec<&str> = status["queue_nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(nodes.contains(&"gpu-2"), "{status}");
    let store = Store::open_at(&Location::Postgres(url)).expect("the store");
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
            Ok((subs, jobs, unfinished, nodes))
        })
        .await
        .expect("counts");
    // One submission per student (the upload cut by the kill left nothing
    // or became the retry's), one STT, two evaluations and one score each,
    // all done once.
    assert_eq!(subs as usize, STUDENTS);
    assert_eq!(jobs as usize, STUDENTS * 4);
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
        "{api_nodes} api node(s): {STUDENTS} students graded once; batches by node {by:?}; taken over from gpu-1: {cut_off:?}; connections {served:?}"
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
