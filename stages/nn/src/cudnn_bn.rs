//! BatchNorm on CUDA through cuDNN's spatial batch norm, in place of candle's composition of a
//! dozen broadcast kernels per layer (each differentiated on its own): training mode is one
//! cuDNN kernel forward and one backward, eval mode one forward.
//!
//! Semantics are PyTorch's `BatchNorm2d` (and [`crate::fast_bn`]'s): the biased batch variance
//! normalizes, the running averages become `(1 − m)·running + m·batch` with the *unbiased* batch
//! variance. cuDNN's `exponentialAverageFactor` is exactly that `m` (PyTorch passes its momentum
//! through unchanged) and cuDNN applies Bessel's correction to the running variance itself.
//!
//! Like [`crate::cudnn_conv`], the cuDNN handle is made once per (thread, device) on candle's
//! stream, descriptors once per shape. cudarc's safe `Cudnn` wraps no batch norm and does not
//! expose its raw handle, so this module keeps its own raw handle and calls `cudnn::sys`.
//!
//! f32 only, NCHW (any rank ≥ 2: `[N, C, …]` is described as a 4-D `[N, C, H, W]`). Mode
//! `CUDNN_BATCHNORM_SPATIAL`, PyTorch's choice for NCHW (`SPATIAL_PERSISTENT` is its NHWC one).
//! ReLU is not fused: cuDNN fuses BN+activation only in its `Ex` API for NHWC, so the ReLU that
//! follows stays a candle op.

use crate::cudnn_conv::{cudnn_err, driver_err};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{
    CpuStorage, CustomOp3, DType, InplaceOp1, Layout, Result, Shape, Storage, Tensor,
};
use cudarc::cudnn::result as cudnn_result;
use cudarc::cudnn::sys::{self, cudnnBatchNormMode_t, cudnnDataType_t, cudnnTensorFormat_t};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::cell::{Cell, RefCell};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const MODE: cudnnBatchNormMode_t = cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

/// The smallest epsilon sent to cuDNN. `CUDNN_BN_MIN_EPSILON` is 0 in cuDNN 8 and 9 but was 1e-5
/// before, and a smaller epsilon is a `CUDNN_STATUS_BAD_PARAM`: smaller ones (none of our models)
/// stay on candle's path. PyTorch's default, ours, is 1e-5 exactly.
pub const MIN_EPSILON: f64 = 1e-5;

/// Offsets inside packed buffers are multiples of 64 floats (256 bytes, cudaMalloc's alignment),
/// so every pointer handed to cuDNN is as aligned as a fresh allocation.
const ALIGN: usize = 64;

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static BN_ENABLED: AtomicU8 = AtomicU8::new(UNSET);

/// Whether [`crate::fast_bn`] sends CUDA f32 BatchNorm here: when [`crate::cudnn_conv::enabled`]
/// (`DEEPREPAIR_CUDNN=0` turns both off) and unless `DEEPREPAIR_CUDNN_BN=0` (read once) or
/// [`set_enabled`] turned BatchNorm alone off, to measure it apart from the convolutions.
pub fn enabled() -> bool {
    if !crate::cudnn_conv::enabled() {
        return false;
    }
    match BN_ENABLED.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("DEEPREPAIR_CUDNN_BN").map_or(true, |v| v.trim() != "0");
            BN_ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Overrides `DEEPREPAIR_CUDNN_BN` for the whole process (`DEEPREPAIR_CUDNN` still applies).
pub fn set_enabled(on: bool) {
    BN_ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

thread_local! {
    static LAUNCHES: Cell<u64> = const { Cell::new(0) };
    static STATES: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

/// cuDNN batch-norm calls (training forward, backward, inference) launched by this thread.
pub fn launch_count() -> u64 {
    LAUNCHES.with(|n| n.get())
}

/// How many batch-norm shapes this thread has descriptors for, over all devices.
pub fn cached_plan_count() -> usize {
    STATES.with(|states| states.borrow().values().map(|s| s.plans.len()).sum())
}

/// Whether [`batch_norm_train`] (`train`) or [`batch_norm_eval`] takes `x` with `params`
/// (weight, bias, running mean, running variance): cuDNN enabled, everything f32 on one CUDA
/// device, rank ≥ 2, sizes within cuDNN's 32-bit dimensions, epsilon ≥ [`MIN_EPSILON`], and in
/// training more than one value per channel (the unbiased variance divides by count − 1).
pub fn applies(x: &Tensor, params: [&Tensor; 4], eps: f64, train: bool) -> bool {
    if !(enabled() && x.device().is_cuda() && x.dtype() == DType::F32 && eps >= MIN_EPSILON) {
        return false;
    }
    let Ok(shape) = BnShape::of(x) else {
        return false;
    };
    shape.check().is_ok()
        && (!train || shape.count() > 1)
        // The same GPU, not the same candle handle: handles opened separately on one GPU share
        // its primary context and this thread's stream (the convolution path accepts them too).
        && params.iter().all(|p| {
            p.dtype() == DType::F32 && p.dims() == [shape.c] && p.device().location() == x.device().location()
        })
}

/// Training-mode BatchNorm of `x` (`[N, C, …]`) with batch statistics, differentiable in `x`,
/// `weight` and `bias` (through cuDNN's backward). `running_mean` and `running_var` (`[C]`,
/// contiguous) are updated in place, PyTorch's way with `momentum`.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    momentum: f64,
) -> Result<Tensor> {
    let shape = BnShape::of(x)?;
    shape.check()?;
    check_eps(eps)?;
    if !(0.0..=1.0).contains(&momentum) {
        candle_core::bail!("cudnn batch-norm: momentum {momentum} outside [0, 1]");
    }
    if shape.count() < 2 {
        candle_core::bail!(
            "cudnn batch-norm: training needs more than one value per channel, got {:?}",
            x.dims()
        );
    }
    check_params(
        shape.c,
        x,
        [
            (weight, "weight"),
            (bias, "bias"),
            (running_mean, "running mean"),
            (running_var, "running variance"),
        ],
    )?;
    for (t, what) in [
        (running_mean, "running mean"),
        (running_var, "running variance"),
    ] {
        if !t.is_contiguous() {
            candle_core::bail!("cudnn batch-norm: the {what} must be contiguous");
        }
    }
    let op = TrainForward {
        shape,
        eps,
        momentum,
        running: Mutex::new(Some((running_mean.clone(), running_var.clone()))),
        saved: OnceLock::new(),
    };
    // The ops read contiguous buffers (from the layout's start offset).
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Eval-mode BatchNorm of `x` with the running statistics (not updated, no gradient to them);
/// differentiable in `x`, `weight` and `bias` (the backward is composed in candle: rare).
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let shape = BnShape::of(x)?;
    shape.check()?;
    check_eps(eps)?;
    check_params(
        shape.c,
        x,
        [
            (weight, "weight"),
            (bias, "bias"),
            (running_mean, "running mean"),
            (running_var, "running variance"),
        ],
    )?;
    let op = EvalForward {
        shape,
        eps,
        running_mean: running_mean.detach().contiguous()?,
        running_var: running_var.detach().contiguous()?,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

fn check_eps(eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps >= MIN_EPSILON) {
        candle_core::bail!("cudnn batch-norm: epsilon {eps} below {MIN_EPSILON}");
    }
    Ok(())
}

fn check_params(c: usize, x: &Tensor, params: [(&Tensor, &str); 4]) -> Result<()> {
    for (t, what) in params {
        if t.dims() != [c]
            || t.dtype() != DType::F32
            || t.device().location() != x.device().location()
        {
            candle_core::bail!(
                "cudnn batch-norm of {:?} f32: {what} is {:?} {:?} on {:?}",
                x.dims(),
                t.dims(),
                t.dtype(),
                t.device().location()
            );
        }
    }
    Ok(())
}

/// `[N, C, …]` as cuDNN sees it, `[N, C, H, W]` (rank 4 as it is, `[N, C]` as `[N, C, 1, 1]`,
/// `[N, C, L]` as `[N, C, L, 1]`, more dimensions folded into W): the key of a cached [`Plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BnShape {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl BnShape {
    fn of(x: &Tensor) -> Result<BnShape> {
        let d = x.dims();
        if d.len() < 2 {
            candle_core::bail!("cudnn batch-norm: input {d:?} has no channel dimension");
        }
        Ok(BnShape {
            n: d[0],
            c: d[1],
            h: d.get(2).copied().unwrap_or(1),
            w: d.get(3..).map_or(1, |rest| rest.iter().product()),
        })
    }

    fn check(&self) -> Result<()> {
        if self.len() == 0 {
            candle_core::bail!("cudnn batch-norm: empty input {self:?}");
        }
        // cuDNN's 4-D descriptors take int dimensions and strides.
        if i32::try_from(self.len()).is_err() {
            candle_core::bail!("cudnn batch-norm: too large for 32-bit indexing: {self:?}");
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Values per channel: what the batch statistics average over.
    fn count(&self) -> usize {
        self.n * self.h * self.w
    }

    fn dims(&self) -> [i32; 4] {
        // In range: `check` bounds the element count.
        [self.n, self.c, self.h, self.w].map(|d| d as i32)
    }

    /// Two per-channel vectors in one buffer, `[first | pad | second]` (the saved mean and
    /// inverse std; dγ and dβ): the offset of the second and the buffer's length.
    fn pair_layout(&self) -> (usize, usize) {
        let second = self.c.next_multiple_of(ALIGN);
        (second, second + self.c)
    }
}

/// A raw cuDNN handle bound to candle's stream of one device (see the module doc for why not
/// cudarc's `Cudnn`).
struct Handle {
    raw: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
}

impl Handle {
    fn new(stream: Arc<CudaStream>) -> Result<Handle> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind context", e))?;
        let raw = cudnn_result::create_handle().map_err(|e| cudnn_err("handle creation", e))?;
        let handle = Handle { raw, stream };
        // cuDNN then runs in order with candle's kernels on that stream.
        unsafe { cudnn_result::set_stream(handle.raw, handle.stream.cu_stream().cast()) }
            .map_err(|e| cudnn_err("set stream", e))?;
        Ok(handle)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Nothing to report to from a destructor (and at process exit the context may be gone).
        let _ = self.stream.context().bind_to_thread();
        let _ = unsafe { cudnn_result::destroy_handle(self.raw) };
    }
}

/// An owned cuDNN tensor descriptor.
struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn new() -> Result<TensorDesc> {
        cudnn_result::create_tensor_descriptor()
            .map(TensorDesc)
            .map_err(|e| cudnn_err("tensor descriptor", e))
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        let _ = unsafe { cudnn_result::destroy_tensor_descriptor(self.0) };
    }
}

/// The descriptors of one [`BnShape`]: `x` (also y, dy, dx: same shape, contiguous) and the
/// per-channel one cuDNN derives from it (γ, β, dγ, dβ, the running and saved statistics).
struct Plan {
    x: TensorDesc,
    bn: TensorDesc,
}

impl Plan {
    fn new(s: BnShape) -> Result<Plan> {
        let x = TensorDesc::new()?;
        unsafe {
            cudnn_result::set_tensor4d_descriptor(
                x.0,
                cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                cudnnDataType_t::CUDNN_DATA_FLOAT,
                s.dims(),
            )
        }
        .map_err(|e| cudnn_err("input descriptor", e))?;
        let bn = TensorDesc::new()?;
        // [1, C, 1, 1] f32 for spatial mode and f32 input.
        unsafe { sys::cudnnDeriveBNTensorDescriptor(bn.0, x.0, MODE) }
            .result()
            .map_err(|e| cudnn_err("derive batch-norm descriptor", e))?;
        Ok(Plan { x, bn })
    }
}

/// What one thread keeps for one candle CUDA device. Plans before the handle: they drop first.
struct DeviceState {
    plans: HashMap<BnShape, Plan>,
    handle: Handle,
}

/// Runs `f` with this thread's handle and plan for `shape` on `dev`, and candle's stream.
fn with_plan<R>(
    dev: &CudaDevice,
    shape: BnShape,
    f: impl FnOnce(sys::cudnnHandle_t, &Plan, &Arc<CudaStream>) -> Result<R>,
) -> Result<R> {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        if !states.contains_key(&dev.id()) {
            // Drop the state of devices that no longer exist: only our handle holds their stream.
            states.retain(|_, s| Arc::strong_count(&s.handle.stream) > 1);
            let handle = Handle::new(dev.cuda_stream())?;
            states.insert(
                dev.id(),
                DeviceState {
                    plans: HashMap::new(),
                    handle,
                },
            );
        }
        let state = states.get_mut(&dev.id()).expect("inserted above");
        // cuDNN calls go to the current context; another device may have been bound since.
        state
            .handle
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind context", e))?;
        let plan = match state.plans.entry(shape) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(shape)?),
        };
        LAUNCHES.with(|n| n.set(n.get() + 1));
        f(state.handle.raw, plan, &state.handle.stream)
    })
}

/// The contiguous f32 data of an op argument (`len` values from its start offset).
fn f32_view<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    len: usize,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let slice = storage.as_cuda_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(slice.slice(start..end)),
        Some(_) => candle_core::bail!(
            "cudnn batch-norm: {what} has shape {:?}, expected {len} values",
            layout.dims()
        ),
        None => candle_core::bail!("cudnn batch-norm: {what} is not contiguous"),
    }
}

fn f32_view_mut<'a>(
    storage: &'a mut CudaStorage,
    layout: &Layout,
    len: usize,
    what: &str,
) -> Result<CudaViewMut<'a, f32>> {
    let slice = storage.as_cuda_slice_mut::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(slice.slice_mut(start..end)),
        Some(_) => candle_core::bail!(
            "cudnn batch-norm: {what} has shape {:?}, expected {len} values",
            layout.dims()
        ),
        None => candle_core::bail!("cudnn batch-norm: {what} is not contiguous"),
    }
}

fn read_ptr(p: cudarc::driver::sys::CUdeviceptr) -> *const c_void {
    p as *const c_void
}

fn write_ptr(p: cudarc::driver::sys::CUdeviceptr) -> *mut c_void {
    p as *mut c_void
}

/// `p + floats` f32 elements, as a device pointer.
fn offset(p: cudarc::driver::sys::CUdeviceptr, floats: usize) -> cudarc::driver::sys::CUdeviceptr {
    p + (floats * std::mem::size_of::<f32>()) as u64
}

/// Host scalars for cuDNN's alpha/beta (f32 data ⇒ f32 scaling parameters).
const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn scalar(v: &f32) -> *const c_void {
    (v as *const f32).cast()
}

/// Runs `f` on `t`'s CUDA storage under candle's write lock, through an in-place op: how the
/// training forward writes the running statistics where `Var::set` would, without the extra
/// kernels of computing them apart and copying them in.
fn with_storage_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let op = InPlace {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| candle_core::Error::Msg("cudnn batch-norm: in-place op did not run".into()))
}

struct InPlace<F, R> {
    f: RefCell<Option<F>>,
    out: RefCell<Option<R>>,
}

impl<F, R> InplaceOp1 for InPlace<F, R>
where
    F: FnOnce(&mut CudaStorage, &Layout) -> Result<R>,
{
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-running-stats"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("cudnn batch-norm runs on CUDA devices only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let f = self.f.borrow_mut().take().ok_or_else(|| {
            candle_core::Error::Msg("cudnn batch-norm: in-place op ran twice".into())
        })?;
        let out = f(storage, layout)?;
        *self.out.borrow_mut() = Some(out);
        Ok(())
    }
}

/// Training forward: `y` from `(x, γ, β)`, the running statistics updated in place, the batch
/// mean and inverse std kept for the backward pass.
struct TrainForward {
    shape: BnShape,
    eps: f64,
    momentum: f64,
    /// The running mean and variance; the forward pass takes them (it runs once per op).
    ///
    /// They are written in place because that is how they are held: `fast_bn::BatchNorm` keeps
    /// them as `Var`s sharing storage with the `VarMap` that saves them, and its CPU path
    /// updates them with `Var::set`, a copy into that same storage on this same stream. The
    /// in-place op takes candle's write lock on each, as `Var::set` does.
    running: Mutex<Option<(Tensor, Tensor)>>,
    /// `[mean | pad | 1/sqrt(var + eps)]` of this batch, written by the forward pass.
    saved: OnceLock<CudaSlice<f32>>,
}

impl CustomOp3 for TrainForward {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn batch-norm runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = self.shape;
        let x = f32_view(xs, xl, s.len(), "input")?;
        let gamma = f32_view(gs, gl, s.c, "weight")?;
        let beta = f32_view(bs, bl, s.c, "bias")?;
        let (running_mean, running_var) = self
            .running
            .lock()
            .map_err(|_| candle_core::Error::Msg("cudnn batch-norm: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("cudnn batch-norm: forward ran twice".into()))?;
        let dev = &xs.device;
        // Not zeroed: beta = 0 overwrites y; mean and inverse std are outputs.
        let mut y = unsafe { dev.alloc::<f32>(s.len()) }?;
        let (inv_at, saved_len) = s.pair_layout();
        let mut saved = unsafe { dev.alloc::<f32>(saved_len) }?;
        with_storage_mut(&running_mean, |ms, ml| {
            let mut mean = f32_view_mut(ms, ml, s.c, "running mean")?;
            with_storage_mut(&running_var, |vs, vl| {
                let mut var = f32_view_mut(vs, vl, s.c, "running variance")?;
                with_plan(dev, s, |handle, plan, stream| {
                    let (xp, _x) = x.device_ptr(stream);
                    let (gp, _g) = gamma.device_ptr(stream);
                    let (bp, _b) = beta.device_ptr(stream);
                    let (yp, _y) = y.device_ptr_mut(stream);
                    let (mp, _m) = mean.device_ptr_mut(stream);
                    let (vp, _v) = var.device_ptr_mut(stream);
                    let (sp, _s) = saved.device_ptr_mut(stream);
                    // Descriptors match the buffers: sizes checked above, f32, contiguous.
                    unsafe {
                        sys::cudnnBatchNormalizationForwardTraining(
                            handle,
                            MODE,
                            scalar(&ONE),
                            scalar(&ZERO),
                            plan.x.0,
                            read_ptr(xp),
                            plan.x.0,
                            write_ptr(yp),
                            plan.bn.0,
                            read_ptr(gp),
                            read_ptr(bp),
                            // running = (1 − factor)·running + factor·batch, PyTorch's momentum.
                            self.momentum,
                            write_ptr(mp),
                            write_ptr(vp),
                            self.eps,
                            write_ptr(sp),
                            write_ptr(offset(sp, inv_at)),
                        )
                    }
                    .result()
                    .map_err(|e| cudnn_err("batch-norm training forward", e))
                })
            })
        })?;
        if self.saved.set(saved).is_err() {
            candle_core::bail!("cudnn batch-norm: forward ran twice");
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.get().ok_or_else(|| {
            candle_core::Error::Msg("cudnn batch-norm: backward before forward".into())
        })?;
        let s = self.shape;
        let op = TrainBackward {
            shape: s,
            eps: self.eps,
            saved,
            param_grads: OnceLock::new(),
        };
        let dx = x.apply_op3_no_bwd(gamma, &dy.contiguous()?, &op)?;
        let Some(param_grads) = op.param_grads.into_inner() else {
            candle_core::bail!("cudnn batch-norm: backward produced no parameter gradients");
        };
        // dγ and dβ in their own small buffer (not packed after dx as the CPU path does), so
        // holding them until the optimizer step does not keep dx's memory alive.
        let (dbeta_at, len) = s.pair_layout();
        let param_grads = Tensor::from_storage(
            Storage::Cuda(param_grads),
            len,
            candle_core::op::BackpropOp::none(),
            false,
        );
        let dgamma = param_grads.narrow(0, 0, s.c)?;
        let dbeta = param_grads.narrow(0, dbeta_at, s.c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `dx` from `(x, γ, dy)` and the forward's saved statistics; `[dγ | pad | dβ]` on the side.
struct TrainBackward<'a> {
    shape: BnShape,
    eps: f64,
    saved: &'a CudaSlice<f32>,
    param_grads: OnceLock<CudaStorage>,
}

impl CustomOp3 for TrainBackward<'_> {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn batch-norm runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = self.shape;
        let x = f32_view(xs, xl, s.len(), "input")?;
        let gamma = f32_view(gs, gl, s.c, "weight")?;
        let dy = f32_view(dys, dyl, s.len(), "output gradient")?;
        let (inv_at, _) = s.pair_layout();
        let (dbeta_at, params_len) = s.pair_layout();
        let dev = &xs.device;
        // Not zeroed: beta = 0 for data and parameter gradients overwrites every part read.
        let mut dx = unsafe { dev.alloc::<f32>(s.len()) }?;
        let mut params = unsafe { dev.alloc::<f32>(params_len) }?;
        with_plan(dev, s, |handle, plan, stream| {
            let (xp, _x) = x.device_ptr(stream);
            let (gp, _g) = gamma.device_ptr(stream);
            let (dyp, _dy) = dy.device_ptr(stream);
            let (sp, _s) = self.saved.device_ptr(stream);
            let (dxp, _dx) = dx.device_ptr_mut(stream);
            let (pp, _p) = params.device_ptr_mut(stream);
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    handle,
                    MODE,
                    scalar(&ONE),
                    scalar(&ZERO),
                    scalar(&ONE),
                    scalar(&ZERO),
                    plan.x.0,
                    read_ptr(xp),
                    plan.x.0,
                    read_ptr(dyp),
                    plan.x.0,
                    write_ptr(dxp),
                    plan.bn.0,
                    read_ptr(gp),
                    write_ptr(pp),
                    write_ptr(offset(pp, dbeta_at)),
                    // The forward's epsilon, as cuDNN requires with saved statistics.
                    self.eps,
                    read_ptr(sp),
                    read_ptr(offset(sp, inv_at)),
                )
            }
            .result()
            .map_err(|e| cudnn_err("batch-norm backward", e))
        })?;
        if self
            .param_grads
            .set(CudaStorage::wrap_cuda_slice(params, dev.clone()))
            .is_err()
        {
            candle_core::bail!("cudnn batch-norm: backward ran twice");
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            xl.shape().clone(),
        ))
    }
}

/// Eval forward: `y = γ·(x − running mean)/sqrt(running var + eps) + β` from `(x, γ, β)`.
struct EvalForward {
    shape: BnShape,
    eps: f64,
    /// Detached, contiguous.
    running_mean: Tensor,
    running_var: Tensor,
}

impl CustomOp3 for EvalForward {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn batch-norm runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = self.shape;
        let x = f32_view(xs, xl, s.len(), "input")?;
        let gamma = f32_view(gs, gl, s.c, "weight")?;
        let beta = f32_view(bs, bl, s.c, "bias")?;
        let (ms, ml) = self.running_mean.storage_and_layout();
        let (vs, vl) = self.running_var.storage_and_layout();
        let (Storage::Cuda(ms), Storage::Cuda(vs)) = (&*ms, &*vs) else {
            candle_core::bail!("cudnn batch-norm: running statistics are not on the GPU");
        };
        let mean = f32_view(ms, ml, s.c, "running mean")?;
        let var = f32_view(vs, vl, s.c, "running variance")?;
        let dev = &xs.device;
        let mut y = unsafe { dev.alloc::<f32>(s.len()) }?;
        with_plan(dev, s, |handle, plan, stream| {
            let (xp, _x) = x.device_ptr(stream);
            let (gp, _g) = gamma.device_ptr(stream);
            let (bp, _b) = beta.device_ptr(stream);
            let (mp, _m) = mean.device_ptr(stream);
            let (vp, _v) = var.device_ptr(stream);
            let (yp, _y) = y.device_ptr_mut(stream);
            unsafe {
                sys::cudnnBatchNormalizationForwardInference(
                    handle,
                    MODE,
                    scalar(&ONE),
                    scalar(&ZERO),
                    plan.x.0,
                    read_ptr(xp),
                    plan.x.0,
                    write_ptr(yp),
                    plan.bn.0,
                    read_ptr(gp),
                    read_ptr(bp),
                    read_ptr(mp),
                    read_ptr(vp),
                    self.eps,
                )
            }
            .result()
            .map_err(|e| cudnn_err("batch-norm inference forward", e))
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            xl.shape().clone(),
        ))
    }

    /// An affine map per channel: `dx = dy·γ/σ`, `dγ = Σ dy·(x − μ)/σ`, `dβ = Σ dy`, with the
    /// running μ and σ² constant (candle's eval path gives them no gradient either).
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.shape.c;
        let per_channel: Vec<usize> = (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
        let per_channel = per_channel.as_slice();
        let inv_std = (&self.running_var + self.eps)?.sqrt()?.recip()?;
        let dx = dy.broadcast_mul(&(gamma.detach() * &inv_std)?.reshape(per_channel)?)?;
        let xhat = x
            .detach()
            .broadcast_sub(&self.running_mean.reshape(per_channel)?)?
            .broadcast_mul(&inv_std.reshape(per_channel)?)?;
        let channel_sum = |t: &Tensor| -> Result<Tensor> {
            let t = t.sum(0)?;
            if t.rank() > 1 {
                t.flatten_from(1)?.sum(1)
            } else {
                Ok(t)
            }
        };
        let dgamma = channel_sum(&(dy * xhat)?)?;
        let dbeta = channel_sum(dy)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}
