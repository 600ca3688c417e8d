//! BatchNorm fused with the activation after it (identity, ReLU, AllConvNet's sigmoid-GELU),
//! ReLU and 2×2 max-pool as CPU ops with hand-written backward passes.
//!
//! candle composes training-mode BatchNorm from a dozen broadcast ops and differentiates each:
//! on 2 cores a `[128, 32, 32, 32]` forward+backward took ~600 ms, more than the convolution.
//! Here the forward computes the batch statistics once (two passes per channel, kept for the
//! running averages and the backward pass) and writes `act(x·scale + shift)` in one more; the
//! backward recomputes the pre-activation from x, and is the textbook three sums (`dβ = Σdz`,
//! `dγ = Σdz·x̂`, `dx = γ/σ·(dz − dβ/M − x̂·dγ/M)`). Eval mode is one pass with the running
//! statistics. Semantics are PyTorch's: biased variance to normalize, unbiased variance into
//! the running average, `momentum` 0.1. Non-CPU devices use candle's own layers, except CUDA
//! f32 with the `cudnn` feature, which goes through cuDNN (`crate::cudnn_bn`, both modes);
//! inside a [`crate::sync_bn::scope`] training mode uses the data-parallel group's statistics
//! instead (any device, never cuDNN).

use crate::fast_conv::{f32_slice as slice, output_buffer};
use crate::sync_bn::BatchStatsReducer;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use candle_nn::{BatchNormConfig, VarBuilder};
use rayon::prelude::*;
use std::sync::Arc;

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

/// Per channel `(scale, shift)` with `y = x·scale + shift`, and `1/σ`.
fn affine(stats: &[(f64, f64)], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<(f64, f64, f64)> {
    stats
        .iter()
        .zip(gamma.iter().zip(beta))
        .map(|(&(mean, var), (&g, &b))| {
            let inv = 1.0 / (var + eps).sqrt();
            let scale = g as f64 * inv;
            (scale, b as f64 - mean * scale, inv)
        })
        .collect()
}

/// What follows a BatchNorm inside its fused op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `max(z, 0)`.
    Relu,
    /// AugMix's AllConvNet GELU approximation `z·sigmoid(1.702 z)`.
    GeluSigmoid,
}

impl Activation {
    #[inline]
    fn apply(self, z: f32) -> f32 {
        match self {
            Activation::Identity => z,
            Activation::Relu => z.max(0.0),
            Activation::GeluSigmoid => z / (1.0 + (-1.702 * z).exp()),
        }
    }

    /// `d apply(z) / dz`.
    #[inline]
    fn derivative(self, z: f32) -> f32 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::GeluSigmoid => {
                let s = 1.0 / (1.0 + (-1.702 * z).exp());
                s + 1.702 * z * s * (1.0 - s)
            }
        }
    }

    /// The same with candle's ops, for devices without the fused op.
    pub fn apply_tensor(self, z: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => Ok(z.clone()),
            Activation::Relu => relu(z),
            Activation::GeluSigmoid => candle_nn::ops::sigmoid(&(z * 1.702)?)? * z,
        }
    }

    /// `d apply(z) / dz` with candle's ops (eval mode's rare backward pass).
    fn derivative_tensor(self, z: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => z.ones_like(),
            Activation::Relu => z.gt(0f32)?.to_dtype(z.dtype()),
            Activation::GeluSigmoid => {
                let s = candle_nn::ops::sigmoid(&(z * 1.702)?)?;
                let one_minus = (1.0 - &s)?;
                &s + ((z * 1.702)? * &s)? * one_minus
            }
        }
    }
}

/// `z = x·scale + shift` per channel, then the activation.
fn normalize(
    x: &[f32],
    c: usize,
    p: usize,
    coefficients: &[(f64, f64, f64)],
    activation: Activation,
) -> Vec<f32> {
    let mut y = output_buffer(x.len());
    y.par_chunks_mut(p)
        .zip(x.par_chunks(p))
        .enumerate()
        .for_each(|(k, (yo, xi))| {
            let (scale, shift, _) = coefficients[k % c];
            let (scale, shift) = (scale as f32, shift as f32);
            for (o, &v) in yo.iter_mut().zip(xi) {
                *o = activation.apply(v * scale + shift);
            }
        });
    y
}

/// `y = act(γ·(x − μ)/σ + β)` with batch statistics. Args: x
/// `[N, C, …]`, γ `[C]`, β `[C]`. The forward pass computes the batch's statistics once and
/// keeps them for the running averages and the backward pass.
struct BatchNormTrain {
    eps: f64,
    activation: Activation,
    /// Per channel (mean, biased variance) of the batch, set by the forward pass (shared
    /// with the caller, which updates the running averages from it).
    stats: Arc<std::sync::OnceLock<Vec<(f64, f64)>>>,
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
        let stats = self.stats.get_or_init(|| channel_stats(x, n, c, p));
        let coefficients = affine(stats, gamma, beta, self.eps);
        let y = normalize(x, c, p, &coefficients, self.activation);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let len = x.elem_count();
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch-norm backward before its forward pass");
        };
        let backward = BatchNormBackward {
            eps: self.eps,
            activation: self.activation,
            stats: stats.clone(),
            gamma: gamma.to_vec1::<f32>()?,
            beta: beta.to_vec1::<f32>()?,
        };
        let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        let dx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        // Copied out: γ's and β's gradients outlive the step (momentum), and a view would
        // keep the whole activation-sized buffer alive with them. (Not `Tensor::copy`, which
        // clones the whole storage under a view: 5 % of WRN-40-2's step.)
        let own = |start: usize| {
            let values = packed.narrow(0, start, c)?.to_vec1::<f32>()?;
            Tensor::from_vec(values, c, packed.device())
        };
        let (dgamma, dbeta) = (own(len)?, own(len + c)?);
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Args: x, dy → `[dx…, dγ…, dβ…]` flattened. `dy` first goes back through the activation,
/// at the pre-activation `z` recomputed from x (cheaper than keeping it).
struct BatchNormBackward {
    eps: f64,
    activation: Activation,
    stats: Vec<(f64, f64)>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl CustomOp2 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (slice(xs, xl)?, slice(ds, dl)?);
        let (n, c, p) = dims_ncp(xl);
        let m = (n * p) as f64;
        let coefficients = affine(&self.stats, &self.gamma, &self.beta, self.eps);
        let activation = self.activation;
        // dL/dz from dL/dy at channel `ch`.
        let upstream = |ch: usize, g: f32, xv: f32| {
            if activation == Activation::Identity {
                return g;
            }
            let (scale, shift, _) = coefficients[ch];
            g * activation.derivative(xv * scale as f32 + shift as f32)
        };
        // Per channel: Σdy and Σdy·x̂.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, var) = self.stats[ch];
                let inv = 1.0 / (var + self.eps).sqrt();
                let (mut sd, mut sdx) = (0f64, 0f64);
                for i in 0..n {
                    let r = (i * c + ch) * p..(i * c + ch + 1) * p;
                    for (&g, &v) in dy[r.clone()].iter().zip(&x[r]) {
                        let g = upstream(ch, g, v) as f64;
                        sd += g;
                        sdx += g * (v as f64 - mean) * inv;
                    }
                }
                (sd, sdx)
            })
            .collect();
        let mut out = output_buffer(x.len() + 2 * c);
        let (dx, tail) = out.split_at_mut(x.len());
        dx.par_chunks_mut(p).enumerate().for_each(|(k, dxo)| {
            let ch = k % c;
            let (mean, var) = self.stats[ch];
            let inv = 1.0 / (var + self.eps).sqrt();
            let (sd, sdx) = sums[ch];
            let g = self.gamma[ch] as f64 * inv;
            // dx = g·(dy − Σdy/M − x̂·Σdy·x̂/M), in f32 with x̂ formed first (no cancellation).
            let (g, mean, inv) = (g as f32, mean as f32, inv as f32);
            let (mean_dy, mean_dy_xhat) = ((sd / m) as f32, (sdx / m) as f32);
            let base = k * p;
            let (xr, dyr) = (&x[base..base + p], &dy[base..base + p]);
            for ((o, &xv), &gv) in dxo.iter_mut().zip(xr).zip(dyr) {
                let xhat = (xv - mean) * inv;
                *o = g * (upstream(ch, gv, xv) - mean_dy - xhat * mean_dy_xhat);
            }
        });
        for ch in 0..c {
            tail[ch] = sums[ch].1 as f32;
            tail[c + ch] = sums[ch].0 as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// Eval-mode `y = act(γ·(x − μ_running)/σ_running + β)` with the
/// coefficients precomputed; differentiable in x, γ and β (FSGMix and SENSEI differentiate
/// through a model in eval mode).
struct BatchNormEval {
    activation: Activation,
    /// Per channel (running mean, running variance).
    stats: Vec<(f64, f64)>,
    eps: f64,
}

impl CustomOp3 for BatchNormEval {
    fn name(&self) -> &'static str {
        "batch-norm-eval"
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
        let (_, c, p) = dims_ncp(xl);
        let coefficients = affine(&self.stats, gamma, beta, self.eps);
        let y = normalize(x, c, p, &coefficients, self.activation);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Rare (only when something differentiates through eval mode): composed from candle's
        // ops rather than fused.
        let c = x.dim(1)?;
        let per_channel: Vec<usize> = (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
        let per_channel = per_channel.as_slice();
        let dev = x.device();
        let mean: Vec<f32> = self.stats.iter().map(|s| s.0 as f32).collect();
        let inv: Vec<f32> = self
            .stats
            .iter()
            .map(|s| (1.0 / (s.1 + self.eps).sqrt()) as f32)
            .collect();
        let mean = Tensor::new(mean, dev)?.reshape(per_channel)?;
        let inv = Tensor::new(inv, dev)?.reshape(per_channel)?;
        let xhat = x.broadcast_sub(&mean)?.broadcast_mul(&inv)?;
        let z = xhat
            .broadcast_mul(&gamma.reshape(per_channel)?)?
            .broadcast_add(&beta.reshape(per_channel)?)?;
        let dy = (grad * self.activation.derivative_tensor(&z)?)?;
        let reduce = |t: &Tensor| -> Result<Tensor> {
            let mut t = t.clone();
            for d in (0..t.rank()).rev().filter(|&d| d != 1) {
                t = t.sum(d)?;
            }
            Ok(t)
        };
        let dx = dy.broadcast_mul(&(gamma.reshape(per_channel)?.broadcast_mul(&inv)?))?;
        Ok((Some(dx), Some(reduce(&(&dy * xhat)?)?), Some(reduce(&dy)?)))
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

impl BatchNorm {
    /// `relu(bn(x))`, fused into one op (and one backward op) on the CPU.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_activated_t(x, train, Activation::Relu)
    }

    /// `activation(bn(x))`, fused into one op (and one backward op) on the CPU.
    pub fn forward_activated_t(
        &self,
        x: &Tensor,
        train: bool,
        activation: Activation,
    ) -> Result<Tensor> {
        let fused = x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2;
        if !fused || (train && crate::sync_bn::active().is_some()) {
            return activation.apply_tensor(&self.forward_unfused(x, train)?);
        }
        self.forward_cpu(x, train, activation)
    }

    /// Any device: synchronized statistics, cuDNN, or candle's composed layer.
    fn forward_unfused(&self, x: &Tensor, train: bool) -> Result<Tensor> {
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
        candle_core::ModuleT::forward_t(&self.inner, x, train)
    }

    /// The CPU's fused ops: batch statistics computed once per step, ReLU folded in.
    fn forward_cpu(&self, x: &Tensor, train: bool, activation: Activation) -> Result<Tensor> {
        self.check_features(x)?;
        let x = x.contiguous()?;
        if !train {
            let mean = self.running_mean.as_tensor().to_vec1::<f32>()?;
            let var = self.running_var.as_tensor().to_vec1::<f32>()?;
            let op = BatchNormEval {
                activation,
                stats: mean
                    .iter()
                    .zip(&var)
                    .map(|(&m, &v)| (m as f64, v as f64))
                    .collect(),
                eps: self.eps,
            };
            return x.apply_op3(&self.weight, &self.bias, op);
        }
        let stats = Arc::new(std::sync::OnceLock::new());
        let op = BatchNormTrain {
            eps: self.eps,
            activation,
            stats: stats.clone(),
        };
        let y = x.apply_op3(&self.weight, &self.bias, op)?;
        let Some(stats) = stats.get() else {
            candle_core::bail!("batch-norm forward pass left no statistics");
        };
        let m = (x.elem_count() / x.dim(1)?) as f64;
        let unbiased = m / (m - 1.0).max(1.0);
        let dev = x.device();
        let mean = Tensor::new(stats.iter().map(|s| s.0 as f32).collect::<Vec<_>>(), dev)?;
        let var = Tensor::new(
            stats
                .iter()
                .map(|s| (s.1 * unbiased) as f32)
                .collect::<Vec<_>>(),
            dev,
        )?;
        self.update_running(&mean, &var)?;
        Ok(y)
    }
}

impl candle_core::ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_activated_t(x, train, Activation::Identity)
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

    /// Fused `act(bn(x))` against candle's BatchNorm then the composed activation: output,
    /// gradients of x, γ and β, and (train mode) the running averages.
    fn check_fused_against_candle(train: bool, activation: Activation) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 2., (5, 3, 4, 6), &dev).unwrap() + 1.0).unwrap(),
        )
        .unwrap();
        let vm_a = VarMap::new();
        let vm_b = VarMap::new();
        let ours = batch_norm(3, 1e-5, VarBuilder::from_varmap(&vm_a, DType::F32, &dev)).unwrap();
        let theirs =
            candle_nn::batch_norm(3, 1e-5, VarBuilder::from_varmap(&vm_b, DType::F32, &dev))
                .unwrap();
        for vm in [&vm_a, &vm_b] {
            set_affine(vm);
            // Running statistics away from their (0, 1) start, so eval mode tests them.
            let data = vm.data().lock().unwrap();
            data["running_mean"]
                .set(&Tensor::new(&[0.3f32, -0.4, 1.1], &dev).unwrap())
                .unwrap();
            data["running_var"]
                .set(&Tensor::new(&[2.0f32, 0.5, 1.3], &dev).unwrap())
                .unwrap();
        }
        let w = Tensor::randn(0f32, 1., (5, 3, 4, 6), &dev).unwrap();
        let ya = ours.forward_activated_t(&x, train, activation).unwrap();
        let yb = activation
            .apply_tensor(&theirs.forward_t(&x, train).unwrap())
            .unwrap();
        let case = format!("train {train}, {activation:?}");
        assert!(max_diff(&ya, &yb) < 1e-4, "{case}: output");
        let ga = (ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(dx < 1e-4, "{case}: input gradient differs by {dx}");
        for name in ["weight", "bias"] {
            let va = vm_a.data().lock().unwrap()[name].clone();
            let vb = vm_b.data().lock().unwrap()[name].clone();
            let d = max_diff(ga.get(&va).unwrap(), gb.get(&vb).unwrap());
            assert!(d < 1e-3, "{case}: {name} gradient differs by {d}");
        }
        for name in ["running_mean", "running_var"] {
            let va = vm_a.data().lock().unwrap()[name].as_tensor().clone();
            let vb = vm_b.data().lock().unwrap()[name].as_tensor().clone();
            assert!(max_diff(&va, &vb) < 1e-5, "{case}: {name}: {va} vs {vb}");
        }
    }

    #[test]
    fn fused_activations_match_batch_norm_then_the_activation_in_both_modes() {
        for train in [true, false] {
            for activation in [
                Activation::Identity,
                Activation::Relu,
                Activation::GeluSigmoid,
            ] {
                check_fused_against_candle(train, activation);
            }
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
        let mut y = output_buffer(d[0] * d[1] * ho * wo);
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
