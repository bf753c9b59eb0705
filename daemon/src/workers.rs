//! Worker supervision: spawning model worker processes, the protocol
//! handshake, job calls and orderly (or forced) shutdown.
//!
//! Every worker is a separate executable speaking the protocol of
//! [`viva_models::protocol`] over its stdin/stdout; its stderr is its log and
//! is forwarded to `tracing` (target `viva::worker`) one line at a time.
//!
//! Per process the supervisor runs four small tasks:
//!
//! - a *writer* that owns the worker's stdin and writes queued frames in
//!   order (writes are serialised and a cancelled call never leaves half a
//!   frame behind);
//! - a *reader* that parses stdout frames and routes `Result`, `Error` and
//!   `Progress` frames to the pending call with that job id (anything else
//!   goes to [`Supervisor::start`] while it is starting, or to the log);
//! - a *stderr forwarder*;
//! - a *waiter* that owns the [`tokio::process::Child`], kills it on request
//!   and, once it is reaped, removes it from the table, fails the calls still
//!   pending and reports the exit on the supervisor's `exits` channel.
//!
//! Workers are spawned from one long-lived thread of their own, because
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not
//! the process: a worker forked from a Tokio blocking-pool thread would be
//! killed when that thread idles out. Each worker also gets its own process
//! group, so a Ctrl-C in the daemon's terminal reaches only the daemon, which
//! then stops its workers gracefully; a forced kill signals the whole group.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};
use viva_models::protocol::{
    self, DaemonMessage, MAX_FRAME_BYTES, ModelSpec, PROTOCOL_VERSION, WorkerMessage,
};
use viva_models::{JobPayload, JobResult, WorkerKind};

/// How many process events [`Supervisor::history`] keeps.
pub const HISTORY_LIMIT: usize = 10_000;
/// Longest worker stderr line logged; the rest of a longer line is dropped.
pub const STDERR_LINE_MAX: usize = 4096;
/// Stderr lines remembered per worker, quoted in start-up errors.
const STDERR_TAIL_LINES: usize = 8;
/// Longest stderr line quoted in an error message.
const STDERR_TAIL_LINE_MAX: usize = 300;
/// After a worker is reaped, how long to wait for the frames it wrote just
/// before exiting (stdout can stay open when a grandchild inherited it).
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// How to run one worker process.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Unique name of the worker's place in the pool: "stt" or "evaluator:a".
    pub slot: String,
    pub kind: WorkerKind,
    /// Evaluator role ("a", "b").
    pub role: Option<String>,
    pub command: PathBuf,
    pub args: Vec<String>,
    /// Added to (not replacing) the daemon's environment.
    pub env: Vec<(String, String)>,
    pub model: ModelSpec,
    /// Configured memory footprint, for reporting.
    pub memory_mb: u64,
}

impl WorkerSpec {
    /// The spec of a configured worker: the scheduler's slots and `viva
    /// doctor` start workers the same way. An evaluator gets `--role ROLE`
    /// unless its args already name one.
    pub fn from_config(
        slot: &str,
        kind: WorkerKind,
        role: Option<&str>,
        config: &crate::config::WorkerConfig,
    ) -> WorkerSpec {
        let mut args = config.args.clone();
        if let Some(role) = role
            && !args.iter().any(|a| a == "--role")
        {
            args.push("--role".into());
            args.push(role.to_owned());
        }
        WorkerSpec {
            slot: slot.to_owned(),
            kind,
            role: role.map(str::to_owned),
            command: config.command.clone(),
            args,
            env: config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            model: ModelSpec {
                name: config.model.clone(),
                path: config.model_path.display().to_string(),
                options: serde_json::to_value(&config.options).unwrap_or_default(),
            },
            memory_mb: config.memory_mb,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerTimeouts {
    /// From spawn until the worker's `Hello`.
    pub handshake: Duration,
    /// From `Load` until `Loaded`.
    pub load: Duration,
    /// From `Shutdown` until the process is killed.
    pub stop_grace: Duration,
}

impl Default for WorkerTimeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            load: Duration::from_secs(300),
            stop_grace: Duration::from_secs(5),
        }
    }
}

impl From<&crate::config::WorkersConfig> for WorkerTimeouts {
    fn from(c: &crate::config::WorkersConfig) -> Self {
        WorkerTimeouts {
            handshake: c.handshake_timeout,
            load: c.load_timeout,
            stop_grace: c.stop_grace,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "could not start worker `{command}`: {source} (check the configured worker command path)"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("worker handshake failed: {0}")]
    Handshake(String),
    #[error("worker could not load its model: {0}")]
    Load(String),
    #[error("worker {slot} (pid {pid}) died while the call was pending: {status}")]
    Crashed {
        slot: String,
        pid: u32,
        status: String,
    },
    #[error("worker reported a job error ({code}): {message}")]
    Job {
        code: String,
        message: String,
        retryable: bool,
    },
    #[error("worker protocol error: {0}")]
    Protocol(String),
    #[error("the worker is stopping or stopped")]
    Stopped,
}

impl WorkerError {
    /// Whether the same job may succeed on another try (after a restart for
    /// [`WorkerError::Crashed`] and [`WorkerError::Stopped`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Crashed { .. } | WorkerError::Stopped => true,
            WorkerError::Job { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// A worker process ended; sent on the supervisor's `exits` channel for every
/// worker that [`Supervisor::start`] handed out (not for failed starts, whose
/// error is the report). Sent after the worker left the table.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    pub slot: String,
    pub pid: u32,
    /// "exit status: 0", "signal: 9 (SIGKILL)", …
    pub status: String,
    /// True when [`WorkerHandle::stop`] (or [`Supervisor::stop_all`]) asked for it.
    pub expected: bool,
}

/// One live process, as [`Supervisor::table`] reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    pub slot: String,
    pub kind: WorkerKind,
    pub role: Option<String>,
    pub pid: u32,
    /// "starting" | "ready" | "busy" | "stopping"
    pub state: &'static str,
    pub started_at_unix_ms: u64,
    pub uptime_seconds: f64,
    /// VmHWM of /proc/<pid>/status.
    pub peak_rss_bytes: Option<u64>,
    /// VmRSS of /proc/<pid>/status.
    pub rss_bytes: Option<u64>,
    /// Jobs answered (with a result or an error).
    pub jobs_done: u64,
    pub in_flight: u32,
    /// Model name from the spec.
    pub model: String,
    pub load_ms: Option<u64>,
    /// From the worker's Hello (1 until then).
    pub max_parallel_jobs: u32,
    /// Configured footprint from the spec.
    pub memory_mb: u64,
    /// Model memory reported by the worker in `Loaded`, when it knows.
    pub model_memory_bytes: Option<u64>,
    /// The GPU memory the worker last reported holding (measured by NVML
    /// after its load and after each call; only a worker on a GPU reports).
    pub device_memory: Option<viva_models::device::DeviceMemory>,
    /// The worker's model is on an inference server it calls over HTTP
    /// (its Hello said `remote`): the scheduler keeps it in every phase.
    pub remote: bool,
    /// A remote worker's server: health and latency, as last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_health: Option<viva_models::protocol::RemoteHealth>,
}

/// Something that happened to a worker process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessEvent {
    pub at_unix_ms: u64,
    /// Increases by one per event, across all workers.
    pub seq: u64,
    pub slot: String,
    pub kind: WorkerKind,
    pub pid: u32,
    /// "spawned" | "ready" | "exited"
    pub event: &'static str,
    pub detail: String,
}

/// Owns the process table. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<SupervisorInner>,
}

/// Lock order: a worker's `state`, then the supervisor's `table` (never the
/// other way round).
struct SupervisorInner {
    daemon_version: String,
    timeouts: WorkerTimeouts,
    exits: mpsc::UnboundedSender<WorkerExit>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// In spawn order.
    workers: Vec<Arc<Worker>>,
    history: VecDeque<ProcessEvent>,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Stopping,
    Exited,
}

struct Pending {
    tx: oneshot::Sender<Result<JobResult, WorkerError>>,
    progress: Option<mpsc::UnboundedSender<(u64, u64)>>,
}

struct WorkerState {
    phase: Phase,
    stop_requested: bool,
    /// `start` returned a handle: its exit is reported on `exits`.
    handed_out: bool,
    pending: HashMap<String, Pending>,
    jobs_done: u64,
    load_ms: Option<u64>,
    model_memory_bytes: Option<u64>,
    device_memory: Option<viva_models::device::DeviceMemory>,
    remote_health: Option<viva_models::protocol::RemoteHealth>,
    exit_status: Option<String>,
}

/// One process, shared by its handles, the table and its tasks.
struct Worker {
    slot: String,
    kind: WorkerKind,
    role: Option<String>,
    pid: u32,
    model: String,
    memory_mb: u64,
    started_at_unix_ms: u64,
    started: Instant,
    stop_grace: Duration,
    max_parallel_jobs: AtomicU32,
    /// Set from the worker's Hello.
    remote: AtomicBool,
    next_job: AtomicU64,
    state: Mutex<WorkerState>,
    /// Frames for the writer task; `None` once stdin is (being) closed.
    frames: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    kill: mpsc::UnboundedSender<()>,
    /// `Some(status)` once the process is reaped.
    exit: watch::Receiver<Option<String>>,
    stderr_closed: watch::Receiver<bool>,
    stderr_tail: Mutex<VecDeque<String>>,
}

/// A started worker. Clone = another reference to the same process.
#[derive(Clone)]
pub struct WorkerHandle {
    worker: Arc<Worker>,
}

/// What the reader task passes to `start` (and logs once `start` is done).
enum Control {
    Frame(WorkerMessage),
    Malformed(String),
    Eof,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn describe_status(status: ExitStatus) -> String {
    status.to_string()
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("timeouts", &self.inner.timeouts)
            .field("workers", &lock(&self.inner.table).workers.len())
            .finish()
    }
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("slot", &self.worker.slot)
            .field("pid", &self.worker.pid)
            .field("kind", &self.worker.kind)
            .finish()
    }
}

impl SupervisorInner {
    fn record(&self, table: &mut Table, w: &Worker, event: &'static str, detail: String) {
        table.seq += 1;
        table.history.push_back(ProcessEvent {
            at_unix_ms: now_unix_ms(),
            seq: table.seq,
            slot: w.slot.clone(),
            kind: w.kind,
            pid: w.pid,
            event,
            detail,
        });
        while table.history.len() > HISTORY_LIMIT {
            table.history.pop_front();
        }
    }
}

impl Supervisor {
    pub fn new(
        daemon_version: &str,
        timeouts: WorkerTimeouts,
        exits: mpsc::UnboundedSender<WorkerExit>,
    ) -> Self {
        Self {
            inner: Arc::new(SupervisorInner {
                daemon_version: daemon_version.to_string(),
                timeouts,
                exits,
                table: Mutex::new(Table::default()),
            }),
        }
    }

    pub fn timeouts(&self) -> WorkerTimeouts {
        self.inner.timeouts
    }

    /// Spawns the worker, does the handshake and loads its model. On any
    /// failure the process is killed and reaped before the error returns.
    /// Dropping the returned future before it completes kills the process too.
    pub async fn start(&self, spec: WorkerSpec) -> Result<WorkerHandle, WorkerError> {
        let mut child = spawn_worker(&spec).await?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            // Cannot happen with piped stdio; kill_on_drop takes the child down.
            return Err(WorkerError::Protocol(
                "the worker's stdio pipes are missing".into(),
            ));
        };

        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let (kill_tx, kill_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (stderr_tx, stderr_rx) = watch::channel(false);
        let (control_tx, mut control_rx) = mpsc::unbounded_channel();
        let (eof_tx, eof_rx) = oneshot::channel();

        let worker = Arc::new(Worker {
            slot: spec.slot.clone(),
            kind: spec.kind,
            role: spec.role.clone(),
            pid,
            model: spec.model.name.clone(),
            memory_mb: spec.memory_mb,
            started_at_unix_ms: now_unix_ms(),
            started: Instant::now(),
            stop_grace: self.inner.timeouts.stop_grace,
            max_parallel_jobs: AtomicU32::new(1),
            remote: AtomicBool::new(false),
            next_job: AtomicU64::new(0),
            state: Mutex::new(WorkerState {
                phase: Phase::Starting,
                stop_requested: false,
                handed_out: false,
                pending: HashMap::new(),
                jobs_done: 0,
                load_ms: None,
                model_memory_bytes: None,
                device_memory: None,
                remote_health: None,
                exit_status: None,
            }),
            frames: Mutex::new(Some(frames_tx)),
            kill: kill_tx,
            exit: exit_rx,
            stderr_closed: stderr_rx,
            stderr_tail: Mutex::new(VecDeque::new()),
        });

        {
            let mut table = lock(&self.inner.table);
            let mut cmdline = spec.command.display().to_string();
            for arg in &spec.args {
                cmdline.push(' ');
                cmdline.push_str(arg);
            }
            self.inner.record(&mut table, &worker, "spawned", cmdline);
            table.workers.push(worker.clone());
        }
        tracing::info!(slot = %worker.slot, pid, command = %spec.command.display(), "worker spawned");

        tokio::spawn(write_frames(worker.clone(), stdin, frames_rx));
        tokio::spawn(forward_stderr(worker.clone(), stderr, stderr_tx));
        tokio::spawn(read_frames(worker.clone(), stdout, control_tx, eof_tx));
        tokio::spawn(wait_child(
            self.inner.clone(),
            worker.clone(),
            child,
            kill_rx,
            exit_tx,
            eof_rx,
        ));

        let guard = KillOnDrop(Some(worker.clone()));
        let handle = WorkerHandle {
            worker: worker.clone(),
        };
        let result = match self
            .handshake_and_load(&worker, &spec, &mut control_rx)
            .await
        {
            Ok((load_ms, memory_bytes)) => {
                let mut st = lock(&worker.state);
                match st.phase {
                    Phase::Starting => {
                        st.phase = Phase::Ready;
                        st.handed_out = true;
                        st.load_ms = Some(load_ms);
                        st.model_memory_bytes = memory_bytes;
                        // Recorded under the state lock so that "ready"
                        // always precedes this worker's "exited".
                        let mut table = lock(&self.inner.table);
                        self.inner.record(
                            &mut table,
                            &worker,
                            "ready",
                            format!("model {} loaded in {load_ms} ms", worker.model),
                        );
                        Ok(load_ms)
                    }
                    Phase::Exited if !st.stop_requested => Err(StartFailure::Exited {
                        handshake: false,
                        what: "the worker exited right after loading its model",
                    }),
                    _ => Err(StartFailure::Error(WorkerError::Stopped)),
                }
            }
            Err(e) => Err(e),
        };
        // Hand the reader's control frames to the log from now on.
        drop(control_rx);

        match result {
            Ok(load_ms) => {
                let mut guard = guard;
                guard.0 = None;
                tracing::info!(slot = %worker.slot, pid, model = %worker.model, load_ms, "worker ready");
                Ok(handle)
            }
            Err(failure) => {
                worker.request_kill();
                let status = worker.wait_exit().await;
                // Let the forwarder log (and remember) the last stderr lines.
                let mut closed = worker.stderr_closed.clone();
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), closed.wait_for(|c| *c)).await;
                drop(guard);
                let stopped = lock(&worker.state).stop_requested;
                let err = if stopped {
                    WorkerError::Stopped
                } else {
                    failure.into_error(&status, &worker.stderr_tail())
                };
                tracing::warn!(slot = %worker.slot, pid, %status, "worker failed to start: {err}");
                Err(err)
            }
        }
    }

    async fn handshake_and_load(
        &self,
        worker: &Worker,
        spec: &WorkerSpec,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<(u64, Option<u64>), StartFailure> {
        let timeouts = self.inner.timeouts;
        let first = match tokio::time::timeout(timeouts.handshake, control.recv()).await {
            Err(_) => {
                return Err(StartFailure::Error(WorkerError::Handshake(format!(
                    "the worker did not say hello within {:?}",
                    timeouts.handshake
                ))));
            }
            Ok(None | Some(Control::Eof)) => {
                return Err(StartFailure::Exited {
                    handshake: true,
                    what: "the worker exited before saying hello",
                });
            }
            Ok(Some(Control::Malformed(m))) => {
                return Err(StartFailure::Error(WorkerError::Protocol(format!(
                    "malformed first frame: {m}"
                ))));
            }
            Ok(Some(Control::Frame(msg))) => msg,
        };
        let WorkerMessage::Hello {
            protocol: their_version,
            kind,
            worker: program,
            pid: their_pid,
            max_parallel_jobs,
            remote,
        } = first
        else {
            return Err(StartFailure::Error(WorkerError::Handshake(format!(
                "expected hello as the worker's first message, got {}",
                message_type(&first)
            ))));
        };
        if their_version != PROTOCOL_VERSION {
            return Err(StartFailure::Error(WorkerError::Handshake(format!(
                "protocol version mismatch: worker `{program}` speaks version {their_version}, \
                 this daemon speaks version {PROTOCOL_VERSION}"
            ))));
        }
        if kind != spec.kind {
            return Err(StartFailure::Error(WorkerError::Handshake(format!(
                "worker `{program}` is a {} worker but slot {} needs a {} worker",
                kind.as_str(),
                spec.slot,
                spec.kind.as_str()
            ))));
        }
        if their_pid != worker.pid {
            tracing::debug!(slot = %worker.slot, pid = worker.pid, their_pid, "worker reports another pid (wrapper process?)");
        }
        worker
            .max_parallel_jobs
            .store(max_parallel_jobs.max(1), Ordering::Relaxed);
        worker.remote.store(remote, Ordering::Relaxed);
        tracing::debug!(slot = %worker.slot, pid = worker.pid, %program, max_parallel_jobs, remote, "worker said hello");

        let hello = DaemonMessage::Hello {
            protocol: PROTOCOL_VERSION,
            daemon_version: self.inner.daemon_version.clone(),
        };
        let load = DaemonMessage::Load {
            model: spec.model.clone(),
        };
        for msg in [hello, load] {
            let frame = protocol::encode(&msg)
                .map_err(|e| StartFailure::Error(WorkerError::Protocol(e.to_string())))?;
            if !worker.send_frame(frame) {
                return Err(StartFailure::Error(WorkerError::Stopped));
            }
        }

        let deadline = tokio::time::Instant::now() + timeouts.load;
        loop {
            match tokio::time::timeout_at(deadline, control.recv()).await {
                Err(_) => {
                    return Err(StartFailure::Error(WorkerError::Load(format!(
                        "model {} did not load within {:?}",
                        spec.model.name, timeouts.load
                    ))));
                }
                Ok(None | Some(Control::Eof)) => {
                    return Err(StartFailure::Exited {
                        handshake: false,
                        what: "the worker exited while loading its model",
                    });
                }
                Ok(Some(Control::Malformed(m))) => {
                    return Err(StartFailure::Error(WorkerError::Protocol(format!(
                        "malformed frame while loading: {m}"
                    ))));
                }
                Ok(Some(Control::Frame(WorkerMessage::Loaded {
                    load_ms,
                    memory_bytes,
                    max_parallel_jobs,
                    ..
                }))) => {
                    if let Some(n) = max_parallel_jobs {
                        worker.max_parallel_jobs.store(n.max(1), Ordering::Relaxed);
                    }
                    return Ok((load_ms, memory_bytes));
                }
                Ok(Some(Control::Frame(WorkerMessage::Error { code, message, .. }))) => {
                    return Err(StartFailure::Error(WorkerError::Load(format!(
                        "model {}: {code}: {message}",
                        spec.model.name
                    ))));
                }
                Ok(Some(Control::Frame(other))) => {
                    tracing::warn!(slot = %worker.slot, pid = worker.pid, "ignoring {} while the model loads", message_type(&other));
                }
            }
        }
    }

    /// Live processes (starting, ready, busy or stopping), in spawn order.
    pub fn table(&self) -> Vec<ProcessInfo> {
        let workers = lock(&self.inner.table).workers.clone();
        workers.iter().map(|w| w.info()).collect()
    }

    /// Every spawn, ready and exit, oldest first (the last [`HISTORY_LIMIT`]).
    pub fn history(&self) -> Vec<ProcessEvent> {
        lock(&self.inner.table).history.iter().cloned().collect()
    }

    /// Processes of this kind in the table, starting and stopping ones included.
    pub fn alive(&self, kind: WorkerKind) -> usize {
        lock(&self.inner.table)
            .workers
            .iter()
            .filter(|w| w.kind == kind)
            .count()
    }

    /// Like [`Supervisor::alive`], without the remote workers (whose models
    /// hold no memory here): what a phase switch waits for.
    pub fn alive_local(&self, kind: WorkerKind) -> usize {
        lock(&self.inner.table)
            .workers
            .iter()
            .filter(|w| w.kind == kind && !w.remote.load(Ordering::Relaxed))
            .count()
    }

    /// Handles of the live processes in a slot (normally zero or one).
    pub fn handles(&self, slot: &str) -> Vec<WorkerHandle> {
        lock(&self.inner.table)
            .workers
            .iter()
            .filter(|w| w.slot == slot)
            .map(|w| WorkerHandle { worker: w.clone() })
            .collect()
    }

    /// Stops every worker in the table (starting ones included: their
    /// `start` fails with [`WorkerError::Stopped`]) and waits until all are
    /// reaped. Workers started after the call began are not affected.
    pub async fn stop_all(&self) {
        let workers = lock(&self.inner.table).workers.clone();
        let stops = workers.into_iter().map(|worker| async move {
            let handle = WorkerHandle { worker };
            handle.stop().await
        });
        futures::future::join_all(stops).await;
    }
}

/// Why `start` failed, before the exit status is known.
enum StartFailure {
    Error(WorkerError),
    /// The worker's stdout closed during start-up; the message is completed
    /// with the exit status and the last stderr lines.
    Exited {
        handshake: bool,
        what: &'static str,
    },
}

impl StartFailure {
    fn into_error(self, status: &str, stderr_tail: &[String]) -> WorkerError {
        let tail = if stderr_tail.is_empty() {
            String::new()
        } else {
            format!("; last stderr: {}", stderr_tail.join(" | "))
        };
        match self {
            StartFailure::Exited { handshake, what } => {
                let message = format!("{what} ({status}){tail}");
                if handshake {
                    WorkerError::Handshake(message)
                } else {
                    WorkerError::Load(message)
                }
            }
            StartFailure::Error(WorkerError::Handshake(m)) => {
                WorkerError::Handshake(format!("{m}{tail}"))
            }
            StartFailure::Error(WorkerError::Load(m)) => WorkerError::Load(format!("{m}{tail}")),
            StartFailure::Error(WorkerError::Protocol(m)) => {
                WorkerError::Protocol(format!("{m}{tail}"))
            }
            StartFailure::Error(e) => e,
        }
    }
}

/// Kills a worker whose `start` did not finish (error or cancelled future).
struct KillOnDrop(Option<Arc<Worker>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.request_kill();
        }
    }
}

impl Worker {
    fn phase_name(&self, st: &WorkerState) -> &'static str {
        match st.phase {
            Phase::Starting => "starting",
            Phase::Ready if st.pending.is_empty() => "ready",
            Phase::Ready => "busy",
            Phase::Stopping | Phase::Exited => "stopping",
        }
    }

    fn info(&self) -> ProcessInfo {
        let (
            state,
            jobs_done,
            in_flight,
            load_ms,
            model_memory_bytes,
            device_memory,
            remote_health,
        ) = {
            let st = lock(&self.state);
            (
                self.phase_name(&st),
                st.jobs_done,
                u32::try_from(st.pending.len()).unwrap_or(u32::MAX),
                st.load_ms,
                st.model_memory_bytes,
                st.device_memory.clone(),
                st.remote_health.clone(),
            )
        };
        let (peak_rss_bytes, rss_bytes) = proc_memory(self.pid);
        ProcessInfo {
            slot: self.slot.clone(),
            kind: self.kind,
            role: self.role.clone(),
            pid: self.pid,
            state,
            started_at_unix_ms: self.started_at_unix_ms,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            peak_rss_bytes,
            rss_bytes,
            jobs_done,
            in_flight,
            model: self.model.clone(),
            load_ms,
            max_parallel_jobs: self.max_parallel_jobs.load(Ordering::Relaxed),
            memory_mb: self.memory_mb,
            model_memory_bytes,
            device_memory,
            remote: self.remote.load(Ordering::Relaxed),
            remote_health,
        }
    }

    /// Queues a frame for the worker's stdin; false once stdin is closed.
    fn send_frame(&self, frame: Vec<u8>) -> bool {
        match &*lock(&self.frames) {
            Some(tx) => tx.send(frame).is_ok(),
            None => false,
        }
    }

    /// Closes stdin once the frames already queued are written.
    fn close_stdin(&self) {
        lock(&self.frames).take();
    }

    fn request_kill(&self) {
        let _ = self.kill.send(());
    }

    /// Waits until the process is reaped; returns its exit status.
    async fn wait_exit(&self) -> String {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(status) => status.clone().unwrap_or_default(),
            Err(_) => "unknown (the supervisor's runtime shut down)".to_string(),
        }
    }

    fn stderr_tail(&self) -> Vec<String> {
        lock(&self.stderr_tail).iter().cloned().collect()
    }

    /// Routes a job's answer to its pending call.
    fn finish(&self, job_id: &str, result: Result<JobResult, WorkerError>) {
        let pending = {
            let mut st = lock(&self.state);
            let p = st.pending.remove(job_id);
            if p.is_some() {
                st.jobs_done += 1;
            }
            p
        };
        match pending {
            Some(p) => {
                let _ = p.tx.send(result);
            }
            None => {
                tracing::warn!(slot = %self.slot, pid = self.pid, job_id, "worker answered a job that is not pending");
            }
        }
    }

    fn dispatch(&self, msg: WorkerMessage, control: &mpsc::UnboundedSender<Control>) {
        match msg {
            WorkerMessage::Result { job_id, result } => self.finish(&job_id, Ok(result)),
            WorkerMessage::Error {
                job_id: Some(job_id),
                code,
                message,
                retryable,
            } => self.finish(
                &job_id,
                Err(WorkerError::Job {
                    code,
                    message,
                    retryable,
                }),
            ),
            WorkerMessage::Memory { device } => {
                lock(&self.state).device_memory = Some(device);
            }
            WorkerMessage::Remote { health } => {
                lock(&self.state).remote_health = Some(health);
            }
            WorkerMessage::Progress {
                job_id,
                done,
                total,
                ..
            } => {
                let st = lock(&self.state);
                if let Some(Pending {
                    progress: Some(tx), ..
                }) = st.pending.get(&job_id)
                {
                    let _ = tx.send((done, total));
                }
            }
            other => {
                if let Err(mpsc::error::SendError(Control::Frame(msg))) =
                    control.send(Control::Frame(other))
                {
                    match msg {
                        WorkerMessage::Bye => {
                            tracing::debug!(slot = %self.slot, pid = self.pid, "worker said bye");
                        }
                        WorkerMessage::Error { code, message, .. } => {
                            tracing::warn!(slot = %self.slot, pid = self.pid, %code, "worker error outside a job: {message}");
                        }
                        other => {
                            tracing::warn!(slot = %self.slot, pid = self.pid, "unexpected {} from a running worker", message_type(&other));
                        }
                    }
                }
            }
        }
    }

    /// A frame that does not parse: fail its job when it names one.
    fn malformed(&self, frame: &[u8], error: &str, control: &mpsc::UnboundedSender<Control>) {
        let job_id = serde_json::from_slice::<serde_json::Value>(frame)
            .ok()
            .and_then(|v| v.get("job_id")?.as_str().map(str::to_string));
        if let Some(job_id) = job_id
            && lock(&self.state).pending.contains_key(&job_id)
        {
            self.finish(
                &job_id,
                Err(WorkerError::Protocol(format!(
                    "malformed answer to job {job_id}: {error}"
                ))),
            );
            return;
        }
        let shown = String::from_utf8_lossy(&frame[..frame.len().min(200)]).into_owned();
        let message = format!("{error} in {shown:?}");
        if control.send(Control::Malformed(message.clone())).is_err() {
            tracing::warn!(slot = %self.slot, pid = self.pid, "ignoring a malformed frame: {message}");
        }
    }
}

/// VmHWM and VmRSS of a process, in bytes.
fn proc_memory(pid: u32) -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (None, None);
    };
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
    };
    (field("VmHWM"), field("VmRSS"))
}

fn message_type(msg: &WorkerMessage) -> &'static str {
    match msg {
        WorkerMessage::Hello { .. } => "hello",
        WorkerMessage::Loaded { .. } => "loaded",
        WorkerMessage::Memory { .. } => "memory",
        WorkerMessage::Remote { .. } => "remote",
        WorkerMessage::Progress { .. } => "progress",
        WorkerMessage::Result { .. } => "result",
        WorkerMessage::Error { .. } => "error",
        WorkerMessage::Bye => "bye",
    }
}

impl WorkerHandle {
    pub fn pid(&self) -> u32 {
        self.worker.pid
    }

    pub fn slot(&self) -> &str {
        &self.worker.slot
    }

    pub fn kind(&self) -> WorkerKind {
        self.worker.kind
    }

    pub fn role(&self) -> Option<&str> {
        self.worker.role.as_deref()
    }

    pub fn model(&self) -> &str {
        &self.worker.model
    }

    /// From the worker's Hello, or its Loaded when that names it (at
    /// least 1).
    pub fn max_parallel_jobs(&self) -> u32 {
        self.worker.max_parallel_jobs.load(Ordering::Relaxed)
    }

    /// Whether the worker's model is on a remote server (its Hello said so).
    pub fn is_remote(&self) -> bool {
        self.worker.remote.load(Ordering::Relaxed)
    }

    /// As the worker reported it in `Loaded`.
    pub fn load_ms(&self) -> u64 {
        lock(&self.worker.state).load_ms.unwrap_or(0)
    }

    /// Calls in flight (sent and not yet answered).
    pub fn in_flight(&self) -> usize {
        lock(&self.worker.state).pending.len()
    }

    /// Runs one job. Several calls may be in flight at once; progress frames
    /// for this job go to `progress` as `(done, total)`.
    ///
    /// Dropping the future does not cancel the job on the worker: it stays
    /// in flight (and the worker "busy") until the worker answers.
    pub async fn call(
        &self,
        payload: JobPayload,
        progress: Option<mpsc::UnboundedSender<(u64, u64)>>,
    ) -> Result<JobResult, WorkerError> {
        let w = &self.worker;
        let wanted = match &payload {
            JobPayload::Transcribe(_) => WorkerKind::Stt,
            JobPayload::Evaluate(_) => WorkerKind::Evaluator,
        };
        if wanted != w.kind {
            return Err(WorkerError::Protocol(format!(
                "a {} job cannot run on the {} worker {}",
                wanted.as_str(),
                w.kind.as_str(),
                w.slot
            )));
        }
        let n = w.next_job.fetch_add(1, Ordering::Relaxed) + 1;
        let job_id = format!("{}-{}", w.pid, n);
        let frame = protocol::encode(&DaemonMessage::Job {
            job_id: job_id.clone(),
            payload,
        })
        .map_err(|e| WorkerError::Protocol(e.to_string()))?;

        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&w.state);
            match st.phase {
                Phase::Ready => {}
                Phase::Starting | Phase::Stopping => return Err(WorkerError::Stopped),
                Phase::Exited if st.stop_requested => return Err(WorkerError::Stopped),
                Phase::Exited => {
                    return Err(WorkerError::Crashed {
                        slot: w.slot.clone(),
                        pid: w.pid,
                        status: st.exit_status.clone().unwrap_or_default(),
                    });
                }
            }
            st.pending.insert(job_id.clone(), Pending { tx, progress });
        }
        if !w.send_frame(frame) {
            // stdin closed between the phase check and now: a stop began.
            lock(&w.state).pending.remove(&job_id);
            return Err(WorkerError::Stopped);
        }
        match rx.await {
            Ok(result) => result,
            // The waiter always answers pending calls; this is defensive.
            Err(_) => Err(WorkerError::Crashed {
                slot: w.slot.clone(),
                pid: w.pid,
                status: "unknown".into(),
            }),
        }
    }

    /// Graceful stop: new calls fail with [`WorkerError::Stopped`], the worker
    /// gets `Shutdown` and its stdin closes; after `stop_grace` its process
    /// group is killed. Returns once the process is reaped, with its exit
    /// status. Idempotent; calls still pending fail with `Stopped`.
    pub async fn stop(&self) -> String {
        let w = &self.worker;
        let first = {
            let mut st = lock(&w.state);
            if let Some(status) = &st.exit_status {
                return status.clone();
            }
            let first = !st.stop_requested;
            st.stop_requested = true;
            st.phase = Phase::Stopping;
            first
        };
        if first {
            tracing::info!(slot = %w.slot, pid = w.pid, "stopping worker");
            if let Ok(frame) = protocol::encode(&DaemonMessage::Shutdown) {
                w.send_frame(frame);
            }
            w.close_stdin();
            // In a task of its own so that a cancelled stop() still kills.
            let worker = w.clone();
            tokio::spawn(async move {
                let grace = worker.stop_grace;
                if tokio::time::timeout(grace, worker.wait_exit())
                    .await
                    .is_err()
                {
                    tracing::warn!(slot = %worker.slot, pid = worker.pid, "worker did not exit within {grace:?} of shutdown; killing it");
                    worker.request_kill();
                }
            });
        }
        w.wait_exit().await
    }

    /// Waits until the process is reaped (without asking it to stop).
    pub async fn wait(&self) -> String {
        self.worker.wait_exit().await
    }

    /// False once the process is reaped.
    pub fn is_alive(&self) -> bool {
        lock(&self.worker.state).exit_status.is_none()
    }
}

// ---------------------------------------------------------------------------
// Spawning

struct SpawnRequest {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<std::io::Result<Child>>,
}

/// The thread all workers are forked from. It never ends, so the workers'
/// parent-death signal fires only when the daemon process dies.
fn spawner() -> Option<&'static std::sync::mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Option<std::sync::mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
            let spawned = std::thread::Builder::new()
                .name("viva-worker-spawner".into())
                .spawn(move || {
                    while let Ok(mut req) = rx.recv() {
                        let _runtime = req.runtime.enter();
                        let result = req.command.spawn();
                        // If `start` was cancelled meanwhile the child is
                        // dropped here and killed (kill_on_drop).
                        let _ = req.reply.send(result);
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!("cannot start the worker spawner thread ({e}); workers will be forked from runtime threads");
                    None
                }
            }
        })
        .as_ref()
}

async fn spawn_worker(spec: &WorkerSpec) -> Result<Child, WorkerError> {
    let mut command = Command::new(&spec.command);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe prctl system call.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawn_error = |source| WorkerError::Spawn {
        command: spec.command.display().to_string(),
        source,
    };
    let Some(spawner) = spawner() else {
        return command.spawn().map_err(spawn_error);
    };
    let (reply, rx) = oneshot::channel();
    let request = SpawnRequest {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    if let Err(std::sync::mpsc::SendError(mut request)) = spawner.send(request) {
        return request.command.spawn().map_err(spawn_error);
    }
    match rx.await {
        Ok(result) => result.map_err(spawn_error),
        Err(_) => Err(spawn_error(std::io::Error::other(
            "the worker spawner thread is gone",
        ))),
    }
}

// ---------------------------------------------------------------------------
// Per-process tasks

async fn write_frames(
    worker: Arc<Worker>,
    mut stdin: ChildStdin,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(frame) = frames.recv().await {
        let written = match stdin.write_all(&frame).await {
            Ok(()) => stdin.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let phase = lock(&worker.state).phase;
            if !matches!(phase, Phase::Stopping | Phase::Exited) {
                // A worker that stopped reading its stdin cannot be used.
                tracing::warn!(slot = %worker.slot, pid = worker.pid, "cannot write to the worker ({e}); killing it");
                worker.request_kill();
            }
            break;
        }
    }
    // Dropping stdin closes the pipe: the worker sees end of input.
}

/// Reads one line of at most `max` bytes (the rest of a longer line is
/// consumed and dropped) into `out`, without its newline. `Ok(None)` at end
/// of stream; `Ok(Some(truncated))` otherwise.
async fn read_bounded_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    out.clear();
    let mut truncated = false;
    let mut any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(any.then_some(truncated));
        }
        any = true;
        let (chunk, used, complete) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        let room = max.saturating_sub(out.len());
        if chunk.len() > room {
            truncated = true;
        }
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if complete {
            return Ok(Some(truncated));
        }
    }
}

async fn forward_stderr(worker: Arc<Worker>, stderr: ChildStderr, closed: watch::Sender<bool>) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    let slot = worker.slot.as_str();
    let pid = worker.pid;
    loop {
        match read_bounded_line(&mut reader, &mut buf, STDERR_LINE_MAX).await {
            Ok(None) => break,
            Ok(Some(truncated)) => {
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches('\r');
                let mark = if truncated { " [line truncated]" } else { "" };
                tracing::info!(target: "viva::worker", slot, pid, "{line}{mark}");
                if !line.trim().is_empty() {
                    let mut tail = lock(&worker.stderr_tail);
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(truncate_chars(line, STDERR_TAIL_LINE_MAX));
                }
            }
            Err(e) => {
                tracing::warn!(slot, pid, "cannot read the worker's stderr: {e}");
                break;
            }
        }
    }
    closed.send_replace(true);
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

async fn read_frames(
    worker: Arc<Worker>,
    stdout: ChildStdout,
    control: mpsc::UnboundedSender<Control>,
    eof: oneshot::Sender<()>,
) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = MAX_FRAME_BYTES as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(slot = %worker.slot, pid = worker.pid, "cannot read the worker's stdout: {e}");
                break;
            }
        }
        if line.len() > MAX_FRAME_BYTES {
            // The stream is out of step; nothing after this can be trusted.
            tracing::error!(slot = %worker.slot, pid = worker.pid, "worker frame exceeds {MAX_FRAME_BYTES} bytes; killing the worker");
            let _ = control.send(Control::Malformed(format!(
                "frame exceeds {MAX_FRAME_BYTES} bytes"
            )));
            worker.request_kill();
            break;
        }
        let frame = line.trim_ascii();
        if frame.is_empty() {
            continue;
        }
        match protocol::decode::<WorkerMessage>(frame) {
            Ok(msg) => worker.dispatch(msg, &control),
            Err(e) => worker.malformed(frame, &e.to_string(), &control),
        }
    }
    let _ = control.send(Control::Eof);
    let _ = eof.send(());
}

async fn wait_child(
    sup: Arc<SupervisorInner>,
    worker: Arc<Worker>,
    mut child: Child,
    mut kill: mpsc::UnboundedReceiver<()>,
    exit: watch::Sender<Option<String>>,
    mut stdout_eof: oneshot::Receiver<()>,
) {
    let mut eof_seen = false;
    let mut linger_killed = false;
    let linger = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(linger);
    let status = loop {
        tokio::select! {
            res = child.wait() => {
                break match res {
                    Ok(status) => describe_status(status),
                    Err(e) => format!("unknown ({e})"),
                };
            }
            Some(()) = kill.recv() => kill_child(&mut child),
            _ = &mut stdout_eof, if !eof_seen => {
                // A worker that closed its stdout cannot answer any more:
                // give it the stop grace to exit on its own, then kill it.
                eof_seen = true;
                linger.as_mut().reset(tokio::time::Instant::now() + worker.stop_grace);
            }
            _ = &mut linger, if eof_seen && !linger_killed => {
                linger_killed = true;
                tracing::warn!(slot = %worker.slot, pid = worker.pid, "worker closed its stdout but did not exit; killing it");
                kill_child(&mut child);
            }
        }
    };
    if !eof_seen {
        // Deliver what the worker wrote just before it exited.
        let _ = tokio::time::timeout(OUTPUT_DRAIN, &mut stdout_eof).await;
    }

    let (pending, expected, handed_out) = {
        let mut st = lock(&worker.state);
        st.phase = Phase::Exited;
        st.exit_status = Some(status.clone());
        (
            std::mem::take(&mut st.pending),
            st.stop_requested,
            st.handed_out,
        )
    };
    worker.close_stdin();
    {
        let mut table = lock(&sup.table);
        table.workers.retain(|w| !Arc::ptr_eq(w, &worker));
        let detail = format!(
            "{status} ({})",
            if expected { "requested" } else { "unexpected" }
        );
        sup.record(&mut table, &worker, "exited", detail);
    }
    if expected || !handed_out {
        tracing::info!(slot = %worker.slot, pid = worker.pid, %status, "worker exited");
    } else {
        tracing::warn!(slot = %worker.slot, pid = worker.pid, %status, pending = pending.len(), "worker exited unexpectedly");
    }
    for (_, p) in pending {
        let err = if expected {
            WorkerError::Stopped
        } else {
            WorkerError::Crashed {
                slot: worker.slot.clone(),
                pid: worker.pid,
                status: status.clone(),
            }
        };
        let _ = p.tx.send(Err(err));
    }
    exit.send_replace(Some(status.clone()));
    if handed_out {
        let _ = sup.exits.send(WorkerExit {
            slot: worker.slot.clone(),
            pid: worker.pid,
            status,
            expected,
        });
    }
}

/// SIGKILL to the worker's process group (it leads one), then to the worker.
fn kill_child(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: plain kill(2). The child is not reaped yet (`id()` is
        // Some), so neither its pid nor its process group can be reused.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
}

#[cfg(test)]
mod tests {
    use super::*;
    use viva_models::{TranscribeRequest, Transcript};

    const HELLO_STT: &str = r#"printf '%s\n' '{"type":"hello","protocol":1,"kind":"stt","worker":"sh-worker 0","pid":1,"max_parallel_jobs":2}'"#;

    /// Handshake and load, then answer jobs by their WAV path: "fail" → job
    /// error, "crash" → exit 7, "garbage" → malformed result, "hold" → no
    /// answer, anything else → progress and a transcript of the path.
    const GOOD_WORKER: &str = r#"
read -r hello
read -r load
printf '%s\n' '{"type":"loaded","model":"m","load_ms":7,"memory_bytes":1234}'
while read -r line; do
  case "$line" in
    *'"type":"job"'*)
      id=$(printf '%s' "$line" | sed 's/.*"job_id":"\([^"]*\)".*/\1/')
      wav=$(printf '%s' "$line" | sed 's/.*"wav_path":"\([^"]*\)".*/\1/')
      case "$wav" in
        *fail*) printf '{"type":"error","job_id":"%s","code":"bad","message":"nope","retryable":true}\n' "$id" ;;
        *crash*) echo "dying on purpose" >&2; exit 7 ;;
        *garbage*) printf '{"type":"result","job_id":"%s","result":42}\n' "$id" ;;
        *hold*) ;;
        *)
          printf '{"type":"progress","job_id":"%s","done":1,"total":2}\n' "$id"
          printf '{"type":"result","job_id":"%s","result":{"kind":"transcript","text":"%s","audio_seconds":1.0,"processing_seconds":0.1}}\n' "$id" "$wav" ;;
      esac ;;
    *'"type":"shutdown"'*) printf '{"type":"bye"}\n'; exit 0 ;;
  esac
done
"#;

    fn spec(kind: WorkerKind, script: &str) -> WorkerSpec {
        WorkerSpec {
            slot: "test".into(),
            kind,
            role: None,
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            model: ModelSpec {
                name: "m".into(),
                path: "/dev/null".into(),
                options: serde_json::Value::Null,
            },
            memory_mb: 64,
        }
    }

    fn good_spec() -> WorkerSpec {
        spec(WorkerKind::Stt, &format!("{HELLO_STT}\n{GOOD_WORKER}"))
    }

    /// Generous timeouts (slow CI machines) except those a test shortens.
    fn supervisor_with(
        handshake_ms: u64,
        load_ms: u64,
        stop_grace_ms: u64,
    ) -> (Supervisor, mpsc::UnboundedReceiver<WorkerExit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let timeouts = WorkerTimeouts {
            handshake: Duration::from_millis(handshake_ms),
            load: Duration::from_millis(load_ms),
            stop_grace: Duration::from_millis(stop_grace_ms),
        };
        (Supervisor::new("test 0", timeouts, tx), rx)
    }

    fn supervisor() -> (Supervisor, mpsc::UnboundedReceiver<WorkerExit>) {
        supervisor_with(10_000, 10_000, 5_000)
    }

    fn transcribe(wav: &str) -> JobPayload {
        JobPayload::Transcribe(TranscribeRequest {
            wav_path: wav.into(),
            audio_seconds: 1.0,
            language: None,
            initial_prompt: None,
        })
    }

    fn gone(pid: u32) -> bool {
        let pid = i32::try_from(pid).expect("pid");
        // SAFETY: signal 0 only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }

    /// The pid of the last process spawned, from the history.
    fn last_spawned_pid(sup: &Supervisor) -> u32 {
        sup.history()
            .iter()
            .rev()
            .find(|e| e.event == "spawned")
            .map(|e| e.pid)
            .expect("a spawned event")
    }

    fn assert_reaped(sup: &Supervisor, pid: u32) {
        assert!(gone(pid), "pid {pid} still exists");
        assert_eq!(sup.alive(WorkerKind::Stt), 0);
        assert!(sup.table().is_empty());
        let events: Vec<_> = sup
            .history()
            .into_iter()
            .filter(|e| e.pid == pid)
            .map(|e| e.event)
            .collect();
        assert_eq!(events.first(), Some(&"spawned"));
        assert_eq!(events.last(), Some(&"exited"));
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn protocol_version_mismatch_names_both_versions() {
        let (sup, mut exits) = supervisor();
        let script = r#"printf '%s\n' '{"type":"hello","protocol":99,"kind":"stt","worker":"old","pid":1}'; exec sleep 30"#;
        let err = sup
            .start(spec(WorkerKind::Stt, script))
            .await
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(matches!(err, WorkerError::Handshake(_)), "{err:?}");
        assert!(
            msg.contains("version 99") && msg.contains("version 1"),
            "{msg}"
        );
        assert_reaped(&sup, last_spawned_pid(&sup));
        // A failed start is reported by its error, not on the exits channel.
        assert!(exits.try_recv().is_err());
    }

    #[tokio::test]
    async fn worker_that_never_says_hello_times_out() {
        let (sup, _exits) = supervisor_with(300, 10_000, 5_000);
        let t0 = Instant::now();
        let err = sup
            .start(spec(WorkerKind::Stt, "exec sleep 30"))
            .await
            .expect_err("must fail");
        assert!(
            matches!(err, WorkerError::Handshake(ref m) if m.contains("did not say hello")),
            "{err:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_reaped(&sup, last_spawned_pid(&sup));
    }

    #[tokio::test]
    async fn wrong_first_message_and_wrong_kind_are_refused() {
        let (sup, _exits) = supervisor();
        let script = r#"printf '%s\n' '{"type":"bye"}'; exec sleep 30"#;
        let err = sup
            .start(spec(WorkerKind::Stt, script))
            .await
            .expect_err("bye first");
        assert!(
            matches!(err, WorkerError::Handshake(ref m) if m.contains("got bye")),
            "{err:?}"
        );

        let script = r#"printf '%s\n' '{"type":"hello","protocol":1,"kind":"evaluator","worker":"llm","pid":1}'; exec sleep 30"#;
        let err = sup
            .start(spec(WorkerKind::Stt, script))
            .await
            .expect_err("wrong kind");
        assert!(
            matches!(err, WorkerError::Handshake(ref m) if m.contains("evaluator")),
            "{err:?}"
        );

        let err = sup
            .start(spec(WorkerKind::Stt, "echo not-json; exec sleep 30"))
            .await
            .expect_err("garbage");
        assert!(matches!(err, WorkerError::Protocol(_)), "{err:?}");
        assert_reaped(&sup, last_spawned_pid(&sup));
    }

    #[tokio::test]
    async fn exit_during_load_is_a_load_error_with_status_and_stderr() {
        let (sup, _exits) = supervisor();
        let script = format!(
            "{HELLO_STT}\nread -r hello\nread -r load\necho 'model file missing' >&2\nexit 3"
        );
        let err = sup
            .start(spec(WorkerKind::Stt, &script))
            .await
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(matches!(err, WorkerError::Load(_)), "{err:?}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("model file missing"), "{msg}");
        assert_reaped(&sup, last_spawned_pid(&sup));
    }

    #[tokio::test]
    async fn load_error_frame_and_load_timeout() {
        let (sup, _exits) = supervisor();
        let script = format!(
            r#"{HELLO_STT}
read -r hello
read -r load
printf '%s\n' '{{"type":"error","code":"no_model","message":"cannot open /dev/null"}}'
exec sleep 30"#
        );
        let err = sup
            .start(spec(WorkerKind::Stt, &script))
            .await
            .expect_err("error frame");
        assert!(
            matches!(err, WorkerError::Load(ref m) if m.contains("no_model: cannot open")),
            "{err:?}"
        );
        assert_reaped(&sup, last_spawned_pid(&sup));

        let (sup, _exits) = supervisor_with(10_000, 300, 5_000);
        let script = format!("{HELLO_STT}\nread -r hello\nread -r load\nexec sleep 30");
        let err = sup
            .start(spec(WorkerKind::Stt, &script))
            .await
            .expect_err("timeout");
        assert!(
            matches!(err, WorkerError::Load(ref m) if m.contains("did not load")),
            "{err:?}"
        );
        assert_reaped(&sup, last_spawned_pid(&sup));
    }

    #[tokio::test]
    async fn missing_command_is_a_spawn_error_naming_it() {
        let (sup, _exits) = supervisor();
        let mut s = good_spec();
        s.command = "/nonexistent/viva-worker".into();
        let err = sup.start(s).await.expect_err("must fail");
        assert!(matches!(err, WorkerError::Spawn { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/viva-worker") && msg.contains("path"),
            "{msg}"
        );
        assert!(sup.history().is_empty());
    }

    #[tokio::test]
    async fn calls_route_results_progress_and_errors_then_stop() {
        let (sup, mut exits) = supervisor();
        let h = sup.start(good_spec()).await.expect("start");
        assert_eq!(h.max_parallel_jobs(), 2);
        assert_eq!(h.load_ms(), 7);
        assert_eq!(h.slot(), "test");
        assert!(h.is_alive());

        let (ptx, mut prx) = mpsc::unbounded_channel();
        let r = h
            .call(transcribe("/x/ok.wav"), Some(ptx))
            .await
            .expect("call");
        match r {
            JobResult::Transcript(Transcript { text, .. }) => assert_eq!(text, "/x/ok.wav"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(prx.try_recv().ok(), Some((1, 2)));

        let err = h
            .call(transcribe("/x/fail.wav"), None)
            .await
            .expect_err("job error");
        assert!(
            matches!(err, WorkerError::Job { ref code, retryable: true, .. } if code == "bad"),
            "{err:?}"
        );
        let err = h
            .call(transcribe("/x/garbage.wav"), None)
            .await
            .expect_err("malformed");
        assert!(matches!(err, WorkerError::Protocol(_)), "{err:?}");
        let eval = JobPayload::Evaluate(viva_models::EvaluateRequest { items: vec![] });
        let err = h.call(eval, None).await.expect_err("wrong kind");
        assert!(matches!(err, WorkerError::Protocol(_)), "{err:?}");

        let table = sup.table();
        assert_eq!(table.len(), 1);
        let info = &table[0];
        assert_eq!(
            (info.state, info.jobs_done, info.in_flight),
            ("ready", 3, 0)
        );
        assert_eq!(info.pid, h.pid());
        assert_eq!(info.load_ms, Some(7));
        assert_eq!(info.model_memory_bytes, Some(1234));
        assert!(info.peak_rss_bytes.is_some_and(|b| b > 0));
        assert_eq!(sup.alive(WorkerKind::Stt), 1);
        assert_eq!(sup.alive(WorkerKind::Evaluator), 0);

        let status = h.stop().await;
        assert_eq!(status, "exit status: 0");
        assert_eq!(h.stop().await, status, "stop is idempotent");
        assert!(!h.is_alive());
        assert_reaped(&sup, h.pid());
        let exit = exits.recv().await.expect("exit reported");
        assert!(exit.expected);
        assert_eq!((exit.pid, exit.slot.as_str()), (h.pid(), "test"));
        let err = h
            .call(transcribe("/x/ok.wav"), None)
            .await
            .expect_err("stopped");
        assert!(matches!(err, WorkerError::Stopped), "{err:?}");
        let events: Vec<_> = sup.history().iter().map(|e| e.event).collect();
        assert_eq!(events, ["spawned", "ready", "exited"]);
        let seqs: Vec<_> = sup.history().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_are_demultiplexed_by_job_id() {
        // Reads three jobs, then answers them in reverse order.
        let script = format!(
            r#"{HELLO_STT}
read -r hello
read -r load
printf '%s\n' '{{"type":"loaded","model":"m","load_ms":1}}'
answer() {{
  id=$(printf '%s' "$1" | sed 's/.*"job_id":"\([^"]*\)".*/\1/')
  wav=$(printf '%s' "$1" | sed 's/.*"wav_path":"\([^"]*\)".*/\1/')
  printf '{{"type":"result","job_id":"%s","result":{{"kind":"transcript","text":"%s","audio_seconds":1.0,"processing_seconds":0.1}}}}\n' "$id" "$wav"
}}
read -r a; read -r b; read -r c
answer "$c"; answer "$b"; answer "$a"
exec sleep 30"#
        );
        let (sup, _exits) = supervisor_with(10_000, 10_000, 300);
        let h = sup
            .start(spec(WorkerKind::Stt, &script))
            .await
            .expect("start");
        let (h1, h2) = (h.clone(), h.clone());
        let a = tokio::spawn(async move { h1.call(transcribe("a"), None).await });
        let b = tokio::spawn(async move { h2.call(transcribe("b"), None).await });
        wait_until("two calls in flight", || h.in_flight() == 2).await;
        let info = &sup.table()[0];
        assert_eq!((info.state, info.in_flight), ("busy", 2));
        let c = h.call(transcribe("c"), None).await.expect("c");
        let text = |r: JobResult| match r {
            JobResult::Transcript(t) => t.text,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(text(c), "c");
        assert_eq!(text(b.await.expect("join").expect("b")), "b");
        assert_eq!(text(a.await.expect("join").expect("a")), "a");
        // This worker ignores Shutdown: stop kills it after the grace.
        let t0 = Instant::now();
        let status = h.stop().await;
        assert!(status.contains("SIGKILL"), "{status}");
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_reaped(&sup, h.pid());
    }

    #[tokio::test]
    async fn crash_fails_pending_calls_and_reports_an_unexpected_exit() {
        let (sup, mut exits) = supervisor();
        let h = sup.start(good_spec()).await.expect("start");
        let h2 = h.clone();
        let held = tokio::spawn(async move { h2.call(transcribe("/x/hold.wav"), None).await });
        wait_until("held call in flight", || h.in_flight() == 1).await;
        let err = h
            .call(transcribe("/x/crash.wav"), None)
            .await
            .expect_err("crash");
        match &err {
            WorkerError::Crashed { slot, pid, status } => {
                assert_eq!((slot.as_str(), *pid), ("test", h.pid()));
                assert_eq!(status, "exit status: 7");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.is_retryable());
        let held = held.await.expect("join").expect_err("held call fails too");
        assert!(matches!(held, WorkerError::Crashed { .. }), "{held:?}");
        let exit = exits.recv().await.expect("exit");
        assert!(!exit.expected);
        assert_eq!(exit.status, "exit status: 7");
        assert_reaped(&sup, h.pid());
        let last = sup.history().pop().expect("event");
        assert!(last.detail.contains("unexpected"), "{}", last.detail);
        let err = h
            .call(transcribe("/x/ok.wav"), None)
            .await
            .expect_err("dead");
        assert!(matches!(err, WorkerError::Crashed { .. }), "{err:?}");
        assert_eq!(h.stop().await, "exit status: 7");
    }

    #[tokio::test]
    async fn stop_fails_pending_calls_with_stopped() {
        let (sup, mut exits) = supervisor();
        let h = sup.start(good_spec()).await.expect("start");
        let h2 = h.clone();
        let held = tokio::spawn(async move { h2.call(transcribe("/x/hold.wav"), None).await });
        wait_until("held call in flight", || h.in_flight() == 1).await;
        assert_eq!(h.stop().await, "exit status: 0");
        let err = held.await.expect("join").expect_err("stopped");
        assert!(matches!(err, WorkerError::Stopped), "{err:?}");
        assert!(exits.recv().await.expect("exit").expected);
    }

    #[tokio::test]
    async fn stop_all_stops_every_worker_including_starting_ones() {
        let (tx, mut exits) = mpsc::unbounded_channel();
        let t = WorkerTimeouts {
            stop_grace: Duration::from_millis(300),
            ..WorkerTimeouts::default()
        };
        let sup = Supervisor::new("test 0", t, tx);
        let a = sup.start(good_spec()).await.expect("a");
        let b = sup.start(good_spec()).await.expect("b");
        assert_eq!(sup.alive(WorkerKind::Stt), 2);
        let starting = {
            let sup = sup.clone();
            tokio::spawn(async move { sup.start(spec(WorkerKind::Stt, "exec sleep 30")).await })
        };
        wait_until("third worker spawned", || sup.alive(WorkerKind::Stt) == 3).await;
        assert_eq!(sup.table()[2].state, "starting");
        sup.stop_all().await;
        assert!(sup.table().is_empty());
        assert!(gone(a.pid()) && gone(b.pid()));
        let err = starting
            .await
            .expect("join")
            .expect_err("stopped while starting");
        assert!(matches!(err, WorkerError::Stopped), "{err:?}");
        let reported = [
            exits.recv().await.expect("1"),
            exits.recv().await.expect("2"),
        ];
        assert!(reported.iter().all(|e| e.expected));
        assert!(
            exits.try_recv().is_err(),
            "the failed start is not reported"
        );
    }

    #[tokio::test]
    async fn worker_that_closes_stdout_is_killed() {
        let (sup, mut exits) = supervisor_with(10_000, 10_000, 300);
        let script = format!(
            r#"{HELLO_STT}
read -r hello
read -r load
printf '%s\n' '{{"type":"loaded","model":"m","load_ms":1}}'
exec >&-
exec sleep 30"#
        );
        let h = sup
            .start(spec(WorkerKind::Stt, &script))
            .await
            .expect("start");
        let exit = tokio::time::timeout(Duration::from_secs(5), exits.recv())
            .await
            .expect("killed in time")
            .expect("exit");
        assert!(!exit.expected);
        assert!(exit.status.contains("SIGKILL"), "{}", exit.status);
        assert_reaped(&sup, h.pid());
    }

    #[tokio::test]
    async fn cancelled_start_kills_the_process() {
        let (sup, _exits) = supervisor();
        let res = tokio::time::timeout(
            Duration::from_millis(200),
            sup.start(spec(WorkerKind::Stt, "exec sleep 30")),
        )
        .await;
        assert!(res.is_err(), "start should still be waiting");
        let pid = last_spawned_pid(&sup);
        wait_until("the abandoned worker to be reaped", || {
            sup.table().is_empty()
        })
        .await;
        assert_reaped(&sup, pid);
    }

    #[tokio::test]
    async fn stderr_lines_are_bounded() {
        let long = "x".repeat(10_000);
        let input = format!("short\r\n{long}\n\ntail");
        let mut reader = input.as_bytes();
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while let Some(truncated) = read_bounded_line(&mut reader, &mut buf, STDERR_LINE_MAX)
            .await
            .expect("read")
        {
            lines.push((String::from_utf8_lossy(&buf).into_owned(), truncated));
        }
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], ("short\r".to_string(), false));
        assert_eq!(lines[1].0.len(), STDERR_LINE_MAX);
        assert!(lines[1].1);
        assert_eq!(lines[2], (String::new(), false));
        assert_eq!(lines[3], ("tail".to_string(), false));
    }

    #[test]
    fn proc_memory_reads_this_process() {
        let (peak, rss) = proc_memory(std::process::id());
        assert!(peak.is_some_and(|b| b > 0) && rss.is_some_and(|b| b > 0));
        assert_eq!(proc_memory(u32::MAX), (None, None));
    }
}
