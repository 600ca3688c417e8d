//! Convolution on the CPU as im2col + GEMM, with a backward pass made of GEMMs too.
//!
//! candle's CPU `conv2d` is correct but its backward runs `conv_transpose2d` as direct loops and
//! goes through slow strided copies: on 2 cores tiny-cnn trained at ~60 images/s. Here a
//! convolution is `W[Cout, C·k·k] × cols[N, C·k·k, Ho·Wo]`, where `cols` comes from an
//! [`Im2Col`] custom op whose gradient is the matching col2im; candle's autograd then
//! differentiates the matmul (two GEMMs). On CUDA the native `conv2d` is used, or, in a build
//! with the `cudnn` feature, [`crate::cudnn_conv`] (unless `DEEPREPAIR_CUDNN=0`).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
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

    /// For each column row `r = (c·k + ky)·k + kx` and output position, the input offset (or
    /// None in the zero padding). Visits `(r, out_index, in_index)`.
    fn for_each(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (ho, wo) = self.out_hw();
        let k = self.kernel;
        for c in 0..self.channels {
            for ky in 0..k {
                for kx in 0..k {
                    let r = (c * k + ky) * k + kx;
                    for oy in 0..ho {
                        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                        if iy < 0 || iy >= self.height as isize {
                            continue;
                        }
                        for ox in 0..wo {
                            let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                            if ix < 0 || ix >= self.width as isize {
                                continue;
                            }
                            f(
                                r,
                                oy * wo + ox,
                                (c * self.height + iy as usize) * self.width + ix as usize,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("fast conv supports f32 only"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fast conv needs a contiguous input"),
    }
}

/// `[N, C, H, W]` → `[N·Ho·Wo, C·k·k]`: one row per output pixel, so the convolution is one
/// large GEMM with the `[C·k·k, Cout]` kernel (large GEMMs are what the CPU does well).
struct Im2Col(ConvGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(storage, layout)?;
        let n = layout.dims()[0];
        let (ho, wo) = g.out_hw();
        let rows = g.channels * g.kernel * g.kernel;
        let per_in = g.channels * g.height * g.width;
        let per_out = rows * ho * wo;
        let mut out = vec![0f32; n * per_out];
        out.par_chunks_mut(per_out)
            .zip(x.par_chunks(per_in))
            .for_each(|(o, xi)| {
                g.for_each(|r, p, i| o[p * rows + r] = xi[i]);
            });
        Ok((CpuStorage::F32(out), Shape::from((n * ho * wo, rows))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?,
        ))
    }
}

/// The adjoint of [`Im2Col`]: `[N·Ho·Wo, C·k·k]` → `[N, C, H, W]`, overlapping patches summed.
struct Col2Im(ConvGeometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = f32_slice(storage, layout)?;
        let (ho, wo) = g.out_hw();
        let rows = g.channels * g.kernel * g.kernel;
        let per_cols = rows * ho * wo;
        let n = layout.dims()[0] / (ho * wo);
        let per_img = g.channels * g.height * g.width;
        let mut out = vec![0f32; n * per_img];
        out.par_chunks_mut(per_img)
            .zip(cols.par_chunks(per_cols))
            .for_each(|(o, ci)| {
                g.for_each(|r, p, i| o[i] += ci[p * rows + r]);
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, g.channels, g.height, g.width)),
        ))
    }
}

/// `[N·P, C]` (pixel-major) ↔ `[N, C, P]` (channel-major), per image, in parallel; each the
/// other's gradient.
#[derive(Clone, Copy)]
struct Relayout {
    images: usize,
    pixels: usize,
    channels: usize,
    to_channels_first: bool,
}

impl CustomOp1 for Relayout {
    fn name(&self) -> &'static str {
        "relayout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(storage, layout)?;
        let (p, c) = (self.pixels, self.channels);
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(p * c)
            .zip(src.par_chunks(p * c))
            .for_each(|(o, s)| {
                for pi in 0..p {
                    for ci in 0..c {
                        if self.to_channels_first {
                            o[ci * p + pi] = s[pi * c + ci];
                        } else {
                            o[pi * c + ci] = s[ci * p + pi];
                        }
                    }
                }
            });
        let shape = if self.to_channels_first {
            Shape::from((self.images, c, p))
        } else {
            Shape::from((self.images * p, c))
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Relayout {
            to_channels_first: !self.to_channels_first,
            ..*self
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
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
    let (n, c, h, wd) = x.dims4()?;
    let (cout, cin, kh, kw) = w.dims4()?;
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
    let (ho, wo) = g.out_hw();
    let wt = w.reshape((cout, c * kh * kw))?.t()?;
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?;
    let out = cols.matmul(&wt)?; // [N·Ho·Wo, Cout]
    out.apply_op1(Relayout {
        images: n,
        pixels: ho * wo,
        channels: cout,
        to_channels_first: true,
    })?
    .reshape((n, cout, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        let dev = Device::Cpu;
        for &(c, cout, hw, k, stride, pad) in &[
            (3, 4, 7, 3, 1, 1),
            (4, 5, 8, 3, 2, 1),
            (3, 2, 6, 1, 1, 0),
            (2, 3, 9, 1, 2, 0),
            (2, 2, 5, 3, 1, 0),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, hw, hw), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1., (cout, c, k, k), &dev).unwrap()).unwrap();
            let ours = conv2d(&x, &w, pad, stride).unwrap();
            let theirs = x.conv2d(&w, pad, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let d = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "forward differs by {d}");
            // A loss that weights every output differently.
            let weights = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
            let g1 = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let a = g1.get(v).unwrap();
                let b = g2.get(v).unwrap();
                let d = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    d < 1e-3,
                    "gradient differs by {d} for case {:?}",
                    (c, cout, hw, k, stride, pad)
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
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        }
    }
}
