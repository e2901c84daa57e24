//! CubeCL kernels for [`BlockOps`]: blockwise attention's per-block softmax (forward) and its
//! probabilities and score gradients (backward), each one kernel between the block's matmuls.
//!
//! In Burn's ops each was about ten launches (cast, scale, mask, max, subtract, exp, sum,
//! divide, log, cast) with f32 copies of the block's scores and a `[rows, keys]` mask tensor;
//! here a query row's visible keys are the range `[lo, hi)` computed from its position (causal
//! and window), the scores are read in their dtype and computed in f32, and only the outputs
//! are written: the probabilities (and score gradients) in the scores' dtype, the log-sum-exp in
//! f32. Unit-level (shared memory and `sync_cube`, no plane ops), so lavapipe runs them.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::{cube_row, merge_online, online_add, output, row_cube_count};
use crate::fused::blockwise::{BlockOps, BlockSpan};

/// Units per row in [`block_softmax_kernel`]: a power of two (the tree reduction halves it).
const ROW_UNITS: usize = 256;

/// Units per cube in [`block_grad_kernel`].
const GRAD_UNITS: u32 = 256;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> BlockOps
    for CubeBackend<R, F, I, BT>
{
    fn block_softmax(scores: CubeTensor<R>, span: BlockSpan) -> (CubeTensor<R>, CubeTensor<R>) {
        let scores = into_contiguous(scores);
        let [b, h, rows, keys] = scores.shape().dims();
        let (client, dtype) = (scores.client.clone(), scores.dtype);
        let probs = output(&scores, scores.shape(), dtype);
        let lse = output(&scores, Shape::new([b, h, rows]), DType::F32);
        let [queries, first_query, first_key, window] = span_args(&span);
        block_softmax_kernel::launch::<R>(
            &client,
            row_cube_count(b * h * rows),
            CubeDim::new_1d(ROW_UNITS as u32),
            scores.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            rows as u32,
            keys as u32,
            queries,
            first_query,
            first_key,
            window,
            span.scale,
            dtype.into(),
        );
        (probs, lse)
    }

    fn block_grad(
        scores: CubeTensor<R>,
        dprobs: CubeTensor<R>,
        lse: CubeTensor<R>,
        delta: CubeTensor<R>,
        span: BlockSpan,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let [scores, dprobs, lse, delta] = [scores, dprobs, lse, delta].map(into_contiguous);
        assert_eq!(
            scores.shape(),
            dprobs.shape(),
            "block_grad: dprobs has the scores' shape"
        );
        assert_eq!(
            scores.dtype, dprobs.dtype,
            "block_grad: dprobs in the scores' dtype"
        );
        assert!(
            lse.dtype == DType::F32 && delta.dtype == DType::F32,
            "block_grad: lse and delta are f32"
        );
        let [_, _, rows, keys] = scores.shape().dims();
        let (client, dtype) = (scores.client.clone(), scores.dtype);
        let probs = output(&scores, scores.shape(), dtype);
        let dscores = output(&scores, scores.shape(), dtype);
        let elements = scores.shape().num_elements();
        let cube_dim = CubeDim::new_1d(GRAD_UNITS);
        let [queries, first_query, first_key, window] = span_args(&span);
        block_grad_kernel::launch::<R>(
            &client,
            calculate_cube_count_elemwise(&client, elements, cube_dim),
            cube_dim,
            scores.into_tensor_arg(),
            dprobs.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            dscores.clone().into_tensor_arg(),
            rows as u32,
            keys as u32,
            queries,
            first_query,
            first_key,
            window,
            span.scale,
            dtype.into(),
        );
        (probs, dscores)
    }
}

/// `[queries, first_query, first_key, window]` of `span` as kernel arguments (the window at
/// most `u32::MAX`: wider is the same as none).
fn span_args(span: &BlockSpan) -> [u32; 4] {
    let narrow = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    [
        narrow(span.queries.max(1)),
        narrow(span.first_query),
        narrow(span.first_key),
        narrow(span.window.max(1)),
    ]
}

/// The key columns `[lo, hi)` that row `row` of a `[.., rows, keys]` block sees: its position is
/// `first_query + (row % rows) % queries`; it sees positions `p + 1 - window ..= p`, of which the
/// block holds `first_key..first_key + keys` (every query of a block sees its own position,
/// which the block's keys include).
#[cube]
#[allow(clippy::too_many_arguments)]
fn visible(
    row: usize,
    rows: usize,
    keys: usize,
    queries: usize,
    first_query: usize,
    first_key: usize,
    window: usize,
) -> (usize, usize) {
    let p = first_query + (row % rows) % queries;
    let first_seen = select(p + 1 > window, p + 1 - window, 0);
    let lo = select(first_seen > first_key, first_seen - first_key, 0);
    let hi = select(p + 1 - first_key < keys, p + 1 - first_key, keys);
    (lo, hi)
}

/// One cube per row of `scores` `[.., rows, keys]` (contiguous): the softmax of the row's visible
/// keys' `scale * score` in f32 (online max and sum per unit, merged in shared memory), written
/// to `probs` (0 for the keys not seen), and its log-sum-exp to `lse[row]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn block_softmax_kernel<F: Float>(
    scores: &Tensor<F>,
    probs: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    rows: u32,
    keys: u32,
    queries: u32,
    first_query: u32,
    first_key: u32,
    window: u32,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = cube_row();
    if row >= lse.len() {
        terminate!();
    }
    let keys = keys as usize;
    let base = row * keys;
    let unit = UNIT_POS_X as usize;
    let (lo, hi) = visible(
        row,
        rows as usize,
        keys,
        queries as usize,
        first_query as usize,
        first_key as usize,
        window as usize,
    );

    // Lower than any score and finite: exp of it minus a score is 0.0, never a NaN.
    let mut state = (f32::new(-3.0e38), f32::new(0.0));
    let mut c = lo + unit;
    while c < hi {
        state = online_add(state.0, state.1, f32::cast_from(scores[base + c]) * scale);
        c += ROW_UNITS;
    }
    let (max, sum) = merge_online(state.0, state.1, ROW_UNITS);
    let inv = 1.0f32 / sum;
    let mut c = unit;
    while c < keys {
        let mut p = 0.0f32;
        if c >= lo && c < hi {
            p = (f32::cast_from(scores[base + c]) * scale - max).exp() * inv;
        }
        probs[base + c] = F::cast_from(p);
        c += ROW_UNITS;
    }
    if unit == 0 {
        lse[row] = max + sum.ln();
    }
}

/// One unit per element of the block `[.., rows, keys]` (contiguous): `P = exp(scale * score -
/// lse[row])` and `dS = scale * P * (dP - delta[row])` in f32, written in the scores' dtype
/// (both 0 for a key the row does not see).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn block_grad_kernel<F: Float>(
    scores: &Tensor<F>,
    dprobs: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    probs: &mut Tensor<F>,
    dscores: &mut Tensor<F>,
    rows: u32,
    keys: u32,
    queries: u32,
    first_query: u32,
    first_key: u32,
    window: u32,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = ABSOLUTE_POS;
    if pos >= probs.len() {
        terminate!();
    }
    let keys = keys as usize;
    let row = pos / keys;
    let c = pos % keys;
    let (lo, hi) = visible(
        row,
        rows as usize,
        keys,
        queries as usize,
        first_query as usize,
        first_key as usize,
        window as usize,
    );
    let mut p = 0.0f32;
    let mut ds = 0.0f32;
    if c >= lo && c < hi {
        p = (f32::cast_from(scores[pos]) * scale - lse[row]).exp();
        ds = p * (f32::cast_from(dprobs[pos]) - delta[row]) * scale;
    }
    probs[pos] = F::cast_from(p);
    dscores[pos] = F::cast_from(ds);
}

/// This module's kernels in `dtype` as CUDA compile tasks: see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{settings, task, tensor};
    let c = || client.clone();
    vec![
        task(
            "",
            block_softmax_kernel::BlockSoftmaxKernel::new(
                settings(ROW_UNITS),
                c(),
                tensor(),
                tensor(),
                tensor(),
                (),
                (),
                (),
                (),
                (),
                (),
                (),
                dtype,
            ),
        ),
        task(
            "",
            block_grad_kernel::BlockGradKernel::new(
                settings(GRAD_UNITS as usize),
                c(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                (),
                (),
                (),
                (),
                (),
                (),
                (),
                dtype,
            ),
        ),
    ]
}
