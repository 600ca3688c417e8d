//! NCCL backend of [`Collective`]: one rank per process (or per thread) and GPU, gradients
//! averaged on the GPU with `ncclAllReduce(…, ncclAvg)` on the candle device's own stream, so
//! the reduction is ordered after the backward kernels that produced the gradients and before
//! the optimizer kernels that read them, without host copies or extra synchronization.
//!
//! Setting up a group: rank 0 creates an [`NcclId`] ([`new_unique_id`]), the launcher hands it
//! to every other rank as a hex string (e.g. through [`NCCL_ID_ENV`]), and every rank calls
//! [`NcclCollective::new`] with its own device, rank and the world size. `new` blocks until all
//! ranks have joined (NCCL's `ncclCommInitRank`).
//!
//! cudarc is used through candle's re-export (`candle_core::cuda_backend::cudarc`), so the
//! `CudaSlice`/`CudaStream` types are the ones candle's tensors hold.

use crate::data_parallel::{Collective, GroupAborted};
use anyhow::{bail, Context};
use candle_core::cuda_backend::cudarc;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::CudaStream;
use cudarc::nccl::{result::NcclError, sys, Comm, Id, ReduceOp};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Environment variable a launcher may use to pass the group's id (hex) to worker processes.
pub const NCCL_ID_ENV: &str = "DEEPREPAIR_NCCL_ID";

/// Size in bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// The id that names one NCCL group: created once (by rank 0) and given to every rank.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

/// Creates a fresh group id (`ncclGetUniqueId`; needs libnccl, not a GPU). Call on one rank
/// only and send the result to the others ([`NcclId::to_hex`] / [`NcclId::from_hex`]).
pub fn new_unique_id() -> anyhow::Result<NcclId> {
    NcclId::new_unique()
}

/// An id from the 128 bytes another rank created.
pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<NcclId> {
    NcclId::from_bytes(bytes)
}

impl NcclId {
    /// See [`new_unique_id`].
    pub fn new_unique() -> anyhow::Result<Self> {
        let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (b, c) in bytes.iter_mut().zip(id.internal().iter()) {
            *b = *c as u8;
        }
        Ok(NcclId(bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        let bytes: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            anyhow::anyhow!(
                "an NCCL id is {NCCL_ID_BYTES} bytes, got {} bytes",
                bytes.len()
            )
        })?;
        Ok(NcclId(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    /// 256 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * NCCL_ID_BYTES);
        for b in self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }

    pub fn from_hex(hex: &str) -> anyhow::Result<Self> {
        let hex = hex.trim();
        if hex.len() != 2 * NCCL_ID_BYTES {
            bail!(
                "an NCCL id is {} hex digits, got {}",
                2 * NCCL_ID_BYTES,
                hex.len()
            );
        }
        let digit = |c: u8| -> anyhow::Result<u8> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => bail!("'{}' is not a hex digit in an NCCL id", c as char),
            }
        };
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            bytes[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(NcclId(bytes))
    }

    /// The id in [`NCCL_ID_ENV`], if set.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        match std::env::var(NCCL_ID_ENV) {
            Ok(s) => Ok(Some(
                Self::from_hex(&s).with_context(|| format!("reading {NCCL_ID_ENV}"))?,
            )),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {NCCL_ID_ENV}")),
        }
    }

    fn to_cudarc(self) -> Id {
        let mut internal = [0 as std::ffi::c_char; NCCL_ID_BYTES];
        for (c, b) in internal.iter_mut().zip(self.0) {
            *c = b as std::ffi::c_char;
        }
        Id::uninit(internal)
    }
}

impl fmt::Display for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclId({}…)", &self.to_hex()[..16])
    }
}

impl FromStr for NcclId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::from_hex(s)
    }
}

/// NCCL's own words for an error (cudarc's `NcclError` prints only "NcclError").
fn nccl_error(call: &str, e: NcclError) -> anyhow::Error {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated static (or thread-local) strings.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: both take no pointer we own; a null comm asks for this thread's last error.
    let (what, last) = unsafe {
        (
            text(sys::ncclGetErrorString(e.0)),
            text(sys::ncclGetLastError(std::ptr::null_mut())),
        )
    };
    if last.is_empty() {
        anyhow::anyhow!("{call} failed: {:?} ({what})", e.0)
    } else {
        anyhow::anyhow!("{call} failed: {:?} ({what}): {last}", e.0)
    }
}

/// The installed NCCL's version, e.g. 22703 for 2.27.3.
pub fn nccl_version() -> anyhow::Result<i32> {
    cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e))
}

/// One rank of an NCCL group, bound to one candle CUDA device (and its stream).
pub struct NcclCollective {
    /// `None` once [`Collective::abort`]ed (dropping a `Comm` is `ncclCommAbort`).
    comm: Option<Comm>,
    rank: usize,
    world: usize,
    device: CudaDevice,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator is not thread-safe but may be used from any thread as long as
// calls on it do not overlap. Every operation here takes `&mut self`, so calls are serialized;
// `Comm` is `!Send` only because it holds a raw `ncclComm_t`. Each operation binds the CUDA
// context to the calling thread first.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins group `id` as `rank` of `world` on `device`, communicating on the device's stream.
    /// Blocks until every rank has called this.
    pub fn new(device: &CudaDevice, rank: usize, world: usize, id: NcclId) -> anyhow::Result<Self> {
        if world == 0 || rank >= world {
            bail!("NCCL rank {rank} outside a world of {world}");
        }
        let stream = device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context before ncclCommInitRank")?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id.to_cudarc())
            .map_err(|e| nccl_error("ncclCommInitRank", e))
            .with_context(|| {
                format!(
                    "joining an NCCL group as rank {rank} of {world} on GPU {}",
                    stream.context().ordinal()
                )
            })?;
        Ok(NcclCollective {
            comm: Some(comm),
            rank,
            world,
            device: device.clone(),
            stream,
        })
    }

    /// [`NcclCollective::new`] on a candle `Device` (must be a CUDA one).
    pub fn on_device(
        device: &Device,
        rank: usize,
        world: usize,
        id: NcclId,
    ) -> anyhow::Result<Self> {
        match device {
            Device::Cuda(d) => Self::new(d, rank, world, id),
            other => bail!("the NCCL backend needs a CUDA device, got {other:?}"),
        }
    }

    /// Opens CUDA device `ordinal` (candle's default per-thread stream) and joins the group.
    /// Returns the device too, so the caller puts its model on the same device and stream.
    ///
    /// With candle's per-thread default stream, NCCL's work is ordered with the kernels of the
    /// thread that calls the collective: call it from the thread that runs the model (or open
    /// the device with `Device::new_cuda_with_stream` and pass it to [`NcclCollective::new`]).
    pub fn for_ordinal(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: NcclId,
    ) -> anyhow::Result<(Self, Device)> {
        let device = Device::new_cuda(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
        let collective = Self::on_device(&device, rank, world, id)?;
        Ok((collective, device))
    }

    /// The candle device this rank reduces on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    pub fn ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// The communicator, or [`GroupAborted`] after [`Collective::abort`].
    fn comm(&self) -> anyhow::Result<&Comm> {
        self.comm.as_ref().ok_or_else(|| GroupAborted.into())
    }

    fn bind(&self) -> anyhow::Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context")
    }

    fn check_same_gpu(&self, t: &Tensor) -> anyhow::Result<()> {
        match t.device() {
            Device::Cuda(d) if d.cuda_stream().context().ordinal() == self.ordinal() => Ok(()),
            other => bail!(
                "NCCL rank {} lives on GPU {}, but the tensor is on {other:?}",
                self.rank(),
                self.ordinal()
            ),
        }
    }

    /// Applies `op` to the contiguous f32 data of `flat` (any shape), writing into a fresh
    /// device buffer of the same length, and wraps that buffer as a tensor of `flat`'s shape.
    fn reduce_into_new(
        &self,
        flat: &Tensor,
        op: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaView<'_, f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> Result<(), NcclError>,
        call: &str,
    ) -> anyhow::Result<Tensor> {
        self.check_same_gpu(flat)?;
        if flat.dtype() != DType::F32 {
            let dtype = flat.dtype();
            let out = self.reduce_into_new(&flat.to_dtype(DType::F32)?, op, call)?;
            return Ok(out.to_dtype(dtype)?);
        }
        if !flat.is_contiguous() {
            return self.reduce_into_new(&flat.contiguous()?, op, call);
        }
        let n = flat.elem_count();
        if n == 0 {
            return Ok(flat.clone());
        }
        self.bind()?;
        let out = {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else {
                bail!("NCCL reduction of a tensor whose storage is not CUDA");
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("NCCL reduction of a non-contiguous tensor");
            };
            let src = cuda.as_cuda_slice::<f32>()?.slice(start..end);
            // SAFETY: NCCL writes every one of the `n` elements before anything reads them
            // (both on this stream).
            let mut dst = unsafe { self.stream.alloc::<f32>(n) }.context("allocating")?;
            op(self.comm()?, &src, &mut dst).map_err(|e| nccl_error(call, e))?;
            dst
        };
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            flat.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }

    /// The element-wise sum over ranks, on the GPU.
    pub fn all_reduce_sum_tensor(&mut self, t: &Tensor) -> anyhow::Result<Tensor> {
        self.reduce_into_new(
            t,
            |comm, src, dst| comm.all_reduce(src, dst, &ReduceOp::Sum).map(|_| ()),
            "ncclAllReduce(sum)",
        )
    }

    /// Rank `root`'s `t` on every rank (every rank passes a tensor of the same shape), on the GPU.
    pub fn broadcast_tensor(&mut self, t: &Tensor, root: usize) -> anyhow::Result<Tensor> {
        self.check_root(root)?;
        let is_root = self.rank() == root;
        self.reduce_into_new(
            t,
            move |comm, src, dst| {
                // Every rank sends its own buffer; NCCL reads only the root's.
                let send = if is_root { Some(src) } else { None };
                comm.broadcast(send, dst, root as i32).map(|_| ())
            },
            "ncclBroadcast",
        )
    }

    /// Makes every rank's variables equal to rank 0's, on the GPU (the device counterpart of
    /// [`crate::data_parallel::broadcast_weights`]).
    pub fn broadcast_vars(&mut self, vars: &[candle_core::Var]) -> anyhow::Result<()> {
        for var in vars {
            let t = self.broadcast_tensor(var.as_tensor(), 0)?;
            var.set(&t)?;
        }
        Ok(())
    }

    fn check_root(&self, root: usize) -> anyhow::Result<()> {
        if root >= self.world_size() {
            bail!(
                "broadcast root {root} outside a world of {}",
                self.world_size()
            );
        }
        Ok(())
    }

    /// Waits until every operation queued on this rank's stream has finished.
    pub fn synchronize(&self) -> anyhow::Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .context("synchronizing the stream")
    }

    /// Copies `buffer` to the GPU, runs `op` in place there, and copies the result back.
    fn host_round_trip(
        &mut self,
        buffer: &mut [f32],
        op: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<f32>) -> Result<(), NcclError>,
        call: &str,
    ) -> anyhow::Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut dev = self
            .stream
            .clone_htod(&*buffer)
            .context("copying a buffer to the GPU")?;
        op(self.comm()?, &mut dev).map_err(|e| nccl_error(call, e))?;
        self.stream
            .memcpy_dtoh(&dev, buffer)
            .context("copying a buffer back from the GPU")?;
        self.stream
            .synchronize()
            .context("synchronizing the stream")
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> anyhow::Result<()> {
        self.host_round_trip(
            buffer,
            |comm, dev| comm.all_reduce_in_place(dev, &ReduceOp::Avg).map(|_| ()),
            "ncclAllReduce(avg)",
        )
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> anyhow::Result<()> {
        self.check_root(root)?;
        self.host_round_trip(
            buffer,
            |comm, dev| comm.broadcast_in_place(dev, root as i32).map(|_| ()),
            "ncclBroadcast",
        )
    }

    /// On the GPU, on the device's stream: no host copy, no synchronization.
    fn all_reduce_mean_tensor(&mut self, flat: &Tensor) -> anyhow::Result<Tensor> {
        if !flat.device().is_cuda() {
            // A CPU tensor (not the intended use): through host memory.
            let mut host = flat.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.all_reduce_mean(&mut host)?;
            return Ok(Tensor::from_vec(host, flat.shape(), flat.device())?.to_dtype(flat.dtype())?);
        }
        self.reduce_into_new(
            flat,
            |comm, src, dst| comm.all_reduce(src, dst, &ReduceOp::Avg).map(|_| ()),
            "ncclAllReduce(avg)",
        )
    }

    /// Aborts this rank's communicator (`ncclCommAbort`, which also ends NCCL kernels of this
    /// rank still waiting for peers); later collectives on this rank return [`GroupAborted`].
    /// Other processes' ranks learn of it only through NCCL's own error detection (or their
    /// launcher's timeout): NCCL has no cross-process abort broadcast.
    fn abort(&mut self) {
        if let Some(comm) = self.comm.take() {
            let _ = self.stream.context().bind_to_thread();
            drop(comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_parallel::{all_reduce_gradients, DEFAULT_BUCKET_BYTES};
    use candle_core::Var;

    #[test]
    fn ids_round_trip_through_hex_and_bytes() {
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 + 200) as u8;
        }
        let id = from_bytes(&bytes).unwrap();
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        assert_eq!(NcclId::from_hex(&hex).unwrap(), id);
        assert_eq!(hex.to_uppercase().parse::<NcclId>().unwrap(), id);
        assert_eq!(id.as_bytes(), &bytes);
        assert!(from_bytes(&bytes[..127]).is_err());
        assert!(NcclId::from_hex(&hex[..254]).is_err());
        assert!(NcclId::from_hex(&format!("zz{}", &hex[2..])).is_err());
        // The conversion to NCCL's c_char array and back is lossless.
        let back = id.to_cudarc();
        let round: Vec<u8> = back.internal().iter().map(|c| *c as u8).collect();
        assert_eq!(round, bytes.to_vec());
    }

    fn single_rank() -> (NcclCollective, Device) {
        let id = new_unique_id().expect("ncclGetUniqueId");
        NcclCollective::for_ordinal(0, 0, 1, id).expect("a world of one on GPU 0")
    }

    #[test]
    #[ignore = "needs a CUDA GPU: cargo test -p deeprepair-workers --features nccl -- --ignored"]
    fn world_of_one_all_reduce_returns_the_tensor() {
        eprintln!("NCCL version {}", nccl_version().unwrap());
        let (mut c, device) = single_rank();
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 11.0).collect();
        let t = Tensor::from_vec(values.clone(), 1000, &device).unwrap();
        let r = c.all_reduce_mean_tensor(&t).unwrap();
        assert!(r.device().is_cuda());
        assert_eq!(r.to_vec1::<f32>().unwrap(), values);
        // A strided (non-contiguous, offset) view of a 2-D tensor.
        let m = Tensor::from_vec(values.clone(), (20, 50), &device).unwrap();
        let view = m.narrow(1, 3, 10).unwrap().t().unwrap();
        let r = c.all_reduce_mean_tensor(&view).unwrap();
        assert_eq!(r.dims(), &[10, 20]);
        assert_eq!(r.to_vec2::<f32>().unwrap(), view.to_vec2::<f32>().unwrap());
        let s = c.all_reduce_sum_tensor(&t).unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), values);
        // Host buffers.
        let mut host = values.clone();
        c.all_reduce_mean(&mut host).unwrap();
        assert_eq!(host, values);
        // bf16 goes through f32 and comes back as bf16.
        let b = t.to_dtype(DType::BF16).unwrap();
        let rb = c.all_reduce_mean_tensor(&b).unwrap();
        assert_eq!(rb.dtype(), DType::BF16);
        assert_eq!(
            rb.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    #[ignore = "needs a CUDA GPU: cargo test -p deeprepair-workers --features nccl -- --ignored"]
    fn world_of_one_broadcast() {
        let (mut c, device) = single_rank();
        let mut host = vec![1.5f32, -2.0, 3.25];
        c.broadcast(&mut host, 0).unwrap();
        assert_eq!(host, vec![1.5, -2.0, 3.25]);
        assert!(c.broadcast(&mut host, 1).is_err());
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &device).unwrap();
        let b = c.broadcast_tensor(&t, 0).unwrap();
        assert_eq!(
            b.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        let var = Var::from_tensor(&t).unwrap();
        c.broadcast_vars(std::slice::from_ref(&var)).unwrap();
        assert_eq!(
            var.as_tensor().to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        // After an abort (ncclCommAbort) every collective says the group failed.
        c.abort();
        c.abort();
        let err = c.all_reduce_mean(&mut host).unwrap_err();
        assert!(crate::data_parallel::is_group_aborted(&err), "{err:#}");
        assert!(crate::data_parallel::is_group_aborted(
            &c.all_reduce_mean_tensor(&t).unwrap_err()
        ));
    }

    #[test]
    #[ignore = "needs a CUDA GPU: cargo test -p deeprepair-workers --features nccl -- --ignored"]
    fn world_of_one_gradient_averaging_is_a_no_op() {
        let (mut c, device) = single_rank();
        let w = Var::from_tensor(
            &Tensor::arange(0f32, 12., &device)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(&Tensor::ones(4, DType::F32, &device).unwrap()).unwrap();
        let x = Tensor::new(&[[1f32, -1., 2.]], &device).unwrap();
        let loss = x
            .matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let before: Vec<Vec<f32>> = [&w, &b]
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let vars = vec![w.clone(), b.clone()];
        all_reduce_gradients(&mut c, &vars, &mut grads, DEFAULT_BUCKET_BYTES).unwrap();
        // all_reduce_gradients skips a world of one; reduce a bucket through NCCL too.
        let flat = Tensor::cat(
            &[
                grads.get(w.as_tensor()).unwrap().flatten_all().unwrap(),
                grads.get(b.as_tensor()).unwrap().flatten_all().unwrap(),
            ],
            0,
        )
        .unwrap();
        let reduced = c
            .all_reduce_mean_tensor(&flat)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let after: Vec<Vec<f32>> = [&w, &b]
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        assert_eq!(before, after);
        assert_eq!(reduced, before.concat());
    }

    /// Runs `world` ranks as threads, rank r on GPU `ordinals[r]`, each averaging gradients
    /// that differ by rank; returns what each rank got, or NCCL's refusal.
    fn threads_average(ordinals: Vec<usize>) -> Vec<anyhow::Result<Vec<f32>>> {
        let world = ordinals.len();
        let id = new_unique_id().expect("ncclGetUniqueId");
        let handles: Vec<_> = ordinals
            .into_iter()
            .enumerate()
            .map(|(rank, ordinal)| {
                std::thread::spawn(move || -> anyhow::Result<Vec<f32>> {
                    // Its own stream, so two ranks on one GPU do not share candle's
                    // per-thread default stream semantics by accident.
                    let device = Device::new_cuda_with_stream(ordinal)?;
                    let mut c = NcclCollective::on_device(&device, rank, world, id)?;
                    let w = Var::from_tensor(&Tensor::zeros(5, DType::F32, &device)?)?;
                    let v = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &device)?)?;
                    // d/dw of sum(w * g) = g: gradient of w is (rank+1)·[1..5], of v rank·1.
                    let gw = Tensor::arange(1f32, 6., &device)?.affine(rank as f64 + 1., 0.)?;
                    let gv = Tensor::ones((2, 3), DType::F32, &device)?.affine(rank as f64, 0.)?;
                    let loss = (w.as_tensor().mul(&gw)?.sum_all()?
                        + v.as_tensor().mul(&gv)?.sum_all()?)?;
                    let mut grads = loss.backward()?;
                    let vars = vec![w.clone(), v.clone()];
                    all_reduce_gradients(&mut c, &vars, &mut grads, 16)?;
                    let mut out: Vec<f32> = grads.get(w.as_tensor()).unwrap().to_vec1::<f32>()?;
                    out.extend(
                        grads
                            .get(v.as_tensor())
                            .unwrap()
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    );
                    let mut host = vec![rank as f32; 3];
                    c.broadcast(&mut host, world - 1)?;
                    anyhow::ensure!(host == vec![(world - 1) as f32; 3], "broadcast: {host:?}");
                    Ok(out)
                })
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("rank thread panicked")))
                })
                .collect();
            let _ = tx.send(results);
        });
        rx.recv_timeout(std::time::Duration::from_secs(120))
            .expect("NCCL ranks did not finish within 120 s (hung in init or all-reduce)")
    }

    fn expected_average(world: usize) -> Vec<f32> {
        let mean_scale = (1..=world).sum::<usize>() as f32 / world as f32;
        let mean_rank = (0..world).sum::<usize>() as f32 / world as f32;
        let mut e: Vec<f32> = (1..=5).map(|i| i as f32 * mean_scale).collect();
        e.extend(std::iter::repeat_n(mean_rank, 6));
        e
    }

    #[test]
    #[ignore = "needs a CUDA GPU: cargo test -p deeprepair-workers --features nccl -- --ignored"]
    fn two_ranks_on_one_gpu_as_threads() {
        let results = threads_average(vec![0, 0]);
        let refused: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
            .collect();
        if refused.is_empty() {
            eprintln!("NCCL accepted two ranks on one GPU; averages checked");
            for r in results {
                assert_eq!(r.unwrap(), expected_average(2));
            }
        } else {
            // NCCL (≥ 2.x) refuses two ranks of one communicator on the same GPU with
            // ncclInvalidUsage "Duplicate GPU detected"; any other failure is a real error.
            eprintln!("NCCL refused two ranks on one GPU: {refused:?}");
            assert!(
                refused
                    .iter()
                    .all(|e| e.contains("Duplicate GPU") || e.contains("ncclInvalidUsage")),
                "unexpected NCCL failure with two ranks on one GPU: {refused:?}"
            );
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU: cargo test -p deeprepair-workers --features nccl -- --ignored"]
    fn one_rank_per_gpu_on_every_gpu() {
        let count = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
        if count < 2 {
            eprintln!("only {count} GPU(s): the one-rank-per-GPU average is not exercised");
            return;
        }
        for r in threads_average((0..count).collect()) {
            assert_eq!(r.unwrap(), expected_average(count));
        }
    }
}
