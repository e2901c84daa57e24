//! The AdamW kernel (`fused::adamw`) against the CPU's Burn-ops body: three steps over runs
//! of decayed and undecayed elements, inside a weight buffer at an offset (a ZeRO shard's
//! place in the whole buffer), with clipping; the elements outside the runs stay as they were,
//! and a shared buffer is copied, never written under its other owner.

use burn::tensor::{Distribution, Tensor};
use dapt_worker::fused::adamw::{adamw, AdamwStep};
use dapt_worker::Cpu;

use super::{max_abs_diff, to_gpu, Gpu};

fn random(n: usize, scale: f32) -> Tensor<Cpu, 1> {
    Tensor::random([n], Distribution::Normal(0.0, 1.0), &Default::default()).mul_scalar(scale)
}

#[test]
fn the_kernel_is_the_reference_update() {
    let (lead, n) = (37, 1000);
    let runs = [
        (0..113, false),
        (113..700, true),
        (700..701, false),
        (701..n, true),
    ];
    let w0 = random(lead + n + 5, 0.5);
    let (mut w_cpu, mut m_cpu, mut v_cpu) = (
        w0.clone(),
        Tensor::<Cpu, 1>::zeros([n], &Default::default()),
        Tensor::<Cpu, 1>::zeros([n], &Default::default()),
    );
    let shared = to_gpu(&w0);
    let (mut w_gpu, mut m_gpu, mut v_gpu): (Tensor<Gpu, 1>, _, _) =
        (shared.clone(), to_gpu(&m_cpu), to_gpu(&v_cpu));
    for t in 1..=3 {
        let g = random(n, 3.0);
        let g_gpu = to_gpu(&g);
        let step = AdamwStep {
            grad_scale: 0.4,
            b1: 0.9,
            one_minus_b1: (1.0 - 0.9f64) as f32,
            b2: 0.95,
            one_minus_b2: (1.0 - 0.95f64) as f32,
            step_size: (1e-2 / (1.0 - 0.9f64.powi(t))) as f32,
            inv_bc2_sqrt: (1.0 / (1.0 - 0.95f64.powi(t)).sqrt()) as f32,
            eps: 1e-8,
            decay: 0.0,
        };
        for (range, decays) in &runs {
            let step = AdamwStep {
                decay: if *decays { 1e-3 } else { 0.0 },
                ..step
            };
            (w_cpu, m_cpu, v_cpu) = adamw(w_cpu, lead, m_cpu, v_cpu, &g, range.clone(), step);
            (w_gpu, m_gpu, v_gpu) = adamw(w_gpu, lead, m_gpu, v_gpu, &g_gpu, range.clone(), step);
        }
        for (name, d) in [
            ("weights", max_abs_diff(w_gpu.clone(), w_cpu.clone())),
            ("m", max_abs_diff(m_gpu.clone(), m_cpu.clone())),
            ("v", max_abs_diff(v_gpu.clone(), v_cpu.clone())),
        ] {
            assert!(d < 1e-6, "step {t}: {name} differs by {d}");
        }
    }
    // Outside the runs (the lead and the tail) the weights are as they were.
    let moved = (w_cpu.clone() - w0.clone()).abs();
    let untouched = moved.clone().slice(0..lead).max().into_scalar()
        + moved
            .clone()
            .slice(lead + n..lead + n + 5)
            .max()
            .into_scalar();
    assert_eq!(untouched, 0.0, "weights outside the update moved");
    assert!(
        moved.slice(lead..lead + n).min().into_scalar() > 0.0,
        "every element moved"
    );
    assert_eq!(
        max_abs_diff(shared, w0),
        0.0,
        "the shared buffer was written"
    );
}
