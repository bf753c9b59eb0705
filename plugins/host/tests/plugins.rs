//! The shipped plugins as real components: numbers, flags and reasons of
//! `weighted-criteria` and `holistic-band` on the example requests, their
//! configuration validation, the compile cache and compiling in a child
//! process.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use viva_plugins::{
    CompileLimits, Compiler, Error, HostOptions, INTERFACE, Limits, PluginHost, builtin,
};

#[test]
fn weighted_criteria_describes_itself() {
    let host = host();
    let p = weighted(&host);
    let info = p.info();
    assert_eq!(info.name, "weighted-criteria");
    assert_eq!(info.interface, INTERFACE);
    assert_eq!(info.config_schema["type"], "object");
    assert_eq!(info.default_config["max_level_gap"], 1);
    p.validate_config(&info.default_config)
        .expect("its default is valid");
}

#[test]
fn agreeing_evaluations_are_averaged_and_weighted() {
    let host = host();
    let s = weighted(&host).score(&example("agreeing")).expect("scores");
    let r = &s.report;
    // content: partial (2) and complete (4) are one level apart → mean 3, weight 2.
    assert!(approx(r.criteria[0].points, 3.0), "{r:?}");
    assert_eq!(r.criteria[0].level, None, "3 lies between levels");
    assert!(approx(r.criteria[1].points, 4.0));
    assert_eq!(r.criteria[1].level.as_deref(), Some("clear"));
    assert!(approx(r.criteria[2].points, 2.0));
    assert!(approx(r.total, 2.0 * 3.0 + 4.0 + 2.0), "{}", r.total);
    assert!(approx(r.max, 16.0));
    assert!(!r.needs_review, "{:?}", r.review_reasons);
    assert!(r.review_reasons.is_empty());
    assert!(
        r.criteria[0].feedback.contains("Evidence:"),
        "{}",
        r.criteria[0].feedback
    );
    assert!(r.feedback.contains("Total: 12 of 16."), "{}", r.feedback);
    assert!(s.usage.fuel_consumed.is_some_and(|f| f > 0));
    assert!(s.usage.peak_memory_bytes > 0);
}

#[test]
fn rationales_that_say_nothing_fall_back_to_the_level_descriptor() {
    let host = host();
    let mut req = example("agreeing");
    for e in &mut req.evaluations {
        for r in &mut e.ratings {
            // What the small test models write.
            r.evidence = "1".into();
            r.rationale = "2.5".into();
        }
    }
    let r = weighted(&host).score(&req).expect("scores").report;
    assert_eq!(
        r.criteria[1].feedback,
        "clear (4 of 4 points). Clear structure throughout."
    );
    for c in &r.criteria {
        assert!(
            !c.feedback.contains("Evidence") && !c.feedback.contains("2.5"),
            "{}",
            c.feedback
        );
    }
}

#[test]
fn disagreement_beyond_the_gap_takes_the_fallback_and_flags() {
    let host = host();
    let p = weighted(&host);
    let r = p.score(&example("disagreeing")).expect("scores").report;
    // content: missing (0) vs complete (4): two levels apart → the lower.
    assert!(approx(r.criteria[0].points, 0.0));
    assert!(approx(r.total, 0.0 + 4.0 + 2.0));
    assert!(r.needs_review);
    assert_eq!(
        r.review_reasons,
        vec!["Content: evaluators disagree by 2 levels (a: missing, b: complete); used the lower (0 points)".to_owned()]
    );
    // The instructor can widen the gap and choose the fallback.
    let r = p.score(&example("custom-config")).expect("scores").report;
    assert!(approx(r.criteria[0].points, 2.0), "gap 2 allowed → mean");
    assert!(!r.needs_review);
    let req = with_config(example("disagreeing"), json!({"fallback": "max"}));
    let r = p.score(&req).expect("scores").report;
    assert!(approx(r.criteria[0].points, 4.0));
    assert!(
        r.review_reasons[0].contains("used the higher (4 points)"),
        "{:?}",
        r.review_reasons
    );
    let req = with_config(example("agreeing"), json!({"combine": "min"}));
    let r = p.score(&req).expect("scores").report;
    assert!(approx(r.criteria[0].points, 2.0));
}

#[test]
fn evaluator_flags_and_low_stt_confidence_go_to_review() {
    let host = host();
    let p = weighted(&host);
    let r = p.score(&example("flagged")).expect("scores").report;
    assert!(approx(r.total, 12.0), "the grade itself is unchanged");
    assert!(r.needs_review);
    assert_eq!(
        r.review_reasons,
        vec!["evaluator b (llama-3-8b-instruct) flagged: instruction-like content in the transcript: it asks the grader to award full marks".to_owned()]
    );
    let r = p.score(&example("low-confidence")).expect("scores").report;
    assert!(r.needs_review);
    assert_eq!(r.review_reasons.len(), 1, "{:?}", r.review_reasons);
    assert!(
        r.review_reasons[0].starts_with("low speech-to-text confidence: 2 of 4 segments"),
        "{:?}",
        r.review_reasons
    );
    // A confidence below the threshold without the worker's mark counts too.
    let mut req = example("agreeing");
    req.submission.segments[0].avg_logprob = -3.0;
    let r = p.score(&req).expect("scores").report;
    assert!(r.needs_review, "{:?}", r.review_reasons);
    // An empty transcript is always a reason.
    let mut req = example("agreeing");
    req.submission.transcript.clear();
    let r = p.score(&req).expect("scores").report;
    assert!(
        r.review_reasons
            .iter()
            .any(|x| x.contains("transcript is empty"))
    );
}

#[test]
fn missing_evaluations_are_typed_errors() {
    let host = host();
    let mut req = example("agreeing");
    req.evaluations.clear();
    let e = weighted(&host).score(&req).expect_err("no evaluations");
    assert_eq!(
        e.failure(),
        Some(&viva_plugins::Failure::Refused {
            code: "missing-evaluation".into(),
            message: "no evaluation arrived for this submission".into()
        })
    );
}

#[test]
fn bad_configurations_are_rejected_with_the_schema_message() {
    let host = host();
    let p = weighted(&host);
    let cases = [
        (
            json!({"max_level_gap": 11}),
            "max_level_gap: 11 is greater than the maximum of 10",
        ),
        (
            json!({"combine": "median"}),
            "combine: \"median\" is not one of \"mean\", \"min\", \"max\"",
        ),
        (json!({"colour": "red"}), "unknown setting \"colour\""),
        (
            json!({"max_level_gap": "one"}),
            "max_level_gap: expected an integer, got a string",
        ),
        (json!([1, 2]), "must be a JSON object"),
    ];
    for (config, message) in cases {
        match p.validate_config(&config) {
            Err(Error::InvalidConfig { plugin, message: m }) => {
                assert_eq!(plugin, "weighted-criteria");
                assert!(m.contains(message), "{m:?} should contain {message:?}");
            }
            other => panic!("{config} → {other:?}"),
        }
    }
    p.validate_config(&json!({"combine": "max", "max_level_gap": 0}))
        .expect("valid");
}

#[test]
fn holistic_band_places_bands_and_flags_borderline_cases() {
    let host = host();
    let p = host.load(builtin::HOLISTIC_BAND).expect("loads");
    assert_eq!(p.info().name, "holistic-band");
    let r = p.score(&example("holistic-band")).expect("scores").report;
    // (2·4 + 4 + 3) / 16 = 93.75 % → C2 on a 0–100 scale.
    assert!(approx(r.total, 93.75), "{}", r.total);
    assert!(approx(r.max, 100.0));
    assert!(
        r.feedback.starts_with("Band C2 (94% of the rubric)."),
        "{}",
        r.feedback
    );
    assert!(!r.needs_review, "{:?}", r.review_reasons);
    // 75 % is exactly the C1 boundary: a close call goes to review.
    let r = p.score(&example("agreeing")).expect("scores").report;
    assert!(r.feedback.starts_with("Band C1"), "{}", r.feedback);
    assert!(r.needs_review);
    assert!(
        r.review_reasons[0].contains("borderline"),
        "{:?}",
        r.review_reasons
    );
    // Custom bands on a 20-point scale.
    let cfg = json!({"bands": [{"label": "fail", "min_percent": 0}, {"label": "pass", "min_percent": 50}],
                     "scale_max": 20, "borderline_margin": 0});
    let r = p
        .score(&with_config(example("agreeing"), cfg))
        .expect("scores")
        .report;
    assert!(approx(r.total, 15.0));
    assert!(r.feedback.starts_with("Band pass"));
    assert!(!r.needs_review);
}

#[test]
fn holistic_band_validate_config_explains_what_the_schema_cannot() {
    let host = host();
    let p = host.load(builtin::HOLISTIC_BAND).expect("loads");
    let cfg = json!({"bands": [{"label": "A", "min_percent": 0}, {"label": "B", "min_percent": 60}, {"label": "C", "min_percent": 40}]});
    match p.validate_config(&cfg) {
        Err(Error::InvalidConfig { message, .. }) => assert_eq!(
            message,
            "bands: C (from 40%) must start above B (from 60%): list bands from the lowest up"
        ),
        other => panic!("{other:?}"),
    }
    let cfg = json!({"bands": [{"label": "A"}]});
    match p.validate_config(&cfg) {
        Err(Error::InvalidConfig { message, .. }) => {
            assert_eq!(message, "bands[0]: \"min_percent\" is required")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_template_builds_and_scores() {
    let host = host();
    let bytes = std::fs::read(builtin::built_guest("my_rubric_plugin")).expect("template built");
    let p = host.load(&bytes).expect("template loads");
    assert_eq!(p.info().name, "my-rubric-plugin");
    let r = p.score(&example("agreeing")).expect("scores").report;
    assert!(approx(r.total, 12.0), "{}", r.total);
    assert!(!r.needs_review);
    let s = p
        .score(&with_config(example("agreeing"), json!({"min_words": 500})))
        .expect("scores");
    assert!(
        approx(s.report.total, 8.0),
        "capped at 50%: {}",
        s.report.total
    );
    assert!(s.report.needs_review);
    assert!(
        s.log.entries.iter().any(|e| e.message.contains("capping")),
        "{:?}",
        s.log
    );
}

#[test]
fn compiled_artifacts_are_cached_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = HostOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..HostOptions::default()
    };
    let first = PluginHost::new(options.clone()).expect("host");
    let p = first.load(builtin::WEIGHTED_CRITERIA).expect("compiles");
    assert!(!p.load_stats().from_cache);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("cache"))
        .expect("cache dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(p.sha256()), "{files:?}");
    // A restart (a new host) loads the artifact instead of compiling.
    let second = PluginHost::new(options.clone()).expect("host");
    let q = second.load(builtin::WEIGHTED_CRITERIA).expect("loads");
    assert!(q.load_stats().from_cache);
    assert!(q.load_stats().compile_us < p.load_stats().compile_us);
    q.score(&example("agreeing")).expect("cached plugin scores");
    // A damaged artifact is discarded and recompiled.
    let path = dir.path().join("cache").join(&files[0]);
    std::fs::write(&path, b"garbage").expect("damage");
    let third = PluginHost::new(options).expect("host");
    let r = third.load(builtin::WEIGHTED_CRITERIA).expect("recompiles");
    assert!(!r.load_stats().from_cache);
}

fn subprocess_host(limits: CompileLimits) -> PluginHost {
    PluginHost::new(HostOptions {
        compiler: Compiler::Subprocess {
            program: env!("CARGO_BIN_EXE_viva-plugin-compiler").into(),
            args: vec![],
        },
        compile_limits: limits,
        ..HostOptions::default()
    })
    .expect("host")
}

#[test]
fn uploads_compile_in_a_child_process_within_limits() {
    let host = subprocess_host(CompileLimits::default());
    let p = host
        .load(builtin::WEIGHTED_CRITERIA)
        .expect("child compiles");
    p.score(&example("agreeing")).expect("scores");

    let slow = subprocess_host(CompileLimits {
        timeout: Duration::from_millis(1),
        ..CompileLimits::default()
    });
    match slow.load(builtin::WEIGHTED_CRITERIA) {
        Err(Error::CompileTimeout(_)) => {}
        other => panic!("{other:?}"),
    }

    // A component whose compilation needs far more memory than the child
    // may have (one function of 300 000 instructions).
    let body = "i32.const 1 i32.add ".repeat(300_000);
    let big = wat::parse_str(format!(
        "(component (core module (func (export \"f\") (param i32) (result i32) local.get 0 {body})))"
    ))
    .expect("wat");
    let small = subprocess_host(CompileLimits {
        memory_bytes: 64 << 20,
        ..CompileLimits::default()
    });
    match small.load(&big) {
        Err(Error::CompileMemory { limit }) => assert_eq!(limit, 64 << 20),
        other => panic!("{other:?}"),
    }
    // The host is unaffected.
    small
        .load(builtin::WEIGHTED_CRITERIA)
        .expect("still compiles")
        .score(&example("agreeing"))
        .expect("scores");
}

#[test]
fn limits_are_configurable_per_call() {
    let host = host();
    let p = weighted(&host);
    let tight = Limits {
        fuel: Some(1_000),
        ..Limits::default()
    };
    let e = p
        .score_with_limits(&example("agreeing"), &tight)
        .expect_err("out of fuel");
    assert!(matches!(
        e.failure(),
        Some(viva_plugins::Failure::OutOfFuel { fuel: 1_000 })
    ));
    p.score(&example("agreeing"))
        .expect("default limits still fine");
}
