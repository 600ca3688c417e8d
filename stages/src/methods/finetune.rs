//! FT-woAug: plain fine-tuning (crop + flip, cross-entropy), the papers' reference point.

use super::{MethodSetup, MethodSource, RepairMethod};
use deeprepair_train::trainer::StandardAugment;

pub struct Finetune;

impl RepairMethod for Finetune {
    fn name(&self) -> &'static str {
        "finetune"
    }
    fn description(&self) -> &'static str {
        "repair by plain fine-tuning (FT-woAug: crop + flip, cross-entropy)"
    }
    fn batch_source(&self, _: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        Ok(MethodSource::plain(StandardAugment))
    }
}
