//! OLMoE (`OlmoeForCausalLM`): OLMoE-1B-7B.
//!
//! Attention whose q and k RMSNorms span the whole projection rather than
//! one head, then `clip_qkv` clamping of q, k and v, then NeoX RoPE; every
//! layer sparse with experts as wide as `intermediate_size` under
//! `mlp.experts.E.{gate,up,down}_proj` and a softmax top-k router at
//! `mlp.gate`.

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
    let attn = Attention::load(ckpt, c, &format!("{p}.self_attn"), QkNorm::Whole)?;
    let moe = sparse(ckpt, c, i, &format!("{p}.mlp"), cache)?;
    Ok((Attn::Grouped(attn), Mlp::Sparse(moe)))
}
