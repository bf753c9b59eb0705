//! The `viva` binary's command line: configuration errors, migrations,
//! sessions, serve/status/submit, and one daemon per data directory.
//!
//! Every `viva` here runs through viva_test_process: with a deadline, and
//! killed on timeout; a daemon's log is printed when its test fails.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use viva_test_process::{Daemon, SHORT, STARTUP, clean_viva_env, output, text};

/// `viva` in `dir`, with no `VIVA_*` variable from the caller's environment.
fn viva_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_viva"));
    cmd.current_dir(dir);
    clean_viva_env(&mut cmd);
    cmd
}

fn viva(dir: &Path, args: &[&str]) -> Output {
    output(viva_cmd(dir).args(args), SHORT).expect("run viva")
}

#[test]
fn migrate_is_idempotent_and_refuses_a_newer_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = viva(dir.path(), &["--data-dir", "var", "migrate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("schema version"));
    let o = viva(dir.path(), &["--data-dir", "var", "migrate"]);
    assert!(o.status.success(), "{}", text(&o));
    let db = rusqlite::Connection::open(dir.path().join("var/viva.db")).expect("db");
    db.execute("INSERT INTO schema_version VALUES (999, 0)", [])
        .expect("bump");
    drop(db);
    let o = viva(dir.path(), &["--data-dir", "var", "migrate"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("newer than this viva"), "{}", text(&o));
}

#[test]
fn unknown_configuration_keys_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("viva.toml"),
        "[scheduler]\nbatch_windw = \"1m\"\n",
    )
    .expect("write");
    let o = viva(dir.path(), &["migrate"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("batch_windw"), "{}", text(&o));
    let o = output(
        viva_cmd(dir.path()).env("VIVA_SCHEDULER__NOPE", "1").args([
            "--config",
            "/dev/null",
            "migrate",
        ]),
        SHORT,
    )
    .expect("run");
    assert!(!o.status.success());
    assert!(text(&o).contains("nope"), "{}", text(&o));
}

#[test]
fn session_mints_a_token_and_keeps_the_key_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = viva(dir.path(), &["--data-dir", "var", "migrate"]);
    assert!(o.status.success());
    let o = viva(
        dir.path(),
        &[
            "--data-dir",
            "var",
            "session",
            "--role",
            "instructor",
            "--user",
            "t1",
            "--context",
            "bio-101",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let mode = std::fs::metadata(dir.path().join("var/keys/session.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let o = viva(
        dir.path(),
        &[
            "--data-dir",
            "var",
            "session",
            "--role",
            "pope",
            "--user",
            "x",
            "--context",
            "c",
        ],
    );
    assert!(!o.status.success(), "unknown roles are refused");
}

/// `viva serve --sandbox` on data directory `var` in `dir`, on a port of
/// its own choosing.
fn serve(dir: &Path) -> Daemon {
    Daemon::start(
        viva_cmd(dir)
            .env("VIVA_DATA_DIR", "var")
            .args(["serve", "--sandbox"]),
        STARTUP,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn serve_status_submit_and_one_daemon_per_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = serve(dir.path());
    let url = daemon.url();

    // A second daemon on the same data directory is refused, clearly.
    let second = output(
        viva_cmd(dir.path())
            .env("VIVA_LISTEN", "127.0.0.1:0")
            .env("VIVA_DATA_DIR", "var")
            .arg("serve"),
        // A refusal is immediate; a second daemon that starts anyway fails
        // the test here instead of hanging it.
        Duration::from_secs(30),
    )
    .expect("the second daemon is refused, not left running");
    assert!(!second.status.success());
    assert!(
        text(&second).contains("another viva daemon"),
        "{}",
        text(&second)
    );

    let o = viva(dir.path(), &["--data-dir", "var", "status", "--url", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("phase"), "{}", text(&o));

    let wav = dir.path().join("answer.wav");
    let made = output(
        Command::new("ffmpeg")
            .args([
                "-nostdin",
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                "sine=duration=1",
            ])
            .arg(&wav),
        SHORT,
    )
    .expect("ffmpeg (install it: scripts/test does)");
    assert!(made.status.success(), "{}", text(&made));
    let o = viva(
        dir.path(),
        &[
            "--data-dir",
            "var",
            "submit",
            "--url",
            &url,
            "--no-follow",
            wav.to_str().expect("utf-8 path"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(id.starts_with("sub_"), "{}", text(&o));

    // A bad file gets the server's reason, not a stack trace.
    let bad = dir.path().join("notes.mp4");
    std::fs::write(&bad, "not a video").expect("write");
    let o = viva(
        dir.path(),
        &[
            "--data-dir",
            "var",
            "submit",
            "--url",
            &url,
            bad.to_str().expect("utf-8 path"),
        ],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("not_media"), "{}", text(&o));
}

#[test]
fn a_daemon_that_cannot_start_fails_fast_with_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No directory can be made under /dev/null, not even by root.
    let started = Instant::now();
    let err = Daemon::start(
        viva_cmd(dir.path()).args(["--data-dir", "/dev/null/var", "serve", "--sandbox"]),
        STARTUP,
    )
    .err()
    .expect("viva serve on an impossible data directory must fail");
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(
        took < Duration::from_secs(10),
        "failed after {took:?}, not at once: {msg}"
    );
    assert!(msg.contains("before it was ready"), "{msg}");
    // The daemon's own stderr, not just "it exited".
    assert!(msg.contains("creating /dev/null/var"), "{msg}");
}
