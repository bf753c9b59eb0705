//! The Viva evaluator worker: rubric evaluation of transcripts by a GGUF
//! model through llama.cpp (`llama-cpp-2`), in a process of its own.
//!
//! The daemon runs one `viva-llama-worker` process per evaluator role and
//! speaks the JSON-lines protocol of [`viva_models::protocol`] with it. The
//! process loads one model ([`engine::Engine::load`]) and then answers
//! `Evaluate` jobs ([`engine::Engine::evaluate`]):
//!
//! - the prompt comes from [`viva_models::prompt`] (rubric, assignment
//!   prompt, the transcript fenced as untrusted data) through the model's chat
//!   template, or a named built-in template (`template` option, default
//!   `chatml`) when the GGUF has none or one llama.cpp cannot apply;
//! - the answer is constrained by the GBNF grammar of
//!   [`viva_models::grammar`], so it always parses and names every criterion
//!   once with one of its labels;
//! - transcripts with instruction-like content get a review flag
//!   ([`viva_models::injection`]);
//! - the items of a call decode together in one context, in up to
//!   `parallel` slots (a sequence id and KV-cache stream each), one
//!   `llama_batch` per step carrying a token of every busy slot, each
//!   sequence with its own grammar sampler; a slot whose answer is complete
//!   takes the next waiting item when every slot is free, or at once with
//!   `continuous_batching`;
//! - the prompt before the transcript (instructions, rubric, assignment
//!   prompt) is decoded once and kept in, or copied between, slots;
//! - the worker keeps that context for its life ([`engine::Session`]), with
//!   the prompt prefixes its slots hold, and reallocates it only when a
//!   call does not fit it.
//!
//! Grammar sampling takes a fast path: the unconstrained best token is
//! checked against the grammar alone and taken when it is allowed; only when
//! it is rejected does the grammar filter the whole vocabulary. Greedy
//! decoding picks the same token either way, at close to unconstrained speed.
//!
//! # Build notes
//!
//! - This crate must never link `whisper-rs`: both vendor ggml and the
//!   copies clash (duplicate symbols; llama aborts at run time).
//! - llama.cpp is built by `llama-cpp-sys-2` with CMake in `Release` mode
//!   whenever the Rust profile has no debug info for dependencies — which the
//!   workspace's `[profile.dev.package."*"]` (`debug = false`, `opt-level =
//!   3`) ensures, so dev and test builds run optimised C++ (`-O3 -DNDEBUG`).
//! - Portability: without `-C target-cpu=native`, `GGML_NATIVE` is off (no
//!   `-march=native`); ggml then compiles for x86-64 with SSE4.2, AVX, AVX2,
//!   FMA, F16C and BMI2 (x86-64-v3: Intel Haswell / AMD Excavator or newer),
//!   in release builds too. For older CPUs build with `GGML_AVX2=OFF
//!   GGML_FMA=OFF GGML_F16C=OFF GGML_BMI2=OFF` in the environment (the build
//!   script forwards `GGML_*` variables to CMake).
//! - GPU offload: the `cuda` feature (llama-cpp-2's `cuda`), plus the
//!   `gpu_layers`, `main_gpu`, `split_mode`, `flash_attn` and
//!   `type_k`/`type_v` options (docs/gpu.md has every option). Unverified:
//!   the build machines have no CUDA toolkit.
//! - Threads: ggml's thread barriers spin, so threads must not outnumber the
//!   free cores. When both evaluator roles run at once, give each
//!   `threads = cores / 2`.

pub mod engine;
pub mod worker;

use std::path::PathBuf;

/// Everything that can go wrong in the evaluator worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "model file {path} does not exist; run `viva models fetch` to download the models, \
         or fix the evaluator's model_path in the configuration"
    )]
    ModelMissing { path: PathBuf },
    #[error(
        "model file {path} is not a usable GGUF model ({reason}); it may be truncated or \
         corrupt: run `viva models fetch` to download it again, or fix model_path"
    )]
    ModelCorrupt { path: PathBuf, reason: String },
    #[error("invalid evaluator option: {0}")]
    Options(String),
    #[error("llama.cpp failed: {0}")]
    Backend(String),
    #[error("the job was cancelled: the daemon asked the worker to stop")]
    Cancelled,
    #[error(transparent)]
    Protocol(#[from] viva_models::Error),
}
