//! The fused ops' kernels as the CUDA C++ that cubecl-cuda hands NVRTC, and NVRTC's PTX of it,
//! made without a GPU (issue 12): a kernel that NVRTC or `ptxas` rejects for Hopper is found on
//! a CPU machine, not in a GPU session's few minutes, and `ptxas -v`'s registers and spills per
//! kernel (and its machine code) can be read before any run.
//!
//! Each kernels module lists its kernels as [`CudaTask`]s (`cuda_tasks`: the kernel as its
//! `#[cube(launch)]` launch builds it, with the comptime values and cube sizes of the 1B shape);
//! [`cuda_kernels`] expands them through a client of any runtime (the tests use wgpu on
//! lavapipe; the kernel IR depends on the client only through its device properties) and
//! compiles them with cubecl-cuda's own compiler and the options it sets for the architecture;
//! [`nvrtc_ptx`] compiles one with the options cubecl-cuda passes NVRTC.

use std::ffi::{CStr, CString};

use burn::tensor::DType;

use cubecl::prelude::*;
use cubecl::{CompilationError, CubeTask};
use cubecl_cpp::shared::{CompilationOptions, CppSupportedFeatures};

/// cubecl-cuda's compiler (`cubecl_cuda::CudaCompiler`, the CUDA dialect of cubecl-cpp).
pub type CudaCompiler = cubecl::cuda::CudaCompiler;

/// A kernel ready to be compiled to CUDA C++, with what tells it apart from other variants of
/// the same entry point.
pub struct CudaTask {
    variant: String,
    task: Box<dyn CubeTask<CudaCompiler>>,
}

/// One kernel's CUDA source.
#[derive(Debug, Clone)]
pub struct CudaKernel {
    /// The entry point, with the kernel's float type (e.g. `forward_kernel_f_bf16`) and, where
    /// several variants share it, their comptime values and address width in [`Self::variant`].
    pub name: String,
    /// What tells this variant apart from another of the same name (`hd=64`, `u64` ...).
    pub variant: String,
    /// The CUDA C++ source NVRTC gets.
    pub source: String,
    /// Shared memory per cube, bytes (cubecl's count; it launches the kernel with that much
    /// dynamic shared memory, so ptxas does not see it).
    pub shared_bytes: usize,
}

/// `KernelSettings` for a cube of `units` units along x, 32-bit addresses (the macro's default).
pub(super) fn settings(units: usize) -> KernelSettings {
    KernelSettings::default()
        .cube_dim(CubeDim::new_1d(units as u32))
        .address_type(AddressType::U32)
}

/// `KernelSettings` of an element-wise kernel: 256 units per cube, what `CubeDim::new` gives a
/// large launch on CUDA.
pub(super) fn elementwise() -> KernelSettings {
    settings(256)
}

/// A tensor argument's compile-time half (not aliased to another argument).
pub(super) fn tensor() -> TensorCompilationArg {
    TensorCompilationArg { inplace: None }
}

/// `kernel` as a CUDA compile task; `variant` names its comptime values where the entry point
/// has several (empty where not).
pub(super) fn task<K: CubeKernel>(variant: impl Into<String>, kernel: K) -> CudaTask {
    CudaTask {
        variant: variant.into(),
        task: Box::new(KernelTask::<CudaCompiler, K>::new(kernel)),
    }
}

/// The compilation options cubecl-cuda sets for compute capability `arch` (e.g. 90), read from
/// `cubecl-cuda-0.10.0/src/runtime.rs` (`fast_tanh` needs CUDA 12.8 too, which every
/// Hopper-era toolkit is).
pub fn compilation_options(arch: u32) -> CompilationOptions {
    CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures {
            fast_math: true,
            grid_constants: arch >= 70,
            fast_tanh: arch >= 75,
            clusters: arch >= 90,
            elect_sync: arch >= 90,
        },
    }
}

/// Every fused-op kernel in f32 and bf16 (`--precision`'s two; the kernels also take f16, which
/// training never uses) as CUDA C++ for compute capability `arch`,
/// expanded through `client`'s runtime.
///
/// # Errors
/// The first kernel cubecl-cpp cannot compile, with its name.
pub fn cuda_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    arch: u32,
) -> Result<Vec<CudaKernel>, String> {
    let options = compilation_options(arch);
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let dtype = StorageType::from(dtype);
        let tasks = super::norm::cuda_tasks(client, dtype)
            .into_iter()
            .chain(super::attention::cuda_tasks(client, dtype))
            .chain(super::blockwise::cuda_tasks(client, dtype))
            .chain(super::loss::cuda_tasks(client, dtype))
            .chain(super::accumulate::cuda_tasks(client, dtype))
            // The optimizer's buffers are f32 whatever the compute dtype: once.
            .chain(if dtype == StorageType::from(DType::F32) {
                super::adamw::cuda_tasks(client)
            } else {
                Vec::new()
            });
        for CudaTask { variant, task } in tasks {
            let compiled = task
                .compile(
                    &mut CudaCompiler::default(),
                    &options,
                    ExecutionMode::Checked,
                    task.address_type(),
                )
                .map_err(|e: CompilationError| format!("{:?} {variant}: {e}", task.id()))?;
            out.push(CudaKernel {
                name: compiled.entrypoint_name.clone(),
                variant,
                shared_bytes: compiled.repr.as_ref().map_or(0, |r| r.shared_memory_size()),
                source: compiled.source,
            });
        }
    }
    Ok(out)
}

/// `source` compiled by NVRTC to PTX for compute capability `arch`, with the options
/// cubecl-cuda passes (`--gpu-architecture=sm_<arch>[a]`, `-lineinfo`, the CUDA include folder
/// and its `cccl/` when given). NVRTC is loaded at run time (cudarc's dynamic loading:
/// `libnvrtc.so.<major>` from the loader's path, or one already loaded); without it cudarc
/// panics (the test preloads it by path).
///
/// # Errors
/// NVRTC's log when it rejects the source; cudarc's error when a call fails.
pub fn nvrtc_ptx(
    source: &str,
    arch: u32,
    include: Option<&std::path::Path>,
) -> Result<String, String> {
    use cudarc::nvrtc::result;
    let arch = if arch >= 90 {
        format!("--gpu-architecture=sm_{arch}a")
    } else {
        format!("--gpu-architecture=sm_{arch}")
    };
    let mut options = vec![arch, "-lineinfo".to_string()];
    if let Some(dir) = include {
        options.push(format!("--include-path={}", dir.display()));
        let cccl = dir.join("cccl");
        if cccl.exists() {
            options.push(format!("--include-path={}", cccl.display()));
        }
    }
    let source = CString::new(source).map_err(|e| e.to_string())?;
    // SAFETY: NVRTC's C API through cudarc: the program is created from a NUL-terminated source
    // that outlives it, compiled, read and destroyed here; the log pointer is read before the
    // program is destroyed.
    unsafe {
        let program =
            result::create_program(source.as_c_str(), None).map_err(|e| format!("{e:?}"))?;
        let compiled = result::compile_program(program, &options);
        let ptx = match compiled {
            Ok(()) => result::get_ptx(program)
                .map(|p| CStr::from_ptr(p.as_ptr()).to_string_lossy().into_owned())
                .map_err(|e| format!("{e:?}")),
            Err(e) => Err(match result::get_program_log(program) {
                Ok(log) => CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned(),
                Err(_) => format!("{e:?}"),
            }),
        };
        let _ = result::destroy_program(program);
        ptx
    }
}
