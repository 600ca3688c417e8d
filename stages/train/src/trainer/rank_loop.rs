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
use candle_nn::VarMap;
use deeprepair_collective::data_parallel::{
    all_reduce_gradients, broadcast_weights, Collective, DEFAULT_BUCKET_BYTES,
};
use deeprepair_nn::sync_bn::{self, BatchStatsReducer};
use deeprepair_nn::Classifier;
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
pub(super) fn run_rank(
    replica: Replica,
    job: TrainJob,
    mut observer: Option<&mut dyn TrainObserver>,
    mut collective: Option<&mut dyn Collective>,
    batch_norm: Option<Arc<BatchNormGroup>>,
) -> anyhow::Result<TrainOutcome> {
    let TrainJob {
        data,
        validation,
        source,
        config,
        resume,
    } = job;
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
    let mut state = RankState::start(varmap, config, resume, device)?;
    let all_vars = sorted_vars(varmap);
    // Before the broadcast below, so no rank has made a batch yet.
    let stateful = source.save_state()?.is_some();
    if let Some(c) = collective.as_deref_mut() {
        broadcast_weights(c, &all_vars).context("broadcasting rank 0's weights")?;
    }
    let scorer = ModelScorer {
        model,
        height: data.height,
        width: data.width,
        device,
    };
    let prefetch = config.prefetch > 0 && !source.uses_model() && !stateful;
    let step = StepContext {
        model,
        device,
        data,
        config,
        all_vars: &all_vars,
        world,
    };
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let batches = prefetch
            .then(|| spawn_batch_producer(scope, job, rank, world, state.progress.next_epoch));
        while state.progress.next_epoch < config.epochs && !state.progress.stopped_early {
            let epoch = state.progress.next_epoch;
            let started = std::time::Instant::now();
            let mut sums = EpochSums::default();
            let mut lr = config.sgd.lr;
            for (s, chunk) in epoch_batches(data.n, config, epoch, world) {
                let global_step = epoch * step.steps_per_epoch() + s;
                lr = cosine_lr(
                    global_step,
                    step.total_steps(),
                    config.sgd.lr,
                    config.min_lr,
                );
                state.opt.set_lr(lr);
                let range = shard_range(chunk.len(), rank, world);
                let batch = match &batches {
                    Some(rx) => rx.recv().context("the batch producer thread stopped")??,
                    None => source.make_batch(
                        data,
                        &chunk[range.clone()],
                        BatchSeed {
                            seed: mix_seed(&[config.seed, epoch as u64, s as u64]),
                            offset: range.start,
                        },
                        &scorer,
                    )?,
                };
                let done = step.train(
                    batch,
                    range.len(),
                    chunk.len(),
                    (epoch, s),
                    &mut state.opt,
                    collective.as_deref_mut(),
                )?;
                sums.add(done);
                if let Some(o) = observer.as_deref_mut() {
                    o.step(global_step + 1, step.total_steps())?;
                }
            }
            if let Some(c) = collective.as_deref_mut() {
                sums.reduce(c, world)?;
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
            let validated = match (validation, rank) {
                (Some(v), 0) => Some(validate(model, v, device)?),
                _ => None,
            };
            let verdict = state.judge(
                config,
                validated,
                validation.is_some(),
                collective.as_deref_mut(),
            )?;
            let stats = EpochStats {
                epoch,
                train_loss: sums.loss_sum / sums.seen.max(1) as f64,
                train_accuracy: sums.correct as f64 / sums.seen.max(1) as f64,
                val_loss: verdict.val_loss,
                val_accuracy: verdict.val_accuracy,
                lr,
                images_per_second: sums.seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
            };
            state.record(config, &stats, &verdict, varmap);
            if let Some(o) = observer.as_deref_mut() {
                let checkpoint = encode_checkpoint(
                    varmap,
                    &state.opt,
                    state.best.as_ref(),
                    &state.progress,
                    source_state,
                )?;
                o.epoch(&stats, &checkpoint)?;
            }
        }
        Ok(())
    })?;
    if let Some(best) = &state.best {
        restore(varmap, best)?;
    }
    if let Some(c) = collective {
        check_ranks_agree(c, varmap)?;
    }
    Ok(state.outcome(config))
}

/// A rank between epochs: its optimizer, progress and the best weights so far.
struct RankState {
    opt: Sgd,
    progress: Progress,
    best: Option<HashMap<String, Tensor>>,
}

/// The epoch's validation, and what rank 0 decided from it (every rank gets the same).
struct Verdict {
    val_loss: Option<f64>,
    val_accuracy: Option<f64>,
    improved: bool,
    stop: bool,
}

impl RankState {
    /// A fresh run, or the one `resume` checkpointed.
    fn start(
        varmap: &VarMap,
        config: &TrainConfig,
        resume: Option<&[u8]>,
        device: &Device,
    ) -> anyhow::Result<RankState> {
        let mut state = RankState {
            opt: Sgd::new(varmap, config.sgd),
            progress: Progress::default(),
            best: None,
        };
        if let Some(bytes) = resume {
            let (weights, buffers, best_weights, progress) =
                decode_checkpoint(bytes, device).context("reading the training checkpoint")?;
            restore(varmap, &weights)?;
            state.opt.load_buffers(buffers);
            state.best = best_weights;
            state.progress = progress;
        }
        Ok(state)
    }

    /// Early stopping, decided by rank 0 from its validation and broadcast to the others.
    fn judge(
        &self,
        config: &TrainConfig,
        validated: Option<(f64, f64)>,
        has_validation: bool,
        collective: Option<&mut (dyn Collective + '_)>,
    ) -> anyhow::Result<Verdict> {
        let mut verdict = Verdict {
            val_loss: validated.map(|v| v.0),
            val_accuracy: validated.map(|v| v.1),
            improved: false,
            stop: false,
        };
        let tracks_best = config.patience.is_some() || config.keep_best;
        if let (true, Some((vl, va))) = (tracks_best, validated) {
            let score = config.monitor.score(vl, va);
            verdict.improved = self.progress.best_score.is_none_or(|b| score < b);
            verdict.stop = config
                .patience
                .is_some_and(|p| !verdict.improved && self.progress.epochs_since_best + 1 >= p);
        }
        if let (Some(c), true) = (collective, has_validation) {
            let mut decision = [
                verdict.val_loss.unwrap_or(0.0) as f32,
                verdict.val_accuracy.unwrap_or(0.0) as f32,
                f32::from(u8::from(verdict.improved)),
                f32::from(u8::from(verdict.stop)),
            ];
            c.broadcast(&mut decision, 0)?;
            if c.rank() != 0 {
                verdict.val_loss = Some(decision[0] as f64);
                verdict.val_accuracy = Some(decision[1] as f64);
                verdict.improved = decision[2] != 0.0;
                verdict.stop = decision[3] != 0.0;
            }
        }
        Ok(verdict)
    }

    /// The epoch done: the best weights kept or the patience counted, the history extended.
    fn record(
        &mut self,
        config: &TrainConfig,
        stats: &EpochStats,
        verdict: &Verdict,
        varmap: &VarMap,
    ) {
        let tracks_best = config.patience.is_some() || config.keep_best;
        if tracks_best && verdict.val_loss.is_some() {
            if verdict.improved {
                self.progress.best_score = verdict
                    .val_loss
                    .zip(verdict.val_accuracy)
                    .map(|(l, a)| config.monitor.score(l, a));
                self.progress.best_epoch = Some(stats.epoch);
                self.progress.epochs_since_best = 0;
                self.best = Some(snapshot(varmap));
            } else {
                self.progress.epochs_since_best += 1;
                self.progress.stopped_early = verdict.stop;
            }
        }
        self.progress.history.push(stats.clone());
        self.progress.next_epoch = stats.epoch + 1;
    }

    fn outcome(self, config: &TrainConfig) -> TrainOutcome {
        let progress = self.progress;
        let stopped_early_at_lr = progress
            .stopped_early
            .then(|| progress.history.last().map(|s| s.lr))
            .flatten();
        TrainOutcome {
            history: progress.history,
            planned_epochs: config.epochs,
            stopped_early: progress.stopped_early,
            stopped_early_at_lr,
            monitor: self.best.as_ref().map(|_| config.monitor),
            best_epoch: self.best.as_ref().and(progress.best_epoch),
        }
    }
}

/// Batches built ahead on a producer thread: one message per step of every remaining epoch,
/// in loop order; `depth - 1` queued plus the one being built or waiting to be queued.
fn spawn_batch_producer<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    job: TrainJob<'scope>,
    rank: usize,
    world: usize,
    first_epoch: usize,
) -> Receiver<anyhow::Result<TrainBatch>> {
    let TrainJob {
        data,
        source,
        config,
        ..
    } = job;
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
}

/// Loss, correct predictions and images over an epoch's steps (this rank's, then the group's).
#[derive(Default)]
struct EpochSums {
    loss_sum: f64,
    correct: usize,
    seen: usize,
}

impl EpochSums {
    fn add(&mut self, step: StepDone) {
        self.loss_sum += step.loss * step.images as f64;
        self.correct += step.correct;
        self.seen += step.images;
    }

    /// The sums over the whole global batch.
    fn reduce(&mut self, c: &mut dyn Collective, world: usize) -> anyhow::Result<()> {
        let mut sums = [self.loss_sum as f32, self.correct as f32, self.seen as f32];
        c.all_reduce_mean(&mut sums)?;
        let world = world as f64;
        self.loss_sum = sums[0] as f64 * world;
        self.correct = (sums[1] as f64 * world).round() as usize;
        self.seen = (sums[2] as f64 * world).round() as usize;
        Ok(())
    }
}

/// What one step did.
struct StepDone {
    loss: f64,
    correct: usize,
    images: usize,
}

/// What every step of a rank shares.
struct StepContext<'a> {
    model: &'a dyn Classifier,
    device: &'a Device,
    data: &'a TrainData<'a>,
    config: &'a TrainConfig,
    all_vars: &'a [Var],
    world: usize,
}

impl StepContext<'_> {
    fn steps_per_epoch(&self) -> usize {
        self.data.n.div_ceil(self.config.batch_size)
    }

    fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.config.epochs
    }

    /// One optimizer step on this rank's shard (`shard` of a global batch of `global`): one
    /// forward pass over every view, CE (+ λ·JSD), gradients averaged over the ranks, SGD.
    fn train(
        &self,
        batch: TrainBatch,
        shard: usize,
        global: usize,
        (epoch, s): (usize, usize),
        opt: &mut Sgd,
        collective: Option<&mut (dyn Collective + '_)>,
    ) -> anyhow::Result<StepDone> {
        let (h, w, device) = (self.data.height, self.data.width, self.device);
        let b = batch.batch;
        if b != shard {
            bail!("the batch source returned {b} images for a batch of {shard}");
        }
        let x = unit_to_tensor(&batch.pixels, batch.views * b, h, w, device)?;
        let logits = self.model.forward_t(&x, true)?;
        let first = logits.narrow(0, 0, b)?;
        let (mut loss, labels_for_acc) = match &batch.targets {
            Targets::Hard(labels) => {
                let y = Tensor::from_slice(labels, b, device)?;
                (cross_entropy(&first, &y)?, labels.clone())
            }
            Targets::Soft(t) => {
                let y = Tensor::from_slice(t, (b, self.data.num_classes), device)?;
                let argmax: Vec<u32> = y.argmax(D::Minus1)?.to_vec1()?;
                (soft_cross_entropy(&first, &y)?, argmax)
            }
        };
        if batch.views == 3 {
            let a1 = logits.narrow(0, b, b)?;
            let a2 = logits.narrow(0, 2 * b, b)?;
            loss = (loss + jensen_shannon(&first, &a1, &a2, self.config.jsd_lambda)?)?;
        } else if batch.views != 1 {
            bail!("batch sources give 1 or 3 views, not {}", batch.views);
        }
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            bail!("training diverged at epoch {epoch}, step {s}: loss {loss_value} (lower the learning rate)");
        }
        let grads = match collective {
            None => loss.backward()?,
            Some(c) => {
                // The mean over ranks of shard means is the global batch mean when the shards
                // are equal; weight unequal shards by their size.
                let weight = (b * self.world) as f64 / global as f64;
                let mut grads = if weight == 1.0 {
                    loss.backward()?
                } else {
                    (loss * weight)?.backward()?
                };
                let trained: Vec<Var> = self
                    .all_vars
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
        let correct = preds
            .iter()
            .zip(&labels_for_acc)
            .filter(|(p, y)| p == y)
            .count();
        Ok(StepDone {
            loss: loss_value,
            correct,
            images: b,
        })
    }
}

/// Validation loss and accuracy (eval mode, this rank only).
fn validate(model: &dyn Classifier, v: &TrainData, device: &Device) -> anyhow::Result<(f64, f64)> {
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
    Ok((loss, acc))
}
