//! The flash attention kernels on the GPU backend against the CPU backend's implementation
//! (itself checked against the decomposed formula in `tests/fused_attention.rs`): the forward's
//! output and log-sum-exp, the backward's `dq`, `dk`, `dv` for the same upstream gradient, and
//! the op through `Autodiff<Gpu>` against the decomposed formula on `Autodiff<Cpu>`. Small
//! shapes (lavapipe emulates the GPU on the CPU), with odd lengths, GQA ratios 1, 2 and 4,
//! head dims 64 and 128 and sliding windows; inputs never zero.

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Distribution, FloatDType, Tensor, TensorPrimitive};
use dapt_worker::fused::attention::{flash_attention, reference_attention, AttentionShape};
use dapt_worker::fused::kernels::attention as unit;
use dapt_worker::fused::AttentionOps;
use dapt_worker::Cpu;

use super::{max_abs_diff, to_gpu, Gpu};

/// Lengths that cross tile boundaries (a tile is 32 rows at head dim 64, 16 at 128).
fn cases() -> Vec<AttentionShape> {
    vec![
        AttentionShape::new(2, 37, 2, 2, 64, None),
        AttentionShape::new(1, 21, 4, 2, 128, Some(5)),
        AttentionShape::new(2, 19, 4, 1, 16, Some(7)),
        AttentionShape::new(1, 33, 8, 2, 64, Some(33)),
    ]
}

/// Random `[rows, cols]` values (normal, so never all zero) on the CPU.
fn random(rows: usize, cols: usize) -> Tensor<Cpu, 2> {
    Tensor::random(
        [rows, cols],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
}

/// `q`, `k`, `v` and an upstream gradient for `s`.
fn inputs(s: &AttentionShape) -> [Tensor<Cpu, 2>; 4] {
    let rows = s.batch * s.seq;
    [
        random(rows, s.heads * s.head_dim),
        random(rows, s.kv_heads * s.head_dim),
        random(rows, s.kv_heads * s.head_dim),
        random(rows, s.heads * s.head_dim),
    ]
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn largest(t: &Tensor<Cpu, 2>) -> f32 {
    t.clone().abs().max().into_scalar()
}

/// An attention op's forward (q, k, v) and backward (q, k, v, out, lse, dout) on primitives.
type Forward<B> =
    dyn Fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>);
type Backward<B> = dyn Fn(
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// What an attention op gives for `[q, k, v, up]`: its output, log-sum-exp and `(dq, dk, dv)`,
/// the backward taking the forward's own output and log-sum-exp.
struct Run<B: Backend> {
    out: Tensor<B, 2>,
    lse: Tensor<B, 3>,
    grads: [Tensor<B, 2>; 3],
}

fn run<B: Backend>(
    [q, k, v, up]: [Tensor<B, 2>; 4],
    forward: &Forward<B>,
    backward: &Backward<B>,
) -> Run<B> {
    let (out, lse) = forward(prim(q.clone()), prim(k.clone()), prim(v.clone()));
    let (out, lse) = (wrap::<B, 2>(out), wrap::<B, 3>(lse));
    let (dq, dk, dv) = backward(
        prim(q),
        prim(k),
        prim(v),
        prim(out.clone()),
        prim(lse.clone()),
        prim(up),
    );
    Run {
        out,
        lse,
        grads: [dq, dk, dv].map(wrap::<B, 2>),
    }
}

/// The CPU backend's op: the reference.
fn on_cpu(inputs: &[Tensor<Cpu, 2>; 4], s: AttentionShape) -> Run<Cpu> {
    run(
        inputs.clone(),
        &move |q, k, v| Cpu::flash_attention_forward(q, k, v, s),
        &move |q, k, v, o, l, d| Cpu::flash_attention_backward(q, k, v, o, l, d, s),
    )
}

/// `inputs` on the GPU in `dtype`.
fn on_gpu(inputs: &[Tensor<Cpu, 2>; 4], dtype: FloatDType) -> [Tensor<Gpu, 2>; 4] {
    inputs.clone().map(|t| to_gpu(&t).cast(dtype))
}

/// The GPU backend's unit-level kernels on `inputs` in `dtype` (called directly: the op's
/// default, `DAPT_ATTENTION=auto`, runs blockwise).
fn kernels(inputs: &[Tensor<Cpu, 2>; 4], s: AttentionShape, dtype: FloatDType) -> Run<Gpu> {
    run(
        on_gpu(inputs, dtype),
        &move |q, k, v| unit::forward(q, k, v, s),
        &move |q, k, v, o, l, d| unit::backward(q, k, v, o, l, d, s),
    )
}

#[test]
fn kernels_match_the_cpu_forward_and_backward() {
    for s in cases() {
        let inputs = inputs(&s);
        let (c, g) = (on_cpu(&inputs, s), kernels(&inputs, s, FloatDType::F32));
        assert!(largest(&c.out) > 0.1);
        let d = max_abs_diff(g.out, c.out);
        assert!(d < 1e-4, "out differs by {d} for {s:?}");
        let d = max_abs_diff(g.lse, c.lse);
        assert!(d < 1e-4, "lse differs by {d} for {s:?}");
        for (what, (g, c)) in ["dq", "dk", "dv"]
            .iter()
            .zip(g.grads.into_iter().zip(c.grads))
        {
            let scale = largest(&c);
            assert!(scale > 0.1, "{what} is near zero for {s:?}");
            let d = max_abs_diff(g, c) / scale;
            assert!(d < 1e-4, "{what} differs by {d} (relative) for {s:?}");
        }
    }
}

/// Blockwise attention (`fused::blockwise`, Burn's matmuls per block of query positions: the
/// tensor-core alternative to the kernels) on the GPU backend against the CPU's one-block op,
/// forward and backward, for blocks that do and do not divide the sequence, in f32 and f16.
#[test]
fn blockwise_attention_matches_the_cpu_forward_and_backward() {
    use dapt_worker::fused::blockwise;
    for s in cases() {
        let inputs = inputs(&s);
        let c = on_cpu(&inputs, s);
        // Blockwise runs its products as the backend's matmuls: TF32 in f32 on CUDA.
        let f32_tolerance = super::MATMUL_RTOL.max(1e-4);
        for (dtype, tolerance) in [(FloatDType::F32, f32_tolerance), (FloatDType::F16, 2e-2)] {
            for block in [5, 16] {
                let at = format!("{s:?}, {dtype:?}, block {block}");
                let g = run(
                    on_gpu(&inputs, dtype),
                    &move |q, k, v| blockwise::forward::<Gpu>(q, k, v, s, block),
                    &move |q, k, v, o, l, d| blockwise::backward::<Gpu>(q, k, v, o, l, d, s, block),
                );
                let d = max_abs_diff(g.out, c.out.clone()) / largest(&c.out);
                assert!(d < tolerance, "out differs by {d} (relative) for {at}");
                let d = max_abs_diff(g.lse, c.lse.clone());
                assert!(d < tolerance, "lse differs by {d} for {at}");
                for (what, (g, c)) in ["dq", "dk", "dv"]
                    .iter()
                    .zip(g.grads.into_iter().zip(&c.grads))
                {
                    let d = max_abs_diff(g, c.clone()) / largest(c);
                    assert!(
                        d < 2.0 * tolerance,
                        "{what} differs by {d} (relative) for {at}"
                    );
                }
            }
        }
    }
}

/// The kernels on f16 tensors (dispatched on the runtime dtype; lavapipe has f16 but no bf16).
#[test]
fn kernels_take_f16_inputs() {
    half_precision(FloatDType::F16);
}

/// The kernels on bf16 tensors (the GPU's mixed precision); not on lavapipe, which has no bf16.
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
#[test]
fn kernels_take_bf16_inputs() {
    half_precision(FloatDType::BF16);
}

/// The kernels on `dtype` inputs: outputs and gradients in `dtype` within its rounding of the
/// f32 results (accumulation is f32), the log-sum-exp still f32.
fn half_precision(dtype: FloatDType) {
    use burn::tensor::DType;
    let s = AttentionShape::new(1, 29, 4, 2, 64, Some(11));
    let inputs = inputs(&s);
    let (c, g) = (on_cpu(&inputs, s), kernels(&inputs, s, dtype));
    assert_eq!(g.out.dtype(), DType::from(dtype));
    assert_eq!(g.lse.dtype(), DType::F32);
    // bf16 keeps 8 bits of mantissa, f16 11.
    let tolerance = if dtype == FloatDType::BF16 {
        8e-2
    } else {
        1e-2
    };
    let d = max_abs_diff(g.out, c.out.clone()) / largest(&c.out);
    assert!(d < tolerance, "out differs by {d} (relative)");
    let d = max_abs_diff(g.lse, c.lse);
    assert!(d < 2.0 * tolerance, "lse differs by {d}");
    for (what, (g, c)) in ["dq", "dk", "dv"]
        .iter()
        .zip(g.grads.into_iter().zip(c.grads))
    {
        assert_eq!(g.dtype(), DType::from(dtype));
        let d = max_abs_diff(g, c.clone()) / largest(&c);
        assert!(d < 2.0 * tolerance, "{what} differs by {d} (relative)");
    }
}

#[test]
fn autodiff_on_the_gpu_matches_the_decomposed_formula() {
    let s = AttentionShape::new(2, 23, 4, 2, 64, Some(9));
    let [q, k, v, up] = inputs(&s);

    let leaf =
        |t: &Tensor<Cpu, 2>| Tensor::<Autodiff<Cpu>, 2>::from_inner(t.clone()).require_grad();
    let (qc, kc, vc) = (leaf(&q), leaf(&k), leaf(&v));
    let out_c = reference_attention(qc.clone(), kc.clone(), vc.clone(), s);
    let grads = (out_c.clone() * Tensor::from_inner(up.clone()))
        .sum()
        .backward();
    let expected = [&qc, &kc, &vc].map(|t| t.grad(&grads).expect("a gradient"));

    let leaf =
        |t: &Tensor<Cpu, 2>| Tensor::<Autodiff<Gpu>, 2>::from_inner(to_gpu(t)).require_grad();
    let (qg, kg, vg) = (leaf(&q), leaf(&k), leaf(&v));
    let out_g = flash_attention(qg.clone(), kg.clone(), vg.clone(), s);
    let grads = (out_g.clone() * Tensor::from_inner(to_gpu(&up)))
        .sum()
        .backward();
    let got = [&qg, &kg, &vg].map(|t| t.grad(&grads).expect("a gradient"));

    // The op's default on the GPU (blockwise) runs its products as matmuls: TF32 on CUDA.
    let tolerance = super::MATMUL_RTOL.max(1e-4);
    let d = max_abs_diff(out_g.inner(), out_c.clone().inner()) / largest(&out_c.inner());
    assert!(d < tolerance, "out differs by {d} (relative)");
    for (what, (g, c)) in ["dq", "dk", "dv"].iter().zip(got.into_iter().zip(expected)) {
        let scale = largest(&c);
        assert!(scale > 0.1, "{what} is near zero");
        let d = max_abs_diff(g, c) / scale;
        assert!(d < tolerance, "{what} differs by {d} (relative)");
    }
}

/// The model's attention on the GPU is the fused op (the CPU runs the decomposed formula):
/// a Mistral-style model with GQA 4 and a sliding window gives the CPU's logits.
/// `cargo test -p dapt-worker --features wgpu --test fused_gpu -- --ignored`.
#[test]
#[ignore = "about a minute on lavapipe (Burn's own kernels compile); run by hand"]
fn the_model_with_flash_attention_matches_the_cpu() {
    use burn::tensor::{Int, TensorData};
    use dapt_proto::job::Preset;
    use dapt_worker::model::{Family, Llama, LlamaConfig, ParamLayout};

    const { assert!(<Gpu as AttentionOps>::FUSED_ATTENTION && !<Cpu as AttentionOps>::FUSED_ATTENTION) };
    let mut cfg = LlamaConfig::preset(Preset::Tiny, 64);
    cfg.family = Family::Mistral;
    cfg.num_hidden_layers = 1;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 1;
    cfg.head_dim = 32;
    cfg.sliding_window = Some(5);
    let flat = ParamLayout::llama(&cfg).init(0.3, 12);
    let (batch, seq) = (2, 19);
    let ids: Vec<i64> = (0..batch * seq).map(|i| (i * 37 % 64) as i64).collect();
    let ids = TensorData::new(ids, [batch, seq]);

    let cpu = Llama::<Cpu>::from_flat(&cfg, &flat, &Default::default(), false).forward(Tensor::<
        Cpu,
        2,
        Int,
    >::from_data(
        ids.clone(),
        &Default::default(),
    ));
    let gpu = Llama::<Gpu>::from_flat(&cfg, &flat, &Default::default(), false).forward(Tensor::<
        Gpu,
        2,
        Int,
    >::from_data(
        ids,
        &Default::default(),
    ));
    let scale = cpu.clone().abs().max().into_scalar();
    assert!(scale > 0.1);
    let d = max_abs_diff(gpu, cpu) / scale;
    // The model's matmuls: TF32 on CUDA (MATMUL_RTOL).
    let tolerance = super::MATMUL_RTOL.max(1e-4);
    assert!(d < tolerance, "logits differ by {d} (relative)");
}

/// Forward + backward of the fused op and of the decomposed formula on `Autodiff<Gpu>`, in one
/// run, alternating, at the Llama-3.2-1B attention shape (batch 4, seq 1024, 32 heads, 8 kv
/// heads, head dim 64) in f32 and bf16. Prints, asserts nothing; for a lent GPU:
/// `cargo test -p dapt-worker --features cuda --test fused_gpu gpu_speed -- --ignored --nocapture`.
#[test]
#[ignore = "a timing for a real GPU, run by hand"]
fn gpu_speed_of_flash_and_decomposed_attention() {
    use std::time::{Duration, Instant};
    let device = Default::default();
    let s = timing_shape();
    type Ad = Autodiff<Gpu>;
    type Attend = fn(Tensor<Ad, 2>, Tensor<Ad, 2>, Tensor<Ad, 2>, AttentionShape) -> Tensor<Ad, 2>;
    for dtype in [
        burn::tensor::FloatDType::F32,
        burn::tensor::FloatDType::BF16,
    ] {
        let [q, k, v, up] = timing_inputs(&s, dtype);
        let attends: [Attend; 2] = [flash_attention, reference_attention];
        let mut times = [Duration::ZERO; 2];
        for round in 0..7 {
            for (which, attend) in attends.into_iter().enumerate() {
                let leaf =
                    |t: &Tensor<Gpu, 2>| Tensor::<Ad, 2>::from_inner(t.clone()).require_grad();
                let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
                Gpu::sync(&device).expect("sync");
                let start = Instant::now();
                let out = attend(ql.clone(), kl.clone(), vl.clone(), s);
                let grads = (out * Tensor::from_inner(up.clone())).sum().backward();
                let g = [&ql, &kl, &vl].map(|t| t.grad(&grads).expect("a gradient"));
                drop(g);
                Gpu::sync(&device).expect("sync");
                if round >= 2 {
                    times[which] += start.elapsed();
                }
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / 5.0;
        println!(
            "{dtype:?}: flash {:.2} ms, decomposed {:.2} ms per forward + backward",
            ms(times[0]),
            ms(times[1])
        );
    }
}

/// Forward + backward of the op as the unit-level kernels and as blockwise Burn matmuls
/// (tensor cores), untracked, alternating, at the Llama-3.2-1B attention shape (batch 4, seq
/// 1024, 32 heads, 8 kv heads, head dim 64) and with Llama-2-7B's heads (32 of head dim 128),
/// in bf16 and f32. Prints, asserts nothing: which one
/// `DAPT_ATTENTION` should default to is this measurement's (docs/gpu.md).
#[test]
#[ignore = "a timing for a real GPU, run by hand"]
fn gpu_speed_of_kernel_and_blockwise_attention() {
    use dapt_worker::fused::blockwise;
    use std::time::{Duration, Instant};
    let device = Default::default();
    // The 1B shape, and Llama-2-7B's heads (32 kv heads of 128) at the same tokens.
    for s in [
        timing_shape(),
        AttentionShape::new(4, 1024, 32, 32, 128, None),
    ] {
        let block = blockwise::block_positions(&s);
        for dtype in [
            burn::tensor::FloatDType::BF16,
            burn::tensor::FloatDType::F32,
        ] {
            let [q, k, v, up] = timing_inputs(&s, dtype);
            let mut times = [Duration::ZERO; 2];
            for round in 0..7 {
                for (which, time) in times.iter_mut().enumerate() {
                    Gpu::sync(&device).expect("sync");
                    let start = Instant::now();
                    let p = |t: &Tensor<Gpu, 2>| prim(t.clone());
                    let grads = if which == 0 {
                        let (out, lse) = unit::forward(p(&q), p(&k), p(&v), s);
                        unit::backward(p(&q), p(&k), p(&v), out, lse, p(&up), s)
                    } else {
                        let (out, lse) = blockwise::forward::<Gpu>(p(&q), p(&k), p(&v), s, block);
                        blockwise::backward::<Gpu>(p(&q), p(&k), p(&v), out, lse, p(&up), s, block)
                    };
                    drop(grads);
                    Gpu::sync(&device).expect("sync");
                    if round >= 2 {
                        *time += start.elapsed();
                    }
                }
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3 / 5.0;
            // FLOPs of the causal op: forward 2 matmuls, backward 5 (one recomputes the scores),
            // each 2 b h s^2 d / 2 over the lower triangle.
            let flops = 7.0 * (s.batch * s.heads * s.seq * s.seq * s.head_dim) as f64;
            println!(
            "attention hd {} {dtype:?}: kernels {:.2} ms ({:.1} TFLOP/s), blockwise (block {block}) {:.2} ms ({:.1} TFLOP/s) per forward + backward",
            s.head_dim,
            ms(times[0]),
            flops / (ms(times[0]) * 1e9),
            ms(times[1]),
            flops / (ms(times[1]) * 1e9),
        );
        }
    }
}

/// The Llama-3.2-1B attention shape the timings use: batch 4, seq 1024, 32 heads, 8 kv heads,
/// head dim 64.
fn timing_shape() -> AttentionShape {
    AttentionShape::new(4, 1024, 32, 8, 64, None)
}

/// Random `[q, k, v, up]` for `s` on the GPU in `dtype`.
fn timing_inputs(s: &AttentionShape, dtype: burn::tensor::FloatDType) -> [Tensor<Gpu, 2>; 4] {
    let rows = s.batch * s.seq;
    let make = |cols: usize| {
        Tensor::<Gpu, 2>::random(
            [rows, cols],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
        .cast(dtype)
    };
    [
        make(s.heads * s.head_dim),
        make(s.kv_heads * s.head_dim),
        make(s.kv_heads * s.head_dim),
        make(s.heads * s.head_dim),
    ]
}
