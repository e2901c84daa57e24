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
