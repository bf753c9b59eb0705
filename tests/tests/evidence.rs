//! Evaluations a student or instructor can trust, end to end with the fake
//! workers: an evaluator that writes junk ("1", "none", "1.1.1.…", a
//! paraphrase that is not in the transcript — the fake worker's
//! `EVAL_JUNK` transcript marker, planted through the upload's file name)
//! is flagged, the grade is held for review under `auto` and
//! `auto-unless-flagged` whatever the plugin says (the built-in
//! weighted-criteria, and the test-only `hostile` plugin, which reports
//! full marks and `needs_review = false` and ignores every flag), and the
//! released feedback a learner reads falls back to the rubric's level
//! descriptors.

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

fn assignment(id: &str, plugin: &str, config: Value, release: &str) -> Value {
    let sandbox = viva_daemon::sandbox_assignment();
    json!({
        "id": id,
        "title": "Evidence test",
        "prompt": "Explain photosynthesis.",
        "rubric": sandbox.rubric,
        "plugin": plugin,
        "plugin_config": config,
        "release_policy": release,
    })
}

fn flag_codes(submission: &Value) -> Vec<String> {
    submission["evaluations"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["flags"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| {
            f.as_str()
                .map(|f| viva_models::evidence::flag_code(f).to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_evaluations_are_flagged_held_from_auto_release_and_never_shown_to_the_student() {
    let d = TestDaemon::start_scoring(&fast(), |c| {
        c.scheduler.batch_window = Duration::from_millis(300);
    })
    .await;
    let admin = d.token(Role::Admin, "admin", "sandbox");
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let alice = d.token(Role::Learner, "alice", "sandbox");
    let post = reqwest::Method::POST;

    let hostile =
        std::fs::read(viva_plugins::builtin::built_guest("hostile")).expect("hostile plugin built");
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/plugins", d.url))
        .bearer_auth(&admin)
        .header("content-type", "application/wasm")
        .body(hostile)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 201);

    let assignments = [
        ("wc-auto", "weighted-criteria", json!({}), "auto"),
        (
            "wc-unless",
            "weighted-criteria",
            json!({}),
            "auto-unless-flagged",
        ),
        ("hostile-auto", "hostile", json!({"mode": "ok"}), "auto"),
        (
            "hostile-unless",
            "hostile",
            json!({"mode": "ok"}),
            "auto-unless-flagged",
        ),
    ];
    for (id, plugin, config, release) in &assignments {
        let (status, body) = d
            .send(
                post.clone(),
                &teacher,
                "/api/v1/assignments",
                Some(assignment(id, plugin, config.clone(), release)),
            )
            .await;
        assert_eq!(status, 201, "{id}: {body}");
    }

    // Per assignment: a junk evaluation, and a clean control.
    let mut junk = Vec::new();
    let mut clean = Vec::new();
    for (id, ..) in &assignments {
        for (kind, list) in [("EVAL_JUNK", &mut junk), ("clean", &mut clean)] {
            let f = tone(d.dir.path(), &format!("{id}-{kind}.wav"), 1.0);
            let (status, body) = d.upload(&alice, id, &f).await;
            assert_eq!(status, 201, "{body}");
            list.push(body["id"].as_str().expect("id").to_owned());
        }
    }
    let all: Vec<String> = junk.iter().chain(&clean).cloned().collect();
    d.wait_scored(&all, Duration::from_secs(90)).await;

    for id in &clean {
        let (_, s) = d.get(&teacher, &format!("/api/v1/submissions/{id}")).await;
        assert_eq!(
            s["state"], "released",
            "a clean evaluation is released: {s}"
        );
        assert!(flag_codes(&s).is_empty(), "{s}");
    }
    for id in &junk {
        let (_, s) = d.get(&teacher, &format!("/api/v1/submissions/{id}")).await;
        assert_eq!(
            s["state"], "awaiting_review",
            "a flagged evaluation is never released automatically: {s}"
        );
        let codes = flag_codes(&s);
        assert!(
            codes.iter().any(|c| c == "evidence_not_in_transcript")
                && codes.iter().any(|c| c == "degenerate_output"),
            "{codes:?}"
        );
        let score = &s["score"];
        assert_eq!(score["needs_review"], true, "{score}");
        let reasons: Vec<&str> = score["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("flagged: evidence_not_in_transcript")),
            "the instructor is told why: {reasons:?}"
        );
        assert!(
            score["evaluator_flags"]
                .as_array()
                .is_some_and(|f| !f.is_empty()),
            "{score}"
        );
        // The instructor still sees what the evaluator wrote.
        assert_eq!(s["evaluations"][0]["ratings"][0]["evidence"], "1", "{s}");
    }
    // The hostile plugin said "no review needed": the daemon overruled it.
    let (_, h) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", junk[2]))
        .await;
    assert_eq!(h["score"]["report"]["needs_review"], false, "{h}");

    // Released by the instructor, the weighted-criteria grade reads the
    // rubric's descriptors where the evaluators wrote junk.
    let (status, body) = d
        .send(
            post.clone(),
            &teacher,
            &format!("/api/v1/submissions/{}/release", junk[0]),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, mine) = d
        .get(&alice, &format!("/api/v1/submissions/{}", junk[0]))
        .await;
    assert_eq!(mine["state"], "released", "{mine}");
    let report = &mine["score"]["report"];
    let feedback: Vec<&str> = report["criteria"]
        .as_array()
        .expect("criteria")
        .iter()
        .filter_map(|c| c["feedback"].as_str())
        .collect();
    assert_eq!(
        feedback,
        [
            "partial (2 of 4 points). Addresses part of the question, or with errors.",
            "mostly-clear (2 of 4 points). Mostly in a sensible order.",
            "adequate (2 of 4 points). Some subject vocabulary, mostly accurate.",
        ]
    );
    // The overall feedback (also the LTI score's comment) and everything
    // else the learner receives holds none of the junk.
    let seen = mine.to_string();
    for bad in [
        "\u{201c}1\u{201d}",
        "1.1.1",
        "Evidence:",
        "explains photosynthesis clearly",
        "\"none\"",
    ] {
        assert!(!seen.contains(bad), "{bad:?} reached the learner: {seen}");
    }
    assert!(
        report["feedback"]
            .as_str()
            .is_some_and(|f| f.contains("Mostly in a sensible order.")),
        "{report}"
    );
    for e in mine["evaluations"].as_array().expect("evaluations") {
        for r in e["ratings"].as_array().expect("ratings") {
            assert_eq!(r["evidence"], "", "{e}");
            assert_eq!(r["rationale"], "", "{e}");
        }
    }
    d.stop().await;
}
