//! Media intake: receives a student's upload, checks it and normalises its audio.
//!
//! [`receive`] streams the upload body to a fresh staging directory (never holding the
//! whole file in memory), hashing it and enforcing the size limit as the bytes arrive.
//! It then probes the file with `ffprobe` and decodes its first audio track with
//! `ffmpeg` into a 16 kHz mono 16-bit PCM WAV, which is what the speech models consume.
//! The result is a [`StagedMedia`]: the caller moves it into its final place with
//! [`StagedMedia::commit`]; dropping it instead deletes everything staged.
//!
//! Any failure removes the staging directory before the error is returned, so nothing
//! half-written is ever left behind.
//!
//! Security: both tools run with `-protocol_whitelist file` and a demuxer whitelist of
//! the containers we accept, so a crafted upload (an HLS playlist, a concat script, …)
//! cannot make them read other files or the network. The staged file has no extension
//! while it is probed, so ffmpeg's format detection looks at the bytes only.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};

use crate::slots::{Full, Slot, Slots};

/// Name of the staged original while it is received and probed (no extension on purpose:
/// ffmpeg must detect the container from its bytes, not from a name the client chose).
const ORIGINAL_STEM: &str = "original";
/// Name of the normalised audio inside the staging (and final) directory.
const WAV_NAME: &str = "audio.wav";
/// Prefix of every staging directory created under the staging root.
const STAGING_PREFIX: &str = "intake-";
/// The only demuxers ffprobe/ffmpeg may use on an upload (mp4/mov/m4a, mkv/webm, wav,
/// ogg/opus, flac, mp3).
const DEMUXER_WHITELIST: &str = "mov,matroska,wav,ogg,flac,mp3";
/// File extensions we tell students we accept.
const ACCEPTED_EXTENSIONS: &[&str] = &[
    "mp4", "webm", "mov", "mkv", "wav", "mp3", "m4a", "ogg", "opus", "flac",
];
/// 16 000 samples/s × 1 channel × 2 bytes.
const WAV_BYTES_PER_SECOND: f64 = 32_000.0;
/// Size of the canonical WAV header ffmpeg writes with `-bitexact`.
const WAV_HEADER_LEN: u64 = 44;
/// Bytes kept from the start of the upload for signature detection.
const HEAD_LEN: usize = 64;
/// While streaming, re-check free disk space after every this many bytes.
const SPACE_CHECK_INTERVAL: u64 = 64 * 1024 * 1024;
/// Write buffer between the body stream and the staging file.
const WRITE_BUFFER: usize = 256 * 1024;
/// Most ffprobe JSON we keep (more means a pathological file; parsing then fails).
const STDOUT_CAP: usize = 8 * 1024 * 1024;
/// Tail of a tool's stderr we keep for error details.
const STDERR_TAIL: usize = 64 * 1024;
/// Longest error detail we pass on.
const DETAIL_MAX_CHARS: usize = 300;
/// A decoded length below this fraction of the declared length (and more than
/// [`TRUNCATION_MIN_MISSING_SECS`] short) means the file was cut off.
const TRUNCATION_RATIO: f64 = 0.9;
const TRUNCATION_MIN_MISSING_SECS: f64 = 1.0;
/// A recording whose loudest 100 ms is quieter than this (dB below full
/// scale) has nothing to hear: a muted or unplugged microphone. Speech sits
/// around -35 to -15 dBFS; a quiet room's noise floor around -60 dBFS.
const SILENCE_DBFS: f64 = -50.0;
/// Samples per loudness window (100 ms at 16 kHz).
const LOUDNESS_WINDOW: usize = 1600;

/// Limits and tool locations for intake.
#[derive(Debug, Clone)]
pub struct IntakeLimits {
    /// Largest accepted upload, in bytes (default 2 GiB).
    pub max_upload_bytes: u64,
    /// Longest accepted recording (default 30 min).
    pub max_duration: Duration,
    /// Uploads are refused when the staging filesystem has less than this free (default 1 GiB).
    pub min_free_bytes: u64,
    /// The ffmpeg binary (default `ffmpeg`, looked up on `PATH`).
    pub ffmpeg: PathBuf,
    /// The ffprobe binary (default `ffprobe`, looked up on `PATH`).
    pub ffprobe: PathBuf,
    /// Time limit for each ffprobe/ffmpeg run (default 10 min).
    pub timeout: Duration,
    /// Preview transcodes at once over all submissions (default 2).
    pub preview_concurrency: usize,
    /// Uploads one user may send at once (default 2; 0 = no limit).
    pub max_uploads_per_user: usize,
    /// Uploads received at once over all users (default 32; 0 = no limit).
    pub max_uploads_in_flight: usize,
    /// An upload that sends nothing for this long is cut (default 60 s; 0 = never).
    pub body_idle_timeout: Duration,
}

/// The defaults of `[intake]` (the configuration owns them).
impl Default for IntakeLimits {
    fn default() -> Self {
        IntakeLimits::from(&crate::config::IntakeConfig::default())
    }
}

impl From<&crate::config::IntakeConfig> for IntakeLimits {
    fn from(c: &crate::config::IntakeConfig) -> Self {
        IntakeLimits {
            max_upload_bytes: c.max_upload_bytes,
            max_duration: c.max_duration,
            min_free_bytes: c.min_free_bytes,
            ffmpeg: c.ffmpeg.clone(),
            ffprobe: c.ffprobe.clone(),
            timeout: c.normalize_timeout,
            preview_concurrency: c.preview_concurrency,
            max_uploads_per_user: c.max_uploads_per_user,
            max_uploads_in_flight: c.max_uploads_in_flight,
            body_idle_timeout: c.body_idle_timeout,
        }
    }
}

/// What the client told us about the upload (all optional).
#[derive(Debug, Clone, Default)]
pub struct UploadHint {
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
}

/// Facts from probing.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MediaInfo {
    /// ffprobe's `format_name`, e.g. `"mov,mp4,m4a,3gp,3g2,mj2"`.
    pub container: String,
    /// Length of the decoded 16 kHz WAV, in seconds.
    pub duration_seconds: f64,
    /// Whether there is a real video track (cover art in audio files does not count).
    pub has_video: bool,
    pub audio_codec: Option<String>,
    pub video_codec: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// A fully received, probed and normalised upload sitting in a staging dir.
/// Dropping it without [`commit`](StagedMedia::commit) deletes the staging dir.
#[derive(Debug)]
pub struct StagedMedia {
    /// Lowercase hex sha256 of the original bytes.
    pub sha256: String,
    /// Size of the original upload in bytes.
    pub size_bytes: u64,
    /// The client's file name without any path components, if it sent a usable one.
    pub original_name: Option<String>,
    /// Lowercase extension derived from the detected container (and file name), e.g.
    /// `"mp4"`, `"wav"`, `"webm"`; `"bin"` if unknown.
    pub extension: String,
    pub info: MediaInfo,
    original: PathBuf,
    wav: PathBuf,
    guard: StagingGuard,
}

/// Where a committed upload ended up.
#[derive(Debug, Clone)]
pub struct CommittedMedia {
    pub dir: PathBuf,
    pub original: PathBuf,
    pub wav: PathBuf,
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the upload is empty")]
    Empty,
    #[error("the upload exceeds the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error(
        "this is not an audio or video file we recognise; upload mp4, webm, mov, mkv, wav, mp3, m4a, ogg, opus or flac"
    )]
    NotMedia,
    #[error(
        "the file has no audio track: nothing to transcribe; record again with the microphone on"
    )]
    NoAudio,
    #[error(
        "nothing can be heard in the recording (even its loudest moment is {db_below_full_scale:.0} dB below full scale): check that the microphone is on and not muted, then record again"
    )]
    Silent { db_below_full_scale: f64 },
    #[error(
        "the recording is {seconds:.0} seconds long, more than the {limit_seconds:.0}-second limit; record a shorter answer (or trim this one) and upload it again"
    )]
    TooLong { seconds: f64, limit_seconds: f64 },
    #[error(
        "the file is damaged or incomplete and cannot be played ({detail}); check that the recording finished saving, then upload it again"
    )]
    Undecodable { detail: String },
    #[error(
        "processing the file took longer than {seconds} seconds and was stopped; try again, or upload a shorter recording in a common format such as mp4 or mp3"
    )]
    Timeout { seconds: u64 },
    #[error(
        "the server is running out of storage space and cannot accept uploads right now; try again later, and tell your instructor if this keeps happening"
    )]
    DiskFull { free_bytes: u64 },
    #[error("you already have {limit} uploads in progress; wait for one to finish, then try again")]
    TooManyUploads { limit: usize, retry_after_secs: u64 },
    #[error("the server is receiving many uploads right now; try again in a few seconds")]
    IntakeBusy { retry_after_secs: u64 },
    #[error(
        "you have uploaded {used_mib} MiB in the last 24 hours, the daily limit is {limit_mib} MiB; try again later"
    )]
    DailyQuota {
        used_mib: u64,
        limit_mib: u64,
        retry_after_secs: u64,
    },
    #[error("the upload was interrupted: {0}")]
    Interrupted(String),
    #[error(
        "the upload stopped: nothing arrived for {seconds} seconds; check your connection and upload again"
    )]
    Stalled { seconds: u64 },
    #[error(
        "the server cannot process audio or video because its media tools are missing ({0}); an administrator must install ffmpeg (apt-get install ffmpeg)"
    )]
    ToolMissing(String),
    #[error("intake I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl IntakeError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "empty_upload",
            Self::TooLarge { .. } => "too_large",
            Self::NotMedia => "not_media",
            Self::NoAudio => "no_audio",
            Self::Silent { .. } => "no_speech",
            Self::TooLong { .. } => "too_long",
            Self::Undecodable { .. } => "undecodable",
            Self::Timeout { .. } => "processing_timeout",
            Self::DiskFull { .. } => "insufficient_storage",
            Self::TooManyUploads { .. } => "too_many_uploads",
            Self::IntakeBusy { .. } => "intake_busy",
            Self::DailyQuota { .. } => "daily_quota",
            Self::Interrupted(_) => "upload_interrupted",
            Self::Stalled { .. } => "upload_stalled",
            Self::ToolMissing(_) => "media_tools_missing",
            Self::Io(_) => "internal",
        }
    }
}

impl StagedMedia {
    /// The original upload, inside the staging dir.
    #[cfg(test)]
    pub fn original_path(&self) -> &Path {
        &self.original
    }

    /// The normalised 16 kHz mono WAV, inside the staging dir.
    #[cfg(test)]
    pub fn wav_path(&self) -> &Path {
        &self.wav
    }

    /// Deletes the staging dir now and waits for it (dropping does the same in the
    /// background).
    pub async fn discard(self) {
        self.guard.remove().await;
    }

    /// fsyncs both files, then renames the staging directory to `final_dir` (which must
    /// not exist; its parent must exist and be on the same filesystem), fsyncs the parent
    /// directory, and returns the final paths. After commit, drop does nothing. On error
    /// the staged files are deleted and nothing is left at `final_dir`.
    pub async fn commit(self, final_dir: &Path) -> Result<CommittedMedia, IntakeError> {
        let StagedMedia {
            original,
            wav,
            mut guard,
            ..
        } = self;
        let Some(staging) = guard.dir.clone() else {
            return Err(io::Error::other("staging directory already released").into());
        };
        let Some(original_name) = original.file_name().map(|n| n.to_os_string()) else {
            return Err(io::Error::other("staged original has no file name").into());
        };
        let target = final_dir.to_path_buf();
        let job = {
            let (staging, target) = (staging.clone(), target.clone());
            move || commit_blocking(&staging, &original, &wav, &target)
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(Ok(())) => {
                guard.disarm();
                Ok(CommittedMedia {
                    original: target.join(original_name),
                    wav: target.join(WAV_NAME),
                    dir: target,
                })
            }
            Ok(Err(failure)) => {
                if failure.renamed {
                    // The staging dir no longer exists; commit_blocking removed the target.
                    guard.disarm();
                } else {
                    guard.remove().await;
                }
                Err(failure.error.into())
            }
            Err(join) => {
                guard.remove().await;
                Err(io::Error::other(format!("commit task failed: {join}")).into())
            }
        }
    }
}

/// Receives an upload into a new random staging directory under `staging_root`
/// (created if missing), with a reserve of its own (tests).
#[cfg(test)]
pub async fn receive<S, E>(
    stream: S,
    hint: &UploadHint,
    limits: &IntakeLimits,
    staging_root: &Path,
) -> Result<StagedMedia, IntakeError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    receive_reserved(stream, hint, limits, staging_root, &DiskReserve::default()).await
}

/// Receives an upload into a new random staging directory under
/// `staging_root` (created if missing), with the free-space reserve shared
/// by every upload in flight: each claims the space it may write before its next check, so
/// parallel uploads never cross `min_free_bytes` together.
pub async fn receive_reserved<S, E>(
    mut stream: S,
    hint: &UploadHint,
    limits: &IntakeLimits,
    staging_root: &Path,
    reserve: &DiskReserve,
) -> Result<StagedMedia, IntakeError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    if let Some(declared) = hint.content_length
        && declared > limits.max_upload_bytes
    {
        return Err(IntakeError::TooLarge {
            limit: limits.max_upload_bytes,
        });
    }
    tokio::fs::create_dir_all(staging_root).await?;
    let free = free_bytes_async(staging_root).await?;
    let needed = limits
        .min_free_bytes
        .saturating_add(hint.content_length.unwrap_or(0))
        .saturating_add(reserve.claimed());
    if free < needed {
        return Err(IntakeError::DiskFull { free_bytes: free });
    }

    let dir = staging_root.join(format!(
        "{STAGING_PREFIX}{}",
        hex::encode(rand::random::<[u8; 16]>())
    ));
    tokio::fs::create_dir(&dir).await?;
    let guard = StagingGuard { dir: Some(dir) };
    let Some(dir) = guard.dir.as_deref() else {
        return Err(io::Error::other("staging directory vanished").into());
    };

    let mut claim = reserve.claim();
    match stage(&mut stream, hint, limits, dir, &mut claim).await {
        Ok(staged) => {
            tracing::info!(
                sha256 = %staged.sha256,
                size_bytes = staged.size_bytes,
                container = %staged.info.container,
                duration_seconds = staged.info.duration_seconds,
                has_video = staged.info.has_video,
                "upload received"
            );
            Ok(StagedMedia {
                sha256: staged.sha256,
                size_bytes: staged.size_bytes,
                original_name: staged.original_name,
                extension: staged.extension,
                info: staged.info,
                original: staged.original,
                wav: staged.wav,
                guard,
            })
        }
        Err(error) => {
            tracing::info!(code = error.code(), %error, "upload refused");
            guard.remove().await;
            Err(error)
        }
    }
}

/// Checks that ffmpeg and ffprobe can be run (for /readyz and start-up): Ok(version line
/// of ffmpeg).
pub async fn check_tools(limits: &IntakeLimits) -> Result<String, IntakeError> {
    let mut version = None;
    for program in [&limits.ffmpeg, &limits.ffprobe] {
        let args = [OsString::from("-hide_banner"), OsString::from("-version")];
        let out = run_tool(program, &args, limits.timeout, true).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().map(str::trim).find(|l| !l.is_empty());
        match (out.status.success(), first) {
            (true, Some(line)) => {
                if version.is_none() {
                    version = Some(line.to_string());
                }
            }
            _ => {
                return Err(IntakeError::ToolMissing(format!(
                    "`{} -version` failed ({})",
                    program.display(),
                    out.status
                )));
            }
        }
    }
    version.ok_or_else(|| IntakeError::ToolMissing("ffmpeg printed no version".into()))
}

/// What [`self_test`] found: ffmpeg's version line and the generated clip
/// as intake saw it.
#[derive(Debug, Clone)]
pub struct SelfTest {
    pub version: String,
    pub info: MediaInfo,
}

/// Runs a generated test clip (1.5 s of a 440 Hz tone, 44.1 kHz stereo WAV)
/// through the whole upload path under `scratch` (created, and removed
/// again): ffprobe, ffmpeg's resampling to 16 kHz mono, the length and
/// loudness checks. `viva doctor` uses it to show that uploads will decode.
pub async fn self_test(limits: &IntakeLimits, scratch: &Path) -> Result<SelfTest, IntakeError> {
    let version = check_tools(limits).await?;
    let clip = Bytes::from(test_clip());
    let hint = UploadHint {
        filename: Some("viva-doctor-tone.wav".into()),
        content_type: Some("audio/wav".into()),
        content_length: Some(clip.len() as u64),
    };
    // The free-space reserve is a check of its own (disk); this one is about
    // the tools.
    let limits = IntakeLimits {
        min_free_bytes: 0,
        ..limits.clone()
    };
    let stream = futures::stream::iter([Ok::<_, io::Error>(clip)]);
    let staged = receive_reserved(stream, &hint, &limits, scratch, &DiskReserve::default()).await;
    let result = match staged {
        Ok(staged) => {
            let info = staged.info.clone();
            staged.discard().await;
            Ok(SelfTest { version, info })
        }
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_dir_all(scratch).await;
    result
}

/// A 1.5 s 440 Hz tone at -12 dBFS, 44.1 kHz stereo s16 WAV.
fn test_clip() -> Vec<u8> {
    const RATE: u32 = 44_100;
    const CHANNELS: u16 = 2;
    let frames = RATE as usize * 3 / 2;
    let data_len = (frames * usize::from(CHANNELS) * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&CHANNELS.to_le_bytes());
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&(RATE * u32::from(CHANNELS) * 2).to_le_bytes());
    out.extend_from_slice(&(CHANNELS * 2).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    let amplitude = f64::from(i16::MAX) * 0.25;
    for i in 0..frames {
        let t = i as f64 / f64::from(RATE);
        let v = (amplitude * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
        for _ in 0..CHANNELS {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Free bytes on the filesystem holding `path` (statvfs f_bavail * f_frsize).
// The statvfs field types differ between platforms; on some they already are u64.
#[allow(clippy::unnecessary_cast)]
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c_path = c_path(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable
    // memory of the right size and alignment for a `statvfs`.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled in the struct (which was zeroed anyway).
    let stat = unsafe { stat.assume_init() };
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Removes staging directories left behind under `staging_root` (by a crash, or a drop
/// during runtime shutdown). Call at start-up, before any upload is received. Returns how
/// many were removed; a missing root counts as empty.
pub async fn clear_staging(staging_root: &Path) -> std::io::Result<usize> {
    let mut entries = match tokio::fs::read_dir(staging_root).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    while let Some(entry) = entries.next_entry().await? {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
            && entry.file_type().await?.is_dir()
        {
            tokio::fs::remove_dir_all(entry.path()).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------------------
// Staging directory lifetime
// ---------------------------------------------------------------------------------------

/// Owns a staging directory and deletes it unless disarmed.
#[derive(Debug)]
struct StagingGuard {
    dir: Option<PathBuf>,
}

impl StagingGuard {
    /// Deletes the directory now (asynchronously) and disarms the guard.
    async fn remove(mut self) {
        if let Some(dir) = self.dir.take()
            && let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove staging directory");
        }
    }

    fn disarm(&mut self) {
        self.dir = None;
    }
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove staging directory");
            }
        };
        // Never block an async worker thread: inside a runtime, delete on the blocking pool.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                drop(handle.spawn_blocking(remove));
            }
            Err(_) => remove(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The intake pipeline
// ---------------------------------------------------------------------------------------

struct Staged {
    sha256: String,
    size_bytes: u64,
    original_name: Option<String>,
    extension: String,
    info: MediaInfo,
    original: PathBuf,
    wav: PathBuf,
}

struct Received {
    sha256: String,
    size_bytes: u64,
    head: Vec<u8>,
}

async fn stage<S, E>(
    stream: &mut S,
    hint: &UploadHint,
    limits: &IntakeLimits,
    dir: &Path,
    claim: &mut Claim,
) -> Result<Staged, IntakeError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let raw = dir.join(ORIGINAL_STEM);
    let received = stream_to_file(stream, limits, dir, &raw, hint.content_length, claim).await?;
    // What is written is on the disk now (statvfs sees it): hand the rest back.
    claim.release();
    let magic = detect_magic(&received.head);
    tracing::debug!(
        ?magic,
        filename = ?hint.filename,
        content_type = ?hint.content_type,
        size_bytes = received.size_bytes,
        "upload streamed to staging"
    );

    let probe = probe(limits, &raw, magic).await?;
    let max_secs = limits.max_duration.as_secs_f64();
    if let Some(declared) = probe.longest_declared()
        && declared > max_secs
    {
        return Err(IntakeError::TooLong {
            seconds: declared,
            limit_seconds: max_secs,
        });
    }

    // Room for the WAV (bounded by the duration limit) on top of the reserve.
    let wav_secs = probe
        .longest_declared()
        .map_or(max_secs, |d| d.min(max_secs))
        + 1.0;
    let wav_bytes = (wav_secs * WAV_BYTES_PER_SECOND) as u64 + WAV_HEADER_LEN;
    let free = free_bytes_async(dir).await?;
    if free < limits.min_free_bytes.saturating_add(wav_bytes) {
        return Err(IntakeError::DiskFull { free_bytes: free });
    }

    let wav = dir.join(WAV_NAME);
    let decoded = decode(limits, &raw, &wav).await?;

    if let Some(declared) = probe.declared_audio_duration()
        && decoded < declared * TRUNCATION_RATIO
        && declared - decoded > TRUNCATION_MIN_MISSING_SECS
    {
        return Err(IntakeError::Undecodable {
            detail: format!(
                "only {decoded:.1} of the {declared:.1} seconds it should contain could be read"
            ),
        });
    }
    if decoded > max_secs {
        return Err(IntakeError::TooLong {
            seconds: decoded,
            limit_seconds: max_secs,
        });
    }
    if decoded <= 0.0 {
        return Err(IntakeError::NoAudio);
    }
    let loudest_dbfs = loudest_window_dbfs(&wav).await?;
    if loudest_dbfs < SILENCE_DBFS {
        return Err(IntakeError::Silent {
            db_below_full_scale: -loudest_dbfs,
        });
    }

    let original_name = hint.filename.as_deref().and_then(sanitize_filename);
    let name_ext = original_name.as_deref().and_then(filename_extension);
    let extension = choose_extension(&probe, magic, name_ext.as_deref());
    let original = dir.join(format!("{ORIGINAL_STEM}.{extension}"));
    tokio::fs::rename(&raw, &original).await?;

    Ok(Staged {
        sha256: received.sha256,
        size_bytes: received.size_bytes,
        original_name,
        extension,
        info: MediaInfo {
            container: probe.format_name.clone(),
            duration_seconds: decoded,
            has_video: probe.video.is_some(),
            audio_codec: probe.audio.as_ref().and_then(|a| a.codec_name.clone()),
            video_codec: probe.video.as_ref().and_then(|v| v.codec_name.clone()),
            width: probe.video.as_ref().and_then(|v| v.width),
            height: probe.video.as_ref().and_then(|v| v.height),
        },
        original,
        wav,
    })
}

/// Streams the body into `path`, hashing it and enforcing the size and space limits.
async fn stream_to_file<S, E>(
    stream: &mut S,
    limits: &IntakeLimits,
    dir: &Path,
    path: &Path,
    declared: Option<u64>,
    claim: &mut Claim,
) -> Result<Received, IntakeError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await?;
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut head = Vec::with_capacity(HEAD_LEN);
    // Claim the space the first segment may take before writing it.
    let segment = |written: u64| match declared {
        Some(d) => d.saturating_sub(written).clamp(1, SPACE_CHECK_INTERVAL),
        None => SPACE_CHECK_INTERVAL,
    };
    let mut claimed_until = segment(0);
    claim
        .extend(dir, limits.min_free_bytes, claimed_until)
        .await?;

    let idle = limits.body_idle_timeout;
    loop {
        let item = if idle.is_zero() {
            stream.next().await
        } else {
            tokio::time::timeout(idle, stream.next())
                .await
                .map_err(|_| IntakeError::Stalled {
                    seconds: idle.as_secs(),
                })?
        };
        let Some(item) = item else { break };
        let chunk = item.map_err(|e| IntakeError::Interrupted(e.to_string()))?;
        if chunk.is_empty() {
            continue;
        }
        let new_total = total.saturating_add(chunk.len() as u64);
        if new_total > limits.max_upload_bytes {
            return Err(IntakeError::TooLarge {
                limit: limits.max_upload_bytes,
            });
        }
        if head.len() < HEAD_LEN {
            let take = chunk.len().min(HEAD_LEN - head.len());
            head.extend_from_slice(&chunk[..take]);
        }
        if new_total > claimed_until {
            // The next segment: free space must hold it on top of the
            // reserve and of every other upload's claim.
            let seg = segment(total).max(new_total - total);
            claim.extend(dir, limits.min_free_bytes, seg).await?;
            claimed_until = total.saturating_add(seg);
        }
        hasher.update(&chunk);
        if let Err(e) = out.write_all(&chunk).await {
            return Err(storage_error(e, dir).await);
        }
        total = new_total;
    }
    if let Err(e) = out.flush().await {
        return Err(storage_error(e, dir).await);
    }
    drop(out);
    if total == 0 {
        return Err(IntakeError::Empty);
    }
    Ok(Received {
        sha256: hex::encode(hasher.finalize()),
        size_bytes: total,
        head,
    })
}

/// Maps "no space left" write errors to [`IntakeError::DiskFull`].
async fn storage_error(error: io::Error, dir: &Path) -> IntakeError {
    if matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    ) {
        let free = free_bytes_async(dir).await.unwrap_or(0);
        IntakeError::DiskFull { free_bytes: free }
    } else {
        IntakeError::Io(error)
    }
}

async fn free_bytes_async(path: &Path) -> io::Result<u64> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || free_bytes(&path))
        .await
        .map_err(|e| io::Error::other(format!("free-space check failed: {e}")))?
}

// ---------------------------------------------------------------------------------------
// Container signatures
// ---------------------------------------------------------------------------------------

/// Container signature found at the start of the upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Magic {
    /// ISO base media (mp4/m4a/mov/3gp): an `ftyp` box, or a bare QuickTime atom.
    IsoBmff {
        quicktime: bool,
    },
    /// EBML header: Matroska or WebM.
    Ebml,
    /// RIFF/WAVE (or RF64/WAVE).
    Wave,
    Ogg,
    Flac,
    /// ID3v2 tag (normally mp3).
    Id3,
    /// MPEG audio frame sync (mp3 without a tag).
    MpegAudio,
    Unknown,
}

impl Magic {
    fn is_known(self) -> bool {
        self != Magic::Unknown
    }
}

fn detect_magic(head: &[u8]) -> Magic {
    let at = |range: std::ops::Range<usize>| head.get(range).unwrap_or(&[]);
    let box_type = at(4..8);
    if box_type == b"ftyp" {
        return Magic::IsoBmff {
            quicktime: at(8..12) == b"qt  ",
        };
    }
    if matches!(box_type, b"moov" | b"mdat" | b"wide") {
        return Magic::IsoBmff { quicktime: true };
    }
    if head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        return Magic::Ebml;
    }
    if (head.starts_with(b"RIFF") || head.starts_with(b"RF64")) && at(8..12) == b"WAVE" {
        return Magic::Wave;
    }
    if head.starts_with(b"OggS") {
        return Magic::Ogg;
    }
    if head.starts_with(b"fLaC") {
        return Magic::Flac;
    }
    if head.starts_with(b"ID3") {
        return Magic::Id3;
    }
    // 11-bit frame sync, and a layer field that is not the reserved 00 (which also rules
    // out ADTS AAC).
    if let [0xFF, second, ..] = head
        && second & 0xE0 == 0xE0
        && (second >> 1) & 0x03 != 0
    {
        return Magic::MpegAudio;
    }
    Magic::Unknown
}

// ---------------------------------------------------------------------------------------
// ffprobe
// ---------------------------------------------------------------------------------------

#[derive(Debug, serde::Deserialize)]
struct ProbeJson {
    #[serde(default)]
    format: Option<ProbeFormatJson>,
    #[serde(default)]
    streams: Vec<ProbeStreamJson>,
}

#[derive(Debug, serde::Deserialize)]
struct ProbeFormatJson {
    #[serde(default)]
    format_name: Option<String>,
    #[serde(default)]
    duration: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct ProbeStreamJson {
    #[serde(default)]
    codec_type: Option<String>,
    #[serde(default)]
    codec_name: Option<String>,
    #[serde(default)]
    width: Option<i64>,
    #[serde(default)]
    height: Option<i64>,
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    disposition: Option<DispositionJson>,
}

#[derive(Debug, serde::Deserialize)]
struct DispositionJson {
    #[serde(default)]
    attached_pic: i64,
}

#[derive(Debug, Clone, PartialEq)]
struct StreamFacts {
    codec_name: Option<String>,
    duration: Option<f64>,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
struct Probe {
    format_name: String,
    format_duration: Option<f64>,
    /// The first audio stream (the one ffmpeg decodes).
    audio: Option<StreamFacts>,
    /// The first real video stream (not cover art).
    video: Option<StreamFacts>,
}

impl Probe {
    /// The longest length the container declares (for the duration limit).
    fn longest_declared(&self) -> Option<f64> {
        let audio = self.audio.as_ref().and_then(|a| a.duration);
        match (self.format_duration, audio) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The declared length of the audio we decode (for truncation detection): the audio
    /// stream's own duration, else the container's.
    fn declared_audio_duration(&self) -> Option<f64> {
        self.audio
            .as_ref()
            .and_then(|a| a.duration)
            .or(self.format_duration)
    }
}

fn parse_seconds(text: Option<&str>) -> Option<f64> {
    text?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|d| d.is_finite() && *d > 0.0)
}

/// Turns ffprobe's JSON into [`Probe`]; `None` if it is unusable.
fn parse_probe(json: &[u8]) -> Option<Probe> {
    let parsed: ProbeJson = serde_json::from_slice(json).ok()?;
    let format = parsed.format?;
    let format_name = format.format_name.filter(|n| !n.trim().is_empty())?;
    let facts = |s: &ProbeStreamJson| StreamFacts {
        codec_name: s.codec_name.clone(),
        duration: parse_seconds(s.duration.as_deref()),
        width: s
            .width
            .and_then(|w| u32::try_from(w).ok())
            .filter(|w| *w > 0),
        height: s
            .height
            .and_then(|h| u32::try_from(h).ok())
            .filter(|h| *h > 0),
    };
    let audio = parsed
        .streams
        .iter()
        .find(|s| s.codec_type.as_deref() == Some("audio"))
        .map(facts);
    let video = parsed
        .streams
        .iter()
        .find(|s| {
            s.codec_type.as_deref() == Some("video")
                && s.disposition.as_ref().is_none_or(|d| d.attached_pic == 0)
        })
        .map(facts);
    Some(Probe {
        format_name,
        format_duration: parse_seconds(format.duration.as_deref()),
        audio,
        video,
    })
}

/// `file:` URL for a local path, so ffmpeg never interprets it as another protocol.
fn file_url(path: &Path) -> OsString {
    let mut url = OsString::from("file:");
    url.push(path.as_os_str());
    url
}

fn input_guard_args() -> [OsString; 4] {
    [
        "-protocol_whitelist".into(),
        "file".into(),
        "-format_whitelist".into(),
        DEMUXER_WHITELIST.into(),
    ]
}

/// An ffmpeg command line: `-nostdin -v error` and `flags`, the guarded
/// input, the `output_options`, then the output as a `file:` URL.
fn ffmpeg_args(
    flags: &[&str],
    input: &Path,
    output_options: &[&str],
    output: &Path,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-nostdin", "-v", "error"]
        .iter()
        .chain(flags)
        .map(OsString::from)
        .collect();
    args.extend(input_guard_args());
    args.push("-i".into());
    args.push(file_url(input));
    args.extend(output_options.iter().map(OsString::from));
    args.push(file_url(output));
    args
}

async fn probe(limits: &IntakeLimits, path: &Path, magic: Magic) -> Result<Probe, IntakeError> {
    let mut args: Vec<OsString> = vec!["-v".into(), "error".into()];
    args.extend(input_guard_args());
    args.extend(
        ["-print_format", "json", "-show_format", "-show_streams"]
            .into_iter()
            .map(OsString::from),
    );
    args.push(file_url(path));
    let out = run_tool(&limits.ffprobe, &args, limits.timeout, true).await?;

    let parsed = if out.status.success() {
        parse_probe(&out.stdout)
    } else {
        None
    };
    let Some(probe) = parsed else {
        if !magic.is_known() {
            return Err(IntakeError::NotMedia);
        }
        let detail = tool_detail(&out.stderr, &[(path, "the upload")])
            .unwrap_or_else(|| format!("ffprobe could not read the file ({})", out.status));
        return Err(IntakeError::Undecodable { detail });
    };
    if probe.audio.is_none() {
        if probe.video.is_none() && !magic.is_known() {
            return Err(IntakeError::NotMedia);
        }
        return Err(IntakeError::NoAudio);
    }
    Ok(probe)
}

// ---------------------------------------------------------------------------------------
// ffmpeg
// ---------------------------------------------------------------------------------------

/// Decodes the first audio stream of `input` to a 16 kHz mono s16 WAV at `output` and
/// returns its length in seconds.
async fn decode(limits: &IntakeLimits, input: &Path, output: &Path) -> Result<f64, IntakeError> {
    // Never write more than a second past the duration limit, whatever the container says.
    let cap = format!("{:.3}", limits.max_duration.as_secs_f64() + 1.0);
    let args = ffmpeg_args(
        &["-hide_banner", "-xerror"],
        input,
        &[
            "-map",
            "0:a:0",
            "-vn",
            "-sn",
            "-dn",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-c:a",
            "pcm_s16le",
            "-t",
            &cap,
            "-map_metadata",
            "-1",
            "-fflags",
            "+bitexact",
            "-flags:a",
            "+bitexact",
            "-f",
            "wav",
            "-y",
        ],
        output,
    );
    let out = run_tool(&limits.ffmpeg, &args, limits.timeout, false).await?;
    let labels = [(input, "the upload"), (output, "the converted audio")];
    if !out.status.success() {
        let detail = tool_detail(&out.stderr, &labels)
            .unwrap_or_else(|| format!("ffmpeg could not decode the audio ({})", out.status));
        return Err(IntakeError::Undecodable { detail });
    }
    // With `-v error`, anything on stderr is an error ffmpeg chose to ride over
    // (e.g. "File ended prematurely" in a cut-off WebM).
    if let Some(detail) = tool_detail(&out.stderr, &labels) {
        return Err(IntakeError::Undecodable { detail });
    }
    wav_duration(output).await
}

/// Length of the normalised WAV, from its header (checked to be 16 kHz mono s16) and size.
async fn wav_duration(path: &Path) -> Result<f64, IntakeError> {
    let mut file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let mut head = vec![0u8; 4096];
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    let data_bytes = match parse_wav_header(&head) {
        Some(h) if h.is_normalised() => {
            let available = len.saturating_sub(h.data_offset);
            h.data_len.map_or(available, |d| d.min(available))
        }
        Some(h) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ffmpeg wrote an unexpected WAV format: {h:?}"),
            )
            .into());
        }
        // Not expected from ffmpeg; fall back to the canonical header size.
        None => len.saturating_sub(WAV_HEADER_LEN),
    };
    Ok(data_bytes as f64 / WAV_BYTES_PER_SECOND)
}

/// The RMS level of the loudest 100 ms of the normalised WAV, in dB below
/// full scale (-120 for digital silence).
async fn loudest_window_dbfs(path: &Path) -> Result<f64, IntakeError> {
    let path = path.to_owned();
    let peak_mean_square = tokio::task::spawn_blocking(move || -> io::Result<f64> {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let mut head = vec![0u8; 4096];
        let n = file.read(&mut head)?;
        let offset = parse_wav_header(&head[..n]).map_or(WAV_HEADER_LEN, |h| h.data_offset);
        let mut reader = io::BufReader::new(file);
        io::Seek::seek(&mut reader, io::SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut sum, mut count, mut best) = (0.0f64, 0usize, 0.0f64);
        let mut carry: Option<u8> = None;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let mut bytes = &buf[..n];
            if let Some(lo) = carry.take() {
                let v = f64::from(i16::from_le_bytes([lo, bytes[0]])) / 32768.0;
                sum += v * v;
                count += 1;
                bytes = &bytes[1..];
            }
            let mut pairs = bytes.chunks_exact(2);
            for pair in &mut pairs {
                let v = f64::from(i16::from_le_bytes([pair[0], pair[1]])) / 32768.0;
                sum += v * v;
                count += 1;
                if count == LOUDNESS_WINDOW {
                    best = best.max(sum / count as f64);
                    (sum, count) = (0.0, 0);
                }
            }
            carry = pairs.remainder().first().copied();
        }
        if count > 0 {
            best = best.max(sum / count as f64);
        }
        Ok(best)
    })
    .await
    .map_err(|e| io::Error::other(format!("loudness check: {e}")))??;
    Ok(if peak_mean_square > 0.0 {
        (10.0 * peak_mean_square.log10()).max(-120.0)
    } else {
        -120.0
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WavHeader {
    format_tag: u16,
    channels: u16,
    sample_rate: u32,
    bits_per_sample: u16,
    data_offset: u64,
    /// `None` when the header holds a streaming placeholder (0xFFFFFFFF).
    data_len: Option<u64>,
}

impl WavHeader {
    fn is_normalised(&self) -> bool {
        self.format_tag == 1
            && self.channels == 1
            && self.sample_rate == 16_000
            && self.bits_per_sample == 16
    }
}

fn parse_wav_header(buf: &[u8]) -> Option<WavHeader> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(buf.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    };
    if buf.get(0..4)? != b"RIFF" || buf.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut fmt = None;
    let mut pos = 12usize;
    loop {
        let id = buf.get(pos..pos + 4)?;
        let size = u32_at(pos + 4)?;
        let body = pos + 8;
        if id == b"fmt " {
            fmt = Some((
                u16_at(body)?,
                u16_at(body + 2)?,
                u32_at(body + 4)?,
                u16_at(body + 14)?,
            ));
        } else if id == b"data" {
            let (format_tag, channels, sample_rate, bits_per_sample) = fmt?;
            return Some(WavHeader {
                format_tag,
                channels,
                sample_rate,
                bits_per_sample,
                data_offset: body as u64,
                data_len: (size != u32::MAX).then_some(u64::from(size)),
            });
        }
        let size = usize::try_from(size).ok()?;
        pos = body.checked_add(size)?.checked_add(size & 1)?;
    }
}

// ---------------------------------------------------------------------------------------
// Fair use: admission of uploads and the shared free-space reserve
// ---------------------------------------------------------------------------------------

/// Space promised to uploads in flight. Free space (statvfs) already counts
/// what they wrote; the claims are what they may write before their next
/// check, so checks made together cannot each spend the same free bytes.
#[derive(Clone, Default)]
pub struct DiskReserve {
    /// Serialises the check-and-claim (the statvfs read and the update).
    gate: Arc<tokio::sync::Mutex<()>>,
    claimed: Arc<std::sync::Mutex<u64>>,
}

impl DiskReserve {
    fn claim(&self) -> Claim {
        Claim {
            reserve: self.clone(),
            held: 0,
        }
    }

    /// Bytes claimed by uploads in flight now.
    pub fn claimed(&self) -> u64 {
        *self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One upload's claim on the reserve; given back when dropped.
pub(crate) struct Claim {
    reserve: DiskReserve,
    held: u64,
}

impl Claim {
    /// Replaces this claim by `bytes` if the free space holds them on top of
    /// `min_free` and every other claim; else `DiskFull`.
    async fn extend(&mut self, dir: &Path, min_free: u64, bytes: u64) -> Result<(), IntakeError> {
        let _gate = self.reserve.gate.lock().await;
        let free = free_bytes_async(dir).await?;
        let mut claimed = self
            .reserve
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let others = claimed.saturating_sub(self.held);
        if free < min_free.saturating_add(others).saturating_add(bytes) {
            return Err(IntakeError::DiskFull { free_bytes: free });
        }
        *claimed = others.saturating_add(bytes);
        self.held = bytes;
        Ok(())
    }

    fn release(&mut self) {
        let mut claimed = self
            .reserve
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *claimed = claimed.saturating_sub(self.held);
        self.held = 0;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.release();
    }
}

/// Who is uploading now: per-user and global places of uploads in flight,
/// and the shared disk reserve.
#[derive(Clone, Default)]
pub struct Admission {
    uploads: Slots,
    pub reserve: DiskReserve,
}

/// An admitted upload; its place is given back when dropped.
pub type Admitted = Slot;

impl Admission {
    /// Admits one upload of `user`, or says when to try again.
    pub fn admit(&self, user: &str, limits: &IntakeLimits) -> Result<Admitted, IntakeError> {
        self.uploads
            .take(
                user,
                limits.max_uploads_per_user,
                limits.max_uploads_in_flight,
            )
            .map_err(|full| match full {
                Full::Key(_) => IntakeError::TooManyUploads {
                    limit: limits.max_uploads_per_user,
                    retry_after_secs: 10,
                },
                Full::All => IntakeError::IntakeBusy {
                    retry_after_secs: 5,
                },
            })
    }

    /// Uploads in flight now.
    pub fn in_flight(&self) -> usize {
        self.uploads.held()
    }
}

impl IntakeError {
    /// When a refused client may try again (limits that pass with time).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::TooManyUploads {
                retry_after_secs, ..
            }
            | Self::IntakeBusy { retry_after_secs }
            | Self::DailyQuota {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Playable previews
// ---------------------------------------------------------------------------------------

/// How a browser can play a stored upload.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Playable {
    /// The original, with this content type.
    Original(&'static str),
    /// Audio only, in a format browsers may not play: the normalised WAV.
    Wav,
    /// Video browsers cannot play: transcode to H.264/AAC MP4.
    Transcode,
}

/// Decides from the probe facts (`media_info`) and the stored extension.
pub fn playable(info: &serde_json::Value, ext: &str) -> Playable {
    let has_video = info["has_video"].as_bool().unwrap_or(false);
    let v = info["video_codec"].as_str().unwrap_or_default();
    let a = info["audio_codec"].as_str().unwrap_or_default();
    let audio_ok = |list: &[&str]| a.is_empty() || list.contains(&a);
    match (ext, has_video) {
        ("mp4" | "m4a", true) if v == "h264" && audio_ok(&["aac", "mp3"]) => {
            Playable::Original("video/mp4")
        }
        ("webm", true) if ["vp8", "vp9", "av1"].contains(&v) && audio_ok(&["opus", "vorbis"]) => {
            Playable::Original("video/webm")
        }
        (_, true) => Playable::Transcode,
        ("mp4" | "m4a", false) if audio_ok(&["aac", "mp3"]) => Playable::Original("audio/mp4"),
        ("webm", false) if audio_ok(&["opus", "vorbis"]) => Playable::Original("audio/webm"),
        ("mp3", false) => Playable::Original("audio/mpeg"),
        ("ogg" | "opus", false) if audio_ok(&["opus", "vorbis"]) => Playable::Original("audio/ogg"),
        ("wav", false) => Playable::Original("audio/wav"),
        ("flac", false) => Playable::Original("audio/flac"),
        _ => Playable::Wav,
    }
}

/// A bound on transcodes at once over all submissions: the machine's cores
/// belong to the models. Sized by the first caller's limits.
fn transcode_slots(n: usize) -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(n.max(1)))
}

/// One transcode per submission at a time: the lock of one media directory.
/// Entries live while someone holds or waits for them (weak references,
/// pruned on each call), so the map is bounded by requests in flight.
fn dir_lock(dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
    type Locks = std::sync::Mutex<HashMap<PathBuf, std::sync::Weak<tokio::sync::Mutex<()>>>>;
    static LOCKS: std::sync::OnceLock<Locks> = std::sync::OnceLock::new();
    let locks = LOCKS.get_or_init(Default::default);
    let mut map = locks.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = map.get(dir).and_then(std::sync::Weak::upgrade) {
        return l;
    }
    map.retain(|_, w| w.strong_count() > 0);
    let l = Arc::new(tokio::sync::Mutex::new(()));
    map.insert(dir.to_path_buf(), Arc::downgrade(&l));
    l
}

/// Where a failed transcode leaves its reason: later views answer with it
/// at once instead of running ffmpeg again (deleted with the media).
const PREVIEW_FAILED: &str = "preview.failed";

/// Transcodes a stored upload to `<dir>/preview.mp4` (H.264/AAC) once; later
/// calls reuse it. Runs ffmpeg like every other run here: guarded input
/// (file protocol, known demuxers), a time limit, a bounded stderr.
/// `Timeout` when it takes longer than `timeout`, `Undecodable` when ffmpeg
/// fails; either is remembered in `<dir>/preview.failed` and returned again
/// without a new run. One run per submission at a time (others wait for its
/// result), at most `limits.preview_concurrency` over all.
pub async fn transcode_preview(
    limits: &IntakeLimits,
    input: &Path,
    dir: &Path,
    timeout: Duration,
) -> Result<PathBuf, IntakeError> {
    let out = dir.join("preview.mp4");
    let failed = dir.join(PREVIEW_FAILED);
    let lock = dir_lock(dir);
    let _guard = lock.lock().await;
    if tokio::fs::metadata(&out).await.is_ok() {
        return Ok(out);
    }
    if let Ok(reason) = tokio::fs::read_to_string(&failed).await {
        return Err(match reason.strip_prefix("timeout ") {
            Some(secs) => IntakeError::Timeout {
                seconds: secs.trim().parse().unwrap_or(0),
            },
            None => IntakeError::Undecodable { detail: reason },
        });
    }
    let _slot = transcode_slots(limits.preview_concurrency)
        .acquire()
        .await
        .map_err(|_| io::Error::other("the transcode slots are closed"))?;
    let result = run_preview(limits, input, &out, dir, timeout).await;
    let remembered = match &result {
        Err(IntakeError::Timeout { seconds }) => Some(format!("timeout {seconds}")),
        Err(IntakeError::Undecodable { detail }) => Some(detail.clone()),
        _ => None,
    };
    if let Some(r) = remembered
        && let Err(e) = tokio::fs::write(&failed, r).await
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remember a failed preview");
    }
    result
}

async fn run_preview(
    limits: &IntakeLimits,
    input: &Path,
    out: &Path,
    dir: &Path,
    timeout: Duration,
) -> Result<PathBuf, IntakeError> {
    let tmp = dir.join("preview.tmp.mp4");
    let args = ffmpeg_args(
        &["-hide_banner", "-y"],
        input,
        &[
            "-map",
            "0:v:0",
            "-map",
            "0:a:0?",
            "-vf",
            "scale='min(1280,iw)':-2",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "28",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "96k",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
        ],
        &tmp,
    );
    let result = run_tool(&limits.ffmpeg, &args, timeout, false).await;
    let out_status = match result {
        Ok(o) => o,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    if !out_status.status.success() {
        let _ = tokio::fs::remove_file(&tmp).await;
        let detail = tool_detail(
            &out_status.stderr,
            &[(input, "the upload"), (&tmp, "the preview")],
        )
        .unwrap_or_else(|| format!("ffmpeg could not transcode ({})", out_status.status));
        tracing::warn!(input = %input.display(), error = %detail, "preview transcode failed");
        return Err(IntakeError::Undecodable { detail });
    }
    tokio::fs::rename(&tmp, out).await?;
    Ok(out.to_path_buf())
}

// ---------------------------------------------------------------------------------------
// Running the tools
// ---------------------------------------------------------------------------------------

struct ToolOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs a tool with a time limit; on timeout it is killed. Its stderr tail is kept.
async fn run_tool(
    program: &Path,
    args: &[OsString],
    timeout: Duration,
    capture_stdout: bool,
) -> Result<ToolOutput, IntakeError> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
            IntakeError::ToolMissing(format!("{} could not be started: {e}", program.display()))
        }
        _ => IntakeError::Io(e),
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (status, stdout, stderr) = tokio::join!(
            child.wait(),
            read_head(stdout, STDOUT_CAP),
            read_tail(stderr, STDERR_TAIL)
        );
        io::Result::Ok(ToolOutput {
            status: status?,
            stdout: stdout?,
            stderr: stderr?,
        })
    };
    let finished = tokio::time::timeout(timeout, run).await;
    match finished {
        Ok(output) => Ok(output?),
        Err(_) => {
            if let Err(e) = child.kill().await {
                tracing::warn!(program = %program.display(), error = %e, "could not kill timed-out tool");
            }
            Err(IntakeError::Timeout {
                seconds: timeout.as_secs_f64().ceil() as u64,
            })
        }
    }
}

/// Reads everything, keeping the first `cap` bytes.
async fn read_head<R: AsyncRead + Unpin>(reader: Option<R>, cap: usize) -> io::Result<Vec<u8>> {
    let Some(mut reader) = reader else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let take = n.min(cap.saturating_sub(kept.len()));
        kept.extend_from_slice(&buf[..take]);
    }
}

/// Reads everything, keeping the last `cap` bytes.
async fn read_tail<R: AsyncRead + Unpin>(reader: Option<R>, cap: usize) -> io::Result<Vec<u8>> {
    let Some(mut reader) = reader else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            if kept.len() > cap {
                kept.drain(..kept.len() - cap);
            }
            return Ok(kept);
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * cap {
            kept.drain(..kept.len() - cap);
        }
    }
}

/// The last non-empty stderr line, with our paths and pointer addresses removed and cut
/// to [`DETAIL_MAX_CHARS`] characters; `None` if stderr is empty.
fn tool_detail(stderr: &[u8], paths: &[(&Path, &str)]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let mut line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())?
        .to_string();
    for (path, label) in paths {
        let shown = path.display().to_string();
        line = line.replace(&format!("file:{shown}"), label);
        line = line.replace(&shown, label);
    }
    let line = strip_pointer_addresses(&line);
    Some(line.chars().take(DETAIL_MAX_CHARS).collect())
}

/// `[mov,mp4 @ 0x55d0c1e0]` → `[mov,mp4]`.
fn strip_pointer_addresses(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(" @ 0x") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " @ 0x".len()..];
        let hex_len = after
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(after.len());
        rest = &after[hex_len..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------
// Names and extensions
// ---------------------------------------------------------------------------------------

/// The client's file name without directories or control characters, at most 255 bytes.
fn sanitize_filename(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next()?;
    let cleaned: String = last.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        return None;
    }
    let mut end = cleaned.len().min(255);
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    Some(cleaned[..end].to_string())
}

fn filename_extension(name: &str) -> Option<String> {
    let (stem, ext) = name.rsplit_once('.')?;
    if stem.is_empty() || ext.is_empty() || !ext.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some(ext.to_ascii_lowercase())
}

fn choose_extension(probe: &Probe, magic: Magic, name_ext: Option<&str>) -> String {
    let formats: Vec<&str> = probe.format_name.split(',').map(str::trim).collect();
    let has = |f: &str| formats.contains(&f);
    let has_video = probe.video.is_some();
    let audio_codec = probe.audio.as_ref().and_then(|a| a.codec_name.as_deref());
    let ext = if has("mov") || has("mp4") {
        match name_ext {
            Some("mov") => "mov",
            Some("mp4") => "mp4",
            Some("m4a") if !has_video => "m4a",
            _ if matches!(magic, Magic::IsoBmff { quicktime: true }) => "mov",
            _ if !has_video => "m4a",
            _ => "mp4",
        }
    } else if has("matroska") || has("webm") {
        let webm_codec = |c: Option<&str>| {
            c.is_none_or(|c| matches!(c, "opus" | "vorbis" | "vp8" | "vp9" | "av1"))
        };
        let video_codec = probe.video.as_ref().and_then(|v| v.codec_name.as_deref());
        if webm_codec(audio_codec) && webm_codec(video_codec) {
            "webm"
        } else {
            "mkv"
        }
    } else if has("wav") {
        "wav"
    } else if has("ogg") {
        if audio_codec == Some("opus") && name_ext == Some("opus") {
            "opus"
        } else {
            "ogg"
        }
    } else if has("flac") {
        "flac"
    } else if has("mp3") {
        "mp3"
    } else {
        match name_ext {
            Some(ext) if ACCEPTED_EXTENSIONS.contains(&ext) => ext,
            _ => "bin",
        }
    };
    ext.to_string()
}

// ---------------------------------------------------------------------------------------
// Commit
// ---------------------------------------------------------------------------------------

struct CommitFailure {
    error: io::Error,
    /// Whether the staging dir had already been renamed (the target was then removed).
    renamed: bool,
}

fn commit_blocking(
    staging: &Path,
    original: &Path,
    wav: &Path,
    target: &Path,
) -> Result<(), CommitFailure> {
    let before = |error| CommitFailure {
        error,
        renamed: false,
    };
    fsync(original).map_err(before)?;
    fsync(wav).map_err(before)?;
    fsync(staging).map_err(before)?;
    rename_noreplace(staging, target).map_err(before)?;

    let target_parent = parent_dir(target);
    let staging_parent = parent_dir(staging);
    let synced = fsync(&target_parent).and_then(|()| {
        if staging_parent == target_parent {
            Ok(())
        } else {
            fsync(&staging_parent)
        }
    });
    if let Err(error) = synced {
        if let Err(e) = std::fs::remove_dir_all(target) {
            tracing::warn!(dir = %target.display(), error = %e, "could not remove half-committed upload");
        }
        return Err(CommitFailure {
            error,
            renamed: true,
        });
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn fsync(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn already_exists(target: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} already exists", target.display()),
    )
}

/// Renames `from` to `to`, failing if `to` exists (even as an empty directory, which a
/// plain rename would replace).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let (c_from, c_to) = (c_path(from)?, c_path(to)?);
        // SAFETY: both arguments are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c_from.as_ptr(),
                libc::AT_FDCWD,
                c_to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => return Err(already_exists(to)),
            // The filesystem or kernel does not support RENAME_NOREPLACE: check, then rename.
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {}
            _ => return Err(error),
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(already_exists(to));
    }
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_get_the_original_only_when_they_can_play_it() {
        let info = |v: Option<&str>, a: Option<&str>| serde_json::json!({"has_video": v.is_some(), "video_codec": v, "audio_codec": a});
        assert_eq!(
            playable(&info(Some("h264"), Some("aac")), "mp4"),
            Playable::Original("video/mp4")
        );
        assert_eq!(
            playable(&info(Some("vp8"), Some("opus")), "webm"),
            Playable::Original("video/webm")
        );
        assert_eq!(
            playable(&info(Some("h264"), Some("aac")), "mov"),
            Playable::Transcode
        );
        assert_eq!(
            playable(&info(Some("h264"), Some("aac")), "mkv"),
            Playable::Transcode
        );
        assert_eq!(
            playable(&info(Some("hevc"), Some("aac")), "mp4"),
            Playable::Transcode
        );
        assert_eq!(
            playable(&info(None, Some("pcm_s16le")), "wav"),
            Playable::Original("audio/wav")
        );
        assert_eq!(playable(&info(None, Some("amr_nb")), "3gp"), Playable::Wav);
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // ----- helpers -----

    const TOOLS_HINT: &str = "the intake tests need ffmpeg, ffprobe and espeak-ng \
                              (apt-get install ffmpeg espeak-ng)";

    async fn tool(program: &str, args: &[&str]) {
        let out = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {program} ({e}): {TOOLS_HINT}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn ffmpeg(args: &[&str]) {
        let mut all = vec!["-nostdin", "-hide_banner", "-v", "error", "-y"];
        all.extend_from_slice(args);
        tool("ffmpeg", &all).await;
    }

    fn p(path: &Path) -> &str {
        path.to_str().expect("utf-8 temp path")
    }

    async fn speech(dir: &Path) -> PathBuf {
        let wav = dir.join("speech.wav");
        tool(
            "espeak-ng",
            &[
                "-w",
                p(&wav),
                "Good morning. My answer concerns the causes of the French revolution.",
            ],
        )
        .await;
        wav
    }

    /// A small mp4 with h264 video and (optionally) aac audio.
    async fn video(dir: &Path, name: &str, seconds: u32, audio: bool, faststart: bool) -> PathBuf {
        let out = dir.join(name);
        let src = format!("testsrc=duration={seconds}:size=320x240:rate=10");
        let sine = format!("sine=frequency=440:duration={seconds}");
        let mut args = vec!["-f", "lavfi", "-i", &src];
        if audio {
            args.extend(["-f", "lavfi", "-i", &sine, "-shortest", "-c:a", "aac"]);
        }
        args.extend(["-c:v", "libx264", "-pix_fmt", "yuv420p"]);
        if faststart {
            args.extend(["-movflags", "+faststart"]);
        }
        args.push(p(&out));
        ffmpeg(&args).await;
        out
    }

    fn chunked(data: Vec<u8>, size: usize) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        let chunks: Vec<Result<Bytes, io::Error>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks)
    }

    fn limits() -> IntakeLimits {
        IntakeLimits {
            min_free_bytes: 1024 * 1024,
            timeout: Duration::from_secs(60),
            ..IntakeLimits::default()
        }
    }

    fn hint(name: &str) -> UploadHint {
        UploadHint {
            filename: Some(name.to_string()),
            ..UploadHint::default()
        }
    }

    async fn receive_file(
        path: &Path,
        name: &str,
        limits: &IntakeLimits,
        root: &Path,
    ) -> Result<StagedMedia, IntakeError> {
        let data = tokio::fs::read(path).await.expect("read test media");
        receive(chunked(data, 7919), &hint(name), limits, root).await
    }

    async fn entries(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
            return names;
        };
        while let Some(e) = rd.next_entry().await.expect("read_dir") {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names
    }

    async fn assert_empty(root: &Path) {
        let left = entries(root).await;
        assert!(left.is_empty(), "staging root not empty: {left:?}");
    }

    async fn sha256sum(path: &Path) -> String {
        let out = tokio::process::Command::new("sha256sum")
            .arg(path)
            .output()
            .await
            .expect("run sha256sum");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("sha256sum output")
            .to_string()
    }

    async fn source_duration(path: &Path) -> f64 {
        let out = tokio::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "format=duration",
                "-of",
                "csv=p=0",
            ])
            .arg(path)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run ffprobe ({e}): {TOOLS_HINT}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("ffprobe duration")
    }

    /// Checks the normalised WAV byte by byte against the canonical 16 kHz mono s16 header.
    async fn assert_normalised_wav(staged: &StagedMedia) {
        let bytes = tokio::fs::read(staged.wav_path()).await.expect("read wav");
        assert_eq!(&bytes[0..4], b"RIFF");
        assert_eq!(&bytes[8..12], b"WAVE");
        let h = parse_wav_header(&bytes).expect("wav header");
        assert_eq!(h.format_tag, 1, "PCM");
        assert_eq!(h.channels, 1, "mono");
        assert_eq!(h.sample_rate, 16_000);
        assert_eq!(h.bits_per_sample, 16);
        let data = bytes.len() as u64 - h.data_offset;
        assert_eq!(h.data_len, Some(data), "data chunk size matches the file");
        let secs = data as f64 / 32_000.0;
        assert!((secs - staged.info.duration_seconds).abs() < 1e-6);
    }

    fn assert_err(result: Result<StagedMedia, IntakeError>, code: &str) -> IntakeError {
        match result {
            Ok(staged) => panic!("expected {code}, got accepted {staged:?}"),
            Err(e) => {
                eprintln!("refused as expected ({code}): {e}");
                assert_eq!(e.code(), code, "wrong error: {e}");
                e
            }
        }
    }

    // ----- accepted media -----

    #[tokio::test]
    async fn speech_wav_is_accepted_hashed_normalised_and_committed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let wav = speech(tmp.path()).await;
        let expected = source_duration(&wav).await;

        let staged = receive_file(&wav, "../../etc/C:\\answers\\Speech.WAV", &limits(), &root)
            .await
            .expect("speech accepted");
        assert_eq!(staged.sha256, sha256sum(&wav).await);
        assert_eq!(
            staged.size_bytes,
            tokio::fs::metadata(&wav).await.expect("meta").len()
        );
        assert_eq!(staged.original_name.as_deref(), Some("Speech.WAV"));
        assert_eq!(staged.extension, "wav");
        assert_eq!(staged.info.container, "wav");
        assert!(!staged.info.has_video);
        assert_eq!(staged.info.audio_codec.as_deref(), Some("pcm_s16le"));
        assert!(
            (staged.info.duration_seconds - expected).abs() < 0.05,
            "{} vs {expected}",
            staged.info.duration_seconds
        );
        assert!(staged.original_path().starts_with(&root));
        assert!(staged.wav_path().starts_with(&root));
        assert_normalised_wav(&staged).await;

        // Commit moves both files; the staging root is left empty.
        let final_dir = tmp.path().join("final");
        let committed = staged.commit(&final_dir).await.expect("commit");
        assert_eq!(committed.dir, final_dir);
        assert_eq!(committed.original, final_dir.join("original.wav"));
        assert_eq!(committed.wav, final_dir.join("audio.wav"));
        assert_eq!(
            tokio::fs::read(&committed.original)
                .await
                .expect("original"),
            tokio::fs::read(&wav).await.expect("source")
        );
        assert!(tokio::fs::metadata(&committed.wav).await.is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_empty(&root).await;
        assert!(tokio::fs::metadata(&committed.wav).await.is_ok());
    }

    #[tokio::test]
    async fn speech_as_mp3_opus_and_webm_is_accepted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let wav = speech(tmp.path()).await;
        let expected = source_duration(&wav).await;
        let cases = [
            (
                "speech.mp3",
                vec!["-c:a", "libmp3lame"],
                "mp3",
                "mp3",
                "mp3",
            ),
            (
                "speech.opus",
                vec!["-c:a", "libopus"],
                "ogg",
                "opus",
                "opus",
            ),
            ("speech.ogg", vec!["-c:a", "libopus"], "ogg", "ogg", "opus"),
            (
                "speech.webm",
                vec!["-c:a", "libopus"],
                "matroska,webm",
                "webm",
                "opus",
            ),
        ];
        for (name, codec, container, ext, audio_codec) in cases {
            let out = tmp.path().join(name);
            let mut args = vec!["-i", p(&wav)];
            args.extend(codec);
            args.push(p(&out));
            ffmpeg(&args).await;

            // Offer it under a neutral name: detection must not depend on the file name.
            let client_name = if ext == "opus" { name } else { "answer" };
            let staged = receive_file(&out, client_name, &limits(), &root)
                .await
                .unwrap_or_else(|e| panic!("{name} refused: {e}"));
            assert_eq!(staged.info.container, container, "{name}");
            assert_eq!(staged.extension, ext, "{name}");
            assert_eq!(staged.info.audio_codec.as_deref(), Some(audio_codec));
            assert!(!staged.info.has_video, "{name}");
            assert_eq!(staged.sha256, sha256sum(&out).await, "{name}");
            assert!(
                (staged.info.duration_seconds - expected).abs() < 0.15,
                "{name}: {} vs {expected}",
                staged.info.duration_seconds
            );
            assert!(
                staged
                    .original_path()
                    .to_string_lossy()
                    .ends_with(&format!("original.{ext}"))
            );
            assert_normalised_wav(&staged).await;
            staged.discard().await;
        }
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn mp4_video_with_audio_is_accepted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let mp4 = video(tmp.path(), "v.mp4", 3, true, false).await;
        let staged = receive_file(&mp4, "lecture.mp4", &limits(), &root)
            .await
            .expect("video accepted");
        assert!(staged.info.has_video);
        assert!(staged.info.container.contains("mp4"));
        assert_eq!(staged.extension, "mp4");
        assert_eq!(staged.info.video_codec.as_deref(), Some("h264"));
        assert_eq!(staged.info.audio_codec.as_deref(), Some("aac"));
        assert_eq!(
            (staged.info.width, staged.info.height),
            (Some(320), Some(240))
        );
        assert!(
            (staged.info.duration_seconds - 3.0).abs() < 0.2,
            "{}",
            staged.info.duration_seconds
        );
        assert_normalised_wav(&staged).await;

        // Dropping without commit removes the staging dir (in the background).
        let dir = staged.wav_path().parent().expect("dir").to_path_buf();
        drop(staged);
        for _ in 0..100 {
            if tokio::fs::metadata(&dir).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_empty(&root).await;
    }

    // ----- refused media -----

    #[tokio::test]
    async fn silence_and_a_muted_microphone_are_no_speech() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        // Digital silence, and a hum 65 dB down (a muted microphone's floor).
        let silent = tmp.path().join("silent.wav");
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "anullsrc=r=16000:cl=mono:d=3",
            p(&silent),
        ])
        .await;
        let hum = tmp.path().join("hum.m4a");
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=120:duration=3,volume=-65dB",
            p(&hum),
        ])
        .await;
        for (file, name) in [(&silent, "silent.wav"), (&hum, "hum.m4a")] {
            let e = assert_err(
                receive_file(file, name, &limits(), &root).await,
                "no_speech",
            );
            assert!(e.to_string().contains("microphone"), "{e}");
        }
        assert_empty(&root).await;
        // Quiet speech is still speech: the same answer 20 dB down.
        let speech = speech(tmp.path()).await;
        let quiet = tmp.path().join("quiet.wav");
        ffmpeg(&["-i", p(&speech), "-af", "volume=-20dB", p(&quiet)]).await;
        let staged = receive_file(&quiet, "quiet.wav", &limits(), &root)
            .await
            .expect("quiet speech is accepted");
        staged.discard().await;
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn video_without_audio_is_no_audio() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let mp4 = video(tmp.path(), "silent.mp4", 2, false, false).await;
        assert_err(
            receive_file(&mp4, "silent.mp4", &limits(), &root).await,
            "no_audio",
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn empty_upload_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let stream = futures::stream::iter(Vec::<Result<Bytes, io::Error>>::new());
        assert_err(
            receive(stream, &hint("a.mp4"), &limits(), &root).await,
            "empty_upload",
        );
        // Empty chunks only is still empty.
        let stream = futures::stream::iter((0..3).map(|_| Ok::<_, io::Error>(Bytes::new())));
        assert_err(
            receive(stream, &hint("a.mp4"), &limits(), &root).await,
            "empty_upload",
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn text_renamed_mp4_is_not_media() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let text = b"Dear professor, here is my essay about the French revolution.\n".repeat(50);
        assert_err(
            receive(chunked(text, 100), &hint("essay.mp4"), &limits(), &root).await,
            "not_media",
        );
        // A playlist that would make ffmpeg read another file is refused the same way.
        let playlist = b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n".to_vec();
        assert_err(
            receive(chunked(playlist, 8), &hint("x.m3u8"), &limits(), &root).await,
            "not_media",
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn truncated_mp4_is_undecodable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        for faststart in [false, true] {
            let name = format!("full-{faststart}.mp4");
            let mp4 = video(tmp.path(), &name, 5, true, faststart).await;
            let mut data = tokio::fs::read(&mp4).await.expect("read");
            data.truncate(data.len() * 6 / 10);
            let e = assert_err(
                receive(chunked(data, 4096), &hint("cut.mp4"), &limits(), &root).await,
                "undecodable",
            );
            let IntakeError::Undecodable { detail } = &e else {
                unreachable!()
            };
            assert!(!detail.is_empty() && detail.chars().count() <= 300);
            assert!(!detail.contains(p(&root)), "detail leaks a path: {detail}");
            assert_empty(&root).await;
        }
    }

    #[tokio::test]
    async fn truncated_webm_and_mp3_are_undecodable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let wav = speech(tmp.path()).await;
        for (name, codec) in [("s.webm", "libopus"), ("s.mp3", "libmp3lame")] {
            let out = tmp.path().join(name);
            ffmpeg(&["-i", p(&wav), "-c:a", codec, p(&out)]).await;
            let mut data = tokio::fs::read(&out).await.expect("read");
            data.truncate(data.len() * 6 / 10);
            assert_err(
                receive(chunked(data, 4096), &hint(name), &limits(), &root).await,
                "undecodable",
            );
            assert_empty(&root).await;
        }
    }

    #[tokio::test]
    async fn oversized_stream_is_refused_without_reading_it_all() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = pulled.clone();
        let stream = futures::stream::iter((0..100).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(Bytes::from(vec![0xAB_u8; 1024]))
        }));
        let small = IntakeLimits {
            max_upload_bytes: 10 * 1024,
            ..limits()
        };
        let e = assert_err(
            receive(stream, &hint("big.mp4"), &small, &root).await,
            "too_large",
        );
        assert!(matches!(e, IntakeError::TooLarge { limit: 10240 }));
        assert_eq!(
            pulled.load(Ordering::SeqCst),
            11,
            "stopped at the first chunk over"
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn declared_length_over_limit_is_refused_before_reading() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = pulled.clone();
        let stream = futures::stream::iter((0..4).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(Bytes::from_static(b"data"))
        }));
        let small = IntakeLimits {
            max_upload_bytes: 1000,
            ..limits()
        };
        let declared = UploadHint {
            content_length: Some(1001),
            ..hint("big.mp4")
        };
        assert_err(receive(stream, &declared, &small, &root).await, "too_large");
        assert_eq!(pulled.load(Ordering::SeqCst), 0);
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn over_duration_is_too_long() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let long = tmp.path().join("long.wav");
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=300:duration=5:sample_rate=8000",
            p(&long),
        ])
        .await;
        let short_limit = IntakeLimits {
            max_duration: Duration::from_secs(2),
            ..limits()
        };
        let e = assert_err(
            receive_file(&long, "long.wav", &short_limit, &root).await,
            "too_long",
        );
        let IntakeError::TooLong {
            seconds,
            limit_seconds,
        } = e
        else {
            unreachable!()
        };
        assert!((seconds - 5.0).abs() < 0.1 && limit_seconds == 2.0);
        assert_empty(&root).await;

        // A streamed WebM (like a browser's MediaRecorder output) declares no duration:
        // the decoded length is checked instead, and decoding stops just past the limit.
        let piped = tmp.path().join("piped.webm");
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ffmpeg -nostdin -v error -f lavfi -i sine=duration=5 -c:a libopus -f webm - | cat > '{}'",
                p(&piped)
            ))
            .output()
            .await
            .expect("sh");
        assert!(out.status.success());
        let e = assert_err(
            receive_file(&piped, "piped.webm", &short_limit, &root).await,
            "too_long",
        );
        let IntakeError::TooLong { seconds, .. } = e else {
            unreachable!()
        };
        assert!((seconds - 3.0).abs() < 0.1, "{seconds}");
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn nearly_full_disk_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let full = IntakeLimits {
            min_free_bytes: u64::MAX,
            ..limits()
        };
        assert_err(
            receive(chunked(vec![1; 100], 10), &hint("a.wav"), &full, &root).await,
            "insufficient_storage",
        );
        assert_empty(&root).await;

        // Free space below reserve + declared length is refused too.
        let free = free_bytes(tmp.path()).expect("statvfs");
        assert!(free > 0);
        let declared = UploadHint {
            content_length: Some(free),
            ..hint("a.wav")
        };
        let reserve = IntakeLimits {
            min_free_bytes: 1,
            max_upload_bytes: u64::MAX,
            ..limits()
        };
        assert_err(
            receive(chunked(vec![1; 100], 10), &declared, &reserve, &root).await,
            "insufficient_storage",
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn interrupted_body_is_refused_and_cleaned_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let stream = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"RIFF....WAVEfmt ")),
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
        ]);
        let e = assert_err(
            receive(stream, &hint("a.wav"), &limits(), &root).await,
            "upload_interrupted",
        );
        assert!(e.to_string().contains("connection reset"));
        assert_empty(&root).await;
    }

    /// A client that sends a first chunk and then nothing (a slow-body
    /// attack, or a dead connection the kernel has not noticed) is cut after
    /// `body_idle_timeout`, and its staging directory and reserve are gone.
    #[tokio::test]
    async fn stalled_body_is_cut_and_cleaned_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let first = futures::stream::iter(vec![Ok::<_, io::Error>(Bytes::from_static(
            b"RIFF....WAVEfmt ",
        ))]);
        let stream = first.chain(futures::stream::pending());
        let reserve = DiskReserve::default();
        let limits = IntakeLimits {
            body_idle_timeout: Duration::from_millis(200),
            ..limits()
        };
        let started = std::time::Instant::now();
        let e = assert_err(
            receive_reserved(Box::pin(stream), &hint("a.wav"), &limits, &root, &reserve).await,
            "upload_stalled",
        );
        assert!(started.elapsed() < Duration::from_secs(10), "cut late");
        assert!(e.to_string().contains("nothing arrived"), "{e}");
        assert_eq!(
            reserve.claimed(),
            0,
            "the stalled upload's claim is given back"
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn hung_tool_times_out_and_is_killed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let script = tmp.path().join("slow-ffprobe");
        tokio::fs::write(&script, "#!/bin/sh\nexec sleep 30\n")
            .await
            .expect("write script");
        tokio::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .await
            .expect("chmod");
        let slow = IntakeLimits {
            ffprobe: script,
            timeout: Duration::from_millis(300),
            ..limits()
        };
        let wav = speech(tmp.path()).await;
        let started = std::time::Instant::now();
        assert_err(
            receive_file(&wav, "a.wav", &slow, &root).await,
            "processing_timeout",
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn missing_tools_are_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let version = check_tools(&limits())
            .await
            .unwrap_or_else(|e| panic!("{e}: {TOOLS_HINT}"));
        assert!(version.starts_with("ffmpeg version"), "{version}");

        let missing = IntakeLimits {
            ffprobe: PathBuf::from("/nonexistent/ffprobe"),
            ..limits()
        };
        let e = check_tools(&missing).await.expect_err("missing ffprobe");
        assert_eq!(e.code(), "media_tools_missing");
        assert!(e.to_string().contains("apt-get install ffmpeg"));

        let wav = speech(tmp.path()).await;
        assert_err(
            receive_file(&wav, "a.wav", &missing, &root).await,
            "media_tools_missing",
        );
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn commit_refuses_existing_target_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("staging");
        let wav = speech(tmp.path()).await;
        let staged = receive_file(&wav, "a.wav", &limits(), &root)
            .await
            .expect("accepted");
        let target = tmp.path().join("taken");
        tokio::fs::create_dir(&target).await.expect("mkdir");
        let e = staged.commit(&target).await.expect_err("target exists");
        assert_eq!(e.code(), "internal");
        assert!(entries(&target).await.is_empty());
        assert_empty(&root).await;
    }

    #[tokio::test]
    async fn clear_staging_removes_leftovers_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        tokio::fs::create_dir(root.join("intake-old"))
            .await
            .expect("mkdir");
        tokio::fs::write(root.join("intake-old/original"), b"x")
            .await
            .expect("write");
        tokio::fs::create_dir(root.join("keep"))
            .await
            .expect("mkdir");
        assert_eq!(clear_staging(root).await.expect("clear"), 1);
        assert_eq!(entries(root).await, vec!["keep".to_string()]);
        assert_eq!(
            clear_staging(&root.join("missing")).await.expect("clear"),
            0
        );
    }

    // ----- pure helpers -----

    #[test]
    fn magic_bytes_are_recognised() {
        assert_eq!(
            detect_magic(b"\0\0\0\x20ftypisom\0\0\x02\0"),
            Magic::IsoBmff { quicktime: false }
        );
        assert_eq!(
            detect_magic(b"\0\0\0\x14ftypqt  \0\0\x02\0"),
            Magic::IsoBmff { quicktime: true }
        );
        assert_eq!(detect_magic(&[0x1A, 0x45, 0xDF, 0xA3, 1]), Magic::Ebml);
        assert_eq!(detect_magic(b"RIFF\x24\0\0\0WAVEfmt "), Magic::Wave);
        assert_eq!(detect_magic(b"RIFF\x24\0\0\0AVI LIST"), Magic::Unknown);
        assert_eq!(detect_magic(b"OggS\0\x02"), Magic::Ogg);
        assert_eq!(detect_magic(b"fLaC\0\0\0\x22"), Magic::Flac);
        assert_eq!(detect_magic(b"ID3\x04\0"), Magic::Id3);
        assert_eq!(detect_magic(&[0xFF, 0xFB, 0x90, 0x64]), Magic::MpegAudio);
        assert_eq!(
            detect_magic(&[0xFF, 0xF1, 0x50, 0x80]),
            Magic::Unknown,
            "ADTS"
        );
        assert_eq!(detect_magic(b"hello world"), Magic::Unknown);
        assert_eq!(detect_magic(b""), Magic::Unknown);
    }

    #[test]
    fn filenames_are_sanitised() {
        assert_eq!(sanitize_filename("a/b/c.mp4").as_deref(), Some("c.mp4"));
        assert_eq!(
            sanitize_filename("C:\\x\\y.WebM").as_deref(),
            Some("y.WebM")
        );
        assert_eq!(sanitize_filename("../"), None);
        assert_eq!(sanitize_filename(".."), None);
        assert_eq!(sanitize_filename(" \n "), None);
        assert_eq!(
            sanitize_filename("a\u{0}b\tc.wav").as_deref(),
            Some("abc.wav")
        );
        let long = "é".repeat(200);
        let cut = sanitize_filename(&long).expect("long name");
        assert!(cut.len() <= 255 && cut.chars().all(|c| c == 'é'));
        assert_eq!(filename_extension("Talk.MP4").as_deref(), Some("mp4"));
        assert_eq!(filename_extension(".bashrc"), None);
        assert_eq!(filename_extension("noext"), None);
    }

    #[test]
    fn tool_details_hide_paths_and_addresses() {
        let path = Path::new("/srv/staging/intake-1/original");
        let stderr = b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x5587c5e731c0] moov atom not found\n\
                       file:/srv/staging/intake-1/original: Invalid data found when processing input\n\n";
        assert_eq!(
            tool_detail(stderr, &[(path, "the upload")]).as_deref(),
            Some("the upload: Invalid data found when processing input")
        );
        assert_eq!(
            strip_pointer_addresses("[mov,mp4 @ 0x5587c5e731c0] moov atom not found"),
            "[mov,mp4] moov atom not found"
        );
        assert_eq!(tool_detail(b"  \n", &[]), None);
        let long = "x".repeat(1000);
        assert_eq!(
            tool_detail(long.as_bytes(), &[]).map(|d| d.chars().count()),
            Some(300)
        );
    }

    #[test]
    fn probe_json_is_interpreted() {
        let json = br#"{"streams":[
            {"codec_type":"video","codec_name":"mjpeg","width":300,"height":300,"disposition":{"attached_pic":1}},
            {"codec_type":"audio","codec_name":"mp3","duration":"4.5"}],
            "format":{"format_name":"mp3","duration":"4.600000"}}"#;
        let probe = parse_probe(json).expect("probe");
        assert!(probe.video.is_none(), "cover art is not video");
        assert_eq!(probe.declared_audio_duration(), Some(4.5));
        assert_eq!(probe.longest_declared(), Some(4.6));
        assert_eq!(choose_extension(&probe, Magic::Id3, None), "mp3");
        assert!(parse_probe(b"{}").is_none());
        assert!(parse_probe(b"not json").is_none());
    }

    #[test]
    fn error_codes_and_statuses() {
        let cases: Vec<(IntakeError, &str, u16)> = vec![
            (IntakeError::Empty, "empty_upload", 400),
            (IntakeError::TooLarge { limit: 5 }, "too_large", 413),
            (IntakeError::NotMedia, "not_media", 415),
            (IntakeError::NoAudio, "no_audio", 422),
            (
                IntakeError::Silent {
                    db_below_full_scale: 90.0,
                },
                "no_speech",
                422,
            ),
            (
                IntakeError::TooLong {
                    seconds: 100.0,
                    limit_seconds: 60.0,
                },
                "too_long",
                422,
            ),
            (
                IntakeError::Undecodable { detail: "x".into() },
                "undecodable",
                422,
            ),
            (
                IntakeError::Timeout { seconds: 600 },
                "processing_timeout",
                422,
            ),
            (
                IntakeError::DiskFull { free_bytes: 0 },
                "insufficient_storage",
                507,
            ),
            (
                IntakeError::Interrupted("x".into()),
                "upload_interrupted",
                400,
            ),
            (IntakeError::Stalled { seconds: 60 }, "upload_stalled", 408),
            (
                IntakeError::ToolMissing("x".into()),
                "media_tools_missing",
                500,
            ),
            (IntakeError::Io(io::Error::other("x")), "internal", 500),
        ];
        for (error, code, _status) in cases {
            assert_eq!(error.code(), code);
            assert!(!error.to_string().is_empty());
        }
        assert_eq!(
            IntakeError::TooLarge { limit: 5 }.to_string(),
            "the upload exceeds the 5-byte limit"
        );
    }

    #[test]
    fn defaults_match_the_documented_limits() {
        let d = IntakeLimits::default();
        assert_eq!(d.max_upload_bytes, 2 << 30);
        assert_eq!(d.max_duration, Duration::from_secs(1800));
        assert_eq!(d.min_free_bytes, 1 << 30);
        assert_eq!(d.ffmpeg, PathBuf::from("ffmpeg"));
        assert_eq!(d.ffprobe, PathBuf::from("ffprobe"));
        assert_eq!(d.timeout, Duration::from_secs(600));
    }
}
