//! Bytes as a store file → every reading command's calls and `verify` return, never panic.
#![no_main]
use deeprepair_pipeline::Store;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(store) = Store::open_reader(&path) {
        let _ = store.runs();
        let _ = store.actions();
        let _ = store.artifacts();
        let _ = store.check();
    }
});
