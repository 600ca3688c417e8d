//! From u8 RGB HWC images to the normalized NCHW f32 tensors the models take, and CIFAR's
//! standard training augmentation (AugMix's `cifar.py`: `RandomHorizontalFlip()`,
//! `RandomCrop(32, padding=4)` with zero padding).

use candle_core::{Device, Result, Tensor};
use deeprepair_nn::{INPUT_MEAN, INPUT_STD};
use rand::Rng;

/// `n` HWC images in [0, 1] (`pixels.len() == n*h*w*3`) → normalized `[n, 3, h, w]`.
pub fn unit_to_tensor(
    pixels: &[f32],
    n: usize,
    h: usize,
    w: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut nchw = vec![0f32; pixels.len()];
    let plane = h * w;
    for i in 0..n {
        let src = &pixels[i * plane * 3..(i + 1) * plane * 3];
        let dst = &mut nchw[i * plane * 3..(i + 1) * plane * 3];
        for p in 0..plane {
            for c in 0..3 {
                dst[c * plane + p] = (src[p * 3 + c] - INPUT_MEAN[c]) / INPUT_STD[c];
            }
        }
    }
    Tensor::from_vec(nchw, (n, 3, h, w), device)
}

/// `n` u8 HWC images → normalized `[n, 3, h, w]`.
pub fn u8_to_tensor(
    pixels: &[u8],
    n: usize,
    h: usize,
    w: usize,
    device: &Device,
) -> Result<Tensor> {
    let unit: Vec<f32> = pixels.iter().map(|&v| v as f32 / 255.0).collect();
    unit_to_tensor(&unit, n, h, w, device)
}

/// Random horizontal flip (p = 0.5), then a random `h×w` crop of the image zero-padded by
/// `pad` on every side (torchvision's order in `cifar.py`).
pub fn random_crop_flip(img: &[u8], h: usize, w: usize, pad: usize, rng: &mut impl Rng) -> Vec<u8> {
    let flip = rng.random::<f64>() < 0.5;
    let dy = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let dx = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let mut out = vec![0u8; img.len()];
    for y in 0..h {
        let sy = y as isize + dy;
        if sy < 0 || sy >= h as isize {
            continue;
        }
        for x in 0..w {
            let sx = x as isize + dx;
            if sx < 0 || sx >= w as isize {
                continue;
            }
            let sx = if flip {
                w - 1 - sx as usize
            } else {
                sx as usize
            };
            let s = (sy as usize * w + sx) * 3;
            let d = (y * w + x) * 3;
            out[d..d + 3].copy_from_slice(&img[s..s + 3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn normalization_maps_0_and_255_to_minus_one_and_one_in_nchw() {
        let px = [0u8, 128, 255, 255, 0, 0]; // two pixels of a 1×2 image
        let t = u8_to_tensor(&px, 1, 1, 2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let expect = [-1.0, 1.0, 128.0 / 255.0 * 2.0 - 1.0, -1.0, 1.0, -1.0];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn crop_flip_is_a_shifted_possibly_mirrored_copy_with_zero_border() {
        let (h, w) = (8, 8);
        let img: Vec<u8> = (0..h * w * 3).map(|i| (i % 251) as u8 + 1).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut saw_shift = false;
        for _ in 0..50 {
            let out = random_crop_flip(&img, h, w, 4, &mut rng);
            let zeros = out.iter().filter(|&&v| v == 0).count();
            assert_eq!(zeros % 3, 0);
            saw_shift |= zeros > 0;
            // Every non-zero pixel is some pixel of the source.
            for px in out.chunks(3).filter(|p| p[0] != 0) {
                assert!(img.chunks(3).any(|q| q == px));
            }
        }
        assert!(saw_shift);
    }
}
