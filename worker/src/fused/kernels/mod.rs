//! The fused ops' CubeCL kernels and their `CubeBackend` implementations (CUDA in production;
//! wgpu on lavapipe in the CPU-only tests).

pub mod attention;
