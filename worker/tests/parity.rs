//! dapt's forward pass against an independent implementation: the NumPy reference of the
//! Hugging Face Llama definition in `tests/reference/llama_ref.py` (numpy + safetensors, which
//! `.ci/run` installs). Logits must agree to 1e-3 in f32.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Int, Tensor, TensorData};
use dapt_proto::job::Preset;
use dapt_worker::import::hf::{self, ExportDtype};
use dapt_worker::model::{Llama, LlamaConfig, ParamLayout};
use dapt_worker::Cpu;

mod support;
use support::max_abs_diff;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// dapt's logits `[batch * seq * vocab]` for `ids`.
fn dapt_logits(cfg: &LlamaConfig, weights: &[f32], ids: &[Vec<u32>]) -> Vec<f32> {
    let device = Default::default();
    let model = Llama::<Cpu>::from_flat(cfg, weights, &device, false);
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
    let input = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(flat, [b, t]), &device);
    model
        .forward(input)
        .into_data()
        .into_vec::<f32>()
        .expect("f32 logits")
}

/// The reference's logits for the HF directory `dir`.
fn reference_logits(dir: &Path, ids: &[Vec<u32>]) -> Vec<f32> {
    let ids_path = dir.join("ids.json");
    std::fs::write(&ids_path, serde_json::to_vec(ids).expect("json")).expect("write ids");
    let out = dir.join("logits.npy");
    let python = std::env::var("DAPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .arg(repo_root().join("tests/reference/llama_ref.py"))
        .arg(dir)
        .arg("--ids")
        .arg(&ids_path)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("python3 runs (numpy and safetensors are installed by .ci/run)");
    assert!(status.success(), "the NumPy reference failed");
    read_npy_f32(&out)
}

/// A little-endian f32 `.npy` file's values.
fn read_npy_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an npy file");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
    assert!(
        header.contains("'<f4'"),
        "expected little-endian f32: {header}"
    );
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn ids(batch: usize, seq: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed;
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn tiny(tied: bool) -> LlamaConfig {
    let mut cfg = LlamaConfig::preset(Preset::Tiny, 512);
    cfg.tie_word_embeddings = tied;
    cfg
}

#[test]
fn tiny_model_matches_the_numpy_reference() {
    for tied in [true, false] {
        let cfg = tiny(tied);
        let layout = ParamLayout::llama(&cfg);
        // A larger init than training uses, so that attention is far from uniform and a wrong
        // rotation or head mapping shows.
        let weights = layout.init(0.2, 7);
        let dir = tempfile::tempdir().expect("tempdir");
        hf::write_dir(dir.path(), &cfg, &layout, &weights, ExportDtype::F32).expect("write");
        let ids = ids(2, 24, cfg.vocab_size, 3);
        let ours = dapt_logits(&cfg, &weights, &ids);
        let theirs = reference_logits(dir.path(), &ids);
        let diff = max_abs_diff(&ours, &theirs);
        let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
        println!("tied={tied}: max |logit| {scale:.3}, max abs diff {diff:.3e}");
        assert!(diff < 1e-3, "tied={tied}: logits differ by {diff}");
        // The model read back from the export gives the same logits.
        let back = hf::load_dir(dir.path()).expect("load");
        assert_eq!(back.weights, weights);
    }
}

#[test]
fn a_wrong_rope_pairing_fails_the_parity_check() {
    // llama.cpp stores q/k rows permuted so that RoPE can rotate adjacent pairs. Feeding such rows
    // to a rotate-half model (or, equally, rotating adjacent pairs) must not pass parity.
    let cfg = tiny(true);
    let layout = ParamLayout::llama(&cfg);
    let weights = layout.init(0.2, 11);
    let dir = tempfile::tempdir().expect("tempdir");
    hf::write_dir(dir.path(), &cfg, &layout, &weights, ExportDtype::F32).expect("write");
    let mut permuted = weights.clone();
    for p in &layout.params {
        let heads = if p.name.ends_with("q_proj.weight") {
            cfg.num_attention_heads
        } else if p.name.ends_with("k_proj.weight") {
            cfg.num_key_value_heads
        } else {
            continue;
        };
        let rows = dapt_worker::import::gguf::permute_rope_rows(
            &weights[p.range()],
            p.shape[0],
            p.shape[1],
            heads,
        );
        permuted[p.range()].copy_from_slice(&rows);
    }
    let ids = ids(1, 24, cfg.vocab_size, 5);
    let theirs = reference_logits(dir.path(), &ids);
    let right = max_abs_diff(&dapt_logits(&cfg, &weights, &ids), &theirs);
    let wrong = max_abs_diff(&dapt_logits(&cfg, &permuted, &ids), &theirs);
    println!("right pairing {right:.3e}, wrong pairing {wrong:.3e}");
    assert!(right < 1e-3);
    assert!(
        wrong > 1e-2,
        "a wrong RoPE pairing went unnoticed ({wrong})"
    );
}

/// SmolLM2-135M imported from its GGUF (`examples/fetch-model.sh`); skipped when absent.
#[test]
fn smollm2_matches_the_numpy_reference_when_fetched() {
    let dir = repo_root().join("data/models/smollm2-135m");
    let Some(gguf) = std::fs::read_dir(&dir).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "gguf"))
    }) else {
        eprintln!(
            "skipped: no SmolLM2 GGUF under {} (run examples/fetch-model.sh)",
            dir.display()
        );
        return;
    };
    let out = tempfile::tempdir().expect("tempdir");
    let file = dapt_worker::import::gguf::GgufFile::open(&gguf).expect("gguf");
    let model = dapt_worker::import::import_gguf(&file, out.path()).expect("import");
    let ids = ids(1, 32, model.config.vocab_size, 9);
    let ours = dapt_logits(&model.config, &model.weights, &ids);
    let theirs = reference_logits(out.path(), &ids);
    let diff = max_abs_diff(&ours, &theirs);
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("SmolLM2-135M: max |logit| {scale:.3}, max abs diff {diff:.3e}");
    assert!(diff < 1e-3, "SmolLM2 logits differ by {diff}");
}
