//! Building batches ahead on a producer thread changes nothing: the same weights, bit for
//! bit, with and without prefetching; sources that consult the model are built in the loop.

mod common;

use common::{data, synthetic, tiny_cnn, weights};
use deeprepair_train::trainer::{
    cropped_views, to_unit, BatchSeed, BatchSource, Replica, Scorer, StandardAugment, TrainBatch,
    TrainJob,
};
use deeprepair_train::{train, TrainConfig, TrainData};
use rand::Rng;

fn config(prefetch: usize) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 16,
        seed: 3,
        prefetch,
        ..TrainConfig::default()
    }
}

/// A 3-view (JSD) source with per-image random noise, like AugMix's shape.
struct NoisyViews;

impl BatchSource for NoisyViews {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        cropped_views(data, indices, seed, 3, |base, _, rng| {
            let mut noisy = || -> Vec<f32> {
                base.iter()
                    .map(|&v| (v as f32 / 255.0 + rng.random_range(-0.1f32..0.1)).clamp(0.0, 1.0))
                    .collect()
            };
            let (a, b) = (noisy(), noisy());
            Ok(vec![to_unit(base), a, b])
        })
    }
}

fn run(source: &dyn BatchSource, prefetch: usize) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    // 44 images: the last batch of 12 per epoch is a partial one.
    let (images, labels) = synthetic(44, 5);
    let (varmap, model) = tiny_cnn(1);
    train(
        Replica {
            model: &*model,
            varmap: &varmap,
            device: &candle_core::Device::Cpu,
        },
        TrainJob {
            data: &data(&images, &labels),
            validation: None,
            source,
            config: &config(prefetch),
            resume: None,
        },
        &mut (),
    )?;
    Ok(weights(&varmap))
}

#[test]
fn prefetching_gives_bit_identical_weights() {
    for source in [&StandardAugment as &dyn BatchSource, &NoisyViews] {
        let inline = run(source, 0).unwrap();
        for depth in [1, 2, 4] {
            assert_eq!(
                run(source, depth).unwrap(),
                inline,
                "prefetch depth {depth}"
            );
        }
        let (_, init) = (0, weights(&tiny_cnn(1).0));
        assert_ne!(inline, init, "training moved the weights");
    }
}

/// Scores every batch with the model (as SENSEI does) and says so.
struct Scoring {
    declare: bool,
}

impl BatchSource for Scoring {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        scorer: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        let flat: Vec<u8> = indices
            .iter()
            .flat_map(|&i| data.image(i).to_vec())
            .collect();
        let labels: Vec<u8> = indices.iter().map(|&i| data.labels[i]).collect();
        let losses = scorer.losses(&flat, &labels, indices.len())?;
        anyhow::ensure!(losses.len() == indices.len());
        StandardAugment.make_batch(data, indices, seed, scorer)
    }
    fn uses_model(&self) -> bool {
        self.declare
    }
}

#[test]
fn sources_that_consult_the_model_are_not_prefetched() {
    let inline = run(&Scoring { declare: true }, 0).unwrap();
    assert_eq!(run(&Scoring { declare: true }, 2).unwrap(), inline);
    // Scoring output is unused, so the weights are those of plain crop + flip.
    assert_eq!(inline, run(&StandardAugment, 0).unwrap());
    // A source that scores without declaring it gets an error, not a stale model.
    let err = run(&Scoring { declare: false }, 2).unwrap_err();
    assert!(format!("{err:#}").contains("uses_model"), "{err:#}");
}

#[test]
fn a_failing_source_fails_training_with_prefetch() {
    struct Failing;
    impl BatchSource for Failing {
        fn make_batch(
            &self,
            _: &TrainData,
            _: &[usize],
            _: BatchSeed,
            _: &dyn Scorer,
        ) -> anyhow::Result<TrainBatch> {
            anyhow::bail!("corrupt image")
        }
    }
    struct Panicking;
    impl BatchSource for Panicking {
        fn make_batch(
            &self,
            _: &TrainData,
            _: &[usize],
            _: BatchSeed,
            _: &dyn Scorer,
        ) -> anyhow::Result<TrainBatch> {
            panic!("source bug")
        }
    }
    for depth in [0, 2] {
        let err = run(&Failing, depth).unwrap_err();
        assert!(format!("{err:#}").contains("corrupt image"), "{err:#}");
    }
    let err = run(&Panicking, 2).unwrap_err();
    assert!(format!("{err:#}").contains("panicked"), "{err:#}");
}

#[test]
fn old_configs_without_prefetch_still_parse() {
    let mut json = serde_json::to_value(TrainConfig::default()).unwrap();
    json.as_object_mut().unwrap().remove("prefetch");
    let back: TrainConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back.prefetch, deeprepair_train::trainer::DEFAULT_PREFETCH);
}
