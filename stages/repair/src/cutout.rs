//! Cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks
//! with Cutout"), as in their CIFAR-10 code (uoguelph-mlrg/Cutout `util/cutout.py`): one square
//! hole (`n_holes = 1`) of side `length` (16 for CIFAR-10, 8 for CIFAR-100 and SVHN in their
//! runs) whose centre is uniform over the pixels, clipped at the borders.
//!
//! Their code zeroes the hole in the *normalized* tensor, i.e. fills it with the dataset mean.
//! This works on u8 HWC images before normalization, so the caller gives the fill colour: pass
//! the dataset mean in u8 (CIFAR-10: `CIFAR10_MEAN_U8`) to match their code, or `[0, 0, 0]`
//! for black.
//!
//! Hole bounds follow theirs exactly: centre `(y, x)` uniform in `[0, h) × [0, w)`,
//! rows `clip(y − length/2, 0, h) .. clip(y + length/2, 0, h)` (integer halves, so an odd
//! `length` gives a hole of side `length − 1`), columns likewise.

use rand::Rng;

use crate::image::ImageRef;

/// CIFAR-10's per-channel training-set mean (0.4914, 0.4822, 0.4465) × 255, rounded: the u8
/// colour that the normalized-space zero of the reference code corresponds to.
pub const CIFAR10_MEAN_U8: [u8; 3] = [125, 123, 114];

/// The hole Cutout cuts: half-open pixel ranges `rows.0..rows.1`, `cols.0..cols.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hole {
    pub rows: (usize, usize),
    pub cols: (usize, usize),
}

/// The hole for a given centre (`cy`, `cx`), clipped as the reference code clips it.
pub fn hole_at(cy: usize, cx: usize, length: usize, width: usize, height: usize) -> Hole {
    let half = (length / 2) as i64;
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    Hole {
        rows: (
            clip(cy as i64 - half, height),
            clip(cy as i64 + half, height),
        ),
        cols: (clip(cx as i64 - half, width), clip(cx as i64 + half, width)),
    }
}

/// Draws the hole's centre as the reference code does (`np.random.randint(h)`, then `w`).
pub fn sample_hole(length: usize, width: usize, height: usize, rng: &mut impl Rng) -> Hole {
    let cy = rng.random_range(0..height.max(1));
    let cx = rng.random_range(0..width.max(1));
    hole_at(cy, cx, length, width, height)
}

/// Fills `hole` of an HWC RGB u8 buffer with `fill`.
pub fn fill_hole(pixels: &mut [u8], width: usize, hole: Hole, fill: [u8; 3]) {
    for y in hole.rows.0..hole.rows.1 {
        for x in hole.cols.0..hole.cols.1 {
            let i = (y * width + x) * 3;
            pixels[i..i + 3].copy_from_slice(&fill);
        }
    }
}

/// Cutout: a copy of `img` with one random `length`-square hole (clipped at the borders)
/// filled with `fill`.
pub fn cutout(img: &ImageRef, length: usize, fill: [u8; 3], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = img.pixels.to_vec();
    let hole = sample_hole(length, img.width, img.height, rng);
    fill_hole(&mut out, img.width, hole, fill);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn image(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i % 251) as u8 + 1).collect()
    }

    #[test]
    fn hole_is_clipped_at_the_borders() {
        // Centre in the interior: a full 16×16 square.
        assert_eq!(
            hole_at(16, 10, 16, 32, 32),
            Hole {
                rows: (8, 24),
                cols: (2, 18)
            }
        );
        // Corner centres: clipped to 8×8.
        assert_eq!(
            hole_at(0, 0, 16, 32, 32),
            Hole {
                rows: (0, 8),
                cols: (0, 8)
            }
        );
        assert_eq!(
            hole_at(31, 31, 16, 32, 32),
            Hole {
                rows: (23, 32),
                cols: (23, 32)
            }
        );
        // Odd length: integer halves, as in the reference code.
        assert_eq!(hole_at(10, 10, 5, 32, 32).rows, (8, 12));
        // Non-square image.
        assert_eq!(hole_at(3, 20, 16, 24, 6).cols, (12, 24));
        assert_eq!(hole_at(3, 20, 16, 24, 6).rows, (0, 6));
    }

    #[test]
    fn cutout_fills_only_the_hole() {
        let (w, h) = (32, 32);
        let px = image(w, h);
        let img = ImageRef {
            pixels: &px,
            width: w,
            height: h,
        };
        let fill = [7, 8, 9];
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let out = cutout(&img, 16, fill, &mut rng);
            let hole = sample_hole(16, w, h, &mut StdRng::seed_from_u64(seed));
            let side_r = hole.rows.1 - hole.rows.0;
            let side_c = hole.cols.1 - hole.cols.0;
            assert!((8..=16).contains(&side_r) && (8..=16).contains(&side_c));
            let mut filled = 0;
            for y in 0..h {
                for x in 0..w {
                    let i = (y * w + x) * 3;
                    let inside = (hole.rows.0..hole.rows.1).contains(&y)
                        && (hole.cols.0..hole.cols.1).contains(&x);
                    if inside {
                        assert_eq!(&out[i..i + 3], &fill);
                        filled += 1;
                    } else {
                        assert_eq!(&out[i..i + 3], &px[i..i + 3]);
                    }
                }
            }
            assert_eq!(filled, side_r * side_c);
        }
    }

    #[test]
    fn centre_covers_the_whole_image() {
        // The centre is uniform over all pixels, so holes touch every border.
        let mut rng = StdRng::seed_from_u64(1);
        let (mut top, mut bottom, mut left, mut right) = (false, false, false, false);
        for _ in 0..2000 {
            let hole = sample_hole(16, 32, 32, &mut rng);
            top |= hole.rows.0 == 0;
            bottom |= hole.rows.1 == 32;
            left |= hole.cols.0 == 0;
            right |= hole.cols.1 == 32;
        }
        assert!(top && bottom && left && right);
    }
}
