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
//! Every job of a run has the run's name, `dr-<store tag>-r<run>` (the store tag: a hash of
//! the store's path), and says its stage and key in its comment. One poller thread asks
//! `squeue --name=<that name>` about all of the run's jobs at once every `poll` (and only
//! while any is in flight), whatever their number. A job that ends without reporting (node
//! failure, `scancel`, time limit, OOM kill) is noticed there, and the stage fails as
//! transient: the executor resubmits it, and it resumes from the checkpoint the last job
//! committed. When a run begins it cancels the jobs earlier runs of the same store left in the
//! queue (a `run` killed with SIGKILL cannot cancel its own), and says so.
//!
//! How a job ended decides what comes next ([`classify`]): out of memory or time, the stage's
//! next job asks for more (its `mem_mb` or `time` × (1 + such failures)); preempted or on a
//! failed node (jobs are submitted `--no-requeue`, so Slurm does not requeue them itself), it
//! is submitted again without counting as a retry; pending for a reason waiting cannot clear
//! (e.g. more time than its partition allows), the stage fails with that reason.

use crate::coordinator::{Coordinator, Route};
use crate::protocol::TOKEN_ENV;
use anyhow::{bail, Context};
use deeprepair_pipeline::kind::{format_slurm_time, ProgressSink, StageError, Task};
use deeprepair_pipeline::{Assignment, Dispatcher, RemoteOutcome};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
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
    /// How often to ask Slurm about the run's jobs (one `squeue` for all of them).
    pub poll: Duration,
    /// Names this store's jobs (`dr-<tag>-r<run>`), so that a run finds the jobs that earlier
    /// runs of the same store left behind: a short hash of the store's path.
    pub store_tag: String,
    /// At most this many of the run's jobs are submitted and not ended at once.
    pub max_jobs: usize,
    /// At least this long between two `sbatch` calls (zero: no limit).
    pub submit_interval: Duration,
}

pub struct SlurmDispatcher {
    coordinator: Arc<Coordinator>,
    options: SlurmOptions,
    /// When the next `sbatch` may run (the submission rate).
    next_submit: Mutex<Instant>,
    /// The name of every job of this run, set when the run begins.
    job_name: OnceLock<String>,
    board: Arc<Board>,
    poller: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Stages whose jobs ran out of memory or time: what their next job asks for more.
    grown: Mutex<HashMap<deeprepair_pipeline::Digest, Growth>>,
}

/// A job as `squeue` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `OUT_OF_MEMORY`, …
    pub state: String,
    /// Why it waits or ended (`Resources`, `PartitionTimeLimit`, `NonZeroExitCode`, …).
    pub reason: String,
}

/// What the poller last saw, shared with the threads waiting on jobs.
struct Board {
    state: Mutex<BoardState>,
    wake: Condvar,
}

#[derive(Default)]
struct BoardState {
    /// Jobs submitted and not yet ended, as far as this run knows.
    in_flight: usize,
    /// When the last successful poll began, and the run's jobs it saw.
    seen: Option<(Instant, HashMap<String, JobStatus>)>,
    /// `squeue` calls made.
    polls: u64,
    stop: bool,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Parses `squeue -o "%i|%T|%r"` lines (a job array's or a het job's pieces keep their
/// `_`/`+` suffix, which our single jobs never have).
pub fn parse_squeue(text: &str) -> HashMap<String, JobStatus> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.trim().splitn(3, '|');
            let id = f.next()?.trim();
            let state = f.next()?.trim();
            let reason = f.next().unwrap_or("").trim();
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_string(),
                    JobStatus {
                        state: state.to_string(),
                        reason: reason.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// One `squeue` for every job named `name`, finished ones included (while Slurm keeps them,
/// `MinJobAge`).
fn query_jobs(name: &str) -> anyhow::Result<HashMap<String, JobStatus>> {
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "--name", name, "-o", "%i|%T|%r"])
        .output()
        .context("running squeue")?;
    if !out.status.success() {
        bail!(
            "squeue --name {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)))
}

/// The poller: while any job is in flight, one `squeue` for all of the run's jobs every
/// `poll`.
fn poll_loop(board: Arc<Board>, name: String, poll: Duration) {
    let mut state = board.lock();
    loop {
        state = board
            .wake
            .wait_timeout(state, poll)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if state.stop {
            return;
        }
        if state.in_flight == 0 {
            continue;
        }
        state.polls += 1;
        drop(state);
        let began = Instant::now();
        let result = query_jobs(&name);
        state = board.lock();
        match result {
            Ok(jobs) => state.seen = Some((began, jobs)),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

impl SlurmDispatcher {
    pub fn new(coordinator: Arc<Coordinator>, options: SlurmOptions) -> SlurmDispatcher {
        SlurmDispatcher {
            coordinator,
            options,
            next_submit: Mutex::new(Instant::now()),
            job_name: OnceLock::new(),
            board: Arc::new(Board {
                state: Mutex::new(BoardState::default()),
                wake: Condvar::new(),
            }),
            poller: Mutex::new(None),
            grown: Mutex::new(HashMap::new()),
        }
    }

    /// `squeue` calls made so far by the poller.
    pub fn polls(&self) -> u64 {
        self.board.lock().polls
    }

    /// The prefix of every job name of this store's runs.
    fn store_prefix(&self) -> String {
        format!("dr-{}-r", self.options.store_tag)
    }

    fn job_name(&self) -> &str {
        self.job_name.get().map(String::as_str).unwrap_or("dr")
    }

    /// What the last poll that began after `since` saw of `job`: `None` when no poll has
    /// begun since; `Some(None)` when Slurm no longer lists the job.
    fn seen_since(&self, job: &str, since: Instant) -> Option<Option<JobStatus>> {
        let state = self.board.lock();
        let (at, jobs) = state.seen.as_ref()?;
        (*at >= since).then(|| jobs.get(job).cloned())
    }

    /// Waits for this submission's turn under `submit_interval`.
    fn pace_submission(&self) {
        let wait = {
            let mut next = self.next_submit.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + self.options.submit_interval;
            at - now
        };
        std::thread::sleep(wait);
    }

    /// Submits the job: one task, or `ranks` tasks of a gang, each with its share of the
    /// stage's CPUs and GPUs.
    fn sbatch(
        &self,
        task: &Task,
        assignment: &Assignment,
        ranks: u32,
        growth: Growth,
    ) -> anyhow::Result<String> {
        self.pace_submission();
        let o = &self.options;
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", self.job_name()))
            .arg(format!(
                "--comment=deeprepair stage={} key={}",
                task.stage.replace(char::is_whitespace, "_"),
                task.key.short()
            ))
            .arg(format!(
                "--cpus-per-task={}",
                (assignment.resources.cpus / ranks).max(1)
            ))
            .arg(format!("--mem={}M", grown_memory(assignment, growth)))
            .arg(format!("--output={}/slurm-%j.log", o.log_dir.display()))
            // Retries are ours (from the last checkpoint, with more memory or time when
            // that was short): a job Slurm would requeue after a node failure or preemption
            // ends NODE_FAIL/PREEMPTED instead, and `execute` submits it again.
            .arg("--no-requeue")
            // The token reaches the job through its environment, not its command line.
            .arg(format!("--export=ALL,{TOKEN_ENV}"))
            .env(TOKEN_ENV, self.coordinator.token());
        if let Some(ca) = self.coordinator.tls_ca() {
            cmd.env(crate::protocol::TLS_CA_ENV, ca);
        }
        // The run's `--sbatch-arg`s first: the stage's own requests below win over them.
        cmd.args(&o.extra_args);
        let c = &assignment.cluster;
        if let Some(p) = c.partition.as_ref().or(o.partition.as_ref()) {
            cmd.arg(format!("--partition={p}"));
        }
        for (option, value) in [
            ("account", &c.account),
            ("qos", &c.qos),
            ("constraint", &c.constraint),
        ] {
            if let Some(v) = value {
                cmd.arg(format!("--{option}={v}"));
            }
        }
        if let Some(t) = grown_time(assignment, growth) {
            cmd.arg(format!("--time={}", format_slurm_time(t)));
        }
        let gpus = assignment.resources.gpus;
        let typed = |n: u32| match &c.gpu_type {
            Some(t) => format!("{t}:{n}"),
            None => n.to_string(),
        };
        if ranks > 1 {
            cmd.arg(format!("--ntasks={ranks}"));
            if let Some(nodes) = c.nodes {
                cmd.arg(format!("--nodes={nodes}"));
                cmd.arg(format!("--ntasks-per-node={}", (ranks / nodes).max(1)));
            }
            if o.request_gpus && gpus > 0 {
                cmd.arg(format!("--gpus-per-task={}", typed((gpus / ranks).max(1))));
            }
        } else if o.request_gpus && gpus > 0 {
            cmd.arg(format!("--gres=gpu:{}", typed(gpus)));
        }
        cmd.args(&c.sbatch_args);
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

    fn remote_capacity(&self) -> Option<usize> {
        Some(self.options.max_jobs.max(1))
    }

    /// Names this run's jobs, cancels those earlier runs of the store left queued or
    /// running, and starts the poller.
    fn begin_run(&self, run: u64) -> anyhow::Result<()> {
        let name = format!("{}{run}", self.store_prefix());
        let _ = self.job_name.set(name.clone());
        // Not fatal: if Slurm cannot be asked, the first sbatch says why.
        if let Err(e) = self.cancel_orphans(&name) {
            eprintln!("could not look for Slurm jobs left by earlier runs of this store: {e:#}");
            tracing::warn!("looking for jobs of earlier runs: {e:#}");
        }
        let (board, poll) = (self.board.clone(), self.options.poll);
        let handle = std::thread::Builder::new()
            .name("slurm-poller".into())
            .spawn(move || poll_loop(board, name, poll))?;
        *self.poller.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Cancels every job of this run at once (`scancel --name`), for a run that exits now.
    fn abandon(&self) {
        if let Some(name) = self.job_name.get() {
            let _ = Command::new("scancel")
                .args(["--name", name])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    fn execute(
        &self,
        task: &Task,
        assignment: &Assignment,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
    ) -> Result<RemoteOutcome, StageError> {
        let mut requeues = 0;
        loop {
            match self.run_job(task, assignment, progress, cancel) {
                Err((e, Some(Ending::Lost))) if requeues < MAX_REQUEUES => {
                    requeues += 1;
                    progress.log(
                        &task.stage,
                        &format!(
                            "{e:#}; not the stage's fault: submitting it again (requeue \
                             {requeues} of {MAX_REQUEUES}, not counted as a retry)"
                        ),
                    );
                }
                Err((e, ending)) => {
                    if let Some(Ending::OutOfMemory | Ending::Timeout) = ending {
                        let mut grown = self.grown.lock().unwrap_or_else(|p| p.into_inner());
                        let g = grown.entry(task.key).or_default();
                        match ending {
                            Some(Ending::OutOfMemory) => g.memory += 1,
                            _ => g.time += 1,
                        }
                    }
                    return Err(e);
                }
                Ok(outcome) => return Ok(outcome),
            }
        }
    }
}

/// How often one stage's job is submitted again after preemption or a node failure before
/// the stage fails (as transient) after all.
const MAX_REQUEUES: u32 = 5;

/// How much more a stage's next job asks for after its jobs ran out of memory or time: the
/// stage's `mem_mb` (or `time`) × (1 + that many failures), like Nextflow's
/// `memory * task.attempt`.
#[derive(Clone, Copy, Debug, Default)]
struct Growth {
    memory: u32,
    time: u32,
}

/// What a look at a job says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queued or running.
    Waiting,
    /// Pending for a reason that will not go away by waiting (the job asks for more than its
    /// partition, QOS or association allows a job, or for what does not exist).
    Unsatisfiable(String),
    /// Ended (from Slurm's point of view).
    Ended(Ending),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `OUT_OF_MEMORY`: the next job asks for more memory.
    OutOfMemory,
    /// `TIMEOUT`: the next job asks for more time.
    Timeout,
    /// `PREEMPTED`, `NODE_FAIL`, `BOOT_FAIL`: not the stage's doing; submitted again without
    /// counting against its retries.
    Lost,
    /// Anything else (`FAILED`, `CANCELLED`, gone from the queue): a transient failure.
    Other,
}

/// Pending reasons (Slurm's "JOB REASON CODES", `squeue(1)`) that waiting cannot satisfy:
/// the job itself asks for what its partition, QOS or association never grants one job.
/// Limits on a user's or group's running total (`QOSMaxJobsPerUserLimit`, `AssocGrp…`)
/// clear when other jobs end and are not here.
fn never_satisfied(reason: &str) -> bool {
    const REASONS: &[&str] = &[
        "BadConstraints",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "InvalidAccount",
        "InvalidQOS",
        "QOSNotAllowed",
        "AccountNotAllowed",
        "DependencyNeverSatisfied",
    ];
    let code = reason.split(['(', ' ', ',']).next().unwrap_or(reason);
    REASONS.contains(&code)
        || ((code.starts_with("QOSMax") || code.starts_with("AssocMax")) && code.contains("PerJob"))
}

/// What a job's listing (`None`: Slurm no longer lists it) means for its stage.
pub fn classify(status: Option<&JobStatus>) -> Verdict {
    let Some(status) = status else {
        return Verdict::Ended(Ending::Other);
    };
    // sacct writes e.g. "CANCELLED by 0"; squeue's long names, never its short codes here.
    let state = status.state.split_whitespace().next().unwrap_or("");
    match state {
        "PENDING" if never_satisfied(&status.reason) => {
            Verdict::Unsatisfiable(status.reason.clone())
        }
        "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
        | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING" | "SIGNALING" | "STAGE_OUT" => {
            Verdict::Waiting
        }
        "OUT_OF_MEMORY" => Verdict::Ended(Ending::OutOfMemory),
        "TIMEOUT" | "DEADLINE" => Verdict::Ended(Ending::Timeout),
        "PREEMPTED" | "NODE_FAIL" | "BOOT_FAIL" => Verdict::Ended(Ending::Lost),
        _ => Verdict::Ended(Ending::Other),
    }
}

/// A finished job's state from Slurm's accounting (`sacct`), when the site keeps it: what
/// `squeue` no longer lists after `MinJobAge`.
fn accounted_state(job: &str) -> Option<JobStatus> {
    let out = Command::new("sacct")
        .args(["-X", "-n", "-P", "-j", job, "-o", "State,Reason"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim();
    let (state, reason) = line.split_once('|').unwrap_or((line, ""));
    (out.status.success() && !state.is_empty()).then(|| JobStatus {
        state: state.to_string(),
        reason: reason.to_string(),
    })
}

impl SlurmDispatcher {
    /// One job for the stage, to its end; a failure says how the job ended when Slurm says.
    fn run_job(
        &self,
        task: &Task,
        assignment: &Assignment,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
    ) -> Result<RemoteOutcome, (StageError, Option<Ending>)> {
        let ranks = assignment.resources.ranks.max(1);
        let gpus_per_rank = match self.options.request_gpus {
            true => assignment.resources.gpus / ranks,
            false => 0,
        };
        let threads = (assignment.resources.cpus / ranks).max(1) as usize;
        let rank_jobs = vec![(Route::Task(task.key), (0..gpus_per_rank).collect()); ranks as usize];
        let tickets = self.coordinator.submit_gang(task, rank_jobs, threads);
        let growth = self
            .grown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&task.key)
            .copied()
            .unwrap_or_default();
        let job = match self.sbatch(task, assignment, ranks, growth) {
            Ok(job) => job,
            Err(e) => {
                // Nobody will claim the queued jobs: withdraw them.
                let withdraw = AtomicBool::new(true);
                let _ = self
                    .coordinator
                    .wait_gang(tickets, progress, &withdraw, |_, _| None);
                return Err((StageError::Fatal(e), None));
            }
        };
        let asked = match (growth.memory, growth.time) {
            (0, 0) => String::new(),
            _ => format!(
                " with {} MB{}",
                grown_memory(assignment, growth),
                grown_time(assignment, growth)
                    .map(|t| format!(", time {}", format_slurm_time(t)))
                    .unwrap_or_default()
            ),
        };
        progress.log(
            &task.stage,
            &match ranks {
                1 => format!("submitted as Slurm job {job}{asked}"),
                n => format!("submitted as Slurm job {job}{asked} of {n} tasks, one per rank"),
            },
        );
        let submitted = Instant::now();
        self.board.lock().in_flight += 1;
        let mut ended_at: Option<Instant> = None;
        let mut unsatisfied = 0u32;
        let mut ending = None;
        let log_dir = self.options.log_dir.display().to_string();
        let result = self
            .coordinator
            .wait_gang(tickets, progress, cancel, |_rank, _leased| {
                let status = self.seen_since(&job, submitted)?;
                match classify(status.as_ref()) {
                    Verdict::Waiting => {
                        unsatisfied = 0;
                        None
                    }
                    Verdict::Unsatisfiable(why) => {
                        // Seen on two polls in a row: not a passing state of the scheduler.
                        unsatisfied += 1;
                        (unsatisfied >= 2).then(|| {
                            StageError::Fatal(anyhow::anyhow!(
                                "Slurm job {job} can never start (pending: {why}); cancelled. \
                                 The stage asks for more than its partition, QOS or account \
                                 allows one job, or for what does not exist: change its \
                                 resources (time, partition, account, qos, constraint)"
                            ))
                        })
                    }
                    Verdict::Ended(_) if ended_at.is_none() => {
                        // Give a finished job's last report a moment to arrive.
                        ended_at = Some(Instant::now());
                        None
                    }
                    Verdict::Ended(mut kind) => {
                        if ended_at.is_some_and(|at| at.elapsed() <= Duration::from_secs(5)) {
                            return None;
                        }
                        let status = status.or_else(|| accounted_state(&job));
                        if let Some(s) = &status {
                            if let Verdict::Ended(k) = classify(Some(s)) {
                                kind = k;
                            }
                        }
                        ending = Some(kind);
                        let state = status.map_or("gone from the queue".into(), |s| s.state);
                        let what = match kind {
                            Ending::OutOfMemory => format!(
                                "; it ran out of its {} MB: the next job asks for {} MB",
                                grown_memory(assignment, growth),
                                grown_memory(assignment, Growth { memory: growth.memory + 1, ..growth })
                            ),
                            Ending::Timeout => match grown_time(assignment, Growth { time: growth.time + 1, ..growth }) {
                                Some(t) => format!("; it ran out of time: the next job asks for {}", format_slurm_time(t)),
                                None => "; it ran out of the partition's default time (give the stage a `time:`)".into(),
                            },
                            _ => String::new(),
                        };
                        Some(StageError::Transient(anyhow::anyhow!(
                            "Slurm job {job} ended ({state}) without reporting{what}; see \
                             {log_dir}/slurm-{job}.log"
                        )))
                    }
                }
            });
        self.board.lock().in_flight -= 1;
        if result.is_err() {
            // Cancelled, or a rank of a gang failed while the job's other tasks may still
            // run (or wait for a peer that is gone), or it can never start: end the job.
            // Harmless if it has ended.
            let _ = Command::new("scancel").arg(&job).status();
        }
        result
            .map(|mut outcome| {
                outcome.worker = format!("slurm:{job}/{}", outcome.worker);
                outcome
            })
            .map_err(|e| (e, ending))
    }
}

/// The memory a stage's next job asks for.
fn grown_memory(assignment: &Assignment, growth: Growth) -> u64 {
    assignment.resources.mem_mb.max(1) * (1 + u64::from(growth.memory))
}

/// The time limit a stage's next job asks for (seconds), when the stage sets one.
fn grown_time(assignment: &Assignment, growth: Growth) -> Option<u64> {
    assignment
        .cluster
        .time_s
        .map(|t| t * (1 + u64::from(growth.time)))
}

impl SlurmDispatcher {
    /// Cancels the queued or running jobs of this store's earlier runs: their `run` is gone
    /// (this one holds the store's only writer lock), so nobody will take their results.
    fn cancel_orphans(&self, ours: &str) -> anyhow::Result<()> {
        let out = Command::new("squeue")
            .args(["--me", "-h", "-o", "%i|%j|%T"])
            .output()
            .context("running squeue (is Slurm installed and SLURM_CONF set?)")?;
        if !out.status.success() {
            bail!(
                "squeue --me: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let prefix = self.store_prefix();
        let mut ids = vec![];
        let mut runs = std::collections::BTreeSet::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.trim().splitn(3, '|').collect();
            let [id, name, state] = f[..] else { continue };
            let Some(run) = name.strip_prefix(&prefix) else {
                continue;
            };
            if name == ours || !run.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            if matches!(
                state,
                "PENDING" | "RUNNING" | "CONFIGURING" | "SUSPENDED" | "REQUEUED"
            ) {
                ids.push(id.to_string());
                runs.insert(format!("r{run}"));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let status = Command::new("scancel")
            .args(&ids)
            .status()
            .context("running scancel")?;
        let runs: Vec<String> = runs.into_iter().collect();
        let message = format!(
            "cancelled {} Slurm job(s) left by earlier run(s) {} of this store: {}",
            ids.len(),
            runs.join(", "),
            ids.join(" ")
        );
        if !status.success() {
            bail!("scancel {} failed ({status})", ids.join(" "));
        }
        eprintln!("{message}");
        tracing::warn!("{message}");
        Ok(())
    }
}

impl Drop for SlurmDispatcher {
    fn drop(&mut self) {
        self.board.lock().stop = true;
        self.board.wake.notify_all();
        if let Some(h) = self.poller.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_become_job_states() {
        let jobs = parse_squeue(
            "12|RUNNING|None\n13|PENDING|PartitionTimeLimit\n14|OUT_OF_MEMORY|OutOfMemory\n\n",
        );
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs["13"].state, "PENDING");
        assert_eq!(jobs["13"].reason, "PartitionTimeLimit");
        assert_eq!(jobs["14"].state, "OUT_OF_MEMORY");
    }

    fn status(state: &str, reason: &str) -> JobStatus {
        JobStatus {
            state: state.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn job_states_decide_what_comes_next() {
        let v = |state, reason| classify(Some(&status(state, reason)));
        assert_eq!(v("RUNNING", "None"), Verdict::Waiting);
        assert_eq!(v("PENDING", "Resources"), Verdict::Waiting);
        assert_eq!(v("PENDING", "Priority"), Verdict::Waiting);
        // Limits on totals clear when other jobs end.
        assert_eq!(v("PENDING", "QOSMaxJobsPerUserLimit"), Verdict::Waiting);
        assert_eq!(v("PENDING", "AssocGrpGRES"), Verdict::Waiting);
        assert_eq!(
            v("PENDING", "ReqNodeNotAvail, Reserved for maintenance"),
            Verdict::Waiting
        );
        for never in [
            "PartitionTimeLimit",
            "PartitionNodeLimit",
            "BadConstraints",
            "InvalidAccount",
            "InvalidQOS",
            "QOSMaxWallDurationPerJobLimit",
            "AssocMaxCpuPerJobLimit",
            "QOSMaxGRESPerJob",
        ] {
            assert_eq!(
                v("PENDING", never),
                Verdict::Unsatisfiable(never.into()),
                "{never}"
            );
        }
        assert_eq!(
            v("OUT_OF_MEMORY", "OutOfMemory"),
            Verdict::Ended(Ending::OutOfMemory)
        );
        assert_eq!(v("TIMEOUT", "TimeLimit"), Verdict::Ended(Ending::Timeout));
        for lost in ["PREEMPTED", "NODE_FAIL", "BOOT_FAIL"] {
            assert_eq!(v(lost, ""), Verdict::Ended(Ending::Lost), "{lost}");
        }
        assert_eq!(
            v("FAILED", "NonZeroExitCode"),
            Verdict::Ended(Ending::Other)
        );
        assert_eq!(v("CANCELLED by 0", ""), Verdict::Ended(Ending::Other));
        assert_eq!(v("COMPLETED", ""), Verdict::Ended(Ending::Other));
        assert_eq!(classify(None), Verdict::Ended(Ending::Other));
    }
}
