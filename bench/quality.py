#!/usr/bin/env python3
"""Quantization quality of a vault against its bf16 conversion.

Converts MODEL once per expert type (bf16, q8_0, q4_k by default), runs
`smoe logits --all` on the same token ids through each, and reports per
type: top-1 agreement with bf16 and mean KL(bf16 || quantized) over all
positions. Standard library only; needs a built smoe (cargo build --release).

    python3 bench/quality.py MODEL [--types q8_0,q4_k] [--tokens 48] [--smoe target/release/smoe]
"""

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path


def logits(smoe, model, ids):
    out = subprocess.run(
        [smoe, "logits", "--model", str(model), "--ids", ",".join(map(str, ids)), "--all"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["logits"]


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def compare(ref, got):
    agree, kl = 0, 0.0
    for r, g in zip(ref, got):
        agree += max(range(len(r)), key=r.__getitem__) == max(range(len(g)), key=g.__getitem__)
        lr, lg = log_softmax(r), log_softmax(g)
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lr, lg))
    return agree / len(ref), kl / len(ref)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--types", default="q8_0,q4_k")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--smoe", default="target/release/smoe")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(a.seed)
    ids = [rng.randrange(min(vocab, 150000)) for _ in range(a.tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        vaults = {}
        for t in ["bf16"] + a.types.split(","):
            out = Path(tmp) / t
            subprocess.run([a.smoe, "convert", a.model, "-o", str(out), "--experts", t, "--quiet"], check=True)
            manifest = json.loads((out / "manifest.json").read_text())
            stored = sorted({p["dtype"] for l in manifest["experts"] for p in l["parts"]})
            vaults[t] = (out, stored)
        ref = logits(a.smoe, vaults["bf16"][0], ids)
        print(f"model {a.model}, {a.tokens} positions")
        print(f"{'experts':<8} {'stored as':<12} {'top-1 agreement':>16} {'mean KL':>10}")
        for t, (path, stored) in vaults.items():
            if t == "bf16":
                continue
            agree, kl = compare(ref, logits(a.smoe, path, ids))
            print(f"{t:<8} {','.join(stored):<12} {agree:>16.3f} {kl:>10.5f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
