//! Shared helpers of the training tests: synthetic learnable images and weight dumps.
#![allow(dead_code)]

use candle_core::{DType, Device};
use candle_nn::VarMap;
use deeprepair_nn::{build, Arch, Classifier};
use deeprepair_train::{seeded_var_builder, TrainData};

/// Class c of 4: a bright band in the top (c < 2) or bottom half, red (c even) or green, on
/// noise; 16×16.
pub fn synthetic(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = (i % 4) as u8;
        let rows = if c < 2 { 0..8 } else { 8..16 };
        let bright_channel = (c % 2) as usize;
        for y in 0..16 {
            for _x in 0..16 {
                for ch in 0..3 {
                    let noise = (next() % 60) as u8;
                    let lit = rows.contains(&y) && ch == bright_channel;
                    images.push(if lit { 180 + noise } else { 20 + noise });
                }
            }
        }
        labels.push(c);
    }
    (images, labels)
}

pub fn data<'a>(images: &'a [u8], labels: &'a [u8]) -> TrainData<'a> {
    TrainData {
        images,
        labels,
        n: labels.len(),
        height: 16,
        width: 16,
        num_classes: 4,
    }
}

/// Every variable, sorted by name.
pub fn weights(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

pub fn tiny_cnn(seed: u64) -> (VarMap, Box<dyn Classifier>) {
    let varmap = VarMap::new();
    let model = build(
        Arch::TinyCnn,
        4,
        seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu),
    )
    .unwrap();
    (varmap, model)
}
