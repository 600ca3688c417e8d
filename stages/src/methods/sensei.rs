//! SENSEI (Gao et al. 2020): per image, a genetic search for the transform the current model
//! gets most wrong, trained on in its place.

use super::{image_ref, MethodSetup, MethodSource, RepairMethod};
use deeprepair_pipeline::{ParamSpec, ParamType};
use deeprepair_repair::sensei::{
    decode_populations, encode_populations, sensei_select, Population, SenseiConfig,
};
use deeprepair_repair::ImageRef;
use deeprepair_train::input::random_crop_flip;
use deeprepair_train::trainer::{
    to_unit, BatchSeed, BatchSource, Scorer, Targets, TrainBatch, TrainData,
};
use serde_json::json;
use std::sync::Mutex;

pub struct Sensei;

impl RepairMethod for Sensei {
    fn name(&self) -> &'static str {
        "sensei"
    }
    fn description(&self) -> &'static str {
        "repair by fine-tuning with SENSEI's genetic worst-variant augmentation"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional(
            "selective",
            ParamType::Bool,
            json!(false),
            "SENSEI-SA: skip point-wise robust images",
        )]
    }
    /// Its search state lives in the batch source, which ranks in one process share and
    /// ranks in separate processes could not.
    fn single_rank(&self) -> bool {
        true
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        let selective: bool = setup.ctx.param("selective")?;
        Ok(MethodSource {
            source: Box::new(SenseiSource {
                config: if selective {
                    SenseiConfig::selective()
                } else {
                    SenseiConfig::default()
                },
                populations: Mutex::new(vec![Population::default(); setup.data.n]),
            }),
            variant: selective.then(|| "sa".to_string()),
        })
    }
}

pub(crate) struct SenseiSource {
    pub(crate) config: SenseiConfig,
    /// One population per training image, evolving across epochs; saved in every checkpoint,
    /// so a resumed run continues the same search.
    pub(crate) populations: Mutex<Vec<Population>>,
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
