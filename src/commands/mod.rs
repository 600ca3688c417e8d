//! The subcommands. Each prints for a person by default and JSON with `--json` where a script
//! would want it.

mod plan;
mod run;
mod share;
mod store;

pub use plan::*;
pub use run::*;
pub use share::*;
pub use store::*;

use clap::Subcommand;
use deeprepair_pipeline::Registry;
use std::path::PathBuf;
use std::process::ExitCode;

pub fn registry() -> Registry {
    let mut registry = Registry::new();
    deeprepair_pipeline::builtin::register(&mut registry);
    deeprepair_stages::register(&mut registry);
    registry
}

pub fn kinds(registry: &Registry) -> anyhow::Result<ExitCode> {
    for kind in registry.iter() {
        println!(
            "{} (v{}): {}",
            kind.name(),
            kind.version(),
            kind.description()
        );
        for p in kind.params() {
            let default = p
                .default
                .map(|d| format!(" = {d}"))
                .unwrap_or_else(|| " (required)".into());
            println!(
                "  param {}: {}{default} — {}",
                p.name,
                p.ty.describe(),
                p.help
            );
        }
        for i in kind.inputs() {
            println!(
                "  input {}{}{}: {}",
                i.name,
                if i.many { " (many)" } else { "" },
                if i.optional { " (optional)" } else { "" },
                i.help
            );
        }
        println!("  outputs: {}", kind.outputs().join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Planning and cached re-runs of a large grid; blob put/get throughput.
    Orchestrator {
        /// Stages in the grid (rounded to a square).
        #[arg(long, default_value_t = 10_000)]
        stages: usize,
        /// Where to put the benchmark store (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Training and evaluation images/second of an architecture on the CPU.
    Train(crate::ml_commands::BenchTrainArgs),
    /// CPU augmentation throughput (AugMix, DeepRepair) per thread count.
    Augment(crate::ml_commands::BenchAugmentArgs),
}

pub fn bench(what: BenchCommand, registry: &Registry) -> anyhow::Result<ExitCode> {
    match what {
        BenchCommand::Orchestrator { stages, dir } => bench_orchestrator(stages, dir, registry),
        BenchCommand::Train(a) => crate::ml_commands::bench_train(a),
        BenchCommand::Augment(a) => crate::ml_commands::bench_augment(a),
    }
}

pub(crate) fn bench_orchestrator(
    stages: usize,
    dir: Option<PathBuf>,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let rows = deeprepair_pipeline::bench::orchestrator(stages, dir, registry)?;
    println!("{}", deeprepair_pipeline::bench::table(&rows));
    Ok(ExitCode::SUCCESS)
}
