//! Data-parallel gradient reduction: the interface every backend implements (NCCL on GPUs,
//! threads on a CPU) and the bucketed averaging of a model's gradients before each optimizer
//! step, as PyTorch DDP does (gradients flattened into buckets of ≤ `bucket_bytes`, each
//! all-reduced and divided by the world size).
//!
//! Determinism: the thread backend sums contributions in rank order into one shared buffer,
//! so every rank receives bit-identical averages and, from identical initial weights, every
//! rank holds the same model after every step.
//!
//! Failure: a rank that fails calls [`Collective::abort`] (or drops an [`AbortOnDrop`] guard
//! while unwinding); every rank waiting in, or later entering, a collective of that group gets
//! a [`GroupAborted`] error instead of waiting forever.

use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::sync::{Arc, Condvar, Mutex};

/// The error a collective returns once some rank of the group has aborted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupAborted;

impl std::fmt::Display for GroupAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("another rank of the data-parallel group failed")
    }
}

impl std::error::Error for GroupAborted {}

/// Whether `e` only says that another rank failed (rather than why).
pub fn is_group_aborted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<GroupAborted>())
}

/// Collective operations among the ranks of one data-parallel group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buffer` on every rank by the element-wise mean over ranks.
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> anyhow::Result<()>;
    /// Replaces `buffer` on every rank by rank `root`'s.
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> anyhow::Result<()>;
    /// The element-wise mean over ranks of a flat f32 tensor, on the tensor's device. The
    /// default goes through host memory; device backends (NCCL) reduce in place on the GPU.
    fn all_reduce_mean_tensor(&mut self, flat: &Tensor) -> anyhow::Result<Tensor> {
        let mut host = flat.to_vec1::<f32>()?;
        self.all_reduce_mean(&mut host)?;
        Ok(Tensor::from_vec(host, flat.elem_count(), flat.device())?)
    }
    /// Marks the group failed: collectives in progress or to come, on every rank, return
    /// [`GroupAborted`]. Idempotent. The default does nothing (a backend whose collectives
    /// cannot hang on a missing rank).
    fn abort(&mut self) {}
}

/// Aborts the group when dropped unless [`AbortOnDrop::disarm`]ed first: hold one per rank so
/// that a rank unwinding from a panic releases the ranks waiting for it.
pub struct AbortOnDrop<'c> {
    collective: Option<&'c mut dyn Collective>,
}

impl<'c> AbortOnDrop<'c> {
    pub fn new(collective: &'c mut dyn Collective) -> Self {
        AbortOnDrop {
            collective: Some(collective),
        }
    }
    /// The guarded collective, for use while the guard is held.
    pub fn get(&mut self) -> &mut dyn Collective {
        &mut **self.collective.as_mut().expect("not disarmed")
    }
    /// The rank finished normally: dropping no longer aborts.
    pub fn disarm(mut self) {
        self.collective = None;
    }
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.collective.take() {
            c.abort();
        }
    }
}

struct Round {
    generation: u64,
    arrived: usize,
    /// Rank-ordered contributions of this round (summed when the last rank arrives).
    parts: Vec<Option<Vec<f32>>>,
    result: Arc<Vec<f32>>,
    departed: usize,
    /// Set by [`Collective::abort`]: every waiter gives up.
    aborted: bool,
}

struct Shared {
    world: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// A rank of a group whose ranks are threads of this process.
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadCollective {
    /// One handle per rank; move each to its thread.
    pub fn group(world: usize) -> Vec<ThreadCollective> {
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new(Round {
                generation: 0,
                arrived: 0,
                parts: vec![None; world],
                result: Arc::new(vec![]),
                departed: 0,
                aborted: false,
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// [`ThreadCollective::group`] as trait objects, as the trainer takes them.
    pub fn boxed_group(world: usize) -> Vec<Box<dyn Collective>> {
        Self::group(world)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect()
    }

    /// Every rank contributes `buffer`; `combine` turns the rank-ordered parts into the result.
    fn exchange(
        &mut self,
        buffer: &mut [f32],
        combine: impl Fn(&[Vec<f32>]) -> Vec<f32>,
    ) -> anyhow::Result<()> {
        let shared = &self.shared;
        let poisoned = |_| anyhow::Error::new(GroupAborted).context("a rank panicked");
        let mut round = shared.round.lock().map_err(poisoned)?;
        // Wait until the previous round has been collected by every rank.
        while !round.aborted && round.departed != 0 && round.departed < shared.world {
            round = shared.changed.wait(round).map_err(poisoned)?;
        }
        if round.aborted {
            return Err(GroupAborted.into());
        }
        if round.departed == shared.world {
            round.departed = 0;
            round.arrived = 0;
        }
        let generation = round.generation;
        round.parts[self.rank] = Some(buffer.to_vec());
        round.arrived += 1;
        if round.arrived == shared.world {
            let parts: Vec<Vec<f32>> = round
                .parts
                .iter_mut()
                .map(|p| p.take().expect("every rank arrived"))
                .collect();
            if parts.iter().any(|p| p.len() != parts[0].len()) {
                round.aborted = true;
                shared.changed.notify_all();
                let lengths: Vec<usize> = parts.iter().map(Vec::len).collect();
                bail!("ranks passed buffers of different lengths to a collective: {lengths:?}");
            }
            round.result = Arc::new(combine(&parts));
            round.generation += 1;
            shared.changed.notify_all();
        } else {
            while round.generation == generation && !round.aborted {
                round = shared.changed.wait(round).map_err(poisoned)?;
            }
            if round.generation == generation {
                return Err(GroupAborted.into());
            }
        }
        if buffer.len() != round.result.len() {
            // Another rank's buffer decided the length; ours differs (reported there too).
            round.aborted = true;
            shared.changed.notify_all();
            return Err(GroupAborted.into());
        }
        buffer.copy_from_slice(&round.result);
        round.departed += 1;
        shared.changed.notify_all();
        Ok(())
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> anyhow::Result<()> {
        self.exchange(buffer, mean_in_rank_order)
    }
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> anyhow::Result<()> {
        if root >= self.shared.world {
            bail!(
                "broadcast root {root} outside a world of {}",
                self.shared.world
            );
        }
        self.exchange(buffer, |parts| parts[root].clone())
    }
    fn abort(&mut self) {
        let mut round = match self.shared.round.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        round.aborted = true;
        self.shared.changed.notify_all();
    }
}

/// The element-wise mean of rank-ordered contributions, summed in rank order: the one
/// arithmetic every host-memory backend uses, so threads and processes give the same bits.
pub(crate) fn mean_in_rank_order(parts: &[Vec<f32>]) -> Vec<f32> {
    let world = parts.len() as f32;
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc.iter_mut().for_each(|a| *a /= world);
    acc
}

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Averages the gradients of `vars` across ranks, in buckets of at most `bucket_bytes`
/// (a variable larger than a bucket gets one of its own). Variables without a gradient on
/// this rank contribute zeros, so every rank sends the same layout.
pub fn all_reduce_gradients(
    collective: &mut dyn Collective,
    vars: &[Var],
    grads: &mut GradStore,
    bucket_bytes: usize,
) -> anyhow::Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let mut start = 0;
    while start < vars.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < vars.len()
            && (end == start || bytes + vars[end].elem_count() * 4 <= bucket_bytes)
        {
            bytes += vars[end].elem_count() * 4;
            end += 1;
        }
        let parts: Vec<Tensor> = vars[start..end]
            .iter()
            .map(|var| match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(candle_core::DType::F32),
                None => Tensor::zeros(var.elem_count(), candle_core::DType::F32, var.device()),
            })
            .collect::<candle_core::Result<_>>()?;
        let flat = Tensor::cat(&parts, 0)?;
        let flat = collective
            .all_reduce_mean_tensor(&flat)
            .context("all-reducing a gradient bucket")?;
        let mut offset = 0;
        for var in &vars[start..end] {
            let n = var.elem_count();
            let g = flat
                .narrow(0, offset, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), g);
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// Makes every rank's weights equal to rank 0's (call once before training).
pub fn broadcast_weights(collective: &mut dyn Collective, vars: &[Var]) -> anyhow::Result<()> {
    for var in vars {
        let mut flat = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        collective.broadcast(&mut flat, 0)?;
        var.set(&Tensor::from_slice(&flat, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_all_reduce_averages_in_rank_order_and_broadcasts() {
        let group = ThreadCollective::group(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut results = vec![];
                    for round in 0..50 {
                        let mut buf = vec![c.rank() as f32 + round as f32, 1.0];
                        c.all_reduce_mean(&mut buf).unwrap();
                        results.push(buf.clone());
                        let mut b = vec![c.rank() as f32; 2];
                        c.broadcast(&mut b, 2).unwrap();
                        assert_eq!(b, vec![2.0, 2.0]);
                    }
                    results
                })
            })
            .collect();
        let all: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (round, result) in all[0].iter().enumerate() {
            assert_eq!(result, &vec![1.0 + round as f32, 1.0]);
            assert_eq!(result, &all[1][round]);
            assert_eq!(result, &all[2][round]);
        }
    }

    #[test]
    fn an_aborting_rank_releases_the_waiting_ones() {
        let mut group = ThreadCollective::group(3);
        let mut failing = group.pop().unwrap();
        let waiting: Vec<_> = group
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut buf = vec![1.0; 4];
                    c.all_reduce_mean(&mut buf).unwrap();
                    // The failing rank never arrives at this one.
                    let err = c.all_reduce_mean(&mut buf).unwrap_err();
                    assert!(is_group_aborted(&err), "{err:#}");
                    // And the group stays failed.
                    assert!(is_group_aborted(&c.broadcast(&mut buf, 0).unwrap_err()));
                })
            })
            .collect();
        let mut buf = vec![1.0; 4];
        failing.all_reduce_mean(&mut buf).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            // A guard dropped without disarming aborts (as when a rank unwinds).
            let _guard = AbortOnDrop::new(&mut failing);
        }
        for h in waiting {
            h.join().unwrap();
        }
    }

    #[test]
    fn mismatched_lengths_fail_every_rank() {
        let handles: Vec<_> = ThreadCollective::group(2)
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut buf = vec![0.0; 2 + c.rank()];
                    c.all_reduce_mean(&mut buf).is_err()
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap());
        }
    }
}
