use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(m, k, n) in &[
        (131072usize, 27usize, 32usize),
        (32768, 288, 64),
        (8192, 576, 128),
        (512, 512, 512),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1., (k, n), &dev)?;
        let _ = a.matmul(&b)?;
        let t = Instant::now();
        for _ in 0..5 {
            let _ = a.matmul(&b)?;
        }
        let s = t.elapsed().as_secs_f64() / 5.0;
        println!(
            "{m}x{k}x{n}: {:.1} ms, {:.2} GFLOP/s",
            s * 1e3,
            2.0 * (m * k * n) as f64 / s / 1e9
        );
        let x = Tensor::randn(0f32, 1., (128, 32, 16, 16), &dev)?;
        let t = Instant::now();
        for _ in 0..5 {
            let _ = x.transpose(1, 3)?.contiguous()?;
        }
        println!(
            "  transpose copy 1M floats: {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / 5.0
        );
    }
    Ok(())
}
