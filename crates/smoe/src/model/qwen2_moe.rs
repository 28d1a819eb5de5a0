//! Qwen2-MoE (`Qwen2MoeForCausalLM`): Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B.
//!
//! Attention with q/k/v biases and NeoX RoPE; sparse layers route like
//! Qwen3-MoE (`norm_topk_prob` usually false) and add an always-on shared
//! expert (`mlp.shared_expert`) scaled by `sigmoid(shared_expert_gate . x)`;
//! `mlp_only_layers` and off-step layers are dense.

use crate::error::Result;

use super::blocks::{Attention, QkNorm, SharedExpert};
use super::decoder::{Attn, Mlp, Source};

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
