//! Agreement between a grader (an evaluator, or the combined grade) and the
//! instructor on the same submissions: exact and adjacent agreement,
//! quadratic weighted kappa (QWK) with a bootstrap confidence interval, mean
//! difference and standardised mean difference. Pure functions, no I/O, so
//! the daemon, its benchmarks and tests all compute the same numbers.
//!
//! Grades are *ranks*: a level's position among its criterion's levels
//! sorted by points (0 = lowest), fractional for points between two levels
//! (a combined grade may be the mean of two evaluators). QWK is computed on
//! ranks divided by `levels - 1`, so criteria with different numbers of
//! levels can be pooled into one overall figure.
//!
//! QWK in its pairwise form: with quadratic weights, Cohen's (1968) weighted
//! kappa `1 − Σ w·O / Σ w·E` (observed and chance-expected tables from the
//! two raters' marginals) equals
//! `1 − mean((xᵢ − yᵢ)²) / (mean(x²) + mean(y²) − 2·mean(x)·mean(y))`,
//! which needs no table and accepts fractional ranks. Checked against
//! published worked examples in the tests.

use serde::{Deserialize, Serialize};

/// One submission's grade on one criterion, by the grader and by the
/// instructor, as ranks among `levels` levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rated {
    pub grader: f64,
    pub instructor: f64,
    /// Number of levels of the criterion (at least 2).
    pub levels: usize,
}

impl Rated {
    fn scaled(self) -> (f64, f64) {
        let span = self.levels.saturating_sub(1).max(1) as f64;
        (self.grader / span, self.instructor / span)
    }
}

/// How far a grader agrees with the instructor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Graded pairs compared.
    pub n: usize,
    /// Share of pairs on the same level.
    pub exact: f64,
    /// Share of pairs at most one level apart.
    pub adjacent: f64,
    /// Quadratic weighted kappa; `None` when undefined (both gave one and
    /// the same level to everything: no variation to agree on).
    pub qwk: Option<f64>,
    /// 95 % percentile bootstrap interval of the QWK (2,000 resamples of the
    /// pairs with replacement, fixed seed, so the same data always gives the
    /// same interval); `None` with fewer than 5 pairs or no defined QWK.
    pub qwk_ci95: Option<[f64; 2]>,
    /// Mean of grader − instructor, in levels (positive: the grader is more
    /// generous).
    pub mean_difference: f64,
    /// Standardised mean difference: (mean grader − mean instructor) ÷
    /// √((sd grader² + sd instructor²) ÷ 2), on scaled ranks (Williamson,
    /// Xi & Breyer 2012 recommend |SMD| ≤ 0.15); `None` when both are constant.
    pub smd: Option<f64>,
}

/// Cohen's unweighted kappa of two raters' categories (for reference and
/// tests; the daemon reports the quadratic weighted one). `None` when chance
/// agreement is total (both raters used one and the same category).
pub fn cohen_kappa(a: &[usize], b: &[usize]) -> Option<f64> {
    let n = a.len().min(b.len());
    if n == 0 {
        return None;
    }
    let k = a.iter().chain(b.iter()).copied().max().unwrap_or(0) + 1;
    let mut ra = vec![0f64; k];
    let mut rb = vec![0f64; k];
    let mut agree = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        ra[x] += 1.0;
        rb[y] += 1.0;
        if x == y {
            agree += 1.0;
        }
    }
    let n = n as f64;
    let po = agree / n;
    let pe: f64 = ra.iter().zip(&rb).map(|(p, q)| (p / n) * (q / n)).sum();
    if (1.0 - pe).abs() < 1e-12 {
        return None;
    }
    Some((po - pe) / (1.0 - pe))
}

/// Quadratic weighted kappa of two equally long series of scores (any real
/// scale; the weights are quadratic in the score difference). `None` when
/// undefined (empty, or no variation at all).
pub fn quadratic_weighted_kappa(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let (mut sx, mut sy, mut sxx, mut syy, mut obs) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        sx += a;
        sy += b;
        sxx += a * a;
        syy += b * b;
        obs += (a - b) * (a - b);
    }
    let expected = sxx / nf + syy / nf - 2.0 * (sx / nf) * (sy / nf);
    if expected.abs() < 1e-12 {
        return None;
    }
    Some(1.0 - (obs / nf) / expected)
}

/// A small deterministic generator (SplitMix64) for the bootstrap: the same
/// data always gives the same interval.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const BOOTSTRAP_RESAMPLES: usize = 2000;
const BOOTSTRAP_SEED: u64 = 0x5EED_CA11_B8A7_E000;

fn qwk_of(pairs: &[Rated]) -> Option<f64> {
    let (x, y): (Vec<f64>, Vec<f64>) = pairs.iter().map(|p| p.scaled()).unzip();
    quadratic_weighted_kappa(&x, &y)
}

fn bootstrap_ci(pairs: &[Rated]) -> Option<[f64; 2]> {
    if pairs.len() < 5 {
        return None;
    }
    let mut rng = SplitMix(BOOTSTRAP_SEED);
    let mut sample = Vec::with_capacity(pairs.len());
    let mut values = Vec::with_capacity(BOOTSTRAP_RESAMPLES);
    for _ in 0..BOOTSTRAP_RESAMPLES {
        sample.clear();
        for _ in 0..pairs.len() {
            sample.push(pairs[rng.below(pairs.len())]);
        }
        // A resample with no variation has no kappa; it is left out.
        if let Some(q) = qwk_of(&sample) {
            values.push(q);
        }
    }
    if values.len() < BOOTSTRAP_RESAMPLES / 2 {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    Some([at(0.025), at(0.975)])
}

/// The agreement of a grader with the instructor over `pairs`; `None` when
/// there are none.
pub fn agreement(pairs: &[Rated]) -> Option<Agreement> {
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let exact = pairs
        .iter()
        .filter(|p| (p.grader - p.instructor).abs() < 1e-9)
        .count() as f64
        / n;
    let adjacent = pairs
        .iter()
        .filter(|p| (p.grader - p.instructor).abs() <= 1.0 + 1e-9)
        .count() as f64
        / n;
    let mean_difference = pairs.iter().map(|p| p.grader - p.instructor).sum::<f64>() / n;
    let scaled: Vec<(f64, f64)> = pairs.iter().map(|p| p.scaled()).collect();
    let mean = |f: &dyn Fn(&(f64, f64)) -> f64| scaled.iter().map(f).sum::<f64>() / n;
    let (mg, mi) = (mean(&|p| p.0), mean(&|p| p.1));
    let (vg, vi) = (
        mean(&|p| (p.0 - mg) * (p.0 - mg)),
        mean(&|p| (p.1 - mi) * (p.1 - mi)),
    );
    let pooled = ((vg + vi) / 2.0).sqrt();
    let qwk = qwk_of(pairs);
    Some(Agreement {
        n: pairs.len(),
        exact,
        adjacent,
        qwk,
        qwk_ci95: qwk.and_then(|_| bootstrap_ci(pairs)),
        mean_difference,
        smd: (pooled > 1e-12).then(|| (mg - mi) / pooled),
    })
}

/// The usual bar for trusting automated scores: QWK ≥ 0.70 (Williamson, Xi &
/// Breyer 2012, "A framework for evaluation and use of automated scoring").
pub const TRUSTED_QWK: f64 = 0.70;

/// Whether an agreement meets a bar, and a sentence an instructor can act on.
pub fn verdict(a: Option<&Agreement>, min_sample: usize, min_qwk: f64) -> (bool, String) {
    let n = a.map_or(0, |a| a.n);
    if n < min_sample {
        let more = min_sample - n;
        return (
            false,
            format!(
                "Too few graded submissions: grade at least {more} more ({n} of {min_sample} so far)."
            ),
        );
    }
    let Some(q) = a.and_then(|a| a.qwk) else {
        return (
            false,
            format!(
                "Agreement cannot be measured yet: every grade on {n} submissions is the same \
                 level; grade some answers of other levels."
            ),
        );
    };
    if q >= min_qwk {
        (
            true,
            format!("Agreement is good enough to trust (QWK {q:.2} on {n} submissions)."),
        )
    } else if q >= 0.4 {
        (
            false,
            format!(
                "Agreement is moderate (QWK {q:.2} on {n} submissions, below {min_qwk:.2}): \
                 review grades before releasing them."
            ),
        )
    } else {
        (
            false,
            format!(
                "Agreement is poor (QWK {q:.2} on {n} submissions): do not trust these grades; \
                 refine the rubric or grade by hand."
            ),
        )
    }
}

/// The rank of `points` among a criterion's levels sorted by points:
/// a level's index, fractional between two levels, clamped to the ends.
pub fn rank_of_points(criterion: &crate::Criterion, points: f64) -> f64 {
    let mut p: Vec<f64> = criterion.levels.iter().map(|l| l.points).collect();
    p.sort_by(f64::total_cmp);
    let Some((&first, &last)) = p.first().zip(p.last()) else {
        return 0.0;
    };
    if points <= first {
        return 0.0;
    }
    if points >= last {
        return (p.len() - 1) as f64;
    }
    for (i, w) in p.windows(2).enumerate() {
        if points <= w[1] {
            let span = w[1] - w[0];
            return if span > 0.0 {
                i as f64 + (points - w[0]) / span
            } else {
                i as f64 + 1.0
            };
        }
    }
    (p.len() - 1) as f64
}

/// The rank of a level label, `None` when the criterion has no such level.
pub fn rank_of_level(criterion: &crate::Criterion, label: &str) -> Option<f64> {
    let level = criterion.levels.iter().find(|l| l.label == label)?;
    Some(rank_of_points(criterion, level.points))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Cohen's kappa, the textbook 2×2 example (Wikipedia, "Cohen's kappa",
    /// worked example: 50 proposals, both say yes 20, A yes B no 5, A no B
    /// yes 10, both no 15: p_o = 0.7, p_e = 0.5, κ = 0.4).
    #[test]
    fn cohen_kappa_matches_the_textbook_example() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (x, y, n) in [(1, 1, 20), (1, 0, 5), (0, 1, 10), (0, 0, 15)] {
            for _ in 0..n {
                a.push(x);
                b.push(y);
            }
        }
        assert!(close(cohen_kappa(&a, &b).expect("defined"), 0.4));
        // With two categories quadratic weights are 0/1: QWK = κ.
        let f = |v: &[usize]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert!(close(
            quadratic_weighted_kappa(&f(&a), &f(&b)).expect("defined"),
            0.4
        ));
    }

    /// QWK, the published examples of Maple's
    /// `EssayTools[QuadraticWeightedKappa]` help page (scores 1–10):
    /// 0.758620689655172 and 0.438095238095238.
    #[test]
    fn qwk_matches_published_examples() {
        let h = [9.0, 7.0, 8.0, 7.0, 6.0, 8.0, 3.0, 5.0, 10.0];
        let m1 = [8.0, 8.0, 6.0, 6.0, 7.0, 6.0, 1.0, 4.0, 8.0];
        let m2 = [3.0, 5.0, 6.0, 6.0, 7.0, 6.0, 1.0, 4.0, 8.0];
        let q1 = quadratic_weighted_kappa(&h, &m1).expect("defined");
        let q2 = quadratic_weighted_kappa(&h, &m2).expect("defined");
        assert!((q1 - 0.758_620_689_655_172).abs() < 1e-12, "{q1}");
        assert!((q2 - 0.438_095_238_095_238).abs() < 1e-12, "{q2}");
        // Scale-free: the same on ranks scaled to 0..1 (how Viva pools criteria).
        let s = |v: &[f64]| v.iter().map(|x| (x - 1.0) / 9.0).collect::<Vec<_>>();
        let q = quadratic_weighted_kappa(&s(&h), &s(&m1)).expect("defined");
        assert!((q - q1).abs() < 1e-12);
    }

    #[test]
    fn perfect_agreement_is_one_and_constant_grades_have_no_kappa() {
        let same: Vec<Rated> = [0.0, 1.0, 2.0, 2.0, 1.0]
            .iter()
            .map(|&r| Rated {
                grader: r,
                instructor: r,
                levels: 3,
            })
            .collect();
        let a = agreement(&same).expect("agreement");
        assert_eq!((a.n, a.exact, a.adjacent), (5, 1.0, 1.0));
        assert!(close(a.qwk.expect("qwk"), 1.0));
        assert_eq!(a.smd, Some(0.0));
        assert_eq!(a.mean_difference, 0.0);
        let constant = vec![
            Rated {
                grader: 1.0,
                instructor: 1.0,
                levels: 3
            };
            4
        ];
        let a = agreement(&constant).expect("agreement");
        assert_eq!((a.qwk, a.qwk_ci95, a.smd), (None, None, None));
        assert!(agreement(&[]).is_none());
    }

    #[test]
    fn exact_adjacent_and_mean_difference_count_levels() {
        // Grader vs instructor on a 4-level criterion: equal, one up, two up, one down.
        let pairs: Vec<Rated> = [(1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (0.0, 1.0)]
            .iter()
            .map(|&(g, i)| Rated {
                grader: g,
                instructor: i,
                levels: 4,
            })
            .collect();
        let a = agreement(&pairs).expect("agreement");
        assert!(close(a.exact, 0.25));
        assert!(close(a.adjacent, 0.75));
        assert!(close(a.mean_difference, 0.5));
        // The instructor is constant here: expected disagreement comes from
        // the grader's spread alone, so QWK is 0 at best; it is defined.
        assert!(a.qwk.is_some());
    }

    #[test]
    fn the_bootstrap_interval_is_fixed_and_contains_the_estimate() {
        let pairs: Vec<Rated> = [
            (0, 0),
            (1, 1),
            (2, 2),
            (2, 1),
            (1, 0),
            (0, 0),
            (2, 2),
            (1, 2),
            (0, 1),
            (2, 2),
            (1, 1),
            (0, 0),
        ]
        .iter()
        .map(|&(g, i)| Rated {
            grader: g as f64,
            instructor: i as f64,
            levels: 3,
        })
        .collect();
        let a = agreement(&pairs).expect("agreement");
        let b = agreement(&pairs).expect("agreement");
        let [lo, hi] = a.qwk_ci95.expect("interval");
        let q = a.qwk.expect("qwk");
        assert!(lo <= q && q <= hi && lo < hi, "{lo} {q} {hi}");
        assert_eq!(a, b, "same data, same interval");
        assert!(agreement(&pairs[..4]).expect("a").qwk_ci95.is_none());
    }

    #[test]
    fn verdicts_say_what_to_do() {
        let a = |qwk: Option<f64>, n: usize| Agreement {
            n,
            exact: 0.5,
            adjacent: 1.0,
            qwk,
            qwk_ci95: None,
            mean_difference: 0.0,
            smd: None,
        };
        let (ok, s) = verdict(Some(&a(Some(0.78), 12)), 10, TRUSTED_QWK);
        assert!(ok);
        assert_eq!(
            s,
            "Agreement is good enough to trust (QWK 0.78 on 12 submissions)."
        );
        let (ok, s) = verdict(Some(&a(Some(0.9), 3)), 10, TRUSTED_QWK);
        assert!(!ok && s.starts_with("Too few graded submissions: grade at least 7 more"));
        let (ok, s) = verdict(None, 5, TRUSTED_QWK);
        assert!(!ok && s.contains("at least 5 more"), "{s}");
        assert!(!verdict(Some(&a(Some(0.5), 12)), 10, TRUSTED_QWK).0);
        assert!(
            verdict(Some(&a(Some(0.1), 12)), 10, TRUSTED_QWK)
                .1
                .contains("poor")
        );
        assert!(!verdict(Some(&a(None, 12)), 10, TRUSTED_QWK).0);
    }

    #[test]
    fn ranks_follow_points_and_interpolate_between_levels() {
        let c: crate::Criterion = serde_json::from_value(serde_json::json!({
            "id": "c", "title": "C",
            "levels": [{"label": "top", "points": 4}, {"label": "none", "points": 0},
                       {"label": "some", "points": 2}]
        }))
        .expect("criterion");
        assert_eq!(rank_of_level(&c, "none"), Some(0.0));
        assert_eq!(rank_of_level(&c, "some"), Some(1.0));
        assert_eq!(rank_of_level(&c, "top"), Some(2.0));
        assert_eq!(rank_of_level(&c, "nope"), None);
        assert!(close(rank_of_points(&c, 3.0), 1.5));
        assert_eq!(rank_of_points(&c, -1.0), 0.0);
        assert_eq!(rank_of_points(&c, 9.0), 2.0);
    }
}
