//! Bytes as a dataset artifact (what workers upload and the store holds) → an error or a
//! data set that re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(ds) = deeprepair_data::Dataset::from_bytes(bytes) {
        assert_eq!(ds.to_bytes(), bytes, "a frame that decodes re-encodes to itself");
    }
});
