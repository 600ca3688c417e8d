//! Bytes as a user's weights file → an error naming it, or a model.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = deeprepair_nn::load_weights_from_buffer(
        deeprepair_nn::Arch::TinyCnn,
        10,
        bytes,
        std::path::Path::new("fuzz.safetensors"),
        &candle_core::Device::Cpu,
    );
});
