//! A torchvision-layout ResNet (a user's model, `import-model --arch resnet18`) trains end to
//! end: gradients pass the stem's 3×3/stride-2 max-pool, BatchNorm trains as PyTorch's does
//! (running statistics move by momentum, never by SGD), and the loss goes down.

mod common;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use common::{data, synthetic, weights};
use deeprepair_nn::{build, is_running_stat, Arch};
use deeprepair_train::seeded_var_builder;
use deeprepair_train::trainer::{train, Replica, StandardAugment, TrainConfig, TrainJob};

#[test]
fn resnet18_fine_tunes() {
    let varmap = VarMap::new();
    let model = build(
        Arch::ResNet18,
        4,
        seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let (images, labels) = synthetic(32, 1);
    let before = weights(&varmap);
    let config = TrainConfig {
        epochs: 4,
        batch_size: 8,
        ..TrainConfig::default()
    };
    let outcome = train(
        Replica {
            model: model.as_ref(),
            varmap: &varmap,
            device: &Device::Cpu,
        },
        TrainJob {
            data: &data(&images, &labels),
            validation: None,
            source: &StandardAugment,
            config: &config,
            resume: None,
        },
        &mut (),
    )
    .unwrap();
    let after = weights(&varmap);
    let (mut stats_moved, mut weights_moved) = (0, 0);
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if a != b {
            if is_running_stat(name) {
                stats_moved += 1;
            } else {
                weights_moved += 1;
            }
        }
    }
    assert_eq!(
        stats_moved,
        2 * 20,
        "every BatchNorm of resnet18 updated its statistics"
    );
    assert!(
        weights_moved > 40,
        "fine-tuning moved the weights ({weights_moved})"
    );
    let losses: Vec<f64> = outcome.history.iter().map(|e| e.train_loss).collect();
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "loss went down: {losses:?}"
    );
}
