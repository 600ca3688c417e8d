//! The repair methods, one stage kind each, all fine-tuning the base model on the collected
//! failures Dc_k (optionally with the training data): they differ only in their
//! [`BatchSource`] — how a batch of images becomes training views and targets.
//!
//! | kind        | views | loss            | augmentation                                           |
//! |-------------|-------|-----------------|--------------------------------------------------------|
//! | finetune    | 1     | CE              | crop + flip (FT-woAug)                                 |
//! | cutout      | 1     | CE              | crop + flip + one 16-px hole (fill: CIFAR mean)        |
//! | mixup       | 1     | soft CE         | crop + flip, batch mixup (α = 1)                       |
//! | cutmix      | 1     | soft CE         | crop + flip, batch cutmix (β = 1, p = 0.5)             |
//! | sensei      | 1     | CE              | crop + flip, worst of a GA population of transforms    |
//! | augmix      | 3     | CE + 12·JSD     | AugMix: width 3, depth 1–3, severity 3, α = 1          |
//! | fsgmix      | 3     | CE + 12·JSD     | 7 ops mixed with weights sampled from a GMM fitted on  |
//! |             |       |                 | weights learned per failure by gradient descent (Eq. 1)|
//! | deeprepair  | 3     | CE + 12·JSD     | AugMix whose first op per chain may be a style op that |
//! |             |       |                 | carries a sampled failure's style (Algorithm 1)        |
//! | randaugment | 1     | CE              | crop + flip, N = 3 of AugMix's ops + identity at M = 4 |

//!
//! Adding a method: a file here implementing [`RepairMethod`] and one line in [`all`]; the
//! stage kind, `deeprepair kinds`, `deeprepair repair --method` and its help follow.

mod augmix;
mod cutmix;
mod cutout;
mod deeprepair;
mod finetune;
mod fsgmix;
mod mixup;
mod randaugment;
mod sensei;

pub use augmix::augmix_source;
pub use deeprepair::{deeprepair_source, STYLE_PROB_ALGORITHM_1};

use crate::artifacts::{ensure_same_classes, model_artifact, read_dataset, ModelInfo};
use crate::model_kinds::{curve_artifact, stage_error, train_data};
use crate::stage_training::{
    input_model, rank_devices, run_training, train_config, training_params,
    validate_training_params, InputModel, RankModel,
};
use anyhow::Context;
use candle_core::Device;
use candle_nn::VarMap;
use deeprepair_data::Dataset;
use deeprepair_pipeline::{
    Artifact, InputSpec, ParamSpec, ParamType, Resources, StageCtx, StageError, StageKind,
};
use deeprepair_repair::reference_sampling::ReferenceClass;
use deeprepair_repair::ImageRef;
use deeprepair_train::trainer::{BatchSource, Monitor, TrainData};
use serde_json::{json, Value};

/// Every repair method, in the order `kinds` and `--method` list them. Registering a method is
/// one line here.
pub fn all() -> [&'static dyn RepairMethod; 9] {
    [
        &finetune::Finetune,
        &cutout::Cutout,
        &mixup::Mixup,
        &cutmix::Cutmix,
        &sensei::Sensei,
        &augmix::Augmix,
        &fsgmix::Fsgmix,
        &deeprepair::DeepRepair,
        &randaugment::RandAugment,
    ]
}

/// The method of that name.
pub fn find(name: &str) -> Option<&'static dyn RepairMethod> {
    all().into_iter().find(|m| m.name() == name)
}

/// One repair method: its name and params, and how it turns images into training batches.
/// Everything else (loading the model and data, training, the outputs) is [`RepairKind`]'s.
pub trait RepairMethod: Send + Sync {
    /// The stage kind's name (`finetune`, `augmix`, …).
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// What it fine-tunes on unless `train_on` says otherwise: the paper's baselines train on
    /// Dt and the collected failures (Sec. 4.1).
    fn default_train_on(&self) -> &'static str {
        "train+failures"
    }
    /// Its params beyond the training ones every repair has.
    fn params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    /// Checks of its params at plan time: `Err((param, message))`.
    fn validate(&self, _params: &Value) -> Result<(), (String, String)> {
        Ok(())
    }
    /// What outside the params its output depends on (e.g. weight files), for the stage key.
    fn fingerprint(&self, _params: &Value) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// True when its batch source holds state that ranks in separate processes could not
    /// share (SENSEI's populations): the stage then runs on one rank.
    fn single_rank(&self) -> bool {
        false
    }
    /// The batch source for this stage, and the variant the report shows (if any).
    fn batch_source(&self, setup: &mut MethodSetup<'_, '_>) -> anyhow::Result<MethodSource>;
}

/// What a method may use to build its batch source.
pub struct MethodSetup<'a, 'c> {
    pub ctx: &'a mut StageCtx<'c>,
    /// The collected failures Dc_k.
    pub failures: &'a Dataset,
    /// What the repair trains on (per `train_on`).
    pub data: &'a TrainData<'a>,
    pub base: &'a ModelInfo,
    pub varmap: &'a VarMap,
    pub device: &'a Device,
    pub seed: u64,
}

/// A method's batch source and its variant label.
pub struct MethodSource {
    pub source: Box<dyn BatchSource>,
    pub variant: Option<String>,
}

impl MethodSource {
    pub fn plain(source: impl BatchSource + 'static) -> MethodSource {
        MethodSource {
            source: Box::new(source),
            variant: None,
        }
    }
}

/// The stage kind of a repair method.
pub struct RepairKind(pub &'static dyn RepairMethod);

/// The `train_on` choices.
const TRAIN_ON: [&str; 3] = ["train", "failures", "train+failures"];

impl StageKind for RepairKind {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn version(&self) -> &'static str {
        // 2: DeepRepair's Algorithm 1 defaults, best-epoch keeping, the `ops` of augmix.
        // 3: issue 13's CPU kernels (GEMM convolutions, fused BatchNorm + activation) change
        // the floats; AllConvNet's max-pool gradient is no longer scaled by 1/4.
        // 4: stride-1 convolutions as shifted GEMMs (taps) sum in another order.
        "4"
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut p = training_params(10, 0.01, 128, Monitor::ValLoss);
        p.push(ParamSpec::optional(
            "train_on",
            ParamType::Choice(&TRAIN_ON),
            json!(self.0.default_train_on()),
            "what the repair fine-tunes on: the training data (`train` input), the collected \
             failures, or both",
        ));
        p.extend(self.0.params());
        p
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                many: false,
                optional: false,
                help: "the base model",
            },
            InputSpec {
                name: "failures",
                many: false,
                optional: false,
                help: "the collected failures (Dc_k)",
            },
            InputSpec {
                name: "train",
                many: false,
                optional: true,
                help: "training data (for train_on: train+failures)",
            },
            InputSpec {
                name: "validation",
                many: false,
                optional: true,
                help: "validation images for early stopping (patience)",
            },
        ]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["model", "metrics"]
    }
    fn resources(&self, params: &Value) -> Resources {
        let mut r = crate::stage_training::model_resources(params, 4096);
        if self.0.single_rank() {
            r.ranks = 1;
        }
        r
    }
    fn estimate(&self, params: &Value) -> f64 {
        params["epochs"].as_f64().unwrap_or(1.0)
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        validate_training_params(params)?;
        self.0.validate(params)
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        self.0.fingerprint(params)
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let method = self.0;
        let config = train_config(ctx)?;
        let ranks: usize = ctx.param("ranks")?;
        let devices = rank_devices(ctx, ranks)?;
        let InputModel {
            info: base_info,
            varmap,
            model,
            device,
        } = input_model(ctx, "model")?;
        // Ranks 1.. get their own copy of the model on their device.
        let mut replicas: Vec<RankModel> = Vec::with_capacity(ranks);
        if devices.len() > 1 {
            let artifact = ctx.input("model")?;
            for d in &devices[1..] {
                let (vm, m) = crate::artifacts::load_model(&artifact.bytes, &base_info, d)?;
                replicas.push((vm, m, d.clone()));
            }
        }
        let (failures, finfo) = read_dataset(&ctx.input("failures")?)?;
        ensure_same_classes(&base_info, &failures, "input `failures`")?;
        if failures.is_empty() {
            return Err(StageError::Fatal(anyhow::anyhow!(
                "no collected failures to repair from"
            )));
        }
        let train_on: String = ctx.param("train_on")?;
        let data_set = if train_on == "failures" {
            failures.clone()
        } else {
            let (train, _) = read_dataset(
                &ctx.input("train")
                    .with_context(|| format!("train_on: {train_on} needs a `train` input"))?,
            )?;
            ensure_same_classes(&base_info, &train, "input `train`")?;
            if train_on == "train" {
                train
            } else {
                concat(&train, &failures)?
            }
        };
        ctx.log(format!(
            "training on {train_on}: {} images ({} collected failures)",
            data_set.len(),
            failures.len()
        ));
        let data = train_data(&data_set);
        let MethodSource {
            source,
            mut variant,
        } = method.batch_source(&mut MethodSetup {
            ctx,
            failures: &failures,
            data: &data,
            base: &base_info,
            varmap: &varmap,
            device: &device,
            seed: config.seed,
        })?;
        let val = if ctx.has_input("validation") {
            let (v, _) = read_dataset(&ctx.input("validation")?)?;
            ensure_same_classes(&base_info, &v, "input `validation`")?;
            Some(v)
        } else {
            None
        };
        let val_data = val.as_ref().map(train_data);
        replicas.insert(0, (varmap, model, device));
        let outcome = run_training(ctx, &replicas, &data, val_data.as_ref(), &*source, &config)
            .map_err(|e| stage_error(ctx, e))?;
        let varmap = &replicas[0].0;
        // What a repair trained on is part of its row in the report whenever it is not the
        // method's default (FSGMix's Table I compares D_f alone with D_o ∪ D_f).
        if train_on != method.default_train_on() {
            let tag = match train_on.as_str() {
                "failures" => "failures-only".to_string(),
                other => format!("on {other}"),
            };
            variant = Some(variant.map_or(tag.clone(), |v| format!("{v}, {tag}")));
        }
        let info = ModelInfo {
            method: method.name().into(),
            variant,
            repaired_for: finfo.corruption.clone(),
            seed: config.seed,
            ..base_info
        };
        Ok(vec![
            model_artifact(varmap, &info)?,
            curve_artifact(&outcome)?,
        ])
    }
}

/// The `reference_class` param (of `deeprepair` and `style-check`).
pub fn reference_class_param(ctx: &StageCtx) -> anyhow::Result<ReferenceClass> {
    let v: String = ctx.param("reference_class")?;
    match v.as_str() {
        "any" => Ok(ReferenceClass::Any),
        "same" => Ok(ReferenceClass::Same),
        other => anyhow::bail!("reference_class {other:?}: expected any or same"),
    }
}

pub(crate) fn concat(a: &Dataset, b: &Dataset) -> anyhow::Result<Dataset> {
    anyhow::ensure!(
        a.height == b.height && a.width == b.width && a.class_names == b.class_names,
        "training data ({}×{}, {} classes) and failures ({}×{}, {} classes) differ",
        a.width,
        a.height,
        a.num_classes(),
        b.width,
        b.height,
        b.num_classes()
    );
    let mut images = a.images.clone();
    images.extend_from_slice(&b.images);
    let mut labels = a.labels.clone();
    labels.extend_from_slice(&b.labels);
    Ok(Dataset {
        height: a.height,
        width: a.width,
        images,
        labels,
        class_names: a.class_names.clone(),
        source_ids: None,
    })
}

pub(crate) fn image_ref<'p>(pixels: &'p [u8], data: &TrainData) -> ImageRef<'p> {
    ImageRef {
        pixels,
        width: data.width,
        height: data.height,
    }
}

#[cfg(test)]
mod tests {
    use super::augmix::{augmix_params, AugmixParams, AugmixSource};
    use super::cutout::CutoutSource;
    use super::sensei::SenseiSource;
    use super::*;
    use deeprepair_repair::augmix_ops::{OpKind, AUGMIX_OPERATIONS};
    use deeprepair_repair::fsgmix_ops::FSGMIX_OPS;
    use deeprepair_repair::sensei::{Population, SenseiConfig};
    use std::sync::Mutex;

    #[test]
    fn the_public_sources_use_the_stage_defaults() {
        let defaults: std::collections::HashMap<&str, Value> = augmix_params()
            .into_iter()
            .map(|p| (p.name, p.default.expect("optional")))
            .collect();
        let d = AugmixParams::DEFAULT;
        assert_eq!(defaults["severity"], json!(d.severity as i64));
        assert_eq!(defaults["width"], json!(d.width));
        assert_eq!(defaults["depth"], json!(-1));
        assert!(d.depth.is_none());
        assert_eq!(defaults["alpha"], json!(d.alpha));
    }

    /// DeepRepair's defaults are Algorithm 1's reading; the baselines fine-tune on Dt + Dc.
    #[test]
    fn repair_defaults_follow_the_papers() {
        let defaults = |m: &str| -> std::collections::HashMap<&'static str, Value> {
            RepairKind(find(m).unwrap())
                .params()
                .into_iter()
                .filter_map(|p| p.default.map(|d| (p.name, d)))
                .collect()
        };
        let dr = defaults("deeprepair");
        assert_eq!(dr["style_prob"].as_f64().unwrap(), 5.0 / 14.0);
        assert_eq!(dr["reference_class"], json!("any"));
        assert_eq!(dr["variant"], json!("cluster"));
        assert_eq!(dr["clusters"], json!(5));
        assert_eq!(dr["train_on"], json!("train"));
        assert_eq!(dr["style"], json!("wavelet"));
        assert_eq!(dr["monitor"], json!("val_loss"));
        assert_eq!(dr["keep_best"], json!(true));
        for m in ["finetune", "augmix", "fsgmix", "cutmix", "randaugment"] {
            assert_eq!(defaults(m)["train_on"], json!("train+failures"), "{m}");
        }
        assert_eq!(defaults("augmix")["ops"], json!("augmix9"));
        let bad = |k: &str, v: Value| {
            let mut p: serde_json::Map<String, Value> =
                dr.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            p.insert(k.into(), v);
            RepairKind(find("deeprepair").unwrap())
                .validate(&Value::Object(p))
                .unwrap_err()
                .0
        };
        assert_eq!(bad("style_prob", json!(1.5)), "style_prob");
        assert_eq!(bad("style_alpha", json!(-0.1)), "style_alpha");
    }

    /// AugMix over FSGMix's seven composite operations (FSGMix footnote 2) differs from AugMix
    /// over its nine, and stays a seeded function of its inputs.
    #[test]
    fn augmix_with_fsgmix_operations() {
        use rand::SeedableRng;
        let pixels: Vec<u8> = (0..32 * 32 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let img = ImageRef {
            pixels: &pixels,
            width: 32,
            height: 32,
        };
        let run = |ops: &'static [&'static [OpKind]]| {
            let source = AugmixSource {
                params: AugmixParams {
                    ops,
                    ..AugmixParams::DEFAULT
                },
                style: None,
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            source.view(&img, 0, &mut rng).unwrap()
        };
        assert_eq!(run(&FSGMIX_OPS), run(&FSGMIX_OPS));
        assert_ne!(run(&FSGMIX_OPS), run(&AUGMIX_OPERATIONS));
    }

    #[test]
    fn only_sensei_consults_the_model() {
        let failures = Dataset {
            height: 32,
            width: 32,
            images: vec![128; 4 * 32 * 32 * 3],
            labels: vec![0, 1, 0, 1],
            class_names: vec!["a".into(), "b".into()],
            source_ids: None,
        };
        assert!(!augmix_source().uses_model());
        assert!(!deeprepair_source(&failures, 0.1, 0).unwrap().uses_model());
        assert!(deeprepair_source(&failures, 1.5, 0).is_err());
        let sensei = SenseiSource {
            config: SenseiConfig::default(),
            populations: Mutex::new(vec![]),
        };
        assert!(sensei.uses_model());
        assert!(!CutoutSource { length: 16 }.uses_model());
    }

    /// SENSEI's populations travel in the checkpoint; a checkpoint for another training set
    /// is refused.
    #[test]
    fn sensei_populations_are_saved_and_restored() {
        use rand::SeedableRng;
        let config = SenseiConfig::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let searched: Vec<Population> =
            (0..3).map(|_| Population::new(&config, &mut rng)).collect();
        let source = |populations: Vec<Population>| SenseiSource {
            config: SenseiConfig::default(),
            populations: Mutex::new(populations),
        };
        let state = source(searched.clone()).save_state().unwrap().unwrap();
        let resumed = source(vec![Population::default(); 3]);
        resumed.restore_state(&state).unwrap();
        assert_eq!(*resumed.populations.lock().unwrap(), searched);
        let err = source(vec![Population::default(); 2])
            .restore_state(&state)
            .unwrap_err();
        assert!(format!("{err:#}").contains("for 3 images"), "{err:#}");
    }
}
