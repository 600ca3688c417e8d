//! Data-parallel training with thread ranks: N ranks with batch B/N take the same steps as one
//! rank with batch B (no BatchNorm, or synchronized BatchNorm), every rank ends with the same
//! weights (with BatchNorm, statistics per rank), sharding does not change which augmentation
//! an image gets, and a failing rank fails the group instead of hanging it.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use common::{data, synthetic, tiny_cnn, weights};
use deeprepair_nn::Classifier;
use deeprepair_train::trainer::{
    train_data_parallel, BatchSeed, BatchSource, Replica, Scorer, StandardAugment, Targets,
    TrainBatch, TrainJob, TrainObserver, TrainOutcome,
};
use deeprepair_train::{seeded_var_builder, train, EpochStats, TrainConfig, TrainData};
use std::sync::mpsc;
use std::time::Duration;

/// A BatchNorm-free classifier: conv 3→4 (3×3, stride 2), ReLU, linear to 4 classes.
struct Small {
    conv: Conv2d,
    fc: Linear,
}

impl Small {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        Ok(Small {
            conv: conv2d(3, 4, 3, cfg, vb.pp("conv"))?,
            fc: linear(4 * 8 * 8, 4, vb.pp("fc"))?,
        })
    }
}

impl Classifier for Small {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let h = self.conv.forward(xs)?.relu()?;
        self.fc.forward(&h.flatten_from(1)?)
    }
}

fn small(seed: u64) -> (VarMap, Box<dyn Classifier>) {
    let varmap = VarMap::new();
    let m = Small::new(seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu)).unwrap();
    (varmap, Box::new(m))
}

/// The images as they are: one view, hard labels (deterministic, no augmentation).
struct Plain;

impl BatchSource for Plain {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        _: BatchSeed,
        _: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        Ok(TrainBatch {
            pixels: indices
                .iter()
                .flat_map(|&i| data.image(i).iter().map(|&v| v as f32 / 255.0))
                .collect(),
            views: 1,
            batch: indices.len(),
            targets: Targets::Hard(indices.iter().map(|&i| data.labels[i] as u32).collect()),
        })
    }
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 16,
        seed: 11,
        sgd: deeprepair_train::optim::SgdConfig {
            lr: 0.05,
            ..Default::default()
        },
        ..TrainConfig::default()
    }
}

type Models = Vec<(VarMap, Box<dyn Classifier>)>;

/// The reference: one rank, the whole batch, [`Plain`] images, on the CPU.
fn train_one_rank(
    model: &dyn Classifier,
    vm: &VarMap,
    d: &TrainData,
    cfg: &TrainConfig,
) -> TrainOutcome {
    train(
        Replica {
            model,
            varmap: vm,
            device: &Device::Cpu,
        },
        TrainJob {
            data: d,
            validation: None,
            source: &Plain,
            config: cfg,
            resume: None,
        },
        &mut (),
    )
    .unwrap()
}

fn replicas(models: &Models) -> Vec<Replica<'_>> {
    replicas_on(models, &Device::Cpu)
}

fn replicas_on<'a>(models: &'a Models, device: &'a Device) -> Vec<Replica<'a>> {
    models
        .iter()
        .map(|(varmap, model)| Replica {
            model: &**model,
            varmap,
            device,
        })
        .collect()
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0f32, f32::max)
}

#[test]
fn ranks_with_shards_match_one_rank_with_the_whole_batch() {
    // 74 images: four batches of 16 and a partial one of 10 per epoch, which 4 ranks split
    // 2/3/2/3 (unequal shards are weighted by their size).
    let (images, labels) = synthetic(74, 9);
    let d = data(&images, &labels);
    let cfg = config(3);
    let (vm, model) = small(4);
    let init = weights(&vm);
    let single = train_one_rank(&*model, &vm, &d, &cfg);
    let single_w = weights(&vm);
    assert!(
        max_diff(&init, &single_w) > 1e-3,
        "training moved the weights"
    );
    for world in [2, 4] {
        // Ranks other than 0 start from other weights: broadcast must fix that.
        let models: Models = (0..world).map(|r| small(4 + r as u64 * 100)).collect();
        let outcome = train_data_parallel(
            &replicas(&models),
            TrainJob {
                data: &d,
                validation: None,
                source: &Plain,
                config: &cfg,
                resume: None,
            },
            &mut (),
        )
        .unwrap();
        let w0 = weights(&models[0].0);
        let diff = max_diff(&single_w, &w0);
        assert!(diff < 1e-5, "{world} ranks differ from one rank by {diff}");
        for (r, (vm, _)) in models.iter().enumerate().skip(1) {
            assert_eq!(weights(vm), w0, "rank {r} holds rank 0's weights");
        }
        // Epoch statistics cover the global batch.
        for (a, b) in outcome.history.iter().zip(&single.history) {
            assert!((a.train_loss - b.train_loss).abs() < 1e-4, "{a:?} vs {b:?}");
            assert!(
                (a.train_accuracy - b.train_accuracy).abs() < 1e-9,
                "{a:?} vs {b:?}"
            );
        }
    }
}

fn trainable(w: Vec<(String, Vec<f32>)>) -> Vec<(String, Vec<f32>)> {
    w.into_iter()
        .filter(|(n, _)| !n.contains("running"))
        .collect()
}

#[test]
fn batchnorm_ranks_end_with_the_same_weights_and_learn() {
    let (images, labels) = synthetic(64, 1);
    let d = data(&images, &labels);
    let (vimages, vlabels) = synthetic(32, 2);
    let v = data(&vimages, &vlabels);
    let cfg = TrainConfig {
        epochs: 4,
        batch_size: 16,
        seed: 7,
        patience: Some(10),
        ..TrainConfig::default()
    };
    let models: Models = (0..2).map(|_| tiny_cnn(0)).collect();
    let outcome = train_data_parallel(
        &replicas(&models),
        TrainJob {
            data: &d,
            validation: Some(&v),
            source: &StandardAugment,
            config: &cfg,
            resume: None,
        },
        &mut (),
    )
    .unwrap();
    let w0 = weights(&models[0].0);
    let w1 = weights(&models[1].0);
    assert_eq!(
        trainable(w0.clone()),
        trainable(w1.clone()),
        "same trainable weights"
    );
    assert_ne!(w0, w1, "BatchNorm running statistics stay per rank");
    let h = &outcome.history;
    assert_eq!(h.len(), 4);
    assert!(h[3].train_loss < h[0].train_loss, "{h:?}");
    assert!(h.iter().all(|s| s.val_loss.is_some()));
    let acc = deeprepair_train::evaluate(
        &*models[0].1,
        &vimages,
        &vlabels,
        (32, 16, 16),
        4,
        32,
        &Device::Cpu,
    )
    .unwrap()
    .accuracy;
    assert!(acc >= 0.75, "rank 0's model learned the classes: {acc}");
}

/// With synchronized BatchNorm, N ranks with B/N images each normalize with the whole batch's
/// statistics, so they take the same steps as one rank with batch B: trainable weights and
/// running statistics match one rank, on every rank. Without it they do not.
#[test]
fn synchronized_batchnorm_ranks_match_one_rank_with_the_whole_batch() {
    // As above: 74 images, a last batch of 10 that 4 ranks split 2/3/2/3.
    let (images, labels) = synthetic(74, 9);
    let d = data(&images, &labels);
    let cfg = TrainConfig {
        sync_batch_norm: true,
        ..config(3)
    };
    let (vm, model) = tiny_cnn(5);
    train_one_rank(&*model, &vm, &d, &cfg);
    let single = weights(&vm);
    let run = |world: usize, sync_batch_norm: bool| {
        let models: Models = (0..world).map(|_| tiny_cnn(5)).collect();
        let cfg = TrainConfig {
            sync_batch_norm,
            ..cfg.clone()
        };
        train_data_parallel(
            &replicas(&models),
            TrainJob {
                data: &d,
                validation: None,
                source: &Plain,
                config: &cfg,
                resume: None,
            },
            &mut (),
        )
        .unwrap();
        models.iter().map(|(vm, _)| weights(vm)).collect::<Vec<_>>()
    };
    for world in [2, 4] {
        let ranks = run(world, true);
        for (r, w) in ranks.iter().enumerate() {
            let diff = max_diff(&single, w);
            assert!(diff < 1e-4, "{world} ranks: rank {r} differs by {diff}");
        }
    }
    let unsynced = run(2, false);
    let diff = max_diff(&single, &unsynced[0]);
    assert!(diff > 1e-3, "per-rank statistics give other steps: {diff}");
}

#[test]
fn a_failing_rank_releases_ranks_waiting_in_synchronized_batchnorm() {
    let cfg = TrainConfig {
        prefetch: 0,
        sync_batch_norm: true,
        ..config(2)
    };
    let err = group_error(
        || (0..3).map(|_| tiny_cnn(1)).collect(),
        FailsOnRank1 {
            calls: Default::default(),
        },
        cfg,
        (),
    );
    assert!(err.contains("unreadable image on rank 1"), "{err}");
}

#[test]
fn sharding_keeps_each_images_augmentation() {
    let (images, labels) = synthetic(12, 3);
    let d = data(&images, &labels);
    let indices: Vec<usize> = (0..12).rev().collect();
    let whole = StandardAugment
        .make_batch(&d, &indices, BatchSeed::new(42), &NoScore)
        .unwrap();
    let mut pixels = Vec::new();
    for (start, end) in [(0, 5), (5, 12)] {
        let shard = StandardAugment
            .make_batch(
                &d,
                &indices[start..end],
                BatchSeed {
                    seed: 42,
                    offset: start,
                },
                &NoScore,
            )
            .unwrap();
        pixels.extend(shard.pixels);
    }
    assert_eq!(pixels, whole.pixels);
}

struct NoScore;
impl Scorer for NoScore {
    fn losses(&self, _: &[u8], _: &[u8], _: usize) -> anyhow::Result<Vec<f32>> {
        anyhow::bail!("unused")
    }
}

/// Fails on rank 1 (the shard starting past position 0) from its third batch on.
struct FailsOnRank1 {
    calls: std::sync::atomic::AtomicUsize,
}

impl BatchSource for FailsOnRank1 {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        scorer: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        if seed.offset > 0 && self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2 {
            anyhow::bail!("unreadable image on rank 1");
        }
        Plain.make_batch(data, indices, seed, scorer)
    }
}

struct CancelAfter(usize);
impl TrainObserver for CancelAfter {
    fn step(&mut self, done: usize, _: usize) -> anyhow::Result<()> {
        if done >= self.0 {
            anyhow::bail!("cancelled");
        }
        Ok(())
    }
    fn epoch(&mut self, _: &EpochStats, _: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Trains `models()` data-parallel on 64 synthetic images, on a thread of its own, and returns
/// the error training ends with; fails the test if it has not ended after a minute (a hang).
fn group_error(
    models: impl FnOnce() -> Models + Send + 'static,
    source: impl BatchSource + 'static,
    cfg: TrainConfig,
    mut observer: impl TrainObserver + Send + 'static,
) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (images, labels) = synthetic(64, 1);
        let d = data(&images, &labels);
        let models = models();
        let result = train_data_parallel(
            &replicas(&models),
            TrainJob {
                data: &d,
                validation: None,
                source: &source,
                config: &cfg,
                resume: None,
            },
            &mut observer,
        );
        let _ = tx.send(result.map(|_| ()).map_err(|e| format!("{e:#}")));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("data-parallel training hung instead of failing")
        .unwrap_err()
}

#[test]
fn a_failing_rank_fails_the_group_instead_of_hanging_it() {
    for prefetch in [0, 2] {
        let cfg = TrainConfig {
            prefetch,
            ..config(2)
        };
        let err = group_error(
            || (0..3).map(|_| small(1)).collect(),
            FailsOnRank1 {
                calls: Default::default(),
            },
            cfg,
            (),
        );
        assert!(err.contains("unreadable image on rank 1"), "{err}");
    }
    // Rank 0's observer stopping the run (Ctrl-C) stops every rank.
    let err = group_error(
        || (0..2).map(|_| small(1)).collect(),
        Plain,
        config(3),
        CancelAfter(3),
    );
    assert!(err.contains("cancelled"), "{err}");
}

#[test]
fn a_batch_too_small_for_the_ranks_is_refused() {
    let (images, labels) = synthetic(16, 1);
    let d = data(&images, &labels);
    let models: Models = (0..4).map(|_| small(1)).collect();
    let cfg = TrainConfig {
        batch_size: 6,
        ..config(1)
    };
    let err = train_data_parallel(
        &replicas(&models),
        TrainJob {
            data: &d,
            validation: None,
            source: &Plain,
            config: &cfg,
            resume: None,
        },
        &mut (),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("4 ranks"), "{err:#}");
}

/// On a GPU: two ranks as threads on GPU 0 (reducing through host memory) with synchronized
/// BatchNorm take one rank's steps, which exercises the CUDA side of `sync_bn` (the identity
/// op's device copy and candle's kernels in the composed normalization).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test -p deeprepair-train --features cuda --test data_parallel -- --ignored"]
fn synchronized_batchnorm_on_a_gpu_matches_one_rank() {
    let gpu = Device::new_cuda(0).expect("CUDA device 0");
    let (images, labels) = synthetic(74, 9);
    let d = data(&images, &labels);
    let cfg = TrainConfig {
        sync_batch_norm: true,
        ..config(3)
    };
    let on_gpu = || {
        let varmap = VarMap::new();
        let model = deeprepair_nn::build(
            deeprepair_nn::Arch::TinyCnn,
            4,
            seeded_var_builder(&varmap, 5, DType::F32, &gpu),
        )
        .unwrap();
        (varmap, model)
    };
    let (vm, model) = on_gpu();
    train(
        Replica {
            model: &*model,
            varmap: &vm,
            device: &gpu,
        },
        TrainJob {
            data: &d,
            validation: None,
            source: &Plain,
            config: &cfg,
            resume: None,
        },
        &mut (),
    )
    .unwrap();
    let single = weights(&vm);
    let models: Models = (0..2).map(|_| on_gpu()).collect();
    train_data_parallel(
        &replicas_on(&models, &gpu),
        TrainJob {
            data: &d,
            validation: None,
            source: &Plain,
            config: &cfg,
            resume: None,
        },
        &mut (),
    )
    .unwrap();
    for (r, (vm, _)) in models.iter().enumerate() {
        let diff = max_diff(&single, &weights(vm));
        println!("rank {r}: max weight difference to one rank {diff:e}");
        assert!(diff < 1e-3, "rank {r} differs by {diff}");
    }
}
