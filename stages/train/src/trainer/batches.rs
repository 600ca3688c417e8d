//! What a batch is and who makes it: training images, targets, the seeds of a batch, the
//! [`BatchSource`] trait every method implements, and the shared per-image helpers.

use crate::input::random_crop_flip;
use anyhow::bail;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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
