//! Worker profiles at GPU scale, for the fake workers.
//!
//! A profile gives the times of one GPU serving Viva's three models —
//! loads, transcription as a fixed part plus a real-time factor, and
//! evaluator calls as a fixed part plus a per-item part — so the core
//! benchmark (`benches/core/gpu_scale.rs`) and `viva-lab --profile` can run
//! the scheduling policies at GPU scale on a CPU. Every time is divided by
//! a scale factor (the scheduler's rules compare times with each other, so
//! its decisions are those it would take at full scale). The figures and
//! their sources are in ARCHITECTURE.md, "Cost-aware phase switching".

/// Seconds at full scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub stt_load: f64,
    pub eval_load: f64,
    pub stt_fixed: f64,
    /// Transcription seconds per second of audio (real-time factor).
    pub stt_rtf: f64,
    pub eval_fixed: f64,
    pub eval_per_item: f64,
    /// GPU memory each model holds once loaded (MiB; the fake workers
    /// report it as measured) and the device's.
    pub stt_memory_mb: u64,
    pub eval_memory_mb: u64,
    pub device_memory_mb: u64,
}

/// One H100: Whisper large-v3 (f16) and two 8 B Q4_K_M GGUF evaluators.
pub const H100: Profile = Profile {
    name: "h100",
    stt_load: 5.0,
    eval_load: 10.0,
    stt_fixed: 0.3,
    stt_rtf: 0.03,
    eval_fixed: 1.0,
    eval_per_item: 1.2,
    stt_memory_mb: 3_900,
    eval_memory_mb: 6_000,
    device_memory_mb: 81_559,
};

/// The profiles `viva-lab --profile` knows, by name.
pub fn by_name(name: &str) -> Option<Profile> {
    [H100].into_iter().find(|p| p.name == name)
}

impl Profile {
    /// Environment for a fake STT worker running `scale` times faster.
    /// `audio_scaled`: the clips are `scale` times shorter too (the
    /// benchmark's tones), so the real-time factor stays; otherwise (the
    /// lab's real recordings) it is divided by the scale as well.
    pub fn stt_env(&self, scale: f64, audio_scaled: bool) -> Vec<(&'static str, String)> {
        let per_audio_second = if audio_scaled {
            self.stt_rtf * 1000.0
        } else {
            self.stt_rtf * 1000.0 / scale
        };
        vec![
            ("FAKE_LOAD_MS", ms(self.stt_load, scale)),
            ("FAKE_STT_FIXED_MS", ms(self.stt_fixed, scale)),
            ("FAKE_STT_MS_PER_AUDIO_SEC", format!("{per_audio_second}")),
            ("FAKE_DEVICE_MEMORY_MB", self.stt_memory_mb.to_string()),
            ("FAKE_DEVICE_TOTAL_MB", self.device_memory_mb.to_string()),
        ]
    }

    /// Environment for a fake evaluator running `scale` times faster.
    pub fn eval_env(&self, scale: f64) -> Vec<(&'static str, String)> {
        vec![
            ("FAKE_LOAD_MS", ms(self.eval_load, scale)),
            ("FAKE_EVAL_FIXED_MS", ms(self.eval_fixed, scale)),
            ("FAKE_EVAL_MS_PER_ITEM", ms(self.eval_per_item, scale)),
            ("FAKE_DEVICE_MEMORY_MB", self.eval_memory_mb.to_string()),
            ("FAKE_DEVICE_TOTAL_MB", self.device_memory_mb.to_string()),
        ]
    }

    /// One submission's transcription (s, full scale).
    pub fn stt_seconds(&self, audio_seconds: f64) -> f64 {
        self.stt_fixed + self.stt_rtf * audio_seconds
    }

    /// The lower bound of a run at full scale: every model loaded once,
    /// then each submission's work back to back after the later of its
    /// arrival and the previous one's (the STT model and the evaluators
    /// never wait for each other, the evaluators work side by side, one
    /// item per call). `uploads`: (arrival, audio seconds), full scale.
    pub fn lower_bound(&self, uploads: &[(f64, f64)]) -> f64 {
        let mut sorted = uploads.to_vec();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let eval = self.eval_fixed + self.eval_per_item;
        let (mut stt_free, mut eval_free) = (self.stt_load, self.eval_load);
        for (at, audio) in sorted {
            stt_free = stt_free.max(at) + self.stt_seconds(audio);
            eval_free = eval_free.max(stt_free) + eval;
        }
        eval_free
    }

    /// The lower bound of a two-phase run, whose promise is that the two
    /// kinds of model are never loaded together: the bound above, or when
    /// later, the last transcription (the STT model loaded once, uploads
    /// back to back from their arrivals) followed by the evaluators' load —
    /// which cannot start before that transcription ends — and the last
    /// item's evaluation; or all the work in series (the kinds never run
    /// side by side) with one load of each, every item in one evaluator
    /// call. No two-phase schedule, however well timed, beats it.
    pub fn two_phase_lower_bound(&self, uploads: &[(f64, f64)]) -> f64 {
        let mut sorted = uploads.to_vec();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut stt_free = self.stt_load;
        let mut stt_total = 0.0;
        for (at, audio) in &sorted {
            stt_free = stt_free.max(*at) + self.stt_seconds(*audio);
            stt_total += self.stt_seconds(*audio);
        }
        let after_last = stt_free + self.eval_load + self.eval_fixed + self.eval_per_item;
        let serial = self.stt_load
            + stt_total
            + self.eval_load
            + self.eval_fixed
            + sorted.len() as f64 * self.eval_per_item;
        self.lower_bound(uploads).max(after_last).max(serial)
    }
}

fn ms(seconds: f64, scale: f64) -> String {
    format!("{}", seconds * 1000.0 / scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_bound_is_loads_then_work_back_to_back() {
        // One upload at 0 of 100 s: evaluators loaded at 10, STT done at 5 + 3.3, evaluation 2.2 after both.
        let lb = H100.lower_bound(&[(0.0, 100.0)]);
        assert!((lb - 12.2).abs() < 1e-9, "{lb}");
        // A late upload: its arrival, then its own work.
        let lb = H100.lower_bound(&[(0.0, 100.0), (60.0, 100.0)]);
        assert!((lb - (60.0 + 3.3 + 2.2)).abs() < 1e-9, "{lb}");
        assert_eq!(by_name("h100"), Some(H100));
        // Two-phase: the evaluators load only after the transcription
        // (5 + 3.3), then evaluate (2.2).
        let two = H100.two_phase_lower_bound(&[(0.0, 100.0)]);
        assert!((two - 20.5).abs() < 1e-9, "{two}");
        // A late upload: after its transcription, one evaluator load.
        let two = H100.two_phase_lower_bound(&[(0.0, 100.0), (60.0, 100.0)]);
        assert!((two - (60.0 + 3.3 + 10.0 + 2.2)).abs() < 1e-9, "{two}");
        // Never below the co-resident bound.
        let many: Vec<(f64, f64)> = (0..40).map(|i| (i as f64, 60.0)).collect();
        assert!(H100.two_phase_lower_bound(&many) >= H100.lower_bound(&many));
        let env = H100.stt_env(10.0, false);
        assert!(
            env.contains(&("FAKE_STT_MS_PER_AUDIO_SEC", "3".into())),
            "{env:?}"
        );
    }
}
