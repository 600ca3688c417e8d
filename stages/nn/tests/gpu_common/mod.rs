//! What the GPU tests of the cuDNN modules share.

use candle_core::{Device, Tensor};

/// One CUDA device per test thread, so every tensor and layer of a test share it: candle gives
/// each `Device::new_cuda` its own id, and the cuDNN modules keep their state per id.
pub fn gpu() -> Device {
    thread_local! {
        static GPU: Device = Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)");
    }
    GPU.with(Device::clone)
}

/// `max |a - b| / max |b|`, on the CPU.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap();
    assert_eq!(a.dims(), b.dims());
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max(&(&a - &b).unwrap()) / max(&b).max(1e-12)
}
