//! A real PostgreSQL for tests: Debian's `postgresql` server in a throwaway
//! cluster (`initdb` + `postgres`, as the `postgres` user when the tests run
//! as root), one per test process, and a fresh database per daemon.
//!
//! `VIVA_TEST_POSTGRES=postgres://…/postgres` names a running server to use
//! instead (its user must be allowed to create databases).
//!
//! The cluster's server dies with the test process: it is started from a
//! thread that lives as long as the process, with a parent-death signal
//! (SIGINT: PostgreSQL's fast shutdown). Clusters of dead test processes are
//! removed by the next one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// `VIVA_TEST_STORE=postgres`: daemons started by the tests use a fresh
/// PostgreSQL database each instead of SQLite.
pub fn enabled() -> bool {
    std::env::var("VIVA_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Whether a PostgreSQL test must be skipped: no server installed and no
/// `VIVA_TEST_POSTGRES`; panics instead when `VIVA_REQUIRE_POSTGRES` is set
/// (scripts/test sets it: CI never skips them).
pub fn unavailable() -> bool {
    if bin_dir().is_none() && std::env::var_os("VIVA_TEST_POSTGRES").is_none() {
        assert!(
            std::env::var_os("VIVA_REQUIRE_POSTGRES").is_none(),
            "VIVA_REQUIRE_POSTGRES is set but PostgreSQL's server is not installed"
        );
        eprintln!("SKIPPED: PostgreSQL's server is not installed (apt-get install postgresql)");
        return true;
    }
    false
}

/// The directory holding `initdb` and `postgres` (the newest installed).
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

struct Cluster {
    /// `postgres://…/postgres`, for creating databases.
    admin_url: String,
    base: String,
}

static CLUSTER: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();

fn cluster() -> Result<&'static Cluster> {
    CLUSTER
        .get_or_init(|| start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The URL of the server's `postgres` database (for creating databases),
/// starting the cluster if need be: hand it to child processes as
/// `VIVA_TEST_POSTGRES` so their databases live in this process's cluster.
pub fn admin_url() -> Result<String> {
    Ok(cluster()?.admin_url.clone())
}

/// A fresh, empty database; its URL.
pub fn fresh_database() -> Result<String> {
    static N: AtomicU32 = AtomicU32::new(0);
    let c = cluster()?;
    let name = format!(
        "viva_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        viva_daemon::now_ms() % 1_000_000
    );
    let admin_url = c.admin_url.clone();
    let create = name.clone();
    // The sync client runs its own runtime: keep it off the test's.
    std::thread::spawn(move || -> Result<()> {
        let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls)
            .context("connecting to the test PostgreSQL")?;
        admin
            .batch_execute(&format!("CREATE DATABASE {create}"))
            .context("creating a test database")?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("creating a test database panicked"))??;
    Ok(format!("{}/{name}", c.base))
}

/// The `[node] secrets_key_file` of every node this test process starts on
/// PostgreSQL (they share the session and LTI keys through the store):
/// 32 random bytes, mode 0600, made once per process, beside the cluster.
pub fn secrets_key_file() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let cluster = std::env::temp_dir().join(format!("viva-pg-{}", std::process::id()));
        let dir = if cluster.is_dir() {
            cluster
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("viva-test-secrets-{}.key", std::process::id()));
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
            .expect("random bytes");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&key))
            .expect("writing the test secrets key");
        path
    })
    .clone()
}

fn start() -> Result<Cluster> {
    if let Ok(url) = std::env::var("VIVA_TEST_POSTGRES") {
        let base = url
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .context("VIVA_TEST_POSTGRES must end in /<database>")?;
        return Ok(Cluster {
            admin_url: url,
            base,
        });
    }
    let bin = bin_dir().context(
        "PostgreSQL's server is not installed (apt-get install postgresql): the PostgreSQL tests need it",
    )?;
    remove_stale_clusters();
    let dir = std::env::temp_dir().join(format!("viva-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("creating the cluster directory")?;
    let user = server_user()?;
    if let Some((uid, gid)) = user {
        chown(&dir, uid, gid)?;
    }
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb.args(["-D"]).arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    as_server_user(&mut initdb, user);
    let out = crate::process::output(&mut initdb, Duration::from_secs(120))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if !out.status.success() {
        bail!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let port = free_port()?;
    let log = dir.join("server.log");
    let (tx, rx) = std::sync::mpsc::channel();
    let server = bin.join("postgres");
    let (data2, dir2, log2) = (data.clone(), dir.clone(), log.clone());
    // The thread that starts the server lives as long as the process: the
    // parent-death signal follows the thread, not the process.
    std::thread::Builder::new()
        .name("viva-test-postgres".into())
        .spawn(move || {
            let spawned = (|| -> Result<std::process::Child> {
                let logf = std::fs::File::create(&log2)?;
                if let Some((uid, gid)) = user {
                    chown(&log2, uid, gid)?;
                }
                let mut cmd = Command::new(server);
                cmd.arg("-D")
                    .arg(&data2)
                    .args(["-p", &port.to_string(), "-k"])
                    .arg(&dir2)
                    .args([
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=300",
                        "-c",
                        "shared_buffers=64MB",
                    ])
                    .stdin(std::process::Stdio::null())
                    .stdout(logf.try_clone()?)
                    .stderr(logf);
                as_server_user(&mut cmd, user);
                Ok(cmd.spawn()?)
            })();
            let ok = spawned.is_ok();
            let _ = tx.send(spawned.map(|c| c.id()).map_err(|e| format!("{e:#}")));
            if ok {
                loop {
                    std::thread::park();
                }
            }
        })
        .context("starting the PostgreSQL thread")?;
    let _pid = rx
        .recv()
        .context("the PostgreSQL thread ended")?
        .map_err(|e| anyhow::anyhow!("starting postgres: {e}"))?;
    let base = format!("postgres://postgres@127.0.0.1:{port}");
    let admin_url = format!("{base}/postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let url = admin_url.clone();
        let up = std::thread::spawn(move || {
            postgres::Client::connect(&url, postgres::NoTls).map(|_| ())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probing postgres panicked"))?;
        match up {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "postgres did not accept connections within 60 s ({e}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(Cluster { admin_url, base })
}

/// The `postgres` user's ids when running as root (initdb refuses root).
fn server_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let out = crate::process::output(
        Command::new("id").args(["-u", "postgres"]),
        Duration::from_secs(10),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let uid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("there is no `postgres` user (apt-get install postgresql)")?;
    let out = crate::process::output(
        Command::new("id").args(["-g", "postgres"]),
        Duration::from_secs(10),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let gid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("reading the postgres group")?;
    Ok(Some((uid, gid)))
}

fn as_server_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After setuid, which clears it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            Ok(())
        });
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Clusters left by test processes that are gone.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("viva-pg-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
