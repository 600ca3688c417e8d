//! Eval forward time per batch of 128 on the CPU, per architecture:
//! `cargo run -p deeprepair-nn --release --example bench_eval_forward [-- densenet,wrn-40-2]`
//! (`deeprepair bench train` is the benchmark of record; this isolates the eval forward.)

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use deeprepair_nn::Arch;

fn main() -> anyhow::Result<()> {
    let x = Tensor::randn(0f32, 1., (128, 3, 32, 32), &Device::Cpu)?;
    let only = std::env::args().nth(1);
    for &arch in Arch::ALL {
        if let Some(only) = &only {
            if !only.split(',').any(|a| a == arch.name()) {
                continue;
            }
        }
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        deeprepair_nn::build(arch, 10, vb)?;
        let model = deeprepair_nn::build_detached(arch, 10, &varmap, &Device::Cpu)?;
        model.forward_t(&x, false)?;
        let reps = 2;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            model.forward_t(&x, false)?;
        }
        let per = start.elapsed().as_secs_f64() / reps as f64;
        println!("{}: {:.3} s per eval batch of 128", arch.name(), per);
    }
    Ok(())
}
