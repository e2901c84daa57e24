//! Bringing foundation models in: Hugging Face directories and llama.cpp GGUF files.

pub mod gguf;
pub mod hf;
#[cfg(test)]
mod hf_tests;
mod shard_index;

use std::path::Path;

use crate::error::{Result, WorkerError};
use crate::model::{LlamaConfig, ParamLayout, RopeScaling};
use hf::{ExportDtype, HfWeights};

/// The embedding's Hugging Face name.
pub const EMBEDDING: &str = "model.embed_tokens.weight";

/// The output matrix's Hugging Face name: in a tied model, allowed as a copy of the embedding
/// (see `hf::load_dir`).
pub const TIED_HEAD: &str = "lm_head.weight";

/// Tensors a checkpoint may hold that dapt's Llama does not use, because they carry no
/// information of their own: `(prefix, suffix)` of the name, with a layer number between.
/// `rotary_emb.inv_freq` is a buffer that older transformers versions saved; it is a function
/// of `rope_theta`, `head_dim` and `rope_scaling`, which dapt computes from config.json.
pub const ALLOWED_UNUSED: &[(&str, &str)] = &[("model.layers.", ".self_attn.rotary_emb.inv_freq")];

/// How many unused tensors an error lists by name before it only counts the rest.
const LISTED: usize = 10;

/// Refuses a checkpoint that holds tensors dapt's Llama layout does not use (`unused`, sorted),
/// except those of [`ALLOWED_UNUSED`]: ignoring a bias, a second output matrix or a vision
/// tower would train and evaluate a different function from the one the checkpoint defines.
/// The error names up to ten of them and counts the rest.
pub fn refuse_unused(path: &Path, unused: &[String]) -> Result<()> {
    let refused: Vec<&String> = unused.iter().filter(|n| !allowed_unused(n)).collect();
    if refused.is_empty() {
        return Ok(());
    }
    let mut listed = refused
        .iter()
        .take(LISTED)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if refused.len() > LISTED {
        listed.push_str(&format!(" and {} more", refused.len() - LISTED));
    }
    Err(WorkerError::Config {
        path: path.to_path_buf(),
        message: format!(
            "{} tensors that dapt's Llama does not use: {listed}; ignoring them would compute a \
             different function from the one the checkpoint defines (docs/model.md lists what \
             dapt implements)",
            refused.len()
        ),
    })
}

/// Whether `name` is a layer's `self_attn.rotary_emb.inv_freq` buffer.
pub(crate) fn is_rotary_inv_freq(name: &str) -> bool {
    name.ends_with(".self_attn.rotary_emb.inv_freq") && allowed_unused(name)
}

/// Checks a rotary `inv_freq` buffer (its `values`) against the RoPE inverse frequencies
/// `config` implies: a buffer that differs says the checkpoint was trained with another
/// `rope_theta`, `head_dim` or scaling than its config.json gives, and dapt, which computes the
/// frequencies from config.json, would train a different function. Equal means up to the
/// rounding the buffer may have gone through, whatever dtype holds it now: 1e-5 relative (f32
/// arithmetic), or one step of f16 or bf16 at the value's magnitude (f16's subnormal step 2^-24
/// below 2^-14), since transformers computes the frequencies in f32 and older versions saved
/// them in the model's dtype, or cast a model to half precision and back (a buffer through f16
/// at rope_theta 1e6 is off by up to 1.3% relative in its subnormals; refused before, "the
/// checkpoint and its config disagree"). Another `rope_theta` or a scaling factor moves every
/// frequency but the first by far more. With linear scaling the unscaled frequencies pass too:
/// the transformers versions that saved this buffer scaled the positions instead. The error
/// says why (the caller names the tensor).
pub(crate) fn check_inv_freq(
    config: &LlamaConfig,
    values: &[f32],
) -> std::result::Result<(), String> {
    let scaled = config.inv_freq();
    let unscaled = LlamaConfig {
        rope_scaling: None,
        ..config.clone()
    }
    .inv_freq();
    let equal = |expected: &[f64]| {
        expected.len() == values.len()
            && expected
                .iter()
                .zip(values)
                .all(|(e, &v)| (f64::from(v) - e).abs() <= rounding(*e))
    };
    let linear = matches!(config.rope_scaling, Some(RopeScaling::Linear { .. }));
    if equal(&scaled) || (linear && equal(&unscaled)) {
        return Ok(());
    }
    Err(format!(
        "{} values that are not the {} RoPE inverse frequencies config.json implies \
         (rope_theta {}, head_dim {}, rope_scaling {}): the checkpoint and its config disagree \
         about the model",
        values.len(),
        scaled.len(),
        config.rope_theta,
        config.head_dim,
        serde_json::to_string(&config.rope_scaling).unwrap_or_default()
    ))
}

/// How far a value `e` may move through f32 arithmetic and a trip through f16 or bf16: the
/// largest of 1e-5 relative, one bf16 step (8 significand bits) and one f16 step (11 bits, and
/// 2^-24 among f16's subnormals) at `e`'s binade.
fn rounding(e: f64) -> f64 {
    let binade = e.abs().log2().floor();
    let bf16_step = (binade - 7.0).exp2();
    let f16_step = (binade - 10.0).max(-24.0).exp2();
    (1e-5 * e.abs()).max(bf16_step).max(f16_step)
}

fn allowed_unused(name: &str) -> bool {
    ALLOWED_UNUSED.iter().any(|(prefix, suffix)| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .is_some_and(|layer| !layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Converts a Llama, Qwen2 or Qwen3 GGUF into a Hugging Face directory of its family at `out`
/// (`config.json`, `model.safetensors` in f32, `tokenizer.json`, `tokenizer_config.json`) and
/// returns the model. `out` is claimed ([`hf::claim_output_dir`]) only once the file converts.
pub fn import_gguf(file: &gguf::GgufFile, out: &Path) -> Result<HfWeights> {
    let converted = gguf::to_hf(file)?;
    let config = LlamaConfig::from_json(&converted.config.to_string()).map_err(|message| {
        WorkerError::Config {
            path: file.path().to_path_buf(),
            message,
        }
    })?;
    let layout = ParamLayout::llama(&config);
    let mut unused: Vec<String> = converted
        .tensors
        .iter()
        .map(|(name, _, _)| name)
        .filter(|name| layout.get(name).is_none())
        .cloned()
        .collect();
    unused.sort();
    refuse_unused(file.path(), &unused)?;
    let mut weights = vec![0f32; layout.total];
    let mut filled = vec![false; layout.params.len()];
    for (name, shape, values) in converted.tensors {
        let Some(i) = layout.params.iter().position(|p| p.name == name) else {
            continue;
        };
        let p = &layout.params[i];
        if shape != p.shape {
            return Err(WorkerError::Tensor {
                path: file.path().to_path_buf(),
                tensor: name,
                message: format!("shape {shape:?}, but the metadata implies {:?}", p.shape),
            });
        }
        hf::check_finite(file.path(), [(name.as_str(), values.as_slice())])?;
        weights[p.range()].copy_from_slice(&values);
        filled[i] = true;
    }
    if let Some(i) = filled.iter().position(|f| !f) {
        return Err(WorkerError::Tensor {
            path: file.path().to_path_buf(),
            tensor: layout.params[i].name.clone(),
            message: "missing from the GGUF file".into(),
        });
    }
    // Only now: a file refused above left an output directory with dapt's marker (an audit).
    hf::claim_output_dir(out)?;
    hf::write_dir(out, &config, &layout, &weights, ExportDtype::F32)?;
    // By a rename, as the other files: never written through what is at that name.
    let tokenizer_path = out.join(hf::TOKENIZER_FILE);
    let json = converted
        .tokenizer
        .to_string(false)
        .map_err(|e| WorkerError::Config {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
    hf::write_atomic(&tokenizer_path, json.as_bytes())?;
    // An earlier dapt export here may have carried its base model's generation and tokenizer
    // settings: they described another model (its marker lists them, so they are dapt's).
    if out.join(hf::EXPORT_MARKER).is_file() {
        for name in dapt_proto::checkpoint::carried_files_written(out) {
            let path = out.join(&name);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(WorkerError::io(&path)(e))
                }
                _ => {}
            }
        }
    }
    // How transformers is to load the tokenizer (listed in the marker as dapt's, so that
    // training from this folder carries it into the checkpoints and exports).
    let config_path = out.join(dapt_corpus::tokenizer::HF_TOKENIZER_CONFIG);
    let config_json = serde_json::to_string_pretty(&converted.tokenizer_config).map_err(|e| {
        WorkerError::Config {
            path: config_path.clone(),
            message: e.to_string(),
        }
    })?;
    hf::write_atomic(&config_path, config_json.as_bytes())?;
    hf::record_export(
        out,
        &[dapt_corpus::tokenizer::HF_TOKENIZER_CONFIG.to_owned()],
        None,
    )?;
    Ok(HfWeights {
        config,
        layout,
        weights,
    })
}
