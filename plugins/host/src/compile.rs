//! Compiling components, in this process or in a child with its own limits.
//!
//! Cranelift compiles an uploaded plugin to native code before it can run.
//! A hostile upload could try to make that slow or memory-hungry, so the
//! daemon compiles uploads in a child process ([`Compiler::Subprocess`]:
//! the same binary, entered through [`run_compile_child`]) under an address
//! space limit (`RLIMIT_AS`), a CPU limit and a wall-clock timeout after
//! which it is killed. The child writes the serialised artifact to stdout;
//! it uses the same fixed engine configuration, so the parent can load it.
//! In-process compilation (trusted, embedded plugins; tests) is bounded by
//! the timeout only.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmtime::Engine;

use crate::{Error, Result, engine_config};

/// Where compilation happens.
#[derive(Debug, Clone, Default)]
pub enum Compiler {
    /// On a thread of this process, bounded by the timeout.
    #[default]
    InProcess,
    /// In `program args…`, which must call [`run_compile_child`]: the
    /// component on stdin, the artifact on stdout.
    Subprocess { program: PathBuf, args: Vec<String> },
}

/// Limits for compiling one component.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompileLimits {
    pub timeout: Duration,
    /// Address space of the compile child (subprocess only).
    pub memory_bytes: u64,
}

impl Default for CompileLimits {
    fn default() -> Self {
        CompileLimits {
            timeout: Duration::from_secs(60),
            memory_bytes: 2 << 30,
        }
    }
}

/// Largest component a compile child reads from stdin.
const CHILD_MAX_INPUT: u64 = 256 << 20;

pub(crate) fn precompile(
    engine: &Engine,
    wasm: &[u8],
    compiler: &Compiler,
    limits: &CompileLimits,
) -> Result<Vec<u8>> {
    match compiler {
        Compiler::InProcess => in_process(engine, wasm, limits.timeout),
        Compiler::Subprocess { program, args } => subprocess(program, args, wasm, limits),
    }
}

fn in_process(engine: &Engine, wasm: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = engine.clone();
    let wasm = wasm.to_vec();
    std::thread::Builder::new()
        .name("viva-plugin-compile".into())
        .spawn(move || {
            let _ = tx.send(engine.precompile_component(&wasm));
        })
        .map_err(Error::io("starting a compile thread"))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(artifact)) => Ok(artifact),
        Ok(Err(e)) => Err(Error::Compile(format!("{e:#}"))),
        // The thread finishes on its own; its result is dropped.
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::CompileTimeout(timeout)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(Error::Compile("the compiler thread panicked".into()))
        }
    }
}

fn subprocess(
    program: &PathBuf,
    args: &[String],
    wasm: &[u8],
    limits: &CompileLimits,
) -> Result<Vec<u8>> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let memory = limits.memory_bytes;
    let cpu_seconds = limits.timeout.as_secs().saturating_add(1);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let limit = move || -> std::io::Result<()> {
            let set = |resource, value: u64| {
                let lim = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                // SAFETY: a valid rlimit struct for the duration of the call.
                if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_AS, memory)?;
            set(libc::RLIMIT_CPU, cpu_seconds)?;
            set(libc::RLIMIT_CORE, 0)?;
            Ok(())
        };
        // SAFETY: the closure runs between fork and exec and only calls
        // setrlimit, which is async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(limit);
        }
    }
    let mut child = cmd.spawn().map_err(Error::io(format!(
        "starting the plugin compiler {}",
        program.display()
    )))?;
    let mut stdin = child.stdin.take();
    let input = wasm.to_vec();
    let writer = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&input);
        }
        drop(stdin);
    });
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        out
    });
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(64 << 10).read_to_end(&mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let deadline = Instant::now() + limits.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = writer.join();
                let _ = reader.join();
                let _ = err_reader.join();
                return Err(Error::CompileTimeout(limits.timeout));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error::io("waiting for the plugin compiler")(e)),
        }
    };
    let _ = writer.join();
    let artifact = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if status.success() {
        return Ok(artifact);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(libc::SIGXCPU) {
            return Err(Error::CompileTimeout(limits.timeout));
        }
    }
    let lower = stderr.to_lowercase();
    if lower.contains("memory allocation") || lower.contains("out of memory") {
        return Err(Error::CompileMemory {
            limit: limits.memory_bytes,
        });
    }
    Err(Error::Compile(format!(
        "the compiler exited with {status}: {}",
        stderr.trim()
    )))
}

/// The body of a compile child: reads a component from `input`, compiles it
/// with the host's engine configuration and writes the artifact to `output`.
pub fn run_compile_child(input: impl Read, mut output: impl Write) -> Result<()> {
    let mut wasm = Vec::new();
    input
        .take(CHILD_MAX_INPUT)
        .read_to_end(&mut wasm)
        .map_err(Error::io("reading the component from stdin"))?;
    let engine = Engine::new(&engine_config()).map_err(|e| Error::Engine(format!("{e:#}")))?;
    let artifact = engine
        .precompile_component(&wasm)
        .map_err(|e| Error::Compile(format!("{e:#}")))?;
    output
        .write_all(&artifact)
        .and_then(|()| output.flush())
        .map_err(Error::io("writing the compiled plugin to stdout"))
}
