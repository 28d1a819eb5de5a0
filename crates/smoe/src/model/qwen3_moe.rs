//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3-30B-A3B, Qwen3-235B-A22B.
//!
//! Attention with per-head q/k RMSNorm and NeoX RoPE; routed experts under
//! `mlp.experts.E.{gate,up,down}_proj` with a softmax top-k router at
//! `mlp.gate` (renormalised when `norm_topk_prob`), or a dense SwiGLU MLP
//! for `mlp_only_layers` and off-step layers.

use crate::error::Result;

use super::blocks::{Attention, QkNorm};
use super::decoder::{Attn, Mlp, Source};

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(
        src.ckpt,
        src.cfg,
        &format!("{p}.self_attn"),
        QkNorm::PerHead,
    )?;
    let mlp = if src.cfg.is_moe_layer(i) {
        Mlp::Sparse(src.sparse(i, &format!("{p}.mlp"))?)
    } else {
        src.dense(&format!("{p}.mlp"))?
    };
    Ok((Attn::Grouped(attn), mlp))
}
