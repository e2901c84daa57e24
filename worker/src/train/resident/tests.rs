//! The device-resident step against the host step, on the CPU backend: same loss, gradient norm
//! and weights after a few steps, in f32; and a bf16 compute pass that stays close.

use burn::backend::Autodiff;
use burn::tensor::FloatDType;
use dapt_proto::job::{JobSpec, Preset};

use super::*;
use crate::collective::{Collective, CollectiveError};
use crate::model::{LlamaConfig, ParamKind};
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
        let host_stats = host.apply(&mut g, host_loss, tokens).expect("finite step");
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

/// The tiny preset's training section with `extra` lines appended to it.
fn training_with(extra: &str) -> TrainingSpec {
    let mut training = training();
    let spec = JobSpec::parse(&format!(
        "job: t\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: 16\n  global_batch: 4\n  tokens: 640\n{extra}"
    ))
    .expect("job");
    let t = spec.training.expect("training");
    training.nonfinite = t.nonfinite;
    training.max_skipped_steps = t.max_skipped_steps;
    training
}

/// A step whose gradients hold a NaN is never applied, on the host and on the resident engine:
/// under `stop` it fails naming the step; under `skip` the weights and moments stay, the step
/// counts as done, and one skip more than `max_skipped_steps` fails.
#[test]
fn non_finite_steps_are_never_applied() {
    let micro = batches(0, 256);
    for policy in ["", "  nonfinite: skip\n  max_skipped_steps: 1\n"] {
        let training = training_with(policy);
        let (mut host, _) = host_and_resident(FloatDType::F32);
        host.training = training;
        let resident_from = host.clone();
        let before = host.weights.clone();
        let (loss, mut g) = host.gradients(&micro, 64.0);
        g[3] = f32::NAN;
        let mut resident =
            ResidentTrainer::<Ad>::from_host(resident_from, FloatDType::F32, &Default::default());
        let n = g.len();
        let device_grads =
            |g: &[f32]| Tensor::from_data(TensorData::new(g.to_vec(), [n]), &Default::default());
        let host_result = host.apply(&mut g.clone(), loss, 64);
        let resident_result = resident.apply(device_grads(&g), loss, 64);
        if policy.is_empty() {
            for result in [host_result.map(|_| ()), resident_result.map(|_| ())] {
                let err = result
                    .expect_err("a NaN gradient stops the job")
                    .to_string();
                assert!(err.starts_with("step 0: the gradient norm is NaN"), "{err}");
            }
            assert_eq!(host.weights, before);
            continue;
        }
        for stats in [
            host_result.expect("skipped"),
            resident_result.expect("skipped"),
        ] {
            assert!(!stats.applied && stats.grad_norm.is_nan());
        }
        let back = resident.to_host();
        for t in [&host, &back] {
            assert_eq!((t.step, t.skipped_steps, t.optimizer.t), (1, 1, 0));
            assert_eq!(t.weights, before);
            assert!(t.optimizer.m.iter().all(|&m| m == 0.0));
        }
        // A NaN loss alone is enough, and the second skip is one too many.
        let err = host
            .apply(&mut vec![0.0; n], f64::NAN, 64)
            .expect_err("bound");
        assert!(err.to_string().contains("step 1: the loss is NaN"), "{err}");
        let err = resident
            .apply(device_grads(&vec![0.0; n]), f64::NAN, 64)
            .expect_err("bound");
        assert!(
            err.to_string().contains("training.max_skipped_steps is 1"),
            "{err}"
        );
    }
}

/// A rank whose own loss is NaN marks its gradients, so that after the all-reduce every rank
/// sees a non-finite norm and stops (or skips) the same step as the others.
#[test]
fn a_non_finite_loss_on_one_rank_reaches_every_rank() {
    use crate::collective::TcpRing;
    use crate::train::optimizer::global_norm;
    use crate::train::step::poison;
    use std::time::Duration;

    let rings = TcpRing::loopback(2, Duration::from_secs(20)).expect("rings");
    let norms: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(rank, mut ring)| {
                scope.spawn(move || {
                    let mut grads = vec![0.25f32; 1000];
                    let loss = if rank == 1 { f64::NAN } else { 2.0 };
                    poison(loss, &mut grads);
                    ring.all_reduce_mean(&mut grads).expect("all-reduce");
                    global_norm(&grads)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    assert!(norms.iter().all(|n| n.is_nan()), "{norms:?}");
}

/// A resident trainer over `config` with `training.activation_checkpointing` = `recompute`.
fn resident_with(
    config: &LlamaConfig,
    recompute: bool,
    compute: FloatDType,
) -> ResidentTrainer<Ad> {
    let mut training = training();
    training.activation_checkpointing = recompute;
    let weights = ParamLayout::llama(config).init(0.02, 7);
    let host = Trainer::new(config.clone(), weights, &training);
    ResidentTrainer::<Ad>::from_host(host, compute, &Default::default())
}

/// Layer-wise recompute (each block rebuilt from its kept input in the backward pass) gives the
/// full graph's losses, gradient norms and weights, with tied and untied output heads; in bf16
/// it stays as close as bf16 allows.
#[test]
fn recompute_matches_the_full_graph() {
    for tied in [true, false] {
        let mut config = LlamaConfig::preset(Preset::Tiny, 256);
        config.tie_word_embeddings = tied;
        let mut full = resident_with(&config, false, FloatDType::F32);
        let mut recomputed = resident_with(&config, true, FloatDType::F32);
        for step in 0..3 {
            let micro = batches(step, 256);
            let (a, sa) = train_step(&mut full, None, &micro, 64.0, 64).expect("full");
            let (b, sb) = train_step(&mut recomputed, None, &micro, 64.0, 64).expect("recompute");
            assert!(
                (a - b).abs() <= 1e-6 * a.abs(),
                "tied {tied}: loss {a} vs {b}"
            );
            assert!(
                (sa.grad_norm - sb.grad_norm).abs() <= 1e-5 * sa.grad_norm,
                "tied {tied}: norm {} vs {}",
                sa.grad_norm,
                sb.grad_norm
            );
        }
        let (x, y) = (full.to_host(), recomputed.to_host());
        // A tied embedding's two gradients are summed in another order, and AdamW's
        // normalised update carries that last-bit difference into small-gradient weights.
        let diff = max_rel_diff(&x.weights, &y.weights);
        assert!(diff < 5e-5, "tied {tied}: weights differ by {diff}");
    }
    let config = LlamaConfig::preset(Preset::Tiny, 256);
    let mut full = resident_with(&config, false, FloatDType::BF16);
    let mut recomputed = resident_with(&config, true, FloatDType::BF16);
    let micro = batches(0, 256);
    let (a, sa) = train_step(&mut full, None, &micro, 64.0, 64).expect("full");
    let (b, sb) = train_step(&mut recomputed, None, &micro, 64.0, 64).expect("recompute");
    assert!((a - b).abs() < 1e-3 * a.abs(), "bf16 loss {a} vs {b}");
    assert!((sa.grad_norm - sb.grad_norm).abs() < 2e-2 * sa.grad_norm);
}

/// Weight decay reaches exactly the parameters `optimizer.rs` decays, as merged ranges.
#[test]
fn decay_ranges_cover_the_decayed_parameters() {
    let config = LlamaConfig::preset(Preset::Tiny, 256);
    let layout = ParamLayout::llama(&config);
    for decay_embeddings in [false, true] {
        let mut spec = training().optimizer;
        spec.decay_embeddings = decay_embeddings;
        let ranges = decay_ranges(&layout, &spec, &(0..layout.total));
        // Two runs per layer (q..o, gate..down), plus the embedding when it decays.
        assert_eq!(
            ranges.len(),
            2 * config.num_hidden_layers + usize::from(decay_embeddings),
            "{ranges:?}"
        );
        for p in &layout.params {
            let decays =
                p.kind == ParamKind::Matrix || (p.kind == ParamKind::Embedding && decay_embeddings);
            let covered = ranges
                .iter()
                .any(|r| r.start <= p.offset && p.range().end <= r.end);
            assert_eq!(covered, decays, "{}", p.name);
        }
    }
}
