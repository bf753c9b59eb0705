//! Child processes in Viva's tests and benchmarks, with deadlines: every
//! wait ends, every child is killed, and a daemon that fails says why.
//!
//! - [`output`]: runs a command to completion (stdin from /dev/null, stdout
//!   and stderr captured) within a deadline; on timeout the process is
//!   killed and the error carries what it printed.
//! - [`wait`]: waits for a spawned child within a deadline, killing it on
//!   timeout.
//! - [`Background`]: a long-running child (a daemon, a test platform),
//!   started until it prints its ready line on stdout. Its stderr (and its
//!   stdout) go to a log file, printed when the test panics; it is killed
//!   when dropped.
//! - [`Daemon`]: `viva serve` on `127.0.0.1:0`, its address read from the
//!   `viva listening on http://ADDR` line it prints once it is serving, so
//!   no test races another for a "free" port.
//! - [`Lines`]: a pipe read line by line on its own thread, each read with
//!   a deadline.
//!
//! The crate has no Viva dependencies, so every package's tests can use it
//! (viva-daemon's own `tests/cli.rs` included, which cannot depend on
//! viva-tests: that depends on viva-daemon). `viva_tests::process`
//! re-exports it.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Deadline for a short command (`viva migrate`, ffmpeg making a test file):
/// generous for a loaded two-core machine, short enough to fail a stuck
/// test in minutes rather than never.
pub const SHORT: Duration = Duration::from_secs(120);

/// Deadline for a daemon to announce that it is serving.
pub const STARTUP: Duration = Duration::from_secs(60);

/// How much of a log an error or a failing test prints (its end).
const LOG_TAIL_BYTES: usize = 64 * 1024;

/// The line `viva serve` prints on stdout once it is serving (daemon/src/lib.rs
/// `announce_listening`), followed by the bound address.
pub const ANNOUNCEMENT: &str = "viva listening on http://";

/// A process that could not start, did not finish in time, or exited before
/// it was ready. Its text says what happened and what the process printed.
#[derive(Debug)]
pub struct Error {
    message: String,
}

impl Error {
    fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// `program arg arg …`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `child` until it exits or `deadline` passes (`Ok(None)`).
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Every live process descended from `pid` (from /proc), children first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|pp| pp.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parent_of {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

/// SIGKILL for `child`'s descendants (a browser a driver script started, a
/// daemon's workers), then for `child`, then reaps it; says how it ended.
/// The descendants are listed while `child` still lives, so none has been
/// reparented yet.
fn kill_tree_and_reap(child: &mut Child) -> String {
    if let Ok(None) = child.try_wait() {
        for pid in descendants(child.id()) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) with a pid just read from /proc as a
                // descendant of our live child; at worst it has exited.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    kill_and_reap(child)
}

/// SIGKILL and reap; says how it ended.
fn kill_and_reap(child: &mut Child) -> String {
    let _ = child.kill();
    match wait_until(child, Instant::now() + Duration::from_secs(10)) {
        Ok(Some(status)) => status.to_string(),
        Ok(None) => "still not reaped 10 s after SIGKILL".into(),
        Err(e) => format!("not reaped: {e}"),
    }
}

/// Everything one pipe delivers, read on a thread.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Capture {
    fn spawn<R: Read + Send + 'static>(pipe: Option<R>) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => lock(&buf).extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(());
            });
        }
        Capture { buf, done }
    }

    /// What was read, once the pipe closed or `deadline` passed (a process
    /// the child started may still hold the pipe open).
    fn finish(&self, deadline: Instant) -> Vec<u8> {
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        lock(&self.buf).clone()
    }
}

fn printed(stdout: &[u8], stderr: &[u8]) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
        tail(&String::from_utf8_lossy(stdout)),
        tail(&String::from_utf8_lossy(stderr))
    )
}

/// The end of `text`, at most [`LOG_TAIL_BYTES`].
fn tail(text: &str) -> String {
    if text.len() <= LOG_TAIL_BYTES {
        return text.to_owned();
    }
    let mut start = text.len() - LOG_TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[… {start} earlier bytes …]\n{}", &text[start..])
}

/// Runs `cmd` to completion with stdin from /dev/null and stdout and stderr
/// captured, like [`Command::output`], but for at most `timeout`: then the
/// process is killed (SIGKILL) and the error carries what it printed. A
/// non-zero exit is not an error here: check `status`.
pub fn output(cmd: &mut Command, timeout: Duration) -> Result<Output, Error> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::new(format!("cannot start {what}: {e}")))?;
    let out = Capture::spawn(child.stdout.take());
    let err = Capture::spawn(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = match wait_until(&mut child, deadline) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let how = kill_tree_and_reap(&mut child);
            let soon = Instant::now() + Duration::from_millis(200);
            return Err(Error::new(format!(
                "{what} did not finish within {timeout:?}: killed ({how})\n{}",
                printed(&out.finish(soon), &err.finish(soon))
            )));
        }
        Err(e) => {
            let how = kill_tree_and_reap(&mut child);
            return Err(Error::new(format!(
                "waiting for {what} failed ({e}): killed ({how})"
            )));
        }
    };
    // Pipes close when the process exits, unless a process it started still
    // holds them: wait for them until the deadline, at least a moment.
    let until = deadline.max(Instant::now() + Duration::from_secs(1));
    Ok(Output {
        status,
        stdout: out.finish(until),
        stderr: err.finish(until),
    })
}

/// Waits for `child` for at most `timeout`; on timeout kills it and its
/// descendants (SIGKILL), reaps it and fails.
pub fn wait(child: &mut Child, timeout: Duration) -> Result<ExitStatus, Error> {
    let pid = child.id();
    match wait_until(child, Instant::now() + timeout) {
        Ok(Some(status)) => Ok(status),
        Ok(None) => {
            let how = kill_tree_and_reap(child);
            Err(Error::new(format!(
                "process {pid} did not exit within {timeout:?}: killed ({how})"
            )))
        }
        Err(e) => Err(Error::new(format!("waiting for process {pid}: {e}"))),
    }
}

/// One read from [`Lines`].
enum Next {
    Line(String),
    /// Nothing within the time given.
    Nothing,
    /// The pipe closed.
    Closed,
}

/// A pipe read line by line on its own thread, so that each read has a
/// deadline: a child that stops writing cannot hang the reader.
pub struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    /// Reads `pipe` until it closes.
    pub fn spawn<R: Read + Send + 'static>(pipe: R) -> Lines {
        Lines::tee(pipe, None)
    }

    /// Reads `pipe`, also appending each line to `log` as `stdout: LINE`.
    fn tee<R: Read + Send + 'static>(pipe: R, mut log: Option<File>) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "stdout: {line}");
                }
                // Keep draining after the reader is gone, so the child never
                // blocks on a full pipe.
                let _ = tx.send(line);
            }
        });
        Lines { rx }
    }

    fn next_within(&self, timeout: Duration) -> Next {
        match self.rx.recv_timeout(timeout) {
            Ok(line) => Next::Line(line),
            Err(RecvTimeoutError::Timeout) => Next::Nothing,
            Err(RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }

    /// The next line (without its line ending), `Ok(None)` once the pipe
    /// has closed, or an error when none came within `timeout`.
    pub fn next(&self, timeout: Duration) -> Result<Option<String>, Error> {
        match self.next_within(timeout) {
            Next::Line(l) => Ok(Some(l)),
            Next::Closed => Ok(None),
            Next::Nothing => Err(Error::new(format!("no line within {timeout:?}"))),
        }
    }
}

/// A long-running child process: a daemon, a test platform. Started by
/// [`Background::start`] until its ready line; stdin is /dev/null, stderr
/// (and stdout, line by line) go to a log file. When dropped it is killed
/// and reaped, with its descendants; when dropped during a panic its log is printed first (and
/// the file kept), so a failing test shows why its daemon misbehaved.
pub struct Background {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log: Option<tempfile::NamedTempFile>,
    _stdout: Lines,
}

impl Background {
    /// Spawns `cmd` and reads its stdout until `ready` returns `Some` for a
    /// line, for at most `timeout`. Fails at once, with the log, if the
    /// process exits (or closes stdout) first; on timeout kills it and fails
    /// with the log.
    pub fn start<T>(
        cmd: &mut Command,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> Result<(Background, T), Error> {
        let name = describe(cmd);
        let io = |what: &str, e: std::io::Error| Error::new(format!("{what} for {name}: {e}"));
        let log = tempfile::Builder::new()
            .prefix("viva-test-")
            .suffix(".log")
            .tempfile()
            .map_err(|e| io("creating a log file", e))?;
        // Both writers append, so the child's stderr and the stdout lines
        // interleave instead of overwriting each other.
        let append = |p: &Path| std::fs::OpenOptions::new().append(true).open(p);
        let stderr = append(log.path()).map_err(|e| io("opening the log", e))?;
        let tee = append(log.path()).map_err(|e| io("opening the log", e))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::new(format!("cannot start {name}: {e}")))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = kill_and_reap(&mut child);
            return Err(Error::new(format!("{name}: no stdout pipe")));
        };
        let mut bg = Background {
            name,
            child,
            status: None,
            log: Some(log),
            _stdout: Lines::tee(stdout, Some(tee)),
        };
        let deadline = Instant::now() + timeout;
        loop {
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match bg._stdout.next_within(step) {
                Next::Line(line) => {
                    if let Some(t) = ready(&line) {
                        return Ok((bg, t));
                    }
                    continue;
                }
                Next::Closed => {
                    // stdout closed: it is exiting. Give it a moment to.
                    let soon = Instant::now() + Duration::from_secs(5);
                    let how = match wait_until(&mut bg.child, soon.min(deadline)) {
                        Ok(Some(status)) => {
                            bg.status = Some(status);
                            format!("exited ({status})")
                        }
                        _ => "closed its stdout".to_owned(),
                    };
                    return Err(bg.failure(&format!("{how} before it was ready")));
                }
                Next::Nothing => {}
            }
            match bg.child.try_wait() {
                Ok(Some(status)) => {
                    bg.status = Some(status);
                    // Take a ready line printed just before the exit too.
                    while let Next::Line(line) = bg._stdout.next_within(Duration::from_millis(100))
                    {
                        if ready(&line).is_some() {
                            break;
                        }
                    }
                    return Err(bg.failure(&format!("exited ({status}) before it was ready")));
                }
                Ok(None) => {}
                Err(e) => return Err(bg.failure(&format!("could not be waited for: {e}"))),
            }
            if Instant::now() >= deadline {
                let how = bg.kill_now(true);
                return Err(
                    bg.failure(&format!("was not ready within {timeout:?}: killed ({how})"))
                );
            }
        }
    }

    fn kill_now(&mut self, tree: bool) -> String {
        match self.status {
            Some(status) => status.to_string(),
            None => {
                let how = if tree {
                    kill_tree_and_reap(&mut self.child)
                } else {
                    kill_and_reap(&mut self.child)
                };
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.status = Some(status);
                }
                how
            }
        }
    }

    fn failure(&self, what: &str) -> Error {
        Error::new(format!(
            "{} (pid {}) {what}\n--- its log ---\n{}\n--- end of log ---",
            self.name,
            self.child.id(),
            tail(&self.log())
        ))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr (and stdout, as `stdout: `
    /// lines) so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read(l.path()).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if it has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| self.failure(&format!("could not be waited for: {e}")))?;
        }
        Ok(self.status)
    }

    /// Waits for it to exit for at most `timeout`; on timeout kills it and
    /// fails with its log.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match wait_until(&mut self.child, Instant::now() + timeout) {
            Ok(Some(status)) => {
                self.status = Some(status);
                Ok(status)
            }
            Ok(None) => {
                let how = self.kill_now(true);
                Err(self.failure(&format!("did not exit within {timeout:?}: killed ({how})")))
            }
            Err(e) => Err(self.failure(&format!("could not be waited for: {e}"))),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`), unless it has already been
    /// reaped (its pid may then belong to another process).
    pub fn signal(&mut self, signal: i32) -> Result<(), Error> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|e| self.failure(&format!("has an odd pid: {e}")))?;
        // SAFETY: kill(2) on our own child, which is not reaped yet (a
        // zombie's pid is not reused), so the signal cannot reach another
        // process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(self.failure(&format!("could not be sent signal {signal}: {e}")));
        }
        Ok(())
    }

    /// SIGKILL for this process only (what `kill -9 PID` does: its own
    /// children are left to fend for themselves), then reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, Error> {
        let how = self.kill_now(false);
        self.status
            .ok_or_else(|| self.failure(&format!("survived SIGKILL ({how})")))
    }

    /// SIGTERM, then waits at most `timeout` (then SIGKILL and an error).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        self.signal(libc::SIGTERM)?;
        self.wait(timeout)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let how = self.kill_now(true);
        if std::thread::panicking() {
            let log = self.log();
            let kept = self
                .log
                .take()
                .and_then(|l| l.keep().ok())
                .map(|(_, path)| format!(", kept in {}", path.display()))
                .unwrap_or_default();
            eprintln!(
                "---- log of {} (pid {}, {how}{kept}) ----\n{}\n---- end of log ----",
                self.name,
                self.child.id(),
                tail(&log)
            );
        }
    }
}

/// A `viva serve` process: [`Background`] plus the address it announced.
pub struct Daemon {
    process: Background,
    addr: SocketAddr,
}

impl Daemon {
    /// Starts `cmd` (`viva … serve …`) with `VIVA_LISTEN=127.0.0.1:0` (a
    /// `--listen` flag in `cmd` still wins) and waits at most `timeout` for
    /// its `viva listening on http://ADDR` line, which it prints once it
    /// holds the data directory and serves. Fails at once, with its log, if
    /// it exits first.
    pub fn start(cmd: &mut Command, timeout: Duration) -> Result<Daemon, Error> {
        cmd.env("VIVA_LISTEN", "127.0.0.1:0");
        let (process, addr) = Background::start(cmd, timeout, parse_announcement)?;
        Ok(Daemon { process, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The address in a `viva listening on http://ADDR` line.
pub fn parse_announcement(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix(ANNOUNCEMENT)?.parse().ok()
}

impl Deref for Daemon {
    type Target = Background;
    fn deref(&self) -> &Background {
        &self.process
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Background {
        &mut self.process
    }
}

/// Removes every `VIVA_*` variable from `cmd`'s environment, so a test's
/// `viva` sees only the configuration it sets (the caller's shell, or
/// scripts/test, may export variables that `viva` would read as
/// configuration keys).
pub fn clean_viva_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("VIVA_") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// An output's stdout then stderr, as text: for assertions and messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_captures_and_reports_the_status() {
        let o = output(&mut sh("echo out; echo err >&2; exit 3"), SHORT).expect("runs");
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(text(&o), "out\nerr\n");
    }

    #[test]
    fn output_kills_a_command_past_its_deadline_and_keeps_what_it_printed() {
        let t = Instant::now();
        let e = output(
            &mut sh("echo started; exec sleep 60"),
            Duration::from_millis(500),
        )
        .expect_err("times out");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let msg = e.to_string();
        assert!(msg.contains("did not finish within 500ms"), "{msg}");
        assert!(msg.contains("started"), "{msg}");
    }

    #[test]
    fn output_does_not_wait_for_a_grandchild_holding_the_pipes() {
        let t = Instant::now();
        let o = output(&mut sh("sleep 60 & echo parent"), Duration::from_secs(2))
            .expect("the command itself exits");
        assert!(o.status.success());
        assert!(text(&o).contains("parent"));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    /// Gone or a zombie.
    fn dead(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    #[test]
    fn a_timeout_kills_what_the_command_started_too() {
        let e = output(
            &mut sh("sleep 60 & echo $!; wait"),
            Duration::from_millis(500),
        )
        .expect_err("times out");
        let msg = e.to_string();
        let grandchild: u32 = msg
            .lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {msg}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dead(grandchild) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(dead(grandchild), "sleep {grandchild} outlived the timeout");
    }

    #[test]
    fn background_start_fails_at_once_with_the_log_when_the_process_exits() {
        let t = Instant::now();
        let e = Background::start(
            &mut sh("echo 'error: no config' >&2; exit 2"),
            Duration::from_secs(60),
            |l| (l == "ready").then_some(()),
        )
        .err()
        .expect("fails");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let msg = e.to_string();
        assert!(msg.contains("before it was ready"), "{msg}");
        assert!(msg.contains("error: no config"), "{msg}");
    }

    #[test]
    fn background_is_ready_on_its_line_and_killed_on_drop() {
        let (mut bg, n) = Background::start(
            &mut sh("echo noise; echo warming >&2; echo 'ready 7'; exec sleep 60"),
            SHORT,
            |l| l.strip_prefix("ready ").and_then(|n| n.parse::<u32>().ok()),
        )
        .expect("ready");
        assert_eq!(n, 7);
        assert!(bg.try_wait().expect("try_wait").is_none());
        let log = bg.log();
        assert!(
            log.contains("warming") && log.contains("stdout: noise"),
            "{log}"
        );
        let pid = bg.pid();
        drop(bg);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "pid {pid} is gone and reaped: {stat}");
    }

    #[test]
    fn background_times_out_and_is_killed() {
        let t = Instant::now();
        let e = Background::start(
            &mut sh("echo 'still loading' >&2; exec sleep 60"),
            Duration::from_millis(500),
            |_| Some(()),
        )
        .err()
        .expect("never ready");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let msg = e.to_string();
        assert!(msg.contains("was not ready within 500ms"), "{msg}");
        assert!(msg.contains("still loading"), "{msg}");
    }

    #[test]
    fn terminate_waits_for_the_exit() {
        let (mut bg, ()) = Background::start(
            &mut sh("trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done"),
            SHORT,
            |l| (l == "ready").then_some(()),
        )
        .expect("ready");
        let status = bg.terminate(SHORT).expect("exits");
        assert!(status.success(), "{status}");
    }

    #[test]
    fn announcement_is_parsed() {
        assert_eq!(
            parse_announcement("viva listening on http://127.0.0.1:4321"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4321)))
        );
        assert_eq!(parse_announcement("viva listening on 127.0.0.1:1"), None);
    }

    #[test]
    fn lines_have_deadlines() {
        let mut child = sh("echo one; exec sleep 60")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let lines = Lines::spawn(child.stdout.take().expect("stdout"));
        assert_eq!(lines.next(SHORT).expect("a line").as_deref(), Some("one"));
        assert!(lines.next(Duration::from_millis(200)).is_err());
        let _ = child.kill();
        assert!(wait(&mut child, SHORT).is_ok());
        assert_eq!(lines.next(SHORT).expect("closed"), None);
    }
}
