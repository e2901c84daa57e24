//! A Llama, Qwen2 or Qwen3 GGUF in Hugging Face form: config, renamed tensors, and (Llama
//! only) q/k rows restored.
//!
//! llama.cpp stores a `llama` model's q and k rows permuted for its adjacent-pair RoPE and
//! un-permutes nothing else; `qwen2` and `qwen3` use its NeoX (rotate-half) RoPE and keep
//! Hugging Face's row order, so their tensors are only renamed. Qwen2's q/k/v biases are
//! `blk.N.attn_{q,k,v}.bias`; Qwen3's per-head norms `blk.N.attn_{q,k}_norm.weight`.

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
    /// The `tokenizer_config.json` contents ([`tokenizer_config`](super::tokenizer)).
    pub tokenizer_config: serde_json::Value,
}

impl fmt::Debug for HfModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfModel")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// The `{arch}.*` hyperparameters a conversion needs.
pub(super) struct LlamaParams {
    /// The family of `general.architecture` (whose name prefixes the metadata keys).
    family: Family,
    hidden: u64,
    intermediate: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    /// Linear RoPE scaling's factor (`arch_keys::rope_scaling`).
    rope_factor: Option<f64>,
}

/// Converts a Llama-architecture GGUF to Hugging Face form: `config.json` from the `llama.*`
/// metadata, every tensor dequantized, renamed and reshaped (with q/k un-permuted), and the
/// tokenizer rebuilt from `tokenizer.ggml.*`.
pub fn to_hf(file: &GgufFile) -> Result<HfModel> {
    let arch = file.require_str("general.architecture")?;
    let family = match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        _ => {
            return Err(GgufError::UnsupportedModel {
                key: "general.architecture".into(),
                value: arch.into(),
                reason: "llama, qwen2 and qwen3 are converted".into(),
            })
        }
    };
    let params = llama_params(file, family)?;
    let tokenizer = build_tokenizer(file)?;
    let tokenizer_config = tokenizer_config(file, &tokenizer)?;
    let tensors = convert_tensors(file, &params)?;
    let config = llama_config(file, &params, &tensors)?;
    Ok(HfModel {
        config,
        tensors,
        tokenizer,
        tokenizer_config,
    })
}

pub(super) fn llama_params(file: &GgufFile, family: Family) -> Result<LlamaParams> {
    // llama.cpp's architecture names are Hugging Face's model types for these families.
    let arch = family.model_type();
    let key = |k: &str| format!("{arch}.{k}");
    arch_keys::refuse_unknown(file, arch)?;
    let hidden = file.require_u64(&key("embedding_length"))?;
    let heads = file.require_u64(&key("attention.head_count"))?;
    let kv_heads = file
        .optional_u64(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let unsupported = |key: &str, value: String, reason: &str| GgufError::UnsupportedModel {
        key: key.into(),
        value,
        reason: reason.into(),
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(unsupported(
            &key("attention.head_count_kv"),
            kv_heads.to_string(),
            &format!("must be non-zero and divide {arch}.attention.head_count = {heads}"),
        ));
    }
    let head_dim = match file.optional_u64(&key("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(unsupported(
                &key("attention.head_count"),
                heads.to_string(),
                &format!("does not divide {arch}.embedding_length = {hidden}"),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(unsupported(
            &key("attention.key_length"),
            head_dim.to_string(),
            "RoPE needs an even head dimension",
        ));
    }
    if let Some(v) = file.optional_u64(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(unsupported(
                &key("attention.value_length"),
                v.to_string(),
                &format!(
                    "Hugging Face's {arch} uses the key head dimension {head_dim} for values too"
                ),
            ));
        }
    }
    // HF Llama rotates the whole head; partial rotary and mixture-of-experts Llamas need more
    // than this converter writes, so refuse them rather than produce a subtly wrong model.
    if let Some(rot) = file.optional_u64(&key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(unsupported(
                &key("rope.dimension_count"),
                rot.to_string(),
                &format!("HF Llama rotates the whole head of {head_dim}"),
            ));
        }
    }
    for experts_key in [key("expert_count"), key("expert_used_count")] {
        if let Some(experts) = file.optional_u64(&experts_key)? {
            if experts > 0 {
                return Err(unsupported(
                    &experts_key,
                    experts.to_string(),
                    "mixture-of-experts models are not converted",
                ));
            }
        }
    }
    // Each block is at least nine tensors: a count the file cannot hold is refused before
    // anything is sized from it (2^32 blocks made a list of names without end).
    let layers_key = key("block_count");
    let layers = file.require_u64(&layers_key)?;
    if layers.saturating_mul(9) > file.tensors().len() as u64 {
        return Err(unsupported(
            &layers_key,
            layers.to_string(),
            &format!(
                "the file holds {} tensors, fewer than 9 per block",
                file.tensors().len()
            ),
        ));
    }
    Ok(LlamaParams {
        family,
        hidden,
        intermediate: file.require_u64(&key("feed_forward_length"))?,
        layers,
        heads,
        kv_heads,
        head_dim,
        rope_factor: arch_keys::rope_scaling(file, arch)?,
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
    let arch = p.family.model_type();
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(n) = file.optional_u64(&key("vocab_size"))? {
        if n != vocab_rows {
            return Err(GgufError::UnsupportedModel {
                key: key("vocab_size"),
                value: n.to_string(),
                reason: format!("token_embd.weight has {vocab_rows} rows"),
            });
        }
    }
    let mut config = json!({
        "architectures": [p.family.architecture()],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "rms_norm_eps": file.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": file.optional_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": file.require_u64(&key("context_length"))?,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    });
    if let Some(factor) = p.rope_factor {
        config["rope_scaling"] = json!({ "rope_type": "linear", "factor": factor });
    }
    // A Llama with q biases says so, so that the config check refuses it by name (dapt's Llama
    // has none); Qwen2's biases are part of the family and its config has no such field.
    if p.family == Family::Llama {
        let attention_bias = tensors.iter().any(|(n, _, _)| n.ends_with("q_proj.bias"));
        config["attention_bias"] = json!(attention_bias);
        config["mlp_bias"] = json!(false);
    }
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

/// The HF name of a GGUF Llama-family tensor, or `None` if it has no HF counterpart. (A name
/// this maps that the family's layout does not use, such as an MLP bias, is refused by the
/// import, by its HF name.)
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
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
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
    for layer in 0..p.layers {
        if p.family.qkv_bias() {
            for part in ["attn_q", "attn_k", "attn_v"] {
                required.push(format!("blk.{layer}.{part}.bias"));
            }
        }
        if p.family.qk_norm() {
            for part in ["attn_q_norm", "attn_k_norm"] {
                required.push(format!("blk.{layer}.{part}.weight"));
            }
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
        // Only llama.cpp's `llama` architecture permutes q/k rows (weights and biases).
        let rope_heads = if p.family != Family::Llama {
            None
        } else if name.contains(".q_proj.") {
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
