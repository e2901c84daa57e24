//! Flash attention's CubeCL kernels: a forward that writes the output and each row's
//! log-sum-exp, and a FlashAttention-2 backward in two kernels without atomics (`dQ` parallel
//! over query blocks, `dK`/`dV` parallel over key blocks).
//!
//! Unit level, so that they run on every CubeCL runtime including Mesa's lavapipe (no plane
//! ops, no cooperative matrix): one unit per query row (forward, `dQ`) or key row (`dK`/`dV`),
//! that row's `head_dim` accumulators and own input rows in local arrays (registers on a GPU),
//! and the other side's rows in shared memory tiles of `block` rows loaded by the whole cube.
//! (Own rows in shared memory instead were tried: fewer registers and no spills, but one
//! shared-memory read per FMA where the tiles' broadcast reads are one per four; docs/gpu.md.)
//! A cube's units are `block` consecutive rows of one head of one sequence; a cube visits only
//! the tiles its rows see (blocks above the diagonal and outside the sliding window are never
//! loaded). Values are read in the tensors' own float type (f32, f16 or bf16, dispatched at run
//! time) and accumulated in f32.
//! Tensor-core (cmma) variants are not written: no GPU was at hand to tune them; the tensor-core
//! alternative is `fused::blockwise` (Burn matmuls per query block), `DAPT_ATTENTION`'s default
//! since an H200 measured it 3x faster at head dim 64 and 19x at 128 (`blockwise::AttentionChoice`).
//!
//! Layouts (all contiguous): `q`, `out`, `dout`, `dq` `[batch * seq, heads * head_dim]`;
//! `k`, `v`, `dk`, `dv` `[batch * seq, kv_heads * head_dim]`; `lse` and `delta`
//! `[batch, heads, seq]` f32.

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, tensor::CubeTensor, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::output;
use crate::fused::attention::{AttentionOps, AttentionShape};
use crate::fused::blockwise;

/// Shared memory per tile set, in f32 values: two `[block, head_dim]` tiles use at most
/// 16 KiB, half of the 32 KiB that lavapipe (and the smallest GPUs) give a cube.
const TILE_VALUES: usize = 2048;

/// Rows per tile (and units per cube) for `head_dim`.
fn block_rows(head_dim: usize) -> usize {
    (TILE_VALUES / head_dim).clamp(1, 32)
}

/// The first key that query `i` sees (`i + 1 - window`, at least 0).
#[cube]
fn first_key(i: usize, window: usize) -> usize {
    select(i + 1 > window, i + 1 - window, 0)
}

/// Loads rows `first..first + block` (those below `seq`; zeros past it) of one head of a
/// `[batch * seq, heads * hd]` tensor into `tile` `[block, hd]` as f32, cooperatively.
#[cube]
fn load_tile<F: Float>(
    src: &Tensor<F>,
    tile: &mut SharedMemory<f32>,
    batch_row: usize,
    first: usize,
    seq: usize,
    col: usize,
    #[comptime] hd: usize,
    #[comptime] block: usize,
) {
    let width = src.stride(0);
    let mut idx = UNIT_POS_X as usize;
    while idx < block * hd {
        let r = first + idx / hd;
        let mut x = 0.0f32;
        if r < seq {
            x = f32::cast_from(src[(batch_row + r) * width + col + idx % hd]);
        }
        tile[idx] = x;
        idx += block;
    }
}

/// Loads `block` per-row values of `[batch, heads, seq]` f32 `src` from `base + first` into
/// `tile` (zeros past `seq`).
#[cube]
fn load_rows(
    src: &Tensor<f32>,
    tile: &mut SharedMemory<f32>,
    base: usize,
    first: usize,
    seq: usize,
) {
    let u = UNIT_POS_X as usize;
    let mut x = 0.0f32;
    if first + u < seq {
        x = src[base + first + u];
    }
    tile[u] = x;
}

/// Forward: one unit per query row; cube `(query block, head, batch)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    seq: u32,
    heads: u32,
    group: u32,
    window: u32,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] block: usize,
    #[comptime] unroll: bool,
    #[define(F)] _dtype: StorageType,
) {
    let seq = seq as usize;
    let heads = heads as usize;
    let window = window as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let q_first = CUBE_POS_X as usize * block;
    let i = q_first + UNIT_POS_X as usize;
    let valid = i < seq;
    let batch_row = b * seq;
    let q_col = h * hd;
    let kv_col = (h / group as usize) * hd;
    let q_width = q.stride(0);

    // This unit's query, pre-scaled, and its running softmax state.
    let mut qi = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    let mut scores = Array::<f32>::new(block);
    #[unroll(unroll)]
    for d in 0..hd {
        let mut x = 0.0f32;
        if valid {
            x = f32::cast_from(q[(batch_row + i) * q_width + q_col + d]) * scale;
        }
        qi[d] = x;
        acc[d] = 0.0f32;
    }
    // A score no real one is below (finite: some backends reject an infinite literal).
    let mut max = f32::new(-1.0e30);
    let mut sum = 0.0f32;
    let lo = first_key(i, window);

    let mut k_tile = SharedMemory::<f32>::new(block * hd);
    let mut v_tile = SharedMemory::<f32>::new(block * hd);
    let q_last = select(q_first + block < seq, q_first + block, seq) - 1;
    let mut kb = first_key(q_first, window);
    while kb <= q_last {
        sync_cube();
        load_tile::<F>(k, &mut k_tile, batch_row, kb, seq, kv_col, hd, block);
        load_tile::<F>(v, &mut v_tile, batch_row, kb, seq, kv_col, hd, block);
        sync_cube();
        let mut block_max = max;
        for jj in 0..block {
            let j = kb + jj;
            let mut s = f32::new(-1.0e30);
            if valid && j >= lo && j <= i {
                s = 0.0f32;
                #[unroll(unroll)]
                for d in 0..hd {
                    s += qi[d] * k_tile[jj * hd + d];
                }
                if s > block_max {
                    block_max = s;
                }
            }
            scores[jj] = s;
        }
        let correction = (max - block_max).exp();
        sum *= correction;
        #[unroll(unroll)]
        for d in 0..hd {
            acc[d] *= correction;
        }
        for jj in 0..block {
            let j = kb + jj;
            if valid && j >= lo && j <= i {
                let p = (scores[jj] - block_max).exp();
                sum += p;
                #[unroll(unroll)]
                for d in 0..hd {
                    acc[d] += p * v_tile[jj * hd + d];
                }
            }
        }
        max = block_max;
        kb += block;
    }
    if valid {
        // Query `i` sees key `i`: `sum >= 1`.
        let inv = 1.0f32 / sum;
        #[unroll(unroll)]
        for d in 0..hd {
            out[(batch_row + i) * q_width + q_col + d] = F::cast_from(acc[d] * inv);
        }
        lse[(b * heads + h) * seq + i] = max + sum.ln();
    }
}

/// `dQ` and `delta = rowsum(dO * O)`: one unit per query row; cube `(query block, head, batch)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    seq: u32,
    heads: u32,
    group: u32,
    window: u32,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] block: usize,
    #[comptime] unroll: bool,
    #[define(F)] _dtype: StorageType,
) {
    let seq = seq as usize;
    let heads = heads as usize;
    let window = window as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let q_first = CUBE_POS_X as usize * block;
    let i = q_first + UNIT_POS_X as usize;
    let valid = i < seq;
    let batch_row = b * seq;
    let q_col = h * hd;
    let kv_col = (h / group as usize) * hd;
    let q_width = q.stride(0);
    let row = (batch_row + i) * q_width + q_col;

    let mut qi = Array::<f32>::new(hd);
    let mut doi = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    let mut di = 0.0f32;
    let mut lse_i = 0.0f32;
    if valid {
        lse_i = lse[(b * heads + h) * seq + i];
    }
    #[unroll(unroll)]
    for d in 0..hd {
        let mut x = 0.0f32;
        let mut dx = 0.0f32;
        if valid {
            x = f32::cast_from(q[row + d]) * scale;
            dx = f32::cast_from(dout[row + d]);
            di += dx * f32::cast_from(out[row + d]);
        }
        qi[d] = x;
        doi[d] = dx;
        acc[d] = 0.0f32;
    }
    let lo = first_key(i, window);

    let mut k_tile = SharedMemory::<f32>::new(block * hd);
    let mut v_tile = SharedMemory::<f32>::new(block * hd);
    let q_last = select(q_first + block < seq, q_first + block, seq) - 1;
    let mut kb = first_key(q_first, window);
    while kb <= q_last {
        sync_cube();
        load_tile::<F>(k, &mut k_tile, batch_row, kb, seq, kv_col, hd, block);
        load_tile::<F>(v, &mut v_tile, batch_row, kb, seq, kv_col, hd, block);
        sync_cube();
        for jj in 0..block {
            let j = kb + jj;
            if valid && j >= lo && j <= i {
                let mut s = 0.0f32;
                let mut dp = 0.0f32;
                #[unroll(unroll)]
                for d in 0..hd {
                    s += qi[d] * k_tile[jj * hd + d];
                    dp += doi[d] * v_tile[jj * hd + d];
                }
                let ds = (s - lse_i).exp() * (dp - di);
                #[unroll(unroll)]
                for d in 0..hd {
                    acc[d] += ds * k_tile[jj * hd + d];
                }
            }
        }
        kb += block;
    }
    if valid {
        #[unroll(unroll)]
        for d in 0..hd {
            dq[row + d] = F::cast_from(acc[d] * scale);
        }
        delta[(b * heads + h) * seq + i] = di;
    }
}

/// `dK` and `dV`, summed over the kv head's query heads: one unit per key row; cube
/// `(key block, kv head, batch)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dkv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    seq: u32,
    heads: u32,
    group: u32,
    window: u32,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] block: usize,
    #[comptime] unroll: bool,
    #[define(F)] _dtype: StorageType,
) {
    let seq = seq as usize;
    let heads = heads as usize;
    let group = group as usize;
    let window = window as usize;
    let g = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let k_first = CUBE_POS_X as usize * block;
    let j = k_first + UNIT_POS_X as usize;
    let valid = j < seq;
    let batch_row = b * seq;
    let kv_width = k.stride(0);
    let row = (batch_row + j) * kv_width + g * hd;

    let mut kj = Array::<f32>::new(hd);
    let mut vj = Array::<f32>::new(hd);
    let mut dkj = Array::<f32>::new(hd);
    let mut dvj = Array::<f32>::new(hd);
    #[unroll(unroll)]
    for d in 0..hd {
        let mut x = 0.0f32;
        let mut y = 0.0f32;
        if valid {
            x = f32::cast_from(k[row + d]) * scale;
            y = f32::cast_from(v[row + d]);
        }
        kj[d] = x;
        vj[d] = y;
        dkj[d] = 0.0f32;
        dvj[d] = 0.0f32;
    }

    let mut q_tile = SharedMemory::<f32>::new(block * hd);
    let mut do_tile = SharedMemory::<f32>::new(block * hd);
    let mut lse_tile = SharedMemory::<f32>::new(block);
    let mut delta_tile = SharedMemory::<f32>::new(block);
    let k_last = select(k_first + block < seq, k_first + block, seq) - 1;
    // The last query that sees any of this cube's keys, plus one.
    let q_end = select(k_last + window < seq, k_last + window, seq);
    for hg in 0..group {
        let h = g * group + hg;
        let rows = (b * heads + h) * seq;
        let mut qb = k_first;
        while qb < q_end {
            sync_cube();
            load_tile::<F>(q, &mut q_tile, batch_row, qb, seq, h * hd, hd, block);
            load_tile::<F>(dout, &mut do_tile, batch_row, qb, seq, h * hd, hd, block);
            load_rows(lse, &mut lse_tile, rows, qb, seq);
            load_rows(delta, &mut delta_tile, rows, qb, seq);
            sync_cube();
            for ii in 0..block {
                let i = qb + ii;
                if valid && i < seq && j <= i && i < j + window {
                    let mut s = 0.0f32;
                    let mut dp = 0.0f32;
                    #[unroll(unroll)]
                    for d in 0..hd {
                        s += q_tile[ii * hd + d] * kj[d];
                        dp += do_tile[ii * hd + d] * vj[d];
                    }
                    let p = (s - lse_tile[ii]).exp();
                    let ds = p * (dp - delta_tile[ii]);
                    #[unroll(unroll)]
                    for d in 0..hd {
                        dvj[d] += p * do_tile[ii * hd + d];
                        dkj[d] += ds * q_tile[ii * hd + d];
                    }
                }
            }
            qb += block;
        }
    }
    if valid {
        #[unroll(unroll)]
        for d in 0..hd {
            dk[row + d] = F::cast_from(dkj[d] * scale);
            dv[row + d] = F::cast_from(dvj[d]);
        }
    }
}

/// The launch geometry shared by the kernels: `block` units per cube, one cube per `block`
/// rows of each head of each sequence.
fn cubes(shape: &AttentionShape, heads: usize, block: usize) -> (CubeCount, CubeDim) {
    let count = CubeCount::Static(
        shape.seq.div_ceil(block) as u32,
        heads as u32,
        shape.batch as u32,
    );
    (count, CubeDim::new_1d(block as u32))
}

/// Whether to unroll the loops over `head_dim` (the accumulators then live in registers):
/// yes on GPUs; not on wgpu, where lavapipe's LLVM takes minutes over an unrolled kernel with
/// barriers (it compiles them as coroutines).
fn unroll<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    !R::name(client).starts_with("wgpu")
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionOps
    for CubeBackend<R, F, I, BT>
{
    fn flash_attention_forward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        shape: AttentionShape,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        if blockwise::use_blockwise() {
            return blockwise::forward::<Self>(q, k, v, shape, blockwise::block_positions(&shape));
        }
        forward(q, k, v, shape)
    }

    fn flash_attention_backward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        out: CubeTensor<R>,
        lse: CubeTensor<R>,
        dout: CubeTensor<R>,
        shape: AttentionShape,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        if blockwise::use_blockwise() {
            let block = blockwise::block_positions(&shape);
            return blockwise::backward::<Self>(q, k, v, out, lse, dout, shape, block);
        }
        backward(q, k, v, out, lse, dout, shape)
    }
}

/// [`AttentionOps::flash_attention_forward`] by the unit-level kernels, whatever
/// `DAPT_ATTENTION` says: `(out, lse)`.
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    shape: AttentionShape,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let s = shape;
    let block = block_rows(s.head_dim);
    let dtype = q.dtype;
    let out = output(&q, q.meta.shape().clone(), dtype);
    let lse = output(&q, Shape::new([s.batch, s.heads, s.seq]), DType::F32);
    let client = q.client.clone();
    let (count, dim) = cubes(&s, s.heads, block);
    forward_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        s.seq as u32,
        s.heads as u32,
        s.group() as u32,
        s.effective_window() as u32,
        s.scale() as f32,
        s.head_dim,
        block,
        unroll::<R>(&client),
        dtype.into(),
    );
    (out, lse)
}

/// [`AttentionOps::flash_attention_backward`] by the unit-level kernels, whatever
/// `DAPT_ATTENTION` says: `(dq, dk, dv)`.
pub fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    dout: CubeTensor<R>,
    shape: AttentionShape,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let [q, k, v, out, dout] = [q, k, v, out, dout].map(into_contiguous);
    let lse = into_contiguous(lse);
    let s = shape;
    let block = block_rows(s.head_dim);
    let dtype = q.dtype;
    let dq = output(&q, q.meta.shape().clone(), dtype);
    let dk = output(&k, k.meta.shape().clone(), dtype);
    let dv = output(&v, v.meta.shape().clone(), dtype);
    let delta = output(&q, Shape::new([s.batch, s.heads, s.seq]), DType::F32);
    let client = q.client.clone();
    let (count, dim) = cubes(&s, s.heads, block);
    dq_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        dout.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        s.seq as u32,
        s.heads as u32,
        s.group() as u32,
        s.effective_window() as u32,
        s.scale() as f32,
        s.head_dim,
        block,
        unroll::<R>(&client),
        dtype.into(),
    );
    let (count, dim) = cubes(&s, s.kv_heads, block);
    dkv_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        dout.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        s.seq as u32,
        s.heads as u32,
        s.group() as u32,
        s.effective_window() as u32,
        s.scale() as f32,
        s.head_dim,
        block,
        unroll::<R>(&client),
        dtype.into(),
    );
    (dq, dk, dv)
}

/// This module's kernels in `dtype` as CUDA compile tasks, for head dims 64 and 128, unrolled as
/// on a GPU: see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{settings, task, tensor};
    let mut tasks: Vec<super::cuda_source::CudaTask> = Vec::new();
    for hd in [64, 128] {
        let block = block_rows(hd);
        let c = || client.clone();
        tasks.push(task(
            format!("hd={hd}"),
            forward_kernel::ForwardKernel::new(
                settings(block),
                c(),
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
                hd,
                block,
                true,
                dtype,
            ),
        ));
        tasks.push(task(
            format!("hd={hd}"),
            dq_kernel::DqKernel::new(
                settings(block),
                c(),
                tensor(),
                tensor(),
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
                hd,
                block,
                true,
                dtype,
            ),
        ));
        tasks.push(task(
            format!("hd={hd}"),
            dkv_kernel::DkvKernel::new(
                settings(block),
                c(),
                tensor(),
                tensor(),
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
                hd,
                block,
                true,
                dtype,
            ),
        ));
    }
    tasks
}
