//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3-30B-A3B, Qwen3-235B-A22B.
//!
//! Attention with per-head q/k RMSNorm and NeoX RoPE; routed experts under
//! `mlp.experts.E.{gate,up,down}_proj` with a softmax top-k router at
//! `mlp.gate` (renormalised when `norm_topk_prob`), or a dense SwiGLU MLP
//! for `mlp_only_layers` and off-step layers.

use std::sync::Arc;

use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;

use super::blocks::{Attention, Ffn, QkNorm};
use super::decoder::{sparse, Attn, Mlp};

pub fn layer(
    ckpt: &dyn TensorSource,
    c: &ModelConfig,
    i: usize,
    cache: Option<&Arc<ExpertCache>>,
) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(ckpt, c, &format!("{p}.self_attn"), QkNorm::PerHead)?;
    let mlp = if c.is_moe_layer(i) {
        Mlp::Sparse(sparse(ckpt, c, i, &format!("{p}.mlp"), cache)?)
    } else {
        Mlp::Dense(Ffn::load(
            ckpt,
            &format!("{p}.mlp"),
            c.hidden_size,
            c.intermediate_size,
        )?)
    };
    Ok((Attn::Grouped(attn), mlp))
}
