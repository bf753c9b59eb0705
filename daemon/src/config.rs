//! Configuration: defaults → `viva.toml` → `VIVA_*` environment → flags.
//!
//! Every key has a default, so an empty file is a valid configuration. Unknown
//! keys are an error (a typo must not silently fall back to a default).
//! Environment variables name a key by its path with `__` between sections:
//! `VIVA_LISTEN`, `VIVA_DATA_DIR`, `VIVA_SCHEDULER__STT_BATCH_SIZE`,
//! `VIVA_SANDBOX__ENABLED`. Their values are parsed as TOML values when they
//! parse (numbers, booleans, arrays), else taken as strings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use viva_lti::UrlPolicy;
use viva_plugins::{CompileLimits, HostOptions, Limits};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Where the store lives: the embedded SQLite file (the default) or a
/// PostgreSQL database shared by several nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// A libpq connection string or `postgres://` URL.
    Postgres(String),
}

impl StoreLocation {
    /// For logs and errors: a PostgreSQL URL without its password.
    pub fn display(&self) -> String {
        match self {
            StoreLocation::Sqlite(p) => p.display().to_string(),
            StoreLocation::Postgres(url) => redact_url(url),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; a
/// key=value string's `password=…` likewise.
pub fn redact_url(url: &str) -> String {
    if let Some(i) = url.find("://") {
        let (scheme, rest) = url.split_at(i + 3);
        if let Some(at) = rest.find('@') {
            let (userinfo, host) = rest.split_at(at);
            if let Some(colon) = userinfo.find(':') {
                return format!("{scheme}{}:***{host}", &userinfo[..colon]);
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Database, media and caches live here.
    pub data_dir: PathBuf,
    /// Where recordings are kept (default `<data_dir>/media`). Several nodes
    /// share one: a shared filesystem (NFS, CephFS) mounted at the same path
    /// on every node, so any api node serves any recording and gpu nodes
    /// read what api nodes wrote. Uploads are staged beside it, in
    /// `<media_dir>/.staging-<node>` (one filesystem: the final move is a
    /// rename).
    pub media_dir: Option<PathBuf>,
    /// Where grades and the queue live: unset (or `sqlite`) for the embedded
    /// SQLite file `<data_dir>/viva.db`; `postgres://user:password@host/db`
    /// for a PostgreSQL database several nodes share (`VIVA_STORE`).
    pub store: Option<String>,
    /// Public base URL (used in links the daemon hands out); defaults to http://{listen}.
    pub public_url: Option<String>,
    /// `text` or `json` logs.
    pub log_format: LogFormat,
    pub intake: IntakeConfig,
    pub scheduler: SchedulerConfig,
    pub workers: WorkersConfig,
    pub sessions: SessionConfig,
    pub sandbox: SandboxConfig,
    pub retention: RetentionConfig,
    pub plugins: PluginsConfig,
    pub lti: LtiConfig,
    pub limits: LimitsConfig,
    pub node: NodeConfig,
}

/// What this daemon does when several share one PostgreSQL store (`[node]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's name, stable across restarts (leases and batches are
    /// held under it). Unset: the host name on PostgreSQL; a fresh id per
    /// start on SQLite (one daemon per file).
    pub id: Option<String>,
    /// `all` (HTTP, intake, LTI, grade passback and the GPU queue: one
    /// node), `api` (everything but the GPU queue: no workers) or `gpu` (the
    /// GPU queue over the jobs it claims, plus health and metrics; no
    /// passback or retention sweeps).
    pub role: NodeRole,
    /// A file every node has, holding 32 random bytes (raw, or as 64 hex
    /// digits): it seals the session signing key and the LTI tool keys that
    /// a PostgreSQL store keeps for all nodes (AES-256-GCM), so any api node
    /// accepts any session and signs with the same LTI keys. Required with
    /// `store = "postgres://…"`; unused with SQLite (the keys stay in
    /// `data_dir/keys`). Create it once with
    /// `head -c 32 /dev/urandom > /etc/viva/secrets.key` and copy it to
    /// every node (mode 0600).
    pub secrets_key_file: Option<PathBuf>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: None,
            role: NodeRole::All,
            secrets_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    All,
    Api,
    Gpu,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::All => "all",
            NodeRole::Api => "api",
            NodeRole::Gpu => "gpu",
        }
    }

    /// Runs the GPU queue (workers).
    pub fn runs_queue(self) -> bool {
        self != NodeRole::Api
    }

    /// Runs grade passback and retention sweeps.
    pub fn runs_api(self) -> bool {
        self != NodeRole::Gpu
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./var"),
            store: None,
            public_url: None,
            media_dir: None,
            log_format: LogFormat::Text,
            intake: IntakeConfig::default(),
            scheduler: SchedulerConfig::default(),
            workers: WorkersConfig::default(),
            sessions: SessionConfig::default(),
            sandbox: SandboxConfig::default(),
            retention: RetentionConfig::default(),
            plugins: Default::default(),
            lti: Default::default(),
            limits: Default::default(),
            node: Default::default(),
        }
    }
}

/// Rate limits, stream caps and request timeouts (`[limits]`); 0 turns a
/// limit off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Header a reverse proxy sets to the client's address (its last entry
    /// counts), e.g. "X-Forwarded-For"; empty: the peer's address.
    pub client_ip_header: String,
    /// `/lti/login` requests per client address per minute.
    pub login_per_ip_per_minute: u32,
    /// Upload requests per client address, and per user, per minute.
    pub uploads_per_ip_per_minute: u32,
    pub uploads_per_user_per_minute: u32,
    /// Ticket requests per client address, and per user, per minute.
    pub tickets_per_ip_per_minute: u32,
    pub tickets_per_user_per_minute: u32,
    /// Live status streams (`/api/v1/events`) per user and in all.
    pub max_streams_per_user: usize,
    pub max_streams: usize,
    /// Longest a request may take to answer, uploads (their body is the
    /// work), previews and purges excepted; streams answer at once and are
    /// not cut.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers, and the
    /// longest a kept-alive connection may sit idle between requests.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            client_ip_header: String::new(),
            login_per_ip_per_minute: 120,
            uploads_per_ip_per_minute: 600,
            uploads_per_user_per_minute: 30,
            tickets_per_ip_per_minute: 3000,
            tickets_per_user_per_minute: 120,
            max_streams_per_user: 8,
            max_streams: 20_000,
            request_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    pub max_upload_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Uploads are refused (507) when free disk space would drop below this.
    pub min_free_bytes: u64,
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    /// Limit for each ffprobe/ffmpeg run on an upload.
    #[serde(with = "humantime_serde")]
    pub normalize_timeout: Duration,
    /// Preview transcodes (for formats browsers cannot play) running at once,
    /// over all submissions; each submission has at most one.
    pub preview_concurrency: usize,
    /// Uploads one user may send at once; more get 429 (0 = no limit).
    pub max_uploads_per_user: usize,
    /// Uploads received at once over all users; more get 429 (0 = no limit).
    pub max_uploads_in_flight: usize,
    /// Bytes one user may upload in 24 hours; more get 429 (0 = no limit).
    pub max_bytes_per_user_per_day: u64,
    /// An upload whose body sends nothing for this long is cut (408,
    /// `upload_stalled`); its place and disk reserve are given back.
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 2 * 1024 * 1024 * 1024,
            max_duration: Duration::from_secs(30 * 60),
            min_free_bytes: 1024 * 1024 * 1024,
            ffmpeg: PathBuf::from("ffmpeg"),
            ffprobe: PathBuf::from("ffprobe"),
            normalize_timeout: Duration::from_secs(10 * 60),
            preview_concurrency: 2,
            max_uploads_per_user: 2,
            max_uploads_in_flight: 32,
            max_bytes_per_user_per_day: 8 * 1024 * 1024 * 1024,
            body_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// How STT and evaluation share the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The design log's plan: a batch of STT, then its evaluation, never both at once.
    #[default]
    TwoPhase,
    /// STT and evaluation side by side, no barrier.
    Pipelined,
    /// Pipelined when every model fits `gpu_memory_budget_mb` together, else two-phase.
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub policy: Policy,
    /// Memory all models may use together (MiB); 0 = unknown, so `auto` picks two-phase.
    pub gpu_memory_budget_mb: u64,
    pub stt_batch_size: usize,
    /// A batch stops taking new uploads once its phase has been open this long.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// An idle daemon waits this long after the first upload to gather a batch.
    #[serde(with = "humantime_serde")]
    pub min_batch_wait: Duration,
    /// Transcriptions at once (the semaphore of 1).
    pub stt_concurrency: usize,
    /// Busy evaluator workers at once (the semaphore of 2).
    pub eval_concurrency: usize,
    /// Submissions decoded together in one evaluator call.
    pub eval_batch_size: usize,
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, capped at 5 minutes.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// A claimed job's lease; renewed while it runs.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Stop a phase's idle workers after this long with nothing to do (0 = keep).
    #[serde(with = "humantime_serde")]
    pub idle_unload_after: Duration,
    /// Consecutive load failures after which a worker's role is
    /// *unavailable*: the scheduler serves every other role and phase, and
    /// the jobs waiting on it wait (they never fail because a model is down).
    pub unavailable_after_failures: u32,
    /// An unavailable role is probed again after a backoff that doubles from
    /// 15 s up to this (and at once on `viva workers retry ROLE`).
    #[serde(with = "humantime_serde")]
    pub unavailable_probe_max: Duration,
    /// Two-phase: once the loaded models have nothing left to do, switch to
    /// the other phase only when its waiting work (predicted seconds) is at
    /// least this many times the swap's round trip (measured load and stop
    /// times), unless its oldest submission has waited `max_phase_wait` or
    /// no other upload is expected before then. 0 = always switch at once.
    pub swap_work_ratio: f64,
    /// The most a submission waits for its phase because a switch is held
    /// back to save a model swap.
    #[serde(with = "humantime_serde")]
    pub max_phase_wait: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            policy: Policy::TwoPhase,
            gpu_memory_budget_mb: 0,
            stt_batch_size: 10,
            batch_window: Duration::from_secs(120),
            min_batch_wait: Duration::ZERO,
            stt_concurrency: 1,
            eval_concurrency: 2,
            eval_batch_size: 4,
            max_attempts: 3,
            retry_backoff: Duration::from_secs(2),
            lease: Duration::from_secs(60),
            idle_unload_after: Duration::from_secs(600),
            unavailable_after_failures: 3,
            unavailable_probe_max: Duration::from_secs(300),
            swap_work_ratio: 1.0,
            max_phase_wait: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Longest a single transcription or evaluation call may take before the
    /// worker is considered stuck, killed and the job retried.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    pub stt: Option<WorkerConfig>,
    /// Evaluator workers keyed by role ("a", "b"): each submission gets one
    /// evaluation per role.
    pub evaluators: std::collections::BTreeMap<String, WorkerConfig>,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            load_timeout: Duration::from_secs(300),
            stop_grace: Duration::from_secs(5),
            job_timeout: Duration::from_secs(1800),
            stt: None,
            evaluators: Default::default(),
        }
    }
}

/// One worker executable and the model it loads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Model name shown to users and stored with results.
    pub model: String,
    /// Model file. Not needed by a remote worker (`viva-remote-worker`),
    /// whose model is on the server named in its options.
    #[serde(default)]
    pub model_path: PathBuf,
    /// Backend options passed to the worker (threads, gpu_layers, …).
    #[serde(default)]
    pub options: toml::Table,
    /// Memory the loaded model needs (MiB), for the `auto` policy and ETAs.
    #[serde(default)]
    pub memory_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Lifetime of session tokens.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Lifetime of single-use stream and media tickets.
    #[serde(with = "humantime_serde")]
    pub ticket_ttl: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            ticket_ttl: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Creates the built-in `sandbox` course with assignment `sandbox-oral-1`.
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Media is deleted this many days after a submission reaches a final
    /// state (0 = keep forever). Transcripts and grades stay.
    pub retention_days: u32,
    /// How often the daemon looks for expired media.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            retention_days: 180,
            sweep_interval: Duration::from_secs(3600),
        }
    }
}

impl Config {
    /// Builds the configuration from an optional file, the environment and
    /// flag overrides (already in `key.path = value` form).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, toml::Value)],
    ) -> Result<Config, ConfigError> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Invalid {
                    origin: format!(" in {}", path.display()),
                    message: e.to_string(),
                })?;
        }
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("VIVA_") else {
                continue;
            };
            if RESERVED_ENV.contains(&rest) {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut table, &path, parse_env_value(&value));
        }
        for (key, value) in overrides {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            set_path(&mut table, &path, value.clone());
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: String::new(),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| {
            Err(ConfigError::Invalid {
                origin: String::new(),
                message: m,
            })
        };
        let s = &self.scheduler;
        if s.stt_batch_size == 0 || s.stt_concurrency == 0 || s.eval_batch_size == 0 {
            return bad(
                "scheduler.stt_batch_size, stt_concurrency and eval_batch_size must be at least 1"
                    .into(),
            );
        }
        if s.eval_concurrency == 0 {
            return bad("scheduler.eval_concurrency must be at least 1".into());
        }
        if s.max_attempts == 0 {
            return bad("scheduler.max_attempts must be at least 1".into());
        }
        if s.lease < Duration::from_secs(3) {
            return bad("scheduler.lease must be at least 3s".into());
        }
        for role in self.workers.evaluators.keys() {
            if role.is_empty()
                || !role
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad(format!(
                    "evaluator role {role:?} must be letters, digits, '-' or '_'"
                ));
            }
        }
        Ok(())
    }

    /// The policy in force once `auto` is resolved against the memory budget.
    pub fn effective_policy(&self) -> Policy {
        match self.scheduler.policy {
            Policy::Auto => {
                let total: u64 = self.workers.stt.iter().map(|w| w.memory_mb).sum::<u64>()
                    + self
                        .workers
                        .evaluators
                        .values()
                        .map(|e| e.memory_mb)
                        .sum::<u64>();
                let budget = self.scheduler.gpu_memory_budget_mb;
                if budget > 0 && total <= budget {
                    Policy::Pipelined
                } else {
                    Policy::TwoPhase
                }
            }
            p => p,
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("viva.db")
    }

    /// The store's location: `store`, or the SQLite file in the data directory.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        match self.store.as_deref().map(str::trim) {
            None | Some("") | Some("sqlite") => Ok(StoreLocation::Sqlite(self.db_path())),
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                Ok(StoreLocation::Postgres(s.to_owned()))
            }
            Some(s) => match s.strip_prefix("sqlite:") {
                Some(path) if !path.is_empty() => Ok(StoreLocation::Sqlite(PathBuf::from(path))),
                _ => Err(ConfigError::Invalid {
                    origin: "store".into(),
                    message: format!(
                        "{} is not a store: use `sqlite` (the default), `sqlite:/path/viva.db` or `postgres://user:password@host/database`",
                        redact_url(s)
                    ),
                }),
            },
        }
    }

    pub fn media_dir(&self) -> PathBuf {
        self.media_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("media"))
    }

    /// Where uploads wait until they are whole: on the media's filesystem,
    /// one directory per node (each node clears its own at start).
    pub fn staging_dir(&self) -> PathBuf {
        match &self.media_dir {
            None => self.data_dir.join("staging"),
            Some(media) => {
                let node = self.node.id.clone().unwrap_or_else(host_name);
                let parent = media.parent().unwrap_or(media);
                let name = media
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "media".into());
                parent.join(format!(".{name}-staging-{node}"))
            }
        }
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

/// `VIVA_*` variables that are not configuration keys: the CLI, the scripts
/// and the test harness read them themselves (scripts/lib.sh exports several
/// before the tests run, so each must be listed here or `viva` rejects it as
/// an unknown key).
pub const RESERVED_ENV: &[&str] = &[
    "CONFIG",
    "TOKEN",
    "URL",
    "LOG",
    "CACHE",
    "MODELS_DIR",
    "ROOT",
    "PYTHON",
    "LTI_PYTHON",
    "LLAMA_LOG",
    "AXE_JS",
    "REQUIRE_LTI_PLATFORM",
    "REQUIRE_BROWSER",
    "REQUIRE_MODELS",
    "REQUIRE_PACKAGE",
    "REQUIRE_POSTGRES",
    "MIGRATE_TO",
    "TEST_STORE",
    "TEST_POSTGRES",
    "TEST_LOG",
    "REQUIRE_REMOTE",
    "REMOTE_PYTHON",
    "REMOTE_CT2_WHISPER",
];

fn parse_env_value(raw: &str) -> toml::Value {
    // `key = <raw>` parses numbers, booleans, arrays and quoted strings;
    // anything else (paths, addresses) is a plain string.
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        match entry {
            toml::Value::Table(t) => cur = t,
            _ => return,
        }
    }
    cur.insert(last.clone(), value);
}

/// `[plugins]`: who may upload, and the sandbox's limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Instructors may upload plugins for their own course (admins always may, site-wide).
    pub instructor_upload: bool,
    /// Largest plugin file accepted.
    pub max_upload_bytes: u64,
    /// Instruction budget of one plugin call (0: unmetered, deadline only).
    pub fuel: u64,
    /// Wall-clock limit of one plugin call.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Memory a plugin may use during one call.
    pub memory_bytes: u64,
    /// Largest scoring request (transcript, segments, evaluations, config).
    pub max_input_bytes: u64,
    /// Largest report a plugin may return.
    pub max_output_bytes: u64,
    /// Log, stdout and stderr kept per call (each).
    pub max_log_bytes: u64,
    /// Limits for compiling an uploaded plugin.
    #[serde(with = "humantime_serde")]
    pub compile_timeout: Duration,
    pub compile_memory_bytes: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        let l = Limits::default();
        let c = CompileLimits::default();
        PluginsConfig {
            instructor_upload: false,
            max_upload_bytes: HostOptions::default().max_component_bytes,
            fuel: l.fuel.unwrap_or(0),
            deadline: l.deadline,
            memory_bytes: l.memory_bytes,
            max_input_bytes: l.max_input_bytes,
            max_output_bytes: l.max_output_bytes,
            max_log_bytes: l.max_log_bytes,
            compile_timeout: c.timeout,
            compile_memory_bytes: c.memory_bytes,
        }
    }
}

impl PluginsConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            fuel: (self.fuel > 0).then_some(self.fuel),
            deadline: self.deadline,
            memory_bytes: self.memory_bytes,
            max_input_bytes: self.max_input_bytes,
            max_output_bytes: self.max_output_bytes,
            max_log_bytes: self.max_log_bytes,
            ..Limits::default()
        }
    }
}

/// `[lti]`: LTI 1.3 settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LtiConfig {
    /// Permit http and loopback/private platform URLs (development and tests
    /// only). Off, registration and service calls refuse them (SSRF protection).
    pub allow_insecure_platforms: bool,
    /// Accept LTI Dynamic Registration at `/lti/register` (Moodle "add tool
    /// by URL", Canvas `/api/lti/registrations`).
    pub dynamic_registration: bool,
    /// Rotate the tool's signing key this often (0 = never automatically).
    #[serde(with = "humantime_serde")]
    pub key_rotation: Duration,
    /// A new key is published this long before it signs.
    #[serde(with = "humantime_serde")]
    pub key_publish_lead: Duration,
    /// At most one refetch of a platform's key set per this interval when a
    /// launch names an unknown key id.
    #[serde(with = "humantime_serde")]
    pub jwks_refetch_interval: Duration,
    /// First delay before retrying a failed grade passback; doubles per
    /// attempt, capped at an hour.
    #[serde(with = "humantime_serde")]
    pub passback_retry_backoff: Duration,
    /// Attempts before a grade passback is given up (`dead`).
    pub passback_max_attempts: u32,
}

impl Default for LtiConfig {
    fn default() -> Self {
        LtiConfig {
            allow_insecure_platforms: false,
            dynamic_registration: true,
            key_rotation: Duration::from_secs(90 * 86_400),
            key_publish_lead: Duration::from_secs(86_400),
            jwks_refetch_interval: Duration::from_secs(60),
            passback_retry_backoff: Duration::from_secs(10),
            passback_max_attempts: 10,
        }
    }
}

impl LtiConfig {
    pub fn policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_insecure: self.allow_insecure_platforms,
        }
    }
}

/// This machine's host name (`viva` when it has none): a node's default id
/// on a shared store.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "viva".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_media_dir_stages_uploads_beside_it_per_node() {
        let mut c = Config {
            data_dir: PathBuf::from("/var/lib/viva"),
            ..Config::default()
        };
        assert_eq!(c.media_dir(), PathBuf::from("/var/lib/viva/media"));
        assert_eq!(c.staging_dir(), PathBuf::from("/var/lib/viva/staging"));
        c.media_dir = Some(PathBuf::from("/srv/shared/media"));
        c.node.id = Some("api-2".into());
        assert_eq!(c.media_dir(), PathBuf::from("/srv/shared/media"));
        // Same filesystem as the media (the final move is a rename), and
        // not another node's (each clears its own at start).
        assert_eq!(
            c.staging_dir(),
            PathBuf::from("/srv/shared/.media-staging-api-2")
        );
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(None, env(&[]), &[]).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./var"));
        assert_eq!(c.scheduler.stt_batch_size, 10);
        assert_eq!(c.scheduler.batch_window, Duration::from_secs(120));
        assert_eq!(c.scheduler.stt_concurrency, 1);
        assert_eq!(c.scheduler.eval_concurrency, 2);
        assert_eq!(c.scheduler.eval_batch_size, 4);
        assert_eq!(c.scheduler.max_attempts, 3);
        assert_eq!(c.intake.max_upload_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(c.intake.max_duration, Duration::from_secs(30 * 60));
        assert!(!c.sandbox.enabled);
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("viva.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\n[scheduler]\nstt_batch_size = 5\nbatch_window = \"30s\"\n",
        )
        .expect("write");
        let c = Config::load(
            Some(&file),
            env(&[
                ("VIVA_SCHEDULER__STT_BATCH_SIZE", "7"),
                ("VIVA_DATA_DIR", "/srv/viva"),
                ("VIVA_SANDBOX__ENABLED", "true"),
                ("VIVA_TOKEN", "ignored"),
                ("VIVA_CACHE", "/root/.cache/viva"),
                ("HOME", "/root"),
            ]),
            &[("listen".into(), toml::Value::String("0.0.0.0:7000".into()))],
        )
        .expect("load");
        assert_eq!(c.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.scheduler.stt_batch_size, 7);
        assert_eq!(c.scheduler.batch_window, Duration::from_secs(30));
        assert_eq!(c.data_dir, PathBuf::from("/srv/viva"));
        assert!(c.sandbox.enabled);
    }

    #[test]
    fn unknown_keys_are_errors_in_file_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("viva.toml");
        std::fs::write(&file, "[scheduler]\nstt_batchsize = 5\n").expect("write");
        let e = Config::load(Some(&file), env(&[]), &[]).expect_err("typo");
        assert!(e.to_string().contains("stt_batchsize"), "{e}");
        let e = Config::load(None, env(&[("VIVA_NOPE", "1")]), &[]).expect_err("typo");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn the_store_is_sqlite_by_default_or_a_postgres_url_and_passwords_stay_out_of_messages() {
        let c = Config::load(None, env(&[]), &[]).expect("defaults");
        assert_eq!(
            c.store_location().expect("default"),
            StoreLocation::Sqlite(PathBuf::from("./var/viva.db"))
        );
        let url = "postgres://viva:s3cret@db.example.edu:5432/viva";
        let c = Config::load(None, env(&[("VIVA_STORE", url)]), &[]).expect("env");
        let l = c.store_location().expect("postgres");
        assert_eq!(l, StoreLocation::Postgres(url.into()));
        assert_eq!(l.display(), "postgres://viva:***@db.example.edu:5432/viva");
        let c =
            Config::load(None, env(&[("VIVA_STORE", "sqlite:/srv/viva.db")]), &[]).expect("env");
        assert_eq!(
            c.store_location().expect("path"),
            StoreLocation::Sqlite(PathBuf::from("/srv/viva.db"))
        );
        let c = Config::load(None, env(&[("VIVA_STORE", "mysql://u:pw@h/db")]), &[]).expect("env");
        let e = c.store_location().expect_err("not a store").to_string();
        assert!(e.contains("postgres://") && !e.contains("pw@"), "{e}");
        assert_eq!(
            redact_url("host=db user=viva password=s3cret dbname=viva"),
            "host=db user=viva password=*** dbname=viva"
        );
    }

    #[test]
    fn example_config_parses_and_keeps_sandbox_off() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../viva.example.toml");
        let c = Config::load(Some(&path), env(&[]), &[]).expect("example parses");
        assert!(!c.sandbox.enabled);
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/viva.demo.toml");
        let d = Config::load(Some(&demo), env(&[]), &[]).expect("demo parses");
        assert!(d.sandbox.enabled);
    }

    /// The ```toml blocks of a Markdown file, with their first line numbers.
    fn toml_blocks(markdown: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut current: Option<(usize, String)> = None;
        for (n, line) in markdown.lines().enumerate() {
            match &mut current {
                None if line.trim_start().starts_with("```toml") => {
                    current = Some((n + 2, String::new()));
                }
                Some(_) if line.trim_start().starts_with("```") => {
                    out.extend(current.take());
                }
                Some((_, text)) => {
                    text.push_str(line);
                    text.push('\n');
                }
                None => {}
            }
        }
        out
    }

    #[test]
    fn every_configuration_in_the_docs_and_the_package_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut parsed = 0;
        for doc in ["README.md", "docs/deploy.md", "docs/gpu.md"] {
            let text = std::fs::read_to_string(root.join(doc)).expect("read doc");
            for (line, block) in toml_blocks(&text) {
                let file = dir.path().join("block.toml");
                std::fs::write(&file, &block).expect("write");
                match Config::load(Some(&file), env(&[]), &[]) {
                    Err(e) => {
                        panic!("{doc}:{line}: the configuration shown does not parse: {e}\n{block}")
                    }
                    Ok(c) => {
                        if let Err(e) = c.store_location() {
                            panic!("{doc}:{line}: the store shown is not one: {e}\n{block}");
                        }
                    }
                }
                parsed += 1;
            }
        }
        assert!(parsed >= 3, "only {parsed} configuration blocks found");
        // The package's /etc/viva/viva.toml: production defaults.
        let package = root.join("packaging/deb/viva.toml");
        let c = Config::load(Some(&package), env(&[]), &[]).expect("packaged config parses");
        assert!(!c.sandbox.enabled);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/viva"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        let stt = c.workers.stt.as_ref().expect("stt worker");
        assert_eq!(stt.command, PathBuf::from("/usr/bin/viva-whisper-worker"));
        assert!(stt.model_path.starts_with("/var/lib/viva/models"));
        assert_eq!(c.workers.evaluators.len(), 2);
        for w in c.workers.evaluators.values() {
            assert_eq!(w.command, PathBuf::from("/usr/bin/viva-llama-worker"));
            assert!(w.model_path.starts_with("/var/lib/viva/models"));
        }
    }

    #[test]
    fn auto_policy_follows_the_memory_budget() {
        let mut c = Config::default();
        c.scheduler.policy = Policy::Auto;
        let w = WorkerConfig {
            command: "w".into(),
            args: vec![],
            env: Default::default(),
            model: "m".into(),
            model_path: "m.bin".into(),
            options: Default::default(),
            memory_mb: 4000,
        };
        c.workers.stt = Some(w.clone());
        c.workers.evaluators.insert("a".into(), w.clone());
        c.workers.evaluators.insert("b".into(), w);
        assert_eq!(c.effective_policy(), Policy::TwoPhase);
        c.scheduler.gpu_memory_budget_mb = 12_000;
        assert_eq!(c.effective_policy(), Policy::Pipelined);
        c.scheduler.gpu_memory_budget_mb = 11_999;
        assert_eq!(c.effective_policy(), Policy::TwoPhase);
    }
}
