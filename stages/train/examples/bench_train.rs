fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arch = deeprepair_nn::Arch::from_name(args.get(1).map_or("tiny-cnn", |s| s)).expect("arch");
    let batch = args.get(2).map_or(128, |s| s.parse().unwrap());
    let jsd = args.get(3).is_some_and(|s| s == "jsd");
    let r = deeprepair_train::bench::bench_train(arch, batch, jsd, 5, &candle_core::Device::Cpu)?;
    println!("{r:?}");
    Ok(())
}
