//! Images per second of every corruption (all five severities) on real CIFAR-10 test images,
//! on 1 and 2 rayon threads.
//!
//! cargo run --release -p deeprepair-corrupt --example bench_corrupt -- [n_images]
//! Data: DEEPREPAIR_DATA or ../shared/data (cifar10-lossless-subset, frost).

use std::path::PathBuf;
use std::time::Instant;

use deeprepair_corrupt::{corrupt_batch, Assets, Corruption, FrostTextures};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(500);
    let data = std::env::var_os("DEEPREPAIR_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"))
        });
    let bytes = std::fs::read(data.join("cifar10-lossless-subset/test_batch.bin"))?;
    let records: Vec<&[u8]> = bytes.chunks_exact(3073).collect();
    anyhow::ensure!(!records.is_empty(), "no images");
    let mut batch = Vec::with_capacity(n * 3072);
    for i in 0..n {
        let planes = &records[i % records.len()][1..];
        for p in 0..1024 {
            for c in 0..3 {
                batch.push(planes[c * 1024 + p]);
            }
        }
    }
    let res = Assets {
        frost: Some(FrostTextures::load(&data.join("frost"))?),
    };
    println!("{n} images x 5 severities per corruption, best of 3 runs");
    println!("| corruption | 1 thread (img/s) | 2 threads (img/s) |");
    println!("| --- | ---: | ---: |");
    // BENCH_ONLY=name[,name...] restricts the table (for profiling one corruption).
    let only = std::env::var("BENCH_ONLY").ok();
    for c in Corruption::ALL {
        if let Some(o) = &only {
            if !o.split(',').any(|n| n == c.name()) {
                continue;
            }
        }
        let mut ips = Vec::new();
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            // best of 3: the machine is shared, the fastest run is the least disturbed
            let mut best = 0.0f64;
            for _ in 0..3 {
                let t0 = Instant::now();
                for sev in 1..=5u8 {
                    let out = pool.install(|| corrupt_batch(&batch, n, 32, 32, c, sev, 1, &res))?;
                    std::hint::black_box(out);
                }
                best = best.max((5 * n) as f64 / t0.elapsed().as_secs_f64());
            }
            ips.push(best);
        }
        println!("| {} | {:.0} | {:.0} |", c.name(), ips[0], ips[1]);
    }
    Ok(())
}
