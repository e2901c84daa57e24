//! The deterministic blend of sources by weight.
//!
//! Weights are quantized to integer shares `a_i` of a period `D = sum(a_i)` (resolution 1e-4,
//! reduced by their gcd: weights 3 and 1 give the period `[0, 0, 1, 0]`-like blend of length 4).
//! Inside a period the order is Tijdeman's solution of the chairman assignment problem: every
//! prefix of length `n` holds `n * a_i / D` samples of source `i` to within
//! `1 - 1/(2k - 2)` (k sources), so always within one sample. At the end of a period every source
//! has exactly its share, so the bound holds for all prefixes of the infinite sequence.
//!
//! Position `g` maps to `(source, k)` — `k` counts that source's earlier samples — in O(1) from a
//! table of one period.
//!
//! A source of weight 0 has share 0: it never appears in the blend (the job still evaluates its
//! held-out documents). The blend of the others is exactly the one they would have without it.

use crate::error::{CorpusError, Result};

/// Resolution of the quantized shares.
const RESOLUTION: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct Mixture {
    /// Integer share of each source in one period.
    shares: Vec<u64>,
    /// Source of each position of the period.
    source_at: Vec<u16>,
    /// How many earlier positions of the period hold the same source.
    rank_at: Vec<u32>,
}

impl Mixture {
    /// The blend of sources with these weights (finite, at least 0, at least one above 0).
    pub fn new(weights: &[f64]) -> Result<Self> {
        if weights.is_empty() || weights.len() > u16::MAX as usize {
            return Err(CorpusError::Invalid(format!(
                "a mixture needs 1 to 65535 sources, got {}",
                weights.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(CorpusError::Invalid(format!(
                "mixture weights must be numbers >= 0, got {w}"
            )));
        }
        // Tijdeman's bound depends on the number of sources taking part, so the blend is built
        // over the sources of positive weight only and mapped back to the caller's indices.
        let active: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
        if active.is_empty() {
            return Err(CorpusError::Invalid(
                "at least one mixture weight must be above 0".into(),
            ));
        }
        let positive: Vec<f64> = active.iter().map(|&i| weights[i]).collect();
        let blend = Self::from_shares(quantize(&positive));
        let mut shares = vec![0; weights.len()];
        for (j, &i) in active.iter().enumerate() {
            shares[i] = blend.shares[j];
        }
        Ok(Mixture {
            shares,
            source_at: blend
                .source_at
                .iter()
                .map(|&j| active[j as usize] as u16)
                .collect(),
            rank_at: blend.rank_at,
        })
    }

    /// The blend of sources with these integer shares, all positive.
    fn from_shares(shares: Vec<u64>) -> Self {
        let period: u64 = shares.iter().sum();
        let k = shares.len();
        let mut source_at = Vec::with_capacity(period as usize);
        let mut rank_at = Vec::with_capacity(period as usize);
        let mut counts = vec![0u64; k];
        if k == 1 {
            source_at.push(0);
            rank_at.push(0);
        } else {
            // sigma = 1 / (2k - 2): a source is eligible at time n when it is owed at least sigma
            // samples; among those, the one whose debt reaches 1 - sigma first goes next.
            let s = 2 * k as u128 - 2;
            let d = period as u128;
            for n in 1..=period as u128 {
                let mut best: Option<(usize, u128, u128)> = None; // (source, numerator, denominator)
                for (i, &a) in shares.iter().enumerate() {
                    let (a, c) = (a as u128, counts[i] as u128);
                    // owed = n*a/D - c >= 1/s  <=>  (n*a - c*D) * s >= D
                    let owed = (n * a) as i128 - (c * d) as i128;
                    if owed * (s as i128) < d as i128 {
                        continue;
                    }
                    // deadline = (c + 1 - 1/s) * D / a = ((c + 1) * s - 1) * D / (s * a)
                    let num = ((c + 1) * s - 1) * d;
                    let den = s * a;
                    let earlier = match best {
                        None => true,
                        Some((_, bn, bd)) => num * bd < bn * den,
                    };
                    if earlier {
                        best = Some((i, num, den));
                    }
                }
                // Tijdeman's theorem guarantees an eligible source; fall back to the largest
                // debt rather than panic if arithmetic ever says otherwise.
                let i = best.map_or_else(|| largest_debt(&shares, &counts, n as u64), |b| b.0);
                source_at.push(i as u16);
                rank_at.push(counts[i] as u32);
                counts[i] += 1;
            }
        }
        Mixture {
            shares,
            source_at,
            rank_at,
        }
    }

    /// Number of sources.
    pub fn len(&self) -> usize {
        self.shares.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shares.is_empty()
    }

    /// Length of one period of the blend.
    pub fn period(&self) -> u64 {
        self.source_at.len() as u64
    }

    /// The quantized share of source `i` (exact fraction of every period).
    pub fn share(&self, i: usize) -> f64 {
        self.shares[i] as f64 / self.period() as f64
    }

    /// The source of global position `g` and how many of that source's samples come before it.
    pub fn locate(&self, g: u64) -> (usize, u64) {
        let period = self.period();
        let (q, r) = (g / period, (g % period) as usize);
        let source = self.source_at[r] as usize;
        (source, q * self.shares[source] + self.rank_at[r] as u64)
    }

    /// How many of the first `n` positions belong to each source.
    pub fn counts(&self, n: u64) -> Vec<u64> {
        let period = self.period();
        let (q, r) = (n / period, (n % period) as usize);
        let mut counts: Vec<u64> = self.shares.iter().map(|a| q * a).collect();
        for &s in &self.source_at[..r] {
            counts[s as usize] += 1;
        }
        counts
    }
}

fn largest_debt(shares: &[u64], counts: &[u64], n: u64) -> usize {
    let period: u64 = shares.iter().sum();
    (0..shares.len())
        .max_by_key(|&i| (n as i128 * shares[i] as i128) - (counts[i] as i128 * period as i128))
        .unwrap_or(0)
}

/// Integer shares summing to at most RESOLUTION (largest remainder), each at least 1, reduced
/// by their gcd.
fn quantize(weights: &[f64]) -> Vec<u64> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights
        .iter()
        .map(|w| w / total * RESOLUTION as f64)
        .collect();
    let mut shares: Vec<u64> = exact.iter().map(|x| (x.floor() as u64).max(1)).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut assigned: u64 = shares.iter().sum();
    for &i in order.iter().cycle().take(weights.len() * 2) {
        if assigned >= RESOLUTION {
            break;
        }
        if exact[i] > shares[i] as f64 {
            shares[i] += 1;
            assigned += 1;
        }
    }
    let g = shares.iter().fold(0, |g, &a| gcd(g, a));
    shares.iter().map(|a| a / g).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_weights_are_exact() {
        let m = Mixture::new(&[3.0, 1.0]).expect("mixture");
        assert_eq!(m.period(), 4);
        assert_eq!(m.counts(4), vec![3, 1]);
        assert_eq!(m.counts(400), vec![300, 100]);
        let m = Mixture::new(&[0.8, 0.2]).expect("mixture");
        assert_eq!(m.period(), 5);
        assert!(Mixture::new(&[0.0, 0.0]).is_err());
        assert!(Mixture::new(&[1.0, -1.0]).is_err());
        assert!(Mixture::new(&[1.0, f64::NAN]).is_err());
    }

    #[test]
    fn weight_zero_is_never_sampled_and_leaves_the_rest_unchanged() {
        let m = Mixture::new(&[1.0, 0.0]).expect("mixture");
        assert_eq!(m.period(), 1);
        assert_eq!(m.share(1), 0.0);
        assert_eq!(m.counts(1000), vec![1000, 0]);
        assert!((0..1000).all(|g| m.locate(g) == (0, g)));
        // [3, 0, 1] is [3, 1] with an unused source in the middle.
        let with = Mixture::new(&[3.0, 0.0, 1.0]).expect("mixture");
        let without = Mixture::new(&[3.0, 1.0]).expect("mixture");
        assert_eq!(with.period(), without.period());
        for g in 0..1000 {
            let (s, k) = without.locate(g);
            assert_eq!(with.locate(g), ([0, 2][s], k), "position {g}");
        }
        assert_eq!(with.counts(1000), vec![750, 0, 250]);
    }

    proptest! {
        #[test]
        fn every_prefix_is_within_one_sample(
            weights in proptest::collection::vec(0.001f64..100.0, 1..7),
            zeros in proptest::collection::vec(any::<bool>(), 7),
            probe in 0u64..50_000,
        ) {
            // Some sources (never all) get weight 0: they must never be sampled.
            let mut weights = weights;
            for (i, w) in weights.iter_mut().enumerate().skip(1) {
                if zeros[i] {
                    *w = 0.0;
                }
            }
            let m = Mixture::new(&weights).expect("mixture");
            let period = m.period();
            let mut counts = vec![0u64; m.len()];
            for g in 0..period.min(20_000) {
                let (s, k) = m.locate(g);
                prop_assert_eq!(k, counts[s], "position {} of source {}", g, s);
                counts[s] += 1;
                let n = g + 1;
                for (i, &c) in counts.iter().enumerate() {
                    let ideal = n as f64 * m.share(i);
                    prop_assert!((c as f64 - ideal).abs() < 1.0, "n={} source {}: {} vs {}", n, i, c, ideal);
                }
            }
            // Far positions: locate agrees with counts, and shares track the weights.
            let (s, k) = m.locate(probe);
            prop_assert_eq!(k, m.counts(probe)[s]);
            let total: f64 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                prop_assert!((m.share(i) - w / total).abs() < 1e-3, "share {} vs weight {}", m.share(i), w / total);
            }
        }
    }
}
