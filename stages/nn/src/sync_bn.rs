//! Synchronized BatchNorm: training-mode statistics over the whole global batch of a
//! data-parallel group instead of each rank's shard (PyTorch's `SyncBatchNorm`).
//!
//! The models stay as they are: a rank's training loop opens a [`scope`] with the group's
//! [`BatchStatsReducer`], and every [`BatchNorm`](crate::fast_bn::BatchNorm) that runs in
//! training mode on that thread while the scope is open reduces its statistics through it.
//!
//! Per layer, two all-reduces in the forward pass (the channel sums with the count, then the
//! centred sums of squares: two passes, so no `E[x²] − E[x]²` cancellation) and two in the
//! backward pass. The backward ones come from [`GradAllReduceMean`], an identity whose
//! gradient is the mean of its gradient over ranks: with `Y = mean_r y_r` on every rank, the
//! gradient of `Σ_r L_r` with respect to rank `s`'s `y_s` is `mean_r ∂L_r/∂Y`. Every rank must
//! therefore run the same layers in the same order, forward and backward (they do: same model,
//! same graph).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

/// The group a synchronized BatchNorm reduces over: one handle per rank.
pub trait BatchStatsReducer: Send + Sync {
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// The element-wise mean over ranks of a small f32 vector, on its device. Blocks until
    /// every rank has contributed; fails (rather than hangs) once the group is aborted.
    fn all_reduce_mean(&self, t: &Tensor) -> Result<Tensor>;
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<dyn BatchStatsReducer>>> = const { RefCell::new(None) };
}

/// While the returned guard lives, training-mode BatchNorm on this thread reduces its
/// statistics through `reducer`. Scopes nest; dropping the guard restores the previous one.
#[must_use = "the scope ends when the guard is dropped"]
pub fn scope(reducer: Arc<dyn BatchStatsReducer>) -> ScopeGuard {
    let previous = ACTIVE.with(|a| a.borrow_mut().replace(reducer));
    ScopeGuard { previous }
}

pub struct ScopeGuard {
    previous: Option<Arc<dyn BatchStatsReducer>>,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

/// The reducer of the innermost open [`scope`] on this thread.
pub(crate) fn active() -> Option<Arc<dyn BatchStatsReducer>> {
    ACTIVE.with(|a| a.borrow().clone())
}

/// The mean over ranks of `t` (`[k]`, f32), differentiable: its gradient is the mean over
/// ranks of the upstream gradients.
fn all_reduce_mean(t: &Tensor, reducer: &Arc<dyn BatchStatsReducer>) -> Result<Tensor> {
    // A fresh contiguous buffer at offset 0, as the identity op's device copy assumes
    // (`Tensor::copy` would clone the whole storage under a view, at the view's offset).
    let t = t.force_contiguous()?;
    let marked = t.apply_op1(GradAllReduceMean {
        reducer: reducer.clone(),
    })?;
    let reduced = reducer.all_reduce_mean(&t.detach())?;
    // The reduced value, exactly; the gradient goes through `marked`.
    reduced.detach() + (&marked - marked.detach())?
}

/// Global per-channel statistics of `x` (`[N, C, …]`) over every rank's batch:
/// `(x − μ, μ, σ², total count)` with μ and the biased σ² as `[C]`, all but the count
/// differentiable.
pub(crate) fn global_moments(
    x: &Tensor,
    reducer: &Arc<dyn BatchStatsReducer>,
) -> Result<(Tensor, Tensor, Tensor, f64)> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let x3 = x.reshape((n, c, ()))?;
    let local_count = (n * x3.dim(2)?) as f32;
    let sums = x3.sum(2)?.sum(0)?;
    let count = Tensor::new(&[local_count], x.device())?;
    let reduced = all_reduce_mean(&Tensor::cat(&[&sums, &count], 0)?, reducer)?;
    // Mean count per rank (constant); the mean over ranks of the sums divided by it is the
    // global mean.
    let count = reduced.narrow(0, c, 1)?.detach();
    let mean = reduced.narrow(0, 0, c)?.broadcast_div(&count)?;
    let centred = x3.broadcast_sub(&mean.reshape((1, c, 1))?)?;
    let squares = all_reduce_mean(&centred.sqr()?.sum(2)?.sum(0)?, reducer)?;
    let var = squares.broadcast_div(&count)?;
    let total = count.to_vec1::<f32>()?[0] as f64 * reducer.world_size() as f64;
    Ok((centred.reshape(x.shape())?, mean, var, total))
}

/// Identity forward; backward: the mean over ranks of the gradient.
struct GradAllReduceMean {
    reducer: Arc<dyn BatchStatsReducer>,
}

impl CustomOp1 for GradAllReduceMean {
    fn name(&self) -> &'static str {
        "grad-all-reduce-mean"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = match s {
            CpuStorage::F32(d) => d,
            _ => candle_core::bail!("synchronized batch-norm statistics are f32"),
        };
        match l.contiguous_offsets() {
            Some((a, b)) => Ok((CpuStorage::F32(data[a..b].to_vec()), l.shape().clone())),
            None => candle_core::bail!("synchronized batch-norm statistics must be contiguous"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if l.start_offset() != 0 || !l.is_contiguous() {
            candle_core::bail!("synchronized batch-norm statistics must be a fresh buffer");
        }
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.reducer.all_reduce_mean(&grad.contiguous()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast_bn::batch_norm;
    use crate::fast_bn::tests::{max_diff, set_affine};
    use candle_core::{DType, Device, ModuleT, Var};
    use candle_nn::{VarBuilder, VarMap};
    use deeprepair_collective::data_parallel::{Collective, ThreadCollective};
    use std::sync::Mutex;

    /// A rank of the trainer's thread collective (ranks as threads of this process).
    struct Handle(Mutex<ThreadCollective>);

    impl BatchStatsReducer for Handle {
        fn world_size(&self) -> usize {
            self.0.lock().unwrap().world_size()
        }
        fn all_reduce_mean(&self, t: &Tensor) -> Result<Tensor> {
            self.0
                .lock()
                .unwrap()
                .all_reduce_mean_tensor(t)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
        }
    }

    fn group(world: usize) -> Vec<Arc<dyn BatchStatsReducer>> {
        ThreadCollective::group(world)
            .into_iter()
            .map(|c| Arc::new(Handle(Mutex::new(c))) as Arc<dyn BatchStatsReducer>)
            .collect()
    }

    /// Runs BatchNorm (γ, β set) in training mode on `x` with upstream gradient `w`;
    /// returns (y, dx, dγ, dβ, running_mean, running_var).
    fn run(x: &Tensor, w: &Tensor, reducer: Option<Arc<dyn BatchStatsReducer>>) -> Vec<Tensor> {
        let dev = x.device();
        let vm = VarMap::new();
        let bn = batch_norm(3, 1e-5, VarBuilder::from_varmap(&vm, DType::F32, dev)).unwrap();
        set_affine(&vm);
        let x = Var::from_tensor(x).unwrap();
        let _scope = reducer.map(scope);
        let y = bn.forward_t(&x, true).unwrap();
        let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let data = vm.data().lock().unwrap();
        vec![
            y,
            grads.get(&x).unwrap().clone(),
            grads.get(data["weight"].as_tensor()).unwrap().clone(),
            grads.get(data["bias"].as_tensor()).unwrap().clone(),
            data["running_mean"].as_tensor().clone(),
            data["running_var"].as_tensor().clone(),
        ]
    }

    /// Two ranks with half a batch each, synchronized, compute what one rank computes on the
    /// whole batch: the same outputs, input gradients and running statistics, and parameter
    /// gradients that sum to the whole batch's (a data-parallel step averages them and scales
    /// the per-rank losses, so the sum is what the gradient of the summed loss is).
    #[test]
    fn two_synchronized_halves_equal_one_whole_batch() {
        let dev = Device::Cpu;
        // An offset mean, so a one-pass E[x²] − E[x]² would lose digits.
        let x = (Tensor::randn(0f32, 2., (6, 3, 4, 4), &dev).unwrap() + 5.0).unwrap();
        let w = Tensor::randn(0f32, 1., (6, 3, 4, 4), &dev).unwrap();
        let whole = run(&x, &w, None);
        // Unequal shards (2 and 4 images): the count is reduced too.
        let shards = [(0, 2), (2, 4)];
        let per_rank: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = group(2)
                .into_iter()
                .zip(shards)
                .map(|(r, (start, len))| {
                    let (x, w) = (&x, &w);
                    s.spawn(move || {
                        run(
                            &x.narrow(0, start, len).unwrap(),
                            &w.narrow(0, start, len).unwrap(),
                            Some(r),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let cat = |i: usize| Tensor::cat(&[&per_rank[0][i], &per_rank[1][i]], 0).unwrap();
        assert!(max_diff(&cat(0), &whole[0]) < 1e-4, "outputs");
        assert!(max_diff(&cat(1), &whole[1]) < 1e-4, "input gradients");
        for (i, name) in [(2, "dγ"), (3, "dβ")] {
            let sum = (&per_rank[0][i] + &per_rank[1][i]).unwrap();
            assert!(max_diff(&sum, &whole[i]) < 1e-3, "{name}");
        }
        for (i, name) in [(4, "running_mean"), (5, "running_var")] {
            for rank in &per_rank {
                assert!(max_diff(&rank[i], &whole[i]) < 1e-5, "{name}");
            }
        }
        // Without the scope, each half normalizes by its own statistics: different outputs.
        let unsynced = run(
            &x.narrow(0, 0, 2).unwrap(),
            &w.narrow(0, 0, 2).unwrap(),
            None,
        );
        assert!(max_diff(&unsynced[0], &whole[0].narrow(0, 0, 2).unwrap()) > 1e-2);
    }

    #[test]
    fn scopes_nest_and_end_with_their_guard() {
        assert!(active().is_none());
        let [a, b]: [Arc<dyn BatchStatsReducer>; 2] = [group(1).remove(0), group(1).remove(0)];
        {
            let _outer = scope(a.clone());
            {
                let _inner = scope(b.clone());
                assert!(Arc::ptr_eq(&active().unwrap(), &b));
            }
            assert!(Arc::ptr_eq(&active().unwrap(), &a));
        }
        assert!(active().is_none());
    }
}
