//! The named cubek matmul strategies (`DAPT_MATMUL`, `fused::kernels::matmul`) on the GPU
//! backend against the CPU backend's matmul, in the layouts the model gives them (plain, the
//! right side a transposed view as in `x W^T`, the left side a transposed view as in
//! `dy^T x`, batched as in blockwise attention), and the projection's graph node through
//! `Autodiff<Gpu>` against Burn's matmul node on `Autodiff<Cpu>`. On lavapipe only the
//! CUDA-core (`unit`) strategies and Burn's run; the tensor-core ones are timed and checked on
//! a lent GPU by `gpu_speed_of_matmul_strategies`, one strategy per process
//! (scripts/gpu-check.sh).

use burn::backend::Autodiff;
use burn::tensor::{Distribution, FloatDType, Tensor};
use dapt_worker::fused::kernels::matmul::matmul_with;
use dapt_worker::fused::matmul::{linear, matmul_choice, MatmulChoice};
use dapt_worker::Cpu;

use super::{max_abs_diff, to_gpu, Gpu, MATMUL_RTOL};

/// The strategies to check, each with whether it must take every problem: Burn's and, on
/// lavapipe, the CUDA-core one must; `DAPT_MATMUL`'s may refuse a problem (the model then runs
/// Burn's matmul for it), never give a wrong result. scripts/gpu-check.sh runs these tests once
/// per strategy, each in its own process (`mmcheck-*`, after its timing `mmbench-*`), so that
/// a strategy that crashes takes only its own process with it.
fn choices() -> Vec<(MatmulChoice, bool)> {
    // Not DoubleUnit by default: wrong on some problems (a_wrong_strategy_is_caught_...).
    let mut choices = vec![(MatmulChoice::Burn, true)];
    if cfg!(feature = "wgpu") {
        choices.push((MatmulChoice::SimpleUnit, true));
    }
    if choices.iter().all(|(c, _)| *c != matmul_choice()) {
        choices.push((matmul_choice(), false));
    }
    choices
}

fn random<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// `lhs @ rhs` by `choice` on the GPU against the CPU, relative to the result's largest value;
/// a refusal fails only a strategy that `must` take the problem (else it is printed).
fn check<const D: usize>(
    (choice, must): (MatmulChoice, bool),
    lhs: Tensor<Cpu, D>,
    rhs: Tensor<Cpu, D>,
    what: &str,
) {
    let reference = lhs.clone().matmul(rhs.clone());
    let scale = reference.clone().abs().max().into_scalar();
    assert!(scale > 0.1, "{what}: a test on near-zeros");
    let out = match matmul_with(
        choice,
        to_gpu(&lhs).into_primitive().tensor(),
        to_gpu(&rhs).into_primitive().tensor(),
    ) {
        Ok(out) => out,
        Err(e) if !must => {
            println!(
                "{} refuses {what} {:?}: {e:?}",
                choice.name(),
                reference.dims()
            );
            return;
        }
        Err(e) => panic!("{}: {what}: {e:?}", choice.name()),
    };
    let out = Tensor::<Gpu, D>::from_primitive(burn::tensor::TensorPrimitive::Float(out));
    assert_eq!(out.dims(), reference.dims(), "{what}");
    let d = max_abs_diff(out, reference) / scale;
    assert!(
        d < MATMUL_RTOL.max(1e-5),
        "{}: {what}: {d} of its scale",
        choice.name()
    );
}

/// Odd sizes (not multiples of a tile or a vector), in every layout the model uses.
#[test]
fn strategies_match_the_cpu_in_every_layout() {
    for choice in choices() {
        for (m, k, n) in [(37, 70, 19), (64, 48, 130), (5, 257, 3), (64, 40, 16)] {
            check(choice, random([m, k]), random([k, n]), "plain");
            check(choice, random([m, k]), random([n, k]).transpose(), "x W^T");
            check(choice, random([k, m]).transpose(), random([k, n]), "dy^T x");
            check(
                choice,
                random([3, m, k]),
                random([3, n, k]).swap_dims(1, 2),
                "batched Q K^T",
            );
            check(choice, random([3, m, k]), random([3, k, n]), "batched P V");
        }
    }
}

/// A tensor-core strategy on a device without tensor cores (lavapipe) is refused with cubek's
/// setup error, not a panic: what `MatmulOps::matmul` falls back to Burn's matmul on.
#[cfg(feature = "wgpu")]
#[test]
fn a_strategy_the_device_cannot_run_is_refused() {
    let refused = |choice: MatmulChoice, lhs: [usize; 3], rhs: [usize; 3]| {
        matmul_with(
            choice,
            to_gpu(&random(lhs)).into_primitive().tensor(),
            to_gpu(&random(rhs)).into_primitive().tensor(),
        )
        .is_err()
    };
    assert!(
        refused(MatmulChoice::DoubleTmaMma, [1, 64, 64], [1, 64, 64]),
        "TMA on lavapipe"
    );
    assert!(
        refused(MatmulChoice::Cublas, [1, 64, 64], [1, 64, 64]),
        "cuBLAS on Vulkan"
    );
    // A broadcast batch: refused (Burn's matmul takes it), not a panic.
    assert!(
        refused(MatmulChoice::SimpleUnit, [2, 8, 8], [1, 8, 8]),
        "a broadcast batch"
    );
}

/// A strategy whose result is wrong for a problem is caught by the first-use check and Burn's
/// matmul runs that problem: cubek 0.2's `DoubleUnit` on a batched `[3, 64, 40] @ [3, 40, 16]`
/// (found by the timing on lavapipe, 2026-11-29: 0.40 of the result's scale).
#[cfg(feature = "wgpu")]
#[test]
fn a_wrong_strategy_is_caught_and_burns_matmul_runs() {
    use dapt_worker::fused::MatmulOps;
    let (a, b) = (random([3, 64, 40]), random([3, 40, 16]));
    let reference = a.clone().matmul(b.clone());
    let scale = reference.clone().abs().max().into_scalar();
    let direct = matmul_with(
        MatmulChoice::DoubleUnit,
        to_gpu(&a).into_primitive().tensor(),
        to_gpu(&b).into_primitive().tensor(),
    )
    .expect("DoubleUnit takes the problem");
    let direct = Tensor::<Gpu, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(direct));
    assert!(
        max_abs_diff(direct, reference.clone()) / scale > 0.1,
        "cubek's DoubleUnit is right here now: pick another wrong problem for this test"
    );
    for _ in 0..2 {
        let checked = Gpu::matmul_by(
            MatmulChoice::DoubleUnit,
            to_gpu(&a).into_primitive().tensor(),
            to_gpu(&b).into_primitive().tensor(),
        );
        let checked =
            Tensor::<Gpu, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(checked));
        let d = max_abs_diff(checked, reference.clone()) / scale;
        assert!(d < 1e-5, "the checked matmul is {d} off");
    }
}

/// The projection `x W^T` as dapt's graph node on the GPU (with `DAPT_MATMUL`'s strategy)
/// against Burn's matmul node on the CPU: value, `dx` and `dW`.
#[test]
fn linear_on_the_gpu_matches_burns_node_on_the_cpu() {
    for (n, din, dout) in [(33, 70, 19), (8, 64, 128)] {
        let (x, w, up) = (random([n, din]), random([dout, din]), random([n, dout]));
        let xc = Tensor::<Autodiff<Cpu>, 2>::from_inner(x.clone()).require_grad();
        let wc = Tensor::<Autodiff<Cpu>, 2>::from_inner(w.clone()).require_grad();
        let yc = xc.clone().matmul(wc.clone().transpose());
        let gc = (yc.clone() * Tensor::from_inner(up.clone()))
            .sum()
            .backward();
        let xg = Tensor::<Autodiff<Gpu>, 2>::from_inner(to_gpu(&x)).require_grad();
        let wg = Tensor::<Autodiff<Gpu>, 2>::from_inner(to_gpu(&w)).require_grad();
        let yg = linear(xg.clone(), wg.clone());
        let gg = (yg.clone() * Tensor::from_inner(to_gpu(&up)))
            .sum()
            .backward();
        let pairs = [
            ("y", yg.inner(), yc.inner()),
            ("dx", xg.grad(&gg).expect("dx"), xc.grad(&gc).expect("dx")),
            ("dW", wg.grad(&gg).expect("dW"), wc.grad(&gc).expect("dW")),
        ];
        for (what, gpu, cpu) in pairs {
            let scale = cpu.clone().abs().max().into_scalar();
            assert!(scale > 0.1, "{what}: near-zeros");
            let d = max_abs_diff(gpu, cpu) / scale;
            assert!(
                d < MATMUL_RTOL.max(1e-5),
                "{what} at {n}x{din}->{dout}: {d}"
            );
        }
    }
}

/// One matmul problem of the Llama-3.2-1B step (micro-batch 4, sequence 1024: 4,096 rows)
/// and how many times a step (4 micro-batches, 16 layers) runs it.
struct Problem {
    name: &'static str,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    /// `nn` (both contiguous), `nt` (the right side a transposed view: `x W^T`), `tn` (the
    /// left side a transposed view: `dy^T x`).
    layout: &'static str,
    per_step: usize,
}

/// The 1B step's matmuls: the projections forward (`nt`), their input gradients (`nn`) and
/// weight gradients (`tn`); the output head's vocabulary chunks of 8,192 (forward, the
/// backward's recomputation, `dx`, `dW`); blockwise attention's products per block of 256
/// positions (4 query heads per kv head stacked: 1,024 rows, 640 keys on average), batched
/// over 4 sequences x 8 kv heads.
fn step_problems() -> Vec<Problem> {
    let p = |name, batch, m, n, k, layout, per_step| Problem {
        name,
        batch,
        m,
        n,
        k,
        layout,
        per_step,
    };
    vec![
        p("q,o fwd", 1, 4096, 2048, 2048, "nt", 128),
        p("k,v fwd", 1, 4096, 512, 2048, "nt", 128),
        p("gate,up fwd", 1, 4096, 8192, 2048, "nt", 128),
        p("down fwd", 1, 4096, 2048, 8192, "nt", 64),
        p("q,o dx", 1, 4096, 2048, 2048, "nn", 128),
        p("k,v dx", 1, 4096, 2048, 512, "nn", 128),
        p("gate,up dx", 1, 4096, 2048, 8192, "nn", 128),
        p("down dx", 1, 4096, 8192, 2048, "nn", 64),
        p("q,o dW", 1, 2048, 2048, 4096, "tn", 128),
        p("k,v dW", 1, 512, 2048, 4096, "tn", 128),
        p("gate,up dW", 1, 8192, 2048, 4096, "tn", 128),
        p("down dW", 1, 2048, 8192, 4096, "tn", 64),
        p("head logits", 1, 4096, 8192, 2048, "nt", 128),
        p("head dx", 1, 4096, 2048, 8192, "nn", 64),
        p("head dW", 1, 8192, 2048, 4096, "tn", 64),
        p("attn scores", 32, 1024, 640, 64, "nt", 768),
        p("attn P V, dS K", 32, 1024, 64, 640, "nn", 512),
        p("attn dV, dK", 32, 640, 64, 1024, "tn", 512),
    ]
}

/// `DAPT_MATMUL`'s strategy against Burn's own matmul, alternating, in bf16 on the 1B step's
/// matmul problems ([`step_problems`]); prints one `matmul_timing` line per problem (times,
/// TFLOP/s, the largest difference from Burn's result relative to its largest value, or the
/// strategy's setup error) and a `matmul_step` line: the step's matmul seconds by each, a
/// problem the strategy refuses counted at Burn's time (the fallback). Asserts nothing; one
/// strategy per process, since a kernel that fails to compile may take the process with it:
/// `DAPT_MATMUL=double-tma-mma fused_gpu gpu_speed_of_matmul --include-ignored --nocapture`
/// (scripts/gpu-check.sh runs every strategy so and picks the fastest).
/// `DAPT_MATMUL_TIMING_DIVISOR=16` divides every size by 16 (at least 16): a quick run of the
/// timing's code on lavapipe (in f16), whose numbers mean nothing.
#[test]
#[ignore = "a timing for a real GPU, run by hand"]
fn gpu_speed_of_matmul_strategies() {
    use burn::tensor::backend::Backend;
    use std::io::Write;
    use std::time::Instant;
    let device = Default::default();
    let choice = matmul_choice();
    let (mut burn_s, mut choice_s) = (0.0f64, 0.0f64);
    let divisor: usize = std::env::var("DAPT_MATMUL_TIMING_DIVISOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // lavapipe has no bf16.
    let dtype = if cfg!(feature = "wgpu") {
        FloatDType::F16
    } else {
        FloatDType::BF16
    };
    for mut p in step_problems() {
        let scaled = |x: usize| (x / divisor.max(1)).max(16);
        (p.m, p.n, p.k) = (scaled(p.m), scaled(p.n), scaled(p.k));
        let make = |rows: usize, cols: usize| {
            Tensor::<Gpu, 3>::random(
                [p.batch, rows, cols],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .cast(dtype)
        };
        let lhs = match p.layout {
            "tn" => make(p.k, p.m).swap_dims(1, 2),
            _ => make(p.m, p.k),
        };
        let rhs = match p.layout {
            "nt" => make(p.n, p.k).swap_dims(1, 2),
            _ => make(p.k, p.n),
        };
        let run = |c: MatmulChoice| {
            matmul_with(
                c,
                lhs.clone().into_primitive().tensor(),
                rhs.clone().into_primitive().tensor(),
            )
            .map(|t| Tensor::<Gpu, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(t)))
        };
        let flops = 2.0 * (p.batch * p.m * p.n * p.k) as f64;
        let reference = run(MatmulChoice::Burn).expect("Burn's matmul");
        let head = format!(
            "matmul_timing strategy={} shape={:?} batch={} m={} n={} k={} layout={} per_step={}",
            choice.name(),
            p.name,
            p.batch,
            p.m,
            p.n,
            p.k,
            p.layout,
            p.per_step
        );
        let rel_err = match run(choice) {
            Ok(out) => {
                let scale = reference
                    .clone()
                    .cast(FloatDType::F32)
                    .abs()
                    .max()
                    .into_scalar();
                let diff = (out.cast(FloatDType::F32) - reference.clone().cast(FloatDType::F32))
                    .abs()
                    .max()
                    .into_scalar();
                diff / scale
            }
            Err(e) => {
                // Burn's time stands in: the model falls back to it.
                let ms = time_ms(&device, || drop(run(MatmulChoice::Burn)));
                burn_s += ms * 1e-3 * p.per_step as f64;
                choice_s += ms * 1e-3 * p.per_step as f64;
                let e = format!("{e:?}").replace('"', "'");
                println!("{head} burn_ms={ms:.4} status=unsupported error=\"{e}\"");
                std::io::stdout().flush().ok();
                continue;
            }
        };
        // Alternating, 5 timed rounds after 2 warm-up rounds, 5 matmuls per round.
        let (mut t_burn, mut t_choice) = (0.0, 0.0);
        for round in 0..7 {
            for (which, c) in [MatmulChoice::Burn, choice].into_iter().enumerate() {
                Gpu::sync(&device).expect("sync");
                let start = Instant::now();
                for _ in 0..5 {
                    drop(run(c));
                }
                Gpu::sync(&device).expect("sync");
                if round >= 2 {
                    let s = start.elapsed().as_secs_f64() / 25.0;
                    if which == 0 {
                        t_burn += s;
                    } else {
                        t_choice += s;
                    }
                }
            }
        }
        burn_s += t_burn * p.per_step as f64;
        choice_s += t_choice * p.per_step as f64;
        let status = if rel_err < 1e-2 { "ok" } else { "wrong" };
        println!(
            "{head} burn_ms={:.4} ms={:.4} burn_tflops={:.1} tflops={:.1} rel_err={rel_err:.2e} status={status}",
            t_burn * 1e3,
            t_choice * 1e3,
            flops / t_burn / 1e12,
            flops / t_choice / 1e12,
        );
        std::io::stdout().flush().ok();
    }
    println!(
        "matmul_step strategy={} burn_s={burn_s:.4} s={choice_s:.4}",
        choice.name()
    );
}

/// Milliseconds one call of `f` takes, the mean of 5 after one warm-up, synchronised.
fn time_ms(device: &burn::tensor::Device<Gpu>, f: impl Fn()) -> f64 {
    use burn::tensor::backend::Backend;
    f();
    Gpu::sync(device).expect("sync");
    let start = std::time::Instant::now();
    for _ in 0..5 {
        f();
    }
    Gpu::sync(device).expect("sync");
    start.elapsed().as_secs_f64() * 1e3 / 5.0
}
