//! CutMix (Yun et al. 2019): a box of another image pasted in, labels mixed by area.

use super::mixup::MixSource;
use super::{MethodSetup, MethodSource, RepairMethod};
use deeprepair_pipeline::{ParamSpec, ParamType};
use serde_json::json;

pub struct Cutmix;

impl RepairMethod for Cutmix {
    fn name(&self) -> &'static str {
        "cutmix"
    }
    fn description(&self) -> &'static str {
        "repair by fine-tuning with CutMix"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("beta", ParamType::Float, json!(1.0), "Beta(β, β) for λ"),
            ParamSpec::optional(
                "prob",
                ParamType::Float,
                json!(0.5),
                "probability a batch is mixed",
            ),
        ]
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        Ok(MethodSource::plain(MixSource {
            cutmix: true,
            alpha: setup.ctx.param("beta")?,
            prob: setup.ctx.param("prob")?,
        }))
    }
}
