//! `cargo run --release -p deeprepair-train --example bench_train -- ARCH BATCH [jsd] [STEPS]`
//! (the same as `deeprepair bench train`).
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("tiny-cnn", |s| s);
    let arch = deeprepair_nn::Arch::from_name(name)
        .ok_or_else(|| anyhow::anyhow!("unknown arch {name}"))?;
    let batch = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let jsd = args.get(3).is_some_and(|s| s == "jsd");
    let steps = args.get(4).map_or(Ok(5), |s| s.parse())?;
    let r =
        deeprepair_train::bench::bench_train(arch, batch, jsd, steps, &candle_core::Device::Cpu)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
