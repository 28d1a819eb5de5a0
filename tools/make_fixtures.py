#!/usr/bin/env python3
"""Tiny random MoE checkpoints of every supported family and HF transformers'
outputs on them.

The Rust test suite compares smoe against what this script records, so CI
needs no Python. Run from the repository root with torch and transformers
installed:

    python tools/make_fixtures.py [NAME ...]

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

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TOKENIZER = FIXTURES / "tokenizer"

# What every family's hub config carries, whatever the spec says.
COMMON = {
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "output_router_logits": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "initializer_range": 0.02,
}

# Per family: the hub config's fixed keys, and the tokenizer class its real
# checkpoints name (so that `smoe check`'s family test sees a real pairing).
FAMILIES = {
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        tokenizer_class="Qwen2Tokenizer",
        base={
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": None,
            "router_aux_loss_coef": 0.001,
            "transformers_version": "4.51.0",
        },
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"],
        tokenizer_class="LlamaTokenizer",
        base={"rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0,
              "transformers_version": "4.36.0"},
    ),
    "qwen2_moe": dict(
        architectures=["Qwen2MoeForCausalLM"],
        tokenizer_class="Qwen2Tokenizer",
        base={"rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 32768,
              "max_window_layers": 21, "router_aux_loss_coef": 0.001, "transformers_version": "4.40.0"},
    ),
    "olmoe": dict(
        architectures=["OlmoeForCausalLM"],
        tokenizer_class="GPTNeoXTokenizer",
        base={"rms_norm_eps": 1e-5, "attention_bias": False, "rope_scaling": None,
              "router_aux_loss_coef": 0.01, "transformers_version": "4.43.0"},
    ),
    "deepseek_v2": dict(
        architectures=["DeepseekV2ForCausalLM"],
        tokenizer_class="LlamaTokenizerFast",
        base={"rms_norm_eps": 1e-6, "attention_bias": False, "aux_loss_alpha": 0.001,
              "transformers_version": "4.39.3"},
    ),
    "deepseek_v3": dict(
        architectures=["DeepseekV3ForCausalLM"],
        tokenizer_class="LlamaTokenizerFast",
        base={"rms_norm_eps": 1e-6, "attention_bias": False, "scoring_func": "sigmoid",
              "topk_method": "noaux_tc", "transformers_version": "4.33.1"},
    ),
}

# Real DeepSeek configs stretch RoPE with YaRN; the fixtures do too, with a
# factor large enough that interpolation, the ramp and mscale all matter.
YARN = {
    "type": "yarn",
    "factor": 8,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

FIXTURE_SPECS = {
    # Plain: every layer sparse, head_dim * heads == hidden, separate LM head,
    # renormalised top-k, single safetensors file, generation_config with a list.
    "qwen3-moe-a": dict(
        family="qwen3_moe",
        config=dict(
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
        ),
        shards=1,
        seed=1,
    ),
    # The awkward corners: dense layers by mlp_only_layers and by
    # decoder_sparse_step, tied embeddings, no renormalisation, and
    # heads * head_dim (6 * 16 = 96) != hidden_size (48); sharded weights.
    "qwen3-moe-b": dict(
        family="qwen3_moe",
        config=dict(
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
        ),
        shards=3,
        seed=2,
    ),
    # Mixtral: block_sparse_moe.experts.E.{w1,w3,w2}, top-2 renormalised,
    # experts as wide as intermediate_size, no head_dim key, and a sliding
    # window shorter than the prompt so that the mask matters.
    "mixtral": dict(
        family="mixtral",
        config=dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
        ),
        shards=1,
        seed=3,
    ),
    # Qwen1.5-MoE: q/k/v biases, a sigmoid-gated shared expert, no
    # renormalisation, and one dense layer.
    "qwen2-moe": dict(
        family="qwen2_moe",
        config=dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
            rope_theta=1000000.0,
        ),
        shards=1,
        seed=4,
    ),
    # OLMoE: q/k norms over the whole projection, clip_qkv, experts as wide
    # as intermediate_size.
    "olmoe": dict(
        family="olmoe",
        config=dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            clip_qkv=1.5,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
        shards=1,
        seed=5,
    ),
    # DeepSeek-V2-Lite: MLA without a query LoRA, YaRN, a dense first layer,
    # two shared experts, greedy softmax routing with a scaling factor.
    "deepseek-v2-lite": dict(
        family="deepseek_v2",
        config=dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            scoring_func="softmax",
            rope_scaling=YARN,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
        shards=1,
        seed=6,
    ),
    # DeepSeek-V2: a query LoRA and group-limited greedy routing.
    "deepseek-v2": dict(
        family="deepseek_v2",
        config=dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=2.0,
            scoring_func="softmax",
            rope_scaling=YARN,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
        shards=1,
        seed=7,
    ),
    # DeepSeek-V3 / Kimi-K2 style: sigmoid scores with a correction bias,
    # noaux_tc group-limited top-k, renormalised and scaled.
    "deepseek-v3": dict(
        family="deepseek_v3",
        config=dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
        shards=1,
        seed=8,
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
    """config.json as the hub writes it (top-level rope_theta and
    rope_scaling, torch_dtype, each family's own key names), not as
    transformers 5 would re-save it."""
    family = FAMILIES[spec["family"]]
    cfg = {"architectures": family["architectures"], "model_type": spec["family"], "vocab_size": vocab_size}
    cfg.update(COMMON)
    cfg.update(family["base"])
    cfg.update({"bos_token_id": pad_id, "eos_token_id": eos_id})
    cfg.update(spec["config"])
    return cfg


def randomize(model, gen):
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
        for name, b in model.named_buffers():
            # DeepSeek-V3's router correction bias: large enough to change
            # which experts win.
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def hub_state_dict(model, spec):
    """The checkpoint under the names published checkpoints use (per-expert
    tensors, each family's own spelling): transformers' own save_pretrained
    translates its fused expert tensors back, so the names are exactly the
    ones its loader expects."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(f))
    if spec["config"]["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


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

    (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
    gen_cfg = {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id], "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    # transformers reads the hub config as it would from the hub.
    hf_cfg = AutoConfig.from_pretrained(out_dir)

    for attempt in range(20):
        seed = spec["seed"] * 1000 + attempt
        gen = torch.Generator().manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
        randomize(model, gen)
        tensors = hub_state_dict(model, spec)
        for f in out_dir.glob("model*.safetensors*"):
            f.unlink()
        save_shards(tensors, out_dir, spec["shards"])

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
        # cache; ask for a varied one. One that emits a stop id would end
        # smoe's generation early (transformers was told not to stop).
        stops = {eos_id, pad_id} & set(greedy)
        if margin >= 1e-3 and len(set(greedy)) >= 8 and not stops:
            break
        print(f"{name}: seed {seed}: greedy margin {margin:.2e}, {len(set(greedy))} distinct tokens, stop ids {stops}; retrying", file=sys.stderr)
    else:
        raise SystemExit(f"{name}: no seed gave a safe greedy margin")

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, out_dir / f)
    tok_cfg = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    if tok_cfg["tokenizer_class"] != FAMILIES[spec["family"]]["tokenizer_class"]:
        tok_cfg["tokenizer_class"] = FAMILIES[spec["family"]]["tokenizer_class"]
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="fixtures to (re)make; all by default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    vocab_size, tok_json = tokenizer_vocab()
    for name in args.names or FIXTURE_SPECS:
        make(name, FIXTURE_SPECS[name], vocab_size, tok_json)


if __name__ == "__main__":
    main()
