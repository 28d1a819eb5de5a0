//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3-30B-A3B, Qwen3-235B-A22B.
//!
//! Attention with per-head q/k RMSNorm and NeoX RoPE; routed experts under
//! `mlp.experts.E.{gate,up,down}_proj` with a softmax top-k router at
//! `mlp.gate` (renormalised when `norm_topk_prob`), or a dense SwiGLU MLP
//! for `mlp_only_layers` and off-step layers.

use serde_json::{Map, Value};

use crate::config::{Keys, ModelConfig, Routing};
use crate::error::Result;
use crate::gguf::config::ArchKeys;

use super::blocks::{Attention, QkNorm};
use super::decoder::{Attn, Mlp, Source};
use super::family::{ExpertNames, Family, GgufArch};

pub static FAMILY: Family = Family {
    name: "Qwen3Moe",
    model_types: &["qwen3_moe"],
    config,
    experts: ExpertNames::MLP,
    attention_note: ", per-head q/k norm",
    shared_note: "",
    layer,
    extra_layers: false,
    gguf: Some(GgufArch {
        arch: "qwen3moe",
        config: gguf_config,
        permute_qk: false,
    }),
};

/// llama.cpp renormalises Qwen3-MoE's top-k weights without a key saying
/// so (every release sets `norm_topk_prob`); `expert_weights_norm`, where a
/// converter writes it, says otherwise.
fn gguf_config(k: &ArchKeys<'_>, c: &mut Map<String, Value>) -> Result<()> {
    let norm = k.opt_bool("expert_weights_norm")?.unwrap_or(true);
    c.insert("norm_topk_prob".into(), norm.into());
    Ok(())
}

fn config(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    c.num_experts = keys.num_experts("num_experts")?;
    c.moe_intermediate_size = keys.usize("moe_intermediate_size")?;
    let norm = keys.opt_bool("norm_topk_prob")?.unwrap_or(false);
    c.routing = Routing::softmax(c.num_experts_per_tok, norm);
    c.attention_bias = keys.opt_bool("attention_bias")?.unwrap_or(false);
    // Qwen3 configs carry `sliding_window` even when it is off; only
    // `use_sliding_window: true` turns it on.
    if keys.opt_bool("use_sliding_window")?.unwrap_or(false) {
        let w = keys.usize("sliding_window")?;
        if w == 0 {
            return Err(keys.err("\"sliding_window\" must be positive".into()));
        }
        c.sliding_window = Some(w);
    }
    Ok(())
}

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
