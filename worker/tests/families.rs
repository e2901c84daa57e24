//! Qwen2, Qwen3 and Mistral beside Llama, against the independent NumPy reference
//! (`tests/reference/llama_ref.py`, itself checked once against transformers: docs/model.md).
//!
//! Tiny random models of each family, written here (several seeds, GQA ratios and head dims;
//! non-trivial norm gains and biases): dapt's logits agree with the reference to 1e-4 of their
//! scale; Mistral's sliding window is honoured (and leaving it out would fail); dapt's gradient
//! agrees with the reference's autodiff-free finite difference; a few training steps give the
//! reference's loss at every step; the device-resident engine steps like the host; and the
//! exported directory reads back as the same model.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Autodiff;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use dapt_proto::job::{JobSpec, Preset};
use dapt_worker::import::hf::{self, ExportDtype};
use dapt_worker::model::{Family, Llama, LlamaConfig, ParamKind, ParamLayout};
use dapt_worker::train::resident::ResidentTrainer;
use dapt_worker::train::{MicroBatch, Trainer};
use dapt_worker::Cpu;

mod support;
use support::Rng;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One model of the parity tests.
#[derive(Debug, Clone, Copy)]
struct Case {
    family: Family,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tied: bool,
    window: Option<usize>,
    seed: u64,
}

impl Case {
    /// Hidden 64, 2 layers, MLP 96, vocab 128.
    fn config(&self) -> LlamaConfig {
        let mut c = LlamaConfig::preset(Preset::Tiny, 128);
        c.family = self.family;
        c.hidden_size = 64;
        c.intermediate_size = 96;
        c.num_attention_heads = self.heads;
        c.num_key_value_heads = self.kv_heads;
        c.head_dim = self.head_dim;
        c.tie_word_embeddings = self.tied;
        c.sliding_window = self.window;
        c.rms_norm_eps = 1e-6;
        if self.family != Family::Llama {
            c.rope_theta = 1_000_000.0; // Qwen's and recent Mistrals' large base
        }
        c
    }

    /// Random weights at 0.2 (so attention is far from uniform), norm gains 1 ± 0.2 (q/k norms
    /// too) and biases ± 0.2, so that every family difference shows in the logits.
    fn weights(&self, layout: &ParamLayout) -> Vec<f32> {
        let mut w = layout.init(0.2, self.seed);
        let mut rng = Rng(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for p in &layout.params {
            match p.kind {
                ParamKind::Norm => w[p.range()]
                    .iter_mut()
                    .for_each(|x| *x = 1.0 + 0.2 * rng.normal()),
                ParamKind::Bias => w[p.range()]
                    .iter_mut()
                    .for_each(|x| *x = 0.2 * rng.normal()),
                _ => {}
            }
        }
        w
    }
}

const CASES: &[Case] = &[
    case(Family::Qwen2, 4, 2, 16, false, None, 1),
    case(Family::Qwen2, 4, 1, 16, true, None, 2),
    case(Family::Qwen2, 2, 2, 32, false, None, 3),
    case(Family::Qwen3, 4, 2, 24, false, None, 4),
    case(Family::Qwen3, 8, 2, 8, true, None, 5),
    case(Family::Qwen3, 4, 4, 32, false, None, 6),
    case(Family::Mistral, 4, 2, 16, false, Some(8), 7),
    case(Family::Mistral, 4, 1, 16, true, Some(3), 8),
    case(Family::Mistral, 4, 2, 16, false, None, 9),
    case(Family::Llama, 4, 2, 16, false, None, 10),
];

const fn case(
    family: Family,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tied: bool,
    window: Option<usize>,
    seed: u64,
) -> Case {
    Case {
        family,
        heads,
        kv_heads,
        head_dim,
        tied,
        window,
        seed,
    }
}

fn ids(batch: usize, seq: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| (rng.uniform() * vocab as f64) as u32 % vocab as u32)
                .collect()
        })
        .collect()
}

fn id_tensor<B: burn::tensor::backend::Backend>(
    ids: &[Vec<u32>],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(flat, [b, t]), device)
}

fn dapt_logits(cfg: &LlamaConfig, weights: &[f32], ids: &[Vec<u32>]) -> Vec<f32> {
    let device = Default::default();
    let model = Llama::<Cpu>::from_flat(cfg, weights, &device, false);
    model
        .forward(id_tensor::<Cpu>(ids, &device))
        .into_data()
        .into_vec::<f32>()
        .expect("f32 logits")
}

/// Runs the reference on the HF directory `dir`; returns its logits (`--out`) and the JSON it
/// printed (`--loss`, with `directional_derivative` when `direction` is given).
fn reference(
    dir: &Path,
    ids: &[Vec<u32>],
    direction: Option<&Path>,
) -> (Vec<f32>, serde_json::Value) {
    let ids_path = dir.join("ids.json");
    std::fs::write(&ids_path, serde_json::to_vec(ids).expect("json")).expect("write ids");
    let out = dir.join("logits.npy");
    let python = std::env::var("DAPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.arg(repo_root().join("tests/reference/llama_ref.py"))
        .arg(dir)
        .arg("--ids")
        .arg(&ids_path)
        .arg("--out")
        .arg(&out)
        .arg("--loss");
    if let Some(d) = direction {
        // float64: a small step keeps the third-order error of the difference below 1e-6.
        cmd.arg("--direction").arg(d).args(["--eps", "1e-5"]);
    }
    let output = cmd
        .output()
        .expect("python3 runs (numpy and safetensors are installed by .ci/run)");
    assert!(
        output.status.success(),
        "the NumPy reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = serde_json::from_slice(&output.stdout).expect("the reference prints JSON");
    (read_npy_f32(&out), json)
}

/// A little-endian f32 `.npy` file's values.
fn read_npy_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an npy file");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// max |a - b| over max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

/// Writes `weights` as the HF directory `dir` (the export path) and checks it reads back.
fn export(dir: &Path, cfg: &LlamaConfig, layout: &ParamLayout, weights: &[f32]) {
    hf::write_dir(dir, cfg, layout, weights, ExportDtype::F32).expect("write");
    let back = hf::load_dir(dir).expect("load the export");
    assert_eq!(&back.config, cfg);
    assert_eq!(back.weights, weights);
}

#[test]
fn every_family_matches_the_numpy_reference() {
    for case in CASES {
        let cfg = case.config();
        let layout = ParamLayout::llama(&cfg);
        assert_eq!(layout.total as u64, cfg.num_params(), "{case:?}");
        let weights = case.weights(&layout);
        let dir = tempfile::tempdir().expect("tempdir");
        export(dir.path(), &cfg, &layout, &weights);
        // For the one-off check that transformers loads dapt's exports as their family
        // (`tests/reference/check_ref.py --exports DIR/*`).
        if let Some(keep) = std::env::var_os("DAPT_FAMILY_EXPORTS") {
            let name = format!("{}-{}", cfg.family.model_type(), case.seed);
            export(&Path::new(&keep).join(name), &cfg, &layout, &weights);
        }
        let ids = ids(2, 20, cfg.vocab_size, case.seed);
        let ours = dapt_logits(&cfg, &weights, &ids);
        let (theirs, _) = reference(dir.path(), &ids, None);
        let rel = rel_diff(&ours, &theirs);
        println!("{case:?}: logits within {rel:.2e} of the reference's scale");
        assert!(
            rel < 1e-4,
            "{case:?}: logits differ by {rel:.3e} (relative)"
        );
        if case.window.is_some() {
            // The window bites at 20 positions: full attention would not pass.
            let mut full = cfg.clone();
            full.sliding_window = None;
            let wrong = rel_diff(&dapt_logits(&full, &weights, &ids), &theirs);
            assert!(
                wrong > 1e-2,
                "{case:?}: the window made no difference ({wrong})"
            );
        }
    }
}

/// Leaving a family's difference out (the Qwen2 biases, the Qwen3 q/k norms) fails parity: the
/// test above would notice a model that ignored them.
#[test]
fn dropping_a_family_difference_fails_parity() {
    for case in [CASES[0], CASES[3]] {
        let cfg = case.config();
        let layout = ParamLayout::llama(&cfg);
        let weights = case.weights(&layout);
        let dir = tempfile::tempdir().expect("tempdir");
        hf::write_dir(dir.path(), &cfg, &layout, &weights, ExportDtype::F32).expect("write");
        let ids = ids(1, 16, cfg.vocab_size, 5);
        let (theirs, _) = reference(dir.path(), &ids, None);
        // The same model with its biases zero and its q/k gains one.
        let mut plain = weights.clone();
        for p in &layout.params {
            if p.kind == ParamKind::Bias {
                plain[p.range()].fill(0.0);
            } else if p.name.ends_with("q_norm.weight") || p.name.ends_with("k_norm.weight") {
                plain[p.range()].fill(1.0);
            }
        }
        let wrong = rel_diff(&dapt_logits(&cfg, &plain, &ids), &theirs);
        assert!(wrong > 1e-2, "{:?}: went unnoticed ({wrong})", case.family);
    }
}

type Ad = Autodiff<Cpu>;

/// The gradient of the mean next-token loss over `windows`, by Burn's autodiff.
fn gradient(cfg: &LlamaConfig, weights: &[f32], windows: &[Vec<u32>]) -> Vec<f32> {
    let device = Default::default();
    let model = Llama::<Ad>::from_flat(cfg, weights, &device, true);
    let tokens = windows.len() * (windows[0].len() - 1);
    let loss = model
        .nll_sum(id_tensor::<Ad>(windows, &device))
        .div_scalar(tokens as f64);
    let mut out = vec![0f32; weights.len()];
    model.add_gradients(&loss.backward(), &mut out);
    out
}

/// dapt's gradient along a random direction equals the reference's central finite difference
/// of the loss (float64, no autodiff): the backward pass through the biases, the q/k norms and
/// the windowed mask is right.
#[test]
fn gradients_match_the_reference_finite_difference() {
    for case in [CASES[9], CASES[0], CASES[4], CASES[6]] {
        let cfg = case.config();
        let layout = ParamLayout::llama(&cfg);
        // Training-sized weights, so the loss is smooth at the difference's step.
        let weights: Vec<f32> = case.weights(&layout);
        let dir = tempfile::tempdir().expect("tempdir");
        hf::write_dir(dir.path(), &cfg, &layout, &weights, ExportDtype::F32).expect("write");
        let windows = ids(2, 17, cfg.vocab_size, case.seed + 100);
        let g = gradient(&cfg, &weights, &windows);
        let mut rng = Rng(case.seed | 1);
        let d: Vec<f32> = (0..layout.total).map(|_| rng.normal()).collect();
        let tensors: Vec<(&str, &[usize], &[f32])> = layout
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.as_slice(), &d[p.range()]))
            .collect();
        let direction = dir.path().join("direction.safetensors");
        hf::write_safetensors(&direction, &tensors, ExportDtype::F32, None).expect("direction");
        let (_, json) = reference(dir.path(), &windows, Some(&direction));
        let theirs = json["directional_derivative"].as_f64().expect("derivative");
        let ours: f64 = g.iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rel = (ours - theirs).abs() / theirs.abs();
        println!("{case:?}: <g, d> {ours:.6} vs finite difference {theirs:.6} ({rel:.1e})");
        // Every parameter reaches the loss (a missing gradient would be zeros).
        for p in &layout.params {
            assert!(g[p.range()].iter().any(|x| *x != 0.0), "{}", p.name);
        }
        assert!(rel < 1e-3, "{case:?}: {ours} vs {theirs}");
    }
}

fn training() -> dapt_proto::job::TrainingSpec {
    JobSpec::parse(
        "job: t\nseed: 1\nmodel:\n  preset: tiny\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: 16\n  global_batch: 4\n  micro_batch: 2\n  tokens: 192\n  optimizer:\n    lr: 0.01\n",
    )
    .expect("job")
    .training
    .expect("training")
}

/// Three AdamW steps of the host trainer: before each, the reference evaluates the exported
/// weights on the step's windows and gives the loss dapt reports for it; the device-resident
/// engine (here on the CPU backend) takes the same steps with the same losses.
#[test]
fn training_steps_give_the_reference_loss_on_host_and_resident_engines() {
    let training = training();
    for case in [CASES[1], CASES[3], CASES[7]] {
        let cfg = case.config();
        let layout = ParamLayout::llama(&cfg);
        let mut weights = layout.init(0.05, case.seed);
        let mut rng = Rng(case.seed | 1);
        for p in layout.params.iter().filter(|p| p.kind == ParamKind::Bias) {
            weights[p.range()]
                .iter_mut()
                .for_each(|x| *x = 0.05 * rng.normal());
        }
        let mut host = Trainer::new(cfg.clone(), weights, &training);
        let mut resident = ResidentTrainer::<Ad>::from_host(
            host.clone(),
            burn::tensor::FloatDType::F32,
            &Default::default(),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        for step in 0..3u64 {
            let windows = ids(4, 17, cfg.vocab_size, case.seed * 10 + step);
            let micro: Vec<MicroBatch> = windows
                .chunks(2)
                .map(|c| MicroBatch {
                    ids: c.iter().flatten().copied().collect(),
                    samples: c.len(),
                })
                .collect();
            let tokens = 4 * 16u64;
            hf::write_dir(dir.path(), &cfg, &layout, &host.weights, ExportDtype::F32)
                .expect("export");
            let (_, json) = reference(dir.path(), &windows, None);
            let theirs = json["loss"].as_f64().expect("loss");
            let (loss, mut g) = host.gradients(&micro, tokens as f64);
            host.apply(&mut g, loss, tokens).expect("step");
            let (r_loss, r_grads) = resident.gradients(&micro, tokens as f64);
            let r_loss = r_loss.into_scalar().elem::<f64>();
            resident
                .apply(r_grads, r_loss, tokens)
                .expect("resident step");
            println!(
                "{:?} step {step}: dapt {loss:.6}, resident {r_loss:.6}, reference {theirs:.6}",
                case.family
            );
            assert!((loss - theirs).abs() < 1e-5 * theirs, "{loss} vs {theirs}");
            assert!((r_loss - loss).abs() < 1e-5 * loss, "{r_loss} vs {loss}");
        }
        let back = resident.to_host();
        assert!(rel_diff(&back.weights, &host.weights) < 1e-4);
    }
}
