#!/usr/bin/env python3
"""Routing statistics of a Qwen3-MoE checkpoint on an evaluation set.

    python tools/routing_stats.py [--model models/builtin] [--eval models/builtin/eval.json]

Runs each evaluation exchange (the chat-templated prompt followed by the
expected reply and <|im_end|>) through transformers and records the top-k
experts the router picks for every token in every layer. Reports, per layer:

  entropy   of the expert usage distribution over all tokens, in bits
            (log2(num_experts) would be perfectly uniform use);
  JSD       mean pairwise Jensen-Shannon divergence (bits, 0..1) between the
            usage distributions of the domains: 0 would mean every domain
            uses the experts alike;
  shuffled  the same JSD with the domain labels shuffled over the prompts
            (mean of 20 seeded shuffles): what sampling noise alone gives;
  replies   JSD and shuffled JSD again over the reply tokens only (the
            chat template around every prompt is the same in all domains).

Needs torch, transformers and tokenizers (e.g. /root/venv-ref).
"""

import argparse
import itertools
import json
import math
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def entropy(p):
    return -sum(x * math.log2(x) for x in p if x > 0)


def normalize(counts):
    total = sum(counts)
    return [c / total for c in counts] if total else counts


def jsd(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return entropy(m) - (entropy(p) + entropy(q)) / 2


def mean_pairwise_jsd(per_item, labels, layer, n_experts):
    groups = {}
    for counts, label in zip(per_item, labels):
        g = groups.setdefault(label, [0] * n_experts)
        for e, c in enumerate(counts[layer]):
            g[e] += c
    dists = [normalize(g) for g in groups.values()]
    pairs = list(itertools.combinations(dists, 2))
    return sum(jsd(p, q) for p, q in pairs) / len(pairs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/builtin"))
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    eval_path = args.eval or args.model / "eval.json"

    torch.set_num_threads(2)
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    n_layers, n_experts, k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok

    items = json.loads(eval_path.read_text())
    per_item, per_reply, labels = [], [], []
    for item in items:
        prompt = f"<|im_start|>user\n{item['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        head = len(tok.encode(prompt, add_special_tokens=False).ids)
        text = prompt + f"{item['expected']}<|im_end|>"
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
        counts, reply = [], []
        for logits in out.router_logits:
            top = logits.reshape(-1, n_experts).topk(k, dim=-1).indices
            counts.append(torch.bincount(top.flatten(), minlength=n_experts).tolist())
            reply.append(torch.bincount(top[head:].flatten(), minlength=n_experts).tolist())
        per_item.append(counts)
        per_reply.append(reply)
        labels.append(item["domain"])

    layers = []
    for layer in range(n_layers):
        usage = normalize([sum(c[layer][e] for c in per_item) for e in range(n_experts)])
        real = mean_pairwise_jsd(per_item, labels, layer, n_experts)
        real_reply = mean_pairwise_jsd(per_reply, labels, layer, n_experts)
        shuffled, shuffled_reply = [], []
        for seed in range(20):
            perm = labels[:]
            random.Random(seed).shuffle(perm)
            shuffled.append(mean_pairwise_jsd(per_item, perm, layer, n_experts))
            shuffled_reply.append(mean_pairwise_jsd(per_reply, perm, layer, n_experts))
        layers.append({
            "layer": layer,
            "entropy_bits": entropy(usage),
            "effective_experts": 2 ** entropy(usage),
            "max_share": max(usage),
            "domain_jsd": real,
            "shuffled_jsd": sum(shuffled) / len(shuffled),
            "reply_jsd": real_reply,
            "reply_shuffled_jsd": sum(shuffled_reply) / len(shuffled_reply),
        })
    report = {
        "prompts": len(items),
        "domains": sorted(set(labels)),
        "uniform_entropy_bits": math.log2(n_experts),
        "layers": layers,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{len(items)} prompts, domains {', '.join(report['domains'])}; "
          f"uniform use would be {math.log2(n_experts):.2f} bits")
    print("| layer | usage entropy (bits) | effective experts | busiest expert's share "
          "| domain JSD | shuffled-label JSD | reply-token JSD | shuffled |")
    print("|---|---|---|---|---|---|---|---|")
    for r in layers:
        print(f"| {r['layer']} | {r['entropy_bits']:.2f} | {r['effective_experts']:.1f} | "
              f"{100 * r['max_share']:.1f}% | {r['domain_jsd']:.3f} | {r['shuffled_jsd']:.3f} | "
              f"{r['reply_jsd']:.3f} | {r['reply_shuffled_jsd']:.3f} |")


if __name__ == "__main__":
    main()
