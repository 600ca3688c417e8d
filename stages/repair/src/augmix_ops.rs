//! AugMix's nine operations on 32×32 (any size) RGB u8 images, equivalent to
//! google-research/augmix `augmentations.py` on PIL images, and AugMix's mixing.
//!
//! Each op is a pure function of the image and an explicit parameter ([`Op`]), checked
//! against Pillow's outputs (tests/fixtures, generated once with Pillow 13); [`sample_op`]
//! draws the parameter from a severity exactly as AugMix does (`sample_level`,
//! `int_parameter`, `float_parameter`, random sign).
//!
//! PIL algorithms reproduced: `ImageOps.autocontrast` (cutoff 0, truncating LUT),
//! `ImageOps.equalize` (PIL's step-based LUT), `posterize`/`solarize` LUTs, and affine
//! transforms with BILINEAR resampling: output pixel centres (x+0.5, y+0.5) map through the
//! matrix; a source point outside [0, size) gives black; otherwise PIL's bilinear filter with
//! edge-clamped neighbours, truncated to u8. `rotate` builds PIL's centre-rotation matrix
//! (cos/sin rounded to 15 decimals, as PIL does).

use crate::ImageRef;
use rand::Rng;
use rand_distr::{Beta, Distribution, Gamma};

/// An operation with its parameter fixed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    AutoContrast,
    Equalize,
    /// Bits kept (1–8).
    Posterize(u8),
    /// Degrees, counter-clockwise (PIL's convention).
    Rotate(f64),
    /// Pixels at or above the threshold are inverted (256: none).
    Solarize(u16),
    ShearX(f64),
    ShearY(f64),
    TranslateX(f64),
    TranslateY(f64),
}

/// AugMix's operation list, in its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    AutoContrast,
    Equalize,
    Posterize,
    Rotate,
    Solarize,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

pub const AUGMIX_OPS: [OpKind; 9] = [
    OpKind::AutoContrast,
    OpKind::Equalize,
    OpKind::Posterize,
    OpKind::Rotate,
    OpKind::Solarize,
    OpKind::ShearX,
    OpKind::ShearY,
    OpKind::TranslateX,
    OpKind::TranslateY,
];

/// AugMix's nine operations as one-op chains, for [`augment_and_mix`]'s operation sets.
pub const AUGMIX_OPERATIONS: [&[OpKind]; 9] = [
    &[OpKind::AutoContrast],
    &[OpKind::Equalize],
    &[OpKind::Posterize],
    &[OpKind::Rotate],
    &[OpKind::Solarize],
    &[OpKind::ShearX],
    &[OpKind::ShearY],
    &[OpKind::TranslateX],
    &[OpKind::TranslateY],
];

fn int_parameter(level: f64, maxval: f64) -> f64 {
    (level * maxval / 10.0).trunc()
}

fn float_parameter(level: f64, maxval: f64) -> f64 {
    level * maxval / 10.0
}

fn sample_level(severity: f64, rng: &mut impl Rng) -> f64 {
    rng.random_range(0.1..severity.max(0.1 + f64::EPSILON))
}

fn random_sign(value: f64, rng: &mut impl Rng) -> f64 {
    if rng.random::<f64>() > 0.5 {
        -value
    } else {
        value
    }
}

/// Draws an op's parameter for a severity (AugMix's default severity is 3), as
/// `augmentations.py` does for a 32-pixel image.
pub fn sample_op<R: Rng>(kind: OpKind, severity: f64, image_size: usize, rng: &mut R) -> Op {
    op_with_level(kind, image_size, rng, |rng| sample_level(severity, rng))
}

/// An op at a fixed level (0–10, the scale of `augmentations.py`; RandAugment's magnitude),
/// its direction still random.
pub fn op_at_level<R: Rng>(kind: OpKind, level: f64, image_size: usize, rng: &mut R) -> Op {
    op_with_level(kind, image_size, rng, |_| level)
}

/// An op whose level comes from `level`, drawn exactly where AugMix draws it (so the random
/// stream of [`sample_op`] is AugMix's).
fn op_with_level<R: Rng>(
    kind: OpKind,
    image_size: usize,
    rng: &mut R,
    level: impl FnOnce(&mut R) -> f64,
) -> Op {
    let size = image_size as f64;
    match kind {
        OpKind::AutoContrast => Op::AutoContrast,
        OpKind::Equalize => Op::Equalize,
        OpKind::Posterize => Op::Posterize(4 - int_parameter(level(rng), 4.0) as u8),
        OpKind::Rotate => {
            let d = int_parameter(level(rng), 30.0);
            Op::Rotate(random_sign(d, rng))
        }
        OpKind::Solarize => Op::Solarize(256 - int_parameter(level(rng), 256.0) as u16),
        OpKind::ShearX => {
            let s = float_parameter(level(rng), 0.3);
            Op::ShearX(random_sign(s, rng))
        }
        OpKind::ShearY => {
            let s = float_parameter(level(rng), 0.3);
            Op::ShearY(random_sign(s, rng))
        }
        OpKind::TranslateX => {
            let t = int_parameter(level(rng), size / 3.0);
            Op::TranslateX(random_sign(t, rng))
        }
        OpKind::TranslateY => {
            let t = int_parameter(level(rng), size / 3.0);
            Op::TranslateY(random_sign(t, rng))
        }
    }
}

fn histograms(img: &ImageRef) -> [[u32; 256]; 3] {
    let mut h = [[0u32; 256]; 3];
    for px in img.pixels.chunks_exact(3) {
        for c in 0..3 {
            h[c][px[c] as usize] += 1;
        }
    }
    h
}

fn apply_luts(img: &ImageRef, luts: &[[u8; 256]; 3]) -> Vec<u8> {
    img.pixels
        .chunks_exact(3)
        .flat_map(|px| {
            [
                luts[0][px[0] as usize],
                luts[1][px[1] as usize],
                luts[2][px[2] as usize],
            ]
        })
        .collect()
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

fn autocontrast(img: &ImageRef) -> Vec<u8> {
    let h = histograms(img);
    let luts = std::array::from_fn(|c| {
        let lo = (0..256).find(|&i| h[c][i] > 0).unwrap_or(0);
        let hi = (0..256).rev().find(|&i| h[c][i] > 0).unwrap_or(0);
        if hi <= lo {
            return identity_lut();
        }
        let scale = 255.0 / (hi - lo) as f64;
        let offset = -(lo as f64) * scale;
        std::array::from_fn(|i| ((i as f64 * scale + offset).trunc()).clamp(0.0, 255.0) as u8)
    });
    apply_luts(img, &luts)
}

fn equalize(img: &ImageRef) -> Vec<u8> {
    let h = histograms(img);
    let luts = std::array::from_fn(|c| {
        let nonzero: Vec<u32> = h[c].iter().copied().filter(|&v| v > 0).collect();
        if nonzero.len() <= 1 {
            return identity_lut();
        }
        let total: u32 = nonzero.iter().sum();
        let step = (total - nonzero[nonzero.len() - 1]) / 255;
        if step == 0 {
            return identity_lut();
        }
        let mut n = step / 2;
        std::array::from_fn(|i| {
            let v = (n / step).min(255) as u8;
            n += h[c][i];
            v
        })
    });
    apply_luts(img, &luts)
}

fn lut_op(img: &ImageRef, f: impl Fn(u8) -> u8) -> Vec<u8> {
    let lut: [u8; 256] = std::array::from_fn(|i| f(i as u8));
    apply_luts(img, &[lut, lut, lut])
}

/// PIL's AFFINE transform with BILINEAR resampling and black fill (see the module doc); also
/// SENSEI's zoom, which AugMix has no op for.
pub(crate) fn affine_bilinear(img: &ImageRef, m: [f64; 6]) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    let (wf, hf) = (w as f64, h as f64);
    let px = |x: usize, y: usize, c: usize| img.pixels[(y * w + x) * 3 + c] as f64;
    let clamp_x = |x: i64| x.clamp(0, w as i64 - 1) as usize;
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xin = m[0] * xo + m[1] * yo + m[2];
            let yin = m[3] * xo + m[4] * yo + m[5];
            if !(0.0..wf).contains(&xin) || !(0.0..hf).contains(&yin) {
                continue; // black
            }
            let (xs, ys) = (xin - 0.5, yin - 0.5);
            let (xf, yf) = (xs.floor() as i64, ys.floor() as i64);
            let (dx, dy) = (xs - xf as f64, ys - yf as f64);
            let (x0, x1) = (clamp_x(xf), clamp_x(xf + 1));
            let y0 = yf.clamp(0, h as i64 - 1) as usize;
            let next_row = (yf + 1 >= 0 && yf + 1 < h as i64).then_some((yf + 1) as usize);
            for c in 0..3 {
                let v1 = px(x0, y0, c) + (px(x1, y0, c) - px(x0, y0, c)) * dx;
                let v2 = match next_row {
                    Some(y1) => px(x0, y1, c) + (px(x1, y1, c) - px(x0, y1, c)) * dx,
                    None => v1,
                };
                let v = v1 + (v2 - v1) * dy;
                out[(y * w + x) * 3 + c] = if v < 0.0 { 0 } else { v.min(255.0) as u8 };
            }
        }
    }
    out
}

/// Python's `round(x, 15)`: correctly rounded to 15 decimals.
fn round15(x: f64) -> f64 {
    format!("{x:.15}")
        .parse()
        .expect("a formatted float parses")
}

fn rotate(img: &ImageRef, degrees: f64) -> Vec<u8> {
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return img.pixels.to_vec();
    }
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    let a = -angle.to_radians();
    let mut m = [
        round15(a.cos()),
        round15(a.sin()),
        0.0,
        round15(-a.sin()),
        round15(a.cos()),
        0.0,
    ];
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx;
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy;
    affine_bilinear(img, m)
}

/// Applies one op.
/// `ops` applied in order, each to the previous one's output.
pub fn apply_chain(ops: &[Op], img: &ImageRef) -> Vec<u8> {
    let mut out = img.pixels.to_vec();
    for &op in ops {
        out = apply(
            op,
            &ImageRef {
                pixels: &out,
                ..*img
            },
        );
    }
    out
}

pub fn apply(op: Op, img: &ImageRef) -> Vec<u8> {
    match op {
        Op::AutoContrast => autocontrast(img),
        Op::Equalize => equalize(img),
        Op::Posterize(bits) => {
            let mask = !((1u16 << (8 - bits.clamp(1, 8))) - 1) as u8;
            lut_op(img, |v| v & mask)
        }
        Op::Solarize(t) => lut_op(img, |v| if (v as u16) < t { v } else { 255 - v }),
        Op::Rotate(d) => rotate(img, d),
        Op::ShearX(s) => affine_bilinear(img, [1.0, s, 0.0, 0.0, 1.0, 0.0]),
        Op::ShearY(s) => affine_bilinear(img, [1.0, 0.0, 0.0, s, 1.0, 0.0]),
        Op::TranslateX(t) => affine_bilinear(img, [1.0, 0.0, t, 0.0, 1.0, 0.0]),
        Op::TranslateY(t) => affine_bilinear(img, [1.0, 0.0, 0.0, 0.0, 1.0, t]),
    }
}

/// AugMix's `augment_and_mix` in [0, 1] float space (mixing before normalization is the same
/// as AugMix's mixing after it, normalization being affine): `width` chains of 1–3 random ops
/// (or `depth` when given), chain weights ~ Dirichlet(α), blend m ~ Beta(α, α). Each of `ops`
/// is one operation, itself a sequence of kinds applied in order with independently drawn
/// parameters ([`AUGMIX_OPERATIONS`]; FSGMix's seven composite operations for its AugMix
/// baseline, FSGMix footnote 2).
pub fn augment_and_mix(
    img: &ImageRef,
    ops: &[&[OpKind]],
    severity: f64,
    width: usize,
    depth: Option<usize>,
    alpha: f64,
    rng: &mut impl Rng,
) -> Vec<f32> {
    augment_and_mix_with(img, ops, severity, width, depth, alpha, rng, |_, _| {
        Ok(None)
    })
    .expect("AugMix's own ops cannot fail")
}

/// [`augment_and_mix`] whose chains may start with an op from outside `ops`: before each
/// chain's first op, `first_op(current, rng)` may return the image to use instead (DeepRepair's
/// style operations, Algorithm 1); `None` draws from `ops` as usual.
#[allow(clippy::too_many_arguments)]
pub fn augment_and_mix_with<R: Rng>(
    img: &ImageRef,
    ops: &[&[OpKind]],
    severity: f64,
    width: usize,
    depth: Option<usize>,
    alpha: f64,
    rng: &mut R,
    mut first_op: impl FnMut(&ImageRef, &mut R) -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<Vec<f32>> {
    let ws: Vec<f64> = if width == 1 {
        vec![1.0]
    } else {
        // Dirichlet(α, …, α) as normalized Gamma(α, 1) draws (width is a runtime value).
        let gamma = Gamma::new(alpha, 1.0)?;
        let g: Vec<f64> = (0..width).map(|_| gamma.sample(rng)).collect();
        let total: f64 = g.iter().sum();
        g.iter().map(|v| v / total).collect()
    };
    let m: f64 = Beta::new(alpha, alpha)?.sample(rng);
    let mut mix = vec![0f64; img.pixels.len()];
    for w in ws {
        let d = depth.unwrap_or_else(|| rng.random_range(1..=3));
        let mut aug = img.pixels.to_vec();
        for step in 0..d {
            let current = ImageRef {
                pixels: &aug,
                ..*img
            };
            let replaced = if step == 0 {
                first_op(&current, rng)?
            } else {
                None
            };
            aug = match replaced {
                Some(out) => out,
                None => {
                    let chain: Vec<Op> = ops[rng.random_range(0..ops.len())]
                        .iter()
                        .map(|&kind| sample_op(kind, severity, img.width, rng))
                        .collect();
                    apply_chain(&chain, &current)
                }
            };
        }
        for (acc, v) in mix.iter_mut().zip(&aug) {
            *acc += w * *v as f64 / 255.0;
        }
    }
    Ok(img
        .pixels
        .iter()
        .zip(&mix)
        .map(|(&x, &a)| ((1.0 - m) * x as f64 / 255.0 + m * a) as f32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn severity_maps_to_augmix_parameter_ranges() {
        // At AugMix's default severity 3, level ~ U(0.1, 3): rotate ≤ int(3·30/10) = 9°,
        // posterize keeps 4 − int(level·0.4) ∈ {3, 4} bits, solarize threshold ≥ 256 − 76,
        // translate ≤ int(3·(32/3)/10) = 3 px, shear ≤ 0.09.
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (mut seen_neg, mut seen_pos) = (false, false);
        for _ in 0..2000 {
            match sample_op(OpKind::Rotate, 3.0, 32, &mut rng) {
                Op::Rotate(d) => {
                    assert!(d.abs() <= 9.0 && d.fract() == 0.0, "{d}");
                    seen_neg |= d < 0.0;
                    seen_pos |= d > 0.0;
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                sample_op(OpKind::Posterize, 3.0, 32, &mut rng),
                Op::Posterize(3 | 4)
            ));
            match sample_op(OpKind::Solarize, 3.0, 32, &mut rng) {
                Op::Solarize(t) => assert!((180..=256).contains(&t), "{t}"),
                other => panic!("{other:?}"),
            }
            match sample_op(OpKind::TranslateY, 3.0, 32, &mut rng) {
                Op::TranslateY(t) => assert!(t.abs() <= 3.0 && t.fract() == 0.0),
                other => panic!("{other:?}"),
            }
            match sample_op(OpKind::ShearX, 3.0, 32, &mut rng) {
                Op::ShearX(s) => assert!(s.abs() <= 0.09 + 1e-12 && s.abs() >= 0.003 - 1e-12),
                other => panic!("{other:?}"),
            }
        }
        assert!(seen_neg && seen_pos, "both rotation directions occur");
    }
}
