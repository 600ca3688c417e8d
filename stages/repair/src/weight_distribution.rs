//! FSGMix's operation-weight distributions (FSGMix §III-B and its ablation): fitted on the M
//! weight vectors learned per failure image, then sampled to weight the operations of each
//! augmented view.
//! - `gmm`: an N-dimensional Gaussian mixture with K full-covariance components, fitted by EM
//!   (linfa-clustering), sampled by picking a component then mean + L·z (L: Cholesky factor).
//! - `mvn`: independent normals per weight (the paper's "MVN where all weights have independent
//!   distributions").
//! - `fixed`: one vector. The paper does not say which; we use the mean learned vector.
//!
//! Weights live in [0, 1] (the paper: w_i ∈ [0, 1]), so samples are clipped to it.

use anyhow::{bail, Context};
use linfa::traits::Fit;
use linfa::DatasetBase;
use linfa_clustering::GaussianMixtureModel;
use linfa_linalg::cholesky::Cholesky;
use ndarray::{Array1, Array2, Axis};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::rand_core::SeedableRng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "model")]
pub enum WeightModel {
    Gmm { components: usize },
    Mvn,
    Fixed,
}

/// A fitted distribution over weight vectors of dimension `dim`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WeightDistribution {
    pub model: WeightModel,
    pub dim: usize,
    /// Mixture weights (one for mvn/fixed).
    pub component_weights: Vec<f64>,
    pub means: Vec<Vec<f64>>,
    /// Lower-triangular Cholesky factors of the covariances, row-major `dim × dim` each
    /// (diagonal for mvn, zero for fixed).
    pub cholesky: Vec<Vec<f64>>,
}

impl WeightDistribution {
    /// Fits `model` to `weights` (one learned vector per row).
    pub fn fit(weights: &Array2<f64>, model: WeightModel, seed: u64) -> anyhow::Result<Self> {
        let (m, dim) = weights.dim();
        if m == 0 || dim == 0 {
            bail!("no weight vectors to fit ({m} × {dim})");
        }
        let mean: Array1<f64> = weights.mean_axis(Axis(0)).context("mean")?;
        match model {
            WeightModel::Fixed => Ok(WeightDistribution {
                model,
                dim,
                component_weights: vec![1.0],
                means: vec![mean.to_vec()],
                cholesky: vec![vec![0.0; dim * dim]],
            }),
            WeightModel::Mvn => {
                let std = weights.std_axis(Axis(0), if m > 1 { 1.0 } else { 0.0 });
                let mut l = vec![0.0; dim * dim];
                for i in 0..dim {
                    l[i * dim + i] = std[i];
                }
                Ok(WeightDistribution {
                    model,
                    dim,
                    component_weights: vec![1.0],
                    means: vec![mean.to_vec()],
                    cholesky: vec![l],
                })
            }
            WeightModel::Gmm { components } => {
                if components == 0 || components > m {
                    bail!("a GMM with {components} components needs at least that many weight vectors (have {m})");
                }
                let rng = rand_xoshiro::Xoshiro256Plus::seed_from_u64(seed);
                let data = DatasetBase::from(weights.clone());
                let gmm = GaussianMixtureModel::params_with_rng(components, rng)
                    .n_runs(3)
                    .tolerance(1e-4)
                    .reg_covariance(1e-6)
                    .max_n_iterations(300)
                    .fit(&data)
                    .context("fitting the GMM by EM")?;
                let covs = gmm.covariances();
                let mut cholesky = vec![];
                for k in 0..components {
                    let cov: Array2<f64> = covs.index_axis(Axis(0), k).to_owned();
                    let l = cov.cholesky().context("Cholesky of a GMM covariance")?;
                    cholesky.push(l.iter().copied().collect());
                }
                Ok(WeightDistribution {
                    model,
                    dim,
                    component_weights: gmm.weights().to_vec(),
                    means: gmm.means().rows().into_iter().map(|r| r.to_vec()).collect(),
                    cholesky,
                })
            }
        }
    }

    /// Draws one weight vector, clipped to [0, 1].
    pub fn sample(&self, rng: &mut impl Rng) -> Vec<f64> {
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut k = self.component_weights.len() - 1;
        for (i, w) in self.component_weights.iter().enumerate() {
            acc += w;
            if u < acc {
                k = i;
                break;
            }
        }
        let z: Vec<f64> = (0..self.dim).map(|_| StandardNormal.sample(rng)).collect();
        let l = &self.cholesky[k];
        (0..self.dim)
            .map(|i| {
                let noise: f64 = (0..=i).map(|j| l[i * self.dim + j] * z[j]).sum();
                (self.means[k][i] + noise).clamp(0.0, 1.0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    /// 600 vectors in 3-D from two well-separated normals (weights 1/3, 2/3).
    fn two_blobs() -> Array2<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut rows = vec![];
        for i in 0..600 {
            let (centre, s) = if i % 3 == 0 {
                ([0.2, 0.8, 0.5], 0.03)
            } else {
                ([0.7, 0.3, 0.4], 0.05)
            };
            for c in centre {
                let z: f64 = StandardNormal.sample(&mut rng);
                rows.push(c + s * z);
            }
        }
        Array2::from_shape_vec((600, 3), rows).unwrap()
    }

    #[test]
    fn gmm_recovers_a_known_mixture_and_samples_from_it() {
        let w = two_blobs();
        let d = WeightDistribution::fit(&w, WeightModel::Gmm { components: 2 }, 3).unwrap();
        let (small, big) = if d.means[0][0] < d.means[1][0] {
            (0, 1)
        } else {
            (1, 0)
        };
        for (got, want) in d.means[small].iter().zip([0.2, 0.8, 0.5]) {
            assert!((got - want).abs() < 0.01, "{:?}", d.means);
        }
        for (got, want) in d.means[big].iter().zip([0.7, 0.3, 0.4]) {
            assert!((got - want).abs() < 0.01, "{:?}", d.means);
        }
        assert!((d.component_weights[small] - 1.0 / 3.0).abs() < 0.02);
        // Component std ≈ L's diagonal.
        assert!((d.cholesky[small][0] - 0.03).abs() < 0.006);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let samples: Vec<Vec<f64>> = (0..4000).map(|_| d.sample(&mut rng)).collect();
        let near_small = samples.iter().filter(|s| s[0] < 0.45).count() as f64 / 4000.0;
        assert!((near_small - 1.0 / 3.0).abs() < 0.03, "{near_small}");
        assert!(samples.iter().flatten().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn mvn_and_fixed_variants() {
        let w = two_blobs();
        let mean = w.mean_axis(Axis(0)).unwrap();
        let fixed = WeightDistribution::fit(&w, WeightModel::Fixed, 0).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(fixed.sample(&mut rng), mean.to_vec());
        let mvn = WeightDistribution::fit(&w, WeightModel::Mvn, 0).unwrap();
        let std = w.std_axis(Axis(0), 1.0);
        let samples: Vec<Vec<f64>> = (0..20000).map(|_| mvn.sample(&mut rng)).collect();
        for i in 0..3 {
            let m = samples.iter().map(|s| s[i]).sum::<f64>() / samples.len() as f64;
            assert!((m - mean[i]).abs() < 0.01, "dim {i}: {m} vs {}", mean[i]);
            let v = samples.iter().map(|s| (s[i] - m).powi(2)).sum::<f64>() / samples.len() as f64;
            assert!((v.sqrt() - std[i]).abs() < 0.01);
        }
        // Independent: the off-diagonal of L is zero even though the data are correlated.
        // Row 1, column 0 of the row-major 3×3 factor.
        assert_eq!(mvn.cholesky[0][3], 0.0);
        assert!(WeightDistribution::fit(&w, WeightModel::Gmm { components: 0 }, 0).is_err());
        assert!(WeightDistribution::fit(&Array2::zeros((0, 7)), WeightModel::Fixed, 0).is_err());
    }

    #[test]
    fn fitting_is_deterministic_for_a_seed() {
        let w = two_blobs();
        let a = WeightDistribution::fit(&w, WeightModel::Gmm { components: 2 }, 42).unwrap();
        let b = WeightDistribution::fit(&w, WeightModel::Gmm { components: 2 }, 42).unwrap();
        assert_eq!(a.means, b.means);
        let mut r1 = rand::rngs::StdRng::seed_from_u64(3);
        let mut r2 = rand::rngs::StdRng::seed_from_u64(3);
        assert_eq!(a.sample(&mut r1), b.sample(&mut r2));
    }
}
