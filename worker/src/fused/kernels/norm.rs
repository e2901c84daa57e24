//! CubeCL kernels for [`NormOps`]: RMSNorm forward and backward, RoPE, SwiGLU forward and
//! backward, for every CubeCL backend (CUDA in production, wgpu on lavapipe in the tests).
//!
//! Unit-level kernels (no plane ops, no tensor cores), so that they run on Mesa's lavapipe.
//! Each is generic over the float type and launched for the tensor's runtime dtype (f32, f16,
//! bf16); sums and the non-linear functions are computed in f32 (RoPE's two products and sum in
//! the tensor's dtype, as the reference and transformers round them). The RMSNorm kernels give each
//! row to one cube, whose units stride over the row and sum through a shared-memory tree;
//! the gain's gradient is summed over blocks of rows into an f32 `[blocks, d]` buffer, which a
//! reduction then sums. Inputs are made contiguous first.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::{cube_row, output, row_cube_count, MAX_CUBES};
use crate::fused::norm::NormOps;

/// The most units a row kernel's cube has (a power of two).
const ROW_UNITS: usize = 256;
/// The fewest rows one cube sums for the gain's gradient.
const DW_ROWS_PER_BLOCK: usize = 64;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> NormOps
    for CubeBackend<R, F, I, BT>
{
    fn rms_norm_forward(
        x: CubeTensor<R>,
        w: CubeTensor<R>,
        eps: f64,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (x, w) = (into_contiguous(x), into_contiguous(w));
        let [n, d] = x.shape().dims();
        check_gain(&x, &w, d);
        let y = output(&x, x.shape(), x.dtype);
        let inv_rms = empty_f32(&x, [n]);
        let (cube_count, units) = row_launch(n, d);
        let dtype = x.dtype;
        rms_norm_forward_kernel::launch::<R>(
            &x.client.clone(),
            cube_count,
            CubeDim::new_1d(units as u32),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            inv_rms.clone().into_tensor_arg(),
            eps as f32,
            units,
            dtype.into(),
        );
        (y, inv_rms)
    }

    fn rms_norm_backward(
        x: CubeTensor<R>,
        w: CubeTensor<R>,
        inv_rms: CubeTensor<R>,
        dy: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (x, w) = (into_contiguous(x), into_contiguous(w));
        let (inv_rms, dy) = (into_contiguous(inv_rms), into_contiguous(dy));
        let [n, d] = x.shape().dims();
        check_gain(&x, &w, d);
        assert_eq!(dy.dtype, x.dtype, "rms_norm: dy in x's dtype");
        assert_eq!(inv_rms.dtype, DType::F32, "rms_norm: inv_rms is f32");
        let (client, dtype, w_dtype) = (x.client.clone(), x.dtype, w.dtype);
        let dx = output(&x, x.shape(), dtype);
        let (cube_count, units) = row_launch(n, d);
        rms_norm_backward_kernel::launch::<R>(
            &client,
            cube_count,
            CubeDim::new_1d(units as u32),
            x.clone().into_tensor_arg(),
            w.into_tensor_arg(),
            inv_rms.clone().into_tensor_arg(),
            dy.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            units,
            dtype.into(),
        );

        // The gain's gradient: partial sums over blocks of rows, then their sum.
        let rows_per_block = DW_ROWS_PER_BLOCK.max(n.div_ceil(MAX_CUBES));
        let blocks = n.div_ceil(rows_per_block).max(1);
        let partial = empty_f32(&x, [blocks, d]);
        let cube_dim = CubeDim::new_1d(units as u32);
        let cube_count = CubeCount::Static(d.div_ceil(units) as u32, blocks as u32, 1);
        rms_norm_dw_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            inv_rms.into_tensor_arg(),
            dy.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            rows_per_block as u32,
            dtype.into(),
        );
        let dw = Self::float_sum_dim(partial, 0);
        (dx, Self::float_cast(dw, FloatDType::from(w_dtype)))
    }

    fn rope(
        x: CubeTensor<R>,
        cos: CubeTensor<R>,
        sin: CubeTensor<R>,
        heads: usize,
    ) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
        let [rows, width] = x.shape().dims();
        let [seq, hd] = cos.shape().dims();
        assert_eq!(
            width,
            heads * hd,
            "rope: x is [batch * seq, heads * head_dim]"
        );
        assert_eq!(
            rows % seq,
            0,
            "rope: x has whole sequences of the tables' length"
        );
        assert!(
            cos.dtype == x.dtype && sin.dtype == x.dtype,
            "rope: the tables are in x's dtype"
        );
        let y = output(&x, x.shape(), x.dtype);
        let (client, dtype) = (x.client.clone(), x.dtype);
        let (cube_count, cube_dim) = elementwise_launch(&client, rows * width);
        rope_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            dtype.into(),
        );
        y
    }

    fn swiglu(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
        let (gate, up) = (into_contiguous(gate), into_contiguous(up));
        assert_eq!(
            gate.shape(),
            up.shape(),
            "swiglu: gate and up have one shape"
        );
        assert_eq!(gate.dtype, up.dtype, "swiglu: gate and up have one dtype");
        let (client, dtype) = (gate.client.clone(), gate.dtype);
        let y = output(&gate, gate.shape(), dtype);
        let (cube_count, cube_dim) = elementwise_launch(&client, gate.shape().num_elements());
        swiglu_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            dtype.into(),
        );
        y
    }

    fn swiglu_backward(
        gate: CubeTensor<R>,
        up: CubeTensor<R>,
        dy: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (gate, up, dy) = (
            into_contiguous(gate),
            into_contiguous(up),
            into_contiguous(dy),
        );
        assert_eq!(
            gate.shape(),
            up.shape(),
            "swiglu: gate and up have one shape"
        );
        assert_eq!(
            gate.shape(),
            dy.shape(),
            "swiglu: dy has the output's shape"
        );
        assert!(
            up.dtype == gate.dtype && dy.dtype == gate.dtype,
            "swiglu: one dtype"
        );
        let (client, dtype) = (gate.client.clone(), gate.dtype);
        let d_gate = output(&gate, gate.shape(), dtype);
        let d_up = output(&gate, gate.shape(), dtype);
        let (cube_count, cube_dim) = elementwise_launch(&client, gate.shape().num_elements());
        swiglu_backward_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            dy.into_tensor_arg(),
            d_gate.clone().into_tensor_arg(),
            d_up.clone().into_tensor_arg(),
            dtype.into(),
        );
        (d_gate, d_up)
    }
}

/// Panics unless `w` is a `[1, d]` gain in `x`'s dtype.
fn check_gain<R: CubeRuntime>(x: &CubeTensor<R>, w: &CubeTensor<R>, d: usize) {
    assert_eq!(w.shape().dims::<2>(), [1, d], "rms_norm: w is [1, d]");
    assert_eq!(w.dtype, x.dtype, "rms_norm: w in x's dtype");
}

/// A new f32 tensor of `shape` on `like`'s device.
fn empty_f32<R: CubeRuntime, const D: usize>(
    like: &CubeTensor<R>,
    shape: [usize; D],
) -> CubeTensor<R> {
    output(like, Shape::new(shape), DType::F32)
}

/// One cube per row of `n` rows of `d` values: the cube count (rows spread over two dimensions
/// beyond [`MAX_CUBES`]) and the units per cube (a power of two, at most [`ROW_UNITS`]).
fn row_launch(n: usize, d: usize) -> (CubeCount, usize) {
    let units = d.next_power_of_two().clamp(1, ROW_UNITS);
    (row_cube_count(n), units)
}

/// The launch of an element-wise kernel over `n` values, one unit each.
fn elementwise_launch<R: CubeRuntime>(client: &ComputeClient<R>, n: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(client, n);
    (calculate_cube_count_elemwise(client, n, cube_dim), cube_dim)
}

/// The sum of `partial`'s values, one written by each unit of the cube before the call (a
/// power of two of them); every unit gets it.
#[cube]
fn tree_sum(partial: &mut SharedMemory<f32>) -> f32 {
    let unit = UNIT_POS_X as usize;
    sync_cube();
    // A runtime value (the cube's size), not the comptime `units`: it changes in the loop.
    let mut active = CUBE_DIM_X as usize / 2;
    while active > 0 {
        if unit < active {
            let other = partial[unit + active];
            partial[unit] += other;
        }
        sync_cube();
        active /= 2;
    }
    partial[0]
}

/// RMSNorm forward over one row per cube: `inv_rms[r] = 1 / sqrt(mean(x^2) + eps)` and
/// `y = F(x * inv_rms) * w`.
#[cube(launch)]
fn rms_norm_forward_kernel<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    y: &mut Tensor<F>,
    inv_rms: &mut Tensor<f32>,
    eps: f32,
    #[comptime] units: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = cube_row();
    if row >= y.shape(0) {
        terminate!();
    }
    let d = y.shape(1);
    let base = row * d;
    let unit = UNIT_POS_X as usize;

    let mut squares = f32::new(0.0);
    let mut j = unit;
    while j < d {
        let v = f32::cast_from(x[base + j]);
        squares += v * v;
        j += units;
    }
    let mut partial = SharedMemory::<f32>::new(units);
    partial[unit] = squares;
    let total = tree_sum(&mut partial);
    let inv = f32::new(1.0) / f32::sqrt(total / (d as f32) + eps);
    if unit == 0 {
        inv_rms[row] = inv;
    }

    let mut j = unit;
    while j < d {
        let normed = F::cast_from(f32::cast_from(x[base + j]) * inv);
        y[base + j] = normed * w[j];
        j += units;
    }
}

/// RMSNorm's input gradient over one row per cube: with `g = dy * w`,
/// `dx = (g - x * inv_rms^2 * mean(g * x)) * inv_rms`.
#[cube(launch)]
fn rms_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    inv_rms: &Tensor<f32>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    #[comptime] units: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = cube_row();
    if row >= dx.shape(0) {
        terminate!();
    }
    let d = dx.shape(1);
    let base = row * d;
    let unit = UNIT_POS_X as usize;

    let mut dot = f32::new(0.0);
    let mut j = unit;
    while j < d {
        let g = f32::cast_from(dy[base + j]) * f32::cast_from(w[j]);
        dot += g * f32::cast_from(x[base + j]);
        j += units;
    }
    let mut partial = SharedMemory::<f32>::new(units);
    partial[unit] = dot;
    let mean = tree_sum(&mut partial) / (d as f32);
    let inv = inv_rms[row];
    let scale = inv * inv * mean;

    let mut j = unit;
    while j < d {
        let g = f32::cast_from(dy[base + j]) * f32::cast_from(w[j]);
        let v = f32::cast_from(x[base + j]);
        dx[base + j] = F::cast_from((g - v * scale) * inv);
        j += units;
    }
}

/// RMSNorm's gain gradient, partly summed: `partial[b, j]` is the sum of
/// `dy * x * inv_rms` over the rows of block `b` (`CUBE_POS_Y`) in column `j`.
#[cube(launch)]
fn rms_norm_dw_kernel<F: Float>(
    x: &Tensor<F>,
    inv_rms: &Tensor<f32>,
    dy: &Tensor<F>,
    partial: &mut Tensor<f32>,
    rows_per_block: u32,
    #[define(F)] _dtype: StorageType,
) {
    let d = x.shape(1);
    let j = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    if j >= d {
        terminate!();
    }
    let block = CUBE_POS_Y as usize;
    let per_block = rows_per_block as usize;
    let start = block * per_block;
    let mut end = start + per_block;
    if end > x.shape(0) {
        end = x.shape(0);
    }
    let mut sum = f32::new(0.0);
    for r in start..end {
        let i = r * d + j;
        sum += f32::cast_from(dy[i]) * f32::cast_from(x[i]) * inv_rms[r];
    }
    partial[block * d + j] = sum;
}

/// RoPE, one unit per value of `x` `[rows, heads * hd]`: `y = x * cos + rotate_half(x) * sin`
/// with the tables' row for the position `row % seq`.
#[cube(launch)]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    y: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= y.len() {
        terminate!();
    }
    let width = x.shape(1);
    let (seq, hd) = (cos.shape(0), cos.shape(1));
    let half = hd / 2;
    let j = (i % width) % hd;
    let t = ((i / width) % seq) * hd + j;
    let rotated = if j < half { -x[i + half] } else { x[i - half] };
    y[i] = x[i] * cos[t] + rotated * sin[t];
}

/// `1 / (1 + exp(-v))`.
#[cube]
fn sigmoid_f32(v: f32) -> f32 {
    f32::new(1.0) / (f32::new(1.0) + f32::exp(-v))
}

/// SwiGLU forward, one unit per value: `y = silu(gate) * up`, computed in f32.
#[cube(launch)]
fn swiglu_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    y: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= y.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    y[i] = F::cast_from(g * sigmoid_f32(g) * f32::cast_from(up[i]));
}

/// SwiGLU backward, one unit per value: `d up = dy * silu(gate)`,
/// `d gate = dy * up * s * (1 + gate * (1 - s))` with `s = sigmoid(gate)`, in f32.
#[cube(launch)]
fn swiglu_backward_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    dy: &Tensor<F>,
    d_gate: &mut Tensor<F>,
    d_up: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= dy.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    let dy = f32::cast_from(dy[i]);
    let s = sigmoid_f32(g);
    d_up[i] = F::cast_from(dy * g * s);
    let slope = s * (f32::new(1.0) + g * (f32::new(1.0) - s));
    d_gate[i] = F::cast_from(dy * f32::cast_from(up[i]) * slope);
}

/// This module's kernels in `dtype` as CUDA compile tasks, with the cube sizes they are launched
/// with at a hidden width of 2,048 (the 1B shape): see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{elementwise, settings, task, tensor};
    let units = row_launch(1, 2048).1;
    let c = || client.clone();
    vec![
        task(
            "",
            rms_norm_forward_kernel::RmsNormForwardKernel::new(
                settings(units),
                c(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                (),
                units,
                dtype,
            ),
        ),
        task(
            "",
            rms_norm_backward_kernel::RmsNormBackwardKernel::new(
                settings(units),
                c(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                units,
                dtype,
            ),
        ),
        task(
            "",
            rms_norm_dw_kernel::RmsNormDwKernel::new(
                settings(units),
                c(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                (),
                dtype,
            ),
        ),
        task(
            "",
            rope_kernel::RopeKernel::new(
                elementwise(),
                c(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                dtype,
            ),
        ),
        task(
            "",
            swiglu_kernel::SwigluKernel::new(
                elementwise(),
                c(),
                tensor(),
                tensor(),
                tensor(),
                dtype,
            ),
        ),
        task(
            "",
            swiglu_backward_kernel::SwigluBackwardKernel::new(
                elementwise(),
                c(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                dtype,
            ),
        ),
    ]
}
