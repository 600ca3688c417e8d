//! The corruption functions of make_cifar_c.py. Images arrive validated (RGB HWC u8,
//! severity 1..=5, frost textures present for Frost).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

use rand_distr::{Distribution, Normal};

use crate::ops::{self, Border};
use crate::{CorruptError, Corruption, Resources};

/// `np.uint8(np.clip(x, 0, 1) * 255)`: clip, scale, truncate.
fn finish_unit(x: &[f64]) -> Vec<u8> {
    x.iter().map(|&v| unit_to_u8(v)).collect()
}

#[inline]
fn unit_to_u8(v: f64) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0) as u8
}

fn to_unit(px: &[u8]) -> Vec<f64> {
    px.iter().map(|&v| v as f64 / 255.0).collect()
}

pub(crate) fn apply(
    px: &[u8],
    w: usize,
    h: usize,
    c: Corruption,
    severity: u8,
    seed: u64,
    res: &Resources,
) -> Result<Vec<u8>, CorruptError> {
    let s = (severity - 1) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rng = &mut rng;
    Ok(match c {
        Corruption::GaussianNoise => gaussian_noise(px, s, rng),
        Corruption::ShotNoise => shot_noise(px, s, rng),
        Corruption::ImpulseNoise => impulse_noise(px, s, rng),
        Corruption::DefocusBlur => defocus_blur(px, w, h, s),
        Corruption::GlassBlur => glass_blur(px, w, h, s, rng),
        Corruption::MotionBlur => motion_blur(px, w, h, s, rng),
        Corruption::ZoomBlur => zoom_blur(px, w, h, s),
        Corruption::Snow => snow(px, w, h, s, rng),
        Corruption::Frost => frost(px, w, h, s, rng, res)?,
        Corruption::Fog => fog(px, w, h, s, rng),
        Corruption::Brightness => brightness(px, s),
        Corruption::Contrast => contrast(px, s),
        Corruption::ElasticTransform => elastic_transform(px, w, h, s, rng),
        Corruption::Pixelate => pixelate(px, w, h, s),
        Corruption::JpegCompression => jpeg_compression(px, w, h, s),
    })
}

pub(crate) const GAUSSIAN_NOISE: [f64; 5] = [0.04, 0.06, 0.08, 0.09, 0.10];
pub(crate) const SHOT_NOISE: [f64; 5] = [500.0, 250.0, 100.0, 75.0, 50.0];
pub(crate) const IMPULSE_NOISE: [f64; 5] = [0.01, 0.02, 0.03, 0.05, 0.07];
pub(crate) const BRIGHTNESS: [f64; 5] = [0.05, 0.1, 0.15, 0.2, 0.3];
pub(crate) const CONTRAST: [f64; 5] = [0.75, 0.5, 0.4, 0.3, 0.15];
pub(crate) const JPEG_QUALITY: [u8; 5] = [80, 65, 58, 50, 40];
pub(crate) const PIXELATE: [f64; 5] = [0.95, 0.9, 0.85, 0.75, 0.65];

fn gaussian_noise(px: &[u8], s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let c = GAUSSIAN_NOISE[s];
    let n = Normal::new(0.0, c).expect("valid normal");
    px.iter()
        .map(|&v| unit_to_u8(v as f64 / 255.0 + n.sample(rng)))
        .collect()
}

/// `np.random.poisson(x * c) / c`. x takes 256 values, so each severity keeps the Poisson CDF
/// of every byte value (built once) and samples by inversion: exact up to a tail mass below
/// 1e-15 (truncated), and several times faster than constructing a sampler per pixel.
fn shot_noise(px: &[u8], s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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
fn impulse_noise(px: &[u8], s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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

const DEFOCUS: [(f64, f64); 5] = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)];

fn defocus_blur(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
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
fn glass_blur(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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
fn motion_blur(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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

fn zoom_blur(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
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

const SNOW: [(f64, f64, f64, f64, f64, f64, f64); 5] = [
    (0.1, 0.2, 1.0, 0.6, 8.0, 3.0, 0.95),
    (0.1, 0.2, 1.0, 0.5, 10.0, 4.0, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10.0, 4.0, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12.0, 6.0, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14.0, 12.0, 0.8),
];

/// Snow: a thresholded, zoomed N(c0, c1) layer, motion-blurred (ImageMagick, reimplemented)
/// at U(-135, -45) degrees, added with its 180-degree rotation to a whitened image. The
/// reference computes in float32; this computes in f64 (truncation to bytes can differ by 1
/// on rare exact ties).
fn snow(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (loc, scale, zoom, thr, radius, sigma, blend) = SNOW[s];
    let n = Normal::new(loc, scale).expect("valid normal");
    let layer: Vec<f32> = (0..h * w).map(|_| n.sample(rng) as f32).collect();
    let mut layer = ops::clipped_zoom(&layer, h, w, 1, zoom);
    for v in layer.iter_mut() {
        if (*v as f64) < thr {
            *v = 0.0;
        }
    }
    let layer_u8: Vec<u8> = layer
        .iter()
        .map(|&v| ((v as f64).clamp(0.0, 1.0) * 255.0) as u8)
        .collect();
    let angle = rng.random_range(-135.0..-45.0);
    let blurred = ops::motion_blur_u8(&layer_u8, h, w, 1, radius, sigma, angle);
    let x = to_unit(px);
    let mut out = vec![0.0; x.len()];
    for i in 0..h * w {
        let (r, g, b) = (x[3 * i], x[3 * i + 1], x[3 * i + 2]);
        let gray = 0.299 * r + 0.587 * g + 0.114 * b;
        let sn = blurred[i] as f64 / 255.0 + blurred[h * w - 1 - i] as f64 / 255.0;
        for c in 0..3 {
            let v = x[3 * i + c];
            let v = blend * v + (1.0 - blend) * v.max(gray * 1.5 + 0.5);
            out[3 * i + c] = v + sn;
        }
    }
    finish_unit(&out)
}

const FROST: [(f64, f64); 5] = [
    (1.0, 0.2),
    (1.0, 0.3),
    (0.9, 0.4),
    (0.85, 0.4),
    (0.75, 0.45),
];

/// Frost: one of the first five textures (`np.random.randint(5)`: the reference never picks
/// frost6.jpg), scaled by 0.2, a random crop of the image's size, `c0 * x + c1 * frost`.
/// Textures are decoded by the `image` crate instead of libjpeg/libpng via OpenCV (JPEG
/// decoders may differ by 1-2 levels). For images larger than a scaled texture (never for
/// CIFAR) the texture is scaled just enough to fit instead of 0.2.
fn frost(
    px: &[u8],
    w: usize,
    h: usize,
    s: usize,
    rng: &mut ChaCha8Rng,
    res: &Resources,
) -> Result<Vec<u8>, CorruptError> {
    let (a, b) = FROST[s];
    let tex = res
        .frost
        .as_ref()
        .ok_or(CorruptError::MissingFrostTextures)?;
    let idx = rng.random_range(0..5usize.min(tex.textures.len()));
    let t = &tex.textures[idx];
    let (tw, th, tex_px);
    let scaled_owned;
    if t.small_height > h && t.small_width > w {
        (tw, th, tex_px) = (t.small_width, t.small_height, &t.small);
    } else {
        let f = ((h + 1) as f64 / t.height as f64).max((w + 1) as f64 / t.width as f64);
        let sh = ((t.height as f64 * f).ceil() as usize).max(h + 1);
        let sw = ((t.width as f64 * f).ceil() as usize).max(w + 1);
        scaled_owned = ops::cv_resize_linear(&t.rgb, t.height, t.width, 3, sh, sw);
        (tw, th, tex_px) = (sw, sh, &scaled_owned);
    }
    let y0 = rng.random_range(0..th - h);
    let x0 = rng.random_range(0..tw - w);
    let mut out = vec![0u8; px.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let f = tex_px[((y0 + y) * tw + x0 + x) * 3 + c] as f64;
                let v = a * px[(y * w + x) * 3 + c] as f64 + b * f;
                out[(y * w + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    Ok(out)
}

const FOG: [(f64, f64); 5] = [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)];

/// Fog: `x += c0 * plasma[:h, :w]`, rescaled by `max / (max + c0)`. The reference's plasma map
/// is 32x32 (CIFAR); other sizes use the next power of two covering the image.
fn fog(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (c0, decay) = FOG[s];
    let mapsize = h.max(w).next_power_of_two().max(32);
    let plasma = ops::plasma_fractal(mapsize, decay, |a| rng.random_range(-a..a));
    let mut x = to_unit(px);
    let max_val = x.iter().cloned().fold(0.0f64, f64::max);
    for y in 0..h {
        for xx in 0..w {
            let p = c0 * plasma[y * mapsize + xx];
            for c in 0..3 {
                x[(y * w + xx) * 3 + c] += p;
            }
        }
    }
    let f = max_val / (max_val + c0);
    x.iter_mut().for_each(|v| *v *= f);
    finish_unit(&x)
}

/// HSV round trip through skimage's formulas, V += c (clipped to 1).
fn brightness(px: &[u8], s: usize) -> Vec<u8> {
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
fn contrast(px: &[u8], s: usize) -> Vec<u8> {
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
fn elastic_transform(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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
fn pixelate(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    let c = PIXELATE[s];
    let sw = ((w as f64 * c) as usize).max(1);
    let sh = ((h as f64 * c) as usize).max(1);
    let small = ops::pillow_box_resize(px, h, w, 3, sh, sw);
    ops::pillow_box_resize(&small, sh, sw, 3, h, w)
}

/// Pillow `save(JPEG, quality=q)` + `open`, computed in memory (see [`crate::jpeg`]).
fn jpeg_compression(px: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    crate::jpeg::round_trip(px, w, h, JPEG_QUALITY[s])
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

    #[test]
    fn arange_lengths_match_numpy() {
        let lens: Vec<usize> = (0..5).map(|s| zoom_factors(s).len()).collect();
        assert_eq!(lens, vec![7, 12, 16, 21, 26]);
    }
}
