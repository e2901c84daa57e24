//! The fused cross-entropy on the GPU backend against the CPU reference: the per-chunk kernels
//! (online log-sum-exp with the target logit; softmax minus one-hot), the whole op, and its
//! backward pass through `Autodiff<Gpu>`. f32; small shapes (lavapipe is a CPU emulation).

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData, TensorPrimitive};
use dapt_worker::fused::loss::{cross_entropy_sum, reference_cross_entropy_sum, LossOps};
use dapt_worker::Cpu;

use super::{max_abs_diff, to_gpu, Gpu};

/// `n` ids in `0..vocab` spread over it (the first and last id among them).
fn targets<B: Backend>(n: usize, vocab: usize) -> Tensor<B, 1, Int> {
    let ids: Vec<i64> = (0..n)
        .map(|i| match i {
            0 => vocab as i64 - 1,
            _ => ((i * 7919 + 13) % vocab) as i64,
        })
        .collect();
    Tensor::from_data(TensorData::new(ids, [n]), &Default::default())
}

fn normal(shape: [usize; 2], std: f64) -> Tensor<Cpu, 2> {
    Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
}

fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `(lse, target_logit)` after two chunks, `[rows, a]` at 0 and `[rows, b]` at `a`, through a
/// backend's per-chunk step.
fn two_chunks<B: LossOps>(
    first: Tensor<B, 2>,
    second: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let a = first.dims()[1];
    let stats = B::cross_entropy_chunk_stats(
        first.into_primitive().tensor(),
        targets.clone().into_primitive(),
        0,
        None,
    );
    let stats = B::cross_entropy_chunk_stats(
        second.into_primitive().tensor(),
        targets.into_primitive(),
        a,
        Some(stats),
    );
    (float(stats.lse), float(stats.target_logit))
}

/// The forward kernel over two chunks (one of fewer columns than a cube has units, one of
/// more), and the backward kernel on the second, equal the reference bodies on the CPU.
#[test]
fn chunk_kernels_match_the_cpu() {
    for (rows, a, b) in [(70, 3, 300), (5, 513, 17)] {
        let vocab = a + b;
        let (first, second) = (normal([rows, a], 3.0), normal([rows, b], 3.0));
        let t = targets::<Cpu>(rows, vocab);
        let t_gpu = Tensor::<Gpu, 1, Int>::from_data(t.to_data(), &Default::default());
        let (lse, picked) = two_chunks::<Cpu>(first.clone(), second.clone(), t.clone());
        let (lse_gpu, picked_gpu) =
            two_chunks::<Gpu>(to_gpu(&first), to_gpu(&second), t_gpu.clone());
        let lse_diff = max_abs_diff(lse_gpu.clone(), lse.clone());
        let picked_diff = max_abs_diff(picked_gpu, picked.clone());
        assert!(
            lse_diff < 1e-4,
            "[{rows}, {a} + {b}]: lse differs by {lse_diff}"
        );
        assert!(
            picked_diff < 1e-5,
            "[{rows}, {a} + {b}]: target logits differ by {picked_diff}"
        );
        assert!(
            picked.abs().sum().into_scalar() > 0.0,
            "no target was picked"
        );

        let grad = Tensor::<Cpu, 1>::from_floats([0.7], &Default::default());
        let g = Cpu::cross_entropy_chunk_grad(
            second.clone().into_primitive().tensor(),
            t.into_primitive(),
            a,
            lse.into_primitive().tensor(),
            grad.clone().into_primitive().tensor(),
        );
        let g_gpu = Gpu::cross_entropy_chunk_grad(
            to_gpu(&second).into_primitive().tensor(),
            t_gpu.into_primitive(),
            a,
            lse_gpu.into_primitive().tensor(),
            to_gpu(&grad).into_primitive().tensor(),
        );
        let diff = max_abs_diff(float::<Gpu, 2>(g_gpu), float::<Cpu, 2>(g));
        assert!(diff < 1e-5, "[{rows}, {b}]: gradient differs by {diff}");
    }
}

/// The whole op on the GPU (several chunks, the last one shorter), with its backward pass
/// through `Autodiff<Gpu>`, equals the decomposed reference on the CPU: loss, dx and dw.
#[test]
fn fused_loss_and_gradients_match_the_cpu_reference() {
    type Ad = Autodiff<Gpu>;
    type CpuAd = Autodiff<Cpu>;
    let (n, d, vocab, chunk) = (37, 24, 301, 64);
    let x = normal([n, d], 1.0);
    let w = normal([vocab, d], 0.3);

    // Forward only (the evaluator's path).
    let loss = cross_entropy_sum(
        to_gpu(&x),
        to_gpu(&w),
        targets::<Gpu>(n, vocab),
        Some(chunk),
    );
    let reference = reference_cross_entropy_sum(x.clone(), w.clone(), targets::<Cpu>(n, vocab));
    let scale = reference.clone().into_scalar();
    let diff = max_abs_diff(loss, reference);
    // The chunks' matmuls: TF32 on CUDA (seen 1.2e-5 of the sum on an H200).
    let tolerance = (super::MATMUL_RTOL / 50.0).max(1e-5);
    assert!(
        diff / scale < tolerance,
        "loss differs by {diff} of {scale}"
    );

    // Backward.
    let xg = Tensor::<Ad, 2>::from_data(x.to_data(), &Default::default()).require_grad();
    let wg = Tensor::<Ad, 2>::from_data(w.to_data(), &Default::default()).require_grad();
    let grads = cross_entropy_sum(xg.clone(), wg.clone(), targets::<Ad>(n, vocab), Some(chunk))
        .mul_scalar(0.5)
        .backward();
    let xc = Tensor::<CpuAd, 2>::from_data(x.to_data(), &Default::default()).require_grad();
    let wc = Tensor::<CpuAd, 2>::from_data(w.to_data(), &Default::default()).require_grad();
    let ref_grads = reference_cross_entropy_sum(xc.clone(), wc.clone(), targets::<CpuAd>(n, vocab))
        .mul_scalar(0.5)
        .backward();
    let (dx, dx_ref) = (
        xg.grad(&grads).expect("dx"),
        xc.grad(&ref_grads).expect("dx"),
    );
    let (dw, dw_ref) = (
        wg.grad(&grads).expect("dw"),
        wc.grad(&ref_grads).expect("dw"),
    );
    let (sx, sw) = (
        dx_ref.clone().abs().max().into_scalar(),
        dw_ref.clone().abs().max().into_scalar(),
    );
    let (ex, ew) = (max_abs_diff(dx, dx_ref) / sx, max_abs_diff(dw, dw_ref) / sw);
    assert!(sx > 0.0 && sw > 0.0, "zero reference gradients");
    // The chunks' matmuls: TF32 on CUDA (MATMUL_RTOL).
    let tolerance = super::MATMUL_RTOL.max(1e-4);
    assert!(ex < tolerance, "dx differs by {ex} of its scale");
    assert!(ew < tolerance, "dw differs by {ew} of its scale");
}

/// bf16 inputs (mixed precision's compute dtype; CUDA only: lavapipe has no bf16) run the
/// kernels' bf16 variants: an f32 loss and bf16 gradients through `Autodiff<Gpu>`, close to the
/// f32 CPU reference on the same bf16-rounded inputs.
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
#[test]
fn bf16_loss_and_gradients_match_the_cpu_reference() {
    use burn::tensor::{DType, FloatDType};
    type Ad = Autodiff<Gpu>;
    type CpuAd = Autodiff<Cpu>;
    let (n, d, vocab, chunk) = (64, 128, 1000, 256);
    let bf16_rounded = |t: Tensor<Cpu, 2>| t.cast(FloatDType::BF16).cast(FloatDType::F32);
    let x = bf16_rounded(normal([n, d], 1.0));
    let w = bf16_rounded(normal([vocab, d], 0.1));
    let leaf = |t: &Tensor<Cpu, 2>| {
        Tensor::<Ad, 2>::from_data(t.to_data(), &Default::default())
            .cast(FloatDType::BF16)
            .require_grad()
    };
    let (xg, wg) = (leaf(&x), leaf(&w));
    let loss = cross_entropy_sum(xg.clone(), wg.clone(), targets::<Ad>(n, vocab), Some(chunk));
    assert_eq!(loss.dtype(), DType::F32);
    let value = loss.clone().into_scalar();
    let grads = loss.backward();
    let (dx, dw) = (xg.grad(&grads).expect("dx"), wg.grad(&grads).expect("dw"));
    assert_eq!((dx.dtype(), dw.dtype()), (DType::BF16, DType::BF16));

    let xc = Tensor::<CpuAd, 2>::from_data(x.to_data(), &Default::default()).require_grad();
    let wc = Tensor::<CpuAd, 2>::from_data(w.to_data(), &Default::default()).require_grad();
    let reference = reference_cross_entropy_sum(xc.clone(), wc.clone(), targets::<CpuAd>(n, vocab));
    let ref_value = reference.clone().into_scalar();
    let ref_grads = reference.backward();
    let (dx_ref, dw_ref) = (
        xc.grad(&ref_grads).expect("dx"),
        wc.grad(&ref_grads).expect("dw"),
    );
    let rel = (value - ref_value).abs() / ref_value.abs();
    assert!(rel < 1e-3, "loss {value} vs {ref_value}");
    let (sx, sw) = (
        dx_ref.clone().abs().max().into_scalar(),
        dw_ref.clone().abs().max().into_scalar(),
    );
    let (ex, ew) = (max_abs_diff(dx, dx_ref) / sx, max_abs_diff(dw, dw_ref) / sw);
    assert!(
        ex < 3e-2 && ew < 3e-2,
        "bf16 gradients differ: dx {ex}, dw {ew} of their scale"
    );
}
