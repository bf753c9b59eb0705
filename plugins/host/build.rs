//! Builds the guest plugins in `plugins/guests` for `wasm32-wasip2` with a
//! nested cargo, so a normal `cargo build` of Viva embeds the default plugin
//! with no manual step.
//!
//! The nested build has its own target directory (beside the outer one, so
//! `cargo build`, `cargo clippy` and `cargo test` share it and it is not
//! rebuilt per profile) and therefore its own build lock: it cannot deadlock
//! on the outer cargo's lock. Everything the outer cargo sets for build
//! scripts or for clippy (`RUSTC_WORKSPACE_WRAPPER`, `RUSTFLAGS`,
//! `CARGO_ENCODED_RUSTFLAGS`, `CARGO_FEATURE_*`, …) is removed so host flags
//! and lints do not leak into the wasm build.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
/// The components copied to OUT_DIR: the shipped plugins, the test-only
/// `hostile` plugin, and the template (built so it is known to compile).
const GUESTS: &[&str] = &[
    "weighted_criteria",
    "holistic_band",
    "hostile",
    "my_rubric_plugin",
];

fn main() {
    if let Err(e) = run() {
        println!("cargo::error={e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let plugins = manifest_dir
        .parent()
        .ok_or("plugins/host has no parent directory")?
        .to_path_buf();
    let guests = plugins.join("guests");
    for p in [
        guests.join("Cargo.toml"),
        guests.join("Cargo.lock"),
        guests.join("weighted-criteria"),
        guests.join("holistic-band"),
        guests.join("hostile"),
        plugins.join("sdk"),
        plugins.join("wit"),
        plugins.join("template/Cargo.toml"),
        plugins.join("template/Cargo.lock"),
        plugins.join("template/src"),
    ] {
        println!("cargo::rerun-if-changed={}", p.display());
    }
    println!("cargo::rerun-if-env-changed=VIVA_GUEST_TARGET_DIR");

    let target_dir = match std::env::var_os("VIVA_GUEST_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => guest_target_dir(&out_dir),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    ensure_target()?;

    // The guests, then the template: same target directory and profile, so
    // the template reuses the guests' compiled dependencies.
    for (what, dir) in [
        ("the guest plugins (plugins/guests)", guests.clone()),
        (
            "the plugin template (plugins/template)",
            plugins.join("template"),
        ),
    ] {
        cargo_build(&cargo, &dir, &target_dir, what)?;
    }
    let built = target_dir.join(TARGET).join("release");
    for name in GUESTS {
        let from = built.join(format!("{name}.wasm"));
        let to = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&from, &to)
            .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    }
    Ok(())
}

fn cargo_build(
    cargo: &std::ffi::OsStr,
    dir: &Path,
    target_dir: &Path,
    what: &str,
) -> Result<(), String> {
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if dir.join("Cargo.lock").exists() {
        cmd.arg("--locked");
    }
    scrub_env(&mut cmd);
    // Cargo reads a build script's stdout for directives: keep the nested
    // cargo's output on stderr.
    cmd.stdout(std::io::stderr());
    let status = cmd
        .status()
        .map_err(|e| format!("running {cargo:?} for {what}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building {what} for {TARGET} failed ({status}); the compiler's messages are above. \
             To reproduce: cargo build --release --target {TARGET} --manifest-path {}",
            dir.join("Cargo.toml").display()
        ));
    }
    Ok(())
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

/// `<outer target dir>/wasm-guests`, found from
/// `OUT_DIR = <target>/<profile>/build/viva-plugins-<hash>/out`.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    let mut up = out_dir.ancestors();
    let build = up.nth(2);
    match (build, up.nth(1)) {
        (Some(b), Some(target)) if b.file_name().is_some_and(|n| n == "build") => {
            target.join("wasm-guests")
        }
        _ => out_dir.join("wasm-guests"),
    }
}

/// Makes sure the standard library for the guest target is installed, adding
/// it with rustup when the toolchain came from rustup.
fn ensure_target() -> Result<(), String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("running {rustc:?} --print sysroot: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).exists() {
        return Ok(());
    }
    println!("cargo::warning=the {TARGET} target is missing; running `rustup target add {TARGET}`");
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]);
    if let Some(toolchain) = std::env::var_os("RUSTUP_TOOLCHAIN") {
        add.arg("--toolchain").arg(toolchain);
    }
    match add.status() {
        Ok(s) if s.success() => Ok(()),
        _ => Err(format!(
            "the Rust standard library for {TARGET} is not installed and `rustup target add {TARGET}` \
             did not work: install it (scripts/test and scripts/demo do this), then build again"
        )),
    }
}

/// Removes what the outer cargo (or clippy, or a coverage tool) set, so the
/// nested build starts from the user's plain environment.
fn scrub_env(cmd: &mut Command) {
    const EXACT: &[&str] = &[
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_BUILD_DIR",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "RUSTC_LINKER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "__CARGO_FIX_PLZ",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_FEATURE_",
        "CARGO_CFG_",
        "CARGO_PKG_",
        "CARGO_PROFILE_",
        "DEP_",
        "CARGO_LLVM_COV",
    ];
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if EXACT.contains(&k) || PREFIXES.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
}
