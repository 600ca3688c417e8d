//! 2-D convolution on CUDA through cuDNN, with what candle's own `cudnn` feature re-does on every
//! call done once: the cuDNN handle is made once per (thread, device), descriptors and the
//! algorithm of each direction once per shape, and the workspace is one buffer per (thread,
//! device) that only grows. Forward, backward-data and backward-filter are three candle custom
//! ops; the forward op's `bwd` runs the other two, so autograd goes through cuDNN both ways.
//!
//! f32, NCHW, groups 1, dilation 1 (what our models use). cuDNN state is thread-local because
//! cudarc's `Cudnn` is neither `Send` nor `Sync`, and because candle's `Device::new_cuda` issues
//! on the per-thread default stream: a handle bound to that stream on thread A must not be used
//! from thread B. Convolutions are strict f32 (FMA math, like candle's cuBLAS GEMMs) unless
//! `DEEPREPAIR_CUDNN_TF32=1` lets cuDNN use TF32 tensor cores (PyTorch's default for convs).

use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionFwdAlgo_t,
    cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor,
    TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static ENABLED: AtomicU8 = AtomicU8::new(UNSET);

/// Whether [`crate::fast_conv`] sends CUDA f32 convolutions here: yes unless the environment has
/// `DEEPREPAIR_CUDNN=0` (read once) or [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("DEEPREPAIR_CUDNN").map_or(true, |v| v.trim() != "0");
            ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Overrides `DEEPREPAIR_CUDNN` for the whole process (tests compare both paths in one run).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// How many convolution shapes this thread has planned, over all devices (tests check with it
/// that a model's convolutions reached cuDNN).
pub fn cached_plan_count() -> usize {
    STATES.with(|states| states.borrow().values().map(|s| s.plans.len()).sum())
}

thread_local! {
    static LAUNCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// cuDNN convolutions (forward, backward-data, backward-filter) launched by this thread.
pub fn launch_count() -> u64 {
    LAUNCHES.with(|n| n.get())
}

/// `DEEPREPAIR_CUDNN_TF32=1`: cuDNN's default math (TF32 tensor cores on Ampere and later);
/// otherwise FMA only, i.e. IEEE f32 products like the CPU path.
fn math_type() -> cudnnMathType_t {
    static TF32: OnceLock<bool> = OnceLock::new();
    let tf32 =
        *TF32.get_or_init(|| std::env::var("DEEPREPAIR_CUDNN_TF32").is_ok_and(|v| v.trim() == "1"));
    if tf32 {
        cudnnMathType_t::CUDNN_DEFAULT_MATH
    } else {
        cudnnMathType_t::CUDNN_FMA_MATH
    }
}

/// `conv2d(x, w)` through cuDNN: `x: [N, C, H, W]`, `w: [K, C, kh, kw]`, both f32 on the same
/// CUDA device; no bias, groups 1, dilation 1. Differentiable in `x` and `w` (through cuDNN).
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (k, cw, kh, kw) = w.dims4()?;
    if cw != c {
        candle_core::bail!(
            "cudnn conv2d: input has {c} channels, kernel {:?}",
            w.dims()
        );
    }
    let shape = ConvShape {
        n,
        c,
        h,
        w: wd,
        k,
        kh,
        kw,
        stride,
        padding,
    };
    shape.check()?;
    // The ops read contiguous buffers (from the layout's start offset).
    x.contiguous()?
        .apply_op2(&w.contiguous()?, ConvForwardOp(shape))
}

/// One convolution's geometry: the key of a cached [`Plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConvShape {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl ConvShape {
    fn check(&self) -> Result<()> {
        if self.stride == 0
            || self.kh == 0
            || self.kw == 0
            || self.h + 2 * self.padding < self.kh
            || self.w + 2 * self.padding < self.kw
        {
            candle_core::bail!("cudnn conv2d: no output for {self:?}");
        }
        for d in [self.n, self.c, self.h, self.w, self.k, self.kh, self.kw] {
            if d == 0 {
                candle_core::bail!("cudnn conv2d: empty dimension in {self:?}");
            }
        }
        // cuDNN's 4-D descriptors take int dimensions and strides.
        let [_, k, ho, wo] = self.output_dims();
        let largest = [
            self.n * self.c * self.h * self.w,
            self.n * k * ho * wo,
            self.k * self.c * self.kh * self.kw,
            self.padding,
            self.stride,
        ];
        if largest.iter().any(|&v| i32::try_from(v).is_err()) {
            candle_core::bail!("cudnn conv2d: too large for 32-bit indexing: {self:?}");
        }
        Ok(())
    }

    /// PyTorch's/cuDNN's output size for dilation 1.
    fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }

    fn input_dims(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    fn weight_dims(&self) -> [usize; 4] {
        [self.k, self.c, self.kh, self.kw]
    }

    fn output_dims(&self) -> [usize; 4] {
        let (ho, wo) = self.out_hw();
        [self.n, self.k, ho, wo]
    }
}

fn i32x4(d: [usize; 4]) -> [i32; 4] {
    // In range: ConvShape::check bounds every tensor's element count.
    d.map(|v| v as i32)
}

pub(crate) fn cudnn_err(what: &str, e: cudarc::cudnn::CudnnError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cudnn {what}: {e:?}"))
}

pub(crate) fn driver_err(what: &str, e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuda {what}: {e:?}"))
}

/// The descriptors of one [`ConvShape`] (the backward directions reuse them: dx is described
/// like x, dw like w, dy like y) and each direction's algorithm with its workspace bytes,
/// chosen the first time that direction runs.
struct Plan {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    forward: Option<(cudnnConvolutionFwdAlgo_t, usize)>,
    backward_data: Option<(cudnnConvolutionBwdDataAlgo_t, usize)>,
    backward_filter: Option<(cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

impl Plan {
    fn new(cudnn: &Arc<Cudnn>, s: ConvShape) -> Result<Plan> {
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let (pad, stride) = (s.padding as i32, s.stride as i32);
        // candle's (and PyTorch's) conv2d is a cross-correlation: the kernel is not flipped.
        let mut conv = cudnn
            .create_conv2d::<f32>(
                [pad, pad],
                [stride, stride],
                [1, 1],
                cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(|e| cudnn_err("convolution descriptor", e))?;
        conv.set_math_type(math_type())
            .map_err(|e| cudnn_err("math type", e))?;
        let x = cudnn
            .create_4d_tensor::<f32>(nchw, i32x4(s.input_dims()))
            .map_err(|e| cudnn_err("input descriptor", e))?;
        // KCRS: [out channels, in channels, kh, kw], candle's weight layout.
        let w = cudnn
            .create_4d_filter::<f32>(nchw, i32x4(s.weight_dims()))
            .map_err(|e| cudnn_err("filter descriptor", e))?;
        let y = cudnn
            .create_4d_tensor::<f32>(nchw, i32x4(s.output_dims()))
            .map_err(|e| cudnn_err("output descriptor", e))?;
        Ok(Plan {
            conv,
            x,
            w,
            y,
            forward: None,
            backward_data: None,
            backward_filter: None,
        })
    }
}

/// One buffer reused by every convolution of a (thread, device); grows, never shrinks.
#[derive(Default)]
struct Workspace(Option<CudaSlice<u8>>);

impl Workspace {
    /// At least `bytes` of scratch (None when nothing is needed).
    fn at_least(
        &mut self,
        stream: &Arc<CudaStream>,
        bytes: usize,
    ) -> Result<Option<&mut CudaSlice<u8>>> {
        if bytes == 0 {
            return Ok(None);
        }
        if self.0.as_ref().is_none_or(|buf| buf.len() < bytes) {
            // Free the old buffer first (stream-ordered, so after the kernels that used it).
            self.0 = None;
            // Whole MiBs, so a run of slightly larger requests does not reallocate each time.
            let rounded = bytes.div_ceil(1 << 20) << 20;
            // Uninitialized is fine: scratch memory.
            let buf = unsafe { stream.alloc::<u8>(rounded) }
                .map_err(|e| driver_err("workspace allocation", e))?;
            self.0 = Some(buf);
        }
        Ok(self.0.as_mut())
    }
}

/// What one thread keeps for one candle CUDA device.
struct DeviceState {
    /// The device's stream, to allocate the workspace on and to notice the device is gone.
    stream: Arc<CudaStream>,
    cudnn: Arc<Cudnn>,
    plans: HashMap<ConvShape, Plan>,
    workspace: Workspace,
}

thread_local! {
    static STATES: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

/// Runs `f` with this thread's plan for `shape` on `dev` and the workspace.
fn with_plan<R>(
    dev: &CudaDevice,
    shape: ConvShape,
    f: impl FnOnce(&mut Plan, &mut Workspace, &Arc<CudaStream>) -> Result<R>,
) -> Result<R> {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        if !states.contains_key(&dev.id()) {
            // Drop the state of devices that no longer exist: nothing but this state (our
            // clone, the handle's, the workspace's) still holds their stream.
            states.retain(|_, s| {
                Arc::strong_count(&s.stream) > 2 + usize::from(s.workspace.0.is_some())
            });
            let stream = dev.cuda_stream();
            let cudnn = Cudnn::new(stream.clone()).map_err(|e| cudnn_err("handle creation", e))?;
            states.insert(
                dev.id(),
                DeviceState {
                    stream,
                    cudnn,
                    plans: HashMap::new(),
                    workspace: Workspace::default(),
                },
            );
        }
        let state = states.get_mut(&dev.id()).expect("inserted above");
        // cuDNN calls go to the current context; another device may have been bound since.
        state
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("bind context", e))?;
        if !state.plans.contains_key(&shape) {
            let plan = Plan::new(&state.cudnn, shape)?;
            state.plans.insert(shape, plan);
        }
        let plan = state.plans.get_mut(&shape).expect("inserted above");
        LAUNCHES.with(|n| n.set(n.get() + 1));
        f(plan, &mut state.workspace, &state.stream)
    })
}

/// The contiguous f32 data of an op argument, from its start offset.
fn f32_view<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let slice = storage.as_cuda_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("cudnn conv2d: {what} is not contiguous"),
    }
}

fn check_dims(layout: &Layout, want: [usize; 4], what: &str) -> Result<()> {
    if layout.dims() != want {
        candle_core::bail!(
            "cudnn conv2d: {what} has shape {:?}, expected {want:?}",
            layout.dims()
        );
    }
    Ok(())
}

/// Output buffer; not zeroed, since every launch uses beta = 0 (overwrite).
fn alloc_output(dev: &CudaDevice, dims: [usize; 4]) -> Result<CudaSlice<f32>> {
    unsafe { dev.alloc::<f32>(dims.iter().product()) }
}

/// The algorithm and workspace bytes cached in `slot`, or, the first time, cuDNN's heuristic
/// choice (`fallback`, an algorithm every configuration supports, if the heuristic's best is
/// unusable) and its workspace size, then cached.
fn chosen_algorithm<A: Copy>(
    slot: &mut Option<(A, usize)>,
    pick: impl FnOnce() -> std::result::Result<A, cudarc::cudnn::CudnnError>,
    fallback: A,
    workspace_size: impl FnOnce(A) -> std::result::Result<usize, cudarc::cudnn::CudnnError>,
    what: &str,
) -> Result<(A, usize)> {
    if let Some(chosen) = *slot {
        return Ok(chosen);
    }
    let algo = pick().unwrap_or(fallback);
    let bytes = workspace_size(algo).map_err(|e| cudnn_err(what, e))?;
    *slot = Some((algo, bytes));
    Ok((algo, bytes))
}

/// `y = conv(x, w)`; arguments `(x, w)`.
struct ConvForwardOp(ConvShape);

impl CustomOp2 for ConvForwardOp {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv2d runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = self.0;
        check_dims(xl, s.input_dims(), "input")?;
        check_dims(wl, s.weight_dims(), "weight")?;
        let x = f32_view(xs, xl, "input")?;
        let w = f32_view(ws, wl, "weight")?;
        let dev = &xs.device;
        let mut y = alloc_output(dev, s.output_dims())?;
        with_plan(dev, s, |plan, workspace, stream| {
            let op = ConvForward {
                conv: &plan.conv,
                x: &plan.x,
                w: &plan.w,
                y: &plan.y,
            };
            let (algo, bytes) = chosen_algorithm(
                &mut plan.forward,
                || op.pick_algorithm(),
                cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                |algo| op.get_workspace_size(algo),
                "forward workspace size",
            )?;
            let scratch = workspace.at_least(stream, bytes)?;
            // Descriptors match the buffers: shapes checked above, all f32 NCHW contiguous.
            unsafe { op.launch(algo, scratch, (1f32, 0f32), &x, &w, &mut y) }
                .map_err(|e| cudnn_err("forward", e))
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from(s.output_dims().to_vec()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // The network's input image needs no gradient: skip the backward-data pass there.
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &ConvBackwardDataOp(self.0))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&dy, &ConvBackwardFilterOp(self.0))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `dx` from `(dy, w)`.
struct ConvBackwardDataOp(ConvShape);

impl CustomOp2 for ConvBackwardDataOp {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-backward-data"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv2d runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        dys: &CudaStorage,
        dyl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = self.0;
        check_dims(dyl, s.output_dims(), "output gradient")?;
        check_dims(wl, s.weight_dims(), "weight")?;
        let dy = f32_view(dys, dyl, "output gradient")?;
        let w = f32_view(ws, wl, "weight")?;
        let dev = &dys.device;
        let mut dx = alloc_output(dev, s.input_dims())?;
        with_plan(dev, s, |plan, workspace, stream| {
            let op = ConvBackwardData {
                conv: &plan.conv,
                dx: &plan.x,
                w: &plan.w,
                dy: &plan.y,
            };
            let (algo, bytes) = chosen_algorithm(
                &mut plan.backward_data,
                || op.pick_algorithm(),
                cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                |algo| op.get_workspace_size(algo),
                "backward-data workspace size",
            )?;
            let scratch = workspace.at_least(stream, bytes)?;
            unsafe { op.launch(algo, scratch, (1f32, 0f32), &mut dx, &w, &dy) }
                .map_err(|e| cudnn_err("backward data", e))
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            Shape::from(s.input_dims().to_vec()),
        ))
    }
}

/// `dw` from `(x, dy)`.
struct ConvBackwardFilterOp(ConvShape);

impl CustomOp2 for ConvBackwardFilterOp {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-backward-filter"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn conv2d runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = self.0;
        check_dims(xl, s.input_dims(), "input")?;
        check_dims(dyl, s.output_dims(), "output gradient")?;
        let x = f32_view(xs, xl, "input")?;
        let dy = f32_view(dys, dyl, "output gradient")?;
        let dev = &xs.device;
        let mut dw = alloc_output(dev, s.weight_dims())?;
        with_plan(dev, s, |plan, workspace, stream| {
            let op = ConvBackwardFilter {
                conv: &plan.conv,
                x: &plan.x,
                dw: &plan.w,
                dy: &plan.y,
            };
            let (algo, bytes) = chosen_algorithm(
                &mut plan.backward_filter,
                || op.pick_algorithm(),
                cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                |algo| op.get_workspace_size(algo),
                "backward-filter workspace size",
            )?;
            let scratch = workspace.at_least(stream, bytes)?;
            // beta = 0: dw is overwritten, not accumulated into (its buffer is uninitialized).
            unsafe { op.launch(algo, scratch, (1f32, 0f32), &x, &mut dw, &dy) }
                .map_err(|e| cudnn_err("backward filter", e))
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(dw, dev.clone()),
            Shape::from(s.weight_dims().to_vec()),
        ))
    }
}
