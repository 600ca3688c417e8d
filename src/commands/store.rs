//! The store commands: `status`, `ls`, `inspect`, `export`, `ui`, `gc`, `verify`.

use crate::store_path;
use anyhow::{bail, Context};
use clap::Args;
use deeprepair_pipeline::store::{salvage, RunRecord, StageRunRecord, StageState, StoreError};
use deeprepair_pipeline::{Artifact, Digest, Store};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Args)]
pub struct StoreArgs {
    /// The store (default: $DEEPREPAIR_STORE, else .deeprepair/store.redb next to --manifest
    /// or in the current directory).
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
    /// Find the store next to this manifest.
    #[arg(long)]
    pub(crate) manifest: Option<PathBuf>,
}

impl StoreArgs {
    pub(crate) fn open(&self) -> anyhow::Result<Store> {
        let path = store_path(self.store.clone(), self.manifest.as_deref());
        Ok(Store::open_reader(&path)?)
    }
}

pub(crate) fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub(crate) fn run_state_label(run: &RunRecord) -> String {
    run.state_label()
}

pub(crate) fn pick_run(store: &Store, run: Option<u64>) -> anyhow::Result<RunRecord> {
    let runs = store.runs()?;
    match run {
        Some(id) => runs
            .into_iter()
            .find(|r| r.id == id)
            .with_context(|| format!("no run {id} in the store")),
        None => runs.into_iter().last().context("the store has no runs yet"),
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[arg(long)]
    pub(crate) run: Option<u64>,
    #[arg(long)]
    pub(crate) json: bool,
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open()?;
    let run = pick_run(&store, args.run)?;
    let stages = store.stage_runs(run.id)?;
    if args.json {
        let out = serde_json::json!({"run": run, "state": run_state_label(&run), "stages": stages});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let secs = run.wall_ms(&stages);
    println!(
        "run {} of {}: {} (started {}, {:.1}s, pid {})",
        run.id,
        run.manifest,
        run_state_label(&run),
        when(run.started_ms),
        secs as f64 / 1000.0,
        run.pid
    );
    let count = |s: StageState| stages.iter().filter(|r| r.state == s).count();
    println!(
        "stages: {} total — {} cached, {} succeeded, {} running, {} pending, {} failed, {} skipped",
        stages.len(),
        count(StageState::Cached),
        count(StageState::Succeeded),
        count(StageState::Running),
        count(StageState::Pending),
        count(StageState::Failed),
        count(StageState::Skipped)
    );
    println!(
        "{:<10} {:>8} {:<11} {:>3}  stage",
        "state", "time", "worker", "try"
    );
    for r in &stages {
        let time = match (r.started_ms, r.ended_ms) {
            (Some(s), Some(e)) => format!("{:.1}s", (e - s) as f64 / 1000.0),
            (Some(_), None) => "…".into(),
            _ => "".into(),
        };
        println!(
            "{:<10} {:>8} {:<11} {:>3}  {}",
            format!("{:?}", r.state).to_lowercase(),
            time,
            r.worker.clone().unwrap_or_default(),
            r.attempt,
            r.stage
        );
        if let Some(e) = &r.error {
            println!("{:>35}error: {e}", "");
        }
    }
    if let Some(e) = &run.error {
        println!("run error: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Only stages of this kind.
    #[arg(long)]
    pub(crate) stage: Option<String>,
    /// Stages of this run (default: the last run).
    #[arg(long)]
    pub(crate) run: Option<u64>,
    #[arg(long)]
    pub(crate) json: bool,
}

pub fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open()?;
    let run = pick_run(&store, args.run)?;
    let mut rows = vec![];
    for r in store.stage_runs(run.id)? {
        if args.stage.as_deref().is_some_and(|k| k != r.kind) {
            continue;
        }
        for (name, digest) in &r.outputs {
            let rec = store.artifact_record(digest)?;
            rows.push(serde_json::json!({
                "stage": r.stage, "kind": r.kind, "output": name, "digest": digest,
                "artifact_kind": rec.as_ref().map(|a| a.header.kind.as_str()),
                "size": rec.as_ref().map(|a| a.size),
            }));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("run {}: {} artifacts", run.id, rows.len());
    println!(
        "{:<12} {:<10} {:>10}  {:<10} stage",
        "digest", "kind", "bytes", "output"
    );
    for row in rows {
        println!(
            "{:<12} {:<10} {:>10}  {:<10} {}",
            &row["digest"].as_str().unwrap_or("")[..12],
            row["artifact_kind"].as_str().unwrap_or("missing"),
            row["size"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            row["output"].as_str().unwrap_or(""),
            row["stage"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// A stage path (`repair[corruption=fog,method=augmix]`) or an artifact digest prefix.
    pub(crate) target: String,
    #[arg(long)]
    pub(crate) json: bool,
}

/// Finds the newest record of a stage path across runs.
pub(crate) fn find_stage(
    store: &Store,
    path: &str,
) -> anyhow::Result<Option<(u64, StageRunRecord)>> {
    for run in store.runs()?.iter().rev() {
        if let Some(r) = store
            .stage_runs(run.id)?
            .into_iter()
            .find(|r| r.stage == path)
        {
            return Ok(Some((run.id, r)));
        }
    }
    Ok(None)
}

pub(crate) fn preview(a: &Artifact) -> Option<String> {
    let textual =
        a.header.media_type.starts_with("text/") || a.header.media_type == "application/json";
    (textual && a.bytes.len() <= 16 * 1024).then(|| String::from_utf8_lossy(&a.bytes).into_owned())
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open()?;
    if let Some((run, record)) = find_stage(&store, &args.target)? {
        let action = match record.key {
            Some(k) => store.action(&k)?,
            None => None,
        };
        let checkpoint = match record.key {
            Some(k) => store.checkpoint_meta(&k)?,
            None => None,
        };
        if args.json {
            let out = serde_json::json!({"run": run, "record": record, "action": action, "checkpoint": checkpoint});
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "stage {} (kind {}), run {run}: {:?}",
            record.stage, record.kind, record.state
        );
        if let Some(k) = record.key {
            println!("key {k}");
        }
        if let Some(a) = &action {
            println!(
                "produced by run {} on {} (attempt {}), {:.1}s at {}",
                a.run,
                a.worker,
                a.attempt,
                a.duration_ms as f64 / 1000.0,
                when(a.started_ms)
            );
            println!(
                "code version {}\nparams {}",
                a.version,
                serde_json::to_string_pretty(&a.params)?
            );
            for (name, digests) in &a.inputs {
                let ds: Vec<String> = digests.iter().map(|d| d.short()).collect();
                println!("input {name}: {}", ds.join(", "));
            }
        }
        if let Some(c) = &checkpoint {
            println!("checkpoint: {} bytes saved at {}", c.size, when(c.saved_ms));
        }
        for (name, digest) in &record.outputs {
            match store.get_artifact(digest) {
                Ok(a) => {
                    println!(
                        "output {name}: {} {} ({} bytes) {}",
                        digest.short(),
                        a.header.kind.as_str(),
                        a.bytes.len(),
                        a.header.meta
                    );
                    if let Some(p) = preview(&a) {
                        for line in p.lines().take(60) {
                            println!("  | {line}");
                        }
                    }
                }
                Err(e) => println!("output {name}: {} unreadable: {e}", digest.short()),
            }
        }
        if let Some(e) = &record.error {
            println!("error: {e}");
        }
        if !record.log_tail.is_empty() {
            println!("log tail:");
            for line in &record.log_tail {
                println!("  {line}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let digest = resolve_digest(&store, &args.target)?;
    let artifact = store.get_artifact(&digest)?;
    let producers: Vec<_> = store
        .actions()?
        .into_iter()
        .filter(|a| a.outputs.values().any(|d| *d == digest))
        .collect();
    if args.json {
        let out = serde_json::json!({"digest": digest, "header": artifact.header, "size": artifact.bytes.len(), "producers": producers});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "artifact {digest}\nkind {} ({}), {} bytes",
        artifact.header.kind.as_str(),
        artifact.header.media_type,
        artifact.bytes.len()
    );
    println!("meta {}", artifact.header.meta);
    for p in &producers {
        println!(
            "produced by stage {} (kind {} v{}, run {}, key {})",
            p.stage,
            p.kind,
            p.version,
            p.run,
            p.key.short()
        );
    }
    if let Some(p) = preview(&artifact) {
        for line in p.lines().take(60) {
            println!("  | {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn resolve_digest(store: &Store, target: &str) -> anyhow::Result<Digest> {
    if target.len() < 4 || !target.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "'{target}' is neither a stage path in the store nor a digest prefix (4+ hex digits)"
        );
    }
    let matches = store.resolve_artifact_prefix(target)?;
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no artifact or stage matches '{target}'"),
        many => bail!(
            "'{target}' matches {} artifacts; give more digits",
            many.len()
        ),
    }
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Artifact digest (or prefix).
    pub(crate) digest: String,
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open()?;
    let digest = resolve_digest(&store, &args.digest)?;
    let artifact = store.get_artifact(&digest)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let file = args
        .out
        .join(format!("{}.{}", digest.short(), artifact.header.extension));
    write_atomically(&file, &artifact.bytes)?;
    let producers: Vec<_> = store
        .actions()?
        .into_iter()
        .filter(|a| a.outputs.values().any(|d| *d == digest))
        .collect();
    let provenance =
        serde_json::json!({"digest": digest, "header": artifact.header, "producers": producers});
    let meta_file = args.out.join(format!("{}.artifact.json", digest.short()));
    write_atomically(
        &meta_file,
        serde_json::to_string_pretty(&provenance)?.as_bytes(),
    )?;
    let extra = deeprepair_stages::export_extra(&artifact, &args.out, &digest.short())?;
    println!("{}", file.display());
    println!("{}", meta_file.display());
    for f in extra {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes via a temporary file and rename, so an interrupted export leaves no half file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if path.is_dir() {
        return Err(crate::ml_commands::UsageError(format!(
            "{} is a folder; give the path of the file to write",
            path.display()
        ))
        .into());
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[derive(Args)]
pub struct UiArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Address to serve on. Loopback by default; any other address is guarded by a random
    /// token, printed once at start, that every request must carry.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: std::net::SocketAddr,
}

/// `ui`: serves the read-only web UI until Ctrl-C (the `deeprepair-ui` crate).
pub fn ui(args: UiArgs) -> anyhow::Result<ExitCode> {
    let store = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    deeprepair_ui::serve(deeprepair_ui::Options {
        store,
        listen: args.listen,
    })
    .map_err(|e| match e {
        deeprepair_ui::StartError::Usage(m) => crate::ml_commands::UsageError(m).into(),
        deeprepair_ui::StartError::Other(e) => e,
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Keep only the newest N runs (default: all runs).
    #[arg(long)]
    pub(crate) keep_runs: Option<usize>,
    #[arg(long)]
    pub(crate) dry_run: bool,
}

pub fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    let path = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    let mut store = Store::open_writer(&path)?;
    let report = store.gc(args.keep_runs, args.dry_run)?;
    let verb = if args.dry_run {
        "would drop"
    } else {
        "dropped"
    };
    println!(
        "{verb} {} runs, {} actions, {} artifacts, {} chunks ({:.1} MiB); {} artifacts kept",
        report.runs_dropped,
        report.actions_dropped,
        report.artifacts_dropped,
        report.chunks_dropped,
        report.bytes_dropped as f64 / (1 << 20) as f64,
        report.artifacts_kept
    );
    if !args.dry_run && report.chunks_dropped > 0 {
        store.compact()?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Salvage a damaged store: keep every record that reads and verifies in a fresh file, put
    /// it in the store's place (the damaged file is kept beside it), and say what was lost; the
    /// next `run` recomputes the lost stages.
    #[arg(long)]
    pub(crate) repair: bool,
}

/// `verify`: redb's integrity check of the file (skipped while a run holds the store), every
/// record of every table, every artifact's bytes, every cached stage's outputs, every
/// checkpoint. Exit 0 when all is well, 1 when something is damaged.
pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let path = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    if !path.exists() {
        return Err(StoreError::Missing { path }.into());
    }
    let opened = match Store::open_writer(&path) {
        Err(StoreError::Busy { .. }) if !args.repair => {
            println!(
                "note: a run is writing to {}: the file-level integrity check is skipped",
                path.display()
            );
            Store::open_reader(&path)
        }
        other => other,
    };
    let report = opened.and_then(|store| {
        let integrity = match &store {
            s if s.is_writer() => salvage::check_file_integrity(&path)?,
            _ => None,
        };
        let mut report = store.check()?;
        report
            .problems
            .extend(integrity.map(|detail| format!("file integrity: {detail}")));
        Ok(report)
    });
    match report {
        Ok(report) => {
            if report.problems.is_empty() {
                println!(
                    "ok: {} artifacts, {} cached stages, {} runs verified",
                    report.artifacts, report.actions, report.runs,
                );
                return Ok(ExitCode::SUCCESS);
            }
            for p in &report.problems {
                println!("{p}");
            }
            println!(
                "{} problems ({} artifacts, {} cached stages, {} runs read)",
                report.problems.len(),
                report.artifacts,
                report.actions,
                report.runs
            );
        }
        Err(StoreError::Damaged { detail, .. }) => {
            println!("the store file is damaged: it cannot be opened ({detail})");
        }
        Err(e) => return Err(e.into()),
    }
    if !args.repair {
        println!(
            "run `deeprepair verify --store {} --repair` to salvage what is readable",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let salvaged = salvage::salvage(&path)?;
    for lost in &salvaged.lost {
        println!("lost: {lost}");
    }
    println!(
        "repaired {}: kept {} artifacts ({} chunks), {} cached stages, {} runs, {} stage records, {} checkpoints",
        path.display(),
        salvaged.artifacts,
        salvaged.chunks,
        salvaged.actions,
        salvaged.runs,
        salvaged.stage_records,
        salvaged.checkpoints
    );
    if !salvaged.lost_stages.is_empty() {
        println!(
            "{} cached stages lost; the next `run` recomputes them: {}",
            salvaged.lost_stages.len(),
            salvaged.lost_stages.join(", ")
        );
    }
    println!(
        "the damaged file is kept at {} (delete it when satisfied)",
        salvaged.damaged_copy.display()
    );
    Ok(ExitCode::SUCCESS)
}
