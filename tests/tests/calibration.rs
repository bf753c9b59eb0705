//! Calibration against the instructor's grading, over the HTTP API with the
//! fake workers (which always choose a criterion's middle level) and the
//! real rubric plugin: the agreement report's numbers on a small known case,
//! blind grades and overrides as instructor grades, the CSV exports, the
//! release gate, releasing a selection, and exemplars reaching the
//! evaluators without who gave them.

use std::time::Duration;

use reqwest::Method;
use viva_daemon::Role;
use viva_tests::{TestDaemon, tone};

const WAIT: Duration = Duration::from_secs(60);

async fn start() -> TestDaemon {
    TestDaemon::start_scoring(
        &[
            ("FAKE_STT_FIXED_MS", "20".into()),
            ("FAKE_EVAL_MS_PER_ITEM", "5".into()),
        ],
        |c| c.scheduler.batch_window = Duration::from_millis(300),
    )
    .await
}

/// Uploads one short answer per student to `assignment`; returns the ids
/// once all are scored.
async fn answers(d: &TestDaemon, assignment: &str, students: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, s) in students.iter().enumerate() {
        let token = d.token(Role::Learner, s, "sandbox");
        // The fake transcript names the file: no student name in it.
        let f = tone(d.dir.path(), &format!("answer-{i}.wav"), 0.6);
        let (status, body) = d.upload(&token, assignment, &f).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    d.wait_scored(&ids, WAIT).await;
    ids
}

async fn text(d: &TestDaemon, token: &str, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", d.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn grader<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .and_then(|l| l.iter().find(|g| g["grader"] == name))
        .unwrap_or_else(|| panic!("no grader {name} in {list}"))
}

fn close(v: &serde_json::Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() < 1e-9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calibration_route_gives_the_known_numbers_and_exports_csv() {
    let d = start().await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let learner = d.token(Role::Learner, "s0", "sandbox");
    let ids = answers(&d, "sandbox-oral-1", &["s0", "s1", "s2", "s3"]).await;

    // Blind grades on three; the fourth graded by an override on the review screen.
    let blind = [
        ("partial", "unclear", "adequate"),
        ("partial", "mostly-clear", "adequate"),
        ("partial", "clear", "adequate"),
    ];
    for (id, (content, organisation, language)) in ids.iter().zip(blind) {
        let (status, body) = d
            .send(
                Method::POST,
                &teacher,
                &format!("/api/v1/submissions/{id}/blind-grade"),
                Some(serde_json::json!({"levels": {
                    "content": content, "organisation": organisation, "language": language
                }})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["levels"].as_array().map(Vec::len), Some(3), "{body}");
        assert!(body["levels"][0]["source"] == "blind", "{body}");
    }
    let (status, body) = d
        .send(
            Method::POST,
            &teacher,
            &format!("/api/v1/submissions/{}/override", ids[3]),
            Some(serde_json::json!({"criteria": [
                {"criterion_id": "content", "points": 4},
                {"criterion_id": "organisation", "points": 2},
                {"criterion_id": "language", "points": 2}
            ]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, mine) = d
        .get(
            &teacher,
            &format!("/api/v1/submissions/{}/instructor-grade", ids[3]),
        )
        .await;
    assert_eq!(mine["levels"][0]["criterion_id"], "content", "{mine}");
    assert_eq!(mine["levels"][0]["source"], "override", "{mine}");
    assert_eq!(mine["levels"][0]["level"], "complete", "{mine}");

    // A blind grade names every criterion and only the rubric's levels.
    for (body, code) in [
        (
            serde_json::json!({"levels": {"content": "partial"}}),
            "incomplete_grade",
        ),
        (
            serde_json::json!({"levels": {"content": "superb", "organisation": "clear", "language": "precise"}}),
            "unknown_level",
        ),
    ] {
        let (status, e) = d
            .send(
                Method::POST,
                &teacher,
                &format!("/api/v1/submissions/{}/blind-grade", ids[0]),
                Some(body),
            )
            .await;
        assert_eq!(
            (status, e["error"]["code"].as_str()),
            (400, Some(code)),
            "{e}"
        );
    }

    let path = "/api/v1/assignments/sandbox-oral-1/calibration";
    let (status, r) = d.get(&teacher, path).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["graded"].as_u64(), r["blind"].as_u64()),
        (Some(4), Some(3)),
        "{r}"
    );
    // Every fake evaluation says the middle level, so the combined grade is
    // the middle too. Organisation: instructor unclear, mostly-clear, clear,
    // mostly-clear → exact 2/4, adjacent 4/4, mean difference 0 and QWK 0
    // (a grader that always says the same agrees no better than chance).
    let org = &r["criteria"][1];
    assert_eq!(org["criterion_id"], "organisation");
    for name in ["a", "b", "combined"] {
        let g = grader(&org["graders"], name);
        assert_eq!(g["n"], 4, "{g}");
        assert!(close(&g["exact"], 0.5), "{g}");
        assert!(close(&g["adjacent"], 1.0), "{g}");
        assert!(close(&g["mean_difference"], 0.0), "{g}");
        assert!(g["qwk"].as_f64().is_some_and(|q| q.abs() < 1e-9), "{g}");
    }
    // Content: instructor partial ×3 and complete (4 points) → exact 3/4,
    // mean difference −0.25 levels; QWK 0.
    let content = grader(&r["criteria"][0]["graders"], "combined");
    assert!(close(&content["exact"], 0.75), "{content}");
    assert!(close(&content["mean_difference"], -0.25), "{content}");
    // Language: everyone says adequate: perfect agreement, no kappa.
    let language = grader(&r["criteria"][2]["graders"], "combined");
    assert!(close(&language["exact"], 1.0), "{language}");
    assert!(language["qwk"].is_null(), "{language}");
    // Overall, pooled over 12 criterion grades: 9 exact.
    let overall = grader(&r["overall"], "combined");
    assert_eq!(overall["n"], 12);
    assert!(close(&overall["exact"], 0.75), "{overall}");
    assert_eq!(
        r["verdict"],
        "Too few graded submissions: grade at least 6 more (4 of 10 so far)."
    );
    assert_eq!(r["gate_met"], true, "no gate set");

    // CSV: one row per criterion and grader, then overall.
    let (status, csv) = text(&d, &teacher, &format!("{path}.csv")).await;
    assert_eq!(status, 200);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "criterion,grader,n,exact,adjacent,qwk,qwk_ci95_low,qwk_ci95_high,mean_difference,smd,verdict"
        )
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("organisation,a,4,0.500,1.000,0.000,")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("overall,combined,12,0.750,")),
        "{csv}"
    );

    // The grades CSV: every submission, per-criterion levels, the
    // evaluators' levels and agreement, the instructor's level.
    let (status, grades) = text(
        &d,
        &teacher,
        "/api/v1/assignments/sandbox-oral-1/grades.csv",
    )
    .await;
    assert_eq!(status, 200);
    let rows: Vec<&str> = grades.lines().collect();
    assert_eq!(rows.len(), 5, "{grades}");
    let head: Vec<&str> = rows[0].split(',').collect();
    for col in [
        "submission_id",
        "state",
        "total",
        "needs_review",
        "evaluator_flags",
        "evaluators_agree",
        "content_level",
        "content_points",
        "content_evaluator_a",
        "content_evaluator_b",
        "organisation_instructor",
    ] {
        assert!(head.contains(&col), "{col} missing from {head:?}");
    }
    let first: Vec<&str> = rows[1].split(',').collect();
    let at = |col: &str| first[head.iter().position(|h| *h == col).expect("column")];
    assert_eq!(at("submission_id"), ids[0]);
    assert_eq!(at("state"), "awaiting_review");
    assert_eq!(at("evaluators_agree"), "3/3");
    assert_eq!(at("organisation_instructor"), "unclear");
    assert_eq!(at("content_evaluator_a"), "partial");

    // Staff only: a learner gets none of it.
    for p in [
        path.to_owned(),
        format!("{path}.csv"),
        "/api/v1/assignments/sandbox-oral-1/grades.csv".to_owned(),
        format!("/api/v1/submissions/{}/instructor-grade", ids[0]),
    ] {
        let (status, body) = text(&d, &learner, &p).await;
        assert!(status == 403 || status == 404, "{p}: {status} {body}");
        assert!(!body.contains("partial"), "{p} leaked grades: {body}");
    }
    let (status, _) = d
        .send(
            Method::POST,
            &learner,
            &format!("/api/v1/submissions/{}/blind-grade", ids[0]),
            Some(serde_json::json!({"levels": {}})),
        )
        .await;
    assert!(status == 403 || status == 404);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calibration_gate_holds_automatic_release_until_it_is_met() {
    let d = start().await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let learner = d.token(Role::Learner, "g0", "sandbox");
    let (_, sandbox) = d.get(&teacher, "/api/v1/assignments/sandbox-oral-1").await;
    let (status, body) = d
        .send(
            Method::POST,
            &teacher,
            "/api/v1/assignments",
            Some(serde_json::json!({
                "id": "gated", "title": "Gated", "prompt": "Explain photosynthesis.",
                "rubric": sandbox["rubric"], "release_policy": "auto"
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let gate = "/api/v1/assignments/gated/calibration/gate";
    let (status, e) = d
        .send(
            Method::PUT,
            &teacher,
            gate,
            Some(serde_json::json!({"min_qwk": 2.0, "min_sample": 2})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_gate")),
        "{e}"
    );
    let (status, _) = d
        .send(
            Method::PUT,
            &learner,
            gate,
            Some(serde_json::json!({"min_qwk": 0.0, "min_sample": 1})),
        )
        .await;
    assert_eq!(status, 403, "learners cannot open the gate");
    let (status, body) = d
        .send(
            Method::PUT,
            &teacher,
            gate,
            Some(serde_json::json!({"min_qwk": 0.7, "min_sample": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Unmet (nothing graded yet): an `auto` grade waits for review, with
    // the reason shown to staff.
    let held = answers(&d, "gated", &["g0"]).await;
    let (_, s) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", held[0]))
        .await;
    assert_eq!(s["state"], "awaiting_review", "{s}");
    let reason = s["score"]["calibration_hold"].as_str().unwrap_or_default();
    assert!(
        reason.contains("calibration gate not met") && reason.contains("grade at least 2 more"),
        "{s}"
    );
    let (_, dash) = d.get(&teacher, "/api/v1/assignments/gated/dashboard").await;
    let reasons = dash["rows"][0]["review_reasons"].to_string();
    assert!(reasons.contains("calibration gate not met"), "{dash}");
    let (_, r) = d
        .get(&teacher, "/api/v1/assignments/gated/calibration")
        .await;
    assert_eq!(r["gate_met"], false, "{r}");
    assert_eq!(r["gate"]["min_sample"], 2);

    // Met: one graded submission with levels that vary, a bar it clears.
    let (status, body) = d
        .send(
            Method::POST,
            &teacher,
            &format!("/api/v1/submissions/{}/blind-grade", held[0]),
            Some(serde_json::json!({"levels": {
                "content": "complete", "organisation": "unclear", "language": "adequate"
            }})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    d.send(
        Method::PUT,
        &teacher,
        gate,
        Some(serde_json::json!({"min_qwk": -0.5, "min_sample": 1})),
    )
    .await;
    let (_, r) = d
        .get(&teacher, "/api/v1/assignments/gated/calibration")
        .await;
    assert_eq!(r["gate_met"], true, "{r}");
    let released = answers(&d, "gated", &["g1"]).await;
    let (_, s) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", released[0]))
        .await;
    assert_eq!(s["state"], "released", "{s}");
    assert!(s["score"].get("calibration_hold").is_none(), "{s}");

    // A bar it does not clear holds again; removing the gate releases.
    d.send(
        Method::PUT,
        &teacher,
        gate,
        Some(serde_json::json!({"min_qwk": 0.9, "min_sample": 1})),
    )
    .await;
    let again = answers(&d, "gated", &["g2"]).await;
    let (_, s) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", again[0]))
        .await;
    assert_eq!(s["state"], "awaiting_review", "{s}");
    assert!(
        s["score"]["calibration_hold"]
            .as_str()
            .is_some_and(|r| r.contains("Agreement is poor (QWK 0.00 on 1 submissions)")),
        "{s}"
    );
    let (status, _) = d.send(Method::DELETE, &teacher, gate, None).await;
    assert_eq!(status, 200);
    let free = answers(&d, "gated", &["g3"]).await;
    let (_, s) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", free[0]))
        .await;
    assert_eq!(s["state"], "released", "{s}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_selected_releases_only_the_chosen_grades_and_audits_them() {
    let d = start().await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let learner = d.token(Role::Learner, "r0", "sandbox");
    let ids = answers(&d, "sandbox-oral-1", &["r0", "r1", "r2"]).await;
    let path = "/api/v1/assignments/sandbox-oral-1/release-selected";
    let body = serde_json::json!({"submission_ids": [ids[0], ids[1], "sub_nope"]});
    let (status, _) = d
        .send(Method::POST, &learner, path, Some(body.clone()))
        .await;
    assert_eq!(status, 403);
    let (status, r) = d.send(Method::POST, &teacher, path, Some(body)).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["released"], serde_json::json!([ids[0], ids[1]]), "{r}");
    assert_eq!(r["skipped"][0]["id"], "sub_nope", "{r}");
    // Again: already released, so skipped with the reason.
    let (_, again) = d
        .send(
            Method::POST,
            &teacher,
            path,
            Some(serde_json::json!({"submission_ids": [ids[0]]})),
        )
        .await;
    assert_eq!(again["released"], serde_json::json!([]));
    assert!(
        again["skipped"][0]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("released")),
        "{again}"
    );
    let (status, e) = d
        .send(
            Method::POST,
            &teacher,
            path,
            Some(serde_json::json!({"submission_ids": []})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_selection"))
    );
    let states: Vec<String> = d
        .wait_scored(&ids, WAIT)
        .await
        .iter()
        .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(states, ["released", "released", "awaiting_review"]);
    let (_, audit) = d
        .get(&teacher, &format!("/api/v1/submissions/{}/audit", ids[0]))
        .await;
    assert!(
        audit.to_string().contains("release_selected"),
        "audited like release: {audit}"
    );
    // The learner sees their released grade, and only then.
    let (_, own) = d
        .get(&learner, &format!("/api/v1/submissions/{}", ids[0]))
        .await;
    assert!(own["score"]["total"].is_number(), "{own}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_reach_the_evaluators_as_transcripts_and_levels_only() {
    let d = start().await;
    let teacher = d.token(Role::Instructor, "teacher", "sandbox");
    let learner = d.token(Role::Learner, "alice-smith", "sandbox");
    let first = answers(&d, "sandbox-oral-1", &["alice-smith", "bob-jones"]).await;
    let exemplar = format!("/api/v1/submissions/{}/exemplar", first[0]);
    // Not graded by the instructor yet: refused with what to do.
    let (status, e) = d.send(Method::PUT, &teacher, &exemplar, None).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (409, Some("not_instructor_graded")),
        "{e}"
    );
    d.send(
        Method::POST,
        &teacher,
        &format!("/api/v1/submissions/{}/blind-grade", first[0]),
        Some(serde_json::json!({"levels": {
            "content": "complete", "organisation": "clear", "language": "limited"
        }})),
    )
    .await;
    let (status, _) = d.send(Method::PUT, &learner, &exemplar, None).await;
    assert_eq!(status, 403);
    let (status, v) = d.send(Method::PUT, &teacher, &exemplar, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["exemplar"], true);
    let (_, r) = d
        .get(&teacher, "/api/v1/assignments/sandbox-oral-1/calibration")
        .await;
    assert_eq!(r["exemplars"], serde_json::json!([first[0]]));

    let later = answers(&d, "sandbox-oral-1", &["carol"]).await;
    let sent: Vec<serde_json::Value> = d
        .fake_events()
        .into_iter()
        .filter(|e| e["ev"] == "exemplars" && e["submission"] == later[0])
        .collect();
    assert_eq!(sent.len(), 2, "both evaluators got the example: {sent:?}");
    let (_, ex) = d
        .get(&teacher, &format!("/api/v1/submissions/{}", first[0]))
        .await;
    let example = &sent[0]["exemplars"][0];
    assert_eq!(example["transcript"], ex["transcript"]["text"]);
    assert_eq!(
        example["levels"],
        serde_json::json!([
            {"criterion_id": "content", "level": "complete"},
            {"criterion_id": "organisation", "level": "clear"},
            {"criterion_id": "language", "level": "limited"}
        ])
    );
    let all = serde_json::to_string(&sent).unwrap_or_default();
    assert!(
        !all.contains(&first[0]) && !all.contains("teacher") && !all.contains("alice"),
        "no submission id, student or grader: {all}"
    );
    // The exemplar itself is never its own example; earlier evaluations had none.
    assert!(
        !d.fake_events().iter().any(|e| e["ev"] == "exemplars"
            && (e["submission"] == first[0] || e["submission"] == first[1])),
    );
    let (status, v) = d.send(Method::DELETE, &teacher, &exemplar, None).await;
    assert_eq!((status, &v["exemplar"]), (200, &serde_json::json!(false)));
    d.stop().await;
}
