//! Rubric plugins in the daemon: the registry, the scorer and the
//! management API.
//!
//! - Built-in plugins (`weighted-criteria`, the default, and
//!   `holistic-band`) are embedded in the binary, so a fresh install scores
//!   without any upload.
//! - Uploaded plugins are stored by sha256 in `<data>/plugins/<sha>.wasm`
//!   with their metadata in the `plugins` table: site-wide (admins) or for
//!   one course (instructors, when `plugins.instructor_upload` is on). An
//!   upload is checked and compiled (in a child process with its own time
//!   and memory limits) before it is stored.
//! - An assignment names a plugin; the name resolves to the course's newest
//!   enabled upload, then the site's, then the built-in, when the assignment
//!   is saved, and the assignment pins that file by sha256
//!   ([`PluginRegistry::resolve_pinned`]): a later upload changes no grade
//!   until the assignment is saved again; a disabled upload is out of use
//!   either way. Its configuration is validated against the plugin's schema
//!   and its `validate-config` when the assignment is saved.
//! - [`PluginScorer`] implements the scheduler's [`Scorer`]: it runs the
//!   assignment's plugin on each evaluated submission. Compiled artifacts
//!   are cached in `<data>/plugins/cache`, and loaded plugins stay in
//!   memory, pre-instantiated.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::db::{Connection, OptionalExtension, Row, params};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use viva_plugins::{
    CompileLimits, Compiler, HostOptions, Plugin, PluginHost, ScoreRequest, SubmissionFacts,
    builtin,
};

use crate::clock::now_ms;
use crate::config::Config;
use crate::domain::{AssignmentInput, DEFAULT_PLUGIN, new_id};
use crate::error::{Error, Result};
use crate::scheduler::{ScoreError, ScoreInput, ScoreOutcome, Scorer};
use crate::store::Store;

/// A plugin as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PluginRecord {
    /// `builtin:<name>` for embedded plugins, `plg_…` for uploads.
    pub id: String,
    pub name: String,
    pub version: String,
    pub description: String,
    pub sha256: String,
    pub size_bytes: u64,
    /// The course an upload belongs to; `None`: site-wide (or built in).
    pub context_id: Option<String>,
    pub builtin: bool,
    pub enabled: bool,
    pub interface: String,
    pub config_schema: serde_json::Value,
    pub default_config: serde_json::Value,
    pub uploaded_by: Option<String>,
    pub created_at: i64,
}

pub(crate) const BUILTIN_PREFIX: &str = "builtin:";

/// Built-in and uploaded plugins, loaded on first use and kept
/// pre-instantiated.
pub struct PluginRegistry {
    host: PluginHost,
    store: Store,
    dir: PathBuf,
    /// Loaded plugins by sha256.
    loaded: Mutex<HashMap<String, Arc<Plugin>>>,
    /// Serialises compilation, so concurrent first uses compile once.
    compiling: Mutex<()>,
}

impl PluginRegistry {
    /// Opens `<data>/plugins` (and its compile cache). Compiles nothing yet.
    pub fn new(config: &Config, store: Store, compiler: Compiler) -> Result<PluginRegistry> {
        let dir = config.data_dir.join("plugins");
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let p = &config.plugins;
        let host = PluginHost::new(HostOptions {
            limits: p.limits(),
            max_component_bytes: p.max_upload_bytes,
            cache_dir: Some(dir.join("cache")),
            compiler,
            compile_limits: CompileLimits {
                timeout: p.compile_timeout,
                memory_bytes: p.compile_memory_bytes,
            },
        })?;
        Ok(PluginRegistry {
            host,
            store,
            dir,
            loaded: Mutex::new(HashMap::new()),
            compiling: Mutex::new(()),
        })
    }

    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    fn cached(&self, sha256: &str) -> Option<Arc<Plugin>> {
        self.loaded.lock().ok()?.get(sha256).cloned()
    }

    /// Loads (compiling or from the cache) and remembers a component.
    /// Blocking: call from a blocking thread.
    fn load_bytes(&self, bytes: &[u8]) -> Result<Arc<Plugin>> {
        let sha = viva_sha256(bytes);
        if let Some(p) = self.cached(&sha) {
            return Ok(p);
        }
        let _guard = self.compiling.lock();
        if let Some(p) = self.cached(&sha) {
            return Ok(p);
        }
        let plugin = Arc::new(self.host.load(bytes)?);
        tracing::info!(
            plugin = %plugin.info().name,
            version = %plugin.info().version,
            from_cache = plugin.load_stats().from_cache,
            compile_ms = plugin.load_stats().compile_us / 1000,
            "plugin loaded"
        );
        if let Ok(mut m) = self.loaded.lock() {
            m.insert(sha, plugin.clone());
        }
        Ok(plugin)
    }

    fn builtin(&self, name: &str) -> Result<Option<Arc<Plugin>>> {
        match builtin::all().iter().find(|(n, _)| *n == name) {
            Some((_, bytes)) => self.load_bytes(bytes).map(Some),
            None => Ok(None),
        }
    }

    fn load_row(&self, row: &Stored) -> Result<Arc<Plugin>> {
        if let Some(p) = self.cached(&row.sha256) {
            return Ok(p);
        }
        let bytes = self.component(&row.sha256, &row.name)?.ok_or_else(|| {
            Error::Internal(format!(
                "plugin {} ({}) is in neither this node's plugins directory nor the store",
                row.name, row.sha256
            ))
        })?;
        self.load_bytes(&bytes)
    }

    /// An uploaded component: this node's copy in `<data_dir>/plugins`,
    /// else the store's (`plugin_components`, which every node shares),
    /// then kept here too. `None` when neither has it. Blocking.
    fn component(&self, sha256: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.dir.join(format!("{sha256}.wasm"));
        if path.is_file() {
            return std::fs::read(&path).map(Some).map_err(Error::io(format!(
                "reading plugin {name} ({})",
                path.display()
            )));
        }
        let sha = sha256.to_owned();
        let stored: Option<String> = self.store.read_blocking(move |c| {
            Ok(c.query_row(
                "SELECT component FROM plugin_components WHERE sha256 = ?1",
                [sha],
                |r| r.get(0),
            )
            .optional()?)
        })?;
        let Some(encoded) = stored else {
            return Ok(None);
        };
        let bytes = STANDARD
            .decode(encoded.as_bytes())
            .ok()
            .filter(|b| viva_sha256(b) == sha256)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "the stored component of plugin {name} ({sha256}) is damaged; upload it again"
                ))
            })?;
        self.keep_local(&path, &bytes)?;
        Ok(Some(bytes))
    }

    /// Writes this node's copy of a component (atomically).
    fn keep_local(&self, path: &std::path::Path, bytes: &[u8]) -> Result<()> {
        if path.exists() {
            return Ok(());
        }
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(Error::io(format!("storing plugin {}", path.display())))
    }

    /// Puts the components this node has and the store lacks (uploaded
    /// before the store kept them) into the store, so other nodes sharing
    /// it can score with them. Returns how many. Called at start.
    pub async fn share_local_components(&self) -> Result<usize> {
        let dir = self.dir.clone();
        let local: Vec<(String, PathBuf)> = tokio::task::spawn_blocking(move || {
            std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter_map(|e| {
                            let p = e.path();
                            let stem = p.file_stem()?.to_str()?.to_owned();
                            (p.extension()? == "wasm" && stem.len() == 64).then_some((stem, p))
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .await
        .map_err(|e| Error::Internal(format!("listing plugins: {e}")))?;
        let mut shared = 0;
        for (sha, path) in local {
            let s = sha.clone();
            let known: bool = self
                .store
                .read(move |c| {
                    Ok(c.query_row(
                        "SELECT COUNT(*) > 0 FROM plugin_components WHERE sha256 = ?1",
                        [s],
                        |r| r.get(0),
                    )?)
                })
                .await?;
            if known {
                continue;
            }
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(Error::io(format!("reading {}", path.display())))?;
            if viva_sha256(&bytes) != sha {
                continue;
            }
            let encoded = STANDARD.encode(&bytes);
            self.store
                .write(move |tx| {
                    tx.execute(
                        "INSERT INTO plugin_components (sha256, component, created_at)
                         VALUES (?1, ?2, ?3) ON CONFLICT (sha256) DO NOTHING",
                        params![sha, encoded, now_ms()],
                    )?;
                    Ok(())
                })
                .await?;
            shared += 1;
        }
        Ok(shared)
    }

    /// The plugin an assignment pinned: the file with `sha256` (uploaded or
    /// built in), else — pinned by name only, or a built-in replaced by a
    /// daemon upgrade — what `name` resolves to now ([`Self::resolve`]).
    /// An upload that was pinned but whose file is gone is an error: the
    /// instructor saves the assignment again to pin what is there. Blocking.
    pub fn resolve_pinned(
        &self,
        context_id: &str,
        name: &str,
        sha256: &str,
    ) -> Result<Arc<Plugin>> {
        if sha256.is_empty() {
            return self.resolve(context_id, name);
        }
        // A disabled upload stays out of use, pinned or not.
        let sha = sha256.to_owned();
        let enabled: Option<bool> = self.store.read_blocking(move |c| {
            Ok(c.query_row(
                "SELECT MAX(enabled) FROM plugins WHERE sha256 = ?1",
                [sha],
                |r| r.get(0),
            )?)
        })?;
        if enabled == Some(false) {
            return Err(Error::bad_request(
                "plugin_disabled",
                format!(
                    "the plugin {name} pinned by this assignment (sha256 {sha256}) is disabled; \
                     enable it, or save the assignment with another plugin"
                ),
            ));
        }
        if let Some(p) = self.cached(sha256) {
            return Ok(p);
        }
        if let Some((_, bytes)) = builtin::all()
            .iter()
            .find(|(_, b)| viva_sha256(b) == sha256)
        {
            return self.load_bytes(bytes);
        }
        if let Some(bytes) = self.component(sha256, name)? {
            return self.load_bytes(&bytes);
        }
        if builtin::all().iter().any(|(n, _)| *n == name) {
            tracing::warn!(
                plugin = name,
                pinned = sha256,
                "the pinned built-in plugin was replaced by this daemon's; scoring with it"
            );
            return self.resolve(context_id, name);
        }
        Err(Error::bad_request(
            "pinned_plugin_missing",
            format!(
                "the plugin {name} pinned by this assignment (sha256 {sha256}) is no longer stored; \
                 save the assignment again to pin an available one"
            ),
        ))
    }

    /// The plugin an assignment in `context_id` means by `name`: the
    /// course's newest enabled upload, else the site's, else the built-in.
    /// Blocking.
    pub fn resolve(&self, context_id: &str, name: &str) -> Result<Arc<Plugin>> {
        let (ctx, nm) = (context_id.to_owned(), name.to_owned());
        let row = self.store.read_blocking(move |c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {COLUMNS} FROM plugins WHERE name = ?1 AND enabled = 1
                       AND (context_id = ?2 OR context_id IS NULL)
                     ORDER BY context_id IS NULL, created_at DESC LIMIT 1"
                ),
                params![nm, ctx],
                stored,
            )
            .optional()?)
        })?;
        if let Some(row) = row {
            return self.load_row(&row);
        }
        self.builtin(name)?.ok_or_else(|| {
            Error::bad_request(
                "unknown_plugin",
                format!(
                    "no plugin named {name:?} is available in this course (built in: {}; uploads: see GET /api/v1/plugins)",
                    builtin::all().map(|(n, _)| n).join(", ")
                ),
            )
        })
    }

    fn builtin_record(&self, name: &str) -> Result<Option<PluginRecord>> {
        Ok(self.builtin(name)?.map(|p| PluginRecord {
            id: format!("{BUILTIN_PREFIX}{name}"),
            name: p.info().name.clone(),
            version: p.info().version.clone(),
            description: p.info().description.clone(),
            sha256: p.sha256().to_owned(),
            size_bytes: p.size_bytes(),
            context_id: None,
            builtin: true,
            enabled: true,
            interface: p.info().interface.clone(),
            config_schema: p.info().config_schema.clone(),
            default_config: p.info().default_config.clone(),
            uploaded_by: None,
            created_at: 0,
        }))
    }

    /// Loads the built-in plugins (from the cache after the first run).
    /// Blocking.
    pub fn warm_up(&self) {
        for (name, _) in builtin::all() {
            if let Err(e) = self.builtin(name) {
                tracing::error!(plugin = name, error = %e, "a built-in plugin does not load");
            }
        }
    }

    /// Loads (compiles, or takes from the cache) every built-in and every
    /// enabled upload: `(name version, error)` for each one that does not
    /// load, and how many were checked (`viva doctor`). Blocking.
    pub fn check_all(&self) -> Result<(usize, Vec<(String, String)>)> {
        let mut failed = Vec::new();
        let mut checked = 0;
        for (name, _) in builtin::all() {
            checked += 1;
            if let Err(e) = self.builtin(name) {
                failed.push((format!("{name} (built in)"), e.to_string()));
            }
        }
        let rows = self.store.read_blocking(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM plugins WHERE enabled = 1 ORDER BY name, created_at"
            ))?;
            let rows = stmt
                .query_map([], stored)?
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        for row in rows {
            checked += 1;
            if let Err(e) = self.load_row(&row) {
                failed.push((format!("{} {}", row.name, row.version), e.to_string()));
            }
        }
        Ok((checked, failed))
    }

    /// Built-ins, then uploads visible in `context` (all of them for `None`).
    /// Blocking.
    pub fn list(&self, context: Option<&str>) -> Result<Vec<PluginRecord>> {
        let mut out = Vec::new();
        for (name, _) in builtin::all() {
            out.extend(self.builtin_record(name)?);
        }
        let ctx = context.map(str::to_owned);
        let rows = self.store.read_blocking(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM plugins
                 WHERE CAST(?1 AS TEXT) IS NULL OR context_id IS NULL OR context_id = ?1
                 ORDER BY name, created_at"
            ))?;
            let rows = stmt
                .query_map(params![ctx], stored)?
                .collect::<crate::db::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        out.extend(rows.into_iter().map(Stored::record));
        Ok(out)
    }

    /// One plugin by id. Blocking.
    pub fn get(&self, id: &str) -> Result<Option<PluginRecord>> {
        if let Some(name) = id.strip_prefix(BUILTIN_PREFIX) {
            return self.builtin_record(name);
        }
        Ok(get_stored(&self.store, id)?.map(Stored::record))
    }

    /// The loaded plugin behind an id. Blocking.
    pub(crate) fn plugin_by_id(&self, id: &str) -> Result<Arc<Plugin>> {
        if let Some(name) = id.strip_prefix(BUILTIN_PREFIX) {
            return self.builtin(name)?.ok_or(Error::NotFound("plugin"));
        }
        let row = get_stored(&self.store, id)?.ok_or(Error::NotFound("plugin"))?;
        self.load_row(&row)
    }

    /// Checks an upload (component, world, version, size, compilation,
    /// `info`), stores the file by sha256 and returns the record. The same
    /// file uploaded again to the same scope returns the existing record
    /// (enabled again). Blocking.
    pub fn upload(
        &self,
        bytes: &[u8],
        context_id: Option<String>,
        actor: &str,
    ) -> Result<(PluginRecord, bool)> {
        let plugin = self.load_bytes(bytes)?;
        let sha = plugin.sha256().to_owned();
        let path = self.dir.join(format!("{sha}.wasm"));
        self.keep_local(&path, bytes)?;
        // Every node scores with it: the store keeps the component too.
        let encoded = STANDARD.encode(bytes);
        let info = plugin.info().clone();
        let size = bytes.len() as u64;
        let actor = actor.to_owned();
        let id = new_id("plg");
        let (stored, created) = self.store_blocking_write(move |tx| {
            tx.execute(
                "INSERT INTO plugin_components (sha256, component, created_at)
                 VALUES (?1, ?2, ?3) ON CONFLICT (sha256) DO NOTHING",
                params![sha, encoded, now_ms()],
            )?;
            if let Some(ctx) = &context_id {
                crate::domain::ensure_context(tx, ctx, ctx)?;
            }
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM plugins WHERE sha256 = ?1 AND context_id IS NOT DISTINCT FROM ?2",
                    params![sha, context_id],
                    |r| r.get(0),
                )
                .optional()?;
            let now = now_ms();
            let (id, created) = match existing {
                Some(existing) => {
                    tx.execute(
                        "UPDATE plugins SET enabled = 1, updated_at = ?2 WHERE id = ?1",
                        params![existing, now],
                    )?;
                    (existing, false)
                }
                None => {
                    tx.execute(
                        "INSERT INTO plugins (id, name, version, description, sha256, size_bytes,
                             context_id, interface, config_schema, default_config, enabled,
                             uploaded_by, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 1, ?11, ?12, ?12)",
                        params![
                            id,
                            info.name,
                            info.version,
                            info.description,
                            sha,
                            size,
                            context_id,
                            info.interface,
                            info.config_schema.to_string(),
                            info.default_config.to_string(),
                            actor,
                            now
                        ],
                    )?;
                    (id, true)
                }
            };
            crate::domain::audit(
                tx,
                &actor,
                "plugin.upload",
                &id,
                serde_json::json!({"name": info.name, "version": info.version, "sha256": sha}),
            )?;
            let row = get_stored_tx(tx, &id)?.ok_or(Error::NotFound("plugin"))?;
            Ok((row, created))
        })?;
        Ok((stored.record(), created))
    }

    fn store_blocking_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::db::Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::runtime::Handle::current().block_on(self.store.write(f))
    }

    /// Checks that `name` is usable in `context_id` with `config`; returns
    /// the sha256 of the file it resolves to (what the assignment pins).
    /// Blocking.
    pub fn validate(
        &self,
        context_id: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<String> {
        let plugin = self.resolve(context_id, name)?;
        plugin.validate_config(config).map_err(Error::Plugin)?;
        Ok(plugin.sha256().to_owned())
    }
}

fn viva_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

const COLUMNS: &str = "id, name, version, description, sha256, size_bytes, context_id, interface,
    config_schema, default_config, enabled, uploaded_by, created_at";

/// A `plugins` row.
#[derive(Debug, Clone)]
struct Stored {
    id: String,
    name: String,
    version: String,
    description: String,
    sha256: String,
    size_bytes: u64,
    context_id: Option<String>,
    interface: String,
    config_schema: String,
    default_config: String,
    enabled: bool,
    uploaded_by: String,
    created_at: i64,
}

fn stored(r: &Row) -> crate::db::Result<Stored> {
    Ok(Stored {
        id: r.get(0)?,
        name: r.get(1)?,
        version: r.get(2)?,
        description: r.get(3)?,
        sha256: r.get(4)?,
        size_bytes: r.get(5)?,
        context_id: r.get(6)?,
        interface: r.get(7)?,
        config_schema: r.get(8)?,
        default_config: r.get(9)?,
        enabled: r.get(10)?,
        uploaded_by: r.get(11)?,
        created_at: r.get(12)?,
    })
}

impl Stored {
    fn record(self) -> PluginRecord {
        PluginRecord {
            id: self.id,
            name: self.name,
            version: self.version,
            description: self.description,
            sha256: self.sha256,
            size_bytes: self.size_bytes,
            context_id: self.context_id,
            builtin: false,
            enabled: self.enabled,
            interface: self.interface,
            config_schema: serde_json::from_str(&self.config_schema).unwrap_or_default(),
            default_config: serde_json::from_str(&self.default_config).unwrap_or_default(),
            uploaded_by: Some(self.uploaded_by),
            created_at: self.created_at,
        }
    }
}

fn get_stored_tx(c: &Connection, id: &str) -> Result<Option<Stored>> {
    Ok(c.query_row(
        &format!("SELECT {COLUMNS} FROM plugins WHERE id = ?1"),
        [id],
        stored,
    )
    .optional()?)
}

fn get_stored(store: &Store, id: &str) -> Result<Option<Stored>> {
    let id = id.to_owned();
    store.read_blocking(move |c| get_stored_tx(c, &id))
}

/// Scores evaluated submissions with the assignment's plugin.
pub struct PluginScorer {
    registry: Arc<PluginRegistry>,
}

impl PluginScorer {
    pub fn new(registry: Arc<PluginRegistry>) -> PluginScorer {
        PluginScorer { registry }
    }
}

impl Scorer for PluginScorer {
    fn score(&self, input: &ScoreInput) -> std::result::Result<ScoreOutcome, ScoreError> {
        let a = &input.assignment;
        let plugin = self
            .registry
            .resolve_pinned(&a.context_id, &a.plugin, &a.plugin_sha256)
            .map_err(|e| ScoreError::transient(e.to_string()))?;
        let request = ScoreRequest {
            rubric: a.rubric.clone(),
            submission: SubmissionFacts::from_transcript(
                &input.submission_id,
                input.duration_seconds,
                &input.transcript,
            ),
            evaluations: input.evaluations.clone(),
            config: a.plugin_config.clone(),
        };
        let scored = plugin.score(&request).map_err(|e| {
            if let Some(log) = e.call_log()
                && !log.is_empty()
            {
                tracing::warn!(submission = %input.submission_id, plugin = %a.plugin, log = %log.text(), "plugin call failed");
            }
            score_error(&a.plugin, &e)
        })?;
        let info = plugin.info();
        let r = &scored.report;
        let report = serde_json::json!({
            "plugin": {
                "name": info.name,
                "version": info.version,
                "sha256": plugin.sha256(),
                "interface": info.interface,
            },
            "criteria": r.criteria,
            "total": r.total,
            "max": r.max,
            "feedback": r.feedback,
            "needs_review": r.needs_review,
            "review_reasons": r.review_reasons,
            "usage": scored.usage,
            "log": scored.log,
        });
        Ok(ScoreOutcome {
            total: r.total,
            max: r.max,
            needs_review: r.needs_review,
            reasons: r.review_reasons.clone(),
            report,
            evaluator_flags: Vec::new(),
            calibration_hold: None,
        })
    }
}

/// The failure reason recorded for a submission whose scoring failed: plain
/// words without the plugin's log (the log goes to the daemon log, where the
/// admin sees it), and whether a retry could help.
pub fn score_error(plugin: &str, e: &viva_plugins::Error) -> ScoreError {
    use viva_plugins::{Error as E, Failure as F};
    match e {
        E::Call { failure, .. } => {
            let what = clip(&failure.to_string(), 240);
            let message = format!(
                "the rubric plugin {plugin} could not grade this submission ({what}); your instructor has been told and can grade it by hand"
            );
            match failure {
                // Wall-clock limits and instantiation can fail under load.
                F::Deadline { .. } | F::Instantiate { .. } => ScoreError::transient(message),
                _ => ScoreError::permanent(message),
            }
        }
        E::InvalidConfig { .. } | E::InputTooLarge { .. } => ScoreError::permanent(format!(
            "the rubric plugin {plugin} could not grade this submission ({e}); your instructor has been told and can grade it by hand"
        )),
        _ => ScoreError::transient(format!("the rubric plugin {plugin} is unavailable: {e}")),
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// Enables or disables an uploaded plugin (audited).
pub(crate) fn set_enabled(
    tx: &crate::db::Transaction<'_>,
    id: &str,
    enabled: bool,
    actor: &str,
) -> Result<()> {
    tx.execute(
        "UPDATE plugins SET enabled = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, enabled, now_ms()],
    )?;
    let action = if enabled {
        "plugin.enable"
    } else {
        "plugin.disable"
    };
    crate::domain::audit(tx, actor, action, id, serde_json::json!({}))
}

/// Runs blocking registry work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    registry: &Arc<PluginRegistry>,
    f: impl FnOnce(&PluginRegistry) -> Result<T> + Send + 'static,
) -> Result<T> {
    let registry = registry.clone();
    tokio::task::spawn_blocking(move || f(&registry))
        .await
        .map_err(|e| Error::Internal(format!("plugin task failed: {e}")))?
}

/// Validates an assignment's plugin choice and configuration before it is
/// saved (`POST`/`PUT /api/v1/assignments`); returns the sha256 of the
/// plugin file to pin.
pub(crate) async fn check_assignment(
    registry: &Arc<PluginRegistry>,
    context_id: &str,
    input: &AssignmentInput,
) -> Result<String> {
    let name = input
        .plugin
        .clone()
        .unwrap_or_else(|| DEFAULT_PLUGIN.to_owned());
    let config = input
        .plugin_config
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    let ctx = context_id.to_owned();
    blocking(registry, move |r| r.validate(&ctx, &name, &config)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use viva_plugins::Limits;

    /// Issue 16: the evaluator's own judgement that an answer speaks to the
    /// grader is a flag like any other, so it holds the grade from
    /// automatic release whatever the plugin reported.
    #[test]
    fn a_grader_addressed_judgement_blocks_auto_release_whatever_the_plugin_says() {
        use crate::domain::ReleasePolicy;
        use crate::scheduler::{hold_for_evaluator_flags, releases_at_once};
        let plugin_says_release = || ScoreOutcome {
            total: 12.0,
            max: 16.0,
            needs_review: false,
            reasons: Vec::new(),
            report: serde_json::json!({}),
            evaluator_flags: Vec::new(),
            calibration_hold: None,
        };
        let evaluation = |flags: Vec<String>| viva_models::Evaluation {
            role: "a".into(),
            model: "m".into(),
            ratings: Vec::new(),
            flags,
            prompt_tokens: 0,
            generated_tokens: 0,
            seconds: 0.0,
        };
        let clean = hold_for_evaluator_flags(plugin_says_release(), &[evaluation(vec![])]);
        assert!(releases_at_once(ReleasePolicy::Auto, &clean));
        let judged = hold_for_evaluator_flags(
            plugin_says_release(),
            &[
                evaluation(vec![]),
                evaluation(vec![viva_models::injection::addresses_grader_flag("m")]),
            ],
        );
        assert!(judged.needs_review);
        assert!(
            judged.reasons[0].contains("addresses_grader"),
            "{:?}",
            judged.reasons
        );
        for policy in [ReleasePolicy::Auto, ReleasePolicy::AutoUnlessFlagged] {
            assert!(!releases_at_once(policy, &judged), "{policy:?}");
        }
    }

    #[test]
    fn limits_follow_the_configuration() {
        let mut c = crate::config::PluginsConfig::default();
        assert_eq!(c.limits(), Limits::default());
        c.fuel = 0;
        c.deadline = Duration::from_millis(250);
        let l = c.limits();
        assert_eq!(l.fuel, None, "0 turns metering off");
        assert_eq!(l.deadline, Duration::from_millis(250));
    }

    #[test]
    fn the_plugins_section_is_configurable_by_file_and_environment() {
        let c = Config::load(
            None,
            vec![
                (
                    "VIVA_PLUGINS__INSTRUCTOR_UPLOAD".to_owned(),
                    "true".to_owned(),
                ),
                ("VIVA_PLUGINS__DEADLINE".to_owned(), "500ms".to_owned()),
            ],
            &[],
        )
        .expect("config");
        assert!(c.plugins.instructor_upload);
        assert_eq!(c.plugins.deadline, Duration::from_millis(500));
        let e = Config::load(
            None,
            vec![("VIVA_PLUGINS__FEUL".to_owned(), "1".to_owned())],
            &[],
        )
        .expect_err("typo");
        assert!(e.to_string().contains("feul"), "{e}");
    }
}
