//! FSGMix's operation set (§III-B): autocontrast, rotate, solarize and their four
//! compositions — seven operations O_1..O_7 — and Augment(I, w) = Σ w_i O_i(I) (§II-A, step
//! iv). The paper does not give the rotate/solarize parameters; we draw them as AugMix does at
//! a severity (default 3), per image, from the caller's RNG.
//!
//! Augment is linear in w, so Eq. 1 (learning w per failure image by gradient descent through
//! the model) needs only the seven views, computed once per image by [`views`].

use crate::augmix_ops::{apply_chain, sample_op, OpKind};
use crate::ImageRef;
use rand::Rng;

/// The seven operations, each a chain applied left to right.
pub const FSGMIX_OPS: [&[OpKind]; 7] = [
    &[OpKind::AutoContrast],
    &[OpKind::Rotate],
    &[OpKind::Solarize],
    &[OpKind::AutoContrast, OpKind::Rotate],
    &[OpKind::AutoContrast, OpKind::Solarize],
    &[OpKind::Rotate, OpKind::Solarize],
    &[OpKind::AutoContrast, OpKind::Rotate, OpKind::Solarize],
];

/// Names for reports, in [`FSGMIX_OPS`] order.
pub const FSGMIX_OP_NAMES: [&str; 7] = [
    "autocontrast",
    "rotate",
    "solarize",
    "autocontrast∘rotate",
    "autocontrast∘solarize",
    "rotate∘solarize",
    "autocontrast∘rotate∘solarize",
];

/// O_1(I) … O_7(I), as HWC u8 images. One rotation angle and one solarize threshold are drawn
/// per call and shared by the chains that use them, so the compositions compose the same ops.
pub fn views(img: &ImageRef, severity: f64, rng: &mut impl Rng) -> [Vec<u8>; 7] {
    let rotate = sample_op(OpKind::Rotate, severity, img.width, rng);
    let solarize = sample_op(OpKind::Solarize, severity, img.width, rng);
    std::array::from_fn(|i| {
        let chain: Vec<_> = FSGMIX_OPS[i]
            .iter()
            .map(|kind| match kind {
                OpKind::Rotate => rotate,
                OpKind::Solarize => solarize,
                other => sample_op(*other, severity, img.width, rng),
            })
            .collect();
        apply_chain(&chain, img)
    })
}

/// Augment(I, w) = Σ w_i O_i(I) in [0, 1] float space (HWC). Weights are used as given (the
/// paper does not normalize them); the result is clamped to [0, 1].
pub fn mix(views: &[Vec<u8>; 7], weights: &[f64]) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(
        weights.len() == 7,
        "FSGMix mixes 7 operations, got {} weights",
        weights.len()
    );
    let n = views[0].len();
    Ok((0..n)
        .map(|k| {
            let v: f64 = views
                .iter()
                .zip(weights)
                .map(|(view, w)| w * view[k] as f64 / 255.0)
                .sum();
            v.clamp(0.0, 1.0) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augmix_ops::{apply, Op};
    use rand::SeedableRng;

    fn img() -> Vec<u8> {
        (0..32 * 32 * 3)
            .map(|i| ((i * 37) % 200 + 20) as u8)
            .collect()
    }

    #[test]
    fn seven_views_compose_shared_ops_and_mix_linearly() {
        let pixels = img();
        let r = ImageRef {
            pixels: &pixels,
            width: 32,
            height: 32,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let v = views(&r, 3.0, &mut rng);
        // View 4 (autocontrast∘rotate) is rotate applied to view 1 (autocontrast) with the
        // same angle as view 2: recover the angle from view 2 by trying all candidates.
        let angle = (-9..=9)
            .map(|d| d as f64)
            .find(|&d| apply(Op::Rotate(d), &r) == v[1])
            .expect("view 2 is a rotation at severity 3");
        assert_eq!(
            v[3],
            apply(
                Op::Rotate(angle),
                &ImageRef {
                    pixels: &v[0],
                    width: 32,
                    height: 32
                }
            )
        );
        // One-hot weights select a view; weights mix linearly.
        let mut w = [0.0; 7];
        w[2] = 1.0;
        let only = mix(&v, &w).unwrap();
        assert!(only
            .iter()
            .zip(&v[2])
            .all(|(a, &b)| (a - b as f32 / 255.0).abs() < 1e-6));
        let half = mix(&v, &[0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        let k = 100;
        assert!((half[k] - (v[0][k] as f32 + v[1][k] as f32) / 510.0).abs() < 1e-6);
        assert!(mix(&v, &[1.0; 3]).is_err());
    }
}
