//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The real-data folder (`DEEPREPAIR_DATA` or `<workspace>/../shared/data`), or `None` with a
/// message when it is absent (the test should then return early).
pub fn data_root() -> Option<PathBuf> {
    let p = std::env::var_os("DEEPREPAIR_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"))
        });
    if p.is_dir() {
        Some(p)
    } else {
        skip_or_fail(&format!(
            "real data folder {} is absent (set DEEPREPAIR_DATA to point at it)",
            p.display()
        ));
        None
    }
}

/// A sub-folder of the real-data folder, or `None` with a skip message.
pub fn data_dir(name: &str) -> Option<PathBuf> {
    let p = data_root()?.join(name);
    if p.is_dir() {
        Some(p)
    } else {
        skip_or_fail(&format!("real data folder {} is absent", p.display()));
        None
    }
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// PSNR in dB between two equally long byte images.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Tests that need the real data skip without it, except where `DEEPREPAIR_REQUIRE_DATA` is set
/// (CI sets it): there a missing data folder fails the test instead of skipping it.
fn skip_or_fail(why: &str) {
    if std::env::var_os("DEEPREPAIR_REQUIRE_DATA").is_some() {
        panic!("{why}, and DEEPREPAIR_REQUIRE_DATA is set: the real data must be there");
    }
    eprintln!("SKIPPED: {why}");
}
