//! ZeRO stages 1 and 2 against stage 0 on the CPU: ranks as threads joined by the real TCP ring,
//! at 1 to 4 ranks (3 does not divide the flat buffer: an uneven split). Every step's loss and
//! gradient norm, the final weights and the optimizer state agree with stage 0's; each rank holds
//! 1/world of the optimizer bytes. And the sharded checkpoint: written by each rank, read back at
//! another world size element for element, refused by name when a shard is corrupt or missing.

use std::path::Path;
use std::time::Duration;

use dapt_corpus::{prepare, rank_slice, CorpusReader, PrepareOptions};
use dapt_proto::job::JobSpec;
use dapt_worker::checkpoint::{self, shards, OptimizerFiles};
use dapt_worker::collective::{shard_range, Collective, TcpRing};
use dapt_worker::train::engine::{Engine, HostEngine};
use dapt_worker::train::run::initial_model;
use dapt_worker::train::{MicroBatch, Trainer};

mod support;
use support::max_abs_diff;

const STEPS: u64 = 4;

fn job(dir: &Path, stage: u8) -> JobSpec {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/corpus");
    let output = dir.join("corpus");
    let spec = JobSpec::parse(&format!(
        "job: zero\nseed: 3\nmodel:\n  preset: tiny\ncorpus:\n  output: {}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{}/postgres/*.html\"]\n      weight: 1\ntraining:\n  seq_len: 32\n  global_batch: 7\n  micro_batch: 2\n  tokens: {}\n  zero_stage: {stage}\n  optimizer:\n    lr: 0.003\n    grad_clip: 0.5\n",
        output.display(),
        corpus.display(),
        STEPS * 7 * 32
    ))
    .expect("job");
    if !output.join("manifest.json").exists() {
        prepare(&spec.corpus, None, &PrepareOptions::default()).expect("prepare");
    }
    spec
}

/// What a rank ends with: per step (mean loss, grad norm), and its trainer.
type RankResult = (Vec<(f64, f64)>, Trainer);

fn train(spec: &JobSpec, world: usize) -> Vec<RankResult> {
    let rings = TcpRing::loopback(world, Duration::from_secs(20)).expect("rings");
    std::thread::scope(|scope| {
        let handles: Vec<_> = rings
            .into_iter()
            .map(|ring| scope.spawn(move || rank_loop(spec, ring)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn rank_loop(spec: &JobSpec, ring: TcpRing) -> RankResult {
    let training = spec.training.expect("training");
    let reader = CorpusReader::open(&spec.corpus.output).expect("corpus");
    let order = reader
        .sample_order(spec.seed, training.seq_len)
        .expect("order");
    let (config, weights) = initial_model(spec, &reader).expect("model");
    let mut trainer = Trainer::new(config, weights, &training);
    let (rank, world) = (ring.rank(), ring.world());
    if training.zero_stage > 0 {
        trainer.shard(rank, world);
    }
    let ring = std::rc::Rc::new(std::cell::RefCell::new(ring));
    let mut engine = HostEngine {
        trainer,
        reducer: Some(Box::new(ring.clone())),
    };
    let step_tokens = training.tokens_per_step();
    let mut log = Vec::new();
    for step in 0..STEPS {
        let slice = rank_slice(step, training.global_batch, rank as u32, world as u32);
        let micro = MicroBatch::split(&reader, &order, slice, 2, training.seq_len).expect("batch");
        let (loss, stats) = engine
            .train_step(&micro, step_tokens as f64 / world as f64, step_tokens)
            .expect("step");
        let mut loss_buf = [loss as f32];
        ring.borrow_mut()
            .all_reduce_mean(&mut loss_buf)
            .expect("loss");
        log.push((f64::from(loss_buf[0]), stats.grad_norm));
    }
    (log, engine.trainer)
}

#[test]
fn stages_1_and_2_match_stage_0_at_1_to_4_ranks() {
    let dir = tempfile::tempdir().expect("tmp");
    let base = train(&job(dir.path(), 0), 1);
    let (base_log, base_trainer) = &base[0];
    let total = base_trainer.layout.total;
    let whole_bytes = base_trainer.optimizer.bytes();
    for world in 1..=4 {
        let stage0 = train(&job(dir.path(), 0), world);
        for stage in [1u8, 2] {
            let ranks = train(&job(dir.path(), stage), world);
            let mut m = Vec::new();
            let mut v = Vec::new();
            for (rank, ((log, trainer), (log0, trainer0))) in ranks.iter().zip(&stage0).enumerate()
            {
                for (step, ((loss, norm), (loss0, norm0))) in log.iter().zip(log0).enumerate() {
                    assert!(
                        (loss - loss0).abs() < 1e-5 && (norm - norm0).abs() < 1e-5,
                        "stage {stage}, world {world}, rank {rank}, step {step}: loss {loss} vs {loss0}, grad norm {norm} vs {norm0}"
                    );
                }
                let d = max_abs_diff(&trainer.weights, &trainer0.weights);
                assert!(
                    d < 1e-6,
                    "stage {stage}, world {world}, rank {rank}: weights differ by {d}"
                );
                assert_eq!(trainer.optimizer.range, shard_range(total, world, rank));
                let bytes = trainer.optimizer.bytes();
                assert!(
                    bytes <= whole_bytes / world + 12,
                    "stage {stage}, world {world}: rank {rank} holds {bytes} optimizer bytes of {whole_bytes}"
                );
                eprintln!("stage {stage} world {world} rank {rank}: {bytes} optimizer bytes (whole: {whole_bytes})");
                m.extend_from_slice(&trainer.optimizer.m);
                v.extend_from_slice(&trainer.optimizer.v);
            }
            let (_, trainer0) = &stage0[0];
            assert!(
                max_abs_diff(&m, &trainer0.optimizer.m) < 1e-6,
                "stage {stage}, world {world}: m"
            );
            assert!(
                max_abs_diff(&v, &trainer0.optimizer.v) < 1e-6,
                "stage {stage}, world {world}: v"
            );
        }
        // Stage 0 itself at `world` ranks against one rank: the same samples per step.
        let d = max_abs_diff(&stage0[0].1.weights, &base_trainer.weights);
        assert!(
            d < 1e-5,
            "world {world}: stage 0 weights differ from one rank's by {d}"
        );
        for ((l, n), (l1, n1)) in stage0[0].0.iter().zip(base_log) {
            assert!(
                (l - l1).abs() < 1e-4 && (n - n1).abs() < 1e-4,
                "world {world}: stage 0 loss {l} / norm {n} vs one rank's {l1} / {n1}"
            );
        }
    }
}

/// Writes a ZeRO checkpoint of `ranks` (one trainer per rank of a split) as the agent does:
/// every rank its shard into the staging folder, then rank 0 the checkpoint.
fn save_sharded(root: &Path, ranks: &[Trainer]) -> std::path::PathBuf {
    let world = ranks.len();
    let staging = shards::staging_dir(root, 1, ranks[0].step);
    for (rank, t) in ranks.iter().enumerate() {
        shards::write(&staging, &t.optimizer, rank, world).expect("shard");
    }
    checkpoint::save_with(
        root,
        &ranks[0],
        3,
        None,
        OptimizerFiles::Shards {
            staging: &staging,
            world,
        },
    )
    .expect("save")
}

#[test]
fn a_sharded_checkpoint_reshards_exactly_and_refuses_a_bad_shard_by_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let spec = job(dir.path(), 2);
    let training = spec.training.expect("training");
    let reader = CorpusReader::open(&spec.corpus.output).expect("corpus");
    let (config, weights) = initial_model(&spec, &reader).expect("model");
    let mut whole = Trainer::new(config, weights, &training);
    let n = whole.layout.total;
    // Moments that differ everywhere, so a misplaced element shows.
    for (i, (m, v)) in whole
        .optimizer
        .m
        .iter_mut()
        .zip(&mut whole.optimizer.v)
        .enumerate()
    {
        *m = i as f32 * 1e-3 - 7.0;
        *v = (i % 1013) as f32 + 0.5;
    }
    whole.optimizer.t = 5;
    whole.step = 5;
    let ranks: Vec<Trainer> = (0..3)
        .map(|r| {
            let mut t = whole.clone();
            t.shard(r, 3);
            t
        })
        .collect();
    let root = dir.path().join("ck");
    let ck = save_sharded(&root, &ranks);
    let names = dapt_proto::checkpoint::CheckpointManifest::read(&ck).expect("manifest");
    for r in 0..3 {
        let name = shards::file_name(r, 3);
        assert!(
            names.files.iter().any(|f| f.path == name),
            "manifest lists {name}"
        );
    }
    assert!(
        !shards::staging_dir(&root, 1, 5).exists(),
        "staging folder cleared"
    );
    for world in 1..=4 {
        for rank in 0..world {
            let loaded = checkpoint::load_part(&ck, Some((rank, world))).expect("load");
            let range = shard_range(n, world, rank);
            assert_eq!(loaded.range, range);
            assert_eq!(
                loaded.m,
                whole.optimizer.m[range.clone()],
                "m at {rank} of {world}"
            );
            assert_eq!(loaded.v, whole.optimizer.v[range], "v at {rank} of {world}");
            assert_eq!(loaded.state.optimizer_steps, 5);
        }
    }
    // A whole (stage 0) checkpoint reshards the same way.
    let ck0 = checkpoint::save(&dir.path().join("ck0"), &whole, 3, None).expect("save whole");
    let loaded = checkpoint::load_part(&ck0, Some((2, 3))).expect("load");
    assert_eq!(loaded.m, whole.optimizer.m[shard_range(n, 3, 2)]);

    // One flipped byte in a shard: refused by name before use.
    let shard1 = ck.join(shards::file_name(1, 3));
    let mut bytes = std::fs::read(&shard1).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&shard1, &bytes).expect("write");
    let err = checkpoint::load_part(&ck, Some((0, 2)))
        .map(|_| ())
        .expect_err("corrupt")
        .to_string();
    assert!(
        err.contains(&shards::file_name(1, 3)) && err.contains("corrupt"),
        "{err}"
    );
    // Missing: refused by name too.
    std::fs::remove_file(&shard1).expect("rm");
    let err = checkpoint::load_part(&ck, Some((0, 2)))
        .map(|_| ())
        .expect_err("missing")
        .to_string();
    assert!(err.contains(&shards::file_name(1, 3)), "{err}");
    // And a rank that never wrote its shard fails the checkpoint, naming it.
    let staging = shards::staging_dir(&root, 2, 5);
    shards::write(&staging, &ranks[0].optimizer, 0, 3).expect("shard 0");
    shards::write(&staging, &ranks[2].optimizer, 2, 3).expect("shard 2");
    let err = checkpoint::save_with(
        &dir.path().join("ck2"),
        &ranks[0],
        3,
        None,
        OptimizerFiles::Shards {
            staging: &staging,
            world: 3,
        },
    )
    .expect_err("a shard short")
    .to_string();
    assert!(err.contains(&shards::file_name(1, 3)), "{err}");
}
