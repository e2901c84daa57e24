//! The device-resident step against the host step, on the CPU backend: same loss, gradient norm
//! and weights after a few steps, in f32; and a bf16 compute pass that stays close.

use burn::backend::Autodiff;
use burn::tensor::FloatDType;
use dapt_proto::job::{JobSpec, Preset};

use super::*;
use crate::model::LlamaConfig;
use crate::Cpu;

type Ad = Autodiff<Cpu>;

fn training() -> TrainingSpec {
    let spec = JobSpec::parse(
        "job: t\nseed: 1\nmodel:\n  preset: tiny\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: 16\n  global_batch: 4\n  micro_batch: 2\n  tokens: 640\n  optimizer:\n    lr: 0.01\n    grad_clip: 0.5\n",
    )
    .expect("job");
    spec.training.expect("training")
}

fn batches(step: u64, vocab: u32) -> Vec<MicroBatch> {
    let mut state = 0x1234_5678u64 ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    (0..2)
        .map(|_| MicroBatch {
            ids: (0..2 * 17).map(|_| next()).collect(),
            samples: 2,
        })
        .collect()
}

fn host_and_resident(compute: FloatDType) -> (Trainer, ResidentTrainer<Ad>) {
    let training = training();
    let config = LlamaConfig::preset(Preset::Tiny, 256);
    let weights = ParamLayout::llama(&config).init(0.02, 7);
    let host = Trainer::new(config, weights, &training);
    let resident = ResidentTrainer::<Ad>::from_host(host.clone(), compute, &Default::default());
    (host, resident)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-12) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn resident_steps_match_the_host_trainer() {
    let (mut host, mut resident) = host_and_resident(FloatDType::F32);
    let tokens = 64u64;
    for step in 0..3 {
        let micro = batches(step, 256);
        let (host_loss, mut g) = host.gradients(&micro, tokens as f64);
        let host_stats = host.apply(&mut g, tokens);
        let (loss, stats) =
            train_step(&mut resident, None, &micro, tokens as f64, tokens).expect("step");
        assert!(
            (loss - host_loss).abs() < 1e-5 * host_loss.abs(),
            "{loss} vs {host_loss}"
        );
        assert!(
            (stats.grad_norm - host_stats.grad_norm).abs() < 1e-4 * host_stats.grad_norm,
            "{} vs {}",
            stats.grad_norm,
            host_stats.grad_norm
        );
        assert_eq!(stats.lr, host_stats.lr);
    }
    let back = resident.to_host();
    assert_eq!(back.step, 3);
    assert_eq!(back.optimizer.t, 3);
    let diff = max_rel_diff(&host.weights, &back.weights);
    assert!(diff < 1e-5, "weights differ by {diff}");
    assert!(max_rel_diff(&host.optimizer.v, &back.optimizer.v) < 1e-4);
}

#[test]
fn host_staged_reducer_runs_between_the_halves() {
    struct Halve;
    impl Collective for Halve {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            1
        }
        fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
            buf.iter_mut().for_each(|g| *g *= 0.5);
            Ok(())
        }
    }
    let (_, mut plain) = host_and_resident(FloatDType::F32);
    let (_, mut halved) = host_and_resident(FloatDType::F32);
    let micro = batches(0, 256);
    let (_, a) = train_step(&mut plain, None, &micro, 64.0, 64).expect("step");
    let mut reducer = HostStaged(Halve);
    let (_, b) = train_step(&mut halved, Some(&mut reducer), &micro, 64.0, 64).expect("step");
    assert!((b.grad_norm - 0.5 * a.grad_norm).abs() < 1e-5 * a.grad_norm);
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let (_, mut f32_run) = host_and_resident(FloatDType::F32);
    let (_, mut bf16_run) = host_and_resident(FloatDType::BF16);
    for step in 0..2 {
        let micro = batches(step, 256);
        let (a, sa) = train_step(&mut f32_run, None, &micro, 64.0, 64).expect("f32 step");
        let (b, sb) = train_step(&mut bf16_run, None, &micro, 64.0, 64).expect("bf16 step");
        assert!(b.is_finite() && sb.grad_norm.is_finite());
        assert!((a - b).abs() < 2e-2 * a.abs(), "loss {a} vs {b}");
        assert!(
            (sa.grad_norm - sb.grad_norm).abs() < 5e-2 * sa.grad_norm,
            "norm {} vs {}",
            sa.grad_norm,
            sb.grad_norm
        );
    }
    let (a, b) = (f32_run.to_host(), bf16_run.to_host());
    // Master weights stay f32 either way; two AdamW steps of lr 0.01 from N(0, 0.02).
    assert!(max_rel_diff(&a.weights, &b.weights) < 0.1);
}

/// Two ranks over the real TCP ring, each with half of every step's micro-batches: bitwise the
/// same weights on both, and the weights of one rank that trains on all of them.
#[test]
fn two_ranks_over_the_ring_match_one() {
    use crate::collective::TcpRing;
    use crate::train::engine::{Engine, ResidentEngine};
    use std::time::Duration;

    let steps = 2u64;
    let tokens = 64u64; // 4 samples of 16 per step
    let run = |world: usize| -> Vec<Vec<f32>> {
        let rings = TcpRing::loopback(world, Duration::from_secs(20)).expect("rings");
        std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    scope.spawn(move || {
                        let (_, trainer) = host_and_resident(FloatDType::F32);
                        let mut engine = ResidentEngine::<Ad> {
                            trainer,
                            reducer: Some(Box::new(HostStaged(ring))),
                        };
                        for step in 0..steps {
                            let micro = batches(step, 256);
                            let share = micro.len() / world;
                            let mine = &micro[rank * share..(rank + 1) * share];
                            engine
                                .train_step(mine, (tokens / world as u64) as f64, tokens)
                                .expect("step");
                        }
                        engine.trainer.to_host().weights
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        })
    };
    let two = run(2);
    let one = run(1);
    assert_eq!(two[0], two[1], "ranks diverged");
    let diff = max_rel_diff(&one[0], &two[0]);
    assert!(diff < 1e-5, "two ranks differ from one by {diff}");
}
