//! The training loop shared by every method. A method is a [`BatchSource`]: it turns the
//! indices of a batch into pixels (one view, or clean + two augmented views for the
//! Jensen–Shannon loss) and targets. The loop does the rest: seeded shuffling per epoch,
//! cosine learning rate per step, one forward pass over all views (as AugMix does, so
//! BatchNorm sees them together), CE (+ λ·JSD), SGD, validation with early stopping, and a
//! checkpoint after every epoch from which a killed run resumes with the same result.
//!
//! Randomness is derived, never carried: epoch `e`'s order comes from `(seed, e)`, batch `s`'s
//! augmentation from `(seed, e, s)`, so a resumed run needs no RNG state and per-image work
//! can run on any number of threads with the same bytes.

use crate::evaluate::predict;
use crate::input::{random_crop_flip, unit_to_tensor};
use crate::loss::{cross_entropy, jensen_shannon, soft_cross_entropy};
use crate::optim::{Sgd, SgdConfig};
use crate::schedule::cosine_lr;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use deeprepair_nn::Classifier;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;

/// Images the loop trains on: `n` u8 RGB HWC images.
#[derive(Clone, Copy)]
pub struct TrainData<'a> {
    pub images: &'a [u8],
    pub labels: &'a [u8],
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub num_classes: usize,
}

impl<'a> TrainData<'a> {
    pub fn image(&self, i: usize) -> &'a [u8] {
        let per = self.height * self.width * 3;
        &self.images[i * per..(i + 1) * per]
    }
}

pub enum Targets {
    Hard(Vec<u32>),
    /// `batch × classes`, rows summing to 1.
    Soft(Vec<f32>),
}

/// One batch as a method prepares it.
pub struct TrainBatch {
    /// `views × batch` HWC images in [0, 1], view-major: the first `batch` are the view the
    /// classification loss sees ("clean" for JSD methods).
    pub pixels: Vec<f32>,
    /// 1 (cross-entropy only) or 3 (clean + two views: CE + λ·JSD).
    pub views: usize,
    pub batch: usize,
    pub targets: Targets,
}

/// The model as a batch source may consult it (SENSEI's worst-variant search, FSGMix).
pub trait Scorer {
    /// Per-image cross-entropy in eval mode of `n` u8 HWC images.
    fn losses(&self, images: &[u8], labels: &[u8], n: usize) -> anyhow::Result<Vec<f32>>;
}

/// A repair method's data side: turns a batch's indices into views and targets.
pub trait BatchSource: Send + Sync {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: u64,
        scorer: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch>;
}

/// A seeded RNG for item `index` of stream `seed` (per-image randomness independent of threads).
pub fn item_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Mixes seed components into one (SplitMix64 steps).
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// Builds a batch of `views` per image in parallel: `view(img, label, rng)` returns `views`
/// images in [0, 1] (HWC); hard targets. The helper most sources use.
pub fn per_image_batch(
    data: &TrainData,
    indices: &[usize],
    seed: u64,
    views: usize,
    view: impl Fn(&[u8], u8, &mut ChaCha8Rng) -> anyhow::Result<Vec<Vec<f32>>> + Sync,
) -> anyhow::Result<TrainBatch> {
    let per_image: Vec<Vec<Vec<f32>>> = indices
        .par_iter()
        .enumerate()
        .map(|(pos, &i)| {
            let mut rng = item_rng(seed, pos as u64);
            let v = view(data.image(i), data.labels[i], &mut rng)?;
            if v.len() != views {
                bail!(
                    "a batch source returned {} views, expected {views}",
                    v.len()
                );
            }
            Ok(v)
        })
        .collect::<anyhow::Result<_>>()?;
    let per = data.height * data.width * 3;
    let mut pixels = Vec::with_capacity(views * indices.len() * per);
    for v in 0..views {
        for img in &per_image {
            pixels.extend_from_slice(&img[v]);
        }
    }
    Ok(TrainBatch {
        pixels,
        views,
        batch: indices.len(),
        targets: Targets::Hard(indices.iter().map(|&i| data.labels[i] as u32).collect()),
    })
}

/// [`per_image_batch`] after CIFAR's random crop + flip: `view(cropped, label, rng)`.
pub fn cropped_views(
    data: &TrainData,
    indices: &[usize],
    seed: u64,
    views: usize,
    view: impl Fn(&[u8], u8, &mut ChaCha8Rng) -> anyhow::Result<Vec<Vec<f32>>> + Sync,
) -> anyhow::Result<TrainBatch> {
    let (h, w) = (data.height, data.width);
    per_image_batch(data, indices, seed, views, |img, label, rng| {
        let base = random_crop_flip(img, h, w, 4, rng);
        view(&base, label, rng)
    })
}

pub fn to_unit(img: &[u8]) -> Vec<f32> {
    img.iter().map(|&v| v as f32 / 255.0).collect()
}

/// Plain training data: random crop + flip, cross-entropy (FT-woAug, pretraining).
pub struct StandardAugment;

impl BatchSource for StandardAugment {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: u64,
        _scorer: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch> {
        cropped_views(data, indices, seed, 1, |base, _, _| Ok(vec![to_unit(base)]))
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    /// The cosine schedule's floor (AugMix: 1e-6).
    pub min_lr: f64,
    pub seed: u64,
    /// Stop when validation loss has not improved for this many epochs and restore the best
    /// weights (DeepRepair: 10). Needs validation data.
    pub patience: Option<usize>,
    /// Weight of the JS consistency term for 3-view sources (AugMix: 12).
    pub jsd_lambda: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            sgd: SgdConfig::default(),
            min_lr: 1e-6,
            seed: 0,
            patience: None,
            jsd_lambda: 12.0,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub lr: f64,
    pub images_per_second: f64,
}

/// Where the loop reports progress and hands over checkpoints; an error stops training
/// (cancellation).
pub trait TrainObserver {
    fn step(&mut self, _done: usize, _total: usize) -> anyhow::Result<()> {
        Ok(())
    }
    /// After each epoch, with the bytes to resume from.
    fn epoch(&mut self, _stats: &EpochStats, _checkpoint: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TrainObserver for () {}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Progress {
    next_epoch: usize,
    best_val_loss: Option<f64>,
    best_epoch: Option<usize>,
    epochs_since_best: usize,
    history: Vec<EpochStats>,
    stopped_early: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainOutcome {
    pub history: Vec<EpochStats>,
    pub stopped_early: bool,
    /// The epoch whose weights the model holds when early stopping restored the best.
    pub best_epoch: Option<usize>,
}

fn snapshot(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
        .collect()
}

fn restore(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .with_context(|| format!("checkpoint lacks variable {name}"))?;
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

fn encode_checkpoint(
    varmap: &VarMap,
    opt: &Sgd,
    best: Option<&HashMap<String, Tensor>>,
    progress: &Progress,
) -> anyhow::Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in snapshot(varmap) {
        tensors.push((format!("model/{k}"), v.to_device(&Device::Cpu)?));
    }
    for (k, v) in opt.buffers() {
        tensors.push((format!("sgd/{k}"), v.to_device(&Device::Cpu)?));
    }
    if let Some(best) = best {
        for (k, v) in best {
            tensors.push((format!("best/{k}"), v.to_device(&Device::Cpu)?));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = HashMap::from([("progress".to_string(), serde_json::to_string(progress)?)]);
    Ok(safetensors::serialize(tensors, Some(meta))?)
}

type Decoded = (
    HashMap<String, Tensor>,
    HashMap<String, Tensor>,
    Option<HashMap<String, Tensor>>,
    Progress,
);

fn decode_checkpoint(bytes: &[u8], device: &Device) -> anyhow::Result<Decoded> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)?;
    let progress: Progress = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("progress"))
            .context("checkpoint without progress metadata")?,
    )?;
    let all = candle_core::safetensors::load_buffer(bytes, device)?;
    let (mut model, mut sgd, mut best) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (k, v) in all {
        if let Some(name) = k.strip_prefix("model/") {
            model.insert(name.to_string(), v);
        } else if let Some(name) = k.strip_prefix("sgd/") {
            sgd.insert(name.to_string(), v);
        } else if let Some(name) = k.strip_prefix("best/") {
            best.insert(name.to_string(), v);
        }
    }
    Ok((model, sgd, (!best.is_empty()).then_some(best), progress))
}

struct ModelScorer<'a> {
    model: &'a dyn Classifier,
    height: usize,
    width: usize,
    device: &'a Device,
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

/// Trains `model` (whose variables live in `varmap`) on `data` with `source`'s batches.
/// `resume`: the bytes of the last checkpoint an observer received, to continue a killed run.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &dyn Classifier,
    varmap: &VarMap,
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
    device: &Device,
    resume: Option<&[u8]>,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainOutcome> {
    if data.n == 0 {
        bail!("no training images");
    }
    if config.batch_size < 2 {
        bail!("batch size must be at least 2 (BatchNorm needs batch statistics)");
    }
    if config.patience.is_some() && validation.is_none() {
        bail!("early stopping (patience) needs validation data");
    }
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
    let (h, w) = (data.height, data.width);
    let steps_per_epoch = data.n.div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;
    let scorer = ModelScorer {
        model,
        height: h,
        width: w,
        device,
    };
    while progress.next_epoch < config.epochs && !progress.stopped_early {
        let epoch = progress.next_epoch;
        let started = std::time::Instant::now();
        let mut order: Vec<usize> = (0..data.n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[
            config.seed,
            epoch as u64,
        ])));
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = config.sgd.lr;
        for (s, chunk) in order.chunks(config.batch_size).enumerate() {
            if chunk.len() < 2 {
                continue; // a batch of one has no batch statistics
            }
            let step = epoch * steps_per_epoch + s;
            lr = cosine_lr(step, total_steps, config.sgd.lr, config.min_lr);
            opt.set_lr(lr);
            let batch = source.make_batch(
                data,
                chunk,
                mix_seed(&[config.seed, epoch as u64, s as u64]),
                &scorer,
            )?;
            let b = batch.batch;
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
            opt.step(&loss.backward()?)?;
            let preds: Vec<u32> = first.argmax(D::Minus1)?.to_vec1()?;
            correct += preds
                .iter()
                .zip(&labels_for_acc)
                .filter(|(p, y)| p == y)
                .count();
            loss_sum += loss_value * b as f64;
            seen += b;
            observer.step(step + 1, total_steps)?;
        }
        let (val_loss, val_accuracy) = match validation {
            Some(v) => {
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
                (Some(loss), Some(acc))
            }
            None => (None, None),
        };
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            val_loss,
            val_accuracy,
            lr,
            images_per_second: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        if let (Some(patience), Some(vl)) = (config.patience, val_loss) {
            if progress.best_val_loss.is_none_or(|b| vl < b) {
                progress.best_val_loss = Some(vl);
                progress.best_epoch = Some(epoch);
                progress.epochs_since_best = 0;
                best = Some(snapshot(varmap));
            } else {
                progress.epochs_since_best += 1;
                if progress.epochs_since_best >= patience {
                    progress.stopped_early = true;
                }
            }
        }
        progress.history.push(stats.clone());
        progress.next_epoch = epoch + 1;
        let checkpoint = encode_checkpoint(varmap, &opt, best.as_ref(), &progress)?;
        observer.epoch(&stats, &checkpoint)?;
    }
    if let Some(best) = &best {
        restore(varmap, best)?;
    }
    Ok(TrainOutcome {
        history: progress.history,
        stopped_early: progress.stopped_early,
        best_epoch: best.as_ref().and(progress.best_epoch),
    })
}
