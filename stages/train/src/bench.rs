//! `deeprepair bench train`: training and evaluation images/second of an architecture on a
//! device, on synthetic 32×32 images (throughput does not depend on pixel values): the model
//! alone on a fixed batch ([`bench_train`]) and the real loop with a method's batch
//! construction, with and without prefetching ([`bench_train_loop`]). `deeprepair bench
//! augment`: a batch source's images/second per thread count ([`bench_source`]).

use crate::gpu_usage::{GpuSampler, GpuUsage};
use crate::init::seeded_var_builder;
use crate::optim::{Sgd, SgdConfig};
use crate::trainer::{
    train, train_data_parallel, BatchSeed, BatchSource, Replica, Scorer, TrainConfig, TrainData,
    TrainJob, TrainObserver,
};
use crate::{input::unit_to_tensor, loss};
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use deeprepair_nn::{build, Arch};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainBench {
    pub arch: String,
    pub batch: usize,
    pub jsd: bool,
    pub device: String,
    /// Training images/second (with JSD: clean images, each forwarded as 3 views).
    pub train_images_per_second: f64,
    pub eval_images_per_second: f64,
    pub steps: usize,
    /// During the timed training steps / eval batches (GPU runs with NVML only).
    pub train_gpu: Option<GpuUsage>,
    pub eval_gpu: Option<GpuUsage>,
}

/// Times `steps` optimizer steps (after one warm-up step) and `steps` eval batches.
pub fn bench_train(
    arch: Arch,
    batch: usize,
    jsd: bool,
    steps: usize,
    device: &Device,
) -> anyhow::Result<TrainBench> {
    let varmap = VarMap::new();
    let model = build(arch, 10, seeded_var_builder(&varmap, 0, DType::F32, device))?;
    let mut opt = Sgd::new(&varmap, SgdConfig::default());
    let views = if jsd { 3 } else { 1 };
    let pixels: Vec<f32> = (0..views * batch * 32 * 32 * 3)
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let x = unit_to_tensor(&pixels, views * batch, 32, 32, device)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let y = Tensor::from_slice(&labels, batch, device)?;
    let step = |opt: &mut Sgd| -> anyhow::Result<()> {
        let logits = model.forward_t(&x, true)?;
        let clean = logits.narrow(0, 0, batch)?;
        let mut l = loss::cross_entropy(&clean, &y)?;
        if jsd {
            let a1 = logits.narrow(0, batch, batch)?;
            let a2 = logits.narrow(0, 2 * batch, batch)?;
            l = (l + loss::jensen_shannon(&clean, &a1, &a2, 12.0)?)?;
        }
        opt.step(&l.backward()?)?;
        Ok(())
    };
    step(&mut opt)?;
    device.synchronize()?;
    let sampler = GpuSampler::start(device);
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut opt)?;
    }
    device.synchronize()?;
    let train = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    let train_gpu = sampler.and_then(GpuSampler::finish);
    let xe = x.narrow(0, 0, batch)?;
    model.forward_t(&xe, false)?;
    device.synchronize()?;
    let sampler = GpuSampler::start(device);
    let t = Instant::now();
    for _ in 0..steps {
        model.forward_t(&xe, false)?.argmax(1)?.to_vec1::<u32>()?;
    }
    let eval = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    let eval_gpu = sampler.and_then(GpuSampler::finish);
    Ok(TrainBench {
        arch: arch.name().to_string(),
        batch,
        jsd,
        device: format!("{device:?}"),
        train_images_per_second: train,
        eval_images_per_second: eval,
        steps,
        train_gpu,
        eval_gpu,
    })
}

/// `n` seeded 32×32 RGB images with structure (gradients, blocks, noise), so augmentation ops
/// do representative work; labels cycle over 10 classes.
pub fn synthetic_images(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut images = Vec::with_capacity(n * 32 * 32 * 3);
    for _ in 0..n {
        let (a, b) = (next() % 8, next() % 8);
        for y in 0..32u32 {
            for x in 0..32u32 {
                for c in 0..3u32 {
                    let block = if (x / 8 + y / 8 + a) % 2 == 0 { 60 } else { 0 };
                    let grad = (x * (c + 1) * 3 + y * (b + 1) * 2) % 150;
                    images.push((grad + block + next() % 40) as u8);
                }
            }
        }
    }
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    (images, labels)
}

/// How [`bench_train_loop`] trains.
#[derive(Clone, Copy, Debug)]
pub struct LoopOptions {
    /// Batches built ahead on the producer thread.
    pub prefetch: usize,
    /// Data-parallel ranks, all on the benchmark's device (threads sharing it).
    pub ranks: usize,
    pub sync_batch_norm: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LoopBench {
    pub prefetch: usize,
    pub ranks: usize,
    pub sync_batch_norm: bool,
    /// Training images/second of the real loop, batch construction included.
    pub train_images_per_second: f64,
    pub steps: usize,
    /// During the timed steps (GPU runs with NVML only).
    pub gpu: Option<GpuUsage>,
}

/// Times `steps` steps (after one warm-up step) of the real training loop ([`train`], or
/// [`train_data_parallel`] over `options.ranks` replicas on `device`) with `source` building
/// every batch, `options.prefetch` batches ahead, on synthetic 32×32 images.
pub fn bench_train_loop(
    arch: Arch,
    batch: usize,
    steps: usize,
    source: &dyn BatchSource,
    options: LoopOptions,
    device: &Device,
) -> anyhow::Result<LoopBench> {
    let LoopOptions {
        prefetch,
        ranks,
        sync_batch_norm,
    } = options;
    if batch < 2 * ranks.max(1) || steps == 0 {
        anyhow::bail!(
            "the training-loop benchmark needs a step and a batch of at least 2 per rank"
        );
    }
    let n = batch * (steps + 1);
    let (images, labels) = synthetic_images(n, 1);
    let data = TrainData {
        images: &images,
        labels: &labels,
        n,
        height: 32,
        width: 32,
        num_classes: 10,
    };
    let models = (0..ranks.max(1))
        .map(|_| {
            let varmap = VarMap::new();
            let model = build(arch, 10, seeded_var_builder(&varmap, 0, DType::F32, device))?;
            Ok((varmap, model))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = TrainConfig {
        epochs: 1,
        batch_size: batch,
        prefetch,
        sync_batch_norm,
        sgd: SgdConfig {
            lr: 0.01,
            ..SgdConfig::default()
        },
        ..TrainConfig::default()
    };
    /// Time of each finished step; samples the GPU from the first (warm-up) step's end to
    /// the last step's.
    struct Clock<'d> {
        times: Vec<Instant>,
        device: &'d Device,
        last: usize,
        sampler: Option<GpuSampler>,
        gpu: Option<GpuUsage>,
    }
    impl TrainObserver for Clock<'_> {
        fn step(&mut self, done: usize, _: usize) -> anyhow::Result<()> {
            self.times.push(Instant::now());
            if done == 1 {
                self.sampler = GpuSampler::start(self.device);
            } else if done == self.last {
                self.gpu = self.sampler.take().and_then(GpuSampler::finish);
            }
            Ok(())
        }
    }
    let mut clock = Clock {
        times: Vec::with_capacity(steps + 1),
        device,
        last: steps + 1,
        sampler: None,
        gpu: None,
    };
    if models.len() == 1 {
        let (varmap, model) = &models[0];
        let replica = Replica {
            model: &**model,
            varmap,
            device,
        };
        train(replica, TrainJob::new(&data, source, &config), &mut clock)?;
    } else {
        let replicas: Vec<Replica> = models
            .iter()
            .map(|(varmap, model)| Replica {
                model: &**model,
                varmap,
                device,
            })
            .collect();
        train_data_parallel(&replicas, TrainJob::new(&data, source, &config), &mut clock)?;
    }
    let t = &clock.times;
    anyhow::ensure!(
        t.len() == steps + 1,
        "{} steps ran, expected {}",
        t.len(),
        steps + 1
    );
    let secs = t[steps].duration_since(t[0]).as_secs_f64().max(1e-9);
    Ok(LoopBench {
        prefetch,
        ranks: models.len(),
        sync_batch_norm,
        train_images_per_second: (steps * batch) as f64 / secs,
        steps,
        gpu: clock.gpu,
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SourceBench {
    pub threads: usize,
    pub images: usize,
    /// Views per image the source makes (3 for JSD methods: clean + 2 augmented).
    pub views: usize,
    pub images_per_second: f64,
    /// Augmented views/second (JSD sources: 2 per image; others: 1).
    pub augmented_views_per_second: f64,
}

/// Batch construction throughput of `source` on `threads` rayon threads: every image of `data`
/// once, in batches of `batch` (after one warm-up batch), the same calls training makes.
pub fn bench_source(
    source: &dyn BatchSource,
    data: &TrainData,
    batch: usize,
    threads: usize,
) -> anyhow::Result<SourceBench> {
    if threads == 0 || batch == 0 || data.n == 0 {
        anyhow::bail!("the augmentation benchmark needs threads, a batch size and images");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the benchmark's thread pool")?;
    struct Refuse;
    impl Scorer for Refuse {
        fn losses(&self, _: &[u8], _: &[u8], _: usize) -> anyhow::Result<Vec<f32>> {
            anyhow::bail!("the augmentation benchmark has no model")
        }
    }
    let indices: Vec<usize> = (0..data.n).collect();
    pool.install(|| -> anyhow::Result<SourceBench> {
        let first = &indices[..batch.min(data.n)];
        let warm = source.make_batch(data, first, BatchSeed::new(0), &Refuse)?;
        let views = warm.views;
        let t = Instant::now();
        for (s, chunk) in indices.chunks(batch).enumerate() {
            source.make_batch(data, chunk, BatchSeed::new(s as u64 + 1), &Refuse)?;
        }
        let per_second = data.n as f64 / t.elapsed().as_secs_f64().max(1e-9);
        let augmented = if views == 3 { 2 } else { views };
        Ok(SourceBench {
            threads,
            images: data.n,
            views,
            images_per_second: per_second,
            augmented_views_per_second: per_second * augmented as f64,
        })
    })
}
