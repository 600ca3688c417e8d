//! Choosing the failure image whose style guides an augmentation (DeepRepair §3.3).
//!
//! `uniform` is Eq. 3 with P_i = 1/|Dc|. `cluster` is Eq. 4–5: k-means with N clusters on
//! standardized pixels, then within cluster i, P_ij = (1/N)(1 − d_ij / Σ_k d_ik) where d_ij is the
//! L2 distance of member j to the cluster centre. As printed, Eq. 4 sums to (n_i − 1)/N over a
//! cluster of n_i members, not 1/N, so we divide by (n_i − 1): every cluster gets mass 1/N
//! (over non-empty clusters) and, within it, nearer members are likelier, exactly in the
//! proportions of Eq. 4. A single-member cluster gives its member the whole 1/N.
//!
//! Whose failures guide an image is [`ReferenceClass`]: Algorithm 1 (line 14: "K-means
//! clustering on Dc with number N") and the official code draw references regardless of the
//! training image's class, so the default `any` clusters (or samples uniformly from) all of Dc;
//! `same` keeps one sampler per class, a class without failures falling back to the pooled one.

use anyhow::{bail, Context};
use linfa::traits::{Fit, Predict};
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::{Array1, Array2, Axis};
use rand::Rng;
use rand_xoshiro::rand_core::SeedableRng;
use std::collections::BTreeMap;

/// How references are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    Uniform,
    Cluster { clusters: usize },
}

/// Which failures may guide a training image of class y.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceClass {
    /// All of Dc, whatever the image's class (Algorithm 1, the official code).
    Any,
    /// Failures of class y only.
    Same,
}

/// A discrete distribution over the indices of a set of failure images.
#[derive(Clone, Debug)]
pub struct ReferenceSampler {
    /// Indices into the caller's failure set.
    members: Vec<usize>,
    probabilities: Vec<f64>,
    cumulative: Vec<f64>,
    /// Cluster of each member (all 0 for uniform).
    clusters: Vec<usize>,
}

/// Z-scores each feature (pixel×channel) over the images, as scikit-learn's StandardScaler
/// does; a constant feature maps to 0. `images` is `n × dim` bytes.
pub fn standardize(images: &[u8], n: usize, dim: usize) -> anyhow::Result<Array2<f64>> {
    if images.len() != n * dim {
        bail!(
            "expected {n} images of {dim} bytes ({} bytes), got {}",
            n * dim,
            images.len()
        );
    }
    let mut x = Array2::from_shape_vec((n, dim), images.iter().map(|&b| b as f64).collect())
        .context("image matrix")?;
    let mean = x.mean_axis(Axis(0)).context("no images")?;
    let std = x.std_axis(Axis(0), 0.0);
    for mut row in x.rows_mut() {
        for ((v, m), s) in row.iter_mut().zip(&mean).zip(&std) {
            *v = if *s > 0.0 { (*v - m) / s } else { 0.0 };
        }
    }
    Ok(x)
}

impl ReferenceSampler {
    fn from_probabilities(
        members: Vec<usize>,
        probabilities: Vec<f64>,
        clusters: Vec<usize>,
    ) -> Self {
        let total: f64 = probabilities.iter().sum();
        let mut acc = 0.0;
        let cumulative = probabilities
            .iter()
            .map(|p| {
                acc += p / total;
                acc
            })
            .collect();
        ReferenceSampler {
            members,
            probabilities: probabilities.iter().map(|p| p / total).collect(),
            cumulative,
            clusters,
        }
    }

    pub fn uniform(members: Vec<usize>) -> anyhow::Result<Self> {
        if members.is_empty() {
            bail!("no failure images to sample references from");
        }
        let n = members.len();
        Ok(Self::from_probabilities(members, vec![1.0; n], vec![0; n]))
    }

    /// k-means on `features` (one row per member; e.g. [`standardize`]d pixels), then Eq. 4.
    /// Fewer members than clusters → one cluster per member.
    pub fn clustered(
        members: Vec<usize>,
        features: &Array2<f64>,
        clusters: usize,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let n = members.len();
        if n == 0 {
            bail!("no failure images to cluster");
        }
        if features.nrows() != n {
            bail!("{} feature rows for {n} members", features.nrows());
        }
        if clusters == 0 {
            bail!("clusters must be at least 1");
        }
        let k = clusters.min(n);
        let (assignment, centroids): (Array1<usize>, Array2<f64>) = if k == n {
            ((0..n).collect(), features.clone())
        } else {
            let rng = rand_xoshiro::Xoshiro256Plus::seed_from_u64(seed);
            let data = DatasetBase::from(features.clone());
            let model = KMeans::params_with_rng(k, rng)
                .n_runs(4)
                .max_n_iterations(200)
                .tolerance(1e-6)
                .fit(&data)
                .context("k-means on the failure images")?;
            (model.predict(features), model.centroids().clone())
        };
        let distances: Vec<f64> = (0..n)
            .map(|j| {
                let c = centroids.row(assignment[j]);
                features
                    .row(j)
                    .iter()
                    .zip(c)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let used: Vec<usize> = {
            let mut u: Vec<usize> = assignment.to_vec();
            u.sort_unstable();
            u.dedup();
            u
        };
        let n_clusters = used.len() as f64;
        let mut probabilities = vec![0.0; n];
        for &c in &used {
            let idx: Vec<usize> = (0..n).filter(|&j| assignment[j] == c).collect();
            let sum: f64 = idx.iter().map(|&j| distances[j]).sum();
            let size = idx.len() as f64;
            for &j in &idx {
                probabilities[j] = if idx.len() == 1 || sum == 0.0 {
                    1.0 / (n_clusters * size)
                } else {
                    // Eq. 4, renormalized within the cluster (see the module doc).
                    (1.0 / n_clusters) * (1.0 - distances[j] / sum) / (size - 1.0)
                };
            }
        }
        Ok(Self::from_probabilities(
            members,
            probabilities,
            assignment.to_vec(),
        ))
    }

    /// Draws one member (an index into the caller's failure set).
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        let i = self
            .cumulative
            .partition_point(|&c| c < u)
            .min(self.members.len() - 1);
        self.members[i]
    }

    pub fn members(&self) -> &[usize] {
        &self.members
    }
    pub fn probabilities(&self) -> &[f64] {
        &self.probabilities
    }
    pub fn clusters(&self) -> &[usize] {
        &self.clusters
    }
}

/// One sampler per class, plus a pooled one for classes without failures.
#[derive(Clone, Debug)]
pub struct ClassReferenceSampler {
    per_class: BTreeMap<u8, ReferenceSampler>,
    pooled: ReferenceSampler,
}

impl ClassReferenceSampler {
    /// `images`: `labels.len()` images of `dim` bytes each (the failure set Dc).
    pub fn new(
        images: &[u8],
        labels: &[u8],
        dim: usize,
        sampling: Sampling,
        reference_class: ReferenceClass,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let n = labels.len();
        let build = |members: Vec<usize>, seed: u64| -> anyhow::Result<ReferenceSampler> {
            match sampling {
                Sampling::Uniform => ReferenceSampler::uniform(members),
                Sampling::Cluster { clusters } => {
                    let bytes: Vec<u8> = members
                        .iter()
                        .flat_map(|&i| images[i * dim..(i + 1) * dim].iter().copied())
                        .collect();
                    let features = standardize(&bytes, members.len(), dim)?;
                    ReferenceSampler::clustered(members, &features, clusters, seed)
                }
            }
        };
        if images.len() != n * dim {
            bail!(
                "{} bytes for {n} failure images of {dim} bytes",
                images.len()
            );
        }
        let mut by_class: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, &y) in labels.iter().enumerate() {
            by_class.entry(y).or_default().push(i);
        }
        let mut per_class = BTreeMap::new();
        if reference_class == ReferenceClass::Any {
            by_class.clear();
        }
        for (class, members) in by_class {
            per_class.insert(class, build(members, seed.wrapping_add(class as u64))?);
        }
        Ok(ClassReferenceSampler {
            per_class,
            pooled: build((0..n).collect(), seed)?,
        })
    }

    /// A failure image to guide an image of class `class` (any class's with
    /// [`ReferenceClass::Any`]).
    pub fn sample(&self, class: u8, rng: &mut impl Rng) -> usize {
        self.per_class
            .get(&class)
            .unwrap_or(&self.pooled)
            .sample(rng)
    }

    pub fn class(&self, class: u8) -> Option<&ReferenceSampler> {
        self.per_class.get(&class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    /// Three tight blobs in 2-D, 10 points each, one point per blob nudged outward.
    fn blobs() -> Array2<f64> {
        let centres = [(0.0, 0.0), (10.0, 10.0), (-10.0, 10.0)];
        let mut rows = vec![];
        for (cx, cy) in centres {
            for j in 0..10 {
                let a = j as f64 * 0.6;
                let r = if j == 0 { 1.0 } else { 0.2 };
                rows.push([cx + r * a.cos(), cy + r * a.sin()]);
            }
        }
        Array2::from_shape_vec((30, 2), rows.concat()).unwrap()
    }

    #[test]
    fn kmeans_finds_the_known_clusters_and_eq4_favours_the_centre() {
        let x = blobs();
        let s = ReferenceSampler::clustered((0..30).collect(), &x, 3, 7).unwrap();
        for blob in 0..3 {
            let c = s.clusters()[blob * 10];
            assert!(
                (blob * 10..blob * 10 + 10).all(|j| s.clusters()[j] == c),
                "blob {blob} split"
            );
        }
        let mut ids: Vec<usize> = s.clusters().to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 3);
        let total: f64 = s.probabilities().iter().sum();
        assert!((total - 1.0).abs() < 1e-12);
        for blob in 0..3 {
            let mass: f64 = s.probabilities()[blob * 10..blob * 10 + 10].iter().sum();
            assert!((mass - 1.0 / 3.0).abs() < 1e-12, "each cluster carries 1/N");
            // The outlier (j = 0) is the least likely member of its cluster.
            let p = &s.probabilities()[blob * 10..blob * 10 + 10];
            assert!(p[1..].iter().all(|&q| q > p[0]));
        }
        // Eq. 4 proportions hold within a cluster: P_j ∝ 1 − d_j/Σd.
        let c = s.clusters()[0];
        let centre: Vec<f64> = {
            let m: Vec<usize> = (0..30).filter(|&j| s.clusters()[j] == c).collect();
            (0..2)
                .map(|d| m.iter().map(|&j| x[[j, d]]).sum::<f64>() / m.len() as f64)
                .collect()
        };
        let d: Vec<f64> = (0..10)
            .map(|j| ((x[[j, 0]] - centre[0]).powi(2) + (x[[j, 1]] - centre[1]).powi(2)).sqrt())
            .collect();
        let sum: f64 = d.iter().sum();
        let ratio = (1.0 - d[0] / sum) / (1.0 - d[5] / sum);
        let got = s.probabilities()[0] / s.probabilities()[5];
        assert!((ratio - got).abs() < 1e-6, "{ratio} vs {got}");
    }

    #[test]
    fn sampling_frequencies_follow_the_probabilities_and_are_seeded() {
        let x = blobs();
        let s = ReferenceSampler::clustered((100..130).collect(), &x, 3, 1).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut counts = vec![0usize; 30];
        let draws = 200_000;
        for _ in 0..draws {
            counts[s.sample(&mut rng) - 100] += 1;
        }
        for (c, p) in counts.iter().zip(s.probabilities()) {
            let f = *c as f64 / draws as f64;
            // 5 standard deviations of a binomial proportion.
            assert!(
                (f - p).abs() < 5.0 * (p * (1.0 - p) / draws as f64).sqrt(),
                "{f} vs {p}"
            );
        }
        let again = ReferenceSampler::clustered((100..130).collect(), &x, 3, 1).unwrap();
        assert_eq!(again.probabilities(), s.probabilities());
    }

    #[test]
    fn uniform_and_per_class_samplers() {
        let u = ReferenceSampler::uniform(vec![3, 4, 5, 6]).unwrap();
        assert!(u.probabilities().iter().all(|&p| (p - 0.25).abs() < 1e-15));
        assert!(ReferenceSampler::uniform(vec![]).is_err());
        // 12 "images" of 4 bytes in two classes; class 1 has a single member.
        let mut images = vec![];
        for i in 0..12u8 {
            images.extend([i * 20, i * 20 + 1, 255 - i, 7]);
        }
        let labels = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let clustered = Sampling::Cluster { clusters: 5 };
        let s = ClassReferenceSampler::new(&images, &labels, 4, clustered, ReferenceClass::Same, 3)
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!(s.sample(0, &mut rng) < 11);
            assert_eq!(s.sample(1, &mut rng), 11);
            assert!(
                s.sample(7, &mut rng) < 12,
                "unknown class falls back to the pool"
            );
        }
        assert_eq!(s.class(0).unwrap().members().len(), 11);
        assert!(ClassReferenceSampler::new(
            &images[..10],
            &labels,
            4,
            Sampling::Uniform,
            ReferenceClass::Same,
            0
        )
        .is_err());
        // `any`: one pool over all of Dc, whatever the image's class.
        let any =
            ClassReferenceSampler::new(&images, &labels, 4, clustered, ReferenceClass::Any, 3)
                .unwrap();
        assert!(any.class(0).is_none());
        let drawn: std::collections::BTreeSet<usize> =
            (0..400).map(|_| any.sample(1, &mut rng)).collect();
        assert!(drawn.len() > 5, "class 1 draws from every class: {drawn:?}");
    }

    #[test]
    fn standardize_gives_zero_mean_unit_variance() {
        let images = [0u8, 10, 5, 2, 10, 5, 4, 10, 5];
        let x = standardize(&images, 3, 3).unwrap();
        let mean = x.mean_axis(Axis(0)).unwrap();
        assert!(mean.iter().all(|m| m.abs() < 1e-12));
        assert!((x.std_axis(Axis(0), 0.0)[0] - 1.0).abs() < 1e-12);
        assert_eq!(x[[0, 1]], 0.0, "constant feature maps to 0");
        assert!(standardize(&images, 2, 3).is_err());
    }
}
