//! Kernel choice that a job pays once: where CubeCL keeps compiled PTX and autotune results.
//!
//! Burn's CUDA backend compiles every kernel with NVRTC the first time it runs (10–14 s for the
//! 1B shape) and, in a `cuda-autotune` build, benchmarks every matmul and reduction variant per
//! shape (minutes). CubeCL can keep both on disk, but finds its settings only in a `cubecl.toml`
//! (or `burn.toml`'s `[cubecl]` table) searched upward from the working directory, and by default
//! writes its autotune results into the nearest Cargo `target/` folder. So before the first
//! kernel, [`install`] sets CubeCL's global configuration (`cubecl::config::CubeClRuntimeConfig`,
//! read once per process) with both caches in one folder per GPU model:
//!
//! ```text
//! $DAPT_KERNEL_CACHE (default $XDG_CACHE_HOME/dapt/kernels, or ~/.cache/dapt/kernels)
//!   └── nvidia-h200-sm90/                 GPU model and compute capability
//!       ├── autotune/<cubecl version>/device-0-N-cuda/*.json.log   fastest variant per key
//!       └── ptx-5f0c…e1/cuda/<cubecl version>/ptx/…               PTX of one dapt-worker build
//! ```
//!
//! PTX is kept per build (the xxh3 of the executable) because CubeCL keys a PTX entry by the
//! kernel's type name and launch settings, not its body: a rebuilt dapt with a changed kernel
//! must not load the old PTX. Autotune results are kept per GPU model and CubeCL version only:
//! they name one of cubek's variants per shape key, and CubeCL checks each entry against a
//! checksum of the tunable set, so they stay valid across dapt builds (and a tuned cache can be
//! carried to another machine with the same GPU). Every rank and restart on the machine reuses
//! the folder (CubeCL guards the autotune files with lock files; PTX chunks are appended
//! without one, safe on a local file system's `O_APPEND`, not on NFS): between machines, copy the
//! model folder's `autotune/`, or point `DAPT_KERNEL_CACHE` at shared storage filled by one
//! `dapt-worker tune` before the ranks start. `off` leaves CubeCL's own configuration alone. CubeCL keys autotune results by device index:
//! [`seed_autotune`] copies another index's results to this rank's on first use, so a
//! `dapt-worker tune` on `cuda:0` serves `cuda:1..`.

use std::path::{Path, PathBuf};

/// The environment variable naming the cache folder (`off`: leave CubeCL's configuration alone).
pub const ENV: &str = "DAPT_KERNEL_CACHE";

/// The base folder of the kernel caches: `$DAPT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/dapt/kernels`,
/// `~/.cache/dapt/kernels` or this user's private temp folder's `dapt/kernels`
/// ([`crate::cache_dir`]; a shared `/tmp/dapt` another user made first was read from); `None`
/// when `$DAPT_KERNEL_CACHE` is `off`, or when that private folder is not this user's (warned).
pub fn base_dir() -> Option<PathBuf> {
    match std::env::var_os(ENV) {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => match crate::cache_dir::user_cache_dir() {
            Ok(cache) => Some(cache.join("dapt").join("kernels")),
            Err(e) => {
                tracing::warn!(error = %e, "kernel cache off");
                None
            }
        },
    }
}

/// The folder for one GPU model (`name` as the driver reports it, compute capability
/// `major.minor`): `base/<model>-sm<major><minor>`.
pub fn model_dir(base: &Path, name: &str, capability: (i32, i32)) -> PathBuf {
    let mut model = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            model.push(c.to_ascii_lowercase());
        } else if !model.ends_with('-') {
            model.push('-');
        }
    }
    let model = model.trim_matches('-');
    let model = if model.is_empty() { "gpu" } else { model };
    base.join(format!("{model}-sm{}{}", capability.0, capability.1))
}

/// The PTX folder of one build (`build`, e.g. [`build_id`]) under a [`model_dir`].
pub fn ptx_dir(model_dir: &Path, build: &str) -> PathBuf {
    model_dir.join(format!("ptx-{build}"))
}

/// This executable's identity: the xxh3-64 hash of its bytes, as 16 hex digits.
///
/// # Errors
/// When `/proc/self/exe` (or `current_exe`) cannot be read.
pub fn build_id() -> std::io::Result<String> {
    let exe = std::env::current_exe()?;
    let bytes = std::fs::read(exe)?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}

/// Copies the autotune results of another device index to device `ordinal`'s folder under
/// `root` (a [`model_dir`]), for each CubeCL version folder where `ordinal` has none yet.
/// Only `*.json.log` files are copied (not CubeCL's lock files), each cut after its last
/// complete line (another rank may be appending). The copy is made in a temporary folder and
/// renamed into place, so a rank never reads a half-copied folder. Returns the number of files
/// copied; a missing `root` is not an error.
///
/// # Errors
/// I/O errors other than a missing folder, or another rank's rename winning the race (not an
/// error: its copy is as good).
pub fn seed_autotune(root: &Path, ordinal: usize) -> std::io::Result<usize> {
    let mut copied = 0;
    let versions = match std::fs::read_dir(root.join("autotune")) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for version in versions {
        let version = version?.path();
        if !version.is_dir() {
            continue;
        }
        // device-<type>-<index>-<runtime>: one folder per (device type, index, runtime).
        let mut siblings = Vec::new();
        for entry in std::fs::read_dir(&version)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let parts: Vec<&str> = name.splitn(4, '-').collect();
            if let ["device", ty, index, runtime] = parts[..] {
                if let Ok(index) = index.parse::<usize>() {
                    siblings.push((index, ty.to_string(), runtime.to_string(), path.clone()));
                }
            }
        }
        siblings.sort();
        for (index, ty, runtime, from) in &siblings {
            let to = version.join(format!("device-{ty}-{ordinal}-{runtime}"));
            if *index == ordinal || to.exists() {
                continue;
            }
            let tmp = version.join(format!(".seed-{ordinal}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)?;
            let mut n = 0;
            for file in std::fs::read_dir(from)? {
                let file = file?.path();
                let is_log = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".json.log"));
                if !is_log || !file.is_file() {
                    continue;
                }
                let bytes = std::fs::read(&file)?;
                let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if let Some(name) = file.file_name() {
                    std::fs::write(tmp.join(name), &bytes[..whole])?;
                    n += 1;
                }
            }
            match std::fs::rename(&tmp, &to) {
                Ok(()) => copied += n,
                Err(_) => {
                    // Another rank seeded it first (or CubeCL created it): keep theirs.
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
        }
    }
    Ok(copied)
}

/// Where [`install`] put the caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCache {
    /// The GPU model's folder ([`model_dir`]), holding `autotune/`.
    pub dir: PathBuf,
    /// This build's PTX folder ([`ptx_dir`]).
    pub ptx: PathBuf,
    /// Autotune result files copied from another device index ([`seed_autotune`]).
    pub seeded: usize,
}

/// Sets CubeCL's global configuration before the first kernel: the settings a `cubecl.toml` or
/// `burn.toml` would give (found as CubeCL finds them, environment overrides such as
/// `CUBECL_DEBUG_OPTION` and `CUBECL_AUTOTUNE_LEVEL` applied), with the autotune cache in
/// [`model_dir`] for this GPU and the PTX cache in its [`ptx_dir`] for this build.
///
/// Returns `None` (and changes nothing) when `$DAPT_KERNEL_CACHE` is `off`, when CubeCL's
/// configuration was already read or set in this process, or when the folder cannot be made (a
/// warning says why: the run goes on without a cache, as CubeCL would panic on an unwritable
/// cache folder). Only the first call in a process does anything; later calls return its result.
#[cfg(feature = "cuda")]
pub fn install(ordinal: usize, gpu_name: &str, capability: (i32, i32)) -> Option<KernelCache> {
    static INSTALLED: std::sync::OnceLock<Option<KernelCache>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| install_once(ordinal, gpu_name, capability))
        .clone()
}

#[cfg(feature = "cuda")]
fn install_once(ordinal: usize, gpu_name: &str, capability: (i32, i32)) -> Option<KernelCache> {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    use std::sync::Arc;

    let base = base_dir()?;
    let build = match build_id() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "kernel cache off: cannot read this executable to key it");
            return None;
        }
    };
    let dir = model_dir(&base, gpu_name, capability);
    let ptx = ptx_dir(&dir, &build);
    if let Err(e) = std::fs::create_dir_all(&ptx) {
        tracing::warn!(dir = %ptx.display(), error = %e, "kernel cache off: cannot create its folder");
        return None;
    }
    let seeded = seed_autotune(&dir, ordinal).unwrap_or_else(|e| {
        tracing::warn!(dir = %dir.display(), error = %e, "could not seed autotune results from another device");
        0
    });
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.autotune.cache = CacheConfig::File(dir.clone());
    config.compilation.cache = Some(CacheConfig::File(ptx.clone()));
    // `RuntimeConfig::set` panics once the configuration has been read; checking and setting
    // under CubeCL's own lock cannot race with a reader.
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_some() {
        tracing::warn!(
            "kernel cache off: CubeCL's configuration was read before the device was checked \
             (kernels compile and tune again in every run)"
        );
        return None;
    }
    *slot = Some(Arc::new(config));
    Some(KernelCache { dir, ptx, seeded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folders_are_keyed_by_model_capability_and_build() {
        let base = Path::new("/c");
        let h200 = model_dir(base, "NVIDIA H200", (9, 0));
        assert_eq!(h200, Path::new("/c/nvidia-h200-sm90"));
        assert_eq!(
            ptx_dir(&h200, "ab12"),
            Path::new("/c/nvidia-h200-sm90/ptx-ab12")
        );
        assert_eq!(
            model_dir(base, "  NVIDIA GeForce RTX 4090 (x) ", (8, 9)),
            Path::new("/c/nvidia-geforce-rtx-4090-x-sm89")
        );
        assert_eq!(model_dir(base, "///", (7, 5)), Path::new("/c/gpu-sm75"));
    }

    #[test]
    fn the_build_id_is_stable_hex() {
        let a = build_id().expect("id");
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, build_id().expect("id"));
    }

    #[test]
    fn autotune_results_seed_other_device_indices_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        assert_eq!(seed_autotune(root, 1).expect("empty"), 0);
        let v = root.join("autotune/0.10.0");
        let d0 = v.join("device-0-0-cuda");
        std::fs::create_dir_all(&d0).expect("mkdir");
        std::fs::write(d0.join("matmul.json.log"), b"{\"a\":1}\n{\"b\":2}\n{\"par").expect("w");
        std::fs::write(d0.join("matmul.json.log.lock"), b"123").expect("w");
        std::fs::write(d0.join("reduce.json.log"), b"{\"c\":3}\n").expect("w");

        // Device 0 itself needs nothing.
        assert_eq!(seed_autotune(root, 0).expect("self"), 0);
        assert_eq!(seed_autotune(root, 3).expect("seed"), 2);
        let d3 = v.join("device-0-3-cuda");
        assert_eq!(
            std::fs::read(d3.join("matmul.json.log")).expect("r"),
            b"{\"a\":1}\n{\"b\":2}\n"
        );
        assert!(d3.join("reduce.json.log").is_file());
        assert!(!d3.join("matmul.json.log.lock").exists());
        // A device that has results of its own keeps them.
        std::fs::write(d3.join("reduce.json.log"), b"mine\n").expect("w");
        assert_eq!(seed_autotune(root, 3).expect("again"), 0);
        assert_eq!(
            std::fs::read(d3.join("reduce.json.log")).expect("r"),
            b"mine\n"
        );
        // No temporary folder is left behind.
        let left: Vec<_> = std::fs::read_dir(&v)
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".seed"))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn off_disables_and_a_path_overrides() {
        // One test owns the variable (tests in this binary run in threads).
        std::env::set_var(ENV, "off");
        assert_eq!(base_dir(), None);
        std::env::set_var(ENV, "/shared/kernels");
        assert_eq!(base_dir(), Some(PathBuf::from("/shared/kernels")));
        std::env::remove_var(ENV);
        assert!(base_dir().is_some_and(|d| d.ends_with("dapt/kernels")));
    }
}
