//! Glue between the training engine and a stage: the device, progress, checkpoints into the
//! store (a killed stage resumes from its last epoch), cancellation, and the params every
//! training stage shares.

use deeprepair_pipeline::{ParamSpec, ParamType, StageCtx};
use deeprepair_train::trainer::TrainObserver;
use deeprepair_train::{EpochStats, TrainConfig};
use serde_json::json;

/// The first GPU the executor gave this stage (with the `cuda` feature), else the CPU.
pub fn stage_device(ctx: &StageCtx) -> anyhow::Result<candle_core::Device> {
    match ctx.gpus.first() {
        Some(&g) if candle_core::utils::cuda_is_available() => {
            Ok(deeprepair_train::device(Some(g as usize))?)
        }
        _ => Ok(candle_core::Device::Cpu),
    }
}

pub fn training_params(epochs: i64, lr: f64, batch: i64) -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional("epochs", ParamType::Int, json!(epochs), "training epochs"),
        ParamSpec::optional("batch", ParamType::Int, json!(batch), "batch size"),
        ParamSpec::optional(
            "lr",
            ParamType::Float,
            json!(lr),
            "initial learning rate (cosine schedule per step)",
        ),
        ParamSpec::optional(
            "momentum",
            ParamType::Float,
            json!(0.9),
            "SGD momentum (Nesterov)",
        ),
        ParamSpec::optional(
            "weight_decay",
            ParamType::Float,
            json!(5e-4),
            "L2 weight decay",
        ),
        ParamSpec::optional(
            "patience",
            ParamType::Int,
            json!(0),
            "early stopping: epochs without validation improvement (0: off)",
        ),
        ParamSpec::optional(
            "seed",
            ParamType::Int,
            json!(0),
            "seed for initialization, shuffling and augmentation",
        ),
    ]
}

pub fn train_config(ctx: &StageCtx) -> anyhow::Result<TrainConfig> {
    let patience: usize = ctx.param("patience")?;
    Ok(TrainConfig {
        epochs: ctx.param("epochs")?,
        batch_size: ctx.param("batch")?,
        sgd: deeprepair_train::optim::SgdConfig {
            lr: ctx.param("lr")?,
            momentum: ctx.param("momentum")?,
            weight_decay: ctx.param("weight_decay")?,
            nesterov: true,
        },
        min_lr: 1e-6,
        seed: ctx.param("seed")?,
        patience: (patience > 0).then_some(patience),
        jsd_lambda: 12.0,
    })
}

/// Reports steps as stage progress, stores a checkpoint after every epoch, stops on Ctrl-C.
pub struct StageObserver<'c, 'a> {
    pub ctx: &'c mut StageCtx<'a>,
}

impl TrainObserver for StageObserver<'_, '_> {
    fn step(&mut self, done: usize, total: usize) -> anyhow::Result<()> {
        self.ctx.progress(done as u64, total as u64, "steps");
        if self.ctx.is_cancelled() {
            anyhow::bail!("cancelled");
        }
        Ok(())
    }

    fn epoch(&mut self, s: &EpochStats, checkpoint: &[u8]) -> anyhow::Result<()> {
        self.ctx.save_checkpoint(checkpoint)?;
        let val = match (s.val_loss, s.val_accuracy) {
            (Some(l), Some(a)) => format!(", val loss {l:.4} acc {:.2}%", a * 100.0),
            _ => String::new(),
        };
        self.ctx.log(format!(
            "epoch {}: loss {:.4} acc {:.2}%{val}, lr {:.2e}, {:.0} img/s",
            s.epoch + 1,
            s.train_loss,
            s.train_accuracy * 100.0,
            s.lr,
            s.images_per_second
        ));
        Ok(())
    }
}

/// A stage's model input, rebuilt on the stage's device.
pub struct InputModel {
    pub info: crate::artifacts::ModelInfo,
    pub varmap: candle_nn::VarMap,
    pub model: Box<dyn deeprepair_nn::Classifier>,
    pub device: candle_core::Device,
}

/// Loads the model artifact bound to input `name`.
pub fn input_model(ctx: &StageCtx, name: &str) -> anyhow::Result<InputModel> {
    let artifact = ctx.input(name)?;
    let info = crate::artifacts::read_model_info(&artifact)?;
    let device = stage_device(ctx)?;
    let (varmap, model) = crate::artifacts::load_model(&artifact.bytes, &info, &device)?;
    Ok(InputModel {
        info,
        varmap,
        model,
        device,
    })
}
