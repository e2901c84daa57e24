//! The fused RMSNorm, RoPE and SwiGLU (`dapt_worker::fused::norm`) on `Autodiff<Flex>` against
//! the decomposed ops the model used before them (forward values and, through Burn's autodiff,
//! every input's gradient) and against a float64 host implementation of the formula
//! (central finite differences for the gradients). Shapes have odd row counts, head dims 64
//! and 128; the inputs are never zero.

use burn::backend::Autodiff;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use dapt_worker::fused::norm::{self, reference, NormOps, RopeTables};
use dapt_worker::Cpu;

type Ad = Autodiff<Cpu>;

const EPS: f64 = 1e-5;

/// A deterministic source of values in `±[0.1, 2]` (never zero, both signs).
struct Values(u64);

impl Values {
    fn take(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // xorshift64*
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                let u = bits as f32 / (1u64 << 24) as f32; // [0, 1)
                let magnitude = 0.1 + 1.9 * (u * 2.0).fract();
                if u < 0.5 {
                    magnitude
                } else {
                    -magnitude
                }
            })
            .collect()
    }
}

fn tensor<B: Backend>(values: &[f32], shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32")
}

/// Panics unless `a` and `b` agree within `tol` relative to the larger magnitude (at least 1).
fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let scale = x.abs().max(y.abs()).max(1.0);
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}: element {i}: {x} against {y}"
        );
    }
}

/// The gradient of `sum(f(x, ...) * r)` with respect to each of `inputs`, and the value of
/// `f`, on `Autodiff<Cpu>`.
fn gradients<const N: usize>(
    inputs: [(&[f32], [usize; 2]); N],
    r: &[f32],
    f: impl Fn([Tensor<Ad, 2>; N]) -> Tensor<Ad, 2>,
) -> (Vec<f32>, [Vec<f32>; N]) {
    let leaves = inputs.map(|(v, shape)| tensor::<Ad>(v, shape).require_grad());
    let y = f(leaves.clone());
    let shape = y.dims();
    let value = host(y.clone());
    let grads = (y * tensor::<Ad>(r, shape)).sum().backward();
    let g = leaves.map(|l| host(l.grad(&grads).expect("a gradient for every input")));
    (value, g)
}

/// Central finite differences of the float64 `loss` at `x`, for at most 200 elements spread
/// over `x` (every element of a small one): `(index, derivative)`.
fn finite_differences(x: &[f32], loss: impl Fn(&[f64]) -> f64) -> Vec<(usize, f32)> {
    let mut at: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let h = 1e-5;
    // An odd stride, so that both halves of heads and all columns get visited.
    let stride = (x.len() / 200) | 1;
    (0..at.len())
        .step_by(stride)
        .map(|i| {
            let v = at[i];
            at[i] = v + h;
            let up = loss(&at);
            at[i] = v - h;
            let down = loss(&at);
            at[i] = v;
            (i, ((up - down) / (2.0 * h)) as f32)
        })
        .collect()
}

/// Panics unless `grad` agrees with the finite differences `fd` at their elements.
fn assert_matches_differences(grad: &[f32], fd: &[(usize, f32)], what: &str) {
    let (at, expected): (Vec<usize>, Vec<f32>) = fd.iter().copied().unzip();
    let got: Vec<f32> = at.iter().map(|&i| grad[i]).collect();
    assert_close(&got, &expected, 1e-4, what);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// The model's RMSNorm before the fused op: `x * 1/sqrt(mean(x^2) + eps) * w`.
fn rms_norm_decomposed<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let inv_rms = x
        .clone()
        .powi_scalar(2)
        .mean_dim(1)
        .add_scalar(EPS)
        .sqrt()
        .recip();
    x * inv_rms * w
}

/// `sum(rms_norm(x, w) * r)` in float64 on the host.
fn rms_norm_loss(x: &[f64], w: &[f64], r: &[f32]) -> f64 {
    let d = w.len();
    x.chunks(d)
        .zip(r.chunks(d))
        .map(|(row, r)| {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + EPS).sqrt();
            (0..d)
                .map(|j| row[j] * inv * w[j] * r[j] as f64)
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn rms_norm_matches_the_decomposed_ops_and_its_gradients() {
    let mut values = Values(1);
    for (n, d) in [(7, 64), (33, 128), (1, 64), (5, 96)] {
        let (x, w, r) = (values.take(n * d), values.take(d), values.take(n * d));
        let fused = gradients([(&x, [n, d]), (&w, [1, d])], &r, |[x, w]| {
            norm::rms_norm(x, w, EPS)
        });
        let decomposed = gradients([(&x, [n, d]), (&w, [1, d])], &r, |[x, w]| {
            rms_norm_decomposed(x, w)
        });
        let shape = format!("[{n}, {d}]");
        // The same operations in f32: the same numbers.
        assert_eq!(fused.0, decomposed.0, "{shape}: forward");
        assert_close(&fused.1[0], &decomposed.1[0], 1e-5, &format!("{shape}: dx"));
        assert_close(&fused.1[1], &decomposed.1[1], 1e-5, &format!("{shape}: dw"));
    }
}

#[test]
fn rms_norm_gradients_match_finite_differences() {
    let mut values = Values(2);
    for (n, d) in [(3, 64), (5, 128)] {
        let (x, w, r) = (values.take(n * d), values.take(d), values.take(n * d));
        let (_, [dx, dw]) = gradients([(&x, [n, d]), (&w, [1, d])], &r, |[x, w]| {
            norm::rms_norm(x, w, EPS)
        });
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let fd_x = finite_differences(&x, |x| rms_norm_loss(x, &w64, &r));
        let fd_w = finite_differences(&w, |w| rms_norm_loss(&x64, w, &r));
        assert_matches_differences(&dx, &fd_x, &format!("[{n}, {d}]: dx"));
        assert_matches_differences(&dw, &fd_w, &format!("[{n}, {d}]: dw"));
    }
}

#[test]
fn rms_norm_saves_the_f32_inverse_rms_and_keeps_the_dtype() {
    let mut values = Values(3);
    let (n, d) = (9, 64);
    let x = values.take(n * d);
    let w = values.take(d);
    let (y, inv_rms) = Cpu::rms_norm_forward(
        tensor::<Cpu>(&x, [n, d]).into_primitive().tensor(),
        tensor::<Cpu>(&w, [1, d]).into_primitive().tensor(),
        EPS,
    );
    let inv_rms = Tensor::<Cpu, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(inv_rms));
    assert_eq!(inv_rms.dims(), [n]);
    assert_eq!(inv_rms.dtype(), DType::F32);
    let expected: Vec<f32> = x
        .chunks(d)
        .map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            (1.0 / (ms + EPS).sqrt()) as f32
        })
        .collect();
    assert_close(&host(inv_rms), &expected, 1e-6, "inv_rms");

    // bf16 activations: the statistics in f32, the output in bf16, close to the f32 result.
    let x16 = tensor::<Cpu>(&x, [n, d]).cast(DType::BF16);
    let w16 = tensor::<Cpu>(&w, [1, d]).cast(DType::BF16);
    let y16 = norm::rms_norm(x16, w16, EPS);
    assert_eq!(y16.dtype(), DType::BF16);
    let y32 = Tensor::<Cpu, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
    assert_close(&host(y16), &host(y32), 2e-2, "bf16 forward");
}

#[test]
fn rms_norm_gives_the_gain_its_gradient_when_the_input_is_a_constant() {
    let mut values = Values(4);
    let (n, d) = (7, 64);
    let (x, w, r) = (values.take(n * d), values.take(d), values.take(n * d));
    let gain = tensor::<Ad>(&w, [1, d]).require_grad();
    let y = norm::rms_norm(tensor::<Ad>(&x, [n, d]), gain.clone(), EPS);
    let grads = (y * tensor::<Ad>(&r, [n, d])).sum().backward();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let fd = finite_differences(&w, |w| rms_norm_loss(&x64, w, &r));
    assert_matches_differences(&host(gain.grad(&grads).expect("dw")), &fd, "dw");
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// The model's RoPE before the fused op: tables expanded to every row and head of
/// `[batch * seq, heads * hd]`, `x * cos + rotate_half(x) * sin`.
fn rope_decomposed<B: Backend>(
    x: Tensor<B, 2>,
    heads: usize,
    tables: &RopeTables<B>,
) -> Tensor<B, 2> {
    let [rows, width] = x.dims();
    let [seq, hd] = tables.cos.dims();
    let expand = |t: &Tensor<B, 2>| {
        t.clone()
            .reshape([1, seq, 1, hd])
            .expand([rows / seq, seq, heads, hd])
            .reshape([rows, width])
    };
    let per_head = x.clone().reshape([rows * heads, hd]);
    let half = hd / 2;
    let x1 = per_head.clone().narrow(1, 0, half);
    let x2 = per_head.narrow(1, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 1).reshape([rows, width]);
    x * expand(&tables.cos) + rotated * expand(&tables.sin)
}

/// Llama-style inverse frequencies for `hd`.
fn inv_freq(hd: usize) -> Vec<f64> {
    (0..hd / 2)
        .map(|i| 1.0 / 500_000f64.powf(2.0 * i as f64 / hd as f64))
        .collect()
}

/// `sum(rope(x) * r)` in float64 on the host, with the tables' f32 values.
fn rope_loss(x: &[f64], r: &[f32], heads: usize, cos: &[f32], sin: &[f32], hd: usize) -> f64 {
    let width = heads * hd;
    let seq = cos.len() / hd;
    let half = hd / 2;
    let mut sum = 0.0;
    for (i, (&v, &r)) in x.iter().zip(r).enumerate() {
        let (row, j) = (i / width, i % width % hd);
        let t = (row % seq) * hd + j;
        let rotated = if j < half { -x[i + half] } else { x[i - half] };
        sum += (v * cos[t] as f64 + rotated * sin[t] as f64) * r as f64;
    }
    sum
}

#[test]
fn rope_matches_the_decomposed_ops_to_the_bit_and_its_gradient() {
    let mut values = Values(5);
    // (batch, seq, heads, head_dim): odd sequences, query and grouped key-value head counts.
    for (b, t, heads, hd) in [(2, 7, 4, 64), (1, 5, 2, 128), (3, 3, 1, 64), (2, 9, 3, 128)] {
        let tables = RopeTables::<Ad>::new(&inv_freq(hd), t, DType::F32, &Default::default());
        let (rows, width) = (b * t, heads * hd);
        let (x, r) = (values.take(rows * width), values.take(rows * width));
        let fused = gradients([(&x, [rows, width])], &r, |[x]| {
            norm::rope(x, heads, &tables)
        });
        let decomposed = gradients([(&x, [rows, width])], &r, |[x]| {
            rope_decomposed(x, heads, &tables)
        });
        let shape = format!("b {b} t {t} heads {heads} hd {hd}");
        assert_eq!(fused.0, decomposed.0, "{shape}: forward");
        assert_close(&fused.1[0], &decomposed.1[0], 1e-6, &format!("{shape}: dx"));

        let (cos, sin) = (host(tables.cos.clone()), host(tables.sin.clone()));
        let fd = finite_differences(&x, |x| rope_loss(x, &r, heads, &cos, &sin, hd));
        assert_matches_differences(&fused.1[0], &fd, &format!("{shape}: dx by differences"));
    }
}

#[test]
fn rope_on_the_cpu_equals_its_tensor_op_reference_in_f32_and_bf16() {
    let mut values = Values(6);
    let (b, t, heads, hd) = (3, 5, 2, 64);
    let x = values.take(b * t * heads * hd);
    for dtype in [DType::F32, DType::BF16] {
        let tables = RopeTables::<Cpu>::new(&inv_freq(hd), t, dtype, &Default::default());
        let x = tensor::<Cpu>(&x, [b * t, heads * hd]).cast(dtype);
        let prim = |t: &Tensor<Cpu, 2>| t.clone().into_primitive().tensor();
        let fast = norm::rope(x.clone(), heads, &tables);
        let slow = reference::rope::<Cpu>(prim(&x), prim(&tables.cos), prim(&tables.sin), heads);
        let slow = Tensor::<Cpu, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(slow));
        let decomposed = rope_decomposed(x, heads, &tables);
        assert_eq!(fast.dtype(), dtype);
        assert_eq!(host(fast.clone()), host(slow), "{dtype:?}: the reference");
        assert_eq!(
            host(fast),
            host(decomposed),
            "{dtype:?}: the decomposed ops"
        );
    }
}

#[test]
fn rope_tables_are_small_and_hold_the_angles_of_each_position() {
    let hd = 8;
    let freqs = inv_freq(hd);
    let tables = RopeTables::<Cpu>::new(&freqs, 3, DType::F32, &Default::default());
    assert_eq!(tables.cos.dims(), [3, hd]);
    let (cos, sin) = (host(tables.cos), host(tables.sin));
    for pos in 0..3 {
        for j in 0..hd {
            let angle = pos as f32 * freqs[j % (hd / 2)] as f32;
            assert_eq!(cos[pos * hd + j], angle.cos());
            assert_eq!(sin[pos * hd + j], angle.sin());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `sum(silu(gate) * up * r)` in float64 on the host.
fn swiglu_loss(gate: &[f64], up: &[f64], r: &[f32]) -> f64 {
    gate.iter()
        .zip(up)
        .zip(r)
        .map(|((&g, &u), &r)| g / (1.0 + (-g).exp()) * u * r as f64)
        .sum()
}

#[test]
fn swiglu_matches_the_decomposed_ops_and_its_gradients() {
    let mut values = Values(7);
    for (n, k) in [(7, 64), (33, 128), (1, 3)] {
        let (g, u, r) = (values.take(n * k), values.take(n * k), values.take(n * k));
        let inputs = [(&g[..], [n, k]), (&u[..], [n, k])];
        let fused = gradients(inputs, &r, |[g, u]| norm::swiglu(g, u));
        let decomposed = gradients(inputs, &r, |[g, u]| silu(g) * u);
        let shape = format!("[{n}, {k}]");
        assert_eq!(fused.0, decomposed.0, "{shape}: forward");
        assert_close(
            &fused.1[0],
            &decomposed.1[0],
            1e-5,
            &format!("{shape}: d gate"),
        );
        assert_close(
            &fused.1[1],
            &decomposed.1[1],
            1e-5,
            &format!("{shape}: d up"),
        );

        let (g64, u64): (Vec<f64>, Vec<f64>) = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| (g as f64, u as f64))
            .unzip();
        let fd_g = finite_differences(&g, |g| swiglu_loss(g, &u64, &r));
        let fd_u = finite_differences(&u, |u| swiglu_loss(&g64, u, &r));
        assert_matches_differences(
            &fused.1[0],
            &fd_g,
            &format!("{shape}: d gate by differences"),
        );
        assert_matches_differences(&fused.1[1], &fd_u, &format!("{shape}: d up by differences"));
    }
}
