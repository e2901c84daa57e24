//! ZeRO's collectives on NCCL (`training.zero_stage` 1 and 2), in place on the resident engine's
//! flat device buffers, over the split every other path uses ([`shard_range`], so checkpoints are
//! interchangeable): the reduce of one bucket of stage 2's gradients to the ranks that own it
//! (one grouped `ncclReduce` (mean) per owner), the all-gather of the updated weights (f32, or
//! the bf16 compute copy of sharded master weights), the gather of sharded f32 master weights to
//! the host for a checkpoint, and the reduce-scatter (mean) of a whole buffer (the host-buffer
//! `Collective` impl's). When a buffer divides evenly by the world the last two are
//! `ncclReduceScatter` / `ncclAllGather` in place; when it does not (NCCL's collectives
//! take equal counts per rank, and the split gives the first `len % world` ranks one element
//! more) it is one grouped `ncclReduce` (mean) or `ncclBroadcast` per rank's slice, rooted at its
//! owner, also in place: no padded copy of a buffer the size of the model. Every call goes
//! through the parent's polling, abort and timeout. Untested on hardware until a GPU session runs
//! them (docs/gpu.md).

use std::ffi::c_void;

use burn::tensor::{DType, Tensor};
use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nccl;

use super::{check, f32_only, NcclCollective};
use crate::collective::{shard_range, CollectiveError};
use crate::train::resident::{owned_part, GradReducer, OwnedPart};
use crate::Gpu;

/// The element types the collectives move: f32 (gradients, master weights), and bf16 for the
/// all-gather of the compute copy of sharded master weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    F32,
    Bf16,
}

impl Wire {
    pub(super) fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Wire::F32),
            DType::BF16 => Some(Wire::Bf16),
            _ => None,
        }
    }

    pub(super) fn nccl(self) -> nccl::ncclDataType_t {
        match self {
            Wire::F32 => nccl::ncclDataType_t::ncclFloat32,
            Wire::Bf16 => nccl::ncclDataType_t::ncclBfloat16,
        }
    }

    pub(super) fn bytes(self) -> usize {
        match self {
            Wire::F32 => 4,
            Wire::Bf16 => 2,
        }
    }
}

/// Elements per broadcast when sharded master weights are gathered to the host (64 MB of f32).
const GATHER_CHUNK: usize = 16 << 20;

impl NcclCollective {
    /// In place over the `count` f32s at `ptr`: on return this rank's slice
    /// (`shard_range(count, world, rank)`) holds the mean across ranks of that slice; the rest
    /// is unchanged or scratch.
    ///
    /// # Safety
    /// As [`NcclCollective::all_reduce_mean_raw`].
    pub unsafe fn reduce_scatter_mean_raw(
        &mut self,
        ptr: cu::CUdeviceptr,
        count: usize,
    ) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        let at = move |i: usize| (ptr + 4 * i as u64) as *mut c_void;
        self.run("reduce-scatter", |comm, stream| {
            if count.is_multiple_of(world) {
                let chunk = count / world;
                // In place: NCCL reduces into `sendbuff + rank * recvcount`, this rank's slice.
                // SAFETY: both addresses lie in the caller's buffer.
                return check("ncclReduceScatter", unsafe {
                    nccl::ncclReduceScatter(
                        at(0),
                        at(rank * chunk),
                        chunk,
                        nccl::ncclDataType_t::ncclFloat32,
                        nccl::ncclRedOp_t::ncclAvg,
                        comm,
                        stream,
                    )
                });
            }
            group(|| {
                (0..world).try_for_each(|root| {
                    let r = shard_range(count, world, root);
                    // SAFETY: the slice lies in the caller's buffer.
                    unsafe { reduce_mean_in_place(at(r.start), r.len(), root, comm, stream) }
                })
            })
        })
    }

    /// In place over the `count` f32s at `ptr`, gradients `at..at + count` of a flat buffer of
    /// `total` elements: on return the part of them this rank owns
    /// (`owned_part(at, count, total, world, rank)`) holds the mean across ranks; the rest is
    /// unchanged or scratch. One grouped `ncclReduce` (mean) per rank whose slice meets the
    /// bucket, rooted at that rank.
    ///
    /// # Safety
    /// As [`NcclCollective::all_reduce_mean_raw`].
    pub unsafe fn reduce_bucket_mean_raw(
        &mut self,
        ptr: cu::CUdeviceptr,
        count: usize,
        at: usize,
        total: usize,
    ) -> Result<(), CollectiveError> {
        let world = self.world;
        let addr = move |i: usize| (ptr + 4 * (i - at) as u64) as *mut c_void;
        self.run("reduce (a gradient bucket)", |comm, stream| {
            group(|| {
                (0..world).try_for_each(|root| {
                    let Some(r) = owned_part(at, count, total, world, root) else {
                        return Ok(());
                    };
                    // SAFETY: the part lies in the caller's bucket.
                    unsafe { reduce_mean_in_place(addr(r.start), r.len(), root, comm, stream) }
                })
            })
        })
    }

    /// In place over the `count` elements of type `wire` at `ptr`, each rank's slice filled by
    /// its owner: on return every rank holds every slice.
    ///
    /// # Safety
    /// As [`NcclCollective::all_reduce_mean_raw`], for `count` elements of `wire`.
    pub unsafe fn all_gather_raw(
        &mut self,
        ptr: cu::CUdeviceptr,
        count: usize,
        wire: Wire,
    ) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        let at = move |i: usize| (ptr + (wire.bytes() * i) as u64) as *mut c_void;
        self.run("all-gather", |comm, stream| {
            if count.is_multiple_of(world) {
                let chunk = count / world;
                // In place: NCCL sends from `recvbuff + rank * sendcount`, this rank's slice.
                // SAFETY: both addresses lie in the caller's buffer.
                return check("ncclAllGather", unsafe {
                    nccl::ncclAllGather(at(rank * chunk), at(0), chunk, wire.nccl(), comm, stream)
                });
            }
            group(|| {
                (0..world).try_for_each(|root| {
                    let r = shard_range(count, world, root);
                    // SAFETY: the slice lies in the caller's buffer; in place everywhere.
                    check("ncclBroadcast", unsafe {
                        nccl::ncclBroadcast(
                            at(r.start),
                            at(r.start),
                            r.len(),
                            wire.nccl(),
                            root as i32,
                            comm,
                            stream,
                        )
                    })
                })
            })
        })
    }

    /// Rank `root`'s `count` f32s at `ptr` to every rank, in place.
    ///
    /// # Safety
    /// As [`NcclCollective::all_reduce_mean_raw`].
    pub unsafe fn broadcast_raw(
        &mut self,
        ptr: cu::CUdeviceptr,
        count: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        let buf = ptr as *mut c_void;
        self.run("broadcast", |comm, stream| {
            // SAFETY: the caller vouches for the buffer; in place on every rank.
            check("ncclBroadcast", unsafe {
                nccl::ncclBroadcast(
                    buf as *const c_void,
                    buf,
                    count,
                    nccl::ncclDataType_t::ncclFloat32,
                    root as i32,
                    comm,
                    stream,
                )
            })
        })
    }

    /// ZeRO stage 2: see [`GradReducer::reduce_bucket_mean`]; reduced in place on the device,
    /// the owned part returned as a view of the bucket.
    pub fn reduce_bucket_mean_tensor(
        &mut self,
        piece: Tensor<Gpu, 1>,
        at: usize,
        total: usize,
    ) -> Result<OwnedPart<Gpu>, CollectiveError> {
        f32_only("a gradient bucket's reduce", &piece)?;
        let len = piece.dims()[0];
        let piece = self.on_device(piece, |nccl, ptr, count, _| {
            // SAFETY: as `on_device` promises.
            unsafe { nccl.reduce_bucket_mean_raw(ptr, count, at, total) }
        })?;
        Ok(owned_part(at, len, total, self.world, self.rank)
            .map(|part| (part.clone(), piece.slice(part.start - at..part.end - at))))
    }

    /// ZeRO: every rank's slice of the flat `buf` (f32, or the bf16 compute copy of sharded
    /// master weights; each rank's own slice current) on every rank, gathered in place on the
    /// device.
    pub fn all_gather_tensor(
        &mut self,
        buf: Tensor<Gpu, 1>,
    ) -> Result<Tensor<Gpu, 1>, CollectiveError> {
        self.on_device(buf, |nccl, ptr, count, wire| {
            // SAFETY: as `on_device` promises.
            unsafe { nccl.all_gather_raw(ptr, count, wire) }
        })
    }

    /// ZeRO with sharded f32 master weights: the whole flat buffer of `len` f32s on the host,
    /// from every rank's slice (`own`, this rank's, on the device), broadcast by its owner in
    /// pieces of [`GATHER_CHUNK`] through the staging buffer: never a device buffer the size of
    /// the model.
    pub fn gather_to_host(
        &mut self,
        own: Tensor<Gpu, 1>,
        len: usize,
    ) -> Result<Vec<f32>, CollectiveError> {
        let mine = own
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| CollectiveError::Config(format!("master weights: {e:?}")))?;
        let mut out = vec![0f32; len];
        for root in 0..self.world {
            let r = shard_range(len, self.world, root);
            if root == self.rank {
                if mine.len() != r.len() {
                    return Err(CollectiveError::Config(format!(
                        "a master slice of {} elements where rank {root} owns {r:?}",
                        mine.len()
                    )));
                }
                out[r.clone()].copy_from_slice(&mine);
            }
            for start in r.clone().step_by(GATHER_CHUNK) {
                let end = (start + GATHER_CHUNK).min(r.end);
                self.staged(&mut out[start..end], |nccl, ptr, count| {
                    // SAFETY: the staging buffer holds `count` f32s, used by nothing else.
                    unsafe { nccl.broadcast_raw(ptr, count, root) }
                })?;
            }
        }
        Ok(out)
    }
}

/// `ncclReduce` (mean) of the `count` f32s at `buf` to rank `root`, in place there.
///
/// # Safety
/// `buf` holds `count` f32s on this rank's device, and nothing else uses them until the stream
/// is done.
unsafe fn reduce_mean_in_place(
    buf: *mut c_void,
    count: usize,
    root: usize,
    comm: nccl::ncclComm_t,
    stream: nccl::cudaStream_t,
) -> Result<(), CollectiveError> {
    // SAFETY: as the caller promises.
    check("ncclReduce", unsafe {
        nccl::ncclReduce(
            buf,
            buf,
            count,
            nccl::ncclDataType_t::ncclFloat32,
            nccl::ncclRedOp_t::ncclAvg,
            root as i32,
            comm,
            stream,
        )
    })
}

/// Opens an NCCL group around `calls` (one launch for several operations) and closes it even
/// when one of them failed, as NCCL requires.
fn group(calls: impl FnOnce() -> Result<(), CollectiveError>) -> Result<(), CollectiveError> {
    // SAFETY: no arguments; pairs with the `ncclGroupEnd` below.
    check("ncclGroupStart", unsafe { nccl::ncclGroupStart() })?;
    let issued = calls();
    // SAFETY: closes the group opened above.
    let ended = check("ncclGroupEnd", unsafe { nccl::ncclGroupEnd() });
    issued.and(ended)
}

impl GradReducer<Gpu> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(
        &mut self,
        grads: Tensor<Gpu, 1>,
    ) -> Result<Tensor<Gpu, 1>, CollectiveError> {
        self.all_reduce_mean_tensor(grads)
    }

    fn reduce_bucket_mean(
        &mut self,
        piece: Tensor<Gpu, 1>,
        at: usize,
        total: usize,
    ) -> Result<OwnedPart<Gpu>, CollectiveError> {
        self.reduce_bucket_mean_tensor(piece, at, total)
    }

    fn all_gather(&mut self, buf: Tensor<Gpu, 1>) -> Result<Tensor<Gpu, 1>, CollectiveError> {
        self.all_gather_tensor(buf)
    }

    fn gather_to_host(
        &mut self,
        own: Tensor<Gpu, 1>,
        len: usize,
    ) -> Result<Vec<f32>, CollectiveError> {
        NcclCollective::gather_to_host(self, own, len)
    }

    /// Through the host-staged all-gather: two f32 words per rank.
    fn gather_u64(&mut self, value: u64) -> Result<Vec<u64>, CollectiveError> {
        crate::train::zero::gather_u64(self, value)
    }
}
