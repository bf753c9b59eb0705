//! The two-phase scheduler on its real state machine, with real worker
//! processes (the `fake-worker` test double speaking the real protocol).
//! Concurrency is asserted by counting events in the workers' own log and
//! in the supervisor's process table, never by timing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use viva_daemon::Role;
use viva_daemon::config::Policy;
use viva_models::WorkerKind;
use viva_tests::{TestDaemon, max_overlap, tone};

fn ms(v: u64) -> String {
    v.to_string()
}

async fn upload_all(d: &TestDaemon, names: &[&str], seconds: f64) -> Vec<String> {
    let tok = d.token(Role::Learner, "student", "sandbox");
    let mut ids = Vec::new();
    for name in names {
        let f = tone(d.dir.path(), name, seconds);
        let (status, body) = d.upload(&tok, "sandbox-oral-1", &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    ids
}

/// Batch sizes in opening order, from the database.
async fn batch_sizes(d: &TestDaemon) -> Vec<i64> {
    d.state
        .store
        .read(|c| {
            let mut stmt = c.prepare(
                "SELECT COUNT(*) FROM submissions WHERE batch_id IS NOT NULL
                 GROUP BY batch_id ORDER BY batch_id",
            )?;
            let rows = stmt
                .query_map([], |r| r.get(0))?
                .collect::<viva_daemon::db::Result<Vec<i64>>>()?;
            Ok(rows)
        })
        .await
        .expect("batches")
}

fn events_of<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<(&'a str, bool)> {
    events
        .iter()
        .filter(|e| e["kind"] == kind)
        .filter_map(|e| {
            let job = e["job"].as_str()?;
            match e["ev"].as_str()? {
                "job_start" => Some((job, true)),
                "job_end" => Some((job, false)),
                _ => None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_upload_on_an_idle_daemon_starts_at_once() {
    // The window is far longer than the test may take: finishing proves the
    // batch did not wait for it to close.
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", ms(100))], |c| {
        c.scheduler.batch_window = Duration::from_secs(600);
    })
    .await;
    let ids = upload_all(&d, &["lone.wav"], 1.0).await;
    let done = d.wait_settled(&ids, Duration::from_secs(60)).await;
    assert_eq!(done[0]["state"], "evaluated", "{}", done[0]);
    assert_eq!(done[0]["evaluations"].as_array().map(Vec::len), Some(2));
    assert_eq!(batch_sizes(&d).await, vec![1]);
    let phases: Vec<&str> = d
        .state
        .scheduler
        .phase_history()
        .iter()
        .map(|p| p.phase)
        .collect();
    assert!(
        phases.windows(2).any(|w| w == ["stt", "evaluation"]),
        "{phases:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_closes_by_size() {
    // The STT worker "loads" until the gate opens: every upload is in before
    // any transcription ends, however slow the machine.
    let gate = tempfile::tempdir().expect("tempdir");
    let gate = gate.path().join("gate");
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(100)),
            ("FAKE_LOAD_GATE", gate.display().to_string()),
        ],
        |c| {
            c.scheduler.stt_batch_size = 3;
        },
    )
    .await;
    let ids = upload_all(&d, &["s1.wav", "s2.wav", "s3.wav", "s4.wav", "s5.wav"], 0.5).await;
    std::fs::write(&gate, b"open").expect("open the gate");
    d.wait_settled(&ids, Duration::from_secs(90)).await;
    assert_eq!(batch_sizes(&d).await, vec![3, 2]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_closes_by_window() {
    let gate = tempfile::tempdir().expect("tempdir");
    let gate = gate.path().join("gate");
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(100)),
            ("FAKE_LOAD_GATE", gate.display().to_string()),
        ],
        |c| {
            c.scheduler.batch_window = Duration::from_millis(500);
        },
    )
    .await;
    let first = upload_all(&d, &["w1.wav"], 0.5).await;
    // Batch 1 is open (its STT cannot finish: the worker is held loading);
    // its window passes before the second upload.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let second = upload_all(&d, &["w2.wav"], 0.5).await;
    std::fs::write(&gate, b"open").expect("open the gate");
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    d.wait_settled(&all, Duration::from_secs(90)).await;
    assert_eq!(
        batch_sizes(&d).await,
        vec![1, 1],
        "the late upload waited for batch 2"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_hold_by_count() {
    // The fake STT worker could run 3 jobs at once and there are two evaluator
    // roles: only the scheduler's limits keep the counts at 1, 1 and 2.
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(150)),
            ("FAKE_EVAL_FIXED_MS", ms(150)),
        ],
        |c| {
            c.scheduler.stt_concurrency = 1;
            c.scheduler.eval_concurrency = 1;
            c.scheduler.eval_batch_size = 2;
            if let Some(stt) = c.workers.stt.as_mut() {
                stt.args.extend(["--max-parallel".into(), "3".into()]);
            }
        },
    )
    .await;
    let names: Vec<String> = (0..5).map(|i| format!("c{i}.wav")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = upload_all(&d, &names, 0.5).await;
    d.wait_settled(&ids, Duration::from_secs(90)).await;
    let ev = d.fake_events();
    let stt = events_of(&ev, "stt");
    let eval = events_of(&ev, "evaluator");
    assert_eq!(stt.iter().filter(|e| e.1).count(), 5, "every STT job ran");
    assert_eq!(max_overlap(stt), 1, "stt_concurrency = 1");
    assert_eq!(max_overlap(eval), 1, "eval_concurrency = 1 busy evaluator");
    let items: Vec<u64> = ev
        .iter()
        .filter(|e| e["kind"] == "evaluator" && e["ev"] == "job_start")
        .filter_map(|e| e["items"].as_u64())
        .collect();
    assert!(!items.is_empty());
    assert!(
        items.iter().all(|&n| n <= 2),
        "eval_batch_size = 2: {items:?}"
    );
    assert_eq!(items.iter().sum::<u64>(), 10, "5 submissions × 2 roles");
    d.stop().await;
}

/// Walks the supervisor's process table history; returns the largest number
/// of (stt, evaluator) processes alive at once, and whether both kinds were
/// ever alive together.
fn alive_profile(d: &TestDaemon) -> (usize, usize, bool) {
    let mut alive: HashMap<u32, WorkerKind> = HashMap::new();
    let (mut max_stt, mut max_eval, mut together) = (0, 0, false);
    for e in d.state.scheduler.supervisor.history() {
        match e.event {
            "spawned" => {
                alive.insert(e.pid, e.kind);
            }
            "exited" => {
                alive.remove(&e.pid);
            }
            _ => {}
        }
        let stt = alive.values().filter(|k| **k == WorkerKind::Stt).count();
        let eval = alive.len() - stt;
        max_stt = max_stt.max(stt);
        max_eval = max_eval.max(eval);
        together |= stt > 0 && eval > 0;
    }
    (max_stt, max_eval, together)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_never_runs_stt_and_evaluation_processes_together() {
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(400)),
            ("FAKE_EVAL_FIXED_MS", ms(200)),
        ],
        |c| {
            c.scheduler.stt_batch_size = 2;
        },
    )
    .await;
    let ids = upload_all(&d, &["p1.wav", "p2.wav", "p3.wav", "p4.wav"], 0.5).await;
    d.wait_settled(&ids, Duration::from_secs(90)).await;
    let (max_stt, max_eval, together) = alive_profile(&d);
    assert!(
        max_stt >= 1 && max_eval >= 2,
        "both phases ran: {max_stt} {max_eval}"
    );
    assert!(
        !together,
        "an STT and an evaluator process were alive at the same time"
    );
    let switches = d
        .state
        .scheduler
        .phase_history()
        .iter()
        .filter(|p| p.phase == "stt")
        .count();
    assert!(switches >= 2, "two batches → two STT phases");
    // The workers' own log agrees: no evaluator started while an STT worker lived.
    let mut live: HashSet<u64> = HashSet::new();
    let mut stt_pids: HashSet<u64> = HashSet::new();
    for e in d.fake_events() {
        let pid = e["pid"].as_u64().unwrap_or(0);
        match (e["ev"].as_str(), e["kind"].as_str()) {
            (Some("start"), Some("stt")) => {
                stt_pids.insert(pid);
                live.insert(pid);
            }
            (Some("start"), Some("evaluator")) => {
                assert!(
                    live.iter().all(|p| !stt_pids.contains(p)),
                    "evaluator started while STT worker alive"
                );
                live.insert(pid);
            }
            (Some("exit"), _) => {
                live.remove(&pid);
            }
            _ => {}
        }
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_policy_overlaps_stt_and_evaluation() {
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(600)),
            ("FAKE_EVAL_FIXED_MS", ms(100)),
        ],
        |c| {
            c.scheduler.policy = Policy::Pipelined;
        },
    )
    .await;
    let ids = upload_all(&d, &["q1.wav", "q2.wav", "q3.wav", "q4.wav"], 0.5).await;
    d.wait_settled(&ids, Duration::from_secs(90)).await;
    let (_, _, together) = alive_profile(&d);
    assert!(together, "pipelined keeps both kinds of worker alive");
    let ev = d.fake_events();
    let first_eval = ev
        .iter()
        .position(|e| e["kind"] == "evaluator" && e["ev"] == "job_start")
        .expect("an evaluation ran");
    let last_stt_end = ev
        .iter()
        .rposition(|e| e["kind"] == "stt" && e["ev"] == "job_end")
        .expect("STT ran");
    assert!(
        first_eval < last_stt_end,
        "an evaluation started before the last transcription ended"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_submission_fails_alone_with_its_reason() {
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", ms(50))], |c| {
        c.scheduler.max_attempts = 2;
    })
    .await;
    let ids = upload_all(&d, &["ok1.wav", "bad-fail-always.wav", "ok2.wav"], 0.5).await;
    let done = d.wait_settled(&ids, Duration::from_secs(90)).await;
    assert_eq!(done[0]["state"], "evaluated");
    assert_eq!(done[2]["state"], "evaluated");
    assert_eq!(done[1]["state"], "failed");
    assert_eq!(done[1]["failure_code"], "transcription_failed");
    let reason = done[1]["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("2 times"), "{reason}");
    assert!(
        reason.contains("fake"),
        "the worker's message is kept: {reason}"
    );
    let attempts: i64 = {
        let id = ids[1].clone();
        d.state
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT attempts FROM jobs WHERE submission_id = ?1 AND stage = 'stt'",
                    [id],
                    |r| r.get(0),
                )?)
            })
            .await
            .expect("attempts")
    };
    assert_eq!(attempts, 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_is_restarted_and_the_job_completes() {
    let d = TestDaemon::start(&[("FAKE_STT_FIXED_MS", ms(300))], |_| {}).await;
    let ids = upload_all(&d, &["first.wav", "boom-crash-once.wav", "last.wav"], 0.5).await;
    let done = d.wait_settled(&ids, Duration::from_secs(90)).await;
    for s in &done {
        assert_eq!(s["state"], "evaluated", "{s}");
    }
    let stt_spawns = d
        .state
        .scheduler
        .supervisor
        .history()
        .iter()
        .filter(|e| e.event == "spawned" && e.kind == WorkerKind::Stt)
        .count();
    assert!(stt_spawns >= 2, "the crashed STT worker was restarted");
    let metrics = d.state.metrics.render();
    assert!(
        metrics.contains("viva_worker_restarts_total{slot=\"stt\"} 1"),
        "{metrics}"
    );
    d.stop().await;
}

/// Worker processes started so far (from the fake workers' log).
fn starts(d: &TestDaemon) -> usize {
    d.fake_events()
        .iter()
        .filter(|e| e["ev"] == "start")
        .count()
}

/// Cost-aware switching with loads that dwarf the work (as on a GPU with
/// large models): a lone upload into a quiet daemon starts at once; a
/// trickle that follows is gathered while the evaluators stay loaded (the
/// switch to STT is held, shown to staff, and counted in the students'
/// ETAs), then served with one swap each way instead of one per upload;
/// nobody waits past `max_phase_wait` for their phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_aware_switching_gathers_a_trickle_and_keeps_its_bound() {
    let bound = Duration::from_secs(6);
    let d = TestDaemon::start(
        &[
            ("FAKE_LOAD_MS", ms(400)),
            ("FAKE_STT_FIXED_MS", ms(20)),
            ("FAKE_EVAL_FIXED_MS", ms(20)),
        ],
        move |c| {
            c.scheduler.swap_work_ratio = 1.0;
            c.scheduler.max_phase_wait = bound;
            c.scheduler.batch_window = Duration::from_secs(600);
            c.intake.max_uploads_per_user = 0;
        },
    )
    .await;
    let lone = upload_all(&d, &["lone.wav"], 0.5).await;
    let done = d.wait_settled(&lone, Duration::from_secs(30)).await;
    assert_eq!(done[0]["state"], "evaluated", "{}", done[0]);
    let after_lone = starts(&d);
    assert_eq!(after_lone, 3, "one start per worker");

    let names = ["t1.wav", "t2.wav", "t3.wav", "t4.wav", "t5.wav", "t6.wav"];
    let trickle = upload_all(&d, &names, 0.5).await;
    // The evaluators are loaded and idle; six uploads' instant work does
    // not pay for two 400 ms loads, so the switch to STT is held.
    let admin = d.token(Role::Admin, "admin", "sandbox");
    let (_, status) = d.get(&admin, "/api/v1/status").await;
    assert_eq!(status["hold"]["phase"], "stt", "{status}");
    let until = status["hold"]["until_ms"].as_i64().expect("until_ms");
    let learner = d.token(Role::Learner, "student", "sandbox");
    let (_, sub) = d
        .get(&learner, &format!("/api/v1/submissions/{}", trickle[0]))
        .await;
    let eta = sub["queue"]["eta_seconds"].as_f64().expect("an ETA");
    let held_for = (until - viva_daemon::now_ms()) as f64 / 1000.0;
    assert!(
        eta >= held_for - 0.5,
        "the ETA counts the hold ({held_for:.1} s): {sub}"
    );

    let done = d.wait_settled(&trickle, Duration::from_secs(60)).await;
    assert!(done.iter().all(|s| s["state"] == "evaluated"), "{done:?}");
    let trickle_starts = starts(&d) - after_lone;
    assert!(
        trickle_starts <= 3,
        "one swap each way for the whole trickle, not one per upload: {trickle_starts} starts"
    );
    // Nobody waited past the bound (plus a load) for their phase.
    let waits: Vec<i64> = d
        .state
        .store
        .read(|c| {
            let mut stmt = c.prepare(
                "SELECT MIN(j.started_at) - s.created_at FROM submissions s
                 JOIN jobs j ON j.submission_id = s.id AND j.stage = 'stt' GROUP BY s.id",
            )?;
            let rows = stmt
                .query_map([], |r| r.get(0))?
                .collect::<viva_daemon::db::Result<Vec<i64>>>()?;
            Ok(rows)
        })
        .await
        .expect("waits");
    let limit = (bound + Duration::from_secs(3)).as_millis() as i64;
    assert!(waits.iter().all(|&w| w <= limit), "{waits:?} ms");
    d.stop().await;
}

/// The first submission of the first started query of a stage, from the
/// database (ms).
async fn first_start(d: &TestDaemon, id: &str, stage: &str) -> i64 {
    let (id, stage) = (id.to_owned(), stage.to_owned());
    d.state
        .store
        .read(move |c| {
            c.query_row(
                "SELECT MIN(started_at) FROM jobs WHERE submission_id = ?1 AND stage = ?2",
                viva_daemon::db::params![id, stage],
                |r| r.get(0),
            )
            .map_err(Into::into)
        })
        .await
        .expect("started_at")
}

/// A lone upload into a quiet daemon is promised the quick path (STT, then
/// evaluation at once): with cost-aware switching, uploads that follow
/// while it is transcribed neither join its batch nor get its evaluation
/// held for them, so the ETA its student read is kept; they are served
/// next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_uploads_quick_path_is_kept_when_others_follow() {
    let d = TestDaemon::start(
        &[
            ("FAKE_LOAD_MS", ms(400)),
            ("FAKE_STT_FIXED_MS", ms(20)),
            ("FAKE_EVAL_FIXED_MS", ms(20)),
        ],
        |c| {
            c.scheduler.swap_work_ratio = 1.0;
            c.scheduler.max_phase_wait = Duration::from_secs(2);
            c.scheduler.batch_window = Duration::from_secs(600);
            c.intake.max_uploads_per_user = 0;
        },
    )
    .await;
    // One upload first, so that load and service times are measured (the
    // priors would make one answer's evaluation pay for the swap) ...
    let warm = upload_all(&d, &["warm.wav"], 0.5).await;
    d.wait_settled(&warm, Duration::from_secs(30)).await;
    // ... then silence for longer than the arrival window (2 × 2 s).
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let lone = upload_all(&d, &["lone.wav"], 0.5).await;
    let next = upload_all(&d, &["n1.wav", "n2.wav"], 0.5).await;
    let all: Vec<String> = lone.iter().chain(&next).cloned().collect();
    let done = d.wait_settled(&all, Duration::from_secs(60)).await;
    assert!(done.iter().all(|s| s["state"] == "evaluated"), "{done:?}");
    let sizes = batch_sizes(&d).await;
    assert_eq!(
        sizes[1], 1,
        "the lone upload's batch took no one else: {sizes:?}"
    );
    let evaluated = first_start(&d, &lone[0], "eval").await;
    for id in &next {
        assert!(
            evaluated < first_start(&d, id, "stt").await,
            "the lone upload was evaluated before the next were transcribed"
        );
    }
    d.stop().await;
}

/// Workers on a GPU report the device memory they hold (NVML; here the
/// fake workers' `FAKE_DEVICE_MEMORY_MB`): the admin view and metrics show
/// the measured figures, a phase switch records the memory before and
/// after (the STT worker's 3000 MiB, then the evaluators' 8000 MiB with the
/// STT process gone), and `auto` decides again from the measured figures
/// instead of the configured `memory_mb` (18 000 MiB configured does not
/// fit the 12 000 MiB budget, the 11 000 measured do: pipelined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_gpu_memory_drives_auto_and_records_each_switch() {
    let d = TestDaemon::start(&[], |c| {
        c.scheduler.policy = Policy::Auto;
        c.scheduler.gpu_memory_budget_mb = 12_000;
        if let Some(w) = c.workers.stt.as_mut() {
            w.memory_mb = 6_000;
            w.env.insert("FAKE_DEVICE_MEMORY_MB".into(), "3000".into());
        }
        for w in c.workers.evaluators.values_mut() {
            w.memory_mb = 6_000;
            w.env.insert("FAKE_DEVICE_MEMORY_MB".into(), "4000".into());
        }
    })
    .await;
    let admin = d.token(Role::Admin, "admin", "sandbox");
    // The scheduler's first snapshot comes a moment after the start.
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = d.get(&admin, "/api/v1/status").await.1;
        if status["policy"] != "" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status["policy"], "two-phase",
        "configured figures: {status}"
    );
    let ids = upload_all(&d, &["one.wav"], 0.5).await;
    let done = d.wait_settled(&ids, Duration::from_secs(30)).await;
    assert_eq!(done[0]["state"], "evaluated", "{}", done[0]);
    // The record completes once the evaluators have reported.
    let mut sys = serde_json::Value::Null;
    for _ in 0..100 {
        sys = d.get(&admin, "/api/v1/admin/system").await.1;
        if sys["memory_swaps"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let swap = &sys["memory_swaps"][0];
    assert_eq!(swap["to"], "evaluator", "{sys}");
    assert_eq!(swap["before_mb"], 3000, "{swap}");
    assert_eq!(swap["after_mb"], 8000, "{swap}");
    assert_eq!(swap["device_free_before_mb"], 81_559 - 3000, "{swap}");
    assert_eq!(swap["device_free_after_mb"], 81_559 - 4000, "{swap}");
    let evaluator = sys["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "a"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(evaluator["measured_mb"], 4000, "{sys}");
    assert_eq!(evaluator["memory_mb"], 6000, "{sys}");
    let (_, status) = d.get(&admin, "/api/v1/status").await;
    assert_eq!(
        status["policy"], "pipelined",
        "measured figures fit the budget: {status}"
    );
    let metrics = reqwest::get(format!("{}/metrics", d.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains(&format!(
            "viva_worker_device_memory_bytes{{slot=\"evaluator:a\"}} {}",
            4000u64 << 20
        )),
        "{metrics}"
    );
    d.stop().await;
}

/// Spawns per slot, and whether a process of a slot `a` picks was ever
/// alive with one of a slot `b` picks (from the supervisor's history).
fn slot_profile(
    d: &TestDaemon,
    a: impl Fn(&str) -> bool,
    b: impl Fn(&str) -> bool,
) -> (HashMap<String, usize>, bool) {
    let mut alive: HashMap<u32, String> = HashMap::new();
    let mut spawns: HashMap<String, usize> = HashMap::new();
    let mut together = false;
    for e in d.state.scheduler.supervisor.history() {
        match e.event {
            "spawned" => {
                *spawns.entry(e.slot.clone()).or_default() += 1;
                alive.insert(e.pid, e.slot.clone());
            }
            "exited" => {
                alive.remove(&e.pid);
            }
            _ => {}
        }
        together |= alive.values().any(|s| a(s)) && alive.values().any(|s| b(s));
    }
    (spawns, together)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_evaluator_stays_loaded_through_phase_switches() {
    // Evaluator "b" says `remote` in its Hello (as viva-remote-worker
    // does): two-phase still keeps STT and the local evaluator "a" apart,
    // while "b" is started once and served in every phase.
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(300)),
            ("FAKE_EVAL_FIXED_MS", ms(150)),
        ],
        |c| {
            c.scheduler.stt_batch_size = 2;
            c.scheduler.swap_work_ratio = 0.0;
            if let Some(b) = c.workers.evaluators.get_mut("b") {
                b.env.insert("FAKE_REMOTE".into(), "1".into());
                b.memory_mb = 0;
            }
        },
    )
    .await;
    let ids = upload_all(&d, &["r1.wav", "r2.wav", "r3.wav", "r4.wav"], 0.5).await;
    let subs = d.wait_settled(&ids, Duration::from_secs(90)).await;
    let (spawns, local_together) = slot_profile(&d, |s| s == "stt", |s| s == "evaluator:a");
    assert!(
        !local_together,
        "the local evaluator was alive with the STT worker: {spawns:?}"
    );
    assert_eq!(
        spawns.get("evaluator:b"),
        Some(&1),
        "the remote evaluator is started once and never stopped by a switch: {spawns:?}"
    );
    let (_, remote_together) = slot_profile(&d, |s| s == "stt", |s| s == "evaluator:b");
    assert!(
        remote_together,
        "the remote evaluator stayed loaded while STT ran: {spawns:?}"
    );
    let switches = d
        .state
        .scheduler
        .phase_history()
        .iter()
        .filter(|p| p.phase == "stt")
        .count();
    assert!(switches >= 2, "two batches → two STT phases ({switches})");
    let snap = d.state.scheduler.snapshot();
    assert_eq!(snap.policy, "two-phase");
    let b = snap
        .workers
        .iter()
        .find(|p| p.slot == "evaluator:b")
        .expect("the remote evaluator is still running");
    assert!(b.remote);
    // The admin view: the remote role's server, health and latency.
    let admin = d.token(Role::Admin, "root", "sandbox");
    let (status, sys) = d.get(&admin, "/api/v1/admin/system").await;
    assert_eq!(status, 200, "{sys}");
    let models = sys["models"].as_array().expect("models");
    let row = |role: &str| {
        models
            .iter()
            .find(|m| m["role"] == role)
            .unwrap_or_else(|| panic!("no row for {role}: {sys}"))
    };
    let remote = &row("b")["remote"];
    assert_eq!(remote["url"], "http://fake-server.invalid/v1", "{sys}");
    assert_eq!(remote["ok"], true);
    assert_eq!(remote["latency_p50_ms"], 42);
    assert!(
        remote["requests"].as_u64().is_some_and(|n| n >= 2),
        "{remote}"
    );
    assert!(row("a")["remote"].is_null(), "{sys}");
    for s in &subs {
        assert_eq!(s["state"], "evaluated", "{s}");
        assert_eq!(s["evaluations"].as_array().map(Vec::len), Some(2), "{s}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_stt_worker_makes_two_phase_pipelined() {
    // With speech to text on a server, nothing on this GPU needs keeping
    // apart: the scheduler runs pipelined and never stops the STT worker.
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(300)),
            ("FAKE_EVAL_FIXED_MS", ms(150)),
        ],
        |c| {
            c.scheduler.stt_batch_size = 2;
            c.scheduler.swap_work_ratio = 0.0;
            if let Some(stt) = c.workers.stt.as_mut() {
                stt.env.insert("FAKE_REMOTE".into(), "1".into());
            }
        },
    )
    .await;
    let ids = upload_all(&d, &["t1.wav", "t2.wav", "t3.wav", "t4.wav"], 0.5).await;
    let subs = d.wait_settled(&ids, Duration::from_secs(90)).await;
    let (spawns, together) = slot_profile(&d, |s| s == "stt", |s| s.starts_with("evaluator:"));
    assert_eq!(spawns.get("stt"), Some(&1), "{spawns:?}");
    assert!(together, "the evaluators ran beside the remote STT worker");
    assert_eq!(d.state.scheduler.snapshot().policy, "pipelined");
    for s in &subs {
        assert_eq!(s["state"], "evaluated", "{s}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_evaluator_has_its_own_concurrency_not_eval_concurrency() {
    // eval_concurrency = 1 holds the local evaluator "a" to one call; the
    // remote "b" (max_parallel_jobs 3, as its `concurrency` would say) runs
    // up to three calls of eval_batch_size = 1 at once beside it.
    let d = TestDaemon::start(
        &[
            ("FAKE_STT_FIXED_MS", ms(50)),
            ("FAKE_EVAL_FIXED_MS", ms(400)),
        ],
        |c| {
            c.scheduler.stt_batch_size = 6;
            c.scheduler.min_batch_wait = Duration::from_secs(2);
            c.scheduler.eval_concurrency = 1;
            c.scheduler.eval_batch_size = 1;
            c.scheduler.swap_work_ratio = 0.0;
            if let Some(b) = c.workers.evaluators.get_mut("b") {
                b.env.insert("FAKE_REMOTE".into(), "1".into());
                b.args.extend(["--max-parallel".into(), "3".into()]);
            }
        },
    )
    .await;
    let names: Vec<String> = (0..6).map(|i| format!("k{i}.wav")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = upload_all(&d, &names, 0.5).await;
    let subs = d.wait_settled(&ids, Duration::from_secs(90)).await;
    assert!(subs.iter().all(|s| s["state"] == "evaluated"), "{subs:?}");
    let ev = d.fake_events();
    let of_role = |role: &str| {
        events_of(
            &ev.iter()
                .filter(|e| e["role"] == role)
                .cloned()
                .collect::<Vec<_>>(),
            "evaluator",
        )
        .into_iter()
        .map(|(j, s)| (j.to_owned(), s))
        .collect::<Vec<_>>()
    };
    let a = of_role("a");
    let b = of_role("b");
    assert_eq!(
        max_overlap(a.iter().map(|(j, s)| (j.as_str(), *s))),
        1,
        "eval_concurrency = 1 holds the local evaluator"
    );
    let b_max = max_overlap(b.iter().map(|(j, s)| (j.as_str(), *s)));
    assert_eq!(
        b_max, 3,
        "the remote evaluator runs its own 3 calls at once (dispatched together)"
    );
    d.stop().await;
}
