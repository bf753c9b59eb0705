//! The Viva daemon: HTTP API, durable two-phase scheduler, media intake and
//! worker supervision. The `viva` binary (`main.rs`) only calls [`cli::main`].
//!
//! Start at [`run`]: it opens the [`store`], starts the [`scheduler`] (which
//! supervises model [`workers`] and scores with rubric [`plugins`]) and
//! serves the [`api`] until shutdown.

// Modules import one way, bottom to top: clock, slots, config, metrics, intake,
// workers, db, error, store, domain, grades, jobs, eta, auth, scheduler,
// plugins, lti, passback, retention, doctor, http, cli (scripts/check-layout
// enforces it; ARCHITECTURE.md says what each owns).
mod auth;
mod calibration;
pub mod cli;
mod clock;
pub mod config;
pub mod db;
mod doctor;
mod domain;
mod error;
mod eta;
mod grades;
mod http;
mod intake;
mod jobs;
mod lti;
mod metrics;
mod passback;
mod plugins;
mod retention;
mod scheduler;
mod secrets;
mod slots;
pub mod store;
mod swap;
pub mod workers;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio_util::sync::CancellationToken;

pub use auth::TICKETS_PER_USER;
pub use clock::now_ms;
pub use config::Config;
pub use domain::{Role, sandbox_assignment};
pub use error::{Error, Result};
pub use http::{AppState, router, widget};
pub use lti::user_id as lti_user_id;
pub use passback::{OutboxView, outbox_rows};
pub use scheduler::{SchedulerHandle, Scorer};

/// An exclusive lock on the data directory: one daemon per data directory.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        let path = data_dir.join("viva.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Unavailable(format!(
                "another viva daemon is using the data directory {} (pid {}); stop it or use another --data-dir",
                data_dir.display(),
                holder.trim()
            )));
        }
        let _ = file.set_len(0);
        let _ = std::fs::write(&path, std::process::id().to_string());
        Ok(DataDirLock { _file: file })
    }
}

/// Creates the data directory layout and opens the store (migrating it).
pub fn open_data_dir(config: &Config) -> Result<store::Store> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // Students' recordings, grades and keys: the owner only. The umask makes
    // every file Viva (and its ffmpeg and worker children) creates 0600 and
    // every directory 0700; the data directory's own mode is fixed too.
    private_umask();
    for dir in [
        config.data_dir.clone(),
        config.media_dir(),
        config.staging_dir(),
    ] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io(format!(
                "creating {} (set --data-dir or VIVA_DATA_DIR to a writable place)",
                dir.display()
            )))?;
    }
    let mode = std::fs::metadata(&config.data_dir)
        .map_err(Error::io("reading the data directory's permissions"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %config.data_dir.display(), "the data directory was open to other users; fixing its mode to 0700");
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io("securing the data directory"))?;
    }
    let store = store::Store::open_at(&config.store_location()?)?;
    Ok(store)
}

/// Sets the process umask to 077 (files 0600, directories 0700).
fn private_umask() {
    // SAFETY: umask only sets the process's file mode creation mask; it has
    // no memory effects and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Everything `serve` needs, built but not yet running. Tests use this to
/// run the daemon in-process.
pub struct Daemon {
    pub state: AppState,
    scheduler: scheduler::Scheduler,
    _lock: DataDirLock,
}

/// Who scores evaluated submissions.
pub enum Scoring {
    /// Nobody: submissions rest in `evaluated` (tests of the pipeline).
    Off,
    /// The assignment's rubric plugin ([`plugins::PluginScorer`]); uploads
    /// compile with this compiler.
    Plugins(viva_plugins::Compiler),
    /// A scorer given by the caller.
    Custom(Arc<dyn Scorer>),
}

impl Daemon {
    /// A daemon with `scorer` (or none: submissions rest in `evaluated`).
    /// Plugin management and validation work either way.
    pub async fn build(config: Config, scorer: Option<Arc<dyn Scorer>>) -> Result<Daemon> {
        let scoring = match scorer {
            Some(s) => Scoring::Custom(s),
            None => Scoring::Off,
        };
        Daemon::build_with(config, scoring).await
    }

    /// A daemon with the given scoring: `viva serve` uses
    /// [`Scoring::Plugins`], tests of the pipeline [`Scoring::Off`].
    pub async fn build_with(config: Config, scoring: Scoring) -> Result<Daemon> {
        // Directory creation, file locking, migrations and key I/O are blocking: keep them off
        // the async threads.
        let cfg = config.clone();
        let (lock, store) = tokio::task::spawn_blocking(move || {
            private_umask();
            std::fs::create_dir_all(&cfg.data_dir).map_err(Error::io(format!(
                "creating {} (set --data-dir or VIVA_DATA_DIR to a writable place)",
                cfg.data_dir.display()
            )))?;
            let lock = DataDirLock::acquire(&cfg.data_dir)?;
            let store = open_data_dir(&cfg)?;
            Ok::<_, Error>((lock, store))
        })
        .await
        .map_err(|e| Error::Internal(format!("start-up task failed: {e}")))??;
        let cleaned = intake::clear_staging(&config.staging_dir())
            .await
            .unwrap_or(0);
        if cleaned > 0 {
            tracing::info!(cleaned, "removed unfinished uploads left by a previous run");
        }
        // The node's name: leases and batches are held under it, so on a
        // shared store it stays the same across restarts.
        let instance = match (&config.node.id, store.engine()) {
            (Some(id), _) => id.clone(),
            (None, db::Engine::Postgres) => config::host_name(),
            (None, db::Engine::Sqlite) => domain::new_id("daemon"),
        };
        // A daemon killed a moment ago holds the lock until PostgreSQL sees
        // its connection close: wait a little before refusing.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while let Err(e) = store.claim_node(&instance).await {
            if std::time::Instant::now() > deadline {
                return Err(e);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        if config.sandbox.enabled {
            store.write(domain::ensure_sandbox).await?;
        }
        match intake::check_tools(&intake::IntakeLimits::from(&config.intake)).await {
            Ok(v) => tracing::info!(ffmpeg = %v, "media tools found"),
            Err(e) => tracing::error!(error = %e, "uploads will fail until this is fixed"),
        }
        let key = auth::session_key(&config, &store).await?;
        let sessions = auth::Sessions::new(&key, config.sessions.ttl, config.sessions.ticket_ttl);
        let metrics = metrics::Metrics::new()
            .map_err(|e| Error::Internal(format!("metrics registry: {e}")))?;
        let compiler = match &scoring {
            Scoring::Plugins(c) => c.clone(),
            _ => viva_plugins::Compiler::InProcess,
        };
        let lti = lti::Lti::open(&config, &store).await?;
        let plugins = Arc::new(plugins::PluginRegistry::new(
            &config,
            store.clone(),
            compiler,
        )?);
        match plugins.share_local_components().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "put this node's uploaded plugins into the store"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot put this node's uploaded plugins into the store")
            }
        }
        let scorer: Option<Arc<dyn Scorer>> = match scoring {
            Scoring::Off => None,
            Scoring::Plugins(_) => {
                // Compile (or load from the cache) the built-in plugins now,
                // off the async threads, so the first score does not wait.
                let registry = plugins.clone();
                tokio::task::spawn_blocking(move || registry.warm_up());
                Some(Arc::new(plugins::PluginScorer::new(plugins.clone())))
            }
            Scoring::Custom(s) => Some(s),
        };
        let (scheduler, handle) = scheduler::Scheduler::new(
            &config,
            store.clone(),
            instance.clone(),
            metrics.clone(),
            scorer,
        );
        tracing::info!(%instance, role = config.node.role.as_str(), policy = ?config.effective_policy(), "daemon built");
        let limits = Arc::new(http::RateLimits::new(&config.limits));
        Ok(Daemon {
            state: AppState {
                config: Arc::new(config),
                store,
                sessions,
                scheduler: handle,
                metrics,
                plugins,
                lti,
                shutting_down: Arc::new(AtomicBool::new(false)),
                intake: Default::default(),
                limits,
            },
            scheduler,
            _lock: lock,
        })
    }

    /// Serves on `listener` until `shutdown` is cancelled, then stops intake,
    /// the scheduler and its workers, returning running jobs to the queue.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let Daemon {
            state,
            scheduler,
            _lock,
        } = self;
        let sched_stop = CancellationToken::new();
        let sched = tokio::spawn(scheduler.run(sched_stop.clone()));
        // Passback and retention run on api nodes, one node at a time.
        let api_jobs = state.config.node.role.runs_api();
        let sweeper =
            api_jobs.then(|| tokio::spawn(retention_sweeper(state.clone(), shutdown.clone())));
        let passback = api_jobs.then(|| {
            tokio::spawn(passback::run(
                passback::Passback {
                    store: state.store.clone(),
                    lti: state.lti.clone(),
                    node: state.scheduler.node().to_owned(),
                },
                shutdown.clone(),
            ))
        });
        let app = router(state.clone());
        let flag = state.shutting_down.clone();
        let sd = shutdown.clone();
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "listening");
        // Header-read and idle timeouts; the peer address feeds the
        // per-client rate limits.
        http::serve(listener, app, &state.config.limits, async move {
            sd.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("shutting down: no new uploads; finishing requests");
        })
        .await;
        sched_stop.cancel();
        match sched.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "scheduler stopped with an error"),
            Err(e) => tracing::error!(error = %e, "scheduler task panicked"),
        }
        for task in [sweeper, passback].into_iter().flatten() {
            task.abort();
        }
        Ok(())
    }
}

async fn retention_sweeper(state: AppState, shutdown: CancellationToken) {
    let every = state
        .config
        .retention
        .sweep_interval
        .max(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let node = state.scheduler.node().to_owned();
        let ttl = every.as_millis() as i64 * 2;
        match state
            .store
            .write(move |tx| jobs::claim_singleton(tx, "retention", &node, ttl))
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep: cannot reach the store");
                continue;
            }
        }
        if let Err(e) =
            retention::purge_expired(&state.store, state.config.retention.retention_days).await
        {
            tracing::warn!(error = %e, "retention sweep failed");
        }
    }
}

/// Runs the daemon until SIGTERM or Ctrl-C.
pub async fn run(mut config: Config) -> Result<()> {
    let listen = config.listen;
    // Bind before building, so `--listen 127.0.0.1:0` can hand out the real
    // port: links (public_url's default) and the announcement use it.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(Error::io(format!(
            "listening on {listen} (is another program using it? set --listen or VIVA_LISTEN)"
        )))?;
    if let Ok(bound) = listener.local_addr() {
        config.listen = bound;
    }
    // Uploaded plugins compile in a child `viva plugin compile-child` with
    // its own time and memory limits.
    let compiler = match std::env::current_exe() {
        Ok(program) => viva_plugins::Compiler::Subprocess {
            program,
            args: vec!["plugin".into(), "compile-child".into()],
        },
        Err(_) => viva_plugins::Compiler::InProcess,
    };
    let daemon = Daemon::build_with(config, Scoring::Plugins(compiler)).await?;
    announce_listening(&listener);
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    daemon.serve(listener, shutdown).await
}

/// Prints the bound address as one line on stdout (logs go to stderr), so a
/// supervisor or test that asked for port 0 learns the real port without
/// racing for a free one: `viva listening on http://127.0.0.1:PORT`.
fn announce_listening(listener: &tokio::net::TcpListener) {
    use std::io::Write;
    if let Ok(addr) = listener.local_addr() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "viva listening on http://{addr}");
        let _ = out.flush();
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
