//! `deeprepair bench train`: training and evaluation images/second of an architecture on a
//! device, on synthetic 32×32 images (throughput does not depend on pixel values).

use crate::init::seeded_var_builder;
use crate::optim::{Sgd, SgdConfig};
use crate::{input::unit_to_tensor, loss};
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
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut opt)?;
    }
    device.synchronize()?;
    let train = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    let xe = x.narrow(0, 0, batch)?;
    model.forward_t(&xe, false)?;
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..steps {
        model.forward_t(&xe, false)?.argmax(1)?.to_vec1::<u32>()?;
    }
    let eval = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    Ok(TrainBench {
        arch: arch.name().to_string(),
        batch,
        jsd,
        device: format!("{device:?}"),
        train_images_per_second: train,
        eval_images_per_second: eval,
        steps,
    })
}
