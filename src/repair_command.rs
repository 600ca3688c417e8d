//! `deeprepair repair`: the papers' real use case as one command. A deployed model (safetensors
//! with PyTorch names), a folder of failure images collected in the field (`<class>/*`) and the
//! training data become a small DAG — import, split the failures into the collected part and a
//! held-out part standing for future unseen failures, repair with one method, evaluate before
//! and after — run through the ordinary pipeline (so it is cached and resumable like any run),
//! ending in the repaired weights and a before/after summary.

use crate::commands::write_atomically;
use crate::ml_commands::UsageError;
use anyhow::Context;
use clap::Args;
use deeprepair_pipeline::manifest::Source;
use deeprepair_pipeline::store::RunState;
use deeprepair_pipeline::{
    plan_literal, progress::Progress, run_plan, Digest, Registry, RunOptions, RunSummary, Store,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Args)]
pub struct RepairArgs {
    /// Architecture of the deployed model (see `deeprepair models`).
    #[arg(long)]
    arch: String,
    /// The deployed model: safetensors with the architecture's PyTorch state_dict names.
    #[arg(long)]
    model: PathBuf,
    /// Collected failure images, one folder per class (`<class>/*.png|jpg`).
    #[arg(long)]
    failures: PathBuf,
    /// Training data: CIFAR-10 binary files or an image folder with train/ and test/.
    #[arg(long)]
    train: PathBuf,
    /// Repair method (every registered one: `deeprepair kinds` describes each).
    #[arg(long, default_value = "deeprepair", value_parser = method_names())]
    method: String,
    /// Where to write the repaired weights (safetensors, PyTorch names).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long, default_value_t = 128)]
    batch: u32,
    /// Training images per class the repair fine-tunes on (0: all): with the failures for the
    /// baselines; DeepRepair trains on them alone, the failures guiding its style ops.
    #[arg(long, default_value_t = 500)]
    train_per_class: u32,
    /// Fraction of each class's failures held out to measure generalization to unseen ones.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Class names in label order (default: CIFAR-10's).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The store (default: .deeprepair/store.redb next to --out).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    plain: bool,
}

/// The registered repair methods, as `--method`'s choices.
fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(deeprepair_stages::methods::all().map(|m| m.name()))
}

fn absolute(p: &Path, what: &str) -> anyhow::Result<String> {
    let abs =
        std::fs::canonicalize(p).map_err(|e| UsageError(format!("{what} {}: {e}", p.display())))?;
    Ok(abs.display().to_string())
}

/// `{class_names: [...]}` (and `num_classes` for a model) for the given classes, or nothing
/// for the default (CIFAR-10).
fn class_params(classes: &[String], with_count: bool) -> serde_json::Map<String, Value> {
    let mut params = serde_json::Map::new();
    if !classes.is_empty() {
        params.insert("class_names".into(), json!(classes));
        if with_count {
            params.insert("num_classes".into(), json!(classes.len()));
        }
    }
    params
}

/// `base` with `extra`'s entries added.
fn with(mut base: Value, extra: &serde_json::Map<String, Value>) -> Value {
    if let Value::Object(map) = &mut base {
        map.extend(extra.clone());
    }
    base
}

/// The DAG as data: an ordinary manifest, planned literally (paths and class names are never
/// read as `${variables}` or YAML), and written beside the store so `status`/`inspect` work.
fn manifest(args: &RepairArgs, model: &str, failures: &str, train: &str) -> Value {
    let classes = class_params(&args.classes, false);
    let failure_set = |part: &str, eval_set: &str| {
        with(
            json!({"path": failures, "layout": "failures", "holdout": args.holdout, "part": part,
                   "seed": args.seed, "eval_set": eval_set, "pattern": "field"}),
            &classes,
        )
    };
    json!({
        "name": "repair",
        "stages": {
            "deployed": {"kind": "import-model", "params": with(
                json!({"arch": args.arch, "path": model}),
                &class_params(&args.classes, true),
            )},
            "collected": {"kind": "dataset", "params": failure_set("kept", "collected:field")},
            "unseen": {"kind": "dataset", "params": failure_set("held-out", "failures:field")},
            "train-data": {"kind": "dataset", "params": with(
                json!({"path": train, "split": "train", "per_class": args.train_per_class,
                       "seed": args.seed}),
                &classes,
            )},
            "clean": {"kind": "dataset", "params": with(
                json!({"path": train, "split": "test", "per_class": 100, "seed": args.seed,
                       "eval_set": "clean"}),
                &classes,
            )},
            "repaired": {
                "kind": args.method,
                "params": {"epochs": args.epochs, "lr": args.lr, "batch": args.batch,
                           "seed": args.seed},
                "inputs": {"model": "deployed", "failures": "collected", "train": "train-data"},
            },
            "before": {"kind": "evaluate",
                       "inputs": {"model": "deployed", "sets": ["clean", "unseen", "collected"]}},
            "after": {"kind": "evaluate",
                      "inputs": {"model": "repaired.model", "sets": ["clean", "unseen", "collected"]}},
            "report": {"kind": "report", "inputs": {"results": ["before", "after"]}},
        }
    })
}

/// Checks the flags every generated manifest shares, naming the flag: the architecture and
/// the class names (at least two, none empty, no duplicates).
fn check_model_flags(arch: &str, classes: &[String]) -> anyhow::Result<()> {
    if deeprepair_nn::Arch::from_name(arch).is_none() {
        return Err(UsageError(format!(
            "--arch {arch}: expected one of {}",
            deeprepair_nn::Arch::NAMES.join(", ")
        ))
        .into());
    }
    if classes.is_empty() {
        return Ok(());
    }
    if classes.len() < 2 {
        return Err(UsageError(format!(
            "--classes {}: a classifier needs at least two classes",
            classes.join(",")
        ))
        .into());
    }
    if let Some(empty) = classes.iter().position(|c| c.trim().is_empty()) {
        return Err(UsageError(format!("--classes: class {} has an empty name", empty + 1)).into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in classes {
        if !seen.insert(c) {
            return Err(UsageError(format!("--classes: '{c}' is given twice")).into());
        }
    }
    Ok(())
}

pub fn repair(args: RepairArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    if !(0.0..1.0).contains(&args.holdout) {
        return Err(UsageError(format!(
            "--holdout {}: expected a fraction in [0, 1)",
            args.holdout
        ))
        .into());
    }
    check_model_flags(&args.arch, &args.classes)?;
    let manifest = manifest(
        &args,
        &absolute(&args.model, "--model")?,
        &absolute(&args.failures, "--failures")?,
        &absolute(&args.train, "--train")?,
    );
    let out_dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = out_dir.join(".deeprepair");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let manifest_path = work.join("repair.yaml");
    let store_path = args
        .store
        .clone()
        .unwrap_or_else(|| work.join("store.redb"));
    let (store, summary) = run_generated(
        &manifest_path,
        "deeprepair repair",
        &manifest,
        &store_path,
        args.plain,
        registry,
    )?;
    if summary.state != RunState::Succeeded {
        for f in &summary.failed {
            eprintln!("stage {} failed: {}", f.stage, f.error);
        }
        return Ok(if summary.state == RunState::Cancelled {
            ExitCode::from(130)
        } else {
            ExitCode::FAILURE
        });
    }
    let output = |stage: &str, name: &str| stage_output(&store, summary.run, stage, name);
    let model = store.get_artifact(&output("repaired", "model")?)?;
    write_atomically(&args.out, &model.bytes)?;
    println!("repaired weights: {}", args.out.display());
    println!("{:<24} {:>10} {:>10}", "accuracy on", "before", "after");
    let before: serde_json::Value =
        serde_json::from_slice(&store.get_artifact(&output("before", "metrics")?)?.bytes)?;
    let after: serde_json::Value =
        serde_json::from_slice(&store.get_artifact(&output("after", "metrics")?)?.bytes)?;
    let empty = vec![];
    for (b, a) in before["records"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .zip(after["records"].as_array().unwrap_or(&empty))
    {
        let label = match b["eval_set"].as_str().unwrap_or("?") {
            "clean" => "clean test images".to_string(),
            "failures:field" => format!("held-out failures ({})", b["n"]),
            "collected:field" => format!("collected failures ({})", b["n"]),
            other => other.to_string(),
        };
        println!(
            "{label:<24} {:>9.2}% {:>9.2}%",
            b["accuracy"].as_f64().unwrap_or(f64::NAN) * 100.0,
            a["accuracy"].as_f64().unwrap_or(f64::NAN) * 100.0
        );
    }
    println!(
        "report: deeprepair report {} --out DIR --store {}",
        summary.run,
        store_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ImportModelArgs {
    /// Architecture the weights are for (see `deeprepair models`).
    #[arg(long)]
    arch: String,
    /// Safetensors file with the architecture's PyTorch state_dict names.
    file: PathBuf,
    /// Class names in label order (default: CIFAR-10's).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// The store (default: $DEEPREPAIR_STORE, else ./.deeprepair/store.redb).
    #[arg(long)]
    store: Option<PathBuf>,
}

/// `deeprepair import-model`: a user's checkpoint into the store as a model artifact (through
/// a one-stage `import-model` run, so it is checked, cached and recorded like any stage).
pub fn import_model(args: ImportModelArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    check_model_flags(&args.arch, &args.classes)?;
    let path = absolute(&args.file, "model file")?;
    let store_path = crate::store_path(args.store.clone(), None);
    let work = store_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let manifest = json!({
        "name": "import-model",
        "stages": {"model": {"kind": "import-model", "params": with(
            json!({"arch": args.arch, "path": path}),
            &class_params(&args.classes, true),
        )}}
    });
    let (store, summary) = run_generated(
        &work.join("import-model.yaml"),
        "deeprepair import-model",
        &manifest,
        &store_path,
        true,
        registry,
    )?;
    if let Some(f) = summary.failed.first() {
        return Err(UsageError(f.error.clone()).into());
    }
    let digest = stage_output(&store, summary.run, "model", "model")?;
    println!(
        "{} {} (store {})",
        digest.hex(),
        args.arch,
        store_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes a manifest this module built (YAML from data, never pasted text) to `path`, then runs
/// it through the ordinary pipeline (cached, resumable, recorded); Ctrl-C stops it safely.
fn run_generated(
    path: &Path,
    writer: &str,
    manifest: &Value,
    store_path: &Path,
    plain: bool,
    registry: &Registry,
) -> anyhow::Result<(Arc<Store>, RunSummary)> {
    let yaml = serde_saphyr::to_string(manifest).context("writing the generated manifest")?;
    let text = format!(
        "# Written by `{writer}`; re-running the command reuses every finished stage.\n{yaml}"
    );
    write_atomically(path, text.as_bytes())?;
    let source = Source {
        path: path.to_path_buf(),
        text,
    };
    let plan = plan_literal(&source, registry)?;
    let store = Arc::new(Store::open_writer(store_path)?);
    let progress = Arc::new(Progress::new(plan.stages.len() as u64, plain));
    let options = RunOptions {
        handle_ctrl_c: true,
        ..RunOptions::default()
    };
    let summary = run_plan(
        &plan,
        registry,
        store.clone(),
        &options,
        progress.clone(),
        Arc::new(AtomicBool::new(false)),
    )?;
    progress.finish();
    Ok((store, summary))
}

/// The digest of output `name` of `stage` in `run`.
fn stage_output(store: &Store, run: u64, stage: &str, name: &str) -> anyhow::Result<Digest> {
    store
        .stage_runs(run)?
        .iter()
        .find(|s| s.stage == stage)
        .and_then(|s| s.outputs.get(name).copied())
        .with_context(|| format!("run {run} has no output {stage}.{name}"))
}
