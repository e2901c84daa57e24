#!/usr/bin/env python3
"""Does an exported model give the same held-out perplexity in the NumPy reference as in dapt?

    python3 examples/smollm2-postgres/check_export.py MODEL_DIR CORPUS_DIR
        [--source postgres] [--windows 4] [--seq-len 256] [--dapt target/release/dapt]

Takes the first WINDOWS evaluation windows of SOURCE's held-out stream exactly as `dapt eval`
cuts them (window j = tokens [j*seq_len, j*seq_len + seq_len + 1)), scores them with the
independent NumPy Llama (tests/reference/llama_ref.py, which loads MODEL_DIR's config.json and
model.safetensors), runs `dapt eval MODEL_DIR CORPUS_DIR --max-tokens WINDOWS*seq_len` on the same
windows, and prints both mean NLLs and perplexities as JSON. Exits 1 when the perplexities differ
by more than --tolerance (relative). Needs numpy and safetensors.
"""
import argparse, json, math, os, subprocess, sys, tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def held_out_tokens(corpus, source, n):
    """The first n tokens of a source's held-out stream (its shards, in order)."""
    with open(os.path.join(corpus, "manifest.json")) as f:
        manifest = json.load(f)
    dtype = {"u16": np.uint16, "u32": np.uint32}[manifest["token_dtype"]]
    (src,) = [s for s in manifest["sources"] if s["name"] == source]
    parts, have = [], 0
    for shard in src["held_out"]["shards"]:
        if have >= n:
            break
        part = np.fromfile(os.path.join(corpus, shard["token_file"]["path"]), dtype="<" + np.dtype(dtype).str[1:])
        parts.append(part)
        have += len(part)
    tokens = np.concatenate(parts).astype(np.int64)
    if len(tokens) < n:
        sys.exit(f"{source} holds out {len(tokens)} tokens, fewer than the {n} needed")
    return tokens[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("corpus_dir")
    ap.add_argument("--source", default="postgres")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dapt", default=os.path.join(ROOT, "target/release/dapt"))
    ap.add_argument("--tolerance", type=float, default=1e-3)
    a = ap.parse_args()

    s, w = a.seq_len, a.windows
    tokens = held_out_tokens(a.corpus_dir, a.source, w * s + 1)
    ids = [tokens[j * s : j * s + s + 1].tolist() for j in range(w)]
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.json")
        with open(ids_path, "w") as f:
            json.dump(ids, f)
        ref = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tests/reference/llama_ref.py"), a.model_dir, "--ids", ids_path, "--loss"],
            check=True, capture_output=True, text=True,
        )
    ref = json.loads(ref.stdout)
    out = subprocess.run(
        [a.dapt, "eval", a.model_dir, a.corpus_dir, "--seq-len", str(s), "--max-tokens", str(w * s)],
        check=True, capture_output=True, text=True,
    )
    (ours,) = [r for r in json.loads(out.stdout) if r["source"] == a.source]
    result = {
        "model": a.model_dir,
        "source": a.source,
        "windows": w,
        "reference": {"mean_nll": ref["loss"], "perplexity": math.exp(ref["loss"]), "tokens": ref["tokens"]},
        "dapt_eval": {"mean_nll": ours["mean_nll"], "perplexity": ours["perplexity"], "tokens": ours["tokens"]},
    }
    rel = abs(result["dapt_eval"]["perplexity"] / result["reference"]["perplexity"] - 1)
    result["relative_difference"] = rel
    print(json.dumps(result, indent=2))
    if ref["tokens"] != ours["tokens"] or rel > a.tolerance:
        sys.exit(f"mismatch: relative difference {rel:.2e}, tokens {ref['tokens']} vs {ours['tokens']}")


if __name__ == "__main__":
    main()
