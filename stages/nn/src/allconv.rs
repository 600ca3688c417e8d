//! AllConvNet (Springenberg et al., <https://arxiv.org/abs/1412.6806>) as in AugMix's
//! `models/cifar/allconv.py`: `features` is an `nn.Sequential` of
//! `[96, 96, 96, 'Md', 192, 192, 192, 'Md', 'nopad', 'NIN', 'NIN', 'A']`, each conv followed by
//! BatchNorm and the sigmoid-approximated GELU `sigmoid(1.702 x) * x`; `'Md'` is a 2×2 max-pool
//! then dropout 0.5; the two `'NIN'` 1×1 convs keep `padding=1` (so the map grows 6→8→10) and
//! `'A'` is an 8×8 average pool (stride 8, which on 10×10 reads the top-left 8×8 only).
//! ~1.4M parameters.
//!
//! State-dict names: `features.{i}.weight/bias` for the conv at Sequential index `i`,
//! `features.{i+1}.{weight,bias,running_mean,running_var}` for its BatchNorm, and
//! `classifier.{weight,bias}`.

use crate::fast_bn::{batch_norm, max_pool2, Activation, BatchNorm};
use crate::fast_conv::Conv2d;
use crate::{conv_init, Classifier};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, Linear, VarBuilder};

/// One entry of the reference's `cfg` list.
#[derive(Clone, Copy, Debug)]
enum Cfg {
    Conv(usize),
    MaxPoolDropout,
    NoPad,
    Nin,
    AvgPool,
}

const CFG: [Cfg; 12] = [
    Cfg::Conv(96),
    Cfg::Conv(96),
    Cfg::Conv(96),
    Cfg::MaxPoolDropout,
    Cfg::Conv(192),
    Cfg::Conv(192),
    Cfg::Conv(192),
    Cfg::MaxPoolDropout,
    Cfg::NoPad,
    Cfg::Nin,
    Cfg::Nin,
    Cfg::AvgPool,
];

enum Layer {
    ConvBnGelu(Conv2d, BatchNorm),
    MaxPoolDropout,
    AvgPool,
}

pub struct AllConvNet {
    features: Vec<Layer>,
    classifier: Linear,
}

/// The reference's `GELU`: `sigmoid(1.702 x) * x`.
pub fn gelu_sigmoid(xs: &Tensor) -> Result<Tensor> {
    Activation::GeluSigmoid.apply_tensor(xs)
}

/// Conv2d with bias; weight ~ N(0, sqrt(2 / (k·k·out))) as the reference, bias candle's default.
fn conv_bias(
    c_in: usize,
    c_out: usize,
    k: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let ws = vb.get_with_hints((c_out, c_in, k, k), "weight", conv_init())?;
    let bound = 1. / (c_in as f64).sqrt();
    let bs = vb.get_with_hints(
        c_out,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let cfg = Conv2dConfig {
        padding,
        ..Default::default()
    };
    Ok(Conv2d::new(ws, Some(bs), cfg))
}

impl AllConvNet {
    pub const WIDTH1: usize = 96;
    pub const WIDTH2: usize = 192;

    pub fn new(num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let vf = vb.pp("features");
        let mut features = Vec::new();
        let mut idx = 0usize;
        let mut c_in = 3usize;
        for cfg in CFG {
            let (c_out, k, pad) = match cfg {
                Cfg::MaxPoolDropout => {
                    features.push(Layer::MaxPoolDropout);
                    idx += 2;
                    continue;
                }
                Cfg::AvgPool => {
                    features.push(Layer::AvgPool);
                    idx += 1;
                    continue;
                }
                Cfg::Conv(v) => (v, 3, 1),
                Cfg::NoPad => (c_in, 3, 0),
                Cfg::Nin => (c_in, 1, 1),
            };
            let conv = conv_bias(c_in, c_out, k, pad, vf.pp(idx.to_string()))?;
            let bn = batch_norm(c_out, crate::bn_config(), vf.pp((idx + 1).to_string()))?;
            features.push(Layer::ConvBnGelu(conv, bn));
            idx += 3;
            c_in = c_out;
        }
        let classifier = crate::linear_zero_bias(Self::WIDTH2, num_classes, vb.pp("classifier"))?;
        Ok(AllConvNet {
            features,
            classifier,
        })
    }
}

impl Classifier for AllConvNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = xs.clone();
        for layer in &self.features {
            x = match layer {
                Layer::ConvBnGelu(conv, bn) => {
                    bn.forward_activated_t(&conv.forward(&x)?, train, Activation::GeluSigmoid)?
                }
                Layer::MaxPoolDropout => {
                    let x = max_pool2(&x)?;
                    if train {
                        candle_nn::ops::dropout(&x, 0.5)?
                    } else {
                        x
                    }
                }
                Layer::AvgPool => x.avg_pool2d(8)?,
            };
        }
        self.classifier.forward(&x.flatten_from(1)?)
    }
}
