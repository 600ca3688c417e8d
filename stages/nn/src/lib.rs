//! The image classifiers, built with candle-nn from a [`VarBuilder`] whose `pp("name")` paths
//! mirror the PyTorch `state_dict` names of the reference definitions, so checkpoints trained
//! there load here (and ours load there).
//!
//! One file per architecture; [`build`] picks one by [`Arch`].
//! [`wct2`] is the WCT2 style-transfer network of DeepRepair's augmentation (not a classifier).

pub mod allconv;
#[cfg(feature = "cudnn")]
pub mod cudnn_bn;
#[cfg(feature = "cudnn")]
pub mod cudnn_conv;
pub mod densenet;
pub mod fast_bn;
pub mod fast_conv;
pub mod resnet;
pub mod sync_bn;
pub mod tiny_cnn;
pub mod wct2;
pub mod weights;
pub mod wide_resnet;

use crate::fast_conv::Conv2d;
use candle_core::{Result, Tensor};
use candle_nn::{BatchNormConfig, Conv2dConfig, Init, Linear, VarBuilder};

pub use weights::{
    build_detached, expected_tensors, is_running_stat, load_weights, load_weights_from_buffer,
    param_count, save_weights, trainable_vars, LoadError, TensorProblem, TensorShapes,
};

/// A classifier: NCHW f32 input (normalized as [`INPUT_MEAN`]/[`INPUT_STD`]) → logits `[N, classes]`.
pub trait Classifier: Send + Sync {
    /// `train`: BatchNorm uses batch statistics and updates its running averages; otherwise it
    /// uses the running averages (PyTorch's `model.train()` / `model.eval()`).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor>;
}

/// AugMix's `cifar.py` normalizes with mean 0.5 and std 0.5 per channel.
pub const INPUT_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
pub const INPUT_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// The architectures we build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    /// A small CNN for CPU runs and tests (ours; no reference definition).
    TinyCnn,
    /// AllConvNet of AugMix's `allconv.py` ("allconv").
    AllConvNet,
    /// DenseNet-40 (k = 12), the reference's `densenet()` ("densenet").
    DenseNet40_12,
    /// DenseNet-BC-100 (k = 12) ("densenet-bc-100-12").
    DenseNetBc100_12,
    /// WRN-40-2, dropout 0 ("wrn-40-2").
    Wrn40_2,
    /// torchvision's ImageNet ResNets ("resnet18", "resnet34", "resnet50"), its names.
    ResNet18,
    ResNet34,
    ResNet50,
}

impl Arch {
    pub const ALL: &'static [Arch] = &[
        Arch::TinyCnn,
        Arch::AllConvNet,
        Arch::DenseNet40_12,
        Arch::DenseNetBc100_12,
        Arch::Wrn40_2,
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
    ];

    /// The names used in manifests and on the command line, in declaration order.
    pub const NAMES: [&'static str; 8] = [
        "tiny-cnn",
        "allconv",
        "densenet",
        "densenet-bc-100-12",
        "wrn-40-2",
        "resnet18",
        "resnet34",
        "resnet50",
    ];

    /// The name used in manifests and on the command line.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.iter().copied().find(|a| a.name() == name)
    }
}

/// Builds `arch` for `num_classes` classes from `vb` (fresh weights from a `VarMap`, or loaded
/// ones from safetensors).
pub fn build(arch: Arch, num_classes: usize, vb: VarBuilder) -> Result<Box<dyn Classifier>> {
    Ok(match arch {
        Arch::TinyCnn => Box::new(tiny_cnn::TinyCnn::new(num_classes, vb)?),
        Arch::AllConvNet => Box::new(allconv::AllConvNet::new(num_classes, vb)?),
        Arch::DenseNet40_12 => Box::new(densenet::DenseNet::new(
            densenet::DenseNetConfig::DENSENET_40_12,
            num_classes,
            vb,
        )?),
        Arch::DenseNetBc100_12 => Box::new(densenet::DenseNet::new(
            densenet::DenseNetConfig::BC_100_12,
            num_classes,
            vb,
        )?),
        Arch::Wrn40_2 => Box::new(wide_resnet::WideResNet::wrn_40_2(num_classes, vb)?),
        Arch::ResNet18 => Box::new(resnet::ResNet::new(resnet::Depth::R18, num_classes, vb)?),
        Arch::ResNet34 => Box::new(resnet::ResNet::new(resnet::Depth::R34, num_classes, vb)?),
        Arch::ResNet50 => Box::new(resnet::ResNet::new(resnet::Depth::R50, num_classes, vb)?),
    })
}

/// PyTorch's `nn.BatchNorm2d` defaults: eps 1e-5, momentum 0.1 (candle-nn's momentum has the
/// same meaning: `running = (1 - momentum) * running + momentum * batch_stat`, and like PyTorch
/// it folds the unbiased batch variance into `running_var`).
pub(crate) fn bn_config() -> BatchNormConfig {
    BatchNormConfig {
        eps: 1e-5,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    }
}

/// The references' conv init: `weight.normal_(0, sqrt(2 / (k·k·out_channels)))`, i.e. Kaiming
/// normal, fan-out, ReLU gain.
pub(crate) fn conv_init() -> Init {
    Init::Kaiming {
        dist: candle_nn::init::NormalOrUniform::Normal,
        fan: candle_nn::init::FanInOut::FanOut,
        non_linearity: candle_nn::init::NonLinearity::ReLU,
    }
}

/// Bias-free square conv with the references' init.
pub(crate) fn conv_no_bias(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let ws = vb.get_with_hints((c_out, c_in, k, k), "weight", conv_init())?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(ws, None, cfg))
}

/// `nn.Linear` whose bias the references zero; the weight keeps candle's default init.
pub(crate) fn linear_zero_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    let ws = vb.get_with_hints(
        (c_out, c_in),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bs = vb.get_with_hints(c_out, "bias", Init::Const(0.))?;
    Ok(Linear::new(ws, Some(bs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn names_round_trip() {
        for &arch in Arch::ALL {
            assert_eq!(Arch::from_name(arch.name()), Some(arch));
        }
        assert_eq!(Arch::from_name("densenet"), Some(Arch::DenseNet40_12));
        assert_eq!(Arch::from_name("resnet"), None);
    }

    /// `sum(p.numel() for p in model.parameters())` of the PyTorch reference definitions
    /// (PyTorch 2.15, AugMix's allconv.py / densenet.py / wideresnet.py; tiny-cnn's PyTorch twin).
    #[test]
    fn param_counts_match_pytorch() {
        let pytorch = [
            (Arch::TinyCnn, 10, 94_762),
            (Arch::AllConvNet, 10, 1_409_674),
            (Arch::DenseNet40_12, 10, 1_059_298),
            (Arch::DenseNetBc100_12, 10, 769_162),
            (Arch::Wrn40_2, 10, 2_243_546),
            // torchvision's resnet18/34/50 (11,689,512 / 21,797,672 / 25,557,032 with 1000
            // classes), with a 10-class head.
            (Arch::ResNet18, 10, 11_689_512 - 990 * 513),
            (Arch::ResNet34, 10, 21_797_672 - 990 * 513),
            (Arch::ResNet50, 10, 25_557_032 - 990 * 2049),
        ];
        for (arch, nc, count) in pytorch {
            assert_eq!(param_count(arch, nc), count, "{}", arch.name());
        }
        // The classifier head scales with the classes: (in + 1) per extra class.
        assert_eq!(param_count(Arch::Wrn40_2, 100), 2_243_546 + 90 * 129);
        assert_eq!(param_count(Arch::DenseNet40_12, 100), 1_059_298 + 90 * 457);
    }

    #[test]
    fn output_shapes_and_trainable_vars() {
        let x = Tensor::zeros((3, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        for &arch in Arch::ALL {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let model = build(arch, 7, vb).unwrap();
            for train in [false, true] {
                assert_eq!(
                    model.forward_t(&x, train).unwrap().dims(),
                    &[3, 7],
                    "{}",
                    arch.name()
                );
            }
            let n: usize = trainable_vars(&varmap).iter().map(|v| v.elem_count()).sum();
            assert_eq!(n, param_count(arch, 7), "{}", arch.name());
        }
    }

    /// Convs follow the references' N(0, sqrt(2 / (k·k·out))); BN starts at weight 1, bias 0,
    /// running stats 0/1; linear biases 0.
    #[test]
    fn init_follows_references() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        build(Arch::Wrn40_2, 10, vb).unwrap();
        let data = varmap.data().lock().unwrap();
        let std_of = |name: &str| {
            let v: Vec<f32> = data[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
        };
        // block3.layer.1.conv2: 128×128×3×3, n = 9·128.
        let want = (2.0f64 / (9.0 * 128.0)).sqrt();
        let got = std_of("block3.layer.1.conv2.weight");
        assert!((got / want - 1.0).abs() < 0.02, "std {got} vs {want}");
        let vals = |name: &str| -> Vec<f32> { data[name].as_tensor().to_vec1().unwrap() };
        assert!(vals("bn1.weight").iter().all(|&x| x == 1.0));
        assert!(vals("bn1.bias").iter().all(|&x| x == 0.0));
        assert!(vals("bn1.running_mean").iter().all(|&x| x == 0.0));
        assert!(vals("bn1.running_var").iter().all(|&x| x == 1.0));
        assert!(vals("fc.bias").iter().all(|&x| x == 0.0));
    }
}
