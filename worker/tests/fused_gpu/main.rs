//! The fused ops' CubeCL kernels on a GPU backend, checked against the CPU backend's reference.
//!
//! - `--features wgpu`: Burn's wgpu backend on Vulkan. On a machine without a GPU, Mesa's
//!   software driver lavapipe (Debian `mesa-vulkan-drivers`) runs the kernels: unit-level f32
//!   kernels only (no cooperative matrix, no bf16, plane ops off on CPU adapters).
//! - `--features wgpu,cuda` (CI: `cargo test -p dapt-worker --features wgpu,cuda --test
//!   fused_gpu`): the same on wgpu, and `cuda_codegen`: every kernel in f32 and bf16
//!   compiled for the H200 by NVRTC and ptxas, no GPU needed.
//! - `--features cuda` (without `wgpu`): the same checks on CUDA, with the tensor-core and bf16
//!   variants; scripts/gpu-check.sh runs this binary on a lent GPU.
//!
//! Without either feature this test binary is empty.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod accumulate;
mod adamw;
mod attention;
#[cfg(all(feature = "wgpu", feature = "cuda"))]
mod cuda_codegen;
mod loss;
mod matmul;
mod norm;
// The resident trainer's allocations through the wgpu backend.
#[cfg(feature = "wgpu")]
mod resident;
// The worker binary on Vulkan: a `wgpu` build's (the CUDA-only binary that gpu-check.sh runs
// has no `--device vulkan`).
#[cfg(feature = "wgpu")]
mod train_vulkan;

use burn::tensor::{Distribution, Tensor};
use dapt_worker::Cpu;

/// The GPU backend under test.
#[cfg(feature = "wgpu")]
pub type Gpu = dapt_worker::Vulkan;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
pub type Gpu = dapt_worker::Gpu;

/// `t`'s values on the GPU backend.
pub fn to_gpu<const D: usize>(t: &Tensor<Cpu, D>) -> Tensor<Gpu, D> {
    Tensor::from_data(t.to_data(), &Default::default())
}

/// The largest absolute difference between a GPU tensor's values and a CPU tensor's.
pub fn max_abs_diff<const D: usize>(a: Tensor<Gpu, D>, b: Tensor<Cpu, D>) -> f32 {
    let a = a
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32");
    let b = b.into_data().into_vec::<f32>().expect("f32");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// How far an f32 matmul on the GPU backend may be from the CPU's, relative to the result's
/// largest value: CUDA's f32 matmuls run on TF32 tensor cores (10-bit mantissa: seen 1.1e-3 on
/// an H200, 2026-11-29), lavapipe's in f32.
pub const MATMUL_RTOL: f32 = if cfg!(all(feature = "cuda", not(feature = "wgpu"))) {
    5e-3
} else {
    1e-5
};

/// The device answers and computes what the CPU backend does: the harness itself.
#[test]
fn device_matches_the_cpu_backend() {
    let cpu = Default::default();
    let a = Tensor::<Cpu, 2>::random([33, 70], Distribution::Normal(0.0, 1.0), &cpu);
    let b = Tensor::<Cpu, 2>::random([70, 17], Distribution::Normal(0.0, 1.0), &cpu);
    let reference = a.clone().matmul(b.clone());
    let scale = reference.clone().abs().max().into_scalar();
    let diff = max_abs_diff(to_gpu(&a).matmul(to_gpu(&b)), reference) / scale;
    assert!(diff < MATMUL_RTOL, "matmul differs by {diff} of its scale");
}

/// The allocator's figures the step logs (`DeviceMemory`): a tensor alive shows in `in_use`,
/// within `reserved`.
#[test]
fn the_device_allocator_reports_what_is_alive() {
    use dapt_worker::memory::DeviceMemory;
    let device = Default::default();
    let t = Tensor::<Gpu, 1>::ones([1 << 20], &device);
    // Make sure it exists on the device, not only as a queued kernel.
    assert_eq!(t.clone().sum().into_scalar(), (1 << 20) as f32);
    // Other tests of this process allocate and free meanwhile: only what this one holds is
    // certain.
    let now = Gpu::device_memory(&device).expect("a CubeCL device reports its memory");
    assert!(now.in_use >= 4 << 20, "{now:?}");
    assert!(now.reserved >= now.in_use, "{now:?}");
    assert_eq!(Cpu::device_memory(&Default::default()), None);
    drop(t);
}
