//! Mixtral (`MixtralForCausalLM`): Mixtral-8x7B, Mixtral-8x22B.
//!
//! Plain grouped-query attention with NeoX RoPE, masked to `sliding_window`
//! when the config sets one; every layer sparse, experts under
//! `block_sparse_moe.experts.E.{w1,w3,w2}` (gate, up, down) as wide as
//! `intermediate_size`, router at `block_sparse_moe.gate`: softmax, top-k,
//! renormalised.

use std::sync::Arc;

use crate::checkpoint::TensorSource;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertCache;

use super::blocks::{Attention, QkNorm};
use super::decoder::{sparse, Attn, Mlp};

pub fn layer(
    ckpt: &dyn TensorSource,
    c: &ModelConfig,
    i: usize,
    cache: Option<&Arc<ExpertCache>>,
) -> Result<(Attn, Mlp)> {
    let p = format!("model.layers.{i}");
    let attn = Attention::load(ckpt, c, &format!("{p}.self_attn"), QkNorm::None)?;
    let moe = sparse(ckpt, c, i, &format!("{p}.block_sparse_moe"), cache)?;
    Ok((Attn::Grouped(attn), Mlp::Sparse(moe)))
}
