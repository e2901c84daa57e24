//! The fused ops' CubeCL kernels (CUDA in production, wgpu/lavapipe in the tests).

pub mod loss;
