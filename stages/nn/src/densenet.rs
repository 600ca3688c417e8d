//! DenseNet (Huang et al., <https://arxiv.org/abs/1608.06993>) as in AugMix's
//! `third_party/ResNeXt_DenseNet/models/densenet.py`: a 3×3 stem conv to `2·growth` channels,
//! three dense blocks separated by transitions (BN–ReLU–1×1 conv–2×2 average pool), then
//! BN–ReLU–8×8 average pool–linear. Pre-activation layers: `SingleLayer` (BN–ReLU–3×3 conv) or,
//! with `bottleneck`, `Bottleneck` (BN–ReLU–1×1 conv to 4·growth–BN–ReLU–3×3 conv); each
//! concatenates its input with its `growth` new channels.
//!
//! [`DenseNetConfig::DENSENET_40_12`] is the reference's `densenet()` (growth 12, depth 40,
//! reduction 1, no bottleneck; ~1.06M parameters); [`DenseNetConfig::BC_100_12`] is DenseNet-BC
//! (depth 100, bottleneck, reduction 0.5; ~0.77M parameters).
//!
//! State-dict names: `conv1.weight`, `dense{b}.{i}.bn1.*`, `dense{b}.{i}.conv1.weight`
//! (+ `bn2`, `conv2` with bottleneck), `trans{b}.bn1.*`, `trans{b}.conv1.weight`, `bn1.*`,
//! `fc.{weight,bias}`.

use crate::fast_bn::{batch_norm, BatchNorm};
use crate::fast_conv::Conv2d;
use crate::{conv_no_bias, Classifier};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// The reference constructor's arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseNetConfig {
    pub growth_rate: usize,
    pub depth: usize,
    pub reduction: f64,
    pub bottleneck: bool,
}

impl DenseNetConfig {
    /// `densenet()` of the reference: `DenseNet(12, 40, 1., num_classes, False)`.
    pub const DENSENET_40_12: DenseNetConfig = DenseNetConfig {
        growth_rate: 12,
        depth: 40,
        reduction: 1.0,
        bottleneck: false,
    };
    /// DenseNet-BC-100 (k = 12): `DenseNet(12, 100, 0.5, num_classes, True)`.
    pub const BC_100_12: DenseNetConfig = DenseNetConfig {
        growth_rate: 12,
        depth: 100,
        reduction: 0.5,
        bottleneck: true,
    };

    /// Layers per dense block.
    pub fn layers_per_block(&self) -> usize {
        if self.bottleneck {
            (self.depth - 4) / 6
        } else {
            (self.depth - 4) / 3
        }
    }
}

/// `SingleLayer` (bottleneck = None) or `Bottleneck`.
struct DenseLayer {
    bn1: BatchNorm,
    conv1: Conv2d,
    bottleneck: Option<(BatchNorm, Conv2d)>,
}

impl DenseLayer {
    fn new(n_channels: usize, growth: usize, bottleneck: bool, vb: VarBuilder) -> Result<Self> {
        let bn1 = batch_norm(n_channels, crate::bn_config(), vb.pp("bn1"))?;
        if bottleneck {
            let inter = 4 * growth;
            let conv1 = conv_no_bias(n_channels, inter, 1, 1, 0, vb.pp("conv1"))?;
            let bn2 = batch_norm(inter, crate::bn_config(), vb.pp("bn2"))?;
            let conv2 = conv_no_bias(inter, growth, 3, 1, 1, vb.pp("conv2"))?;
            Ok(DenseLayer {
                bn1,
                conv1,
                bottleneck: Some((bn2, conv2)),
            })
        } else {
            let conv1 = conv_no_bias(n_channels, growth, 3, 1, 1, vb.pp("conv1"))?;
            Ok(DenseLayer {
                bn1,
                conv1,
                bottleneck: None,
            })
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut out = self.conv1.forward(&self.bn1.forward_relu_t(x, train)?)?;
        if let Some((bn2, conv2)) = &self.bottleneck {
            out = conv2.forward(&bn2.forward_relu_t(&out, train)?)?;
        }
        Tensor::cat(&[x, &out], 1)
    }
}

struct Transition {
    bn1: BatchNorm,
    conv1: Conv2d,
}

impl Transition {
    fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Transition {
            bn1: batch_norm(c_in, crate::bn_config(), vb.pp("bn1"))?,
            conv1: conv_no_bias(c_in, c_out, 1, 1, 0, vb.pp("conv1"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.conv1
            .forward(&self.bn1.forward_relu_t(x, train)?)?
            .avg_pool2d(2)
    }
}

pub struct DenseNet {
    conv1: Conv2d,
    dense: [Vec<DenseLayer>; 3],
    trans: [Transition; 2],
    bn1: BatchNorm,
    fc: Linear,
}

impl DenseNet {
    pub fn new(cfg: DenseNetConfig, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let growth = cfg.growth_rate;
        let n_layers = cfg.layers_per_block();
        let make_dense = |mut c: usize, vb: VarBuilder| -> Result<(Vec<DenseLayer>, usize)> {
            let mut layers = Vec::with_capacity(n_layers);
            for i in 0..n_layers {
                layers.push(DenseLayer::new(
                    c,
                    growth,
                    cfg.bottleneck,
                    vb.pp(i.to_string()),
                )?);
                c += growth;
            }
            Ok((layers, c))
        };
        let reduce = |c: usize| (c as f64 * cfg.reduction).floor() as usize;

        let c = 2 * growth;
        let conv1 = conv_no_bias(3, c, 3, 1, 1, vb.pp("conv1"))?;
        let (dense1, c) = make_dense(c, vb.pp("dense1"))?;
        let trans1 = Transition::new(c, reduce(c), vb.pp("trans1"))?;
        let (dense2, c) = make_dense(reduce(c), vb.pp("dense2"))?;
        let trans2 = Transition::new(c, reduce(c), vb.pp("trans2"))?;
        let (dense3, c) = make_dense(reduce(c), vb.pp("dense3"))?;
        let bn1 = batch_norm(c, crate::bn_config(), vb.pp("bn1"))?;
        let fc = crate::linear_zero_bias(c, num_classes, vb.pp("fc"))?;
        Ok(DenseNet {
            conv1,
            dense: [dense1, dense2, dense3],
            trans: [trans1, trans2],
            bn1,
            fc,
        })
    }
}

impl Classifier for DenseNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.conv1.forward(xs)?;
        for (b, block) in self.dense.iter().enumerate() {
            for layer in block {
                x = layer.forward_t(&x, train)?;
            }
            if let Some(trans) = self.trans.get(b) {
                x = trans.forward_t(&x, train)?;
            }
        }
        let x = self.bn1.forward_relu_t(&x, train)?.avg_pool2d(8)?;
        self.fc.forward(&x.flatten_from(1)?)
    }
}
