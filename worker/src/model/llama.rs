//! The Llama decoder in Burn, generic over the backend, written from the Hugging Face
//! definition: RMSNorm, rotary embeddings applied with `rotate_half` (the first and second
//! halves of each head pair up, not adjacent dimensions), grouped-query attention with a causal
//! mask, SwiGLU MLP, optional tied embeddings.
//!
//! The other families are this block with their differences (`dapt_proto::model::Family`):
//! Qwen2 adds biases to the q, k and v projections; Qwen3 RMS-normalises each head of q and k
//! (gains of `head_dim`) before RoPE; Mistral may limit attention to a sliding window of past
//! positions.
//!
//! Parameters are plain tensors built from the flat buffer of [`ParamLayout`]; burn's `nn`
//! modules are not used, because Burn 0.21 has no grouped-query attention and its rotary
//! encoding pairs adjacent dimensions.

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};

use super::params::ParamLayout;
use dapt_proto::model::LlamaConfig;

pub struct Llama<B: Backend> {
    cfg: LlamaConfig,
    /// Where each parameter sits in the flat buffer, in the order of the fields below.
    layout: ParamLayout,
    /// The parameters' (and so the activations') dtype.
    dtype: DType,
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    /// Final norm gain `[1, hidden]`.
    norm: Tensor<B, 2>,
    /// Untied output head; `None` when it is the embedding.
    lm_head: Option<Tensor<B, 2>>,
    device: B::Device,
}

struct Layer<B: Backend> {
    /// Norm gains and biases are `[1, n]`: the tensors the model was given, so that on an
    /// autodiff backend they are the leaves whose gradients `add_gradients` reads (a reshape
    /// would be an intermediate node, whose gradient Burn frees during the backward pass).
    attn_norm: Tensor<B, 2>,
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    /// q, k and v biases (`Family::qkv_bias`).
    qkv_bias: Option<[Tensor<B, 2>; 3]>,
    /// Per-head RMSNorm gains of q and k (`Family::qk_norm`).
    qk_norm: Option<[Tensor<B, 2>; 2]>,
    wo: Tensor<B, 2>,
    mlp_norm: Tensor<B, 2>,
    w_gate: Tensor<B, 2>,
    w_up: Tensor<B, 2>,
    w_down: Tensor<B, 2>,
}

/// A parameter tensor as the model holds it (a norm gain or a bias as `[1, n]`).
type Param<'a, B> = &'a Tensor<B, 2>;

impl<B: Backend> Layer<B> {
    /// The layer's tensors in [`ParamLayout::llama`]'s order (which `from_params` reads).
    fn params(&self) -> Vec<Param<'_, B>> {
        let mut out: Vec<Param<'_, B>> = vec![&self.attn_norm];
        for (i, w) in [&self.wq, &self.wk, &self.wv].into_iter().enumerate() {
            out.push(w);
            if let Some(bias) = &self.qkv_bias {
                out.push(&bias[i]);
            }
        }
        if let Some(norms) = &self.qk_norm {
            out.extend(norms.iter());
        }
        out.extend([
            &self.wo,
            &self.mlp_norm,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]);
        out
    }
}

impl<B: Backend> Llama<B> {
    /// The model with the weights of `flat` (laid out by `ParamLayout::llama(cfg)`).
    /// `trainable` marks every parameter as requiring a gradient (autodiff backends only).
    pub fn from_flat(cfg: &LlamaConfig, flat: &[f32], device: &B::Device, trainable: bool) -> Self {
        let layout = ParamLayout::llama(cfg);
        let params = layout
            .params
            .iter()
            .map(|p| {
                let t = Tensor::<B, 2>::from_data(
                    TensorData::new(flat[p.range()].to_vec(), param_shape(&p.shape)),
                    device,
                );
                if trainable {
                    t.require_grad()
                } else {
                    t
                }
            })
            .collect();
        Self::from_params(cfg, params, device)
    }

    /// The model over `params`, one tensor per entry of `ParamLayout::llama(cfg)`, in its order
    /// and in the shapes of [`param_shape`] (norm gains and biases as `[1, n]`). The
    /// activations take the parameters' dtype (f32, or bf16 for mixed precision); the loss is
    /// computed in f32.
    pub fn from_params(cfg: &LlamaConfig, params: Vec<Tensor<B, 2>>, device: &B::Device) -> Self {
        let layout = ParamLayout::llama(cfg);
        assert_eq!(
            params.len(),
            layout.params.len(),
            "one tensor per parameter"
        );
        let mut params = params.into_iter();
        let mut next2 = || params.next().expect("layout has every parameter");
        let embed = next2();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (bias, qk_norm) = (cfg.family.qkv_bias(), cfg.family.qk_norm());
        for _ in 0..cfg.num_hidden_layers {
            let attn_norm = next2();
            // q, k and v, each followed by its bias in a family that has them.
            let mut proj = || {
                let w = next2();
                let b = bias.then(&mut next2);
                (w, b)
            };
            let ((wq, bq), (wk, bk), (wv, bv)) = (proj(), proj(), proj());
            let qkv_bias = match (bq, bk, bv) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                _ => None,
            };
            let qk_norm = qk_norm.then(|| [next2(), next2()]);
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                qkv_bias,
                qk_norm,
                wo: next2(),
                mlp_norm: next2(),
                w_gate: next2(),
                w_up: next2(),
                w_down: next2(),
            });
        }
        let norm = next2();
        let lm_head = (!cfg.tie_word_embeddings).then(&mut next2);
        Llama {
            cfg: cfg.clone(),
            layout,
            dtype: embed.dtype(),
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        }
    }

    /// Every parameter tensor in [`ParamLayout::llama`]'s order.
    fn params(&self) -> Vec<Param<'_, B>> {
        let mut out: Vec<Param<'_, B>> = vec![&self.embed];
        for l in &self.layers {
            out.extend(l.params());
        }
        out.push(&self.norm);
        if let Some(head) = &self.lm_head {
            out.push(head);
        }
        out
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        self.logits(ids).reshape([b, t, self.cfg.vocab_size])
    }

    /// Logits as `[batch * seq, vocab]`.
    ///
    /// Activations stay 2-D `[batch * seq, features]` between the matmuls: burn-flex runs
    /// element-wise ops on contiguous or 2-D operands on fast paths, but broadcasts in 3-D and
    /// 4-D through a generic strided iterator that cost a third of the step (see
    /// docs/benchmarks.md).
    fn logits(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = ids.dims();
        let d = self.cfg.hidden_size;
        let rope = RopeTables::new(&self.cfg, b, t, self.dtype, &self.device);
        let mask = attention_mask::<B>(t, self.cfg.sliding_window, &self.device)
            .unsqueeze::<4>()
            .expand([b, self.cfg.num_attention_heads, t, t]);
        let mut x = burn::tensor::module::embedding(self.embed.clone(), ids).reshape([b * t, d]);
        for layer in &self.layers {
            let h = rms_norm(x.clone(), layer.attn_norm.clone(), self.cfg.rms_norm_eps);
            x = x + self.attention(layer, h, b, &rope, mask.clone());
            let h = rms_norm(x.clone(), layer.mlp_norm.clone(), self.cfg.rms_norm_eps);
            x = x + mlp(layer, h);
        }
        let x = rms_norm(x, self.norm.clone(), self.cfg.rms_norm_eps);
        let head = self.lm_head.clone().unwrap_or_else(|| self.embed.clone());
        linear(x, head)
    }

    /// Sum of next-token negative log-likelihoods over `windows` (`[batch, seq + 1]` ids: the
    /// first `seq` are the input, the last `seq` the targets), as a one-element tensor.
    pub fn nll_sum(&self, windows: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [b, t1] = windows.dims();
        let t = t1 - 1;
        let inputs = windows.clone().narrow(1, 0, t);
        let targets = windows.narrow(1, 1, t).reshape([b * t, 1]);
        // In f32 whatever the compute dtype: a bf16 softmax over a large vocabulary, and a bf16
        // sum of thousands of token losses, would lose the loss's low digits (a no-op in f32).
        let logp = log_softmax(self.logits(inputs).cast(FloatDType::F32), 1);
        logp.gather(1, targets).sum().neg()
    }

    /// Attention over `x` `[batch * seq, hidden]`.
    fn attention(
        &self,
        layer: &Layer<B>,
        x: Tensor<B, 2>,
        b: usize,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 2> {
        let [bt, _] = x.dims();
        let t = bt / b;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        // RoPE on the contiguous `[b * t, heads * hd]` projections, then heads to the front.
        let heads = |y: Tensor<B, 2>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let bias = |i: usize| layer.qkv_bias.as_ref().map(|b| b[i].clone());
        let (mut q, mut k) = (
            linear_bias(x.clone(), layer.wq.clone(), bias(0)),
            linear_bias(x.clone(), layer.wk.clone(), bias(1)),
        );
        if let Some([q_norm, k_norm]) = &layer.qk_norm {
            // Qwen3: RMSNorm over each head's `head_dim` values, before RoPE.
            let per_head = |y: Tensor<B, 2>, n: usize, gain: &Tensor<B, 2>| {
                rms_norm(y.reshape([bt * n, hd]), gain.clone(), self.cfg.rms_norm_eps)
                    .reshape([bt, n * hd])
            };
            q = per_head(q, nh, q_norm);
            k = per_head(k, nkv, k_norm);
        }
        let q = heads(rope.apply(q, nh, hd, &rope.q), nh);
        let k = heads(rope.apply(k, nkv, hd, &rope.k), nkv);
        let v = heads(linear_bias(x, layer.wv.clone(), bias(2)), nkv);
        let (k, v) = (repeat_kv(k, nh / nkv), repeat_kv(v, nh / nkv));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt())
            .mask_fill(mask, f32::NEG_INFINITY)
            .reshape([b * nh * t, t]);
        let probs = softmax(scores, 1).reshape([b, nh, t, t]);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b * t, nh * hd]);
        linear(out, layer.wo.clone())
    }
}

/// `cos` and `sin` for every row of a `[batch * seq, heads * head_dim]` projection, laid out
/// like it (contiguous, so the products take burn-flex's fast path), for the query and the
/// key-value head counts. The frequencies repeat over both halves of each head, as Hugging Face
/// builds them.
struct RopeTables<B: Backend> {
    q: (Tensor<B, 2>, Tensor<B, 2>),
    k: (Tensor<B, 2>, Tensor<B, 2>),
}

impl<B: Backend> RopeTables<B> {
    fn new(cfg: &LlamaConfig, b: usize, t: usize, dtype: DType, device: &B::Device) -> Self {
        let inv_freq = cfg.inv_freq();
        let hd = cfg.head_dim;
        // One row per position (the frequencies over both halves), computed once and then
        // repeated for every sequence of the batch and every head.
        let mut row_cos = Vec::with_capacity(t * hd);
        let mut row_sin = Vec::with_capacity(t * hd);
        for pos in 0..t {
            for _ in 0..2 {
                for f in &inv_freq {
                    // f32, as the reference rounds the angle.
                    let angle = pos as f32 * *f as f32;
                    row_cos.push(angle.cos());
                    row_sin.push(angle.sin());
                }
            }
        }
        let table = |heads: usize| {
            let expand = |rows: &[f32]| {
                let mut out = Vec::with_capacity(b * t * heads * hd);
                for _ in 0..b {
                    for row in rows.chunks_exact(hd) {
                        for _ in 0..heads {
                            out.extend_from_slice(row);
                        }
                    }
                }
                Tensor::<B, 2>::from_data(TensorData::new(out, [b * t, heads * hd]), device)
                    .cast(dtype)
            };
            (expand(&row_cos), expand(&row_sin))
        };
        RopeTables {
            q: table(cfg.num_attention_heads),
            k: table(cfg.num_key_value_heads),
        }
    }

    /// `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = cat(-x2, x1)` over the two
    /// halves of each head.
    fn apply(
        &self,
        x: Tensor<B, 2>,
        heads: usize,
        hd: usize,
        (cos, sin): &(Tensor<B, 2>, Tensor<B, 2>),
    ) -> Tensor<B, 2> {
        let [rows, width] = x.dims();
        let per_head = x.clone().reshape([rows * heads, hd]);
        let half = hd / 2;
        let x1 = per_head.clone().narrow(1, 0, half);
        let x2 = per_head.narrow(1, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 1).reshape([rows, width]);
        x * cos.clone() + rotated * sin.clone()
    }
}

impl<B: AutodiffBackend> Llama<B> {
    /// Adds each parameter's gradient into `out`, laid out like the weights.
    pub fn add_gradients(&self, grads: &B::Gradients, out: &mut [f32]) {
        let mut params = self.layout.params.iter();
        let mut add = |g: Option<Vec<f32>>| {
            let p = params.next().expect("layout has every parameter");
            if let Some(g) = g {
                for (o, g) in out[p.range()].iter_mut().zip(g) {
                    *o += g;
                }
            }
        };
        for p in self.params() {
            add(p.grad(grads).map(host));
        }
    }
}

impl<B: AutodiffBackend> Llama<B> {
    /// Each parameter's gradient as a flat f32 tensor on the device, in layout order (zeros for
    /// a parameter the loss does not reach).
    pub fn gradients_flat(&self, grads: &B::Gradients) -> Vec<Tensor<B::InnerBackend, 1>> {
        let out: Vec<_> = self
            .params()
            .into_iter()
            .map(|p| p.grad(grads).map(|g| g.reshape([-1])))
            .collect();
        out.into_iter()
            .zip(&self.layout.params)
            .map(|(g, p)| match g {
                Some(g) => g.cast(FloatDType::F32),
                None => Tensor::zeros([p.len()], &self.device),
            })
            .collect()
    }
}

/// The shape a parameter travels in: its own for matrices, `[1, n]` for 1-D norm gains.
pub fn param_shape(shape: &[usize]) -> [usize; 2] {
    match shape {
        [rows, cols] => [*rows, *cols],
        _ => [1, shape.iter().product()],
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .expect("float tensors hold f32 on the backends dapt uses")
}

/// `x [n, in] @ w^T` for a weight in Hugging Face layout `[out, in]`.
fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(w.transpose())
}

/// `x [n, in] @ w^T + bias` (`bias` `[1, out]`, when the projection has one).
fn linear_bias<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let y = linear(x, w);
    match bias {
        Some(b) => y + b,
        None => y,
    }
}

/// The `[t, t]` attention mask, true where a query (row) must not see a key (column): the
/// future, and with a sliding `window` of `w` the keys `w` or more positions back (Mistral, as
/// transformers' `sliding_window_overlay`: key `j` is seen from query `i` iff `i - w < j <= i`).
fn attention_mask<B: Backend>(
    t: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    match window {
        Some(w) if w < t => {
            let mask: Vec<bool> = (0..t)
                .flat_map(|i| (0..t).map(move |j| j > i || i - j >= w))
                .collect();
            Tensor::from_data(TensorData::new(mask, [t, t]), device)
        }
        _ => Tensor::<B, 2, Bool>::tril_mask([t, t], 0, device),
    }
}

/// RMSNorm over the rows of `x` `[n, hidden]`.
fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let inv_rms = x
        .clone()
        .powi_scalar(2)
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    x * inv_rms * w
}

/// Key/value heads repeated for grouped-query attention: query head `h` uses kv head `h / n`.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, kv, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, n)
        .reshape([b, kv * n, t, hd])
}

fn mlp<B: Backend>(layer: &Layer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let gate = silu(linear(x.clone(), layer.w_gate.clone()));
    let up = linear(x, layer.w_up.clone());
    linear(gate * up, layer.w_down.clone())
}
