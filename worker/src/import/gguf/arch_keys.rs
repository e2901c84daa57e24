//! The `{arch}.*` hyperparameter keys of a GGUF: those the conversion reads, those that carry
//! no math, and RoPE scaling. Any other `{arch}.*` key is refused by name: llama.cpp keeps
//! adding keys that change the function (a logit scale, a parallel residual, an ALiBi bias,
//! a sliding window), and dropping one would import a different model without a word, as
//! config.json's `IGNORED_KEYS` guards the Hugging Face side.

use super::*;

/// Keys (after `{arch}.`) the conversion reads and checks: `convert::llama_params`,
/// `convert::llama_config` and [`rope_scaling`].
const READ: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "expert_count",
    "expert_used_count",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.attn_factor",
];

/// Keys (after `{arch}.`) that carry no math of the converted model.
const IGNORED: &[&str] = &[
    // Read by llama.cpp for YaRN only, which is refused (`rope.scaling.type`).
    "rope.scaling.original_context_length",
    // Whether the model was fine-tuned at its scaled context: a note, not a parameter.
    "rope.scaling.finetuned",
    // "Meta AI original pth": q/k rows in llama.cpp's order, un-permuted like any other.
    "tensor_data_layout",
];

/// Refuses the first `{arch}.*` key that is neither read nor known to carry no math.
pub(super) fn refuse_unknown(file: &GgufFile, arch: &str) -> Result<()> {
    let prefix = format!("{arch}.");
    for (key, value) in file.metadata_all() {
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        if !READ.contains(&rest) && !IGNORED.contains(&rest) {
            return Err(GgufError::UnsupportedModel {
                key: key.clone(),
                value: value.describe(),
                reason: "dapt does not convert this key, and ignoring it could import a \
                         different model"
                    .into(),
            });
        }
    }
    Ok(())
}

/// The factor of llama.cpp's linear RoPE scaling (`None`: no scaling), for config.json's
/// `rope_scaling: {"rope_type": "linear", "factor": f}`, which transformers and dapt read as
/// llama.cpp's positions times 1 / f.
///
/// llama.cpp reads `rope.scaling.factor` (or the older `rope.scale_linear`) as linear scaling
/// when `rope.scaling.type` is absent or `linear`, and a factor of 0 as none. With type
/// `none` it ignores the factor: a factor other than 1 there is refused, as the file
/// contradicts itself. Another type (YaRN, LongRoPE) and an attention factor other than 1
/// (which multiplies RoPE's cos and sin, not in Hugging Face's Llama) are refused by key.
pub(super) fn rope_scaling(file: &GgufFile, arch: &str) -> Result<Option<f64>> {
    let key = |k: &str| format!("{arch}.{k}");
    let unsupported = |key: String, value: String, reason: &str| GgufError::UnsupportedModel {
        key,
        value,
        reason: reason.into(),
    };
    let attn_key = key("rope.scaling.attn_factor");
    if let Some(attn) = file.optional_f64(&attn_key)? {
        if attn != 1.0 {
            return Err(unsupported(
                attn_key,
                attn.to_string(),
                "llama.cpp multiplies RoPE's cos and sin by it; Hugging Face's model has no such factor",
            ));
        }
    }
    let factor_key = [key("rope.scaling.factor"), key("rope.scale_linear")]
        .into_iter()
        .find(|k| file.metadata(k).is_some());
    let factor = match &factor_key {
        Some(k) => Some((k, file.require_f64(k)?)),
        None => None,
    };
    if let Some((k, f)) = factor {
        if f < 0.0 {
            return Err(unsupported(
                k.clone(),
                f.to_string(),
                "a RoPE scaling factor must be positive",
            ));
        }
    }
    let scaled = factor.filter(|&(_, f)| f != 0.0 && f != 1.0);
    let type_key = key("rope.scaling.type");
    match file.optional_str(&type_key)? {
        None | Some("linear") => Ok(scaled.map(|(_, f)| f)),
        Some("none") => match scaled {
            None => Ok(None),
            Some((k, f)) => Err(unsupported(
                k.clone(),
                f.to_string(),
                &format!(
                    "{type_key} is none, under which llama.cpp ignores the factor: the file \
                     does not say which model it is"
                ),
            )),
        },
        Some(other) => Err(unsupported(
            type_key.clone(),
            other.into(),
            "only linear RoPE scaling is converted",
        )),
    }
}
