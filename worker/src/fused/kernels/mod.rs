//! The fused ops' CubeCL kernels, one module per family (issue 12), for every CubeCL backend:
//! CUDA in production, wgpu (Vulkan; Mesa's lavapipe on a machine without a GPU) in the tests.

pub mod norm;
