//! Keeping freed memory in the process, and allocating model-sized device buffers exactly.
//!
//! A training step allocates and frees the same large buffers every time (activations,
//! gradients, the flat copies). glibc returns allocations above its mmap threshold to the kernel
//! on free, so the next step page-faults every page back in and the kernel zeroes it: 20% of a
//! SmolLM2-135M step on the CPU was `clear_page` and page faults. Raising the mmap and trim
//! thresholds keeps that memory for reuse (63 -> 91 tokens/s on SmolLM2; peak RSS +8%).

/// Raises glibc's mmap and trim thresholds; returns whether glibc accepted them (elsewhere a
/// no-op returning false).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts allocator parameters; it is called before the training
        // threads start and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// `make()`, with every device buffer it allocates given exactly its size: CubeCL's persistent
/// memory (Burn's `Backend::memory_persistent_allocations`; elsewhere just `make()`).
///
/// For the few long-lived, model-sized buffers (the flat f32 weights, AdamW moments and
/// gradients; the bf16 compute copy). CubeCL's default pools (`MemoryConfiguration::SubSlices`,
/// cubecl-runtime 0.10 `memory_management/memory_manage.rs`) serve a request by slicing a page
/// allocated whole and kept; pages are a quarter of the device (35 GiB on an H200, 20 GiB on an
/// 80 GB H100) and that over powers of 4 below it, and a request above an eighth of the largest
/// page (bar a band just under a quarter of it) gets a page of the largest size: the 1B shape's
/// four 4.6 GiB flat buffers held a 35 GiB page, 17 GiB of it never used, and a flat buffer
/// above the largest page (7B's 25 GiB on an H100) is refused (`BufferTooBig`). A persistent
/// buffer is allocated at its size; a freed one is reused by the next request of the same size
/// (the next step's gradient buffer), and any request of a size that a persistent buffer has
/// is served from the persistent pool, so a same-sized transient is exact as well. Allocate
/// only what lives across steps in here, and launch no kernel: anything else allocated inside
/// `make` (a transient, a kernel's metadata) is persistent too, stays reserved until
/// [`release_freed_memory`], and draws every later request of its size into the persistent
/// pool. (A persistent buffer may be larger than the largest page: CubeCL does not check.)
pub fn allocate_persistent<B: burn::tensor::backend::Backend, T: Send>(
    device: &B::Device,
    make: impl FnOnce() -> T + Send,
) -> T {
    B::memory_persistent_allocations(device, make, |make| make())
}

/// Gives the device's free pages and freed persistent buffers back to the driver (CubeCL's
/// explicit memory cleanup of the calling thread's stream; a no-op on the CPU), and waits for
/// the device: CubeCL only queues the cleanup, and its device thread runs a queue when it fills
/// or something waits. For the end of a generation: its buffers are dropped, and the next
/// one's may have other sizes.
pub fn release_freed_memory<B: burn::tensor::backend::Backend>(device: &B::Device) {
    B::memory_cleanup(device);
    let _ = B::sync(device);
}

/// `n` f32 zeros, flat, allocated at their exact size ([`allocate_persistent`]). The exact-size
/// buffer is reserved in persistent mode and freed at once; the zeros that follow (one fill
/// kernel, launched outside persistent mode so its metadata stays in the ordinary pools) are
/// served from that freed buffer, as every later request of its size is (the next step's
/// gradient buffer included).
pub fn zeros_persistent<B: burn::tensor::backend::Backend>(
    n: usize,
    device: &B::Device,
) -> burn::tensor::Tensor<B, 1> {
    use burn::tensor::Tensor;
    if n > 0 {
        drop(allocate_persistent::<B, _>(device, || {
            Tensor::<B, 1>::empty([n], device)
        }));
    }
    Tensor::zeros([n], device)
}

/// A device's memory as its allocator sees it, in bytes (CubeCL's `MemoryUsage`). CubeCL 0.10
/// keeps one memory pool per stream, and a stream per thread: these are the calling thread's
/// stream's pools (the whole of a `dapt-worker train` run, which trains on one thread; in the
/// agent each generation trains on a new thread, and pages an earlier generation's stream
/// still holds are not counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemoryUsage {
    /// Bytes of the tensors alive now (no padding).
    pub in_use: u64,
    /// Bytes the allocator holds on the device: its pools' pages, used or free (what
    /// `nvidia-smi` counts, less the CUDA context and cuBLAS/NCCL's own buffers).
    pub reserved: u64,
}

/// What a backend's allocator holds on a device; `None` where it does not say (the CPU).
pub trait DeviceMemory: burn::tensor::backend::Backend {
    /// The allocator's usage on `device` now.
    fn device_memory(device: &Self::Device) -> Option<DeviceMemoryUsage> {
        let _ = device;
        None
    }
}

impl DeviceMemory for burn::backend::Flex {}

impl<B: DeviceMemory, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    DeviceMemory for burn::backend::Autodiff<B, C>
{
    fn device_memory(device: &Self::Device) -> Option<DeviceMemoryUsage> {
        B::device_memory(device)
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<
        R: burn_cubecl::CubeRuntime,
        F: burn_cubecl::FloatElement,
        I: burn_cubecl::IntElement,
        BT: burn_cubecl::element::BoolElement,
    > DeviceMemory for burn_cubecl::CubeBackend<R, F, I, BT>
{
    fn device_memory(device: &Self::Device) -> Option<DeviceMemoryUsage> {
        let usage = R::client(device).memory_usage().ok()?;
        Some(DeviceMemoryUsage {
            in_use: usage.bytes_in_use,
            reserved: usage.bytes_reserved,
        })
    }
}
