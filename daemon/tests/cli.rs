//! The `viva` binary's command line: configuration errors, migrations,
//! sessions, serve/status/submit, and one daemon per data directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn viva(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_viva"))
        .current_dir(dir)
        .env_remove("VIVA_DATA_DIR")
        .env_remove("VIVA_LISTEN")
        .args(args)
        .output()
        .expect("run viva")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
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
    let o = Command::new(env!("CARGO_BIN_EXE_viva"))
        .current_dir(dir.path())
        .env("VIVA_SCHEDULER__NOPE", "1")
        .args(["--config", "/dev/null", "migrate"])
        .output()
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, port: u16) -> Serve {
    Serve(
        Command::new(env!("CARGO_BIN_EXE_viva"))
            .current_dir(dir)
            .env("VIVA_LISTEN", format!("127.0.0.1:{port}"))
            .env("VIVA_DATA_DIR", "var")
            .args(["serve", "--sandbox"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve"),
    )
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "viva serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_status_submit_and_one_daemon_per_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _daemon = serve(dir.path(), port);
    wait_port(port);
    let url = format!("http://127.0.0.1:{port}");

    // A second daemon on the same data directory is refused, clearly.
    let second = Command::new(env!("CARGO_BIN_EXE_viva"))
        .current_dir(dir.path())
        .env("VIVA_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("VIVA_DATA_DIR", "var")
        .arg("serve")
        .output()
        .expect("second");
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
    let made = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=1",
        ])
        .arg(&wav)
        .status()
        .expect("ffmpeg (install it: scripts/test does)");
    assert!(made.success());
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
