//! Writes fresh (randomly initialized) weights of every architecture, plus their eval logits on
//! a fixed input, for checking that PyTorch loads our files with `strict=True` and agrees:
//! `cargo run -p deeprepair-nn --example export_for_pytorch -- /tmp/x`

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use deeprepair_nn::{save_weights, Arch};
use std::collections::HashMap;
use std::path::PathBuf;

/// The input the reference logits are computed on (tests/reference.rs uses the same).
fn input() -> anyhow::Result<Tensor> {
    let data: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| (i as f64 * 0.37 + 0.5).sin() as f32)
        .collect();
    Ok(Tensor::from_vec(data, (2, 3, 32, 32), &Device::Cpu)?)
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("usage: export_for_pytorch OUT_DIR"))?,
    );
    std::fs::create_dir_all(&dir)?;
    for &arch in Arch::ALL {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = deeprepair_nn::build(arch, 10, vb)?;
        // A few train steps so running stats differ from their defaults.
        for _ in 0..3 {
            model.forward_t(&input()?, true)?;
        }
        let logits = model.forward_t(&input()?, false)?;
        save_weights(&varmap, &dir.join(format!("{}.safetensors", arch.name())))?;
        let mut out = HashMap::new();
        out.insert("logits".to_string(), logits);
        out.insert("input".to_string(), input()?);
        candle_core::safetensors::save(
            &out,
            dir.join(format!("{}.logits.safetensors", arch.name())),
        )?;
        println!("{}", arch.name());
    }
    Ok(())
}
