//! Stages as Slurm jobs. Slurm does the cluster's work (queueing, placement on nodes with the
//! requested CPUs, memory and GPUs, `CUDA_VISIBLE_DEVICES`); we submit one `sbatch` job per
//! ready stage, whose command is `deeprepair worker --task KEY`: it claims exactly that task
//! from the coordinator over HTTP, runs it, uploads the outputs and exits. The coordinator
//! keeps the store (one writer) and commits.
//!
//! A stage whose ranks may run as separate processes (a gang, `Resources::ranks` = N) is one
//! job of N tasks (`--ntasks=N`, `srun` starting a worker per task): Slurm starts them
//! together, possibly on several nodes, and the workers claim the gang's N rank jobs.
//!
//! A job that ends without reporting (node failure, `scancel`, time limit, OOM kill) is
//! noticed by polling `squeue`, and the stage fails as transient: the executor resubmits it,
//! and it resumes from the checkpoint the last job committed.

use crate::coordinator::{Coordinator, Route};
use crate::protocol::TOKEN_ENV;
use anyhow::{bail, Context};
use deeprepair_pipeline::kind::{ProgressSink, StageError, Task};
use deeprepair_pipeline::{Assignment, Dispatcher, RemoteOutcome};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SlurmOptions {
    /// The program the jobs run (must exist at this path on the compute nodes).
    pub program: PathBuf,
    /// Where job logs go (`slurm-<job>.log`); must be writable on the compute nodes.
    pub log_dir: PathBuf,
    pub partition: Option<String>,
    /// Extra `sbatch` arguments, e.g. `--time=2:00:00`, `--account=x`.
    pub extra_args: Vec<String>,
    /// Ask Slurm for `--gres=gpu:N` for stages that declare GPUs (off on CPU-only clusters).
    pub request_gpus: bool,
    /// How often to ask Slurm about a job's state.
    pub poll: Duration,
}

pub struct SlurmDispatcher {
    pub coordinator: Arc<Coordinator>,
    pub options: SlurmOptions,
}

/// A Slurm job's state as `squeue` reports it (`None`: Slurm no longer lists it).
fn job_state(job: &str) -> anyhow::Result<Option<String>> {
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-j", job, "-o", "%T"])
        .output()
        .context("running squeue")?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // squeue exits non-zero for a job id it has already forgotten.
        if err.contains("Invalid job id") {
            return Ok(None);
        }
        bail!("squeue -j {job}: {}", err.trim());
    }
    Ok((!text.is_empty()).then_some(text))
}

impl SlurmDispatcher {
    /// Submits the job: one task, or `ranks` tasks of a gang, each with its share of the
    /// stage's CPUs and GPUs.
    fn sbatch(&self, task: &Task, assignment: &Assignment, ranks: u32) -> anyhow::Result<String> {
        let o = &self.options;
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name=dr-{}", task.key.short()))
            .arg(format!(
                "--cpus-per-task={}",
                (assignment.resources.cpus / ranks).max(1)
            ))
            .arg(format!("--mem={}M", assignment.resources.mem_mb.max(1)))
            .arg(format!("--output={}/slurm-%j.log", o.log_dir.display()))
            // The token reaches the job through its environment, not its command line.
            .arg(format!("--export=ALL,{TOKEN_ENV}"))
            .env(TOKEN_ENV, self.coordinator.token());
        if let Some(ca) = self.coordinator.tls_ca() {
            cmd.env(crate::protocol::TLS_CA_ENV, ca);
        }
        if let Some(p) = &o.partition {
            cmd.arg(format!("--partition={p}"));
        }
        let gpus = assignment.resources.gpus;
        if ranks > 1 {
            cmd.arg(format!("--ntasks={ranks}"));
            if o.request_gpus && gpus > 0 {
                cmd.arg(format!("--gpus-per-task={}", (gpus / ranks).max(1)));
            }
        } else if o.request_gpus && gpus > 0 {
            cmd.arg(format!("--gres=gpu:{gpus}"));
        }
        cmd.args(&o.extra_args);
        let program = shell_quote(&o.program.display().to_string());
        let (url, key) = (self.coordinator.url(), task.key.hex());
        let worker = if ranks > 1 {
            // The task's id must expand in each task's shell, not in the batch script's.
            format!(
                "srun --kill-on-bad-exit=1 sh -c \"exec {program} worker --coordinator {url} \
                 --task {key} --name slurm-\\$SLURM_JOB_ID.\\$SLURM_PROCID\""
            )
        } else {
            format!(
                "exec {program} worker --coordinator {url} --task {key} --name slurm-$SLURM_JOB_ID"
            )
        };
        cmd.arg("--wrap").arg(worker);
        let out = cmd
            .output()
            .context("running sbatch (is Slurm installed and SLURM_CONF set?)")?;
        if !out.status.success() {
            bail!(
                "sbatch refused the job of {}: {}",
                task.stage,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let id = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id for {}", task.stage);
        }
        Ok(id)
    }
}

impl Dispatcher for SlurmDispatcher {
    fn accepts(&self, _assignment: &Assignment) -> bool {
        true
    }

    fn execute(
        &self,
        task: &Task,
        assignment: &Assignment,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
    ) -> Result<RemoteOutcome, StageError> {
        let ranks = assignment.resources.ranks.max(1);
        let gpus_per_rank = match self.options.request_gpus {
            true => assignment.resources.gpus / ranks,
            false => 0,
        };
        let threads = (assignment.resources.cpus / ranks).max(1) as usize;
        let rank_jobs = vec![(Route::Task(task.key), (0..gpus_per_rank).collect()); ranks as usize];
        let tickets = self.coordinator.submit_gang(task, rank_jobs, threads);
        let job = match self.sbatch(task, assignment, ranks) {
            Ok(job) => job,
            Err(e) => {
                // Nobody will claim the queued jobs: withdraw them.
                let withdraw = AtomicBool::new(true);
                let _ = self
                    .coordinator
                    .wait_gang(tickets, progress, &withdraw, |_, _| None);
                return Err(StageError::Fatal(e));
            }
        };
        progress.log(
            &task.stage,
            &match ranks {
                1 => format!("submitted as Slurm job {job}"),
                n => format!("submitted as Slurm job {job} of {n} tasks, one per rank"),
            },
        );
        let mut last_poll = Instant::now();
        let mut ended_at: Option<(Instant, String)> = None;
        let result = self
            .coordinator
            .wait_gang(tickets, progress, cancel, |_rank, _leased| {
                if last_poll.elapsed() < self.options.poll {
                    return None;
                }
                last_poll = Instant::now();
                let state = match job_state(&job) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("{e:#}");
                        return None;
                    }
                };
                let finished = match state.as_deref() {
                    None => Some("gone from the queue".to_string()),
                    Some("PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED") => {
                        None
                    }
                    Some(other) => Some(other.to_string()),
                };
                match (finished, &ended_at) {
                    (None, _) => None,
                    (Some(state), None) => {
                        // Give a finished job's last report a moment to arrive.
                        ended_at = Some((Instant::now(), state));
                        None
                    }
                    (Some(_), Some((at, state))) if at.elapsed() > Duration::from_secs(5) => {
                        Some(StageError::Transient(anyhow::anyhow!(
                        "Slurm job {job} ended ({state}) without reporting; see {}/slurm-{job}.log",
                        self.options.log_dir.display()
                    )))
                    }
                    _ => None,
                }
            });
        if result.is_err() {
            // Cancelled, or a rank of a gang failed while the job's other tasks may still
            // run (or wait for a peer that is gone): end the job. Harmless if it has ended.
            let _ = Command::new("scancel").arg(&job).status();
        }
        result.map(|mut outcome| {
            outcome.worker = format!("slurm:{job}/{}", outcome.worker);
            outcome
        })
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
