//! The training loop learns, and a run killed after any epoch resumes to the same weights as an
//! uninterrupted one (tiny-cnn on synthetic, learnable images), a batch source's state included.

mod common;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use common::{data, synthetic, weights};
use deeprepair_nn::{build, Arch};
use deeprepair_train::trainer::{
    train_data_parallel, BatchSeed, BatchSource, Monitor, Replica, Scorer, StandardAugment,
    Targets, TrainBatch, TrainJob, TrainObserver,
};
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

/// The model on 16×16 images of 4 classes (the validation sets here).
fn evaluate_16px(
    model: &dyn deeprepair_nn::Classifier,
    images: &[u8],
    labels: &[u8],
) -> deeprepair_train::Evaluation {
    evaluate(
        model,
        images,
        labels,
        (labels.len(), 16, 16),
        4,
        64,
        &Device::Cpu,
    )
    .unwrap()
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
    let data = data(&images, &labels);
    // Uninterrupted.
    let (vm_a, model_a) = fresh(0);
    let init = weights(&vm_a);
    let mut rec_a = Recorder::default();
    train(
        Replica {
            model: &*model_a,
            varmap: &vm_a,
            device: &Device::Cpu,
        },
        TrainJob {
            data: &data,
            validation: None,
            source: &StandardAugment,
            config: &config(4),
            resume: None,
        },
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
        Replica {
            model: &*model_b,
            varmap: &vm_b,
            device: &Device::Cpu,
        },
        TrainJob {
            data: &data,
            validation: None,
            source: &StandardAugment,
            config: &config(4),
            resume: None,
        },
        &mut rec_b,
    );
    assert!(err.is_err());
    let (vm_c, model_c) = fresh(99); // different init: everything must come from the checkpoint
    let mut rec_c = Recorder::default();
    let outcome = train(
        Replica {
            model: &*model_c,
            varmap: &vm_c,
            device: &Device::Cpu,
        },
        TrainJob {
            data: &data,
            validation: None,
            source: &StandardAugment,
            config: &config(4),
            resume: Some(&rec_b.checkpoints[1]),
        },
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
    let (data, val) = (data(&images, &labels), data(&vimages, &vlabels));
    let (vm, model) = fresh(0);
    let cfg = TrainConfig {
        patience: Some(2),
        ..config(30)
    };
    let mut rec = Recorder::default();
    let outcome = train(
        Replica {
            model: &*model,
            varmap: &vm,
            device: &Device::Cpu,
        },
        TrainJob {
            data: &data,
            validation: Some(&val),
            source: &StandardAugment,
            config: &cfg,
            resume: None,
        },
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
    let after = evaluate_16px(&*model, &vimages, &vlabels);
    assert!(
        (after.mean_loss - best_loss).abs() < 1e-4,
        "best weights restored: {} vs {best_loss}",
        after.mean_loss
    );
    // The run ended before its cosine schedule did, and says so.
    let lr = outcome
        .stopped_early_at_lr
        .expect("stopped early at some lr");
    assert_eq!(lr, outcome.history.last().unwrap().lr);
    assert!(lr > cfg.min_lr * 10.0, "not annealed: {lr}");
    assert_eq!(outcome.planned_epochs, 30);
    let summary = outcome.summary();
    assert!(
        summary.contains(&format!("stopped early after epoch {} of 30", best + 3))
            && summary.contains(&format!("kept epoch {} (best val_loss)", best + 1)),
        "{summary}"
    );
}

/// `keep_best` without early stopping: the whole schedule runs, and the model ends with the
/// weights of the epoch of best validation accuracy (how both papers keep their base).
#[test]
fn keep_best_by_accuracy_runs_the_whole_schedule() {
    let (images, labels) = synthetic(32, 3);
    let (vimages, vlabels) = synthetic(16, 4);
    let (data, val) = (data(&images, &labels), data(&vimages, &vlabels));
    let (vm, model) = fresh(0);
    let cfg = TrainConfig {
        keep_best: true,
        monitor: Monitor::ValAccuracy,
        ..config(6)
    };
    let outcome = train(
        Replica {
            model: &*model,
            varmap: &vm,
            device: &Device::Cpu,
        },
        TrainJob {
            data: &data,
            validation: Some(&val),
            source: &StandardAugment,
            config: &cfg,
            resume: None,
        },
        &mut Recorder::default(),
    )
    .unwrap();
    assert!(!outcome.stopped_early);
    assert!(outcome.stopped_early_at_lr.is_none());
    assert_eq!(outcome.history.len(), 6);
    assert_eq!(outcome.monitor, Some(Monitor::ValAccuracy));
    let best = outcome.best_epoch.expect("a best epoch is kept");
    let best_acc = outcome.history[best].val_accuracy.unwrap();
    // The first epoch of the highest accuracy.
    assert!(outcome.history[..best]
        .iter()
        .all(|s| s.val_accuracy.unwrap() < best_acc));
    assert!(outcome
        .history
        .iter()
        .all(|s| s.val_accuracy.unwrap() <= best_acc));
    let after = evaluate_16px(&*model, &vimages, &vlabels);
    assert!(
        (after.accuracy - best_acc).abs() < 1e-9,
        "{} vs {best_acc}",
        after.accuracy
    );
    assert!(outcome
        .summary()
        .starts_with("ran all 6 of 6 epochs; kept epoch"));
}

/// A source with state (like SENSEI's GA populations): every image's visit count shifts its
/// brightness, so the batches depend on everything the source saw before.
struct CountingSource {
    visits: std::sync::Mutex<Vec<u32>>,
}

impl CountingSource {
    fn new(n: usize) -> Self {
        CountingSource {
            visits: std::sync::Mutex::new(vec![0; n]),
        }
    }
    fn visits(&self) -> Vec<u32> {
        self.visits.lock().unwrap().clone()
    }
}

impl BatchSource for CountingSource {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        _: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        let mut visits = self.visits.lock().unwrap();
        let mut pixels = Vec::new();
        for &i in indices {
            visits[i] += 1;
            let shift = (visits[i] % 5) as f32 * 0.05;
            pixels.extend(
                data.image(i)
                    .iter()
                    .map(|&v| v as f32 / 255.0 * 0.8 + shift),
            );
        }
        Ok(TrainBatch {
            pixels,
            views: 1,
            batch: indices.len(),
            targets: Targets::Hard(indices.iter().map(|&i| data.labels[i] as u32).collect()),
        })
    }

    fn save_state(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(Some(
            self.visits().iter().flat_map(|v| v.to_le_bytes()).collect(),
        ))
    }

    fn restore_state(&self, state: &[u8]) -> anyhow::Result<()> {
        *self.visits.lock().unwrap() = state
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(())
    }
}

/// The checkpoint carries the source's state: a run killed after epoch 2 and resumed with a
/// fresh source ends with the uninterrupted run's weights and source state, on one rank and
/// on two (where the state is taken while no rank is ahead in the next epoch).
#[test]
fn a_sources_state_resumes_with_the_checkpoint() {
    let (images, labels) = synthetic(64, 3);
    let data = data(&images, &labels);
    let cfg = config(4);
    for world in [1, 2] {
        let run = |source: &CountingSource,
                   resume: Option<&[u8]>,
                   recorder: &mut Recorder|
         -> (anyhow::Result<()>, Vec<(String, Vec<f32>)>) {
            let models: Vec<_> = (0..world).map(|_| fresh(0)).collect();
            let replicas: Vec<Replica> = models
                .iter()
                .map(|(varmap, model)| Replica {
                    model: &**model,
                    varmap,
                    device: &Device::Cpu,
                })
                .collect();
            let result = if world == 1 {
                let r = &replicas[0];
                train(
                    Replica {
                        model: r.model,
                        varmap: r.varmap,
                        device: r.device,
                    },
                    TrainJob {
                        data: &data,
                        validation: None,
                        source,
                        config: &cfg,
                        resume,
                    },
                    recorder,
                )
            } else {
                train_data_parallel(
                    &replicas,
                    TrainJob {
                        data: &data,
                        validation: None,
                        source,
                        config: &cfg,
                        resume,
                    },
                    recorder,
                )
            };
            (result.map(|_| ()), weights(&models[0].0))
        };
        let whole_source = CountingSource::new(64);
        let (result, whole) = run(&whole_source, None, &mut Recorder::default());
        result.unwrap();
        assert!(whole_source.visits().iter().all(|&v| v == 4));

        let mut killed = Recorder {
            stop_after: Some(2),
            ..Recorder::default()
        };
        let (result, _) = run(&CountingSource::new(64), None, &mut killed);
        assert!(result.is_err(), "killed after epoch 2");
        let resumed_source = CountingSource::new(64);
        let (result, resumed) = run(
            &resumed_source,
            Some(&killed.checkpoints[1]),
            &mut Recorder::default(),
        );
        result.unwrap();
        assert_eq!(
            resumed_source.visits(),
            whole_source.visits(),
            "{world} rank(s): the resumed source continued from the saved visits"
        );
        assert_eq!(
            resumed, whole,
            "{world} rank(s): same weights as uninterrupted"
        );
    }
}
