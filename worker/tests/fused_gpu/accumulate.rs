//! The gradient-accumulation kernel (`fused::accumulate`) against the CPU's Burn-ops body: a
//! gradient in f32 or f16 added at an offset into an f32 buffer, in place when the buffer is
//! uniquely owned, into a copy when it is shared (the other owner's values stay).

use burn::tensor::{Distribution, FloatDType, Tensor};
use dapt_worker::fused::accumulate::accumulate;
use dapt_worker::Cpu;

use super::{max_abs_diff, to_gpu};

fn random(n: usize) -> Tensor<Cpu, 1> {
    Tensor::random([n], Distribution::Normal(0.0, 1.0), &Default::default())
}

#[test]
fn the_kernel_adds_a_gradient_into_its_range() {
    let (len, start, n) = (1000, 137, 601);
    let acc = random(len);
    for dtype in [FloatDType::F32, FloatDType::F16] {
        // The gradient's values as the GPU holds them (f16-rounded), for the CPU's sum.
        let grad = to_gpu(&random(n)).cast(dtype);
        let grad_cpu = Tensor::<Cpu, 1>::from_data(
            grad.clone().cast(FloatDType::F32).to_data(),
            &Default::default(),
        );
        let expected = accumulate(acc.clone(), start, grad_cpu);
        // Uniquely owned: in place.
        let got = accumulate(to_gpu(&acc), start, grad.clone());
        let d = max_abs_diff(got, expected.clone());
        assert!(d < 1e-6, "{dtype:?}: differs by {d}");
        // Shared: the other owner's values are untouched.
        let shared = to_gpu(&acc);
        let got = accumulate(shared.clone(), start, grad);
        assert!(
            max_abs_diff(got, expected) < 1e-6,
            "{dtype:?}: shared buffer"
        );
        assert_eq!(
            max_abs_diff(shared, acc.clone()),
            0.0,
            "{dtype:?}: the shared copy changed"
        );
    }
}

/// The sum-of-squares kernel's f64 total against the host's f64 sum of the same values (as
/// the GPU holds them) and against the CPU backend's Burn-ops body: one element, a part, a
/// cube's worth and a few cubes with a ragged end, in f32 and f16.
#[test]
fn the_kernel_sums_squares_in_f64() {
    use dapt_worker::fused::accumulate::sum_of_squares;
    use dapt_worker::fused::kernels::accumulate::SQUARES_PER_CUBE;
    for n in [1, 1000, SQUARES_PER_CUBE, 3 * SQUARES_PER_CUBE + 17] {
        for dtype in [FloatDType::F32, FloatDType::F16] {
            let x = to_gpu(&random(n)).cast(dtype);
            let values = x
                .clone()
                .cast(FloatDType::F32)
                .into_data()
                .into_vec::<f32>()
                .expect("f32");
            let want: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let got = sum_of_squares(x);
            let rel = (got - want).abs() / want;
            assert!(rel < 1e-12, "n={n} {dtype:?}: {got} against {want}");
            let cpu = sum_of_squares(Tensor::<Cpu, 1>::from_data(
                values.as_slice(),
                &Default::default(),
            ));
            assert!((cpu - want).abs() / want < 1e-12, "CPU body, n={n}");
        }
    }
}
