//! CubeCL kernels of the fused cross-entropy's per-chunk work ([`LossOps`]): the online
//! log-sum-exp with the target logit (forward) and softmax-minus-one-hot (backward) over one
//! chunk of logits. The chunk's matmuls stay the backend's own (tensor cores on CUDA).
//!
//! Unit-level kernels (shared memory and `sync_cube`, no plane ops or cooperative matrices), so
//! that they run on Mesa's lavapipe in the tests; generic over the logits' float type,
//! dispatched on the tensor's runtime dtype (f32, f16, bf16), accumulating in f32.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use super::{cube_row, merge_online, online_add, output, private, row_cube_count};
use crate::fused::loss::{LossOps, RowStats};

/// Units per row in [`chunk_stats_kernel`]: a power of two (the tree reduction halves it).
const ROW_UNITS: u32 = 256;

/// Units per cube in [`chunk_grad_kernel`].
const GRAD_UNITS: u32 = 256;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LossOps
    for CubeBackend<R, F, I, BT>
{
    fn cross_entropy_chunk_stats(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        offset: usize,
        running: Option<RowStats<Self>>,
    ) -> RowStats<Self> {
        let running = running.map(|r| (r.lse, r.target_logit));
        let (lse, target_logit) = chunk_stats(logits, targets, offset, running);
        RowStats { lse, target_logit }
    }

    fn cross_entropy_chunk_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        offset: usize,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        chunk_grad(logits, targets, offset, lse, grad)
    }
}

/// One cube per row of `logits` `[n, c]` (contiguous): each unit runs an online max and sum of
/// exponentials over its strided share of the row, the cube merges them in shared memory, and
/// unit 0 folds the chunk's log-sum-exp into `lse[row]` and its target logit into
/// `target_logit[row]` (both f32; written, not read, on the `first` chunk).
#[cube(launch)]
fn chunk_stats_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    lse: &mut Tensor<f32>,
    target_logit: &mut Tensor<f32>,
    offset: u32,
    #[comptime] first: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = cube_row();
    let rows = logits.shape(0);
    if row >= rows {
        terminate!();
    }
    let cols = logits.shape(1);
    let base = row * cols;
    let unit = UNIT_POS_X as usize;
    let units = ROW_UNITS as usize;

    // Lower than any logit and finite: exp of it minus a logit is 0.0, never a NaN.
    let mut state = (f32::new(-3.0e38), f32::new(0.0));
    let mut j = unit;
    while j < cols {
        state = online_add(state.0, state.1, f32::cast_from(logits[base + j]));
        j += units;
    }
    let (max, sum) = merge_online(state.0, state.1, units);

    if unit == 0 {
        let chunk_lse = max + sum.ln();
        let target = u32::cast_from(targets[row]) as usize;
        let start = offset as usize;
        let mut picked = f32::new(0.0);
        if target >= start && target < start + cols {
            picked = f32::cast_from(logits[base + target - start]);
        }
        if first {
            lse[row] = chunk_lse;
            target_logit[row] = picked;
        } else {
            let prev = lse[row];
            let mut hi = prev;
            let mut lo = chunk_lse;
            if chunk_lse > prev {
                hi = chunk_lse;
                lo = prev;
            }
            lse[row] = hi + (1.0 + (lo - hi).exp()).ln();
            target_logit[row] += picked;
        }
    }
}

/// One unit per element of `logits` `[n, c]` (contiguous), overwritten in place with
/// `(exp(logit - lse[row]) - [target[row] == offset + col]) * grad[0]`, computed in f32.
#[cube(launch)]
fn chunk_grad_kernel<F: Float, I: Numeric>(
    logits: &mut Tensor<F>,
    targets: &Tensor<I>,
    lse: &Tensor<f32>,
    grad: &Tensor<f32>,
    offset: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= logits.len() {
        terminate!();
    }
    let cols = logits.shape(1);
    let row = pos / cols;
    let col = pos % cols;
    let mut g = (f32::cast_from(logits[pos]) - lse[row]).exp();
    if u32::cast_from(targets[row]) as usize == offset as usize + col {
        g -= 1.0;
    }
    logits[pos] = F::cast_from(g * grad[0]);
}

/// [`LossOps::cross_entropy_chunk_stats`] on a CubeCL backend: `(lse, target_logit)` from
/// `logits` `[n, c]`, the targets `[n]` and the running `(lse, target_logit)`.
fn chunk_stats<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    offset: usize,
    running: Option<(CubeTensor<R>, CubeTensor<R>)>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let logits = into_contiguous(logits);
    let targets = into_contiguous(targets);
    let [rows, _] = logits.meta.shape().dims::<2>();
    let client = logits.client.clone();
    let first = running.is_none();
    let (lse, target_logit) = running
        .map(|(l, t)| (private(l), private(t)))
        .unwrap_or_else(|| {
            let empty = || output(&logits, Shape::new([rows]), DType::F32);
            (empty(), empty())
        });
    let (f_dtype, i_dtype) = (logits.dtype, targets.dtype);
    chunk_stats_kernel::launch::<R>(
        &client,
        row_cube_count(rows),
        CubeDim::new_1d(ROW_UNITS),
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        target_logit.clone().into_tensor_arg(),
        offset as u32,
        first,
        [f_dtype.into(), i_dtype.into()],
    );
    (lse, target_logit)
}

/// [`LossOps::cross_entropy_chunk_grad`] on a CubeCL backend: the gradient in `logits`' place
/// when nothing else holds them.
fn chunk_grad<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    offset: usize,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> CubeTensor<R> {
    let logits = private(logits);
    let targets = into_contiguous(targets);
    let lse = into_contiguous(as_f32(lse));
    let grad = into_contiguous(as_f32(grad));
    let client = logits.client.clone();
    let elements = logits.meta.num_elements();
    let cube_dim = CubeDim::new_1d(GRAD_UNITS);
    let (f_dtype, i_dtype) = (logits.dtype, targets.dtype);
    chunk_grad_kernel::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, elements, cube_dim),
        cube_dim,
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        offset as u32,
        [f_dtype.into(), i_dtype.into()],
    );
    logits
}

/// `t` as f32 (the statistics and the upstream gradient are; a cast if a caller's is not).
fn as_f32<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.dtype == DType::F32 {
        t
    } else {
        burn_cubecl::kernel::cast(t, DType::F32)
    }
}

/// This module's kernels with `dtype` logits (and i32 targets, `dapt_worker::Gpu`'s int type) as CUDA
/// compile tasks: see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{settings, task, tensor};
    let int: StorageType = DType::I32.into();
    let mut tasks: Vec<super::cuda_source::CudaTask> = [true, false]
        .into_iter()
        .map(|first| {
            task(
                if first { "first chunk" } else { "later chunk" },
                chunk_stats_kernel::ChunkStatsKernel::new(
                    settings(ROW_UNITS as usize),
                    client.clone(),
                    tensor(),
                    tensor(),
                    tensor(),
                    tensor(),
                    (),
                    first,
                    [dtype, int],
                ),
            )
        })
        .collect();
    tasks.push(task(
        "",
        chunk_grad_kernel::ChunkGradKernel::new(
            settings(GRAD_UNITS as usize),
            client.clone(),
            tensor(),
            tensor(),
            tensor(),
            tensor(),
            (),
            [dtype, int],
        ),
    ));
    tasks
}
