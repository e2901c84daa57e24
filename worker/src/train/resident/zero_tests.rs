//! ZeRO stages 1 and 2 in the resident engine against its stage 0, on the CPU backend: ranks
//! as threads joined by the real TCP ring (its all-reduce, for stage 1 and stage 2's gradient
//! buckets, and its all-gather half through [`HostStaged`]), at 2 and 3 ranks (the tiny model's flat buffer does not divide by 3: an
//! uneven split). Every step's loss and gradient norm, the final weights and the optimizer state
//! agree with stage 0's; each rank holds 1/world of the moments. And the sharded checkpoint a
//! resident rank writes resumes at another world size with the committed state, element for
//! element.

use std::time::Duration;

use burn::backend::Autodiff;
use burn::tensor::FloatDType;
use dapt_proto::job::{JobSpec, Preset};

use super::*;
use crate::checkpoint::{self, shards, OptimizerFiles};
use crate::collective::{shard_range, Collective, CollectiveError, TcpRing};
use crate::model::LlamaConfig;
use crate::train::run::restore_part;
use crate::Cpu;

type Ad = Autodiff<Cpu>;

const SEED: u64 = 5;
/// Samples per step, one per micro-batch: 3 + 3 over 2 ranks, 2 + 2 + 2 over 3.
const SAMPLES: usize = 6;
const SEQ: usize = 16;
const STEP_TOKENS: u64 = (SAMPLES * SEQ) as u64;
/// A vocabulary that makes the flat buffer's length indivisible by 3.
const VOCAB: usize = 257;

fn training(stage: u8) -> TrainingSpec {
    training_with(stage, "")
}

/// [`training`] with `extra` lines in its `training:` section.
///
/// AdamW's `eps` is 1e-5, not the default 1e-8: its first steps move each weight by about
/// `lr * g / (|g| + eps)`, so with 1e-8 a gradient element that is near zero after the sum over
/// ranks and micro-batches (where rounding is all there is) moves by up to `lr` on a rounding
/// difference. Stage 2 sums in another order than stage 0 (each micro-batch's mean over the
/// ranks, then over the micro-batches; bucket by bucket), which moved weights by 1.1e-6 to 3.9e-3
/// (bf16) with 1e-8; with 1e-5 the weights agree within 1e-6 and any real error stays visible.
fn training_with(stage: u8, extra: &str) -> TrainingSpec {
    let spec = JobSpec::parse(&format!(
        "job: t\nseed: {SEED}\nmodel:\n  preset: tiny\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: {SEQ}\n  global_batch: {SAMPLES}\n  micro_batch: 1\n  tokens: {}\n  zero_stage: {stage}\n{extra}  optimizer:\n    lr: 0.01\n    grad_clip: 0.5\n    eps: 1.0e-5\n",
        STEP_TOKENS * 10
    ))
    .expect("job");
    spec.training.expect("training")
}

/// Step `step`'s micro-batches (one sample each) that `rank` of `world` trains on.
fn rank_batches(step: u64, rank: usize, world: usize) -> Vec<MicroBatch> {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 256) as u32
    };
    (0..SAMPLES)
        .map(|_| MicroBatch {
            ids: (0..SEQ + 1).map(|_| next()).collect(),
            samples: 1,
        })
        .enumerate()
        .filter(|(i, _)| i % world == rank)
        .map(|(_, mb)| mb)
        .collect()
}

/// A fresh host trainer at `stage`, holding rank `rank`'s shard of `world` when `stage` > 0.
fn host(stage: u8, rank: usize, world: usize) -> Trainer {
    let config = LlamaConfig::preset(Preset::Tiny, VOCAB);
    let weights = ParamLayout::llama(&config).init(0.02, 7);
    let mut host = Trainer::new(config, weights, &training(stage));
    if stage > 0 {
        host.shard(rank, world);
    }
    host
}

/// What a rank ends with: per step (its loss share, grad norm), its state on the host, and the
/// bytes of optimizer state its device held.
type RankResult = (Vec<(f64, f64)>, Trainer, usize);

/// Trains `steps` steps from step `first` on `world` ranks (threads over the real ring), each
/// starting from `start(rank)`, in f32.
fn train(
    world: usize,
    first: u64,
    steps: u64,
    start: &(dyn Fn(usize) -> Trainer + Sync),
) -> Vec<RankResult> {
    train_in(FloatDType::F32, world, first, steps, start)
}

/// [`train`] with the passes in `compute`.
fn train_in(
    compute: FloatDType,
    world: usize,
    first: u64,
    steps: u64,
    start: &(dyn Fn(usize) -> Trainer + Sync),
) -> Vec<RankResult> {
    train_bucketed(compute, world, first, steps, start, None)
}

/// [`train_in`] with stage 2's gradient buckets at most `bucket` elements (default:
/// [`BUCKET_ELEMENTS`], which holds the tiny model whole).
fn train_bucketed(
    compute: FloatDType,
    world: usize,
    first: u64,
    steps: u64,
    start: &(dyn Fn(usize) -> Trainer + Sync),
    bucket: Option<usize>,
) -> Vec<RankResult> {
    let rings = TcpRing::loopback(world, Duration::from_secs(20)).expect("rings");
    std::thread::scope(|scope| {
        let handles: Vec<_> = rings
            .into_iter()
            .map(|ring| {
                scope.spawn(move || {
                    let rank = ring.rank();
                    let mut trainer =
                        ResidentTrainer::<Ad>::from_host(start(rank), compute, &Default::default());
                    // Under ZeRO in bf16 the f32 master weights are sharded too.
                    let sharded_master = trainer.is_shard() && compute != FloatDType::F32;
                    assert_eq!(
                        trainer.master.as_ref().map(|m| m.dims()[0]),
                        sharded_master.then(|| trainer.owned.len())
                    );
                    let whole = 4 * trainer.layout.total;
                    let master = trainer.master_bytes();
                    assert!(
                        if sharded_master {
                            master <= whole / world + 4
                        } else {
                            master == whole
                        },
                        "rank {rank}: {master} bytes of f32 master weights"
                    );
                    if let Some(elements) = bucket {
                        trainer.set_bucket_elements(elements);
                    }
                    // Stage 2 holds the gradients of its slice only; 0 and 1 the whole buffer.
                    let grads = match trainer.training.zero_stage {
                        2.. => trainer.owned.len(),
                        _ => trainer.layout.total,
                    };
                    assert_eq!(trainer.gradient_bytes(), 4 * grads, "rank {rank}");
                    let mut reducer = HostStaged(ring);
                    let mut log = Vec::new();
                    for step in first..first + steps {
                        let micro = rank_batches(step, rank, world);
                        let (loss, stats) = train_step(
                            &mut trainer,
                            Some(&mut reducer),
                            &micro,
                            STEP_TOKENS as f64 / world as f64,
                            STEP_TOKENS,
                        )
                        .expect("step");
                        assert!(stats.applied);
                        log.push((loss, stats.grad_norm));
                    }
                    let host = trainer
                        .to_host_gathered(Some(&mut reducer))
                        .expect("gather");
                    (log, host, trainer.optimizer_bytes())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Every step's loss and gradient norm within 1e-5 of stage 0's, the final weights within 1e-6.
fn assert_same_steps(at: &str, log: &[(f64, f64)], log0: &[(f64, f64)], t: &Trainer, t0: &Trainer) {
    assert_eq!(log.len(), log0.len(), "{at}: steps");
    for (step, ((loss, norm), (loss0, norm0))) in log.iter().zip(log0).enumerate() {
        assert!(
            (loss - loss0).abs() < 1e-5 && (norm - norm0).abs() < 1e-5,
            "{at}, step {step}: loss {loss} vs {loss0}, grad norm {norm} vs {norm0}"
        );
    }
    let d = max_abs_diff(&t.weights, &t0.weights);
    assert!(d < 1e-6, "{at}: weights differ by {d}");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn zero_stages_1_and_2_match_stage_0_at_2_and_3_ranks() {
    let steps = 3;
    let whole = host(0, 0, 1);
    let total = whole.layout.total;
    let whole_bytes = 8 * total;
    assert!(
        !total.is_multiple_of(3),
        "the 3-rank split of {total} is meant to be uneven"
    );
    for world in [2, 3] {
        let stage0 = train(world, 0, steps, &|rank| host(0, rank, world));
        for stage in [1u8, 2] {
            let ranks = train(world, 0, steps, &|rank| host(stage, rank, world));
            let (mut m, mut v) = (Vec::new(), Vec::new());
            for (rank, ((log, t, bytes), (log0, t0, bytes0))) in
                ranks.iter().zip(&stage0).enumerate()
            {
                let at = format!("stage {stage}, world {world}, rank {rank}");
                assert_same_steps(&at, log, log0, t, t0);
                assert_eq!(t.optimizer.range, shard_range(total, world, rank), "{at}");
                assert_eq!(t.optimizer.t, steps, "{at}");
                assert_eq!(*bytes0, whole_bytes, "{at}: stage 0 holds all of it");
                assert!(
                    *bytes <= whole_bytes / world + 8,
                    "{at}: {bytes} optimizer bytes on the device of {whole_bytes}"
                );
                m.extend_from_slice(&t.optimizer.m);
                v.extend_from_slice(&t.optimizer.v);
            }
            let t0 = &stage0[0].1;
            let (dm, dv) = (
                max_abs_diff(&m, &t0.optimizer.m),
                max_abs_diff(&v, &t0.optimizer.v),
            );
            assert!(
                dm < 1e-6 && dv < 1e-6,
                "stage {stage}, world {world}: moments differ by {dm} / {dv}"
            );
        }
    }
}

/// Stage 2 reduces its gradients bucket by bucket during the backward passes: with buckets
/// far smaller than the model (97 elements: every parameter cut into pieces, pieces that
/// straddle two ranks' slices, a last piece shorter than the rest; 20,000: a norm gain and the
/// matrix after it in one bucket, the MLP's matrices in three pieces), with the blocks'
/// gradients arriving top-down under recompute, over an uneven 3-rank split, and over 4 ranks
/// with 2, 2, 1 and 1 micro-batches (the last two make an idle pass to keep the reductions in
/// step), every step and the final state are stage 0's.
#[test]
fn zero_stage_2_in_small_buckets_matches_stage_0_with_and_without_recompute() {
    let steps = 3;
    for (world, recompute, bucket) in [(3, false, 97), (3, true, 20_000), (4, false, 20_000)] {
        let extra = if recompute {
            "  activation_checkpointing: true\n"
        } else {
            ""
        };
        let start = |stage: u8| {
            move |rank: usize| {
                let mut t = host(stage, rank, world);
                t.training = training_with(stage, extra);
                t
            }
        };
        let stage0 = train(world, 0, steps, &start(0));
        let ranks = train_bucketed(FloatDType::F32, world, 0, steps, &start(2), Some(bucket));
        let mut m = Vec::new();
        for (rank, ((log, t, _), (log0, t0, _))) in ranks.iter().zip(&stage0).enumerate() {
            let at = format!("world {world}, recompute {recompute}, rank {rank}");
            assert_same_steps(&at, log, log0, t, t0);
            m.extend_from_slice(&t.optimizer.m);
        }
        let dm = max_abs_diff(&m, &stage0[0].1.optimizer.m);
        assert!(
            dm < 1e-6,
            "world {world}, recompute {recompute}: first moments differ by {dm}"
        );
    }
}

/// A shard whose split is not the collective's, or a shard without a ZeRO collective, is
/// refused before it is stepped: its AdamW would update the wrong slice.
#[test]
fn a_shard_that_is_not_the_collectives_is_refused() {
    struct One;
    impl Collective for One {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            1
        }
        fn all_reduce_mean(&mut self, _: &mut [f32]) -> Result<(), CollectiveError> {
            Ok(())
        }
    }
    let micro = rank_batches(0, 0, 1);
    let mut shard =
        ResidentTrainer::<Ad>::from_host(host(2, 1, 2), FloatDType::F32, &Default::default());
    let err = train_step(&mut shard, Some(&mut HostStaged(One)), &micro, 96.0, 96)
        .map(|_| ())
        .expect_err("rank 0 of 1 owns everything")
        .to_string();
    assert!(err.contains("rank 0 of 1 owns"), "{err}");
    let err = train_step(&mut shard, None, &micro, 96.0, 96)
        .map(|_| ())
        .expect_err("no collective")
        .to_string();
    assert!(err.contains("no ZeRO collective"), "{err}");
    assert_eq!(shard.step, 0, "nothing was applied");
}

/// Resident ranks at stage 2 and 3 ranks write a sharded checkpoint as the agent does (each rank
/// its shard, rank 0 the rest); 2 resident ranks resume from it with exactly the committed
/// moments of their new slices, and their next step matches the 3 ranks' next step.
#[test]
fn a_resident_checkpoint_at_three_ranks_resumes_at_two_with_the_same_state() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("ck");
    let three = train(3, 0, 2, &|rank| host(2, rank, 3));
    let staging = shards::staging_dir(&root, 1, 2);
    for (rank, (_, t, _)) in three.iter().enumerate() {
        shards::write(&staging, &t.optimizer, rank, 3).expect("shard");
    }
    let ck = checkpoint::save_with(
        &root,
        &three[0].1,
        SEED,
        None,
        OptimizerFiles::Shards {
            staging: &staging,
            world: 3,
        },
    )
    .expect("save");
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (_, t, _) in &three {
        m.extend_from_slice(&t.optimizer.m);
        v.extend_from_slice(&t.optimizer.v);
    }
    let training = training(2);
    let resume = |rank: usize| {
        restore_part(&ck, &training, SEED, Some((rank, 2))).expect("restore a shard at w=2")
    };
    for rank in 0..2 {
        // Through the device and back: what the resident rank holds.
        let back =
            ResidentTrainer::<Ad>::from_host(resume(rank), FloatDType::F32, &Default::default())
                .to_host();
        let range = shard_range(m.len(), 2, rank);
        assert_eq!(back.optimizer.range, range);
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        assert!(
            same(&back.optimizer.m, &m[range.clone()]),
            "m of rank {rank}"
        );
        assert!(same(&back.optimizer.v, &v[range]), "v of rank {rank}");
        assert_eq!((back.step, back.optimizer.t), (2, 2));
        assert_eq!(back.weights, three[0].1.weights);
    }
    // The step after the checkpoint, at 2 ranks from it and at 3 ranks from where they were.
    let two = train(2, 2, 1, &resume);
    let on = train(3, 2, 1, &|rank| three[rank].1.clone());
    let d = max_abs_diff(&two[0].1.weights, &on[0].1.weights);
    assert!(d < 1e-6, "the resumed step differs by {d}");
    assert!((two[0].0[0].1 - on[0].0[0].1).abs() < 1e-5, "grad norm");
}

/// A shard's weight-decay ranges are the whole buffer's, cut at the shard's bounds.
#[test]
fn a_shards_decay_ranges_are_the_wholes_cut_at_its_bounds() {
    let t = host(0, 0, 1);
    let (layout, spec) = (&t.layout, &t.optimizer.spec);
    let mask = |ranges: &[Range<usize>], offset: usize, len: usize| {
        let mut m = vec![false; len];
        for r in ranges {
            m[r.start + offset..r.end + offset].fill(true);
        }
        m
    };
    let whole = mask(
        &decay_ranges(layout, spec, &(0..layout.total)),
        0,
        layout.total,
    );
    for world in [2, 3] {
        let mut joined = vec![false; layout.total];
        for rank in 0..world {
            let own = shard_range(layout.total, world, rank);
            let part = mask(&decay_ranges(layout, spec, &own), own.start, layout.total);
            joined.iter_mut().zip(part).for_each(|(j, p)| *j |= p);
            assert!(
                decay_ranges(layout, spec, &own)
                    .iter()
                    .all(|r| r.end <= own.len()),
                "offsets into the slice"
            );
        }
        assert_eq!(joined, whole, "world {world}");
    }
}

/// A non-finite loss on one rank at stage 2 reaches every rank through the norm's exchange (the
/// rank's partial sum of squares is NaN): under `nonfinite: skip` every rank passes over the step, and nothing is
/// applied or gathered (a rank that applied alone would leave the others' weights behind).
#[test]
fn a_non_finite_loss_on_one_rank_is_skipped_by_every_rank_at_stage_2() {
    let skip = training_with(2, "  nonfinite: skip\n  max_skipped_steps: 1\n");
    let start = |rank: usize| {
        let mut t = host(2, rank, 2);
        t.training = skip;
        if rank == 1 {
            // Rank 1's model makes a NaN loss; rank 0's is fine.
            t.weights[0] = f32::NAN;
        }
        t
    };
    let before = start(0).weights;
    let rings = TcpRing::loopback(2, Duration::from_secs(20)).expect("rings");
    let results: Vec<(StepStats, Trainer)> = std::thread::scope(|scope| {
        let handles: Vec<_> = rings
            .into_iter()
            .map(|ring| {
                scope.spawn(move || {
                    let rank = ring.rank();
                    let mut trainer = ResidentTrainer::<Ad>::from_host(
                        start(rank),
                        FloatDType::F32,
                        &Default::default(),
                    );
                    let micro = rank_batches(0, rank, 2);
                    let (_, stats) = train_step(
                        &mut trainer,
                        Some(&mut HostStaged(ring)),
                        &micro,
                        STEP_TOKENS as f64 / 2.0,
                        STEP_TOKENS,
                    )
                    .expect("a skipped step");
                    (stats, trainer.to_host())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    for (rank, (stats, t)) in results.iter().enumerate() {
        assert!(
            !stats.applied && stats.grad_norm.is_nan(),
            "rank {rank}: {stats:?}"
        );
        assert_eq!((t.step, t.skipped_steps, t.optimizer.t), (1, 1, 0));
        assert!(
            t.optimizer.m.iter().all(|&m| m == 0.0),
            "rank {rank}: moments"
        );
    }
    let w0 = &results[0].1.weights;
    assert!(
        w0.iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "rank 0's weights are as they were"
    );
}

/// In bf16 the f32 master weights are sharded as well (each rank keeps its slice, cast into the
/// bf16 compute copy piece by piece of a bucket's size, and the bf16 compute copy is
/// all-gathered): stages 1 and 2 give stage 0's steps and weights at 2 and 3 ranks, with
/// buckets of 1,000 elements (many pieces per slice), and a checkpoint's host copy gathers the
/// whole f32 master weights.
#[test]
fn in_bf16_the_sharded_master_weights_match_stage_0() {
    let steps = 2;
    for world in [2, 3] {
        let stage0 = train_in(FloatDType::BF16, world, 0, steps, &|rank| {
            host(0, rank, world)
        });
        for stage in [1u8, 2] {
            let ranks = train_bucketed(
                FloatDType::BF16,
                world,
                0,
                steps,
                &|rank| host(stage, rank, world),
                Some(1000),
            );
            for (rank, ((log, t, _), (log0, t0, _))) in ranks.iter().zip(&stage0).enumerate() {
                let at = format!("bf16, stage {stage}, world {world}, rank {rank}");
                for ((loss, norm), (loss0, norm0)) in log.iter().zip(log0) {
                    assert!(
                        (loss - loss0).abs() < 1e-5 && (norm - norm0).abs() < 1e-5,
                        "{at}: loss {loss} vs {loss0}, grad norm {norm} vs {norm0}"
                    );
                }
                let d = max_abs_diff(&t.weights, &t0.weights);
                assert!(d < 1e-6, "{at}: gathered master weights differ by {d}");
            }
        }
    }
}
