//! The local executor: walks a [`Plan`] in dependency order on a tokio runtime, answers cached
//! stages from the action cache, runs the rest on blocking threads within resource slots (CPU
//! threads, GPU ids), commits each finished stage atomically, and records the run.

use crate::artifact::{Artifact, Digest};
use crate::dispatch::{Assignment, Dispatcher};
use crate::key::stage_key_with_fingerprint;
use crate::kind::{InputRef, ProgressSink, Registry, StageCtx, StageError, Task, TaskStore};
use crate::plan::Plan;
use crate::store::{
    now_ms, ActionRecord, RunRecord, RunState, StageRunRecord, StageState, Store, StoreError,
};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod pool;
mod signals;

use pool::{Claim, Pool};

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// CPU thread slots shared by running stages.
    pub jobs: usize,
    /// GPU ordinals stages may be given.
    pub gpus: Vec<u32>,
    /// Memory budget shared by running stages (MiB); a stage asking for more than the whole
    /// budget runs alone.
    pub mem_mb: u64,
    /// Keep running independent stages after a failure (default: stop launching).
    pub keep_going: bool,
    /// Extra attempts for failures a stage marks transient.
    pub retries: u32,
    /// First retry delay; doubles per attempt.
    pub backoff: Duration,
    /// Re-hash cached outputs before trusting them.
    pub verify_cached: bool,
    /// Run only these stage paths (and what they need); all when empty.
    pub only: Vec<String>,
    /// Install a Ctrl-C handler: first press stops launching and asks running stages to stop
    /// at their next safe point; a second press exits at once (commits are atomic).
    pub handle_ctrl_c: bool,
    /// Stages per GPU; `None` takes the manifest's `gpu_share` (default 1).
    pub gpu_share: Option<u32>,
    /// Runs the stages it accepts in other processes (GPU workers, Slurm jobs); the rest run
    /// in this process.
    pub dispatcher: Option<Arc<dyn Dispatcher>>,
}

impl std::fmt::Debug for dyn Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dispatcher")
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            gpus: vec![],
            mem_mb: total_memory_mb().unwrap_or(8 * 1024),
            keep_going: false,
            retries: 2,
            backoff: Duration::from_millis(500),
            verify_cached: true,
            only: vec![],
            handle_ctrl_c: false,
            gpu_share: None,
            dispatcher: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FailedStage {
    pub stage: String,
    pub error: String,
    pub log_tail: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub run: u64,
    pub state: RunState,
    pub executed: Vec<String>,
    pub cached: Vec<String>,
    pub failed: Vec<FailedStage>,
    pub skipped: Vec<String>,
    /// Cached results found corrupt and recomputed.
    pub recomputed_corrupt: Vec<String>,
    pub seconds: f64,
}

/// Adapts the store to what a running stage may do with it.
pub struct StoreAccess(pub Arc<Store>);

impl TaskStore for StoreAccess {
    fn get_artifact(&self, digest: &Digest) -> anyhow::Result<Artifact> {
        Ok(self.0.get_artifact(digest)?)
    }
    fn save_checkpoint(&self, key: &Digest, bytes: &[u8]) -> anyhow::Result<()> {
        Ok(self.0.save_checkpoint(key, bytes)?)
    }
    fn load_checkpoint(&self, key: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.0.load_checkpoint(key)?)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Waiting,
    Ready,
    /// Waiting out a retry backoff.
    Delayed(Instant),
    Running,
    Done(BTreeMap<String, Digest>),
    Failed,
    Skipped,
}

enum Next {
    Released(Vec<usize>),
    RetryAt(Instant),
    Nothing,
}

struct Finished {
    index: usize,
    result: Result<(), StageError>,
    log_tail: Vec<String>,
    cpus: usize,
    mem_mb: u64,
    gpus: Vec<u32>,
    /// Ran on resources the run does not hold (counted against the dispatcher's capacity).
    remote: bool,
    outputs: BTreeMap<String, Digest>,
    worker: String,
}

/// The stages between "inputs done" and "launched".
struct Queues {
    /// Inputs done, not yet looked up in the action cache.
    ready: VecDeque<usize>,
    /// Cache misses waiting for room in the pool, in plan order.
    queued: VecDeque<(usize, Task)>,
    /// Transient failures waiting out their backoff.
    delayed: Vec<(Instant, usize)>,
}

impl Queues {
    /// Moves retries whose backoff has passed back to `ready`.
    fn wake_delayed(&mut self, now: Instant) {
        let ready = &mut self.ready;
        self.delayed.retain(|&(at, i)| {
            if at <= now {
                ready.push_back(i);
                false
            } else {
                true
            }
        });
    }
}

/// Runs the plan to completion (or failure, or cancellation) and records it in the store.
pub fn run_plan(
    plan: &Plan,
    registry: &Registry,
    store: Arc<Store>,
    options: &RunOptions,
    progress: Arc<dyn ProgressSink>,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<RunSummary> {
    let remote = options
        .dispatcher
        .as_ref()
        .and_then(|d| d.remote_capacity())
        .unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(
            options.jobs.max(1)
                + options.gpus.len() * options.gpu_share.unwrap_or(plan.gpu_share).max(1) as usize
                + remote
                + 2,
        )
        .enable_all()
        .build()?;
    runtime.block_on(Executor::new(plan, registry, store, options, progress, cancel)?.run())
}

struct Executor<'a> {
    plan: &'a Plan,
    registry: &'a Registry,
    store: Arc<Store>,
    options: &'a RunOptions,
    progress: Arc<dyn ProgressSink>,
    cancel: Arc<AtomicBool>,
    slots: Vec<Slot>,
    records: Vec<StageRunRecord>,
    dirty: Vec<usize>,
    waiting_on: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    attempts: Vec<u32>,
    summary: RunSummary,
    run: RunRecord,
    stop_launching: bool,
}

impl<'a> Executor<'a> {
    fn new(
        plan: &'a Plan,
        registry: &'a Registry,
        store: Arc<Store>,
        options: &'a RunOptions,
        progress: Arc<dyn ProgressSink>,
        cancel: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let n = plan.stages.len();
        let mut wanted = vec![options.only.is_empty(); n];
        for path in &options.only {
            let i = plan
                .find(path)
                .ok_or_else(|| anyhow::anyhow!("no stage '{path}' in the plan"))?;
            wanted[i] = true;
        }
        // Everything a wanted stage needs is wanted too (reverse topological walk).
        for i in (0..n).rev() {
            if wanted[i] {
                for edges in plan.stages[i].inputs.values() {
                    for e in edges {
                        wanted[e.from] = true;
                    }
                }
            }
        }
        let mut dependents = vec![vec![]; n];
        let mut waiting_on = vec![0; n];
        for (i, s) in plan.stages.iter().enumerate() {
            let mut ups: Vec<usize> = s.inputs.values().flatten().map(|e| e.from).collect();
            ups.sort_unstable();
            ups.dedup();
            waiting_on[i] = ups.len();
            for u in ups {
                dependents[u].push(i);
            }
        }
        let records: Vec<StageRunRecord> = plan
            .stages
            .iter()
            .map(|s| {
                let mut record = StageRunRecord::pending(&s.path, &s.kind);
                let mut deps: Vec<String> = s
                    .inputs
                    .values()
                    .flatten()
                    .map(|e| plan.stages[e.from].path.clone())
                    .collect();
                deps.sort();
                deps.dedup();
                record.deps = deps;
                record.params = s.params.clone();
                record.version = s.version.clone();
                record
            })
            .collect();
        let kept: Vec<StageRunRecord> = records
            .iter()
            .zip(&wanted)
            .filter(|(_, w)| **w)
            .map(|(r, _)| r.clone())
            .collect();
        let run = store.begin_run(&plan.manifest, plan.manifest_digest, &kept)?;
        let slots = (0..n)
            .map(|i| {
                if !wanted[i] {
                    Slot::Skipped
                } else if waiting_on[i] == 0 {
                    Slot::Ready
                } else {
                    Slot::Waiting
                }
            })
            .collect();
        Ok(Executor {
            plan,
            registry,
            store,
            options,
            progress,
            cancel,
            slots,
            records,
            dirty: vec![],
            waiting_on,
            dependents,
            attempts: vec![0; n],
            summary: RunSummary {
                run: run.id,
                state: RunState::Running,
                executed: vec![],
                cached: vec![],
                failed: vec![],
                skipped: vec![],
                recomputed_corrupt: vec![],
                seconds: 0.0,
            },
            run,
            stop_launching: false,
        })
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        self.dirty.sort_unstable();
        self.dirty.dedup();
        let batch: Vec<StageRunRecord> = self
            .dirty
            .drain(..)
            .map(|i| self.records[i].clone())
            .collect();
        self.store.put_stage_runs(self.run.id, &batch)?;
        Ok(())
    }

    /// Marks `i`'s dependents one input closer; returns those now ready.
    fn release_dependents(&mut self, i: usize) -> Vec<usize> {
        let mut now_ready = vec![];
        for d in self.dependents[i].clone() {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.slots[d] == Slot::Waiting {
                self.slots[d] = Slot::Ready;
                now_ready.push(d);
            }
        }
        now_ready
    }

    /// The task for a ready stage: its inputs resolved to digests and its key.
    fn task(&self, i: usize) -> Task {
        let stage = &self.plan.stages[i];
        let mut inputs = BTreeMap::new();
        let mut digests = BTreeMap::new();
        for (name, edges) in &stage.inputs {
            let refs: Vec<InputRef> = edges
                .iter()
                .map(|e| {
                    let Slot::Done(outputs) = &self.slots[e.from] else {
                        unreachable!("inputs are done before a stage is ready")
                    };
                    InputRef {
                        stage: self.plan.stages[e.from].path.clone(),
                        output: e.output.clone(),
                        digest: outputs[&e.output],
                    }
                })
                .collect();
            digests.insert(name.clone(), refs.iter().map(|r| r.digest).collect());
            inputs.insert(name.clone(), refs);
        }
        Task {
            key: stage_key_with_fingerprint(
                &stage.kind,
                &stage.version,
                &stage.params,
                &digests,
                stage.fingerprint.as_deref(),
            ),
            kind: stage.kind.clone(),
            stage: stage.path.clone(),
            params: stage.params.clone(),
            inputs,
            attempt: self.attempts[i],
        }
    }

    /// The action cache's answer for a key, verified; a corrupt entry is forgotten.
    fn cached_outputs(
        &mut self,
        i: usize,
        key: &Digest,
    ) -> anyhow::Result<Option<BTreeMap<String, Digest>>> {
        let Some(action) = self.store.action(key)? else {
            return Ok(None);
        };
        for digest in action.outputs.values() {
            let check = if self.options.verify_cached {
                self.store.verify_artifact(digest)
            } else {
                self.store
                    .artifact_record(digest)
                    .and_then(|r| r.map(|_| ()).ok_or(StoreError::NotFound(digest.hex())))
            };
            if let Err(e) = check {
                let path = &self.plan.stages[i].path;
                tracing::warn!("cached result of {path} is unusable ({e}); recomputing");
                self.progress
                    .log(path, &format!("cached result unusable ({e}); recomputing"));
                self.summary.recomputed_corrupt.push(path.clone());
                self.store.forget_action(key)?;
                return Ok(None);
            }
        }
        Ok(Some(action.outputs))
    }

    async fn run(mut self) -> anyhow::Result<RunSummary> {
        let started = Instant::now();
        if let Some(d) = &self.options.dispatcher {
            d.begin_run(self.run.id)?;
        }
        if self.options.handle_ctrl_c {
            signals::watch(self.cancel.clone(), self.options.dispatcher.clone())?;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Finished>();
        let mut pool = Pool::new(self.options, self.plan.gpu_share);
        let mut last_flush = Instant::now();
        let mut queues = Queues {
            ready: (0..self.plan.stages.len())
                .filter(|&i| self.slots[i] == Slot::Ready)
                .collect(),
            queued: VecDeque::new(),
            delayed: vec![],
        };
        loop {
            let cancelled = self.cancel.load(Ordering::Relaxed);
            let now = Instant::now();
            queues.wake_delayed(now);
            self.answer_from_cache(&mut queues)?;
            if !cancelled && !self.stop_launching {
                self.launch_queued(&mut queues.queued, &mut pool, &tx);
            }
            if now.duration_since(last_flush) > Duration::from_millis(250) {
                self.flush()?;
                last_flush = Instant::now();
            }
            let stopping = cancelled || self.stop_launching;
            let nothing_left = queues.queued.is_empty() && queues.delayed.is_empty();
            if pool.running == 0 && (stopping || nothing_left) {
                break;
            }
            // Wait for a stage to finish, or a tick (delayed retries, cancellation, flushing).
            let finished = tokio::select! {
                f = rx.recv() => f,
                _ = tokio::time::sleep(Duration::from_millis(100)) => None,
            };
            if let Some(f) = finished {
                pool.release(&f);
                let i = f.index;
                match self.finish(f) {
                    Next::Released(ds) => queues.ready.extend(ds),
                    Next::RetryAt(at) => queues.delayed.push((at, i)),
                    Next::Nothing => {}
                }
            }
        }
        self.close(started)
    }

    /// Looks every ready stage up in the action cache: hits are done at once (and may make
    /// more stages ready), misses join the launch queue.
    fn answer_from_cache(&mut self, queues: &mut Queues) -> anyhow::Result<()> {
        while let Some(i) = queues.ready.pop_front() {
            let task = self.task(i);
            self.records[i].key = Some(task.key);
            if let Some(outputs) = self.cached_outputs(i, &task.key)? {
                self.records[i].state = StageState::Cached;
                self.records[i].outputs = outputs.clone();
                self.dirty.push(i);
                self.summary.cached.push(task.stage.clone());
                self.progress
                    .stage_finished(&task.stage, StageState::Cached);
                self.slots[i] = Slot::Done(outputs);
                for d in self.release_dependents(i) {
                    queues.ready.push_back(d);
                }
            } else {
                queues.queued.push_back((i, task));
            }
        }
        Ok(())
    }

    /// Launches queued stages in order while the pool has room (no overtaking, so a big
    /// stage is not starved by small ones).
    fn launch_queued(
        &mut self,
        queued: &mut VecDeque<(usize, Task)>,
        pool: &mut Pool,
        tx: &tokio::sync::mpsc::UnboundedSender<Finished>,
    ) {
        while let Some(&(i, _)) = queued.front() {
            match pool.claim(&self.plan.stages[i], self.options) {
                Claim::Wait => break,
                Claim::Refused(error) => {
                    queued.pop_front();
                    self.fail(i, error, vec![]);
                }
                Claim::Granted(assignment, worker) => {
                    let (i, task) = queued.pop_front().expect("front exists");
                    self.launch(i, task, *assignment, worker, tx.clone());
                }
            }
        }
    }

    /// Ends the run: what never started is skipped, the records are flushed and the run's
    /// outcome is recorded.
    fn close(mut self, started: Instant) -> anyhow::Result<RunSummary> {
        let cancelled = self.cancel.load(Ordering::Relaxed);
        for i in 0..self.plan.stages.len() {
            if matches!(
                self.slots[i],
                Slot::Waiting | Slot::Ready | Slot::Delayed(_)
            ) {
                // Includes queued cache misses never launched (their slot is still Ready).
                self.slots[i] = Slot::Skipped;
                self.records[i].state = StageState::Skipped;
                self.dirty.push(i);
                self.summary.skipped.push(self.plan.stages[i].path.clone());
            }
        }
        self.flush()?;
        self.summary.state = if !self.summary.failed.is_empty() {
            RunState::Failed
        } else if cancelled && !self.summary.skipped.is_empty() {
            RunState::Cancelled
        } else {
            RunState::Succeeded
        };
        self.run.state = self.summary.state;
        self.run.ended_ms = Some(now_ms());
        self.run.error = self
            .summary
            .failed
            .first()
            .map(|f| format!("{}: {}", f.stage, f.error));
        self.store.update_run(&self.run)?;
        self.summary.seconds = started.elapsed().as_secs_f64();
        Ok(self.summary)
    }

    /// Marks `i` running and starts it.
    fn launch(
        &mut self,
        i: usize,
        task: Task,
        assignment: Assignment,
        worker: String,
        tx: tokio::sync::mpsc::UnboundedSender<Finished>,
    ) {
        self.slots[i] = Slot::Running;
        let record = &mut self.records[i];
        record.state = StageState::Running;
        record.started_ms = Some(now_ms());
        record.attempt = task.attempt;
        record.worker = Some(worker);
        self.dirty.push(i);
        self.spawn(i, task, assignment, tx);
    }

    fn spawn(
        &self,
        i: usize,
        task: Task,
        assignment: Assignment,
        tx: tokio::sync::mpsc::UnboundedSender<Finished>,
    ) {
        let kind = self
            .registry
            .get(&task.kind)
            .expect("planned kinds exist")
            .clone();
        let store = self.store.clone();
        let progress = self.progress.clone();
        let cancel = self.cancel.clone();
        let run_id = self.run.id;
        let version = self.plan.stages[i].version.clone();
        let mut record = self.records[i].clone();
        let dispatcher = self
            .options
            .dispatcher
            .clone()
            .filter(|d| d.accepts(&assignment));
        let remote = dispatcher
            .as_ref()
            .is_some_and(|d| d.remote_capacity().is_some());
        tokio::task::spawn_blocking(move || {
            let started_ms = now_ms();
            let (cpus, mem_mb, gpus) =
                (assignment.cpus, assignment.mem_mb, assignment.gpus.clone());
            let (outcome, log_tail, worker) = match &dispatcher {
                Some(d) => match d.execute(&task, &assignment, progress.as_ref(), &cancel) {
                    Ok(remote) => (Ok(remote.artifacts), remote.log_tail, remote.worker),
                    Err(e) => (Err(e), vec![], "remote".to_string()),
                },
                None => {
                    let (outcome, log_tail) = run_in_process(
                        kind.as_ref(),
                        &task,
                        &store,
                        progress.as_ref(),
                        cancel,
                        &assignment,
                    );
                    (outcome, log_tail, worker_name(&gpus))
                }
            };

            let mut outputs = BTreeMap::new();
            let result = outcome.and_then(|artifacts| {
                let names = kind.outputs();
                if artifacts.len() != names.len() {
                    return Err(StageError::Fatal(anyhow::anyhow!(
                        "stage kind '{}' returned {} outputs, declared {}",
                        task.kind,
                        artifacts.len(),
                        names.len()
                    )));
                }
                for (name, a) in names.iter().zip(&artifacts) {
                    outputs.insert(name.to_string(), a.digest());
                }
                let ended = now_ms();
                let action = ActionRecord {
                    key: task.key,
                    kind: task.kind.clone(),
                    version,
                    stage: task.stage.clone(),
                    params: task.params.clone(),
                    inputs: task
                        .inputs
                        .iter()
                        .map(|(k, v)| (k.clone(), v.iter().map(|r| r.digest).collect()))
                        .collect(),
                    outputs: outputs.clone(),
                    run: run_id,
                    worker: worker.clone(),
                    attempt: task.attempt,
                    started_ms,
                    duration_ms: ended.saturating_sub(started_ms),
                    log_tail: log_tail.clone(),
                };
                record.state = StageState::Succeeded;
                record.ended_ms = Some(ended);
                record.worker = Some(worker.clone());
                record.outputs = outputs.clone();
                record.log_tail = log_tail.clone();
                store
                    .commit_stage(&action, &artifacts, &record)
                    .map_err(|e| StageError::Transient(e.into()))
            });
            let _ = tx.send(Finished {
                index: i,
                result,
                log_tail,
                cpus,
                mem_mb,
                gpus,
                remote,
                outputs,
                worker,
            });
        });
    }

    fn fail(&mut self, i: usize, error: String, log_tail: Vec<String>) {
        let path = self.plan.stages[i].path.clone();
        self.slots[i] = Slot::Failed;
        let record = &mut self.records[i];
        record.state = StageState::Failed;
        record.ended_ms = Some(now_ms());
        record.error = Some(error.clone());
        record.log_tail = log_tail.clone();
        self.dirty.push(i);
        self.progress.log(&path, &format!("FAILED: {error}"));
        self.progress.stage_finished(&path, StageState::Failed);
        self.summary.failed.push(FailedStage {
            stage: path,
            error,
            log_tail,
        });
        if !self.options.keep_going {
            self.stop_launching = true;
        }
    }

    fn finish(&mut self, f: Finished) -> Next {
        let i = f.index;
        let path = self.plan.stages[i].path.clone();
        match f.result {
            Ok(()) => {
                // The commit wrote the final record; a pending batched write of the
                // "running" record must not overwrite it, so write the final one again.
                let record = &mut self.records[i];
                record.state = StageState::Succeeded;
                record.outputs = f.outputs.clone();
                record.ended_ms = Some(now_ms());
                record.log_tail = f.log_tail;
                record.error = None;
                record.worker = Some(f.worker);
                self.dirty.push(i);
                self.progress.stage_finished(&path, StageState::Succeeded);
                self.summary.executed.push(path);
                self.slots[i] = Slot::Done(f.outputs);
                Next::Released(self.release_dependents(i))
            }
            Err(StageError::Cancelled) => {
                self.slots[i] = Slot::Skipped;
                self.records[i].state = StageState::Skipped;
                self.records[i].error = Some("cancelled".into());
                self.records[i].log_tail = f.log_tail;
                self.dirty.push(i);
                self.progress.stage_finished(&path, StageState::Skipped);
                self.summary.skipped.push(path);
                Next::Nothing
            }
            Err(StageError::Transient(e) | StageError::Released(e))
                if self.attempts[i] < self.options.retries =>
            {
                self.attempts[i] += 1;
                let delay = self.options.backoff * 2u32.pow(self.attempts[i] - 1);
                self.progress.log(
                    &path,
                    &format!(
                        "transient failure ({e:#}); retry {} in {:.1}s",
                        self.attempts[i],
                        delay.as_secs_f64()
                    ),
                );
                self.records[i].error = Some(format!("{e:#}"));
                self.records[i].state = StageState::Pending;
                self.dirty.push(i);
                let at = Instant::now() + delay;
                self.slots[i] = Slot::Delayed(at);
                Next::RetryAt(at)
            }
            Err(e) => {
                self.fail(i, e.to_string(), f.log_tail);
                Next::Nothing
            }
        }
    }
}

/// Runs a stage on a blocking thread of this process; a panic becomes a fatal stage error.
fn run_in_process(
    kind: &dyn crate::kind::StageKind,
    task: &Task,
    store: &Arc<Store>,
    progress: &dyn ProgressSink,
    cancel: Arc<AtomicBool>,
    assignment: &Assignment,
) -> (Result<Vec<Artifact>, StageError>, Vec<String>) {
    let access = StoreAccess(store.clone());
    let mut ctx = StageCtx::new(
        task,
        &access,
        progress,
        cancel,
        assignment.cpus,
        assignment.gpus.clone(),
    );
    let outcome = crate::kind::run_catching_panics(kind, &mut ctx);
    let log_tail = ctx.log_tail().to_vec();
    (outcome, log_tail)
}

fn worker_name(gpus: &[u32]) -> String {
    if gpus.is_empty() {
        "local:cpu".into()
    } else {
        let ids: Vec<String> = gpus.iter().map(|g| g.to_string()).collect();
        format!("local:gpu{}", ids.join(","))
    }
}

/// Physical memory from /proc/meminfo (Linux), in MiB.
fn total_memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}
