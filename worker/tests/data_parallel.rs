//! The data-parallel step on the CPU: ranks as threads joined by the real TCP ring all-reduce.
//! Whatever the world size, a step trains on the same samples, and every rank ends each step with
//! bitwise the same weights.

use std::path::Path;
use std::time::Duration;

use dapt_corpus::{prepare, rank_slice, CorpusReader, PrepareOptions};
use dapt_proto::job::JobSpec;
use dapt_worker::collective::{Collective, TcpRing};
use dapt_worker::train::run::initial_model;
use dapt_worker::train::{MicroBatch, Trainer};

const STEPS: u64 = 6;

fn job(dir: &Path) -> JobSpec {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/corpus");
    let spec = JobSpec::parse(&format!(
        "job: dp\nseed: 3\nmodel:\n  preset: tiny\ncorpus:\n  output: {}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{}/postgres/*.html\"]\n      weight: 1\ntraining:\n  seq_len: 32\n  global_batch: 7\n  micro_batch: 2\n  tokens: {}\n  optimizer:\n    lr: 0.003\n",
        dir.join("corpus").display(),
        corpus.display(),
        STEPS * 7 * 32
    ))
    .expect("job");
    prepare(&spec.corpus, None, &PrepareOptions::default()).expect("prepare");
    spec
}

/// What a rank ends with: per-step mean loss, the first step's reduced gradients, the weights.
type RankResult = (Vec<f64>, Vec<f32>, Vec<f32>);

/// Trains `STEPS` steps with `world` ranks.
fn train(spec: &JobSpec, world: usize) -> Vec<RankResult> {
    let rings = TcpRing::loopback(world, Duration::from_secs(20)).expect("rings");
    std::thread::scope(|scope| {
        let handles: Vec<_> = rings
            .into_iter()
            .map(|mut ring| scope.spawn(move || rank_loop(spec, &mut ring)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn rank_loop(spec: &JobSpec, ring: &mut TcpRing) -> RankResult {
    let training = spec.training.expect("training");
    let reader = CorpusReader::open(&spec.corpus.output).expect("corpus");
    let order = reader
        .sample_order(spec.seed, training.seq_len)
        .expect("order");
    let (config, weights) = initial_model(spec, &reader).expect("model");
    let mut trainer = Trainer::new(config, weights, &training);
    let (rank, world) = (ring.rank() as u32, ring.world() as u32);
    let step_tokens = training.tokens_per_step();
    let mut losses = Vec::new();
    let mut first_grads = Vec::new();
    for step in 0..STEPS {
        let slice = rank_slice(step, training.global_batch, rank, world);
        let micro = MicroBatch::split(
            &reader,
            &order,
            slice,
            training.micro_batch(),
            training.seq_len,
        )
        .expect("read the batch");
        let (loss, mut grads) = trainer.gradients(&micro, step_tokens as f64 / world as f64);
        ring.all_reduce_mean(&mut grads)
            .expect("all-reduce gradients");
        let mut loss_buf = [loss as f32];
        ring.all_reduce_mean(&mut loss_buf)
            .expect("all-reduce loss");
        if step == 0 {
            first_grads = grads.clone();
        }
        trainer
            .apply(&mut grads, loss, step_tokens)
            .expect("finite step");
        losses.push(loss_buf[0] as f64);
    }
    (losses, first_grads, trainer.weights)
}

#[test]
fn one_and_two_ranks_train_the_same_steps_and_ranks_agree_bitwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path());
    let one = train(&spec, 1);
    let two = train(&spec, 2);
    // 7 samples per step split 4 + 3: uneven slices still give the step's mean gradient.
    assert!(two[0].2 == two[1].2, "ranks' weights differ after training");
    assert!(two[0].1 == two[1].1, "ranks' reduced gradients differ");
    assert_eq!(two[0].0, two[1].0, "ranks saw different losses");
    for (step, (a, b)) in one[0].0.iter().zip(&two[0].0).enumerate() {
        println!("step {step}: 1 rank {a:.6}, 2 ranks {b:.6}");
        assert!(
            (a - b).abs() < 1e-4 * a.abs(),
            "step {step}: loss {a} with 1 rank, {b} with 2"
        );
    }
    // The first step's gradient is the same with one rank or two, up to summation order.
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut one[0].1.iter().zip(&two[0].1).map(|(a, b)| (a - b) as f64));
    let scale = norm(&mut one[0].1.iter().map(|&a| a as f64));
    println!(
        "relative gradient difference at step 0, 1 vs 2 ranks: {:.3e}",
        diff / scale
    );
    assert!(diff / scale < 1e-5, "gradients differ by {}", diff / scale);
}

#[test]
fn accumulating_micro_batches_gives_the_whole_batch_gradient() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path());
    let training = spec.training.expect("training");
    let reader = CorpusReader::open(&spec.corpus.output).expect("corpus");
    let order = reader
        .sample_order(spec.seed, training.seq_len)
        .expect("order");
    let (config, weights) = initial_model(&spec, &reader).expect("model");
    let trainer = Trainer::new(config, weights, &training);
    let batches = |size: u64| {
        MicroBatch::split(&reader, &order, 0..7, size, training.seq_len).expect("read the batch")
    };
    let tokens = training.tokens_per_step() as f64;
    let (whole_loss, whole) = trainer.gradients(&batches(7), tokens);
    let (split_loss, split) = trainer.gradients(&batches(2), tokens);
    assert!(
        (whole_loss - split_loss).abs() < 1e-6 * whole_loss,
        "{whole_loss} vs {split_loss}"
    );
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut whole.iter().zip(&split).map(|(a, b)| (a - b) as f64));
    let scale = norm(&mut whole.iter().map(|&a| a as f64));
    assert!(
        diff / scale < 1e-5,
        "micro-batch accumulation is off by {}",
        diff / scale
    );
}
