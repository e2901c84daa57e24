//! Tests of the `{arch}.*` metadata a conversion reads: RoPE scaling mapped or refused, keys
//! dapt does not know refused, and non-finite floats named.

use super::tests::{open_writer, tiny_llama, tiny_qwen, TestResult, Writer};
use super::*;

/// The error message of converting `w`, or "" when it converts.
fn refusal(w: &Writer) -> std::result::Result<String, super::tests::BoxError> {
    let (_tmp, gguf) = open_writer(w)?;
    Ok(to_hf(&gguf)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default())
}

/// llama.cpp scales positions by 1 / `rope.scaling.factor` (or the older `rope.scale_linear`)
/// when the type is absent or `linear`: Hugging Face's linear `rope_scaling`. A factor with
/// type `none` (which llama.cpp then ignores), an attention factor or another type is refused
/// by key, never dropped.
#[test]
fn rope_scaling_is_converted_to_linear_or_refused_by_key() -> TestResult {
    for (extra, factor) in [
        (
            vec![("llama.rope.scaling.factor", Value::F32(4.0))],
            Some(4.0),
        ),
        (
            vec![("llama.rope.scale_linear", Value::F32(2.0))],
            Some(2.0),
        ),
        (
            vec![
                ("llama.rope.scaling.type", Value::String("linear".into())),
                ("llama.rope.scaling.factor", Value::F32(8.0)),
                ("llama.rope.scaling.attn_factor", Value::F32(1.0)),
                (
                    "llama.rope.scaling.original_context_length",
                    Value::U32(512),
                ),
            ],
            Some(8.0),
        ),
        (vec![("llama.rope.scaling.factor", Value::F32(1.0))], None),
        (
            vec![("llama.rope.scaling.type", Value::String("none".into()))],
            None,
        ),
    ] {
        let mut w = tiny_llama(None);
        for (k, v) in extra {
            w = w.kv(k, v);
        }
        let (_tmp, gguf) = open_writer(&w)?;
        let hf = to_hf(&gguf)?;
        let expected = match factor {
            Some(f) => json!({"rope_type": "linear", "factor": f}),
            None => serde_json::Value::Null,
        };
        assert_eq!(hf.config["rope_scaling"], expected, "{factor:?}");
        let config = crate::model::LlamaConfig::from_json(&hf.config.to_string())?;
        assert_eq!(
            config.rope_scaling,
            factor.map(|factor| dapt_proto::model::RopeScaling::Linear { factor })
        );
    }
    for (extra, key) in [
        (
            vec![
                ("llama.rope.scaling.type", Value::String("none".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
            ],
            "llama.rope.scaling.factor",
        ),
        (
            vec![("llama.rope.scaling.attn_factor", Value::F32(1.5))],
            "llama.rope.scaling.attn_factor",
        ),
        (
            vec![
                ("llama.rope.scaling.type", Value::String("yarn".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
            ],
            "llama.rope.scaling.type",
        ),
        (
            vec![("llama.rope.scaling.factor", Value::F32(-2.0))],
            "llama.rope.scaling.factor",
        ),
    ] {
        let mut w = tiny_llama(None);
        for (k, v) in extra {
            w = w.kv(k, v);
        }
        let msg = refusal(&w)?;
        assert!(
            msg.contains(&format!("metadata key {key} ")),
            "{key}: {msg}"
        );
    }
    Ok(())
}

/// An `{arch}.*` key the converter does not know could change the function (a logit scale, a
/// parallel residual, an ALiBi bias): refused by name. The keys real llama/qwen GGUFs carry are
/// read or checked.
#[test]
fn unknown_architecture_keys_are_refused_by_key() -> TestResult {
    for (key, value) in [
        ("llama.logit_scale", Value::F32(0.5)),
        ("llama.use_parallel_residual", Value::Bool(true)),
        ("llama.attention.max_alibi_bias", Value::F32(8.0)),
        ("llama.attention.clamp_kqv", Value::F32(8.0)),
        ("llama.residual_scale", Value::F32(0.2)),
        ("llama.expert_used_count", Value::U32(2)),
        ("llama.vocab_size", Value::U32(12)),
    ] {
        let msg = refusal(&tiny_llama(None).kv(key, value))?;
        assert!(
            msg.contains(&format!("metadata key {key} ")),
            "{key}: {msg}"
        );
    }
    // What real llama.cpp conversions write, with values that do not change the function.
    let w = tiny_llama(None)
        .kv("llama.vocab_size", Value::U32(11))
        .kv("llama.attention.key_length", Value::U32(4))
        .kv("llama.attention.value_length", Value::U32(4))
        .kv("llama.expert_count", Value::U32(0))
        .kv("llama.expert_used_count", Value::U32(0))
        .kv("llama.rope.scaling.finetuned", Value::Bool(false))
        .kv("general.name", Value::String("tiny".into()));
    assert_eq!(refusal(&w)?, "");
    for arch in ["qwen2", "qwen3"] {
        assert_eq!(refusal(&tiny_qwen(arch))?, "", "{arch}");
        let key = format!("{arch}.attention.sliding_window");
        let msg = refusal(&tiny_qwen(arch).kv(&key, Value::U32(4096)))?;
        assert!(msg.contains(&format!("metadata key {key} ")), "{msg}");
    }
    Ok(())
}

/// A NaN or infinite float in the metadata is named, never read as a default (serde_json
/// writes NaN as null, which config.json then reads as "absent").
#[test]
fn non_finite_float_metadata_is_named() -> TestResult {
    for (key, value) in [
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(f32::NAN),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F64(f64::NAN),
        ),
        ("llama.rope.freq_base", Value::F32(f32::INFINITY)),
        ("llama.rope.scaling.factor", Value::F32(f32::NAN)),
    ] {
        let mut w = tiny_llama(Some(key));
        w = w.kv(key, value);
        let msg = refusal(&w)?;
        assert!(
            msg.contains(&format!("metadata key {key} holds")) && msg.contains("finite"),
            "{key}: {msg}"
        );
    }
    Ok(())
}
