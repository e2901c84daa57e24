//! The fused attention op on the CPU backend (issue 12) against the decomposed formula it
//! replaced (`reference_attention`: heads to the front, repeated kv heads, masked softmax),
//! both differentiated on `Autodiff<Flex>`: outputs and the gradients of q, k and v, on random
//! shapes with odd sequence lengths, GQA ratios 1, 2 and 4, head dims 8 to 128 and sliding
//! windows; the log-sum-exp against a float64 loop; the device-built mask against the
//! host-built one it replaced. The blockwise form of the op (`fused::blockwise`: Burn matmuls
//! per block of query positions) against the one-block default bodies, for block sizes that do
//! and do not divide the sequence.

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use dapt_worker::fused::attention::{
    attention_mask, flash_attention, reference_attention, AttentionShape,
};
use dapt_worker::fused::{blockwise, AttentionOps};
use dapt_worker::Cpu;

mod support;
use support::Rng;

type Ad = Autodiff<Cpu>;

/// The shapes checked: odd and even lengths, GQA ratios 1, 2 and 4, head dims 8 to 128,
/// windows narrower than, equal to and wider than the sequence, a one-token sequence.
fn cases() -> Vec<AttentionShape> {
    vec![
        AttentionShape::new(2, 7, 2, 2, 64, None),
        AttentionShape::new(1, 13, 4, 2, 128, None),
        AttentionShape::new(2, 9, 8, 2, 64, Some(3)),
        AttentionShape::new(1, 17, 4, 1, 8, Some(8)),
        AttentionShape::new(2, 11, 6, 3, 24, Some(11)),
        AttentionShape::new(1, 6, 4, 4, 32, Some(40)),
        AttentionShape::new(3, 1, 2, 1, 16, None),
    ]
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32")
}

/// The largest difference between `a` and `b`, relative to `b`'s largest magnitude.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3, "the reference is all (near) zeros: {scale}");
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

type Attend = fn(Tensor<Ad, 2>, Tensor<Ad, 2>, Tensor<Ad, 2>, AttentionShape) -> Tensor<Ad, 2>;

/// Random `q`, `k`, `v` and an upstream gradient for `s`.
fn inputs<B: Backend>(s: AttentionShape, seed: u64) -> [Tensor<B, 2>; 4] {
    let mut rng = Rng(seed);
    let rows = s.batch * s.seq;
    [
        rng.tensor(rows, s.heads * s.head_dim),
        rng.tensor(rows, s.kv_heads * s.head_dim),
        rng.tensor(rows, s.kv_heads * s.head_dim),
        rng.tensor(rows, s.heads * s.head_dim),
    ]
}

/// Output and `(dq, dk, dv)` of `attend` on `Autodiff<Flex>` for the loss `sum(out * up)`.
fn grads(s: AttentionShape, [q, k, v, up]: [Tensor<Ad, 2>; 4], attend: Attend) -> [Vec<f32>; 4] {
    let [q, k, v] = [q, k, v].map(|t| t.require_grad());
    let out = attend(q.clone(), k.clone(), v.clone(), s);
    let grads = (out.clone() * up).sum().backward();
    let grad = |t: &Tensor<Ad, 2>| values(t.grad(&grads).expect("a gradient"));
    [values(out), grad(&q), grad(&k), grad(&v)]
}

#[test]
fn fused_attention_matches_the_decomposed_formula_and_its_gradients() {
    for (n, s) in cases().into_iter().enumerate() {
        let seed = 0x5eed + n as u64;
        let fused = grads(s, inputs(s, seed), flash_attention);
        let reference = grads(s, inputs(s, seed), reference_attention);
        for (what, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&reference))
        {
            if s.seq == 1 && (*what == "dq" || *what == "dk") {
                // One key: the softmax is constant, so the scores get no gradient.
                assert!(
                    a.iter().all(|x| x.abs() < 1e-6),
                    "{what} is not zero for {s:?}"
                );
                continue;
            }
            let d = rel_diff(a, b);
            assert!(d < 1e-5, "{what} differs by {d} (relative) for {s:?}");
        }
    }
}

/// The log-sum-exp of each query row's scaled, masked scores, in float64 from the inputs.
fn lse_f64(q: &[f32], k: &[f32], s: &AttentionShape) -> Vec<f64> {
    let (hd, w) = (s.head_dim, s.effective_window());
    let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
    let mut out = Vec::new();
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / s.group();
            for i in 0..s.seq {
                let scores: Vec<f64> = (i + 1 - w.min(i + 1)..=i)
                    .map(|j| {
                        let qi = &q[(b * s.seq + i) * qw + h * hd..][..hd];
                        let kj = &k[(b * s.seq + j) * kw + g * hd..][..hd];
                        let dot: f64 = qi.iter().zip(kj).map(|(x, y)| *x as f64 * *y as f64).sum();
                        dot * s.scale()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push(max + scores.iter().map(|x| (x - max).exp()).sum::<f64>().ln());
            }
        }
    }
    out
}

#[test]
fn the_forward_writes_each_rows_log_sum_exp() {
    for (n, s) in cases().into_iter().enumerate() {
        let [q, k, v, _] = inputs::<Cpu>(s, 0x15e + n as u64);
        let expected = lse_f64(&values(q.clone()), &values(k.clone()), &s);
        let prim = |t: Tensor<Cpu, 2>| t.into_primitive().tensor();
        let (_, lse) = Cpu::flash_attention_forward(prim(q), prim(k), prim(v), s);
        let lse = Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(lse));
        assert_eq!(lse.dims(), [s.batch, s.heads, s.seq]);
        let lse = values(lse);
        let diff = lse
            .iter()
            .zip(&expected)
            .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(diff < 1e-4, "lse differs by {diff} for {s:?}");
    }
}

/// An attention op's output, log-sum-exp (checked to be `[batch, heads, seq]`), `dq`, `dk` and
/// `dv` on the CPU for `[q, k, v, dout]` of shape `s` (the backward taking the forward's own
/// output and log-sum-exp), as f32 values.
fn forward_backward(
    s: AttentionShape,
    [q, k, v, dout]: &[Tensor<Cpu, 2>; 4],
    forward: impl Fn(
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
    ) -> (FloatTensor<Cpu>, FloatTensor<Cpu>),
    backward: impl Fn(
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
        FloatTensor<Cpu>,
    ) -> (FloatTensor<Cpu>, FloatTensor<Cpu>, FloatTensor<Cpu>),
) -> [Vec<f32>; 5] {
    let prim = |t: &Tensor<Cpu, 2>| t.clone().into_primitive().tensor();
    let (out, lse) = forward(prim(q), prim(k), prim(v));
    let lse = Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(lse));
    assert_eq!(lse.dims(), [s.batch, s.heads, s.seq]);
    let (dq, dk, dv) = backward(
        prim(q),
        prim(k),
        prim(v),
        out.clone(),
        lse.clone().into_primitive().tensor(),
        prim(dout),
    );
    let back = |p| values(Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(p)));
    [back(out), values(lse), back(dq), back(dk), back(dv)]
}

/// Blockwise attention's output, log-sum-exp and `(dq, dk, dv)` equal the default bodies' (all
/// query rows at once) for blocks of 1, 2, 5 and 16 positions and the whole sequence: blocks
/// that cut a window, blocks shorter than it, a last block shorter than the rest.
#[test]
fn blockwise_attention_matches_the_one_block_op() {
    for (n, s) in cases().into_iter().enumerate() {
        let inputs = inputs::<Cpu>(s, 0xb10c + n as u64);
        let expected = forward_backward(
            s,
            &inputs,
            |q, k, v| Cpu::flash_attention_forward(q, k, v, s),
            |q, k, v, o, l, d| Cpu::flash_attention_backward(q, k, v, o, l, d, s),
        );
        for block in [1, 2, 5, 16, s.seq] {
            let got = forward_backward(
                s,
                &inputs,
                |q, k, v| blockwise::forward::<Cpu>(q, k, v, s, block),
                |q, k, v, o, l, d| blockwise::backward::<Cpu>(q, k, v, o, l, d, s, block),
            );
            for (what, (a, b)) in ["out", "lse", "dq", "dk", "dv"]
                .iter()
                .zip(got.iter().zip(&expected))
            {
                if s.seq == 1 && (*what == "dq" || *what == "dk") {
                    assert!(a.iter().all(|x| x.abs() < 1e-6), "{what} for {s:?}");
                    continue;
                }
                let d = rel_diff(a, b);
                assert!(
                    d < 1e-5,
                    "{what} differs by {d} (relative) for {s:?}, block {block}"
                );
            }
        }
    }
}

/// The block is sized for 128 MiB of f32 scores, in multiples of 64 positions, at most the
/// sequence.
#[test]
fn blockwise_blocks_are_sized_for_the_score_budget() {
    // Llama 3.2 1B at micro-batch 4, seq 1024: 4 * 32 * 1024 * 4 bytes per position -> 256.
    let s = AttentionShape::new(4, 1024, 32, 8, 64, None);
    assert_eq!(blockwise::fitted_block_positions(&s), 256);
    assert_eq!(
        blockwise::fitted_block_positions(&AttentionShape::new(1, 100, 4, 4, 64, None)),
        100
    );
    // Never fewer than 64 positions, however large the batch.
    let huge = AttentionShape::new(64, 8192, 64, 8, 128, None);
    assert_eq!(blockwise::fitted_block_positions(&huge), 64);
}

#[test]
fn the_mask_is_the_causal_window_it_replaced() {
    for t in [1, 2, 5, 9] {
        for window in [None, Some(1), Some(3), Some(5), Some(12)] {
            let mask = values(attention_mask::<Cpu>(t, window, &Default::default()).float());
            let expected: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..t).map(move |j| {
                        let hidden = j > i || window.is_some_and(|w| i - j >= w);
                        if hidden {
                            1.0
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            assert_eq!(mask, expected, "t {t}, window {window:?}");
        }
    }
}

/// Forward + backward of the fused op and of the decomposed formula on `Autodiff<Flex>`, in
/// one run, alternating, at the attention shapes of the CPU bench's `tiny` and `d512` models.
/// Prints, asserts nothing; run by hand:
/// `cargo test -p dapt-worker --test fused_attention -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, run by hand"]
fn cpu_speed_of_fused_and_decomposed_attention() {
    use std::time::{Duration, Instant};
    let shapes = [
        ("tiny", AttentionShape::new(8, 64, 4, 2, 32, None)),
        ("d512", AttentionShape::new(4, 256, 8, 4, 64, None)),
        (
            "d512 window 64",
            AttentionShape::new(4, 256, 8, 4, 64, Some(64)),
        ),
    ];
    for (name, s) in shapes {
        let mut times = [Duration::ZERO; 2];
        let x = inputs(s, 7);
        for round in 0..12 {
            let attends: [Attend; 2] = [flash_attention, reference_attention];
            for (which, attend) in attends.into_iter().enumerate() {
                let x = x.clone();
                let start = Instant::now();
                grads(s, x, attend);
                // The first two rounds warm up.
                if round >= 2 {
                    times[which] += start.elapsed();
                }
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / 10.0;
        // The decomposed formula builds its mask per call (it was built once per batch shape).
        let start = Instant::now();
        for _ in 0..10 {
            let mask = attention_mask::<Cpu>(s.seq, s.window, &Default::default());
            values(mask.float());
        }
        println!(
            "{name}: fused {:.2} ms, decomposed {:.2} ms per forward + backward; mask {:.3} ms",
            ms(times[0]),
            ms(times[1]),
            ms(start.elapsed())
        );
    }
}
