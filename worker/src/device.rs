//! Which device a training thread runs on, and the checks that run before any GPU code does.
//!
//! Burn's CUDA backend panics on its device thread when there is no GPU, and cudarc panics when
//! libcuda or libnccl is missing. So before touching the device, [`cuda_ready`] checks, in
//! order: the driver library, `cuInit`, the device count, NVRTC (Burn compiles its kernels at
//! run time) and the CUDA headers those kernels include, and fails with a sentence that says
//! what is missing. [`nccl_library`] finds NCCL where NVIDIA's PyPI wheels put it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::WorkerError;

/// Where training runs: `cpu`, or `cuda` / `cuda:N` (ordinal N, default 0); `vulkan` (a
/// worker built with the `wgpu` feature, `dapt-worker train` only) runs the GPU's engine and
/// kernels through Burn's wgpu backend, in f32: on Mesa's lavapipe it checks the whole GPU step
/// and counts its kernel launches on a machine without a GPU (docs/gpu.md). Not for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Vulkan,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "vulkan" => Ok(DeviceSpec::Vulkan),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}`: use cpu, cuda or cuda:N (or vulkan)")
                }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Vulkan => write!(f, "vulkan"),
        }
    }
}

pub use dapt_proto::device::Precision;

/// Why `--device vulkan` cannot run: this worker was built without the `wgpu` feature.
pub fn no_vulkan() -> WorkerError {
    WorkerError::Invalid(
        "--device vulkan needs a worker built with the `wgpu` feature \
         (cargo build -p dapt-worker --features wgpu)"
            .into(),
    )
}

/// Burn's dtype for the passes in `precision`.
pub fn dtype(precision: Precision) -> burn::tensor::FloatDType {
    match precision {
        Precision::F32 => burn::tensor::FloatDType::F32,
        Precision::Bf16 => burn::tensor::FloatDType::BF16,
    }
}

/// Which trainer a rank runs. A GPU rank always runs the device-resident engine; on the CPU the
/// host trainer is the one to use, and `resident` runs the GPU's engine (device-resident
/// weights, AdamW as tensor ops, gradients through a reducer) on the CPU backend, so that its
/// path through the agent can be tested on a machine without a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Host,
    Resident,
}

impl EngineKind {
    /// The engine for `device`, or why `asked` cannot run there.
    pub fn resolve(asked: Option<EngineKind>, device: DeviceSpec) -> Result<EngineKind, String> {
        match (asked, device) {
            (None, DeviceSpec::Cpu) => Ok(EngineKind::Host),
            (None | Some(EngineKind::Resident), DeviceSpec::Cuda(_) | DeviceSpec::Vulkan) => {
                Ok(EngineKind::Resident)
            }
            (Some(EngineKind::Host), DeviceSpec::Cuda(_) | DeviceSpec::Vulkan) => Err(format!(
                "--engine host runs on the CPU only; {device} trains with the resident engine"
            )),
            (Some(kind), DeviceSpec::Cpu) => Ok(kind),
        }
    }
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(EngineKind::Host),
            "resident" => Ok(EngineKind::Resident),
            _ => Err(format!("unknown engine `{s}`: use host or resident")),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Host => "host",
            EngineKind::Resident => "resident",
        })
    }
}

/// Candidate CUDA installation roots holding `include/cuda_runtime.h`: `$CUDA_PATH`, the usual
/// toolkit folders, and the headers of NVIDIA's PyPI wheels (`nvidia/cuda_runtime`, or the
/// CUDA 13 `nvidia/cu13` layout) under the Python site directories.
pub fn cuda_include_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os("CUDA_PATH")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    roots.extend(["/usr/local/cuda", "/opt/cuda"].map(PathBuf::from));
    for site in python_site_dirs() {
        roots.push(site.join("nvidia/cu13"));
        roots.push(site.join("nvidia/cuda_runtime"));
    }
    roots
        .into_iter()
        .filter(|r| r.join("include/cuda_runtime.h").is_file())
        .collect()
}

/// Python site directories where NVIDIA's wheels may live (system, /usr/local, and virtual
/// environments under /opt and `$VIRTUAL_ENV`).
fn python_site_dirs() -> Vec<PathBuf> {
    let mut patterns = vec![
        "/usr/lib/python3*/site-packages".to_string(),
        "/usr/lib/python3/dist-packages".to_string(),
        "/usr/local/lib/python3*/site-packages".to_string(),
        "/usr/local/lib/python3*/dist-packages".to_string(),
        "/opt/*/.venv/lib/python3*/site-packages".to_string(),
        "/opt/*/lib/python3*/site-packages".to_string(),
    ];
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        patterns.insert(
            0,
            format!("{}/lib/python3*/site-packages", Path::new(&venv).display()),
        );
    }
    let mut out = Vec::new();
    for p in patterns {
        if let Ok(paths) = glob::glob(&p) {
            out.extend(paths.flatten().filter(|p| p.is_dir()));
        }
    }
    out
}

/// A `libnccl.so.2` (or `libnccl.so`): `$DAPT_NCCL_LIB` (a file or a folder) first, then the
/// library folders and NVIDIA's `nvidia-nccl-cu12`/`-cu13` wheels under the Python site
/// directories.
pub fn nccl_library() -> Option<PathBuf> {
    let names = ["libnccl.so", "libnccl.so.2"];
    let in_dir = |d: &Path| names.iter().map(|n| d.join(n)).find(|p| p.is_file());
    if let Some(p) = std::env::var_os("DAPT_NCCL_LIB").map(PathBuf::from) {
        return if p.is_dir() {
            in_dir(&p)
        } else {
            p.is_file().then_some(p)
        };
    }
    let mut dirs: Vec<PathBuf> = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/local/lib",
    ]
    .map(PathBuf::from)
    .to_vec();
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/nccl/lib"));
        dirs.push(site.join("nvidia/cu13/lib"));
    }
    dirs.iter().find_map(|d| in_dir(d))
}

/// A folder holding a `libnccl.so` link to `lib`, made in `$XDG_CACHE_HOME/dapt/nccl` (or
/// `~/.cache/...`, or this user's private temp folder: [`crate::cache_dir`]): cudarc opens
/// `libnccl.so`, never `libnccl.so.2`, the only name the PyPI wheels ship. The loader reads
/// `LD_LIBRARY_PATH` once, at process start, so the caller re-executes itself with this folder
/// on it (see `main.rs`).
pub fn nccl_link_dir(lib: &Path) -> std::io::Result<PathBuf> {
    link_in(&crate::cache_dir::user_cache_dir()?, lib)
}

fn link_in(base: &Path, lib: &Path) -> std::io::Result<PathBuf> {
    let dir = base.join("dapt").join("nccl");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(lib) {
        // Only a link of ours is replaced; anything else at that path is left to fail below.
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = std::fs::remove_file(&link);
        }
        std::os::unix::fs::symlink(lib, &link)?;
    }
    Ok(dir)
}

/// What [`cuda_ready`] found.
#[derive(Debug, Clone)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub devices: usize,
    pub name: String,
    pub include_root: PathBuf,
    /// Where compiled PTX and autotune results are kept (`kernel_cache::install`); `None` when
    /// `DAPT_KERNEL_CACHE=off` or CubeCL was configured before.
    pub kernel_cache: Option<PathBuf>,
}

/// Checks that CUDA device `ordinal` can run Burn's kernels, without panicking when it cannot;
/// sets `CUDA_PATH` to the headers found when it was unset, and CubeCL's kernel caches
/// ([`crate::kernel_cache`]). Call before any thread starts.
#[cfg(feature = "cuda")]
pub fn cuda_ready(ordinal: usize) -> Result<CudaInfo, WorkerError> {
    use cudarc::driver::{result, sys};
    let fail = |m: String| WorkerError::Device(m);
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err(fail(
            "no CUDA driver (libcuda.so) on this machine: there is no usable NVIDIA GPU here; \
             run with --device cpu"
                .into(),
        ));
    }
    result::init().map_err(|e| fail(format!("the CUDA driver failed to initialise: {e}")))?;
    let devices = result::device::get_count()
        .map_err(|e| fail(format!("cannot count CUDA devices: {e}")))? as usize;
    if ordinal >= devices {
        return Err(fail(format!(
            "cuda:{ordinal} asked for, but this machine has {devices} CUDA device(s)"
        )));
    }
    let dev =
        result::device::get(ordinal as i32).map_err(|e| fail(format!("cuda:{ordinal}: {e}")))?;
    let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
    // SAFETY: only tries to dlopen the NVRTC library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(fail(
            "no NVRTC (libnvrtc.so) found: Burn compiles its CUDA kernels at run time; install \
             the CUDA toolkit or the nvidia-cuda-nvrtc wheel and put its lib folder on \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let include_root = cuda_include_roots().into_iter().next().ok_or_else(|| {
        fail(
            "no CUDA headers (include/cuda_runtime.h) under $CUDA_PATH, /usr/local/cuda or the \
             Python nvidia wheels: set CUDA_PATH to a CUDA toolkit"
                .into(),
        )
    })?;
    if std::env::var_os("CUDA_PATH").is_none() {
        // SAFETY (edition 2021: safe fn): called before the training threads start.
        std::env::set_var("CUDA_PATH", &include_root);
    }
    let attribute = |a| {
        // SAFETY: `dev` is a valid device handle from `device::get`.
        unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0)
    };
    let capability = (
        attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
        attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
    );
    let kernel_cache = crate::kernel_cache::install(ordinal, &name, capability);
    if let Some(cache) = &kernel_cache {
        tracing::info!(
            dir = %cache.dir.display(),
            seeded = cache.seeded,
            autotune = cfg!(feature = "cuda-autotune"),
            "kernel cache"
        );
    }
    Ok(CudaInfo {
        ordinal,
        devices,
        name,
        include_root,
        kernel_cache: kernel_cache.map(|c| c.dir),
    })
}

/// Without the `cuda` feature there is no GPU path at all.
#[cfg(not(feature = "cuda"))]
pub fn cuda_ready(_ordinal: usize) -> Result<CudaInfo, WorkerError> {
    Err(WorkerError::Device(
        "this dapt-worker was built without the `cuda` feature: rebuild with \
         `cargo build --release --features cuda`, or run with --device cpu"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_precisions() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!("vulkan".parse(), Ok(DeviceSpec::Vulkan));
        assert_eq!(DeviceSpec::Vulkan.to_string(), "vulkan");
        assert_eq!("bf16".parse(), Ok(Precision::Bf16));
        assert!("fp8".parse::<Precision>().is_err());
    }

    #[test]
    fn the_engine_follows_the_device_unless_asked() {
        use EngineKind::*;
        let cpu = DeviceSpec::Cpu;
        let gpu = DeviceSpec::Cuda(1);
        assert_eq!(EngineKind::resolve(None, cpu), Ok(Host));
        assert_eq!(EngineKind::resolve(Some(Resident), cpu), Ok(Resident));
        assert_eq!(EngineKind::resolve(None, gpu), Ok(Resident));
        let err = EngineKind::resolve(Some(Host), gpu).unwrap_err();
        assert!(err.contains("cuda:1"), "{err}");
        assert_eq!(EngineKind::resolve(None, DeviceSpec::Vulkan), Ok(Resident));
        assert!(EngineKind::resolve(Some(Host), DeviceSpec::Vulkan).is_err());
        assert_eq!("resident".parse(), Ok(Resident));
        assert!("fast".parse::<EngineKind>().is_err());
    }

    #[test]
    fn links_libnccl_so_in_a_cache_folder() {
        let tmp = tempfile::tempdir().expect("tmp");
        let lib = tmp.path().join("libnccl.so.2");
        std::fs::write(&lib, b"not really").expect("write");
        let dir = link_in(&tmp.path().join("cache"), &lib).expect("link");
        assert_eq!(
            std::fs::read_link(dir.join("libnccl.so")).expect("link"),
            lib
        );
        // Idempotent.
        link_in(&tmp.path().join("cache"), &lib).expect("again");
    }
}
