//! The loaded model and batched, grammar-constrained evaluation.
//!
//! One call evaluates its submissions in up to `parallel` slots: each
//! decoding submission has a sequence id (and its own KV-cache stream) in
//! one context, each prompt is decoded in `llama_batch`es of up to
//! `batch_size` tokens, and every generation step decodes one batch holding
//! the next token of every busy slot. Free slots take the next waiting
//! submissions (in rounds, or at once with continuous batching), and the prompt part
//! that submissions of one assignment share is decoded once. A [`Session`]
//! (the worker keeps one) reuses the context, its KV cache and the prompt
//! prefixes in it from call to call while the calls fit it. Greedy output
//! is the same whether a submission is decoded alone or in a batch, in a
//! new context or a kept one, first or after others (see [`Session`] for
//! the settings that make it so).

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use serde::{Deserialize, Serialize, Serializer};
use viva_models::grammar::{
    GrammarLimits, MAX_FIELD_CHARS, OutputGrammar, output_grammar, parse_answer,
};
use viva_models::prompt::{EvaluationPrompt, PromptOptions, TRANSCRIPT_SLOT, build_prompt};
use viva_models::protocol::ModelSpec;
use viva_models::{EvaluateItem, Evaluation, EvaluationOutcome, injection};

use crate::Error;

/// Backend options of an evaluator (`options` of the worker's model spec,
/// `[workers.evaluators.<role>] options = { … }` in the daemon's config).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// CPU threads for decoding; default: the available cores.
    pub threads: Option<u32>,
    /// Layers offloaded to the GPU (needs the `cuda` build); 0 = CPU only.
    pub gpu_layers: u32,
    /// Most tokens of one submission: prompt plus answer. Longer prompts
    /// fail that item with a clear error.
    pub ctx_size: u32,
    /// Most generated tokens per submission; default: the longest answer the
    /// grammar admits (so no answer is ever cut short).
    pub max_tokens: Option<u32>,
    /// 0 (default): greedy decoding, deterministic.
    pub temperature: f32,
    /// Seed of the sampler when `temperature` > 0.
    pub seed: u32,
    /// Built-in llama.cpp chat template used when the GGUF has none (or one
    /// llama.cpp cannot apply): "chatml", "gemma", "llama3", "mistral-v7", …
    pub template: String,
    /// Most submissions decoded together in one context.
    pub parallel: u32,
    /// Most prompt tokens per decode call.
    pub batch_size: u32,
    /// Bounds of the answer's free-text fields (characters).
    pub evidence_chars: usize,
    pub rationale_chars: usize,
    /// Longer transcripts are cut (and the evaluation flagged).
    pub max_transcript_chars: usize,
    /// Check the unconstrained best token against the grammar before
    /// filtering the whole vocabulary (same output, faster). Off only to
    /// measure the difference.
    pub grammar_fast_path: bool,
    /// llama.cpp's flash attention. Off by default: on the CPU its kernel
    /// for a lone query row sums in another order than for several rows, so
    /// with it on a submission's grade could depend on which submissions
    /// share its batch (the batch-invariance test fails). Needed for a
    /// quantised `type_v`.
    pub flash_attn: bool,
    /// Element type of the KV cache's keys: f16 (default), q8_0, q4_0, …
    pub type_k: KvType,
    /// Element type of the KV cache's values; a quantised type needs
    /// `flash_attn = true`.
    pub type_v: KvType,
    /// The GPU that holds the whole model with `split_mode = "none"`, and
    /// the intermediate results with `"row"` (index among the GPUs
    /// llama.cpp sees, in `CUDA_VISIBLE_DEVICES` order).
    pub main_gpu: u32,
    /// How a model is spread over several GPUs: "layer" (default: whole
    /// layers per GPU), "row" (tensors split by rows) or "none" (only
    /// `main_gpu`).
    pub split_mode: SplitMode,
    /// Keep the context (and its KV cache) from one call to the next, and
    /// only clear it, when the next call's sequences fit; otherwise it is
    /// recreated, as large as both calls need. Off: a new context per call
    /// (memory is given back between calls, each call pays the allocation).
    pub reuse_kv_cache: bool,
    /// Continuous batching: when a submission's answer is complete, the
    /// next waiting submission of the call takes its sequence slot (KV-cache
    /// stream) at once while the others keep decoding. Off (the default): a
    /// call of more submissions than `parallel` runs in rounds, each round
    /// waiting for its slowest answer. Measured on the CPU it saves decode
    /// steps (13% for 16 submissions through 4 slots) but no wall time
    /// (0.87–0.99× of rounds: a joining prompt stalls the others, and short
    /// sequences then attend over as many cells as the longest), so it stays
    /// off until a GPU measurement says otherwise.
    pub continuous_batching: bool,
    /// Decode the prompt before the transcript (instructions, rubric,
    /// assignment prompt), which the submissions of one assignment share,
    /// once: a slot that already holds it (from an earlier submission of the
    /// call, or of an earlier call) keeps it, and another slot copies it.
    /// Models with sliding-window attention or recurrent state always
    /// decode it (their caches cannot keep a prefix). Off only to measure
    /// the difference: the answers are the same.
    pub share_prompt_prefix: bool,
    /// Watch the open evidence or rationale field while decoding and close
    /// it as soon as it degenerates into repetition ("1.1.1.1.…"), instead
    /// of generating junk up to the field's cap; the evaluation is then
    /// flagged `degenerate_output`. Off only to measure the difference.
    pub cut_degenerate: bool,
}

/// A KV-cache element type (`type_k`, `type_v`): the types llama.cpp's own
/// tools accept for its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum KvType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Iq4Nl,
    Q5_0,
    Q5_1,
}

impl KvType {
    /// Every type with its name in the options.
    pub const ALL: [(KvType, &'static str); 9] = [
        (KvType::F32, "f32"),
        (KvType::F16, "f16"),
        (KvType::Bf16, "bf16"),
        (KvType::Q8_0, "q8_0"),
        (KvType::Q4_0, "q4_0"),
        (KvType::Q4_1, "q4_1"),
        (KvType::Iq4Nl, "iq4_nl"),
        (KvType::Q5_0, "q5_0"),
        (KvType::Q5_1, "q5_1"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(t, _)| *t == self)
            .map_or("f16", |(_, n)| n)
    }

    /// Whether llama.cpp stores it in quantised blocks.
    pub fn is_quantized(self) -> bool {
        !matches!(self, KvType::F32 | KvType::F16 | KvType::Bf16)
    }

    fn to_llama(self) -> KvCacheType {
        match self {
            KvType::F32 => KvCacheType::F32,
            KvType::F16 => KvCacheType::F16,
            KvType::Bf16 => KvCacheType::BF16,
            KvType::Q8_0 => KvCacheType::Q8_0,
            KvType::Q4_0 => KvCacheType::Q4_0,
            KvType::Q4_1 => KvCacheType::Q4_1,
            KvType::Iq4Nl => KvCacheType::IQ4_NL,
            KvType::Q5_0 => KvCacheType::Q5_0,
            KvType::Q5_1 => KvCacheType::Q5_1,
        }
    }
}

impl Serialize for KvType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl TryFrom<String> for KvType {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(&s))
            .map(|(t, _)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                format!(
                    "{s:?} is not a KV-cache type (type_k, type_v): use one of {}",
                    names.join(", ")
                )
            })
    }
}

/// How llama.cpp spreads a model over several GPUs (`split_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SplitMode {
    None,
    Layer,
    Row,
}

impl SplitMode {
    pub fn name(self) -> &'static str {
        match self {
            SplitMode::None => "none",
            SplitMode::Layer => "layer",
            SplitMode::Row => "row",
        }
    }

    fn to_llama(self) -> LlamaSplitMode {
        match self {
            SplitMode::None => LlamaSplitMode::None,
            SplitMode::Layer => LlamaSplitMode::Layer,
            SplitMode::Row => LlamaSplitMode::Row,
        }
    }
}

impl Serialize for SplitMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl TryFrom<String> for SplitMode {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(SplitMode::None),
            "layer" => Ok(SplitMode::Layer),
            "row" => Ok(SplitMode::Row),
            _ => Err(format!(
                "{s:?} is not a split_mode: use \"layer\" (whole layers per GPU, the \
                 default), \"row\" (tensors split by rows) or \"none\" (main_gpu only)"
            )),
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        let limits = GrammarLimits::default();
        Self {
            threads: None,
            gpu_layers: 0,
            ctx_size: 4096,
            max_tokens: None,
            temperature: 0.0,
            seed: 0,
            template: "chatml".into(),
            parallel: 8,
            batch_size: 512,
            evidence_chars: limits.evidence_chars,
            rationale_chars: limits.rationale_chars,
            max_transcript_chars: PromptOptions::default().max_transcript_chars,
            grammar_fast_path: true,
            flash_attn: false,
            type_k: KvType::F16,
            type_v: KvType::F16,
            main_gpu: 0,
            split_mode: SplitMode::Layer,
            reuse_kv_cache: true,
            continuous_batching: false,
            share_prompt_prefix: true,
            cut_degenerate: true,
        }
    }
}

impl EngineOptions {
    /// Reads the options object of a model spec (`null` = all defaults).
    pub fn from_json(value: &serde_json::Value) -> Result<Self, Error> {
        let options: EngineOptions = if value.is_null() {
            EngineOptions::default()
        } else {
            serde_json::from_value(value.clone()).map_err(|e| Error::Options(e.to_string()))?
        };
        if options.parallel == 0 || options.batch_size == 0 || options.ctx_size < 64 {
            return Err(Error::Options(
                "parallel and batch_size must be at least 1, ctx_size at least 64".into(),
            ));
        }
        if options.evidence_chars > MAX_FIELD_CHARS || options.rationale_chars > MAX_FIELD_CHARS {
            return Err(Error::Options(format!(
                "evidence_chars and rationale_chars must be at most {MAX_FIELD_CHARS}"
            )));
        }
        if options.threads == Some(0) {
            return Err(Error::Options("threads must be at least 1".into()));
        }
        if !options.temperature.is_finite() || options.temperature < 0.0 {
            return Err(Error::Options("temperature must be 0 or more".into()));
        }
        if options.type_v.is_quantized() && !options.flash_attn {
            return Err(Error::Options(format!(
                "type_v = {:?} needs flash_attn = true (llama.cpp quantises the V cache only \
                 with flash attention): set flash_attn = true, or type_v = \"f16\"",
                options.type_v.name()
            )));
        }
        Ok(options)
    }

    fn limits(&self) -> GrammarLimits {
        GrammarLimits {
            evidence_chars: self.evidence_chars,
            rationale_chars: self.rationale_chars,
        }
    }

    fn threads(&self) -> i32 {
        let n = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(1))
                .unwrap_or(1)
        });
        i32::try_from(n).unwrap_or(1)
    }
}

/// Measurements of one call, for logs and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    pub items: usize,
    /// Prompt tokens decoded (not counting shared ones).
    pub prompt_tokens: u64,
    /// Prompt tokens not decoded because their slot held them already or
    /// copied them from another slot (`share_prompt_prefix`).
    pub prompt_tokens_shared: u64,
    /// Prompt prefixes copied from one slot's KV-cache stream to another's.
    pub prefix_copies: u64,
    pub generated_tokens: u64,
    /// Context creation (KV cache allocation), or clearing a kept one.
    pub setup_seconds: f64,
    /// Contexts allocated, and kept ones cleared and used again.
    pub contexts_created: u64,
    pub contexts_reused: u64,
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
    /// Decode calls of the generation phase.
    pub steps: u64,
    /// Tokens whose unconstrained choice the grammar allowed.
    pub fast_accepts: u64,
    /// Tokens that needed the grammar over the whole vocabulary.
    pub full_passes: u64,
    /// Evidence or rationale fields closed early because they degenerated
    /// into repetition (`cut_degenerate`).
    pub fields_cut: u64,
}

impl CallStats {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        per_second(self.prompt_tokens, self.prompt_seconds)
    }

    pub fn generation_tokens_per_second(&self) -> f64 {
        per_second(self.generated_tokens, self.generation_seconds)
    }

    /// Adds the counts and times of `other` (calls one after the other).
    pub fn add(&mut self, other: &CallStats) {
        self.items += other.items;
        self.prompt_tokens += other.prompt_tokens;
        self.prompt_tokens_shared += other.prompt_tokens_shared;
        self.prefix_copies += other.prefix_copies;
        self.generated_tokens += other.generated_tokens;
        self.setup_seconds += other.setup_seconds;
        self.contexts_created += other.contexts_created;
        self.contexts_reused += other.contexts_reused;
        self.prompt_seconds += other.prompt_seconds;
        self.generation_seconds += other.generation_seconds;
        self.steps += other.steps;
        self.fast_accepts += other.fast_accepts;
        self.full_passes += other.full_passes;
        self.fields_cut += other.fields_cut;
    }

    /// One log line: tokens and tokens per second of both phases.
    pub fn summary(&self) -> String {
        format!(
            "{} item(s): context {} new/{} reused in {:.3} s, prompt {} tok in {:.2} s \
             ({:.0} tok/s; {} shared, {} prefix copies), generated {} tok in {:.2} s ({:.1} \
             tok/s, {} steps), grammar fast path {}/{}, degenerate fields cut {}",
            self.items,
            self.contexts_created,
            self.contexts_reused,
            self.setup_seconds,
            self.prompt_tokens,
            self.prompt_seconds,
            self.prompt_tokens_per_second(),
            self.prompt_tokens_shared,
            self.prefix_copies,
            self.generated_tokens,
            self.generation_seconds,
            self.generation_tokens_per_second(),
            self.steps,
            self.fast_accepts,
            self.fast_accepts + self.full_passes,
            self.fields_cut,
        )
    }
}

fn per_second(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// llama.cpp's backend may be initialised once per process.
fn backend() -> Result<&'static LlamaBackend, Error> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| LlamaBackend::init().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Backend(format!("cannot initialise the backend: {e}")))
}

/// Checks that `path` is a readable GGUF file before llama.cpp sees it, so
/// the common mistakes get a message that names the file and the fix.
pub fn check_model_file(path: &Path) -> Result<(), Error> {
    use std::io::Read;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::ModelMissing {
                path: path.to_owned(),
            });
        }
        Err(e) => {
            return Err(Error::ModelCorrupt {
                path: path.to_owned(),
                reason: format!("cannot read it: {e}"),
            });
        }
    };
    let corrupt = |reason: String| Error::ModelCorrupt {
        path: path.to_owned(),
        reason,
    };
    if !meta.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| corrupt(format!("cannot read its header: {e}")))?;
    if &magic != b"GGUF" {
        return Err(corrupt(format!(
            "it starts with {magic:02x?}, not the GGUF magic \"GGUF\""
        )));
    }
    Ok(())
}

/// The GPUs llama.cpp sees (index, description): none in a build without
/// the `cuda` feature.
pub fn gpu_devices() -> Vec<(usize, String)> {
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| d.device_type == llama_cpp_2::LlamaBackendDeviceType::Gpu)
        .enumerate()
        .map(|(i, d)| (i, format!("{} ({})", d.name, d.description)))
        .collect()
}

/// Checks the GPU options against the GPUs there are: a `main_gpu` past the
/// last one is refused (llama.cpp would only say that it cannot load the
/// model); GPU options without any GPU are only worth a warning, since the
/// model then runs on the CPU.
fn check_gpus(options: &EngineOptions, gpus: &[(usize, String)]) -> Result<(), Error> {
    if gpus.is_empty() {
        if options.gpu_layers > 0 || options.main_gpu > 0 {
            eprintln!(
                "viva-llama-worker: gpu_layers = {} but llama.cpp sees no GPU (a build without \
                 --features cuda, or no device visible): the model runs on the CPU",
                options.gpu_layers
            );
        }
        return Ok(());
    }
    if options.main_gpu as usize >= gpus.len() {
        let list: Vec<String> = gpus.iter().map(|(i, d)| format!("{i}: {d}")).collect();
        return Err(Error::Options(format!(
            "main_gpu = {} but llama.cpp sees {} GPU(s) ({}): use one of their indices",
            options.main_gpu,
            gpus.len(),
            list.join(", ")
        )));
    }
    Ok(())
}

/// What a call's context needs: sequences (one KV-cache stream each),
/// cells per stream (a multiple of 256) and tokens per decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    seqs: u32,
    per_seq: u32,
    batch: u32,
}

impl Shape {
    fn n_ctx(self) -> Result<u32, Error> {
        self.per_seq
            .checked_mul(self.seqs)
            .ok_or_else(|| Error::Backend("the call needs a context larger than 2^32".into()))
    }

    /// Whether a context of this shape serves `need` exactly as a new
    /// context of shape `need` would: enough streams and cells (unused
    /// streams are not in any sum; attention covers a stream's used cells
    /// rounded up to 256, whatever its size), and the same batch size (which
    /// decides how prompts are split into decode calls, and the size of a
    /// sliding-window cache).
    fn fits(self, need: Shape) -> bool {
        self.seqs >= need.seqs && self.per_seq >= need.per_seq && self.batch == need.batch
    }

    /// A shape that serves both this one's calls and `need`.
    fn grown_for(self, need: Shape) -> Shape {
        if self.batch != need.batch {
            return need;
        }
        Shape {
            seqs: self.seqs.max(need.seqs),
            per_seq: self.per_seq.max(need.per_seq),
            batch: need.batch,
        }
    }
}

/// Calls on one engine that share a context: the worker keeps one session
/// for its life, so the KV cache is allocated once (or grown a few times)
/// and kept between calls, instead of being allocated and zeroed for every
/// call. A call whose sequences do not fit the kept context gets a new one,
/// as large as both (at most `parallel` streams of `ctx_size` cells); the
/// old one is freed first. A call that fails keeps no context.
///
/// # Slots, continuous batching, shared prefixes
///
/// The context has one KV-cache stream per slot (at most `parallel`). The
/// call's submissions wait in order; each free slot takes the next one,
/// decodes its prompt (in decode calls of its own, see below) and its first
/// token, and joins the generation steps, which decode one token of every
/// busy slot per call. When an answer is complete its slot is emptied
/// (`seq_rm`) and, with `continuous_batching`, the next submission takes it
/// while the others keep decoding; without it, the next round starts when
/// every slot is free.
///
/// A prompt is decoded in two parts, always: the text before the
/// transcript (the *prefix*: instructions, rubric, assignment prompt), then
/// the rest, each in decode calls of at most `batch_size` tokens from its
/// first position. With `share_prompt_prefix` a slot that ends a
/// submission keeps the prefix's cells, and a submission with the same
/// prefix skips decoding it: in that slot directly, or in another after
/// copying the stream (`seq_cp`, a buffer copy). The kept or copied cells
/// are exactly the ones the submission would have computed (same tokens,
/// positions, cells and decode calls), so sharing changes no answer. Kept
/// prefixes survive from call to call with the context.
///
/// # Why batched grades equal single ones
///
/// Every context has one KV-cache stream per sequence (`kv_unified` off)
/// and flash attention off (unless the `flash_attn` option turns it on,
/// which gives this guarantee up): then a sequence's attention sees
/// exactly the cell layout it would see alone (other streams are not in
/// its sums, and the padding cells add exact zeros), and greedy output does
/// not depend on which submissions share the call. (llama.cpp's CPU flash attention
/// takes a different kernel for a lone query row than for several, and a
/// unified cache interleaves the sequences' cells, which regroups the
/// floating-point sums: both changed levels in tests.) A slot's stream
/// holds stale (finite) values in its free cells after `seq_rm`; they are
/// masked, and a masked cell adds an exact zero, as a zeroed one does.
/// Prompts never share a decode call with other sequences, so a prompt is
/// split into the same decode calls alone or in a batch.
///
/// One more source of batch dependence is removed at build time: ggml
/// repacks Q4_0, Q4_K and IQ4_NL weights for its CPU kernels, and a
/// product with 4 or more rows then takes a GEMM kernel whose sums are
/// grouped differently from the 1-row GEMV, so a Q4_K_M model (the Gemma
/// test model) could flip a near-tie. The workspace's
/// `.cargo/config.toml` builds with `GGML_CPU_REPACK=OFF`, at some speed
/// (`use_extra_bufts`, the run-time switch, is not exposed by
/// llama-cpp-2 0.1.160, and a CPU buffer override still repacks). Whoever
/// builds the worker another way must keep that variable.
///
/// Reuse keeps that guarantee: an emptied stream is, to the kernels, a new
/// one (cells free, head at 0, stale values masked), a kept prefix is the
/// one a new stream would compute, and `Shape::fits` admits only contexts
/// whose differences (more streams, longer streams) change no sum. The
/// batch-invariance tests run one-at-a-time calls in the context a batched
/// call left, and calls of more submissions than slots.
pub struct Session<'e> {
    engine: &'e Engine,
    cached: Option<Kept<'e>>,
}

/// A context and what its slots hold.
struct Kept<'e> {
    shape: Shape,
    ctx: LlamaContext<'e>,
    /// Per slot: the prompt prefix in its cells `0..len` (nothing else is
    /// in a free slot's stream), or `None` for an empty stream.
    held: Vec<Option<Vec<LlamaToken>>>,
}

impl<'e> Session<'e> {
    /// Like [`Engine::evaluate`], in this session's context.
    pub fn evaluate(
        &mut self,
        items: &[EvaluateItem],
        role: &str,
        cancel: &AtomicBool,
        on_item: &mut dyn FnMut(usize, usize),
    ) -> Result<(Vec<EvaluationOutcome>, CallStats), Error> {
        let engine = self.engine;
        let started = Instant::now();
        let mut stats = CallStats {
            items: items.len(),
            ..CallStats::default()
        };
        let Prepared {
            mut seqs,
            errors,
            flags,
        } = engine.prepare(items)?;
        if !seqs.is_empty() {
            let need = engine.shape(&seqs)?;
            let t0 = Instant::now();
            let reuse = engine.options.reuse_kv_cache;
            // Taken out: a call that fails leaves no context behind (its KV
            // cache may hold anything).
            let mut kept = match self.cached.take() {
                Some(mut kept) if reuse && kept.shape.fits(need) => {
                    if !engine.share_prefix() {
                        // Metadata and data: the cache is as a new context's.
                        kept.ctx.clear_kv_cache();
                        kept.held.iter_mut().for_each(|h| *h = None);
                    }
                    stats.contexts_reused += 1;
                    kept
                }
                old => {
                    let shape = match &old {
                        Some(k) if reuse => k.shape.grown_for(need),
                        _ => need,
                    };
                    // The old cache's memory goes back before the new one is
                    // allocated.
                    drop(old);
                    stats.contexts_created += 1;
                    Kept {
                        shape,
                        ctx: engine.context(shape)?,
                        held: vec![None; shape.seqs as usize],
                    }
                }
            };
            stats.setup_seconds = t0.elapsed().as_secs_f64();
            let total = items.len();
            engine.decode_all(
                &mut kept,
                need,
                &mut seqs,
                cancel,
                &mut stats,
                started,
                &mut |d| on_item(d, total),
            )?;
            if reuse {
                self.cached = Some(kept);
            }
        }
        let outcomes = engine.outcomes(items, seqs, errors, flags, role);
        Ok((outcomes, stats))
    }

    /// Cells of the kept context (all streams), if there is one.
    pub fn context_cells(&self) -> Option<u32> {
        self.cached.as_ref().and_then(|k| k.shape.n_ctx().ok())
    }
}

/// A call's submissions, ready to decode.
struct Prepared<'a> {
    seqs: Vec<Sequence<'a>>,
    /// Per item: why it cannot be evaluated.
    errors: Vec<Option<String>>,
    /// Per item: flags found before decoding.
    flags: Vec<Vec<String>>,
}

/// A loaded model, ready to evaluate.
pub struct Engine {
    model: LlamaModel,
    template: LlamaChatTemplate,
    /// "gguf" or "built-in <name>".
    template_source: String,
    /// Whether the rendered template already starts with the BOS text.
    bos_text: Option<String>,
    options: EngineOptions,
    name: String,
    path: PathBuf,
    /// The token that is exactly `"`, to close a degenerate field with.
    quote: Option<LlamaToken>,
    /// Whether the model's KV cache can keep a prompt prefix and drop the
    /// rest (not with sliding-window attention or recurrent state).
    can_share_prefix: bool,
}

/// A field whose last this many characters repeat one unit at least
/// [`DEGENERATE_MIN_PERIODS`] times is closed early (`cut_degenerate`).
const DEGENERATE_MIN_CHARS: usize = 24;
const DEGENERATE_MIN_PERIODS: usize = 6;

/// One submission in flight.
struct Sequence<'a> {
    item: usize,
    /// Its slot (KV-cache stream) while it decodes.
    seq_id: i32,
    tokens: Vec<LlamaToken>,
    /// Length of the prompt prefix (before the transcript), decoded apart.
    split: usize,
    grammar: LlamaSampler,
    /// Sampling chain when temperature > 0.
    chain: Option<LlamaSampler>,
    rubric: &'a viva_models::Rubric,
    output: Vec<u8>,
    generated: u32,
    max_tokens: u32,
    /// Next position in the sequence.
    pos: i32,
    /// Last sampled token, to decode next.
    next: LlamaToken,
    batch_index: i32,
    done: Option<Result<(), String>>,
    seconds: f64,
    /// Byte offset in `output` where the JSON string being written starts.
    open_string: Option<usize>,
    /// The last output byte was a backslash inside a string.
    escaped: bool,
    /// The open evidence or rationale field degenerated: close it next.
    close_field: bool,
    /// The repeated units of the fields closed early.
    cut: Vec<String>,
}

impl Engine {
    /// Loads the model of `spec`.
    pub fn load(spec: &ModelSpec) -> Result<Engine, Error> {
        let options = EngineOptions::from_json(&spec.options)?;
        let path = PathBuf::from(&spec.path);
        check_model_file(&path)?;
        let backend = backend()?;
        check_gpus(&options, &gpu_devices())?;
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(options.gpu_layers)
            .with_main_gpu(i32::try_from(options.main_gpu).unwrap_or(i32::MAX))
            .with_split_mode(options.split_mode.to_llama());
        let model = LlamaModel::load_from_file(backend, &path, &params).map_err(|e| {
            Error::ModelCorrupt {
                path: path.clone(),
                reason: format!("llama.cpp cannot load it: {e}; its log above says why"),
            }
        })?;
        let (template, template_source) = Self::choose_template(&model, &options.template)?;
        let bos = model.vocab().bos();
        let bos_text = (bos.0 >= 0)
            .then(|| {
                String::from_utf8_lossy(&model.vocab().token_to_piece(bos, true, None)).into_owned()
            })
            .filter(|t| !t.is_empty());
        let quote = {
            let vocab = model.vocab();
            match vocab.tokenize(b"\"", false, false).as_slice() {
                [t] if vocab.token_to_piece(*t, false, None) == b"\"" => Some(*t),
                _ => None,
            }
        };
        let can_share_prefix =
            !(model.is_recurrent() || model.is_hybrid() || sliding_window(&model));
        Ok(Engine {
            model,
            template,
            template_source,
            bos_text,
            options,
            name: spec.name.clone(),
            path,
            quote,
            can_share_prefix,
        })
    }

    /// Whether calls share prompt prefixes (`share_prompt_prefix`, and a
    /// model whose cache can keep one).
    pub fn share_prefix(&self) -> bool {
        self.options.share_prompt_prefix && self.can_share_prefix
    }

    /// The GGUF's template when llama.cpp can apply it, else the named one.
    fn choose_template(
        model: &LlamaModel,
        fallback: &str,
    ) -> Result<(LlamaChatTemplate, String), Error> {
        let probe = |t: &LlamaChatTemplate| -> bool {
            let msgs = [
                LlamaChatMessage::new("system".into(), "s".into()),
                LlamaChatMessage::new("user".into(), "u".into()),
            ];
            match msgs {
                [Ok(a), Ok(b)] => model
                    .apply_chat_template(t, &[a, b], true)
                    .is_ok_and(|s| !s.is_empty()),
                _ => false,
            }
        };
        if let Ok(t) = model.chat_template(None)
            && probe(&t)
        {
            return Ok((t, "gguf".into()));
        }
        let t = LlamaChatTemplate::new(fallback)
            .map_err(|e| Error::Options(format!("template {fallback:?}: {e}")))?;
        if !probe(&t) {
            return Err(Error::Options(format!(
                "the model has no usable chat template and {fallback:?} is not a built-in \
                 llama.cpp template (try \"chatml\", \"gemma\", \"llama3\" or \"mistral-v7\")"
            )));
        }
        Ok((t, format!("built-in {fallback}")))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Where the chat template comes from: "gguf" or "built-in <name>".
    pub fn template_source(&self) -> &str {
        &self.template_source
    }

    /// Bytes of the model's tensors.
    pub fn memory_bytes(&self) -> u64 {
        self.model.size()
    }

    /// Replaces the options (threads, parallel, fast path …) of a loaded
    /// model; `gpu_layers`, `main_gpu` and `split_mode` only apply at load.
    pub fn set_options(&mut self, options: EngineOptions) {
        self.options = options;
    }

    /// The prompt of `item` as tokens: the chat template applied to the
    /// messages, with the transcript tokenised as plain text (control-token
    /// spellings in it stay text).
    pub fn prompt_tokens(&self, prompt: &EvaluationPrompt) -> Result<Vec<LlamaToken>, String> {
        self.prompt_split(prompt).map(|(tokens, _)| tokens)
    }

    /// [`Engine::prompt_tokens`], and how many of them come before the
    /// transcript (the prefix the submissions of an assignment share).
    fn prompt_split(&self, prompt: &EvaluationPrompt) -> Result<(Vec<LlamaToken>, usize), String> {
        let msgs = [
            LlamaChatMessage::new("system".into(), prompt.system.clone()),
            LlamaChatMessage::new("user".into(), prompt.user.clone()),
        ];
        let [Ok(system), Ok(user)] = msgs else {
            return Err("the prompt contains a NUL character".into());
        };
        let text = self
            .model
            .apply_chat_template(&self.template, &[system, user], true)
            .map_err(|e| format!("cannot apply the chat template: {e}"))?;
        let (head, tail) = text
            .split_once(TRANSCRIPT_SLOT)
            .ok_or("the chat template dropped the transcript")?;
        let vocab = self.model.vocab();
        let add_bos = !self
            .bos_text
            .as_deref()
            .is_some_and(|bos| head.starts_with(bos));
        let mut tokens = vocab.tokenize(head.as_bytes(), add_bos, true);
        let split = tokens.len();
        tokens.extend(vocab.tokenize(prompt.transcript.as_bytes(), false, false));
        tokens.extend(vocab.tokenize(tail.as_bytes(), false, true));
        Ok((tokens, split))
    }

    /// Evaluates `items`, one sequence each, at most `parallel` at a time
    /// (see [`Session`]). Items that cannot be evaluated (invalid rubric,
    /// prompt too long) get an outcome with an error; a failure of
    /// llama.cpp fails the call. `on_item` is called as items finish (done,
    /// total); `cancel` stops the call between decoding steps.
    ///
    /// This one call's context is dropped at its end; a [`Session`] keeps it
    /// for the next call.
    pub fn evaluate(
        &self,
        items: &[EvaluateItem],
        role: &str,
        cancel: &AtomicBool,
        on_item: &mut dyn FnMut(usize, usize),
    ) -> Result<(Vec<EvaluationOutcome>, CallStats), Error> {
        self.session().evaluate(items, role, cancel, on_item)
    }

    /// A session of calls that keep one context (and its KV cache) while
    /// their shapes allow (`reuse_kv_cache`, on by default).
    pub fn session(&self) -> Session<'_> {
        Session {
            engine: self,
            cached: None,
        }
    }

    /// Prompts, grammars and limits of `items`; the items that cannot be
    /// evaluated get their error instead.
    fn prepare<'a>(&self, items: &'a [EvaluateItem]) -> Result<Prepared<'a>, Error> {
        let prompt_options = PromptOptions {
            max_transcript_chars: self.options.max_transcript_chars,
            limits: self.options.limits(),
            ..PromptOptions::default()
        };
        let mut errors: Vec<Option<String>> = vec![None; items.len()];
        let mut flags: Vec<Vec<String>> = vec![Vec::new(); items.len()];
        let mut seqs: Vec<Sequence<'_>> = Vec::new();
        // Items of one call usually share a rubric: parse its grammar once.
        let mut grammars: Vec<(String, LlamaSampler)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Err(e) = item.rubric.validate() {
                errors[i] = Some(e.to_string());
                continue;
            }
            let prompt = build_prompt(item, &prompt_options);
            if let Some(flag) = injection::flag(&item.transcript) {
                flags[i].push(flag);
            }
            if prompt.truncated {
                flags[i].push(format!(
                    "the transcript was cut to {} characters for evaluation",
                    self.options.max_transcript_chars
                ));
            }
            let (tokens, split) = match self.prompt_split(&prompt) {
                Ok(t) => t,
                Err(e) => {
                    errors[i] = Some(e);
                    continue;
                }
            };
            let OutputGrammar {
                gbnf,
                max_output_chars,
            } = output_grammar(&item.rubric, self.options.limits());
            let bound = u32::try_from(max_output_chars).unwrap_or(u32::MAX);
            let max_tokens = self.options.max_tokens.unwrap_or(bound);
            let need = tokens.len() as u64 + u64::from(max_tokens.min(bound));
            if need > u64::from(self.options.ctx_size) {
                errors[i] = Some(format!(
                    "the prompt has {} tokens and the answer may need {}, more than ctx_size {}: \
                     shorten the transcript or raise ctx_size",
                    tokens.len(),
                    max_tokens.min(bound),
                    self.options.ctx_size
                ));
                continue;
            }
            if tokens.is_empty() {
                errors[i] = Some("the prompt has no tokens".into());
                continue;
            }
            let grammar = match grammars.iter().find(|(g, _)| *g == gbnf) {
                Some((_, s)) => s.clone(),
                None => {
                    let s = LlamaSampler::grammar(&self.model, &gbnf, "root").map_err(|e| {
                        Error::Backend(format!("the generated grammar was refused: {e}"))
                    })?;
                    grammars.push((gbnf, s.clone()));
                    s
                }
            };
            let chain = (self.options.temperature > 0.0).then(|| {
                LlamaSampler::chain_simple([
                    LlamaSampler::temp(self.options.temperature),
                    LlamaSampler::dist(self.options.seed.wrapping_add(i as u32)),
                ])
            });
            seqs.push(Sequence {
                item: i,
                seq_id: -1,
                pos: tokens.len() as i32,
                // The last prompt token is always decoded (its logits give
                // the first answer token), so the prefix stops before it.
                split: split.min(tokens.len() - 1),
                tokens,
                grammar,
                chain,
                rubric: &item.rubric,
                output: Vec::new(),
                generated: 0,
                max_tokens: max_tokens.min(bound),
                next: LlamaToken(0),
                batch_index: -1,
                done: None,
                seconds: 0.0,
                open_string: None,
                escaped: false,
                close_field: false,
                cut: Vec::new(),
            });
        }
        Ok(Prepared {
            seqs,
            errors,
            flags,
        })
    }

    /// The outcome of every item: its evaluation, or why there is none.
    fn outcomes(
        &self,
        items: &[EvaluateItem],
        seqs: Vec<Sequence<'_>>,
        errors: Vec<Option<String>>,
        mut flags: Vec<Vec<String>>,
        role: &str,
    ) -> Vec<EvaluationOutcome> {
        let mut outcomes: Vec<EvaluationOutcome> = items
            .iter()
            .zip(errors)
            .map(|(item, error)| EvaluationOutcome {
                submission_id: item.submission_id.clone(),
                evaluation: None,
                error,
            })
            .collect();
        for s in seqs {
            let text = String::from_utf8_lossy(&s.output).into_owned();
            let result = match s.done {
                Some(Ok(())) => parse_answer(&text, s.rubric).map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e),
                None => Err("the evaluation did not finish".into()),
            };
            let outcome = &mut outcomes[s.item];
            if let (Ok(_), Some(unit)) = (&result, s.cut.first()) {
                flags[s.item].push(format!(
                    "{}: the evaluator's text degenerated into repetition (\u{201c}{}\u{201d} …) \
                     in {} field(s), which were closed early; its levels are not to be trusted",
                    viva_models::evidence::DEGENERATE_OUTPUT,
                    unit.trim(),
                    s.cut.len()
                ));
            }
            if let Ok(answer) = &result
                && answer.addresses_grader == Some(true)
            {
                flags[s.item].push(injection::addresses_grader_flag(&self.name));
            }
            match result {
                Ok(answer) => {
                    let ratings = answer.ratings;
                    outcome.evaluation = Some(Evaluation {
                        role: role.to_owned(),
                        model: self.name.clone(),
                        ratings,
                        flags: std::mem::take(&mut flags[s.item]),
                        prompt_tokens: s.tokens.len() as u64,
                        generated_tokens: u64::from(s.generated),
                        seconds: s.seconds,
                    })
                }
                Err(e) => outcome.error = Some(e),
            }
        }
        outcomes
    }

    /// The context `seqs` need: a stream per slot (`parallel`, or fewer
    /// sequences), each as long as the longest prompt plus answer (rounded
    /// up to 256, llama.cpp's padding), and decode calls of `batch_size`
    /// tokens (at least one per slot).
    fn shape(&self, seqs: &[Sequence<'_>]) -> Result<Shape, Error> {
        let per_seq = seqs
            .iter()
            .map(|s| s.tokens.len() as u64 + u64::from(s.max_tokens) + 1)
            .max()
            .unwrap_or(1)
            .div_ceil(256)
            * 256;
        let slots = (seqs.len() as u32).clamp(1, self.options.parallel.max(1));
        let shape = Shape {
            seqs: slots,
            per_seq: u32::try_from(per_seq)
                .map_err(|_| Error::Backend("the call needs a context larger than 2^32".into()))?,
            batch: self.options.batch_size.max(slots),
        };
        shape.n_ctx()?;
        Ok(shape)
    }

    /// A context of `shape`, with the settings that make greedy output
    /// independent of batch composition (see [`Session`]).
    fn context(&self, shape: Shape) -> Result<LlamaContext<'_>, Error> {
        let n_ctx = shape.n_ctx()?;
        let threads = self.options.threads();
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(shape.batch)
            .with_n_ubatch(shape.batch)
            .with_n_seq_max(shape.seqs)
            .with_kv_unified(false)
            // LLAMA_FLASH_ATTN_TYPE_ENABLED (1) or _DISABLED (0), never AUTO.
            .with_flash_attention_policy(i32::from(self.options.flash_attn))
            .with_type_k(self.options.type_k.to_llama())
            .with_type_v(self.options.type_v.to_llama())
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        self.model.new_context(backend()?, params).map_err(|e| {
            Error::Backend(format!(
                "cannot create a context of {n_ctx} tokens ({} sequences, KV cache {}/{}): {e}; \
                 lower parallel or ctx_size, or choose a smaller type_k/type_v",
                shape.seqs,
                self.options.type_k.name(),
                self.options.type_v.name()
            ))
        })
    }

    /// Decodes `seqs` in the slots `0..need.seqs` of `kept` (see
    /// [`Session`]): submissions take free slots in order, every busy slot
    /// gets one token per generation step, and a finished submission's slot
    /// goes to the next waiting one (at once with `continuous_batching`,
    /// else when all slots are free).
    #[allow(clippy::too_many_arguments)]
    fn decode_all(
        &self,
        kept: &mut Kept<'_>,
        need: Shape,
        seqs: &mut [Sequence<'_>],
        cancel: &AtomicBool,
        stats: &mut CallStats,
        started: Instant,
        on_item: &mut dyn FnMut(usize),
    ) -> Result<(), Error> {
        let decode_error = |e| Error::Backend(format!("decoding failed: {e}"));
        let batch_error = |e| Error::Backend(format!("batch overflow: {e}"));
        let n_batch = need.batch as usize;
        let n_slots = need.seqs as usize;
        let mut batch = LlamaBatch::new(n_batch.max(n_slots), 1);
        let mut scratch: Vec<LlamaTokenData> = Vec::new();
        // Slot → the sequence decoding in it.
        let mut slots: Vec<Option<usize>> = vec![None; n_slots];
        let mut waiting = 0..seqs.len();
        let mut next_waiting = waiting.next();
        let mut finished = 0usize;
        loop {
            // Admission: free slots take waiting submissions.
            let all_free = slots.iter().all(Option::is_none);
            while let Some(i) = next_waiting
                && (all_free || self.options.continuous_batching)
            {
                let Some(slot) = self.free_slot(&slots, &kept.held, &seqs[i]) else {
                    break;
                };
                next_waiting = waiting.next();
                let s = &mut seqs[i];
                s.seq_id = slot as i32;
                let t = Instant::now();
                self.prefill(kept, s, n_batch, &mut batch, cancel, stats)?;
                stats.prompt_seconds += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let logits = kept.ctx.get_logits_ith(batch.n_tokens() - 1);
                self.step(s, logits, &mut scratch, stats)?;
                stats.generation_seconds += t.elapsed().as_secs_f64();
                if s.done.is_some() {
                    self.release(kept, s)?;
                    s.seconds = started.elapsed().as_secs_f64();
                    finished += 1;
                    on_item(finished);
                } else {
                    slots[slot] = Some(i);
                }
            }
            if slots.iter().all(Option::is_none) {
                if next_waiting.is_none() {
                    break;
                }
                continue;
            }

            // Generation: one token of every busy slot.
            let t = Instant::now();
            batch.clear();
            for &i in slots.iter().flatten() {
                let s = &mut seqs[i];
                s.batch_index = batch.n_tokens();
                batch
                    .add(s.next, s.pos, &[s.seq_id], true)
                    .map_err(batch_error)?;
                s.pos += 1;
            }
            self.check_cancel(cancel)?;
            kept.ctx.decode(&mut batch).map_err(decode_error)?;
            stats.steps += 1;
            for slot in slots.iter_mut() {
                let Some(i) = *slot else { continue };
                let s = &mut seqs[i];
                let logits = kept.ctx.get_logits_ith(s.batch_index);
                self.step(s, logits, &mut scratch, stats)?;
                if s.done.is_some() {
                    self.release(kept, s)?;
                    s.seconds = started.elapsed().as_secs_f64();
                    finished += 1;
                    on_item(finished);
                    *slot = None;
                }
            }
            stats.generation_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// A free slot for `s`: one that holds its prefix, else an empty one,
    /// else any.
    fn free_slot(
        &self,
        slots: &[Option<usize>],
        held: &[Option<Vec<LlamaToken>>],
        s: &Sequence<'_>,
    ) -> Option<usize> {
        let prefix = &s.tokens[..s.split];
        let free = || (0..slots.len()).filter(|&k| slots[k].is_none());
        free()
            .find(|&k| self.share_prefix() && held[k].as_deref() == Some(prefix))
            .or_else(|| free().find(|&k| held[k].is_none()))
            .or_else(|| free().next())
    }

    /// Decodes the prompt of `s` in its slot: the prefix (unless the slot
    /// holds it or copies it from another), then the rest; the logits of the
    /// last prompt token are those of the batch's last token.
    fn prefill(
        &self,
        kept: &mut Kept<'_>,
        s: &mut Sequence<'_>,
        n_batch: usize,
        batch: &mut LlamaBatch<'_>,
        cancel: &AtomicBool,
        stats: &mut CallStats,
    ) -> Result<(), Error> {
        let decode_error = |e| Error::Backend(format!("decoding failed: {e}"));
        let batch_error = |e| Error::Backend(format!("batch overflow: {e}"));
        let cache_error = |e| Error::Backend(format!("KV cache: {e}"));
        let slot = s.seq_id as usize;
        let prefix = &s.tokens[..s.split];
        let share = self.share_prefix() && s.split > 0;
        let mut have = share && kept.held[slot].as_deref() == Some(prefix);
        if !have {
            kept.ctx
                .clear_kv_cache_seq(Some(slot as u32), None, None)
                .map_err(cache_error)?;
            kept.held[slot] = None;
            let source = (0..kept.held.len())
                .find(|&k| share && k != slot && kept.held[k].as_deref() == Some(prefix));
            if let Some(k) = source
                && kept.ctx.kv_cache_seq_pos_min(k as i32) == 0
            {
                // The whole stream is copied at the next decode call; its
                // cells past the prefix are dropped at once.
                kept.ctx
                    .copy_kv_cache_seq(k as i32, s.seq_id, None, None)
                    .map_err(cache_error)?;
                let cut = kept
                    .ctx
                    .clear_kv_cache_seq(Some(slot as u32), Some(s.split as u32), None)
                    .map_err(cache_error)?;
                have = cut
                    && kept.ctx.kv_cache_seq_pos_min(s.seq_id) == 0
                    && kept.ctx.kv_cache_seq_pos_max(s.seq_id) + 1 == s.split as i32;
                if have {
                    stats.prefix_copies += 1;
                } else {
                    // Not the whole prefix: decode it after all.
                    kept.ctx
                        .clear_kv_cache_seq(Some(slot as u32), None, None)
                        .map_err(cache_error)?;
                }
            }
        }
        let parts: [(usize, usize); 2] = [(0, s.split), (s.split, s.tokens.len())];
        for (n, &(from, to)) in parts.iter().enumerate() {
            if n == 0 && have {
                stats.prompt_tokens_shared += (to - from) as u64;
                continue;
            }
            for start in (from..to).step_by(n_batch) {
                let end = (start + n_batch).min(to);
                batch.clear();
                for p in start..end {
                    batch
                        .add(s.tokens[p], p as i32, &[s.seq_id], p + 1 == s.tokens.len())
                        .map_err(batch_error)?;
                }
                self.check_cancel(cancel)?;
                kept.ctx.decode(batch).map_err(decode_error)?;
                stats.prompt_tokens += (end - start) as u64;
            }
        }
        if share {
            kept.held[slot] = Some(prefix.to_vec());
        }
        Ok(())
    }

    /// Empties the slot of a finished sequence, keeping the prompt prefix
    /// when prefixes are shared.
    fn release(&self, kept: &mut Kept<'_>, s: &Sequence<'_>) -> Result<(), Error> {
        let cache_error = |e| Error::Backend(format!("KV cache: {e}"));
        let slot = s.seq_id as usize;
        let keep = kept.held[slot].is_some()
            && kept
                .ctx
                .clear_kv_cache_seq(Some(slot as u32), Some(s.split as u32), None)
                .map_err(cache_error)?
            && kept.ctx.kv_cache_seq_pos_min(s.seq_id) == 0
            && kept.ctx.kv_cache_seq_pos_max(s.seq_id) + 1 == s.split as i32;
        if !keep {
            kept.ctx
                .clear_kv_cache_seq(Some(slot as u32), None, None)
                .map_err(cache_error)?;
            kept.held[slot] = None;
        }
        Ok(())
    }

    fn check_cancel(&self, cancel: &AtomicBool) -> Result<(), Error> {
        if cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Picks the next token of `s` from `logits`, records it, and decides
    /// whether the sequence is done.
    fn step(
        &self,
        s: &mut Sequence<'_>,
        logits: &[f32],
        scratch: &mut Vec<LlamaTokenData>,
        stats: &mut CallStats,
    ) -> Result<(), Error> {
        if logits.is_empty() {
            s.done = Some(Err("no logits for the prompt".into()));
            return Ok(());
        }
        let token = if s.close_field {
            match self.closing_token(s) {
                Some(q) => q,
                None => {
                    // Cannot close it (no single-quote token): stop this
                    // item rather than generate junk up to the cap.
                    let unit = s.cut.last().map(|u| u.trim()).unwrap_or_default();
                    s.done = Some(Err(format!(
                        "the evaluator's answer degenerated into repetition (\u{201c}{unit}\u{201d} …) \
                         after {} tokens and was stopped",
                        s.generated
                    )));
                    return Ok(());
                }
            }
        } else {
            self.pick(s, logits, scratch, stats)?
        };
        let vocab = self.model.vocab();
        if vocab.is_eog(token) {
            // The grammar only allows the end once the answer is complete.
            s.done = Some(Ok(()));
            return Ok(());
        }
        s.grammar.accept(token);
        if let Some(chain) = &mut s.chain {
            chain.accept(token);
        }
        let piece = vocab.token_to_piece(token, false, None);
        let start = s.output.len();
        s.output.extend_from_slice(&piece);
        self.watch_strings(s, start, stats);
        s.generated += 1;
        stats.generated_tokens += 1;
        s.next = token;
        if s.output.ends_with(b"]}")
            && serde_json::from_slice::<serde_json::Value>(&s.output).is_ok()
        {
            // Complete: skip the decoding step that would only yield the end.
            s.done = Some(Ok(()));
        } else if s.generated >= s.max_tokens {
            s.done = Some(Err(format!(
                "the answer was cut at max_tokens ({}); raise max_tokens or leave it unset",
                s.max_tokens
            )));
        }
        Ok(())
    }

    /// Tracks which JSON string is open after the bytes from `start`, and
    /// whether an open evidence or rationale field has degenerated into
    /// repetition (then the next token closes it, see [`Engine::step`]).
    fn watch_strings(&self, s: &mut Sequence<'_>, start: usize, stats: &mut CallStats) {
        for k in start..s.output.len() {
            let b = s.output[k];
            if s.open_string.is_some() && s.escaped {
                s.escaped = false;
            } else if s.open_string.is_some() && b == b'\\' {
                s.escaped = true;
            } else if b == b'"' {
                s.open_string = match s.open_string {
                    Some(_) => None,
                    None => Some(k + 1),
                };
            }
        }
        if s.open_string.is_none() {
            s.close_field = false;
            return;
        }
        if !self.options.cut_degenerate || s.close_field {
            return;
        }
        let Some(open) = s.open_string else { return };
        let key = s.output[..open.saturating_sub(1)].trim_ascii_end();
        if !(key.ends_with(b"\"evidence\":") || key.ends_with(b"\"rationale\":")) {
            return;
        }
        let field = &s.output[open..];
        if field.len() < DEGENERATE_MIN_CHARS {
            return;
        }
        if let Some(unit) = viva_models::evidence::repetition_tail(
            &String::from_utf8_lossy(field),
            DEGENERATE_MIN_CHARS,
            DEGENERATE_MIN_PERIODS,
        ) {
            s.close_field = true;
            stats.fields_cut += 1;
            s.cut.push(unit);
        }
    }

    /// The `"` token when the grammar accepts it now (it closes the open
    /// string).
    fn closing_token(&self, s: &mut Sequence<'_>) -> Option<LlamaToken> {
        let q = self.quote?;
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(q, 0.0, 0.0)], false);
        one.apply_sampler(&mut s.grammar);
        one.data
            .first()
            .is_some_and(|d| d.logit() > f32::NEG_INFINITY)
            .then_some(q)
    }

    fn pick(
        &self,
        s: &mut Sequence<'_>,
        logits: &[f32],
        scratch: &mut Vec<LlamaTokenData>,
        stats: &mut CallStats,
    ) -> Result<LlamaToken, Error> {
        // The unconstrained choice: the best token, or a sample.
        let free = match &mut s.chain {
            None => argmax(logits),
            Some(chain) => {
                let mut all = full_array(logits, std::mem::take(scratch));
                all.apply_sampler(chain);
                let t = all.selected_token();
                *scratch = all.data;
                t
            }
        };
        if self.options.grammar_fast_path
            && let Some(t) = free
        {
            let logit = logits.get(t.0 as usize).copied().unwrap_or(0.0);
            let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(t, logit, 0.0)], false);
            one.apply_sampler(&mut s.grammar);
            if one
                .data
                .first()
                .is_some_and(|d| d.logit() > f32::NEG_INFINITY)
            {
                stats.fast_accepts += 1;
                return Ok(t);
            }
        }
        // The grammar over the whole vocabulary, then the choice among what
        // it allows.
        stats.full_passes += 1;
        let mut all = full_array(logits, std::mem::take(scratch));
        all.apply_sampler(&mut s.grammar);
        let picked = match &mut s.chain {
            None => all
                .data
                .iter()
                .filter(|d| d.logit() > f32::NEG_INFINITY)
                .fold(None::<LlamaTokenData>, |best, d| match best {
                    Some(b) if b.logit() >= d.logit() => Some(b),
                    _ => Some(*d),
                })
                .map(|d| d.id()),
            Some(chain) => {
                all.apply_sampler(chain);
                all.selected_token()
            }
        };
        *scratch = all.data;
        picked.ok_or_else(|| Error::Backend("the grammar allows no token".into()))
    }
}

/// Whether the model attends through a sliding window on some layers
/// (`<arch>.attention.sliding_window` in its GGUF): such a cache drops
/// cells that fall out of the window, so it cannot keep a prompt prefix.
fn sliding_window(model: &LlamaModel) -> bool {
    let Ok(arch) = model.meta_val_str("general.architecture") else {
        return false;
    };
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// Index of the largest logit (the first of equals, like llama.cpp's greedy).
fn argmax(logits: &[f32]) -> Option<LlamaToken> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.and_then(|(i, _)| i32::try_from(i).ok())
        .map(LlamaToken)
}

fn full_array(logits: &[f32], mut buf: Vec<LlamaTokenData>) -> LlamaTokenDataArray {
    buf.clear();
    buf.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
    );
    LlamaTokenDataArray::new(buf, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_and_reject_unknown_keys() {
        let o = EngineOptions::from_json(&serde_json::Value::Null).expect("defaults");
        assert_eq!(o, EngineOptions::default());
        assert_eq!(o.temperature, 0.0);
        let o = EngineOptions::from_json(&serde_json::json!({"threads": 2, "temperature": 0}))
            .expect("ints");
        assert_eq!(o.threads, Some(2));
        let e = EngineOptions::from_json(&serde_json::json!({"thread": 2}));
        assert!(matches!(e, Err(Error::Options(m)) if m.contains("unknown field")));
        assert!(EngineOptions::from_json(&serde_json::json!({"parallel": 0})).is_err());
    }

    #[test]
    fn gpu_and_cache_options_default_to_the_batch_invariant_cpu_setup() {
        let o = EngineOptions::default();
        assert!(
            !o.flash_attn,
            "flash attention stays off: grades must not depend on batches"
        );
        assert_eq!((o.type_k, o.type_v), (KvType::F16, KvType::F16));
        assert_eq!((o.main_gpu, o.split_mode), (0, SplitMode::Layer));
        assert!(o.reuse_kv_cache);
        // Measured: shared prefixes save time on the CPU, continuous
        // batching did not (see `continuous_batching`).
        assert!(o.share_prompt_prefix && !o.continuous_batching);
    }

    #[test]
    fn every_kv_cache_type_parses_and_quantised_values_need_flash_attention() {
        for (t, name) in KvType::ALL {
            let o = EngineOptions::from_json(&serde_json::json!({"type_k": name}))
                .unwrap_or_else(|e| panic!("type_k {name}: {e}"));
            assert_eq!(o.type_k, t);
            assert_eq!(t.name(), name);
            let v = EngineOptions::from_json(&serde_json::json!({"type_v": name}));
            if t.is_quantized() {
                let e = v
                    .expect_err("quantised V without flash attention")
                    .to_string();
                assert!(e.contains("flash_attn = true") && e.contains(name), "{e}");
                let o = EngineOptions::from_json(
                    &serde_json::json!({"type_v": name, "flash_attn": true}),
                )
                .unwrap_or_else(|e| panic!("type_v {name} with flash_attn: {e}"));
                assert_eq!(o.type_v, t);
            } else {
                assert_eq!(v.expect("unquantised V").type_v, t);
            }
        }
        assert_eq!(
            EngineOptions::from_json(&serde_json::json!({"type_k": "Q8_0"}))
                .expect("case")
                .type_k,
            KvType::Q8_0
        );
        let e = EngineOptions::from_json(&serde_json::json!({"type_k": "q3_k"}))
            .expect_err("unknown type")
            .to_string();
        assert!(
            e.contains("\"q3_k\" is not a KV-cache type") && e.contains("q8_0, q4_0"),
            "{e}"
        );
        assert!(EngineOptions::from_json(&serde_json::json!({"type_k": 8})).is_err());
    }

    #[test]
    fn split_modes_main_gpu_and_flash_attention_parse() {
        for (name, mode) in [
            ("none", SplitMode::None),
            ("layer", SplitMode::Layer),
            ("row", SplitMode::Row),
        ] {
            let o = EngineOptions::from_json(&serde_json::json!({"split_mode": name}))
                .unwrap_or_else(|e| panic!("split_mode {name}: {e}"));
            assert_eq!(o.split_mode, mode);
            assert_eq!(mode.name(), name);
        }
        let e = EngineOptions::from_json(&serde_json::json!({"split_mode": "tensor"}))
            .expect_err("unsupported mode")
            .to_string();
        assert!(
            e.contains("\"tensor\" is not a split_mode") && e.contains("\"row\""),
            "{e}"
        );
        let o = EngineOptions::from_json(
            &serde_json::json!({"main_gpu": 1, "flash_attn": true, "reuse_kv_cache": false}),
        )
        .expect("gpu options");
        assert_eq!(o.main_gpu, 1);
        assert!(o.flash_attn && !o.reuse_kv_cache);
        assert!(EngineOptions::from_json(&serde_json::json!({"main_gpu": -1})).is_err());
        assert!(EngineOptions::from_json(&serde_json::json!({"flash_attn": "yes"})).is_err());
    }

    #[test]
    fn main_gpu_must_name_a_gpu_there_is() {
        let o = |main_gpu| EngineOptions {
            main_gpu,
            gpu_layers: 99,
            ..EngineOptions::default()
        };
        // No GPU: the model runs on the CPU (a warning, not an error).
        assert!(check_gpus(&o(0), &[]).is_ok());
        let gpus = [(0, "CUDA0 (NVIDIA H100)".to_owned())];
        assert!(check_gpus(&o(0), &gpus).is_ok());
        let e = check_gpus(&o(1), &gpus).expect_err("no GPU 1").to_string();
        assert!(
            e.contains("main_gpu = 1") && e.contains("1 GPU(s)") && e.contains("0: CUDA0"),
            "{e}"
        );
    }

    #[test]
    fn a_kept_context_serves_calls_that_fit_it() {
        let kept = Shape {
            seqs: 4,
            per_seq: 1024,
            batch: 512,
        };
        let one = Shape {
            seqs: 1,
            per_seq: 768,
            batch: 512,
        };
        assert!(kept.fits(one) && kept.fits(kept));
        assert!(!one.fits(kept));
        let longer = Shape {
            per_seq: 1280,
            ..one
        };
        assert!(!kept.fits(longer));
        assert_eq!(
            kept.grown_for(longer),
            Shape {
                seqs: 4,
                per_seq: 1280,
                batch: 512
            }
        );
        // Another batch size splits prompts differently: never shared.
        let other_batch = Shape { batch: 256, ..one };
        assert!(!kept.fits(other_batch));
        assert_eq!(kept.grown_for(other_batch), other_batch);
        assert_eq!(kept.n_ctx().expect("n_ctx"), 4096);
        assert!(
            Shape {
                seqs: 1 << 20,
                per_seq: 1 << 20,
                batch: 1
            }
            .n_ctx()
            .is_err()
        );
    }

    #[test]
    fn argmax_takes_the_first_best() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), Some(LlamaToken(1)));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn missing_and_corrupt_files_name_the_file_and_the_fix() {
        let dir = std::env::temp_dir().join(format!("viva-llama-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("nope.gguf");
        let e = check_model_file(&missing).expect_err("missing");
        let msg = e.to_string();
        assert!(
            msg.contains("nope.gguf") && msg.contains("viva models fetch"),
            "{msg}"
        );
        let junk = dir.join("junk.gguf");
        std::fs::write(&junk, b"<html>not a model</html>").expect("write");
        let msg = check_model_file(&junk).expect_err("junk").to_string();
        assert!(
            msg.contains("junk.gguf") && msg.contains("viva models fetch"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
