//! Bytes as a CIFAR-10-C image file (beside a valid labels file) → an error or a data set.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<u8> = (0..4).collect();
    deeprepair_data::write_cifar_c_npy(dir.path(), "fog", &vec![0; 4 * 3072], 4, &labels).unwrap();
    std::fs::write(dir.path().join("fog.npy"), bytes).unwrap();
    let _ = deeprepair_data::read_cifar_c_npy(dir.path(), "fog");
});
