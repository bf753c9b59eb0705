//! The daemon's worker supervisor driving the real fake-worker binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;
use viva_daemon::workers::{Supervisor, WorkerError, WorkerExit, WorkerSpec, WorkerTimeouts};
use viva_models::protocol::ModelSpec;
use viva_models::{
    Criterion, DaemonMessage, EvaluateItem, EvaluateRequest, JobPayload, JobResult, Level,
    PROTOCOL_VERSION, Rubric, TranscribeRequest, WorkerKind, WorkerMessage,
};
use viva_tests::process::Lines;

const FAKE_WORKER: &str = env!("CARGO_BIN_EXE_fake-worker");

fn spec(kind: WorkerKind, args: &[&str], env: &[(&str, String)]) -> WorkerSpec {
    let role = args
        .iter()
        .position(|a| *a == "--role")
        .and_then(|i| args.get(i + 1))
        .map(|r| r.to_string());
    WorkerSpec {
        slot: match &role {
            Some(r) => format!("evaluator:{r}"),
            None => kind.as_str().to_string(),
        },
        kind,
        role,
        command: PathBuf::from(FAKE_WORKER),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        model: ModelSpec {
            name: "fake-model".into(),
            path: "/dev/null".into(),
            options: serde_json::Value::Null,
        },
        memory_mb: 10,
    }
}

fn supervisor(stop_grace_ms: u64) -> (Supervisor, mpsc::UnboundedReceiver<WorkerExit>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let timeouts = WorkerTimeouts {
        handshake: Duration::from_secs(10),
        load: Duration::from_secs(10),
        stop_grace: Duration::from_millis(stop_grace_ms),
    };
    (Supervisor::new("test", timeouts, tx), rx)
}

fn transcribe(wav: &Path) -> JobPayload {
    JobPayload::Transcribe(TranscribeRequest {
        wav_path: wav.display().to_string(),
        audio_seconds: 2.0,
        language: None,
        initial_prompt: None,
    })
}

fn transcript_text(r: JobResult) -> String {
    match r {
        JobResult::Transcript(t) => t.text,
        other => panic!("unexpected {other:?}"),
    }
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

fn gone(pid: u32) -> bool {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The FAKE_LOG events as (ev, pid, job, items).
fn read_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("log line is JSON"))
        .collect()
}

/// The lifecycle events, without the `request` lines that precede each job.
fn events(log: &[serde_json::Value]) -> Vec<String> {
    log.iter()
        .filter(|e| e["ev"] != "request")
        .map(|e| e["ev"].as_str().expect("ev").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_worker_runs_concurrent_calls_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    let (sup, mut exits) = supervisor(5000);
    let env = [
        ("FAKE_LOG", log.display().to_string()),
        ("FAKE_STT_FIXED_MS", "300".into()),
        ("FAKE_LOAD_MS", "50".into()),
    ];
    let h = sup
        .start(spec(
            WorkerKind::Stt,
            &["--kind", "stt", "--max-parallel", "2"],
            &env,
        ))
        .await
        .expect("start");
    assert_eq!(h.max_parallel_jobs(), 2);
    assert!(h.load_ms() >= 50, "load_ms {}", h.load_ms());

    let (ptx, mut prx) = mpsc::unbounded_channel();
    let (a, b) = tokio::join!(
        h.call(transcribe(&dir.path().join("a.wav")), Some(ptx)),
        h.call(transcribe(&dir.path().join("b.wav")), None),
    );
    assert_eq!(transcript_text(a.expect("a")), "fake transcript of a");
    assert_eq!(transcript_text(b.expect("b")), "fake transcript of b");
    assert_eq!(prx.recv().await, Some((0, 1)));
    assert_eq!(prx.recv().await, Some((1, 1)));

    let info = &sup.table()[0];
    assert_eq!(
        (info.state, info.jobs_done, info.in_flight),
        ("ready", 2, 0)
    );
    assert!(info.rss_bytes.is_some_and(|b| b > 0));

    let pid = h.pid();
    assert_eq!(h.stop().await, "exit status: 0");
    assert!(gone(pid), "pid {pid} still exists after stop()");
    let exit = exits.recv().await.expect("exit");
    assert!(exit.expected);
    assert_eq!(sup.alive(WorkerKind::Stt), 0);

    // The jobs overlapped: the second started before the first ended.
    let log = read_log(&log);
    assert_eq!(
        events(&log),
        [
            "start",
            "loaded",
            "job_start",
            "job_start",
            "job_end",
            "job_end",
            "exit"
        ]
    );
    assert!(log.iter().all(|e| e["pid"] == pid && e["kind"] == "stt"));
}

#[tokio::test]
async fn crash_once_fails_the_call_and_a_restart_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("crash-once.wav");
    let (sup, mut exits) = supervisor(5000);
    let s = spec(
        WorkerKind::Stt,
        &["--kind", "stt"],
        &[("FAKE_STT_FIXED_MS", "100".into())],
    );

    let h = sup.start(s.clone()).await.expect("start");
    let err = h.call(transcribe(&wav), None).await.expect_err("crash");
    match &err {
        WorkerError::Crashed { pid, status, .. } => {
            assert_eq!(*pid, h.pid());
            assert!(status.contains("SIGABRT"), "{status}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let exit = exits.recv().await.expect("exit reported");
    assert!(!exit.expected);
    assert_eq!(exit.pid, h.pid());
    assert_eq!(sup.alive(WorkerKind::Stt), 0);
    assert!(gone(h.pid()));
    assert!(Path::new(&format!("{}.crashed", wav.display())).exists());

    let h2 = sup.start(s).await.expect("restart");
    assert_ne!(h2.pid(), h.pid());
    let text = transcript_text(h2.call(transcribe(&wav), None).await.expect("second try"));
    assert_eq!(text, "fake transcript of crash-once");
    sup.stop_all().await;
    assert!(gone(h2.pid()));
    assert!(exits.recv().await.expect("exit").expected);
    let evs: Vec<_> = sup.history().iter().map(|e| e.event).collect();
    assert_eq!(
        evs,
        ["spawned", "ready", "exited", "spawned", "ready", "exited"]
    );
}

#[tokio::test]
async fn injected_job_failure_and_hung_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sup, _exits) = supervisor(300);
    let h = sup
        .start(spec(
            WorkerKind::Stt,
            &["--kind", "stt", "--max-parallel", "2"],
            &[],
        ))
        .await
        .expect("start");
    let err = h
        .call(transcribe(&dir.path().join("fail-always.wav")), None)
        .await
        .expect_err("injected failure");
    assert!(
        matches!(err, WorkerError::Job { ref code, retryable: true, .. } if code == "fake_failure"),
        "{err:?}"
    );

    let h2 = h.clone();
    let hung_wav = dir.path().join("hang.wav");
    let hung = tokio::spawn(async move { h2.call(transcribe(&hung_wav), None).await });
    wait_until(|| h.in_flight() == 1).await;
    assert_eq!(sup.table()[0].state, "busy");
    // Shutdown on a parallel worker exits at once even with a job hanging.
    let status = h.stop().await;
    assert_eq!(status, "exit status: 0");
    let err = hung.await.expect("join").expect_err("stopped");
    assert!(matches!(err, WorkerError::Stopped), "{err:?}");
    assert!(gone(h.pid()));

    // A single-threaded worker stuck in a job never reads Shutdown: killed.
    let h = sup
        .start(spec(WorkerKind::Stt, &["--kind", "stt"], &[]))
        .await
        .expect("start");
    let h2 = h.clone();
    let hung_wav = dir.path().join("hang.wav");
    let hung = tokio::spawn(async move { h2.call(transcribe(&hung_wav), None).await });
    wait_until(|| h.in_flight() == 1).await;
    let status = h.stop().await;
    assert!(status.contains("SIGKILL"), "{status}");
    assert!(gone(h.pid()));
    assert!(matches!(
        hung.await.expect("join"),
        Err(WorkerError::Stopped)
    ));
}

fn rubric() -> Rubric {
    let levels = ["poor", "fair", "good"]
        .iter()
        .enumerate()
        .map(|(i, l)| Level {
            label: l.to_string(),
            points: i as f64,
            descriptor: String::new(),
        })
        .collect::<Vec<_>>();
    Rubric {
        criteria: ["content", "clarity"]
            .iter()
            .map(|id| Criterion {
                id: id.to_string(),
                title: id.to_string(),
                description: String::new(),
                weight: 1.0,
                levels: levels.clone(),
            })
            .collect(),
    }
}

fn item(id: &str, transcript: &str) -> EvaluateItem {
    EvaluateItem {
        submission_id: id.into(),
        assignment_prompt: "Explain photosynthesis.".into(),
        rubric: rubric(),
        transcript: transcript.into(),
        exemplars: Vec::new(),
        language: None,
    }
}

#[tokio::test]
async fn evaluator_batches_with_item_failures_and_crash_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    let (sup, mut exits) = supervisor(5000);
    let env = [
        ("FAKE_LOG", log.display().to_string()),
        ("FAKE_MARKER_DIR", dir.path().display().to_string()),
        ("FAKE_EVAL_MS_PER_ITEM", "20".into()),
    ];
    let s = spec(
        WorkerKind::Evaluator,
        &["--kind", "evaluator", "--role", "a"],
        &env,
    );
    let h = sup.start(s.clone()).await.expect("start");
    assert_eq!((h.slot(), h.role()), ("evaluator:a", Some("a")));
    let long = "Plants turn light into chemical energy. ".repeat(5);
    let batch = EvaluateRequest {
        items: vec![
            item("s1", &long),
            item("s2", "EVAL_FAIL please"),
            item("s3", "short"),
        ],
    };
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let r = h
        .call(JobPayload::Evaluate(batch), Some(ptx))
        .await
        .expect("evaluate");
    let JobResult::Evaluations(resp) = r else {
        panic!("unexpected {r:?}")
    };
    assert_eq!(resp.outcomes.len(), 3);
    let e1 = resp.outcomes[0].evaluation.as_ref().expect("s1 evaluated");
    assert_eq!((e1.role.as_str(), e1.model.as_str()), ("a", "fake-model"));
    assert_eq!(e1.ratings.len(), 2);
    assert!(
        e1.ratings
            .iter()
            .all(|r| r.level == "fair" && r.rationale == "fake evaluator a")
    );
    assert_eq!(
        e1.ratings[0].evidence,
        long.chars().take(60).collect::<String>()
    );
    assert!(resp.outcomes[1].evaluation.is_none() && resp.outcomes[1].error.is_some());
    assert!(resp.outcomes[2].evaluation.is_some());
    let mut progress = vec![];
    while let Ok(p) = prx.try_recv() {
        progress.push(p);
    }
    assert_eq!(progress, [(1, 3), (2, 3), (3, 3)]);

    let crash = EvaluateRequest {
        items: vec![item("s9", "EVAL_CRASH_ONCE")],
    };
    let err = h
        .call(JobPayload::Evaluate(crash.clone()), None)
        .await
        .expect_err("crash");
    assert!(matches!(err, WorkerError::Crashed { .. }), "{err:?}");
    assert!(!exits.recv().await.expect("exit").expected);
    assert!(dir.path().join("s9.crashed").exists());
    let h = sup.start(s).await.expect("restart");
    let r = h
        .call(JobPayload::Evaluate(crash), None)
        .await
        .expect("retry");
    let JobResult::Evaluations(resp) = r else {
        panic!("unexpected {r:?}")
    };
    assert!(resp.outcomes[0].evaluation.is_some());
    sup.stop_all().await;

    let log = read_log(&log);
    let starts: Vec<_> = log.iter().filter(|e| e["ev"] == "job_start").collect();
    assert_eq!(starts[0]["items"], 3);
    assert_eq!(starts[0]["role"], "a");
    assert_eq!(starts[0]["kind"], "evaluator");
}

/// Closing a worker's stdin (what happens when the daemon dies) makes it exit.
#[test]
fn fake_worker_exits_when_stdin_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    let mut child = Command::new(FAKE_WORKER)
        .args(["--kind", "stt"])
        .env("FAKE_LOG", &log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn fake worker");
    let mut stdin = child.stdin.take().expect("stdin");
    // Read with a deadline: a worker that stops answering fails the test
    // (and exits once its stdin drops) instead of hanging it.
    let stdout = Lines::spawn(child.stdout.take().expect("stdout"));
    let read = || -> WorkerMessage {
        let line = stdout
            .next(Duration::from_secs(30))
            .expect("a frame within 30 s")
            .expect("the worker closed stdout");
        viva_models::protocol::decode(line.trim().as_bytes()).expect("frame")
    };
    let hello = read();
    assert!(
        matches!(hello, WorkerMessage::Hello { protocol, kind: WorkerKind::Stt, .. } if protocol == PROTOCOL_VERSION),
        "{hello:?}"
    );
    for msg in [
        DaemonMessage::Hello {
            protocol: PROTOCOL_VERSION,
            daemon_version: "test".into(),
        },
        DaemonMessage::Load {
            model: ModelSpec {
                name: "m".into(),
                path: "/dev/null".into(),
                options: serde_json::Value::Null,
            },
        },
    ] {
        let frame = viva_models::protocol::encode(&msg).expect("encode");
        stdin.write_all(&frame).expect("write");
    }
    assert!(matches!(read(), WorkerMessage::Loaded { .. }));
    drop(stdin);
    let status = viva_tests::process::wait(&mut child, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("fake worker did not exit after its stdin closed: {e}"));
    assert!(status.success(), "{status}");
    assert_eq!(events(&read_log(&log)), ["start", "loaded", "exit"]);
}
