#!/usr/bin/env python3
"""Tiny random Qwen3-MoE checkpoints and HF transformers' outputs on them.

The Rust test suite compares smoe against what this script records, so CI
needs no Python. Run from the repository root with torch and transformers
installed:

    python tools/make_fixtures.py

Each fixture is a hub-style checkpoint (bf16 safetensors with per-expert
tensor names, hub-style config.json) plus `reference.json`:

    prompt_ids     the ids fed to the model
    logits         transformers' f32 logits at every prompt position
    greedy_ids     transformers' greedy continuation (KV-cached generate)
    min_margin     smallest top-1/top-2 logit gap along the greedy path; a
                   tiny gap would make the greedy test flaky, so seeds with
                   gaps under 1e-3 are rejected

The weights are scaled up from transformers' init (std 0.02) so that logits
are O(1): with near-zero logits a broken attention or router would still
pass a 1e-3 tolerance.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TOKENIZER = FIXTURES / "tokenizer"

FIXTURE_SPECS = {
    # Plain: every layer sparse, head_dim * heads == hidden, separate LM head,
    # renormalised top-k, single safetensors file, generation_config with a list.
    "qwen3-moe-a": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        shards=1,
        seed=1,
    ),
    # The awkward corners: dense layers by mlp_only_layers and by
    # decoder_sparse_step, tied embeddings, no renormalisation, and
    # heads * head_dim (6 * 16 = 96) != hidden_size (48); sharded weights.
    "qwen3-moe-b": dict(
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0, 2],
        tie_word_embeddings=True,
        rope_theta=10000.0,
        shards=3,
        seed=2,
    ),
}

PROMPT_LEN = 14
GREEDY_TOKENS = 32


def tokenizer_vocab():
    """Vocab size a bit above the fixture tokenizer's highest id, like real
    Qwen3 checkpoints (151,936 rows for 151,669 tokens)."""
    tok = json.loads((TOKENIZER / "tokenizer.json").read_text())
    max_id = max(
        [max(tok["model"]["vocab"].values())] + [t["id"] for t in tok.get("added_tokens", [])]
    )
    return (max_id + 1 + 63) // 64 * 64, tok


def hub_config(spec, vocab_size, eos_id, pad_id):
    """config.json as the hub writes it (num_experts, top-level rope_theta,
    torch_dtype), not as transformers 5 would re-save it."""
    keys = [
        "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
        "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
        "tie_word_embeddings", "rope_theta",
    ]
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "initializer_range": 0.02,
    }
    for k in keys:
        cfg[k] = spec[k]
    return cfg


def randomize(model, spec, gen):
    """Weights with O(1) activations: linear layers ~ N(0, 1/fan_in) scaled
    so residual updates matter, norms near 1, embeddings ~ N(0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5))


def hub_state_dict(model, spec):
    """Translate transformers 5's fused expert tensors back to the per-expert
    names every published Qwen3-MoE checkpoint uses."""
    out = {}
    inter = spec["moe_intermediate_size"]
    for name, t in model.state_dict().items():
        if spec["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter, :]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:, :]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def save_shards(tensors, out_dir, shards):
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    total = 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, out_dir / fname, metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def greedy_with_margin(model, prompt):
    out = model.generate(
        prompt,
        max_new_tokens=GREEDY_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    margin = float("inf")
    for s in out.scores:
        top2 = torch.topk(s[0].float(), 2).values
        margin = min(margin, float(top2[0] - top2[1]))
    return out.sequences[0, prompt.shape[1] :].tolist(), margin


def make(name, spec, vocab_size, tok_json):
    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    added = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    eos_id, pad_id = added["<|im_end|>"], added["<|endoftext|>"]
    cfg_json = hub_config(spec, vocab_size, eos_id, pad_id)

    for attempt in range(20):
        seed = spec["seed"] * 1000 + attempt
        gen = torch.Generator().manual_seed(seed)
        cfg = Qwen3MoeConfig(**{k: v for k, v in cfg_json.items() if k not in ("architectures", "torch_dtype", "transformers_version")})
        model = Qwen3MoeForCausalLM(cfg).float().eval()
        randomize(model, spec, gen)
        tensors = hub_state_dict(model, spec)
        for f in out_dir.glob("model*.safetensors*"):
            f.unlink()
        save_shards(tensors, out_dir, spec["shards"])
        (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
        gen_cfg = {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id], "do_sample": False}
        (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

        # Reload through transformers' own hub-format loader, in f32, so the
        # reference sees exactly the bf16-rounded weights smoe will see.
        ref = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        # The hub-name translation must round-trip: a tensor transformers did
        # not recognise would be silently re-initialised.
        mine = model.state_dict()
        for k, v in ref.state_dict().items():
            want = mine[k].to(torch.bfloat16).float()
            if not torch.equal(v, want):
                raise SystemExit(f"{name}: {k} did not survive the hub-format round trip")
        prompt = torch.randint(0, vocab_size, (1, PROMPT_LEN), generator=gen)
        with torch.no_grad():
            logits = ref(prompt).logits[0].float()
            greedy, margin = greedy_with_margin(ref, prompt)
        top2 = torch.topk(logits, 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        # A continuation that repeats one token would not exercise the KV
        # cache; ask for a varied one.
        if margin >= 1e-3 and len(set(greedy)) >= 8:
            break
        print(f"{name}: seed {seed}: greedy margin {margin:.2e}, {len(set(greedy))} distinct tokens; retrying", file=sys.stderr)
    else:
        raise SystemExit(f"{name}: no seed gave a safe greedy margin")

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, out_dir / f)
    reference = {
        "prompt_ids": prompt[0].tolist(),
        "logits": [[round(float(x), 6) for x in row] for row in logits],
        "greedy_ids": greedy,
        "min_margin": margin,
        "seed": seed,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    (out_dir / "reference.json").write_text(json.dumps(reference) + "\n")
    print(f"{name}: seed {seed}, logits |max| {logits.abs().max():.2f}, greedy margin {margin:.2e}, greedy {greedy[:8]}...")


def main():
    torch.set_num_threads(2)
    vocab_size, tok_json = tokenizer_vocab()
    for name, spec in FIXTURE_SPECS.items():
        make(name, spec, vocab_size, tok_json)


if __name__ == "__main__":
    main()
