//! The training loop learns, and a run killed after any epoch resumes to the same weights as an
//! uninterrupted one (tiny-cnn on synthetic, learnable images).

mod common;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use common::{synthetic, weights};
use deeprepair_nn::{build, Arch};
use deeprepair_train::trainer::{StandardAugment, TrainObserver};
use deeprepair_train::{evaluate, seeded_var_builder, train, EpochStats, TrainConfig, TrainData};

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 16,
        seed: 7,
        ..TrainConfig::default()
    }
}

#[derive(Default)]
struct Recorder {
    checkpoints: Vec<Vec<u8>>,
    stats: Vec<EpochStats>,
    stop_after: Option<usize>,
}

impl TrainObserver for Recorder {
    fn epoch(&mut self, stats: &EpochStats, checkpoint: &[u8]) -> anyhow::Result<()> {
        self.stats.push(stats.clone());
        self.checkpoints.push(checkpoint.to_vec());
        if self.stop_after == Some(self.checkpoints.len()) {
            anyhow::bail!("killed");
        }
        Ok(())
    }
}

fn fresh(seed: u64) -> (VarMap, Box<dyn deeprepair_nn::Classifier>) {
    let varmap = VarMap::new();
    let model = build(
        Arch::TinyCnn,
        4,
        seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu),
    )
    .unwrap();
    (varmap, model)
}

#[test]
fn learns_and_resumes_to_identical_weights() {
    let (images, labels) = synthetic(64, 1);
    let data = TrainData {
        images: &images,
        labels: &labels,
        n: 64,
        height: 16,
        width: 16,
        num_classes: 4,
    };
    // Uninterrupted.
    let (vm_a, model_a) = fresh(0);
    let init = weights(&vm_a);
    let mut rec_a = Recorder::default();
    train(
        &*model_a,
        &vm_a,
        &data,
        None,
        &StandardAugment,
        &config(4),
        &Device::Cpu,
        None,
        &mut rec_a,
    )
    .unwrap();
    let final_a = weights(&vm_a);
    assert_ne!(init, final_a);
    let (test_images, test_labels) = synthetic(40, 2);
    let eval = evaluate(
        &*model_a,
        &test_images,
        &test_labels,
        (40, 16, 16),
        4,
        64,
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        eval.accuracy >= 0.9,
        "tiny-cnn should learn quadrants: {eval:?}"
    );
    assert!(rec_a.stats[3].train_loss < rec_a.stats[0].train_loss);

    // Killed after epoch 2, resumed in a fresh model from the checkpoint it got.
    let (vm_b, model_b) = fresh(0);
    let mut rec_b = Recorder {
        stop_after: Some(2),
        ..Recorder::default()
    };
    let err = train(
        &*model_b,
        &vm_b,
        &data,
        None,
        &StandardAugment,
        &config(4),
        &Device::Cpu,
        None,
        &mut rec_b,
    );
    assert!(err.is_err());
    let (vm_c, model_c) = fresh(99); // different init: everything must come from the checkpoint
    let mut rec_c = Recorder::default();
    let outcome = train(
        &*model_c,
        &vm_c,
        &data,
        None,
        &StandardAugment,
        &config(4),
        &Device::Cpu,
        Some(&rec_b.checkpoints[1]),
        &mut rec_c,
    )
    .unwrap();
    assert_eq!(rec_c.stats.len(), 2, "only epochs 2 and 3 remain");
    assert_eq!(outcome.history.len(), 4);
    assert_eq!(
        weights(&vm_c),
        final_a,
        "resumed run must equal the uninterrupted one"
    );
    assert_eq!(
        rec_c.stats,
        rec_a.stats[2..]
            .iter()
            .map(|s| EpochStats {
                images_per_second: rec_c.stats[s.epoch - 2].images_per_second,
                ..s.clone()
            })
            .collect::<Vec<_>>()
    );
}

#[test]
fn early_stopping_restores_the_best_epoch() {
    let (images, labels) = synthetic(32, 3);
    // Validation labels are shuffled: validation loss cannot keep improving.
    let (vimages, mut vlabels) = synthetic(16, 4);
    vlabels.rotate_left(1);
    let data = TrainData {
        images: &images,
        labels: &labels,
        n: 32,
        height: 16,
        width: 16,
        num_classes: 4,
    };
    let val = TrainData {
        images: &vimages,
        labels: &vlabels,
        n: 16,
        height: 16,
        width: 16,
        num_classes: 4,
    };
    let (vm, model) = fresh(0);
    let cfg = TrainConfig {
        patience: Some(2),
        ..config(30)
    };
    let mut rec = Recorder::default();
    let outcome = train(
        &*model,
        &vm,
        &data,
        Some(&val),
        &StandardAugment,
        &cfg,
        &Device::Cpu,
        None,
        &mut rec,
    )
    .unwrap();
    assert!(outcome.stopped_early, "{:?}", outcome.history);
    let best = outcome.best_epoch.unwrap();
    let best_loss = outcome.history[best].val_loss.unwrap();
    assert!(outcome
        .history
        .iter()
        .all(|s| s.val_loss.unwrap() >= best_loss));
    assert_eq!(outcome.history.len(), best + 3);
    let after = evaluate(
        &*model,
        &vimages,
        &vlabels,
        (16, 16, 16),
        4,
        64,
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        (after.mean_loss - best_loss).abs() < 1e-4,
        "best weights restored: {} vs {best_loss}",
        after.mean_loss
    );
}
