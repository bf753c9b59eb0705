//! `viva doctor`: checks an installation and says, check by check, what is
//! wrong and what to do about it: ok, warn or fail, each with its fix.
//!
//! The checks are shared: `viva doctor` (cli/doctor.rs) prints them and
//! exits non-zero on a fail; the admin view (`GET /api/v1/admin/doctor`,
//! http/admin.rs) shows them. Each check is a function of what it needs,
//! so the CLI (no daemon running) and the HTTP handler (a running daemon's
//! store, keys and plugin registry) call the same code. Network checks have
//! short deadlines, and with no platform registered they say so instead of
//! failing.
//!
//! Child processes stay where the layout wants them: ffmpeg runs through
//! [`intake::self_test`], model workers through [`Supervisor`].

use std::net::ToSocketAddrs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use viva_lti::keys::KeyState;
use viva_lti::{HttpClient, ToolKeys};
use viva_models::WorkerKind;

use crate::config::{Config, WorkerConfig};
use crate::intake::{self, IntakeLimits};
use crate::lti::StoredRegistration;
use crate::plugins::PluginRegistry;
use crate::workers::{Supervisor, WorkerSpec, WorkerTimeouts};

/// How long a network check may take (DNS, a platform's key set).
pub const NETWORK_TIMEOUT: Duration = Duration::from_secs(5);
/// The clock may be this far off an HTTP Date header before it fails
/// (id_token `iat`/`exp` are checked against it).
pub const CLOCK_FAIL_SECS: i64 = 60;
/// …and this far off before it warns.
pub const CLOCK_WARN_SECS: i64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name: `config`, `data_dir`, `disk`, `ffmpeg`, `worker:stt`,
    /// `worker:<role>`, `public_url`, `clock`, `platform:<issuer>`,
    /// `platforms`, `keys`, `plugins`, `database`, `sandbox`.
    pub name: String,
    pub status: Status,
    /// What was found, in plain words.
    pub summary: String,
    /// What to do (for warn and fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Measurements (load time, memory, free bytes …) for monitoring.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl Check {
    pub fn ok(name: impl Into<String>, summary: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            summary: summary.into(),
            fix: None,
            details: serde_json::Value::Null,
        }
    }

    pub fn warn(
        name: impl Into<String>,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status: Status::Warn,
            fix: Some(fix.into()),
            ..Check::ok(name, summary)
        }
    }

    pub fn fail(
        name: impl Into<String>,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status: Status::Fail,
            fix: Some(fix.into()),
            ..Check::ok(name, summary)
        }
    }

    fn with(mut self, details: serde_json::Value) -> Check {
        self.details = details;
        self
    }
}

/// Every check's line; `ok` is false when any failed.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Report {
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            checks,
        }
    }

    /// One line per check (`ok   name  summary`), the fix indented below a
    /// warn or fail.
    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4} {:<width$}  {}\n",
                c.status.label(),
                c.name,
                c.summary
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("     {:<width$}  → {fix}\n", ""));
            }
        }
        let fails = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warns = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        out.push_str(&format!(
            "{} checks: {} ok, {warns} warn, {fails} fail\n",
            self.checks.len(),
            self.checks.len() - fails - warns
        ));
        out
    }
}

/// What the checks look at besides the configuration: the CLI builds this
/// from the data directory, the HTTP handler from the running daemon.
pub struct Inputs<'a> {
    pub config: &'a Config,
    /// The file the configuration came from, named in fixes.
    pub config_file: Option<PathBuf>,
    /// Start each worker and load its model (slow: seconds to minutes, and
    /// the model's memory for that long).
    pub load_models: bool,
    /// Registered platforms; `None`: not read (`skipped` says why).
    pub registrations: Option<Vec<StoredRegistration>>,
    /// The tool's keys; `None`: none made yet (the first start makes them).
    pub keys: Option<Arc<ToolKeys>>,
    /// Why the tool's keys did not open, when they exist but do not.
    pub keys_error: Option<String>,
    /// The plugin registry; `None`: not checked (`skipped` says why).
    pub plugins: Option<Arc<PluginRegistry>>,
    /// Why the database's platforms and plugins were not read.
    pub skipped: Option<String>,
    /// What a running daemon knows of its workers (the admin view without
    /// loading models): slot → error of its last start, when it failed.
    pub worker_errors: Vec<(String, String)>,
}

impl Inputs<'_> {
    fn file(&self) -> String {
        self.config_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the configuration file (viva.toml)".into())
    }
}

/// The inputs of a check run without a daemon (`viva doctor`): what the
/// data directory holds. The database, keys and plugin cache are opened only
/// when this process is their owner and the schema is current, so a check
/// run as root never leaves root-owned files in the service's directory and
/// an old database is not migrated behind the administrator's back.
pub fn local_inputs(
    config: &Config,
    config_file: Option<PathBuf>,
    load_models: bool,
) -> Inputs<'_> {
    let mut inputs = Inputs {
        config,
        config_file,
        load_models,
        registrations: None,
        keys: None,
        keys_error: None,
        plugins: None,
        skipped: None,
        worker_errors: Vec::new(),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::metadata(&config.data_dir) {
        Ok(m) if m.uid() == me => {}
        Ok(m) => {
            inputs.skipped = Some(format!(
                "the data directory belongs to uid {}, not to this user",
                m.uid()
            ));
            return inputs;
        }
        Err(_) => {
            inputs.skipped = Some("there is no data directory".into());
            return inputs;
        }
    }
    let Ok(location) = config.store_location() else {
        inputs.skipped = Some("the store setting is invalid".into());
        return inputs;
    };
    match crate::store::stored_version_at(&location) {
        Ok(Some(v)) if v == crate::store::schema_version_at(&location) => {}
        _ => {
            inputs.skipped = Some("the database is missing or not current".into());
            return inputs;
        }
    }
    let store = match crate::store::Store::open_at(&location) {
        Ok(s) => s,
        Err(e) => {
            inputs.skipped = Some(format!("the database cannot be opened: {e}"));
            return inputs;
        }
    };
    match store.read_blocking(crate::lti::list_registrations) {
        Ok(regs) => inputs.registrations = Some(regs),
        Err(e) => inputs.skipped = Some(format!("the registrations cannot be read: {e}")),
    }
    let keys_dir = crate::lti::keys_dir(config);
    if keys_dir.join("keys.json").exists() {
        match ToolKeys::open(&keys_dir, viva_lti::now_secs()) {
            Ok(k) => inputs.keys = Some(Arc::new(k)),
            Err(e) => inputs.keys_error = Some(e.to_string()),
        }
    }
    match PluginRegistry::new(config, store, viva_plugins::Compiler::InProcess) {
        Ok(p) => inputs.plugins = Some(Arc::new(p)),
        Err(e) => inputs.skipped = Some(format!("the plugin directory cannot be opened: {e}")),
    }
    inputs
}

/// Runs every check, in the order a person fixes things.
pub async fn run(inputs: &Inputs<'_>) -> Report {
    let config = inputs.config;
    let file = inputs.file();
    let mut checks = vec![Check::ok(
        "config",
        match &inputs.config_file {
            Some(_) => format!("{file} parses; no unknown keys"),
            None => "the configuration parsed when the daemon started; no unknown keys".to_owned(),
        },
    )];
    checks.push(sandbox(config, &file));
    checks.push(public_url(config, &file).await);
    checks.push(data_dir(&config.data_dir));
    checks.push(disk(config, &file));
    checks.push(database(config));
    if let Some(c) = secrets_key(config) {
        checks.push(c);
    }
    checks.push(ffmpeg(config, &file).await);
    for (slot, kind, role, worker) in configured_workers(config) {
        let error = inputs
            .worker_errors
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, e)| e.as_str());
        checks.push(
            worker_check(
                config,
                &file,
                &slot,
                kind,
                role.as_deref(),
                worker,
                inputs.load_models,
                error,
            )
            .await,
        );
    }
    if config.workers.stt.is_none() {
        checks.push(Check::fail(
            "worker:stt",
            "no speech-to-text worker is configured",
            format!(
                "add a [workers.stt] section to {file} (the package's viva.toml has one for the models `viva models fetch` gets)"
            ),
        ));
    }
    if config.workers.evaluators.is_empty() {
        checks.push(Check::fail(
            "worker:evaluators",
            "no evaluator is configured",
            format!("add [workers.evaluators.a] (and .b) to {file}"),
        ));
    }
    checks.extend(
        platforms(
            config,
            inputs.registrations.as_deref(),
            inputs.skipped.as_deref(),
        )
        .await,
    );
    checks.push(match &inputs.keys_error {
        Some(e) => Check::fail(
            "keys",
            format!("the LTI tool keys do not open: {e}"),
            format!(
                "restore {} from a backup (keys are secrets: mode 0600, owner viva)",
                crate::lti::keys_dir(config).display()
            ),
        ),
        None => keys(config, inputs.keys.as_deref()),
    });
    checks.push(plugins(inputs).await);
    Report::new(checks)
}

// ---- configuration ------------------------------------------------------------

/// The configuration check when the file does not load: the file, the line
/// and the key, from parsing it again with positions.
pub fn config_error(file: Option<&Path>, error: &dyn std::fmt::Display) -> Check {
    let fix = "fix that line (every key is in /usr/share/doc/viva/viva.example.toml; unknown keys are errors)";
    if let Some(path) = file
        && let Ok(text) = std::fs::read_to_string(path)
        && let Err(e) = toml::from_str::<Config>(&text)
    {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().to_owned();
        let at = match line {
            Some(n) => format!("{}:{n}", path.display()),
            None => path.display().to_string(),
        };
        return Check::fail("config", format!("{at}: {message}"), fix);
    }
    let at = file
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default();
    Check::fail("config", format!("{at}{error}"), fix)
}

fn sandbox(config: &Config, file: &str) -> Check {
    if config.sandbox.enabled {
        Check::fail(
            "sandbox",
            "the sandbox course is on: anyone with a session can submit to it",
            format!(
                "set enabled = false under [sandbox] in {file} (and drop VIVA_SANDBOX__ENABLED or --sandbox); it is for trials only"
            ),
        )
    } else {
        Check::ok("sandbox", "the sandbox course is off")
    }
}

// ---- public URL -----------------------------------------------------------------

async fn public_url(config: &Config, file: &str) -> Check {
    let example = "public_url = \"https://viva.example.edu\"";
    let Some(raw) = config.public_url.as_deref() else {
        return Check::fail(
            "public_url",
            format!(
                "public_url is not set: links and LTI URLs would say http://{}",
                config.listen
            ),
            format!(
                "set {example} in {file}: the https address LMSs and browsers use (TLS at a reverse proxy, docs/deploy.md)"
            ),
        );
    };
    let url = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(e) => {
            return Check::fail(
                "public_url",
                format!("public_url {raw:?} is not a URL: {e}"),
                format!("set {example} in {file}"),
            );
        }
    };
    if url.scheme() != "https" {
        return Check::fail(
            "public_url",
            format!(
                "public_url {raw} is not https: LTI platforms refuse tools without TLS and browsers block its cookies and recordings"
            ),
            format!(
                "put TLS in front of Viva (a reverse proxy, docs/deploy.md) and set {example} in {file}"
            ),
        );
    }
    let Some(host) = url.host_str().map(str::to_owned) else {
        return Check::fail(
            "public_url",
            format!("public_url {raw} has no host"),
            format!("set {example} in {file}"),
        );
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let h = host.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        (h.as_str(), port)
            .to_socket_addrs()
            .map(|a| a.map(|a| a.ip().to_string()).collect::<Vec<_>>())
    });
    match tokio::time::timeout(NETWORK_TIMEOUT, lookup).await {
        Ok(Ok(Ok(addrs))) if !addrs.is_empty() => Check::ok(
            "public_url",
            format!("{raw} is https and {host} resolves to {}", addrs.join(", ")),
        )
        .with(serde_json::json!({ "addresses": addrs })),
        Ok(Ok(Ok(_))) | Ok(Ok(Err(_))) | Ok(Err(_)) => Check::fail(
            "public_url",
            format!("{host} (from public_url) does not resolve on this server"),
            format!("add a DNS record for {host}, or correct public_url in {file}"),
        ),
        Err(_) => Check::fail(
            "public_url",
            format!(
                "resolving {host} took longer than {} s",
                NETWORK_TIMEOUT.as_secs()
            ),
            "check this server's DNS resolver (/etc/resolv.conf)",
        ),
    }
}

// ---- data directory, disk, database ---------------------------------------------

fn data_dir(dir: &Path) -> Check {
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) => {
            return Check::fail(
                "data_dir",
                format!("the data directory {shown} cannot be read: {e}"),
                format!(
                    "create it for the service user: sudo install -d -o viva -g viva -m 0700 {shown} (the package does)"
                ),
            );
        }
    };
    if !meta.is_dir() {
        return Check::fail(
            "data_dir",
            format!("{shown} is not a directory"),
            "point data_dir at a directory",
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let details = serde_json::json!({ "owner_uid": meta.uid(), "mode": format!("{mode:04o}") });
    if meta.uid() != me {
        return Check::warn(
            "data_dir",
            format!(
                "{shown} belongs to uid {}, and this check runs as uid {me}: the service user is the one that must write it",
                meta.uid()
            ),
            format!("run the checks as the service user: sudo -u viva viva doctor (or chown -R viva:viva {shown} if Viva runs as viva)"),
        )
        .with(details);
    }
    let probe = dir.join(format!(".viva-doctor-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"") {
        return Check::fail(
            "data_dir",
            format!("{shown} cannot be written: {e}"),
            format!("chown -R viva:viva {shown} && chmod 0700 {shown}"),
        )
        .with(details);
    }
    let _ = std::fs::remove_file(&probe);
    // The usual mistake: `viva migrate` (or another command) run as root,
    // leaving files the service user cannot write.
    let foreign: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.metadata().is_ok_and(|m| m.uid() != me))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !foreign.is_empty() {
        return Check::fail(
            "data_dir",
            format!(
                "{shown} holds files of another user: {} (the service cannot write them)",
                foreign.join(", ")
            ),
            format!("sudo chown -R viva:viva {shown}, and run viva's commands as the service user (sudo -u viva viva …)"),
        )
        .with(details);
    }
    if mode & 0o077 != 0 {
        return Check::warn(
            "data_dir",
            format!("{shown} has mode {mode:04o}: other users can reach students' recordings"),
            format!("chmod 0700 {shown} (the daemon also fixes it when it starts)"),
        )
        .with(details);
    }
    Check::ok(
        "data_dir",
        format!("{shown} is owned by this user (uid {me}), mode {mode:04o}, writable"),
    )
    .with(details)
}

fn disk(config: &Config, file: &str) -> Check {
    // The data directory, or the nearest existing parent (a fresh install).
    let mut at = config.data_dir.as_path();
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    let reserve = config.intake.min_free_bytes;
    let free = match intake::free_bytes(at) {
        Ok(f) => f,
        Err(e) => {
            return Check::fail(
                "disk",
                format!("free space at {} cannot be read: {e}", at.display()),
                "check that the data directory's file system is mounted",
            );
        }
    };
    let details = serde_json::json!({ "free_bytes": free, "min_free_bytes": reserve });
    let gib = |b: u64| b as f64 / (1024.0 * 1024.0 * 1024.0);
    if free < reserve {
        Check::fail(
            "disk",
            format!(
                "{:.1} GiB free at {}, below the intake reserve of {:.1} GiB: every upload is refused (507)",
                gib(free),
                at.display(),
                gib(reserve)
            ),
            format!("free space there (media past retention: viva purge), or lower intake.min_free_bytes in {file}"),
        )
        .with(details)
    } else if free < reserve.saturating_mul(2) {
        Check::warn(
            "disk",
            format!(
                "{:.1} GiB free at {}, close to the intake reserve of {:.1} GiB",
                gib(free),
                at.display(),
                gib(reserve)
            ),
            "free space before the reserve is reached (viva purge deletes media past retention_days)",
        )
        .with(details)
    } else {
        Check::ok(
            "disk",
            format!(
                "{:.1} GiB free at {} (uploads stop at {:.1} GiB)",
                gib(free),
                at.display(),
                gib(reserve)
            ),
        )
        .with(details)
    }
}

fn database(config: &Config) -> Check {
    let location = match config.store_location() {
        Ok(l) => l,
        Err(e) => {
            return Check::fail(
                "database",
                e.to_string(),
                "fix `store` in viva.toml (or VIVA_STORE)",
            );
        }
    };
    let path = location.display();
    let want = crate::store::schema_version_at(&location);
    match crate::store::stored_version_at(&location) {
        Ok(None) => Check::warn(
            "database",
            format!("no database at {} yet", path),
            "create it: sudo -u viva viva migrate (the service also does at start)",
        ),
        Ok(Some(v)) if v == want => Check::ok(
            "database",
            format!("{} is at schema version {v}, this build's", path),
        )
        .with(serde_json::json!({ "schema_version": v })),
        Ok(Some(v)) if v < want => Check::fail(
            "database",
            format!("{} is at schema version {v}; this build needs {want}", path),
            "run the migrations: sudo systemctl stop viva && sudo -u viva viva migrate && sudo systemctl start viva",
        ),
        Ok(Some(v)) => Check::fail(
            "database",
            format!(
                "{} is at schema version {v}, newer than this build's {want}",
                path
            ),
            "install the Viva version that wrote it again, or restore the backup taken before the upgrade",
        ),
        Err(e) => Check::fail(
            "database",
            format!("{} cannot be read: {e}", path),
            "check its owner (viva) and mode; restore it from a backup if it is damaged",
        ),
    }
}

/// On PostgreSQL: the secrets key file loads and opens the session key the
/// store holds (another node's file would not).
fn secrets_key(config: &Config) -> Option<Check> {
    let Ok(crate::config::StoreLocation::Postgres(url)) = config.store_location() else {
        return None;
    };
    let key = match crate::secrets::sealing_key(config) {
        Ok(Some(k)) => k,
        Ok(None) => return None,
        Err(e) => {
            return Some(Check::fail(
                "secrets key",
                e.to_string(),
                "copy /etc/viva/secrets.key from a node already running (the same file on every node), and set [node] secrets_key_file",
            ));
        }
    };
    Some(match crate::store::pg_sealed_secret(&url, "session_key") {
        Ok(None) => Check::ok(
            "secrets key",
            "the secrets key loads; no node has stored the shared keys yet (the first to start does)",
        ),
        Ok(Some(sealed)) => match key.open("session_key", &sealed) {
            Ok(_) => Check::ok(
                "secrets key",
                "the secrets key opens the shared session key: this node accepts every node's sessions",
            ),
            Err(e) => Check::fail(
                "secrets key",
                e.to_string(),
                "copy the secrets key file from a node already running: every node needs the same one",
            ),
        },
        Err(e) => Check::warn(
            "secrets key",
            format!("the store cannot be read to check the secrets key: {e}"),
            "fix the database check first",
        ),
    })
}

// ---- ffmpeg ---------------------------------------------------------------------------

async fn ffmpeg(config: &Config, file: &str) -> Check {
    let limits = IntakeLimits {
        timeout: Duration::from_secs(30),
        ..IntakeLimits::from(&config.intake)
    };
    let scratch = std::env::temp_dir().join(format!(
        "viva-doctor-{}-{}",
        std::process::id(),
        crate::clock::now_ms()
    ));
    let started = Instant::now();
    match intake::self_test(&limits, &scratch).await {
        Ok(t) => Check::ok(
            "ffmpeg",
            format!(
                "{} and ffprobe decode a test clip to 16 kHz mono ({:.1} s) in {} ms",
                t.version.split(" Copyright").next().unwrap_or(&t.version),
                t.info.duration_seconds,
                started.elapsed().as_millis()
            ),
        )
        .with(serde_json::json!({
            "version": t.version,
            "decode_ms": started.elapsed().as_millis() as u64,
        })),
        Err(intake::IntakeError::ToolMissing(why)) => Check::fail(
            "ffmpeg",
            format!("ffmpeg or ffprobe cannot run: {why}"),
            format!(
                "install ffmpeg (sudo apt install ffmpeg), or set intake.ffmpeg and intake.ffprobe in {file} to where they are (now {} and {})",
                config.intake.ffmpeg.display(),
                config.intake.ffprobe.display()
            ),
        ),
        Err(e) => Check::fail(
            "ffmpeg",
            format!("ffmpeg runs but cannot decode a test clip: {e}"),
            "install Debian's ffmpeg (sudo apt install ffmpeg); a minimal build lacks the decoders uploads need",
        ),
    }
}

// ---- workers ------------------------------------------------------------------------

fn configured_workers(config: &Config) -> Vec<(String, WorkerKind, Option<String>, &WorkerConfig)> {
    let mut out = Vec::new();
    if let Some(w) = &config.workers.stt {
        out.push(("stt".to_owned(), WorkerKind::Stt, None, w));
    }
    for (role, w) in &config.workers.evaluators {
        out.push((
            format!("evaluator:{role}"),
            WorkerKind::Evaluator,
            Some(role.clone()),
            w,
        ));
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn worker_check(
    config: &Config,
    file: &str,
    slot: &str,
    kind: WorkerKind,
    role: Option<&str>,
    worker: &WorkerConfig,
    load: bool,
    last_error: Option<&str>,
) -> Check {
    let name = match role {
        Some(r) => format!("worker:{r}"),
        None => "worker:stt".to_owned(),
    };
    let section = match role {
        Some(r) => format!("[workers.evaluators.{r}]"),
        None => "[workers.stt]".to_owned(),
    };
    let command = &worker.command;
    if command.components().count() > 1 && !command.exists() {
        return Check::fail(
            name,
            format!("the worker program {} does not exist", command.display()),
            format!(
                "correct command under {section} in {file} (the package installs /usr/bin/viva-whisper-worker and /usr/bin/viva-llama-worker)"
            ),
        );
    }
    let model = &worker.model_path;
    // No model_path: a remote worker (its server is in its options); the
    // load check below starts it, and it checks that its server answers.
    let size = match std::fs::metadata(model) {
        _ if model.as_os_str().is_empty() => 0,
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return Check::fail(
                name,
                format!("the model path {} is not a file", model.display()),
                format!("set model_path under {section} in {file} to the model file"),
            );
        }
        Err(e) => {
            return Check::fail(
                name,
                format!("the model file {} cannot be read: {e}", model.display()),
                format!(
                    "fetch the starter models (sudo -u viva viva models fetch) or put your model there, or correct model_path under {section} in {file}"
                ),
            );
        }
    };
    let mib = |b: u64| b / (1024 * 1024);
    if !load && model.as_os_str().is_empty() {
        return match last_error {
            Some(e) => Check::fail(
                name,
                format!(
                    "{}: the daemon's last start of it failed: {e}",
                    worker.model
                ),
                format!(
                    "fix its server or its options under {section} in {file}, then `viva workers retry {}`",
                    role.unwrap_or("stt")
                ),
            ),
            None => Check::ok(
                name,
                format!(
                    "{} has no model file here (a remote worker: its server is in its options); not started in this run",
                    worker.model
                ),
            ),
        };
    }
    if !load {
        if let Some(e) = last_error {
            return Check::fail(
                name,
                format!(
                    "{} ({} MiB): the daemon's last start of it failed: {e}",
                    worker.model,
                    mib(size)
                ),
                format!(
                    "fix the model or its options under {section} in {file}, then `viva workers retry {}`",
                    role.unwrap_or("stt")
                ),
            );
        }
        return Check::ok(
            name,
            format!(
                "{} at {} ({} MiB) is present; not loaded in this run (`viva doctor` without --no-load loads it and measures)",
                worker.model,
                model.display(),
                mib(size)
            ),
        )
        .with(serde_json::json!({ "model_bytes": size }));
    }
    let (tx, _rx) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(
        env!("CARGO_PKG_VERSION"),
        WorkerTimeouts::from(&config.workers),
        tx,
    );
    let spec = WorkerSpec::from_config(slot, kind, role, worker);
    let started = Instant::now();
    match supervisor.start(spec).await {
        Ok(handle) => {
            let load_ms = handle.load_ms();
            let info = supervisor
                .table()
                .into_iter()
                .find(|p| p.pid == handle.pid());
            let rss = info
                .as_ref()
                .and_then(|p| p.peak_rss_bytes.or(p.rss_bytes))
                .unwrap_or(0);
            let model_mem = info.as_ref().and_then(|p| p.model_memory_bytes);
            handle.stop().await;
            let total_ms = started.elapsed().as_millis() as u64;
            let mut summary = format!(
                "{} answered the handshake and loaded {} in {load_ms} ms; peak memory {} MiB",
                command.display(),
                worker.model,
                mib(rss)
            );
            if worker.memory_mb > 0 {
                summary.push_str(&format!(" (memory_mb says {})", worker.memory_mb));
            }
            Check::ok(name, summary).with(serde_json::json!({
                "load_ms": load_ms,
                "start_ms": total_ms,
                "peak_rss_bytes": rss,
                "model_memory_bytes": model_mem,
                "model_bytes": size,
            }))
        }
        Err(e) => Check::fail(
            name,
            format!("{} cannot start {}: {e}", command.display(), worker.model),
            format!(
                "correct the model file or its options under {section} in {file} (the worker's README lists its options)"
            ),
        ),
    }
}

// ---- platforms, clock, keys -----------------------------------------------------

async fn platforms(
    config: &Config,
    registrations: Option<&[StoredRegistration]>,
    skipped: Option<&str>,
) -> Vec<Check> {
    let Some(regs) = registrations else {
        return vec![Check::warn(
            "platforms",
            format!(
                "registered platforms not checked: {}",
                skipped.unwrap_or("the database was not read")
            ),
            "fix the checks above, or run as the service user: sudo -u viva viva doctor",
        )];
    };
    if regs.is_empty() {
        return vec![
            Check::ok(
                "platforms",
                "no LTI platform is registered yet: nothing to reach (register Moodle or Canvas: docs/deploy.md)",
            ),
            Check::ok(
                "clock",
                "not compared yet: it is checked against a registered platform's clock",
            ),
        ];
    }
    let http = match HttpClient::new(config.lti.policy(), viva_lti::USER_AGENT) {
        Ok(h) => h,
        Err(e) => {
            return vec![Check::fail(
                "platforms",
                format!("no HTTP client: {e}"),
                "report this as a bug",
            )];
        }
    };
    let mut checks = Vec::new();
    let mut skew: Option<(String, i64)> = None;
    for reg in regs {
        let r = &reg.registration;
        let name = format!("platform:{}", r.issuer);
        let url = r.key_set_url.clone();
        let fetched = tokio::time::timeout(
            NETWORK_TIMEOUT,
            http.send(reqwest::Method::GET, &url, &[], None),
        )
        .await;
        let resp = match fetched {
            Err(_) => {
                checks.push(Check::fail(
                    name,
                    format!("its key set {url} did not answer within {} s", NETWORK_TIMEOUT.as_secs()),
                    "check that this server can reach the platform (firewall, proxy, DNS); launches fail until it can",
                ));
                continue;
            }
            Ok(Err(e)) => {
                checks.push(Check::fail(
                    name,
                    format!("its key set {url} cannot be fetched: {e}"),
                    "check the key set URL (viva platform list) and that this server can reach the platform",
                ));
                continue;
            }
            Ok(Ok(resp)) => resp,
        };
        let date = resp
            .headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date);
        if let (Some(d), None) = (date, &skew) {
            skew = Some((r.issuer.clone(), crate::clock::now_ms() / 1000 - d));
        }
        let keys = resp
            .success()
            .and_then(|ok| ok.json::<serde_json::Value>())
            .and_then(|v| viva_lti::jwks::KeySet::parse(&v));
        checks.push(match keys {
            Ok(set) => Check::ok(
                name,
                format!("{} ({}): key set {url} has {} key(s)", r.name, r.client_id, set.len()),
            ),
            Err(e) => Check::fail(
                name,
                format!("its key set {url} is not usable: {e}"),
                "check the key set URL (viva platform list); re-register the platform if it changed",
            ),
        });
    }
    checks.push(match skew {
        None => Check::warn(
            "clock",
            "no platform answered with a Date header, so the clock was not compared",
            "make sure NTP runs (timedatectl set-ntp true)",
        ),
        Some((issuer, s)) => clock_check(&issuer, s),
    });
    checks
}

fn clock_check(issuer: &str, skew_secs: i64) -> Check {
    let summary = if skew_secs >= 0 {
        format!("this server's clock is {skew_secs} s ahead of {issuer}")
    } else {
        format!("this server's clock is {} s behind {issuer}", -skew_secs)
    };
    let details = serde_json::json!({ "skew_seconds": skew_secs, "against": issuer });
    let fix = "turn NTP on (timedatectl set-ntp true; systemd-timesyncd or chrony): launches' id_tokens (iat, exp) are checked against this clock";
    if skew_secs.abs() > CLOCK_FAIL_SECS {
        Check::fail("clock", summary, fix).with(details)
    } else if skew_secs.abs() > CLOCK_WARN_SECS {
        Check::warn("clock", summary, fix).with(details)
    } else {
        Check::ok("clock", summary).with(details)
    }
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut it = s.split_whitespace();
    let _weekday = it.next()?;
    let day: i64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

fn keys(config: &Config, keys: Option<&ToolKeys>) -> Check {
    let Some(keys) = keys else {
        return Check::ok(
            "keys",
            "no LTI tool key yet: the service makes one at its first start",
        );
    };
    let now = viva_lti::now_secs();
    let meta = keys.metadata();
    let Some(current) = meta.iter().find(|k| k.state == KeyState::Current) else {
        return Check::fail(
            "keys",
            "no current LTI tool key: launches and grade passback cannot be signed",
            format!(
                "restore {} from a backup, or move it aside and restart the service to make a new key (then platforms refetch it)",
                crate::lti::keys_dir(config).display()
            ),
        );
    };
    let age_days = now.saturating_sub(current.changed_at) / 86_400;
    let next = meta.iter().filter(|k| k.state == KeyState::Next).count();
    let retired = meta.iter().filter(|k| k.state == KeyState::Retired).count();
    let details = serde_json::json!({
        "current_kid": current.kid,
        "current_age_days": age_days,
        "next": next,
        "retired": retired,
    });
    let every = config.lti.key_rotation.as_secs();
    let summary = format!(
        "current key {} signs since {age_days} day(s); {next} published next, {retired} retired",
        current.kid
    );
    if every == 0 {
        return Check::ok("keys", format!("{summary}; automatic rotation is off")).with(details);
    }
    let overdue = now.saturating_sub(current.changed_at)
        > every + config.lti.key_publish_lead.as_secs() + 86_400;
    if overdue {
        Check::warn(
            "keys",
            format!(
                "{summary}: rotation (every {} days) is overdue",
                every / 86_400
            ),
            "the running service rotates keys: check it runs (systemctl status viva) and can write its keys directory",
        )
        .with(details)
    } else {
        Check::ok(
            "keys",
            format!("{summary}; rotation every {} days", every / 86_400),
        )
        .with(details)
    }
}

// ---- plugins ----------------------------------------------------------------------

async fn plugins(inputs: &Inputs<'_>) -> Check {
    let Some(registry) = inputs.plugins.clone() else {
        return Check::warn(
            "plugins",
            format!(
                "rubric plugins not checked: {}",
                inputs
                    .skipped
                    .as_deref()
                    .unwrap_or("the database was not read")
            ),
            "fix the checks above, or run as the service user: sudo -u viva viva doctor",
        );
    };
    let started = Instant::now();
    let checked = tokio::task::spawn_blocking(move || registry.check_all()).await;
    match checked {
        Ok(Ok((n, failed))) if failed.is_empty() => Check::ok(
            "plugins",
            format!(
                "{n} rubric plugin(s) compile and load ({} ms)",
                started.elapsed().as_millis()
            ),
        )
        .with(serde_json::json!({ "plugins": n })),
        Ok(Ok((n, failed))) => Check::fail(
            "plugins",
            format!(
                "{} of {n} rubric plugin(s) do not load: {}",
                failed.len(),
                failed
                    .iter()
                    .map(|(p, e)| format!("{p}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            "disable or replace those plugins (admin view → Plugins); assignments that use them fail to score",
        ),
        Ok(Err(e)) => Check::fail(
            "plugins",
            format!("rubric plugins cannot be listed: {e}"),
            "fix the database check first",
        ),
        Err(e) => Check::fail(
            "plugins",
            format!("the plugin check stopped: {e}"),
            "report this as a bug",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 CET"), None);
    }

    #[test]
    fn clock_skew_is_ok_then_warn_then_fail() {
        assert_eq!(clock_check("p", 3).status, Status::Ok);
        assert_eq!(clock_check("p", -30).status, Status::Warn);
        let c = clock_check("p", 120);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("NTP")), "{c:?}");
    }

    #[test]
    fn an_unknown_key_is_reported_with_its_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("viva.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:8080\"\n\n[scheduler]\nstt_batchsize = 5\n",
        )
        .expect("write");
        let e = Config::load(Some(&file), Vec::new(), &[]).expect_err("typo");
        let c = config_error(Some(&file), &e);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.summary.contains(&format!("{}:4", file.display()))
                && c.summary.contains("stt_batchsize"),
            "{}",
            c.summary
        );
    }

    /// A one-shot HTTP server answering every request with `response`.
    async fn serve_once(response: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
        });
        format!("http://{addr}/jwks")
    }

    fn registration(jwks: &str) -> StoredRegistration {
        let r: viva_lti::Registration = serde_json::from_value(serde_json::json!({
            "issuer": "https://lms.example.edu",
            "client_id": "c1",
            "name": "Test LMS",
            "auth_login_url": "https://lms.example.edu/auth",
            "auth_token_url": "https://lms.example.edu/token",
            "key_set_url": jwks,
            "deployments": ["1"],
        }))
        .expect("registration");
        StoredRegistration {
            registration: r,
            source: "test".into(),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[tokio::test]
    async fn a_platform_key_set_and_its_clock_are_checked() {
        let mut config = Config::default();
        config.lti.allow_insecure_platforms = true;
        // An empty key set, dated an hour ago: reachable, but the clock is off.
        let hour_ago = crate::clock::now_ms() / 1000 - 3600;
        let date = format_http_date(hour_ago);
        let body = r#"{"keys":[]}"#;
        let url = serve_once(format!(
            "HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let checks = platforms(&config, Some(&[registration(&url)]), None).await;
        let platform = &checks[0];
        assert_eq!(platform.name, "platform:https://lms.example.edu");
        let clock = checks.iter().find(|c| c.name == "clock").expect("clock");
        assert_eq!(clock.status, Status::Fail, "{clock:?}");
        assert!(clock.summary.contains("ahead"), "{clock:?}");

        // Nothing listens: the platform fails with what to check.
        let dead = registration("http://127.0.0.1:9/jwks");
        let checks = platforms(&config, Some(&[dead]), None).await;
        assert_eq!(checks[0].status, Status::Fail, "{checks:?}");
        assert!(checks[0].fix.is_some());

        // No platform: nothing to reach, and that is fine.
        let checks = platforms(&config, Some(&[]), None).await;
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:?}");
    }

    fn format_http_date(secs: i64) -> String {
        // Inverse of parse_http_date, for the test server.
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        format!(
            "Mon, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
            months[(m - 1) as usize],
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    #[test]
    fn the_data_directory_is_checked_for_mode_and_foreign_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        assert_eq!(data_dir(&data).status, Status::Ok);
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let c = data_dir(&data);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("chmod 0700")));
        assert_eq!(data_dir(&dir.path().join("missing")).status, Status::Fail);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: the foreign-owner case is not checked here");
            return;
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let db = data.join("viva.db");
        std::fs::write(&db, b"").expect("write");
        std::os::unix::fs::chown(&db, Some(65534), Some(65534)).expect("chown");
        let c = data_dir(&data);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.summary.contains("viva.db"), "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("chown -R viva:viva"))
        );
    }

    #[tokio::test]
    async fn the_sandbox_and_a_plain_http_public_url_fail_with_their_fix() {
        let mut config = Config::default();
        config.sandbox.enabled = true;
        let c = sandbox(&config, "/etc/viva/viva.toml");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("enabled = false"))
        );
        config.public_url = Some("http://viva.example.edu".into());
        let c = public_url(&config, "/etc/viva/viva.toml").await;
        assert_eq!(c.status, Status::Fail);
        assert!(c.summary.contains("not https"), "{c:?}");
        config.public_url = None;
        let c = public_url(&config, "/etc/viva/viva.toml").await;
        assert_eq!(c.status, Status::Fail);
        config.public_url = Some("https://localhost".into());
        let c = public_url(&config, "/etc/viva/viva.toml").await;
        assert_eq!(c.status, Status::Ok, "{c:?}");
    }
}
