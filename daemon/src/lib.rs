//! The Viva daemon: HTTP API, durable two-phase scheduler, media intake and
//! worker supervision. The `viva` binary (`main.rs`) only calls [`cli::main`].
//!
//! Start at [`run`]: it opens the [`store`], starts the [`scheduler`] (which
//! supervises model [`workers`]) and serves the [`api`] until shutdown.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod intake;
pub mod jobs;
pub mod metrics;
pub mod retention;
pub mod scheduler;
pub mod status;
pub mod store;
pub mod workers;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio_util::sync::CancellationToken;

pub use api::{AppState, router};
pub use config::Config;
pub use error::{Error, Result};
pub use scheduler::{SchedulerHandle, Scorer};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An exclusive lock on the data directory: one daemon per database.
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
    for dir in [
        config.data_dir.clone(),
        config.media_dir(),
        config.staging_dir(),
    ] {
        std::fs::create_dir_all(&dir).map_err(Error::io(format!(
            "creating {} (set --data-dir or VIVA_DATA_DIR to a writable place)",
            dir.display()
        )))?;
    }
    let store = store::Store::open(&config.db_path())?;
    Ok(store)
}

/// Everything `serve` needs, built but not yet running. Tests use this to
/// run the daemon in-process.
pub struct Daemon {
    pub state: AppState,
    scheduler: scheduler::Scheduler,
    _lock: DataDirLock,
}

impl Daemon {
    pub async fn build(config: Config, scorer: Option<Arc<dyn Scorer>>) -> Result<Daemon> {
        std::fs::create_dir_all(&config.data_dir).map_err(Error::io(format!(
            "creating {} (set --data-dir or VIVA_DATA_DIR to a writable place)",
            config.data_dir.display()
        )))?;
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let store = open_data_dir(&config)?;
        let cleaned = intake::clear_staging(&config.staging_dir())
            .await
            .unwrap_or(0);
        if cleaned > 0 {
            tracing::info!(cleaned, "removed unfinished uploads left by a previous run");
        }
        if config.sandbox.enabled {
            store.write(domain::ensure_sandbox).await?;
        }
        match intake::check_tools(&config.intake.limits()).await {
            Ok(v) => tracing::info!(ffmpeg = %v, "media tools found"),
            Err(e) => tracing::error!(error = %e, "uploads will fail until this is fixed"),
        }
        let key = auth::load_or_create_key(&config.data_dir)?;
        let sessions = auth::Sessions::new(&key, config.sessions.ttl, config.sessions.ticket_ttl);
        let metrics = metrics::Metrics::new()
            .map_err(|e| Error::Internal(format!("metrics registry: {e}")))?;
        let instance = domain::new_id("daemon");
        let (scheduler, handle) = scheduler::Scheduler::new(
            &config,
            store.clone(),
            instance.clone(),
            metrics.clone(),
            scorer,
        );
        tracing::info!(%instance, policy = ?config.effective_policy(), "daemon built");
        Ok(Daemon {
            state: AppState {
                config: Arc::new(config),
                store,
                sessions,
                scheduler: handle,
                metrics,
                shutting_down: Arc::new(AtomicBool::new(false)),
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
        let sweeper = tokio::spawn(retention_sweeper(state.clone(), shutdown.clone()));
        let app = router(state.clone());
        let flag = state.shutting_down.clone();
        let sd = shutdown.clone();
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "listening");
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            sd.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("shutting down: no new uploads; finishing requests");
        });
        let served = server.await;
        sched_stop.cancel();
        match sched.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "scheduler stopped with an error"),
            Err(e) => tracing::error!(error = %e, "scheduler task panicked"),
        }
        sweeper.abort();
        served.map_err(Error::io("serving HTTP"))
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
        if let Err(e) =
            retention::purge_expired(&state.store, state.config.retention.retention_days).await
        {
            tracing::warn!(error = %e, "retention sweep failed");
        }
    }
}

/// Runs the daemon until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<()> {
    let listen = config.listen;
    let daemon = Daemon::build(config, None).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(Error::io(format!(
            "listening on {listen} (is another program using it? set --listen or VIVA_LISTEN)"
        )))?;
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    daemon.serve(listener, shutdown).await
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
