//! The shape of a Llama-family decoder (shared: the worker builds it, the coordinator plans with it), read from (and written back as) a Hugging Face
//! `config.json`.
//!
//! One config for the families that are the Llama block with small, well-defined changes
//! ([`Family`]): Llama, Qwen2/Qwen2.5 (q/k/v biases), Qwen3 (per-head RMSNorm on q and k,
//! explicit `head_dim`) and Mistral (an optional sliding attention window).
//!
//! Fields that change the math and that dapt does not implement are refused by name rather than
//! ignored: training a model with the wrong architecture would silently waste a GPU budget.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::Preset;

/// The Hugging Face model families dapt implements, all as the one Llama decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `LlamaForCausalLM`.
    #[default]
    Llama,
    /// `Qwen2ForCausalLM` (Qwen2 and Qwen2.5): biases on the q, k and v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm over each head of q and k (`q_norm`, `k_norm`) before RoPE.
    Qwen3,
    /// `MistralForCausalLM`: the Llama block, with an optional sliding attention window.
    Mistral,
}

impl Family {
    /// Every family, in the order docs/model.md lists them.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Mistral];

    /// Hugging Face's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Mistral => "mistral",
        }
    }

    /// Hugging Face's causal-LM class, written in `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
        }
    }

    /// The family of a `model_type`, if dapt implements it.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    /// Whether the q, k and v projections carry biases (`*_proj.bias`, o_proj has none).
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2
    }

    /// transformers' `max_position_embeddings` of this family's config class when config.json
    /// has no such key (`LlamaConfig` 2048, `Qwen2Config`/`Qwen3Config` 32768,
    /// `MistralConfig` 4096 x 32). An export writes the value back, and serving stacks take a
    /// model's context length from it.
    pub fn default_max_position_embeddings(self) -> usize {
        match self {
            Family::Llama => 2048,
            Family::Qwen2 | Family::Qwen3 => 32_768,
            Family::Mistral => 131_072,
        }
    }

    /// transformers' `num_key_value_heads` when config.json has no such key (its config
    /// class's default; an explicit null is the attention heads in every family), or `None`
    /// where that default is the attention heads (Llama).
    pub fn default_kv_heads(self) -> Option<usize> {
        match self {
            Family::Llama => None,
            Family::Qwen2 | Family::Qwen3 => Some(32),
            Family::Mistral => Some(8),
        }
    }

    /// Whether each head of q and k is RMS-normalised (gains `q_norm`, `k_norm` of `head_dim`)
    /// before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Family::Qwen3
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which Llama-family architecture: decides the extra tensors and `config.json`'s fields.
    #[serde(default)]
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// The document-end token: config.json's `eos_token_id`, or the first of its list.
    pub eos_token_id: Option<u32>,
    /// config.json's `eos_token_id` when it is a list (Llama 3.x Instruct's
    /// `[128001, 128008, 128009]`: generation stops at any of them), written back as a list by
    /// an export; `None` for a single id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_ids: Option<Vec<u32>>,
    /// config.json's `pad_token_id`, carried into an export (no math depends on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Mistral's sliding window: a query attends to itself and the `w - 1` positions before it.
    /// `None` is full causal attention (every other family).
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// RoPE frequency scaling, as Hugging Face's `rope_scaling`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        /// An integer, as in Hugging Face's configs (an integral float is read too).
        original_max_position_embeddings: u64,
    },
}

/// transformers' `Qwen3Config.head_dim` when config.json has no such key.
pub const QWEN3_DEFAULT_HEAD_DIM: usize = 128;

/// transformers' `MistralConfig.sliding_window` when config.json has no such key (null is no
/// window).
pub const MISTRAL_DEFAULT_SLIDING_WINDOW: usize = 4096;

/// Keys of a Hugging Face Llama config that carry no math dapt has to implement.
const IGNORED_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "pretraining_tp",
    "is_llama_config",
    "rope_interleaved",
    "transformers.js_config",
    "tokenizer_class",
    "unsloth_fixed",
    "output_attentions",
    "output_hidden_states",
];

/// The most parameters a model may have (2^40, about 1.1 trillion): its weights and AdamW state
/// are counted and indexed in 64-bit arithmetic that must not wrap.
pub const MAX_PARAMS: u64 = 1 << 40;

/// The f32 logits one vocabulary chunk of the fused loss may take, in bytes (the worker's
/// `fused::loss`; the planner counts one chunk): 128 MiB, 8,192 columns at 4,096 tokens.
pub const LOSS_CHUNK_BYTES: usize = 128 << 20;

/// ZeRO stage 2's gradient buckets, in elements (64 MiB of f32): the most gradient elements a
/// rank reduces at once (the worker's `train/resident/buckets.rs`; the planner counts one bucket
/// in flight).
pub const GRADIENT_BUCKET_ELEMENTS: usize = 16 << 20;

/// Elements the CPU backend's AdamW update takes at a time (16 MiB of f32; the worker's
/// `fused::adamw` default body): its temporaries are five f32 tensors of at most this many
/// elements (the planner's optimizer phase on the CPU). On a GPU the update is one in-place
/// kernel with no temporary.
pub const ADAMW_CHUNK_ELEMENTS: usize = 4 << 20;

/// Loss chunks are a multiple of this many vocabulary columns (tensor-core tiles).
pub const LOSS_CHUNK_ALIGN: usize = 256;

/// The fused loss's vocabulary columns per chunk for `tokens` rows over a `vocab`-entry
/// vocabulary: as many as fit [`LOSS_CHUNK_BYTES`] of f32 logits, a multiple of
/// [`LOSS_CHUNK_ALIGN`] (at least one multiple), and the whole vocabulary when it fits.
pub fn loss_chunk(tokens: usize, vocab: usize) -> usize {
    let fits = LOSS_CHUNK_BYTES / (4 * tokens.max(1));
    let aligned = (fits / LOSS_CHUNK_ALIGN * LOSS_CHUNK_ALIGN).max(LOSS_CHUNK_ALIGN);
    aligned.min(vocab.max(1))
}

impl LlamaConfig {
    pub fn preset(preset: Preset, vocab_size: usize) -> Self {
        let base = |hidden, inter, layers, heads, kv, tie, theta| LlamaConfig {
            family: Family::Llama,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: tie,
            bos_token_id: None,
            eos_token_id: None,
            eos_token_ids: None,
            pad_token_id: None,
            sliding_window: None,
        };
        match preset {
            Preset::Tiny => base(128, 352, 2, 4, 2, true, 10_000.0),
            Preset::Smollm2_135m => base(576, 1536, 30, 9, 3, true, 100_000.0),
            Preset::Llama2_7b => base(4096, 11008, 32, 32, 32, false, 10_000.0),
            Preset::Llama3_8b => base(4096, 14336, 32, 32, 8, false, 500_000.0),
        }
    }

    /// Reads a `config.json`; the error names the file and the field.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|message| format!("{}: {message}", path.display()))
    }

    /// Parses a Hugging Face `config.json`; the error names the field at fault.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let map: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        let mut seen = Vec::new();
        let mut get = |key: &'static str| {
            seen.push(key);
            map.get(key).filter(|v| !v.is_null())
        };
        let usize_of =
            |v: Option<&Value>, key: &str| -> std::result::Result<Option<usize>, String> {
                v.map(|v| {
                    v.as_u64()
                        .filter(|&n| n > 0)
                        .map(|n| n as usize)
                        .ok_or_else(|| format!("`{key}` must be a positive integer, got {v}"))
                })
                .transpose()
            };
        let required = |v: Option<usize>, key: &str| v.ok_or_else(|| format!("`{key}` is missing"));
        // A positive, finite number: the norm's epsilon and RoPE's base (a zero or negative one
        // gives NaN or inf in every pass, with no word of which field).
        let positive_f64_of =
            |v: Option<&Value>, key: &str| -> std::result::Result<Option<f64>, String> {
                v.map(|v| {
                    v.as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| format!("`{key}` must be a positive number, got {v}"))
                })
                .transpose()
            };

        let family = match get("model_type") {
            None => Family::Llama,
            Some(v) => v
                .as_str()
                .and_then(Family::from_model_type)
                .ok_or_else(|| {
                    format!(
                        "`model_type` is {v}; dapt trains `llama`, `qwen2`, `qwen3` and `mistral` models"
                    )
                })?,
        };
        if let Some(act) = get("hidden_act") {
            // transformers' ACT2FN maps "swish" to the same nn.SiLU.
            if !matches!(act.as_str(), Some("silu" | "swish")) {
                return Err(format!(
                    "`hidden_act` is {act}; dapt implements `silu` (SwiGLU; `swish` is the same)"
                ));
            }
        }
        if let Some(v) = get("attention_dropout") {
            if v.as_f64() != Some(0.0) {
                return Err(format!(
                    "`attention_dropout` is {v}; dapt trains without dropout"
                ));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if let Some(v) = get(key) {
                if v.as_bool() != Some(false) {
                    return Err(format!(
                        "`{key}` is {v}; dapt implements `{}` without {} biases",
                        family.model_type(),
                        if key == "mlp_bias" {
                            "MLP"
                        } else {
                            "these attention"
                        }
                    ));
                }
            }
        }
        // `get` treats an explicit null as absent; where transformers tells the two apart (a
        // family's default for an absent key, `hidden / heads` or no window for a null), so
        // does dapt.
        let absent = |key: &str| !map.contains_key(key);
        let sliding_window = sliding_window(family, absent("sliding_window"), &mut get)?;
        let hidden = required(usize_of(get("hidden_size"), "hidden_size")?, "hidden_size")?;
        let heads = required(
            usize_of(get("num_attention_heads"), "num_attention_heads")?,
            "num_attention_heads",
        )?;
        let kv_default = if absent("num_key_value_heads") {
            family.default_kv_heads().unwrap_or(heads)
        } else {
            heads
        };
        let kv = usize_of(get("num_key_value_heads"), "num_key_value_heads")?.unwrap_or(kv_default);
        if heads % kv != 0 {
            return Err(format!(
                "`num_key_value_heads` ({kv}) must divide `num_attention_heads` ({heads})"
            ));
        }
        // transformers' LlamaConfig (5.x, `validate_architecture`) refuses a hidden size that
        // heads do not divide whatever `head_dim` says (its Mistral and Qwen2 configs floor it):
        // an export of it would not load (with `head_dim` given, dapt trained and exported one;
        // an audit).
        if family == Family::Llama && hidden % heads != 0 {
            return Err(format!(
                "`hidden_size` ({hidden}) is not a multiple of `num_attention_heads` ({heads}): \
                 transformers' LlamaConfig refuses it{}",
                if absent("head_dim") {
                    " (and there is no `head_dim`)"
                } else {
                    ", even with a `head_dim`"
                }
            ));
        }
        let head_dim = match usize_of(get("head_dim"), "head_dim")? {
            Some(d) => d,
            // Qwen3Config's `head_dim` is an integer defaulting to 128, not `hidden / heads`;
            // it does not take null.
            None if family == Family::Qwen3 && absent("head_dim") => QWEN3_DEFAULT_HEAD_DIM,
            None if family == Family::Qwen3 => {
                return Err("`head_dim` is null; transformers' Qwen3Config needs an integer".into())
            }
            None => hidden / heads,
        };
        if head_dim == 0 {
            return Err(format!(
                "`head_dim` is 0 (hidden_size {hidden} / num_attention_heads {heads}, with no \
                 `head_dim` of its own): a head needs at least 2 dimensions"
            ));
        }
        if head_dim % 2 != 0 {
            return Err(format!("`head_dim` ({head_dim}) must be even for RoPE"));
        }
        // transformers 5 writes `rope_parameters` (theta and scaling together) instead of
        // `rope_theta` and `rope_scaling`.
        let rope_parameters = get("rope_parameters");
        let rope_scaling = match get("rope_scaling").or(rope_parameters) {
            None => None,
            Some(v) => match parse_rope_scaling(v)? {
                RopeScaling::Linear { factor: 1.0 } => None,
                scaling => Some(scaling),
            },
        };
        // transformers 5 takes the base from the dict that gives the rope type (`rope_scaling`,
        // else `rope_parameters`) and the top-level `rope_theta` only where that dict has
        // none; transformers 4 reads only the top-level key. Both present and different would
        // be two models, one per version: refused by field.
        let nested = match (get("rope_scaling"), rope_parameters) {
            (Some(v), _) => Some(("rope_scaling", v)),
            (None, Some(v)) => Some(("rope_parameters", v)),
            (None, None) => None,
        }
        .and_then(|(key, v)| v.get("rope_theta").map(|theta| (key, theta)));
        let rope_theta = match (get("rope_theta"), nested) {
            (Some(top), Some((key, theta))) => {
                let (a, b) = (
                    positive_f64_of(Some(top), "rope_theta")?,
                    positive_f64_of(Some(theta), &format!("{key}.rope_theta"))?,
                );
                if a != b {
                    return Err(format!(
                        "`rope_theta` ({top}) and `{key}.rope_theta` ({theta}) differ: \
                         transformers 5 uses the second, transformers 4 the first; keep one"
                    ));
                }
                Some(theta)
            }
            (top, nested) => nested.map(|(_, theta)| theta).or(top),
        };
        // A negative id is "none" (older Llama conversions ship `pad_token_id: -1`, and dapt
        // read a negative one as absent before); one past 32 bits is refused (it wrapped).
        let one_id = |v: &Value, key: &str| -> std::result::Result<Option<u32>, String> {
            match v {
                Value::Null => Ok(None),
                Value::Number(n) if n.as_i64().is_some_and(|n| n < 0) => Ok(None),
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        format!("`{key}` must be a token id (0 to {}), got {n}", u32::MAX)
                    }),
                other => Err(format!("`{key}` must be a token id, got {other}")),
            }
        };
        let token_id = |v: Option<&Value>, key: &str| -> std::result::Result<Option<u32>, String> {
            match v {
                None => Ok(None),
                // Some configs list several end tokens; the first is the document end.
                Some(Value::Array(a)) => match a.first() {
                    None => Ok(None),
                    Some(first) => one_id(first, key),
                },
                Some(v) => one_id(v, key),
            }
        };
        let token_ids =
            |v: Option<&Value>, key: &str| -> std::result::Result<Option<Vec<u32>>, String> {
                match v {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|id| one_id(id, key)?.ok_or_else(|| format!("`{key}` lists null")))
                        .collect::<std::result::Result<Vec<u32>, String>>()
                        .map(Some),
                    _ => Ok(None),
                }
            };
        let config = LlamaConfig {
            family,
            hidden_size: hidden,
            intermediate_size: required(
                usize_of(get("intermediate_size"), "intermediate_size")?,
                "intermediate_size",
            )?,
            num_hidden_layers: required(
                usize_of(get("num_hidden_layers"), "num_hidden_layers")?,
                "num_hidden_layers",
            )?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: required(usize_of(get("vocab_size"), "vocab_size")?, "vocab_size")?,
            rms_norm_eps: positive_f64_of(get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: positive_f64_of(rope_theta, "rope_theta")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: usize_of(
                get("max_position_embeddings"),
                "max_position_embeddings",
            )?
            .unwrap_or(family.default_max_position_embeddings()),
            tie_word_embeddings: match get("tie_word_embeddings") {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    format!("`tie_word_embeddings` must be true or false, got {v}")
                })?,
            },
            bos_token_id: token_id(get("bos_token_id"), "bos_token_id")?,
            eos_token_id: token_id(get("eos_token_id"), "eos_token_id")?,
            eos_token_ids: token_ids(get("eos_token_id"), "eos_token_id")?,
            pad_token_id: token_id(get("pad_token_id"), "pad_token_id")?,
            sliding_window,
        };
        if let Some(key) = map
            .keys()
            .find(|k| !seen.contains(&k.as_str()) && !IGNORED_KEYS.contains(&k.as_str()))
        {
            return Err(format!(
                "unsupported field `{key}`: dapt does not implement it, and ignoring it could train a different model"
            ));
        }
        match config.checked_num_params() {
            Some(n) if n <= MAX_PARAMS => {}
            _ => {
                return Err(format!(
                    "the sizes (hidden_size {}, intermediate_size {}, num_hidden_layers {}, heads {} x head_dim {}, vocab_size {}) make more than {MAX_PARAMS} parameters",
                    config.hidden_size,
                    config.intermediate_size,
                    config.num_hidden_layers,
                    config.num_attention_heads,
                    config.head_dim,
                    config.vocab_size
                ))
            }
        }
        Ok(config)
    }

    /// The Hugging Face `config.json` of this model, with its family's `model_type`,
    /// `architectures` and fields (what `transformers` reads for that family).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        });
        let Some(map) = v.as_object_mut() else {
            return v;
        };
        let family_fields = match self.family {
            Family::Llama => serde_json::json!({ "attention_bias": false, "mlp_bias": false }),
            // Qwen's sliding window is off; its window fields are written as transformers does.
            Family::Qwen2 => serde_json::json!({
                "use_sliding_window": false,
                "sliding_window": null,
                "max_window_layers": self.num_hidden_layers,
            }),
            Family::Qwen3 => serde_json::json!({
                "attention_bias": false,
                "use_sliding_window": false,
                "sliding_window": null,
                "max_window_layers": self.num_hidden_layers,
            }),
            Family::Mistral => serde_json::json!({ "sliding_window": self.sliding_window }),
        };
        if let Value::Object(fields) = family_fields {
            map.extend(fields);
        }
        if let Some(id) = self.bos_token_id {
            map.insert("bos_token_id".into(), id.into());
        }
        match (&self.eos_token_ids, self.eos_token_id) {
            (Some(ids), _) => {
                map.insert("eos_token_id".into(), ids.clone().into());
            }
            (None, Some(id)) => {
                map.insert("eos_token_id".into(), id.into());
            }
            (None, None) => {}
        }
        if let Some(id) = self.pad_token_id {
            map.insert("pad_token_id".into(), id.into());
        }
        v
    }

    /// Parameters, embeddings included (the family's biases and q/k norm gains too), or `None`
    /// when the sizes multiply past `u64` (a `config.json` with absurd sizes).
    pub fn checked_num_params(&self) -> Option<u64> {
        let (h, i, l, hd) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_hidden_layers as u64,
            self.head_dim as u64,
        );
        let q = (self.num_attention_heads as u64).checked_mul(hd)?;
        let kv = (self.num_key_value_heads as u64).checked_mul(hd)?;
        let hq = h.checked_mul(q)?;
        let mut per_layer = hq
            .checked_mul(2)?
            .checked_add(h.checked_mul(kv)?.checked_mul(2)?)?
            .checked_add(h.checked_mul(i)?.checked_mul(3)?)?
            .checked_add(h.checked_mul(2)?)?;
        if self.family.qkv_bias() {
            per_layer = per_layer.checked_add(q)?.checked_add(kv.checked_mul(2)?)?;
        }
        if self.family.qk_norm() {
            per_layer = per_layer.checked_add(hd.checked_mul(2)?)?;
        }
        let embed = (self.vocab_size as u64).checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed
            .checked_add(head)?
            .checked_add(l.checked_mul(per_layer)?)?
            .checked_add(h)
    }

    /// Parameters, embeddings included: exactly the values of the weights files. Saturates at
    /// `u64::MAX` for sizes no `config.json` that [`Self::from_json`] accepts can have.
    pub fn num_params(&self) -> u64 {
        self.checked_num_params().unwrap_or(u64::MAX)
    }

    /// RoPE inverse frequencies, as Hugging Face computes them (including `rope_scaling`).
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let old = old as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else if high_freq_factor == low_freq_factor {
                            // Only a wavelength exactly at the one threshold gets here; the
                            // smoothing below would be 0 / 0 (transformers accepts such a
                            // config with a warning).
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The attention window `config.json` asks for: Mistral's `sliding_window` (null is full
/// attention; an absent key is transformers' default, [`MISTRAL_DEFAULT_SLIDING_WINDOW`], as
/// `window_absent` says); Qwen's `use_sliding_window: true` (a window on the layers from
/// `max_window_layers` on) and any `layer_types` entry other than `full_attention` are refused
/// by name. `get` reads a key and marks it as handled.
fn sliding_window<'a>(
    family: Family,
    window_absent: bool,
    get: &mut impl FnMut(&'static str) -> Option<&'a Value>,
) -> std::result::Result<Option<usize>, String> {
    if let Some(types) = get("layer_types") {
        let full = types
            .as_array()
            .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")));
        if !full {
            return Err(format!(
                "`layer_types` is {types}; dapt implements only `full_attention` layers"
            ));
        }
    }
    match family {
        // Llama has no window: a `sliding_window` there is refused as an unknown field.
        Family::Llama => Ok(None),
        Family::Mistral => match get("sliding_window") {
            None if window_absent => Ok(Some(MISTRAL_DEFAULT_SLIDING_WINDOW)),
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&w| w > 0)
                .map(|w| Some(w as usize))
                .ok_or_else(|| {
                    format!("`sliding_window` must be null or a positive integer, got {v}")
                }),
        },
        Family::Qwen2 | Family::Qwen3 => {
            match get("use_sliding_window") {
                None => {}
                Some(Value::Bool(false)) => {}
                Some(v) => {
                    return Err(format!(
                    "`use_sliding_window` is {v}; dapt does not implement Qwen's sliding-window \
                         attention (set it to false to train with full attention, as the released \
                         models do)"
                ))
                }
            }
            // Read by transformers only when `use_sliding_window` is true.
            get("sliding_window");
            get("max_window_layers");
            Ok(None)
        }
    }
}

fn parse_rope_scaling(v: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`rope_scaling` has no `rope_type`: {v}"))?;
    let num = |key: &str| {
        v.get(key)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("`rope_scaling.{key}` is missing or not a positive number"))
    };
    let int = |key: &str| {
        v.get(key)
            .and_then(|n| {
                n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f > 0.0 && *f <= u32::MAX as f64)
                        .map(|f| f as u64)
                })
            })
            .ok_or_else(|| format!("`rope_scaling.{key}` is missing or not a positive integer"))
    };
    // Keys each kind reads; any other key changes the scaling in a way dapt does not implement.
    let (scaling, keys): (RopeScaling, &[&str]) = match kind {
        "default" => (RopeScaling::Linear { factor: 1.0 }, &[]),
        // Hugging Face's linear scaling ignores `original_max_position_embeddings`.
        "linear" => (
            RopeScaling::Linear {
                factor: num("factor")?,
            },
            &["factor", "original_max_position_embeddings"],
        ),
        "llama3" => (
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: int("original_max_position_embeddings")?,
            },
            &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
        ),
        other => {
            return Err(format!(
                "`rope_scaling.rope_type` `{other}` is not supported (linear, llama3)"
            ))
        }
    };
    // `rope_theta` is in transformers 5's `rope_parameters`, read with the other fields.
    let common = ["rope_type", "type", "rope_theta"];
    if let Some(key) = v.as_object().and_then(|m| {
        m.keys()
            .find(|k| !common.contains(&k.as_str()) && !keys.contains(&k.as_str()))
    }) {
        return Err(format!(
            "unsupported field `rope_scaling.{key}` for rope_type `{kind}`: dapt does not implement it"
        ));
    }
    Ok(scaling)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
      "is_llama_config": true, "max_position_embeddings": 8192, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
      "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
      "use_cache": true, "vocab_size": 49152 }"#;

    #[test]
    fn reads_smollm2_and_counts_its_parameters() {
        let c = LlamaConfig::from_json(SMOLLM2).expect("config");
        assert_eq!(
            c,
            LlamaConfig::preset(Preset::Smollm2_135m, 49152).with_ids(0, 0)
        );
        assert_eq!(c.num_params(), 134_515_008);
        let back = LlamaConfig::from_json(&c.to_json().to_string()).expect("round trip");
        assert_eq!(back, c);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let bad = SMOLLM2.replace("\"use_cache\": true", "\"sliding_window\": 4096");
        let err = LlamaConfig::from_json(&bad).unwrap_err();
        assert!(err.contains("`sliding_window`"), "{err}");
        LlamaConfig::from_json(&SMOLLM2.replace("\"silu\"", "\"swish\""))
            .expect("swish is transformers' name for SiLU too");
        let err = LlamaConfig::from_json(&SMOLLM2.replace("\"silu\"", "\"gelu\"")).unwrap_err();
        assert!(err.contains("hidden_act"), "{err}");
        let err = LlamaConfig::from_json(
            &SMOLLM2.replace("\"attention_bias\": false", "\"attention_bias\": true"),
        )
        .unwrap_err();
        assert!(err.contains("attention_bias"), "{err}");
        let err =
            LlamaConfig::from_json(&SMOLLM2.replace("\"hidden_size\": 576,", "")).unwrap_err();
        assert!(err.contains("`hidden_size` is missing"), "{err}");
        let err = LlamaConfig::from_json(&SMOLLM2.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}",
        ))
        .unwrap_err();
        assert!(err.contains("yarn"), "{err}");
    }

    /// Numbers that would make every pass NaN or inf are refused by field, not trained on.
    #[test]
    fn invalid_epsilon_base_and_scaling_factors_are_named() {
        let llama3 = |factor: &str, low: &str, high: &str| {
            SMOLLM2.replace(
                "\"rope_scaling\": null",
                &format!("\"rope_scaling\": {{\"rope_type\": \"llama3\", \"factor\": {factor}, \"low_freq_factor\": {low}, \"high_freq_factor\": {high}, \"original_max_position_embeddings\": 8192}}"),
            )
        };
        for (bad, field) in [
            (SMOLLM2.replace("1e-05", "-1"), "`rms_norm_eps`"),
            (SMOLLM2.replace("1e-05", "0"), "`rms_norm_eps`"),
            (
                SMOLLM2.replace("\"rope_theta\": 100000", "\"rope_theta\": 0"),
                "`rope_theta`",
            ),
            (
                SMOLLM2.replace("\"rope_theta\": 100000", "\"rope_theta\": -5"),
                "`rope_theta`",
            ),
            (
                SMOLLM2.replace(
                    "\"rope_scaling\": null",
                    "\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 0}",
                ),
                "`rope_scaling.factor`",
            ),
            (llama3("8", "-1", "4"), "`rope_scaling.low_freq_factor`"),
            (llama3("8", "1", "0"), "`rope_scaling.high_freq_factor`"),
        ] {
            let err = LlamaConfig::from_json(&bad).expect_err(field);
            assert!(err.contains(field), "{field}: {err}");
        }
        LlamaConfig::from_json(&llama3("8", "1", "4")).expect("Llama 3.1's scaling");
        // Equal or swapped thresholds: transformers loads them (with a warning), and so does
        // dapt, with finite frequencies.
        for (low, high) in [("4", "4"), ("4", "1")] {
            let c = LlamaConfig::from_json(&llama3("8", low, high)).expect("loads");
            assert!(c.inv_freq().iter().all(|f| f.is_finite()), "{low} {high}");
        }
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_scales_low_frequencies() {
        let mut c = LlamaConfig::preset(Preset::Llama3_8b, 128_256);
        let plain = c.inv_freq();
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }

    /// transformers 5 reads RoPE's base from the dict that gives the rope type; dapt read only
    /// the top-level key (an audit: `rope_parameters.rope_theta` 500 under a top-level 10000,
    /// and `rope_scaling.rope_theta` 500 alone, both trained with base 10000, exit 0).
    #[test]
    fn the_rope_base_is_read_where_transformers_5_reads_it_and_a_conflict_is_refused() {
        let no_top = SMOLLM2.replace("\"rope_theta\": 100000", "\"dtype\": \"bfloat16\"");
        let scaling = no_top.replace(
            "\"rope_scaling\": null",
            r#""rope_scaling": {"rope_type": "linear", "factor": 2, "rope_theta": 500}"#,
        );
        let c = LlamaConfig::from_json(&scaling).expect("config");
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let parameters = no_top.replace(
            "\"rope_scaling\": null",
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 500}"#,
        );
        assert_eq!(
            LlamaConfig::from_json(&parameters)
                .expect("config")
                .rope_theta,
            500.0
        );
        let same = SMOLLM2.replace(
            "\"rope_scaling\": null",
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 100000}"#,
        );
        assert_eq!(
            LlamaConfig::from_json(&same).expect("config").rope_theta,
            100_000.0
        );
        let both = SMOLLM2.replace(
            "\"rope_scaling\": null",
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 500}"#,
        );
        let err = LlamaConfig::from_json(&both).unwrap_err();
        assert!(
            err.contains("`rope_theta` (100000)")
                && err.contains("`rope_parameters.rope_theta` (500)"),
            "{err}"
        );
    }

    /// An export writes back the end-token list, the padding id and the family's context length
    /// as transformers reads them (an audit: `[1, 2, 3]` became `1`, `pad_token_id` was dropped,
    /// 4294967298 wrapped to 2, a Qwen2 config without the key was exported with 2048).
    #[test]
    fn token_ids_and_the_context_length_survive_an_export_as_given() {
        let listed = SMOLLM2.replace(
            "\"eos_token_id\": 0",
            "\"eos_token_id\": [128001, 128008, 128009], \"pad_token_id\": 5",
        );
        let c = LlamaConfig::from_json(&listed).expect("config");
        assert_eq!(c.eos_token_id, Some(128_001));
        let out = c.to_json();
        assert_eq!(
            out["eos_token_id"],
            serde_json::json!([128001, 128008, 128009])
        );
        assert_eq!(out["pad_token_id"], 5);
        let again = LlamaConfig::from_json(&out.to_string()).expect("export reads back");
        assert_eq!(again.eos_token_ids, c.eos_token_ids);
        let single = LlamaConfig::from_json(SMOLLM2).expect("config");
        assert_eq!(single.to_json()["eos_token_id"], 0);
        for none in ["-1", "null"] {
            let json = SMOLLM2.replace("\"eos_token_id\": 0", &format!("\"pad_token_id\": {none}"));
            assert_eq!(
                LlamaConfig::from_json(&json).expect("config").pad_token_id,
                None
            );
        }
        for bad in ["4294967298", "2.5", "[2, 4294967298]"] {
            let json = SMOLLM2.replace("\"eos_token_id\": 0", &format!("\"eos_token_id\": {bad}"));
            let err = LlamaConfig::from_json(&json).unwrap_err();
            assert!(
                err.contains("`eos_token_id` must be a token id"),
                "{bad}: {err}"
            );
        }
        let qwen2 = serde_json::json!({"model_type": "qwen2", "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "num_hidden_layers": 2, "vocab_size": 256, "tie_word_embeddings": true});
        let c = LlamaConfig::from_json(&qwen2.to_string()).expect("config");
        assert_eq!(c.max_position_embeddings, 32_768);
        assert_eq!(c.to_json()["max_position_embeddings"], 32_768);
    }

    #[test]
    fn a_head_dim_of_zero_is_refused_not_a_panic_later() {
        // (Mistral floors `hidden / heads`, as transformers' MistralConfig does.)
        let json = serde_json::json!({"model_type": "mistral", "hidden_size": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 8,
            "num_hidden_layers": 1, "vocab_size": 32});
        let err = LlamaConfig::from_json(&json.to_string()).expect_err("refused");
        assert!(
            err.contains("head_dim") && err.contains("hidden_size 2"),
            "{err}"
        );
    }

    /// transformers' LlamaConfig refuses a hidden size the heads do not divide, with a
    /// `head_dim` or without (5.24's `validate_architecture`); dapt took `40 / 6 = 6`, or the
    /// `head_dim` given, trained and exported a config transformers cannot load (two audits).
    /// Mistral and Qwen2 floor it, as transformers does.
    #[test]
    fn a_llama_hidden_size_the_heads_do_not_divide_is_refused() {
        let config = |model_type: &str, head_dim: Option<u64>| {
            let mut json = serde_json::json!({"model_type": model_type, "hidden_size": 40,
                "num_attention_heads": 6, "num_key_value_heads": 6, "intermediate_size": 64,
                "num_hidden_layers": 1, "vocab_size": 32});
            if let Some(d) = head_dim {
                json["head_dim"] = d.into();
            }
            LlamaConfig::from_json(&json.to_string())
        };
        let err = config("llama", None).expect_err("refused");
        assert!(
            err.contains("`hidden_size` (40)") && err.contains("`num_attention_heads` (6)"),
            "{err}"
        );
        let err = config("llama", Some(8)).expect_err("refused with a head_dim too");
        assert!(err.contains("even with a `head_dim`"), "{err}");
        assert_eq!(config("mistral", None).expect("floored").head_dim, 6);
        assert_eq!(config("qwen2", None).expect("floored").head_dim, 6);
    }

    /// Hugging Face reads these fields as integers; a float (`8192.0`) in an exported
    /// config.json is a different config to strict readers.
    #[test]
    fn exported_integer_fields_are_integers() {
        let mut c = LlamaConfig::preset(Preset::Llama3_8b, 128_256).with_ids(1, 2);
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let json = c.to_json();
        for key in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
        ] {
            assert!(json[key].is_u64(), "{key}: {}", json[key]);
        }
        let scaling = &json["rope_scaling"];
        assert!(
            scaling["original_max_position_embeddings"].is_u64(),
            "{scaling}"
        );
        assert_eq!(
            LlamaConfig::from_json(&json.to_string()).expect("round trip"),
            c
        );
        // An older export's `8192.0` still reads; an unknown scaling field does not.
        let text = json.to_string().replace(
            "\"original_max_position_embeddings\":8192",
            "\"original_max_position_embeddings\":8192.0",
        );
        assert_eq!(LlamaConfig::from_json(&text).expect("integral float"), c);
        let text = json
            .to_string()
            .replace("\"factor\":8.0", "\"factor\":8.0,\"beta_fast\":32");
        let err = LlamaConfig::from_json(&text).unwrap_err();
        assert!(err.contains("`rope_scaling.beta_fast`"), "{err}");
        let err = LlamaConfig::from_json(
            &SMOLLM2.replace("\"attention_dropout\": 0.0", "\"attention_dropout\": 0.1"),
        )
        .unwrap_err();
        assert!(err.contains("attention_dropout"), "{err}");
    }

    /// Configs that transformers 5.24 itself saved for tiny random models of each family, with
    /// its own parameter count (`model.num_parameters()`, tied weights once), written by
    /// `tests/reference/check_ref.py --fixtures`: dapt reads each as its family and counts
    /// exactly the same parameters (what `dapt plan` prints).
    #[test]
    fn reads_transformers_configs_of_each_family_and_counts_their_parameters() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf-configs");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            let fixture: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            let config = LlamaConfig::from_json(&fixture["config"].to_string())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                config.family.model_type(),
                fixture["config"]["model_type"],
                "{}",
                path.display()
            );
            assert_eq!(
                Some(config.num_params()),
                fixture["num_parameters"].as_u64(),
                "{}",
                path.display()
            );
            // Written back, it reads as the same model, with the family's own fields.
            let json = config.to_json();
            assert_eq!(json["architectures"], fixture["config"]["architectures"]);
            assert_eq!(
                LlamaConfig::from_json(&json.to_string()).expect("round trip"),
                config
            );
            seen.push(config.family);
        }
        for family in [Family::Qwen2, Family::Qwen3, Family::Mistral] {
            assert!(seen.contains(&family), "no fixture of {family:?}");
        }
    }

    #[test]
    fn family_fields_that_change_the_function_are_implemented_or_refused_by_name() {
        let qwen2 = SMOLLM2
            .replace("\"llama\"", "\"qwen2\"")
            .replace("\"attention_bias\": false, ", "")
            .replace("\"mlp_bias\": false,", "")
            .replace("\"is_llama_config\": true,", "\"use_sliding_window\": false, \"sliding_window\": 4096, \"max_window_layers\": 21,");
        let c = LlamaConfig::from_json(&qwen2).expect("qwen2");
        assert_eq!((c.family, c.sliding_window), (Family::Qwen2, None));
        // Q/K/V biases: 576 + 2 * 192 per layer on top of the Llama count.
        assert_eq!(c.num_params(), 134_515_008 + 30 * (576 + 2 * 192));
        let err = LlamaConfig::from_json(&qwen2.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": true",
        ))
        .unwrap_err();
        assert!(err.contains("`use_sliding_window`"), "{err}");
        let err = LlamaConfig::from_json(&qwen2.replace(
            "\"max_window_layers\": 21,",
            "\"layer_types\": [\"sliding_attention\"],",
        ))
        .unwrap_err();
        assert!(err.contains("`layer_types`"), "{err}");

        let mistral = SMOLLM2
            .replace("\"llama\"", "\"mistral\"")
            .replace("\"attention_bias\": false, ", "")
            .replace("\"is_llama_config\": true,", "\"sliding_window\": 4096,");
        let c = LlamaConfig::from_json(&mistral).expect("mistral");
        assert_eq!((c.family, c.sliding_window), (Family::Mistral, Some(4096)));
        assert_eq!(c.to_json()["sliding_window"], 4096);
        let c = LlamaConfig::from_json(&mistral.replace("4096", "null")).expect("null window");
        assert_eq!(c.sliding_window, None);
        let err = LlamaConfig::from_json(&mistral.replace("4096", "-1")).unwrap_err();
        assert!(err.contains("`sliding_window`"), "{err}");

        let qwen3 = SMOLLM2
            .replace("\"llama\"", "\"qwen3\"")
            .replace("\"attention_bias\": false", "\"attention_bias\": true")
            .replace("\"is_llama_config\": true,", "\"head_dim\": 128,");
        let err = LlamaConfig::from_json(&qwen3).unwrap_err();
        assert!(err.contains("`attention_bias`"), "{err}");
        let c = LlamaConfig::from_json(
            &qwen3.replace("\"attention_bias\": true", "\"attention_bias\": false"),
        )
        .expect("qwen3");
        // head_dim is its own; q/k norms add 2 * head_dim per layer.
        assert_eq!((c.family, c.head_dim), (Family::Qwen3, 128));
        let err = LlamaConfig::from_json(&SMOLLM2.replace("\"llama\"", "\"gemma2\"")).unwrap_err();
        assert!(
            err.contains("`model_type`") && err.contains("gemma2"),
            "{err}"
        );
    }

    /// An absent key is transformers' default for the family, which is not always dapt's
    /// Llama default: MistralConfig's window 4096 and 8 KV heads, Qwen2/Qwen3Config's 32 KV
    /// heads and Qwen3's `head_dim` 128. An explicit null is no window / the attention heads.
    #[test]
    fn absent_keys_take_the_family_defaults_of_transformers() {
        // 32 heads of 64, so that 8 and 32 KV heads both divide them.
        let base = SMOLLM2
            .replace("\"num_attention_heads\": 9", "\"num_attention_heads\": 32")
            .replace("\"hidden_size\": 576", "\"hidden_size\": 2048")
            .replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4")
            .replace("\"attention_bias\": false, ", "")
            .replace("\"mlp_bias\": false,", "")
            .replace("\"is_llama_config\": true,", "");
        let without_kv = base.replace("\"num_key_value_heads\": 4,", "");
        let null_kv = base.replace(
            "\"num_key_value_heads\": 4,",
            "\"num_key_value_heads\": null,",
        );
        let read = |text: &str, family: &str| {
            LlamaConfig::from_json(&text.replace("\"llama\"", &format!("\"{family}\"")))
                .unwrap_or_else(|e| panic!("{family}: {e}"))
        };
        let mistral = read(&without_kv, "mistral");
        assert_eq!(
            (mistral.sliding_window, mistral.num_key_value_heads),
            (Some(4096), 8)
        );
        assert_eq!(mistral.to_json()["sliding_window"], 4096);
        let mistral = read(
            &null_kv.replace("\"use_cache\": true", "\"sliding_window\": null"),
            "mistral",
        );
        assert_eq!(
            (mistral.sliding_window, mistral.num_key_value_heads),
            (None, 32)
        );
        for family in ["qwen2", "qwen3"] {
            assert_eq!(
                read(&without_kv, family).num_key_value_heads,
                32,
                "{family}"
            );
            assert_eq!(read(&null_kv, family).num_key_value_heads, 32, "{family}");
        }
        assert_eq!(read(&base, "qwen2").head_dim, 64);
        assert_eq!(read(&base, "qwen3").head_dim, 128);
        assert_eq!(read(&base, "llama").num_key_value_heads, 4);
        assert_eq!(read(&without_kv, "llama").num_key_value_heads, 32);
        let err = LlamaConfig::from_json(
            &base
                .replace("\"llama\"", "\"qwen3\"")
                .replace("\"use_cache\": true", "\"head_dim\": null"),
        )
        .unwrap_err();
        assert!(err.contains("`head_dim`"), "{err}");
    }

    impl LlamaConfig {
        fn with_ids(mut self, bos: u32, eos: u32) -> Self {
            self.bos_token_id = Some(bos);
            self.eos_token_id = Some(eos);
            self.max_position_embeddings = 8192;
            self
        }
    }
}
