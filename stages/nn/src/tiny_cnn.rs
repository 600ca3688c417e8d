//! tiny-cnn: three conv–BN–ReLU blocks (32, 64, 128 channels; 2×2 max-pool after the first
//! two), global average pool, linear. ~94k parameters; fast enough to train on a laptop CPU.

use crate::fast_bn::{batch_norm, max_pool2, BatchNorm};
use crate::fast_conv::Conv2d;
use crate::Classifier;
use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Conv2dConfig, Linear, VarBuilder};

pub struct TinyCnn {
    convs: Vec<(Conv2d, BatchNorm)>,
    fc: Linear,
}

impl TinyCnn {
    pub const CHANNELS: [usize; 3] = [32, 64, 128];

    pub fn new(num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::new();
        let mut c_in = 3;
        for (i, &c_out) in Self::CHANNELS.iter().enumerate() {
            let w = vb.pp(format!("features.conv{i}")).get_with_hints(
                (c_out, c_in, 3, 3),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?;
            let conv = Conv2d::new(w, None, cfg);
            let bn = batch_norm(c_out, 1e-5, vb.pp(format!("features.bn{i}")))?;
            convs.push((conv, bn));
            c_in = c_out;
        }
        let fc = linear(c_in, num_classes, vb.pp("fc"))?;
        Ok(TinyCnn { convs, fc })
    }
}

impl Classifier for TinyCnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = xs.clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            x = bn.forward_relu_t(&conv.forward(&x)?, train)?;
            if i < 2 {
                x = max_pool2(&x)?;
            }
        }
        self.fc.forward(&x.mean((2, 3))?)
    }
}
