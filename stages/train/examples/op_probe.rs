use candle_core::{Device, ModuleT, Tensor, Var};
use std::time::Instant;
fn time<F: FnMut() -> candle_core::Result<()>>(name: &str, mut f: F) -> candle_core::Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..3 {
        f()?;
    }
    println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / 3.0);
    Ok(())
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (128, 32, 32, 32), &dev)?)?;
    let vm = candle_nn::VarMap::new();
    let bn = candle_nn::batch_norm(
        32,
        1e-5,
        candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev),
    )?;
    time("bn train fwd", || {
        bn.forward_t(&x, true)?;
        Ok(())
    })?;
    time("bn train fwd+bwd", || {
        bn.forward_t(&x, true)?.sum_all()?.backward()?;
        Ok(())
    })?;
    time("relu fwd+bwd", || {
        x.relu()?.sum_all()?.backward()?;
        Ok(())
    })?;
    time("maxpool fwd+bwd", || {
        x.max_pool2d(2)?.sum_all()?.backward()?;
        Ok(())
    })?;
    time("mean23 fwd+bwd", || {
        x.mean((2, 3))?.sum_all()?.backward()?;
        Ok(())
    })?;
    time("mul scalar", || {
        (x.as_tensor() * 2.0)?;
        Ok(())
    })?;
    time("contiguous transpose", || {
        x.transpose(0, 1)?.contiguous()?;
        Ok(())
    })?;
    Ok(())
}
