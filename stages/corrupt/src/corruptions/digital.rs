//! Digital: brightness, contrast, elastic_transform, pixelate, jpeg_compression.

use super::{finish_unit, to_unit};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::ops::{self, Border};

pub(crate) const BRIGHTNESS: [f64; 5] = [0.05, 0.1, 0.15, 0.2, 0.3];
pub(crate) const CONTRAST: [f64; 5] = [0.75, 0.5, 0.4, 0.3, 0.15];
pub(crate) const JPEG_QUALITY: [u8; 5] = [80, 65, 58, 50, 40];
pub(crate) const PIXELATE: [f64; 5] = [0.95, 0.9, 0.85, 0.75, 0.65];

/// HSV round trip through skimage's formulas, V += c (clipped to 1).
pub(super) fn brightness(px: &[u8], s: usize) -> Vec<u8> {
    let c = BRIGHTNESS[s];
    let x = to_unit(px);
    let mut out = vec![0.0; x.len()];
    for (o, p) in out.chunks_exact_mut(3).zip(x.chunks_exact(3)) {
        let (hh, ss, v) = ops::rgb2hsv(p[0], p[1], p[2]);
        let (r, g, b) = ops::hsv2rgb(hh, ss, (v + c).clamp(0.0, 1.0));
        o.copy_from_slice(&[r, g, b]);
    }
    finish_unit(&out)
}
/// `(x - mean) * c + mean` with per-channel means over the image.
pub(super) fn contrast(px: &[u8], s: usize) -> Vec<u8> {
    let c = CONTRAST[s];
    let x = to_unit(px);
    let n = (x.len() / 3) as f64;
    let mut means = [0.0; 3];
    for p in x.chunks_exact(3) {
        for k in 0..3 {
            means[k] += p[k];
        }
    }
    means.iter_mut().for_each(|m| *m /= n);
    let y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| (v - means[i % 3]) * c + means[i % 3])
        .collect();
    finish_unit(&y)
}
/// Elastic: random affine (OpenCV, reflect-101) then a smooth random displacement field
/// (scipy gaussian, reflect, truncate 3) sampled bilinearly (scipy map_coordinates, reflect).
/// `IMSIZE` is 32 in the reference (CIFAR); other sizes use the shorter side.
pub(super) fn elastic_transform(
    px: &[u8],
    w: usize,
    h: usize,
    s: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<u8> {
    let im = h.min(w) as f64;
    let c = [
        (im * 0.0, im * 0.0, im * 0.08),
        (im * 0.05, im * 0.2, im * 0.07),
        (im * 0.08, im * 0.06, im * 0.06),
        (im * 0.1, im * 0.04, im * 0.05),
        (im * 0.1, im * 0.03, im * 0.03),
    ][s];
    // float32 image as in the reference
    let img: Vec<f64> = px.iter().map(|&v| (v as f32 / 255.0) as f64).collect();
    // center_square = float32(shape[:2]) // 2 (rows, cols) used as OpenCV (x, y) points, as the
    // reference does (identical for square images).
    let cs = [(h / 2) as f64, (w / 2) as f64];
    let sq = (h.min(w) / 3) as f64;
    let pts1 = [
        [cs[0] + sq, cs[1] + sq],
        [cs[0] + sq, cs[1] - sq],
        [cs[0] - sq, cs[1] - sq],
    ];
    let mut pts2 = pts1;
    for p in pts2.iter_mut() {
        for v in p.iter_mut() {
            let u: f64 = if c.2 > 0.0 {
                rng.random_range(-c.2..c.2)
            } else {
                0.0
            };
            *v = (*v + u) as f32 as f64;
        }
    }
    let warped = match ops::affine_from_points(pts1, pts2) {
        Some(m) => ops::cv_warp_affine_reflect101(&img, h, w, 3, m),
        None => img.clone(),
    };
    let warped: Vec<f64> = warped.iter().map(|&v| v as f32 as f64).collect();
    let field = |rng: &mut ChaCha8Rng| -> Vec<f64> {
        let u: Vec<f64> = (0..h * w).map(|_| rng.random_range(-1.0..1.0)).collect();
        ops::gaussian_filter(&u, h, w, 1, c.1, 3.0, Border::Reflect)
            .into_iter()
            .map(|v| (v * c.0) as f32 as f64)
            .collect()
    };
    let dx = field(rng);
    let dy = field(rng);
    let mut out = vec![0.0; img.len()];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let (y0, y1, fy) = ops::reflect_linear_coord(y as f64 + dy[i], h);
            let (x0, x1, fx) = ops::reflect_linear_coord(x as f64 + dx[i], w);
            for k in 0..3 {
                let p = |yy: usize, xx: usize| warped[(yy * w + xx) * 3 + k];
                let v = (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1))
                    + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1));
                out[i * 3 + k] = v as f32 as f64;
            }
        }
    }
    finish_unit(&out)
}
/// Pillow BOX down to `int(n * c)` and BOX back up (byte-exact Pillow resampling).
pub(super) fn pixelate(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    let c = PIXELATE[s];
    let sw = ((w as f64 * c) as usize).max(1);
    let sh = ((h as f64 * c) as usize).max(1);
    let small = ops::pillow_box_resize(px, h, w, 3, sh, sw);
    ops::pillow_box_resize(&small, sh, sw, 3, h, w)
}
/// Pillow `save(JPEG, quality=q)` + `open`, computed in memory (see [`crate::jpeg`]).
pub(super) fn jpeg_compression(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    crate::jpeg::round_trip(px, w, h, JPEG_QUALITY[s])
}
