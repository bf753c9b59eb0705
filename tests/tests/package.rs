//! The Debian package, end to end without installing it: `scripts/package
//! --debug --no-build` packages this build's binaries with cargo-deb; the
//! test unpacks the .deb into a throwaway root (`dpkg-deb -x`), checks its
//! files, control data and the unit's hardening, has `systemd-analyze
//! verify` accept the unit, and runs the packaged `viva doctor` on a
//! configuration with the test models (every check ok), then on a broken one
//! (each fault its own failing line with its fix).
//!
//! Skips (saying so) without cargo-deb or dpkg-deb unless
//! `VIVA_REQUIRE_PACKAGE` is set, as `scripts/test` does after installing
//! cargo-deb. `systemd-analyze verify` is skipped with a message where
//! systemd's tools are missing. Needs the real models (`viva models
//! fetch`, see tests/src/real.rs) and the worker binaries that `cargo test
//! --workspace` builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use viva_tests::bin_dir;
use viva_tests::process::{self, clean_viva_env, output, text};
use viva_tests::real::{EVALUATOR_A_MODEL, EVALUATOR_B_MODEL, WHISPER_MODEL, model};

fn required() -> bool {
    std::env::var_os("VIVA_REQUIRE_PACKAGE").is_some()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// cargo-deb and dpkg-deb, or `false` (skip, saying what is missing).
fn tools_present() -> bool {
    let mut missing = Vec::new();
    let deb = output(
        Command::new("cargo").args(["deb", "--version"]),
        Duration::from_secs(30),
    );
    if !deb.is_ok_and(|o| o.status.success()) {
        missing.push("cargo-deb (cargo install cargo-deb --locked; scripts/test installs it)");
    }
    if !Path::new("/usr/bin/dpkg-deb").exists() {
        missing.push("dpkg-deb (apt-get install dpkg)");
    }
    if missing.is_empty() {
        return true;
    }
    if required() {
        panic!("the package test needs: {}", missing.join(", "));
    }
    eprintln!("SKIPPED: missing {}", missing.join(", "));
    false
}

/// Runs `cmd` (at most `timeout`), asserting success; returns stdout.
fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let what = process::describe(cmd);
    let o = output(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}",
        o.status,
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `[Service]` settings of a unit file, in order.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

/// A configuration for the unpacked tree: its workers on the test models.
fn config(root: &Path, data: &Path, extra_top: &str, stt_model: &Path) -> String {
    let bin = root.join("usr/bin");
    format!(
        r#"data_dir = "{data}"
listen = "127.0.0.1:0"
{extra_top}

[intake]
min_free_bytes = 67108864

[workers.stt]
command = "{bin}/viva-whisper-worker"
model = "whisper-tiny.en"
model_path = "{stt}"
memory_mb = 320
options = {{ threads = 1 }}

[workers.evaluators.a]
command = "{bin}/viva-llama-worker"
model = "smollm2-135m-instruct"
model_path = "{a}"
memory_mb = 180
options = {{ threads = 1 }}

[workers.evaluators.b]
command = "{bin}/viva-llama-worker"
model = "gemma-3-270m"
model_path = "{b}"
memory_mb = 360
options = {{ threads = 1, template = "chatml" }}
"#,
        data = data.display(),
        bin = bin.display(),
        stt = stt_model.display(),
        a = model(EVALUATOR_A_MODEL).display(),
        b = model(EVALUATOR_B_MODEL).display(),
    )
}

/// Runs the packaged `viva doctor --json`; returns (exit code, report).
fn doctor(viva: &Path, config: &Path, path_env: Option<&str>, extra: &[&str]) -> (i32, Value) {
    let mut cmd = Command::new(viva);
    clean_viva_env(&mut cmd)
        .arg("--config")
        .arg(config)
        .args(["doctor", "--json"])
        .args(extra);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let o = output(&mut cmd, process::SHORT).unwrap_or_else(|e| panic!("{e}"));
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}):\n{}", text(&o)));
    (o.status.code().unwrap_or(-1), report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

#[test]
fn the_debian_package_installs_a_hardened_service_and_its_doctor_finds_each_fault() {
    if !tools_present() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("deb");

    // 1. scripts/package on this build's binaries (no second build).
    let target = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .expect("target dir");
    let started = std::time::Instant::now();
    let printed = run_ok(
        clean_viva_env(&mut Command::new(repo().join("scripts/package")))
            .args(["--debug", "--no-build", "--out"])
            .arg(&out)
            .env("CARGO_TARGET_DIR", &target),
        Duration::from_secs(300),
    );
    let deb = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    assert!(
        deb.is_file() && deb.extension().is_some_and(|e| e == "deb"),
        "scripts/package printed {printed:?}"
    );
    eprintln!(
        "packaged {} ({} MB) in {:.1} s",
        deb.display(),
        std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0) / 1_000_000,
        started.elapsed().as_secs_f64()
    );

    // 2. Unpacked into a throwaway root: the file list.
    let root = tmp.path().join("root");
    run_ok(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        Duration::from_secs(120),
    );
    let unit_path = root.join("usr/lib/systemd/system/viva.service");
    for (file, executable) in [
        ("usr/bin/viva", true),
        ("usr/bin/viva-whisper-worker", true),
        ("usr/bin/viva-llama-worker", true),
        ("usr/bin/viva-remote-worker", true),
        ("etc/viva/viva.toml", false),
        ("usr/lib/systemd/system/viva.service", false),
        ("usr/share/doc/viva/deploy.md", false),
        ("usr/share/doc/viva/README.md", false),
        ("usr/share/doc/viva/viva.example.toml", false),
        ("usr/share/doc/viva/copyright", false),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let p = root.join(file);
        let meta =
            std::fs::metadata(&p).unwrap_or_else(|e| panic!("{file} is not in the package: {e}"));
        assert!(meta.is_file(), "{file}");
        assert_eq!(
            meta.permissions().mode() & 0o111 != 0,
            executable,
            "{file}: mode {:o}",
            meta.permissions().mode()
        );
    }

    // Control data: ffmpeg is a dependency, the configuration a conffile,
    // and the postinst makes the user and runs the migrations.
    let depends = run_ok(
        Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"),
        Duration::from_secs(30),
    );
    assert!(depends.contains("ffmpeg"), "Depends: {depends}");
    let control = tmp.path().join("control");
    run_ok(
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        Duration::from_secs(30),
    );
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert!(
        conffiles.lines().any(|l| l == "/etc/viva/viva.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).expect("postinst");
    for needle in [
        "adduser --system",
        "install -d -o viva -g viva -m 0700 /var/lib/viva",
        "migrate",
        "deb-systemd-helper enable viva.service",
    ] {
        assert!(
            postinst.contains(needle),
            "postinst lacks {needle:?}:\n{postinst}"
        );
    }

    // 3. The unit's hardening.
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    let settings = service_settings(&unit);
    let get = |k: &str| {
        settings
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the unit has no {k}=\n{unit}"))
    };
    assert_eq!(get("User"), "viva");
    assert_eq!(get("ProtectSystem"), "strict");
    assert_eq!(get("ReadWritePaths"), "/var/lib/viva");
    assert_eq!(get("NoNewPrivileges"), "yes");
    assert_eq!(get("PrivateTmp"), "yes");
    assert_eq!(get("ProtectHome"), "yes");
    assert_eq!(get("UMask"), "0077");
    assert_eq!(get("Restart"), "on-failure");
    assert_eq!(get("CapabilityBoundingSet"), "");
    assert_eq!(
        get("ExecStart"),
        "/usr/bin/viva --config /etc/viva/viva.toml serve"
    );

    // 4. systemd-analyze verify, against the unpacked binary.
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if analyze.exists() {
        let dir = tmp.path().join("unit");
        std::fs::create_dir_all(&dir).expect("dir");
        let local = dir.join("viva.service");
        let packaged_viva = root.join("usr/bin/viva");
        std::fs::write(
            &local,
            unit.replace(
                "ExecStart=/usr/bin/viva ",
                &format!("ExecStart={} ", packaged_viva.display()),
            ),
        )
        .expect("write unit");
        let o = output(
            Command::new(analyze).arg("verify").arg(&local),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // verify exits 0 on unknown keys and bad values, printing them.
        assert!(
            o.status.success() && o.stderr.is_empty() && o.stdout.is_empty(),
            "systemd-analyze verify:\n{}",
            text(&o)
        );
        eprintln!("systemd-analyze verify accepts the unit");
    } else {
        eprintln!(
            "SKIPPED systemd-analyze verify: /usr/bin/systemd-analyze is missing (apt-get install systemd)"
        );
    }

    // 5. The packaged viva on the test models: every check ok.
    let viva = root.join("usr/bin/viva");
    let data = tmp.path().join("data");
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        config(
            &root,
            &data,
            "public_url = \"https://localhost\"",
            &model(WHISPER_MODEL),
        ),
    )
    .expect("write");
    run_ok(
        clean_viva_env(&mut Command::new(&viva))
            .arg("--config")
            .arg(&good)
            .arg("migrate"),
        process::SHORT,
    );
    let started = std::time::Instant::now();
    let (code, report) = doctor(&viva, &good, None, &[]);
    eprintln!(
        "viva doctor (models loaded) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lines: Vec<String> = report["checks"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| format!("{} {}: {}", c["status"], c["name"], c["summary"]))
                .collect()
        })
        .unwrap_or_default();
    eprintln!("{}", lines.join("\n"));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    for c in report["checks"].as_array().expect("checks") {
        assert_eq!(c["status"], "ok", "{c}");
    }
    for name in [
        "config",
        "sandbox",
        "public_url",
        "data_dir",
        "disk",
        "database",
        "ffmpeg",
        "platforms",
        "clock",
        "keys",
        "plugins",
    ] {
        check(&report, name);
    }
    for w in ["worker:stt", "worker:a", "worker:b"] {
        let c = check(&report, w);
        assert!(c["details"]["load_ms"].is_u64(), "{c}");
        assert!(
            c["details"]["peak_rss_bytes"]
                .as_u64()
                .is_some_and(|b| b > 0),
            "{c}"
        );
    }

    // 6. Broken: a model path that does not exist, no ffmpeg on PATH, the
    // sandbox left on, plain http. Each is its own failing line with a fix;
    // the rest still passes.
    let broken = tmp.path().join("broken.toml");
    std::fs::write(
        &broken,
        config(
            &root,
            &data,
            "public_url = \"http://viva.example.edu\"\n[sandbox]\nenabled = true",
            &tmp.path().join("models/nope.bin"),
        ),
    )
    .expect("write");
    let empty = tmp.path().join("empty-path");
    std::fs::create_dir_all(&empty).expect("dir");
    let no_ffmpeg = empty.display().to_string();
    let (code, report) = doctor(&viva, &broken, Some(&no_ffmpeg), &["--no-load"]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    for (name, says, fix) in [
        ("worker:stt", "nope.bin", "model_path under [workers.stt]"),
        ("ffmpeg", "cannot run", "apt install ffmpeg"),
        ("sandbox", "sandbox course is on", "enabled = false"),
        ("public_url", "not https", "https://"),
    ] {
        let c = check(&report, name);
        assert_eq!(c["status"], "fail", "{c}");
        assert!(
            c["summary"].as_str().is_some_and(|s| s.contains(says)),
            "{c}"
        );
        assert!(c["fix"].as_str().is_some_and(|f| f.contains(fix)), "{c}");
    }
    let failing: Vec<&str> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["status"] == "fail")
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        failing,
        ["sandbox", "public_url", "ffmpeg", "worker:stt"],
        "{report:#}"
    );

    // The same as text: one FAIL line each, its fix below it.
    let mut cmd = Command::new(&viva);
    clean_viva_env(&mut cmd)
        .arg("--config")
        .arg(&broken)
        .args(["doctor", "--no-load"])
        .env("PATH", &no_ffmpeg);
    let o = output(&mut cmd, process::SHORT).unwrap_or_else(|e| panic!("{e}"));
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{shown}");
    assert_eq!(o.status.code(), Some(1), "{shown}");
    let fail_lines: Vec<&str> = shown.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail_lines.len(), 4, "{shown}");
    assert_eq!(shown.matches('→').count(), 4, "{shown}");

    // 7. The packaged /etc/viva/viva.toml parses and keeps the sandbox off;
    // until public_url is set and the models are fetched, doctor says so.
    let (code, report) = doctor(
        &viva,
        &root.join("etc/viva/viva.toml"),
        None,
        &["--no-load"],
    );
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "config")["status"], "ok", "{report:#}");
    assert_eq!(check(&report, "sandbox")["status"], "ok", "{report:#}");
    let p = check(&report, "public_url");
    assert_eq!(p["status"], "fail", "{p}");
    assert!(
        p["summary"].as_str().is_some_and(|s| s.contains("not set")),
        "{p}"
    );
    // An unknown key: the file and the line.
    let typo = tmp.path().join("typo.toml");
    std::fs::write(
        &typo,
        "data_dir = \"/tmp\"\n[scheduler]\nstt_batchsize = 5\n",
    )
    .expect("write");
    let (code, report) = doctor(&viva, &typo, None, &[]);
    assert_eq!(code, 1);
    let c = check(&report, "config");
    assert!(
        c["summary"].as_str().is_some_and(
            |s| s.contains(&format!("{}:3", typo.display())) && s.contains("stt_batchsize")
        ),
        "{c}"
    );
}

/// The README's "Install on a server": four commands or fewer, the first
/// installing the package this repository builds.
#[test]
fn the_readme_installs_on_a_server_in_four_commands_or_fewer() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Install on a server"))
        .expect("README has an \"Install on a server\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in the section");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .flat_map(|l| l.split("&&").flat_map(|c| c.split(';')))
        .map(str::trim)
        .collect();
    assert!(
        !commands.is_empty() && commands.len() <= 4,
        "{} commands: {commands:?}",
        commands.len()
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        commands[0],
        format!("sudo apt install ./viva_{version}-1_amd64.deb"),
        "the README installs the package scripts/package builds"
    );
}
