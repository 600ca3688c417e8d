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

use crate::artifacts::{ensure_same_classes, model_artifact, read_dataset, ModelInfo};
use crate::model_kinds::{curve_artifact, stage_error, train_data};
use crate::style::{style_transfer_from_params, StyleChoice};
use crate::training::{
    input_model, rank_devices, run_training, train_config, training_params,
    validate_training_params, InputModel, RankModel,
};
use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use deeprepair_data::Dataset;
use deeprepair_pipeline::{
    Artifact, InputSpec, ParamSpec, ParamType, Resources, StageCtx, StageError, StageKind,
};
use deeprepair_repair::augmix_ops::{augment_and_mix_with, ImageRef, OpKind, AUGMIX_OPERATIONS};
use deeprepair_repair::fsgmix_ops::FSGMIX_OPS;
use deeprepair_repair::reference_sampling::{ClassReferenceSampler, ReferenceClass, Sampling};
use deeprepair_repair::sensei::{
    decode_populations, encode_populations, sensei_select, Population, SenseiConfig,
};
use deeprepair_repair::style_transfer::{StyleTransfer, WaveletStyle};
use deeprepair_repair::weight_distribution::{WeightDistribution, WeightModel};
use deeprepair_repair::{cutout, fsgmix_ops, mix};
use deeprepair_train::input::random_crop_flip;
use deeprepair_train::trainer::Monitor;
use deeprepair_train::trainer::{
    cropped_views, item_rng, to_unit, BatchSeed, BatchSource, Scorer, Targets, TrainBatch,
    TrainData,
};
use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde_json::{json, Value};
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Finetune,
    Cutout,
    Mixup,
    Cutmix,
    Sensei,
    Augmix,
    Fsgmix,
    DeepRepair,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Finetune,
        Method::Cutout,
        Method::Mixup,
        Method::Cutmix,
        Method::Sensei,
        Method::Augmix,
        Method::Fsgmix,
        Method::DeepRepair,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Finetune => "finetune",
            Method::Cutout => "cutout",
            Method::Mixup => "mixup",
            Method::Cutmix => "cutmix",
            Method::Sensei => "sensei",
            Method::Augmix => "augmix",
            Method::Fsgmix => "fsgmix",
            Method::DeepRepair => "deeprepair",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Method::Finetune => "repair by plain fine-tuning (FT-woAug: crop + flip, cross-entropy)",
            Method::Cutout => "repair by fine-tuning with Cutout",
            Method::Mixup => "repair by fine-tuning with Mixup",
            Method::Cutmix => "repair by fine-tuning with CutMix",
            Method::Sensei => "repair by fine-tuning with SENSEI's genetic worst-variant augmentation",
            Method::Augmix => "repair by fine-tuning with AugMix (JSD consistency)",
            Method::Fsgmix => "repair with FSGMix: operation weights learned from failures, GMM-sampled mixing",
            Method::DeepRepair => "repair with DeepRepair: style-guided AugMix with failure images as style references",
        }
    }

    /// What the repair trains on by default: Algorithm 1 trains DeepRepair on Dt (the failures
    /// enter as style references); the paper's baselines fine-tune on Dt and the 1,000
    /// collected failures (Sec. 4.1).
    fn default_train_on(self) -> &'static str {
        if self == Method::DeepRepair {
            "train"
        } else {
            "train+failures"
        }
    }

    fn extra_params(self) -> Vec<ParamSpec> {
        match self {
            Method::Cutout => vec![ParamSpec::optional(
                "length",
                ParamType::Int,
                json!(16),
                "hole side in pixels",
            )],
            Method::Mixup => vec![ParamSpec::optional(
                "alpha",
                ParamType::Float,
                json!(1.0),
                "Beta(α, α) for λ",
            )],
            Method::Cutmix => vec![
                ParamSpec::optional("beta", ParamType::Float, json!(1.0), "Beta(β, β) for λ"),
                ParamSpec::optional(
                    "prob",
                    ParamType::Float,
                    json!(0.5),
                    "probability a batch is mixed",
                ),
            ],
            Method::Sensei => vec![ParamSpec::optional(
                "selective",
                ParamType::Bool,
                json!(false),
                "SENSEI-SA: skip point-wise robust images",
            )],
            Method::Augmix => {
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
            Method::Fsgmix => {
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
            Method::DeepRepair => {
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
            Method::Finetune => vec![],
        }
    }
}

/// Algorithm 1's chance that a chain's first op is a style op: N = 5 style ops among 9 + 5.
pub const STYLE_PROB_ALGORITHM_1: f64 = 5.0 / 14.0;

fn augmix_params() -> Vec<ParamSpec> {
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

pub struct RepairKind(pub Method);

/// The `train_on` choices.
const TRAIN_ON: [&str; 3] = ["train", "failures", "train+failures"];

impl StageKind for RepairKind {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn version(&self) -> &'static str {
        // 2: DeepRepair's Algorithm 1 defaults, best-epoch keeping, the `ops` of augmix.
        "2"
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
        p.extend(self.0.extra_params());
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
        let mut r = crate::training::model_resources(params, 4096);
        if self.0 == Method::Sensei {
            // Its search state lives in the batch source, which ranks in one process share
            // and ranks in separate processes could not.
            r.ranks = 1;
        }
        r
    }
    fn estimate(&self, params: &Value) -> f64 {
        params["epochs"].as_f64().unwrap_or(1.0)
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        validate_training_params(params)?;
        if self.0 == Method::DeepRepair {
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
        }
        Ok(())
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        if self.0 == Method::DeepRepair {
            StyleChoice::fingerprint(params)
        } else {
            Ok(None)
        }
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
        let mut variant = None;
        let source: Box<dyn BatchSource> = match method {
            Method::Finetune => Box::new(deeprepair_train::trainer::StandardAugment),
            Method::Cutout => Box::new(CutoutSource {
                length: ctx.param("length")?,
            }),
            Method::Mixup => Box::new(MixSource {
                cutmix: false,
                alpha: ctx.param("alpha")?,
                prob: 1.0,
            }),
            Method::Cutmix => Box::new(MixSource {
                cutmix: true,
                alpha: ctx.param("beta")?,
                prob: ctx.param("prob")?,
            }),
            Method::Sensei => {
                let selective: bool = ctx.param("selective")?;
                variant = selective.then(|| "sa".to_string());
                Box::new(SenseiSource {
                    config: if selective {
                        SenseiConfig::selective()
                    } else {
                        SenseiConfig::default()
                    },
                    populations: Mutex::new(vec![Population::default(); data.n]),
                })
            }
            Method::Augmix => {
                let ops: String = ctx.param("ops")?;
                if ops != "augmix9" {
                    variant = Some(ops);
                }
                Box::new(AugmixSource {
                    params: AugmixParams::from_ctx(ctx)?,
                    style: None,
                })
            }
            Method::DeepRepair => {
                let v: String = ctx.param("variant")?;
                let sampling = if v == "uniform" {
                    Sampling::Uniform
                } else {
                    Sampling::Cluster {
                        clusters: ctx.param("clusters")?,
                    }
                };
                let reference_class = reference_class_param(ctx)?;
                // In [0, 1]: `validate` checked it when the manifest was planned.
                let prob: f64 = ctx.param("style_prob")?;
                let transfer = style_transfer_from_params(ctx)?;
                ctx.log(format!(
                    "DeepRepair: {v} reference sampling from {} of Dc ({} failures), style op \
                     first with probability {prob:.4}, {} style transfer",
                    match reference_class {
                        ReferenceClass::Any => "all",
                        ReferenceClass::Same => "the image's class",
                    },
                    failures.len(),
                    transfer.name()
                ));
                variant = Some(v);
                let sampler = ClassReferenceSampler::new(
                    &failures.images,
                    &failures.labels,
                    failures.image_len(),
                    sampling,
                    reference_class,
                    config.seed,
                )?;
                Box::new(AugmixSource {
                    params: AugmixParams::from_ctx(ctx)?,
                    style: Some(StyleGuide {
                        references: failures.clone(),
                        sampler,
                        transfer,
                        prob,
                    }),
                })
            }
            Method::Fsgmix => {
                let v: String = ctx.param("variant")?;
                let wm = match v.as_str() {
                    "mvn" => WeightModel::Mvn,
                    "fixed" => WeightModel::Fixed,
                    _ => WeightModel::Gmm {
                        components: ctx.param("components")?,
                    },
                };
                variant = Some(v);
                let severity: f64 = ctx.param::<i64>("severity")? as f64;
                let steps: usize = ctx.param("weight_steps")?;
                let lr: f64 = ctx.param("weight_lr")?;
                let weights = learn_fsgmix_weights(
                    &base_info,
                    &varmap,
                    &failures,
                    severity,
                    steps,
                    lr,
                    config.seed,
                    &device,
                )?;
                let m = weights.len() / 7;
                let array = ndarray::Array2::from_shape_vec(
                    (m, 7),
                    weights.iter().map(|&w| w as f64).collect(),
                )
                .map_err(anyhow::Error::from)?;
                let dist = WeightDistribution::fit(&array, wm, config.seed)?;
                ctx.log(format!(
                    "FSGMix: learned {m} weight vectors, mean {:?}",
                    dist.means.first().map(|v| v
                        .iter()
                        .map(|x| (x * 100.0).round() / 100.0)
                        .collect::<Vec<_>>())
                ));
                Box::new(FsgmixSource {
                    dist,
                    severity,
                    alpha: ctx.param("alpha")?,
                })
            }
        };
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

fn concat(a: &Dataset, b: &Dataset) -> anyhow::Result<Dataset> {
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

fn image_ref<'p>(pixels: &'p [u8], data: &TrainData) -> ImageRef<'p> {
    ImageRef {
        pixels,
        width: data.width,
        height: data.height,
    }
}

struct CutoutSource {
    length: usize,
}

impl BatchSource for CutoutSource {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        cropped_views(data, indices, seed, 1, |base, _, rng| {
            Ok(vec![to_unit(&cutout::cutout(
                &image_ref(base, data),
                self.length,
                cutout::CIFAR10_MEAN_U8,
                rng,
            ))])
        })
    }
}

struct MixSource {
    cutmix: bool,
    alpha: f64,
    prob: f64,
}

impl BatchSource for MixSource {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        let mut base = Vec::with_capacity(indices.len() * data.height * data.width * 3);
        for (pos, &i) in indices.iter().enumerate() {
            base.extend(random_crop_flip(
                data.image(i),
                data.height,
                data.width,
                4,
                &mut seed.item(pos),
            ));
        }
        let labels: Vec<u8> = indices.iter().map(|&i| data.labels[i]).collect();
        let mut rng = seed.batch_rng();
        let (n, w, h, c) = (indices.len(), data.width, data.height, data.num_classes);
        let mixed = if self.cutmix {
            mix::cutmix(&base, n, w, h, &labels, c, self.alpha, self.prob, &mut rng)
        } else {
            mix::mixup(&base, n, w, h, &labels, c, self.alpha, &mut rng)
        };
        Ok(TrainBatch {
            pixels: mixed.pixels,
            views: 1,
            batch: n,
            targets: Targets::Soft(mixed.targets),
        })
    }
}

struct SenseiSource {
    config: SenseiConfig,
    /// One population per training image, evolving across epochs; saved in every checkpoint,
    /// so a resumed run continues the same search.
    populations: Mutex<Vec<Population>>,
}

impl BatchSource for SenseiSource {
    /// The worst variant is chosen by the current model's loss.
    fn uses_model(&self) -> bool {
        true
    }

    fn save_state(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let populations = self.populations.lock().expect("populations");
        Ok(Some(encode_populations(&populations)))
    }

    fn restore_state(&self, state: &[u8]) -> anyhow::Result<()> {
        let restored = decode_populations(state)?;
        let mut populations = self.populations.lock().expect("populations");
        anyhow::ensure!(
            restored.len() == populations.len(),
            "the checkpoint holds SENSEI populations for {} images, this run trains on {}",
            restored.len(),
            populations.len()
        );
        *populations = restored;
        Ok(())
    }

    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        scorer: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        let bases: Vec<Vec<u8>> = indices
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                random_crop_flip(
                    data.image(i),
                    data.height,
                    data.width,
                    4,
                    &mut seed.item(pos),
                )
            })
            .collect();
        let refs: Vec<ImageRef> = bases.iter().map(|b| image_ref(b, data)).collect();
        let mut all = self.populations.lock().expect("populations");
        let mut pops: Vec<Population> = indices
            .iter()
            .map(|&i| std::mem::take(&mut all[i]))
            .collect();
        let mut failure = None;
        let mut fitness = |owners: &[usize], candidates: &[Vec<u8>]| -> Vec<f32> {
            let flat: Vec<u8> = candidates.concat();
            let labels: Vec<u8> = owners.iter().map(|&o| data.labels[indices[o]]).collect();
            match scorer.losses(&flat, &labels, candidates.len()) {
                Ok(l) => l,
                Err(e) => {
                    failure = Some(e);
                    vec![0.0; candidates.len()]
                }
            }
        };
        let selection = sensei_select(
            &refs,
            &mut pops,
            &mut fitness,
            &self.config,
            &mut seed.batch_rng(),
        );
        for (&i, p) in indices.iter().zip(pops) {
            all[i] = p;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(TrainBatch {
            pixels: selection
                .images
                .iter()
                .flat_map(|img| to_unit(img))
                .collect(),
            views: 1,
            batch: indices.len(),
            targets: Targets::Hard(indices.iter().map(|&i| data.labels[i] as u32).collect()),
        })
    }
}

/// AugMix's batch source with the paper's defaults (severity 3, width 3, depth 1–3, α = 1):
/// clean + two augmented views per image, as the `augmix` stage trains (benchmarks use it).
pub fn augmix_source() -> Box<dyn BatchSource> {
    Box::new(AugmixSource {
        params: AugmixParams::DEFAULT,
        style: None,
    })
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

#[derive(Clone, Copy)]
struct AugmixParams {
    /// The operation set O (each operation a chain of kinds).
    ops: &'static [&'static [OpKind]],
    severity: f64,
    width: usize,
    depth: Option<usize>,
    alpha: f64,
}

impl AugmixParams {
    /// The `augmix`/`deeprepair` stages' param defaults.
    const DEFAULT: AugmixParams = AugmixParams {
        ops: &AUGMIX_OPERATIONS,
        severity: 3.0,
        width: 3,
        depth: None,
        alpha: 1.0,
    };

    fn from_ctx(ctx: &StageCtx) -> anyhow::Result<Self> {
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
struct StyleGuide {
    references: Dataset,
    sampler: ClassReferenceSampler,
    transfer: Box<dyn StyleTransfer>,
    prob: f64,
}

struct AugmixSource {
    params: AugmixParams,
    style: Option<StyleGuide>,
}

impl AugmixSource {
    /// One augmented view: AugMix's `augment_and_mix`, or with a style guide DeepRepair's
    /// variant where each chain's first op is drawn from O ∪ O^c.
    fn view<R: Rng>(&self, img: &ImageRef, label: u8, rng: &mut R) -> anyhow::Result<Vec<f32>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let defaults = |m: Method| -> std::collections::HashMap<&'static str, Value> {
            RepairKind(m)
                .params()
                .into_iter()
                .filter_map(|p| p.default.map(|d| (p.name, d)))
                .collect()
        };
        let dr = defaults(Method::DeepRepair);
        assert_eq!(dr["style_prob"].as_f64().unwrap(), 5.0 / 14.0);
        assert_eq!(dr["reference_class"], json!("any"));
        assert_eq!(dr["variant"], json!("cluster"));
        assert_eq!(dr["clusters"], json!(5));
        assert_eq!(dr["train_on"], json!("train"));
        assert_eq!(dr["style"], json!("wavelet"));
        assert_eq!(dr["monitor"], json!("val_loss"));
        assert_eq!(dr["keep_best"], json!(true));
        for m in [
            Method::Finetune,
            Method::Augmix,
            Method::Fsgmix,
            Method::Cutmix,
        ] {
            assert_eq!(
                defaults(m)["train_on"],
                json!("train+failures"),
                "{}",
                m.name()
            );
        }
        assert_eq!(defaults(Method::Augmix)["ops"], json!("augmix9"));
        let bad = |k: &str, v: Value| {
            let mut p: serde_json::Map<String, Value> =
                dr.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            p.insert(k.into(), v);
            RepairKind(Method::DeepRepair)
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
