#!/usr/bin/env python3
"""PyTorch anchor for dapt's training-throughput benchmarks.

Trains a Llama written in plain PyTorch (same math as tests/reference/llama_ref.py:
RMSNorm, rotate-half RoPE, grouped-query causal attention, SwiGLU; parameter
names follow HF's LlamaForCausalLM, so state_dict() is an HF checkpoint) with
AdamW in fp32 on random token ids, and prints one JSON line: tokens/s (steps
after --warmup), peak RSS, and achieved GFLOP/s with
FLOPs/token = 6 * n_params + 12 * n_layers * hidden * seq.

    python3 benches/pytorch_anchor.py --preset tiny|d512|smollm2 [--threads 2]
        [--steps N] [--warmup 2] [--seq S] [--batch B] [--attn sdpa|eager]
Needs torch only (CPU is fine). Sets OMP_WAIT_POLICY=PASSIVE unless already set;
the JSON records it and the 1-minute load average before the run.
"""
import argparse, json, math, os, resource, time

# With OpenMP's default spin-waiting, 2 threads on a 2-core machine that is also
# running anything else (e.g. cargo) go 5-80x slower; passive waiting avoids that.
# Must be set before torch loads libgomp; override with OMP_WAIT_POLICY=ACTIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # HF config names; rope_theta / rms_norm_eps as the presets' models use
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=False, seq=64, batch=8, steps=20),
    "d512": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1376, vocab_size=8192, tie_word_embeddings=False, seq=256, batch=4, steps=5),
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    seq=256, batch=1, steps=3),
}


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, c, attn):
        super().__init__()
        self.nh, self.nkv, self.hd, self.attn = c["nh"], c["nkv"], c["hd"], attn
        self.q_proj = nn.Linear(c["H"], self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(c["H"], self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c["H"], self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c["H"], bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.attn == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            o = s.softmax(-1) @ v
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["H"], c["I"], bias=False)
        self.up_proj = nn.Linear(c["H"], c["I"], bias=False)
        self.down_proj = nn.Linear(c["I"], c["H"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c, attn):
        super().__init__()
        self.input_layernorm = RMSNorm(c["H"], c["eps"])
        self.self_attn = Attention(c, attn)
        self.post_attention_layernorm = RMSNorm(c["H"], c["eps"])
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):  # holds HF's "model." prefix
    def __init__(self, c, attn):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["V"], c["H"])
        self.layers = nn.ModuleList(Layer(c, attn) for _ in range(c["L"]))
        self.norm = RMSNorm(c["H"], c["eps"])


class Llama(nn.Module):
    def __init__(self, cfg, attn="sdpa"):
        super().__init__()
        nh = cfg["num_attention_heads"]
        c = dict(H=cfg["hidden_size"], I=cfg["intermediate_size"], L=cfg["num_hidden_layers"], nh=nh,
                 nkv=cfg.get("num_key_value_heads") or nh, hd=cfg.get("head_dim") or cfg["hidden_size"] // nh,
                 V=cfg["vocab_size"], eps=cfg.get("rms_norm_eps", 1e-5))
        self.model = Model(c, attn)
        self.tied = cfg.get("tie_word_embeddings", False)
        if not self.tied:
            self.lm_head = nn.Linear(c["H"], c["V"], bias=False)
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, c["hd"], 2).float() / c["hd"]))
        self.register_buffer("inv_freq", inv, persistent=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):
        freqs = torch.arange(ids.shape[1], dtype=torch.float32, device=ids.device)[:, None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return x @ (self.model.embed_tokens.weight if self.tied else self.lm_head.weight).T


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, help="timed steps (default: per preset)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--config", help="a Hugging Face config.json to use instead of a preset's shape")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = dict(PRESETS[a.preset])
    seq, batch, steps = cfg.pop("seq"), cfg.pop("batch"), cfg.pop("steps")
    if a.config:
        with open(a.config) as f:
            hf = json.load(f)
        keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps")
        cfg = {k: hf[k] for k in keys if k in hf}
    seq, batch, steps = a.seq or seq, a.batch or batch, a.steps or steps
    model = Llama(cfg, a.attn)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1))
    losses, t0 = [], None
    for step in range(a.warmup + steps):
        if step == a.warmup:
            t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dt = time.perf_counter() - t0
    tokens = steps * batch * seq
    flops_per_token = 6 * n_params + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq
    print(json.dumps({
        "preset": a.preset, "config": cfg, "seq": seq, "batch": batch, "threads": a.threads, "attn": a.attn,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "loadavg_1m_before": round(load_before, 2),
        "torch": torch.__version__, "n_params": n_params, "warmup_steps": a.warmup, "timed_steps": steps,
        "seconds": round(dt, 3), "s_per_step": round(dt / steps, 4), "tokens_per_s": round(tokens / dt, 1),
        "flops_per_token": flops_per_token, "gflops_per_s": round(flops_per_token * tokens / dt / 1e9, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
    }))


if __name__ == "__main__":
    main()
