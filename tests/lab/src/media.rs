//! The lab's student recordings: espeak-ng speech with different voices,
//! speeds and lengths, on-topic and off-topic answers, and a few bad files
//! (silence, random bytes, a truncated file).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The spoken prompt of the lab's assignment.
pub const PROMPT: &str = "Explain how plants make their food. Name what goes in, \
    what comes out, and where in the plant it happens.";

const ON_TOPIC: &[&str] = &[
    "Photosynthesis is how plants make their own food.",
    "The leaves take in carbon dioxide from the air through tiny pores called stomata.",
    "The roots take up water from the soil, and it travels up the stem to the leaves.",
    "Chlorophyll in the chloroplasts absorbs energy from sunlight.",
    "With that light energy the plant turns water and carbon dioxide into glucose.",
    "Oxygen is released into the air as a by-product.",
    "The glucose is used for energy or stored as starch for later.",
    "Most of this happens in the leaves, because they have the most chloroplasts.",
    "So the inputs are light, water and carbon dioxide, and the outputs are glucose and oxygen.",
    "Without photosynthesis there would be no food chains and very little oxygen.",
    "In the light dependent reactions water is split and energy is captured.",
    "In the Calvin cycle carbon dioxide is fixed into sugar.",
];

const OFF_TOPIC: &[&str] = &[
    "Last weekend I went to a football match with my cousins.",
    "Our team scored twice in the second half and we won the game.",
    "After the match we bought chips and walked home in the rain.",
    "I think the best sport is basketball because it is fast.",
    "My favourite film is about a robot that travels through space.",
    "Tomorrow the weather will be cloudy with some sunny spells.",
    "I also like playing video games with my friends on Saturday.",
    "The bus to school was late again this morning.",
];

const VOICES: &[&str] = &[
    "en-us",
    "en-gb",
    "en-us+f3",
    "en-gb-scotland",
    "en+m3",
    "en-029",
    "en-gb-x-rp",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    OnTopic,
    OffTopic,
    /// A valid file of silence (a muted microphone): refused at upload as
    /// `no_speech`, with a reason the student can act on.
    Silent,
    /// Random bytes named like a video.
    Corrupt,
    /// The first kilobytes of a real recording.
    Truncated,
}

impl Kind {
    /// Whether a correct system must refuse or fail this file.
    pub fn is_bad(self) -> bool {
        matches!(self, Kind::Corrupt | Kind::Truncated | Kind::Silent)
    }
}

/// One generated student.
#[derive(Debug, Clone, Serialize)]
pub struct Student {
    pub index: usize,
    /// The platform's user id (`sub`).
    pub user: String,
    pub kind: Kind,
    pub voice: String,
    pub words_per_minute: u32,
    pub target_seconds: f64,
    /// Measured length of the speech (0 for bad files).
    pub audio_seconds: f64,
    pub file: PathBuf,
    /// Seconds after the start of a run when this student uploads.
    pub arrival_seconds: f64,
}

/// What to generate.
pub struct Plan {
    pub students: usize,
    pub min_seconds: f64,
    pub max_seconds: f64,
    pub seed: u64,
    /// Uploads spread evenly over this many seconds (0 = all at once).
    pub spread_seconds: f64,
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (install ffmpeg and espeak-ng)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Duration of a canonical 44-byte-header PCM WAV from its header.
pub fn wav_seconds(path: &Path) -> anyhow::Result<f64> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 44 || &bytes[0..4] != b"RIFF" {
        bail!("{} is not a WAV file", path.display());
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let byte_rate = u32_at(28) as f64;
    if byte_rate <= 0.0 {
        bail!("{} has no byte rate", path.display());
    }
    Ok((bytes.len() - 44) as f64 / byte_rate)
}

fn text_for(kind: Kind, seconds: f64, wpm: u32, rng: &mut StdRng) -> String {
    let pool = if kind == Kind::OffTopic {
        OFF_TOPIC
    } else {
        ON_TOPIC
    };
    let want_words = (seconds * wpm as f64 / 60.0).max(4.0) as usize;
    let start = rng.random_range(0..pool.len());
    let mut text = String::new();
    let mut words = 0;
    let mut i = start;
    while words < want_words {
        let s = pool[i % pool.len()];
        words += s.split_whitespace().count();
        text.push_str(s);
        text.push(' ');
        i += 1;
    }
    text
}

/// Generates every student's file under `dir` (reusing files already there).
pub fn generate(plan: &Plan, dir: &Path) -> anyhow::Result<Vec<Student>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let n = plan.students;
    let mut out = Vec::with_capacity(n);
    for index in 0..n {
        // One bad file of each kind per ten students, at fixed places; the
        // rest mostly on topic.
        let kind = match (index % 10, n >= 4) {
            (3, true) => Kind::Corrupt,
            (6, true) if n >= 6 => Kind::Silent,
            (8, true) if n >= 8 => Kind::Truncated,
            (4, _) | (9, _) => Kind::OffTopic,
            _ => Kind::OnTopic,
        };
        let voice = VOICES[index % VOICES.len()].to_owned();
        let wpm = 130 + rng.random_range(0..60u32);
        let target = if plan.max_seconds > plan.min_seconds {
            rng.random_range(plan.min_seconds..plan.max_seconds)
        } else {
            plan.min_seconds
        };
        let user = format!("student-{:02}", index + 1);
        let stem = format!("{user}-{}", plan.seed);
        let arrival = if n > 1 {
            plan.spread_seconds * index as f64 / (n - 1) as f64
        } else {
            0.0
        };
        let speech = dir.join(format!("{stem}.speech.wav"));
        let (file, audio_seconds) = match kind {
            Kind::OnTopic | Kind::OffTopic => {
                if !speech.exists() {
                    let text = text_for(kind, target, wpm, &mut rng);
                    run(Command::new("espeak-ng")
                        .args(["-v", &voice, "-s", &wpm.to_string(), "-w"])
                        .arg(&speech)
                        .arg(&text))?;
                }
                let secs = wav_seconds(&speech)?;
                // A mix of containers, as students' devices produce them.
                let file = match index % 3 {
                    0 => speech.clone(),
                    1 => encode(&speech, &dir.join(format!("{stem}.m4a")))?,
                    _ => encode(&speech, &dir.join(format!("{stem}.ogg")))?,
                };
                (file, secs)
            }
            Kind::Silent => {
                let file = dir.join(format!("{stem}.silent.wav"));
                if !file.exists() {
                    run(Command::new("ffmpeg")
                        .args(["-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i"])
                        .arg(format!("anullsrc=r=16000:cl=mono:d={target:.1}"))
                        .arg(&file))?;
                }
                (file, target)
            }
            Kind::Corrupt => {
                let file = dir.join(format!("{stem}.corrupt.mp4"));
                let bytes: Vec<u8> = (0..64 * 1024).map(|_| rng.random::<u8>()).collect();
                std::fs::write(&file, bytes)
                    .with_context(|| format!("writing {}", file.display()))?;
                (file, 0.0)
            }
            Kind::Truncated => {
                let full = dir.join(format!("{stem}.full.m4a"));
                if !full.exists() {
                    let text = text_for(Kind::OnTopic, target, wpm, &mut rng);
                    run(Command::new("espeak-ng")
                        .args(["-v", &voice, "-s", &wpm.to_string(), "-w"])
                        .arg(&speech)
                        .arg(&text))?;
                    encode(&speech, &full)?;
                }
                let bytes = std::fs::read(&full)?;
                let file = dir.join(format!("{stem}.truncated.m4a"));
                std::fs::write(&file, &bytes[..bytes.len().min(1500)])?;
                (file, 0.0)
            }
        };
        out.push(Student {
            index,
            user,
            kind,
            voice,
            words_per_minute: wpm,
            target_seconds: target,
            audio_seconds,
            file,
            arrival_seconds: arrival,
        });
    }
    Ok(out)
}

fn encode(wav: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    if !out.exists() {
        run(Command::new("ffmpeg")
            .args(["-nostdin", "-y", "-v", "error", "-i"])
            .arg(wav)
            .arg(out))?;
    }
    Ok(out.to_path_buf())
}

/// What intake does: 16 kHz mono 16-bit PCM (for the baselines).
pub fn normalize(input: &Path, out: &Path) -> anyhow::Result<()> {
    run(Command::new("ffmpeg")
        .args(["-nostdin", "-y", "-v", "error", "-i"])
        .arg(input)
        .args(["-vn", "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le"])
        .arg(out))
}
