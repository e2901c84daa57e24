//! The fused ops' CubeCL kernels and their `CubeBackend` implementations, one module per family
//! (issue 12), for every CubeCL backend: CUDA in production, wgpu (Vulkan; Mesa's lavapipe on a
//! machine without a GPU) in the tests.

pub mod accumulate;
pub mod attention;
pub mod loss;
pub mod norm;

use cubecl::prelude::*;
use cubecl::CubeCount;

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
