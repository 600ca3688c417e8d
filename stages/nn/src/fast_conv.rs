//! Convolution on the CPU as per-image GEMMs, forward and backward.
//!
//! candle's CPU `conv2d` is correct but its backward runs `conv_transpose2d` as direct loops and
//! goes through slow strided copies: on 2 cores tiny-cnn trained at ~60 images/s. Here one
//! custom op does the whole convolution, images in parallel, in one of two ways:
//! - **taps** (stride 1, at least [`TAP_MIN_CHANNELS`] input channels: every 3×3 layer of the
//!   models but their stems): the image is copied once, zero-padded, into a reused per-thread
//!   buffer, and each of the `k·k` kernel taps is one GEMM `W_tap[Cout, C] × padded planes
//!   shifted by the tap`, accumulated on a padded-width output grid whose spare columns are
//!   dropped. The input gradient is the same pass over `dy` with the flipped, transposed
//!   kernel; the weight gradient is one GEMM per tap against the same shifted views.
//! - **im2col** (strided and 1×1 convolutions, thin inputs): the columns `[C·k·k, Ho·Wo]` go
//!   into a reused per-thread buffer and one GEMM `W × cols` writes the NCHW output in place;
//!   the gradient is two more such ops (`Wᵀ × dy` then col2im; `Σ dy × colsᵀ`).
//!
//! Both recompute what they need in the backward pass rather than keeping a batch of columns:
//! an earlier version built the whole batch's columns as one tensor (9× the input for 3×3) and
//! spent as much time allocating and relayouting as in GEMM. On CUDA the native `conv2d` is
//! used, or, in a build with the `cudnn` feature, [`crate::cudnn_conv`] (unless
//! `DEEPREPAIR_CUDNN=0`).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.height + 2 * self.padding - self.kernel) / self.stride + 1,
            (self.width + 2 * self.padding - self.kernel) / self.stride + 1,
        )
    }
}

/// A CPU tensor's f32 data as one slice: what every fused CPU op here (and in
/// [`crate::fast_bn`]) reads; the callers make their inputs contiguous first.
pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("fused CPU ops take f32 tensors only"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused CPU ops need contiguous inputs"),
    }
}

/// An output buffer of `len` floats, not zeroed: every fused CPU op here (and in
/// [`crate::fast_bn`]) that takes one writes each element before anything reads it. Outputs
/// are mostly blocks the allocator hands out again, so a zeroing pass would be pure cost
/// (8 % of tiny-cnn's training step).
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; callers overwrite every element before reading (see above).
    #[allow(clippy::uninit_vec)]
    unsafe {
        buffer.set_len(len)
    };
    buffer
}

/// A row-major matrix operand: `rows × cols` stored row-major, or (`transposed`) the
/// transpose of a row-major `cols × rows` matrix.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    transposed: bool,
}

/// A matrix in a slice: element `(i, j)` at `i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Strided<'a> {
    fn from(operand: Operand<'a>, rows: usize, cols: usize) -> Self {
        let (row_stride, col_stride) = if operand.transposed {
            (1, rows)
        } else {
            (cols, 1)
        };
        Strided {
            data: operand.data,
            row_stride,
            col_stride,
        }
    }

    /// Whether every element of a `rows × cols` matrix lies inside the slice.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst[m×n] = a[m×k] · b[k×n]` (or `+=` with `accumulate`), on this thread: the callers
/// parallelize over images, whose GEMMs are each big enough for the AVX-512 microkernels.
fn gemm(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    accumulate: bool,
) {
    let (a, b) = (Strided::from(a, m, k), Strided::from(b, k, n));
    gemm_strided(dst, n, (m, n, k), a, b, accumulate)
}

/// [`gemm`] with any strides; `dst` is row-major with rows `dst_row_stride` apart.
fn gemm_strided(
    dst: &mut [f32],
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    accumulate: bool,
) {
    let dst_covered = m == 0 || n == 0 || (m - 1) * dst_row_stride + n <= dst.len();
    assert!(dst_covered && a.covers(m, k) && b.covers(k, n));
    // SAFETY: the assert above keeps every index the strides reach inside the slices, and
    // `dst` does not alias the operands (it is a distinct `&mut`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl ConvGeometry {
    fn rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    fn pixels_out(&self) -> usize {
        let (ho, wo) = self.out_hw();
        ho * wo
    }

    /// A 1×1, stride-1, unpadded convolution reads the image itself as its columns.
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// For column row `r = (c·k + ky)·k + kx` and output row `oy`: the input row, and the
    /// output columns `ox ∈ [lo, hi)` whose input column `ox·stride + kx − padding` is inside
    /// the image (the rest read zero padding).
    fn span(&self, ky: usize, kx: usize, oy: usize) -> Option<(usize, usize, usize)> {
        let (_, wo) = self.out_hw();
        let iy = (oy * self.stride + ky).checked_sub(self.padding)?;
        if iy >= self.height {
            return None;
        }
        // ox·s + kx − p ≥ 0  ⇔  ox ≥ ⌈(p − kx)/s⌉;   ox·s + kx − p < W  ⇔  ox < ⌈(W + p − kx)/s⌉.
        let lo = self.padding.saturating_sub(kx).div_ceil(self.stride);
        let hi = ((self.width + self.padding).saturating_sub(kx))
            .div_ceil(self.stride)
            .min(wo);
        Some((iy, lo, hi.max(lo)))
    }

    /// One image `[C, H, W]` → its columns `[C·k·k, Ho·Wo]`, zeros where the kernel reads
    /// padding (`cols` is a reused buffer: every element is written).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (ho, wo) = self.out_hw();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for c in 0..self.channels {
            let plane = &x[c * self.height * self.width..][..self.height * self.width];
            for ky in 0..k {
                for kx in 0..k {
                    let r = (c * k + ky) * k + kx;
                    let row = &mut cols[r * ho * wo..][..ho * wo];
                    for oy in 0..ho {
                        let out = &mut row[oy * wo..][..wo];
                        let Some((iy, lo, hi)) = self.span(ky, kx, oy) else {
                            out.fill(0.0);
                            continue;
                        };
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        let src = &plane[iy * self.width..][..self.width];
                        if s == 1 {
                            // Rows are short (8-32 here): a plain loop beats memcpy's call.
                            let start = lo + kx - p;
                            for (o, &v) in out[lo..hi].iter_mut().zip(&src[start..]) {
                                *o = v;
                            }
                        } else {
                            for (ox, o) in out.iter_mut().enumerate().take(hi).skip(lo) {
                                *o = src[ox * s + kx - p];
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col`]: columns `[C·k·k, Ho·Wo]` summed into an image
    /// `[C, H, W]` (which the caller zeroes).
    fn col2im_add(&self, cols: &[f32], x: &mut [f32]) {
        let (ho, wo) = self.out_hw();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for c in 0..self.channels {
            let plane = &mut x[c * self.height * self.width..][..self.height * self.width];
            for ky in 0..k {
                for kx in 0..k {
                    let r = (c * k + ky) * k + kx;
                    let row = &cols[r * ho * wo..][..ho * wo];
                    for oy in 0..ho {
                        let Some((iy, lo, hi)) = self.span(ky, kx, oy) else {
                            continue;
                        };
                        let src = &row[oy * wo..][..wo];
                        let dst = &mut plane[iy * self.width..][..self.width];
                        if s == 1 {
                            let start = lo + kx - p;
                            for (d, &v) in dst[start..].iter_mut().zip(&src[lo..hi]) {
                                *d += v;
                            }
                        } else {
                            for ox in lo..hi {
                                dst[ox * s + kx - p] += src[ox];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Stride-1 convolutions reading at least this many channels run as shifted GEMMs (each
/// tap's GEMM is that deep; the 3-channel stem keeps im2col).
const TAP_MIN_CHANNELS: usize = 8;

/// Stride-1 convolutions as `k·k` shifted GEMMs ("taps") over a zero-padded copy of the
/// image, with no columns: on the padded-width grid (`Ho` rows of `Wp = W + 2p` outputs, the
/// last `k − 1` of each spare) tap `(ky, kx)` reads the padded planes shifted by
/// `ky·Wp + kx`, a plain strided matrix. im2col wrote and read back `k·k` copies of the
/// image per pass (and col2im scattered them back), which cost as much as the GEMMs' packing.
impl ConvGeometry {
    fn uses_taps(&self) -> bool {
        self.stride == 1 && self.kernel > 1 && self.channels >= TAP_MIN_CHANNELS
    }

    fn padded_hw(&self) -> (usize, usize) {
        (
            self.height + 2 * self.padding,
            self.width + 2 * self.padding,
        )
    }

    /// Floats of a padded image: its planes, then `k − 1` zeros that the last output row's
    /// spare columns read past the last plane.
    fn padded_len(&self) -> usize {
        let (hp, wp) = self.padded_hw();
        self.channels * hp * wp + self.kernel - 1
    }

    /// Outputs per channel on the padded-width grid.
    fn wide_pixels(&self) -> usize {
        self.out_hw().0 * self.padded_hw().1
    }

    /// One image `[C, H, W]` → `padded` (every element written).
    fn pad_into(&self, x: &[f32], padded: &mut [f32]) {
        let (hp, wp) = self.padded_hw();
        let (h, w, p) = (self.height, self.width, self.padding);
        let (planes, tail) = padded.split_at_mut(self.channels * hp * wp);
        for (dst, src) in planes.chunks_exact_mut(hp * wp).zip(x.chunks_exact(h * w)) {
            dst[..p * wp].fill(0.0);
            dst[(p + h) * wp..].fill(0.0);
            for (row, src) in dst[p * wp..].chunks_exact_mut(wp).zip(src.chunks_exact(w)) {
                row[..p].fill(0.0);
                row[p + w..].fill(0.0);
                // Rows are short (8-32 here): a plain loop beats memcpy's call.
                for (d, &v) in row[p..p + w].iter_mut().zip(src) {
                    *d = v;
                }
            }
        }
        tail.fill(0.0);
    }

    /// The padded planes shifted to tap `(ky, kx)`, as a `C × (Ho·Wp)` matrix.
    fn tap_view<'a>(&self, padded: &'a [f32], ky: usize, kx: usize) -> Strided<'a> {
        let (hp, wp) = self.padded_hw();
        Strided {
            data: &padded[ky * wp + kx..],
            row_stride: hp * wp,
            col_stride: 1,
        }
    }

    /// `wide[Cout, Ho·Wp] = Σ_taps taps[t] · shifted_t`, with `taps` tap-major
    /// `[k·k, Cout, C]` (see [`tap_major`]).
    fn taps_forward(&self, taps: &[f32], cout: usize, padded: &[f32], wide: &mut [f32]) {
        let (k, c, pixels) = (self.kernel, self.channels, self.wide_pixels());
        for ky in 0..k {
            for kx in 0..k {
                let t = ky * k + kx;
                let weights = Strided {
                    data: &taps[t * cout * c..][..cout * c],
                    row_stride: c,
                    col_stride: 1,
                };
                let shifted = self.tap_view(padded, ky, kx);
                gemm_strided(wide, pixels, (cout, pixels, c), weights, shifted, t > 0);
            }
        }
    }

    /// `acc[t] (+)= dy_wide[Cout, Ho·Wp] × shifted_tᵀ` for every tap: the weight gradient of
    /// one image, tap-major `[k·k, Cout, C]`. `dy_wide` is zero in the spare columns.
    fn taps_weight_grad(
        &self,
        dy_wide: &[f32],
        cout: usize,
        padded: &[f32],
        acc: &mut [f32],
        accumulate: bool,
    ) {
        let (k, c, pixels) = (self.kernel, self.channels, self.wide_pixels());
        let dy = Strided {
            data: dy_wide,
            row_stride: pixels,
            col_stride: 1,
        };
        for ky in 0..k {
            for kx in 0..k {
                let t = ky * k + kx;
                let view = self.tap_view(padded, ky, kx);
                let shifted_t = Strided {
                    data: view.data,
                    row_stride: view.col_stride,
                    col_stride: view.row_stride,
                };
                let acc_t = &mut acc[t * cout * c..][..cout * c];
                gemm_strided(acc_t, c, (cout, c, pixels), dy, shifted_t, accumulate);
            }
        }
    }

    /// The wide grid `[C', Ho·Wp]` → `[C', Ho, Wo]` (the spare columns dropped).
    fn narrow_wide(&self, wide: &[f32], out: &mut [f32]) {
        let (wp, wo) = (self.padded_hw().1, self.out_hw().1);
        for (dst, src) in out.chunks_exact_mut(wo).zip(wide.chunks_exact(wp)) {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v;
            }
        }
    }

    /// `[C', Ho, Wo]` → the wide grid `[C', Ho·Wp]`, zeros in the spare columns.
    fn widen(&self, out: &[f32], wide: &mut [f32]) {
        let (wp, wo) = (self.padded_hw().1, self.out_hw().1);
        for (dst, src) in wide.chunks_exact_mut(wp).zip(out.chunks_exact(wo)) {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v;
            }
            dst[wo..].fill(0.0);
        }
    }

    /// The geometry whose tap forward pass is this convolution's input gradient: `dy`
    /// (`Cout` channels) padded by `k − 1 − p` and correlated with the flipped, transposed
    /// kernel gives `[C, H, W]`. `None` when that does not apply (stride > 1, p ≥ k).
    fn input_grad_taps(&self, cout: usize) -> Option<ConvGeometry> {
        let (ho, wo) = self.out_hw();
        let padding = (self.kernel - 1).checked_sub(self.padding)?;
        let g = ConvGeometry {
            channels: cout,
            height: ho,
            width: wo,
            kernel: self.kernel,
            stride: 1,
            padding,
        };
        (self.stride == 1 && g.uses_taps()).then_some(g)
    }
}

/// `w[Cout, C, k, k]` → `[k·k, Cout, C]`.
fn tap_major(w: &[f32], cout: usize, c: usize, taps: usize) -> Vec<f32> {
    let mut out = output_buffer(w.len());
    for (t, block) in out.chunks_exact_mut(cout * c).enumerate() {
        for (i, o) in block.iter_mut().enumerate() {
            *o = w[i * taps + t];
        }
    }
    out
}

/// `w[Cout, C, k, k]` → `[k·k, C, Cout]` with the taps reversed: the kernel of the
/// transposed convolution, tap-major.
fn flipped_tap_major(w: &[f32], cout: usize, c: usize, taps: usize) -> Vec<f32> {
    let mut out = output_buffer(w.len());
    for (t, block) in out.chunks_exact_mut(c * cout).enumerate() {
        for (ci, row) in block.chunks_exact_mut(cout).enumerate() {
            for (co, o) in row.iter_mut().enumerate() {
                *o = w[(co * c + ci) * taps + taps - 1 - t];
            }
        }
    }
    out
}

thread_local! {
    /// Each rayon thread's scratch buffers (columns; or a padded image and a wide output),
    /// reused across images, layers and steps.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with this thread's two scratch buffers sized to `first` and `second` floats.
fn with_scratch<R>(first: usize, second: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buffers = cell.borrow_mut();
        let [a, b] = &mut *buffers;
        for (buffer, len) in [(&mut *a, first), (&mut *b, second)] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        f(&mut a[..first], &mut b[..second])
    })
}

/// Runs `f` with this thread's column buffer sized to `len`.
fn with_columns<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch(len, 0, |cols, _| f(cols))
}

/// Images per partial weight gradient. Fixed, not per thread, so the sum's order (and the
/// trained weights' bytes) do not depend on the machine's core count.
const WEIGHT_GRAD_IMAGES: usize = 8;

/// `y[N, Cout, Ho, Wo] = conv(x[N, C, H, W], w[Cout, C, k, k])`: per image, im2col into a
/// reused buffer and one GEMM `W[Cout, C·k·k] × cols[C·k·k, Ho·Wo]` straight into the NCHW
/// output. Nothing of the batch's size is allocated besides the output; the backward pass
/// recomputes the columns instead of keeping them. (Putting several small images' columns
/// side by side into one wider GEMM measured no faster: gemm packs both operands anyway.)
struct Conv(ConvGeometry);

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let n = xl.dims()[0];
        let cout = wl.dims()[0];
        let (ho, wo) = g.out_hw();
        let (rows, pixels) = (g.rows(), g.pixels_out());
        let per_in = g.channels * g.height * g.width;
        let mut y = output_buffer(n * cout * pixels);
        let taps = g
            .uses_taps()
            .then(|| tap_major(w, cout, g.channels, g.kernel * g.kernel));
        let weights = Operand {
            data: w,
            transposed: false,
        };
        y.par_chunks_mut(cout * pixels)
            .zip(x.par_chunks(per_in))
            .for_each(|(yi, xi)| {
                let dims = (cout, pixels, rows);
                if let Some(taps) = &taps {
                    with_scratch(g.padded_len(), cout * g.wide_pixels(), |padded, wide| {
                        g.pad_into(xi, padded);
                        g.taps_forward(taps, cout, padded, wide);
                        g.narrow_wide(wide, yi);
                    })
                } else if g.is_pointwise() {
                    let cols = Operand {
                        data: xi,
                        transposed: false,
                    };
                    gemm(yi, dims, weights, cols, false);
                } else {
                    with_columns(rows * pixels, |cols| {
                        g.im2col(xi, cols);
                        let cols = Operand {
                            data: cols,
                            transposed: false,
                        };
                        gemm(yi, dims, weights, cols, false);
                    });
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, cout, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // The first layer's input is data: no gradient is wanted for it.
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &ConvInputGrad(self.0))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&dy, &ConvWeightGrad(self.0))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `dx[N, C, H, W]` from `dy[N, Cout, Ho, Wo]` and `w`: per image, `Wᵀ × dy` then col2im.
struct ConvInputGrad(ConvGeometry);

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (dy, w) = (f32_slice(dys, dyl)?, f32_slice(ws, wl)?);
        let n = dyl.dims()[0];
        let cout = wl.dims()[0];
        let (rows, pixels) = (g.rows(), g.pixels_out());
        let per_in = g.channels * g.height * g.width;
        let mut dx = output_buffer(n * per_in);
        let shape = Shape::from((n, g.channels, g.height, g.width));
        let taps = g.input_grad_taps(cout).map(|gt| {
            let taps = flipped_tap_major(w, cout, g.channels, g.kernel * g.kernel);
            (gt, taps)
        });
        let weights_t = Operand {
            data: w,
            transposed: true,
        };
        dx.par_chunks_mut(per_in)
            .zip(dy.par_chunks(cout * pixels))
            .for_each(|(dxi, dyi)| {
                if let Some((gt, taps)) = &taps {
                    let wide_len = g.channels * gt.wide_pixels();
                    with_scratch(gt.padded_len(), wide_len, |padded, wide| {
                        gt.pad_into(dyi, padded);
                        gt.taps_forward(taps, g.channels, padded, wide);
                        gt.narrow_wide(wide, dxi);
                    });
                    return;
                }
                let dims = (rows, pixels, cout);
                let dyi = Operand {
                    data: dyi,
                    transposed: false,
                };
                if g.is_pointwise() {
                    gemm(dxi, dims, weights_t, dyi, false);
                } else {
                    with_columns(rows * pixels, |cols| {
                        gemm(cols, dims, weights_t, dyi, false);
                        // Written before col2im reads it: fresh zeroed pages that are read
                        // first are copy-on-write, and their first write then costs a fault
                        // and a TLB shootdown on every core (8 % of AllConvNet's step).
                        dxi.fill(0.0);
                        g.col2im_add(cols, dxi);
                    });
                }
            });
        Ok((CpuStorage::F32(dx), shape))
    }
}

/// `dw[Cout, C, k, k] = Σ_images dy_i[Cout, Ho·Wo] × cols_iᵀ`, summed in fixed groups of
/// images and then in order (deterministic for any thread count).
struct ConvWeightGrad(ConvGeometry);

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, dy) = (f32_slice(xs, xl)?, f32_slice(dys, dyl)?);
        let n = xl.dims()[0];
        let cout = dyl.dims()[1];
        let (rows, pixels) = (g.rows(), g.pixels_out());
        let per_in = g.channels * g.height * g.width;
        let groups = n.div_ceil(WEIGHT_GRAD_IMAGES);
        let mut partial = output_buffer(groups * cout * rows);
        let shape = Shape::from((cout, g.channels, g.kernel, g.kernel));
        partial
            .par_chunks_mut(cout * rows)
            .enumerate()
            .for_each(|(group, acc)| {
                let images = group * WEIGHT_GRAD_IMAGES..((group + 1) * WEIGHT_GRAD_IMAGES).min(n);
                for (j, i) in images.enumerate() {
                    let xi = &x[i * per_in..][..per_in];
                    let dyi = &dy[i * cout * pixels..][..cout * pixels];
                    if g.uses_taps() {
                        let wide_len = cout * g.wide_pixels();
                        with_scratch(g.padded_len(), wide_len, |padded, dy_wide| {
                            g.pad_into(xi, padded);
                            g.widen(dyi, dy_wide);
                            g.taps_weight_grad(dy_wide, cout, padded, acc, j > 0);
                        });
                        continue;
                    }
                    let dyi = Operand {
                        data: dyi,
                        transposed: false,
                    };
                    let dims = (cout, rows, pixels);
                    if g.is_pointwise() {
                        let cols_t = Operand {
                            data: xi,
                            transposed: true,
                        };
                        gemm(acc, dims, dyi, cols_t, j > 0);
                    } else {
                        with_columns(rows * pixels, |cols| {
                            g.im2col(xi, cols);
                            let cols_t = Operand {
                                data: cols,
                                transposed: true,
                            };
                            gemm(acc, dims, dyi, cols_t, j > 0);
                        });
                    }
                }
            });
        let summed = sum_in_order(&partial, cout * rows);
        if !g.uses_taps() {
            return Ok((CpuStorage::F32(summed), shape));
        }
        // Tap-major [k·k, Cout, C] → [Cout, C, k, k].
        let taps = g.kernel * g.kernel;
        let mut dw = output_buffer(summed.len());
        for (t, block) in summed.chunks_exact(cout * g.channels).enumerate() {
            for (i, &v) in block.iter().enumerate() {
                dw[i * taps + t] = v;
            }
        }
        Ok((CpuStorage::F32(dw), shape))
    }
}

/// The partial sums `[groups, len]` added in order (the same bytes on any thread count).
fn sum_in_order(partial: &[f32], len: usize) -> Vec<f32> {
    let mut sum = partial[..len].to_vec();
    for part in partial.chunks(len).skip(1) {
        for (d, p) in sum.iter_mut().zip(part) {
            *d += p;
        }
    }
    sum
}

/// `conv2d(x, w)` without bias, groups 1, dilation 1; `x: [N, C, H, W]`, `w: [Cout, C, k, k]`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        #[cfg(feature = "cudnn")]
        if x.device().is_cuda()
            && x.dtype() == candle_core::DType::F32
            && crate::cudnn_conv::enabled()
        {
            return crate::cudnn_conv::conv2d(x, w, padding, stride);
        }
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (_, c, h, wd) = x.dims4()?;
    let (_, cin, kh, kw) = w.dims4()?;
    if cin != c || kh != kw {
        candle_core::bail!("conv2d: input has {c} channels, kernel {:?}", w.dims());
    }
    let g = ConvGeometry {
        channels: c,
        height: h,
        width: wd,
        kernel: kh,
        stride,
        padding,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// (images, channels, out channels, height, width, kernel, stride, padding)
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    fn check_against_candle(case: Case) {
        let (n, c, cout, h, wd, k, stride, pad) = case;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, wd), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (cout, c, k, k), &dev).unwrap()).unwrap();
        let ours = conv2d(&x, &w, pad, stride).unwrap();
        let theirs = x.conv2d(&w, pad, stride, 1, 1).unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "case {case:?}");
        let d = max_abs_diff(&ours, &theirs);
        assert!(d < 1e-4, "forward differs by {d} for case {case:?}");
        // A loss that weights every output differently.
        let weights = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
        let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let g1 = loss(ours).backward().unwrap();
        let g2 = loss(theirs).backward().unwrap();
        for (name, v) in [("input", &x), ("weight", &w)] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{name} gradient differs by {d} (scale {scale}) for case {case:?}"
            );
        }
    }

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        for case in [
            (2, 3, 4, 7, 7, 3, 1, 1),
            (2, 4, 5, 8, 8, 3, 2, 1),
            (2, 3, 2, 6, 6, 1, 1, 0),
            (2, 2, 3, 9, 9, 1, 2, 0),
            (2, 2, 2, 5, 5, 3, 1, 0),
            // More images than one weight-gradient group, a ragged last group.
            (19, 3, 4, 6, 5, 3, 1, 1),
            (2, 3, 4, 24, 24, 1, 1, 0),
            (5, 2, 2, 24, 24, 3, 2, 1),
            // Shifted GEMMs (stride 1, ≥ TAP_MIN_CHANNELS): forward, both gradients by taps.
            (3, 9, 10, 7, 6, 3, 1, 1),
            (10, 12, 8, 6, 6, 5, 1, 2),
            (2, 8, 12, 5, 5, 3, 1, 0),
            (2, 10, 9, 5, 5, 3, 1, 2),
            // Taps forward, but too few output channels for the input gradient's taps.
            (2, 9, 3, 6, 6, 3, 1, 1),
            // Padding ≥ k: the input gradient cannot be a padded correlation.
            (2, 8, 8, 4, 4, 3, 1, 3),
        ] {
            check_against_candle(case);
        }
    }

    /// The convolution and its two gradients as plain loops: the reference for shapes where
    /// candle 0.11's own backward fails (stride > 1 with `(H + 2p − k) % stride ≠ 0`, where
    /// its transposed convolution comes out one row short).
    fn loops_reference(case: Case, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
        let (n, c, cout, h, wd, k, s, p) = case;
        let g = ConvGeometry {
            channels: c,
            height: h,
            width: wd,
            kernel: k,
            stride: s,
            padding: p,
        };
        let (ho, wo) = g.out_hw();
        let (mut y, mut dx, mut dw) = (
            vec![0f32; n * cout * ho * wo],
            vec![0f32; x.len()],
            vec![0f32; w.len()],
        );
        for (i, o, ci, ky, kx, oy, ox) in conv_index_space(n, cout, c, k, ho, wo) {
            let (iy, ix) = (
                (oy * s + ky) as isize - p as isize,
                (ox * s + kx) as isize - p as isize,
            );
            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                continue;
            }
            let xi = ((i * c + ci) * h + iy as usize) * wd + ix as usize;
            let wi = ((o * c + ci) * k + ky) * k + kx;
            let yi = ((i * cout + o) * ho + oy) * wo + ox;
            y[yi] += x[xi] * w[wi];
            dx[xi] += w[wi] * dy[yi];
            dw[wi] += x[xi] * dy[yi];
        }
        [y, dx, dw]
    }

    fn conv_index_space(
        n: usize,
        cout: usize,
        c: usize,
        k: usize,
        ho: usize,
        wo: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize, usize, usize, usize)> {
        (0..n).flat_map(move |i| {
            (0..cout).flat_map(move |o| {
                (0..c).flat_map(move |ci| {
                    (0..k).flat_map(move |ky| {
                        (0..k).flat_map(move |kx| {
                            (0..ho).flat_map(move |oy| {
                                (0..wo).map(move |ox| (i, o, ci, ky, kx, oy, ox))
                            })
                        })
                    })
                })
            })
        })
    }

    #[test]
    fn forward_and_gradients_match_candle_or_plain_loops_on_random_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let dev = Device::Cpu;
        for _ in 0..40 {
            let k: usize = [1, 3, 5][rng.random_range(0..3)];
            let pad = rng.random_range(0..=k / 2 + 1);
            let case = (
                rng.random_range(1..=18),
                // Both sides of TAP_MIN_CHANNELS, for the input and the output.
                rng.random_range(1..=12),
                rng.random_range(1..=12),
                rng.random_range(k.saturating_sub(2 * pad).max(1)..=11),
                rng.random_range(k.saturating_sub(2 * pad).max(1)..=11),
                k,
                rng.random_range(1..=3),
                pad,
            );
            let (n, c, cout, h, wd, k, stride, pad) = case;
            if (h + 2 * pad - k) % stride == 0 && (wd + 2 * pad - k) % stride == 0 {
                check_against_candle(case);
            }
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, wd), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1., (cout, c, k, k), &dev).unwrap()).unwrap();
            let y = conv2d(&x, &w, pad, stride).unwrap();
            let dy = Tensor::randn(0f32, 1., y.dims(), &dev).unwrap();
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = loops_reference(case, &flat(&x), &flat(&w), &flat(&dy));
            let got = [
                flat(&y),
                flat(grads.get(&x).unwrap()),
                flat(grads.get(&w).unwrap()),
            ];
            for ((name, got), want) in ["output", "input gradient", "weight gradient"]
                .iter()
                .zip(&got)
                .zip(&want)
            {
                let d = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-3, "{name} differs by {d} for case {case:?}");
            }
        }
    }

    #[test]
    fn the_layer_with_a_bias_matches_candle_nn_conv2d_with_its_gradients() {
        use candle_core::Module;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4, 6, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 4, 3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev).unwrap()).unwrap();
        let config = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let ours = Conv2d::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), config);
        let theirs =
            candle_nn::Conv2d::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), config);
        let (ya, yb) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
        assert!(max_abs_diff(&ya, &yb) < 1e-4);
        let weights = Tensor::randn(0f32, 1., ya.dims(), &dev).unwrap();
        let ga = (ya * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (yb * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
            let d = max_abs_diff(ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(d < 1e-3, "{name} gradient differs by {d}");
        }
    }

    #[test]
    fn the_weight_gradient_does_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        // Thin input: im2col; wide input: taps.
        for channels in [4, TAP_MIN_CHANNELS + 1] {
            let x = Tensor::randn(0f32, 1., (37, channels, 9, 9), &dev).unwrap();
            let dy = Tensor::randn(0f32, 1., (37, 6, 9, 9), &dev).unwrap();
            let g = ConvGeometry {
                channels,
                height: 9,
                width: 9,
                kernel: 3,
                stride: 1,
                padding: 1,
            };
            assert_eq!(g.uses_taps(), channels >= TAP_MIN_CHANNELS);
            let grad_on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| x.apply_op2_no_bwd(&dy, &ConvWeightGrad(g)).unwrap())
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let one = grad_on(1);
            for threads in [2, 3, 5] {
                assert_eq!(
                    one,
                    grad_on(threads),
                    "{threads} threads, {channels} channels"
                );
            }
        }
    }
}

/// A drop-in for `candle_nn::Conv2d` (same constructor and `Module`), using [`conv2d`] (our
/// CPU kernels, cuDNN on CUDA where built in, candle's kernels otherwise). Groups and dilation
/// other than 1 fall back to candle.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: candle_nn::Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: candle_nn::Conv2dConfig) -> Self {
        Conv2d {
            weight,
            bias,
            config,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let y = if c.groups == 1 && c.dilation == 1 {
            conv2d(x, &self.weight, c.padding, c.stride)?
        } else {
            x.conv2d(&self.weight, c.padding, c.stride, c.dilation, c.groups)?
        };
        match &self.bias {
            None => Ok(y),
            Some(b) if y.device().is_cpu() && y.dtype() == candle_core::DType::F32 => {
                y.apply_op2(&b.contiguous()?, AddChannelBias)
            }
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        }
    }
}

/// `y[n, c, …] + b[c]`; its bias gradient is a per-channel sum done in parallel over channels
/// (candle's `broadcast_add` backward sums on one thread with strided reads: 9 % of
/// AllConvNet's step).
struct AddChannelBias;

impl CustomOp2 for AddChannelBias {
    fn name(&self) -> &'static str {
        "add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, b) = (f32_slice(ys, yl)?, f32_slice(bs, bl)?);
        let c = b.len();
        let plane: usize = yl.dims()[2..].iter().product();
        let mut out = output_buffer(y.len());
        out.par_chunks_mut(plane)
            .zip(y.par_chunks(plane))
            .enumerate()
            .for_each(|(k, (o, yi))| {
                let bias = b[k % c];
                for (o, &v) in o.iter_mut().zip(yi) {
                    *o = v + bias;
                }
            });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let db = if b.track_op() {
            Some(grad.apply_op1_no_bwd(&ChannelSums)?)
        } else {
            None
        };
        Ok((Some(grad), db))
    }
}

/// `[N, C, …]` → `[C]`: each channel's sum, in f64, images in order.
struct ChannelSums;

impl candle_core::CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (n, c) = (l.dims()[0], l.dims()[1]);
        let plane: usize = l.dims()[2..].iter().product();
        let sums: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..n)
                    .map(|i| {
                        let start = (i * c + ch) * plane;
                        x[start..start + plane]
                            .iter()
                            .map(|&v| v as f64)
                            .sum::<f64>()
                    })
                    .sum::<f64>() as f32
            })
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}
