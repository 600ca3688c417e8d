//! Numerical building blocks that stand in for the scipy / skimage / OpenCV / Pillow /
//! ImageMagick calls of `make_cifar_c.py`. Each function names the call it reproduces and how
//! it may differ.

/// Boundary handling of 1-D index lookups.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Border {
    /// scipy `nearest`, ImageMagick's default `Edge` virtual pixels: clamp.
    Nearest,
    /// scipy `reflect` (half-sample symmetric: `d c b a | a b c d | d c b a`).
    Reflect,
    /// OpenCV `BORDER_REFLECT_101` / scipy `mirror`: `d c b | a b c d | c b a`.
    Reflect101,
}

#[inline]
pub(crate) fn border_index(i: isize, n: usize, border: Border) -> usize {
    let n = n as isize;
    if (0..n).contains(&i) {
        return i as usize;
    }
    match border {
        Border::Nearest => i.clamp(0, n - 1) as usize,
        Border::Reflect => {
            let p = 2 * n;
            let m = i.rem_euclid(p);
            (if m >= n { p - 1 - m } else { m }) as usize
        }
        Border::Reflect101 => {
            if n == 1 {
                return 0;
            }
            let p = 2 * n - 2;
            let m = i.rem_euclid(p);
            (if m >= n { p - m } else { m }) as usize
        }
    }
}

/// scipy's `_gaussian_kernel1d` (order 0): radius `int(truncate * sigma + 0.5)`,
/// weights `exp(-x^2 / (2 sigma^2))`, normalized.
pub(crate) fn scipy_gaussian_kernel(sigma: f64, truncate: f64) -> Vec<f64> {
    let radius = (truncate * sigma + 0.5) as isize;
    let mut k: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

/// Copy an HWC image into a buffer padded by `ry` rows and `rx` columns on each side.
fn pad(
    img: &[f64],
    h: usize,
    w: usize,
    ch: usize,
    ry: usize,
    rx: usize,
    border: Border,
) -> (Vec<f64>, usize) {
    let pw = w + 2 * rx;
    let ph = h + 2 * ry;
    let cols: Vec<usize> = (0..pw)
        .map(|x| border_index(x as isize - rx as isize, w, border))
        .collect();
    let mut out = vec![0.0; ph * pw * ch];
    for py in 0..ph {
        let sy = border_index(py as isize - ry as isize, h, border);
        let row = &img[sy * w * ch..(sy + 1) * w * ch];
        let orow = &mut out[py * pw * ch..(py + 1) * pw * ch];
        for (px, &sx) in cols.iter().enumerate() {
            orow[px * ch..(px + 1) * ch].copy_from_slice(&row[sx * ch..(sx + 1) * ch]);
        }
    }
    (out, pw)
}

/// Correlate every channel of an HWC image with a 1-D kernel along rows (axis 0) or
/// columns (axis 1). `kernel.len()` must be odd. Taps are summed in kernel order.
pub(crate) fn correlate_axis(
    img: &[f64],
    h: usize,
    w: usize,
    ch: usize,
    kernel: &[f64],
    axis: usize,
    border: Border,
) -> Vec<f64> {
    let r = kernel.len() / 2;
    let (ry, rx) = if axis == 0 { (r, 0) } else { (0, r) };
    let (p, pw) = pad(img, h, w, ch, ry, rx, border);
    // distance between consecutive taps in the padded buffer
    let stride = if axis == 0 { pw * ch } else { ch };
    let mut out = vec![0.0; img.len()];
    for y in 0..h {
        for x in 0..w {
            let base = (y * pw + x) * ch;
            for c in 0..ch {
                let mut acc = 0.0;
                let mut idx = base + c;
                for &kv in kernel {
                    acc += kv * p[idx];
                    idx += stride;
                }
                out[(y * w + x) * ch + c] = acc;
            }
        }
    }
    out
}

/// `skimage.filters.gaussian` / `scipy.ndimage.gaussian_filter` over the two spatial axes
/// (axis 0 then axis 1, as scipy does); channels are not mixed. sigma <= 1e-15 is a no-op
/// like scipy.
pub(crate) fn gaussian_filter(
    img: &[f64],
    h: usize,
    w: usize,
    ch: usize,
    sigma: f64,
    truncate: f64,
    border: Border,
) -> Vec<f64> {
    if sigma <= 1e-15 {
        return img.to_vec();
    }
    let k = scipy_gaussian_kernel(sigma, truncate);
    let tmp = correlate_axis(img, h, w, ch, &k, 0, border);
    correlate_axis(&tmp, h, w, ch, &k, 1, border)
}

/// Dense 2-D correlation of every channel (OpenCV `filter2D`, anchor at the centre).
/// OpenCV switches to a DFT for kernels of 11x11 and more; results agree to float rounding.
pub(crate) fn filter2d(
    img: &[f64],
    h: usize,
    w: usize,
    ch: usize,
    kernel: &[f64],
    ksize: usize,
    border: Border,
) -> Vec<f64> {
    let r = ksize / 2;
    let (p, pw) = pad(img, h, w, ch, r, r, border);
    // Only the non-zero taps matter (the defocus disk is mostly zeros); row-major order.
    let taps: Vec<(usize, f64)> = (0..ksize)
        .flat_map(|ky| (0..ksize).map(move |kx| (ky, kx)))
        .filter_map(|(ky, kx)| {
            let v = kernel[ky * ksize + kx];
            (v != 0.0).then_some(((ky * pw + kx) * ch, v))
        })
        .collect();
    let mut out = vec![0.0; img.len()];
    if ch == 3 {
        // same per-channel summation order, three channels per pass over the taps
        for y in 0..h {
            for x in 0..w {
                let base = (y * pw + x) * 3;
                let mut acc = [0.0f64; 3];
                for &(off, v) in &taps {
                    let q = &p[base + off..base + off + 3];
                    acc[0] += v * q[0];
                    acc[1] += v * q[1];
                    acc[2] += v * q[2];
                }
                out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
            }
        }
        return out;
    }
    for y in 0..h {
        for x in 0..w {
            let base = (y * pw + x) * ch;
            for c in 0..ch {
                let mut acc = 0.0;
                for &(off, v) in &taps {
                    acc += v * p[base + off + c];
                }
                out[(y * w + x) * ch + c] = acc;
            }
        }
    }
    out
}

/// OpenCV `getGaussianKernel(ksize, sigma)` for sigma > 0.
pub(crate) fn cv_gaussian_kernel(ksize: usize, sigma: f64) -> Vec<f64> {
    let scale2x = -0.5 / (sigma * sigma);
    let c = (ksize as f64 - 1.0) / 2.0;
    let mut k: Vec<f64> = (0..ksize)
        .map(|i| {
            let x = i as f64 - c;
            (scale2x * x * x).exp()
        })
        .collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

/// `disk(radius, alias_blur)` of make_cifar_c.py: an aliased disk on a 17x17 grid (radius <= 8)
/// normalized to sum 1, then `cv2.GaussianBlur` with a 3x3 (or 5x5 for radius > 8) kernel,
/// both in float32 like the reference (`dtype=np.float32`). Returns (kernel, ksize).
pub(crate) fn disk_kernel(radius: f64, alias_blur: f64) -> (Vec<f64>, usize) {
    let (half, ks) = if radius <= 8.0 {
        (8isize, 3usize)
    } else {
        (radius as isize, 5usize)
    };
    let n = (2 * half + 1) as usize;
    let mut d = vec![0.0f32; n * n];
    for (iy, y) in (-half..=half).enumerate() {
        for (ix, x) in (-half..=half).enumerate() {
            if ((x * x + y * y) as f64) <= radius * radius {
                d[iy * n + ix] = 1.0;
            }
        }
    }
    let s: f32 = d.iter().sum();
    d.iter_mut().for_each(|v| *v /= s);
    let g: Vec<f32> = cv_gaussian_kernel(ks, alias_blur)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let r = (ks / 2) as isize;
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0.0f32; n * n];
        for y in 0..n {
            for x in 0..n {
                let mut acc = 0.0f32;
                for (k, &kv) in g.iter().enumerate() {
                    let o = k as isize - r;
                    let (yy, xx) = if horizontal {
                        (y, border_index(x as isize + o, n, Border::Reflect101))
                    } else {
                        (border_index(y as isize + o, n, Border::Reflect101), x)
                    };
                    acc += kv * src[yy * n + xx];
                }
                out[y * n + x] = acc;
            }
        }
        out
    };
    let t = pass(&d, true);
    let blurred = pass(&t, false);
    (blurred.into_iter().map(|v| v as f64).collect(), n)
}

/// Round half to even, like Python's `round` and OpenCV's `cvRound`.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Sample positions of `scipy.ndimage.zoom(order=1)` along one axis of length `n_in` zoomed to
/// `n_out = round(n_in * z)`: output index `o` reads input coordinate
/// `o * (n_in - 1) / (n_out - 1)` (scipy's `grid_mode=False`). Returns (i0, i1, frac).
fn zoom_coords(n_in: usize, n_out: usize) -> Vec<(usize, usize, f64)> {
    let f = if n_out > 1 {
        (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
    } else {
        0.0
    };
    (0..n_out)
        .map(|o| {
            let c = o as f64 * f;
            let i0 = (c.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, c - i0 as f64)
        })
        .collect()
}

/// `out += clipped_zoom(img, z)` where `clipped_zoom` is make_cifar_c.py's: centre-crop
/// `ceil(n / z)`, `scipy.ndimage.zoom(crop, (z, z, 1), order=1)` (output `round(n_c * z)`,
/// computed in double, stored as float32), centre-trim back to `n`. Only the kept pixels are
/// computed. The reference assumes a square image (it uses the height for both axes); here
/// each axis uses its own length, which is identical for square images.
pub(crate) fn clipped_zoom_add(
    img: &[f32],
    h: usize,
    w: usize,
    ch: usize,
    z: f64,
    out: &mut [f32],
) {
    let axis = |n: usize| -> Vec<(usize, usize, f64)> {
        let nc = ((n as f64 / z).ceil() as usize).clamp(1, n);
        let start = (n - nc) / 2;
        let no = (round_half_even(nc as f64 * z) as usize).max(1);
        let trim = no.saturating_sub(n) / 2;
        zoom_coords(nc, no)
            .into_iter()
            .skip(trim)
            .take(n)
            .map(|(a, b, f)| (a + start, b + start, f))
            .collect()
    };
    let cy = axis(h);
    let cx = axis(w);
    for (y, &(y0, y1, fy)) in cy.iter().enumerate() {
        let r0 = &img[y0 * w * ch..(y0 + 1) * w * ch];
        let r1 = &img[y1 * w * ch..(y1 + 1) * w * ch];
        let orow = &mut out[y * w * ch..(y + 1) * w * ch];
        for (x, &(x0, x1, fx)) in cx.iter().enumerate() {
            for c in 0..ch {
                let p00 = r0[x0 * ch + c] as f64;
                let p01 = r0[x1 * ch + c] as f64;
                let p10 = r1[x0 * ch + c] as f64;
                let p11 = r1[x1 * ch + c] as f64;
                let v =
                    (1.0 - fy) * ((1.0 - fx) * p00 + fx * p01) + fy * ((1.0 - fx) * p10 + fx * p11);
                orow[x * ch + c] += v as f32;
            }
        }
    }
}

/// `clipped_zoom(img, z)` of make_cifar_c.py (see [`clipped_zoom_add`]).
pub(crate) fn clipped_zoom(img: &[f32], h: usize, w: usize, ch: usize, z: f64) -> Vec<f32> {
    let mut out = vec![0f32; img.len()];
    clipped_zoom_add(img, h, w, ch, z, &mut out);
    out
}

/// ImageMagick `MotionBlurImage(radius, sigma, angle)` (MagickCore/effect.c) on 8-bit data:
/// kernel width `2*ceil(radius)+1`, one-sided Gaussian weights `exp(-i^2/(2 sigma^2))`
/// normalized, tap `i` at offset `(round(i cos a), round(i sin a))` (x, y), out-of-image taps
/// read the edge pixel (the default `Edge` virtual-pixel method), result rounded to 8 bits.
/// Differs from the reference only in that ImageMagick works in 16-bit quanta (HDRI float
/// on most builds) before writing the 8-bit PNG; rounding may differ by 1 in rare ties.
pub(crate) fn motion_blur_u8(
    img: &[u8],
    h: usize,
    w: usize,
    ch: usize,
    radius: f64,
    sigma: f64,
    angle_deg: f64,
) -> Vec<u8> {
    let width = if radius > f64::EPSILON {
        (2.0 * radius.ceil() + 1.0) as usize
    } else {
        3
    };
    let sigma = if sigma.abs() < 1e-12 { 1e-12 } else { sigma };
    let mut kernel: Vec<f64> = (0..width)
        .map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|v| *v /= s);
    let a = angle_deg.to_radians();
    let px = width as f64 * a.sin();
    let py = width as f64 * a.cos();
    let hyp = px.hypot(py);
    let offs: Vec<(isize, isize)> = (0..width)
        .map(|i| {
            let ox = ((i as f64 * py) / hyp - 0.5).ceil() as isize;
            let oy = ((i as f64 * px) / hyp - 0.5).ceil() as isize;
            (ox, oy)
        })
        .collect();
    let mut out = vec![0u8; img.len()];
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f64; 4];
            for (&k, &(ox, oy)) in kernel.iter().zip(&offs) {
                let yy = border_index(y as isize + oy, h, Border::Nearest);
                let xx = border_index(x as isize + ox, w, Border::Nearest);
                let base = (yy * w + xx) * ch;
                for c in 0..ch.min(4) {
                    acc[c] += k * img[base + c] as f64;
                }
            }
            for c in 0..ch.min(4) {
                out[(y * w + x) * ch + c] = (acc[c] + 0.5).floor().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` for the BOX filter, converted to its 8-bit fixed point.
/// Returns per output pixel (first input index, number of taps) and the taps, `stride` apart.
struct BoxCoeffs {
    bounds: Vec<(usize, usize)>,
    taps: Vec<i64>,
    stride: usize,
}

fn pillow_box_coeffs(in_size: usize, out_size: usize) -> BoxCoeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 0.5 * filterscale;
    let ss = 1.0 / filterscale;
    let stride = (support.ceil() as usize) * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut taps = vec![0i64; out_size * stride];
    let mut k = vec![0.0f64; stride];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(stride);
        let mut ww = 0.0;
        for (x, kv) in k.iter_mut().enumerate().take(n) {
            let t = (x as f64 + xmin as f64 - center + 0.5) * ss;
            *kv = if t > -0.5 && t <= 0.5 { 1.0 } else { 0.0 };
            ww += *kv;
        }
        for (x, &kv) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kv / ww } else { kv };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            taps[xx * stride + x] = (if v < 0.0 { -0.5 + f } else { 0.5 + f }) as i64;
        }
        bounds.push((xmin, n));
    }
    BoxCoeffs {
        bounds,
        taps,
        stride,
    }
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow `Image.resize((ow, oh), Image.BOX)` on an 8-bit image: horizontal pass then
/// vertical pass, each in Pillow's 22-bit fixed point with rounding. Byte-exact by design
/// (and checked against Pillow through the pixelate fixture).
pub(crate) fn pillow_box_resize(
    img: &[u8],
    h: usize,
    w: usize,
    ch: usize,
    oh: usize,
    ow: usize,
) -> Vec<u8> {
    let mut cur = img.to_vec();
    let mut cw = w;
    if ow != w {
        let co = pillow_box_coeffs(w, ow);
        let mut out = vec![0u8; h * ow * ch];
        for y in 0..h {
            let row = &cur[y * cw * ch..(y + 1) * cw * ch];
            for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
                let k = &co.taps[xx * co.stride..xx * co.stride + n];
                if ch == 3 {
                    let mut s = [1i64 << (PRECISION_BITS - 1); 3];
                    for (i, &kv) in k.iter().enumerate() {
                        let q = &row[(xmin + i) * 3..(xmin + i) * 3 + 3];
                        s[0] += q[0] as i64 * kv;
                        s[1] += q[1] as i64 * kv;
                        s[2] += q[2] as i64 * kv;
                    }
                    let o = (y * ow + xx) * 3;
                    out[o] = clip8(s[0]);
                    out[o + 1] = clip8(s[1]);
                    out[o + 2] = clip8(s[2]);
                    continue;
                }
                for c in 0..ch {
                    let mut s: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        s += row[(xmin + i) * ch + c] as i64 * kv;
                    }
                    out[(y * ow + xx) * ch + c] = clip8(s);
                }
            }
        }
        cur = out;
        cw = ow;
    }
    if oh != h {
        let co = pillow_box_coeffs(h, oh);
        let rl = cw * ch;
        let mut out = vec![0u8; oh * rl];
        let mut acc = vec![0i64; rl];
        for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
            acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
            for (i, &kv) in co.taps[yy * co.stride..yy * co.stride + n]
                .iter()
                .enumerate()
            {
                let row = &cur[(ymin + i) * rl..(ymin + i + 1) * rl];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += p as i64 * kv;
                }
            }
            for (o, &a) in out[yy * rl..(yy + 1) * rl].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        cur = out;
    }
    cur
}

/// OpenCV `cv2.resize(img, (ow, oh), interpolation=INTER_LINEAR)` for 8-bit images:
/// half-pixel centres, `src = (d + 0.5) * in/out - 0.5`, clamped at the edges. OpenCV uses
/// 11-bit fixed-point weights; this uses doubles and rounds once. For the frost textures
/// (scale 0.2) every sample lands on an integer source position, so the two agree exactly.
pub(crate) fn cv_resize_linear(
    img: &[u8],
    h: usize,
    w: usize,
    ch: usize,
    oh: usize,
    ow: usize,
) -> Vec<u8> {
    let map = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f64)> {
        let scale = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|d| {
                let s = (d as f64 + 0.5) * scale - 0.5;
                let f = s.floor();
                let frac = s - f;
                let i0 = border_index(f as isize, n_in, Border::Nearest);
                let i1 = border_index(f as isize + 1, n_in, Border::Nearest);
                if s < 0.0 {
                    (0, 0, 0.0)
                } else {
                    (i0, i1, frac)
                }
            })
            .collect()
    };
    let my = map(h, oh);
    let mx = map(w, ow);
    let mut out = vec![0u8; oh * ow * ch];
    for (oy, &(y0, y1, fy)) in my.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in mx.iter().enumerate() {
            for c in 0..ch {
                let p = |y: usize, x: usize| img[(y * w + x) * ch + c] as f64;
                let v = (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1))
                    + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1));
                out[(oy * ow + ox) * ch + c] = round_half_even(v).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// `plasma_fractal(mapsize, wibbledecay)` of make_cifar_c.py (diamond-square), step for step,
/// including `np.roll`'s wrap-around and the `wibble * uniform(-wibble, wibble)` noise scale.
/// Returns a `mapsize x mapsize` map in [0, 1]. `uniform` draws U(-a, a) values in numpy's
/// row-major order.
pub(crate) fn plasma_fractal(
    mapsize: usize,
    wibbledecay: f64,
    mut uniform: impl FnMut(f64) -> f64,
) -> Vec<f64> {
    let ms = mapsize;
    let mut m = vec![0.0f64; ms * ms];
    let mut step = ms;
    let mut wibble = 100.0f64;
    while step >= 2 {
        let n = ms / step;
        let hs = step / 2;
        // fillsquares
        let corner = |m: &Vec<f64>, i: usize, j: usize| m[(i * step) * ms + j * step];
        let mut sq = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                sq[i * n + j] = corner(&m, i, j) + corner(&m, (i + 1) % n, j);
            }
        }
        let mut sq2 = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                sq2[i * n + j] = sq[i * n + j] + sq[i * n + (j + 1) % n];
            }
        }
        for i in 0..n {
            for j in 0..n {
                m[(hs + i * step) * ms + hs + j * step] =
                    sq2[i * n + j] / 4.0 + wibble * uniform(wibble);
            }
        }
        // filldiamonds
        let dr: Vec<f64> = (0..n * n)
            .map(|k| m[(hs + (k / n) * step) * ms + hs + (k % n) * step])
            .collect();
        let ul: Vec<f64> = (0..n * n)
            .map(|k| m[((k / n) * step) * ms + (k % n) * step])
            .collect();
        for i in 0..n {
            for j in 0..n {
                let ldr = dr[i * n + j] + dr[((i + n - 1) % n) * n + j];
                let lul = ul[i * n + j] + ul[i * n + (j + 1) % n];
                m[(i * step) * ms + hs + j * step] = (ldr + lul) / 4.0 + wibble * uniform(wibble);
            }
        }
        for i in 0..n {
            for j in 0..n {
                let tdr = dr[i * n + j] + dr[i * n + (j + n - 1) % n];
                let tul = ul[i * n + j] + ul[((i + 1) % n) * n + j];
                m[(hs + i * step) * ms + j * step] = (tdr + tul) / 4.0 + wibble * uniform(wibble);
            }
        }
        step /= 2;
        wibble /= wibbledecay;
    }
    let min = m.iter().cloned().fold(f64::INFINITY, f64::min);
    m.iter_mut().for_each(|v| *v -= min);
    let max = m.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if max > 0.0 {
        m.iter_mut().for_each(|v| *v /= max);
    }
    m
}

/// `skimage.color.rgb2hsv` for one pixel, operation for operation (later maxima override
/// earlier ones: blue over green over red).
pub(crate) fn rgb2hsv(r: f64, g: f64, b: f64) -> (f64, f64, f64) {
    let v = r.max(g).max(b);
    let delta = v - r.min(g).min(b);
    let s = if delta == 0.0 { 0.0 } else { delta / v };
    let mut h = 0.0;
    if r == v {
        h = (g - b) / delta;
    }
    if g == v {
        h = 2.0 + (b - r) / delta;
    }
    if b == v {
        h = 4.0 + (r - g) / delta;
    }
    let mut h = (h / 6.0).rem_euclid(1.0);
    if delta == 0.0 {
        h = 0.0;
    }
    (h, s, v)
}

/// `skimage.color.hsv2rgb` for one pixel.
pub(crate) fn hsv2rgb(h: f64, s: f64, v: f64) -> (f64, f64, f64) {
    let hi = (h * 6.0).floor();
    let f = h * 6.0 - hi;
    let p = v * (1.0 - s);
    let q = v * (1.0 - f * s);
    let t = v * (1.0 - (1.0 - f) * s);
    match (hi as i64).rem_euclid(256).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Solve for the 2x3 affine `M` with `M [x y 1]^T = dst` for three point pairs
/// (OpenCV `getAffineTransform`). Returns None for collinear points.
pub(crate) fn affine_from_points(src: [[f64; 2]; 3], dst: [[f64; 2]; 3]) -> Option<[f64; 6]> {
    let a = [
        [src[0][0], src[0][1], 1.0],
        [src[1][0], src[1][1], 1.0],
        [src[2][0], src[2][1], 1.0],
    ];
    let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    if det.abs() < 1e-12 {
        return None;
    }
    let solve = |b: [f64; 3]| -> [f64; 3] {
        let mut r = [0.0; 3];
        for (col, out) in r.iter_mut().enumerate() {
            let mut m = a;
            for row in 0..3 {
                m[row][col] = b[row];
            }
            let d = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
                - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
            *out = d / det;
        }
        r
    };
    let rx = solve([dst[0][0], dst[1][0], dst[2][0]]);
    let ry = solve([dst[0][1], dst[1][1], dst[2][1]]);
    Some([rx[0], rx[1], rx[2], ry[0], ry[1], ry[2]])
}

/// OpenCV `warpAffine(img, M, (w, h), flags=INTER_LINEAR, borderMode=BORDER_REFLECT_101)` for
/// float images, including OpenCV's quantization of source coordinates to 1/32 pixel
/// (`INTER_BITS = 5`, `AB_BITS = 10`) and its bilinear weights `(1 - k/32, k/32)`.
pub(crate) fn cv_warp_affine_reflect101(
    img: &[f64],
    h: usize,
    w: usize,
    ch: usize,
    m: [f64; 6],
) -> Vec<f64> {
    // invertAffineTransform
    let d = m[0] * m[4] - m[1] * m[3];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let a11 = m[4] * d;
    let a22 = m[0] * d;
    let a12 = -m[1] * d;
    let a21 = -m[3] * d;
    let b1 = -a11 * m[2] - a12 * m[5];
    let b2 = -a21 * m[2] - a22 * m[5];
    const AB_SCALE: f64 = 1024.0;
    let sat = |v: f64| round_half_even(v).clamp(i32::MIN as f64, i32::MAX as f64) as i64;
    let mut out = vec![0.0; img.len()];
    for y in 0..h {
        let x0 = sat((a12 * y as f64 + b1) * AB_SCALE);
        let y0 = sat((a22 * y as f64 + b2) * AB_SCALE);
        for x in 0..w {
            let xq = (x0 + sat(a11 * x as f64 * AB_SCALE) + 16) >> 5;
            let yq = (y0 + sat(a21 * x as f64 * AB_SCALE) + 16) >> 5;
            let (xi, fx) = (xq >> 5, (xq & 31) as f64 / 32.0);
            let (yi, fy) = (yq >> 5, (yq & 31) as f64 / 32.0);
            let xa = border_index(xi as isize, w, Border::Reflect101);
            let xb = border_index(xi as isize + 1, w, Border::Reflect101);
            let ya = border_index(yi as isize, h, Border::Reflect101);
            let yb = border_index(yi as isize + 1, h, Border::Reflect101);
            for c in 0..ch {
                let p = |yy: usize, xx: usize| img[(yy * w + xx) * ch + c];
                out[(y * w + x) * ch + c] = (1.0 - fy) * ((1.0 - fx) * p(ya, xa) + fx * p(ya, xb))
                    + fy * ((1.0 - fx) * p(yb, xa) + fx * p(yb, xb));
            }
        }
    }
    out
}

/// scipy `map_coordinates(..., order=1, mode='reflect')` along one axis: reflect the continuous
/// coordinate half-sample-symmetrically into [-0.5, n - 0.5], then interpolate between
/// `floor` and `floor + 1` with out-of-range neighbours mirrored (which clamps them).
#[inline]
pub(crate) fn reflect_linear_coord(c: f64, n: usize) -> (usize, usize, f64) {
    let nf = n as f64;
    let mut t = (c + 0.5).rem_euclid(2.0 * nf);
    if t > nf {
        t = 2.0 * nf - t;
    }
    let c = t - 0.5;
    let f = c.floor();
    let i0 = border_index(f as isize, n, Border::Reflect);
    let i1 = border_index(f as isize + 1, n, Border::Reflect);
    (i0, i1, c - f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borders() {
        let r: Vec<usize> = (-3..7)
            .map(|i| border_index(i, 4, Border::Reflect))
            .collect();
        assert_eq!(r, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
        let r: Vec<usize> = (-3..7)
            .map(|i| border_index(i, 4, Border::Reflect101))
            .collect();
        assert_eq!(r, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
    }

    #[test]
    fn hsv_round_trip() {
        for &(r, g, b) in &[
            (0.1, 0.5, 0.9),
            (1.0, 0.0, 0.0),
            (0.3, 0.3, 0.3),
            (0.0, 0.0, 0.0),
        ] {
            let (h, s, v) = rgb2hsv(r, g, b);
            let (r2, g2, b2) = hsv2rgb(h, s, v);
            assert!((r - r2).abs() < 1e-12 && (g - g2).abs() < 1e-12 && (b - b2).abs() < 1e-12);
        }
    }

    #[test]
    fn pillow_box_downscale_averages() {
        // 4 -> 2 box: each output is the mean of two inputs (rounded).
        let img: Vec<u8> = vec![10, 20, 31, 40];
        let out = pillow_box_resize(&img, 1, 4, 1, 1, 2);
        assert_eq!(out, vec![15, 36]);
    }

    #[test]
    fn motion_blur_trails_like_imagemagick() {
        // One white pixel, angle 0: output(x) = sum_i k[i] img(x + i), so the trail runs to the
        // left with one-sided Gaussian weights exp(-i^2 / 2 sigma^2) over width 2*ceil(r)+1.
        let (w, h) = (20usize, 3usize);
        let mut img = vec![0u8; w * h];
        img[w + 15] = 255;
        let out = motion_blur_u8(&img, h, w, 1, 6.0, 2.0, 0.0);
        let k: Vec<f64> = (0..13).map(|i| (-(i * i) as f64 / 8.0).exp()).collect();
        let s: f64 = k.iter().sum();
        for i in 0..13usize {
            let want = (255.0 * k[i] / s + 0.5).floor() as u8;
            assert_eq!(out[w + 15 - i], want, "tap {i}");
        }
        assert_eq!(out[w + 16], 0);
        assert!(out[..w].iter().all(|&v| v == 0));
        // angle 90: the trail runs upwards (offsets (0, i))
        let mut img = vec![0u8; 20 * 20];
        img[15 * 20 + 5] = 255;
        let out = motion_blur_u8(&img, 20, 20, 1, 6.0, 2.0, 90.0);
        assert!(out[14 * 20 + 5] > 0 && out[16 * 20 + 5] == 0);
    }

    #[test]
    fn disk_kernel_sums_to_one() {
        let (k, n) = disk_kernel(1.5, 0.1);
        assert_eq!(n, 17);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn plasma_in_unit_range() {
        let mut s = 0.123f64;
        let m = plasma_fractal(32, 2.0, |a| {
            s = (s * 9301.0 + 49297.0) % 233280.0;
            (s / 233280.0 * 2.0 - 1.0) * a
        });
        assert_eq!(m.len(), 1024);
        assert!(m.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
