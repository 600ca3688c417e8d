//! Noise: gaussian_noise, shot_noise, impulse_noise.

use super::unit_to_u8;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

use rand_distr::{Distribution, Normal};

pub(crate) const GAUSSIAN_NOISE: [f64; 5] = [0.04, 0.06, 0.08, 0.09, 0.10];
pub(crate) const SHOT_NOISE: [f64; 5] = [500.0, 250.0, 100.0, 75.0, 50.0];
pub(crate) const IMPULSE_NOISE: [f64; 5] = [0.01, 0.02, 0.03, 0.05, 0.07];

pub(super) fn gaussian_noise(px: &[u8], s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let c = GAUSSIAN_NOISE[s];
    let n = Normal::new(0.0, c).expect("valid normal");
    px.iter()
        .map(|&v| unit_to_u8(v as f64 / 255.0 + n.sample(rng)))
        .collect()
}
/// `np.random.poisson(x * c) / c`. x takes 256 values, so each severity keeps the Poisson CDF
/// of every byte value (built once) and samples by inversion: exact up to a tail mass below
/// 1e-15 (truncated), and several times faster than constructing a sampler per pixel.
pub(super) fn shot_noise(px: &[u8], s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let c = SHOT_NOISE[s];
    let tables = poisson_tables(s);
    px.iter()
        .map(|&v| unit_to_u8(tables[v as usize].sample(rng.random()) as f64 / c))
        .collect()
}
/// Inverse-CDF sampler of one Poisson law with a guide table (Chen & Asau): `guide[j]` is the
/// first k with `cdf[k] > j / guide.len()`, so a draw scans about one entry.
struct PoissonTable {
    cdf: Vec<f64>,
    guide: Vec<u32>,
}
impl PoissonTable {
    fn new(lam: f64) -> PoissonTable {
        let kmax = (lam + 40.0 * lam.sqrt() + 40.0) as usize;
        let mut cdf = Vec::with_capacity(kmax + 1);
        let mut acc = 0.0;
        let mut logp = -lam;
        for k in 0..=kmax {
            if k > 0 {
                logp += lam.ln() - (k as f64).ln();
            }
            acc += logp.exp();
            cdf.push(acc);
            if k as f64 > lam && 1.0 - acc < 1e-16 {
                break;
            }
        }
        let g = cdf.len();
        let mut guide = Vec::with_capacity(g);
        let mut k = 0usize;
        for j in 0..g {
            let t = j as f64 / g as f64;
            while k + 1 < cdf.len() && cdf[k] <= t {
                k += 1;
            }
            guide.push(k as u32);
        }
        PoissonTable { cdf, guide }
    }

    #[inline]
    fn sample(&self, u: f64) -> usize {
        let j = ((u * self.guide.len() as f64) as usize).min(self.guide.len() - 1);
        let mut k = self.guide[j] as usize;
        let last = self.cdf.len() - 1;
        while k < last && self.cdf[k] <= u {
            k += 1;
        }
        k
    }
}
fn poisson_tables(s: usize) -> &'static [PoissonTable] {
    static TABLES: [OnceLock<Vec<PoissonTable>>; 5] = [const { OnceLock::new() }; 5];
    TABLES[s].get_or_init(|| {
        (0..256)
            .map(|v| PoissonTable::new(v as f64 / 255.0 * SHOT_NOISE[s]))
            .collect()
    })
}
/// `skimage.util.random_noise(mode='s&p', amount=c)`: each value independently (per channel) is
/// flipped with probability `c`, and a flipped value becomes 1 or 0 with probability 1/2.
pub(super) fn impulse_noise(px: &[u8], s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let c = IMPULSE_NOISE[s];
    px.iter()
        .map(|&v| {
            let v = v as f64 / 255.0;
            // one 64-bit draw: the top 53 bits give U[0, 1) for `flipped`, the lowest bit
            // (independent of them) the salt-or-pepper coin
            let r: u64 = rng.random();
            let flipped = (r >> 11) as f64 * (1.0 / (1u64 << 53) as f64) <= c;
            let salted = r & 1 == 1;
            unit_to_u8(match (flipped, salted) {
                (true, true) => 1.0,
                (true, false) => 0.0,
                _ => v,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_table_inverts_the_cdf() {
        for lam in [0.0, 0.3, 7.0, 100.0, 500.0] {
            let t = PoissonTable::new(lam);
            for i in 0..2000 {
                let u = (i as f64 + 0.5) / 2000.0;
                let k = t.sample(u);
                let slow = t.cdf.partition_point(|&p| p <= u).min(t.cdf.len() - 1);
                assert_eq!(k, slow, "lam {lam} u {u}");
            }
            let mean: f64 = t
                .cdf
                .iter()
                .enumerate()
                .map(|(k, &c)| k as f64 * (c - if k > 0 { t.cdf[k - 1] } else { 0.0 }))
                .sum();
            assert!(
                (mean - lam).abs() < 1e-6 * (1.0 + lam),
                "lam {lam}: mean {mean}"
            );
        }
    }
}
