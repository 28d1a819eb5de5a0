//! OLMoE (`OlmoeForCausalLM`): OLMoE-1B-7B.
//!
//! Attention whose q and k RMSNorms span the whole projection rather than
//! one head, then `clip_qkv` clamping of q, k and v, then NeoX RoPE; every
//! layer sparse with experts as wide as `intermediate_size` under
//! `mlp.experts.E.{gate,up,down}_proj` and a softmax top-k router at
//! `mlp.gate`.

use crate::error::Result;

use super::blocks::{Attention, QkNorm};
use super::decoder::{Attn, Mlp, Source};

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(src.ckpt, src.cfg, &format!("{p}.self_attn"), QkNorm::Whole)?;
    let moe = src.sparse(i, &format!("{p}.mlp"))?;
    Ok((Attn::Grouped(attn), Mlp::Sparse(moe)))
}
