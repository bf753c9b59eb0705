//! The whole pipeline on the real workers: uploads → Whisper (STT phase) →
//! SmolLM2 and Gemma 3 (evaluation phase) → the default rubric plugin →
//! stored grade. Real models from `$VIVA_MODELS_DIR` (see tests/src/real.rs).

use std::time::Duration;

use viva_daemon::Role;
use viva_tests::real::use_real_workers;
use viva_tests::{TestDaemon, speech};

const ANSWERS: [&str; 2] = [
    "Photosynthesis is how plants make their food. They take in sunlight, water and \
     carbon dioxide and turn them into glucose and oxygen.",
    "Plants use light energy from the sun. The leaves absorb carbon dioxide and the \
     roots take up water, and the plant releases oxygen.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_transcribed_evaluated_twice_and_scored_on_real_models() {
    let d = TestDaemon::start_scoring(&[], |c| {
        use_real_workers(c);
        c.scheduler.batch_window = Duration::from_secs(3);
        c.scheduler.retry_backoff = Duration::from_secs(1);
        c.workers.load_timeout = Duration::from_secs(180);
        c.workers.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let mut ids = Vec::new();
    for (i, (text, voice)) in ANSWERS.iter().zip(["en-us", "en-gb"]).enumerate() {
        let student = format!("student-{i}");
        let token = d.token(Role::Learner, &student, "sandbox");
        // A video and a WAV: ffmpeg normalises both at intake.
        let name = if i == 0 { "answer.mp4" } else { "answer.wav" };
        let media = speech(d.dir.path(), &format!("{i}-{name}"), text, voice);
        let (status, body) = d.upload(&token, "sandbox-oral-1", &media).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    let done = d.wait_scored(&ids, Duration::from_secs(600)).await;

    for (s, text) in done.iter().zip(ANSWERS) {
        assert_ne!(s["state"], "failed", "{s}");
        // Whisper heard the answer: most content words come back.
        let heard = s["transcript"]["text"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        let words: Vec<&str> = ["sunlight", "water", "carbon", "dioxide", "oxygen", "plant"]
            .into_iter()
            .filter(|w| text.to_lowercase().contains(w))
            .collect();
        let found = words.iter().filter(|w| heard.contains(*w)).count();
        assert!(
            found * 4 >= words.len() * 3,
            "transcript {heard:?} lacks the spoken words {words:?}"
        );
        assert!(
            !s["transcript"]["segments"]
                .as_array()
                .expect("segments")
                .is_empty()
        );
        // One evaluation per role, each from its own model, every criterion
        // once with a level of the rubric.
        let evals = s["evaluations"].as_array().expect("evaluations");
        let mut roles: Vec<&str> = evals.iter().filter_map(|e| e["role"].as_str()).collect();
        roles.sort();
        assert_eq!(roles, ["a", "b"], "{s}");
        for e in evals {
            let model = e["model"].as_str().unwrap_or_default();
            let want = if e["role"] == "a" {
                "smollm2-135m-instruct"
            } else {
                "gemma-3-270m"
            };
            assert_eq!(model, want);
            let mut ids: Vec<&str> = e["ratings"]
                .as_array()
                .expect("ratings")
                .iter()
                .map(|r| r["criterion_id"].as_str().unwrap_or_default())
                .collect();
            ids.sort();
            assert_eq!(ids, ["content", "language", "organisation"], "{e}");
            assert!(e["generated_tokens"].as_u64().unwrap_or(0) > 0, "{e}");
        }
        // The evidence checks on real output: every evaluator flag (the
        // test models' "1" / "none" evidence is flagged) holds the grade
        // for review.
        let flagged = evals
            .iter()
            .filter(|e| e["flags"].as_array().is_some_and(|f| !f.is_empty()))
            .count();
        eprintln!(
            "{} of 2 evaluations flagged: {}",
            flagged,
            evals
                .iter()
                .map(|e| format!(
                    "{}: flags {} ratings {}",
                    e["role"], e["flags"], e["ratings"]
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if flagged > 0 {
            assert_eq!(s["score"]["needs_review"], true, "{s}");
            assert!(
                s["score"]["evaluator_flags"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty()),
                "{s}"
            );
        }
        // The default plugin scored it: a total within the rubric's range.
        let total = s["score"]["total"].as_f64().expect("score total");
        let max = s["score"]["max"].as_f64().expect("score max");
        assert!(max > 0.0 && (0.0..=max).contains(&total), "{s}");
    }

    // Two-phase: the evaluators started only after the STT phase ended.
    let phases: Vec<&str> = d
        .state
        .scheduler
        .phase_history()
        .iter()
        .map(|p| p.phase)
        .filter(|p| *p != "idle")
        .collect();
    let first_eval = phases.iter().position(|p| *p == "evaluation");
    let first_stt = phases.iter().position(|p| *p == "stt");
    assert!(
        matches!((first_stt, first_eval), (Some(s), Some(e)) if s < e),
        "phases {phases:?}"
    );
    d.stop().await;
}
