//! The Viva rubric plugin host.
//!
//! A rubric plugin is a WebAssembly component for the `viva:rubric@0.1.0`
//! world (`plugins/wit/since_v0.1.0/rubric.wit`): it describes itself
//! (`info`), checks an instructor's configuration (`validate-config`) and
//! turns a rubric, a submission's facts and the model evaluations into a
//! grade (`score`). This crate loads and runs such components with wasmtime:
//!
//! - **Loading** ([`PluginHost::load`]): size limit; a component (not a core
//!   module) exporting `viva:rubric/scorer` of a supported version and
//!   importing nothing but WASI and `viva:rubric/host`; compiled once and
//!   cached on disk by the component's sha256 and the engine's compatibility
//!   hash (see [`cache`]), optionally in a child process with its own time
//!   and memory limits ([`Compiler::Subprocess`]); pre-instantiated
//!   ([`wasmtime::component::InstancePre`]); `info` is called and its schema
//!   checked.
//! - **Calling** ([`Plugin::score`], [`Plugin::validate_config`]): a fresh
//!   store per call from the pre-instantiated component, with deny-all WASI
//!   (no files, environment, arguments or network; fixed clocks and
//!   randomness; stdout and stderr captured into bounded, truncating
//!   buffers), fuel, an epoch deadline, memory/table/instance caps and input
//!   and output size limits ([`Limits`]). Every failure is an [`Error`] that
//!   names what went wrong and carries the plugin's log; the host is
//!   unaffected and serves the next call.
//! - **Checking output**: points must lie within the rubric, criterion ids
//!   must exist, numbers must be finite ([`report`]).
//!
//! The default plugin (`weighted-criteria`) and `holistic-band` are built from
//! `plugins/guests` by this crate's build script and embedded ([`builtin`]).
//! This crate knows nothing of the daemon, its database or HTTP.

mod cache;
mod compile;
pub mod report;
mod sandbox;
pub mod schema;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

pub use cache::ArtifactCache;
pub use compile::{CompileLimits, Compiler, run_compile_child};
pub use report::{CriterionScore, ScoreReport, ScoreRequest, SubmissionFacts};
pub use sandbox::{CallLog, LogEntry, Usage};
pub use schema::Schema;

use sandbox::CallState;

/// The interface version this host implements.
pub const INTERFACE: &str = "viva:rubric@0.1.0";
/// The export every plugin must provide.
pub const SCORER_EXPORT: &str = "viva:rubric/scorer@0.1.0";
/// Versions of the scorer interface this host can bind (one binding module
/// per supported major version; 0.x: per minor).
const SUPPORTED_PREFIXES: &[&str] = &["viva:rubric/scorer@0.1."];

/// Bindings for `viva:rubric@0.1.*`. A future `viva:rubric@0.2.0` gets its own
/// module beside this one; plugins built against 0.1 keep using this one.
mod v0_1 {
    wasmtime::component::bindgen!({
        world: "rubric-plugin",
        path: "../wit/since_v0.1.0",
    });
}

/// The plugins built with Viva and embedded in it.
pub mod builtin {
    use std::path::PathBuf;

    /// The default plugin's name.
    pub const DEFAULT: &str = "weighted-criteria";

    /// The default plugin: reconciles the two evaluations per criterion.
    pub const WEIGHTED_CRITERIA: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/weighted_criteria.wasm"));

    /// Bands (CEFR A1–C2 by default) from the weighted percentage.
    pub const HOLISTIC_BAND: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/holistic_band.wasm"));

    /// Every embedded plugin with its name.
    pub fn all() -> [(&'static str, &'static [u8]); 2] {
        [
            ("weighted-criteria", WEIGHTED_CRITERIA),
            ("holistic-band", HOLISTIC_BAND),
        ]
    }

    /// A guest built beside this crate by its build script, such as the
    /// test-only `hostile` plugin: for tests and benchmarks on the machine
    /// that built Viva.
    pub fn built_guest(file_stem: &str) -> PathBuf {
        PathBuf::from(env!("OUT_DIR")).join(format!("{file_stem}.wasm"))
    }
}

/// Everything that can go wrong loading or calling a plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the plugin file is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error(
        "the plugin was built for {found}, but this Viva supports {INTERFACE} (viva:rubric/scorer@0.1.x): rebuild it with the current SDK"
    )]
    UnsupportedVersion { found: String },
    #[error("not a Viva rubric plugin: {0}")]
    WrongWorld(String),
    #[error(
        "the plugin imports {name}, which Viva does not provide: plugins get deny-all WASI and viva:rubric/host only"
    )]
    UnknownImport { name: String },
    #[error("compiling the plugin failed: {0}")]
    Compile(String),
    #[error("compiling the plugin took longer than {0:?}; it is too large or too complex")]
    CompileTimeout(Duration),
    #[error("compiling the plugin needed more than {limit} bytes of memory")]
    CompileMemory { limit: u64 },
    #[error("the plugin's info is invalid: {0}")]
    InvalidInfo(String),
    #[error("invalid configuration for {plugin}: {message}")]
    InvalidConfig { plugin: String, message: String },
    #[error("the scoring request is {size} bytes, over the limit of {limit} bytes")]
    InputTooLarge { size: u64, limit: u64 },
    #[error("plugin {plugin}: {failure}{}", log_suffix(log))]
    Call {
        plugin: String,
        failure: Failure,
        log: Box<CallLog>,
        usage: Usage,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the WebAssembly engine failed: {0}")]
    Engine(String),
}

fn log_suffix(log: &CallLog) -> String {
    let tail = log.tail(1500);
    if tail.is_empty() {
        String::new()
    } else {
        format!("; plugin log: {tail}")
    }
}

impl Error {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// The plugin's log when the error came from a call.
    pub fn call_log(&self) -> Option<&CallLog> {
        match self {
            Error::Call { log, .. } => Some(log),
            _ => None,
        }
    }

    /// What went wrong inside a call, when the error came from one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Error::Call { failure, .. } => Some(failure),
            _ => None,
        }
    }
}

/// Why a call into a plugin failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// The instruction budget ran out (an endless loop, or far too much work).
    OutOfFuel { fuel: u64 },
    /// The wall-clock deadline passed.
    Deadline { limit_ms: u64 },
    /// The plugin tried to grow its memory past the cap.
    MemoryLimit { limit_bytes: u64 },
    /// The plugin tried to grow a table past the cap.
    TableLimit { limit_elements: u64 },
    /// Recursion too deep for the stack.
    StackOverflow,
    /// The plugin panicked; the message comes from its log.
    Panic { message: String },
    /// Any other trap.
    Trap { message: String },
    /// The result was larger than the output limit.
    OutputTooLarge { size: u64, limit: u64 },
    /// The result broke the rules (points outside the rubric, unknown
    /// criterion, NaN …).
    InvalidOutput { reason: String },
    /// The plugin answered with one of the interface's typed errors.
    Refused { code: String, message: String },
    /// The plugin could not be instantiated.
    Instantiate { message: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::OutOfFuel { fuel } => write!(
                f,
                "ran out of fuel after {fuel} instructions (an endless loop, or far too much work)"
            ),
            Failure::Deadline { limit_ms } => {
                write!(f, "did not finish within its {limit_ms} ms deadline")
            }
            Failure::MemoryLimit { limit_bytes } => write!(
                f,
                "tried to use more than its memory limit of {} MiB",
                limit_bytes >> 20
            ),
            Failure::TableLimit { limit_elements } => {
                write!(f, "tried to grow a table past {limit_elements} elements")
            }
            Failure::StackOverflow => write!(f, "overflowed its stack (recursion too deep)"),
            Failure::Panic { message } => write!(f, "panicked: {message}"),
            Failure::Trap { message } => write!(f, "crashed: {message}"),
            Failure::OutputTooLarge { size, limit } => write!(
                f,
                "returned {size} bytes, over the output limit of {limit} bytes"
            ),
            Failure::InvalidOutput { reason } => write!(f, "returned an invalid report: {reason}"),
            Failure::Refused { code, message } => write!(f, "could not score ({code}): {message}"),
            Failure::Instantiate { message } => write!(f, "could not be started: {message}"),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Per-call limits. The defaults follow the spirit of Shopify Functions:
/// small, deterministic budgets that a real rubric plugin never gets near.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Instruction budget (wasmtime fuel); `None` turns metering off and
    /// leaves only the deadline.
    pub fuel: Option<u64>,
    /// Wall-clock limit for one call, enforced by epoch interruption.
    pub deadline: Duration,
    /// Linear memory cap for the whole call (all memories together).
    pub memory_bytes: u64,
    /// Cap on any table's elements.
    pub table_elements: u64,
    /// Core instances, tables and memories a component may create.
    pub instances: u32,
    pub tables: u32,
    pub memories: u32,
    /// Largest request (transcript, segments, evaluations, config).
    pub max_input_bytes: u64,
    /// Largest report (all its strings together).
    pub max_output_bytes: u64,
    /// Each of the log, stdout and stderr captures keeps this many bytes.
    pub max_log_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: Some(500_000_000),
            deadline: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            table_elements: 20_000,
            instances: 32,
            tables: 32,
            memories: 4,
            max_input_bytes: 4 << 20,
            max_output_bytes: 256 << 10,
            max_log_bytes: 32 << 10,
        }
    }
}

/// How a [`PluginHost`] loads components.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub limits: Limits,
    /// Largest component file accepted.
    pub max_component_bytes: u64,
    /// Where compiled artifacts are kept between runs; `None`: no disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Where compilation runs.
    pub compiler: Compiler,
    pub compile_limits: CompileLimits,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            limits: Limits::default(),
            max_component_bytes: 16 << 20,
            cache_dir: None,
            compiler: Compiler::InProcess,
            compile_limits: CompileLimits::default(),
        }
    }
}

/// What a plugin says about itself, checked by the host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// JSON Schema of the configuration (the subset [`Schema`] supports).
    pub config_schema: serde_json::Value,
    pub default_config: serde_json::Value,
    /// The interface the plugin was built for.
    pub interface: String,
}

/// How a plugin was loaded.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadStats {
    /// True when the compiled artifact came from the disk cache.
    pub from_cache: bool,
    /// Compilation (or cache load) time.
    pub compile_us: u64,
    /// Linking, pre-instantiation and the `info` call.
    pub prepare_us: u64,
}

/// A scored submission.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub report: ScoreReport,
    pub usage: Usage,
    pub log: CallLog,
}

/// The wasmtime engine, the linker with deny-all WASI and the host's
/// imports, and the cache. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    engine: Engine,
    linker: Linker<CallState>,
    options: HostOptions,
    cache: Option<ArtifactCache>,
}

/// Epoch ticks per second: the deadline's resolution.
const TICK: Duration = Duration::from_millis(5);

/// The engine configuration. Fixed, so a compile child process produces
/// artifacts this process can load (same compatibility hash).
pub(crate) fn engine_config() -> wasmtime::Config {
    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true);
    c.consume_fuel(true);
    c.epoch_interruption(true);
    c.max_wasm_stack(512 << 10);
    c.cranelift_opt_level(wasmtime::OptLevel::Speed);
    c
}

impl PluginHost {
    pub fn new(options: HostOptions) -> Result<PluginHost> {
        let engine = Engine::new(&engine_config()).map_err(|e| Error::Engine(format!("{e:#}")))?;
        let mut linker: Linker<CallState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| Error::Engine(format!("linking WASI: {e:#}")))?;
        v0_1::RubricPlugin::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| Error::Engine(format!("linking viva:rubric/host: {e:#}")))?;
        let cache = match &options.cache_dir {
            Some(dir) => Some(ArtifactCache::open(dir, &engine)?),
            None => None,
        };
        start_ticker(&engine);
        Ok(PluginHost {
            inner: Arc::new(HostInner {
                engine,
                linker,
                options,
                cache,
            }),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn options(&self) -> &HostOptions {
        &self.inner.options
    }

    /// Checks, compiles (or loads from the cache), links and pre-instantiates
    /// a component, then asks it for its [`PluginInfo`].
    pub fn load(&self, wasm: &[u8]) -> Result<Plugin> {
        let inner = &self.inner;
        let size = wasm.len() as u64;
        if size > inner.options.max_component_bytes {
            return Err(Error::TooLarge {
                size,
                limit: inner.options.max_component_bytes,
            });
        }
        check_header(wasm)?;
        let sha256 = sha256_hex(wasm);
        let t0 = Instant::now();
        let (component, from_cache) = self.compile(wasm, &sha256)?;
        let compile_us = t0.elapsed().as_micros() as u64;
        let t1 = Instant::now();
        check_world(&inner.engine, &component)?;
        let pre = inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| link_error(&e))?;
        let pre =
            v0_1::RubricPluginPre::new(pre).map_err(|e| Error::WrongWorld(format!("{e:#}")))?;
        let mut plugin = Plugin {
            inner: inner.clone(),
            pre,
            sha256,
            size_bytes: size,
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                config_schema: serde_json::Value::Null,
                default_config: serde_json::Value::Null,
                interface: INTERFACE.into(),
            },
            schema: Schema::any(),
            load: LoadStats {
                from_cache,
                compile_us,
                prepare_us: 0,
            },
        };
        let raw = plugin.call_info()?;
        let (info, schema) = check_info(raw)?;
        plugin.info = info;
        plugin.schema = schema;
        plugin.load.prepare_us = t1.elapsed().as_micros() as u64;
        Ok(plugin)
    }

    fn compile(&self, wasm: &[u8], sha256: &str) -> Result<(Component, bool)> {
        let inner = &self.inner;
        if let Some(cache) = &inner.cache
            && let Some(c) = cache.load(&inner.engine, sha256)
        {
            return Ok((c, true));
        }
        let artifact = compile::precompile(
            &inner.engine,
            wasm,
            &inner.options.compiler,
            &inner.options.compile_limits,
        )?;
        if let Some(cache) = &inner.cache {
            cache.store(sha256, &artifact);
        }
        // SAFETY: the artifact was produced just now by this engine's
        // configuration (in this process or in a child running this same
        // binary), and deserialisation checks the compatibility hash.
        let component = unsafe { Component::deserialize(&inner.engine, &artifact) }
            .map_err(|e| Error::Compile(format!("loading the compiled plugin: {e:#}")))?;
        Ok((component, false))
    }
}

/// Advances the engine's epoch every [`TICK`] while the engine lives. The
/// thread holds only a weak reference, so dropping the host ends it.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("viva-plugin-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the plugin deadline ticker; deadlines rely on fuel alone");
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Tells a core module or other file from a component before compiling.
fn check_header(wasm: &[u8]) -> Result<()> {
    if wasm.len() < 8 || &wasm[0..4] != b"\0asm" {
        return Err(Error::NotAComponent(
            "the file is not WebAssembly (no \\0asm header)".into(),
        ));
    }
    // Bytes 4..6 are the version, 6..8 the layer: 0 = core module, 1 = component.
    if wasm[6..8] == [0, 0] {
        return Err(Error::NotAComponent(
            "this is a core WebAssembly module; plugins are components: build with \
             `cargo build --target wasm32-wasip2` (see plugins/README.md)"
                .into(),
        ));
    }
    Ok(())
}

/// The component must import only WASI and `viva:rubric/host`, and export
/// a supported `viva:rubric/scorer`.
fn check_world(engine: &Engine, component: &Component) -> Result<()> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        let allowed = name.starts_with("wasi:")
            || name.starts_with("viva:rubric/host@0.1.")
            || name.starts_with("viva:rubric/types@0.1.");
        if !allowed {
            return Err(Error::UnknownImport {
                name: name.to_owned(),
            });
        }
    }
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_owned()).collect();
    let scorer = exports.iter().find(|n| n.starts_with("viva:rubric/scorer"));
    match scorer {
        Some(name) if SUPPORTED_PREFIXES.iter().any(|p| name.starts_with(p)) => {}
        Some(name) => {
            return Err(Error::UnsupportedVersion {
                found: name.clone(),
            });
        }
        None => {
            return Err(Error::WrongWorld(format!(
                "it does not export {SCORER_EXPORT} (it exports: {}); build it with the viva-plugin-sdk \
                 or against plugins/wit/since_v0.1.0",
                if exports.is_empty() {
                    "nothing".to_owned()
                } else {
                    exports.join(", ")
                }
            )));
        }
    }
    Ok(())
}

fn link_error(e: &wasmtime::Error) -> Error {
    let text = format!("{e:#}");
    // "component imports instance `x`, but a matching implementation was not found"
    if let Some(start) = text.find('`')
        && let Some(len) = text[start + 1..].find('`')
        && text.contains("import")
    {
        return Error::UnknownImport {
            name: text[start + 1..start + 1 + len].to_owned(),
        };
    }
    Error::WrongWorld(text)
}

fn check_info(raw: v0_1::viva::rubric::types::PluginInfo) -> Result<(PluginInfo, Schema)> {
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && raw.name.as_bytes()[0].is_ascii_lowercase();
    if !name_ok {
        return Err(Error::InvalidInfo(format!(
            "name {:?} must be 1-64 characters of a-z, 0-9 and '-', starting with a letter",
            raw.name
        )));
    }
    if raw.version.trim().is_empty() || raw.version.len() > 64 {
        return Err(Error::InvalidInfo(format!(
            "version {:?} must be 1-64 characters, e.g. \"1.0.0\"",
            raw.version
        )));
    }
    let config_schema: serde_json::Value = serde_json::from_str(&raw.config_schema)
        .map_err(|e| Error::InvalidInfo(format!("config-schema is not JSON: {e}")))?;
    let schema = Schema::compile(&config_schema)
        .map_err(|e| Error::InvalidInfo(format!("config-schema: {e}")))?;
    let default_config: serde_json::Value = if raw.default_config.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(&raw.default_config)
            .map_err(|e| Error::InvalidInfo(format!("default-config is not JSON: {e}")))?
    };
    if !default_config.is_object() {
        return Err(Error::InvalidInfo(
            "default-config must be a JSON object".into(),
        ));
    }
    schema.validate(&default_config).map_err(|e| {
        Error::InvalidInfo(format!("default-config does not match config-schema: {e}"))
    })?;
    Ok((
        PluginInfo {
            name: raw.name,
            version: raw.version,
            description: raw.description,
            config_schema,
            default_config,
            interface: INTERFACE.into(),
        },
        schema,
    ))
}

/// A loaded, pre-instantiated plugin. Each call gets a fresh store and
/// instance, so calls are independent and may run on several threads.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<HostInner>,
    pre: v0_1::RubricPluginPre<CallState>,
    sha256: String,
    size_bytes: u64,
    info: PluginInfo,
    schema: Schema,
    load: LoadStats,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.info.name)
            .field("version", &self.info.version)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Plugin {
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn load_stats(&self) -> LoadStats {
        self.load
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    fn label(&self) -> String {
        if self.info.name.is_empty() {
            format!("sha256:{}", &self.sha256[..12])
        } else {
            format!("{} {}", self.info.name, self.info.version)
        }
    }

    /// Runs `f` against a fresh instance under `limits`.
    fn call<R>(
        &self,
        limits: &Limits,
        f: impl FnOnce(&mut Store<CallState>, &v0_1::RubricPlugin) -> wasmtime::Result<R>,
    ) -> (std::result::Result<R, Failure>, Usage, CallLog) {
        let started = Instant::now();
        let mut store = Store::new(&self.inner.engine, CallState::new(limits));
        store.limiter(|s| &mut s.limiter);
        let fuel = limits.fuel.unwrap_or(u64::MAX);
        let fuel_set = store.set_fuel(fuel).is_ok();
        let ticks = limits.deadline.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let result = match self.pre.instantiate(&mut store) {
            Ok(bindings) => f(&mut store, &bindings).map_err(|e| classify(&e, &store, limits)),
            Err(e) => {
                let failure = classify(&e, &store, limits);
                Err(match failure {
                    Failure::Trap { message } => Failure::Instantiate { message },
                    other => other,
                })
            }
        };
        let fuel_consumed = match (limits.fuel, fuel_set) {
            (Some(_), true) => store.get_fuel().ok().map(|left| fuel.saturating_sub(left)),
            _ => None,
        };
        let state = store.into_data();
        let usage = Usage {
            fuel_consumed,
            peak_memory_bytes: state.limiter.peak_memory,
            elapsed_us: started.elapsed().as_micros() as u64,
        };
        (result, usage, state.into_log())
    }

    fn fail(&self, failure: Failure, usage: Usage, log: CallLog) -> Error {
        Error::Call {
            plugin: self.label(),
            failure,
            log: Box::new(log),
            usage,
        }
    }

    fn call_info(&self) -> Result<v0_1::viva::rubric::types::PluginInfo> {
        let limits = self.inner.options.limits.clone();
        let (result, usage, log) = self.call(&limits, |store, b| {
            b.viva_rubric_scorer().call_info(&mut *store)
        });
        let info = result.map_err(|f| self.fail(f, usage, log.clone()))?;
        let size = (info.name.len()
            + info.version.len()
            + info.description.len()
            + info.config_schema.len()
            + info.default_config.len()) as u64;
        if size > limits.max_output_bytes {
            return Err(self.fail(
                Failure::OutputTooLarge {
                    size,
                    limit: limits.max_output_bytes,
                },
                usage,
                log,
            ));
        }
        Ok(info)
    }

    /// Checks an instructor's configuration: a JSON object that matches the
    /// plugin's schema and passes its `validate-config`.
    pub fn validate_config(&self, config: &serde_json::Value) -> Result<()> {
        let invalid = |message: String| Error::InvalidConfig {
            plugin: self.info.name.clone(),
            message,
        };
        if !config.is_object() {
            return Err(invalid("the configuration must be a JSON object".into()));
        }
        self.schema.validate(config).map_err(invalid)?;
        let text = config.to_string();
        let limits = self.inner.options.limits.clone();
        if text.len() as u64 > limits.max_input_bytes {
            return Err(invalid(format!(
                "the configuration is {} bytes, over the limit of {}",
                text.len(),
                limits.max_input_bytes
            )));
        }
        let (result, usage, log) = self.call(&limits, |store, b| {
            b.viva_rubric_scorer()
                .call_validate_config(&mut *store, &text)
        });
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(invalid(truncate(message, 2000))),
            Err(f) => Err(self.fail(f, usage, log)),
        }
    }

    /// Scores one submission under the host's limits.
    pub fn score(&self, request: &ScoreRequest) -> Result<Scored> {
        let limits = self.inner.options.limits.clone();
        self.score_with_limits(request, &limits)
    }

    /// Scores one submission under other limits (tests, the plugin bench).
    pub fn score_with_limits(&self, request: &ScoreRequest, limits: &Limits) -> Result<Scored> {
        let size = request.approximate_size();
        if size > limits.max_input_bytes {
            return Err(Error::InputTooLarge {
                size,
                limit: limits.max_input_bytes,
            });
        }
        let wit = request.to_wit();
        let (result, usage, log) = self.call(limits, |store, b| {
            b.viva_rubric_scorer().call_score(&mut *store, &wit)
        });
        let report = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let (code, message) = report::score_error_parts(e);
                return Err(self.fail(
                    Failure::Refused {
                        code: code.into(),
                        message: truncate(message, 2000),
                    },
                    usage,
                    log,
                ));
            }
            Err(f) => return Err(self.fail(f, usage, log)),
        };
        let out_size = report::output_size(&report);
        if out_size > limits.max_output_bytes {
            return Err(self.fail(
                Failure::OutputTooLarge {
                    size: out_size,
                    limit: limits.max_output_bytes,
                },
                usage,
                log,
            ));
        }
        match report::check(&request.rubric, report) {
            Ok(report) => Ok(Scored { report, usage, log }),
            Err(reason) => Err(self.fail(Failure::InvalidOutput { reason }, usage, log)),
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Turns a wasmtime error from a call into the specific [`Failure`].
fn classify(e: &wasmtime::Error, store: &Store<CallState>, limits: &Limits) -> Failure {
    let state = store.data();
    if let Some(hit) = e.downcast_ref::<sandbox::LimitHit>() {
        return hit.failure();
    }
    if let Some(hit) = &state.limiter.hit {
        return hit.failure();
    }
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        match trap {
            wasmtime::Trap::OutOfFuel => {
                return Failure::OutOfFuel {
                    fuel: limits.fuel.unwrap_or(u64::MAX),
                };
            }
            wasmtime::Trap::Interrupt => {
                return Failure::Deadline {
                    limit_ms: limits.deadline.as_millis() as u64,
                };
            }
            wasmtime::Trap::StackOverflow => return Failure::StackOverflow,
            _ => {}
        }
    }
    if let Some(message) = state.panic_message() {
        return Failure::Panic { message };
    }
    Failure::Trap {
        message: format!("{e:#}"),
    }
}
