#!/usr/bin/env python3
"""Independent NumPy reference of the Hugging Face Llama-family forward pass.

This is the reference that dapt's parity tests compare against. It is written
from the `LlamaForCausalLM` definition in `transformers` (modeling_llama.py)
and shares no code with dapt: RMSNorm, rotate-half RoPE (with linear / llama3
rope_scaling), grouped-query causal attention, SwiGLU MLP, final norm, and
lm_head (or the tied embedding matrix). The families' differences, from
modeling_qwen2.py, modeling_qwen3.py and modeling_mistral.py:
  qwen2    q/k/v projection biases (`*_proj.bias`), applied whenever present;
  qwen3    RMSNorm over each head of q and k (`self_attn.q_norm` / `k_norm`,
           eps rms_norm_eps) after the projection and before RoPE;
  mistral  `sliding_window` w: query i sees keys j with i - w < j <= i
           (null: full causal attention).

    python3 llama_ref.py MODEL_DIR --ids IDS.json [--out LOGITS.npy] [--loss]
                         [--dtype float32|float64] [--direction DIR.safetensors]

MODEL_DIR holds an HF config.json and model.safetensors (or a sharded
model.safetensors.index.json). IDS.json is a JSON list of equal-length lists
of token ids (a batch). --out writes float32 logits [batch, seq, vocab];
--loss prints {"loss": mean next-token cross-entropy, "tokens": n} as JSON.
--direction (with --loss) adds "directional_derivative": the central finite
difference (L(w + e d) - L(w - e d)) / 2e of that loss in float64 along the
tensors d of DIR.safetensors (absent tensors: zero), e = --eps: an
autodiff-free check of a gradient g, which must give <g, d>.
Dependencies: numpy and safetensors only.
"""
import argparse, json, math, os, struct
import numpy as np

_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_safetensors_raw(path):
    """Minimal safetensors reader (used when the numpy loader rejects BF16)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        buf = data[lo:hi]
        if info["dtype"] == "BF16":  # bf16 is the top half of an f32: shift the bits up
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, _ST_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out


def _load_file(path):
    try:
        from safetensors.numpy import load_file
        return load_file(path)
    except Exception:  # e.g. BF16, which numpy cannot represent
        return _read_safetensors_raw(path)


def load_weights(model_dir, dtype):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for fn in files:
        for k, v in _load_file(os.path.join(model_dir, fn)).items():
            weights[k] = v.astype(dtype)
    return weights


def rope_inv_freq(cfg, head_dim):
    """inv_freq as HF's rope init functions compute it (default, linear, llama3)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # transformers>=5 writes rope_parameters
    # transformers 5: the base in the dict that gives the rope type wins over the top-level key
    # (dapt refuses a config where both are given and differ).
    theta = rs.get("rope_theta", cfg.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":  # _compute_llama3_parameters
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, inv_llama)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling: {rs}")
    return inv_freq.astype(np.float32)


def rms_norm(x, w, eps):
    x32 = x.astype(np.promote_types(x.dtype, np.float32))
    var = np.mean(x32 * x32, axis=-1, keepdims=True)
    return (w * (x32 / np.sqrt(var + eps))).astype(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def silu(x):
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives silu -> -0
        return x / (1.0 + np.exp(-x))


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def sliding_window(cfg):
    """The attention window of the config, or None (full causal attention)."""
    mt = cfg.get("model_type", "llama")
    if mt == "mistral":
        # MistralConfig's default for an absent key is 4096; an explicit null is no window.
        return cfg.get("sliding_window", 4096)
    if mt in ("qwen2", "qwen3"):
        assert not cfg.get("use_sliding_window", False), "Qwen's sliding window is not modelled"
    return None


def forward(cfg, W, ids, dtype=np.float32):
    """ids: int array [batch, seq] -> logits [batch, seq, vocab] in `dtype`."""
    assert cfg.get("hidden_act", "silu") == "silu"
    assert cfg.get("model_type", "llama") in ("llama", "qwen2", "qwen3", "mistral")
    B, S = ids.shape
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    mt = cfg.get("model_type", "llama")
    # transformers' defaults for an absent key (MistralConfig: 8 KV heads; Qwen2Config,
    # Qwen3Config: 32 KV heads; Qwen3Config: head_dim 128); an explicit null is the heads.
    nkv = cfg.get("num_key_value_heads", {"mistral": 8, "qwen2": 32, "qwen3": 32}.get(mt)) or nh
    if mt == "qwen3":
        hd = cfg.get("head_dim", 128)
        assert hd is not None, "Qwen3Config's head_dim is an integer"
    else:
        hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    freqs = np.arange(S, dtype=np.float32)[:, None] * rope_inv_freq(cfg, hd)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [S, hd]
    cos, sin = np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)
    causal = np.triu(np.ones((S, S), dtype=bool), k=1)  # True: masked
    window = sliding_window(cfg)
    if window is not None:
        causal |= np.tril(np.ones((S, S), dtype=bool), k=-window)  # j <= i - window

    x = W["model.embed_tokens.weight"][ids]  # [B, S, H]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj").reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        k = lin(h, p + "self_attn.k_proj").reshape(B, S, nkv, hd).transpose(0, 2, 1, 3)
        v = lin(h, p + "self_attn.v_proj").reshape(B, S, nkv, hd).transpose(0, 2, 1, 3)
        if p + "self_attn.q_norm.weight" in W:  # Qwen3: per-head RMSNorm before RoPE
            q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)  # repeat_kv
        scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))
        scores = np.where(causal, -np.inf, scores)
        attn = softmax(scores.astype(np.promote_types(dtype, np.float32))).astype(dtype) @ v
        attn = attn.transpose(0, 2, 1, 3).reshape(B, S, nh * hd)
        x = x + lin(attn, p + "self_attn.o_proj")
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        x = x + lin(silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight")
    if head is None or cfg.get("tie_word_embeddings", False):
        head = W["model.embed_tokens.weight"]
    return x @ head.T


def next_token_loss(logits, ids):
    """Mean cross-entropy of logits[:, t] against ids[:, t+1] (HF's shifted loss)."""
    lg = logits[:, :-1].astype(np.float64)
    lg = lg - lg.max(axis=-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
    tgt = ids[:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return float(nll.mean()), int(nll.size)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--ids", required=True, help="JSON list of equal-length lists of token ids")
    ap.add_argument("--out", help="write float32 logits [batch, seq, vocab] here (.npy)")
    ap.add_argument("--loss", action="store_true", help='print {"loss": x, "tokens": n} as JSON')
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--direction", help="safetensors of a direction d: add the finite-difference "
                    "derivative of the loss along d to --loss's JSON")
    ap.add_argument("--eps", type=float, default=1e-3, help="step of --direction's difference")
    a = ap.parse_args()
    if not a.out and not a.loss:
        ap.error("nothing to do: give --out and/or --loss")
    dtype = np.dtype(a.dtype).type
    with open(os.path.join(a.model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(a.ids) as f:
        ids = np.array(json.load(f), dtype=np.int64)
    assert ids.ndim == 2, "ids must be a list of equal-length lists"
    logits = forward(cfg, load_weights(a.model_dir, dtype), ids, dtype)
    if a.out:
        np.save(a.out, logits.astype(np.float32))
    if a.loss:
        loss, n = next_token_loss(logits, ids)
        out = {"loss": loss, "tokens": n}
        if a.direction:
            W = load_weights(a.model_dir, np.float64)
            d = {k: v.astype(np.float64) for k, v in _load_file(a.direction).items()}
            unknown = sorted(set(d) - set(W))
            assert not unknown, f"direction tensors not in the model: {unknown}"
            moved = lambda sign: {k: w + sign * a.eps * d[k] if k in d else w for k, w in W.items()}
            hi, _ = next_token_loss(forward(cfg, moved(1), ids, np.float64), ids)
            lo, _ = next_token_loss(forward(cfg, moved(-1), ids, np.float64), ids)
            out["directional_derivative"] = (hi - lo) / (2 * a.eps)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
