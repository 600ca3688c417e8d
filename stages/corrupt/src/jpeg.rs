//! JPEG round trip as Pillow does it with libjpeg-turbo's defaults — `img.save(f, 'JPEG',
//! quality=q)` then `Image.open(f)` — computed in memory, without the (lossless) entropy
//! coding: RGB->YCbCr (jccolor.c fixed point), 4:2:0 by `h2v2_downsample` (alternating bias),
//! level shift, `jpeg_fdct_islow`, quantization by rounding division with the Annex-K tables
//! scaled by `jpeg_quality_scaling` (force_baseline), dequantization, `jpeg_idct_islow`,
//! `h2v2_fancy_upsample` (triangle filter) and YCbCr->RGB (jdcolor.c tables). libjpeg-turbo's
//! SIMD paths are bit-exact with these C routines, so the bytes match Pillow's.
//!
//! Images whose sides are not multiples of 16 are padded by edge replication the way libjpeg
//! does (checked against Pillow for 40x33, 17x9, 63x50 and 1x1).

const LUMA: [u16; 64] = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
    92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
];
const CHROMA: [u16; 64] = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
];

/// `jpeg_add_quant_table` with `jpeg_quality_scaling(quality)` and force_baseline.
fn scaled_table(base: &[u16; 64], quality: u8) -> [i32; 64] {
    let q = quality.clamp(1, 100) as i64;
    let scale = if q < 50 { 5000 / q } else { 200 - q * 2 };
    let mut t = [0i32; 64];
    for (o, &b) in t.iter_mut().zip(base) {
        *o = ((b as i64 * scale + 50) / 100).clamp(1, 255) as i32;
    }
    t
}

const CONST_BITS: i32 = 13;
const PASS1_BITS: i32 = 2;
const F0_298: i64 = 2446;
const F0_390: i64 = 3196;
const F0_541: i64 = 4433;
const F0_765: i64 = 6270;
const F0_899: i64 = 7373;
const F1_175: i64 = 9633;
const F1_501: i64 = 12299;
const F1_847: i64 = 15137;
const F1_961: i64 = 16069;
const F2_053: i64 = 16819;
const F2_562: i64 = 20995;
const F3_072: i64 = 25172;

#[inline]
fn descale(x: i64, n: i32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// `jpeg_fdct_islow` (jfdctint.c), in place; output scaled by 8.
fn fdct_islow(d: &mut [i64; 64]) {
    for r in 0..8 {
        let p = &mut d[r * 8..r * 8 + 8];
        let tmp0 = p[0] + p[7];
        let tmp7 = p[0] - p[7];
        let tmp1 = p[1] + p[6];
        let tmp6 = p[1] - p[6];
        let tmp2 = p[2] + p[5];
        let tmp5 = p[2] - p[5];
        let tmp3 = p[3] + p[4];
        let tmp4 = p[3] - p[4];
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        p[0] = (tmp10 + tmp11) << PASS1_BITS;
        p[4] = (tmp10 - tmp11) << PASS1_BITS;
        let z1 = (tmp12 + tmp13) * F0_541;
        p[2] = descale(z1 + tmp13 * F0_765, CONST_BITS - PASS1_BITS);
        p[6] = descale(z1 - tmp12 * F1_847, CONST_BITS - PASS1_BITS);
        let (o7, o5, o3, o1) = odd_fdct(tmp4, tmp5, tmp6, tmp7);
        p[7] = descale(o7, CONST_BITS - PASS1_BITS);
        p[5] = descale(o5, CONST_BITS - PASS1_BITS);
        p[3] = descale(o3, CONST_BITS - PASS1_BITS);
        p[1] = descale(o1, CONST_BITS - PASS1_BITS);
    }
    for c in 0..8 {
        let g = |k: usize| d[k * 8 + c];
        let tmp0 = g(0) + g(7);
        let tmp7 = g(0) - g(7);
        let tmp1 = g(1) + g(6);
        let tmp6 = g(1) - g(6);
        let tmp2 = g(2) + g(5);
        let tmp5 = g(2) - g(5);
        let tmp3 = g(3) + g(4);
        let tmp4 = g(3) - g(4);
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        let z1 = (tmp12 + tmp13) * F0_541;
        let (o7, o5, o3, o1) = odd_fdct(tmp4, tmp5, tmp6, tmp7);
        let n = CONST_BITS + PASS1_BITS;
        d[c] = descale(tmp10 + tmp11, PASS1_BITS);
        d[4 * 8 + c] = descale(tmp10 - tmp11, PASS1_BITS);
        d[2 * 8 + c] = descale(z1 + tmp13 * F0_765, n);
        d[6 * 8 + c] = descale(z1 - tmp12 * F1_847, n);
        d[7 * 8 + c] = descale(o7, n);
        d[5 * 8 + c] = descale(o5, n);
        d[3 * 8 + c] = descale(o3, n);
        d[8 + c] = descale(o1, n);
    }
}

#[inline]
fn odd_fdct(tmp4: i64, tmp5: i64, tmp6: i64, tmp7: i64) -> (i64, i64, i64, i64) {
    let z1 = tmp4 + tmp7;
    let z2 = tmp5 + tmp6;
    let z3 = tmp4 + tmp6;
    let z4 = tmp5 + tmp7;
    let z5 = (z3 + z4) * F1_175;
    let tmp4 = tmp4 * F0_298;
    let tmp5 = tmp5 * F2_053;
    let tmp6 = tmp6 * F3_072;
    let tmp7 = tmp7 * F1_501;
    let z1 = -z1 * F0_899;
    let z2 = -z2 * F2_562;
    let z3 = -z3 * F1_961 + z5;
    let z4 = -z4 * F0_390 + z5;
    (
        tmp4 + z1 + z3,
        tmp5 + z2 + z4,
        tmp6 + z2 + z3,
        tmp7 + z1 + z4,
    )
}

/// `jpeg_idct_islow` (jidctint.c) on dequantized coefficients; returns samples 0..=255.
fn idct_islow(coef: &[i64; 64]) -> [u8; 64] {
    let mut ws = [0i64; 64];
    for c in 0..8 {
        let g = |k: usize| coef[k * 8 + c];
        let (a, b) = idct_1d([g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7)]);
        let n = CONST_BITS - PASS1_BITS;
        for k in 0..4 {
            ws[k * 8 + c] = descale(a[k] + b[k], n);
            ws[(7 - k) * 8 + c] = descale(a[k] - b[k], n);
        }
    }
    let mut out = [0u8; 64];
    for r in 0..8 {
        let p = &ws[r * 8..r * 8 + 8];
        let (a, b) = idct_1d([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
        let n = CONST_BITS + PASS1_BITS + 3;
        for k in 0..4 {
            out[r * 8 + k] = (descale(a[k] + b[k], n) + 128).clamp(0, 255) as u8;
            out[r * 8 + 7 - k] = (descale(a[k] - b[k], n) + 128).clamp(0, 255) as u8;
        }
    }
    out
}

/// Even part (tmp10, tmp11, tmp12, tmp13) and odd part (tmp3, tmp2, tmp1, tmp0) of the islow
/// IDCT, paired so that output k = even[k] +/- odd[k].
#[inline]
fn idct_1d(v: [i64; 8]) -> ([i64; 4], [i64; 4]) {
    let z2 = v[2];
    let z3 = v[6];
    let z1 = (z2 + z3) * F0_541;
    let tmp2 = z1 - z3 * F1_847;
    let tmp3 = z1 + z2 * F0_765;
    let tmp0 = (v[0] + v[4]) << CONST_BITS;
    let tmp1 = (v[0] - v[4]) << CONST_BITS;
    let tmp10 = tmp0 + tmp3;
    let tmp13 = tmp0 - tmp3;
    let tmp11 = tmp1 + tmp2;
    let tmp12 = tmp1 - tmp2;
    let (t0, t1, t2, t3) = (v[7], v[5], v[3], v[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * F1_175;
    let t0 = t0 * F0_298;
    let t1 = t1 * F2_053;
    let t2 = t2 * F3_072;
    let t3 = t3 * F1_501;
    let z1 = -z1 * F0_899;
    let z2 = -z2 * F2_562;
    let z3 = -z3 * F1_961 + z5;
    let z4 = -z4 * F0_390 + z5;
    let t0 = t0 + z1 + z3;
    let t1 = t1 + z2 + z4;
    let t2 = t2 + z2 + z3;
    let t3 = t3 + z1 + z4;
    ([tmp10, tmp11, tmp12, tmp13], [t3, t2, t1, t0])
}

/// Quantize and dequantize one plane (dimensions multiples of 8) in place.
fn code_plane(plane: &mut [u8], pw: usize, ph: usize, table: &[i32; 64]) {
    let mut blk = [0i64; 64];
    for by in (0..ph).step_by(8) {
        for bx in (0..pw).step_by(8) {
            for y in 0..8 {
                for x in 0..8 {
                    blk[y * 8 + x] = plane[(by + y) * pw + bx + x] as i64 - 128;
                }
            }
            fdct_islow(&mut blk);
            for (c, &q) in blk.iter_mut().zip(table) {
                let d = (q as i64) << 3;
                let a = (c.abs() + (d >> 1)) / d;
                *c = if *c < 0 { -a } else { a } * q as i64;
            }
            let px = idct_islow(&blk);
            for y in 0..8 {
                plane[(by + y) * pw + bx..(by + y) * pw + bx + 8]
                    .copy_from_slice(&px[y * 8..y * 8 + 8]);
            }
        }
    }
}

const SCALEBITS: i32 = 16;
const ONE_HALF: i64 = 1 << (SCALEBITS - 1);

fn fix(x: f64) -> i64 {
    (x * (1i64 << SCALEBITS) as f64 + 0.5) as i64
}

/// Round trip of an RGB HWC image through Pillow/libjpeg-turbo JPEG at `quality`.
pub(crate) fn round_trip(px: &[u8], w: usize, h: usize, quality: u8) -> Vec<u8> {
    // Full-size planes padded to multiples of 16 by edge replication.
    let pw = w.div_ceil(16) * 16;
    let ph = h.div_ceil(16) * 16;
    let (mut yp, mut cbf, mut crf) = (vec![0u8; pw * ph], vec![0u8; pw * ph], vec![0u8; pw * ph]);
    let cbo = 128i64 << SCALEBITS;
    let (fy_r, fy_g, fy_b) = (fix(0.29900), fix(0.58700), fix(0.11400));
    let (fcb_r, fcb_g, f05) = (fix(0.16874), fix(0.33126), fix(0.5));
    let (fcr_g, fcr_b) = (fix(0.41869), fix(0.08131));
    for y in 0..ph {
        for x in 0..pw {
            let i = (y.min(h - 1) * w + x.min(w - 1)) * 3;
            let (r, g, b) = (px[i] as i64, px[i + 1] as i64, px[i + 2] as i64);
            let o = y * pw + x;
            yp[o] = ((fy_r * r + fy_g * g + fy_b * b + ONE_HALF) >> SCALEBITS) as u8;
            cbf[o] = ((-fcb_r * r - fcb_g * g + f05 * b + cbo + ONE_HALF - 1) >> SCALEBITS) as u8;
            crf[o] = ((f05 * r - fcr_g * g - fcr_b * b + cbo + ONE_HALF - 1) >> SCALEBITS) as u8;
        }
    }
    // h2v2_downsample with bias 1, 2, 1, 2, ...
    let (cw, chh) = (pw / 2, ph / 2);
    let down = |full: &[u8]| -> Vec<u8> {
        let mut out = vec![0u8; cw * chh];
        for y in 0..chh {
            for x in 0..cw {
                let bias = if x % 2 == 0 { 1 } else { 2 };
                let s = full[2 * y * pw + 2 * x] as u32
                    + full[2 * y * pw + 2 * x + 1] as u32
                    + full[(2 * y + 1) * pw + 2 * x] as u32
                    + full[(2 * y + 1) * pw + 2 * x + 1] as u32;
                out[y * cw + x] = ((s + bias) >> 2) as u8;
            }
        }
        out
    };
    let mut cb = down(&cbf);
    let mut cr = down(&crf);
    // jcprepct.c pads the input only to a whole row group (2 rows), then pads the *downsampled*
    // planes to the iMCU height by repeating their last row (horizontally the input itself is
    // edge-extended before downsampling, as done above).
    let real_rows = h.div_ceil(2);
    for plane in [&mut cb, &mut cr] {
        for y in real_rows..chh {
            plane.copy_within((real_rows - 1) * cw..real_rows * cw, y * cw);
        }
    }
    let lt = scaled_table(&LUMA, quality);
    let ct = scaled_table(&CHROMA, quality);
    code_plane(&mut yp, pw, ph, &lt);
    code_plane(&mut cb, cw, chh, &ct);
    code_plane(&mut cr, cw, chh, &ct);
    // h2v2_fancy_upsample over the real downsampled size, edge rows replicated.
    let (dw, dh) = (w.div_ceil(2), h.div_ceil(2));
    let up = |p: &[u8]| -> Vec<u8> {
        let mut out = vec![0u8; dw * 2 * dh * 2];
        let ow = dw * 2;
        for y in 0..dh {
            for v in 0..2 {
                let ny = if v == 0 {
                    y.saturating_sub(1)
                } else {
                    (y + 1).min(dh - 1)
                };
                let col = |x: usize| p[y * cw + x] as i32 * 3 + p[ny * cw + x] as i32;
                let orow = &mut out[(2 * y + v) * ow..(2 * y + v + 1) * ow];
                if dw == 1 {
                    let t = col(0);
                    orow[0] = ((t * 4 + 8) >> 4) as u8;
                    orow[1] = ((t * 4 + 7) >> 4) as u8;
                    continue;
                }
                for x in 0..dw {
                    let this = col(x);
                    let last = if x == 0 { this } else { col(x - 1) };
                    let next = if x + 1 == dw { this } else { col(x + 1) };
                    orow[2 * x] = ((this * 3 + last + 8) >> 4) as u8;
                    orow[2 * x + 1] = ((this * 3 + next + 7) >> 4) as u8;
                }
            }
        }
        out
    };
    let cbu = up(&cb);
    let cru = up(&cr);
    let ow = dw * 2;
    let mut out = vec![0u8; w * h * 3];
    let (f1402, f1772, f0714, f0344) = (fix(1.40200), fix(1.77200), fix(0.71414), fix(0.34414));
    for y in 0..h {
        for x in 0..w {
            let yy = yp[y * pw + x] as i64;
            let cbv = cbu[y * ow + x] as i64 - 128;
            let crv = cru[y * ow + x] as i64 - 128;
            let r = yy + ((f1402 * crv + ONE_HALF) >> SCALEBITS);
            let g = yy + ((-f0344 * cbv + ONE_HALF - f0714 * crv) >> SCALEBITS);
            let b = yy + ((f1772 * cbv + ONE_HALF) >> SCALEBITS);
            let o = (y * w + x) * 3;
            out[o] = r.clamp(0, 255) as u8;
            out[o + 1] = g.clamp(0, 255) as u8;
            out[o + 2] = b.clamp(0, 255) as u8;
        }
    }
    out
}
