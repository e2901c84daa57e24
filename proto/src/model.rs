//! The shape of a Llama-family decoder (shared: the worker builds it, the coordinator plans with it), read from (and written back as) a Hugging Face
//! `config.json`.
//!
//! Fields that change the math and that dapt does not implement are refused by name rather than
//! ignored: training a model with the wrong architecture would silently waste a GPU budget.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::Preset;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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
    pub eos_token_id: Option<u32>,
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
    "pad_token_id",
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

impl LlamaConfig {
    pub fn preset(preset: Preset, vocab_size: usize) -> Self {
        let base = |hidden, inter, layers, heads, kv, tie, theta| LlamaConfig {
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
        let f64_of = |v: Option<&Value>, key: &str| -> std::result::Result<Option<f64>, String> {
            v.map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("`{key}` must be a number, got {v}"))
            })
            .transpose()
        };

        if let Some(arch) = get("model_type").and_then(Value::as_str) {
            if arch != "llama" {
                return Err(format!(
                    "`model_type` is `{arch}`; dapt trains `llama` models"
                ));
            }
        }
        if let Some(act) = get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(format!(
                    "`hidden_act` is {act}; dapt implements `silu` (SwiGLU)"
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
                        "`{key}` is {v}; dapt implements Llama without biases"
                    ));
                }
            }
        }
        let hidden = required(usize_of(get("hidden_size"), "hidden_size")?, "hidden_size")?;
        let heads = required(
            usize_of(get("num_attention_heads"), "num_attention_heads")?,
            "num_attention_heads",
        )?;
        let kv = usize_of(get("num_key_value_heads"), "num_key_value_heads")?.unwrap_or(heads);
        if heads % kv != 0 {
            return Err(format!(
                "`num_key_value_heads` ({kv}) must divide `num_attention_heads` ({heads})"
            ));
        }
        let head_dim = usize_of(get("head_dim"), "head_dim")?.unwrap_or(hidden / heads);
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
        let rope_theta = match get("rope_theta") {
            Some(v) => Some(v),
            None => rope_parameters.and_then(|p| p.get("rope_theta")),
        };
        let token_id = |v: Option<&Value>, key: &str| -> std::result::Result<Option<u32>, String> {
            match v {
                None => Ok(None),
                Some(Value::Number(n)) => Ok(n.as_u64().map(|n| n as u32)),
                // Some configs list several end tokens; the first is the document end.
                Some(Value::Array(a)) => Ok(a.first().and_then(Value::as_u64).map(|n| n as u32)),
                Some(other) => Err(format!("`{key}` must be a token id, got {other}")),
            }
        };
        let config = LlamaConfig {
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
            rms_norm_eps: f64_of(get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f64_of(rope_theta, "rope_theta")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: usize_of(
                get("max_position_embeddings"),
                "max_position_embeddings",
            )?
            .unwrap_or(2048),
            tie_word_embeddings: match get("tie_word_embeddings") {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    format!("`tie_word_embeddings` must be true or false, got {v}")
                })?,
            },
            bos_token_id: token_id(get("bos_token_id"), "bos_token_id")?,
            eos_token_id: token_id(get("eos_token_id"), "eos_token_id")?,
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

    /// The Hugging Face `config.json` of this model.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
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
            "torch_dtype": "float32",
        });
        if let (Some(map), Some(id)) = (v.as_object_mut(), self.bos_token_id) {
            map.insert("bos_token_id".into(), id.into());
        }
        if let (Some(map), Some(id)) = (v.as_object_mut(), self.eos_token_id) {
            map.insert("eos_token_id".into(), id.into());
        }
        v
    }

    /// Parameters, embeddings included, or `None` when the sizes multiply past `u64` (a
    /// `config.json` with absurd sizes).
    pub fn checked_num_params(&self) -> Option<u64> {
        let (h, i, l) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_hidden_layers as u64,
        );
        let q = (self.num_attention_heads as u64).checked_mul(self.head_dim as u64)?;
        let kv = (self.num_key_value_heads as u64).checked_mul(self.head_dim as u64)?;
        let hq = h.checked_mul(q)?;
        let per_layer = hq
            .checked_mul(2)?
            .checked_add(h.checked_mul(kv)?.checked_mul(2)?)?
            .checked_add(h.checked_mul(i)?.checked_mul(3)?)?
            .checked_add(h.checked_mul(2)?)?;
        let embed = (self.vocab_size as u64).checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed
            .checked_add(head)?
            .checked_add(l.checked_mul(per_layer)?)?
            .checked_add(h)
    }

    /// Parameters, embeddings included.
    pub fn num_params(&self) -> u64 {
        let (h, i, l) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_hidden_layers as u64,
        );
        let (q, kv) = (
            (self.num_attention_heads * self.head_dim) as u64,
            (self.num_key_value_heads * self.head_dim) as u64,
        );
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + l * per_layer + h
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

fn parse_rope_scaling(v: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`rope_scaling` has no `rope_type`: {v}"))?;
    let num = |key: &str| {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("`rope_scaling.{key}` is missing or not a number"))
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

    impl LlamaConfig {
        fn with_ids(mut self, bos: u32, eos: u32) -> Self {
            self.bos_token_id = Some(bos);
            self.eos_token_id = Some(eos);
            self.max_position_embeddings = 8192;
            self
        }
    }
}
