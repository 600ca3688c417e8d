//! Cutout (DeVries & Taylor 2017): one square hole per image, filled with the CIFAR mean.

use super::{image_ref, MethodSetup, MethodSource, RepairMethod};
use deeprepair_pipeline::{ParamSpec, ParamType};
use deeprepair_repair::cutout;
use deeprepair_train::trainer::{
    cropped_views, to_unit, BatchSeed, BatchSource, Scorer, TrainBatch, TrainData,
};
use serde_json::json;

pub struct Cutout;

impl RepairMethod for Cutout {
    fn name(&self) -> &'static str {
        "cutout"
    }
    fn description(&self) -> &'static str {
        "repair by fine-tuning with Cutout"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional(
            "length",
            ParamType::Int,
            json!(16),
            "hole side in pixels",
        )]
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        Ok(MethodSource::plain(CutoutSource {
            length: setup.ctx.param("length")?,
        }))
    }
}

pub(crate) struct CutoutSource {
    pub(crate) length: usize,
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
