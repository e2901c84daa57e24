//! The fused ops' CubeCL kernels on Burn's wgpu backend (Vulkan), checked against the CPU
//! backend's reference. On a machine without a GPU, Mesa's software Vulkan driver lavapipe
//! (Debian `mesa-vulkan-drivers`) runs them: unit-level f32 kernels only (no cooperative matrix,
//! no bf16, plane ops off on CPU adapters).
//!
//! `cargo test -p dapt-worker --features wgpu --test fused_wgpu`

use burn::tensor::{Distribution, Tensor};
use dapt_worker::{Cpu, Vulkan};

/// The largest absolute difference between two tensors' values.
fn max_abs_diff<const D: usize>(a: Tensor<Vulkan, D>, b: Tensor<Cpu, D>) -> f32 {
    let a = a.into_data().into_vec::<f32>().expect("f32");
    let b = b.into_data().into_vec::<f32>().expect("f32");
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The Vulkan device answers and computes what the CPU backend does: the harness itself.
#[test]
fn vulkan_device_matches_the_cpu_backend() {
    let gpu = Default::default();
    let cpu = Default::default();
    let a = Tensor::<Cpu, 2>::random([33, 70], Distribution::Normal(0.0, 1.0), &cpu);
    let b = Tensor::<Cpu, 2>::random([70, 17], Distribution::Normal(0.0, 1.0), &cpu);
    let on_gpu = |t: &Tensor<Cpu, 2>| Tensor::<Vulkan, 2>::from_data(t.to_data(), &gpu);
    let diff = max_abs_diff(on_gpu(&a).matmul(on_gpu(&b)), a.matmul(b));
    assert!(diff < 1e-4, "matmul differs by {diff}");
}
