//! The orchestrator benchmark without building the ML crates:
//! `cargo run --release -p deeprepair-pipeline --example bench_orchestrator [STAGES]`.
fn main() -> anyhow::Result<()> {
    let stages = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let mut registry = deeprepair_pipeline::Registry::new();
    deeprepair_pipeline::builtin::register(&mut registry);
    let rows = deeprepair_pipeline::bench::orchestrator(stages, None, &registry)?;
    print!("{}", deeprepair_pipeline::bench::table(&rows));
    Ok(())
}
