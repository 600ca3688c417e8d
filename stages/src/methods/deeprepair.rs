//! DeepRepair (Algorithm 1): AugMix whose first op per chain may be a style op that carries a
//! collected failure's style (its reference sampled by k-means cluster or uniformly).

use super::augmix::{augmix_params, AugmixParams, AugmixSource, StyleGuide};
use super::{reference_class_param, MethodSetup, MethodSource, RepairMethod};
use crate::style::{style_transfer_from_params, StyleChoice};
use deeprepair_data::Dataset;
use deeprepair_pipeline::{ParamSpec, ParamType};
use deeprepair_repair::reference_sampling::{ClassReferenceSampler, ReferenceClass, Sampling};
use deeprepair_repair::style_transfer::WaveletStyle;
use deeprepair_train::trainer::BatchSource;
use serde_json::{json, Value};

/// Algorithm 1's chance that a chain's first op is a style op: N = 5 style ops among 9 + 5.
pub const STYLE_PROB_ALGORITHM_1: f64 = 5.0 / 14.0;

pub struct DeepRepair;

impl RepairMethod for DeepRepair {
    fn name(&self) -> &'static str {
        "deeprepair"
    }
    fn description(&self) -> &'static str {
        "repair with DeepRepair: style-guided AugMix with failure images as style references"
    }
    /// Algorithm 1 trains DeepRepair on Dt; the failures enter as style references.
    fn default_train_on(&self) -> &'static str {
        "train"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut p = augmix_params();
        p.push(ParamSpec::optional(
            "variant",
            ParamType::Choice(&["cluster", "uniform"]),
            json!("cluster"),
            "reference sampling: k-means clusters (Eq. 4) or uniform",
        ));
        p.push(ParamSpec::optional(
            "clusters",
            ParamType::Int,
            json!(5),
            "k-means clusters per class",
        ));
        p.push(ParamSpec::optional(
            "style_prob",
            ParamType::Float,
            json!(STYLE_PROB_ALGORITHM_1),
            "probability that a chain's first op is a style op: Algorithm 1 draws it \
             uniformly from O ∪ O^c, 9 general ops and N = 5 style ops, so 5/14",
        ));
        p.push(ParamSpec::optional(
            "reference_class",
            ParamType::Choice(&["any", "same"]),
            json!("any"),
            "style references from all of Dc whatever the image's class (Algorithm 1, \
             the official code), or from the image's own class only",
        ));
        p.extend(crate::style::style_params());
        p
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        StyleChoice::validate(params)?;
        let p = params["style_prob"]
            .as_f64()
            .unwrap_or(STYLE_PROB_ALGORITHM_1);
        if !(0.0..=1.0).contains(&p) {
            return Err((
                "style_prob".into(),
                format!("{p} is not a probability (0 to 1)"),
            ));
        }
        Ok(())
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        StyleChoice::fingerprint(params)
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        let v: String = setup.ctx.param("variant")?;
        let sampling = if v == "uniform" {
            Sampling::Uniform
        } else {
            Sampling::Cluster {
                clusters: setup.ctx.param("clusters")?,
            }
        };
        let reference_class = reference_class_param(setup.ctx)?;
        // In [0, 1]: `validate` checked it when the manifest was planned.
        let prob: f64 = setup.ctx.param("style_prob")?;
        let transfer = style_transfer_from_params(setup.ctx)?;
        setup.ctx.log(format!(
            "DeepRepair: {v} reference sampling from {} of Dc ({} failures), style op \
             first with probability {prob:.4}, {} style transfer",
            match reference_class {
                ReferenceClass::Any => "all",
                ReferenceClass::Same => "the image's class",
            },
            setup.failures.len(),
            transfer.name()
        ));
        let sampler = ClassReferenceSampler::new(
            &setup.failures.images,
            &setup.failures.labels,
            setup.failures.image_len(),
            sampling,
            reference_class,
            setup.seed,
        )?;
        let source = Box::new(AugmixSource {
            params: AugmixParams::from_ctx(setup.ctx)?,
            style: Some(StyleGuide {
                references: setup.failures.clone(),
                sampler,
                transfer,
                prob,
            }),
        });
        Ok(MethodSource {
            source,
            variant: Some(v),
        })
    }
}

/// DeepRepair's batch source with the stage's defaults: each chain's first op is, with
/// probability `style_prob` (Algorithm 1: [`STYLE_PROB_ALGORITHM_1`]), the wavelet style op
/// with a failure of any class as reference (k-means sampling over Dc, 5 clusters).
pub fn deeprepair_source(
    failures: &Dataset,
    style_prob: f64,
    seed: u64,
) -> anyhow::Result<Box<dyn BatchSource>> {
    anyhow::ensure!(
        !failures.is_empty(),
        "DeepRepair needs failure images as references"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&style_prob),
        "style probability {style_prob} outside [0, 1]"
    );
    let sampler = ClassReferenceSampler::new(
        &failures.images,
        &failures.labels,
        failures.image_len(),
        Sampling::Cluster { clusters: 5 },
        ReferenceClass::Any,
        seed,
    )?;
    Ok(Box::new(AugmixSource {
        params: AugmixParams::DEFAULT,
        style: Some(StyleGuide {
            references: failures.clone(),
            sampler,
            transfer: Box::new(WaveletStyle::default()),
            prob: style_prob,
        }),
    }))
}
