//! Mixup (Zhang et al. 2018), and the batch source it shares with CutMix.

use super::{MethodSetup, MethodSource, RepairMethod};
use deeprepair_pipeline::{ParamSpec, ParamType};
use deeprepair_repair::mix;
use deeprepair_train::input::random_crop_flip;
use deeprepair_train::trainer::{BatchSeed, BatchSource, Scorer, Targets, TrainBatch, TrainData};
use serde_json::json;

pub struct Mixup;

impl RepairMethod for Mixup {
    fn name(&self) -> &'static str {
        "mixup"
    }
    fn description(&self) -> &'static str {
        "repair by fine-tuning with Mixup"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional(
            "alpha",
            ParamType::Float,
            json!(1.0),
            "Beta(α, α) for λ",
        )]
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        Ok(MethodSource::plain(MixSource {
            cutmix: false,
            alpha: setup.ctx.param("alpha")?,
            prob: 1.0,
        }))
    }
}

pub(crate) struct MixSource {
    pub(crate) cutmix: bool,
    pub(crate) alpha: f64,
    pub(crate) prob: f64,
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
