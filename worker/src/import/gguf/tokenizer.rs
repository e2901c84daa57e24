//! The tokenizer rebuilt from `tokenizer.ggml.*`.

use super::*;

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub(super) const TOKEN_TYPE_CONTROL: i64 = 3;
pub(super) const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The split regex of Qwen2's (and Qwen3's) `tokenizer.json` pre-tokenizer.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer_config.json` of the rebuilt tokenizer: `PreTrainedTokenizerFast` (the class
/// that takes `tokenizer.json` as it is, template included), the BOS, EOS, padding and unknown
/// tokens the file names by id, its `add_bos_token`/`add_eos_token` flags and its
/// `tokenizer.chat_template`. Without it, transformers 4 loaded the folder by its `config.json`
/// (`model_type: llama`) as `LlamaTokenizerFast`, which put a `<s>` the vocabulary lacks before
/// every sequence, and the chat template and token names were lost (an audit).
pub(super) fn tokenizer_config(
    file: &GgufFile,
    tokenizer: &Tokenizer,
) -> Result<serde_json::Value> {
    let mut config = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
    ] {
        let Some(id) = file.optional_u64(key)? else {
            continue;
        };
        let token = u32::try_from(id)
            .ok()
            .and_then(|id| tokenizer.id_to_token(id))
            .ok_or_else(|| GgufError::Tokenizer {
                key: key.into(),
                reason: format!("id {id} is not a token of tokenizer.ggml.tokens"),
            })?;
        config[field] = token.into();
    }
    for (key, field) in [
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ] {
        config[field] = file.optional_bool(key)?.unwrap_or(false).into();
    }
    if let Some(template) = file.optional_str("tokenizer.chat_template")? {
        config["chat_template"] = template.into();
    }
    Ok(config)
}

/// Rebuilds a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) the way its
/// `tokenizer.json` would have described it.
pub(super) fn build_tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    const MODEL_KEY: &str = "tokenizer.ggml.model";
    const TOKENS_KEY: &str = "tokenizer.ggml.tokens";
    const MERGES_KEY: &str = "tokenizer.ggml.merges";
    const TYPES_KEY: &str = "tokenizer.ggml.token_type";
    const PRE_KEY: &str = "tokenizer.ggml.pre";

    let model = file.require_str(MODEL_KEY)?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedModel {
            key: MODEL_KEY.into(),
            value: model.into(),
            reason: "only byte-level BPE (gpt2) tokenizers are rebuilt".into(),
        });
    }
    let element_str = |key: &str, i: usize, v: &Value| -> Result<String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| wrong_type(&format!("{key}[{i}]"), "a string", v))
    };
    let tokens = file
        .require_array(TOKENS_KEY)?
        .iter()
        .enumerate()
        .map(|(i, v)| element_str(TOKENS_KEY, i, v))
        .collect::<Result<Vec<_>>>()?;
    let token_types = file
        .optional_array(TYPES_KEY)?
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_i64()
                .ok_or_else(|| wrong_type(&format!("{TYPES_KEY}[{i}]"), "an integer", v))
        })
        .collect::<Result<Vec<_>>>()?;
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(GgufError::Tokenizer {
            key: TYPES_KEY.into(),
            reason: format!(
                "it has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            ),
        });
    }
    let merges = file
        .optional_array(MERGES_KEY)?
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let merge = element_str(MERGES_KEY, i, v)?;
            // Byte-level tokens never contain a real space (it is spelled "Ġ"), so the single
            // space in "a b" is an unambiguous separator.
            match merge.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_owned(), b.to_owned()))
                }
                _ => Err(GgufError::Tokenizer {
                    key: format!("{MERGES_KEY}[{i}]"),
                    reason: format!("{merge:?} is not two tokens separated by one space"),
                }),
            }
        })
        .collect::<Result<Vec<_>>>()?;

    // Ids are list positions. Should a vocabulary list a string twice, the later id wins, as
    // it would in a tokenizer.json vocab object.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| GgufError::Tokenizer {
            key: MERGES_KEY.into(),
            reason: e.to_string(),
        })?;
    let mut tokenizer = Tokenizer::new(bpe);

    let byte_level = ByteLevel::new(false, true, true);
    // Without a `pre` (files converted before May 2024) or with `default`, llama.cpp splits
    // text by its own default sequence, which is neither GPT-2's nor the model's own (an early
    // Llama 3's or Qwen1.5's): taken for GPT-2's, a sixth of texts got other ids, silently (an
    // audit). Refused, as the other pre-tokenizers dapt does not rebuild.
    let pre = file.optional_str(PRE_KEY)?.unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // llama.cpp writes `gpt-2` (GPT-2, phi-2); `gpt2` is accepted as dapt did before.
        "gpt-2" | "gpt2" => byte_level.into(),
        // SmolLM's tokenizer.json splits every digit off before the byte-level split.
        "smollm" => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        // Qwen2's and Qwen3's tokenizer.json: NFC, then this split (isolated pieces), then the
        // byte-level mapping without its own regex.
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| GgufError::Tokenizer {
                key: PRE_KEY.into(),
                reason: e.to_string(),
            })?;
            tokenizer
                .with_normalizer(Some(NFC))
                .map_err(|e| GgufError::Tokenizer {
                    key: PRE_KEY.into(),
                    reason: e.to_string(),
                })?;
            PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into()
        }
        "default" => {
            return Err(GgufError::UnsupportedModel {
                key: PRE_KEY.into(),
                value: "default (or absent)".into(),
                reason: "llama.cpp then splits text by its default pre-tokenizer, which is not \
                         the model's own (a file converted before May 2024): import the \
                         model's Hugging Face folder instead, or a GGUF converted since"
                    .into(),
            })
        }
        other => {
            return Err(GgufError::UnsupportedModel {
                key: PRE_KEY.into(),
                value: other.into(),
                reason: "dapt rebuilds only the gpt-2, smollm and qwen2 pre-tokenizers".into(),
            })
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens are special (skipped when decoding with skip_special_tokens); user-defined
    // ones are ordinary added tokens. Both must be added so that the text "<|im_start|>" maps to
    // its single id instead of being split by BPE.
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (token, &ty) in tokens.iter().zip(&token_types) {
        match ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(token.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => user_defined.push(AddedToken::from(token.clone(), false)),
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| GgufError::Tokenizer {
            key: TYPES_KEY.into(),
            reason: e.to_string(),
        })?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| GgufError::Tokenizer {
            key: TYPES_KEY.into(),
            reason: e.to_string(),
        })?;

    let byte_level_post: PostProcessorWrapper = ByteLevel::new(false, false, true).into();
    // llama.cpp prepends BOS and appends EOS when the file asks; HF expresses that with a
    // template after the byte-level offset fix-up, as Llama 3's tokenizer.json does.
    let add = |key: &str| -> Result<bool> { Ok(file.optional_bool(key)? == Some(true)) };
    let (add_bos, add_eos) = (
        add("tokenizer.ggml.add_bos_token")?,
        add("tokenizer.ggml.add_eos_token")?,
    );
    let special = |id_key: &str| -> Result<(String, u32)> {
        let id = file.require_u64(id_key)?;
        let token = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .ok_or_else(|| GgufError::Tokenizer {
                key: id_key.into(),
                reason: format!("id {id} is not in {TOKENS_KEY}"),
            })?;
        Ok((token.clone(), id as u32))
    };
    let post = if add_bos || add_eos {
        let bos = add_bos
            .then(|| special("tokenizer.ggml.bos_token_id"))
            .transpose()?;
        let eos = add_eos
            .then(|| special("tokenizer.ggml.eos_token_id"))
            .transpose()?;
        let key = if add_bos {
            "tokenizer.ggml.add_bos_token"
        } else {
            "tokenizer.ggml.add_eos_token"
        };
        let template_err = |e: String| GgufError::Tokenizer {
            key: key.into(),
            reason: format!("cannot build the template: {e}"),
        };
        let side = |seq: &str, type_id: u32| -> Vec<String> {
            let mut out = Vec::new();
            if let Some((b, _)) = &bos {
                out.push(format!("{b}:{type_id}"));
            }
            out.push(format!("${seq}:{type_id}"));
            if let Some((e, _)) = &eos {
                out.push(format!("{e}:{type_id}"));
            }
            out
        };
        let mut specials: Vec<(String, u32)> = bos.iter().chain(eos.iter()).cloned().collect();
        specials.dedup();
        let template = TemplateProcessing::builder()
            .try_single(side("A", 0))
            .and_then(|b| b.try_pair([side("A", 0), side("B", 1)].concat()))
            .map_err(template_err)?
            .special_tokens(specials)
            .build()
            .map_err(|e| template_err(e.to_string()))?;
        ProcessorSequence::new(vec![byte_level_post, template.into()]).into()
    } else {
        byte_level_post
    };
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}
