//! WCT2 photorealistic style transfer (Yoo et al. 2019, "Photorealistic Style Transfer via
//! Wavelet Transforms"), as DeepRepair's style-transfer augmentation runs it.
//!
//! What the official code does, and this module follows (clovaai/WCT2 `model.py`,
//! `utils/core.py`, and the copy in SaikaQH/DeepRepair `WCT2/transfer.py`):
//! - networks: the `cat5` level-4 encoder and decoder (`wave_encoder_cat5_l4.pth`,
//!   `wave_decoder_cat5_l4.pth`): VGG-like 3×3 convolutions after a reflection pad of 1, ReLU,
//!   and Haar wavelet pooling; the encoder keeps each pooled map's high bands (LH, HL, HH) and the
//!   map itself, and the decoder's unpooling concatenates the unpooled low band with the unpooled
//!   high bands and that map (5× the channels) before the next convolution;
//! - DeepRepair's `StyleTransfer` builds `WCT2(transfer_at={'decoder', 'encoder'},
//!   option_unpool='cat5')` and calls `transfer(..., alpha=1)` with no segmentation: the style's
//!   features are taken after each encoder level (1–4) and after decoder levels 4, 3, 2; the
//!   content goes through the encoder with a WCT after each level, then through the decoder with
//!   a WCT before decoder levels 3, 2, 1 (none before level 4: the style has no such feature when
//!   the encoder is transferred), the skips being the content's own;
//! - images enter as `ToTensor` leaves them, RGB in [0, 1], unnormalized (the encoder's 1×1
//!   `conv0` does the preprocessing); the output is clamped to [0, 1] only when saved. (Its
//!   `open_image` also resizes the shorter side to 32 and centre-crops to multiples of 16:
//!   sizing is left to the caller here, CIFAR images need none);
//! - the WCT (`feature_wct` → `wct_core`): features `[C, N]`; covariance of the centred features
//!   divided by N − 1, **plus the identity** (`svd(..., iden=True)`: the regularization is I, not
//!   a small ε·I), eigen-decomposed, eigenvalues below 1e-5 dropped (`get_rank`; inert, since
//!   every eigenvalue is ≥ 1); content whitened by `E·D^-1/2·Eᵀ`, coloured by the style's
//!   `E·D^1/2·Eᵀ`, plus the style's channel means, clamped to the content feature's global
//!   [min, max], then `alpha·target + (1 − alpha)·content`.
//!
//! The WCT runs on the CPU in f64 with [`linfa_linalg`]'s symmetric eigen-decomposition
//! (`eigh`, Householder tridiagonalization + implicit QR, a port of nalgebra's): the workspace
//! already builds it (stages/repair) and it needs no BLAS/LAPACK. `E·f(D)·Eᵀ` does not depend on
//! the eigenvectors' signs or on the order or basis chosen inside a repeated eigenvalue, so the
//! result matches PyTorch's `torch.svd` up to rounding. When a feature has fewer pixels than
//! channels (level 4 of a 32×32 image: 16 pixels, 512 channels) the same matrix functions of
//! `cov + I` are computed from the pixels' N×N Gram matrix instead (exact, as the identity keeps
//! every eigenvalue ≥ 1): CIFAR-sized transfers never decompose a 512×512 matrix.
//!
//! Convolutions run on the model's device in its dtype (f32 when loaded, as the official code;
//! f64 possible for checks against a float64 reference).

use crate::fast_conv::conv2d;
use crate::weights::{check_tensors, TensorProblem, TensorShapes};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use linfa_linalg::eigh::EighInto;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

/// The official encoder checkpoint's file name.
pub const ENCODER_FILE: &str = "wave_encoder_cat5_l4.pth";
/// The official decoder checkpoint's file name.
pub const DECODER_FILE: &str = "wave_decoder_cat5_l4.pth";
/// The `alpha` DeepRepair passes (`alpha=1`: the transferred features replace the content's).
pub const DEFAULT_ALPHA: f64 = 1.0;
/// `utils/core.py::get_rank`'s threshold on the regularized covariance's eigenvalues.
const RANK_EPS: f64 = 1e-5;
/// Names of the Haar bands, in the order the pooling returns them.
const BANDS: [&str; 4] = ["LL", "LH", "HL", "HH"];

/// A 3×3 (after reflection padding by 1) or 1×1 convolution with bias, PyTorch names
/// `weight` / `bias`.
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

fn conv(vb: VarBuilder, c_in: usize, c_out: usize, k: usize) -> candle_core::Result<Conv> {
    Ok(Conv {
        weight: vb.get((c_out, c_in, k, k), "weight")?,
        bias: vb.get(c_out, "bias")?.reshape((1, c_out, 1, 1))?,
    })
}

impl Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if self.weight.dim(3)? == 3 {
            reflection_pad1(x)?
        } else {
            x.clone()
        };
        conv2d(&x, &self.weight, 0, 1)?.broadcast_add(&self.bias)
    }

    fn relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)?.relu()
    }
}

/// `nn.ReflectionPad2d(1)` on `[N, C, H, W]` (H, W ≥ 2).
fn reflection_pad1(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = Tensor::cat(&[x.narrow(2, 1, 1)?, x.clone(), x.narrow(2, h - 2, 1)?], 2)?;
    Tensor::cat(&[x.narrow(3, 1, 1)?, x.clone(), x.narrow(3, w - 2, 1)?], 3)
}

/// The four depthwise 2×2, stride-2 Haar filters of a `WavePool` / `WaveUnpool`
/// (`LL.weight`, …, each `[C, 1, 2, 2]`), read from the checkpoint like the official
/// `load_state_dict` does, kept as `[1, C, 1, 2, 1, 2]` for broadcasting.
struct Wavelets {
    bands: [Tensor; 4],
}

fn wavelets(vb: VarBuilder, c: usize) -> candle_core::Result<Wavelets> {
    let band = |name: &str| {
        vb.pp(name)
            .get((c, 1, 2, 2), "weight")?
            .reshape((1, c, 1, 2, 1, 2))
    };
    let [ll, lh, hl, hh] = BANDS.map(band);
    Ok(Wavelets {
        bands: [ll?, lh?, hl?, hh?],
    })
}

impl Wavelets {
    /// Depthwise `Conv2d(k=2, s=2)` per band: `[LL, LH, HL, HH]`, each `[1, C, H/2, W/2]`.
    fn pool(&self, x: &Tensor) -> candle_core::Result<[Tensor; 4]> {
        let (n, c, h, w) = x.dims4()?;
        let x = x.reshape((n, c, h / 2, 2, w / 2, 2))?;
        let band = |f: &Tensor| x.broadcast_mul(f)?.sum(5)?.sum(3);
        Ok([
            band(&self.bands[0])?,
            band(&self.bands[1])?,
            band(&self.bands[2])?,
            band(&self.bands[3])?,
        ])
    }

    /// `cat5` unpooling: depthwise `ConvTranspose2d(k=2, s=2)` of each band, then `original`,
    /// concatenated over channels (5C).
    fn unpool(&self, ll: &Tensor, skip: &Skip) -> candle_core::Result<Tensor> {
        let up = |x: &Tensor, f: &Tensor| -> candle_core::Result<Tensor> {
            let (n, c, h, w) = x.dims4()?;
            x.reshape((n, c, h, 1, w, 1))?
                .broadcast_mul(f)?
                .reshape((n, c, 2 * h, 2 * w))
        };
        Tensor::cat(
            &[
                up(ll, &self.bands[0])?,
                up(&skip.high[0], &self.bands[1])?,
                up(&skip.high[1], &self.bands[2])?,
                up(&skip.high[2], &self.bands[3])?,
                skip.original.clone(),
            ],
            1,
        )
    }
}

/// What the encoder keeps at one pooling for the decoder: the high bands `[LH, HL, HH]` and the
/// pooled map itself (the official `skips['pool<k>']` and `skips['conv<k>_<last>']`).
struct Skip {
    high: [Tensor; 3],
    original: Tensor,
}

/// `WaveEncoder('cat5')`.
struct Encoder {
    conv0: Conv,
    conv1_1: Conv,
    conv1_2: Conv,
    pool1: Wavelets,
    conv2_1: Conv,
    conv2_2: Conv,
    pool2: Wavelets,
    conv3_1: Conv,
    conv3_2: Conv,
    conv3_3: Conv,
    conv3_4: Conv,
    pool3: Wavelets,
    conv4_1: Conv,
}

fn encoder(vb: VarBuilder) -> candle_core::Result<Encoder> {
    Ok(Encoder {
        conv0: conv(vb.pp("conv0"), 3, 3, 1)?,
        conv1_1: conv(vb.pp("conv1_1"), 3, 64, 3)?,
        conv1_2: conv(vb.pp("conv1_2"), 64, 64, 3)?,
        pool1: wavelets(vb.pp("pool1"), 64)?,
        conv2_1: conv(vb.pp("conv2_1"), 64, 128, 3)?,
        conv2_2: conv(vb.pp("conv2_2"), 128, 128, 3)?,
        pool2: wavelets(vb.pp("pool2"), 128)?,
        conv3_1: conv(vb.pp("conv3_1"), 128, 256, 3)?,
        conv3_2: conv(vb.pp("conv3_2"), 256, 256, 3)?,
        conv3_3: conv(vb.pp("conv3_3"), 256, 256, 3)?,
        conv3_4: conv(vb.pp("conv3_4"), 256, 256, 3)?,
        pool3: wavelets(vb.pp("pool3"), 256)?,
        conv4_1: conv(vb.pp("conv4_1"), 256, 512, 3)?,
    })
}

fn pool_with_skip(
    pool: &Wavelets,
    x: Tensor,
    skips: &mut Vec<Skip>,
) -> candle_core::Result<Tensor> {
    let [ll, lh, hl, hh] = pool.pool(&x)?;
    skips.push(Skip {
        high: [lh, hl, hh],
        original: x,
    });
    Ok(ll)
}

impl Encoder {
    /// One level of the official `encode(x, skips, level)` for `cat5`; pushes this level's
    /// [`Skip`] (levels 2–4).
    fn encode(
        &self,
        x: &Tensor,
        level: usize,
        skips: &mut Vec<Skip>,
    ) -> candle_core::Result<Tensor> {
        match level {
            1 => self.conv1_1.relu(&self.conv0.forward(x)?),
            2 => {
                let out = self.conv1_2.relu(x)?;
                self.conv2_1.relu(&pool_with_skip(&self.pool1, out, skips)?)
            }
            3 => {
                let out = self.conv2_2.relu(x)?;
                self.conv3_1.relu(&pool_with_skip(&self.pool2, out, skips)?)
            }
            _ => {
                let out = self.conv3_2.relu(x)?;
                let out = self.conv3_3.relu(&out)?;
                let out = self.conv3_4.relu(&out)?;
                self.conv4_1.relu(&pool_with_skip(&self.pool3, out, skips)?)
            }
        }
    }
}

/// `WaveDecoder('cat5')`.
struct Decoder {
    conv4_1: Conv,
    recon_block3: Wavelets,
    conv3_4_2: Conv,
    conv3_3: Conv,
    conv3_2: Conv,
    conv3_1: Conv,
    recon_block2: Wavelets,
    conv2_2_2: Conv,
    conv2_1: Conv,
    recon_block1: Wavelets,
    conv1_2_2: Conv,
    conv1_1: Conv,
}

fn decoder(vb: VarBuilder) -> candle_core::Result<Decoder> {
    Ok(Decoder {
        conv4_1: conv(vb.pp("conv4_1"), 512, 256, 3)?,
        recon_block3: wavelets(vb.pp("recon_block3"), 256)?,
        conv3_4_2: conv(vb.pp("conv3_4_2"), 5 * 256, 256, 3)?,
        conv3_3: conv(vb.pp("conv3_3"), 256, 256, 3)?,
        conv3_2: conv(vb.pp("conv3_2"), 256, 256, 3)?,
        conv3_1: conv(vb.pp("conv3_1"), 256, 128, 3)?,
        recon_block2: wavelets(vb.pp("recon_block2"), 128)?,
        conv2_2_2: conv(vb.pp("conv2_2_2"), 5 * 128, 128, 3)?,
        conv2_1: conv(vb.pp("conv2_1"), 128, 64, 3)?,
        recon_block1: wavelets(vb.pp("recon_block1"), 64)?,
        conv1_2_2: conv(vb.pp("conv1_2_2"), 5 * 64, 64, 3)?,
        conv1_1: conv(vb.pp("conv1_1"), 64, 3, 3)?,
    })
}

impl Decoder {
    /// One level of the official `decode(x, skips, level)` for `cat5`; `skips` as the encoder
    /// pushed them (pool1, pool2, pool3).
    fn decode(&self, x: &Tensor, level: usize, skips: &[Skip]) -> candle_core::Result<Tensor> {
        match level {
            4 => {
                let out = self.conv4_1.relu(x)?;
                let out = self
                    .conv3_4_2
                    .relu(&self.recon_block3.unpool(&out, &skips[2])?)?;
                let out = self.conv3_3.relu(&out)?;
                self.conv3_2.relu(&out)
            }
            3 => {
                let out = self.conv3_1.relu(x)?;
                self.conv2_2_2
                    .relu(&self.recon_block2.unpool(&out, &skips[1])?)
            }
            2 => {
                let out = self.conv2_1.relu(x)?;
                self.conv1_2_2
                    .relu(&self.recon_block1.unpool(&out, &skips[0])?)
            }
            _ => self.conv1_1.forward(x),
        }
    }
}

/// WCT2 (`cat5`, level 4) with the official transfer of DeepRepair: at the encoder and the
/// decoder, no masks. Build with [`Wct2::load`] (official checkpoints) or
/// [`Wct2::from_varbuilders`].
pub struct Wct2 {
    encoder: Encoder,
    decoder: Decoder,
    device: Device,
    dtype: DType,
}

impl Wct2 {
    /// Builds from two [`VarBuilder`]s holding the encoder's and the decoder's `state_dict`
    /// tensors under their PyTorch names (`conv1_1.weight`, `pool1.LL.weight`,
    /// `recon_block3.HH.weight`, `conv3_4_2.bias`, …; see [`Wct2::expected_tensors`]). Runs on
    /// the encoder builder's device and in its dtype: f32 as the official code (and
    /// [`Wct2::load`]), or f64 for a float64 twin of a PyTorch reference.
    pub fn from_varbuilders(
        encoder_vb: VarBuilder,
        decoder_vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let device = encoder_vb.device().clone();
        let dtype = encoder_vb.dtype();
        if !dtype.is_float() {
            candle_core::bail!("WCT2 needs a float dtype, got {dtype:?}");
        }
        Ok(Wct2 {
            encoder: encoder(encoder_vb)?,
            decoder: decoder(decoder_vb.set_dtype(dtype).set_device(device.clone()))?,
            device,
            dtype,
        })
    }

    /// The `(name, shape)` of every tensor of the encoder's and of the decoder's `state_dict`,
    /// in construction order.
    pub fn expected_tensors() -> (TensorShapes, TensorShapes) {
        (
            record(|vb| encoder(vb).map(drop)),
            record(|vb| decoder(vb).map(drop)),
        )
    }

    /// Loads the official checkpoints [`ENCODER_FILE`] and [`DECODER_FILE`] from `dir` (PyTorch
    /// pickles, legacy or zip format: see [`read_pth`]) onto `device`. Checks them as PyTorch's
    /// strict `load_state_dict` would and reports every missing file, or every missing,
    /// mis-shaped and unexpected tensor of both files, at once.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, Wct2LoadError> {
        let paths = [dir.join(ENCODER_FILE), dir.join(DECODER_FILE)];
        let missing: Vec<PathBuf> = paths.iter().filter(|p| !p.is_file()).cloned().collect();
        if !missing.is_empty() {
            return Err(Wct2LoadError::MissingFiles(missing));
        }
        let (enc_expected, dec_expected) = Self::expected_tensors();
        let mut maps = Vec::new();
        let mut problems = Vec::new();
        for (path, expected) in paths.iter().zip([&enc_expected, &dec_expected]) {
            let tensors = read_pth(path)?;
            let found: HashMap<String, Vec<usize>> = tensors
                .iter()
                .map(|(name, t)| (name.clone(), t.dims().to_vec()))
                .collect();
            problems.extend(
                check_tensors(expected, &found)
                    .into_iter()
                    .map(|p| (path.clone(), p)),
            );
            maps.push(tensors);
        }
        if !problems.is_empty() {
            return Err(Wct2LoadError::Mismatch { problems });
        }
        let dec = maps.pop().expect("two checkpoints");
        let enc = maps.pop().expect("two checkpoints");
        Ok(Self::from_varbuilders(
            VarBuilder::from_tensors(enc, DType::F32, device),
            VarBuilder::from_tensors(dec, DType::F32, device),
        )?)
    }

    /// The device the networks run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Stylizes `content` with `style`: both `[1, 3, H, W]` RGB in [0, 1] (H, W may differ
    /// between the two; each a multiple of 8 and at least 16), any float dtype (computed in the
    /// model's). `alpha` blends each transferred feature with the content's (`alpha·wct + (1 −
    /// alpha)·content`, [`DEFAULT_ALPHA`] = 1 in DeepRepair). Returns `[1, 3, H, W]` in the
    /// model's dtype, unclamped (the official code clamps to [0, 1] when saving).
    pub fn transfer(
        &self,
        content: &Tensor,
        style: &Tensor,
        alpha: f64,
    ) -> candle_core::Result<Tensor> {
        let content = self.check_image("content", content)?;
        let style = self.check_image("style", style)?;

        // The style's features: after each encoder level, then after decoder levels 4, 3, 2.
        let mut skips = Vec::new();
        let mut x = style;
        let mut style_encoder = Vec::with_capacity(4);
        for level in 1..=4 {
            x = self.encoder.encode(&x, level, &mut skips)?;
            style_encoder.push(x.clone());
        }
        let mut style_decoder = Vec::with_capacity(3);
        for level in [4, 3, 2] {
            x = self.decoder.decode(&x, level, &skips)?;
            style_decoder.push(x.clone());
        }

        let mut skips = Vec::new();
        let mut x = content;
        for (level, style_feature) in (1..=4).zip(&style_encoder) {
            x = self.encoder.encode(&x, level, &mut skips)?;
            x = feature_wct(&x, style_feature, alpha)?;
        }
        for level in [4, 3, 2, 1] {
            if level < 4 {
                // Decoder level l gets the style's feature after decoder level l + 1.
                x = feature_wct(&x, &style_decoder[3 - level], alpha)?;
            }
            x = self.decoder.decode(&x, level, &skips)?;
        }
        Ok(x)
    }

    /// [`Wct2::transfer`] on 8-bit RGB images, row-major HWC, both `width`×`height`: scaled to
    /// [0, 1], stylized, clamped to [0, 1] and rounded as torchvision's `save_image` does
    /// (`⌊255x + 0.5⌋`).
    pub fn stylize_u8(
        &self,
        content: &[u8],
        style: &[u8],
        width: usize,
        height: usize,
        alpha: f64,
    ) -> candle_core::Result<Vec<u8>> {
        let to_tensor = |name: &str, data: &[u8]| -> candle_core::Result<Tensor> {
            if data.len() != width * height * 3 {
                candle_core::bail!(
                    "WCT2: {name} image has {} bytes, expected {width}×{height}×3 = {}",
                    data.len(),
                    width * height * 3
                );
            }
            Tensor::from_slice(data, (height, width, 3), &self.device)?
                .to_dtype(self.dtype)?
                .affine(1.0 / 255.0, 0.0)?
                .permute((2, 0, 1))?
                .unsqueeze(0)
        };
        let out = self.transfer(
            &to_tensor("content", content)?,
            &to_tensor("style", style)?,
            alpha,
        )?;
        out.squeeze(0)?
            .to_dtype(DType::F32)?
            .clamp(0f32, 1f32)?
            .affine(255.0, 0.5)?
            .floor()?
            .permute((1, 2, 0))?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1()
    }

    fn check_image(&self, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let ok_dims = dims.len() == 4 && dims[0] == 1 && dims[1] == 3;
        if !ok_dims {
            candle_core::bail!("WCT2: {name} must be [1, 3, H, W], got {dims:?}");
        }
        let (h, w) = (dims[2], dims[3]);
        if h % 8 != 0 || w % 8 != 0 || h < 16 || w < 16 {
            candle_core::bail!(
                "WCT2: {name} is {h}×{w}; height and width must be multiples of 8 (three wavelet \
                 poolings) and at least 16 (reflection padding at 1/8 scale)"
            );
        }
        x.to_device(&self.device)?.to_dtype(self.dtype)
    }
}

/// The official `feature_wct` without masks: `alpha·WCT(content, style) + (1 − alpha)·content`
/// for features `[1, C, H, W]` and `[1, C, Hs, Ws]` (see the module doc). Computed in f64 on the
/// CPU; returns `content`'s dtype and device.
pub fn feature_wct(content: &Tensor, style: &Tensor, alpha: f64) -> candle_core::Result<Tensor> {
    let to_matrix = |x: &Tensor| -> candle_core::Result<Array2<f64>> {
        let (n, c, h, w) = x.dims4()?;
        if n != 1 {
            candle_core::bail!("feature_wct: batch must be 1, got {n}");
        }
        let data = x
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Array2::from_shape_vec((c, h * w), data).map_err(candle_core::Error::wrap)
    };
    let c = to_matrix(content)?;
    let s = to_matrix(style)?;
    if c.nrows() != s.nrows() {
        candle_core::bail!(
            "feature_wct: content has {} channels, style {}",
            c.nrows(),
            s.nrows()
        );
    }
    let target = wct(c.view(), s.view()).map_err(candle_core::Error::wrap)?;
    let blended: Vec<f64> = target
        .iter()
        .zip(c.iter())
        .map(|(t, x)| alpha * t + (1.0 - alpha) * x)
        .collect();
    Tensor::from_vec(blended, content.shape(), &Device::Cpu)?
        .to_dtype(content.dtype())?
        .to_device(content.device())
}

/// `wct_core` without masks on `[C, N]` content and `[C, Ns]` style features.
fn wct(content: ArrayView2<f64>, style: ArrayView2<f64>) -> linfa_linalg::Result<Array2<f64>> {
    let lo = content.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = content.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (content, _) = centred(content);
    let (style, style_mean) = centred(style);
    let whiten = covariance_power(&content, -0.5)?;
    let colour = covariance_power(&style, 0.5)?;
    let mut target = colour.dot(&whiten.dot(&content));
    target += &style_mean.insert_axis(Axis(1));
    target.mapv_inplace(|v| v.clamp(lo, hi));
    Ok(target)
}

/// `x` less its row means, and the means.
fn centred(x: ArrayView2<f64>) -> (Array2<f64>, Array1<f64>) {
    let mean = x.mean_axis(Axis(1)).expect("features have pixels");
    let centred = &x - &mean.view().insert_axis(Axis(1));
    (centred, mean)
}

/// `(cov + I)^p` for centred features `x: [C, N]`, `cov = x·xᵀ / (N − 1)` (`/ 1` when N = 1),
/// eigenvalues below [`RANK_EPS`] dropped as `get_rank` does.
fn covariance_power(x: &Array2<f64>, p: f64) -> linfa_linalg::Result<Array2<f64>> {
    let (c, n) = x.dim();
    let scale = if n > 1 {
        1.0 / ((n - 1) as f64).sqrt()
    } else {
        1.0
    };
    let y = x * scale;
    if n < c {
        // cov = y·yᵀ has the nonzero eigenvalues μ of the Gram matrix g = yᵀ·y = Q·diag(μ)·Qᵀ,
        // with eigenvectors y·q/√μ; on their complement cov + I is I. Hence
        // (cov + I)^p = I + (y·Q)·diag(((1 + μ)^p − 1)/μ)·(y·Q)ᵀ, and no eigenvalue (all ≥ 1)
        // falls under RANK_EPS.
        let (mu, q) = y.t().dot(&y).eigh_into()?;
        let f = mu.mapv(|m| {
            let m = m.max(0.0);
            if m == 0.0 {
                p
            } else {
                (p * m.ln_1p()).exp_m1() / m
            }
        });
        let yq = y.dot(&q);
        let mut out = (&yq * &f.insert_axis(Axis(0))).dot(&yq.t());
        let mut diag = out.diag_mut();
        diag += 1.0;
        Ok(out)
    } else {
        let mut cov = y.dot(&y.t());
        let mut diag = cov.diag_mut();
        diag += 1.0;
        let (e, v) = cov.eigh_into()?;
        // get_rank keeps the eigenvalues ≥ RANK_EPS (all of them if none is).
        let any_kept = e.iter().any(|&e| e >= RANK_EPS);
        let d = e.mapv(|e| {
            if e >= RANK_EPS || !any_kept {
                e.powf(p)
            } else {
                0.0
            }
        });
        Ok((&v * &d.insert_axis(Axis(0))).dot(&v.t()))
    }
}

/// Why [`Wct2::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Wct2LoadError {
    #[error("WCT2 checkpoint(s) not found: {}", list_paths(.0))]
    MissingFiles(Vec<PathBuf>),
    #[error("reading WCT2 checkpoint {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "WCT2 checkpoints do not fit the cat5 level-4 encoder/decoder ({n} problem(s)):\n{list}",
        n = problems.len(),
        list = list_problems(problems)
    )]
    Mismatch {
        /// Each problem with the file it is in: expected tensors first (construction order),
        /// then unexpected ones, per file.
        problems: Vec<(PathBuf, TensorProblem)>,
    },
    #[error("building WCT2: {0}")]
    Build(#[from] candle_core::Error),
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_problems(problems: &[(PathBuf, TensorProblem)]) -> String {
    let mut out = String::new();
    for (i, (path, problem)) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = write!(out, "  {}: {problem}", path.display());
    }
    out
}

fn record(build: impl FnOnce(VarBuilder) -> candle_core::Result<()>) -> TensorShapes {
    crate::weights::record_tensors(build).expect("building WCT2 on zeros cannot fail")
}

// ---- PyTorch checkpoints ----

/// Where a tensor lies in a checkpoint: storage key, dtype, offset and strides in elements.
struct StoredTensor {
    storage: String,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Reads the tensors of a PyTorch `torch.save(state_dict)` file, both the legacy format
/// (PyTorch < 1.6, which the official WCT2 checkpoints — PyTorch 0.4.1 — use: a sequence of
/// pickles then raw storages) and the zip format, on the CPU in their stored dtype (f32, f64,
/// f16, bf16). Follows strides, so expanded (stride-0) tensors such as the official wavelet
/// filters read correctly. A `{"state_dict": ...}` wrapper is looked through. candle's own
/// `pickle::read_all` reads only the zip format and contiguous tensors.
pub fn read_pth(path: &Path) -> Result<HashMap<String, Tensor>, Wct2LoadError> {
    let err = |reason: String| Wct2LoadError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let (specs, storages) = if bytes.starts_with(b"PK\x03\x04") {
        read_zip(&bytes)
    } else {
        read_legacy(&bytes)
    }
    .map_err(err)?;
    let mut out = HashMap::new();
    for (name, spec) in specs {
        let storage = storages
            .get(&spec.storage)
            .ok_or_else(|| err(format!("{name}: storage {} not in the file", spec.storage)))?;
        let tensor = gather(&spec, storage).map_err(|e| err(format!("{name}: {e}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

type Specs = Vec<(String, StoredTensor)>;

fn read_pickle(bytes: &[u8]) -> Result<(Object, usize), String> {
    let mut cursor = Cursor::new(bytes);
    let mut stack = Stack::empty();
    stack.read_loop(&mut cursor).map_err(|e| e.to_string())?;
    let obj = stack.finalize().map_err(|e| e.to_string())?;
    Ok((obj, cursor.position() as usize))
}

fn read_zip(bytes: &[u8]) -> Result<(Specs, HashMap<String, Vec<u8>>), String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or("no data.pkl in the zip archive")?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let mut data = Vec::new();
    zip.by_name(&pkl)
        .and_then(|mut f| f.read_to_end(&mut data).map_err(Into::into))
        .map_err(|e| e.to_string())?;
    let (obj, _) = read_pickle(&data)?;
    let specs = state_dict_specs(obj)?;
    let mut storages = HashMap::new();
    for (_, spec) in &specs {
        if storages.contains_key(&spec.storage) {
            continue;
        }
        let mut raw = Vec::new();
        zip.by_name(&format!("{prefix}data/{}", spec.storage))
            .and_then(|mut f| f.read_to_end(&mut raw).map_err(Into::into))
            .map_err(|e| format!("storage {}: {e}", spec.storage))?;
        storages.insert(spec.storage.clone(), raw);
    }
    Ok((specs, storages))
}

/// The legacy format: pickles of the magic number, the protocol version, the system info, the
/// object, the list of storage keys; then per key its element count (i64 LE) and raw data.
fn read_legacy(bytes: &[u8]) -> Result<(Specs, HashMap<String, Vec<u8>>), String> {
    // Protocol 2, LONG1 of 10 bytes: 0x1950a86a20f9469cfc6c, STOP. (candle's LONG1 decoder
    // takes at most 8 bytes, so this one is matched here.)
    const MAGIC: [u8; 15] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ];
    if !bytes.starts_with(&MAGIC) {
        return Err("neither a zip nor a legacy PyTorch file (bad magic number)".into());
    }
    let mut pos = MAGIC.len();
    let mut next = |what: &str| -> Result<Object, String> {
        let (obj, used) = read_pickle(&bytes[pos..]).map_err(|e| format!("{what}: {e}"))?;
        pos += used;
        Ok(obj)
    };
    next("protocol version")?;
    next("system info")?;
    let specs = state_dict_specs(next("state dict")?)?;
    let keys = match next("storage keys")? {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| k.unicode().map_err(|k| format!("storage key {k:?}")))
            .collect::<Result<Vec<_>, _>>()?,
        other => return Err(format!("storage keys: expected a list, got {other:?}")),
    };
    let elem_size: HashMap<&str, usize> = specs
        .iter()
        .map(|(_, s)| (s.storage.as_str(), s.dtype.size_in_bytes()))
        .collect();
    let mut storages = HashMap::new();
    for key in keys {
        let size = *elem_size
            .get(key.as_str())
            .ok_or_else(|| format!("storage {key} used by no tensor: its size is unknown"))?;
        let count = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("storage {key}: file truncated"))?;
        let count = i64::from_le_bytes(count.try_into().expect("8 bytes")) as usize;
        pos += 8;
        let data = bytes
            .get(pos..pos + count * size)
            .ok_or_else(|| format!("storage {key}: file truncated"))?;
        pos += count * size;
        storages.insert(key, data.to_vec());
    }
    Ok((specs, storages))
}

/// The tensors of a pickled state dict (non-tensor entries such as `_metadata` skipped).
fn state_dict_specs(obj: Object) -> Result<Specs, String> {
    let Object::Dict(entries) = obj else {
        return Err(format!("expected a state dict, got {}", describe(&obj)));
    };
    let mut specs = Vec::new();
    let mut wrapped = None;
    for (key, value) in entries {
        let Object::Unicode(name) = key else { continue };
        if name == "state_dict" && matches!(value, Object::Dict(_)) {
            wrapped = Some(value);
            continue;
        }
        if let Some(spec) = tensor_spec(value).map_err(|e| format!("{name}: {e}"))? {
            specs.push((name, spec));
        }
    }
    match wrapped {
        Some(inner) if specs.is_empty() => state_dict_specs(inner),
        _ => Ok(specs),
    }
}

fn describe(obj: &Object) -> String {
    let text = format!("{obj:?}");
    text.chars().take(80).collect()
}

/// A tensor's storage and layout from its pickled `_rebuild_tensor_v2(storage, offset, size,
/// stride, ...)` (possibly inside `_rebuild_parameter` or `_rebuild_from_type_v2`); `None` for
/// anything else.
fn tensor_spec(value: Object) -> Result<Option<StoredTensor>, String> {
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let Object::Class {
        module_name,
        class_name,
    } = *callable
    else {
        return Ok(None);
    };
    let mut args = match *args {
        Object::Tuple(args) => args,
        _ => return Ok(None),
    };
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {}
        ("torch._utils", "_rebuild_parameter") if !args.is_empty() => {
            return tensor_spec(args.swap_remove(0));
        }
        ("torch._tensor", "_rebuild_from_type_v2") if args.len() >= 3 => {
            let inner_args = args.swap_remove(2);
            let func = args.swap_remove(0);
            return tensor_spec(Object::Reduce {
                callable: Box::new(func),
                args: Box::new(inner_args),
            });
        }
        _ => return Ok(None),
    }
    if args.len() < 4 {
        return Err("_rebuild_tensor with fewer than 4 arguments".into());
    }
    let stride = usizes(args.swap_remove(3))?;
    let shape = usizes(args.swap_remove(2))?;
    let mut offset = usize_of(args.swap_remove(1))?;
    let Object::PersistentLoad(storage) = args.swap_remove(0) else {
        return Err("tensor storage is not a persistent id".into());
    };
    let Object::Tuple(mut storage) = *storage else {
        return Err("storage id is not a tuple".into());
    };
    if storage.len() < 5 {
        return Err("storage id has fewer than 5 fields".into());
    }
    // ('storage', StorageType, key, location, numel[, view_metadata]) — the legacy format's
    // view_metadata (view key, offset, size) puts the tensor's storage inside the root one.
    if let Some(Object::Tuple(view)) = storage.get(5) {
        if view.len() == 3 {
            offset += usize_of(view[1].clone())?;
        }
    }
    let key = match storage.swap_remove(2) {
        Object::Unicode(k) => k,
        Object::Int(k) => k.to_string(),
        other => return Err(format!("storage key {}", describe(&other))),
    };
    let Object::Class { class_name, .. } = storage.swap_remove(1) else {
        return Err("storage type is not a class".into());
    };
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        other => return Err(format!("unsupported storage type {other}")),
    };
    if stride.len() != shape.len() {
        return Err(format!("size {shape:?} with stride {stride:?}"));
    }
    Ok(Some(StoredTensor {
        storage: key,
        dtype,
        offset,
        shape,
        stride,
    }))
}

fn usize_of(obj: Object) -> Result<usize, String> {
    match obj {
        Object::Int(v) if v >= 0 => Ok(v as usize),
        Object::Long(v) if v >= 0 => Ok(v as usize),
        other => Err(format!(
            "expected a non-negative integer, got {}",
            describe(&other)
        )),
    }
}

fn usizes(obj: Object) -> Result<Vec<usize>, String> {
    match obj {
        Object::Tuple(items) | Object::List(items) => items.into_iter().map(usize_of).collect(),
        other => Err(format!(
            "expected a tuple of integers, got {}",
            describe(&other)
        )),
    }
}

/// Copies the tensor's elements out of its storage (little-endian), row-major.
fn gather(spec: &StoredTensor, storage: &[u8]) -> Result<Tensor, String> {
    let size = spec.dtype.size_in_bytes();
    let count: usize = spec.shape.iter().product();
    let mut out = Vec::with_capacity(count * size);
    if count > 0 {
        let last = spec.offset
            + spec
                .shape
                .iter()
                .zip(&spec.stride)
                .map(|(n, s)| (n - 1) * s)
                .sum::<usize>();
        if (last + 1) * size > storage.len() {
            return Err(format!(
                "layout (offset {}, size {:?}, stride {:?}) beyond its storage of {} elements",
                spec.offset,
                spec.shape,
                spec.stride,
                storage.len() / size
            ));
        }
        let mut index = vec![0usize; spec.shape.len()];
        for _ in 0..count {
            let at = spec.offset
                + index
                    .iter()
                    .zip(&spec.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&storage[at * size..(at + 1) * size]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < spec.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }
    Tensor::from_raw_buffer(&out, spec.dtype, &spec.shape, &Device::Cpu).map_err(|e| e.to_string())
}
