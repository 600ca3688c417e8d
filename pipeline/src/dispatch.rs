//! The seam between the executor and stages that run in other processes (worker processes per
//! GPU, Slurm jobs). The executor decides *when* a stage runs and with which resources, and
//! commits its outputs; a [`Dispatcher`] decides *where* it runs and brings the outputs back.

use crate::artifact::Artifact;
use crate::kind::{ClusterRequest, ProgressSink, Resources, StageError, Task};
use std::sync::atomic::AtomicBool;

/// What the executor gave a stage from its slots.
#[derive(Clone, Debug)]
pub struct Assignment {
    /// CPU threads.
    pub cpus: usize,
    pub mem_mb: u64,
    /// GPU ordinals (as the coordinator's machine numbers them).
    pub gpus: Vec<u32>,
    /// What the stage declared.
    pub resources: Resources,
    /// What it asks of a batch system (time limit, partition, …).
    pub cluster: ClusterRequest,
}

/// A stage that ran elsewhere: its outputs in declaration order and where it ran.
#[derive(Debug)]
pub struct RemoteOutcome {
    pub artifacts: Vec<Artifact>,
    pub log_tail: Vec<String>,
    /// e.g. `worker-1(gpu0)@host` or `slurm:1234`.
    pub worker: String,
}

/// Runs tasks outside the executor's process.
pub trait Dispatcher: Send + Sync {
    /// Whether this dispatcher takes a stage with this assignment; the executor runs the
    /// others in-process.
    fn accepts(&self, assignment: &Assignment) -> bool;
    /// `Some(n)`: the stages this dispatcher accepts run on resources this process does not
    /// hold (a cluster's nodes), so they take none of the run's CPU, memory or GPU slots, and
    /// at most `n` of them are in flight (submitted and not ended) at once. `None` (local
    /// worker processes, which share this machine): the run's slots bound them.
    fn remote_capacity(&self) -> Option<usize> {
        None
    }
    /// Called once the run has its id (the store's run record), before any stage runs.
    fn begin_run(&self, _run: u64) -> anyhow::Result<()> {
        Ok(())
    }
    /// The run exits now (a second interrupt): stop whatever still runs elsewhere, at once.
    fn abandon(&self) {}
    /// Runs `task` somewhere and blocks until it ends. A lost worker is
    /// [`StageError::Transient`], so the executor retries it (from its last checkpoint).
    /// Output digests are verified before returning.
    fn execute(
        &self,
        task: &Task,
        assignment: &Assignment,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
    ) -> Result<RemoteOutcome, StageError>;
}
