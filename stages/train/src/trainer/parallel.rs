//! The entry points ([`train`] and its data-parallel forms) and the glue between ranks:
//! collectives, synchronized BatchNorm groups, abort guards, the final agreement check.

use super::*;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use deeprepair_collective::data_parallel::{
    is_group_aborted, AbortOnDrop, Collective, GroupAborted, ThreadCollective,
};
use deeprepair_nn::sync_bn::BatchStatsReducer;
use deeprepair_nn::Classifier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One rank's model: its variables and the device it computes on.
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    pub model: &'a dyn Classifier,
    pub varmap: &'a VarMap,
    pub device: &'a Device,
}

/// One training run, apart from the model: the data, the validation set, the batches, the
/// schedule, and the checkpoint it resumes from.
#[derive(Clone, Copy)]
pub struct TrainJob<'a> {
    pub data: &'a TrainData<'a>,
    pub validation: Option<&'a TrainData<'a>>,
    pub source: &'a dyn BatchSource,
    pub config: &'a TrainConfig,
    /// The bytes of the last checkpoint an observer received, to continue a killed run.
    pub resume: Option<&'a [u8]>,
}

impl<'a> TrainJob<'a> {
    /// A fresh run (no validation, nothing to resume).
    pub fn new(
        data: &'a TrainData<'a>,
        source: &'a dyn BatchSource,
        config: &'a TrainConfig,
    ) -> Self {
        TrainJob {
            data,
            validation: None,
            source,
            config,
            resume: None,
        }
    }

    fn check(&self, world: usize) -> anyhow::Result<()> {
        check_inputs(self.data, self.validation, self.config, world)?;
        restore_source_state(self.source, self.resume)
    }
}

/// Trains `replica`'s model (whose variables live in its `varmap`) on `job`.
pub fn train(
    replica: Replica,
    job: TrainJob,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainOutcome> {
    job.check(1)?;
    run_rank(replica, job, Some(observer), None, None)
}

/// [`train`] with `replicas.len()` data-parallel ranks, one thread each, joined by a
/// [`ThreadCollective`]. Every replica must be the same architecture; rank 0's initial weights
/// are broadcast to the others (or all come from `resume`). Rank `r` of a global batch of
/// `config.batch_size` trains on its `r`-th contiguous shard; gradients are averaged before
/// every step, so every rank holds the same trainable weights throughout. BatchNorm running
/// statistics stay per rank (or, with [`TrainConfig::sync_batch_norm`], come from the whole
/// batch on every rank); rank 0's `varmap` holds the result. Only rank 0 reports to
/// `observer` (its checkpoints resume a data-parallel run with the same number of ranks).
/// A rank that fails fails the whole call (the others are released, not left waiting).
pub fn train_data_parallel(
    replicas: &[Replica],
    job: TrainJob,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainOutcome> {
    let world = replicas.len();
    let batch_norm =
        (job.config.sync_batch_norm && world > 1).then(|| ThreadCollective::boxed_group(world));
    train_with_collectives(
        replicas,
        ThreadCollective::boxed_group(world),
        batch_norm,
        job,
        observer,
    )
}

/// [`train_data_parallel`] over any collective backend: `collectives[r]` is rank `r`'s handle
/// (e.g. NCCL communicators, one per GPU). With [`TrainConfig::sync_batch_norm`] on several
/// ranks, `batch_norm_collectives` is a second group of the same ranks: BatchNorm reduces
/// inside the forward and backward passes, so it gets a group of its own.
pub fn train_with_collectives(
    replicas: &[Replica],
    collectives: Vec<Box<dyn Collective>>,
    batch_norm_collectives: Option<Vec<Box<dyn Collective>>>,
    job: TrainJob,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainOutcome> {
    let config = job.config;
    let world = replicas.len();
    if world == 0 {
        bail!("data-parallel training needs at least one rank");
    }
    if collectives.len() != world {
        bail!("{} collective handles for {world} ranks", collectives.len());
    }
    let check_group = |what: &str, handles: &[Box<dyn Collective>]| -> anyhow::Result<()> {
        if handles.len() != world {
            bail!("{} {what} handles for {world} ranks", handles.len());
        }
        for (r, c) in handles.iter().enumerate() {
            if c.rank() != r || c.world_size() != world {
                bail!(
                    "{what} handle {r} is rank {} of {}, expected rank {r} of {world}",
                    c.rank(),
                    c.world_size()
                );
            }
        }
        Ok(())
    };
    check_group("collective", &collectives)?;
    let batch_norm_groups: Vec<Option<Arc<BatchNormGroup>>> = match batch_norm_collectives {
        _ if !config.sync_batch_norm || world == 1 => vec![None; world],
        None => bail!("sync_batch_norm on {world} ranks needs a batch-norm collective group"),
        Some(handles) => {
            check_group("batch-norm collective", &handles)?;
            handles
                .into_iter()
                .map(|c| Some(Arc::new(BatchNormGroup::new(c, world))))
                .collect()
        }
    };
    job.check(world)?;
    let mut ranks = collectives.into_iter().zip(batch_norm_groups);
    let (mut first, first_bn) = ranks.next().expect("world ≥ 1");
    std::thread::scope(|scope| {
        let others: Vec<_> = ranks
            .zip(&replicas[1..])
            .map(|((mut c, bn), &replica)| {
                scope.spawn(move || run_guarded_rank(replica, &mut *c, bn, job, None))
            })
            .collect();
        let mine = run_guarded_rank(replicas[0], &mut *first, first_bn, job, Some(observer));
        let mut errors: Vec<anyhow::Error> = Vec::new();
        let mut outcome = None;
        match mine {
            Ok(o) => outcome = Some(o),
            Err(e) => errors.push(e.context("data-parallel rank 0")),
        }
        for (i, h) in others.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e.context(format!("data-parallel rank {}", i + 1))),
                Err(_) => errors.push(anyhow::anyhow!("data-parallel rank {} panicked", i + 1)),
            }
        }
        if errors.is_empty() {
            return Ok(outcome.expect("rank 0 succeeded"));
        }
        // Report why the group failed, not the ranks that were merely released.
        let cause = errors
            .iter()
            .position(|e| !is_group_aborted(e))
            .unwrap_or(0);
        Err(errors.swap_remove(cause))
    })
}

/// One rank of a data-parallel group whose other ranks run in other processes (each calls
/// this with its own handles, e.g. [`deeprepair_collective::socket_collective::SocketCollective`]
/// or NCCL communicators joined through the dispatcher). Rank 0 reports and checkpoints
/// through `observer`; the others pass `None`. Same steps as [`train_with_collectives`].
pub fn train_rank(
    replica: Replica,
    mut collective: Box<dyn Collective>,
    batch_norm_collective: Option<Box<dyn Collective>>,
    job: TrainJob,
    observer: Option<&mut dyn TrainObserver>,
) -> anyhow::Result<TrainOutcome> {
    let config = job.config;
    let (rank, world) = (collective.rank(), collective.world_size());
    if observer.is_some() != (rank == 0) {
        bail!("rank 0, and only rank 0, reports and checkpoints (rank {rank} of {world})");
    }
    let batch_norm = match batch_norm_collective {
        _ if !config.sync_batch_norm || world == 1 => None,
        None => bail!("sync_batch_norm on {world} ranks needs a batch-norm collective group"),
        Some(c) if c.rank() != rank || c.world_size() != world => bail!(
            "the batch-norm collective is rank {} of {}, the gradient one rank {rank} of {world}",
            c.rank(),
            c.world_size()
        ),
        Some(c) => Some(Arc::new(BatchNormGroup::new(c, world))),
    };
    job.check(world)?;
    run_guarded_rank(replica, &mut *collective, batch_norm, job, observer)
}

/// [`run_rank`] holding the abort guards: a rank that fails (or unwinds) releases the ranks
/// waiting for it in either group.
pub(super) fn run_guarded_rank(
    replica: Replica,
    collective: &mut dyn Collective,
    batch_norm: Option<Arc<BatchNormGroup>>,
    job: TrainJob,
    observer: Option<&mut dyn TrainObserver>,
) -> anyhow::Result<TrainOutcome> {
    let mut guard = AbortOnDrop::new(collective);
    let bn_guard = AbortBatchNormOnDrop(batch_norm.clone());
    let result = run_rank(
        replica,
        job,
        observer,
        Some(guard.get()),
        batch_norm.clone(),
    );
    if result.is_ok() {
        guard.disarm();
        bn_guard.disarm();
    } else {
        drop(guard);
        drop(bn_guard);
    }
    released_by_batch_norm(result, batch_norm.as_deref())
}

/// A rank's handle on the group that synchronized BatchNorm reduces over.
pub(super) struct BatchNormGroup {
    collective: Mutex<Box<dyn Collective>>,
    world: usize,
    /// A reduction found the group aborted: this rank was released, it is not the cause.
    released: AtomicBool,
}

impl BatchNormGroup {
    fn new(collective: Box<dyn Collective>, world: usize) -> Self {
        BatchNormGroup {
            collective: Mutex::new(collective),
            world,
            released: AtomicBool::new(false),
        }
    }

    fn abort(&self) {
        let mut c = self.collective.lock().unwrap_or_else(|p| p.into_inner());
        c.abort();
    }
}

impl BatchStatsReducer for BatchNormGroup {
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let mut c = self
            .collective
            .lock()
            .map_err(|_| candle_core::Error::Msg("a rank panicked in batch-norm".into()))?;
        match c.all_reduce_mean_tensor(&t.flatten_all()?) {
            Ok(mean) => mean.reshape(t.shape()),
            Err(e) => {
                if is_group_aborted(&e) {
                    self.released.store(true, Ordering::SeqCst);
                }
                Err(candle_core::Error::Msg(format!(
                    "synchronized batch-norm: {e:#}"
                )))
            }
        }
    }
}

/// Aborts the batch-norm group when dropped (a rank failing or unwinding), unless disarmed.
pub(super) struct AbortBatchNormOnDrop(Option<Arc<BatchNormGroup>>);

impl AbortBatchNormOnDrop {
    /// The rank finished normally: dropping no longer aborts.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortBatchNormOnDrop {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.abort();
        }
    }
}

/// A rank whose batch-norm reduction was cut short by another rank's failure reports
/// [`GroupAborted`], so the caller names the rank that failed first.
pub(super) fn released_by_batch_norm<T>(
    result: anyhow::Result<T>,
    group: Option<&BatchNormGroup>,
) -> anyhow::Result<T> {
    match (result, group) {
        (Err(e), Some(g)) if g.released.load(Ordering::SeqCst) && !is_group_aborted(&e) => {
            Err(anyhow::Error::new(GroupAborted).context(format!("{e:#}")))
        }
        (result, _) => result,
    }
}

/// Fails unless every rank ends with rank 0's trainable weights (what averaging gradients
/// promises; BatchNorm running statistics may differ per rank): a broken reduction or a
/// diverged rank fails the stage rather than saving one rank's model as if it were all.
/// Rank 0 broadcasts its weights' BLAKE3 digest (as 16 small integers, which any f32
/// collective carries exactly); each rank compares it with its own and the verdicts are
/// all-reduced, so every rank sees any difference.
pub(super) fn check_ranks_agree(
    collective: &mut dyn Collective,
    varmap: &VarMap,
) -> anyhow::Result<()> {
    let mut hasher = blake3::Hasher::new();
    // In name order, so every rank hashes the same sequence.
    for var in deeprepair_nn::trainable_vars(varmap) {
        let values: Vec<f32> = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        hasher.update(&bytes);
    }
    let mine: Vec<f32> = hasher
        .finalize()
        .as_bytes()
        .chunks(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]) as f32)
        .collect();
    let mut rank0 = mine.clone();
    collective
        .broadcast(&mut rank0, 0)
        .context("comparing the ranks' trained weights")?;
    let mut differ = [if rank0 == mine { 0.0 } else { 1.0 }];
    collective
        .all_reduce_mean(&mut differ)
        .context("comparing the ranks' trained weights")?;
    if differ[0] > 0.0 {
        bail!(
            "the data-parallel ranks ended with different trained weights (seen by rank {} \
             of {}): the gradient reduction did not keep them in step",
            collective.rank(),
            collective.world_size()
        );
    }
    Ok(())
}

/// The variables of `varmap`, sorted by name (every rank lists them in the same order).
pub(super) fn sorted_vars(varmap: &VarMap) -> Vec<Var> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().map(|(_, v)| v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeprepair_collective::data_parallel::ThreadCollective;

    /// A rank's variables: a trained weight ending in `last`, a running mean of `running`.
    fn rank_vars(last: f32, running: f32) -> VarMap {
        let varmap = VarMap::new();
        let var = |v: &[f32]| Var::from_slice(v, v.len(), &Device::Cpu).unwrap();
        let mut data = varmap.data().lock().unwrap();
        data.insert("fc.weight".into(), var(&[1.0, -2.5, last]));
        data.insert("bn.running_mean".into(), var(&[running]));
        drop(data);
        varmap
    }

    fn check_three(ranks: [(f32, f32); 3]) -> Vec<bool> {
        let handles: Vec<_> = ThreadCollective::group(3)
            .into_iter()
            .zip(ranks)
            .map(|(mut c, (last, running))| {
                std::thread::spawn(move || check_ranks_agree(&mut c, &rank_vars(last, running)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().is_ok())
            .collect()
    }

    #[test]
    fn ranks_agree_only_when_their_trained_weights_are_equal() {
        // Running statistics may differ per rank (DDP's default BatchNorm).
        assert_eq!(check_three([(0.5, 0.0), (0.5, 1.0), (0.5, 2.0)]), [true; 3]);
        // One rank's trained weight differs by one ulp: every rank fails.
        let off = f32::from_bits(0.5f32.to_bits() + 1);
        assert_eq!(
            check_three([(0.5, 0.0), (0.5, 0.0), (off, 0.0)]),
            [false; 3]
        );
    }
}
