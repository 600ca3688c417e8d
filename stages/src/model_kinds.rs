//! `pretrain` (the base model), `import-model` (a user's weights), `select-failures` (Dc_k and
//! De_k) and `evaluate` (accuracy records for the report).

use crate::artifacts::{
    dataset_artifact, ensure_same_classes, model_artifact, read_dataset, DatasetInfo, ModelInfo,
};
use crate::stage_training::{
    input_model, rank_devices, run_training, train_config, training_params,
    validate_training_params, InputModel, RankModel,
};
use deeprepair_nn::{build, param_count, Arch};
use deeprepair_pipeline::kind::fingerprint_path;
use deeprepair_pipeline::{
    Artifact, ArtifactKind, InputSpec, ParamSpec, ParamType, Resources, StageCtx, StageError,
    StageKind,
};
use deeprepair_report::Record;
use deeprepair_train::trainer::{Monitor, StandardAugment, TrainData};
use deeprepair_train::{evaluate, seeded_var_builder};
use serde_json::{json, Value};
use std::path::Path;

pub fn train_data(ds: &deeprepair_data::Dataset) -> TrainData<'_> {
    TrainData {
        images: &ds.images,
        labels: &ds.labels,
        n: ds.len(),
        height: ds.height,
        width: ds.width,
        num_classes: ds.num_classes(),
    }
}

/// Maps an error raised because the stage was cancelled to [`StageError::Cancelled`].
pub fn stage_error(ctx: &StageCtx, e: anyhow::Error) -> StageError {
    if ctx.is_cancelled() {
        StageError::Cancelled
    } else if deeprepair_collective::data_parallel::is_group_aborted(&e) {
        // Another rank of this stage's gang failed first: that rank's error is the cause.
        StageError::Released(e)
    } else {
        StageError::Fatal(e)
    }
}

fn training_resources(params: &Value) -> Resources {
    let heavy = params["arch"].as_str().is_some_and(|a| a != "tiny-cnn");
    crate::stage_training::model_resources(params, if heavy { 8192 } else { 2048 })
}

/// `pretrain`: trains an architecture from scratch on a dataset (Dt) with standard
/// augmentation (crop + flip), cross-entropy.
pub struct PretrainKind;

impl StageKind for PretrainKind {
    fn name(&self) -> &'static str {
        "pretrain"
    }
    fn version(&self) -> &'static str {
        // 3: issue 13's CPU kernels (GEMM convolutions, fused BatchNorm + activation) change
        // the floats; AllConvNet's max-pool gradient is no longer scaled by 1/4.
        // 4: stride-1 convolutions as shifted GEMMs (taps) sum in another order.
        "4"
    }
    fn description(&self) -> &'static str {
        "trains the base model from scratch (SGD Nesterov, cosine, crop+flip, cross-entropy)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![ParamSpec::required(
            "arch",
            ParamType::Choice(&deeprepair_nn::Arch::NAMES),
            "architecture",
        )];
        p.extend(training_params(100, 0.1, 128, Monitor::ValAccuracy));
        p
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "train",
                many: false,
                optional: false,
                help: "training images (Dt)",
            },
            InputSpec {
                name: "validation",
                many: false,
                optional: true,
                help: "validation images (early stopping)",
            },
        ]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["model", "metrics"]
    }
    fn resources(&self, params: &Value) -> Resources {
        training_resources(params)
    }
    fn estimate(&self, params: &Value) -> f64 {
        params["epochs"].as_f64().unwrap_or(1.0)
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        validate_training_params(params)
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let arch_name: String = ctx.param("arch")?;
        let arch = Arch::from_name(&arch_name)
            .ok_or_else(|| anyhow::anyhow!("unknown arch {arch_name}"))?;
        let config = train_config(ctx)?;
        let (ds, _) = read_dataset(&ctx.input("train")?)?;
        let val = if ctx.has_input("validation") {
            Some(read_dataset(&ctx.input("validation")?)?.0)
        } else {
            None
        };
        if let Some(v) = &val {
            if v.class_names != ds.class_names {
                return Err(StageError::Fatal(anyhow::anyhow!(
                    "input `validation` has the classes [{}] but `train` has [{}]",
                    v.class_names.join(", "),
                    ds.class_names.join(", ")
                )));
            }
        }
        let ranks: usize = ctx.param("ranks")?;
        let mut replicas: Vec<RankModel> = Vec::with_capacity(ranks);
        for device in rank_devices(ctx, ranks)? {
            let varmap = candle_nn::VarMap::new();
            let model = build(
                arch,
                ds.num_classes(),
                seeded_var_builder(&varmap, config.seed, candle_core::DType::F32, &device),
            )
            .map_err(anyhow::Error::from)?;
            replicas.push((varmap, model, device));
        }
        let data = train_data(&ds);
        let val_data = val.as_ref().map(train_data);
        let outcome = run_training(
            ctx,
            &replicas,
            &data,
            val_data.as_ref(),
            &StandardAugment,
            &config,
        )
        .map_err(|e| stage_error(ctx, e))?;
        let varmap = &replicas[0].0;
        let info = ModelInfo {
            arch: arch.name().into(),
            num_classes: ds.num_classes(),
            class_names: ds.class_names.clone(),
            method: "base".into(),
            variant: None,
            repaired_for: None,
            seed: config.seed,
            parameters: param_count(arch, ds.num_classes()),
        };
        Ok(vec![
            model_artifact(varmap, &info)?,
            curve_artifact(&outcome)?,
        ])
    }
}

/// The training history as a metrics artifact (`export` draws it as a PNG curve).
pub fn curve_artifact(
    outcome: &deeprepair_train::trainer::TrainOutcome,
) -> anyhow::Result<Artifact> {
    let last = outcome.history.last();
    let mut a = Artifact::json(
        ArtifactKind::Metrics,
        &json!({
            "history": outcome.history,
            "planned_epochs": outcome.planned_epochs,
            "stopped_early": outcome.stopped_early,
            "stopped_early_at_lr": outcome.stopped_early_at_lr,
            "monitor": outcome.monitor,
            "best_epoch": outcome.best_epoch,
            "summary": outcome.summary(),
        }),
    );
    a.header.meta = json!({
        "curve": true,
        "epochs": outcome.history.len(),
        "final_train_loss": last.map(|s| s.train_loss),
        "final_train_accuracy": last.map(|s| s.train_accuracy),
    });
    Ok(a)
}

/// `import-model`: a user's safetensors checkpoint (PyTorch `state_dict` names) as a model.
pub struct ImportModelKind;

impl StageKind for ImportModelKind {
    fn name(&self) -> &'static str {
        "import-model"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "stores a user's safetensors weights (PyTorch names) as a model artifact"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required(
                "arch",
                ParamType::Choice(&deeprepair_nn::Arch::NAMES),
                "architecture the weights are for",
            ),
            ParamSpec::required("path", ParamType::Str, "the .safetensors file"),
            ParamSpec::optional(
                "num_classes",
                ParamType::Int,
                json!(10),
                "classes of the classifier",
            ),
            ParamSpec::optional(
                "class_names",
                ParamType::List(Box::new(ParamType::Str)),
                json!(deeprepair_data::CIFAR10_CLASSES),
                "class names, in label order",
            ),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["model"]
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        Ok(Some(fingerprint_path(Path::new(
            params["path"].as_str().unwrap_or_default(),
        ))?))
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let path: String = ctx.param("path")?;
        let arch_name: String = ctx.param("arch")?;
        let arch = Arch::from_name(&arch_name)
            .ok_or_else(|| anyhow::anyhow!("unknown arch {arch_name}"))?;
        let num_classes: usize = ctx.param("num_classes")?;
        let class_names: Vec<String> = ctx.param("class_names")?;
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
        let info = ModelInfo {
            arch: arch.name().into(),
            num_classes,
            class_names,
            method: "base".into(),
            variant: None,
            repaired_for: None,
            seed: 0,
            parameters: param_count(arch, num_classes),
        };
        let (varmap, _) = deeprepair_nn::load_weights_from_buffer(
            arch,
            num_classes,
            &bytes,
            Path::new(&path),
            &candle_core::Device::Cpu,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(vec![model_artifact(&varmap, &info)?])
    }
}

/// `select-failures`: the base model's failures on Dv_k, split into the collected ones Dc_k
/// (`per_class` per class, seeded, as DeepRepair §4.1) and the unseen rest De_k.
pub struct SelectFailuresKind;

impl StageKind for SelectFailuresKind {
    fn name(&self) -> &'static str {
        "select-failures"
    }
    fn version(&self) -> &'static str {
        // 2: issue 13's CPU kernels (GEMM convolutions, fused eval-mode BatchNorm) change
        // the floats.
        // 3: stride-1 convolutions as shifted GEMMs (taps) sum in another order.
        "3"
    }
    fn description(&self) -> &'static str {
        "splits the model's failures on a corrupted set into collected (Dc_k) and unseen (De_k)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional(
                "per_class",
                ParamType::Int,
                json!(100),
                "collected failures per class (fewer where a class has fewer)",
            ),
            ParamSpec::optional("seed", ParamType::Int, json!(0), "selection seed"),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                many: false,
                optional: false,
                help: "the deployed (base) model",
            },
            InputSpec {
                name: "images",
                many: false,
                optional: false,
                help: "the corrupted images (Dv_k)",
            },
        ]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["collected", "unseen", "metrics"]
    }
    fn resources(&self, params: &Value) -> Resources {
        crate::stage_training::model_resources(params, 2048)
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let per_class: usize = ctx.param("per_class")?;
        let seed: u64 = ctx.param("seed")?;
        let InputModel {
            info,
            model,
            device,
            ..
        } = input_model(ctx, "model")?;
        let (ds, dinfo) = read_dataset(&ctx.input("images")?)?;
        ensure_same_classes(&info, &ds, "input `images`")?;
        let eval = evaluate(
            &*model,
            &ds.images,
            &ds.labels,
            (ds.len(), ds.height, ds.width),
            ds.num_classes(),
            256,
            &device,
        )
        .map_err(anyhow::Error::from)?;
        let failures: Vec<usize> = (0..ds.len())
            .filter(|&i| eval.predictions[i] != ds.labels[i])
            .collect();
        let failure_labels: Vec<u8> = failures.iter().map(|&i| ds.labels[i]).collect();
        let picked = deeprepair_data::select_subset(
            &failure_labels,
            ds.num_classes(),
            Some(per_class),
            None,
            seed,
        );
        let picked_set: std::collections::HashSet<usize> = picked.iter().copied().collect();
        let collected: Vec<usize> = picked.iter().map(|&k| failures[k]).collect();
        let unseen: Vec<usize> = (0..failures.len())
            .filter(|k| !picked_set.contains(k))
            .map(|k| failures[k])
            .collect();
        let corruption = dinfo.corruption.clone().unwrap_or_else(|| "unknown".into());
        ctx.log(format!(
            "base accuracy on {corruption}: {:.2}%; {} failures: {} collected, {} unseen",
            eval.accuracy * 100.0,
            failures.len(),
            collected.len(),
            unseen.len()
        ));
        let mk = |idx: &[usize], set: String| {
            dataset_artifact(
                &ds.subset(idx),
                &DatasetInfo {
                    eval_set: Some(set),
                    corruption: dinfo.corruption.clone(),
                    severities: dinfo.severities.clone(),
                },
            )
        };
        let metrics = Artifact::json(
            ArtifactKind::Metrics,
            &json!({
                "corruption": corruption,
                "base_accuracy": eval.accuracy,
                "images": ds.len(),
                "failures": failures.len(),
                "collected": collected.len(),
                "unseen": unseen.len(),
                "collected_per_class": ds.subset(&collected).class_counts(),
            }),
        );
        Ok(vec![
            mk(&collected, format!("collected:{corruption}")),
            mk(&unseen, format!("failures:{corruption}")),
            metrics,
        ])
    }
}

/// `evaluate`: a model on evaluation sets → accuracy records (and per-set details).
pub struct EvaluateKind;

impl StageKind for EvaluateKind {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> &'static str {
        // 2: issue 13's CPU kernels (GEMM convolutions, fused eval-mode BatchNorm) change
        // the floats.
        // 3: stride-1 convolutions as shifted GEMMs (taps) sum in another order.
        "3"
    }
    fn description(&self) -> &'static str {
        "accuracy, per-class accuracy, confusion matrix and loss of a model on evaluation sets"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional(
            "batch",
            ParamType::Int,
            json!(256),
            "evaluation batch size",
        )]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                many: false,
                optional: false,
                help: "the model",
            },
            InputSpec {
                name: "sets",
                many: true,
                optional: false,
                help: "evaluation sets (clean, Dv_j, De_k)",
            },
        ]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["metrics"]
    }
    fn resources(&self, params: &Value) -> Resources {
        crate::stage_training::model_resources(params, 2048)
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let batch: usize = ctx.param("batch")?;
        let InputModel {
            info,
            model,
            device,
            ..
        } = input_model(ctx, "model")?;
        let refs = ctx.input_refs("sets")?.to_vec();
        let mut records = Vec::new();
        let mut details = Vec::new();
        for (k, r) in refs.iter().enumerate() {
            ctx.check_cancelled()?;
            let (ds, dinfo) = read_dataset(&ctx.artifact(&r.digest)?)?;
            ensure_same_classes(&info, &ds, &format!("evaluation set {}", r.stage))?;
            let eval_set = dinfo.eval_set.clone().unwrap_or_else(|| r.stage.clone());
            let e = evaluate(
                &*model,
                &ds.images,
                &ds.labels,
                (ds.len(), ds.height, ds.width),
                ds.num_classes(),
                batch,
                &device,
            )
            .map_err(anyhow::Error::from)?;
            ctx.log(format!("{eval_set}: {:.2}% of {}", e.accuracy * 100.0, e.n));
            records.push(Record {
                arch: info.arch.clone(),
                method: info.method.clone(),
                variant: info.variant.clone(),
                repaired_for: info.repaired_for.clone(),
                eval_set: eval_set.clone(),
                seed: info.seed,
                accuracy: e.accuracy,
                n: e.n,
            });
            details.push(json!({
                "eval_set": eval_set,
                "accuracy": e.accuracy,
                "mean_loss": e.mean_loss,
                "per_class_accuracy": e.per_class_accuracy,
                "confusion": e.confusion,
            }));
            ctx.progress((k + 1) as u64, refs.len() as u64, "sets");
        }
        let mut a = Artifact::json(
            ArtifactKind::Metrics,
            &json!({ "model": info, "records": records, "details": details }),
        );
        a.header.meta = json!({ "records": records.len(), "method": info.method, "repaired_for": info.repaired_for });
        Ok(vec![a])
    }
}
