//! CubeCL's allocator (cubecl-runtime 0.10's `MemoryManagement`, the code every CubeCL runtime
//! allocates device memory through) at the sizes of real GPUs, over a storage that only counts
//! bytes: the premise of `memory::allocate_persistent`, checked without a GPU.
//!
//! With CUDA's default configuration (`SubSlices`, the largest page a quarter of the device,
//! 512-byte alignment: vendor/cubecl-cuda `runtime.rs`) the 1B shape's four flat f32 buffers
//! reserve a whole 35.1 GiB page on an H200, and a 7B flat f32 buffer on an 80 GB H100 is
//! refused; in persistent mode each takes its own size.

use std::collections::HashMap;
use std::sync::Arc;

use cubecl_ir::MemoryDeviceProperties;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{
    MemoryAllocationMode, MemoryConfiguration, MemoryManagement, MemoryManagementOptions,
};
use cubecl_runtime::server::IoError;
use cubecl_runtime::storage::{ComputeStorage, StorageHandle, StorageId, StorageUtilization};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A device's memory that is never touched: it only keeps the sizes allocated.
#[derive(Default)]
struct Counted {
    live: HashMap<StorageId, u64>,
}

impl Counted {
    fn bytes(&self) -> u64 {
        self.live.values().sum()
    }
}

impl ComputeStorage for Counted {
    type Resource = ();

    fn alignment(&self) -> usize {
        512
    }

    fn get(&mut self, _handle: &StorageHandle) {}

    fn alloc(&mut self, size: u64) -> Result<StorageHandle, IoError> {
        let id = StorageId::new();
        self.live.insert(id, size);
        Ok(StorageHandle::new(
            id,
            StorageUtilization { offset: 0, size },
        ))
    }

    fn dealloc(&mut self, id: StorageId) {
        self.live.remove(&id);
    }

    fn flush(&mut self) {}
}

/// CUDA's allocator for a device of `total` bytes, as `CudaServer::init` makes it.
fn cuda_allocator(total: u64) -> MemoryManagement<Counted> {
    MemoryManagement::from_configuration(
        Counted::default(),
        &MemoryDeviceProperties {
            max_page_size: total / 4,
            alignment: 512,
        },
        MemoryConfiguration::SubSlices,
        Arc::new(ServerLogger::default()),
        MemoryManagementOptions::new("test"),
    )
}

/// An H200 as `cuDeviceTotalMem` gives it (143,771 MiB; nvidia-smi, 2026-11-29).
const H200: u64 = 143_771 * MIB;
/// An 80 GB H100 (81,559 MiB).
const H100: u64 = 81_559 * MIB;
/// Llama-3.2-1B's parameters (tied embeddings), and so the f32 flat buffers' bytes.
const LLAMA_1B_FLAT: u64 = 1_235_814_400 * 4;
/// Llama-2-7B's.
const LLAMA_7B_FLAT: u64 = 6_738_415_616 * 4;

#[test]
fn the_default_pools_put_the_1b_flat_buffers_in_a_quarter_of_an_h200() {
    let mut pools = cuda_allocator(H200);
    let held: Vec<_> = (0..4)
        .map(|_| pools.reserve(LLAMA_1B_FLAT).expect("a flat buffer"))
        .collect();
    let usage = pools.memory_usage();
    assert_eq!(usage.bytes_in_use, 4 * LLAMA_1B_FLAT);
    // One page of the largest pool: a quarter of the device, 35.1 GiB for 18.4 GiB of buffers.
    assert_eq!(usage.bytes_reserved, (H200 / 4) / 512 * 512);
    assert_eq!(pools.storage().bytes(), usage.bytes_reserved);
    println!(
        "H200, default pools: {:.1} GiB reserved for {:.1} GiB of flat buffers",
        usage.bytes_reserved as f64 / GIB as f64,
        usage.bytes_in_use as f64 / GIB as f64
    );
    drop(held);
}

#[test]
fn persistent_buffers_take_their_own_size_and_are_reused() {
    let mut pools = cuda_allocator(H200);
    pools.mode(MemoryAllocationMode::Persistent);
    let held: Vec<_> = (0..4)
        .map(|_| pools.reserve(LLAMA_1B_FLAT).expect("a flat buffer"))
        .collect();
    pools.mode(MemoryAllocationMode::Auto);
    let usage = pools.memory_usage();
    assert_eq!(
        usage.bytes_reserved,
        4 * LLAMA_1B_FLAT.next_multiple_of(512)
    );
    // The next step's gradient buffer, asked for outside persistent mode, reuses a freed one.
    let mut held = held;
    drop(held.pop());
    held.push(pools.reserve(LLAMA_1B_FLAT).expect("a flat buffer"));
    assert_eq!(pools.memory_usage().bytes_reserved, usage.bytes_reserved);
    assert_eq!(pools.storage().bytes(), usage.bytes_reserved);
}

#[test]
fn a_7b_flat_buffer_is_refused_by_the_default_pools_of_an_80_gb_gpu_and_not_when_persistent() {
    let mut pools = cuda_allocator(H100);
    assert!(
        matches!(
            pools.reserve(LLAMA_7B_FLAT),
            Err(IoError::BufferTooBig { .. })
        ),
        "27 GB above the 19.9 GiB largest page"
    );
    pools.mode(MemoryAllocationMode::Persistent);
    let buffer = pools.reserve(LLAMA_7B_FLAT).expect("persistent: any size");
    assert_eq!(
        pools.memory_usage().bytes_reserved,
        LLAMA_7B_FLAT.next_multiple_of(512)
    );
    drop(buffer);
}
