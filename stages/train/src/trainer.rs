//! The training loop shared by every method. A method is a [`BatchSource`]: it turns the
//! indices of a batch into pixels (one view, or clean + two augmented views for the
//! Jensen–Shannon loss) and targets. The loop does the rest: seeded shuffling per epoch,
//! cosine learning rate per step, one forward pass over all views (as AugMix does, so
//! BatchNorm sees them together), CE (+ λ·JSD), SGD, validation with early stopping, and a
//! checkpoint after every epoch from which a killed run resumes with the same result.
//!
//! Randomness is derived, never carried: epoch `e`'s order comes from `(seed, e)`, batch `s`'s
//! augmentation from `(seed, e, s)` and an image's from its position in the global batch, so a
//! resumed run needs no RNG state and per-image work can run on any number of threads (or
//! data-parallel ranks) with the same bytes.
//!
//! Prefetching: a source that does not consult the model ([`BatchSource::uses_model`]) builds
//! batches `s+1 … s+depth` on a producer thread while step `s` trains
//! ([`TrainConfig::prefetch`]); the batches are the same bytes either way.
//!
//! Data parallelism ([`train_data_parallel`]): N ranks (threads; each may own a GPU) each take a
//! contiguous shard of every global batch, average gradients with a
//! [`Collective`](deeprepair_workers::data_parallel::Collective) before every step, keep their
//! own BatchNorm statistics (PyTorch DDP's default; rank 0's are the ones saved) and take the
//! same early-stopping decisions (rank 0 validates and broadcasts them).

use crate::evaluate::predict;
use crate::input::{random_crop_flip, unit_to_tensor};
use crate::loss::{cross_entropy, jensen_shannon, soft_cross_entropy};
use crate::optim::{Sgd, SgdConfig};
use crate::schedule::cosine_lr;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use deeprepair_nn::sync_bn::{self, BatchStatsReducer};
use deeprepair_nn::Classifier;
use deeprepair_workers::data_parallel::{
    all_reduce_gradients, broadcast_weights, is_group_aborted, AbortOnDrop, Collective,
    GroupAborted, ThreadCollective, DEFAULT_BUCKET_BYTES,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

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

/// The randomness of one batch (or of one rank's shard of it): the batch's seed, derived from
/// `(seed, epoch, step)`, and where the shard's first image sits in the global batch, so an
/// image gets the same augmentation however the batch is split across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSeed {
    pub seed: u64,
    /// Position of `indices[0]` in the global batch (0 on a single rank).
    pub offset: usize,
}

impl BatchSeed {
    /// A whole batch (no sharding).
    pub fn new(seed: u64) -> Self {
        BatchSeed { seed, offset: 0 }
    }
    /// The RNG of the image at position `pos` of this shard.
    pub fn item(&self, pos: usize) -> ChaCha8Rng {
        item_rng(self.seed, (self.offset + pos) as u64)
    }
    /// The RNG of batch-level choices (Mixup's λ and pairing, SENSEI's GA); every shard of a
    /// batch draws the same stream.
    pub fn batch_rng(&self) -> ChaCha8Rng {
        item_rng(self.seed, u64::MAX)
    }
}

/// A repair method's data side: turns a batch's indices into views and targets.
pub trait BatchSource: Send + Sync {
    fn make_batch(
        &self,
        data: &TrainData,
        indices: &[usize],
        seed: BatchSeed,
        scorer: &dyn Scorer,
    ) -> anyhow::Result<TrainBatch>;

    /// Whether `make_batch` consults the model through its [`Scorer`] (SENSEI's worst-variant
    /// search): such a batch depends on the current weights, so it is built in the loop, never
    /// ahead on the prefetch thread (which gets a scorer that refuses).
    fn uses_model(&self) -> bool {
        false
    }

    /// The state the source carries from batch to batch (SENSEI's GA populations), as bytes;
    /// `None` for a stateless source. Every checkpoint holds it, taken after the epoch's last
    /// batch, so a resumed run continues from the same state. A source with state is built in
    /// the loop, never prefetched.
    fn save_state(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Puts back what [`BatchSource::save_state`] returned (before training resumes).
    fn restore_state(&self, _state: &[u8]) -> anyhow::Result<()> {
        bail!("this batch source keeps no state, but the checkpoint holds some")
    }
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
    seed: BatchSeed,
    views: usize,
    view: impl Fn(&[u8], u8, &mut ChaCha8Rng) -> anyhow::Result<Vec<Vec<f32>>> + Sync,
) -> anyhow::Result<TrainBatch> {
    let per_image: Vec<Vec<Vec<f32>>> = indices
        .par_iter()
        .enumerate()
        .map(|(pos, &i)| {
            let mut rng = seed.item(pos);
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
    seed: BatchSeed,
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
        seed: BatchSeed,
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
    /// Stop when the monitored validation score has not improved for this many epochs
    /// (the official DeepRepair code: 5 on the validation loss). Needs validation data. The
    /// cosine schedule still spans `epochs`: a run that stops early ends above `min_lr`, and
    /// [`TrainOutcome::stopped_early_at_lr`] says at which rate.
    pub patience: Option<usize>,
    /// What "best epoch" means, for early stopping and for [`TrainConfig::keep_best`].
    #[serde(default)]
    pub monitor: Monitor,
    /// With validation data, end with the weights of the best epoch by `monitor` (both papers
    /// keep the pretrained base of best validation accuracy); otherwise the last epoch's.
    #[serde(default)]
    pub keep_best: bool,
    /// Weight of the JS consistency term for 3-view sources (AugMix: 12).
    pub jsd_lambda: f64,
    /// Batches built ahead on a producer thread while the current step trains (0: build each
    /// batch in the loop). Does not change results; ignored for sources that consult the model.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Data-parallel runs: training-mode BatchNorm normalizes with the statistics of the whole
    /// global batch, reduced across ranks (PyTorch's `SyncBatchNorm`), instead of each rank's
    /// shard (DDP's default). No effect on one rank.
    #[serde(default)]
    pub sync_batch_norm: bool,
}

/// [`TrainConfig::prefetch`]'s default.
pub const DEFAULT_PREFETCH: usize = 2;

fn default_prefetch() -> usize {
    DEFAULT_PREFETCH
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
            monitor: Monitor::ValLoss,
            keep_best: false,
            jsd_lambda: 12.0,
            prefetch: DEFAULT_PREFETCH,
            sync_batch_norm: false,
        }
    }
}

/// The validation score that decides the best epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// Lower clean validation loss is better (early stopping in the official DeepRepair code).
    #[default]
    ValLoss,
    /// Higher clean validation accuracy is better (how both papers pick the pretrained base).
    ValAccuracy,
}

impl Monitor {
    pub const NAMES: [&'static str; 2] = ["val_loss", "val_accuracy"];

    pub fn from_name(name: &str) -> Option<Monitor> {
        match name {
            "val_loss" => Some(Monitor::ValLoss),
            "val_accuracy" => Some(Monitor::ValAccuracy),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
        }
    }

    /// The monitored score of an epoch, oriented so that lower is better.
    fn score(self, val_loss: f64, val_accuracy: f64) -> f64 {
        match self {
            Monitor::ValLoss => val_loss,
            Monitor::ValAccuracy => -val_accuracy,
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
    /// The best epoch's monitored score, lower is better ([`Monitor::score`]).
    #[serde(alias = "best_val_loss")]
    best_score: Option<f64>,
    best_epoch: Option<usize>,
    epochs_since_best: usize,
    history: Vec<EpochStats>,
    stopped_early: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainOutcome {
    pub history: Vec<EpochStats>,
    /// The epochs the cosine schedule was planned over.
    #[serde(default)]
    pub planned_epochs: usize,
    pub stopped_early: bool,
    /// When early stopping ended the run: the learning rate of its last step (above the
    /// schedule's floor: the run was not fully annealed).
    #[serde(default)]
    pub stopped_early_at_lr: Option<f64>,
    /// What chose `best_epoch`.
    #[serde(default)]
    pub monitor: Option<Monitor>,
    /// The epoch whose weights the model holds when the best epoch was kept (early stopping or
    /// `keep_best`); `None`: the last epoch's.
    pub best_epoch: Option<usize>,
}

impl TrainOutcome {
    /// One line for the stage log and the record: how the run ended and which weights it kept.
    pub fn summary(&self) -> String {
        let ran = self.history.len();
        let mut s = match (self.stopped_early, self.stopped_early_at_lr) {
            (true, Some(lr)) => format!(
                "stopped early after epoch {ran} of {} at lr {lr:.2e} (the cosine schedule over \
                 {} epochs was not finished)",
                self.planned_epochs, self.planned_epochs
            ),
            _ => format!("ran all {ran} of {} epochs", self.planned_epochs),
        };
        match (self.best_epoch, self.monitor) {
            (Some(b), Some(m)) => {
                s.push_str(&format!("; kept epoch {} (best {})", b + 1, m.name()))
            }
            _ => s.push_str("; kept the last epoch"),
        }
        s
    }
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

/// The checkpoint's tensor holding the batch source's state, as bytes.
const SOURCE_STATE: &str = "source/state";

fn encode_checkpoint(
    varmap: &VarMap,
    opt: &Sgd,
    best: Option<&HashMap<String, Tensor>>,
    progress: &Progress,
    source_state: Option<Vec<u8>>,
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
    if let Some(state) = source_state {
        let len = state.len();
        tensors.push((
            SOURCE_STATE.to_string(),
            Tensor::from_vec(state, len, &Device::Cpu)?,
        ));
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

/// Puts the batch source's state from checkpoint `resume` back, if it holds one (checkpoints
/// written before sources had state hold none: the source then starts afresh). Called once,
/// before any rank starts: every rank shares the source.
fn restore_source_state(source: &dyn BatchSource, resume: Option<&[u8]>) -> anyhow::Result<()> {
    let Some(bytes) = resume else {
        return Ok(());
    };
    let tensors =
        safetensors::SafeTensors::deserialize(bytes).context("reading the training checkpoint")?;
    if let Ok(state) = tensors.tensor(SOURCE_STATE) {
        source
            .restore_state(state.data())
            .context("restoring the batch source's state from the checkpoint")?;
    }
    Ok(())
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

/// The scorer batches built ahead get: a source that scores must say so (`uses_model`).
struct NoScorer;

impl Scorer for NoScorer {
    fn losses(&self, _: &[u8], _: &[u8], _: usize) -> anyhow::Result<Vec<f32>> {
        bail!("this batch source consults the model; its BatchSource::uses_model must return true")
    }
}

/// One rank's model: its variables and the device it computes on.
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    pub model: &'a dyn Classifier,
    pub varmap: &'a VarMap,
    pub device: &'a Device,
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
    check_inputs(data, validation, config, 1)?;
    restore_source_state(source, resume)?;
    let replica = Replica {
        model,
        varmap,
        device,
    };
    run_rank(
        replica,
        data,
        validation,
        source,
        config,
        resume,
        Some(observer),
        None,
        None,
    )
}

/// [`train`] with `replicas.len()` data-parallel ranks, one thread each, joined by a
/// [`ThreadCollective`]. Every replica must be the same architecture; rank 0's initial weights
/// are broadcast to the others (or all come from `resume`). Rank `r` of a global batch of
/// `config.batch_size` trains on its `r`-th contiguous shard; gradients are averaged before
/// every step, so every rank holds the same trainable weights throughout. BatchNorm running
/// statistics stay per rank (or, with [`TrainConfig::sync_batch_norm`], come from the whole
/// batch on every rank); rank 0's `varmap` holds the result. Only rank 0 reports to
/// `observer` (its checkpoints resume a data-parallel run with the same number of ranks).
/// A rank that fails fails the whole call (the others are released, not left waiting).
#[allow(clippy::too_many_arguments)]
pub fn train_data_parallel(
    replicas: &[Replica],
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
    resume: Option<&[u8]>,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainOutcome> {
    let world = replicas.len();
    let batch_norm =
        (config.sync_batch_norm && world > 1).then(|| ThreadCollective::boxed_group(world));
    train_with_collectives(
        replicas,
        ThreadCollective::boxed_group(world),
        batch_norm,
        data,
        validation,
        source,
        config,
        resume,
        observer,
    )
}

/// [`train_data_parallel`] over any collective backend: `collectives[r]` is rank `r`'s handle
/// (e.g. NCCL communicators, one per GPU). With [`TrainConfig::sync_batch_norm`] on several
/// ranks, `batch_norm_collectives` is a second group of the same ranks: BatchNorm reduces
/// inside the forward and backward passes, so it gets a group of its own.
#[allow(clippy::too_many_arguments)]
pub fn train_with_collectives(
    replicas: &[Replica],
    collectives: Vec<Box<dyn Collective>>,
    batch_norm_collectives: Option<Vec<Box<dyn Collective>>>,
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
    resume: Option<&[u8]>,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainOutcome> {
    let world = replicas.len();
    if world == 0 {
        bail!("data-parallel training needs at least one rank");
    }
    if collectives.len() != world {
        bail!("{} collective handles for {world} ranks", collectives.len());
    }
    let check_group = |what: &str, handles: &[Box<dyn Collective>]| -> anyhow::Result<()> {
        if handles.len() != world {
            bail!("{} {what} handles for {world} ranks", handles.len());
        }
        for (r, c) in handles.iter().enumerate() {
            if c.rank() != r || c.world_size() != world {
                bail!(
                    "{what} handle {r} is rank {} of {}, expected rank {r} of {world}",
                    c.rank(),
                    c.world_size()
                );
            }
        }
        Ok(())
    };
    check_group("collective", &collectives)?;
    let batch_norm_groups: Vec<Option<Arc<BatchNormGroup>>> = match batch_norm_collectives {
        _ if !config.sync_batch_norm || world == 1 => vec![None; world],
        None => bail!("sync_batch_norm on {world} ranks needs a batch-norm collective group"),
        Some(handles) => {
            check_group("batch-norm collective", &handles)?;
            handles
                .into_iter()
                .map(|c| Some(Arc::new(BatchNormGroup::new(c, world))))
                .collect()
        }
    };
    check_inputs(data, validation, config, world)?;
    restore_source_state(source, resume)?;
    let mut ranks = collectives.into_iter().zip(batch_norm_groups);
    let (mut first, first_bn) = ranks.next().expect("world ≥ 1");
    std::thread::scope(|scope| {
        let others: Vec<_> = ranks
            .zip(&replicas[1..])
            .map(|((mut c, bn), &replica)| {
                scope.spawn(move || {
                    run_guarded_rank(
                        replica, &mut *c, bn, data, validation, source, config, resume, None,
                    )
                })
            })
            .collect();
        let mine = run_guarded_rank(
            replicas[0],
            &mut *first,
            first_bn,
            data,
            validation,
            source,
            config,
            resume,
            Some(observer),
        );
        let mut errors: Vec<anyhow::Error> = Vec::new();
        let mut outcome = None;
        match mine {
            Ok(o) => outcome = Some(o),
            Err(e) => errors.push(e.context("data-parallel rank 0")),
        }
        for (i, h) in others.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e.context(format!("data-parallel rank {}", i + 1))),
                Err(_) => errors.push(anyhow::anyhow!("data-parallel rank {} panicked", i + 1)),
            }
        }
        if errors.is_empty() {
            return Ok(outcome.expect("rank 0 succeeded"));
        }
        // Report why the group failed, not the ranks that were merely released.
        let cause = errors
            .iter()
            .position(|e| !is_group_aborted(e))
            .unwrap_or(0);
        Err(errors.swap_remove(cause))
    })
}

/// One rank of a data-parallel group whose other ranks run in other processes (each calls
/// this with its own handles, e.g. [`deeprepair_workers::socket_collective::SocketCollective`]
/// or NCCL communicators joined through the dispatcher). Rank 0 reports and checkpoints
/// through `observer`; the others pass `None`. Same steps as [`train_with_collectives`].
#[allow(clippy::too_many_arguments)]
pub fn train_rank(
    replica: Replica,
    mut collective: Box<dyn Collective>,
    batch_norm_collective: Option<Box<dyn Collective>>,
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
    resume: Option<&[u8]>,
    observer: Option<&mut dyn TrainObserver>,
) -> anyhow::Result<TrainOutcome> {
    let (rank, world) = (collective.rank(), collective.world_size());
    if observer.is_some() != (rank == 0) {
        bail!("rank 0, and only rank 0, reports and checkpoints (rank {rank} of {world})");
    }
    let batch_norm = match batch_norm_collective {
        _ if !config.sync_batch_norm || world == 1 => None,
        None => bail!("sync_batch_norm on {world} ranks needs a batch-norm collective group"),
        Some(c) if c.rank() != rank || c.world_size() != world => bail!(
            "the batch-norm collective is rank {} of {}, the gradient one rank {rank} of {world}",
            c.rank(),
            c.world_size()
        ),
        Some(c) => Some(Arc::new(BatchNormGroup::new(c, world))),
    };
    check_inputs(data, validation, config, world)?;
    restore_source_state(source, resume)?;
    run_guarded_rank(
        replica,
        &mut *collective,
        batch_norm,
        data,
        validation,
        source,
        config,
        resume,
        observer,
    )
}

/// [`run_rank`] holding the abort guards: a rank that fails (or unwinds) releases the ranks
/// waiting for it in either group.
#[allow(clippy::too_many_arguments)]
fn run_guarded_rank(
    replica: Replica,
    collective: &mut dyn Collective,
    batch_norm: Option<Arc<BatchNormGroup>>,
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
    resume: Option<&[u8]>,
    observer: Option<&mut dyn TrainObserver>,
) -> anyhow::Result<TrainOutcome> {
    let mut guard = AbortOnDrop::new(collective);
    let bn_guard = AbortBatchNormOnDrop(batch_norm.clone());
    let result = run_rank(
        replica,
        data,
        validation,
        source,
        config,
        resume,
        observer,
        Some(guard.get()),
        batch_norm.clone(),
    );
    if result.is_ok() {
        guard.disarm();
        bn_guard.disarm();
    } else {
        drop(guard);
        drop(bn_guard);
    }
    released_by_batch_norm(result, batch_norm.as_deref())
}

/// A rank's handle on the group that synchronized BatchNorm reduces over.
struct BatchNormGroup {
    collective: Mutex<Box<dyn Collective>>,
    world: usize,
    /// A reduction found the group aborted: this rank was released, it is not the cause.
    released: AtomicBool,
}

impl BatchNormGroup {
    fn new(collective: Box<dyn Collective>, world: usize) -> Self {
        BatchNormGroup {
            collective: Mutex::new(collective),
            world,
            released: AtomicBool::new(false),
        }
    }

    fn abort(&self) {
        let mut c = self.collective.lock().unwrap_or_else(|p| p.into_inner());
        c.abort();
    }
}

impl BatchStatsReducer for BatchNormGroup {
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let mut c = self
            .collective
            .lock()
            .map_err(|_| candle_core::Error::Msg("a rank panicked in batch-norm".into()))?;
        match c.all_reduce_mean_tensor(&t.flatten_all()?) {
            Ok(mean) => mean.reshape(t.shape()),
            Err(e) => {
                if is_group_aborted(&e) {
                    self.released.store(true, Ordering::SeqCst);
                }
                Err(candle_core::Error::Msg(format!(
                    "synchronized batch-norm: {e:#}"
                )))
            }
        }
    }
}

/// Aborts the batch-norm group when dropped (a rank failing or unwinding), unless disarmed.
struct AbortBatchNormOnDrop(Option<Arc<BatchNormGroup>>);

impl AbortBatchNormOnDrop {
    /// The rank finished normally: dropping no longer aborts.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortBatchNormOnDrop {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.abort();
        }
    }
}

/// A rank whose batch-norm reduction was cut short by another rank's failure reports
/// [`GroupAborted`], so the caller names the rank that failed first.
fn released_by_batch_norm<T>(
    result: anyhow::Result<T>,
    group: Option<&BatchNormGroup>,
) -> anyhow::Result<T> {
    match (result, group) {
        (Err(e), Some(g)) if g.released.load(Ordering::SeqCst) && !is_group_aborted(&e) => {
            Err(anyhow::Error::new(GroupAborted).context(format!("{e:#}")))
        }
        (result, _) => result,
    }
}

fn check_inputs(
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
fn epoch_batches(
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
fn shard_range(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    (rank * len / world)..((rank + 1) * len / world)
}

/// The training loop of one rank (`collective`: `None` on a single rank). Only the rank that
/// gets an `observer` reports and checkpoints.
#[allow(clippy::too_many_arguments)]
fn run_rank(
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

/// Fails unless every rank ends with rank 0's trainable weights (what averaging gradients
/// promises; BatchNorm running statistics may differ per rank): a broken reduction or a
/// diverged rank fails the stage rather than saving one rank's model as if it were all.
/// Rank 0 broadcasts its weights' BLAKE3 digest (as 16 small integers, which any f32
/// collective carries exactly); each rank compares it with its own and the verdicts are
/// all-reduced, so every rank sees any difference.
fn check_ranks_agree(collective: &mut dyn Collective, varmap: &VarMap) -> anyhow::Result<()> {
    let mut hasher = blake3::Hasher::new();
    // In name order, so every rank hashes the same sequence.
    for var in deeprepair_nn::trainable_vars(varmap) {
        let values: Vec<f32> = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        hasher.update(&bytes);
    }
    let mine: Vec<f32> = hasher
        .finalize()
        .as_bytes()
        .chunks(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]) as f32)
        .collect();
    let mut rank0 = mine.clone();
    collective
        .broadcast(&mut rank0, 0)
        .context("comparing the ranks' trained weights")?;
    let mut differ = [if rank0 == mine { 0.0 } else { 1.0 }];
    collective
        .all_reduce_mean(&mut differ)
        .context("comparing the ranks' trained weights")?;
    if differ[0] > 0.0 {
        bail!(
            "the data-parallel ranks ended with different trained weights (seen by rank {} \
             of {}): the gradient reduction did not keep them in step",
            collective.rank(),
            collective.world_size()
        );
    }
    Ok(())
}

/// The variables of `varmap`, sorted by name (every rank lists them in the same order).
fn sorted_vars(varmap: &VarMap) -> Vec<Var> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().map(|(_, v)| v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeprepair_workers::data_parallel::ThreadCollective;

    /// A rank's variables: a trained weight ending in `last`, a running mean of `running`.
    fn rank_vars(last: f32, running: f32) -> VarMap {
        let varmap = VarMap::new();
        let var = |v: &[f32]| Var::from_slice(v, v.len(), &Device::Cpu).unwrap();
        let mut data = varmap.data().lock().unwrap();
        data.insert("fc.weight".into(), var(&[1.0, -2.5, last]));
        data.insert("bn.running_mean".into(), var(&[running]));
        drop(data);
        varmap
    }

    fn check_three(ranks: [(f32, f32); 3]) -> Vec<bool> {
        let handles: Vec<_> = ThreadCollective::group(3)
            .into_iter()
            .zip(ranks)
            .map(|(mut c, (last, running))| {
                std::thread::spawn(move || check_ranks_agree(&mut c, &rank_vars(last, running)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().is_ok())
            .collect()
    }

    #[test]
    fn ranks_agree_only_when_their_trained_weights_are_equal() {
        // Running statistics may differ per rank (DDP's default BatchNorm).
        assert_eq!(check_three([(0.5, 0.0), (0.5, 1.0), (0.5, 2.0)]), [true; 3]);
        // One rank's trained weight differs by one ulp: every rank fails.
        let off = f32::from_bits(0.5f32.to_bits() + 1);
        assert_eq!(
            check_three([(0.5, 0.0), (0.5, 0.0), (off, 0.0)]),
            [false; 3]
        );
    }
}
