//! A small reader for the one WAV flavour the worker accepts: 16 kHz, mono,
//! 16-bit PCM — what the daemon's intake writes after normalising an upload
//! with ffmpeg. Anything else is refused with a message saying how to
//! convert it.

use std::path::Path;

use crate::WorkerError;

/// Sample rate Whisper expects.
pub const SAMPLE_RATE: u32 = 16_000;

/// What the file says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavFormat {
    pub format_tag: u16,
    pub channels: u16,
    pub sample_rate: u32,
    pub bits: u16,
}

/// Reads a 16 kHz mono s16 WAV file as samples in [-1, 1).
pub fn read_wav(path: &Path) -> Result<Vec<f32>, WorkerError> {
    let bytes = std::fs::read(path).map_err(|e| WorkerError::Audio {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    parse_wav(&bytes).map_err(|reason| WorkerError::Audio {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses WAV bytes; the error is a plain-words reason.
pub fn parse_wav(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err("not a WAV file (no RIFF/WAVE header)".into());
    }
    let mut pos = 12;
    let mut format: Option<WavFormat> = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let body = pos + 8;
        match id {
            b"fmt " => {
                if size < 16 || body + 16 > bytes.len() {
                    return Err("truncated fmt chunk".into());
                }
                let u16_at = |o: usize| u16::from_le_bytes([bytes[body + o], bytes[body + o + 1]]);
                let mut format_tag = u16_at(0);
                // WAVE_FORMAT_EXTENSIBLE: the real format is the first two
                // bytes of the sub-format GUID.
                if format_tag == 0xFFFE && size >= 26 && body + 26 <= bytes.len() {
                    format_tag = u16_at(24);
                }
                format = Some(WavFormat {
                    format_tag,
                    channels: u16_at(2),
                    sample_rate: u32::from_le_bytes([
                        bytes[body + 4],
                        bytes[body + 5],
                        bytes[body + 6],
                        bytes[body + 7],
                    ]),
                    bits: u16_at(14),
                });
            }
            b"data" => {
                let f = format.ok_or("the data chunk comes before the fmt chunk")?;
                check_format(f)?;
                // Streamed WAVs carry 0 or 0xFFFFFFFF: take the rest of the file.
                let end = if size == 0 || size == u32::MAX as usize || body + size > bytes.len() {
                    bytes.len()
                } else {
                    body + size
                };
                let data = &bytes[body..end];
                return Ok(data
                    .chunks_exact(2)
                    .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) / 32768.0)
                    .collect());
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        pos = body.saturating_add(size).saturating_add(size & 1);
    }
    Err("no data chunk".into())
}

fn check_format(f: WavFormat) -> Result<(), String> {
    if f.format_tag == 1 && f.channels == 1 && f.sample_rate == SAMPLE_RATE && f.bits == 16 {
        return Ok(());
    }
    let kind = match f.format_tag {
        1 => format!("{}-bit PCM", f.bits),
        3 => format!("{}-bit float", f.bits),
        t => format!("format {t:#x}"),
    };
    Err(format!(
        "expected 16 kHz mono 16-bit PCM, got {} Hz, {} channel(s), {kind}; convert it with `ffmpeg -i IN -ar 16000 -ac 1 -c:a pcm_s16le OUT.wav` (the daemon's intake does this for uploads)",
        f.sample_rate, f.channels
    ))
}

/// A WAV file's bytes for `samples` (tests and benchmarks).
pub fn encode_wav(samples: &[i16], sample_rate: u32, channels: u16) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut v = Vec::with_capacity(44 + samples.len() * 2);
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&sample_rate.to_le_bytes());
    v.extend_from_slice(&(sample_rate * u32::from(channels) * 2).to_le_bytes());
    v.extend_from_slice(&(channels * 2).to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_16k_mono_pcm_and_skips_other_chunks() {
        let mut w = encode_wav(&[0, 16384, -32768], 16_000, 1);
        // Insert a LIST chunk of odd size (padded) before "data".
        let data_at = w.windows(4).position(|c| c == b"data").expect("data");
        let list = [b"LIST".as_slice(), &3u32.to_le_bytes(), b"abc\0"].concat();
        w.splice(data_at..data_at, list);
        let s = parse_wav(&w).expect("parse");
        assert_eq!(s, vec![0.0, 0.5, -1.0]);
    }

    #[test]
    fn refuses_other_formats_with_the_fix() {
        let err = parse_wav(&encode_wav(&[0, 0], 44_100, 2)).expect_err("stereo");
        assert!(err.contains("44100 Hz") && err.contains("ffmpeg"), "{err}");
        assert!(parse_wav(b"OggS....").is_err());
        assert!(parse_wav(&encode_wav(&[], 16_000, 1)[..40]).is_err());
    }

    #[test]
    fn streamed_size_means_rest_of_file() {
        let mut w = encode_wav(&[1, 2, 3, 4], 16_000, 1);
        let n = w.len();
        w[n - 12..n - 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_wav(&w).expect("parse").len(), 4);
    }
}
