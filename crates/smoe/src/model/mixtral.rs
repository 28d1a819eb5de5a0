//! Mixtral (`MixtralForCausalLM`): Mixtral-8x7B, Mixtral-8x22B.
//!
//! Plain grouped-query attention with NeoX RoPE, masked to `sliding_window`
//! when the config sets one; every layer sparse, experts under
//! `block_sparse_moe.experts.E.{w1,w3,w2}` (gate, up, down) as wide as
//! `intermediate_size`, router at `block_sparse_moe.gate`: softmax, top-k,
//! renormalised.

use serde_json::{Map, Value};

use crate::config::{Keys, ModelConfig, Routing};
use crate::error::Result;
use crate::gguf::config::ArchKeys;

use super::blocks::{Attention, QkNorm};
use super::decoder::{Attn, Mlp, Source};
use super::family::{ExpertNames, Family, GgufArch};

pub static FAMILY: Family = Family {
    name: "Mixtral",
    model_types: &["mixtral"],
    config,
    experts: ExpertNames {
        block: "block_sparse_moe",
        proj: ["w1", "w3", "w2"],
    },
    attention_note: "",
    shared_note: "",
    layer,
    extra_layers: false,
    gguf: Some(GgufArch {
        arch: "llama",
        config: gguf_config,
        permute_qk: true,
    }),
};

/// Mixtral is llama.cpp's `llama` architecture with experts; without them
/// the file is a dense Llama, which smoe does not run.
fn gguf_config(k: &ArchKeys<'_>, _: &mut Map<String, Value>) -> Result<()> {
    match k.opt_usize("expert_count")? {
        Some(n) if n > 0 => Ok(()),
        _ => Err(k.err(
            "expert_count",
            "missing or 0: a dense Llama, not a Mixture-of-Experts model",
        )),
    }
}

fn config(keys: &Keys<'_>, c: &mut ModelConfig) -> Result<()> {
    c.num_experts = keys.num_experts("num_experts")?;
    // Experts as wide as `intermediate_size`, no biases anywhere.
    c.moe_intermediate_size = c.intermediate_size;
    c.routing = Routing::softmax(c.num_experts_per_tok, true);
    c.sliding_window = keys.opt_usize("sliding_window")?;
    Ok(())
}

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(src.ckpt, src.cfg, &format!("{p}.self_attn"), QkNorm::None)?;
    let moe = src.sparse(i, &format!("{p}.block_sparse_moe"))?;
    Ok((Attn::Grouped(attn), Mlp::Sparse(moe)))
}
