//! The subcommands. Each prints for a person by default and JSON with `--json` where a script
//! would want it.

use crate::store_path;
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use deeprepair_pipeline::render;
use deeprepair_pipeline::store::{
    salvage, RunRecord, RunState, StageRunRecord, StageState, StoreError,
};
use deeprepair_pipeline::{
    plan_file_with_vars, progress::Progress, run_plan, Artifact, Digest, Registry, RunOptions,
    Store,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

pub fn registry() -> Registry {
    let mut registry = Registry::new();
    deeprepair_pipeline::builtin::register(&mut registry);
    deeprepair_stages::register(&mut registry);
    registry
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Text,
    Dot,
    Mermaid,
    Json,
}

/// Manifest variables from the command line.
#[derive(Args, Clone, Default)]
pub struct VarArgs {
    /// Set a manifest variable: `--var name=value` (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// Shorthand for `--var data=PATH`: where the real data lives.
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
}

impl VarArgs {
    fn map(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for v in &self.vars {
            let (k, val) = v.split_once('=').ok_or_else(|| {
                crate::ml_commands::UsageError(format!("--var '{v}': expected NAME=VALUE"))
            })?;
            out.insert(k.trim().to_string(), val.to_string());
        }
        if let Some(d) = &self.data {
            out.insert("data".into(), d.display().to_string());
        }
        Ok(out)
    }
}

#[derive(Args)]
pub struct PlanArgs {
    manifest: PathBuf,
    #[command(flatten)]
    vars: VarArgs,
    #[arg(long, value_enum, default_value = "text")]
    format: PlanFormat,
    /// List every stage with its state and inputs.
    #[arg(long, short)]
    verbose: bool,
    #[arg(long)]
    store: Option<PathBuf>,
}

pub fn plan(args: PlanArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    let plan = plan_file_with_vars(&args.manifest, registry, &args.vars.map()?)?;
    let path = store_path(args.store, Some(&args.manifest));
    // Only read a store that exists; a plan never creates one.
    let store = if path.exists() {
        Some(Store::open_reader(&path)?)
    } else {
        None
    };
    let status = render::plan_status(&plan, store.as_ref())?;
    let out = match args.format {
        PlanFormat::Text => {
            let mut s = render::text(&plan, &status);
            if args.verbose {
                s.push_str(&render::text_stages(&plan, &status));
            }
            s
        }
        PlanFormat::Dot => render::dot(&plan, &status),
        PlanFormat::Mermaid => render::mermaid(&plan, &status),
        PlanFormat::Json => render::json(&plan, &status),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct RunArgs {
    manifest: PathBuf,
    #[command(flatten)]
    vars: VarArgs,
    #[arg(long)]
    store: Option<PathBuf>,
    /// CPU thread slots for concurrently running stages (default: all cores).
    #[arg(long, short)]
    jobs: Option<usize>,
    /// GPU ordinals to use, e.g. `0,1,2,3` (default: none, CPU only). Starts one worker
    /// process per GPU unless `--in-process`.
    #[arg(long)]
    gpus: Option<String>,
    /// Stages per GPU (overrides the manifest's `gpu_share`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    gpu_share: Option<u32>,
    /// Also start this many CPU worker processes; CPU stages then run in them.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Run GPU stages on threads of this process instead of per-GPU worker processes.
    #[arg(long, conflicts_with_all = ["workers", "slurm"])]
    in_process: bool,
    /// Run every stage as a Slurm job (`sbatch`); this process serves the store to them.
    #[arg(long, conflicts_with = "gpus")]
    slurm: bool,
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    slurm_partition: Option<String>,
    /// An extra `sbatch` argument (repeatable), e.g. `--sbatch-arg=--time=2:00:00`.
    #[arg(long = "sbatch-arg", requires = "slurm", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
    /// Do not ask Slurm for GPUs (`--gres`) even for stages that declare them.
    #[arg(long, requires = "slurm")]
    slurm_cpu_only: bool,
    /// At most this many Slurm jobs of the run submitted and not ended at once. Slurm stages
    /// take none of this machine's CPU or memory budget (`--jobs`).
    #[arg(long, requires = "slurm", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_jobs: u64,
    /// Seconds between two looks at the run's Slurm jobs (one `squeue` for all of them).
    #[arg(long, requires = "slurm", default_value_t = 10.0)]
    slurm_poll: f64,
    /// At most this many `sbatch` calls per second.
    #[arg(long, requires = "slurm", default_value_t = 10.0)]
    submit_rate: f64,
    /// Address the coordinator listens on for workers (default: 127.0.0.1, or 0.0.0.0 with
    /// `--slurm`; port 0 picks a free one).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Host name workers use to reach this coordinator (default: this machine's host name
    /// with `--slurm`, else the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Seconds without a heartbeat after which a worker's stage is given to another worker.
    #[arg(long, default_value_t = 30)]
    lease_timeout: u64,
    /// Seconds a stage in a worker process or Slurm job may go without progress (no training
    /// step, no progress update) before it counts as hung and is retried (default: never).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout: Option<u64>,
    /// Serve workers over HTTPS with this PEM certificate (chain) instead of plain HTTP;
    /// workers trust exactly it (or $DEEPREPAIR_TLS_CA). Slurm jobs must see the same path.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A `deeprepair serve` URL whose finished stages answer this run's stages before they
    /// would execute (copied here, verified); its token in $DEEPREPAIR_SERVE_TOKEN.
    #[arg(long)]
    remote_cache: Option<String>,
    /// The largest upload (a stage's outputs, a checkpoint) a worker may send, in MiB.
    #[arg(long, default_value_t = deeprepair_workers::coordinator::DEFAULT_MAX_UPLOAD >> 20)]
    max_upload_mib: u64,
    /// Keep running independent stages after a failure.
    #[arg(long)]
    keep_going: bool,
    /// Extra attempts for transient failures.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Run only these stages (and what they need).
    #[arg(long)]
    only: Vec<String>,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    plain: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Where stages run besides this process: worker processes (per GPU, CPU) or Slurm jobs.
struct RemoteSetup {
    gpus: Vec<u32>,
    cpu_workers: usize,
    slurm: Option<deeprepair_workers::slurm::SlurmOptions>,
    listen: Option<std::net::SocketAddr>,
    advertise: Option<String>,
    lease_timeout: std::time::Duration,
    stall_timeout: Option<std::time::Duration>,
    max_upload: u64,
    tls: Option<deeprepair_workers::coordinator::TlsFiles>,
    log_dir: PathBuf,
}

impl RemoteSetup {
    /// Starts the coordinator and the workers when any are wanted, and sets the run's
    /// dispatcher.
    fn start(
        self,
        store: Arc<Store>,
        options: &mut RunOptions,
    ) -> anyhow::Result<Option<Arc<dyn deeprepair_pipeline::Dispatcher>>> {
        use deeprepair_workers::coordinator::Coordinator;
        use deeprepair_workers::local::{LocalDispatcher, LocalPool, WorkerSpec};
        if self.gpus.is_empty() && self.cpu_workers == 0 && self.slurm.is_none() {
            return Ok(None);
        }
        let default_listen = if self.slurm.is_some() {
            "0.0.0.0:0"
        } else {
            "127.0.0.1:0"
        };
        let listen = self
            .listen
            .unwrap_or_else(|| default_listen.parse().expect("a socket address"));
        let advertise = self.advertise.or_else(|| {
            (self.slurm.is_some() && listen.ip().is_unspecified()).then(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into())
            })
        });
        let server = deeprepair_workers::coordinator::ServerOptions {
            lease_timeout: self.lease_timeout,
            max_upload: self.max_upload,
            tls: self.tls,
        };
        let coordinator = Coordinator::start_with(store, listen, advertise.as_deref(), server)?;
        coordinator.set_stall_timeout(self.stall_timeout);
        tracing::info!("coordinator listening at {}", coordinator.url());
        let dispatcher: Arc<dyn deeprepair_pipeline::Dispatcher> = match self.slurm {
            Some(mut slurm) => {
                std::fs::create_dir_all(&slurm.log_dir)?;
                slurm.log_dir = slurm.log_dir.canonicalize()?;
                Arc::new(deeprepair_workers::slurm::SlurmDispatcher::new(
                    coordinator,
                    slurm,
                ))
            }
            None => {
                let mut specs: Vec<WorkerSpec> = self
                    .gpus
                    .iter()
                    .map(|&g| WorkerSpec {
                        name: format!("gpu{g}"),
                        gpu: Some(g),
                    })
                    .collect();
                specs.extend((0..self.cpu_workers).map(|i| WorkerSpec {
                    name: format!("cpu{i}"),
                    gpu: None,
                }));
                let program = std::env::current_exe()?;
                let pool = LocalPool::start(coordinator, program, specs, self.log_dir)?;
                Arc::new(LocalDispatcher { pool })
            }
        };
        options.dispatcher = Some(dispatcher.clone());
        Ok(Some(dispatcher))
    }
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL (`deeprepair run` prints it; the token comes from
    /// $DEEPREPAIR_WORKER_TOKEN).
    #[arg(long)]
    coordinator: String,
    /// This worker's name in logs and provenance.
    #[arg(long, default_value = "worker")]
    name: String,
    /// The GPU this worker owns, as the coordinator numbers them (the process should see it
    /// as its only device, e.g. through CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    gpu: Option<u32>,
    /// Run this one task (a stage key) and exit: how a Slurm job runs a stage.
    #[arg(long)]
    task: Option<String>,
    /// Exit after this many seconds without work.
    #[arg(long)]
    idle_exit: Option<u64>,
    /// Read inputs through a cache in this folder (on the node's disk, or on a filesystem the
    /// workers share), so each artifact is fetched once per cache, not once per stage.
    /// `run` passes its environment on to workers and Slurm jobs, so setting
    /// $DEEPREPAIR_CACHE_DIR for `run` gives every worker the cache.
    #[arg(long, env = deeprepair_workers::cache::CACHE_DIR_ENV)]
    cache_dir: Option<PathBuf>,
    /// PEM certificates to trust for an `https://` coordinator (`run --tls-cert` sets this
    /// for the workers it starts).
    #[arg(long, env = deeprepair_workers::protocol::TLS_CA_ENV)]
    tls_ca: Option<PathBuf>,
    /// The cache's bound in MiB; least recently used entries are removed beyond it.
    #[arg(long, env = deeprepair_workers::cache::CACHE_MAX_ENV,
          default_value_t = deeprepair_workers::cache::DEFAULT_MAX_MIB)]
    cache_max_mib: u64,
}

pub fn worker(args: WorkerArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    let token = std::env::var(deeprepair_workers::protocol::TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!(
            "${} is not set (the coordinator's token)",
            deeprepair_workers::protocol::TOKEN_ENV
        )
    })?;
    let task = match &args.task {
        Some(hex) => Some(
            deeprepair_pipeline::Digest::from_hex(hex)
                .ok_or_else(|| anyhow::anyhow!("--task {hex}: expected a 64-digit stage key"))?,
        ),
        None => None,
    };
    let options = deeprepair_workers::worker::WorkerOptions {
        coordinator: args.coordinator,
        token,
        name: args.name,
        gpu: args.gpu,
        task,
        idle_exit: args.idle_exit.map(std::time::Duration::from_secs),
        tls_ca: match &args.tls_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("cannot read --tls-ca {}: {e}", path.display()))?,
            ),
            None => None,
        },
        cache: match &args.cache_dir {
            Some(dir) => Some(Arc::new(deeprepair_workers::cache::ArtifactCache::open(
                dir,
                args.cache_max_mib.saturating_mul(1 << 20),
            )?)),
            None => None,
        },
    };
    let summary = deeprepair_workers::worker::run_worker(&options, registry)?;
    if let Some(cache) = &options.cache {
        let c = cache.stats();
        tracing::info!(
            "artifact cache {}: {} hits, {} fetched, {} corrupt entries refetched, {} evicted",
            cache.dir().display(),
            c.hits,
            c.fetched,
            c.corrupt,
            c.evicted
        );
    }
    tracing::info!(
        "worker {} done: {} succeeded, {} failed",
        options.name,
        summary.succeeded,
        summary.failed
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    let plan = plan_file_with_vars(&args.manifest, registry, &args.vars.map()?)?;
    let path = store_path(args.store, Some(&args.manifest));
    let store = Arc::new(Store::open_writer(&path)?);
    if let Some(url) = &args.remote_cache {
        remote_cache_prefetch(&plan, &store, url)?;
    }
    let gpus = deeprepair_workers::gpus_for_run(args.gpus.as_deref())?;
    let mut options = RunOptions {
        gpus: gpus.clone(),
        gpu_share: args.gpu_share,
        keep_going: args.keep_going,
        retries: args.retries,
        only: args.only,
        handle_ctrl_c: true,
        ..RunOptions::default()
    };
    if let Some(j) = args.jobs {
        options.jobs = j.max(1);
    }
    if !(args.submit_rate > 0.0 && args.submit_rate.is_finite()) {
        return Err(crate::ml_commands::UsageError(format!(
            "--submit-rate {}: expected a positive number of submissions per second",
            args.submit_rate
        ))
        .into());
    }
    let submit_interval = std::time::Duration::from_secs_f64(1.0 / args.submit_rate);
    if !(args.slurm_poll >= 0.05 && args.slurm_poll <= 3600.0) {
        return Err(crate::ml_commands::UsageError(format!(
            "--slurm-poll {}: expected seconds between 0.05 and 3600",
            args.slurm_poll
        ))
        .into());
    }
    let remote = RemoteSetup {
        gpus: if args.in_process { vec![] } else { gpus },
        cpu_workers: args.workers,
        slurm: args.slurm.then(|| deeprepair_workers::slurm::SlurmOptions {
            program: std::env::current_exe().unwrap_or_else(|_| "deeprepair".into()),
            log_dir: path
                .parent()
                .map(|p| p.join("slurm-logs"))
                .unwrap_or_else(|| "slurm-logs".into()),
            partition: args.slurm_partition,
            extra_args: args.sbatch_args,
            request_gpus: !args.slurm_cpu_only,
            poll: std::time::Duration::from_secs_f64(args.slurm_poll),
            max_jobs: args.max_jobs as usize,
            store_tag: store_tag(&path),
            submit_interval,
        }),
        listen: args.listen,
        advertise: args.advertise,
        lease_timeout: std::time::Duration::from_secs(args.lease_timeout.max(1)),
        stall_timeout: args.stall_timeout.map(std::time::Duration::from_secs),
        max_upload: args.max_upload_mib.saturating_mul(1 << 20),
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => {
                Some(deeprepair_workers::coordinator::TlsFiles { cert, key })
            }
            _ => None,
        },
        log_dir: path
            .parent()
            .map(|p| p.join("workers"))
            .unwrap_or_else(|| "workers".into()),
    };
    // Kept alive for the whole run: dropping it stops the worker processes and the server.
    let _dispatcher = remote.start(store.clone(), &mut options)?;
    let progress = Arc::new(Progress::new(plan.stages.len() as u64, args.plain));
    let summary = run_plan(
        &plan,
        registry,
        store,
        &options,
        progress.clone(),
        Arc::new(AtomicBool::new(false)),
    )?;
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "run {}: {:?} in {:.1}s — {} executed, {} cached, {} failed, {} skipped (store {})",
            summary.run,
            summary.state,
            summary.seconds,
            summary.executed.len(),
            summary.cached.len(),
            summary.failed.len(),
            summary.skipped.len(),
            path.display()
        );
        for stage in &summary.recomputed_corrupt {
            println!("  recomputed {stage}: its cached result was corrupt or missing");
        }
    }
    for f in &summary.failed {
        eprintln!("\nstage {} failed: {}", f.stage, f.error);
        if !f.log_tail.is_empty() {
            eprintln!("  last log lines:");
            for line in &f.log_tail {
                eprintln!("    {line}");
            }
        }
    }
    Ok(match summary.state {
        RunState::Succeeded => ExitCode::SUCCESS,
        RunState::Cancelled => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    })
}

/// A short tag naming a store's Slurm jobs: the hash of its absolute path (the store itself
/// may not exist yet when this is asked, its folder does).
fn store_tag(path: &Path) -> String {
    let absolute = path
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .map(|p| p.join(path.file_name().unwrap_or_default()))
        .unwrap_or_else(|| path.to_path_buf());
    Digest::of(absolute.to_string_lossy().as_bytes()).hex()[..8].to_string()
}

#[derive(Args)]
pub struct StoreArgs {
    /// The store (default: $DEEPREPAIR_STORE, else .deeprepair/store.redb next to --manifest
    /// or in the current directory).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Find the store next to this manifest.
    #[arg(long)]
    manifest: Option<PathBuf>,
}

impl StoreArgs {
    pub(crate) fn open(&self) -> anyhow::Result<Store> {
        let path = store_path(self.store.clone(), self.manifest.as_deref());
        Ok(Store::open_reader(&path)?)
    }
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn run_state_label(run: &RunRecord) -> String {
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
    store: StoreArgs,
    #[arg(long)]
    run: Option<u64>,
    #[arg(long)]
    json: bool,
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
    store: StoreArgs,
    /// Only stages of this kind.
    #[arg(long)]
    stage: Option<String>,
    /// Stages of this run (default: the last run).
    #[arg(long)]
    run: Option<u64>,
    #[arg(long)]
    json: bool,
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
    store: StoreArgs,
    /// A stage path (`repair[corruption=fog,method=augmix]`) or an artifact digest prefix.
    target: String,
    #[arg(long)]
    json: bool,
}

/// Finds the newest record of a stage path across runs.
fn find_stage(store: &Store, path: &str) -> anyhow::Result<Option<(u64, StageRunRecord)>> {
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

fn preview(a: &Artifact) -> Option<String> {
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

fn resolve_digest(store: &Store, target: &str) -> anyhow::Result<Digest> {
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
    store: StoreArgs,
    /// Artifact digest (or prefix).
    digest: String,
    #[arg(long)]
    out: PathBuf,
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
    store: StoreArgs,
    /// Address to serve on. Loopback by default; any other address is guarded by a random
    /// token, printed once at start, that every request must carry.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
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
    store: StoreArgs,
    /// Keep only the newest N runs (default: all runs).
    #[arg(long)]
    keep_runs: Option<usize>,
    #[arg(long)]
    dry_run: bool,
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
pub struct PushArgs {
    /// The store to copy into: a store file (created if missing; no other writer may hold
    /// it), or the URL of a `deeprepair serve --writable` (its token in
    /// $DEEPREPAIR_SERVE_TOKEN).
    dest: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct PullArgs {
    /// The store to copy from: a store file (opened read-only: it may belong to a running
    /// `run`), or the URL of a `deeprepair serve` (its token in $DEEPREPAIR_SERVE_TOKEN).
    src: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Also take stages pushed to it (`push URL`); the store is then opened as its writer.
    #[arg(long)]
    writable: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8390")]
    listen: std::net::SocketAddr,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use deeprepair_workers::serve::SERVE_TOKEN_ENV;
    let path = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    if !path.exists() && !args.writable {
        anyhow::bail!("no store at {}", path.display());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let store = Arc::new(if args.writable {
        Store::open_writer(&path)?
    } else {
        Store::open_read_only(&path)?
    });
    let token = match std::env::var(SERVE_TOKEN_ENV) {
        Ok(token) => token,
        Err(_) => {
            let token = deeprepair_workers::new_secret()?;
            println!("token (give it to `pull` in ${SERVE_TOKEN_ENV}): {token}");
            token
        }
    };
    let server = deeprepair_workers::serve::serve(store, args.listen, token, args.writable)?;
    println!(
        "serving {} {} at http://{}",
        path.display(),
        if args.writable {
            "read-write"
        } else {
            "read-only"
        },
        server.addr
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    server.wait();
    Ok(ExitCode::SUCCESS)
}

/// Copies `from`'s finished stages into `to` and says what happened.
fn import(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<ExitCode> {
    if !from.exists() {
        anyhow::bail!("no store at {}", from.display());
    }
    if from.canonicalize().ok() == to.canonicalize().ok() {
        anyhow::bail!("{} is the same store as {}", from.display(), to.display());
    }
    let source = Store::open_read_only(from)?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let dest = Store::open_writer(to)?;
    let report = dest.import_actions(&source)?;
    print_import(
        &report,
        &from.display().to_string(),
        &to.display().to_string(),
    );
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `run --remote-cache URL`: copies the plan's stages the remote store has finished.
fn remote_cache_prefetch(
    plan: &deeprepair_pipeline::Plan,
    store: &Store,
    url: &str,
) -> anyhow::Result<()> {
    use deeprepair_workers::serve::{prefetch, RemoteStore, SERVE_TOKEN_ENV};
    let token = std::env::var(SERVE_TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!("--remote-cache needs ${SERVE_TOKEN_ENV} (the token `serve` printed)")
    })?;
    let report = prefetch(plan, store, &RemoteStore::new(url, &token))
        .with_context(|| format!("consulting the remote cache {url}"))?;
    tracing::info!(
        "remote cache {url}: {} stages copied ({:.1} MiB), {} already here",
        report.copied,
        report.bytes as f64 / (1 << 20) as f64,
        report.already_present
    );
    for skipped in &report.skipped {
        tracing::warn!("remote cache: not copied: {skipped}");
    }
    Ok(())
}

pub fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let here = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    let dest = args.dest.to_string_lossy();
    if !(dest.starts_with("http://") || dest.starts_with("https://")) {
        return import(&here, &args.dest);
    }
    use deeprepair_workers::serve::SERVE_TOKEN_ENV;
    let token = std::env::var(SERVE_TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!("${SERVE_TOKEN_ENV} is not set (the token `serve` printed)")
    })?;
    if !here.exists() {
        anyhow::bail!("no store at {}", here.display());
    }
    let source = Store::open_read_only(&here)?;
    let report = deeprepair_workers::serve::push_to(&source, &dest, &token)?;
    print_import(&report, &here.display().to_string(), &dest);
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let here = store_path(args.store.store.clone(), args.store.manifest.as_deref());
    let src = args.src.to_string_lossy();
    if !(src.starts_with("http://") || src.starts_with("https://")) {
        return import(&args.src, &here);
    }
    use deeprepair_workers::serve::SERVE_TOKEN_ENV;
    let token = std::env::var(SERVE_TOKEN_ENV).map_err(|_| {
        anyhow::anyhow!("${SERVE_TOKEN_ENV} is not set (the token `serve` printed)")
    })?;
    if let Some(parent) = here.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let dest = Store::open_writer(&here)?;
    let report = deeprepair_workers::serve::pull_from(&src, &token, &dest)?;
    print_import(&report, &src, &here.display().to_string());
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_import(report: &deeprepair_pipeline::store::ImportReport, from: &str, to: &str) {
    println!(
        "copied {} stages ({:.1} MiB of outputs, digests verified) from {from} to {to}; {} already there",
        report.copied,
        report.bytes as f64 / (1 << 20) as f64,
        report.already_present
    );
    for skipped in &report.skipped {
        println!("  not copied: {skipped}");
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Salvage a damaged store: keep every record that reads and verifies in a fresh file, put
    /// it in the store's place (the damaged file is kept beside it), and say what was lost; the
    /// next `run` recomputes the lost stages.
    #[arg(long)]
    repair: bool,
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

fn bench_orchestrator(
    stages: usize,
    dir: Option<PathBuf>,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let rows = deeprepair_pipeline::bench::orchestrator(stages, dir, registry)?;
    println!("{}", deeprepair_pipeline::bench::table(&rows));
    Ok(ExitCode::SUCCESS)
}
