//! OLMoE (`OlmoeForCausalLM`): OLMoE-1B-7B.
//!
//! Attention whose q and k RMSNorms span the whole projection rather than
//! one head, then `clip_qkv` clamping of q, k and v, then NeoX RoPE; every
//! layer sparse with experts as wide as `intermediate_size` under
//! `mlp.experts.E.{gate,up,down}_proj` and a softmax top-k router at
//! `mlp.gate`.

use serde_json::{Map, Value};

use crate::config::{Keys, ModelConfig, Routing};
use crate::error::Result;
use crate::gguf::config::ArchKeys;

use super::blocks::{Attention, QkNorm};
use super::decoder::{Attn, Mlp, Source};
use super::family::{ExpertNames, Family, GgufArch};

pub static FAMILY: Family = Family {
    name: "Olmoe",
    model_types: &["olmoe"],
    config,
    experts: ExpertNames::MLP,
    attention_note: ", whole-width q/k norm",
    shared_note: "",
    layer,
    extra_layers: false,
    gguf: Some(GgufArch {
        arch: "olmoe",
        config: gguf_config,
        permute_qk: false,
    }),
};

/// llama.cpp never renormalises OLMoE's top-k weights unless
/// `expert_weights_norm` says so; `clip_qkv` is stored as
/// `attention.clamp_kqv`.
fn gguf_config(k: &ArchKeys<'_>, c: &mut Map<String, Value>) -> Result<()> {
    let norm = k.opt_bool("expert_weights_norm")?.unwrap_or(false);
    c.insert("norm_topk_prob".into(), norm.into());
    if let Some(clip) = k.opt_f64("attention.clamp_kqv")? {
        c.insert("clip_qkv".into(), clip.into());
    }
    Ok(())
}

fn config(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    c.num_experts = keys.num_experts("num_experts")?;
    c.moe_intermediate_size = c.intermediate_size;
    let norm = keys.opt_bool("norm_topk_prob")?.unwrap_or(false);
    c.routing = Routing::softmax(c.num_experts_per_tok, norm);
    c.attention_bias = keys.opt_bool("attention_bias")?.unwrap_or(false);
    c.o_bias = c.attention_bias;
    c.clip_qkv = keys.opt_f64("clip_qkv")?.map(|c| c as f32);
    Ok(())
}

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(src.ckpt, src.cfg, &format!("{p}.self_attn"), QkNorm::Whole)?;
    let moe = src.sparse(i, &format!("{p}.mlp"))?;
    Ok((Attn::Grouped(attn), Mlp::Sparse(moe)))
}
