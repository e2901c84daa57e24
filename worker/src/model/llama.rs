//! The Llama decoder in Burn, generic over the backend, written from the Hugging Face
//! definition: RMSNorm, rotary embeddings applied with `rotate_half` (the first and second
//! halves of each head pair up, not adjacent dimensions), causal grouped-query attention
//! (`crate::fused::attention`: flash attention on GPUs), SwiGLU MLP, optional tied embeddings.
//!
//! The other families are this block with their differences (`dapt_proto::model::Family`):
//! Qwen2 adds biases to the q, k and v projections; Qwen3 RMS-normalises each head of q and k
//! (gains of `head_dim`) before RoPE; Mistral may limit attention to a sliding window of past
//! positions.
//!
//! Parameters are plain tensors built from the flat buffer of [`ParamLayout`]; burn's `nn`
//! modules are not used, because Burn 0.21 has no grouped-query attention and its rotary
//! encoding pairs adjacent dimensions.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::params::ParamLayout;
use crate::fused::attention::{causal_attention, AttentionShape};
use crate::fused::loss::cross_entropy_sum;
use crate::fused::matmul::{linear, MatmulOps};
use crate::fused::norm::{rms_norm, rope, swiglu, RopeTables};
use crate::fused::FusedOps;
use dapt_proto::model::LlamaConfig;

pub struct Llama<B: Backend> {
    cfg: LlamaConfig,
    /// Where each parameter sits in the flat buffer, in the order of the fields below.
    layout: ParamLayout,
    /// The parameters' (and so the activations') dtype.
    dtype: DType,
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    /// The final RMSNorm gain, `[1, hidden]`.
    norm: Tensor<B, 2>,
    /// Untied output head; `None` when it is the embedding.
    lm_head: Option<Tensor<B, 2>>,
    device: B::Device,
}

/// One decoder block's parameters, in layout order. Norm gains and biases are `[1, n]`: the
/// tensors the model was given, so that on an autodiff backend they are the leaves whose
/// gradients are read (a reshape would be an intermediate node, whose gradient Burn frees
/// during the backward pass).
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 2>,
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    /// q, k and v biases (`Family::qkv_bias`).
    qkv_bias: Option<[Tensor<B, 2>; 3]>,
    /// Per-head RMSNorm gains of q and k, `[1, head_dim]` (`Family::qk_norm`).
    qk_norm: Option<[Tensor<B, 2>; 2]>,
    wo: Tensor<B, 2>,
    mlp_norm: Tensor<B, 2>,
    w_gate: Tensor<B, 2>,
    w_up: Tensor<B, 2>,
    w_down: Tensor<B, 2>,
}

impl<B: Backend> Layer<B> {
    /// The block's parameters in [`ParamLayout::llama`]'s order (which `from_params` reads).
    fn params(&self) -> Vec<&Tensor<B, 2>> {
        let mut out = vec![&self.attn_norm];
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

    /// The block with `f` applied to each parameter (e.g. fresh autodiff leaves).
    fn map<C: Backend>(&self, mut f: impl FnMut(&Tensor<B, 2>) -> Tensor<C, 2>) -> Layer<C> {
        Layer {
            attn_norm: f(&self.attn_norm),
            wq: f(&self.wq),
            wk: f(&self.wk),
            wv: f(&self.wv),
            qkv_bias: self.qkv_bias.as_ref().map(|b| b.each_ref().map(&mut f)),
            qk_norm: self.qk_norm.as_ref().map(|n| n.each_ref().map(&mut f)),
            wo: f(&self.wo),
            mlp_norm: f(&self.mlp_norm),
            w_gate: f(&self.w_gate),
            w_up: f(&self.w_up),
            w_down: f(&self.w_down),
        }
    }
}

/// What the forward pass uses besides the parameters and depends only on the shape of the
/// batch: the RoPE tables. Made once per `(batch, seq)` and reused across
/// micro-batches and steps (cloning it shares the tensors).
#[derive(Clone)]
pub struct Constants<B: Backend> {
    batch: usize,
    seq: usize,
    /// `cos` and `sin` `[seq, head_dim]`, shared by every sequence and head.
    rope: RopeTables<B>,
}

impl<B: Backend> Constants<B> {
    /// The tables for micro-batches of `batch` sequences of `seq` tokens, in `dtype`.
    pub fn new(
        cfg: &LlamaConfig,
        batch: usize,
        seq: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        Constants {
            batch,
            seq,
            rope: RopeTables::new(&cfg.inv_freq(), seq, dtype, device),
        }
    }

    /// `(batch, seq)` these tables are for.
    pub fn shape(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }
}

impl<B: AutodiffBackend> Constants<B> {
    /// `inner`'s tables as untracked constants of the autodiff backend (no copy).
    pub fn from_inner(inner: &Constants<B::InnerBackend>) -> Self {
        Constants {
            batch: inner.batch,
            seq: inner.seq,
            rope: inner.rope.map(Tensor::from_inner),
        }
    }
}

impl<B: FusedOps> Llama<B> {
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
    /// and in the shapes of [`param_shape`] (norm gains and biases as `[1, n]`). The activations take the
    /// parameters' dtype (f32, or bf16 for mixed precision); the loss is computed in f32.
    pub fn from_params(cfg: &LlamaConfig, params: Vec<Tensor<B, 2>>, device: &B::Device) -> Self {
        let layout = ParamLayout::llama(cfg);
        assert_eq!(
            params.len(),
            layout.params.len(),
            "one tensor per parameter"
        );
        let mut params = params.into_iter();
        let mut next = || params.next().expect("layout has every parameter");
        let embed = next();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (bias, qk_norm) = (cfg.family.qkv_bias(), cfg.family.qk_norm());
        for _ in 0..cfg.num_hidden_layers {
            let attn_norm = next();
            // q, k and v, each followed by its bias in a family that has them.
            let mut proj = || {
                let w = next();
                let b = bias.then(&mut next);
                (w, b)
            };
            let ((wq, bq), (wk, bk), (wv, bv)) = (proj(), proj(), proj());
            let qkv_bias = match (bq, bk, bv) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                _ => None,
            };
            let qk_norm = qk_norm.then(|| [next(), next()]);
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                qkv_bias,
                qk_norm,
                wo: next(),
                mlp_norm: next(),
                w_gate: next(),
                w_up: next(),
                w_down: next(),
            });
        }
        let norm = next();
        let lm_head = (!cfg.tie_word_embeddings).then(&mut next);
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

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The parameters in layout order.
    fn params(&self) -> Vec<&Tensor<B, 2>> {
        let mut out = Vec::with_capacity(self.layout.params.len());
        out.push(&self.embed);
        for l in &self.layers {
            out.extend(l.params());
        }
        out.push(&self.norm);
        out.extend(&self.lm_head);
        out
    }

    /// The tables for a `[batch, seq]` input, in this model's dtype.
    pub fn constants(&self, batch: usize, seq: usize) -> Constants<B> {
        Constants::new(&self.cfg, batch, seq, self.dtype, &self.device)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let consts = self.constants(b, t);
        self.logits(ids, &consts)
            .reshape([b, t, self.cfg.vocab_size])
    }

    /// Logits as `[batch * seq, vocab]`.
    ///
    /// Activations stay 2-D `[batch * seq, features]` between the matmuls: burn-flex runs
    /// element-wise ops on contiguous or 2-D operands on fast paths, but broadcasts in 3-D and
    /// 4-D through a generic strided iterator that cost a third of the step (see
    /// docs/benchmarks.md).
    fn logits(&self, ids: Tensor<B, 2, Int>, consts: &Constants<B>) -> Tensor<B, 2> {
        linear(self.hidden(ids, consts), self.head_weight())
    }

    /// The final-normed hidden states `[batch * seq, hidden]` for ids `[batch, seq]`: what the
    /// output head reads.
    fn hidden(&self, ids: Tensor<B, 2, Int>, consts: &Constants<B>) -> Tensor<B, 2> {
        let mut x = self.embed_tokens(ids);
        for layer in &self.layers {
            x = block(&self.cfg, layer, x, consts);
        }
        rms_norm(x, self.norm.clone(), self.cfg.rms_norm_eps)
    }

    /// Token embeddings `[batch * seq, hidden]` of ids `[batch, seq]`.
    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = ids.dims();
        burn::tensor::module::embedding(self.embed.clone(), ids)
            .reshape([b * t, self.cfg.hidden_size])
    }

    /// The output head `[vocab, hidden]`: its own, or the embedding when tied.
    fn head_weight(&self) -> Tensor<B, 2> {
        self.lm_head.clone().unwrap_or_else(|| self.embed.clone())
    }

    /// Sum of next-token negative log-likelihoods over `windows` (`[batch, seq + 1]` ids: the
    /// first `seq` are the input, the last `seq` the targets), as a one-element f32 tensor.
    /// The output head and the loss are one fused op ([`cross_entropy_sum`]): the
    /// `[batch * seq, vocab]` logits are never made whole.
    pub fn nll_sum(&self, windows: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [b, t1] = windows.dims();
        let consts = self.constants(b, t1 - 1);
        self.nll_sum_with(windows, &consts)
    }

    /// [`Self::nll_sum`] with tables made beforehand (for `[batch, seq]` = `windows`' batch and
    /// its width - 1).
    pub fn nll_sum_with(&self, windows: Tensor<B, 2, Int>, consts: &Constants<B>) -> Tensor<B, 1> {
        let (inputs, targets) = split_windows(windows);
        cross_entropy_sum(
            self.hidden(inputs, consts),
            self.head_weight(),
            targets,
            None,
        )
    }
}

/// `windows` `[batch, seq + 1]` as the inputs `[batch, seq]` and the targets `[batch * seq, 1]`.
fn split_windows<B: Backend>(windows: Tensor<B, 2, Int>) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let [b, t1] = windows.dims();
    let t = t1 - 1;
    let inputs = windows.clone().narrow(1, 0, t);
    let targets = windows.narrow(1, 1, t).reshape([b * t, 1]);
    (inputs, targets)
}

/// One decoder block over `x` `[batch * seq, hidden]`: pre-norm attention and MLP, each with
/// its residual.
fn block<B: FusedOps>(
    cfg: &LlamaConfig,
    layer: &Layer<B>,
    x: Tensor<B, 2>,
    consts: &Constants<B>,
) -> Tensor<B, 2> {
    let h = rms_norm(x.clone(), layer.attn_norm.clone(), cfg.rms_norm_eps);
    let x = x + attention(cfg, layer, h, consts);
    let h = rms_norm(x.clone(), layer.mlp_norm.clone(), cfg.rms_norm_eps);
    x + mlp(layer, h)
}

/// Attention over `x` `[batch * seq, hidden]`.
fn attention<B: FusedOps>(
    cfg: &LlamaConfig,
    layer: &Layer<B>,
    x: Tensor<B, 2>,
    consts: &Constants<B>,
) -> Tensor<B, 2> {
    let (b, t) = consts.shape();
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let bias = |i: usize| layer.qkv_bias.as_ref().map(|b| b[i].clone());
    let (mut q, mut k) = (
        linear_bias(x.clone(), layer.wq.clone(), bias(0)),
        linear_bias(x.clone(), layer.wk.clone(), bias(1)),
    );
    if let Some([q_norm, k_norm]) = &layer.qk_norm {
        // Qwen3: RMSNorm over each head's `head_dim` values, before RoPE.
        let per_head = |y: Tensor<B, 2>, n: usize, gain: &Tensor<B, 2>| {
            rms_norm(y.reshape([b * t * n, hd]), gain.clone(), cfg.rms_norm_eps)
                .reshape([b * t, n * hd])
        };
        q = per_head(q, nh, q_norm);
        k = per_head(k, nkv, k_norm);
    }
    // RoPE and attention on the contiguous `[b * t, heads * hd]` projections as they are.
    let q = rope(q, nh, &consts.rope);
    let k = rope(k, nkv, &consts.rope);
    let v = linear_bias(x, layer.wv.clone(), bias(2));
    let shape = AttentionShape::new(b, t, nh, nkv, hd, cfg.sliding_window);
    let out = causal_attention(q, k, v, shape);
    linear(out, layer.wo.clone())
}

impl<B: AutodiffBackend + FusedOps> Llama<B> {
    /// Adds each parameter's gradient into `out`, laid out like the weights.
    pub fn add_gradients(&self, grads: &B::Gradients, out: &mut [f32]) {
        for (t, p) in self.params().into_iter().zip(&self.layout.params) {
            if let Some(g) = t.grad(grads).map(host) {
                for (o, g) in out[p.range()].iter_mut().zip(g) {
                    *o += g;
                }
            }
        }
    }

    /// Hands each parameter's gradient, flat and in the compute dtype, to `sink` with the
    /// parameter's index in the layout, taking it out of `grads` (so that its memory goes as
    /// soon as `sink` is done with it). A parameter the loss does not reach is skipped.
    pub fn drain_gradients(
        &self,
        grads: &mut B::Gradients,
        mut sink: impl FnMut(usize, Tensor<B::InnerBackend, 1>),
    ) {
        for (i, t) in self.params().into_iter().enumerate() {
            if let Some(g) = t.grad_remove(grads) {
                sink(i, g.reshape([-1]));
            }
        }
    }
}

impl<B: FusedOps> Llama<B> {
    /// Forward and backward over `windows` with layer-wise activation recompute, on the
    /// autodiff backend `A` over this model's backend: the forward pass keeps only each decoder
    /// block's input `[batch * seq, hidden]` (no graph); the backward pass then goes block by
    /// block from the head down, each time rebuilding that one block's graph from its kept
    /// input and backpropagating the gradient arriving from above. At most one block's
    /// activations (plus one vocabulary chunk of the head's logits) exist at a time, for one
    /// more forward pass of the blocks.
    ///
    /// The loss is `nll_sum(windows) / denominator`, returned as a one-element tensor; each
    /// parameter's gradient goes to `sink` with its index in the layout, flat, in the compute
    /// dtype, as soon as it is known (so gradients never all exist at once either). Up to the
    /// summation order of a tied embedding's two gradients, the same numbers as the full graph.
    pub fn backward_recompute<A: AutodiffBackend<InnerBackend = B> + FusedOps>(
        &self,
        windows: Tensor<B, 2, Int>,
        denominator: f64,
        consts: &Constants<B>,
        mut sink: impl FnMut(usize, Tensor<B, 1>),
    ) -> Tensor<B, 1> {
        let (inputs, targets) = split_windows(windows);
        let cfg = &self.cfg;
        let mut kept = Vec::with_capacity(self.layers.len());
        let mut x = self.embed_tokens(inputs.clone());
        for layer in &self.layers {
            kept.push(x.clone());
            x = block(cfg, layer, x, consts);
        }
        let leaf = |t: &Tensor<B, 2>| Tensor::<A, 2>::from_inner(t.clone()).require_grad();
        let tracked = Constants::<A>::from_inner(consts);
        let per_layer = self.layers.first().map_or(0, |l| l.params().len());
        let norm_index = 1 + per_layer * self.layers.len();

        // The head: final norm, output projection, loss.
        let top = leaf(&x);
        drop(x);
        let norm = leaf(&self.norm);
        let head = leaf(self.lm_head.as_ref().unwrap_or(&self.embed));
        let hidden = rms_norm(top.clone(), norm.clone(), cfg.rms_norm_eps);
        let targets = Tensor::<A, 2, Int>::from_inner(targets);
        let loss = cross_entropy_sum(hidden, head.clone(), targets, None).div_scalar(denominator);
        let value = loss.clone().inner();
        let mut grads = loss.backward();
        let mut upstream = top
            .grad_remove(&mut grads)
            .expect("the loss depends on the top block");
        if let Some(g) = norm.grad_remove(&mut grads) {
            sink(norm_index, g.reshape([-1]));
        }
        let head_grad = head.grad_remove(&mut grads).map(|g| g.reshape([-1]));
        drop(grads);
        let tied_grad = match head_grad {
            Some(g) if self.lm_head.is_some() => {
                sink(norm_index + 1, g);
                None
            }
            other => other,
        };

        // The blocks, from the top down: recompute, then backpropagate `upstream`.
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = leaf(&kept.pop().expect("one kept input per block"));
            let params = layer.map(leaf);
            let out = block(cfg, &params, input.clone(), &tracked);
            let mut grads = (out * Tensor::from_inner(upstream)).sum().backward();
            upstream = input
                .grad_remove(&mut grads)
                .expect("a block's output depends on its input");
            for (j, p) in params.params().into_iter().enumerate() {
                if let Some(g) = p.grad_remove(&mut grads) {
                    sink(1 + per_layer * i + j, g.reshape([-1]));
                }
            }
        }

        // The token embedding.
        let embed = leaf(&self.embed);
        let [b, t] = inputs.dims();
        let x = burn::tensor::module::embedding(embed.clone(), Tensor::from_inner(inputs))
            .reshape([b * t, cfg.hidden_size]);
        let mut grads = (x * Tensor::from_inner(upstream)).sum().backward();
        let lookup = embed.grad_remove(&mut grads).map(|g| g.reshape([-1]));
        let embed_grad = match (lookup, tied_grad) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        if let Some(g) = embed_grad {
            sink(0, g);
        }
        value
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

/// `x [n, in] @ w^T + bias` (`bias` `[1, out]`, when the projection has one).
fn linear_bias<B: MatmulOps>(
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

fn mlp<B: FusedOps>(layer: &Layer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let gate = linear(x.clone(), layer.w_gate.clone());
    let up = linear(x, layer.w_up.clone());
    linear(swiglu(gate, up), layer.w_down.clone())
}
