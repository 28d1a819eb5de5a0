#!/usr/bin/env python3
"""Quantization quality of a vault against its all-bf16 conversion.

Converts MODEL once per expert type (bf16, q8_0, q4_k by default; backbone
bf16) and once per backbone type asked for (experts bf16), runs `smoe logits
--all` on the same token ids through each, and reports per vault: what it
stores, the backbone bytes a decoded token reads (everything but the
embedding table, of which a token reads one row), top-1 agreement with the
all-bf16 vault and mean KL(bf16 || quantized) over all positions. With
--eval (the built-in model's models/builtin/eval.json), also the held-out
evaluation each vault scores at temperature 0. Standard library only; needs
a built smoe (cargo build --release).

    python3 bench/quality.py MODEL [--types q8_0,q4_k] [--backbone-types q8_0,q4_k]
                             [--tokens 48] [--eval EVAL.json] [--smoe target/release/smoe]
"""

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from collections import Counter
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


def score(smoe, model, items):
    """Held-out items answered exactly, ending at end-of-sequence."""
    correct = 0
    for it in items:
        out = subprocess.run([smoe, "run", "--model", str(model), "--prompt", it["prompt"], "--temperature",
                              "0", "--max-tokens", "64", "--json"], check=True, capture_output=True, text=True)
        j = json.loads(out.stdout)
        correct += j["text"].strip() == it["expected"] and j["stop_reason"] == "eos"
    return correct


def describe(manifest):
    """Stored types of experts and of the 2-D backbone tensors (with counts
    where mixed), and the backbone bytes read per decoded token."""
    experts = sorted({p["dtype"] for l in manifest["experts"] for p in l["parts"]})
    tensors = manifest["backbone"]
    counts = Counter(t["dtype"] for t in tensors.values() if len(t["shape"]) == 2)
    backbone = counts.most_common(1)[0][0] if len(counts) == 1 else \
        ",".join(f"{d}x{n}" for d, n in counts.most_common())
    tied = "lm_head.weight" not in tensors
    per_token = sum(t["len"] for n, t in tensors.items() if tied or n != "model.embed_tokens.weight")
    return ",".join(experts), backbone, per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--types", default="q8_0,q4_k", help="expert types, with a bf16 backbone")
    ap.add_argument("--backbone-types", default="", help="backbone types, with bf16 experts")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--eval", help="held-out items ({prompt, expected}) to score each vault on")
    ap.add_argument("--smoe", default="target/release/smoe")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(a.seed)
    ids = [rng.randrange(min(vocab, 150000)) for _ in range(a.tokens)]
    runs = [("bf16", "bf16")]
    runs += [(t, "bf16") for t in a.types.split(",") if t]
    runs += [("bf16", b) for b in a.backbone_types.split(",") if b]
    items = json.loads(Path(a.eval).read_text()) if a.eval else []
    with tempfile.TemporaryDirectory() as tmp:
        vaults = {}
        for experts, backbone in dict.fromkeys(runs):
            out = Path(tmp) / f"{experts}-{backbone}"
            subprocess.run([a.smoe, "convert", a.model, "-o", str(out), "--experts", experts,
                            "--backbone", backbone, "--quiet"], check=True)
            vaults[experts, backbone] = out
        ref = logits(a.smoe, vaults["bf16", "bf16"], ids)
        print(f"model {a.model}, {a.tokens} positions" + (f", {len(items)} held-out items" if items else ""))
        print(f"{'experts':<8} {'backbone':<8} {'stored as (experts; backbone)':<44} {'MB/token':>9} "
              f"{'top-1 agreement':>16} {'mean KL':>10}" + (f" {'held-out':>9}" if items else ""))
        for (experts, backbone), path in vaults.items():
            stored_e, stored_b, per_token = describe(json.loads((path / "manifest.json").read_text()))
            agree, kl = compare(ref, logits(a.smoe, path, ids))
            line = (f"{experts:<8} {backbone:<8} {stored_e + '; ' + stored_b:<44} {per_token / 1e6:>9.1f} "
                    f"{agree:>16.3f} {kl:>10.5f}")
            if items:
                line += f" {score(a.smoe, path, items):>5}/{len(items)}"
            print(line)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
