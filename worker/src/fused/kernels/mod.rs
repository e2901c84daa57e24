//! The fused ops' CubeCL kernels and their `CubeBackend` implementations, one module per family
//! (issue 12), for every CubeCL backend: CUDA in production, wgpu (Vulkan; Mesa's lavapipe on a
//! machine without a GPU) in the tests.

pub mod accumulate;
pub mod adamw;
pub mod attention;
pub mod blockwise;
#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "cuda")]
pub mod cuda_source;
pub mod loss;
pub mod matmul;
pub mod norm;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::CubeCount;

/// A new tensor of `shape` and `dtype` on `like`'s device for a kernel to write, contiguous:
/// the kernels write by flat index, and burn-cubecl's `empty_device_dtype` pads the rows of a
/// tensor of 2+ dimensions to 512 bytes on CUDA (pitched; not on wgpu), which flat writes
/// scramble (found on an H200, 2026-11-29: wrong outputs wherever a row was not a multiple of
/// 512 bytes).
pub(crate) fn output<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Shape,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// `t` as a tensor that a kernel or a collective may write into in place: itself when it is
/// contiguous, spans its whole buffer and nobody else holds that buffer; else a copy (never a
/// write through a view or under another owner).
pub(crate) fn private<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if !t.is_contiguous() {
        // A fresh buffer of its own.
        return into_contiguous(t);
    }
    if t.is_contiguous_buffer() && t.can_mut() {
        t
    } else {
        // `copy` keeps the runtime's layout, which pads rows on CUDA for 2+ dimensions.
        into_contiguous(t.copy())
    }
}

/// The most cubes along one dimension of a launch (Vulkan's guaranteed minimum).
pub(crate) const MAX_CUBES: usize = 65_535;

/// One cube per row of `rows` rows, spread over a second dimension beyond [`MAX_CUBES`]; a
/// kernel finds its row with [`cube_row`] (and ends if it is past the last).
pub(crate) fn row_cube_count(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES);
    CubeCount::Static(x as u32, rows.div_ceil(x).max(1) as u32, 1)
}

/// The row this cube of a [`row_cube_count`] launch handles.
#[cube]
pub(crate) fn cube_row() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// One step of an online softmax's running state: `(max, sum)` with `sum = sum of exp(x - max)`
/// over the values seen, after value `v` (Milakov and Gimelshein 2018, "Online normalizer
/// calculation for softmax").
#[cube]
pub(crate) fn online_add(max: f32, sum: f32, v: f32) -> (f32, f32) {
    let mut out = (max, sum + (v - max).exp());
    if v > max {
        out = (v, sum * (max - v).exp() + 1.0);
    }
    out
}

/// The cube's online softmax state from each unit's `(max, sum)` (see [`online_add`]), merged
/// through shared memory of `units` values, the cube's size (a power of two); every unit gets
/// the cube's `(max, sum)`.
#[cube]
pub(crate) fn merge_online(max: f32, sum: f32, #[comptime] units: usize) -> (f32, f32) {
    let unit = UNIT_POS_X as usize;
    let mut maxes = SharedMemory::<f32>::new(units);
    let mut sums = SharedMemory::<f32>::new(units);
    maxes[unit] = max;
    sums[unit] = sum;
    sync_cube();
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if unit < stride {
            let (m1, m2) = (maxes[unit], maxes[unit + stride]);
            let hi = select(m2 > m1, m2, m1);
            sums[unit] = sums[unit] * (m1 - hi).exp() + sums[unit + stride] * (m2 - hi).exp();
            maxes[unit] = hi;
        }
        sync_cube();
        stride /= 2;
    }
    (maxes[0], sums[0])
}
