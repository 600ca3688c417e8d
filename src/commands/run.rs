//! `run` and `worker`: a plan executed here, on worker processes or as Slurm jobs.

use super::*;
use crate::store_path;
use anyhow::Context;
use clap::Args;
use deeprepair_pipeline::store::RunState;
use deeprepair_pipeline::{
    plan_file_with_vars, progress::Progress, run_plan, Digest, Registry, RunOptions, Store,
};
use deeprepair_workers::backend::{Backend, Remote};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Args)]
pub struct RunArgs {
    pub(crate) manifest: PathBuf,
    #[command(flatten)]
    pub(crate) vars: VarArgs,
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
    /// CPU thread slots for concurrently running stages (default: all cores).
    #[arg(long, short)]
    pub(crate) jobs: Option<usize>,
    /// GPU ordinals to use, e.g. `0,1,2,3` (default: none, CPU only). Starts one worker
    /// process per GPU unless `--in-process`.
    #[arg(long)]
    pub(crate) gpus: Option<String>,
    /// Stages per GPU (overrides the manifest's `gpu_share`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) gpu_share: Option<u32>,
    /// Also start this many CPU worker processes; CPU stages then run in them.
    #[arg(long, default_value_t = 0)]
    pub(crate) workers: usize,
    /// Run GPU stages on threads of this process instead of per-GPU worker processes.
    #[arg(long, conflicts_with_all = ["workers", "slurm"])]
    pub(crate) in_process: bool,
    /// Run every stage as a Slurm job (`sbatch`); this process serves the store to them.
    #[arg(long, conflicts_with = "gpus")]
    pub(crate) slurm: bool,
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    pub(crate) slurm_partition: Option<String>,
    /// An extra `sbatch` argument (repeatable), e.g. `--sbatch-arg=--time=2:00:00`.
    #[arg(long = "sbatch-arg", requires = "slurm", allow_hyphen_values = true)]
    pub(crate) sbatch_args: Vec<String>,
    /// Do not ask Slurm for GPUs (`--gres`) even for stages that declare them.
    #[arg(long, requires = "slurm")]
    pub(crate) slurm_cpu_only: bool,
    /// At most this many Slurm jobs of the run submitted and not ended at once. Slurm stages
    /// take none of this machine's CPU or memory budget (`--jobs`).
    #[arg(long, requires = "slurm", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) max_jobs: u64,
    /// Seconds between two looks at the run's Slurm jobs (one `squeue` for all of them).
    #[arg(long, requires = "slurm", default_value_t = 10.0)]
    pub(crate) slurm_poll: f64,
    /// At most this many `sbatch` calls per second.
    #[arg(long, requires = "slurm", default_value_t = 10.0)]
    pub(crate) submit_rate: f64,
    /// Address the coordinator listens on for workers (default: 127.0.0.1, or 0.0.0.0 with
    /// `--slurm`; port 0 picks a free one).
    #[arg(long)]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// Host name workers use to reach this coordinator (default: this machine's host name
    /// with `--slurm`, else the listen address).
    #[arg(long)]
    pub(crate) advertise: Option<String>,
    /// Seconds without a heartbeat after which a worker's stage is given to another worker.
    #[arg(long, default_value_t = 30)]
    pub(crate) lease_timeout: u64,
    /// Seconds a stage in a worker process or Slurm job may go without progress (no training
    /// step, no progress update) before it counts as hung and is retried (default: never).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) stall_timeout: Option<u64>,
    /// Serve workers over HTTPS with this PEM certificate (chain) instead of plain HTTP;
    /// workers trust exactly it (or $DEEPREPAIR_TLS_CA). Slurm jobs must see the same path.
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// A `deeprepair serve` URL whose finished stages answer this run's stages before they
    /// would execute (copied here, verified); its token in $DEEPREPAIR_SERVE_TOKEN.
    #[arg(long)]
    pub(crate) remote_cache: Option<String>,
    /// The largest upload (a stage's outputs, a checkpoint) a worker may send, in MiB.
    #[arg(long, default_value_t = deeprepair_workers::coordinator::DEFAULT_MAX_UPLOAD >> 20)]
    pub(crate) max_upload_mib: u64,
    /// Keep running independent stages after a failure.
    #[arg(long)]
    pub(crate) keep_going: bool,
    /// Extra attempts for transient failures.
    #[arg(long, default_value_t = 2)]
    pub(crate) retries: u32,
    /// Run only these stages (and what they need).
    #[arg(long)]
    pub(crate) only: Vec<String>,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    pub(crate) plain: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator's URL (`deeprepair run` prints it; the token comes from
    /// $DEEPREPAIR_WORKER_TOKEN).
    #[arg(long)]
    pub(crate) coordinator: String,
    /// This worker's name in logs and provenance.
    #[arg(long, default_value = "worker")]
    pub(crate) name: String,
    /// The GPU this worker owns, as the coordinator numbers them (the process should see it
    /// as its only device, e.g. through CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    pub(crate) gpu: Option<u32>,
    /// Run this one task (a stage key) and exit: how a Slurm job runs a stage.
    #[arg(long)]
    pub(crate) task: Option<String>,
    /// Exit after this many seconds without work.
    #[arg(long)]
    pub(crate) idle_exit: Option<u64>,
    /// Read inputs through a cache in this folder (on the node's disk, or on a filesystem the
    /// workers share), so each artifact is fetched once per cache, not once per stage.
    /// `run` passes its environment on to workers and Slurm jobs, so setting
    /// $DEEPREPAIR_CACHE_DIR for `run` gives every worker the cache.
    #[arg(long, env = deeprepair_workers::cache::CACHE_DIR_ENV)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// PEM certificates to trust for an `https://` coordinator (`run --tls-cert` sets this
    /// for the workers it starts).
    #[arg(long, env = deeprepair_workers::protocol::TLS_CA_ENV)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// The cache's bound in MiB; least recently used entries are removed beyond it.
    #[arg(long, env = deeprepair_workers::cache::CACHE_MAX_ENV,
          default_value_t = deeprepair_workers::cache::DEFAULT_MAX_MIB)]
    pub(crate) cache_max_mib: u64,
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
    let gpus = if args.in_process { vec![] } else { gpus };
    let backend = if args.slurm {
        Some(Backend::Slurm(deeprepair_workers::slurm::SlurmOptions {
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
        }))
    } else if !gpus.is_empty() || args.workers > 0 {
        Some(Backend::Local {
            gpus,
            cpu_workers: args.workers,
            log_dir: path
                .parent()
                .map(|p| p.join("workers"))
                .unwrap_or_else(|| "workers".into()),
        })
    } else {
        None
    };
    // Kept alive for the whole run: dropping it stops the worker processes and the server.
    let _dispatcher = match backend {
        None => None,
        Some(backend) => {
            let dispatcher = Remote {
                backend,
                listen: args.listen,
                advertise: args.advertise,
                server: deeprepair_workers::coordinator::ServerOptions {
                    lease_timeout: std::time::Duration::from_secs(args.lease_timeout.max(1)),
                    max_upload: args.max_upload_mib.saturating_mul(1 << 20),
                    tls: match (args.tls_cert, args.tls_key) {
                        (Some(cert), Some(key)) => {
                            Some(deeprepair_workers::coordinator::TlsFiles { cert, key })
                        }
                        _ => None,
                    },
                },
                stall_timeout: args.stall_timeout.map(std::time::Duration::from_secs),
            }
            .start(store.clone())?;
            options.dispatcher = Some(dispatcher.clone());
            Some(dispatcher)
        }
    };
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
pub(crate) fn store_tag(path: &Path) -> String {
    let absolute = path
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .map(|p| p.join(path.file_name().unwrap_or_default()))
        .unwrap_or_else(|| path.to_path_buf());
    Digest::of(absolute.to_string_lossy().as_bytes()).hex()[..8].to_string()
}

/// `run --remote-cache URL`: copies the plan's stages the remote store has finished.
pub(crate) fn remote_cache_prefetch(
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
