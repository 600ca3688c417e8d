//! AugMix (Hendrycks et al. 2020): chains of operations mixed with Dirichlet weights, blended
//! with the original, trained with a JSD consistency loss over clean + two augmented views.
//! Its batch source also carries DeepRepair's style guide ([`super::deeprepair`]).

use super::{image_ref, MethodSetup, MethodSource, RepairMethod};
use deeprepair_data::Dataset;
use deeprepair_pipeline::{ParamSpec, ParamType, StageCtx};
use deeprepair_repair::augmix_ops::{augment_and_mix_with, OpKind, AUGMIX_OPERATIONS};
use deeprepair_repair::fsgmix_ops::FSGMIX_OPS;
use deeprepair_repair::reference_sampling::ClassReferenceSampler;
use deeprepair_repair::style_transfer::StyleTransfer;
use deeprepair_repair::ImageRef;
use deeprepair_train::trainer::{
    cropped_views, to_unit, BatchSeed, BatchSource, Scorer, TrainBatch, TrainData,
};
use rand::Rng;
use serde_json::json;

pub struct Augmix;

impl RepairMethod for Augmix {
    fn name(&self) -> &'static str {
        "augmix"
    }
    fn description(&self) -> &'static str {
        "repair by fine-tuning with AugMix (JSD consistency)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut p = augmix_params();
        p.push(ParamSpec::optional(
            "ops",
            ParamType::Choice(&["augmix9", "fsgmix7"]),
            json!("augmix9"),
            "operation set: AugMix's nine, or FSGMix's seven composite operations drawn \
             with AugMix's independent sampling (FSGMix's AugMix baseline, footnote 2)",
        ));
        p
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        let ops: String = setup.ctx.param("ops")?;
        Ok(MethodSource {
            source: Box::new(AugmixSource {
                params: AugmixParams::from_ctx(setup.ctx)?,
                style: None,
            }),
            variant: (ops != "augmix9").then_some(ops),
        })
    }
}

/// The AugMix params `augmix` and `deeprepair` share.
pub(crate) fn augmix_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional("severity", ParamType::Int, json!(3), "AugMix severity"),
        ParamSpec::optional("width", ParamType::Int, json!(3), "chains per view"),
        ParamSpec::optional(
            "depth",
            ParamType::Int,
            json!(-1),
            "ops per chain (-1: random 1-3)",
        ),
        ParamSpec::optional(
            "alpha",
            ParamType::Float,
            json!(1.0),
            "Dirichlet/Beta parameter",
        ),
    ]
}

/// AugMix's batch source with the paper's defaults (severity 3, width 3, depth 1–3, α = 1):
/// clean + two augmented views per image, as the `augmix` stage trains (benchmarks use it).
pub fn augmix_source() -> Box<dyn BatchSource> {
    Box::new(AugmixSource {
        params: AugmixParams::DEFAULT,
        style: None,
    })
}

#[derive(Clone, Copy)]
pub(crate) struct AugmixParams {
    /// The operation set O (each operation a chain of kinds).
    pub(crate) ops: &'static [&'static [OpKind]],
    pub(crate) severity: f64,
    pub(crate) width: usize,
    pub(crate) depth: Option<usize>,
    pub(crate) alpha: f64,
}

impl AugmixParams {
    /// The `augmix`/`deeprepair` stages' param defaults.
    pub(crate) const DEFAULT: AugmixParams = AugmixParams {
        ops: &AUGMIX_OPERATIONS,
        severity: 3.0,
        width: 3,
        depth: None,
        alpha: 1.0,
    };

    pub(crate) fn from_ctx(ctx: &StageCtx) -> anyhow::Result<Self> {
        let depth: i64 = ctx.param("depth")?;
        let ops: Option<String> = ctx.param("ops").ok();
        Ok(AugmixParams {
            ops: match ops.as_deref() {
                Some("fsgmix7") => &FSGMIX_OPS,
                _ => &AUGMIX_OPERATIONS,
            },
            severity: ctx.param::<i64>("severity")? as f64,
            width: ctx.param("width")?,
            depth: (depth > 0).then_some(depth as usize),
            alpha: ctx.param("alpha")?,
        })
    }
}

/// DeepRepair's style operations O^c: a failure image (of any class, or of the image's own;
/// sampled by cluster or uniformly) lends its style.
pub(crate) struct StyleGuide {
    pub(crate) references: Dataset,
    pub(crate) sampler: ClassReferenceSampler,
    pub(crate) transfer: Box<dyn StyleTransfer>,
    pub(crate) prob: f64,
}

pub(crate) struct AugmixSource {
    pub(crate) params: AugmixParams,
    pub(crate) style: Option<StyleGuide>,
}

impl AugmixSource {
    /// One augmented view: AugMix's `augment_and_mix`, or with a style guide DeepRepair's
    /// variant where each chain's first op is drawn from O ∪ O^c.
    pub(crate) fn view<R: Rng>(
        &self,
        img: &ImageRef,
        label: u8,
        rng: &mut R,
    ) -> anyhow::Result<Vec<f32>> {
        let p = self.params;
        augment_and_mix_with(
            img,
            p.ops,
            p.severity,
            p.width,
            p.depth,
            p.alpha,
            rng,
            |current, rng: &mut R| {
                let Some(style) = &self.style else {
                    return Ok(None);
                };
                if rng.random::<f64>() >= style.prob {
                    return Ok(None);
                }
                let r = style.sampler.sample(label, rng);
                let reference = ImageRef {
                    pixels: style.references.image(r),
                    ..*img
                };
                Ok(Some(style.transfer.stylize(current, &reference)?))
            },
        )
    }
}

impl BatchSource for AugmixSource {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        cropped_views(data, indices, seed, 3, |base, label, rng| {
            let r = image_ref(base, data);
            Ok(vec![
                to_unit(base),
                self.view(&r, label, rng)?,
                self.view(&r, label, rng)?,
            ])
        })
    }
}
