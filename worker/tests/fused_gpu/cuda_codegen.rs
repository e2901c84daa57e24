//! Every fused-op kernel compiled for the H200 (sm_90a) without a GPU: cubecl-cuda's compiler
//! makes each kernel's CUDA C++ in f32 and bf16 (through the wgpu client's runtime, see
//! `dapt_worker::fused::kernels::cuda_source`), NVRTC compiles it to PTX with the options
//! cubecl-cuda passes, `ptxas -v` assembles the PTX and reports registers and spills per kernel,
//! and `nvdisasm` (where installed) shows the instruction mix of each kernel's hottest loop
//! (printed as a table, with cubecl's count of each kernel's shared memory, which ptxas does not
//! see: cubecl allocates it dynamically; `--nocapture` to see it).
//!
//! NVRTC, ptxas and the CUDA headers come from NVIDIA's PyPI wheels (`.ci/run` installs
//! `nvidia-cuda-nvrtc`, `nvidia-cuda-nvcc` and `nvidia-cuda-runtime` 13.0, the CUDA of the lent
//! H200s, and `nvidia-cuda-nvdisasm` 13.2, the oldest on PyPI, under /opt/dapt-cuda-tools), or from
//! `$DAPT_CUDA_HOME`, `$CUDA_PATH` or /usr/local/cuda (a folder with `lib*/libnvrtc.so.*` and
//! `bin/ptxas`). Without them the test says so and passes, except where `CI` is set, where it
//! fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::Tensor;
use dapt_worker::fused::kernels::cuda_source::{cuda_kernels, nvrtc_ptx, CudaKernel};

use super::Gpu;

/// The compute capability compiled for: the H200's.
const ARCH: u32 = 90;

/// Kernels per float type: RMSNorm forward, backward and gain gradient, RoPE, SwiGLU forward
/// and backward; attention forward, dQ, dK/dV at head dims 64 and 128; blockwise attention's
/// softmax and gradient; the loss's chunk statistics (first and later chunk) and gradient;
/// accumulate and the sum of squares, each with 32- and 64-bit addresses.
const KERNELS_PER_DTYPE: usize = 6 + 6 + 2 + 3 + 4;

/// A CUDA installation (or the wheels' tree): its folder.
fn cuda_home() -> Option<PathBuf> {
    let candidates = std::env::var_os("DAPT_CUDA_HOME")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/opt/dapt-cuda-tools/nvidia/cu13")])
        .chain(std::env::var_os("CUDA_PATH").map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")]);
    candidates
        .into_iter()
        .find(|home| nvrtc_library(home).is_some() && home.join("bin/ptxas").is_file())
}

/// `home`'s NVRTC library (`lib/` or `lib64/`, `libnvrtc.so.<major>`).
fn nvrtc_library(home: &Path) -> Option<PathBuf> {
    library(home, "libnvrtc.so.")
}

/// The library in `home`'s `lib/` or `lib64/` whose name starts with `prefix` (not NVIDIA's
/// `.alt.` builds).
fn library(home: &Path, prefix: &str) -> Option<PathBuf> {
    ["lib", "lib64"].iter().find_map(|dir| {
        let entries = std::fs::read_dir(home.join(dir)).ok()?;
        entries.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.contains(".alt."))
        })
    })
}

/// Loads `library` into the process by its path, so that a later `dlopen` by its soname
/// (cudarc's of `libnvrtc.so.13`, NVRTC's own of `libnvrtc-builtins.so.13.0`) finds it loaded
/// without `LD_LIBRARY_PATH`.
fn preload(library: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(library.as_os_str().as_bytes()).expect("a path");
    // SAFETY: dlopen of a shared library by a NUL-terminated path; the handle is kept for the
    // life of the process (never closed).
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    assert!(!handle.is_null(), "dlopen {} failed", library.display());
}

/// What `ptxas -v` says of one kernel.
#[derive(Debug, Default)]
struct Resources {
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
}

/// The number before `unit` in `line` (`"40 registers"`, `"0 bytes spill stores"`).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

/// Assembles `ptx` for sm_90a with `ptxas -v`; its resource report.
fn ptxas(home: &Path, ptx_file: &Path) -> Result<Resources, String> {
    let out = Command::new(home.join("bin/ptxas"))
        .arg(format!("-arch=sm_{ARCH}a"))
        .arg("-v")
        .arg(ptx_file)
        .arg("-o")
        .arg(ptx_file.with_extension("cubin"))
        .output()
        .map_err(|e| format!("ptxas: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(log);
    }
    let mut r = Resources::default();
    for line in log.lines() {
        r.registers = number_before(line, " registers").unwrap_or(r.registers);
        r.stack = number_before(line, " bytes stack frame").unwrap_or(r.stack);
        r.spill_stores = number_before(line, " bytes spill stores").unwrap_or(r.spill_stores);
        r.spill_loads = number_before(line, " bytes spill loads").unwrap_or(r.spill_loads);
    }
    Ok(r)
}

/// What the hottest loop of a kernel's machine code does per pass: the loop (a backward branch
/// in the SASS) with the most FFMAs, and in it the FFMAs, the shared-memory loads (`LDS*`) and
/// the local-memory loads and stores (`LDL*`, `STL*`: register spills). A unit-level kernel
/// whose loop has more than one shared or local load per four FFMAs is bound by the
/// multiprocessor's shared/L1 bandwidth (one 128-byte wavefront per clock against four FFMA
/// warp-instructions), not by its FMA units.
#[derive(Debug, Default)]
struct LoopMix {
    ffma: u32,
    shared_loads: u32,
    local: u32,
}

/// The [`LoopMix`] of `cubin`, from `nvdisasm` (`home/bin/nvdisasm`; None without it).
fn loop_mix(home: &Path, cubin: &Path) -> Option<LoopMix> {
    let out = Command::new(home.join("bin/nvdisasm"))
        .arg(cubin)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Instructions (their opcodes) in order, and where each label points.
    let (mut ops, mut labels) = (Vec::<String>::new(), std::collections::HashMap::new());
    for line in text.lines() {
        let line = line.trim();
        if let Some(label) = line.strip_suffix(':').filter(|l| l.starts_with(".L")) {
            labels.insert(label.to_string(), ops.len());
        } else if let Some(rest) = line.strip_prefix("/*").and_then(|l| l.split_once("*/")) {
            let words: Vec<&str> = rest.1.split_whitespace().collect();
            let op = words
                .iter()
                .find(|w| !w.starts_with('@'))
                .copied()
                .unwrap_or("");
            let target = line.split("`(").nth(1).and_then(|t| t.split(')').next());
            ops.push(match (op.starts_with("BRA"), target) {
                (true, Some(t)) => format!("BRA {t}"),
                _ => op.to_string(),
            });
        }
    }
    let mix = |body: &[String]| LoopMix {
        ffma: body.iter().filter(|o| o.starts_with("FFMA")).count() as u32,
        shared_loads: body.iter().filter(|o| o.starts_with("LDS")).count() as u32,
        local: body
            .iter()
            .filter(|o| o.starts_with("LDL") || o.starts_with("STL"))
            .count() as u32,
    };
    ops.iter()
        .enumerate()
        .filter_map(|(end, op)| {
            let start = *labels.get(op.strip_prefix("BRA ")?)?;
            (start <= end).then(|| mix(&ops[start..=end]))
        })
        .max_by_key(|m| m.ffma)
}

#[test]
fn every_kernel_compiles_for_the_h200_with_nvrtc_and_ptxas() {
    let Some(home) = cuda_home() else {
        let why = "no NVRTC and ptxas (install NVIDIA's nvidia-cuda-nvrtc, nvidia-cuda-nvcc and \
                   nvidia-cuda-runtime wheels under /opt/dapt-cuda-tools as .ci/run does, or set \
                   DAPT_CUDA_HOME)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    if let Some(builtins) = library(&home, "libnvrtc-builtins.so.") {
        preload(&builtins);
    }
    preload(&nvrtc_library(&home).expect("found above"));
    let include = Some(home.join("include")).filter(|p| p.is_dir());

    // NVRTC really compiles: a broken source is refused with its log.
    let refused = nvrtc_ptx(
        "extern \"C\" __global__ void k() { undefined_name(); }",
        ARCH,
        None,
    );
    assert!(
        refused
            .as_ref()
            .is_err_and(|log| log.contains("undefined_name")),
        "NVRTC accepted a broken kernel: {refused:?}"
    );

    let client = Tensor::<Gpu, 1>::zeros([1], &Default::default())
        .into_primitive()
        .tensor()
        .client;
    let kernels: Vec<CudaKernel> = cuda_kernels(&client, ARCH).expect("CUDA C++ of every kernel");
    // AdamW's kernel (32- and 64-bit addresses) once: the optimizer's buffers are f32.
    assert_eq!(
        kernels.len(),
        2 * KERNELS_PER_DTYPE + 2,
        "kernels: {kernels:?}"
    );

    // This test's own folder under the build's target dir, emptied of an earlier run's files.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-kernels");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a folder for the kernels");
    let mut failures = Vec::new();
    let mut table = vec![format!(
        "{:<34} {:<18} {:>5} {:>8} {:>8} {:>6} {:>6}  hottest loop: {:>5} {:>5} {:>5}",
        "kernel (sm_90a)",
        "variant",
        "regs",
        "spill-st",
        "spill-ld",
        "stack",
        "smem",
        "FFMA",
        "LDS",
        "local"
    )];
    for (i, k) in kernels.iter().enumerate() {
        let stem = dir.join(format!("{i:02}-{}", k.name));
        std::fs::write(stem.with_extension("cu"), &k.source).expect("write the source");
        let ptx = match nvrtc_ptx(&k.source, ARCH, include.as_deref()) {
            Ok(ptx) => ptx,
            Err(log) => {
                failures.push(format!("NVRTC rejected {} {}:\n{log}", k.name, k.variant));
                continue;
            }
        };
        let ptx_file = stem.with_extension("ptx");
        std::fs::write(&ptx_file, ptx).expect("write the PTX");
        match ptxas(&home, &ptx_file) {
            Ok(r) => {
                let hot = loop_mix(&home, &ptx_file.with_extension("cubin"))
                    .map(|m| format!("{:>5} {:>5} {:>5}", m.ffma, m.shared_loads, m.local))
                    .unwrap_or_else(|| "(no nvdisasm, or no loop)".into());
                table.push(format!(
                    "{:<34} {:<18} {:>5} {:>8} {:>8} {:>6} {:>6}                {hot}",
                    k.name,
                    k.variant,
                    r.registers,
                    r.spill_stores,
                    r.spill_loads,
                    r.stack,
                    k.shared_bytes
                ))
            }
            Err(log) => failures.push(format!("ptxas rejected {} {}:\n{log}", k.name, k.variant)),
        }
    }
    let table = table.join("\n");
    std::fs::write(dir.join("ptxas.txt"), &table).expect("write the table");
    println!("{table}\n(sources, PTX and cubins in {})", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
