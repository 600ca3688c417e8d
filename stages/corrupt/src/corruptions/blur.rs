//! Blur: defocus_blur, glass_blur, motion_blur, zoom_blur.

use super::{finish_unit, to_unit};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::ops::{self, Border};

const DEFOCUS: [(f64, f64); 5] = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)];

pub(super) fn defocus_blur(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    let (radius, alias) = DEFOCUS[s];
    let (k, n) = ops::disk_kernel(radius, alias);
    let y = ops::filter2d(&to_unit(px), h, w, 3, &k, n, Border::Reflect101);
    finish_unit(&y)
}
const GLASS: [(f64, isize, usize); 5] = [
    (0.05, 1, 1),
    (0.25, 1, 1),
    (0.4, 1, 1),
    (0.25, 1, 2),
    (0.4, 1, 2),
];

/// Gaussian blur, local pixel "shuffle" (a copy, see below), Gaussian blur. The reference loops
/// `range(32 - d, d, -1)` on both axes (CIFAR is square); here rows use the height and columns
/// the width. `np.random.randint(-d, d)` draws from [-d, d - 1] (exclusive high), kept.
pub(super) fn glass_blur(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (sigma, d, iters) = GLASS[s];
    let b = ops::gaussian_filter(&to_unit(px), h, w, 3, sigma, 4.0, Border::Nearest);
    let mut x: Vec<u8> = b.iter().map(|&v| (v * 255.0) as u8).collect();
    let (hi, wi) = (h as isize, w as isize);
    for _ in 0..iters {
        let mut yy = hi - d;
        while yy > d {
            let mut xx = wi - d;
            while xx > d {
                let dx = rng.random_range(-d as i64..d as i64) as isize;
                let dy = rng.random_range(-d as i64..d as i64) as isize;
                let (yp, xp) = (yy + dy, xx + dx);
                // The reference's `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views is
                // not a swap: the right side holds views, so after the first assignment the
                // second writes x[h', w'] back onto itself. The net effect is the copy
                // x[h, w] = x[h', w'], reproduced here (a true swap would lower PSNR by ~2 dB).
                let a = (yy as usize * w + xx as usize) * 3;
                let bidx = (yp as usize * w + xp as usize) * 3;
                x.copy_within(bidx..bidx + 3, a);
                xx -= 1;
            }
            yy -= 1;
        }
    }
    let y = ops::gaussian_filter(&to_unit(&x), h, w, 3, sigma, 4.0, Border::Nearest);
    finish_unit(&y)
}
const MOTION: [(f64, f64); 5] = [(6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5)];

/// ImageMagick `motion_blur(radius, sigma, angle=U(-45, 45))` on the 8-bit image; see
/// [`ops::motion_blur_u8`] for the reimplementation.
pub(super) fn motion_blur(
    px: &[u8],
    w: usize,
    h: usize,
    s: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<u8> {
    let (radius, sigma) = MOTION[s];
    let angle = rng.random_range(-45.0..45.0);
    ops::motion_blur_u8(px, h, w, 3, radius, sigma, angle)
}
/// `np.arange(1, stop, 0.01)` exactly as numpy computes it: length
/// `ceil((stop - 1) / 0.01)` (7, 12, 16, 21, 26 for the five severities: the float quirk makes
/// severities 1, 2, 4 and 5 include their stop value) and values `1 + i * ((1 + 0.01) - 1)`.
fn zoom_factors(s: usize) -> Vec<f64> {
    let stop = [1.06, 1.11, 1.16, 1.21, 1.26][s];
    let len = ((stop - 1.0) / 0.01f64).ceil() as usize;
    let delta = (1.0 + 0.01) - 1.0;
    (0..len).map(|i| 1.0 + i as f64 * delta).collect()
}
pub(super) fn zoom_blur(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    let x: Vec<f32> = px.iter().map(|&v| (v as f64 / 255.0) as f32).collect();
    let mut out = vec![0f32; x.len()];
    let zs = zoom_factors(s);
    for &z in &zs {
        ops::clipped_zoom_add(&x, h, w, 3, z, &mut out);
    }
    let n = (zs.len() + 1) as f32;
    let y: Vec<f64> = x
        .iter()
        .zip(&out)
        .map(|(a, b)| ((a + b) / n) as f64)
        .collect();
    finish_unit(&y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_lengths_match_numpy() {
        let lens: Vec<usize> = (0..5).map(|s| zoom_factors(s).len()).collect();
        assert_eq!(lens, vec![7, 12, 16, 21, 26]);
    }
}
