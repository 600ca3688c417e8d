//! Weather: snow, frost, fog.

use super::{finish_unit, to_unit};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use rand_distr::{Distribution, Normal};

use crate::ops::{self};
use crate::{Assets, CorruptError};

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
pub(super) fn snow(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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
pub(super) fn frost(
    px: &[u8],
    w: usize,
    h: usize,
    s: usize,
    rng: &mut ChaCha8Rng,
    res: &Assets,
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
pub(super) fn fog(px: &[u8], w: usize, h: usize, s: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
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
