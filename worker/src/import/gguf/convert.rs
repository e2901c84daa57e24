//! A Llama GGUF in Hugging Face form: config, renamed tensors, q/k rows restored.

use super::*;

// ---------------------------------------------------------------------------------------------
// Conversion to Hugging Face form

/// One converted tensor: `(HF name, row-major shape, values)`.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// A Llama checkpoint in Hugging Face form, converted from GGUF.
pub struct HfModel {
    /// The `config.json` contents.
    pub config: serde_json::Value,
    /// `(HF name, row-major shape, values)`, in the GGUF file's tensor order.
    pub tensors: Vec<HfTensor>,
    pub tokenizer: Tokenizer,
}

impl fmt::Debug for HfModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfModel")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// The `llama.*` hyperparameters a conversion needs.
pub(super) struct LlamaParams {
    hidden: u64,
    intermediate: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
}

/// Converts a Llama-architecture GGUF to Hugging Face form: `config.json` from the `llama.*`
/// metadata, every tensor dequantized, renamed and reshaped (with q/k un-permuted), and the
/// tokenizer rebuilt from `tokenizer.ggml.*`.
pub fn to_hf(file: &GgufFile) -> Result<HfModel> {
    let arch = file.require_str("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::UnsupportedModel {
            key: "general.architecture".into(),
            value: arch.into(),
            reason: "only llama is converted".into(),
        });
    }
    let params = llama_params(file)?;
    let tokenizer = build_tokenizer(file)?;
    let tensors = convert_tensors(file, &params)?;
    let config = llama_config(file, &params, &tensors)?;
    Ok(HfModel {
        config,
        tensors,
        tokenizer,
    })
}

pub(super) fn llama_params(file: &GgufFile) -> Result<LlamaParams> {
    let hidden = file.require_u64("llama.embedding_length")?;
    let heads = file.require_u64("llama.attention.head_count")?;
    let kv_heads = file
        .optional_u64("llama.attention.head_count_kv")?
        .unwrap_or(heads);
    let unsupported = |key: &str, value: String, reason: &str| GgufError::UnsupportedModel {
        key: key.into(),
        value,
        reason: reason.into(),
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(unsupported(
            "llama.attention.head_count_kv",
            kv_heads.to_string(),
            &format!("must be non-zero and divide llama.attention.head_count = {heads}"),
        ));
    }
    let head_dim = match file.optional_u64("llama.attention.key_length")? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(unsupported(
                "llama.attention.head_count",
                heads.to_string(),
                &format!("does not divide llama.embedding_length = {hidden}"),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(unsupported(
            "llama.attention.key_length",
            head_dim.to_string(),
            "RoPE needs an even head dimension",
        ));
    }
    // HF Llama rotates the whole head; partial rotary and mixture-of-experts Llamas need more
    // than this converter writes, so refuse them rather than produce a subtly wrong model.
    if let Some(rot) = file.optional_u64("llama.rope.dimension_count")? {
        if rot != head_dim {
            return Err(unsupported(
                "llama.rope.dimension_count",
                rot.to_string(),
                &format!("HF Llama rotates the whole head of {head_dim}"),
            ));
        }
    }
    if let Some(experts) = file.optional_u64("llama.expert_count")? {
        if experts > 0 {
            return Err(unsupported(
                "llama.expert_count",
                experts.to_string(),
                "mixture-of-experts models are not converted",
            ));
        }
    }
    if let Some(scaling) = file.optional_str("llama.rope.scaling.type")? {
        if scaling != "none" {
            return Err(unsupported(
                "llama.rope.scaling.type",
                scaling.into(),
                "RoPE scaling is not converted",
            ));
        }
    }
    Ok(LlamaParams {
        hidden,
        intermediate: file.require_u64("llama.feed_forward_length")?,
        layers: file.require_u64("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
    })
}

pub(super) fn llama_config(
    file: &GgufFile,
    p: &LlamaParams,
    tensors: &[HfTensor],
) -> Result<serde_json::Value> {
    let tied = file.tensor_info("output.weight").is_none();
    // The embedding's rows are the model's vocabulary; the token list normally has exactly as
    // many entries, but a padded embedding may have more (never fewer).
    let embd = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            name: "token_embd.weight".into(),
        })?;
    let vocab_rows = embd.shape.get(1).copied().unwrap_or(0);
    let n_tokens = file.require_array("tokenizer.ggml.tokens")?.len() as u64;
    if n_tokens > vocab_rows {
        return Err(GgufError::BadTensor {
            name: "token_embd.weight".into(),
            reason: format!(
                "it has {vocab_rows} rows but tokenizer.ggml.tokens has {n_tokens} tokens"
            ),
        });
    }
    let attention_bias = tensors.iter().any(|(n, _, _)| n.ends_with("q_proj.bias"));
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "rms_norm_eps": file.require_f64("llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": file.optional_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
        "max_position_embeddings": file.require_u64("llama.context_length")?,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": tied,
        "attention_bias": attention_bias,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = file.optional_u64(key)? {
            config[field] = json!(id);
        }
    }
    Ok(config)
}

/// The HF name of a GGUF Llama tensor, or `None` if it has no HF Llama counterpart.
pub(super) fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{suffix}"))
}

pub(super) fn convert_tensors(file: &GgufFile, p: &LlamaParams) -> Result<Vec<HfTensor>> {
    // Check the full set first, so a missing tensor is reported before minutes of dequantizing.
    let mut required = vec![
        "token_embd.weight".to_owned(),
        "output_norm.weight".to_owned(),
    ];
    for layer in 0..p.layers {
        for part in [
            "attn_norm",
            "ffn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            required.push(format!("blk.{layer}.{part}.weight"));
        }
    }
    if let Some(name) = required.iter().find(|n| file.tensor_info(n).is_none()) {
        return Err(GgufError::MissingTensor { name: name.clone() });
    }

    let mut out = Vec::with_capacity(file.tensors().len());
    for info in file.tensors() {
        let name = hf_name(&info.name).ok_or_else(|| GgufError::BadTensor {
            name: info.name.clone(),
            reason: "it has no Hugging Face Llama counterpart".into(),
        })?;
        let (mut values, shape) = file.tensor_f32(&info.name)?;
        let rope_heads = if name.contains(".q_proj.") {
            Some(p.heads)
        } else if name.contains(".k_proj.") {
            Some(p.kv_heads)
        } else {
            None
        };
        if let Some(n_head) = rope_heads {
            // The row count must be exactly the heads the metadata promises, or un-permuting
            // would silently scramble rows across heads.
            let rows = shape.first().copied().unwrap_or(0);
            let cols = shape.get(1).copied().unwrap_or(1);
            if shape.len() > 2 || Some(rows as u64) != n_head.checked_mul(p.head_dim) {
                return Err(GgufError::BadTensor {
                    name: info.name.clone(),
                    reason: format!(
                        "HF shape {shape:?} is not {n_head} heads of {} rows",
                        p.head_dim
                    ),
                });
            }
            let n_head = n_head as usize; // at most `rows`, checked above
            values = unpermute_rope_rows(&values, rows, cols, n_head);
        }
        out.push((name, shape, values));
    }
    Ok(out)
}
