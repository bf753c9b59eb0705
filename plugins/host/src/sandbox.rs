//! The per-call sandbox: deny-all WASI, bounded output capture, the log
//! import and the resource limiter.
//!
//! WASI is linked because `wasm32-wasip2` std imports it, but every
//! capability is empty: no preopened directories, no environment or
//! arguments, stdin closed, network uses denied, clocks fixed and
//! randomness a constant sequence, so a plugin is a pure function of its
//! input. stdout and stderr go to [`Capture`] buffers that keep the first
//! `max_log_bytes` and silently drop the rest (wasmtime's in-memory pipe
//! would trap the guest when full).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, ResourceTable, WasiCtx, WasiCtxBuilder,
    WasiCtxView, WasiView,
};

use crate::v0_1::viva::rubric::host::{self, LogLevel};
use crate::{Failure, Limits};

/// The fixed wall-clock time plugins see: 2024-01-01T00:00:00Z.
const FIXED_UNIX_SECONDS: u64 = 1_704_067_200;

/// What a call used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Instructions charged, when metering was on.
    pub fuel_consumed: Option<u64>,
    /// Largest linear memory reached during the call.
    pub peak_memory_bytes: u64,
    /// Instantiation plus the call.
    pub elapsed_us: u64,
}

/// One `log` call of the plugin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub level: &'static str,
    pub message: String,
}

/// Everything a plugin printed or logged during one call, bounded.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CallLog {
    pub entries: Vec<LogEntry>,
    pub stdout: String,
    pub stderr: String,
    /// True when anything was dropped because a capture was full.
    pub truncated: bool,
}

impl CallLog {
    /// The log as text: entries, then stderr, then stdout.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            out.push_str(&format!("[{}] {}\n", e.level, e.message));
        }
        if !self.stderr.is_empty() {
            out.push_str("[stderr] ");
            out.push_str(self.stderr.trim_end());
            out.push('\n');
        }
        if !self.stdout.is_empty() {
            out.push_str("[stdout] ");
            out.push_str(self.stdout.trim_end());
            out.push('\n');
        }
        if self.truncated {
            out.push_str("[log truncated]\n");
        }
        out
    }

    /// The last `max` bytes of [`CallLog::text`], on one line.
    pub fn tail(&self, max: usize) -> String {
        let text = self.text().trim().replace('\n', " | ");
        if text.len() <= max {
            return text;
        }
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("…{}", &text[start..])
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.stdout.is_empty() && self.stderr.is_empty()
    }
}

/// A limit the limiter refused to exceed; returned as the trap's error so
/// the failure is specific.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LimitHit {
    Memory { limit: u64 },
    Table { limit: u64 },
}

impl LimitHit {
    pub(crate) fn failure(&self) -> Failure {
        match *self {
            LimitHit::Memory { limit } => Failure::MemoryLimit { limit_bytes: limit },
            LimitHit::Table { limit } => Failure::TableLimit {
                limit_elements: limit,
            },
        }
    }
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { limit } => write!(f, "memory limit of {limit} bytes reached"),
            LimitHit::Table { limit } => write!(f, "table limit of {limit} elements reached"),
        }
    }
}

impl std::error::Error for LimitHit {}

/// Caps memories, tables and instances, and records the peak memory.
pub(crate) struct Limiter {
    memory_cap: u64,
    table_cap: u64,
    instances: usize,
    tables: usize,
    memories: usize,
    /// Sum of all memories' current sizes.
    memory_now: u64,
    pub(crate) peak_memory: u64,
    pub(crate) hit: Option<LimitHit>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grown = desired.saturating_sub(current) as u64;
        let total = self.memory_now.saturating_add(grown);
        if total > self.memory_cap {
            let hit = LimitHit::Memory {
                limit: self.memory_cap,
            };
            self.hit = Some(hit);
            return Err(hit.into());
        }
        self.memory_now = total;
        self.peak_memory = self.peak_memory.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.table_cap {
            let hit = LimitHit::Table {
                limit: self.table_cap,
            };
            self.hit = Some(hit);
            return Err(hit.into());
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.memories
    }
}

/// A bounded, truncating byte buffer shared by a guest stream and the host.
#[derive(Clone)]
pub(crate) struct Capture {
    inner: Arc<Mutex<CaptureBuf>>,
}

struct CaptureBuf {
    bytes: Vec<u8>,
    cap: usize,
    dropped: bool,
}

impl Capture {
    fn new(cap: usize) -> Capture {
        Capture {
            inner: Arc::new(Mutex::new(CaptureBuf {
                bytes: Vec::new(),
                cap,
                dropped: false,
            })),
        }
    }

    fn push(&self, data: &[u8]) {
        if let Ok(mut b) = self.inner.lock() {
            let room = b.cap.saturating_sub(b.bytes.len());
            let take = room.min(data.len());
            b.bytes.extend_from_slice(&data[..take]);
            if take < data.len() {
                b.dropped = true;
            }
        }
    }

    fn take(&self) -> (String, bool) {
        match self.inner.lock() {
            Ok(mut b) => {
                let bytes = std::mem::take(&mut b.bytes);
                (String::from_utf8_lossy(&bytes).into_owned(), b.dropped)
            }
            Err(_) => (String::new(), true),
        }
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Writes are always accepted in full; what does not fit is dropped, so a
/// chatty plugin is never trapped or blocked by its own output.
#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::from_secs(FIXED_UNIX_SECONDS)
    }
}

/// Advances one microsecond per reading: deterministic, and loops that wait
/// for time to pass still end (by fuel or the deadline).
struct SteppingClock {
    now: AtomicU64,
}

impl HostMonotonicClock for SteppingClock {
    fn resolution(&self) -> u64 {
        1_000
    }

    fn now(&self) -> u64 {
        self.now.fetch_add(1_000, Ordering::Relaxed)
    }
}

/// The store data of one call.
pub(crate) struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    stdout: Capture,
    stderr: Capture,
    entries: Vec<LogEntry>,
    log_bytes: usize,
    log_cap: usize,
    log_dropped: bool,
}

impl CallState {
    pub(crate) fn new(limits: &Limits) -> CallState {
        let cap = usize::try_from(limits.max_log_bytes).unwrap_or(usize::MAX);
        let stdout = Capture::new(cap);
        let stderr = Capture::new(cap);
        let mut b = WasiCtxBuilder::new();
        b.stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(FixedWallClock)
            .monotonic_clock(SteppingClock {
                now: AtomicU64::new(0),
            })
            .secure_random(Deterministic::new(vec![0x5a, 0x17, 0xc3, 0x9e]))
            .insecure_random(Deterministic::new(vec![0x42, 0x07, 0xd1, 0x88]))
            .insecure_random_seed(0x5eed)
            .max_random_size(1 << 16)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        CallState {
            wasi: b.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_cap: limits.memory_bytes,
                table_cap: limits.table_elements,
                instances: limits.instances as usize,
                tables: limits.tables as usize,
                memories: limits.memories as usize,
                memory_now: 0,
                peak_memory: 0,
                hit: None,
            },
            stdout,
            stderr,
            entries: Vec::new(),
            log_bytes: 0,
            log_cap: cap,
            log_dropped: false,
        }
    }

    /// The message of a panic, from the SDK's panic hook (log) or std's
    /// default hook (stderr).
    pub(crate) fn panic_message(&self) -> Option<String> {
        for e in &self.entries {
            if let Some(rest) = e.message.strip_prefix("plugin panicked: ") {
                return Some(clean_panic(rest));
            }
        }
        let (stderr, _) = self.stderr.clone().peek();
        stderr
            .find("panicked at")
            .map(|i| clean_panic(&stderr[i..]))
    }

    pub(crate) fn into_log(self) -> CallLog {
        let (stdout, d1) = self.stdout.take();
        let (stderr, d2) = self.stderr.take();
        CallLog {
            entries: self.entries,
            stdout,
            stderr,
            truncated: self.log_dropped || d1 || d2,
        }
    }
}

impl Capture {
    fn peek(self) -> (String, bool) {
        match self.inner.lock() {
            Ok(b) => (String::from_utf8_lossy(&b.bytes).into_owned(), b.dropped),
            Err(_) => (String::new(), true),
        }
    }
}

/// "panicked at src/lib.rs:3:5:\nmessage" → "message (at src/lib.rs:3:5)".
fn clean_panic(text: &str) -> String {
    let text = text.trim();
    let text = text.strip_prefix("panicked at ").unwrap_or(text);
    match text.split_once(":\n") {
        Some((location, message)) => {
            let message = message.lines().next().unwrap_or("").trim();
            format!("{message} (at {location})")
        }
        None => text.lines().next().unwrap_or("").to_owned(),
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for CallState {
    fn log(&mut self, level: LogLevel, message: String) {
        let room = self.log_cap.saturating_sub(self.log_bytes);
        if room == 0 {
            self.log_dropped = true;
            return;
        }
        let mut message = message;
        if message.len() > room {
            let mut cut = room;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            self.log_dropped = true;
        }
        self.log_bytes += message.len();
        let level = match level {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        self.entries.push(LogEntry { level, message });
    }
}

impl crate::v0_1::viva::rubric::types::Host for CallState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_truncates_instead_of_failing() {
        let c = Capture::new(8);
        let mut s = c.clone();
        OutputStream::write(&mut s, Bytes::from_static(b"hello ")).expect("write");
        OutputStream::write(&mut s, Bytes::from_static(b"world")).expect("write");
        assert!(OutputStream::check_write(&mut s).expect("permit") > 0);
        assert_eq!(c.take(), ("hello wo".to_owned(), true));
    }

    #[test]
    fn panic_messages_are_cleaned() {
        assert_eq!(
            clean_panic("panicked at src/lib.rs:3:5:\nboom\nnote: more"),
            "boom (at src/lib.rs:3:5)"
        );
    }

    #[test]
    fn log_tail_is_bounded() {
        let log = CallLog {
            entries: vec![LogEntry {
                level: "info",
                message: "x".repeat(5000),
            }],
            ..Default::default()
        };
        assert!(log.tail(100).len() <= 104);
    }
}
