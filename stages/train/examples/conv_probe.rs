use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(c, cout, hw) in &[(3usize, 32usize, 32usize), (32, 64, 16), (64, 128, 8)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (128, c, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, c, 3, 3), &dev)?)?;
        for name in ["candle", "fast"] {
            let t = Instant::now();
            for _ in 0..3 {
                let y = if name == "candle" {
                    x.conv2d(&w, 1, 1, 1, 1)?
                } else {
                    deeprepair_nn::fast_conv::conv2d(&x, &w, 1, 1)?
                };
                let g = y.sum_all()?.backward()?;
                let _ = g.get(&w).unwrap();
            }
            println!(
                "{c}->{cout} @{hw}: {name} fwd+bwd {:.1} ms",
                t.elapsed().as_secs_f64() * 1000.0 / 3.0
            );
        }
    }
    Ok(())
}
