//! Style transfer for DeepRepair's style operations O^c (Eq. 3/5): carry the look of a
//! collected failure image (its corruption) onto a training image while keeping the training
//! image's content.
//!
//! The official code uses WCT2 with a pretrained VGG encoder/decoder; no pretrained weights
//! exist here, so the default, [`WaveletStyle`], is weight-free: an orthonormal 2-D Haar
//! decomposition of both images (`levels` deep), then
//! - the coarsest approximation band (colour, brightness, contrast, fog) by whitening–colouring
//!   across the three channels (content covariance → identity → reference covariance, means
//!   matched), and
//! - every detail band (edges, noise, blur, blockiness) per channel by energy matching: when
//!   the reference has less detail energy (blur) the content's details are scaled down to it;
//!   when it has more (noise, grain, blockiness) the content's details are kept and the
//!   reference's own coefficients, spatially shuffled (its distribution without its
//!   structure), are added with the missing variance — scaling alone would only amplify the
//!   content's edges, never create the reference's texture,
//!
//! and the inverse transform, blended with the content by `alpha`. A reference with more
//! high-frequency energy (noise) raises the content's detail energy, a blurred one lowers it.
//! (Haar is a few lines, so it is written here rather than pulled from a crate.)
//! Backends that load encoder/decoder weights implement [`StyleTransfer`] too.

use crate::image::ImageRef;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A deterministic seed from the reference's bytes (so a stylization is reproducible).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Transfers the style of `reference` onto `content`; both RGB HWC u8 of the same size.
pub trait StyleTransfer: Send + Sync {
    fn name(&self) -> &'static str;
    fn stylize(&self, content: &ImageRef, reference: &ImageRef) -> anyhow::Result<Vec<u8>>;
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct WaveletStyle {
    /// Decomposition depth; each level halves the size (image sides must be divisible by 2^levels).
    pub levels: usize,
    /// 1: full transfer; 0: the content unchanged.
    pub alpha: f32,
}

impl Default for WaveletStyle {
    fn default() -> Self {
        WaveletStyle {
            levels: 2,
            alpha: 1.0,
        }
    }
}

/// One channel plane, row-major.
#[derive(Clone)]
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f32>,
}

const S: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// One orthonormal Haar level of the top-left `w × h` block, in place: LL | HL over LH | HH.
fn haar_forward(p: &mut Plane, w: usize, h: usize) {
    let mut tmp = vec![0f32; w.max(h)];
    for y in 0..h {
        for x in 0..w / 2 {
            let (a, b) = (p.v[y * p.w + 2 * x], p.v[y * p.w + 2 * x + 1]);
            tmp[x] = (a + b) * S;
            tmp[w / 2 + x] = (a - b) * S;
        }
        p.v[y * p.w..y * p.w + w].copy_from_slice(&tmp[..w]);
    }
    for x in 0..w {
        for y in 0..h / 2 {
            let (a, b) = (p.v[2 * y * p.w + x], p.v[(2 * y + 1) * p.w + x]);
            tmp[y] = (a + b) * S;
            tmp[h / 2 + y] = (a - b) * S;
        }
        for (y, &t) in tmp[..h].iter().enumerate() {
            p.v[y * p.w + x] = t;
        }
    }
}

fn haar_inverse(p: &mut Plane, w: usize, h: usize) {
    let mut tmp = vec![0f32; w.max(h)];
    for x in 0..w {
        for y in 0..h / 2 {
            let (s, d) = (p.v[y * p.w + x], p.v[(h / 2 + y) * p.w + x]);
            tmp[2 * y] = (s + d) * S;
            tmp[2 * y + 1] = (s - d) * S;
        }
        for (y, &t) in tmp[..h].iter().enumerate() {
            p.v[y * p.w + x] = t;
        }
    }
    for y in 0..h {
        for x in 0..w / 2 {
            let (s, d) = (p.v[y * p.w + x], p.v[y * p.w + w / 2 + x]);
            tmp[2 * x] = (s + d) * S;
            tmp[2 * x + 1] = (s - d) * S;
        }
        p.v[y * p.w..y * p.w + w].copy_from_slice(&tmp[..w]);
    }
}

/// The rectangles (x, y, w, h) of every subband after `levels` forward steps: detail bands
/// of each level, then the final approximation band last.
fn subbands(w: usize, h: usize, levels: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut out = vec![];
    let (mut cw, mut ch) = (w, h);
    for _ in 0..levels {
        let (hw, hh) = (cw / 2, ch / 2);
        out.push((hw, 0, hw, hh));
        out.push((0, hh, hw, hh));
        out.push((hw, hh, hw, hh));
        cw = hw;
        ch = hh;
    }
    out.push((0, 0, cw, ch));
    out
}

fn planes(img: &ImageRef) -> [Plane; 3] {
    std::array::from_fn(|c| Plane {
        w: img.width,
        h: img.height,
        v: img
            .pixels
            .iter()
            .skip(c)
            .step_by(3)
            .map(|&b| b as f32 / 255.0)
            .collect(),
    })
}

fn decompose(img: &ImageRef, levels: usize) -> [Plane; 3] {
    let mut ps = planes(img);
    for p in &mut ps {
        let (mut w, mut h) = (p.w, p.h);
        for _ in 0..levels {
            haar_forward(p, w, h);
            w /= 2;
            h /= 2;
        }
    }
    ps
}

fn band(p: &Plane, (x0, y0, w, h): (usize, usize, usize, usize)) -> Vec<f32> {
    (y0..y0 + h)
        .flat_map(|y| (x0..x0 + w).map(move |x| (y, x)))
        .map(|(y, x)| p.v[y * p.w + x])
        .collect()
}

fn set_band(p: &mut Plane, (x0, y0, w, _): (usize, usize, usize, usize), values: &[f32]) {
    for (i, v) in values.iter().enumerate() {
        p.v[(y0 + i / w) * p.w + x0 + i % w] = *v;
    }
}

fn mean_std(v: &[f32]) -> (f32, f32) {
    let n = v.len() as f32;
    let m = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / n;
    (m, var.sqrt())
}

/// Symmetric 3×3 matrix power via Jacobi eigendecomposition: V diag(λ^p) Vᵀ (λ floored).
fn sym_pow(a: [[f64; 3]; 3], p: f64) -> [[f64; 3]; 3] {
    let mut m = a;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _ in 0..50 {
        let (mut i, mut j, mut big) = (0, 1, 0.0);
        for (r, c) in [(0, 1), (0, 2), (1, 2)] {
            if m[r][c].abs() > big {
                big = m[r][c].abs();
                i = r;
                j = c;
            }
        }
        if big < 1e-15 {
            break;
        }
        let theta = 0.5 * (2.0 * m[i][j]).atan2(m[j][j] - m[i][i]);
        let (s, c) = theta.sin_cos();
        let mut r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        r[i][i] = c;
        r[j][j] = c;
        r[i][j] = s;
        r[j][i] = -s;
        // m ← rᵀ m r, v ← v r
        let mul = |a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]| {
            let mut o = [[0.0; 3]; 3];
            for (x, row) in o.iter_mut().enumerate() {
                for (y, cell) in row.iter_mut().enumerate() {
                    *cell = (0..3).map(|k| a[x][k] * b[k][y]).sum();
                }
            }
            o
        };
        let mut rt = r;
        for (x, row) in rt.iter_mut().enumerate() {
            for (y, cell) in row.iter_mut().enumerate() {
                *cell = r[y][x];
            }
        }
        m = mul(&mul(&rt, &m), &r);
        v = mul(&v, &r);
    }
    let lambda: [f64; 3] = std::array::from_fn(|k| m[k][k].max(1e-8).powf(p));
    let mut out = [[0.0; 3]; 3];
    for (x, row) in out.iter_mut().enumerate() {
        for (y, cell) in row.iter_mut().enumerate() {
            *cell = (0..3).map(|k| v[x][k] * lambda[k] * v[y][k]).sum();
        }
    }
    out
}

/// Whitening–colouring across channels of one band: content stats → reference stats.
fn wct(content: &[Vec<f32>; 3], reference: &[Vec<f32>; 3]) -> [Vec<f32>; 3] {
    let stats = |b: &[Vec<f32>; 3]| {
        let n = b[0].len() as f64;
        let mean: [f64; 3] =
            std::array::from_fn(|c| b[c].iter().map(|&v| v as f64).sum::<f64>() / n);
        let mut cov = [[0.0; 3]; 3];
        for (i, row) in cov.iter_mut().enumerate() {
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = (0..b[0].len())
                    .map(|k| (b[i][k] as f64 - mean[i]) * (b[j][k] as f64 - mean[j]))
                    .sum::<f64>()
                    / n;
            }
            row[i] += 1e-6; // keeps a flat band invertible
        }
        (mean, cov)
    };
    let (mc, cc) = stats(content);
    let (mr, cr) = stats(reference);
    let whiten = sym_pow(cc, -0.5);
    let colour = sym_pow(cr, 0.5);
    let mut t = [[0.0; 3]; 3];
    for (i, row) in t.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            *cell = (0..3).map(|k| colour[i][k] * whiten[k][j]).sum();
        }
    }
    let n = content[0].len();
    let mut out: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0f32; n]);
    for k in 0..n {
        let centred: [f64; 3] = std::array::from_fn(|c| content[c][k] as f64 - mc[c]);
        for c in 0..3 {
            out[c][k] = ((0..3).map(|j| t[c][j] * centred[j]).sum::<f64>() + mr[c]) as f32;
        }
    }
    out
}

impl StyleTransfer for WaveletStyle {
    fn name(&self) -> &'static str {
        "wavelet"
    }

    fn stylize(&self, content: &ImageRef, reference: &ImageRef) -> anyhow::Result<Vec<u8>> {
        let (w, h) = (content.width, content.height);
        anyhow::ensure!(
            reference.width == w && reference.height == h,
            "style reference is {}×{}, content {w}×{h}",
            reference.width,
            reference.height
        );
        anyhow::ensure!(
            content.pixels.len() == w * h * 3 && reference.pixels.len() == w * h * 3,
            "images must be RGB {w}×{h}"
        );
        let div = 1 << self.levels;
        anyhow::ensure!(
            w % div == 0 && h % div == 0,
            "{w}×{h} is not divisible by 2^{}",
            self.levels
        );
        let mut c = decompose(content, self.levels);
        let r = decompose(reference, self.levels);
        let bands = subbands(w, h, self.levels);
        let (approx, details) = bands.split_last().expect("at least the approximation band");
        let mut shuffler = rand::rngs::StdRng::seed_from_u64(fnv1a(reference.pixels));
        for &b in details {
            // One permutation per band for all channels: independent shuffles would
            // decorrelate the channels and turn the reference's texture into colour speckle.
            let mut perm: Vec<usize> = (0..b.2 * b.3).collect();
            perm.shuffle(&mut shuffler);
            for ch in 0..3 {
                let cv = band(&c[ch], b);
                let rv = band(&r[ch], b);
                let (cm, cs) = mean_std(&cv);
                let (rm, rs) = mean_std(&rv);
                let out: Vec<f32> = if rs <= cs {
                    let scale = if cs > 1e-6 { rs / cs } else { 0.0 };
                    cv.iter().map(|v| (v - cm) * scale + rm).collect()
                } else {
                    let gain = (rs * rs - cs * cs).sqrt() / rs;
                    cv.iter()
                        .zip(&perm)
                        .map(|(v, &k)| (v - cm) + rm + (rv[k] - rm) * gain)
                        .collect()
                };
                set_band(&mut c[ch], b, &out);
            }
        }
        let cb: [Vec<f32>; 3] = std::array::from_fn(|ch| band(&c[ch], *approx));
        let rb: [Vec<f32>; 3] = std::array::from_fn(|ch| band(&r[ch], *approx));
        let mixed = wct(&cb, &rb);
        for ch in 0..3 {
            set_band(&mut c[ch], *approx, &mixed[ch]);
        }
        for p in &mut c {
            let (mut lw, mut lh) = (w >> self.levels, h >> self.levels);
            for _ in 0..self.levels {
                lw *= 2;
                lh *= 2;
                haar_inverse(p, lw, lh);
            }
        }
        let a = self.alpha.clamp(0.0, 1.0);
        Ok((0..w * h * 3)
            .map(|i| {
                let styled = c[i % 3].v[i / 3];
                let orig = content.pixels[i] as f32 / 255.0;
                ((a * styled + (1.0 - a) * orig) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn scene(seed: u64) -> Vec<u8> {
        // Smooth shapes with edges: content a person would recognise.
        let mut out = vec![];
        for y in 0..32 {
            for x in 0..32 {
                let inside = ((x as i32 - 12 - seed as i32).pow(2) + (y as i32 - 14).pow(2)) < 60;
                let base = if inside {
                    [200, 60, 40]
                } else {
                    [40 + y * 3, 90 + x * 2, 160]
                };
                out.extend(base.map(|v: usize| v as u8));
            }
        }
        out
    }

    fn add_noise(img: &[u8], sigma: f64, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = Normal::new(0.0, sigma).unwrap();
        img.iter()
            .map(|&v| (v as f64 + n.sample(&mut rng)).round().clamp(0.0, 255.0) as u8)
            .collect()
    }

    fn blur(img: &[u8]) -> Vec<u8> {
        let mut out = img.to_vec();
        for y in 0..32i32 {
            for x in 0..32i32 {
                for c in 0..3 {
                    let mut acc = 0u32;
                    let mut n = 0u32;
                    for dy in -2..=2 {
                        for dx in -2..=2 {
                            let (xx, yy) = (x + dx, y + dy);
                            if (0..32).contains(&xx) && (0..32).contains(&yy) {
                                acc += img[((yy * 32 + xx) * 3 + c) as usize] as u32;
                                n += 1;
                            }
                        }
                    }
                    out[((y * 32 + x) * 3 + c) as usize] = (acc / n) as u8;
                }
            }
        }
        out
    }

    /// Mean absolute difference between horizontal neighbours: high-frequency energy.
    fn roughness(img: &[u8]) -> f64 {
        let mut acc = 0.0;
        for y in 0..32 {
            for x in 0..31 {
                for c in 0..3 {
                    acc += (img[(y * 32 + x + 1) * 3 + c] as f64
                        - img[(y * 32 + x) * 3 + c] as f64)
                        .abs();
                }
            }
        }
        acc / (32.0 * 31.0 * 3.0)
    }

    fn correlation(a: &[u8], b: &[u8]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (
            a.iter().map(|&v| v as f64).sum::<f64>() / n,
            b.iter().map(|&v| v as f64).sum::<f64>() / n,
        );
        let cov: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - ma) * (y as f64 - mb))
            .sum();
        let va: f64 = a.iter().map(|&x| (x as f64 - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|&y| (y as f64 - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    }

    fn r(p: &[u8]) -> ImageRef<'_> {
        ImageRef {
            pixels: p,
            width: 32,
            height: 32,
        }
    }

    #[test]
    fn haar_round_trip_is_exact_and_self_style_is_identity() {
        let img = scene(0);
        let mut ps = planes(&r(&img));
        for p in &mut ps {
            haar_forward(p, 32, 32);
            haar_forward(p, 16, 16);
            haar_inverse(p, 16, 16);
            haar_inverse(p, 32, 32);
        }
        for (i, &v) in img.iter().enumerate() {
            assert!((ps[i % 3].v[i / 3] * 255.0 - v as f32).abs() < 1e-3);
        }
        let same = WaveletStyle::default().stylize(&r(&img), &r(&img)).unwrap();
        let max = same
            .iter()
            .zip(&img)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(max <= 1, "styling an image with itself changes it by {max}");
    }

    #[test]
    fn carries_noise_blur_and_brightness_while_keeping_content() {
        let content = scene(0);
        let other = scene(6);
        let style = WaveletStyle::default();
        // Noise: the noisy reference's roughness comes across.
        let noisy_ref = add_noise(&other, 25.0, 1);
        let out = style.stylize(&r(&content), &r(&noisy_ref)).unwrap();
        assert!(
            roughness(&out) > 2.0 * roughness(&content),
            "{} vs {}",
            roughness(&out),
            roughness(&content)
        );
        assert!((roughness(&out) / roughness(&noisy_ref) - 1.0).abs() < 0.5);
        // Blur: a blurred reference smooths the content.
        let blurred_ref = blur(&add_noise(&other, 25.0, 2));
        let out_blur = style
            .stylize(&r(&add_noise(&content, 25.0, 3)), &r(&blurred_ref))
            .unwrap();
        assert!(roughness(&out_blur) < 0.6 * roughness(&add_noise(&content, 25.0, 3)));
        // Brightness: a darker reference darkens the content.
        let dark: Vec<u8> = other.iter().map(|&v| v / 3).collect();
        let out_dark = style.stylize(&r(&content), &r(&dark)).unwrap();
        let mean = |v: &[u8]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!((mean(&out_dark) - mean(&dark)).abs() < 3.0);
        // Content kept: the output still looks like the content, not the reference.
        for out in [&out, &out_dark] {
            assert!(
                correlation(out, &content) > correlation(out, &other),
                "content lost"
            );
        }
        assert!(correlation(&out_dark, &content) > 0.8);
        // alpha = 0 returns the content.
        let none = WaveletStyle {
            alpha: 0.0,
            ..style
        }
        .stylize(&r(&content), &r(&noisy_ref))
        .unwrap();
        assert_eq!(none, content);
        assert!(style
            .stylize(
                &r(&content),
                &ImageRef {
                    pixels: &content[..300],
                    width: 10,
                    height: 10
                }
            )
            .is_err());
    }
}
