#!/usr/bin/env python3
"""PyTorch anchor for dapt's GPU training benchmark (scripts/gpu-check.sh).

* `--write-hf DIR`: writes the model shape as a Hugging Face Llama directory (config.json and
  bf16 safetensors, seeded N(0, 0.02) weights, unit norms) for `dapt-worker train` to load: dapt
  and PyTorch train the same architecture at the same size.
* `--steps N`: trains the same shape, batch and sequence length with Hugging Face
  `LlamaForCausalLM` in PyTorch eager mode (no torch.compile), AdamW, gradient accumulation over
  micro-batches, and prints one JSON line: tokens/s over the timed steps, MFU against `--peak`,
  peak memory, and every step's loss (the mean over the step's tokens, as dapt logs it).
* `--hf DIR --batches FILE` (loss parity with dapt): start from the weights dapt starts from
  (the directory `--write-hf` wrote) and train on the token windows dapt trains on, in its order
  (`dapt-worker batches JOB --steps N --out FILE`: u32, [steps, global_batch, seq_len + 1]),
  with weight decay on the layers' matrices only (dapt's default: not on norms or the tied
  embedding). With a constant learning rate on both sides (the job gpu-check.sh writes), the two
  loss curves should agree to bf16's rounding; the warm-up steps count as steps here.

Shapes: `1b` (Llama 3.2 1B: d 2048, 16 layers, 32/8 heads, vocab 128256, tied) and `135m`
(SmolLM2-135M: d 576, 30 layers, 9/3 heads, vocab 49152, tied), `tiny` for a CPU smoke test.
FLOPs per token: 6 N + 12 L d s (PaLM appendix B), as `dapt plan` counts them.
"""
import argparse
import json
import os
import sys
import time

try:
    import torch
except ImportError:  # --flops-per-token needs no torch (scripts/gpu_results.py on any machine)
    torch = None

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               rope_theta=500000.0),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                 rope_theta=100000.0),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=16384,
                 rope_theta=10000.0),
}


def hf_config(shape, seq_len):
    c = dict(SHAPES[shape])
    c.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
             rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
             mlp_bias=False, max_position_embeddings=max(seq_len, 2048),
             bos_token_id=0, eos_token_id=0, torch_dtype="bfloat16")
    return c


def num_params(c):
    d, i, l, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * i
    return v * d + l * per_layer + d  # tied head


def flops_per_token(c, seq_len):
    return 6 * num_params(c) + 12 * c["num_hidden_layers"] * c["hidden_size"] * seq_len


def write_hf(shape, seq_len, out, seed):
    """Random weights in HF names, written straight from torch (no transformers import)."""
    from safetensors.torch import save_file
    c = hf_config(shape, seq_len)
    d, i = c["hidden_size"], c["intermediate_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)
    t = {"model.embed_tokens.weight": normal(c["vocab_size"], d), "model.norm.weight": ones(d)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}"
        t[f"{p}.input_layernorm.weight"] = ones(d)
        t[f"{p}.post_attention_layernorm.weight"] = ones(d)
        t[f"{p}.self_attn.q_proj.weight"] = normal(q, d)
        t[f"{p}.self_attn.k_proj.weight"] = normal(kv, d)
        t[f"{p}.self_attn.v_proj.weight"] = normal(kv, d)
        t[f"{p}.self_attn.o_proj.weight"] = normal(d, q)
        t[f"{p}.mlp.gate_proj.weight"] = normal(i, d)
        t[f"{p}.mlp.up_proj.weight"] = normal(i, d)
        t[f"{p}.mlp.down_proj.weight"] = normal(d, i)
    os.makedirs(out, exist_ok=True)
    save_file(t, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    n = sum(x.numel() for x in t.values())
    assert n == num_params(c), (n, num_params(c))
    return n


def bench(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = hf_config(a.shape, a.seq_len)
    c.pop("architectures")
    c.pop("torch_dtype")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(**c)
    cfg._attn_implementation = a.attn
    torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = a.precision == "tf32"
    torch.manual_seed(a.seed)
    if a.hf:
        # The same initial weights as dapt: bf16 on disk, f32 master weights here and there.
        try:
            model = LlamaForCausalLM.from_pretrained(a.hf, config=cfg, dtype=torch.float32,
                                                     attn_implementation=a.attn)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = LlamaForCausalLM.from_pretrained(a.hf, config=cfg, torch_dtype=torch.float32,
                                                     attn_implementation=a.attn)
        model = model.to(dev)
    else:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)  # f32 master weights
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    groups = [dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)] \
        if a.hf else model.parameters()
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    accum = a.global_batch // a.micro_batch
    tokens_per_step = a.global_batch * a.seq_len
    g = torch.Generator(device=dev).manual_seed(a.seed)
    vocab = min(a.token_vocab, c["vocab_size"])
    autocast = torch.autocast(device_type="cuda" if dev == "cuda" else "cpu",
                              dtype=torch.bfloat16, enabled=a.precision == "bf16")
    windows = None
    if a.batches:
        import numpy as np
        raw = np.fromfile(a.batches, dtype="<u4")
        width = a.seq_len + 1
        n = raw.size // (a.global_batch * width)
        if n < a.warmup + a.steps:
            sys.exit(f"{a.batches}: {n} steps of {a.global_batch} x {width} tokens, "
                     f"need {a.warmup + a.steps}")
        windows = torch.from_numpy(raw[: n * a.global_batch * width].astype(np.int64))
        windows = windows.view(n, a.global_batch, width).to(dev)
    losses = []

    def step():
        i = len(losses)
        total = torch.zeros((), device=dev)
        for m in range(accum):
            if windows is not None:
                ids = windows[i, m * a.micro_batch:(m + 1) * a.micro_batch]
            else:
                ids = torch.randint(0, vocab, (a.micro_batch, a.seq_len + 1), device=dev,
                                    generator=g)
            with autocast:
                out = model(input_ids=ids[:, :-1], labels=None)
                logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        return total

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    secs = time.perf_counter() - t0
    tps = a.steps * tokens_per_step / secs
    fpt = flops_per_token(c, a.seq_len)
    r = dict(framework="pytorch", torch=torch.__version__, shape=a.shape, precision=a.precision,
             attn=a.attn, params=num_params(c), seq_len=a.seq_len, global_batch=a.global_batch,
             micro_batch=a.micro_batch, steps=a.steps, step_s=secs / a.steps,
             tokens_per_s=tps, mfu=tps * fpt / a.peak, loss=loss.item(),
             losses=[x.item() for x in losses], same_data=bool(a.batches), same_init=bool(a.hf))
    if dev == "cuda":
        r.update(max_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                 max_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                 gpu=torch.cuda.get_device_name())
    print(json.dumps(r), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: no benchmark)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "tf32", "f32"], default="bf16")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--token-vocab", type=int, default=16384,
                   help="draw token ids below this (the dapt corpus's vocabulary)")
    p.add_argument("--peak", type=float, default=790e12, help="bf16 FLOP/s ceiling for MFU")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--write-hf", metavar="DIR")
    p.add_argument("--hf", metavar="DIR", help="start from this Hugging Face directory's weights")
    p.add_argument("--batches", metavar="FILE",
                   help="train on these token windows (dapt-worker batches), not random ids")
    p.add_argument("--flops-per-token", action="store_true",
                   help="print 6N + 12 L d s for the shape and exit")
    a = p.parse_args()
    if a.flops_per_token:
        c = hf_config(a.shape, a.seq_len)
        print(json.dumps(dict(params=num_params(c), flops_per_token=flops_per_token(c, a.seq_len))))
        return
    if (a.write_hf or a.steps) and torch is None:
        sys.exit("PyTorch is not installed: --write-hf and --steps need it")
    if a.write_hf:
        t0 = time.perf_counter()
        n = write_hf(a.shape, a.seq_len, a.write_hf, a.seed)
        print(json.dumps(dict(wrote=a.write_hf, params=n, secs=time.perf_counter() - t0)),
              flush=True)
    if a.steps:
        bench(a)


if __name__ == "__main__":
    sys.exit(main())
