//! Data-parallel gradient reduction: the interface every backend implements (NCCL on GPUs,
//! threads on a CPU) and the bucketed averaging of a model's gradients before each optimizer
//! step, as PyTorch DDP does (gradients flattened into buckets of ≤ `bucket_bytes`, each
//! all-reduced and divided by the world size).
//!
//! Determinism: the thread backend sums contributions in rank order into one shared buffer,
//! so every rank receives bit-identical averages and, from identical initial weights, every
//! rank holds the same model after every step.

use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::sync::{Arc, Condvar, Mutex};

/// Collective operations among the ranks of one data-parallel group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buffer` on every rank by the element-wise mean over ranks.
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> anyhow::Result<()>;
    /// Replaces `buffer` on every rank by rank `root`'s.
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> anyhow::Result<()>;
}

struct Round {
    generation: u64,
    arrived: usize,
    /// Rank-ordered contributions of this round (summed when the last rank arrives).
    parts: Vec<Option<Vec<f32>>>,
    result: Arc<Vec<f32>>,
    departed: usize,
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

    /// Every rank contributes `buffer`; `combine` turns the rank-ordered parts into the result.
    fn exchange(
        &mut self,
        buffer: &mut [f32],
        combine: impl Fn(&[Vec<f32>]) -> Vec<f32>,
    ) -> anyhow::Result<()> {
        let shared = &self.shared;
        let mut round = shared
            .round
            .lock()
            .map_err(|_| anyhow::anyhow!("a rank panicked"))?;
        // Wait until the previous round has been collected by every rank.
        while round.departed != 0 && round.departed < shared.world {
            round = shared
                .changed
                .wait(round)
                .map_err(|_| anyhow::anyhow!("a rank panicked"))?;
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
                bail!("ranks passed buffers of different lengths to a collective");
            }
            round.result = Arc::new(combine(&parts));
            round.generation += 1;
            shared.changed.notify_all();
        } else {
            while round.generation == generation {
                round = shared
                    .changed
                    .wait(round)
                    .map_err(|_| anyhow::anyhow!("a rank panicked"))?;
            }
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
        let world = self.shared.world as f32;
        self.exchange(buffer, |parts| {
            let mut acc = parts[0].clone();
            for p in &parts[1..] {
                for (a, v) in acc.iter_mut().zip(p) {
                    *a += v;
                }
            }
            acc.iter_mut().for_each(|a| *a /= world);
            acc
        })
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
        let mut flat = Vec::with_capacity(bytes / 4);
        for var in &vars[start..end] {
            match grads.get(var.as_tensor()) {
                Some(g) => flat.extend(
                    g.flatten_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_vec1::<f32>()?,
                ),
                None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
            }
        }
        collective
            .all_reduce_mean(&mut flat)
            .context("all-reducing a gradient bucket")?;
        let mut offset = 0;
        for var in &vars[start..end] {
            let n = var.elem_count();
            let g = Tensor::from_slice(&flat[offset..offset + n], var.shape(), var.device())?
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
}
