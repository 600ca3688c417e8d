//! The cuDNN BatchNorm (`cudnn_bn`) against candle's composed BatchNorm on CUDA and our CPU path
//! (`fast_bn`): training output, dx, dγ, dβ and the running statistics over three steps, then
//! eval mode, for the shapes our models use; non-contiguous inputs; the synchronized-BatchNorm
//! scope staying off cuDNN; and WRN-40-2 trained one step with and without it. All need a GPU:
//! build with `--features cudnn`, run with `--include-ignored --test-threads=1` (the WRN test
//! flips the process-wide cuDNN switches; the others call `cudnn_bn` directly).
#![cfg(feature = "cudnn")]

mod gpu_common;
use gpu_common::{gpu, rel_diff};

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, VarBuilder, VarMap};
use deeprepair_nn::sync_bn::{self, BatchStatsReducer};
use deeprepair_nn::{cudnn_bn, cudnn_conv, fast_bn, is_running_stat, trainable_vars, Arch};
use std::sync::Arc;

/// Relative agreement asked of one layer (f32, different summation orders).
const TOL: f32 = 1e-4;
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

fn config() -> BatchNormConfig {
    BatchNormConfig {
        eps: EPS,
        remove_mean: true,
        affine: true,
        momentum: MOMENTUM,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// `cudnn_bn` called directly (independent of the switches).
    Cudnn,
    /// candle-nn's `BatchNorm` on CUDA (what `fast_bn` runs on CUDA without cuDNN).
    CandleCuda,
    /// `fast_bn::BatchNorm` on the CPU (its fused ops).
    Cpu,
}

/// One BatchNorm layer on one path: a `VarMap` with `weight`, `bias`, `running_mean`,
/// `running_var`, and the layer built over it.
struct Layer {
    path: Path,
    dev: Device,
    fast: fast_bn::BatchNorm,
    candle: candle_nn::BatchNorm,
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
}

impl Layer {
    fn new(path: Path, gamma: &Tensor, beta: &Tensor) -> Layer {
        let dev = match path {
            Path::Cpu => Device::Cpu,
            _ => gpu(),
        };
        let c = gamma.dim(0).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let fast = fast_bn::batch_norm(c, config(), vb).unwrap();
        let var = |name: &str| varmap.data().lock().unwrap()[name].clone();
        let (weight, bias) = (var("weight"), var("bias"));
        weight.set(&gamma.to_device(&dev).unwrap()).unwrap();
        bias.set(&beta.to_device(&dev).unwrap()).unwrap();
        let (running_mean, running_var) = (var("running_mean"), var("running_var"));
        // Over the same variables, as fast_bn builds its own candle layer.
        let candle = candle_nn::BatchNorm::new_with_momentum(
            c,
            running_mean.as_tensor().clone(),
            running_var.as_tensor().clone(),
            weight.as_tensor().clone(),
            bias.as_tensor().clone(),
            EPS,
            MOMENTUM,
        )
        .unwrap();
        Layer {
            path,
            dev,
            fast,
            candle,
            weight,
            bias,
            running_mean,
            running_var,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.path {
            Path::Cudnn => {
                let args = (
                    x,
                    self.weight.as_tensor(),
                    self.bias.as_tensor(),
                    self.running_mean.as_tensor(),
                    self.running_var.as_tensor(),
                );
                if train {
                    cudnn_bn::batch_norm_train(
                        args.0, args.1, args.2, args.3, args.4, EPS, MOMENTUM,
                    )
                } else {
                    cudnn_bn::batch_norm_eval(args.0, args.1, args.2, args.3, args.4, EPS)
                }
            }
            Path::CandleCuda => self.candle.forward_t(x, train),
            Path::Cpu => self.fast.forward_t(x, train),
        }
    }

    /// `y`, dx, dγ, dβ of `sum(bn(view(x)) · r)`; `view` maps the leaf to the layer's input.
    fn step(
        &self,
        x: &Tensor,
        r: &Tensor,
        train: bool,
        view: impl Fn(&Tensor) -> Tensor,
    ) -> [Tensor; 4] {
        let xv = Var::from_tensor(&x.to_device(&self.dev).unwrap()).unwrap();
        let input = view(xv.as_tensor());
        let y = self.forward(&input, train).unwrap();
        let r = r.to_device(&self.dev).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var, what: &str| {
            grads
                .get(v)
                .unwrap_or_else(|| panic!("{:?}: no {what} gradient", self.path))
                .clone()
        };
        [
            y,
            grad(&xv, "input"),
            grad(&self.weight, "weight"),
            grad(&self.bias, "bias"),
        ]
    }

    fn running(&self) -> [Tensor; 2] {
        [
            self.running_mean.as_tensor().clone(),
            self.running_var.as_tensor().clone(),
        ]
    }
}

/// Asserts `ours` matches `theirs` name by name within `tol`; returns the differences.
fn compare(
    what: &str,
    names: &[&str],
    ours: &[Tensor],
    theirs: &[Tensor],
    tol: f32,
) -> Vec<String> {
    names
        .iter()
        .zip(ours.iter().zip(theirs))
        .map(|(name, (a, b))| {
            let d = rel_diff(a, b);
            assert!(d < tol, "{what}: {name} differs by {d:e} (relative)");
            format!("{d:.1e}")
        })
        .collect()
}

/// WRN-40-2's BatchNorm inputs (16 channels at 32², 32 at 32², 64 at 16², 128 at 8², batch
/// 128), a 3-channel tiny batch, few values per channel (where biased and unbiased variance
/// differ by several percent), odd sizes, and rank 2 and 3.
const CASES: &[&[usize]] = &[
    &[128, 16, 32, 32],
    &[128, 32, 32, 32],
    &[128, 64, 16, 16],
    &[128, 128, 8, 8],
    &[2, 3, 32, 32],
    &[2, 3, 3, 3],
    // Three values per channel: with two, dx is ε-sized cancellation noise.
    &[1, 7, 1, 3],
    &[3, 5, 7, 9],
    &[5, 11, 13, 1],
    &[16, 10],
    &[4, 6, 9],
];

/// γ with a negative entry and β, both away from the defaults 1 and 0.
fn affine(c: usize) -> (Tensor, Tensor) {
    let gamma: Vec<f32> = (0..c)
        .map(|i| {
            if i % 5 == 3 {
                -0.7
            } else {
                0.5 + 0.1 * (i % 7) as f32
            }
        })
        .collect();
    let beta: Vec<f32> = (0..c).map(|i| 0.1 * (i % 5) as f32 - 0.2).collect();
    (
        Tensor::new(gamma, &Device::Cpu).unwrap(),
        Tensor::new(beta, &Device::Cpu).unwrap(),
    )
}

/// Inputs with a per-step offset and scale, so batch statistics are not those of N(0, 1).
fn input(dims: &[usize], seed: f64) -> Tensor {
    Tensor::randn(0f32, 1., dims, &Device::Cpu)
        .unwrap()
        .affine(1.5 + 0.25 * seed, 0.5 - 0.3 * seed)
        .unwrap()
}

#[test]
#[ignore = "needs a GPU"]
fn train_steps_and_eval_match_candle_cuda_and_cpu() {
    let names = [
        "output",
        "input gradient",
        "weight gradient",
        "bias gradient",
    ];
    for &dims in CASES {
        let (gamma, beta) = affine(dims[1]);
        let layers =
            [Path::Cudnn, Path::CandleCuda, Path::Cpu].map(|p| Layer::new(p, &gamma, &beta));
        let mut margins = Vec::new();
        for step in 0..3 {
            let x = input(dims, step as f64);
            let r = Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap();
            let launched = cudnn_bn::launch_count();
            let outs = layers
                .each_ref()
                .map(|l| l.step(&x, &r, true, |t| t.clone()));
            assert_eq!(
                cudnn_bn::launch_count() - launched,
                2,
                "one cuDNN forward and one backward"
            );
            for (theirs, label) in [(&outs[1], "candle CUDA"), (&outs[2], "CPU")] {
                let what = format!("{dims:?} training step {step} vs {label}");
                margins.extend(compare(&what, &names, &outs[0], theirs, TOL));
            }
        }
        let stats = ["running mean", "running variance"];
        for (other, label) in [(&layers[1], "candle CUDA"), (&layers[2], "CPU")] {
            let what = format!("{dims:?} after 3 steps vs {label}");
            margins.extend(compare(
                &what,
                &stats,
                &layers[0].running(),
                &other.running(),
                TOL,
            ));
        }
        // Eval mode with the running statistics the three steps left (and its gradients).
        let x = input(dims, 3.0);
        let r = Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap();
        let launched = cudnn_bn::launch_count();
        let outs = layers
            .each_ref()
            .map(|l| l.step(&x, &r, false, |t| t.clone()));
        assert_eq!(
            cudnn_bn::launch_count() - launched,
            1,
            "one cuDNN inference"
        );
        for (theirs, label) in [(&outs[1], "candle CUDA"), (&outs[2], "CPU")] {
            let what = format!("{dims:?} eval vs {label}");
            margins.extend(compare(&what, &names, &outs[0], theirs, TOL));
        }
        // Eval mode leaves the running statistics alone.
        let after = layers[0].running();
        margins.extend(compare(
            &format!("{dims:?} eval"),
            &stats,
            &after,
            &layers[1].running(),
            TOL,
        ));
        // The margins, for --nocapture: per step y, dx, dγ, dβ against candle CUDA then the
        // CPU; the running statistics; eval.
        println!("{dims:?}: {}", margins.join(" "));
    }
    assert!(cudnn_bn::cached_plan_count() >= CASES.len());
}

/// A transposed (strided) input and a narrowed batch starting at an odd offset inside its
/// buffer: the gradient must reach the underlying tensor.
#[test]
#[ignore = "needs a GPU"]
fn strided_and_offset_inputs() {
    let (n, c, h, w) = (4, 3, 5, 5);
    let (gamma, beta) = affine(c);
    let names = [
        "output",
        "input gradient",
        "weight gradient",
        "bias gradient",
    ];
    type View = fn(&Tensor) -> Tensor;
    let cases: [(&str, Vec<usize>, View); 2] = [
        ("transposed", vec![n, h, c, w], |t| {
            t.transpose(1, 2).unwrap()
        }),
        // 75 values per sample: the view starts 300 bytes into the buffer.
        ("narrowed", vec![n + 2, c, h, w], |t| {
            t.narrow(0, 1, 4).unwrap()
        }),
    ];
    for (name, base_dims, view) in cases {
        let layers = [Path::Cudnn, Path::CandleCuda].map(|p| Layer::new(p, &gamma, &beta));
        let x = input(&base_dims, 1.0);
        let r = Tensor::randn(0f32, 1., (n, c, h, w), &Device::Cpu).unwrap();
        if name == "transposed" {
            assert!(!view(&x).is_contiguous());
        }
        let outs = layers.each_ref().map(|l| l.step(&x, &r, true, view));
        compare(name, &names, &outs[0], &outs[1], TOL);
        compare(
            name,
            &["running mean", "running variance"],
            &layers[0].running(),
            &layers[1].running(),
            TOL,
        );
    }
}

/// A single-rank group: the synchronized path with nothing to synchronize.
struct OneRank;

impl BatchStatsReducer for OneRank {
    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
}

/// Inside a synchronized-BatchNorm scope, training mode stays on the synchronized path (no
/// cuDNN) and eval mode may use cuDNN; `fast_bn` without a scope uses cuDNN in both.
#[test]
#[ignore = "needs a GPU"]
fn synchronized_scope_keeps_its_path() {
    let dims = [8, 4, 6, 6];
    let (gamma, beta) = affine(4);
    let ours = Layer::new(Path::CandleCuda, &gamma, &beta);
    let theirs = Layer::new(Path::CandleCuda, &gamma, &beta);
    let x = input(&dims, 0.0).to_device(&gpu()).unwrap();
    let before = cudnn_bn::launch_count();
    let synced = {
        let _scope = sync_bn::scope(Arc::new(OneRank));
        ours.fast.forward_t(&x, true).unwrap()
    };
    assert_eq!(
        cudnn_bn::launch_count(),
        before,
        "cuDNN used inside a synchronized scope"
    );
    let expected = theirs.candle.forward_t(&x, true).unwrap();
    assert!(rel_diff(&synced, &expected) < TOL);
    if cudnn_bn::enabled() {
        ours.fast.forward_t(&x, true).unwrap();
        ours.fast.forward_t(&x, false).unwrap();
        assert_eq!(
            cudnn_bn::launch_count(),
            before + 2,
            "fast_bn on CUDA f32 without a scope goes through cuDNN"
        );
    }
}

/// One WRN-40-2 training step (train-mode BatchNorm, cross-entropy) and an eval forward, with
/// BatchNorm and convolutions on cuDNN, BatchNorm alone on candle, and both on candle, from the
/// same running statistics: loss, every parameter's gradient, the running statistics after the
/// step and the eval logits agree.
#[test]
#[ignore = "needs a GPU"]
fn wrn_40_2_step_matches_candle_path() {
    let dev = gpu();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = deeprepair_nn::build(Arch::Wrn40_2, 10, vb).unwrap();
    let x = Tensor::randn(0f32, 1., (32, 3, 32, 32), &dev).unwrap();
    let labels = Tensor::from_vec((0..32u32).map(|i| i % 10).collect(), 32, &dev).unwrap();
    let vars = trainable_vars(&varmap);
    let mut running: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| is_running_stat(name))
        .map(|(name, v)| (name.clone(), v.clone()))
        .collect();
    running.sort_by(|a, b| a.0.cmp(&b.0));
    let bns = running
        .iter()
        .filter(|(name, _)| name.ends_with(".running_mean"))
        .count();
    let initial: Vec<Tensor> = running
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let step = |conv: bool, bn: bool| {
        cudnn_conv::set_enabled(conv);
        cudnn_bn::set_enabled(bn);
        for ((_, v), t) in running.iter().zip(&initial) {
            v.set(t).unwrap();
        }
        let launched = cudnn_bn::launch_count();
        let logits = model.forward_t(&x, true).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let grads = loss.backward().unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v)
                    .expect("a gradient for every parameter")
                    .clone()
            })
            .collect();
        let stats: Vec<Tensor> = running
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let eval = model.forward_t(&x, false).unwrap();
        let launches = cudnn_bn::launch_count() - launched;
        // Training forward and backward, then inference, of every BatchNorm.
        let expected = if conv && bn { 3 * bns as u64 } else { 0 };
        assert_eq!(
            launches, expected,
            "{bns} BatchNorm layers, conv {conv}, bn {bn}"
        );
        (loss.to_scalar::<f32>().unwrap(), grads, stats, eval)
    };
    let cudnn = step(true, true);
    let bn_candle = step(true, false);
    let all_candle = step(false, false);
    cudnn_conv::set_enabled(true);
    cudnn_bn::set_enabled(true);
    for (label, other) in [
        ("BatchNorm on candle", &bn_candle),
        ("all on candle", &all_candle),
    ] {
        let loss_rel = (cudnn.0 - other.0).abs() / other.0.abs();
        println!(
            "WRN-40-2 loss: cuDNN {}, {label} {} (relative {loss_rel:e})",
            cudnn.0, other.0
        );
        assert!(loss_rel < TOL, "{label}: loss differs by {loss_rel:e}");
        // 40 layers of f32 with different summation orders: 10× one layer's tolerance.
        let mut worst = 0f32;
        for (i, (a, b)) in cudnn.1.iter().zip(&other.1).enumerate() {
            let d = rel_diff(a, b);
            worst = worst.max(d);
            assert!(
                d < 10. * TOL,
                "{label}: gradient of parameter {i} {:?} differs by {d:e}",
                b.dims()
            );
        }
        let mut worst_stat = 0f32;
        for ((name, _), (a, b)) in running.iter().zip(cudnn.2.iter().zip(&other.2)) {
            let d = rel_diff(a, b);
            worst_stat = worst_stat.max(d);
            assert!(d < 10. * TOL, "{label}: {name} differs by {d:e}");
        }
        let eval = rel_diff(&cudnn.3, &other.3);
        assert!(eval < 10. * TOL, "{label}: eval logits differ by {eval:e}");
        println!(
            "WRN-40-2 vs {label}: worst relative gradient difference {worst:e} over {} \
             parameters, running statistics {worst_stat:e}, eval logits {eval:e}",
            vars.len()
        );
    }
}
