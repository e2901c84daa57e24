//! The matmul op by NVIDIA's cuBLAS (`DAPT_MATMUL=cublas`, feature `cuda`): the GEMM library
//! PyTorch's matmuls run on, through cudarc's `cublas` bindings (loaded at run time, as NCCL).
//!
//! `cublasGemmStridedBatchedEx` with f32 accumulation (`CUBLAS_COMPUTE_32F`; TF32 tensor cores
//! for f32 inputs, as Burn's f32 matmuls) reads the operands in place, row-major or
//! transposed views, batched ([`crate::fused::gemm`]), and writes a new contiguous output that
//! cubecl allocated. cubecl's CUDA stream is private (see `collective::nccl`), so each call
//! drains cubecl's queue (`Backend::sync`), runs the GEMM on this thread's own stream and
//! waits for it: two waits per matmul, each short when the matmul is long. A problem cuBLAS
//! cannot take in place, a missing `libcublas`, or a cuBLAS error is an `Err`, and the caller
//! (`kernels::matmul`) runs Burn's matmul instead.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::sys as cb;
use cudarc::driver::{CudaContext, CudaStream};

use super::output;
use crate::fused::gemm::column_major_gemm;

/// One cuBLAS handle with its stream, per device, per thread (a handle is not to be shared
/// between threads that use it at once).
struct Cublas {
    handle: cb::cublasHandle_t,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate_v2 and used by nobody else.
        unsafe {
            cb::cublasDestroy_v2(self.handle);
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<usize, Cublas>> = RefCell::new(HashMap::new());
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
    // Allocated before the drain: whatever cubecl queued on this memory finishes first.
    let out = output(&lhs, Shape::from(dims), dtype);
    crate::Gpu::sync(&lhs.device).map_err(|e| format!("device sync: {e:?}"))?;
    let pointer = |t: &CubeTensor<CudaRuntime>| {
        t.client
            .get_resource(t.handle.clone())
            .map_err(|e| format!("device pointer: {e:?}"))
    };
    // Held until the GEMM is done: the bindings keep the buffers.
    let (a, b, c) = (pointer(&rhs)?, pointer(&lhs)?, pointer(&out)?);
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
        let cublas = match handles.entry(ordinal) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Cublas::new(ordinal)?),
        };
        // This device's context current on this thread (another device's handle may have
        // been made since, as NCCL's calls bind theirs).
        cublas
            .ctx
            .bind_to_thread()
            .map_err(|e| format!("CUDA context: {e:?}"))?;
        // SAFETY: live handle and stream of this device's primary context (cubecl's); the
        // three buffers hold the operands as `g` describes them (checked against their
        // shapes and strides) and stay alive until the stream is synchronised below.
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
        cublas
            .stream
            .synchronize()
            .map_err(|e| format!("cuBLAS stream: {e:?}"))
    })?;
    drop((a, b, c));
    Ok(out)
}

impl Cublas {
    /// A handle on a new stream of device `ordinal`'s primary context (the one cubecl-cuda
    /// runs in), bound to this thread.
    fn new(ordinal: usize) -> Result<Cublas, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| format!("CUDA context: {e:?}"))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| format!("CUDA stream: {e:?}"))?;
        let mut handle: cb::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the context is current.
        let status = unsafe { cb::cublasCreate_v2(&mut handle) };
        if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasCreate: {status:?}"));
        }
        let cublas = Cublas {
            handle,
            stream,
            ctx,
        };
        // SAFETY: live handle and stream.
        let status =
            unsafe { cb::cublasSetStream_v2(cublas.handle, cublas.stream.cu_stream() as _) };
        if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasSetStream: {status:?}"));
        }
        Ok(cublas)
    }
}
