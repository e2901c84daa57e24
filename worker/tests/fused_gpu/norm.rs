//! The fused norm ops' kernels (RMSNorm, RoPE, SwiGLU) on the GPU backend against the CPU
//! backend's reference bodies: forward and backward methods, and the whole op through
//! `Autodiff<Gpu>` against `Autodiff<Cpu>`. f32, small shapes with odd row counts, head dims 64
//! and 128, inputs from a normal distribution (never zero).

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Distribution, Tensor, TensorPrimitive};
use dapt_worker::fused::norm::{self, reference, NormOps, RopeTables};
use dapt_worker::Cpu;

use super::{max_abs_diff, to_gpu, Gpu};

const EPS: f64 = 1e-6;

fn random(shape: [usize; 2]) -> Tensor<Cpu, 2> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn prim<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FloatTensor<B> {
    t.clone().into_primitive().tensor()
}

fn wrap<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Panics unless the GPU tensor is within `tol` of the CPU one.
fn assert_near<const D: usize>(gpu: FloatTensor<Gpu>, cpu: FloatTensor<Cpu>, tol: f32, what: &str) {
    let diff = max_abs_diff(wrap::<Gpu, D>(gpu), wrap::<Cpu, D>(cpu));
    assert!(diff <= tol, "{what}: differs by {diff}");
}

#[test]
fn rms_norm_kernels_match_the_reference() {
    // Odd row counts; 200 rows span several blocks of the gain's gradient; 65_537 rows need
    // a second dimension of cubes.
    for (n, d) in [(7, 64), (33, 128), (200, 96), (65_537, 8)] {
        let (x, w, dy) = (random([n, d]), random([1, d]), random([n, d]));
        let (y_cpu, inv_cpu) = Cpu::rms_norm_forward(prim(&x), prim(&w), EPS);
        let (y_gpu, inv_gpu) = Gpu::rms_norm_forward(prim(&to_gpu(&x)), prim(&to_gpu(&w)), EPS);
        let shape = format!("[{n}, {d}]");
        assert_near::<2>(y_gpu, y_cpu, 1e-5, &format!("{shape}: y"));
        assert_near::<1>(
            inv_gpu.clone(),
            inv_cpu.clone(),
            1e-5,
            &format!("{shape}: inv_rms"),
        );

        let (dx_cpu, dw_cpu) = Cpu::rms_norm_backward(prim(&x), prim(&w), inv_cpu, prim(&dy));
        let (dx_gpu, dw_gpu) = Gpu::rms_norm_backward(
            prim(&to_gpu(&x)),
            prim(&to_gpu(&w)),
            inv_gpu,
            prim(&to_gpu(&dy)),
        );
        assert_near::<2>(dx_gpu, dx_cpu, 1e-4, &format!("{shape}: dx"));
        // A sum over up to 65_537 rows in another order.
        let tol = 1e-5 * n as f32;
        assert_near::<2>(dw_gpu, dw_cpu, tol.max(1e-4), &format!("{shape}: dw"));
    }
}

#[test]
fn rope_kernel_matches_the_reference_both_ways() {
    let inv_freq = |hd: usize| -> Vec<f64> {
        (0..hd / 2)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / hd as f64))
            .collect()
    };
    for (b, t, heads, hd) in [(2, 7, 4, 64), (1, 5, 2, 128), (3, 9, 1, 64)] {
        let tables = RopeTables::<Cpu>::new(&inv_freq(hd), t, DType::F32, &Default::default());
        let x = random([b * t, heads * hd]);
        let shape = format!("b {b} t {t} heads {heads} hd {hd}");
        for sign in [1.0, -1.0] {
            let sin = tables.sin.clone().mul_scalar(sign);
            // The tensor-op reference, not the CPU backend's own loop.
            let cpu = reference::rope::<Cpu>(prim(&x), prim(&tables.cos), prim(&sin), heads);
            let gpu = Gpu::rope(
                prim(&to_gpu(&x)),
                prim(&to_gpu(&tables.cos)),
                prim(&to_gpu(&sin)),
                heads,
            );
            assert_near::<2>(gpu, cpu, 1e-5, &format!("{shape}: sin * {sign}"));
        }
    }
}

#[test]
fn swiglu_kernels_match_the_reference() {
    for (n, k) in [(7, 64), (33, 200)] {
        let (gate, up, dy) = (random([n, k]), random([n, k]), random([n, k]));
        let cpu = Cpu::swiglu(prim(&gate), prim(&up));
        let gpu = Gpu::swiglu(prim(&to_gpu(&gate)), prim(&to_gpu(&up)));
        assert_near::<2>(gpu, cpu, 1e-5, &format!("[{n}, {k}]: y"));
        let (dg_cpu, du_cpu) = Cpu::swiglu_backward(prim(&gate), prim(&up), prim(&dy));
        let (dg_gpu, du_gpu) =
            Gpu::swiglu_backward(prim(&to_gpu(&gate)), prim(&to_gpu(&up)), prim(&to_gpu(&dy)));
        assert_near::<2>(dg_gpu, dg_cpu, 1e-5, &format!("[{n}, {k}]: d gate"));
        assert_near::<2>(du_gpu, du_cpu, 1e-5, &format!("[{n}, {k}]: d up"));
    }
}

/// `x`'s values as a tracked leaf of the autodiff backend over `B`.
fn leaf<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<Autodiff<B>, D> {
    Tensor::from_inner(t).require_grad()
}

/// RMSNorm, then RoPE, then SwiGLU of the result with itself rotated back, through the
/// autodiff backend over `B`: the values and the gradients of `x` and `w` for upstream `r`.
fn chain<B: NormOps>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    r: Tensor<B, 2>,
    heads: usize,
    tables: &RopeTables<B>,
) -> [Tensor<B, 2>; 3] {
    let (x, w) = (leaf(x), leaf(w));
    let tables = tables.map(Tensor::from_inner);
    let h = norm::rms_norm(x.clone(), w.clone(), EPS);
    let rotated = norm::rope(h.clone(), heads, &tables);
    let y = norm::swiglu(rotated, h);
    let grads = (y.clone() * Tensor::from_inner(r)).sum().backward();
    let grad = |t: &Tensor<Autodiff<B>, 2>| t.grad(&grads).expect("a gradient");
    [y.inner(), grad(&x), grad(&w)]
}

#[test]
fn the_ops_through_autodiff_match_the_cpu() {
    for (b, t, heads, hd) in [(2, 5, 3, 64), (1, 7, 2, 128)] {
        let (n, d) = (b * t, heads * hd);
        let freqs: Vec<f64> = (0..hd / 2).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let tables = RopeTables::<Cpu>::new(&freqs, t, DType::F32, &Default::default());
        let (x, w, r) = (random([n, d]), random([1, d]), random([n, d]));
        let gpu_tables = tables.map(|t| to_gpu(&t));
        let gpu = chain::<Gpu>(to_gpu(&x), to_gpu(&w), to_gpu(&r), heads, &gpu_tables);
        let cpu = chain::<Cpu>(x, w, r, heads, &tables);
        for ((g, c), what) in gpu.into_iter().zip(cpu).zip(["y", "dx", "dw"]) {
            let diff = max_abs_diff(g, c);
            assert!(
                diff <= 1e-4,
                "b {b} t {t} heads {heads} hd {hd}: {what} differs by {diff}"
            );
        }
    }
}

/// The half-precision dtypes the device computes in: f16 on lavapipe (no bf16 there), and
/// bf16 too on CUDA.
fn half_dtypes() -> Vec<DType> {
    if cfg!(feature = "wgpu") {
        vec![DType::F16]
    } else {
        vec![DType::F16, DType::BF16]
    }
}

/// Panics unless the half-precision GPU result is within `tol` of the f32 CPU one, relative to
/// the CPU one's largest magnitude.
fn assert_near_half<const D: usize>(
    gpu: FloatTensor<Gpu>,
    cpu: FloatTensor<Cpu>,
    tol: f32,
    what: &str,
) {
    let gpu = wrap::<Gpu, D>(gpu);
    let cpu = wrap::<Cpu, D>(cpu);
    let scale = cpu.clone().abs().max().into_scalar().max(1.0);
    let diff = max_abs_diff(gpu.cast(DType::F32), cpu);
    assert!(
        diff <= tol * scale,
        "{what}: differs by {diff} (scale {scale})"
    );
}

#[test]
fn the_kernels_compute_half_precision_tensors_in_their_dtype() {
    let (b, t, heads, hd) = (3, 5, 2, 64);
    let (n, d) = (b * t, heads * hd);
    let (x, w, dy) = (random([n, d]), random([1, d]), random([n, d]));
    let half = |t: &Tensor<Cpu, 2>, dtype: DType| prim(&to_gpu(t).cast(dtype));
    let tables = RopeTables::<Cpu>::new(&[1.0; 32], t, DType::F32, &Default::default());
    let (y_cpu, inv_cpu) = Cpu::rms_norm_forward(prim(&x), prim(&w), EPS);
    let (dx_cpu, dw_cpu) = Cpu::rms_norm_backward(prim(&x), prim(&w), inv_cpu, prim(&dy));
    let rope_cpu = Cpu::rope(prim(&x), prim(&tables.cos), prim(&tables.sin), heads);
    let (dg_cpu, du_cpu) =
        Cpu::swiglu_backward(prim(&x), prim(&dy), prim(&w.clone().expand([n, d])));
    for dtype in half_dtypes() {
        let what = |op: &str| format!("{dtype:?}: {op}");
        let (y, inv) = Gpu::rms_norm_forward(half(&x, dtype), half(&w, dtype), EPS);
        assert_eq!(
            wrap::<Gpu, 2>(y.clone()).dtype(),
            dtype,
            "{}",
            what("y's dtype")
        );
        assert_eq!(
            wrap::<Gpu, 1>(inv.clone()).dtype(),
            DType::F32,
            "{}",
            what("inv_rms")
        );
        assert_near_half::<2>(y.clone(), y_cpu.clone(), 1e-2, &what("rms_norm y"));
        let (dx, dw) =
            Gpu::rms_norm_backward(half(&x, dtype), half(&w, dtype), inv, half(&dy, dtype));
        assert_near_half::<2>(dx, dx_cpu.clone(), 1e-2, &what("rms_norm dx"));
        assert_near_half::<2>(dw, dw_cpu.clone(), 1e-2, &what("rms_norm dw"));

        let gpu_tables = tables.map(|t| to_gpu(&t).cast(dtype));
        let rope = Gpu::rope(
            half(&x, dtype),
            prim(&gpu_tables.cos),
            prim(&gpu_tables.sin),
            heads,
        );
        assert_near_half::<2>(rope, rope_cpu.clone(), 1e-2, &what("rope"));

        let w_rows = w.clone().expand([n, d]);
        let (dg, du) =
            Gpu::swiglu_backward(half(&x, dtype), half(&dy, dtype), half(&w_rows, dtype));
        assert_near_half::<2>(dg, dg_cpu.clone(), 1e-2, &what("swiglu d gate"));
        assert_near_half::<2>(du, du_cpu.clone(), 1e-2, &what("swiglu d up"));
    }
}
