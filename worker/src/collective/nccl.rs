//! NCCL between GPU ranks (feature `cuda`), through cudarc's raw `nccl` bindings.
//!
//! * Rank 0 of a generation calls [`unique_id`] in its own process and ships the 128 bytes
//!   through the coordinator; every rank of the assignment then calls
//!   [`NcclCollective::connect`] with them. One communicator per generation and per device
//!   thread: `ncclComm_t` is not `Send`, and a communicator that saw an error or an abort is
//!   never reused.
//! * The communicator is non-blocking (`ncclConfig_t.blocking = 0`), and every wait, for the
//!   init and for a collective to finish on its stream, is a poll that also watches the
//!   [`AbortHandle`] and the timeout. On either, `ncclCommAbort` tears the communicator down, so
//!   a dead peer never leaves a rank hung inside NCCL: the call returns within a millisecond or
//!   so of the abort.
//! * [`NcclCollective::all_reduce_mean_tensor`] reduces a Burn CUDA tensor in place, zero-copy:
//!   its `CubeTensor` handle resolves to the `CUdeviceptr` of the buffer (cubecl-cuda runs in
//!   the device's primary context, the one `CudaContext::new` retains, so the pointer is valid
//!   here). The order is: drain cubecl's queue (`Backend::sync`), run NCCL on its own stream,
//!   wait for that stream (polling, for the abort); then cubecl's next kernels read the reduced
//!   values. Two host waits per step, each short when the step is long. (The patched
//!   cubecl-cuda exposes cubecl's stream, `GpuResource::stream`, which cuBLAS queues on; NCCL
//!   keeps its own stream so that a hung peer can be aborted without touching cubecl's.)
//! * ZeRO (`training.zero_stage` 1 and 2): the reduce-scatter, stage 2's bucket reduce and the
//!   all-gather on the same flat buffers, in place, with the same polling, abort and timeout
//!   (`nccl/zero.rs`).
//! * The [`Collective`] impl (host buffers) stages through one device buffer: for tests and
//!   for callers that hold gradients on the host (the gradient norm's partial sums under ZeRO).
//!
//! cudarc panics when libnccl cannot be loaded, so every entry point checks first; cudarc looks
//! for `libnccl.so`, which NVIDIA's PyPI wheels don't ship (see `crate::device::nccl_library`).

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use cudarc::driver::{sys as cu, CudaContext, CudaStream};
use cudarc::nccl::sys as nccl;

mod zero;

pub use zero::Wire;

use super::{AbortHandle, Collective, CollectiveError};
use crate::Gpu;

/// The bytes of an `ncclUniqueId`: what the coordinator ships from rank 0 to every rank.
pub type NcclId = [u8; 128];

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default" for an int field of `ncclConfig_t`.
const UNDEF_INT: i32 = i32::MIN;
/// `NCCL_VERSION(2, 14, 0)`: the `ncclConfig_t` fields set below all exist since NCCL 2.14, and
/// NCCL reads only the fields of the version a config says it is, so the struct's newer fields
/// (whose layout depends on the NCCL version cudarc was generated for) are never read.
const CONFIG_VERSION: u32 = 21_400;
const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// Whether libnccl can be loaded (cudarc would panic otherwise).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { nccl::is_culib_present() }
}

fn require_library() -> Result<(), CollectiveError> {
    if available() {
        Ok(())
    } else {
        Err(CollectiveError::Nccl(
            "libnccl.so cannot be loaded: install NCCL, or point DAPT_NCCL_LIB at \
             libnccl.so.2 (the nvidia-nccl-cu12/-cu13 wheels ship it under nvidia/nccl/lib)"
                .into(),
        ))
    }
}

fn check(what: &str, r: nccl::ncclResult_t) -> Result<(), CollectiveError> {
    match r {
        nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(CollectiveError::Nccl(format!("{what}: {e:?}"))),
    }
}

/// A new unique id. Call it in rank 0's own process (NCCL binds it to this host's bootstrap).
pub fn unique_id() -> Result<NcclId, CollectiveError> {
    require_library()?;
    let mut id = std::mem::MaybeUninit::<nccl::ncclUniqueId>::uninit();
    // SAFETY: NCCL fills the id.
    check("ncclGetUniqueId", unsafe {
        nccl::ncclGetUniqueId(id.as_mut_ptr())
    })?;
    // SAFETY: initialised by the successful call above.
    let id = unsafe { id.assume_init() };
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's place in a generation's communicator.
#[derive(Debug, Clone)]
pub struct NcclConfig {
    pub rank: usize,
    pub world: usize,
    pub id: NcclId,
    /// CUDA device ordinal of this rank's GPU.
    pub ordinal: usize,
    /// Longest wait for progress (init, or one collective) before giving up.
    pub timeout: Duration,
}

/// One rank's NCCL communicator for one generation.
pub struct NcclCollective {
    comm: nccl::ncclComm_t,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    rank: usize,
    world: usize,
    timeout: Duration,
    abort: AbortHandle,
    poisoned: bool,
    /// Device buffer for the host-staged [`Collective`] impl, grown on demand.
    staging: Option<cudarc::driver::CudaSlice<f32>>,
}

impl NcclCollective {
    /// Joins the communicator of `cfg.id`; returns when every rank has joined, or with an error
    /// on timeout or abort.
    pub fn connect(cfg: NcclConfig, abort: AbortHandle) -> Result<Self, CollectiveError> {
        require_library()?;
        if cfg.rank >= cfg.world {
            return Err(CollectiveError::Config(format!(
                "rank {} of a world of {}",
                cfg.rank, cfg.world
            )));
        }
        let driver = |what: &str, e: cudarc::driver::DriverError| {
            CollectiveError::Nccl(format!("{what} (cuda:{}): {e}", cfg.ordinal))
        };
        let ctx = CudaContext::new(cfg.ordinal).map_err(|e| driver("context", e))?;
        let stream = ctx.new_stream().map_err(|e| driver("stream", e))?;
        let id = nccl::ncclUniqueId {
            internal: cfg.id.map(|b| b as c_char),
        };
        // SAFETY: a zeroed config with the header and the 2.14 fields set, as
        // NCCL_CONFIG_INITIALIZER does (see CONFIG_VERSION).
        let mut config: nccl::ncclConfig_t = unsafe { std::mem::zeroed() };
        config.size = std::mem::size_of::<nccl::ncclConfig_t>();
        config.magic = CONFIG_MAGIC;
        config.version = CONFIG_VERSION;
        config.blocking = 0;
        config.cgaClusterSize = UNDEF_INT;
        config.minCTAs = UNDEF_INT;
        config.maxCTAs = UNDEF_INT;
        config.splitShare = UNDEF_INT;
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; the id is 128 bytes from rank 0.
        let r = unsafe {
            nccl::ncclCommInitRankConfig(
                &mut comm,
                cfg.world as i32,
                id,
                cfg.rank as i32,
                &mut config,
            )
        };
        let mut this = NcclCollective {
            comm,
            stream,
            ctx,
            rank: cfg.rank,
            world: cfg.world,
            timeout: cfg.timeout,
            abort,
            poisoned: false,
            staging: None,
        };
        check("ncclCommInitRankConfig", r)?;
        this.wait_async("ncclCommInitRankConfig")?;
        tracing::debug!(
            rank = this.rank,
            world = this.world,
            "nccl communicator ready"
        );
        Ok(this)
    }

    /// In-place mean of `count` f32 values at device address `ptr` across the ranks.
    ///
    /// # Safety
    /// `ptr` must address `count` f32s of device memory in this context that nothing else reads
    /// or writes until this returns.
    pub unsafe fn all_reduce_mean_raw(
        &mut self,
        ptr: cu::CUdeviceptr,
        count: usize,
    ) -> Result<(), CollectiveError> {
        let buf = ptr as *mut c_void;
        self.run("ncclAllReduce", |comm, stream| {
            // SAFETY: the caller vouches for the buffer; comm and stream are live.
            check("ncclAllReduce", unsafe {
                nccl::ncclAllReduce(
                    buf as *const c_void,
                    buf,
                    count,
                    nccl::ncclDataType_t::ncclFloat32,
                    nccl::ncclRedOp_t::ncclAvg,
                    comm,
                    stream,
                )
            })
        })
    }

    /// Issues `call`'s NCCL operations on this communicator and its stream, then waits for them
    /// (polling, under the abort handle and the timeout). A failure poisons the communicator.
    fn run(
        &mut self,
        what: &str,
        call: impl FnOnce(nccl::ncclComm_t, nccl::cudaStream_t) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        self.usable()?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| CollectiveError::Nccl(format!("bind context: {e}")))?;
        if let Err(e) = call(self.comm, self.stream.cu_stream() as _) {
            self.poisoned = true;
            return Err(e);
        }
        self.wait_async(what)?;
        self.wait_stream(what)
    }

    /// In-place mean of a flat f32 CUDA tensor across the ranks, without leaving the device.
    pub fn all_reduce_mean_tensor(
        &mut self,
        grads: Tensor<Gpu, 1>,
    ) -> Result<Tensor<Gpu, 1>, CollectiveError> {
        f32_only("all-reduce", &grads)?;
        self.on_device(grads, |nccl, ptr, count, _| {
            // SAFETY: as `on_device` promises.
            unsafe { nccl.all_reduce_mean_raw(ptr, count) }
        })
    }

    /// Runs `op` on the device address, length and element type of the flat `t` (f32 or
    /// bf16), in place, and returns the tensor. `op` gets a contiguous, uniquely owned buffer
    /// (a private copy of a view or of a shared buffer: never written through) that cubecl has
    /// finished writing, alive until `op` returns.
    fn on_device(
        &mut self,
        t: Tensor<Gpu, 1>,
        op: impl FnOnce(&mut Self, cu::CUdeviceptr, usize, Wire) -> Result<(), CollectiveError>,
    ) -> Result<Tensor<Gpu, 1>, CollectiveError> {
        let wire = Wire::of(t.dtype()).ok_or_else(|| {
            CollectiveError::Config(format!(
                "a collective over a {:?} tensor: f32 or bf16 only",
                t.dtype()
            ))
        })?;
        let device = t.device();
        // Never write into a view or a shared buffer: work on a private copy.
        let prim = crate::fused::kernels::private(t.into_primitive().tensor());
        let count = prim.meta.shape().num_elements();
        // Everything cubecl queued (the kernels writing this buffer) must finish first.
        Gpu::sync(&device).map_err(|e| CollectiveError::Nccl(format!("device sync: {e:?}")))?;
        let resource = prim
            .client
            .get_resource(prim.handle.clone())
            .map_err(|e| CollectiveError::Nccl(format!("device pointer: {e:?}")))?;
        let (ptr, size) = (resource.resource().ptr, resource.resource().size);
        if (size as usize) < count * wire.bytes() {
            return Err(CollectiveError::Config(format!(
                "device buffer of {size} bytes for {count} {wire:?} elements"
            )));
        }
        op(self, ptr, count, wire)?;
        drop(resource);
        Ok(Tensor::from_primitive(TensorPrimitive::Float(prim)))
    }

    fn usable(&self) -> Result<(), CollectiveError> {
        if self.abort.is_aborted() {
            Err(CollectiveError::Aborted)
        } else if self.poisoned {
            Err(CollectiveError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Polls until NCCL's pending operation on the communicator is issued (non-blocking mode).
    fn wait_async(&mut self, what: &str) -> Result<(), CollectiveError> {
        self.poll(what, |comm| {
            let mut state = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: live communicator, valid out-pointer.
            let r = unsafe { nccl::ncclCommGetAsyncError(comm, &mut state) };
            if r != nccl::ncclResult_t::ncclSuccess {
                return Err(format!("ncclCommGetAsyncError: {r:?}"));
            }
            match state {
                nccl::ncclResult_t::ncclSuccess => Ok(true),
                nccl::ncclResult_t::ncclInProgress => Ok(false),
                e => Err(format!("{e:?}")),
            }
        })
    }

    /// Polls until the NCCL stream is idle, watching for asynchronous NCCL errors meanwhile.
    fn wait_stream(&mut self, what: &str) -> Result<(), CollectiveError> {
        let stream = self.stream.cu_stream();
        self.poll(what, |comm| {
            // SAFETY: a live stream of the bound context.
            match unsafe { cu::cuStreamQuery(stream) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(true),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(format!("cuStreamQuery: {e:?}")),
            }
            let mut state = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: live communicator, valid out-pointer.
            unsafe { nccl::ncclCommGetAsyncError(comm, &mut state) };
            match state {
                nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => Ok(false),
                e => Err(format!("{e:?}")),
            }
        })
    }

    /// Calls `done` until it says so, spinning briefly and then sleeping; an error, the abort
    /// flag or the timeout poison the communicator (it is aborted on drop).
    fn poll(
        &mut self,
        what: &str,
        mut done: impl FnMut(nccl::ncclComm_t) -> Result<bool, String>,
    ) -> Result<(), CollectiveError> {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            match done(self.comm) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.poisoned = true;
                    return Err(CollectiveError::Nccl(format!("{what}: {e}")));
                }
            }
            if self.abort.is_aborted() {
                self.poisoned = true;
                return Err(CollectiveError::Aborted);
            }
            if started.elapsed() > self.timeout {
                self.poisoned = true;
                return Err(CollectiveError::Stalled {
                    waited: started.elapsed(),
                });
            }
            // Latency matters for short collectives: spin for the first ~10k polls.
            if spins < 10_000 {
                spins += 1;
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // Abort rather than finalize: it never waits for peers, which may be gone.
            // SAFETY: the communicator is live and dropped once.
            let r = unsafe { nccl::ncclCommAbort(self.comm) };
            if r != nccl::ncclResult_t::ncclSuccess {
                tracing::warn!(rank = self.rank, result = ?r, "ncclCommAbort failed");
            }
            self.comm = std::ptr::null_mut();
        }
    }
}

/// Refuses a reduction over anything but f32 (the gradients are f32).
fn f32_only(what: &str, t: &Tensor<Gpu, 1>) -> Result<(), CollectiveError> {
    if t.dtype() == DType::F32 {
        Ok(())
    } else {
        Err(CollectiveError::Config(format!(
            "{what} of a {:?} tensor: f32 only",
            t.dtype()
        )))
    }
}

impl NcclCollective {
    /// Runs `op` on a device copy of the host `buf` (one staging buffer, grown on demand) and
    /// copies the result back.
    fn staged(
        &mut self,
        buf: &mut [f32],
        op: impl FnOnce(&mut Self, cu::CUdeviceptr, usize) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        self.usable()?;
        let copy_err = |e: cudarc::driver::DriverError| CollectiveError::Nccl(format!("copy: {e}"));
        if self.staging.as_ref().is_none_or(|s| s.len() < buf.len()) {
            self.staging = Some(
                self.stream
                    .alloc_zeros::<f32>(buf.len())
                    .map_err(copy_err)?,
            );
        }
        let staging = self.staging.as_mut().expect("allocated above");
        let mut view = staging.slice_mut(0..buf.len());
        self.stream.memcpy_htod(buf, &mut view).map_err(copy_err)?;
        let ptr = {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _sync) = view.device_ptr_mut(&self.stream);
            ptr
        };
        self.stream.synchronize().map_err(copy_err)?;
        op(self, ptr, buf.len())?;
        let staging = self.staging.as_ref().expect("allocated above");
        self.stream
            .memcpy_dtoh(&staging.slice(0..buf.len()), buf)
            .map_err(copy_err)?;
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Host buffers travel through one device buffer (two copies per call).
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        // SAFETY: `staging` holds `buf.len()` f32s on this stream's context, used by nothing else.
        self.staged(buf, |nccl, ptr, count| unsafe {
            nccl.all_reduce_mean_raw(ptr, count)
        })
    }

    fn reduce_scatter_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        // SAFETY: as in `all_reduce_mean`.
        self.staged(buf, |nccl, ptr, count| unsafe {
            nccl.reduce_scatter_mean_raw(ptr, count)
        })
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        // SAFETY: as in `all_reduce_mean`.
        self.staged(buf, |nccl, ptr, count| unsafe {
            nccl.all_gather_raw(ptr, count, Wire::F32)
        })
    }
}
