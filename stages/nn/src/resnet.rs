//! torchvision's ImageNet ResNets (He et al., <https://arxiv.org/abs/1512.03385>):
//! ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks), the layout and `state_dict` names
//! of `torchvision.models.resnet*` and of candle-transformers' `models::resnet` (`conv1`,
//! `bn1`, `layer{1..4}.{i}.{conv,bn}{1,2,3}`, `layer{l}.0.downsample.{0,1}`, `fc`), so a user's
//! torchvision checkpoint exported to safetensors loads and can be repaired.
//!
//! Our own definition rather than candle-transformers': theirs applies BatchNorm with running
//! statistics only (no training mode) and its 3×3/stride-2 max-pool has no backward in candle
//! 0.11 ("backward not supported for maxpool2d if ksize != stride"). Here BatchNorm trains as
//! PyTorch's does and the stem's max-pool is built from differentiable ops. The test
//! `resnet_matches_candle_transformers` checks both give the same eval logits on one weights file.

use crate::fast_bn::{batch_norm, BatchNorm};
use crate::fast_conv::Conv2d;
use crate::{conv_no_bias, Classifier};
use candle_core::{Module, ModuleT, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

/// Depths torchvision (and candle-transformers) define.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    R18,
    R34,
    R50,
}

impl Depth {
    /// Blocks per stage and whether they are bottlenecks (expansion 4).
    fn layout(self) -> ([usize; 4], bool) {
        match self {
            Depth::R18 => ([2, 2, 2, 2], false),
            Depth::R34 => ([3, 4, 6, 3], false),
            Depth::R50 => ([3, 4, 6, 3], true),
        }
    }
}

struct Block {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl Block {
    fn new(
        c_in: usize,
        width: usize,
        stride: usize,
        bottleneck: bool,
        vb: VarBuilder,
    ) -> Result<Block> {
        let bn = |c: usize, vb: VarBuilder| batch_norm(c, crate::bn_config(), vb);
        let (convs, c_out) = if bottleneck {
            let c_out = width * 4;
            // torchvision v1.5: the stride sits on the 3×3 conv.
            let convs = vec![
                (
                    conv_no_bias(c_in, width, 1, 1, 0, vb.pp("conv1"))?,
                    bn(width, vb.pp("bn1"))?,
                ),
                (
                    conv_no_bias(width, width, 3, stride, 1, vb.pp("conv2"))?,
                    bn(width, vb.pp("bn2"))?,
                ),
                (
                    conv_no_bias(width, c_out, 1, 1, 0, vb.pp("conv3"))?,
                    bn(c_out, vb.pp("bn3"))?,
                ),
            ];
            (convs, c_out)
        } else {
            let convs = vec![
                (
                    conv_no_bias(c_in, width, 3, stride, 1, vb.pp("conv1"))?,
                    bn(width, vb.pp("bn1"))?,
                ),
                (
                    conv_no_bias(width, width, 3, 1, 1, vb.pp("conv2"))?,
                    bn(width, vb.pp("bn2"))?,
                ),
            ];
            (convs, width)
        };
        let downsample = if stride != 1 || c_in != c_out {
            let vb = vb.pp("downsample");
            Some((
                conv_no_bias(c_in, c_out, 1, stride, 0, vb.pp(0))?,
                bn(c_out, vb.pp(1))?,
            ))
        } else {
            None
        };
        Ok(Block { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = bn.forward_t(&conv.forward(&y)?, train)?;
            if i != last {
                y = y.relu()?;
            }
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (y + identity)?.relu()
    }
}

pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    pub fn new(depth: Depth, num_classes: usize, vb: VarBuilder) -> Result<ResNet> {
        let (counts, bottleneck) = depth.layout();
        let expansion = if bottleneck { 4 } else { 1 };
        let mut blocks = vec![];
        let mut c_in = 64;
        for (stage, &count) in counts.iter().enumerate() {
            let width = 64 << stage;
            let vb_layer = vb.pp(format!("layer{}", stage + 1));
            for i in 0..count {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                blocks.push(Block::new(c_in, width, stride, bottleneck, vb_layer.pp(i))?);
                c_in = width * expansion;
            }
        }
        Ok(ResNet {
            conv1: conv_no_bias(3, 64, 7, 2, 3, vb.pp("conv1"))?,
            bn1: batch_norm(64, crate::bn_config(), vb.pp("bn1"))?,
            blocks,
            fc: candle_nn::linear(c_in, num_classes, vb.pp("fc"))?,
        })
    }
}

/// PyTorch's `MaxPool2d(3, stride=2, padding=1)` from ops candle can differentiate on every
/// device: edge-replicate padding (never changes a window's max, since each padded window
/// holds the value it copies) and the maximum over the nine stride-2 shifted views.
fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let padded = x
        .pad_with_same(D::Minus1, 1, 1)?
        .pad_with_same(D::Minus2, 1, 1)?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let index = |offset: usize, n: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n).map(|i| (offset + 2 * i) as u32).collect();
        Tensor::from_vec(idx, n, x.device())
    };
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = padded.index_select(&index(dy, ho)?, 2)?;
        for dx in 0..3 {
            let view = rows.index_select(&index(dx, wo)?, 3)?;
            out = Some(match out {
                None => view,
                Some(m) => m.maximum(&view)?,
            });
        }
    }
    Ok(out.expect("nine views"))
}

impl Classifier for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let x = self
            .bn1
            .forward_t(&self.conv1.forward(xs)?, train)?
            .relu()?;
        let mut x = max_pool_3x3_s2(&x)?;
        for block in &self.blocks {
            x = block.forward_t(&x, train)?;
        }
        let pooled = x.mean(D::Minus1)?.mean(D::Minus1)?;
        self.fc.forward(&pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_pool_matches_a_direct_loop_and_routes_gradients_to_the_max() {
        let (h, w) = (5, 6);
        let data: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 23) as f32).collect();
        let var = candle_core::Var::from_vec(data.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
        let y = max_pool_3x3_s2(var.as_tensor()).unwrap();
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let (ho, wo) = (3, 3);
        let mut want = vec![];
        for oy in 0..ho {
            for ox in 0..wo {
                let mut m = f32::MIN;
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = ((2 * oy + ky) as i64 - 1, (2 * ox + kx) as i64 - 1);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            m = m.max(data[iy as usize * w + ix as usize]);
                        }
                    }
                }
                want.push(m);
            }
        }
        assert_eq!(got, want);
        // d(sum)/dx: each output's unit gradient lands on its window's (unique here) max.
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((g.iter().sum::<f32>() - (ho * wo) as f32).abs() < 1e-5);
        for (i, &gi) in g.iter().enumerate() {
            if gi > 0.0 {
                assert!(want.contains(&data[i]), "gradient on a non-max element {i}");
            }
        }
    }
}
