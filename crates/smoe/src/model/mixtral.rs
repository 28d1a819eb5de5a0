//! Mixtral (`MixtralForCausalLM`): Mixtral-8x7B, Mixtral-8x22B.
//!
//! Plain grouped-query attention with NeoX RoPE, masked to `sliding_window`
//! when the config sets one; every layer sparse, experts under
//! `block_sparse_moe.experts.E.{w1,w3,w2}` (gate, up, down) as wide as
//! `intermediate_size`, router at `block_sparse_moe.gate`: softmax, top-k,
//! renormalised.

use crate::error::Result;

use super::blocks::{Attention, QkNorm};
use super::decoder::{Attn, Mlp, Source};

pub fn layer(src: &Source<'_>, i: usize) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(src.ckpt, src.cfg, &format!("{p}.self_attn"), QkNorm::None)?;
    let moe = src.sparse(i, &format!("{p}.block_sparse_moe"))?;
    Ok((Attn::Grouped(attn), Mlp::Sparse(moe)))
}
