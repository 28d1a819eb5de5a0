//! Qwen2-MoE (`Qwen2MoeForCausalLM`): Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B.
//!
//! Attention with q/k/v biases and NeoX RoPE; sparse layers route like
//! Qwen3-MoE (`norm_topk_prob` usually false) and add an always-on shared
//! expert (`mlp.shared_expert`) scaled by `sigmoid(shared_expert_gate . x)`;
//! `mlp_only_layers` and off-step layers are dense.

use serde_json::{Map, Value};

use crate::config::{Keys, ModelConfig, Routing};
use crate::error::Result;
use crate::gguf::config::ArchKeys;

use super::blocks::{Attention, QkNorm, SharedExpert};
use super::decoder::{Attn, Mlp, Source};
use super::family::{ExpertNames, Family, GgufArch};

pub static FAMILY: Family = Family {
    name: "Qwen2Moe",
    model_types: &["qwen2_moe"],
    config,
    experts: ExpertNames::MLP,
    attention_note: "",
    shared_note: ", sigmoid-gated,",
    layer,
    extra_layers: false,
    gguf: Some(GgufArch {
        arch: "qwen2moe",
        config: gguf_config,
        permute_qk: false,
    }),
};

/// The shared expert's width is stored; llama.cpp never renormalises the
/// top-k weights (`norm_topk_prob` false in every release) unless
/// `expert_weights_norm` says so, and q/k/v biases are there when their
/// tensors are.
fn gguf_config(k: &ArchKeys<'_>, c: &mut Map<String, Value>) -> Result<()> {
    c.insert(
        "shared_expert_intermediate_size".into(),
        k.usize("expert_shared_feed_forward_length")?.into(),
    );
    let norm = k.opt_bool("expert_weights_norm")?.unwrap_or(false);
    c.insert("norm_topk_prob".into(), norm.into());
    c.insert("qkv_bias".into(), k.has_tensor("blk.0.attn_q.bias").into());
    Ok(())
}

fn config(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    c.num_experts = keys.num_experts("num_experts")?;
    c.moe_intermediate_size = keys.usize("moe_intermediate_size")?;
    let norm = keys.opt_bool("norm_topk_prob")?.unwrap_or(false);
    c.routing = Routing::softmax(c.num_experts_per_tok, norm);
    c.shared_expert_intermediate_size = keys.usize("shared_expert_intermediate_size")?;
    c.attention_bias = keys.opt_bool("qkv_bias")?.unwrap_or(true);
    if keys.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return Err(keys.err(
            "use_sliding_window is not supported for qwen2_moe (no published checkpoint sets it)"
                .into(),
        ));
    }
    Ok(())
}

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(src.ckpt, src.cfg, &format!("{p}.self_attn"), QkNorm::None)?;
    let mlp = if src.cfg.is_moe_layer(i) {
        let mut moe = src.sparse(i, &format!("{p}.mlp"))?;
        let gate = format!("{p}.mlp.shared_expert_gate.weight");
        moe.shared = Some(SharedExpert::load(
            src.ckpt,
            src.cfg,
            &format!("{p}.mlp.shared_expert"),
            Some(&gate),
        )?);
        Mlp::Sparse(moe)
    } else {
        src.dense(&format!("{p}.mlp"))?
    };
    Ok((Attn::Grouped(attn), mlp))
}
