//! Training the tiny model on real text: loss falls, resume is bitwise exact, checkpoints
//! refuse damage, and the export is a Hugging Face model the NumPy reference agrees with.

use std::path::{Path, PathBuf};

use dapt_corpus::{prepare, CorpusReader, PrepareOptions};
use dapt_proto::job::JobSpec;
use dapt_worker::checkpoint;
use dapt_worker::import::hf::{self, ExportDtype};
use dapt_worker::train::eval::perplexity;
use dapt_worker::train::run::{initial_model, run, RunOptions};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A job over the quickstart corpus, small enough for a debug-build test.
fn job(dir: &Path, checkpoints: &str, tokens: u64) -> JobSpec {
    let corpus = repo_root().join("examples/quickstart/corpus");
    let yaml = format!(
        "job: t\nseed: 5\nmodel:\n  preset: tiny\ncorpus:\n  output: {out}\n  vocab_size: 512\n  sources:\n    - name: postgres\n      role: domain\n      paths: [\"{c}/postgres/*.html\"]\n      weight: 3\n      held_out: 0.2\n    - name: sotu\n      role: replay\n      paths: [\"{c}/sotu/*.txt\"]\n      weight: 1\n      held_out: 0.2\ntraining:\n  seq_len: 32\n  global_batch: 8\n  micro_batch: 3\n  tokens: {tokens}\n  optimizer:\n    lr: 0.003\n  schedule:\n    warmup: 0.1\ncheckpoint:\n  dir: {ck}\n  every: 4\n  keep: 2\n",
        out = dir.join("corpus").display(),
        c = corpus.display(),
        ck = dir.join(checkpoints).display(),
    );
    let spec = JobSpec::parse(&yaml).expect("job");
    if !dir.join("corpus/manifest.json").exists() {
        prepare(&spec.corpus, None, &PrepareOptions::default()).expect("prepare");
    }
    spec
}

#[test]
fn training_lowers_held_out_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path(), "ck", 40 * 8 * 32);
    let reader = CorpusReader::open(&spec.corpus.output).expect("corpus");
    let (config, initial) = initial_model(&spec, &reader).expect("model");
    let before = perplexity(&config, &initial, reader.held_out(0), 32, 4096, 8).expect("held out");
    let summary = run(&spec, &RunOptions::default()).expect("run");
    assert!(summary.finished);
    let last =
        checkpoint::load(summary.last_checkpoint.as_deref().expect("checkpoint")).expect("load");
    let after =
        perplexity(&config, &last.weights, reader.held_out(0), 32, 4096, 8).expect("held out");
    println!(
        "domain held-out perplexity {:.1} -> {:.1}; loss {:.3} -> {:.3}",
        before.perplexity(),
        after.perplexity(),
        summary.steps[0].loss,
        summary.steps.last().expect("steps").loss
    );
    assert!(
        after.mean_nll() < before.mean_nll() - 0.5,
        "held-out loss did not fall enough"
    );
    assert!(last.weights.iter().all(|w| w.is_finite()));
}

#[test]
fn resuming_from_a_checkpoint_is_bitwise_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = 8 * 8 * 32; // 8 steps
    let straight = job(dir.path(), "straight", tokens);
    let summary = run(&straight, &RunOptions::default()).expect("straight run");
    assert_eq!(summary.steps.len(), 8);

    let split = job(dir.path(), "split", tokens);
    let first = run(
        &split,
        &RunOptions {
            stop_after: Some(4),
            ..RunOptions::default()
        },
    )
    .expect("first half");
    assert!(!first.finished && first.steps.len() == 4);
    let second = run(&split, &RunOptions::default()).expect("second half");
    assert_eq!(second.resumed_from, Some(4));
    assert_eq!(second.steps.len(), 4);
    for (a, b) in summary.steps[4..].iter().zip(&second.steps) {
        assert_eq!(
            a.loss.to_bits(),
            b.loss.to_bits(),
            "loss at step {} differs",
            a.step
        );
    }
    let a =
        std::fs::read(checkpoint::step_dir(&dir.path().join("straight"), 8).join(hf::WEIGHTS_FILE))
            .expect("a");
    let b =
        std::fs::read(checkpoint::step_dir(&dir.path().join("split"), 8).join(hf::WEIGHTS_FILE))
            .expect("b");
    assert!(a == b, "weights after resume are not bitwise equal");
    let a = checkpoint::load(&checkpoint::step_dir(&dir.path().join("straight"), 8)).expect("a");
    let b = checkpoint::load(&checkpoint::step_dir(&dir.path().join("split"), 8)).expect("b");
    assert!(a.m == b.m && a.v == b.v, "optimizer moments differ");
    // keep: 2 pruned the older checkpoints.
    let kept: Vec<u64> = checkpoint::list(&dir.path().join("split"))
        .expect("list")
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![4, 8]);
}

#[test]
fn damaged_checkpoints_are_refused_by_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path(), "ck", 4 * 8 * 32);
    let summary = run(&spec, &RunOptions::default()).expect("run");
    let ck = summary.last_checkpoint.expect("checkpoint");
    let weights = ck.join(hf::WEIGHTS_FILE);
    let original = std::fs::read(&weights).expect("read");
    let mut flipped = original.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&weights, &flipped).expect("write");
    let err = checkpoint::load(&ck)
        .err()
        .expect("flipped byte refused")
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );
    std::fs::write(&weights, &original[..original.len() - 10]).expect("write");
    let err = checkpoint::load(&ck)
        .err()
        .expect("truncation refused")
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&weights, &original).expect("write");
    checkpoint::load(&ck).expect("restored checkpoint loads");
}

#[test]
fn export_round_trips_in_every_dtype() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path(), "ck", 2 * 8 * 32);
    let summary = run(&spec, &RunOptions::default()).expect("run");
    let loaded = checkpoint::load(summary.last_checkpoint.as_deref().expect("ck")).expect("load");
    let layout = dapt_worker::model::ParamLayout::llama(&loaded.config);
    for (dtype, tolerance) in [
        (ExportDtype::F32, 0.0f32),
        (ExportDtype::Bf16, 1.0 / 128.0),
        (ExportDtype::F16, 1.0 / 1024.0),
    ] {
        let out = dir.path().join(format!("export-{dtype:?}"));
        hf::write_dir(&out, &loaded.config, &layout, &loaded.weights, dtype).expect("export");
        let back = hf::load_dir(&out).expect("reload");
        assert_eq!(back.config, loaded.config);
        let worst = back
            .weights
            .iter()
            .zip(&loaded.weights)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, f32::max);
        assert!(worst <= tolerance, "{dtype:?}: relative error {worst}");
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dapt_worker::model::LlamaConfig::preset(dapt_proto::job::Preset::Tiny, 64);
    let layout = dapt_worker::model::ParamLayout::llama(&cfg);
    let weights = layout.init(0.02, 1);
    hf::write_dir(dir.path(), &cfg, &layout, &weights, ExportDtype::F32).expect("write");
    // Drop one tensor, then give one a wrong shape.
    let keep: Vec<(&str, &[usize], &[f32])> = layout
        .params
        .iter()
        .filter(|p| p.name != "model.layers.1.mlp.up_proj.weight")
        .map(|p| (p.name.as_str(), p.shape.as_slice(), &weights[p.range()]))
        .collect();
    hf::write_safetensors(
        &dir.path().join(hf::WEIGHTS_FILE),
        &keep,
        ExportDtype::F32,
        None,
    )
    .expect("write");
    let err = hf::load_dir(dir.path()).err().expect("missing").to_string();
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );

    let wrong_shape = [128usize, 2];
    let mut bad: Vec<(&str, &[usize], &[f32])> = keep.clone();
    let norm = layout.get("model.norm.weight").expect("norm");
    let i = bad
        .iter()
        .position(|t| t.0 == "model.norm.weight")
        .expect("norm present");
    bad[i] = (
        "model.norm.weight",
        &wrong_shape[..1],
        &weights[norm.offset..norm.offset + 128],
    );
    let up = layout.get("model.layers.1.mlp.up_proj.weight").expect("up");
    bad.push((
        "model.layers.1.mlp.up_proj.weight",
        &wrong_shape,
        &weights[up.offset..up.offset + 256],
    ));
    hf::write_safetensors(
        &dir.path().join(hf::WEIGHTS_FILE),
        &bad,
        ExportDtype::F32,
        None,
    )
    .expect("write");
    let err = hf::load_dir(dir.path())
        .err()
        .expect("misshaped")
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("shape [128, 2]"),
        "{err}"
    );
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dapt_worker::model::LlamaConfig::preset(dapt_proto::job::Preset::Tiny, 64);
    let layout = dapt_worker::model::ParamLayout::llama(&cfg);
    let weights = layout.init(0.02, 3);
    hf::write_dir(dir.path(), &cfg, &layout, &weights, ExportDtype::Bf16).expect("write");
    std::fs::remove_file(dir.path().join(hf::WEIGHTS_FILE)).expect("rm");
    // Two shards in bf16 and an index, as `save_pretrained` writes them.
    let (first, second) = layout.params.split_at(layout.params.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, params) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let tensors: Vec<(&str, &[usize], &[f32])> = params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.as_slice(), &weights[p.range()]))
            .collect();
        hf::write_safetensors(&dir.path().join(file), &tensors, ExportDtype::Bf16, None)
            .expect("shard");
        for p in params {
            map.insert(p.name.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.path().join(hf::INDEX_FILE), index.to_string()).expect("index");
    let back = hf::load_dir(dir.path()).expect("sharded load");
    for (a, b) in back.weights.iter().zip(&weights) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = job(dir.path(), "ck", 8 * 32);
    let reader = CorpusReader::open(&spec.corpus.output).expect("corpus");
    let (config, weights) = initial_model(&spec, &reader).expect("model");
    let order = reader.sample_order(spec.seed, 32).expect("order");
    let micro = [
        dapt_worker::train::MicroBatch::read(&reader, &order, 0..4, 32).expect("read the batch"),
    ];
    let mut training = spec.training.take().expect("training");
    let plain = dapt_worker::train::Trainer::new(config.clone(), weights.clone(), &training);
    training.activation_checkpointing = true;
    let recompute = dapt_worker::train::Trainer::new(config, weights, &training);
    let (loss_a, grads_a) = plain.gradients(&micro, 128.0);
    let (loss_b, grads_b) = recompute.gradients(&micro, 128.0);
    assert!((loss_a - loss_b).abs() < 1e-6, "{loss_a} vs {loss_b}");
    let worst = grads_a
        .iter()
        .zip(&grads_b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = grads_a.iter().fold(0f32, |m, g| m.max(g.abs()));
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "gradients differ by {worst} (max {scale})"
    );
}
