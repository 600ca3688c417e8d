//! What a run may spend at once: this machine's CPU threads, memory and GPU slots, and the
//! dispatcher's own capacity (Slurm jobs) for the stages it takes.

use super::{worker_name, Finished, RunOptions};
use crate::dispatch::Assignment;
use crate::plan::StageInstance;

pub(super) struct Pool {
    jobs: usize,
    gpu_count: usize,
    mem_budget: u64,
    free_cpus: usize,
    free_mem: u64,
    /// GPU ordinal → free slots, in the order the user listed the GPUs.
    free_gpus: Vec<(u32, usize)>,
    /// Stages the dispatcher may hold in flight on its own resources; `None` when it has none.
    remote_capacity: Option<usize>,
    remote_running: usize,
    /// Stages in flight anywhere.
    pub(super) running: usize,
}

/// The answer to "may this stage start now?".
pub(super) enum Claim {
    /// Start it with these resources, under this worker name.
    Granted(Box<Assignment>, String),
    /// Not yet: wait for a running stage to give its resources back.
    Wait,
    /// Never: the run cannot satisfy it (the message says why).
    Refused(String),
}

impl Pool {
    pub(super) fn new(options: &RunOptions, manifest_gpu_share: u32) -> Pool {
        let share = options.gpu_share.unwrap_or(manifest_gpu_share).max(1) as usize;
        Pool {
            jobs: options.jobs.max(1),
            gpu_count: options.gpus.len(),
            mem_budget: options.mem_mb,
            free_cpus: options.jobs.max(1),
            free_mem: options.mem_mb,
            free_gpus: options.gpus.iter().map(|&g| (g, share)).collect(),
            remote_capacity: options
                .dispatcher
                .as_ref()
                .and_then(|d| d.remote_capacity()),
            remote_running: 0,
            running: 0,
        }
    }

    /// Takes the resources `stage` needs, if they are free.
    pub(super) fn claim(&mut self, stage: &StageInstance, options: &RunOptions) -> Claim {
        // A stage that runs on the cluster's resources takes none of this machine's: only the
        // dispatcher's capacity bounds it.
        if let Some(capacity) = self.remote_capacity {
            let assignment = Assignment {
                cpus: stage.resources.cpus.max(1) as usize,
                mem_mb: stage.resources.mem_mb,
                gpus: vec![],
                resources: stage.resources,
                cluster: stage.cluster.clone(),
            };
            let accepted = options
                .dispatcher
                .as_ref()
                .is_some_and(|d| d.accepts(&assignment));
            if accepted {
                if self.remote_running >= capacity.max(1) {
                    return Claim::Wait;
                }
                self.remote_running += 1;
                self.running += 1;
                return Claim::Granted(Box::new(assignment), "remote".into());
            }
        }
        let want_cpus = (stage.resources.cpus.max(1) as usize).min(self.jobs);
        // A run without GPUs runs GPU stages on the CPU (the default device); a run with too
        // few GPUs for a data-parallel stage is an error.
        let want_gpus = if self.gpu_count == 0 {
            0
        } else {
            stage.resources.gpus as usize
        };
        if want_gpus > self.gpu_count {
            let have = self.gpu_count;
            return Claim::Refused(format!(
                "stage needs {want_gpus} GPU(s) but the run has {have} (pass --gpus)"
            ));
        }
        let want_mem = stage.resources.mem_mb.min(self.mem_budget);
        // Distinct GPUs with a free slot, least loaded first (ties: listed order).
        let mut candidates: Vec<usize> = (0..self.free_gpus.len())
            .filter(|&g| self.free_gpus[g].1 > 0)
            .collect();
        candidates.sort_by_key(|&g| std::cmp::Reverse(self.free_gpus[g].1));
        if want_cpus > self.free_cpus || want_gpus > candidates.len() || want_mem > self.free_mem {
            return Claim::Wait;
        }
        self.free_cpus -= want_cpus;
        self.free_mem -= want_mem;
        let gpus: Vec<u32> = candidates[..want_gpus]
            .iter()
            .map(|&g| {
                self.free_gpus[g].1 -= 1;
                self.free_gpus[g].0
            })
            .collect();
        self.running += 1;
        let worker = worker_name(&gpus);
        Claim::Granted(
            Box::new(Assignment {
                cpus: want_cpus,
                mem_mb: want_mem,
                gpus,
                resources: stage.resources,
                cluster: stage.cluster.clone(),
            }),
            worker,
        )
    }

    /// Gives back what a finished stage held.
    pub(super) fn release(&mut self, f: &Finished) {
        self.running -= 1;
        if f.remote {
            self.remote_running -= 1;
            return;
        }
        self.free_cpus += f.cpus;
        self.free_mem += f.mem_mb;
        for g in &f.gpus {
            if let Some(slot) = self.free_gpus.iter_mut().find(|(id, _)| id == g) {
                slot.1 += 1;
            }
        }
    }
}
