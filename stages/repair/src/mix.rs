//! Batch-mixing baselines: Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk
//! Minimization") and CutMix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong
//! Classifiers with Localizable Features"), as their CIFAR training scripts do them
//! (facebookresearch/mixup-cifar10 `mixup_data`, clovaai/CutMix-PyTorch `train.py`/`rand_bbox`).
//!
//! Both take a batch of `n` HWC RGB u8 images of `w × h` and its integer labels and return a
//! [`MixedBatch`]: pixels in [0, 1] (mixing before normalization equals mixing after it, the
//! normalization being affine per channel) and soft targets. The reference codes mix the loss,
//! `λ·CE(p, y_a) + (1 − λ)·CE(p, y_b)`; for cross-entropy that equals CE against the soft
//! target `λ·onehot(y_a) + (1 − λ)·onehot(y_b)`, which is what [`MixedBatch::targets`] holds.
//!
//! As in the references, one λ and one random permutation (`torch.randperm`) serve the whole
//! batch.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Beta, Distribution};

/// Mixup's α for CIFAR-10 in Zhang et al. (and the mixup-cifar10 default).
pub const MIXUP_ALPHA: f64 = 1.0;
/// CutMix's β (the Beta(β, β) for λ) in Yun et al.'s CIFAR runs.
pub const CUTMIX_BETA: f64 = 1.0;
/// CutMix's application probability: `--cutmix_prob 0.5` in CutMix-PyTorch's CIFAR command
/// lines. We use the same default; a batch not mixed is returned clean with one-hot targets.
pub const CUTMIX_PROB: f64 = 0.5;

/// A mixed batch: `pixels` is `n·h·w·3` (HWC per image) in [0, 1]; `targets` is
/// `n·num_classes`, each row a probability vector.
#[derive(Clone, Debug, PartialEq)]
pub struct MixedBatch {
    pub pixels: Vec<f32>,
    pub targets: Vec<f32>,
    /// The λ used (weight of each image's own label); 1 when the batch was not mixed.
    pub lambda: f64,
    /// `perm[i]`: the batch index mixed into image `i` (identity when not mixed).
    pub perm: Vec<usize>,
}

/// λ ~ Beta(α, α); α ≤ 0 gives λ = 1 (no mixing), as in `mixup_data`.
fn sample_lambda(alpha: f64, rng: &mut impl Rng) -> f64 {
    if alpha > 0.0 {
        Beta::new(alpha, alpha).expect("alpha > 0").sample(rng)
    } else {
        1.0
    }
}

fn permutation(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(rng);
    perm
}

fn soft_targets(labels: &[u8], perm: &[usize], num_classes: usize, lambda: f64) -> Vec<f32> {
    let mut t = vec![0f32; labels.len() * num_classes];
    for (i, row) in t.chunks_exact_mut(num_classes).enumerate() {
        let (a, b) = (labels[i] as usize, labels[perm[i]] as usize);
        assert!(
            a < num_classes && b < num_classes,
            "label out of range: {a}, {b} ≥ {num_classes}"
        );
        row[a] += lambda as f32;
        row[b] += (1.0 - lambda) as f32;
    }
    t
}

fn check_shapes(batch: &[u8], n: usize, w: usize, h: usize, labels: &[u8]) {
    assert_eq!(batch.len(), n * w * h * 3, "batch is n·h·w·3 bytes");
    assert_eq!(labels.len(), n, "one label per image");
}

/// Mixup: `x̃ = λ·x + (1 − λ)·x[perm]`, `ỹ = λ·y + (1 − λ)·y[perm]`, λ ~ Beta(α, α)
/// ([`MIXUP_ALPHA`] = 1 for CIFAR-10).
#[allow(clippy::too_many_arguments)]
pub fn mixup(
    batch: &[u8],
    n: usize,
    w: usize,
    h: usize,
    labels: &[u8],
    num_classes: usize,
    alpha: f64,
    rng: &mut impl Rng,
) -> MixedBatch {
    check_shapes(batch, n, w, h, labels);
    let lambda = sample_lambda(alpha, rng);
    let perm = permutation(n, rng);
    let img_len = w * h * 3;
    let mut pixels = Vec::with_capacity(batch.len());
    for (i, &j) in perm.iter().enumerate() {
        let a = &batch[i * img_len..(i + 1) * img_len];
        let b = &batch[j * img_len..(j + 1) * img_len];
        pixels.extend(
            a.iter()
                .zip(b)
                .map(|(&x, &y)| ((lambda * x as f64 + (1.0 - lambda) * y as f64) / 255.0) as f32),
        );
    }
    MixedBatch {
        targets: soft_targets(labels, &perm, num_classes, lambda),
        pixels,
        lambda,
        perm,
    }
}

/// A CutMix box: half-open pixel ranges (rows `y0..y1`, columns `x0..x1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutBox {
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
}

impl CutBox {
    pub fn area(&self) -> usize {
        (self.x1 - self.x0) * (self.y1 - self.y0)
    }
}

/// CutMix's `rand_bbox`: cut ratio `sqrt(1 − λ)`, sides `int(W·r)` × `int(H·r)`, centre
/// uniform over the pixels, corners clipped to the image.
pub fn rand_bbox(w: usize, h: usize, lambda: f64, rng: &mut impl Rng) -> CutBox {
    let cut_rat = (1.0 - lambda).max(0.0).sqrt();
    let cut_w = (w as f64 * cut_rat) as i64;
    let cut_h = (h as f64 * cut_rat) as i64;
    let cx = rng.random_range(0..w.max(1)) as i64;
    let cy = rng.random_range(0..h.max(1)) as i64;
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    CutBox {
        x0: clip(cx - cut_w / 2, w),
        y0: clip(cy - cut_h / 2, h),
        x1: clip(cx + cut_w / 2, w),
        y1: clip(cy + cut_h / 2, h),
    }
}

/// CutMix: with probability `prob` ([`CUTMIX_PROB`] = 0.5 by default), λ ~ Beta(α, α)
/// ([`CUTMIX_BETA`] = 1), one box from [`rand_bbox`] for the whole batch, the box of image `i`
/// replaced by that of image `perm[i]`, and λ reset to the exact kept area
/// `1 − box area / (W·H)`; targets `λ·y + (1 − λ)·y[perm]`. Otherwise (and for α ≤ 0) the
/// batch comes back unmixed with one-hot targets, as in CutMix-PyTorch's `else` branch.
#[allow(clippy::too_many_arguments)]
pub fn cutmix(
    batch: &[u8],
    n: usize,
    w: usize,
    h: usize,
    labels: &[u8],
    num_classes: usize,
    alpha: f64,
    prob: f64,
    rng: &mut impl Rng,
) -> MixedBatch {
    check_shapes(batch, n, w, h, labels);
    let mut pixels: Vec<f32> = batch.iter().map(|&v| v as f32 / 255.0).collect();
    let r: f64 = rng.random();
    if !(alpha > 0.0 && r < prob) {
        let perm: Vec<usize> = (0..n).collect();
        return MixedBatch {
            targets: soft_targets(labels, &perm, num_classes, 1.0),
            pixels,
            lambda: 1.0,
            perm,
        };
    }
    let lambda0 = sample_lambda(alpha, rng);
    let perm = permutation(n, rng);
    let bbox = rand_bbox(w, h, lambda0, rng);
    let img_len = w * h * 3;
    for (i, &j) in perm.iter().enumerate() {
        for y in bbox.y0..bbox.y1 {
            for x in bbox.x0..bbox.x1 {
                let o = (y * w + x) * 3;
                for c in 0..3 {
                    pixels[i * img_len + o + c] = batch[j * img_len + o + c] as f32 / 255.0;
                }
            }
        }
    }
    let lambda = 1.0 - bbox.area() as f64 / (w * h) as f64;
    MixedBatch {
        targets: soft_targets(labels, &perm, num_classes, lambda),
        pixels,
        lambda,
        perm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const N: usize = 8;
    const W: usize = 32;
    const H: usize = 24;
    const K: usize = 10;

    /// Image i is filled with the constant 10·i + 5 (so a pixel tells its source image).
    fn batch() -> (Vec<u8>, Vec<u8>) {
        let px = (0..N)
            .flat_map(|i| std::iter::repeat_n((10 * i + 5) as u8, W * H * 3))
            .collect();
        let labels = (0..N).map(|i| (i % K) as u8).collect();
        (px, labels)
    }

    fn assert_rows_sum_to_one(t: &[f32]) {
        for row in t.chunks_exact(K) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{row:?}");
            assert!(row.iter().all(|&v| (0.0..=1.0 + 1e-6).contains(&v)));
        }
    }

    #[test]
    fn mixup_mixes_pixels_and_targets_with_one_lambda() {
        let (px, labels) = batch();
        for seed in 0..50 {
            let m = mixup(
                &px,
                N,
                W,
                H,
                &labels,
                K,
                1.0,
                &mut StdRng::seed_from_u64(seed),
            );
            assert_eq!(m.pixels.len(), N * W * H * 3);
            assert_eq!(m.targets.len(), N * K);
            assert_rows_sum_to_one(&m.targets);
            assert!((0.0..=1.0).contains(&m.lambda));
            let mut sorted = m.perm.clone();
            sorted.sort();
            assert_eq!(sorted, (0..N).collect::<Vec<_>>());
            for i in 0..N {
                let j = m.perm[i];
                let want = (m.lambda * (10 * i + 5) as f64
                    + (1.0 - m.lambda) * (10 * j + 5) as f64)
                    / 255.0;
                let img = &m.pixels[i * W * H * 3..(i + 1) * W * H * 3];
                assert!(img.iter().all(|&v| (v as f64 - want).abs() < 1e-6));
                let row = &m.targets[i * K..(i + 1) * K];
                if i != j {
                    assert!((row[labels[i] as usize] as f64 - m.lambda).abs() < 1e-6);
                    assert!((row[labels[j] as usize] as f64 - (1.0 - m.lambda)).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn mixup_alpha_zero_is_identity() {
        let (px, labels) = batch();
        let m = mixup(&px, N, W, H, &labels, K, 0.0, &mut StdRng::seed_from_u64(3));
        assert_eq!(m.lambda, 1.0);
        for (a, &b) in m.pixels.iter().zip(&px) {
            assert_eq!(*a, b as f32 / 255.0);
        }
    }

    #[test]
    fn cutmix_lambda_is_the_exact_kept_area() {
        let (px, labels) = batch();
        let mut mixed = 0;
        for seed in 0..200 {
            let m = cutmix(
                &px,
                N,
                W,
                H,
                &labels,
                K,
                1.0,
                1.0,
                &mut StdRng::seed_from_u64(seed),
            );
            assert_rows_sum_to_one(&m.targets);
            for i in 0..N {
                let j = m.perm[i];
                let img = &m.pixels[i * W * H * 3..(i + 1) * W * H * 3];
                let own = (10 * i + 5) as f32 / 255.0;
                let kept = img.iter().filter(|&&v| v == own).count() as f64 / (W * H * 3) as f64;
                if i != j {
                    // Pixels not from image i come from image perm[i].
                    let other = (10 * j + 5) as f32 / 255.0;
                    assert!(img.iter().all(|&v| v == own || v == other));
                    assert!((kept - m.lambda).abs() < 1e-12, "{kept} vs {}", m.lambda);
                    let row = &m.targets[i * K..(i + 1) * K];
                    assert!((row[labels[i] as usize] as f64 - m.lambda).abs() < 1e-6);
                    mixed += 1;
                }
            }
        }
        assert!(mixed > 0);
    }

    #[test]
    fn cutmix_box_is_clipped_and_sized_by_lambda() {
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..1000 {
            let lam: f64 = rng.random();
            let b = rand_bbox(W, H, lam, &mut rng);
            assert!(b.x0 <= b.x1 && b.x1 <= W && b.y0 <= b.y1 && b.y1 <= H);
            let r = (1.0 - lam).sqrt();
            assert!(b.x1 - b.x0 <= (W as f64 * r) as usize);
            assert!(b.y1 - b.y0 <= (H as f64 * r) as usize);
        }
        // λ = 1: an empty box.
        assert_eq!(rand_bbox(W, H, 1.0, &mut rng).area(), 0);
    }

    #[test]
    fn cutmix_probability_zero_returns_the_clean_batch() {
        let (px, labels) = batch();
        let m = cutmix(
            &px,
            N,
            W,
            H,
            &labels,
            K,
            1.0,
            0.0,
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(m.lambda, 1.0);
        assert_eq!(m.perm, (0..N).collect::<Vec<_>>());
        for (i, &l) in labels.iter().enumerate() {
            assert_eq!(m.targets[i * K + l as usize], 1.0);
        }
        assert!(m
            .pixels
            .iter()
            .zip(&px)
            .all(|(&a, &b)| a == b as f32 / 255.0));
        // With prob 0.5 both outcomes occur.
        let outcomes: Vec<bool> = (0..64)
            .map(|s| {
                cutmix(
                    &px,
                    N,
                    W,
                    H,
                    &labels,
                    K,
                    1.0,
                    0.5,
                    &mut StdRng::seed_from_u64(s),
                )
                .lambda
                    < 1.0
            })
            .collect();
        assert!(outcomes.iter().any(|&b| b) && outcomes.iter().any(|&b| !b));
    }

    #[test]
    fn seeded_rng_is_deterministic() {
        let (px, labels) = batch();
        let a = mixup(
            &px,
            N,
            W,
            H,
            &labels,
            K,
            1.0,
            &mut StdRng::seed_from_u64(42),
        );
        let b = mixup(
            &px,
            N,
            W,
            H,
            &labels,
            K,
            1.0,
            &mut StdRng::seed_from_u64(42),
        );
        assert_eq!(a, b);
        let a = cutmix(
            &px,
            N,
            W,
            H,
            &labels,
            K,
            1.0,
            1.0,
            &mut StdRng::seed_from_u64(42),
        );
        let b = cutmix(
            &px,
            N,
            W,
            H,
            &labels,
            K,
            1.0,
            1.0,
            &mut StdRng::seed_from_u64(42),
        );
        assert_eq!(a, b);
    }
}
