//! The fused ops' CubeCL kernels and their `CubeBackend` implementations, one module per family
//! (issue 12), for every CubeCL backend: CUDA in production, wgpu (Vulkan; Mesa's lavapipe on a
//! machine without a GPU) in the tests.

pub mod attention;
pub mod loss;
pub mod norm;
