//! When a phase switch pays for itself (two-phase policy).
//!
//! Switching phases stops one kind of model and loads the other: seconds on
//! a CPU with small models, 5–90 s per model on a GPU with production
//! models. When uploads trickle in, switching for each one would spend more
//! time loading than computing. So when the loaded kind has nothing left to
//! do and work of the other kind waits, the scheduler switches only when
//!
//! - the waiting work (its predicted service seconds: transcription and
//!   evaluation for uploads still to transcribe, evaluation for transcribed
//!   ones) is at least `swap_work_ratio` × the round trip of swaps it costs
//!   (load the other kind now, load this one back later, and the two
//!   stops), or
//! - its oldest submission has waited so long that, with the other kind's
//!   load and the work itself, it would be done only at `max_phase_wait`
//!   (the latency bound), or
//! - waiting is unlikely to gather anything: at the recent arrival rate
//!   fewer than one more submission is expected before the bound (a lone
//!   upload into a quiet system starts at once).
//!
//! Otherwise it holds the switch until the arrival rate says the threshold
//! will be reached, or the bound, whichever is first, and the ETA planner
//! starts that phase no earlier. With small models on a CPU (loads of
//! 0.1–0.7 s, seconds of evaluation per answer) one submission's work
//! already exceeds the round trip, so the rule is the seed's: switch at
//! once. `swap_work_ratio = 0` turns holding off (the tests' fake workers,
//! whose instant work is always worth less than their loads, use it).

/// Everything the rule looks at, in seconds (and submissions per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwapInput {
    /// Predicted service time of the work waiting for the other kind.
    pub waiting_work_s: f64,
    /// How long the oldest of it has waited.
    pub oldest_wait_s: f64,
    /// Service time one more arrival would add to it.
    pub per_item_work_s: f64,
    /// Recent arrivals per second.
    pub arrival_rate: f64,
    /// Load the other kind, load this one back later, both stops.
    pub round_trip_s: f64,
    pub ratio: f64,
    pub max_wait_s: f64,
}

/// Switch now, or hold the switch for this many seconds at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Swap {
    Now,
    HoldFor(f64),
}

/// The rule above.
pub fn decide(i: &SwapInput) -> Swap {
    if i.ratio <= 0.0 || i.round_trip_s <= 0.0 {
        return Swap::Now;
    }
    let threshold = i.ratio * i.round_trip_s;
    if i.waiting_work_s >= threshold {
        return Swap::Now;
    }
    // The hold ends early enough for the held work to be done within the
    // bound: the other kind's load (half the round trip) and the work itself.
    let to_bound = i.max_wait_s - i.oldest_wait_s - i.round_trip_s / 2.0 - i.waiting_work_s;
    if to_bound <= 0.0 {
        return Swap::Now;
    }
    if i.arrival_rate * to_bound < 1.0 {
        return Swap::Now;
    }
    let fill_rate = i.arrival_rate * i.per_item_work_s;
    let to_fill = if fill_rate > 0.0 {
        (threshold - i.waiting_work_s) / fill_rate
    } else {
        f64::INFINITY
    };
    Swap::HoldFor(to_fill.min(to_bound).max(0.0))
}

/// Whether a batch opened now is the quick path the rule promises a lone
/// upload into a quiet daemon: no arrival rate (so nothing would be held
/// for it now), on a scale where its evaluation alone does not pay for a
/// round trip (so arrivals coming while it is transcribed would make the
/// rule hold it). Such a batch takes no one else and its evaluation is not
/// held: the ETA its student read at upload (STT, then evaluation at once)
/// is kept, instead of being stretched by a hold that the next arrivals
/// bring. With small models one answer pays for the swap and batches keep
/// the seed's rules.
pub fn quick_path(ratio: f64, arrival_rate: f64, eval_work_s: f64, round_trip_s: f64) -> bool {
    ratio > 0.0 && round_trip_s > 0.0 && arrival_rate <= 0.0 && eval_work_s < ratio * round_trip_s
}

/// Submissions per second expected from now, from the arrivals of the last
/// `window_s` (timestamps in ms): one over their mean gap, or 0 when there
/// were fewer than two, or when it has been silent for more than three mean
/// gaps since the last (a burst or a class that is over: waiting for more
/// would only add latency).
pub fn arrival_rate(arrivals_ms: impl IntoIterator<Item = i64>, now_ms: i64, window_s: f64) -> f64 {
    match arrivals(arrivals_ms, now_ms, window_s) {
        Some((gap, silent_at)) if now_ms <= silent_at => 1000.0 / gap,
        _ => 0.0,
    }
}

/// When the silence rule of [`arrival_rate`] will end the current rate (ms),
/// if there is one: a held switch is decided again then.
pub fn silent_at(
    arrivals_ms: impl IntoIterator<Item = i64>,
    now_ms: i64,
    window_s: f64,
) -> Option<i64> {
    arrivals(arrivals_ms, now_ms, window_s)
        .map(|(_, at)| at)
        .filter(|&at| at >= now_ms)
}

/// The mean gap (ms) of the window's arrivals and when silence ends them.
fn arrivals(
    arrivals_ms: impl IntoIterator<Item = i64>,
    now_ms: i64,
    window_s: f64,
) -> Option<(f64, i64)> {
    let from = now_ms - (window_s * 1000.0) as i64;
    let mut recent: Vec<i64> = arrivals_ms.into_iter().filter(|&t| t >= from).collect();
    if recent.len() < 2 || window_s <= 0.0 {
        return None;
    }
    recent.sort_unstable();
    let (first, last) = (recent[0], recent[recent.len() - 1]);
    let mean_gap_ms = ((last - first) as f64 / (recent.len() - 1) as f64).max(1.0);
    Some((mean_gap_ms, last + (3.0 * mean_gap_ms).ceil() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One H100 with Whisper large-v3 and two 8 B evaluators: a round trip
    /// of about 40 s, a submission's work about 4 s.
    fn gpu() -> SwapInput {
        SwapInput {
            waiting_work_s: 4.0,
            oldest_wait_s: 0.0,
            per_item_work_s: 4.0,
            arrival_rate: 1.0 / 40.0,
            round_trip_s: 40.0,
            ratio: 1.0,
            max_wait_s: 300.0,
        }
    }

    #[test]
    fn small_models_switch_at_once_as_the_seed_does() {
        // Test models on a CPU: loads of 0.1–0.7 s, seconds of work.
        let cpu = SwapInput {
            waiting_work_s: 6.0,
            round_trip_s: 1.4,
            ..gpu()
        };
        assert_eq!(decide(&cpu), Swap::Now);
        assert_eq!(
            decide(&SwapInput {
                ratio: 0.0,
                ..gpu()
            }),
            Swap::Now,
            "holding off"
        );
    }

    #[test]
    fn a_trickle_holds_until_the_work_pays_for_the_swap() {
        // 36 s of work still missing, 0.1 s of work arriving per second:
        // 360 s, but the bound comes first (300 s less the 20 s load and
        // the 4 s of work).
        match decide(&gpu()) {
            Swap::HoldFor(s) => assert!((s - 276.0).abs() < 1e-9, "{s}"),
            Swap::Now => panic!("a trickle should not switch for one upload"),
        }
        let busier = SwapInput {
            arrival_rate: 1.0 / 10.0,
            ..gpu()
        };
        assert_eq!(
            decide(&busier),
            Swap::HoldFor(90.0),
            "36 s of work at 0.4 s/s"
        );
        let enough = SwapInput {
            waiting_work_s: 40.0,
            ..gpu()
        };
        assert_eq!(decide(&enough), Swap::Now);
    }

    #[test]
    fn the_latency_bound_and_a_quiet_system_switch_at_once() {
        let waited = SwapInput {
            oldest_wait_s: 276.0,
            ..gpu()
        };
        assert_eq!(
            decide(&waited),
            Swap::Now,
            "load and work would end at the bound"
        );
        let nearly = SwapInput {
            oldest_wait_s: 266.0,
            arrival_rate: 1.0,
            per_item_work_s: 0.0,
            ..gpu()
        };
        assert_eq!(decide(&nearly), Swap::HoldFor(10.0), "never past the bound");
        let quiet = SwapInput {
            arrival_rate: 0.0,
            ..gpu()
        };
        assert_eq!(decide(&quiet), Swap::Now, "a lone upload starts at once");
        let rare = SwapInput {
            arrival_rate: 1.0 / 600.0,
            ..gpu()
        };
        assert_eq!(
            decide(&rare),
            Swap::Now,
            "no company expected before the bound"
        );
    }

    #[test]
    fn only_a_lone_upload_at_gpu_scale_takes_the_quick_path() {
        // A lone upload: no rate; its evaluation (2.2 s) is far below the
        // 15 s round trip.
        assert!(quick_path(1.0, 0.0, 2.2, 15.0));
        assert!(!quick_path(1.0, 0.1, 2.2, 15.0), "others are arriving");
        assert!(
            !quick_path(1.0, 0.0, 6.0, 1.4),
            "small models: one answer pays for the swap, the seed's batch"
        );
        assert!(!quick_path(0.0, 0.0, 2.2, 15.0), "holding off");
    }

    #[test]
    fn arrival_rate_follows_the_recent_gaps_and_ends_with_silence() {
        let now = 1_000_000;
        // A trickle: one every 20 s, the last 10 s ago (the first is outside
        // the window).
        let ts = [now - 700_000, now - 50_000, now - 30_000, now - 10_000];
        assert!((arrival_rate(ts, now, 600.0) - 1.0 / 20.0).abs() < 1e-12);
        assert_eq!(
            arrival_rate([now], now, 600.0),
            0.0,
            "one arrival is no rate"
        );
        // A burst of 30 within 3 s, 100 s ago: over.
        let burst: Vec<i64> = (0..30).map(|i| now - 100_000 - i * 100).collect();
        assert_eq!(arrival_rate(burst.clone(), now, 600.0), 0.0);
        // ... but while it lasts, it is fast, and silence ends it 3 gaps on.
        assert!(arrival_rate(burst.clone(), now - 99_900, 600.0) > 5.0);
        assert_eq!(
            silent_at(burst, now - 99_900, 600.0),
            Some(now - 100_000 + 300)
        );
    }
}
