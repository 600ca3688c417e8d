//! The corruption functions of make_cifar_c.py. Images arrive validated (RGB HWC u8,
//! severity 1..=5, frost textures present for Frost). One file per CIFAR-10-C family; this
//! file dispatches and holds what they share.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Assets, CorruptError, Corruption};

mod blur;
mod digital;
mod noise;
mod weather;

use blur::{defocus_blur, glass_blur, motion_blur, zoom_blur};
use digital::{brightness, contrast, elastic_transform, jpeg_compression, pixelate};
use noise::{gaussian_noise, impulse_noise, shot_noise};
use weather::{fog, frost, snow};

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
    res: &Assets,
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
