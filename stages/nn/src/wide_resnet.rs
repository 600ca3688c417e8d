//! Wide ResNet (Zagoruyko & Komodakis, <https://arxiv.org/abs/1605.07146>) as in AugMix's
//! `third_party/WideResNet_pytorch/wideresnet.py`, pre-activation basic blocks, dropout rate 0
//! (so no dropout layer). [`WideResNet::wrn_40_2`] is WRN-40-2 (~2.24M parameters).
//!
//! State-dict names: `conv1.weight`, `block{b}.layer.{i}.{bn1,conv1,bn2,conv2}` and, where a
//! block changes width, `block{b}.layer.{i}.conv_shortcut.weight`; `bn1.*`, `fc.{weight,bias}`.

use crate::fast_bn::{batch_norm, BatchNorm};
use crate::fast_conv::Conv2d;
use crate::{conv_no_bias, Classifier};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

struct BasicBlock {
    bn1: BatchNorm,
    conv1: Conv2d,
    bn2: BatchNorm,
    conv2: Conv2d,
    /// Present when `in_planes != out_planes` (the reference's `not is_in_equal_out`).
    conv_shortcut: Option<Conv2d>,
}

impl BasicBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(conv_no_bias(
                c_in,
                c_out,
                1,
                stride,
                0,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(BasicBlock {
            bn1: batch_norm(c_in, crate::bn_config(), vb.pp("bn1"))?,
            conv1: conv_no_bias(c_in, c_out, 3, stride, 1, vb.pp("conv1"))?,
            bn2: batch_norm(c_out, crate::bn_config(), vb.pp("bn2"))?,
            conv2: conv_no_bias(c_out, c_out, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let act = self.bn1.forward_relu_t(x, train)?;
        let out = self.bn2.forward_relu_t(&self.conv1.forward(&act)?, train)?;
        let out = self.conv2.forward(&out)?;
        match &self.conv_shortcut {
            // Width changes: the shortcut reads the activated input.
            Some(sc) => sc.forward(&act)? + out,
            None => x + out,
        }
    }
}

pub struct WideResNet {
    conv1: Conv2d,
    blocks: Vec<BasicBlock>,
    bn1: BatchNorm,
    fc: Linear,
}

impl WideResNet {
    /// `WideResNet(depth, num_classes, widen_factor, drop_rate=0.0)`.
    pub fn new(
        depth: usize,
        widen_factor: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if depth < 4 || !(depth - 4).is_multiple_of(6) {
            candle_core::bail!("wide resnet depth must be 6n + 4, got {depth}")
        }
        let n = (depth - 4) / 6;
        let ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor];
        let conv1 = conv_no_bias(3, ch[0], 3, 1, 1, vb.pp("conv1"))?;
        let mut blocks = Vec::with_capacity(3 * n);
        for (b, stride) in [1usize, 2, 2].into_iter().enumerate() {
            let vl = vb.pp(format!("block{}", b + 1)).pp("layer");
            for i in 0..n {
                let (c_in, s) = if i == 0 {
                    (ch[b], stride)
                } else {
                    (ch[b + 1], 1)
                };
                blocks.push(BasicBlock::new(c_in, ch[b + 1], s, vl.pp(i.to_string()))?);
            }
        }
        let bn1 = batch_norm(ch[3], crate::bn_config(), vb.pp("bn1"))?;
        let fc = crate::linear_zero_bias(ch[3], num_classes, vb.pp("fc"))?;
        Ok(WideResNet {
            conv1,
            blocks,
            bn1,
            fc,
        })
    }

    /// WRN-40-2, dropout 0.
    pub fn wrn_40_2(num_classes: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(40, 2, num_classes, vb)
    }
}

impl Classifier for WideResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.conv1.forward(xs)?;
        for block in &self.blocks {
            x = block.forward_t(&x, train)?;
        }
        let x = self.bn1.forward_relu_t(&x, train)?.avg_pool2d(8)?;
        self.fc.forward(&x.flatten_from(1)?)
    }
}
