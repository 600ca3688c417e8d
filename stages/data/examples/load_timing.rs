//! Times loading a dataset: `cargo run --release -p deeprepair-data --example load_timing -- PATH [train|test]`.

use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("usage: load_timing PATH [train|test]")?);
    let split: deeprepair_data::Split = args.next().as_deref().unwrap_or("test").parse()?;
    let t = Instant::now();
    let ds = deeprepair_data::load_dataset(&path, split)?;
    let load = t.elapsed();
    let t = Instant::now();
    let bytes = ds.to_bytes();
    let enc = t.elapsed();
    let t = Instant::now();
    let back = deeprepair_data::Dataset::from_bytes(&bytes)?;
    let dec = t.elapsed();
    assert_eq!(back.len(), ds.len());
    println!(
        "{} {split}: {} images {}x{}, classes {:?}; load {load:?}, to_bytes {enc:?} ({} MB), from_bytes {dec:?}",
        path.display(),
        ds.len(),
        ds.width,
        ds.height,
        ds.class_counts(),
        bytes.len() / 1_000_000
    );
    Ok(())
}
