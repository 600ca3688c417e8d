//! `deeprepair`: the command-line front end. Thin: parses arguments and calls the crates
//! (`pipeline` for manifests/store/executor, `stages` for the ML stage kinds; `ml_commands`
//! calls the data, corruption, model, training and report libraries directly).

/// Large freed blocks (activations, gradients) are kept for the next training step instead of
/// going back to the kernel and faulting in again: see `deeprepair-alloc`.
#[global_allocator]
static ALLOCATOR: deeprepair_alloc::BlockCache = deeprepair_alloc::BlockCache::new();

mod commands;
mod ml_commands;
mod repair_command;
mod stylize_command;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "deeprepair",
    version,
    about = "Repair image classifiers from collected failures; run the experiment grids."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dry run: expand a manifest into its DAG and show what is cached and what will run.
    Plan(commands::PlanArgs),
    /// Run a manifest. Ctrl-C or kill -9 at any point is safe; a re-run resumes.
    Run(commands::RunArgs),
    /// Run stages for a coordinator (`run --gpus`/`--workers`/`--slurm` start these).
    Worker(commands::WorkerArgs),
    /// The last (or a given) run: per-stage state and timings.
    Status(commands::StatusArgs),
    /// Artifacts in the store, by stage.
    Ls(commands::LsArgs),
    /// A stage (by path) or an artifact (by digest prefix): params, inputs, outputs, logs.
    Inspect(commands::InspectArgs),
    /// Write an artifact to ordinary files.
    Export(commands::ExportArgs),
    /// A read-only web UI over a store: runs, DAGs, stages, artifact viewers (loopback by
    /// default; another address needs the token it prints).
    Ui(commands::UiArgs),
    /// Check the store: the file, every record, every artifact's bytes, every cached stage's
    /// outputs; `--repair` salvages a damaged one.
    Verify(commands::VerifyArgs),
    /// Drop what no kept run reaches.
    Gc(commands::GcArgs),
    /// Copy this store's finished stages (action records and their verified outputs) into
    /// another store file, so a run there executes none of them again.
    Push(commands::PushArgs),
    /// Copy another store's finished stages into this store (a store file, or a `serve` URL).
    Pull(commands::PullArgs),
    /// Serve this store read-only over HTTP, for `pull http://…` on other machines.
    Serve(commands::ServeArgs),
    /// The stage kinds this binary knows, with their params, inputs and outputs.
    Kinds,
    /// Benchmarks that print a table.
    Bench {
        #[command(subcommand)]
        what: commands::BenchCommand,
    },
    /// Every architecture with its parameter count.
    Models(ml_commands::ModelsArgs),
    /// Datasets: `data fetch cifar10`.
    Data {
        #[command(subcommand)]
        what: ml_commands::DataCommand,
    },
    /// Apply one CIFAR-10-C corruption to an image, or draw a contact sheet of all of them.
    Corrupt(ml_commands::CorruptArgs),
    /// Unpack the `report` artifact of a run (a run id or `latest`) into a folder.
    Report(ml_commands::ReportArgs),
    /// Repair your own model from a folder of collected failure images: import, repair,
    /// evaluate before/after on held-out failures, write the repaired weights.
    Repair(repair_command::RepairArgs),
    /// Store a user's safetensors checkpoint (PyTorch names) as a model artifact.
    ImportModel(repair_command::ImportModelArgs),
    /// One DeepRepair style operation on two images: CONTENT in the style of REFERENCE.
    Stylize(stylize_command::StylizeArgs),
}

/// `DEEPREPAIR_ALLOC_CACHE_MIB`: the most MiB the allocator keeps in freed blocks (0: none).
fn configure_allocator() -> Result<(), String> {
    const VAR: &str = "DEEPREPAIR_ALLOC_CACHE_MIB";
    let Ok(value) = std::env::var(VAR) else {
        return Ok(());
    };
    let mib: usize = value.trim().parse().map_err(|_| {
        format!("{VAR}: expected a whole number of MiB (0 turns the cache off), got {value:?}")
    })?;
    ALLOCATOR.set_limit_bytes(mib.saturating_mul(1 << 20));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(message) = configure_allocator() {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEEPREPAIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let registry = commands::registry();
    let result = match cli.command {
        Command::Plan(a) => commands::plan(a, &registry),
        Command::Run(a) => commands::run(a, &registry),
        Command::Worker(a) => commands::worker(a, &registry),
        Command::Status(a) => commands::status(a),
        Command::Ls(a) => commands::ls(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Export(a) => commands::export(a),
        Command::Gc(a) => commands::gc(a),
        Command::Push(a) => commands::push(a),
        Command::Pull(a) => commands::pull(a),
        Command::Serve(a) => commands::serve(a),
        Command::Ui(a) => commands::ui(a),
        Command::Verify(a) => commands::verify(a),
        Command::Kinds => commands::kinds(&registry),
        Command::Bench { what } => commands::bench(what, &registry),
        Command::Models(a) => ml_commands::models(a),
        Command::Data { what } => ml_commands::data(what),
        Command::Corrupt(a) => ml_commands::corrupt(a),
        Command::Report(a) => ml_commands::report(a),
        Command::Repair(a) => repair_command::repair(a, &registry),
        Command::Stylize(a) => stylize_command::stylize(a),
        Command::ImportModel(a) => repair_command::import_model(a, &registry),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(m) = e.downcast_ref::<deeprepair_pipeline::ManifestError>() {
                eprintln!("error: {m}");
                return ExitCode::from(2);
            }
            if ml_commands::is_usage_error(&e) {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where a command finds the store: `--store`, `$DEEPREPAIR_STORE`, next to the manifest, or
/// `./.deeprepair/store.redb`.
pub fn store_path(explicit: Option<PathBuf>, manifest: Option<&std::path::Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Some(p) = std::env::var_os("DEEPREPAIR_STORE") {
        return p.into();
    }
    let dir = manifest
        .and_then(|m| m.parent())
        .map(|d| d.to_path_buf())
        .unwrap_or_default();
    dir.join(".deeprepair").join("store.redb")
}
