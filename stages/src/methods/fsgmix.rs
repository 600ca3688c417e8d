//! FSGMix (the "Few-Shot" baseline): per failure, mixing weights over seven operations learned
//! by gradient descent (Eq. 1); a GMM fitted to them; each view mixes with sampled weights.

use super::{image_ref, MethodSetup, MethodSource, RepairMethod};
use crate::artifacts::ModelInfo;
use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use deeprepair_data::Dataset;
use deeprepair_pipeline::{ParamSpec, ParamType};
use deeprepair_repair::fsgmix_ops;
use deeprepair_repair::weight_distribution::{WeightDistribution, WeightModel};
use deeprepair_repair::ImageRef;
use deeprepair_train::trainer::{
    cropped_views, item_rng, to_unit, BatchSeed, BatchSource, Scorer, TrainBatch, TrainData,
};
use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde_json::json;

pub struct Fsgmix;

impl RepairMethod for Fsgmix {
    fn name(&self) -> &'static str {
        "fsgmix"
    }
    fn description(&self) -> &'static str {
        "repair with FSGMix: operation weights learned from failures, GMM-sampled mixing"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![
            ParamSpec::optional(
                "variant",
                ParamType::Choice(&["gmm", "mvn", "fixed"]),
                json!("gmm"),
                "weight distribution (the paper's ablation)",
            ),
            ParamSpec::optional("components", ParamType::Int, json!(3), "GMM components"),
            ParamSpec::optional(
                "weight_steps",
                ParamType::Int,
                json!(30),
                "gradient steps of Eq. 1 per failure",
            ),
            ParamSpec::optional(
                "weight_lr",
                ParamType::Float,
                json!(0.5),
                "learning rate of Eq. 1",
            ),
            ParamSpec::optional("severity", ParamType::Int, json!(3), "operation severity"),
        ];
        p.push(ParamSpec::optional(
            "alpha",
            ParamType::Float,
            json!(1.0),
            "Beta(α, α) blend with the original",
        ));
        p
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        let v: String = setup.ctx.param("variant")?;
        let wm = match v.as_str() {
            "mvn" => WeightModel::Mvn,
            "fixed" => WeightModel::Fixed,
            _ => WeightModel::Gmm {
                components: setup.ctx.param("components")?,
            },
        };
        let severity: f64 = setup.ctx.param::<i64>("severity")? as f64;
        let steps: usize = setup.ctx.param("weight_steps")?;
        let lr: f64 = setup.ctx.param("weight_lr")?;
        let weights = learn_fsgmix_weights(
            setup.base,
            setup.varmap,
            setup.failures,
            severity,
            steps,
            lr,
            setup.seed,
            setup.device,
        )?;
        let m = weights.len() / 7;
        let array =
            ndarray::Array2::from_shape_vec((m, 7), weights.iter().map(|&w| w as f64).collect())
                .map_err(anyhow::Error::from)?;
        let dist = WeightDistribution::fit(&array, wm, setup.seed)?;
        setup.ctx.log(format!(
            "FSGMix: learned {m} weight vectors, mean {:?}",
            dist.means.first().map(|v| v
                .iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>())
        ));
        let source = Box::new(FsgmixSource {
            dist,
            severity,
            alpha: setup.ctx.param("alpha")?,
        });
        Ok(MethodSource {
            source,
            variant: Some(v),
        })
    }
}

struct FsgmixSource {
    dist: WeightDistribution,
    severity: f64,
    alpha: f64,
}

impl BatchSource for FsgmixSource {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        cropped_views(data, indices, seed, 3, |base, _, rng| {
            let view = |rng: &mut rand_chacha::ChaCha8Rng| -> anyhow::Result<Vec<f32>> {
                let views = fsgmix_ops::views(&image_ref(base, data), self.severity, rng);
                let w = normalized(self.dist.sample(rng));
                let aug = fsgmix_ops::mix(&views, &w)?;
                // Blend with the original as AugMix's final step (m ~ Beta(α, α)).
                let m: f32 = Beta::new(self.alpha, self.alpha)?.sample(rng) as f32;
                Ok(base
                    .iter()
                    .zip(aug)
                    .map(|(&x, a)| (1.0 - m) * x as f32 / 255.0 + m * a)
                    .collect())
            };
            let a1 = view(rng)?;
            let a2 = view(rng)?;
            Ok(vec![to_unit(base), a1, a2])
        })
    }
}

/// Sampled weights scaled to sum 1 (uniform when all are 0), matching the convex mix the
/// weights were learned with.
fn normalized(w: Vec<f64>) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    if total <= 1e-12 {
        vec![1.0 / w.len() as f64; w.len()]
    } else {
        w.iter().map(|v| v / total).collect()
    }
}

/// FSGMix Eq. 1: per failure image, weights w ∈ [0, 1]^7 minimizing the model's cross-entropy
/// on the mix of its seven views, by projected gradient descent from a random start (model in
/// eval mode, its weights frozen). Returns `M × 7` weights, row-major.
///
/// Divergence from the paper's `Σ w_i Î_i`: we mix convexly, `Σ w_i Î_i / Σ w_i`, and keep
/// w ≥ 0.01. Un-normalized, the descent finds the degenerate optimum w = 0 (a black image the
/// model happens to label "right" for some classes) where the clamp to [0, 1] has no gradient
/// and every weight stays 0; normalized, w only chooses between the operations, which is what
/// the GMM is meant to capture.
#[allow(clippy::too_many_arguments)]
fn learn_fsgmix_weights(
    info: &ModelInfo,
    varmap: &candle_nn::VarMap,
    failures: &Dataset,
    severity: f64,
    steps: usize,
    lr: f64,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    let model = deeprepair_nn::build_detached(info.arch()?, info.num_classes, varmap, device)?;
    let (h, w) = (failures.height, failures.width);
    let per = h * w * 3;
    let mut out = Vec::with_capacity(failures.len() * 7);
    for start in (0..failures.len()).step_by(128) {
        let end = (start + 128).min(failures.len());
        let m = end - start;
        let mut views = Vec::with_capacity(m * 7 * per);
        let mut init = Vec::with_capacity(m * 7);
        for i in start..end {
            let mut rng = item_rng(seed, i as u64);
            let v = fsgmix_ops::views(
                &ImageRef {
                    pixels: failures.image(i),
                    width: w,
                    height: h,
                },
                severity,
                &mut rng,
            );
            for view in &v {
                views.extend(view.iter().map(|&x| x as f32 / 255.0));
            }
            init.extend((0..7).map(|_| rng.random::<f32>()));
        }
        let views = Tensor::from_vec(views, (m, 7, per), device)?;
        let labels =
            Tensor::from_slice(&failures.labels[start..end], m, device)?.to_dtype(DType::U32)?;
        let weights = Var::from_tensor(&Tensor::from_vec(init, (m, 7), device)?)?;
        for _ in 0..steps {
            // Σ_i w_i·view_i, clamped to the image range, to NCHW, normalized.
            let w_t = weights.as_tensor();
            let mixed = w_t
                .unsqueeze(2)?
                .broadcast_mul(&views)?
                .sum(1)?
                .broadcast_div(&w_t.sum_keepdim(1)?)?;
            let x = mixed
                .reshape((m, h, w, 3))?
                .permute((0, 3, 1, 2))?
                .affine(2.0, -1.0)?;
            let logits = model.forward_t(&x, false)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            let g = grads
                .get(weights.as_tensor())
                .context("no gradient for the FSGMix weights")?;
            // Mean loss → per-image gradients are 1/m of each image's own; undo that.
            let step = (g * (lr * m as f64))?;
            weights.set(&(weights.as_tensor() - step)?.clamp(0.01f32, 1f32)?)?;
        }
        out.extend(weights.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}
