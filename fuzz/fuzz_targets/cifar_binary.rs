//! Bytes as a CIFAR-10 binary batch → an error or a data set.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test_batch.bin");
    std::fs::write(&path, bytes).unwrap();
    let _ = deeprepair_data::load_cifar_binary_files(&[path]);
});
