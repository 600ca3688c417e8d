//! BatchNorm (training mode) and ReLU as fused CPU ops with hand-written backward passes.
//!
//! candle composes training-mode BatchNorm from a dozen broadcast ops and differentiates each:
//! on 2 cores a `[128, 32, 32, 32]` forward+backward took ~600 ms, more than the convolution.
//! Here the forward is two passes per channel and the backward the textbook three sums
//! (`dβ = Σdy`, `dγ = Σdy·x̂`, `dx = γ/σ·(dy − dβ/M − x̂·dγ/M)`). Semantics are PyTorch's:
//! biased variance to normalize, unbiased variance into the running average, `momentum` 0.1.
//! Eval mode and non-CPU devices use candle's own layers, except CUDA f32 with the `cudnn`
//! feature, which goes through cuDNN (`crate::cudnn_bn`, both modes); inside a
//! [`crate::sync_bn::scope`] training mode uses the data-parallel group's statistics instead
//! (any device, never cuDNN).

use crate::sync_bn::BatchStatsReducer;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use candle_nn::{BatchNormConfig, VarBuilder};
use rayon::prelude::*;
use std::sync::Arc;

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("fast batch-norm supports f32 only"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fast batch-norm needs contiguous tensors"),
    }
}

/// Per-channel mean and biased variance of an `[N, C, P]` buffer.
fn channel_stats(x: &[f32], n: usize, c: usize, p: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut sum = 0f64;
            for i in 0..n {
                sum += x[(i * c + ch) * p..(i * c + ch + 1) * p]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
            let mean = sum / (n * p) as f64;
            let mut sq = 0f64;
            for i in 0..n {
                sq += x[(i * c + ch) * p..(i * c + ch + 1) * p]
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>();
            }
            (mean, sq / (n * p) as f64)
        })
        .collect()
}

fn dims_ncp(layout: &Layout) -> (usize, usize, usize) {
    let d = layout.dims();
    (d[0], d[1], d[2..].iter().product())
}

/// y = γ·(x − μ)/σ + β with batch statistics. Args: x `[N, C, …]`, γ `[C]`, β `[C]`.
struct BatchNormTrain {
    eps: f64,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (slice(xs, xl)?, slice(gs, gl)?, slice(bs, bl)?);
        let (n, c, p) = dims_ncp(xl);
        let stats = channel_stats(x, n, c, p);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(p)
            .zip(x.par_chunks(p))
            .enumerate()
            .for_each(|(k, (yo, xi))| {
                let ch = k % c;
                let (mean, var) = stats[ch];
                let scale = gamma[ch] as f64 / (var + self.eps).sqrt();
                let shift = beta[ch] as f64 - mean * scale;
                for (o, &v) in yo.iter_mut().zip(xi) {
                    *o = (v as f64 * scale + shift) as f32;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let len = x.elem_count();
        let packed = x.apply_op3_no_bwd(
            gamma,
            &grad.contiguous()?,
            &BatchNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, len, c)?;
        let dbeta = packed.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Args: x, γ, dy → `[dx…, dγ…, dβ…]` flattened.
struct BatchNormBackward {
    eps: f64,
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, dy) = (slice(xs, xl)?, slice(gs, gl)?, slice(ds, dl)?);
        let (n, c, p) = dims_ncp(xl);
        let m = (n * p) as f64;
        let stats = channel_stats(x, n, c, p);
        // Per channel: Σdy and Σdy·x̂.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, var) = stats[ch];
                let inv = 1.0 / (var + self.eps).sqrt();
                let (mut sd, mut sdx) = (0f64, 0f64);
                for i in 0..n {
                    let r = (i * c + ch) * p..(i * c + ch + 1) * p;
                    for (&g, &v) in dy[r.clone()].iter().zip(&x[r]) {
                        sd += g as f64;
                        sdx += g as f64 * (v as f64 - mean) * inv;
                    }
                }
                (sd, sdx)
            })
            .collect();
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, tail) = out.split_at_mut(x.len());
        dx.par_chunks_mut(p).enumerate().for_each(|(k, dxo)| {
            let ch = k % c;
            let (mean, var) = stats[ch];
            let inv = 1.0 / (var + self.eps).sqrt();
            let (sd, sdx) = sums[ch];
            let g = gamma[ch] as f64 * inv;
            let base = k * p;
            for (j, o) in dxo.iter_mut().enumerate() {
                let xhat = (x[base + j] as f64 - mean) * inv;
                *o = (g * (dy[base + j] as f64 - sd / m - xhat * sdx / m)) as f32;
            }
        });
        for ch in 0..c {
            tail[ch] = sums[ch].1 as f32;
            tail[c + ch] = sums[ch].0 as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// Per-channel (mean, unbiased variance) as a `[2, C]` tensor, without gradient.
struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, p) = dims_ncp(l);
        let stats = channel_stats(slice(s, l)?, n, c, p);
        let m = (n * p) as f64;
        let mut out: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
        out.extend(stats.iter().map(|s| (s.1 * m / (m - 1.0).max(1.0)) as f32));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// PyTorch's `BatchNorm2d` with the state_dict names `weight`, `bias`, `running_mean`,
/// `running_var`; the fused ops in training mode on the CPU.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    inner: candle_nn::BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    eps: f64,
    momentum: f64,
}

pub fn batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    let cfg: BatchNormConfig = config.into();
    let running_mean =
        vb.get_with_hints(num_features, "running_mean", candle_nn::Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", candle_nn::Init::Const(1.))?;
    let weight = vb.get_with_hints(num_features, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(num_features, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::BatchNorm::new_with_momentum(
        num_features,
        running_mean.clone(),
        running_var.clone(),
        weight.clone(),
        bias.clone(),
        cfg.eps,
        cfg.momentum,
    )?;
    Ok(BatchNorm {
        inner,
        weight,
        bias,
        // Tensors a VarMap hands out are variables: these `Var`s share their storage, so the
        // running averages set here are what the VarMap saves.
        running_mean: candle_core::Var::from_tensor(&running_mean)?,
        running_var: candle_core::Var::from_tensor(&running_var)?,
        eps: cfg.eps,
        momentum: cfg.momentum,
    })
}

impl BatchNorm {
    fn check_features(&self, x: &Tensor) -> Result<()> {
        if x.rank() < 2 || x.dim(1)? != self.weight.dim(0)? {
            candle_core::bail!(
                "batch-norm over {} features got input {:?}",
                self.weight.dim(0)?,
                x.shape()
            );
        }
        Ok(())
    }

    /// `running = (1 − momentum)·running + momentum·batch` (`var`: the unbiased one).
    fn update_running(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        let m = self.momentum;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
        self.running_var
            .set(&((self.running_var.as_tensor() * (1.0 - m))? + (var * m)?)?)
    }

    /// Training mode with the statistics of the whole data-parallel batch (any device).
    fn forward_synced(&self, x: &Tensor, reducer: &Arc<dyn BatchStatsReducer>) -> Result<Tensor> {
        self.check_features(x)?;
        let (centred, mean, var, count) =
            crate::sync_bn::global_moments(&x.contiguous()?, reducer)?;
        let c = self.weight.dim(0)?;
        let per_channel: Vec<usize> = (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
        let scale = self.weight.div(&(&var + self.eps)?.sqrt()?)?;
        let y = centred
            .broadcast_mul(&scale.reshape(per_channel.as_slice())?)?
            .broadcast_add(&self.bias.reshape(per_channel.as_slice())?)?;
        let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?;
        self.update_running(&mean.detach(), &unbiased)?;
        Ok(y)
    }
}

impl candle_core::ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            if let Some(reducer) = crate::sync_bn::active() {
                return self.forward_synced(x, &reducer);
            }
        }
        #[cfg(feature = "cudnn")]
        if crate::cudnn_bn::applies(
            x,
            [
                &self.weight,
                &self.bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
            ],
            self.eps,
            train,
        ) {
            self.check_features(x)?;
            let (mean, var) = (self.running_mean.as_tensor(), self.running_var.as_tensor());
            return if train {
                crate::cudnn_bn::batch_norm_train(
                    x,
                    &self.weight,
                    &self.bias,
                    mean,
                    var,
                    self.eps,
                    self.momentum,
                )
            } else {
                crate::cudnn_bn::batch_norm_eval(x, &self.weight, &self.bias, mean, var, self.eps)
            };
        }
        if !(train && x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2) {
            return self.inner.forward_t(x, train);
        }
        self.check_features(x)?;
        let x = x.contiguous()?;
        let stats = x.detach().apply_op1_no_bwd(&Stats)?;
        self.update_running(&stats.get(0)?, &stats.get(1)?)?;
        x.apply_op3(&self.weight, &self.bias, BatchNormTrain { eps: self.eps })
    }
}

/// `max(x, 0)` with a backward that masks by the output (candle's composes comparisons and
/// casts).
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let y: Vec<f32> = x
            .par_iter()
            .with_min_len(4096)
            .map(|&v| v.max(0.0))
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &ReluMask)?))
    }
}

struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, r) = (slice(gs, gl)?, slice(rs, rl)?);
        let out: Vec<f32> = g
            .par_iter()
            .with_min_len(4096)
            .zip(r.par_iter())
            .map(|(&g, &r)| if r > 0.0 { g } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// ReLU: the fused op on the CPU, candle's elsewhere.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, ModuleT, Var};
    use candle_nn::VarMap;

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Sets a 3-feature BatchNorm's γ and β to non-trivial values.
    pub(crate) fn set_affine(vm: &VarMap) {
        let data = vm.data().lock().unwrap();
        let dev = data["weight"].device().clone();
        data["weight"]
            .set(&Tensor::new(&[0.5f32, 1.5, -1.0], &dev).unwrap())
            .unwrap();
        data["bias"]
            .set(&Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap())
            .unwrap();
    }

    #[test]
    fn train_mode_output_gradients_and_running_stats_match_candle() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 2., (4, 3, 5, 5), &dev).unwrap() + 1.0).unwrap(),
        )
        .unwrap();
        let vm_a = VarMap::new();
        let vm_b = VarMap::new();
        let vb_a = VarBuilder::from_varmap(&vm_a, DType::F32, &dev);
        let vb_b = VarBuilder::from_varmap(&vm_b, DType::F32, &dev);
        let ours = batch_norm(3, 1e-5, vb_a).unwrap();
        let theirs = candle_nn::batch_norm(3, 1e-5, vb_b).unwrap();
        // Non-trivial affine parameters, the same on both sides.
        set_affine(&vm_a);
        set_affine(&vm_b);
        let w = Tensor::randn(0f32, 1., (4, 3, 5, 5), &dev).unwrap();
        let ya = ours.forward_t(&x, true).unwrap();
        let yb = theirs.forward_t(&x, true).unwrap();
        assert!(max_diff(&ya, &yb) < 1e-4);
        let ga = (ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        for name in ["weight", "bias"] {
            let va = vm_a.data().lock().unwrap()[name].clone();
            let vb = vm_b.data().lock().unwrap()[name].clone();
            assert!(
                max_diff(ga.get(&va).unwrap(), gb.get(&vb).unwrap()) < 1e-3,
                "{name}"
            );
        }
        for name in ["running_mean", "running_var"] {
            let va = vm_a.data().lock().unwrap()[name].as_tensor().clone();
            let vb = vm_b.data().lock().unwrap()[name].as_tensor().clone();
            assert!(max_diff(&va, &vb) < 1e-5, "{name}: {va} vs {vb}");
        }
    }

    #[test]
    fn relu_and_its_gradient() {
        let x = Var::from_tensor(&Tensor::new(&[-1f32, 0.5, 2.0, -0.1], &Device::Cpu).unwrap())
            .unwrap();
        let y = relu(&x).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.0, 0.5, 2.0, 0.0]);
        let g = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 3.0, 3.0, 0.0]
        );
    }
}

/// 2×2 max-pool, stride 2 (`[N, C, H, W]`, H and W even), with the gradient routed to the
/// first maximum of each window as PyTorch does (candle 0.11's own backward scales it by 1/4).
struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let d = l.dims();
        let (h, w) = (d[2], d[3]);
        let (ho, wo) = (h / 2, w / 2);
        let mut y = vec![0f32; d[0] * d[1] * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(yo, xi)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let i = 2 * oy * w + 2 * ox;
                        yo[oy * wo + ox] = xi[i].max(xi[i + 1]).max(xi[i + w]).max(xi[i + w + 1]);
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((d[0], d[1], ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &MaxPool2Backward,
        )?))
    }
}

struct MaxPool2Backward;

impl CustomOp2 for MaxPool2Backward {
    fn name(&self) -> &'static str {
        "max-pool-2x2-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(xs, xl)?, slice(gs, gl)?);
        let d = xl.dims();
        let (h, w) = (d[2], d[3]);
        let (ho, wo) = (h / 2, w / 2);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(g.par_chunks(ho * wo)))
            .for_each(|(dxo, (xi, gi))| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let i = 2 * oy * w + 2 * ox;
                        let cands = [i, i + 1, i + w, i + w + 1];
                        let mut best = cands[0];
                        for &c in &cands[1..] {
                            if xi[c] > xi[best] {
                                best = c;
                            }
                        }
                        dxo[best] += gi[oy * wo + ox];
                    }
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// 2×2 max-pool with stride 2: the fused op on the CPU (even sizes), candle's elsewhere.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && h % 2 == 0 && w % 2 == 0 {
        x.contiguous()?.apply_op1(MaxPool2)
    } else {
        x.max_pool2d(2)
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn max_pool_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 6, 8), &Device::Cpu).unwrap())
            .unwrap();
        let w = Tensor::randn(0f32, 1., (2, 3, 3, 4), &Device::Cpu).unwrap();
        let a = max_pool2(&x).unwrap();
        let b = x.max_pool2d(2).unwrap();
        let d = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        // Each window's gradient lands on its maximum, whole. candle 0.11 multiplies it by the
        // window's mean mask (1/4 without ties) where it means to divide by the tie count, so
        // its gradient is a quarter of PyTorch's: that is compared here too.
        let ours = ga.get(&x).unwrap();
        let total: f32 = ours.sum_all().unwrap().to_scalar().unwrap();
        let expect: f32 = w.sum_all().unwrap().to_scalar().unwrap();
        assert!((total - expect).abs() < 1e-4);
        let nonzero = ours
            .ne(0f32)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(nonzero as usize, 2 * 3 * 3 * 4);
        let d = (ours - (gb.get(&x).unwrap() * 4.0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
