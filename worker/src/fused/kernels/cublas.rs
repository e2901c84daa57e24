//! The matmul op by NVIDIA's cuBLAS (`DAPT_MATMUL=cublas`, feature `cuda`): the GEMM library
//! PyTorch's matmuls run on, through cudarc's `cublas` bindings (loaded at run time, as NCCL).
//!
//! `cublasGemmStridedBatchedEx` with f32 accumulation (`CUBLAS_COMPUTE_32F`; TF32 tensor cores
//! for f32 inputs, as Burn's f32 matmuls) reads the operands in place, row-major or
//! transposed views, batched ([`crate::fused::gemm`]), and writes a new contiguous output that
//! cubecl allocated. The GEMM is queued on cubecl's own CUDA stream, the one that holds the
//! output's memory (exposed by the workspace's patched cubecl-cuda,
//! `vendor/cubecl-cuda/PATCHED.md`), in order with cubecl's kernels before and after it: no
//! host wait, as PyTorch queues cuBLAS on its current stream. A problem cuBLAS cannot take in
//! place, a missing `libcublas`, or a cuBLAS error is an `Err`, and the caller
//! (`kernels::matmul`) runs Burn's matmul instead.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::sys as cb;
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::CudaContext;

use super::output;
use crate::fused::gemm::column_major_gemm;

/// One cuBLAS handle per device, per thread (a handle is not to be shared between threads that
/// use it at once), with the stream it was last set to.
struct Cublas {
    handle: cb::cublasHandle_t,
    stream: CUstream,
    /// The handle's own workspace, [`WORKSPACE_BYTES`] of device memory outside CubeCL's
    /// pools; None where it could not be allocated (cuBLAS's default pool then).
    workspace: Option<CUdeviceptr>,
    ctx: Arc<CudaContext>,
}

/// cuBLAS's workspace per handle: 32 MiB, PyTorch's default on Hopper
/// (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, `aten/src/ATen/cuda/CublasHandlePool.cpp`); without
/// one cuBLAS takes its smaller default pool, which rules out some of its kernels (split-K).
const WORKSPACE_BYTES: usize = 32 << 20;

impl Drop for Cublas {
    fn drop(&mut self) {
        // The handle's context first: cublasDestroy synchronises the device it was made on,
        // and the workspace is freed in it.
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: created by cublasCreate_v2 and used by nobody else; its device (and so every
        // GEMM that used the workspace) is synchronised by the destroy before the free.
        unsafe {
            cb::cublasDestroy_v2(self.handle);
            if let Some(workspace) = self.workspace {
                let _ = cudarc::driver::result::free_sync(workspace);
            }
        }
    }
}

thread_local! {
    /// This thread's handle per device, or why it could not be made (kept: a retry per
    /// matmul would cost a device synchronisation each).
    static HANDLES: RefCell<HashMap<usize, Result<Cublas, String>>> = RefCell::new(HashMap::new());
}

/// `lhs [.., m, k] @ rhs [.., k, n]` by cuBLAS into a new contiguous `[.., m, n]` in `lhs`'s
/// dtype (f32, bf16 or f16; both sides the same).
///
/// # Errors
/// Why cuBLAS did not run it: no `libcublas` on the library path, another dtype, a layout
/// it cannot read in place, or a CUDA or cuBLAS error (named).
pub fn matmul(
    lhs: CubeTensor<CudaRuntime>,
    rhs: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, String> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to open the library (once: each try searches the library path).
    if !*PRESENT.get_or_init(|| unsafe { cb::is_culib_present() }) {
        return Err("no libcublas on the library path (LD_LIBRARY_PATH)".into());
    }
    let dtype = lhs.dtype;
    if rhs.dtype != dtype {
        return Err(format!("dtypes {dtype:?} @ {:?}", rhs.dtype));
    }
    let (data, compute) = match dtype {
        DType::F32 => (
            cb::cudaDataType::CUDA_R_32F,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        ),
        DType::BF16 => (
            cb::cudaDataType::CUDA_R_16BF,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::F16 => (
            cb::cudaDataType::CUDA_R_16F,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        other => return Err(format!("dtype {other:?}")),
    };
    let (ls, rs) = (lhs.shape(), rhs.shape());
    let g = column_major_gemm(
        ls.as_slice(),
        &lhs.meta.strides()[..],
        rs.as_slice(),
        &rhs.meta.strides()[..],
    )
    .ok_or_else(|| {
        format!(
            "a layout cuBLAS cannot read in place: {ls:?}/{:?} @ {rs:?}/{:?}",
            lhs.meta.strides(),
            rhs.meta.strides()
        )
    })?;
    let d = ls.num_dims();
    let mut dims = ls.as_slice().to_vec();
    dims[d - 1] = rs[d - 1];
    let out = output(&lhs, Shape::from(dims), dtype);
    // A resource request is a blocking call to cubecl's device thread that first flushes this
    // thread's queued tasks: every kernel submitted before it is on the stream when it returns.
    // It also makes this thread's cubecl stream wait (on the device) for the buffer's writers
    // on other streams, as a kernel launch would; but the event it records for other streams
    // precedes the GEMM, so an operand another thread's stream reuses or writes next is not
    // ordered after the GEMM. The worker trains from one thread per device, so every operand
    // is this thread's stream's (two threads sharing tensors on one device would need a
    // synchronisation here).

    let pointer = |t: &CubeTensor<CudaRuntime>| {
        t.client
            .get_resource(t.handle.clone())
            .map_err(|e| format!("device pointer: {e:?}"))
    };
    let (a, b, c) = (pointer(&rhs)?, pointer(&lhs)?, pointer(&out)?);
    // The output was just allocated on this thread's stream: the stream cubecl runs the
    // operands' pending kernels and the output's next kernels on.
    let stream = c.resource().stream;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let op = |t: bool| {
        if t {
            cb::cublasOperation_t::CUBLAS_OP_T
        } else {
            cb::cublasOperation_t::CUBLAS_OP_N
        }
    };
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        let ordinal = lhs.device.index;
        let cublas = handles
            .entry(ordinal)
            .or_insert_with(|| Cublas::new(ordinal))
            .as_mut()
            .map_err(|e| e.clone())?;
        // This device's context current on this thread (another device's handle may have
        // been made since, as NCCL's calls bind theirs).
        cublas
            .ctx
            .bind_to_thread()
            .map_err(|e| format!("CUDA context: {e:?}"))?;
        if cublas.stream != stream {
            cublas.set_stream(stream)?;
        }
        // SAFETY: live handle and stream of this device's primary context (cubecl's); the
        // three buffers hold the operands as `g` describes them (checked against their
        // shapes and strides). The GEMM runs on the stream that orders the buffers' memory:
        // a buffer freed after this call is reused by work queued after the GEMM.
        let status = unsafe {
            cb::cublasGemmStridedBatchedEx(
                cublas.handle,
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                a.resource().ptr as *const c_void,
                data,
                g.lda as i32,
                g.stride_a as i64,
                b.resource().ptr as *const c_void,
                data,
                g.ldb as i32,
                g.stride_b as i64,
                (&beta as *const f32).cast::<c_void>(),
                c.resource().ptr as *mut c_void,
                data,
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasGemmStridedBatchedEx: {status:?} for {g:?}"));
        }
        Ok(())
    })?;
    Ok(out)
}

impl Cublas {
    /// A handle in device `ordinal`'s primary context (the one cubecl-cuda runs in), bound to
    /// this thread; its stream is set at the first GEMM.
    fn new(ordinal: usize) -> Result<Cublas, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| format!("CUDA context: {e:?}"))?;
        let mut handle: cb::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the context is current.
        let status = unsafe { cb::cublasCreate_v2(&mut handle) };
        if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasCreate: {status:?}"));
        }
        // SAFETY: the context is current; freed in `drop`.
        let workspace = match unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) } {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = ?e, "no 32 MiB cuBLAS workspace: cuBLAS's default pool instead");
                None
            }
        };
        Ok(Cublas {
            handle,
            stream: std::ptr::null_mut(),
            workspace,
            ctx,
        })
    }

    /// Queues the handle's work on `stream` from now on, with its workspace: cuBLAS resets a
    /// handle's workspace to its default pool on every `cublasSetStream`, so it is set again.
    /// Work already queued on the previous stream is waited for first, since it may still be
    /// using the workspace (a thread's cubecl stream does not change in practice).
    fn set_stream(&mut self, stream: CUstream) -> Result<(), String> {
        if !self.stream.is_null() {
            // SAFETY: a live stream of the bound context.
            unsafe { cudarc::driver::result::stream::synchronize(self.stream) }
                .map_err(|e| format!("previous cuBLAS stream: {e:?}"))?;
        }
        // SAFETY: a live handle; cubecl's stream lives as long as its device's server.
        let status = unsafe { cb::cublasSetStream_v2(self.handle, stream as _) };
        if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasSetStream: {status:?}"));
        }
        if let Some(workspace) = self.workspace {
            // SAFETY: a live handle; the workspace is this handle's, `WORKSPACE_BYTES` long.
            let status = unsafe {
                cb::cublasSetWorkspace_v2(self.handle, workspace as *mut c_void, WORKSPACE_BYTES)
            };
            if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(format!("cublasSetWorkspace: {status:?}"));
            }
        }
        self.stream = stream;
        Ok(())
    }
}
