//! The on-disk cache of compiled plugins.
//!
//! A compiled artifact is native code for this machine and this engine
//! configuration. Files are named `<component sha256>-<engine hash>.cwasm`,
//! where the engine hash digests wasmtime's compatibility hash (its version,
//! the target CPU features and every setting that changes code), so a
//! restart loads in milliseconds instead of recompiling, while an upgraded
//! Viva or a different machine compiles afresh (stale files are harmless and
//! can be deleted at any time). Files are written to a temporary name and
//! renamed, so a crash never leaves a half-written artifact behind.
//!
//! Loading an artifact trusts it (it is native code): the directory belongs
//! to the daemon (mode 0700) and only the daemon writes it.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::{Error, Result};

/// A directory of compiled artifacts for one engine configuration.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    engine_hash: String,
}

/// A short, stable digest of the engine's compatibility hash.
pub(crate) fn engine_hash(engine: &Engine) -> String {
    // SipHash with fixed keys: identical for identical builds and settings,
    // which is all a cache key needs (a mismatch only costs a recompile).
    let mut h = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

impl ArtifactCache {
    pub fn open(dir: &Path, engine: &Engine) -> Result<ArtifactCache> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!(
            "creating the plugin cache directory {}",
            dir.display()
        )))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            engine_hash: engine_hash(engine),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact for a component with this sha256 lives.
    pub fn path_for(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    /// The cached component, if a usable artifact exists. A file that fails
    /// to load (truncated, from another build) is removed.
    pub fn load(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path_for(sha256);
        // Read into memory rather than mapping the file: a mapped file that
        // someone truncates in place would crash the daemon (SIGBUS).
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: only this daemon writes the cache directory (see the module
        // docs), and wasmtime checks the header and compatibility hash.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "discarding an unusable cached plugin");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Saves an artifact; failures only cost a recompile later, so they are
    /// logged, not returned.
    pub fn store(&self, sha256: &str, artifact: &[u8]) {
        let path = self.path_for(sha256);
        let tmp = self.dir.join(format!(
            ".{sha256}.{}.{}.tmp",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let written = std::fs::write(&tmp, artifact).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), error = %e, "could not cache a compiled plugin");
        }
    }
}
