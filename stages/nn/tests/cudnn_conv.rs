//! The cuDNN convolution (`cudnn_conv`) against candle's CUDA `conv2d` and our CPU path: forward
//! and both gradients, for the shapes our models use; and WRN-40-2 trained one step with and
//! without it. All need a GPU: build with `--features cudnn`, run with `--include-ignored`.
#![cfg(feature = "cudnn")]

mod gpu_common;
use gpu_common::{gpu, rel_diff};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use deeprepair_nn::{cudnn_conv, fast_conv, trainable_vars, Arch};

/// Relative agreement asked of one convolution (f32, different summation orders).
const TOL: f32 = 1e-4;

#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    c: usize,
    k: usize,
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
}

const fn case(
    n: usize,
    c: usize,
    k: usize,
    (h, w): (usize, usize),
    kernel: usize,
    stride: usize,
    pad: usize,
) -> Case {
    Case {
        n,
        c,
        k,
        h,
        w,
        kernel,
        stride,
        pad,
    }
}

/// WRN-40-2 (stem, 3×3 stride 1 and 2, 1×1 stride-2 shortcuts), DenseNet (1×1 bottlenecks and
/// transitions, 12-channel growth), AllConvNet (3×3 pad 0, 1×1 pad 1), ResNet's 7×7 stem, and
/// odd and non-square sizes; batch 1 to 128.
const CASES: &[Case] = &[
    case(1, 3, 16, (32, 32), 3, 1, 1),
    case(128, 3, 16, (32, 32), 3, 1, 1),
    case(128, 32, 32, (32, 32), 3, 1, 1),
    case(128, 32, 64, (32, 32), 3, 2, 1),
    case(128, 32, 64, (32, 32), 1, 2, 0),
    case(128, 128, 128, (8, 8), 3, 1, 1),
    case(8, 64, 128, (16, 16), 3, 2, 1),
    case(8, 64, 128, (16, 16), 1, 2, 0),
    case(4, 168, 48, (32, 32), 1, 1, 0),
    case(4, 48, 12, (16, 16), 3, 1, 1),
    case(2, 192, 192, (8, 8), 3, 1, 0),
    case(2, 192, 192, (6, 6), 1, 1, 1),
    case(2, 3, 8, (32, 32), 7, 2, 3),
    case(3, 5, 7, (9, 11), 3, 2, 1),
    case(2, 6, 8, (15, 15), 3, 2, 1),
    case(2, 3, 4, (17, 13), 1, 2, 0),
    case(1, 1, 1, (1, 1), 1, 1, 0),
];

/// Forward output and gradients (input, weight) of `sum(conv(x, w) · r)`.
fn conv_and_grads(
    conv: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let xv = Var::from_tensor(x).unwrap();
    let wv = Var::from_tensor(w).unwrap();
    let y = conv(xv.as_tensor(), wv.as_tensor()).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&xv).expect("input gradient").clone();
    let dw = grads.get(&wv).expect("weight gradient").clone();
    (y, dx, dw)
}

#[test]
#[ignore = "needs a GPU"]
fn forward_and_gradients_match_candle_cuda_and_cpu() {
    let dev = gpu();
    for &cs in CASES {
        let x = Tensor::randn(0f32, 1., (cs.n, cs.c, cs.h, cs.w), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (cs.k, cs.c, cs.kernel, cs.kernel), &Device::Cpu)
            .unwrap()
            .affine(1. / ((cs.c * cs.kernel * cs.kernel) as f64).sqrt(), 0.)
            .unwrap();
        let ho = (cs.h + 2 * cs.pad - cs.kernel) / cs.stride + 1;
        let wo = (cs.w + 2 * cs.pad - cs.kernel) / cs.stride + 1;
        let r = Tensor::randn(0f32, 1., (cs.n, cs.k, ho, wo), &Device::Cpu).unwrap();
        let (xg, wg, rg) = (
            x.to_device(&dev).unwrap(),
            w.to_device(&dev).unwrap(),
            r.to_device(&dev).unwrap(),
        );
        let ours = conv_and_grads(
            |x, w| cudnn_conv::conv2d(x, w, cs.pad, cs.stride),
            &xg,
            &wg,
            &rg,
        );
        let candle_cuda =
            conv_and_grads(|x, w| x.conv2d(w, cs.pad, cs.stride, 1, 1), &xg, &wg, &rg);
        let cpu = conv_and_grads(
            |x, w| fast_conv::conv2d(x, w, cs.pad, cs.stride),
            &x,
            &w,
            &r,
        );
        assert_eq!(ours.0.dims(), &[cs.n, cs.k, ho, wo], "{cs:?}");
        let mut diffs = Vec::new();
        for (name, theirs) in [("candle CUDA", &candle_cuda), ("CPU", &cpu)] {
            for (what, a, b) in [
                ("output", &ours.0, &theirs.0),
                ("input gradient", &ours.1, &theirs.1),
                ("weight gradient", &ours.2, &theirs.2),
            ] {
                let d = rel_diff(a, b);
                diffs.push(format!("{d:.1e}"));
                assert!(
                    d < TOL,
                    "{what} differs from {name} by {d:e} (relative) for {cs:?}"
                );
            }
        }
        // The margins, for --nocapture: y, dx, dw against candle CUDA, then against the CPU.
        println!("{cs:?}: {}", diffs.join(" "));
    }
    // Every shape above was planned once on this thread (forward and both backward passes).
    assert!(cudnn_conv::cached_plan_count() >= CASES.len());
}

/// A transposed (strided) input, a weight seen through a transpose, and an input that starts
/// inside its buffer (a narrowed batch): gradients must flow back to the underlying tensors.
#[test]
#[ignore = "needs a GPU"]
fn strided_and_offset_inputs() {
    let dev = gpu();
    let (n, c, k, h, w) = (4, 8, 16, 12, 10);
    let x_nhcw = Tensor::randn(0f32, 1., (n, h, c, w), &dev).unwrap();
    let x_big = Tensor::randn(0f32, 1., (n + 3, c, h, w), &dev).unwrap();
    let w_ckrs = Tensor::randn(0f32, 0.2, (c, k, 3, 3), &dev).unwrap();
    let r = Tensor::randn(0f32, 1., (n, k, h, w), &dev).unwrap();
    type Input = fn(&Tensor) -> Tensor;
    let inputs: [(&str, &Tensor, Input); 2] = [
        ("transposed", &x_nhcw, |t| t.transpose(1, 2).unwrap()),
        ("narrowed", &x_big, |t| t.narrow(0, 2, 4).unwrap()),
    ];
    for (name, base, view) in inputs {
        let run = |cudnn: bool| {
            let xv = Var::from_tensor(base).unwrap();
            let wv = Var::from_tensor(&w_ckrs).unwrap();
            let x = view(xv.as_tensor());
            let wt = wv.as_tensor().transpose(0, 1).unwrap();
            assert!(name != "transposed" || !x.is_contiguous());
            assert!(!wt.is_contiguous());
            let y = if cudnn {
                cudnn_conv::conv2d(&x, &wt, 1, 1).unwrap()
            } else {
                x.conv2d(&wt, 1, 1, 1, 1).unwrap()
            };
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(&xv).unwrap().clone(), g.get(&wv).unwrap().clone())
        };
        let (ours, theirs) = (run(true), run(false));
        for (what, a, b) in [
            ("output", &ours.0, &theirs.0),
            ("input gradient", &ours.1, &theirs.1),
            ("weight gradient", &ours.2, &theirs.2),
        ] {
            let d = rel_diff(a, b);
            assert!(d < TOL, "{name}: {what} differs by {d:e} (relative)");
        }
    }
}

/// The same shapes again, after larger ones grew the workspace: cached plans and a reused
/// workspace give the same answer as the first call.
#[test]
#[ignore = "needs a GPU"]
fn cached_plans_repeat_results() {
    let dev = gpu();
    let x = Tensor::randn(0f32, 1., (16, 32, 16, 16), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.1, (64, 32, 3, 3), &dev).unwrap();
    let first = cudnn_conv::conv2d(&x, &w, 1, 1).unwrap();
    let big = Tensor::randn(0f32, 1., (128, 64, 32, 32), &dev).unwrap();
    let big_w = Tensor::randn(0f32, 0.1, (64, 64, 3, 3), &dev).unwrap();
    cudnn_conv::conv2d(&big, &big_w, 1, 2).unwrap();
    let planned = cudnn_conv::cached_plan_count();
    let again = cudnn_conv::conv2d(&x, &w, 1, 1).unwrap();
    assert_eq!(
        cudnn_conv::cached_plan_count(),
        planned,
        "no new plan for a known shape"
    );
    assert!(rel_diff(&again, &first) < TOL);
}

/// Loss and every parameter's gradient of one WRN-40-2 training step (train-mode BatchNorm,
/// cross-entropy), with the model's convolutions on cuDNN and on candle's CUDA kernels.
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
    let convs = vars.iter().filter(|v| v.rank() == 4).count();
    let step = |cudnn: bool| {
        cudnn_conv::set_enabled(cudnn);
        let launched = cudnn_conv::launch_count();
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
        let launches = cudnn_conv::launch_count() - launched;
        if cudnn {
            // Forward, backward-data (not for the stem, whose input is the image) and
            // backward-filter of every conv.
            assert_eq!(launches, 3 * convs as u64 - 1, "{convs} convs");
        } else {
            assert_eq!(launches, 0, "cuDNN used while disabled");
        }
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (loss_cudnn, grads_cudnn) = step(true);
    let (loss_candle, grads_candle) = step(false);
    cudnn_conv::set_enabled(true);
    let loss_rel = (loss_cudnn - loss_candle).abs() / loss_candle.abs();
    println!("WRN-40-2 loss: cuDNN {loss_cudnn}, candle {loss_candle} (relative {loss_rel:e})");
    assert!(loss_rel < TOL, "loss differs by {loss_rel:e}");
    // 40 layers of f32 with different summation orders, BatchNorm in between: 10× one conv's.
    let mut worst = 0f32;
    for (i, (a, b)) in grads_cudnn.iter().zip(&grads_candle).enumerate() {
        let d = rel_diff(a, b);
        worst = worst.max(d);
        assert!(
            d < 10. * TOL,
            "gradient of parameter {i} {:?} differs by {d:e}",
            b.dims()
        );
    }
    println!(
        "WRN-40-2: worst relative gradient difference {worst:e} over {} parameters",
        vars.len()
    );
}
