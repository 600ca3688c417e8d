//! RandAugment (Cubuk et al. 2020): N operations drawn uniformly (with replacement, identity
//! among them), each at one fixed magnitude M, on top of crop + flip; one view, cross-entropy.
//!
//! The operations are AugMix's nine plus identity. RandAugment's list also holds colour,
//! contrast, brightness and sharpness, which AugMix leaves out because they overlap the
//! CIFAR-10-C corruptions the repairs are tested on; we leave them out for the same reason.
//! Magnitude is on `augmentations.py`'s 0–10 scale; the defaults (N = 3, M = 4) are the paper's
//! for the smaller CIFAR-10 network (WRN-28-2).

use super::{image_ref, MethodSetup, MethodSource, RepairMethod};
use deeprepair_pipeline::{ParamSpec, ParamType};
use deeprepair_repair::augmix_ops::{apply_chain, op_at_level, AUGMIX_OPS};
use deeprepair_train::trainer::{
    cropped_views, to_unit, BatchSeed, BatchSource, Scorer, TrainBatch, TrainData,
};
use rand::Rng;
use serde_json::{json, Value};

pub struct RandAugment;

impl RepairMethod for RandAugment {
    fn name(&self) -> &'static str {
        "randaugment"
    }
    fn description(&self) -> &'static str {
        "repair by fine-tuning with RandAugment (N random operations at magnitude M)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("n", ParamType::Int, json!(3), "operations per image (N)"),
            ParamSpec::optional(
                "magnitude",
                ParamType::Float,
                json!(4.0),
                "operation strength M, 0-10",
            ),
        ]
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        let m = params["magnitude"].as_f64().unwrap_or(4.0);
        if !(0.0..=10.0).contains(&m) {
            return Err(("magnitude".into(), format!("{m} is outside 0-10")));
        }
        if params["n"].as_i64().unwrap_or(3) < 0 {
            return Err((
                "n".into(),
                "a count of operations cannot be negative".into(),
            ));
        }
        Ok(())
    }
    fn batch_source(&self, setup: &mut MethodSetup) -> anyhow::Result<MethodSource> {
        Ok(MethodSource::plain(RandAugmentSource {
            n: setup.ctx.param("n")?,
            magnitude: setup.ctx.param("magnitude")?,
        }))
    }
}

pub(crate) struct RandAugmentSource {
    pub(crate) n: usize,
    pub(crate) magnitude: f64,
}

impl BatchSource for RandAugmentSource {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        cropped_views(data, indices, seed, 1, |base, _, rng| {
            let mut ops = Vec::with_capacity(self.n);
            for _ in 0..self.n {
                // AUGMIX_OPS.len() stands for identity.
                let k = rng.random_range(0..=AUGMIX_OPS.len());
                if k < AUGMIX_OPS.len() {
                    ops.push(op_at_level(AUGMIX_OPS[k], self.magnitude, data.width, rng));
                }
            }
            Ok(vec![to_unit(&apply_chain(&ops, &image_ref(base, data)))])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeprepair_repair::augmix_ops::{Op, OpKind};
    use rand::SeedableRng;

    struct NoModel;
    impl Scorer for NoModel {
        fn losses(&self, _: &[u8], _: &[u8], _: usize) -> anyhow::Result<Vec<f32>> {
            anyhow::bail!("RandAugment never asks the model")
        }
    }

    #[test]
    fn magnitude_is_fixed_and_batches_are_seeded() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        // Level 10 is the top of the scale: 30 degrees, a 0.3 shear, whatever the draw.
        for _ in 0..8 {
            match op_at_level(OpKind::Rotate, 10.0, 32, &mut rng) {
                Op::Rotate(d) => assert_eq!(d.abs(), 30.0),
                other => panic!("{other:?}"),
            }
            match op_at_level(OpKind::ShearX, 10.0, 32, &mut rng) {
                Op::ShearX(s) => assert!((s.abs() - 0.3).abs() < 1e-12),
                other => panic!("{other:?}"),
            }
        }
        let images: Vec<u8> = (0..4 * 32 * 32 * 3).map(|i| (i * 7 % 253) as u8).collect();
        let labels = [0u8, 1, 2, 3];
        let data = TrainData {
            images: &images,
            labels: &labels,
            n: 4,
            height: 32,
            width: 32,
            num_classes: 4,
        };
        let batch = |n: usize, magnitude: f64| {
            RandAugmentSource { n, magnitude }
                .make_batch(&data, &[0, 1, 2, 3], BatchSeed::new(5), &NoModel)
                .unwrap()
                .pixels
        };
        assert_eq!(batch(3, 4.0), batch(3, 4.0), "a function of its seed");
        assert_ne!(batch(3, 1.0), batch(3, 9.0), "the magnitude matters");
        assert_ne!(batch(0, 4.0), batch(3, 4.0), "so do the operations");
    }
}
