//! Hostile plugins, as real components (the `hostile` guest, which
//! misbehaves as its configuration asks) and as `.wat` text: each is stopped
//! with a specific error, and the same host keeps serving the next call.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use viva_plugins::{Error, Failure, HostOptions, Limits, Plugin, PluginHost, builtin};

/// Runs `mode` and returns the error; then checks the same plugin (and so
/// the same host and engine) still scores normally.
fn stopped(p: &Plugin, config: serde_json::Value, limits: &Limits) -> Error {
    let req = with_config(example("agreeing"), config.clone());
    let e = p
        .score_with_limits(&req, limits)
        .expect_err(&format!("{config} must fail"));
    let ok = p
        .score(&with_config(example("agreeing"), json!({"mode": "ok"})))
        .expect("the next call is served");
    assert!(approx(ok.report.total, 16.0));
    e
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let host = host();
    let p = hostile(&host);
    let started = Instant::now();
    let e = stopped(&p, json!({"mode": "loop"}), &Limits::default());
    assert_eq!(
        e.failure(),
        Some(&Failure::OutOfFuel {
            fuel: Limits::default().fuel.unwrap_or_default()
        })
    );
    assert!(e.to_string().contains("ran out of fuel"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_endless_loop_without_fuel_hits_the_deadline() {
    let host = host();
    let p = hostile(&host);
    let limits = Limits {
        fuel: None,
        deadline: Duration::from_millis(200),
        ..Limits::default()
    };
    let started = Instant::now();
    let e = stopped(&p, json!({"mode": "loop"}), &limits);
    let took = started.elapsed();
    assert_eq!(e.failure(), Some(&Failure::Deadline { limit_ms: 200 }));
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    let host = host();
    let p = hostile(&host);
    let e = stopped(&p, json!({"mode": "alloc"}), &Limits::default());
    assert_eq!(
        e.failure(),
        Some(&Failure::MemoryLimit {
            limit_bytes: 64 << 20
        })
    );
    if let Error::Call { usage, .. } = &e {
        assert!(usage.peak_memory_bytes <= 64 << 20);
        assert!(usage.peak_memory_bytes > 32 << 20);
    }
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let host = host();
    let p = hostile(&host);
    let limits = Limits {
        fuel: None,
        ..Limits::default()
    };
    let e = stopped(&p, json!({"mode": "recurse"}), &limits);
    assert_eq!(e.failure(), Some(&Failure::StackOverflow), "{e}");
}

#[test]
fn a_panic_message_is_captured() {
    let host = host();
    let p = hostile(&host);
    let e = stopped(&p, json!({"mode": "panic"}), &Limits::default());
    match e.failure() {
        Some(Failure::Panic { message }) => {
            assert!(
                message.starts_with("hostile plugin panicked on purpose (code 42)"),
                "{message}"
            )
        }
        other => panic!("{other:?}: {e}"),
    }
    let log = e.call_log().expect("log");
    assert!(
        log.entries
            .iter()
            .any(|l| l.level == "error" && l.message.contains("code 42"))
    );
    assert!(log.stderr.contains("code 42"), "{log:?}");
    assert!(e.to_string().contains("plugin log:"), "{e}");
}

#[test]
fn a_gigantic_output_is_refused() {
    let host = host();
    let p = hostile(&host);
    let e = stopped(&p, json!({"mode": "huge-output"}), &Limits::default());
    match e.failure() {
        Some(Failure::OutputTooLarge { size, limit }) => {
            assert!(*size > 8 << 20);
            assert_eq!(*limit, 256 << 10);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn points_outside_the_rubric_unknown_criteria_and_nan_are_refused() {
    let host = host();
    let p = hostile(&host);
    for (mode, expected) in [
        ("out-of-range", "got 104 points, outside the rubric's 0..4"),
        (
            "unknown-criterion",
            "criterion \"no-such-criterion\" is not in the rubric",
        ),
        ("nan", "total is NaN"),
    ] {
        let e = stopped(&p, json!({"mode": mode}), &Limits::default());
        match e.failure() {
            Some(Failure::InvalidOutput { reason }) => {
                assert!(reason.contains(expected), "{mode}: {reason}")
            }
            other => panic!("{mode}: {other:?}"),
        }
    }
}

#[test]
fn typed_score_errors_reach_the_host() {
    let host = host();
    let p = hostile(&host);
    let e = stopped(&p, json!({"mode": "refuse"}), &Limits::default());
    match e.failure() {
        Some(Failure::Refused { code, message }) => {
            assert_eq!(code, "invalid-input");
            assert!(message.contains("refusing on purpose"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn output_floods_are_truncated_not_fatal() {
    let host = host();
    let p = hostile(&host);
    let limits = Limits::default();
    let s = p
        .score(&with_config(
            example("agreeing"),
            json!({"mode": "flood", "size": 4 << 20}),
        ))
        .expect("printing a lot is allowed");
    assert!(s.log.stdout.len() as u64 <= limits.max_log_bytes);
    assert!(s.log.stdout.len() as u64 > limits.max_log_bytes / 2);
    assert!(s.log.stderr.contains("stderr is captured too"));
    assert!(s.log.truncated);
    let s = p
        .score(&with_config(
            example("agreeing"),
            json!({"mode": "log-flood", "size": 1 << 20}),
        ))
        .expect("logging a lot is allowed");
    let logged: usize = s.log.entries.iter().map(|e| e.message.len()).sum();
    assert!(logged as u64 <= limits.max_log_bytes);
    assert!(s.log.truncated);
}

#[test]
fn the_sandbox_denies_files_environment_network_and_fixes_time_and_randomness() {
    let host = host();
    let p = hostile(&host);
    let probe = |_: ()| {
        let s = p
            .score(&with_config(example("agreeing"), json!({"mode": "probe"})))
            .expect("probe runs");
        serde_json::from_str::<serde_json::Value>(&s.report.feedback).expect("probe report")
    };
    let first = probe(());
    assert_eq!(first["env"], 0, "{first}");
    assert_eq!(first["args"], 0, "{first}");
    assert_eq!(first["file"], false, "{first}");
    assert_eq!(first["cwd"], false, "{first}");
    assert_eq!(first["net"], false, "{first}");
    assert_eq!(first["unix_seconds"], 1_704_067_200u64, "{first}");
    // Same input, same output: time and randomness are deterministic.
    assert_eq!(first, probe(()));
}

#[test]
fn an_oversized_request_is_refused_before_the_call() {
    let host = host_with(Limits {
        max_input_bytes: 10_000,
        ..Limits::default()
    });
    let p = weighted(&host);
    let mut req = example("agreeing");
    req.submission.transcript = "word ".repeat(5_000);
    match p.score(&req) {
        Err(Error::InputTooLarge { limit: 10_000, .. }) => {}
        other => panic!("{other:?}"),
    }
    p.score(&example("agreeing"))
        .expect("a normal request still works");
}

fn load_wat(host: &PluginHost, wat: &str) -> Error {
    let bytes = wat::parse_str(wat).expect("valid wat");
    let e = host.load(&bytes).expect_err("refused");
    // The host still loads and runs a real plugin afterwards.
    weighted(host)
        .score(&example("agreeing"))
        .expect("host still serves");
    e
}

#[test]
fn a_core_module_is_not_a_component() {
    let e = load_wat(&host(), "(module (func (export \"score\")))");
    match e {
        Error::NotAComponent(m) => assert!(m.contains("core WebAssembly module"), "{m}"),
        other => panic!("{other:?}"),
    }
    let e = host().load(b"not wasm at all").expect_err("refused");
    assert!(matches!(e, Error::NotAComponent(_)), "{e:?}");
}

#[test]
fn a_component_of_another_world_is_refused() {
    let e = load_wat(
        &host(),
        r#"(component
             (core module $m (func (export "f") (result i32) i32.const 7))
             (core instance $i (instantiate $m))
             (func (export "hello") (result u32) (canon lift (core func $i "f"))))"#,
    );
    match e {
        Error::WrongWorld(m) => {
            assert!(
                m.contains("does not export viva:rubric/scorer@0.1.0"),
                "{m}"
            );
            assert!(m.contains("hello"), "{m}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_major_version_is_refused_by_name() {
    let e = load_wat(
        &host(),
        r#"(component
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func $f (canon lift (core func $i "f")))
             (instance $scorer (export "info" (func $f)))
             (export "viva:rubric/scorer@0.2.0" (instance $scorer)))"#,
    );
    match e {
        Error::UnsupportedVersion { found } => assert_eq!(found, "viva:rubric/scorer@0.2.0"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn importing_a_function_the_host_does_not_provide_is_refused() {
    let e = load_wat(
        &host(),
        r#"(component
             (import "evil:host/steal" (instance $steal
               (export "secrets" (func (result u32))))))"#,
    );
    match e {
        Error::UnknownImport { name } => assert_eq!(name, "evil:host/steal"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_file_over_the_size_limit_is_refused_unread() {
    let host = PluginHost::new(HostOptions {
        max_component_bytes: 100_000,
        ..HostOptions::default()
    })
    .expect("host");
    match host.load(builtin::WEIGHTED_CRITERIA) {
        Err(Error::TooLarge {
            size,
            limit: 100_000,
        }) => {
            assert_eq!(size, builtin::WEIGHTED_CRITERIA.len() as u64)
        }
        other => panic!("{other:?}"),
    }
    let huge = vec![0u8; 17 << 20];
    assert!(matches!(
        PluginHost::new(HostOptions::default())
            .expect("host")
            .load(&huge),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn calls_on_many_threads_are_independent() {
    let host = host();
    let p = hostile(&host);
    let w = weighted(&host);
    std::thread::scope(|s| {
        let looping = s.spawn(|| {
            p.score(&with_config(example("agreeing"), json!({"mode": "loop"})))
                .expect_err("loop stops")
        });
        for _ in 0..20 {
            w.score(&example("agreeing")).expect("scores meanwhile");
        }
        assert!(matches!(
            looping.join().expect("join").failure(),
            Some(Failure::OutOfFuel { .. })
        ));
    });
}
