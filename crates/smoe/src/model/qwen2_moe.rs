//! Qwen2-MoE (`Qwen2MoeForCausalLM`): Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B.
//!
//! Attention with q/k/v biases and NeoX RoPE; sparse layers route like
//! Qwen3-MoE (`norm_topk_prob` usually false) and add an always-on shared
//! expert (`mlp.shared_expert`) scaled by `sigmoid(shared_expert_gate . x)`;
//! `mlp_only_layers` and off-step layers are dense.

use std::sync::Arc;

use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;

use super::blocks::{Attention, Ffn, QkNorm, SharedExpert};
use super::decoder::{sparse, Attn, Mlp};

pub fn layer(
    ckpt: &dyn TensorSource,
    c: &ModelConfig,
    i: usize,
    cache: Option<&Arc<ExpertCache>>,
) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let h = c.hidden_size;
    let attn = Attention::load(ckpt, c, &format!("{p}.self_attn"), QkNorm::None)?;
    let mlp = if c.is_moe_layer(i) {
        let mut moe = sparse(ckpt, c, i, &format!("{p}.mlp"), cache)?;
        moe.shared = Some(SharedExpert {
            ffn: Ffn::load(
                ckpt,
                &format!("{p}.mlp.shared_expert"),
                h,
                c.shared_expert_intermediate_size,
            )?,
            gate: Some(ckpt.tensor(&format!("{p}.mlp.shared_expert_gate.weight"), &[1, h])?),
        });
        Mlp::Sparse(moe)
    } else {
        Mlp::Dense(Ffn::load(
            ckpt,
            &format!("{p}.mlp"),
            h,
            c.intermediate_size,
        )?)
    };
    Ok((Attn::Grouped(attn), mlp))
}
