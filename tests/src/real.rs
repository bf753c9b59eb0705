//! The real model workers for end-to-end tests: `viva-whisper-worker` and
//! `viva-llama-worker` (built by `cargo test --workspace`) on the small real
//! models that `viva models fetch` puts in `$VIVA_MODELS_DIR` (default
//! `~/.cache/viva/models`; scripts/test fetches them first). A missing model
//! or binary fails the test with the command that fixes it.

use std::path::PathBuf;

use viva_daemon::Config;
use viva_daemon::config::WorkerConfig;

use crate::bin_dir;

pub const WHISPER_MODEL: &str = "whisper-tiny.en-f16.bin";
pub const EVALUATOR_A_MODEL: &str = "smollm2-135m-instruct-q4_1.gguf";
pub const EVALUATOR_B_MODEL: &str = "gemma-3-270m-q4_k_m.gguf";

/// `$VIVA_MODELS_DIR`, else `~/.cache/viva/models`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("VIVA_MODELS_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/viva/models")
        }
    }
}

/// The path of a real model file; panics with the fix when it is absent.
pub fn model(file: &str) -> PathBuf {
    let path = models_dir().join(file);
    assert!(
        path.is_file(),
        "model {} is missing: run `cargo run -p viva-daemon --bin viva -- models fetch --dir {}` \
         (scripts/test does this and sets VIVA_MODELS_DIR)",
        path.display(),
        models_dir().display()
    );
    path
}

/// A worker binary of this build; panics with the fix when it is absent.
pub fn worker_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo test --workspace` (or `cargo build -p {name}`)",
        p.display()
    );
    p
}

fn table(pairs: &[(&str, toml::Value)]) -> toml::Table {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The real Whisper worker on whisper-tiny.en, one thread (the test harness
/// runs two tests at once on two cores).
pub fn whisper_worker() -> WorkerConfig {
    WorkerConfig {
        command: worker_bin("viva-whisper-worker"),
        args: vec!["--parallel-states".into(), "1".into()],
        env: Default::default(),
        model: "whisper-tiny.en".into(),
        model_path: model(WHISPER_MODEL),
        options: table(&[("threads", toml::Value::Integer(1))]),
        memory_mb: 320,
    }
}

/// A real llama.cpp evaluator for `role` on `file`, with short bounded
/// evidence and rationale so a test stays quick on two cores.
pub fn llama_worker(role: &str, file: &str, name: &str) -> WorkerConfig {
    let mut options = table(&[
        ("threads", toml::Value::Integer(1)),
        ("evidence_chars", toml::Value::Integer(120)),
        ("rationale_chars", toml::Value::Integer(160)),
    ]);
    if file.starts_with("gemma") {
        // The base Gemma GGUF has no chat template of its own.
        options.insert("template".into(), toml::Value::String("chatml".into()));
    }
    WorkerConfig {
        command: worker_bin("viva-llama-worker"),
        args: vec!["--role".into(), role.into()],
        env: Default::default(),
        model: name.into(),
        model_path: model(file),
        options,
        memory_mb: 400,
    }
}

/// Replaces the fake workers of a test daemon's configuration with the real
/// ones: Whisper for STT, SmolLM2 as evaluator "a", Gemma 3 as "b".
pub fn use_real_workers(config: &mut Config) {
    config.workers.stt = Some(whisper_worker());
    config.workers.evaluators.clear();
    config.workers.evaluators.insert(
        "a".into(),
        llama_worker("a", EVALUATOR_A_MODEL, "smollm2-135m-instruct"),
    );
    config.workers.evaluators.insert(
        "b".into(),
        llama_worker("b", EVALUATOR_B_MODEL, "gemma-3-270m"),
    );
}
