//! The CubeCL kernels for [`AccumulateOps`], for the gradient's runtime dtype (f32, f16, bf16),
//! with 64-bit addresses when the buffer has more than 2^32 elements:
//! - accumulate: one unit per gradient element, `acc[start + i] += f32(grad[i])`, in place on
//!   the f32 buffer;
//! - sum of squares: one cube per [`SQUARES_PER_CUBE`] elements, each unit adding the f64
//!   squares of [`SQUARES_PER_UNIT`] of them (coalesced: unit `u` takes every
//!   [`SQUARES_UNITS`]-th from `u`), the cube's units added through shared memory into one f64
//!   per cube. One read of the buffer (5 GB for a 1.24 B-parameter f32 gradient, ~1.5 ms at
//!   H200 bandwidth), where Burn's ops cast each parameter to an f64 copy, square it into
//!   another and sum that (measured on an H200, 2026-11-29: ~0.1 s of a 1B step in
//!   `SharedSumKernel` alone).

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::{cube_row, output, private, row_cube_count};
use crate::fused::accumulate::AccumulateOps;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AccumulateOps
    for CubeBackend<R, F, I, BT>
{
    fn accumulate(acc: CubeTensor<R>, start: usize, grad: CubeTensor<R>) -> CubeTensor<R> {
        assert_eq!(acc.dtype, DType::F32, "accumulate: the buffer is f32");
        let grad = into_contiguous(grad);
        let n = grad.shape().num_elements();
        assert!(start + n <= acc.shape().num_elements(), "accumulate: range");
        let acc = private(acc);
        if n == 0 {
            return acc;
        }
        let client = acc.client.clone();
        let cube_dim = CubeDim::new(&client, n);
        let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
        let dtype = grad.dtype;
        // 64-bit addresses where the buffer needs them (a 7B model's flat buffer has more than
        // 2^32 elements; cubecl's default is 32-bit).
        let address = acc
            .required_address_type()
            .max(grad.required_address_type());
        accumulate_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address,
            acc.clone().into_tensor_arg(),
            grad.into_tensor_arg(),
            start,
            dtype.into(),
        );
        acc
    }

    fn sum_of_squares_parts(x: CubeTensor<R>) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let n = x.shape().num_elements();
        let cubes = n.div_ceil(SQUARES_PER_CUBE).max(1);
        let parts = output(&x, Shape::new([cubes]), DType::F64);
        let client = x.client.clone();
        let dtype = x.dtype;
        let address = x.required_address_type();
        squares_kernel::launch::<R>(
            &client,
            row_cube_count(cubes),
            CubeDim::new_1d(SQUARES_UNITS as u32),
            address,
            x.into_tensor_arg(),
            parts.clone().into_tensor_arg(),
            SQUARES_UNITS,
            SQUARES_PER_UNIT,
            dtype.into(),
        );
        parts
    }
}

/// Units per cube of the sum-of-squares kernel (a power of two).
pub const SQUARES_UNITS: usize = 256;
/// Elements each unit of the sum-of-squares kernel adds.
pub const SQUARES_PER_UNIT: usize = 64;
/// Elements per cube, and per f64 part, of the sum-of-squares kernel.
pub const SQUARES_PER_CUBE: usize = SQUARES_UNITS * SQUARES_PER_UNIT;

#[cube(launch, address_type = "dynamic")]
fn squares_kernel<F: Float>(
    x: &Tensor<F>,
    parts: &mut Tensor<f64>,
    #[comptime] units: usize,
    #[comptime] per_unit: usize,
    #[define(F)] _dtype: StorageType,
) {
    let cube = cube_row();
    // Whole cubes end together (before any barrier): the launch's grid may overhang.
    if cube >= parts.len() {
        terminate!();
    }
    let unit = UNIT_POS_X as usize;
    let start = cube * units * per_unit + unit;
    let mut acc = f64::new(0.0);
    for j in 0..per_unit {
        let i = start + j * units;
        if i < x.len() {
            let v = f64::cast_from(x[i]);
            acc += v * v;
        }
    }
    let mut shared = SharedMemory::<f64>::new(units);
    shared[unit] = acc;
    sync_cube();
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if unit < stride {
            shared[unit] = shared[unit] + shared[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if unit == 0 {
        parts[cube] = shared[0];
    }
}

#[cube(launch, address_type = "dynamic")]
fn accumulate_kernel<F: Float>(
    acc: &mut Tensor<f32>,
    grad: &Tensor<F>,
    start: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad.len() {
        terminate!();
    }
    acc[start + i] += f32::cast_from(grad[i]);
}

/// This module's kernels for a `dtype` gradient, with 32- and 64-bit addresses, as CUDA compile
/// tasks: see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{elementwise, settings, task, tensor};
    [AddressType::U32, AddressType::U64]
        .into_iter()
        .flat_map(|address| {
            [
                task(
                    format!("accumulate, {address:?} addresses"),
                    accumulate_kernel::AccumulateKernel::new(
                        elementwise().address_type(address),
                        client.clone(),
                        tensor(),
                        tensor(),
                        (),
                        dtype,
                    ),
                ),
                task(
                    format!("sum of squares, {address:?} addresses"),
                    squares_kernel::SquaresKernel::new(
                        settings(SQUARES_UNITS).address_type(address),
                        client.clone(),
                        tensor(),
                        tensor(),
                        SQUARES_UNITS,
                        SQUARES_PER_UNIT,
                        dtype,
                    ),
                ),
            ]
        })
        .collect()
}
