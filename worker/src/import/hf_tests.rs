//! Tests of `hf::load_dir` on tiny model directories written here: sharded weights read from
//! the shard the index names, and the rotary `inv_freq` buffer checked against config.json.

use std::collections::BTreeMap;
use std::path::Path;

use dapt_proto::job::Preset;

use super::hf::{self, ExportDtype};
use crate::model::{LlamaConfig, ParamLayout};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Named tensors: shape and values.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The tiny preset (vocabulary 16) and its tensors, each filled with a value of its own.
fn tiny() -> (LlamaConfig, Tensors) {
    let config = LlamaConfig::preset(Preset::Tiny, 16);
    let layout = ParamLayout::llama(&config);
    let tensors = layout
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                p.name.clone(),
                (p.shape.clone(), vec![0.01 * i as f32; p.len()]),
            )
        })
        .collect();
    (config, tensors)
}

/// Writes `config` and the shards (file name, its tensors) into `dir`, with an index mapping
/// `index` (tensor, file) when `Some`.
fn write_model(
    dir: &Path,
    config: &LlamaConfig,
    shards: &[(&str, &Tensors)],
    index: Option<&[(&str, &str)]>,
) -> TestResult {
    write_model_as(dir, config, shards, index, ExportDtype::F32)
}

/// [`write_model`], the tensors stored as `dtype`.
fn write_model_as(
    dir: &Path,
    config: &LlamaConfig,
    shards: &[(&str, &Tensors)],
    index: Option<&[(&str, &str)]>,
    dtype: ExportDtype,
) -> TestResult {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(hf::CONFIG_FILE), config.to_json().to_string())?;
    for (file, tensors) in shards {
        let list: Vec<(&str, &[usize], &[f32])> = tensors
            .iter()
            .map(|(n, (s, v))| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        hf::write_safetensors(&dir.join(file), &list, dtype, None)?;
    }
    if let Some(index) = index {
        let map: serde_json::Map<String, serde_json::Value> = index
            .iter()
            .map(|(t, f)| (t.to_string(), (*f).into()))
            .collect();
        let json = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join(hf::INDEX_FILE), json.to_string())?;
    }
    Ok(())
}

/// `tensors` split in two halves by name order, for two shard files.
fn halves(tensors: &Tensors) -> (Tensors, Tensors) {
    let mut first = tensors.clone();
    let second = first.split_off(
        tensors
            .keys()
            .nth(tensors.len() / 2)
            .map(String::as_str)
            .unwrap_or(""),
    );
    (first, second)
}

const A: &str = "model-00001-of-00002.safetensors";
const B: &str = "model-00002-of-00002.safetensors";

fn index_of<'a>(first: &'a Tensors, second: &'a Tensors) -> Vec<(&'a str, &'a str)> {
    first
        .keys()
        .map(|n| (n.as_str(), A))
        .chain(second.keys().map(|n| (n.as_str(), B)))
        .collect()
}

fn load_error(dir: &Path) -> String {
    hf::load_dir(dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// Every tensor comes from the shard the index names; a tensor in two shards, one the index
/// places in a shard that lacks it, and one a shard holds but the index does not list are
/// refused, naming the tensor and the files.
#[test]
fn sharded_weights_follow_the_index() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (config, tensors) = tiny();
    let (first, second) = halves(&tensors);
    let index = index_of(&first, &second);
    let moved = second.keys().next().ok_or("empty")?.clone();

    let good = tmp.path().join("good");
    write_model(&good, &config, &[(A, &first), (B, &second)], Some(&index))?;
    let model = hf::load_dir(&good)?;
    let p = model.layout.get(&moved).ok_or("layout")?;
    assert_eq!(model.weights[p.range()], tensors[&moved].1[..]);

    // The same tensor, with other values, in the first shard too: which one is the model?
    let mut stale = first.clone();
    let (shape, values) = &tensors[&moved];
    stale.insert(
        moved.clone(),
        (shape.clone(), values.iter().map(|v| v + 1.0).collect()),
    );
    let dir = tmp.path().join("twice");
    write_model(&dir, &config, &[(A, &stale), (B, &second)], Some(&index))?;
    let msg = load_error(&dir);
    assert!(
        msg.contains(&format!("`{moved}`")) && msg.contains(A) && msg.contains(B),
        "{msg}"
    );

    // The index says B; only A holds it.
    let mut second_without = second.clone();
    second_without.remove(&moved);
    let dir = tmp.path().join("misplaced");
    write_model(
        &dir,
        &config,
        &[(A, &stale), (B, &second_without)],
        Some(&index),
    )?;
    let msg = load_error(&dir);
    assert!(
        msg.contains(&format!("`{moved}`")) && msg.contains(B) && msg.contains("does not hold"),
        "{msg}"
    );

    // A shard holds a tensor the index does not list.
    let unlisted: Vec<(&str, &str)> = index.iter().copied().filter(|(n, _)| *n != moved).collect();
    let dir = tmp.path().join("unlisted");
    write_model(&dir, &config, &[(A, &first), (B, &second)], Some(&unlisted))?;
    let msg = load_error(&dir);
    assert!(
        msg.contains(&format!("`{moved}`")) && msg.contains(B) && msg.contains("does not list"),
        "{msg}"
    );
    Ok(())
}

/// A directory is the model transformers would load from it, or it is refused: a PEFT
/// adapter saved beside the weights (transformers loads base plus adapter; dapt loaded the base
/// alone, silently) and a `model.safetensors` beside an index of other shards (two sets of
/// weights; the single file was taken silently) are refused by name, an audit's two finds. An
/// index that names `model.safetensors` itself (some repositories ship one) is the same model.
#[test]
fn a_directory_with_an_adapter_or_two_weight_sets_is_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (config, tensors) = tiny();
    let (first, second) = halves(&tensors);
    let index = index_of(&first, &second);

    let dir = tmp.path().join("adapter");
    write_model(&dir, &config, &[(hf::WEIGHTS_FILE, &tensors)], None)?;
    hf::load_dir(&dir)?;
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8}"#,
    )?;
    let msg = load_error(&dir);
    assert!(
        msg.contains("PEFT adapter (adapter_config.json)") && msg.contains("merge_and_unload"),
        "{msg}"
    );

    let dir = tmp.path().join("both");
    write_model(
        &dir,
        &config,
        &[(hf::WEIGHTS_FILE, &tensors), (A, &first), (B, &second)],
        Some(&index),
    )?;
    let msg = load_error(&dir);
    assert!(
        msg.contains("two sets of weights") && msg.contains("the 2 shards"),
        "{msg}"
    );

    let dir = tmp.path().join("self-index");
    let all: Vec<(&str, &str)> = tensors
        .keys()
        .map(|n| (n.as_str(), hf::WEIGHTS_FILE))
        .collect();
    write_model(&dir, &config, &[(hf::WEIGHTS_FILE, &tensors)], Some(&all))?;
    hf::load_dir(&dir)?;
    Ok(())
}

/// The inv_freq f32 values of `config` (what dapt computes), as transformers saved them.
fn inv_freq(config: &LlamaConfig) -> Vec<f32> {
    config.inv_freq().iter().map(|&f| f as f32).collect()
}

/// A `rotary_emb.inv_freq` buffer is accepted only when it is the one config.json implies
/// (finite, the right length, equal to f32 rounding); anything else is a checkpoint that
/// disagrees with its config, refused by name.
#[test]
fn rotary_inv_freq_must_match_the_config() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (config, tensors) = tiny();
    let name = "model.layers.1.self_attn.rotary_emb.inv_freq";
    let with = |values: Vec<f32>| {
        let mut t = tensors.clone();
        t.insert(name.into(), (vec![values.len()], values));
        t
    };
    let right = inv_freq(&config);
    let dir = tmp.path().join("right");
    write_model(
        &dir,
        &config,
        &[(hf::WEIGHTS_FILE, &with(right.clone()))],
        None,
    )?;
    hf::load_dir(&dir)?;

    let mut other_theta = config.clone();
    other_theta.rope_theta = 500_000.0;
    let mut nan = right.clone();
    nan[3] = f32::NAN;
    for (case, values) in [
        ("theta", inv_freq(&other_theta)),
        ("nan", nan),
        ("short", right[1..].to_vec()),
        ("zeros", vec![0.01; right.len()]),
    ] {
        let dir = tmp.path().join(case);
        write_model(&dir, &config, &[(hf::WEIGHTS_FILE, &with(values))], None)?;
        let msg = load_error(&dir);
        assert!(msg.contains(&format!("`{name}`")), "{case}: {msg}");
    }
    Ok(())
}

/// A buffer that went through half precision is still the frequencies config.json implies:
/// saved as f16 at rope_theta 1e6 (its smallest frequencies are f16 subnormals, off by up to
/// 1.3%), or held as f32 after a trip through f16 or bf16. These were refused as "the checkpoint
/// and its config disagree" (an audit, with a legitimate older checkpoint); another rope_theta
/// is still refused when stored as f16.
#[test]
fn rotary_inv_freq_through_half_precision_is_accepted() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (mut config, tensors) = tiny();
    config.rope_theta = 1e6;
    let name = "model.layers.0.self_attn.rotary_emb.inv_freq";
    let with = |values: Vec<f32>| {
        let mut t = tensors.clone();
        t.insert(name.into(), (vec![values.len()], values));
        t
    };
    let write = |case: &str, values: Vec<f32>, dtype: ExportDtype| {
        let t = with(values);
        let dir = tmp.path().join(case);
        write_model_as(&dir, &config, &[(hf::WEIGHTS_FILE, &t)], None, dtype)
    };
    let right = inv_freq(&config);
    assert!(
        right.iter().any(|&f| f < 6.1e-5),
        "the test wants f16 subnormals"
    );
    let through_f16: Vec<f32> = right
        .iter()
        .map(|&f| half::f16::from_f32(f).to_f32())
        .collect();
    let through_bf16: Vec<f32> = right
        .iter()
        .map(|&f| half::bf16::from_f32(f).to_f32())
        .collect();
    for (case, values, dtype) in [
        ("f16", right.clone(), ExportDtype::F16),
        ("bf16", right.clone(), ExportDtype::Bf16),
        ("f32-through-f16", through_f16, ExportDtype::F32),
        ("f32-through-bf16", through_bf16, ExportDtype::F32),
    ] {
        write(case, values, dtype)?;
        if let Err(e) = hf::load_dir(&tmp.path().join(case)) {
            panic!("{case}: {e}");
        }
    }
    let mut other_theta = config.clone();
    other_theta.rope_theta = 500_000.0;
    write("f16-theta", inv_freq(&other_theta), ExportDtype::F16)?;
    let msg = load_error(&tmp.path().join("f16-theta"));
    assert!(msg.contains("RoPE inverse frequencies"), "{msg}");
    Ok(())
}

/// Finite f32 weights beyond the range of f16 (65,504) or bf16 (about 3.39e38) would be
/// written as infinities: the export is refused, naming the tensor, the count and the dtype,
/// before anything is written.
#[test]
fn export_refuses_weights_the_dtype_cannot_hold() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (config, _) = tiny();
    let layout = ParamLayout::llama(&config);
    let p = &layout.params[2];
    for (dtype, name, big) in [
        (ExportDtype::F16, "f16", 70_000.0),
        (ExportDtype::Bf16, "bf16", f32::MAX),
    ] {
        let mut weights = vec![0.5f32; layout.total];
        weights[p.offset] = big;
        weights[p.offset + 1] = -big;
        let out = tmp.path().join(name);
        let msg = hf::write_dir(&out, &config, &layout, &weights, dtype)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains(&format!("`{}`", p.name))
                && msg.contains(&format!("2 of {} values", p.len()))
                && msg.contains(name),
            "{name}: {msg}"
        );
        assert!(!out.join(hf::WEIGHTS_FILE).exists(), "{name}");
        // In f32 the same weights are exact.
        hf::write_dir(
            &tmp.path().join("f32"),
            &config,
            &layout,
            &weights,
            ExportDtype::F32,
        )?;
    }
    Ok(())
}

/// A config.json whose sizes the files do not hold (a vocabulary of 2^30 over a tiny model) is
/// refused naming the tensor, before the flat buffer is allocated (it was an allocation of a
/// terabyte, and an abort).
#[test]
fn a_config_larger_than_its_tensors_is_refused_before_allocating() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (config, tensors) = tiny();
    write_model(dir.path(), &config, &[(hf::WEIGHTS_FILE, &tensors)], None)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(hf::CONFIG_FILE))?)?;
    json["vocab_size"] = (1u64 << 30).into();
    std::fs::write(dir.path().join(hf::CONFIG_FILE), json.to_string())?;
    let err = load_error(dir.path());
    assert!(
        err.contains("embed_tokens") && err.contains("shape"),
        "{err}"
    );
    Ok(())
}
