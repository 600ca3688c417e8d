//! One rank's training loop: epochs of seeded batches, the forward/backward step, validation
//! and early stopping, checkpoints.

use super::*;
use crate::evaluate::predict;
use crate::input::unit_to_tensor;
use crate::loss::{cross_entropy, jensen_shannon, soft_cross_entropy};
use crate::optim::Sgd;
use crate::schedule::cosine_lr;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var, D};
use deeprepair_nn::sync_bn::{self, BatchStatsReducer};
use deeprepair_nn::Classifier;
use deeprepair_workers::data_parallel::{
    all_reduce_gradients, broadcast_weights, Collective, DEFAULT_BUCKET_BYTES,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

pub(super) struct ModelScorer<'a> {
    pub(super) model: &'a dyn Classifier,
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) device: &'a Device,
}

impl Scorer for ModelScorer<'_> {
    fn losses(&self, images: &[u8], labels: &[u8], n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(predict(
            self.model,
            images,
            labels,
            (n, self.height, self.width),
            256,
            self.device,
        )?
        .into_iter()
        .map(|(_, l)| l)
        .collect())
    }
}

/// The scorer batches built ahead get: a source that scores must say so (`uses_model`).
pub(super) struct NoScorer;

impl Scorer for NoScorer {
    fn losses(&self, _: &[u8], _: &[u8], _: usize) -> anyhow::Result<Vec<f32>> {
        bail!("this batch source consults the model; its BatchSource::uses_model must return true")
    }
}

pub(super) fn check_inputs(
    data: &TrainData,
    validation: Option<&TrainData>,
    config: &TrainConfig,
    world: usize,
) -> anyhow::Result<()> {
    if data.n == 0 {
        bail!("no training images");
    }
    let per = data.height * data.width * 3;
    if data.images.len() < data.n * per || data.labels.len() < data.n {
        bail!(
            "training data holds {} bytes and {} labels, too few for {} images of {}×{}",
            data.images.len(),
            data.labels.len(),
            data.n,
            data.width,
            data.height
        );
    }
    if config.batch_size < 2 {
        bail!("batch size must be at least 2 (BatchNorm needs batch statistics)");
    }
    if config.batch_size < 2 * world {
        bail!(
            "batch size {} is too small for {world} ranks: each rank needs at least 2 images \
             (BatchNorm needs batch statistics)",
            config.batch_size
        );
    }
    if config.patience.is_some() && validation.is_none() {
        bail!("early stopping (patience) needs validation data");
    }
    Ok(())
}

/// Epoch `epoch`'s batches: `(step, global batch indices)`, skipping a last batch too small to
/// give every rank two images (a batch of one has no batch statistics).
pub(super) fn epoch_batches(
    n: usize,
    config: &TrainConfig,
    epoch: usize,
    world: usize,
) -> Vec<(usize, Vec<usize>)> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[
        config.seed,
        epoch as u64,
    ])));
    order
        .chunks(config.batch_size)
        .enumerate()
        .filter(|(_, chunk)| chunk.len() >= 2 * world)
        .map(|(s, chunk)| (s, chunk.to_vec()))
        .collect()
}

/// Rank `rank`'s contiguous shard of a global batch of `len`: `start..end`.
pub(super) fn shard_range(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    (rank * len / world)..((rank + 1) * len / world)
}

/// The training loop of one rank (`collective`: `None` on a single rank). Only the rank that
/// gets an `observer` reports and checkpoints.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_rank(
    replica: Replica,
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
    resume: Option<&[u8]>,
    mut observer: Option<&mut dyn TrainObserver>,
    mut collective: Option<&mut dyn Collective>,
    batch_norm: Option<Arc<BatchNormGroup>>,
) -> anyhow::Result<TrainOutcome> {
    // Training-mode BatchNorm on this thread reduces over the group (validation and the
    // scorer run in eval mode and stay local).
    let _sync_batch_norm = batch_norm.map(|g| sync_bn::scope(g as Arc<dyn BatchStatsReducer>));
    let Replica {
        model,
        varmap,
        device,
    } = replica;
    let (rank, world) = collective
        .as_ref()
        .map_or((0, 1), |c| (c.rank(), c.world_size()));
    let mut opt = Sgd::new(varmap, config.sgd);
    let mut progress = Progress::default();
    let mut best: Option<HashMap<String, Tensor>> = None;
    if let Some(bytes) = resume {
        let (weights, buffers, best_weights, p) =
            decode_checkpoint(bytes, device).context("reading the training checkpoint")?;
        restore(varmap, &weights)?;
        opt.load_buffers(buffers);
        best = best_weights;
        progress = p;
    }
    let all_vars = sorted_vars(varmap);
    // Before the broadcast below, so no rank has made a batch yet.
    let stateful = source.save_state()?.is_some();
    if let Some(c) = collective.as_deref_mut() {
        broadcast_weights(c, &all_vars).context("broadcasting rank 0's weights")?;
    }
    let (h, w) = (data.height, data.width);
    let steps_per_epoch = data.n.div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let scorer = ModelScorer {
        model,
        height: h,
        width: w,
        device,
    };
    let prefetch = config.prefetch > 0 && !source.uses_model() && !stateful;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // Batches built ahead: one message per step of every remaining epoch, in loop order;
        // `depth - 1` queued plus the one being built or waiting to be queued.
        let first_epoch = progress.next_epoch;
        let batches: Option<Receiver<anyhow::Result<TrainBatch>>> = prefetch.then(|| {
            let (tx, rx) = sync_channel(config.prefetch - 1);
            scope.spawn(move || {
                for epoch in first_epoch..config.epochs {
                    for (s, chunk) in epoch_batches(data.n, config, epoch, world) {
                        let range = shard_range(chunk.len(), rank, world);
                        let seed = BatchSeed {
                            seed: mix_seed(&[config.seed, epoch as u64, s as u64]),
                            offset: range.start,
                        };
                        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            source.make_batch(data, &chunk[range.clone()], seed, &NoScorer)
                        }))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the batch source panicked")));
                        let failed = built.is_err();
                        if tx.send(built).is_err() || failed {
                            return; // the loop stopped early, or this batch failed
                        }
                    }
                }
            });
            rx
        });
        while progress.next_epoch < config.epochs && !progress.stopped_early {
            let epoch = progress.next_epoch;
            let started = std::time::Instant::now();
            let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
            let mut lr = config.sgd.lr;
            for (s, chunk) in epoch_batches(data.n, config, epoch, world) {
                let step = epoch * steps_per_epoch + s;
                lr = cosine_lr(step, total_steps, config.sgd.lr, config.min_lr);
                opt.set_lr(lr);
                let range = shard_range(chunk.len(), rank, world);
                let shard = &chunk[range.clone()];
                let batch = match &batches {
                    Some(rx) => rx.recv().context("the batch producer thread stopped")??,
                    None => source.make_batch(
                        data,
                        shard,
                        BatchSeed {
                            seed: mix_seed(&[config.seed, epoch as u64, s as u64]),
                            offset: range.start,
                        },
                        &scorer,
                    )?,
                };
                let b = batch.batch;
                if b != shard.len() {
                    bail!(
                        "the batch source returned {b} images for a batch of {}",
                        shard.len()
                    );
                }
                let x = unit_to_tensor(&batch.pixels, batch.views * b, h, w, device)?;
                let logits = model.forward_t(&x, true)?;
                let first = logits.narrow(0, 0, b)?;
                let (mut loss, labels_for_acc) = match &batch.targets {
                    Targets::Hard(labels) => {
                        let y = Tensor::from_slice(labels, b, device)?;
                        (cross_entropy(&first, &y)?, labels.clone())
                    }
                    Targets::Soft(t) => {
                        let y = Tensor::from_slice(t, (b, data.num_classes), device)?;
                        let argmax: Vec<u32> = y.argmax(D::Minus1)?.to_vec1()?;
                        (soft_cross_entropy(&first, &y)?, argmax)
                    }
                };
                if batch.views == 3 {
                    let a1 = logits.narrow(0, b, b)?;
                    let a2 = logits.narrow(0, 2 * b, b)?;
                    loss = (loss + jensen_shannon(&first, &a1, &a2, config.jsd_lambda)?)?;
                } else if batch.views != 1 {
                    bail!("batch sources give 1 or 3 views, not {}", batch.views);
                }
                let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_value.is_finite() {
                    bail!("training diverged at epoch {epoch}, step {s}: loss {loss_value} (lower the learning rate)");
                }
                let grads = match collective.as_deref_mut() {
                    None => loss.backward()?,
                    Some(c) => {
                        // The mean over ranks of shard means is the global batch mean when
                        // the shards are equal; weight unequal shards by their size.
                        let weight = (b * world) as f64 / chunk.len() as f64;
                        let mut grads = if weight == 1.0 {
                            loss.backward()?
                        } else {
                            (loss * weight)?.backward()?
                        };
                        let trained: Vec<Var> = all_vars
                            .iter()
                            .filter(|v| grads.get(v.as_tensor()).is_some())
                            .cloned()
                            .collect();
                        all_reduce_gradients(c, &trained, &mut grads, DEFAULT_BUCKET_BYTES)?;
                        grads
                    }
                };
                opt.step(&grads)?;
                let preds: Vec<u32> = first.argmax(D::Minus1)?.to_vec1()?;
                correct += preds
                    .iter()
                    .zip(&labels_for_acc)
                    .filter(|(p, y)| p == y)
                    .count();
                loss_sum += loss_value * b as f64;
                seen += b;
                if let Some(o) = observer.as_deref_mut() {
                    o.step(step + 1, total_steps)?;
                }
            }
            if let Some(c) = collective.as_deref_mut() {
                // Epoch statistics over the whole global batch.
                let mut sums = [loss_sum as f32, correct as f32, seen as f32];
                c.all_reduce_mean(&mut sums)?;
                let world = world as f64;
                loss_sum = sums[0] as f64 * world;
                correct = (sums[1] as f64 * world).round() as usize;
                seen = (sums[2] as f64 * world).round() as usize;
            }
            // Every rank has made its last batch of the epoch (the reduction above waited for
            // them); the one that checkpoints takes the source's state before any rank makes
            // the next epoch's first batch (the barrier below).
            let source_state = match (&observer, stateful) {
                (Some(_), true) => source.save_state()?,
                _ => None,
            };
            if let (Some(c), true) = (collective.as_deref_mut(), stateful) {
                c.all_reduce_mean(&mut [0.0])?;
            }
            let (mut val_loss, mut val_accuracy) = (None, None);
            if let (Some(v), 0) = (validation, rank) {
                let scored = predict(
                    model,
                    v.images,
                    v.labels,
                    (v.n, v.height, v.width),
                    256,
                    device,
                )?;
                let loss = scored.iter().map(|s| s.1 as f64).sum::<f64>() / v.n.max(1) as f64;
                let acc = scored
                    .iter()
                    .zip(v.labels)
                    .filter(|(s, &y)| s.0 == y)
                    .count() as f64
                    / v.n.max(1) as f64;
                (val_loss, val_accuracy) = (Some(loss), Some(acc));
            }
            // Early stopping, decided by rank 0.
            let (mut improved, mut stop) = (false, false);
            let tracks_best = config.patience.is_some() || config.keep_best;
            if let (true, Some(vl), Some(va)) = (tracks_best, val_loss, val_accuracy) {
                let score = config.monitor.score(vl, va);
                improved = progress.best_score.is_none_or(|b| score < b);
                stop = config
                    .patience
                    .is_some_and(|p| !improved && progress.epochs_since_best + 1 >= p);
            }
            if let (Some(c), Some(_)) = (collective.as_deref_mut(), validation) {
                let mut decision = [
                    val_loss.unwrap_or(0.0) as f32,
                    val_accuracy.unwrap_or(0.0) as f32,
                    f32::from(u8::from(improved)),
                    f32::from(u8::from(stop)),
                ];
                c.broadcast(&mut decision, 0)?;
                if rank != 0 {
                    val_loss = Some(decision[0] as f64);
                    val_accuracy = Some(decision[1] as f64);
                    improved = decision[2] != 0.0;
                    stop = decision[3] != 0.0;
                }
            }
            let stats = EpochStats {
                epoch,
                train_loss: loss_sum / seen.max(1) as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                val_loss,
                val_accuracy,
                lr,
                images_per_second: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
            };
            if tracks_best && val_loss.is_some() {
                if improved {
                    progress.best_score = val_loss
                        .zip(val_accuracy)
                        .map(|(l, a)| config.monitor.score(l, a));
                    progress.best_epoch = Some(epoch);
                    progress.epochs_since_best = 0;
                    best = Some(snapshot(varmap));
                } else {
                    progress.epochs_since_best += 1;
                    progress.stopped_early = stop;
                }
            }
            progress.history.push(stats.clone());
            progress.next_epoch = epoch + 1;
            if let Some(o) = observer.as_deref_mut() {
                let checkpoint =
                    encode_checkpoint(varmap, &opt, best.as_ref(), &progress, source_state)?;
                o.epoch(&stats, &checkpoint)?;
            }
        }
        Ok(())
    })?;
    if let Some(best) = &best {
        restore(varmap, best)?;
    }
    if let Some(c) = collective {
        check_ranks_agree(c, varmap)?;
    }
    let stopped_early_at_lr = progress
        .stopped_early
        .then(|| progress.history.last().map(|s| s.lr))
        .flatten();
    Ok(TrainOutcome {
        history: progress.history,
        planned_epochs: config.epochs,
        stopped_early: progress.stopped_early,
        stopped_early_at_lr,
        monitor: best.as_ref().map(|_| config.monitor),
        best_epoch: best.as_ref().and(progress.best_epoch),
    })
}
