//! The model's parameters as one flat f32 buffer with a fixed, named layout.
//!
//! The flat buffer is the seam between the model and everything around it: the optimizer,
//! gradient all-reduce (buckets are ranges of it), checkpoints and import/export all work on
//! `(layout, &[f32])`, in the Hugging Face names and shapes, in one fixed order.

use dapt_proto::model::LlamaConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A projection matrix: weight decay applies.
    Matrix,
    /// Token embedding or output head: weight decay only when the job asks for it.
    Embedding,
    /// An RMSNorm gain: never decayed, initialised to one.
    Norm,
    /// A projection's bias (Qwen2's q, k and v): never decayed, initialised to zero.
    Bias,
}

impl ParamKind {
    /// Whether AdamW's decoupled weight decay applies: to matrices always, to embeddings when
    /// `optimizer.decay_embeddings` says so, never to norm gains or biases.
    pub fn decays(self, decay_embeddings: bool) -> bool {
        match self {
            ParamKind::Matrix => true,
            ParamKind::Embedding => decay_embeddings,
            ParamKind::Norm | ParamKind::Bias => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Hugging Face shape (a linear layer is `[out, in]`).
    pub shape: Vec<usize>,
    /// Start in the flat buffer.
    pub offset: usize,
    pub kind: ParamKind,
}

impl ParamInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    pub params: Vec<ParamInfo>,
    pub total: usize,
}

impl ParamLayout {
    /// Embedding, then per layer: input norm, q, (q bias), k, (k bias), v, (v bias), (q norm,
    /// k norm), o, post-attention norm, gate, up, down; then the final norm and (untied) the
    /// output head. The parenthesised tensors are the family's ([`Family::qkv_bias`],
    /// [`Family::qk_norm`]); `Llama::from_params` takes its tensors in this order.
    ///
    /// [`Family::qkv_bias`]: dapt_proto::model::Family::qkv_bias
    /// [`Family::qk_norm`]: dapt_proto::model::Family::qk_norm
    pub fn llama(c: &LlamaConfig) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let (bias, qk_norm) = (c.family.qkv_bias(), c.family.qk_norm());
        let mut entries: Vec<(String, Vec<usize>, ParamKind)> = vec![(
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, h],
            ParamKind::Embedding,
        )];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            entries.push((
                format!("{p}.input_layernorm.weight"),
                vec![h],
                ParamKind::Norm,
            ));
            for (name, rows) in [("q", q), ("k", kv), ("v", kv)] {
                let proj = format!("{p}.self_attn.{name}_proj");
                entries.push((format!("{proj}.weight"), vec![rows, h], ParamKind::Matrix));
                if bias {
                    entries.push((format!("{proj}.bias"), vec![rows], ParamKind::Bias));
                }
            }
            if qk_norm {
                for name in ["q_norm", "k_norm"] {
                    entries.push((
                        format!("{p}.self_attn.{name}.weight"),
                        vec![c.head_dim],
                        ParamKind::Norm,
                    ));
                }
            }
            entries.extend([
                (
                    format!("{p}.self_attn.o_proj.weight"),
                    vec![h, q],
                    ParamKind::Matrix,
                ),
                (
                    format!("{p}.post_attention_layernorm.weight"),
                    vec![h],
                    ParamKind::Norm,
                ),
                (
                    format!("{p}.mlp.gate_proj.weight"),
                    vec![i, h],
                    ParamKind::Matrix,
                ),
                (
                    format!("{p}.mlp.up_proj.weight"),
                    vec![i, h],
                    ParamKind::Matrix,
                ),
                (
                    format!("{p}.mlp.down_proj.weight"),
                    vec![h, i],
                    ParamKind::Matrix,
                ),
            ]);
        }
        entries.push(("model.norm.weight".into(), vec![h], ParamKind::Norm));
        if !c.tie_word_embeddings {
            entries.push((
                "lm_head.weight".into(),
                vec![c.vocab_size, h],
                ParamKind::Embedding,
            ));
        }
        let mut offset = 0;
        let params = entries
            .into_iter()
            .map(|(name, shape, kind)| {
                let info = ParamInfo {
                    name,
                    shape,
                    offset,
                    kind,
                };
                offset += info.len();
                info
            })
            .collect();
        ParamLayout {
            params,
            total: offset,
        }
    }

    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// A seeded random initialisation: N(0, std) matrices and embeddings, unit norm gains, zero
    /// biases.
    /// (A hand-rolled generator, so that the same seed gives the same model whatever crate
    /// versions are in the build.)
    pub fn init(&self, std: f64, seed: u64) -> Vec<f32> {
        let mut weights = vec![0f32; self.total];
        let mut state = seed ^ 0x5DEE_CE66_D1CE_4E5B;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        for p in &self.params {
            let out = &mut weights[p.range()];
            match p.kind {
                ParamKind::Norm => out.fill(1.0),
                ParamKind::Bias => out.fill(0.0),
                _ => {
                    for pair in out.chunks_mut(2) {
                        // Box-Muller: two normals from two uniforms.
                        let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
                        let r = (-2.0 * u1.ln()).sqrt() * std;
                        let t = std::f64::consts::TAU * u2;
                        pair[0] = (r * t.cos()) as f32;
                        if let Some(second) = pair.get_mut(1) {
                            *second = (r * t.sin()) as f32;
                        }
                    }
                }
            }
        }
        weights
    }
}
