#!/usr/bin/env python3
"""Self-check of llama_ref.py against transformers' LlamaForCausalLM.

Builds random tiny Llamas (2 layers, hidden 64, 4 heads, 2 kv heads,
intermediate 128, vocab 100, theta 10000; variants: untied, tied + llama3
rope_scaling, linear rope_scaling), saves them as HF checkpoints (also a BF16
and a sharded copy), and compares llama_ref's logits and loss with PyTorch's.
Then the other families (FAMILIES: Qwen2 with biases, tied and untied, theta
1e6; Qwen3 with head_dim 24 != 64/4 and q/k norms; Mistral with a sliding
window of 8 < seq and with none), read from the config.json transformers
itself saved. --fixtures DIR writes each family's saved config.json and its
exact parameter count (params.json) for dapt's tests; --exports DIR... loads
directories dapt exported with AutoModelForCausalLM, checks the class, and
compares its logits with llama_ref's.
Needs torch + transformers (a one-off validation, not run in CI); without
them it prints a message and exits 0. HF computes RMSNorm, softmax and RoPE
in float32 even for a float64 model, so "HF fp64" is itself only ~1e-6 exact.

    python3 tests/reference/check_ref.py [--tol 3e-5] [--init 0.2]
                                         [--fixtures DIR] [--exports DIR ...]
"""
import argparse, json, os, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, hidden_act="silu", rope_scaling=None, tie_word_embeddings=False)
VARIANTS = {
    "untied": {},
    "tied+llama3": dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "linear": dict(rope_scaling=dict(type="linear", factor=4.0)),
}
# (name, transformers class prefix, config overrides), over BASE without rope_scaling.
FAMILIES = [
    ("qwen2", "Qwen2", dict(rope_theta=1e6, use_sliding_window=False)),
    ("qwen2-tied", "Qwen2", dict(rope_theta=1e6, tie_word_embeddings=True, num_key_value_heads=1)),
    ("qwen3", "Qwen3", dict(head_dim=24, rope_theta=1e6)),
    ("qwen3-tied", "Qwen3", dict(head_dim=8, tie_word_embeddings=True, num_key_value_heads=4)),
    ("mistral", "Mistral", dict(sliding_window=None, head_dim=16)),
    ("mistral-window", "Mistral", dict(sliding_window=8, head_dim=16)),
]


def check_families(a, ids, torch, transformers):
    """Each family built by transformers, saved, and read back by llama_ref from HF's files."""
    worst = 0.0
    counts = {}
    for name, cls, over in FAMILIES:
        cfg = {k: v for k, v in BASE.items() if k != "rope_scaling"}
        cfg.update(over)
        hf_cfg = getattr(transformers, cls + "Config")(**cfg, initializer_range=a.init,
                                                         attn_implementation="eager")
        torch.manual_seed(len(name))
        model = getattr(transformers, cls + "ForCausalLM")(hf_cfg).float().eval()
        with torch.no_grad():  # non-trivial norms (q_norm/k_norm too) and biases
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif n.endswith(".bias"):
                    p.copy_(0.2 * torch.randn_like(p))
            out = model(torch.tensor(ids), labels=torch.tensor(ids))
        want, want_loss = out.logits.numpy(), float(out.loss)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, safe_serialization=True)
            with open(os.path.join(d, "config.json")) as f:
                saved = json.load(f)
            got = llama_ref.forward(saved, llama_ref.load_weights(d, np.float32), ids, np.float32)
        diff = float(np.abs(got - want).max())
        loss, _ = llama_ref.next_token_loss(got, ids)
        n_params = model.num_parameters()
        counts[name] = {"config": saved, "num_parameters": n_params,
                        "tensors": sorted(model.state_dict().keys())}
        print(f"{name:15s} max|logit|={np.abs(want).max():.2f}  fp32 ref vs HF fp32: {diff:.3e}  "
              f"loss ref={loss:.6f} HF={want_loss:.6f}  parameters={n_params}")
        assert diff < a.tol and abs(loss - want_loss) < 1e-5, name
        worst = max(worst, diff)
    if a.fixtures:
        os.makedirs(a.fixtures, exist_ok=True)
        for name, c in counts.items():
            with open(os.path.join(a.fixtures, f"{name}.json"), "w") as f:
                json.dump(c, f, indent=1, sort_keys=True)
    return worst


def check_exports(a, torch, transformers):
    """Directories dapt exported: transformers loads each as its family, same logits as llama_ref."""
    for d in a.exports:
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()
        kind = type(model).__name__
        assert kind == cfg["architectures"][0], (d, kind)
        ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(2, 40))
        with torch.no_grad():
            want = model(torch.tensor(ids)).logits.numpy()
        got = llama_ref.forward(cfg, llama_ref.load_weights(d, np.float32), ids, np.float32)
        diff = float(np.abs(got - want).max())
        print(f"dapt export {os.path.basename(d):12s} loads as {kind}: max|logit|={np.abs(want).max():.2f} "
              f"ref vs HF {diff:.3e}")
        assert diff < a.tol, d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=3e-5,
                    help="max abs logit diff; float32 rounding alone is ~1e-5 at |logits|~7 (init 0.2)")
    ap.add_argument("--init", type=float, default=0.2, help="initializer_range (HF default is 0.02)")
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--fixtures", help="write each family's HF config.json and parameter count here")
    ap.add_argument("--exports", nargs="*", default=[], help="directories dapt exported")
    a = ap.parse_args()
    global np, llama_ref
    try:
        import numpy as np
        import llama_ref
        import torch
        import transformers
        from safetensors.torch import save_file
    except ImportError as e:
        print(f"check_ref: skipped ({e}); install numpy, safetensors, torch, transformers to run it")
        return 0
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BASE["vocab_size"], size=(3, a.seq))
    worst = 0.0
    for name, over in VARIANTS.items():
        cfg = {**BASE, **over}
        hf_cfg = transformers.LlamaConfig(**cfg, initializer_range=a.init, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
        with torch.no_grad():  # make the norms non-trivial too
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
            out = model(torch.tensor(ids), labels=torch.tensor(ids))
        want, want_loss = out.logits.numpy(), float(out.loss)
        with torch.no_grad():  # HF in float64: the ground truth for llama_ref --dtype float64
            want64 = model.double()(torch.tensor(ids)).logits.numpy()
            model.float()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, safe_serialization=True)
            with open(os.path.join(d, "config.json"), "w") as f:  # the config format dapt reads
                json.dump({**cfg, "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"]}, f)
            with open(os.path.join(d, "ids.json"), "w") as f:
                json.dump(ids.tolist(), f)
            got32 = llama_ref.forward(cfg, llama_ref.load_weights(d, np.float32), ids, np.float32)
            got64 = llama_ref.forward(cfg, llama_ref.load_weights(d, np.float64), ids, np.float64)
            d32 = float(np.abs(got32 - want).max())
            d64 = float(np.abs(got64 - want64).max())
            hf_self = float(np.abs(want - want64).max())
            loss, n = llama_ref.next_token_loss(got32, ids)
            print(f"{name:12s} max|logit|={np.abs(want).max():.2f}  fp32 ref vs HF fp32: {d32:.3e}  "
                  f"fp64 ref vs HF fp64: {d64:.3e}  (HF fp32 vs HF fp64: {hf_self:.3e})  "
                  f"loss ref={loss:.6f} HF={want_loss:.6f} tokens={n}")
            worst = max(worst, d32)
            assert d32 < a.tol and d64 < a.tol and abs(loss - want_loss) < 1e-5, name
            # BF16 checkpoint, sharded in two files: compare with HF run on the same bf16-rounded weights.
            sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                  if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
            keys = sorted(sd)
            shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
            os.remove(os.path.join(d, "model.safetensors"))
            for fn, ks in shards.items():
                save_file({k: sd[k] for k in ks}, os.path.join(d, fn))
            with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
                json.dump({"weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
            with torch.no_grad():
                model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
                want_bf = model(torch.tensor(ids)).logits.numpy()
            got = llama_ref.forward(cfg, llama_ref.load_weights(d, np.float32), ids)
            diff = float(np.abs(got - want_bf).max())
            print(f"{name:12s} bf16 sharded: max|dlogits|={diff:.3e}")
            assert diff < a.tol, name
            # The CLI, end to end.
            out_npy = os.path.join(d, "logits.npy")
            rc = os.system(f"{sys.executable} {llama_ref.__file__} {d} --ids {d}/ids.json --out {out_npy} --loss")
            assert rc == 0 and np.abs(np.load(out_npy) - want_bf).max() < a.tol
    worst = max(worst, check_families(a, ids, torch, transformers))
    check_exports(a, torch, transformers)
    print(f"check_ref: OK, worst float32 max abs diff {worst:.3e} (tol {a.tol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
